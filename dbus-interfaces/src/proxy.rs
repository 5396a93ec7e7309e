//! Client-side proxies of the vmsnap interfaces.

use std::collections::HashMap;

use zbus::{OwnedObjectPath, OwnedVariant, Variant, proxy};

/// Options dictionary as sent to mutating methods.
pub type Options<'a> = HashMap<&'a str, Variant<'a>>;

/// `org.vmsnap.VmSnap1.Manager` at the root object.
#[proxy(
    interface = "org.vmsnap.VmSnap1.Manager",
    default_service = "org.vmsnap.VmSnap1",
    default_path = "/org/vmsnap/VmSnap1"
)]
pub trait Manager {
    /// Defines a managed domain from libvirt-style domain XML; returns its object path.
    fn define_domain(
        &self,
        xml: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<OwnedObjectPath, crate::Error>;
    /// Forgets a shut-off domain.
    fn undefine_domain(
        &self,
        name: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<(), crate::Error>;
    /// Registers a QEMU started by someone else, by the path of its QMP socket.
    fn attach_domain(
        &self,
        name: &str,
        qmp_socket: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<OwnedObjectPath, crate::Error>;
    /// Every domain's object path.
    fn list_domains(&self) -> Result<Vec<OwnedObjectPath>, crate::Error>;
    /// The object path of the domain with this name.
    fn find_domain(&self, name: &str) -> Result<OwnedObjectPath, crate::Error>;
    /// The daemon's version.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// Every job object on the bus, running or lingering after it finished.
    #[zbus(property)]
    fn jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    /// A domain was defined or attached.
    #[zbus(signal)]
    fn domain_added(&self, domain: OwnedObjectPath, name: String) -> zbus::Result<()>;
    /// A domain was undefined.
    #[zbus(signal)]
    fn domain_removed(&self, domain: OwnedObjectPath, name: String) -> zbus::Result<()>;
}

/// `org.vmsnap.VmSnap1.Domain` on `/org/vmsnap/VmSnap1/domain/<id>`.
#[proxy(
    interface = "org.vmsnap.VmSnap1.Domain",
    default_service = "org.vmsnap.VmSnap1"
)]
pub trait Domain {
    /// Starts the guest (managed domains).
    fn start(&self, options: HashMap<&str, Variant<'_>>) -> Result<(), crate::Error>;
    /// Asks the guest to power down; with `force`, destroys it after `timeout`.
    fn shutdown(
        &self,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<OwnedObjectPath, crate::Error>;
    /// Stops the guest at once.
    fn destroy(&self, options: HashMap<&str, Variant<'_>>) -> Result<(), crate::Error>;
    /// Pauses the guest's vCPUs.
    fn pause(&self, options: HashMap<&str, Variant<'_>>) -> Result<(), crate::Error>;
    /// Resumes the guest's vCPUs.
    fn resume(&self, options: HashMap<&str, Variant<'_>>) -> Result<(), crate::Error>;
    /// The domain's definition as XML.
    fn get_xml(&self, options: HashMap<&str, Variant<'_>>) -> Result<String, crate::Error>;
    /// Adds a disk (XML `<disk>` element) to the definition and, when running, to the guest.
    fn attach_disk(
        &self,
        xml: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<(), crate::Error>;
    /// Removes the disk with this target from the guest and the definition.
    fn detach_disk(
        &self,
        target: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<(), crate::Error>;
    /// Takes a snapshot; returns its path (or the job's path with `async`).
    fn create_snapshot(
        &self,
        name: &str,
        description: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<OwnedObjectPath, crate::Error>;
    /// Takes a snapshot described by a libvirt `<domainsnapshot>` document.
    fn create_snapshot_xml(
        &self,
        xml: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<OwnedObjectPath, crate::Error>;
    /// Adds a record for a snapshot whose files already exist, from a libvirt
    /// `<domainsnapshot>` document (option `current`).
    fn redefine_snapshot(
        &self,
        xml: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<OwnedObjectPath, crate::Error>;
    /// Passes a command to the guest's QEMU monitor (QMP JSON, or HMP with option `hmp`).
    fn monitor_command(
        &self,
        command: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<String, crate::Error>;
    /// Every snapshot's path, oldest first.
    fn list_snapshots(&self) -> Result<Vec<OwnedObjectPath>, crate::Error>;
    /// Verifies every snapshot against its images: (what, name, verdict, reason) rows.
    fn check(
        &self,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<Vec<(String, String, String, String)>, crate::Error>;
    /// The path of the snapshot with this name.
    fn find_snapshot(&self, name: &str) -> Result<OwnedObjectPath, crate::Error>;
    /// Deletes what a retention policy does not keep (empty policy: the stored one); returns
    /// the deleted names (with option `dry-run`, what would be deleted).
    fn prune(
        &self,
        policy: HashMap<&str, Variant<'_>>,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<Vec<String>, crate::Error>;
    /// What `prune` would do to every snapshot, oldest first: (name, `delete` | `keep` |
    /// `ignore`, reasons). Changes nothing.
    fn plan_prune(
        &self,
        policy: HashMap<&str, Variant<'_>>,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<Vec<(String, String, Vec<String>)>, crate::Error>;
    /// Changes the scheduled-snapshot settings (merged into the stored ones).
    fn set_schedule(
        &self,
        settings: HashMap<&str, Variant<'_>>,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<(), crate::Error>;
    /// The domain was reverted to a snapshot.
    #[zbus(signal)]
    fn reverted(&self, snapshot: OwnedObjectPath) -> zbus::Result<()>;
    /// A snapshot was deleted.
    #[zbus(signal)]
    fn snapshot_deleted(&self, snapshot: OwnedObjectPath) -> zbus::Result<()>;
    /// A snapshot was taken.
    #[zbus(signal)]
    fn snapshot_created(&self, snapshot: OwnedObjectPath) -> zbus::Result<()>;
    /// The domain's name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// The domain's UUID.
    #[zbus(property)]
    fn uuid(&self) -> zbus::Result<String>;
    /// `shutoff`, `running`, `paused` or `crashed`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// `managed` (vmsnapd starts QEMU) or `attached` (someone else did).
    #[zbus(property)]
    fn kind(&self) -> zbus::Result<String>;
    /// The current snapshot, or `/` when there is none.
    #[zbus(property)]
    fn current_snapshot(&self) -> zbus::Result<OwnedObjectPath>;
    /// The disks: (target, format, file, flags).
    #[zbus(property)]
    fn disks(&self) -> zbus::Result<Vec<(String, String, String, Vec<String>)>>;
    /// Scheduled-snapshot settings: `kind`, `prefix` and the retention policy keys.
    #[zbus(property)]
    fn schedule(&self) -> zbus::Result<HashMap<String, OwnedVariant>>;
}

/// `org.vmsnap.VmSnap1.Snapshot` on `/org/vmsnap/VmSnap1/domain/<id>/snapshot/<id>`.
#[proxy(
    interface = "org.vmsnap.VmSnap1.Snapshot",
    default_service = "org.vmsnap.VmSnap1"
)]
pub trait Snapshot {
    /// The snapshot as libvirt `<domainsnapshot>` XML.
    fn get_xml(&self) -> Result<String, crate::Error>;
    /// Reverts the domain to this snapshot; returns the job path with `async`, else this path.
    fn revert(&self, options: HashMap<&str, Variant<'_>>) -> Result<OwnedObjectPath, crate::Error>;
    /// Deletes this snapshot; returns the job path with `async`, else `/`.
    fn delete(&self, options: HashMap<&str, Variant<'_>>) -> Result<OwnedObjectPath, crate::Error>;
    /// The snapshot's name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// Free text given at creation.
    #[zbus(property)]
    fn description(&self) -> zbus::Result<String>;
    /// Creation time, seconds since the Unix epoch.
    #[zbus(property)]
    fn creation_time(&self) -> zbus::Result<u64>;
    /// `running`, `paused`, `shutoff` or `disk-snapshot`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// `checkpoint` or `disk-only`.
    #[zbus(property)]
    fn kind(&self) -> zbus::Result<String>;
    /// (mode, file or disk holding the VM state).
    #[zbus(property)]
    fn memory(&self) -> zbus::Result<(String, String)>;
    /// (target, mode, data file, overlay) per disk.
    #[zbus(property)]
    fn disks(&self) -> zbus::Result<Vec<(String, String, String, String)>>;
    /// `committed` or `broken`.
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    /// The domain.
    #[zbus(property)]
    fn domain(&self) -> zbus::Result<OwnedObjectPath>;
    /// The parent snapshot or `/`.
    #[zbus(property)]
    fn parent(&self) -> zbus::Result<OwnedObjectPath>;
    /// The child snapshots.
    #[zbus(property)]
    fn children(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    /// Whether this is the current snapshot.
    #[zbus(property)]
    fn is_current(&self) -> zbus::Result<bool>;
    /// Bytes allocated for the files the snapshot added (0 for internal snapshots).
    #[zbus(property(emits_changed_signal = "false"))]
    fn size_on_disk(&self) -> zbus::Result<u64>;
    /// Whether pruning must leave it alone.
    #[zbus(property)]
    fn protected(&self) -> zbus::Result<bool>;
    /// Protects it from pruning, or ends its protection.
    #[zbus(property)]
    fn set_protected(&self, value: bool) -> zbus::Result<()>;
    /// Who asked for it: `manual`, `schedule`, ...
    #[zbus(property)]
    fn origin(&self) -> zbus::Result<String>;
}

/// `org.vmsnap.VmSnap1.Job` on `/org/vmsnap/VmSnap1/job/<n>`.
#[proxy(
    interface = "org.vmsnap.VmSnap1.Job",
    default_service = "org.vmsnap.VmSnap1"
)]
pub trait Job {
    /// Asks the operation to stop; refused when `Cancelable` is false.
    fn cancel(&self) -> Result<(), crate::Error>;
    /// What the job does, e.g. `shutdown`.
    #[zbus(property)]
    fn operation(&self) -> zbus::Result<String>;
    /// The domain the job works on.
    #[zbus(property)]
    fn domain(&self) -> zbus::Result<OwnedObjectPath>;
    /// Progress from 0 to 1.
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<f64>;
    /// Whether `Progress` means anything yet.
    #[zbus(property)]
    fn progress_valid(&self) -> zbus::Result<bool>;
    /// Bytes done so far.
    #[zbus(property)]
    fn bytes_done(&self) -> zbus::Result<u64>;
    /// Bytes to do in all (0 when unknown).
    #[zbus(property)]
    fn bytes_total(&self) -> zbus::Result<u64>;
    /// The current phase.
    #[zbus(property)]
    fn phase(&self) -> zbus::Result<String>;
    /// Start time in microseconds since the Unix epoch.
    #[zbus(property)]
    fn start_time(&self) -> zbus::Result<u64>;
    /// Whether `Cancel` may be called now.
    #[zbus(property)]
    fn cancelable(&self) -> zbus::Result<bool>;
    /// Unique bus name of the caller that started the job.
    #[zbus(property)]
    fn owner(&self) -> zbus::Result<String>;
    /// Whether the job has ended.
    #[zbus(property)]
    fn finished(&self) -> zbus::Result<bool>;
    /// The object the operation produced, `/` when none or not yet.
    #[zbus(property)]
    fn result(&self) -> zbus::Result<OwnedObjectPath>;
    /// The error's full name when the job failed.
    #[zbus(property)]
    fn error_name(&self) -> zbus::Result<String>;
    /// The error's message when the job failed.
    #[zbus(property)]
    fn error_message(&self) -> zbus::Result<String>;
    /// The job ended: success, error name (empty on success) and message.
    #[zbus(signal)]
    fn completed(&self, success: bool, error_name: String, message: String) -> zbus::Result<()>;
}

/// Convenience to turn an owned variant map into something printable in tests and the client.
pub type Properties = HashMap<String, OwnedVariant>;
