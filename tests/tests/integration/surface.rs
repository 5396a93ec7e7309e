//! What front ends and scripts see: the client's list views (table, tree, roots, leaves,
//! parent), `info`, `jobs`, `cancel`, `--no-wait`, progress on a pipe and on a terminal, and
//! completions and man pages; on the bus, the Manager's `Jobs` property with its
//! `PropertiesChanged`, and the snapshots' `SizeOnDisk`.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use serde_json::{Value, json};
use vmsnap_dbus::names::ROOT_PATH;
use vmsnap_dbus::proxy::{JobProxy, SnapshotProxy};
use vmsnap_tests::process::{project_binary, run};
use vmsnap_tests::{
    Client, Deadline, DiskSpec, EventRecorder, TestEnv, poll_until_async, qemu_img_create,
};

use crate::snapshots::{Dom, specs, two_disks};

/// Exit code of `vmsnap` for "not found".
const EXIT_NOT_FOUND: i32 = 3;
/// Exit code of `vmsnap` for an invalid argument.
const EXIT_INVALID_ARGUMENT: i32 = 7;

/// Slowed external memory saves, bytes per second: a 64 MiB counter guest sends about
/// 870 KiB, so a save lasts several seconds, long enough to see and cancel.
const SLOW_BANDWIDTH: u64 = 160 * 1024;

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

/// A shut-off domain `name` with one qcow2 disk.
fn shutoff_domain<'a>(env: &'a TestEnv, name: &str) -> Dom<'a> {
    let img = env.images_dir().join(format!("{name}.qcow2"));
    qemu_img_create(&img, "qcow2", "16M");
    Dom::define(env, name, &[DiskSpec::new(&img, "qcow2", "vda")], 64)
}

#[test]
fn list_views_show_the_snapshot_tree() {
    let env = TestEnv::start();
    let d = shutoff_domain(&env, "lt");
    d.vmsnap(&["create", "lt", "--name", "s1", "--description", "first"]);
    d.vmsnap(&["create", "lt", "--name", "s2"]);
    d.vmsnap(&["create", "lt", "--name", "s3", "--parent", "s1"]);

    let rows = env.client.json(["list", "lt"]);
    assert_eq!(names(&rows), ["s1", "s2", "s3"]);
    assert_eq!(rows[0]["children"], json!(["s2", "s3"]));
    assert_eq!(rows[2]["parent"], "s1");
    assert_eq!(rows[2]["current"], true);

    let tree = env.client.ok(["list", "lt", "--tree"]);
    assert_eq!(
        tree.trim_end(),
        "s1\n  |\n  +- s2\n  |\n  +- s3 (current)",
        "the tree as drawn:\n{tree}"
    );
    let forest = env.client.json(["list", "lt", "--tree"]);
    assert_eq!(names(&forest), ["s1"]);
    assert_eq!(names(&forest[0]["children"]), ["s2", "s3"]);

    assert_eq!(names(&env.client.json(["list", "lt", "--roots"])), ["s1"]);
    assert_eq!(
        names(&env.client.json(["list", "lt", "--leaves"])),
        ["s2", "s3"]
    );
    let table = env.client.ok(["list", "lt", "--parent"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME  PARENT  CREATED"), "{table}");
    assert!(lines[1].starts_with("s1    -"), "{table}");
    assert!(lines[1].ends_with("first"), "{table}");
    assert!(lines[3].starts_with("s3    s1"), "{table}");
    assert!(lines[3].ends_with(" *"), "the current marker:\n{table}");
    let (code, err) = env.client.err(["list", "lt", "--tree", "--roots"]);
    assert_eq!(code, 2, "conflicting views are a usage error: {err}");

    let info = env.client.json(["info", "lt", "s1"]);
    assert_eq!(info["children"], json!(["s2", "s3"]));
    assert_eq!(info["size_on_disk"], 0, "internal snapshots count nothing");
    assert_eq!(info["description"], "first");
    let text = env.client.ok(["info", "lt", "s1"]);
    assert!(text.contains("Children:    s2, s3"), "{text}");
    assert!(text.contains("Parent:      -"), "{text}");
    let (code, _) = env.client.err(["info", "lt", "nope"]);
    assert_eq!(code, EXIT_NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_size_on_disk_counts_memory_file_and_overlays() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "sz", &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", "sz"]);
    let mem = env.images_dir().join("sz.mem");
    let v = env.client.json([
        "create",
        "sz",
        "--name",
        "x1",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    d.vmsnap(&["domain", "destroy", "sz"]);
    let overlays: Vec<String> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["overlay"].as_str().filter(|o| !o.is_empty()))
        .map(str::to_string)
        .collect();
    assert_eq!(overlays.len(), 2, "both disks got overlays: {v}");
    let allocated = |p: &str| std::fs::metadata(p).unwrap().blocks() * 512;
    let want =
        allocated(mem.to_str().unwrap()) + overlays.iter().map(|o| allocated(o)).sum::<u64>();
    assert!(want > 0);
    let conn = env.connect().await;
    let s = SnapshotProxy::builder(&conn)
        .path(zbus::OwnedObjectPath::try_from(v["path"].as_str().unwrap()).unwrap())
        .build()
        .await
        .unwrap();
    assert_eq!(s.size_on_disk().await.unwrap(), want);
    assert_eq!(v["size_on_disk"], want, "the client shows the same");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_lists_and_cancel_stops_a_slow_memory_save() {
    let bandwidth = format!("migrate-bandwidth={SLOW_BANDWIDTH}");
    let env = TestEnv::start_with_hooks(&[&bandwidth]);
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "jb", &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", "jb"]);
    assert_eq!(env.client.json(["jobs"]), json!([]));
    let conn = env.connect().await;
    let rec = EventRecorder::vmsnap(&conn).await.unwrap();
    let mem = env.images_dir().join("jb.mem");
    let v = env.client.json([
        "create",
        "jb",
        "--name",
        "c1",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
        "--no-wait",
    ]);
    let path = v["job"]
        .as_str()
        .expect("--no-wait prints the job")
        .to_string();
    let id = path.rsplit('/').next().unwrap().to_string();
    // The Manager announced the new job object.
    let listed = |s: &vmsnap_tests::Signal, want: bool| {
        s.path == ROOT_PATH
            && s.properties_changed().is_some_and(|pc| {
                pc.changed.get("Jobs").is_some_and(|v| {
                    let jobs: Vec<zbus::OwnedObjectPath> = v
                        .try_clone()
                        .ok()
                        .and_then(|v| v.try_into().ok())
                        .unwrap_or_default();
                    jobs.iter().any(|j| j.as_str() == path) == want
                })
            })
    };
    rec.wait_for(Deadline::step(), "Jobs to list the job", |s| {
        listed(s, true)
    })
    .await;

    let jobs = env.client.json(["jobs"]);
    let row = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["path"] == path.as_str())
        .unwrap_or_else(|| panic!("vmsnap jobs lacks {path}: {jobs}"))
        .clone();
    assert_eq!(row["operation"], "create-snapshot");
    assert_eq!(row["domain"], "jb");
    assert_eq!(row["state"], "running");
    let table = env.client.ok(["jobs"]);
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with(&id) && l.contains("running")),
        "{table}"
    );

    let job = JobProxy::builder(&conn)
        .path(zbus::OwnedObjectPath::try_from(path.clone()).unwrap())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    poll_until_async(Deadline::step(), "the save to be under way", || async {
        (job.cancelable().await.unwrap() && job.bytes_done().await.unwrap() > 0).then_some(())
    })
    .await;
    let out = env.client.json(["cancel", &id]);
    assert_eq!(out["job"], path.as_str());
    poll_until_async(Deadline::step(), "the cancelled job to end", || async {
        job.finished().await.unwrap().then_some(())
    })
    .await;
    assert_eq!(
        job.error_name().await.unwrap(),
        "org.vmsnap.VmSnap1.Error.Cancelled"
    );
    let jobs = env.client.json(["jobs"]);
    assert_eq!(jobs[0]["state"], "cancelled", "the job lingers: {jobs}");
    assert!(!mem.exists(), "the cancelled save left its file");
    assert_eq!(env.client.json(["list", "jb"]), json!([]));

    let (code, err) = env.client.err(["cancel", "987654"]);
    assert_eq!(code, EXIT_NOT_FOUND, "{err}");
    let e = env
        .client
        .err_json(["cancel", "/org/vmsnap/VmSnap1/job/987654"]);
    assert_eq!(e["error"], "org.vmsnap.VmSnap1.Error.NoSuchJob");
    let (code, err) = env.client.err(["cancel", "seven"]);
    assert_eq!(code, EXIT_INVALID_ARGUMENT, "{err}");

    // After lingering, the job object goes away and the Manager says so.
    rec.wait_for(Deadline::step(), "Jobs to drop the job", |s| {
        listed(s, false)
    })
    .await;
    assert_eq!(env.client.json(["jobs"]), json!([]));
}

#[test]
fn progress_is_plain_lines_on_a_pipe_and_a_bar_on_a_terminal() {
    let bandwidth = format!("migrate-bandwidth={SLOW_BANDWIDTH}");
    let env = TestEnv::start_with_hooks(&[&bandwidth]);
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "pg", &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", "pg"]);
    let mem1 = env.images_dir().join("pg1.mem");
    let out = env.client.run([
        "create",
        "pg",
        "--name",
        "p1",
        "--memory",
        "external",
        "--memory-file",
        mem1.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "Snapshot p1 of pg created");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(
        lines.contains(&"vmsnap: create-snapshot: prepare")
            || lines
                .iter()
                .any(|l| l.starts_with("vmsnap: create-snapshot: ")),
        "phase lines on stderr:\n{}",
        out.stderr
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("vmsnap: create-snapshot: memory ") && l.contains("% (")),
        "byte progress lines on stderr:\n{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains('\r') && !out.stderr.contains('\x1b'),
        "no terminal control on a pipe"
    );

    // With --json, stderr stays empty so that it can only ever hold a JSON error.
    let mem2 = env.images_dir().join("pg2.mem");
    let out = env.client.run([
        "--json",
        "create",
        "pg",
        "--name",
        "p2",
        "--memory",
        "external",
        "--memory-file",
        mem2.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stderr, "");

    // On a terminal (a pty from script(1)): an indicatif bar with bytes and a rate.
    let mem3 = env.images_dir().join("pg3.mem");
    let vmsnap = project_binary("vmsnap", "VMSNAP_BIN");
    let line = format!(
        "{} --address '{}' create pg --name p3 --memory external --memory-file {}",
        vmsnap.display(),
        env.bus_address(),
        mem3.display()
    );
    let out = run(
        Command::new("script")
            .args(["-qefc", &line, "/dev/null"])
            .env("TERM", "xterm")
            .env("COLUMNS", "120"),
        Deadline::step(),
    );
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("create-snapshot") && out.stdout.contains("/s"),
        "a bar with a rate on the terminal:\n{:?}",
        out.stdout
    );
    assert!(out.stdout.contains("Snapshot p3 of pg created"));
    assert_eq!(names(&env.client.json(["list", "pg"])), ["p1", "p2", "p3"]);
}

#[test]
fn revert_and_delete_no_wait_print_the_job() {
    let env = TestEnv::start();
    let d = shutoff_domain(&env, "nw");
    d.vmsnap(&["create", "nw", "--name", "s1"]);
    d.vmsnap(&["create", "nw", "--name", "s2"]);
    let path = env.client.ok(["revert", "nw", "s1", "--no-wait"]);
    assert!(
        path.trim().starts_with("/org/vmsnap/VmSnap1/job/"),
        "{path}"
    );
    poll_until_current(&env, "nw", "s1");
    let v = env.client.json(["delete", "nw", "s2", "--no-wait"]);
    assert!(
        v["job"]
            .as_str()
            .unwrap()
            .starts_with("/org/vmsnap/VmSnap1/job/")
    );
    vmsnap_tests::poll_until(Deadline::step(), "s2 to be deleted", || {
        (names(&env.client.json(["list", "nw"])) == ["s1"]).then_some(())
    });
}

fn poll_until_current(env: &TestEnv, dom: &str, snap: &str) {
    vmsnap_tests::poll_until(Deadline::step(), "the revert to finish", || {
        let rows = env.client.json(["list", dom]);
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == snap && r["current"] == true)
            .then_some(())
    });
}

#[test]
fn completions_and_man_pages_need_no_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let client = Client::new("unix:path=/nonexistent/bus");
    for shell in ["bash", "zsh", "fish"] {
        let out = client.ok(["completions", shell]);
        assert!(out.contains("vmsnap") && out.contains("revert"), "{shell}");
    }
    let page = client.ok(["man"]);
    assert!(page.contains(".TH vmsnap 1"), "{page}");
    assert!(page.contains("EXIT CODES"), "{page}");
    client.ok(["man", "--out-dir", dir.path().to_str().unwrap()]);
    let files: BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for want in [
        "vmsnap.1",
        "vmsnap-list.1",
        "vmsnap-domain-define.1",
        "vmsnap-cancel.1",
    ] {
        assert!(files.contains(want), "{want} missing from {files:?}");
    }
    let list = std::fs::read_to_string(dir.path().join("vmsnap-list.1")).unwrap();
    assert!(list.contains("tree"), "{list}");
}
