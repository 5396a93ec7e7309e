//! `cargo xtask bench`: vmsnap against the raw QMP floor, and catalog scale.
//!
//! The outer task builds the workspace (release; debug with `--smoke`) and runs the built
//! xtask again as `bench-run` with `VMSNAPD_BIN` / `VMSNAP_BIN` naming the binaries of the same
//! profile and the daemon's log level at `info`, so the harness (private bus, real vmsnapd,
//! real QEMU) drives exactly what was built. The full run writes `BENCHMARKS.md` in the
//! workspace root and prints it; the smoke run (tiny counts, no 1 GiB guest) only prints.
//! Method and caveats are written into the report itself (see [`report`]).
//!
//! Options: `--only ops|catalog` measures one part and prints its table without writing
//! `BENCHMARKS.md` (for before/after comparisons; `VMSNAP_BENCH_ONLY` is the same as an
//! environment variable); `--accel tcg|kvm` picks the accelerator of every guest, vmsnapd's
//! (through the harness's `VMSNAP_TEST_ACCEL`) and the floor QEMU's alike. The default is TCG:
//! on hosts where `/dev/kvm` opens under nested virtualisation, KVM guests can run far slower
//! than TCG ones, and the test suite runs every guest under TCG too. For profiling,
//! `VMSNAP_BENCH_DAEMON_LOG=FILE` keeps the operations' daemon log (its level comes from
//! `VMSNAP_TEST_LOG_LEVEL`, `info` unless set: `debug` logs every QMP command and event).

mod catalog;
mod guest;
mod ops;
mod qmp;
mod report;
mod stats;

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Which part of the benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only {
    /// Everything, writing `BENCHMARKS.md` (unless a smoke run).
    All,
    /// The operations against the raw QMP floor, printed only.
    Ops,
    /// The catalog scale, printed only.
    Catalog,
}

impl Only {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "ops" => Ok(Only::Ops),
            "catalog" => Ok(Only::Catalog),
            other => bail!("--only takes ops or catalog, not {other:?}"),
        }
    }
}

/// The environment variable through which the harness picks the accelerator of vmsnapd's
/// guests (`VMSNAPD_ACCEL` of the daemon it starts); the floor QEMU reads it too.
pub const ACCEL_ENV: &str = "VMSNAP_TEST_ACCEL";

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone)]
struct Args {
    smoke: bool,
    only: Only,
    accel: String,
}

const USAGE: &str = "usage: cargo xtask bench [--smoke] [--only ops|catalog] [--accel tcg|kvm]";

fn parse_args(args: &[String]) -> Result<Args> {
    let mut out = Args {
        smoke: false,
        only: match std::env::var("VMSNAP_BENCH_ONLY") {
            Ok(v) => Only::parse(&v)?,
            Err(_) => Only::All,
        },
        accel: "tcg".into(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => out.smoke = true,
            "--only" => out.only = Only::parse(it.next().context(USAGE)?)?,
            "--accel" => {
                let v = it.next().context(USAGE)?;
                if !matches!(v.as_str(), "tcg" | "kvm") {
                    bail!("--accel takes tcg or kvm, not {v:?}");
                }
                out.accel = v.clone();
            }
            _ => bail!("{USAGE}"),
        }
    }
    Ok(out)
}

/// How much to measure.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Smoke run: tiny counts, nothing written.
    pub smoke: bool,
    /// Repetitions per operation and column.
    pub reps: usize,
    /// Repetitions of the 1 GiB external checkpoint.
    pub big_reps: usize,
    /// Whether to run the 1 GiB guest at all.
    pub big_guest: bool,
    /// Catalog sizes, ascending.
    pub scales: Vec<usize>,
    /// Time allowed for the calls that grow fast with the catalog, per scale and kind.
    pub slow_call_budget: Duration,
}

impl Settings {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                smoke,
                reps: 2,
                big_reps: 0,
                big_guest: false,
                scales: vec![10, 100],
                slow_call_budget: Duration::from_secs(5),
            }
        } else {
            Self {
                smoke,
                reps: 9,
                big_reps: 3,
                big_guest: true,
                scales: vec![10, 1_000, 10_000],
                slow_call_budget: Duration::from_secs(20),
            }
        }
    }
}

/// Runs a future to completion on the benchmark's tokio runtime (zbus needs one that lives
/// across calls: its connection tasks run on it between `block`s).
pub fn block<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("cannot build the tokio runtime")
        })
        .block_on(future)
}

/// `cargo xtask bench [--smoke] [--only ops|catalog] [--accel tcg|kvm]`: build, then run
/// the measurements in a child.
pub fn bench(root: &Path, cargo: &str, args: &[String]) -> Result<()> {
    let parsed = parse_args(args)?;
    let smoke = parsed.smoke;
    let profile = if smoke { "debug" } else { "release" };
    let mut build = Command::new(cargo);
    build
        .current_dir(root)
        .args(["build", "--workspace", "--locked"]);
    if !smoke {
        build.arg("--release");
    }
    println!(
        "==> cargo build --workspace{}",
        if smoke { "" } else { " --release" }
    );
    let status = build.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("the build failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), Into::into)
        .join(profile);
    let mut run = Command::new(target.join("xtask"));
    run.current_dir(root)
        .arg("bench-run")
        .env("VMSNAPD_BIN", target.join("vmsnapd"))
        .env("VMSNAP_BIN", target.join("vmsnap"))
        .env(
            "VMSNAP_TEST_LOG_LEVEL",
            std::env::var("VMSNAP_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
        )
        .env(ACCEL_ENV, &parsed.accel)
        .args(args);
    let status = run.status().context("cannot run the benchmark")?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

/// `xtask bench-run [OPTIONS]`: the measurements themselves (started by [`bench`], with the
/// same options and [`ACCEL_ENV`] set).
pub fn bench_run(root: &Path, args: &[String]) -> Result<()> {
    let parsed = parse_args(args)?;
    let settings = Settings::new(parsed.smoke);
    let started = Instant::now();
    match parsed.only {
        Only::All => {}
        Only::Catalog => {
            // For profiling the catalog side alone: measure and print, write nothing.
            for scale in catalog::run(&settings)? {
                println!("{scale:?}");
            }
            return Ok(());
        }
        Only::Ops => {
            eprintln!(
                "bench: operations only ({} repetitions each, accelerator {})",
                settings.reps,
                ops::accel()
            );
            let ops = ops::run(&settings)?;
            println!("{}", report::ops_only(&ops, started.elapsed()));
            return Ok(());
        }
    }
    let facts = report::machine_facts()?;
    eprintln!("bench: operations ({} repetitions each)", settings.reps);
    let ops = ops::run(&settings)?;
    eprintln!("bench: catalog scale {:?}", settings.scales);
    let scales = catalog::run(&settings)?;
    let analysis_path = root.join(report::ANALYSIS_FILE);
    let analysis = std::fs::read_to_string(&analysis_path)
        .with_context(|| format!("cannot read {}", analysis_path.display()))?;
    let text = report::render(
        &settings,
        &facts,
        &ops,
        &scales,
        started.elapsed(),
        &analysis,
    );
    println!("{text}");
    if !settings.smoke {
        let path = root.join("BENCHMARKS.md");
        std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("==> wrote {}", path.display());
    }
    Ok(())
}
