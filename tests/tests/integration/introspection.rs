//! The committed introspection XML (`dbus-interfaces/org.vmsnap.VmSnap1.xml`) must be what the
//! running daemon serves. Run with `VMSNAP_BLESS=1` to rewrite the committed file after an
//! intended API change.

use std::collections::HashMap;

use vmsnap_dbus::names::{BUS_NAME, ROOT_PATH};
use vmsnap_dbus::proxy::{DomainProxy, JobProxy, ManagerProxy};
use vmsnap_tests::{Deadline, DiskSpec, TestEnv, domain_xml, poll_until_async, qemu_img_create};
use zbus::fdo::IntrospectableProxy;

/// The `<interface name="org.vmsnap.VmSnap1.*">` blocks of an introspection document.
fn vmsnap_interfaces(xml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<interface name=\"org.vmsnap.VmSnap1.") {
        let block = &rest[start..];
        let end =
            block.find("</interface>").expect("unterminated interface") + "</interface>".len();
        let text = &block[..end];
        let name = text["<interface name=\"".len()..]
            .split('"')
            .next()
            .unwrap()
            .to_string();
        // Nested objects are introspected at a deeper indentation: compare without it.
        let flat: Vec<&str> = text.lines().map(str::trim).collect();
        out.push((name, flat.join("\n")));
        rest = &block[end..];
    }
    out
}

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
    let mut blocks: Vec<(String, String)> = Vec::new();
    for x in [
        introspect(&conn, ROOT_PATH).await,
        introspect(&conn, dpath.as_str()).await,
        job_xml,
        introspect(&conn, spath.as_str()).await,
    ] {
        blocks.extend(vmsnap_interfaces(&x));
    }
    blocks.sort();
    for w in blocks.windows(2) {
        if w[0].0 == w[1].0 {
            assert_eq!(w[0].1, w[1].1, "one interface introspected two ways");
        }
    }
    blocks.dedup();
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "org.vmsnap.VmSnap1.Domain",
            "org.vmsnap.VmSnap1.Job",
            "org.vmsnap.VmSnap1.Manager",
            "org.vmsnap.VmSnap1.Snapshot"
        ]
    );
    let mut doc = String::from(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
    );
    for (_, text) in &blocks {
        for line in text.lines() {
            doc.push_str("  ");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    doc.push_str("</node>\n");
    let committed_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dbus-interfaces/org.vmsnap.VmSnap1.xml"
    );
    if std::env::var_os("VMSNAP_BLESS").is_some() {
        std::fs::write(committed_path, &doc).unwrap();
    }
    let committed = std::fs::read_to_string(committed_path).unwrap();
    assert!(
        committed == doc,
        "the committed introspection XML differs from the daemon's; if the change is intended, \
         run the test with VMSNAP_BLESS=1.\n--- daemon:\n{doc}"
    );
}
