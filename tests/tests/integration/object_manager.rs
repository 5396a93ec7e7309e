//! The daemon's own `org.freedesktop.DBus.ObjectManager` at the root: `GetManagedObjects`
//! lists every domain, snapshot and job with exactly what `Properties.GetAll` says of each,
//! nothing is announced while the daemon starts, and objects added or removed afterwards are
//! announced with `InterfacesAdded` (with their properties) and `InterfacesRemoved`.

use std::collections::HashMap;

use vmsnap_dbus::names::{
    BUS_NAME, DOMAIN_INTERFACE, JOB_INTERFACE, ROOT_PATH, SNAPSHOT_INTERFACE,
};
use vmsnap_dbus::proxy::{DomainProxy, ManagerProxy};
use vmsnap_tests::{Deadline, DiskSpec, EventRecorder, Signal, TestEnv, qemu_img_create};
use zbus::fdo::{ManagedObjects, ObjectManagerProxy, PropertiesProxy};
use zbus::names::InterfaceName;
use zbus::{Connection, OwnedObjectPath, OwnedVariant};

const OBJECT_MANAGER: &str = "org.freedesktop.DBus.ObjectManager";

/// Defines domain `name` with one fresh qcow2 disk.
fn define(env: &TestEnv, name: &str) {
    let img = env.images_dir().join(format!("{name}.qcow2"));
    qemu_img_create(&img, "qcow2", "16M");
    let xml = env.write_xml(
        &format!("{name}.xml"),
        &vmsnap_tests::domain_xml(name, &[DiskSpec::new(&img, "qcow2", "vda")]),
    );
    env.client.ok(["domain", "define", xml.to_str().unwrap()]);
}

async fn managed_objects(conn: &Connection) -> ManagedObjects {
    ObjectManagerProxy::builder(conn)
        .destination(BUS_NAME)
        .path(ROOT_PATH)
        .build()
        .await
        .unwrap()
        .get_managed_objects()
        .await
        .unwrap()
}

async fn get_all(conn: &Connection, path: &str, iface: &str) -> HashMap<String, OwnedVariant> {
    PropertiesProxy::builder(conn)
        .destination(BUS_NAME)
        .path(path.to_owned())
        .build()
        .await
        .unwrap()
        .get_all(InterfaceName::try_from(iface.to_owned()).unwrap())
        .await
        .unwrap_or_else(|e| panic!("GetAll({iface}) of {path}: {e}"))
}

/// The single interface an object of `path` is listed with, and its properties.
fn only_interface<'a>(
    objects: &'a ManagedObjects,
    path: &str,
) -> (&'a str, &'a HashMap<String, OwnedVariant>) {
    let p = OwnedObjectPath::try_from(path.to_owned()).unwrap();
    let ifaces = objects
        .get(&p)
        .unwrap_or_else(|| panic!("{path} is not listed: {:?}", objects.keys()));
    assert_eq!(ifaces.len(), 1, "{path} has one interface: {ifaces:?}");
    let (name, props) = ifaces.iter().next().unwrap();
    (name.as_str(), props)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_manager_listing_matches_get_all_of_every_object() {
    let env = TestEnv::start();
    define(&env, "om");
    define(&env, "om2");
    env.client.ok(["create", "om", "--name", "internal"]);
    env.client
        .ok(["create", "om", "--name", "external", "--disk-only"]);
    env.client
        .ok(["create", "om", "--name", "branch", "--parent", "internal"]);
    let conn = env.connect().await;
    // A create over D-Bus, as a job, here one followed asynchronously.
    let domain = ManagerProxy::new(&conn).await.unwrap();
    let om_path = domain.find_domain("om").await.unwrap();
    let om = DomainProxy::builder(&conn)
        .path(om_path.clone())
        .build()
        .await
        .unwrap();
    let mut async_opt = HashMap::new();
    async_opt.insert("async", zbus::Variant::from(true));
    async_opt.insert("disk-only", zbus::Variant::from(true));
    let job = om
        .create_snapshot("by-job", "made by a job", async_opt)
        .await
        .unwrap();
    assert!(job.as_str().contains("/job/"), "{job}");
    vmsnap_tests::poll_until_async(Deadline::step(), "the job to finish", || async {
        let props = get_all(&conn, job.as_str(), JOB_INTERFACE).await;
        bool::try_from(&props["Finished"]).unwrap().then_some(())
    })
    .await;

    // Every create above ran as a job, and each job object lingers for a few seconds.
    let jobs = domain.jobs().await.unwrap();
    assert!(jobs.contains(&job), "{jobs:?}");
    let objects = managed_objects(&conn).await;
    let snapshots = om.list_snapshots().await.unwrap();
    assert_eq!(snapshots.len(), 4);
    let mut expected: Vec<(String, &str)> = vec![(om_path.to_string(), DOMAIN_INTERFACE)];
    expected.push((
        domain.find_domain("om2").await.unwrap().to_string(),
        DOMAIN_INTERFACE,
    ));
    expected.extend(
        snapshots
            .iter()
            .map(|p| (p.to_string(), SNAPSHOT_INTERFACE)),
    );
    expected.extend(jobs.iter().map(|p| (p.to_string(), JOB_INTERFACE)));
    let mut listed: Vec<&str> = objects.keys().map(|p| p.as_str()).collect();
    listed.sort_unstable();
    let mut want: Vec<&str> = expected.iter().map(|(p, _)| p.as_str()).collect();
    want.sort_unstable();
    assert_eq!(listed, want, "exactly the served objects are listed");

    for (path, iface) in &expected {
        let (name, listed) = only_interface(&objects, path);
        assert_eq!(name, *iface, "{path}");
        let direct = get_all(&conn, path, iface).await;
        assert_eq!(
            listed, &direct,
            "GetManagedObjects and GetAll differ for {path}"
        );
    }

    // The values themselves, for one snapshot of each kind (GetAll is checked above).
    let by_name = |n: &str| {
        snapshots
            .iter()
            .map(|p| only_interface(&objects, p.as_str()).1)
            .find(|props| String::try_from(props["Name"].try_clone().unwrap()).unwrap() == n)
            .unwrap_or_else(|| panic!("no snapshot {n}"))
    };
    let internal = by_name("internal");
    let children =
        <Vec<OwnedObjectPath>>::try_from(internal["Children"].try_clone().unwrap()).unwrap();
    assert_eq!(children.len(), 2, "external and branch hang below internal");
    let external = by_name("external");
    assert!(u64::try_from(&external["SizeOnDisk"]).unwrap() > 0);
    let by_job = by_name("by-job");
    assert!(bool::try_from(&by_job["IsCurrent"]).unwrap());
    assert_eq!(
        String::try_from(by_job["Description"].try_clone().unwrap()).unwrap(),
        "made by a job"
    );
}

/// Whether `s` is the object manager's `InterfacesAdded` for `path`.
fn is_added(s: &Signal, path: &str) -> bool {
    s.path == ROOT_PATH
        && s.interface == OBJECT_MANAGER
        && s.member == "InterfacesAdded"
        && s.message
            .body()
            .deserialize::<(
                OwnedObjectPath,
                HashMap<String, HashMap<String, OwnedVariant>>,
            )>()
            .is_ok_and(|(p, _)| p.as_str() == path)
}

/// Whether `s` is the object manager's `InterfacesRemoved` of `iface` at `path`.
fn is_removed(s: &Signal, path: &str, iface: &str) -> bool {
    s.path == ROOT_PATH
        && s.interface == OBJECT_MANAGER
        && s.member == "InterfacesRemoved"
        && s.message
            .body()
            .deserialize::<(OwnedObjectPath, Vec<String>)>()
            .is_ok_and(|(p, i)| p.as_str() == path && i == [iface])
}

/// The properties an `InterfacesAdded` signal gives for interface `iface`.
fn added_props(s: &Signal, iface: &str) -> HashMap<String, OwnedVariant> {
    let (_, mut ifaces): (
        OwnedObjectPath,
        HashMap<String, HashMap<String, OwnedVariant>>,
    ) = s.message.body().deserialize().unwrap();
    assert_eq!(ifaces.len(), 1, "one interface: {ifaces:?}");
    ifaces
        .remove(iface)
        .unwrap_or_else(|| panic!("{iface} missing: {ifaces:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_manager_objects_after_start_are_announced_and_none_at_start() {
    let mut env = TestEnv::start();
    define(&env, "ann");
    env.client.ok(["create", "ann", "--name", "old"]);
    // Restart while recording: the start announces nothing.
    env.daemon.stop();
    let conn = env.connect().await;
    let rec = EventRecorder::vmsnap(&conn).await.unwrap();
    env.daemon.start_again();
    let domain = ManagerProxy::new(&conn).await.unwrap();
    let path = domain.find_domain("ann").await.unwrap();
    let objects = managed_objects(&conn).await;
    assert_eq!(objects.len(), 2, "the domain and its snapshot: {objects:?}");
    assert!(
        rec.events().iter().all(|s| s.interface != OBJECT_MANAGER),
        "nothing is announced at start: {:?}",
        rec.events()
            .iter()
            .map(|s| format!("{} {}", s.path, s.member))
            .collect::<Vec<_>>()
    );

    // A new snapshot: announced with its properties, as GetAll gives them.
    env.client.ok(["create", "ann", "--name", "new"]);
    let dom = DomainProxy::builder(&conn)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let new = dom.find_snapshot("new").await.unwrap();
    let added = rec
        .wait_for(
            Deadline::step(),
            "InterfacesAdded of the new snapshot",
            |s| is_added(s, new.as_str()),
        )
        .await;
    let props = added_props(&added, SNAPSHOT_INTERFACE);
    assert_eq!(
        String::try_from(props["Name"].try_clone().unwrap()).unwrap(),
        "new"
    );
    assert_eq!(
        props,
        get_all(&conn, new.as_str(), SNAPSHOT_INTERFACE).await
    );
    let listed = managed_objects(&conn).await;
    assert!(listed.contains_key(&new), "the new snapshot is listed");

    // A new domain, then its removal.
    define(&env, "ann2");
    let path2 = domain.find_domain("ann2").await.unwrap();
    let added = rec
        .wait_for(Deadline::step(), "InterfacesAdded of the new domain", |s| {
            is_added(s, path2.as_str())
        })
        .await;
    let props = added_props(&added, DOMAIN_INTERFACE);
    assert_eq!(
        String::try_from(props["Name"].try_clone().unwrap()).unwrap(),
        "ann2"
    );
    // Signals arrive in order: by now every announcement of `new` has come, and it came once.
    assert_eq!(
        rec.events()
            .iter()
            .filter(|s| is_added(s, new.as_str()))
            .count(),
        1,
        "one InterfacesAdded per new snapshot"
    );
    // Undefined with its snapshot records: the snapshot's object goes too.
    env.client.ok(["create", "ann2", "--name", "s2"]);
    let s2 = env.client.json(["info", "ann2", "s2"])["path"]
        .as_str()
        .unwrap()
        .to_string();
    env.client
        .ok(["domain", "undefine", "ann2", "--snapshots-metadata"]);
    // The snapshot's removal is announced first (the recorder skips what it passes).
    rec.wait_for(
        Deadline::step(),
        "InterfacesRemoved of the undefined domain's snapshot",
        |s| is_removed(s, &s2, SNAPSHOT_INTERFACE),
    )
    .await;
    rec.wait_for(Deadline::step(), "InterfacesRemoved of the domain", |s| {
        is_removed(s, path2.as_str(), DOMAIN_INTERFACE)
    })
    .await;
    let gone = PropertiesProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(s2.clone())
        .build()
        .await
        .unwrap()
        .get_all(InterfaceName::try_from(SNAPSHOT_INTERFACE).unwrap())
        .await;
    assert!(gone.is_err(), "the snapshot object is no longer served");

    // A deleted snapshot: announced as removed, and no longer listed.
    env.client.ok(["delete", "ann", "new"]);
    rec.wait_for(Deadline::step(), "InterfacesRemoved of the snapshot", |s| {
        is_removed(s, new.as_str(), SNAPSHOT_INTERFACE)
    })
    .await;
    let listed = managed_objects(&conn).await;
    assert!(!listed.contains_key(&new), "the deleted snapshot is gone");
    assert!(!listed.contains_key(&path2), "the undefined domain is gone");
}
