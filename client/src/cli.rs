//! Command-line syntax of `vmsnap`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

const EXIT_CODES: &str = "\
EXIT CODES:
  0  success
  1  failed (QEMU error, internal failure, bus unreachable)
  2  usage error
  3  not found (no such domain, snapshot or job)
  4  already exists
  5  busy (another operation runs on the domain)
  6  not authorised
  7  invalid argument
  8  unsupported
  9  invalid state (e.g. the domain is not running)
 10  timed out
 11  cancelled
 12  `vmsnap check` found a broken, mismatched or pending snapshot or an orphan file";

/// Command-line client of vmsnapd, the QEMU snapshot manager.
#[derive(Parser, Debug)]
#[command(version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// Bus address (default: the system bus; DBUS_SYSTEM_BUS_ADDRESS is honoured).
    #[arg(long, global = true, env = "VMSNAP_ADDRESS")]
    pub address: Option<String>,
    /// Use the session bus.
    #[arg(long, global = true)]
    pub session: bool,
    /// Print results and errors as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage domains.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Print the client's and the daemon's versions.
    Version,
    /// Take a snapshot of a domain.
    #[command(after_help = "Examples:
  vmsnap create web1 --name before-upgrade                  # internal checkpoint of a running guest
  vmsnap create web1 --disk-only                            # external overlays on every disk
  vmsnap create web1 --memory external --memory-file /var/lib/vm/web1.mem --live
  vmsnap create web1 --disk vda=internal --disk vdb=external:/vm/vdb.snap1.qcow2 --disk-only
  vmsnap create web1 --xml snapshot.xml                     # a libvirt <domainsnapshot> document")]
    Create(CreateArgs),
    /// Verify every snapshot of a domain against its images (read-only); exit code 12 when
    /// something is wrong.
    #[command(after_help = "Example:\n  vmsnap check web1 --json")]
    Check {
        /// Domain name.
        domain: String,
    },
    /// List a domain's snapshots.
    #[command(after_help = "Example:\n  vmsnap list web1 --json")]
    List {
        /// Domain name.
        domain: String,
    },
    /// Show one snapshot.
    #[command(after_help = "Example:\n  vmsnap info web1 before-upgrade")]
    Info {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// Revert a domain to a snapshot.
    #[command(
        after_help = "Examples:\n  vmsnap revert web1 before-upgrade\n  vmsnap revert web1 before-upgrade --paused"
    )]
    Revert {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        snapshot: String,
        /// End running, whatever the snapshot recorded.
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// End paused, whatever the snapshot recorded.
        #[arg(long)]
        paused: bool,
        /// Delete the snapshot's descendants first instead of branching.
        #[arg(long)]
        delete_children: bool,
        /// Replace a running guest whose disks or hardware changed since the snapshot.
        #[arg(long)]
        force: bool,
    },
    /// Delete a snapshot.
    #[command(
        after_help = "Examples:\n  vmsnap delete web1 before-upgrade\n  vmsnap delete web1 old --metadata-only"
    )]
    Delete {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        snapshot: String,
        /// Forget the record only; keep every file.
        #[arg(long)]
        metadata_only: bool,
        /// Delete the snapshot and all its descendants.
        #[arg(long, conflicts_with = "children_only")]
        children: bool,
        /// Delete the snapshot's descendants and keep it.
        #[arg(long)]
        children_only: bool,
    },
    /// Print a snapshot as libvirt <domainsnapshot> XML.
    #[command(after_help = "Example:\n  vmsnap dumpxml web1 before-upgrade")]
    Dumpxml {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        snapshot: String,
    },
}

/// `vmsnap create ...`
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Domain name.
    pub domain: String,
    /// Snapshot name (default: from the time).
    #[arg(long)]
    pub name: Option<String>,
    /// Free text kept with the snapshot.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Snapshot the disks only (no VM state).
    #[arg(long)]
    pub disk_only: bool,
    /// Where VM state goes: internal, external or none.
    #[arg(long)]
    pub memory: Option<String>,
    /// File for external VM state.
    #[arg(long)]
    pub memory_file: Option<PathBuf>,
    /// Disk holding internal VM state (default: the first writable qcow2 disk).
    #[arg(long)]
    pub vmstate_disk: Option<String>,
    /// Per-disk mode: TARGET=internal, TARGET=external[:FILE] or TARGET=no (repeatable).
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// With external VM state: keep the guest running while RAM is copied.
    #[arg(long)]
    pub live: bool,
    /// Rename the current image to the snapshot's file and keep the original path active.
    #[arg(long)]
    pub keep_active_name: bool,
    /// Revert to this snapshot first, so the new one branches from it.
    #[arg(long)]
    pub parent: Option<String>,
    /// A libvirt <domainsnapshot> document describing the snapshot.
    #[arg(long, conflicts_with_all = ["name", "disk_only", "memory", "memory_file", "disks", "vmstate_disk"])]
    pub xml: Option<PathBuf>,
    /// Print the job's path and return at once.
    #[arg(long)]
    pub no_wait: bool,
}

/// `vmsnap domain ...`
#[derive(Subcommand, Debug)]
pub enum DomainCommand {
    /// Define a managed domain from a libvirt-style domain XML file.
    #[command(after_help = "Example:\n  vmsnap domain define web1.xml")]
    Define {
        /// The domain XML file.
        file: PathBuf,
    },
    /// Forget a shut-off domain (its disk images are kept).
    #[command(after_help = "Example:\n  vmsnap domain undefine web1")]
    Undefine {
        /// Domain name.
        name: String,
        /// Also forget the domain's snapshot records (their files are kept).
        #[arg(long)]
        snapshots_metadata: bool,
    },
    /// Register a QEMU started by someone else, by its QMP socket.
    #[command(after_help = "Example:\n  vmsnap domain attach legacy --qmp /run/legacy/qmp.sock")]
    Attach {
        /// Name to give the domain.
        name: String,
        /// Absolute path of the QEMU's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
    },
    /// Start a managed domain.
    #[command(after_help = "Example:\n  vmsnap domain start web1 --paused")]
    Start {
        /// Domain name.
        name: String,
        /// Leave the vCPUs stopped.
        #[arg(long)]
        paused: bool,
    },
    /// Ask the guest to power off and wait for it.
    #[command(after_help = "Example:\n  vmsnap domain shutdown web1 --timeout 60 --force")]
    Shutdown {
        /// Domain name.
        name: String,
        /// Seconds to wait (default 120).
        #[arg(long)]
        timeout: Option<u32>,
        /// Destroy the guest when the timeout passes.
        #[arg(long)]
        force: bool,
        /// Print the job's path and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop the guest at once.
    #[command(after_help = "Example:\n  vmsnap domain destroy web1")]
    Destroy {
        /// Domain name.
        name: String,
    },
    /// Pause the guest's vCPUs.
    #[command(after_help = "Example:\n  vmsnap domain pause web1")]
    Pause {
        /// Domain name.
        name: String,
    },
    /// Resume the guest's vCPUs.
    #[command(after_help = "Example:\n  vmsnap domain resume web1")]
    Resume {
        /// Domain name.
        name: String,
    },
    /// List domains.
    #[command(after_help = "Example:\n  vmsnap domain list --json")]
    List,
    /// Pass a command to the guest's QEMU monitor (QMP JSON, or HMP with --hmp).
    #[command(
        after_help = "Examples:\n  vmsnap domain monitor web1 '{\"execute\":\"query-status\"}'\n  vmsnap domain monitor web1 --hmp 'info block'"
    )]
    Monitor {
        /// Domain name.
        name: String,
        /// The command.
        command: String,
        /// The command is a human monitor command line.
        #[arg(long)]
        hmp: bool,
    },
    /// Show a domain's state and disks.
    #[command(after_help = "Example:\n  vmsnap domain info web1")]
    Info {
        /// Domain name.
        name: String,
    },
    /// Print a domain's definition as XML.
    #[command(after_help = "Example:\n  vmsnap domain dumpxml web1 > web1.xml")]
    Dumpxml {
        /// Domain name.
        name: String,
    },
    /// Add a disk (a `<disk>` XML file); hot-plugged when the guest runs.
    #[command(after_help = "Example:\n  vmsnap domain attach-disk web1 data-disk.xml")]
    AttachDisk {
        /// Domain name.
        name: String,
        /// File holding one `<disk>` element.
        file: PathBuf,
        /// Only change the definition.
        #[arg(long)]
        config_only: bool,
    },
    /// Remove a disk by target; hot-unplugged when the guest runs.
    #[command(after_help = "Example:\n  vmsnap domain detach-disk web1 sdb")]
    DetachDisk {
        /// Domain name.
        name: String,
        /// Target device, e.g. vdb.
        target: String,
        /// Only change the definition.
        #[arg(long)]
        config_only: bool,
    },
}
