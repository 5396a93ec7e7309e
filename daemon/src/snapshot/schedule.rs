//! Per-domain settings of scheduled snapshots, kept under the key `schedule` of the domain's
//! `settings` JSON object in the catalog:
//!
//! ```json
//! {"schedule": {"kind": "disk-only", "prefix": "auto",
//!               "retention": {"keep-hourly": 24, "keep-daily": 7, "max-age": 2592000}}}
//! ```
//!
//! Pure data and validation; other top-level keys of `settings` belong to others and are kept
//! as they are. A stored value this build cannot read is reported, never silently replaced.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::retention::Policy;

/// The key of the schedule settings inside a domain's settings object.
pub const SETTINGS_KEY: &str = "schedule";
/// The default name prefix of scheduled snapshots.
pub const DEFAULT_PREFIX: &str = "auto";
/// The longest accepted name prefix, in characters.
pub const MAX_PREFIX_LEN: usize = 64;

/// What a scheduled run takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// A disk-only snapshot with the default per-disk mode: external overlays on every disk.
    #[default]
    DiskOnly,
    /// A checkpoint with the default modes: internal snapshots of the disks plus, while the
    /// guest runs, its VM state.
    Checkpoint,
}

impl ScheduleKind {
    /// `disk-only` or `checkpoint`.
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::DiskOnly => "disk-only",
            ScheduleKind::Checkpoint => "checkpoint",
        }
    }

    /// Parses `disk-only` or `checkpoint`.
    pub fn parse(s: &str) -> Result<ScheduleKind, String> {
        match s {
            "disk-only" => Ok(ScheduleKind::DiskOnly),
            "checkpoint" => Ok(ScheduleKind::Checkpoint),
            _ => Err(format!(
                "schedule kind must be disk-only or checkpoint, not {s:?}"
            )),
        }
    }
}

/// A domain's schedule settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScheduleSettings {
    /// What a scheduled run takes.
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Scheduled snapshots are named `PREFIX-YYYYMMDDTHHMMSSZ`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The retention policy a scheduled run (and `Prune` with an empty policy) applies.
    #[serde(default)]
    pub retention: Policy,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_string()
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        ScheduleSettings {
            kind: ScheduleKind::default(),
            prefix: default_prefix(),
            retention: Policy::default(),
        }
    }
}

/// Checks a name prefix: 1 to [`MAX_PREFIX_LEN`] characters of `[A-Za-z0-9._-]`, not starting
/// with `.` or `-`, so every generated name is a valid snapshot and file name part.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    let ok_chars = prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if prefix.is_empty()
        || prefix.len() > MAX_PREFIX_LEN
        || !ok_chars
        || prefix.starts_with(['.', '-'])
    {
        return Err(format!(
            "schedule prefix {prefix:?} must be 1 to {MAX_PREFIX_LEN} characters of A-Z a-z 0-9 . _ - \
             and not start with . or -"
        ));
    }
    Ok(())
}

/// Reads the schedule settings out of a domain's settings object (defaults when absent).
pub fn from_settings(settings: &Value) -> Result<ScheduleSettings, String> {
    match settings.get(SETTINGS_KEY) {
        None | Some(Value::Null) => Ok(ScheduleSettings::default()),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| format!("the stored schedule settings cannot be read: {e}")),
    }
}

/// Returns `settings` with the schedule settings replaced by `schedule`; other keys stay.
pub fn into_settings(settings: &Value, schedule: &ScheduleSettings) -> Value {
    let mut out = match settings {
        Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    out.insert(
        SETTINGS_KEY.to_string(),
        serde_json::to_value(schedule).expect("schedule settings serialize"),
    );
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schedule_absent_settings_give_defaults() {
        let s = from_settings(&json!({})).unwrap();
        assert_eq!(s, ScheduleSettings::default());
        assert_eq!(s.kind, ScheduleKind::DiskOnly);
        assert_eq!(s.prefix, "auto");
        assert!(s.retention.is_empty());
    }

    #[test]
    fn schedule_round_trip_keeps_other_keys() {
        let s = ScheduleSettings {
            kind: ScheduleKind::Checkpoint,
            prefix: "hourly".into(),
            retention: Policy {
                keep_hourly: Some(24),
                ..Policy::default()
            },
        };
        let v = into_settings(&json!({"other": 1}), &s);
        assert_eq!(v["other"], 1);
        assert_eq!(v["schedule"]["kind"], "checkpoint");
        assert_eq!(v["schedule"]["retention"], json!({"keep-hourly": 24}));
        assert_eq!(from_settings(&v).unwrap(), s);
    }

    #[test]
    fn schedule_unreadable_settings_are_reported() {
        assert!(from_settings(&json!({"schedule": {"kind": "weekly"}})).is_err());
        assert!(from_settings(&json!({"schedule": {"bogus": 1}})).is_err());
    }

    #[test]
    fn schedule_prefix_validation() {
        for ok in ["auto", "a", "hourly_web-1.x"] {
            assert!(validate_prefix(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_PREFIX_LEN + 1);
        for bad in ["", "-x", ".x", "a/b", "a b", "é", long.as_str()] {
            assert!(validate_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
