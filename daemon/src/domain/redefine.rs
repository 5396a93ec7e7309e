//! Redefining snapshots: a catalog record for snapshot files that already exist (moved from a
//! libvirt host, or whose record was forgotten with `--metadata-only`), from a libvirt
//! `<domainsnapshot>` document.
//!
//! Nothing is written but one catalog transaction at the end, after every check: the name is
//! free, the parent exists, the embedded `<domain>` (if any) has this domain's UUID, each
//! internal disk's image holds a tag of the snapshot's name (and one of them the VM state of
//! an internal checkpoint), each external disk's overlay exists and is backed by the image the
//! document says, and an external VM-state file exists. A refusal changes nothing.
//!
//! The parts of the document vmsnap does not act on (`<domain>`, `<inactiveDomain>`,
//! `<cookie>`, `<revertDisks>`, disks with extra detail) are kept verbatim in the catalog and
//! come back in the snapshot's XML. The snapshot's configuration (what a revert starts) is the
//! embedded `<domain>` when it lies within vmsnap's domain subset, else the domain's current
//! definition with each disk's image replaced by the snapshot's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use tracing::info;

use super::actor::{Actor, plan_error, qemu_img};
use super::def::{DiskFormat, DomainDef, parse_tree, xml_trim};
use crate::catalog::{NewSnapshot, SnapshotId};
use crate::error::{ServiceError, ServiceResult};
use crate::snapshot::plan::validate_snapshot_name;
use crate::snapshot::record::XmlParts;
use crate::snapshot::xml::SnapshotDoc;

fn bad(msg: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument(msg.into())
}

/// What the embedded `<domain>` tells about the snapshot, read leniently (a libvirt domain
/// holds much more than vmsnap's subset).
#[derive(Default)]
struct Embedded {
    uuid: Option<String>,
    /// Disk target to its source file or device.
    sources: BTreeMap<String, PathBuf>,
    /// The whole domain, when it is within vmsnap's subset.
    def: Option<DomainDef>,
}

fn read_embedded(raw: Option<&str>) -> ServiceResult<Embedded> {
    let Some(raw) = raw else {
        return Ok(Embedded::default());
    };
    let root = parse_tree(raw).map_err(|e| bad(format!("the embedded <domain>: {e}")))?;
    let mut out = Embedded {
        def: DomainDef::from_xml(raw).ok(),
        ..Embedded::default()
    };
    for child in &root.children {
        match child.name.as_str() {
            "uuid" => out.uuid = Some(xml_trim(&child.text).to_owned()),
            "devices" => {
                for disk in child.children.iter().filter(|c| c.name == "disk") {
                    let find = |n: &str| disk.children.iter().find(|c| c.name == n);
                    let target = find("target").and_then(|t| t.attr("dev"));
                    let source = find("source").and_then(|s| s.attr("file").or(s.attr("dev")));
                    if let (Some(t), Some(s)) = (target, source) {
                        out.sources.insert(t.to_owned(), PathBuf::from(s));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `qemu-img info -U --output=json` of one image, or why it cannot be read.
async fn image_info(path: &Path) -> Result<Value, String> {
    let out = qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        path.as_os_str(),
    ])
    .await
    .map_err(|e| e.to_string())?;
    serde_json::from_str(&out).map_err(|e| e.to_string())
}

/// Where an overlay's backing file really is (`full-backing-filename`, else `backing-filename`
/// taken relative to the overlay's directory).
fn backing_of(overlay: &Path, info: &Value) -> Option<PathBuf> {
    let name = info["full-backing-filename"]
        .as_str()
        .or(info["backing-filename"].as_str())?;
    let p = PathBuf::from(name);
    Some(if p.is_absolute() {
        p
    } else {
        overlay.parent().unwrap_or(Path::new("/")).join(p)
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// One disk of the record being built.
struct DiskOut {
    target: String,
    mode: &'static str,
    format: String,
    image: PathBuf,
    overlay: Option<PathBuf>,
    has_vmstate: bool,
}

impl Actor {
    /// Adds a committed record for `doc` after checking the images hold what it says; with
    /// `make_current` (or `<active>1</active>`) the snapshot becomes the current one.
    pub(super) async fn redefine(
        &mut self,
        doc: SnapshotDoc,
        make_current: bool,
    ) -> ServiceResult<SnapshotId> {
        let info = self.info.borrow().clone();
        let dom = info.def.name.clone();
        let name = doc
            .name
            .clone()
            .ok_or_else(|| bad("a redefined snapshot needs a <name>"))?;
        validate_snapshot_name(&name).map_err(plan_error)?;
        if info.snapshots.values().any(|s| s.name == name) {
            return Err(ServiceError::AlreadyExists(format!(
                "domain {dom:?} already has a snapshot named {name:?}"
            )));
        }
        let state = doc.state.clone().ok_or_else(|| {
            bad(format!(
                "snapshot {name:?}: a redefined snapshot needs a <state>"
            ))
        })?;
        let created_at = doc.creation_time.ok_or_else(|| {
            bad(format!(
                "snapshot {name:?}: a redefined snapshot needs a <creationTime>"
            ))
        })?;
        if !matches!(
            state.as_str(),
            "running" | "paused" | "shutoff" | "disk-snapshot"
        ) {
            return Err(ServiceError::Unsupported(format!(
                "snapshot {name:?}: state '{state}' cannot be redefined (running, paused, \
                 shutoff or disk-snapshot)"
            )));
        }
        let online = matches!(state.as_str(), "running" | "paused");
        let parent = match &doc.parent {
            Some(p) => Some(
                info.snapshots
                    .values()
                    .find(|s| &s.name == p)
                    .map(|s| s.id)
                    .ok_or_else(|| ServiceError::NoSuchSnapshot {
                        domain: dom.clone(),
                        name: p.clone(),
                    })?,
            ),
            None => None,
        };
        let embedded = read_embedded(doc.domain.as_deref())?;
        let own_uuid = info.def.uuid.hyphenated().to_string();
        if let Some(u) = &embedded.uuid
            && !u.eq_ignore_ascii_case(&own_uuid)
        {
            return Err(bad(format!(
                "snapshot {name:?} belongs to the domain with UUID {u}, not to {dom:?} \
                 ({own_uuid})"
            )));
        }
        let memory_mode = match doc.memory.as_ref() {
            Some(m) => match (m.snapshot.as_deref(), &m.file) {
                (Some(mode), _) => mode.to_owned(),
                (None, Some(_)) => "external".to_owned(),
                (None, None) if online => "internal".to_owned(),
                (None, None) => "no".to_owned(),
            },
            None if online => "internal".to_owned(),
            None => "no".to_owned(),
        };
        if !online && memory_mode != "no" {
            return Err(bad(format!(
                "snapshot {name:?}: a {state} snapshot holds no VM state (memory must be 'no')"
            )));
        }
        if online && memory_mode == "no" {
            return Err(bad(format!(
                "snapshot {name:?}: a {state} checkpoint needs its VM state (memory internal \
                 or external)"
            )));
        }
        // The embedded definition may carry another name (the libvirt host's) or no UUID
        // (then one was made up): a revert must not rename the domain or change its UUID.
        let base = match embedded.def.clone() {
            Some(mut def) => {
                def.name = info.def.name.clone();
                def.uuid = info.def.uuid;
                def
            }
            None => info.def.clone(),
        };

        // Which disk each <disk> names, and how it was snapshotted.
        let mut modes: BTreeMap<String, &crate::snapshot::xml::DiskDoc> = BTreeMap::new();
        for d in doc.disks.iter().flatten() {
            let target = if base.disk(&d.name).is_some() {
                d.name.clone()
            } else {
                base.disks
                    .iter()
                    .find(|x| {
                        x.source == Path::new(&d.name)
                            || embedded.sources.get(&x.target) == Some(&PathBuf::from(&d.name))
                    })
                    .map(|x| x.target.clone())
                    .ok_or_else(|| {
                        bad(format!(
                            "snapshot {name:?}: domain {dom:?} has no disk named {:?}",
                            d.name
                        ))
                    })?
            };
            if modes.insert(target.clone(), d).is_some() {
                return Err(bad(format!(
                    "snapshot {name:?}: disk {target} is named twice"
                )));
            }
        }
        let all_internal = doc.disks.is_none() && memory_mode == "internal";

        let mut out: Vec<DiskOut> = Vec::new();
        for disk in &base.disks {
            let image = embedded
                .sources
                .get(&disk.target)
                .cloned()
                .unwrap_or_else(|| disk.source.clone());
            let d = modes.get(&disk.target);
            let mode = match d.and_then(|d| d.snapshot.as_deref()) {
                Some(m) => m,
                None if d.is_some() => "external",
                None if all_internal => "internal",
                None => "no",
            };
            let t = &disk.target;
            match mode {
                "internal" => {
                    let v = image_info(&image).await.map_err(|e| {
                        bad(format!(
                            "snapshot {name:?}: disk {t}: cannot read {}: {e}",
                            image.display()
                        ))
                    })?;
                    let tag = v["snapshots"]
                        .as_array()
                        .and_then(|a| a.iter().find(|s| s["name"].as_str() == Some(name.as_str())));
                    let Some(tag) = tag else {
                        return Err(bad(format!(
                            "snapshot {name:?}: disk {t}: {} holds no internal snapshot of \
                             that name",
                            image.display()
                        )));
                    };
                    out.push(DiskOut {
                        target: t.clone(),
                        mode: "internal",
                        format: v["format"].as_str().unwrap_or_default().to_owned(),
                        image,
                        overlay: None,
                        has_vmstate: tag["vm-state-size"].as_u64().unwrap_or(0) > 0,
                    });
                }
                "external" => {
                    let d = d.expect("external disks are named");
                    if let Some(ty) = d.source_type.as_deref()
                        && ty != "file"
                    {
                        return Err(ServiceError::Unsupported(format!(
                            "snapshot {name:?}: disk {t}: only file overlays can be \
                             redefined, not type '{ty}'"
                        )));
                    }
                    let overlay = d.source_file.as_deref().map(PathBuf::from).ok_or_else(|| {
                        bad(format!(
                            "snapshot {name:?}: disk {t}: an external disk needs its \
                             <source file='…'/> (the overlay)"
                        ))
                    })?;
                    if !overlay.is_file() {
                        return Err(bad(format!(
                            "snapshot {name:?}: disk {t}: the overlay {} does not exist",
                            overlay.display()
                        )));
                    }
                    let v = image_info(&overlay).await.map_err(|e| {
                        bad(format!(
                            "snapshot {name:?}: disk {t}: cannot read {}: {e}",
                            overlay.display()
                        ))
                    })?;
                    let backing = backing_of(&overlay, &v).ok_or_else(|| {
                        bad(format!(
                            "snapshot {name:?}: disk {t}: the overlay {} has no backing file",
                            overlay.display()
                        ))
                    })?;
                    if embedded.sources.contains_key(t) && !same_file(&backing, &image) {
                        return Err(bad(format!(
                            "snapshot {name:?}: disk {t}: the overlay {} is backed by {}, not \
                             by {} as the document says",
                            overlay.display(),
                            backing.display(),
                            image.display()
                        )));
                    }
                    let bv = image_info(&backing).await.map_err(|e| {
                        bad(format!(
                            "snapshot {name:?}: disk {t}: cannot read the backing file {}: {e}",
                            backing.display()
                        ))
                    })?;
                    out.push(DiskOut {
                        target: t.clone(),
                        mode: "external",
                        format: bv["format"].as_str().unwrap_or_default().to_owned(),
                        image: backing,
                        overlay: Some(overlay),
                        has_vmstate: false,
                    });
                }
                "no" => {
                    let format = match image_info(&image).await {
                        Ok(v) => v["format"].as_str().unwrap_or_default().to_owned(),
                        Err(_) => disk.format.as_str().to_owned(),
                    };
                    out.push(DiskOut {
                        target: t.clone(),
                        mode: "no",
                        format,
                        image,
                        overlay: None,
                        has_vmstate: false,
                    });
                }
                other => {
                    return Err(ServiceError::Unsupported(format!(
                        "snapshot {name:?}: disk {t}: '{other}' snapshots cannot be redefined"
                    )));
                }
            }
        }
        if out.iter().all(|d| d.mode == "no") && memory_mode != "external" {
            return Err(bad(format!(
                "snapshot {name:?}: the document covers no disk of domain {dom:?}"
            )));
        }

        let mut memory = json!({"mode": "none", "file": null, "vmstate_disk": null});
        match memory_mode.as_str() {
            "internal" => {
                let holder = out.iter().find(|d| d.has_vmstate).ok_or_else(|| {
                    bad(format!(
                        "snapshot {name:?}: no disk's internal snapshot holds VM state"
                    ))
                })?;
                memory = json!({"mode": "internal", "file": null, "vmstate_disk": holder.target});
            }
            "external" => {
                let file = doc
                    .memory
                    .as_ref()
                    .and_then(|m| m.file.clone())
                    .map(PathBuf::from)
                    .ok_or_else(|| bad("an external memory snapshot needs a file"))?;
                if !file.is_file() {
                    return Err(bad(format!(
                        "snapshot {name:?}: the memory file {} does not exist",
                        file.display()
                    )));
                }
                memory = json!({"mode": "external", "file": file, "vmstate_disk": null});
            }
            _ => {}
        }

        // The configuration a revert starts: the snapshot's images in the base definition.
        let mut snap_def = base;
        for disk in snap_def.disks.iter_mut() {
            if let Some(d) = out.iter().find(|d| d.target == disk.target) {
                disk.source = d.image.clone();
                if let Ok(f) = d.format.parse::<DiskFormat>() {
                    disk.format = f;
                }
            }
        }
        snap_def.validate().map_err(|e| {
            bad(format!(
                "snapshot {name:?}: its configuration is not valid here: {e}"
            ))
        })?;

        let disks: Vec<Value> = out
            .iter()
            .map(|d| {
                json!({
                    "target": d.target,
                    "mode": d.mode,
                    "format": d.format,
                    "image": d.image,
                    "overlay": d.overlay,
                    "snapshot_file": null,
                })
            })
            .collect();
        let mut parts = XmlParts {
            domain: doc.domain.clone(),
            inactive_domain: doc.inactive_domain.clone(),
            cookie: doc.cookie.clone(),
            revert_disks: doc.revert_disks.clone(),
            disks: BTreeMap::new(),
        };
        for (target, d) in &modes {
            if let Some(raw) = &d.raw {
                parts.disks.insert(target.clone(), raw.clone());
            }
        }
        let new = NewSnapshot {
            domain_id: info.id,
            name: name.clone(),
            description: doc.description.clone().unwrap_or_default(),
            created_at,
            state: state.clone(),
            kind: if state == "disk-snapshot" {
                "disk-only"
            } else {
                "checkpoint"
            }
            .to_owned(),
            parent,
            domain_xml: snap_def.to_xml(),
            memory,
            disks: Value::Array(disks),
            origin: "redefine".to_owned(),
            protected: false,
        };
        let current = make_current || doc.active == Some(true);
        let rec = self
            .shared
            .catalog
            .lock()
            .expect("catalog lock poisoned")
            .insert_redefined_snapshot(&new, &parts.to_json(), current)?;
        let id = rec.id;
        self.info.send_modify(|i| {
            Arc::make_mut(&mut i.snapshots).insert(id, rec);
            if current {
                i.current_snapshot = Some(id);
            }
        });
        info!(domain = %dom, snapshot = %name, current, "snapshot redefined");
        Ok(id)
    }
}
