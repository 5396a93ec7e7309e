//! The error type of every catalog operation.
//!
//! Failures of SQLite itself stay [`CatalogError::Sqlite`]; values read back from the file that
//! do not decode (an unknown enum word, text that is not JSON, a path that is not UTF-8, ...) are
//! reported as [`CatalogError::Corrupt`], because they can only come from a damaged or hand-edited
//! file. Caller mistakes that the catalog refuses (a parent in another domain, a pending snapshot
//! made current, a cycle) are [`CatalogError::Invalid`].

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite reported an error (I/O, locking, constraint, ...).
    #[error("catalog database error: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// A file-system operation around the database failed (state directory, file creation).
    #[error("catalog I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The record to create clashes with an existing one; the text names it.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The referenced record does not exist; the text names it.
    #[error("{0} not found")]
    NotFound(String),
    /// The file was written by a newer vmsnapd whose schema this build does not know.
    #[error(
        "catalog schema version {found} is newer than version {supported}, the newest this \
         build of vmsnapd supports; refusing to open it (upgrade vmsnapd)"
    )]
    TooNew {
        /// The `user_version` found in the file.
        found: i64,
        /// The newest schema version this build knows.
        supported: i64,
    },
    /// The file is not a vmsnap catalog, or holds values that do not decode.
    #[error("catalog is corrupt: {0}")]
    Corrupt(String),
    /// The requested change would break an invariant of the catalog.
    #[error("invalid catalog change: {0}")]
    Invalid(String),
}

impl From<rusqlite::Error> for CatalogError {
    fn from(err: rusqlite::Error) -> Self {
        use rusqlite::Error as E;
        match err {
            E::FromSqlConversionFailure(..)
            | E::InvalidColumnType(..)
            | E::IntegralValueOutOfRange(..)
            | E::Utf8Error(..) => CatalogError::Corrupt(err.to_string()),
            other => CatalogError::Sqlite(other),
        }
    }
}
