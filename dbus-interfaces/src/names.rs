//! Well-known names, interface names, object paths and option keys.
//!
//! Object path elements are built only from numeric ids, never from user-supplied names, so any
//! domain or snapshot name is safe to use.

/// The well-known bus name the daemon owns.
pub const BUS_NAME: &str = "org.vmsnap.VmSnap1";
/// The root object: `Manager` and `org.freedesktop.DBus.ObjectManager`.
pub const ROOT_PATH: &str = "/org/vmsnap/VmSnap1";
/// Interface of the root object.
pub const MANAGER_INTERFACE: &str = "org.vmsnap.VmSnap1.Manager";
/// Interface of each domain object.
pub const DOMAIN_INTERFACE: &str = "org.vmsnap.VmSnap1.Domain";
/// Interface of each snapshot object.
pub const SNAPSHOT_INTERFACE: &str = "org.vmsnap.VmSnap1.Snapshot";
/// Interface of each job object.
pub const JOB_INTERFACE: &str = "org.vmsnap.VmSnap1.Job";
/// Prefix of every error name the daemon returns.
pub const ERROR_PREFIX: &str = "org.vmsnap.VmSnap1.Error";

/// Object path of the domain with catalog id `id`.
pub fn domain_path(id: i64) -> String {
    format!("{ROOT_PATH}/domain/{id}")
}

/// Object path of snapshot `snapshot` of domain `domain`.
pub fn snapshot_path(domain: i64, snapshot: i64) -> String {
    format!("{ROOT_PATH}/domain/{domain}/snapshot/{snapshot}")
}

/// Object path of job number `id`.
pub fn job_path(id: u64) -> String {
    format!("{ROOT_PATH}/job/{id}")
}

/// The object path that means "none" in properties such as `CurrentSnapshot`.
pub const NO_OBJECT: &str = "/";

/// Domain states as the `State` property spells them.
pub mod state {
    /// Not running.
    pub const SHUTOFF: &str = "shutoff";
    /// Running.
    pub const RUNNING: &str = "running";
    /// Paused by a user or by an operation.
    pub const PAUSED: &str = "paused";
    /// The QEMU process ended without being asked to.
    pub const CRASHED: &str = "crashed";
}

/// Option keys understood by the `a{sv}` options of mutating methods.
pub mod option {
    /// `b`: return the job's object path at once instead of waiting for the result.
    pub const ASYNC: &str = "async";
    /// `u`: seconds a graceful shutdown may take before giving up (or forcing, with `force`).
    pub const TIMEOUT: &str = "timeout";
    /// `b`: with `Shutdown`, destroy the guest when the timeout passes.
    pub const FORCE: &str = "force";
    /// `b`: with `Start`, leave the guest paused after start.
    pub const PAUSED: &str = "paused";
    /// `b`: with disk changes, only edit the definition (do not hot-plug).
    pub const CONFIG_ONLY: &str = "config-only";
    /// `b`: with `CreateSnapshot`, snapshot the disks only.
    pub const DISK_ONLY: &str = "disk-only";
    /// `s`: with `CreateSnapshot`, where VM state goes: `internal`, `external` or `none`.
    pub const MEMORY: &str = "memory";
    /// `s`: with `CreateSnapshot`, the file for external VM state.
    pub const MEMORY_FILE: &str = "memory-file";
    /// `s`: with `CreateSnapshot`, the disk whose image holds internal VM state.
    pub const VMSTATE_DISK: &str = "vmstate-disk";
    /// `as`: with `CreateSnapshot`, per-disk modes: `TARGET=internal|external[:FILE]|no`.
    pub const DISKS: &str = "disks";
    /// `b`: with external VM state, keep the guest running while RAM is copied.
    pub const LIVE: &str = "live";
    /// `b`: rename the current image to the snapshot's file and keep the original path active.
    pub const KEEP_ACTIVE_NAME: &str = "keep-active-name";
    /// `b`: with `MonitorCommand`, the command is a human monitor command line.
    pub const HMP: &str = "hmp";
    /// `b`: with `Revert`, end running whatever the snapshot recorded.
    pub const RUNNING: &str = "running";
    /// `b`: with `Delete`, forget the record and keep every file.
    pub const METADATA_ONLY: &str = "metadata-only";
    /// `s`: with `CreateSnapshot`, revert to this snapshot first (a branch from it).
    pub const PARENT: &str = "parent";
    /// `b`: with `Revert`, delete the target's descendants first.
    pub const DELETE_CHILDREN: &str = "delete-children";
    /// `b`: with `Delete`, delete the whole subtree.
    pub const CHILDREN: &str = "children";
    /// `b`: with `Delete`, delete the subtree below the snapshot and keep it.
    pub const CHILDREN_ONLY: &str = "children-only";
    /// `b`: with `UndefineDomain`, forget snapshot records too instead of refusing.
    pub const SNAPSHOTS_METADATA: &str = "snapshots-metadata";
    /// `b`: with `RedefineSnapshot`, make the redefined snapshot the domain's current one.
    pub const CURRENT: &str = "current";
}

/// Option keys of `Domain.Prune` and `CreateSnapshot` about retention, and the keys of a
/// retention policy (`Prune`'s policy dictionary and `Domain.Schedule`).
pub mod retention {
    /// `s`: with `CreateSnapshot`, who asked for the snapshot (default `manual`; the scheduled
    /// path uses `schedule`). Only `schedule` snapshots are pruning candidates by default.
    pub const ORIGIN: &str = "origin";
    /// `b`: with `CreateSnapshot`, protect the new snapshot from pruning.
    pub const PROTECTED: &str = "protected";
    /// `b`: with `Prune`, return what would be deleted and change nothing.
    pub const DRY_RUN: &str = "dry-run";
    /// `b`: with `Prune`, every snapshot is a candidate, not only scheduled ones.
    pub const INCLUDE_MANUAL: &str = "include-manual";
    /// `u`: keep the N newest candidates.
    pub const KEEP_LAST: &str = "keep-last";
    /// `u`: keep the newest candidate of each of the N most recent hours (UTC) that have one.
    pub const KEEP_HOURLY: &str = "keep-hourly";
    /// `u`: the same per day (UTC).
    pub const KEEP_DAILY: &str = "keep-daily";
    /// `u`: the same per ISO week (Monday to Sunday, UTC).
    pub const KEEP_WEEKLY: &str = "keep-weekly";
    /// `u`: the same per month (UTC).
    pub const KEEP_MONTHLY: &str = "keep-monthly";
    /// `u`: the same per year (UTC).
    pub const KEEP_YEARLY: &str = "keep-yearly";
    /// `t` seconds, or `s` like `30d`, `12h`, `1w2d`: delete candidates older than this even
    /// when a keep rule would keep them (protected and current snapshots stay).
    pub const MAX_AGE: &str = "max-age";
    /// The keep rules, in the order of their periods (`keep-last` first).
    pub const KEEP_KEYS: [&str; 6] = [
        KEEP_LAST,
        KEEP_HOURLY,
        KEEP_DAILY,
        KEEP_WEEKLY,
        KEEP_MONTHLY,
        KEEP_YEARLY,
    ];
    /// Every key of a retention policy: the keep rules and `max-age`.
    pub const POLICY_KEYS: [&str; 7] = [
        KEEP_LAST,
        KEEP_HOURLY,
        KEEP_DAILY,
        KEEP_WEEKLY,
        KEEP_MONTHLY,
        KEEP_YEARLY,
        MAX_AGE,
    ];
    /// `s`: in `Domain.Schedule`, the kind of scheduled snapshot: `disk-only` or `checkpoint`.
    pub const KIND: &str = "kind";
    /// `s`: in `Domain.Schedule`, the prefix of scheduled snapshots' names.
    pub const PREFIX: &str = "prefix";
    /// `b`: with `SetSchedule`, start from the defaults instead of the stored settings.
    pub const RESET: &str = "reset";
    /// The origin of snapshots taken by a user.
    pub const ORIGIN_MANUAL: &str = "manual";
    /// The origin of snapshots taken by a schedule.
    pub const ORIGIN_SCHEDULE: &str = "schedule";
}
