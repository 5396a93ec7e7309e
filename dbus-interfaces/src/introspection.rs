//! The committed introspection XML: how it is made from what the daemon serves, and how the two
//! are compared.
//!
//! zbus writes each member's `///` comment into its introspection as an XML comment in front of
//! the member, and has no way to emit other annotations. The committed file
//! (`org.vmsnap.VmSnap1.xml`) is therefore *derived*: the daemon's introspection with every such
//! comment turned into an `org.freedesktop.DBus.DocString` annotation inside its member, the
//! convention `busctl` users and `gdbus-codegen` know. The `///` comment on the interface
//! method is the single source of a member's doc: documenting a new member is that one comment,
//! then a re-bless (`cargo xtask dbus-xml`).
//!
//! Invariant: [`render`] of a parsed document parses back to the same [`Api`]; docs are
//! normalised (lines trimmed, paragraphs joined into one line each) the same way whether they
//! come from a comment or from an annotation, so the two forms compare equal.

use std::fmt::Write as _;

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// The annotation that carries a member's documentation.
pub const DOC_ANNOTATION: &str = "org.freedesktop.DBus.DocString";

/// Prefix of the interfaces this crate describes; other interfaces are skipped.
const OUR_PREFIX: &str = "org.vmsnap.VmSnap1.";

/// An introspection document could not be read.
#[derive(Debug, thiserror::Error)]
#[error("introspection XML: {0}")]
pub struct IntrospectionError(String);

/// What kind of interface member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A method.
    Method,
    /// A signal.
    Signal,
    /// A property.
    Property,
}

impl Kind {
    /// The element name, `method`, `signal` or `property`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Method => "method",
            Kind::Signal => "signal",
            Kind::Property => "property",
        }
    }
}

/// One `<arg>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    /// The argument's name, when it has one.
    pub name: Option<String>,
    /// Its D-Bus type signature.
    pub ty: String,
    /// `in` or `out` (methods only).
    pub direction: Option<String>,
}

/// One method, signal or property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Method, signal or property.
    pub kind: Kind,
    /// The member's name, e.g. `CreateSnapshot`.
    pub name: String,
    /// Arguments (methods and signals).
    pub args: Vec<Arg>,
    /// Type signature (properties).
    pub ty: Option<String>,
    /// `read`, `write` or `readwrite` (properties).
    pub access: Option<String>,
    /// Annotations other than the doc, in order: (name, value).
    pub annotations: Vec<(String, String)>,
    /// The normalised documentation, if any.
    pub doc: Option<String>,
}

/// One interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Full interface name.
    pub name: String,
    /// Members in document order.
    pub members: Vec<Member>,
}

/// The vmsnap interfaces of one or more introspection documents, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Api {
    /// The interfaces.
    pub interfaces: Vec<Interface>,
}

/// Joins doc lines into paragraphs: each line trimmed, lines of one paragraph joined by a
/// space, paragraphs separated by a blank line (`\n\n`).
pub fn normalise_doc(text: &str) -> Option<String> {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            if !current.is_empty() {
                paragraphs.push(current.join(" "));
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    if !current.is_empty() {
        paragraphs.push(current.join(" "));
    }
    (!paragraphs.is_empty()).then(|| paragraphs.join("\n\n"))
}

fn attr(e: &BytesStart<'_>, key: &str) -> Result<Option<String>, IntrospectionError> {
    for a in e.attributes() {
        let a = a.map_err(|err| IntrospectionError(err.to_string()))?;
        if AsRef::<str>::as_ref(&a.key) == key {
            let v = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| IntrospectionError(err.to_string()))?;
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

fn required(e: &BytesStart<'_>, key: &str) -> Result<String, IntrospectionError> {
    attr(e, key)?.ok_or_else(|| {
        IntrospectionError(format!(
            "<{}> without {key}",
            AsRef::<str>::as_ref(&e.name())
        ))
    })
}

/// Parses the vmsnap interfaces of `docs` (several introspection documents may be given, e.g.
/// one per object; an interface seen twice must be the same each time).
pub fn parse<'a>(docs: impl IntoIterator<Item = &'a str>) -> Result<Api, IntrospectionError> {
    let mut api = Api::default();
    for doc in docs {
        for iface in parse_one(doc)? {
            match api.interfaces.iter().find(|i| i.name == iface.name) {
                Some(seen) if *seen != iface => {
                    return Err(IntrospectionError(format!(
                        "interface {} introspected two different ways",
                        iface.name
                    )));
                }
                Some(_) => {}
                None => api.interfaces.push(iface),
            }
        }
    }
    api.interfaces.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(api)
}

fn parse_one(doc: &str) -> Result<Vec<Interface>, IntrospectionError> {
    let mut reader = Reader::from_str(doc);
    let mut out = Vec::new();
    let mut iface: Option<Interface> = None;
    let mut member: Option<Member> = None;
    let mut pending_doc: Option<String> = None;
    let err = |e: quick_xml::Error| IntrospectionError(e.to_string());
    loop {
        let event = reader.read_event().map_err(err)?;
        let empty = matches!(event, Event::Empty(_));
        match event {
            Event::Eof => break,
            Event::Comment(c) if iface.is_some() && member.is_none() => {
                pending_doc = normalise_doc(AsRef::<str>::as_ref(&c));
            }
            Event::Start(e) | Event::Empty(e) => match AsRef::<str>::as_ref(&e.name()) {
                "interface" => {
                    let name = required(&e, "name")?;
                    if name.starts_with(OUR_PREFIX) && !empty {
                        iface = Some(Interface {
                            name,
                            members: Vec::new(),
                        });
                    }
                }
                tag @ ("method" | "signal" | "property") if iface.is_some() => {
                    let kind = match tag {
                        "method" => Kind::Method,
                        "signal" => Kind::Signal,
                        _ => Kind::Property,
                    };
                    let m = Member {
                        kind,
                        name: required(&e, "name")?,
                        args: Vec::new(),
                        ty: attr(&e, "type")?,
                        access: attr(&e, "access")?,
                        annotations: Vec::new(),
                        doc: pending_doc.take(),
                    };
                    if empty {
                        iface.as_mut().expect("checked").members.push(m);
                    } else {
                        member = Some(m);
                    }
                }
                "arg" => {
                    if let Some(m) = member.as_mut() {
                        m.args.push(Arg {
                            name: attr(&e, "name")?,
                            ty: required(&e, "type")?,
                            direction: attr(&e, "direction")?,
                        });
                    }
                }
                "annotation" => {
                    if let Some(m) = member.as_mut() {
                        let (name, value) = (required(&e, "name")?, required(&e, "value")?);
                        if name == DOC_ANNOTATION {
                            m.doc = normalise_doc(&value);
                        } else {
                            m.annotations.push((name, value));
                        }
                    }
                }
                _ => {}
            },
            Event::End(e) => match AsRef::<str>::as_ref(&e.name()) {
                "method" | "signal" | "property" => {
                    if let (Some(i), Some(m)) = (iface.as_mut(), member.take()) {
                        i.members.push(m);
                    }
                }
                "interface" => {
                    if let Some(i) = iface.take() {
                        out.push(i);
                    }
                    pending_doc = None;
                }
                _ => {}
            },
            _ => {}
        }
    }
    Ok(out)
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("&#10;"),
            c => out.push(c),
        }
    }
    out
}

/// Writes `api` as the committed introspection document: each member's doc as a
/// `DocString` annotation, two-space indentation, no comments.
pub fn render(api: &Api) -> String {
    let mut x = String::from(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
    );
    for i in &api.interfaces {
        let _ = writeln!(x, "  <interface name=\"{}\">", esc(&i.name));
        for m in &i.members {
            let tag = m.kind.as_str();
            let _ = write!(x, "    <{tag} name=\"{}\"", esc(&m.name));
            if let Some(t) = &m.ty {
                let _ = write!(x, " type=\"{}\"", esc(t));
            }
            if let Some(a) = &m.access {
                let _ = write!(x, " access=\"{}\"", esc(a));
            }
            x.push_str(">\n");
            if let Some(d) = &m.doc {
                let _ = writeln!(
                    x,
                    "      <annotation name=\"{DOC_ANNOTATION}\" value=\"{}\"/>",
                    esc(d)
                );
            }
            for (n, v) in &m.annotations {
                let _ = writeln!(
                    x,
                    "      <annotation name=\"{}\" value=\"{}\"/>",
                    esc(n),
                    esc(v)
                );
            }
            for a in &m.args {
                x.push_str("      <arg");
                if let Some(n) = &a.name {
                    let _ = write!(x, " name=\"{}\"", esc(n));
                }
                let _ = write!(x, " type=\"{}\"", esc(&a.ty));
                if let Some(d) = &a.direction {
                    let _ = write!(x, " direction=\"{}\"", esc(d));
                }
                x.push_str("/>\n");
            }
            let _ = writeln!(x, "    </{tag}>");
        }
        x.push_str("  </interface>\n");
    }
    x.push_str("</node>\n");
    x
}

impl Api {
    /// The same API with every doc removed, for comparing shapes only.
    pub fn without_docs(&self) -> Api {
        let mut a = self.clone();
        for m in a.interfaces.iter_mut().flat_map(|i| i.members.iter_mut()) {
            m.doc = None;
        }
        a
    }

    /// `Interface.Member (kind)` for every member without a doc.
    pub fn undocumented(&self) -> Vec<String> {
        self.members()
            .filter(|(_, m)| m.doc.is_none())
            .map(|(i, m)| format!("{}.{} ({})", i, m.name, m.kind.as_str()))
            .collect()
    }

    /// Every member with its interface name.
    pub fn members(&self) -> impl Iterator<Item = (&str, &Member)> {
        self.interfaces
            .iter()
            .flat_map(|i| i.members.iter().map(move |m| (i.name.as_str(), m)))
    }

    /// Human lines describing how `self` differs from `other` in shape (docs ignored):
    /// members only in one of them, or with different arguments, types or annotations.
    pub fn shape_differences(&self, other: &Api) -> Vec<String> {
        let key = |(i, m): (&str, &Member)| (i.to_string(), m.kind, m.name.clone());
        let mine: Vec<_> = self.members().collect();
        let theirs: Vec<_> = other.members().collect();
        let mut out = Vec::new();
        for &(i, m) in &mine {
            match theirs.iter().find(|t| key(**t) == key((i, m))) {
                None => out.push(format!(
                    "only in the first: {i}.{} ({})",
                    m.name,
                    m.kind.as_str()
                )),
                Some((_, t)) => {
                    let (mut a, mut b) = (m.clone(), (*t).clone());
                    a.doc = None;
                    b.doc = None;
                    if a != b {
                        out.push(format!("differs: {i}.{} ({})", m.name, m.kind.as_str()));
                    }
                }
            }
        }
        for &(i, t) in &theirs {
            if !mine.iter().any(|m| key(*m) == key((i, t))) {
                out.push(format!(
                    "only in the second: {i}.{} ({})",
                    t.name,
                    t.kind.as_str()
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like zbus's output: comment in front of the member, indented doc lines.
    const GENERATED: &str = r#"<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping">
    </method>
  </interface>
  <interface name="org.vmsnap.VmSnap1.Thing">
    <!--
     Does a thing with `<xml>` & "quotes";
     over two lines.

     Second paragraph.
     -->
    <method name="Do">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg type="o" direction="out"/>
    </method>
    <signal name="Done">
      <arg name="what" type="s"/>
    </signal>
    <!--
     A size.
     -->
    <property name="Size" type="t" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="false"/>
    </property>
  </interface>
</node>
"#;

    #[test]
    fn introspection_comments_become_doc_annotations_that_parse_back() {
        let api = parse([GENERATED]).unwrap();
        assert_eq!(api.interfaces.len(), 1, "only vmsnap interfaces are kept");
        let doc = api.interfaces[0].members[0].doc.clone().unwrap();
        assert_eq!(
            doc,
            "Does a thing with `<xml>` & \"quotes\"; over two lines.\n\nSecond paragraph."
        );
        let rendered = render(&api);
        assert!(rendered.contains(
            "<annotation name=\"org.freedesktop.DBus.DocString\" value=\"Does a thing with \
             `&lt;xml&gt;` &amp; &quot;quotes&quot;; over two lines.&#10;&#10;Second paragraph.\"/>"
        ));
        assert!(!rendered.contains("<!--"));
        assert_eq!(parse([rendered.as_str()]).unwrap(), api);
    }

    #[test]
    fn introspection_member_without_comment_is_reported_undocumented() {
        let api = parse([GENERATED]).unwrap();
        assert_eq!(
            api.undocumented(),
            vec!["org.vmsnap.VmSnap1.Thing.Done (signal)".to_string()]
        );
    }

    #[test]
    fn introspection_shape_difference_names_the_member() {
        let a = parse([GENERATED]).unwrap();
        let b = parse([GENERATED
            .replace("name=\"what\" type=\"s\"", "name=\"what\" type=\"u\"")
            .as_str()])
        .unwrap();
        assert_eq!(
            a.shape_differences(&b),
            vec!["differs: org.vmsnap.VmSnap1.Thing.Done (signal)".to_string()]
        );
        assert!(a.shape_differences(&a.without_docs()).is_empty());
    }

    #[test]
    fn introspection_interface_seen_two_ways_is_refused() {
        let other = GENERATED.replace("name=\"Done\"", "name=\"Finished\"");
        assert!(parse([GENERATED, other.as_str()]).is_err());
    }
}
