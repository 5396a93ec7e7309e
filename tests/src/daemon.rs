//! The real `vmsnapd`, started as a child with its own notify socket.
//!
//! Readiness is the `READY=1` datagram the daemon sends on `$NOTIFY_SOCKET` once it owns its
//! bus name; nothing here sleeps for it. The daemon runs in its own process group. Its stdout
//! and stderr go to a log file that survives restarts and is printed when a test panics.
//!
//! Guests that vmsnapd starts outlive it by design. Whenever the harness stops a daemon it first
//! notes the daemon's descendants; since the test process is a child subreaper they then become
//! its children, and [`Daemon`]'s `Drop` kills and reaps them after the last daemon is gone.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::deadline::Deadline;
use crate::process::{self, ChildGuard, TERM_GRACE};

/// Time allowed from spawning vmsnapd to its `READY=1`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the wait for `READY=1` looks whether the daemon died instead.
const EXIT_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Test hook every daemon of the harness gets (see `vmsnapd`'s `testhooks`): disks share write
/// permission so that tests can write patterns into a running guest's disks.
pub const BASE_HOOK: &str = "share-rw";

/// Log level passed to vmsnapd unless `VMSNAP_TEST_LOG_LEVEL` says otherwise.
const DEFAULT_LOG_LEVEL: &str = "debug";

/// A running (or deliberately stopped) `vmsnapd`.
#[derive(Debug)]
pub struct Daemon {
    binary: PathBuf,
    bus_address: String,
    state_dir: PathBuf,
    runtime_dir: PathBuf,
    log_path: PathBuf,
    notify_dir: tempfile::TempDir,
    starts: u32,
    /// Test hooks on top of [`BASE_HOOK`].
    hooks: Vec<String>,
    /// `--storage-dir`s: by default the directory holding the state directory (in a
    /// [`crate::TestEnv`], the test's directory), so images anywhere in it may be used.
    storage_dirs: Vec<PathBuf>,
    child: Option<ChildGuard>,
    last_status: Option<ExitStatus>,
    /// Descendants of daemons stopped so far: guests to kill and reap on drop.
    guests: BTreeSet<u32>,
}

impl Daemon {
    /// Starts vmsnapd on the bus at `bus_address` with the given directories (created if
    /// missing) and waits for `READY=1`. Its output is appended to `log_path`.
    pub fn start(bus_address: &str, state_dir: &Path, runtime_dir: &Path, log_path: &Path) -> Self {
        Self::start_with_hooks(bus_address, state_dir, runtime_dir, log_path, &[])
    }

    /// Like [`Daemon::start`], with test hooks `hooks` (entries of `VMSNAPD_TEST_HOOKS`, e.g.
    /// `fail-at=after-memory`) on top of [`BASE_HOOK`]. Restarts keep them.
    pub fn start_with_hooks(
        bus_address: &str,
        state_dir: &Path,
        runtime_dir: &Path,
        log_path: &Path,
        hooks: &[&str],
    ) -> Self {
        let binary = process::project_binary("vmsnapd", "VMSNAPD_BIN");
        Self::spawn_new(
            &binary,
            bus_address,
            state_dir,
            runtime_dir,
            log_path,
            hooks,
        )
    }

    /// Like [`Daemon::start`] with another program in place of vmsnapd (the harness's
    /// self-tests use a stand-in script; it gets the same arguments and environment).
    pub fn start_binary(
        binary: &Path,
        bus_address: &str,
        state_dir: &Path,
        runtime_dir: &Path,
        log_path: &Path,
    ) -> Self {
        Self::spawn_new(binary, bus_address, state_dir, runtime_dir, log_path, &[])
    }

    fn spawn_new(
        binary: &Path,
        bus_address: &str,
        state_dir: &Path,
        runtime_dir: &Path,
        log_path: &Path,
        hooks: &[&str],
    ) -> Self {
        assert!(
            hooks.iter().all(|h| !h.contains(',')),
            "a test hook cannot contain a comma: {hooks:?}"
        );
        process::become_subreaper();
        for dir in [state_dir, runtime_dir] {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        let mut daemon = Self {
            binary: binary.to_owned(),
            bus_address: bus_address.to_owned(),
            state_dir: state_dir.to_owned(),
            runtime_dir: runtime_dir.to_owned(),
            log_path: log_path.to_owned(),
            notify_dir: tempfile::Builder::new()
                .prefix("vmsnap-notify-")
                .tempdir()
                .expect("cannot create the notify directory"),
            starts: 0,
            hooks: hooks.iter().map(|h| h.to_string()).collect(),
            storage_dirs: state_dir.parent().into_iter().map(Path::to_owned).collect(),
            child: None,
            last_status: None,
            guests: BTreeSet::new(),
        };
        daemon.start_again();
        daemon
    }

    /// Starts the daemon again with the same bus and directories after [`Daemon::stop`] or
    /// [`Daemon::kill9`], and waits for `READY=1`.
    pub fn start_again(&mut self) {
        self.start_again_within(READY_TIMEOUT);
    }

    /// Like [`Daemon::start_again`], allowing `ready_timeout` for `READY=1` instead of
    /// [`READY_TIMEOUT`] (the benchmark starts daemons with very large catalogs).
    pub fn start_again_within(&mut self, ready_timeout: Duration) {
        assert!(self.child.is_none(), "vmsnapd is already running");
        self.starts += 1;
        // A fresh socket per start: a datagram left from the previous run must not count.
        let socket_path = self
            .notify_dir
            .path()
            .join(format!("notify-{}.sock", self.starts));
        let socket = UnixDatagram::bind(&socket_path)
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", socket_path.display()));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        let log_err = log.try_clone().expect("cannot duplicate the log file");
        let level =
            std::env::var("VMSNAP_TEST_LOG_LEVEL").unwrap_or_else(|_| DEFAULT_LOG_LEVEL.into());
        let hooks = std::iter::once(BASE_HOOK)
            .chain(self.hooks.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(",");

        let mut cmd = Command::new(&self.binary);
        cmd.arg("--address")
            .arg(&self.bus_address)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--log-level")
            .arg(level)
            .args(
                self.storage_dirs
                    .iter()
                    .flat_map(|d| [std::ffi::OsStr::new("--storage-dir"), d.as_os_str()]),
            )
            .env("NOTIFY_SOCKET", &socket_path)
            .env("VMSNAPD_TEST_HOOKS", hooks)
            // Every guest under TCG, as on CI machines (no KVM there): the same timing
            // everywhere, and nested KVM here is slower than TCG through SeaBIOS. The
            // benchmark may ask for another accelerator through VMSNAP_TEST_ACCEL.
            .env(
                "VMSNAPD_ACCEL",
                std::env::var("VMSNAP_TEST_ACCEL").unwrap_or_else(|_| "tcg".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = ChildGuard::spawn("vmsnapd", &mut cmd)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        self.wait_ready(&socket, Deadline::after(ready_timeout));
        let _ = std::fs::remove_file(&socket_path);
    }

    fn wait_ready(&mut self, socket: &UnixDatagram, deadline: Deadline) {
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        loop {
            if deadline.expired() {
                self.fail(&format!("vmsnapd sent no READY=1 in time (got {seen:?})"));
            }
            socket
                .set_read_timeout(Some(deadline.remaining_nonzero().min(EXIT_CHECK_INTERVAL)))
                .expect("cannot set the socket timeout");
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let ready = message.lines().any(|line| line == "READY=1");
                    seen.push(message);
                    if ready {
                        return;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let child = self.child.as_mut().expect("daemon child");
                    if let Some(status) = child.try_wait() {
                        self.child = None;
                        self.last_status = Some(status);
                        self.fail(&format!("vmsnapd exited ({status}) before READY=1"));
                    }
                }
                Err(e) => panic!("cannot read the notify socket: {e}"),
            }
        }
    }

    /// Panics with `message`; `Drop` then prints the daemon's log.
    fn fail(&self, message: &str) -> ! {
        panic!("{message} (the vmsnapd log follows)");
    }

    /// Stops the daemon with SIGTERM (SIGKILL after a grace period) and returns how it ended.
    /// Guests it started keep running.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("vmsnapd is not running");
        self.guests.extend(process::descendants(child.pid()));
        let status = child.terminate(TERM_GRACE);
        self.last_status = Some(status);
        status
    }

    /// Kills the daemon with SIGKILL, as a crash would. Guests it started keep running.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("vmsnapd is not running");
        self.guests.extend(process::descendants(child.pid()));
        self.last_status = Some(child.kill());
    }

    /// [`Daemon::stop`] then [`Daemon::start_again`]; panics if the daemon did not exit cleanly.
    pub fn restart(&mut self) {
        let status = self.stop();
        if !status.success() {
            self.fail(&format!(
                "vmsnapd did not exit cleanly on SIGTERM: {status}"
            ));
        }
        self.start_again();
    }

    /// Replaces the test hooks (on top of [`BASE_HOOK`]) for the next start.
    pub fn set_hooks(&mut self, hooks: &[&str]) {
        assert!(
            hooks.iter().all(|h| !h.contains(',')),
            "a test hook cannot contain a comma: {hooks:?}"
        );
        self.hooks = hooks.iter().map(|h| h.to_string()).collect();
    }

    /// Waits until a daemon that is meant to die by itself (test hook `crash-at`) has exited
    /// and returns how it ended. The guests it started, orphaned to this process, are noted
    /// so that `Drop` reaps them.
    pub fn wait_exited(&mut self, deadline: Deadline) -> ExitStatus {
        let child = self.child.as_mut().expect("vmsnapd is not running");
        let Some(status) = child.wait_until(deadline) else {
            self.fail("vmsnapd did not exit in time");
        };
        self.child = None;
        self.last_status = Some(status);
        let needle = self.runtime_dir.to_string_lossy().into_owned();
        for pid in process::descendants(std::process::id()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                self.guests.insert(pid);
            }
        }
        status
    }

    /// Whether a daemon process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(None) => true,
            Some(Some(status)) => {
                self.child = None;
                self.last_status = Some(status);
                false
            }
            None => false,
        }
    }

    /// The pid of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.pid())
    }

    /// How the last daemon process ended, if one did.
    pub fn last_status(&self) -> Option<ExitStatus> {
        self.last_status
    }

    /// Pids of the processes the running daemon started (its guests), read from /proc.
    pub fn children(&self) -> BTreeSet<u32> {
        self.pid().map(process::descendants).unwrap_or_default()
    }

    /// Replaces the `--storage-dir`s; takes effect at the next start.
    pub fn set_storage_dirs(&mut self, dirs: &[&Path]) {
        self.storage_dirs = dirs.iter().map(|d| d.to_path_buf()).collect();
    }

    /// The bus the daemon is on.
    pub fn bus_address(&self) -> &str {
        &self.bus_address
    }

    /// `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `--runtime-dir`.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the daemon has logged so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        process::reap_detached(std::mem::take(&mut self.guests));
        if std::thread::panicking() {
            eprintln!(
                "----- vmsnapd log ({}) -----\n{}----- end of vmsnapd log -----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}
