//! `vmsnap-sd-init`: boots the host's own systemd as PID 1 of a throwaway container, for the
//! systemd integration tests (`vmsnap_tests::systemd::Sandbox` drives it; needs root).
//!
//! `vmsnap-sd-init launch DIR CGROUP [BIND...]` moves itself into the (new, empty) cgroup2
//! folder `CGROUP`, then re-executes itself under `unshare` with new pid, mount, uts, ipc and
//! cgroup namespaces, so that the container's cgroup root is `CGROUP` and killing that cgroup
//! kills exactly the container. `vmsnap-sd-init init DIR [BIND...]` runs as PID 1 there: it
//! builds the root file system and execs `/lib/systemd/systemd`.
//!
//! The root is an overlay of the host's `/` with an upper layer on a tmpfs: the container can
//! write anywhere, nothing reaches the host. API file systems are its own (`/proc`, a read-only
//! `/sys`, its cgroup subtree, a minimal `/dev`, `/run`); each `BIND` folder of the host is
//! mounted read-write at the same path (the build output, so the tests run what cargo built).
//! Units the host enabled are not started, and a boot target with only the basics and the
//! system bus replaces `default.target`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};

/// The name of the boot target written into the container.
const BOOT_TARGET: &str = "vmsnap-test.target";

/// Host units that must not run in the container: they would touch the host's hardware,
/// clock, kernel settings, or start services the tests do not want.
const MASKED: [&str; 10] = [
    "systemd-modules-load.service",
    "systemd-remount-fs.service",
    "systemd-timesyncd.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "systemd-firstboot.service",
    "systemd-pstore.service",
    "systemd-tmpfiles-clean.timer",
    "console-getty.service",
    "getty@.service",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        Some((mode, rest)) if mode == "launch" && rest.len() >= 2 => {
            launch(Path::new(&rest[0]), Path::new(&rest[1]), &rest[2..])
        }
        Some((mode, rest)) if mode == "init" && !rest.is_empty() => {
            init(Path::new(&rest[0]), &rest[1..])
        }
        _ => bail!("usage: vmsnap-sd-init launch DIR CGROUP [BIND...] | init DIR [BIND...]"),
    }
}

fn launch(dir: &Path, cgroup: &Path, binds: &[String]) -> Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("cannot enter cgroup {}", cgroup.display()))?;
    let me = std::env::current_exe()?;
    let err = std::os::unix::process::CommandExt::exec(
        Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                // The container dies with this process, and this process with the test's guard.
                "--kill-child",
                "--mount",
                "--uts",
                "--ipc",
                "--cgroup",
                "--propagation",
                "private",
                "--",
            ])
            .arg(me)
            .arg("init")
            .arg(dir)
            .args(binds),
    );
    Err(err).context("cannot exec unshare")
}

fn mnt(src: &str, target: &Path, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<()> {
    mount(Some(src), target, Some(fstype), flags, data)
        .with_context(|| format!("cannot mount {fstype} on {}", target.display()))
}

fn bind(src: &Path, target: &Path, read_only: bool) -> Result<()> {
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("cannot bind {} on {}", src.display(), target.display()))?;
    if read_only {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("cannot make {} read-only", target.display()))?;
    }
    Ok(())
}

fn init(dir: &Path, binds: &[String]) -> Result<()> {
    let upper = dir.join("layer");
    let root = dir.join("root");
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&root)?;
    mnt(
        "vmsnap-layer",
        &upper,
        "tmpfs",
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    std::fs::create_dir_all(upper.join("upper"))?;
    std::fs::create_dir_all(upper.join("work"))?;
    let opts = format!(
        "lowerdir=/,upperdir={},workdir={}",
        upper.join("upper").display(),
        upper.join("work").display()
    );
    mnt(
        "vmsnap-root",
        &root,
        "overlay",
        MsFlags::empty(),
        Some(&opts),
    )?;
    api_filesystems(&root)?;
    for b in binds {
        let target = root.join(b.trim_start_matches('/'));
        std::fs::create_dir_all(&target)?;
        bind(Path::new(b), &target, false)?;
    }
    configure_boot(&root)?;
    // Make the overlay the root; the host's tree goes away with the old root.
    std::env::set_current_dir(&root)?;
    std::fs::create_dir_all(root.join(".oldroot"))?;
    nix::unistd::pivot_root(".", ".oldroot").context("pivot_root")?;
    std::env::set_current_dir("/")?;
    umount2("/.oldroot", MntFlags::MNT_DETACH).context("cannot detach the old root")?;
    std::fs::remove_dir("/.oldroot")?;
    let err = std::os::unix::process::CommandExt::exec(
        Command::new("/lib/systemd/systemd")
            .arg(format!("--unit={BOOT_TARGET}"))
            .arg("--show-status=no")
            .env_clear()
            // Tells systemd it runs in a container: no udev, no hardware setup.
            .env("container", "vmsnap-test")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    );
    Err(err).context("cannot exec systemd")
}

fn api_filesystems(root: &Path) -> Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", &root.join("proc"), "proc", nosuid, None)?;
    // Kernel settings stay the host's: /proc/sys and /sys are read-only.
    bind(&root.join("proc/sys"), &root.join("proc/sys"), true)?;
    mnt(
        "sysfs",
        &root.join("sys"),
        "sysfs",
        nosuid | MsFlags::MS_RDONLY,
        None,
    )?;
    mnt(
        "cgroup2",
        &root.join("sys/fs/cgroup"),
        "cgroup2",
        nosuid,
        None,
    )?;
    let dev = root.join("dev");
    mnt(
        "vmsnap-dev",
        &dev,
        "tmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755,size=16m"),
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = dev.join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .with_context(|| format!("mknod {}", path.display()))?;
        // The umask may have narrowed the mode given to mknod.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    }
    std::fs::create_dir_all(dev.join("pts"))?;
    std::fs::create_dir_all(dev.join("shm"))?;
    mnt(
        "devpts",
        &dev.join("pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"))?;
    mnt(
        "shm",
        &dev.join("shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))?;
    }
    // No terminal: the console is a sink; the journal has everything.
    std::fs::write(dev.join("console"), b"")?;
    bind(Path::new("/dev/null"), &dev.join("console"), false)?;
    mnt(
        "vmsnap-run",
        &root.join("run"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=256m"),
    )?;
    Ok(())
}

/// Writes the container-only configuration into the overlay's `/etc`.
fn configure_boot(root: &Path) -> Result<()> {
    let etc = root.join("etc/systemd/system");
    for wants in [
        "multi-user.target.wants",
        "timers.target.wants",
        "sysinit.target.wants",
        "getty.target.wants",
    ] {
        let d = etc.join(wants);
        if d.is_dir() {
            for entry in std::fs::read_dir(&d)? {
                std::fs::remove_file(entry?.path())?;
            }
        }
    }
    for unit in MASKED {
        let link: PathBuf = etc.join(unit);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link)?;
    }
    std::fs::write(
        etc.join(BOOT_TARGET),
        "[Unit]\n\
         Description=vmsnap test container: basic system and the system bus\n\
         Requires=basic.target\n\
         Wants=dbus.socket timers.target\n\
         After=basic.target\n\
         AllowIsolate=yes\n",
    )?;
    Ok(())
}
