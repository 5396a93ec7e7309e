//! The `vmsnapd` binary: parses flags, sets up logging and runs the daemon library.

use std::path::PathBuf;

use clap::Parser;
use vmsnapd::config::{
    BusChoice, Config, DEFAULT_ADMIN_GROUP, DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR, GuestUnits,
};

/// QEMU snapshot manager daemon, serving org.vmsnap.VmSnap1 on D-Bus.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Persistent state (the catalog) [default: /var/lib/vmsnap, with --session
    /// $XDG_STATE_HOME/vmsnap].
    #[arg(long, env = "VMSNAPD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Runtime files (QMP sockets, pid files, QEMU logs) [default: /run/vmsnap, with
    /// --session $XDG_RUNTIME_DIR/vmsnap].
    #[arg(long, env = "VMSNAPD_RUNTIME_DIR")]
    runtime_dir: Option<PathBuf>,
    /// Serve on the system bus (the default).
    #[arg(long, conflicts_with_all = ["session", "address"])]
    system: bool,
    /// Serve on the session bus, for one user; state in the XDG directories.
    #[arg(long, conflicts_with = "address")]
    session: bool,
    /// Serve on the bus at this address (e.g. a private test bus).
    #[arg(long)]
    address: Option<String>,
    /// Log filter, e.g. `info` or `vmsnapd=debug` (RUST_LOG overrides it).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// The QEMU binary for managed guests.
    #[arg(long, default_value = "qemu-system-x86_64", env = "VMSNAPD_QEMU")]
    qemu: PathBuf,
    /// A directory that may hold disk images, overlays and memory files, besides
    /// STATE_DIR/images (repeatable; the environment variable takes a ':'-separated list).
    #[arg(
        long = "storage-dir",
        env = "VMSNAPD_STORAGE_DIRS",
        value_delimiter = ':'
    )]
    storage_dirs: Vec<PathBuf>,
    /// Members of this group may change domains and snapshots, like root.
    #[arg(long, default_value = DEFAULT_ADMIN_GROUP, env = "VMSNAPD_ADMIN_GROUP")]
    admin_group: String,
    /// Never ask polkit; only root and the admin group may change anything.
    #[arg(long)]
    no_polkit: bool,
    /// Start each guest in a transient systemd unit of its own (`systemd`), as a child in
    /// its own process group (`none`), or the former when running as a systemd service.
    #[arg(long, default_value = "auto", env = "VMSNAPD_GUEST_UNITS")]
    guest_units: GuestUnits,
}

/// `$VAR/vmsnap`, or `$HOME/FALLBACK/vmsnap` when `VAR` is unset or not absolute (the XDG
/// base directory rules).
fn xdg_dir(var: &str, fallback: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(var).map(PathBuf::from)
        && dir.is_absolute()
    {
        return Ok(dir.join("vmsnap"));
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|h| h.is_absolute())
        .ok_or_else(|| anyhow::anyhow!("--session needs ${var} or $HOME"))?;
    Ok(home.join(fallback).join("vmsnap"))
}

fn main() -> anyhow::Result<()> {
    if vmsnapd::testhooks::enabled("list-crash-steps") {
        for step in vmsnapd::journal::STEPS {
            println!("{step}");
        }
        return Ok(());
    }
    let args = Args::parse();
    vmsnapd::logging::init(&args.log_level);
    let bus = match (args.session, args.address) {
        (true, _) => BusChoice::Session,
        (false, Some(a)) => BusChoice::Address(a),
        (false, None) => BusChoice::System,
    };
    let (state_dir, runtime_dir) = match (args.state_dir, args.runtime_dir, args.session) {
        (Some(s), Some(r), _) => (s, r),
        (s, r, true) => (
            s.map_or_else(|| xdg_dir("XDG_STATE_HOME", ".local/state"), Ok)?,
            // Without $XDG_RUNTIME_DIR there is no per-user tmpfs; the cache folder will do.
            r.map_or_else(|| xdg_dir("XDG_RUNTIME_DIR", ".cache"), Ok)?,
        ),
        (s, r, false) => (
            s.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            r.unwrap_or_else(|| DEFAULT_RUNTIME_DIR.into()),
        ),
    };
    let config = Config {
        state_dir,
        runtime_dir,
        bus,
        qemu_binary: args.qemu,
        storage_dirs: args.storage_dirs,
        admin_group: args.admin_group,
        polkit: !args.no_polkit,
        guest_units: args.guest_units,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = vmsnapd::shutdown::on_signals()?;
        vmsnapd::run(config, shutdown).await?;
        anyhow::Ok(())
    })?;
    // Guests' reaper tasks must not keep the process alive once the daemon is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
