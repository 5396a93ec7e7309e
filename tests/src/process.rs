//! Spawning, bounding and reaping processes.
//!
//! Invariants: every process the harness spawns is owned by a value whose `Drop` kills it and
//! waits for it ([`ChildGuard`]), or is run to completion under a deadline ([`run`]). Long-lived
//! children get their own process group, so a signal sent to the test's group never reaches
//! them and a signal sent to theirs never reaches the test. The test process makes itself a
//! child subreaper ([`become_subreaper`]) before it starts the daemon, so guests that outlive
//! the daemon become the test's children and can be reaped at once instead of waiting for
//! PID 1.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::sync::mpsc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::deadline::Deadline;

/// Time a process is given to exit after SIGTERM before it gets SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(10);

/// The finished run of a short-lived command.
#[derive(Debug, Clone)]
pub struct Output {
    /// How the process ended.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Output {
    /// The exit code, or `128 + signal` when a signal ended the process (as a shell says).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .or_else(|| self.status.signal().map(|s| 128 + s))
            .unwrap_or(-1)
    }
}

/// Runs `cmd` with no stdin and captured output; kills it and panics if it is still running at
/// `deadline`.
pub fn run(cmd: &mut Command, deadline: Deadline) -> Output {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let pid = Pid::from_raw(pid_i32(child.id()));
    let (tx, rx) = mpsc::channel();
    // The thread owns the child and reaps it; until it has, the pid cannot be reused, so the
    // kill below reaches the right process.
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let (result, timed_out) = match rx.recv_timeout(deadline.remaining()) {
        Ok(result) => (result, false),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            (
                rx.recv().expect("waiter thread ended without a result"),
                true,
            )
        }
    };
    let output = result.unwrap_or_else(|e| panic!("cannot wait for {shown}: {e}"));
    let output = Output {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    if timed_out {
        panic!(
            "{shown} did not finish in time and was killed\nstdout:\n{}\nstderr:\n{}",
            output.stdout, output.stderr
        );
    }
    output
}

/// Runs `cmd` like [`run`] and panics with its output unless it exits with status 0.
pub fn run_ok(cmd: &mut Command, deadline: Deadline) -> Output {
    let output = run(cmd, deadline);
    if !output.status.success() {
        panic!(
            "{cmd:?} failed ({})\nstdout:\n{}\nstderr:\n{}",
            output.status, output.stdout, output.stderr
        );
    }
    output
}

/// A long-lived child process in its own process group, killed and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group. `name` is used in messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> std::io::Result<Self> {
        let child = cmd.process_group(0).spawn()?;
        Ok(Self {
            name: name.to_owned(),
            child,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Mutable access to the std child, e.g. to take its stdout pipe.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has ended (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.name));
        }
        self.status
    }

    /// Sends `signal` unless the process has already been reaped.
    pub fn signal(&mut self, signal: Signal) {
        if self.try_wait().is_none() {
            let _ = kill(Pid::from_raw(pid_i32(self.pid())), signal);
        }
    }

    /// Waits for the process to end; `None` if it still runs at `deadline`.
    pub fn wait_until(&mut self, deadline: Deadline) -> Option<ExitStatus> {
        // std offers no wait with a timeout: poll the exit with a short backoff.
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if deadline.expired() {
                return None;
            }
            std::thread::sleep(pause.min(deadline.remaining()));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status once reaped.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait_until(Deadline::after(grace)) {
            return status;
        }
        eprintln!(
            "{} ignored SIGTERM for {grace:?}; sending SIGKILL",
            self.name
        );
        self.kill()
    }

    /// SIGKILL; returns the exit status once reaped.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.name));
        self.status = Some(status);
        status
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
        }
    }
}

/// Makes this process a child subreaper (once), so that orphaned descendants, such as guests
/// left running by a stopped daemon, become its children and [`reap_detached`] can collect them.
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            eprintln!("warning: cannot become a child subreaper ({e}); orphans go to PID 1");
        }
    });
}

/// Every descendant of `pid` (children, their children, ...), read from /proc.
pub fn descendants(pid: u32) -> BTreeSet<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = parent_of(child) {
                parents.push((child, ppid));
            }
        }
    }
    let mut found = BTreeSet::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, ppid) in &parents {
            if ppid == p && found.insert(child) {
                frontier.push(child);
            }
        }
    }
    found
}

/// The parent pid from /proc/PID/stat; the command name may contain spaces and parentheses,
/// so the fields are read after the last ')'.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Kills processes that are not (or no longer) a `Child` of ours, with their process groups, and
/// reaps those that are our children by now (see [`become_subreaper`]).
pub fn reap_detached(pids: impl IntoIterator<Item = u32>) {
    for pid in pids {
        let pid = Pid::from_raw(pid_i32(pid));
        // A guest leads its own process group; kill anything it started too.
        let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
        let _ = kill(pid, Signal::SIGKILL);
        match waitpid(pid, None) {
            Ok(_) | Err(Errno::ECHILD) => {}
            Err(e) => eprintln!("warning: cannot reap process {pid}: {e}"),
        }
    }
}

/// Whether a process with this pid exists (a zombie counts).
pub fn exists(pid: u32) -> bool {
    kill(Pid::from_raw(pid_i32(pid)), None).is_ok()
}

/// Path of a project binary such as `vmsnapd`: the file named by the environment variable
/// `env_var` if set, else the one cargo built next to the running executable (a test binary
/// lives in `target/<profile>/deps/`, xtask in `target/<profile>/`). Panics with a hint when it
/// is missing.
pub fn project_binary(name: &str, env_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env_var}={} does not name a file",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("cannot find the running executable");
    let mut dir = exe
        .parent()
        .expect("executable has no directory")
        .to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace` first, or set {env_var} to the binary",
        path.display()
    );
    path
}

/// A pid as the signed type the kernel interfaces use.
pub(crate) fn pid_i32(pid: u32) -> i32 {
    i32::try_from(pid).expect("pid out of range")
}
