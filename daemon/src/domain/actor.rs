//! The per-guest actor: the one owner of a domain's QEMU process and QMP session.
//!
//! D-Bus handlers never touch a guest directly; they send a `Request` to its actor through a
//! `DomainHandle` and await the reply, so requests on one domain are serialized by
//! construction and different domains proceed in parallel. The actor publishes what observers
//! need (`DomainInfo`: state, definition, current snapshot) on a watch channel.
//!
//! Waiting does not block the actor: a graceful shutdown or a hot-unplug that needs the
//! guest's cooperation is kept as a pending request with a deadline, and the loop goes on
//! handling QMP events, process exit and other requests meanwhile.
//!
//! Managed guests are started in their own process group with their output going to a log
//! file, so they survive the daemon; a restarted daemon re-attaches through the pid file and
//! the QMP socket in the domain's runtime directory.

use std::collections::BTreeMap;
use std::future::pending;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::def::{DiskDef, DomainDef};
use super::launch;
use super::qemu_cmd::{self, LaunchOptions, LaunchPaths};
use super::state::{GuestEvent, GuestState};
use crate::catalog::{Catalog, DomainId, DomainKind, SnapshotId, SnapshotRecord};
use crate::config::Config;
use crate::error::{ServiceError, ServiceResult};
use crate::job::Job;
use crate::qmp::{Event, Qmp};
use crate::snapshot::create::{self, Target};
use crate::snapshot::plan::{self, CreateRequest, GuestRunState, PlanError, RealFs};

/// How long QEMU may take from spawn to an answering QMP socket.
pub const QEMU_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a re-attach may wait for an existing QEMU's QMP socket.
pub const REATTACH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `Destroy` waits for QEMU to exit after `quit` before killing it.
pub const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a graceful shutdown may take.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a hot-unplug waits for the guest to release the device.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Depth of a domain's request queue.
const REQUEST_QUEUE: usize = 32;

/// What observers may know about a domain at any moment.
#[derive(Debug, Clone)]
pub struct DomainInfo {
    /// Catalog id.
    pub id: DomainId,
    /// Managed or attached.
    pub kind: DomainKind,
    /// Current state.
    pub state: GuestState,
    /// The current snapshot, if any.
    pub current_snapshot: Option<SnapshotId>,
    /// The current definition (for attached domains, the discovered one).
    pub def: DomainDef,
    /// The QMP socket of an attached domain.
    pub qmp_socket: Option<PathBuf>,
    /// Every snapshot record of the domain, by id.
    pub snapshots: Arc<BTreeMap<SnapshotId, SnapshotRecord>>,
}

type Reply<T> = oneshot::Sender<ServiceResult<T>>;

/// A request to a domain's actor.
enum Request {
    Revert {
        snapshot: SnapshotId,
        running: Option<bool>,
        force: bool,
        reply: Reply<()>,
    },
    DeleteSnapshot {
        snapshot: SnapshotId,
        metadata_only: bool,
        job: Option<Arc<Job>>,
        reply: Reply<()>,
    },
    Start {
        paused: bool,
        reply: Reply<()>,
    },
    Shutdown {
        timeout: Duration,
        force: bool,
        job: Arc<Job>,
        reply: Reply<()>,
    },
    Destroy {
        reply: Reply<()>,
    },
    Pause {
        reply: Reply<()>,
    },
    Resume {
        reply: Reply<()>,
    },
    AttachDisk {
        disk: DiskDef,
        config_only: bool,
        reply: Reply<()>,
    },
    DetachDisk {
        target: String,
        config_only: bool,
        reply: Reply<()>,
    },
    Monitor {
        command: String,
        hmp: bool,
        reply: Reply<String>,
    },
    CreateSnapshot {
        req: Box<CreateRequest>,
        origin: String,
        job: Arc<Job>,
        reply: Reply<SnapshotId>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
    Redefine {
        doc: Box<crate::snapshot::xml::SnapshotDoc>,
        make_current: bool,
        reply: Reply<SnapshotId>,
    },
    /// Retention: delete unless protected or current by the time the actor gets to it.
    PruneDelete {
        snapshot: SnapshotId,
        job: Arc<Job>,
        reply: Reply<bool>,
    },
    /// Retention: set or clear a snapshot's protection.
    SetProtected {
        snapshot: SnapshotId,
        protected: bool,
        reply: Reply<()>,
    },
    Check {
        reply: Reply<Vec<super::recover::CheckRow>>,
    },
}

/// A cheap, cloneable reference to a domain's actor.
#[derive(Clone)]
pub struct DomainHandle {
    id: DomainId,
    tx: mpsc::Sender<Request>,
    info: watch::Receiver<DomainInfo>,
    busy: Arc<std::sync::atomic::AtomicBool>,
    children: Arc<Mutex<ChildIndex>>,
}

/// The children of every snapshot of a domain, derived from one version of its snapshot map
/// and rebuilt only when the map is replaced, so that reading `Children` of each of n
/// snapshots costs O(n) in all rather than O(n²).
///
/// It holds the map it was built from weakly: a strong reference would make the actor's next
/// `Arc::make_mut` copy every record. The weak pointer also keeps the allocation's address
/// from being reused, so pointer equality means "the same version of the map".
#[derive(Default)]
struct ChildIndex {
    source: std::sync::Weak<BTreeMap<SnapshotId, SnapshotRecord>>,
    children: std::collections::HashMap<SnapshotId, Vec<SnapshotId>>,
}

/// The children of every snapshot in `snapshots` that has any, each list in id order.
pub fn children_index(
    snapshots: &BTreeMap<SnapshotId, SnapshotRecord>,
) -> std::collections::HashMap<SnapshotId, Vec<SnapshotId>> {
    let mut out: std::collections::HashMap<SnapshotId, Vec<SnapshotId>> =
        std::collections::HashMap::new();
    for s in snapshots.values() {
        if let Some(p) = s.parent {
            out.entry(p).or_default().push(s.id);
        }
    }
    out
}

/// Holds a domain's snapshot-operation slot; released on drop.
#[derive(Debug)]
pub struct OperationGuard(Arc<std::sync::atomic::AtomicBool>);

impl Drop for OperationGuard {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl std::fmt::Debug for DomainHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl DomainHandle {
    /// Takes the domain's slot for a snapshot operation (create, revert, delete). A second
    /// operation while one runs is refused with `Busy` instead of queueing behind it, so a
    /// caller never reverts a domain in the middle of someone else's snapshot.
    pub fn begin_operation(&self, what: &str) -> ServiceResult<OperationGuard> {
        use std::sync::atomic::Ordering;
        if self
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(ServiceError::Busy(format!(
                "another snapshot operation runs on domain {:?}; {what} was not started",
                self.name()
            )));
        }
        Ok(OperationGuard(self.busy.clone()))
    }

    /// The domain's catalog id.
    pub fn id(&self) -> DomainId {
        self.id
    }

    /// The current information.
    pub fn info(&self) -> DomainInfo {
        self.info.borrow().clone()
    }

    /// Runs `f` on the current information without copying it (keep `f` short: the actor
    /// waits for it before publishing a change).
    pub fn with_info<R>(&self, f: impl FnOnce(&DomainInfo) -> R) -> R {
        f(&self.info.borrow())
    }

    /// The children of snapshot `id`, in id order, from an index rebuilt only when the
    /// domain's snapshot map changed.
    pub fn children_of(&self, id: SnapshotId) -> Vec<SnapshotId> {
        let info = self.info.borrow();
        let mut index = self.children.lock().expect("children index lock poisoned");
        if !std::ptr::eq(index.source.as_ptr(), Arc::as_ptr(&info.snapshots)) {
            index.children = children_index(&info.snapshots);
            index.source = Arc::downgrade(&info.snapshots);
        }
        index.children.get(&id).cloned().unwrap_or_default()
    }

    /// The domain's name.
    pub fn name(&self) -> String {
        self.info.borrow().def.name.clone()
    }

    /// A receiver that sees every change of the information.
    pub fn watch(&self) -> watch::Receiver<DomainInfo> {
        self.info.clone()
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> ServiceResult<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| ServiceError::Gone(self.name()))?;
        rx.await.map_err(|_| ServiceError::Gone(self.name()))?
    }

    /// Starts a managed guest, paused or running.
    pub async fn start(&self, paused: bool) -> ServiceResult<()> {
        self.call(|reply| Request::Start { paused, reply }).await
    }

    /// Asks the guest to power off and waits for it, destroying it at the deadline when
    /// `force` is set. Progress and cancellation go through `job`.
    pub async fn shutdown(
        &self,
        timeout: Duration,
        force: bool,
        job: Arc<Job>,
    ) -> ServiceResult<()> {
        self.call(|reply| Request::Shutdown {
            timeout,
            force,
            job,
            reply,
        })
        .await
    }

    /// Stops the guest at once.
    pub async fn destroy(&self) -> ServiceResult<()> {
        self.call(|reply| Request::Destroy { reply }).await
    }

    /// Pauses the vCPUs.
    pub async fn pause(&self) -> ServiceResult<()> {
        self.call(|reply| Request::Pause { reply }).await
    }

    /// Resumes the vCPUs.
    pub async fn resume(&self) -> ServiceResult<()> {
        self.call(|reply| Request::Resume { reply }).await
    }

    /// Adds a disk to the definition and, when the guest runs, hot-plugs it.
    pub async fn attach_disk(&self, disk: DiskDef, config_only: bool) -> ServiceResult<()> {
        self.call(|reply| Request::AttachDisk {
            disk,
            config_only,
            reply,
        })
        .await
    }

    /// Removes a disk from the guest (waiting for the guest to release it) and the definition.
    pub async fn detach_disk(&self, target: String, config_only: bool) -> ServiceResult<()> {
        self.call(|reply| Request::DetachDisk {
            target,
            config_only,
            reply,
        })
        .await
    }

    /// Passes a command to QEMU's monitor and returns its answer: with `hmp`, a human
    /// monitor command line; otherwise a QMP command as JSON (`{"execute": ..., "arguments":
    /// ...}`), answered with the JSON of its return value. For diagnostics and tests, like
    /// libvirt's `qemu-monitor-command`.
    pub async fn monitor(&self, command: String, hmp: bool) -> ServiceResult<String> {
        self.call(|reply| Request::Monitor {
            command,
            hmp,
            reply,
        })
        .await
    }

    /// Verifies every snapshot of the domain against its images, read-only (see
    /// `domain::recover`).
    pub async fn check(&self) -> ServiceResult<Vec<super::recover::CheckRow>> {
        self.call(|reply| Request::Check { reply }).await
    }

    /// Takes a snapshot as `req` asks; progress and cancellation go through `job`.
    pub async fn create_snapshot(
        &self,
        req: CreateRequest,
        origin: String,
        job: Arc<Job>,
    ) -> ServiceResult<SnapshotId> {
        let req = Box::new(req);
        self.call(|reply| Request::CreateSnapshot {
            req,
            origin,
            job,
            reply,
        })
        .await
    }

    /// Reverts the domain to a snapshot; `running` overrides the state the snapshot recorded
    /// (`Some(true)` running, `Some(false)` paused).
    pub async fn revert(
        &self,
        snapshot: SnapshotId,
        running: Option<bool>,
        force: bool,
    ) -> ServiceResult<()> {
        self.call(|reply| Request::Revert {
            snapshot,
            running,
            force,
            reply,
        })
        .await
    }

    /// Deletes a snapshot; with `metadata_only` only its record is forgotten.
    pub async fn delete_snapshot(
        &self,
        snapshot: SnapshotId,
        metadata_only: bool,
        job: Option<Arc<Job>>,
    ) -> ServiceResult<()> {
        self.call(|reply| Request::DeleteSnapshot {
            snapshot,
            metadata_only,
            job,
            reply,
        })
        .await
    }

    /// Adds a catalog record for a snapshot whose files already exist, described by a libvirt
    /// `<domainsnapshot>` document, after checking the images hold what it says.
    pub async fn redefine_snapshot(
        &self,
        doc: crate::snapshot::xml::SnapshotDoc,
        make_current: bool,
    ) -> ServiceResult<SnapshotId> {
        let doc = Box::new(doc);
        self.call(|reply| Request::Redefine {
            doc,
            make_current,
            reply,
        })
        .await
    }

    /// Deletes a snapshot for a retention run, unless it is protected or current when the actor
    /// gets to it (then `Ok(false)`): the check and the delete cannot be separated by a
    /// `Protected` change.
    pub async fn prune_delete(&self, snapshot: SnapshotId, job: Arc<Job>) -> ServiceResult<bool> {
        self.call(|reply| Request::PruneDelete {
            snapshot,
            job,
            reply,
        })
        .await
    }

    /// Sets or clears a snapshot's protection from pruning (persisted).
    pub async fn set_protected(&self, snapshot: SnapshotId, protected: bool) -> ServiceResult<()> {
        self.call(|reply| Request::SetProtected {
            snapshot,
            protected,
            reply,
        })
        .await
    }

    /// Stops serving the domain, leaving its guest as it is. Returns once the actor ended.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Stop { reply: tx }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// What every actor shares with the service.
#[derive(Clone)]
pub struct Shared {
    /// The daemon's configuration.
    pub config: Arc<Config>,
    /// The catalog.
    pub catalog: Arc<Mutex<Catalog>>,
    /// How guests' QEMU processes are started.
    pub launcher: launch::Launcher,
}

struct PendingShutdown {
    deadline: Instant,
    force: bool,
    job: Arc<Job>,
    reply: Reply<()>,
}

struct PendingDetach {
    target: String,
    deadline: Instant,
    reply: Option<Reply<()>>,
}

pub(super) struct Actor {
    pub(super) shared: Shared,
    pub(super) info: watch::Sender<DomainInfo>,
    rx: mpsc::Receiver<Request>,
    pub(super) qmp: Option<Qmp>,
    events: Option<broadcast::Receiver<Event>>,
    exit_rx: Option<oneshot::Receiver<std::io::Result<std::process::ExitStatus>>>,
    pid: Option<i32>,
    expecting_exit: bool,
    pending_shutdown: Option<PendingShutdown>,
    pending_detach: Vec<PendingDetach>,
    /// The job reporting the progress of the operation being carried out, if any.
    pub(super) progress: Option<Arc<Job>>,
    /// Whether the revert being carried out may replace a running guest's hardware.
    pub(super) revert_force: bool,
    /// The journal row of the revert or delete being carried out, if any.
    pub(super) journal_op: Option<crate::catalog::OperationId>,
    /// Crash recovery: overlays whose live merge an interrupted delete had started.
    pub(super) resumed_merges: Vec<PathBuf>,
    /// Crash recovery runs an interrupted operation again: steps already done count as done.
    pub(super) journal_resuming: bool,
}

enum Wake {
    Request(Option<Request>),
    Event(Option<Event>),
    QmpClosed,
    Exited(std::io::Result<std::process::ExitStatus>),
    Deadline,
    ShutdownCancelled,
}

/// What an actor starts from: the domain's record as the catalog has it.
pub struct Seed {
    /// Catalog id.
    pub id: DomainId,
    /// Managed or attached.
    pub kind: DomainKind,
    /// The definition.
    pub def: DomainDef,
    /// The current snapshot.
    pub current_snapshot: Option<SnapshotId>,
    /// The QMP socket of an attached domain.
    pub qmp_socket: Option<PathBuf>,
    /// The domain's snapshot records.
    pub snapshots: BTreeMap<SnapshotId, SnapshotRecord>,
}

/// Spawns the actor of a domain. For a managed domain it first re-attaches to a QEMU left
/// running by an earlier daemon; an attached domain may be handed its first QMP connection.
pub async fn spawn(
    shared: Shared,
    seed: Seed,
    connection: Option<(Qmp, broadcast::Receiver<Event>)>,
) -> DomainHandle {
    let id = seed.id;
    let (info_tx, info_rx) = watch::channel(DomainInfo {
        id,
        kind: seed.kind,
        state: GuestState::Shutoff,
        current_snapshot: seed.current_snapshot,
        def: seed.def,
        qmp_socket: seed.qmp_socket,
        snapshots: Arc::new(seed.snapshots),
    });
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    let mut actor = Actor {
        shared,
        info: info_tx,
        rx,
        qmp: None,
        events: None,
        exit_rx: None,
        pid: None,
        expecting_exit: false,
        pending_shutdown: None,
        pending_detach: Vec::new(),
        progress: None,
        revert_force: false,
        journal_op: None,
        resumed_merges: Vec::new(),
        journal_resuming: false,
    };
    match connection {
        Some((qmp, events)) => actor.adopt(qmp, events).await,
        None => actor.reattach().await,
    }
    // Before the actor serves anything (and so before READY=1 at start-up).
    actor.reconcile().await;
    tokio::spawn(actor.run());
    DomainHandle {
        id,
        tx,
        info: info_rx,
        busy: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        children: Arc::default(),
    }
}

async fn next_event(rx: &mut Option<broadcast::Receiver<Event>>) -> Option<Event> {
    let Some(rx) = rx else { return pending().await };
    loop {
        match rx.recv().await {
            Ok(ev) => return Some(ev),
            Err(broadcast::error::RecvError::Lagged(n)) => warn!(missed = n, "QMP events lost"),
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

async fn qmp_closed(qmp: &Option<Qmp>) {
    match qmp {
        Some(q) => q.closed().await,
        None => pending().await,
    }
}

async fn child_exit(
    rx: &mut Option<oneshot::Receiver<std::io::Result<std::process::ExitStatus>>>,
) -> std::io::Result<std::process::ExitStatus> {
    match rx {
        Some(r) => r
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("reaper task ended"))),
        None => pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => pending().await,
    }
}

async fn shutdown_cancelled(p: &Option<PendingShutdown>) {
    match p {
        Some(p) => p.job.cancel_token().cancelled().await,
        None => pending().await,
    }
}

/// Whether a process with this pid exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Whether process `pid` was started with `needle` on its command line (guards against a
/// recycled pid in a stale pid file).
fn cmdline_mentions(pid: i32, needle: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = needle.to_string_lossy();
    raw.split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(needle.as_ref()))
}

impl Actor {
    pub(super) fn name(&self) -> String {
        self.info.borrow().def.name.clone()
    }

    pub(super) fn state(&self) -> GuestState {
        self.info.borrow().state
    }

    pub(super) fn apply(&self, event: GuestEvent) {
        self.info.send_if_modified(|i| {
            let next = i.state.transition(event);
            let changed = next != i.state;
            if changed {
                info!(domain = %i.def.name, from = i.state.as_str(), to = next.as_str(), "state changed");
            }
            i.state = next;
            changed
        });
    }

    pub(super) fn id(&self) -> DomainId {
        self.info.borrow().id
    }

    pub(super) fn kind(&self) -> DomainKind {
        self.info.borrow().kind
    }

    pub(super) fn runtime_dir(&self) -> PathBuf {
        self.shared.config.domain_runtime_dir(self.id().0)
    }

    pub(super) fn paths(&self) -> LaunchPaths {
        let dir = self.runtime_dir();
        LaunchPaths {
            qmp_socket: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            log_file: dir.join("qemu.log"),
        }
    }

    fn transient_dir(&self) -> PathBuf {
        self.shared
            .config
            .state_dir
            .join("transient")
            .join(self.id().0.to_string())
    }

    pub(super) fn qmp(&self) -> ServiceResult<&Qmp> {
        self.qmp.as_ref().ok_or_else(|| {
            ServiceError::InvalidState(format!("domain {:?} is not running", self.name()))
        })
    }

    /// Takes over an existing QMP connection (attached domains).
    async fn adopt(&mut self, qmp: Qmp, events: broadcast::Receiver<Event>) {
        match qmp.query_status().await {
            Ok(status) => {
                self.qmp = Some(qmp);
                self.events = Some(events);
                self.apply(GuestEvent::Started {
                    paused: !status.running,
                });
            }
            Err(e) => warn!(domain = %self.name(), error = %e, "QEMU did not answer query-status"),
        }
    }

    /// Finds a QEMU left running by an earlier daemon (managed) or reconnects to the QMP
    /// socket of an attached domain.
    async fn reattach(&mut self) {
        let deadline = Instant::now() + REATTACH_TIMEOUT;
        match self.kind() {
            DomainKind::Attached => {
                let Some(socket) = self.info.borrow().qmp_socket.clone() else {
                    return;
                };
                match Qmp::connect(&socket, deadline).await {
                    Ok((qmp, events)) => {
                        info!(domain = %self.name(), "re-attached to foreign QEMU");
                        self.adopt(qmp, events).await;
                    }
                    Err(e) => {
                        debug!(domain = %self.name(), error = %e, "attached QEMU not reachable")
                    }
                }
            }
            DomainKind::Managed => {
                let paths = self.paths();
                let pid = std::fs::read_to_string(&paths.pidfile)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok());
                let live =
                    pid.filter(|p| process_alive(*p) && cmdline_mentions(*p, &paths.qmp_socket));
                let Some(pid) = live else {
                    self.cleanup_runtime_files();
                    self.discard_transient_overlays();
                    return;
                };
                match Qmp::connect(&paths.qmp_socket, deadline).await {
                    Ok((qmp, events)) => {
                        info!(domain = %self.name(), pid, "re-attached to running guest");
                        self.pid = Some(pid);
                        self.adopt(qmp, events).await;
                    }
                    Err(e) => {
                        warn!(domain = %self.name(), pid, error = %e,
                            "QEMU is alive but its QMP socket does not answer; marking crashed");
                        self.pid = Some(pid);
                        self.info.send_modify(|i| i.state = GuestState::Crashed);
                    }
                }
            }
        }
    }

    async fn run(mut self) {
        loop {
            let deadline = self.next_deadline();
            let wake = tokio::select! {
                req = self.rx.recv() => Wake::Request(req),
                ev = next_event(&mut self.events) => Wake::Event(ev),
                st = child_exit(&mut self.exit_rx) => Wake::Exited(st),
                _ = qmp_closed(&self.qmp) => Wake::QmpClosed,
                _ = sleep_until_opt(deadline) => Wake::Deadline,
                _ = shutdown_cancelled(&self.pending_shutdown) => Wake::ShutdownCancelled,
            };
            match wake {
                Wake::Request(None) => break,
                Wake::Request(Some(Request::Stop { reply })) => {
                    let _ = reply.send(());
                    break;
                }
                Wake::Request(Some(req)) => self.handle(req).await,
                Wake::Event(Some(ev)) => self.on_event(ev).await,
                Wake::Event(None) => self.events = None,
                Wake::Exited(status) => self.on_exit(Some(status)).await,
                Wake::QmpClosed => self.on_qmp_closed().await,
                Wake::Deadline => self.on_deadline().await,
                Wake::ShutdownCancelled => {
                    if let Some(p) = self.pending_shutdown.take() {
                        p.job.finish();
                        let _ = p.reply.send(Err(ServiceError::Cancelled(format!(
                            "stopped waiting for domain {:?} to power off; the power-off \
                             request already sent to the guest cannot be withdrawn",
                            self.name()
                        ))));
                    }
                }
            }
        }
        debug!(domain = %self.name(), "actor stopped");
    }

    fn next_deadline(&self) -> Option<Instant> {
        let shutdown = self.pending_shutdown.as_ref().map(|p| p.deadline);
        let detach = self
            .pending_detach
            .iter()
            .filter(|d| d.reply.is_some())
            .map(|d| d.deadline)
            .min();
        match (shutdown, detach) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::Start { paused, reply } => {
                let r = self.start(paused).await;
                let _ = reply.send(r);
            }
            Request::Shutdown {
                timeout,
                force,
                job,
                reply,
            } => self.shutdown(timeout, force, job, reply).await,
            Request::Destroy { reply } => {
                let r = self.destroy().await;
                let _ = reply.send(r);
            }
            Request::Pause { reply } => {
                let r = self.pause().await;
                let _ = reply.send(r);
            }
            Request::Resume { reply } => {
                let r = self.resume().await;
                let _ = reply.send(r);
            }
            Request::AttachDisk {
                disk,
                config_only,
                reply,
            } => {
                let r = self.attach_disk(disk, config_only).await;
                let _ = reply.send(r);
            }
            Request::DetachDisk {
                target,
                config_only,
                reply,
            } => {
                self.detach_disk(target, config_only, reply).await;
            }
            Request::Monitor {
                command,
                hmp,
                reply,
            } => {
                let r = self.monitor(&command, hmp).await;
                let _ = reply.send(r);
            }
            Request::Check { reply } => {
                let r = self.check().await;
                let _ = reply.send(r);
            }
            Request::CreateSnapshot {
                req,
                origin,
                job,
                reply,
            } => {
                let r = self.create_snapshot(*req, origin, &job).await;
                let _ = reply.send(r);
            }
            Request::Revert {
                snapshot,
                running,
                force,
                reply,
            } => {
                self.revert_force = force;
                let r = self.revert(snapshot, running).await;
                self.revert_force = false;
                let _ = reply.send(r);
            }
            Request::DeleteSnapshot {
                snapshot,
                metadata_only,
                job,
                reply,
            } => {
                self.progress = job;
                let r = self.delete_snapshot(snapshot, metadata_only).await;
                self.progress = None;
                let _ = reply.send(r);
            }
            Request::Redefine {
                doc,
                make_current,
                reply,
            } => {
                let r = self.redefine(*doc, make_current).await;
                let _ = reply.send(r);
            }
            Request::PruneDelete {
                snapshot,
                job,
                reply,
            } => {
                self.progress = Some(job);
                let r = self.prune_delete(snapshot).await;
                self.progress = None;
                let _ = reply.send(r);
            }
            Request::SetProtected {
                snapshot,
                protected,
                reply,
            } => {
                let _ = reply.send(self.set_protected(snapshot, protected));
            }
            Request::Stop { .. } => unreachable!("handled by the loop"),
        }
    }

    async fn on_event(&mut self, ev: Event) {
        debug!(domain = %self.name(), event = %ev.name, "QMP event");
        match ev.name.as_str() {
            "STOP" => self.apply(GuestEvent::Stopped),
            "RESUME" => self.apply(GuestEvent::Resumed),
            "SHUTDOWN" => self.expecting_exit = true,
            "DEVICE_DELETED" => {
                if let Some(dev) = ev.data.get("device").and_then(Value::as_str) {
                    let dev = dev.to_string();
                    self.finish_detach(&dev).await;
                }
            }
            _ => {}
        }
    }

    async fn on_qmp_closed(&mut self) {
        self.qmp = None;
        self.events = None;
        if self.exit_rx.is_some() {
            // Our own child: its exit status arrives through the reaper in a moment.
            return;
        }
        // Not our child (re-attached or foreign): the closed socket is the exit.
        if let Some(pid) = self.pid {
            let deadline = Instant::now() + DESTROY_TIMEOUT;
            while process_alive(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.on_exit(None).await;
    }

    async fn on_exit(&mut self, status: Option<std::io::Result<std::process::ExitStatus>>) {
        let expected = self.expecting_exit;
        match &status {
            Some(Ok(st)) => info!(domain = %self.name(), status = %st, expected, "QEMU exited"),
            Some(Err(e)) => warn!(domain = %self.name(), error = %e, "could not wait for QEMU"),
            None => info!(domain = %self.name(), expected, "QEMU is gone"),
        }
        if !expected && let Some(tail) = self.log_tail() {
            warn!(domain = %self.name(), log = %tail, "QEMU ended unexpectedly");
        }
        self.qmp = None;
        self.events = None;
        self.exit_rx = None;
        self.pid = None;
        self.expecting_exit = false;
        self.apply(GuestEvent::Exited { expected });
        if self.kind() == DomainKind::Managed {
            self.cleanup_runtime_files();
            self.discard_transient_overlays();
        }
        if let Some(p) = self.pending_shutdown.take() {
            p.job.finish();
            let _ = p.reply.send(Ok(()));
        }
        // The devices went away with the process: finish pending unplugs in the definition.
        let targets: Vec<String> = self
            .pending_detach
            .iter()
            .map(|d| d.target.clone())
            .collect();
        for t in targets {
            self.finish_detach(&t).await;
        }
    }

    async fn on_deadline(&mut self) {
        let now = Instant::now();
        if self
            .pending_shutdown
            .as_ref()
            .is_some_and(|p| p.deadline <= now)
        {
            let p = self.pending_shutdown.take().expect("checked above");
            if p.force {
                p.job.set_phase("destroying");
                p.job.set_cancelable(false);
                let r = self.destroy().await;
                p.job.finish();
                let _ = p.reply.send(r);
            } else {
                p.job.finish();
                let _ = p.reply.send(Err(ServiceError::Timeout(format!(
                    "domain {:?} did not power off in time; it is still running",
                    self.name()
                ))));
            }
        }
        let name = self.name();
        for d in self.pending_detach.iter_mut().filter(|d| d.deadline <= now) {
            if let Some(reply) = d.reply.take() {
                let _ = reply.send(Err(ServiceError::Timeout(format!(
                    "the guest of domain {name:?} did not release disk {} in time; the unplug \
                     request stays pending and the disk is removed from the definition once \
                     the guest releases it",
                    d.target
                ))));
            }
        }
    }

    fn log_tail(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.paths().log_file).ok()?;
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        (!lines.is_empty()).then(|| lines.into_iter().rev().collect::<Vec<_>>().join(" | "))
    }

    fn cleanup_runtime_files(&self) {
        let paths = self.paths();
        for p in [&paths.qmp_socket, &paths.pidfile] {
            if let Err(e) = std::fs::remove_file(p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(path = %p.display(), error = %e, "could not remove runtime file");
            }
        }
    }

    fn discard_transient_overlays(&self) {
        let dir = self.transient_dir();
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            warn!(dir = %dir.display(), error = %e, "could not discard transient overlays");
        }
    }

    pub(super) async fn start(&mut self, paused: bool) -> ServiceResult<()> {
        self.start_with(paused, false).await
    }

    /// Starts QEMU; with `incoming` it waits for `migrate-incoming` (and stays paused).
    pub(super) async fn start_with(&mut self, paused: bool, incoming: bool) -> ServiceResult<()> {
        let paused = paused || incoming;
        let name = self.name();
        if self.kind() == DomainKind::Attached {
            return Err(ServiceError::Unsupported(format!(
                "domain {name:?} is attached: its QEMU was started by someone else and vmsnapd \
                 cannot start it"
            )));
        }
        if self.state().is_active() {
            return Err(ServiceError::InvalidState(format!(
                "domain {name:?} is already running"
            )));
        }
        let def = self.info.borrow().def.clone();
        for disk in &def.disks {
            std::fs::metadata(&disk.source).map_err(ServiceError::io(format!(
                "disk {} of domain {name:?}: cannot use {}",
                disk.target,
                disk.source.display()
            )))?;
        }
        let dir = self.runtime_dir();
        create_private_dir(&dir)?;
        self.cleanup_runtime_files();
        self.discard_transient_overlays();
        let mut opts = LaunchOptions {
            paused: true,
            incoming_defer: incoming,
            transient_overlays: Default::default(),
        };
        for disk in def.disks.iter().filter(|d| d.transient) {
            let tdir = self.transient_dir();
            create_private_dir(&tdir)?;
            let overlay = tdir.join(format!("{}.qcow2", disk.target));
            let args = qemu_cmd::transient_overlay_create_args(disk, &overlay);
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            qemu_img(&args).await?;
            opts.transient_overlays.insert(disk.target.clone(), overlay);
        }
        let paths = self.paths();
        // In a guest unit QEMU may see /dev/kvm although the daemon's sandbox hides it: let
        // QEMU fall back to TCG by itself.
        let accel = if let Some(accel) = qemu_cmd::accel_from_env() {
            accel
        } else if self.shared.launcher.uses_units() {
            qemu_cmd::Accel::KvmOrTcg
        } else {
            qemu_cmd::detect_accel()
        };
        let args = qemu_cmd::qemu_args(&def, &paths, accel, &opts)
            .map_err(|e| ServiceError::InvalidArgument(format!("domain {name:?}: {e}")))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log_file)
            .map_err(ServiceError::io("cannot open the QEMU log file"))?;
        if let launch::Launcher::Systemd(manager) = &self.shared.launcher {
            let manager = manager.clone();
            return self.start_in_unit(&manager, &args, log, paused).await;
        }
        let log2 = log
            .try_clone()
            .map_err(ServiceError::io("cannot open the QEMU log file"))?;
        let mut child = tokio::process::Command::new(&self.shared.config.qemu_binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: signals aimed at the daemon's group do not reach the
            // guest, and the guest outlives the daemon.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(ServiceError::io(format!(
                "cannot run {}",
                self.shared.config.qemu_binary.display()
            )))?;
        let pid = child.id().map(|p| p as i32);
        let (exit_tx, mut exit_rx) = oneshot::channel();
        // The reaper: waits for the child so that it never lingers as a zombie.
        tokio::spawn(async move {
            let _ = exit_tx.send(child.wait().await);
        });
        info!(domain = %name, pid, "QEMU started");
        let deadline = Instant::now() + QEMU_START_TIMEOUT;
        let connected = tokio::select! {
            r = Qmp::connect(&paths.qmp_socket, deadline) => r.map_err(ServiceError::qemu(format!("domain {name:?}: QEMU's QMP socket did not answer"))),
            st = &mut exit_rx => {
                let tail = self.log_tail().unwrap_or_default();
                let how = match st { Ok(Ok(s)) => s.to_string(), _ => "unknown status".into() };
                Err(ServiceError::Qemu {
                    context: format!("domain {name:?}: QEMU exited during start ({how})"),
                    source: crate::qmp::QmpError::Protocol(tail),
                })
            }
        };
        let (qmp, events) = match connected {
            Ok(c) => c,
            Err(e) => {
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = exit_rx.await;
                self.cleanup_runtime_files();
                self.discard_transient_overlays();
                return Err(e);
            }
        };
        self.qmp = Some(qmp.clone());
        self.events = Some(events);
        self.exit_rx = Some(exit_rx);
        self.pid = pid;
        self.expecting_exit = false;
        if !paused {
            qmp.cont().await.map_err(ServiceError::qemu(format!(
                "domain {name:?}: cannot start the vCPUs"
            )))?;
        }
        self.apply(GuestEvent::Started { paused });
        Ok(())
    }

    /// Starts QEMU with `args` in a transient systemd unit of its own (see `launch`). The
    /// guest is then followed like a re-attached one: through its QMP socket and the pid it
    /// wrote, not as a child.
    async fn start_in_unit(
        &mut self,
        manager: &launch::Manager,
        args: &[std::ffi::OsString],
        log: std::fs::File,
        paused: bool,
    ) -> ServiceResult<()> {
        let name = self.name();
        let paths = self.paths();
        let unit = launch::unit_name(self.id().0);
        let failed = |e: launch::LaunchError| ServiceError::Io {
            context: format!("domain {name:?}: cannot start QEMU in unit {unit}"),
            source: std::io::Error::other(e.to_string()),
        };
        let binary = launch::resolve_binary(&self.shared.config.qemu_binary).map_err(failed)?;
        let conn = &manager.conn;
        launch::start_unit(
            manager,
            launch::GuestUnit {
                name: &unit,
                domain: &name,
                binary: &binary,
                args,
                log: log.into(),
            },
        )
        .await
        .map_err(failed)?;
        let deadline = Instant::now() + QEMU_START_TIMEOUT;
        let connected = tokio::select! {
            r = Qmp::connect(&paths.qmp_socket, deadline) => r.map_err(ServiceError::qemu(format!("domain {name:?}: QEMU's QMP socket did not answer"))),
            _ = launch::unit_ended_after_start(conn, &unit) => {
                let tail = self.log_tail().unwrap_or_default();
                Err(ServiceError::Qemu {
                    context: format!("domain {name:?}: QEMU exited during start (unit {unit})"),
                    source: crate::qmp::QmpError::Protocol(tail),
                })
            }
        };
        let pid = std::fs::read_to_string(&paths.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        // QEMU writes its pid file before it opens the QMP socket, so a connected QEMU has
        // one; without it the guest could not be re-attached after a daemon restart.
        let started = connected.and_then(|c| {
            pid.map(|_| c).ok_or_else(|| ServiceError::Qemu {
                context: format!("domain {name:?}: QEMU wrote no pid file"),
                source: crate::qmp::QmpError::Protocol(paths.pidfile.display().to_string()),
            })
        });
        let (qmp, events) = match started {
            Ok(c) => c,
            Err(e) => {
                launch::stop_unit(conn, &unit).await;
                launch::unit_gone(conn, &unit).await;
                self.cleanup_runtime_files();
                self.discard_transient_overlays();
                return Err(e);
            }
        };
        info!(domain = %name, pid, unit = %unit, "QEMU started in its own unit");
        self.qmp = Some(qmp.clone());
        self.events = Some(events);
        self.exit_rx = None;
        self.pid = pid;
        self.expecting_exit = false;
        if !paused {
            qmp.cont().await.map_err(ServiceError::qemu(format!(
                "domain {name:?}: cannot start the vCPUs"
            )))?;
        }
        self.apply(GuestEvent::Started { paused });
        Ok(())
    }

    pub(super) async fn destroy(&mut self) -> ServiceResult<()> {
        let name = self.name();
        if !self.state().is_active() {
            return Err(ServiceError::InvalidState(format!(
                "domain {name:?} is not running"
            )));
        }
        self.expecting_exit = true;
        if let Some(q) = &self.qmp
            && let Err(e) = q.quit().await
        {
            debug!(domain = %name, error = %e, "quit did not get an answer");
        }
        if let Some(mut rx) = self.exit_rx.take() {
            let status = match tokio::time::timeout(DESTROY_TIMEOUT, &mut rx).await {
                Ok(st) => st.unwrap_or_else(|_| Err(std::io::Error::other("reaper task ended"))),
                Err(_) => {
                    warn!(domain = %name, "QEMU did not quit in time; killing it");
                    if let Some(pid) = self.pid {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    rx.await
                        .unwrap_or_else(|_| Err(std::io::Error::other("reaper task ended")))
                }
            };
            self.on_exit(Some(status)).await;
        } else {
            // Not our child: wait for the QMP socket to close, then for the process to go.
            if let Some(q) = self.qmp.clone()
                && tokio::time::timeout(DESTROY_TIMEOUT, q.closed())
                    .await
                    .is_err()
                && let Some(pid) = self.pid
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            self.on_qmp_closed().await;
        }
        Ok(())
    }

    async fn pause(&mut self) -> ServiceResult<()> {
        let name = self.name();
        match self.state() {
            GuestState::Running => {}
            GuestState::Paused => {
                return Err(ServiceError::InvalidState(format!(
                    "domain {name:?} is already paused"
                )));
            }
            GuestState::Shutoff | GuestState::Crashed => {
                return Err(ServiceError::InvalidState(format!(
                    "domain {name:?} is not running"
                )));
            }
        }
        self.qmp()?
            .stop()
            .await
            .map_err(ServiceError::qemu(format!("domain {name:?}: cannot pause")))?;
        self.apply(GuestEvent::Stopped);
        Ok(())
    }

    async fn resume(&mut self) -> ServiceResult<()> {
        let name = self.name();
        match self.state() {
            GuestState::Paused => {}
            GuestState::Running => {
                return Err(ServiceError::InvalidState(format!(
                    "domain {name:?} is not paused"
                )));
            }
            GuestState::Shutoff | GuestState::Crashed => {
                return Err(ServiceError::InvalidState(format!(
                    "domain {name:?} is not running"
                )));
            }
        }
        self.qmp()?
            .cont()
            .await
            .map_err(ServiceError::qemu(format!(
                "domain {name:?}: cannot resume"
            )))?;
        self.apply(GuestEvent::Resumed);
        Ok(())
    }

    async fn shutdown(&mut self, timeout: Duration, force: bool, job: Arc<Job>, reply: Reply<()>) {
        let name = self.name();
        let refuse = if !self.state().is_active() {
            Some(ServiceError::InvalidState(format!(
                "domain {name:?} is not running"
            )))
        } else if self.pending_shutdown.is_some() {
            Some(ServiceError::Busy(format!(
                "domain {name:?} is already shutting down"
            )))
        } else {
            None
        };
        if let Some(e) = refuse {
            job.finish();
            let _ = reply.send(Err(e));
            return;
        }
        let sent = match self.qmp() {
            Ok(q) => q
                .system_powerdown()
                .await
                .map_err(ServiceError::qemu(format!(
                    "domain {name:?}: cannot send the power-off request"
                ))),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            job.finish();
            let _ = reply.send(Err(e));
            return;
        }
        job.set_phase("waiting for the guest to power off");
        job.set_cancelable(true);
        self.pending_shutdown = Some(PendingShutdown {
            deadline: Instant::now() + timeout,
            force,
            job,
            reply,
        });
    }

    async fn monitor(&self, command: &str, hmp: bool) -> ServiceResult<String> {
        let qmp = self.qmp()?;
        if hmp {
            return qmp
                .human_monitor_command(command)
                .await
                .map_err(ServiceError::qemu("human monitor command"));
        }
        let v: Value = serde_json::from_str(command).map_err(|e| {
            ServiceError::InvalidArgument(format!("the QMP command is not JSON: {e}"))
        })?;
        let Some(name) = v.get("execute").and_then(Value::as_str) else {
            return Err(ServiceError::InvalidArgument(
                "the QMP command has no \"execute\" member".into(),
            ));
        };
        let r = qmp
            .execute(name, v.get("arguments").cloned())
            .await
            .map_err(ServiceError::qemu(format!("QMP {name}")))?;
        Ok(r.to_string())
    }

    async fn create_snapshot(
        &mut self,
        req: CreateRequest,
        origin: String,
        job: &Job,
    ) -> ServiceResult<SnapshotId> {
        let info = self.info.borrow().clone();
        let run_state = match info.state {
            GuestState::Running => GuestRunState::Running,
            GuestState::Paused => GuestRunState::Paused,
            GuestState::Shutoff | GuestState::Crashed => GuestRunState::Shutoff,
        };
        if info.kind == DomainKind::Attached && !info.state.is_active() {
            return Err(ServiceError::Unsupported(format!(
                "domain {:?} is attached and its QEMU is not running: its disks belong to \
                 whoever starts it",
                info.def.name
            )));
        }
        let names: std::collections::HashSet<&str> =
            info.snapshots.values().map(|s| s.name.as_str()).collect();
        let now = jiff::Timestamp::now().as_second();
        let plan = plan::plan(
            &info.def,
            run_state,
            &req,
            &|n| names.contains(n),
            now,
            &RealFs,
        )
        .map_err(plan_error)?;
        crate::storage::check_plan_files(&plan)?;
        let target = Target {
            qmp: if info.state.is_active() {
                self.qmp.as_ref()
            } else {
                None
            },
            running: info.state == GuestState::Running,
        };
        let created = create::create(
            create::Record {
                catalog: &self.shared.catalog,
                domain: info.id,
                parent: info.current_snapshot,
                origin: &origin,
                now_unix: now,
            },
            &plan,
            target,
            job,
        )
        .await;
        let rec = match created {
            Ok(r) => r,
            Err(e) => {
                // A create that failed after the disks switched left the new definition (the
                // overlays in use) in the catalog: follow it.
                let stored = self
                    .shared
                    .catalog
                    .lock()
                    .expect("catalog lock poisoned")
                    .domain(info.id);
                if let Ok(d) = stored
                    && let Ok(def) = DomainDef::from_xml(&d.xml)
                {
                    self.info.send_modify(|i| i.def = def);
                }
                return Err(e);
            }
        };
        let id = rec.id;
        // Our copy of the information shares the snapshot map: let it go first, or the
        // insertion below would copy every record.
        drop(names);
        drop(info);
        self.info.send_modify(|i| {
            i.def = plan.def_after.clone();
            i.current_snapshot = Some(id);
            Arc::make_mut(&mut i.snapshots).insert(id, rec);
        });
        Ok(id)
    }

    pub(super) fn persist_def(&self, def: &DomainDef) -> ServiceResult<()> {
        let xml = def.to_xml();
        self.shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .update_domain_xml(self.id(), &xml)?;
        Ok(())
    }

    async fn attach_disk(&mut self, disk: DiskDef, config_only: bool) -> ServiceResult<()> {
        let name = self.name();
        let mut def = self.info.borrow().def.clone();
        if def.disk(&disk.target).is_some() {
            return Err(ServiceError::AlreadyExists(format!(
                "domain {name:?} already has a disk {}",
                disk.target
            )));
        }
        if let Some(other) = def.disks.iter().find(|d| d.source == disk.source) {
            return Err(ServiceError::AlreadyExists(format!(
                "{} is already disk {} of domain {name:?}",
                disk.source.display(),
                other.target
            )));
        }
        check_image_format(&disk).await?;
        let live = self.state().is_active() && !config_only;
        if self.kind() == DomainKind::Attached && !live {
            return Err(ServiceError::Unsupported(format!(
                "domain {name:?} is attached: its configuration belongs to whoever started its \
                 QEMU, so disks can only be hot-plugged while it runs"
            )));
        }
        if disk.transient && live {
            return Err(ServiceError::Unsupported(format!(
                "disk {} is transient: transient disks can only be added while domain {name:?} \
                 is shut off",
                disk.target
            )));
        }
        def.disks.push(disk.clone());
        if live {
            self.hotplug(&def, &disk).await?;
        }
        if let Err(e) = self.persist_def(&def) {
            if live {
                self.unplug_nodes(&disk.target).await;
            }
            return Err(e);
        }
        info!(domain = %name, target = %disk.target, live, "disk attached");
        self.info.send_modify(|i| i.def = def);
        Ok(())
    }

    async fn hotplug(&mut self, def: &DomainDef, disk: &DiskDef) -> ServiceResult<()> {
        let name = self.name();
        let qmp = self.qmp()?.clone();
        let ports = qemu_cmd::hotplug_root_ports(def);
        let port = if disk.bus == super::def::DiskBus::Virtio && !ports.is_empty() {
            Some(self.free_root_port(&qmp, &ports).await?)
        } else {
            None
        };
        let plug_err =
            |e: qemu_cmd::CmdError| ServiceError::InvalidArgument(format!("domain {name:?}: {e}"));
        let node_args = qemu_cmd::blockdev_add_args(disk, None).map_err(plug_err)?;
        let dev = qemu_cmd::device_add_args(def, disk, port.as_deref()).map_err(plug_err)?;
        let mut added: Vec<String> = Vec::new();
        let mut result = Ok(());
        for args in node_args {
            let node = args
                .get("node-name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            match qmp.blockdev_add(args).await {
                Ok(_) => added.push(node),
                Err(e) => {
                    result = Err(ServiceError::qemu(format!(
                        "domain {name:?}: cannot open disk {}",
                        disk.target
                    ))(e));
                    break;
                }
            }
        }
        if result.is_ok()
            && let Err(e) = qmp.device_add(dev).await
        {
            result = Err(ServiceError::qemu(format!(
                "domain {name:?}: cannot plug disk {}",
                disk.target
            ))(e));
        }
        if result.is_err() {
            for node in added.iter().rev() {
                if let Err(e) = qmp.blockdev_del(node).await {
                    warn!(domain = %name, node = %node, error = %e, "could not roll back a block node");
                }
            }
        }
        result
    }

    /// The first hot-plug root port with nothing behind it.
    async fn free_root_port(&self, qmp: &Qmp, ports: &[String]) -> ServiceResult<String> {
        let pci = qmp
            .execute("query-pci", None)
            .await
            .map_err(ServiceError::qemu("cannot list PCI devices"))?;
        let mut used = std::collections::BTreeSet::new();
        for bus in pci.as_array().into_iter().flatten() {
            for dev in bus
                .get("devices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(id) = dev.get("qdev_id").and_then(Value::as_str) else {
                    continue;
                };
                if let Some(bridge) = dev.get("pci_bridge")
                    && bridge
                        .get("devices")
                        .and_then(Value::as_array)
                        .is_some_and(|d| !d.is_empty())
                {
                    used.insert(id.to_string());
                }
            }
        }
        ports
            .iter()
            .find(|p| !used.contains(*p))
            .cloned()
            .ok_or_else(|| {
                ServiceError::Unsupported(format!(
                    "domain {:?} has no free hot-plug slot left; add the disk while it is shut off",
                    self.name()
                ))
            })
    }

    async fn detach_disk(&mut self, target: String, config_only: bool, reply: Reply<()>) {
        let name = self.name();
        let def = self.info.borrow().def.clone();
        if def.disk(&target).is_none() {
            let _ = reply.send(Err(ServiceError::InvalidArgument(format!(
                "domain {name:?} has no disk {target}"
            ))));
            return;
        }
        if self.pending_detach.iter().any(|d| d.target == target) {
            let _ = reply.send(Err(ServiceError::Busy(format!(
                "disk {target} of domain {name:?} is already being removed"
            ))));
            return;
        }
        let live = self.state().is_active() && !config_only;
        if self.kind() == DomainKind::Attached && !live {
            let _ = reply.send(Err(ServiceError::Unsupported(format!(
                "domain {name:?} is attached: disks can only be hot-unplugged while it runs"
            ))));
            return;
        }
        if !live {
            let r = self.remove_from_def(&target);
            let _ = reply.send(r);
            return;
        }
        let sent = match self.qmp() {
            Ok(q) => q
                .device_del(&target)
                .await
                .map_err(ServiceError::qemu(format!(
                    "domain {name:?}: cannot unplug disk {target}"
                ))),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            let _ = reply.send(Err(e));
            return;
        }
        self.pending_detach.push(PendingDetach {
            target,
            deadline: Instant::now() + DETACH_TIMEOUT,
            reply: Some(reply),
        });
    }

    fn remove_from_def(&mut self, target: &str) -> ServiceResult<()> {
        let mut def = self.info.borrow().def.clone();
        def.disks.retain(|d| d.target != target);
        self.persist_def(&def)?;
        info!(domain = %self.name(), target, "disk detached");
        self.info.send_modify(|i| i.def = def);
        Ok(())
    }

    /// Deletes the block nodes that served a disk whose device is gone.
    async fn unplug_nodes(&self, target: &str) {
        let Some(qmp) = self.qmp.clone() else { return };
        let nodes = [
            qemu_cmd::format_node_name(target),
            qemu_cmd::file_node_name(target),
        ];
        for node in nodes {
            if let Err(e) = qmp.blockdev_del(&node).await {
                debug!(domain = %self.name(), node = %node, error = %e, "block node not deleted");
            }
        }
    }

    /// Completes the removal of a disk once its device is gone.
    async fn finish_detach(&mut self, target: &str) {
        let idx = self.pending_detach.iter().position(|d| d.target == target);
        let in_def = self.info.borrow().def.disk(target).is_some();
        if idx.is_none() && !in_def {
            return;
        }
        self.unplug_nodes(target).await;
        let r = if in_def {
            self.remove_from_def(target)
        } else {
            Ok(())
        };
        if let Some(i) = idx {
            let d = self.pending_detach.remove(i);
            if let Some(reply) = d.reply {
                let _ = reply.send(r);
            }
        } else if let Err(e) = r {
            warn!(domain = %self.name(), target, error = %e, "late unplug could not update the definition");
        }
    }
}

/// Creates a directory (and parents) readable only by the daemon's user.
pub fn create_private_dir(dir: &Path) -> ServiceResult<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(ServiceError::io(format!("cannot create {}", dir.display())))
}

/// Runs `qemu-img` with `args`; returns stdout, or an error carrying stderr.
pub async fn qemu_img(args: &[&std::ffi::OsStr]) -> ServiceResult<String> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(ServiceError::io("cannot run qemu-img"))?;
    if !out.status.success() {
        return Err(ServiceError::Io {
            context: "qemu-img failed".into(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks that a disk's file exists and really is in the declared format (a raw image that
/// claims qcow2, or the reverse, is refused before QEMU sees it).
pub async fn check_image_format(disk: &DiskDef) -> ServiceResult<()> {
    let meta = std::fs::metadata(&disk.source).map_err(ServiceError::io(format!(
        "disk {}: cannot use {}",
        disk.target,
        disk.source.display()
    )))?;
    if !meta.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        return Err(ServiceError::InvalidArgument(format!(
            "disk {}: {} is neither a regular file nor a block device",
            disk.target,
            disk.source.display()
        )));
    }
    let info = qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        disk.source.as_os_str(),
    ])
    .await?;
    let info: Value = serde_json::from_str(&info).map_err(|e| ServiceError::Io {
        context: "cannot read qemu-img info".into(),
        source: std::io::Error::other(e),
    })?;
    let found = info
        .get("format")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let declared = disk.format.as_str();
    // A probe cannot tell raw from an unknown format, so only a mismatch between two formats
    // qemu-img recognised is refused.
    if found != declared {
        return Err(ServiceError::InvalidArgument(format!(
            "disk {}: {} is a {found} image, but the definition says {declared}",
            disk.target,
            disk.source.display()
        )));
    }
    Ok(())
}

/// Maps a planning refusal to the service vocabulary.
pub fn plan_error(e: PlanError) -> ServiceError {
    match e {
        PlanError::InvalidArgument(m) => ServiceError::InvalidArgument(m),
        PlanError::Unsupported(m) => ServiceError::Unsupported(m),
        PlanError::InvalidState(m) => ServiceError::InvalidState(m),
        PlanError::AlreadyExists(m) => ServiceError::AlreadyExists(m),
    }
}
