//! Daemon configuration: where state and runtime files live and which bus to serve on.
//!
//! The defaults are the system paths a packaged daemon uses; every one can be overridden from
//! the command line so that tests and the demo run on private directories and a private bus.

use std::path::PathBuf;

/// Default state directory (the catalog lives here).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmsnap";
/// Default runtime directory (QMP sockets, pid files, QEMU logs).
pub const DEFAULT_RUNTIME_DIR: &str = "/run/vmsnap";
/// Default group whose members may change domains and snapshots (besides root and polkit).
pub const DEFAULT_ADMIN_GROUP: &str = "vmsnap";
/// The storage directory every daemon has, relative to the state directory: disk images,
/// overlays and memory files may always live under `STATE_DIR/images`.
pub const STATE_IMAGES_SUBDIR: &str = "images";

/// Which message bus the daemon serves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusChoice {
    /// The system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).
    System,
    /// The session bus of the calling user.
    Session,
    /// A bus given by address, e.g. a private test bus.
    Address(String),
}

/// Everything the daemon needs to know to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Persistent state: the catalog.
    pub state_dir: PathBuf,
    /// Volatile state: one directory per running guest.
    pub runtime_dir: PathBuf,
    /// The bus to own `org.vmsnap.VmSnap1` on.
    pub bus: BusChoice,
    /// The `qemu-system-x86_64` binary to launch managed guests with.
    pub qemu_binary: PathBuf,
    /// Directories (besides `STATE_DIR/images`) that may hold the files the daemon opens or
    /// creates for callers: disk images, overlays, memory files (see `storage`).
    pub storage_dirs: Vec<PathBuf>,
    /// Members of this group may call mutating methods (see `dbus::auth`).
    pub admin_group: String,
    /// Whether to ask polkit (when it is on the bus) about callers that are neither root nor
    /// members of `admin_group`.
    pub polkit: bool,
    /// Whether guests run in transient systemd units (see `domain::launch`).
    pub guest_units: GuestUnits,
}

/// Whether guests run in transient units or as children of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestUnits {
    /// Use systemd when the daemon itself runs as a systemd service and the manager answers.
    Auto,
    /// Always use systemd; fail to start if it is not reachable.
    Systemd,
    /// Never use systemd: QEMU is a child in its own process group.
    None,
}

impl std::str::FromStr for GuestUnits {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(GuestUnits::Auto),
            "systemd" => Ok(GuestUnits::Systemd),
            "none" => Ok(GuestUnits::None),
            other => Err(format!("{other:?}: expected auto, systemd or none")),
        }
    }
}

impl Config {
    /// A configuration with the system defaults.
    pub fn system_default() -> Self {
        Config {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            runtime_dir: PathBuf::from(DEFAULT_RUNTIME_DIR),
            bus: BusChoice::System,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            storage_dirs: Vec::new(),
            admin_group: DEFAULT_ADMIN_GROUP.to_string(),
            polkit: true,
            guest_units: GuestUnits::Auto,
        }
    }

    /// Every storage directory: `STATE_DIR/images` first, then `storage_dirs`.
    pub fn storage_roots(&self) -> Vec<PathBuf> {
        std::iter::once(self.state_dir.join(STATE_IMAGES_SUBDIR))
            .chain(self.storage_dirs.iter().cloned())
            .collect()
    }

    /// The runtime directory of the domain with catalog id `id`.
    pub fn domain_runtime_dir(&self, id: i64) -> PathBuf {
        self.runtime_dir.join("domains").join(id.to_string())
    }
}
