//! The named steps of the journaled snapshot operations, and the test-only crash points at them.
//!
//! Create, revert and delete record in the catalog's `operations` table which step they have
//! reached before they make the change that step names, together with a payload naming the
//! files the operation created or is about to create. Crash recovery (`domain::recover`)
//! reads the step and the payload after an unclean stop to decide between rolling forward and
//! back.
//!
//! [`STEPS`] is the one list of step names. Every journaled step is in it, and test hook
//! `crash-at=STEP` (see `testhooks`) aborts the daemon there, as a `kill -9` would, right
//! after the step was journaled. The fault-injection tests read the list from the daemon
//! (`VMSNAPD_TEST_HOOKS=list-crash-steps vmsnapd` prints it) so that a new step cannot go
//! untested.

use serde_json::Value;
use tracing::{error, warn};

use crate::catalog::{Catalog, OperationId};

/// Journal kind of a snapshot creation.
pub const KIND_CREATE: &str = "create-snapshot";
/// Journal kind of a revert.
pub const KIND_REVERT: &str = "revert";
/// Journal kind of a snapshot deletion.
pub const KIND_DELETE: &str = "delete-snapshot";

/// Create: the pending record and the journal row exist; nothing on disk yet.
pub const CREATE_RECORDED: &str = "create.recorded";
/// Create (live): the new overlay files exist and their nodes are open, disks not switched.
pub const CREATE_OVERLAYS: &str = "create.overlays";
/// Create (live): VM state saved internally, or an external save stopped at the switchover.
pub const CREATE_MEMORY: &str = "create.memory";
/// Create (live): the disk transaction applied: the overlays are the active images.
pub const CREATE_SWITCHED: &str = "create.switched";
/// Create (offline): every `qemu-img` change made, nothing committed.
pub const CREATE_DISKS: &str = "create.disks";
/// Revert: journaled, nothing changed yet.
pub const REVERT_STARTED: &str = "revert.started";
/// Revert in place: the guest is paused by the revert, before `snapshot-load`.
pub const REVERT_PAUSED: &str = "revert.paused";
/// Revert: the snapshot's state is loaded (in place or into a new QEMU), not yet current.
pub const REVERT_LOADED: &str = "revert.loaded";
/// Revert on new files: the old QEMU is gone, new files are about to be created.
pub const REVERT_DESTROYED: &str = "revert.destroyed";
/// Revert on new files: the new overlays or copies exist, the definition is the old one.
pub const REVERT_FILES: &str = "revert.files";
/// Revert on new files: the definition naming the new files is stored, no QEMU yet.
pub const REVERT_DEFINED: &str = "revert.defined";
/// Delete: journaled, nothing changed yet.
pub const DELETE_STARTED: &str = "delete.started";
/// Delete: the internal tags are gone; merges not started.
pub const DELETE_TAGS: &str = "delete.tags";
/// Delete: a live merge (`block-commit` / `block-stream`) is started; its crash point is right
/// after QEMU accepted the job, so that recovery finds the job running.
pub const DELETE_MERGING: &str = "delete.merging";
/// Delete: every merge is done, records not yet pointed at the merged files.
pub const DELETE_MERGED: &str = "delete.merged";
/// Delete: the record is gone, the memory file not yet removed.
pub const DELETE_UNCATALOGED: &str = "delete.uncataloged";

/// Every journaled step, in the order the operations pass them.
pub const STEPS: &[&str] = &[
    CREATE_RECORDED,
    CREATE_OVERLAYS,
    CREATE_MEMORY,
    CREATE_SWITCHED,
    CREATE_DISKS,
    REVERT_STARTED,
    REVERT_PAUSED,
    REVERT_LOADED,
    REVERT_DESTROYED,
    REVERT_FILES,
    REVERT_DEFINED,
    DELETE_STARTED,
    DELETE_TAGS,
    DELETE_MERGING,
    DELETE_MERGED,
    DELETE_UNCATALOGED,
];

/// Records that `op` reached `step` (merging `extra` into its payload), then honours test hook
/// `crash-at=STEP`. A journal write that fails is logged: the operation goes on, and recovery
/// then works from the previous step, which every decision tolerates.
pub fn step(catalog: &std::sync::Mutex<Catalog>, op: OperationId, step: &str, extra: Value) {
    record(catalog, op, step, extra);
    crash_point(step);
}

/// Records that `op` reached `step` like [`step`], without its crash point (for a step whose
/// crash point comes later, see [`DELETE_MERGING`]).
pub fn record(catalog: &std::sync::Mutex<Catalog>, op: OperationId, step: &str, extra: Value) {
    debug_assert!(STEPS.contains(&step), "unlisted journal step {step}");
    let mut cat = catalog.lock().expect("catalog lock poisoned");
    let mut payload = pending_payload(&mut cat, op);
    if let (Some(p), Value::Object(e)) = (payload.as_object_mut(), extra) {
        p.extend(e);
    }
    if let Err(e) = cat.set_operation_step(op, step, &payload) {
        warn!(step, error = %e, "could not journal an operation step");
    }
}

/// The payload `op` has journaled so far (an empty object if the row cannot be read).
fn pending_payload(cat: &mut Catalog, op: OperationId) -> Value {
    cat.pending_operations()
        .ok()
        .and_then(|ops| ops.into_iter().find(|o| o.id == op))
        .map(|o| o.payload)
        .unwrap_or_else(|| Value::Object(Default::default()))
}

/// Appends `value` to the array `key` of `op`'s payload, leaving its step as it is (for
/// files an operation is about to create, or merges it is about to start).
pub fn append(catalog: &std::sync::Mutex<Catalog>, op: OperationId, key: &str, value: Value) {
    let mut cat = catalog.lock().expect("catalog lock poisoned");
    let Some(rec) = cat
        .pending_operations()
        .ok()
        .and_then(|ops| ops.into_iter().find(|o| o.id == op))
    else {
        return;
    };
    let mut payload = rec.payload;
    match payload[key].as_array_mut() {
        Some(list) => list.push(value),
        None => payload[key] = Value::Array(vec![value]),
    }
    if let Err(e) = cat.set_operation_step(op, &rec.step, &payload) {
        warn!(key, error = %e, "could not journal an operation's progress");
    }
}

/// Records that `op` reached `step` like [`record`], appending `values` to the array `key`
/// of its payload in the same commit (what [`append`] per value and then [`record`] would do
/// in several).
pub fn record_appending(
    catalog: &std::sync::Mutex<Catalog>,
    op: OperationId,
    step: &str,
    key: &str,
    values: Vec<Value>,
) {
    debug_assert!(STEPS.contains(&step), "unlisted journal step {step}");
    let mut cat = catalog.lock().expect("catalog lock poisoned");
    let mut payload = pending_payload(&mut cat, op);
    match payload[key].as_array_mut() {
        Some(list) => list.extend(values),
        None => payload[key] = Value::Array(values),
    }
    if let Err(e) = cat.set_operation_step(op, step, &payload) {
        warn!(step, error = %e, "could not journal an operation step");
    }
}

/// Test hook `crash-at=STEP`: aborts the process at `step`, leaving everything as a `kill -9`
/// would (no destructors, no rollback).
pub fn crash_point(step: &str) {
    if crate::testhooks::values("crash-at")
        .iter()
        .any(|v| v == step)
    {
        error!(step, "test hook: crashing");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_unique_and_named_after_their_operation() {
        let mut seen = std::collections::HashSet::new();
        for step in STEPS {
            assert!(seen.insert(step), "{step} is listed twice");
            let (op, name) = step.split_once('.').expect("OPERATION.STEP");
            assert!(matches!(op, "create" | "revert" | "delete"), "{step}");
            assert!(
                !name.is_empty() && !step.contains(',') && !step.contains(':'),
                "{step} must fit in a test-hook entry"
            );
        }
    }

    #[test]
    fn a_step_merges_its_payload_and_an_append_grows_a_list() {
        let cat = std::sync::Mutex::new(Catalog::open_in_memory().unwrap());
        let domain = cat
            .lock()
            .unwrap()
            .insert_domain(&crate::catalog::NewDomain {
                name: "d".into(),
                uuid: "u".into(),
                kind: crate::catalog::DomainKind::Managed,
                xml: "<domain/>".into(),
                qmp_socket: None,
            })
            .unwrap();
        let op = cat
            .lock()
            .unwrap()
            .begin_operation(domain.id, KIND_DELETE, &serde_json::json!({"snapshot": 3}))
            .unwrap();
        step(
            &cat,
            op,
            DELETE_STARTED,
            serde_json::json!({"metadata_only": false}),
        );
        append(&cat, op, "merging", serde_json::json!("/a"));
        record_appending(
            &cat,
            op,
            DELETE_MERGING,
            "merging",
            vec![serde_json::json!("/b")],
        );
        let ops = cat.lock().unwrap().pending_operations().unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].step, DELETE_MERGING);
        assert_eq!(
            ops[0].payload,
            serde_json::json!({"snapshot": 3, "metadata_only": false, "merging": ["/a", "/b"]})
        );
    }
}
