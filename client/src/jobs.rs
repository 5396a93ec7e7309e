//! `vmsnap jobs` and `vmsnap cancel`: the daemon's job objects, found through the Manager's
//! `Jobs` property.
//!
//! A job may end and go away between listing and reading it; such a job is left out of the
//! listing rather than failing the whole command.

use serde_json::{Value, json};
use vmsnap_dbus::Error;
use vmsnap_dbus::names::job_path;
use vmsnap_dbus::proxy::{DomainProxy, JobProxy, ManagerProxy};
use zbus::{Connection, OwnedObjectPath};

use crate::output::{self, Failure};

/// The job's number from its path (`/org/vmsnap/VmSnap1/job/7` gives 7).
fn job_number(path: &str) -> u64 {
    path.rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `running`, `done`, `cancelled` or `failed`, from the job's properties.
fn job_state(finished: bool, error_name: &str) -> &'static str {
    if !finished {
        "running"
    } else if error_name.is_empty() {
        "done"
    } else if error_name.ends_with(".Cancelled") {
        "cancelled"
    } else {
        "failed"
    }
}

async fn job_json(conn: &Connection, path: OwnedObjectPath) -> Result<Value, Failure> {
    let j = JobProxy::builder(conn)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let domain = j.domain().await?;
    let domain_name = match DomainProxy::builder(conn).path(domain).build().await {
        Ok(d) => d.name().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let finished = j.finished().await?;
    let error_name = j.error_name().await?;
    Ok(json!({
        "id": job_number(path.as_str()),
        "path": path.to_string(),
        "operation": j.operation().await?,
        "domain": domain_name,
        "state": job_state(finished, &error_name),
        "phase": j.phase().await?,
        "progress": if j.progress_valid().await? { json!(j.progress().await?) } else { Value::Null },
        "bytes_done": j.bytes_done().await?,
        "bytes_total": j.bytes_total().await?,
        "cancelable": j.cancelable().await?,
        "started_us": j.start_time().await?,
        "owner": j.owner().await?,
        "result": j.result().await?.to_string(),
        "error": error_name,
        "message": j.error_message().await?,
    }))
}

/// Whether `e` means the object is not there (any more).
fn is_gone(e: &Failure) -> bool {
    e.code_is_not_found()
}

/// `vmsnap jobs`
pub async fn list(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
) -> Result<(), Failure> {
    let mut rows = Vec::new();
    for path in manager.jobs().await? {
        match job_json(conn, path).await {
            Ok(v) => rows.push(v),
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(e),
        }
    }
    output::emit(json_mode, &Value::Array(rows.clone()), || jobs_table(&rows));
    Ok(())
}

fn jobs_table(rows: &[Value]) -> String {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let op_w = rows
        .iter()
        .map(|r| s(r, "operation").len())
        .max()
        .unwrap_or(0)
        .max(9);
    let dom_w = rows
        .iter()
        .map(|r| s(r, "domain").chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    let mut out = format!(
        "{:>4}  {:<op_w$}  {:<dom_w$}  {:<9}  {:<10}  PROGRESS",
        "ID", "OPERATION", "DOMAIN", "STATE", "PHASE"
    );
    for r in rows {
        let progress = match (
            r["bytes_total"].as_u64().unwrap_or(0),
            r["progress"].as_f64(),
        ) {
            (total, _) if total > 0 => format!(
                "{:.0}% of {:.1} MiB",
                r["bytes_done"].as_u64().unwrap_or(0) as f64 * 100.0 / total as f64,
                total as f64 / (1024.0 * 1024.0)
            ),
            (_, Some(p)) => format!("{:.0}%", p * 100.0),
            _ => "-".to_string(),
        };
        out.push_str(&format!(
            "\n{:>4}  {:<op_w$}  {:<dom_w$}  {:<9}  {:<10}  {progress}",
            r["id"].as_u64().unwrap_or(0),
            s(r, "operation"),
            s(r, "domain"),
            s(r, "state"),
            s(r, "phase"),
        ));
    }
    out
}

/// The job's object path from a number or a path; `None` when `spec` is neither.
fn parse_job(spec: &str) -> Option<String> {
    if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        return spec.parse().ok().map(job_path);
    }
    let n = spec.strip_prefix(&job_path(0)[..job_path(0).len() - 1])?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| spec.to_string())
}

/// `vmsnap cancel JOB`
pub async fn cancel(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    spec: &str,
) -> Result<(), Failure> {
    let path = parse_job(spec).ok_or_else(|| {
        Failure::local(format!(
            "{spec:?} is not a job: give its number or its path ({})",
            job_path(7)
        ))
    })?;
    if !manager.jobs().await?.iter().any(|j| j.as_str() == path) {
        return Err(Failure::wire(Error::NoSuchJob(format!(
            "no job {path} (it may have ended and gone away)"
        ))));
    }
    let j = JobProxy::builder(conn).path(path.clone()).build().await?;
    j.cancel().await?;
    output::emit(
        json_mode,
        &json!({"job": path, "cancel": "requested"}),
        || format!("Cancel of job {} requested", job_number(&path)),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_job_spec_accepts_number_or_path_only() {
        assert_eq!(parse_job("7").as_deref(), Some("/org/vmsnap/VmSnap1/job/7"));
        assert_eq!(
            parse_job("/org/vmsnap/VmSnap1/job/12").as_deref(),
            Some("/org/vmsnap/VmSnap1/job/12")
        );
        assert_eq!(parse_job("/org/vmsnap/VmSnap1/domain/1"), None);
        assert_eq!(parse_job("/org/vmsnap/VmSnap1/job/"), None);
        assert_eq!(parse_job("seven"), None);
        assert_eq!(parse_job(""), None);
    }

    #[test]
    fn job_state_names_the_outcome() {
        assert_eq!(job_state(false, ""), "running");
        assert_eq!(job_state(true, ""), "done");
        assert_eq!(
            job_state(true, "org.vmsnap.VmSnap1.Error.Cancelled"),
            "cancelled"
        );
        assert_eq!(job_state(true, "org.vmsnap.VmSnap1.Error.Failed"), "failed");
    }
}
