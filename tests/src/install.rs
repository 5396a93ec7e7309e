//! The layout of an installation: which file of the source tree goes where.
//!
//! `cargo xtask install` and the systemd tests both install through [`install`], so the tests
//! exercise exactly the files, paths and modes a user gets. The `systemd/` folder of the source
//! tree is laid out relative to the prefix (`lib/systemd/system/…`, `share/dbus-1/…`,
//! `share/polkit-1/…`); each file lands at `DESTDIR/PREFIX/<same relative path>`, and the
//! binaries in `DESTDIR/PREFIX/bin`.
//!
//! Invariants: files that name an installed program (`/usr/bin/vmsnapd` in `ExecStart=`) name
//! it under the chosen prefix; nothing outside `DESTDIR/PREFIX` is written; an existing file is
//! replaced whole (written beside and renamed), never truncated in place.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The binaries an installation contains.
pub const BINARIES: [&str; 2] = ["vmsnapd", "vmsnap"];

/// Where the source files of an installation live in the repository.
pub fn source_tree() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// What to install and where.
#[derive(Debug, Clone)]
pub struct InstallPlan {
    /// The folder holding the built `vmsnapd` and `vmsnap`.
    pub bin_dir: PathBuf,
    /// Staging root prepended to every path (`/` for a real installation).
    pub destdir: PathBuf,
    /// The prefix the installed files refer to, e.g. `/usr`.
    pub prefix: PathBuf,
}

/// Every file of the source tree, relative to it, sorted.
pub fn data_files() -> std::io::Result<Vec<PathBuf>> {
    let root = source_tree();
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                out.push(
                    path.strip_prefix(&root)
                        .expect("walked below the root")
                        .to_path_buf(),
                );
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The path of `rel` (relative to the prefix) in the staging root.
fn staged(plan: &InstallPlan, rel: &Path) -> PathBuf {
    let prefix = plan.prefix.strip_prefix("/").unwrap_or(&plan.prefix);
    plan.destdir.join(prefix).join(rel)
}

/// Writes `bytes` to `dest` with `mode`, replacing any existing file atomically.
fn put(dest: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = dest.parent().expect("an installed file has a folder");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.install-tmp",
        dest.file_name().expect("a file name").to_string_lossy()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dest)
}

/// Installs the binaries and every file of the source tree; returns the installed paths
/// (in the staging root).
pub fn install(plan: &InstallPlan) -> std::io::Result<Vec<PathBuf>> {
    let mut installed = Vec::new();
    let bindir = plan.prefix.join("bin");
    for name in BINARIES {
        let src = plan.bin_dir.join(name);
        let bytes = std::fs::read(&src).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot read {}: {e}", src.display()))
        })?;
        let dest = staged(plan, &Path::new("bin").join(name));
        put(&dest, &bytes, 0o755)?;
        installed.push(dest);
    }
    for rel in data_files()? {
        let text = std::fs::read_to_string(source_tree().join(&rel))?;
        // Unit and activation files name the programs by their path under /usr.
        let text = text.replace("/usr/bin/", &format!("{}/", bindir.display()));
        let dest = staged(plan, &rel);
        put(&dest, text.as_bytes(), 0o644)?;
        installed.push(dest);
    }
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_with_prefix_rewrites_program_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let bins = tmp.path().join("bins");
        std::fs::create_dir(&bins).unwrap();
        for b in BINARIES {
            std::fs::write(bins.join(b), b"#!/bin/true\n").unwrap();
        }
        let plan = InstallPlan {
            bin_dir: bins,
            destdir: tmp.path().join("stage"),
            prefix: PathBuf::from("/opt/vmsnap"),
        };
        let files = install(&plan).unwrap();
        let unit = tmp
            .path()
            .join("stage/opt/vmsnap/lib/systemd/system/vmsnapd.service");
        assert!(files.contains(&unit));
        let text = std::fs::read_to_string(&unit).unwrap();
        assert!(text.contains("ExecStart=/opt/vmsnap/bin/vmsnapd"), "{text}");
        assert!(!text.contains("/usr/bin/"), "{text}");
        let bin = tmp.path().join("stage/opt/vmsnap/bin/vmsnapd");
        let mode = std::fs::metadata(&bin).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        for rel in [
            "share/dbus-1/system.d/org.vmsnap.VmSnap1.conf",
            "share/dbus-1/system-services/org.vmsnap.VmSnap1.service",
            "share/polkit-1/actions/org.vmsnap.VmSnap1.policy",
            "lib/systemd/system/vmsnap-snapshot@.timer",
        ] {
            assert!(
                files.contains(&tmp.path().join("stage/opt/vmsnap").join(rel)),
                "{rel} not installed"
            );
        }
    }
}
