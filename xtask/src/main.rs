//! Project automation, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `ci`: install system packages, then format check, clippy, build and the whole test suite
//!   (nextest when installed, else `cargo test`), stopping at the first failed step.
//! - `demo`: install system packages, build, then drive a real vmsnapd on a private bus with
//!   the `vmsnap` client through a guest's life, echoing every command. Everything it starts is
//!   stopped and removed at the end, on failure too (the test harness's guards do it).
//! - `bench [--smoke] [--only ops|catalog] [--accel tcg|kvm]`: release build, then vmsnap
//!   (D-Bus and client) against the raw QMP floor and catalog scale; writes `BENCHMARKS.md`
//!   (see [`bench`]).
//! - `dbus-xml`: build, then rewrite `dbus-interfaces/org.vmsnap.VmSnap1.xml` from a running
//!   daemon's introspection with each member's `///` doc as a DocString annotation (the
//!   introspection test with `VMSNAP_BLESS=1`).
//! - `man`: build, then write the client's man pages into `target/man/man1`.
//! - `install [--destdir DIR] [--prefix /usr] [--debug]`: release build (or the debug build
//!   with `--debug`), then the binaries and the `systemd/` files laid out under `DIR/PREFIX`
//!   (see `vmsnap_tests::install`, which the systemd tests install through as well).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod bench;

use anyhow::{Context, Result, bail};
use vmsnap_tests::{DiskSpec, TestEnv, counter_boot_qcow2, domain_xml};

const USAGE: &str = "usage: cargo xtask <ci|demo|bench|dbus-xml|man>
  ci               fmt check, clippy, build, tests (what CI runs)
  demo             build and run vmsnapd with a small guest on a private bus
  bench [--smoke] [--only ops|catalog] [--accel tcg|kvm]
                   release build, vmsnap against the raw QMP floor, write BENCHMARKS.md
                   (--only: one part, printed only; guests under TCG unless --accel kvm)
  dbus-xml         regenerate dbus-interfaces/org.vmsnap.VmSnap1.xml from the daemon
  man              write the vmsnap man pages into target/man/man1
  install [--destdir DIR] [--prefix /usr] [--debug]
                   build, then install binaries, units, D-Bus and polkit files";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map_or((None, &[][..]), |(t, r)| (Some(t), r));
    match task.map(String::as_str) {
        Some("ci") => ci(),
        Some("demo") => demo(),
        Some("bench") => bench::bench(&root(), &cargo(), rest),
        Some("bench-run") => bench::bench_run(&root(), rest),
        Some("dbus-xml") => dbus_xml(),
        Some("man") => man(),
        Some("install") => install(rest),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The cargo that runs us, so toolchain overrides carry over.
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs one step in the workspace root, echoing it first; fails if it fails.
fn step(program: &str, args: &[&str]) -> Result<()> {
    let shown = Path::new(program)
        .file_name()
        .map_or(program.into(), |n| n.to_string_lossy().into_owned());
    println!("==> {shown} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("`{shown} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Regenerates the committed introspection XML: the introspection test, blessing.
fn dbus_xml() -> Result<()> {
    let cargo = cargo();
    step(&cargo, &["build", "--workspace"])?;
    let status = Command::new(&cargo)
        .args([
            "test",
            "-p",
            "vmsnap-tests",
            "--test",
            "integration",
            "introspection::introspection_xml_matches_committed_file",
        ])
        .env("VMSNAP_BLESS", "1")
        .current_dir(root())
        .status()
        .context("cannot run cargo test")?;
    if !status.success() {
        bail!("the introspection test failed while blessing ({status})");
    }
    println!("==> wrote dbus-interfaces/org.vmsnap.VmSnap1.xml");
    Ok(())
}

/// Writes the client's man pages (`vmsnap man --out-dir`) into `target/man/man1`.
fn man() -> Result<()> {
    let cargo = cargo();
    step(&cargo, &["build", "-p", "vmsnap"])?;
    let dir = root().join("target/man/man1");
    let client = root().join("target/debug/vmsnap");
    step(
        client.to_str().context("non-UTF-8 path")?,
        &["man", "--out-dir", dir.to_str().context("non-UTF-8 path")?],
    )?;
    println!("==> man pages in {}", dir.display());
    Ok(())
}

fn install_deps() -> Result<()> {
    step("bash", &["scripts/install-deps.sh"])
}

fn has_nextest() -> bool {
    Command::new(cargo())
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ci() -> Result<()> {
    let cargo = cargo();
    install_deps()?;
    step(&cargo, &["fmt", "--all", "--", "--check"])?;
    step(
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    step(&cargo, &["build", "--workspace", "--locked"])?;
    if has_nextest() {
        step(
            &cargo,
            &[
                "nextest",
                "run",
                "--workspace",
                "--locked",
                "--no-fail-fast",
            ],
        )?;
    } else {
        println!("cargo-nextest is not installed: running cargo test instead");
        step(
            &cargo,
            &["test", "--workspace", "--locked", "--no-fail-fast"],
        )?;
    }
    println!("==> ci passed");
    Ok(())
}

/// `cargo xtask install`: builds, then installs through the layout the systemd tests use.
fn install(args: &[String]) -> Result<()> {
    let mut destdir = PathBuf::from("/");
    let mut prefix = PathBuf::from("/usr");
    let mut debug = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--destdir" => destdir = it.next().context("--destdir needs a folder")?.into(),
            "--prefix" => prefix = it.next().context("--prefix needs a folder")?.into(),
            "--debug" => debug = true,
            other => bail!("unknown install option {other:?}\n{USAGE}"),
        }
    }
    if !prefix.is_absolute() {
        bail!("--prefix must be absolute, not {}", prefix.display());
    }
    let mut build = vec!["build", "--locked", "-p", "vmsnapd", "-p", "vmsnap"];
    if !debug {
        build.push("--release");
    }
    step(&cargo(), &build)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let plan = vmsnap_tests::install::InstallPlan {
        bin_dir: target.join(if debug { "debug" } else { "release" }),
        destdir,
        prefix,
    };
    for path in vmsnap_tests::install::install(&plan).context("install failed")? {
        println!("installed {}", path.display());
    }
    if plan.destdir == Path::new("/") {
        println!(
            "==> now: systemctl daemon-reload && systemctl reload dbus && systemctl enable --now vmsnapd"
        );
    }
    Ok(())
}

fn demo() -> Result<()> {
    install_deps()?;
    step(&cargo(), &["build", "--workspace", "--locked"])?;
    // The harness panics on any failure; unwinding drops the daemon, its guests and the bus
    // and removes the temporary directory before we report.
    match catch_unwind(AssertUnwindSafe(run_demo)) {
        Ok(()) => {
            println!("==> demo finished; everything it started is stopped and removed");
            Ok(())
        }
        Err(_) => bail!("the demo failed (see above); everything it started was cleaned up"),
    }
}

fn run_demo() {
    println!(
        "==> starting a private system bus with systemd/share/dbus-1/system.d's policy and vmsnapd"
    );
    let env = TestEnv::start();
    println!("bus:     {}", env.bus_address());
    println!(
        "vmsnapd: pid {}, log {}",
        env.daemon.pid().unwrap_or(0),
        env.daemon.log_path().display()
    );
    println!(
        "try:     busctl --address={} tree org.vmsnap.VmSnap1",
        env.bus_address()
    );

    let disk = env.images_dir().join("demo.qcow2");
    counter_boot_qcow2(&disk);
    let xml = domain_xml("demo", &[DiskSpec::new(&disk, "qcow2", "vda")]);
    let xml_path = env.write_xml("demo", &xml);
    println!("==> the guest: a qcow2 disk whose boot sector counts in a loop\n{xml}");

    let vmsnap = env.client.clone().echoing(true);
    let xml_arg = xml_path.to_string_lossy().into_owned();
    vmsnap.ok(["domain", "define", xml_arg.as_str()]);
    vmsnap.ok(["domain", "start", "demo"]);
    vmsnap.ok(["domain", "list"]);
    vmsnap.ok(["domain", "info", "demo"]);
    vmsnap.ok(["domain", "pause", "demo"]);
    vmsnap.ok(["domain", "resume", "demo"]);
    vmsnap.ok([
        "create",
        "demo",
        "--name",
        "first",
        "--description",
        "internal checkpoint",
    ]);
    vmsnap.ok(["create", "demo", "--name", "second"]);
    vmsnap.ok(["list", "demo"]);
    vmsnap.ok(["revert", "demo", "first"]);
    vmsnap.ok(["info", "demo", "first"]);
    vmsnap.ok(["delete", "demo", "second"]);
    vmsnap.ok(["list", "demo"]);
    vmsnap.ok(["create", "demo", "--name", "overlay", "--disk-only"]);
    vmsnap.ok(["list", "demo"]);
    vmsnap.ok(["domain", "info", "demo"]);
    vmsnap.ok(["domain", "destroy", "demo"]);
    vmsnap.ok(["domain", "undefine", "demo", "--snapshots-metadata"]);
    vmsnap.ok(["domain", "list"]);
    println!("==> stopping vmsnapd and the bus");
}
