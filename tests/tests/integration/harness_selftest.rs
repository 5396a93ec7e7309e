//! Self-tests of the harness that need no vmsnapd: the private bus and its policy, signal
//! recording, the stand-in daemon's readiness and reaping, the counter guest, and the image
//! helpers. Each check here can fail: the negative cases are tested as well as the positive.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use vmsnap_dbus::names::{BUS_NAME, DOMAIN_INTERFACE, MANAGER_INTERFACE, ROOT_PATH};
use vmsnap_tests::guest::parse_xp_word;
use vmsnap_tests::process::{self, exists, project_binary};
use vmsnap_tests::{
    COUNTER_ADDR, Daemon, Deadline, EventRecorder, ForeignDisk, ForeignQemu, TestBus, connect,
    counter_boot_qcow2, counter_boot_sector, poll_until, qemu_img_create, qemu_img_info,
    qemu_io_verify_pattern, qemu_io_write_pattern,
};
use zbus::fdo;

/// Whether this test runs as root (the policy lets only root own the name).
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The fdo error of a failed call, if it is one.
fn fdo_error(result: &zbus::Result<zbus::Message>) -> Option<&fdo::Error> {
    match result {
        Err(zbus::Error::FDO(e)) => Some(e),
        _ => None,
    }
}

/// Calls `interface.member` on the vmsnap name at the root path with no arguments.
async fn call(
    conn: &zbus::Connection,
    interface: &str,
    member: &str,
) -> zbus::Result<zbus::Message> {
    conn.call_method(Some(BUS_NAME), ROOT_PATH, Some(interface), member, &())
        .await
}

#[tokio::test]
async fn bus_policy_lets_only_root_own_the_name() {
    let deadline = Deadline::step();
    let bus = TestBus::start();
    let conn = deadline
        .run("connect", connect(bus.address()))
        .await
        .unwrap();
    let result = deadline
        .run("RequestName", conn.request_name(BUS_NAME))
        .await;
    if is_root() {
        result.expect("root may own org.vmsnap.VmSnap1 under the project's policy");
    } else {
        let err = result.expect_err("only root may own org.vmsnap.VmSnap1");
        assert!(
            matches!(&err, zbus::Error::FDO(e) if matches!(**e, fdo::Error::AccessDenied(_))),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn bus_call_to_unowned_name_gives_service_unknown() {
    let deadline = Deadline::step();
    let bus = TestBus::start();
    let conn = deadline
        .run("connect", connect(bus.address()))
        .await
        .unwrap();
    let result = deadline
        .run("call", call(&conn, MANAGER_INTERFACE, "ListDomains"))
        .await;
    assert!(
        matches!(fdo_error(&result), Some(fdo::Error::ServiceUnknown(_))),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_policy_allows_vmsnap_interfaces_and_denies_others() {
    if !is_root() {
        eprintln!("skipped: needs root to own {BUS_NAME}");
        return;
    }
    let deadline = Deadline::step();
    let bus = TestBus::start();
    let owner = deadline
        .run("connect", connect(bus.address()))
        .await
        .unwrap();
    // An object server answers calls to unknown objects with an error instead of silence.
    let _ = owner.object_server();
    deadline
        .run("RequestName", owner.request_name(BUS_NAME))
        .await
        .unwrap();
    let caller = deadline
        .run("connect", connect(bus.address()))
        .await
        .unwrap();

    let denied = deadline
        .run("call", call(&caller, "org.example.Unlisted", "Hello"))
        .await;
    assert!(
        matches!(fdo_error(&denied), Some(fdo::Error::AccessDenied(_))),
        "an interface the policy does not list must be denied: {denied:?}"
    );
    // Allowed calls reach the owner, which has no such object: any answer but AccessDenied.
    for interface in [
        MANAGER_INTERFACE,
        DOMAIN_INTERFACE,
        "org.freedesktop.DBus.Properties",
        "org.freedesktop.DBus.Introspectable",
        "org.freedesktop.DBus.ObjectManager",
    ] {
        let result = deadline
            .run("call", call(&caller, interface, "Nothing"))
            .await;
        assert!(
            !matches!(fdo_error(&result), Some(fdo::Error::AccessDenied(_))),
            "{interface} must be allowed: {result:?}"
        );
    }
    deadline
        .run("Ping", call(&caller, "org.freedesktop.DBus.Peer", "Ping"))
        .await
        .expect("Peer.Ping must be allowed and answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_recorder_sees_property_changes_in_order() {
    let deadline = Deadline::step();
    let bus = TestBus::start();
    let emitter = deadline
        .run("connect", connect(bus.address()))
        .await
        .unwrap();
    let listener = deadline
        .run("connect", connect(bus.address()))
        .await
        .unwrap();
    let recorder = deadline
        .run("match", EventRecorder::vmsnap(&listener))
        .await
        .unwrap();
    let path = format!("{ROOT_PATH}/domain/1");
    for state in ["running", "paused", "running"] {
        let changed = std::collections::HashMap::from([("State", zbus::Variant::from(state))]);
        let body = (DOMAIN_INTERFACE, changed, Vec::<String>::new());
        let emit = emitter.emit_signal(
            None::<&str>,
            path.as_str(),
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
            &body,
        );
        deadline.run("emit", emit).await.unwrap();
    }
    // A signal outside the vmsnap tree must not be recorded.
    let emit = emitter.emit_signal(None::<&str>, "/elsewhere", "org.example.X", "Y", &());
    deadline.run("emit", emit).await.unwrap();

    recorder
        .wait_for_property(deadline, &path, "State", "paused")
        .await;
    let last = recorder
        .wait_for_property(deadline, &path, "State", "running")
        .await;
    let changed = last.properties_changed().expect("PropertiesChanged body");
    assert_eq!(changed.interface, DOMAIN_INTERFACE);
    assert!(
        recorder
            .events()
            .iter()
            .all(|s| s.path.starts_with(ROOT_PATH))
    );

    // Consumed: no third "paused" was emitted, so waiting for one times out.
    let short = Deadline::after(Duration::from_millis(300));
    let waited = tokio::spawn(async move {
        recorder
            .wait_for_property(short, &path, "State", "paused")
            .await;
    })
    .await;
    assert!(
        waited.is_err_and(|e| e.is_panic()),
        "a consumed signal was returned twice"
    );
}

/// A stand-in for vmsnapd: starts a "guest" (`sleep`) in its own session, writes its pid to
/// `STATE_DIR/guest.pid`, reports READY=1 and exits 0 on SIGTERM.
const FAKE_DAEMON: &str = r#"#!/bin/bash
trap 'exit 0' TERM
while [ $# -gt 0 ]; do [ "$1" = --state-dir ] && state=$2; shift; done
setsid sleep 300 &
echo $! > "$state/guest.pid"
echo "fake vmsnapd $$: guest $!"
systemd-notify --ready --no-block
wait
"#;

#[test]
fn daemon_waits_for_ready_and_reaps_guests_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fake-vmsnapd");
    std::fs::write(&script, FAKE_DAEMON).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("daemon.log");
    let mut daemon = Daemon::start_binary(
        &script,
        "unix:path=/nonexistent",
        &dir.path().join("state"),
        &dir.path().join("run"),
        &log,
    );
    let first_pid = daemon.pid().unwrap();
    let guest: u32 = std::fs::read_to_string(dir.path().join("state/guest.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        daemon.children().contains(&guest),
        "{:?}",
        daemon.children()
    );
    assert!(daemon.log().contains("fake vmsnapd"), "{}", daemon.log());

    daemon.restart();
    assert_ne!(daemon.pid().unwrap(), first_pid);
    assert!(daemon.last_status().unwrap().success());
    assert!(exists(guest), "a guest must survive the daemon's restart");

    daemon.kill9();
    assert!(!daemon.is_running());
    daemon.start_again();
    drop(daemon);
    assert!(
        !exists(guest),
        "the guest must be killed and reaped on drop"
    );
}

#[test]
#[should_panic(expected = "before READY=1")]
fn daemon_that_exits_before_ready_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let _ = Daemon::start_binary(
        std::path::Path::new("/bin/false"),
        "unix:path=/nonexistent",
        &dir.path().join("state"),
        &dir.path().join("run"),
        &dir.path().join("daemon.log"),
    );
}

#[test]
fn counter_guest_counts_and_stops_when_paused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("counter.qcow2");
    counter_boot_qcow2(&disk);
    let qemu = ForeignQemu::start(dir.path(), &[ForeignDisk::new(&disk, "qcow2")]);
    let deadline = Deadline::step();
    let mut qmp = qemu.test_qmp(deadline);
    let first = qmp.read_counter();
    let second = poll_until(deadline, "the counter to change", || {
        let value = qmp.read_counter();
        (value != first).then_some(value)
    });
    assert_ne!(first, second);

    qmp.execute("stop", serde_json::json!({})).unwrap();
    assert_eq!(qmp.status(), "paused");
    let paused = qmp.read_counter();
    assert_ne!(paused, 0, "the guest code never ran");
    assert_eq!(
        qmp.read_counter(),
        paused,
        "a paused guest's counter must not move"
    );
}

#[test]
fn counter_boot_sector_is_bootable_and_xp_output_parses() {
    let sector = counter_boot_sector();
    assert_eq!(&sector[510..], &[0x55, 0xAA]);
    assert_eq!(COUNTER_ADDR, 0x9000);
    // The code addresses the counter as disp16 0x9000, little-endian.
    assert!(
        sector
            .windows(5)
            .any(|w| w == [0x66, 0xFF, 0x06, 0x00, 0x90])
    );
    assert_eq!(
        parse_xp_word("0000000000009000: 0x0001e240\r\n"),
        Some(0x1e240)
    );
    assert_eq!(parse_xp_word("garbage"), None);
}

#[test]
fn qemu_io_pattern_written_is_verified_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("data.qcow2");
    qemu_img_create(&image, "qcow2", "1M");
    qemu_io_write_pattern(&image, "qcow2", 0xab, 65536, 65536);
    assert!(qemu_io_verify_pattern(&image, "qcow2", 0xab, 65536, 65536));
    assert!(!qemu_io_verify_pattern(&image, "qcow2", 0xcd, 65536, 65536));
    assert!(!qemu_io_verify_pattern(&image, "qcow2", 0xab, 0, 65536));
    let info = qemu_img_info(&image);
    assert_eq!(info[0]["format"], "qcow2");
    assert_eq!(info[0]["virtual-size"], 1 << 20);
}

#[test]
#[should_panic(expected = "qemu-io read")]
fn qemu_io_verify_of_missing_image_panics_instead_of_false() {
    let dir = tempfile::tempdir().unwrap();
    qemu_io_verify_pattern(&dir.path().join("missing.qcow2"), "qcow2", 0, 0, 512);
}

#[test]
#[should_panic(expected = "cargo build --workspace")]
fn missing_project_binary_says_how_to_build_it() {
    project_binary("vmsnap-no-such-binary", "VMSNAP_NO_SUCH_BIN");
}

#[test]
#[should_panic(expected = "did not finish in time")]
fn command_past_its_deadline_is_killed() {
    process::run(
        Command::new("sleep").arg("30"),
        Deadline::after(Duration::from_millis(200)),
    );
}

#[test]
#[should_panic(expected = "timed out waiting for never")]
fn poll_until_gives_up_at_the_deadline() {
    poll_until(Deadline::after(Duration::from_millis(50)), "never", || {
        None::<()>
    });
}
