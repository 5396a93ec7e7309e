//! `cargo xtask bench`: vmsnap against the raw QMP floor, and catalog scale.
//!
//! The outer task builds the workspace (release; debug with `--smoke`) and runs the built
//! xtask again as `bench-run` with `VMSNAPD_BIN` / `VMSNAP_BIN` naming the binaries of the same
//! profile and the daemon's log level at `info`, so the harness (private bus, real vmsnapd,
//! real QEMU) drives exactly what was built. The full run writes `BENCHMARKS.md` in the
//! workspace root and prints it; the smoke run (tiny counts, no 1 GiB guest) only prints.
//! Method and caveats are written into the report itself (see [`report`]).
//! `--only catalog` (or `VMSNAP_BENCH_ONLY=catalog` for `bench-run`) runs only the catalog
//! scale and prints it (for profiling).

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

/// `cargo xtask bench [--smoke] [--only catalog]`: build, then run the measurements in a
/// child. `--only catalog` measures the catalog scale alone and prints it (writes nothing).
pub fn bench(root: &Path, cargo: &str, args: &[String]) -> Result<()> {
    let mut smoke = false;
    let mut only_catalog = false;
    let mut rest = args.iter();
    while let Some(a) = rest.next() {
        match (a.as_str(), rest.as_slice().first().map(String::as_str)) {
            ("--smoke", _) => smoke = true,
            ("--only", Some("catalog")) => {
                only_catalog = true;
                rest.next();
            }
            _ => bail!("usage: cargo xtask bench [--smoke] [--only catalog]"),
        }
    }
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
        .env("VMSNAP_TEST_LOG_LEVEL", "info");
    if smoke {
        run.arg("--smoke");
    }
    if only_catalog {
        run.env("VMSNAP_BENCH_ONLY", "catalog");
    }
    let status = run.status().context("cannot run the benchmark")?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

/// `xtask bench-run [--smoke]`: the measurements themselves (started by [`bench`]).
pub fn bench_run(root: &Path, args: &[String]) -> Result<()> {
    let settings = Settings::new(args.iter().any(|a| a == "--smoke"));
    let started = Instant::now();
    if std::env::var("VMSNAP_BENCH_ONLY").as_deref() == Ok("catalog") {
        // For profiling the catalog side alone: measure and print, write nothing.
        for scale in catalog::run(&settings)? {
            println!("{scale:?}");
        }
        return Ok(());
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
