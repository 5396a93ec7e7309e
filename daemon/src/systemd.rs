//! The service manager protocol: `READY=1`, `STATUS=`, `STOPPING=1` and watchdog pings.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset, so the daemon behaves the same
//! under systemd, under the test harness (which sets its own socket) and by hand.

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "could not notify the service manager");
    }
}

/// Tells the service manager that the daemon is ready to serve, with a status line.
pub fn notify_ready(status: &str) {
    send(&[
        NotifyState::Ready,
        NotifyState::MainPid(std::process::id()),
        NotifyState::Status(status),
    ]);
}

/// Updates the free-text status line (`systemctl status` shows it).
pub fn notify_status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells the service manager that the daemon is stopping.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pings the watchdog; called from the main loop so that a hung loop stops the pings.
pub fn notify_watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The watchdog interval the service manager asked for, if any.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    sd_notify::watchdog_enabled()
}
