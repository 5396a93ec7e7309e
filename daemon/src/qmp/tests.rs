//! Tests against a real QEMU 7.2 and, for faults QEMU cannot produce, a fake QMP peer.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::*;

/// Generous budget for QEMU (TCG on a loaded 2-core machine) to start and answer.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

fn deadline() -> Instant {
    Instant::now() + TEST_DEADLINE
}

/// A QEMU process with a connected QMP client.
struct TestVm {
    dir: TempDir,
    child: Child,
    qmp: Qmp,
    events: broadcast::Receiver<Event>,
}

impl TestVm {
    async fn start(extra_args: &[&str]) -> TestVm {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35,accel=tcg", "-m", "64", "-nodefaults"])
            .args(["-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let (qmp, events) = Qmp::connect(&sock, deadline()).await.expect("connect");
        TestVm {
            dir,
            child,
            qmp,
            events,
        }
    }

    /// Kills QEMU if it still runs and reaps it.
    async fn finish(mut self) {
        let _ = self.child.start_kill();
        let status = tokio::time::timeout(TEST_DEADLINE, self.child.wait()).await;
        status.expect("qemu exits").expect("wait for qemu");
    }
}

#[tokio::test]
async fn connect_reports_version_and_running_status() {
    let vm = TestVm::start(&[]).await;
    let v = vm.qmp.version();
    assert_eq!((v.major, v.minor), (7, 2), "version {v:?}");
    let status = vm.qmp.query_status().await.unwrap();
    assert!(status.running, "{status:?}");
    assert_eq!(status.status, "running");
    assert!(!vm.qmp.is_closed());
    assert!(format!("{:?}", vm.qmp).contains("closed: false"));
    vm.finish().await;
}

#[tokio::test]
async fn stop_and_cont_emit_events() {
    let mut vm = TestVm::start(&[]).await;
    let qmp = vm.qmp.clone();
    qmp.stop().await.unwrap();
    let ev = qmp
        .wait_named_event(&mut vm.events, "STOP", deadline())
        .await
        .unwrap();
    assert!(ev.timestamp_micros > 1_600_000_000_000_000, "{ev:?}");
    let status = qmp.query_status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.status, "paused");

    qmp.cont().await.unwrap();
    qmp.wait_event(&mut vm.events, deadline(), |e| e.name == "RESUME")
        .await
        .unwrap();
    assert!(qmp.query_status().await.unwrap().running);
    vm.finish().await;
}

#[tokio::test]
async fn concurrent_commands_get_their_own_replies() {
    let vm = TestVm::start(&[]).await;
    let commands = ["query-status", "query-version", "query-kvm", "query-name"];
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let qmp = vm.qmp.clone();
            let command = commands[i % commands.len()];
            tokio::spawn(async move { (command, qmp.execute(command, None).await) })
        })
        .collect();
    for task in futures_util::future::join_all(tasks).await {
        let (command, reply) = task.unwrap();
        let reply = reply.unwrap();
        let ok = match command {
            "query-status" => reply.get("status").is_some(),
            "query-version" => reply["qemu"]["major"] == 7,
            "query-kvm" => reply.get("present").is_some(),
            "query-name" => reply == json!({}),
            _ => unreachable!(),
        };
        assert!(ok, "{command} got {reply}");
    }
    vm.finish().await;
}

#[tokio::test]
async fn failing_commands_report_class_and_command() {
    let vm = TestVm::start(&[]).await;
    let err = vm.qmp.execute("no-such-command", None).await.unwrap_err();
    assert_eq!(err.class(), Some("CommandNotFound"), "{err}");
    assert!(err.to_string().contains("no-such-command"), "{err}");

    let err = vm.qmp.blockdev_del("no-such-node").await.unwrap_err();
    match &err {
        QmpError::Command {
            class,
            command,
            desc,
        } => {
            assert_eq!(class, "GenericError");
            assert_eq!(command, "blockdev-del");
            assert!(!desc.is_empty());
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = vm.qmp.job_dismiss("no-such-job").await.unwrap_err();
    assert_eq!(err.class(), Some("GenericError"), "{err}");
    let err = vm
        .qmp
        .execute("query-status", Some(json!([1])))
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err:?}");
    // The connection survives all of this.
    assert!(vm.qmp.query_status().await.unwrap().running);
    vm.finish().await;
}

#[tokio::test]
async fn file_descriptors_pass_with_scm_rights() {
    let vm = TestVm::start(&[]).await;
    let file = std::fs::File::create(vm.dir.path().join("passed")).unwrap();

    // Without a descriptor getfd fails, so success below means the fd really arrived.
    let err = vm
        .qmp
        .execute("getfd", Some(json!({ "fdname": "nofd" })))
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some("GenericError"), "{err}");

    vm.qmp
        .execute_with_fd("getfd", Some(json!({ "fdname": "test-fd" })), file.as_fd())
        .await
        .unwrap();
    vm.qmp
        .execute("closefd", Some(json!({ "fdname": "test-fd" })))
        .await
        .unwrap();
    let err = vm
        .qmp
        .execute("closefd", Some(json!({ "fdname": "test-fd" })))
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some("GenericError"), "{err}");

    let added = vm
        .qmp
        .execute_with_fd("add-fd", Some(json!({ "fdset-id": 7 })), file.as_fd())
        .await
        .unwrap();
    assert_eq!(added["fdset-id"], 7, "{added}");
    let sets = vm.qmp.execute("query-fdsets", None).await.unwrap();
    assert_eq!(sets[0]["fds"][0]["fd"], added["fd"], "{sets}");
    vm.qmp
        .execute("remove-fd", Some(json!({ "fdset-id": 7 })))
        .await
        .unwrap();
    vm.finish().await;
}

fn qemu_img(args: &[&str]) {
    let status = std::process::Command::new("qemu-img")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("run qemu-img");
    assert!(status.success(), "qemu-img {args:?}");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[tokio::test]
async fn block_devices_hotplug_and_query() {
    let mut vm = TestVm::start(&["-device", "virtio-scsi-pci,id=scsi0"]).await;
    let base = vm.dir.path().join("base.qcow2");
    let overlay = vm.dir.path().join("overlay.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "16M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(&base),
        "-F",
        "qcow2",
        path_str(&overlay),
    ]);
    assert!(vm.qmp.query_block().await.unwrap().is_empty());

    vm.qmp
        .blockdev_add(json!({
            "driver": "qcow2",
            "node-name": "disk0",
            "file": { "driver": "file", "filename": path_str(&overlay) },
        }))
        .await
        .unwrap();
    let nodes = vm.qmp.query_named_block_nodes().await.unwrap();
    assert!(nodes.iter().any(|n| n.node_name == "disk0"), "{nodes:?}");
    vm.qmp
        .device_add(json!({ "driver": "scsi-hd", "id": "sd0", "drive": "disk0", "bus": "scsi0.0" }))
        .await
        .unwrap();

    let blocks = vm.qmp.query_block().await.unwrap();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    let block = &blocks[0];
    assert_eq!(block.device, "");
    assert!(block.qdev.as_deref().unwrap().contains("sd0"), "{block:?}");
    let inserted = block.inserted.as_ref().unwrap();
    assert_eq!(inserted.node_name, "disk0");
    assert_eq!(inserted.drv, "qcow2");
    assert!(!inserted.ro);
    assert_eq!(inserted.backing_file_depth, 1);
    assert_eq!(inserted.file, path_str(&overlay));
    assert_eq!(inserted.image.format, "qcow2");
    assert_eq!(inserted.image.filename, path_str(&overlay));
    assert_eq!(inserted.image.virtual_size, 16 << 20);
    assert_eq!(
        inserted.image.backing_filename.as_deref(),
        Some(path_str(&base))
    );
    let backing = inserted.image.backing_image.as_ref().unwrap();
    assert_eq!(backing.filename, path_str(&base));

    let info = vm.qmp.human_monitor_command("info block").await.unwrap();
    assert!(info.contains("disk0"), "{info}");

    vm.qmp.device_del("sd0").await.unwrap();
    vm.qmp
        .wait_event(&mut vm.events, deadline(), |e| {
            e.name == "DEVICE_DELETED" && e.data["device"] == "sd0"
        })
        .await
        .unwrap();
    vm.qmp.blockdev_del("disk0").await.unwrap();
    assert!(vm.qmp.query_named_block_nodes().await.unwrap().is_empty());
    vm.finish().await;
}

#[tokio::test]
async fn snapshot_save_runs_as_a_job() {
    let mut vm = TestVm::start(&[]).await;
    let disk = vm.dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&disk), "16M"]);
    vm.qmp
        .blockdev_add(json!({
            "driver": "qcow2",
            "node-name": "disk0",
            "file": { "driver": "file", "filename": path_str(&disk) },
        }))
        .await
        .unwrap();
    assert!(vm.qmp.query_jobs().await.unwrap().is_empty());
    vm.qmp
        .execute(
            "snapshot-save",
            Some(json!({ "job-id": "save0", "tag": "snap1", "vmstate": "disk0", "devices": ["disk0"] })),
        )
        .await
        .unwrap();
    vm.qmp
        .wait_event_described(&mut vm.events, deadline(), "job save0 to conclude", |e| {
            e.name == "JOB_STATUS_CHANGE"
                && e.data["id"] == "save0"
                && e.data["status"] == "concluded"
        })
        .await
        .unwrap();
    let jobs = vm.qmp.query_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].id, "save0");
    assert_eq!(jobs[0].job_type, "snapshot-save");
    assert_eq!(jobs[0].status, "concluded");
    assert_eq!(jobs[0].error, None);
    vm.qmp.job_dismiss("save0").await.unwrap();
    assert!(vm.qmp.query_jobs().await.unwrap().is_empty());

    let nodes = vm.qmp.query_named_block_nodes().await.unwrap();
    let node = nodes.iter().find(|n| n.node_name == "disk0").unwrap();
    let snaps = &node.image.snapshots;
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].name, "snap1");
    assert!(snaps[0].vm_state_size > 0);
    vm.finish().await;
}

#[tokio::test]
async fn quit_closes_the_connection() {
    let mut vm = TestVm::start(&[]).await;
    let qmp = vm.qmp.clone();
    let mut late = qmp.subscribe();
    qmp.quit().await.unwrap();
    qmp.wait_named_event(&mut vm.events, "SHUTDOWN", deadline())
        .await
        .unwrap();
    tokio::time::timeout(TEST_DEADLINE, qmp.closed())
        .await
        .expect("closed() resolves");
    assert!(qmp.is_closed());
    assert!(matches!(qmp.query_status().await, Err(QmpError::Closed)));
    // Receivers drain what was sent, then see the end of the stream.
    let err = qmp
        .wait_named_event(&mut late, "NO_SUCH_EVENT", deadline())
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Closed), "{err:?}");
    let mut after = qmp.subscribe();
    assert!(matches!(
        qmp.wait_event(&mut after, deadline(), |_| true).await,
        Err(QmpError::Closed)
    ));
    let status = tokio::time::timeout(TEST_DEADLINE, vm.child.wait())
        .await
        .expect("qemu exits")
        .unwrap();
    assert!(status.success(), "{status}");
    vm.finish().await;
}

// ---- Fake peer ------------------------------------------------------------------------

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7}, "package": " fake "}, "capabilities": []}}"#;

/// The server side of a fake QMP connection.
struct Peer {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Peer {
    async fn send(&mut self, line: &str) {
        self.write.write_all(line.as_bytes()).await.unwrap();
        self.write.write_all(b"\r\n").await.unwrap();
    }

    /// Reads the next command; returns its name and id.
    async fn command(&mut self) -> (String, Value) {
        let line = self.lines.next_line().await.unwrap().expect("a command");
        let v: Value = serde_json::from_str(&line).unwrap();
        (v["execute"].as_str().unwrap().to_owned(), v["id"].clone())
    }

    async fn reply(&mut self, id: &Value, ret: Value) {
        self.send(&json!({ "return": ret, "id": id }).to_string())
            .await;
    }

    /// Sends the greeting and answers `qmp_capabilities`.
    async fn handshake(&mut self) {
        self.send(GREETING).await;
        let (name, id) = self.command().await;
        assert_eq!(name, "qmp_capabilities");
        self.reply(&id, json!({})).await;
    }
}

fn fake_socket() -> (TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

async fn accept(listener: &UnixListener) -> Peer {
    let (stream, _) = listener.accept().await.unwrap();
    let (read, write) = stream.into_split();
    Peer {
        lines: BufReader::new(read).lines(),
        write,
    }
}

/// Connects a client to a fake peer whose behaviour after the handshake is `script`.
async fn with_fake_peer<F, Fut>(script: F) -> (TempDir, Qmp, broadcast::Receiver<Event>)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (dir, path, listener) = fake_socket();
    tokio::spawn(async move {
        let mut peer = accept(&listener).await;
        peer.handshake().await;
        script(peer).await;
    });
    let (qmp, events) = Qmp::connect(&path, deadline()).await.unwrap();
    (dir, qmp, events)
}

#[tokio::test]
async fn fake_events_strays_and_unknown_messages() {
    let (_dir, qmp, mut events) = with_fake_peer(|mut peer| async move {
        let (_, id) = peer.command().await;
        peer.send(r#"{"event": "VMSNAP_UNHEARD_OF", "data": {"x": 1}, "timestamp": {"seconds": 2, "microseconds": 5}}"#).await;
        peer.send(r#"{"return": {}, "id": 999999}"#).await;
        peer.send(r#"{"return": {}, "id": "not-ours"}"#).await;
        peer.send(r#"{"something": "new"}"#).await;
        peer.send("").await;
        peer.send(r#"{"event": "NO_DATA", "timestamp": {"seconds": -1, "microseconds": -1}}"#)
            .await;
        peer.reply(&id, json!({"status": "running", "running": true, "singlestep": false}))
            .await;
        // Keep the connection open until the client is done.
        let _ = peer.lines.next_line().await;
    })
    .await;
    assert_eq!(qmp.version().micro, 1);
    assert_eq!(qmp.version().package, "fake");
    let status = qmp.query_status().await.unwrap();
    assert_eq!(status.status, "running");
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.name, "VMSNAP_UNHEARD_OF");
    assert_eq!(ev.data, json!({"x": 1}));
    assert_eq!(ev.timestamp_micros, 2_000_005);
    let ev = events.recv().await.unwrap();
    assert_eq!(
        (ev.name.as_str(), ev.data.clone(), ev.timestamp_micros),
        ("NO_DATA", Value::Null, 0)
    );
    assert!(!qmp.is_closed());
}

#[tokio::test]
async fn fake_garbage_line_is_a_protocol_error_and_drops_the_connection() {
    let (_dir, qmp, _events) = with_fake_peer(|mut peer| async move {
        let _ = peer.command().await;
        peer.send("this is not json").await;
        // The client shuts the connection down.
        assert!(peer.lines.next_line().await.unwrap().is_none());
    })
    .await;
    let err = qmp.execute("query-status", None).await.unwrap_err();
    assert!(
        matches!(&err, QmpError::Protocol(m) if m.contains("malformed JSON")),
        "{err:?}"
    );
    tokio::time::timeout(TEST_DEADLINE, qmp.closed())
        .await
        .unwrap();
    assert!(qmp.is_closed());
    assert!(matches!(
        qmp.execute("query-status", None).await,
        Err(QmpError::Closed)
    ));
}

#[tokio::test]
async fn fake_reply_without_id_is_a_protocol_error() {
    let (_dir, qmp, _events) = with_fake_peer(|mut peer| async move {
        let _ = peer.command().await;
        peer.send(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#)
            .await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let err = qmp.execute("query-status", None).await.unwrap_err();
    assert!(
        matches!(&err, QmpError::Protocol(m) if m.contains("without id")),
        "{err:?}"
    );
    assert!(qmp.is_closed());
}

#[tokio::test]
async fn fake_peer_closing_mid_command_fails_pending_commands() {
    let (_dir, qmp, mut events) = with_fake_peer(|mut peer| async move {
        let _ = peer.command().await;
        let _ = peer.command().await;
        peer.send(r#"{"event": "LAST_WORDS", "timestamp": {"seconds": 1, "microseconds": 0}}"#)
            .await;
        // Half a reply, then the connection drops.
        peer.write.write_all(br#"{"return": {}, "#).await.unwrap();
    })
    .await;
    let (a, b) = tokio::join!(
        qmp.execute("query-status", None),
        qmp.execute("query-name", None)
    );
    assert!(matches!(a, Err(QmpError::Closed)), "{a:?}");
    assert!(matches!(b, Err(QmpError::Closed)), "{b:?}");
    tokio::time::timeout(TEST_DEADLINE, qmp.closed())
        .await
        .unwrap();
    assert!(matches!(qmp.stop().await, Err(QmpError::Closed)));
    // The last event still arrives before the end of the stream.
    assert_eq!(events.recv().await.unwrap().name, "LAST_WORDS");
    assert!(matches!(
        events.recv().await,
        Err(broadcast::error::RecvError::Closed)
    ));
}

#[tokio::test]
async fn fake_missing_greeting_times_out_within_the_deadline() {
    let (_dir, path, listener) = fake_socket();
    let server = tokio::spawn(async move {
        let peer = accept(&listener).await;
        // Say nothing; hold the connection until the client gives up.
        let mut lines = peer.lines;
        let _ = lines.next_line().await;
    });
    let start = Instant::now();
    let err = Qmp::connect(&path, start + Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QmpError::Timeout(m) if m.contains("greeting")),
        "{err:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    server.await.unwrap();
}

#[tokio::test]
async fn fake_bad_greeting_is_a_protocol_error() {
    let (_dir, path, listener) = fake_socket();
    tokio::spawn(async move {
        let mut peer = accept(&listener).await;
        peer.send(r#"{"hello": "world"}"#).await;
        let _ = peer.lines.next_line().await;
    });
    let err = Qmp::connect(&path, deadline()).await.unwrap_err();
    assert!(
        matches!(&err, QmpError::Protocol(m) if m.contains("greeting")),
        "{err:?}"
    );
}

#[tokio::test]
async fn fake_unanswered_capabilities_time_out() {
    let (_dir, path, listener) = fake_socket();
    tokio::spawn(async move {
        let mut peer = accept(&listener).await;
        peer.send(GREETING).await;
        let _ = peer.command().await;
        let _ = peer.lines.next_line().await;
    });
    let err = Qmp::connect(&path, Instant::now() + Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QmpError::Timeout(m) if m.contains("qmp_capabilities")),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_retries_until_the_socket_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let client = tokio::spawn({
        let path = path.clone();
        async move { Qmp::connect(&path, deadline()).await }
    });
    // Let the client fail at least once before the socket exists.
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    let listener = UnixListener::bind(&path).unwrap();
    let mut peer = accept(&listener).await;
    peer.handshake().await;
    let (qmp, _events) = client.await.unwrap().unwrap();
    assert_eq!(qmp.version().minor, 2);

    let missing = dir.path().join("never.sock");
    let err = Qmp::connect(&missing, Instant::now() + Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QmpError::Timeout(m) if m.contains("never.sock")),
        "{err:?}"
    );
}

#[tokio::test]
async fn dropped_command_futures_do_not_disturb_others() {
    let (_dir, qmp, _events) = with_fake_peer(|mut peer| async move {
        let (_, first) = peer.command().await;
        let (_, second) = peer.command().await;
        // Answer the abandoned command late and the live one after it.
        peer.reply(&first, json!({"late": true})).await;
        peer.reply(&second, json!({"second": true})).await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let abandoned =
        tokio::time::timeout(Duration::from_millis(50), qmp.execute("first", None)).await;
    assert!(abandoned.is_err());
    let reply = qmp.execute("second", None).await.unwrap();
    assert_eq!(reply, json!({"second": true}));
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>(_: &T) {}
    fn fut<T: Send>(_: T) {}
    let _ = |q: Qmp, fd: BorrowedFd<'static>| {
        is(&q);
        fut(q.execute("x", None));
        fut(q.execute_with_fd("x", None, fd));
        fut(q.closed());
    };
}
