//! Internal snapshots mixed with external ones on a running guest. An external snapshot turns
//! the images below it into backing files, which QEMU reopens read-only, and puts overlay
//! nodes (whose QEMU file names are `json:` pseudo-names) on top. Internal tags live in both
//! kinds of image, so deleting or reverting to them must find the right node and, for a
//! backing file, make it writable only for the length of the job.

use std::path::Path;

use super::revert_delete::source;
use crate::snapshots::Dom;
use vmsnap_tests::{Deadline, TestEnv, poll_until, qemu_img_snapshots, qemu_io_verify_pattern};

const OFF: u64 = 512 * 1024;

fn setup(env: &TestEnv, name: &str) {
    crate::snapshots::define_two_disks(env, name);
    env.client.ok(["domain", "start", name]);
}

fn write_vdb(env: &TestEnv, dom: &str, pattern: u8) {
    Dom::handle(env, dom).write("vdb", pattern, OFF, 4096);
}

fn counter(env: &TestEnv, dom: &str) -> u32 {
    Dom::handle(env, dom).counter()
}

fn tags(image: &Path) -> Vec<String> {
    qemu_img_snapshots(image)
        .into_iter()
        .map(|(_, t)| t)
        .collect()
}

/// The read-only flag QEMU reports for every named format node of the guest.
fn read_only_nodes(env: &TestEnv, dom: &str) -> Vec<String> {
    let v = env.client.json([
        "domain",
        "monitor",
        dom,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let mut ro: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drv"] != "file" && n["ro"] == true)
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect();
    ro.sort();
    ro
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_internal_below_and_above_external_overlay_removes_tags_and_keeps_data() {
    let env = TestEnv::start();
    setup(&env, "mx");
    let a = source(&env, "mx", "vda");
    let b = source(&env, "mx", "vdb");
    write_vdb(&env, "mx", 0xa1);
    env.client.ok(["create", "mx", "--name", "c1"]);
    env.client
        .ok(["create", "mx", "--name", "e1", "--disk-only"]);
    let (a1, b1) = (source(&env, "mx", "vda"), source(&env, "mx", "vdb"));
    assert_ne!(b1, b, "the external snapshot put an overlay on top");
    write_vdb(&env, "mx", 0xb2);
    env.client.ok(["create", "mx", "--name", "c2"]);
    write_vdb(&env, "mx", 0xc3);
    let ro_before = read_only_nodes(&env, "mx");
    assert!(
        !ro_before.is_empty(),
        "the old images are backing files now"
    );

    // c1's tags live in the read-only backing files.
    env.client.ok(["delete", "mx", "c1"]);
    assert!(!tags(&a).contains(&"c1".to_string()), "{:?}", tags(&a));
    assert!(!tags(&b).contains(&"c1".to_string()), "{:?}", tags(&b));
    assert_eq!(
        read_only_nodes(&env, "mx"),
        ro_before,
        "the backing files are read-only again"
    );
    // c2's tags live in the overlays, the guest's active images.
    assert!(tags(&b1).contains(&"c2".to_string()));
    env.client.ok(["delete", "mx", "c2"]);
    assert!(tags(&a1).is_empty() && tags(&b1).is_empty());
    assert_eq!(
        env.client.json(["domain", "info", "mx"])["state"],
        "running"
    );
    assert_eq!(Dom::handle(&env, "mx").snapshot_names(), ["e1"]);

    env.client.ok(["domain", "destroy", "mx"]);
    assert!(
        qemu_io_verify_pattern(&b1, "qcow2", 0xc3, OFF, 4096),
        "the guest's last write is in the active chain"
    );
    assert!(
        qemu_io_verify_pattern(&b, "qcow2", 0xa1, OFF, 4096),
        "the backing file still holds what e1 froze"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_to_internal_checkpoint_in_overlay_restores_ram_and_data_in_place() {
    let env = TestEnv::start();
    setup(&env, "mo");
    env.client
        .ok(["create", "mo", "--name", "e1", "--disk-only"]);
    let b1 = source(&env, "mo", "vdb");
    poll_until(Deadline::step(), "counting", || {
        (counter(&env, "mo") != 0).then_some(())
    });
    write_vdb(&env, "mo", 0xa1);
    env.client.ok(["domain", "pause", "mo"]);
    let saved = counter(&env, "mo");
    env.client.ok(["create", "mo", "--name", "c2"]);
    env.client.ok(["domain", "resume", "mo"]);
    write_vdb(&env, "mo", 0xb2);
    poll_until(Deadline::step(), "the counter to move on", || {
        (counter(&env, "mo") != saved).then_some(())
    });
    env.client.ok(["revert", "mo", "c2"]);
    assert_eq!(counter(&env, "mo"), saved, "RAM is the saved one");
    assert_eq!(source(&env, "mo", "vdb"), b1, "reverted in place");
    env.client.ok(["domain", "destroy", "mo"]);
    assert!(qemu_io_verify_pattern(&b1, "qcow2", 0xa1, OFF, 4096));
}
