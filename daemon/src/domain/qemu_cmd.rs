//! The QEMU command line for a [`DomainDef`], and the QMP arguments to hot-plug a disk.
//!
//! Responsibility: turn a validated definition into `qemu-system-x86_64` arguments (QEMU 7.2
//! syntax) and into `blockdev-add` / `device_add` argument objects; nothing here starts
//! processes or talks QMP.
//!
//! Invariants and naming, relied on by the rest of the daemon:
//! - every disk has a protocol node [`file_node_name`] (`file-vda`) under a format node
//!   [`format_node_name`] (`drive-vda`); the guest device, whose id is the target (`vda`),
//!   always attaches to `drive-vda`. For a transient disk the original format node is named
//!   [`base_node_name`] (`base-vda`) and is read-only, and `drive-vda` is a qcow2 overlay on top
//!   of it, so snapshots and block jobs address the same node name in both cases;
//! - backing files of qcow2 images are opened by QEMU from the image header, never listed;
//! - `-blockdev` and `-device` use QEMU's JSON syntax, so any file name (commas, spaces,
//!   quotes) is passed safely; the QMP socket path is comma-escaped for `-chardev`;
//! - the `virtio-scsi-pci` controller [`SCSI_CONTROLLER_ID`] is always present, so SCSI disks
//!   can be hot-plugged later; a SCSI disk `sdX` sits at `scsi-id` 0, `lun` = index of `X`
//!   (libvirt's layout), so its address depends only on its target;
//! - on q35 machines [`HOTPLUG_ROOT_PORTS`] empty `pcie-root-port`s (`hp0`..`hp3`, all on slot
//!   0x1c) are added, since PCIe hot-plug needs a port; cold-plugged virtio disks sit on `pcie.0`
//!   (and so cannot be hot-unplugged). On `pc` machines hot-plug goes straight to `pci.0`.
//!
//! Hot-unplug caveat: `device_del` of a `virtio-blk-pci` device is a request to the guest
//! (ACPI/PCIe hot-plug); a guest without an OS, or one that ignores it, never completes it and
//! no `DEVICE_DELETED` event arrives. `scsi-hd` unplug completes at once, without the guest.
//!
//! QEMU's stdout and stderr are not redirected by these arguments: the caller sends them to
//! [`LaunchPaths::log_file`] (`-msg timestamp=on` timestamps QEMU's messages).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::def::{DiskBus, DiskDef, DiskFormat, DomainDef, MachineFamily};

/// The emulator binary the arguments are meant for.
pub const QEMU_SYSTEM_BINARY: &str = "qemu-system-x86_64";
/// The image tool, used to create transient overlays.
pub const QEMU_IMG_BINARY: &str = "qemu-img";
/// Number of empty `pcie-root-port`s added on q35 for hot-plugging virtio disks.
pub const HOTPLUG_ROOT_PORTS: usize = 4;
/// The id of the `virtio-scsi-pci` controller; its bus is `scsi0.0`.
pub const SCSI_CONTROLLER_ID: &str = "scsi0";
/// The id of the QMP character device on the command line.
pub const QMP_CHARDEV_ID: &str = "qmp";
/// The PCI slot of the hot-plug root ports on q35 (one function per port).
const ROOT_PORT_SLOT: u8 = 0x1c;

/// The accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// The TCG emulator (slow, always available).
    Tcg,
    /// KVM if QEMU can open `/dev/kvm`, else TCG: for a QEMU whose device access the daemon
    /// cannot test itself (one started in a systemd unit of its own).
    KvmOrTcg,
}

impl Accel {
    /// The spelling of `-machine …,accel=`: `kvm`, `tcg` or `kvm:tcg` (tried in order).
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::KvmOrTcg => "kvm:tcg",
        }
    }
}

/// The environment variable that names the accelerator instead of detecting it (`kvm`, `tcg`
/// or `kvm:tcg`): for hosts where `/dev/kvm` opens but KVM is slower than TCG (nested
/// virtualisation), and for tests, which run every guest under TCG as CI machines do.
pub const ACCEL_ENV: &str = "VMSNAPD_ACCEL";

/// The accelerator [`ACCEL_ENV`] names, if it is set to one of the known spellings.
pub fn accel_from_env() -> Option<Accel> {
    match std::env::var(ACCEL_ENV).ok()?.as_str() {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        "kvm:tcg" => Some(Accel::KvmOrTcg),
        other => {
            tracing::warn!(
                value = other,
                "{ACCEL_ENV} is not kvm, tcg or kvm:tcg; ignored"
            );
            None
        }
    }
}

/// [`Accel::Kvm`] when `/dev/kvm` can be opened read-write, else [`Accel::Tcg`].
pub fn detect_accel() -> Accel {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Accel::Kvm,
        Err(_) => Accel::Tcg,
    }
}

/// Files of one QEMU process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPaths {
    /// The QMP Unix socket QEMU listens on (at most 107 bytes, a Unix socket limit).
    pub qmp_socket: PathBuf,
    /// Where QEMU writes its pid.
    pub pidfile: PathBuf,
    /// Where the caller sends QEMU's stdout and stderr (not an argument of QEMU).
    pub log_file: PathBuf,
}

/// How to start one QEMU process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchOptions {
    /// Start with the CPUs stopped (`-S`); `cont` starts them.
    pub paused: bool,
    /// Wait for `migrate-incoming` (`-incoming defer`), e.g. to load a saved state.
    pub incoming_defer: bool,
    /// The overlay image of each transient disk, by target; exactly the transient disks must
    /// be listed. Each overlay must exist already (see [`transient_overlay_create_args`]).
    pub transient_overlays: BTreeMap<String, PathBuf>,
}

/// Why arguments could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdError {
    /// A transient disk has no overlay in [`LaunchOptions::transient_overlays`].
    #[error("transient disk {target} has no overlay image")]
    MissingOverlay {
        /// The disk's target.
        target: String,
    },
    /// An overlay was given for a disk that does not exist or is not transient.
    #[error("overlay given for {target}, which is not a transient disk")]
    UnexpectedOverlay {
        /// The target the overlay was given for.
        target: String,
    },
    /// A path cannot be passed to QEMU's JSON syntax.
    #[error("path {0:?} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    /// A virtio disk is hot-plugged on q35 without a free root port.
    #[error("hot-plugging virtio disk {target} on q35 needs a free root port")]
    NoRootPort {
        /// The disk's target.
        target: String,
    },
}

/// The format node a disk's device attaches to: `drive-vda`.
pub fn format_node_name(target: &str) -> String {
    format!("drive-{target}")
}

/// The protocol (file) node of a disk: `file-vda`.
pub fn file_node_name(target: &str) -> String {
    format!("file-{target}")
}

/// The read-only format node under a transient disk's overlay: `base-vda`.
pub fn base_node_name(target: &str) -> String {
    format!("base-{target}")
}

/// The ids of the hot-plug root ports of this definition: `hp0`..`hp3` on q35, none on pc.
pub fn hotplug_root_ports(def: &DomainDef) -> Vec<String> {
    match def.machine_family() {
        MachineFamily::Q35 => (0..HOTPLUG_ROOT_PORTS).map(|i| format!("hp{i}")).collect(),
        MachineFamily::I440fx => Vec::new(),
    }
}

fn path_str(path: &Path) -> Result<&str, CmdError> {
    path.to_str()
        .ok_or_else(|| CmdError::NonUtf8Path(path.to_owned()))
}

/// QMP `blockdev-add` argument objects for a disk, in creation order: the protocol node, the
/// format node, and for a transient disk the overlay (whose `file` is given inline).
///
/// `overlay` must be given exactly for a transient disk.
pub fn blockdev_add_args(disk: &DiskDef, overlay: Option<&Path>) -> Result<Vec<Value>, CmdError> {
    let target = disk.target.as_str();
    let source = path_str(&disk.source)?;
    match (disk.transient, overlay) {
        (false, None) => {
            let ro = disk.readonly;
            Ok(vec![
                json!({"driver": "file", "filename": source, "node-name": file_node_name(target),
                       "read-only": ro}),
                json!({"driver": disk.format.as_str(), "file": file_node_name(target),
                       "node-name": format_node_name(target), "read-only": ro}),
            ])
        }
        (true, Some(overlay)) => Ok(vec![
            json!({"driver": "file", "filename": source, "node-name": file_node_name(target),
                   "read-only": true}),
            json!({"driver": disk.format.as_str(), "file": file_node_name(target),
                   "node-name": base_node_name(target), "read-only": true}),
            json!({"driver": DiskFormat::Qcow2.as_str(), "node-name": format_node_name(target),
                   "file": {"driver": "file", "filename": path_str(overlay)?},
                   "backing": base_node_name(target), "read-only": false}),
        ]),
        (true, None) => Err(CmdError::MissingOverlay {
            target: target.to_owned(),
        }),
        (false, Some(_)) => Err(CmdError::UnexpectedOverlay {
            target: target.to_owned(),
        }),
    }
}

/// The LUN of a SCSI target: `sda` → 0, `sdz` → 25, `sdaa` → 26.
fn scsi_lun(target: &str) -> u32 {
    let letters = target.strip_prefix("sd").unwrap_or(target);
    let bijective = letters.bytes().fold(0u32, |acc, b| {
        acc.saturating_mul(26)
            .saturating_add(u32::from(b.saturating_sub(b'a')) + 1)
    });
    bijective.saturating_sub(1)
}

/// The guest device of a disk, without a PCI bus (QEMU picks the address when cold-plugged).
fn device_json(disk: &DiskDef) -> Value {
    let target = disk.target.as_str();
    let mut dev = match disk.bus {
        DiskBus::Virtio => json!({"driver": "virtio-blk-pci"}),
        DiskBus::Scsi => json!({
            "driver": "scsi-hd",
            "bus": format!("{SCSI_CONTROLLER_ID}.0"),
            "channel": 0,
            "scsi-id": 0,
            "lun": scsi_lun(target),
        }),
    };
    let map = dev.as_object_mut().expect("device is an object");
    map.insert("drive".into(), format_node_name(target).into());
    map.insert("id".into(), target.into());
    if disk.shareable || crate::testhooks::enabled("share-rw") {
        map.insert("share-rw".into(), true.into());
    }
    if let Some(order) = disk.boot_order {
        map.insert("bootindex".into(), order.into());
    }
    dev
}

/// QMP `device_add` arguments to hot-plug `disk` (after its `blockdev-add`s) into a running
/// guest of `def`'s machine type.
///
/// A virtio disk on q35 goes on `root_port`, a free one of [`hotplug_root_ports`] (the caller
/// tracks which are in use); on pc it goes on `pci.0`. A SCSI disk goes on the SCSI controller
/// and `root_port` is ignored.
pub fn device_add_args(
    def: &DomainDef,
    disk: &DiskDef,
    root_port: Option<&str>,
) -> Result<Value, CmdError> {
    let mut dev = device_json(disk);
    if disk.bus == DiskBus::Virtio {
        let bus = match def.machine_family() {
            MachineFamily::I440fx => "pci.0",
            MachineFamily::Q35 => root_port.ok_or_else(|| CmdError::NoRootPort {
                target: disk.target.clone(),
            })?,
        };
        dev.as_object_mut()
            .expect("device is an object")
            .insert("bus".into(), bus.into());
    }
    Ok(dev)
}

/// `qemu-img` arguments (without the program) creating the overlay of a transient disk: a
/// qcow2 image backed by the disk's source (the backing is overridden to `base-…` at start).
pub fn transient_overlay_create_args(disk: &DiskDef, overlay: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["create", "-f", "qcow2", "-F", disk.format.as_str(), "-b"]
        .into_iter()
        .map(OsString::from)
        .collect();
    args.push(disk.source.clone().into_os_string());
    args.push(overlay.as_os_str().to_owned());
    args
}

/// Escapes a QemuOpts value: `,` is doubled.
fn qemu_opt_escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// The arguments (without the program, [`QEMU_SYSTEM_BINARY`]) starting `def`.
///
/// Memory is rounded up to whole MiB. The QMP monitor is a `-chardev socket` server on
/// `paths.qmp_socket` that does not wait for a client.
pub fn qemu_args(
    def: &DomainDef,
    paths: &LaunchPaths,
    accel: Accel,
    opts: &LaunchOptions,
) -> Result<Vec<OsString>, CmdError> {
    for target in opts.transient_overlays.keys() {
        if !def.disk(target).is_some_and(|d| d.transient) {
            return Err(CmdError::UnexpectedOverlay {
                target: target.clone(),
            });
        }
    }
    let mut args: Vec<OsString> = Vec::new();
    let push = |a: &mut Vec<OsString>, items: &[&str]| {
        a.extend(items.iter().map(OsString::from));
    };
    push(&mut args, &["-name", &format!("guest={}", def.name)]);
    push(&mut args, &["-uuid", &def.uuid.hyphenated().to_string()]);
    push(
        &mut args,
        &[
            "-machine",
            &format!("{},accel={}", def.machine, accel.as_str()),
        ],
    );
    push(
        &mut args,
        &["-m", &def.memory_kib.div_ceil(1024).to_string()],
    );
    push(&mut args, &["-smp", &def.vcpus.to_string()]);
    push(
        &mut args,
        &["-nodefaults", "-no-user-config", "-display", "none"],
    );
    push(&mut args, &["-msg", "timestamp=on"]);
    args.push("-pidfile".into());
    args.push(paths.pidfile.clone().into_os_string());
    let mut chardev = OsString::from(format!("socket,id={QMP_CHARDEV_ID},path="));
    chardev.push(qemu_opt_escape(paths.qmp_socket.as_os_str()));
    chardev.push(",server=on,wait=off");
    args.push("-chardev".into());
    args.push(chardev);
    push(
        &mut args,
        &["-mon", &format!("chardev={QMP_CHARDEV_ID},mode=control")],
    );
    if !def.boot_devs.is_empty() {
        push(&mut args, &["-boot", "order=c"]);
    }

    let device = |a: &mut Vec<OsString>, v: Value| {
        a.push("-device".into());
        a.push(v.to_string().into());
    };
    for (i, port) in hotplug_root_ports(def).into_iter().enumerate() {
        let mut dev = json!({
            "driver": "pcie-root-port",
            "id": port,
            "bus": "pcie.0",
            "chassis": i + 1,
            "port": 0x10 + i,
            "addr": format!("{ROOT_PORT_SLOT:#x}.{i:#x}"),
        });
        if i == 0 {
            dev["multifunction"] = true.into();
        }
        device(&mut args, dev);
    }
    device(
        &mut args,
        json!({"driver": "virtio-scsi-pci", "id": SCSI_CONTROLLER_ID}),
    );

    for disk in &def.disks {
        let overlay = opts
            .transient_overlays
            .get(&disk.target)
            .map(PathBuf::as_path);
        for node in blockdev_add_args(disk, overlay)? {
            args.push("-blockdev".into());
            args.push(node.to_string().into());
        }
        device(&mut args, device_json(disk));
    }

    if opts.paused {
        args.push("-S".into());
    }
    if opts.incoming_defer {
        push(&mut args, &["-incoming", "defer"]);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::def::DiskFormat;

    fn disk(target: &str, bus: DiskBus, format: DiskFormat, source: &str) -> DiskDef {
        DiskDef {
            target: target.into(),
            bus,
            format,
            source: source.into(),
            readonly: false,
            shareable: false,
            transient: false,
            boot_order: None,
        }
    }

    fn def(machine: &str, disks: Vec<DiskDef>) -> DomainDef {
        let def = DomainDef {
            name: "guest-1".into(),
            uuid: "8a6f3c1e-0d7b-4c65-9b3e-2f5f4a1c9d10".parse().unwrap(),
            domain_type: "qemu".into(),
            description: None,
            memory_kib: 100_000,
            vcpus: 2,
            arch: "x86_64".into(),
            machine: machine.into(),
            boot_devs: Vec::new(),
            disks,
        };
        def.validate().unwrap();
        def
    }

    fn paths(dir: &Path) -> LaunchPaths {
        LaunchPaths {
            qmp_socket: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            log_file: dir.join("qemu.log"),
        }
    }

    /// The JSON values following each occurrence of `flag`.
    fn json_after(args: &[OsString], flag: &str) -> Vec<Value> {
        args.windows(2)
            .filter(|w| w[0] == flag && w[1].to_str().unwrap().starts_with('{'))
            .map(|w| serde_json::from_str(w[1].to_str().unwrap()).unwrap())
            .collect()
    }

    fn value_after(args: &[OsString], flag: &str) -> Option<String> {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].to_str().unwrap().to_owned())
    }

    #[test]
    fn kvm_or_tcg_lets_qemu_fall_back() {
        let def = def("q35", vec![]);
        let args = qemu_args(
            &def,
            &paths(Path::new("/r")),
            Accel::KvmOrTcg,
            &LaunchOptions::default(),
        )
        .unwrap();
        assert_eq!(value_after(&args, "-machine").unwrap(), "q35,accel=kvm:tcg");
    }

    #[test]
    fn two_disk_command_line() {
        let mut vda = disk("vda", DiskBus::Virtio, DiskFormat::Qcow2, "/img/a, b.qcow2");
        vda.boot_order = Some(1);
        let mut sdb = disk("sdb", DiskBus::Scsi, DiskFormat::Raw, "/img/\"c\".raw");
        sdb.shareable = true;
        let def = def("q35", vec![vda, sdb]);
        let args = qemu_args(
            &def,
            &paths(Path::new("/run/x,y")),
            Accel::Tcg,
            &LaunchOptions::default(),
        )
        .unwrap();
        assert_eq!(value_after(&args, "-name").unwrap(), "guest=guest-1");
        assert_eq!(
            value_after(&args, "-uuid").unwrap(),
            "8a6f3c1e-0d7b-4c65-9b3e-2f5f4a1c9d10"
        );
        assert_eq!(value_after(&args, "-machine").unwrap(), "q35,accel=tcg");
        assert_eq!(value_after(&args, "-m").unwrap(), "98"); // 100000 KiB rounded up
        assert_eq!(value_after(&args, "-smp").unwrap(), "2");
        assert_eq!(value_after(&args, "-pidfile").unwrap(), "/run/x,y/qemu.pid");
        assert_eq!(
            value_after(&args, "-chardev").unwrap(),
            "socket,id=qmp,path=/run/x,,y/qmp.sock,server=on,wait=off"
        );
        for flag in ["-nodefaults", "-no-user-config"] {
            assert!(args.iter().any(|a| a == flag));
        }
        assert!(
            !args
                .iter()
                .any(|a| a == "-S" || a == "-incoming" || a == "-boot")
        );

        let blockdevs = json_after(&args, "-blockdev");
        assert_eq!(
            blockdevs,
            vec![
                json!({"driver":"file","filename":"/img/a, b.qcow2","node-name":"file-vda","read-only":false}),
                json!({"driver":"qcow2","file":"file-vda","node-name":"drive-vda","read-only":false}),
                json!({"driver":"file","filename":"/img/\"c\".raw","node-name":"file-sdb","read-only":false}),
                json!({"driver":"raw","file":"file-sdb","node-name":"drive-sdb","read-only":false}),
            ]
        );
        let devices = json_after(&args, "-device");
        let ports: Vec<_> = devices
            .iter()
            .filter(|d| d["driver"] == "pcie-root-port")
            .collect();
        assert_eq!(ports.len(), HOTPLUG_ROOT_PORTS);
        let mut addrs: Vec<_> = ports.iter().map(|p| p["addr"].as_str().unwrap()).collect();
        addrs.dedup();
        assert_eq!(addrs.len(), HOTPLUG_ROOT_PORTS);
        assert_eq!(ports[3]["id"], "hp3");
        assert_eq!(ports[3]["chassis"], 4);
        assert!(devices.contains(&json!({"driver":"virtio-scsi-pci","id":"scsi0"})));
        assert!(devices.contains(
            &json!({"driver":"virtio-blk-pci","drive":"drive-vda","id":"vda","bootindex":1})
        ));
        assert!(
            devices.contains(&json!({"driver":"scsi-hd","bus":"scsi0.0","channel":0,
            "scsi-id":0,"lun":1,"drive":"drive-sdb","id":"sdb","share-rw":true}))
        );
    }

    #[test]
    fn options_pc_machine_and_boot() {
        let mut def = def(
            "pc-i440fx-7.2",
            vec![disk("vda", DiskBus::Virtio, DiskFormat::Raw, "/a")],
        );
        def.boot_devs = vec!["hd".into()];
        def.memory_kib = 512 * 1024;
        let opts = LaunchOptions {
            paused: true,
            incoming_defer: true,
            ..Default::default()
        };
        let args = qemu_args(&def, &paths(Path::new("/r")), Accel::Kvm, &opts).unwrap();
        assert_eq!(
            value_after(&args, "-machine").unwrap(),
            "pc-i440fx-7.2,accel=kvm"
        );
        assert_eq!(value_after(&args, "-m").unwrap(), "512");
        assert_eq!(value_after(&args, "-incoming").unwrap(), "defer");
        assert_eq!(value_after(&args, "-boot").unwrap(), "order=c");
        assert!(args.iter().any(|a| a == "-S"));
        let devices = json_after(&args, "-device");
        assert!(devices.iter().all(|d| d["driver"] != "pcie-root-port"));
        assert!(devices.iter().any(|d| d["driver"] == "virtio-scsi-pci"));
        assert!(hotplug_root_ports(&def).is_empty());
    }

    #[test]
    fn readonly_and_transient_layering() {
        let mut ro = disk("vdb", DiskBus::Virtio, DiskFormat::Qcow2, "/ro.qcow2");
        ro.readonly = true;
        assert_eq!(
            blockdev_add_args(&ro, None).unwrap(),
            vec![
                json!({"driver":"file","filename":"/ro.qcow2","node-name":"file-vdb","read-only":true}),
                json!({"driver":"qcow2","file":"file-vdb","node-name":"drive-vdb","read-only":true}),
            ]
        );
        assert_eq!(
            device_json(&ro),
            json!({"driver":"virtio-blk-pci","drive":"drive-vdb","id":"vdb"})
        );

        let mut tr = disk("vdc", DiskBus::Virtio, DiskFormat::Raw, "/base.raw");
        tr.transient = true;
        let overlay = Path::new("/run/ovl vdc.qcow2");
        assert_eq!(
            blockdev_add_args(&tr, Some(overlay)).unwrap(),
            vec![
                json!({"driver":"file","filename":"/base.raw","node-name":"file-vdc","read-only":true}),
                json!({"driver":"raw","file":"file-vdc","node-name":"base-vdc","read-only":true}),
                json!({"driver":"qcow2","node-name":"drive-vdc","read-only":false,
                       "file":{"driver":"file","filename":"/run/ovl vdc.qcow2"},"backing":"base-vdc"}),
            ]
        );
        assert_eq!(
            blockdev_add_args(&tr, None),
            Err(CmdError::MissingOverlay {
                target: "vdc".into()
            })
        );
        assert_eq!(
            blockdev_add_args(&ro, Some(overlay)),
            Err(CmdError::UnexpectedOverlay {
                target: "vdb".into()
            })
        );

        let def = def("q35", vec![ro, tr.clone()]);
        let p = paths(Path::new("/r"));
        assert_eq!(
            qemu_args(&def, &p, Accel::Tcg, &LaunchOptions::default()),
            Err(CmdError::MissingOverlay {
                target: "vdc".into()
            })
        );
        let mut opts = LaunchOptions::default();
        opts.transient_overlays.insert("vdc".into(), overlay.into());
        let args = qemu_args(&def, &p, Accel::Tcg, &opts).unwrap();
        assert_eq!(json_after(&args, "-blockdev").len(), 5);
        opts.transient_overlays.insert("vdb".into(), overlay.into());
        assert_eq!(
            qemu_args(&def, &p, Accel::Tcg, &opts),
            Err(CmdError::UnexpectedOverlay {
                target: "vdb".into()
            })
        );

        let create = transient_overlay_create_args(&tr, overlay);
        assert_eq!(
            create,
            [
                "create",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                "/base.raw",
                "/run/ovl vdc.qcow2"
            ]
            .map(OsString::from)
        );
    }

    #[test]
    fn hotplug_args() {
        let q35 = def("q35", Vec::new());
        let pc = def("pc", Vec::new());
        let vdd = disk("vdd", DiskBus::Virtio, DiskFormat::Qcow2, "/d");
        assert_eq!(
            device_add_args(&q35, &vdd, Some("hp2")).unwrap(),
            json!({"driver":"virtio-blk-pci","drive":"drive-vdd","id":"vdd","bus":"hp2"})
        );
        assert_eq!(
            device_add_args(&q35, &vdd, None),
            Err(CmdError::NoRootPort {
                target: "vdd".into()
            })
        );
        assert_eq!(device_add_args(&pc, &vdd, None).unwrap()["bus"], "pci.0");
        let sdaa = disk("sdaa", DiskBus::Scsi, DiskFormat::Raw, "/e");
        let dev = device_add_args(&q35, &sdaa, Some("hp0")).unwrap();
        assert_eq!(
            (dev["bus"].as_str(), dev["lun"].as_u64()),
            (Some("scsi0.0"), Some(26))
        );
        assert_eq!(
            [
                scsi_lun("sda"),
                scsi_lun("sdz"),
                scsi_lun("sdab"),
                scsi_lun("sdzz")
            ],
            [0, 25, 27, 701]
        );
        assert_eq!(
            (format_node_name("vda"), file_node_name("vda")),
            ("drive-vda".into(), "file-vda".into())
        );
    }

    // -----------------------------------------------------------------------------------------
    // Against a real QEMU

    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// Kills and reaps the child when dropped.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    struct Qmp {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl Qmp {
        fn connect(child: &mut Child, socket: &Path, log: &Path) -> Qmp {
            let deadline = Instant::now() + Duration::from_secs(30);
            let stream = loop {
                match UnixStream::connect(socket) {
                    Ok(s) => break s,
                    Err(e) => {
                        if let Some(status) = child.try_wait().unwrap() {
                            panic!(
                                "qemu exited ({status}): {}",
                                std::fs::read_to_string(log).unwrap_or_default()
                            );
                        }
                        assert!(Instant::now() < deadline, "QMP socket never appeared: {e}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut qmp = Qmp {
                reader: BufReader::new(stream.try_clone().unwrap()),
                writer: stream,
            };
            let greeting = qmp.read();
            assert!(greeting.get("QMP").is_some(), "{greeting}");
            qmp.execute("qmp_capabilities", json!({}));
            qmp
        }

        fn read(&mut self) -> Value {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            serde_json::from_str(&line).unwrap()
        }

        fn execute(&mut self, command: &str, arguments: Value) -> Value {
            let msg = json!({"execute": command, "arguments": arguments});
            writeln!(self.writer, "{msg}").unwrap();
            loop {
                let reply = self.read();
                if reply.get("event").is_some() {
                    continue;
                }
                if let Some(err) = reply.get("error") {
                    panic!("{command} failed: {err}");
                }
                return reply["return"].clone();
            }
        }
    }

    fn qemu_img(args: &[OsString]) {
        let status = Command::new(QEMU_IMG_BINARY)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img {args:?}");
    }

    fn create(path: &Path, format: DiskFormat) {
        qemu_img(&[
            "create".into(),
            "-f".into(),
            format.as_str().into(),
            path.into(),
            "64M".into(),
        ]);
    }

    /// The `inserted` block of the device with this id in a `query-block` reply.
    fn inserted(block: &Value, id: &str) -> Value {
        block
            .as_array()
            .unwrap()
            .iter()
            .find(|b| {
                let qdev = b["qdev"].as_str().unwrap_or("");
                // scsi-hd reports its id, virtio-blk-pci the QOM path of its backend.
                qdev == id
                    || qdev == format!("/machine/peripheral/{id}")
                    || qdev.starts_with(&format!("/machine/peripheral/{id}/"))
            })
            .unwrap_or_else(|| panic!("no device {id} in {block}"))["inserted"]
            .clone()
    }

    #[test]
    fn real_qemu_starts_with_these_args() {
        let available = |bin: &str| {
            Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !available(QEMU_SYSTEM_BINARY) || !available(QEMU_IMG_BINARY) {
            eprintln!("skipping: {QEMU_SYSTEM_BINARY} or {QEMU_IMG_BINARY} not available");
            return;
        }
        let dir = tempfile::TempDir::new().unwrap();
        let d = dir.path();
        let (a, b, c, ovl) = (
            d.join("a, 1.qcow2"),
            d.join("b.raw"),
            d.join("c.qcow2"),
            d.join("c.ovl"),
        );
        create(&a, DiskFormat::Qcow2);
        create(&b, DiskFormat::Raw);
        create(&c, DiskFormat::Qcow2);
        let vda = disk(
            "vda",
            DiskBus::Virtio,
            DiskFormat::Qcow2,
            a.to_str().unwrap(),
        );
        let sda = disk("sda", DiskBus::Scsi, DiskFormat::Raw, b.to_str().unwrap());
        let mut vdb = disk(
            "vdb",
            DiskBus::Virtio,
            DiskFormat::Qcow2,
            c.to_str().unwrap(),
        );
        vdb.transient = true;
        qemu_img(&transient_overlay_create_args(&vdb, &ovl));
        // A read-only SCSI disk: scsi-hd must accept a read-only node.
        let ro = d.join("ro.raw");
        create(&ro, DiskFormat::Raw);
        let mut sdc = disk("sdc", DiskBus::Scsi, DiskFormat::Raw, ro.to_str().unwrap());
        sdc.readonly = true;
        let def = def("q35", vec![vda, sda, vdb, sdc]);
        let paths = paths(d);
        let mut opts = LaunchOptions {
            paused: true,
            ..Default::default()
        };
        opts.transient_overlays.insert("vdb".into(), ovl.clone());
        let args = qemu_args(&def, &paths, Accel::Tcg, &opts).unwrap();

        let log = std::fs::File::create(&paths.log_file).unwrap();
        let child = Command::new(QEMU_SYSTEM_BINARY)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let mut qmp = Qmp::connect(&mut child.0, &paths.qmp_socket, &paths.log_file);

        let block = qmp.execute("query-block", json!({}));
        let vda = inserted(&block, "vda");
        assert_eq!(vda["node-name"], "drive-vda");
        assert_eq!(vda["file"], a.to_str().unwrap());
        assert_eq!(vda["ro"], false);
        let sda = inserted(&block, "sda");
        assert_eq!(sda["node-name"], "drive-sda");
        assert_eq!(sda["drv"], "raw");
        let vdb = inserted(&block, "vdb");
        assert_eq!(vdb["node-name"], "drive-vdb");
        assert_eq!(vdb["file"], ovl.to_str().unwrap());
        assert_eq!(
            vdb["image"]["backing-image"]["filename"],
            c.to_str().unwrap()
        );
        assert_eq!(inserted(&block, "sdc")["ro"], true);

        // Hot-plug a virtio disk on a root port and a SCSI disk, then unplug the SCSI one.
        let (e, f) = (d.join("e.qcow2"), d.join("f.raw"));
        create(&e, DiskFormat::Qcow2);
        create(&f, DiskFormat::Raw);
        let vdc = disk(
            "vdc",
            DiskBus::Virtio,
            DiskFormat::Qcow2,
            e.to_str().unwrap(),
        );
        let sdb = disk("sdb", DiskBus::Scsi, DiskFormat::Raw, f.to_str().unwrap());
        for hot in [&vdc, &sdb] {
            for node in blockdev_add_args(hot, None).unwrap() {
                qmp.execute("blockdev-add", node);
            }
            qmp.execute(
                "device_add",
                device_add_args(&def, hot, Some("hp0")).unwrap(),
            );
        }
        let block = qmp.execute("query-block", json!({}));
        assert_eq!(inserted(&block, "vdc")["node-name"], "drive-vdc");
        assert_eq!(inserted(&block, "sdb")["node-name"], "drive-sdb");
        qmp.execute("device_del", json!({"id": "sdb"}));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let event = qmp.read();
            if event["event"] == "DEVICE_DELETED" && event["data"]["device"] == "sdb" {
                break;
            }
            assert!(Instant::now() < deadline, "no DEVICE_DELETED for sdb");
        }

        writeln!(qmp.writer, "{}", json!({"execute": "quit"})).unwrap();
        let status = child.0.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}
