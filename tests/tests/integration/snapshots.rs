//! Snapshot creation through the real daemon, bus, QEMU and client: every kind on running,
//! paused and shut-off domains, data checked offline with qemu-io, VM state checked with the
//! counter guest, and every refusal leaving files, catalog and guest as they were.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vmsnap_tests::process::{ChildGuard, run_ok};
use vmsnap_tests::{
    COUNTER_ADDR, Deadline, DiskSpec, EventRecorder, Qmp, TestEnv, counter_boot_qcow2, domain_xml,
    poll_until, qemu_img_create, qemu_img_info, qemu_img_snapshots, qemu_io_verify_pattern,
};

pub(crate) const MIB: u64 = 1 << 20;
/// Where patterns go on the counter disk: past the boot sector, inside its 1 MiB.
pub(crate) const OFF_A: u64 = 512 * 1024;

pub(crate) struct Dom<'a> {
    env: &'a TestEnv,
    name: String,
}

impl<'a> Dom<'a> {
    pub(crate) fn define(
        env: &'a TestEnv,
        name: &str,
        disks: &[DiskSpec],
        memory_mib: u64,
    ) -> Dom<'a> {
        let xml = domain_xml(name, disks).replace(
            "<memory unit='MiB'>64</memory>",
            &format!("<memory unit='MiB'>{memory_mib}</memory>"),
        );
        let f = env.write_xml(&format!("{name}.xml"), &xml);
        env.client.ok(["domain", "define", f.to_str().unwrap()]);
        Dom {
            env,
            name: name.to_string(),
        }
    }

    /// A handle on domain `name`, already defined.
    pub(crate) fn handle(env: &'a TestEnv, name: &str) -> Dom<'a> {
        Dom {
            env,
            name: name.to_string(),
        }
    }

    pub(crate) fn vmsnap(&self, args: &[&str]) -> String {
        self.env.client.ok(args.iter().copied())
    }

    pub(crate) fn hmp(&self, cmd: &str) -> String {
        self.vmsnap(&["domain", "monitor", &self.name, "--hmp", cmd])
    }

    /// The top block node serving `target` in the running guest.
    pub(crate) fn node(&self, target: &str) -> String {
        let v = self.env.client.json([
            "domain",
            "monitor",
            &self.name,
            r#"{"execute":"query-block"}"#,
        ]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|b| {
                let q = b["qdev"].as_str().unwrap_or("");
                q == target || q.contains(&format!("/{target}/"))
            })
            .and_then(|b| b["inserted"]["node-name"].as_str())
            .unwrap_or_else(|| panic!("no node for {target}: {v}"))
            .to_string()
    }

    /// Writes `pattern` into the running guest's disk through HMP qemu-io.
    pub(crate) fn write(&self, target: &str, pattern: u8, offset: u64, len: u64) {
        let node = self.node(target);
        let out = self.hmp(&format!(
            "qemu-io {node} \"write -P 0x{pattern:02x} {offset} {len}\""
        ));
        assert!(
            !out.contains("rror") && !out.contains("onflict"),
            "qemu-io write failed: {out}"
        );
    }

    pub(crate) fn counter(&self) -> u32 {
        let out = self.hmp(&format!("xp /1wx 0x{COUNTER_ADDR:x}"));
        vmsnap_tests::guest::parse_xp_word(&out).unwrap_or_else(|| panic!("bad xp output {out:?}"))
    }

    pub(crate) fn info(&self) -> Value {
        self.env.client.json(["domain", "info", &self.name])
    }

    pub(crate) fn snapshots(&self) -> Value {
        self.env.client.json(["list", &self.name])
    }

    /// The names of the domain's snapshots, in the client's list order.
    pub(crate) fn snapshot_names(&self) -> Vec<String> {
        self.snapshots()
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The running QEMU's command line.
    fn qemu_argv(&self) -> Vec<String> {
        let pid = std::fs::read_to_string(self.env.dir().join("run/domains/1/qemu.pid")).unwrap();
        let raw = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }
}

/// Starts a QEMU of the test's own from `argv` (the guest's command line), with its QMP
/// socket moved and `extra` arguments appended; the daemon's pid file is left out.
fn own_qemu(dir: &Path, argv: &[String], extra: &[&str]) -> (ChildGuard, Qmp) {
    let sock = dir.join("verify.sock");
    let mut args: Vec<String> = Vec::new();
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-pidfile" => {
                it.next();
            }
            "-chardev" => {
                let v = it.next().unwrap();
                args.push(a.clone());
                if v.starts_with("socket,id=qmp,") {
                    args.push(format!(
                        "socket,id=qmp,path={},server=on,wait=off",
                        sock.display()
                    ));
                } else {
                    args.push(v.clone());
                }
            }
            _ => args.push(a.clone()),
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&args).stdin(std::process::Stdio::null());
    let child = ChildGuard::spawn("verify-qemu", &mut cmd).unwrap();
    let qmp = Qmp::connect(&sock, Deadline::step());
    (child, qmp)
}

fn convert_snapshot(image: &Path, tag: &str, out: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-U", "-f", "qcow2", "-O", "raw", "-l"])
            .arg(format!("snapshot.name={tag}"))
            .arg(image)
            .arg(out),
        Deadline::step(),
    );
}

pub(crate) fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// A counter boot disk (qcow2, vda) and a 16 MiB data disk `vdb` of `fmt`.
pub(crate) fn two_disks(env: &TestEnv, fmt: &str) -> (PathBuf, PathBuf) {
    let a = env.images_dir().join("vda.qcow2");
    counter_boot_qcow2(&a);
    let b = env.images_dir().join(format!("vdb.{fmt}"));
    qemu_img_create(&b, fmt, "16M");
    (a, b)
}

/// Every file a `vmsnap list` of snapshots names: disk images, overlays, external VM state.
pub(crate) fn listed_files(list: &Value) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for s in list.as_array().unwrap() {
        for d in s["disks"].as_array().unwrap() {
            for k in ["file", "overlay"] {
                if let Some(f) = d[k].as_str().filter(|f| !f.is_empty()) {
                    out.push(PathBuf::from(f));
                }
            }
        }
        if s["memory"]["mode"] == "external" {
            out.push(PathBuf::from(s["memory"]["where"].as_str().unwrap()));
        }
    }
    out
}

/// Defines domain `name` (64 MiB) on the disks of [`two_disks`] with a qcow2 `vdb`; returns
/// their image files.
pub(crate) fn define_two_disks(env: &TestEnv, name: &str) -> (PathBuf, PathBuf) {
    let (a, b) = two_disks(env, "qcow2");
    Dom::define(env, name, &specs(&a, &b, "qcow2"), 64);
    (a, b)
}

pub(crate) fn specs(a: &Path, b: &Path, bfmt: &str) -> Vec<DiskSpec> {
    vec![
        DiskSpec::new(a, "qcow2", "vda"),
        DiskSpec::new(b, bfmt, "vdb"),
    ]
}

/// Waits until the counter guest has started counting.
pub(crate) fn wait_counting(d: &Dom<'_>) {
    poll_until(Deadline::step(), "the counter guest to count", || {
        (d.counter() != 0).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_internal_checkpoint_of_paused_guest_keeps_disks_and_ram() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "ic", &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", "ic"]);
    wait_counting(&d);
    d.write("vda", 0xa1, OFF_A, 64 * 1024);
    d.write("vdb", 0xb1, 0, MIB);
    d.vmsnap(&["domain", "pause", "ic"]);
    let saved = d.counter();
    let v = env
        .client
        .json(["create", "ic", "--name", "cp1", "--description", "first ✓"]);
    assert_eq!(v["state"], "paused");
    assert_eq!(v["kind"], "checkpoint");
    assert_eq!(v["memory"]["mode"], "internal");
    assert_eq!(v["current"], true);
    assert_eq!(d.info()["state"], "paused", "a paused guest stays paused");
    d.write("vda", 0xa2, OFF_A, 64 * 1024);
    d.write("vdb", 0xb2, 0, MIB);
    let argv = d.qemu_argv();
    d.vmsnap(&["domain", "destroy", "ic"]);
    // The snapshot holds the first patterns, the active images the second.
    for (img, old, new, off, len) in [(&a, 0xa1, 0xa2, OFF_A, 64 * 1024), (&b, 0xb1, 0xb2, 0, MIB)]
    {
        let out = env.dir().join("snap.raw");
        convert_snapshot(img, "cp1", &out);
        assert!(
            qemu_io_verify_pattern(&out, "raw", old, off, len),
            "{} at cp1",
            img.display()
        );
        assert!(!qemu_io_verify_pattern(&out, "raw", new, off, len));
        assert!(
            qemu_io_verify_pattern(img, "qcow2", new, off, len),
            "{} active",
            img.display()
        );
        std::fs::remove_file(&out).unwrap();
    }
    // The VM state: a QEMU of our own loads cp1 and shows the saved counter.
    let (_child, mut qmp) = own_qemu(env.dir(), &argv, &["-loadvm", "cp1"]);
    assert_eq!(
        qmp.read_counter(),
        saved,
        "the saved counter comes back exactly"
    );
    assert_eq!(
        qemu_img_snapshots(&b).len(),
        1,
        "the data disk holds the internal snapshot too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_internal_checkpoint_of_running_guest_resumes_it() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "icr", &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", "icr"]);
    wait_counting(&d);
    let v = env.client.json(["create", "icr"]);
    assert_eq!(v["state"], "running");
    let name = v["name"].as_str().unwrap().to_string();
    assert!(
        name.parse::<u64>().is_ok(),
        "a generated name is the time: {name}"
    );
    assert_eq!(
        d.info()["state"],
        "running",
        "a running guest runs again after the save"
    );
    let c1 = d.counter();
    poll_until(Deadline::step(), "the guest to count on", || {
        (d.counter() != c1).then_some(())
    });
    let tags: Vec<String> = qemu_img_snapshots(&a).into_iter().map(|(_, t)| t).collect();
    assert!(tags.contains(&name), "{tags:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_disk_only_external_switches_both_disks_atomically() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "raw");
    let d = Dom::define(&env, "ext", &specs(&a, &b, "raw"), 64);
    d.vmsnap(&["domain", "start", "ext"]);
    d.write("vda", 0xa1, OFF_A, 64 * 1024);
    d.write("vdb", 0xb1, 0, MIB);
    let v = env
        .client
        .json(["create", "ext", "--name", "s1", "--disk-only"]);
    assert_eq!(v["state"], "disk-snapshot");
    assert_eq!(v["kind"], "disk-only");
    let overlays: Vec<String> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["overlay"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(overlays.len(), 2);
    // The definition follows the new active images.
    let xml = d.vmsnap(&["domain", "dumpxml", "ext"]);
    for o in &overlays {
        assert!(xml.contains(o.as_str()), "{xml}");
    }
    d.write("vda", 0xa2, OFF_A, 64 * 1024);
    d.write("vdb", 0xb2, 0, MIB);
    d.vmsnap(&["domain", "destroy", "ext"]);
    assert!(
        qemu_io_verify_pattern(&a, "qcow2", 0xa1, OFF_A, 64 * 1024),
        "base of vda keeps A"
    );
    assert!(
        qemu_io_verify_pattern(&b, "raw", 0xb1, 0, MIB),
        "base of vdb keeps A"
    );
    let oa = PathBuf::from(&overlays[0]);
    let ob = PathBuf::from(&overlays[1]);
    assert!(qemu_io_verify_pattern(&oa, "qcow2", 0xa2, OFF_A, 64 * 1024));
    assert!(qemu_io_verify_pattern(&ob, "qcow2", 0xb2, 0, MIB));
    let info = qemu_img_info(&ob);
    assert_eq!(
        info[0]["backing-filename"].as_str().unwrap(),
        b.to_str().unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&oa).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The next start runs on the overlays.
    d.vmsnap(&["domain", "start", "ext"]);
    assert_eq!(d.node("vda"), "drive-vda");
    let blocks = d.vmsnap(&["domain", "monitor", "ext", "--hmp", "info block"]);
    assert!(blocks.contains(&overlays[0]), "{blocks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_mixed_internal_and_external_disks_in_one_snapshot() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "mix", &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", "mix"]);
    d.write("vda", 0xa1, OFF_A, 4096);
    d.write("vdb", 0xb1, 0, 4096);
    let file = env.images_dir().join("vdb.mix.qcow2");
    let v = env.client.json([
        "create",
        "mix",
        "--name",
        "m1",
        "--disk-only",
        "--disk",
        "vda=internal",
        "--disk",
        &format!("vdb=external:{}", file.display()),
    ]);
    let modes: Vec<&str> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, vec!["internal", "external"]);
    d.write("vda", 0xa2, OFF_A, 4096);
    d.write("vdb", 0xb2, 0, 4096);
    d.vmsnap(&["domain", "destroy", "mix"]);
    let out = env.dir().join("m1.raw");
    convert_snapshot(&a, "m1", &out);
    assert!(qemu_io_verify_pattern(&out, "raw", 0xa1, OFF_A, 4096));
    assert!(qemu_io_verify_pattern(&a, "qcow2", 0xa2, OFF_A, 4096));
    assert!(qemu_io_verify_pattern(&b, "qcow2", 0xb1, 0, 4096));
    assert!(qemu_io_verify_pattern(&file, "qcow2", 0xb2, 0, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_external_checkpoint_saves_ram_to_file_with_progress() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "xc", &specs(&a, &b, "qcow2"), 1024);
    d.vmsnap(&["domain", "start", "xc"]);
    wait_counting(&d);
    d.write("vdb", 0xb1, 0, MIB);
    d.vmsnap(&["domain", "pause", "xc"]);
    let saved = d.counter();
    let conn = env.connect().await;
    let rec = EventRecorder::vmsnap(&conn).await.unwrap();
    let mem = env.images_dir().join("xc.mem");
    let v = env.client.json([
        "create",
        "xc",
        "--name",
        "x1",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    assert_eq!(v["memory"]["mode"], "external");
    assert_eq!(v["state"], "paused");
    assert!(std::fs::metadata(&mem).unwrap().len() > 0);
    // Progress: the job's BytesDone was announced, growing, with a total.
    let mut seen: Vec<u64> = Vec::new();
    for s in rec.events() {
        if let Some(pc) = s.properties_changed()
            && let Some(v) = pc.changed.get("BytesDone")
            && let Ok(n) = u64::try_from(v)
        {
            seen.push(n);
        }
    }
    assert!(!seen.is_empty(), "BytesDone was announced");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "BytesDone only grows: {seen:?}"
    );
    assert!(*seen.last().unwrap() > 0);
    d.write("vdb", 0xb2, 0, MIB);
    let argv = d.qemu_argv();
    d.vmsnap(&["domain", "destroy", "xc"]);
    assert!(
        qemu_io_verify_pattern(&b, "qcow2", 0xb1, 0, MIB),
        "the disk at the checkpoint"
    );
    // Load the memory file into a QEMU of our own on the snapshot's disks.
    let (_child, mut qmp) = own_qemu(
        env.dir(),
        &argv,
        &["-incoming", &format!("exec:cat {}", mem.display())],
    );
    poll_until(Deadline::step(), "the incoming migration to finish", || {
        (qmp.status() == "paused").then_some(())
    });
    assert_eq!(
        qmp.read_counter(),
        saved,
        "the saved counter comes back exactly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_shutoff_domain_is_offline_checkpoint() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "raw");
    let _d = Dom::define(&env, "off", &specs(&a, &b, "raw"), 64);
    vmsnap_tests::qemu_io_write_pattern(&a, "qcow2", 0xa1, OFF_A, 4096);
    vmsnap_tests::qemu_io_write_pattern(&b, "raw", 0xb1, 0, 4096);
    let v = env.client.json(["create", "off", "--name", "o1"]);
    assert_eq!(v["state"], "shutoff");
    assert_eq!(v["kind"], "checkpoint");
    let modes: Vec<&str> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["mode"].as_str().unwrap())
        .collect();
    assert_eq!(
        modes,
        vec!["internal", "external"],
        "qcow2 internal, raw external by default"
    );
    assert_eq!(qemu_img_snapshots(&a).len(), 1);
    let ob = PathBuf::from(v["disks"][1]["overlay"].as_str().unwrap());
    vmsnap_tests::qemu_io_write_pattern(&ob, "qcow2", 0xb2, 0, 4096);
    assert!(qemu_io_verify_pattern(&b, "raw", 0xb1, 0, 4096));
    // A second snapshot is the child of the first.
    let v2 = env
        .client
        .json(["create", "off", "--name", "o2", "--disk-only"]);
    assert_eq!(v2["parent"], "o1");
    let list = env.client.json(["list", "off"]);
    let current: Vec<bool> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["current"].as_bool().unwrap())
        .collect();
    assert_eq!(current, vec![false, true]);
    let xml = env.client.ok(["dumpxml", "off", "o2"]);
    assert!(
        xml.contains("<parent>") && xml.contains("<name>o1</name>"),
        "{xml}"
    );
}

/// Every refusal: the right error, and the files, catalog and guest as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_refusals_change_nothing() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "raw");
    let d = Dom::define(&env, "ref", &specs(&a, &b, "raw"), 64);
    // Shut off first: VM state needs a running domain.
    let (code, err) = env.client.err(["create", "ref", "--memory", "internal"]);
    assert_eq!(code, 9, "{err}");
    d.vmsnap(&["domain", "start", "ref"]);
    env.client.ok([
        "create",
        "ref",
        "--name",
        "taken",
        "--disk-only",
        "--disk",
        "vdb=no",
    ]);
    let before_files = files_in(&env.images_dir());
    let before_list = d.snapshots();
    let existing = env.images_dir().join("exists.qcow2");
    std::fs::write(&existing, b"keep me").unwrap();
    let before_files_with = files_in(&env.images_dir());
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec!["--disk-only".into(), "--disk".into(), "vdb=internal".into()],
            8,
            "raw",
        ),
        (
            vec![
                "--memory".into(),
                "internal".into(),
                "--disk".into(),
                "vdb=no".into(),
            ],
            7,
            "vdb",
        ),
        (
            vec!["--disk-only".into(), "--disk".into(), "vdz=external".into()],
            7,
            "vdz",
        ),
        (
            vec!["--name".into(), "taken".into(), "--disk-only".into()],
            4,
            "taken",
        ),
        (
            vec![
                "--disk-only".into(),
                "--disk".into(),
                format!("vda=external:{}", existing.display()),
            ],
            4,
            "exists",
        ),
        (
            vec!["--disk-only".into(), "--memory".into(), "external".into()],
            7,
            "",
        ),
        (
            vec!["--disk-only".into(), "--disk".into(), "vda=sideways".into()],
            7,
            "vda",
        ),
        (vec!["--live".into()], 7, "live"),
    ];
    for (extra, want, needle) in cases {
        let mut args = vec!["create".to_string(), "ref".to_string()];
        args.extend(extra.clone());
        let (code, err) = env.client.err(&args);
        assert_eq!(code, want, "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert_eq!(
            files_in(&env.images_dir()),
            before_files_with,
            "{extra:?} left files"
        );
        assert_eq!(d.snapshots(), before_list, "{extra:?} changed the catalog");
        assert_eq!(
            d.info()["state"],
            "running",
            "{extra:?} disturbed the guest"
        );
    }
    std::fs::remove_file(&existing).unwrap();
    assert_eq!(files_in(&env.images_dir()), before_files);
    assert!(std::fs::read(&existing).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_live_external_checkpoint_is_consistent_and_guest_keeps_running() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "live", &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", "live"]);
    wait_counting(&d);
    d.write("vdb", 0xb1, 0, MIB);
    let mem = env.images_dir().join("live.mem");
    let v = env.client.json([
        "create",
        "live",
        "--name",
        "l1",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
        "--live",
    ]);
    assert_eq!(v["state"], "running");
    assert_eq!(
        d.info()["state"],
        "running",
        "a live save leaves the guest running"
    );
    let c = d.counter();
    poll_until(Deadline::step(), "the guest to count on", || {
        (d.counter() != c).then_some(())
    });
    // The disks were switched at the memory's instant: the base images are what the saved
    // RAM goes with, and a QEMU of our own resumes from them.
    let argv = d.qemu_argv();
    d.vmsnap(&["domain", "destroy", "live"]);
    assert!(qemu_io_verify_pattern(&b, "qcow2", 0xb1, 0, MIB));
    let (_child, mut qmp) = own_qemu(
        env.dir(),
        &argv,
        &["-incoming", &format!("exec:cat {}", mem.display())],
    );
    poll_until(Deadline::step(), "the incoming migration to finish", || {
        (qmp.status() == "paused").then_some(())
    });
    assert_ne!(qmp.read_counter(), 0, "the saved guest had been counting");
}

/// The RFC's (checkpoint, internal disks, external VM state), and the choice of the disk that
/// holds internal VM state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_internal_disks_with_external_memory_and_chosen_vmstate_disk() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "rfc", &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", "rfc"]);
    let mem = env.images_dir().join("rfc.mem");
    let v = env.client.json([
        "create",
        "rfc",
        "--name",
        "ie",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
        "--disk",
        "vda=internal",
        "--disk",
        "vdb=internal",
    ]);
    let modes: Vec<&str> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, vec!["internal", "internal"]);
    assert_eq!(v["memory"]["mode"], "external");
    assert!(std::fs::metadata(&mem).unwrap().len() > 0);
    let tags =
        |p: &Path| -> Vec<String> { qemu_img_snapshots(p).into_iter().map(|(_, t)| t).collect() };
    assert_eq!(tags(&a), vec!["ie"]);
    assert_eq!(tags(&b), vec!["ie"]);
    // Internal VM state in the second disk when asked.
    let v = env
        .client
        .json(["create", "rfc", "--name", "vs", "--vmstate-disk", "vdb"]);
    assert_eq!(v["memory"]["where"], "vdb");
    assert_eq!(d.info()["state"], "running");
    d.vmsnap(&["domain", "destroy", "rfc"]);
    let info = qemu_img_info(&b);
    let vs = info[0]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "vs")
        .unwrap()
        .clone();
    assert!(
        vs["vm-state-size"].as_u64().unwrap() > 0,
        "vdb holds the VM state: {vs}"
    );
    let info = qemu_img_info(&a);
    let va = info[0]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "vs")
        .unwrap()
        .clone();
    assert_eq!(
        va["vm-state-size"].as_u64().unwrap(),
        0,
        "vda holds disk data only: {va}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_disk_only_of_paused_guest_keeps_it_paused() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let d = Dom::define(&env, "pd", &specs(&a, &b, "qcow2"), 64);
    d.vmsnap(&["domain", "start", "pd", "--paused"]);
    d.write("vdb", 0xb1, 0, 4096);
    let v = env
        .client
        .json(["create", "pd", "--name", "p1", "--disk-only"]);
    assert_eq!(v["state"], "disk-snapshot");
    assert_eq!(d.info()["state"], "paused");
    d.write("vdb", 0xb2, 0, 4096);
    d.vmsnap(&["domain", "destroy", "pd"]);
    assert!(qemu_io_verify_pattern(&b, "qcow2", 0xb1, 0, 4096));
    let ob = PathBuf::from(v["disks"][1]["overlay"].as_str().unwrap());
    assert!(qemu_io_verify_pattern(&ob, "qcow2", 0xb2, 0, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_disk_writes_are_discarded_and_snapshots_leave_it_out() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    vmsnap_tests::qemu_io_write_pattern(&b, "qcow2", 0xb1, 0, 4096);
    let xml = domain_xml("tr", &specs(&a, &b, "qcow2")).replace(
        "<target dev='vdb' bus='virtio'/>",
        "<target dev='vdb' bus='virtio'/><transient/>",
    );
    let f = env.write_xml("tr.xml", &xml);
    env.client.ok(["domain", "define", f.to_str().unwrap()]);
    let d = Dom {
        env: &env,
        name: "tr".into(),
    };
    d.vmsnap(&["domain", "start", "tr"]);
    let overlay_dir = env.dir().join("state/transient/1");
    assert!(
        overlay_dir.join("vdb.qcow2").exists(),
        "the throwaway overlay is in the state dir"
    );
    d.write("vdb", 0xb2, 0, 4096);
    let v = env
        .client
        .json(["create", "tr", "--name", "t1", "--disk-only"]);
    let modes: Vec<&str> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["mode"].as_str().unwrap())
        .collect();
    assert_eq!(
        modes,
        vec!["external", "no"],
        "the transient disk is left out"
    );
    d.vmsnap(&["domain", "destroy", "tr"]);
    assert!(
        qemu_io_verify_pattern(&b, "qcow2", 0xb1, 0, 4096),
        "writes to a transient disk are discarded"
    );
    assert!(!overlay_dir.exists(), "the overlay is removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_unknown_or_mistyped_option_is_refused_over_dbus() {
    let env = TestEnv::start();
    let (a, b) = two_disks(&env, "qcow2");
    let _d = Dom::define(&env, "opt", &specs(&a, &b, "qcow2"), 64);
    let conn = env.connect().await;
    let d = vmsnap_dbus::proxy::DomainProxy::builder(&conn)
        .path(vmsnap_dbus::names::domain_path(1))
        .build()
        .await
        .unwrap();
    let mut o = std::collections::HashMap::new();
    o.insert("memroy", zbus::Variant::from("internal"));
    let e = d.create_snapshot("x", "", o).await.unwrap_err();
    assert!(
        matches!(&e, vmsnap_dbus::Error::InvalidArgument(m) if m.contains("memroy")),
        "{e:?}"
    );
    let mut o = std::collections::HashMap::new();
    o.insert("disk-only", zbus::Variant::from("yes"));
    let e = d.create_snapshot("x", "", o).await.unwrap_err();
    assert!(
        matches!(&e, vmsnap_dbus::Error::InvalidArgument(m) if m.contains("disk-only")),
        "{e:?}"
    );
    let mut o = std::collections::HashMap::new();
    o.insert("disks", zbus::Variant::from("vda=internal"));
    let e = d.create_snapshot("x", "", o).await.unwrap_err();
    assert!(
        matches!(e, vmsnap_dbus::Error::InvalidArgument(_)),
        "a string where an array is due"
    );
    assert!(d.list_snapshots().await.unwrap().is_empty());
    assert!(qemu_img_snapshots(&a).is_empty());
}
