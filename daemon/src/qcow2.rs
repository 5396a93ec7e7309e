//! Just enough of the qcow2 image format for the daemon to do without a `qemu-img` process
//! where one costs more than the work: reading an image's header (format, virtual size,
//! backing file and its format, internal snapshot names) and following its backing chain,
//! and writing the header of a new, empty overlay into a file the daemon created itself.
//!
//! Invariants:
//! - Reading never writes and takes no lock: like `qemu-img info -U`, it may read images a
//!   running QEMU holds open. It reads headers only (a few KiB per image), never data.
//! - Anything that is not a qcow2 image of version 2 or 3 is reported by the format its magic
//!   names (`vmdk`, `vpc`, ...) or as `raw`, as QEMU's probing would; a qcow2 header that does
//!   not hold together is an error, not a guess.
//! - [`write_overlay`] writes into an empty file opened by the caller (the daemon creates every
//!   file exclusively, mode 0600, before anything writes it) and produces the layout
//!   `qemu-img create -f qcow2 -b BACKING -F FMT -u FILE SIZE` produces: version 3, 64 KiB
//!   clusters, 16-bit refcounts, header in cluster 0, refcount table in cluster 1, its one
//!   refcount block in cluster 2, the (all-zero) L1 table from cluster 3 on, no data clusters.
//!
//! Layout facts (all integers big-endian) are from the qcow2 specification in QEMU's
//! `docs/interop/qcow2.txt`.

use std::fs::File;
use std::io::{Error, ErrorKind, Result};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The qcow2 magic, `QFI\xfb`.
const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Header extension: end of the extension list.
const EXT_END: u32 = 0;
/// Cluster size of the overlays written here (the qcow2 default).
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Length of a version 3 header with the compression type field, as QEMU writes it.
const V3_HEADER_LEN: u32 = 112;
/// QEMU refuses backing file names longer than this.
const MAX_BACKING_NAME: usize = 1023;
/// QEMU's limit on the number of internal snapshots of one image.
const MAX_SNAPSHOTS: u32 = 65_536;
/// Backing chains deeper than this are taken for a loop.
const MAX_CHAIN: usize = 1000;
/// How much of an image is read to recognise its format.
const PROBE_LEN: usize = 512;

/// Magics of the other formats QEMU recognises by probing, with their format names.
const OTHER_MAGICS: &[(&[u8], &str)] = &[
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"conectix", "vpc"),
    (b"vhdxfile", "vhdx"),
    (b"QED\0", "qed"),
    (b"QFI\xfb", "qcow2"),
    (b"QEVM", "bochs"),
    (b"cloop", "cloop"),
];

/// The backing file an image names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// The name as stored in the header.
    pub name: PathBuf,
    /// The name resolved as QEMU resolves it: relative names against the image's directory.
    pub path: PathBuf,
    /// The format the header declares for it, if any.
    pub format: Option<String>,
}

/// What an image's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `qcow2`, `raw`, or the name of another format QEMU would probe.
    pub format: String,
    /// Virtual size in bytes (for raw images, the file's length).
    pub virtual_size: u64,
    /// The backing file (qcow2 only).
    pub backing: Option<Backing>,
    /// Names of the internal snapshots (qcow2 only), in table order.
    pub snapshots: Vec<String>,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads up to `len` bytes at `offset`; fewer only at the end of the file.
fn read_at(file: &File, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Reads exactly `len` bytes at `offset`, or fails naming `what`.
fn read_exact_at(file: &File, path: &Path, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
    let buf = read_at(file, offset, len)?;
    if buf.len() != len {
        return Err(invalid(
            path,
            format!("{what} lies beyond the end of the file"),
        ));
    }
    Ok(buf)
}

/// The size of a raw image: a block device's or a file's length.
fn raw_size(file: &File) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

/// Reads the header of the image at `path`.
pub fn probe(path: &Path) -> Result<ImageInfo> {
    read_header(path, true)
}

/// The format and backing file of the image at `path`: [`probe`] without reading the internal
/// snapshot table (`snapshots` is empty), for scans over many images.
pub fn probe_backing(path: &Path) -> Result<ImageInfo> {
    read_header(path, false)
}

fn read_header(path: &Path, with_snapshots: bool) -> Result<ImageInfo> {
    let file = File::open(path)?;
    let head = read_at(&file, 0, PROBE_LEN)?;
    if !head.starts_with(&MAGIC) {
        let format = OTHER_MAGICS
            .iter()
            .find(|(m, _)| head.starts_with(m))
            .map_or("raw", |(_, f)| f);
        return Ok(ImageInfo {
            format: format.to_string(),
            virtual_size: raw_size(&file)?,
            backing: None,
            snapshots: Vec::new(),
        });
    }
    if head.len() < 72 {
        return Err(invalid(path, "truncated qcow2 header"));
    }
    let version = be32(&head, 4);
    let header_len = match version {
        2 => 72,
        3 => {
            if head.len() < 104 {
                return Err(invalid(path, "truncated qcow2 header"));
            }
            be32(&head, 100)
        }
        v => return Err(invalid(path, format!("unsupported qcow2 version {v}"))),
    };
    let cluster_bits = be32(&head, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(path, format!("bad cluster size 2^{cluster_bits}")));
    }
    let cluster = 1u64 << cluster_bits;
    if !(72..=cluster).contains(&u64::from(header_len)) {
        return Err(invalid(path, format!("bad header length {header_len}")));
    }
    // The header with its extensions and the backing name fit in the first cluster.
    let header = read_at(&file, 0, cluster as usize)?;

    // Header extensions follow the header (in version 2 too), up to the end marker.
    let mut backing_format = None;
    let mut at = header_len as usize;
    while at + 8 <= header.len() {
        let kind = be32(&header, at);
        let len = be32(&header, at + 4) as usize;
        if kind == EXT_END {
            break;
        }
        let data = at + 8;
        if data + len > header.len() {
            return Err(invalid(
                path,
                "a header extension runs past the first cluster",
            ));
        }
        if kind == EXT_BACKING_FORMAT {
            backing_format = Some(String::from_utf8_lossy(&header[data..data + len]).into_owned());
        }
        at = data + len.div_ceil(8) * 8;
    }

    let backing_offset = be64(&head, 8);
    let backing_len = be32(&head, 16) as usize;
    let backing = if backing_offset == 0 {
        None
    } else {
        if backing_len > MAX_BACKING_NAME {
            return Err(invalid(path, "backing file name too long"));
        }
        let raw = read_exact_at(
            &file,
            path,
            backing_offset,
            backing_len,
            "the backing file name",
        )?;
        let name = PathBuf::from(std::ffi::OsStr::from_bytes(&raw));
        let path_resolved = if name.is_absolute() {
            name.clone()
        } else {
            path.parent().unwrap_or(Path::new("")).join(&name)
        };
        Some(Backing {
            name,
            path: path_resolved,
            format: backing_format,
        })
    };

    let nb_snapshots = be32(&head, 60);
    let snapshots_offset = be64(&head, 64);
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(invalid(path, "too many internal snapshots"));
    }
    let snapshots = match with_snapshots {
        true => read_snapshot_names(&file, path, snapshots_offset, nb_snapshots)?,
        false => Vec::new(),
    };
    Ok(ImageInfo {
        format: "qcow2".into(),
        virtual_size: be64(&head, 24),
        backing,
        snapshots,
    })
}

/// The names in the snapshot table: fixed 40-byte part, extra data, id, name, padding to 8.
fn read_snapshot_names(file: &File, path: &Path, offset: u64, count: u32) -> Result<Vec<String>> {
    let mut names = Vec::with_capacity(count as usize);
    let mut at = offset;
    for _ in 0..count {
        let fixed = read_exact_at(file, path, at, 40, "the snapshot table")?;
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra_len = u64::from(be32(&fixed, 36));
        let name_at = at + 40 + extra_len + id_len;
        let name = read_exact_at(file, path, name_at, name_len, "a snapshot name")?;
        names.push(String::from_utf8_lossy(&name).into_owned());
        let entry = 40 + extra_len + id_len + name_len as u64;
        at += entry.div_ceil(8) * 8;
    }
    Ok(names)
}

/// The image at `path` and every image below it, top first, as `qemu-img info --backing-chain`
/// would open them: fails when a backing file is missing or unreadable, when it is not in the
/// format its overlay declares (a declared `raw` reads anything), or when the chain loops.
pub fn chain(path: &Path) -> Result<Vec<(PathBuf, ImageInfo)>> {
    let mut out: Vec<(PathBuf, ImageInfo)> = Vec::new();
    let mut next = Some((path.to_path_buf(), None::<String>));
    while let Some((p, declared)) = next.take() {
        if out.len() >= MAX_CHAIN || out.iter().any(|(q, _)| q == &p) {
            return Err(invalid(path, "the backing chain loops"));
        }
        let info = probe(&p).map_err(|e| {
            Error::new(
                e.kind(),
                format!("cannot read {} in the backing chain: {e}", p.display()),
            )
        })?;
        if let Some(fmt) = declared.filter(|f| f != "raw")
            && fmt != info.format
        {
            return Err(invalid(
                &p,
                format!("declared as {fmt} by its overlay but it is {}", info.format),
            ));
        }
        next = info
            .backing
            .as_ref()
            .map(|b| (b.path.clone(), b.format.clone()));
        out.push((p, info));
    }
    Ok(out)
}

/// Writes an empty qcow2 overlay of `virtual_size` bytes backed by `backing` (stored as given)
/// of format `backing_format` into `file`, which must be empty and open for writing. The
/// backing file is not opened (like `qemu-img create -u`).
pub fn write_overlay(
    file: &File,
    backing: &Path,
    backing_format: &str,
    virtual_size: u64,
) -> Result<()> {
    let name = backing.as_os_str().as_bytes();
    if name.is_empty() || name.len() > MAX_BACKING_NAME {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("backing file name of {} bytes", name.len()),
        ));
    }
    // One L2 table (a cluster of 8-byte entries) maps CLUSTER * CLUSTER / 8 bytes.
    let l2_span = CLUSTER * (CLUSTER / 8);
    let l1_size = virtual_size.div_ceil(l2_span);
    let l1_bytes = l1_size * 8;
    let l1_clusters = l1_bytes.div_ceil(CLUSTER).max(1);
    let l1_offset = 3 * CLUSTER;
    let clusters = 3 + l1_clusters;
    // The one refcount block holds CLUSTER / 2 16-bit counts.
    if clusters > CLUSTER / 2 || l1_size > u64::from(u32::MAX) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("virtual size {virtual_size} is too large for a single refcount block"),
        ));
    }

    let mut h = Vec::with_capacity(CLUSTER as usize);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    h.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, set below
    h.extend_from_slice(&(name.len() as u32).to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&virtual_size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    h.extend_from_slice(&(l1_size as u32).to_be_bytes());
    h.extend_from_slice(&l1_offset.to_be_bytes());
    h.extend_from_slice(&CLUSTER.to_be_bytes()); // refcount_table_offset
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    h.extend_from_slice(&V3_HEADER_LEN.to_be_bytes());
    h.push(0); // compression_type: zlib
    h.resize(V3_HEADER_LEN as usize, 0);
    let fmt = backing_format.as_bytes();
    h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    h.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
    h.extend_from_slice(fmt);
    h.resize(h.len().div_ceil(8) * 8, 0);
    h.extend_from_slice(&EXT_END.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    let backing_offset = h.len() as u64;
    h.extend_from_slice(name);
    if h.len() as u64 > CLUSTER {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the overlay header does not fit its first cluster",
        ));
    }
    h[8..16].copy_from_slice(&backing_offset.to_be_bytes());

    let mut refcount_block = vec![0u8; (clusters * 2) as usize];
    for c in refcount_block.chunks_exact_mut(2) {
        c.copy_from_slice(&1u16.to_be_bytes());
    }
    file.write_all_at(&h, 0)?;
    file.write_all_at(&(2 * CLUSTER).to_be_bytes(), CLUSTER)?;
    file.write_all_at(&refcount_block, 2 * CLUSTER)?;
    // The L1 table is all zeros: extending the file provides them.
    file.set_len(l1_offset + l1_bytes.max(8))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn qemu_img(args: &[&str]) -> String {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img runs");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn write_overlay_matches_qemu_img_and_passes_its_check() {
        let dir = tmp();
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
        for size in [64u64 << 20, 1 << 30, (3 << 40) + 12_345 * 512, 512] {
            let ours = dir.path().join(format!("ours-{size}.qcow2"));
            let theirs = dir.path().join(format!("theirs-{size}.qcow2"));
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&ours)
                .unwrap();
            write_overlay(&f, &base, "qcow2", size).unwrap();
            drop(f);
            let size_s = size.to_string();
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-F",
                "qcow2",
                "-b",
                s(&base),
                s(&theirs),
                &size_s,
            ]);
            qemu_img(&["check", "-q", s(&ours)]);
            let info = |p: &Path| {
                let v: serde_json::Value =
                    serde_json::from_str(&qemu_img(&["info", "--output=json", s(p)])).unwrap();
                (
                    v["virtual-size"].clone(),
                    v["backing-filename"].clone(),
                    v["backing-filename-format"].clone(),
                    v["cluster-size"].clone(),
                    v["format-specific"].clone(),
                    std::fs::metadata(p).unwrap().len(),
                )
            };
            assert_eq!(info(&ours), info(&theirs), "size {size}");
        }
    }

    #[test]
    fn written_overlay_reads_and_writes_through_qemu_io() {
        let dir = tmp();
        let base = dir.path().join("base.raw");
        qemu_img(&["create", "-q", "-f", "raw", s(&base), "4M"]);
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x11 0 64k", s(&base)])
            .output()
            .unwrap();
        assert!(out.status.success());
        let top = dir.path().join("top.qcow2");
        let f = File::create(&top).unwrap();
        write_overlay(&f, &base, "raw", 4 << 20).unwrap();
        drop(f);
        let io = |cmd: &str| {
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd, s(&top)])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(!io("write -P 0x22 64k 64k").contains("error"));
        assert!(!io("read -P 0x11 0 64k").contains("Pattern verification failed"));
        assert!(!io("read -P 0x22 64k 64k").contains("Pattern verification failed"));
        qemu_img(&["check", "-q", s(&top)]);
    }

    #[test]
    fn probe_reads_what_qemu_img_reports() {
        let dir = tmp();
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "32M"]);
        qemu_img(&["snapshot", "-c", "first", s(&base)]);
        qemu_img(&["snapshot", "-c", "a-much-longer-second-name", s(&base)]);
        let mid = dir.path().join("mid.qcow2");
        // A relative backing name resolves against the overlay's directory.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            s(&mid),
        ]);
        let info = probe(&base).unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, 32 << 20);
        assert_eq!(info.backing, None);
        assert_eq!(info.snapshots, ["first", "a-much-longer-second-name"]);
        let info = probe(&mid).unwrap();
        let b = info.backing.unwrap();
        assert_eq!(b.name, Path::new("base.qcow2"));
        assert_eq!(b.path, base);
        assert_eq!(b.format.as_deref(), Some("qcow2"));
        // The scan variant reads the same header but leaves the snapshot table alone.
        for f in [&base, &mid] {
            let full = probe(f).unwrap();
            let light = probe_backing(f).unwrap();
            assert_eq!(light.snapshots, Vec::<String>::new());
            assert_eq!(
                (light.format, light.virtual_size, light.backing),
                (full.format, full.virtual_size, full.backing)
            );
        }
        let c = chain(&mid).unwrap();
        assert_eq!(
            c.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
            [mid.clone(), base.clone()]
        );

        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let info = probe(&raw).unwrap();
        assert_eq!((info.format.as_str(), info.virtual_size), ("raw", 4096));
    }

    #[test]
    fn chain_fails_on_a_missing_or_altered_backing_file() {
        let dir = tmp();
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "8M"]);
        let top = dir.path().join("top.qcow2");
        let f = File::create(&top).unwrap();
        write_overlay(&f, &base, "qcow2", 8 << 20).unwrap();
        drop(f);
        assert_eq!(chain(&top).unwrap().len(), 2);
        // Rewritten as raw behind our back: the overlay declares qcow2.
        std::fs::write(&base, vec![0u8; 8 << 20]).unwrap();
        assert!(chain(&top).is_err());
        std::fs::remove_file(&base).unwrap();
        assert!(chain(&top).is_err());
        // Garbage with the qcow2 magic is an error, not a raw image.
        let bad = dir.path().join("bad.qcow2");
        std::fs::write(&bad, b"QFI\xfb\0\0\0\x09").unwrap();
        assert!(probe(&bad).is_err());
    }

    #[test]
    fn chain_refuses_a_loop() {
        let dir = tmp();
        let a = dir.path().join("a.qcow2");
        let b = dir.path().join("b.qcow2");
        for (file, backing) in [(&a, &b), (&b, &a)] {
            let f = File::create(file).unwrap();
            write_overlay(&f, backing, "qcow2", 1 << 20).unwrap();
        }
        assert!(chain(&a).is_err());
    }
}
