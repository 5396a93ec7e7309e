//! A private system-type D-Bus daemon with the project's policy, and zbus helpers.
//!
//! [`TestBus`] generates a bus configuration that mirrors the stock system bus
//! (`/usr/share/dbus-1/system.conf`): owning names and sending method calls are denied by
//! default, signals and replies are allowed. Its holes are the project's own
//! `systemd/share/dbus-1/system.d/org.vmsnap.VmSnap1.conf`, included as is, so the tests exercise
//! the policy that gets installed, and polkit's policy file when polkit is installed. It listens on a unix socket in its own temporary directory,
//! has no service activation, and is killed and reaped on drop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};

use futures_util::StreamExt;
use tempfile::TempDir;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use zbus::{Connection, MatchRule, Message, MessageStream, OwnedVariant};

use crate::deadline::Deadline;
use crate::process::ChildGuard;

/// The project's policy file, as it is installed under `/usr/share/dbus-1/system.d/`.
pub fn policy_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd/share/dbus-1/system.d/org.vmsnap.VmSnap1.conf")
}

/// A running private `dbus-daemon`.
#[derive(Debug)]
pub struct TestBus {
    child: ChildGuard,
    address: String,
    dir: TempDir,
}

impl TestBus {
    /// Starts the bus and waits (up to the step deadline) until it prints its address.
    pub fn start() -> Self {
        let policy = policy_file();
        assert!(
            policy.is_file(),
            "the D-Bus policy {} is missing",
            policy.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("vmsnap-bus-")
            .tempdir()
            .expect("cannot create the bus directory");
        let config = dir.path().join("bus.conf");
        let socket = dir.path().join("system_bus_socket");
        std::fs::write(&config, bus_config(&socket, &policy)).expect("cannot write bus.conf");
        let log = dir.path().join("dbus-daemon.log");
        let log_file = std::fs::File::create(&log).expect("cannot create dbus-daemon.log");

        let mut cmd = Command::new("dbus-daemon");
        cmd.arg(format!("--config-file={}", config.display()))
            .args(["--print-address", "--nofork", "--nopidfile", "--nosyslog"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        let mut child = ChildGuard::spawn("dbus-daemon", &mut cmd).unwrap_or_else(|e| {
            panic!("cannot start dbus-daemon (is package dbus installed?): {e}")
        });

        // The first stdout line is the address. The reader thread then drains stdout until the
        // daemon exits, so the daemon never writes into a closed pipe.
        let stdout = child.child_mut().stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let address = match rx.recv_timeout(Deadline::step().remaining()) {
            Ok(Some(Ok(line))) if !line.trim().is_empty() => line.trim().to_owned(),
            other => {
                let _ = child.kill();
                panic!(
                    "dbus-daemon gave no address ({other:?}); its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Self {
            child,
            address,
            dir,
        }
    }

    /// The bus address, e.g. `unix:path=/tmp/vmsnap-bus-XXXX/system_bus_socket,guid=...`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The generated configuration file.
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("bus.conf")
    }

    /// The pid of `dbus-daemon`.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// What `dbus-daemon` wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dbus-daemon.log")).unwrap_or_default()
    }
}

/// polkit's own system-bus policy (who may own its name and call it), included when present
/// so that a test can run a real polkitd on the private bus (see [`crate::polkit`]).
const POLKIT_BUS_POLICY: &str = "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf";

/// The bus configuration: a system bus as Debian ships it, minus the parts that need a real
/// system (running as `messagebus`, a pid file, syslog, the activation helper), plus the
/// project's policy.
fn bus_config(socket: &Path, policy: &Path) -> String {
    let socket = xml_escape(&socket.display().to_string());
    let policy = xml_escape(&policy.display().to_string());
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{policy}</include>
  <include ignore_missing="yes">{POLKIT_BUS_POLICY}</include>
</busconfig>
"#
    )
}

/// Escapes text for an XML element body or attribute.
pub fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// Connects to the bus at `address` (a private [`TestBus`] or any D-Bus address).
pub async fn connect(address: &str) -> zbus::Result<Connection> {
    // zbus 6 reports an invalid address from `build`, not from `address`.
    zbus::connection::Builder::address(address).build().await
}

/// One recorded signal.
#[derive(Debug, Clone)]
pub struct Signal {
    /// Object path of the emitter.
    pub path: String,
    /// Interface of the signal.
    pub interface: String,
    /// Signal name, e.g. `PropertiesChanged`.
    pub member: String,
    /// Unique bus name of the sender.
    pub sender: String,
    /// The whole message, to deserialize the body.
    pub message: Message,
}

/// The body of `org.freedesktop.DBus.Properties.PropertiesChanged`.
#[derive(Debug, Clone)]
pub struct PropertiesChanged {
    /// The interface whose properties changed.
    pub interface: String,
    /// New values.
    pub changed: HashMap<String, OwnedVariant>,
    /// Properties that changed without their value being sent.
    pub invalidated: Vec<String>,
}

impl Signal {
    /// The decoded body if this is a `PropertiesChanged` signal.
    pub fn properties_changed(&self) -> Option<PropertiesChanged> {
        if self.interface != "org.freedesktop.DBus.Properties" || self.member != "PropertiesChanged"
        {
            return None;
        }
        let (interface, changed, invalidated): (
            String,
            HashMap<String, OwnedVariant>,
            Vec<String>,
        ) = self.message.body().deserialize().ok()?;
        Some(PropertiesChanged {
            interface,
            changed,
            invalidated,
        })
    }

    /// For a `PropertiesChanged` signal that carries `property`, its new value as a string if it
    /// is one (e.g. the `State` of a domain).
    pub fn changed_string(&self, property: &str) -> Option<String> {
        let changed = self.properties_changed()?;
        let value = changed.changed.get(property)?;
        String::try_from(value.try_clone().ok()?).ok()
    }
}

/// Records the signals that match a rule from the moment it is created, and lets a test wait
/// for one that satisfies a predicate.
///
/// [`EventRecorder::wait_for`] consumes: it returns the first matching signal after the one the
/// previous `wait_for` returned, so waiting twice for "state is paused" needs two such signals.
#[derive(Debug)]
pub struct EventRecorder {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Shared {
    events: Mutex<Vec<Signal>>,
    cursor: Mutex<usize>,
    notify: Notify,
}

impl EventRecorder {
    /// Starts recording the signals that match `rule` on `connection`. The match is installed
    /// on the bus before this returns, so nothing emitted afterwards is missed.
    pub async fn start(connection: &Connection, rule: MatchRule<'static>) -> zbus::Result<Self> {
        let mut stream = MessageStream::for_match_rule(rule, connection, None).await?;
        let shared = Arc::new(Shared::default());
        let writer = shared.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let header = message.header();
                let signal = Signal {
                    path: header.path().map(|p| p.to_string()).unwrap_or_default(),
                    interface: header
                        .interface()
                        .map(|i| i.to_string())
                        .unwrap_or_default(),
                    member: header.member().map(|m| m.to_string()).unwrap_or_default(),
                    sender: header.sender().map(|s| s.to_string()).unwrap_or_default(),
                    message: message.clone(),
                };
                writer.events.lock().expect("recorder lock").push(signal);
                writer.notify.notify_waiters();
            }
        });
        Ok(Self { shared, task })
    }

    /// Records every signal emitted under the vmsnap root path (`/org/vmsnap/VmSnap1`).
    pub async fn vmsnap(connection: &Connection) -> zbus::Result<Self> {
        let rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .path_namespace(vmsnap_dbus::names::ROOT_PATH)
            .build()?;
        Self::start(connection, rule).await
    }

    /// Every signal recorded so far.
    pub fn events(&self) -> Vec<Signal> {
        self.shared.events.lock().expect("recorder lock").clone()
    }

    /// Waits for the next signal, after the one the previous call returned, that satisfies
    /// `pred`; panics with `what` and the recorded signals at `deadline`.
    pub async fn wait_for(
        &self,
        deadline: Deadline,
        what: &str,
        pred: impl Fn(&Signal) -> bool,
    ) -> Signal {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            // Register interest before looking, so a signal pushed in between wakes us.
            notified.as_mut().enable();
            if let Some(signal) = self.take_match(&pred) {
                return signal;
            }
            let timeout = tokio::time::Instant::from_std(deadline.instant());
            if tokio::time::timeout_at(timeout, notified).await.is_err() {
                let seen: Vec<String> = self
                    .events()
                    .iter()
                    .map(|s| format!("  {} {}.{}", s.path, s.interface, s.member))
                    .collect();
                panic!(
                    "timed out waiting for signal: {what}; recorded:\n{}",
                    seen.join("\n")
                );
            }
        }
    }

    /// Waits for a `PropertiesChanged` of `path` that sets the string property `property` to
    /// `value` (for example a domain's `State` to `paused`).
    pub async fn wait_for_property(
        &self,
        deadline: Deadline,
        path: &str,
        property: &str,
        value: &str,
    ) -> Signal {
        let what = format!("{path} {property} = {value}");
        self.wait_for(deadline, &what, |s| {
            s.path == path && s.changed_string(property).as_deref() == Some(value)
        })
        .await
    }

    fn take_match(&self, pred: &impl Fn(&Signal) -> bool) -> Option<Signal> {
        let events = self.shared.events.lock().expect("recorder lock");
        let mut cursor = self.shared.cursor.lock().expect("recorder lock");
        let offset = events[*cursor..].iter().position(pred)?;
        *cursor += offset + 1;
        Some(events[*cursor - 1].clone())
    }
}

impl Drop for EventRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
