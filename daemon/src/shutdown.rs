//! Turns SIGTERM and SIGINT into a cancellation token the daemon's main loop waits on.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Returns a token that is cancelled when SIGTERM or SIGINT arrives.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received, stopping"),
            _ = int.recv() => info!("SIGINT received, stopping"),
        }
        t.cancel();
    });
    Ok(token)
}
