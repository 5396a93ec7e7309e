//! Guests for tests: the counter boot sector, a small synchronous QMP client, and a QEMU that
//! the test itself owns ([`ForeignQemu`], for attaching a QEMU started by someone else).
//!
//! # The counter guest
//!
//! [`counter_boot_sector`] is a 512-byte x86 boot sector. SeaBIOS loads it at 0000:7C00 and
//! jumps to it in 16-bit real mode; it then increments the 32-bit little-endian word at physical
//! address [`COUNTER_ADDR`] (0x9000) forever. The address lies in conventional memory above the
//! boot sector (0x7C00-0x7DFF) and below the EBDA, which neither the BIOS nor the code uses.
//! Reading it with HMP `xp /1wx 0x9000` shows the guest running; a paused guest's counter
//! is stable, and a reverted guest's counter equals the value saved with the snapshot. At TCG
//! speed the counter wraps after some seconds to minutes, so tests compare for inequality or
//! equality, never for order.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::deadline::{Deadline, poll_until};
use crate::process::{ChildGuard, run_ok};

/// Physical address of the counter the counter guest increments.
pub const COUNTER_ADDR: u64 = 0x9000;

/// Time QEMU has to answer one QMP command.
pub const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Size of the raw counter disk: one MiB, so every controller sees whole sectors to spare.
const COUNTER_DISK_SIZE: u64 = 1 << 20;

/// The machine code, hand-assembled (16-bit real mode, DS set to 0 so offsets are physical):
const COUNTER_CODE: [u8; 21] = [
    0xFA, //                               cli                  ; no interrupt handlers needed
    0x31, 0xC0, //                         xor  ax, ax
    0x8E, 0xD8, //                         mov  ds, ax          ; DS = 0
    0x66, 0xC7, 0x06, 0x00, 0x90, //       mov  dword [0x9000], 0
    0x00, 0x00, 0x00, 0x00, //             (the imm32 of that mov, 0x66 makes it 32 bits)
    // loop (offset 0x0E):
    0x66, 0xFF, 0x06, 0x00, 0x90, //       inc  dword [0x9000]  ; FF /0, ModRM 06 = [disp16]
    0xEB, 0xF9, //                         jmp  short loop      ; -7: back over inc and jmp
];

/// The counter guest's boot sector: [`COUNTER_CODE`], zero padding, then the boot signature
/// 0x55 0xAA at offsets 510 and 511.
pub fn counter_boot_sector() -> [u8; 512] {
    let mut sector = [0u8; 512];
    sector[..COUNTER_CODE.len()].copy_from_slice(&COUNTER_CODE);
    sector[510] = 0x55;
    sector[511] = 0xAA;
    sector
}

/// Writes a raw disk image (1 MiB) whose first sector is the counter boot sector.
pub fn counter_boot_disk(path: &Path) {
    let mut image = vec![0u8; usize::try_from(COUNTER_DISK_SIZE).expect("size fits")];
    image[..512].copy_from_slice(&counter_boot_sector());
    std::fs::write(path, image).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Writes the counter boot disk as a qcow2 image (internal snapshots need qcow2).
pub fn counter_boot_qcow2(path: &Path) {
    let raw = path.with_extension("raw-tmp");
    counter_boot_disk(&raw);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(path),
        Deadline::step(),
    );
    let _ = std::fs::remove_file(raw);
}

/// Parses the word that HMP `xp /1wx ADDR` prints, e.g. `0000000000009000: 0x0001e240`.
pub fn parse_xp_word(output: &str) -> Option<u32> {
    let (_, value) = output.trim().split_once(": ")?;
    u32::from_str_radix(value.trim().trim_start_matches("0x"), 16).ok()
}

/// A QMP connection, synchronous: replies are matched by `id`, events are kept aside.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (waiting until QEMU has created it), reads the
    /// greeting and negotiates capabilities.
    pub fn connect(path: &Path, deadline: Deadline) -> Self {
        let what = format!("QMP socket {}", path.display());
        let stream = poll_until(deadline, &what, || UnixStream::connect(path).ok());
        stream
            .set_read_timeout(Some(QMP_REPLY_TIMEOUT))
            .expect("cannot set the QMP timeout");
        let writer = stream.try_clone().expect("cannot clone the QMP socket");
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            next_id: 0,
            events: Vec::new(),
        };
        let greeting = qmp.read_message();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({}))
            .unwrap_or_else(|e| panic!("qmp_capabilities refused: {e}"));
        qmp
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("QEMU closed the QMP connection"),
            Ok(_) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("bad QMP message ({e}): {line}")),
            Err(e) => panic!("cannot read from QMP: {e}"),
        }
    }

    /// Runs a command; `Ok(return value)` or `Err(error object)`. Events that arrive meanwhile
    /// are kept in [`Qmp::events`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"execute": command, "arguments": arguments, "id": id});
        writeln!(self.writer, "{request}").expect("cannot write to QMP");
        loop {
            let message = self.read_message();
            if message.get("event").is_some() {
                self.events.push(message);
            } else if message.get("id") == Some(&json!(id)) {
                if let Some(value) = message.get("return") {
                    return Ok(value.clone());
                }
                return Err(message.get("error").cloned().unwrap_or(message));
            }
        }
    }

    /// Runs an HMP command line through `human-monitor-command` and returns its output.
    pub fn hmp(&mut self, command_line: &str) -> String {
        let reply = self
            .execute(
                "human-monitor-command",
                json!({"command-line": command_line}),
            )
            .unwrap_or_else(|e| panic!("HMP {command_line:?} refused: {e}"));
        reply.as_str().unwrap_or_default().to_owned()
    }

    /// The counter guest's counter at [`COUNTER_ADDR`].
    pub fn read_counter(&mut self) -> u32 {
        let output = self.hmp(&format!("xp /1wx {COUNTER_ADDR:#x}"));
        parse_xp_word(&output).unwrap_or_else(|| panic!("cannot parse xp output: {output:?}"))
    }

    /// The `status` of `query-status` (`running`, `paused`, `prelaunch`, ...).
    pub fn status(&mut self) -> String {
        let reply = self
            .execute("query-status", json!({}))
            .unwrap_or_else(|e| panic!("query-status refused: {e}"));
        reply["status"].as_str().unwrap_or_default().to_owned()
    }

    /// Events received so far.
    pub fn events(&self) -> &[Value] {
        &self.events
    }
}

/// A disk of a [`ForeignQemu`]: image file and format. The n-th disk becomes target `vd<n>`
/// (`vda`, `vdb`, ...) with format node `drive-vdX`, file node `file-vdX` and a virtio-blk
/// device with id `vdX`; the first one is the boot disk.
#[derive(Debug, Clone)]
pub struct ForeignDisk {
    /// Image file.
    pub path: PathBuf,
    /// Image format, e.g. `qcow2`.
    pub format: String,
}

impl ForeignDisk {
    /// A disk of `format` at `path`.
    pub fn new(path: &Path, format: &str) -> Self {
        Self {
            path: path.to_owned(),
            format: format.to_owned(),
        }
    }
}

/// A QEMU that the test started itself, as another tool would: q35 with TCG, `-nodefaults`,
/// its disks as `-blockdev`s, and two QMP sockets: [`ForeignQemu::qmp_socket`] to hand to
/// vmsnapd (`attach`) and a second one the test keeps for itself ([`ForeignQemu::test_qmp`]),
/// since a QMP socket serves one client at a time. Killed and reaped on drop.
#[derive(Debug)]
pub struct ForeignQemu {
    child: ChildGuard,
    qmp_socket: PathBuf,
    test_qmp_socket: PathBuf,
    log_path: PathBuf,
}

impl ForeignQemu {
    /// Starts QEMU with `disks`, its sockets and log in `dir`.
    pub fn start(dir: &Path, disks: &[ForeignDisk]) -> Self {
        Self::start_with(dir, disks, &[])
    }

    /// Like [`ForeignQemu::start`] with extra QEMU arguments (e.g. `-S` to start paused).
    pub fn start_with(dir: &Path, disks: &[ForeignDisk], extra_args: &[&str]) -> Self {
        let qmp_socket = dir.join("foreign-qmp.sock");
        let test_qmp_socket = dir.join("foreign-test-qmp.sock");
        let log_path = dir.join("foreign-qemu.log");
        let log = std::fs::File::create(&log_path).expect("cannot create the QEMU log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35,accel=tcg",
            "-m",
            "64",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            test_qmp_socket.display()
        ));
        for (index, disk) in disks.iter().enumerate() {
            let target = disk_target(index);
            cmd.arg("-blockdev").arg(format!(
                "driver=file,filename={},node-name=file-{target}",
                disk.path.display()
            ));
            cmd.arg("-blockdev").arg(format!(
                "driver={},file=file-{target},node-name=drive-{target}",
                disk.format
            ));
            let boot = if index == 0 { ",bootindex=1" } else { "" };
            cmd.arg("-device").arg(format!(
                "virtio-blk-pci,drive=drive-{target},id={target},share-rw=on{boot}"
            ));
        }
        cmd.args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot duplicate the log"))
            .stderr(log);
        let child = ChildGuard::spawn("qemu-system-x86_64", &mut cmd)
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));
        Self {
            child,
            qmp_socket,
            test_qmp_socket,
            log_path,
        }
    }

    /// The QMP socket to give to vmsnapd.
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// A QMP connection on the test's own socket.
    pub fn test_qmp(&self, deadline: Deadline) -> Qmp {
        Qmp::connect(&self.test_qmp_socket, deadline)
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether QEMU still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_none()
    }

    /// What QEMU wrote to stdout and stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ForeignQemu {
    fn drop(&mut self) {
        self.child.kill();
        if std::thread::panicking() {
            eprintln!("----- foreign QEMU log -----\n{}", self.log());
        }
    }
}

/// The target name of the n-th virtio disk: `vda`, `vdb`, ... .
pub fn disk_target(index: usize) -> String {
    let letter = u8::try_from(index)
        .ok()
        .and_then(|i| b'a'.checked_add(i))
        .filter(u8::is_ascii_lowercase);
    let letter = letter.unwrap_or_else(|| panic!("too many disks: {index}"));
    format!("vd{}", char::from(letter))
}
