//! The `vmsnapd` binary: parses flags, sets up logging and runs the daemon library.

use std::path::PathBuf;

use clap::Parser;
use vmsnapd::config::{
    BusChoice, Config, DEFAULT_ADMIN_GROUP, DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR,
};

/// QEMU snapshot manager daemon, serving org.vmsnap.VmSnap1 on D-Bus.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Persistent state (the catalog).
    #[arg(long, default_value = DEFAULT_STATE_DIR, env = "VMSNAPD_STATE_DIR")]
    state_dir: PathBuf,
    /// Runtime files (QMP sockets, pid files, QEMU logs).
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR, env = "VMSNAPD_RUNTIME_DIR")]
    runtime_dir: PathBuf,
    /// Serve on the system bus (the default).
    #[arg(long, conflicts_with_all = ["session", "address"])]
    system: bool,
    /// Serve on the session bus.
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
    let config = Config {
        state_dir: args.state_dir,
        runtime_dir: args.runtime_dir,
        bus,
        qemu_binary: args.qemu,
        storage_dirs: args.storage_dirs,
        admin_group: args.admin_group,
        polkit: !args.no_polkit,
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
