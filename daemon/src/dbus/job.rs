//! `org.vmsnap.VmSnap1.Job` objects: one per long operation, removed a little after it ends.

use std::sync::Arc;
use std::time::Duration;

use vmsnap_dbus::Error;
use vmsnap_dbus::names::{domain_path, job_path};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{ObjectServer, OwnedObjectPath, interface};

use super::wire_error;
use crate::error::ServiceResult;
use crate::job::{Job, JobStatus};
use crate::service::Service;

/// How long a finished job's object stays on the bus, so that a caller that started it
/// asynchronously can still read its final state.
pub const JOB_LINGER: Duration = Duration::from_secs(10);

/// The D-Bus face of a job.
pub struct JobIface {
    job: Arc<Job>,
}

fn obj(s: String) -> OwnedObjectPath {
    OwnedObjectPath::try_from(s).expect("object paths are built from numeric ids")
}

#[interface(name = "org.vmsnap.VmSnap1.Job")]
impl JobIface {
    /// Asks the operation to stop; refused with `Unsupported` when it cannot stop now.
    async fn cancel(&self, #[zbus(header)] header: Header<'_>) -> Result<(), Error> {
        super::auth::authorize_cancel(&header, &self.job).await?;
        if self.job.cancel() {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "job {} ({}) cannot be cancelled now",
                self.job.id(),
                self.job.status().operation
            )))
        }
    }

    /// What the job does, e.g. `shutdown`.
    #[zbus(property)]
    async fn operation(&self) -> String {
        self.job.status().operation
    }

    /// The domain the job works on.
    #[zbus(property)]
    async fn domain(&self) -> OwnedObjectPath {
        obj(domain_path(self.job.status().domain))
    }

    /// Progress from 0 to 1.
    #[zbus(property)]
    async fn progress(&self) -> f64 {
        self.job.status().progress
    }

    /// Whether `Progress` means anything yet.
    #[zbus(property)]
    async fn progress_valid(&self) -> bool {
        self.job.status().progress_valid
    }

    /// Bytes done so far.
    #[zbus(property)]
    async fn bytes_done(&self) -> u64 {
        self.job.status().bytes_done
    }

    /// Bytes to do in all; 0 when unknown.
    #[zbus(property)]
    async fn bytes_total(&self) -> u64 {
        self.job.status().bytes_total
    }

    /// The current phase.
    #[zbus(property)]
    async fn phase(&self) -> String {
        self.job.status().phase
    }

    /// Start time, microseconds since the Unix epoch.
    #[zbus(property)]
    async fn start_time(&self) -> u64 {
        self.job.status().start_time_us
    }

    /// Whether `Cancel` would be honoured now.
    #[zbus(property)]
    async fn cancelable(&self) -> bool {
        self.job.status().cancelable
    }

    /// Unique bus name of the caller that started the job.
    #[zbus(property)]
    async fn owner(&self) -> String {
        self.job.status().owner
    }

    /// Whether the job has ended.
    #[zbus(property)]
    async fn finished(&self) -> bool {
        self.job.status().finished
    }

    /// The object the operation produced (e.g. the new snapshot), `/` when none or not yet.
    #[zbus(property)]
    async fn result(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(self.job.status().result).unwrap_or_else(|_| obj("/".into()))
    }

    /// The error's full name when the job failed; empty otherwise.
    #[zbus(property)]
    async fn error_name(&self) -> String {
        self.job.status().error_name
    }

    /// The error's message when the job failed; empty otherwise.
    #[zbus(property)]
    async fn error_message(&self) -> String {
        self.job.status().error_message
    }

    /// The job ended: success, the error's name (empty on success) and a message.
    #[zbus(signal)]
    async fn completed(
        emitter: &SignalEmitter<'_>,
        success: bool,
        error_name: &str,
        message: &str,
    ) -> zbus::Result<()>;
}

async fn announce_changes(
    server: &ObjectServer,
    path: &OwnedObjectPath,
    old: &JobStatus,
    new: &JobStatus,
) {
    let Ok(iface) = server.interface::<_, JobIface>(path.as_ref()).await else {
        return;
    };
    let mut names = Vec::new();
    let mut note = |changed: bool, name: &'static str| {
        if changed {
            names.push(name);
        }
    };
    note(old.phase != new.phase, "Phase");
    note(old.progress != new.progress, "Progress");
    note(old.progress_valid != new.progress_valid, "ProgressValid");
    note(old.bytes_done != new.bytes_done, "BytesDone");
    note(old.bytes_total != new.bytes_total, "BytesTotal");
    note(old.cancelable != new.cancelable, "Cancelable");
    note(old.result != new.result, "Result");
    note(old.error_name != new.error_name, "ErrorName");
    note(old.error_name != new.error_name, "ErrorMessage");
    note(old.finished != new.finished, "Finished");
    let i = iface.get().await;
    super::dispatch::properties_changed(server, &*i, path.as_str(), &names).await;
}

/// What a job's operation returns: maybe an object to report as the job's `Result`.
pub trait JobResult: Send + 'static {
    /// The produced object, if any.
    fn object(&self) -> Option<String>;
}

impl JobResult for () {
    fn object(&self) -> Option<String> {
        None
    }
}

impl JobResult for OwnedObjectPath {
    fn object(&self) -> Option<String> {
        Some(self.to_string())
    }
}

/// Runs `op` as job `job`: serves the job object, forwards its property changes, emits
/// `Completed`, and removes the object after `JOB_LINGER`. Returns the job's path and a
/// receiver of the operation's result.
pub async fn run_job<T, F>(
    server: &ObjectServer,
    service: &Arc<Service>,
    job: Arc<Job>,
    op: F,
) -> Result<
    (
        OwnedObjectPath,
        tokio::sync::oneshot::Receiver<Result<T, Error>>,
    ),
    Error,
>
where
    T: JobResult,
    F: std::future::Future<Output = ServiceResult<T>> + Send + 'static,
{
    let path = obj(job_path(job.id().0));
    super::object_manager::add(server, path.as_str(), JobIface { job: job.clone() }).await?;
    super::manager::ManagerIface::announce_jobs(server).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = server.clone();
    let service = service.clone();
    let p = path.clone();
    tokio::spawn(async move {
        let mut status = job.subscribe();
        let mut last = status.borrow_and_update().clone();
        let forward = async {
            while status.changed().await.is_ok() {
                let now = status.borrow_and_update().clone();
                announce_changes(&server, &p, &last, &now).await;
                last = now;
            }
        };
        let result = tokio::select! {
            r = op => r,
            _ = forward => unreachable!("the job's sender lives as long as the job"),
        };
        let result = result.map_err(wire_error);
        match &result {
            Ok(v) => job.set_outcome(v.object().as_deref(), None),
            Err(e) => {
                let name = format!("{}.{}", vmsnap_dbus::names::ERROR_PREFIX, e.short_name());
                job.set_outcome(None, Some((&name, &e.message())));
            }
        }
        job.finish();
        if server.interface::<_, JobIface>(p.as_ref()).await.is_ok()
            && let Some(e) = super::dispatch::bus_emitter(p.as_str())
        {
            let final_status = job.status();
            announce_changes(&server, &p, &last, &final_status).await;
            let (ok, name, msg) = match &result {
                Ok(_) => (true, String::new(), String::new()),
                Err(e) => (
                    false,
                    format!("{}.{}", vmsnap_dbus::names::ERROR_PREFIX, e.short_name()),
                    e.message(),
                ),
            };
            let _ = JobIface::completed(&e, ok, &name, &msg).await;
        }
        let _ = tx.send(result);
        tokio::time::sleep(JOB_LINGER).await;
        let _ = super::object_manager::remove::<JobIface>(&server, p.as_str()).await;
        service.jobs.remove(job.id());
        super::manager::ManagerIface::announce_jobs(&server).await;
    });
    Ok((path, rx))
}
