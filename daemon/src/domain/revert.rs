//! Reverting to and deleting snapshots, for the cases whose data lives inside the images
//! (internal snapshots), and forgetting records.
//!
//! Revert of an internal checkpoint loads the VM state in the running QEMU (`snapshot-load`)
//! when the configuration is unchanged, without restarting QEMU; otherwise QEMU is restarted
//! with the snapshot's configuration and the state loaded into it. Disk-only and offline
//! snapshots revert the images with `qemu-img snapshot -a` and leave the domain shut off
//! (or start it when asked). Snapshots that involve external files are refused here with
//! `Unsupported`, before any change: external revert and delete keep other snapshots valid
//! through new overlays and merges, which this module does not do yet.

use std::sync::Arc;

use serde_json::json;
use tracing::info;

use super::actor::{Actor, qemu_img};
use super::def::DomainDef;
use super::state::{GuestEvent, GuestState};
use crate::catalog::{DomainKind, SnapshotId, SnapshotRecord};
use crate::error::{ServiceError, ServiceResult};
use crate::qmp::Qmp;
use crate::snapshot::create::wait_job_concluded;
use crate::snapshot::record::{self, DiskRecord};

/// How a record can be reverted or deleted by this module.
fn internal_only(rec: &SnapshotRecord, verb: &str) -> ServiceResult<Vec<DiskRecord>> {
    let disks = record::disks(rec);
    let mem = record::memory(rec);
    if mem.mode == "external" || disks.iter().any(|d| d.mode == "external") {
        return Err(ServiceError::Unsupported(format!(
            "snapshot {:?} has external files; {verb} of external snapshots is not supported yet",
            rec.name
        )));
    }
    Ok(disks.into_iter().filter(|d| d.mode == "internal").collect())
}

/// The node of the running guest whose image is `file` (top or backing).
async fn node_of_file(qmp: &Qmp, file: &std::path::Path) -> ServiceResult<String> {
    let nodes = qmp
        .query_named_block_nodes()
        .await
        .map_err(ServiceError::qemu("cannot list the guest's block nodes"))?;
    nodes
        .into_iter()
        .find(|n| n.drv != "file" && std::path::Path::new(&n.file) == file)
        .map(|n| n.node_name)
        .ok_or_else(|| {
            ServiceError::InvalidState(format!("the running guest does not use {}", file.display()))
        })
}

impl Actor {
    fn snapshot_record(&self, id: SnapshotId) -> ServiceResult<SnapshotRecord> {
        let info = self.info.borrow();
        info.snapshots
            .get(&id)
            .cloned()
            .ok_or_else(|| ServiceError::NoSuchSnapshot {
                domain: info.def.name.clone(),
                name: id.to_string(),
            })
    }

    /// Checks that every image a snapshot needs is still there and holds its tag.
    async fn check_internal_tags(
        &self,
        rec: &SnapshotRecord,
        disks: &[DiskRecord],
    ) -> ServiceResult<()> {
        for d in disks {
            let out = qemu_img(&[
                "info".as_ref(),
                "-U".as_ref(),
                "--output=json".as_ref(),
                d.image.as_os_str(),
            ])
            .await
            .map_err(|_| {
                ServiceError::InvalidState(format!(
                    "snapshot {:?} needs {}, which cannot be read",
                    rec.name,
                    d.image.display()
                ))
            })?;
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let has = v["snapshots"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|s| s["name"].as_str() == Some(rec.name.as_str()))
            });
            if !has {
                return Err(ServiceError::InvalidState(format!(
                    "snapshot {:?} is missing from {}",
                    rec.name,
                    d.image.display()
                )));
            }
        }
        Ok(())
    }

    pub(super) async fn revert(
        &mut self,
        id: SnapshotId,
        running: Option<bool>,
    ) -> ServiceResult<()> {
        let rec = self.snapshot_record(id)?;
        let name = self.name();
        if self.kind() == DomainKind::Attached {
            return Err(ServiceError::Unsupported(format!(
                "domain {name:?} is attached: reverting needs a QEMU that vmsnapd manages"
            )));
        }
        let disks = internal_only(&rec, "revert")?;
        self.check_internal_tags(&rec, &disks).await?;
        let snap_def = DomainDef::from_xml(&rec.domain_xml).map_err(|e| {
            ServiceError::InvalidState(format!(
                "snapshot {:?} holds an unreadable definition: {e}",
                rec.name
            ))
        })?;
        let mem = record::memory(&rec);
        let with_state = mem.mode == "internal";
        // The state to end in: the snapshot's, unless the caller asked otherwise.
        let end_running = match (running, rec.state.as_str()) {
            (Some(r), _) => Some(r),
            (None, "running") => Some(true),
            (None, "paused") => Some(false),
            (None, _) => None,
        };
        let current_def = self.info.borrow().def.clone();
        if with_state && self.state().is_active() && current_def == snap_def {
            // In place: no new QEMU.
            let qmp = self.qmp()?.clone();
            if self.state() == GuestState::Running {
                qmp.stop()
                    .await
                    .map_err(ServiceError::qemu("cannot pause the guest"))?;
                self.apply(GuestEvent::Stopped);
            }
            self.load_internal(&qmp, &rec, &disks, mem.vmstate_disk.as_deref())
                .await?;
            if end_running != Some(false) {
                qmp.cont()
                    .await
                    .map_err(ServiceError::qemu("cannot resume the guest"))?;
                self.apply(GuestEvent::Resumed);
            }
            info!(domain = %name, snapshot = %rec.name, "reverted in place");
        } else {
            if self.state().is_active() {
                self.destroy().await?;
            }
            for d in &disks {
                qemu_img(&[
                    "snapshot".as_ref(),
                    "-a".as_ref(),
                    rec.name.as_ref(),
                    d.image.as_os_str(),
                ])
                .await?;
            }
            self.persist_def(&snap_def)?;
            self.info.send_modify(|i| i.def = snap_def.clone());
            if with_state {
                self.start(true).await?;
                let qmp = self.qmp()?.clone();
                self.load_internal(&qmp, &rec, &disks, mem.vmstate_disk.as_deref())
                    .await?;
                if end_running != Some(false) {
                    qmp.cont()
                        .await
                        .map_err(ServiceError::qemu("cannot resume the guest"))?;
                    self.apply(GuestEvent::Resumed);
                }
            } else if let Some(r) = end_running {
                self.start(!r).await?;
            }
            info!(domain = %name, snapshot = %rec.name, "reverted with the snapshot's configuration");
        }
        self.shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .set_current_snapshot(self.id(), Some(id))?;
        self.info.send_modify(|i| i.current_snapshot = Some(id));
        Ok(())
    }

    async fn load_internal(
        &self,
        qmp: &Qmp,
        rec: &SnapshotRecord,
        disks: &[DiskRecord],
        vmstate_disk: Option<&str>,
    ) -> ServiceResult<()> {
        let mut devices = Vec::new();
        let mut vmstate = None;
        for d in disks {
            let node = node_of_file(qmp, &d.image).await?;
            if Some(d.target.as_str()) == vmstate_disk {
                vmstate = Some(node.clone());
            }
            devices.push(node);
        }
        let vmstate = vmstate.ok_or_else(|| {
            ServiceError::InvalidState(format!(
                "snapshot {:?} names no disk holding its VM state",
                rec.name
            ))
        })?;
        let job_id = format!("vmsnap-load-{}", rec.id.0);
        let mut events = qmp.subscribe();
        qmp.execute(
            "snapshot-load",
            Some(
                json!({"job-id": job_id, "tag": rec.name, "vmstate": vmstate, "devices": devices}),
            ),
        )
        .await
        .map_err(ServiceError::qemu("cannot start loading the snapshot"))?;
        wait_job_concluded(qmp, &mut events, &job_id, "loading the snapshot").await
    }

    pub(super) async fn delete_snapshot(
        &mut self,
        id: SnapshotId,
        metadata_only: bool,
    ) -> ServiceResult<()> {
        let rec = self.snapshot_record(id)?;
        if !metadata_only {
            let disks = internal_only(&rec, "deleting")?;
            let live = self.state().is_active();
            for d in &disks {
                let in_use = match (&self.qmp, live) {
                    (Some(q), true) => node_of_file(q, &d.image).await.ok(),
                    _ => None,
                };
                match (in_use, self.qmp.clone()) {
                    (Some(node), Some(qmp)) => {
                        let job_id = format!("vmsnap-del-{}-{}", rec.id.0, d.target);
                        let mut events = qmp.subscribe();
                        qmp.execute(
                            "snapshot-delete",
                            Some(json!({"job-id": job_id, "tag": rec.name, "devices": [node]})),
                        )
                        .await
                        .map_err(ServiceError::qemu("cannot delete the internal snapshot"))?;
                        wait_job_concluded(
                            &qmp,
                            &mut events,
                            &job_id,
                            "deleting the internal snapshot",
                        )
                        .await?;
                    }
                    _ => {
                        qemu_img(&[
                            "snapshot".as_ref(),
                            "-d".as_ref(),
                            rec.name.as_ref(),
                            d.image.as_os_str(),
                        ])
                        .await?;
                    }
                }
            }
        }
        let mut cat = self.shared.catalog.lock().expect("catalog lock poisoned");
        cat.delete_snapshot(id)?;
        let current = cat.domain(self.id())?.current_snapshot;
        let mut snaps = cat.snapshots(self.id())?;
        drop(cat);
        let map = snaps.drain(..).map(|s| (s.id, s)).collect();
        self.info.send_modify(|i| {
            i.current_snapshot = current;
            i.snapshots = Arc::new(map);
        });
        info!(domain = %self.name(), snapshot = %rec.name, metadata_only, "snapshot deleted");
        Ok(())
    }
}
