//! A real `polkitd` on a private bus, with vmsnap's actions registered and a rule for a test
//! user, so that the daemon's polkit path is exercised end to end.
//!
//! [`Polkit::start`] installs, once per machine and idempotently, the actions vmsnapd asks
//! about (unless an installed file already declares them) and a rule that gives
//! [`POLKIT_USER`] `org.vmsnap.VmSnap1.create` and nothing else; both live where polkitd reads
//! them (`/usr/share/polkit-1/actions`, `/etc/polkit-1/rules.d`) and concern only that action
//! set and that user. polkitd then runs against the private bus (it drops to its own user) and
//! is killed and reaped on drop. The private bus includes polkit's own bus policy
//! ([`crate::bus`]), as the system bus does.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::deadline::{Deadline, poll_until_async};
use crate::process::ChildGuard;
use crate::users::TestUser;

/// The polkit daemon of Debian's `polkitd` package.
pub const POLKITD: &str = "/usr/lib/polkit-1/polkitd";
/// A user outside the admin group whom the test rule lets create snapshots.
pub const POLKIT_USER: &str = "vmsnap-t-polkit";

const ACTIONS_DIR: &str = "/usr/share/polkit-1/actions";
const TEST_ACTIONS: &str = "/usr/share/polkit-1/actions/org.vmsnap.VmSnap1.test.policy";
const TEST_RULE: &str = "/etc/polkit-1/rules.d/49-vmsnap-test.rules";

/// The actions vmsnapd asks polkit about; everything defaults to "no" so that only the rule
/// grants anything.
fn actions_file() -> String {
    let mut out = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE policyconfig PUBLIC \
         \"-//freedesktop//DTD PolicyKit Policy Configuration 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/PolicyKit/1/policyconfig.dtd\">\n\
         <policyconfig>\n",
    );
    for verb in ["create", "revert", "delete", "prune", "manage", "cancel"] {
        out.push_str(&format!(
            "  <action id=\"org.vmsnap.VmSnap1.{verb}\">\n    <description>vmsnap test: \
             {verb}</description>\n    <message>vmsnap test: {verb}</message>\n    \
             <defaults><allow_any>no</allow_any><allow_inactive>no</allow_inactive>\
             <allow_active>no</allow_active></defaults>\n  </action>\n"
        ));
    }
    out.push_str("</policyconfig>\n");
    out
}

fn rule_file() -> String {
    format!(
        "// Installed by the vmsnap tests: {POLKIT_USER} may create vmsnap snapshots.\n\
         polkit.addRule(function(action, subject) {{\n    \
         if (action.id == \"org.vmsnap.VmSnap1.create\" && subject.user == \"{POLKIT_USER}\") {{\n        \
         return polkit.Result.YES;\n    }}\n}});\n"
    )
}

/// Whether a file in polkit's actions directory other than the test's declares vmsnap's
/// actions (the packaged file, once installed).
fn actions_installed_elsewhere() -> bool {
    std::fs::read_dir(ACTIONS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path() != Path::new(TEST_ACTIONS))
        .any(|e| {
            std::fs::read_to_string(e.path())
                .is_ok_and(|t| t.contains("\"org.vmsnap.VmSnap1.create\""))
        })
}

fn write_if_different(path: &str, content: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(content) {
        std::fs::write(path, content).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
    }
}

/// A running polkitd on a private bus.
#[derive(Debug)]
pub struct Polkit {
    _child: ChildGuard,
}

impl Polkit {
    /// Whether polkitd is installed here.
    pub fn available() -> bool {
        Path::new(POLKITD).is_file()
    }

    /// Installs the test actions and rule, creates [`POLKIT_USER`], starts polkitd on the bus
    /// at `bus_address` and waits until it owns its name. Returns the polkit user too.
    pub async fn start(bus_address: &str) -> (Self, TestUser) {
        let user = crate::users::with_lock(|| {
            if !actions_installed_elsewhere() {
                write_if_different(TEST_ACTIONS, &actions_file());
            }
            std::fs::create_dir_all(Path::new(TEST_RULE).parent().unwrap())
                .expect("cannot create polkit's rules directory");
            write_if_different(TEST_RULE, &rule_file());
            crate::users::ensure_user(POLKIT_USER, None)
        });
        let mut cmd = Command::new(POLKITD);
        cmd.arg("--no-debug")
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = ChildGuard::spawn("polkitd", &mut cmd)
            .unwrap_or_else(|e| panic!("cannot start {POLKITD}: {e}"));
        let conn = crate::bus::connect(bus_address)
            .await
            .expect("cannot connect to the private bus");
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
        poll_until_async(Deadline::step(), "polkitd to own its bus name", || async {
            let name = zbus::names::BusName::try_from("org.freedesktop.PolicyKit1").unwrap();
            dbus.name_has_owner(name)
                .await
                .unwrap_or(false)
                .then_some(())
        })
        .await;
        (Self { _child: child }, user)
    }
}
