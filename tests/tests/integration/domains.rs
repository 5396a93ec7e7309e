//! Managed and attached domains through the real daemon, bus, QEMU and client: lifecycle and
//! state signals, graceful and forced shutdown, crash detection, daemon restart with a running
//! guest, disk hot-plug, and the typed errors of bad input.

use std::path::{Path, PathBuf};

use vmsnap_dbus::names::{MANAGER_INTERFACE, domain_path};
use vmsnap_dbus::proxy::{DomainProxy, ManagerProxy};
use vmsnap_tests::{
    Deadline, DiskSpec, EventRecorder, ForeignDisk, ForeignQemu, TestEnv, domain_xml, poll_until,
    qemu_img_create,
};

/// Creates `n` qcow2 images `d0.qcow2`.. in the environment's images directory.
fn images(env: &TestEnv, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = env.images_dir().join(format!("d{i}.qcow2"));
            qemu_img_create(&p, "qcow2", "16M");
            p
        })
        .collect()
}

/// Defines domain `name` with one qcow2 disk per image (vda, vdb, ...).
fn define(env: &TestEnv, name: &str, imgs: &[PathBuf]) {
    let disks: Vec<DiskSpec> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| DiskSpec::new(p, "qcow2", &format!("vd{}", (b'a' + i as u8) as char)))
        .collect();
    let xml = env.write_xml(&format!("{name}.xml"), &domain_xml(name, &disks));
    env.client.ok(["domain", "define", xml.to_str().unwrap()]);
}

fn state(env: &TestEnv, name: &str) -> String {
    let v = env.client.json(["domain", "info", name]);
    v["state"].as_str().unwrap().to_string()
}

/// The pid of the domain's QEMU, from its pid file.
fn qemu_pid(env: &TestEnv, id: i64) -> i32 {
    let p = env.dir().join(format!("run/domains/{id}/qemu.pid"));
    std::fs::read_to_string(&p).unwrap().trim().parse().unwrap()
}

/// Whether process `pid` has `file` open (QEMU's own view of its disks).
fn has_open(pid: i32, file: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).ok().as_deref() == Some(file))
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
                .unwrap_or(true)
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_lifecycle_changes_state_and_announces_it() {
    let env = TestEnv::start();
    let conn = env.connect().await;
    let rec = EventRecorder::vmsnap(&conn).await.unwrap();
    let imgs = images(&env, 1);
    define(&env, "life", &imgs);
    let path = domain_path(1);
    // The object is served (InterfacesAdded) before the Manager announces it.
    rec.wait_for(Deadline::step(), "InterfacesAdded", |s| {
        s.member == "InterfacesAdded"
    })
    .await;
    rec.wait_for(Deadline::step(), "DomainAdded", |s| {
        s.member == "DomainAdded" && s.interface == MANAGER_INTERFACE
    })
    .await;
    assert_eq!(state(&env, "life"), "shutoff");

    env.client.ok(["domain", "start", "life"]);
    rec.wait_for_property(Deadline::step(), &path, "State", "running")
        .await;
    let pid = qemu_pid(&env, 1);
    assert!(has_open(pid, &imgs[0]), "QEMU must have the disk open");

    env.client.ok(["domain", "pause", "life"]);
    rec.wait_for_property(Deadline::step(), &path, "State", "paused")
        .await;
    assert_eq!(state(&env, "life"), "paused");
    env.client.ok(["domain", "resume", "life"]);
    rec.wait_for_property(Deadline::step(), &path, "State", "running")
        .await;

    env.client.ok(["domain", "destroy", "life"]);
    rec.wait_for_property(Deadline::step(), &path, "State", "shutoff")
        .await;
    poll_until(Deadline::step(), "QEMU to be gone", || {
        (!alive(pid)).then_some(())
    });
    assert!(
        !env.dir().join("run/domains/1/qmp.sock").exists(),
        "the QMP socket is removed"
    );

    env.client.ok(["domain", "start", "life", "--paused"]);
    assert_eq!(state(&env, "life"), "paused");
    env.client.ok(["domain", "destroy", "life"]);
    env.client.ok(["domain", "undefine", "life"]);
    rec.wait_for(Deadline::step(), "DomainRemoved", |s| {
        s.member == "DomainRemoved"
    })
    .await;
    let list = env.client.json(["domain", "list"]);
    assert_eq!(list, serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_shutdown_of_guest_without_os_times_out_or_is_forced() {
    let env = TestEnv::start();
    let imgs = images(&env, 1);
    define(&env, "sd", &imgs);
    env.client.ok(["domain", "start", "sd"]);
    // A guest without an OS never answers the ACPI power button.
    let (code, err) = env
        .client
        .err(["domain", "shutdown", "sd", "--timeout", "1"]);
    assert_eq!(code, 10, "Timeout exit code; stderr: {err}");
    assert!(err.contains("did not power off"), "{err}");
    assert_eq!(
        state(&env, "sd"),
        "running",
        "a timed-out shutdown leaves the guest running"
    );
    env.client
        .ok(["domain", "shutdown", "sd", "--timeout", "1", "--force"]);
    assert_eq!(state(&env, "sd"), "shutoff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_shutdown_async_returns_a_job_that_reports_completion() {
    let env = TestEnv::start();
    let imgs = images(&env, 1);
    define(&env, "sj", &imgs);
    env.client.ok(["domain", "start", "sj"]);
    let conn = env.connect().await;
    let rec = EventRecorder::vmsnap(&conn).await.unwrap();
    let v = env.client.json([
        "domain",
        "shutdown",
        "sj",
        "--timeout",
        "1",
        "--force",
        "--no-wait",
    ]);
    let job = v["job"].as_str().unwrap().to_string();
    assert!(job.starts_with("/org/vmsnap/VmSnap1/job/"), "{job}");
    // Uncached: the proxy's cache follows PropertiesChanged on its own schedule, which may lag
    // behind the Completed signal the recorder saw.
    let job_proxy = vmsnap_dbus::proxy::JobProxy::builder(&conn)
        .path(job.as_str())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    assert_eq!(job_proxy.operation().await.unwrap(), "shutdown");
    assert!(!job_proxy.owner().await.unwrap().is_empty());
    let done = rec
        .wait_for(Deadline::step(), "Completed", |s| {
            s.member == "Completed" && s.path == job
        })
        .await;
    let (ok, name, _msg): (bool, String, String) = done.message.body().deserialize().unwrap();
    assert!(ok, "forced shutdown succeeds: {name}");
    assert!(job_proxy.finished().await.unwrap());
    assert_eq!(state(&env, "sj"), "shutoff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_qemu_killed_is_reported_crashed() {
    let env = TestEnv::start();
    let imgs = images(&env, 1);
    define(&env, "cr", &imgs);
    env.client.ok(["domain", "start", "cr"]);
    let pid = qemu_pid(&env, 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    poll_until(Deadline::step(), "state crashed", || {
        (state(&env, "cr") == "crashed").then_some(())
    });
    // A crashed domain can be started again.
    env.client.ok(["domain", "start", "cr"]);
    assert_eq!(state(&env, "cr"), "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_keeps_guest_running_and_reattaches() {
    let mut env = TestEnv::start();
    let imgs = images(&env, 1);
    define(&env, "keep", &imgs);
    env.client.ok(["domain", "start", "keep"]);
    let pid = qemu_pid(&env, 1);
    env.daemon.restart();
    assert!(alive(pid), "the guest must survive the daemon's restart");
    assert_eq!(state(&env, "keep"), "running");
    assert_eq!(
        qemu_pid(&env, 1),
        pid,
        "the same QEMU, re-attached, not a new one"
    );
    // The re-attached session works: pause and see it.
    env.client.ok(["domain", "pause", "keep"]);
    assert_eq!(state(&env, "keep"), "paused");
    // And the daemon notices the exit of a guest it did not start itself.
    env.client.ok(["domain", "destroy", "keep"]);
    assert_eq!(state(&env, "keep"), "shutoff");
    poll_until(Deadline::step(), "QEMU to be gone", || {
        (!alive(pid)).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_kill9_then_restart_reattaches() {
    let mut env = TestEnv::start();
    let imgs = images(&env, 1);
    define(&env, "k9", &imgs);
    env.client.ok(["domain", "start", "k9", "--paused"]);
    let pid = qemu_pid(&env, 1);
    env.daemon.kill9();
    env.daemon.start_again();
    assert!(alive(pid));
    assert_eq!(state(&env, "k9"), "paused");
    env.client.ok(["domain", "resume", "k9"]);
    assert_eq!(state(&env, "k9"), "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_foreign_qemu_discovers_disks_and_controls_it() {
    let env = TestEnv::start();
    let imgs = images(&env, 2);
    std::fs::create_dir(env.dir().join("foreign")).unwrap();
    let qemu = ForeignQemu::start(
        &env.dir().join("foreign"),
        &[
            ForeignDisk::new(&imgs[0], "qcow2"),
            ForeignDisk::new(&imgs[1], "qcow2"),
        ],
    );
    let mut own = qemu.test_qmp(Deadline::step());
    env.client.ok([
        "domain",
        "attach",
        "foreign",
        "--qmp",
        qemu.qmp_socket().to_str().unwrap(),
    ]);
    let info = env.client.json(["domain", "info", "foreign"]);
    assert_eq!(info["kind"], "attached");
    assert_eq!(info["state"], "running");
    let files: Vec<&str> = info["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        vec![imgs[0].to_str().unwrap(), imgs[1].to_str().unwrap()]
    );
    let targets: Vec<&str> = info["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, vec!["vda", "vdb"]);
    env.client.ok(["domain", "pause", "foreign"]);
    assert_eq!(own.status(), "paused", "the foreign QEMU itself is paused");
    let (code, err) = env.client.err(["domain", "start", "foreign"]);
    assert_eq!(code, 8, "starting an attached domain is unsupported: {err}");
    // Attaching the same socket twice is refused.
    let (code, _) = env.client.err([
        "domain",
        "attach",
        "again",
        "--qmp",
        qemu.qmp_socket().to_str().unwrap(),
    ]);
    assert_eq!(code, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_to_dead_socket_is_refused_and_registers_nothing() {
    let env = TestEnv::start();
    let sock = env.dir().join("nobody.sock");
    let (code, err) =
        env.client
            .err(["domain", "attach", "ghost", "--qmp", sock.to_str().unwrap()]);
    assert_eq!(code, 1, "QemuError: {err}");
    assert_eq!(env.client.json(["domain", "list"]), serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_hotplug_scsi_attach_and_detach_reach_qemu_and_definition() {
    let env = TestEnv::start();
    let imgs = images(&env, 1);
    define(&env, "hp", &imgs);
    env.client.ok(["domain", "start", "hp"]);
    let pid = qemu_pid(&env, 1);
    let extra = env.images_dir().join("extra.raw");
    qemu_img_create(&extra, "raw", "8M");
    let disk = env.write_xml("disk.xml", &DiskSpec::new(&extra, "raw", "sdb").xml());
    env.client
        .ok(["domain", "attach-disk", "hp", disk.to_str().unwrap()]);
    assert!(
        has_open(pid, &extra),
        "the hot-plugged disk is open in QEMU"
    );
    assert!(
        env.client
            .ok(["domain", "dumpxml", "hp"])
            .contains("extra.raw")
    );
    env.client.ok(["domain", "detach-disk", "hp", "sdb"]);
    poll_until(Deadline::step(), "QEMU to close the unplugged disk", || {
        (!has_open(pid, &extra)).then_some(())
    });
    assert!(
        !env.client
            .ok(["domain", "dumpxml", "hp"])
            .contains("extra.raw")
    );
    // A virtio disk hot-plugs onto a free root port.
    let v = env.images_dir().join("v.qcow2");
    qemu_img_create(&v, "qcow2", "8M");
    let vdisk = env.write_xml("vdisk.xml", &DiskSpec::new(&v, "qcow2", "vdb").xml());
    env.client
        .ok(["domain", "attach-disk", "hp", vdisk.to_str().unwrap()]);
    assert!(has_open(pid, &v));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_attach_while_shutoff_edits_definition_and_next_start_uses_it() {
    let env = TestEnv::start();
    let imgs = images(&env, 2);
    define(&env, "cfg", &imgs[..1]);
    let disk = env.write_xml("disk.xml", &DiskSpec::new(&imgs[1], "qcow2", "vdb").xml());
    env.client
        .ok(["domain", "attach-disk", "cfg", disk.to_str().unwrap()]);
    env.client.ok(["domain", "start", "cfg"]);
    assert!(has_open(qemu_pid(&env, 1), &imgs[1]));
    env.client.ok(["domain", "destroy", "cfg"]);
    env.client.ok(["domain", "detach-disk", "cfg", "vdb"]);
    assert!(
        !env.client
            .ok(["domain", "dumpxml", "cfg"])
            .contains("d1.qcow2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_attach_with_wrong_format_is_refused_and_changes_nothing() {
    let env = TestEnv::start();
    let imgs = images(&env, 2);
    define(&env, "fmt", &imgs[..1]);
    let before = env.client.ok(["domain", "dumpxml", "fmt"]);
    // A qcow2 image declared raw would let the guest see (and write) the qcow2 metadata.
    let disk = env.write_xml("disk.xml", &DiskSpec::new(&imgs[1], "raw", "vdb").xml());
    let (code, err) = env
        .client
        .err(["domain", "attach-disk", "fmt", disk.to_str().unwrap()]);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("qcow2") && err.contains("raw"), "{err}");
    assert_eq!(env.client.ok(["domain", "dumpxml", "fmt"]), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn define_bad_xml_gives_invalid_argument_naming_the_element() {
    let env = TestEnv::start();
    let imgs = images(&env, 1);
    let xml = domain_xml("bad", &[DiskSpec::new(&imgs[0], "qcow2", "vda")])
        .replace("<devices>", "<devices><interface type='network'/>");
    let f = env.write_xml("bad.xml", &xml);
    let v = env
        .client
        .err_json(["domain", "define", f.to_str().unwrap()]);
    assert_eq!(v["error"], "org.vmsnap.VmSnap1.Error.InvalidArgument");
    assert!(v["message"].as_str().unwrap().contains("interface"), "{v}");
    let f = env.write_xml("broken.xml", "<domain type='qemu'><name>x</name>");
    let (code, _) = env.client.err(["domain", "define", f.to_str().unwrap()]);
    assert_eq!(code, 7);
    assert_eq!(env.client.json(["domain", "list"]), serde_json::json!([]));
    assert!(!env.dir().join("run/domains/1").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_and_duplicates_give_typed_errors() {
    let env = TestEnv::start();
    let v = env.client.err_json(["domain", "info", "nope"]);
    assert_eq!(v["error"], "org.vmsnap.VmSnap1.Error.NoSuchDomain");
    let (code, _) = env.client.err(["domain", "start", "nope"]);
    assert_eq!(code, 3);
    let imgs = images(&env, 1);
    define(&env, "dup", &imgs);
    let f = env.write_xml(
        "dup2.xml",
        &domain_xml("dup", &[DiskSpec::new(&imgs[0], "qcow2", "vda")]),
    );
    let v = env
        .client
        .err_json(["domain", "define", f.to_str().unwrap()]);
    assert_eq!(v["error"], "org.vmsnap.VmSnap1.Error.AlreadyExists");
    let (code, err) = env.client.err(["domain", "pause", "dup"]);
    assert_eq!(code, 9, "pausing a shut-off domain is InvalidState: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_mistyped_option_is_refused() {
    let env = TestEnv::start();
    let imgs = images(&env, 1);
    define(&env, "opt", &imgs);
    let conn = env.connect().await;
    let d = DomainProxy::builder(&conn)
        .path(domain_path(1))
        .build()
        .await
        .unwrap();
    let mut o = std::collections::HashMap::new();
    o.insert("bogus", zbus::Variant::Bool(true));
    let e = d.start(o).await.unwrap_err();
    assert!(
        matches!(&e, vmsnap_dbus::Error::InvalidArgument(m) if m.contains("bogus")),
        "{e:?}"
    );
    let mut o = std::collections::HashMap::new();
    o.insert("paused", zbus::Variant::from("yes"));
    let e = d.start(o).await.unwrap_err();
    assert!(matches!(e, vmsnap_dbus::Error::InvalidArgument(_)));
    assert_eq!(
        d.state().await.unwrap(),
        "shutoff",
        "a refused start changes nothing"
    );
    let m = ManagerProxy::new(&conn).await.unwrap();
    assert_eq!(m.list_domains().await.unwrap().len(), 1);
    assert!(!m.version().await.unwrap().is_empty());
}
