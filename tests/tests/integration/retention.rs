//! Retention through the real daemon, bus, QEMU and client: `Domain.Prune` (dry run, exact
//! plan, protected / current / manual snapshots left alone, data of the kept snapshots intact
//! in chains mixing external disk-only and internal snapshots), `vmsnap schedule run`, the
//! `Protected` and `Origin` properties, and refusals of bad policies that change nothing.

use super::revert_delete::hmp;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use vmsnap_dbus::Error;
use vmsnap_dbus::proxy::{DomainProxy, SnapshotProxy};
use vmsnap_tests::{
    Deadline, EventRecorder, TestEnv, qemu_img_snapshots, qemu_io_verify_pattern,
    qemu_io_write_pattern,
};
use zbus::Variant;

const OFF: u64 = 512 * 1024;

/// Defines domain `name` with a counter boot disk (vda) and a data disk (vdb).
fn define(env: &TestEnv, name: &str) -> (PathBuf, PathBuf) {
    crate::snapshots::define_two_disks(env, name)
}

async fn domain(env: &TestEnv, conn: &zbus::Connection) -> DomainProxy<'static> {
    let _ = env;
    DomainProxy::builder(conn)
        .path(vmsnap_dbus::names::domain_path(1))
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
}

fn state(env: &TestEnv, dom: &str) -> String {
    env.client.json(["domain", "info", dom])["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The file vdb currently uses.
fn vdb_file(env: &TestEnv, dom: &str) -> PathBuf {
    let v = env.client.json(["domain", "info", dom]);
    let d = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == "vdb")
        .unwrap()
        .clone();
    PathBuf::from(d["file"].as_str().unwrap())
}

/// Writes `pattern` at `OFF` of vdb: through the running guest's QEMU, or offline.
fn write_vdb(env: &TestEnv, dom: &str, pattern: u8) {
    if state(env, dom) == "shutoff" {
        qemu_io_write_pattern(&vdb_file(env, dom), "qcow2", pattern, OFF, 4096);
        return;
    }
    let v = env
        .client
        .json(["domain", "monitor", dom, r#"{"execute":"query-block"}"#]);
    let node = v
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["qdev"].as_str().unwrap_or("").contains("/vdb/"))
        .unwrap()["inserted"]["node-name"]
        .as_str()
        .unwrap()
        .to_string();
    let out = hmp(
        env,
        dom,
        &format!("qemu-io {node} \"write -P 0x{pattern:02x} {OFF} 4096\""),
    );
    assert!(!out.contains("rror"), "{out}");
}

/// Takes snapshot `name` over D-Bus with the given origin / protection / kind.
async fn take(d: &DomainProxy<'_>, name: &str, origin: &str, protected: bool, disk_only: bool) {
    let mut o = HashMap::new();
    o.insert("origin", Variant::from(origin));
    if protected {
        o.insert("protected", Variant::Bool(true));
    }
    if disk_only {
        o.insert("disk-only", Variant::Bool(true));
    }
    d.create_snapshot(name, "", o)
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e:?}"));
}

/// The snapshot list as (name, origin, protected, current), sorted by name.
fn listing(env: &TestEnv, dom: &str) -> Vec<(String, String, bool, bool)> {
    let mut v: Vec<(String, String, bool, bool)> = env
        .client
        .json(["list", dom])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["origin"].as_str().unwrap().to_string(),
                s["protected"].as_bool().unwrap(),
                s["current"].as_bool().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Reverts to each snapshot (paused), shuts the guest off and checks vdb's pattern.
fn verify_data(env: &TestEnv, dom: &str, expect: &[(&str, u8)], when: &str) {
    for (name, pattern) in expect {
        env.client.ok(["revert", dom, name, "--paused"]);
        if state(env, dom) != "shutoff" {
            env.client.ok(["domain", "destroy", dom]);
        }
        let f = vdb_file(env, dom);
        assert!(
            qemu_io_verify_pattern(&f, "qcow2", *pattern, OFF, 4096),
            "{when}: snapshot {name} must hold 0x{pattern:02x} on vdb ({})",
            f.display()
        );
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_mixed_chain_dry_run_changes_nothing_then_deletes_exactly_the_plan() {
    let env = TestEnv::start();
    let (_a, _b) = define(&env, "p");
    let conn = env.connect().await;
    let d = domain(&env, &conn).await;
    env.client.ok(["domain", "start", "p"]);
    // A chain mixing external disk-only and internal snapshots, all but one scheduled.
    let plan: [(&str, &str, bool, bool, u8); 6] = [
        ("s1", "schedule", false, true, 0x11),
        ("s2", "schedule", false, false, 0x22),
        ("m3", "manual", false, true, 0x33),
        ("s4", "schedule", true, true, 0x44),
        ("s5", "schedule", false, false, 0x55),
        ("s6", "schedule", false, true, 0x66),
    ];
    for (name, origin, protected, disk_only, pattern) in plan {
        write_vdb(&env, "p", pattern);
        take(&d, name, origin, protected, disk_only).await;
    }
    // Branch from s5 (s7), then go back to s5, so that the current snapshot is neither the
    // newest nor protected.
    env.client.ok(["domain", "destroy", "p"]);
    env.client.ok(["revert", "p", "s5", "--paused"]);
    env.client.ok(["domain", "destroy", "p"]);
    write_vdb(&env, "p", 0x77);
    take(&d, "s7", "schedule", false, true).await;
    // Now: s1 <- s2 <- m3 <- s4 <- s5 <- {s6, s7}; current s7.
    env.client.ok(["revert", "p", "s5"]);
    assert_eq!(
        env.client.json(["info", "p", "s5"])["current"],
        true,
        "s5 is current"
    );
    env.client.ok(["domain", "destroy", "p"]);

    let before = listing(&env, "p");
    let files_before = files(&env.images_dir());
    let tags_before = qemu_img_snapshots(&vdb_file(&env, "p"));
    let mut policy = HashMap::new();
    policy.insert("keep-last", Variant::U32(1));
    let mut dry = HashMap::new();
    dry.insert("dry-run", Variant::Bool(true));
    let would = d.prune(policy.clone(), dry).await.unwrap();
    // keep-last 1 keeps s7; s5 is current, s4 protected, m3 manual: s6, s2, s1 go, the
    // deepest first.
    assert_eq!(would, names(&["s6", "s2", "s1"]));
    // The plan with its reasons, oldest first, as `PlanPrune` and `prune --dry-run` show it.
    let rows = d.plan_prune(policy.clone(), HashMap::new()).await.unwrap();
    let row = |n: &str, v: &str, r: &[&str]| (n.to_string(), v.to_string(), names(r));
    assert_eq!(
        rows,
        [
            row("s1", "delete", &[]),
            row("s2", "delete", &[]),
            row("m3", "ignore", &["manual"]),
            row("s4", "keep", &["protected"]),
            row("s5", "keep", &["current"]),
            row("s6", "delete", &[]),
            row("s7", "keep", &["last"]),
        ]
    );
    let v = env
        .client
        .json(["prune", "p", "--keep-last", "1", "--dry-run"]);
    assert_eq!(v["deleted"], serde_json::json!(["s1", "s2", "s6"]), "{v}");
    assert_eq!(
        v["plan"][3]["reasons"],
        serde_json::json!(["protected"]),
        "{v}"
    );
    let text = env
        .client
        .ok(["prune", "p", "--keep-last", "1", "--dry-run"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("m3") && l.contains("ignore") && l.contains("manual")),
        "{text}"
    );
    assert_eq!(listing(&env, "p"), before, "a dry run changes no record");
    assert_eq!(
        files(&env.images_dir()),
        files_before,
        "a dry run changes no file"
    );
    assert_eq!(qemu_img_snapshots(&vdb_file(&env, "p")), tags_before);

    let v = env.client.json(["prune", "p", "--keep-last", "1"]);
    assert_eq!(v["deleted"], serde_json::json!(would), "{v}");
    let after = listing(&env, "p");
    let kept: Vec<&str> = after.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(kept, ["m3", "s4", "s5", "s7"]);
    let by_name: HashMap<&str, &(String, String, bool, bool)> =
        after.iter().map(|s| (s.0.as_str(), s)).collect();
    assert_eq!(by_name["m3"].1, "manual");
    assert_eq!(by_name["s7"].1, "schedule");
    assert!(by_name["s4"].2, "s4 stays protected");
    assert!(by_name["s5"].3, "s5 stays current");
    // The data of every kept snapshot survived the merges.
    verify_data(
        &env,
        "p",
        &[("m3", 0x33), ("s4", 0x44), ("s5", 0x55), ("s7", 0x77)],
        "after prune",
    );
    // The last revert made s7 current: s5 is now an ordinary old candidate and goes.
    let v = env.client.json(["prune", "p", "--keep-last", "1"]);
    assert_eq!(v["deleted"], serde_json::json!(["s5"]), "{v}");
    let kept: Vec<String> = listing(&env, "p").into_iter().map(|s| s.0).collect();
    assert_eq!(kept, ["m3", "s4", "s7"]);
    verify_data(&env, "p", &[("s4", 0x44)], "after the second prune");
    // And now nothing is left to do.
    let v = env.client.json(["prune", "p", "--keep-last", "1"]);
    assert_eq!(v["deleted"], serde_json::json!([]), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_run_twice_live_creates_scheduled_snapshots_and_keeps_last_one() {
    let env = TestEnv::start();
    let (_a, _b) = define(&env, "q");
    env.client.ok(["domain", "start", "q"]);
    write_vdb(&env, "q", 0x05);
    env.client
        .ok(["create", "q", "--name", "manual0", "--disk-only"]);
    let shown = env.client.json(["schedule", "q"]);
    assert_eq!(shown["kind"], "disk-only", "{shown}");
    assert_eq!(shown["prefix"], "auto", "{shown}");
    assert_eq!(shown["retention"], serde_json::json!({}), "{shown}");
    let set = env.client.json([
        "schedule",
        "set",
        "q",
        "--keep-last",
        "1",
        "--prefix",
        "hourly",
        "--max-age",
        "30d",
    ]);
    assert_eq!(
        set["retention"],
        serde_json::json!({"keep-last": 1, "max-age": 30 * 86_400}),
        "{set}"
    );
    assert_eq!(env.client.json(["schedule", "show", "q"]), set);

    write_vdb(&env, "q", 0x11);
    let r1 = env.client.json(["schedule", "run", "q"]);
    let first = r1["created"].as_str().unwrap().to_string();
    assert!(first.starts_with("hourly-"), "{r1}");
    assert_eq!(r1["pruned"], serde_json::json!([]), "{r1}");
    write_vdb(&env, "q", 0x22);
    let r2 = env.client.json(["schedule", "run", "q"]);
    let second = r2["created"].as_str().unwrap().to_string();
    assert_ne!(first, second);
    assert_eq!(r2["pruned"], serde_json::json!([first]), "{r2}");
    assert_eq!(state(&env, "q"), "running", "the guest kept running");
    let l = listing(&env, "q");
    assert_eq!(
        l,
        vec![
            (second.clone(), "schedule".into(), false, true),
            ("manual0".into(), "manual".into(), false, false),
        ]
    );
    let info = env.client.json(["info", "q", &second]);
    assert_eq!(info["kind"], "disk-only");
    assert_eq!(info["parent"], "manual0", "re-parented over the pruned one");
    env.client.ok(["domain", "destroy", "q"]);
    verify_data(
        &env,
        "q",
        &[(second.as_str(), 0x22), ("manual0", 0x05)],
        "after scheduled runs",
    );
    // The human output says what happened.
    env.client.ok(["domain", "start", "q"]);
    let out = env.client.ok(["schedule", "run", "q"]);
    assert!(out.contains("created (disk-only)"), "{out}");
    assert!(out.contains(&format!("Pruned: {second}")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_bad_policy_values_are_refused_and_change_nothing() {
    let env = TestEnv::start();
    let (a, _b) = define(&env, "bad");
    let conn = env.connect().await;
    let d = domain(&env, &conn).await;
    take(&d, "s1", "schedule", false, false).await;
    take(&d, "s2", "schedule", false, false).await;
    let before = listing(&env, "bad");
    let schedule_before = env.client.json(["schedule", "bad"]);

    let cases: Vec<(&str, Variant<'static>)> = vec![
        ("keep-last", Variant::U32(0)),
        ("keep-daily", Variant::from("7")),
        ("keep-weekly", Variant::I32(-1)),
        ("keep-dayly", Variant::U32(1)),
        ("max-age", Variant::from("3x")),
        ("max-age", Variant::U64(0)),
        ("max-age", Variant::Bool(true)),
    ];
    for (k, v) in cases {
        let mut p = HashMap::new();
        p.insert(k, v.clone());
        let e = d.prune(p, HashMap::new()).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains(k)),
            "prune {k}={v:?}: {e:?}"
        );
        let mut s = HashMap::new();
        s.insert(k, v.clone());
        let e = d.set_schedule(s, HashMap::new()).await.unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(_)),
            "set-schedule {k}={v:?}: {e:?}"
        );
    }
    // No policy given and none stored.
    let e = d.prune(HashMap::new(), HashMap::new()).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("no stored retention policy")),
        "{e:?}"
    );
    // Unknown option, bad kind, bad prefix, bad origin.
    let mut o = HashMap::new();
    o.insert("dry-rum", Variant::Bool(true));
    let mut p = HashMap::new();
    p.insert("keep-last", Variant::U32(1));
    let e = d.prune(p, o).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    for (k, v) in [("kind", "weekly"), ("prefix", "a/b"), ("prefix", "")] {
        let mut s = HashMap::new();
        s.insert(k, Variant::from(v));
        // One valid key alongside: nothing of the call may be stored.
        s.insert("keep-last", Variant::U32(3));
        let e = d.set_schedule(s, HashMap::new()).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{k}={v}: {e:?}");
    }
    let mut o = HashMap::new();
    o.insert("origin", Variant::from("Not A Word"));
    let e = d.create_snapshot("s3", "", o).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("origin")),
        "{e:?}"
    );
    // The CLI reports the same refusals with exit code 7.
    let (code, err) = env.client.err(["prune", "bad", "--keep-last", "0"]);
    assert_eq!(code, 7, "{err}");
    let (code, err) = env
        .client
        .err(["schedule", "set", "bad", "--kind", "hourly"]);
    assert_eq!(code, 7, "{err}");

    assert_eq!(listing(&env, "bad"), before, "no snapshot changed");
    assert_eq!(env.client.json(["schedule", "bad"]), schedule_before);
    let tags: Vec<String> = qemu_img_snapshots(&a).into_iter().map(|(_, t)| t).collect();
    assert_eq!(tags, ["s1", "s2"]);
    // A valid change is stored and announced.
    let rec = EventRecorder::vmsnap(&conn).await.unwrap();
    let mut s = HashMap::new();
    s.insert("kind", Variant::from("checkpoint"));
    s.insert("keep-daily", Variant::U32(7));
    d.set_schedule(s, HashMap::new()).await.unwrap();
    let sig = rec
        .wait_for(Deadline::step(), "Schedule changed", |sig| {
            sig.properties_changed()
                .is_some_and(|pc| pc.changed.contains_key("Schedule"))
        })
        .await;
    assert_eq!(sig.path, vmsnap_dbus::names::domain_path(1));
    let shown = env.client.json(["schedule", "bad"]);
    assert_eq!(shown["kind"], "checkpoint");
    assert_eq!(shown["retention"], serde_json::json!({"keep-daily": 7}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_protected_is_persisted_announced_and_honoured_by_prune() {
    let env = TestEnv::start();
    let (a, _b) = define(&env, "pr");
    let conn = env.connect().await;
    let d = domain(&env, &conn).await;
    take(&d, "old", "manual", false, false).await;
    take(&d, "mid", "manual", false, false).await;
    take(&d, "new", "manual", false, false).await;
    let path = d.find_snapshot("old").await.unwrap();
    let s = SnapshotProxy::builder(&conn)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    assert_eq!(s.origin().await.unwrap(), "manual");
    assert!(!s.protected().await.unwrap());
    let rec = EventRecorder::vmsnap(&conn).await.unwrap();
    s.set_protected(true).await.unwrap();
    rec.wait_for(Deadline::step(), "Protected changed to true", |sig| {
        sig.path == path.as_str()
            && sig.properties_changed().is_some_and(|pc| {
                pc.changed
                    .get("Protected")
                    .is_some_and(|v| bool::try_from(v).ok() == Some(true))
            })
    })
    .await;
    // Persisted across a daemon restart.
    let mut env = env;
    env.daemon.stop();
    env.daemon.start_again();
    let conn = env.connect().await;
    let d = domain(&env, &conn).await;
    let l = listing(&env, "pr");
    assert!(l.iter().any(|x| x.0 == "old" && x.2), "{l:?}");
    // include-manual with keep-last 1: "new" kept (and current), "old" protected, "mid" goes.
    let mut p = HashMap::new();
    p.insert("keep-last", Variant::U32(1));
    let mut o = HashMap::new();
    o.insert("include-manual", Variant::Bool(true));
    let mid_path = d.find_snapshot("mid").await.unwrap();
    let rec = EventRecorder::vmsnap(&conn).await.unwrap();
    let deleted = d.prune(p.clone(), o).await.unwrap();
    assert_eq!(deleted, names(&["mid"]));
    rec.wait_for(Deadline::step(), "SnapshotDeleted for mid", |sig| {
        sig.member == "SnapshotDeleted"
            && sig
                .message
                .body()
                .deserialize::<zbus::OwnedObjectPath>()
                .ok()
                .as_ref()
                == Some(&mid_path)
    })
    .await;
    // Without include-manual, manual snapshots are not candidates at all.
    assert!(d.prune(p, HashMap::new()).await.unwrap().is_empty());
    let tags: Vec<String> = qemu_img_snapshots(&a).into_iter().map(|(_, t)| t).collect();
    assert_eq!(tags, ["old", "new"]);
    // unprotect through the CLI, then the old one can go.
    env.client.ok(["unprotect", "pr", "old"]);
    let v = env.client.json([
        "prune",
        "pr",
        "--keep-last",
        "1",
        "--include-manual",
        "--dry-run",
    ]);
    assert_eq!(v["deleted"], serde_json::json!(["old"]), "{v}");
    env.client.ok(["protect", "pr", "new"]);
    assert_eq!(env.client.json(["info", "pr", "new"])["protected"], true);
    // A protected snapshot created protected.
    take(&d, "born", "schedule", true, false).await;
    assert_eq!(env.client.json(["info", "pr", "born"])["protected"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_failing_midway_reports_what_it_deleted_and_keeps_the_rest() {
    let env = TestEnv::start();
    let (a, b) = define(&env, "mid");
    let conn = env.connect().await;
    let d = domain(&env, &conn).await;
    for name in ["s1", "s2", "s3"] {
        take(&d, name, "schedule", false, false).await;
    }
    // s1's internal snapshots vanish behind the daemon's back: its delete must fail, after
    // s2 (deeper, so first) was deleted.
    for img in [&a, &b] {
        let out = std::process::Command::new("qemu-img")
            .args(["snapshot", "-d", "s1"])
            .arg(img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let mut p = HashMap::new();
    p.insert("keep-last", Variant::U32(1));
    let e = d.prune(p, HashMap::new()).await.unwrap_err();
    assert!(
        matches!(&e, Error::Failed(m) if m.contains("deleted s2 before it stopped") && m.contains("qemu-img")),
        "{e:?}"
    );
    let kept: Vec<String> = listing(&env, "mid").into_iter().map(|s| s.0).collect();
    assert_eq!(kept, ["s1", "s3"], "s2 went, s1 stayed, s3 is kept");
    let tags: Vec<String> = qemu_img_snapshots(&a).into_iter().map(|(_, t)| t).collect();
    assert_eq!(tags, ["s3"]);
    // The CLI exits non-zero and says the same.
    let (code, err) = env.client.err(["prune", "mid", "--keep-last", "1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("s1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_unreadable_stored_settings_are_reported_and_replaceable() {
    let mut env = TestEnv::start();
    let (_a, _b) = define(&env, "u");
    env.client.ok(["schedule", "set", "u", "--keep-last", "2"]);
    // A value this build cannot read (as a newer version might write), put in by hand.
    env.daemon.stop();
    let db = env.dir().join("state/catalog.sqlite3");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(r#"UPDATE domains SET settings = '{"schedule": {"kind": "hourly"}, "other": 1}'"#)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    env.daemon.start_again();
    // Listing domains (GetAll / GetManagedObjects) still works and says what is wrong.
    let v = env.client.json(["domain", "list"]);
    assert_eq!(v[0]["name"], "u", "{v}");
    let shown = env.client.json(["schedule", "u"]);
    assert!(
        shown["error"].as_str().unwrap().contains("hourly"),
        "{shown}"
    );
    // A scheduled run refuses before taking a snapshot; Prune without a policy as well.
    let (code, err) = env.client.err(["schedule", "run", "u"]);
    assert_eq!(code, 1, "{err}");
    let (code, err) = env.client.err(["prune", "u"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(env.client.json(["list", "u"]), serde_json::json!([]));
    // Merging into it is refused; a reset replaces it and keeps the other keys.
    let (code, err) = env.client.err(["schedule", "set", "u", "--keep-last", "1"]);
    assert_eq!(code, 7, "{err}");
    let v = env
        .client
        .json(["schedule", "set", "u", "--reset", "--keep-last", "1"]);
    assert_eq!(v["retention"], serde_json::json!({"keep-last": 1}), "{v}");
    assert!(v.get("error").is_none(), "{v}");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("SELECT json_extract(settings, '$.other') FROM domains")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
}
