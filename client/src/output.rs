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
                Failure::bus_error(name.to_string(), desc)
            }
            // zbus reports the bus's own error names (UnknownObject, ServiceUnknown, ...) here.
            Error::ZBus(zbus::Error::FDO(e)) => {
                use zbus::DBusError;
                Failure::bus_error(e.name().to_string(), e.description().map(str::to_string))
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

    /// An error reply named `name` that is not one of vmsnap's own.
    fn bus_error(name: String, desc: Option<String>) -> Failure {
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
        let code = match name.as_str() {
            n if n.ends_with("AccessDenied") => 6,
            // An object path that names nothing (e.g. a job or snapshot that went away).
            "org.freedesktop.DBus.Error.UnknownObject" => 3,
            _ => 1,
        };
        Failure {
            name,
            message,
            code,
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

    /// A local failure that is not the caller's fault (e.g. a file that cannot be written).
    pub fn local_io(message: String) -> Failure {
        Failure {
            name: format!("{ERROR_PREFIX}.Failed"),
            message,
            code: 1,
        }
    }

    /// Whether this failure means "not found" (exit code 3), e.g. an object that went away.
    pub fn code_is_not_found(&self) -> bool {
        self.code == 3
    }

    /// The same failure with `context` put before its message (e.g. what was done before it).
    pub fn context(mut self, context: &str) -> Failure {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// `vmsnap check` found `problems` rows that are not `ok` (exit code 12).
    pub fn check_failed(domain: &str, problems: usize) -> Failure {
        Failure {
            name: "vmsnap.CheckFailed".into(),
            message: format!("domain {domain:?}: {problems} problem(s) found"),
            code: 12,
        }
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

/// A table of snapshots: name, (parent when `parent_column`), creation time, state, kind,
/// current marker, description.
pub fn snapshot_table_with(rows: &[Value], parent_column: bool) -> String {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let width = |k: &str, min: usize| {
        rows.iter()
            .map(|r| s(r, k).chars().count())
            .max()
            .unwrap_or(0)
            .max(min)
    };
    let name_w = width("name", 4);
    let parent_w = width("parent", 6);
    let mut out = format!("{:<name_w$}  ", "NAME");
    if parent_column {
        out.push_str(&format!("{:<parent_w$}  ", "PARENT"));
    }
    out.push_str(&format!(
        "{:<19}  {:<13}  {:<10}  C  DESCRIPTION",
        "CREATED", "STATE", "KIND"
    ));
    for r in rows {
        let created = time(r.get("created").and_then(Value::as_u64).unwrap_or(0));
        let cur = if r.get("current").and_then(Value::as_bool).unwrap_or(false) {
            "*"
        } else {
            " "
        };
        out.push_str(&format!("\n{:<name_w$}  ", s(r, "name")));
        if parent_column {
            let p = r.get("parent").and_then(Value::as_str).unwrap_or("-");
            out.push_str(&format!("{p:<parent_w$}  "));
        }
        out.push_str(
            format!(
                "{created:<19}  {:<13}  {:<10}  {cur}  {}",
                s(r, "state"),
                s(r, "kind"),
                s(r, "description")
            )
            .trim_end(),
        );
    }
    out
}

/// The snapshots as a forest: an array of root rows, each row's `children` holding its child
/// rows (instead of names), in the order of `rows`. A row whose parent is not listed is a root.
pub fn snapshot_forest(rows: &[Value]) -> Value {
    let name = |r: &Value| {
        r.get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let names: std::collections::HashSet<String> = rows.iter().map(name).collect();
    fn build(node: &Value, rows: &[Value]) -> Value {
        let me = node.get("name").and_then(Value::as_str).unwrap_or("");
        let kids: Vec<Value> = rows
            .iter()
            .filter(|r| r.get("parent").and_then(Value::as_str) == Some(me))
            .map(|r| build(r, rows))
            .collect();
        let mut out = node.clone();
        out["children"] = Value::Array(kids);
        out
    }
    Value::Array(
        rows.iter()
            .filter(|r| {
                r.get("parent")
                    .and_then(Value::as_str)
                    .is_none_or(|p| !names.contains(p))
            })
            .map(|r| build(r, rows))
            .collect(),
    )
}

/// The forest drawn like `virsh snapshot-list --tree`; the current snapshot is marked.
pub fn snapshot_tree_text(forest: &Value) -> String {
    fn label(n: &Value) -> String {
        let name = n.get("name").and_then(Value::as_str).unwrap_or("");
        if n.get("current").and_then(Value::as_bool).unwrap_or(false) {
            format!("{name} (current)")
        } else {
            name.to_string()
        }
    }
    fn kids(n: &Value) -> &[Value] {
        n.get("children")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }
    fn below(n: &Value, prefix: &str, out: &mut Vec<String>) {
        let children = kids(n);
        for (i, c) in children.iter().enumerate() {
            let last = i + 1 == children.len();
            out.push(format!("{prefix}  |"));
            out.push(format!("{prefix}  +- {}", label(c)));
            let deeper = if last { "     " } else { "  |  " };
            below(c, &format!("{prefix}{deeper}"), out);
        }
    }
    let mut out = Vec::new();
    for (i, root) in forest.as_array().into_iter().flatten().enumerate() {
        if i > 0 {
            out.push(String::new());
        }
        out.push(label(root));
        below(root, "", &mut out);
    }
    out.join("\n")
}

/// Bytes as a short human size (1024-based).
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
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
    let children: Vec<&str> = v
        .get("children")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    out.push_str(&format!(
        "\nChildren:    {}",
        if children.is_empty() {
            "-".to_string()
        } else {
            children.join(", ")
        }
    ));
    out.push_str(&format!(
        "\nOn disk:     {}",
        size(v.get("size_on_disk").and_then(Value::as_u64).unwrap_or(0))
    ));
    out.push_str(&format!("\nObject:      {}", s("path")));
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

/// The rows of `vmsnap check`: what, name, verdict, reason.
pub fn check_table(rows: &[Value]) -> String {
    let mut out = format!(
        "{:<9} {:<24} {:<9} {}\n",
        "WHAT", "NAME", "VERDICT", "REASON"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<9} {:<24} {:<9} {}\n",
            r["what"].as_str().unwrap_or_default(),
            r["name"].as_str().unwrap_or_default(),
            r["verdict"].as_str().unwrap_or_default(),
            r["reason"].as_str().unwrap_or_default(),
        ));
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, parent: Option<&str>, current: bool) -> Value {
        json!({"name": name, "parent": parent, "current": current, "created": 0,
               "state": "running", "kind": "checkpoint", "description": ""})
    }

    #[test]
    fn snapshot_tree_text_draws_branches_and_marks_current() {
        let rows = [
            row("a", None, false),
            row("b", Some("a"), false),
            row("c", Some("b"), true),
            row("d", Some("a"), false),
            row("e", None, false),
        ];
        let text = snapshot_tree_text(&snapshot_forest(&rows));
        assert_eq!(
            text,
            "a\n  |\n  +- b\n  |    |\n  |    +- c (current)\n  |\n  +- d\n\ne"
        );
    }

    #[test]
    fn snapshot_forest_nests_children_under_parents() {
        let rows = [row("a", None, false), row("b", Some("a"), false)];
        let f = snapshot_forest(&rows);
        assert_eq!(f.as_array().unwrap().len(), 1);
        assert_eq!(f[0]["children"][0]["name"], "b");
        assert_eq!(f[0]["children"][0]["children"], json!([]));
    }

    #[test]
    fn snapshot_table_parent_column_shows_parent_or_dash() {
        let rows = [row("a", None, false), row("bb", Some("a"), true)];
        let t = snapshot_table_with(&rows, true);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME  PARENT  CREATED"), "{t}");
        assert!(lines[1].starts_with("a     -       "), "{t}");
        assert!(lines[2].starts_with("bb    a       "), "{t}");
        assert!(lines[2].ends_with(" *"), "{t}");
    }

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
        let gone = zbus::Error::FDO(Box::new(zbus::fdo::Error::UnknownObject("x".into())));
        assert_eq!(Failure::wire(Error::ZBus(gone)).code, 3);
    }
}
