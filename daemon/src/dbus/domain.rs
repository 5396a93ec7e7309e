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

use super::job::run_job;
use super::options::Options;
use super::snapshot::{SnapshotsSeen, serve_snapshot, sync_seen};
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
    async fn start(&self, options: HashMap<String, OwnedVariant>) -> Result<(), Error> {
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
    async fn destroy(&self, options: HashMap<String, OwnedVariant>) -> Result<(), Error> {
        Options::parse("Destroy", options, &[])?;
        self.handle.destroy().await.map_err(wire_error)
    }

    /// Pauses the guest's vCPUs.
    async fn pause(&self, options: HashMap<String, OwnedVariant>) -> Result<(), Error> {
        Options::parse("Pause", options, &[])?;
        self.handle.pause().await.map_err(wire_error)
    }

    /// Resumes the guest's vCPUs.
    async fn resume(&self, options: HashMap<String, OwnedVariant>) -> Result<(), Error> {
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
    ) -> Result<(), Error> {
        let opts = Options::parse("AttachDisk", options, &[option::CONFIG_ONLY])?;
        let config_only = opts.bool(option::CONFIG_ONLY)?.unwrap_or(false);
        let disk = DiskDef::from_xml(&xml)
            .map_err(|e| Error::InvalidArgument(format!("invalid disk: {e}")))?;
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
    ) -> Result<(), Error> {
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
    /// a branch from it), `async` (b).
    async fn create_snapshot(
        &self,
        name: String,
        description: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, Error> {
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

    /// Passes a command to the guest's QEMU monitor, like libvirt's `qemu-monitor-command`:
    /// a QMP command as JSON, or with option `hmp` (b) a human monitor command line. Returns
    /// QEMU's answer. For diagnostics; changes made this way are not tracked.
    async fn monitor_command(
        &self,
        command: String,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<String, Error> {
        let opts = Options::parse("MonitorCommand", options, &[option::HMP])?;
        let hmp = opts.bool(option::HMP)?.unwrap_or(false);
        self.handle.monitor(command, hmp).await.map_err(wire_error)
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
];

/// Reads the creation options into a request (name and description are set by the caller).
fn create_request(opts: &Options) -> Result<CreateRequest, Error> {
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
        let handle = self.handle.clone();
        let j = job.clone();
        let server2 = server.clone();
        let service = self.service.clone();
        let emitter = emitter.into_owned();
        let (path, rx) = run_job(server, &self.service, job, async move {
            let _guard = guard;
            if let Some(parent) = branch_from {
                // The RFC's option 2a: branch from an existing snapshot in one step.
                j.set_phase("revert");
                handle.revert(parent, None, true).await?;
            }
            let id = handle.create_snapshot(req, "manual".to_string(), j).await?;
            // Serve the new object before anyone hears of it.
            serve_snapshot(&server2, &service, &handle, id).await;
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
    server
        .at(
            path.as_ref(),
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
            let e = iface.signal_emitter();
            let i = iface.get().await;
            // A failed emission only means nobody was told; the properties stay right.
            if last.state != now.state {
                let _ = i.state_changed(e).await;
            }
            if last.current_snapshot != now.current_snapshot {
                let _ = i.current_snapshot_changed(e).await;
            }
            if disk_rows(&last) != disk_rows(&now) {
                let _ = i.disks_changed(e).await;
            }
            if last.def.name != now.def.name {
                let _ = i.name_changed(e).await;
            }
            drop(i);
            seen = Some(sync_seen(&server, &service, &handle, seen.take(), &now).await);
            now.snapshots = Arc::default();
            last = now;
        }
    });
    Ok(path)
}
