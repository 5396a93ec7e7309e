//! How a managed guest's QEMU process is started: in a transient systemd unit of its own when
//! the daemon runs under systemd, else as a child in its own process group.
//!
//! Under systemd, the daemon's unit is sandboxed (no network, no devices, no writable
//! executable memory) and everything in its cgroup is killed when it stops. A QEMU forked by
//! the daemon would inherit both, so it is instead started by systemd itself, through
//! `org.freedesktop.systemd1.Manager.StartTransientUnit`, as `vmsnap-guest-ID.service` in
//! `machine.slice`, with a sandbox of its own that leaves it what a guest needs (`/dev/kvm`,
//! `/dev/net/tun`, the network, TCG's executable memory). Such a QEMU is not the daemon's
//! child: the actor follows it like a re-attached guest (QMP socket and pid file), and a
//! restarted daemon finds it the same way.
//!
//! Invariants: a guest unit is collected as soon as QEMU exits, even after a failure, so its
//! name is free for the next start; a unit whose QEMU did not come up is stopped before the
//! start is reported as failed; without systemd nothing here touches the system bus.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, info, warn};
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

pub use crate::config::GuestUnits;

/// systemd's bus name, object and manager interface.
const SYSTEMD_BUS_NAME: &str = "org.freedesktop.systemd1";
const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER_IFACE: &str = "org.freedesktop.systemd1.Manager";
const UNIT_IFACE: &str = "org.freedesktop.systemd1.Unit";
/// The slice guests run in, as for other virtual machines (libvirt, machined).
pub const GUEST_SLICE: &str = "machine.slice";
/// How often a starting guest's unit is looked at, to notice a QEMU that exited early.
const UNIT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Linux capability numbers a guest's QEMU may keep (it runs as root).
const GUEST_CAPABILITIES: [u32; 6] = [
    1,  // CAP_DAC_OVERRIDE: images owned by other users
    2,  // CAP_DAC_READ_SEARCH: ditto, for reading
    3,  // CAP_FOWNER: permission changes on its own image files
    12, // CAP_NET_ADMIN: tap devices
    14, // CAP_IPC_LOCK: locked guest memory
    24, // CAP_SYS_RESOURCE: memory lock limits
];

/// Why a guest could not be started in a unit.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The system bus or systemd refused.
    #[error("systemd: {0}")]
    Systemd(#[from] zbus::Error),
    /// The QEMU binary was not found.
    #[error("cannot find {0} in PATH")]
    NoBinary(PathBuf),
}

/// A connection to the systemd manager that starts guest units.
#[derive(Debug, Clone)]
pub struct Manager {
    /// The bus the manager is on: the system bus, or the session bus for a user manager.
    pub conn: Connection,
    /// Whether it is a user's manager (`systemd --user`), which gets no system sandbox
    /// properties: it could not apply them without user namespaces, and QEMU already runs
    /// with the user's rights only.
    pub user: bool,
}

/// Starts guests' QEMU processes.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// As children of the daemon, each in its own process group.
    Direct,
    /// In transient units of the systemd manager the daemon runs under.
    Systemd(Manager),
}

/// Whether this process is the main process of a systemd service on a system booted with
/// systemd: `/run/systemd/system` exists (what `sd_booted()` checks) and the manager executed
/// this very process (`SYSTEMD_EXEC_PID`, with the `INVOCATION_ID` of the unit). Children of a
/// service, such as a daemon started by a test runner that itself runs as a service, inherit
/// the variables but not the pid, and keep starting guests as children.
fn runs_as_systemd_service() -> bool {
    let exec_pid = std::env::var("SYSTEMD_EXEC_PID").ok();
    Path::new("/run/systemd/system").is_dir()
        && std::env::var_os("INVOCATION_ID").is_some()
        && exec_pid.and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id())
}

impl Launcher {
    /// Chooses the launcher for `mode`: for `Auto`, systemd when the daemon runs as a systemd
    /// service and the manager answers: the system manager on the system bus, or with `user`
    /// the user's manager on the session bus.
    pub async fn detect(mode: GuestUnits, user: bool) -> Result<Launcher, LaunchError> {
        let wanted = match mode {
            GuestUnits::None => false,
            GuestUnits::Systemd => true,
            GuestUnits::Auto => runs_as_systemd_service(),
        };
        if !wanted {
            return Ok(Launcher::Direct);
        }
        let attempt = async {
            let conn = if user {
                Connection::session().await?
            } else {
                Connection::system().await?
            };
            let version = get_property(&conn, SYSTEMD_PATH, MANAGER_IFACE, "Version").await?;
            Ok::<_, zbus::Error>((conn, version))
        };
        match attempt.await {
            Ok((conn, version)) => {
                info!(systemd = %version, user, "guests run in transient systemd units");
                Ok(Launcher::Systemd(Manager { conn, user }))
            }
            Err(e) if mode == GuestUnits::Auto => {
                warn!(error = %e, "systemd does not answer; guests run as children");
                Ok(Launcher::Direct)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether guests run in transient units.
    pub fn uses_units(&self) -> bool {
        matches!(self, Launcher::Systemd(_))
    }
}

/// The transient unit name of the guest of domain `id`.
pub fn unit_name(id: i64) -> String {
    format!("vmsnap-guest-{id}.service")
}

/// `binary` as an absolute path: systemd runs `ExecStart=` without a search path of ours.
pub fn resolve_binary(binary: &Path) -> Result<PathBuf, LaunchError> {
    if binary.is_absolute() {
        return Ok(binary.to_path_buf());
    }
    if binary.components().count() > 1 {
        return std::path::absolute(binary).map_err(|_| LaunchError::NoBinary(binary.into()));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
        .ok_or_else(|| LaunchError::NoBinary(binary.into()))
}

async fn get_property(
    conn: &Connection,
    path: &str,
    iface: &str,
    name: &str,
) -> zbus::Result<String> {
    let reply = conn
        .call_method(
            Some(SYSTEMD_BUS_NAME),
            path,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(iface, name),
        )
        .await?;
    let value: OwnedVariant = reply.body().deserialize()?;
    String::try_from(&*value).map_err(|e| zbus::Error::Failure(e.to_string()))
}

/// What a guest unit runs.
pub struct GuestUnit<'a> {
    /// The unit name ([`unit_name`]).
    pub name: &'a str,
    /// The domain's name, for the description.
    pub domain: &'a str,
    /// The absolute QEMU binary.
    pub binary: &'a Path,
    /// QEMU's arguments (without argv\[0\]).
    pub args: &'a [std::ffi::OsString],
    /// Where QEMU's stdout and stderr go.
    pub log: OwnedFd,
}

/// Starts `unit` through systemd; returns once systemd has queued the start job.
pub async fn start_unit(manager: &Manager, unit: GuestUnit<'_>) -> Result<(), LaunchError> {
    let binary = unit.binary.to_string_lossy().into_owned();
    let mut argv = vec![binary.clone()];
    argv.extend(unit.args.iter().map(|a| a.to_string_lossy().into_owned()));
    let exec: Vec<(String, Vec<String>, bool)> = vec![(binary, argv, false)];
    let caps = GUEST_CAPABILITIES.iter().fold(0u64, |m, c| m | (1u64 << c));
    let log_err = unit
        .log
        .try_clone()
        .map_err(|e| zbus::Error::Failure(format!("cannot duplicate the log fd: {e}")))?;
    let mut props: Vec<(&str, Variant<'_>)> = vec![
        (
            "Description",
            Variant::from(format!("vmsnap guest {}", unit.domain)),
        ),
        // exec: the start job fails at once if QEMU cannot be executed.
        ("Type", Variant::from("exec")),
        ("ExecStart", Variant::from(exec)),
        // Forget the unit when QEMU exits, also after a failure, so the name is free again.
        ("CollectMode", Variant::from("inactive-or-failed")),
        ("StandardInput", Variant::from("null")),
        (
            "StandardOutputFileDescriptor",
            Variant::from(zbus::Fd::from(unit.log)),
        ),
        (
            "StandardErrorFileDescriptor",
            Variant::from(zbus::Fd::from(log_err)),
        ),
    ];
    if !manager.user {
        props.extend(system_sandbox(caps));
    }
    let aux: Vec<(&str, Vec<(&str, Variant<'_>)>)> = Vec::new();
    let reply = manager
        .conn
        .call_method(
            Some(SYSTEMD_BUS_NAME),
            SYSTEMD_PATH,
            Some(MANAGER_IFACE),
            "StartTransientUnit",
            &(unit.name, "fail", props, aux),
        )
        .await?;
    let job: OwnedObjectPath = reply.body().deserialize()?;
    debug!(unit = unit.name, job = %job.as_str(), "guest unit start queued");
    Ok(())
}

/// The properties of a guest unit of the system manager beyond what it runs: its slice and
/// its sandbox, which leaves QEMU devices, the network and executable memory (TCG) and takes
/// what no guest needs.
fn system_sandbox(caps: u64) -> Vec<(&'static str, Variant<'static>)> {
    vec![
        ("Slice", Variant::from(GUEST_SLICE)),
        ("NoNewPrivileges", Variant::from(true)),
        ("CapabilityBoundingSet", Variant::from(caps)),
        ("ProtectSystem", Variant::from("full")),
        ("ProtectKernelTunables", Variant::from(true)),
        ("ProtectKernelModules", Variant::from(true)),
        ("ProtectKernelLogs", Variant::from(true)),
        ("ProtectControlGroups", Variant::from(true)),
        ("ProtectHostname", Variant::from(true)),
        ("RestrictRealtime", Variant::from(true)),
        ("RestrictSUIDSGID", Variant::from(true)),
        ("LockPersonality", Variant::from(true)),
        ("SystemCallArchitectures", Variant::from(vec!["native"])),
    ]
}

/// The `ActiveState` of `unit` (`active`, `activating`, `failed`, ...), or `None` when systemd
/// does not know it (not loaded yet, or collected after it ended).
async fn unit_state(conn: &Connection, unit: &str) -> Option<String> {
    let reply = conn
        .call_method(
            Some(SYSTEMD_BUS_NAME),
            SYSTEMD_PATH,
            Some(MANAGER_IFACE),
            "GetUnit",
            &(unit,),
        )
        .await
        .ok()?;
    let path = reply.body().deserialize::<OwnedObjectPath>().ok()?;
    get_property(conn, path.as_str(), UNIT_IFACE, "ActiveState")
        .await
        .ok()
}

/// Whether `unit` is loaded and neither inactive nor failed.
pub async fn unit_alive(conn: &Connection, unit: &str) -> bool {
    unit_state(conn, unit)
        .await
        .is_some_and(|s| !matches!(s.as_str(), "inactive" | "failed"))
}

/// Returns once a `unit` that was just started has ended: its QEMU exited during start.
/// `StartTransientUnit` returns when the start job is queued, so a unit that systemd has not
/// loaded or started yet does not count as ended; one that failed does.
pub async fn unit_ended_after_start(conn: &Connection, unit: &str) {
    let mut seen_running = false;
    loop {
        match unit_state(conn, unit).await.as_deref() {
            Some("failed") => return,
            Some("inactive") | None if seen_running => return,
            Some("inactive") | None => {}
            Some(_) => seen_running = true,
        }
        tokio::time::sleep(UNIT_POLL_INTERVAL).await;
    }
}

/// Returns once `unit` is gone or inactive: its QEMU exited.
pub async fn unit_gone(conn: &Connection, unit: &str) {
    while unit_alive(conn, unit).await {
        tokio::time::sleep(UNIT_POLL_INTERVAL).await;
    }
}

/// Stops `unit` (QEMU gets SIGTERM, then SIGKILL), without waiting; errors are logged.
pub async fn stop_unit(conn: &Connection, unit: &str) {
    if let Err(e) = conn
        .call_method(
            Some(SYSTEMD_BUS_NAME),
            SYSTEMD_PATH,
            Some(MANAGER_IFACE),
            "StopUnit",
            &(unit, "replace"),
        )
        .await
    {
        debug!(unit, error = %e, "could not stop the guest unit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_units_parse_from_flag_values() {
        assert_eq!("auto".parse::<GuestUnits>(), Ok(GuestUnits::Auto));
        assert_eq!("systemd".parse::<GuestUnits>(), Ok(GuestUnits::Systemd));
        assert_eq!("none".parse::<GuestUnits>(), Ok(GuestUnits::None));
        assert!("yes".parse::<GuestUnits>().is_err());
    }

    #[test]
    fn resolve_binary_searches_path_for_bare_names() {
        assert_eq!(
            resolve_binary(Path::new("/x/qemu")).unwrap(),
            PathBuf::from("/x/qemu")
        );
        let sh = resolve_binary(Path::new("sh")).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert!(resolve_binary(Path::new("no-such-binary-vmsnap")).is_err());
    }
}
