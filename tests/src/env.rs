//! [`TestEnv`]: one temporary directory, a private bus, a running vmsnapd and a client.
//!
//! Field order is drop order: the daemon stops (and its guests are reaped) before the bus goes
//! away, and the directory is removed last.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::bus::{TestBus, connect, xml_escape};
use crate::client::Client;
use crate::daemon::Daemon;

/// Everything a daemon test needs.
#[derive(Debug)]
pub struct TestEnv {
    /// The `vmsnap` client, bound to the private bus.
    pub client: Client,
    /// The running `vmsnapd`.
    pub daemon: Daemon,
    /// The private bus.
    pub bus: TestBus,
    dir: TempDir,
}

impl TestEnv {
    /// Starts a bus and vmsnapd (waiting for `READY=1`) in a new temporary directory laid out
    /// as `state/`, `run/`, `images/` and `vmsnapd.log`.
    pub fn start() -> Self {
        Self::start_with_hooks(&[])
    }

    /// Like [`TestEnv::start`], with vmsnapd's test hooks `hooks` (e.g. `fail-at=after-memory`)
    /// on top of the harness's `share-rw`.
    pub fn start_with_hooks(hooks: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmsnap-test-")
            .tempdir()
            .expect("cannot create the test directory");
        std::fs::create_dir(dir.path().join("images")).expect("cannot create images/");
        let bus = TestBus::start();
        let daemon = Daemon::start_with_hooks(
            bus.address(),
            &dir.path().join("state"),
            &dir.path().join("run"),
            &dir.path().join("vmsnapd.log"),
            hooks,
        );
        let client = Client::new(bus.address());
        Self {
            client,
            daemon,
            bus,
            dir,
        }
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where tests put their disk images and domain XML.
    pub fn images_dir(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// The private bus address.
    pub fn bus_address(&self) -> &str {
        self.bus.address()
    }

    /// A new zbus connection to the private bus.
    pub async fn connect(&self) -> zbus::Connection {
        connect(self.bus.address())
            .await
            .expect("cannot connect to the private bus")
    }

    /// Writes `xml` to `images/NAME.xml` and returns the path (for `domain define`).
    pub fn write_xml(&self, name: &str, xml: &str) -> PathBuf {
        let path = self.images_dir().join(format!("{name}.xml"));
        std::fs::write(&path, xml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

/// A disk of a domain definition.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Image file (absolute).
    pub path: PathBuf,
    /// Image format, e.g. `qcow2`.
    pub format: String,
    /// Target device, e.g. `vda` (bus `virtio`) or `sda` (bus `scsi`).
    pub target: String,
}

impl DiskSpec {
    /// A disk of `format` at `path` on target `target`.
    pub fn new(path: &Path, format: &str, target: &str) -> Self {
        Self {
            path: path.to_owned(),
            format: format.to_owned(),
            target: target.to_owned(),
        }
    }

    /// The `<disk>` element; the bus follows from the target (`sd*` is scsi, else virtio).
    pub fn xml(&self) -> String {
        let bus = if self.target.starts_with("sd") {
            "scsi"
        } else {
            "virtio"
        };
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{}'/>\
             <source file='{}'/><target dev='{}' bus='{bus}'/></disk>",
            xml_escape(&self.format),
            xml_escape(&self.path.display().to_string()),
            xml_escape(&self.target),
        )
    }
}

/// Domain XML in the subset vmsnapd reads: q35, 64 MiB, one vCPU, the given disks (the first
/// one boots).
pub fn domain_xml(name: &str, disks: &[DiskSpec]) -> String {
    let disks: String = disks.iter().map(DiskSpec::xml).collect();
    format!(
        "<domain type='qemu'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='q35'>hvm</type></os><devices>{disks}</devices></domain>",
        xml_escape(name)
    )
}
