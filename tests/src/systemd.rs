//! A real systemd manager for tests: the host's `/lib/systemd/systemd` booted as PID 1 of a
//! throwaway container ([`Sandbox`]), with the project installed into it as a user would.
//!
//! The container is built by the `vmsnap-sd-init` helper (see its module doc): new pid, mount,
//! uts, ipc and cgroup namespaces, an in-memory overlay of the host's root, its own cgroup2
//! subtree. The cargo build output is bind-mounted at its own path, and [`Sandbox::install`]
//! installs the units, D-Bus and polkit files through [`crate::install`] with the binaries
//! linked from there. Commands run inside with `nsenter` ([`Sandbox::exec`]).
//!
//! Invariants: every container lives in a cgroup of its own that holds nothing else, so
//! dropping the [`Sandbox`] ends every process of it (power-off, then `cgroup.kill`) and
//! nothing of it is left behind; a container whose test process died without dropping it is
//! killed by the next boot; every wait has a deadline. Needs root: tests call
//! [`Sandbox::available`] first and skip with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::deadline::{Deadline, poll_until};
use crate::install::{self, InstallPlan};
use crate::process::{self, ChildGuard, Output};

/// Time allowed from launch to a manager that reports `running` (or `degraded`).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for a clean power-off before the cgroup is killed.
pub const POWEROFF_TIMEOUT: Duration = Duration::from_secs(10);
/// systemd's power-off request to PID 1.
const SIGRTMIN_PLUS_4: &str = "RTMIN+4";

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A booted systemd manager in a container; powered off and removed on drop.
#[derive(Debug)]
pub struct Sandbox {
    name: String,
    dir: tempfile::TempDir,
    cgroup: PathBuf,
    launcher: Option<ChildGuard>,
    pid1: u32,
    bin_dir: PathBuf,
}

/// The host's cgroup2 mount (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified`
/// on a hybrid one).
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
}

/// Whether the cgroup folder `cg` or any below it holds a process.
fn populated(cg: &Path) -> bool {
    std::fs::read_to_string(cg.join("cgroup.events"))
        .map(|e| e.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Removes `cg` and its sub-cgroups, deepest first (they must be empty).
fn remove_cgroup(cg: &Path) {
    if let Ok(entries) = std::fs::read_dir(cg) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(cg);
}

/// The prefix of every container's name and cgroup; the creating test's pid follows.
const NAME_PREFIX: &str = "vmsnap-test-";

/// Ends and removes the containers of test processes that died without dropping them (a
/// test killed by a timeout): their cgroups carry the dead creator's pid in their name.
fn sweep_orphans(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(creator) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{creator}")).exists() {
            continue;
        }
        let cg = e.path();
        eprintln!("removing the container {name} of a test process that is gone");
        let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        let deadline = Deadline::after(POWEROFF_TIMEOUT);
        while populated(&cg) && !deadline.expired() {
            std::thread::sleep(Duration::from_millis(20));
        }
        remove_cgroup(&cg);
    }
}

impl Sandbox {
    /// Why a container cannot be booted here, if it cannot (not root, no systemd, no
    /// cgroup2); `None` when it can.
    pub fn unavailable() -> Option<String> {
        if !nix::unistd::geteuid().is_root() {
            return Some("needs root".into());
        }
        if !Path::new("/lib/systemd/systemd").is_file() {
            return Some("no /lib/systemd/systemd".into());
        }
        if cgroup2_root().is_none() {
            return Some("no cgroup2 mount".into());
        }
        None
    }

    /// Whether a container can be booted; prints why not (the caller then skips).
    pub fn available(test: &str) -> bool {
        match Self::unavailable() {
            None => true,
            Some(why) => {
                eprintln!("SKIPPED {test}: a systemd container {why}");
                false
            }
        }
    }

    /// Boots a container and waits until its manager is running.
    pub fn boot() -> Sandbox {
        let bin_dir = process::project_binary("vmsnapd", "VMSNAPD_BIN")
            .parent()
            .expect("binary in a folder")
            .to_path_buf();
        let init = bin_dir.join("vmsnap-sd-init");
        assert!(
            init.is_file(),
            "{} not found: run `cargo build --workspace` first",
            init.display()
        );
        let name = format!(
            "{NAME_PREFIX}{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let root = cgroup2_root().expect("cgroup2 mount");
        sweep_orphans(&root);
        let cgroup = root.join(&name);
        std::fs::create_dir(&cgroup)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", cgroup.display()));
        let dir = tempfile::Builder::new()
            .prefix("vmsnap-sd-")
            .tempdir()
            .expect("temporary folder");
        let console = std::fs::File::create(dir.path().join("console.log")).expect("log file");
        let mut sandbox = Sandbox {
            name,
            cgroup: cgroup.clone(),
            launcher: None,
            pid1: 0,
            bin_dir: bin_dir.clone(),
            dir,
        };
        let launcher = ChildGuard::spawn(
            "vmsnap-sd-init",
            Command::new(&init)
                .arg("launch")
                .arg(sandbox.dir.path())
                .arg(&cgroup)
                .arg(&bin_dir)
                .stdin(Stdio::null())
                .stdout(console.try_clone().expect("log fd"))
                .stderr(console),
        )
        .expect("cannot run vmsnap-sd-init");
        let launcher_pid = launcher.pid();
        sandbox.launcher = Some(launcher);
        let deadline = Deadline::after(BOOT_TIMEOUT);
        // systemd moves itself into init.scope of its cgroup root first thing.
        let procs = cgroup.join("init.scope/cgroup.procs");
        sandbox.pid1 = poll_until(deadline, "systemd as PID 1 of the container", || {
            if sandbox
                .launcher
                .as_mut()
                .and_then(ChildGuard::try_wait)
                .is_some()
            {
                panic!("the container ended during boot:\n{}", sandbox.console());
            }
            std::fs::read_to_string(&procs)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        });
        // The launcher (unshare) stays outside the container's pid namespace: put it back into
        // the test's cgroup so the container's cgroup holds only container processes.
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        if let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) {
            let back = cgroup2_root()
                .expect("cgroup2 mount")
                .join(path.trim_start_matches('/'))
                .join("cgroup.procs");
            let _ = std::fs::write(back, launcher_pid.to_string());
        }
        poll_until(
            deadline,
            "the container's manager to finish booting",
            || {
                let out = sandbox.exec(&["systemctl", "is-system-running"]);
                matches!(out.stdout.trim(), "running" | "degraded").then_some(())
            },
        );
        sandbox
    }

    /// The container's PID 1, as a host pid.
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// The container's name (also its cgroup's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `path` inside the container, as the host reaches it (through PID 1's root).
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1)).join(path.trim_start_matches('/'))
    }

    /// What the container printed on its console (the helper's errors, mostly).
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Runs `args` inside the container (every namespace of PID 1, a clean environment) and
    /// returns its output, whatever the exit status; bounded by [`crate::STEP_TIMEOUT`].
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_until(args, Deadline::step())
    }

    /// [`Sandbox::exec`] with a deadline of its own.
    pub fn exec_until(&self, args: &[&str], deadline: Deadline) -> Output {
        self.exec_as(None, args, deadline)
    }

    /// Runs `args` inside as user `uid` with group `gid` (root when `None`); the user's
    /// environment (`HOME`, `XDG_RUNTIME_DIR`, ...) is for the caller to put in `args` as
    /// `NAME=value` words before the command.
    pub fn exec_as(&self, user: Option<(u32, u32)>, args: &[&str], deadline: Deadline) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t").arg(self.pid1.to_string()).arg("-a");
        if let Some((uid, gid)) = user {
            cmd.arg(format!("--setuid={uid}"))
                .arg(format!("--setgid={gid}"));
        }
        process::run(
            cmd.arg("--")
                .args([
                    "env",
                    "-i",
                    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG=C.UTF-8",
                    "SYSTEMD_PAGER=",
                    "SYSTEMD_COLORS=0",
                ])
                .args(args),
            deadline,
        )
    }

    /// Runs `args` inside and panics with its output (and the journal's end) unless it
    /// succeeds.
    pub fn exec_ok(&self, args: &[&str]) -> Output {
        let out = self.exec(args);
        if !out.status.success() {
            panic!(
                "{args:?} failed in the container ({})\nstdout:\n{}\nstderr:\n{}\njournal:\n{}",
                out.status,
                out.stdout,
                out.stderr,
                self.journal_tail()
            );
        }
        out
    }

    /// The last lines of the container's journal.
    pub fn journal_tail(&self) -> String {
        self.exec(&[
            "journalctl",
            "--no-pager",
            "-n",
            "80",
            "-o",
            "short-monotonic",
        ])
        .stdout
    }

    /// A property of a unit, as `systemctl show -p NAME --value` prints it.
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.exec_ok(&["systemctl", "show", "-p", property, "--value", unit])
            .stdout
            .trim()
            .to_string()
    }

    /// Installs the project as `cargo xtask install --prefix /usr` does, with the binaries
    /// linked from the bound build output; then reloads the manager and the bus.
    pub fn install(&self) {
        let stage = self.dir.path().join("stage");
        let plan = InstallPlan {
            bin_dir: self.bin_dir.clone(),
            destdir: stage.clone(),
            prefix: PathBuf::from("/usr"),
        };
        let files = install::install(&plan).expect("install into the staging folder");
        for staged in files {
            let rel = staged.strip_prefix(&stage).expect("staged below the stage");
            let dest = self.path(&rel.to_string_lossy());
            std::fs::create_dir_all(dest.parent().expect("a folder")).expect("mkdir");
            // Binaries are copied too, not linked to the build output: the units' sandboxes
            // (PrivateTmp=, ProtectHome=) hide a checkout under /tmp or /home from the service.
            std::fs::copy(&staged, &dest).expect("copy installed file");
        }
        self.exec_ok(&["systemctl", "daemon-reload"]);
        self.exec_ok(&["systemctl", "start", "dbus.socket"]);
        // The bus reads its policy and activation files at start and on reload.
        let active = self.exec(&["systemctl", "is-active", "dbus.service"]);
        if active.stdout.trim() == "active" {
            self.exec_ok(&["systemctl", "reload", "dbus.service"]);
        } else {
            self.exec_ok(&["systemctl", "start", "dbus.service"]);
        }
    }

    /// Writes a drop-in `NAME.conf` for `unit` under `/etc/systemd/system/UNIT.d/` and
    /// reloads the manager.
    pub fn drop_in(&self, unit: &str, name: &str, text: &str) {
        let dir = self.path(&format!("/etc/systemd/system/{unit}.d"));
        std::fs::create_dir_all(&dir).expect("drop-in folder");
        std::fs::write(dir.join(format!("{name}.conf")), text).expect("write drop-in");
        self.exec_ok(&["systemctl", "daemon-reload"]);
    }

    /// Powers the manager off; kills the cgroup if that does not end every process in time.
    fn shut_down(&mut self) {
        if self.pid1 != 0 {
            // nix has no realtime signals; procps' kill does.
            let _ = Command::new("kill")
                .args(["-s", SIGRTMIN_PLUS_4, &self.pid1.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Deadline::after(POWEROFF_TIMEOUT);
        while populated(&self.cgroup) && !deadline.expired() {
            std::thread::sleep(Duration::from_millis(20));
        }
        if populated(&self.cgroup) {
            eprintln!("{}: power-off timed out; killing its cgroup", self.name);
            let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
            let deadline = Deadline::after(POWEROFF_TIMEOUT);
            while populated(&self.cgroup) && !deadline.expired() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut l) = self.launcher.take() {
            l.terminate(Duration::from_secs(2));
        }
        remove_cgroup(&self.cgroup);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} journal ---\n{}\n--- console ---\n{}",
                self.name,
                self.journal_tail(),
                self.console()
            );
        }
        self.shut_down();
    }
}
