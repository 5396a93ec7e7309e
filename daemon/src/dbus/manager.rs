//! `org.vmsnap.VmSnap1.Manager` on the root object.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use vmsnap_dbus::Error;
use vmsnap_dbus::names::{domain_path, job_path, option};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{ObjectPath, ObjectServer, OwnedObjectPath, OwnedVariant, interface};

use super::auth::{Action, authorize};
use super::domain::{DomainIface, register_domain};
use super::options::Options;
use super::wire_error;
use crate::service::Service;

/// The root object's interface.
pub struct ManagerIface {
    service: Arc<Service>,
}

impl ManagerIface {
    /// Announces a change of the `Jobs` property (a job object appeared or went away). A
    /// failed emission only means nobody was told; the property stays right.
    pub async fn announce_jobs(server: &ObjectServer) {
        let root = vmsnap_dbus::names::ROOT_PATH;
        if let Ok(iface) = server.interface::<_, ManagerIface>(root).await {
            let i = iface.get().await;
            super::dispatch::properties_changed(server, &*i, root, &["Jobs"]).await;
        }
    }

    /// Serves `service`.
    pub fn new(service: Arc<Service>) -> Self {
        ManagerIface { service }
    }
}

fn path(s: String) -> OwnedObjectPath {
    OwnedObjectPath::try_from(s).expect("object paths are built from numeric ids")
}

#[interface(name = "org.vmsnap.VmSnap1.Manager")]
impl ManagerIface {
    /// Defines a managed domain from libvirt-style domain XML and returns its object path.
    async fn define_domain(
        &self,
        xml: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(&header, Action::Manage).await?;
        Options::parse("DefineDomain", options, &[])?;
        let handle = self.service.define(&xml).await.map_err(wire_error)?;
        let name = handle.name();
        let p = register_domain(server, &self.service, handle).await?;
        Self::domain_added(&emitter, p.as_ref(), &name).await?;
        Ok(p)
    }

    /// Forgets a shut-off domain; its disk images are kept.
    async fn undefine_domain(
        &self,
        name: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), Error> {
        authorize(&header, Action::Manage).await?;
        let opts = Options::parse("UndefineDomain", options, &[option::SNAPSHOTS_METADATA])?;
        let forget = opts.bool(option::SNAPSHOTS_METADATA)?.unwrap_or(false);
        // Its snapshots' objects go with it (an undefine is refused while it has snapshots,
        // unless their metadata is forgotten too).
        let snapshots: Vec<i64> = self
            .service
            .find(&name)
            .map(|h| h.info().snapshots.keys().map(|s| s.0).collect())
            .unwrap_or_default();
        let id = self
            .service
            .undefine(&name, forget)
            .await
            .map_err(wire_error)?;
        for s in snapshots {
            let sp = vmsnap_dbus::names::snapshot_path(id.0, s);
            super::object_manager::announce_removed::<super::snapshot::SnapshotIface>(server, &sp)
                .await;
        }
        let p = path(domain_path(id.0));
        super::object_manager::remove::<DomainIface>(server, p.as_str()).await?;
        Self::domain_removed(&emitter, p.as_ref(), &name).await?;
        Ok(())
    }

    /// Registers a QEMU started by someone else, by the absolute path of its QMP socket.
    async fn attach_domain(
        &self,
        name: String,
        qmp_socket: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(&header, Action::Manage).await?;
        Options::parse("AttachDomain", options, &[])?;
        let handle = self
            .service
            .attach(&name, Path::new(&qmp_socket))
            .await
            .map_err(wire_error)?;
        let p = register_domain(server, &self.service, handle).await?;
        Self::domain_added(&emitter, p.as_ref(), &name).await?;
        Ok(p)
    }

    /// Every domain's object path, in id order.
    async fn list_domains(&self) -> Vec<OwnedObjectPath> {
        self.service
            .domains()
            .iter()
            .map(|h| path(domain_path(h.id().0)))
            .collect()
    }

    /// The object path of the domain with this name.
    async fn find_domain(&self, name: String) -> Result<OwnedObjectPath, Error> {
        let h = self.service.find(&name).map_err(wire_error)?;
        Ok(path(domain_path(h.id().0)))
    }

    /// The daemon's version.
    #[zbus(property)]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// Every job object on the bus: running ones and finished ones that linger for a few
    /// seconds so that their `Result` can still be read. Announced by `PropertiesChanged`.
    #[zbus(property)]
    async fn jobs(&self) -> Vec<OwnedObjectPath> {
        self.service
            .jobs
            .ids()
            .into_iter()
            .map(|id| path(job_path(id.0)))
            .collect()
    }

    /// A domain was defined or attached.
    #[zbus(signal)]
    async fn domain_added(
        emitter: &SignalEmitter<'_>,
        domain: ObjectPath<'_>,
        name: &str,
    ) -> zbus::Result<()>;

    /// A domain was undefined.
    #[zbus(signal)]
    async fn domain_removed(
        emitter: &SignalEmitter<'_>,
        domain: ObjectPath<'_>,
        name: &str,
    ) -> zbus::Result<()>;
}
