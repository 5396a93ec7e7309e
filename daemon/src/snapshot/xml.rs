//! libvirt `<domainsnapshot>` documents: the creation format read into a [`CreateRequest`], and
//! the output format written from a [`Plan`].
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
