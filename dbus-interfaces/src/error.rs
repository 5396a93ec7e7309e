//! The wire errors of the vmsnap D-Bus API.
//!
//! Every expected condition has its own name under `org.vmsnap.VmSnap1.Error`; `Failed` is kept
//! for internal faults only. Clients decode replies by name into this enum.

use zbus::DBusError;

/// An error returned by a vmsnap D-Bus method. The string is a sentence-style message that
/// names what was refused and why.
#[derive(Debug, DBusError, PartialEq)]
#[zbus(prefix = "org.vmsnap.VmSnap1.Error")]
pub enum Error {
    /// A transport-level error from zbus (never sent by the daemon itself).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No domain has the given name, id or path.
    NoSuchDomain(String),
    /// No snapshot has the given name or path.
    NoSuchSnapshot(String),
    /// No job has the given path.
    NoSuchJob(String),
    /// Something with that name, uuid or file already exists.
    AlreadyExists(String),
    /// An argument or option is malformed, unknown or of the wrong type.
    InvalidArgument(String),
    /// The request is valid but not supported for this domain, disk or format.
    Unsupported(String),
    /// The domain's state does not allow the request (for example pausing a shut-off domain).
    InvalidState(String),
    /// Another operation runs on the domain.
    Busy(String),
    /// The caller may not do this.
    NotAuthorized(String),
    /// QEMU refused or failed a command.
    QemuError(String),
    /// The operation was cancelled.
    Cancelled(String),
    /// The operation did not finish in the allowed time.
    Timeout(String),
    /// An internal fault; the message says in what state things were left.
    Failed(String),
}

impl Error {
    /// The short error name without the prefix, e.g. `NoSuchDomain`.
    pub fn short_name(&self) -> &'static str {
        match self {
            Error::ZBus(_) => "ZBus",
            Error::NoSuchDomain(_) => "NoSuchDomain",
            Error::NoSuchSnapshot(_) => "NoSuchSnapshot",
            Error::NoSuchJob(_) => "NoSuchJob",
            Error::AlreadyExists(_) => "AlreadyExists",
            Error::InvalidArgument(_) => "InvalidArgument",
            Error::Unsupported(_) => "Unsupported",
            Error::InvalidState(_) => "InvalidState",
            Error::Busy(_) => "Busy",
            Error::NotAuthorized(_) => "NotAuthorized",
            Error::QemuError(_) => "QemuError",
            Error::Cancelled(_) => "Cancelled",
            Error::Timeout(_) => "Timeout",
            Error::Failed(_) => "Failed",
        }
    }

    /// The human message carried by the error.
    pub fn message(&self) -> String {
        match self {
            Error::ZBus(e) => e.to_string(),
            Error::NoSuchDomain(m)
            | Error::NoSuchSnapshot(m)
            | Error::NoSuchJob(m)
            | Error::AlreadyExists(m)
            | Error::InvalidArgument(m)
            | Error::Unsupported(m)
            | Error::InvalidState(m)
            | Error::Busy(m)
            | Error::NotAuthorized(m)
            | Error::QemuError(m)
            | Error::Cancelled(m)
            | Error::Timeout(m)
            | Error::Failed(m) => m.clone(),
        }
    }
}
