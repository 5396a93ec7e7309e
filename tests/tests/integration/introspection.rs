//! The committed introspection XML (`dbus-interfaces/org.vmsnap.VmSnap1.xml`) must be what the
//! running daemon serves, with each member's `///` comment (which zbus serves as an XML
//! comment) as an `org.freedesktop.DBus.DocString` annotation; every member must have one.
//! `cargo xtask dbus-xml` (this test with `VMSNAP_BLESS=1`) rewrites the committed file after
//! an intended API change.

use std::collections::HashMap;

use vmsnap_dbus::introspection;
use vmsnap_dbus::names::{BUS_NAME, ROOT_PATH};
use vmsnap_dbus::proxy::{DomainProxy, JobProxy, ManagerProxy};
use vmsnap_tests::{Deadline, DiskSpec, TestEnv, domain_xml, poll_until_async, qemu_img_create};
use zbus::fdo::IntrospectableProxy;

async fn introspect(conn: &zbus::Connection, path: &str) -> String {
    let p = IntrospectableProxy::builder(conn)
        .destination(BUS_NAME)
        .path(path.to_string())
        .build()
        .await
        .unwrap();
    p.introspect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_xml_matches_committed_file() {
    let env = TestEnv::start();
    let img = env.images_dir().join("a.qcow2");
    qemu_img_create(&img, "qcow2", "16M");
    let xml = env.write_xml(
        "d.xml",
        &domain_xml("intro", &[DiskSpec::new(&img, "qcow2", "vda")]),
    );
    env.client.ok(["domain", "define", xml.to_str().unwrap()]);
    let conn = env.connect().await;
    let m = ManagerProxy::new(&conn).await.unwrap();
    let dpath = m.find_domain("intro").await.unwrap();
    let d = DomainProxy::builder(&conn)
        .path(dpath.clone())
        .build()
        .await
        .unwrap();
    let mut o = HashMap::new();
    o.insert("async", zbus::Variant::Bool(true));
    let job_path = d.create_snapshot("s1", "", o).await.unwrap();
    let job = JobProxy::builder(&conn)
        .path(job_path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    let job_xml = introspect(&conn, job_path.as_str()).await;
    poll_until_async(Deadline::step(), "the snapshot job to finish", || async {
        job.finished().await.unwrap().then_some(())
    })
    .await;
    assert!(
        job.error_name().await.unwrap().is_empty(),
        "{}",
        job.error_message().await.unwrap()
    );
    let spath = job.result().await.unwrap();
    let docs = [
        introspect(&conn, ROOT_PATH).await,
        introspect(&conn, dpath.as_str()).await,
        job_xml,
        introspect(&conn, spath.as_str()).await,
    ];
    let served = introspection::parse(docs.iter().map(String::as_str))
        .unwrap_or_else(|e| panic!("the daemon's introspection does not parse: {e}"));
    let names: Vec<&str> = served.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "org.vmsnap.VmSnap1.Domain",
            "org.vmsnap.VmSnap1.Job",
            "org.vmsnap.VmSnap1.Manager",
            "org.vmsnap.VmSnap1.Snapshot"
        ]
    );
    let undocumented = served.undocumented();
    assert!(
        undocumented.is_empty(),
        "these D-Bus members have no doc: put a `///` comment on each in daemon/src/dbus/ \
         (zbus serves it; it becomes the DocString annotation), then re-bless:\n  {}",
        undocumented.join("\n  ")
    );
    let doc = introspection::render(&served);
    let committed_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dbus-interfaces/org.vmsnap.VmSnap1.xml"
    );
    if std::env::var_os("VMSNAP_BLESS").is_some() {
        std::fs::write(committed_path, &doc).unwrap();
    }
    let committed_text = std::fs::read_to_string(committed_path).unwrap();
    let committed = introspection::parse([committed_text.as_str()])
        .unwrap_or_else(|e| panic!("the committed introspection XML does not parse: {e}"));
    let missing = committed.undocumented();
    assert!(
        missing.is_empty(),
        "the committed XML lacks a {} annotation on:\n  {}",
        introspection::DOC_ANNOTATION,
        missing.join("\n  ")
    );
    let shape = served.shape_differences(&committed);
    assert!(
        shape.is_empty(),
        "the daemon's D-Bus API (first) differs from the committed XML (second), docs ignored; \
         if the change is intended, run `cargo xtask dbus-xml` (or this test with \
         VMSNAP_BLESS=1):\n  {}",
        shape.join("\n  ")
    );
    assert!(
        committed_text == doc,
        "the committed introspection XML's docs differ from the daemon's `///` comments; run \
         `cargo xtask dbus-xml` (or this test with VMSNAP_BLESS=1).\n--- expected:\n{doc}"
    );
}

/// The `<node name=…/>` children an introspection document lists.
fn child_nodes(xml: &str) -> Vec<String> {
    xml.lines()
        .filter_map(|l| l.trim().strip_prefix("<node name=\""))
        .filter_map(|l| l.split('"').next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_tree_walks_from_the_root_to_each_snapshot_and_nothing_else() {
    // Snapshot objects are not registered anywhere: the tree is answered from the catalog.
    let env = TestEnv::start();
    let conn = env.connect().await;
    let domains = format!("{ROOT_PATH}/domain");
    assert!(
        !child_nodes(&introspect(&conn, ROOT_PATH).await).contains(&"domain".to_string()),
        "no domain node before any domain"
    );
    let unknown = IntrospectableProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(domains.clone())
        .build()
        .await
        .unwrap()
        .introspect()
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("UnknownObject"), "{unknown}");

    let img = env.images_dir().join("t.qcow2");
    qemu_img_create(&img, "qcow2", "16M");
    let xml = env.write_xml(
        "t.xml",
        &domain_xml("tree", &[DiskSpec::new(&img, "qcow2", "vda")]),
    );
    env.client.ok(["domain", "define", xml.to_str().unwrap()]);
    env.client.ok(["create", "tree", "--name", "s1"]);
    env.client.ok(["create", "tree", "--name", "s2"]);
    let m = ManagerProxy::new(&conn).await.unwrap();
    let dpath = m.find_domain("tree").await.unwrap();
    let d = DomainProxy::builder(&conn)
        .path(dpath.clone())
        .build()
        .await
        .unwrap();
    let snaps = d.list_snapshots().await.unwrap();

    // Walk down from "/" by the child names each level lists.
    let mut path = String::new();
    for part in ["org", "vmsnap", "VmSnap1", "domain"] {
        let at = if path.is_empty() { "/" } else { path.as_str() };
        let children = child_nodes(&introspect(&conn, at).await);
        assert!(children.contains(&part.to_string()), "{at}: {children:?}");
        path = format!("{path}/{part}");
    }
    let id = dpath.as_str().rsplit('/').next().unwrap().to_string();
    assert_eq!(child_nodes(&introspect(&conn, &domains).await), [id]);
    assert_eq!(
        child_nodes(&introspect(&conn, dpath.as_str()).await),
        ["snapshot"]
    );
    let listed = child_nodes(&introspect(&conn, &format!("{}/snapshot", dpath.as_str())).await);
    let expected: Vec<String> = snaps
        .iter()
        .map(|p| p.as_str().rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(listed, expected);
    let leaf = introspect(&conn, snaps[1].as_str()).await;
    assert!(leaf.contains("org.vmsnap.VmSnap1.Snapshot"), "{leaf}");
    assert!(child_nodes(&leaf).is_empty());

    // Peer answers on any path, a snapshot's included; a path past the last id is unknown.
    zbus::fdo::PeerProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(snaps[0].clone())
        .build()
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    let gone = format!("{}/snapshot/999", dpath.as_str());
    let err = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(gone)
        .build()
        .await
        .unwrap()
        .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
            vmsnap_dbus::names::SNAPSHOT_INTERFACE,
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownObject"), "{err}");
}
