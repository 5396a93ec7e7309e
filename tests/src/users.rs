//! Real unix users for authorization tests: one unprivileged, one in vmsnapd's admin group.
//!
//! [`test_users`] creates them (and the group) with `groupadd`/`useradd` if missing, so it
//! needs root; it is idempotent and harmless when they exist, and serialized across test
//! processes with a lock file (nextest runs tests in parallel processes, and `useradd` refuses
//! to run while another one holds `/etc/passwd`). The users have no home and no login shell.
//! [`TestUser::command`] runs a program as the user with `setpriv` (real and effective ids,
//! supplementary groups from the group database; no PAM, no session).

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};

/// vmsnapd's default admin group.
pub const ADMIN_GROUP: &str = "vmsnap";
/// A user with no rights in vmsnapd.
pub const UNPRIVILEGED_USER: &str = "vmsnap-t-nobody";
/// A member of [`ADMIN_GROUP`].
pub const MEMBER_USER: &str = "vmsnap-t-member";

const LOCK_FILE: &str = "/tmp/vmsnap-test-users.lock";

/// A unix user that exists on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestUser {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl TestUser {
    /// A command that runs `program` as this user (with its supplementary groups).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(program);
        cmd
    }
}

/// The unprivileged user and the admin-group member, created if missing.
pub fn test_users() -> (TestUser, TestUser) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "authorization tests create users and must run as root"
    );
    with_lock(|| {
        run_ok(Command::new("groupadd").args(["--force", "--system", ADMIN_GROUP]));
        let nobody = ensure_user(UNPRIVILEGED_USER, None);
        let member = ensure_user(MEMBER_USER, Some(ADMIN_GROUP));
        (nobody, member)
    })
}

/// Runs `f` holding the machine-wide lock of the tests' changes to system files.
pub fn with_lock<T>(f: impl FnOnce() -> T) -> T {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .unwrap_or_else(|e| panic!("cannot open {LOCK_FILE}: {e}"));
    let _guard = Flock::lock(lock, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("cannot lock {LOCK_FILE}: {e}"));
    f()
}

/// Creates user `name` (in `group`, if given) unless it exists; call under [`with_lock`].
pub fn ensure_user(name: &str, group: Option<&str>) -> TestUser {
    if lookup(name).is_none() {
        let mut cmd = Command::new("useradd");
        cmd.args(["--system", "--user-group", "--no-create-home"])
            .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]);
        if let Some(g) = group {
            cmd.args(["--groups", g]);
        }
        run_ok(cmd.arg(name));
    } else if let Some(g) = group {
        // An older run may have made the user before it joined the group.
        run_ok(Command::new("usermod").args(["--append", "--groups", g, name]));
    }
    lookup(name).unwrap_or_else(|| panic!("user {name} is missing after useradd"))
}

fn lookup(name: &str) -> Option<TestUser> {
    let user = nix::unistd::User::from_name(name).ok()??;
    Some(TestUser {
        name: name.to_owned(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

fn run_ok(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `path` and its ancestors traversable (`o+x`) so that the test users can reach files
/// under it (the bus socket, images); the test directories are private by default.
pub fn open_for_test_users(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for dir in path.ancestors() {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
                .unwrap_or_else(|e| panic!("cannot open {} to test users: {e}", dir.display()));
        }
    }
}
