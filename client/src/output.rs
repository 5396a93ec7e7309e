//! Output and failures: tables for people, JSON for programs, one-line errors with stable
//! exit codes.

use std::process::ExitCode;

use serde_json::{Value, json};
use vmsnap_dbus::Error;
use vmsnap_dbus::names::ERROR_PREFIX;

/// Prints `value` as JSON, or the human rendering.
pub fn emit(json_mode: bool, value: &Value, human: impl FnOnce() -> String) {
    if json_mode {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        println!("{}", human());
    }
}

/// A table of domains.
pub fn domain_table(rows: &[Value]) -> String {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let name_w = rows
        .iter()
        .map(|r| s(r, "name").len())
        .max()
        .unwrap_or(0)
        .max(4);
    let mut out = format!("{:<name_w$}  {:<8}  {:<8}  DISKS", "NAME", "STATE", "KIND");
    for r in rows {
        let disks = r
            .get("disks")
            .and_then(Value::as_array)
            .map(|d| d.len())
            .unwrap_or(0);
        out.push_str(&format!(
            "\n{:<name_w$}  {:<8}  {:<8}  {disks}",
            s(r, "name"),
            s(r, "state"),
            s(r, "kind")
        ));
    }
    out
}

/// Key-value lines for one domain.
pub fn domain_info(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut out = format!(
        "Name:     {}\nUUID:     {}\nState:    {}\nKind:     {}\nSnapshot: {}",
        s("name"),
        s("uuid"),
        s("state"),
        s("kind"),
        v.get("current_snapshot")
            .and_then(Value::as_str)
            .unwrap_or("-")
    );
    for d in v
        .get("disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let g = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let flags: Vec<&str> = d
            .get("flags")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        out.push_str(&format!(
            "\nDisk:     {} {} {} [{}]",
            g("target"),
            g("format"),
            g("file"),
            flags.join(",")
        ));
    }
    out
}

/// A failure to report: the error's full name, its message and the exit code.
#[derive(Debug)]
pub struct Failure {
    name: String,
    message: String,
    code: u8,
}

fn code_for(short: &str) -> u8 {
    match short {
        "NoSuchDomain" | "NoSuchSnapshot" | "NoSuchJob" => 3,
        "AlreadyExists" => 4,
        "Busy" => 5,
        "NotAuthorized" => 6,
        "InvalidArgument" => 7,
        "Unsupported" => 8,
        "InvalidState" => 9,
        "Timeout" => 10,
        "Cancelled" => 11,
        _ => 1,
    }
}

impl Failure {
    /// A wire error from the daemon (or the bus).
    pub fn wire(e: Error) -> Failure {
        match e {
            Error::ZBus(zbus::Error::MethodError(name, desc, _)) => {
                let name = name.to_string();
                let message = match name.as_str() {
                    "org.freedesktop.DBus.Error.ServiceUnknown"
                    | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                        "vmsnapd is not running on this bus".to_string()
                    }
                    "org.freedesktop.DBus.Error.AccessDenied" => {
                        format!(
                            "access denied by the bus policy: {}",
                            desc.unwrap_or_default()
                        )
                    }
                    _ => desc.unwrap_or_else(|| name.clone()),
                };
                let code = if name.ends_with("AccessDenied") { 6 } else { 1 };
                Failure {
                    name,
                    message,
                    code,
                }
            }
            Error::ZBus(other) => Failure {
                name: "org.freedesktop.DBus.Error.Failed".into(),
                message: other.to_string(),
                code: 1,
            },
            other => Failure {
                name: format!("{ERROR_PREFIX}.{}", other.short_name()),
                code: code_for(other.short_name()),
                message: other.message(),
            },
        }
    }

    /// The bus could not be reached.
    pub fn connect(e: &zbus::Error) -> Failure {
        Failure {
            name: "org.freedesktop.DBus.Error.NoServer".into(),
            message: format!("cannot connect to the bus: {e}"),
            code: 1,
        }
    }

    /// A local problem (an unreadable file).
    pub fn local(message: String) -> Failure {
        Failure {
            name: format!("{ERROR_PREFIX}.InvalidArgument"),
            message,
            code: 7,
        }
    }

    /// The same failure with `context` put before its message (e.g. what was done before it).
    pub fn context(mut self, context: &str) -> Failure {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// Prints the failure and returns the exit code.
    pub fn report(self, json_mode: bool) -> ExitCode {
        if json_mode {
            eprintln!("{}", json!({"error": self.name, "message": self.message}));
        } else {
            eprintln!("vmsnap: {}", self.message);
        }
        ExitCode::from(self.code)
    }
}

/// Formats unix seconds as UTC `YYYY-MM-DD HH:MM:SS`.
fn time(secs: u64) -> String {
    jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// A table of snapshots: name, creation time, state, kind, current marker, description.
pub fn snapshot_table(rows: &[Value]) -> String {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let name_w = rows
        .iter()
        .map(|r| s(r, "name").chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    let mut out = format!(
        "{:<name_w$}  {:<19}  {:<13}  {:<10}  C  DESCRIPTION",
        "NAME", "CREATED", "STATE", "KIND"
    );
    for r in rows {
        let created = time(r.get("created").and_then(Value::as_u64).unwrap_or(0));
        let cur = if r.get("current").and_then(Value::as_bool).unwrap_or(false) {
            "*"
        } else {
            " "
        };
        out.push_str(&format!(
            "\n{:<name_w$}  {created:<19}  {:<13}  {:<10}  {cur}  {}",
            s(r, "name"),
            s(r, "state"),
            s(r, "kind"),
            s(r, "description")
        ));
    }
    out
}

/// Key-value lines for one snapshot.
pub fn snapshot_info(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut out = format!(
        "Name:        {}\nDescription: {}\nCreated:     {}\nState:       {}\nKind:        {}\nParent:      {}\nCurrent:     {}\nStatus:      {}",
        s("name"),
        s("description"),
        time(v.get("created").and_then(Value::as_u64).unwrap_or(0)),
        s("state"),
        s("kind"),
        v.get("parent").and_then(Value::as_str).unwrap_or("-"),
        if v.get("current").and_then(Value::as_bool).unwrap_or(false) {
            "yes"
        } else {
            "no"
        },
        s("status"),
    );
    out.push_str(&format!(
        "\nOrigin:      {}\nProtected:   {}",
        s("origin"),
        if v.get("protected").and_then(Value::as_bool).unwrap_or(false) {
            "yes"
        } else {
            "no"
        }
    ));
    let m = &v["memory"];
    out.push_str(&format!(
        "\nMemory:      {} {}",
        m.get("mode").and_then(Value::as_str).unwrap_or(""),
        m.get("where").and_then(Value::as_str).unwrap_or("")
    ));
    for d in v
        .get("disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let g = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        out.push_str(&format!(
            "\nDisk:        {} {} {}",
            g("target"),
            g("mode"),
            g("file")
        ));
        if !g("overlay").is_empty() {
            out.push_str(&format!(" (active: {})", g("overlay")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_codes_are_distinct_per_category() {
        let codes: Vec<u8> = [
            Error::NoSuchDomain(String::new()),
            Error::AlreadyExists(String::new()),
            Error::Busy(String::new()),
            Error::NotAuthorized(String::new()),
            Error::InvalidArgument(String::new()),
        ]
        .into_iter()
        .map(|e| Failure::wire(e).code)
        .collect();
        assert_eq!(codes, vec![3, 4, 5, 6, 7]);
        assert_eq!(Failure::wire(Error::Failed(String::new())).code, 1);
    }
}
