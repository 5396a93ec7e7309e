//! Typed views of a snapshot record's JSON parts (per-disk data, VM state) and its libvirt
//! `<domainsnapshot>` rendering.

use std::path::PathBuf;

use serde::Deserialize;

use crate::catalog::SnapshotRecord;

/// One disk of a snapshot as the catalog keeps it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    /// Target device, e.g. `vda`.
    pub target: String,
    /// `no`, `internal` or `external`.
    pub mode: String,
    /// Image format of `image`.
    #[serde(default)]
    pub format: String,
    /// The file that holds the snapshot's data (for internal snapshots, the image holding the tag).
    pub image: PathBuf,
    /// External: the overlay created on top, which became the active image.
    #[serde(default)]
    pub overlay: Option<PathBuf>,
    /// External with the active name kept: where the snapshot's data was renamed to.
    #[serde(default)]
    pub snapshot_file: Option<PathBuf>,
}

impl DiskRecord {
    /// The file that holds this disk's snapshot data.
    pub fn data_file(&self) -> &PathBuf {
        self.snapshot_file.as_ref().unwrap_or(&self.image)
    }
}

/// The VM-state part of a snapshot.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
pub struct MemoryRecord {
    /// `none`, `internal` or `external`.
    pub mode: String,
    /// External: the file holding the VM state.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Internal: the disk whose image holds the VM state.
    #[serde(default)]
    pub vmstate_disk: Option<String>,
}

/// The disks of a record (empty when the JSON is not what this build writes).
pub fn disks(rec: &SnapshotRecord) -> Vec<DiskRecord> {
    serde_json::from_value(rec.disks.clone()).unwrap_or_default()
}

/// The VM-state part of a record.
pub fn memory(rec: &SnapshotRecord) -> MemoryRecord {
    serde_json::from_value(rec.memory.clone()).unwrap_or_else(|_| MemoryRecord {
        mode: "none".into(),
        ..Default::default()
    })
}

/// Bytes the host file system has allocated for the files this snapshot added: its external
/// VM-state file and the overlays created on top of its external disks (they hold what the
/// guest wrote since the snapshot). Internal snapshot data lives inside disk images shared with
/// other snapshots and is not counted; a file that is gone counts 0. Only `stat` calls: cheap
/// enough to answer a property read.
pub fn size_on_disk(rec: &SnapshotRecord) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let allocated = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0)
    };
    let memory = memory(rec).file.as_deref().map(allocated).unwrap_or(0);
    disks(rec)
        .iter()
        .filter_map(|d| d.overlay.as_deref())
        .map(allocated)
        .fold(memory, u64::saturating_add)
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// The record as libvirt's `<domainsnapshot>` output format; `parent` is the parent's name.
pub fn to_xml(rec: &SnapshotRecord, parent: Option<&str>, is_current: bool) -> String {
    let mut x = String::from("<domainsnapshot>\n");
    x.push_str(&format!("  <name>{}</name>\n", esc(&rec.name)));
    if !rec.description.is_empty() {
        x.push_str(&format!(
            "  <description>{}</description>\n",
            esc(&rec.description)
        ));
    }
    x.push_str(&format!("  <state>{}</state>\n", esc(&rec.state)));
    if let Some(p) = parent {
        x.push_str(&format!(
            "  <parent>\n    <name>{}</name>\n  </parent>\n",
            esc(p)
        ));
    }
    x.push_str(&format!(
        "  <creationTime>{}</creationTime>\n",
        rec.created_at
    ));
    let mem = memory(rec);
    let mem_mode = if mem.mode == "none" {
        "no"
    } else {
        mem.mode.as_str()
    };
    match &mem.file {
        Some(f) => x.push_str(&format!(
            "  <memory snapshot='{}' file='{}'/>\n",
            esc(mem_mode),
            esc(&f.display().to_string())
        )),
        None => x.push_str(&format!("  <memory snapshot='{}'/>\n", esc(mem_mode))),
    }
    x.push_str("  <disks>\n");
    for d in disks(rec) {
        match d.mode.as_str() {
            "external" => {
                let active = d.overlay.clone().unwrap_or_else(|| d.image.clone());
                x.push_str(&format!(
                    "    <disk name='{}' snapshot='external' type='file'>\n      <driver type='qcow2'/>\n      <source file='{}'/>\n    </disk>\n",
                    esc(&d.target),
                    esc(&active.display().to_string())
                ));
            }
            mode => x.push_str(&format!(
                "    <disk name='{}' snapshot='{}'/>\n",
                esc(&d.target),
                esc(mode)
            )),
        }
    }
    x.push_str("  </disks>\n");
    if is_current {
        x.push_str("  <active>1</active>\n");
    }
    for line in rec.domain_xml.lines() {
        x.push_str("  ");
        x.push_str(line);
        x.push('\n');
    }
    x.push_str("</domainsnapshot>\n");
    x
}
