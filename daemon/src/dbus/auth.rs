//! Who may call what: the caller's identity as the bus reports it, and the one decision every
//! mutating method asks for before it looks at its arguments.
//!
//! Policy:
//! - Reading (properties, lists, XML, introspection) is open to every caller the bus policy
//!   lets through. Every method that changes something starts with
//!   `auth::authorize(&header, Action::X).await?`; [`METHOD_ACTIONS`] is the one list of those
//!   methods and their actions.
//! - The caller is the unix user the bus daemon reports for the message's sender
//!   (`org.freedesktop.DBus.GetConnectionUnixUser`). Nothing the caller sends counts.
//! - Allowed are: uid 0 and the daemon's own user (a session daemon's owner); members of the admin group (`--admin-group`, default `vmsnap`),
//!   primary or supplementary, as the system's group database says; and callers polkit
//!   authorizes for the action's id (`org.vmsnap.VmSnap1.create` ...), when polkit is on the bus.
//!   The group does not suffice for [`ROOT_EQUIVALENT`] methods (a monitor command or a foreign
//!   QMP socket can reach anything root can).
//!   polkit may interact with the user only when the caller set the message flag
//!   `ALLOW_INTERACTIVE_AUTHORIZATION`; scripts that do not get an immediate answer.
//! - A job may be cancelled by the user who started it, by root, or by a caller polkit
//!   authorizes for `org.vmsnap.VmSnap1.cancel`; members of the admin group may cancel only
//!   their own jobs.
//! - Fail closed: a caller whose uid cannot be found, a group database that cannot be read, a
//!   polkit that fails or is absent all mean "not authorized". Refusals are
//!   `Error.NotAuthorized` naming the action.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nix::unistd::{Group, Uid, User, getgrouplist};
use tracing::{debug, warn};
use vmsnap_dbus::Error;
use vmsnap_dbus::names::{DOMAIN_INTERFACE, JOB_INTERFACE, MANAGER_INTERFACE, SNAPSHOT_INTERFACE};
use zbus::message::{Flags, Header};
use zbus::names::BusName;

use crate::config::Config;
use crate::job::Job;

/// How long polkit may take to answer a call that cannot involve the user.
pub const POLKIT_TIMEOUT: Duration = Duration::from_secs(25);
/// How long polkit may take when it may ask the user (typing a password takes a while).
pub const POLKIT_INTERACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

const POLKIT_BUS_NAME: &str = "org.freedesktop.PolicyKit1";
const POLKIT_PATH: &str = "/org/freedesktop/PolicyKit1/Authority";
const POLKIT_INTERFACE: &str = "org.freedesktop.PolicyKit1.Authority";
/// `CheckAuthorization` flag: polkit may ask the user.
const POLKIT_ALLOW_USER_INTERACTION: u32 = 1;
const PROPERTIES_INTERFACE: &str = "org.freedesktop.DBus.Properties";

/// What a mutating method does, as polkit knows it: one action per verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Take a snapshot (or import one).
    Create,
    /// Revert a domain to a snapshot.
    Revert,
    /// Delete snapshots.
    Delete,
    /// Delete snapshots by a retention policy.
    Prune,
    /// Define, undefine, attach, start, stop, change disks and settings, talk to the monitor.
    Manage,
    /// Cancel somebody else's job.
    Cancel,
}

impl Action {
    /// Every action, in the order the polkit actions file lists them.
    pub const ALL: [Action; 6] = [
        Action::Create,
        Action::Revert,
        Action::Delete,
        Action::Prune,
        Action::Manage,
        Action::Cancel,
    ];

    /// The polkit action id, e.g. `org.vmsnap.VmSnap1.create`.
    pub fn polkit_id(self) -> &'static str {
        match self {
            Action::Create => "org.vmsnap.VmSnap1.create",
            Action::Revert => "org.vmsnap.VmSnap1.revert",
            Action::Delete => "org.vmsnap.VmSnap1.delete",
            Action::Prune => "org.vmsnap.VmSnap1.prune",
            Action::Manage => "org.vmsnap.VmSnap1.manage",
            Action::Cancel => "org.vmsnap.VmSnap1.cancel",
        }
    }

    /// The verb, for messages.
    pub fn verb(self) -> &'static str {
        match self {
            Action::Create => "create snapshots",
            Action::Revert => "revert domains",
            Action::Delete => "delete snapshots",
            Action::Prune => "prune snapshots",
            Action::Manage => "manage domains",
            Action::Cancel => "cancel other users' jobs",
        }
    }
}

/// Every mutating method (interface, member) and its action. Methods not listed here are
/// read-only and take no `authorize` call. Some entries name methods other parts of the daemon
/// add; listing them early costs nothing and keeps this the one table.
pub const METHOD_ACTIONS: &[(&str, &str, Action)] = &[
    (MANAGER_INTERFACE, "DefineDomain", Action::Manage),
    (MANAGER_INTERFACE, "UndefineDomain", Action::Manage),
    (MANAGER_INTERFACE, "AttachDomain", Action::Manage),
    (DOMAIN_INTERFACE, "Start", Action::Manage),
    (DOMAIN_INTERFACE, "Shutdown", Action::Manage),
    (DOMAIN_INTERFACE, "Destroy", Action::Manage),
    (DOMAIN_INTERFACE, "Pause", Action::Manage),
    (DOMAIN_INTERFACE, "Resume", Action::Manage),
    (DOMAIN_INTERFACE, "AttachDisk", Action::Manage),
    (DOMAIN_INTERFACE, "DetachDisk", Action::Manage),
    (DOMAIN_INTERFACE, "MonitorCommand", Action::Manage),
    (DOMAIN_INTERFACE, "SetSchedule", Action::Manage),
    (DOMAIN_INTERFACE, "CreateSnapshot", Action::Create),
    (DOMAIN_INTERFACE, "CreateSnapshotXml", Action::Create),
    (DOMAIN_INTERFACE, "RedefineSnapshot", Action::Create),
    (DOMAIN_INTERFACE, "Prune", Action::Prune),
    (SNAPSHOT_INTERFACE, "Revert", Action::Revert),
    (SNAPSHOT_INTERFACE, "Delete", Action::Delete),
    (JOB_INTERFACE, "Cancel", Action::Cancel),
    // Writable properties (e.g. a snapshot's `Protected`) arrive as `Properties.Set`.
    (PROPERTIES_INTERFACE, "Set", Action::Manage),
];

/// Methods that amount to root's power whatever their arguments, so that membership of the
/// admin group is not enough for them (root or polkit only): `MonitorCommand` passes anything to
/// QEMU (which can open any file), `AttachDomain` makes the daemon talk to any socket.
pub const ROOT_EQUIVALENT: &[(&str, &str)] = &[
    (DOMAIN_INTERFACE, "MonitorCommand"),
    (MANAGER_INTERFACE, "AttachDomain"),
];

/// The action of a method, if it mutates.
pub fn action_of(interface: &str, member: &str) -> Option<Action> {
    METHOD_ACTIONS
        .iter()
        .find(|(i, m, _)| *i == interface && *m == member)
        .map(|(_, _, a)| *a)
}

/// Why a caller was let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// uid 0, or the user the daemon runs as.
    Root,
    /// A member of the admin group.
    Group,
    /// polkit said yes for the action.
    Polkit,
    /// The caller started the job it cancels.
    Owner,
}

/// An authorized caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The caller's unix user id, as the bus reported it.
    pub uid: u32,
    /// Why it was let in.
    pub grant: Grant,
}

/// What the daemon consults: the bus (for uids and polkit) and the configuration.
#[derive(Debug)]
struct Authorizer {
    conn: zbus::Connection,
    admin_group: String,
    polkit: bool,
}

/// The authorizer of the daemon in this process. A process serves one bus connection at a
/// time; `install` replaces the previous one (tests that run daemons in-process one after the
/// other).
static AUTHORIZER: RwLock<Option<Arc<Authorizer>>> = RwLock::new(None);

/// Makes `authorize` consult `conn` and `config` from now on.
pub fn install(conn: &zbus::Connection, config: &Config) {
    let a = Authorizer {
        conn: conn.clone(),
        admin_group: config.admin_group.clone(),
        polkit: config.polkit,
    };
    *AUTHORIZER.write().expect("authorizer lock poisoned") = Some(Arc::new(a));
}

fn current() -> Result<Arc<Authorizer>, Error> {
    AUTHORIZER
        .read()
        .expect("authorizer lock poisoned")
        .clone()
        .ok_or_else(|| Error::Failed("authorization is not set up".into()))
}

fn refused(action: Action, uid: u32) -> Error {
    Error::NotAuthorized(format!(
        "uid {uid} may not {} ({}): it needs root, the admin group or a polkit authorization",
        action.verb(),
        action.polkit_id()
    ))
}

/// Whether `uid` may do anything: root, or the user the daemon runs as (the desktop user who
/// owns a `vmsnapd --session` and its session bus; on the system bus that is root again).
fn privileged(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Lets the method call `header` through for `action`, or refuses it with
/// `Error.NotAuthorized`. Call it first thing in every mutating method.
pub async fn authorize(header: &Header<'_>, action: Action) -> Result<Caller, Error> {
    let action = check_table(header, action);
    let auth = current()?;
    let sender = sender(header)?;
    let uid = auth.uid_of(&sender).await?;
    if privileged(uid) {
        return Ok(Caller {
            uid,
            grant: Grant::Root,
        });
    }
    if !root_equivalent(header) && auth.in_admin_group(uid).await {
        return Ok(Caller {
            uid,
            grant: Grant::Group,
        });
    }
    if auth
        .polkit_allows(&sender, action, interactive(header))
        .await
    {
        return Ok(Caller {
            uid,
            grant: Grant::Polkit,
        });
    }
    debug!(uid, action = action.polkit_id(), "refused");
    Err(refused(action, uid))
}

/// Lets the caller cancel `job` if it started it, is root, or polkit authorizes it for
/// [`Action::Cancel`]; refuses with `Error.NotAuthorized` otherwise.
pub async fn authorize_cancel(header: &Header<'_>, job: &Job) -> Result<Caller, Error> {
    let _ = check_table(header, Action::Cancel);
    let auth = current()?;
    let sender = sender(header)?;
    let uid = auth.uid_of(&sender).await?;
    if privileged(uid) {
        return Ok(Caller {
            uid,
            grant: Grant::Root,
        });
    }
    if job.owner_uid() == Some(uid) {
        return Ok(Caller {
            uid,
            grant: Grant::Owner,
        });
    }
    if auth
        .polkit_allows(&sender, Action::Cancel, interactive(header))
        .await
    {
        return Ok(Caller {
            uid,
            grant: Grant::Polkit,
        });
    }
    Err(Error::NotAuthorized(format!(
        "uid {uid} may not cancel job {}: another user started it, and cancelling other users' \
         jobs needs root or a polkit authorization ({})",
        job.id(),
        Action::Cancel.polkit_id()
    )))
}

/// Records on `job` the unix user who called `header`'s method, so that this user may cancel
/// it later from another connection. A caller whose uid cannot be found leaves the job without
/// an owner: only privileged callers can cancel it then.
pub async fn record_owner(job: &Job, header: &Header<'_>) {
    let (Ok(auth), Ok(sender)) = (current(), sender(header)) else {
        return;
    };
    if let Ok(uid) = auth.uid_of(&sender).await {
        job.set_owner_uid(uid);
    }
}

/// The action that applies to the call: [`METHOD_ACTIONS`] is authoritative, so a guard wired
/// with another action cannot apply a weaker policy; the mismatch (or a method missing from the
/// table) is logged so that it gets fixed.
fn check_table(header: &Header<'_>, action: Action) -> Action {
    let interface = header.interface().map(|i| i.as_str()).unwrap_or_default();
    let member = header.member().map(|m| m.as_str()).unwrap_or_default();
    match action_of(interface, member) {
        Some(listed) if listed == action => action,
        listed => {
            tracing::error!(
                interface,
                member,
                guard = action.polkit_id(),
                listed = listed.map(Action::polkit_id),
                "a mutating method and METHOD_ACTIONS disagree"
            );
            listed.unwrap_or(action)
        }
    }
}

fn root_equivalent(header: &Header<'_>) -> bool {
    let interface = header.interface().map(|i| i.as_str()).unwrap_or_default();
    let member = header.member().map(|m| m.as_str()).unwrap_or_default();
    ROOT_EQUIVALENT.contains(&(interface, member))
}

fn sender(header: &Header<'_>) -> Result<String, Error> {
    header
        .sender()
        .map(|s| s.to_string())
        .ok_or_else(|| Error::NotAuthorized("the call has no sender to authorize".into()))
}

fn interactive(header: &Header<'_>) -> bool {
    header
        .primary()
        .flags()
        .contains(Flags::ALLOW_INTERACTIVE_AUTH)
}

impl Authorizer {
    /// The caller's uid from the bus daemon.
    async fn uid_of(&self, sender: &str) -> Result<u32, Error> {
        let name = BusName::try_from(sender)
            .map_err(|e| Error::NotAuthorized(format!("bad sender {sender:?}: {e}")))?;
        let dbus = zbus::fdo::DBusProxy::builder(&self.conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| Error::Failed(format!("cannot ask the bus who is calling: {e}")))?;
        dbus.get_connection_unix_user(name).await.map_err(|e| {
            // The caller left before we could look: nobody to authorize.
            Error::NotAuthorized(format!("cannot find the caller's user: {e}"))
        })
    }

    /// Whether `uid` belongs to the admin group (primary or supplementary group).
    async fn in_admin_group(&self, uid: u32) -> bool {
        let group = self.admin_group.clone();
        // NSS lookups block (they may ask a directory service).
        tokio::task::spawn_blocking(move || user_in_group(uid, &group))
            .await
            .unwrap_or(false)
    }

    /// Whether polkit authorizes `sender` for `action`; false when polkit is off, absent or
    /// failing.
    async fn polkit_allows(&self, sender: &str, action: Action, interactive: bool) -> bool {
        if !self.polkit {
            return false;
        }
        let subject: (&str, HashMap<&str, zbus::Variant<'_>>) = (
            "system-bus-name",
            HashMap::from([("name", zbus::Variant::from(sender))]),
        );
        let details: HashMap<&str, &str> = HashMap::new();
        let (flags, timeout) = if interactive {
            (POLKIT_ALLOW_USER_INTERACTION, POLKIT_INTERACTIVE_TIMEOUT)
        } else {
            (0, POLKIT_TIMEOUT)
        };
        let body = (subject, action.polkit_id(), details, flags, "");
        let call = self.conn.call_method(
            Some(POLKIT_BUS_NAME),
            POLKIT_PATH,
            Some(POLKIT_INTERFACE),
            "CheckAuthorization",
            &body,
        );
        let reply = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(zbus::Error::MethodError(name, _, _)))
                if matches!(
                    name.as_str(),
                    "org.freedesktop.DBus.Error.ServiceUnknown"
                        | "org.freedesktop.DBus.Error.NameHasNoOwner"
                ) =>
            {
                debug!("polkit is not on the bus");
                return false;
            }
            Ok(Err(e)) => {
                warn!(error = %e, action = action.polkit_id(), "polkit failed; refusing");
                return false;
            }
            Err(_) => {
                warn!(
                    action = action.polkit_id(),
                    "polkit did not answer in time; refusing"
                );
                return false;
            }
        };
        match reply
            .body()
            .deserialize::<(bool, bool, HashMap<String, String>)>()
        {
            Ok((authorized, _challenge, _details)) => authorized,
            Err(e) => {
                warn!(error = %e, "polkit's answer does not parse; refusing");
                false
            }
        }
    }
}

/// Whether user `uid` is in group `group`, by the system's user and group databases.
pub fn user_in_group(uid: u32, group: &str) -> bool {
    let Ok(Some(g)) = Group::from_name(group) else {
        return false;
    };
    let Ok(Some(u)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    if u.gid == g.gid {
        return true;
    }
    let Ok(name) = CString::new(u.name) else {
        return false;
    };
    getgrouplist(&name, u.gid).is_ok_and(|gids| gids.contains(&g.gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_every_action_has_a_distinct_polkit_id_under_the_bus_name() {
        let ids: std::collections::BTreeSet<&str> =
            Action::ALL.iter().map(|a| a.polkit_id()).collect();
        assert_eq!(ids.len(), Action::ALL.len());
        assert!(ids.iter().all(|i| i.starts_with("org.vmsnap.VmSnap1.")));
    }

    #[test]
    fn auth_method_table_has_no_duplicates_and_maps_the_verbs() {
        let mut seen = std::collections::BTreeSet::new();
        for (i, m, _) in METHOD_ACTIONS {
            assert!(seen.insert((*i, *m)), "{i}.{m} is listed twice");
        }
        assert_eq!(
            action_of(SNAPSHOT_INTERFACE, "Revert"),
            Some(Action::Revert)
        );
        assert_eq!(action_of(SNAPSHOT_INTERFACE, "GetXml"), None);
        assert_eq!(action_of(MANAGER_INTERFACE, "ListDomains"), None);
    }

    #[test]
    fn auth_root_equivalent_methods_are_mutating() {
        for (i, m) in ROOT_EQUIVALENT {
            assert_eq!(action_of(i, m), Some(Action::Manage), "{i}.{m}");
        }
    }

    #[test]
    fn auth_root_is_in_its_primary_group_and_not_in_a_missing_one() {
        assert!(user_in_group(0, "root"));
        assert!(!user_in_group(0, "no-such-group-vmsnap-test"));
        assert!(!user_in_group(u32::MAX - 7, "root"));
    }
}
