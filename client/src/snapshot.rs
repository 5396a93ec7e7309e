//! Snapshot commands: create (following the job's progress), list, info, dumpxml.

use std::collections::HashMap;

use serde_json::{Value, json};
use vmsnap_dbus::Error;
use vmsnap_dbus::names::{BUS_NAME, NO_OBJECT, ROOT_PATH, SNAPSHOT_INTERFACE};
use vmsnap_dbus::proxy::{ManagerProxy, SnapshotProxy};
use zbus::fdo::{ObjectManagerProxy, PropertiesProxy};
use zbus::names::InterfaceName;
use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

use crate::cli::CreateArgs;
use crate::output::{self, Failure};
use crate::{Opts, domain_proxy, progress};

/// A failure of a standard interface's call (`Properties`, `ObjectManager`).
fn fdo_failure(e: zbus::fdo::Error) -> Failure {
    Failure::wire(Error::ZBus(e.into()))
}

/// A snapshot object's properties, as `Properties.GetAll` and `GetManagedObjects` give them.
type Props = HashMap<String, OwnedVariant>;

/// Property `key` of a snapshot's `props`, taken out as a `T`.
fn take<T>(props: &mut Props, key: &str) -> Result<T, Failure>
where
    T: TryFrom<OwnedVariant>,
    T::Error: std::fmt::Display,
{
    let v = props
        .remove(key)
        .ok_or_else(|| Failure::local_io(format!("the daemon did not send property {key}")))?;
    T::try_from(v).map_err(|e| Failure::local_io(format!("property {key}: {e}")))
}

/// One snapshot's properties as JSON, with `parent` and `children` as object paths.
fn row_from_props(path: &str, mut props: Props) -> Result<Value, Failure> {
    let (mem_mode, mem_place): (String, String) = take(&mut props, "Memory")?;
    let disks: Vec<(String, String, String, String)> = take(&mut props, "Disks")?;
    let disks: Vec<Value> = disks
        .into_iter()
        .map(|(t, m, f, o)| json!({"target": t, "mode": m, "file": f, "overlay": o}))
        .collect();
    let parent: OwnedObjectPath = take(&mut props, "Parent")?;
    let children: Vec<OwnedObjectPath> = take(&mut props, "Children")?;
    let children: Vec<String> = children.iter().map(|c| c.to_string()).collect();
    Ok(json!({
        "name": take::<String>(&mut props, "Name")?,
        "description": take::<String>(&mut props, "Description")?,
        "created": take::<u64>(&mut props, "CreationTime")?,
        "state": take::<String>(&mut props, "State")?,
        "kind": take::<String>(&mut props, "Kind")?,
        "memory": {"mode": mem_mode, "where": mem_place},
        "disks": disks,
        "parent": if parent.as_str() == NO_OBJECT { Value::Null } else { json!(parent.to_string()) },
        "current": take::<bool>(&mut props, "IsCurrent")?,
        "status": take::<String>(&mut props, "Status")?,
        "children": children,
        "size_on_disk": take::<u64>(&mut props, "SizeOnDisk")?,
        "origin": take::<String>(&mut props, "Origin")?,
        "protected": take::<bool>(&mut props, "Protected")?,
        "path": path,
    }))
}

/// One snapshot's properties as JSON (one `Properties.GetAll`), see [`row_from_props`].
async fn snapshot_row(conn: &Connection, path: OwnedObjectPath) -> Result<Value, Failure> {
    let props = PropertiesProxy::builder(conn)
        .destination(BUS_NAME)
        .path(path.clone())
        .cache_properties(CacheProperties::No)
        .build()
        .await?
        .get_all(InterfaceName::from_static_str_unchecked(SNAPSHOT_INTERFACE))
        .await
        .map_err(fdo_failure)?;
    row_from_props(path.as_str(), props)
}

/// Every snapshot object's properties, from one `GetManagedObjects` of the daemon's root.
async fn all_snapshot_props(conn: &Connection) -> Result<HashMap<OwnedObjectPath, Props>, Failure> {
    let objects = ObjectManagerProxy::builder(conn)
        .destination(BUS_NAME)
        .path(ROOT_PATH)
        .cache_properties(CacheProperties::No)
        .build()
        .await?
        .get_managed_objects()
        .await
        .map_err(fdo_failure)?;
    Ok(objects
        .into_iter()
        .filter_map(|(path, mut ifaces)| {
            let props = ifaces.remove(SNAPSHOT_INTERFACE)?;
            Some((path, props))
        })
        .collect())
}

/// A snapshot's name by path; `None` when it went away meanwhile (deleted by a running job).
async fn name_of(conn: &Connection, path: &str) -> Result<Option<String>, Failure> {
    let p = SnapshotProxy::builder(conn).path(path).build().await?;
    match p.name().await {
        Ok(n) => Ok(Some(n)),
        Err(e) => {
            let f = Failure::from(e);
            if f.code_is_not_found() {
                Ok(None)
            } else {
                Err(f)
            }
        }
    }
}

/// Replaces the paths in a row's `parent` and `children` by names, from `known` (path to
/// name) or else by asking the daemon; children that went away are left out.
async fn resolve_names(
    conn: &Connection,
    row: &mut Value,
    known: &std::collections::HashMap<String, String>,
) -> Result<(), Failure> {
    let lookup = async |p: &str| -> Result<Option<String>, Failure> {
        match known.get(p) {
            Some(n) => Ok(Some(n.clone())),
            None => name_of(conn, p).await,
        }
    };
    if let Some(p) = row["parent"].as_str().map(str::to_string) {
        row["parent"] = lookup(&p).await?.map_or(Value::Null, Value::String);
    }
    let mut names = Vec::new();
    for c in row["children"].as_array().cloned().unwrap_or_default() {
        if let Some(n) = lookup(c.as_str().unwrap_or_default()).await? {
            names.push(Value::String(n));
        }
    }
    row["children"] = Value::Array(names);
    Ok(())
}

/// One snapshot as JSON, parent and children by name.
async fn snapshot_json(conn: &Connection, path: OwnedObjectPath) -> Result<Value, Failure> {
    let mut row = snapshot_row(conn, path).await?;
    resolve_names(conn, &mut row, &Default::default()).await?;
    Ok(row)
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

/// Follows a job to its end, drawing progress (see [`crate::progress`]); returns its result
/// object.
pub async fn follow_job(
    conn: &Connection,
    path: OwnedObjectPath,
    json_mode: bool,
) -> Result<OwnedObjectPath, Failure> {
    progress::follow(conn, path, progress::Mode::detect(json_mode)).await
}

/// The wire error called `name` (a job's `ErrorName`), carrying `msg`.
pub fn error_from_name(name: &str, msg: String) -> Error {
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

/// How `vmsnap list` shows the snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListView {
    /// Draw the tree.
    pub tree: bool,
    /// Only snapshots without a parent.
    pub roots: bool,
    /// Only snapshots without children.
    pub leaves: bool,
    /// Add a PARENT column.
    pub parent: bool,
}

/// `vmsnap list` with its view options.
pub async fn list_view(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
    view: ListView,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    // Two calls whatever the number of snapshots: the domain's list (its order) and every
    // object's properties at once.
    let order = d.list_snapshots().await?;
    let mut props = all_snapshot_props(conn).await?;
    let mut rows = Vec::new();
    for p in order {
        // Gone from the second answer: deleted while we listed (a delete job runs).
        if let Some(pr) = props.remove(&p) {
            rows.push(row_from_props(p.as_str(), pr)?);
        }
    }
    // Parents and children are named from the rows themselves: no call per relation.
    let known: std::collections::HashMap<String, String> = rows
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap_or_default().to_string(),
                r["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for r in &mut rows {
        resolve_names(conn, r, &known).await?;
    }
    if view.tree {
        let tree = output::snapshot_forest(&rows);
        output::emit(json_mode, &tree, || output::snapshot_tree_text(&tree));
        return Ok(());
    }
    rows.retain(|r| {
        (!view.roots || r["parent"].is_null())
            && (!view.leaves || r["children"].as_array().is_none_or(Vec::is_empty))
    });
    output::emit(json_mode, &Value::Array(rows.clone()), || {
        output::snapshot_table_with(&rows, view.parent)
    });
    Ok(())
}

/// Starts a revert or delete of `snapshot` as a job and prints the job's path at once
/// (`--no-wait`).
pub async fn start_job(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
    snapshot: &str,
    operation: &str,
    mut o: Opts<'_>,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    let p = d.find_snapshot(snapshot).await?;
    let s = SnapshotProxy::builder(conn).path(p).build().await?;
    o.insert("async", Variant::Bool(true));
    let job = match operation {
        "revert" => s.revert(o).await?,
        _ => s.delete(o).await?,
    };
    output::emit(json_mode, &json!({"job": job.to_string()}), || {
        job.to_string()
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

/// `vmsnap redefine`
pub async fn redefine(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
    xml: &str,
    current: bool,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    let mut o: Opts<'_> = Opts::new();
    if current {
        o.insert("current", Variant::Bool(true));
    }
    let p = d.redefine_snapshot(xml, o).await?;
    let v = snapshot_json(conn, p).await?;
    output::emit(json_mode, &v, || {
        format!(
            "Snapshot {} of {domain} redefined",
            v["name"].as_str().unwrap_or_default()
        )
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
