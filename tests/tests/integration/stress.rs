//! Load and concurrency: snapshot operations on one domain are serialized (a second one gets
//! `Error.Busy`, exit code 5), different domains proceed in parallel, and a bounded stress run
//! of concurrent clients doing mixed create / revert / delete / list on three running domains
//! leaves every remaining snapshot with its own data and leaks nothing (files, jobs, QEMU
//! processes, daemon memory).
//!
//! The model: each domain has a data lock in the test. A create writes a fresh pattern to vdb
//! and takes the snapshot under it, and a revert (to an internal checkpoint, checked at once)
//! runs under it too, so the pattern each snapshot must hold is known exactly. Deletes and
//! listings run without it, from other threads, so they race with the creates and reverts on
//! the same domain: those races end in `Busy` (counted, expected) or, for a delete of a
//! snapshot someone else deleted first, in `NoSuchSnapshot`.

use super::revert_delete::{hmp, source, top_node};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vmsnap_dbus::proxy::JobProxy;
use vmsnap_tests::{
    Deadline, DiskSpec, TestEnv, counter_boot_qcow2, domain_xml, poll_until_async, qemu_img_create,
    qemu_io_verify_pattern,
};

const OFF: u64 = 512 * 1024;
/// How long the concurrent clients run.
const STRESS_RUN: Duration = Duration::from_secs(15);
/// How long a job object may stay after it finished (the daemon's `JOB_LINGER`, 10 s) plus
/// slack for a loaded machine.
const JOB_GONE: Duration = Duration::from_secs(30);
/// Exit codes of the client (README).
const EXIT_NOT_FOUND: i32 = 3;
const EXIT_BUSY: i32 = 5;
const EXIT_UNSUPPORTED: i32 = 8;
/// How much the daemon's resident memory may grow between the warm-up and the end of the run.
const RSS_GROWTH_KIB: u64 = 12 * 1024;

fn setup(env: &TestEnv, name: &str) -> PathBuf {
    let a = env.images_dir().join(format!("{name}-vda.qcow2"));
    counter_boot_qcow2(&a);
    let b = env.images_dir().join(format!("{name}-vdb.qcow2"));
    qemu_img_create(&b, "qcow2", "16M");
    let xml = domain_xml(
        name,
        &[
            DiskSpec::new(&a, "qcow2", "vda"),
            DiskSpec::new(&b, "qcow2", "vdb"),
        ],
    );
    let f = env.write_xml(&format!("{name}.xml"), &xml);
    env.client.ok(["domain", "define", f.to_str().unwrap()]);
    env.client.ok(["domain", "start", name]);
    b
}

/// Runs a `qemu-io` command on vdb's active node; a delete committing the top overlay away
/// concurrently can rename that node, so the node is looked up again on such a failure.
fn qemu_io_vdb(env: &TestEnv, dom: &str, cmd: &str) -> String {
    let deadline = Deadline::step();
    loop {
        let node = top_node(env, dom, "vdb");
        let out = hmp(env, dom, &format!("qemu-io {node} \"{cmd}\""));
        if !out.contains("not found") && !out.contains("Cannot find") || deadline.expired() {
            return out;
        }
    }
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

fn daemon_rss_kib(env: &TestEnv) -> u64 {
    let pid = env.daemon.pid().expect("the daemon runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The QEMU processes whose command line names a file under `dir`.
fn qemu_processes(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("qemu-system") && c.contains(&dir)
            })
        })
        .collect()
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.insert(e.path());
            }
        }
    }
    out
}

/// `image` and every file of its backing chain.
fn chain_of(image: &Path) -> Vec<PathBuf> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img info {}", image.display());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["filename"].as_str().map(PathBuf::from))
        .collect()
}

/// The files the catalog and the definitions reference (with their backing chains).
fn referenced_files(env: &TestEnv, domains: &[&str]) -> BTreeSet<PathBuf> {
    let mut direct = Vec::new();
    for dom in domains {
        for d in env.client.json(["domain", "info", dom])["disks"]
            .as_array()
            .unwrap()
        {
            direct.push(PathBuf::from(d["file"].as_str().unwrap()));
        }
        direct.extend(crate::snapshots::listed_files(
            &env.client.json(["list", dom]),
        ));
    }
    let mut all = BTreeSet::new();
    for f in direct {
        if f.extension().is_some_and(|e| e == "qcow2") && f.exists() {
            all.extend(chain_of(&f));
        }
        all.insert(f);
    }
    all
}

/// One domain's part of the model.
struct Dom {
    name: &'static str,
    /// Held for a pattern write plus create, and for a revert plus its check.
    data: Mutex<()>,
    /// Remaining snapshots and the vdb pattern each holds.
    snaps: Mutex<BTreeMap<String, (u8, bool)>>,
    next_pattern: AtomicUsize,
}

#[derive(Default)]
struct Counts {
    ok: AtomicUsize,
    busy: AtomicUsize,
    gone: AtomicUsize,
    /// Deletes of an external snapshot whose overlay holds later internal snapshots (refused
    /// as Unsupported: merging the overlay away would lose them).
    kept: AtomicUsize,
}

/// A small deterministic generator (xorshift), so that a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % n as u64).unwrap()
    }
}

/// Sorts a client's result: Ok, or an expected refusal (counted), or a failure (panics).
fn outcome(counts: &Counts, what: &str, r: Result<String, (i32, String)>) -> bool {
    match r {
        Ok(_) => {
            counts.ok.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err((EXIT_BUSY, _)) => {
            counts.busy.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err((EXIT_NOT_FOUND, _)) => {
            counts.gone.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err((EXIT_UNSUPPORTED, err)) if err.contains("keep their state in its overlay") => {
            counts.kept.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err((code, err)) => panic!("{what}: exit {code}: {err}"),
    }
}

fn run(env: &TestEnv, args: &[String]) -> Result<String, (i32, String)> {
    let out = env.client.run(args);
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err((out.code(), out.stderr))
    }
}

/// Writes a fresh pattern to vdb and takes snapshot `name` (an internal checkpoint, or an
/// external disk-only snapshot) under the domain's data lock.
fn create(env: &TestEnv, d: &Dom, counts: &Counts, name: &str, external: bool) {
    let _data = d.data.lock().unwrap();
    let pattern = u8::try_from(d.next_pattern.fetch_add(1, Ordering::Relaxed) % 250 + 1).unwrap();
    let out = qemu_io_vdb(env, d.name, &format!("write -P 0x{pattern:02x} {OFF} 4096"));
    assert!(!out.contains("rror"), "{}: {out}", d.name);
    let mut args: Vec<String> = ["create", d.name, "--name", name]
        .map(String::from)
        .to_vec();
    if external {
        args.push("--disk-only".into());
    }
    if outcome(counts, &format!("create {name}"), run(env, &args)) {
        d.snaps
            .lock()
            .unwrap()
            .insert(name.to_string(), (pattern, external));
    }
}

/// Reverts to a random internal checkpoint and checks vdb's data at once.
fn revert(env: &TestEnv, d: &Dom, counts: &Counts, rng: &mut Rng) {
    let _data = d.data.lock().unwrap();
    let internal: Vec<(String, u8)> = d
        .snaps
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, (_, external))| !external)
        .map(|(n, (p, _))| (n.clone(), *p))
        .collect();
    if internal.is_empty() {
        return;
    }
    let (name, pattern) = &internal[rng.below(internal.len())];
    let args = ["revert", d.name, name, "--running"].map(String::from);
    if outcome(counts, &format!("revert {name}"), run(env, &args)) {
        let out = qemu_io_vdb(env, d.name, &format!("read -P 0x{pattern:02x} {OFF} 4096"));
        assert!(
            !out.contains("fail") && !out.contains("rror"),
            "{}: after reverting to {name}, vdb must hold 0x{pattern:02x}: {out}",
            d.name
        );
    }
}

/// Deletes a random snapshot (racing with everything else on the domain).
fn delete(env: &TestEnv, d: &Dom, counts: &Counts, rng: &mut Rng) {
    let names: Vec<String> = d.snaps.lock().unwrap().keys().cloned().collect();
    if names.is_empty() {
        return;
    }
    let name = &names[rng.below(names.len())];
    let args = ["delete", d.name, name].map(String::from);
    if outcome(counts, &format!("delete {name}"), run(env, &args)) {
        d.snaps.lock().unwrap().remove(name);
    }
}

/// One round of every operation on every domain, one domain after the other.
fn warm_up(env: &TestEnv, doms: &[Dom], counts: &Counts) {
    let mut rng = Rng(7);
    for d in doms {
        create(env, d, counts, &format!("{}-warm-i", d.name), false);
        create(env, d, counts, &format!("{}-warm-e", d.name), true);
        revert(env, d, counts, &mut rng);
        delete(env, d, counts, &mut rng);
        names(env, d.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_concurrent_clients_on_three_domains_keep_every_snapshot_and_leak_nothing() {
    let env = TestEnv::start();
    let doms: Vec<Dom> = ["sa", "sb", "sc"]
        .into_iter()
        .map(|name| Dom {
            name,
            data: Mutex::new(()),
            snaps: Mutex::new(BTreeMap::new()),
            next_pattern: AtomicUsize::new(0),
        })
        .collect();
    let mut originals = Vec::new();
    for d in &doms {
        let vdb = setup(&env, d.name);
        originals.push(env.images_dir().join(format!("{}-vda.qcow2", d.name)));
        originals.push(vdb);
    }
    let counts = Counts::default();
    warm_up(&env, &doms, &counts);
    let rss_warm = daemon_rss_kib(&env);
    assert_eq!(
        qemu_processes(env.dir()).len(),
        doms.len(),
        "one QEMU per running domain"
    );

    let started = Instant::now();
    std::thread::scope(|s| {
        for (di, d) in doms.iter().enumerate() {
            // Two clients creating and reverting, one deleting and listing.
            for t in 0..2 {
                let (env, counts) = (&env, &counts);
                s.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (di * 16 + t) as u64);
                    let mut i = 0;
                    while started.elapsed() < STRESS_RUN {
                        i += 1;
                        match rng.below(10) {
                            0..=4 => {
                                create(env, d, counts, &format!("{}-{t}-{i}", d.name), false);
                            }
                            5..=6 => {
                                create(env, d, counts, &format!("{}-{t}-{i}", d.name), true);
                            }
                            _ => revert(env, d, counts, &mut rng),
                        }
                    }
                });
            }
            let (env, counts) = (&env, &counts);
            s.spawn(move || {
                let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ di as u64);
                while started.elapsed() < STRESS_RUN {
                    let listed = names(env, d.name);
                    assert!(
                        listed.iter().all(|n| n.starts_with(d.name)),
                        "{}: a listing shows only the domain's snapshots: {listed:?}",
                        d.name
                    );
                    delete(env, d, counts, &mut rng);
                }
            });
        }
    });
    let (ok, busy, gone) = (
        counts.ok.load(Ordering::Relaxed),
        counts.busy.load(Ordering::Relaxed),
        counts.gone.load(Ordering::Relaxed),
    );
    eprintln!(
        "stress: {ok} operations succeeded, {busy} refused as Busy, {gone} found the snapshot \
         gone, {} deletes refused to keep internal snapshots in an overlay",
        counts.kept.load(Ordering::Relaxed)
    );
    assert!(
        ok >= 3 * doms.len(),
        "the run did work on every domain ({ok} successes)"
    );

    // Nothing left running behind the clients' backs.
    assert_eq!(
        qemu_processes(env.dir()).len(),
        doms.len(),
        "still one QEMU per domain after the run"
    );
    let rss_after = daemon_rss_kib(&env);
    eprintln!(
        "stress: daemon VmRSS {rss_warm} KiB after the warm-up, {rss_after} KiB after the run"
    );
    assert!(
        rss_after <= rss_warm + RSS_GROWTH_KIB,
        "the daemon's memory grew from {rss_warm} KiB to {rss_after} KiB"
    );

    // Files: every file in the images and state directories is referenced, except the
    // domains' original images (the caller's files: the daemon never removes them), the
    // catalog and the definitions the test wrote.
    let names_of: Vec<&str> = doms.iter().map(|d| d.name).collect();
    let referenced = referenced_files(&env, &names_of);
    let originals: BTreeSet<PathBuf> = originals.into_iter().collect();
    let stray: Vec<PathBuf> = files_under(&env.images_dir())
        .into_iter()
        .chain(files_under(env.daemon.state_dir()))
        .filter(|f| !referenced.contains(f) && !originals.contains(f))
        .filter(|f| {
            let n = f.file_name().unwrap().to_string_lossy();
            !n.starts_with("catalog.sqlite3") && !n.ends_with(".xml")
        })
        .collect();
    assert!(stray.is_empty(), "files nothing references: {stray:?}");

    // Every remaining snapshot holds its own data: the catalog lists exactly the model's
    // snapshots, and each, reverted (paused, so no guest code runs), has its pattern on vdb.
    std::thread::scope(|s| {
        for d in &doms {
            let env = &env;
            s.spawn(move || {
                let snaps = d.snaps.lock().unwrap().clone();
                assert_eq!(
                    names(env, d.name),
                    snaps.keys().cloned().collect::<BTreeSet<_>>(),
                    "{}: the catalog lists exactly the remaining snapshots",
                    d.name
                );
                for (name, (pattern, _)) in &snaps {
                    env.client.ok(["revert", d.name, name, "--paused"]);
                    env.client.ok(["domain", "destroy", d.name]);
                    let vdb = source(env, d.name, "vdb");
                    assert!(
                        qemu_io_verify_pattern(&vdb, "qcow2", *pattern, OFF, 4096),
                        "{}: snapshot {name} must hold 0x{pattern:02x} on vdb",
                        d.name
                    );
                }
                if snaps.is_empty() {
                    env.client.ok(["domain", "destroy", d.name]);
                }
            });
        }
    });
    assert!(
        qemu_processes(env.dir()).is_empty(),
        "no QEMU is left after every domain was destroyed"
    );

    // Jobs: every job object goes away after it lingered.
    let conn = env.connect().await;
    let om = zbus::fdo::ObjectManagerProxy::builder(&conn)
        .destination(vmsnap_dbus::names::BUS_NAME)
        .path(vmsnap_dbus::names::ROOT_PATH)
        .build()
        .await
        .unwrap();
    poll_until_async(
        Deadline::after(JOB_GONE),
        "every job object to go",
        || async {
            let objects = om.get_managed_objects().await.unwrap();
            (!objects.keys().any(|p| p.as_str().contains("/job/"))).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_other_domain_proceed_while_one_domain_is_busy() {
    // A slow external memory save on domain A (bandwidth throttled by the test hook).
    let env = TestEnv::start_with_hooks(&["migrate-bandwidth=4096"]);
    setup(&env, "pa");
    setup(&env, "pb");
    let mem = env.images_dir().join("pa.mem");
    let v = env.client.json([
        "create",
        "pa",
        "--name",
        "slow",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
        "--no-wait",
    ]);
    let conn = env.connect().await;
    let job = JobProxy::builder(&conn)
        .path(zbus::OwnedObjectPath::try_from(v["job"].as_str().unwrap().to_string()).unwrap())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    assert!(!job.finished().await.unwrap(), "A's snapshot runs");
    // The same domain refuses a second operation ...
    let (code, err) = env
        .client
        .err(["create", "pa", "--name", "other", "--disk-only"]);
    assert_eq!(code, EXIT_BUSY, "{err}");
    // ... while another domain does a whole create / revert / delete meanwhile.
    env.client.ok(["create", "pb", "--name", "b1"]);
    env.client.ok(["revert", "pb", "b1"]);
    env.client.ok(["delete", "pb", "b1"]);
    assert!(
        !job.finished().await.unwrap(),
        "B's operations completed while A's snapshot still ran"
    );
    job.cancel().await.unwrap();
    poll_until_async(Deadline::step(), "A's snapshot to be cancelled", || async {
        job.finished().await.unwrap().then_some(())
    })
    .await;
    assert!(!names(&env, "pa").contains("slow"));
    assert!(!mem.exists(), "the cancelled save left no memory file");
    // A is free again.
    env.client
        .ok(["create", "pa", "--name", "after", "--disk-only"]);
}
