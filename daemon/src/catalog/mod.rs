//! The persistent, crash-safe catalog of domains, their snapshots and in-flight operations.
//!
//! The catalog is one SQLite file, `catalog.sqlite3` in the daemon's state directory (default
//! `/var/lib/vmsnap`), created with mode 0600 and opened with `journal_mode=WAL`,
//! `synchronous=FULL`, `foreign_keys=ON` and a busy timeout, so that every committed change
//! survives a crash or power loss. Tables are plain TEXT/INTEGER columns (JSON documents stored
//! as text) so that an administrator can read them with the `sqlite3` CLI. The schema is
//! versioned with `PRAGMA user_version` and upgraded by ordered migrations (see `schema.rs`);
//! a file newer than this build is refused with [`CatalogError::TooNew`].
//!
//! Schema version 2 (`PRAGMA user_version = 2`, `PRAGMA application_id = 0x766d736e`):
//!
//! ```text
//! domains                                  snapshots
//! +-----------------------------------+    +------------------------------------------+
//! | id               INTEGER PK       |<---| domain_id   INTEGER NOT NULL             |
//! | name             TEXT UNIQUE      |    |             (ON DELETE CASCADE)          |
//! | uuid             TEXT UNIQUE      |    | id          INTEGER PK                   |<-+
//! | kind             managed|attached |    | name        TEXT  UNIQUE(domain_id,name) |  |
//! | xml              TEXT             |    | description TEXT  default ''             |  |
//! | qmp_socket       TEXT NULL        |    | created_at  INTEGER  unix seconds        |  |
//! |                  (attached only)  |    | state       running|paused|shutoff|      |  |
//! | current_snapshot INTEGER NULL ----+--->|             disk-snapshot                |  |
//! |     (ON DELETE SET NULL; must be  |    | kind        checkpoint|disk-only|...     |  |
//! |      a committed snapshot of the  |    | parent_id   INTEGER NULL, same domain ---+--+
//! |      same domain)                 |    | domain_xml  TEXT                         |
//! | created_at       INTEGER unix s   |    | memory      JSON text {mode, file}       |
//! | settings         JSON text '{}'   |    | disks       JSON text [per-disk records] |
//! +-----------------------------------+    | status      pending|committed|broken     |
//!            ^                             | origin      TEXT  default 'manual'       |
//!            |                             | protected   INTEGER 0|1  default 0       |
//!            |                             +------------------------------------------+
//!            |    operations (journal of in-flight multi-step operations)
//!            |    +--------------------------------------------------+
//!            +----| domain_id  INTEGER NOT NULL (ON DELETE CASCADE)  |
//!                 | id         INTEGER PK                            |
//!                 | kind       TEXT      step  TEXT                  |
//!                 | payload    JSON text started_at INTEGER unix s   |
//!                 +--------------------------------------------------+
//!
//! snapshot_xml_parts (version 2: parts of a redefined libvirt document kept verbatim)
//!     snapshot_id INTEGER PK -> snapshots(id) (ON DELETE CASCADE)
//!     parts       JSON text {domain, inactive_domain, cookie, revert_disks, disks}
//!
//! indexes: snapshots(domain_id, parent_id), snapshots(parent_id),
//!          snapshots(domain_id, created_at, id), domains(current_snapshot),
//!          operations(domain_id)
//! ```
//!
//! Invariants, checked by the methods below (the first two also by triggers in the file, so
//! that hand edits cannot break them either):
//! - a snapshot's parent exists and belongs to the same domain; parent links form no cycle;
//! - a domain's current snapshot is `None` or a *committed* snapshot of that domain;
//! - deleting a snapshot re-parents its children to its parent and moves "current" to the parent
//!   (or to none if the parent is not committed), in one transaction;
//! - deleting a domain deletes its snapshots and journalled operations.
//!
//! Snapshots follow a crash-safe protocol: [`Catalog::insert_pending_snapshot`] before any work
//! on disk, [`Catalog::commit_snapshot`] after it, [`Catalog::delete_snapshot`] on rollback.
//! Whatever is still `pending` at start-up, together with [`Catalog::pending_operations`], is
//! what crash recovery has to look at. Every multi-row change runs in one `BEGIN IMMEDIATE`
//! transaction; reads use cached prepared statements and one query per list.

mod error;
mod schema;
mod types;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use rusqlite::types::Type;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde_json::Value;

pub use error::CatalogError;
pub use types::{
    DomainId, DomainKind, DomainRecord, JsonText, NewDomain, NewSnapshot, OperationId,
    OperationRecord, SnapshotId, SnapshotRecord, SnapshotStatus, UnknownWord,
};

/// Name of the catalog file inside the state directory.
pub const CATALOG_FILE_NAME: &str = "catalog.sqlite3";

/// Step recorded by [`Catalog::begin_operation`].
pub const OPERATION_STARTED: &str = "started";

/// The newest schema version this build knows (and migrates every catalog to).
pub fn supported_schema_version() -> i64 {
    schema::latest_version()
}

const DOMAIN_COLUMNS: &str =
    "id, name, uuid, kind, xml, qmp_socket, current_snapshot, created_at, settings";
const SNAPSHOT_COLUMNS: &str = "id, domain_id, name, description, created_at, state, kind, \
     parent_id, domain_xml, memory, disks, status, origin, protected";
const OPERATION_COLUMNS: &str = "id, domain_id, kind, step, payload, started_at";

/// The catalog: one SQLite connection and the operations on it.
///
/// Not `Sync`; the daemon keeps it behind a mutex and uses it from one place.
#[derive(Debug)]
pub struct Catalog {
    conn: Connection,
    version: i64,
    path: Option<PathBuf>,
}

impl Catalog {
    /// Opens (creating as needed) `state_dir/catalog.sqlite3` and migrates it to the newest
    /// schema. Missing directories are created with mode 0700, a new file with mode 0600.
    pub fn open(state_dir: &Path) -> Result<Catalog, CatalogError> {
        let path = state_dir.join(CATALOG_FILE_NAME);
        schema::create_file(state_dir, &path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let mut conn = Connection::open_with_flags(&path, flags)?;
        let version = schema::prepare(&mut conn, true)?;
        tracing::debug!(path = %path.display(), version, "opened the catalog");
        Ok(Catalog {
            conn,
            version,
            path: Some(path),
        })
    }

    /// Opens a fresh, empty catalog that lives in memory only (for tests).
    pub fn open_in_memory() -> Result<Catalog, CatalogError> {
        let mut conn = Connection::open_in_memory()?;
        let version = schema::prepare(&mut conn, false)?;
        Ok(Catalog {
            conn,
            version,
            path: None,
        })
    }

    /// The schema version of the open file (after migration: [`supported_schema_version`]).
    pub fn schema_version(&self) -> i64 {
        self.version
    }

    /// Path of the catalog file, `None` for an in-memory catalog.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction, committed if `f` succeeds and rolled back
    /// otherwise. For multi-record changes the other methods do not cover.
    pub fn transaction<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    // ----- domains -----

    /// Adds a domain. Fails with [`CatalogError::AlreadyExists`] naming the clashing name or
    /// UUID, and with [`CatalogError::Invalid`] for an empty name/UUID or a QMP socket on a
    /// managed domain.
    pub fn insert_domain(&mut self, d: &NewDomain) -> Result<DomainRecord, CatalogError> {
        if d.name.is_empty() || d.uuid.is_empty() {
            return Err(CatalogError::Invalid(
                "a domain needs a name and a UUID".into(),
            ));
        }
        if d.kind == DomainKind::Managed && d.qmp_socket.is_some() {
            return Err(CatalogError::Invalid(format!(
                "managed domain {:?} cannot have a QMP socket",
                d.name
            )));
        }
        let socket = d.qmp_socket.as_deref().map(path_text).transpose()?;
        let created_at = now();
        self.transaction(|tx| {
            let mut clash = tx.prepare_cached(
                "SELECT name = ?1, uuid = ?2 FROM domains WHERE name = ?1 OR uuid = ?2 LIMIT 1",
            )?;
            if let Some((same_name, _)) = clash
                .query_row((&d.name, &d.uuid), |r| {
                    Ok((r.get::<_, bool>(0)?, r.get::<_, bool>(1)?))
                })
                .optional()?
            {
                return Err(CatalogError::AlreadyExists(if same_name {
                    format!("domain {:?}", d.name)
                } else {
                    format!("domain with UUID {}", d.uuid)
                }));
            }
            tx.prepare_cached(
                "INSERT INTO domains (name, uuid, kind, xml, qmp_socket, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute((&d.name, &d.uuid, d.kind, &d.xml, socket, created_at))?;
            Ok(DomainRecord {
                id: DomainId(tx.last_insert_rowid()),
                name: d.name.clone(),
                uuid: d.uuid.clone(),
                kind: d.kind,
                xml: d.xml.clone(),
                qmp_socket: d.qmp_socket.clone(),
                current_snapshot: None,
                created_at,
                settings: Value::Object(Default::default()),
            })
        })
    }

    /// All domains, ordered by name.
    pub fn domains(&self) -> Result<Vec<DomainRecord>, CatalogError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {DOMAIN_COLUMNS} FROM domains ORDER BY name"
        ))?;
        let rows = stmt.query_map([], domain_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The domain with catalog id `id`.
    pub fn domain(&self, id: DomainId) -> Result<DomainRecord, CatalogError> {
        load_domain(&self.conn, id)
    }

    /// The domain named `name`, if any.
    pub fn domain_by_name(&self, name: &str) -> Result<Option<DomainRecord>, CatalogError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {DOMAIN_COLUMNS} FROM domains WHERE name = ?1"
        ))?;
        Ok(stmt.query_row([name], domain_from_row).optional()?)
    }

    /// The domain with UUID `uuid`, if any.
    pub fn domain_by_uuid(&self, uuid: &str) -> Result<Option<DomainRecord>, CatalogError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {DOMAIN_COLUMNS} FROM domains WHERE uuid = ?1"
        ))?;
        Ok(stmt.query_row([uuid], domain_from_row).optional()?)
    }

    /// Replaces a domain's current definition.
    pub fn update_domain_xml(&mut self, id: DomainId, xml: &str) -> Result<(), CatalogError> {
        let n = self
            .conn
            .prepare_cached("UPDATE domains SET xml = ?2 WHERE id = ?1")?
            .execute((id, xml))?;
        expect_one(n, || domain_name(id))
    }

    /// Sets or clears a domain's current snapshot, which must be a committed snapshot of that
    /// domain ([`CatalogError::Invalid`] otherwise).
    pub fn set_current_snapshot(
        &mut self,
        id: DomainId,
        snap: Option<SnapshotId>,
    ) -> Result<(), CatalogError> {
        self.transaction(|tx| {
            domain_exists(tx, id)?;
            if let Some(snap) = snap {
                let (owner, status) = snapshot_owner_status(tx, snap)?;
                if owner != id {
                    return Err(CatalogError::Invalid(format!(
                        "snapshot {snap} belongs to domain {owner}, not to domain {id}"
                    )));
                }
                if status != SnapshotStatus::Committed {
                    return Err(CatalogError::Invalid(format!(
                        "snapshot {snap} is {status}; only a committed snapshot can be current"
                    )));
                }
            }
            tx.prepare_cached("UPDATE domains SET current_snapshot = ?2 WHERE id = ?1")?
                .execute((id, snap))?;
            Ok(())
        })
    }

    /// Replaces a domain's settings, which must be a JSON object.
    pub fn set_domain_settings(
        &mut self,
        id: DomainId,
        settings: &Value,
    ) -> Result<(), CatalogError> {
        if !settings.is_object() {
            return Err(CatalogError::Invalid(
                "domain settings must be a JSON object".into(),
            ));
        }
        let n = self
            .conn
            .prepare_cached("UPDATE domains SET settings = ?2 WHERE id = ?1")?
            .execute((id, settings.to_string()))?;
        expect_one(n, || domain_name(id))
    }

    /// Removes a domain together with its snapshots and journalled operations.
    pub fn delete_domain(&mut self, id: DomainId) -> Result<(), CatalogError> {
        self.transaction(|tx| {
            // Detach "current" first so that the cascade does not have to.
            tx.prepare_cached("UPDATE domains SET current_snapshot = NULL WHERE id = ?1")?
                .execute([id])?;
            let n = tx
                .prepare_cached("DELETE FROM domains WHERE id = ?1")?
                .execute([id])?;
            expect_one(n, || domain_name(id))
        })
    }

    // ----- snapshots -----

    /// Records a new snapshot with status `pending`, before any work on disk.
    ///
    /// Fails with [`CatalogError::AlreadyExists`] if the domain already has a snapshot of that
    /// name, [`CatalogError::NotFound`] for an unknown domain or parent, and
    /// [`CatalogError::Invalid`] for an empty name or a parent in another domain.
    pub fn insert_pending_snapshot(
        &mut self,
        s: &NewSnapshot,
    ) -> Result<SnapshotRecord, CatalogError> {
        self.transaction(|tx| insert_snapshot(tx, s, SnapshotStatus::Pending))
    }

    /// Marks a snapshot committed and, if `make_current`, makes it its domain's current
    /// snapshot, in one transaction.
    pub fn commit_snapshot(
        &mut self,
        id: SnapshotId,
        make_current: bool,
    ) -> Result<(), CatalogError> {
        self.transaction(|tx| {
            let (domain, _) = snapshot_owner_status(tx, id)?;
            tx.prepare_cached("UPDATE snapshots SET status = 'committed' WHERE id = ?1")?
                .execute([id])?;
            if make_current {
                tx.prepare_cached("UPDATE domains SET current_snapshot = ?2 WHERE id = ?1")?
                    .execute((domain, id))?;
            }
            Ok(())
        })
    }

    /// Rewrites the mutable fields of a snapshot: description, disks, memory, parent, status,
    /// protected and origin. The other fields of `rec` are ignored (`domain_id` must match).
    ///
    /// A new parent must be in the same domain and must not be the snapshot or one of its
    /// descendants. If the snapshot stops being committed while current, the domain's current
    /// snapshot is cleared in the same transaction.
    pub fn update_snapshot(&mut self, rec: &SnapshotRecord) -> Result<(), CatalogError> {
        let memory = rec.memory.to_string();
        let disks = rec.disks.to_string();
        self.transaction(|tx| {
            let (domain, _) = snapshot_owner_status(tx, rec.id)?;
            if domain != rec.domain_id {
                return Err(CatalogError::Invalid(format!(
                    "snapshot {} belongs to domain {domain}, not to domain {}",
                    rec.id, rec.domain_id
                )));
            }
            if let Some(parent) = rec.parent {
                check_parent(tx, domain, parent)?;
                let cycle: bool = tx
                    .prepare_cached(
                        "WITH RECURSIVE up(id) AS ( \
                             SELECT ?1 \
                             UNION SELECT s.parent_id FROM snapshots s JOIN up ON s.id = up.id \
                                   WHERE s.parent_id IS NOT NULL) \
                         SELECT EXISTS (SELECT 1 FROM up WHERE id = ?2)",
                    )?
                    .query_row((parent, rec.id), |r| r.get(0))?;
                if cycle {
                    return Err(CatalogError::Invalid(format!(
                        "snapshot {parent} cannot be the parent of snapshot {}: it is the \
                         snapshot itself or one of its descendants",
                        rec.id
                    )));
                }
            }
            if rec.status != SnapshotStatus::Committed {
                clear_current(tx, rec.id)?;
            }
            tx.prepare_cached(
                "UPDATE snapshots SET description = ?2, disks = ?3, memory = ?4, parent_id = ?5, \
                 status = ?6, protected = ?7, origin = ?8 WHERE id = ?1",
            )?
            .execute((
                rec.id,
                &rec.description,
                &disks,
                &memory,
                rec.parent,
                rec.status,
                rec.protected,
                &rec.origin,
            ))?;
            Ok(())
        })
    }

    /// Marks a snapshot broken; if it was its domain's current snapshot, the domain is left
    /// without one (in the same transaction).
    pub fn mark_broken(&mut self, id: SnapshotId) -> Result<(), CatalogError> {
        self.transaction(|tx| {
            snapshot_owner_status(tx, id)?;
            clear_current(tx, id)?;
            tx.prepare_cached("UPDATE snapshots SET status = 'broken' WHERE id = ?1")?
                .execute([id])?;
            Ok(())
        })
    }

    /// Removes a snapshot. In the same transaction its children are re-parented to its parent,
    /// and if it was current, "current" moves to its parent (or to none if there is no parent
    /// or the parent is not committed).
    pub fn delete_snapshot(&mut self, id: SnapshotId) -> Result<(), CatalogError> {
        self.transaction(|tx| delete_snapshot_in(tx, id))
    }

    /// [`delete_snapshot`](Self::delete_snapshot) and
    /// [`set_operation_step`](Self::set_operation_step) of `op` in one transaction (one
    /// fsync): the journal never shows the record gone without the step that says so.
    pub fn delete_snapshot_at_step(
        &mut self,
        id: SnapshotId,
        op: OperationId,
        step: &str,
        payload: &Value,
    ) -> Result<(), CatalogError> {
        let payload = payload.to_string();
        self.transaction(|tx| {
            delete_snapshot_in(tx, id)?;
            let n = tx
                .prepare_cached("UPDATE operations SET step = ?2, payload = ?3 WHERE id = ?1")?
                .execute((op, step, &payload))?;
            expect_one(n, || format!("operation {op}"))
        })
    }

    /// Adds a committed record for a snapshot whose files already exist (redefine), with
    /// `parts` (a JSON object: the parts of its libvirt document kept verbatim; nothing is
    /// stored for an empty object) and, if `make_current`, makes it its domain's current
    /// snapshot, all in one transaction. Fails like [`Catalog::insert_pending_snapshot`].
    pub fn insert_redefined_snapshot(
        &mut self,
        s: &NewSnapshot,
        parts: &Value,
        make_current: bool,
    ) -> Result<SnapshotRecord, CatalogError> {
        if !parts.is_object() {
            return Err(CatalogError::Invalid(
                "the kept parts of a snapshot document must be a JSON object".into(),
            ));
        }
        let text = parts.to_string();
        self.transaction(|tx| {
            let rec = insert_snapshot(tx, s, SnapshotStatus::Committed)?;
            if parts.as_object().is_some_and(|o| !o.is_empty()) {
                tx.prepare_cached(
                    "INSERT INTO snapshot_xml_parts (snapshot_id, parts) VALUES (?1, ?2)",
                )?
                .execute((rec.id, &text))?;
            }
            if make_current {
                tx.prepare_cached("UPDATE domains SET current_snapshot = ?2 WHERE id = ?1")?
                    .execute((s.domain_id, rec.id))?;
            }
            Ok(rec)
        })
    }

    /// The parts of a redefined snapshot's libvirt document kept verbatim: a JSON object,
    /// empty when nothing was kept.
    pub fn snapshot_xml_parts(&self, id: SnapshotId) -> Result<Value, CatalogError> {
        let text: Option<String> = self
            .conn
            .prepare_cached("SELECT parts FROM snapshot_xml_parts WHERE snapshot_id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        match text {
            Some(t) => serde_json::from_str(&t).map_err(|e| {
                CatalogError::Corrupt(format!("kept XML parts of snapshot {id}: {e}"))
            }),
            None => Ok(Value::Object(Default::default())),
        }
    }

    /// The snapshot with catalog id `id`.
    pub fn snapshot(&self, id: SnapshotId) -> Result<SnapshotRecord, CatalogError> {
        load_snapshot(&self.conn, id)
    }

    /// All snapshots of a domain, ordered by creation time then id.
    pub fn snapshots(&self, domain: DomainId) -> Result<Vec<SnapshotRecord>, CatalogError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE domain_id = ?1 \
             ORDER BY created_at, id"
        ))?;
        let list: Vec<SnapshotRecord> = stmt
            .query_map([domain], snapshot_from_row)?
            .collect::<Result<_, _>>()?;
        if list.is_empty() {
            domain_exists(&self.conn, domain)?;
        }
        Ok(list)
    }

    /// All snapshots of all domains, ordered by domain, creation time and id (one query; for
    /// loading the whole catalog at start-up).
    pub fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, CatalogError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots ORDER BY domain_id, created_at, id"
        ))?;
        // Records of one domain mostly repeat the same definition and disk parts: keep one
        // copy of each distinct text.
        let mut texts = Interner::default();
        let rows = stmt.query_map([], |r| snapshot_from_row_with(r, &mut texts))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The snapshot of `domain` named `name`, if any.
    pub fn snapshot_by_name(
        &self,
        domain: DomainId,
        name: &str,
    ) -> Result<Option<SnapshotRecord>, CatalogError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE domain_id = ?1 AND name = ?2"
        ))?;
        Ok(stmt
            .query_row((domain, name), snapshot_from_row)
            .optional()?)
    }

    /// The direct children of a snapshot, ordered by creation time then id.
    pub fn children(&self, id: SnapshotId) -> Result<Vec<SnapshotId>, CatalogError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id FROM snapshots WHERE parent_id = ?1 ORDER BY created_at, id",
        )?;
        let list: Vec<SnapshotId> = stmt
            .query_map([id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if list.is_empty() {
            snapshot_owner_status(&self.conn, id)?;
        }
        Ok(list)
    }

    // ----- operations journal -----

    /// Journals the start of a multi-step operation on `domain` (step
    /// [`OPERATION_STARTED`]).
    pub fn begin_operation(
        &mut self,
        domain: DomainId,
        kind: &str,
        payload: &Value,
    ) -> Result<OperationId, CatalogError> {
        self.begin_operation_at(domain, kind, OPERATION_STARTED, payload)
    }

    /// Like [`begin_operation`](Self::begin_operation), at `step` already (an operation whose
    /// first named step needs no commit of its own).
    pub fn begin_operation_at(
        &mut self,
        domain: DomainId,
        kind: &str,
        step: &str,
        payload: &Value,
    ) -> Result<OperationId, CatalogError> {
        let payload = payload.to_string();
        let started_at = now();
        self.transaction(|tx| {
            domain_exists(tx, domain)?;
            tx.prepare_cached(
                "INSERT INTO operations (domain_id, kind, step, payload, started_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute((domain, kind, step, &payload, started_at))?;
            Ok(OperationId(tx.last_insert_rowid()))
        })
    }

    /// [`begin_operation`](Self::begin_operation) and
    /// [`insert_pending_snapshot`](Self::insert_pending_snapshot) in one transaction (one
    /// fsync instead of two): the journal row and the pending record exist together or not
    /// at all. The row starts at `step`, and its payload names the record (`snapshot`).
    pub fn begin_operation_with_pending_snapshot(
        &mut self,
        kind: &str,
        step: &str,
        payload: &Value,
        s: &NewSnapshot,
    ) -> Result<(OperationId, SnapshotRecord), CatalogError> {
        let started_at = now();
        self.transaction(|tx| {
            domain_exists(tx, s.domain_id)?;
            let rec = insert_snapshot(tx, s, SnapshotStatus::Pending)?;
            let mut payload = payload.clone();
            if let Some(p) = payload.as_object_mut() {
                p.insert("snapshot".into(), rec.id.0.into());
            }
            tx.prepare_cached(
                "INSERT INTO operations (domain_id, kind, step, payload, started_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute((s.domain_id, kind, step, payload.to_string(), started_at))?;
            let op = OperationId(tx.last_insert_rowid());
            Ok((op, rec))
        })
    }

    /// The end of a create in one transaction: the domain's new definition `xml`, the
    /// snapshot committed and made current, and operation `op` removed from the journal.
    pub fn commit_snapshot_and_finish(
        &mut self,
        id: SnapshotId,
        xml: &str,
        op: OperationId,
    ) -> Result<(), CatalogError> {
        self.transaction(|tx| {
            let (domain, _) = snapshot_owner_status(tx, id)?;
            // Committed first: the catalog's triggers only let a committed snapshot be current.
            tx.prepare_cached("UPDATE snapshots SET status = 'committed' WHERE id = ?1")?
                .execute([id])?;
            tx.prepare_cached("UPDATE domains SET xml = ?2, current_snapshot = ?3 WHERE id = ?1")?
                .execute((domain, xml, id))?;
            let n = tx
                .prepare_cached("DELETE FROM operations WHERE id = ?1")?
                .execute([op])?;
            expect_one(n, || format!("operation {op}"))
        })
    }

    /// Records that an operation reached `step`, replacing its payload.
    pub fn set_operation_step(
        &mut self,
        op: OperationId,
        step: &str,
        payload: &Value,
    ) -> Result<(), CatalogError> {
        let n = self
            .conn
            .prepare_cached("UPDATE operations SET step = ?2, payload = ?3 WHERE id = ?1")?
            .execute((op, step, payload.to_string()))?;
        expect_one(n, || format!("operation {op}"))
    }

    /// Removes a finished (or fully rolled back) operation from the journal.
    pub fn finish_operation(&mut self, op: OperationId) -> Result<(), CatalogError> {
        let n = self
            .conn
            .prepare_cached("DELETE FROM operations WHERE id = ?1")?
            .execute([op])?;
        expect_one(n, || format!("operation {op}"))
    }

    /// Every journalled operation, oldest first: after a crash, the ones recovery must handle.
    pub fn pending_operations(&self) -> Result<Vec<OperationRecord>, CatalogError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {OPERATION_COLUMNS} FROM operations ORDER BY id"
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok(OperationRecord {
                id: r.get(0)?,
                domain_id: r.get(1)?,
                kind: r.get(2)?,
                step: r.get(3)?,
                payload: json_column(r, 4)?,
                started_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

// ----- helpers; they take a connection so that they also work inside a transaction -----

/// The body of [`Catalog::delete_snapshot`], inside a transaction.
fn delete_snapshot_in(tx: &Transaction<'_>, id: SnapshotId) -> Result<(), CatalogError> {
    let (parent, parent_committed): (Option<SnapshotId>, bool) = tx
        .prepare_cached(
            "SELECT s.parent_id, coalesce(p.status = 'committed', 0) \
             FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id \
             WHERE s.id = ?1",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .ok_or_else(|| CatalogError::NotFound(snapshot_name(id)))?;
    tx.prepare_cached("UPDATE snapshots SET parent_id = ?2 WHERE parent_id = ?1")?
        .execute((id, parent))?;
    let new_current = parent.filter(|_| parent_committed);
    tx.prepare_cached("UPDATE domains SET current_snapshot = ?2 WHERE current_snapshot = ?1")?
        .execute((id, new_current))?;
    tx.prepare_cached("DELETE FROM snapshots WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn domain_name(id: DomainId) -> String {
    format!("domain {id}")
}

fn snapshot_name(id: SnapshotId) -> String {
    format!("snapshot {id}")
}

fn expect_one(changed: usize, what: impl FnOnce() -> String) -> Result<(), CatalogError> {
    if changed == 0 {
        Err(CatalogError::NotFound(what()))
    } else {
        Ok(())
    }
}

fn path_text(path: &Path) -> Result<&str, CatalogError> {
    path.to_str()
        .ok_or_else(|| CatalogError::Invalid(format!("path {} is not valid UTF-8", path.display())))
}

/// Reads a JSON text column; undecodable text is a conversion error (reported as corruption).
fn json_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<Value> {
    let text = row.get_ref(idx)?.as_str()?;
    serde_json::from_str(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

fn domain_from_row(r: &Row<'_>) -> rusqlite::Result<DomainRecord> {
    Ok(DomainRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        uuid: r.get(2)?,
        kind: r.get(3)?,
        xml: r.get(4)?,
        qmp_socket: r.get::<_, Option<String>>(5)?.map(PathBuf::from),
        current_snapshot: r.get(6)?,
        created_at: r.get(7)?,
        settings: json_column(r, 8)?,
    })
}

/// Shares equal texts between the records of one load.
#[derive(Default)]
struct Interner(std::collections::HashSet<std::sync::Arc<str>>);

impl Interner {
    /// The shared copy of `text`, and whether it was seen before.
    fn get(&mut self, text: &str) -> (std::sync::Arc<str>, bool) {
        if let Some(a) = self.0.get(text) {
            return (a.clone(), true);
        }
        let a: std::sync::Arc<str> = text.into();
        self.0.insert(a.clone());
        (a, false)
    }
}

/// Reads a JSON text column as [`JsonText`], shared through `texts`; undecodable text is a
/// conversion error (reported as corruption).
fn json_text_column(row: &Row<'_>, idx: usize, texts: &mut Interner) -> rusqlite::Result<JsonText> {
    let text = row.get_ref(idx)?.as_str()?;
    let (shared, seen) = texts.get(text);
    if !seen {
        // Checked once per distinct text.
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))?;
    }
    Ok(JsonText::from_checked(shared))
}

fn snapshot_from_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    snapshot_from_row_with(r, &mut Interner::default())
}

fn snapshot_from_row_with(r: &Row<'_>, texts: &mut Interner) -> rusqlite::Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        id: r.get(0)?,
        domain_id: r.get(1)?,
        name: r.get(2)?,
        description: r.get(3)?,
        created_at: r.get(4)?,
        state: r.get(5)?,
        kind: r.get(6)?,
        parent: r.get(7)?,
        domain_xml: texts.get(r.get_ref(8)?.as_str()?).0,
        memory: json_text_column(r, 9, texts)?,
        disks: json_text_column(r, 10, texts)?,
        status: r.get(11)?,
        origin: r.get(12)?,
        protected: r.get(13)?,
    })
}

fn load_domain(conn: &Connection, id: DomainId) -> Result<DomainRecord, CatalogError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DOMAIN_COLUMNS} FROM domains WHERE id = ?1"
    ))?;
    stmt.query_row([id], domain_from_row)
        .optional()?
        .ok_or_else(|| CatalogError::NotFound(domain_name(id)))
}

fn load_snapshot(conn: &Connection, id: SnapshotId) -> Result<SnapshotRecord, CatalogError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?1"
    ))?;
    stmt.query_row([id], snapshot_from_row)
        .optional()?
        .ok_or_else(|| CatalogError::NotFound(snapshot_name(id)))
}

fn domain_exists(conn: &Connection, id: DomainId) -> Result<(), CatalogError> {
    conn.prepare_cached("SELECT 1 FROM domains WHERE id = ?1")?
        .query_row([id], |_| Ok(()))
        .optional()?
        .ok_or_else(|| CatalogError::NotFound(domain_name(id)))
}

/// The domain and status of a snapshot; [`CatalogError::NotFound`] if there is none.
fn snapshot_owner_status(
    conn: &Connection,
    id: SnapshotId,
) -> Result<(DomainId, SnapshotStatus), CatalogError> {
    conn.prepare_cached("SELECT domain_id, status FROM snapshots WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .ok_or_else(|| CatalogError::NotFound(snapshot_name(id)))
}

/// Checks that `parent` exists and belongs to `domain`.
fn check_parent(
    conn: &Connection,
    domain: DomainId,
    parent: SnapshotId,
) -> Result<(), CatalogError> {
    let (owner, _) = snapshot_owner_status(conn, parent)?;
    if owner != domain {
        return Err(CatalogError::Invalid(format!(
            "parent snapshot {parent} belongs to domain {owner}, not to domain {domain}"
        )));
    }
    Ok(())
}

/// Leaves the domain whose current snapshot is `id` (if any) without a current snapshot.
fn clear_current(conn: &Connection, id: SnapshotId) -> Result<(), CatalogError> {
    conn.prepare_cached("UPDATE domains SET current_snapshot = NULL WHERE current_snapshot = ?1")?
        .execute([id])?;
    Ok(())
}

/// Inserts a snapshot with the given status; the body of
/// [`Catalog::insert_pending_snapshot`], usable inside a larger transaction.
fn insert_snapshot(
    conn: &Connection,
    s: &NewSnapshot,
    status: SnapshotStatus,
) -> Result<SnapshotRecord, CatalogError> {
    if s.name.is_empty() {
        return Err(CatalogError::Invalid("a snapshot needs a name".into()));
    }
    let domain_name: String = conn
        .prepare_cached("SELECT name FROM domains WHERE id = ?1")?
        .query_row([s.domain_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| CatalogError::NotFound(domain_name(s.domain_id)))?;
    let taken = conn
        .prepare_cached("SELECT 1 FROM snapshots WHERE domain_id = ?1 AND name = ?2")?
        .query_row((s.domain_id, &s.name), |_| Ok(()))
        .optional()?
        .is_some();
    if taken {
        return Err(CatalogError::AlreadyExists(format!(
            "snapshot {:?} of domain {domain_name:?}",
            s.name
        )));
    }
    if let Some(parent) = s.parent {
        check_parent(conn, s.domain_id, parent)?;
    }
    conn.prepare_cached(
        "INSERT INTO snapshots (domain_id, name, description, created_at, state, kind, \
         parent_id, domain_xml, memory, disks, status, origin, protected) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute((
        s.domain_id,
        &s.name,
        &s.description,
        s.created_at,
        &s.state,
        &s.kind,
        s.parent,
        &s.domain_xml,
        s.memory.to_string(),
        s.disks.to_string(),
        status,
        &s.origin,
        s.protected,
    ))?;
    Ok(SnapshotRecord {
        id: SnapshotId(conn.last_insert_rowid()),
        domain_id: s.domain_id,
        name: s.name.clone(),
        description: s.description.clone(),
        created_at: s.created_at,
        state: s.state.clone(),
        kind: s.kind.clone(),
        parent: s.parent,
        domain_xml: s.domain_xml.as_str().into(),
        memory: JsonText::from(&s.memory),
        disks: JsonText::from(&s.disks),
        status,
        origin: s.origin.clone(),
        protected: s.protected,
    })
}
