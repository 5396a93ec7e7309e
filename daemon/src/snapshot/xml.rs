//! libvirt `<domainsnapshot>` documents: the creation format read into a [`CreateRequest`], the
//! output format written from a [`Plan`], and the whole documented format ([`SnapshotDoc`]: read
//! for `RedefineSnapshot`, written for `GetXml`).
//!
//! [`SnapshotDoc`] reads every element of libvirt's format (its `formatsnapshot` page and
//! `domainsnapshot.rng`) and refuses anything else; the elements vmsnap does not interpret
//! (`<domain>`, `<inactiveDomain>`, `<cookie>`, `<revertDisks>`, disks with more detail than it
//! models) are kept as the exact text of their element. Invariant: a document that parses
//! writes back ([`SnapshotDoc::to_xml`], libvirt's element order and formatting) to a document
//! that parses to the same value; the fuzz targets check it.
//!
//! The accepted creation subset (libvirt spelling):
//!
//! ```xml
//! <domainsnapshot>
//!   <name>before-upgrade</name>                 <!-- optional; generated when absent -->
//!   <description>free text</description>        <!-- optional; kept verbatim -->
//!   <memory snapshot='external' file='/abs'/>   <!-- optional; snapshot='no|internal|external';
//!                                                    file alone means external -->
//!   <disks>
//!     <disk name='vda' snapshot='internal'/>    <!-- name: target or current source path -->
//!     <disk name='vdb' snapshot='external' type='file'>
//!       <driver type='qcow2'/>                  <!-- optional; only qcow2 -->
//!       <source file='/abs/new.qcow2'/>         <!-- optional; a <source> alone means external -->
//!     </disk>
//!   </disks>
//! </domainsnapshot>
//! ```
//!
//! Nothing is dropped silently: any other element or attribute is refused with
//! [`PlanError::InvalidArgument`] naming it, and the elements libvirt writes only on output
//! (`state`, `creationTime`, `parent`, `domain`, …) are refused as output-only. A `<disk>`
//! without `snapshot` and without `<source>` is refused (a [`DiskRequest`] always has a mode;
//! leave the disk out to get its default). The flags of libvirt's API (disk-only, live, …) are
//! not part of the document: the caller sets them on the returned request. The XML hardening is
//! the domain parser's: at most [`MAX_XML_BYTES`], no DOCTYPE or entities, limited nesting.

use std::path::PathBuf;

use crate::domain::def::{
    DefError, MAX_XML_BYTES, Node, escape_attr, escape_text, parse_tree, xml_trim,
};
use crate::snapshot::plan::{CreateRequest, DiskMode, DiskRequest, MemoryMode, Plan, PlanError};

/// Elements libvirt writes in `<domainsnapshot>` output only.
const OUTPUT_ONLY: [&str; 8] = [
    "state",
    "creationTime",
    "parent",
    "domain",
    "inactiveDomain",
    "cookie",
    "active",
    "current",
];

fn def_err(e: DefError) -> PlanError {
    PlanError::InvalidArgument(e.to_string())
}

fn invalid(msg: impl Into<String>) -> PlanError {
    PlanError::InvalidArgument(msg.into())
}

/// Reads a libvirt `<domainsnapshot>` creation document (as for `CreateSnapshotXml`).
///
/// The returned request has `disk_only`, `live` and `keep_active_name` unset and no
/// `vmstate_disk`; the caller sets them from the API's flags. Semantic checks (does a disk
/// exist, is a file new, …) are [`crate::snapshot::plan::plan`]'s.
pub fn request_from_xml(xml: &str) -> Result<CreateRequest, PlanError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(invalid(format!(
            "the snapshot document is larger than {MAX_XML_BYTES} bytes"
        )));
    }
    let root = parse_tree(xml).map_err(def_err)?;
    let path = "domainsnapshot";
    if root.name != path {
        return Err(invalid(format!(
            "expected a <domainsnapshot> document, not <{}>",
            root.name
        )));
    }
    root.allow_attrs(path, &[]).map_err(def_err)?;
    root.no_text(path).map_err(def_err)?;

    let mut req = CreateRequest::default();
    let (mut name, mut description, mut memory, mut disks) = (false, false, false, false);
    let once = |seen: &mut bool, element: &str| {
        if std::mem::replace(seen, true) {
            Err(invalid(format!("element <{element}> appears twice")))
        } else {
            Ok(())
        }
    };
    for child in &root.children {
        let p = format!("{path}/{}", child.name);
        match child.name.as_str() {
            "name" => {
                once(&mut name, "name")?;
                child.allow_attrs(&p, &[]).map_err(def_err)?;
                child.leaf(&p).map_err(def_err)?;
                req.name = Some(xml_trim(&child.text).to_owned());
            }
            "description" => {
                once(&mut description, "description")?;
                child.allow_attrs(&p, &[]).map_err(def_err)?;
                child.leaf(&p).map_err(def_err)?;
                req.description = child.text.clone();
            }
            "memory" => {
                once(&mut memory, "memory")?;
                child.empty(&p, &["snapshot", "file"]).map_err(def_err)?;
                let file = child.attr("file").map(PathBuf::from);
                req.memory = match (child.attr("snapshot"), &file) {
                    (Some(mode), _) => Some(mode.parse::<MemoryMode>()?),
                    (None, Some(_)) => Some(MemoryMode::External),
                    (None, None) => None,
                };
                req.memory_file = file;
            }
            "disks" => {
                once(&mut disks, "disks")?;
                child.allow_attrs(&p, &[]).map_err(def_err)?;
                child.no_text(&p).map_err(def_err)?;
                for disk in &child.children {
                    let dp = format!("{p}/{}", disk.name);
                    if disk.name != "disk" {
                        return Err(def_err(DefError::UnknownElement(dp)));
                    }
                    req.disks.push(parse_disk(disk, &dp)?);
                }
            }
            other if OUTPUT_ONLY.contains(&other) => {
                return Err(invalid(format!(
                    "element <{other}> is output-only; use the redefine API"
                )));
            }
            _ => return Err(def_err(DefError::UnknownElement(p))),
        }
    }
    Ok(req)
}

fn parse_disk(node: &Node, path: &str) -> Result<DiskRequest, PlanError> {
    node.allow_attrs(path, &["name", "snapshot", "type"])
        .map_err(def_err)?;
    node.no_text(path).map_err(def_err)?;
    let name = node.required_attr(path, "name").map_err(def_err)?;
    if name.is_empty() {
        return Err(invalid("a <disk> in <disks> has an empty name"));
    }
    if let Some(ty) = node.attr("type")
        && ty != "file"
    {
        return Err(PlanError::Unsupported(format!(
            "disk {name}: only type='file' snapshots are supported, not '{ty}'"
        )));
    }
    let mut driver = None;
    let mut source = None;
    for child in &node.children {
        let p = format!("{path}/{}", child.name);
        let slot = match child.name.as_str() {
            "driver" => {
                child.empty(&p, &["type"]).map_err(def_err)?;
                &mut driver
            }
            "source" => {
                child.empty(&p, &["file"]).map_err(def_err)?;
                &mut source
            }
            _ => return Err(def_err(DefError::UnknownElement(p))),
        };
        if slot.replace(child).is_some() {
            return Err(invalid(format!(
                "disk {name}: element <{}> appears twice",
                child.name
            )));
        }
    }
    let mode = match (node.attr("snapshot"), source) {
        (Some(mode), _) => mode.parse::<DiskMode>()?,
        (None, Some(_)) => DiskMode::External,
        (None, None) => {
            return Err(invalid(format!(
                "disk {name}: attribute 'snapshot' is required without a <source>"
            )));
        }
    };
    if mode != DiskMode::External
        && let Some(element) = driver.map(|_| "driver").or(source.map(|_| "source"))
    {
        return Err(invalid(format!(
            "disk {name}: <{element}> is only for an external snapshot, not {mode}"
        )));
    }
    if let Some(driver) = driver
        && let Some(ty) = driver.attr("type")
        && ty != "qcow2"
    {
        return Err(PlanError::Unsupported(format!(
            "disk {name}: external snapshots are created as qcow2, not '{ty}'"
        )));
    }
    let file = match source {
        Some(source) => {
            let file = source
                .required_attr(&format!("{path}/source"), "file")
                .map_err(def_err)?;
            if file.is_empty() {
                return Err(invalid(format!("disk {name}: the source file is empty")));
            }
            Some(PathBuf::from(file))
        }
        None => None,
    };
    Ok(DiskRequest {
        target: name.to_owned(),
        mode,
        file,
    })
}

/// libvirt's spelling of a memory mode in `<memory snapshot='…'>`.
fn memory_attr(mode: MemoryMode) -> &'static str {
    match mode {
        MemoryMode::None => "no",
        MemoryMode::Internal => "internal",
        MemoryMode::External => "external",
    }
}

/// Writes libvirt's `<domainsnapshot>` output format for a plan: name, description (when not
/// empty), state, parent, creation time (unix seconds), memory, one `<disk>` per disk of the
/// definition, then `domain_xml` (a `<domain>` document, embedded verbatim after removing a
/// leading XML declaration).
///
/// An external disk's `<source>` is its overlay, the file the snapshot created, as in libvirt.
/// With `keep_active_name` that is the original path; where the snapshot's data went is then
/// [`crate::snapshot::plan::DiskPlan::snapshot_file`], which [`Plan::snapshot_def`] records in
/// a definition suitable as `domain_xml`.
pub fn plan_to_xml(plan: &Plan, created_at: i64, parent: Option<&str>, domain_xml: &str) -> String {
    let mut out = String::from("<domainsnapshot>\n");
    out.push_str(&format!("  <name>{}</name>\n", escape_text(&plan.name)));
    if !plan.description.is_empty() {
        out.push_str(&format!(
            "  <description>{}</description>\n",
            escape_text(&plan.description)
        ));
    }
    out.push_str(&format!("  <state>{}</state>\n", plan.state));
    if let Some(parent) = parent {
        out.push_str(&format!(
            "  <parent>\n    <name>{}</name>\n  </parent>\n",
            escape_text(parent)
        ));
    }
    out.push_str(&format!("  <creationTime>{created_at}</creationTime>\n"));
    out.push_str(&format!(
        "  <memory snapshot='{}'",
        memory_attr(plan.memory)
    ));
    if let Some(file) = &plan.memory_file {
        out.push_str(&format!(" file='{}'", escape_attr(&file.to_string_lossy())));
    }
    out.push_str("/>\n");
    if plan.disks.is_empty() {
        out.push_str("  <disks/>\n");
    } else {
        out.push_str("  <disks>\n");
        for disk in &plan.disks {
            let name = escape_attr(&disk.target);
            match (&disk.mode, &disk.overlay) {
                (DiskMode::External, Some(overlay)) => {
                    out.push_str(&format!(
                        "    <disk name='{name}' snapshot='external' type='file'>\n"
                    ));
                    out.push_str("      <driver type='qcow2'/>\n");
                    out.push_str(&format!(
                        "      <source file='{}'/>\n",
                        escape_attr(&overlay.to_string_lossy())
                    ));
                    out.push_str("    </disk>\n");
                }
                (mode, _) => {
                    out.push_str(&format!("    <disk name='{name}' snapshot='{mode}'/>\n"));
                }
            }
        }
        out.push_str("  </disks>\n");
    }
    let mut domain = domain_xml.trim_start();
    if domain.starts_with("<?xml")
        && let Some(end) = domain.find("?>")
    {
        domain = domain[end + 2..].trim_start();
    }
    let domain = domain.trim_end();
    if !domain.is_empty() {
        out.push_str(domain);
        out.push('\n');
    }
    out.push_str("</domainsnapshot>\n");
    out
}

// ---------------------------------------------------------------------------------------------
// The whole <domainsnapshot> format (redefine and export)

/// libvirt's `<state>` values (its `domainsnapshot.rng`, plus `pmsuspended`, which libvirt
/// also writes).
pub const DOC_STATES: [&str; 8] = [
    "running",
    "blocked",
    "paused",
    "shutdown",
    "shutoff",
    "crashed",
    "pmsuspended",
    "disk-snapshot",
];

/// libvirt's snapshot locations for memory and disks (`snapshot='…'`).
pub const DOC_LOCATIONS: [&str; 4] = ["no", "internal", "external", "manual"];

/// A `<memory>` element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryDoc {
    /// `no`, `internal` or `external`; `None` when the attribute is absent.
    pub snapshot: Option<String>,
    /// The absolute path of the external VM-state file.
    pub file: Option<String>,
}

/// One `<disk>` of `<disks>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskDoc {
    /// A target (`vda`) or the absolute path of the disk's source.
    pub name: String,
    /// One of [`DOC_LOCATIONS`]; `None` when absent.
    pub snapshot: Option<String>,
    /// The storage type of an external snapshot's file: `file`, `block` or `network`.
    pub source_type: Option<String>,
    /// `<driver type='…'>`: the format of the external snapshot's file.
    pub driver_type: Option<String>,
    /// `<source file='…'>`.
    pub source_file: Option<String>,
    /// `<source dev='…'>` (a block device).
    pub source_dev: Option<String>,
    /// The element exactly as written, when it carries more than the fields above (a
    /// `<seclabel>`, a network source's hosts, `<metadata_cache>`, …): written back verbatim.
    pub raw: Option<String>,
}

/// A whole libvirt `<domainsnapshot>` document, every element of the documented format.
///
/// The parts vmsnap does not interpret (`<domain>`, `<inactiveDomain>`, `<cookie>`,
/// `<revertDisks>`, and disks with extra detail) are kept as the exact text of their element,
/// so that writing the document back loses nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotDoc {
    /// `<name>`, trimmed.
    pub name: Option<String>,
    /// `<description>`, verbatim.
    pub description: Option<String>,
    /// `<state>`, one of [`DOC_STATES`].
    pub state: Option<String>,
    /// `<creationTime>`, Unix seconds.
    pub creation_time: Option<i64>,
    /// `<parent><name>`.
    pub parent: Option<String>,
    /// `<memory>`.
    pub memory: Option<MemoryDoc>,
    /// `<disks>`; `Some(empty)` for an empty `<disks/>`.
    pub disks: Option<Vec<DiskDoc>>,
    /// `<revertDisks>` element, verbatim.
    pub revert_disks: Option<String>,
    /// `<domain>` element, verbatim.
    pub domain: Option<String>,
    /// `<inactiveDomain>` element, verbatim.
    pub inactive_domain: Option<String>,
    /// `<cookie>` element, verbatim.
    pub cookie: Option<String>,
    /// `<active>`: whether the snapshot was its domain's current one.
    pub active: Option<bool>,
}

fn element_once<'a>(
    seen: &mut std::collections::HashSet<&'a str>,
    name: &'a str,
) -> Result<(), PlanError> {
    if seen.insert(name) {
        Ok(())
    } else {
        Err(invalid(format!("element <{name}> appears twice")))
    }
}

fn absolute(what: &str, value: &str) -> Result<(), PlanError> {
    if value.starts_with('/') {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} '{}' must be an absolute path",
            value.escape_debug()
        )))
    }
}

fn text_leaf(node: &Node, path: &str) -> Result<String, PlanError> {
    node.allow_attrs(path, &[]).map_err(def_err)?;
    node.leaf(path).map_err(def_err)?;
    Ok(node.text.clone())
}

impl SnapshotDoc {
    /// Parses a `<domainsnapshot>` document, any element of libvirt's format (as for
    /// `virDomainSnapshotCreateXML` with the redefine flag). Refuses, with
    /// [`PlanError::InvalidArgument`] naming the culprit: malformed XML, DTDs and entities,
    /// input over [`MAX_XML_BYTES`], unknown elements or attributes, repeated elements, a
    /// non-numeric `creationTime`, an unknown state or location, relative paths, and
    /// combinations the schema rules out (a file with internal memory, a source on a disk
    /// that is not external, …).
    pub fn parse(xml: &str) -> Result<SnapshotDoc, PlanError> {
        if xml.len() > MAX_XML_BYTES {
            return Err(invalid(format!(
                "the snapshot document is larger than {MAX_XML_BYTES} bytes"
            )));
        }
        let root = parse_tree(xml).map_err(def_err)?;
        let raw = |n: &Node| xml[n.span.clone()].to_owned();
        let path = "domainsnapshot";
        if root.name != path {
            return Err(invalid(format!(
                "expected a <domainsnapshot> document, not <{}>",
                root.name
            )));
        }
        root.allow_attrs(path, &[]).map_err(def_err)?;
        root.no_text(path).map_err(def_err)?;
        let mut doc = SnapshotDoc::default();
        let mut seen = std::collections::HashSet::new();
        for child in &root.children {
            let p = format!("{path}/{}", child.name);
            element_once(&mut seen, child.name.as_str())?;
            match child.name.as_str() {
                "name" => doc.name = Some(xml_trim(&text_leaf(child, &p)?).to_owned()),
                "description" => doc.description = Some(text_leaf(child, &p)?),
                "state" => {
                    let text = text_leaf(child, &p)?;
                    let state = xml_trim(&text);
                    if !DOC_STATES.contains(&state) {
                        return Err(invalid(format!(
                            "unknown snapshot state '{}': expected one of {}",
                            state.escape_debug(),
                            DOC_STATES.join(", ")
                        )));
                    }
                    doc.state = Some(state.to_owned());
                }
                "creationTime" => {
                    let text = text_leaf(child, &p)?;
                    let t = xml_trim(&text);
                    let ok = !t.is_empty()
                        && t.strip_prefix('-')
                            .unwrap_or(t)
                            .bytes()
                            .all(|b| b.is_ascii_digit());
                    doc.creation_time =
                        Some(t.parse::<i64>().ok().filter(|_| ok).ok_or_else(|| {
                            invalid(format!(
                                "<creationTime> must be a number of seconds, not '{}'",
                                t.escape_debug()
                            ))
                        })?);
                }
                "parent" => {
                    child.allow_attrs(&p, &[]).map_err(def_err)?;
                    child.no_text(&p).map_err(def_err)?;
                    let mut name = None;
                    for c in &child.children {
                        let cp = format!("{p}/{}", c.name);
                        if c.name != "name" {
                            return Err(def_err(DefError::UnknownElement(cp)));
                        }
                        if name
                            .replace(xml_trim(&text_leaf(c, &cp)?).to_owned())
                            .is_some()
                        {
                            return Err(invalid("element <name> appears twice in <parent>"));
                        }
                    }
                    let name = name.ok_or_else(|| invalid("<parent> needs a <name>"))?;
                    if name.is_empty() {
                        return Err(invalid("the parent's <name> is empty"));
                    }
                    doc.parent = Some(name);
                }
                "memory" => doc.memory = Some(parse_memory_doc(child, &p)?),
                "disks" | "revertDisks" => {
                    child.allow_attrs(&p, &[]).map_err(def_err)?;
                    child.no_text(&p).map_err(def_err)?;
                    let mut disks = Vec::new();
                    for disk in &child.children {
                        let dp = format!("{p}/{}", disk.name);
                        if disk.name != "disk" {
                            return Err(def_err(DefError::UnknownElement(dp)));
                        }
                        disks.push(parse_disk_doc(disk, &dp, raw(disk))?);
                    }
                    if child.name == "disks" {
                        doc.disks = Some(disks);
                    } else {
                        doc.revert_disks = Some(raw(child));
                    }
                }
                "active" => {
                    let text = text_leaf(child, &p)?;
                    doc.active = Some(match xml_trim(&text) {
                        "0" => false,
                        "1" => true,
                        other => {
                            return Err(invalid(format!(
                                "<active> must be 0 or 1, not '{}'",
                                other.escape_debug()
                            )));
                        }
                    });
                }
                "domain" => doc.domain = Some(raw(child)),
                "inactiveDomain" => doc.inactive_domain = Some(raw(child)),
                "cookie" => {
                    child.no_text(&p).map_err(def_err)?;
                    doc.cookie = Some(raw(child));
                }
                _ => return Err(def_err(DefError::UnknownElement(p))),
            }
        }
        Ok(doc)
    }

    /// Writes the document the way libvirt formats one (`virsh snapshot-dumpxml`): name,
    /// description, state, parent, creationTime, memory, disks, domain, inactiveDomain,
    /// cookie, then `active` and `revertDisks` when present, two spaces of indentation, single
    /// quotes. Verbatim parts are written as they were read.
    pub fn to_xml(&self) -> String {
        let mut x = String::from("<domainsnapshot>\n");
        if let Some(name) = &self.name {
            x.push_str(&format!("  <name>{}</name>\n", escape_text_libvirt(name)));
        }
        if let Some(d) = &self.description {
            x.push_str(&format!(
                "  <description>{}</description>\n",
                escape_text_libvirt(d)
            ));
        }
        if let Some(state) = &self.state {
            x.push_str(&format!(
                "  <state>{}</state>\n",
                escape_text_libvirt(state)
            ));
        }
        if let Some(parent) = &self.parent {
            x.push_str(&format!(
                "  <parent>\n    <name>{}</name>\n  </parent>\n",
                escape_text_libvirt(parent)
            ));
        }
        if let Some(t) = self.creation_time {
            x.push_str(&format!("  <creationTime>{t}</creationTime>\n"));
        }
        if let Some(m) = &self.memory {
            x.push_str("  <memory");
            if let Some(mode) = &m.snapshot {
                x.push_str(&format!(" snapshot='{}'", escape_attr(mode)));
            }
            if let Some(file) = &m.file {
                x.push_str(&format!(" file='{}'", escape_attr(file)));
            }
            x.push_str("/>\n");
        }
        match &self.disks {
            Some(disks) if disks.is_empty() => x.push_str("  <disks/>\n"),
            Some(disks) => {
                x.push_str("  <disks>\n");
                for d in disks {
                    write_disk_doc(&mut x, d);
                }
                x.push_str("  </disks>\n");
            }
            None => {}
        }
        for raw in [&self.domain, &self.inactive_domain, &self.cookie]
            .into_iter()
            .flatten()
        {
            x.push_str("  ");
            x.push_str(raw);
            x.push('\n');
        }
        if let Some(active) = self.active {
            x.push_str(&format!("  <active>{}</active>\n", u8::from(active)));
        }
        if let Some(raw) = &self.revert_disks {
            x.push_str("  ");
            x.push_str(raw);
            x.push('\n');
        }
        x.push_str("</domainsnapshot>\n");
        x
    }
}

/// Escapes element text as libvirt does (`virBufferEscapeString`: both quotes too), keeping a
/// carriage return as a reference so that it survives reading back.
fn escape_text_libvirt(s: &str) -> String {
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

/// Indents every line of a `<domain>` document by two spaces, after removing a leading XML
/// declaration, for embedding in `<domainsnapshot>` (as libvirt indents it).
pub fn embed_domain(domain_xml: &str) -> String {
    let mut domain = domain_xml.trim_start();
    if domain.starts_with("<?xml")
        && let Some(end) = domain.find("?>")
    {
        domain = domain[end + 2..].trim_start();
    }
    let lines: Vec<&str> = domain.trim_end().lines().collect();
    lines.join("\n  ")
}

fn parse_memory_doc(node: &Node, path: &str) -> Result<MemoryDoc, PlanError> {
    node.empty(path, &["snapshot", "file"]).map_err(def_err)?;
    let snapshot = node.attr("snapshot").map(str::to_owned);
    let file = node.attr("file").map(str::to_owned);
    match snapshot.as_deref() {
        None | Some("no" | "internal" | "external") => {}
        Some("manual") => return Err(invalid("'manual' memory snapshots are not supported")),
        Some(other) => {
            return Err(invalid(format!(
                "unknown memory snapshot mode '{}': expected no, internal or external",
                other.escape_debug()
            )));
        }
    }
    if let Some(f) = &file {
        absolute("the memory file", f)?;
        if snapshot.as_deref().is_some_and(|m| m != "external") {
            return Err(invalid(format!(
                "memory file '{}' needs snapshot='external'",
                f.escape_debug()
            )));
        }
    } else if snapshot.as_deref() == Some("external") {
        return Err(invalid("an external memory snapshot needs a file"));
    }
    Ok(MemoryDoc { snapshot, file })
}

fn parse_disk_doc(node: &Node, path: &str, raw: String) -> Result<DiskDoc, PlanError> {
    node.allow_attrs(path, &["name", "snapshot", "type"])
        .map_err(def_err)?;
    node.no_text(path).map_err(def_err)?;
    let name = node.required_attr(path, "name").map_err(def_err)?;
    if name.is_empty() {
        return Err(invalid("a <disk> has an empty name"));
    }
    let mut doc = DiskDoc {
        name: name.to_owned(),
        snapshot: node.attr("snapshot").map(str::to_owned),
        source_type: node.attr("type").map(str::to_owned),
        ..DiskDoc::default()
    };
    if let Some(mode) = &doc.snapshot
        && !DOC_LOCATIONS.contains(&mode.as_str())
    {
        return Err(invalid(format!(
            "disk {name}: unknown snapshot mode '{}': expected one of {}",
            mode.escape_debug(),
            DOC_LOCATIONS.join(", ")
        )));
    }
    if let Some(ty) = &doc.source_type
        && !matches!(ty.as_str(), "file" | "block" | "network")
    {
        return Err(invalid(format!(
            "disk {name}: unsupported snapshot storage type '{}' (file, block or network)",
            ty.escape_debug()
        )));
    }
    let mut extra = false;
    let (mut driver, mut source) = (false, false);
    for child in &node.children {
        let p = format!("{path}/{}", child.name);
        match child.name.as_str() {
            "driver" => {
                if std::mem::replace(&mut driver, true) {
                    return Err(invalid(format!("disk {name}: <driver> appears twice")));
                }
                child.allow_attrs(&p, &["type"]).map_err(def_err)?;
                child.no_text(&p).map_err(def_err)?;
                for c in &child.children {
                    if c.name != "metadata_cache" {
                        return Err(def_err(DefError::UnknownElement(format!("{p}/{}", c.name))));
                    }
                    extra = true;
                }
                if let Some(ty) = child.attr("type") {
                    if ty.is_empty() || !ty.bytes().all(|b| b.is_ascii_alphanumeric()) {
                        return Err(invalid(format!(
                            "disk {name}: invalid driver type '{}'",
                            ty.escape_debug()
                        )));
                    }
                    doc.driver_type = Some(ty.to_owned());
                }
            }
            "source" => {
                if std::mem::replace(&mut source, true) {
                    return Err(invalid(format!("disk {name}: <source> appears twice")));
                }
                child
                    .allow_attrs(
                        &p,
                        &["file", "dev", "protocol", "name", "startupPolicy", "index"],
                    )
                    .map_err(def_err)?;
                child.no_text(&p).map_err(def_err)?;
                extra |= !child.children.is_empty()
                    || child
                        .attrs
                        .iter()
                        .any(|(k, _)| !matches!(k.as_str(), "file" | "dev"));
                if let Some(f) = child.attr("file") {
                    absolute(&format!("disk {name}: source file"), f)?;
                    doc.source_file = Some(f.to_owned());
                }
                if let Some(d) = child.attr("dev") {
                    absolute(&format!("disk {name}: source device"), d)?;
                    doc.source_dev = Some(d.to_owned());
                }
                let ty = doc.source_type.as_deref().unwrap_or("file");
                let fits = match ty {
                    "file" => child.attr("dev").is_none() && child.attr("protocol").is_none(),
                    "block" => child.attr("dev").is_some() && child.attr("file").is_none(),
                    _ => child.attr("protocol").is_some(),
                };
                if !fits {
                    return Err(invalid(format!(
                        "disk {name}: the <source> does not fit type='{ty}' (file needs \
                         'file', block needs 'dev', network needs 'protocol')"
                    )));
                }
            }
            _ => return Err(def_err(DefError::UnknownElement(p))),
        }
    }
    let external = match doc.snapshot.as_deref() {
        Some("external") => true,
        None => driver || source || doc.source_type.is_some(),
        Some(_) => false,
    };
    if !external && (driver || source || doc.source_type.is_some()) {
        return Err(invalid(format!(
            "disk {name}: type, <driver> and <source> are only for an external snapshot"
        )));
    }
    if extra {
        doc.raw = Some(raw);
    }
    Ok(doc)
}

fn write_disk_doc(x: &mut String, d: &DiskDoc) {
    if let Some(raw) = &d.raw {
        x.push_str("    ");
        x.push_str(raw);
        x.push('\n');
        return;
    }
    x.push_str(&format!("    <disk name='{}'", escape_attr(&d.name)));
    if let Some(mode) = &d.snapshot {
        x.push_str(&format!(" snapshot='{}'", escape_attr(mode)));
    }
    let has_source = d.source_file.is_some() || d.source_dev.is_some();
    if let Some(ty) = &d.source_type {
        x.push_str(&format!(" type='{}'", escape_attr(ty)));
    }
    if d.driver_type.is_none() && !has_source {
        x.push_str("/>\n");
        return;
    }
    x.push_str(">\n");
    if let Some(dt) = &d.driver_type {
        x.push_str(&format!("      <driver type='{}'/>\n", escape_attr(dt)));
    }
    if let Some(f) = &d.source_file {
        x.push_str(&format!("      <source file='{}'/>\n", escape_attr(f)));
    } else if let Some(dev) = &d.source_dev {
        x.push_str(&format!("      <source dev='{}'/>\n", escape_attr(dev)));
    }
    x.push_str("    </disk>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::def::{DiskBus, DiskDef, DiskFormat, DomainDef};
    use crate::snapshot::plan::{Fs, GuestRunState, SnapshotState, plan};
    use std::path::Path;

    fn kind(e: &PlanError) -> &'static str {
        match e {
            PlanError::InvalidArgument(_) => "invalid",
            PlanError::Unsupported(_) => "unsupported",
            PlanError::InvalidState(_) => "state",
            PlanError::AlreadyExists(_) => "exists",
        }
    }

    #[track_caller]
    fn refused(xml: &str, expected: &str, needle: &str) {
        match request_from_xml(xml) {
            Ok(r) => panic!("accepted {xml}: {r:?}"),
            Err(e) => {
                assert_eq!(kind(&e), expected, "{xml}: {e}");
                assert!(
                    e.to_string().contains(needle),
                    "{xml}: {e:?} lacks {needle:?}"
                );
            }
        }
    }

    fn snap(inner: &str) -> String {
        format!("<domainsnapshot>{inner}</domainsnapshot>")
    }

    #[test]
    fn full_creation_document() {
        let xml = r#"<?xml version="1.0"?>
<!-- before the upgrade -->
<domainsnapshot>
  <name>before-upgrade</name>
  <description>Kernel 6.1 &amp; &lt;friends&gt;</description>
  <memory snapshot='external' file='/var/lib/vmsnap/ram.vmstate'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/var/lib/vmsnap/vda.new.qcow2'/>
    </disk>
    <disk name="/var/lib/vmsnap/b.raw" snapshot="no"/>
    <disk name='vdc' snapshot='internal'></disk>
    <disk name='vdd'><source file='/x/d.qcow2'/></disk>
  </disks>
</domainsnapshot>
"#;
        let req = request_from_xml(xml).unwrap();
        assert_eq!(
            req,
            CreateRequest {
                name: Some("before-upgrade".into()),
                description: "Kernel 6.1 & <friends>".into(),
                memory: Some(MemoryMode::External),
                memory_file: Some("/var/lib/vmsnap/ram.vmstate".into()),
                disks: vec![
                    DiskRequest {
                        target: "vda".into(),
                        mode: DiskMode::External,
                        file: Some("/var/lib/vmsnap/vda.new.qcow2".into()),
                    },
                    DiskRequest {
                        target: "/var/lib/vmsnap/b.raw".into(),
                        mode: DiskMode::No,
                        file: None,
                    },
                    DiskRequest {
                        target: "vdc".into(),
                        mode: DiskMode::Internal,
                        file: None,
                    },
                    DiskRequest {
                        target: "vdd".into(),
                        mode: DiskMode::External,
                        file: Some("/x/d.qcow2".into()),
                    },
                ],
                ..CreateRequest::default()
            }
        );
    }

    #[test]
    fn minimal_documents() {
        assert_eq!(
            request_from_xml("<domainsnapshot/>").unwrap(),
            CreateRequest::default()
        );
        let req = request_from_xml(&snap("<memory snapshot='no'/><disks/>")).unwrap();
        assert_eq!(req.memory, Some(MemoryMode::None));
        let req = request_from_xml(&snap("<memory snapshot='internal'/>")).unwrap();
        assert_eq!(req.memory, Some(MemoryMode::Internal));
        let req = request_from_xml(&snap("<memory file='/m'/>")).unwrap();
        assert_eq!(
            (req.memory, req.memory_file),
            (Some(MemoryMode::External), Some("/m".into()))
        );
        // Passed on for the planner to refuse (a file needs external memory).
        let req = request_from_xml(&snap("<memory snapshot='no' file='/m'/>")).unwrap();
        assert_eq!(req.memory, Some(MemoryMode::None));
        assert_eq!(request_from_xml(&snap("<memory/>")).unwrap().memory, None);
    }

    #[test]
    fn unicode_and_odd_whitespace() {
        let xml = "\u{feff}<domainsnapshot >\n\t<name>\n\t  été ☃ \r\n</name\n>\r\n<description>  \
                   ligne 1\n\tligne 2 — ☃ 😀 &#x263A;  </description>\n<memory  snapshot = \"internal\"\n/>\
                   <disks>\n\n<disk\tname='vda'\n snapshot='internal' /></disks></domainsnapshot >";
        let req = request_from_xml(xml).unwrap();
        assert_eq!(req.name.as_deref(), Some("été ☃"));
        assert_eq!(req.description, "  ligne 1\n\tligne 2 — ☃ 😀 ☺  ");
        assert_eq!(req.memory, Some(MemoryMode::Internal));
        assert_eq!(req.disks.len(), 1);
        let req =
            request_from_xml(&snap("<description><![CDATA[a <b> & c]]></description>")).unwrap();
        assert_eq!(req.description, "a <b> & c");
    }

    #[test]
    fn refusals() {
        refused("<domain/>", "invalid", "<domainsnapshot>");
        refused(&snap("<foo/>"), "invalid", "<foo>");
        refused("<domainsnapshot x='1'/>", "invalid", "'x'");
        refused(&snap("<name a='b'>n</name>"), "invalid", "'a'");
        refused(
            &snap("<name>a</name><name>b</name>"),
            "invalid",
            "<name> appears twice",
        );
        refused(&snap("<name><b/></name>"), "invalid", "<b>");
        refused(&snap("<description><b/></description>"), "invalid", "<b>");
        refused(&snap("<memory snapshot='yes'/>"), "invalid", "'yes'");
        refused(&snap("<memory snapshot='manual'/>"), "invalid", "'manual'");
        refused(&snap("<memory mode='x'/>"), "invalid", "'mode'");
        refused(
            &snap("<memory/><memory/>"),
            "invalid",
            "<memory> appears twice",
        );
        refused(
            &snap("<disks/><disks/>"),
            "invalid",
            "<disks> appears twice",
        );
        refused(&snap("<disks>text</disks>"), "invalid", "text");
        refused(&snap("<disks><volume/></disks>"), "invalid", "<volume>");
        refused(
            &snap("<disks><disk snapshot='no'/></disks>"),
            "invalid",
            "'name'",
        );
        refused(
            &snap("<disks><disk name='' snapshot='no'/></disks>"),
            "invalid",
            "empty",
        );
        refused(
            &snap("<disks><disk name='vda'/></disks>"),
            "invalid",
            "'snapshot'",
        );
        refused(
            &snap("<disks><disk name='vda' snapshot='maybe'/></disks>"),
            "invalid",
            "'maybe'",
        );
        refused(
            &snap("<disks><disk name='vda' snapshot='no' foo='1'/></disks>"),
            "invalid",
            "'foo'",
        );
        refused(
            &snap("<disks><disk name='vda' snapshot='external' type='block'/></disks>"),
            "unsupported",
            "type='file'",
        );
        refused(
            &snap(
                "<disks><disk name='vda' snapshot='external'><driver type='raw'/></disk></disks>",
            ),
            "unsupported",
            "not 'raw'",
        );
        refused(
            &snap(
                "<disks><disk name='vda' snapshot='external'><driver type='qcow2' name='qemu'/></disk></disks>",
            ),
            "invalid",
            "'name'",
        );
        refused(
            &snap(
                "<disks><disk name='vda' snapshot='internal'><driver type='qcow2'/></disk></disks>",
            ),
            "invalid",
            "<driver> is only for an external snapshot",
        );
        refused(
            &snap("<disks><disk name='vda' snapshot='no'><source file='/a'/></disk></disks>"),
            "invalid",
            "<source> is only for an external snapshot",
        );
        refused(
            &snap("<disks><disk name='vda'><source file='/a'/><source file='/b'/></disk></disks>"),
            "invalid",
            "<source> appears twice",
        );
        refused(
            &snap("<disks><disk name='vda'><source dev='/dev/sda'/></disk></disks>"),
            "invalid",
            "'dev'",
        );
        refused(
            &snap("<disks><disk name='vda'><source/></disk></disks>"),
            "invalid",
            "'file'",
        );
        refused(
            &snap("<disks><disk name='vda'><source file=''/></disk></disks>"),
            "invalid",
            "empty",
        );
        refused(
            &snap("<disks><disk name='vda' snapshot='external'><seclabel/></disk></disks>"),
            "invalid",
            "<seclabel>",
        );
        for element in OUTPUT_ONLY {
            refused(
                &snap(&format!("<{element}>x</{element}>")),
                "invalid",
                &format!("element <{element}> is output-only; use the redefine API"),
            );
        }
    }

    #[test]
    fn hardening() {
        refused(
            "<!DOCTYPE domainsnapshot [<!ENTITY x 'boom'>]><domainsnapshot><name>&x;</name></domainsnapshot>",
            "invalid",
            "DOCTYPE",
        );
        refused(&snap("<name>&x;</name>"), "invalid", "&x;");
        refused(
            &snap("<name>a&#0;</name>"),
            "invalid",
            "character reference",
        );
        let big = snap(&format!(
            "<description>{}</description>",
            "x".repeat(MAX_XML_BYTES)
        ));
        refused(&big, "invalid", "larger than");
        let deep = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        refused(&snap(&deep), "invalid", "nested too deeply");
        refused("<domainsnapshot>", "invalid", "not closed");
        refused(
            "<domainsnapshot/><domainsnapshot/>",
            "invalid",
            "more than one root",
        );
        refused("", "invalid", "no root");
    }

    struct NoFiles;
    impl Fs for NoFiles {
        fn exists(&self, _: &Path) -> bool {
            false
        }
        fn is_dir(&self, _: &Path) -> bool {
            true
        }
        fn is_block_device(&self, _: &Path) -> bool {
            false
        }
    }

    fn def() -> DomainDef {
        let disk = |target: &str, format, source: &str| DiskDef {
            target: target.into(),
            bus: DiskBus::Virtio,
            format,
            source: source.into(),
            readonly: false,
            shareable: false,
            transient: false,
            boot_order: None,
        };
        let def = DomainDef {
            name: "web".into(),
            uuid: uuid::Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef),
            domain_type: "kvm".into(),
            description: Some("the <web> & 'mail' host".into()),
            memory_kib: 1 << 20,
            vcpus: 2,
            arch: "x86_64".into(),
            machine: "q35".into(),
            boot_devs: Vec::new(),
            disks: vec![
                disk("vda", DiskFormat::Qcow2, "/img/a'b.qcow2"),
                disk("vdb", DiskFormat::Raw, "/img/b&c.raw"),
                disk("vdc", DiskFormat::Qcow2, "/img/c.qcow2"),
            ],
        };
        def.validate().unwrap();
        def
    }

    fn text_of<'a>(node: &'a Node, name: &str) -> &'a str {
        &node.children.iter().find(|c| c.name == name).unwrap().text
    }

    #[test]
    fn output_round_trip() {
        let def = def();
        let req = request_from_xml(
            "<domainsnapshot><name>snap &lt;1&gt; ☃</name>\
             <description>line 1\nline 2 &amp; \"quotes\" 'apos' &#13;</description>\
             <disks><disk name='vdc' snapshot='no'/>\
             <disk name='/img/a&apos;b.qcow2' snapshot='internal'/></disks></domainsnapshot>",
        )
        .unwrap();
        let p = plan(
            &def,
            GuestRunState::Paused,
            &CreateRequest {
                disk_only: true,
                ..req
            },
            &|_| false,
            1,
            &NoFiles,
        )
        .unwrap();
        assert_eq!(p.state, SnapshotState::DiskSnapshot);
        let xml = plan_to_xml(&p, 1_700_000_123, Some("prev <&>"), &def.to_xml());
        let root = parse_tree(&xml).unwrap();
        assert_eq!(root.name, "domainsnapshot");
        let names: Vec<&str> = root.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "name",
                "description",
                "state",
                "parent",
                "creationTime",
                "memory",
                "disks",
                "domain"
            ]
        );
        assert_eq!(text_of(&root, "name"), "snap <1> ☃");
        assert_eq!(
            text_of(&root, "description"),
            "line 1\nline 2 & \"quotes\" 'apos' \r"
        );
        assert_eq!(text_of(&root, "state"), "disk-snapshot");
        assert_eq!(text_of(&root, "creationTime"), "1700000123");
        let parent = root.children.iter().find(|c| c.name == "parent").unwrap();
        assert_eq!(text_of(parent, "name"), "prev <&>");
        let memory = root.children.iter().find(|c| c.name == "memory").unwrap();
        assert_eq!(memory.attrs, [("snapshot".to_owned(), "no".to_owned())]);
        let disks = &root
            .children
            .iter()
            .find(|c| c.name == "disks")
            .unwrap()
            .children;
        let attrs = |i: usize| -> Vec<(&str, &str)> {
            disks[i]
                .attrs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        };
        assert_eq!(attrs(0), [("name", "vda"), ("snapshot", "internal")]);
        assert_eq!(
            attrs(1),
            [("name", "vdb"), ("snapshot", "external"), ("type", "file")]
        );
        assert_eq!(
            disks[1].children[0].attrs,
            [("type".to_owned(), "qcow2".to_owned())]
        );
        assert_eq!(
            disks[1].children[1].attrs,
            [("file".to_owned(), "/img/b&c.snap__1___.qcow2".to_owned())]
        );
        assert_eq!(attrs(2), [("name", "vdc"), ("snapshot", "no")]);
        let domain = root.children.iter().find(|c| c.name == "domain").unwrap();
        assert_eq!(text_of(domain, "name"), "web");
        assert_eq!(text_of(domain, "description"), "the <web> & 'mail' host");
        // The output cannot be fed back as a creation document.
        let err = request_from_xml(&xml).unwrap_err();
        assert!(err.to_string().contains("<state> is output-only"), "{err}");
    }

    #[test]
    fn output_external_memory_and_declaration() {
        let def = def();
        let req = CreateRequest {
            name: Some("s".into()),
            memory: Some(MemoryMode::External),
            memory_file: Some("/img/ram 'x'.vmstate".into()),
            ..CreateRequest::default()
        };
        let p = plan(&def, GuestRunState::Running, &req, &|_| false, 1, &NoFiles).unwrap();
        let domain = format!("<?xml version='1.0'?>\n{}", def.to_xml());
        let xml = plan_to_xml(&p, 5, None, &domain);
        assert!(!xml.contains("<?xml"));
        let root = parse_tree(&xml).unwrap();
        assert!(
            root.children
                .iter()
                .all(|c| c.name != "parent" && c.name != "description")
        );
        assert_eq!(text_of(&root, "state"), "running");
        let memory = root.children.iter().find(|c| c.name == "memory").unwrap();
        assert_eq!(memory.attr("snapshot"), Some("external"));
        assert_eq!(memory.attr("file"), Some("/img/ram 'x'.vmstate"));
        let disks = &root
            .children
            .iter()
            .find(|c| c.name == "disks")
            .unwrap()
            .children;
        assert!(disks.iter().all(|d| d.attr("snapshot") == Some("external")));
        assert_eq!(disks.len(), 3);
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn corpus(kind: &str) -> Vec<(PathBuf, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/snapshot-xml")
            .join(kind);
        let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                (p, text)
            })
            .collect();
        files.sort();
        assert!(files.len() >= 5, "corpus {kind} is too small");
        files
    }

    #[test]
    fn doc_valid_corpus_round_trips() {
        for (path, text) in corpus("valid") {
            let doc =
                SnapshotDoc::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let out = doc.to_xml();
            let again = SnapshotDoc::parse(&out).unwrap_or_else(|e| {
                panic!("{}: output does not parse: {e}\n{out}", path.display())
            });
            assert_eq!(
                again,
                doc,
                "{}: changed by a round trip\n{out}",
                path.display()
            );
            assert_eq!(again.to_xml(), out, "{}: output not stable", path.display());
        }
    }

    #[test]
    fn doc_invalid_corpus_is_refused_as_invalid_argument() {
        for (path, text) in corpus("invalid") {
            match SnapshotDoc::parse(&text) {
                Err(PlanError::InvalidArgument(_)) => {}
                other => panic!(
                    "{}: expected InvalidArgument, got {other:?}",
                    path.display()
                ),
            }
        }
    }

    fn parse_file(name: &str) -> SnapshotDoc {
        let (_, text) = corpus("valid")
            .into_iter()
            .find(|(p, _)| p.ends_with(name))
            .unwrap();
        SnapshotDoc::parse(&text).unwrap()
    }

    #[test]
    fn doc_libvirt_output_reads_every_element_and_keeps_the_rest_verbatim() {
        let doc = parse_file("libvirt-internal-checkpoint.xml");
        assert_eq!(doc.name.as_deref(), Some("before-upgrade"));
        assert_eq!(doc.description.as_deref(), Some("Kernel 6.1 & friends"));
        assert_eq!(doc.state.as_deref(), Some("running"));
        assert_eq!(doc.parent.as_deref(), Some("fresh-install"));
        assert_eq!(doc.creation_time, Some(1_700_000_123));
        assert_eq!(
            doc.memory,
            Some(MemoryDoc {
                snapshot: Some("internal".into()),
                file: None
            })
        );
        let disks = doc.disks.as_ref().unwrap();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[1].snapshot.as_deref(), Some("no"));
        let domain = doc.domain.as_deref().unwrap();
        assert!(domain.starts_with("<domain type='kvm'>") && domain.ends_with("</domain>"));
        assert!(
            domain
                .contains("<interface type='network'>\n        <mac address='52:54:00:12:34:56'/>")
        );
        let cookie = doc.cookie.as_deref().unwrap();
        assert!(cookie.starts_with("<cookie>") && cookie.contains("<slirpHelper/>"));
        // Written back in libvirt's order with the kept parts untouched.
        let out = doc.to_xml();
        let order: Vec<usize> = [
            "<name>before",
            "<description>",
            "<state>",
            "<parent>",
            "<creationTime>",
            "<memory",
            "<disks>",
            "<domain type",
            "<cookie>",
        ]
        .iter()
        .map(|t| {
            out.find(t)
                .unwrap_or_else(|| panic!("{t} missing from\n{out}"))
        })
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
        assert!(out.contains(domain) && out.contains(cookie));
    }

    #[test]
    fn doc_odd_but_valid_input_is_read_as_meant() {
        let doc = parse_file("odd-whitespace-and-order.xml");
        assert_eq!(doc.name.as_deref(), Some("point-été"));
        assert_eq!(doc.state.as_deref(), Some("paused"));
        assert_eq!(doc.creation_time, Some(1_700_000_000));
        assert_eq!(
            doc.description.as_deref(),
            Some("a <b>bold</b> & \"quoted\" claim and <more>")
        );
        let m = doc.memory.unwrap();
        assert_eq!(
            (m.snapshot, m.file.as_deref()),
            (None, Some("/var/lib/vmsnap/ram & more.state"))
        );
        let doc = parse_file("unicode-description.xml");
        let d = doc.description.unwrap();
        assert!(
            d.contains("😀 👩‍💻") && d.contains("e\u{301}") && d.contains("שלום"),
            "{d}"
        );
        assert!(d.contains("CR\rend"), "{d:?}");
        assert_eq!(doc.disks, Some(Vec::new()));
    }

    #[test]
    fn doc_detailed_disks_are_kept_whole() {
        let doc = parse_file("detailed-disks.xml");
        let disks = doc.disks.unwrap();
        assert_eq!(disks[0].source_dev.as_deref(), Some("/dev/vg0/web1-snap"));
        assert_eq!(
            disks[0].raw, None,
            "a plain block disk needs no verbatim copy"
        );
        for d in &disks[1..3] {
            let raw = d.raw.as_deref().unwrap();
            assert!(
                raw.starts_with("<disk name=") && raw.ends_with("</disk>"),
                "{raw}"
            );
        }
        assert!(
            disks[1]
                .raw
                .as_deref()
                .unwrap()
                .contains("<seclabel model='dac' relabel='no'/>")
        );
        assert!(
            disks[2]
                .raw
                .as_deref()
                .unwrap()
                .contains("gluster.example.org")
        );
        assert_eq!(disks[3].snapshot.as_deref(), Some("manual"));
        assert_eq!(disks[4].source_type.as_deref(), Some("file"));
    }

    #[test]
    fn doc_refusals_name_the_culprit() {
        let refused = |xml: &str, needle: &str| match SnapshotDoc::parse(xml) {
            Err(PlanError::InvalidArgument(m)) => {
                assert!(m.contains(needle), "{xml}: {m:?} lacks {needle:?}")
            }
            other => panic!("{xml}: {other:?}"),
        };
        let s = |inner: &str| format!("<domainsnapshot>{inner}</domainsnapshot>");
        refused(&s("<creationTime>12a</creationTime>"), "'12a'");
        refused(&s("<creationTime>+12</creationTime>"), "'+12'");
        refused(&s("<creationTime></creationTime>"), "creationTime");
        refused(&s("<state>nostate</state>"), "'nostate'");
        refused(&s("<name>a</name><name>b</name>"), "<name> appears twice");
        refused(&s("<cookie>text</cookie>"), "this element holds no text");
        refused(&s("<parent><name>a</name><name>b</name></parent>"), "twice");
        refused(&s("<parent><name> </name></parent>"), "empty");
        refused(&s("<memory snapshot='external'/>"), "needs a file");
        refused(
            &s("<disks><disk name='a' snapshot='sideways'/></disks>"),
            "'sideways'",
        );
        refused(
            &s("<disks><disk name='a'><source file='rel'/></disk></disks>"),
            "absolute",
        );
        refused(
            &s("<disks><disk name='a'><driver type='q c'/></disk></disks>"),
            "driver type",
        );
        refused(
            &s("<disks><disk name='a'><target dev='x'/></disk></disks>"),
            "<target>",
        );
        refused(&s("<revertDisks><x/></revertDisks>"), "<x>");
        let big = s(&format!(
            "<description>{}</description>",
            "x".repeat(MAX_XML_BYTES)
        ));
        refused(&big, "larger than");
        let deep = format!("<domain>{}{}</domain>", "<a>".repeat(40), "</a>".repeat(40));
        refused(&s(&deep), "nested too deeply");
    }

    #[test]
    fn doc_embed_domain_indents_and_drops_the_declaration() {
        assert_eq!(
            embed_domain("<?xml version='1.0'?>\n<domain>\n  <name>a</name>\n</domain>\n"),
            "<domain>\n    <name>a</name>\n  </domain>"
        );
        assert_eq!(embed_domain("  \n"), "");
    }
}
