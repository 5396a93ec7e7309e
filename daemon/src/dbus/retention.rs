//! The D-Bus side of retention: `Domain.Prune`, `Domain.Schedule` / `SetSchedule`, the
//! `Protected` and `Origin` snapshot properties and `CreateSnapshot`'s `origin` and `protected`
//! options. Argument reading and error wording only; the planner is
//! [`crate::snapshot::retention`], the deletes are the actor's.
//!
//! Wire format of a policy (the `policy` of `Prune`, and inside `Domain.Schedule`): `keep-last`,
//! `keep-hourly`, `keep-daily`, `keep-weekly`, `keep-monthly`, `keep-yearly` (unsigned
//! integers, any width, at least 1) and `max-age` (seconds as an unsigned integer, or a string
//! such as `30d`, `12h`, `1w2d`); an unknown key, a wrong type or a 0 is `InvalidArgument`.
//! `Domain.Schedule` always shows `max-age` as seconds (`t`).

use std::collections::HashMap;
use std::sync::Arc;

use vmsnap_dbus::Error;
use vmsnap_dbus::names::retention as key;
use vmsnap_dbus::names::snapshot_path;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{ObjectServer, OwnedVariant, Variant};

use super::job::{JobResult, run_job};
use super::options::Options;
use super::snapshot::sync_snapshots;
use super::wire_error;
use crate::catalog::{SnapshotId, SnapshotStatus};
use crate::domain::actor::{DomainHandle, DomainInfo};
use crate::error::ServiceError;
use crate::service::Service;
use crate::snapshot::retention::{self, Policy, SnapshotFacts};
use crate::snapshot::schedule::{self, ScheduleKind, ScheduleSettings};

/// The policy keys, for `Options::parse`.
const POLICY_KEYS: &[&str] = &key::POLICY_KEYS;

/// The longest accepted origin word.
const MAX_ORIGIN_LEN: usize = 32;

/// The same wire error with another message (for `ServiceError::Partial`).
pub(super) fn with_message(e: Error, msg: String) -> Error {
    match e {
        Error::ZBus(z) => Error::ZBus(z),
        Error::NoSuchDomain(_) => Error::NoSuchDomain(msg),
        Error::NoSuchSnapshot(_) => Error::NoSuchSnapshot(msg),
        Error::NoSuchJob(_) => Error::NoSuchJob(msg),
        Error::AlreadyExists(_) => Error::AlreadyExists(msg),
        Error::InvalidArgument(_) => Error::InvalidArgument(msg),
        Error::Unsupported(_) => Error::Unsupported(msg),
        Error::InvalidState(_) => Error::InvalidState(msg),
        Error::Busy(_) => Error::Busy(msg),
        Error::NotAuthorized(_) => Error::NotAuthorized(msg),
        Error::QemuError(_) => Error::QemuError(msg),
        Error::Cancelled(_) => Error::Cancelled(msg),
        Error::Timeout(_) => Error::Timeout(msg),
        Error::Failed(_) => Error::Failed(msg),
    }
}

fn invalid(m: String) -> Error {
    Error::InvalidArgument(m)
}

fn count(o: &Options, k: &str) -> Result<Option<u32>, Error> {
    match o.uint(k)? {
        None => Ok(None),
        Some(0) => Err(invalid(format!("policy key {k:?} must be at least 1"))),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| invalid(format!("policy key {k:?} is too large ({n})"))),
    }
}

fn max_age(o: &Options) -> Result<Option<u64>, Error> {
    match o.uint(key::MAX_AGE) {
        Ok(Some(0)) => Err(invalid(
            "policy key \"max-age\" must be at least 1 second".into(),
        )),
        Ok(v) => Ok(v),
        Err(_) => match o.string(key::MAX_AGE) {
            Ok(Some(s)) => retention::parse_duration(&s)
                .map(Some)
                .map_err(|e| invalid(format!("policy key \"max-age\": {e}"))),
            _ => Err(invalid(
                "policy key \"max-age\" must be seconds (an unsigned integer) or a duration \
                 string such as \"30d\""
                    .into(),
            )),
        },
    }
}

/// Reads the policy keys of an options dictionary (other keys are the caller's business).
fn policy_from(o: &Options) -> Result<Policy, Error> {
    Ok(Policy {
        keep_last: count(o, key::KEEP_LAST)?,
        keep_hourly: count(o, key::KEEP_HOURLY)?,
        keep_daily: count(o, key::KEEP_DAILY)?,
        keep_weekly: count(o, key::KEEP_WEEKLY)?,
        keep_monthly: count(o, key::KEEP_MONTHLY)?,
        keep_yearly: count(o, key::KEEP_YEARLY)?,
        max_age: max_age(o)?,
    })
}

/// The `a{sv}` form of a policy.
fn policy_dict(p: &Policy, out: &mut HashMap<String, OwnedVariant>) {
    let mut put = |k: &str, v: Variant<'static>| {
        if let Ok(v) = v.try_into_owned() {
            out.insert(k.to_string(), v);
        }
    };
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
            put(k, Variant::U32(n));
        }
    }
    if let Some(a) = p.max_age {
        put(key::MAX_AGE, Variant::U64(a));
    }
}

/// A domain's stored schedule settings.
pub(super) fn stored_schedule(
    service: &Service,
    handle: &DomainHandle,
) -> Result<ScheduleSettings, Error> {
    let settings = service
        .catalog()
        .lock()
        .expect("catalog lock poisoned")
        .domain(handle.id())
        .map_err(|e| wire_error(e.into()))?
        .settings;
    schedule::from_settings(&settings).map_err(|e| {
        Error::Failed(format!(
            "domain {:?}: {e}; set the schedule again to replace it",
            handle.name()
        ))
    })
}

/// The `Domain.Schedule` property value.
pub(super) fn schedule_dict(s: &ScheduleSettings) -> HashMap<String, OwnedVariant> {
    let mut out = HashMap::new();
    for (k, v) in [
        (key::KIND, s.kind.as_str()),
        (key::PREFIX, s.prefix.as_str()),
    ] {
        if let Ok(v) = Variant::from(v.to_string()).try_into_owned() {
            out.insert(k.to_string(), v);
        }
    }
    policy_dict(&s.retention, &mut out);
    out
}

/// The `Domain.Schedule` property: never an error, so that `GetAll` and `GetManagedObjects`
/// keep working when one domain's stored settings are unreadable.
pub(super) fn schedule_property(
    service: &Service,
    handle: &DomainHandle,
) -> HashMap<String, OwnedVariant> {
    match stored_schedule(service, handle) {
        Ok(s) => schedule_dict(&s),
        Err(e) => {
            tracing::warn!(domain = %handle.name(), error = %e.message(), "unreadable schedule settings");
            let mut d = schedule_dict(&ScheduleSettings::default());
            if let Ok(v) = Variant::from(e.message()).try_into_owned() {
                d.insert(SCHEDULE_ERROR.to_string(), v);
            }
            d
        }
    }
}

/// The key of `Domain.Schedule` that carries why the stored settings cannot be read.
const SCHEDULE_ERROR: &str = "error";

/// `Domain.SetSchedule`: merges `settings` into the stored settings (or into the defaults with
/// option `reset`) and stores them. Everything is checked before anything is written.
pub(super) fn set_schedule(
    service: &Service,
    handle: &DomainHandle,
    settings: HashMap<String, OwnedVariant>,
    options: HashMap<String, OwnedVariant>,
) -> Result<(), Error> {
    let opts = Options::parse("SetSchedule", options, &[key::RESET])?;
    let reset = opts.bool(key::RESET)?.unwrap_or(false);
    let mut known = vec![key::KIND, key::PREFIX];
    known.extend_from_slice(POLICY_KEYS);
    let given = Options::parse("SetSchedule (settings)", settings, &known)?;
    let kind = given
        .string(key::KIND)?
        .map(|k| ScheduleKind::parse(&k).map_err(invalid))
        .transpose()?;
    let prefix = given.string(key::PREFIX)?;
    if let Some(p) = &prefix {
        schedule::validate_prefix(p).map_err(invalid)?;
    }
    let policy = policy_from(&given)?;

    let catalog = service.catalog();
    let mut cat = catalog.lock().expect("catalog lock poisoned");
    let record = cat.domain(handle.id()).map_err(|e| wire_error(e.into()))?;
    let mut s = if reset {
        ScheduleSettings::default()
    } else {
        // An unreadable stored value is only replaced when the caller says reset.
        schedule::from_settings(&record.settings).map_err(|e| {
            invalid(format!(
                "domain {:?}: {e}; use option reset to replace it",
                handle.name()
            ))
        })?
    };
    if let Some(k) = kind {
        s.kind = k;
    }
    if let Some(p) = prefix {
        s.prefix = p;
    }
    let r = &mut s.retention;
    let merge = |slot: &mut Option<u32>, v: Option<u32>| {
        if v.is_some() {
            *slot = v;
        }
    };
    merge(&mut r.keep_last, policy.keep_last);
    merge(&mut r.keep_hourly, policy.keep_hourly);
    merge(&mut r.keep_daily, policy.keep_daily);
    merge(&mut r.keep_weekly, policy.keep_weekly);
    merge(&mut r.keep_monthly, policy.keep_monthly);
    merge(&mut r.keep_yearly, policy.keep_yearly);
    if policy.max_age.is_some() {
        r.max_age = policy.max_age;
    }
    let new = schedule::into_settings(&record.settings, &s);
    cat.set_domain_settings(handle.id(), &new)
        .map_err(|e| wire_error(e.into()))?;
    tracing::info!(domain = %handle.name(), settings = %new, "schedule settings changed");
    Ok(())
}

/// Reads and checks `CreateSnapshot`'s `origin` and `protected` options.
pub(super) fn create_extras(opts: &Options) -> Result<(String, bool), Error> {
    let origin = opts
        .string(key::ORIGIN)?
        .unwrap_or_else(|| key::ORIGIN_MANUAL.to_string());
    let ok = !origin.is_empty()
        && origin.len() <= MAX_ORIGIN_LEN
        && origin
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(invalid(format!(
            "option \"origin\" must be 1 to {MAX_ORIGIN_LEN} characters of a-z 0-9 -, not \
             {origin:?}"
        )));
    }
    Ok((origin, opts.bool(key::PROTECTED)?.unwrap_or(false)))
}

/// The planner's view of a domain.
fn facts(info: &DomainInfo) -> Vec<SnapshotFacts> {
    info.snapshots
        .values()
        .map(|r| SnapshotFacts {
            id: r.id,
            created_at: r.created_at,
            origin: r.origin.clone(),
            protected: r.protected,
            is_current: info.current_snapshot == Some(r.id),
            parent: r.parent,
            committed: r.status == SnapshotStatus::Committed,
        })
        .collect()
}

/// The policy a prune uses: the given one, or the stored one when none is given.
fn resolve_policy(
    service: &Arc<Service>,
    handle: &DomainHandle,
    policy: HashMap<String, OwnedVariant>,
) -> Result<Policy, Error> {
    let mut policy = policy_from(&Options::parse("Prune (policy)", policy, POLICY_KEYS)?)?;
    if policy.is_empty() {
        policy = stored_schedule(service, handle)?.retention;
        if policy.is_empty() {
            return Err(invalid(format!(
                "domain {:?} has no stored retention policy and none was given",
                handle.name()
            )));
        }
    }
    Ok(policy)
}

/// What a prune job produced: the names it deleted.
struct Pruned(Vec<String>);

impl JobResult for Pruned {
    fn object(&self) -> Option<String> {
        None
    }
}

/// `Domain.Prune`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn prune(
    service: &Arc<Service>,
    handle: &DomainHandle,
    policy: HashMap<String, OwnedVariant>,
    options: HashMap<String, OwnedVariant>,
    header: &Header<'_>,
    server: &ObjectServer,
    emitter: SignalEmitter<'_>,
) -> Result<Vec<String>, Error> {
    super::auth::authorize(header, super::auth::Action::Prune).await?;
    let opts = Options::parse("Prune", options, &[key::DRY_RUN, key::INCLUDE_MANUAL])?;
    let dry_run = opts.bool(key::DRY_RUN)?.unwrap_or(false);
    let include_manual = opts.bool(key::INCLUDE_MANUAL)?.unwrap_or(false);
    let policy = resolve_policy(service, handle, policy)?;
    let now = jiff::Timestamp::now().as_second();
    if dry_run {
        let info = handle.info();
        let plan = retention::plan(&facts(&info), &policy, include_manual, now);
        return Ok(names(&info, &plan.delete));
    }
    let guard = handle.begin_operation("the prune").map_err(wire_error)?;
    let job = service.jobs.create(
        "prune",
        handle.id().0,
        &header.sender().map(|s| s.to_string()).unwrap_or_default(),
    );
    super::auth::record_owner(&job, header).await;
    let j = job.clone();
    let handle = handle.clone();
    let server2 = server.clone();
    let service2 = service.clone();
    let emitter = emitter.into_owned();
    let (_path, rx) = run_job(server, service, job, async move {
        let _guard = guard;
        // Planned under the operation slot: no create, revert or delete runs meanwhile.
        let info = handle.info();
        let plan = retention::plan(&facts(&info), &policy, include_manual, now);
        tracing::info!(
            domain = %info.def.name,
            keep = plan.keep.len(),
            delete = plan.delete.len(),
            "prune planned"
        );
        let mut deleted = Vec::new();
        for id in plan.delete {
            let before = handle.info();
            let name = names(&before, &[id]).pop().unwrap_or_default();
            match handle.prune_delete(id, j.clone()).await {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) if deleted.is_empty() => return Err(e),
                Err(e) => {
                    return Err(ServiceError::Partial {
                        done: format!(
                            "prune of domain {:?} deleted {} before it stopped",
                            before.def.name,
                            deleted.join(", ")
                        ),
                        source: Box::new(e),
                    });
                }
            }
            deleted.push(name);
            let now_info = handle.info();
            sync_snapshots(&server2, &service2, &handle, Some(&before), &now_info).await;
            let p = snapshot_path(handle.id().0, id.0);
            if let Ok(p) = zbus::ObjectPath::try_from(p.as_str()) {
                let _ = super::domain::DomainIface::snapshot_deleted(&emitter, p).await;
            }
        }
        Ok(Pruned(deleted))
    })
    .await?;
    let Pruned(deleted) = rx
        .await
        .map_err(|_| Error::Failed("the prune job ended without a result".into()))??;
    Ok(deleted)
}

/// One row of `Domain.PlanPrune`: name, verdict, reasons.
pub(super) type PlanRow = (String, String, Vec<String>);

/// `Domain.PlanPrune`: what `Prune` with the same policy would do to every snapshot, and why.
pub(super) fn plan_prune(
    service: &Arc<Service>,
    handle: &DomainHandle,
    policy: HashMap<String, OwnedVariant>,
    options: HashMap<String, OwnedVariant>,
) -> Result<Vec<PlanRow>, Error> {
    let opts = Options::parse("PlanPrune", options, &[key::INCLUDE_MANUAL])?;
    let include_manual = opts.bool(key::INCLUDE_MANUAL)?.unwrap_or(false);
    let policy = resolve_policy(service, handle, policy)?;
    let info = handle.info();
    let facts = facts(&info);
    let plan = retention::plan(
        &facts,
        &policy,
        include_manual,
        jiff::Timestamp::now().as_second(),
    );
    Ok(plan_rows(&info, &facts, &plan, include_manual))
}

/// The rows of a plan, oldest snapshot first.
fn plan_rows(
    info: &DomainInfo,
    facts: &[SnapshotFacts],
    plan: &retention::Plan,
    include_manual: bool,
) -> Vec<PlanRow> {
    let mut sorted: Vec<&SnapshotFacts> = facts.iter().collect();
    sorted.sort_by_key(|f| (f.created_at, f.id));
    sorted
        .into_iter()
        .filter_map(|f| {
            let name = info.snapshots.get(&f.id)?.name.clone();
            let (verdict, reasons) = if plan.delete.contains(&f.id) {
                ("delete", Vec::new())
            } else if let Some(r) = plan.keep.get(&f.id) {
                ("keep", r.iter().map(|r| r.as_str().to_string()).collect())
            } else if !f.committed {
                ("ignore", vec!["uncommitted".to_string()])
            } else if !retention::is_candidate(f, include_manual) {
                ("ignore", vec!["manual".to_string()])
            } else {
                ("ignore", Vec::new())
            };
            Some((name, verdict.to_string(), reasons))
        })
        .collect()
}

fn names(info: &DomainInfo, ids: &[SnapshotId]) -> Vec<String> {
    ids.iter()
        .filter_map(|id| info.snapshots.get(id).map(|r| r.name.clone()))
        .collect()
}

/// Sets a snapshot's `Protected` property.
pub(super) async fn set_protected(
    handle: &DomainHandle,
    id: SnapshotId,
    protected: bool,
) -> Result<(), Error> {
    handle
        .set_protected(id, protected)
        .await
        .map_err(wire_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(method: &'static str, pairs: Vec<(&str, Variant<'static>)>) -> Options {
        let map = pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.try_into_owned().unwrap()))
            .collect();
        Options::parse(
            method,
            map,
            &[POLICY_KEYS, &[key::ORIGIN, key::PROTECTED]].concat(),
        )
        .unwrap()
    }

    #[test]
    fn retention_policy_reads_counts_and_durations() {
        let o = opts(
            "Prune",
            vec![
                ("keep-last", Variant::U32(3)),
                ("keep-daily", Variant::U64(7)),
                ("max-age", Variant::from("1w")),
            ],
        );
        let p = policy_from(&o).unwrap();
        assert_eq!(p.keep_last, Some(3));
        assert_eq!(p.keep_daily, Some(7));
        assert_eq!(p.max_age, Some(7 * 86_400));
        let o = opts("Prune", vec![("max-age", Variant::U64(90))]);
        assert_eq!(policy_from(&o).unwrap().max_age, Some(90));
        let mut d = HashMap::new();
        policy_dict(&p, &mut d);
        assert_eq!(u32::try_from(&d["keep-last"]).unwrap(), 3);
        assert_eq!(u64::try_from(&d["max-age"]).unwrap(), 7 * 86_400);
        assert!(!d.contains_key("keep-hourly"));
    }

    #[test]
    fn retention_policy_refuses_zero_huge_and_mistyped_values() {
        for (k, v) in [
            ("keep-last", Variant::U32(0)),
            ("keep-hourly", Variant::U64(u64::from(u32::MAX) + 1)),
            ("keep-weekly", Variant::from("3")),
            ("max-age", Variant::U64(0)),
            ("max-age", Variant::from("soon")),
            ("max-age", Variant::Bool(true)),
        ] {
            let o = opts("Prune", vec![(k, v.clone())]);
            assert!(
                matches!(policy_from(&o), Err(Error::InvalidArgument(m)) if m.contains(k)),
                "{k}={v:?}"
            );
        }
    }

    #[test]
    fn retention_create_origin_defaults_to_manual_and_is_checked() {
        let o = opts("CreateSnapshot", vec![]);
        assert_eq!(create_extras(&o).unwrap(), ("manual".to_string(), false));
        let o = opts(
            "CreateSnapshot",
            vec![
                ("origin", Variant::from("schedule")),
                ("protected", Variant::Bool(true)),
            ],
        );
        assert_eq!(create_extras(&o).unwrap(), ("schedule".to_string(), true));
        for bad in ["", "Schedule", "a b", &"x".repeat(MAX_ORIGIN_LEN + 1)] {
            let o = opts(
                "CreateSnapshot",
                vec![("origin", Variant::from(bad.to_string()))],
            );
            assert!(create_extras(&o).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retention_partial_error_keeps_its_kind() {
        let e = with_message(Error::Busy("x".into()), "deleted a; then: x".into());
        assert_eq!(e, Error::Busy("deleted a; then: x".into()));
        let w = wire_error(ServiceError::Partial {
            done: "prune deleted a before it stopped".into(),
            source: Box::new(ServiceError::Unsupported("cannot merge b".into())),
        });
        assert_eq!(
            w,
            Error::Unsupported("prune deleted a before it stopped; then: cannot merge b".into())
        );
    }
}
