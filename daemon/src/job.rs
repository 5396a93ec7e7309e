//! Long operations: progress, phase, cancellation and the registry of live jobs.
//!
//! A `Job` is created for every long operation before it starts and lives until a little after
//! it completes. The operation reports through the job (phase, bytes, progress); observers
//! (the D-Bus `Job` objects) watch its status. Cancellation is cooperative: the operation
//! checks the job's token at points where stopping leaves nothing behind, and only while it has
//! marked itself cancelable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Identifies a job for the daemon's lifetime (job numbers are not reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A snapshot of a job's observable state.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    /// What the job does, e.g. `shutdown`.
    pub operation: String,
    /// The catalog id of the domain it works on.
    pub domain: i64,
    /// Current phase, e.g. `prepare`, `memory`, `disks`, `commit`.
    pub phase: String,
    /// Progress from 0 to 1, meaningful when `progress_valid`.
    pub progress: f64,
    /// Whether `progress` means anything yet.
    pub progress_valid: bool,
    /// Bytes done (0 when the operation does not count bytes).
    pub bytes_done: u64,
    /// Bytes to do in all (0 when unknown).
    pub bytes_total: u64,
    /// Whether a cancel would be honoured now.
    pub cancelable: bool,
    /// Microseconds since the Unix epoch at creation.
    pub start_time_us: u64,
    /// Unique bus name (or other identity) of whoever started it.
    pub owner: String,
    /// Set once, when the job ends.
    pub finished: bool,
    /// When finished successfully: the object the operation produced (`/` when none).
    pub result: String,
    /// When finished with an error: its full D-Bus name; empty otherwise.
    pub error_name: String,
    /// When finished with an error: its message.
    pub error_message: String,
}

/// A live job: shared between the operation (which reports) and observers.
#[derive(Debug)]
pub struct Job {
    id: JobId,
    status: watch::Sender<JobStatus>,
    cancel: CancellationToken,
    /// The unix user who started it, as the bus reported it (see `dbus::auth`); unset for jobs
    /// nobody on the bus started, which only privileged callers may cancel.
    owner_uid: std::sync::OnceLock<u32>,
}

impl Job {
    /// The job's number.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// A receiver that sees every status change.
    pub fn subscribe(&self) -> watch::Receiver<JobStatus> {
        self.status.subscribe()
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.status.borrow().clone()
    }

    /// Enters a new phase.
    pub fn set_phase(&self, phase: &str) {
        self.status.send_if_modified(|s| {
            let changed = s.phase != phase;
            s.phase = phase.to_string();
            changed
        });
    }

    /// Reports progress in bytes; `total` 0 means unknown.
    pub fn set_bytes(&self, done: u64, total: u64) {
        self.status.send_if_modified(|s| {
            let progress = if total > 0 {
                (done as f64 / total as f64).min(1.0)
            } else {
                0.0
            };
            let changed = s.bytes_done != done || s.bytes_total != total;
            s.bytes_done = done;
            s.bytes_total = total;
            s.progress = progress;
            s.progress_valid = total > 0;
            changed
        });
    }

    /// Reports progress as a fraction.
    pub fn set_progress(&self, progress: f64) {
        self.status.send_if_modified(|s| {
            let p = progress.clamp(0.0, 1.0);
            let changed = s.progress != p || !s.progress_valid;
            s.progress = p;
            s.progress_valid = true;
            changed
        });
    }

    /// Marks whether cancelling is possible now.
    pub fn set_cancelable(&self, cancelable: bool) {
        self.status.send_if_modified(|s| {
            let changed = s.cancelable != cancelable;
            s.cancelable = cancelable;
            changed
        });
    }

    /// Requests cancellation. Returns false when the job is not cancelable now.
    pub fn cancel(&self) -> bool {
        if !self.status.borrow().cancelable {
            return false;
        }
        self.cancel.cancel();
        true
    }

    /// Records the unix user who started the job (once; later calls are ignored).
    pub fn set_owner_uid(&self, uid: u32) {
        let _ = self.owner_uid.set(uid);
    }

    /// The unix user who started the job, if known.
    pub fn owner_uid(&self) -> Option<u32> {
        self.owner_uid.get().copied()
    }

    /// The token the operation watches.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Records how the job ended: the object it produced, or an error's name and message.
    pub fn set_outcome(&self, result: Option<&str>, error: Option<(&str, &str)>) {
        self.status.send_modify(|s| {
            s.result = result.unwrap_or("/").to_string();
            if let Some((name, message)) = error {
                s.error_name = name.to_string();
                s.error_message = message.to_string();
            }
        });
    }

    /// Marks the job finished (observers then report completion).
    pub fn finish(&self) {
        self.status.send_modify(|s| {
            s.finished = true;
            s.cancelable = false;
            if s.progress_valid || s.bytes_total == 0 {
                s.progress = 1.0;
                s.progress_valid = true;
            }
        });
    }
}

/// The registry of live jobs.
#[derive(Debug, Default)]
pub struct JobRegistry {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<JobId, Arc<Job>>>,
}

impl JobRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates and registers a job.
    pub fn create(&self, operation: &str, domain: i64, owner: &str) -> Arc<Job> {
        let id = JobId(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let start_time_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let (status, _) = watch::channel(JobStatus {
            operation: operation.to_string(),
            domain,
            phase: "prepare".to_string(),
            progress: 0.0,
            progress_valid: false,
            bytes_done: 0,
            bytes_total: 0,
            cancelable: false,
            start_time_us,
            owner: owner.to_string(),
            finished: false,
            result: "/".to_string(),
            error_name: String::new(),
            error_message: String::new(),
        });
        let job = Arc::new(Job {
            id,
            status,
            cancel: CancellationToken::new(),
            owner_uid: std::sync::OnceLock::new(),
        });
        self.jobs
            .lock()
            .expect("job registry poisoned")
            .insert(id, job.clone());
        job
    }

    /// Forgets a job (after it finished and lingered).
    pub fn remove(&self, id: JobId) {
        self.jobs.lock().expect("job registry poisoned").remove(&id);
    }

    /// A job by number.
    pub fn get(&self, id: JobId) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .expect("job registry poisoned")
            .get(&id)
            .cloned()
    }

    /// Every registered job's number, in order (finished ones that still linger included).
    pub fn ids(&self) -> Vec<JobId> {
        self.jobs
            .lock()
            .expect("job registry poisoned")
            .keys()
            .copied()
            .collect()
    }

    /// The jobs that have not finished, in number order, with their state.
    pub fn running_jobs(&self) -> Vec<(JobId, JobStatus)> {
        self.jobs
            .lock()
            .expect("job registry poisoned")
            .iter()
            .map(|(id, j)| (*id, j.status.borrow().clone()))
            .filter(|(_, st)| !st.finished)
            .collect()
    }

    /// Number of jobs that have not finished.
    pub fn running(&self) -> usize {
        self.jobs
            .lock()
            .expect("job registry poisoned")
            .values()
            .filter(|j| !j.status.borrow().finished)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_cancel_when_not_cancelable_is_refused() {
        let reg = JobRegistry::new();
        let job = reg.create("shutdown", 1, ":1.5");
        assert!(!job.cancel());
        assert!(!job.cancel_token().is_cancelled());
        job.set_cancelable(true);
        assert!(job.cancel());
        assert!(job.cancel_token().is_cancelled());
    }

    #[test]
    fn job_bytes_progress_is_fraction_of_total() {
        let reg = JobRegistry::new();
        let job = reg.create("create", 1, ":1.5");
        let mut rx = job.subscribe();
        job.set_bytes(25, 100);
        assert!(rx.has_changed().unwrap());
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.progress, 0.25);
        assert!(s.progress_valid);
        job.set_bytes(25, 100);
        assert!(
            !rx.has_changed().unwrap(),
            "an unchanged report must not wake observers"
        );
        assert_eq!(reg.running(), 1);
        job.finish();
        assert_eq!(reg.running(), 0);
    }

    #[test]
    fn job_ids_are_not_reused() {
        let reg = JobRegistry::new();
        let a = reg.create("x", 1, "");
        reg.remove(a.id());
        let b = reg.create("x", 1, "");
        assert_ne!(a.id(), b.id());
    }
}
