//! Deadlines and condition polling.
//!
//! Every wait in the harness is bounded by a [`Deadline`]; running out of time panics with a
//! message that says what was awaited. Readiness is never assumed after a fixed sleep: a caller
//! either blocks on an event (a notify datagram, a D-Bus signal, a process exit) or polls a
//! condition with [`poll_until`], whose short pauses only space out the attempts.

use std::future::Future;
use std::time::{Duration, Instant};

/// Default time allowed for one test step (starting the daemon, one client call, ...).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest pause between two attempts of [`poll_until`]; the first attempts follow each other
/// faster, so a condition that is already true costs nothing.
const POLL_INTERVAL_MAX: Duration = Duration::from_millis(50);

/// A point in time after which a wait gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline {
    at: Instant,
}

impl Deadline {
    /// The deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
        }
    }

    /// The deadline [`STEP_TIMEOUT`] from now.
    pub fn step() -> Self {
        Self::after(STEP_TIMEOUT)
    }

    /// The instant itself.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// Time left, zero once expired.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// Time left, but at least one millisecond: for APIs such as socket read timeouts that
    /// refuse a zero duration. Callers check [`Deadline::expired`] themselves.
    pub fn remaining_nonzero(&self) -> Duration {
        self.remaining().max(Duration::from_millis(1))
    }

    /// Awaits `future`, panicking with `what` if it does not finish before the deadline.
    pub async fn run<F: Future>(&self, what: &str, future: F) -> F::Output {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(self.at), future).await {
            Ok(output) => output,
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Calls `attempt` until it returns `Some`, and returns that value; panics with `what` when
/// `deadline` passes first.
pub fn poll_until<T>(deadline: Deadline, what: &str, mut attempt: impl FnMut() -> Option<T>) -> T {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(value) = attempt() {
            return value;
        }
        if deadline.expired() {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(pause.min(deadline.remaining()));
        pause = (pause * 2).min(POLL_INTERVAL_MAX);
    }
}

/// The async form of [`poll_until`], for conditions that need `.await` (D-Bus properties).
pub async fn poll_until_async<T, F, Fut>(deadline: Deadline, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        if deadline.expired() {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(pause.min(deadline.remaining())).await;
        pause = (pause * 2).min(POLL_INTERVAL_MAX);
    }
}
