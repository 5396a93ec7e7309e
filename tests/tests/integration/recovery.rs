//! Crash recovery through the real daemon, bus, QEMU and client.
//!
//! The daemon is made to abort (test hook `crash-at=STEP`, as `kill -9` would) at every step
//! of create, revert and delete that `vmsnapd` lists (`list-crash-steps`), then started again.
//! After each restart: no pending record, every record's files exist with their chains and
//! tags, no file in the images directory that nothing references, `vmsnap check` is clean, the
//! guest runs, and the expected decision (forward or back) was taken. At the end of each test
//! every surviving snapshot is reverted to and shows its own data. The merge kinds of a delete
//! (live commit, streaming into branches, offline commit) and both revert paths (in place, and
//! replacing QEMU for another configuration) are crashed at their steps. Also: QEMU killed or quit
//! during an external VM state save, the disk full during the save, and a snapshot file
//! deleted behind the daemon's back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vmsnap_tests::process::{project_binary, run_ok};
use vmsnap_tests::{
    Client, Deadline, TestEnv, poll_until, qemu_img_info, qemu_img_snapshots,
    qemu_io_verify_pattern,
};

use crate::snapshots::{Dom, specs, two_disks};

/// Where the data patterns go on `vdb`.
const OFF: u64 = 64 * 1024;
/// Length of a data pattern.
const LEN: u64 = 4096;
/// Exit code of `vmsnap check` when something is wrong.
const EXIT_CHECK_FAILED: i32 = 12;
/// Exit code of `vmsnap` for `InvalidState`.
const EXIT_INVALID_STATE: i32 = 9;
/// Bandwidth of a slowed external VM state save, bytes per second (about 7 s for the
/// 64 MiB counter guest, see `snapshot_faults`).
const SLOW_BANDWIDTH: u64 = 128 * 1024;

/// How long a guest may take to be seen running and counting (TCG on a loaded machine).
const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// Steps the create scenarios pass, per scenario.
const CREATE_STEPS: &[&str] = &[
    "create.recorded",
    "create.overlays",
    "create.memory",
    "create.switched",
    "create.disks",
];
/// Steps the revert scenarios pass.
const REVERT_STEPS: &[&str] = &[
    "revert.started",
    "revert.paused",
    "revert.loaded",
    "revert.destroyed",
    "revert.files",
    "revert.defined",
];
/// Steps the delete scenarios pass.
const DELETE_STEPS: &[&str] = &[
    "delete.started",
    "delete.tags",
    "delete.merging",
    "delete.merged",
    "delete.uncataloged",
];

/// The daemon's own list of crash steps.
fn daemon_steps() -> Vec<String> {
    let out = run_ok(
        Command::new(project_binary("vmsnapd", "VMSNAPD_BIN"))
            .env("VMSNAPD_TEST_HOOKS", "list-crash-steps"),
        Deadline::step(),
    );
    out.stdout.lines().map(str::to_string).collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The disk sources of the domain's definition, in definition order.
fn sources(env: &TestEnv, dom: &str) -> Vec<PathBuf> {
    let xml = env.client.ok(["domain", "dumpxml", dom]);
    xml.split("<source file=")
        .skip(1)
        .map(|rest| {
            let quote = rest.chars().next().expect("a quoted source");
            let value = &rest[1..];
            PathBuf::from(&value[..value.find(quote).expect("a closing quote")])
        })
        .collect()
}

/// Every file the definition and the snapshot records name.
fn referenced(env: &TestEnv, dom: &str, list: &Value) -> BTreeSet<PathBuf> {
    let mut out: BTreeSet<PathBuf> = sources(env, dom).into_iter().collect();
    out.extend(crate::snapshots::listed_files(list));
    out
}

/// Asserts that the catalog matches the images and that nothing is left over: no pending
/// record, every record's files present with their tags and chains, no new file in the images
/// directory (beyond the ones in `before`) that nothing names, and `vmsnap check` clean.
fn assert_consistent(env: &TestEnv, dom: &str, before: &BTreeSet<PathBuf>, what: &str) {
    let list = env.client.json(["list", dom]);
    for s in list.as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        assert_eq!(s["status"], "committed", "{what}: snapshot {name}: {s}");
        for d in s["disks"].as_array().unwrap() {
            let file = PathBuf::from(d["file"].as_str().unwrap());
            match d["mode"].as_str().unwrap() {
                "internal" => assert!(
                    qemu_img_snapshots(&file).iter().any(|(_, t)| t == name),
                    "{what}: {name}: tag missing from {}",
                    file.display()
                ),
                "external" => {
                    assert!(file.exists(), "{what}: {name}: {} missing", file.display());
                    let overlay = PathBuf::from(d["overlay"].as_str().unwrap_or_default());
                    if overlay.exists() {
                        let chain = qemu_img_info(&overlay);
                        assert!(
                            chain
                                .as_array()
                                .unwrap()
                                .iter()
                                .skip(1)
                                .any(|i| i["filename"].as_str() == file.to_str()),
                            "{what}: {name}: {} is not backed by {}: {chain}",
                            overlay.display(),
                            file.display()
                        );
                    }
                }
                _ => {}
            }
        }
        if s["memory"]["mode"] == "external" {
            let f = PathBuf::from(s["memory"]["where"].as_str().unwrap());
            assert!(f.exists(), "{what}: {name}: memory file missing");
        }
    }
    let known = referenced(env, dom, &list);
    let orphans: Vec<PathBuf> = crate::snapshots::files_in(&env.images_dir())
        .into_iter()
        .filter(|f| f.extension().and_then(|e| e.to_str()) != Some("xml"))
        .filter(|f| !known.contains(f) && !before.contains(f))
        .collect();
    assert!(orphans.is_empty(), "{what}: orphan files {orphans:?}");
    let out = env.client.run(["--json", "check", dom]);
    assert_eq!(
        out.code(),
        0,
        "{what}: vmsnap check: {}{}",
        out.stdout,
        out.stderr
    );
}

/// Asserts that the guest runs for the daemon and for QEMU, and that its vCPUs count on.
fn assert_runs(env: &TestEnv, dom: &str, what: &str) {
    let d = Dom::handle(env, dom);
    poll_until(
        Deadline::after(RUN_TIMEOUT),
        &format!("{what}: the guest to run"),
        || (d.info()["state"] == "running").then_some(()),
    );
    let st = env
        .client
        .json(["domain", "monitor", dom, r#"{"execute":"query-status"}"#]);
    assert_eq!(st["status"], "running", "{what}: QEMU's run state");
    let c = d.counter();
    poll_until(
        Deadline::after(RUN_TIMEOUT),
        &format!("{what}: the vCPUs to run"),
        || (d.counter() != c).then_some(()),
    );
}

/// Restarts the daemon with `crash-at=STEP`, runs `args` (which must make it abort), and
/// starts it again without the hook; returns the client's output.
fn crash_at(env: &mut TestEnv, step: &str, args: &[String]) -> vmsnap_tests::Output {
    env.daemon.stop();
    let hook = format!("crash-at={step}");
    env.daemon.set_hooks(&[&hook]);
    env.daemon.start_again();
    let out = env.client.run(args);
    let status = env.daemon.wait_exited(Deadline::step());
    assert!(
        !status.success(),
        "{step}: the daemon was to abort at the step, but {args:?} ended with {status}: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        env.daemon
            .log()
            .lines()
            .any(|l| l.contains("test hook: crashing") && l.contains(&format!("\"{step}\""))),
        "{step}: the daemon did not log its crash at the step"
    );
    env.daemon.set_hooks(&[]);
    env.daemon.start_again();
    out
}

/// The data pattern on `vdb` as the running guest's top image of `vdb` shows it.
fn vdb_shows(env: &TestEnv, dom: &str, pattern: u8) -> bool {
    let top = &sources(env, dom)[1];
    qemu_io_verify_pattern(top, "qcow2", pattern, OFF, LEN)
}

/// Reverts to every snapshot in `survivors` and checks it shows its own data.
fn revert_each(env: &TestEnv, dom: &str, survivors: &BTreeMap<String, u8>) {
    for (name, pattern) in survivors {
        env.client.ok(["revert", dom, name, "--running"]);
        assert!(
            vdb_shows(env, dom, *pattern),
            "after reverting to {name}: vdb shows pattern {pattern:#x}"
        );
        // Running for the daemon and for QEMU (a disk-only snapshot boots afresh, which
        // takes long enough that waiting for the counter here would dominate the test).
        let st = env
            .client
            .json(["domain", "monitor", dom, r#"{"execute":"query-status"}"#]);
        assert_eq!(st["status"], "running", "after reverting to {name}");
    }
}

/// The files in the images directory now.
fn files(env: &TestEnv) -> BTreeSet<PathBuf> {
    crate::snapshots::files_in(&env.images_dir())
        .into_iter()
        .collect()
}

fn names(env: &TestEnv, dom: &str) -> BTreeSet<String> {
    env.client
        .json(["list", dom])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Two qcow2 disks (the counter boot disk and a data disk), the guest started and counting.
fn running_guest(env: &TestEnv, dom: &str) {
    let (a, b) = two_disks(env, "qcow2");
    let d = Dom::define(env, dom, &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", dom]);
    counting(env, dom);
}

/// Waits until the counter guest counts, allowing [`RUN_TIMEOUT`] (SeaBIOS alone can take
/// several seconds on a loaded machine).
fn counting(env: &TestEnv, dom: &str) {
    let d = Dom::handle(env, dom);
    poll_until(
        Deadline::after(RUN_TIMEOUT),
        "the counter guest to count",
        || (d.counter() != 0).then_some(()),
    );
}

/// Writes `pattern` on `vdb` of the running guest and flushes it.
fn write_vdb(env: &TestEnv, dom: &str, pattern: u8) {
    let d = Dom::handle(env, dom);
    d.write("vdb", pattern, OFF, LEN);
    // Flushed, so that a reader of the image file (qemu-io -U) sees it.
    let out = d.hmp(&format!("qemu-io {} \"flush\"", d.node("vdb")));
    assert!(!out.contains("rror"), "flush: {out}");
}

#[test]
fn recovery_crash_steps_are_all_covered_by_the_tests() {
    let listed: BTreeSet<String> = daemon_steps().into_iter().collect();
    let covered: BTreeSet<String> = CREATE_STEPS
        .iter()
        .chain(REVERT_STEPS)
        .chain(DELETE_STEPS)
        .map(|s| s.to_string())
        .collect();
    assert!(!listed.is_empty(), "vmsnapd listed no crash steps");
    assert_eq!(
        listed, covered,
        "every step vmsnapd journals needs a crash scenario here"
    );
}

/// One create scenario: its options and whether the snapshot survives a crash at each step.
struct CreateCase {
    prefix: &'static str,
    args: fn(&Path) -> Vec<String>,
    /// (step, the snapshot is committed after recovery, disks moved to new overlays).
    steps: &'static [(&'static str, bool, bool)],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_create_crash_at_every_step_rolls_forward_or_back() {
    let mut env = TestEnv::start();
    let dom = "rc";
    running_guest(&env, dom);
    let cases = [
        CreateCase {
            prefix: "ic",
            args: |_| Vec::new(),
            steps: &[
                ("create.recorded", false, false),
                ("create.overlays", false, false),
                ("create.memory", false, false),
                ("create.switched", true, false),
            ],
        },
        CreateCase {
            prefix: "xd",
            args: |_| strings(&["--disk-only"]),
            steps: &[
                ("create.recorded", false, false),
                ("create.overlays", false, false),
                ("create.switched", true, true),
            ],
        },
        CreateCase {
            prefix: "xc",
            args: |mem| {
                strings(&[
                    "--memory",
                    "external",
                    "--memory-file",
                    mem.to_str().unwrap(),
                ])
            },
            steps: &[
                ("create.recorded", false, false),
                ("create.overlays", false, false),
                ("create.memory", false, false),
                ("create.switched", false, true),
            ],
        },
    ];
    let mut survivors: BTreeMap<String, u8> = BTreeMap::new();
    let mut pattern = 0x10u8;
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for case in &cases {
        for (step, survives, moves) in case.steps {
            seen.insert(step);
            pattern += 1;
            let name = format!("{}-{}", case.prefix, step.trim_start_matches("create."));
            let what = format!("create {name} crashed at {step}");
            write_vdb(&env, dom, pattern);
            let before = sources(&env, dom);
            let files = files(&env);
            let mem = env.images_dir().join(format!("{name}.mem"));
            let mut args = strings(&["create", dom, "--name", &name]);
            args.extend((case.args)(&mem));
            crash_at(&mut env, step, &args);
            assert_eq!(
                names(&env, dom).contains(&name),
                *survives,
                "{what}: rolled {}",
                if *survives { "forward" } else { "back" }
            );
            let after = sources(&env, dom);
            assert_eq!(
                before != after,
                *moves,
                "{what}: disks on new overlays: {before:?} -> {after:?}"
            );
            assert_consistent(&env, dom, &files, &what);
            assert_runs(&env, dom, &what);
            if *survives {
                survivors.insert(name, pattern);
            }
        }
    }
    // Offline: the domain shut off.
    env.client.ok(["domain", "destroy", dom]);
    for (step, survives, args) in [
        ("create.recorded", false, Vec::new()),
        ("create.disks", true, Vec::new()),
        ("create.disks", true, strings(&["--disk-only"])),
    ] {
        seen.insert(step);
        pattern += 1;
        let name = format!("off{pattern:x}-{}", step.trim_start_matches("create."));
        let what = format!("offline create {name} crashed at {step}");
        let top = sources(&env, dom)[1].clone();
        let files = files(&env);
        vmsnap_tests::qemu_io_write_pattern(&top, "qcow2", pattern, OFF, LEN);
        let mut a = strings(&["create", dom, "--name", &name]);
        a.extend(args);
        crash_at(&mut env, step, &a);
        assert_eq!(names(&env, dom).contains(&name), survives, "{what}");
        assert_consistent(&env, dom, &files, &what);
        assert_eq!(
            env.client.json(["domain", "info", dom])["state"],
            "shutoff",
            "{what}"
        );
        if survives {
            survivors.insert(name, pattern);
        }
    }
    let covered: BTreeSet<&str> = CREATE_STEPS.iter().copied().collect();
    assert_eq!(seen, covered, "every create step was crashed at");
    env.client.ok(["domain", "start", dom]);
    counting(&env, dom);
    revert_each(&env, dom, &survivors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_revert_crash_at_every_step_rolls_forward_or_back() {
    let mut env = TestEnv::start();
    let dom = "rr";
    running_guest(&env, dom);
    let mem = env.images_dir().join("xc.mem");
    write_vdb(&env, dom, 0x21);
    env.client.ok([
        "create",
        dom,
        "--name",
        "xc",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    // Internal checkpoint on the overlays, with the running definition: reverted in place.
    write_vdb(&env, dom, 0x22);
    env.client.ok(["create", dom, "--name", "ic"]);
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    // (snapshot, its pattern, step, current afterwards)
    let cases: &[(&str, u8, &str, Option<&str>)] = &[
        ("ic", 0x22, "revert.started", None),
        ("ic", 0x22, "revert.paused", None),
        ("ic", 0x22, "revert.loaded", Some("ic")),
        ("xc", 0x21, "revert.started", None),
        ("xc", 0x21, "revert.destroyed", Some("xc")),
        ("xc", 0x21, "revert.files", Some("xc")),
        ("xc", 0x21, "revert.defined", Some("xc")),
        ("xc", 0x21, "revert.loaded", Some("xc")),
    ];
    for (i, (snap, pattern, step, current)) in cases.iter().enumerate() {
        seen.insert(step);
        let what = format!("revert to {snap} crashed at {step}");
        // Move away from the snapshot first, so that a revert that happened shows. The
        // internal checkpoint keeps the running definition (reverted in place): new data only.
        if *snap == "xc" {
            env.client.ok(["revert", dom, "ic"]);
        }
        write_vdb(&env, dom, 0x40 + i as u8);
        let current_before = env.client.json(["domain", "info", dom])["current_snapshot"].clone();
        let files = files(&env);
        crash_at(
            &mut env,
            step,
            &strings(&["revert", dom, snap, "--running"]),
        );
        assert_consistent(&env, dom, &files, &what);
        assert_runs(&env, dom, &what);
        let info = env.client.json(["domain", "info", dom]);
        if let Some(c) = current {
            assert_eq!(info["current_snapshot"], *c, "{what}: rolled forward");
            assert!(
                vdb_shows(&env, dom, *pattern),
                "{what}: the snapshot's data"
            );
        } else if *step == "revert.started" {
            assert_eq!(
                info["current_snapshot"], current_before,
                "{what}: rolled back"
            );
            assert!(
                vdb_shows(&env, dom, 0x40 + i as u8),
                "{what}: the data as it was"
            );
        }
    }
    let covered: BTreeSet<&str> = REVERT_STEPS.iter().copied().collect();
    assert_eq!(seen, covered, "every revert step was crashed at");
    let survivors: BTreeMap<String, u8> =
        [("ic".to_string(), 0x22), ("xc".to_string(), 0x21)].into();
    revert_each(&env, dom, &survivors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_delete_crash_at_every_step_rolls_forward_or_back() {
    let mut env = TestEnv::start();
    let dom = "rd";
    running_guest(&env, dom);
    write_vdb(&env, dom, 0x31);
    env.client.ok(["create", dom, "--name", "keep"]);
    let mut survivors: BTreeMap<String, u8> = [("keep".to_string(), 0x31)].into();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    // (options of the snapshot to delete, step, the snapshot survives)
    let cases: &[(&[&str], &str, bool)] = &[
        (&[], "delete.started", true),
        (&[], "delete.tags", false),
        (&[], "delete.merged", false),
        (&[], "delete.uncataloged", false),
        (&["--disk-only"], "delete.started", true),
        (&["--disk-only"], "delete.tags", false),
        (&["--disk-only"], "delete.merging", false),
        (&["--disk-only"], "delete.merged", false),
        (&["--disk-only"], "delete.uncataloged", false),
        (&["--memory", "external"], "delete.uncataloged", false),
    ];
    for (i, (opts, step, survives)) in cases.iter().enumerate() {
        seen.insert(step);
        let pattern = 0x50 + i as u8;
        let name = format!("d{i}");
        let what = format!("delete of {name} ({opts:?}) crashed at {step}");
        write_vdb(&env, dom, pattern);
        let mut args = strings(&["create", dom, "--name", &name]);
        args.extend(strings(opts));
        let mem = env.images_dir().join(format!("{name}.mem"));
        if opts.contains(&"external") {
            args.extend(strings(&["--memory-file", mem.to_str().unwrap()]));
        }
        env.client.ok(&args);
        write_vdb(&env, dom, 0x70 + i as u8);
        let files = files(&env);
        crash_at(&mut env, step, &strings(&["delete", dom, &name]));
        assert_eq!(names(&env, dom).contains(&name), *survives, "{what}");
        if *step == "delete.merging" {
            // The active commit was left running (it waits for its completion): recovery
            // finished it before deciding.
            assert!(
                env.daemon
                    .log()
                    .contains("recovery: completing a ready block job"),
                "{what}: the block job left by the killed daemon was completed"
            );
        }
        assert_consistent(&env, dom, &files, &what);
        assert_runs(&env, dom, &what);
        if opts.contains(&"external") {
            assert!(!mem.exists(), "{what}: the memory file is removed");
        }
        if *survives {
            survivors.insert(name, pattern);
        }
    }
    let covered: BTreeSet<&str> = DELETE_STEPS.iter().copied().collect();
    assert_eq!(seen, covered, "every delete step was crashed at");
    revert_each(&env, dom, &survivors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_snapshot_file_deleted_is_marked_broken_and_refused() {
    let mut env = TestEnv::start();
    let dom = "rb";
    running_guest(&env, dom);
    write_vdb(&env, dom, 0x61);
    env.client.ok(["create", dom, "--name", "good"]);
    write_vdb(&env, dom, 0x62);
    let mem = env.images_dir().join("bad.mem");
    env.client.ok([
        "create",
        dom,
        "--name",
        "bad",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    std::fs::remove_file(&mem).unwrap();
    // On demand, before any restart: the check sees it.
    let out = env.client.run(["--json", "check", dom]);
    assert_eq!(
        out.code(),
        EXIT_CHECK_FAILED,
        "{}{}",
        out.stdout,
        out.stderr
    );
    env.daemon.restart();
    let info = env.client.json(["info", dom, "bad"]);
    assert_eq!(info["status"], "broken", "{info}");
    let out = env.client.run(["--json", "check", dom]);
    assert_eq!(
        out.code(),
        EXIT_CHECK_FAILED,
        "{}{}",
        out.stdout,
        out.stderr
    );
    let rows: Value = serde_json::from_str(&out.stdout).unwrap();
    let row = |n: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {n}: {rows}"))
    };
    assert_eq!(row("good")["verdict"], "ok", "{rows}");
    assert_eq!(row("bad")["verdict"], "broken", "{rows}");
    assert!(
        row("bad")["reason"]
            .as_str()
            .unwrap()
            .contains(mem.to_str().unwrap()),
        "the reason names the missing file: {rows}"
    );
    let e = env.client.err_json(["revert", dom, "bad"]);
    assert_eq!(e["error"], "org.vmsnap.VmSnap1.Error.InvalidState", "{e}");
    assert!(e["message"].as_str().unwrap().contains("broken"), "{e}");
    let (code, _) = env.client.err(["revert", dom, "bad"]);
    assert_eq!(code, EXIT_INVALID_STATE);
    assert_runs(&env, dom, "after the refused revert");
    let survivors: BTreeMap<String, u8> = [("good".to_string(), 0x61)].into();
    revert_each(&env, dom, &survivors);
    // The broken record can still be forgotten.
    env.client.ok(["delete", dom, "bad", "--metadata-only"]);
    assert_consistent(
        &env,
        dom,
        &files(&env),
        "after forgetting the broken record",
    );
    let _ = &mut env;
}

/// The pid of the domain's QEMU (domain id 1 of a fresh daemon).
fn qemu_pid(env: &TestEnv) -> i32 {
    std::fs::read_to_string(env.dir().join("run/domains/1/qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Starts an external-memory snapshot `name` into `mem` in a thread; the daemon's save is
/// slowed by its `migrate-bandwidth` hook. Returns once the save is under way, with the thread
/// whose result is the client's exit code and JSON error.
fn slow_save(env: &TestEnv, dom: &str, name: &str, mem: &Path) -> std::thread::JoinHandle<Value> {
    let client = Client::new(env.bus_address());
    let args = strings(&[
        "--json",
        "create",
        dom,
        "--name",
        name,
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    let t = std::thread::spawn(move || {
        let out = client.run(&args);
        assert_ne!(out.code(), 0, "the snapshot was to fail: {}", out.stdout);
        serde_json::from_str(out.stderr.trim())
            .unwrap_or_else(|e| panic!("no JSON error ({e}): {}", out.stderr))
    });
    poll_until(Deadline::step(), "the VM state save to start", || {
        std::fs::metadata(mem)
            .ok()
            .filter(|m| m.len() > 0)
            .map(|_| ())
    });
    t
}

/// After a failed save: the typed error, nothing left behind, the catalog as before.
fn assert_save_undone(
    env: &TestEnv,
    dom: &str,
    e: &Value,
    mem: &Path,
    before: &(BTreeSet<PathBuf>, Vec<PathBuf>, BTreeSet<String>),
    what: &str,
) {
    assert_eq!(
        e["error"], "org.vmsnap.VmSnap1.Error.QemuError",
        "{what}: {e}"
    );
    assert!(!mem.exists(), "{what}: the partial memory file is removed");
    assert_eq!(names(env, dom), before.2, "{what}: no new record");
    assert_eq!(
        sources(env, dom),
        before.1,
        "{what}: the definition is as before"
    );
    assert_consistent(env, dom, &before.0, what);
}

fn qemu_killed_during_save(signal: nix::sys::signal::Signal, dom: &str) {
    let bandwidth = format!("migrate-bandwidth={SLOW_BANDWIDTH}");
    let env = TestEnv::start_with_hooks(&[&bandwidth]);
    running_guest(&env, dom);
    let before = (files(&env), sources(&env, dom), names(&env, dom));
    let mem = env.images_dir().join("s.mem");
    let t = slow_save(&env, dom, "s", &mem);
    let pid = qemu_pid(&env);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    let e = t.join().expect("the client thread");
    let what = format!("QEMU ended by {signal} during the save");
    poll_until(
        Deadline::step(),
        &format!("{what}: the domain to stop"),
        || {
            let st = env.client.json(["domain", "info", dom])["state"].clone();
            (st == "crashed" || st == "shutoff").then_some(())
        },
    );
    assert_save_undone(&env, dom, &e, &mem, &before, &what);
    // The domain starts again and takes snapshots.
    env.client.ok(["domain", "start", dom]);
    env.client.ok(["create", dom, "--name", "after"]);
    assert_consistent(&env, dom, &before.0, &format!("{what}, then a snapshot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_qemu_killed_during_memory_save_leaves_nothing() {
    qemu_killed_during_save(nix::sys::signal::Signal::SIGKILL, "qk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_qmp_closed_by_quitting_qemu_during_memory_save_leaves_nothing() {
    // SIGTERM makes QEMU quit cleanly: it closes the QMP socket itself.
    qemu_killed_during_save(nix::sys::signal::Signal::SIGTERM, "qq");
}

/// A small tmpfs of our own, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
                .arg("vmsnap-test-small")
                .arg(dir),
            Deadline::step(),
        );
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_disk_full_during_memory_save_leaves_nothing_and_guest_runs() {
    let env = TestEnv::start();
    let dom = "df";
    running_guest(&env, dom);
    // The 64 MiB counter guest's state takes about 870 KiB: 256 KiB cannot hold it.
    let small = SmallFs::mount(&env.dir().join("small"), "256k");
    let before = (files(&env), sources(&env, dom), names(&env, dom));
    let mem = small.0.join("full.mem");
    let out = env.client.run([
        "--json",
        "create",
        dom,
        "--name",
        "full",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    assert_ne!(out.code(), 0, "the save cannot fit: {}", out.stdout);
    let e: Value = serde_json::from_str(out.stderr.trim()).unwrap();
    assert_save_undone(&env, dom, &e, &mem, &before, "disk full");
    assert_eq!(
        std::fs::read_dir(&small.0).unwrap().count(),
        0,
        "nothing is left on the full file system"
    );
    assert_runs(&env, dom, "after the full disk");
    drop(small);
}

/// Deletes whose data goes elsewhere by the other merge kinds, killed at their merge steps: a
/// snapshot whose image backs two branches (`block-stream` into the running one, a safe
/// `qemu-img rebase` of the other) and, on the shut-off guest, a middle snapshot merged by
/// `qemu-img commit`. Every one rolls forward, and the data of every branch stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_delete_streaming_and_offline_merges_crashed_roll_forward() {
    let mut env = TestEnv::start();
    let dom = "rm";
    running_guest(&env, dom);
    write_vdb(&env, dom, 0x41);
    env.client
        .ok(["create", dom, "--name", "s0", "--disk-only"]);
    write_vdb(&env, dom, 0x42);
    env.client
        .ok(["create", dom, "--name", "s1", "--disk-only"]);
    let old_line = sources(&env, dom)[1].clone();
    write_vdb(&env, dom, 0x43);
    env.client.ok(["revert", dom, "s1", "--running"]);
    write_vdb(&env, dom, 0x44);

    // s1's image backs the running branch and the old line: streamed and rebased.
    let what = "delete of s1 (two branches) crashed at delete.merging";
    let before = files(&env);
    crash_at(&mut env, "delete.merging", &strings(&["delete", dom, "s1"]));
    assert!(!names(&env, dom).contains("s1"), "{what}: rolled forward");
    assert_consistent(&env, dom, &before, what);
    assert_runs(&env, dom, what);
    assert!(vdb_shows(&env, dom, 0x44), "{what}: the running branch");
    assert!(
        !old_line.exists(),
        "{what}: the old line, reachable through s1 only, went with it"
    );

    // Shut off: middle snapshots merged by qemu-img commit, killed before and after.
    env.client.ok(["domain", "destroy", dom]);
    let mut survivors: BTreeMap<String, u8> = [("s0".to_string(), 0x41)].into();
    for (i, step) in ["delete.tags", "delete.merged"].iter().enumerate() {
        let (mid, last) = (format!("m{i}"), format!("l{i}"));
        let (p_mid, p_last) = (0x51 + 2 * i as u8, 0x52 + 2 * i as u8);
        let what = format!("offline delete of {mid} crashed at {step}");
        vmsnap_tests::qemu_io_write_pattern(&sources(&env, dom)[1], "qcow2", p_mid, OFF, LEN);
        env.client
            .ok(["create", dom, "--name", &mid, "--disk-only"]);
        vmsnap_tests::qemu_io_write_pattern(&sources(&env, dom)[1], "qcow2", p_last, OFF, LEN);
        env.client
            .ok(["create", dom, "--name", &last, "--disk-only"]);
        let before = files(&env);
        crash_at(&mut env, step, &strings(&["delete", dom, &mid]));
        assert!(!names(&env, dom).contains(&mid), "{what}: rolled forward");
        assert!(names(&env, dom).contains(&last), "{what}");
        assert_consistent(&env, dom, &before, &what);
        assert_eq!(
            env.client.json(["domain", "info", dom])["state"],
            "shutoff",
            "{what}"
        );
        survivors.insert(last, p_last);
    }
    env.client.ok(["domain", "start", dom]);
    revert_each(&env, dom, &survivors);
}

/// A revert to an internal checkpoint whose configuration differs from the running guest's
/// (a disk attached since) replaces the guest's QEMU (`--force`): killed at each of its steps,
/// it rolls forward to the snapshot's configuration, data and RAM, or back before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_revert_replacing_qemu_crashed_rolls_forward_or_back() {
    let mut env = TestEnv::start();
    let dom = "rq";
    running_guest(&env, dom);
    write_vdb(&env, dom, 0x61);
    env.client.ok(["create", dom, "--name", "ib"]);
    let extra = env.images_dir().join("extra.raw");
    vmsnap_tests::qemu_img_create(&extra, "raw", "8M");
    let disk = env.write_xml(
        "disk.xml",
        &vmsnap_tests::DiskSpec::new(&extra, "raw", "sdb").xml(),
    );
    // (step, current afterwards)
    let cases: &[(&str, Option<&str>)] = &[
        ("revert.started", None),
        ("revert.destroyed", Some("ib")),
        ("revert.defined", Some("ib")),
        ("revert.loaded", Some("ib")),
    ];
    for (i, (step, current)) in cases.iter().enumerate() {
        let what = format!("revert to ib replacing QEMU crashed at {step}");
        env.client
            .ok(["domain", "attach-disk", dom, disk.to_str().unwrap()]);
        let pattern = 0x70 + i as u8;
        write_vdb(&env, dom, pattern);
        let files = files(&env);
        crash_at(
            &mut env,
            step,
            &strings(&["revert", dom, "ib", "--force", "--running"]),
        );
        assert_consistent(&env, dom, &files, &what);
        assert_runs(&env, dom, &what);
        let xml = env.client.ok(["domain", "dumpxml", dom]);
        match current {
            Some(c) => {
                let info = env.client.json(["domain", "info", dom]);
                assert_eq!(info["current_snapshot"], *c, "{what}: rolled forward");
                assert!(vdb_shows(&env, dom, 0x61), "{what}: the snapshot's data");
                assert!(!xml.contains("extra.raw"), "{what}: its configuration");
            }
            None => {
                assert!(vdb_shows(&env, dom, pattern), "{what}: the data as it was");
                assert!(
                    xml.contains("extra.raw"),
                    "{what}: the configuration as it was"
                );
                env.client.ok(["domain", "detach-disk", dom, "sdb"]);
            }
        }
    }
    revert_each(&env, dom, &[("ib".to_string(), 0x61)].into());
}
