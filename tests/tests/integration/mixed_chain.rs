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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_external_whose_overlay_holds_later_internal_tags_is_refused_unless_with_them() {
    // e1's overlays hold c2's internal tags: committing them into e1's images (as deleting
    // e1 alone would) would lose c2, so that delete is refused and changes nothing.
    let env = TestEnv::start();
    setup(&env, "mt");
    let b = source(&env, "mt", "vdb");
    write_vdb(&env, "mt", 0xa1);
    env.client
        .ok(["create", "mt", "--name", "e1", "--disk-only"]);
    let b1 = source(&env, "mt", "vdb");
    write_vdb(&env, "mt", 0xb2);
    env.client.ok(["create", "mt", "--name", "c2"]);
    write_vdb(&env, "mt", 0xc3);
    let listed = Dom::handle(&env, "mt").snapshot_names();
    let (code, err) = env.client.err(["delete", "mt", "e1"]);
    assert_eq!(code, 8, "Unsupported: {err}");
    assert!(err.contains("c2") && err.contains("children"), "{err}");
    assert_eq!(Dom::handle(&env, "mt").snapshot_names(), listed);
    assert_eq!(
        source(&env, "mt", "vdb"),
        b1,
        "the guest still writes to e1's overlay"
    );
    assert!(tags(&b1).contains(&"c2".to_string()), "{:?}", tags(&b1));

    // c2 is still whole: its revert brings its data back.
    env.client.ok(["revert", "mt", "c2"]);
    write_vdb(&env, "mt", 0xd4);
    // With its children, e1 goes: c2 first (its tags), then e1's overlay is merged.
    env.client.ok(["delete", "mt", "e1", "--children"]);
    assert!(Dom::handle(&env, "mt").snapshot_names().is_empty());
    assert!(!b1.exists(), "e1's overlay was merged away");
    assert_eq!(source(&env, "mt", "vdb"), b);
    assert_eq!(
        env.client.json(["domain", "info", "mt"])["state"],
        "running"
    );
    env.client.ok(["domain", "destroy", "mt"]);
    assert!(
        qemu_io_verify_pattern(&b, "qcow2", 0xd4, OFF, 4096),
        "the guest's last write was merged into the image below"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_a_left_branch_removes_its_overlay_and_keeps_the_guest() {
    // e1's overlays hold the state the guest reached after e1 on the branch a revert left;
    // once e1 is deleted nothing can reach them, so they go (and nothing else does).
    let env = TestEnv::start();
    setup(&env, "lb");
    let b = source(&env, "lb", "vdb");
    write_vdb(&env, "lb", 0xa1);
    env.client
        .ok(["create", "lb", "--name", "e1", "--disk-only"]);
    let (a1, b1) = (source(&env, "lb", "vda"), source(&env, "lb", "vdb"));
    write_vdb(&env, "lb", 0xb2);
    env.client.ok(["revert", "lb", "e1", "--running"]);
    let b2 = source(&env, "lb", "vdb");
    assert!(
        b2 != b1 && b1.exists(),
        "a new branch; the old overlay stays for e1"
    );
    write_vdb(&env, "lb", 0xc3);
    env.client.ok(["delete", "lb", "e1"]);
    assert!(
        !a1.exists() && !b1.exists(),
        "the left branch's overlays are gone"
    );
    assert!(b.exists(), "the image below stays");
    assert_eq!(source(&env, "lb", "vdb"), b2, "the guest kept its branch");
    assert_eq!(
        env.client.json(["domain", "info", "lb"])["state"],
        "running"
    );
    env.client.ok(["domain", "destroy", "lb"]);
    assert!(
        qemu_io_verify_pattern(&b2, "qcow2", 0xc3, OFF, 4096),
        "the branch holds the guest's last write"
    );
}
