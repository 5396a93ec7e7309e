//! The report: machine facts, method, the operations table, the catalog table, and notes.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::Settings;
use super::catalog::Scale;
use super::ops::OpsReport;
use super::stats::{fmt, ratio, table};

/// The hand-written analysis of missed targets (callgrind evidence), kept beside the code and
/// read when the report is written, so that every run of the benchmark carries it.
pub const ANALYSIS_FILE: &str = "xtask/src/bench/analysis.md";

/// Facts about the machine the numbers come from.
#[derive(Debug)]
pub struct Facts {
    lines: Vec<(String, String)>,
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// Reads nproc, memory, CPU model, kernel, QEMU version, date and commit.
pub fn machine_facts() -> Result<Facts> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("/proc/cpuinfo")?;
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, m)| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("/proc/meminfo")?;
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism().map_or(0, usize::from);
    let lines = vec![
        ("date".into(), format!("{:.0}", jiff::Timestamp::now())),
        ("nproc".into(), nproc.to_string()),
        (
            "memory".into(),
            format!("{:.1} GiB", mem_kib as f64 / f64::from(1 << 20)),
        ),
        ("CPU".into(), model),
        ("kernel".into(), first_line("uname", &["-r"])),
        (
            "QEMU".into(),
            first_line("qemu-system-x86_64", &["--version"]),
        ),
        (
            "accelerator".into(),
            format!(
                "{} (`--accel`, default tcg; vmsnapd's guests and the floor QEMU alike)",
                super::ops::accel()
            ),
        ),
        (
            "commit".into(),
            first_line("git", &["rev-parse", "--short", "HEAD"]),
        ),
    ];
    Ok(Facts { lines })
}

fn kib(k: u64) -> String {
    format!("{:.1} MiB", k as f64 / 1024.0)
}

fn bytes(b: usize) -> String {
    match b {
        0 => "–".into(),
        b if b < 1 << 20 => format!("{:.0} KB", b as f64 / 1000.0),
        b => format!("{:.1} MB", b as f64 / 1e6),
    }
}

fn maybe(r: &Result<Duration, String>) -> String {
    match r {
        Ok(d) => fmt(*d),
        Err(e) => e.clone(),
    }
}

fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

/// The operations table alone, for `--only ops` (printed, not written).
pub fn ops_only(ops: &OpsReport, took: Duration) -> String {
    let mut s = format!(
        "## Operations against the raw QMP floor (accelerator {}, {:.0} s)\n\n",
        super::ops::accel(),
        took.as_secs_f64()
    );
    s.push_str(&table(&ops.rows));
    s.push('\n');
    for n in &ops.notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}

/// The whole markdown document.
pub fn render(
    settings: &Settings,
    facts: &Facts,
    ops: &OpsReport,
    scales: &[Scale],
    took: Duration,
    analysis: &str,
) -> String {
    let mut s = String::from("# Benchmarks\n\n");
    s.push_str(
        "Written by `cargo xtask bench` (see README.md); do not edit by hand. Medians of repeated \
         runs; the ratio is vmsnap over D-Bus divided by the raw QMP floor measured in the same \
         run on a QEMU of the benchmark's own with the same kind of guest.\n\n",
    );
    if settings.smoke {
        s.push_str(
            "**Smoke run: tiny counts, debug build, no 1 GiB guest. Not a measurement.**\n\n",
        );
    }
    s.push_str("## Machine\n\n| | |\n|---|---|\n");
    for (k, v) in &facts.lines {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "| benchmark run time | {:.0} s |", took.as_secs_f64());

    s.push_str("\n## Operations against the raw QMP floor\n\n");
    s.push_str(&table(&ops.rows));
    s.push('\n');
    for n in &ops.notes {
        let _ = writeln!(s, "- {n}");
    }

    s.push_str("\n## Catalog scale\n\n");
    s.push_str(
        "| records | start until READY=1 | VmRSS at READY | VmRSS after the calls | \
         ListSnapshots | ListSnapshots + Name of each | GetManagedObjects (root): reply in | \
         decoded | `vmsnap list` | offline create |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in scales {
        let _ = writeln!(
            s,
            "| {} | {} (n={}) | {} | {} | {} | {} | {} ({}) | {} | {} | {} (n={}) |",
            c.records,
            fmt(c.start),
            c.starts,
            kib(c.rss_ready_kib),
            kib(c.rss_after_kib),
            fmt(c.list),
            maybe(&c.list_names),
            maybe(&c.managed_raw),
            bytes(c.managed_bytes),
            maybe(&c.managed),
            maybe(&c.client_list),
            fmt(c.create),
            c.creates,
        );
    }
    if let (Some(small), Some(big)) = (scales.first(), scales.last()) {
        let tenth = Duration::from_millis(100);
        let create_ratio = ratio(big.create, small.create);
        let _ = write!(
            s,
            "\nTargets at {} records: listing under 0.1 s: ListSnapshots {} ({}), \
             GetManagedObjects reply in {} ({}), decoded {} ({}); start under 0.1 s: {} ({}); \
             resident memory under 20 MiB with the records loaded (at READY): {} ({}), after \
             the calls {} (buffers the allocator keeps, see Notes); create within 1.2x of \
             create at {} records: {:.2}x ({}).\n",
            big.records,
            fmt(big.list),
            yes_no(big.list < tenth),
            maybe(&big.managed_raw),
            yes_no(matches!(big.managed_raw, Ok(d) if d < tenth)),
            maybe(&big.managed),
            yes_no(matches!(big.managed, Ok(d) if d < tenth)),
            fmt(big.start),
            yes_no(big.start < tenth),
            kib(big.rss_ready_kib),
            yes_no(big.rss_ready_kib < 20 * 1024),
            kib(big.rss_after_kib),
            small.records,
            create_ratio,
            yes_no(create_ratio <= 1.2),
        );
    }

    let _ = write!(
        s,
        "\n## Method\n\n\
         - `cargo xtask bench` builds the workspace with `cargo build --release --workspace` \
           (one codegen unit and link-time optimisation, as `[profile.release]` sets), then \
           runs the benchmark with the test harness (`vmsnap-tests`): a private `dbus-daemon` \
           with the project's policy, the release `vmsnapd` (ready on `READY=1`, log level \
           `info`), the release `vmsnap` client, and QEMU under the accelerator of `--accel` (TCG by \
           default, as in the test suite: where `/dev/kvm` opens under nested virtualisation \
           KVM guests can run far slower than TCG). Everything it creates lives \
           in temporary directories that are removed at the end.\n\
         - **vmsnap D-Bus**: the time from sending the method call (zbus proxies of \
           `vmsnap-dbus`, one connection) to its reply; long operations wait for their result \
           (no `async`). **vmsnap client**: the `vmsnap` binary run end to end (process start, \
           bus connection, call, output). **Raw QMP floor**: the benchmark's own QMP client on \
           a QEMU it started itself (like the harness's `ForeignQemu`: q35, `-nodefaults`, \
           `-blockdev` disks on virtio-blk, with the same accelerator as vmsnapd's guests; the \
           same disks, guest code and RAM size, and the devices vmsnapd adds to every q35 \
           guest: four `pcie-root-port`s and a `virtio-scsi-pci`, whose state a checkpoint \
           saves and a revert loads), doing the least QEMU needs \
           for the same effect.\n\
         - The three columns are interleaved per repetition ({} repetitions; {} for the 1 GiB \
           guest), so slow phases of a shared machine hit all of them alike. Ratios, not \
           absolute times, are the stable result.\n\
         - Floors: external disk-only = one `transaction` of two `blockdev-snapshot-sync` \
           (overlay files named up front); internal checkpoint = `snapshot-save` job until \
           concluded + `job-dismiss` (the floor's image also gets an untimed second \
           checkpoint per round, as vmsnapd's gets one through D-Bus and one through the \
           client, and loses it again in the delete round); revert = `stop` + \
           `snapshot-load` job + `cont`; delete internal = `snapshot-delete` job; delete an external leaf = active `block-commit` \
           of both disks' top overlays into the layer below + `job-complete` (the daemon \
           deletes the current leaf snapshot of the same chain, client and D-Bus in turn); external \
           checkpoint = `stop` + `getfd` (the file passed with SCM_RIGHTS) + `migrate fd:` \
           until the `MIGRATION` event says completed + `cont`, with `max-bandwidth` unlimited \
           as the daemon sets it.\n\
         - The guests of the other operations (64 MiB) boot a sector that halts at once with \
           interrupts off, so their virtual CPUs sleep: on two host cores a busy TCG guest \
           takes a core each, and every process of the D-Bus path (client, dbus-daemon, \
           vmsnapd) would then wait for a core at each hop, which the floor's single hop \
           mostly does not. The 1 GiB guests start after them.\n\
         - The 1 GiB guest is a hand-assembled boot sector (`xtask/src/bench/guest.rs`) that \
           enters protected mode and fills guest RAM from 1 MiB to 1 GiB with a non-zero \
           pattern (zero pages would be skipped by migration), then halts; both guests are \
           checked with HMP `xp` before timing. The plain-write baseline writes the same number \
           of non-zero bytes to the same filesystem in 1 MiB `write`s.\n\
         - Catalog: records are inserted with SQLite into the stopped daemon's \
           `catalog.sqlite3` (one shut-off domain, a parent chain of committed disk-only \
           records, the last one current), then the daemon is started again \
           ({} starts per size, timed from spawn to `READY=1`, the harness's `Daemon`). \
           VmRSS comes from /proc/PID/status, right after `READY=1` and again after all \
           the calls at that size. `GetManagedObjects` is timed until its reply message is \
           in (not decoded; its body size in brackets) and decoded into zbus's variant maps \
           (`ObjectManagerProxy`); `vmsnap list` is the client run end to end with `--json`. \
           The create is an offline internal disk-only \
           snapshot of the shut-off domain (`qemu-img snapshot -c` plus the catalog), deleted \
           again untimed. Calls whose time grows fast with the catalog are cut off after {} \
           per size.\n",
        settings.reps,
        settings.big_reps,
        settings.reps,
        fmt(settings.slow_call_budget),
    );
    s.push_str("\n## Notes\n\n");
    s.push_str(analysis);
    s
}
