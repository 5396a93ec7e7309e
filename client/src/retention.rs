//! Retention commands: `prune`, `protect` / `unprotect`, and `schedule show|set|run`.
//!
//! `schedule run` is what `vmsnap-snapshot@DOMAIN.service` executes: it takes one snapshot of
//! the configured kind with origin `schedule`, named `PREFIX-YYYYMMDDTHHMMSSZ` (UTC), then, when
//! the domain has a stored retention policy, calls `Prune` with it. It exits 0 only when both
//! steps succeeded.

use std::collections::HashMap;

use serde_json::{Map, Value, json};
use vmsnap_dbus::names::retention as key;
use vmsnap_dbus::proxy::{DomainProxy, ManagerProxy, SnapshotProxy};
use zbus::{Connection, OwnedVariant, Variant};

use crate::cli::{PolicyArgs, PruneArgs, ScheduleArgs, ScheduleCommand};
use crate::output::{self, Failure};
use crate::snapshot::follow_job;
use crate::{Opts, domain_proxy};

/// How many `-N` suffixes `schedule run` tries when a name of the same second exists.
const MAX_NAME_SUFFIX: u32 = 20;

fn policy_opts(p: &PolicyArgs) -> Opts<'_> {
    let mut o = Opts::new();
    let counts = [
        p.keep_last,
        p.keep_hourly,
        p.keep_daily,
        p.keep_weekly,
        p.keep_monthly,
        p.keep_yearly,
    ];
    for (k, v) in key::KEEP_KEYS.into_iter().zip(counts) {
        if let Some(n) = v {
            o.insert(k, Variant::U32(n));
        }
    }
    if let Some(a) = &p.max_age {
        // The daemon parses durations, so every client reads them the same way.
        o.insert(key::MAX_AGE, Variant::from(a.as_str()));
    }
    o
}

fn names_text(names: &[String]) -> String {
    if names.is_empty() {
        "nothing".to_string()
    } else {
        names.join(", ")
    }
}

/// `vmsnap prune`
pub async fn prune(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    a: PruneArgs,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, &a.domain).await?;
    let mut o = Opts::new();
    if a.include_manual {
        o.insert(key::INCLUDE_MANUAL, Variant::Bool(true));
    }
    if a.dry_run {
        let rows = d.plan_prune(policy_opts(&a.policy), o).await?;
        let deleted: Vec<String> = rows
            .iter()
            .filter(|(_, verdict, _)| verdict == "delete")
            .map(|(name, _, _)| name.clone())
            .collect();
        let plan: Vec<Value> = rows
            .iter()
            .map(|(name, verdict, reasons)| {
                json!({"name": name, "verdict": verdict, "reasons": reasons})
            })
            .collect();
        output::emit(
            json_mode,
            &json!({"domain": a.domain, "dry_run": true, "deleted": deleted, "plan": plan}),
            || plan_table(&rows),
        );
        return Ok(());
    }
    let deleted = d.prune(policy_opts(&a.policy), o).await?;
    output::emit(
        json_mode,
        &json!({"domain": a.domain, "dry_run": false, "deleted": deleted}),
        || format!("Deleted: {}", names_text(&deleted)),
    );
    Ok(())
}

/// The human form of a dry run: one line per snapshot, oldest first, with its verdict and
/// reasons, then the names that would go.
fn plan_table(rows: &[(String, String, Vec<String>)]) -> String {
    let width = rows
        .iter()
        .map(|(n, _, _)| n.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!("{:width$}  {:7}  REASONS\n", "NAME", "VERDICT");
    for (name, verdict, reasons) in rows {
        out.push_str(&format!(
            "{name:width$}  {verdict:7}  {}\n",
            reasons.join(",")
        ));
    }
    let deleted: Vec<String> = rows
        .iter()
        .filter(|(_, v, _)| v == "delete")
        .map(|(n, _, _)| n.clone())
        .collect();
    out.push_str(&format!("Would delete: {}", names_text(&deleted)));
    out
}

/// `vmsnap protect` / `vmsnap unprotect`
pub async fn protect(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
    snapshot: &str,
    protected: bool,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    let p = d.find_snapshot(snapshot).await?;
    let s = SnapshotProxy::builder(conn).path(p).build().await?;
    s.set_protected(protected).await?;
    let word = if protected {
        "protected"
    } else {
        "unprotected"
    };
    output::emit(
        json_mode,
        &json!({"domain": domain, "snapshot": snapshot, "protected": protected}),
        || format!("Snapshot {snapshot} of {domain} {word}"),
    );
    Ok(())
}

/// The `Schedule` property as JSON: `kind`, `prefix`, `retention` (policy keys present).
fn schedule_json(domain: &str, raw: &HashMap<String, OwnedVariant>) -> Value {
    let text = |k: &str| {
        raw.get(k)
            .and_then(|v| <&str>::try_from(v).ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut retention = Map::new();
    for k in key::POLICY_KEYS {
        if let Some(v) = raw.get(k) {
            let n = u64::try_from(v)
                .ok()
                .or_else(|| u32::try_from(v).ok().map(u64::from));
            if let Some(n) = n {
                retention.insert(k.to_string(), json!(n));
            }
        }
    }
    let mut v = json!({
        "domain": domain,
        "kind": text(key::KIND),
        "prefix": text(key::PREFIX),
        "retention": retention,
    });
    if raw.contains_key("error") {
        v["error"] = json!(text("error"));
    }
    v
}

fn schedule_text(v: &Value) -> String {
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return format!(
            "Domain:    {}\nError:     {e}",
            v["domain"].as_str().unwrap_or_default()
        );
    }
    let rules: Vec<String> = v["retention"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    format!(
        "Domain:    {}\nKind:      {}\nPrefix:    {}\nRetention: {}",
        v["domain"].as_str().unwrap_or_default(),
        v["kind"].as_str().unwrap_or_default(),
        v["prefix"].as_str().unwrap_or_default(),
        if rules.is_empty() {
            "none (scheduled runs prune nothing)".to_string()
        } else {
            rules.join(", ")
        }
    )
}

/// `vmsnap schedule ...`
pub async fn schedule(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    a: ScheduleArgs,
) -> Result<(), Failure> {
    let cmd = match (a.command, a.domain) {
        (Some(c), _) => c,
        (None, Some(domain)) => ScheduleCommand::Show { domain },
        (None, None) => {
            return Err(Failure::local(
                "name a domain: vmsnap schedule show|set|run DOMAIN".into(),
            ));
        }
    };
    match cmd {
        ScheduleCommand::Show { domain } => {
            let d = domain_proxy(conn, manager, &domain).await?;
            let v = schedule_json(&domain, &d.schedule().await?);
            output::emit(json_mode, &v, || schedule_text(&v));
        }
        ScheduleCommand::Set {
            domain,
            kind,
            prefix,
            reset,
            policy,
        } => {
            let d = domain_proxy(conn, manager, &domain).await?;
            let mut settings = policy_opts(&policy);
            if let Some(k) = &kind {
                settings.insert(key::KIND, Variant::from(k.as_str()));
            }
            if let Some(p) = &prefix {
                settings.insert(key::PREFIX, Variant::from(p.as_str()));
            }
            let mut o = Opts::new();
            if reset {
                o.insert(key::RESET, Variant::Bool(true));
            }
            d.set_schedule(settings, o).await?;
            // Uncached read: the cached value may not have seen the change yet.
            let fresh = DomainProxy::builder(conn)
                .path(d.inner().path().clone())
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?;
            let v = schedule_json(&domain, &fresh.schedule().await?);
            output::emit(json_mode, &v, || schedule_text(&v));
        }
        ScheduleCommand::Run { domain } => run(conn, manager, json_mode, &domain).await?,
    }
    Ok(())
}

/// `vmsnap schedule run DOMAIN`
async fn run(
    conn: &Connection,
    manager: &ManagerProxy<'_>,
    json_mode: bool,
    domain: &str,
) -> Result<(), Failure> {
    let d = domain_proxy(conn, manager, domain).await?;
    let raw = d.schedule().await?;
    if let Some(e) = raw.get("error").and_then(|v| <&str>::try_from(v).ok()) {
        return Err(Failure::wire(vmsnap_dbus::Error::Failed(e.to_string())));
    }
    let settings = schedule_json(domain, &raw);
    let kind = settings["kind"].as_str().unwrap_or("disk-only").to_string();
    let prefix = settings["prefix"].as_str().unwrap_or("auto").to_string();
    let stamp = jiff::Timestamp::now()
        .strftime("%Y%m%dT%H%M%SZ")
        .to_string();
    let mut name = format!("{prefix}-{stamp}");
    for n in 2..=MAX_NAME_SUFFIX + 1 {
        if d.find_snapshot(&name).await.is_err() {
            break;
        }
        name = format!("{prefix}-{stamp}-{n}");
    }
    let mut o = Opts::new();
    o.insert("async", Variant::Bool(true));
    o.insert(key::ORIGIN, Variant::from(key::ORIGIN_SCHEDULE));
    if kind == "disk-only" {
        o.insert("disk-only", Variant::Bool(true));
    }
    let job = d
        .create_snapshot(&name, "taken by vmsnap schedule run", o)
        .await?;
    follow_job(conn, job, json_mode).await?;
    let has_policy = settings["retention"]
        .as_object()
        .is_some_and(|m| !m.is_empty());
    let pruned = if has_policy {
        d.prune(Opts::new(), Opts::new()).await.map_err(|e| {
            Failure::from(e).context(&format!(
                "snapshot {name} of {domain} was created, but pruning failed"
            ))
        })?
    } else {
        Vec::new()
    };
    output::emit(
        json_mode,
        &json!({"domain": domain, "created": name, "kind": kind, "pruned": pruned}),
        || {
            let mut out = format!("Snapshot {name} of {domain} created ({kind})");
            if has_policy {
                out.push_str(&format!("\nPruned: {}", names_text(&pruned)));
            } else {
                out.push_str("\nNo retention policy: nothing pruned");
            }
            out
        },
    );
    Ok(())
}
