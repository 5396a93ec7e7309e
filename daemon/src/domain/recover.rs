//! Crash recovery and on-demand verification of a domain's snapshots.
//!
//! [`Actor::reconcile`] runs once per domain when the daemon starts, after the actor
//! re-attached to a guest that still runs and before the actor serves any request (so before
//! `READY=1`). It first settles what a killed daemon left running in QEMU, then decides every
//! journaled operation from its last step (see `journal`) and from what QEMU (`query-block`,
//! `query-jobs`, `query-block-jobs`, `query-migrate`) and the images really hold, then marks
//! committed records whose files vanished `broken`.
//!
//! Settling QEMU: a VM state save (`migrate`) still active or stopped at its switchover is
//! cancelled; a `vmsnap-*` block job is followed to its end (an active commit that is ready is
//! completed); concluded `vmsnap-*` jobs are noted and dismissed.
//!
//! Decision table (step = the last journaled step of the operation):
//!
//! | operation | step                               | what is found                     | decision |
//! |-----------|------------------------------------|-----------------------------------|----------|
//! | create    | none yet / `create.recorded` / `create.overlays` / `create.memory` | disks not switched | back: close new nodes, delete the tag of that name, remove the planned files nothing references, drop the record |
//! | create    | `create.switched`                  | overlays active, tags and VM state complete | forward: definition with the overlays, record committed and current |
//! | create    | `create.switched`                  | overlays active, external VM state incomplete | back, keeping the overlays (as a failed create after the switch does): definition names them, memory file removed, record dropped |
//! | create    | `create.disks` (offline)           | every overlay backed by its image, every tag present | forward; otherwise back (renamed images renamed back first) |
//! | create    | any                                | record already committed          | forward: only the journal row goes |
//! | revert    | `revert.started`                   | nothing changed                   | back: journal row goes |
//! | revert    | `revert.paused` (in place)         | load job concluded without error  | forward: current, resumed if the revert paused it; otherwise back: resumed if the revert paused it |
//! | revert    | `revert.loaded`                    | the snapshot's state is loaded    | forward: current, resumed if the revert ends running |
//! | revert    | `revert.destroyed` / `revert.files` / `revert.defined` | the old guest is gone | back to the old definition (a half-started QEMU destroyed, new files removed), then the revert runs again: forward |
//! | delete    | `delete.started`                   | nothing changed                   | back: journal row goes |
//! | delete    | `delete.tags` / `delete.merging` / `delete.merged` | data already merged away | forward: the delete runs again; removed tags and finished merges count as done |
//! | delete    | `delete.uncataloged`               | record gone                       | forward: memory file removed |
//!
//! A pending record without a journal row is dropped. A committed record one of whose files
//! is missing is marked `broken`, never deleted; reverting it is refused with a typed error.
//!
//! Files are removed only when the journal names them as created by the operation and neither
//! the domain's definition nor any other record names them.
//!
//! [`Actor::check`] makes the same verification on demand, read-only, and reports per
//! snapshot `ok`, `broken`, `mismatch` or `pending` with the reason, and the orphan files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::{info, warn};

use super::actor::{Actor, qemu_img};
use super::def::DomainDef;
use super::state::GuestEvent;
use crate::catalog::{OperationRecord, SnapshotId, SnapshotRecord, SnapshotStatus};
use crate::error::{ServiceError, ServiceResult};
use crate::journal;
use crate::qmp::Qmp;
use crate::snapshot::record;

/// How long recovery waits for a block job left by a killed daemon, or a cancelled migration.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often recovery polls QEMU while settling.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// One row of a domain check: what was checked, its name, the verdict and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRow {
    /// `snapshot` or `orphan`.
    pub what: String,
    /// The snapshot's name, or the orphan file's path.
    pub name: String,
    /// `ok`, `broken`, `mismatch`, `pending` or `orphan`.
    pub verdict: String,
    /// Why, empty for `ok`.
    pub reason: String,
}

/// What settling QEMU found.
#[derive(Debug, Default)]
struct Settled {
    /// Concluded `vmsnap-*` jobs: id -> error (None when it succeeded).
    concluded: HashMap<String, Option<String>>,
    /// The status of a migration found (before any cancel), if any.
    migration: Option<String>,
}

fn files_of(payload: &Value) -> Vec<PathBuf> {
    payload["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(PathBuf::from)
        .collect()
}

/// Every file a definition and a set of records name.
fn referenced(def: &DomainDef, recs: &BTreeMap<SnapshotId, SnapshotRecord>) -> BTreeSet<PathBuf> {
    let mut out: BTreeSet<PathBuf> = def.disks.iter().map(|d| d.source.clone()).collect();
    for r in recs.values() {
        for d in record::disks(r) {
            out.insert(d.image.clone());
            out.extend(d.overlay.clone());
            out.extend(d.snapshot_file.clone());
        }
        if let Some(f) = record::memory(r).file {
            out.insert(f);
        }
    }
    out
}

/// The internal snapshot tags of an image, read with force-share.
async fn image_tags(image: &Path) -> ServiceResult<Vec<String>> {
    let out = qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        image.as_os_str(),
    ])
    .await?;
    let v: Value = serde_json::from_str(&out).unwrap_or_default();
    Ok(v["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect())
}

/// The backing chain of an image as `qemu-img info --backing-chain -U` reports it.
async fn backing_chain(image: &Path) -> ServiceResult<Vec<Value>> {
    let out = qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--backing-chain".as_ref(),
        "--output=json".as_ref(),
        image.as_os_str(),
    ])
    .await?;
    let v: Value = serde_json::from_str(&out).map_err(|e| ServiceError::Io {
        context: format!("cannot read the backing chain of {}", image.display()),
        source: std::io::Error::other(e),
    })?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn backing_of_info(info: &Value) -> Option<PathBuf> {
    info["full-backing-filename"]
        .as_str()
        .or(info["backing-filename"].as_str())
        .map(PathBuf::from)
}

impl Actor {
    fn op_payload(&self, op: &OperationRecord) -> Value {
        op.payload.clone()
    }

    fn finish_op(&self, op: &OperationRecord) {
        if let Err(e) = self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .finish_operation(op.id)
        {
            warn!(error = %e, "recovery: could not close a journal row");
        }
    }

    /// Reloads the domain's definition, current snapshot and records from the catalog.
    fn reload_from_catalog(&self) {
        let cat = self.shared.catalog.lock().expect("catalog lock poisoned");
        let Ok(d) = cat.domain(self.id()) else { return };
        let Ok(snaps) = cat.snapshots(self.id()) else {
            return;
        };
        drop(cat);
        let def = DomainDef::from_xml(&d.xml).ok();
        let map = snaps.into_iter().map(|s| (s.id, s)).collect();
        self.info.send_modify(|i| {
            if let Some(def) = def {
                i.def = def;
            }
            i.current_snapshot = d.current_snapshot;
            i.snapshots = Arc::new(map);
        });
    }

    /// Removes the journaled `files` that nothing references any more.
    fn remove_unreferenced(&self, files: &[PathBuf]) {
        let info = self.info.borrow().clone();
        let keep = referenced(&info.def, &info.snapshots);
        for f in files {
            if keep.contains(f) || !f.exists() {
                continue;
            }
            match std::fs::remove_file(f) {
                Ok(()) => {
                    info!(domain = %info.def.name, file = %f.display(), "recovery: removed an orphan file")
                }
                Err(e) => {
                    warn!(file = %f.display(), error = %e, "recovery: could not remove an orphan file")
                }
            }
        }
    }

    /// Settles what a killed daemon left running in QEMU (see the module doc).
    async fn settle_qemu(&self, qmp: &Qmp) -> Settled {
        let mut out = Settled::default();
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        if let Ok(st) = qmp.execute("query-migrate", None).await {
            let status = st["status"].as_str().unwrap_or("").to_string();
            if matches!(
                status.as_str(),
                "active" | "pre-switchover" | "device" | "setup"
            ) {
                warn!(domain = %self.name(), status, "recovery: cancelling an unfinished VM state save");
                let _ = qmp.execute("migrate_cancel", None).await;
                while tokio::time::Instant::now() < deadline {
                    let s = qmp
                        .execute("query-migrate", None)
                        .await
                        .ok()
                        .and_then(|v| v["status"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    if matches!(s.as_str(), "cancelled" | "failed" | "completed" | "") {
                        break;
                    }
                    tokio::time::sleep(SETTLE_POLL).await;
                }
            }
            if !status.is_empty() {
                out.migration = Some(status);
            }
        }
        // Block jobs: followed to their end; a ready active commit is completed.
        while tokio::time::Instant::now() < deadline {
            let jobs = match qmp.execute("query-block-jobs", None).await {
                Ok(v) => v.as_array().cloned().unwrap_or_default(),
                Err(_) => break,
            };
            let ours: Vec<&Value> = jobs
                .iter()
                .filter(|j| {
                    j["device"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("vmsnap-"))
                })
                .collect();
            if ours.is_empty() {
                break;
            }
            for j in ours {
                if j["ready"].as_bool() == Some(true) {
                    let id = j["device"].as_str().unwrap_or_default();
                    info!(domain = %self.name(), job = id, "recovery: completing a ready block job");
                    let _ = qmp.execute("job-complete", Some(json!({"id": id}))).await;
                }
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
        // Jobs: note and dismiss the concluded ones; wait for the others.
        while tokio::time::Instant::now() < deadline {
            let Ok(jobs) = qmp.query_jobs().await else {
                break;
            };
            let mut waiting = false;
            for j in jobs.into_iter().filter(|j| j.id.starts_with("vmsnap-")) {
                if j.status == "concluded" {
                    let _ = qmp.job_dismiss(&j.id).await;
                    out.concluded.insert(j.id, j.error);
                } else if j.status != "null" {
                    waiting = true;
                }
            }
            if !waiting {
                break;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
        out
    }

    /// Reconciles the catalog with QEMU and the images after an unclean stop (module doc).
    pub(super) async fn reconcile(&mut self) {
        let ops: Vec<OperationRecord> = match self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .pending_operations()
        {
            Ok(ops) => ops
                .into_iter()
                .filter(|o| o.domain_id == self.id())
                .collect(),
            Err(e) => {
                warn!(domain = %self.name(), error = %e, "recovery: cannot read the journal");
                return;
            }
        };
        let has_pending = self
            .info
            .borrow()
            .snapshots
            .values()
            .any(|r| r.status == SnapshotStatus::Pending);
        if !ops.is_empty() || has_pending {
            let settled = match self.qmp.clone() {
                Some(q) if self.state().is_active() => self.settle_qemu(&q).await,
                _ => Settled::default(),
            };
            let mut rerun: Vec<(String, Value)> = Vec::new();
            for op in &ops {
                info!(domain = %self.name(), kind = %op.kind, step = %op.step, "recovery: unfinished operation");
                let r = match op.kind.as_str() {
                    journal::KIND_CREATE => self.recover_create(op, &settled).await,
                    journal::KIND_REVERT => self.recover_revert(op, &settled, &mut rerun).await,
                    journal::KIND_DELETE => self.recover_delete(op, &mut rerun).await,
                    other => {
                        warn!(
                            kind = other,
                            "recovery: unknown operation kind; journal row dropped"
                        );
                        self.finish_op(op);
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    warn!(domain = %self.name(), error = %e, "recovery: could not settle an operation");
                }
                self.reload_from_catalog();
            }
            // Pending records no journal row explains: nothing can be known about their files.
            let orphans: Vec<SnapshotId> = self
                .info
                .borrow()
                .snapshots
                .values()
                .filter(|r| r.status == SnapshotStatus::Pending)
                .map(|r| r.id)
                .collect();
            for id in orphans {
                warn!(domain = %self.name(), snapshot = %id, "recovery: dropping a pending record without a journal row");
                let _ = self
                    .shared
                    .catalog
                    .lock()
                    .expect("catalog lock poisoned")
                    .delete_snapshot(id);
            }
            self.reload_from_catalog();
            for (kind, payload) in rerun {
                self.rerun(&kind, &payload).await;
                self.reload_from_catalog();
            }
        }
        self.mark_vanished();
    }

    /// Runs an interrupted revert or delete again (rolling it forward).
    async fn rerun(&mut self, kind: &str, payload: &Value) {
        let Some(id) = payload["snapshot"].as_i64().map(SnapshotId) else {
            return;
        };
        let r = match kind {
            journal::KIND_REVERT => {
                let running = payload["running"].as_bool();
                self.revert(id, running).await
            }
            _ => {
                let metadata_only = payload["metadata_only"].as_bool().unwrap_or(false);
                self.resumed_merges = payload["merging"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(PathBuf::from)
                    .collect();
                self.journal_resuming = true;
                let r = self.delete_snapshot(id, metadata_only).await;
                self.journal_resuming = false;
                self.resumed_merges.clear();
                r
            }
        };
        match r {
            Ok(()) => {
                info!(domain = %self.name(), kind, "recovery: finished the interrupted operation")
            }
            Err(e) => {
                warn!(domain = %self.name(), kind, error = %e, "recovery: the interrupted operation could not be finished")
            }
        }
    }

    /// Marks committed records with a missing file `broken`.
    fn mark_vanished(&self) {
        let snaps = self.info.borrow().snapshots.clone();
        let mut exists: HashMap<PathBuf, bool> = HashMap::new();
        let mut present = |p: &Path| *exists.entry(p.to_path_buf()).or_insert_with(|| p.exists());
        let mut changed = false;
        for r in snaps
            .values()
            .filter(|r| r.status == SnapshotStatus::Committed)
        {
            let missing = missing_files(r, &mut present);
            if let Some(f) = missing.first() {
                warn!(domain = %self.name(), snapshot = %r.name, file = %f.display(), "a snapshot's file vanished; marking it broken");
                if let Err(e) = self
                    .shared
                    .catalog
                    .lock()
                    .expect("catalog lock poisoned")
                    .mark_broken(r.id)
                {
                    warn!(error = %e, "could not mark a snapshot broken");
                }
                changed = true;
            }
        }
        if changed {
            self.reload_from_catalog();
        }
    }

    async fn recover_create(
        &mut self,
        op: &OperationRecord,
        settled: &Settled,
    ) -> ServiceResult<()> {
        let p = self.op_payload(op);
        let name = p["name"].as_str().unwrap_or_default().to_string();
        let rec = self
            .info
            .borrow()
            .snapshots
            .values()
            .find(|r| r.name == name)
            .cloned();
        let files = files_of(&p);
        let Some(rec) = rec else {
            // Crashed before the record was written: only files can be left.
            self.finish_op(op);
            self.remove_unreferenced(&files);
            return Ok(());
        };
        if rec.status != SnapshotStatus::Pending {
            self.finish_op(op);
            return Ok(());
        }
        let disks = record::disks(&rec);
        let mem = record::memory(&rec);
        let def_after = p["def_after"]
            .as_str()
            .and_then(|x| DomainDef::from_xml(x).ok());
        let live = p["live"].as_bool().unwrap_or(false);
        let qmp = self.qmp.clone().filter(|_| self.state().is_active());
        // Where do the disks stand?
        let externals: Vec<&record::DiskRecord> =
            disks.iter().filter(|d| d.mode == "external").collect();
        let switched = if live {
            match &qmp {
                Some(q) => {
                    let blocks = q
                        .query_block()
                        .await
                        .map_err(ServiceError::qemu("cannot list the guest's disks"))?;
                    let tops: HashMap<String, String> = blocks
                        .into_iter()
                        .filter_map(|b| {
                            let t = crate::service::qdev_target(b.qdev.as_deref()?)?;
                            Some((t, b.inserted?.file))
                        })
                        .collect();
                    !externals.is_empty()
                        && externals.iter().all(|d| {
                            d.overlay.as_ref().and_then(|o| o.to_str())
                                == tops.get(&d.target).map(String::as_str)
                        })
                        || (externals.is_empty() && op.step == journal::CREATE_SWITCHED)
                }
                // QEMU went away too: the journal says whether the disks had switched.
                None => op.step == journal::CREATE_SWITCHED,
            }
        } else {
            false
        };
        let mut tags_ok = true;
        for d in disks.iter().filter(|d| d.mode == "internal") {
            tags_ok &= image_tags(&d.image)
                .await
                .map(|t| t.contains(&rec.name))
                .unwrap_or(false);
        }
        let memory_ok = match mem.mode.as_str() {
            "external" => settled.migration.as_deref() == Some("completed"),
            _ => true,
        };
        let offline_done = !live && op.step == journal::CREATE_DISKS && {
            let mut ok = tags_ok;
            for d in &externals {
                let Some(o) = &d.overlay else { continue };
                ok &= match backing_chain(o).await {
                    Ok(chain) => {
                        chain.first().and_then(backing_of_info).as_deref() == Some(d.data_file())
                    }
                    Err(_) => false,
                };
            }
            ok
        };
        let running_before = p["running"].as_bool().unwrap_or(false);
        if (switched && tags_ok && memory_ok) || offline_done {
            info!(domain = %self.name(), snapshot = %rec.name, "recovery: the snapshot was complete; committing it");
            {
                let mut cat = self.shared.catalog.lock().expect("catalog lock poisoned");
                if let Some(def) = &def_after {
                    cat.update_domain_xml(self.id(), &def.to_xml())?;
                }
                cat.commit_snapshot(rec.id, true)?;
                cat.finish_operation(op.id)?;
            }
            self.reload_from_catalog();
            self.resume_if(running_before).await;
            return Ok(());
        }
        warn!(domain = %self.name(), snapshot = %rec.name, switched, "recovery: rolling the snapshot back");
        // Back. Internal tags of this name were made by this operation (create refuses a name
        // an image already holds).
        for d in disks.iter().filter(|d| d.mode == "internal") {
            let has = image_tags(&d.image)
                .await
                .map(|t| t.contains(&rec.name))
                .unwrap_or(false);
            if has {
                self.delete_tag_anyhow(&rec, &d.image, &d.target).await;
            }
        }
        if let Some(q) = &qmp
            && !switched
        {
            // Close the new overlays' nodes that no disk uses.
            if let Ok(nodes) = q.query_named_block_nodes().await {
                for n in nodes.iter().filter(|n| {
                    n.drv != "file"
                        && externals
                            .iter()
                            .any(|d| d.overlay.as_deref() == Some(Path::new(&n.file)))
                }) {
                    let _ = q.blockdev_del(&n.node_name).await;
                }
            }
        }
        // Offline keep-active-name: the image was renamed to the snapshot's name.
        if !live {
            for d in &externals {
                if let Some(renamed) = &d.snapshot_file
                    && renamed.exists()
                {
                    if let Some(o) = &d.overlay
                        && o == &d.image
                        && o.exists()
                    {
                        let _ = std::fs::remove_file(o);
                    }
                    if let Err(e) = std::fs::rename(renamed, &d.image) {
                        warn!(file = %renamed.display(), error = %e, "recovery: could not rename an image back");
                    }
                }
            }
        }
        {
            let mut cat = self.shared.catalog.lock().expect("catalog lock poisoned");
            if switched && let Some(def) = &def_after {
                // The guest runs on the overlays: the definition must name them.
                cat.update_domain_xml(self.id(), &def.to_xml())?;
            }
            cat.delete_snapshot(rec.id)?;
            cat.finish_operation(op.id)?;
        }
        self.reload_from_catalog();
        self.remove_unreferenced(&files);
        self.resume_if(running_before).await;
        Ok(())
    }

    /// Deletes internal tag `rec.name` from `image`: through QEMU when the running guest holds
    /// it, with `qemu-img` otherwise.
    async fn delete_tag_anyhow(&self, rec: &SnapshotRecord, image: &Path, target: &str) {
        let live = match (self.qmp.clone(), self.state().is_active()) {
            (Some(q), true) => {
                let job_id = format!("vmsnap-recover-{}-{target}", rec.id.0);
                let what = "removing an unfinished snapshot's tag";
                match super::nodes::Graph::fetch(&q).await {
                    Ok(g) => {
                        super::nodes::delete_tag_live(&q, &g, image, &rec.name, &job_id, what).await
                    }
                    Err(e) => Err(ServiceError::qemu("cannot list the guest's block nodes")(e)),
                }
            }
            _ => Ok(false),
        };
        let r = match live {
            Ok(true) => Ok(()),
            Err(e) => Err(e),
            Ok(false) => qemu_img(&[
                "snapshot".as_ref(),
                "-d".as_ref(),
                rec.name.as_ref(),
                image.as_os_str(),
            ])
            .await
            .map(|_| ()),
        };
        if let Err(e) = r {
            warn!(image = %image.display(), error = %e, "recovery: could not remove an internal tag");
        }
    }

    /// Resumes a guest that ran before the interrupted operation and is paused now.
    async fn resume_if(&mut self, was_running: bool) {
        if !was_running {
            return;
        }
        let Some(q) = self.qmp.clone().filter(|_| self.state().is_active()) else {
            return;
        };
        match q.query_status().await {
            Ok(st) if !st.running && st.status != "inmigrate" => match q.cont().await {
                Ok(()) => {
                    info!(domain = %self.name(), "recovery: resumed the guest");
                    self.apply(GuestEvent::Resumed);
                }
                Err(e) => warn!(error = %e, "recovery: could not resume the guest"),
            },
            _ => {}
        }
    }

    async fn recover_revert(
        &mut self,
        op: &OperationRecord,
        settled: &Settled,
        rerun: &mut Vec<(String, Value)>,
    ) -> ServiceResult<()> {
        let p = self.op_payload(op);
        let id = p["snapshot"].as_i64().map(SnapshotId);
        let set_current = |a: &Actor| -> ServiceResult<()> {
            if let Some(id) = id {
                a.shared
                    .catalog
                    .lock()
                    .expect("catalog lock poisoned")
                    .set_current_snapshot(a.id(), Some(id))?;
            }
            Ok(())
        };
        match op.step.as_str() {
            journal::REVERT_PAUSED => {
                let loaded = id.is_some_and(|id| {
                    settled
                        .concluded
                        .get(&format!("vmsnap-load-{}", id.0))
                        .is_some_and(Option::is_none)
                });
                if loaded {
                    set_current(self)?;
                }
                self.finish_op(op);
                self.resume_if(p["paused_by_us"].as_bool().unwrap_or(false))
                    .await;
            }
            journal::REVERT_LOADED => {
                set_current(self)?;
                self.finish_op(op);
                self.resume_if(p["end_running"].as_bool().unwrap_or(false))
                    .await;
            }
            journal::REVERT_DESTROYED | journal::REVERT_FILES | journal::REVERT_DEFINED => {
                if self.state().is_active() {
                    let _ = self.destroy().await;
                }
                if let Some(old) = p["old_def"].as_str()
                    && let Ok(def) = DomainDef::from_xml(old)
                {
                    self.persist_def(&def)?;
                }
                self.finish_op(op);
                self.reload_from_catalog();
                self.remove_unreferenced(&files_of(&p));
                rerun.push((op.kind.clone(), p));
            }
            _ => self.finish_op(op),
        }
        Ok(())
    }

    async fn recover_delete(
        &mut self,
        op: &OperationRecord,
        rerun: &mut Vec<(String, Value)>,
    ) -> ServiceResult<()> {
        let p = self.op_payload(op);
        self.finish_op(op);
        match op.step.as_str() {
            journal::DELETE_TAGS | journal::DELETE_MERGING | journal::DELETE_MERGED => {
                rerun.push((op.kind.clone(), p));
            }
            journal::DELETE_UNCATALOGED => {
                let files: Vec<PathBuf> = p["memory_file"]
                    .as_str()
                    .map(PathBuf::from)
                    .into_iter()
                    .collect();
                self.remove_unreferenced(&files);
            }
            _ => {}
        }
        Ok(())
    }

    /// Verifies every snapshot of the domain against its images, read-only (module doc).
    pub(super) async fn check(&self) -> ServiceResult<Vec<CheckRow>> {
        let info = self.info.borrow().clone();
        let mut rows = Vec::new();
        let mut recs: Vec<&SnapshotRecord> = info.snapshots.values().collect();
        recs.sort_by_key(|r| (r.created_at, r.id));
        let mut tags_cache: HashMap<PathBuf, Option<Vec<String>>> = HashMap::new();
        for r in recs {
            let (verdict, reason) = self.check_record(r, &mut tags_cache).await;
            rows.push(CheckRow {
                what: "snapshot".into(),
                name: r.name.clone(),
                verdict: verdict.into(),
                reason,
            });
        }
        let ops = self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .pending_operations()?;
        let keep = referenced(&info.def, &info.snapshots);
        for op in ops.iter().filter(|o| o.domain_id == info.id) {
            let mut files = files_of(&op.payload);
            files.extend(op.payload["memory_file"].as_str().map(PathBuf::from));
            for f in files
                .into_iter()
                .filter(|f| f.exists() && !keep.contains(f))
            {
                rows.push(CheckRow {
                    what: "orphan".into(),
                    name: f.display().to_string(),
                    verdict: "orphan".into(),
                    reason: format!("created by an unfinished {} and used by nothing", op.kind),
                });
            }
        }
        Ok(rows)
    }

    async fn check_record(
        &self,
        r: &SnapshotRecord,
        tags_cache: &mut HashMap<PathBuf, Option<Vec<String>>>,
    ) -> (&'static str, String) {
        if r.status == SnapshotStatus::Pending {
            return ("pending", "an operation on it has not finished".into());
        }
        let mut present = |p: &Path| p.exists();
        if let Some(f) = missing_files(r, &mut present).first() {
            return ("broken", format!("missing file {}", f.display()));
        }
        for d in record::disks(r).iter().filter(|d| d.mode != "no") {
            let chain = match backing_chain(d.data_file()).await {
                Ok(c) => c,
                Err(e) => {
                    return (
                        "broken",
                        format!("{} cannot be read: {e}", d.data_file().display()),
                    );
                }
            };
            let found = chain
                .first()
                .and_then(|i| i["format"].as_str())
                .unwrap_or("");
            if !d.format.is_empty() && found != d.format {
                return (
                    "mismatch",
                    format!(
                        "{} is a {found} image, not {}",
                        d.data_file().display(),
                        d.format
                    ),
                );
            }
            if d.mode == "internal" {
                let tags = match tags_cache.get(&d.image) {
                    Some(t) => t.clone(),
                    None => {
                        let t = image_tags(&d.image).await.ok();
                        tags_cache.insert(d.image.clone(), t.clone());
                        t
                    }
                };
                if !tags.unwrap_or_default().contains(&r.name) {
                    return (
                        "broken",
                        format!(
                            "internal tag {:?} missing from {}",
                            r.name,
                            d.image.display()
                        ),
                    );
                }
            }
            if d.mode == "external"
                && let Some(o) = d.overlay.as_ref().filter(|o| o.exists())
                && let Ok(chain) = backing_chain(o).await
            {
                let below: Vec<PathBuf> = chain
                    .iter()
                    .skip(1)
                    .filter_map(|i| i["filename"].as_str().map(PathBuf::from))
                    .collect();
                if !below.iter().any(|b| b == d.data_file()) {
                    return (
                        "mismatch",
                        format!(
                            "backing chain mismatch: {} is not backed by {}",
                            o.display(),
                            d.data_file().display()
                        ),
                    );
                }
            }
        }
        if r.status == SnapshotStatus::Broken {
            return ("broken", "marked broken when the daemon started".into());
        }
        ("ok", String::new())
    }

    /// Refuses to use a broken record (reverting it cannot give back its data).
    pub(super) fn refuse_broken(&self, rec: &SnapshotRecord) -> ServiceResult<()> {
        if rec.status == SnapshotStatus::Broken {
            return Err(ServiceError::InvalidState(format!(
                "snapshot {:?} is broken (one of its files vanished); it cannot be reverted to, \
                 only deleted with metadata-only",
                rec.name
            )));
        }
        Ok(())
    }
}

/// The files of a record that do not exist, per `present`.
fn missing_files(r: &SnapshotRecord, present: &mut dyn FnMut(&Path) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in record::disks(r).iter().filter(|d| d.mode != "no") {
        if !present(d.data_file()) {
            out.push(d.data_file().clone());
        }
    }
    let mem = record::memory(r);
    if mem.mode == "external"
        && let Some(f) = mem.file
        && !present(&f)
    {
        out.push(f);
    }
    out
}
