//! Entry points for fuzzing the daemon's input parsers: the `<domainsnapshot>` parsers, the
//! domain-XML parser and the `a{sv}` options dictionaries. Each takes raw bytes, must never
//! panic, hang or allocate without bound on any input, and checks the parser's stated
//! invariants on what it accepts (a panic is a finding):
//! - a snapshot document that parses writes back to a document that parses to the same value;
//! - a domain definition that parses writes back to the same definition;
//! - an options dictionary yields, for every key and type, a value or `InvalidArgument`.
//!
//! The cargo-fuzz targets in `fuzz/` call these; so does a bounded, deterministic test run on
//! stable Rust (the `tests` module below) over the committed corpus plus seeded mutations.

use std::collections::{BTreeMap, HashMap};

use zbus::OwnedVariant;
use zbus::wire::LE;
use zbus::wire::serialized::{Context, Data};

use crate::dbus::options::Options;
use crate::domain::def::{DiskDef, DomainDef};
use crate::snapshot::xml::{SnapshotDoc, request_from_xml};
use vmsnap_dbus::names::option;

/// Every option key the daemon knows, so that each typed getter is tried on each of them.
const ALL_KEYS: &[&str] = &[
    option::ASYNC,
    option::TIMEOUT,
    option::FORCE,
    option::PAUSED,
    option::CONFIG_ONLY,
    option::DISK_ONLY,
    option::MEMORY,
    option::MEMORY_FILE,
    option::VMSTATE_DISK,
    option::DISKS,
    option::LIVE,
    option::KEEP_ACTIVE_NAME,
    option::HMP,
    option::RUNNING,
    option::METADATA_ONLY,
    option::PARENT,
    option::DELETE_CHILDREN,
    option::CHILDREN,
    option::CHILDREN_ONLY,
    option::SNAPSHOTS_METADATA,
    option::CURRENT,
];

/// Feeds `data` to both `<domainsnapshot>` parsers (the whole format and the creation subset).
pub fn snapshot_xml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = request_from_xml(text);
    if let Ok(doc) = SnapshotDoc::parse(text) {
        let out = doc.to_xml();
        let again = SnapshotDoc::parse(&out)
            .unwrap_or_else(|e| panic!("written document does not parse: {e}\n{out}"));
        assert_eq!(again, doc, "round trip changed the document\n{out}");
    }
}

/// Feeds `data` to the domain-definition and lone-disk parsers.
pub fn domain_xml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(def) = DomainDef::from_xml(text) {
        let out = def.to_xml();
        let again = DomainDef::from_xml(&out)
            .unwrap_or_else(|e| panic!("written definition does not parse: {e}\n{out}"));
        assert_eq!(again, def, "round trip changed the definition\n{out}");
    }
    if let Ok(disk) = DiskDef::from_xml(text) {
        let again = DiskDef::from_xml(&disk.to_xml()).expect("written disk parses");
        assert_eq!(again, disk);
    }
}

/// Decodes `data` as a little-endian D-Bus `a{sv}` and reads every known key with every
/// typed getter, as the D-Bus methods do.
pub fn options(data: &[u8]) {
    let Some(map) = decode_options(data) else {
        return;
    };
    let unknown: Vec<String> = map
        .keys()
        .filter(|k| !ALL_KEYS.contains(&k.as_str()))
        .cloned()
        .collect();
    let opts = match Options::parse("Fuzz", map.clone(), ALL_KEYS) {
        Ok(o) => {
            assert!(unknown.is_empty(), "unknown keys {unknown:?} were accepted");
            o
        }
        Err(vmsnap_dbus::Error::InvalidArgument(m)) => {
            assert!(
                unknown.iter().any(|k| m.contains(&format!("{k:?}"))),
                "refusal {m:?} names none of {unknown:?}"
            );
            return;
        }
        Err(e) => panic!("options refused with {e:?}, not InvalidArgument"),
    };
    for key in ALL_KEYS {
        for r in [
            opts.bool(key).map(|_| ()),
            opts.uint(key).map(|_| ()),
            opts.string(key).map(|_| ()),
            opts.strings(key).map(|_| ()),
        ] {
            if let Err(e) = r {
                assert!(
                    matches!(e, vmsnap_dbus::Error::InvalidArgument(_)),
                    "{key}: {e:?}"
                );
            }
        }
    }
    let _ = crate::dbus::domain::create_request(&opts);
}

/// The options dictionary `data` encodes, if it is one.
pub fn decode_options(data: &[u8]) -> Option<HashMap<String, OwnedVariant>> {
    let bytes = Data::new(data, Context::new(LE, 0));
    let (map, _) = bytes.deserialize::<HashMap<String, OwnedVariant>>().ok()?;
    Some(map)
}

/// Encodes an options dictionary the way a D-Bus caller sends it (for seeds and tests).
pub fn encode_options(map: &BTreeMap<&str, zbus::Variant<'_>>) -> Vec<u8> {
    zbus::wire::to_bytes(Context::new(LE, 0), map)
        .expect("an a{sv} always encodes")
        .bytes()
        .to_vec()
}

#[cfg(test)]
mod tests {
    //! The fuzz targets on stable Rust: each committed seed, then a few thousand seeded
    //! mutations of them, bounded in time. Deterministic: a failure reproduces with the same
    //! seed; the input is printed with the panic.

    use super::*;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};
    use zbus::Variant as Value;

    /// Mutations tried per target at most.
    const MUTATIONS: usize = 4000;
    /// Wall-clock budget per target.
    const BUDGET: Duration = Duration::from_secs(4);

    /// xorshift64*: small, seedable, good enough to pick mutations.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }

    const TOKENS: &[&[u8]] = &[
        b"<",
        b">",
        b"</",
        b"/>",
        b"&",
        b"&amp;",
        b"&lt;",
        b"&#x263A;",
        b"&#0;",
        b"&x;",
        b"<![CDATA[",
        b"]]>",
        b"<!--",
        b"-->",
        b"<!DOCTYPE d [<!ENTITY x 'y'>]>",
        b"<?xml?>",
        b"'",
        b"\"",
        b"=",
        b" ",
        b"\n",
        b"\xe2\x98\x83",
        b"\xff",
        b"<domainsnapshot>",
        b"</domainsnapshot>",
        b"<name>",
        b"</name>",
        b"<disk name='vda'",
        b" snapshot='external'",
        b" type='block'",
        b"<source file='/x'/>",
        b"<source dev='/dev/x'/>",
        b"<memory snapshot='external' file='/m'/>",
        b"<state>running</state>",
        b"<creationTime>-1</creationTime>",
        b"<parent><name>p</name></parent>",
        b"<cookie/>",
        b"<domain type='kvm'>",
        b"</domain>",
        b"<devices>",
        b"<target dev='vdb' bus='virtio'/>",
        b"<driver name='qemu' type='raw'/>",
        b"<memory unit='GiB'>1</memory>",
        b"9999999999999999999999",
        b"-",
        b"\0",
        b"\x01\x00\x00\x00",
        b"\x00\x00\x00\x00",
        b"s\0",
        b"b\0",
        b"as\0",
        b"u\0",
        b"v\0",
    ];

    fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
        let mut v = input.to_vec();
        for _ in 0..=rng.below(4) {
            let at = rng.below(v.len() + 1);
            match rng.below(7) {
                0 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
                1 => v.insert(at, rng.next() as u8),
                2 if !v.is_empty() => {
                    let end = (at + rng.below(16) + 1).min(v.len());
                    v.drain(at.min(end)..end);
                }
                3 => {
                    let t = TOKENS[rng.below(TOKENS.len())];
                    v.splice(at..at, t.iter().copied());
                }
                4 if !v.is_empty() => {
                    let start = rng.below(v.len());
                    let end = (start + rng.below(64) + 1).min(v.len());
                    let piece = v[start..end].to_vec();
                    v.splice(at..at, piece);
                }
                5 if !other.is_empty() => {
                    let cut = rng.below(other.len());
                    v.truncate(at);
                    v.extend_from_slice(&other[cut..]);
                }
                _ if !v.is_empty() => {
                    // An "interesting" byte where XML and D-Bus framing live.
                    let i = rng.below(v.len());
                    v[i] = [0u8, 0xff, b'<', b'>', b'&', b'\'', 0x7f, 0x80][rng.below(8)];
                }
                _ => v.push(b'<'),
            }
        }
        v
    }

    fn files_in(dir: &Path) -> Vec<Vec<u8>> {
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(d) => d
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .collect(),
            Err(e) => panic!("{}: {e}", dir.display()),
        };
        paths.sort();
        paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// Runs `target` over the corpus and its mutations; `accepted` tells whether an input got
    /// past the parser, so that the run is known to reach the invariant checks.
    fn run(
        name: &str,
        seed: u64,
        corpus: Vec<Vec<u8>>,
        target: fn(&[u8]),
        accepted: fn(&[u8]) -> bool,
    ) {
        assert!(corpus.len() >= 3, "{name}: corpus too small");
        let check = |input: &[u8]| {
            let r = std::panic::catch_unwind(|| target(input));
            if let Err(e) = r {
                panic!(
                    "{name} failed on input {:?}: {e:?}",
                    String::from_utf8_lossy(input)
                );
            }
        };
        for input in &corpus {
            check(input);
        }
        let mut rng = Rng(seed);
        let start = Instant::now();
        let mut passed = 0;
        // A longer run on stable: VMSNAP_FUZZ_ITERATIONS=1000000 lifts the time budget too.
        let (count, budget) = match std::env::var("VMSNAP_FUZZ_ITERATIONS") {
            Ok(n) => (n.parse().expect("a number of iterations"), Duration::MAX),
            Err(_) => (MUTATIONS, BUDGET),
        };
        for i in 0..count {
            if start.elapsed() > budget {
                assert!(i > 200, "{name}: only {i} mutations in the time budget");
                break;
            }
            let a = &corpus[rng.below(corpus.len())];
            let b = &corpus[rng.below(corpus.len())];
            let input = mutate(&mut rng, a, b);
            check(&input);
            passed += usize::from(accepted(&input));
        }
        assert!(
            passed >= 20,
            "{name}: only {passed} mutated inputs were accepted; the mutator is too blunt"
        );
    }

    fn utf8(data: &[u8]) -> &str {
        std::str::from_utf8(data).unwrap_or("")
    }

    #[test]
    fn fuzz_snapshot_xml_corpus_and_mutations_hold_invariants() {
        let mut corpus = files_in(&repo().join("fuzz/corpus/snapshot_xml"));
        corpus.extend(files_in(&repo().join("tests/data/snapshot-xml/valid")));
        corpus.extend(files_in(&repo().join("tests/data/snapshot-xml/invalid")));
        run("snapshot_xml", 0x5eed_0001, corpus, snapshot_xml, |d| {
            SnapshotDoc::parse(utf8(d)).is_ok()
        });
    }

    #[test]
    fn fuzz_domain_xml_corpus_and_mutations_hold_invariants() {
        run(
            "domain_xml",
            0x5eed_0002,
            files_in(&repo().join("fuzz/corpus/domain_xml")),
            domain_xml,
            |d| DomainDef::from_xml(utf8(d)).is_ok() || DiskDef::from_xml(utf8(d)).is_ok(),
        );
    }

    fn option_seeds() -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        let one = |k: &'static str, v: Value<'static>| {
            let mut m = BTreeMap::new();
            m.insert(k, v);
            encode_options(&m)
        };
        seeds.push(encode_options(&BTreeMap::new()));
        seeds.push(one("async", Value::Bool(true)));
        seeds.push(one("timeout", Value::U32(30)));
        seeds.push(one("timeout", Value::I64(-5)));
        seeds.push(one("memory", Value::from("external")));
        seeds.push(one("bogus", Value::U8(1)));
        seeds.push(one(
            "disks",
            Value::from(vec!["vda=external:/x.qcow2", "vdb=no", "=internal"]),
        ));
        seeds.push(one("paused", Value::Variant(Box::new(Value::Bool(false)))));
        let mut m = BTreeMap::new();
        m.insert("disk-only", Value::Bool(true));
        m.insert("memory-file", Value::from("/m"));
        m.insert("disks", Value::from(vec![1u32, 2]));
        m.insert("current", Value::from("yes"));
        seeds.push(encode_options(&m));
        seeds
    }

    #[test]
    fn fuzz_options_corpus_and_mutations_hold_invariants() {
        let mut corpus = files_in(&repo().join("fuzz/corpus/options"));
        corpus.extend(option_seeds());
        // The seeds are real dictionaries, so the mutations start from valid framing.
        assert!(
            corpus
                .iter()
                .filter(|c| decode_options(c).is_some())
                .count()
                >= 9
        );
        run("options", 0x5eed_0003, corpus, options, |d| {
            decode_options(d).is_some()
        });
    }

    /// Writes the generated option seeds into `fuzz/corpus/options` (run with
    /// `VMSNAP_BLESS_FUZZ=1` after changing [`option_seeds`]).
    #[test]
    fn fuzz_options_seed_files_are_current() {
        let dir = repo().join("fuzz/corpus/options");
        for (i, seed) in option_seeds().iter().enumerate() {
            let path = dir.join(format!("seed-{i:02}.bin"));
            if std::env::var_os("VMSNAP_BLESS_FUZZ").is_some() {
                std::fs::write(&path, seed).unwrap();
            }
            assert_eq!(
                std::fs::read(&path).ok().as_ref(),
                Some(seed),
                "{} is stale: run with VMSNAP_BLESS_FUZZ=1",
                path.display()
            );
        }
    }
}
