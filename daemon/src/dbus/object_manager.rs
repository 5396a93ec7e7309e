//! `org.freedesktop.DBus.ObjectManager` at the root: ours, not zbus's.
//!
//! zbus's own object manager reads every property of every object it manages, through each
//! object's `Properties` machinery, to build `GetManagedObjects`, and announces every object
//! registered under it with an `InterfacesAdded` signal, also while the daemon starts (before
//! anyone can listen: the name is taken last). With thousands of snapshot records that work
//! dominated the start and every listing. This one answers `GetManagedObjects` from the
//! domains' published information and serialises the snapshots' properties straight into
//! the reply (no per-object property round trip, no intermediate variants), and announces
//! only what is added or removed after start. zbus's `object-manager` feature is off for the
//! whole workspace, so the object server announces nothing by itself.
//!
//! Invariants:
//! - Every object the adapter serves below the root, other than the root itself, is added and
//!   removed through [`add`] and [`remove`], which emit `InterfacesAdded` (with the object's
//!   properties as `Properties.GetAll` returns them) and `InterfacesRemoved` once the daemon
//!   announces ([`ObjectManagerIface::start_announcing`], right after the name is owned).
//! - `GetManagedObjects` lists each domain, its snapshots and each job with exactly the
//!   properties `Properties.GetAll` returns for it (snapshot properties come from the same
//!   functions the `Snapshot` getters use; domains and jobs, few, are read through zbus). Only
//!   objects with an interface are listed, not the path prefixes between them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::ser::{SerializeMap, Serializer};
use vmsnap_dbus::Error;
use vmsnap_dbus::names::{
    DOMAIN_INTERFACE, JOB_INTERFACE, ROOT_PATH, SNAPSHOT_INTERFACE, domain_path, job_path,
};
use zbus::object_server::{Interface, SignalEmitter};
use zbus::{
    Connection, ObjectPath, ObjectServer, OwnedObjectPath, OwnedVariant, Signature, Type, interface,
};

use super::dispatch::bus_emitter;
use super::domain::DomainIface;
use super::job::JobIface;
use super::snapshot::SnapshotProps;
use crate::catalog::SnapshotId;
use crate::domain::actor::{DomainInfo, children_index};
use crate::service::Service;

/// The root's `org.freedesktop.DBus.ObjectManager`.
pub struct ObjectManagerIface {
    service: Arc<Service>,
    /// Whether objects added or removed are announced: off while the daemon starts.
    announcing: AtomicBool,
}

impl ObjectManagerIface {
    /// Serves `service`; announces nothing until [`Self::start_announcing`].
    pub fn new(service: Arc<Service>) -> Self {
        Self {
            service,
            announcing: AtomicBool::new(false),
        }
    }

    /// From now on, [`add`] and [`remove`] announce the objects.
    pub async fn start_announcing(server: &ObjectServer) {
        if let Ok(iface) = server.interface::<_, Self>(ROOT_PATH).await {
            iface.get().await.announcing.store(true, Ordering::Release);
        }
    }

    /// The signal emitter of the root when objects are announced, `None` before.
    async fn announcer(server: &ObjectServer) -> Option<SignalEmitter<'static>> {
        let iface = server.interface::<_, Self>(ROOT_PATH).await.ok()?;
        let on = iface.get().await.announcing.load(Ordering::Acquire);
        on.then(|| bus_emitter(ROOT_PATH)).flatten()
    }
}

#[interface(name = "org.freedesktop.DBus.ObjectManager")]
impl ObjectManagerIface {
    /// Every object below the root (domains, their snapshots, jobs), each with its interface
    /// and that interface's properties as `org.freedesktop.DBus.Properties.GetAll` returns
    /// them.
    async fn get_managed_objects(
        &self,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<ManagedObjects, Error> {
        let mut domains = Vec::new();
        for handle in self.service.domains() {
            let path = domain_path(handle.id().0);
            // A domain whose object is not (or no longer) served is not listed.
            let Some(props) = props_of::<DomainIface>(server, conn, &path).await? else {
                continue;
            };
            let info = handle.info();
            let children = children_index(&info.snapshots);
            domains.push(DomainEntry {
                path,
                props,
                info,
                children,
            });
        }
        let mut jobs = Vec::new();
        for id in self.service.jobs.ids() {
            let path = job_path(id.0);
            if let Some(props) = props_of::<JobIface>(server, conn, &path).await? {
                jobs.push((path, props));
            }
        }
        Ok(ManagedObjects { domains, jobs })
    }

    /// An object appeared (or gained interfaces): its path, and per interface its properties.
    #[zbus(signal)]
    pub async fn interfaces_added(
        emitter: &SignalEmitter<'_>,
        object_path: ObjectPath<'_>,
        interfaces_and_properties: HashMap<&str, HashMap<String, OwnedVariant>>,
    ) -> zbus::Result<()>;

    /// An object went away (or lost interfaces): its path and the interfaces it lost.
    #[zbus(signal)]
    pub async fn interfaces_removed(
        emitter: &SignalEmitter<'_>,
        object_path: ObjectPath<'_>,
        interfaces: &[&str],
    ) -> zbus::Result<()>;
}

/// All properties of interface `I` at `path` as `Properties.GetAll` gives them, `None` when
/// `I` is not served there.
async fn props_of<I: Interface>(
    server: &ObjectServer,
    conn: &Connection,
    path: &str,
) -> Result<Option<HashMap<String, OwnedVariant>>, Error> {
    let Ok(iface) = server.interface::<_, I>(path).await else {
        return Ok(None);
    };
    let props = all_props(&*iface.get().await, server, conn, path).await?;
    Ok(Some(props))
}

/// All properties of `iface` (an object at `path`) as `Properties.GetAll` gives them.
async fn all_props<I: Interface>(
    iface: &I,
    server: &ObjectServer,
    conn: &Connection,
    path: &str,
) -> Result<HashMap<String, OwnedVariant>, Error> {
    let emitter = SignalEmitter::new(conn, path.to_owned())
        .map_err(|e| Error::Failed(format!("bad object path {path}: {e}")))?;
    iface
        .get_all(server, conn, None, &emitter)
        .await
        .map_err(|e| Error::Failed(format!("cannot read the properties of {path}: {e}")))
}

/// Emits `InterfacesAdded` for `iface`, an object at `path` that is served without being kept
/// in the registry (a snapshot), once the daemon announces.
pub async fn announce_added<I: Interface>(server: &ObjectServer, path: &str, iface: &I) {
    let Some(root) = ObjectManagerIface::announcer(server).await else {
        return;
    };
    match all_props(iface, server, root.connection(), path).await {
        Ok(props) => {
            let name = I::name();
            let ifaces = HashMap::from([(name.as_str(), props)]);
            if let Ok(p) = ObjectPath::try_from(path) {
                let _ = ObjectManagerIface::interfaces_added(&root, p, ifaces).await;
            }
        }
        Err(e) => tracing::warn!(path, error = %e, "cannot announce an object"),
    }
}

/// Emits `InterfacesRemoved` for an `I` at `path` that was served without being kept in the
/// registry, once the daemon announces.
pub async fn announce_removed<I: Interface>(server: &ObjectServer, path: &str) {
    if let (Some(root), Ok(p)) = (
        ObjectManagerIface::announcer(server).await,
        ObjectPath::try_from(path),
    ) {
        let name = I::name();
        let _ = ObjectManagerIface::interfaces_removed(&root, p, &[name.as_str()]).await;
    }
}

/// Serves `iface` at `path` and, once the daemon announces, emits `InterfacesAdded` with its
/// properties. Returns whether it was added (`false`: an `I` is served there already, left
/// alone and not announced again).
pub async fn add<I: Interface>(server: &ObjectServer, path: &str, iface: I) -> zbus::Result<bool> {
    if server.at(path, iface).await?.is_some() {
        return Ok(false);
    }
    let Some(root) = ObjectManagerIface::announcer(server).await else {
        return Ok(true);
    };
    // A failed read or emission only means nobody was told; the object is served.
    match props_of::<I>(server, root.connection(), path).await {
        Ok(Some(props)) => {
            let name = I::name();
            let ifaces = HashMap::from([(name.as_str(), props)]);
            let p = ObjectPath::try_from(path)?;
            let _ = ObjectManagerIface::interfaces_added(&root, p, ifaces).await;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(path, error = %e, "cannot announce an object"),
    }
    Ok(true)
}

/// Stops serving `I` at `path` and, once the daemon announces, emits `InterfacesRemoved`.
/// Returns whether it was served.
pub async fn remove<I: Interface>(server: &ObjectServer, path: &str) -> zbus::Result<bool> {
    match server.remove::<I, _>(path).await {
        Ok(_) => {}
        Err(zbus::Error::InterfaceNotFound) => return Ok(false),
        Err(e) => return Err(e),
    }
    if let Some(root) = ObjectManagerIface::announcer(server).await {
        let name = I::name();
        let p = ObjectPath::try_from(path)?;
        let _ = ObjectManagerIface::interfaces_removed(&root, p, &[name.as_str()]).await;
    }
    Ok(true)
}

/// One domain as `GetManagedObjects` lists it, with what its snapshots need.
struct DomainEntry {
    path: String,
    /// The domain's own properties, read through zbus.
    props: HashMap<String, OwnedVariant>,
    /// The information the snapshots are listed from (one version for all of them).
    info: DomainInfo,
    children: HashMap<SnapshotId, Vec<SnapshotId>>,
}

/// The reply of `GetManagedObjects` (`a{oa{sa{sv}}}`), serialised straight from the
/// domains' information.
pub struct ManagedObjects {
    domains: Vec<DomainEntry>,
    jobs: Vec<(String, HashMap<String, OwnedVariant>)>,
}

type WireManagedObjects = HashMap<OwnedObjectPath, HashMap<String, HashMap<String, OwnedVariant>>>;

impl Type for ManagedObjects {
    const SIGNATURE: &'static Signature = WireManagedObjects::SIGNATURE;
}

/// One interface with its properties (`a{sa{sv}}` with one entry).
struct OneInterface<'a, P>(&'a str, &'a P);

impl<P: serde::Serialize> serde::Serialize for OneInterface<'_, P> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.0, self.1)?;
        m.end()
    }
}

fn object_path<E: serde::ser::Error>(p: &str) -> Result<ObjectPath<'_>, E> {
    ObjectPath::try_from(p).map_err(E::custom)
}

impl serde::Serialize for ManagedObjects {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let count = self
            .domains
            .iter()
            .map(|d| 1 + d.info.snapshots.len())
            .sum::<usize>()
            + self.jobs.len();
        let mut m = s.serialize_map(Some(count))?;
        let no_children = Vec::new();
        for d in &self.domains {
            m.serialize_entry(
                &object_path::<S::Error>(&d.path)?,
                &OneInterface(DOMAIN_INTERFACE, &d.props),
            )?;
            for rec in d.info.snapshots.values() {
                let path = vmsnap_dbus::names::snapshot_path(d.info.id.0, rec.id.0);
                let props = SnapshotProps {
                    info: &d.info,
                    rec,
                    children: d.children.get(&rec.id).unwrap_or(&no_children),
                };
                m.serialize_entry(
                    &object_path::<S::Error>(&path)?,
                    &OneInterface(SNAPSHOT_INTERFACE, &props),
                )?;
            }
        }
        for (path, props) in &self.jobs {
            m.serialize_entry(
                &object_path::<S::Error>(path)?,
                &OneInterface(JOB_INTERFACE, props),
            )?;
        }
        m.end()
    }
}
