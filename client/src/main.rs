//! `vmsnap`: the command-line client of vmsnapd.
//!
//! Every command is one or a few D-Bus calls; output is a human table or, with `--json`, one
//! JSON document. Errors are one line on stderr (a JSON object with `--json`) and an exit code
//! scripts can rely on (see `EXIT CODES` in `--help`).

mod cli;
mod output;
mod retention;
mod snapshot;

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;
use serde_json::{Value, json};
use vmsnap_dbus::Error;
use vmsnap_dbus::proxy::{DomainProxy, ManagerProxy};
use zbus::{Connection, Variant};

use cli::{Cli, Command, DomainCommand};
use output::Failure;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmsnap: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let json_mode = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(json_mode),
    }
}

async fn connect(cli: &Cli) -> Result<Connection, Failure> {
    let builder = match (&cli.address, cli.session) {
        (Some(a), _) => zbus::connection::Builder::address(a.as_str()),
        (None, true) => zbus::connection::Builder::session(),
        (None, false) => zbus::connection::Builder::system(),
    };
    builder.build().await.map_err(|e| Failure::connect(&e))
}

/// An options dictionary for a method call.
pub type Opts<'a> = HashMap<&'a str, Variant<'a>>;

/// Boolean options that are set.
fn flags<'a>(pairs: &[(bool, &'a str)]) -> Opts<'a> {
    pairs
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, k)| (*k, Variant::Bool(true)))
        .collect()
}

/// The proxy of the domain called `name`.
pub async fn domain_proxy<'a>(
    conn: &'a Connection,
    manager: &ManagerProxy<'a>,
    name: &str,
) -> Result<DomainProxy<'a>, Failure> {
    let path = manager.find_domain(name).await?;
    Ok(DomainProxy::builder(conn).path(path).build().await?)
}

async fn domain_json(d: &DomainProxy<'_>) -> Result<Value, Failure> {
    let disks: Vec<Value> = d
        .disks()
        .await?
        .into_iter()
        .map(|(target, format, file, flags)| {
            json!({"target": target, "format": format, "file": file, "flags": flags})
        })
        .collect();
    let current = d.current_snapshot().await?;
    let current_name = if current.as_str() == "/" {
        Value::Null
    } else {
        let s = vmsnap_dbus::proxy::SnapshotProxy::builder(d.inner().connection())
            .path(current.clone())
            .build()
            .await?;
        Value::String(s.name().await?)
    };
    Ok(json!({
        "name": d.name().await?,
        "uuid": d.uuid().await?,
        "state": d.state().await?,
        "kind": d.kind().await?,
        "current_snapshot": current_name,
        "path": d.inner().path().to_string(),
        "disks": disks,
    }))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let conn = connect(&cli).await?;
    let manager = ManagerProxy::new(&conn).await?;
    let json_mode = cli.json;
    match cli.command {
        Command::Version => {
            let v = manager.version().await?;
            output::emit(
                json_mode,
                &json!({"client": env!("CARGO_PKG_VERSION"), "daemon": v}),
                || format!("vmsnap {}\nvmsnapd {v}", env!("CARGO_PKG_VERSION")),
            );
        }
        Command::Domain(cmd) => domain(&conn, &manager, json_mode, cmd).await?,
        Command::Create(args) => snapshot::create(&conn, &manager, json_mode, args).await?,
        Command::List { domain } => snapshot::list(&conn, &manager, json_mode, &domain).await?,
        Command::Info { domain, snapshot } => {
            snapshot::info(&conn, &manager, json_mode, &domain, &snapshot).await?
        }
        Command::Revert {
            domain,
            snapshot,
            running,
            paused,
            delete_children,
            force,
        } => {
            let o = flags(&[
                (running, "running"),
                (paused, "paused"),
                (delete_children, "delete-children"),
                (force, "force"),
            ]);
            snapshot::revert(&conn, &manager, json_mode, &domain, &snapshot, o).await?
        }
        Command::Delete {
            domain,
            snapshot,
            metadata_only,
            children,
            children_only,
        } => {
            let o = flags(&[
                (metadata_only, "metadata-only"),
                (children, "children"),
                (children_only, "children-only"),
            ]);
            snapshot::delete(&conn, &manager, json_mode, &domain, &snapshot, o).await?
        }
        Command::Dumpxml { domain, snapshot } => {
            snapshot::dumpxml(&conn, &manager, json_mode, &domain, &snapshot).await?
        }
        Command::Prune(a) => retention::prune(&conn, &manager, json_mode, a).await?,
        Command::Protect { domain, snapshot } => {
            retention::protect(&conn, &manager, json_mode, &domain, &snapshot, true).await?
        }
        Command::Unprotect { domain, snapshot } => {
            retention::protect(&conn, &manager, json_mode, &domain, &snapshot, false).await?
        }
        Command::Schedule(a) => retention::schedule(&conn, &manager, json_mode, a).await?,
    }
    Ok(())
}

async fn domain(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    cmd: DomainCommand,
) -> Result<(), Failure> {
    match cmd {
        DomainCommand::Define { file } => {
            let xml = std::fs::read_to_string(&file)
                .map_err(|e| Failure::local(format!("cannot read {}: {e}", file.display())))?;
            let path = manager.define_domain(&xml, Opts::new()).await?;
            let d = DomainProxy::builder(conn).path(path).build().await?;
            let name = d.name().await?;
            output::emit(json_mode, &domain_json(&d).await?, || {
                format!("Domain {name} defined")
            });
        }
        DomainCommand::Undefine {
            name,
            snapshots_metadata,
        } => {
            let mut o = Opts::new();
            if snapshots_metadata {
                o.insert("snapshots-metadata", Variant::Bool(true));
            }
            manager.undefine_domain(&name, o).await?;
            output::emit(json_mode, &json!({"name": name, "undefined": true}), || {
                format!("Domain {name} undefined")
            });
        }
        DomainCommand::Attach { name, qmp } => {
            let path = manager
                .attach_domain(&name, &qmp.to_string_lossy(), Opts::new())
                .await?;
            let d = DomainProxy::builder(conn).path(path).build().await?;
            output::emit(json_mode, &domain_json(&d).await?, || {
                format!("Domain {name} attached")
            });
        }
        DomainCommand::Start { name, paused } => {
            let d = domain_proxy(conn, manager, &name).await?;
            let mut o = Opts::new();
            if paused {
                o.insert("paused", Variant::Bool(true));
            }
            d.start(o).await?;
            let state = d.state().await?;
            output::emit(json_mode, &json!({"name": name, "state": state}), || {
                format!("Domain {name} started ({state})")
            });
        }
        DomainCommand::Shutdown {
            name,
            timeout,
            force,
            no_wait,
        } => {
            let d = domain_proxy(conn, manager, &name).await?;
            let mut o = Opts::new();
            if let Some(t) = timeout {
                o.insert("timeout", Variant::U32(t));
            }
            if force {
                o.insert("force", Variant::Bool(true));
            }
            if no_wait {
                o.insert("async", Variant::Bool(true));
            }
            let job = d.shutdown(o).await?;
            if no_wait {
                output::emit(
                    json_mode,
                    &json!({"name": name, "job": job.to_string()}),
                    || job.to_string(),
                );
            } else {
                let state = d.state().await?;
                output::emit(json_mode, &json!({"name": name, "state": state}), || {
                    format!("Domain {name} is {state}")
                });
            }
        }
        DomainCommand::Destroy { name } => {
            let d = domain_proxy(conn, manager, &name).await?;
            d.destroy(Opts::new()).await?;
            output::emit(
                json_mode,
                &json!({"name": name, "state": d.state().await?}),
                || format!("Domain {name} destroyed"),
            );
        }
        DomainCommand::Pause { name } => {
            let d = domain_proxy(conn, manager, &name).await?;
            d.pause(Opts::new()).await?;
            output::emit(
                json_mode,
                &json!({"name": name, "state": d.state().await?}),
                || format!("Domain {name} paused"),
            );
        }
        DomainCommand::Resume { name } => {
            let d = domain_proxy(conn, manager, &name).await?;
            d.resume(Opts::new()).await?;
            output::emit(
                json_mode,
                &json!({"name": name, "state": d.state().await?}),
                || format!("Domain {name} resumed"),
            );
        }
        DomainCommand::List => {
            let mut rows = Vec::new();
            for path in manager.list_domains().await? {
                let d = DomainProxy::builder(conn).path(path).build().await?;
                rows.push(domain_json(&d).await?);
            }
            output::emit(json_mode, &Value::Array(rows.clone()), || {
                output::domain_table(&rows)
            });
        }
        DomainCommand::Monitor { name, command, hmp } => {
            let d = domain_proxy(conn, manager, &name).await?;
            let mut o = Opts::new();
            if hmp {
                o.insert("hmp", Variant::Bool(true));
            }
            let out = d.monitor_command(&command, o).await?;
            let v = if hmp {
                json!({"output": out})
            } else {
                serde_json::from_str(&out).unwrap_or(json!(out))
            };
            output::emit(json_mode, &v, || out.trim_end().to_string());
        }
        DomainCommand::Info { name } => {
            let d = domain_proxy(conn, manager, &name).await?;
            let info = domain_json(&d).await?;
            output::emit(json_mode, &info, || output::domain_info(&info));
        }
        DomainCommand::Dumpxml { name } => {
            let d = domain_proxy(conn, manager, &name).await?;
            let xml = d.get_xml(Opts::new()).await?;
            output::emit(json_mode, &json!({"name": name, "xml": xml}), || {
                xml.trim_end().to_string()
            });
        }
        DomainCommand::AttachDisk {
            name,
            file,
            config_only,
        } => {
            let xml = std::fs::read_to_string(&file)
                .map_err(|e| Failure::local(format!("cannot read {}: {e}", file.display())))?;
            let d = domain_proxy(conn, manager, &name).await?;
            let mut o = Opts::new();
            if config_only {
                o.insert("config-only", Variant::Bool(true));
            }
            d.attach_disk(&xml, o).await?;
            output::emit(json_mode, &domain_json(&d).await?, || {
                format!("Disk attached to {name}")
            });
        }
        DomainCommand::DetachDisk {
            name,
            target,
            config_only,
        } => {
            let d = domain_proxy(conn, manager, &name).await?;
            let mut o = Opts::new();
            if config_only {
                o.insert("config-only", Variant::Bool(true));
            }
            d.detach_disk(&target, o).await?;
            output::emit(json_mode, &domain_json(&d).await?, || {
                format!("Disk {target} detached from {name}")
            });
        }
    }
    Ok(())
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::wire(e)
    }
}

impl From<zbus::Error> for Failure {
    fn from(e: zbus::Error) -> Self {
        Failure::wire(Error::from(e))
    }
}
