//! Commands answered without the daemon: shell completions and man pages, both generated
//! from the same clap definition as `--help`, so they cannot drift from it.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::output::Failure;

/// Runs `command` if it needs no bus; `None` when it does.
pub fn run(command: &Command) -> Option<Result<(), Failure>> {
    match command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "vmsnap", &mut std::io::stdout());
            Some(Ok(()))
        }
        Command::Man { out_dir } => Some(match out_dir {
            Some(dir) => write_pages(dir),
            None => {
                let mut out = std::io::stdout().lock();
                match render(&Cli::command(), &mut out).and_then(|()| out.flush()) {
                    // A pager or `head` that stopped reading is not a failure.
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                        Err(Failure::local_io(format!("cannot print the man page: {e}")))
                    }
                    _ => Ok(()),
                }
            }
        }),
        _ => None,
    }
}

fn render(cmd: &clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd.clone()).render(out)
}

/// Writes `vmsnap.1` and `vmsnap-SUB[-SUB].1` for every command into `dir`.
fn write_pages(dir: &Path) -> Result<(), Failure> {
    let io = |what: &Path, e: std::io::Error| {
        Failure::local_io(format!("cannot write {}: {e}", what.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut top = Cli::command();
    top.build();
    let mut pages = vec![("vmsnap".to_string(), top.clone())];
    collect(&top, "vmsnap", &mut pages);
    for (name, cmd) in pages {
        let file = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        render(&cmd.name(name.clone()), &mut buf).map_err(|e| io(&file, e))?;
        std::fs::write(&file, buf).map_err(|e| io(&file, e))?;
    }
    Ok(())
}

fn collect(cmd: &clap::Command, prefix: &str, out: &mut Vec<(String, clap::Command)>) {
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("{prefix}-{}", sub.get_name());
        out.push((name.clone(), sub.clone()));
        collect(sub, &name, out);
    }
}
