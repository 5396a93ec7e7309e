//! The QMP client: the only code in the daemon that speaks JSON to QEMU.
//!
//! [`Qmp::connect`] opens QEMU's QMP unix socket, reads the greeting, negotiates
//! `qmp_capabilities` and returns a cheap, cloneable [`Qmp`] handle.
//!
//! Invariants:
//! - One reader task per connection reads newline-delimited JSON. Replies are matched to
//!   requests by the unique numeric `id` set on every command; a reply whose id nobody
//!   waits for (for example because the caller was cancelled) is logged and dropped.
//! - Every event, whatever its name, goes to a broadcast channel of
//!   [`EVENT_CHANNEL_CAPACITY`]; the receiver returned by `connect` sees all events from the
//!   first one on. Slow receivers may lag; [`Qmp::wait_event`] skips over the gap.
//! - Writes are serialized by a mutex around the write half and run in a detached task, so a
//!   cancelled caller never leaves half a command on the socket.
//! - When the connection ends (end of stream or read error) every pending command fails with
//!   [`QmpError::Closed`], [`Qmp::is_closed`] turns true, [`Qmp::closed`] resolves, event
//!   receivers see the channel close after the last event, and later commands fail fast
//!   with `Closed`.
//! - A line that is not a JSON object, a reply without an id, or a second greeting is a
//!   protocol violation: the client cannot know which request it belonged to, so the
//!   connection is shut down and pending commands fail with [`QmpError::Protocol`] (later
//!   ones with `Closed`). Well-formed objects of an unknown kind are logged and ignored.
//! - No timeouts are imposed on commands (`savevm` may take minutes); callers wrap them in
//!   `tokio::time::timeout` when they need one. Dropping an `execute` future is safe.

mod error;
mod types;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, Shutdown};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::Instant;

pub use error::QmpError;
pub use types::{
    BlockDeviceInfo, BlockGraph, BlockGraphEdge, BlockGraphNode, BlockInfo, Event, ImageInfo,
    JobInfo, QemuVersion, SnapshotInfo, StatusInfo,
};
use wire::{Incoming, LineReader};

/// Capacity of the event broadcast channel; receivers further behind than this lag.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// Pause between attempts to connect while QEMU has not yet created or opened its socket.
pub const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// A handle on one QMP connection. Cloning is cheap; all clones share the connection,
/// which is closed when the last clone is dropped.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    /// Weak so that receivers see the channel close when the reader task ends.
    events: broadcast::WeakSender<Event>,
    next_id: AtomicU64,
    version: QemuVersion,
    reader: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Why a pending command did not get a normal reply.
#[derive(Debug, Clone)]
enum Failure {
    Command { class: String, desc: String },
    Protocol(String),
    Closed,
}

type Reply = Result<Value, Failure>;

/// State shared between the handle and the reader task.
struct Shared {
    /// Commands waiting for their reply; `None` once the connection is closed.
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>,
    closed: watch::Sender<bool>,
}

impl Shared {
    fn lock_pending(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<HashMap<u64, oneshot::Sender<Reply>>>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection closed and fails every pending command with `failure`.
    fn close(&self, failure: Failure) {
        let pending = self.lock_pending().take();
        // Flag first, so a caller woken by its failure already sees `is_closed()`.
        self.closed.send_replace(true);
        for (_, tx) in pending.into_iter().flatten() {
            let _ = tx.send(Err(failure.clone()));
        }
    }
}

/// Removes a pending entry when the waiting `execute` future finishes or is dropped.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Some(map) = self.shared.lock_pending().as_mut() {
            map.remove(&self.id);
        }
    }
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.inner.version)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to a QMP unix socket, reads the greeting, negotiates `qmp_capabilities`.
    /// Retries connecting until `deadline` (QEMU may not have created the socket yet).
    /// Returns the handle and a receiver that sees every event from the first one on.
    pub async fn connect(
        path: &Path,
        deadline: Instant,
    ) -> Result<(Qmp, broadcast::Receiver<Event>), QmpError> {
        let stream = connect_socket(path, deadline).await?;
        let (read, write) = stream.into_split();
        let mut reader = LineReader::new(read);
        let greeting = match tokio::time::timeout_at(deadline, reader.next_line()).await {
            Err(_) => {
                return Err(QmpError::Timeout(format!(
                    "the QMP greeting on {}",
                    path.display()
                )));
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return Err(QmpError::Closed),
            Ok(Err(e)) => return Err(e),
        };
        let version = wire::parse_greeting(&greeting)?;
        tracing::debug!(socket = %path.display(), ?version, "QMP greeting received");

        let (events_tx, events_rx) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let events = events_tx.downgrade();
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
            closed: watch::Sender::new(false),
        });
        let reader = tokio::spawn(read_loop(reader, Arc::clone(&shared), events_tx));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                shared,
                writer: Arc::new(tokio::sync::Mutex::new(write)),
                events,
                next_id: AtomicU64::new(1),
                version,
                reader: reader.abort_handle(),
            }),
        };
        match tokio::time::timeout_at(deadline, qmp.execute("qmp_capabilities", None)).await {
            Err(_) => {
                return Err(QmpError::Timeout(
                    "the reply to qmp_capabilities".to_owned(),
                ));
            }
            Ok(result) => result?,
        };
        Ok((qmp, events_rx))
    }

    /// A new receiver of events that arrive from now on. If the connection is already
    /// closed, the receiver reports `Closed` at once.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        match self.inner.events.upgrade() {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// The QEMU version from the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// Sends a command and waits for its reply; returns the "return" value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.send_command(command, arguments, None).await
    }

    /// Like execute, but sends `fd` with SCM_RIGHTS in the same sendmsg as the command
    /// (for `getfd`, `add-fd`). The descriptor is duplicated; the caller keeps its own.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        let fd = fd.try_clone_to_owned()?;
        self.send_command(command, arguments, Some(fd)).await
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        *self.inner.shared.closed.borrow()
    }

    /// Resolves once the connection is closed (EOF or error).
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed.subscribe();
        // The sender lives in `Shared`, which `self` keeps alive, so this cannot fail.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    async fn send_command(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
    ) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "execute": command, "id": id });
        match arguments {
            None => {}
            Some(args @ Value::Object(_)) => message["arguments"] = args,
            Some(other) => {
                return Err(QmpError::Protocol(format!(
                    "arguments of {command} must be a JSON object, not {other}"
                )));
            }
        }
        let mut line = serde_json::to_vec(&message)
            .map_err(|e| QmpError::Protocol(format!("cannot encode {command}: {e}")))?;
        line.push(b'\n');

        let shared = &*self.inner.shared;
        let (tx, rx) = oneshot::channel();
        match shared.lock_pending().as_mut() {
            Some(map) => map.insert(id, tx),
            None => return Err(QmpError::Closed),
        };
        let _guard = PendingGuard { shared, id };

        tracing::debug!(command, id, with_fd = fd.is_some(), "QMP command");
        let writer = Arc::clone(&self.inner.writer);
        let write = tokio::spawn(async move { write_message(&writer, &line, fd).await });
        match write.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if is_disconnect(&e) => return Err(QmpError::Closed),
            Ok(Err(e)) => return Err(QmpError::Io(e)),
            Err(e) => return Err(QmpError::Io(io::Error::other(e))),
        }

        match rx.await {
            Ok(Ok(value)) => {
                tracing::debug!(command, id, "QMP reply");
                Ok(value)
            }
            Ok(Err(Failure::Command { class, desc })) => {
                tracing::debug!(command, id, class, desc, "QMP error reply");
                Err(QmpError::Command {
                    class,
                    desc,
                    command: command.to_owned(),
                })
            }
            Ok(Err(Failure::Protocol(msg))) => Err(QmpError::Protocol(msg)),
            Ok(Err(Failure::Closed)) | Err(_) => Err(QmpError::Closed),
        }
    }

    async fn execute_typed<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let value = self.execute(command, arguments).await?;
        serde_json::from_value(value)
            .map_err(|e| QmpError::Protocol(format!("unexpected reply to {command}: {e}")))
    }

    async fn execute_unit(&self, command: &str, arguments: Option<Value>) -> Result<(), QmpError> {
        self.execute(command, arguments).await.map(drop)
    }

    /// `query-status`: whether the guest runs and QEMU's run state.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.execute_typed("query-status", None).await
    }

    /// `stop`: pauses the guest CPUs (QEMU emits `STOP`).
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute_unit("stop", None).await
    }

    /// `cont`: resumes the guest CPUs (QEMU emits `RESUME`).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute_unit("cont", None).await
    }

    /// `system_powerdown`: presses the ACPI power button; the guest decides what to do.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute_unit("system_powerdown", None).await
    }

    /// `quit`: makes QEMU exit. The connection closing before the reply arrives also
    /// counts as success, since that is what quitting means. QEMU 7.2 emits `SHUTDOWN`
    /// before the reply and may then reset rather than close the socket.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute_unit("quit", None).await {
            Err(QmpError::Closed) => Ok(()),
            other => other,
        }
    }

    /// `query-block`: the block backends and their media.
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>, QmpError> {
        self.execute_typed("query-block", None).await
    }

    /// `query-named-block-nodes` with `flat: true`: every named node, attached or not.
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockDeviceInfo>, QmpError> {
        self.execute_typed("query-named-block-nodes", Some(json!({ "flat": true })))
            .await
    }

    /// `blockdev-add` with the given arguments (a `BlockdevOptions` object).
    pub async fn blockdev_add(&self, args: Value) -> Result<(), QmpError> {
        self.execute_unit("blockdev-add", Some(args)).await
    }

    /// `x-debug-query-block-graph`: the node graph with its edges (QEMU 4.0 and later).
    pub async fn query_block_graph(&self) -> Result<BlockGraph, QmpError> {
        self.execute_typed("x-debug-query-block-graph", None).await
    }

    /// `blockdev-reopen` of the given nodes (full `BlockdevOptions` each: options left out
    /// return to their defaults, children must be named).
    pub async fn blockdev_reopen(&self, options: Vec<Value>) -> Result<(), QmpError> {
        self.execute_unit("blockdev-reopen", Some(json!({ "options": options })))
            .await
    }

    /// `blockdev-del`: removes a node that is no longer in use.
    pub async fn blockdev_del(&self, node_name: &str) -> Result<(), QmpError> {
        self.execute_unit("blockdev-del", Some(json!({ "node-name": node_name })))
            .await
    }

    /// `device_add` with the given arguments (`driver`, `id` and device properties).
    pub async fn device_add(&self, args: Value) -> Result<(), QmpError> {
        self.execute_unit("device_add", Some(args)).await
    }

    /// `device_del`: requests removal of a device. Removal may complete later (some buses
    /// need guest cooperation); QEMU emits `DEVICE_DELETED` when it is done.
    pub async fn device_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute_unit("device_del", Some(json!({ "id": id })))
            .await
    }

    /// `human-monitor-command`: runs an HMP command line and returns its output.
    pub async fn human_monitor_command(&self, cmd: &str) -> Result<String, QmpError> {
        self.execute_typed(
            "human-monitor-command",
            Some(json!({ "command-line": cmd })),
        )
        .await
    }

    /// `query-jobs`: the background jobs (e.g. `snapshot-save`) and their status.
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>, QmpError> {
        self.execute_typed("query-jobs", None).await
    }

    /// `job-dismiss`: removes a concluded job.
    pub async fn job_dismiss(&self, id: &str) -> Result<(), QmpError> {
        self.execute_unit("job-dismiss", Some(json!({ "id": id })))
            .await
    }

    /// Waits on `rx` for the first event satisfying `pred`, until `deadline`.
    ///
    /// Fails with `Timeout` when the deadline passes and `Closed` when the connection ends
    /// without a matching event. Events lost to lag are skipped with a warning.
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<Event>,
        deadline: Instant,
        pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event, QmpError> {
        self.wait_event_described(rx, deadline, "a matching QMP event", pred)
            .await
    }

    /// Waits on `rx` for the next event called `name`, until `deadline`.
    pub async fn wait_named_event(
        &self,
        rx: &mut broadcast::Receiver<Event>,
        name: &str,
        deadline: Instant,
    ) -> Result<Event, QmpError> {
        let what = format!("QMP event {name}");
        self.wait_event_described(rx, deadline, &what, |e| e.name == name)
            .await
    }

    /// Like [`Qmp::wait_event`], with `what` naming the awaited event in a `Timeout` error.
    pub async fn wait_event_described(
        &self,
        rx: &mut broadcast::Receiver<Event>,
        deadline: Instant,
        what: &str,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event, QmpError> {
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Err(QmpError::Timeout(what.to_owned())),
                Ok(Ok(event)) if pred(&event) => return Ok(event),
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    tracing::warn!(missed, what, "QMP event receiver lagged; events lost");
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return Err(QmpError::Closed),
            }
        }
    }
}

/// Connects to the socket, retrying while it does not exist or nobody listens yet.
async fn connect_socket(path: &Path, deadline: Instant) -> Result<UnixStream, QmpError> {
    loop {
        let attempt = tokio::time::timeout_at(deadline, UnixStream::connect(path)).await;
        let err = match attempt {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                e
            }
            Ok(Err(e)) => return Err(QmpError::Io(e)),
            Err(_) => io::Error::from(io::ErrorKind::TimedOut),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(QmpError::Timeout(format!(
                "QMP socket {} to accept a connection (last error: {err})",
                path.display()
            )));
        }
        tokio::time::sleep_until((now + CONNECT_RETRY_INTERVAL).min(deadline)).await;
    }
}

/// Writes one complete command line, passing `fd` with SCM_RIGHTS along with its first bytes.
async fn write_message(
    writer: &tokio::sync::Mutex<OwnedWriteHalf>,
    line: &[u8],
    fd: Option<OwnedFd>,
) -> io::Result<()> {
    let mut w = writer.lock().await;
    let mut written = 0;
    if let Some(fd) = fd {
        written = loop {
            w.writable().await?;
            let stream: &UnixStream = (*w).as_ref();
            let sent = stream.try_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(line)];
                let fds = [fd.as_raw_fd()];
                let cmsgs = [ControlMessage::ScmRights(&fds)];
                nix::sys::socket::sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(n) => break n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        };
        // The kernel holds its own reference now; close our duplicate.
        drop(fd);
    }
    w.write_all(&line[written..]).await
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// The reader task: routes replies to waiting commands and broadcasts events until the
/// connection ends, then closes the shared state.
async fn read_loop(mut reader: LineReader, shared: Arc<Shared>, events: broadcast::Sender<Event>) {
    let failure = loop {
        let line = match reader.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => {
                tracing::debug!("QMP connection closed by peer");
                break Failure::Closed;
            }
            Err(QmpError::Io(e)) => {
                tracing::debug!(error = %e, "QMP connection read failed");
                break Failure::Closed;
            }
            Err(e) => break Failure::Protocol(e.to_string()),
        };
        match wire::parse_message(&line) {
            Ok(Incoming::Event(event)) => {
                tracing::debug!(name = event.name, "QMP event");
                // No receivers is fine: nobody is interested right now.
                let _ = events.send(event);
            }
            Ok(Incoming::Reply { id, result }) => {
                let waiter = id
                    .as_u64()
                    .and_then(|id| shared.lock_pending().as_mut()?.remove(&id));
                let Some(tx) = waiter else {
                    tracing::warn!(%id, "dropping QMP reply nobody waits for");
                    continue;
                };
                let reply = result.map_err(|(class, desc)| Failure::Command { class, desc });
                let _ = tx.send(reply);
            }
            Ok(Incoming::Unknown(obj)) => {
                let message = Value::Object(obj);
                tracing::warn!(%message, "ignoring unknown QMP message");
            }
            Err(msg) => break Failure::Protocol(msg),
        }
    };
    if let Failure::Protocol(msg) = &failure {
        tracing::warn!(error = %msg, "QMP protocol violation; dropping the connection");
        // Let the peer see the connection end too; the socket is closed when the handle drops.
        let _ = nix::sys::socket::shutdown(reader.raw_fd(), Shutdown::Both);
    }
    shared.close(failure);
    drop(events);
}
