//! Command-line syntax of `vmsnap`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The top-level `--help` epilogue: examples, then the exit codes.
const MAIN_HELP: &str = "\
EXAMPLES:
  vmsnap domain list
  vmsnap create web1 --name before-upgrade
  vmsnap list web1 --tree
  vmsnap revert web1 before-upgrade
  vmsnap jobs
  vmsnap --json info web1 before-upgrade

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
 12  `vmsnap check` found a broken, mismatched or pending snapshot or an orphan file

With --json, results are one JSON document on stdout and errors one JSON object
{\"error\": NAME, \"message\": TEXT} on stderr.";

/// Command-line client of vmsnapd, the QEMU snapshot manager.
#[derive(Parser, Debug)]
#[command(version, about, after_help = MAIN_HELP)]
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
    #[command(
        subcommand,
        after_help = "Examples:\n  vmsnap domain define web1.xml\n  vmsnap domain start web1"
    )]
    Domain(DomainCommand),
    /// Print the client's and the daemon's versions.
    #[command(after_help = "Example:\n  vmsnap version --json")]
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
    /// List a domain's snapshots: a table, or a tree with --tree.
    #[command(after_help = "Examples:
  vmsnap list web1                     # NAME CREATED STATE KIND C DESCRIPTION (C: * = current)
  vmsnap list web1 --tree              # the snapshot tree, like virsh snapshot-list --tree
  vmsnap list web1 --leaves --parent   # snapshots without children, with their parents
  vmsnap list web1 --json              # every field, for programs")]
    List {
        /// Domain name.
        domain: String,
        /// Draw the snapshot tree.
        #[arg(long, conflicts_with_all = ["roots", "leaves", "parent"])]
        tree: bool,
        /// Only snapshots without a parent.
        #[arg(long)]
        roots: bool,
        /// Only snapshots without children.
        #[arg(long)]
        leaves: bool,
        /// Add a PARENT column.
        #[arg(long)]
        parent: bool,
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
        /// Print the job's path and return at once.
        #[arg(long)]
        no_wait: bool,
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
        /// Print the job's path and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Print a snapshot as libvirt <domainsnapshot> XML.
    #[command(after_help = "Example:\n  vmsnap dumpxml web1 before-upgrade")]
    Dumpxml {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// List running jobs and finished ones that still linger.
    #[command(after_help = "Examples:\n  vmsnap jobs\n  vmsnap jobs --json")]
    Jobs,
    /// Ask a job to stop (refused while it is past the point where stopping is clean).
    #[command(after_help = "Examples:
  vmsnap cancel 7
  vmsnap cancel /org/vmsnap/VmSnap1/job/7
  job=$(vmsnap create web1 --memory external --memory-file /vm/web1.mem --no-wait)
  vmsnap cancel \"$job\"")]
    Cancel {
        /// Job number or object path.
        job: String,
    },
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  vmsnap completions bash > /etc/bash_completion.d/vmsnap
  vmsnap completions zsh > /usr/local/share/zsh/site-functions/_vmsnap
  vmsnap completions fish > ~/.config/fish/completions/vmsnap.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write every page (vmsnap.1, vmsnap-create.1, ...) into a directory.
    #[command(after_help = "Examples:
  vmsnap man | man -l -
  vmsnap man --out-dir /usr/local/share/man/man1")]
    Man {
        /// Write vmsnap.1 and one page per command into this directory.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Add a record for a snapshot whose files already exist, from a libvirt <domainsnapshot>
    /// document (as `virsh snapshot-dumpxml` writes it). The images are checked first; import a
    /// tree parent first.
    #[command(after_help = "Examples:\n  \
  vmsnap redefine web1 fresh-install.xml\n  \
  vmsnap redefine web1 before-upgrade.xml --current\n  \
  virsh snapshot-dumpxml web1 s1 | vmsnap redefine web1 -")]
    Redefine {
        /// Domain name.
        domain: String,
        /// The <domainsnapshot> document; `-` reads standard input.
        file: PathBuf,
        /// Make the snapshot the domain's current one.
        #[arg(long)]
        current: bool,
    },
    /// Delete the snapshots a retention policy does not keep.
    #[command(after_help = PRUNE_HELP)]
    Prune(PruneArgs),
    /// Protect a snapshot from pruning.
    #[command(after_help = "Example:\n  vmsnap protect web1 before-upgrade")]
    Protect {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// End a snapshot's protection from pruning.
    #[command(after_help = "Example:\n  vmsnap unprotect web1 before-upgrade")]
    Unprotect {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// Show, change or run a domain's scheduled snapshots.
    #[command(
        args_conflicts_with_subcommands = true,
        arg_required_else_help = true,
        after_help = SCHEDULE_HELP
    )]
    Schedule(ScheduleArgs),
}

const PRUNE_HELP: &str = "\
Only snapshots taken by a schedule (origin \"schedule\") are candidates unless --include-manual
is given; protected snapshots and the current one are never deleted. Periods are UTC calendar
periods; --keep-daily 7 keeps the newest snapshot of each of the 7 most recent days that have
one. --max-age deletes older snapshots even when a keep rule would keep them. Without any rule
the domain's stored policy (vmsnap schedule set) is used.

Examples:
  vmsnap prune web1 --keep-last 5 --dry-run
  vmsnap prune web1 --keep-hourly 24 --keep-daily 7 --max-age 30d
  vmsnap prune web1                       # the stored policy";

const SCHEDULE_HELP: &str = "\
Examples:
  vmsnap schedule web1                                  # show (same as: schedule show web1)
  vmsnap schedule set web1 --kind checkpoint --keep-hourly 24 --keep-daily 7
  vmsnap schedule set web1 --reset --keep-last 3        # start from the defaults
  vmsnap schedule run web1                              # what vmsnap-snapshot@web1.service runs";

/// A retention policy on the command line.
#[derive(clap::Args, Debug, Default)]
pub struct PolicyArgs {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// The same per day.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// The same per ISO week.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// The same per month.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// The same per year.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Delete snapshots older than this (seconds, or e.g. 30d, 12h, 1w2d).
    #[arg(long, value_name = "DURATION")]
    pub max_age: Option<String>,
}

/// `vmsnap prune ...`
#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// Domain name.
    pub domain: String,
    /// The policy (default: the stored one).
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Print what would be deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Manual snapshots are candidates too.
    #[arg(long)]
    pub include_manual: bool,
}

/// `vmsnap schedule ...`
#[derive(clap::Args, Debug)]
pub struct ScheduleArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<ScheduleCommand>,
    /// Domain name: show its settings.
    pub domain: Option<String>,
}

/// `vmsnap schedule show|set|run ...`
#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Show a domain's schedule settings.
    #[command(
        after_help = "Examples:\n  vmsnap schedule show web1\n  vmsnap schedule show web1 --json"
    )]
    Show {
        /// Domain name.
        domain: String,
    },
    /// Change a domain's schedule settings (options not given keep their value).
    #[command(after_help = "Examples:
  vmsnap schedule set web1 --keep-hourly 24 --keep-daily 7 --max-age 30d
  vmsnap schedule set web1 --kind checkpoint --prefix hourly
  vmsnap schedule set web1 --reset --keep-last 3")]
    Set {
        /// Domain name.
        domain: String,
        /// What a scheduled run takes: disk-only (external overlays) or checkpoint.
        #[arg(long)]
        kind: Option<String>,
        /// Prefix of scheduled snapshots' names.
        #[arg(long)]
        prefix: Option<String>,
        /// Start from the defaults instead of the stored settings.
        #[arg(long)]
        reset: bool,
        /// The retention policy.
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Take a scheduled snapshot, then prune by the stored policy.
    #[command(after_help = "Examples:
  vmsnap schedule run web1        # what vmsnap-snapshot@web1.service runs
  systemctl enable --now vmsnap-snapshot@web1.timer")]
    Run {
        /// Domain name.
        domain: String,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command, nested ones included, with its full name.
    fn walk(cmd: &clap::Command, prefix: &str, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands() {
            let name = format!("{prefix} {}", sub.get_name());
            out.push((name.clone(), sub.clone()));
            walk(sub, &name, out);
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cli_every_command_has_an_example_in_its_help() {
        let mut all = Vec::new();
        walk(&Cli::command(), "vmsnap", &mut all);
        let missing: Vec<&str> = all
            .iter()
            .filter(|(_, c)| {
                !c.get_after_help()
                    .is_some_and(|h| h.to_string().contains("Example"))
            })
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(
            missing.is_empty(),
            "commands without an `after_help` example section: {missing:?}"
        );
    }

    #[test]
    fn cli_help_documents_every_exit_code() {
        let help = Cli::command().render_long_help().to_string();
        for code in [
            "3  not found",
            "4  already exists",
            "5  busy",
            "6  not authorised",
        ] {
            assert!(help.contains(code), "--help lacks {code:?}");
        }
        for code in ["7  invalid argument", "8  unsupported", "9  invalid state"] {
            assert!(help.contains(code), "--help lacks {code:?}");
        }
        for code in ["10  timed out", "11  cancelled", "1  failed"] {
            assert!(help.contains(code), "--help lacks {code:?}");
        }
    }
}
