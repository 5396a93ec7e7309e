//! Carrying out a validated snapshot plan, on a live guest through QMP or on a shut-off
//! domain through `qemu-img`, and undoing every step when any step fails.
//!
//! Order of a live snapshot: the catalog record is written as pending and the operation is
//! journaled first; then new files are created exclusively (never over an existing file) and
//! their nodes opened; the guest is paused only when VM state is saved; disk switches happen in
//! one QMP `transaction`; finally the record is committed together with the new definition.
//! Every step that changed something registers its undo first, so a failure or a cancel leaves
//! no file, node, internal snapshot or record behind and resumes a guest that was running.
//!
//! Once the disk transaction applied, the new overlays are the active images of the running
//! guest and cannot be taken back. A failure after that point keeps them: the definition with
//! the overlays is persisted, the snapshot's record is removed, everything else (internal
//! snapshots, the memory file, a pause of our own) is undone, and the error says so.
//!
//! External VM state is written by `migrate` to a file descriptor passed with `getfd`. The
//! `pause-before-switchover` capability stops the migration after the vCPUs stopped and before
//! the disks are handed over, which is where the disks are switched: memory and disks are then
//! from the same instant, also with `live`.

use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

use super::plan::{DiskMode, MemoryMode, Plan};
use crate::catalog::{Catalog, DomainId, NewSnapshot, SnapshotId, SnapshotRecord};
use crate::domain::actor::qemu_img;
use crate::error::{ServiceError, ServiceResult};
use crate::job::Job;
use crate::qmp::Qmp;

/// How long an internal `snapshot-save` may take.
pub const SAVE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often a QEMU job's state is read while its events are awaited (a safety net only).
const JOB_RECHECK: Duration = Duration::from_secs(1);
/// How often polling loops look again (block job progress, the end of a cancelled migration).
pub const MIGRATE_POLL: Duration = Duration::from_millis(50);
/// How often a VM state save's progress is read while it waits for QEMU's next `MIGRATION`
/// event (the event, not this interval, ends the wait when the save changes state).
const MIGRATE_PROGRESS: Duration = Duration::from_millis(250);
/// Bandwidth limit set for writing VM state to a local file: in effect none.
const MIGRATE_MAX_BANDWIDTH: u64 = 1 << 40;
/// Test-hook step: new overlay files created and their nodes added, the guest not yet touched.
const STEP_AFTER_OVERLAYS: &str = "after-overlays";
/// Test-hook step: internal VM state saved, or external VM state at the switchover point.
const STEP_AFTER_MEMORY: &str = "after-memory";
/// Test-hook step: the disk transaction applied (overlays active), nothing committed yet.
const STEP_AFTER_TRANSACTION: &str = "after-transaction";
/// Test-hook step: offline, every `qemu-img` change made, nothing committed yet.
const STEP_AFTER_DISKS: &str = "after-disks";
/// fd name under which the memory file is handed to QEMU.
const MEMORY_FD_NAME: &str = "vmsnap-memory";

/// Where a snapshot is taken.
pub struct Target<'a> {
    /// The live guest's QMP session; `None` for a shut-off domain.
    pub qmp: Option<&'a Qmp>,
    /// Whether the vCPUs run now (resumed after a pause of our own).
    pub running: bool,
}

/// The top block node serving each disk target of a live guest, with its size and format.
#[derive(Debug, Clone)]
struct TopNode {
    node: String,
    virtual_size: u64,
    format: String,
    snapshots: Vec<String>,
}

/// Everything done so far, in the order it was done, so it can be undone.
#[derive(Default)]
struct Undo {
    files: Vec<PathBuf>,
    nodes: Vec<String>,
    live_internal: Vec<(String, String)>,
    offline_internal: Vec<(PathBuf, String)>,
    renamed: Vec<(PathBuf, PathBuf)>,
    paused_by_us: bool,
    images_inactive: bool,
    /// The disk transaction switched disks to new overlays: they stay, whatever fails later.
    switched: bool,
    /// A VM state save reached its switchover point, where QEMU stopped the vCPUs; a cancel
    /// from there leaves a guest that did not run in `postmigrate` rather than `paused`.
    at_switchover: bool,
    record: Option<SnapshotId>,
    operation: Option<crate::catalog::OperationId>,
}

async fn top_nodes(qmp: &Qmp) -> ServiceResult<std::collections::HashMap<String, TopNode>> {
    let blocks = qmp
        .query_block()
        .await
        .map_err(ServiceError::qemu("cannot list the guest's disks"))?;
    let mut out = std::collections::HashMap::new();
    for b in blocks {
        let (Some(qdev), Some(ins)) = (b.qdev.as_deref(), b.inserted.as_ref()) else {
            continue;
        };
        let Some(target) = crate::service::qdev_target(qdev) else {
            continue;
        };
        out.insert(
            target,
            TopNode {
                node: ins.node_name.clone(),
                virtual_size: ins.image.virtual_size,
                format: ins.image.format.clone(),
                snapshots: ins.image.snapshots.iter().map(|s| s.name.clone()).collect(),
            },
        );
    }
    Ok(out)
}

/// Creates `path` exclusively, readable only by the daemon.
/// Inside the daemon the storage policy confines it (see `storage`); without one (the library
/// alone) it still never follows a link.
pub(crate) fn create_exclusive(path: &Path) -> ServiceResult<std::fs::File> {
    if let Some(policy) = crate::storage::installed() {
        return Ok(policy.create_new(path)?);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                ServiceError::AlreadyExists(format!("{} already exists", path.display()))
            } else {
                ServiceError::io(format!("cannot create {}", path.display()))(e)
            }
        })
}

/// Node name of a new overlay: short (QEMU allows 31 characters) and not among the names
/// `taken` in the guest's graph. Snapshot ids can be used again (a failed snapshot's record is
/// removed) while an overlay node named after the earlier one still serves a disk.
fn overlay_node(
    taken: &std::collections::HashSet<String>,
    snapshot: SnapshotId,
    target: &str,
) -> String {
    let first = format!("snap{}-{target}", snapshot.0);
    if !taken.contains(&first) {
        return first;
    }
    (1u32..)
        .map(|n| format!("snap{}.{n}-{target}", snapshot.0))
        .find(|name| !taken.contains(name))
        .expect("some suffix is free")
}

fn io_context(msg: String) -> impl FnOnce(std::io::Error) -> ServiceError {
    ServiceError::io(msg)
}

/// Test hook `fail-at`: fails when it names `step`, for every snapshot or for this one.
fn fail_point(plan: &Plan, step: &str) -> ServiceResult<()> {
    let hit = crate::testhooks::values("fail-at")
        .iter()
        .any(|v| match v.split_once(':') {
            Some((s, name)) => s == step && name == plan.name,
            None => v == step,
        });
    if hit {
        warn!(snapshot = %plan.name, step, "test hook: failing the snapshot");
        return Err(ServiceError::Io {
            context: format!("test hook: failing at step {step}"),
            source: std::io::Error::other("failure injected by VMSNAPD_TEST_HOOKS"),
        });
    }
    Ok(())
}

/// The bandwidth limit of an external VM state save: test hook `migrate-bandwidth`, or none.
fn migrate_bandwidth() -> u64 {
    match crate::testhooks::value("migrate-bandwidth") {
        Some(v) => v.parse().unwrap_or_else(|_| {
            warn!(value = %v, "test hook migrate-bandwidth is not a byte count; ignored");
            MIGRATE_MAX_BANDWIDTH
        }),
        None => MIGRATE_MAX_BANDWIDTH,
    }
}

/// The error of a snapshot that failed after its disk transaction: the caller must learn that
/// the disks moved on to the new overlays although no snapshot was recorded.
fn after_switch(e: ServiceError, plan: &Plan) -> ServiceError {
    let overlays: Vec<String> = plan
        .disks
        .iter()
        .filter(|d| d.mode == DiskMode::External)
        .filter_map(|d| d.overlay.as_ref())
        .map(|o| o.display().to_string())
        .collect();
    let note = format!(
        "the snapshot was not recorded, but the disks now use the new overlays {} (the domain \
         definition names them)",
        overlays.join(", ")
    );
    match e {
        ServiceError::Io { context, source } => ServiceError::Io {
            context: format!("{note}; {context}"),
            source,
        },
        ServiceError::Qemu { context, source } => ServiceError::Qemu {
            context: format!("{note}; {context}"),
            source,
        },
        ServiceError::Cancelled(m) => ServiceError::Cancelled(format!("{note}; {m}")),
        ServiceError::Timeout(m) => ServiceError::Timeout(format!("{note}; {m}")),
        other => ServiceError::Io {
            context: note,
            source: std::io::Error::other(other.to_string()),
        },
    }
}

/// Where a snapshot's record goes.
pub struct Record<'a> {
    /// The catalog.
    pub catalog: &'a Mutex<Catalog>,
    /// The domain.
    pub domain: DomainId,
    /// The new snapshot's parent (the domain's current snapshot).
    pub parent: Option<SnapshotId>,
    /// Who asked: `manual`, or a schedule.
    pub origin: &'a str,
    /// Creation time, unix seconds.
    pub now_unix: i64,
}

/// Takes the snapshot described by `plan`; returns its committed record.
pub async fn create(
    record: Record<'_>,
    plan: &Plan,
    target: Target<'_>,
    job: &Job,
) -> ServiceResult<SnapshotRecord> {
    let Record {
        catalog,
        domain,
        parent,
        origin,
        now_unix,
    } = record;
    let mut undo = Undo::default();
    let result = run(
        catalog, domain, parent, origin, plan, &target, job, now_unix, &mut undo,
    )
    .await;
    match result {
        Ok(rec) => Ok(rec),
        Err(e) => {
            warn!(snapshot = %plan.name, error = %e, "snapshot failed; undoing");
            let switched = undo.switched;
            rollback(catalog, domain, plan, &target, &mut undo).await;
            if switched {
                Err(after_switch(e, plan))
            } else {
                Err(e)
            }
        }
    }
}

/// JSON kept in the catalog for the per-disk part of a snapshot.
pub fn disks_json(plan: &Plan) -> Value {
    Value::Array(
        plan.disks
            .iter()
            .map(|d| {
                json!({
                    "target": d.target,
                    "mode": d.mode.as_str(),
                    "format": d.format.as_str(),
                    "image": d.image,
                    "overlay": d.overlay,
                    "snapshot_file": d.snapshot_file,
                })
            })
            .collect(),
    )
}

/// JSON kept in the catalog for the VM-state part of a snapshot.
pub fn memory_json(plan: &Plan) -> Value {
    json!({
        "mode": plan.memory.as_str(),
        "file": plan.memory_file,
        "vmstate_disk": plan.vmstate_disk,
    })
}

#[allow(clippy::too_many_arguments)]
async fn run(
    catalog: &Mutex<Catalog>,
    domain: DomainId,
    parent: Option<SnapshotId>,
    origin: &str,
    plan: &Plan,
    target: &Target<'_>,
    job: &Job,
    now_unix: i64,
    undo: &mut Undo,
) -> ServiceResult<SnapshotRecord> {
    job.set_phase("prepare");
    let live = target.qmp.is_some();
    let tops = match target.qmp {
        Some(q) => top_nodes(q).await?,
        None => Default::default(),
    };
    // Checks that need the images (before any change).
    for d in plan.disks.iter().filter(|d| d.mode == DiskMode::Internal) {
        let existing = if live {
            tops.get(&d.target)
                .map(|t| t.snapshots.clone())
                .unwrap_or_default()
        } else {
            offline_snapshot_tags(&d.image).await?
        };
        if existing.iter().any(|t| t == &plan.name) {
            return Err(ServiceError::AlreadyExists(format!(
                "disk {} already holds an internal snapshot named {:?}",
                d.target, plan.name
            )));
        }
    }
    if live {
        for d in plan.disks.iter().filter(|d| d.mode != DiskMode::No) {
            if !tops.contains_key(&d.target) {
                return Err(ServiceError::InvalidState(format!(
                    "disk {} is not attached to the running guest",
                    d.target
                )));
            }
        }
    }
    let files: Vec<&PathBuf> = plan
        .disks
        .iter()
        .flat_map(|d| [d.overlay.as_ref(), d.snapshot_file.as_ref()])
        .flatten()
        .chain(plan.memory_file.as_ref())
        .collect();
    let (op, rec) = catalog
        .lock()
        .expect("catalog lock poisoned")
        .begin_operation_with_pending_snapshot(
            crate::journal::KIND_CREATE,
            crate::journal::CREATE_RECORDED,
            &json!({
                "name": plan.name,
                "files": files,
                "running": target.running,
                "live": live,
                "def_after": plan.def_after.to_xml(),
            }),
            &NewSnapshot {
                domain_id: domain,
                name: plan.name.clone(),
                description: plan.description.clone(),
                created_at: now_unix,
                state: plan.state.as_str().to_string(),
                kind: plan.kind.as_str().to_string(),
                parent,
                domain_xml: plan.def_before.to_xml(),
                memory: memory_json(plan),
                disks: disks_json(plan),
                origin: origin.to_string(),
                protected: false,
            },
        )?;
    undo.operation = Some(op);
    undo.record = Some(rec.id);
    // The row started at this step, naming the record: no commit of its own.
    crate::journal::crash_point(crate::journal::CREATE_RECORDED);
    let step = |name: &str| crate::journal::step(catalog, op, name, json!({}));
    match target.qmp {
        Some(qmp) => live_steps(qmp, plan, target.running, job, rec.id, &tops, undo, &step).await?,
        None => offline_steps(plan, job, undo, &step).await?,
    }
    job.set_phase("commit");
    job.set_cancelable(false);
    let rec = {
        let mut cat = catalog.lock().expect("catalog lock poisoned");
        cat.commit_snapshot_and_finish(rec.id, &plan.def_after.to_xml(), op)?;
        cat.snapshot(rec.id)?
    };
    undo.record = None;
    undo.operation = None;
    info!(snapshot = %plan.name, kind = plan.kind.as_str(), memory = plan.memory.as_str(), "snapshot created");
    Ok(rec)
}

async fn offline_snapshot_tags(image: &Path) -> ServiceResult<Vec<String>> {
    let out = qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        image.as_os_str(),
    ])
    .await?;
    let v: Value = serde_json::from_str(&out).map_err(|e| ServiceError::Io {
        context: "cannot read qemu-img info".into(),
        source: std::io::Error::other(e),
    })?;
    Ok(v.get("snapshots")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.get("name").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

async fn offline_steps(
    plan: &Plan,
    job: &Job,
    undo: &mut Undo,
    step: &(dyn Fn(&str) + Sync),
) -> ServiceResult<()> {
    job.set_phase("disks");
    let total = plan
        .disks
        .iter()
        .filter(|d| d.mode != DiskMode::No)
        .count()
        .max(1);
    let mut done = 0;
    for d in &plan.disks {
        match d.mode {
            DiskMode::No => continue,
            DiskMode::Internal => {
                qemu_img(&[
                    "snapshot".as_ref(),
                    "-c".as_ref(),
                    plan.name.as_ref(),
                    d.image.as_os_str(),
                ])
                .await?;
                undo.offline_internal
                    .push((d.image.clone(), plan.name.clone()));
            }
            DiskMode::External => {
                let overlay = d
                    .overlay
                    .as_ref()
                    .expect("planned external disks have an overlay");
                let backing = match &d.snapshot_file {
                    Some(renamed) => {
                        // Keep the active name: the image moves to the snapshot's name and a new
                        // overlay takes its place.
                        if renamed.exists() {
                            return Err(ServiceError::AlreadyExists(format!(
                                "{} already exists",
                                renamed.display()
                            )));
                        }
                        std::fs::rename(&d.image, renamed)
                            .map_err(io_context(format!("cannot rename {}", d.image.display())))?;
                        undo.renamed.push((d.image.clone(), renamed.clone()));
                        renamed.clone()
                    }
                    None => d.image.clone(),
                };
                drop(create_exclusive(overlay)?);
                undo.files.push(overlay.clone());
                qemu_img(&[
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-F".as_ref(),
                    d.format.as_str().as_ref(),
                    "-b".as_ref(),
                    backing.as_os_str(),
                    overlay.as_os_str(),
                ])
                .await?;
            }
        }
        done += 1;
        job.set_progress(done as f64 / total as f64);
    }
    step(crate::journal::CREATE_DISKS);
    fail_point(plan, STEP_AFTER_DISKS)
}

#[allow(clippy::too_many_arguments)]
async fn live_steps(
    qmp: &Qmp,
    plan: &Plan,
    running: bool,
    job: &Job,
    snapshot: SnapshotId,
    tops: &std::collections::HashMap<String, TopNode>,
    undo: &mut Undo,
    step: &(dyn Fn(&str) + Sync),
) -> ServiceResult<()> {
    if plan.disks.iter().any(|d| d.snapshot_file.is_some()) {
        return Err(ServiceError::Unsupported(
            "keeping the active file name is supported on shut-off domains only: a running QEMU \
             holds the image open under its old name"
                .into(),
        ));
    }
    // New overlays: files first, then their nodes (not yet in the graph).
    let mut actions = Vec::new();
    // Node names in use are read from QEMU only when a first choice is refused: on a long
    // chain the list is a large reply that QEMU takes tens of milliseconds to build.
    let mut taken = std::collections::HashSet::new();
    for d in plan.disks.iter().filter(|d| d.mode == DiskMode::External) {
        let top = &tops[&d.target];
        let overlay = d
            .overlay
            .as_ref()
            .expect("planned external disks have an overlay");
        let file = create_exclusive(overlay)?;
        undo.files.push(overlay.clone());
        // The header of an empty overlay is written in-process into the file just created:
        // a `qemu-img create` process per disk cost more than all the rest of a snapshot.
        crate::qcow2::write_overlay(&file, &d.image, &top.format, top.virtual_size).map_err(
            io_context(format!("cannot write the overlay {}", overlay.display())),
        )?;
        drop(file);
        let add = |node: &str| {
            qmp.blockdev_add(json!({
                "driver": "qcow2",
                "node-name": node,
                "file": {"driver": "file", "filename": overlay},
                "backing": null,
            }))
        };
        let mut node = overlay_node(&taken, snapshot, &d.target);
        if let Err(first) = add(&node).await {
            // Perhaps the name is in use (snapshot ids are used again after a failed
            // snapshot): once more with a name that is free, else the first error.
            taken.extend(
                qmp.query_named_block_nodes()
                    .await
                    .map_err(ServiceError::qemu("cannot list the guest's block nodes"))?
                    .into_iter()
                    .map(|n| n.node_name),
            );
            let free = overlay_node(&taken, snapshot, &d.target);
            let opened = match free == node {
                true => Err(first),
                false => add(&free).await,
            };
            opened.map_err(ServiceError::qemu(format!(
                "cannot open the new overlay of disk {}",
                d.target
            )))?;
            node = free;
        }
        taken.insert(node.clone());
        undo.nodes.push(node.clone());
        actions.push(
            json!({"type": "blockdev-snapshot", "data": {"node": top.node, "overlay": node}}),
        );
    }
    step(crate::journal::CREATE_OVERLAYS);
    fail_point(plan, STEP_AFTER_OVERLAYS)?;
    let internal: Vec<&super::plan::DiskPlan> = plan
        .disks
        .iter()
        .filter(|d| d.mode == DiskMode::Internal)
        .collect();
    match plan.memory {
        MemoryMode::None => {
            for d in &internal {
                actions.push(json!({
                    "type": "blockdev-snapshot-internal-sync",
                    "data": {"device": tops[&d.target].node, "name": plan.name},
                }));
            }
            job.set_phase("disks");
            transaction(qmp, actions, plan, &internal, undo, tops).await?;
            step(crate::journal::CREATE_SWITCHED);
            fail_point(plan, STEP_AFTER_TRANSACTION)?;
        }
        MemoryMode::Internal => {
            // `snapshot-save` pauses a running guest for the save and resumes it itself; the
            // daemon pauses it first only when external disks must switch to their overlays
            // at the same instant (after the save, before the guest runs again).
            if running && !actions.is_empty() {
                qmp.stop()
                    .await
                    .map_err(ServiceError::qemu("cannot pause the guest"))?;
                undo.paused_by_us = true;
            }
            job.set_phase("memory");
            let vmstate = plan
                .vmstate_disk
                .as_ref()
                .expect("internal memory has a vmstate disk");
            let devices: Vec<&str> = internal
                .iter()
                .map(|d| tops[&d.target].node.as_str())
                .collect();
            save_internal(qmp, &plan.name, &tops[vmstate].node, &devices, snapshot).await?;
            undo.live_internal.extend(
                internal
                    .iter()
                    .map(|d| (tops[&d.target].node.clone(), plan.name.clone())),
            );
            step(crate::journal::CREATE_MEMORY);
            fail_point(plan, STEP_AFTER_MEMORY)?;
            job.set_phase("disks");
            transaction(qmp, actions, plan, &[], undo, tops).await?;
            step(crate::journal::CREATE_SWITCHED);
            fail_point(plan, STEP_AFTER_TRANSACTION)?;
        }
        MemoryMode::External => {
            for d in &internal {
                actions.push(json!({
                    "type": "blockdev-snapshot-internal-sync",
                    "data": {"device": tops[&d.target].node, "name": plan.name},
                }));
            }
            let file = plan
                .memory_file
                .as_ref()
                .expect("external memory has a file");
            let f = create_exclusive(file)?;
            undo.files.push(file.clone());
            if running && !plan.live {
                qmp.stop()
                    .await
                    .map_err(ServiceError::qemu("cannot pause the guest"))?;
                undo.paused_by_us = true;
            }
            job.set_phase("memory");
            job.set_cancelable(true);
            // Subscribed before the migration starts, so that no status event is missed.
            let mut events = qmp.subscribe();
            let saved = begin_external_save(qmp, &f, job, &mut events).await;
            if saved.is_ok() {
                undo.at_switchover = true;
                step(crate::journal::CREATE_MEMORY);
            }
            let saved = saved.and_then(|()| fail_point(plan, STEP_AFTER_MEMORY));
            if let Err(e) = saved {
                let _ = qmp.execute("migrate_cancel", None).await;
                wait_migration_end(qmp).await;
                return Err(e);
            }
            job.set_cancelable(false);
            job.set_phase("disks");
            let switched = transaction(qmp, actions, plan, &internal, undo, tops)
                .await
                .inspect(|()| step(crate::journal::CREATE_SWITCHED))
                .and_then(|()| fail_point(plan, STEP_AFTER_TRANSACTION));
            if let Err(e) = switched {
                let _ = qmp.execute("migrate_cancel", None).await;
                wait_migration_end(qmp).await;
                return Err(e);
            }
            job.set_phase("memory");
            finish_external_save(qmp, job, undo, &mut events).await?;
            drop(f);
            if running && plan.live {
                // The migration stopped the vCPUs at the switchover: resume them below.
                undo.paused_by_us = true;
            }
        }
    }
    job.set_cancelable(false);
    // Re-activate images after a migration and resume a guest that ran.
    if undo.paused_by_us {
        qmp.cont()
            .await
            .map_err(ServiceError::qemu("cannot resume the guest"))?;
        undo.paused_by_us = false;
        undo.images_inactive = false;
        undo.at_switchover = false;
    } else if undo.images_inactive || undo.at_switchover {
        // A guest that was paused by its user stays paused; the images a migration handed
        // over are taken back by a resume and an immediate pause.
        qmp.cont()
            .await
            .map_err(ServiceError::qemu("cannot re-activate the disks"))?;
        qmp.stop()
            .await
            .map_err(ServiceError::qemu("cannot pause the guest again"))?;
        undo.images_inactive = false;
        undo.at_switchover = false;
    }
    // The overlays are in the graph now: nothing to delete on failure from here on.
    undo.nodes.clear();
    Ok(())
}

/// Runs the disk `transaction`; on success the new overlays are part of the graph.
async fn transaction(
    qmp: &Qmp,
    actions: Vec<Value>,
    plan: &Plan,
    internal: &[&super::plan::DiskPlan],
    undo: &mut Undo,
    tops: &std::collections::HashMap<String, TopNode>,
) -> ServiceResult<()> {
    if actions.is_empty() {
        return Ok(());
    }
    qmp.execute("transaction", Some(json!({"actions": actions})))
        .await
        .map_err(ServiceError::qemu("the disk snapshot transaction failed"))?;
    // The overlays now serve the disks; the old tops became their backing nodes.
    undo.switched = !undo.nodes.is_empty();
    undo.nodes.clear();
    undo.files.retain(|f| plan.memory_file.as_ref() == Some(f));
    undo.live_internal.extend(
        internal
            .iter()
            .map(|d| (tops[&d.target].node.clone(), plan.name.clone())),
    );
    Ok(())
}

async fn save_internal(
    qmp: &Qmp,
    tag: &str,
    vmstate: &str,
    devices: &[&str],
    snapshot: SnapshotId,
) -> ServiceResult<()> {
    let job_id = format!("vmsnap-save-{}", snapshot.0);
    let mut events = qmp.subscribe();
    qmp.execute(
        "snapshot-save",
        Some(json!({"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": devices})),
    )
    .await
    .map_err(ServiceError::qemu("cannot start saving the VM state"))?;
    wait_job_concluded(qmp, &mut events, &job_id, "saving the VM state").await
}

/// Waits for a QEMU job to conclude, dismisses it and reports its error.
pub async fn wait_job_concluded(
    qmp: &Qmp,
    events: &mut tokio::sync::broadcast::Receiver<crate::qmp::Event>,
    job_id: &str,
    what: &str,
) -> ServiceResult<()> {
    let deadline = Instant::now() + SAVE_TIMEOUT;
    let concluded = |qmp: &Qmp| {
        let qmp = qmp.clone();
        let id = job_id.to_string();
        async move {
            let jobs = qmp.query_jobs().await?;
            Ok::<_, crate::qmp::QmpError>(
                jobs.into_iter()
                    .find(|j| j.id == id && j.status == "concluded"),
            )
        }
    };
    // The job's own `JOB_STATUS_CHANGE` events say when it concluded (`events` was subscribed
    // before the job started); `query-jobs` is read then, for its error, and every
    // JOB_RECHECK in case an event was lost to a lagging receiver. Reading it at every status
    // change cost a monitor round trip each on a busy guest.
    let info = loop {
        let recheck = (Instant::now() + JOB_RECHECK).min(deadline);
        match qmp
            .wait_event(events, recheck, |e| {
                e.name == "JOB_STATUS_CHANGE"
                    && e.data.get("id").and_then(Value::as_str) == Some(job_id)
                    && e.data.get("status").and_then(Value::as_str) == Some("concluded")
            })
            .await
        {
            Ok(_) => {}
            Err(crate::qmp::QmpError::Timeout(_)) if Instant::now() < deadline => {}
            Err(e) => return Err(ServiceError::qemu(what.to_string())(e)),
        }
        if let Some(j) = concluded(qmp)
            .await
            .map_err(ServiceError::qemu(what.to_string()))?
        {
            break j;
        }
    };
    let _ = qmp.job_dismiss(job_id).await;
    match info.error {
        Some(err) => Err(ServiceError::Qemu {
            context: what.to_string(),
            source: crate::qmp::QmpError::Command {
                class: "GenericError".into(),
                desc: err,
                command: job_id.to_string(),
            },
        }),
        None => Ok(()),
    }
}

/// Starts writing the VM state to `file` by migration and follows it until the switchover
/// point, where the vCPUs are stopped and the disks are still active. Cancellable until then.
/// `events` must be subscribed before the call: QEMU's `MIGRATION` events (capability
/// `events`) end each wait, so the save goes on the moment QEMU changes state.
async fn begin_external_save(
    qmp: &Qmp,
    file: &std::fs::File,
    job: &Job,
    events: &mut tokio::sync::broadcast::Receiver<crate::qmp::Event>,
) -> ServiceResult<()> {
    let prep = || ServiceError::qemu("cannot prepare the VM state save");
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "pause-before-switchover", "state": true},
            {"capability": "events", "state": true},
        ]})),
    )
    .await
    .map_err(prep())?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": migrate_bandwidth()})),
    )
    .await
    .map_err(prep())?;
    qmp.execute_with_fd(
        "getfd",
        Some(json!({"fdname": MEMORY_FD_NAME})),
        file.as_fd(),
    )
    .await
    .map_err(ServiceError::qemu("cannot hand the memory file to QEMU"))?;
    if let Err(e) = qmp
        .execute(
            "migrate",
            Some(json!({"uri": format!("fd:{MEMORY_FD_NAME}")})),
        )
        .await
    {
        let _ = qmp
            .execute("closefd", Some(json!({"fdname": MEMORY_FD_NAME})))
            .await;
        return Err(ServiceError::qemu("cannot save the VM state")(e));
    }
    let cancel = job.cancel_token();
    let mut cancelling = false;
    loop {
        match poll_migration(qmp, job).await? {
            MigrationStatus::PreSwitchover => return Ok(()),
            MigrationStatus::Completed => {
                return Err(ServiceError::Unsupported(
                    "QEMU finished the VM state save without stopping at the switchover".into(),
                ));
            }
            MigrationStatus::Active => {}
        }
        if cancel.is_cancelled() && !cancelling {
            cancelling = true;
            qmp.execute("migrate_cancel", None)
                .await
                .map_err(ServiceError::qemu("cannot cancel the VM state save"))?;
        }
        next_migration_change(qmp, events, (!cancelling).then_some(&cancel)).await;
    }
}

/// Lets a migration stopped at the switchover point finish; the images are then inactive.
async fn finish_external_save(
    qmp: &Qmp,
    job: &Job,
    undo: &mut Undo,
    events: &mut tokio::sync::broadcast::Receiver<crate::qmp::Event>,
) -> ServiceResult<()> {
    qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
        .await
        .map_err(ServiceError::qemu("cannot finish the VM state save"))?;
    undo.images_inactive = true;
    loop {
        if poll_migration(qmp, job).await? == MigrationStatus::Completed {
            break;
        }
        next_migration_change(qmp, events, None).await;
    }
    // QEMU reports `completed` (event and `query-migrate`) just before its main loop leaves
    // `finish-migrate`, and refuses `cont` until then; no event marks that moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    while qmp
        .query_status()
        .await
        .map_err(ServiceError::qemu("cannot follow the VM state save"))?
        .status
        == "finish-migrate"
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Waits for QEMU's next `MIGRATION` event, for `cancel` (when given) or for the next progress
/// read, whichever comes first; the caller then reads the migration's state.
async fn next_migration_change(
    qmp: &Qmp,
    events: &mut tokio::sync::broadcast::Receiver<crate::qmp::Event>,
    cancel: Option<&tokio_util::sync::CancellationToken>,
) {
    let deadline = Instant::now() + MIGRATE_PROGRESS;
    let event = qmp.wait_named_event(events, "MIGRATION", deadline);
    match cancel {
        Some(c) => {
            tokio::select! {
                _ = event => {}
                () = c.cancelled() => {}
            }
        }
        None => {
            let _ = event.await;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum MigrationStatus {
    Active,
    PreSwitchover,
    Completed,
}

/// One look at the migration: reports bytes to the job, turns failure into an error.
async fn poll_migration(qmp: &Qmp, job: &Job) -> ServiceResult<MigrationStatus> {
    let st = qmp
        .execute("query-migrate", None)
        .await
        .map_err(ServiceError::qemu("cannot follow the VM state save"))?;
    if let Some(ram) = st.get("ram") {
        let done = ram.get("transferred").and_then(Value::as_u64).unwrap_or(0);
        let total = ram.get("total").and_then(Value::as_u64).unwrap_or(0);
        job.set_bytes(done, total);
    }
    match st.get("status").and_then(Value::as_str).unwrap_or("") {
        "completed" => Ok(MigrationStatus::Completed),
        "pre-switchover" => Ok(MigrationStatus::PreSwitchover),
        "failed" => {
            let why = st
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("unknown reason");
            Err(ServiceError::Qemu {
                context: "saving the VM state failed".into(),
                source: crate::qmp::QmpError::Command {
                    class: "GenericError".into(),
                    desc: why.to_string(),
                    command: "migrate".into(),
                },
            })
        }
        "cancelled" => Err(ServiceError::Cancelled(
            "the snapshot was cancelled while saving the VM state".into(),
        )),
        _ => Ok(MigrationStatus::Active),
    }
}

async fn wait_migration_end(qmp: &Qmp) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match qmp.execute("query-migrate", None).await {
            Ok(st) => {
                let s = st.get("status").and_then(Value::as_str).unwrap_or("");
                if matches!(s, "completed" | "failed" | "cancelled" | "") {
                    return;
                }
            }
            Err(_) => return,
        }
        tokio::time::sleep(MIGRATE_POLL).await;
    }
}

/// Undoes what `undo` lists. After a switch the overlays stay and the definition naming them
/// is persisted instead.
async fn rollback(
    catalog: &Mutex<Catalog>,
    domain: DomainId,
    plan: &Plan,
    target: &Target<'_>,
    undo: &mut Undo,
) {
    if let Some(qmp) = target.qmp {
        for node in undo.nodes.drain(..).rev() {
            if let Err(e) = qmp.blockdev_del(&node).await {
                warn!(node = %node, error = %e, "rollback: could not delete an overlay node");
            }
        }
        for (node, tag) in undo.live_internal.drain(..) {
            let job_id = format!("vmsnap-undo-{node}");
            let mut events = qmp.subscribe();
            let r = qmp
                .execute(
                    "snapshot-delete",
                    Some(json!({"job-id": job_id, "tag": tag, "devices": [node]})),
                )
                .await;
            match r {
                Ok(_) => {
                    if let Err(e) = wait_job_concluded(qmp, &mut events, &job_id, "rollback").await
                    {
                        warn!(node = %node, error = %e, "rollback: internal snapshot not deleted");
                    }
                }
                Err(e) => {
                    warn!(node = %node, error = %e, "rollback: internal snapshot not deleted")
                }
            }
        }
        if undo.paused_by_us || undo.images_inactive || undo.at_switchover {
            if let Err(e) = qmp.cont().await {
                warn!(error = %e, "rollback: could not resume the guest");
            }
            if !undo.paused_by_us && !target.running {
                let _ = qmp.stop().await;
            }
        }
    }
    for (image, tag) in undo.offline_internal.drain(..) {
        if let Err(e) = qemu_img(&[
            "snapshot".as_ref(),
            "-d".as_ref(),
            tag.as_ref(),
            image.as_os_str(),
        ])
        .await
        {
            warn!(image = %image.display(), error = %e, "rollback: internal snapshot not deleted");
        }
    }
    for f in undo.files.drain(..) {
        if let Err(e) = std::fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(file = %f.display(), error = %e, "rollback: could not remove a new file");
        }
    }
    for (orig, renamed) in undo.renamed.drain(..).rev() {
        if let Err(e) = std::fs::rename(&renamed, &orig) {
            warn!(file = %renamed.display(), error = %e, "rollback: could not restore an image's name");
        }
    }
    let mut cat = catalog.lock().expect("catalog lock poisoned");
    if undo.switched {
        // The guest runs on the overlays: the definition must name them, or the next start
        // would boot from the images as they were before the snapshot.
        match cat.update_domain_xml(domain, &plan.def_after.to_xml()) {
            Ok(()) => warn!(
                snapshot = %plan.name,
                "rollback: the disks keep their new overlays; the definition now names them"
            ),
            Err(e) => tracing::error!(
                snapshot = %plan.name,
                error = %e,
                "rollback: the disks use new overlays but the definition could not be updated"
            ),
        }
    }
    if let Some(id) = undo.record.take()
        && let Err(e) = cat.delete_snapshot(id)
    {
        warn!(error = %e, "rollback: could not remove the pending record");
    }
    if let Some(op) = undo.operation.take()
        && let Err(e) = cat.finish_operation(op)
    {
        warn!(error = %e, "rollback: could not close the operation journal");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_node_names_avoid_the_names_in_use() {
        let mut taken = std::collections::HashSet::new();
        assert_eq!(overlay_node(&taken, SnapshotId(7), "vda"), "snap7-vda");
        taken.insert("snap7-vda".to_string());
        assert_eq!(overlay_node(&taken, SnapshotId(7), "vda"), "snap7.1-vda");
        taken.insert("snap7.1-vda".to_string());
        assert_eq!(overlay_node(&taken, SnapshotId(7), "vda"), "snap7.2-vda");
        assert_eq!(overlay_node(&taken, SnapshotId(7), "vdb"), "snap7-vdb");
    }
}
