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
pub mod qcow2;
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

/// How often the main loop compares the status line with the last one sent, so that
/// `systemctl status` follows domains and jobs within this delay.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Test hook (see `testhooks`): after this many seconds the main loop blocks its thread for
/// good, as a deadlock would, so that tests can see the watchdog restart the daemon.
pub const HANG_HOOK: &str = "hang-main-loop-after";

/// Test hook: seconds to wait between owning the bus name and `READY=1`, so that tests can
/// see the service manager keep the unit activating until the daemon says it is ready.
pub const DELAY_READY_HOOK: &str = "delay-ready";

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

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The `hang-main-loop-after` test hook: blocks the main loop's thread, never returning.
fn hang_forever() -> ! {
    tracing::warn!("test hook {HANG_HOOK}: the main loop hangs now");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let bus = config.bus.clone();
    let service = Service::open(config).await?;
    let conn = dbus::serve(service.clone(), &bus).await?;
    info!(version = env!("CARGO_PKG_VERSION"), "vmsnapd ready");
    if let Some(delay) = testhooks::value(DELAY_READY_HOOK).and_then(|s| s.parse::<f64>().ok()) {
        tracing::warn!(delay, "test hook {DELAY_READY_HOOK}: READY=1 comes late");
        tokio::time::sleep(Duration::from_secs_f64(delay)).await;
    }
    let mut last_status = service.status_line();
    systemd::notify_ready(&last_status);
    // Ping at half the watchdog interval, from this loop only and only after the runtime ran
    // a task of ours: a hung loop or a runtime whose workers are all stuck stops pinging.
    let ping_every = systemd::watchdog_interval().map(|d| d / 2);
    let mut ping = tokio::time::interval(ping_every.unwrap_or(STATUS_INTERVAL));
    let mut status = tokio::time::interval(STATUS_INTERVAL);
    let hang_at = testhooks::value(HANG_HOOK)
        .and_then(|s| s.parse::<f64>().ok())
        .map(|secs| tokio::time::Instant::now() + Duration::from_secs_f64(secs));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ping.tick(), if ping_every.is_some() => {
                let budget = ping_every.unwrap_or(STATUS_INTERVAL);
                if tokio::time::timeout(budget, tokio::spawn(async {})).await.is_ok() {
                    systemd::notify_watchdog();
                } else {
                    tracing::warn!("the runtime did not run a task in time; no watchdog ping");
                }
            }
            _ = status.tick() => {
                let now = service.status_line();
                if now != last_status {
                    systemd::notify_status(&now);
                    last_status = now;
                }
            }
            _ = sleep_until_opt(hang_at) => hang_forever(),
        }
    }
    systemd::notify_stopping();
    info!("stopping; guests keep running");
    service.stop().await;
    drop(conn);
    Ok(())
}
