//! Domain definitions: a small, documented subset of libvirt's domain XML, parsed strictly and
//! written back canonically.
//!
//! Invariants: every [`DomainDef`] returned by [`DomainDef::from_xml`] has passed
//! [`DomainDef::validate`], and [`DomainDef::to_xml`] of a valid definition parses back to an
//! equal value. Parsing never drops configuration silently: any element or attribute outside the
//! subset below is refused with an error naming its path (`domain/devices/interface`). Input is
//! limited to [`MAX_XML_BYTES`]; `<!DOCTYPE` (and with it any entity declaration) is refused, so
//! no entity is ever expanded — only the five predefined XML entities and character references
//! are decoded. Comments, processing instructions and whitespace between elements are ignored;
//! both attribute quote styles are accepted.
//!
//! The accepted subset (libvirt spelling):
//!
//! ```xml
//! <domain type='qemu'>                      <!-- or 'kvm' (required) -->
//!   <name>guest-1</name>                    <!-- required; 1..=64 of [A-Za-z0-9._-], not starting with '.' or '-' -->
//!   <uuid>…</uuid>                          <!-- optional; a random (v4) UUID when absent -->
//!   <description>free text</description>    <!-- optional; kept verbatim -->
//!   <memory unit='MiB'>512</memory>         <!-- required; at least 16 MiB -->
//!   <currentMemory unit='MiB'>512</currentMemory> <!-- optional; must equal memory -->
//!   <vcpu>2</vcpu>                          <!-- optional (1); 1..=64; placement='static' accepted -->
//!   <os>                                    <!-- optional: hvm, x86_64, q35 -->
//!     <type arch='x86_64' machine='q35'>hvm</type>
//!     <boot dev='hd'/>
//!   </os>
//!   <devices>
//!     <disk type='file' device='disk'>
//!       <driver name='qemu' type='qcow2'/>  <!-- qcow2, raw or qed -->
//!       <source file='/abs/path.qcow2'/>
//!       <target dev='vda' bus='virtio'/>    <!-- vd[a-z]{1,2} on virtio, sd[a-z]{1,2} on scsi -->
//!       <readonly/> <shareable/> <transient/> <boot order='1'/>  <!-- all optional -->
//!     </disk>
//!   </devices>
//! </domain>
//! ```
//!
//! Simplifications, each refused rather than ignored: `currentMemory` different from `memory`
//! (no ballooning); `<boot dev>` other than `hd`; `<os><boot>` together with per-disk
//! `<boot order>` (as libvirt); a transient disk that is also read-only or shareable; a
//! shareable writable disk in a format other than raw; two disks on the same file when either is
//! writable (QEMU's image locking would refuse it). Memory units follow libvirt: `b`/`bytes`,
//! `KB`/`MB`/`GB`/`TB` are powers of 1000, `k`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` powers of
//! 1024, compared case-insensitively as libvirt does; the default is KiB and values are rounded
//! up to whole KiB.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};
use uuid::Uuid;

/// The largest definition accepted by [`DomainDef::from_xml`] and [`DiskDef::from_xml`].
pub const MAX_XML_BYTES: usize = 1 << 20;
/// The longest accepted domain name, in characters.
pub const MAX_NAME_LEN: usize = 64;
/// The longest accepted domain description, in characters (as for snapshot descriptions).
pub const MAX_DESCRIPTION_LEN: usize = 4096;
/// The largest accepted number of virtual CPUs.
pub const MAX_VCPUS: u32 = 64;
/// The smallest accepted guest memory, in KiB (16 MiB).
pub const MIN_MEMORY_KIB: u64 = 16 * 1024;
/// The largest accepted guest memory, in KiB (16 TiB).
pub const MAX_MEMORY_KIB: u64 = 16 << 30;
/// The largest accepted per-disk boot order.
pub const MAX_BOOT_ORDER: u32 = 9999;
/// Nesting deeper than this is refused before interpretation (the subset needs 4 levels).
const MAX_DEPTH: usize = 16;

/// The image format of a disk, as in `<driver name='qemu' type='…'/>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskFormat {
    /// QEMU copy-on-write v2: internal snapshots, backing files.
    Qcow2,
    /// A plain image.
    Raw,
    /// QEMU enhanced disk (legacy).
    Qed,
}

impl DiskFormat {
    /// Every format, in a stable order.
    pub const ALL: [DiskFormat; 3] = [DiskFormat::Qcow2, DiskFormat::Raw, DiskFormat::Qed];

    /// The libvirt and QEMU spelling: `qcow2`, `raw` or `qed`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
            DiskFormat::Qed => "qed",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DiskFormat {
    type Err = DefError;

    fn from_str(s: &str) -> Result<Self, DefError> {
        DiskFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| invalid("disk format", s, "expected qcow2, raw or qed"))
    }
}

/// The bus a disk is attached to, as in `<target bus='…'/>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskBus {
    /// A `virtio-blk-pci` device; targets are named `vd…`.
    Virtio,
    /// A `scsi-hd` device on the `virtio-scsi-pci` controller; targets are named `sd…`.
    Scsi,
}

impl DiskBus {
    /// The libvirt spelling: `virtio` or `scsi`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Scsi => "scsi",
        }
    }

    /// The prefix of target names on this bus: `vd` or `sd`.
    pub fn target_prefix(self) -> &'static str {
        match self {
            DiskBus::Virtio => "vd",
            DiskBus::Scsi => "sd",
        }
    }
}

impl fmt::Display for DiskBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DiskBus {
    type Err = DefError;

    fn from_str(s: &str) -> Result<Self, DefError> {
        match s {
            "virtio" => Ok(DiskBus::Virtio),
            "scsi" => Ok(DiskBus::Scsi),
            _ => Err(invalid("disk bus", s, "expected virtio or scsi")),
        }
    }
}

/// The chipset family of a machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MachineFamily {
    /// `q35` and `pc-q35-X.Y`: PCI Express; hot-plug goes through root ports.
    Q35,
    /// `pc` and `pc-i440fx-X.Y`: conventional PCI; hot-plug goes to `pci.0`.
    I440fx,
}

impl MachineFamily {
    /// The family of an accepted machine name, `None` for any other name.
    pub fn of(machine: &str) -> Option<MachineFamily> {
        fn versioned(rest: Option<&str>) -> bool {
            rest.is_some_and(|v| {
                let mut parts = v.split('.');
                let n = v.split('.').count();
                (2..=3).contains(&n)
                    && parts.all(|p| {
                        !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit())
                    })
            })
        }
        match machine {
            "q35" => Some(MachineFamily::Q35),
            "pc" => Some(MachineFamily::I440fx),
            m if versioned(m.strip_prefix("pc-q35-")) => Some(MachineFamily::Q35),
            m if versioned(m.strip_prefix("pc-i440fx-")) => Some(MachineFamily::I440fx),
            _ => None,
        }
    }
}

/// One disk: a file-backed image attached to a virtio or SCSI bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskDef {
    /// The guest-visible name and the device id: `vda`, `sdb`, …
    pub target: String,
    /// The bus; must agree with the target prefix.
    pub bus: DiskBus,
    /// The format of the image at `source`.
    pub format: DiskFormat,
    /// The image, an absolute path.
    pub source: PathBuf,
    /// The guest cannot write; QEMU opens the image read-only.
    pub readonly: bool,
    /// Other guests may write the same image concurrently (raw, or read-only, only).
    pub shareable: bool,
    /// Writes go to a throw-away overlay; the image itself is opened read-only.
    pub transient: bool,
    /// Position in the firmware boot order (1 first).
    pub boot_order: Option<u32>,
}

/// A domain (guest) definition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainDef {
    /// Unique name: 1..=64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
    pub name: String,
    /// Unique identifier; never nil.
    pub uuid: Uuid,
    /// `qemu` or `kvm`, as libvirt's `<domain type>`.
    pub domain_type: String,
    /// Free text, kept verbatim.
    pub description: Option<String>,
    /// Guest memory in KiB, within [`MIN_MEMORY_KIB`]..=[`MAX_MEMORY_KIB`].
    pub memory_kib: u64,
    /// Virtual CPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u32,
    /// Guest architecture; only `x86_64`.
    pub arch: String,
    /// Machine type: `q35` (default), `pc`, or a versioned `pc-q35-X.Y` / `pc-i440fx-X.Y`.
    pub machine: String,
    /// Legacy boot order from `<os><boot dev='hd'/>`; only `hd`.
    pub boot_devs: Vec<String>,
    /// Disks in definition order.
    pub disks: Vec<DiskDef>,
}

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefError {
    /// An element outside the supported subset; the payload is its path, e.g.
    /// `domain/devices/interface`.
    #[error("unsupported element {}", describe_element(.0))]
    UnknownElement(String),
    /// An attribute outside the supported subset.
    #[error("unsupported attribute '{attribute}' on {}", describe_element(.element))]
    UnknownAttribute {
        /// Path of the element carrying it.
        element: String,
        /// The attribute's name.
        attribute: String,
    },
    /// A required element or attribute is absent; the payload describes it.
    #[error("missing {0}")]
    Missing(String),
    /// A value outside what is accepted.
    #[error("invalid {what} '{}': {reason}", shorten(.value))]
    Invalid {
        /// What the value is, e.g. `disk target`.
        what: String,
        /// The offending value.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The input is not well-formed XML, or uses a refused XML feature (DOCTYPE, entities).
    #[error("malformed XML: {0}")]
    Malformed(String),
    /// The input is larger than allowed.
    #[error("definition larger than {limit} bytes")]
    TooLarge {
        /// The limit, [`MAX_XML_BYTES`].
        limit: usize,
    },
    /// Something that must be unique appears twice; the payload describes it.
    #[error("duplicate {0}")]
    Duplicate(String),
}

fn describe_element(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((parent, name)) => format!("<{name}> in {parent}"),
        None => format!("<{path}>"),
    }
}

fn shorten(value: &str) -> Cow<'_, str> {
    const MAX: usize = 80;
    match value.char_indices().nth(MAX) {
        Some((cut, _)) => Cow::Owned(format!("{}…", &value[..cut])),
        None => Cow::Borrowed(value),
    }
}

fn invalid(
    what: impl Into<String>,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> DefError {
    DefError::Invalid {
        what: what.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

impl DomainDef {
    /// Parses and validates a `<domain>` document; a random (v4) UUID is generated when
    /// `<uuid>` is absent.
    pub fn from_xml(xml: &str) -> Result<DomainDef, DefError> {
        let root = parse_tree(xml)?;
        let def = parse_domain(&root)?;
        def.validate()?;
        Ok(def)
    }

    /// Writes the canonical, libvirt-compatible XML of this definition.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "<domain type='{}'>\n",
            escape_attr(&self.domain_type)
        ));
        out.push_str(&format!("  <name>{}</name>\n", escape_text(&self.name)));
        out.push_str(&format!("  <uuid>{}</uuid>\n", self.uuid.hyphenated()));
        if let Some(description) = &self.description {
            out.push_str(&format!(
                "  <description>{}</description>\n",
                escape_text(description)
            ));
        }
        out.push_str(&format!(
            "  <memory unit='KiB'>{}</memory>\n",
            self.memory_kib
        ));
        out.push_str(&format!(
            "  <currentMemory unit='KiB'>{}</currentMemory>\n",
            self.memory_kib
        ));
        out.push_str(&format!(
            "  <vcpu placement='static'>{}</vcpu>\n",
            self.vcpus
        ));
        out.push_str("  <os>\n");
        out.push_str(&format!(
            "    <type arch='{}' machine='{}'>hvm</type>\n",
            escape_attr(&self.arch),
            escape_attr(&self.machine)
        ));
        for dev in &self.boot_devs {
            out.push_str(&format!("    <boot dev='{}'/>\n", escape_attr(dev)));
        }
        out.push_str("  </os>\n");
        if self.disks.is_empty() {
            out.push_str("  <devices/>\n");
        } else {
            out.push_str("  <devices>\n");
            for disk in &self.disks {
                disk.write_xml(&mut out, 4);
            }
            out.push_str("  </devices>\n");
        }
        out.push_str("</domain>\n");
        out
    }

    /// The disk with this target, if any.
    pub fn disk(&self, target: &str) -> Option<&DiskDef> {
        self.disks.iter().find(|d| d.target == target)
    }

    /// The disks the guest can write (not read-only).
    pub fn writable_disks(&self) -> impl Iterator<Item = &DiskDef> {
        self.disks.iter().filter(|d| !d.readonly)
    }

    /// The chipset family of [`DomainDef::machine`]; q35 for an unrecognised name (which
    /// [`DomainDef::validate`] refuses).
    pub fn machine_family(&self) -> MachineFamily {
        MachineFamily::of(&self.machine).unwrap_or(MachineFamily::Q35)
    }

    /// Checks every rule of the subset; use it after building or changing a definition in code
    /// (e.g. adding a hot-plugged disk).
    pub fn validate(&self) -> Result<(), DefError> {
        validate_name(&self.name)?;
        if self.uuid.is_nil() {
            return Err(invalid(
                "uuid",
                self.uuid.to_string(),
                "the nil UUID is not allowed",
            ));
        }
        if !matches!(self.domain_type.as_str(), "qemu" | "kvm") {
            return Err(invalid(
                "domain type",
                &self.domain_type,
                "expected 'qemu' or 'kvm'",
            ));
        }
        if let Some(description) = &self.description {
            check_xml_chars("description", description)?;
            if description.chars().count() > MAX_DESCRIPTION_LEN {
                return Err(invalid(
                    "description",
                    format!("{}...", description.chars().take(32).collect::<String>()),
                    format!("must be at most {MAX_DESCRIPTION_LEN} characters"),
                ));
            }
        }
        if !(MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&self.memory_kib) {
            return Err(invalid(
                "memory",
                format!("{} KiB", self.memory_kib),
                format!("must be between {MIN_MEMORY_KIB} KiB (16 MiB) and {MAX_MEMORY_KIB} KiB"),
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(invalid(
                "vcpu",
                self.vcpus.to_string(),
                "must be between 1 and 64",
            ));
        }
        if self.arch != "x86_64" {
            return Err(invalid("arch", &self.arch, "only x86_64 is supported"));
        }
        if MachineFamily::of(&self.machine).is_none() {
            return Err(invalid(
                "machine",
                &self.machine,
                "expected q35, pc, pc-q35-X.Y or pc-i440fx-X.Y",
            ));
        }
        let mut boot_devs = BTreeSet::new();
        for dev in &self.boot_devs {
            if dev != "hd" {
                return Err(invalid("boot device", dev, "only dev='hd' is supported"));
            }
            if !boot_devs.insert(dev) {
                return Err(DefError::Duplicate(format!("boot device '{dev}'")));
            }
        }
        let mut targets = BTreeSet::new();
        let mut orders = BTreeSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            disk.validate()?;
            if !targets.insert(disk.target.as_str()) {
                return Err(DefError::Duplicate(format!(
                    "disk target '{}'",
                    disk.target
                )));
            }
            if let Some(order) = disk.boot_order {
                if !self.boot_devs.is_empty() {
                    return Err(invalid(
                        "boot order",
                        order.to_string(),
                        "per-disk <boot order> cannot be combined with <os><boot dev>",
                    ));
                }
                if !orders.insert(order) {
                    return Err(DefError::Duplicate(format!("boot order {order}")));
                }
            }
            if let Some(other) = self.disks[..i]
                .iter()
                .find(|o| o.source == disk.source && !(o.readonly && disk.readonly))
            {
                return Err(DefError::Duplicate(format!(
                    "source file '{}' for disks {} and {}, not both read-only",
                    disk.source.display(),
                    other.target,
                    disk.target
                )));
            }
        }
        Ok(())
    }
}

impl DiskDef {
    /// Parses and validates a lone `<disk>` element (as for hot-plug).
    pub fn from_xml(xml: &str) -> Result<DiskDef, DefError> {
        let root = parse_tree(xml)?;
        if root.name != "disk" {
            return Err(DefError::UnknownElement(root.name.clone()));
        }
        parse_disk(&root, "disk")
    }

    /// Writes the canonical XML of this disk (a lone `<disk>` element).
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write_xml(&mut out, 0);
        out
    }

    /// Checks the rules that concern this disk alone.
    pub fn validate(&self) -> Result<(), DefError> {
        let prefix = self.bus.target_prefix();
        let ok = self.target.strip_prefix(prefix).is_some_and(|rest| {
            (1..=2).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_lowercase())
        });
        if !ok {
            return Err(invalid(
                "disk target",
                &self.target,
                format!("{} disks are named {prefix}a..{prefix}zz", self.bus),
            ));
        }
        let Some(source) = self.source.to_str() else {
            return Err(invalid(
                "disk source",
                self.source.to_string_lossy(),
                "not valid UTF-8",
            ));
        };
        if !self.source.is_absolute() {
            return Err(invalid("disk source", source, "must be an absolute path"));
        }
        if source.contains('\0') {
            return Err(invalid("disk source", source, "contains a NUL character"));
        }
        check_xml_chars("disk source", source)?;
        if let Some(order) = self.boot_order
            && !(1..=MAX_BOOT_ORDER).contains(&order)
        {
            return Err(invalid(
                "boot order",
                order.to_string(),
                "must be between 1 and 9999",
            ));
        }
        if self.transient && (self.readonly || self.shareable) {
            return Err(invalid(
                "disk",
                &self.target,
                "a transient disk cannot be read-only or shareable",
            ));
        }
        if self.shareable && !self.readonly && self.format != DiskFormat::Raw {
            return Err(invalid(
                "disk",
                &self.target,
                format!("a writable shareable disk must be raw, not {}", self.format),
            ));
        }
        Ok(())
    }

    fn write_xml(&self, out: &mut String, indent: usize) {
        let pad = " ".repeat(indent);
        out.push_str(&format!("{pad}<disk type='file' device='disk'>\n"));
        out.push_str(&format!(
            "{pad}  <driver name='qemu' type='{}'/>\n",
            self.format
        ));
        out.push_str(&format!(
            "{pad}  <source file='{}'/>\n",
            escape_attr(&self.source.to_string_lossy())
        ));
        out.push_str(&format!(
            "{pad}  <target dev='{}' bus='{}'/>\n",
            escape_attr(&self.target),
            self.bus
        ));
        for (flag, element) in [
            (self.readonly, "readonly"),
            (self.shareable, "shareable"),
            (self.transient, "transient"),
        ] {
            if flag {
                out.push_str(&format!("{pad}  <{element}/>\n"));
            }
        }
        if let Some(order) = self.boot_order {
            out.push_str(&format!("{pad}  <boot order='{order}'/>\n"));
        }
        out.push_str(&format!("{pad}</disk>\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// Validation helpers

fn validate_name(name: &str) -> Result<(), DefError> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.chars().count() > MAX_NAME_LEN {
        Some("must be at most 64 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Some("only letters, digits, '.', '_' and '-' are allowed")
    } else if name.starts_with(['.', '-']) {
        Some("must not start with '.' or '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(invalid("name", name, reason)),
        None => Ok(()),
    }
}

/// Characters XML 1.0 can carry (also as character references).
pub(crate) fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn check_xml_chars(what: &str, value: &str) -> Result<(), DefError> {
    match value.chars().find(|&c| !is_xml_char(c)) {
        Some(c) => Err(invalid(
            what,
            value,
            format!("contains U+{:04X}, which XML cannot carry", u32::from(c)),
        )),
        None => Ok(()),
    }
}

pub(crate) fn xml_trim(s: &str) -> &str {
    s.trim_matches([' ', '\t', '\r', '\n'])
}

// ---------------------------------------------------------------------------------------------
// Escaping

pub(crate) fn escape_text(s: &str) -> Cow<'_, str> {
    escape_with(s, |c| match c {
        '&' => Some("&amp;"),
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        // A literal CR would be normalised away by the reader.
        '\r' => Some("&#13;"),
        _ => None,
    })
}

pub(crate) fn escape_attr(s: &str) -> Cow<'_, str> {
    escape_with(s, |c| match c {
        '&' => Some("&amp;"),
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        '\'' => Some("&apos;"),
        '"' => Some("&quot;"),
        // Literal whitespace would be normalised to spaces by the reader.
        '\t' => Some("&#9;"),
        '\n' => Some("&#10;"),
        '\r' => Some("&#13;"),
        _ => None,
    })
}

fn escape_with(s: &str, map: impl Fn(char) -> Option<&'static str>) -> Cow<'_, str> {
    if !s.chars().any(|c| map(c).is_some()) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match map(c) {
            Some(rep) => out.push_str(rep),
            None => out.push(c),
        }
    }
    Cow::Owned(out)
}

// ---------------------------------------------------------------------------------------------
// Generic element tree

/// An element with its attributes, decoded text and child elements.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) attrs: Vec<(String, String)>,
    pub(crate) text: String,
    pub(crate) children: Vec<Node>,
    /// Byte range of the whole element (start tag to end tag) in the parsed input, so that
    /// callers can keep an element they do not interpret exactly as it was written.
    pub(crate) span: std::ops::Range<usize>,
}

fn malformed(e: impl fmt::Display) -> DefError {
    DefError::Malformed(e.to_string())
}

fn open_node(start: &BytesStart<'_>, at: usize) -> Result<Node, DefError> {
    let name = start.name().as_ref().to_owned();
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(malformed)?;
        let key = attr.key.as_ref().to_owned();
        let value = attr
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(malformed)?;
        attrs.push((key, value.into_owned()));
    }
    Ok(Node {
        name,
        attrs,
        text: String::new(),
        children: Vec::new(),
        span: at..at,
    })
}

pub(crate) fn parse_tree(xml: &str) -> Result<Node, DefError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(DefError::TooLarge {
            limit: MAX_XML_BYTES,
        });
    }
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_comments = true;
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;

    fn close(stack: &mut [Node], root: &mut Option<Node>, node: Node) -> Result<(), DefError> {
        if let Some(parent) = stack.last_mut() {
            parent.children.push(node);
        } else if root.is_some() {
            return Err(malformed("more than one root element"));
        } else {
            *root = Some(node);
        }
        Ok(())
    }
    fn end_of(reader: &Reader<&[u8]>) -> usize {
        usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX)
    }
    fn text(stack: &mut [Node], s: &str) -> Result<(), DefError> {
        match stack.last_mut() {
            Some(top) => top.text.push_str(s),
            None if xml_trim(s).is_empty() => {}
            None => return Err(malformed("text outside the root element")),
        }
        Ok(())
    }

    loop {
        // Text before a tag is its own event, so this is where the next tag starts.
        let at = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
        let event = reader.read_event().map_err(|e| {
            DefError::Malformed(format!("{e} (at byte {})", reader.error_position()))
        })?;
        match event {
            Event::Start(_) | Event::Empty(_) if root.is_some() && stack.is_empty() => {
                return Err(malformed("more than one root element"));
            }
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(malformed("elements nested too deeply"));
                }
                stack.push(open_node(&start, at)?);
            }
            Event::Empty(start) => {
                let mut node = open_node(&start, at)?;
                node.span.end = end_of(&reader);
                close(&mut stack, &mut root, node)?;
            }
            Event::End(_) => {
                let mut node = stack
                    .pop()
                    .ok_or_else(|| malformed("unexpected closing tag"))?;
                node.span.end = end_of(&reader);
                close(&mut stack, &mut root, node)?;
            }
            Event::Text(t) => text(&mut stack, &t.xml10_content())?,
            Event::CData(c) => text(&mut stack, &c.xml10_content())?,
            Event::GeneralRef(r) => {
                let resolved: Cow<'_, str> = match r.resolve_char_ref().map_err(malformed)? {
                    Some(c) if is_xml_char(c) => Cow::Owned(c.to_string()),
                    Some(c) => {
                        return Err(malformed(format!(
                            "character reference to U+{:04X}, which XML cannot carry",
                            u32::from(c)
                        )));
                    }
                    None => Cow::Borrowed(match &*r {
                        "lt" => "<",
                        "gt" => ">",
                        "amp" => "&",
                        "apos" => "'",
                        "quot" => "\"",
                        other => return Err(malformed(format!("undeclared entity &{other};"))),
                    }),
                };
                text(&mut stack, &resolved)?;
            }
            Event::DocType(_) => {
                return Err(malformed(
                    "<!DOCTYPE> is not accepted (no DTDs or entity declarations)",
                ));
            }
            Event::Comment(_) | Event::PI(_) | Event::Decl(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(malformed(format!("element <{}> is not closed", open.name)));
    }
    root.ok_or_else(|| malformed("no root element"))
}

impl Node {
    pub(crate) fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Refuses attributes outside `allowed`.
    pub(crate) fn allow_attrs(&self, path: &str, allowed: &[&str]) -> Result<(), DefError> {
        match self
            .attrs
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()))
        {
            Some((k, _)) => Err(DefError::UnknownAttribute {
                element: path.to_owned(),
                attribute: k.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Refuses child elements (for elements holding only text or nothing).
    pub(crate) fn leaf(&self, path: &str) -> Result<(), DefError> {
        match self.children.first() {
            Some(child) => Err(DefError::UnknownElement(format!("{path}/{}", child.name))),
            None => Ok(()),
        }
    }

    /// Refuses text other than whitespace.
    pub(crate) fn no_text(&self, path: &str) -> Result<(), DefError> {
        let text = xml_trim(&self.text);
        if text.is_empty() {
            Ok(())
        } else {
            Err(invalid(
                format!("text in {path}"),
                text,
                "this element holds no text",
            ))
        }
    }

    /// A leaf with allowed attributes and no text or children.
    pub(crate) fn empty(&self, path: &str, allowed: &[&str]) -> Result<(), DefError> {
        self.allow_attrs(path, allowed)?;
        self.leaf(path)?;
        self.no_text(path)
    }

    pub(crate) fn required_attr(&self, path: &str, name: &str) -> Result<&str, DefError> {
        self.attr(name).ok_or_else(|| {
            DefError::Missing(format!("attribute '{name}' on {}", describe_element(path)))
        })
    }
}

fn once<T>(
    slot: &mut Option<T>,
    path: &str,
    parse: impl FnOnce() -> Result<T, DefError>,
) -> Result<(), DefError> {
    if slot.is_some() {
        return Err(DefError::Duplicate(format!(
            "element {}",
            describe_element(path)
        )));
    }
    *slot = Some(parse()?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Interpretation

fn parse_domain(node: &Node) -> Result<DomainDef, DefError> {
    if node.name != "domain" {
        return Err(DefError::UnknownElement(node.name.clone()));
    }
    let path = "domain";
    node.allow_attrs(path, &["type"])?;
    node.no_text(path)?;
    let domain_type = node.required_attr(path, "type")?;
    if !matches!(domain_type, "qemu" | "kvm") {
        return Err(invalid(
            "domain type",
            domain_type,
            "expected 'qemu' or 'kvm'",
        ));
    }

    let mut name = None;
    let mut uuid = None;
    let mut description = None;
    let mut memory = None;
    let mut current_memory = None;
    let mut vcpus = None;
    let mut os = None;
    let mut disks = None;
    for child in &node.children {
        let p = format!("{path}/{}", child.name);
        match child.name.as_str() {
            "name" => once(&mut name, &p, || {
                child.allow_attrs(&p, &[])?;
                child.leaf(&p)?;
                let name = xml_trim(&child.text);
                validate_name(name)?;
                Ok(name.to_owned())
            })?,
            "uuid" => once(&mut uuid, &p, || {
                child.allow_attrs(&p, &[])?;
                child.leaf(&p)?;
                let text = xml_trim(&child.text);
                Uuid::parse_str(text).map_err(|e| invalid("uuid", text, e.to_string()))
            })?,
            "description" => once(&mut description, &p, || {
                child.allow_attrs(&p, &[])?;
                child.leaf(&p)?;
                Ok(child.text.clone())
            })?,
            "memory" => once(&mut memory, &p, || parse_memory(child, &p))?,
            "currentMemory" => once(&mut current_memory, &p, || parse_memory(child, &p))?,
            "vcpu" => once(&mut vcpus, &p, || {
                child.allow_attrs(&p, &["placement"])?;
                child.leaf(&p)?;
                if let Some(placement) = child.attr("placement")
                    && placement != "static"
                {
                    return Err(invalid(
                        "vcpu placement",
                        placement,
                        "only 'static' is supported",
                    ));
                }
                let text = xml_trim(&child.text);
                match text.parse::<u32>() {
                    Ok(n)
                        if text.bytes().all(|b| b.is_ascii_digit())
                            && (1..=MAX_VCPUS).contains(&n) =>
                    {
                        Ok(n)
                    }
                    _ => Err(invalid("vcpu", text, "must be a number between 1 and 64")),
                }
            })?,
            "os" => once(&mut os, &p, || parse_os(child, &p))?,
            "devices" => once(&mut disks, &p, || parse_devices(child, &p))?,
            _ => return Err(DefError::UnknownElement(p)),
        }
    }
    let name = name.ok_or_else(|| DefError::Missing("element <name> in domain".into()))?;
    let memory_kib =
        memory.ok_or_else(|| DefError::Missing("element <memory> in domain".into()))?;
    if let Some(current) = current_memory
        && current != memory_kib
    {
        return Err(invalid(
            "currentMemory",
            format!("{current} KiB"),
            format!("must equal <memory> ({memory_kib} KiB): memory ballooning is not supported"),
        ));
    }
    let (arch, machine, boot_devs) =
        os.unwrap_or_else(|| ("x86_64".to_owned(), "q35".to_owned(), Vec::new()));
    Ok(DomainDef {
        name,
        uuid: uuid.unwrap_or_else(Uuid::new_v4),
        domain_type: domain_type.to_owned(),
        description,
        memory_kib,
        vcpus: vcpus.unwrap_or(1),
        arch,
        machine,
        boot_devs,
        disks: disks.unwrap_or_default(),
    })
}

/// Bytes per unit, libvirt's meaning, case-insensitive.
fn unit_bytes(unit: &str) -> Option<u128> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "b" | "bytes" => 1,
        "kb" => 1000,
        "k" | "kib" => 1 << 10,
        "mb" => 1000_u128.pow(2),
        "m" | "mib" => 1 << 20,
        "gb" => 1000_u128.pow(3),
        "g" | "gib" => 1 << 30,
        "tb" => 1000_u128.pow(4),
        "t" | "tib" => 1 << 40,
        _ => return None,
    })
}

fn parse_memory(node: &Node, path: &str) -> Result<u64, DefError> {
    node.allow_attrs(path, &["unit"])?;
    node.leaf(path)?;
    let what = describe_element(path);
    let unit = node.attr("unit").unwrap_or("KiB");
    let bytes = unit_bytes(unit).ok_or_else(|| {
        invalid(
            format!("unit of {what}"),
            unit,
            "expected b, bytes, KB, k, KiB, MB, M, MiB, GB, G, GiB, TB, T or TiB",
        )
    })?;
    let text = xml_trim(&node.text);
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(what, text, "must be a non-negative integer"));
    }
    let too_large = || invalid(describe_element(path), text, "too large");
    let value: u128 = text.parse().map_err(|_| too_large())?;
    let kib = value
        .checked_mul(bytes)
        .ok_or_else(too_large)?
        .div_ceil(1024);
    let kib = u64::try_from(kib).map_err(|_| too_large())?;
    if !(MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&kib) {
        return Err(invalid(
            what,
            format!("{text} {unit}"),
            format!("must be between 16 MiB and {} GiB", MAX_MEMORY_KIB >> 20),
        ));
    }
    Ok(kib)
}

fn parse_os(node: &Node, path: &str) -> Result<(String, String, Vec<String>), DefError> {
    node.allow_attrs(path, &[])?;
    node.no_text(path)?;
    let mut ty = None;
    let mut boot_devs: Vec<String> = Vec::new();
    for child in &node.children {
        let p = format!("{path}/{}", child.name);
        match child.name.as_str() {
            "type" => once(&mut ty, &p, || {
                child.allow_attrs(&p, &["arch", "machine"])?;
                child.leaf(&p)?;
                let text = xml_trim(&child.text);
                if text != "hvm" {
                    return Err(invalid("os type", text, "only 'hvm' is supported"));
                }
                let arch = child.attr("arch").unwrap_or("x86_64");
                if arch != "x86_64" {
                    return Err(invalid("arch", arch, "only x86_64 is supported"));
                }
                let machine = child.attr("machine").unwrap_or("q35");
                if MachineFamily::of(machine).is_none() {
                    return Err(invalid(
                        "machine",
                        machine,
                        "expected q35, pc, pc-q35-X.Y or pc-i440fx-X.Y",
                    ));
                }
                Ok((arch.to_owned(), machine.to_owned()))
            })?,
            "boot" => {
                child.empty(&p, &["dev"])?;
                let dev = child.required_attr(&p, "dev")?;
                if dev != "hd" {
                    return Err(invalid("boot device", dev, "only dev='hd' is supported"));
                }
                if boot_devs.iter().any(|d| d == dev) {
                    return Err(DefError::Duplicate(format!("boot device '{dev}'")));
                }
                boot_devs.push(dev.to_owned());
            }
            _ => return Err(DefError::UnknownElement(p)),
        }
    }
    let (arch, machine) =
        ty.ok_or_else(|| DefError::Missing(format!("element <type> in {path}")))?;
    Ok((arch, machine, boot_devs))
}

fn parse_devices(node: &Node, path: &str) -> Result<Vec<DiskDef>, DefError> {
    node.allow_attrs(path, &[])?;
    node.no_text(path)?;
    let mut disks = Vec::new();
    for child in &node.children {
        let p = format!("{path}/{}", child.name);
        match child.name.as_str() {
            "disk" => disks.push(parse_disk(child, &p)?),
            _ => return Err(DefError::UnknownElement(p)),
        }
    }
    Ok(disks)
}

fn parse_disk(node: &Node, path: &str) -> Result<DiskDef, DefError> {
    node.allow_attrs(path, &["type", "device"])?;
    node.no_text(path)?;
    if let Some(ty) = node.attr("type")
        && ty != "file"
    {
        return Err(invalid("disk type", ty, "only type='file' is supported"));
    }
    if let Some(device) = node.attr("device")
        && device != "disk"
    {
        return Err(invalid(
            "disk device",
            device,
            "only device='disk' is supported",
        ));
    }
    let mut format = None;
    let mut source = None;
    let mut target = None;
    let mut readonly = None;
    let mut shareable = None;
    let mut transient = None;
    let mut boot_order = None;
    for child in &node.children {
        let p = format!("{path}/{}", child.name);
        match child.name.as_str() {
            "driver" => once(&mut format, &p, || {
                child.empty(&p, &["name", "type"])?;
                if let Some(name) = child.attr("name")
                    && name != "qemu"
                {
                    return Err(invalid("driver name", name, "only 'qemu' is supported"));
                }
                child.required_attr(&p, "type")?.parse::<DiskFormat>()
            })?,
            "source" => once(&mut source, &p, || {
                child.empty(&p, &["file"])?;
                Ok(PathBuf::from(child.required_attr(&p, "file")?))
            })?,
            "target" => once(&mut target, &p, || {
                child.empty(&p, &["dev", "bus"])?;
                let dev = child.required_attr(&p, "dev")?;
                let bus = match child.attr("bus") {
                    Some(bus) => bus.parse::<DiskBus>()?,
                    None if dev.starts_with("vd") => DiskBus::Virtio,
                    None if dev.starts_with("sd") => DiskBus::Scsi,
                    None => {
                        return Err(invalid(
                            "disk target",
                            dev,
                            "expected vd… (virtio) or sd… (scsi)",
                        ));
                    }
                };
                Ok((dev.to_owned(), bus))
            })?,
            "readonly" => once(&mut readonly, &p, || child.empty(&p, &[]))?,
            "shareable" => once(&mut shareable, &p, || child.empty(&p, &[]))?,
            "transient" => once(&mut transient, &p, || child.empty(&p, &[]))?,
            "boot" => once(&mut boot_order, &p, || {
                child.empty(&p, &["order"])?;
                let order = child.required_attr(&p, "order")?;
                match order.parse::<u32>() {
                    Ok(n) if order.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
                    _ => Err(invalid("boot order", order, "must be a positive integer")),
                }
            })?,
            _ => return Err(DefError::UnknownElement(p)),
        }
    }
    let missing = |what: &str| DefError::Missing(format!("element <{what}> in {path}"));
    let (target, bus) = target.ok_or_else(|| missing("target"))?;
    let disk = DiskDef {
        format: format.ok_or_else(|| missing("driver"))?,
        source: source.ok_or_else(|| missing("source"))?,
        target,
        bus,
        readonly: readonly.is_some(),
        shareable: shareable.is_some(),
        transient: transient.is_some(),
        boot_order,
    };
    disk.validate()?;
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    const FULL: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- a guest -->
<domain type="kvm">
  <name>web-1</name>
  <uuid>8a6f3c1e-0d7b-4c65-9b3e-2f5f4a1c9d10</uuid>
  <description>Web &amp; mail &lt;front&gt; &#x263A; &#65;</description>
  <memory unit='MiB'>1024</memory>
  <currentMemory unit="GiB">1</currentMemory>
  <vcpu placement='static'> 2 </vcpu>
  <?some-pi data?>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/vmsnap/web 1.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file="/srv/shared,data.img"/>
      <target dev='sda' bus='scsi'/>
      <shareable/>
    </disk>
    <disk>
      <driver type='qed'/>
      <source file='/srv/iso.qed'/>
      <target dev='vdb'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/scratch.qcow2'/>
      <target dev='sdb' bus='scsi'/>
      <transient/>
    </disk>
  </devices>
</domain>
"#;

    fn minimal(devices: &str) -> String {
        format!(
            "<domain type='qemu'><name>g</name><memory>65536</memory>\
             <devices>{devices}</devices></domain>"
        )
    }

    fn disk_xml(inner: &str) -> String {
        minimal(&format!("<disk type='file' device='disk'>{inner}</disk>"))
    }

    #[test]
    fn parses_full_example() {
        let def = DomainDef::from_xml(FULL).unwrap();
        assert_eq!(def.name, "web-1");
        assert_eq!(def.uuid.to_string(), "8a6f3c1e-0d7b-4c65-9b3e-2f5f4a1c9d10");
        assert_eq!(def.domain_type, "kvm");
        assert_eq!(
            def.description.as_deref(),
            Some("Web & mail <front> \u{263A} A")
        );
        assert_eq!(def.memory_kib, 1024 * 1024);
        assert_eq!(def.vcpus, 2);
        assert_eq!(def.arch, "x86_64");
        assert_eq!(def.machine, "pc-q35-7.2");
        assert_eq!(def.machine_family(), MachineFamily::Q35);
        assert!(def.boot_devs.is_empty());
        assert_eq!(def.disks.len(), 4);
        let vda = def.disk("vda").unwrap();
        assert_eq!(vda.format, DiskFormat::Qcow2);
        assert_eq!(vda.bus, DiskBus::Virtio);
        assert_eq!(vda.source, Path::new("/var/lib/vmsnap/web 1.qcow2"));
        assert_eq!(vda.boot_order, Some(1));
        let sda = def.disk("sda").unwrap();
        assert_eq!(
            (sda.format, sda.bus, sda.shareable),
            (DiskFormat::Raw, DiskBus::Scsi, true)
        );
        assert_eq!(sda.source, Path::new("/srv/shared,data.img"));
        let vdb = def.disk("vdb").unwrap();
        assert!(vdb.readonly && vdb.bus == DiskBus::Virtio && vdb.format == DiskFormat::Qed);
        assert!(def.disk("sdb").unwrap().transient);
        let writable: Vec<_> = def.writable_disks().map(|d| d.target.as_str()).collect();
        assert_eq!(writable, ["vda", "sda", "sdb"]);
        assert!(def.disk("vdz").is_none());
        assert_eq!(DomainDef::from_xml(&def.to_xml()).unwrap(), def);
    }

    #[test]
    fn description_longer_than_the_limit_is_refused() {
        let with = |n: usize| {
            format!(
                "<domain type='qemu'><name>g</name><description>{}</description>\
                 <memory>65536</memory></domain>",
                "d".repeat(n)
            )
        };
        assert!(DomainDef::from_xml(&with(MAX_DESCRIPTION_LEN)).is_ok());
        let e = DomainDef::from_xml(&with(MAX_DESCRIPTION_LEN + 1)).unwrap_err();
        assert!(e.to_string().contains("at most 4096"), "{e}");
    }

    #[test]
    fn defaults_and_generated_uuid() {
        let a = DomainDef::from_xml(&minimal("")).unwrap();
        let b = DomainDef::from_xml(&minimal("")).unwrap();
        assert_ne!(a.uuid, b.uuid);
        assert_eq!(a.uuid.get_version_num(), 4);
        assert_eq!(
            (a.vcpus, a.arch.as_str(), a.machine.as_str()),
            (1, "x86_64", "q35")
        );
        assert_eq!(a.description, None);
        assert!(a.disks.is_empty());
        assert_eq!(DomainDef::from_xml(&a.to_xml()).unwrap(), a);
    }

    #[test]
    fn canonical_output_is_libvirt_shaped() {
        let def = DomainDef::from_xml(FULL).unwrap();
        let xml = def.to_xml();
        assert!(
            xml.starts_with("<domain type='kvm'>\n  <name>web-1</name>\n"),
            "{xml}"
        );
        assert!(xml.contains("<memory unit='KiB'>1048576</memory>"));
        assert!(xml.contains("<type arch='x86_64' machine='pc-q35-7.2'>hvm</type>"));
        assert!(xml.contains("<driver name='qemu' type='qcow2'/>"));
        assert!(xml.contains("<description>Web &amp; mail &lt;front&gt; \u{263A} A</description>"));
        assert!(xml.contains("<source file='/var/lib/vmsnap/web 1.qcow2'/>"));
    }

    #[test]
    fn memory_units() {
        let kib = |mem: &str| {
            let xml = format!("<domain type='qemu'><name>g</name>{mem}</domain>");
            DomainDef::from_xml(&xml).map(|d| d.memory_kib)
        };
        assert_eq!(kib("<memory>16384</memory>"), Ok(16384));
        assert_eq!(kib("<memory unit='KiB'>16384</memory>"), Ok(16384));
        assert_eq!(kib("<memory unit='k'>20000</memory>"), Ok(20000));
        assert_eq!(kib("<memory unit='M'>32</memory>"), Ok(32768));
        assert_eq!(kib("<memory unit='MiB'>32</memory>"), Ok(32768));
        assert_eq!(kib("<memory unit='MB'>32</memory>"), Ok(31250));
        assert_eq!(kib("<memory unit='GB'>1</memory>"), Ok(976563)); // rounded up
        assert_eq!(kib("<memory unit='G'>1</memory>"), Ok(1 << 20));
        assert_eq!(kib("<memory unit='gib'>1</memory>"), Ok(1 << 20));
        assert_eq!(kib("<memory unit='T'>1</memory>"), Ok(1 << 30));
        assert_eq!(kib("<memory unit='TB'>1</memory>"), Ok(976_562_500));
        assert_eq!(kib("<memory unit='bytes'>16777216</memory>"), Ok(16384));
        assert_eq!(kib("<memory unit='b'>16777217</memory>"), Ok(16385));
        assert!(matches!(
            kib("<memory unit='MiB'>15</memory>"),
            Err(DefError::Invalid { .. })
        ));
        assert!(matches!(
            kib("<memory unit='PiB'>1</memory>"),
            Err(DefError::Invalid { .. })
        ));
        assert!(matches!(
            kib("<memory unit='MiB'>-5</memory>"),
            Err(DefError::Invalid { .. })
        ));
        assert!(matches!(
            kib("<memory unit='TiB'>99999999999999999999</memory>"),
            Err(DefError::Invalid { .. })
        ));
        let err = kib("<memory unit='parsecs'>1</memory>").unwrap_err();
        assert!(err.to_string().contains("parsecs"), "{err}");
        assert_eq!(
            kib(""),
            Err(DefError::Missing("element <memory> in domain".into()))
        );
        assert_eq!(
            kib("<memory unit='MiB'>512</memory><currentMemory unit='KiB'>524288</currentMemory>"),
            Ok(524288)
        );
        let err =
            kib("<memory unit='MiB'>512</memory><currentMemory unit='MiB'>256</currentMemory>")
                .unwrap_err();
        assert!(err.to_string().contains("ballooning"), "{err}");
    }

    #[test]
    fn refuses_unknown_element_naming_it() {
        let err = DomainDef::from_xml(&minimal("<interface type='network'/>")).unwrap_err();
        assert_eq!(
            err,
            DefError::UnknownElement("domain/devices/interface".into())
        );
        assert_eq!(
            err.to_string(),
            "unsupported element <interface> in domain/devices"
        );
        let err = DomainDef::from_xml(&minimal("<emulator>/usr/bin/qemu</emulator>")).unwrap_err();
        assert_eq!(
            err,
            DefError::UnknownElement("domain/devices/emulator".into())
        );
        let err = DomainDef::from_xml(&disk_xml(
            "<driver type='raw'/><source file='/a'/><target dev='vda'/><iotune/>",
        ))
        .unwrap_err();
        assert_eq!(
            err,
            DefError::UnknownElement("domain/devices/disk/iotune".into())
        );
        let err = DomainDef::from_xml(
            "<domain type='qemu'><name>g</name><memory>65536</memory>\
            <features><acpi/></features></domain>",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "unsupported element <features> in domain");
        let err = DomainDef::from_xml("<network/>").unwrap_err();
        assert_eq!(err.to_string(), "unsupported element <network>");
        let err = DomainDef::from_xml(
            "<domain type='qemu'><name>g<x/></name><memory>65536</memory></domain>",
        )
        .unwrap_err();
        assert_eq!(err, DefError::UnknownElement("domain/name/x".into()));
    }

    #[test]
    fn refuses_unknown_attribute() {
        let err = DomainDef::from_xml(&disk_xml(
            "<driver name='qemu' type='raw' cache='none'/><source file='/a'/><target dev='vda'/>",
        ))
        .unwrap_err();
        assert_eq!(
            err,
            DefError::UnknownAttribute {
                element: "domain/devices/disk/driver".into(),
                attribute: "cache".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "unsupported attribute 'cache' on <driver> in domain/devices/disk"
        );
        let err = DomainDef::from_xml(
            "<domain type='qemu' xmlns:qemu='x'><name>g</name><memory>65536</memory></domain>",
        )
        .unwrap_err();
        assert!(
            matches!(err, DefError::UnknownAttribute { attribute, .. } if attribute == "xmlns:qemu")
        );
    }

    #[test]
    fn raw_disk_ok_and_bad_format_refused() {
        let def = DomainDef::from_xml(&disk_xml(
            "<driver name='qemu' type='raw'/><source file='/img/a.raw'/><target dev='vda' bus='virtio'/>",
        ))
        .unwrap();
        assert_eq!(def.disks[0].format, DiskFormat::Raw);
        let err = DomainDef::from_xml(&disk_xml(
            "<driver name='qemu' type='vmdk'/><source file='/a'/><target dev='vda'/>",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("vmdk"), "{err}");
    }

    #[test]
    fn refuses_missing_name() {
        let err =
            DomainDef::from_xml("<domain type='qemu'><memory>65536</memory></domain>").unwrap_err();
        assert_eq!(err, DefError::Missing("element <name> in domain".into()));
        assert_eq!(err.to_string(), "missing element <name> in domain");
        for bad in ["", ".x", "-x", "a b", "é", &"a".repeat(65)] {
            let xml =
                format!("<domain type='qemu'><name>{bad}</name><memory>65536</memory></domain>");
            assert!(
                matches!(DomainDef::from_xml(&xml), Err(DefError::Invalid { ref what, .. }) if what == "name"),
                "{bad}"
            );
        }
        let err = DomainDef::from_xml("<domain><name>g</name><memory>65536</memory></domain>")
            .unwrap_err();
        assert!(matches!(err, DefError::Missing(_)), "{err}");
    }

    #[test]
    fn refuses_bad_targets() {
        for (target, bus) in [
            ("vda", "scsi"),
            ("sda", "virtio"),
            ("hda", "virtio"),
            ("vd", "virtio"),
            ("vdA", "virtio"),
            ("vdabc", "virtio"),
            ("sd1", "scsi"),
        ] {
            let xml = disk_xml(&format!(
                "<driver type='raw'/><source file='/a'/><target dev='{target}' bus='{bus}'/>"
            ));
            let err = DomainDef::from_xml(&xml).unwrap_err();
            assert!(
                matches!(err, DefError::Invalid { ref what, .. } if what == "disk target"),
                "{target}: {err}"
            );
        }
        let err = DomainDef::from_xml(&disk_xml(
            "<driver type='raw'/><source file='/a'/><target dev='vda' bus='ide'/>",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("ide"));
        let err = DomainDef::from_xml(&minimal(
            "<disk><driver type='raw'/><source file='/a'/><target dev='vda'/></disk>\
             <disk><driver type='raw'/><source file='/b'/><target dev='vda'/></disk>",
        ))
        .unwrap_err();
        assert_eq!(err, DefError::Duplicate("disk target 'vda'".into()));
    }

    #[test]
    fn refuses_relative_and_conflicting_sources() {
        let err = DomainDef::from_xml(&disk_xml(
            "<driver type='raw'/><source file='images/a.raw'/><target dev='vda'/>",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
        let err = DomainDef::from_xml(&disk_xml(
            "<driver type='raw'/><source file='/a&#1;'/><target dev='vda'/>",
        ))
        .unwrap_err();
        assert!(
            matches!(err, DefError::Invalid { .. } | DefError::Malformed(_)),
            "{err}"
        );
        let two = |extra_a: &str, extra_b: &str| {
            DomainDef::from_xml(&minimal(&format!(
                "<disk><driver type='raw'/><source file='/same'/><target dev='vda'/>{extra_a}</disk>\
                 <disk><driver type='raw'/><source file='/same'/><target dev='vdb'/>{extra_b}</disk>"
            )))
        };
        assert!(matches!(two("", ""), Err(DefError::Duplicate(_))));
        assert!(matches!(
            two("<readonly/>", ""),
            Err(DefError::Duplicate(_))
        ));
        assert!(two("<readonly/>", "<readonly/>").is_ok());
    }

    #[test]
    fn refuses_duplicates() {
        let err = DomainDef::from_xml(
            "<domain type='qemu'><name>a</name><name>b</name><memory>65536</memory></domain>",
        )
        .unwrap_err();
        assert_eq!(err, DefError::Duplicate("element <name> in domain".into()));
        let err = DomainDef::from_xml(&disk_xml(
            "<driver type='raw'/><source file='/a'/><source file='/b'/><target dev='vda'/>",
        ))
        .unwrap_err();
        assert!(matches!(err, DefError::Duplicate(_)));
        let err = DomainDef::from_xml(&minimal(
            "<disk><driver type='raw'/><source file='/a'/><target dev='vda'/><boot order='1'/></disk>\
             <disk><driver type='raw'/><source file='/b'/><target dev='vdb'/><boot order='1'/></disk>",
        ))
        .unwrap_err();
        assert_eq!(err, DefError::Duplicate("boot order 1".into()));
    }

    #[test]
    fn disk_combinations() {
        let one = |inner: &str| {
            DomainDef::from_xml(&disk_xml(&format!(
                "<source file='/a'/><target dev='vda'/>{inner}"
            )))
        };
        assert!(one("<driver type='qcow2'/><transient/>").is_ok());
        assert!(one("<driver type='qcow2'/><transient/><readonly/>").is_err());
        assert!(one("<driver type='raw'/><transient/><shareable/>").is_err());
        assert!(one("<driver type='qcow2'/><shareable/>").is_err());
        assert!(one("<driver type='qcow2'/><shareable/><readonly/>").is_ok());
        assert!(one("<driver type='raw'/><shareable/>").is_ok());
        assert!(one("<driver type='raw'/><boot order='0'/>").is_err());
        assert!(one("<driver type='raw'/><boot order='x'/>").is_err());
        assert!(one("<driver type='raw'/><readonly>yes</readonly>").is_err());
        assert!(one("<target dev='vdb'/>").is_err());
        let err = one("").unwrap_err();
        assert_eq!(
            err,
            DefError::Missing("element <driver> in domain/devices/disk".into())
        );
        let xml = "<domain type='qemu'><name>g</name><memory>65536</memory>\
            <os><type>hvm</type><boot dev='hd'/></os><devices><disk><driver type='raw'/>\
            <source file='/a'/><target dev='vda'/><boot order='1'/></disk></devices></domain>";
        assert!(DomainDef::from_xml(xml).is_err());
        let xml = "<domain type='qemu'><name>g</name><memory>65536</memory>\
            <os><type machine='pc'>hvm</type><boot dev='hd'/></os></domain>";
        let def = DomainDef::from_xml(xml).unwrap();
        assert_eq!(
            (def.boot_devs.as_slice(), def.machine_family()),
            (&["hd".to_owned()][..], MachineFamily::I440fx)
        );
        for bad_os in [
            "<type>xen</type>",
            "<type arch='aarch64'>hvm</type>",
            "<type machine='virt'>hvm</type>",
            "<type machine='pc-q35-'>hvm</type>",
            "<type>hvm</type><boot dev='cdrom'/>",
            "<boot dev='hd'/>",
        ] {
            let xml = format!(
                "<domain type='qemu'><name>g</name><memory>65536</memory><os>{bad_os}</os></domain>"
            );
            assert!(DomainDef::from_xml(&xml).is_err(), "{bad_os}");
        }
        for good in ["q35", "pc", "pc-q35-7.2", "pc-i440fx-7.2", "pc-q35-2.12.1"] {
            assert!(MachineFamily::of(good).is_some(), "{good}");
        }
    }

    #[test]
    fn refuses_doctype_and_entities() {
        let xml = "<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY x 'boom'>]>\
            <domain type='qemu'><name>&x;</name><memory>65536</memory></domain>";
        assert!(matches!(
            DomainDef::from_xml(xml),
            Err(DefError::Malformed(_))
        ));
        let xml =
            "<!DOCTYPE domain><domain type='qemu'><name>g</name><memory>65536</memory></domain>";
        assert!(matches!(
            DomainDef::from_xml(xml),
            Err(DefError::Malformed(_))
        ));
        let xml = "<domain type='qemu'><name>&x;</name><memory>65536</memory></domain>";
        let err = DomainDef::from_xml(xml).unwrap_err();
        assert!(
            matches!(err, DefError::Malformed(ref m) if m.contains("&x;")),
            "{err}"
        );
        let xml = "<domain type='qemu'><name>g</name><memory>65536</memory>\
            <devices><disk><driver type='raw'/><source file='/&x;'/><target dev='vda'/></disk></devices></domain>";
        assert!(matches!(
            DomainDef::from_xml(xml),
            Err(DefError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_huge_input() {
        let padding = " ".repeat(MAX_XML_BYTES);
        let xml =
            format!("<domain type='qemu'><name>g</name><memory>65536</memory>{padding}</domain>");
        assert_eq!(
            DomainDef::from_xml(&xml),
            Err(DefError::TooLarge {
                limit: MAX_XML_BYTES
            })
        );
        assert_eq!(
            DiskDef::from_xml(&xml),
            Err(DefError::TooLarge {
                limit: MAX_XML_BYTES
            })
        );
        let deep = format!("{}{}", "<a>".repeat(10_000), "</a>".repeat(10_000));
        assert!(matches!(
            DomainDef::from_xml(&deep),
            Err(DefError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_unbalanced_and_garbage() {
        for xml in [
            "<domain type='qemu'><name>g</name><memory>65536</memory>",
            "<domain type='qemu'><name>g</memory></domain>",
            "<domain type='qemu'><name>g</name><memory>65536</memory></domain></domain>",
            "<domain type='qemu'><name>g</name><memory>65536</memory></domain><domain/>",
            "<domain type='qemu' type='kvm'><name>g</name><memory>65536</memory></domain>",
            "text<domain/>",
            "",
            "<domain type='qemu'><name>g</name><memory>65536</memory>\
             <devices><disk><driver type='raw'/><source file='/a/></disk></devices></domain>",
        ] {
            assert!(
                matches!(DomainDef::from_xml(xml), Err(DefError::Malformed(_))),
                "{xml}"
            );
        }
    }

    #[test]
    fn lone_disk() {
        let disk = DiskDef::from_xml(
            "<!-- hot-plug --><disk type='file' device='disk'>\n  <driver name='qemu' type='qcow2'/>\
             <source file='/img/x.qcow2'/><target dev='sdc' bus='scsi'/><boot order='3'/></disk>",
        )
        .unwrap();
        assert_eq!(
            disk,
            DiskDef {
                target: "sdc".into(),
                bus: DiskBus::Scsi,
                format: DiskFormat::Qcow2,
                source: "/img/x.qcow2".into(),
                readonly: false,
                shareable: false,
                transient: false,
                boot_order: Some(3),
            }
        );
        assert_eq!(DiskDef::from_xml(&disk.to_xml()).unwrap(), disk);
        assert!(
            disk.to_xml()
                .starts_with("<disk type='file' device='disk'>\n")
        );
        assert_eq!(
            DiskDef::from_xml("<domain/>"),
            Err(DefError::UnknownElement("domain".into()))
        );
        let err = DiskDef::from_xml(
            "<disk><driver type='raw'/><source file='/a'/><target dev='vda'/><x/></disk>",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "unsupported element <x> in disk");
    }

    #[test]
    fn format_and_bus_strings() {
        for f in DiskFormat::ALL {
            assert_eq!(f.as_str().parse::<DiskFormat>().unwrap(), f);
        }
        assert!("QCOW2".parse::<DiskFormat>().is_err());
        assert_eq!("scsi".parse::<DiskBus>().unwrap(), DiskBus::Scsi);
    }

    // -----------------------------------------------------------------------------------------
    // Round trip over generated definitions

    fn letters(mut i: usize) -> String {
        // 0 → a, 25 → z, 26 → aa, …
        let mut s = Vec::new();
        loop {
            s.push(b'a' + (i % 26) as u8);
            if i < 26 {
                break;
            }
            i = i / 26 - 1;
        }
        s.reverse();
        String::from_utf8(s).unwrap()
    }

    fn xml_string(max: usize) -> impl Strategy<Value = String> {
        let special = prop_oneof![
            Just('&'),
            Just('<'),
            Just('>'),
            Just('"'),
            Just('\''),
            Just(' '),
            Just('\n'),
            Just('\r'),
            Just('\t'),
            Just('é'),
            Just('€'),
            Just('😀'),
            Just(']'),
        ];
        let ch = prop_oneof![
            special,
            any::<char>().prop_filter("XML char", |&c| is_xml_char(c))
        ];
        proptest::collection::vec(ch, 0..max).prop_map(|v| v.into_iter().collect())
    }

    type DiskSeed = (bool, DiskFormat, String, bool, bool, bool, bool);

    fn disk_seed() -> impl Strategy<Value = DiskSeed> {
        (
            any::<bool>(),
            proptest::sample::select(DiskFormat::ALL.to_vec()),
            xml_string(12).prop_map(|s| s.replace(['/', '\0'], "_")),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
    }

    fn domain_strategy() -> impl Strategy<Value = DomainDef> {
        (
            "[A-Za-z0-9_][A-Za-z0-9._-]{0,63}",
            any::<[u8; 16]>(),
            proptest::sample::select(vec!["qemu", "kvm"]),
            proptest::option::of(xml_string(40)),
            MIN_MEMORY_KIB..=MAX_MEMORY_KIB,
            1..=MAX_VCPUS,
            proptest::sample::select(vec!["q35", "pc", "pc-q35-7.2", "pc-i440fx-6.2"]),
            any::<bool>(),
            proptest::collection::vec(disk_seed(), 0..6),
        )
            .prop_map(
                |(name, uuid, ty, description, memory_kib, vcpus, machine, boot_hd, seeds)| {
                    let disks = seeds
                        .into_iter()
                        .enumerate()
                        .map(
                            |(i, (scsi, format, stem, readonly, shareable, transient, boot))| {
                                let bus = if scsi { DiskBus::Scsi } else { DiskBus::Virtio };
                                let (readonly, shareable) = if transient {
                                    (false, false)
                                } else {
                                    (readonly, shareable)
                                };
                                let shareable =
                                    shareable && (readonly || format == DiskFormat::Raw);
                                DiskDef {
                                    target: format!("{}{}", bus.target_prefix(), letters(i)),
                                    bus,
                                    format,
                                    source: PathBuf::from(format!(
                                        "/var/lib/vm snap/{stem} {i}.img"
                                    )),
                                    readonly,
                                    shareable,
                                    transient,
                                    boot_order: (boot && !boot_hd).then_some(i as u32 + 1),
                                }
                            },
                        )
                        .collect();
                    DomainDef {
                        name,
                        uuid: uuid::Builder::from_random_bytes(uuid).into_uuid(),
                        domain_type: ty.to_owned(),
                        description,
                        memory_kib,
                        vcpus,
                        arch: "x86_64".into(),
                        machine: machine.into(),
                        boot_devs: if boot_hd {
                            vec!["hd".into()]
                        } else {
                            Vec::new()
                        },
                        disks,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(def in domain_strategy()) {
            prop_assert_eq!(def.validate(), Ok(()));
            let xml = def.to_xml();
            prop_assert_eq!(DomainDef::from_xml(&xml), Ok(def.clone()), "{}", xml);
            for disk in &def.disks {
                prop_assert_eq!(DiskDef::from_xml(&disk.to_xml()), Ok(disk.clone()));
            }
        }
    }
}
