//! Retention planning: which snapshots a policy keeps and which it deletes, and in what order.
//!
//! [`plan`] is pure: it sees a list of [`SnapshotFacts`], a [`Policy`], whether manual snapshots
//! are candidates, and the time `now`; it returns a [`Plan`] and does nothing. The daemon carries
//! the plan out with the ordinary delete (which merges data so the remaining snapshots keep
//! their content).
//!
//! Semantics (modelled on restic's `forget`, with max-age as an upper bound):
//! - **Candidates.** By default only snapshots whose origin is [`ORIGIN_SCHEDULE`] are
//!   candidates; with `include_manual` every snapshot is, whatever its origin. A snapshot that
//!   is not committed (being created, or broken) is never a candidate. Non-candidates are
//!   listed in [`Plan::ignored`] and never deleted.
//! - **Keep rules.** Each rule is applied on its own to the whole candidate list and a
//!   candidate is kept when any rule keeps it (its reasons accumulate). `keep-last N` keeps the
//!   N newest candidates. `keep-hourly/daily/weekly/monthly/yearly N` keep the newest candidate
//!   of each of the N most recent periods that contain candidates (periods without snapshots are
//!   skipped, so "daily 7" means the last seven days that have snapshots, counted back from the
//!   newest). Periods are calendar periods in **UTC** (hours, days, ISO weeks starting on
//!   Monday, months, years): a daemon's time zone can change, and UTC never repeats or skips an
//!   hour, so a plan never depends on where or when in the year it is made.
//! - **Protected and current.** A protected candidate and the domain's current snapshot are
//!   always kept (reasons [`Reason::Protected`], [`Reason::Current`]); they also count for the
//!   keep rules like any other candidate, as restic's tagged snapshots do.
//! - **max-age.** An upper bound applied after the keep rules: a candidate older than max-age
//!   (strictly more than max-age seconds before `now`) loses every keep-rule reason and is
//!   deleted unless it is protected or current. A policy with max-age and no keep rule keeps
//!   every younger candidate ([`Reason::WithinMaxAge`]). A policy with no rule at all keeps
//!   everything (the D-Bus layer refuses such a policy before planning).
//! - **Order.** "Newest" means the larger `(created_at, id)`: ids are never reused and grow, so
//!   two snapshots of the same second are still ordered. [`Plan::delete`] lists descendants
//!   before their ancestors (deepest first, then newest first), so each delete leaves a valid
//!   tree for the next.
//!
//! Invariants: the plan never deletes a protected snapshot, the current snapshot or a
//! non-candidate; `keep` and `delete` partition the candidates.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use jiff::Timestamp;
use jiff::tz::Offset;
use serde::{Deserialize, Serialize};

use crate::catalog::SnapshotId;

/// Origin of snapshots taken by a user (the default).
pub const ORIGIN_MANUAL: &str = "manual";
/// Origin of snapshots taken by a schedule (`vmsnap schedule run`).
pub const ORIGIN_SCHEDULE: &str = "schedule";

/// What the planner needs to know about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFacts {
    /// Catalog id.
    pub id: SnapshotId,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Who asked for it (`manual`, `schedule`, ...).
    pub origin: String,
    /// Whether the user protected it from pruning.
    pub protected: bool,
    /// Whether it is the domain's current snapshot.
    pub is_current: bool,
    /// Its parent, if any.
    pub parent: Option<SnapshotId>,
    /// Whether its record is committed (usable); others are left alone.
    pub committed: bool,
}

/// A retention policy. `None` means the rule is not part of the policy; counts and ages are at
/// least 1 (the D-Bus layer refuses 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Policy {
    /// Keep the N newest candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep the newest candidate of each of the N most recent hours that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest candidate of each of the N most recent days that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Keep the newest candidate of each of the N most recent ISO weeks that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest candidate of each of the N most recent months that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest candidate of each of the N most recent years that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Delete candidates older than this many seconds (unless protected or current).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
}

impl Policy {
    /// Whether any keep rule (not counting max-age) is set.
    pub fn has_keep_rule(&self) -> bool {
        self.keep_last.is_some() || Period::ALL.iter().any(|p| self.period(*p).is_some())
    }

    /// Whether no rule at all is set.
    pub fn is_empty(&self) -> bool {
        !self.has_keep_rule() && self.max_age.is_none()
    }

    /// The count of a period rule.
    pub fn period(&self, p: Period) -> Option<u32> {
        match p {
            Period::Hour => self.keep_hourly,
            Period::Day => self.keep_daily,
            Period::Week => self.keep_weekly,
            Period::Month => self.keep_monthly,
            Period::Year => self.keep_yearly,
        }
    }
}

/// A calendar period of a keep rule, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    /// A clock hour.
    Hour,
    /// A calendar day.
    Day,
    /// An ISO week (Monday to Sunday).
    Week,
    /// A calendar month.
    Month,
    /// A calendar year.
    Year,
}

impl Period {
    /// Every period, shortest first.
    pub const ALL: [Period; 5] = [
        Period::Hour,
        Period::Day,
        Period::Week,
        Period::Month,
        Period::Year,
    ];

    /// A number that names the period holding `t` and grows with time.
    pub fn key(self, t: i64) -> i64 {
        let clamped = t.clamp(Timestamp::MIN.as_second(), Timestamp::MAX.as_second());
        let ts = Timestamp::from_second(clamped).expect("clamped into jiff's range");
        let date = Offset::UTC.to_datetime(ts).date();
        match self {
            Period::Hour => clamped.div_euclid(3600),
            Period::Day => clamped.div_euclid(86_400),
            Period::Week => {
                let w = date.iso_week_date();
                i64::from(w.year()) * 100 + i64::from(w.week())
            }
            Period::Month => i64::from(date.year()) * 100 + i64::from(date.month()),
            Period::Year => i64::from(date.year()),
        }
    }

    fn reason(self) -> Reason {
        match self {
            Period::Hour => Reason::Hourly,
            Period::Day => Reason::Daily,
            Period::Week => Reason::Weekly,
            Period::Month => Reason::Monthly,
            Period::Year => Reason::Yearly,
        }
    }
}

/// Why a candidate is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// One of the `keep-last` newest.
    Last,
    /// Newest of its hour under `keep-hourly`.
    Hourly,
    /// Newest of its day under `keep-daily`.
    Daily,
    /// Newest of its week under `keep-weekly`.
    Weekly,
    /// Newest of its month under `keep-monthly`.
    Monthly,
    /// Newest of its year under `keep-yearly`.
    Yearly,
    /// The policy has no keep rule and the snapshot is not older than max-age.
    WithinMaxAge,
    /// Protected by the user.
    Protected,
    /// The domain's current snapshot.
    Current,
}

impl Reason {
    /// The word used on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Last => "last",
            Reason::Hourly => "hourly",
            Reason::Daily => "daily",
            Reason::Weekly => "weekly",
            Reason::Monthly => "monthly",
            Reason::Yearly => "yearly",
            Reason::WithinMaxAge => "within-max-age",
            Reason::Protected => "protected",
            Reason::Current => "current",
        }
    }

    fn is_rule(self) -> bool {
        !matches!(self, Reason::Protected | Reason::Current)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a policy does to a domain's snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Kept candidates with every reason that keeps them (sorted, never empty).
    pub keep: BTreeMap<SnapshotId, Vec<Reason>>,
    /// Candidates to delete, descendants before ancestors.
    pub delete: Vec<SnapshotId>,
    /// Snapshots that are not candidates (left alone).
    pub ignored: Vec<SnapshotId>,
}

/// Whether a snapshot is a pruning candidate.
pub fn is_candidate(s: &SnapshotFacts, include_manual: bool) -> bool {
    s.committed && (include_manual || s.origin == ORIGIN_SCHEDULE)
}

/// Plans what `policy` keeps and deletes among `snapshots` at time `now` (Unix seconds).
pub fn plan(snapshots: &[SnapshotFacts], policy: &Policy, include_manual: bool, now: i64) -> Plan {
    let mut out = Plan::default();
    // Newest first.
    let mut candidates: Vec<&SnapshotFacts> = Vec::new();
    for s in snapshots {
        if is_candidate(s, include_manual) {
            candidates.push(s);
        } else {
            out.ignored.push(s.id);
        }
    }
    candidates.sort_by_key(|s| std::cmp::Reverse((s.created_at, s.id)));

    let mut reasons: HashMap<SnapshotId, BTreeSet<Reason>> = HashMap::new();
    let mut add = |id: SnapshotId, r: Reason| {
        reasons.entry(id).or_default().insert(r);
    };
    if let Some(n) = policy.keep_last {
        for s in candidates.iter().take(n as usize) {
            add(s.id, Reason::Last);
        }
    }
    for period in Period::ALL {
        let Some(n) = policy.period(period) else {
            continue;
        };
        let mut taken = 0u32;
        let mut last_key = None;
        for s in &candidates {
            if taken >= n {
                break;
            }
            let key = period.key(s.created_at);
            // Keys never grow going back in time, so a new key is a new (older) period and the
            // first candidate met in it is its newest.
            if last_key != Some(key) {
                last_key = Some(key);
                taken += 1;
                add(s.id, period.reason());
            }
        }
    }
    let keep_all_young = !policy.has_keep_rule();
    for s in &candidates {
        if keep_all_young {
            add(s.id, Reason::WithinMaxAge);
        }
        if s.protected {
            add(s.id, Reason::Protected);
        }
        if s.is_current {
            add(s.id, Reason::Current);
        }
    }
    let too_old = |s: &SnapshotFacts| match policy.max_age {
        Some(age) => i128::from(now) - i128::from(s.created_at) > i128::from(age),
        None => false,
    };

    let mut doomed = Vec::new();
    for s in &candidates {
        let mut r = reasons.remove(&s.id).unwrap_or_default();
        if too_old(s) {
            r.retain(|x| !x.is_rule());
        }
        if r.is_empty() {
            doomed.push(*s);
        } else {
            out.keep.insert(s.id, r.into_iter().collect());
        }
    }
    let depth = depths(snapshots);
    doomed.sort_by_key(|s| {
        std::cmp::Reverse((depth.get(&s.id).copied().unwrap_or(0), s.created_at, s.id))
    });
    out.delete = doomed.into_iter().map(|s| s.id).collect();
    out
}

/// Each snapshot's distance from its root. A broken parent link (a parent not in the list, or
/// a cycle) ends the walk, so this terminates on any input.
fn depths(snapshots: &[SnapshotFacts]) -> HashMap<SnapshotId, usize> {
    let parent: HashMap<SnapshotId, Option<SnapshotId>> =
        snapshots.iter().map(|s| (s.id, s.parent)).collect();
    snapshots
        .iter()
        .map(|s| {
            let mut d = 0;
            let mut at = s.parent;
            while let Some(p) = at {
                if d >= snapshots.len() {
                    break;
                }
                d += 1;
                at = parent.get(&p).copied().flatten();
            }
            (s.id, d)
        })
        .collect()
}

/// Parses a duration such as `30d`, `12h`, `1w2d`, `90m`, `45s` or a bare number of seconds.
/// Units: `s`, `m` (minutes), `h`, `d`, `w`. The result is at least one second.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "duration {text:?} must be a number of seconds or groups like 30d, 12h, 1w2d \
             (units s, m, h, d, w)"
        )
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = t.parse::<u64>() {
        return (n > 0).then_some(n).ok_or_else(bad);
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;
    /// 2026-01-05T00:00:00Z, a Monday.
    const MONDAY: i64 = 1_767_571_200;

    fn snap(id: i64, t: i64) -> SnapshotFacts {
        SnapshotFacts {
            id: SnapshotId(id),
            created_at: t,
            origin: ORIGIN_SCHEDULE.into(),
            protected: false,
            is_current: false,
            parent: None,
            committed: true,
        }
    }

    fn ids(v: &[SnapshotId]) -> Vec<i64> {
        v.iter().map(|i| i.0).collect()
    }

    fn kept(p: &Plan) -> Vec<i64> {
        p.keep.keys().map(|i| i.0).collect()
    }

    #[test]
    fn retention_keep_last_keeps_newest_and_deletes_children_first() {
        // A chain 1 <- 2 <- 3 <- 4 <- 5, one an hour.
        let s: Vec<SnapshotFacts> = (1..=5)
            .map(|i| SnapshotFacts {
                parent: (i > 1).then_some(SnapshotId(i - 1)),
                ..snap(i, MONDAY + i * HOUR)
            })
            .collect();
        let policy = Policy {
            keep_last: Some(2),
            ..Policy::default()
        };
        let p = plan(&s, &policy, false, MONDAY + DAY);
        assert_eq!(kept(&p), vec![4, 5]);
        assert_eq!(ids(&p.delete), vec![3, 2, 1], "deepest first");
        assert_eq!(p.keep[&SnapshotId(5)], vec![Reason::Last]);
    }

    #[test]
    fn retention_daily_keeps_newest_of_each_day_with_snapshots() {
        // Two a day on days 0, 1 and 3 (day 2 has none).
        let mut s = Vec::new();
        for (i, day) in [0, 0, 1, 1, 3, 3].into_iter().enumerate() {
            let i = i as i64;
            s.push(snap(i + 1, MONDAY + day * DAY + (i % 2) * HOUR));
        }
        let policy = Policy {
            keep_daily: Some(2),
            ..Policy::default()
        };
        let p = plan(&s, &policy, false, MONDAY + 10 * DAY);
        // Days 3 and 1 are the two most recent days with snapshots; day 2 is skipped.
        assert_eq!(kept(&p), vec![4, 6]);
        assert_eq!(ids(&p.delete), vec![5, 3, 2, 1]);
    }

    #[test]
    fn retention_weekly_uses_iso_weeks_starting_monday() {
        // Sunday 23:00 and Monday 01:00 are in different ISO weeks.
        let s = vec![snap(1, MONDAY - HOUR), snap(2, MONDAY + HOUR)];
        let policy = Policy {
            keep_weekly: Some(2),
            ..Policy::default()
        };
        assert_eq!(kept(&plan(&s, &policy, false, MONDAY + DAY)), vec![1, 2]);
        let one = Policy {
            keep_weekly: Some(1),
            ..Policy::default()
        };
        assert_eq!(kept(&plan(&s, &one, false, MONDAY + DAY)), vec![2]);
    }

    #[test]
    fn retention_monthly_and_yearly_use_calendar_periods() {
        // 2025-12-31T23:00Z and 2026-01-01T01:00Z: different months and years.
        let new_year = 1_767_225_600;
        let s = vec![
            snap(1, new_year - 40 * DAY),
            snap(2, new_year - HOUR),
            snap(3, new_year + HOUR),
        ];
        let monthly = Policy {
            keep_monthly: Some(2),
            ..Policy::default()
        };
        assert_eq!(kept(&plan(&s, &monthly, false, new_year + DAY)), vec![2, 3]);
        let yearly = Policy {
            keep_yearly: Some(5),
            ..Policy::default()
        };
        assert_eq!(kept(&plan(&s, &yearly, false, new_year + DAY)), vec![2, 3]);
    }

    #[test]
    fn retention_protected_current_and_manual_are_never_deleted() {
        let mut s: Vec<SnapshotFacts> = (1..=5).map(|i| snap(i, MONDAY + i * HOUR)).collect();
        s[0].protected = true;
        s[1].is_current = true;
        s[2].origin = ORIGIN_MANUAL.into();
        s.push(SnapshotFacts {
            committed: false,
            ..snap(6, MONDAY)
        });
        let policy = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let p = plan(&s, &policy, false, MONDAY + DAY);
        assert_eq!(kept(&p), vec![1, 2, 5]);
        assert_eq!(ids(&p.delete), vec![4]);
        assert_eq!(ids(&p.ignored), vec![3, 6]);
        assert_eq!(p.keep[&SnapshotId(1)], vec![Reason::Protected]);
        assert_eq!(p.keep[&SnapshotId(2)], vec![Reason::Current]);
        // With manual snapshots included, 3 is a candidate and goes.
        let p = plan(&s, &policy, true, MONDAY + DAY);
        assert_eq!(ids(&p.delete), vec![4, 3]);
        assert_eq!(ids(&p.ignored), vec![6], "never a half-made snapshot");
    }

    #[test]
    fn retention_max_age_bounds_keep_rules_but_not_protection() {
        let mut s: Vec<SnapshotFacts> = (0..4).map(|i| snap(i + 1, MONDAY + i * DAY)).collect();
        s[0].protected = true;
        let now = MONDAY + 3 * DAY;
        let policy = Policy {
            keep_last: Some(10),
            max_age: Some((DAY + HOUR) as u64),
            ..Policy::default()
        };
        let p = plan(&s, &policy, false, now);
        // 3 and 4 are young enough; 2 is too old although keep-last 10 would keep it; 1 is
        // protected.
        assert_eq!(kept(&p), vec![1, 3, 4]);
        assert_eq!(ids(&p.delete), vec![2]);
        assert_eq!(p.keep[&SnapshotId(1)], vec![Reason::Protected]);
        // max-age alone keeps every young candidate.
        let only_age = Policy {
            max_age: Some((DAY + HOUR) as u64),
            ..Policy::default()
        };
        let p = plan(&s, &only_age, false, now);
        assert_eq!(kept(&p), vec![1, 3, 4]);
        assert_eq!(p.keep[&SnapshotId(4)], vec![Reason::WithinMaxAge]);
        // Exactly max-age old is not older than max-age.
        let exact = Policy {
            max_age: Some(DAY as u64),
            ..Policy::default()
        };
        assert_eq!(kept(&plan(&s, &exact, false, now)), vec![1, 3, 4]);
    }

    #[test]
    fn retention_empty_policy_keeps_everything() {
        let s: Vec<SnapshotFacts> = (1..=3).map(|i| snap(i, MONDAY + i)).collect();
        let p = plan(&s, &Policy::default(), false, MONDAY);
        assert_eq!(kept(&p), vec![1, 2, 3]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn retention_same_second_is_ordered_by_id() {
        let s = vec![snap(7, MONDAY), snap(3, MONDAY), snap(5, MONDAY)];
        let policy = Policy {
            keep_last: Some(1),
            keep_hourly: Some(1),
            ..Policy::default()
        };
        let p = plan(&s, &policy, false, MONDAY);
        assert_eq!(p.keep[&SnapshotId(7)], vec![Reason::Last, Reason::Hourly]);
        assert_eq!(ids(&p.delete), vec![5, 3]);
    }

    #[test]
    fn retention_policy_json_round_trips_in_kebab_case() {
        let p = Policy {
            keep_daily: Some(7),
            max_age: Some(3600),
            ..Policy::default()
        };
        let v = serde_json::to_value(p).unwrap();
        assert_eq!(v, serde_json::json!({"keep-daily": 7, "max-age": 3600}));
        assert_eq!(serde_json::from_value::<Policy>(v).unwrap(), p);
        assert!(serde_json::from_value::<Policy>(serde_json::json!({"keep-dayly": 1})).is_err());
    }

    #[test]
    fn retention_parse_duration_accepts_units_and_refuses_nonsense() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("1w2d"), Ok(9 * 86_400));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("45"), Ok(45));
        assert_eq!(parse_duration("12h30m"), Ok(12 * 3600 + 1800));
        for bad in [
            "",
            "0",
            "0d",
            "d",
            "5x",
            "3d4",
            "-1d",
            "99999999999999999999w",
            "1.5h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Properties

    /// A random domain tree: parents point to earlier snapshots; at most one is current.
    fn arb_snapshots() -> impl Strategy<Value = Vec<SnapshotFacts>> {
        prop::collection::vec(
            (
                // Mostly within three years, with clusters in the same hour/day.
                0i64..(3 * 366 * DAY),
                prop::sample::select(vec!["schedule", "schedule", "manual", "other"]),
                prop::bool::weighted(0.2),
                any::<prop::sample::Index>(),
                any::<bool>(),
                prop::bool::weighted(0.9),
            ),
            0..40,
        )
        .prop_flat_map(|rows| {
            let n = rows.len();
            (Just(rows), prop::option::of(0..n.max(1)))
        })
        .prop_map(|(rows, current)| {
            rows.into_iter()
                .enumerate()
                .map(
                    |(i, (offset, origin, protected, parent, rooted, committed))| {
                        // Coarse times make ties and shared periods common.
                        let t = MONDAY + (offset / 600) * 600;
                        SnapshotFacts {
                            id: SnapshotId(i as i64 + 1),
                            created_at: t,
                            origin: origin.to_string(),
                            protected,
                            is_current: current == Some(i),
                            parent: (i > 0 && !rooted)
                                .then(|| SnapshotId(parent.index(i) as i64 + 1)),
                            committed,
                        }
                    },
                )
                .collect()
        })
    }

    fn arb_count() -> impl Strategy<Value = Option<u32>> {
        prop::option::weighted(0.5, 1u32..8)
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (
            arb_count(),
            arb_count(),
            arb_count(),
            arb_count(),
            arb_count(),
            arb_count(),
            prop::option::weighted(0.3, 1u64..(400 * DAY as u64)),
        )
            .prop_map(|(l, h, d, w, m, y, age)| Policy {
                keep_last: l,
                keep_hourly: h,
                keep_daily: d,
                keep_weekly: w,
                keep_monthly: m,
                keep_yearly: y,
                max_age: age,
            })
    }

    fn newest_first(s: &[SnapshotFacts], include_manual: bool) -> Vec<&SnapshotFacts> {
        let mut c: Vec<&SnapshotFacts> = s
            .iter()
            .filter(|x| is_candidate(x, include_manual))
            .collect();
        c.sort_by_key(|b| std::cmp::Reverse((b.created_at, b.id)));
        c
    }

    fn with_reason(p: &Plan, r: Reason) -> BTreeSet<SnapshotId> {
        p.keep
            .iter()
            .filter(|(_, rs)| rs.contains(&r))
            .map(|(id, _)| *id)
            .collect()
    }

    proptest! {
        #[test]
        fn retention_never_deletes_protected_current_or_non_candidates(
            s in arb_snapshots(), policy in arb_policy(), manual in any::<bool>(), later in 0i64..(800 * DAY)
        ) {
            let now = MONDAY + later;
            let p = plan(&s, &policy, manual, now);
            let by_id: HashMap<SnapshotId, &SnapshotFacts> = s.iter().map(|x| (x.id, x)).collect();
            for id in &p.delete {
                let x = by_id[id];
                prop_assert!(!x.protected, "deleted protected {id}");
                prop_assert!(!x.is_current, "deleted current {id}");
                prop_assert!(x.committed, "deleted a record that is not committed {id}");
                prop_assert!(manual || x.origin == ORIGIN_SCHEDULE, "deleted non-candidate {id}");
            }
        }

        #[test]
        fn retention_plan_partitions_the_candidates(
            s in arb_snapshots(), policy in arb_policy(), manual in any::<bool>(), later in 0i64..(800 * DAY)
        ) {
            let p = plan(&s, &policy, manual, MONDAY + later);
            let cands: BTreeSet<SnapshotId> =
                newest_first(&s, manual).into_iter().map(|x| x.id).collect();
            let keep: BTreeSet<SnapshotId> = p.keep.keys().copied().collect();
            let delete: BTreeSet<SnapshotId> = p.delete.iter().copied().collect();
            prop_assert_eq!(delete.len(), p.delete.len(), "no id deleted twice");
            prop_assert!(keep.is_disjoint(&delete));
            prop_assert_eq!(keep.union(&delete).copied().collect::<BTreeSet<_>>(), cands);
            let ignored: BTreeSet<SnapshotId> = p.ignored.iter().copied().collect();
            let others: BTreeSet<SnapshotId> = s
                .iter()
                .filter(|x| !is_candidate(x, manual))
                .map(|x| x.id)
                .collect();
            prop_assert_eq!(ignored, others);
            prop_assert!(p.keep.values().all(|r| !r.is_empty()));
        }

        #[test]
        fn retention_keep_last_keeps_exactly_the_newest_candidates(
            s in arb_snapshots(), n in 1u32..10, manual in any::<bool>()
        ) {
            let policy = Policy { keep_last: Some(n), ..Policy::default() };
            let p = plan(&s, &policy, manual, MONDAY);
            let want: BTreeSet<SnapshotId> = newest_first(&s, manual)
                .into_iter()
                .take(n as usize)
                .map(|x| x.id)
                .collect();
            prop_assert_eq!(with_reason(&p, Reason::Last), want);
        }

        #[test]
        fn retention_period_rules_keep_newest_of_each_recent_period(
            s in arb_snapshots(), policy in arb_policy(), manual in any::<bool>()
        ) {
            let policy = Policy { max_age: None, ..policy };
            let p = plan(&s, &policy, manual, MONDAY);
            for period in Period::ALL {
                // Reference: the newest candidate per period, the N most recent periods.
                let mut newest: BTreeMap<i64, (i64, SnapshotId)> = BTreeMap::new();
                for x in newest_first(&s, manual) {
                    let e = newest.entry(period.key(x.created_at)).or_insert((x.created_at, x.id));
                    *e = (*e).max((x.created_at, x.id));
                }
                let want: BTreeSet<SnapshotId> = match policy.period(period) {
                    Some(n) => newest.values().rev().take(n as usize).map(|(_, id)| *id).collect(),
                    None => BTreeSet::new(),
                };
                prop_assert_eq!(with_reason(&p, period.reason()), want, "{:?}", period);
            }
            // Without max-age, a candidate is deleted exactly when nothing keeps it.
            if policy.has_keep_rule() {
                for x in newest_first(&s, manual) {
                    let rule_kept = p.keep.get(&x.id).is_some_and(|r| r.iter().any(|r| r.is_rule()));
                    let must_keep = rule_kept || x.protected || x.is_current;
                    prop_assert_eq!(p.delete.contains(&x.id), !must_keep);
                }
            }
        }

        #[test]
        fn retention_max_age_deletes_old_unprotected_candidates_only(
            s in arb_snapshots(), policy in arb_policy(), manual in any::<bool>(), later in 0i64..(800 * DAY)
        ) {
            let now = MONDAY + later;
            let p = plan(&s, &policy, manual, now);
            let Some(age) = policy.max_age else { return Ok(()); };
            let without_age = plan(&s, &Policy { max_age: None, ..policy }, manual, now);
            for x in newest_first(&s, manual) {
                let old = now - x.created_at > age as i64;
                let deleted = p.delete.contains(&x.id);
                if old {
                    prop_assert_eq!(deleted, !(x.protected || x.is_current));
                } else {
                    // Young candidates fare exactly as without max-age (or are all kept when
                    // max-age is the only rule).
                    let before = without_age.delete.contains(&x.id);
                    prop_assert_eq!(deleted, before && policy.has_keep_rule());
                }
            }
        }

        #[test]
        fn retention_delete_order_puts_descendants_before_ancestors(
            s in arb_snapshots(), policy in arb_policy(), manual in any::<bool>()
        ) {
            let p = plan(&s, &policy, manual, MONDAY + 800 * DAY);
            let parent: HashMap<SnapshotId, Option<SnapshotId>> =
                s.iter().map(|x| (x.id, x.parent)).collect();
            let pos: HashMap<SnapshotId, usize> =
                p.delete.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            for id in &p.delete {
                let mut at = parent[id];
                while let Some(a) = at {
                    if let Some(&ai) = pos.get(&a) {
                        prop_assert!(ai > pos[id], "ancestor {a} deleted before {id}");
                    }
                    at = parent[&a];
                }
            }
        }
    }
}
