//! The domain service: defining, attaching, finding and undefining domains, and the registry
//! of their actors. No zbus and no sockets here: the D-Bus adapter calls in.
//!
//! Invariants: every domain in the catalog has exactly one actor while the service runs; a
//! catalog record is written before its actor exists and removed only after its actor stopped;
//! an attached domain is registered only once its QMP socket answered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::catalog::{Catalog, DomainId, DomainKind, DomainRecord, NewDomain};
use crate::config::Config;
use crate::domain::actor::{self, DomainHandle, Seed, Shared};
use crate::domain::def::{DiskBus, DiskDef, DiskFormat, DomainDef};
use crate::error::{ServiceError, ServiceResult};
use crate::job::JobRegistry;
use crate::qmp::Qmp;

/// How long `AttachDomain` waits for a foreign QMP socket to answer.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon's core: domains and jobs.
pub struct Service {
    shared: Shared,
    domains: Mutex<BTreeMap<DomainId, DomainHandle>>,
    /// Live long operations.
    pub jobs: JobRegistry,
    /// Serializes define/attach/undefine so that name checks and inserts cannot interleave.
    registry_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

impl Service {
    /// Opens the catalog and starts an actor per domain, re-attaching to guests that still
    /// run. Returns once every actor has settled its initial state.
    pub async fn open(config: Config) -> ServiceResult<Arc<Service>> {
        actor::create_private_dir(&config.state_dir)?;
        actor::create_private_dir(&config.runtime_dir)?;
        crate::storage::install(
            crate::storage::StoragePolicy::from_config(&config)
                .map_err(ServiceError::io("cannot create the storage directory"))?,
        );
        let catalog = Catalog::open(&config.state_dir)?;
        let records = catalog.domains()?;
        let mut snapshots: BTreeMap<
            DomainId,
            BTreeMap<crate::catalog::SnapshotId, crate::catalog::SnapshotRecord>,
        > = BTreeMap::new();
        for s in catalog.all_snapshots()? {
            snapshots.entry(s.domain_id).or_default().insert(s.id, s);
        }
        let launcher = crate::domain::launch::Launcher::detect(
            config.guest_units,
            config.bus == crate::config::BusChoice::Session,
        )
        .await
        .map_err(|e| ServiceError::Io {
            context: "cannot reach systemd to start guests in units".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let shared = Shared {
            config: Arc::new(config),
            catalog: Arc::new(Mutex::new(catalog)),
            launcher,
        };
        let service = Arc::new(Service {
            shared,
            domains: Mutex::new(BTreeMap::new()),
            jobs: JobRegistry::new(),
            registry_lock: tokio::sync::Mutex::new(()),
        });
        for rec in records {
            let snaps = snapshots.remove(&rec.id).unwrap_or_default();
            let handle = service.spawn_actor(&rec, snaps, None).await;
            service
                .domains
                .lock()
                .expect("domains lock poisoned")
                .insert(rec.id, handle);
        }
        Ok(service)
    }

    /// The daemon's configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The catalog (shared with the actors).
    pub fn catalog(&self) -> Arc<Mutex<Catalog>> {
        self.shared.catalog.clone()
    }

    async fn spawn_actor(
        &self,
        rec: &DomainRecord,
        snapshots: BTreeMap<crate::catalog::SnapshotId, crate::catalog::SnapshotRecord>,
        connection: Option<(Qmp, tokio::sync::broadcast::Receiver<crate::qmp::Event>)>,
    ) -> DomainHandle {
        let def = match DomainDef::from_xml(&rec.xml) {
            Ok(def) => def,
            Err(e) => {
                // Attached domains store a discovered definition that need not follow the
                // subset's naming rules; keep serving the domain with what can be known.
                warn!(domain = %rec.name, error = %e, "stored definition does not parse");
                minimal_def(&rec.name, &rec.uuid)
            }
        };
        actor::spawn(
            self.shared.clone(),
            Seed {
                id: rec.id,
                kind: rec.kind,
                def,
                current_snapshot: rec.current_snapshot,
                qmp_socket: rec.qmp_socket.clone(),
                snapshots,
            },
            connection,
        )
        .await
    }

    /// The parts of a redefined snapshot's libvirt document kept verbatim (nothing for a
    /// snapshot vmsnap took itself).
    pub fn snapshot_xml_parts(
        &self,
        id: crate::catalog::SnapshotId,
    ) -> ServiceResult<crate::snapshot::record::XmlParts> {
        let v = self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .snapshot_xml_parts(id)?;
        Ok(crate::snapshot::record::XmlParts::from_json(&v))
    }

    /// Every domain, in id order.
    pub fn domains(&self) -> Vec<DomainHandle> {
        self.domains
            .lock()
            .expect("domains lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// A domain by id.
    pub fn get(&self, id: DomainId) -> Option<DomainHandle> {
        self.domains
            .lock()
            .expect("domains lock poisoned")
            .get(&id)
            .cloned()
    }

    /// A domain by name.
    pub fn find(&self, name: &str) -> ServiceResult<DomainHandle> {
        self.domains()
            .into_iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| ServiceError::NoSuchDomain(name.to_string()))
    }

    fn check_unique(&self, name: &str, uuid: &str) -> ServiceResult<()> {
        for h in self.domains() {
            let info = h.info();
            if info.def.name == name {
                return Err(ServiceError::AlreadyExists(format!(
                    "a domain named {name:?} already exists"
                )));
            }
            if info.def.uuid.to_string() == uuid {
                return Err(ServiceError::AlreadyExists(format!(
                    "domain {:?} already has uuid {uuid}",
                    info.def.name
                )));
            }
        }
        Ok(())
    }

    /// Defines a managed domain from domain XML.
    pub async fn define(&self, xml: &str) -> ServiceResult<DomainHandle> {
        let def = DomainDef::from_xml(xml)?;
        let _guard = self.registry_lock.lock().await;
        crate::storage::check_disks(self, &def.disks, None).await?;
        self.check_unique(&def.name, &def.uuid.to_string())?;
        let rec = self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .insert_domain(&NewDomain {
                name: def.name.clone(),
                uuid: def.uuid.to_string(),
                kind: DomainKind::Managed,
                xml: def.to_xml(),
                qmp_socket: None,
            })?;
        let handle = self.spawn_actor(&rec, BTreeMap::new(), None).await;
        self.domains
            .lock()
            .expect("domains lock poisoned")
            .insert(rec.id, handle.clone());
        info!(domain = %def.name, id = %rec.id, "domain defined");
        Ok(handle)
    }

    /// Registers a QEMU started by someone else, by its QMP socket.
    pub async fn attach(&self, name: &str, socket: &Path) -> ServiceResult<DomainHandle> {
        validate_name(name)?;
        if !socket.is_absolute() {
            return Err(ServiceError::InvalidArgument(format!(
                "the QMP socket path must be absolute, not {:?}",
                socket.display().to_string()
            )));
        }
        let _guard = self.registry_lock.lock().await;
        if self
            .domains()
            .iter()
            .any(|h| h.info().qmp_socket.as_deref() == Some(socket))
        {
            return Err(ServiceError::AlreadyExists(format!(
                "a domain is already attached through {}",
                socket.display()
            )));
        }
        let (qmp, events) = Qmp::connect(socket, Instant::now() + ATTACH_TIMEOUT)
            .await
            .map_err(ServiceError::qemu(format!(
                "cannot attach through {}",
                socket.display()
            )))?;
        let def = discover_def(&qmp, name).await?;
        self.check_unique(name, &def.uuid.to_string())?;
        let rec = self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .insert_domain(&NewDomain {
                name: name.to_string(),
                uuid: def.uuid.to_string(),
                kind: DomainKind::Attached,
                xml: def.to_xml(),
                qmp_socket: Some(socket.to_path_buf()),
            })?;
        let handle = actor::spawn(
            self.shared.clone(),
            Seed {
                id: rec.id,
                kind: DomainKind::Attached,
                def,
                current_snapshot: None,
                qmp_socket: Some(socket.to_path_buf()),
                snapshots: BTreeMap::new(),
            },
            Some((qmp, events)),
        )
        .await;
        self.domains
            .lock()
            .expect("domains lock poisoned")
            .insert(rec.id, handle.clone());
        info!(domain = %name, id = %rec.id, socket = %socket.display(), "domain attached");
        Ok(handle)
    }

    /// Forgets a domain that is not running. Refuses when it has snapshot records unless
    /// `forget_snapshots` is set (their files are kept either way).
    pub async fn undefine(&self, name: &str, forget_snapshots: bool) -> ServiceResult<DomainId> {
        let _guard = self.registry_lock.lock().await;
        let handle = self.find(name)?;
        let info = handle.info();
        if info.state.is_active() && info.kind == DomainKind::Managed {
            return Err(ServiceError::InvalidState(format!(
                "domain {name:?} is running; shut it down or destroy it first"
            )));
        }
        let id = handle.id();
        let snapshots = self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .snapshots(id)?;
        if !snapshots.is_empty() && !forget_snapshots {
            return Err(ServiceError::InvalidState(format!(
                "domain {name:?} has {} snapshot(s); delete them first or pass the \
                 snapshots-metadata option to forget their records",
                snapshots.len()
            )));
        }
        handle.stop().await;
        self.shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .delete_domain(id)?;
        self.domains
            .lock()
            .expect("domains lock poisoned")
            .remove(&id);
        let dir = self.shared.config.domain_runtime_dir(id.0);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            warn!(dir = %dir.display(), error = %e, "could not remove the runtime directory");
        }
        info!(domain = %name, "domain undefined");
        Ok(id)
    }

    /// Stops every actor, leaving guests running.
    pub async fn stop(&self) {
        for h in self.domains() {
            h.stop().await;
        }
    }

    /// A one-line summary for the service manager's status: domain and job counts, then the
    /// first running jobs with their domain and phase.
    pub fn status_line(&self) -> String {
        /// How many jobs the line names; the count covers the rest.
        const NAMED_JOBS: usize = 3;
        let domains = self.domains();
        let running = domains
            .iter()
            .filter(|h| h.info().state.is_active())
            .count();
        let jobs = self.jobs.running_jobs();
        let mut line = format!(
            "{} domain(s), {running} running, {} job(s)",
            domains.len(),
            jobs.len()
        );
        for (i, (id, st)) in jobs.iter().take(NAMED_JOBS).enumerate() {
            let domain = self
                .get(DomainId(st.domain))
                .map_or_else(|| st.domain.to_string(), |h| h.name());
            line.push_str(if i == 0 { ": " } else { ", " });
            line.push_str(&format!(
                "{} {} of {domain} ({})",
                st.operation, id.0, st.phase
            ));
        }
        line
    }
}

/// Checks a domain name against the character policy of definitions.
pub fn validate_name(name: &str) -> ServiceResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::InvalidArgument(format!(
            "invalid domain name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . or -"
        )))
    }
}

fn minimal_def(name: &str, uuid: &str) -> DomainDef {
    DomainDef {
        name: name.to_string(),
        uuid: uuid.parse().unwrap_or_else(|_| uuid::Uuid::new_v4()),
        domain_type: "qemu".into(),
        description: None,
        memory_kib: 0,
        vcpus: 1,
        arch: "x86_64".into(),
        machine: "unknown".into(),
        boot_devs: Vec::new(),
        disks: Vec::new(),
    }
}

/// Builds a definition of a foreign QEMU from what QMP tells.
async fn discover_def(qmp: &Qmp, name: &str) -> ServiceResult<DomainDef> {
    let mut def = minimal_def(name, "");
    let ctx = |what: &str| {
        ServiceError::qemu(format!("cannot discover the {what} of the QEMU to attach"))
    };
    let uuid = qmp.execute("query-uuid", None).await.map_err(ctx("uuid"))?;
    if let Some(u) = uuid
        .get("UUID")
        .and_then(Value::as_str)
        .and_then(|u| u.parse::<uuid::Uuid>().ok())
        && !u.is_nil()
    {
        def.uuid = u;
    }
    let mem = qmp
        .execute("query-memory-size-summary", None)
        .await
        .map_err(ctx("memory size"))?;
    def.memory_kib = mem.get("base-memory").and_then(Value::as_u64).unwrap_or(0) / 1024;
    let cpus = qmp
        .execute("query-cpus-fast", None)
        .await
        .map_err(ctx("vCPUs"))?;
    def.vcpus = cpus.as_array().map(|a| a.len() as u32).unwrap_or(1).max(1);
    let machine = qmp
        .execute(
            "qom-get",
            Some(serde_json::json!({"path": "/machine", "property": "type"})),
        )
        .await
        .map_err(ctx("machine type"))?;
    if let Some(m) = machine.as_str() {
        def.machine = m.trim_end_matches("-machine").to_string();
    }
    let blocks = qmp.query_block().await.map_err(ctx("disks"))?;
    for b in blocks {
        let Some(ins) = b.inserted else { continue };
        let qdev = b.qdev.clone().unwrap_or_default();
        let target = qdev_target(&qdev).unwrap_or_else(|| b.device.clone());
        if target.is_empty() {
            continue;
        }
        let format = match ins.image.format.as_str() {
            "qcow2" => DiskFormat::Qcow2,
            "raw" => DiskFormat::Raw,
            "qed" => DiskFormat::Qed,
            other => {
                warn!(domain = %name, target = %target, format = other, "disk format not supported; left out");
                continue;
            }
        };
        def.disks.push(DiskDef {
            bus: if target.starts_with("sd") {
                DiskBus::Scsi
            } else {
                DiskBus::Virtio
            },
            target,
            format,
            source: PathBuf::from(ins.image.filename.clone()),
            readonly: ins.ro,
            shareable: false,
            transient: false,
            boot_order: None,
        });
    }
    Ok(def)
}

/// The device id in a qdev path such as `/machine/peripheral/vda/virtio-backend` or `vda`.
pub(crate) fn qdev_target(qdev: &str) -> Option<String> {
    if !qdev.contains('/') {
        return (!qdev.is_empty()).then(|| qdev.to_string());
    }
    let mut parts = qdev.split('/');
    while let Some(p) = parts.next() {
        if p == "peripheral" {
            return parts.next().map(str::to_string);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qdev_target_from_paths() {
        assert_eq!(qdev_target("vda").as_deref(), Some("vda"));
        assert_eq!(
            qdev_target("/machine/peripheral/vdb/virtio-backend").as_deref(),
            Some("vdb")
        );
        assert_eq!(
            qdev_target("/machine/peripheral-anon/device[0]/virtio-backend"),
            None
        );
        assert_eq!(qdev_target(""), None);
    }

    #[test]
    fn validate_name_refuses_separators_and_control() {
        for bad in ["", "a/b", "a\nb", ".x", "-x", "a\0b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} must be refused");
        }
        validate_name("web-1.example_2").unwrap();
    }
}
