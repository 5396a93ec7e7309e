//! vmsnapd: the vmsnap daemon as a library, so that the binary stays thin and tests can drive
//! it in-process.
//!
//! `run` opens the catalog, starts an actor per domain (re-attaching to guests that still
//! run), serves the D-Bus objects, takes the bus name and only then reports `READY=1`. The
//! main loop pings the watchdog and refreshes the status line until shutdown is requested;
//! guests are left running when the daemon stops.

pub mod catalog;
pub mod config;
pub mod dbus;
pub mod domain;
pub mod error;
pub mod fuzz;
pub mod job;
pub mod journal;
pub mod logging;
pub mod qmp;
pub mod service;
pub mod shutdown;
pub mod snapshot;
pub mod storage;
pub mod systemd;
pub mod testhooks;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::error::ServiceError;
use crate::service::Service;

/// How often the main loop refreshes the status line when no watchdog is asked for.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The service could not open its state.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The bus connection or name failed.
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let bus = config.bus.clone();
    let service = Service::open(config).await?;
    let conn = dbus::serve(service.clone(), &bus).await?;
    info!(version = env!("CARGO_PKG_VERSION"), "vmsnapd ready");
    systemd::notify_ready(&service.status_line());
    // Ping at half the watchdog interval, from this loop only: a hung loop stops pinging.
    let tick = systemd::watchdog_interval()
        .map(|d| d / 2)
        .unwrap_or(STATUS_INTERVAL);
    let mut interval = tokio::time::interval(tick);
    let mut last_status = String::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {
                systemd::notify_watchdog();
                let status = service.status_line();
                if status != last_status {
                    systemd::notify_status(&status);
                    last_status = status;
                }
            }
        }
    }
    systemd::notify_stopping();
    info!("stopping; guests keep running");
    service.stop().await;
    drop(conn);
    Ok(())
}
