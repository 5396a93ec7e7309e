//! The daemon's domain vocabulary of failures.
//!
//! Layers below (QMP, catalog, definitions) have their own error types; `ServiceError` is what
//! the service reports to its callers. The D-Bus adapter maps it to wire errors in one
//! exhaustive match (`dbus::wire_error`).

use crate::catalog::CatalogError;
use crate::domain::def::DefError;
use crate::qmp::QmpError;

/// A failure of a service operation, worded for the person who asked.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No domain matches.
    #[error("no domain is named {0:?}")]
    NoSuchDomain(String),
    /// No snapshot matches.
    #[error("domain {domain:?} has no snapshot {name:?}")]
    NoSuchSnapshot {
        /// The domain's name.
        domain: String,
        /// The snapshot asked for.
        name: String,
    },
    /// No job matches.
    #[error("no job {0}")]
    NoSuchJob(String),
    /// A name, uuid or file is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// A malformed or unknown argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// A definition that does not parse or validate.
    #[error("invalid domain definition: {0}")]
    Definition(#[from] DefError),
    /// Valid, but not supported here.
    #[error("{0}")]
    Unsupported(String),
    /// The domain's state does not allow it.
    #[error("{0}")]
    InvalidState(String),
    /// Another operation holds the domain.
    #[error("{0}")]
    Busy(String),
    /// The operation was cancelled.
    #[error("{0}")]
    Cancelled(String),
    /// A deadline passed.
    #[error("{0}")]
    Timeout(String),
    /// QEMU refused or failed a command; `context` says what the daemon was doing.
    #[error("{context}: {source}")]
    Qemu {
        /// What the daemon was doing.
        context: String,
        /// QEMU's answer.
        source: QmpError,
    },
    /// The catalog failed.
    #[error("catalog: {0}")]
    Catalog(#[from] CatalogError),
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the daemon was doing.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The domain's actor is gone (the domain was undefined or the daemon is stopping).
    #[error("domain {0:?} is no longer served")]
    Gone(String),
    /// A multi-step operation stopped part-way; `done` says what it had done (e.g. which
    /// snapshots a prune had deleted), `source` why it stopped. Reported as `source`'s kind.
    #[error("{done}; then: {source}")]
    Partial {
        /// What was done before the failure.
        done: String,
        /// The failure.
        source: Box<ServiceError>,
    },
}

impl ServiceError {
    /// Wraps a QMP error with what the daemon was doing.
    pub fn qemu(context: impl Into<String>) -> impl FnOnce(QmpError) -> ServiceError {
        let context = context.into();
        move |source| ServiceError::Qemu { context, source }
    }

    /// Wraps an I/O error with what the daemon was doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServiceError {
        let context = context.into();
        move |source| ServiceError::Io { context, source }
    }
}

/// Result of service operations.
pub type ServiceResult<T> = Result<T, ServiceError>;
