//! Validating a snapshot request into a [`Plan`], before any work is done.
//!
//! [`plan`] is pure logic: the only outside facts it consults are the domain definition, the
//! guest's run state, the names of existing snapshots and a few file-system questions asked
//! through [`Fs`] (does a file exist, is a directory there, is an image a block device), so tests
//! can fake them. Every refusal is a typed [`PlanError`] with a short sentence naming the disk,
//! file or format involved.
//!
//! Decisions beyond libvirt's documented behaviour:
//! - Transient and read-only disks are left out by default (mode `no`), and asking for one of
//!   them to be snapshotted is refused: a transient disk's writes are thrown away, a read-only
//!   disk cannot receive an internal snapshot and gains nothing from an overlay.
//! - A running or paused domain snapshotted with memory `none` (and not flagged disk-only) is
//!   treated as a disk-only snapshot, as libvirt does: without the VM state, reverting to it
//!   cannot resume the guest, so its state is `disk-snapshot`.
//! - Writable shareable disks are left out by default too, and an external snapshot of one is
//!   refused: the overlay would hide the other guests' writes from this guest. (Such a disk is
//!   raw, so it cannot have an internal snapshot either; a checkpoint of its domain is refused.)
//! - New files are never existing files, never another disk's image, and never contain `..`
//!   components; their paths must be UTF-8 text XML can carry. A file that is a dangling symbolic
//!   link counts as existing ([`RealFs`] does not follow links).
//! - After an external snapshot a disk is qcow2 (the overlay), whatever the old image's format;
//!   [`Plan::def_after`] says so.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use crate::domain::def::{DiskDef, DiskFormat, DomainDef, is_xml_char};

/// The longest accepted snapshot name, in characters.
pub const MAX_NAME_LEN: usize = 128;
/// The longest accepted snapshot description, in characters.
pub const MAX_DESCRIPTION_LEN: usize = 4096;
/// How many `-N` suffixes are tried when generating a name from the time.
const MAX_GENERATED_SUFFIX: u32 = 10_000;

// ---------------------------------------------------------------------------------------------
// File-system access

/// The file-system questions [`plan`] asks; faked in tests.
pub trait Fs {
    /// Whether something (file, directory, link, device) exists at `path`.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` is a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Whether `path` is a block device.
    fn is_block_device(&self, path: &Path) -> bool;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl Fs for RealFs {
    fn exists(&self, path: &Path) -> bool {
        // A dangling symbolic link exists too: creating the file would follow it.
        path.symlink_metadata().is_ok()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn is_block_device(&self, path: &Path) -> bool {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
    }
}

// ---------------------------------------------------------------------------------------------
// Vocabulary

/// Where the VM state (RAM, devices) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryMode {
    /// No VM state is saved.
    None,
    /// Inside a qcow2 image of the domain (see [`Plan::vmstate_disk`]).
    Internal,
    /// In a separate file (see [`Plan::memory_file`]).
    External,
}

impl MemoryMode {
    /// `none`, `internal` or `external`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryMode::None => "none",
            MemoryMode::Internal => "internal",
            MemoryMode::External => "external",
        }
    }
}

impl fmt::Display for MemoryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MemoryMode {
    type Err = PlanError;

    /// Accepts `none` and libvirt's XML spelling `no` for [`MemoryMode::None`].
    fn from_str(s: &str) -> Result<Self, PlanError> {
        match s {
            "none" | "no" => Ok(MemoryMode::None),
            "internal" => Ok(MemoryMode::Internal),
            "external" => Ok(MemoryMode::External),
            _ => Err(PlanError::InvalidArgument(format!(
                "unknown memory mode '{s}': expected none, internal or external"
            ))),
        }
    }
}

/// How one disk is snapshotted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskMode {
    /// Left out of the snapshot.
    No,
    /// An internal snapshot inside the qcow2 image.
    Internal,
    /// A new qcow2 overlay whose backing file is the current image.
    External,
}

impl DiskMode {
    /// `no`, `internal` or `external`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskMode::No => "no",
            DiskMode::Internal => "internal",
            DiskMode::External => "external",
        }
    }
}

impl fmt::Display for DiskMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DiskMode {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, PlanError> {
        match s {
            "no" => Ok(DiskMode::No),
            "internal" => Ok(DiskMode::Internal),
            "external" => Ok(DiskMode::External),
            _ => Err(PlanError::InvalidArgument(format!(
                "unknown disk snapshot mode '{s}': expected no, internal or external"
            ))),
        }
    }
}

/// The state recorded with a snapshot, libvirt's `<state>`: the state a revert returns to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotState {
    /// A checkpoint of a running guest.
    Running,
    /// A checkpoint of a paused guest.
    Paused,
    /// A snapshot of a shut-off guest.
    Shutoff,
    /// Disks only, taken while the guest ran or was shut off.
    DiskSnapshot,
}

impl SnapshotState {
    /// `running`, `paused`, `shutoff` or `disk-snapshot`.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Running => "running",
            SnapshotState::Paused => "paused",
            SnapshotState::Shutoff => "shutoff",
            SnapshotState::DiskSnapshot => "disk-snapshot",
        }
    }
}

impl fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SnapshotState {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, PlanError> {
        match s {
            "running" => Ok(SnapshotState::Running),
            "paused" => Ok(SnapshotState::Paused),
            "shutoff" => Ok(SnapshotState::Shutoff),
            "disk-snapshot" => Ok(SnapshotState::DiskSnapshot),
            _ => Err(PlanError::InvalidArgument(format!(
                "unknown snapshot state '{s}'"
            ))),
        }
    }
}

/// What a snapshot covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotKind {
    /// The whole guest: disks, and the VM state when it ran.
    Checkpoint,
    /// Disks only.
    DiskOnly,
}

impl SnapshotKind {
    /// `checkpoint` or `disk-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Checkpoint => "checkpoint",
            SnapshotKind::DiskOnly => "disk-only",
        }
    }
}

impl fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The domain's run state when the snapshot is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestRunState {
    /// The guest runs.
    Running,
    /// The guest is paused.
    Paused,
    /// No QEMU process.
    Shutoff,
}

/// A per-disk override in a [`CreateRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskRequest {
    /// The disk's target (`vda`) or its current source path.
    pub target: String,
    /// How to snapshot it.
    pub mode: DiskMode,
    /// External only: the new file (see [`DiskPlan::overlay`] and [`DiskPlan::snapshot_file`]).
    pub file: Option<PathBuf>,
}

/// A snapshot request, as given by a client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CreateRequest {
    /// The snapshot's name; generated from the time when absent.
    pub name: Option<String>,
    /// Free text.
    pub description: String,
    /// Disks only, never the VM state.
    pub disk_only: bool,
    /// Where the VM state goes; a default when absent.
    pub memory: Option<MemoryMode>,
    /// External VM state only: the file; a default beside a disk image when absent.
    pub memory_file: Option<PathBuf>,
    /// Internal VM state only: which qcow2 disk (target or source path) holds it.
    pub vmstate_disk: Option<String>,
    /// Per-disk overrides; other disks get defaults.
    pub disks: Vec<DiskRequest>,
    /// External VM state only: save it while the guest keeps running.
    pub live: bool,
    /// External disks: the active image keeps its path and the current image is renamed.
    pub keep_active_name: bool,
}

/// What happens to one disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskPlan {
    /// The disk's target.
    pub target: String,
    /// The format of the current image.
    pub format: DiskFormat,
    /// How it is snapshotted.
    pub mode: DiskMode,
    /// The disk's current source: after the snapshot it holds the snapshot's data (external)
    /// or the internal snapshot.
    pub image: PathBuf,
    /// External: the new active qcow2 image. Never an existing file, except with
    /// `keep_active_name`, where it is `image` itself, re-created after `image` was renamed to
    /// `snapshot_file`.
    pub overlay: Option<PathBuf>,
    /// External with `keep_active_name`: the name the current image is renamed to (it then
    /// holds the snapshot's data); never an existing file.
    pub snapshot_file: Option<PathBuf>,
}

/// A validated snapshot request: everything needed to take the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Plan {
    /// The snapshot's name, unique among the domain's snapshots.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The state recorded with the snapshot.
    pub state: SnapshotState,
    /// Checkpoint or disk-only.
    pub kind: SnapshotKind,
    /// Where the VM state goes.
    pub memory: MemoryMode,
    /// External VM state: the new file.
    pub memory_file: Option<PathBuf>,
    /// Internal VM state: the target of the qcow2 disk holding it.
    pub vmstate_disk: Option<String>,
    /// One per disk of the definition, in definition order, mode `no` included.
    pub disks: Vec<DiskPlan>,
    /// External VM state saved while the guest keeps running.
    pub live: bool,
    /// External disks keep their active path (see [`DiskPlan::snapshot_file`]).
    pub keep_active_name: bool,
    /// The definition when the snapshot is taken.
    pub def_before: DomainDef,
    /// The definition afterwards: each external disk's source is its overlay (unchanged with
    /// `keep_active_name`) and its format qcow2.
    pub def_after: DomainDef,
}

impl Plan {
    /// The definition whose disk sources hold the snapshot's data: `def_before`, with the images
    /// renamed under `keep_active_name` at their new names. It is what a revert restores.
    pub fn snapshot_def(&self) -> DomainDef {
        let mut def = self.def_before.clone();
        for (disk, plan) in def.disks.iter_mut().zip(&self.disks) {
            if let Some(file) = &plan.snapshot_file {
                disk.source = file.clone();
            }
        }
        def
    }

    /// The disk plans whose mode is not [`DiskMode::No`].
    pub fn covered_disks(&self) -> impl Iterator<Item = &DiskPlan> {
        self.disks.iter().filter(|d| d.mode != DiskMode::No)
    }
}

/// Why a snapshot request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PlanError {
    /// The request is malformed or self-contradictory.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is well-formed but cannot be done with these disks or formats.
    #[error("{0}")]
    Unsupported(String),
    /// The domain is not in a state that allows it.
    #[error("{0}")]
    InvalidState(String),
    /// A name or file that must be new already exists.
    #[error("{0}")]
    AlreadyExists(String),
}

fn invalid(msg: impl Into<String>) -> PlanError {
    PlanError::InvalidArgument(msg.into())
}

fn unsupported(msg: impl Into<String>) -> PlanError {
    PlanError::Unsupported(msg.into())
}

fn exists(msg: impl Into<String>) -> PlanError {
    PlanError::AlreadyExists(msg.into())
}

// ---------------------------------------------------------------------------------------------
// Names and text

/// Checks a snapshot name: 1..=[`MAX_NAME_LEN`] characters (any Unicode letters, spaces
/// included), no control characters (nor characters XML cannot carry, NUL among them), no `/`,
/// not starting with `-` or `.`.
pub fn validate_snapshot_name(name: &str) -> Result<(), PlanError> {
    let reason = if name.is_empty() {
        Some("must not be empty".to_owned())
    } else if name.chars().count() > MAX_NAME_LEN {
        Some(format!("must be at most {MAX_NAME_LEN} characters"))
    } else if name.chars().any(|c| c.is_control() || !is_xml_char(c)) {
        Some("must not contain control characters".to_owned())
    } else if name.contains('/') {
        Some("must not contain '/'".to_owned())
    } else if name.starts_with(['-', '.']) {
        // A leading '-' reads as an option on command lines, a leading '.' hides files and
        // covers '.' and '..'.
        Some("must not start with '-' or '.'".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(invalid(format!(
            "snapshot name '{}' {reason}",
            name.escape_debug()
        ))),
        None => Ok(()),
    }
}

fn validate_description(description: &str) -> Result<(), PlanError> {
    if description.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(invalid(format!(
            "the description is longer than {MAX_DESCRIPTION_LEN} characters"
        )));
    }
    if let Some(c) = description.chars().find(|&c| !is_xml_char(c)) {
        return Err(invalid(format!(
            "the description contains U+{:04X}, which cannot be stored",
            u32::from(c)
        )));
    }
    Ok(())
}

/// libvirt's default name: the creation time in unix seconds; `-1`, `-2`… when taken.
fn generate_name(now_unix: i64, taken: &dyn Fn(&str) -> bool) -> Result<String, PlanError> {
    let base = now_unix.to_string();
    if !taken(&base) {
        return Ok(base);
    }
    (1..=MAX_GENERATED_SUFFIX)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken(n))
        .ok_or_else(|| exists(format!("every generated snapshot name {base}-N is taken")))
}

/// Keeps `[A-Za-z0-9._-]`, replaces any other character with `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Planning

/// The index of the disk named by its target or its current source path.
fn resolve_disk(def: &DomainDef, name: &str) -> Option<usize> {
    def.disks
        .iter()
        .position(|d| d.target == name)
        .or_else(|| def.disks.iter().position(|d| d.source == Path::new(name)))
}

fn default_mode(disk: &DiskDef, kind: SnapshotKind, memory: MemoryMode) -> DiskMode {
    if disk.transient || disk.readonly || disk.shareable {
        DiskMode::No
    } else if kind == SnapshotKind::DiskOnly || memory == MemoryMode::External {
        DiskMode::External
    } else if disk.format == DiskFormat::Qcow2 {
        DiskMode::Internal
    } else {
        DiskMode::External
    }
}

fn check_mode(disk: &DiskDef, mode: DiskMode) -> Result<(), PlanError> {
    let t = &disk.target;
    if mode == DiskMode::No {
        return Ok(());
    }
    if disk.transient {
        return Err(unsupported(format!(
            "disk {t} is transient: its writes are thrown away, so it cannot be snapshotted"
        )));
    }
    if disk.readonly {
        return Err(unsupported(format!(
            "disk {t} is read-only: it cannot be snapshotted"
        )));
    }
    if mode == DiskMode::Internal && disk.format != DiskFormat::Qcow2 {
        return Err(unsupported(format!(
            "disk {t} is {}: internal snapshots need qcow2",
            disk.format
        )));
    }
    if mode == DiskMode::External && disk.shareable {
        return Err(unsupported(format!(
            "disk {t} is shareable: an overlay would hide other guests' writes from it"
        )));
    }
    Ok(())
}

/// Checks a file that the snapshot will create.
fn check_new_file(what: &str, path: &Path, def: &DomainDef, fs: &dyn Fs) -> Result<(), PlanError> {
    let shown = path.display();
    let Some(text) = path.to_str() else {
        return Err(invalid(format!("{what} {shown} is not valid UTF-8")));
    };
    if !path.is_absolute() {
        return Err(invalid(format!("{what} {shown} is not an absolute path")));
    }
    if path.components().any(|c| c == Component::ParentDir) || path.file_name().is_none() {
        return Err(invalid(format!("{what} {shown} must not contain '..'")));
    }
    if let Some(c) = text.chars().find(|&c| c == '\0' || !is_xml_char(c)) {
        return Err(invalid(format!(
            "{what} {} contains U+{:04X}",
            text.escape_debug(),
            u32::from(c)
        )));
    }
    if let Some(disk) = def.disks.iter().find(|d| d.source == path) {
        return Err(exists(format!(
            "{what} {shown} is the image of disk {}",
            disk.target
        )));
    }
    if fs.exists(path) {
        return Err(exists(format!("{what} {shown} already exists")));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    if !fs.is_dir(parent) {
        return Err(invalid(format!(
            "the directory {} for {what} {shown} does not exist",
            parent.display()
        )));
    }
    Ok(())
}

/// Records a new file, refusing a second claim on the same path.
fn claim(
    files: &mut BTreeMap<PathBuf, String>,
    path: &Path,
    owner: String,
) -> Result<(), PlanError> {
    if let Some(other) = files.get(path) {
        return Err(invalid(format!(
            "{other} and {owner} would both be {}",
            path.display()
        )));
    }
    files.insert(path.to_owned(), owner);
    Ok(())
}

/// `<dir>/<image-stem>.<tag>.qcow2`.
fn default_overlay(disk: &DiskDef, tag: &str) -> PathBuf {
    let stem = disk
        .source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| disk.target.clone());
    let dir = disk.source.parent().unwrap_or(Path::new("/"));
    dir.join(format!("{stem}.{tag}.qcow2"))
}

/// Validates `req` against the definition and the guest's state, and resolves every default.
///
/// `existing_names` tells whether a snapshot name is taken; `now_unix` is used for a generated
/// name; `fs` answers the file-existence questions.
pub fn plan(
    def: &DomainDef,
    state: GuestRunState,
    req: &CreateRequest,
    existing_names: &dyn Fn(&str) -> bool,
    now_unix: i64,
    fs: &dyn Fs,
) -> Result<Plan, PlanError> {
    // Name and description.
    let name = match &req.name {
        Some(name) => {
            validate_snapshot_name(name)?;
            if existing_names(name) {
                return Err(exists(format!("a snapshot named '{name}' already exists")));
            }
            name.clone()
        }
        None => generate_name(now_unix, existing_names)?,
    };
    validate_description(&req.description)?;

    // VM state.
    let shut_off = state == GuestRunState::Shutoff;
    let memory = match req.memory {
        Some(m @ (MemoryMode::Internal | MemoryMode::External)) => {
            if req.disk_only {
                return Err(invalid(format!(
                    "a disk-only snapshot cannot save the VM state (memory {m})"
                )));
            }
            if shut_off {
                return Err(PlanError::InvalidState(
                    "a VM-state snapshot needs a running or paused domain".into(),
                ));
            }
            m
        }
        Some(MemoryMode::None) => MemoryMode::None,
        None if req.disk_only || shut_off => MemoryMode::None,
        None => MemoryMode::Internal,
    };
    let kind = if req.disk_only || (memory == MemoryMode::None && !shut_off) {
        SnapshotKind::DiskOnly
    } else {
        SnapshotKind::Checkpoint
    };
    if let Some(file) = &req.memory_file
        && memory != MemoryMode::External
    {
        return Err(invalid(format!(
            "the memory file {} needs external VM state, not {memory}",
            file.display()
        )));
    }
    if req.live && memory != MemoryMode::External {
        return Err(invalid(format!(
            "a live snapshot needs external VM state, not {memory}"
        )));
    }
    if let Some(disk) = &req.vmstate_disk
        && memory != MemoryMode::Internal
    {
        return Err(invalid(format!(
            "disk {disk} can hold the VM state only with internal VM state, not {memory}"
        )));
    }

    // Per-disk requests.
    let mut requests: Vec<Option<&DiskRequest>> = vec![None; def.disks.len()];
    for r in &req.disks {
        let i = resolve_disk(def, &r.target)
            .ok_or_else(|| invalid(format!("the domain has no disk '{}'", r.target)))?;
        let target = &def.disks[i].target;
        if requests[i].is_some() {
            return Err(invalid(format!("disk {target} is requested twice")));
        }
        if let Some(file) = &r.file
            && r.mode != DiskMode::External
        {
            return Err(invalid(format!(
                "disk {target}: the file {} is only for an external snapshot, not {}",
                file.display(),
                r.mode
            )));
        }
        requests[i] = Some(r);
    }

    // Modes.
    let mut modes = Vec::with_capacity(def.disks.len());
    for (disk, r) in def.disks.iter().zip(&requests) {
        let mode = match r {
            Some(r) => {
                check_mode(disk, r.mode)?;
                r.mode
            }
            None => default_mode(disk, kind, memory),
        };
        modes.push(mode);
    }
    if memory != MemoryMode::None
        && let Some(disk) = def
            .disks
            .iter()
            .zip(&modes)
            .find(|(d, m)| !d.readonly && !d.transient && **m == DiskMode::No)
            .map(|(d, _)| d)
    {
        let why = if disk.shareable {
            " (it is shareable, and cannot be snapshotted)"
        } else {
            ""
        };
        return Err(invalid(format!(
            "a checkpoint must cover every writable disk; {} is left out{why}",
            disk.target
        )));
    }
    if memory == MemoryMode::None && modes.iter().all(|m| *m == DiskMode::No) {
        return Err(invalid(
            "nothing to snapshot: every disk is left out and no VM state is saved",
        ));
    }
    // Where internal VM state goes.
    let vmstate_disk = if memory == MemoryMode::Internal {
        let i = match &req.vmstate_disk {
            Some(n) => {
                let i = resolve_disk(def, n).ok_or_else(|| {
                    invalid(format!("the domain has no disk '{n}' for the VM state"))
                })?;
                let d = &def.disks[i];
                if d.format != DiskFormat::Qcow2 {
                    return Err(unsupported(format!(
                        "disk {} is {}: internal VM state needs qcow2",
                        d.target, d.format
                    )));
                }
                if modes[i] != DiskMode::Internal {
                    return Err(invalid(format!(
                        "disk {} is snapshotted {}: internal VM state needs a disk snapshotted \
                         internally",
                        d.target, modes[i]
                    )));
                }
                i
            }
            None => modes
                .iter()
                .zip(&def.disks)
                .position(|(m, d)| {
                    *m == DiskMode::Internal
                        && d.format == DiskFormat::Qcow2
                        && !d.readonly
                        && !d.transient
                })
                .ok_or_else(|| unsupported("internal VM state needs a writable qcow2 disk"))?,
        };
        Some(def.disks[i].target.clone())
    } else {
        None
    };

    // keep_active_name.
    let any_external = modes.contains(&DiskMode::External);
    if req.keep_active_name {
        if !any_external {
            return Err(invalid(
                "keeping the active file names needs at least one external disk snapshot",
            ));
        }
        for (disk, mode) in def.disks.iter().zip(&modes) {
            if *mode == DiskMode::External && fs.is_block_device(&disk.source) {
                return Err(unsupported(format!(
                    "cannot rename block device {} (disk {})",
                    disk.source.display(),
                    disk.target
                )));
            }
        }
    }

    // New files.
    let tag = sanitize(&name);
    let mut new_files = BTreeMap::new();
    let mut disks = Vec::with_capacity(def.disks.len());
    for ((disk, mode), r) in def.disks.iter().zip(&modes).zip(&requests) {
        let (mut overlay, mut snapshot_file) = (None, None);
        if *mode == DiskMode::External {
            let file = match r.and_then(|r| r.file.clone()) {
                Some(file) => file,
                None => {
                    if !req.keep_active_name && fs.is_block_device(&disk.source) {
                        return Err(invalid(format!(
                            "disk {} is the block device {}: name its overlay file",
                            disk.target,
                            disk.source.display()
                        )));
                    }
                    default_overlay(disk, &tag)
                }
            };
            let what = if req.keep_active_name {
                format!("the renamed image of disk {}", disk.target)
            } else {
                format!("the overlay of disk {}", disk.target)
            };
            check_new_file(&what, &file, def, fs)?;
            claim(&mut new_files, &file, what)?;
            if req.keep_active_name {
                overlay = Some(disk.source.clone());
                snapshot_file = Some(file);
            } else {
                overlay = Some(file);
            }
        }
        disks.push(DiskPlan {
            target: disk.target.clone(),
            format: disk.format,
            mode: *mode,
            image: disk.source.clone(),
            overlay,
            snapshot_file,
        });
    }
    let memory_file = if memory == MemoryMode::External {
        let file = match &req.memory_file {
            Some(file) => file.clone(),
            None => {
                let beside = def
                    .writable_disks()
                    .find(|d| !fs.is_block_device(&d.source))
                    .ok_or_else(|| {
                        invalid("no disk image to put the VM state file beside: name the file")
                    })?;
                let dir = beside.source.parent().unwrap_or(Path::new("/"));
                dir.join(format!("{}.{tag}.vmstate", def.name))
            }
        };
        check_new_file("the memory file", &file, def, fs)?;
        claim(&mut new_files, &file, "the memory file".into())?;
        Some(file)
    } else {
        None
    };

    // The definition afterwards.
    let mut def_after = def.clone();
    for (disk, p) in def_after.disks.iter_mut().zip(&disks) {
        if p.mode == DiskMode::External {
            disk.format = DiskFormat::Qcow2;
            if let (false, Some(overlay)) = (req.keep_active_name, &p.overlay) {
                disk.source = overlay.clone();
            }
        }
    }
    def_after.validate().map_err(|e| {
        invalid(format!(
            "the definition after the snapshot would be invalid: {e}"
        ))
    })?;

    let state = match (kind, state) {
        (SnapshotKind::DiskOnly, _) => SnapshotState::DiskSnapshot,
        (SnapshotKind::Checkpoint, GuestRunState::Running) => SnapshotState::Running,
        (SnapshotKind::Checkpoint, GuestRunState::Paused) => SnapshotState::Paused,
        (SnapshotKind::Checkpoint, GuestRunState::Shutoff) => SnapshotState::Shutoff,
    };
    Ok(Plan {
        name,
        description: req.description.clone(),
        state,
        kind,
        memory,
        memory_file,
        vmstate_disk,
        disks,
        live: req.live,
        keep_active_name: req.keep_active_name,
        def_before: def.clone(),
        def_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::def::DiskBus;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Default)]
    struct FakeFs {
        files: BTreeSet<PathBuf>,
        dirs: BTreeSet<PathBuf>,
        block: BTreeSet<PathBuf>,
    }

    impl FakeFs {
        /// `/`, `/img` and `/dev` exist, and every disk image of `def`.
        fn for_def(def: &DomainDef) -> FakeFs {
            let mut fs = FakeFs::default();
            for dir in ["/", "/img", "/dev", "/other"] {
                fs.dirs.insert(dir.into());
            }
            for disk in &def.disks {
                fs.files.insert(disk.source.clone());
            }
            fs
        }

        fn with_file(mut self, path: &str) -> FakeFs {
            self.files.insert(path.into());
            self
        }
    }

    impl Fs for FakeFs {
        fn exists(&self, path: &Path) -> bool {
            self.files.contains(path) || self.dirs.contains(path) || self.block.contains(path)
        }
        fn is_dir(&self, path: &Path) -> bool {
            self.dirs.contains(path)
        }
        fn is_block_device(&self, path: &Path) -> bool {
            self.block.contains(path)
        }
    }

    fn disk(target: &str, format: DiskFormat, source: &str) -> DiskDef {
        DiskDef {
            target: target.into(),
            bus: DiskBus::Virtio,
            format,
            source: source.into(),
            readonly: false,
            shareable: false,
            transient: false,
            boot_order: None,
        }
    }

    fn domain(disks: Vec<DiskDef>) -> DomainDef {
        let def = DomainDef {
            name: "guest".into(),
            uuid: uuid::Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef),
            domain_type: "kvm".into(),
            description: None,
            memory_kib: 1 << 20,
            vcpus: 1,
            arch: "x86_64".into(),
            machine: "q35".into(),
            boot_devs: Vec::new(),
            disks,
        };
        def.validate().unwrap();
        def
    }

    /// vda: qcow2, vdb: raw.
    fn two_disks() -> DomainDef {
        domain(vec![
            disk("vda", DiskFormat::Qcow2, "/img/a.qcow2"),
            disk("vdb", DiskFormat::Raw, "/img/b.raw"),
        ])
    }

    fn named(name: &str) -> CreateRequest {
        CreateRequest {
            name: Some(name.into()),
            ..CreateRequest::default()
        }
    }

    fn no_names(_: &str) -> bool {
        false
    }

    const NOW: i64 = 1_700_000_000;

    fn run(def: &DomainDef, state: GuestRunState, req: &CreateRequest) -> Result<Plan, PlanError> {
        plan(def, state, req, &no_names, NOW, &FakeFs::for_def(def))
    }

    fn running(def: &DomainDef, req: &CreateRequest) -> Result<Plan, PlanError> {
        run(def, GuestRunState::Running, req)
    }

    fn modes(p: &Plan) -> Vec<DiskMode> {
        p.disks.iter().map(|d| d.mode).collect()
    }

    fn dreq(target: &str, mode: DiskMode, file: Option<&str>) -> DiskRequest {
        DiskRequest {
            target: target.into(),
            mode,
            file: file.map(PathBuf::from),
        }
    }

    fn err_kind(e: &PlanError) -> &'static str {
        match e {
            PlanError::InvalidArgument(_) => "invalid",
            PlanError::Unsupported(_) => "unsupported",
            PlanError::InvalidState(_) => "state",
            PlanError::AlreadyExists(_) => "exists",
        }
    }

    #[track_caller]
    fn refused(r: Result<Plan, PlanError>, kind: &str, needle: &str) {
        match r {
            Ok(p) => panic!("expected {kind} error containing {needle:?}, got plan {p:?}"),
            Err(e) => {
                assert_eq!(err_kind(&e), kind, "{e}");
                assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
            }
        }
    }

    #[test]
    fn defaults_running_and_paused() {
        let def = two_disks();
        for (state, snap_state) in [
            (GuestRunState::Running, SnapshotState::Running),
            (GuestRunState::Paused, SnapshotState::Paused),
        ] {
            let p = run(&def, state, &named("s1")).unwrap();
            assert_eq!(p.kind, SnapshotKind::Checkpoint);
            assert_eq!(p.state, snap_state);
            assert_eq!(p.memory, MemoryMode::Internal);
            assert_eq!(p.memory_file, None);
            assert_eq!(p.vmstate_disk.as_deref(), Some("vda"));
            assert_eq!(modes(&p), [DiskMode::Internal, DiskMode::External]);
            assert_eq!(p.disks[0].overlay, None);
            assert_eq!(p.disks[0].image, Path::new("/img/a.qcow2"));
            assert_eq!(
                p.disks[1].overlay.as_deref(),
                Some(Path::new("/img/b.s1.qcow2"))
            );
            assert_eq!(p.disks[1].snapshot_file, None);
            assert_eq!(p.disks[1].format, DiskFormat::Raw);
            assert_eq!(p.def_before, def);
            assert_eq!(p.def_after.disks[0], def.disks[0]);
            assert_eq!(p.def_after.disks[1].source, Path::new("/img/b.s1.qcow2"));
            assert_eq!(p.def_after.disks[1].format, DiskFormat::Qcow2);
            assert_eq!(p.snapshot_def(), def);
            assert_eq!(p.covered_disks().count(), 2);
        }
    }

    #[test]
    fn defaults_shut_off() {
        let def = two_disks();
        let p = run(&def, GuestRunState::Shutoff, &named("s")).unwrap();
        assert_eq!(
            (p.kind, p.state, p.memory, p.vmstate_disk.as_deref()),
            (
                SnapshotKind::Checkpoint,
                SnapshotState::Shutoff,
                MemoryMode::None,
                None
            )
        );
        assert_eq!(modes(&p), [DiskMode::Internal, DiskMode::External]);
        let req = CreateRequest {
            disk_only: true,
            ..named("s")
        };
        let p = run(&def, GuestRunState::Shutoff, &req).unwrap();
        assert_eq!(
            (p.kind, p.state),
            (SnapshotKind::DiskOnly, SnapshotState::DiskSnapshot)
        );
        assert_eq!(modes(&p), [DiskMode::External, DiskMode::External]);
    }

    #[test]
    fn defaults_disk_only_and_memory_none() {
        let def = two_disks();
        let disk_only = CreateRequest {
            disk_only: true,
            ..named("s")
        };
        let no_memory = CreateRequest {
            memory: Some(MemoryMode::None),
            ..named("s")
        };
        for req in [disk_only, no_memory] {
            for state in [GuestRunState::Running, GuestRunState::Paused] {
                let p = run(&def, state, &req).unwrap();
                assert_eq!(p.kind, SnapshotKind::DiskOnly);
                assert_eq!(p.state, SnapshotState::DiskSnapshot);
                assert_eq!(p.memory, MemoryMode::None);
                assert_eq!(modes(&p), [DiskMode::External, DiskMode::External]);
                assert_eq!(
                    p.disks[0].overlay.as_deref(),
                    Some(Path::new("/img/a.s.qcow2"))
                );
                assert_eq!(p.def_after.disks[0].source, Path::new("/img/a.s.qcow2"));
            }
        }
    }

    #[test]
    fn defaults_external_memory() {
        let def = two_disks();
        let req = CreateRequest {
            memory: Some(MemoryMode::External),
            live: true,
            ..named("s")
        };
        let p = running(&def, &req).unwrap();
        assert_eq!(
            (p.kind, p.state),
            (SnapshotKind::Checkpoint, SnapshotState::Running)
        );
        assert_eq!(modes(&p), [DiskMode::External, DiskMode::External]);
        assert_eq!(
            p.memory_file.as_deref(),
            Some(Path::new("/img/guest.s.vmstate"))
        );
        assert!(p.live);
        assert_eq!(p.vmstate_disk, None);
    }

    #[test]
    fn names() {
        for bad in [
            "".to_owned(),
            "x".repeat(MAX_NAME_LEN + 1),
            "a\nb".into(),
            "a\u{7f}".into(),
            "a/b".into(),
            ".".into(),
            "..".into(),
            "...".into(),
            "-x".into(),
            ".hidden".into(),
            "a\0b".into(),
        ] {
            let e = validate_snapshot_name(&bad).unwrap_err();
            assert_eq!(err_kind(&e), "invalid", "{bad:?}");
            refused(
                running(&two_disks(), &named(&bad)),
                "invalid",
                "snapshot name",
            );
        }
        for good in [
            "é".repeat(MAX_NAME_LEN),
            "x...".into(),
            "a b".into(),
            "x-".into(),
        ] {
            assert_eq!(validate_snapshot_name(&good), Ok(()), "{good:?}");
        }
        let def = two_disks();
        let fs = FakeFs::for_def(&def);
        let taken = |n: &str| ["s", "1700000000", "1700000000-1"].contains(&n);
        let r = plan(&def, GuestRunState::Running, &named("s"), &taken, NOW, &fs);
        refused(r, "exists", "'s'");
        let p = plan(
            &def,
            GuestRunState::Running,
            &CreateRequest::default(),
            &no_names,
            NOW,
            &fs,
        )
        .unwrap();
        assert_eq!(p.name, "1700000000");
        let p = plan(
            &def,
            GuestRunState::Running,
            &CreateRequest::default(),
            &taken,
            NOW,
            &fs,
        )
        .unwrap();
        assert_eq!(p.name, "1700000000-2");
        assert_eq!(
            p.disks[1].overlay.as_deref(),
            Some(Path::new("/img/b.1700000000-2.qcow2"))
        );
        let all = |_: &str| true;
        let r = plan(
            &def,
            GuestRunState::Running,
            &CreateRequest::default(),
            &all,
            NOW,
            &fs,
        );
        refused(r, "exists", "1700000000-N");
    }

    #[test]
    fn descriptions() {
        let def = two_disks();
        let ok = CreateRequest {
            description: "é\n\t".repeat(MAX_DESCRIPTION_LEN / 3),
            ..named("s")
        };
        assert_eq!(running(&def, &ok).unwrap().description, ok.description);
        let long = CreateRequest {
            description: "x".repeat(MAX_DESCRIPTION_LEN + 1),
            ..named("s")
        };
        refused(running(&def, &long), "invalid", "description");
        let nul = CreateRequest {
            description: "a\0b".into(),
            ..named("s")
        };
        refused(running(&def, &nul), "invalid", "U+0000");
    }

    #[test]
    fn sanitized_file_names() {
        let def = two_disks();
        let p = running(&def, &named("my snap:é")).unwrap();
        assert_eq!(
            p.disks[1].overlay.as_deref(),
            Some(Path::new("/img/b.my_snap__.qcow2"))
        );
        let p = running(&def, &named("v1.0_rc-2")).unwrap();
        assert_eq!(
            p.disks[1].overlay.as_deref(),
            Some(Path::new("/img/b.v1.0_rc-2.qcow2"))
        );
    }

    #[test]
    fn memory_conflicts() {
        let def = two_disks();
        for m in [MemoryMode::Internal, MemoryMode::External] {
            let req = CreateRequest {
                disk_only: true,
                memory: Some(m),
                ..named("s")
            };
            refused(running(&def, &req), "invalid", "disk-only");
            let req = CreateRequest {
                memory: Some(m),
                ..named("s")
            };
            refused(
                run(&def, GuestRunState::Shutoff, &req),
                "state",
                "needs a running or paused domain",
            );
        }
        for m in [None, Some(MemoryMode::None), Some(MemoryMode::Internal)] {
            let req = CreateRequest {
                memory: m,
                memory_file: Some("/img/m".into()),
                ..named("s")
            };
            refused(running(&def, &req), "invalid", "/img/m");
            let req = CreateRequest {
                memory: m,
                live: true,
                ..named("s")
            };
            refused(running(&def, &req), "invalid", "live");
        }
        for m in [Some(MemoryMode::None), Some(MemoryMode::External)] {
            let req = CreateRequest {
                memory: m,
                vmstate_disk: Some("vda".into()),
                ..named("s")
            };
            refused(running(&def, &req), "invalid", "vda");
        }
        // Shut off: vmstate_disk is meaningless too (memory defaults to none).
        let req = CreateRequest {
            vmstate_disk: Some("vda".into()),
            ..named("s")
        };
        refused(run(&def, GuestRunState::Shutoff, &req), "invalid", "vda");
    }

    #[test]
    fn vmstate_disk() {
        let def = domain(vec![
            disk("vda", DiskFormat::Raw, "/img/a.raw"),
            disk("vdb", DiskFormat::Qcow2, "/img/b.qcow2"),
            disk("vdc", DiskFormat::Qcow2, "/img/c.qcow2"),
        ]);
        assert_eq!(
            running(&def, &named("s")).unwrap().vmstate_disk.as_deref(),
            Some("vdb")
        );
        let with = |disk: &str, disks: Vec<DiskRequest>| CreateRequest {
            vmstate_disk: Some(disk.into()),
            disks,
            ..named("s")
        };
        let p = running(&def, &with("vdc", vec![])).unwrap();
        assert_eq!(p.vmstate_disk.as_deref(), Some("vdc"));
        let p = running(&def, &with("/img/c.qcow2", vec![])).unwrap();
        assert_eq!(p.vmstate_disk.as_deref(), Some("vdc"));
        refused(
            running(&def, &with("vda", vec![])),
            "unsupported",
            "vda is raw",
        );
        refused(running(&def, &with("vdz", vec![])), "invalid", "vdz");
        refused(
            running(
                &def,
                &with("vdc", vec![dreq("vdc", DiskMode::External, None)]),
            ),
            "invalid",
            "vdc is snapshotted external",
        );
        let req = CreateRequest {
            disks: vec![
                dreq("vdb", DiskMode::External, None),
                dreq("vdc", DiskMode::External, None),
            ],
            ..named("s")
        };
        refused(running(&def, &req), "unsupported", "writable qcow2 disk");
        let raw_only = domain(vec![disk("vda", DiskFormat::Raw, "/img/a.raw")]);
        refused(
            running(&raw_only, &named("s")),
            "unsupported",
            "writable qcow2 disk",
        );
    }

    #[test]
    fn disk_requests() {
        let def = two_disks();
        let with = |disks: Vec<DiskRequest>| CreateRequest {
            disks,
            ..named("s")
        };
        refused(
            running(&def, &with(vec![dreq("vdq", DiskMode::No, None)])),
            "invalid",
            "no disk 'vdq'",
        );
        refused(
            running(
                &def,
                &with(vec![
                    dreq("vdb", DiskMode::External, None),
                    dreq("/img/b.raw", DiskMode::External, None),
                ]),
            ),
            "invalid",
            "vdb is requested twice",
        );
        let req = CreateRequest {
            memory: Some(MemoryMode::External),
            ..with(vec![dreq(
                "/img/a.qcow2",
                DiskMode::External,
                Some("/other/x"),
            )])
        };
        let p = running(&def, &req).unwrap();
        assert_eq!(p.disks[0].overlay.as_deref(), Some(Path::new("/other/x")));
        assert_eq!(p.def_after.disks[0].source, Path::new("/other/x"));
        refused(
            running(&def, &with(vec![dreq("vdb", DiskMode::Internal, None)])),
            "unsupported",
            "disk vdb is raw: internal snapshots need qcow2",
        );
        for mode in [DiskMode::Internal, DiskMode::No] {
            refused(
                running(&def, &with(vec![dreq("vda", mode, Some("/img/n.qcow2"))])),
                "invalid",
                "only for an external snapshot",
            );
        }
        let qed = domain(vec![disk("vda", DiskFormat::Qed, "/img/a.qed")]);
        refused(
            run(
                &qed,
                GuestRunState::Shutoff,
                &with(vec![dreq("vda", DiskMode::Internal, None)]),
            ),
            "unsupported",
            "disk vda is qed: internal snapshots need qcow2",
        );
        // Explicit internal on qcow2 during a disk-only snapshot.
        let req = CreateRequest {
            disk_only: true,
            disks: vec![dreq("vda", DiskMode::Internal, None)],
            ..named("s")
        };
        assert_eq!(
            modes(&running(&def, &req).unwrap()),
            [DiskMode::Internal, DiskMode::External]
        );
    }

    #[test]
    fn transient_read_only_and_shareable_disks() {
        let mut transient = disk("vdb", DiskFormat::Qcow2, "/img/t.qcow2");
        transient.transient = true;
        let mut ro = disk("vdc", DiskFormat::Qcow2, "/img/ro.qcow2");
        ro.readonly = true;
        let mut shared = disk("vdd", DiskFormat::Raw, "/img/sh.raw");
        shared.shareable = true;
        let def = domain(vec![
            disk("vda", DiskFormat::Qcow2, "/img/a.qcow2"),
            transient,
            ro,
            shared.clone(),
        ]);
        let req = CreateRequest {
            disk_only: true,
            ..named("s")
        };
        let p = running(&def, &req).unwrap();
        assert_eq!(
            modes(&p),
            [DiskMode::External, DiskMode::No, DiskMode::No, DiskMode::No]
        );
        for (target, needle) in [
            ("vdb", "vdb is transient"),
            ("vdc", "vdc is read-only"),
            ("vdd", "vdd is shareable"),
        ] {
            let req = CreateRequest {
                disk_only: true,
                disks: vec![dreq(target, DiskMode::External, None)],
                ..named("s")
            };
            refused(running(&def, &req), "unsupported", needle);
        }
        refused(
            running(&def, &named("s")),
            "invalid",
            "vdd is left out (it is shareable",
        );
        let without_shared = domain(def.disks[..3].to_vec());
        let p = running(&without_shared, &named("s")).unwrap();
        assert_eq!(modes(&p), [DiskMode::Internal, DiskMode::No, DiskMode::No]);
        assert_eq!(p.def_after, without_shared);
    }

    #[test]
    fn checkpoint_coverage_and_nothing_to_snapshot() {
        let def = two_disks();
        for memory in [MemoryMode::Internal, MemoryMode::External] {
            let req = CreateRequest {
                memory: Some(memory),
                disks: vec![dreq("vdb", DiskMode::No, None)],
                ..named("s")
            };
            refused(
                running(&def, &req),
                "invalid",
                "a checkpoint must cover every writable disk; vdb is left out",
            );
        }
        let req = CreateRequest {
            disk_only: true,
            disks: vec![dreq("vdb", DiskMode::No, None)],
            ..named("s")
        };
        assert_eq!(
            modes(&running(&def, &req).unwrap()),
            [DiskMode::External, DiskMode::No]
        );
        let req = CreateRequest {
            disks: vec![
                dreq("vda", DiskMode::No, None),
                dreq("vdb", DiskMode::No, None),
            ],
            ..named("s")
        };
        refused(
            run(&def, GuestRunState::Shutoff, &req),
            "invalid",
            "nothing to snapshot",
        );
        let req = CreateRequest {
            memory: Some(MemoryMode::None),
            ..req
        };
        refused(running(&def, &req), "invalid", "nothing to snapshot");
        let empty = domain(vec![]);
        refused(
            run(&empty, GuestRunState::Shutoff, &named("s")),
            "invalid",
            "nothing",
        );
    }

    #[test]
    fn external_files() {
        let def = two_disks();
        let ext = |file: &str| CreateRequest {
            disk_only: true,
            disks: vec![dreq("vda", DiskMode::External, Some(file))],
            ..named("s")
        };
        refused(
            running(&def, &ext("rel/x.qcow2")),
            "invalid",
            "not an absolute path",
        );
        refused(running(&def, &ext("/img/../etc/x")), "invalid", "'..'");
        refused(
            running(&def, &ext("/nodir/x.qcow2")),
            "invalid",
            "directory /nodir",
        );
        refused(
            running(&def, &ext("/img/b.raw")),
            "exists",
            "image of disk vdb",
        );
        refused(
            running(&def, &ext("/img/a.qcow2")),
            "exists",
            "image of disk vda",
        );
        refused(running(&def, &ext("/img")), "exists", "/img already exists");
        let fs = FakeFs::for_def(&def).with_file("/img/x.qcow2");
        let r = plan(
            &def,
            GuestRunState::Running,
            &ext("/img/x.qcow2"),
            &no_names,
            NOW,
            &fs,
        );
        refused(r, "exists", "/img/x.qcow2 already exists");
        // A default overlay never overwrites an existing file.
        let fs = FakeFs::for_def(&def).with_file("/img/b.s.qcow2");
        let r = plan(
            &def,
            GuestRunState::Running,
            &named("s"),
            &no_names,
            NOW,
            &fs,
        );
        refused(
            r,
            "exists",
            "the overlay of disk vdb /img/b.s.qcow2 already exists",
        );
        // The same path twice.
        let req = CreateRequest {
            disk_only: true,
            disks: vec![dreq("vda", DiskMode::External, Some("/img/b.s.qcow2"))],
            ..named("s")
        };
        refused(
            running(&def, &req),
            "invalid",
            "would both be /img/b.s.qcow2",
        );
        let req = CreateRequest {
            memory: Some(MemoryMode::External),
            memory_file: Some("/img/a.s.qcow2".into()),
            ..named("s")
        };
        refused(
            running(&def, &req),
            "invalid",
            "would both be /img/a.s.qcow2",
        );
    }

    #[test]
    fn memory_files() {
        let def = two_disks();
        let mem = |file: Option<&str>| CreateRequest {
            memory: Some(MemoryMode::External),
            memory_file: file.map(PathBuf::from),
            ..named("s")
        };
        let p = running(&def, &mem(Some("/other/ram"))).unwrap();
        assert_eq!(p.memory_file.as_deref(), Some(Path::new("/other/ram")));
        refused(
            running(&def, &mem(Some("ram"))),
            "invalid",
            "not an absolute path",
        );
        refused(
            running(&def, &mem(Some("/nodir/ram"))),
            "invalid",
            "directory /nodir",
        );
        let fs = FakeFs::for_def(&def).with_file("/other/ram");
        let r = plan(
            &def,
            GuestRunState::Running,
            &mem(Some("/other/ram")),
            &no_names,
            NOW,
            &fs,
        );
        refused(r, "exists", "the memory file /other/ram already exists");
        let fs = FakeFs::for_def(&def).with_file("/img/guest.s.vmstate");
        let r = plan(
            &def,
            GuestRunState::Running,
            &mem(None),
            &no_names,
            NOW,
            &fs,
        );
        refused(r, "exists", "/img/guest.s.vmstate");
        // The default goes beside the first writable disk that is not a block device.
        let mut ro = disk("vda", DiskFormat::Qcow2, "/ro/a.qcow2");
        ro.readonly = true;
        let def = domain(vec![
            ro,
            disk("vdb", DiskFormat::Raw, "/dev/sdb"),
            disk("vdc", DiskFormat::Raw, "/other/c.raw"),
        ]);
        let mut fs = FakeFs::for_def(&def);
        fs.block.insert("/dev/sdb".into());
        let req = CreateRequest {
            disks: vec![dreq("vdb", DiskMode::External, Some("/img/sdb.qcow2"))],
            ..mem(None)
        };
        let p = plan(&def, GuestRunState::Running, &req, &no_names, NOW, &fs).unwrap();
        assert_eq!(
            p.memory_file.as_deref(),
            Some(Path::new("/other/guest.s.vmstate"))
        );
    }

    #[test]
    fn block_devices() {
        let def = domain(vec![
            disk("vda", DiskFormat::Qcow2, "/img/a.qcow2"),
            disk("vdb", DiskFormat::Raw, "/dev/sdb"),
        ]);
        let mut fs = FakeFs::for_def(&def);
        fs.block.insert("/dev/sdb".into());
        let r = plan(
            &def,
            GuestRunState::Running,
            &named("s"),
            &no_names,
            NOW,
            &fs,
        );
        refused(r, "invalid", "vdb is the block device /dev/sdb");
        let req = CreateRequest {
            disks: vec![dreq("vdb", DiskMode::External, Some("/img/sdb.qcow2"))],
            ..named("s")
        };
        let p = plan(&def, GuestRunState::Running, &req, &no_names, NOW, &fs).unwrap();
        assert_eq!(p.def_after.disks[1].source, Path::new("/img/sdb.qcow2"));
        let req = CreateRequest {
            keep_active_name: true,
            ..req
        };
        let r = plan(&def, GuestRunState::Running, &req, &no_names, NOW, &fs);
        refused(r, "unsupported", "cannot rename block device /dev/sdb");
    }

    #[test]
    fn keep_active_name() {
        let def = two_disks();
        let req = CreateRequest {
            keep_active_name: true,
            disks: vec![dreq("vdb", DiskMode::No, None)],
            ..named("s")
        };
        refused(
            run(&def, GuestRunState::Shutoff, &req),
            "invalid",
            "at least one external",
        );
        let req = CreateRequest {
            keep_active_name: true,
            disk_only: true,
            disks: vec![dreq(
                "vda",
                DiskMode::External,
                Some("/other/a-frozen.qcow2"),
            )],
            ..named("s")
        };
        let p = running(&def, &req).unwrap();
        assert!(p.keep_active_name);
        assert_eq!(
            p.disks[0].overlay.as_deref(),
            Some(Path::new("/img/a.qcow2"))
        );
        assert_eq!(
            p.disks[0].snapshot_file.as_deref(),
            Some(Path::new("/other/a-frozen.qcow2"))
        );
        assert_eq!(p.disks[1].overlay.as_deref(), Some(Path::new("/img/b.raw")));
        assert_eq!(
            p.disks[1].snapshot_file.as_deref(),
            Some(Path::new("/img/b.s.qcow2"))
        );
        assert_eq!(p.def_after.disks[0], def.disks[0]);
        assert_eq!(p.def_after.disks[1].source, def.disks[1].source);
        assert_eq!(p.def_after.disks[1].format, DiskFormat::Qcow2);
        let snap = p.snapshot_def();
        assert_eq!(snap.disks[0].source, Path::new("/other/a-frozen.qcow2"));
        assert_eq!(snap.disks[1].source, Path::new("/img/b.s.qcow2"));
        assert_eq!(snap.disks[1].format, DiskFormat::Raw);
        // The renamed file must be new too.
        let fs = FakeFs::for_def(&def).with_file("/img/b.s.qcow2");
        let r = plan(&def, GuestRunState::Running, &req, &no_names, NOW, &fs);
        refused(r, "exists", "the renamed image of disk vdb /img/b.s.qcow2");
    }

    #[test]
    fn mode_strings() {
        for m in [MemoryMode::None, MemoryMode::Internal, MemoryMode::External] {
            assert_eq!(m.as_str().parse::<MemoryMode>(), Ok(m));
        }
        assert_eq!("no".parse::<MemoryMode>(), Ok(MemoryMode::None));
        for m in [DiskMode::No, DiskMode::Internal, DiskMode::External] {
            assert_eq!(m.to_string().parse::<DiskMode>(), Ok(m));
        }
        for s in [
            SnapshotState::Running,
            SnapshotState::Paused,
            SnapshotState::Shutoff,
            SnapshotState::DiskSnapshot,
        ] {
            assert_eq!(s.as_str().parse::<SnapshotState>(), Ok(s));
        }
        assert_eq!(SnapshotKind::DiskOnly.as_str(), "disk-only");
        assert_eq!(SnapshotKind::Checkpoint.to_string(), "checkpoint");
        assert!("None".parse::<MemoryMode>().is_err());
        assert!("yes".parse::<DiskMode>().is_err());
    }

    // -----------------------------------------------------------------------------------------
    // Properties over generated requests

    fn mode_strategy() -> impl Strategy<Value = DiskMode> {
        prop_oneof![
            Just(DiskMode::No),
            Just(DiskMode::Internal),
            Just(DiskMode::External)
        ]
    }

    fn path_strategy() -> impl Strategy<Value = Option<PathBuf>> {
        prop_oneof![
            3 => Just(None),
            2 => proptest::sample::select(vec![
                "/img/new1.qcow2",
                "/img/new2.qcow2",
                "/img/d0.img",
                "/img/taken",
                "/img/d1.s.qcow2",
                "/nodir/x",
                "rel.qcow2",
            ])
            .prop_map(|p| Some(PathBuf::from(p))),
        ]
    }

    /// (format, kind 0 plain / 1 read-only / 2 transient / 3 shareable / 4 block device)
    fn disks_strategy() -> impl Strategy<Value = Vec<(DiskFormat, u8)>> {
        let kind = prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8), 1 => Just(4u8)];
        proptest::collection::vec(
            (proptest::sample::select(DiskFormat::ALL.to_vec()), kind),
            0..4,
        )
    }

    fn rarely(p: f64) -> impl Strategy<Value = bool> {
        proptest::bool::weighted(p)
    }

    fn request_strategy() -> impl Strategy<Value = CreateRequest> {
        (
            proptest::option::of(proptest::sample::select(vec!["s", "old", "x y"])),
            rarely(0.3),
            proptest::option::of(prop_oneof![
                Just(MemoryMode::None),
                Just(MemoryMode::Internal),
                Just(MemoryMode::External)
            ]),
            proptest::option::weighted(0.2, path_strategy().prop_filter_map("some", |p| p)),
            proptest::option::weighted(0.2, proptest::sample::select(vec!["vda", "vdb", "vdz"])),
            proptest::collection::vec((0usize..4, mode_strategy(), path_strategy()), 0..3),
            rarely(0.2),
            rarely(0.3),
        )
            .prop_map(
                |(name, disk_only, memory, memory_file, vmstate, overrides, live, keep)| {
                    CreateRequest {
                        name: name.map(str::to_owned),
                        description: String::new(),
                        disk_only,
                        memory,
                        memory_file,
                        vmstate_disk: vmstate.map(str::to_owned),
                        disks: overrides
                            .into_iter()
                            .map(|(i, mode, file)| DiskRequest {
                                target: format!("vd{}", (b'a' + i as u8) as char),
                                mode,
                                file,
                            })
                            .collect(),
                        live,
                        keep_active_name: keep,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        #[test]
        fn plans_are_sound(
            seeds in disks_strategy(),
            req in request_strategy(),
            state in proptest::sample::select(vec![
                GuestRunState::Running, GuestRunState::Paused, GuestRunState::Shutoff,
            ]),
        ) {
            let disks: Vec<DiskDef> = seeds
                .iter()
                .enumerate()
                .map(|(i, &(format, kind))| {
                    let target = format!("vd{}", (b'a' + i as u8) as char);
                    let source = if kind == 4 {
                        format!("/dev/sd{}", (b'a' + i as u8) as char)
                    } else {
                        format!("/img/d{i}.img")
                    };
                    let mut d = disk(&target, format, &source);
                    d.readonly = kind == 1;
                    d.transient = kind == 2;
                    d.shareable = kind == 3 && format == DiskFormat::Raw;
                    d
                })
                .collect();
            let def = domain(disks);
            let mut fs = FakeFs::for_def(&def).with_file("/img/taken").with_file("/img/d1.s.qcow2");
            for d in &def.disks {
                if d.source.starts_with("/dev") {
                    fs.block.insert(d.source.clone());
                }
            }
            let taken = |n: &str| n == "old";
            let Ok(p) = plan(&def, state, &req, &taken, NOW, &fs) else {
                return Ok(());
            };
            prop_assert_eq!(p.disks.len(), def.disks.len());
            prop_assert!(!taken(&p.name));
            prop_assert_eq!(p.def_after.validate(), Ok(()));
            let mut new_files = BTreeSet::new();
            for (d, dp) in def.disks.iter().zip(&p.disks) {
                prop_assert_eq!(&d.target, &dp.target);
                if dp.mode == DiskMode::Internal {
                    prop_assert_eq!(d.format, DiskFormat::Qcow2);
                }
                if dp.mode != DiskMode::No {
                    prop_assert!(!d.readonly && !d.transient);
                }
                if p.memory != MemoryMode::None && !d.readonly && !d.transient {
                    prop_assert_ne!(dp.mode, DiskMode::No, "{} left out", d.target);
                }
                prop_assert_eq!(dp.overlay.is_some(), dp.mode == DiskMode::External);
                prop_assert_eq!(dp.snapshot_file.is_some(), p.keep_active_name && dp.mode == DiskMode::External);
                if !p.keep_active_name {
                    new_files.extend(dp.overlay.clone());
                }
                new_files.extend(dp.snapshot_file.clone());
            }
            let count = new_files.len();
            new_files.extend(p.memory_file.clone());
            prop_assert_eq!(new_files.len(), count + usize::from(p.memory_file.is_some()));
            for f in &new_files {
                prop_assert!(!fs.exists(f), "{} exists", f.display());
                prop_assert!(f.is_absolute());
                prop_assert!(def.disks.iter().all(|d| &d.source != f));
            }
            if p.memory == MemoryMode::Internal {
                let target = p.vmstate_disk.as_deref().unwrap();
                let dp = p.disks.iter().find(|d| d.target == target).unwrap();
                prop_assert_eq!((dp.mode, dp.format), (DiskMode::Internal, DiskFormat::Qcow2));
            } else {
                prop_assert_eq!(&p.vmstate_disk, &None);
            }
            prop_assert_eq!(p.memory_file.is_some(), p.memory == MemoryMode::External);
            prop_assert_eq!(p.kind == SnapshotKind::DiskOnly, p.state == SnapshotState::DiskSnapshot);
        }
    }
}
