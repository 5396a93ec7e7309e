//! Snapshot commands: create (following the job's progress), list, info, dumpxml.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use vmsnap_dbus::Error;
use vmsnap_dbus::proxy::{JobProxy, ManagerProxy, SnapshotProxy};
use zbus::{Connection, OwnedObjectPath, Variant};

use crate::cli::CreateArgs;
use crate::output::{self, Failure};
use crate::{Opts, domain_proxy};

/// How often the progress line is refreshed.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

async fn snapshot_json(conn: &Connection, path: OwnedObjectPath) -> Result<Value, Failure> {
    let s = SnapshotProxy::builder(conn)
        .path(path.clone())
        .build()
        .await?;
    let (mem_mode, mem_place) = s.memory().await?;
    let disks: Vec<Value> = s
        .disks()
        .await?
        .into_iter()
        .map(|(t, m, f, o)| json!({"target": t, "mode": m, "file": f, "overlay": o}))
        .collect();
    let parent = s.parent().await?;
    let parent_name = if parent.as_str() == "/" {
        Value::Null
    } else {
        let p = SnapshotProxy::builder(conn)
            .path(parent.clone())
            .build()
            .await?;
        Value::String(p.name().await?)
    };
    Ok(json!({
        "name": s.name().await?,
        "description": s.description().await?,
        "created": s.creation_time().await?,
        "state": s.state().await?,
        "kind": s.kind().await?,
        "memory": {"mode": mem_mode, "where": mem_place},
        "disks": disks,
        "parent": parent_name,
        "current": s.is_current().await?,
        "status": s.status().await?,
        "origin": s.origin().await?,
        "protected": s.protected().await?,
        "path": path.to_string(),
    }))
}

/// `vmsnap create`
pub async fn create(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    a: CreateArgs,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, &a.domain).await?;
    let follow = !a.no_wait;
    let mut o = Opts::new();
    o.insert("async", Variant::Bool(true));
    if a.live {
        o.insert("live", Variant::Bool(true));
    }
    if a.keep_active_name {
        o.insert("keep-active-name", Variant::Bool(true));
    }
    let job_path = match &a.xml {
        Some(file) => {
            let xml = std::fs::read_to_string(file)
                .map_err(|e| Failure::local(format!("cannot read {}: {e}", file.display())))?;
            d.create_snapshot_xml(&xml, o).await?
        }
        None => {
            if a.disk_only {
                o.insert("disk-only", Variant::Bool(true));
            }
            if let Some(p) = &a.parent {
                o.insert("parent", Variant::from(p.as_str()));
            }
            if let Some(m) = &a.memory {
                o.insert("memory", Variant::from(m.as_str()));
            }
            if let Some(f) = &a.memory_file {
                o.insert(
                    "memory-file",
                    Variant::from(f.to_string_lossy().into_owned()),
                );
            }
            if let Some(v) = &a.vmstate_disk {
                o.insert("vmstate-disk", Variant::from(v.as_str()));
            }
            if !a.disks.is_empty() {
                o.insert("disks", Variant::from(a.disks.clone()));
            }
            d.create_snapshot(a.name.as_deref().unwrap_or(""), &a.description, o)
                .await?
        }
    };
    if !follow {
        output::emit(json_mode, &json!({"job": job_path.to_string()}), || {
            job_path.to_string()
        });
        return Ok(());
    }
    let result = follow_job(conn, job_path, json_mode).await?;
    let info = snapshot_json(conn, result).await?;
    let name = info["name"].as_str().unwrap_or_default().to_string();
    output::emit(json_mode, &info, || {
        format!("Snapshot {name} of {} created", a.domain)
    });
    Ok(())
}

/// Follows a job to its end, drawing progress on a terminal; returns its result object.
pub async fn follow_job(
    conn: &Connection,
    path: OwnedObjectPath,
    json_mode: bool,
) -> Result<OwnedObjectPath, Failure> {
    // Uncached: a cached Result/Finished could lag behind the Completed signal.
    let job = JobProxy::builder(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let mut completed = job.receive_completed().await?;
    let tty = !json_mode && std::io::stderr().is_terminal();
    let mut drawn = false;
    loop {
        if job.finished().await? {
            break;
        }
        if tty {
            let phase = job.phase().await?;
            let (done, total) = (job.bytes_done().await?, job.bytes_total().await?);
            let line = match (done * 100).checked_div(total) {
                Some(pct) => format!("{phase}: {pct:>3}% {} / {} MiB", done >> 20, total >> 20),
                None => phase,
            };
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
            drawn = true;
        }
        tokio::select! {
            _ = completed.next() => {}
            _ = tokio::time::sleep(PROGRESS_INTERVAL) => {}
        }
    }
    if drawn {
        eprint!("\r\x1b[2K");
    }
    let err = job.error_name().await?;
    if !err.is_empty() {
        let msg = job.error_message().await?;
        return Err(Failure::wire(error_from_name(&err, msg)));
    }
    Ok(job.result().await?)
}

fn error_from_name(name: &str, msg: String) -> Error {
    match name.rsplit('.').next().unwrap_or("") {
        "NoSuchDomain" => Error::NoSuchDomain(msg),
        "NoSuchSnapshot" => Error::NoSuchSnapshot(msg),
        "NoSuchJob" => Error::NoSuchJob(msg),
        "AlreadyExists" => Error::AlreadyExists(msg),
        "InvalidArgument" => Error::InvalidArgument(msg),
        "Unsupported" => Error::Unsupported(msg),
        "InvalidState" => Error::InvalidState(msg),
        "Busy" => Error::Busy(msg),
        "NotAuthorized" => Error::NotAuthorized(msg),
        "QemuError" => Error::QemuError(msg),
        "Cancelled" => Error::Cancelled(msg),
        "Timeout" => Error::Timeout(msg),
        _ => Error::Failed(msg),
    }
}

/// `vmsnap list`
pub async fn list(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    let mut rows = Vec::new();
    for p in d.list_snapshots().await? {
        rows.push(snapshot_json(conn, p).await?);
    }
    output::emit(json_mode, &Value::Array(rows.clone()), || {
        output::snapshot_table(&rows)
    });
    Ok(())
}

/// `vmsnap info`
pub async fn info(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
    snapshot: &str,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    let p = d.find_snapshot(snapshot).await?;
    let v = snapshot_json(conn, p).await?;
    output::emit(json_mode, &v, || output::snapshot_info(&v));
    Ok(())
}

/// `vmsnap dumpxml`
pub async fn dumpxml(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
    snapshot: &str,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    let p = d.find_snapshot(snapshot).await?;
    let s = SnapshotProxy::builder(conn).path(p).build().await?;
    let xml = s.get_xml().await?;
    output::emit(json_mode, &json!({"xml": xml}), || {
        xml.trim_end().to_string()
    });
    Ok(())
}

/// `vmsnap revert`
pub async fn revert(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
    snapshot: &str,
    mut o: Opts<'_>,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    let p = d.find_snapshot(snapshot).await?;
    let s = SnapshotProxy::builder(conn).path(p).build().await?;
    o.insert("async", Variant::Bool(true));
    let job = s.revert(o).await?;
    follow_job(conn, job, json_mode).await?;
    let state = d.state().await?;
    output::emit(
        json_mode,
        &json!({"domain": domain, "snapshot": snapshot, "state": state}),
        || format!("Domain {domain} reverted to {snapshot} ({state})"),
    );
    Ok(())
}

/// `vmsnap delete`
pub async fn delete(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
    snapshot: &str,
    mut o: Opts<'_>,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    let p = d.find_snapshot(snapshot).await?;
    let s = SnapshotProxy::builder(conn).path(p).build().await?;
    o.insert("async", Variant::Bool(true));
    let job = s.delete(o).await?;
    follow_job(conn, job, json_mode).await?;
    output::emit(
        json_mode,
        &json!({"domain": domain, "snapshot": snapshot, "deleted": true}),
        || format!("Snapshot {snapshot} of {domain} deleted"),
    );
    Ok(())
}
