//! Plain data exchanged with QEMU: events, the greeting's version and typed replies.
//!
//! The reply structs keep only the fields the daemon uses and ignore all others, so newer
//! QEMU versions that add fields still deserialize.

use serde::Deserialize;

/// An asynchronous QMP event, e.g. `STOP`, `RESUME`, `SHUTDOWN` or `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event name as QEMU spells it (`"STOP"`).
    pub name: String,
    /// The event's `data` member; `Value::Null` when QEMU sent none.
    pub data: serde_json::Value,
    /// QEMU's timestamp in microseconds since the Unix epoch (0 if QEMU had no clock).
    pub timestamp_micros: u64,
}

/// The QEMU version announced in the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    /// Major version (7 for QEMU 7.2.0).
    pub major: u32,
    /// Minor version (2 for QEMU 7.2.0).
    pub minor: u32,
    /// Micro version (0 for QEMU 7.2.0).
    pub micro: u32,
    /// Distribution package string, possibly empty.
    pub package: String,
}

/// The reply of `query-status`.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    /// Whether the guest CPUs are running.
    pub running: bool,
    /// QEMU's run state, e.g. `"running"`, `"paused"`, `"shutdown"`, `"prelaunch"`.
    pub status: String,
}

/// One entry of the `query-block` reply: a block backend, usually attached to a device.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockInfo {
    /// The legacy drive name; empty for backends created with `-blockdev`/`blockdev-add`.
    #[serde(default)]
    pub device: String,
    /// The QOM path or id of the attached device, if any.
    #[serde(default)]
    pub qdev: Option<String>,
    /// Whether the medium is removable (CD-ROM, floppy).
    #[serde(default)]
    pub removable: bool,
    /// Whether the medium is locked by the guest.
    #[serde(default)]
    pub locked: bool,
    /// The I/O status (`"ok"`, `"failed"`, `"nospace"`), when QEMU reports one.
    #[serde(default, rename = "io-status")]
    pub io_status: Option<String>,
    /// The inserted medium; `None` for an empty drive.
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// The medium of a block backend, or one named node of `query-named-block-nodes`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockDeviceInfo {
    /// The node name (auto-generated names start with `#`).
    #[serde(rename = "node-name", default)]
    pub node_name: String,
    /// The file name (or JSON pseudo-filename) of the image.
    pub file: String,
    /// The format driver, e.g. `"qcow2"` or `"raw"`.
    pub drv: String,
    /// Whether the node is read-only.
    pub ro: bool,
    /// Whether the image is encrypted.
    #[serde(default)]
    pub encrypted: bool,
    /// The number of images in the backing chain below this one.
    #[serde(default)]
    pub backing_file_depth: u32,
    /// The backing file name as recorded in the image, if any.
    #[serde(default)]
    pub backing_file: Option<String>,
    /// Details of the image and its backing chain.
    pub image: ImageInfo,
}

/// Image details as reported by `query-block` (like `qemu-img info`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The image file name.
    pub filename: String,
    /// The image format, e.g. `"qcow2"`.
    pub format: String,
    /// The guest-visible size in bytes.
    #[serde(default)]
    pub virtual_size: u64,
    /// The space the image takes on the host, when known.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// Whether the image was not closed cleanly, when the format tracks it.
    #[serde(default)]
    pub dirty_flag: Option<bool>,
    /// The cluster size, for formats that have clusters.
    #[serde(default)]
    pub cluster_size: Option<u64>,
    /// The backing file name as recorded in the image.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// The backing file name resolved to a full path.
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    /// The backing file's format as recorded in the image.
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    /// The backing image, recursively.
    #[serde(default)]
    pub backing_image: Option<Box<ImageInfo>>,
    /// Internal snapshots stored in the image.
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
}

/// An internal snapshot stored in an image.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// The snapshot's numeric id as a string.
    pub id: String,
    /// The snapshot's name (tag).
    pub name: String,
    /// The size of the saved VM state in bytes (0 for disk-only snapshots).
    #[serde(default)]
    pub vm_state_size: u64,
    /// Creation time, seconds since the Unix epoch.
    #[serde(default)]
    pub date_sec: i64,
    /// Creation time, nanoseconds part.
    #[serde(default)]
    pub date_nsec: u32,
    /// Guest clock at the time of the snapshot, seconds.
    #[serde(default)]
    pub vm_clock_sec: i64,
    /// Guest clock at the time of the snapshot, nanoseconds part.
    #[serde(default)]
    pub vm_clock_nsec: u32,
}

/// One entry of the `query-jobs` reply.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job id chosen at creation.
    pub id: String,
    /// The job type, e.g. `"snapshot-save"`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// The job status, e.g. `"running"`, `"concluded"`.
    pub status: String,
    /// Progress so far, in units of `total_progress`.
    #[serde(default)]
    pub current_progress: u64,
    /// Estimated total amount of work.
    #[serde(default)]
    pub total_progress: u64,
    /// The error message if the job failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// The reply of `x-debug-query-block-graph`: every block node, backend and job, and the
/// parent-child edges between them. The only way QMP names a node's children (`file`,
/// `backing`), which `blockdev-reopen` must repeat.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockGraph {
    /// The vertices.
    pub nodes: Vec<BlockGraphNode>,
    /// The edges, parent to child.
    pub edges: Vec<BlockGraphEdge>,
}

/// One vertex of a [`BlockGraph`].
#[derive(Debug, Clone, Deserialize)]
pub struct BlockGraphNode {
    /// An id valid within this reply only.
    pub id: u64,
    /// `"block-driver"` for a node, `"block-backend"` or `"block-job"` otherwise.
    #[serde(rename = "type")]
    pub kind: String,
    /// The node name (auto-generated ones start with `#`); a QOM path for backends.
    pub name: String,
}

/// One edge of a [`BlockGraph`].
#[derive(Debug, Clone, Deserialize)]
pub struct BlockGraphEdge {
    /// The parent's id.
    pub parent: u64,
    /// The child's id.
    pub child: u64,
    /// The child's role: `"file"`, `"backing"`, `"root"`, ...
    pub name: String,
}
