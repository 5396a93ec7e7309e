//! Reverting to and deleting snapshots, in any tree shape, and forgetting records.
//!
//! Revert never writes to an image that another snapshot or the active chain depends on:
//! - internal checkpoint, unchanged configuration, guest running: `snapshot-load` in place,
//!   no new QEMU;
//! - internal snapshots otherwise: `qemu-img snapshot -a` on the images (on a private copy when
//!   an image has become the backing file of an overlay), the snapshot's configuration, and for
//!   a checkpoint a new QEMU into which the state is loaded;
//! - external disks: a new overlay on top of the snapshot's image for each disk (a branch), so
//!   the snapshot and its children stay valid; external VM state is loaded into a new QEMU
//!   started with `-incoming defer`.
//!
//! Delete removes internal tags and merges external data so that every remaining snapshot keeps
//! its content: `block-commit` when the overlay is the image's only dependent (live) or
//! `qemu-img commit` (offline); with branches, every dependent takes the image's data
//! (`block-stream` for the running one, `qemu-img rebase` for the others) and the image goes.
//!
//! Every check (files present and unaltered, tags present, hardware unchanged or `force`) is
//! made before the first change, and each operation is journaled in the catalog.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use tracing::info;

use super::actor::{Actor, qemu_img};

use super::def::DomainDef;
use super::state::{GuestEvent, GuestState};
use crate::catalog::{DomainKind, SnapshotId, SnapshotRecord};
use crate::error::{ServiceError, ServiceResult};
use crate::journal;
use crate::qmp::Qmp;
use crate::snapshot::create::wait_job_concluded;
use crate::snapshot::record::{self, DiskRecord};

/// How a record can be reverted or deleted by this module.
/// Whether two definitions describe the same virtual hardware (disk files aside): a guest can
/// then be reverted without the caller accepting that its QEMU is replaced with another setup.
fn same_hardware(a: &DomainDef, b: &DomainDef) -> bool {
    let disks = |d: &DomainDef| -> Vec<(String, String, bool, bool, bool)> {
        d.disks
            .iter()
            .map(|x| {
                (
                    x.target.clone(),
                    x.bus.as_str().to_string(),
                    x.readonly,
                    x.shareable,
                    x.transient,
                )
            })
            .collect()
    };
    a.memory_kib == b.memory_kib
        && a.vcpus == b.vcpus
        && a.machine == b.machine
        && a.arch == b.arch
        && disks(a) == disks(b)
}

/// Whether `path` is named like the files [`fresh_overlay_path`] makes:
/// `STEM.TAG.branchN.qcow2`.
fn is_revert_overlay(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let mut parts = name.rsplit('.');
    parts.next() == Some("qcow2")
        && parts
            .next()
            .and_then(|b| b.strip_prefix("branch"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
}

/// A new overlay path beside `base`, named after the snapshot, that does not exist yet.
fn fresh_overlay_path(base: &Path, snapshot: &str) -> ServiceResult<PathBuf> {
    let dir = base.parent().unwrap_or(Path::new("/"));
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tag: String = snapshot
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    for n in 1..1000 {
        let p = dir.join(format!("{stem}.{tag}.branch{n}.qcow2"));
        if !p.exists() {
            return Ok(p);
        }
    }
    Err(ServiceError::AlreadyExists(format!(
        "no free name for a new overlay of {} in {}",
        base.display(),
        dir.display()
    )))
}

/// Copies an image file exclusively (the copy is new), keeping holes.
async fn copy_sparse(from: &Path, to: &Path) -> ServiceResult<()> {
    drop(crate::snapshot::create::create_exclusive(to)?);
    let out = tokio::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(ServiceError::io("cannot run cp"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(to);
        return Err(ServiceError::Io {
            context: format!("cannot copy {}", from.display()),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

/// Loads VM state from `file` into a QEMU started with `-incoming defer`.
async fn load_incoming(qmp: &Qmp, file: &Path) -> ServiceResult<()> {
    let f = std::fs::File::open(file)
        .map_err(ServiceError::io(format!("cannot open {}", file.display())))?;
    qmp.execute_with_fd(
        "getfd",
        Some(json!({"fdname": "vmsnap-incoming"})),
        f.as_fd(),
    )
    .await
    .map_err(ServiceError::qemu("cannot hand the memory file to QEMU"))?;
    qmp.execute(
        "migrate-incoming",
        Some(json!({"uri": "fd:vmsnap-incoming"})),
    )
    .await
    .map_err(ServiceError::qemu("cannot load the VM state"))?;
    let deadline = tokio::time::Instant::now() + crate::snapshot::create::SAVE_TIMEOUT;
    loop {
        let st = qmp
            .execute("query-migrate", None)
            .await
            .map_err(ServiceError::qemu("cannot follow the VM state load"))?;
        match st
            .get("status")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
        {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(ServiceError::Qemu {
                    context: "loading the VM state failed".into(),
                    source: crate::qmp::QmpError::Command {
                        class: "GenericError".into(),
                        desc: st
                            .get("error-desc")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("unknown")
                            .into(),
                        command: "migrate-incoming".into(),
                    },
                });
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ServiceError::Timeout(
                "loading the VM state took too long".into(),
            ));
        }
        tokio::time::sleep(crate::snapshot::create::MIGRATE_POLL).await;
    }
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

    /// Checks that an image holding an internal snapshot of `rec` still has its tag, from the
    /// header [`check_revert_files`](Self::check_revert_files) already read.
    fn check_internal_tag(
        rec: &SnapshotRecord,
        d: &DiskRecord,
        top: &crate::qcow2::ImageInfo,
    ) -> ServiceResult<()> {
        if !top.snapshots.iter().any(|s| s == &rec.name) {
            return Err(ServiceError::InvalidState(format!(
                "snapshot {:?} is missing from {}",
                rec.name,
                d.image.display()
            )));
        }
        Ok(())
    }

    pub(super) async fn revert(
        &mut self,
        id: SnapshotId,
        running: Option<bool>,
    ) -> ServiceResult<()> {
        let op = self.journal(
            journal::KIND_REVERT,
            id,
            journal::REVERT_STARTED,
            json!({"running": running}),
        )?;
        let old_def = self.info.borrow().def.clone();
        let r = self.revert_inner(id, running).await;
        if r.is_ok() {
            self.remove_abandoned_overlays(&old_def);
        }
        self.journal_done(op);
        r
    }

    /// Records a multi-step operation in the catalog's journal before it starts, with what
    /// recovery needs to put things back: the definition, the run state and the current
    /// snapshot as they are now. The row is written at its first `step` already (with `extra`
    /// in its payload), one commit instead of two; the step's crash point follows.
    fn journal(
        &mut self,
        kind: &str,
        id: SnapshotId,
        step: &str,
        extra: serde_json::Value,
    ) -> ServiceResult<crate::catalog::OperationId> {
        let mut payload = {
            let info = self.info.borrow();
            json!({
                "snapshot": id.0,
                "old_def": info.def.to_xml(),
                "old_state": info.state.as_str(),
                "old_current": info.current_snapshot.map(|s| s.0),
                "files": [],
            })
        };
        if let (Some(p), serde_json::Value::Object(e)) = (payload.as_object_mut(), extra) {
            p.extend(e);
        }
        let op = self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .begin_operation_at(self.id(), kind, step, &payload)?;
        self.journal_op = Some(op);
        journal::crash_point(step);
        Ok(op)
    }

    /// Journals that the running revert or delete reached `step` (see [`journal::step`]).
    pub(super) fn journal_step(&self, step: &str, extra: serde_json::Value) {
        if let Some(op) = self.journal_op {
            journal::step(&self.shared.catalog, op, step, extra);
        }
    }

    /// Adds `file` to the files the running operation creates, before it is created.
    fn journal_new_file(&self, file: &Path) {
        if let Some(op) = self.journal_op {
            journal::append(&self.shared.catalog, op, "files", json!(file));
        }
    }

    fn journal_done(&mut self, op: crate::catalog::OperationId) {
        self.journal_op = None;
        if let Err(e) = self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .finish_operation(op)
        {
            tracing::warn!(error = %e, "could not close the operation journal");
        }
    }

    async fn revert_inner(&mut self, id: SnapshotId, running: Option<bool>) -> ServiceResult<()> {
        let rec = self.snapshot_record(id)?;
        self.refuse_broken(&rec)?;
        let name = self.name();
        if self.kind() == DomainKind::Attached {
            return Err(ServiceError::Unsupported(format!(
                "domain {name:?} is attached: reverting needs a QEMU that vmsnapd manages"
            )));
        }
        let all_disks = record::disks(&rec);
        let disks: Vec<DiskRecord> = all_disks
            .iter()
            .filter(|d| d.mode == "internal")
            .cloned()
            .collect();
        self.check_revert_files(&rec, &all_disks).await?;
        let snap_def = DomainDef::from_xml(&rec.domain_xml).map_err(|e| {
            ServiceError::InvalidState(format!(
                "snapshot {:?} holds an unreadable definition: {e}",
                rec.name
            ))
        })?;
        let mem = record::memory(&rec);
        let current_hw = self.info.borrow().def.clone();
        if self.state().is_active() && !same_hardware(&current_hw, &snap_def) && !self.revert_force
        {
            return Err(ServiceError::InvalidState(format!(
                "the configuration of snapshot {:?} differs from the running guest's (disks or \
                 hardware changed since), so reverting replaces the guest's QEMU; pass force to \
                 do that",
                rec.name
            )));
        }
        let mut shared_image = false;
        for d in &disks {
            shared_image |= self.image_has_dependents(&d.image).await?;
        }
        if shared_image || mem.mode == "external" || all_disks.iter().any(|d| d.mode == "external")
        {
            return self
                .revert_branch(&rec, snap_def, &all_disks, running)
                .await;
        }
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
            let was_running = self.state() == GuestState::Running;
            if was_running {
                qmp.stop()
                    .await
                    .map_err(ServiceError::qemu("cannot pause the guest"))?;
                self.apply(GuestEvent::Stopped);
            }
            self.journal_step(
                journal::REVERT_PAUSED,
                json!({"path": "in-place", "paused_by_us": was_running}),
            );
            self.load_internal(&qmp, &rec, &disks, mem.vmstate_disk.as_deref())
                .await?;
            self.journal_step(
                journal::REVERT_LOADED,
                json!({"end_running": end_running != Some(false)}),
            );
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
            self.journal_step(
                journal::REVERT_DESTROYED,
                json!({"path": "internal-images", "def": snap_def.to_xml()}),
            );
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
            self.journal_step(journal::REVERT_DEFINED, json!({}));
            if with_state {
                self.start(true).await?;
                let qmp = self.qmp()?.clone();
                self.load_internal(&qmp, &rec, &disks, mem.vmstate_disk.as_deref())
                    .await?;
                self.journal_step(
                    journal::REVERT_LOADED,
                    json!({"end_running": end_running != Some(false)}),
                );
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
        // One read of the graph for all disks; nodes are found as the deletes find them.
        let graph = super::nodes::Graph::fetch(qmp)
            .await
            .map_err(ServiceError::qemu("cannot list the guest's block nodes"))?;
        for d in disks {
            let node = graph
                .format_node_of(&d.image)
                .map(|n| n.name)
                .ok_or_else(|| {
                    ServiceError::InvalidState(format!(
                        "the running guest does not use {}",
                        d.image.display()
                    ))
                })?;
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

    /// Checks, before any change, that the files a revert needs are there and that no image it
    /// would write to is the backing file of something else.
    async fn check_revert_files(
        &self,
        rec: &SnapshotRecord,
        disks: &[DiskRecord],
    ) -> ServiceResult<()> {
        let disks: Vec<&DiskRecord> = disks.iter().filter(|d| d.mode != "no").collect();
        for d in &disks {
            if !d.data_file().exists() {
                return Err(ServiceError::InvalidState(format!(
                    "snapshot {:?} needs {}, which is missing",
                    rec.name,
                    d.data_file().display()
                )));
            }
        }
        // Altered files: each image must still be of the recorded format with a readable
        // backing chain. The headers are read in-process (what `qemu-img info --backing-chain`
        // would open), every disk in one blocking task: a process per disk cost more than the
        // revert itself.
        let files: Vec<PathBuf> = disks.iter().map(|d| d.data_file().clone()).collect();
        let chains = blocking(move || {
            files
                .iter()
                .map(|f| crate::qcow2::chain(f))
                .collect::<Vec<_>>()
        })
        .await?;
        for (d, chain) in disks.iter().zip(chains) {
            let chain = chain.map_err(|e| {
                ServiceError::InvalidState(format!(
                    "snapshot {:?} needs {}, whose backing chain cannot be read: {e}",
                    rec.name,
                    d.data_file().display()
                ))
            })?;
            let top = &chain[0].1;
            let found = top.format.as_str();
            if !d.format.is_empty() && found != d.format {
                return Err(ServiceError::InvalidState(format!(
                    "snapshot {:?} needs {} as a {} image, but it is now {found}: it was altered",
                    rec.name,
                    d.data_file().display(),
                    d.format
                )));
            }
            if d.mode == "internal" {
                Self::check_internal_tag(rec, d, top)?;
            }
        }
        let mem = record::memory(rec);
        if let Some(f) = mem.file.as_ref().filter(|_| mem.mode == "external")
            && !f.exists()
        {
            return Err(ServiceError::InvalidState(format!(
                "snapshot {:?} needs its memory file {}, which is missing",
                rec.name,
                f.display()
            )));
        }
        Ok(())
    }

    /// Whether some overlay (of a snapshot, or in the domain's active chains) is backed by
    /// `image`.
    async fn image_has_dependents(&self, image: &Path) -> ServiceResult<bool> {
        let info = self.info.borrow().clone();
        let taken_on = info.snapshots.values().any(|r| {
            record::disks(r)
                .iter()
                .any(|d| d.mode == "external" && d.data_file() == image)
        });
        if taken_on {
            return Ok(true);
        }
        let sources: Vec<PathBuf> = info
            .def
            .disks
            .iter()
            .filter(|d| d.source != image)
            .map(|d| d.source.clone())
            .collect();
        let image = image.to_path_buf();
        // Unreadable chains count as not depending on the image, as before with `qemu-img`.
        blocking(move || {
            sources.iter().any(|s| {
                crate::qcow2::chain(s)
                    .is_ok_and(|chain| chain.iter().skip(1).any(|(f, _)| f == &image))
            })
        })
        .await
    }

    /// Reverts to a snapshot with external files: new overlays on the snapshot's images (a
    /// branch), the snapshot's configuration, and its VM state loaded into a new QEMU.
    async fn revert_branch(
        &mut self,
        rec: &SnapshotRecord,
        snap_def: DomainDef,
        disks: &[DiskRecord],
        running: Option<bool>,
    ) -> ServiceResult<()> {
        let name = self.name();
        let mem = record::memory(rec);
        let end_running = match (running, rec.state.as_str()) {
            (Some(r), _) => Some(r),
            (None, "running") => Some(true),
            (None, "paused") => Some(false),
            (None, _) => None,
        };
        let old_def = self.info.borrow().def.clone();
        if self.state().is_active() {
            self.destroy().await?;
        }
        self.journal_step(journal::REVERT_DESTROYED, json!({"path": "branch"}));
        let mut created: Vec<PathBuf> = Vec::new();
        let result = self
            .branch_steps(rec, snap_def, disks, &mem, end_running, &mut created)
            .await;
        if let Err(e) = result {
            tracing::warn!(domain = %name, snapshot = %rec.name, error = %e, "revert failed; undoing");
            if self.state().is_active() {
                let _ = self.destroy().await;
            }
            for f in &created {
                let _ = std::fs::remove_file(f);
            }
            let _ = self.persist_def(&old_def);
            self.info.send_modify(|i| i.def = old_def);
            return Err(ServiceError::InvalidState(format!(
                "reverting domain {name:?} to {:?} failed and it was left shut off with its \
                 previous configuration: {e}",
                rec.name
            )));
        }
        self.shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .set_current_snapshot(self.id(), Some(rec.id))?;
        self.info.send_modify(|i| i.current_snapshot = Some(rec.id));
        info!(domain = %name, snapshot = %rec.name, "reverted on new overlays");
        Ok(())
    }

    /// After a revert: removes the overlays and private copies of earlier reverts that the domain ran on
    /// until now and that nothing needs any more. What they held is the state the revert
    /// discarded. Only files a revert made (`*.branchN.qcow2`, see [`fresh_overlay_path`])
    /// qualify, and only when no snapshot names them (as its image, its overlay or a disk of
    /// its configuration) and the new configuration does not use them. A failure to remove one
    /// is logged: the revert itself is done.
    fn remove_abandoned_overlays(&self, old_def: &DomainDef) {
        if !old_def.disks.iter().any(|d| is_revert_overlay(&d.source)) {
            // Nothing to look for: spare the parse of every snapshot's definition.
            return;
        }
        let abandoned: Vec<PathBuf> = {
            let info = self.info.borrow();
            let mut needed: std::collections::HashSet<PathBuf> =
                info.def.disks.iter().map(|d| d.source.clone()).collect();
            for rec in info.snapshots.values() {
                for d in record::disks(rec) {
                    needed.extend(d.overlay.clone());
                    needed.extend(d.snapshot_file.clone());
                    needed.insert(d.image);
                }
                match DomainDef::from_xml(&rec.domain_xml) {
                    Ok(def) => needed.extend(def.disks.iter().map(|d| d.source.clone())),
                    // Unreadable: keep every candidate rather than guess.
                    Err(_) => return,
                }
            }
            old_def
                .disks
                .iter()
                .map(|d| d.source.clone())
                .filter(|p| is_revert_overlay(p) && !needed.contains(p))
                .collect()
        };
        for p in abandoned {
            match std::fs::remove_file(&p) {
                Ok(()) => info!(file = %p.display(), "removed the overlay an earlier revert made"),
                Err(e) => tracing::warn!(
                    file = %p.display(),
                    error = %e,
                    "could not remove the overlay an earlier revert made"
                ),
            }
        }
    }

    async fn branch_steps(
        &mut self,
        rec: &SnapshotRecord,
        snap_def: DomainDef,
        disks: &[DiskRecord],
        mem: &record::MemoryRecord,
        end_running: Option<bool>,
        created: &mut Vec<PathBuf>,
    ) -> ServiceResult<()> {
        let current = self.info.borrow().def.clone();
        let mut internal_images: Vec<DiskRecord> = Vec::new();
        let mut def = snap_def;
        for disk in def.disks.iter_mut() {
            let Some(d) = disks.iter().find(|d| d.target == disk.target) else {
                continue;
            };
            match d.mode.as_str() {
                "external" => {
                    let base = d.data_file().clone();
                    let overlay = fresh_overlay_path(&base, &rec.name)?;
                    self.journal_new_file(&overlay);
                    drop(crate::snapshot::create::create_exclusive(&overlay)?);
                    created.push(overlay.clone());
                    let fmt = if d.format.is_empty() {
                        disk.format.as_str().to_string()
                    } else {
                        d.format.clone()
                    };
                    qemu_img(&[
                        "create".as_ref(),
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        "-F".as_ref(),
                        fmt.as_ref(),
                        "-b".as_ref(),
                        base.as_os_str(),
                        overlay.as_os_str(),
                    ])
                    .await?;
                    disk.source = overlay;
                    disk.format = super::def::DiskFormat::Qcow2;
                }
                "internal" => {
                    let mut image = d.image.clone();
                    if self.image_has_dependents(&d.image).await? {
                        // The image is the backing file of later overlays: writing to it would
                        // corrupt them. Revert a private copy (internal snapshots included).
                        let copy = fresh_overlay_path(&d.image, &rec.name)?;
                        self.journal_new_file(&copy);
                        copy_sparse(&d.image, &copy).await?;
                        created.push(copy.clone());
                        disk.source = copy.clone();
                        image = copy;
                    }
                    qemu_img(&[
                        "snapshot".as_ref(),
                        "-a".as_ref(),
                        rec.name.as_ref(),
                        image.as_os_str(),
                    ])
                    .await?;
                    internal_images.push(DiskRecord { image, ..d.clone() });
                }
                _ => {
                    // Not in the snapshot: the disk keeps its current state.
                    if let Some(cur) = current.disk(&disk.target) {
                        *disk = cur.clone();
                    }
                }
            }
        }
        self.journal_step(journal::REVERT_FILES, json!({}));
        self.persist_def(&def)?;
        self.journal_step(journal::REVERT_DEFINED, json!({"def": def.to_xml()}));
        self.info.send_modify(|i| i.def = def);
        match mem.mode.as_str() {
            "external" => {
                let file = mem
                    .file
                    .clone()
                    .expect("checked: external memory has a file");
                self.start_with(true, true).await?;
                let qmp = self.qmp()?.clone();
                load_incoming(&qmp, &file).await?;
                self.journal_step(
                    journal::REVERT_LOADED,
                    json!({"end_running": end_running != Some(false)}),
                );
                if end_running != Some(false) {
                    qmp.cont()
                        .await
                        .map_err(ServiceError::qemu("cannot resume the guest"))?;
                    self.apply(GuestEvent::Resumed);
                }
            }
            "internal" => {
                self.start(true).await?;
                let qmp = self.qmp()?.clone();
                self.load_internal(&qmp, rec, &internal_images, mem.vmstate_disk.as_deref())
                    .await?;
                self.journal_step(
                    journal::REVERT_LOADED,
                    json!({"end_running": end_running != Some(false)}),
                );
                if end_running != Some(false) {
                    qmp.cont()
                        .await
                        .map_err(ServiceError::qemu("cannot resume the guest"))?;
                    self.apply(GuestEvent::Resumed);
                }
            }
            _ => {
                if let Some(r) = end_running {
                    self.start(!r).await?;
                }
                self.journal_step(journal::REVERT_LOADED, json!({"end_running": false}));
            }
        }
        Ok(())
    }

    pub(super) async fn delete_snapshot(
        &mut self,
        id: SnapshotId,
        metadata_only: bool,
    ) -> ServiceResult<()> {
        let memory_file = self
            .snapshot_record(id)
            .ok()
            .map(|r| record::memory(&r))
            .filter(|m| m.mode == "external" && !metadata_only)
            .and_then(|m| m.file);
        let op = self.journal(
            journal::KIND_DELETE,
            id,
            journal::DELETE_STARTED,
            json!({"metadata_only": metadata_only, "memory_file": memory_file}),
        )?;
        let r = self.delete_inner(id, metadata_only).await;
        self.journal_done(op);
        r
    }

    async fn delete_inner(&mut self, id: SnapshotId, metadata_only: bool) -> ServiceResult<()> {
        let rec = self.snapshot_record(id)?;
        let mut moved: Vec<(PathBuf, PathBuf, String)> = Vec::new();
        let mut memory_file = None;
        if !metadata_only {
            let disks = record::disks(&rec);
            // Every check and plan first, so that a refusal changes nothing.
            let mut merges = Vec::new();
            let external: Vec<&DiskRecord> =
                disks.iter().filter(|d| d.mode == "external").collect();
            // The running guest's block nodes, read once for all disks: on a long chain the
            // reply is large and QEMU takes tens of milliseconds to build it.
            let nodes = match external.is_empty() {
                true => Vec::new(),
                false => self.running_nodes().await?,
            };
            let index = match external.is_empty() {
                true => BackingIndex(Vec::new()),
                false => self.backing_index().await?,
            };
            for d in external {
                merges.push(self.plan_merge(&rec, d, &nodes, &index).await?);
            }
            let mem = record::memory(&rec);
            if mem.mode == "external" {
                memory_file = mem.file.clone();
            }
            let internal: Vec<&DiskRecord> =
                disks.iter().filter(|d| d.mode == "internal").collect();
            // Like the nodes above: the graph is read once for all the tags.
            let graph = match (&self.qmp, self.state().is_active(), internal.is_empty()) {
                (Some(q), true, false) => Some(
                    super::nodes::Graph::fetch(q)
                        .await
                        .map_err(ServiceError::qemu("cannot list the guest's block nodes"))?,
                ),
                _ => None,
            };
            for d in internal {
                self.delete_internal_tag(&rec, d, graph.as_ref()).await?;
            }
            self.journal_step(journal::DELETE_TAGS, json!({}));
            let merged_any = merges.iter().any(|m| !matches!(m, Merge::Keep));
            // The live commits of all disks run at once, as QEMU allows; the rest in turn.
            let (live, others): (Vec<Merge>, Vec<Merge>) = merges
                .into_iter()
                .partition(|m| matches!(m, Merge::CommitLive { .. }));
            if !live.is_empty() {
                moved.extend(self.commit_live(&rec, live).await?);
            }
            for m in others {
                if let Some(mv) = self.run_merge(&rec, m).await? {
                    moved.push(mv);
                }
            }
            if moved.is_empty() && !merged_any {
                // Nothing was merged: the journal already says all there is (TAGS), and
                // recovery runs a delete again from either step alike; no commit of its own.
                journal::crash_point(journal::DELETE_MERGED);
            } else {
                self.journal_step(journal::DELETE_MERGED, json!({}));
            }
        }
        let mut changed = Vec::new();
        if !moved.is_empty() {
            changed = self.retarget_records(id, &moved)?;
        }
        // Only the records the delete touched are read back (the re-parented children and
        // the retargeted ones), not the whole domain: a delete stays O(changed) in SQLite.
        changed.extend(
            self.info
                .borrow()
                .snapshots
                .values()
                .filter(|r| r.parent == Some(id))
                .map(|r| r.id),
        );
        // The record goes and the journal says so in one commit.
        match self.journal_op {
            Some(op) => {
                let mut cat = self.shared.catalog.lock().expect("catalog lock poisoned");
                let payload = cat
                    .pending_operations()?
                    .into_iter()
                    .find(|o| o.id == op)
                    .map(|o| o.payload)
                    .unwrap_or_else(|| json!({}));
                cat.delete_snapshot_at_step(id, op, journal::DELETE_UNCATALOGED, &payload)?;
                drop(cat);
                journal::crash_point(journal::DELETE_UNCATALOGED);
            }
            None => self
                .shared
                .catalog
                .lock()
                .expect("catalog lock poisoned")
                .delete_snapshot(id)?,
        }
        let (current, reread) = {
            let cat = self.shared.catalog.lock().expect("catalog lock poisoned");
            let current = cat.domain(self.id())?.current_snapshot;
            let reread = changed
                .iter()
                .map(|c| cat.snapshot(*c))
                .collect::<Result<Vec<_>, _>>()?;
            (current, reread)
        };
        self.info.send_modify(|i| {
            i.current_snapshot = current;
            let map = Arc::make_mut(&mut i.snapshots);
            map.remove(&id);
            for r in reread {
                map.insert(r.id, r);
            }
        });
        if let Some(f) = memory_file
            && let Err(e) = std::fs::remove_file(&f)
        {
            tracing::warn!(file = %f.display(), error = %e, "could not remove the memory file");
        }
        if !metadata_only {
            self.remove_unreachable_overlays(&rec).await;
        }
        info!(domain = %self.name(), snapshot = %rec.name, metadata_only, "snapshot deleted");
        Ok(())
    }

    /// Removes the overlays of deleted snapshot `rec` that nothing can reach any more: the
    /// state a branch the guest left had reached after `rec`, kept only for `rec` (a merge
    /// that had to keep `rec`'s image, or streamed it into its dependents, leaves it behind).
    /// An overlay stays while the definition, another record or another image uses it, or
    /// the guest's QEMU holds it open.
    async fn remove_unreachable_overlays(&self, rec: &SnapshotRecord) {
        let referenced = |o: &Path| {
            let info = self.info.borrow();
            info.def.disks.iter().any(|d| d.source == o)
                || info.snapshots.values().any(|r| {
                    record::disks(r).iter().any(|d| {
                        d.image == o
                            || d.overlay.as_deref() == Some(o)
                            || d.snapshot_file.as_deref() == Some(o)
                    })
                })
        };
        // Cheap checks first: the images and QEMU are asked only about what is left.
        let overlays: Vec<PathBuf> = record::disks(rec)
            .into_iter()
            .filter(|d| d.mode == "external")
            .filter_map(|d| d.overlay)
            .filter(|o| o.exists() && !referenced(o))
            .collect();
        if overlays.is_empty() {
            return;
        }
        let Ok(index) = self.backing_index().await else {
            return;
        };
        // What QEMU holds open, found through protocol nodes (overlays carry `json:` names).
        let graph = match (&self.qmp, self.state().is_active()) {
            (Some(q), true) => match super::nodes::Graph::fetch(q).await {
                Ok(g) => Some(g),
                // Not knowing what QEMU holds, keep everything.
                Err(_) => return,
            },
            _ => None,
        };
        let open = |o: &Path| {
            graph
                .as_ref()
                .is_some_and(|g| g.format_node_of(o).is_some())
        };
        for o in overlays {
            if !index.dependents(&o).is_empty() || open(&o) {
                continue;
            }
            match std::fs::remove_file(&o) {
                Ok(()) => info!(file = %o.display(), "removed an overlay nothing uses any more"),
                Err(e) => {
                    tracing::warn!(file = %o.display(), error = %e, "could not remove an unused overlay")
                }
            }
        }
    }

    async fn delete_internal_tag(
        &self,
        rec: &SnapshotRecord,
        d: &DiskRecord,
        graph: Option<&super::nodes::Graph>,
    ) -> ServiceResult<()> {
        if !self.resumed_merges.is_empty() || self.journal_resuming {
            // Recovery runs an interrupted delete again: a tag already removed is done.
            let tags = qemu_img(&[
                "info".as_ref(),
                "-U".as_ref(),
                "--output=json".as_ref(),
                d.image.as_os_str(),
            ])
            .await
            .ok()
            .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
            .unwrap_or_default();
            let has = tags["snapshots"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"].as_str() == Some(rec.name.as_str()));
            if !has {
                return Ok(());
            }
        }
        if let (Some(qmp), Some(graph)) = (&self.qmp, graph) {
            let job_id = format!("vmsnap-del-{}-{}", rec.id.0, d.target);
            let what = "deleting the internal snapshot";
            if super::nodes::delete_tag_live(qmp, graph, &d.image, &rec.name, &job_id, what).await?
            {
                return Ok(());
            }
        }
        qemu_img(&[
            "snapshot".as_ref(),
            "-d".as_ref(),
            rec.name.as_ref(),
            d.image.as_os_str(),
        ])
        .await
        .map(|_| ())
    }

    /// Every image file the domain knows of: its snapshots' files and its active disks (some
    /// may be gone).
    fn known_images(&self) -> Vec<PathBuf> {
        let info = self.info.borrow();
        let mut v: Vec<PathBuf> = info.def.disks.iter().map(|d| d.source.clone()).collect();
        for r in info.snapshots.values() {
            for d in record::disks(r) {
                v.push(d.image.clone());
                v.extend(d.overlay.clone());
                v.extend(d.snapshot_file.clone());
            }
        }
        v.sort();
        v.dedup();
        v
    }

    /// The backing file of every known image that exists, read in one pass off the actor's
    /// task: a delete plans all its disks on one reading (it changes nothing before its plan
    /// is complete). After a change, read again.
    async fn backing_index(&self) -> ServiceResult<BackingIndex> {
        let files = self.known_images();
        blocking(move || {
            BackingIndex(
                files
                    .into_iter()
                    .filter_map(|f| match read_backing(&f) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                        r => Some((f, r.map_err(|e| e.to_string()))),
                    })
                    .collect(),
            )
        })
        .await
    }

    /// The images directly backed by `base`, read now.
    async fn dependents(&self, base: &Path) -> ServiceResult<Vec<PathBuf>> {
        Ok(self.backing_index().await?.dependents(base))
    }

    /// Decides how the data of external disk `d` of `rec` is merged away, refusing (before any
    /// change) the shapes this build cannot merge while keeping every snapshot valid.
    /// The format nodes of the running guest as (file, node name); empty when it does not run.
    async fn running_nodes(&self) -> ServiceResult<Vec<(String, String)>> {
        match (&self.qmp, self.state().is_active()) {
            (Some(q), true) => Ok(q
                .query_named_block_nodes()
                .await
                .map_err(ServiceError::qemu("cannot list the guest's block nodes"))?
                .into_iter()
                .filter(|n| n.drv != "file")
                .map(|n| (n.file, n.node_name))
                .collect()),
            _ => Ok(Vec::new()),
        }
    }

    /// `running` is [`running_nodes`](Self::running_nodes) and `index` the
    /// [`backing_index`](Self::backing_index), both read once for the whole delete.
    async fn plan_merge(
        &self,
        rec: &SnapshotRecord,
        d: &DiskRecord,
        running: &[(String, String)],
        index: &BackingIndex,
    ) -> ServiceResult<Merge> {
        let image = d.data_file().clone();
        let Some(overlay) = d.overlay.clone() else {
            return Ok(Merge::Keep);
        };
        if !image.exists() {
            return Ok(Merge::Keep);
        }
        let deps = index.dependents(&image);
        let live = self.state().is_active();
        let node = |p: &Path| {
            running
                .iter()
                .find(|(f, _)| Path::new(f) == p)
                .map(|(_, n)| n.clone())
        };
        // The overlay may be gone already: merged away by the delete of a later snapshot.
        let base_fmt = index
            .backing(&overlay)?
            .map(|(_, f)| f)
            .unwrap_or_else(|| d.format.clone());
        let chain = match live && self.resumed_merges.contains(&overlay) {
            true => self.chain_files(&d.target).await?,
            false => Vec::new(),
        };
        // A live merge is over when the overlay left the guest's chain; an offline one only
        // once its overlay file is gone (it is removed after the commit and the rebases, and
        // a `qemu-img commit` cut short is simply run again).
        let merge_over = match live {
            true => !chain.contains(&overlay) && chain.contains(&image),
            false => !overlay.exists(),
        };
        if self.resumed_merges.contains(&overlay) && merge_over {
            // Recovery: the merge an interrupted delete started has finished (recovery waited
            // for a live job); the overlay file may be removed already.
            return Ok(Merge::Merged {
                overlay,
                image,
                base_fmt,
            });
        }
        if deps == [overlay.clone()] {
            // Internal snapshots taken while the overlay was the active image keep their tags
            // (and VM state) in the overlay's own snapshot table, which committing the overlay
            // into the image would lose: refused, before any change. (Streaming into the overlay
            // instead, below, keeps them.)
            let mut tagged: Vec<String> = self
                .info
                .borrow()
                .snapshots
                .values()
                .filter(|r| {
                    r.id != rec.id
                        && record::disks(r)
                            .iter()
                            .any(|x| x.mode == "internal" && x.image == overlay)
                })
                .map(|r| r.name.clone())
                .collect();
            if !tagged.is_empty() {
                tagged.sort();
                return Err(ServiceError::Unsupported(format!(
                    "deleting snapshot {:?}: internal snapshots {} keep their state in its overlay \
                     {}, which the delete would merge away; delete them first, or delete {:?} \
                     with its children",
                    rec.name,
                    tagged.join(", "),
                    overlay.display(),
                    rec.name
                )));
            }
            match (node(&overlay), node(&image)) {
                (Some(top), Some(base)) => {
                    // The disk's root node is the node of its active file in the definition;
                    // QEMU refuses a `device` that is not a root node, so a definition out of
                    // step with the guest fails the commit rather than misdirecting it.
                    let active_file = self
                        .info
                        .borrow()
                        .def
                        .disks
                        .iter()
                        .find(|x| x.target == d.target)
                        .map(|x| x.source.clone());
                    let device = match active_file.as_deref().and_then(node) {
                        Some(n) => n,
                        None => self.top_node_of(&d.target).await?,
                    };
                    Ok(Merge::CommitLive {
                        device,
                        top,
                        base,
                        overlay,
                        image,
                        base_fmt,
                        active: false,
                    })
                }
                (None, None) => Ok(Merge::CommitOffline {
                    overlay,
                    image,
                    base_fmt,
                }),
                _ => Err(ServiceError::Unsupported(format!(
                    "deleting snapshot {:?}: disk {} has a chain shape that cannot be merged while \
                     the guest runs; shut the domain off and delete it then",
                    rec.name, d.target
                ))),
            }
            .map(|mut m| {
                if let Merge::CommitLive {
                    device,
                    top,
                    active,
                    ..
                } = &mut m
                {
                    *active = device == top;
                }
                m
            })
        } else {
            // Branches: each dependent takes a copy of the image's data (a safe rebase onto the
            // image's own backing file), after which the image is no longer needed.
            let needed_elsewhere = self.info.borrow().snapshots.values().any(|r| {
                r.id != rec.id
                    && record::disks(r).iter().any(|x| {
                        x.data_file() == &image || (x.mode == "internal" && x.image == image)
                    })
            }) || self
                .info
                .borrow()
                .def
                .disks
                .iter()
                .any(|x| x.source == image);
            let Some((backing, fmt)) = index.backing(&image)? else {
                // A root image: every branch keeps using it as it is.
                return Ok(Merge::Keep);
            };
            if needed_elsewhere {
                return Ok(Merge::Keep);
            }
            // Dependents the running guest uses are streamed by QEMU itself; the others are
            // rebased offline (reading the shared images with force-share).
            let mut live = Vec::new();
            let mut offline = Vec::new();
            for dep in deps {
                match node(&dep) {
                    Some(n) => live.push(n),
                    None => offline.push(dep),
                }
            }
            let base_node = if live.is_empty() {
                None
            } else {
                Some(node(&backing).ok_or_else(|| {
                    ServiceError::Unsupported(format!(
                        "deleting snapshot {:?}: the backing file of disk {}'s image is not open \
                         in the running guest; shut the domain off and delete it then",
                        rec.name, d.target
                    ))
                })?)
            };
            Ok(Merge::Stream {
                image,
                backing,
                backing_fmt: fmt,
                dependents: offline,
                live,
                base_node,
            })
        }
    }

    /// Runs the live `block-commit`s `commits` (all [`Merge::CommitLive`], one per disk) at
    /// once: every overlay is journaled as merging before the first job starts, the jobs are
    /// started together and followed by their events until all ended. Returns the moved files
    /// (old, new, format); fails with the first error after every started job ended.
    async fn commit_live(
        &mut self,
        rec: &SnapshotRecord,
        commits: Vec<Merge>,
    ) -> ServiceResult<Vec<(PathBuf, PathBuf, String)>> {
        let qmp = self.qmp()?.clone();
        let commits: Vec<_> = commits
            .into_iter()
            .filter_map(|m| match m {
                Merge::CommitLive {
                    device,
                    top,
                    base,
                    overlay,
                    image,
                    base_fmt,
                    active,
                } => Some((device, top, base, overlay, image, base_fmt, active)),
                _ => None,
            })
            .collect();
        if let Some(op) = self.journal_op {
            journal::record_appending(
                &self.shared.catalog,
                op,
                journal::DELETE_MERGING,
                "merging",
                commits.iter().map(|c| json!(c.3)).collect(),
            );
        }
        let mut events = qmp.subscribe();
        let mut started = Vec::new();
        let mut failure = None;
        for (n, (device, top, base, ..)) in commits.iter().enumerate() {
            let job_id = format!("vmsnap-commit-{}-{n}", rec.id.0);
            let mut args = json!({"job-id": job_id, "device": device, "base-node": base});
            if !commits[n].6 {
                args["top-node"] = json!(top);
            }
            match qmp.execute("block-commit", Some(args)).await {
                Ok(_) => started.push(job_id),
                Err(e) => {
                    failure = Some(ServiceError::qemu(
                        "cannot start merging the snapshot's data",
                    )(e));
                    break;
                }
            }
        }
        if failure.is_none() {
            journal::crash_point(journal::DELETE_MERGING);
        }
        if let Some(j) = &self.progress {
            j.set_phase("merge");
        }
        let mut ended = self
            .wait_block_jobs(&qmp, &mut events, &started, "merging the snapshot's data")
            .await;
        let mut moved = Vec::new();
        for (job_id, (_, top, _, overlay, image, base_fmt, _)) in started.iter().zip(commits) {
            match ended.remove(job_id) {
                Some(Ok(())) => {
                    // The merged overlay left the graph; close it if the monitor still holds it.
                    let _ = qmp.blockdev_del(&top).await;
                    remove_quietly(&overlay);
                    moved.push((overlay, image, base_fmt));
                }
                Some(Err(e)) => {
                    failure.get_or_insert(e);
                }
                None => {
                    failure.get_or_insert_with(|| {
                        ServiceError::Timeout(format!("merging the snapshot's data ({job_id})"))
                    });
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(moved),
        }
    }

    /// Follows the block jobs `job_ids` until each ended (or the save timeout passed),
    /// reporting their bytes together and completing each when it is ready (an active commit).
    /// Returns each ended job's outcome.
    async fn wait_block_jobs(
        &self,
        qmp: &Qmp,
        events: &mut tokio::sync::broadcast::Receiver<crate::qmp::Event>,
        job_ids: &[String],
        what: &str,
    ) -> std::collections::HashMap<String, ServiceResult<()>> {
        let deadline = tokio::time::Instant::now() + crate::snapshot::create::SAVE_TIMEOUT;
        let mut ended = std::collections::HashMap::new();
        // Progress is read when no event came for a poll interval, not after every event: a
        // short commit then costs no monitor round trips beyond its own commands.
        let mut quiet = false;
        while ended.len() < job_ids.len() {
            if quiet
                && let Some(j) = &self.progress
                && let Ok(jobs) = qmp.execute("query-block-jobs", None).await
            {
                let ours = jobs.as_array().into_iter().flatten().filter(|b| {
                    b["device"]
                        .as_str()
                        .is_some_and(|d| job_ids.iter().any(|id| id == d))
                });
                let (done, len) = ours.fold((0, 0), |(o, l), b| {
                    (
                        o + b["offset"].as_u64().unwrap_or(0),
                        l + b["len"].as_u64().unwrap_or(0),
                    )
                });
                j.set_bytes(done, len);
            }
            let poll =
                (tokio::time::Instant::now() + crate::snapshot::create::MIGRATE_POLL).min(deadline);
            let ev = match qmp
                .wait_event(events, poll, |e| {
                    e.data
                        .get("device")
                        .and_then(serde_json::Value::as_str)
                        .is_some_and(|d| job_ids.iter().any(|id| id == d) && !ended.contains_key(d))
                        && matches!(
                            e.name.as_str(),
                            "BLOCK_JOB_READY" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_ERROR"
                        )
                })
                .await
            {
                Ok(ev) => {
                    quiet = false;
                    ev
                }
                Err(crate::qmp::QmpError::Timeout(_)) if tokio::time::Instant::now() < deadline => {
                    quiet = true;
                    continue;
                }
                Err(e) => {
                    // The monitor is gone or the time is up: every job still open failed.
                    let msg = e.to_string();
                    let mut first = Some(ServiceError::qemu(what.to_string())(e));
                    for id in job_ids {
                        ended.entry(id.clone()).or_insert_with(|| {
                            Err(first.take().unwrap_or_else(|| ServiceError::Io {
                                context: what.to_string(),
                                source: std::io::Error::other(msg.clone()),
                            }))
                        });
                    }
                    break;
                }
            };
            let id = ev.data["device"].as_str().unwrap_or_default().to_string();
            if let Some(err) = ev.data.get("error").and_then(serde_json::Value::as_str) {
                ended.insert(
                    id.clone(),
                    Err(ServiceError::Qemu {
                        context: format!("{what} failed"),
                        source: crate::qmp::QmpError::Command {
                            class: "GenericError".into(),
                            desc: err.into(),
                            command: id,
                        },
                    }),
                );
                continue;
            }
            match ev.name.as_str() {
                // An active commit waits for the switch to the merged image.
                "BLOCK_JOB_READY" => {
                    if let Err(e) = qmp.execute("job-complete", Some(json!({"id": id}))).await {
                        ended.insert(
                            id,
                            Err(ServiceError::qemu(format!("cannot finish {what}"))(e)),
                        );
                    }
                }
                "BLOCK_JOB_COMPLETED" => {
                    ended.insert(id, Ok(()));
                }
                _ => {}
            }
        }
        ended
    }

    /// Follows a block job to its end, reporting bytes and completing it when it is ready (an
    /// active commit); fails with its error.
    async fn wait_block_job(
        &self,
        qmp: &Qmp,
        events: &mut tokio::sync::broadcast::Receiver<crate::qmp::Event>,
        job_id: &str,
        what: &str,
    ) -> ServiceResult<()> {
        let deadline = tokio::time::Instant::now() + crate::snapshot::create::SAVE_TIMEOUT;
        loop {
            if let Some(j) = &self.progress
                && let Ok(jobs) = qmp.execute("query-block-jobs", None).await
                && let Some(bj) = jobs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|b| b["device"] == job_id)
            {
                j.set_bytes(
                    bj["offset"].as_u64().unwrap_or(0),
                    bj["len"].as_u64().unwrap_or(0),
                );
            }
            let poll =
                (tokio::time::Instant::now() + crate::snapshot::create::MIGRATE_POLL).min(deadline);
            let ev = match qmp
                .wait_event(events, poll, |e| {
                    e.data.get("device").and_then(serde_json::Value::as_str) == Some(job_id)
                        && matches!(
                            e.name.as_str(),
                            "BLOCK_JOB_READY" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_ERROR"
                        )
                })
                .await
            {
                Ok(ev) => ev,
                Err(crate::qmp::QmpError::Timeout(_)) if tokio::time::Instant::now() < deadline => {
                    continue;
                }
                Err(e) => return Err(ServiceError::qemu(what.to_string())(e)),
            };
            if let Some(err) = ev.data.get("error").and_then(serde_json::Value::as_str) {
                return Err(ServiceError::Qemu {
                    context: format!("{what} failed"),
                    source: crate::qmp::QmpError::Command {
                        class: "GenericError".into(),
                        desc: err.into(),
                        command: job_id.into(),
                    },
                });
            }
            match ev.name.as_str() {
                // An active commit waits for the switch to the merged image.
                "BLOCK_JOB_READY" => {
                    qmp.execute("job-complete", Some(json!({"id": job_id})))
                        .await
                        .map_err(ServiceError::qemu(format!("cannot finish {what}")))?;
                }
                "BLOCK_JOB_COMPLETED" => return Ok(()),
                _ => {}
            }
        }
    }

    /// The files of the running guest's chain for disk `target`, top first.
    async fn chain_files(&self, target: &str) -> ServiceResult<Vec<PathBuf>> {
        let qmp = self.qmp()?;
        let blocks = qmp
            .query_block()
            .await
            .map_err(ServiceError::qemu("cannot list the guest's disks"))?;
        let mut out = Vec::new();
        let top = blocks
            .into_iter()
            .find(|b| {
                b.qdev
                    .as_deref()
                    .and_then(crate::service::qdev_target)
                    .as_deref()
                    == Some(target)
            })
            .and_then(|b| b.inserted.map(|i| i.image));
        let mut image = top.as_ref();
        while let Some(i) = image {
            out.push(PathBuf::from(&i.filename));
            image = i.backing_image.as_deref();
        }
        Ok(out)
    }

    async fn top_node_of(&self, target: &str) -> ServiceResult<String> {
        let qmp = self.qmp()?;
        let blocks = qmp
            .query_block()
            .await
            .map_err(ServiceError::qemu("cannot list the guest's disks"))?;
        blocks
            .into_iter()
            .find(|b| {
                b.qdev
                    .as_deref()
                    .and_then(crate::service::qdev_target)
                    .as_deref()
                    == Some(target)
            })
            .and_then(|b| b.inserted.map(|i| i.node_name))
            .ok_or_else(|| {
                ServiceError::InvalidState(format!("disk {target} is not in the running guest"))
            })
    }

    /// Carries out a merge; returns (old file, new file, format) when a file's data moved.
    async fn run_merge(
        &mut self,
        rec: &SnapshotRecord,
        m: Merge,
    ) -> ServiceResult<Option<(PathBuf, PathBuf, String)>> {
        match m {
            Merge::Keep => Ok(None),
            Merge::Merged {
                overlay,
                image,
                base_fmt,
            } => {
                // The merged overlay left the chain; close its node if the monitor holds it.
                if let (Some(qmp), true) = (self.qmp.clone(), self.state().is_active())
                    && let Ok(nodes) = qmp.query_named_block_nodes().await
                {
                    for n in nodes
                        .iter()
                        .filter(|n| n.drv != "file" && Path::new(&n.file) == overlay)
                    {
                        let _ = qmp.blockdev_del(&n.node_name).await;
                    }
                }
                if overlay.exists() {
                    remove_quietly(&overlay);
                }
                Ok(Some((overlay, image, base_fmt)))
            }
            Merge::CommitOffline {
                overlay,
                image,
                base_fmt,
            } => {
                let deps = self.dependents(&overlay).await?;
                if let Some(op) = self.journal_op {
                    // Recovery learns that this overlay's data may have moved already.
                    journal::append(&self.shared.catalog, op, "merging", json!(overlay));
                }
                qemu_img(&[
                    "commit".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    overlay.as_os_str(),
                ])
                .await?;
                for f in deps {
                    // The data is the same through the merged image: only the header changes.
                    rebase(&f, &image, &base_fmt, "-u").await?;
                }
                remove_quietly(&overlay);
                Ok(Some((overlay, image, base_fmt)))
            }
            m @ Merge::CommitLive { .. } => Ok(self.commit_live(rec, vec![m]).await?.pop()),
            Merge::Stream {
                image,
                backing,
                backing_fmt,
                dependents,
                live,
                base_node,
            } => {
                if let (Some(base), false) = (&base_node, live.is_empty()) {
                    let qmp = self.qmp()?.clone();
                    for (n, top) in live.iter().enumerate() {
                        let job_id = format!("vmsnap-stream-{}-{n}", rec.id.0);
                        let mut events = qmp.subscribe();
                        if let Some(op) = self.journal_op {
                            journal::record(
                                &self.shared.catalog,
                                op,
                                journal::DELETE_MERGING,
                                json!({"streaming": image}),
                            );
                        }
                        qmp.execute(
                            "block-stream",
                            Some(json!({"job-id": job_id, "device": top, "base-node": base})),
                        )
                        .await
                        .map_err(ServiceError::qemu(
                            "cannot start copying the snapshot's data into a branch",
                        ))?;
                        journal::crash_point(journal::DELETE_MERGING);
                        self.wait_block_job(
                            &qmp,
                            &mut events,
                            &job_id,
                            "copying the snapshot's data into a branch",
                        )
                        .await?;
                    }
                }
                for f in &dependents {
                    // A safe rebase copies the image's data into the branch; the images the
                    // guest holds open are read with force-share.
                    rebase(f, &backing, &backing_fmt, "-U").await?;
                }
                remove_quietly(&image);
                Ok(None)
            }
        }
    }

    /// Points every record and the definition that named a merged-away file at the file that
    /// now holds its data; returns the ids of the records it changed.
    fn retarget_records(
        &self,
        deleted: SnapshotId,
        moved: &[(PathBuf, PathBuf, String)],
    ) -> ServiceResult<Vec<SnapshotId>> {
        let info = self.info.borrow().clone();
        let mut retargeted = Vec::new();
        let mut cat = self.shared.catalog.lock().expect("catalog lock poisoned");
        for r in info.snapshots.values().filter(|r| r.id != deleted) {
            let mut disks = r.disks.value();
            let mut changed = false;
            for d in disks.as_array_mut().into_iter().flatten() {
                for (old, new, fmt) in moved {
                    if d.get("image").and_then(serde_json::Value::as_str) == old.to_str() {
                        d["image"] = json!(new);
                        d["format"] = json!(fmt);
                        changed = true;
                    }
                }
            }
            if changed {
                let mut r2 = r.clone();
                r2.disks = disks.into();
                cat.update_snapshot(&r2)?;
                retargeted.push(r.id);
            }
        }
        drop(cat);
        let mut def = info.def.clone();
        let mut def_changed = false;
        for disk in def.disks.iter_mut() {
            for (old, new, fmt) in moved {
                if &disk.source == old {
                    disk.source = new.clone();
                    disk.format = fmt.parse().unwrap_or(disk.format);
                    def_changed = true;
                }
            }
        }
        if def_changed {
            self.persist_def(&def)?;
            self.info.send_modify(|i| i.def = def);
        }
        Ok(retargeted)
    }
}

/// The backing file (and its format) of each existing image a domain knows of, read at one
/// moment; see [`Actor::backing_index`].
/// An image whose header could not be read keeps its error.
struct BackingIndex(Vec<(PathBuf, HeaderRead)>);

/// An image's backing file and its format as its header names them (or why it was unreadable).
type HeaderRead = Result<Option<(PathBuf, String)>, String>;

impl BackingIndex {
    /// The images directly backed by `base` (an unreadable image is reported and skipped).
    fn dependents(&self, base: &Path) -> Vec<PathBuf> {
        self.0
            .iter()
            .filter(|(f, _)| f != base)
            .filter(|(f, b)| match b {
                Ok(b) => b.as_ref().is_some_and(|(b, _)| b == base),
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "cannot read the backing file of a known image");
                    false
                }
            })
            .map(|(f, _)| f.clone())
            .collect()
    }

    /// The backing file and format `image` names; `None` for an image without one or one
    /// that did not exist when the index was read.
    fn backing(&self, image: &Path) -> ServiceResult<Option<(PathBuf, String)>> {
        match self.0.iter().find(|(f, _)| f == image) {
            None => Ok(None),
            Some((_, Ok(b))) => Ok(b.clone()),
            Some((_, Err(e))) => Err(ServiceError::io(format!(
                "cannot read the header of {}",
                image.display()
            ))(std::io::Error::other(e.clone()))),
        }
    }
}

/// How a deleted external snapshot's data is merged away.
enum Merge {
    /// Nothing to merge: the image stays (other snapshots or branches need it as it is).
    Keep,
    /// Recovery: a live commit of `overlay` into `image` finished before the daemon stopped;
    /// only the overlay file is left to remove.
    Merged {
        overlay: PathBuf,
        image: PathBuf,
        base_fmt: String,
    },
    /// The overlay is the image's only dependent and QEMU has neither open: `qemu-img commit`.
    CommitOffline {
        overlay: PathBuf,
        image: PathBuf,
        base_fmt: String,
    },
    /// The overlay and image are in the running guest's chain: `block-commit` (active when the
    /// overlay is the top).
    CommitLive {
        device: String,
        top: String,
        base: String,
        overlay: PathBuf,
        image: PathBuf,
        base_fmt: String,
        active: bool,
    },
    /// Branches: every dependent takes the image's data and is put on the image's backing file:
    /// `block-stream` for the nodes of the running guest (`live`, down to `base_node`), a safe
    /// `qemu-img rebase` for the files it does not use (`dependents`).
    Stream {
        image: PathBuf,
        backing: PathBuf,
        backing_fmt: String,
        dependents: Vec<PathBuf>,
        live: Vec<String>,
        base_node: Option<String>,
    },
}

/// `qemu-img rebase` of qcow2 `file` onto `backing`; `mode` is `-u` (header only) or `-U`
/// (safe rebase that copies data, reading shared images with force-share).
async fn rebase(file: &Path, backing: &Path, backing_fmt: &str, mode: &str) -> ServiceResult<()> {
    qemu_img(&[
        "rebase".as_ref(),
        mode.as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        backing_fmt.as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
        file.as_os_str(),
    ])
    .await
    .map(|_| ())
}

fn remove_quietly(p: &Path) {
    if let Err(e) = std::fs::remove_file(p) {
        tracing::warn!(file = %p.display(), error = %e, "could not remove a merged file");
    }
}

/// The backing file (resolved as QEMU resolves it) and its format (`raw` when the header
/// names none), read from the image's header in-process (on the calling thread).
fn read_backing(file: &Path) -> std::io::Result<Option<(PathBuf, String)>> {
    Ok(crate::qcow2::probe_backing(file)?.backing.map(|b| {
        let fmt = b.format.unwrap_or_else(|| "raw".into());
        (b.path, fmt)
    }))
}

/// Runs file reads off the actor's task (image headers of possibly many files).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ServiceResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::io("a file-reading task failed")(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revert_overlay_names_are_recognised_and_nothing_else() {
        assert!(is_revert_overlay(Path::new("/i/web.s1.branch1.qcow2")));
        assert!(is_revert_overlay(Path::new("/i/web.a.b.branch12.qcow2")));
        for other in [
            "/i/web.qcow2",
            "/i/web.s1.qcow2",
            "/i/web.s1.branch.qcow2",
            "/i/web.s1.branchx.qcow2",
            "/i/web.s1.branch1.raw",
            "/i/branch1.qcow2.bak",
        ] {
            assert!(!is_revert_overlay(Path::new(other)), "{other}");
        }
    }
}
