//! The records the catalog stores and the typed ids that name them.
//!
//! Ids are the SQLite `INTEGER PRIMARY KEY AUTOINCREMENT` of their row (never reused, so a
//! D-Bus object path never names two different domains or snapshots over time), wrapped so
//! that a snapshot id cannot be passed where a domain id is expected. Records are plain data: reading one never keeps a
//! borrow of the catalog, and writing one back goes through the [`Catalog`](super::Catalog)
//! methods that keep the invariants.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                self.0.to_sql()
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                i64::column_result(value).map($name)
            }
        }
    };
}

id_type!(
    /// Catalog id of a domain (row id in `domains`); stable for the domain's lifetime.
    DomainId
);
id_type!(
    /// Catalog id of a snapshot (row id in `snapshots`).
    SnapshotId
);
id_type!(
    /// Catalog id of a journalled operation (row id in `operations`).
    OperationId
);

/// Error returned when a word stored in the catalog is not one of the known values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownWord {
    /// Which kind of word was expected.
    pub what: &'static str,
    /// The text found.
    pub value: String,
}

macro_rules! word_enum {
    (
        $(#[$meta:meta])* $name:ident, $what:literal {
            $($(#[$vmeta:meta])* $variant:ident = $word:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The word stored in the catalog for this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;
            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($word => Ok($name::$variant),)+
                    _ => Err(UnknownWord { what: $what, value: s.to_owned() }),
                }
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value.as_str()?.parse().map_err(|e| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

word_enum!(
    /// How vmsnapd relates to a domain.
    DomainKind, "domain kind" {
        /// vmsnapd defined the domain and starts/stops its QEMU process.
        Managed = "managed",
        /// A QEMU process started by someone else, reached through its QMP socket.
        Attached = "attached",
    }
);

word_enum!(
    /// Where a snapshot is in the crash-safe creation protocol.
    SnapshotStatus, "snapshot status" {
        /// Recorded before the work starts; not usable until committed.
        Pending = "pending",
        /// Complete and usable.
        Committed = "committed",
        /// Known to be unusable (files missing, creation failed half-way, ...).
        Broken = "broken",
    }
);

/// A domain as stored in the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainRecord {
    /// Catalog id.
    pub id: DomainId,
    /// Unique name.
    pub name: String,
    /// Unique UUID, as text.
    pub uuid: String,
    /// Managed or attached.
    pub kind: DomainKind,
    /// Current definition; for attached domains the discovered one.
    pub xml: String,
    /// QMP socket of an attached domain; always `None` for managed ones.
    pub qmp_socket: Option<PathBuf>,
    /// The committed snapshot the domain's current state descends from, if any.
    pub current_snapshot: Option<SnapshotId>,
    /// When the domain entered the catalog, in Unix seconds.
    pub created_at: i64,
    /// Per-domain settings, a JSON object (`{}` by default).
    pub settings: serde_json::Value,
}

/// What the caller supplies to add a domain.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDomain {
    /// Unique, non-empty name.
    pub name: String,
    /// Unique, non-empty UUID, as text.
    pub uuid: String,
    /// Managed or attached.
    pub kind: DomainKind,
    /// Definition (libvirt-style XML).
    pub xml: String,
    /// QMP socket; only allowed for attached domains.
    pub qmp_socket: Option<PathBuf>,
}

/// A snapshot as stored in the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    /// Catalog id.
    pub id: SnapshotId,
    /// The domain it belongs to.
    pub domain_id: DomainId,
    /// Name, unique within the domain.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Creation time in Unix seconds.
    pub created_at: i64,
    /// Guest state captured: `running`, `paused`, `shutoff` or `disk-snapshot`.
    pub state: String,
    /// Kind of snapshot, e.g. `checkpoint` or `disk-only`.
    pub kind: String,
    /// Parent snapshot in the same domain, `None` for a root.
    pub parent: Option<SnapshotId>,
    /// Domain definition at snapshot time; records loaded together share one copy of each
    /// distinct definition.
    pub domain_xml: Arc<str>,
    /// Memory state, JSON `{mode, file}`.
    pub memory: JsonText,
    /// JSON list of per-disk records.
    pub disks: JsonText,
    /// Position in the creation protocol.
    pub status: SnapshotStatus,
    /// Who asked for it (`manual` by default; e.g. a schedule name).
    pub origin: String,
    /// Whether automatic pruning must leave it alone (policy is the caller's).
    pub protected: bool,
}

/// What the caller supplies to record a new (pending) snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSnapshot {
    /// The domain it belongs to.
    pub domain_id: DomainId,
    /// Non-empty name, unique within the domain.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Creation time in Unix seconds.
    pub created_at: i64,
    /// Guest state captured: `running`, `paused`, `shutoff` or `disk-snapshot`.
    pub state: String,
    /// Kind of snapshot, e.g. `checkpoint` or `disk-only`.
    pub kind: String,
    /// Parent snapshot, which must belong to the same domain.
    pub parent: Option<SnapshotId>,
    /// Domain definition at snapshot time.
    pub domain_xml: String,
    /// Memory state, JSON `{mode, file}`.
    pub memory: serde_json::Value,
    /// JSON list of per-disk records.
    pub disks: serde_json::Value,
    /// Who asked for it (`manual` for a user request).
    pub origin: String,
    /// Whether automatic pruning must leave it alone.
    pub protected: bool,
}

/// An in-flight multi-step operation, as journalled for crash recovery.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRecord {
    /// Catalog id.
    pub id: OperationId,
    /// The domain the operation works on.
    pub domain_id: DomainId,
    /// What the operation is (e.g. `snapshot-create`).
    pub kind: String,
    /// The last step reached ([`OPERATION_STARTED`](super::OPERATION_STARTED) right after
    /// [`begin_operation`](super::Catalog::begin_operation)).
    pub step: String,
    /// Whatever recovery needs to undo or finish the operation.
    pub payload: serde_json::Value,
    /// When the operation began, in Unix seconds.
    pub started_at: i64,
}

/// A JSON value as the catalog stores it, kept in memory as its compact text (shared between
/// copies) rather than as a `serde_json::Value` tree: a tree costs an allocation per object,
/// key and string, which at thousands of snapshot records dominated the daemon's memory, while
/// the parts are read rarely (a property read, an operation) and are small to parse.
///
/// Invariant: the text is valid JSON (checked when made from text).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JsonText(Arc<str>);

impl JsonText {
    /// Checks `text` is JSON and keeps it as it is.
    pub fn parse(text: &str) -> Result<JsonText, serde_json::Error> {
        serde_json::from_str::<serde::de::IgnoredAny>(text)?;
        Ok(JsonText(text.into()))
    }

    /// Keeps `text`, already checked to be JSON, without copying it (shared with other
    /// records).
    pub(crate) fn from_checked(text: Arc<str>) -> JsonText {
        JsonText(text)
    }

    /// The value as a tree.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).expect("JsonText holds valid JSON")
    }

    /// Reads the value as `T`.
    pub fn get<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&serde_json::Value> for JsonText {
    fn from(v: &serde_json::Value) -> JsonText {
        JsonText(v.to_string().into())
    }
}

impl From<serde_json::Value> for JsonText {
    fn from(v: serde_json::Value) -> JsonText {
        JsonText::from(&v)
    }
}

impl PartialEq<serde_json::Value> for JsonText {
    fn eq(&self, other: &serde_json::Value) -> bool {
        self.value() == *other
    }
}

impl fmt::Display for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}
