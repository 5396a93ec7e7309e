//! `org.vmsnap.VmSnap1.Snapshot` objects, one per snapshot record, kept in step with the
//! domain's snapshot map.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmsnap_dbus::names::option;
use zbus::OwnedVariant;
use zbus::message::Header;

use super::auth::{self, Action, authorize};
use super::job::run_job;
use super::options::Options;
use super::wire_error;
use crate::service::Service;

use vmsnap_dbus::Error;
use vmsnap_dbus::names::{NO_OBJECT, domain_path, snapshot_path};
use zbus::{ObjectServer, OwnedObjectPath, interface};

use crate::catalog::{SnapshotId, SnapshotRecord};
use crate::domain::actor::{DomainHandle, DomainInfo};
use crate::snapshot::record;

/// How long a computed `SizeOnDisk` is reused, so that a front end listing many snapshots
/// (or `GetManagedObjects`) does not stat the same files again and again.
const SIZE_CACHE_TTL: Duration = Duration::from_secs(5);

/// The D-Bus face of a snapshot.
pub struct SnapshotIface {
    service: Arc<Service>,
    handle: DomainHandle,
    id: SnapshotId,
    /// The last `SizeOnDisk` answer and when it was computed.
    size_cache: Mutex<Option<(Instant, u64)>>,
}

fn obj(s: String) -> OwnedObjectPath {
    OwnedObjectPath::try_from(s).expect("object paths are built from numeric ids")
}

impl SnapshotIface {
    fn record(&self) -> Option<SnapshotRecord> {
        self.handle.info().snapshots.get(&self.id).cloned()
    }

    fn field<T: Default>(&self, f: impl FnOnce(&SnapshotRecord) -> T) -> T {
        self.record().as_ref().map(f).unwrap_or_default()
    }
}

/// The children of `id` in `info`, in id order.
fn children(info: &DomainInfo, id: SnapshotId) -> Vec<SnapshotId> {
    info.snapshots
        .values()
        .filter(|s| s.parent == Some(id))
        .map(|s| s.id)
        .collect()
}

#[interface(name = "org.vmsnap.VmSnap1.Snapshot")]
impl SnapshotIface {
    /// Reverts the domain to this snapshot (a job). Options: `running` (b) or `paused` (b) to
    /// choose the state to end in instead of the snapshot's, `delete-children` (b: delete the
    /// snapshot's descendants first instead of branching), `force` (b: allowed to replace a
    /// running guest whose disks or hardware changed since the snapshot), `async` (b). Internal
    /// snapshots revert in place when the configuration is unchanged; external ones get new
    /// overlays on the snapshot's images (a branch), so the snapshot and its children stay
    /// valid. Returns this snapshot's path, or the job's with `async`.
    async fn revert(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(&header, Action::Revert).await?;
        let opts = Options::parse(
            "Revert",
            options,
            &[
                option::RUNNING,
                option::PAUSED,
                option::DELETE_CHILDREN,
                option::FORCE,
                option::ASYNC,
            ],
        )?;
        let delete_children = opts.bool(option::DELETE_CHILDREN)?.unwrap_or(false);
        let force = opts.bool(option::FORCE)?.unwrap_or(false);
        let running = match (opts.bool(option::RUNNING)?, opts.bool(option::PAUSED)?) {
            (Some(true), Some(true)) => {
                return Err(Error::InvalidArgument(
                    "options running and paused exclude each other".into(),
                ));
            }
            (Some(true), _) => Some(true),
            (_, Some(true)) => Some(false),
            _ => None,
        };
        let is_async = opts.bool(option::ASYNC)?.unwrap_or(false);
        let guard = self
            .handle
            .begin_operation("the revert")
            .map_err(wire_error)?;
        let job = self
            .service
            .jobs
            .create("revert", self.handle.id().0, &caller(&header));
        auth::record_owner(&job, &header).await;
        let j = job.clone();
        let handle = self.handle.clone();
        let id = self.id;
        let server2 = server.clone();
        let service = self.service.clone();
        let (path, rx) = run_job(server, &self.service, job, async move {
            let _guard = guard;
            if delete_children {
                // The RFC's alternative to branching: the target's descendants go first.
                for child in descendants_post_order(&handle.info(), id) {
                    let before = handle.info();
                    handle
                        .delete_snapshot(child, false, Some(j.clone()))
                        .await?;
                    sync_snapshots(&server2, &service, &handle, Some(&before), &handle.info())
                        .await;
                }
            }
            handle.revert(id, running, force).await?;
            let p = obj(snapshot_path(handle.id().0, id.0));
            if let Ok(iface) = server2
                .interface::<_, super::domain::DomainIface>(domain_path(handle.id().0).as_str())
                .await
            {
                let _ =
                    super::domain::DomainIface::reverted(iface.signal_emitter(), p.as_ref()).await;
            }
            Ok(p)
        })
        .await?;
        if is_async {
            return Ok(path);
        }
        rx.await
            .map_err(|_| Error::Failed("the revert job ended without a result".into()))?
    }

    /// Deletes this snapshot (a job). Options: `metadata-only` (b: forget the record, keep every
    /// file), `children` (b: the whole subtree), `children-only` (b: the subtree below this
    /// snapshot, keeping it), `async` (b). Children are re-parented to this snapshot's parent;
    /// when this was current, its parent becomes current. Data every remaining snapshot needs
    /// is merged, never lost; shapes that cannot be merged now are refused before any change.
    async fn delete(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(&header, Action::Delete).await?;
        let opts = Options::parse(
            "Delete",
            options,
            &[
                option::METADATA_ONLY,
                option::CHILDREN,
                option::CHILDREN_ONLY,
                option::ASYNC,
            ],
        )?;
        let metadata_only = opts.bool(option::METADATA_ONLY)?.unwrap_or(false);
        let children = opts.bool(option::CHILDREN)?.unwrap_or(false);
        let children_only = opts.bool(option::CHILDREN_ONLY)?.unwrap_or(false);
        if children && children_only {
            return Err(Error::InvalidArgument(
                "options children and children-only exclude each other".into(),
            ));
        }
        let is_async = opts.bool(option::ASYNC)?.unwrap_or(false);
        let guard = self
            .handle
            .begin_operation("the delete")
            .map_err(wire_error)?;
        let job = self
            .service
            .jobs
            .create("delete-snapshot", self.handle.id().0, &caller(&header));
        auth::record_owner(&job, &header).await;
        let j = job.clone();
        let handle = self.handle.clone();
        let id = self.id;
        let server2 = server.clone();
        let service = self.service.clone();
        let (path, rx) = run_job(server, &self.service, job, async move {
            let _guard = guard;
            let mut victims = Vec::new();
            if children || children_only {
                victims = descendants_post_order(&handle.info(), id);
            }
            if !children_only {
                victims.push(id);
            }
            for victim in victims {
                let before = handle.info();
                handle
                    .delete_snapshot(victim, metadata_only, Some(j.clone()))
                    .await?;
                let now = handle.info();
                sync_snapshots(&server2, &service, &handle, Some(&before), &now).await;
            }
            let p = obj(snapshot_path(handle.id().0, id.0));
            if let Ok(iface) = server2
                .interface::<_, super::domain::DomainIface>(domain_path(handle.id().0).as_str())
                .await
            {
                let _ = super::domain::DomainIface::snapshot_deleted(
                    iface.signal_emitter(),
                    p.as_ref(),
                )
                .await;
            }
            Ok(())
        })
        .await?;
        if is_async {
            return Ok(path);
        }
        rx.await
            .map_err(|_| Error::Failed("the delete job ended without a result".into()))??;
        Ok(obj(NO_OBJECT.to_string()))
    }

    /// The snapshot as libvirt `<domainsnapshot>` XML, as `virsh snapshot-dumpxml` shows it:
    /// the domain's definition at the time embedded, and every part of a redefined document
    /// that vmsnap keeps without acting on it (`domain`, `inactiveDomain`, `cookie`, …).
    async fn get_xml(&self) -> Result<String, Error> {
        let info = self.handle.info();
        let rec = info
            .snapshots
            .get(&self.id)
            .ok_or_else(|| Error::NoSuchSnapshot(format!("snapshot {} is gone", self.id)))?;
        let parent = rec
            .parent
            .and_then(|p| info.snapshots.get(&p))
            .map(|p| p.name.as_str());
        let parts = self
            .service
            .snapshot_xml_parts(self.id)
            .map_err(wire_error)?;
        Ok(record::to_xml(rec, parent, &parts))
    }

    /// The snapshot's name, unique within its domain.
    #[zbus(property)]
    async fn name(&self) -> String {
        self.field(|r| r.name.clone())
    }

    /// Free text given at creation.
    #[zbus(property)]
    async fn description(&self) -> String {
        self.field(|r| r.description.clone())
    }

    /// Creation time, seconds since the Unix epoch.
    #[zbus(property)]
    async fn creation_time(&self) -> u64 {
        self.field(|r| u64::try_from(r.created_at).unwrap_or(0))
    }

    /// The domain's state it captured: `running`, `paused`, `shutoff` or `disk-snapshot`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.field(|r| r.state.clone())
    }

    /// `checkpoint` (disks and, when it ran, VM state) or `disk-only`.
    #[zbus(property)]
    async fn kind(&self) -> String {
        self.field(|r| r.kind.clone())
    }

    /// The VM state: (mode `none`|`internal`|`external`, file or disk holding it).
    #[zbus(property)]
    async fn memory(&self) -> (String, String) {
        self.field(|r| {
            let m = record::memory(r);
            let place = match (&m.file, &m.vmstate_disk) {
                (Some(f), _) => f.display().to_string(),
                (None, Some(d)) => d.clone(),
                (None, None) => String::new(),
            };
            (m.mode, place)
        })
    }

    /// Per disk: (target, mode `no`|`internal`|`external`, file holding the snapshot's data,
    /// overlay created on top or empty).
    #[zbus(property)]
    async fn disks(&self) -> Vec<(String, String, String, String)> {
        self.field(|r| {
            record::disks(r)
                .into_iter()
                .map(|d| {
                    let data = d.data_file().display().to_string();
                    let overlay = d
                        .overlay
                        .map(|o| o.display().to_string())
                        .unwrap_or_default();
                    (d.target, d.mode, data, overlay)
                })
                .collect()
        })
    }

    /// `committed`, or `broken` when its files no longer hold what it needs.
    #[zbus(property)]
    async fn status(&self) -> String {
        self.field(|r| r.status.as_str().to_string())
    }

    /// The domain it belongs to.
    #[zbus(property)]
    async fn domain(&self) -> OwnedObjectPath {
        obj(domain_path(self.handle.id().0))
    }

    /// The parent snapshot, or `/` for a root.
    #[zbus(property)]
    async fn parent(&self) -> OwnedObjectPath {
        let d = self.handle.id().0;
        match self.field(|r| r.parent.map(|p| p.0)) {
            Some(p) => obj(snapshot_path(d, p)),
            None => obj(NO_OBJECT.to_string()),
        }
    }

    /// The child snapshots.
    #[zbus(property)]
    async fn children(&self) -> Vec<OwnedObjectPath> {
        let info = self.handle.info();
        children(&info, self.id)
            .into_iter()
            .map(|c| obj(snapshot_path(info.id.0, c.0)))
            .collect()
    }

    /// Bytes allocated on the host for the files this snapshot added: its external VM-state
    /// file and the overlays created on its external disks (which grow with what the guest
    /// writes after the snapshot). 0 for internal snapshots, whose data shares the disk
    /// images. Computed from file sizes when read (reused for 5 s); not announced by
    /// `PropertiesChanged` since it changes with every guest write.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn size_on_disk(&self) -> u64 {
        let mut cache = self.size_cache.lock().expect("size cache poisoned");
        if let Some((at, size)) = *cache
            && at.elapsed() < SIZE_CACHE_TTL
        {
            return size;
        }
        let size = self.field(record::size_on_disk);
        *cache = Some((Instant::now(), size));
        size
    }

    /// Whether this is the domain's current snapshot (the parent of the next one).
    #[zbus(property)]
    async fn is_current(&self) -> bool {
        self.handle.info().current_snapshot == Some(self.id)
    }

    /// Whether `Domain.Prune` must leave this snapshot alone. Writable with
    /// `org.freedesktop.DBus.Properties.Set`; persisted in the catalog.
    #[zbus(property)]
    async fn protected(&self) -> bool {
        self.field(|r| r.protected)
    }

    // The setter of `Protected` (its documentation is the getter's).
    #[zbus(property)]
    async fn set_protected(
        &self,
        value: bool,
        #[zbus(header)] header: Option<Header<'_>>,
    ) -> Result<(), Error> {
        // zbus passes no header when the daemon itself sets the property: nobody to ask.
        let header = header.ok_or_else(|| {
            Error::NotAuthorized("setting Protected needs a caller to authorize".into())
        })?;
        authorize(&header, Action::Manage).await?;
        super::retention::set_protected(&self.handle, self.id, value).await
    }

    /// Who asked for the snapshot: `manual` (a user) or `schedule` (a scheduled run), or
    /// another word a caller chose.
    #[zbus(property)]
    async fn origin(&self) -> String {
        self.field(|r| r.origin.clone())
    }
}

/// Brings the served snapshot objects of a domain in line with `now`, announcing the
/// properties that changed since `last`.
pub async fn sync_snapshots(
    server: &ObjectServer,
    service: &Arc<Service>,
    handle: &DomainHandle,
    last: Option<&DomainInfo>,
    now: &DomainInfo,
) {
    let d = now.id.0;
    let before: BTreeSet<SnapshotId> = last
        .map(|l| l.snapshots.keys().copied().collect())
        .unwrap_or_default();
    let after: BTreeSet<SnapshotId> = now.snapshots.keys().copied().collect();
    for gone in before.difference(&after) {
        let _ = server
            .remove::<SnapshotIface, _>(snapshot_path(d, gone.0).as_str())
            .await;
    }
    for new in &after {
        let path = snapshot_path(d, new.0);
        if server
            .interface::<_, SnapshotIface>(path.as_str())
            .await
            .is_err()
            && let Err(e) = server
                .at(
                    path.as_str(),
                    SnapshotIface {
                        service: service.clone(),
                        handle: handle.clone(),
                        id: *new,
                        size_cache: Mutex::new(None),
                    },
                )
                .await
        {
            tracing::warn!(path, error = %e, "could not serve a snapshot object");
        }
    }
    let Some(last) = last else { return };
    for id in before.intersection(&after) {
        let (old, new) = (&last.snapshots[id], &now.snapshots[id]);
        let was_current = last.current_snapshot == Some(*id);
        let is_current = now.current_snapshot == Some(*id);
        let children_changed = children(last, *id) != children(now, *id);
        if old == new && was_current == is_current && !children_changed {
            continue;
        }
        let Ok(iface) = server
            .interface::<_, SnapshotIface>(snapshot_path(d, id.0).as_str())
            .await
        else {
            continue;
        };
        let e = iface.signal_emitter();
        let i = iface.get().await;
        // A failed emission only means nobody was told; the properties stay right.
        if was_current != is_current {
            let _ = i.is_current_changed(e).await;
        }
        if children_changed {
            let _ = i.children_changed(e).await;
        }
        if old.parent != new.parent {
            let _ = i.parent_changed(e).await;
        }
        if old.description != new.description {
            let _ = i.description_changed(e).await;
        }
        if old.disks != new.disks {
            let _ = i.disks_changed(e).await;
        }
        if old.status != new.status {
            let _ = i.status_changed(e).await;
        }
    }
}

/// The descendants of `id`, children after their own children (leaves first).
fn descendants_post_order(info: &DomainInfo, id: SnapshotId) -> Vec<SnapshotId> {
    let mut out = Vec::new();
    for c in children(info, id) {
        out.extend(descendants_post_order(info, c));
        out.push(c);
    }
    out
}

fn caller(header: &Header<'_>) -> String {
    header.sender().map(|s| s.to_string()).unwrap_or_default()
}
