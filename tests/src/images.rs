//! Disk images, made and checked offline with `qemu-img` and `qemu-io`.
//!
//! Each function panics with the tool's output when the tool fails, so a failing check can
//! never be mistaken for a missing or unreadable image.

use std::path::Path;
use std::process::Command;

use crate::deadline::Deadline;
use crate::process::{run, run_ok};

/// Creates an image of `format` (`qcow2`, `raw`, ...) and virtual `size` in qemu-img syntax
/// (`64M`, `1G`, a byte count).
pub fn qemu_img_create(path: &Path, format: &str, size: &str) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(path)
            .arg(size),
        Deadline::step(),
    );
}

/// Creates a qcow2 overlay at `path` whose backing file is `backing` (of `backing_format`).
pub fn qemu_img_create_overlay(path: &Path, backing: &Path, backing_format: &str) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", backing_format, "-b"])
            .arg(backing)
            .arg(path),
        Deadline::step(),
    );
}

/// Writes `len` bytes of `pattern` at `offset` into an image that no QEMU holds.
pub fn qemu_io_write_pattern(path: &Path, format: &str, pattern: u8, offset: u64, len: u64) {
    let output = run_ok(
        Command::new("qemu-io")
            .args(["-f", format, "-c"])
            .arg(format!("write -P 0x{pattern:02x} {offset} {len}"))
            .arg(path),
        Deadline::step(),
    );
    // qemu-io reports a failed command on stdout and may still exit 0.
    assert!(
        output.stdout.contains(&format!("wrote {len}/{len} bytes")),
        "qemu-io write to {} failed:\n{}{}",
        path.display(),
        output.stdout,
        output.stderr
    );
}

/// Whether `len` bytes at `offset` all equal `pattern`. Works on an image a running QEMU holds
/// (read-only, without locking). Panics if the image cannot be read at all.
pub fn qemu_io_verify_pattern(
    path: &Path,
    format: &str,
    pattern: u8,
    offset: u64,
    len: u64,
) -> bool {
    let output = run(
        Command::new("qemu-io")
            .args(["-r", "-U", "-f", format, "-c"])
            .arg(format!("read -P 0x{pattern:02x} {offset} {len}"))
            .arg(path),
        Deadline::step(),
    );
    let text = format!("{}{}", output.stdout, output.stderr);
    if text.contains("Pattern verification failed") {
        return false;
    }
    assert!(
        output.status.success() && output.stdout.contains(&format!("read {len}/{len} bytes")),
        "qemu-io read of {} failed ({}):\n{text}",
        path.display(),
        output.status
    );
    true
}

/// `qemu-img info --backing-chain --output=json -U`: a JSON array, the image itself first, then
/// its backing files.
pub fn qemu_img_info(path: &Path) -> serde_json::Value {
    let output = run_ok(
        Command::new("qemu-img")
            .args(["info", "--backing-chain", "--output=json", "-U"])
            .arg(path),
        Deadline::step(),
    );
    serde_json::from_str(&output.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info printed no JSON ({e}):\n{}", output.stdout))
}

/// Internal snapshots of a qcow2 image as `(id, tag)` pairs, from `qemu_img_info`.
pub fn qemu_img_snapshots(path: &Path) -> Vec<(String, String)> {
    let info = qemu_img_info(path);
    info[0]["snapshots"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    let field = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
                    (field("id"), field("name"))
                })
                .collect()
        })
        .unwrap_or_default()
}
