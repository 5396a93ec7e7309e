//! The D-Bus adapter: translate arguments, call the service, translate results and errors back.
//!
//! Nothing here decides anything about guests. Objects: the root (`Manager` and
//! `org.freedesktop.DBus.ObjectManager`), one object per domain and one per live job; object
//! paths carry catalog ids and job numbers, never user-supplied names. Property changes are
//! announced by forwarder tasks that watch the service's channels.

pub mod auth;
mod dispatch;
pub(crate) mod domain;
mod job;
mod manager;
mod object_manager;
pub(crate) mod options;
mod retention;
mod snapshot;

use std::sync::Arc;

use vmsnap_dbus::Error;
use vmsnap_dbus::names::{BUS_NAME, ROOT_PATH};
use zbus::connection::Builder;

use crate::config::BusChoice;
use crate::error::ServiceError;
use crate::service::Service;

pub use domain::register_domain;
pub use manager::ManagerIface;

/// Maps a service error to its wire error. Exhaustive on purpose: a new service error must
/// be given a wire name here.
pub fn wire_error(e: ServiceError) -> Error {
    let msg = e.to_string();
    match e {
        ServiceError::NoSuchDomain(_) => Error::NoSuchDomain(msg),
        ServiceError::NoSuchSnapshot { .. } => Error::NoSuchSnapshot(msg),
        ServiceError::NoSuchJob(_) => Error::NoSuchJob(msg),
        ServiceError::AlreadyExists(_) => Error::AlreadyExists(msg),
        ServiceError::InvalidArgument(_) | ServiceError::Definition(_) => {
            Error::InvalidArgument(msg)
        }
        ServiceError::Unsupported(_) => Error::Unsupported(msg),
        ServiceError::InvalidState(_) => Error::InvalidState(msg),
        ServiceError::Busy(_) => Error::Busy(msg),
        ServiceError::Cancelled(_) => Error::Cancelled(msg),
        ServiceError::Timeout(_) => Error::Timeout(msg),
        ServiceError::Qemu { .. } => Error::QemuError(msg),
        ServiceError::Catalog(crate::catalog::CatalogError::AlreadyExists(_)) => {
            Error::AlreadyExists(msg)
        }
        ServiceError::Storage(e) => storage_wire_error(e, msg),
        ServiceError::Catalog(_) | ServiceError::Io { .. } | ServiceError::Gone(_) => {
            tracing::error!(error = ?e, "internal failure");
            Error::Failed(msg)
        }
        // The failure's own kind, with the whole story as the message.
        ServiceError::Partial { source, .. } => retention::with_message(wire_error(*source), msg),
    }
}

/// Maps a storage refusal: a path the caller may not use is `NotAuthorized`, a taken name
/// `AlreadyExists`, a malformed or missing one `InvalidArgument`.
fn storage_wire_error(e: crate::storage::StorageError, msg: String) -> Error {
    use crate::storage::StorageError as S;
    match e {
        S::Outside { .. } | S::Protected(_) | S::Symlink(_) | S::NotRegular { .. } => {
            Error::NotAuthorized(msg)
        }
        S::Exists(_) | S::InUse { .. } => Error::AlreadyExists(msg),
        S::NotAbsolute(_) | S::DotComponent(_) | S::Missing(_) => Error::InvalidArgument(msg),
        S::Io { .. } => {
            tracing::error!(error = ?e, "storage check failed");
            Error::Failed(msg)
        }
    }
}

/// Connects to the bus, serves every object (see [`dispatch`]) and then takes the well-known
/// name, so that a caller who sees the name also sees the objects.
pub async fn serve(service: Arc<Service>, bus: &BusChoice) -> zbus::Result<zbus::Connection> {
    let builder = match bus {
        BusChoice::System => Builder::system(),
        BusChoice::Session => Builder::session(),
        BusChoice::Address(a) => Builder::address(a.as_str()),
    };
    let conn = builder.build().await?;
    auth::install(&conn, service.config());
    let registry = dispatch::Registry::new().await?;
    let sizes = Arc::new(dispatch::SizeCache::default());
    let server = registry.server().clone();
    server
        .at(
            ROOT_PATH,
            object_manager::ObjectManagerIface::new(service.clone()),
        )
        .await?;
    server
        .at(ROOT_PATH, ManagerIface::new(service.clone()))
        .await?;
    dispatch::start(conn.clone(), registry, service.clone(), sizes).await?;
    for handle in service.domains() {
        register_domain(&server, &service, handle).await?;
    }
    conn.request_name(BUS_NAME).await?;
    // Objects served from now on are announced; the ones above were not (nobody could have
    // heard it: `GetManagedObjects` is how a front end learns them).
    object_manager::ObjectManagerIface::start_announcing(&server).await;
    Ok(conn)
}
