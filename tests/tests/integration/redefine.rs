//! libvirt `<domainsnapshot>` interchange through the real daemon, bus, client and images:
//! redefining snapshots whose files `qemu-img` made (a tree imported parent first), reverting
//! to them with the data checked by `qemu-io`, exporting them as `virsh snapshot-dumpxml`
//! would, and every malformed, hostile or untrue document refused with nothing changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmsnap_tests::process::run_ok;
use vmsnap_tests::{
    Deadline, DiskSpec, TestEnv, domain_xml, qemu_img_create, qemu_img_create_overlay,
    qemu_img_info, qemu_img_snapshots, qemu_io_verify_pattern, qemu_io_write_pattern,
};

const UUID: &str = "3f2b8f2e-5c4d-4e8a-9b1f-0a1b2c3d4e5f";
const KIB64: u64 = 64 * 1024;

/// The sources of a domain's disks, in order, from its XML.
fn sources(xml: &str) -> Vec<PathBuf> {
    xml.split("<source file=")
        .skip(1)
        .map(|rest| {
            let quote = rest.chars().next().expect("a quoted source");
            let value = &rest[1..];
            PathBuf::from(&value[..value.find(quote).expect("a closing quote")])
        })
        .collect()
}

/// Defines domain `name` (with the fixed UUID) on one qcow2 disk `vda` at `active`.
fn define(env: &TestEnv, name: &str, active: &Path) {
    let xml = domain_xml(name, &[DiskSpec::new(active, "qcow2", "vda")]).replace(
        &format!("<name>{name}</name>"),
        &format!("<name>{name}</name><uuid>{UUID}</uuid>"),
    );
    let f = env.write_xml(name, &xml);
    env.client.ok(["domain", "define", f.to_str().unwrap()]);
}

/// A `<domain>` as libvirt writes one: far more than vmsnap's subset, `vda` on `image`.
fn libvirt_domain(name: &str, uuid: &str, image: &Path) -> String {
    format!(
        "<domain type='kvm'>
    <name>{name}</name>
    <uuid>{uuid}</uuid>
    <memory unit='KiB'>65536</memory>
    <currentMemory unit='KiB'>65536</currentMemory>
    <vcpu placement='static'>1</vcpu>
    <os>
      <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    </os>
    <features><acpi/><apic/></features>
    <devices>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2' discard='unmap'/>
        <source file='{}'/>
        <target dev='vda' bus='virtio'/>
        <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
      </disk>
      <interface type='network'>
        <mac address='52:54:00:12:34:56'/>
        <source network='default'/>
      </interface>
    </devices>
  </domain>",
        image.display()
    )
}

const COOKIE: &str = "<cookie>
    <cpu mode='custom' match='exact' check='full'>
      <model fallback='forbid'>qemu64</model>
    </cpu>
    <slirpHelper/>
  </cookie>";

/// An internal disk-only snapshot of `vda` in `image`, as libvirt would describe it.
fn internal_doc(name: &str, uuid: &str, image: &Path) -> String {
    format!(
        "<domainsnapshot>
  <name>{name}</name>
  <description>imported ☃ &amp; kept</description>
  <state>shutoff</state>
  <creationTime>1700000000</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='internal'/>
  </disks>
  {}
  {COOKIE}
</domainsnapshot>
",
        libvirt_domain("imp", uuid, image)
    )
}

/// An external disk-only snapshot: `overlay` was created on `image`.
fn external_doc(name: &str, parent: &str, image: &Path, overlay: &Path) -> String {
    format!(
        "<domainsnapshot>
  <name>{name}</name>
  <state>disk-snapshot</state>
  <parent>
    <name>{parent}</name>
  </parent>
  <creationTime>1700000100</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='{}'/>
    </disk>
  </disks>
  {}
</domainsnapshot>
",
        overlay.display(),
        libvirt_domain("imp", UUID, image)
    )
}

/// Snapshot names, `current` flags and parents, from `vmsnap list --json`.
fn listing(env: &TestEnv, dom: &str) -> Vec<(String, bool, String)> {
    env.client
        .json(["list", dom])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["current"].as_bool().unwrap(),
                s["parent"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Every file under `dir` with its length and modification time.
fn files(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (e.path(), (m.len(), m.modified().unwrap()))
        })
        .collect()
}

fn qemu_img_snapshot_create(image: &Path, tag: &str) {
    run_ok(
        Command::new("qemu-img")
            .args(["snapshot", "-c", tag])
            .arg(image),
        Deadline::step(),
    );
}

/// A chain as a libvirt host leaves it: `base.qcow2` holds internal snapshot `s1` (data 0xa1)
/// and then 0xb2, `top.qcow2` is an external overlay on it (data 0xc3), the active image.
fn libvirt_chain(env: &TestEnv) -> (PathBuf, PathBuf) {
    let base = env.images_dir().join("base.qcow2");
    let top = env.images_dir().join("top.qcow2");
    qemu_img_create(&base, "qcow2", "1M");
    qemu_io_write_pattern(&base, "qcow2", 0xa1, 0, KIB64);
    qemu_img_snapshot_create(&base, "s1");
    qemu_io_write_pattern(&base, "qcow2", 0xb2, 0, KIB64);
    qemu_img_create_overlay(&top, &base, "qcow2");
    qemu_io_write_pattern(&top, "qcow2", 0xc3, 0, KIB64);
    (base, top)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redefine_imported_tree_reverts_to_each_snapshot_data() {
    let env = TestEnv::start();
    let (base, top) = libvirt_chain(&env);
    define(&env, "imp", &top);
    let s1 = env.write_xml("s1", &internal_doc("s1", UUID, &base));
    let s2 = env.write_xml("s2", &external_doc("s2", "s1", &base, &top));

    // Child before parent: refused, nothing recorded.
    let (code, err) = env.client.err(["redefine", "imp", s2.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("\"s1\""), "{err}");
    assert!(listing(&env, "imp").is_empty());

    // Parent first, then the child, made current.
    let v = env.client.json(["redefine", "imp", s1.to_str().unwrap()]);
    assert_eq!(v["name"], "s1");
    env.client
        .ok(["redefine", "imp", s2.to_str().unwrap(), "--current"]);
    assert_eq!(
        listing(&env, "imp"),
        vec![
            ("s1".to_string(), false, String::new()),
            ("s2".to_string(), true, "s1".to_string())
        ]
    );
    // Redefining changed no file and no definition.
    assert_eq!(
        sources(&env.client.ok(["domain", "dumpxml", "imp"])),
        vec![top.clone()]
    );

    // The export keeps what vmsnap does not act on, exactly as written.
    let out = env.client.ok(["dumpxml", "imp", "s1"]);
    assert!(
        out.contains("<interface type='network'>\n        <mac address='52:54:00:12:34:56'/>"),
        "{out}"
    );
    assert!(out.contains(COOKIE), "{out}");
    assert!(out.contains("<description>imported ☃ &amp; kept</description>"));
    assert!(
        out.contains("<disk name='vda' snapshot='internal'/>"),
        "{out}"
    );
    let out2 = env.client.ok(["dumpxml", "imp", "s2"]);
    assert!(
        out2.contains(&format!(
            "<disk name='vda' snapshot='external' type='file'>\n      <driver type='qcow2'/>\n      \
             <source file='{}'/>",
            top.display()
        )),
        "{out2}"
    );
    assert!(
        out2.contains("<parent>\n    <name>s1</name>\n  </parent>"),
        "{out2}"
    );

    // The export redefines to the same snapshot: forget s2's record, redefine it from its
    // own export, and the export is unchanged.
    let exported = env.write_xml("s2-export", &out2);
    env.client.ok(["delete", "imp", "s2", "--metadata-only"]);
    env.client
        .ok(["redefine", "imp", exported.to_str().unwrap(), "--current"]);
    assert_eq!(env.client.ok(["dumpxml", "imp", "s2"]), out2);

    // Revert to the internal snapshot: base.qcow2 backs top.qcow2, so a private copy takes
    // the tag's data and base.qcow2 and top.qcow2 keep theirs.
    env.client.ok(["revert", "imp", "s1"]);
    let now = sources(&env.client.ok(["domain", "dumpxml", "imp"]));
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], base);
    assert!(qemu_io_verify_pattern(&now[0], "qcow2", 0xa1, 0, KIB64));
    assert!(qemu_io_verify_pattern(&base, "qcow2", 0xb2, 0, KIB64));
    assert!(qemu_io_verify_pattern(&top, "qcow2", 0xc3, 0, KIB64));

    // Revert to the external snapshot: a new overlay on base.qcow2, holding 0xb2.
    env.client.ok(["revert", "imp", "s2"]);
    let now = sources(&env.client.ok(["domain", "dumpxml", "imp"]));
    let chain = qemu_img_info(&now[0]);
    assert_eq!(chain[1]["filename"].as_str(), base.to_str(), "{chain}");
    assert!(qemu_io_verify_pattern(&now[0], "qcow2", 0xb2, 0, KIB64));
    assert!(qemu_io_verify_pattern(&top, "qcow2", 0xc3, 0, KIB64));
    let current: Vec<bool> = listing(&env, "imp").iter().map(|s| s.1).collect();
    assert_eq!(current, vec![false, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redefine_untrue_or_hostile_documents_change_nothing() {
    let env = TestEnv::start();
    let (base, top) = libvirt_chain(&env);
    define(&env, "ref", &top);
    let good = env.write_xml("good", &internal_doc("s1", UUID, &base));
    env.client.ok(["redefine", "ref", good.to_str().unwrap()]);

    let xml_dir = env.dir().join("docs");
    std::fs::create_dir(&xml_dir).unwrap();
    let doc = |name: &str, text: &str| -> PathBuf {
        let p = xml_dir.join(format!("{name}.xml"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let other = env.images_dir().join("other.qcow2");
    qemu_img_create(&other, "qcow2", "1M");
    let before_files = files(&env.images_dir());
    let before_list = listing(&env, "ref");
    let before_tags = qemu_img_snapshots(&base);
    let before_def = env.client.ok(["domain", "dumpxml", "ref"]);

    let mut cases: Vec<(String, PathBuf, i32, String)> = vec![
        (
            "name taken".into(),
            good.clone(),
            4,
            "already has a snapshot named \"s1\"".into(),
        ),
        (
            "no such tag".into(),
            doc("ghost", &internal_doc("ghost", UUID, &base)),
            7,
            "holds no internal snapshot".into(),
        ),
        (
            "tag in another image".into(),
            doc("elsewhere", &internal_doc("s9", UUID, &other)),
            7,
            "holds no internal snapshot".into(),
        ),
        (
            "another domain's snapshot".into(),
            doc(
                "uuid",
                &internal_doc("s2", "00000000-1111-4222-8333-444444444444", &base),
            ),
            7,
            "UUID".into(),
        ),
        (
            "missing parent".into(),
            doc("orphan", &external_doc("s3", "nobody", &base, &top)),
            3,
            "\"nobody\"".into(),
        ),
        (
            "overlay on another backing file".into(),
            doc("backing", &external_doc("s4", "s1", &other, &top)),
            7,
            "is backed by".into(),
        ),
        (
            "overlay missing".into(),
            doc(
                "gone",
                &external_doc("s5", "s1", &base, &env.images_dir().join("gone.qcow2")),
            ),
            7,
            "does not exist".into(),
        ),
        (
            "memory file missing".into(),
            doc(
                "mem",
                &external_doc("s6", "s1", &base, &top)
                    .replace("<state>disk-snapshot</state>", "<state>running</state>")
                    .replace(
                        "<memory snapshot='no'/>",
                        &format!(
                            "<memory snapshot='external' file='{}'/>",
                            env.images_dir().join("s6.mem").display()
                        ),
                    ),
            ),
            7,
            "memory file".into(),
        ),
        (
            "state vmsnap does not record".into(),
            doc(
                "blocked",
                &internal_doc("s7", UUID, &base).replace("shutoff", "blocked"),
            ),
            8,
            "'blocked'".into(),
        ),
        (
            "no creation time".into(),
            doc(
                "notime",
                &internal_doc("s8", UUID, &base)
                    .replace("<creationTime>1700000000</creationTime>", ""),
            ),
            7,
            "creationTime".into(),
        ),
        (
            "larger than 1 MiB".into(),
            doc(
                "huge",
                &internal_doc("s10", UUID, &base).replace("imported ☃", &"x".repeat(1 << 20)),
            ),
            7,
            "larger than".into(),
        ),
    ];
    // Every malformed or hostile document of the committed corpus.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/snapshot-xml/invalid");
    let mut hostile: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    hostile.sort();
    assert!(hostile.len() > 10);
    for p in hostile {
        cases.push((p.display().to_string(), p, 7, String::new()));
    }

    for (what, file, code, needle) in &cases {
        let (got, err) = env.client.err(["redefine", "ref", file.to_str().unwrap()]);
        assert_eq!(got, *code, "{what}: {err}");
        assert!(
            err.contains(needle.as_str()),
            "{what}: {err:?} lacks {needle:?}"
        );
        assert!(
            err.lines().count() == 1,
            "{what}: more than one line: {err}"
        );
    }

    assert_eq!(listing(&env, "ref"), before_list);
    assert_eq!(files(&env.images_dir()), before_files);
    assert_eq!(qemu_img_snapshots(&base), before_tags);
    assert_eq!(env.client.ok(["domain", "dumpxml", "ref"]), before_def);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xml_input_limits_refuse_hostile_domain_and_snapshot_documents() {
    let env = TestEnv::start();
    let disk = env.images_dir().join("a.qcow2");
    qemu_img_create(&disk, "qcow2", "1M");
    let good = domain_xml("lim", &[DiskSpec::new(&disk, "qcow2", "vda")]);
    let laughs = format!(
        "<!DOCTYPE domain [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>]>{}",
        good.replace(
            "<vcpu>1</vcpu>",
            "<vcpu>1</vcpu><description>&b;</description>"
        )
    );
    let external = format!(
        "<!DOCTYPE domain [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>{}",
        good.replace(
            "<vcpu>1</vcpu>",
            "<vcpu>1</vcpu><description>&x;</description>"
        )
    );
    let huge = good.replace(
        "<vcpu>1</vcpu>",
        &format!(
            "<vcpu>1</vcpu><description>{}</description>",
            "y".repeat(1 << 20)
        ),
    );
    let unbalanced = good.replace("</devices>", "");
    for (what, xml, needle) in [
        ("entity expansion", laughs, "DOCTYPE"),
        ("external entity", external, "DOCTYPE"),
        ("over 1 MiB", huge, "larger than"),
        ("unbalanced", unbalanced, "malformed"),
    ] {
        let f = env.write_xml("hostile", &xml);
        let e = env
            .client
            .err_json(["domain", "define", f.to_str().unwrap()]);
        assert_eq!(
            e["error"], "org.vmsnap.VmSnap1.Error.InvalidArgument",
            "{what}: {e}"
        );
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{what}: {e}"
        );
    }
    assert_eq!(
        env.client
            .json(["domain", "list"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // The same for a snapshot creation document.
    let f = env.write_xml("lim", &good);
    env.client.ok(["domain", "define", f.to_str().unwrap()]);
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/snapshot-xml/invalid");
    for name in [
        "billion-laughs.xml",
        "external-entity.xml",
        "unbalanced.xml",
    ] {
        let p = corpus.join(name);
        let e = env
            .client
            .err_json(["create", "lim", "--xml", p.to_str().unwrap()]);
        assert_eq!(
            e["error"], "org.vmsnap.VmSnap1.Error.InvalidArgument",
            "{name}: {e}"
        );
    }
    assert!(listing(&env, "lim").is_empty());
    assert!(qemu_img_snapshots(&disk).is_empty());
    assert_eq!(
        files(&env.images_dir()).len(),
        3,
        "a.qcow2, hostile.xml and lim.xml only"
    );
}

fn counter(env: &TestEnv, dom: &str) -> u32 {
    let out = env.client.ok([
        "domain",
        "monitor",
        dom,
        "--hmp",
        &format!("xp /1wx 0x{:x}", vmsnap_tests::COUNTER_ADDR),
    ]);
    vmsnap_tests::guest::parse_xp_word(&out).unwrap_or_else(|| panic!("bad xp output {out:?}"))
}

/// Lets the counter guest run until its counter moved past `from`, then pauses it and returns
/// the paused value.
fn run_then_pause(env: &TestEnv, dom: &str, from: u32) -> u32 {
    env.client.ok(["domain", "resume", dom]);
    vmsnap_tests::poll_until(Deadline::step(), "the counter to move on", || {
        (counter(env, dom) != from).then_some(())
    });
    env.client.ok(["domain", "pause", dom]);
    counter(env, dom)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redefine_own_checkpoints_from_their_export_restores_ram() {
    let env = TestEnv::start();
    let a = env.images_dir().join("vda.qcow2");
    vmsnap_tests::counter_boot_qcow2(&a);
    let f = env.write_xml(
        "own",
        &domain_xml("own", &[DiskSpec::new(&a, "qcow2", "vda")]),
    );
    env.client.ok(["domain", "define", f.to_str().unwrap()]);
    env.client.ok(["domain", "start", "own"]);
    vmsnap_tests::poll_until(Deadline::step(), "counting", || {
        (counter(&env, "own") != 0).then_some(())
    });
    env.client.ok(["domain", "pause", "own"]);
    let saved1 = counter(&env, "own");
    env.client.ok(["create", "own", "--name", "i1"]);
    let saved2 = run_then_pause(&env, "own", saved1);
    let mem = env.images_dir().join("x1.mem");
    env.client.ok([
        "create",
        "own",
        "--name",
        "x1",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    run_then_pause(&env, "own", saved2);
    let i1 = env.client.ok(["dumpxml", "own", "i1"]);
    let x1 = env.client.ok(["dumpxml", "own", "x1"]);
    assert!(i1.contains("<memory snapshot='internal'/>"), "{i1}");
    assert!(
        x1.contains(&format!(
            "<memory snapshot='external' file='{}'/>",
            mem.display()
        )),
        "{x1}"
    );

    // Forget both records (the files stay), then redefine them from their exports.
    env.client.ok(["delete", "own", "x1", "--metadata-only"]);
    env.client.ok(["delete", "own", "i1", "--metadata-only"]);
    assert!(listing(&env, "own").is_empty());
    // As if from another host: the embedded domain has another name and no UUID. The
    // snapshot still belongs to this domain, and a revert keeps its name and UUID.
    let uuid = env.client.json(["domain", "info", "own"])["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let i1 = i1
        .replace("<name>own</name>", "<name>elsewhere</name>")
        .replace(&format!("<uuid>{uuid}</uuid>"), "");
    assert!(
        !i1.contains(&uuid) && i1.contains("<name>elsewhere</name>"),
        "{i1}"
    );
    let i1_file = env.write_xml("i1", &i1);
    let x1_file = env.write_xml("x1", &x1);
    env.client
        .ok(["redefine", "own", i1_file.to_str().unwrap()]);
    env.client
        .ok(["redefine", "own", x1_file.to_str().unwrap(), "--current"]);
    assert_eq!(env.client.ok(["dumpxml", "own", "i1"]), i1);
    assert_eq!(env.client.ok(["dumpxml", "own", "x1"]), x1);
    assert_eq!(
        listing(&env, "own"),
        vec![
            ("i1".to_string(), false, String::new()),
            ("x1".to_string(), true, "i1".to_string())
        ]
    );

    // Each reverts to its own RAM.
    env.client.ok(["revert", "own", "i1", "--paused"]);
    assert_eq!(counter(&env, "own"), saved1, "internal VM state");
    let info = env.client.json(["domain", "info", "own"]);
    assert_eq!(info["uuid"], uuid.as_str(), "{info}");
    assert_eq!(info["name"], "own", "{info}");
    env.client.ok(["revert", "own", "x1", "--paused"]);
    assert_eq!(counter(&env, "own"), saved2, "external VM state");
    env.client.ok(["domain", "destroy", "own"]);
}
