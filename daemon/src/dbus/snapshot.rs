//! `org.vmsnap.VmSnap1.Snapshot` objects, one per snapshot record, kept in step with the
//! domain's snapshot map.
//!
//! The objects hold no copy of their record: every property reads the domain's shared
//! information in place (`DomainHandle::with_info`), and `Children` comes from the domain's
//! children index, so reading all properties of all n objects (as `GetManagedObjects` and the
//! `InterfacesAdded` signals do) costs O(n), not O(n²). Announcing changes compares a
//! [`SnapshotsSeen`] summary with the new map, so no old version of the map is kept alive
//! (which would make every change copy all records).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Weak};
use std::time::Duration;

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

use super::dispatch::{SizeCache, bus_emitter, properties_changed};
use crate::catalog::{SnapshotId, SnapshotRecord, SnapshotStatus};
use crate::domain::actor::{DomainHandle, DomainInfo, children_index};
use crate::snapshot::record;

/// How long a computed `SizeOnDisk` is reused, so that a front end reading many snapshots
/// does not stat the same files again and again.
pub(super) const SIZE_CACHE_TTL: Duration = Duration::from_secs(5);

/// The D-Bus face of a snapshot, made for one call or announcement (see `dispatch`): it
/// reads the domain's published information, so it is never out of date.
pub struct SnapshotIface {
    service: Arc<Service>,
    handle: DomainHandle,
    id: SnapshotId,
    /// `SizeOnDisk` answers of all snapshot objects.
    sizes: Arc<SizeCache>,
}

fn obj(s: String) -> OwnedObjectPath {
    OwnedObjectPath::try_from(s).expect("object paths are built from numeric ids")
}

impl SnapshotIface {
    /// The object of snapshot `id` of `handle`'s domain.
    pub fn new(
        service: Arc<Service>,
        handle: DomainHandle,
        id: SnapshotId,
        sizes: Arc<SizeCache>,
    ) -> Self {
        Self {
            service,
            handle,
            id,
            sizes,
        }
    }

    /// `f` of the record, read in place; the default when the record is gone.
    fn field<T: Default>(&self, f: impl FnOnce(&SnapshotRecord) -> T) -> T {
        self.handle
            .with_info(|i| i.snapshots.get(&self.id).map(f))
            .unwrap_or_default()
    }
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
                    let before = SnapshotsSeen::of(&handle.info());
                    handle
                        .delete_snapshot(child, false, Some(j.clone()))
                        .await?;
                    sync_seen(&server2, &service, &handle, Some(before), &handle.info()).await;
                }
            }
            handle.revert(id, running, force).await?;
            let p = obj(snapshot_path(handle.id().0, id.0));
            if let Some(e) = bus_emitter(&domain_path(handle.id().0)) {
                let _ = super::domain::DomainIface::reverted(&e, p.as_ref()).await;
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
                // A summary, not a copy of the information: a copy would share the snapshot
                // map and make the actor's change copy every record.
                let before = SnapshotsSeen::of(&handle.info());
                handle
                    .delete_snapshot(victim, metadata_only, Some(j.clone()))
                    .await?;
                sync_seen(&server2, &service, &handle, Some(before), &handle.info()).await;
            }
            let p = obj(snapshot_path(handle.id().0, id.0));
            if let Some(e) = bus_emitter(&domain_path(handle.id().0)) {
                let _ = super::domain::DomainIface::snapshot_deleted(&e, p.as_ref()).await;
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
        let parts = self
            .service
            .snapshot_xml_parts(self.id)
            .map_err(wire_error)?;
        self.handle.with_info(|info| {
            let rec = info
                .snapshots
                .get(&self.id)
                .ok_or_else(|| Error::NoSuchSnapshot(format!("snapshot {} is gone", self.id)))?;
            let parent = rec
                .parent
                .and_then(|p| info.snapshots.get(&p))
                .map(|p| p.name.as_str());
            Ok(record::to_xml(rec, parent, &parts))
        })
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
        self.field(creation_time_value)
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
        self.field(memory_value)
    }

    /// Per disk: (target, mode `no`|`internal`|`external`, file holding the snapshot's data,
    /// overlay created on top or empty).
    #[zbus(property)]
    async fn disks(&self) -> Vec<(String, String, String, String)> {
        self.field(disks_value)
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
        parent_value(d, self.field(|r| r.parent))
    }

    /// The child snapshots.
    #[zbus(property)]
    async fn children(&self) -> Vec<OwnedObjectPath> {
        children_value(self.handle.id().0, &self.handle.children_of(self.id))
    }

    /// Bytes allocated on the host for the files this snapshot added: its external VM-state
    /// file and the overlays created on its external disks (which grow with what the guest
    /// writes after the snapshot). 0 for internal snapshots, whose data shares the disk
    /// images. Computed from file sizes when read (reused for 5 s); not announced by
    /// `PropertiesChanged` since it changes with every guest write.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn size_on_disk(&self) -> u64 {
        self.sizes.get_or((self.handle.id(), self.id), || {
            self.field(record::size_on_disk)
        })
    }

    /// Whether this is the domain's current snapshot (the parent of the next one).
    #[zbus(property)]
    async fn is_current(&self) -> bool {
        self.handle
            .with_info(|i| i.current_snapshot == Some(self.id))
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

/// The `CreationTime` property of a record.
fn creation_time_value(r: &SnapshotRecord) -> u64 {
    u64::try_from(r.created_at).unwrap_or(0)
}

/// The `Memory` property of a record.
fn memory_value(r: &SnapshotRecord) -> (String, String) {
    memory_value_of(&record::memory(r))
}

/// The `Memory` property from a record's VM-state part.
fn memory_value_of(m: &record::MemoryRecord) -> (String, String) {
    let place = match (&m.file, &m.vmstate_disk) {
        (Some(f), _) => f.display().to_string(),
        (None, Some(d)) => d.clone(),
        (None, None) => String::new(),
    };
    (m.mode.clone(), place)
}

/// The `Disks` property of a record.
fn disks_value(r: &SnapshotRecord) -> Vec<(String, String, String, String)> {
    disks_value_of(&record::disks(r))
}

/// The `Disks` property from a record's disk parts.
fn disks_value_of(disks: &[record::DiskRecord]) -> Vec<(String, String, String, String)> {
    disks
        .iter()
        .map(|d| {
            let data = d.data_file().display().to_string();
            let overlay = d
                .overlay
                .as_ref()
                .map(|o| o.display().to_string())
                .unwrap_or_default();
            (d.target.clone(), d.mode.clone(), data, overlay)
        })
        .collect()
}

/// The `Parent` property of a snapshot of domain `domain`.
fn parent_value(domain: i64, parent: Option<SnapshotId>) -> OwnedObjectPath {
    match parent {
        Some(p) => obj(snapshot_path(domain, p.0)),
        None => obj(NO_OBJECT.to_string()),
    }
}

/// The `Children` property of a snapshot of domain `domain`.
fn children_value(domain: i64, children: &[SnapshotId]) -> Vec<OwnedObjectPath> {
    children
        .iter()
        .map(|c| obj(snapshot_path(domain, c.0)))
        .collect()
}

/// Every property of a snapshot object as `Properties.GetAll` returns it (`a{sv}`), written
/// straight from the record for `GetManagedObjects`; each value comes from the function its
/// getter uses, so the two cannot disagree. The record's JSON parts are read once for the
/// three properties made from them.
pub(super) struct SnapshotProps<'a> {
    /// The domain's information the record belongs to.
    pub info: &'a DomainInfo,
    /// The snapshot.
    pub rec: &'a SnapshotRecord,
    /// Its children, in id order.
    pub children: &'a [SnapshotId],
}

impl serde::Serialize for SnapshotProps<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        use zbus::as_variant::Serialize as V;
        let r = self.rec;
        let d = self.info.id.0;
        let memory = record::memory(r);
        let disks = record::disks(r);
        let mut m = s.serialize_map(Some(15))?;
        m.serialize_entry("Name", &V(&r.name))?;
        m.serialize_entry("Description", &V(&r.description))?;
        m.serialize_entry("CreationTime", &V(&creation_time_value(r)))?;
        m.serialize_entry("State", &V(&r.state))?;
        m.serialize_entry("Kind", &V(&r.kind))?;
        m.serialize_entry("Memory", &V(&memory_value_of(&memory)))?;
        m.serialize_entry("Disks", &V(&disks_value_of(&disks)))?;
        m.serialize_entry("Status", &V(&r.status.as_str()))?;
        m.serialize_entry("Domain", &V(&obj(domain_path(d))))?;
        m.serialize_entry("Parent", &V(&parent_value(d, r.parent)))?;
        m.serialize_entry("Children", &V(&children_value(d, self.children)))?;
        let size = record::size_on_disk_of(&memory, &disks);
        m.serialize_entry("SizeOnDisk", &V(&size))?;
        m.serialize_entry("IsCurrent", &V(&(self.info.current_snapshot == Some(r.id))))?;
        m.serialize_entry("Protected", &V(&r.protected))?;
        m.serialize_entry("Origin", &V(&r.origin))?;
        m.end()
    }
}

/// What the change announcements compare the next version of a domain's snapshot map with:
/// per snapshot the fields with a property that announces its changes (long texts as hashes),
/// its children and whether it is current, plus the version of the map it was taken from.
pub struct SnapshotsSeen {
    source: Weak<BTreeMap<SnapshotId, SnapshotRecord>>,
    current: Option<SnapshotId>,
    entries: BTreeMap<SnapshotId, Seen>,
    children: HashMap<SnapshotId, Vec<SnapshotId>>,
}

/// One snapshot as [`SnapshotsSeen`] remembers it.
#[derive(PartialEq)]
struct Seen {
    parent: Option<SnapshotId>,
    status: SnapshotStatus,
    protected: bool,
    description: u64,
    disks: u64,
    origin: u64,
}

impl Seen {
    fn of(r: &SnapshotRecord) -> Self {
        Self {
            parent: r.parent,
            status: r.status,
            protected: r.protected,
            description: hash_of(|h| r.description.hash(h)),
            disks: hash_of(|h| r.disks.hash(h)),
            origin: hash_of(|h| r.origin.hash(h)),
        }
    }
}

impl SnapshotsSeen {
    /// The summary of `info`'s snapshots.
    pub fn of(info: &DomainInfo) -> Self {
        Self {
            source: Arc::downgrade(&info.snapshots),
            current: info.current_snapshot,
            entries: info
                .snapshots
                .iter()
                .map(|(id, r)| (*id, Seen::of(r)))
                .collect(),
            children: children_index(&info.snapshots),
        }
    }

    /// Whether `info` holds the very map this summary was taken from.
    fn same_map(&self, info: &DomainInfo) -> bool {
        std::ptr::eq(self.source.as_ptr(), Arc::as_ptr(&info.snapshots))
    }
}

fn hash_of(f: impl FnOnce(&mut std::collections::hash_map::DefaultHasher)) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    f(&mut h);
    h.finish()
}

/// Brings the served snapshot objects of a domain in line with `now`, announcing the
/// properties that changed since `last`. For callers holding two versions of the information;
/// the daemon's own callers keep a [`SnapshotsSeen`] instead (see [`sync_seen`]).
#[allow(dead_code)]
pub async fn sync_snapshots(
    server: &ObjectServer,
    service: &Arc<Service>,
    handle: &DomainHandle,
    last: Option<&DomainInfo>,
    now: &DomainInfo,
) {
    let last = last.map(SnapshotsSeen::of);
    sync_seen(server, service, handle, last, now).await;
}

/// A short-lived object of snapshot `id`, for announcing its properties.
fn transient(service: &Arc<Service>, handle: &DomainHandle, id: SnapshotId) -> SnapshotIface {
    SnapshotIface::new(
        service.clone(),
        handle.clone(),
        id,
        Arc::new(SizeCache::default()),
    )
}

/// Announces the object of snapshot `id` (served from the domain's information as soon as the
/// record is published; see `dispatch`).
pub async fn announce_snapshot(
    server: &ObjectServer,
    service: &Arc<Service>,
    handle: &DomainHandle,
    id: SnapshotId,
) {
    let path = snapshot_path(handle.id().0, id.0);
    let iface = transient(service, handle, id);
    super::object_manager::announce_added(server, &path, &iface).await;
}

/// [`sync_snapshots`] from a summary: serves the new objects, removes the gone ones and
/// announces the changed properties of the others; returns the summary of `now` for the next
/// call. Costs O(n) per call, and O(1) objects touched when one snapshot changed.
pub async fn sync_seen(
    server: &ObjectServer,
    service: &Arc<Service>,
    handle: &DomainHandle,
    last: Option<SnapshotsSeen>,
    now: &DomainInfo,
) -> SnapshotsSeen {
    let d = now.id.0;
    let mut last = last;
    if let Some(mut last) = last.take_if(|l| l.same_map(now)) {
        // No record changed; only "current" may have moved.
        if last.current != now.current_snapshot {
            for id in [last.current, now.current_snapshot].into_iter().flatten() {
                let i = transient(service, handle, id);
                properties_changed(server, &i, &snapshot_path(d, id.0), &["IsCurrent"]).await;
            }
            last.current = now.current_snapshot;
        }
        return last;
    }
    let seen = SnapshotsSeen::of(now);
    let empty = BTreeMap::new();
    let before = last.as_ref().map_or(&empty, |l| &l.entries);
    for gone in before.keys().filter(|id| !seen.entries.contains_key(id)) {
        super::object_manager::announce_removed::<SnapshotIface>(server, &snapshot_path(d, gone.0))
            .await;
    }
    for new in seen.entries.keys().filter(|id| !before.contains_key(id)) {
        announce_snapshot(server, service, handle, *new).await;
    }
    let Some(last) = last else { return seen };
    let no_children = Vec::new();
    for (id, new) in &seen.entries {
        let Some(old) = last.entries.get(id) else {
            continue;
        };
        let was_current = last.current == Some(*id);
        let is_current = now.current_snapshot == Some(*id);
        let children_changed = last.children.get(id).unwrap_or(&no_children)
            != seen.children.get(id).unwrap_or(&no_children);
        if old == new && was_current == is_current && !children_changed {
            continue;
        }
        let mut names = Vec::new();
        for (changed, name) in [
            (was_current != is_current, "IsCurrent"),
            (children_changed, "Children"),
            (old.parent != new.parent, "Parent"),
            (old.description != new.description, "Description"),
            (old.disks != new.disks, "Disks"),
            (old.status != new.status, "Status"),
            (old.protected != new.protected, "Protected"),
            (old.origin != new.origin, "Origin"),
        ] {
            if changed {
                names.push(name);
            }
        }
        let i = transient(service, handle, *id);
        properties_changed(server, &i, &snapshot_path(d, id.0), &names).await;
    }
    seen
}

/// The descendants of `id`, children after their own children (leaves first).
fn descendants_post_order(info: &DomainInfo, id: SnapshotId) -> Vec<SnapshotId> {
    fn walk(
        index: &HashMap<SnapshotId, Vec<SnapshotId>>,
        id: SnapshotId,
        out: &mut Vec<SnapshotId>,
    ) {
        for &c in index.get(&id).map_or(&[][..], Vec::as_slice) {
            walk(index, c, out);
            out.push(c);
        }
    }
    let mut out = Vec::new();
    walk(&children_index(&info.snapshots), id, &mut out);
    out
}

fn caller(header: &Header<'_>) -> String {
    header.sender().map(|s| s.to_string()).unwrap_or_default()
}
