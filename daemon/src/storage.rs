//! Path confinement: every file the daemon opens or creates on a caller's behalf (disk images
//! in definitions, attached disks, overlays, memory files) lies inside a storage directory.
//!
//! The storage directories are `STATE_DIR/images` and the configured `--storage-dir`s
//! ([`crate::config::Config::storage_roots`]); the administrator's spelling of a root may go
//! through symbolic links, a caller's path below it may not. Invariants:
//! - A path is absolute, has no `.` or `..` component, and lies below a root; the daemon's own
//!   state and runtime directories are never storage (except `STATE_DIR/images`), even when a
//!   root contains them.
//! - Below the root, no component is a symbolic link. This is checked by the kernel while
//!   opening (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` relative to the root's
//!   descriptor, or a walk with `O_NOFOLLOW` on kernels without it), so a directory swapped for
//!   a link between a check and the open is caught by the open itself.
//! - An existing file must be a regular file: device nodes, FIFOs, sockets and directories are
//!   refused. A new file must not exist (a dangling link counts as existing) and is created
//!   with `O_EXCL | O_NOFOLLOW` and mode 0600 through the same confined resolution.
//! - What this cannot cover: programs the daemon runs afterwards (QEMU, `qemu-img`) open the
//!   file again by its path. Storage directories must therefore not be writable by users who
//!   are not allowed to manage domains; within that assumption the checks here are race-free.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

use nix::errno::Errno;
use nix::fcntl::{OFlag, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::config::Config;

/// Why a path was refused.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Not an absolute path.
    #[error("{0} is not an absolute path")]
    NotAbsolute(PathBuf),
    /// A `.` or `..` component.
    #[error("{0} must not contain '.' or '..' components")]
    DotComponent(PathBuf),
    /// Not below any storage directory.
    #[error("{path} is outside the storage directories ({roots})")]
    Outside {
        /// The refused path.
        path: PathBuf,
        /// The storage directories, for the message.
        roots: String,
    },
    /// Inside the daemon's own state or runtime directory.
    #[error("{0} is in the daemon's own state or runtime directory")]
    Protected(PathBuf),
    /// A symbolic link below the storage directory.
    #[error("{0} goes through a symbolic link, which storage paths may not")]
    Symlink(PathBuf),
    /// An existing file that is not a regular file.
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular {
        /// The refused path.
        path: PathBuf,
        /// What it is instead, e.g. `character device`.
        kind: &'static str,
    },
    /// A new file's path is taken.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// An image that must exist does not.
    #[error("{0} does not exist")]
    Missing(PathBuf),
    /// The image belongs to another domain or to a snapshot.
    #[error("{path} is in use by {owner}")]
    InUse {
        /// The refused path.
        path: PathBuf,
        /// Who uses it, e.g. `domain "web1" (disk vda)`.
        owner: String,
    },
    /// The file system failed otherwise.
    #[error("cannot check {path}: {source}")]
    Io {
        /// The path being checked.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A file's identity (device and inode), so that two spellings or hard links of one image
/// compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file at `path` (following links: this is about what the path
    /// reaches now), if it exists.
    pub fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// The storage directories and the daemon's own directories.
#[derive(Debug, Clone)]
pub struct StoragePolicy {
    roots: Vec<PathBuf>,
    protected: Vec<PathBuf>,
}

static POLICY: RwLock<Option<Arc<StoragePolicy>>> = RwLock::new(None);

/// Makes `policy` the one [`installed`] returns (the daemon installs its own at start).
pub fn install(policy: StoragePolicy) {
    *POLICY.write().expect("storage policy lock poisoned") = Some(Arc::new(policy));
}

/// The policy the daemon runs with, if one was installed.
pub fn installed() -> Option<Arc<StoragePolicy>> {
    POLICY.read().expect("storage policy lock poisoned").clone()
}

impl StoragePolicy {
    /// The policy of `config`: its storage roots, and its state and runtime directories as
    /// protected. `STATE_DIR/images` is created (mode 0700) if missing.
    pub fn from_config(config: &Config) -> std::io::Result<Self> {
        let images = config.state_dir.join(crate::config::STATE_IMAGES_SUBDIR);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&images)?;
        }
        let roots = config.storage_roots();
        let protected = vec![config.state_dir.clone(), config.runtime_dir.clone()];
        Ok(Self::new(roots, protected))
    }

    /// A policy with these roots and protected directories. Both are taken in their canonical
    /// form as well as their given form, so a caller may use either spelling.
    pub fn new(roots: Vec<PathBuf>, protected: Vec<PathBuf>) -> Self {
        let both = |v: Vec<PathBuf>| {
            let mut out = Vec::new();
            for p in v {
                if let Ok(c) = p.canonicalize()
                    && c != p
                {
                    out.push(c);
                }
                out.push(p);
            }
            out
        };
        Self {
            roots: both(roots),
            protected: both(protected),
        }
    }

    /// The storage directories, as given and canonical.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The root `path` lies below and the path relative to it.
    fn locate<'a>(&'a self, path: &Path) -> Result<(&'a Path, PathBuf), StorageError> {
        if !path.is_absolute() {
            return Err(StorageError::NotAbsolute(path.to_owned()));
        }
        // `components` silently drops inner `.`; look at the text as well.
        let text = path.as_os_str().as_encoded_bytes();
        let has_dot = text
            .split(|&b| b == b'/')
            .any(|seg| seg == b"." || seg == b"..");
        if has_dot || path.components().any(|c| c == Component::ParentDir) {
            return Err(StorageError::DotComponent(path.to_owned()));
        }
        let root = self
            .roots
            .iter()
            .filter(|r| path.starts_with(r) && path != r.as_path())
            .max_by_key(|r| r.components().count())
            .ok_or_else(|| StorageError::Outside {
                path: path.to_owned(),
                roots: self.describe_roots(),
            })?;
        // A protected directory deeper than the root wins (the catalog under a root that holds
        // the state directory); a root inside a protected directory (STATE_DIR/images) wins
        // over it.
        let root_depth = root.components().count();
        if self
            .protected
            .iter()
            .any(|p| path.starts_with(p) && p.components().count() >= root_depth)
        {
            return Err(StorageError::Protected(path.to_owned()));
        }
        let rel = path
            .strip_prefix(root)
            .expect("the root is a prefix")
            .to_owned();
        Ok((root, rel))
    }

    fn describe_roots(&self) -> String {
        let mut shown: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        shown.dedup();
        shown.join(", ")
    }

    /// Checks that `path` is an existing regular file inside a storage directory, reached
    /// without symbolic links, and returns its identity.
    pub fn check_existing(&self, path: &Path) -> Result<FileId, StorageError> {
        let (root, rel) = self.locate(path)?;
        let fd = open_beneath(
            root,
            &rel,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_error(path, e))?;
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| errno_error(path, e))?;
        require_regular(path, &st)?;
        Ok(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// Checks that `path` could be created: inside a storage directory, its directory reached
    /// without symbolic links, nothing there yet.
    pub fn check_new(&self, path: &Path) -> Result<(), StorageError> {
        let (root, rel) = self.locate(path)?;
        let (parent, name) = split_last(&rel);
        // No O_NOFOLLOW: with O_PATH it would hand back the link itself; the resolve flags
        // already refuse every link.
        let dir = open_beneath(
            root,
            parent,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_error(path, e))?;
        match nix::sys::stat::fstatat(dir.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(_) => Err(StorageError::Exists(path.to_owned())),
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(errno_error(path, e)),
        }
    }

    /// Creates `path` exclusively with mode 0600, through the same confined resolution as
    /// [`StoragePolicy::check_new`], and returns it open for writing.
    pub fn create_new(&self, path: &Path) -> Result<File, StorageError> {
        let (root, rel) = self.locate(path)?;
        let fd = open_beneath(
            root,
            &rel,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| errno_error(path, e))?;
        Ok(File::from(fd))
    }
}

/// Checks the images of `disks` (a definition's or a disk being attached to domain `this`):
/// each inside the storage directories, a regular file reached without links, and used by no
/// other domain (unless both disks are shareable) nor by any snapshot's files, of this domain
/// or another. Without an installed policy (the library used without a daemon) only the
/// sharing rules apply.
pub fn check_disk_images(
    service: &crate::service::Service,
    disks: &[crate::domain::def::DiskDef],
    this: Option<crate::catalog::DomainId>,
) -> Result<(), StorageError> {
    let policy = installed();
    let domains: Vec<_> = service.domains().iter().map(|h| h.info()).collect();
    for disk in disks {
        let id = match &policy {
            Some(p) => p.check_existing(&disk.source)?,
            None => match FileId::of(&disk.source) {
                Some(id) => id,
                None => continue,
            },
        };
        let in_use = |owner: String| StorageError::InUse {
            path: disk.source.clone(),
            owner,
        };
        for info in &domains {
            let mine = Some(info.id) == this;
            let name = &info.def.name;
            for d in &info.def.disks {
                // This domain's own disks are the actor's business (it names the duplicate).
                let shared = d.shareable && disk.shareable;
                if !mine && !shared && FileId::of(&d.source) == Some(id) {
                    return Err(in_use(format!("domain {name:?} (disk {})", d.target)));
                }
            }
            let active: Vec<Option<FileId>> = info
                .def
                .disks
                .iter()
                .map(|d| FileId::of(&d.source))
                .collect();
            for rec in info.snapshots.values() {
                let mut files: Vec<PathBuf> = Vec::new();
                for d in crate::snapshot::record::disks(rec) {
                    files.extend(d.overlay.clone());
                    files.extend(d.snapshot_file.clone());
                    files.push(d.image);
                }
                files.extend(crate::snapshot::record::memory(rec).file);
                for f in files {
                    let fid = FileId::of(&f);
                    if fid == Some(id) && !(mine && active.contains(&fid)) {
                        return Err(in_use(format!(
                            "snapshot {:?} of domain {name:?}",
                            rec.name
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Checks an existing file a caller names (an image or memory file in imported snapshot
/// metadata, say) against the installed policy; a no-op without one.
pub fn confine_existing(path: &Path) -> Result<(), StorageError> {
    installed().map_or(Ok(()), |p| p.check_existing(path).map(|_| ()))
}

/// Checks a file the daemon is about to create for a caller against the installed policy; a
/// no-op without one.
pub fn confine_new(path: &Path) -> Result<(), StorageError> {
    installed().map_or(Ok(()), |p| p.check_new(path))
}

/// Everything a disk image given by a caller must pass ([`check_disk_images`], then
/// [`check_backing_chains`]): the one call in define and attach-disk.
pub async fn check_disks(
    service: &crate::service::Service,
    disks: &[crate::domain::def::DiskDef],
    this: Option<crate::catalog::DomainId>,
) -> crate::error::ServiceResult<()> {
    check_disk_images(service, disks, this)?;
    check_backing_chains(disks).await
}

/// Checks that every backing file of the images of `disks` lies inside the storage
/// directories too, so that an image cannot smuggle an outside file (say `/etc/shadow` as a raw
/// backing file) into a guest. Raw images have no backing file. A chain that cannot be read is
/// refused.
pub async fn check_backing_chains(
    disks: &[crate::domain::def::DiskDef],
) -> crate::error::ServiceResult<()> {
    use crate::error::ServiceError;
    let Some(policy) = installed() else {
        return Ok(());
    };
    for disk in disks {
        if disk.format == crate::domain::def::DiskFormat::Raw {
            continue;
        }
        let out = crate::domain::actor::qemu_img(&[
            "info".as_ref(),
            "-U".as_ref(),
            "--backing-chain".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            disk.format.as_str().as_ref(),
            disk.source.as_os_str(),
        ])
        .await
        .map_err(|e| {
            ServiceError::InvalidArgument(format!(
                "disk {}: cannot read the backing chain of {}: {e}",
                disk.target,
                disk.source.display()
            ))
        })?;
        let chain: Vec<serde_json::Value> = serde_json::from_str(&out).map_err(|e| {
            ServiceError::InvalidArgument(format!(
                "disk {}: qemu-img's description of {} does not parse: {e}",
                disk.target,
                disk.source.display()
            ))
        })?;
        // The first entry is the image itself, already checked.
        for image in chain.iter().skip(1) {
            let file = image
                .get("filename")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            policy.check_existing(Path::new(file))?;
        }
    }
    Ok(())
}

/// Checks every file a snapshot plan will create: inside the storage directories, reached
/// without links, not there yet. A no-op without an installed policy.
pub fn check_plan_files(plan: &crate::snapshot::plan::Plan) -> Result<(), StorageError> {
    let Some(policy) = installed() else {
        return Ok(());
    };
    for d in &plan.disks {
        if d.mode != crate::snapshot::plan::DiskMode::External {
            continue;
        }
        if plan.keep_active_name {
            // The image is renamed to the snapshot file and re-created in place.
            policy.check_existing(&d.image)?;
            if let Some(f) = &d.snapshot_file {
                policy.check_new(f)?;
            }
        } else if let Some(o) = &d.overlay {
            policy.check_new(o)?;
        }
    }
    if let Some(m) = &plan.memory_file {
        policy.check_new(m)?;
    }
    Ok(())
}

fn split_last(rel: &Path) -> (&Path, &std::ffi::OsStr) {
    let name = rel
        .file_name()
        .expect("a located path has a last component");
    (rel.parent().unwrap_or(Path::new("")), name)
}

fn require_regular(path: &Path, st: &FileStat) -> Result<(), StorageError> {
    let kind = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => return Ok(()),
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFLNK => return Err(StorageError::Symlink(path.to_owned())),
        _ => "special file",
    };
    Err(StorageError::NotRegular {
        path: path.to_owned(),
        kind,
    })
}

fn errno_error(path: &Path, e: Errno) -> StorageError {
    let path = path.to_owned();
    match e {
        // RESOLVE_NO_SYMLINKS and O_NOFOLLOW both answer ELOOP for a link.
        Errno::ELOOP => StorageError::Symlink(path),
        Errno::EXDEV => StorageError::Outside {
            roots: String::new(),
            path,
        },
        Errno::EEXIST => StorageError::Exists(path),
        Errno::ENOENT => StorageError::Missing(path),
        e => StorageError::Io {
            path,
            source: std::io::Error::from(e),
        },
    }
}

/// Opens `rel` below `root` (opened by its configured path, links allowed there) without
/// following any symbolic link below it.
fn open_beneath(root: &Path, rel: &Path, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = nix::fcntl::OpenHow::new()
        .flags(flags)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    match nix::fcntl::openat2(root_fd.as_fd(), rel, how) {
        Err(Errno::ENOSYS) => walk_beneath(root_fd, rel, flags, mode),
        r => r,
    }
}

/// [`open_beneath`] for kernels without `openat2`: one `openat` per component, each with
/// `O_NOFOLLOW`, directories with `O_DIRECTORY`.
fn walk_beneath(root_fd: OwnedFd, rel: &Path, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let parts: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect();
    let Some((last, dirs)) = parts.split_last() else {
        return nix::fcntl::openat(root_fd.as_fd(), ".", flags, mode);
    };
    let mut dir = root_fd;
    for part in dirs {
        dir = nix::fcntl::openat(
            dir.as_fd(),
            *part,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| if e == Errno::ENOTDIR { Errno::ELOOP } else { e })?;
    }
    match nix::fcntl::openat(dir.as_fd(), *last, flags | OFlag::O_NOFOLLOW, mode) {
        // A link where a directory is wanted: say "link", as openat2 does.
        Err(Errno::ENOTDIR)
            if nix::sys::stat::fstatat(
                dir.as_fd(),
                *last,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .is_ok_and(|st| {
                SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
            }) =>
        {
            Err(Errno::ELOOP)
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        policy: StoragePolicy,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("state/images")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(root.join("sub/disk.qcow2"), b"x").unwrap();
        std::fs::write(root.join("state/catalog.sqlite"), b"x").unwrap();
        std::fs::write(root.join("state/images/a.qcow2"), b"x").unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        let policy = StoragePolicy::new(
            vec![root.join("state/images"), root.clone()],
            vec![root.join("state")],
        );
        Fixture {
            _dir: dir,
            root,
            outside,
            policy,
        }
    }

    #[test]
    fn storage_existing_regular_file_inside_is_accepted() {
        let f = fixture();
        f.policy
            .check_existing(&f.root.join("sub/disk.qcow2"))
            .unwrap();
        f.policy
            .check_existing(&f.root.join("state/images/a.qcow2"))
            .unwrap();
    }

    #[test]
    fn storage_dotdot_and_relative_paths_are_refused() {
        let f = fixture();
        let escape = f.root.join("sub/../../outside/secret");
        assert!(matches!(
            f.policy.check_existing(&escape),
            Err(StorageError::DotComponent(_))
        ));
        assert!(matches!(
            f.policy.check_new(&f.root.join("./x")),
            Err(StorageError::DotComponent(_))
        ));
        assert!(matches!(
            f.policy.check_new(Path::new("../../etc/shadow")),
            Err(StorageError::NotAbsolute(_))
        ));
    }

    #[test]
    fn storage_outside_and_protected_paths_are_refused() {
        let f = fixture();
        assert!(matches!(
            f.policy.check_existing(Path::new("/etc/shadow")),
            Err(StorageError::Outside { .. })
        ));
        assert!(matches!(
            f.policy.check_existing(&f.outside.join("secret")),
            Err(StorageError::Outside { .. })
        ));
        assert!(matches!(
            f.policy
                .check_existing(&f.root.join("state/catalog.sqlite")),
            Err(StorageError::Protected(_))
        ));
        assert!(matches!(
            f.policy.check_new(&f.root),
            Err(StorageError::Outside { .. })
        ));
    }

    #[test]
    fn storage_symlinks_anywhere_below_the_root_are_refused() {
        let f = fixture();
        symlink(f.outside.join("secret"), f.root.join("link.qcow2")).unwrap();
        symlink(&f.outside, f.root.join("dirlink")).unwrap();
        assert!(matches!(
            f.policy.check_existing(&f.root.join("link.qcow2")),
            Err(StorageError::Symlink(_))
        ));
        assert!(matches!(
            f.policy.check_existing(&f.root.join("dirlink/secret")),
            Err(StorageError::Symlink(_))
        ));
        assert!(matches!(
            f.policy.check_new(&f.root.join("dirlink/new.qcow2")),
            Err(StorageError::Symlink(_))
        ));
        assert!(matches!(
            f.policy.create_new(&f.root.join("dirlink/new.qcow2")),
            Err(StorageError::Symlink(_))
        ));
        assert!(!f.outside.join("new.qcow2").exists());
        // A dangling link is an existing name: creating through it would write elsewhere.
        symlink(f.outside.join("nothing"), f.root.join("dangling")).unwrap();
        assert!(matches!(
            f.policy.check_new(&f.root.join("dangling")),
            Err(StorageError::Exists(_))
        ));
        assert!(f.policy.create_new(&f.root.join("dangling")).is_err());
        assert!(!f.outside.join("nothing").exists());
    }

    #[test]
    fn storage_directory_swapped_for_a_link_after_the_check_is_caught_at_creation() {
        let f = fixture();
        let target = f.root.join("sub/new.qcow2");
        f.policy.check_new(&target).unwrap();
        std::fs::rename(f.root.join("sub"), f.root.join("sub.old")).unwrap();
        symlink(&f.outside, f.root.join("sub")).unwrap();
        assert!(matches!(
            f.policy.create_new(&target),
            Err(StorageError::Symlink(_))
        ));
        assert!(!f.outside.join("new.qcow2").exists());
    }

    #[test]
    fn storage_device_nodes_and_directories_are_not_images() {
        let f = fixture();
        let policy = StoragePolicy::new(vec![PathBuf::from("/dev"), f.root.clone()], vec![]);
        assert!(matches!(
            policy.check_existing(Path::new("/dev/null")),
            Err(StorageError::NotRegular {
                kind: "character device",
                ..
            })
        ));
        assert!(matches!(
            f.policy.check_existing(&f.root.join("sub")),
            Err(StorageError::NotRegular {
                kind: "directory",
                ..
            })
        ));
    }

    #[test]
    fn storage_new_files_are_exclusive_and_private() {
        let f = fixture();
        let p = f.root.join("sub/new.qcow2");
        let file = f.policy.create_new(&p).unwrap();
        assert_eq!(file.metadata().unwrap().mode() & 0o777, 0o600);
        assert!(matches!(
            f.policy.create_new(&p),
            Err(StorageError::Exists(_))
        ));
        assert!(matches!(
            f.policy.check_new(&p),
            Err(StorageError::Exists(_))
        ));
        assert!(matches!(
            f.policy.check_existing(&f.root.join("sub/none.qcow2")),
            Err(StorageError::Missing(_))
        ));
    }

    #[test]
    fn storage_walk_without_openat2_refuses_links_too() {
        let f = fixture();
        symlink(&f.outside, f.root.join("dirlink")).unwrap();
        let root_fd = |r: &Path| {
            nix::fcntl::open(r, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
        };
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
        let mode = Mode::from_bits_truncate(0o600);
        assert_eq!(
            walk_beneath(root_fd(&f.root), Path::new("dirlink/x"), flags, mode).unwrap_err(),
            Errno::ELOOP
        );
        walk_beneath(root_fd(&f.root), Path::new("sub/x"), flags, mode).unwrap();
        assert!(f.root.join("sub/x").is_file());
    }
}
