//! Typed views of a snapshot record's JSON parts (per-disk data, VM state, kept XML parts) and
//! its libvirt `<domainsnapshot>` rendering.

use std::path::PathBuf;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::catalog::SnapshotRecord;
use crate::snapshot::xml::{DiskDoc, MemoryDoc, SnapshotDoc, embed_domain};

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
    rec.disks.get().unwrap_or_default()
}

/// The VM-state part of a record.
pub fn memory(rec: &SnapshotRecord) -> MemoryRecord {
    rec.memory.get().unwrap_or_else(|_| MemoryRecord {
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
    size_on_disk_of(&memory(rec), &disks(rec))
}

/// [`size_on_disk`] from a record's parts already read.
pub fn size_on_disk_of(memory: &MemoryRecord, disks: &[DiskRecord]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let allocated = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0)
    };
    let memory = memory.file.as_deref().map(allocated).unwrap_or(0);
    disks
        .iter()
        .filter_map(|d| d.overlay.as_deref())
        .map(allocated)
        .fold(memory, u64::saturating_add)
}

/// The parts of a redefined `<domainsnapshot>` document that vmsnap keeps without acting on
/// them, exactly as they were written (the catalog's `snapshot_xml_parts`), so that exporting
/// the snapshot gives them back.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct XmlParts {
    /// The `<domain>` element.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The `<inactiveDomain>` element.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_domain: Option<String>,
    /// The `<cookie>` element.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The `<revertDisks>` element.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_disks: Option<String>,
    /// `<disk>` elements with more detail than vmsnap models, by disk target.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub disks: BTreeMap<String, String>,
}

impl XmlParts {
    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        *self == XmlParts::default()
    }

    /// Reads the catalog's JSON (an unreadable value keeps nothing).
    pub fn from_json(v: &serde_json::Value) -> XmlParts {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }

    /// The JSON the catalog keeps.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// The record as a libvirt `<domainsnapshot>` document, as `virsh snapshot-dumpxml` shows a
/// snapshot: `parent` is the parent's name; kept `parts` of a redefined document replace what
/// vmsnap would write for them (the `<domain>`, detailed disks) and add the rest.
pub fn to_doc(rec: &SnapshotRecord, parent: Option<&str>, parts: &XmlParts) -> SnapshotDoc {
    let mem = memory(rec);
    let mem_mode = if mem.mode == "none" {
        "no"
    } else {
        mem.mode.as_str()
    };
    let disks: Vec<DiskDoc> = disks(rec)
        .into_iter()
        .map(|d| {
            if let Some(raw) = parts.disks.get(&d.target) {
                return DiskDoc {
                    name: d.target.clone(),
                    raw: Some(raw.clone()),
                    ..DiskDoc::default()
                };
            }
            match d.mode.as_str() {
                "external" => DiskDoc {
                    name: d.target.clone(),
                    snapshot: Some("external".into()),
                    source_type: Some("file".into()),
                    driver_type: Some("qcow2".into()),
                    source_file: Some(
                        d.overlay
                            .clone()
                            .unwrap_or_else(|| d.image.clone())
                            .display()
                            .to_string(),
                    ),
                    ..DiskDoc::default()
                },
                mode => DiskDoc {
                    name: d.target.clone(),
                    snapshot: Some(mode.to_owned()),
                    ..DiskDoc::default()
                },
            }
        })
        .collect();
    let domain = parts.domain.clone().or_else(|| {
        let embedded = embed_domain(&rec.domain_xml);
        (!embedded.is_empty()).then_some(embedded)
    });
    SnapshotDoc {
        name: Some(rec.name.clone()),
        description: (!rec.description.is_empty()).then(|| rec.description.clone()),
        state: Some(rec.state.clone()),
        creation_time: Some(rec.created_at),
        parent: parent.map(str::to_owned),
        memory: Some(MemoryDoc {
            snapshot: Some(mem_mode.to_owned()),
            file: mem
                .file
                .as_ref()
                .filter(|_| mem.mode == "external")
                .map(|f| f.display().to_string()),
        }),
        // libvirt leaves out an empty <disks>.
        disks: (!disks.is_empty()).then_some(disks),
        revert_disks: parts.revert_disks.clone(),
        domain,
        inactive_domain: parts.inactive_domain.clone(),
        cookie: parts.cookie.clone(),
        active: None,
    }
}

/// The record as libvirt's `<domainsnapshot>` output format (see [`to_doc`]).
pub fn to_xml(rec: &SnapshotRecord, parent: Option<&str>, parts: &XmlParts) -> String {
    to_doc(rec, parent, parts).to_xml()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{DomainId, SnapshotId, SnapshotStatus};
    use serde_json::json;

    fn rec() -> SnapshotRecord {
        SnapshotRecord {
            id: SnapshotId(2),
            domain_id: DomainId(1),
            name: "s2".into(),
            description: "before <upgrade> & 'more'".into(),
            created_at: 1_700_000_100,
            state: "disk-snapshot".into(),
            kind: "disk-only".into(),
            parent: Some(SnapshotId(1)),
            domain_xml: "<domain type='qemu'>\n  <name>web</name>\n</domain>\n".into(),
            memory: json!({"mode": "none", "file": null, "vmstate_disk": null}).into(),
            disks: json!([
                {"target": "vda", "mode": "external", "format": "qcow2",
                 "image": "/img/vda.qcow2", "overlay": "/img/vda.s2.qcow2", "snapshot_file": null},
                {"target": "vdb", "mode": "no", "format": "raw", "image": "/img/vdb.raw"},
                {"target": "vdc", "mode": "internal", "format": "qcow2", "image": "/img/vdc.qcow2"}
            ])
            .into(),
            status: SnapshotStatus::Committed,
            origin: "manual".into(),
            protected: false,
        }
    }

    #[test]
    fn record_export_is_what_virsh_snapshot_dumpxml_shows() {
        let expected = "<domainsnapshot>
  <name>s2</name>
  <description>before &lt;upgrade&gt; &amp; &apos;more&apos;</description>
  <state>disk-snapshot</state>
  <parent>
    <name>s1</name>
  </parent>
  <creationTime>1700000100</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/img/vda.s2.qcow2'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
    <disk name='vdc' snapshot='internal'/>
  </disks>
  <domain type='qemu'>
    <name>web</name>
  </domain>
</domainsnapshot>
";
        assert_eq!(to_xml(&rec(), Some("s1"), &XmlParts::default()), expected);
        // And it reads back as the same document.
        let doc = SnapshotDoc::parse(expected).unwrap();
        assert_eq!(doc, to_doc(&rec(), Some("s1"), &XmlParts::default()));
    }

    #[test]
    fn record_export_puts_kept_parts_back() {
        let parts = XmlParts {
            domain: Some("<domain type='kvm'><name>web</name><devices/></domain>".into()),
            inactive_domain: Some("<inactiveDomain type='kvm'/>".into()),
            cookie: Some("<cookie><slirpHelper/></cookie>".into()),
            revert_disks: Some("<revertDisks/>".into()),
            disks: [(
                "vda".to_string(),
                "<disk name='vda' snapshot='external' type='file'>\
                 <source file='/img/vda.s2.qcow2'><seclabel model='dac' relabel='no'/></source>\
                 </disk>"
                    .to_string(),
            )]
            .into(),
        };
        assert_eq!(XmlParts::from_json(&parts.to_json()), parts);
        let xml = to_xml(&rec(), None, &parts);
        for part in [
            parts.domain.as_deref().unwrap(),
            parts.inactive_domain.as_deref().unwrap(),
            parts.cookie.as_deref().unwrap(),
            parts.revert_disks.as_deref().unwrap(),
            parts.disks["vda"].as_str(),
        ] {
            assert!(xml.contains(part), "{part} missing from\n{xml}");
        }
        assert!(!xml.contains("<parent>") && !xml.contains("<name>web</name>\n"));
        let order: Vec<usize> = [
            "<domain type",
            "<inactiveDomain",
            "<cookie>",
            "<revertDisks",
        ]
        .iter()
        .map(|t| xml.find(t).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{xml}");
        assert!(XmlParts::default().is_empty() && !parts.is_empty());
        assert_eq!(
            XmlParts::from_json(&json!("not an object")),
            XmlParts::default()
        );
    }
}
