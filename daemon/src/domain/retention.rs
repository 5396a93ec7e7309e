//! The actor's side of retention: a delete that re-checks protection in the actor, and the
//! `Protected` flag.
//!
//! A prune plans from a copy of the domain's information and deletes one snapshot at a time;
//! a `Protected` change may arrive between two of them. The check is therefore made here, in
//! the one task that also does the delete, so a snapshot protected before its delete starts is
//! never deleted.

use std::sync::Arc;

use tracing::info;

use super::actor::Actor;
use crate::catalog::SnapshotId;
use crate::error::{ServiceError, ServiceResult};

impl Actor {
    /// Deletes `id` (merging its data like any delete) unless it is gone, protected or the
    /// current snapshot; returns whether it was deleted.
    pub(super) async fn prune_delete(&mut self, id: SnapshotId) -> ServiceResult<bool> {
        let (skip, name) = {
            let info = self.info.borrow();
            match info.snapshots.get(&id) {
                None => (true, String::new()),
                Some(r) => (
                    r.protected || info.current_snapshot == Some(id),
                    r.name.clone(),
                ),
            }
        };
        if skip {
            info!(snapshot = %id, "prune: left alone (gone, protected or current meanwhile)");
            return Ok(false);
        }
        self.delete_snapshot(id, false).await?;
        info!(snapshot = %name, "prune: deleted");
        Ok(true)
    }

    /// Sets a snapshot's `protected` flag in the catalog and in the published information.
    pub(super) fn set_protected(&mut self, id: SnapshotId, protected: bool) -> ServiceResult<()> {
        let mut rec = {
            let info = self.info.borrow();
            info.snapshots
                .get(&id)
                .cloned()
                .ok_or_else(|| ServiceError::NoSuchSnapshot {
                    domain: info.def.name.clone(),
                    name: id.to_string(),
                })?
        };
        if rec.protected == protected {
            return Ok(());
        }
        rec.protected = protected;
        self.shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .update_snapshot(&rec)?;
        info!(snapshot = %rec.name, protected, "snapshot protection changed");
        self.info.send_modify(|i| {
            Arc::make_mut(&mut i.snapshots).insert(id, rec);
        });
        Ok(())
    }
}
