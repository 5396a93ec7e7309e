//! Paths and names: every file vmsnapd opens or creates for a caller lies inside its storage
//! directories (the harness's daemon has the test directory), reached without links, and is a
//! regular file nobody else uses; names and descriptions keep to their limits. Each refusal
//! is typed and changes nothing.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use serde_json::Value;
use vmsnap_tests::{DiskSpec, TestEnv, domain_xml, qemu_img_create, qemu_img_create_overlay};

const NOT_AUTHORIZED: &str = "org.vmsnap.VmSnap1.Error.NotAuthorized";
const INVALID: &str = "org.vmsnap.VmSnap1.Error.InvalidArgument";
const EXISTS: &str = "org.vmsnap.VmSnap1.Error.AlreadyExists";

fn image(env: &TestEnv, name: &str) -> PathBuf {
    let p = env.images_dir().join(name);
    qemu_img_create(&p, "qcow2", "16M");
    p
}

fn define(env: &TestEnv, name: &str, disk: &Path) {
    let xml = env.write_xml(
        name,
        &domain_xml(name, &[DiskSpec::new(disk, "qcow2", "vda")]),
    );
    env.client.ok(["domain", "define", xml.to_str().unwrap()]);
}

/// Defines `name` with a disk at `source` (raw text, not checked here) expecting `error`
/// whose message contains `says`.
fn define_refused(env: &TestEnv, name: &str, source: &str, error: &str, says: &str) {
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{source}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
    );
    let file = env.write_xml(&format!("{name}-refused"), &xml);
    let e = env
        .client
        .err_json(["domain", "define", file.to_str().unwrap()]);
    assert_eq!(e["error"], error, "disk {source}: {e}");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains(says),
        "disk {source}: {msg:?} should say {says:?}"
    );
}

fn domain_names(env: &TestEnv) -> Vec<String> {
    let v = env.client.json(["domain", "list"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

fn snapshot_names(env: &TestEnv, dom: &str) -> Vec<String> {
    let v = env.client.json(["list", dom]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Every file below `dir` (not following links).
fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.insert(e.path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confinement_disk_images_outside_storage_through_links_or_special_are_refused() {
    let env = TestEnv::start();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("x.qcow2");
    qemu_img_create(&secret, "qcow2", "16M");
    let images = env.images_dir();
    symlink(&secret, images.join("link.qcow2")).unwrap();
    symlink(outside.path(), images.join("dirlink")).unwrap();
    nix::sys::stat::mknod(
        &images.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    // An image inside whose backing file is outside (a raw /etc/shadow would do as well).
    let smuggler = images.join("smuggler.qcow2");
    qemu_img_create_overlay(&smuggler, &secret, "qcow2");
    let dots = format!("{}/../../../../../etc/shadow", images.display());
    let catalog = env.dir().join("state/catalog.sqlite3");
    assert!(catalog.exists(), "the catalog is where the test expects it");
    for (source, error, says) in [
        (
            "/etc/shadow",
            NOT_AUTHORIZED,
            "outside the storage directories",
        ),
        (dots.as_str(), INVALID, "'..'"),
        (secret.to_str().unwrap(), NOT_AUTHORIZED, "outside"),
        (
            &images.join("link.qcow2").display().to_string(),
            NOT_AUTHORIZED,
            "symbolic link",
        ),
        (
            &images.join("dirlink/x.qcow2").display().to_string(),
            NOT_AUTHORIZED,
            "symbolic link",
        ),
        (
            &images.join("null").display().to_string(),
            NOT_AUTHORIZED,
            "character device",
        ),
        ("/dev/null", NOT_AUTHORIZED, "outside"),
        (smuggler.to_str().unwrap(), NOT_AUTHORIZED, "outside"),
        (
            catalog.to_str().unwrap(),
            NOT_AUTHORIZED,
            "own state or runtime directory",
        ),
        (
            &images.join("missing.qcow2").display().to_string(),
            INVALID,
            "does not exist",
        ),
    ] {
        define_refused(&env, "bad", source, error, says);
    }
    assert!(
        domain_names(&env).is_empty(),
        "a refused define left a domain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confinement_images_of_other_domains_and_of_snapshots_are_refused() {
    let env = TestEnv::start();
    let a = image(&env, "a.qcow2");
    let b = image(&env, "b.qcow2");
    define(&env, "one", &a);

    // Another domain's disk, by its path or by a hard link to it.
    define_refused(
        &env,
        "two",
        a.to_str().unwrap(),
        EXISTS,
        "in use by domain \"one\"",
    );
    let hard = env.images_dir().join("a-again.qcow2");
    std::fs::hard_link(&a, &hard).unwrap();
    define_refused(
        &env,
        "two",
        hard.to_str().unwrap(),
        EXISTS,
        "domain \"one\"",
    );

    define(&env, "two", &b);
    let disk = DiskSpec::new(&a, "qcow2", "vdb").xml();
    let disk_file = env.images_dir().join("vdb.xml");
    std::fs::write(&disk_file, disk).unwrap();
    let e = env
        .client
        .err_json(["domain", "attach-disk", "two", disk_file.to_str().unwrap()]);
    assert_eq!(e["error"], EXISTS, "{e}");
    let xml = env.client.ok(["domain", "dumpxml", "two"]);
    assert!(
        !xml.contains("a.qcow2"),
        "the refused disk was added: {xml}"
    );

    // After an external snapshot, one's old image holds the snapshot's data: nobody may
    // take it as a disk, not even its own domain.
    env.client
        .ok(["create", "one", "--name", "ext", "--disk-only"]);
    define_refused(
        &env,
        "three",
        a.to_str().unwrap(),
        EXISTS,
        "snapshot \"ext\" of domain \"one\"",
    );
    let vdb = DiskSpec::new(&a, "qcow2", "vdb").xml();
    std::fs::write(&disk_file, vdb).unwrap();
    let e = env.client.err_json([
        "domain",
        "attach-disk",
        "--config-only",
        "one",
        disk_file.to_str().unwrap(),
    ]);
    assert_eq!(e["error"], EXISTS, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("snapshot \"ext\" of domain \"one\""),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confinement_new_snapshot_files_outside_or_through_links_are_refused() {
    let env = TestEnv::start();
    let a = image(&env, "a.qcow2");
    define(&env, "d", &a);
    let outside = tempfile::tempdir().unwrap();
    let images = env.images_dir();
    symlink(outside.path(), images.join("dirlink")).unwrap();
    symlink(
        outside.path().join("new.qcow2"),
        images.join("dangling.qcow2"),
    )
    .unwrap();
    let before = files_under(&images);

    let ext = |file: String| format!("vda=external:{file}");
    for (file, error, says) in [
        (
            outside.path().join("o.qcow2").display().to_string(),
            NOT_AUTHORIZED,
            "outside",
        ),
        (
            images.join("dirlink/o.qcow2").display().to_string(),
            NOT_AUTHORIZED,
            "symbolic link",
        ),
        (format!("{}/../o.qcow2", images.display()), INVALID, ".."),
        (
            env.dir().join("state/o.qcow2").display().to_string(),
            NOT_AUTHORIZED,
            "own state",
        ),
        (
            env.dir().join("run/o.qcow2").display().to_string(),
            NOT_AUTHORIZED,
            "own state",
        ),
        (
            images.join("dangling.qcow2").display().to_string(),
            EXISTS,
            "already exists",
        ),
        ("/dev/null".to_string(), EXISTS, "exists"),
        ("../../etc/shadow".to_string(), INVALID, "absolute"),
    ] {
        let e = env.client.err_json([
            "create",
            "d",
            "--name",
            "s",
            "--disk-only",
            "--disk",
            &ext(file.clone()),
        ]);
        assert_eq!(e["error"], error, "{file}: {e}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(says), "{file}: {msg:?} should say {says:?}");
    }
    assert!(snapshot_names(&env, "d").is_empty());
    assert_eq!(
        files_under(&images),
        before,
        "a refused snapshot left files"
    );
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "a file was created outside the storage directories"
    );

    // A memory file outside, with the guest running: refused, the guest undisturbed.
    env.client.ok(["domain", "start", "d"]);
    let mem = outside.path().join("m.vmstate");
    let e = env.client.err_json([
        "create",
        "d",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
    ]);
    assert_eq!(e["error"], NOT_AUTHORIZED, "{e}");
    assert!(!mem.exists());
    let d: Value = env.client.json(["domain", "list"]);
    assert_eq!(d[0]["state"], "running", "{d}");

    // The same inside: created, private to the daemon.
    let overlay = images.join("a.s.qcow2");
    let mem = images.join("m.vmstate");
    env.client.ok([
        "create",
        "d",
        "--name",
        "s",
        "--memory",
        "external",
        "--memory-file",
        mem.to_str().unwrap(),
        "--disk",
        &ext(overlay.display().to_string()),
    ]);
    for f in [&overlay, &mem] {
        let mode = std::fs::metadata(f).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", f.display());
    }
    env.client.ok(["domain", "destroy", "d"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confinement_names_with_separators_controls_or_excess_are_refused() {
    let env = TestEnv::start();
    let a = image(&env, "a.qcow2");
    let long_domain = "d".repeat(65);
    for bad in [
        "a/b",
        "../../etc/shadow",
        "a\nb",
        "a&#0;b",
        "a&#10;b",
        "-x",
        ".x",
        "ü",
        long_domain.as_str(),
    ] {
        let xml = format!(
            "<domain type='qemu'><name>{bad}</name><memory unit='MiB'>64</memory></domain>"
        );
        let file = env.write_xml("bad-name", &xml);
        let e = env
            .client
            .err_json(["domain", "define", file.to_str().unwrap()]);
        assert_eq!(e["error"], INVALID, "domain name {bad:?}: {e}");
    }
    let huge = "x".repeat(2 << 20);
    let file = env.write_xml(
        "huge",
        &format!("<domain type='qemu'><name>{huge}</name><memory unit='MiB'>64</memory></domain>"),
    );
    let e = env
        .client
        .err_json(["domain", "define", file.to_str().unwrap()]);
    assert_eq!(e["error"], INVALID, "{}", e["message"]);
    assert!(domain_names(&env).is_empty());

    define(&env, "n", &a);
    let long_snapshot = "s".repeat(129);
    let huge_snapshot = "s".repeat(100_000);
    for bad in [
        "a/b",
        "../../etc/shadow",
        "a\nb",
        "tab\there",
        "-x",
        ".hidden",
        "..",
        long_snapshot.as_str(),
        huge_snapshot.as_str(),
    ] {
        let e = env
            .client
            .err_json(["create", "n", &format!("--name={bad}"), "--disk-only"]);
        assert_eq!(
            e["error"],
            INVALID,
            "snapshot name {:?}: {e}",
            &bad[..bad.len().min(20)]
        );
    }
    let e = env.client.err_json([
        "create",
        "n",
        "--name",
        "ok",
        "--description",
        &"d".repeat(4097),
    ]);
    assert_eq!(e["error"], INVALID, "{e}");

    // NUL cannot travel in a D-Bus string: whichever side stops it (zbus, the bus, the
    // daemon), nothing is created. Its own connection, since the bus may drop it.
    let domain = |conn: zbus::Connection| async move {
        let m = vmsnap_dbus::proxy::ManagerProxy::new(&conn).await.unwrap();
        let dpath = m.find_domain("n").await.unwrap();
        vmsnap_dbus::proxy::DomainProxy::builder(&conn)
            .path(dpath)
            .build()
            .await
            .unwrap()
    };
    let nul = domain(env.connect().await).await;
    assert!(
        nul.create_snapshot("a\0b", "", std::collections::HashMap::new())
            .await
            .is_err()
    );
    let d = domain(env.connect().await).await;
    assert!(
        snapshot_names(&env, "n").is_empty(),
        "a refused name left a snapshot"
    );

    // Unicode letters and spaces are fine; the object path carries only ids.
    let name = "Vor dem Update ☺ é";
    env.client
        .ok(["create", "n", "--name", name, "--disk-only"]);
    assert_eq!(snapshot_names(&env, "n"), [name]);
    let path = d.find_snapshot(name).await.unwrap().to_string();
    assert!(
        path.starts_with("/org/vmsnap/VmSnap1/domain/")
            && path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '/' || c == '_'),
        "{path}"
    );
}
