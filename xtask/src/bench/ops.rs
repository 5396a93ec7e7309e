//! The snapshot operations: each measured through D-Bus, through the `vmsnap` client and as
//! the raw QMP floor on a QEMU of the benchmark's own with the same kind of guest. The three
//! are interleaved per repetition, so slow phases of a noisy machine hit all of them alike.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use vmsnap_dbus::proxy::{DomainProxy, ManagerProxy, SnapshotProxy};
use vmsnap_tests::guest::disk_target;
use vmsnap_tests::process::ChildGuard;
use vmsnap_tests::{DiskSpec, TestEnv, domain_xml};
use zbus::{OwnedObjectPath, Variant as Value};

use super::guest::{self, DONE_ADDR, FILL_DONE, FILL_PATTERN};
use super::qmp::Qmp;
use super::stats::{Cell, Row};
use super::{Settings, block};

type Options<'a> = HashMap<&'a str, Value<'a>>;

/// Memory of the fill guest (MiB): 1 GiB filled plus room for the BIOS.
const BIG_MEMORY_MIB: u32 = 1100;

/// Results of the operations part.
pub struct OpsReport {
    /// One row per operation.
    pub rows: Vec<Row>,
    /// Extra lines for the notes (memory throughput, RAM checks).
    pub notes: Vec<String>,
}

struct Ctx<'a> {
    settings: &'a Settings,
    env: TestEnv,
    conn: zbus::Connection,
}

impl Ctx<'_> {
    fn images(&self) -> PathBuf {
        self.env.images_dir()
    }

    /// Defines and starts a domain through the client; returns its D-Bus proxy.
    fn domain(&self, name: &str, xml: &str) -> Result<DomainProxy<'static>> {
        let path = self.env.write_xml(name, xml);
        self.env
            .client
            .ok(["domain", "define", path.to_str().context("path")?]);
        self.env.client.ok(["domain", "start", name]);
        block(async {
            let manager = ManagerProxy::new(&self.conn).await?;
            let path = manager.find_domain(name).await?;
            Ok(DomainProxy::builder(&self.conn).path(path).build().await?)
        })
    }

    fn snapshot(&self, path: OwnedObjectPath) -> Result<SnapshotProxy<'static>> {
        block(async {
            Ok(SnapshotProxy::builder(&self.conn)
                .path(path)
                .build()
                .await?)
        })
    }

    /// Times a client run that must succeed.
    fn client(&self, args: &[&str]) -> Duration {
        let t = Instant::now();
        self.env.client.ok(args);
        t.elapsed()
    }
}

/// The accelerator of every guest of the run (`--accel`, passed down as
/// [`super::ACCEL_ENV`], which the harness hands to vmsnapd as `VMSNAPD_ACCEL`): `tcg` unless
/// `kvm` was asked for. The floor QEMU uses the same one, so both sides run the same kind of
/// guest.
pub fn accel() -> &'static str {
    match std::env::var(super::ACCEL_ENV).as_deref() {
        Ok("kvm") => "kvm",
        _ => "tcg",
    }
}

/// A floor QEMU of the benchmark's own, like the harness's `ForeignQemu` (q35, `-nodefaults`,
/// disks as `-blockdev` with format nodes `drive-vdX` on virtio-blk, the first one booting)
/// but with vmsnapd's accelerator and `memory_mib` of RAM. Killed and reaped on drop.
struct FloorQemu {
    _child: ChildGuard,
}

fn floor_qemu(dir: &Path, disks: &[&Path], memory_mib: u32) -> Result<(FloorQemu, Qmp)> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("qmp.sock");
    let log = std::fs::File::create(dir.join("qemu.log"))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", &format!("q35,accel={}", accel())])
        .args(["-m", &memory_mib.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()));
    // The devices vmsnapd gives every q35 guest besides its disks (its hot-plug root ports
    // and SCSI controller): their state is saved and loaded with the VM's, so the floor's
    // guest must have them too.
    for i in 0..4 {
        let multifunction = if i == 0 { ",multifunction=on" } else { "" };
        cmd.arg("-device").arg(format!(
            "pcie-root-port,id=hp{i},bus=pcie.0,chassis={},port={},addr=0x1c.{i}{multifunction}",
            i + 1,
            0x10 + i
        ));
    }
    cmd.args(["-device", "virtio-scsi-pci,id=scsi0"]);
    for (i, disk) in disks.iter().enumerate() {
        let t = disk_target(i);
        cmd.arg("-blockdev").arg(format!(
            "driver=file,filename={},node-name=file-{t}",
            disk.display()
        ));
        cmd.arg("-blockdev")
            .arg(format!("driver=qcow2,file=file-{t},node-name=drive-{t}"));
        let boot = if i == 0 { ",bootindex=1" } else { "" };
        cmd.arg("-device")
            .arg(format!("virtio-blk-pci,drive=drive-{t},id={t}{boot}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = ChildGuard::spawn("qemu-system-x86_64", &mut cmd)?;
    let qmp = Qmp::connect(&socket)?;
    Ok((FloorQemu { _child: child }, qmp))
}

/// The cost of any vmsnap call before it does anything: a D-Bus method call through
/// dbus-daemon that only reads (`Manager.ListDomains`), timed like the operations.
fn call_floor(ctx: &Ctx<'_>) -> Result<String> {
    let manager = block(async { Ok(ManagerProxy::new(&ctx.conn).await?) })?;
    let mut samples = Vec::new();
    for _ in 0..ctx.settings.reps.max(9) {
        let (d, _) = timed(|| block(async { Ok(manager.list_domains().await?) }))?;
        samples.push(d);
    }
    let m = super::stats::median(&samples).context("no samples")?;
    Ok(format!(
        "A D-Bus call that only reads (`Manager.ListDomains`, through dbus-daemon to vmsnapd \
         and back) takes {} (median of {}); every operation row pays this at least once, and \
         a `vmsnap` client run adds a process start and a bus connection.",
        super::stats::fmt(m),
        samples.len()
    ))
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed(), v))
}

fn opts<'a>(pairs: Vec<(&'a str, Value<'a>)>) -> Options<'a> {
    pairs.into_iter().collect()
}

fn qcow2(path: &Path, size: &str) {
    vmsnap_tests::qemu_img_create(path, "qcow2", size);
}

/// Runs every operation; returns the rows in the order of the issue.
pub fn run(settings: &Settings) -> Result<OpsReport> {
    let env = TestEnv::start();
    let conn = block(async { Ok(vmsnap_tests::connect(env.bus_address()).await?) })?;
    let ctx = Ctx {
        settings,
        env,
        conn,
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    notes.push(call_floor(&ctx)?);
    let (ext, del_ext) = external_disk_only(&ctx)?;
    rows.push(ext);
    let (int, revert, del_int) = internal(&ctx)?;
    rows.extend([int, revert, del_int, del_ext]);
    // The RAM-filling guests start only now: while they fill, each takes a host core.
    let big = if settings.big_guest {
        Some(start_big(&ctx)?)
    } else {
        None
    };
    if let Some(big) = big {
        let (row, mut n) = external_checkpoint(&ctx, big)?;
        rows.push(row);
        notes.append(&mut n);
    }
    // For profiling: the daemon's log (with `VMSNAP_TEST_LOG_LEVEL=debug`, every QMP command
    // and event with its time) kept where `VMSNAP_BENCH_DAEMON_LOG` says.
    if let Some(path) = std::env::var_os("VMSNAP_BENCH_DAEMON_LOG") {
        std::fs::write(&path, ctx.env.daemon.log())
            .with_context(|| format!("cannot write {}", Path::new(&path).display()))?;
    }
    Ok(OpsReport { rows, notes })
}

/// External disk-only snapshots of two disks, then deleting them again leaf by leaf (the
/// daemon) and popping the floor's layers with active `block-commit` (the floor).
fn external_disk_only(ctx: &Ctx<'_>) -> Result<(Row, Row)> {
    let n = ctx.settings.reps;
    let dir = ctx.images();
    let boot = dir.join("ext-vda.qcow2");
    let data = dir.join("ext-vdb.qcow2");
    guest::idle_boot_qcow2(&boot)?;
    qcow2(&data, "64M");
    let xml = domain_xml(
        "ext",
        &[
            DiskSpec::new(&boot, "qcow2", "vda"),
            DiskSpec::new(&data, "qcow2", "vdb"),
        ],
    );
    let domain = ctx.domain("ext", &xml)?;

    let fboot = dir.join("floor-ext-vda.qcow2");
    let fdata = dir.join("floor-ext-vdb.qcow2");
    guest::idle_boot_qcow2(&fboot)?;
    qcow2(&fdata, "64M");
    let (_qemu, mut qmp) = floor_qemu(&dir.join("floor-ext"), &[&fboot, &fdata], 64)?;
    let targets = ["vda", "vdb"];
    // Node stacks per disk, active node last.
    let mut nodes: Vec<Vec<String>> = targets.iter().map(|t| vec![format!("drive-{t}")]).collect();

    let (mut dbus, mut client, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_snapshot = None;
    for i in 0..n {
        let (d, path) = timed(|| {
            block(async {
                let o = opts(vec![
                    ("disk-only", Value::from(true)),
                    ("disks", Value::from(vec!["vda=external", "vdb=external"])),
                ]);
                Ok(domain.create_snapshot(&format!("dx{i}"), "", o).await?)
            })
        })?;
        dbus.push(d);
        last_snapshot = Some(path);
        client.push(ctx.client(&[
            "create",
            "ext",
            "--name",
            &format!("cx{i}"),
            "--disk-only",
            "--disk",
            "vda=external",
            "--disk",
            "vdb=external",
        ]));
        // Floor: the overlay files are named up front; QEMU creates them.
        let actions: Vec<_> = targets
            .iter()
            .zip(&nodes)
            .map(|(t, stack)| {
                json!({"type": "blockdev-snapshot-sync", "data": {
                    "node-name": stack.last().expect("node"),
                    "snapshot-file": dir.join(format!("floor-ext-{t}.{i}.qcow2")),
                    "snapshot-node-name": format!("fl-{t}-{i}"),
                    "format": "qcow2"}})
            })
            .collect();
        let (f, _) = timed(|| qmp.execute("transaction", json!({ "actions": actions })))?;
        floor.push(f);
        for (t, stack) in targets.iter().zip(&mut nodes) {
            stack.push(format!("fl-{t}-{i}"));
        }
    }
    let ext = Row {
        operation: "external disk-only snapshot, 2 disks".into(),
        reps: n,
        dbus: Cell::of(&dbus),
        client: Cell::of(&client),
        floor: Cell::of(&floor),
        target: 1.5,
    };

    // Deleting an external leaf: the daemon merges the leaf's overlay into its image by an
    // active `block-commit` of both disks. The chain is dx0, cx0, dx1, cx1, ...: the client
    // deletes cx{i} (then the leaf), D-Bus deletes dx{i} (the leaf after that), interleaved
    // with the floor's commits.
    let mut paths = HashMap::new();
    for p in block(async { Ok(domain.list_snapshots().await?) })? {
        let s = ctx.snapshot(p.clone())?;
        let name = block(async { Ok(s.name().await?) })?;
        paths.insert(name, p);
    }
    ensure!(last_snapshot.is_some(), "no snapshot was created");
    let (mut dbus_del, mut client_del) = (Vec::new(), Vec::new());
    // Floor: active commit of each disk's top overlay into the layer below, both disks at once.
    let mut floor_del = Vec::new();
    for i in (0..n).rev() {
        client_del.push(ctx.client(&["delete", "ext", &format!("cx{i}")]));
        let snap = ctx.snapshot(
            paths
                .get(&format!("dx{i}"))
                .context("a D-Bus snapshot is not listed")?
                .clone(),
        )?;
        let (d, _) = timed(|| block(async { Ok(snap.delete(HashMap::new()).await?) }))?;
        dbus_del.push(d);
        let (f, _) = timed(|| {
            let jobs: Vec<String> = targets.iter().map(|t| format!("commit-{t}-{i}")).collect();
            for (job, stack) in jobs.iter().zip(&nodes) {
                let top = &stack[stack.len() - 1];
                let base = &stack[stack.len() - 2];
                qmp.execute(
                    "block-commit",
                    json!({"job-id": job, "device": top, "base-node": base}),
                )?;
            }
            for job in &jobs {
                qmp.wait_event("BLOCK_JOB_READY", |e| {
                    e["event"] == "BLOCK_JOB_READY" && e["data"]["device"] == job.as_str()
                })?;
                qmp.execute("job-complete", json!({ "id": job }))?;
            }
            for job in &jobs {
                qmp.wait_event("BLOCK_JOB_COMPLETED", |e| {
                    e["event"] == "BLOCK_JOB_COMPLETED" && e["data"]["device"] == job.as_str()
                })?;
            }
            Ok(())
        })?;
        floor_del.push(f);
        for stack in &mut nodes {
            stack.pop();
        }
        qmp.clear_events();
    }
    let del_ext = Row {
        operation: "delete an external leaf (2 disks)".into(),
        reps: n,
        dbus: Cell::of(&dbus_del),
        client: Cell::of(&client_del),
        floor: Cell::of(&floor_del),
        target: 1.5,
    };
    Ok((ext, del_ext))
}

/// Internal checkpoints, revert to one of them in place, and deleting them.
fn internal(ctx: &Ctx<'_>) -> Result<(Row, Row, Row)> {
    let n = ctx.settings.reps;
    let dir = ctx.images();
    let disk = dir.join("int-vda.qcow2");
    guest::idle_boot_qcow2(&disk)?;
    let domain = ctx.domain(
        "int",
        &domain_xml("int", &[DiskSpec::new(&disk, "qcow2", "vda")]),
    )?;
    let fdisk = dir.join("floor-int-vda.qcow2");
    guest::idle_boot_qcow2(&fdisk)?;
    let (_qemu, mut qmp) = floor_qemu(&dir.join("floor-int"), &[&fdisk], 64)?;
    let save_args = |tag: &str, job: &str| json!({"job-id": job, "tag": tag, "vmstate": "drive-vda", "devices": ["drive-vda"]});

    // Internal checkpoints.
    let (mut dbus, mut client, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let mut paths = Vec::new();
    for i in 0..n {
        let (d, path) = timed(|| {
            block(async {
                Ok(domain
                    .create_snapshot(&format!("di{i}"), "", HashMap::new())
                    .await?)
            })
        })?;
        dbus.push(d);
        paths.push(path);
        client.push(ctx.client(&["create", "int", "--name", &format!("ci{i}")]));
        let (f, _) = timed(|| {
            qmp.run_job(
                "snapshot-save",
                &format!("save-{i}"),
                save_args(&format!("fi{i}"), &format!("save-{i}")),
            )
        })?;
        floor.push(f);
        // vmsnapd's image gets two checkpoints per round (D-Bus and client): the floor's
        // image gets a second one too, untimed, so both hold as many tags and VM states.
        let job = format!("save-x{i}");
        qmp.run_job("snapshot-save", &job, save_args(&format!("fx{i}"), &job))?;
    }
    let create = Row {
        operation: "internal checkpoint (64 MiB guest)".into(),
        reps: n,
        dbus: Cell::of(&dbus),
        client: Cell::of(&client),
        floor: Cell::of(&floor),
        target: 1.5,
    };

    // Revert to the first checkpoint of the running guest, in place.
    let first = ctx.snapshot(paths[0].clone())?;
    let (mut dbus, mut client, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (d, _) = timed(|| block(async { Ok(first.revert(HashMap::new()).await?) }))?;
        dbus.push(d);
        client.push(ctx.client(&["revert", "int", "ci0"]));
        let (f, _) = timed(|| {
            qmp.execute("stop", json!({}))?;
            let job = format!("load-{i}");
            qmp.run_job("snapshot-load", &job, save_args("fi0", &job))?;
            qmp.execute("cont", json!({}))
        })?;
        floor.push(f);
    }
    let state = block(async { Ok(domain.state().await?) })?;
    ensure!(state == "running", "after revert the domain is {state}");
    let revert = Row {
        operation: "revert to an internal checkpoint, running guest".into(),
        reps: n,
        dbus: Cell::of(&dbus),
        client: Cell::of(&client),
        floor: Cell::of(&floor),
        target: 1.5,
    };

    // Delete the checkpoints again, newest first.
    let (mut dbus, mut client, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for i in (0..n).rev() {
        let snap = ctx.snapshot(paths[i].clone())?;
        let (d, _) = timed(|| block(async { Ok(snap.delete(HashMap::new()).await?) }))?;
        dbus.push(d);
        client.push(ctx.client(&["delete", "int", &format!("ci{i}")]));
        let job = format!("delete-{i}");
        let (f, _) = timed(|| {
            qmp.run_job(
                "snapshot-delete",
                &job,
                json!({"job-id": job, "tag": format!("fi{i}"), "devices": ["drive-vda"]}),
            )
        })?;
        floor.push(f);
        let job = format!("delete-x{i}");
        qmp.run_job(
            "snapshot-delete",
            &job,
            json!({"job-id": job, "tag": format!("fx{i}"), "devices": ["drive-vda"]}),
        )?;
    }
    let delete = Row {
        operation: "delete an internal checkpoint".into(),
        reps: n,
        dbus: Cell::of(&dbus),
        client: Cell::of(&client),
        floor: Cell::of(&floor),
        target: 1.5,
    };
    Ok((create, revert, delete))
}

/// Reads a 32-bit word of guest RAM through the daemon's monitor passthrough.
fn daemon_xp(domain: &DomainProxy<'_>, addr: u64) -> Result<u32> {
    let out = block(async {
        Ok(domain
            .monitor_command(
                &format!("xp /1wx {addr:#x}"),
                opts(vec![("hmp", Value::from(true))]),
            )
            .await?)
    })?;
    guest::parse_xp_word(&out).with_context(|| format!("cannot parse xp output {out:?}"))
}

fn floor_xp(qmp: &mut Qmp, addr: u64) -> Result<u32> {
    let out = qmp.hmp(&format!("xp /1wx {addr:#x}"))?;
    guest::parse_xp_word(&out).with_context(|| format!("cannot parse xp output {out:?}"))
}

/// Waits until the fill guest has written its done word, then checks the pattern.
fn wait_filled(what: &str, mut read: impl FnMut(u64) -> Result<u32>) -> Result<Duration> {
    let t = Instant::now();
    while read(DONE_ADDR)? != FILL_DONE {
        ensure!(
            t.elapsed() < Duration::from_secs(900),
            "{what}: the fill guest did not finish in 900 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for addr in guest::probe_addresses() {
        let word = read(addr)?;
        ensure!(
            word == FILL_PATTERN,
            "{what}: RAM at {addr:#x} holds {word:#x}, not the fill pattern"
        );
    }
    Ok(t.elapsed())
}

/// Creates `path` as the daemon does (exclusive, 0600).
fn create_exclusive(path: &Path) -> Result<std::fs::File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// Sequential write of `size` bytes of non-zero data to `path`: (time without fsync, with).
fn plain_write(path: &Path, size: u64) -> Result<(Duration, Duration)> {
    let buf = vec![0xA5u8; 1 << 20];
    let mut file = create_exclusive(path)?;
    let t = Instant::now();
    let mut left = size;
    while left > 0 {
        let chunk = usize::try_from(left.min(buf.len() as u64))?;
        file.write_all(&buf[..chunk])?;
        left -= chunk as u64;
    }
    let written = t.elapsed();
    file.sync_all()?;
    let synced = t.elapsed();
    drop(file);
    std::fs::remove_file(path)?;
    Ok((written, synced))
}

/// The two 1 GiB guests (vmsnap's and the floor's), started early so that they fill their
/// RAM while the other operations are measured.
struct Big {
    domain: DomainProxy<'static>,
    _qemu: FloorQemu,
    qmp: Qmp,
}

fn start_big(ctx: &Ctx<'_>) -> Result<Big> {
    let dir = ctx.images();
    let disk = dir.join("big-vda.qcow2");
    guest::fill_boot_qcow2(&disk)?;
    let xml = domain_xml("big", &[DiskSpec::new(&disk, "qcow2", "vda")]).replace(
        "<memory unit='MiB'>64</memory>",
        &format!("<memory unit='MiB'>{BIG_MEMORY_MIB}</memory>"),
    );
    let domain = ctx.domain("big", &xml)?;
    let fdisk = dir.join("floor-big-vda.qcow2");
    guest::fill_boot_qcow2(&fdisk)?;
    let (qemu, qmp) = floor_qemu(&dir.join("floor-big"), &[&fdisk], BIG_MEMORY_MIB)?;
    Ok(Big {
        domain,
        _qemu: qemu,
        qmp,
    })
}

/// External checkpoint (VM state to a file) of a guest with 1 GiB of RAM in use.
fn external_checkpoint(ctx: &Ctx<'_>, big: Big) -> Result<(Row, Vec<String>)> {
    let n = ctx.settings.big_reps;
    let dir = ctx.images();
    let Big {
        domain,
        _qemu,
        mut qmp,
    } = big;
    let fill_daemon = wait_filled("vmsnap guest", |a| daemon_xp(&domain, a))?;
    let fill_floor = wait_filled("floor guest", |a| floor_xp(&mut qmp, a))?;
    // As the daemon does: no bandwidth limit for a local file; events for the floor's wait.
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    )?;
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 40}),
    )?;

    let memdir = dir.join("memory");
    std::fs::create_dir_all(&memdir)?;
    let (mut dbus, mut client, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let mut sizes = Vec::new();
    for i in 0..n {
        let file = memdir.join(format!("dbus-{i}.mem"));
        let (d, _) = timed(|| {
            block(async {
                let o = opts(vec![
                    ("memory", Value::from("external")),
                    (
                        "memory-file",
                        Value::from(file.to_str().unwrap_or_default()),
                    ),
                ]);
                Ok(domain.create_snapshot(&format!("bx{i}"), "", o).await?)
            })
        })?;
        dbus.push(d);
        sizes.push(std::fs::metadata(&file)?.len());
        std::fs::remove_file(&file)?;

        let file = memdir.join(format!("client-{i}.mem"));
        let f = file.to_str().context("path")?;
        client.push(ctx.client(&[
            "create",
            "big",
            "--name",
            &format!("bc{i}"),
            "--memory",
            "external",
            "--memory-file",
            f,
        ]));
        std::fs::remove_file(&file)?;

        let file = memdir.join(format!("floor-{i}.mem"));
        let out = create_exclusive(&file)?;
        let (f, _) = timed(|| {
            qmp.execute("stop", json!({}))?;
            qmp.execute_with_fd("getfd", json!({"fdname": "mem"}), out.as_fd())?;
            qmp.execute("migrate", json!({"uri": "fd:mem"}))?;
            qmp.wait_event("MIGRATION completed", |e| {
                e["event"] == "MIGRATION"
                    && (e["data"]["status"] == "completed" || e["data"]["status"] == "failed")
            })
            .and_then(|e| {
                ensure!(e["data"]["status"] == "completed", "floor migration failed");
                Ok(())
            })?;
            // QEMU reports completion just before it leaves `finish-migrate`; `cont` is
            // refused until then.
            while qmp.execute("query-status", json!({}))?["status"] == "finish-migrate" {}
            qmp.execute("cont", json!({}))
        })?;
        floor.push(f);
        qmp.clear_events();
        drop(out);
        sizes.push(std::fs::metadata(&file)?.len());
        std::fs::remove_file(&file)?;
    }
    // The guest's RAM is still the pattern after all those saves.
    let word = daemon_xp(&domain, 0x2000_0000)?;
    ensure!(
        word == FILL_PATTERN,
        "RAM changed after the saves: {word:#x}"
    );

    let size = *sizes.iter().max().unwrap_or(&0);
    let mut plain = Vec::new();
    let mut plain_sync = Vec::new();
    for i in 0..n.min(3) {
        let (w, s) = plain_write(&memdir.join(format!("plain-{i}")), size)?;
        plain.push(w);
        plain_sync.push(s);
    }
    let mbs = |d: Option<Duration>| {
        d.map_or("–".into(), |d| {
            format!("{:.0} MB/s", size as f64 / 1e6 / d.as_secs_f64())
        })
    };
    let med = super::stats::median;
    let notes = vec![
        format!(
            "External checkpoint: VM state file {:.0} MiB (RAM filled from 1 MiB to 1 GiB with \
             0x{FILL_PATTERN:08x}; checked with HMP `xp` at {} in both guests). Both guests start \
             after the other operations (while filling, each takes a host core) and fill their \
             RAM at once: the fill took {:.1} s in the vmsnap guest and {:.1} s more in the \
             floor guest (accelerator {}).",
            size as f64 / f64::from(1 << 20),
            guest::probe_addresses()
                .iter()
                .map(|a| format!("{a:#x}"))
                .collect::<Vec<_>>()
                .join(", "),
            fill_daemon.as_secs_f64(),
            fill_floor.as_secs_f64(),
            accel(),
        ),
        format!(
            "Throughput of the same {:.0} MiB: vmsnap D-Bus {}, client {}, raw `migrate` floor {}; \
             plain sequential write of non-zero data to the same filesystem {} without fsync \
             (neither QEMU nor vmsnapd fsyncs the state file), {} with fsync.",
            size as f64 / f64::from(1 << 20),
            mbs(med(&dbus)),
            mbs(med(&client)),
            mbs(med(&floor)),
            mbs(med(&plain)),
            mbs(med(&plain_sync)),
        ),
    ];
    let row = Row {
        operation: "external checkpoint, 1 GiB of RAM in use".into(),
        reps: n,
        dbus: Cell::of(&dbus),
        client: Cell::of(&client),
        floor: Cell::of(&floor),
        target: 1.2,
    };
    Ok((row, notes))
}
