//! Snapshot failures through the real daemon, bus, QEMU and client. A snapshot failed by the
//! daemon's `fail-at` test hook at each step of each kind leaves files, catalog, internal
//! snapshots and guest state as they were; after the disk transaction the guest keeps its new
//! overlays and the definition names them. Also: cancelling an external memory save through
//! its job, `<domainsnapshot>` documents, and keeping the active file name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vmsnap_dbus::proxy::JobProxy;
use vmsnap_tests::{
    Deadline, TestEnv, poll_until, poll_until_async, qemu_img_info, qemu_img_snapshots,
    qemu_io_verify_pattern, qemu_io_write_pattern,
};

use crate::snapshots::{Dom, MIB, OFF_A, files_in, specs, two_disks, wait_counting};

const AFTER_OVERLAYS: &str = "after-overlays";
const AFTER_MEMORY: &str = "after-memory";
const AFTER_TRANSACTION: &str = "after-transaction";
const AFTER_DISKS: &str = "after-disks";

/// Exit code of `vmsnap` for an internal fault (`Failed`), which the hook's error is.
const EXIT_FAILED: i32 = 1;
/// Exit code of `vmsnap` for `InvalidArgument`.
const EXIT_INVALID_ARGUMENT: i32 = 7;
/// Exit code of `vmsnap` for `Unsupported`.
const EXIT_UNSUPPORTED: i32 = 8;

/// Bandwidth of the slowed external memory save, bytes per second. A 64 MiB counter guest
/// sends about 870 KiB (SeaBIOS, option ROMs, headers of the zero pages; measured with QEMU
/// 7.2), so the save would last about 7 s; unthrottled it takes 0.3 s.
const SLOW_BANDWIDTH: u64 = 128 * 1024;

/// Whether `path` is a qcow2 image (by its magic).
fn is_qcow2(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb"
}

/// Internal snapshot tags of every qcow2 image in `dir`.
fn tags_in(dir: &Path) -> BTreeMap<PathBuf, Vec<String>> {
    files_in(dir)
        .into_iter()
        .filter(|f| is_qcow2(f))
        .map(|f| {
            let tags = qemu_img_snapshots(&f).into_iter().map(|(_, t)| t).collect();
            (f, tags)
        })
        .collect()
}

/// The disk sources of a domain definition, in definition order.
fn sources(xml: &str) -> Vec<PathBuf> {
    xml.split("<source file=")
        .skip(1)
        .map(|rest| {
            let quote = rest.chars().next().expect("a quoted source");
            let value = &rest[1..];
            PathBuf::from(&value[..value.find(quote).expect("a closing quote")])
        })
        .collect()
}

/// The guest's run state as QEMU reports it.
fn qemu_status(env: &TestEnv, dom: &str) -> String {
    let v = env
        .client
        .json(["domain", "monitor", dom, r#"{"execute":"query-status"}"#]);
    v["status"].as_str().unwrap_or_default().to_string()
}

/// Asserts that the guest is in `want` (`running` or `paused`) for the daemon and for QEMU,
/// and that a running guest's vCPUs really run.
fn assert_guest_state(env: &TestEnv, d: &Dom<'_>, dom: &str, want: &str, what: &str) {
    poll_until(
        Deadline::step(),
        &format!("{what}: the guest to be {want}"),
        || (d.info()["state"] == want).then_some(()),
    );
    assert_eq!(qemu_status(env, dom), want, "{what}: QEMU's run state");
    if want == "running" {
        let c = d.counter();
        poll_until(
            Deadline::step(),
            &format!("{what}: the guest to count on"),
            || (d.counter() != c).then_some(()),
        );
    }
}

/// Pauses or resumes the guest so that it is in `want`.
fn set_state(env: &TestEnv, d: &Dom<'_>, dom: &str, want: &str) {
    let now = d.info()["state"].as_str().unwrap_or_default().to_string();
    match (now.as_str(), want) {
        ("running", "paused") => {
            d.vmsnap(&["domain", "pause", dom]);
        }
        ("paused", "running") => {
            d.vmsnap(&["domain", "resume", dom]);
        }
        _ => {}
    }
    assert_guest_state(env, d, dom, want, "before the snapshot");
}

/// What a failed snapshot must leave as it was.
struct Baseline {
    files: Vec<PathBuf>,
    list: Value,
    sources: Vec<PathBuf>,
    tags: BTreeMap<PathBuf, Vec<String>>,
}

impl Baseline {
    fn take(env: &TestEnv, d: &Dom<'_>, dom: &str) -> Self {
        Self {
            files: files_in(&env.images_dir()),
            list: d.snapshots(),
            sources: sources(&d.vmsnap(&["domain", "dumpxml", dom])),
            tags: tags_in(&env.images_dir()),
        }
    }

    /// Checks everything after a failure. `switched` disks were expected to move to new
    /// overlays (a failure after the transaction), none otherwise.
    fn check_after_failure(
        &self,
        env: &TestEnv,
        d: &Dom<'_>,
        dom: &str,
        switched: usize,
        what: &str,
    ) {
        assert_eq!(
            d.snapshots(),
            self.list,
            "{what}: the snapshot list changed"
        );
        let now = sources(&d.vmsnap(&["domain", "dumpxml", dom]));
        assert_eq!(
            now.len(),
            self.sources.len(),
            "{what}: disks in the definition"
        );
        let moved: Vec<(&PathBuf, &PathBuf)> = self
            .sources
            .iter()
            .zip(&now)
            .filter(|(old, new)| old != new)
            .collect();
        assert_eq!(
            moved.len(),
            switched,
            "{what}: disks on new overlays: {:?} -> {now:?}",
            self.sources
        );
        let mut want_files = self.files.clone();
        let mut want_tags = self.tags.clone();
        for (old, new) in &moved {
            assert_eq!(
                new.parent(),
                Some(env.images_dir().as_path()),
                "{what}: overlay {}",
                new.display()
            );
            let info = qemu_img_info(new);
            assert_eq!(info[0]["format"], "qcow2", "{what}: {info}");
            assert_eq!(
                info[0]["backing-filename"].as_str(),
                old.to_str(),
                "{what}: the overlay's backing file"
            );
            want_files.push(new.to_path_buf());
            want_tags.insert(new.to_path_buf(), Vec::new());
        }
        want_files.sort();
        assert_eq!(
            files_in(&env.images_dir()),
            want_files,
            "{what}: files left behind or missing"
        );
        assert_eq!(
            tags_in(&env.images_dir()),
            want_tags,
            "{what}: internal snapshots left behind"
        );
    }
}

/// A snapshot kind on the running two-disk guest, and the steps it passes through.
struct Kind {
    dom: &'static str,
    /// Options of `vmsnap create`, given the memory file to use.
    args: fn(&Path) -> Vec<String>,
    /// Steps that fail before the disk transaction.
    early: &'static [&'static str],
    /// Disks that switch to new overlays in the transaction.
    switched: usize,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Fails a snapshot of `kind` at every step, with the guest running and paused, and checks
/// each time what is left; then a snapshot of the same kind succeeds.
fn fail_every_step(kind: Kind) {
    let dom = kind.dom;
    let states = ["running", "paused"];
    let case = |step: &str, state: &str| format!("{step}-{state}");
    let mut cases: Vec<(&str, &str)> = Vec::new();
    for step in kind.early {
        for state in states {
            cases.push((step, state));
        }
    }
    // The transaction changes the definition: last, so the early cases start from the same one.
    for state in states {
        cases.push((AFTER_TRANSACTION, state));
    }
    let hooks: Vec<String> = cases
        .iter()
        .map(|(step, state)| format!("fail-at={step}:{}", case(step, state)))
        .collect();
    let hooks: Vec<&str> = hooks.iter().map(String::as_str).collect();
    let env = TestEnv::start_with_hooks(&hooks);
    let (a, b) = two_disks(&env, "raw");
    let d = Dom::define(&env, dom, &specs(&a, &b, "raw"), 64);
    d.vmsnap(&["domain", "start", dom]);
    wait_counting(&d);
    d.write("vda", 0xa1, OFF_A, 4096);
    d.write("vdb", 0xb1, 0, MIB);
    for (step, state) in &cases {
        let name = case(step, state);
        let what = format!("{dom} failing at {step} while {state}");
        set_state(&env, &d, dom, state);
        let before = Baseline::take(&env, &d, dom);
        let mem = env.images_dir().join(format!("{name}.mem"));
        let mut args = strings(&["create", dom, "--name", &name]);
        args.extend((kind.args)(&mem));
        let (code, err) = env.client.err(&args);
        assert_eq!(code, EXIT_FAILED, "{what}: {err}");
        assert!(
            err.contains(&format!("test hook: failing at step {step}")),
            "{what}: {err}"
        );
        let switched = if *step == AFTER_TRANSACTION {
            kind.switched
        } else {
            0
        };
        if switched > 0 {
            assert!(
                err.contains("not recorded") && err.contains("new overlays"),
                "{what}: the error must say that the disks moved on: {err}"
            );
        }
        before.check_after_failure(&env, &d, dom, switched, &what);
        assert_guest_state(&env, &d, dom, state, &what);
    }
    // The data written before is still what the guest's disks show.
    for (target, pattern, offset, len) in [("vda", 0xa1, OFF_A, 4096), ("vdb", 0xb1, 0, MIB)] {
        let xml = d.vmsnap(&["domain", "dumpxml", dom]);
        let i = usize::from(target == "vdb");
        let image = &sources(&xml)[i];
        let format = if is_qcow2(image) { "qcow2" } else { "raw" };
        assert!(
            qemu_io_verify_pattern(image, format, pattern, offset, len),
            "{dom}: the data of {target} survived"
        );
    }
    // A snapshot that nothing fails goes through.
    set_state(&env, &d, dom, "running");
    let before = d.snapshots().as_array().unwrap().len();
    let mem = env.images_dir().join("ok.mem");
    let mut args = strings(&["create", dom, "--name", "ok"]);
    args.extend((kind.args)(&mem));
    let v = env.client.json(&args);
    assert_eq!(v["name"], "ok");
    assert_eq!(v["current"], true);
    assert_eq!(d.snapshots().as_array().unwrap().len(), before + 1);
    assert_guest_state(&env, &d, dom, "running", "after the good snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_faults_internal_checkpoint_rolls_back_at_every_step() {
    fail_every_step(Kind {
        dom: "fic",
        args: |_| {
            strings(&[
                "--memory",
                "internal",
                "--disk",
                "vda=internal",
                "--disk",
                "vdb=external",
            ])
        },
        early: &[AFTER_OVERLAYS, AFTER_MEMORY],
        switched: 1,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_faults_external_disk_only_rolls_back_at_every_step() {
    fail_every_step(Kind {
        dom: "fdo",
        args: |_| strings(&["--disk-only"]),
        early: &[AFTER_OVERLAYS],
        switched: 2,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_faults_mixed_disks_roll_back_at_every_step() {
    fail_every_step(Kind {
        dom: "fmx",
        args: |_| {
            strings(&[
                "--disk-only",
                "--disk",
                "vda=internal",
                "--disk",
                "vdb=external",
            ])
        },
        early: &[AFTER_OVERLAYS],
        switched: 1,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_faults_external_memory_rolls_back_at_every_step() {
    fail_every_step(Kind {
        dom: "fxm",
        args: |mem| {
            strings(&[
                "--memory",
                "external",
                "--memory-file",
                mem.to_str().unwrap(),
            ])
        },
        early: &[AFTER_OVERLAYS, AFTER_MEMORY],
        switched: 2,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_faults_offline_roll_back_after_the_disks() {
    let env =
        TestEnv::start_with_hooks(&["fail-at=after-disks:off-cp", "fail-at=after-disks:off-keep"]);
    let (a, b) = two_disks(&env, "raw");
    let d = Dom::define(&env, "foff", &specs(&a, &b, "raw"), 64);
    qemu_io_write_pattern(&a, "qcow2", 0xa1, OFF_A, 4096);
    qemu_io_write_pattern(&b, "raw", 0xb1, 0, 4096);
    let renamed = env.images_dir().join("vdb.keep.raw");
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("off-cp", Vec::new()),
        (
            "off-keep",
            strings(&[
                "--disk-only",
                "--keep-active-name",
                "--disk",
                "vda=no",
                "--disk",
                &format!("vdb=external:{}", renamed.display()),
            ]),
        ),
    ];
    for (name, extra) in cases {
        let what = format!("offline {name}");
        let before = Baseline::take(&env, &d, "foff");
        let mut args = strings(&["create", "foff", "--name", name]);
        args.extend(extra);
        let (code, err) = env.client.err(&args);
        assert_eq!(code, EXIT_FAILED, "{what}: {err}");
        assert!(
            err.contains(&format!("test hook: failing at step {AFTER_DISKS}")),
            "{what}: {err}"
        );
        before.check_after_failure(&env, &d, "foff", 0, &what);
        assert_eq!(d.info()["state"], "shutoff", "{what}");
        assert_eq!(
            qemu_img_info(&b)[0]["format"],
            "raw",
            "{what}: vdb is its raw image again"
        );
        assert!(qemu_io_verify_pattern(&a, "qcow2", 0xa1, OFF_A, 4096));
        assert!(qemu_io_verify_pattern(&b, "raw", 0xb1, 0, 4096));
    }
    let v = env.client.json(["create", "foff", "--name", "off-ok"]);
    assert_eq!(v["state"], "shutoff");
    assert_eq!(
        qemu_img_snapshots(&a)
            .into_iter()
            .map(|(_, t)| t)
            .collect::<Vec<_>>(),
        vec!["off-ok".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_faults_cancel_of_external_memory_save_undoes_everything() {
    let bandwidth = format!("migrate-bandwidth={SLOW_BANDWIDTH}");
    let env = TestEnv::start_with_hooks(&[&bandwidth]);
    let (a, b) = two_disks(&env, "raw");
    let d = Dom::define(&env, "fcx", &specs(&a, &b, "raw"), 64);
    d.vmsnap(&["domain", "start", "fcx"]);
    wait_counting(&d);
    let before = Baseline::take(&env, &d, "fcx");
    let mem = env.images_dir().join("fcx.mem");
    let v = env.client.json([
        "create",
        "fcx",
        "--name",
        "c1",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
        "--no-wait",
    ]);
    let path = v["job"].as_str().expect("a job path").to_string();
    let conn = env.connect().await;
    let job = JobProxy::builder(&conn)
        .path(zbus::OwnedObjectPath::try_from(path).unwrap())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    // Wait until bytes flow: the save is under way and may be cancelled.
    let done = poll_until_async(
        Deadline::step(),
        "the memory save to be cancelable and under way",
        || {
            let job = &job;
            async move {
                assert!(
                    !job.finished().await.unwrap(),
                    "the save ended before it could be cancelled: {:?} {:?}",
                    job.error_name().await,
                    job.error_message().await
                );
                let bytes = job.bytes_done().await.unwrap();
                (job.cancelable().await.unwrap() && bytes > 0).then_some(bytes)
            }
        },
    )
    .await;
    assert!(done > 0);
    assert_eq!(job.phase().await.unwrap(), "memory");
    assert!(mem.exists(), "the memory file is being written");
    job.cancel().await.expect("Cancel of a cancelable job");
    poll_until_async(Deadline::step(), "the cancelled job to end", || {
        let job = &job;
        async move { job.finished().await.unwrap().then_some(()) }
    })
    .await;
    assert_eq!(
        job.error_name().await.unwrap(),
        "org.vmsnap.VmSnap1.Error.Cancelled",
        "{}",
        job.error_message().await.unwrap()
    );
    // A finished job is not cancelable: Cancel is refused.
    assert!(!job.cancelable().await.unwrap());
    match job.cancel().await {
        Err(vmsnap_dbus::Error::Unsupported(_)) => {}
        other => panic!("Cancel of a finished job: {other:?}"),
    }
    assert!(!mem.exists(), "the memory file is removed");
    before.check_after_failure(&env, &d, "fcx", 0, "cancelled save");
    assert_guest_state(&env, &d, "fcx", "running", "after the cancel");

    // A job that is never cancelable (an internal checkpoint): Cancel is refused, and the
    // snapshot is made all the same.
    let v = env
        .client
        .json(["create", "fcx", "--name", "ic", "--no-wait"]);
    let job = JobProxy::builder(&conn)
        .path(zbus::OwnedObjectPath::try_from(v["job"].as_str().unwrap()).unwrap())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    match job.cancel().await {
        Err(vmsnap_dbus::Error::Unsupported(msg)) => {
            assert!(msg.contains("cannot be cancelled"), "{msg}")
        }
        other => panic!("Cancel of an internal checkpoint: {other:?}"),
    }
    poll_until_async(Deadline::step(), "the checkpoint job to end", || {
        let job = &job;
        async move { job.finished().await.unwrap().then_some(()) }
    })
    .await;
    assert_eq!(job.error_name().await.unwrap(), "");
    assert_eq!(d.snapshot_names(), ["ic"]);
    assert_guest_state(&env, &d, "fcx", "running", "after the checkpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_faults_xml_document_sets_properties_and_output_only_is_refused() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "raw");
    let d = Dom::define(&env, "fxd", &specs(&a, &b, "raw"), 64);
    d.vmsnap(&["domain", "start", "fxd"]);
    let overlay = env.images_dir().join("vdb.x1.qcow2");
    let doc = |extra: &str| {
        format!(
            "<domainsnapshot>\n  <name>x1</name>\n  <description>made from XML &amp; kept \
             ✓</description>\n{extra}  <memory snapshot='no'/>\n  <disks>\n    \
             <disk name='vda' snapshot='internal'/>\n    <disk name='vdb' \
             snapshot='external'><source file='{}'/></disk>\n  </disks>\n</domainsnapshot>\n",
            overlay.display()
        )
    };
    let bad = env.dir().join("bad.xml");
    let good = env.dir().join("good.xml");
    std::fs::write(&bad, doc("  <state>running</state>\n")).unwrap();
    std::fs::write(&good, doc("")).unwrap();
    let before = Baseline::take(&env, &d, "fxd");
    let (code, err) = env
        .client
        .err(["create", "fxd", "--xml", bad.to_str().unwrap()]);
    assert_eq!(code, EXIT_INVALID_ARGUMENT, "{err}");
    assert!(err.contains("<state> is output-only"), "{err}");
    before.check_after_failure(&env, &d, "fxd", 0, "output-only <state>");
    assert_guest_state(&env, &d, "fxd", "running", "after the refusal");

    let v = env
        .client
        .json(["create", "fxd", "--xml", good.to_str().unwrap()]);
    assert_eq!(v["name"], "x1");
    assert_eq!(v["description"], "made from XML & kept ✓");
    assert_eq!(v["kind"], "disk-only");
    assert_eq!(v["state"], "disk-snapshot");
    assert_eq!(v["memory"]["mode"], "none");
    let disks: Vec<(String, String)> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["target"].as_str().unwrap().to_string(),
                x["mode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        disks,
        vec![
            ("vda".to_string(), "internal".to_string()),
            ("vdb".to_string(), "external".to_string())
        ]
    );
    assert_eq!(v["disks"][1]["overlay"].as_str(), overlay.to_str());
    let tags: Vec<String> = qemu_img_snapshots(&a).into_iter().map(|(_, t)| t).collect();
    assert_eq!(tags, vec!["x1".to_string()]);
    assert_eq!(
        qemu_img_info(&overlay)[0]["backing-filename"].as_str(),
        b.to_str()
    );
    assert_eq!(
        sources(&d.vmsnap(&["domain", "dumpxml", "fxd"])),
        vec![a.clone(), overlay.clone()]
    );
    let xml = env.client.ok(["dumpxml", "fxd", "x1"]);
    assert!(xml.contains("<name>x1</name>"), "{xml}");
    assert!(xml.contains("made from XML &amp; kept ✓"), "{xml}");
    assert_guest_state(&env, &d, "fxd", "running", "after the snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_faults_keep_active_name_renames_offline_and_is_refused_live() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "fka", &specs(&a, &b, "qcow2"), 64);
    qemu_io_write_pattern(&b, "qcow2", 0xb1, 0, 64 * 1024);
    let renamed = env.images_dir().join("vdb.s1.qcow2");
    let keep = |file: &Path| {
        strings(&[
            "create",
            "fka",
            "--name",
            file.file_stem().unwrap().to_str().unwrap(),
            "--disk-only",
            "--keep-active-name",
            "--disk",
            "vda=no",
            "--disk",
            &format!("vdb=external:{}", file.display()),
        ])
    };
    let v = env.client.json(keep(&renamed));
    assert_eq!(v["kind"], "disk-only");
    // The image moved to the new name; a new overlay backed by it took the old name.
    let info = qemu_img_info(&b);
    assert_eq!(info[0]["format"], "qcow2");
    assert_eq!(
        info[0]["backing-filename"].as_str(),
        renamed.to_str(),
        "{info}"
    );
    assert_eq!(info[1]["filename"].as_str(), renamed.to_str(), "{info}");
    assert!(qemu_img_info(&renamed)[0]["backing-filename"].is_null());
    assert!(
        qemu_io_verify_pattern(&renamed, "qcow2", 0xb1, 0, 64 * 1024),
        "the data written before is in the renamed image"
    );
    assert!(
        qemu_io_verify_pattern(&b, "qcow2", 0xb1, 0, 64 * 1024),
        "and shows through the overlay"
    );
    let xml = d.vmsnap(&["domain", "dumpxml", "fka"]);
    assert_eq!(sources(&xml), vec![a.clone(), b.clone()], "{xml}");
    assert_eq!(
        files_in(&env.images_dir())
            .iter()
            .filter(|f| is_qcow2(f))
            .count(),
        3
    );

    // On a running domain the image cannot be renamed under QEMU: refused, nothing changes.
    d.vmsnap(&["domain", "start", "fka"]);
    wait_counting(&d);
    let before = Baseline::take(&env, &d, "fka");
    let (code, err) = env.client.err(keep(&env.images_dir().join("vdb.s2.qcow2")));
    assert_eq!(code, EXIT_UNSUPPORTED, "{err}");
    assert!(err.contains("shut-off"), "{err}");
    before.check_after_failure(&env, &d, "fka", 0, "keep-active-name while running");
    assert_guest_state(&env, &d, "fka", "running", "after the refusal");
}
