//! The daemon's own method-call dispatch on the bus connection.
//!
//! zbus's object server keeps a node per object path (with its standard interfaces, about a
//! kilobyte each) and answers `UnknownObject` for any path it has no node for, before any hook
//! of ours could run. With a snapshot object per record that cost dominated the daemon's memory
//! at ten thousand records. So the bus connection has no zbus object server: this module reads
//! its method calls and routes them.
//!
//! - Root, domain and job objects are still `#[interface]` types kept in a *registry*: the
//!   object server of a private in-process connection pair that no caller can reach. A call is
//!   looked up there and run through the interface's generated dispatch code with the bus
//!   connection, so replies and the signal emitters of `#[zbus(signal_emitter)]` arguments use
//!   the bus connection.
//! - Snapshot objects are not kept anywhere: a snapshot path is resolved against the domain's
//!   published snapshot map, and a [`SnapshotIface`] made for the one call.
//! - `Properties`, `Introspectable` and `Peer` are answered here for every object, and the
//!   path prefixes between objects are introspectable nodes, as the object server made them.
//!
//! Invariants:
//! - Anything the registry's objects emit must use [`bus_emitter`]: an emitter of the registry
//!   connection reaches nobody (its peer end only drains and drops what it is sent).
//! - Every call gets exactly one reply, unless it asked for none.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures_util::StreamExt;
use vmsnap_dbus::names::{ROOT_PATH, job_path};
use zbus::connection::Builder;
use zbus::connection::socket::Channel;
use zbus::fdo;
use zbus::message::{Flags, Header, Type};
use zbus::names::MemberName;
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::{
    BoxDBusError, Connection, Guid, MatchRule, Message, MessageStream, ObjectServer, OwnedVariant,
    Variant,
};

use super::domain::DomainIface;
use super::job::JobIface;
use super::manager::ManagerIface;
use super::object_manager::ObjectManagerIface;
use super::snapshot::SnapshotIface;
use crate::catalog::{DomainId, SnapshotId};
use crate::service::Service;

const PEER: &str = "org.freedesktop.DBus.Peer";
const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

/// The standard interfaces every object has, as the D-Bus specification defines them.
const STANDARD_XML: &str = r#"  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping">
    </method>
    <method name="GetMachineId">
      <arg type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg type="v" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <method name="GetAll">
      <arg name="interface_name" type="s" direction="in"/>
      <arg type="a{sv}" direction="out"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface_name" type="s"/>
      <arg name="changed_properties" type="a{sv}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>
"#;

/// The bus connection the registry's objects emit through (set once, by [`start`]).
static BUS: OnceLock<Connection> = OnceLock::new();

/// An emitter for `path` on the bus connection; `None` before [`start`] or for a bad path.
pub fn bus_emitter(path: &str) -> Option<SignalEmitter<'static>> {
    let conn = BUS.get()?;
    SignalEmitter::new(conn, path.to_owned()).ok()
}

/// Emits one `PropertiesChanged` on the bus for the properties `names` of `iface` (the
/// object at `path`) with their current values; nothing when `names` is empty. The
/// `*_changed` helpers `#[interface]` generates must not be used instead: they start zbus's
/// object server on their emitter's connection, which on the bus connection would answer
/// every call this module answers.
pub async fn properties_changed<I: Interface>(
    server: &ObjectServer,
    iface: &I,
    path: &str,
    names: &[&str],
) {
    let Some(bus) = BUS.get() else { return };
    let Ok(emitter) = SignalEmitter::new(bus, path.to_owned()) else {
        return;
    };
    let mut changed = HashMap::new();
    for name in names {
        if let Some(Ok(v)) = iface.get(name, server, bus, None, &emitter).await {
            changed.insert(*name, v);
        }
    }
    if changed.is_empty() {
        return;
    }
    // A failed emission only means nobody was told; the properties stay right.
    let _ = emitter
        .emit(
            PROPERTIES,
            "PropertiesChanged",
            &(I::name(), changed, Vec::<&str>::new()),
        )
        .await;
}

/// `SizeOnDisk` answers of snapshot objects, reused for a few seconds (the objects themselves
/// live for one call).
#[derive(Default)]
pub struct SizeCache(Mutex<HashMap<(DomainId, SnapshotId), (Instant, u64)>>);

impl SizeCache {
    /// The size of snapshot `key`, computed by `compute` unless a recent answer is kept.
    pub fn get_or(&self, key: (DomainId, SnapshotId), compute: impl FnOnce() -> u64) -> u64 {
        let ttl = super::snapshot::SIZE_CACHE_TTL;
        if let Some((at, size)) = self.0.lock().expect("size cache poisoned").get(&key)
            && at.elapsed() < ttl
        {
            return *size;
        }
        let size = compute();
        let mut m = self.0.lock().expect("size cache poisoned");
        if m.len() >= 4096 {
            m.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        m.insert(key, (Instant::now(), size));
        size
    }
}

/// The registry: an object server nobody can call, on one end of an in-process pair.
pub struct Registry {
    conn: Connection,
    /// The other end; it reads and drops whatever the registry connection sends.
    _peer: Connection,
}

impl Registry {
    /// Makes the connection pair.
    pub async fn new() -> zbus::Result<Registry> {
        let (a, b) = Channel::pair();
        let guid = Guid::generate();
        let (conn, peer) = tokio::try_join!(
            Builder::authenticated_socket(a, guid.clone()).p2p().build(),
            Builder::authenticated_socket(b, guid).p2p().build(),
        )?;
        Ok(Registry { conn, _peer: peer })
    }

    /// The registry's object server.
    pub fn server(&self) -> &ObjectServer {
        self.conn.object_server()
    }
}

/// What the dispatcher needs for every call.
struct Dispatcher {
    bus: Connection,
    registry: Registry,
    service: Arc<Service>,
    sizes: Arc<SizeCache>,
}

/// Starts answering the method calls that reach `bus`, with the objects of `registry` and the
/// snapshots of `service`'s domains. Call it before the well-known name is requested.
pub async fn start(
    bus: Connection,
    registry: Registry,
    service: Arc<Service>,
    sizes: Arc<SizeCache>,
) -> zbus::Result<()> {
    let _ = BUS.set(bus.clone());
    let mut rule = MatchRule::builder().msg_type(Type::MethodCall);
    if let Some(name) = bus.unique_name() {
        rule = rule.destination(name.to_owned());
    }
    let mut calls = MessageStream::for_match_rule(rule.build()?, &bus, None).await?;
    let d = Arc::new(Dispatcher {
        bus,
        registry,
        service,
        sizes,
    });
    tokio::spawn(async move {
        while let Some(msg) = calls.next().await {
            let Ok(msg) = msg else { continue };
            let d = d.clone();
            // Calls run concurrently, as zbus runs `#[interface]` methods.
            tokio::spawn(async move { d.dispatch(msg).await });
        }
    });
    Ok(())
}

/// The object a path names.
enum Object {
    /// The root: `Manager` and `ObjectManager`.
    Root,
    /// A domain object.
    Domain,
    /// A job object.
    Job,
    /// A snapshot object, made for this call.
    Snapshot(SnapshotIface),
    /// A prefix of object paths, with the names of the nodes below it.
    Node(Vec<String>),
}

fn unknown_object(path: &str) -> BoxDBusError {
    Box::new(fdo::Error::UnknownObject(format!(
        "Unknown object '{path}'"
    )))
}

fn unknown_interface(name: &str) -> BoxDBusError {
    Box::new(fdo::Error::UnknownInterface(format!(
        "Unknown interface '{name}'"
    )))
}

fn unknown_method(name: &str) -> BoxDBusError {
    Box::new(fdo::Error::UnknownMethod(format!(
        "Unknown method '{name}'"
    )))
}

fn unknown_property(name: &str) -> BoxDBusError {
    Box::new(fdo::Error::UnknownProperty(format!(
        "Unknown property '{name}'"
    )))
}

fn failed(msg: impl Into<String>) -> BoxDBusError {
    Box::new(fdo::Error::Failed(msg.into()))
}

/// Runs method `member` of `iface` for `msg`; the generated code sends the reply.
async fn call_method<I: Interface>(
    iface: &I,
    server: &ObjectServer,
    bus: &Connection,
    msg: &Message,
    member: MemberName<'_>,
) -> Result<(), BoxDBusError> {
    match iface.call(server, bus, msg, member.clone()) {
        DispatchResult::Async(f) => f.await,
        DispatchResult::NotFound | DispatchResult::RequiresMut => {
            Err(unknown_method(member.as_str()))
        }
    }
}

/// What one `Properties` call does with one interface.
enum PropertyCall<'m> {
    Get(String),
    GetAll,
    Set(String, Variant<'m>),
}

/// The answer to a `Properties` call.
enum PropertyReply {
    Value(OwnedVariant),
    All(HashMap<String, OwnedVariant>),
    Done,
}

async fn property_call<I: Interface>(
    iface: &I,
    server: &ObjectServer,
    bus: &Connection,
    hdr: &Header<'_>,
    emitter: &SignalEmitter<'_>,
    call: &PropertyCall<'_>,
) -> Result<PropertyReply, BoxDBusError> {
    match call {
        PropertyCall::Get(name) => match iface.get(name, server, bus, Some(hdr), emitter).await {
            Some(v) => Ok(PropertyReply::Value(v?)),
            None => Err(unknown_property(name)),
        },
        PropertyCall::GetAll => Ok(PropertyReply::All(
            iface.get_all(server, bus, Some(hdr), emitter).await?,
        )),
        PropertyCall::Set(name, value) => {
            match iface.set(name, value, server, bus, Some(hdr), emitter) {
                DispatchResult::Async(f) => f.await.map(|()| PropertyReply::Done),
                // No object of ours has a setter that needs `&mut self`.
                DispatchResult::NotFound | DispatchResult::RequiresMut => {
                    Err(unknown_property(name))
                }
            }
        }
    }
}

/// Parses the `n` in `prefix/n`.
fn id_after(path: &str, prefix: &str) -> Option<i64> {
    let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

fn names<T: ToString>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    items.into_iter().map(|i| i.to_string()).collect()
}

impl Dispatcher {
    async fn dispatch(&self, msg: Message) {
        let hdr = msg.header();
        if let Err(e) = self.route(&msg, &hdr).await {
            tracing::debug!(
                path = ?hdr.path(),
                interface = ?hdr.interface(),
                member = ?hdr.member(),
                error = %e,
                "method call refused"
            );
            if hdr.primary().flags().contains(Flags::NO_REPLY_EXPECTED) {
                return;
            }
            if let Err(err) = self.bus.reply_dbus_error(&hdr, e).await {
                tracing::debug!(error = %err, "could not send an error reply");
            }
        }
    }

    /// What `path` names, or `None`.
    async fn resolve(&self, path: &str) -> Option<Object> {
        let domains = format!("{ROOT_PATH}/domain");
        let jobs = format!("{ROOT_PATH}/job");
        match path {
            "/" => return Some(Object::Node(vec!["org".into()])),
            "/org" => return Some(Object::Node(vec!["vmsnap".into()])),
            "/org/vmsnap" => return Some(Object::Node(vec!["VmSnap1".into()])),
            ROOT_PATH => return Some(Object::Root),
            _ => {}
        }
        // A prefix node exists while something is below it, as in zbus's object tree.
        if path == domains {
            let ids = names(self.service.domains().into_iter().map(|h| h.id().0));
            return (!ids.is_empty()).then_some(Object::Node(ids));
        }
        if path == jobs {
            let ids = names(self.service.jobs.ids().into_iter().map(|j| j.0));
            return (!ids.is_empty()).then_some(Object::Node(ids));
        }
        if let Some(id) = id_after(path, &jobs) {
            let server = self.registry.server();
            return match server
                .interface::<_, JobIface>(job_path_of(id).as_str())
                .await
            {
                Ok(_) => Some(Object::Job),
                Err(_) => None,
            };
        }
        if let Some(id) = id_after(path, &domains) {
            return self.service.get(DomainId(id)).map(|_| Object::Domain);
        }
        // `…/domain/N/snapshot` and `…/domain/N/snapshot/M`.
        let rest = path.strip_prefix(&domains)?.strip_prefix('/')?;
        let (d, rest) = rest.split_once('/')?;
        let d: i64 = d
            .parse()
            .ok()
            .filter(|_| d.bytes().all(|b| b.is_ascii_digit()))?;
        let handle = self.service.get(DomainId(d))?;
        match rest.strip_prefix("snapshot")? {
            "" => {
                let ids = handle.with_info(|i| names(i.snapshots.keys().map(|s| s.0)));
                (!ids.is_empty()).then_some(Object::Node(ids))
            }
            s => {
                let id = id_after(s, "")?;
                let exists = handle.with_info(|i| i.snapshots.contains_key(&SnapshotId(id)));
                exists.then(|| {
                    Object::Snapshot(SnapshotIface::new(
                        self.service.clone(),
                        handle,
                        SnapshotId(id),
                        self.sizes.clone(),
                    ))
                })
            }
        }
    }

    /// The child node names of a domain object: `snapshot` when it has any.
    fn domain_children(&self, path: &str) -> Vec<String> {
        let domains = format!("{ROOT_PATH}/domain");
        let has = id_after(path, &domains)
            .and_then(|id| self.service.get(DomainId(id)))
            .is_some_and(|h| h.with_info(|i| !i.snapshots.is_empty()));
        match has {
            true => vec!["snapshot".into()],
            false => Vec::new(),
        }
    }

    async fn route(&self, msg: &Message, hdr: &Header<'_>) -> Result<(), BoxDBusError> {
        let path = hdr.path().ok_or_else(|| failed("Missing object path"))?;
        let member = hdr.member().ok_or_else(|| failed("Missing member"))?;
        let iface = hdr.interface().ok_or_else(|| failed("Missing interface"))?;
        let path = path.as_str();
        if iface.as_str() == PEER {
            // Answered on any path, as the specification allows.
            return match member.as_str() {
                "Ping" => Ok(self.bus.reply(hdr, &()).await?),
                "GetMachineId" => {
                    let id = machine_id().ok_or_else(|| failed("no machine id is known"))?;
                    Ok(self.bus.reply(hdr, &id).await?)
                }
                other => Err(unknown_method(other)),
            };
        }
        let object = self
            .resolve(path)
            .await
            .ok_or_else(|| unknown_object(path))?;
        match iface.as_str() {
            INTROSPECTABLE => match member.as_str() {
                "Introspect" => {
                    let xml = self.introspect(path, &object).await;
                    Ok(self.bus.reply(hdr, &xml).await?)
                }
                other => Err(unknown_method(other)),
            },
            PROPERTIES => self.properties(msg, hdr, path, &object).await,
            name => self.method(msg, path, name, member, &object).await,
        }
    }

    async fn method(
        &self,
        msg: &Message,
        path: &str,
        iface: &str,
        member: &MemberName<'_>,
        object: &Object,
    ) -> Result<(), BoxDBusError> {
        let server = self.registry.server();
        let bus = &self.bus;
        let m = member.clone();
        match object {
            Object::Root if iface == ManagerIface::name().as_str() => {
                let r = server.interface::<_, ManagerIface>(ROOT_PATH).await?;
                call_method(&*r.get().await, server, bus, msg, m).await
            }
            Object::Root if iface == ObjectManagerIface::name().as_str() => {
                let r = server.interface::<_, ObjectManagerIface>(ROOT_PATH).await?;
                call_method(&*r.get().await, server, bus, msg, m).await
            }
            Object::Domain if iface == DomainIface::name().as_str() => {
                let r = server.interface::<_, DomainIface>(path).await?;
                call_method(&*r.get().await, server, bus, msg, m).await
            }
            Object::Job if iface == JobIface::name().as_str() => {
                let r = server.interface::<_, JobIface>(path).await?;
                call_method(&*r.get().await, server, bus, msg, m).await
            }
            Object::Snapshot(s) if iface == SnapshotIface::name().as_str() => {
                call_method(s, server, bus, msg, m).await
            }
            _ => Err(unknown_interface(iface)),
        }
    }

    async fn properties(
        &self,
        msg: &Message,
        hdr: &Header<'_>,
        path: &str,
        object: &Object,
    ) -> Result<(), BoxDBusError> {
        let body = msg.body();
        let member = hdr.member().ok_or_else(|| failed("Missing member"))?;
        let (iface, call) = match member.as_str() {
            "Get" => {
                let (i, p): (String, String) = body.deserialize()?;
                (i, PropertyCall::Get(p))
            }
            "GetAll" => {
                let (i,): (String,) = body.deserialize()?;
                (i, PropertyCall::GetAll)
            }
            "Set" => {
                let (i, p, v): (String, String, Variant<'_>) = body.deserialize()?;
                (i, PropertyCall::Set(p, v))
            }
            other => return Err(unknown_method(other)),
        };
        match self
            .property_reply(hdr, path, &iface, object, &call)
            .await?
        {
            PropertyReply::Value(v) => Ok(self.bus.reply(hdr, &v).await?),
            PropertyReply::All(all) => Ok(self.bus.reply(hdr, &all).await?),
            PropertyReply::Done => Ok(self.bus.reply(hdr, &()).await?),
        }
    }

    async fn property_reply(
        &self,
        hdr: &Header<'_>,
        path: &str,
        iface: &str,
        object: &Object,
        call: &PropertyCall<'_>,
    ) -> Result<PropertyReply, BoxDBusError> {
        let server = self.registry.server();
        let bus = &self.bus;
        // A setter announces its own change through `*_changed` (see `properties_changed`
        // for why that must not reach the bus connection); the domain's forwarder announces
        // it on the bus once the change is published.
        let emitter = match call {
            PropertyCall::Set(..) => SignalEmitter::new(&self.registry.conn, path.to_owned())?,
            _ => SignalEmitter::new(bus, path.to_owned())?,
        };
        let e = &emitter;
        match object {
            Object::Root if iface == ManagerIface::name().as_str() => {
                let r = server.interface::<_, ManagerIface>(ROOT_PATH).await?;
                property_call(&*r.get().await, server, bus, hdr, e, call).await
            }
            Object::Root if iface == ObjectManagerIface::name().as_str() => {
                let r = server.interface::<_, ObjectManagerIface>(ROOT_PATH).await?;
                property_call(&*r.get().await, server, bus, hdr, e, call).await
            }
            Object::Domain if iface == DomainIface::name().as_str() => {
                let r = server.interface::<_, DomainIface>(path).await?;
                property_call(&*r.get().await, server, bus, hdr, e, call).await
            }
            Object::Job if iface == JobIface::name().as_str() => {
                let r = server.interface::<_, JobIface>(path).await?;
                property_call(&*r.get().await, server, bus, hdr, e, call).await
            }
            Object::Snapshot(s) if iface == SnapshotIface::name().as_str() => {
                property_call(s, server, bus, hdr, e, call).await
            }
            _ => Err(unknown_interface(iface)),
        }
    }

    async fn introspect(&self, path: &str, object: &Object) -> String {
        let mut xml = String::from(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
             \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
        );
        xml.push_str(STANDARD_XML);
        let server = self.registry.server();
        let children = match object {
            Object::Root => {
                if let Ok(r) = server.interface::<_, ObjectManagerIface>(ROOT_PATH).await {
                    r.get().await.introspect_to_writer(&mut xml, 2);
                }
                if let Ok(r) = server.interface::<_, ManagerIface>(ROOT_PATH).await {
                    r.get().await.introspect_to_writer(&mut xml, 2);
                }
                let mut c = Vec::new();
                if !self.service.domains().is_empty() {
                    c.push("domain".to_string());
                }
                if !self.service.jobs.ids().is_empty() {
                    c.push("job".to_string());
                }
                c
            }
            Object::Domain => {
                if let Ok(r) = server.interface::<_, DomainIface>(path).await {
                    r.get().await.introspect_to_writer(&mut xml, 2);
                }
                self.domain_children(path)
            }
            Object::Job => {
                if let Ok(r) = server.interface::<_, JobIface>(path).await {
                    r.get().await.introspect_to_writer(&mut xml, 2);
                }
                Vec::new()
            }
            Object::Snapshot(s) => {
                s.introspect_to_writer(&mut xml, 2);
                Vec::new()
            }
            Object::Node(c) => c.clone(),
        };
        for c in children {
            let _ = writeln!(xml, "  <node name=\"{c}\"/>");
        }
        xml.push_str("</node>\n");
        xml
    }
}

fn job_path_of(id: i64) -> String {
    job_path(u64::try_from(id).unwrap_or(0))
}

/// The machine id, as `Peer.GetMachineId` reports it.
fn machine_id() -> Option<String> {
    ["/var/lib/dbus/machine-id", "/etc/machine-id"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_after_takes_only_a_number_right_below_the_prefix() {
        let p = "/org/vmsnap/VmSnap1/job";
        assert_eq!(id_after("/org/vmsnap/VmSnap1/job/17", p), Some(17));
        for other in [
            "/org/vmsnap/VmSnap1/job",
            "/org/vmsnap/VmSnap1/job/",
            "/org/vmsnap/VmSnap1/job/1/2",
            "/org/vmsnap/VmSnap1/job/x1",
            "/org/vmsnap/VmSnap1/job/-1",
            "/org/vmsnap/VmSnap1/jobs/1",
            "/org/vmsnap/VmSnap1/job/99999999999999999999",
        ] {
            assert_eq!(id_after(other, p), None, "{other}");
        }
    }

    #[test]
    fn size_cache_reuses_an_answer_per_snapshot() {
        let cache = SizeCache::default();
        let a = (DomainId(1), SnapshotId(1));
        let b = (DomainId(1), SnapshotId(2));
        assert_eq!(cache.get_or(a, || 10), 10);
        assert_eq!(cache.get_or(a, || 20), 10, "reused within the time to live");
        assert_eq!(
            cache.get_or(b, || 30),
            30,
            "another snapshot computes its own"
        );
    }
}
