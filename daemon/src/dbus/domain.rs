//! `org.vmsnap.VmSnap1.Domain` objects, one per domain, and the task that announces their
//! property changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use vmsnap_dbus::Error;
use vmsnap_dbus::names::{NO_OBJECT, domain_path, option, snapshot_path};
use zbus::message::Header;
use zbus::{ObjectServer, OwnedObjectPath, OwnedVariant, interface};

use std::path::PathBuf;

use super::auth::{self, Action, authorize};
use super::job::run_job;
use super::options::Options;
use super::snapshot::{SnapshotsSeen, sync_seen};
use super::wire_error;
use crate::domain::actor::{DEFAULT_SHUTDOWN_TIMEOUT, DomainHandle, DomainInfo};
use crate::domain::def::DiskDef;
use crate::service::Service;
use crate::snapshot::plan::{CreateRequest, DiskMode, DiskRequest, MemoryMode};
use zbus::ObjectPath;
use zbus::object_server::SignalEmitter;

/// The D-Bus face of a domain.
pub struct DomainIface {
    service: Arc<Service>,
    handle: DomainHandle,
}

fn obj(s: String) -> OwnedObjectPath {
    OwnedObjectPath::try_from(s).expect("object paths are built from numeric ids")
}

fn caller(header: &Header<'_>) -> String {
    header.sender().map(|s| s.to_string()).unwrap_or_default()
}

/// Disk rows as the `Disks` property shows them: (target, format, file, flags).
fn disk_rows(info: &DomainInfo) -> Vec<(String, String, String, Vec<String>)> {
    info.def
        .disks
        .iter()
        .map(|d| {
            let mut flags = vec![match d.bus {
                crate::domain::def::DiskBus::Virtio => "virtio".to_string(),
                crate::domain::def::DiskBus::Scsi => "scsi".to_string(),
            }];
            if d.readonly {
                flags.push("readonly".into());
            }
            if d.shareable {
                flags.push("shareable".into());
            }
            if d.transient {
                flags.push("transient".into());
            }
            (
                d.target.clone(),
                d.format.as_str().to_string(),
                d.source.display().to_string(),
                flags,
            )
        })
        .collect()
}

#[interface(name = "org.vmsnap.VmSnap1.Domain")]
impl DomainIface {
    /// Starts the guest. Option `paused` (b) leaves its vCPUs stopped.
    async fn start(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), Error> {
        authorize(&header, Action::Manage).await?;
        let opts = Options::parse("Start", options, &[option::PAUSED])?;
        let paused = opts.bool(option::PAUSED)?.unwrap_or(false);
        self.handle.start(paused).await.map_err(wire_error)
    }

    /// Asks the guest to power off and waits until it has (a job). Options: `timeout` (u,
    /// seconds, default 120), `force` (b: destroy at the timeout instead of failing), `async`
    /// (b: return the job at once). Returns the job path when asynchronous, `/` otherwise.
    async fn shutdown(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(&header, Action::Manage).await?;
        let opts = Options::parse(
            "Shutdown",
            options,
            &[option::TIMEOUT, option::FORCE, option::ASYNC],
        )?;
        let timeout = opts
            .uint(option::TIMEOUT)?
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
        let force = opts.bool(option::FORCE)?.unwrap_or(false);
        let is_async = opts.bool(option::ASYNC)?.unwrap_or(false);
        let job = self
            .service
            .jobs
            .create("shutdown", self.handle.id().0, &caller(&header));
        auth::record_owner(&job, &header).await;
        let handle = self.handle.clone();
        let j = job.clone();
        let (path, rx) = run_job(server, &self.service, job, async move {
            handle.shutdown(timeout, force, j).await
        })
        .await?;
        if is_async {
            return Ok(path);
        }
        rx.await
            .map_err(|_| Error::Failed("the shutdown job ended without a result".into()))??;
        Ok(obj(NO_OBJECT.to_string()))
    }

    /// Stops the guest at once (QEMU quits; killed if it does not).
    async fn destroy(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), Error> {
        authorize(&header, Action::Manage).await?;
        Options::parse("Destroy", options, &[])?;
        self.handle.destroy().await.map_err(wire_error)
    }

    /// Pauses the guest's vCPUs.
    async fn pause(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), Error> {
        authorize(&header, Action::Manage).await?;
        Options::parse("Pause", options, &[])?;
        self.handle.pause().await.map_err(wire_error)
    }

    /// Resumes the guest's vCPUs.
    async fn resume(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), Error> {
        authorize(&header, Action::Manage).await?;
        Options::parse("Resume", options, &[])?;
        self.handle.resume().await.map_err(wire_error)
    }

    /// The domain's definition as XML.
    async fn get_xml(&self, options: HashMap<String, OwnedVariant>) -> Result<String, Error> {
        Options::parse("GetXml", options, &[])?;
        Ok(self.handle.info().def.to_xml())
    }

    /// Adds a disk, given as a `<disk>` element, to the definition and, while the guest runs,
    /// to the guest (hot-plug). Option `config-only` (b) skips the hot-plug.
    async fn attach_disk(
        &self,
        xml: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), Error> {
        authorize(&header, Action::Manage).await?;
        let opts = Options::parse("AttachDisk", options, &[option::CONFIG_ONLY])?;
        let config_only = opts.bool(option::CONFIG_ONLY)?.unwrap_or(false);
        let disk = DiskDef::from_xml(&xml)
            .map_err(|e| Error::InvalidArgument(format!("invalid disk: {e}")))?;
        crate::storage::check_disks(
            &self.service,
            std::slice::from_ref(&disk),
            Some(self.handle.id()),
        )
        .await
        .map_err(wire_error)?;
        self.handle
            .attach_disk(disk, config_only)
            .await
            .map_err(wire_error)
    }

    /// Removes the disk with this target from the guest (hot-unplug, which needs the guest's
    /// cooperation for virtio disks) and from the definition. Option `config-only` (b).
    async fn detach_disk(
        &self,
        target: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), Error> {
        authorize(&header, Action::Manage).await?;
        let opts = Options::parse("DetachDisk", options, &[option::CONFIG_ONLY])?;
        let config_only = opts.bool(option::CONFIG_ONLY)?.unwrap_or(false);
        self.handle
            .detach_disk(target, config_only)
            .await
            .map_err(wire_error)
    }

    /// Takes a snapshot and returns its object path (or, with `async`, the job's path at
    /// once). An empty name means one made from the time. Options: `disk-only` (b), `memory`
    /// (s: `internal`, `external` or `none`), `memory-file` (s), `vmstate-disk` (s), `disks`
    /// (as: `TARGET=internal`, `TARGET=external[:FILE]`, `TARGET=no`), `live` (b),
    /// `keep-active-name` (b), `parent` (s: first revert to this snapshot, making the new one
    /// a branch from it), `origin` (s: who asks, default `manual`; scheduled runs use
    /// `schedule`), `protected` (b: protect it from pruning), `async` (b).
    async fn create_snapshot(
        &self,
        name: String,
        description: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(&header, Action::Create).await?;
        let opts = Options::parse("CreateSnapshot", options, CREATE_OPTIONS)?;
        let mut req = create_request(&opts)?;
        req.name = (!name.is_empty()).then_some(name);
        req.description = description;
        self.run_create(req, &opts, &header, server, emitter).await
    }

    /// Takes a snapshot described by a libvirt `<domainsnapshot>` document (name,
    /// description, memory, disks). Options: `live` (b), `keep-active-name` (b), `async` (b).
    async fn create_snapshot_xml(
        &self,
        xml: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(&header, Action::Create).await?;
        let opts = Options::parse(
            "CreateSnapshotXml",
            options,
            &[option::LIVE, option::KEEP_ACTIVE_NAME, option::ASYNC],
        )?;
        let mut req = crate::snapshot::xml::request_from_xml(&xml)
            .map_err(|e| wire_error(crate::domain::actor::plan_error(e)))?;
        req.live = opts.bool(option::LIVE)?.unwrap_or(req.live);
        req.keep_active_name = opts
            .bool(option::KEEP_ACTIVE_NAME)?
            .unwrap_or(req.keep_active_name);
        self.run_create(req, &opts, &header, server, emitter).await
    }

    /// Adds a catalog record for a snapshot whose files already exist (for example moved
    /// from a libvirt host), described by a whole libvirt `<domainsnapshot>` document with
    /// `name`, `state` and `creationTime`; returns its object path. The images are checked
    /// first: each internal disk's image holds a tag of the snapshot's name, each external
    /// disk's overlay exists and is backed by the image the embedded `<domain>` names, an
    /// external memory file exists. The parent must already exist (import a tree parent
    /// first). Parts vmsnap does not act on (`domain`, `inactiveDomain`, `cookie`, …) are kept
    /// verbatim and returned by the snapshot's `GetXml`. Options: `current` (b: make it the
    /// current snapshot; `<active>1</active>` does too). Only the catalog changes: the
    /// domain's definition and images stay as they are. A refusal changes nothing.
    async fn redefine_snapshot(
        &self,
        xml: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(&header, Action::Create).await?;
        let opts = Options::parse("RedefineSnapshot", options, &[option::CURRENT])?;
        let current = opts.bool(option::CURRENT)?.unwrap_or(false);
        let doc = crate::snapshot::xml::SnapshotDoc::parse(&xml)
            .map_err(|e| wire_error(crate::domain::actor::plan_error(e)))?;
        let _guard = self
            .handle
            .begin_operation("the redefine")
            .map_err(wire_error)?;
        let id = self
            .handle
            .redefine_snapshot(doc, current)
            .await
            .map_err(wire_error)?;
        // The object is served from the published record already; the domain's forwarder
        // announces it (`InterfacesAdded`) once, like every new record.
        let p = obj(snapshot_path(self.handle.id().0, id.0));
        let _ = DomainIface::snapshot_created(&emitter, p.as_ref()).await;
        Ok(p)
    }

    /// Passes a command to the guest's QEMU monitor, like libvirt's `qemu-monitor-command`:
    /// a QMP command as JSON, or with option `hmp` (b) a human monitor command line. Returns
    /// QEMU's answer. For diagnostics; changes made this way are not tracked.
    async fn monitor_command(
        &self,
        command: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<String, Error> {
        authorize(&header, Action::Manage).await?;
        let opts = Options::parse("MonitorCommand", options, &[option::HMP])?;
        let hmp = opts.bool(option::HMP)?.unwrap_or(false);
        self.handle.monitor(command, hmp).await.map_err(wire_error)
    }

    /// Verifies every snapshot against its images, read-only, as crash recovery does at
    /// start: one row (what, name, verdict, reason) per snapshot, with verdict `ok`, `broken`
    /// (a file or internal tag is missing), `mismatch` (format or backing chain differs from
    /// the record) or `pending` (an operation on it has not finished), and one row per orphan
    /// file (what `orphan`). No options are defined yet.
    async fn check(
        &self,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<Vec<(String, String, String, String)>, Error> {
        Options::parse("Check", options, &[])?;
        let rows = self.handle.check().await.map_err(wire_error)?;
        Ok(rows
            .into_iter()
            .map(|r| (r.what, r.name, r.verdict, r.reason))
            .collect())
    }

    /// Every snapshot's object path, oldest first.
    async fn list_snapshots(&self) -> Vec<OwnedObjectPath> {
        let info = self.handle.info();
        let mut recs: Vec<&crate::catalog::SnapshotRecord> = info.snapshots.values().collect();
        recs.sort_by_key(|r| (r.created_at, r.id));
        recs.into_iter()
            .map(|r| obj(snapshot_path(info.id.0, r.id.0)))
            .collect()
    }

    /// The object path of the snapshot with this name.
    async fn find_snapshot(&self, name: String) -> Result<OwnedObjectPath, Error> {
        let info = self.handle.info();
        info.snapshots
            .values()
            .find(|s| s.name == name)
            .map(|s| obj(snapshot_path(info.id.0, s.id.0)))
            .ok_or_else(|| {
                wire_error(crate::error::ServiceError::NoSuchSnapshot {
                    domain: info.def.name.clone(),
                    name,
                })
            })
    }

    /// Deletes the snapshots a retention policy does not keep, one at a time, descendants
    /// first, each like `Snapshot.Delete` (data of the remaining snapshots is merged, never
    /// lost); returns the deleted names. Policy keys: `keep-last`, `keep-hourly`, `keep-daily`,
    /// `keep-weekly`, `keep-monthly`, `keep-yearly` (u, at least 1; periods are UTC calendar
    /// periods, the newest snapshot of each of the N most recent periods that have one is
    /// kept), `max-age` (t seconds or s like `30d`: older snapshots go even when a keep rule
    /// would keep them). An empty policy uses the stored one (`Schedule`). Protected snapshots
    /// and the current one are never deleted; only snapshots of origin `schedule` are
    /// candidates unless option `include-manual` (b) is set. Option `dry-run` (b) returns what
    /// would be deleted and changes nothing. When a delete fails part-way the error (of the
    /// failure's kind) names the snapshots already deleted.
    async fn prune(
        &self,
        policy: HashMap<String, OwnedVariant>,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<Vec<String>, Error> {
        super::retention::prune(
            &self.service,
            &self.handle,
            policy,
            options,
            &header,
            server,
            emitter,
        )
        .await
    }

    /// What `Prune` with the same policy would do, changing nothing: one row per snapshot,
    /// oldest first, of its name, the verdict (`delete`, `keep`, or `ignore` for snapshots
    /// that are not candidates) and the reasons: for `keep` the rules that keep it (`last`,
    /// `hourly`, `daily`, `weekly`, `monthly`, `yearly`, `within-max-age`, `protected`,
    /// `current`), for `ignore` `manual` (origin not `schedule` and no `include-manual`) or
    /// `uncommitted`. Option `include-manual` (b) as for `Prune`.
    async fn plan_prune(
        &self,
        policy: HashMap<String, OwnedVariant>,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<Vec<(String, String, Vec<String>)>, Error> {
        super::retention::plan_prune(&self.service, &self.handle, policy, options)
    }

    /// Changes the settings of scheduled snapshots (see `Schedule`): the given keys replace
    /// the stored ones, the others stay; option `reset` (b) starts from the defaults instead.
    /// Keys: `kind` (s: `disk-only` or `checkpoint`), `prefix` (s), and the policy keys of
    /// `Prune`. Everything is checked before anything is stored.
    async fn set_schedule(
        &self,
        settings: HashMap<String, OwnedVariant>,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), Error> {
        authorize(&header, Action::Manage).await?;
        super::retention::set_schedule(&self.service, &self.handle, settings, options)?;
        let path = domain_path(self.handle.id().0);
        super::dispatch::properties_changed(server, self, &path, &["Schedule"]).await;
        Ok(())
    }

    /// The domain was reverted to a snapshot.
    #[zbus(signal)]
    pub(super) async fn reverted(
        emitter: &SignalEmitter<'_>,
        snapshot: ObjectPath<'_>,
    ) -> zbus::Result<()>;

    /// A snapshot was deleted.
    #[zbus(signal)]
    pub(super) async fn snapshot_deleted(
        emitter: &SignalEmitter<'_>,
        snapshot: ObjectPath<'_>,
    ) -> zbus::Result<()>;

    /// A snapshot was taken.
    #[zbus(signal)]
    async fn snapshot_created(
        emitter: &SignalEmitter<'_>,
        snapshot: ObjectPath<'_>,
    ) -> zbus::Result<()>;

    /// The domain's name.
    #[zbus(property)]
    async fn name(&self) -> String {
        self.handle.name()
    }

    /// The domain's UUID.
    #[zbus(property)]
    async fn uuid(&self) -> String {
        self.handle.info().def.uuid.to_string()
    }

    /// `shutoff`, `running`, `paused` or `crashed`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.handle.info().state.as_str().to_string()
    }

    /// `managed` (vmsnapd starts its QEMU) or `attached` (someone else did).
    #[zbus(property)]
    async fn kind(&self) -> String {
        match self.handle.info().kind {
            crate::catalog::DomainKind::Managed => "managed".into(),
            crate::catalog::DomainKind::Attached => "attached".into(),
        }
    }

    /// The current snapshot, or `/` when there is none.
    #[zbus(property)]
    async fn current_snapshot(&self) -> OwnedObjectPath {
        let info = self.handle.info();
        match info.current_snapshot {
            Some(s) => obj(snapshot_path(info.id.0, s.0)),
            None => obj(NO_OBJECT.to_string()),
        }
    }

    /// The disks: (target, format, file, flags) where flags hold the bus and any of
    /// `readonly`, `shareable`, `transient`.
    #[zbus(property)]
    async fn disks(&self) -> Vec<(String, String, String, Vec<String>)> {
        disk_rows(&self.handle.info())
    }

    /// Settings of scheduled snapshots (`vmsnap schedule run`): `kind` (s: `disk-only`, the
    /// default, or `checkpoint`), `prefix` (s: names are `PREFIX-YYYYMMDDTHHMMSSZ`, default
    /// `auto`) and the stored retention policy (`keep-*` as u, `max-age` as t seconds; absent
    /// keys are not part of it). Changed with `SetSchedule`. Stored settings this build
    /// cannot read show as the defaults plus `error` (s) saying why; scheduled runs and
    /// `Prune` with the stored policy then fail until `SetSchedule` replaces them.
    #[zbus(property)]
    async fn schedule(&self) -> HashMap<String, OwnedVariant> {
        super::retention::schedule_property(&self.service, &self.handle)
    }
}

const CREATE_OPTIONS: &[&str] = &[
    option::PARENT,
    option::DISK_ONLY,
    option::MEMORY,
    option::MEMORY_FILE,
    option::VMSTATE_DISK,
    option::DISKS,
    option::LIVE,
    option::KEEP_ACTIVE_NAME,
    option::ASYNC,
    vmsnap_dbus::names::retention::ORIGIN,
    vmsnap_dbus::names::retention::PROTECTED,
];

/// Reads the creation options into a request (name and description are set by the caller).
pub(crate) fn create_request(opts: &Options) -> Result<CreateRequest, Error> {
    let bad = |m: String| Error::InvalidArgument(m);
    let memory = match opts.string(option::MEMORY)? {
        Some(m) => Some(m.parse::<MemoryMode>().map_err(|_| {
            bad(format!(
                "option \"memory\" must be internal, external or none, not {m:?}"
            ))
        })?),
        None => None,
    };
    let mut disks = Vec::new();
    for spec in opts.strings(option::DISKS)?.unwrap_or_default() {
        disks.push(parse_disk_spec(&spec).map_err(bad)?);
    }
    Ok(CreateRequest {
        name: None,
        description: String::new(),
        disk_only: opts.bool(option::DISK_ONLY)?.unwrap_or(false),
        memory,
        memory_file: opts.string(option::MEMORY_FILE)?.map(PathBuf::from),
        vmstate_disk: opts.string(option::VMSTATE_DISK)?,
        disks,
        live: opts.bool(option::LIVE)?.unwrap_or(false),
        keep_active_name: opts.bool(option::KEEP_ACTIVE_NAME)?.unwrap_or(false),
    })
}

/// Parses `TARGET=internal`, `TARGET=external[:FILE]` or `TARGET=no`.
pub fn parse_disk_spec(spec: &str) -> Result<DiskRequest, String> {
    let (target, rest) = spec.split_once('=').ok_or_else(|| {
        format!("disk spec {spec:?} must look like TARGET=internal|external[:FILE]|no")
    })?;
    let (mode, file) = match rest.split_once(':') {
        Some((m, f)) => (m, Some(PathBuf::from(f))),
        None => (rest, None),
    };
    let mode = mode
        .parse::<DiskMode>()
        .map_err(|_| format!("disk spec {spec:?}: mode must be internal, external or no"))?;
    if target.is_empty() {
        return Err(format!("disk spec {spec:?} names no target"));
    }
    Ok(DiskRequest {
        target: target.to_string(),
        mode,
        file,
    })
}

impl DomainIface {
    async fn run_create(
        &self,
        req: CreateRequest,
        opts: &Options,
        header: &Header<'_>,
        server: &ObjectServer,
        emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, Error> {
        let is_async = opts.bool(option::ASYNC)?.unwrap_or(false);
        let (origin, protected) = super::retention::create_extras(opts)?;
        let branch_from = match opts.string(option::PARENT)? {
            Some(p) => {
                let info = self.handle.info();
                let id = info
                    .snapshots
                    .values()
                    .find(|s| s.name == p)
                    .map(|s| s.id)
                    .ok_or_else(|| {
                        wire_error(crate::error::ServiceError::NoSuchSnapshot {
                            domain: info.def.name.clone(),
                            name: p,
                        })
                    })?;
                Some(id)
            }
            None => None,
        };
        let guard = self
            .handle
            .begin_operation("the snapshot")
            .map_err(wire_error)?;
        let job = self
            .service
            .jobs
            .create("create-snapshot", self.handle.id().0, &caller(header));
        auth::record_owner(&job, header).await;
        let handle = self.handle.clone();
        let j = job.clone();
        let emitter = emitter.into_owned();
        let (path, rx) = run_job(server, &self.service, job, async move {
            let _guard = guard;
            if let Some(parent) = branch_from {
                // The RFC's option 2a: branch from an existing snapshot in one step.
                j.set_phase("revert");
                handle.revert(parent, None, true).await?;
            }
            let id = handle.create_snapshot(req, origin, j).await?;
            if protected {
                // Still under the operation slot, so no prune can see it unprotected.
                handle.set_protected(id, true).await?;
            }
            // Served from the published record already; the forwarder announces it once.
            let p = obj(snapshot_path(handle.id().0, id.0));
            let _ = DomainIface::snapshot_created(&emitter, p.as_ref()).await;
            Ok(p)
        })
        .await?;
        if is_async {
            return Ok(path);
        }
        rx.await
            .map_err(|_| Error::Failed("the snapshot job ended without a result".into()))?
    }
}

/// Serves a domain's object and starts the task that announces its property changes.
pub async fn register_domain(
    server: &ObjectServer,
    service: &Arc<Service>,
    handle: DomainHandle,
) -> zbus::Result<OwnedObjectPath> {
    let path = obj(domain_path(handle.id().0));
    let mut watch = handle.watch();
    super::object_manager::add(
        server,
        path.as_str(),
        DomainIface {
            service: service.clone(),
            handle: handle.clone(),
        },
    )
    .await?;
    let mut last = watch.borrow_and_update().clone();
    let mut seen: Option<SnapshotsSeen> =
        Some(sync_seen(server, service, &handle, None, &last).await);
    // `last` keeps what the domain's own properties compare with; the snapshots are compared
    // through `seen`, and holding the map here would make every change copy all records.
    last.snapshots = Arc::default();
    let server = server.clone();
    let service = service.clone();
    let p = path.clone();
    tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            let mut now = watch.borrow_and_update().clone();
            let Ok(iface) = server.interface::<_, DomainIface>(p.as_ref()).await else {
                break;
            };
            let mut names = Vec::new();
            for (changed, name) in [
                (last.state != now.state, "State"),
                (
                    last.current_snapshot != now.current_snapshot,
                    "CurrentSnapshot",
                ),
                (disk_rows(&last) != disk_rows(&now), "Disks"),
                (last.def.name != now.def.name, "Name"),
            ] {
                if changed {
                    names.push(name);
                }
            }
            let i = iface.get().await;
            super::dispatch::properties_changed(&server, &*i, p.as_str(), &names).await;
            drop(i);
            seen = Some(sync_seen(&server, &service, &handle, seen.take(), &now).await);
            now.snapshots = Arc::default();
            last = now;
        }
    });
    Ok(path)
}
