//! Revert and delete of internal snapshots through the real daemon, bus, QEMU and client: in
//! place without a new QEMU, with the configuration rolled back, and the tree kept in order.
//! External snapshots revert on new overlays (branches) and delete by merging; a few helpers
//! here (`hmp`, `top_node`, `source`) are shared with the other integration modules.

use std::path::{Path, PathBuf};

use vmsnap_tests::{
    COUNTER_ADDR, Deadline, DiskSpec, TestEnv, poll_until, qemu_img_create, qemu_img_snapshots,
    qemu_io_verify_pattern,
};

const OFF: u64 = 512 * 1024;

fn setup(env: &TestEnv, name: &str) -> (PathBuf, PathBuf) {
    crate::snapshots::define_two_disks(env, name)
}

/// An HMP command through the daemon's monitor passthrough.
pub(crate) fn hmp(env: &TestEnv, dom: &str, cmd: &str) -> String {
    env.client.ok(["domain", "monitor", dom, "--hmp", cmd])
}

fn counter(env: &TestEnv, dom: &str) -> u32 {
    let out = hmp(env, dom, &format!("xp /1wx 0x{COUNTER_ADDR:x}"));
    vmsnap_tests::guest::parse_xp_word(&out).unwrap()
}

fn write(env: &TestEnv, dom: &str, node: &str, pattern: u8) {
    let out = hmp(
        env,
        dom,
        &format!("qemu-io {node} \"write -P 0x{pattern:02x} {OFF} 4096\""),
    );
    assert!(!out.contains("rror"), "{out}");
}

fn qemu_pid(env: &TestEnv) -> String {
    std::fs::read_to_string(env.dir().join("run/domains/1/qemu.pid")).unwrap()
}

fn has_open(pid: &str, file: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{}/fd", pid.trim()))
        .map(|fds| {
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).ok().as_deref() == Some(file))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_internal_checkpoint_in_place_restores_ram_and_disks() {
    let env = TestEnv::start();
    let (a, b) = setup(&env, "rv");
    env.client.ok(["domain", "start", "rv"]);
    poll_until(Deadline::step(), "counting", || {
        (counter(&env, "rv") != 0).then_some(())
    });
    write(&env, "rv", "drive-vdb", 0xa1);
    env.client.ok(["domain", "pause", "rv"]);
    let saved = counter(&env, "rv");
    env.client.ok(["create", "rv", "--name", "cp"]);
    write(&env, "rv", "drive-vdb", 0xb2);
    env.client.ok(["domain", "resume", "rv"]);
    poll_until(Deadline::step(), "the counter to move on", || {
        (counter(&env, "rv") != saved).then_some(())
    });
    let pid = qemu_pid(&env);
    let v = env.client.json(["revert", "rv", "cp"]);
    assert_eq!(v["state"], "paused", "the snapshot was taken paused");
    assert_eq!(
        qemu_pid(&env),
        pid,
        "reverted in place: the same QEMU process"
    );
    assert_eq!(counter(&env, "rv"), saved, "RAM is the saved one");
    let info = env.client.json(["info", "rv", "cp"]);
    assert_eq!(info["current"], true);
    // Reverting again to running state works too.
    env.client.ok(["revert", "rv", "cp", "--running"]);
    assert_eq!(
        env.client.json(["domain", "info", "rv"])["state"],
        "running"
    );
    env.client.ok(["domain", "destroy", "rv"]);
    assert!(
        qemu_io_verify_pattern(&b, "qcow2", 0xa1, OFF, 4096),
        "the disk is back at the snapshot"
    );
    assert_eq!(
        qemu_img_snapshots(&a).len(),
        1,
        "the snapshot itself is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_rolls_back_configuration_of_running_guest() {
    let env = TestEnv::start();
    let (_a, _b) = setup(&env, "cfg");
    env.client.ok(["domain", "start", "cfg"]);
    env.client.ok(["create", "cfg", "--name", "before-disk"]);
    let extra = env.images_dir().join("extra.raw");
    qemu_img_create(&extra, "raw", "8M");
    let disk = env.write_xml("disk.xml", &DiskSpec::new(&extra, "raw", "sdb").xml());
    env.client
        .ok(["domain", "attach-disk", "cfg", disk.to_str().unwrap()]);
    assert!(has_open(&qemu_pid(&env), &extra));
    // The running guest's hardware changed since: replacing it needs force.
    let (code, err) = env.client.err(["revert", "cfg", "before-disk"]);
    assert_eq!(code, 9, "{err}");
    assert!(err.contains("force"), "{err}");
    assert!(
        has_open(&qemu_pid(&env), &extra),
        "the refused revert changed nothing"
    );
    env.client.ok(["revert", "cfg", "before-disk", "--force"]);
    let xml = env.client.ok(["domain", "dumpxml", "cfg"]);
    assert!(
        !xml.contains("extra.raw"),
        "the disk added after the snapshot is gone: {xml}"
    );
    let pid = qemu_pid(&env);
    assert!(
        !has_open(&pid, &extra),
        "and the running QEMU does not have it"
    );
    assert_eq!(
        env.client.json(["domain", "info", "cfg"])["state"],
        "running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_offline_checkpoint_restores_disks_and_config_and_stays_off() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "off");
    vmsnap_tests::qemu_io_write_pattern(&b, "qcow2", 0xa1, OFF, 4096);
    env.client.ok(["create", "off", "--name", "o1"]);
    vmsnap_tests::qemu_io_write_pattern(&b, "qcow2", 0xb2, OFF, 4096);
    let c = env.images_dir().join("c.qcow2");
    qemu_img_create(&c, "qcow2", "8M");
    let disk = env.write_xml("disk.xml", &DiskSpec::new(&c, "qcow2", "vdc").xml());
    env.client
        .ok(["domain", "attach-disk", "off", disk.to_str().unwrap()]);
    env.client.ok(["revert", "off", "o1"]);
    assert_eq!(
        env.client.json(["domain", "info", "off"])["state"],
        "shutoff"
    );
    assert!(qemu_io_verify_pattern(&b, "qcow2", 0xa1, OFF, 4096));
    assert!(
        !env.client
            .ok(["domain", "dumpxml", "off"])
            .contains("c.qcow2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_internal_snapshots_live_and_offline_keeps_tree_in_order() {
    let env = TestEnv::start();
    let (a, b) = setup(&env, "del");
    env.client.ok(["create", "del", "--name", "s1"]);
    env.client.ok(["domain", "start", "del"]);
    env.client.ok(["create", "del", "--name", "s2"]);
    env.client.ok(["create", "del", "--name", "s3"]);
    assert_eq!(env.client.json(["info", "del", "s3"])["parent"], "s2");
    // Delete a middle snapshot live: its child moves up to its parent.
    env.client.ok(["delete", "del", "s2"]);
    assert_eq!(env.client.json(["info", "del", "s3"])["parent"], "s1");
    let tags =
        |p: &Path| -> Vec<String> { qemu_img_snapshots(p).into_iter().map(|(_, t)| t).collect() };
    assert_eq!(tags(&a), vec!["s1", "s3"]);
    assert_eq!(tags(&b), vec!["s1", "s3"]);
    // Delete the current snapshot: its parent becomes current.
    env.client.ok(["delete", "del", "s3"]);
    assert_eq!(env.client.json(["info", "del", "s1"])["current"], true);
    env.client.ok(["domain", "destroy", "del"]);
    // Offline delete, then metadata-only keeps the files.
    env.client.ok(["create", "del", "--name", "s4"]);
    env.client.ok(["delete", "del", "s1"]);
    assert_eq!(tags(&a), vec!["s4"]);
    env.client.ok(["delete", "del", "s4", "--metadata-only"]);
    assert_eq!(tags(&a), vec!["s4"], "metadata-only keeps the data");
    assert_eq!(env.client.json(["list", "del"]), serde_json::json!([]));
    // Ids are not reused: a new snapshot gets a new object path.
    let v = env.client.json(["create", "del", "--name", "s5"]);
    assert!(v["path"].as_str().unwrap().ends_with("/snapshot/5"), "{v}");
    let (code, _) = env.client.err(["delete", "del", "s4"]);
    assert_eq!(code, 3, "a forgotten snapshot is not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_external_leaf_of_running_guest_commits_the_overlay() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "dl");
    env.client.ok(["domain", "start", "dl"]);
    write(&env, "dl", "drive-vdb", 0xa1);
    env.client
        .ok(["create", "dl", "--name", "x", "--disk-only"]);
    let o = source(&env, "dl", "vdb");
    let top = top_node(&env, "dl", "vdb");
    write(&env, "dl", &top, 0xb2);
    let pid = qemu_pid(&env);
    env.client.ok(["delete", "dl", "x"]);
    assert_eq!(qemu_pid(&env), pid, "merged while the guest runs");
    assert_eq!(
        source(&env, "dl", "vdb"),
        b,
        "the definition is back on the base image"
    );
    assert!(!o.exists(), "the merged overlay is removed");
    assert_eq!(
        env.client.json(["domain", "info", "dl"])["state"],
        "running"
    );
    env.client.ok(["domain", "destroy", "dl"]);
    assert!(
        qemu_io_verify_pattern(&b, "qcow2", 0xb2, OFF, 4096),
        "the active data is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_external_middle_snapshot_offline_keeps_later_snapshot_valid() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "dm");
    vmsnap_tests::qemu_io_write_pattern(&b, "qcow2", 0xa1, OFF, 4096);
    env.client
        .ok(["create", "dm", "--name", "s1", "--disk-only"]);
    let o1 = source(&env, "dm", "vdb");
    vmsnap_tests::qemu_io_write_pattern(&o1, "qcow2", 0xb2, OFF, 4096);
    env.client
        .ok(["create", "dm", "--name", "s2", "--disk-only"]);
    let o2 = source(&env, "dm", "vdb");
    vmsnap_tests::qemu_io_write_pattern(&o2, "qcow2", 0xc3, OFF, 4096);
    env.client.ok(["delete", "dm", "s1"]);
    assert!(!o1.exists(), "s1's overlay was merged into its image");
    assert_eq!(
        env.client.json(["info", "dm", "s2"])["parent"],
        serde_json::Value::Null
    );
    assert!(
        qemu_io_verify_pattern(&o2, "qcow2", 0xc3, OFF, 4096),
        "the active image keeps its data"
    );
    // s2 still reverts to its own data.
    env.client.ok(["revert", "dm", "s2"]);
    let n = source(&env, "dm", "vdb");
    assert!(
        qemu_io_verify_pattern(&n, "qcow2", 0xb2, OFF, 4096),
        "s2's data survived the merge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_snapshot_with_branches_offline_rebases_every_branch() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "db");
    vmsnap_tests::qemu_io_write_pattern(&b, "qcow2", 0x11, 0, 4096);
    env.client
        .ok(["create", "db", "--name", "s0", "--disk-only"]);
    let o0 = source(&env, "db", "vdb");
    vmsnap_tests::qemu_io_write_pattern(&o0, "qcow2", 0xa1, OFF, 4096);
    env.client
        .ok(["create", "db", "--name", "s1", "--disk-only"]);
    let o1 = source(&env, "db", "vdb");
    vmsnap_tests::qemu_io_write_pattern(&o1, "qcow2", 0xb2, OFF, 4096);
    env.client.ok(["revert", "db", "s1"]);
    let n1 = source(&env, "db", "vdb");
    vmsnap_tests::qemu_io_write_pattern(&n1, "qcow2", 0xc3, OFF, 4096);
    // s1's image (o0) has two dependents: o1 (the old line) and n1 (the branch).
    env.client.ok(["delete", "db", "s1"]);
    assert!(
        !o0.exists(),
        "s1's image is no longer needed once both branches have its data"
    );
    assert!(
        !o1.exists(),
        "the old line, reachable through s1 only, went with it"
    );
    assert!(qemu_io_verify_pattern(&n1, "qcow2", 0xc3, OFF, 4096));
    assert!(qemu_io_verify_pattern(&n1, "qcow2", 0x11, 0, 4096));
    // s0 still reverts to its own data.
    env.client.ok(["revert", "db", "s0"]);
    let n0 = source(&env, "db", "vdb");
    assert!(qemu_io_verify_pattern(&n0, "qcow2", 0x11, 0, 4096));
    assert!(!qemu_io_verify_pattern(&n0, "qcow2", 0xa1, OFF, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_with_branches_while_running_streams_into_every_branch() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "dr");
    vmsnap_tests::qemu_io_write_pattern(&b, "qcow2", 0x11, 0, 4096);
    env.client
        .ok(["create", "dr", "--name", "s0", "--disk-only"]);
    let o0 = source(&env, "dr", "vdb");
    vmsnap_tests::qemu_io_write_pattern(&o0, "qcow2", 0xa1, OFF, 4096);
    env.client
        .ok(["create", "dr", "--name", "s1", "--disk-only"]);
    let o1 = source(&env, "dr", "vdb");
    vmsnap_tests::qemu_io_write_pattern(&o1, "qcow2", 0xb2, OFF, 4096);
    env.client.ok(["revert", "dr", "s1", "--running"]);
    let n1 = source(&env, "dr", "vdb");
    let top = top_node(&env, "dr", "vdb");
    write(&env, "dr", &top, 0xc3);
    let pid = qemu_pid(&env);
    // s1's image (o0) backs the running branch n1 and the old line o1.
    env.client.ok(["delete", "dr", "s1"]);
    assert_eq!(qemu_pid(&env), pid, "merged while the guest runs");
    assert_eq!(
        env.client.json(["domain", "info", "dr"])["state"],
        "running"
    );
    assert!(!o0.exists(), "the merged image is removed");
    env.client.ok(["domain", "destroy", "dr"]);
    assert!(
        qemu_io_verify_pattern(&n1, "qcow2", 0xc3, OFF, 4096),
        "the running branch keeps its data"
    );
    assert!(qemu_io_verify_pattern(&n1, "qcow2", 0x11, 0, 4096));
    assert!(
        !o1.exists(),
        "the old line, reachable through s1 only, went with it"
    );
    env.client.ok(["revert", "dr", "s0"]);
    let n0 = source(&env, "dr", "vdb");
    assert!(
        qemu_io_verify_pattern(&n0, "qcow2", 0x11, 0, 4096),
        "s0 still reverts to its data"
    );
    assert!(!qemu_io_verify_pattern(&n0, "qcow2", 0xa1, OFF, 4096));
}

/// The top block node serving `target` in the running guest.
pub(crate) fn top_node(env: &TestEnv, dom: &str, target: &str) -> String {
    let v = env
        .client
        .json(["domain", "monitor", dom, r#"{"execute":"query-block"}"#]);
    v.as_array()
        .unwrap()
        .iter()
        .find(|x| {
            x["qdev"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("/{target}/"))
        })
        .unwrap()["inserted"]["node-name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The source of `target` in the domain's definition.
pub(crate) fn source(env: &TestEnv, dom: &str, target: &str) -> PathBuf {
    let v = env.client.json(["domain", "info", dom]);
    let d = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == target)
        .unwrap()
        .clone();
    PathBuf::from(d["file"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_external_snapshots_branches_and_keeps_every_snapshot_valid() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "br");
    env.client.ok(["domain", "start", "br"]);
    write(&env, "br", "drive-vdb", 0xa1);
    env.client
        .ok(["create", "br", "--name", "s1", "--disk-only"]);
    let o1 = source(&env, "br", "vdb");
    let node = |env: &TestEnv| {
        let v = env
            .client
            .json(["domain", "monitor", "br", r#"{"execute":"query-block"}"#]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["qdev"].as_str().unwrap_or("").contains("/vdb/"))
            .unwrap()["inserted"]["node-name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    write(&env, "br", &node(&env), 0xb2);
    env.client
        .ok(["create", "br", "--name", "s2", "--disk-only"]);
    write(&env, "br", &node(&env), 0xc3);
    // Back to s1: a new overlay on s1's image; s2's data (in o1) untouched.
    let v = env.client.json(["revert", "br", "s1"]);
    assert_eq!(
        v["state"], "shutoff",
        "a disk-only snapshot reverts to a shut-off domain"
    );
    let n1 = source(&env, "br", "vdb");
    assert_ne!(n1, o1);
    assert!(
        qemu_io_verify_pattern(&n1, "qcow2", 0xa1, OFF, 4096),
        "the branch starts at s1"
    );
    assert!(
        qemu_io_verify_pattern(&o1, "qcow2", 0xb2, OFF, 4096),
        "s2 keeps its data"
    );
    assert!(
        qemu_io_verify_pattern(&b, "qcow2", 0xa1, OFF, 4096),
        "s1's image is never written"
    );
    // A new snapshot on the branch is a child of s1.
    env.client.ok(["domain", "start", "br"]);
    write(&env, "br", &node(&env), 0xd4);
    env.client
        .ok(["create", "br", "--name", "s3", "--disk-only"]);
    assert_eq!(env.client.json(["info", "br", "s3"])["parent"], "s1");
    // Over to the other branch: s2.
    env.client.ok(["revert", "br", "s2", "--running"]);
    assert_eq!(
        env.client.json(["domain", "info", "br"])["state"],
        "running"
    );
    let n2 = source(&env, "br", "vdb");
    env.client.ok(["domain", "destroy", "br"]);
    assert!(
        qemu_io_verify_pattern(&n2, "qcow2", 0xb2, OFF, 4096),
        "the domain is at s2"
    );
    assert!(
        qemu_io_verify_pattern(&n1, "qcow2", 0xd4, OFF, 4096),
        "s3's data is intact"
    );
    assert!(qemu_io_verify_pattern(&b, "qcow2", 0xa1, OFF, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_external_checkpoint_loads_ram_from_its_file() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "xr");
    env.client.ok(["domain", "start", "xr"]);
    poll_until(Deadline::step(), "counting", || {
        (counter(&env, "xr") != 0).then_some(())
    });
    write(&env, "xr", "drive-vdb", 0xa1);
    env.client.ok(["domain", "pause", "xr"]);
    let saved = counter(&env, "xr");
    let mem = env.images_dir().join("xr.mem");
    env.client.ok([
        "create",
        "xr",
        "--name",
        "x1",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    env.client.ok(["domain", "resume", "xr"]);
    poll_until(Deadline::step(), "the counter to move on", || {
        (counter(&env, "xr") != saved).then_some(())
    });
    let v = env.client.json(["revert", "xr", "x1"]);
    assert_eq!(v["state"], "paused");
    assert_eq!(counter(&env, "xr"), saved, "RAM is the saved one");
    env.client.ok(["domain", "resume", "xr"]);
    poll_until(Deadline::step(), "the reverted guest to run", || {
        (counter(&env, "xr") != saved).then_some(())
    });
    let n = source(&env, "xr", "vdb");
    env.client.ok(["domain", "destroy", "xr"]);
    assert!(qemu_io_verify_pattern(&n, "qcow2", 0xa1, OFF, 4096));
    assert!(qemu_io_verify_pattern(&b, "qcow2", 0xa1, OFF, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_refusals_check_files_first_and_change_nothing() {
    let env = TestEnv::start();
    let (_a, _b) = setup(&env, "rf");
    env.client.ok(["domain", "start", "rf"]);
    let mem = env.images_dir().join("rf.mem");
    env.client.ok(["create", "rf", "--name", "i1"]);
    env.client.ok([
        "create",
        "rf",
        "--name",
        "x1",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    let xml = env.client.ok(["domain", "dumpxml", "rf"]);
    let pid = qemu_pid(&env);
    // Everything but the sizes, which grow as the running guest writes to its overlays.
    let listing = || {
        let mut v = env.client.json(["list", "rf"]);
        for row in v.as_array_mut().unwrap() {
            row.as_object_mut().unwrap().remove("size_on_disk");
        }
        v
    };
    let list = listing();
    // A memory file deleted behind the daemon's back.
    std::fs::rename(&mem, env.dir().join("moved.mem")).unwrap();
    let (code, err) = env.client.err(["revert", "rf", "x1"]);
    assert_eq!(code, 9, "{err}");
    assert!(err.contains("rf.mem"), "{err}");
    assert_eq!(env.client.ok(["domain", "dumpxml", "rf"]), xml);
    assert_eq!(qemu_pid(&env), pid, "the guest was not disturbed");
    assert_eq!(listing(), list);
    assert_eq!(
        env.client.json(["domain", "info", "rf"])["state"],
        "running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_internal_checkpoint_under_later_overlays_uses_a_private_copy() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "cp");
    env.client.ok(["domain", "start", "cp"]);
    poll_until(Deadline::step(), "counting", || {
        (counter(&env, "cp") != 0).then_some(())
    });
    write(&env, "cp", "drive-vdb", 0xa1);
    env.client.ok(["domain", "pause", "cp"]);
    let saved = counter(&env, "cp");
    env.client.ok(["create", "cp", "--name", "i1"]);
    env.client.ok(["domain", "resume", "cp"]);
    // An external snapshot on top: i1's images become backing files.
    env.client
        .ok(["create", "cp", "--name", "e1", "--disk-only"]);
    let top = top_node(&env, "cp", "vdb");
    write(&env, "cp", &top, 0xb2);
    let b_before = std::fs::read(&b).unwrap();
    env.client.ok(["revert", "cp", "i1"]);
    assert_eq!(counter(&env, "cp"), saved, "RAM is i1's");
    assert_eq!(
        std::fs::read(&b).unwrap(),
        b_before,
        "the shared image is never written"
    );
    let n = source(&env, "cp", "vdb");
    assert_ne!(n, b);
    env.client.ok(["domain", "destroy", "cp"]);
    assert!(qemu_io_verify_pattern(&n, "qcow2", 0xa1, OFF, 4096));
    // e1 still reverts to its own data.
    env.client.ok(["revert", "cp", "e1"]);
    let e = source(&env, "cp", "vdb");
    assert!(qemu_io_verify_pattern(&e, "qcow2", 0xa1, OFF, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_children_options_and_branch_in_one_step() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "ch");
    vmsnap_tests::qemu_io_write_pattern(&b, "qcow2", 0xa1, OFF, 4096);
    env.client
        .ok(["create", "ch", "--name", "r", "--disk-only"]);
    env.client
        .ok(["create", "ch", "--name", "c1", "--disk-only"]);
    env.client
        .ok(["create", "ch", "--name", "c2", "--disk-only"]);
    // Branch from r in one step: the new snapshot's parent is r, and the disk is r's data.
    let v = env.client.json([
        "create",
        "ch",
        "--name",
        "b1",
        "--disk-only",
        "--parent",
        "r",
    ]);
    assert_eq!(v["parent"], "r");
    let names = |env: &TestEnv| -> Vec<String> {
        let mut v: Vec<String> = env
            .client
            .json(["list", "ch"])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&env), vec!["b1", "c1", "c2", "r"]);
    // children-only keeps r, removes its subtree.
    env.client.ok(["delete", "ch", "r", "--children-only"]);
    assert_eq!(names(&env), vec!["r"]);
    env.client.ok([
        "create",
        "ch",
        "--name",
        "d1",
        "--disk-only",
        "--parent",
        "r",
    ]);
    env.client
        .ok(["create", "ch", "--name", "d2", "--disk-only"]);
    // Revert with delete-children: r's descendants go, then the revert.
    env.client.ok(["revert", "ch", "r", "--delete-children"]);
    assert_eq!(names(&env), vec!["r"]);
    assert!(qemu_io_verify_pattern(
        &source(&env, "ch", "vdb"),
        "qcow2",
        0xa1,
        OFF,
        4096
    ));
    env.client
        .ok(["create", "ch", "--name", "e1", "--disk-only"]);
    // children removes the snapshot and its subtree.
    env.client.ok(["delete", "ch", "r", "--children"]);
    assert!(names(&env).is_empty());
    assert!(
        qemu_io_verify_pattern(&source(&env, "ch", "vdb"), "qcow2", 0xa1, OFF, 4096),
        "the active data survives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_snapshot_operation_while_one_runs_is_busy() {
    let env = TestEnv::start_with_hooks(&["migrate-bandwidth=131072"]);
    let (_a, _b) = setup(&env, "busy");
    env.client.ok(["domain", "start", "busy"]);
    env.client
        .ok(["create", "busy", "--name", "s0", "--disk-only"]);
    let mem = env.images_dir().join("busy.mem");
    let v = env.client.json([
        "create",
        "busy",
        "--name",
        "slow",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
        "--no-wait",
    ]);
    assert!(v["job"].as_str().unwrap().contains("/job/"));
    let (code, err) = env.client.err(["revert", "busy", "s0"]);
    assert_eq!(code, 5, "a revert during a snapshot is Busy: {err}");
    let (code, err) = env
        .client
        .err(["create", "busy", "--name", "other", "--disk-only"]);
    assert_eq!(code, 5, "{err}");
    poll_until(
        Deadline::after(std::time::Duration::from_secs(60)),
        "the slow snapshot to finish",
        || {
            let l = env.client.json(["list", "busy"]);
            l.as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "slow")
                .then_some(())
        },
    );
    // Free again.
    env.client.ok(["revert", "busy", "s0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_to_snapshot_with_altered_image_is_refused_before_any_work() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "alt");
    env.client
        .ok(["create", "alt", "--name", "s", "--disk-only"]);
    let xml = env.client.ok(["domain", "dumpxml", "alt"]);
    // Someone overwrote the snapshot's image header behind the daemon's back.
    let mut bytes = std::fs::read(&b).unwrap();
    bytes[..4].copy_from_slice(b"XXXX");
    std::fs::write(&b, &bytes).unwrap();
    let files_before = std::fs::read_dir(env.images_dir()).unwrap().count();
    let (code, err) = env.client.err(["revert", "alt", "s"]);
    assert_eq!(code, 9, "{err}");
    assert!(
        err.contains("altered") || err.contains("cannot be read"),
        "{err}"
    );
    assert_eq!(env.client.ok(["domain", "dumpxml", "alt"]), xml);
    assert_eq!(
        std::fs::read_dir(env.images_dir()).unwrap().count(),
        files_before,
        "no overlay was made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_again_removes_the_previous_branch_overlay_unless_a_snapshot_needs_it() {
    let env = TestEnv::start();
    let (_a, b) = setup(&env, "ab");
    env.client
        .ok(["create", "ab", "--name", "s1", "--disk-only"]);
    let o1 = source(&env, "ab", "vdb");
    env.client.ok(["revert", "ab", "s1"]);
    let n1 = source(&env, "ab", "vdb");
    assert!(n1.exists() && n1 != o1);
    // Reverting again discards the first branch's state: its overlay goes.
    env.client.ok(["revert", "ab", "s1"]);
    let n2 = source(&env, "ab", "vdb");
    assert_ne!(n2, n1);
    assert!(
        !n1.exists(),
        "the abandoned overlay {} is removed",
        n1.display()
    );
    assert!(n2.exists() && o1.exists() && b.exists(), "s1's files stay");
    // A snapshot taken on the branch needs its overlay: a later revert keeps it.
    env.client
        .ok(["create", "ab", "--name", "s2", "--disk-only"]);
    env.client.ok(["revert", "ab", "s1"]);
    assert!(n2.exists(), "s2's image {} stays", n2.display());
    env.client.ok(["revert", "ab", "s2"]);
    env.client.ok(["revert", "ab", "s1"]);
    assert!(n2.exists() && o1.exists() && b.exists());
}
