//! Opening the SQLite file and bringing its schema up to date.
//!
//! The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` takes the file from version
//! `i` to `i + 1`. Each migration runs in its own `BEGIN IMMEDIATE` transaction that also bumps
//! `user_version`, so a crash leaves the file at a well-defined version and two processes opening
//! the same file cannot both migrate it. `PRAGMA application_id` marks the file as a vmsnap
//! catalog so that an unrelated database is refused instead of being "migrated". Migrations are
//! append-only: a released one is never edited, a change is a new entry.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use super::CatalogError;

/// `PRAGMA application_id` of a vmsnap catalog: the ASCII bytes `vmsn`.
pub(super) const APPLICATION_ID: i64 = 0x766d_736e;

/// How long a statement waits for a lock held by another connection before failing.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The migrations, oldest first; entry `i` upgrades version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2];

/// Schema version 1: domains, snapshots, operations.
const V1: &str = r#"
CREATE TABLE domains (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL UNIQUE,
    uuid             TEXT    NOT NULL UNIQUE,
    kind             TEXT    NOT NULL CHECK (kind IN ('managed', 'attached')),
    xml              TEXT    NOT NULL,
    qmp_socket       TEXT    CHECK (qmp_socket IS NULL OR kind = 'attached'),
    current_snapshot INTEGER REFERENCES snapshots(id) ON DELETE SET NULL,
    created_at       INTEGER NOT NULL,
    settings         TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(settings))
);
CREATE INDEX domains_by_current ON domains(current_snapshot);

CREATE TABLE snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    domain_id   INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    description TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    state       TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    parent_id   INTEGER REFERENCES snapshots(id),
    domain_xml  TEXT    NOT NULL,
    memory      TEXT    NOT NULL CHECK (json_valid(memory)),
    disks       TEXT    NOT NULL CHECK (json_valid(disks)),
    status      TEXT    NOT NULL CHECK (status IN ('pending', 'committed', 'broken')),
    origin      TEXT    NOT NULL DEFAULT 'manual',
    protected   INTEGER NOT NULL DEFAULT 0 CHECK (protected IN (0, 1)),
    UNIQUE (domain_id, name),
    CHECK (parent_id IS NULL OR parent_id <> id)
);
CREATE INDEX snapshots_by_domain_parent ON snapshots(domain_id, parent_id);
CREATE INDEX snapshots_by_parent ON snapshots(parent_id);
CREATE INDEX snapshots_by_domain_time ON snapshots(domain_id, created_at, id);

CREATE TABLE operations (
    id         INTEGER PRIMARY KEY,
    domain_id  INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL,
    step       TEXT    NOT NULL,
    payload    TEXT    NOT NULL CHECK (json_valid(payload)),
    started_at INTEGER NOT NULL
);
CREATE INDEX operations_by_domain ON operations(domain_id);

-- Backstops for the invariants the Rust code checks first (they also guard hand edits).
CREATE TRIGGER snapshots_parent_same_domain_insert
BEFORE INSERT ON snapshots
WHEN NEW.parent_id IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM snapshots WHERE id = NEW.parent_id AND domain_id = NEW.domain_id)
BEGIN
    SELECT RAISE(ABORT, 'parent snapshot must exist in the same domain');
END;

CREATE TRIGGER snapshots_parent_same_domain_update
BEFORE UPDATE OF parent_id, domain_id ON snapshots
WHEN NEW.parent_id IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM snapshots WHERE id = NEW.parent_id AND domain_id = NEW.domain_id)
BEGIN
    SELECT RAISE(ABORT, 'parent snapshot must exist in the same domain');
END;

CREATE TRIGGER domains_current_on_insert
BEFORE INSERT ON domains
WHEN NEW.current_snapshot IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'a new domain has no current snapshot');
END;

CREATE TRIGGER domains_current_is_committed
BEFORE UPDATE OF current_snapshot ON domains
WHEN NEW.current_snapshot IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM snapshots
    WHERE id = NEW.current_snapshot AND domain_id = NEW.id AND status = 'committed')
BEGIN
    SELECT RAISE(ABORT, 'current snapshot must be a committed snapshot of the same domain');
END;

CREATE TRIGGER snapshots_current_stays_committed
BEFORE UPDATE OF status ON snapshots
WHEN NEW.status <> 'committed' AND EXISTS (
    SELECT 1 FROM domains WHERE current_snapshot = OLD.id)
BEGIN
    SELECT RAISE(ABORT, 'the current snapshot of a domain must stay committed');
END;
"#;

/// Schema version 2: the parts of a redefined libvirt `<domainsnapshot>` document that vmsnap
/// keeps verbatim without acting on them (`<domain>`, `<cookie>`, …), one JSON object per
/// snapshot, gone with the snapshot.
const V2: &str = r#"
CREATE TABLE snapshot_xml_parts (
    snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id) ON DELETE CASCADE,
    parts       TEXT    NOT NULL CHECK (json_valid(parts))
);
"#;

/// The newest schema version this build knows.
pub(super) fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Creates `dir` (and missing parents, mode 0700) and the catalog file in it (mode 0600) if
/// they do not exist yet. An existing file keeps its mode.
pub(super) fn create_file(dir: &Path, file: &Path) -> Result<(), CatalogError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| with_path(e, dir))?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(file)
        .map_err(|e| with_path(e, file))?;
    Ok(())
}

fn with_path(err: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

fn user_version(conn: &Connection) -> Result<i64, CatalogError> {
    Ok(conn.pragma_query_value(None, "user_version", |row| row.get(0))?)
}

/// Configures a freshly opened connection and migrates its schema; returns the schema version.
///
/// `on_disk` selects WAL journalling, which an in-memory database does not support.
pub(super) fn prepare(conn: &mut Connection, on_disk: bool) -> Result<i64, CatalogError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;

    // Look before touching anything: a newer or foreign file must stay as it is.
    let found = user_version(conn)?;
    check_version(found)?;
    let app_id: i64 = conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(CatalogError::Corrupt(format!(
            "not a vmsnap catalog (application_id {app_id:#x}, expected {APPLICATION_ID:#x})"
        )));
    }
    if found == 0 {
        let objects: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'",
            [],
            |row| row.get(0),
        )?;
        if objects != 0 {
            return Err(CatalogError::Corrupt(
                "database has tables but no schema version; not a vmsnap catalog".into(),
            ));
        }
    }

    if on_disk {
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(CatalogError::Corrupt(format!(
                "cannot switch the catalog to WAL journalling (journal_mode stays {mode:?})"
            )));
        }
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    let fk: bool = conn.pragma_query_value(None, "foreign_keys", |row| row.get(0))?;
    if !fk {
        return Err(CatalogError::Corrupt(
            "SQLite refused to enable foreign keys".into(),
        ));
    }
    conn.set_prepared_statement_cache_capacity(64);

    migrate(conn)
}

fn check_version(found: i64) -> Result<(), CatalogError> {
    let supported = latest_version();
    if found > supported {
        return Err(CatalogError::TooNew { found, supported });
    }
    if found < 0 {
        return Err(CatalogError::Corrupt(format!(
            "negative schema version {found}"
        )));
    }
    Ok(())
}

/// Applies the missing migrations, one transaction each.
fn migrate(conn: &mut Connection) -> Result<i64, CatalogError> {
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Re-read under the write lock: another process may have migrated meanwhile.
        let version = user_version(&tx)?;
        check_version(version)?;
        let Some(sql) = MIGRATIONS.get(version as usize) else {
            return Ok(version);
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
        tracing::info!(
            from = version,
            to = version + 1,
            "migrated the catalog schema"
        );
    }
}
