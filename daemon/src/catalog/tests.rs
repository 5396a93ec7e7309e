//! Unit tests of the catalog: file creation and versioning, the domain and snapshot operations
//! and their invariants (including a property test over random operation sequences), crash
//! survival of pending records, and a loose listing-speed bound.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::json;

use super::*;

fn new_domain(name: &str) -> NewDomain {
    NewDomain {
        name: name.into(),
        uuid: format!("uuid-{name}"),
        kind: DomainKind::Managed,
        xml: format!("<domain><name>{name}</name></domain>"),
        qmp_socket: None,
    }
}

fn new_snapshot(domain: DomainId, name: &str, parent: Option<SnapshotId>) -> NewSnapshot {
    NewSnapshot {
        domain_id: domain,
        name: name.into(),
        description: String::new(),
        created_at: 1_700_000_000,
        state: "running".into(),
        kind: "checkpoint".into(),
        parent,
        domain_xml: "<domain/>".into(),
        memory: json!({"mode": "internal", "file": null}),
        disks: json!([{"target": "vda", "file": "/var/lib/vmsnap/a.qcow2"}]),
        origin: "manual".into(),
        protected: false,
    }
}

fn committed(cat: &mut Catalog, d: DomainId, name: &str, parent: Option<SnapshotId>) -> SnapshotId {
    let s = cat
        .insert_pending_snapshot(&new_snapshot(d, name, parent))
        .unwrap();
    cat.commit_snapshot(s.id, true).unwrap();
    s.id
}

#[test]
fn open_creates_private_file_at_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state/vmsnap");
    let cat = Catalog::open(&state).unwrap();
    let file = state.join(CATALOG_FILE_NAME);
    assert_eq!(cat.path(), Some(file.as_path()));
    assert_eq!(cat.schema_version(), 2);
    assert_eq!(supported_schema_version(), 2);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let wal = state.join(format!("{CATALOG_FILE_NAME}-wal"));
    if wal.exists() {
        assert_eq!(
            std::fs::metadata(&wal).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let user_version: i64 = cat
        .conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(user_version, 2);
    let journal: String = cat
        .conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    let sync: i64 = cat
        .conn
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous=FULL");
    let fk: i64 = cat
        .conn
        .pragma_query_value(None, "foreign_keys", |r| r.get(0))
        .unwrap();
    assert_eq!(fk, 1);
}

#[test]
fn reopen_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = {
        let mut cat = Catalog::open(dir.path()).unwrap();
        let d = cat.insert_domain(&new_domain("web")).unwrap();
        let s = committed(&mut cat, d.id, "s1", None);
        (d, s)
    };
    let cat = Catalog::open(dir.path()).unwrap();
    assert_eq!(cat.schema_version(), 2);
    let got = cat.domain(d.id).unwrap();
    assert_eq!(got.name, "web");
    assert_eq!(got.current_snapshot, Some(s));
    assert_eq!(cat.domains().unwrap().len(), 1);
    let snap = cat.snapshot(s).unwrap();
    assert_eq!(snap.status, SnapshotStatus::Committed);
    assert_eq!(snap.disks, new_snapshot(d.id, "s1", None).disks);
}

#[test]
fn too_new_catalog_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Catalog::open(dir.path()).unwrap());
    let raw = Connection::open(dir.path().join(CATALOG_FILE_NAME)).unwrap();
    raw.pragma_update(None, "user_version", 7).unwrap();
    drop(raw);
    let err = Catalog::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            CatalogError::TooNew {
                found: 7,
                supported: 2
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains('7') && msg.contains('2'), "{msg}");
    // The refused file is left untouched.
    let raw = Connection::open(dir.path().join(CATALOG_FILE_NAME)).unwrap();
    let v: i64 = raw
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, 7);
}

#[test]
fn foreign_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Connection::open(dir.path().join(CATALOG_FILE_NAME)).unwrap();
    raw.execute_batch("CREATE TABLE other(x INTEGER);").unwrap();
    drop(raw);
    assert!(matches!(
        Catalog::open(dir.path()),
        Err(CatalogError::Corrupt(_))
    ));
}

#[test]
fn insert_and_duplicate_domain() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap();
    assert_eq!(cat.domain(d.id).unwrap(), d);
    assert_eq!(cat.domain_by_name("web").unwrap(), Some(d.clone()));
    assert_eq!(cat.domain_by_uuid("uuid-web").unwrap(), Some(d.clone()));
    assert_eq!(cat.domain_by_name("nope").unwrap(), None);
    assert_eq!(d.settings, json!({}));

    let err = cat.insert_domain(&new_domain("web")).unwrap_err();
    assert!(
        matches!(&err, CatalogError::AlreadyExists(m) if m.contains("\"web\"")),
        "{err}"
    );

    let mut same_uuid = new_domain("db");
    same_uuid.uuid = "uuid-web".into();
    let err = cat.insert_domain(&same_uuid).unwrap_err();
    assert!(
        matches!(&err, CatalogError::AlreadyExists(m) if m.contains("uuid-web")),
        "{err}"
    );

    let mut managed_socket = new_domain("x");
    managed_socket.qmp_socket = Some("/run/x.qmp".into());
    assert!(matches!(
        cat.insert_domain(&managed_socket),
        Err(CatalogError::Invalid(_))
    ));

    let mut attached = new_domain("ext");
    attached.kind = DomainKind::Attached;
    attached.qmp_socket = Some("/run/ext.qmp".into());
    let a = cat.insert_domain(&attached).unwrap();
    assert_eq!(
        cat.domain(a.id).unwrap().qmp_socket,
        Some("/run/ext.qmp".into())
    );
    assert_eq!(
        cat.domains()
            .unwrap()
            .iter()
            .map(|d| &d.name[..])
            .collect::<Vec<_>>(),
        ["ext", "web"]
    );

    cat.update_domain_xml(d.id, "<domain>new</domain>").unwrap();
    cat.set_domain_settings(d.id, &json!({"keep": 5})).unwrap();
    let got = cat.domain(d.id).unwrap();
    assert_eq!(got.xml, "<domain>new</domain>");
    assert_eq!(got.settings, json!({"keep": 5}));
    assert!(matches!(
        cat.update_domain_xml(DomainId(99), "x"),
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        cat.domain(DomainId(99)),
        Err(CatalogError::NotFound(_))
    ));
}

#[test]
fn pending_then_commit_sets_current() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let s = cat
        .insert_pending_snapshot(&new_snapshot(d, "s1", None))
        .unwrap();
    assert_eq!(s.status, SnapshotStatus::Pending);
    assert_eq!(cat.snapshot(s.id).unwrap(), s);
    assert_eq!(cat.domain(d).unwrap().current_snapshot, None);
    // A pending snapshot cannot be current.
    assert!(matches!(
        cat.set_current_snapshot(d, Some(s.id)),
        Err(CatalogError::Invalid(_))
    ));
    let dup = cat
        .insert_pending_snapshot(&new_snapshot(d, "s1", None))
        .unwrap_err();
    assert!(
        matches!(&dup, CatalogError::AlreadyExists(m) if m.contains("\"s1\"")),
        "{dup}"
    );

    cat.commit_snapshot(s.id, true).unwrap();
    assert_eq!(
        cat.snapshot(s.id).unwrap().status,
        SnapshotStatus::Committed
    );
    assert_eq!(cat.domain(d).unwrap().current_snapshot, Some(s.id));

    let s2 = cat
        .insert_pending_snapshot(&new_snapshot(d, "s2", Some(s.id)))
        .unwrap();
    cat.commit_snapshot(s2.id, false).unwrap();
    assert_eq!(cat.domain(d).unwrap().current_snapshot, Some(s.id));
    cat.set_current_snapshot(d, Some(s2.id)).unwrap();
    assert_eq!(cat.domain(d).unwrap().current_snapshot, Some(s2.id));

    // Breaking the current snapshot leaves the domain without one.
    cat.mark_broken(s2.id).unwrap();
    assert_eq!(cat.snapshot(s2.id).unwrap().status, SnapshotStatus::Broken);
    assert_eq!(cat.domain(d).unwrap().current_snapshot, None);
    assert_eq!(
        cat.snapshot_by_name(d, "s2").unwrap().map(|s| s.id),
        Some(s2.id)
    );
}

#[test]
fn update_snapshot_rewrites_mutable_fields_and_refuses_cycles() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let a = committed(&mut cat, d, "a", None);
    let b = committed(&mut cat, d, "b", Some(a));
    let c = committed(&mut cat, d, "c", Some(b));
    let mut rec = cat.snapshot(b).unwrap();
    rec.description = "edited".into();
    rec.protected = true;
    rec.origin = "schedule:daily".into();
    rec.disks = json!([]).into();
    cat.update_snapshot(&rec).unwrap();
    assert_eq!(cat.snapshot(b).unwrap(), rec);

    let mut cyc = cat.snapshot(a).unwrap();
    cyc.parent = Some(c);
    assert!(matches!(
        cat.update_snapshot(&cyc),
        Err(CatalogError::Invalid(_))
    ));
    cyc.parent = Some(a);
    assert!(matches!(
        cat.update_snapshot(&cyc),
        Err(CatalogError::Invalid(_))
    ));

    let other = cat.insert_domain(&new_domain("db")).unwrap().id;
    let x = committed(&mut cat, other, "x", None);
    let mut cross = cat.snapshot(c).unwrap();
    cross.parent = Some(x);
    assert!(matches!(
        cat.update_snapshot(&cross),
        Err(CatalogError::Invalid(_))
    ));
    assert!(matches!(
        cat.insert_pending_snapshot(&new_snapshot(d, "y", Some(x))),
        Err(CatalogError::Invalid(_))
    ));

    // c is current; making it pending again clears "current".
    let mut cur = cat.snapshot(c).unwrap();
    cur.status = SnapshotStatus::Pending;
    cat.update_snapshot(&cur).unwrap();
    assert_eq!(cat.domain(d).unwrap().current_snapshot, None);
}

#[test]
fn delete_snapshot_reparents_children_and_moves_current() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let root = committed(&mut cat, d, "root", None);
    let mid = committed(&mut cat, d, "mid", Some(root));
    let leaf1 = committed(&mut cat, d, "leaf1", Some(mid));
    let leaf2 = committed(&mut cat, d, "leaf2", Some(mid));
    cat.set_current_snapshot(d, Some(mid)).unwrap();
    assert_eq!(cat.children(mid).unwrap(), [leaf1, leaf2]);

    cat.delete_snapshot(mid).unwrap();
    assert!(matches!(cat.snapshot(mid), Err(CatalogError::NotFound(_))));
    assert_eq!(cat.snapshot(leaf1).unwrap().parent, Some(root));
    assert_eq!(cat.snapshot(leaf2).unwrap().parent, Some(root));
    assert_eq!(cat.children(root).unwrap(), [leaf1, leaf2]);
    assert_eq!(cat.domain(d).unwrap().current_snapshot, Some(root));

    // Deleting a current root leaves no current snapshot; its children become roots.
    cat.delete_snapshot(root).unwrap();
    assert_eq!(cat.domain(d).unwrap().current_snapshot, None);
    assert_eq!(cat.snapshot(leaf1).unwrap().parent, None);
    assert!(matches!(
        cat.delete_snapshot(root),
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(cat.children(root), Err(CatalogError::NotFound(_))));
}

#[test]
fn deleting_a_domain_cascades() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let keep = cat.insert_domain(&new_domain("db")).unwrap().id;
    let mut parent = None;
    for i in 0..20 {
        parent = Some(committed(&mut cat, d, &format!("s{i}"), parent));
    }
    let kept = committed(&mut cat, keep, "k", None);
    cat.begin_operation(d, "snapshot-create", &json!({}))
        .unwrap();
    cat.delete_domain(d).unwrap();
    assert!(matches!(cat.domain(d), Err(CatalogError::NotFound(_))));
    assert!(matches!(cat.snapshots(d), Err(CatalogError::NotFound(_))));
    let left: i64 = cat
        .conn
        .query_row("SELECT count(*) FROM snapshots", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 1);
    assert!(cat.pending_operations().unwrap().is_empty());
    assert_eq!(cat.snapshots(keep).unwrap()[0].id, kept);
    assert!(matches!(
        cat.delete_domain(d),
        Err(CatalogError::NotFound(_))
    ));
}

#[test]
fn operation_journal_round_trip() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let op = cat
        .begin_operation(d, "snapshot-create", &json!({"name": "s1"}))
        .unwrap();
    let ops = cat.pending_operations().unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!((ops[0].id, ops[0].domain_id), (op, d));
    assert_eq!(
        (&ops[0].kind[..], &ops[0].step[..]),
        ("snapshot-create", OPERATION_STARTED)
    );
    assert_eq!(ops[0].payload, json!({"name": "s1"}));

    cat.set_operation_step(
        op,
        "overlays-created",
        &json!({"name": "s1", "files": ["a"]}),
    )
    .unwrap();
    let ops = cat.pending_operations().unwrap();
    assert_eq!(ops[0].step, "overlays-created");
    assert_eq!(ops[0].payload["files"], json!(["a"]));

    cat.finish_operation(op).unwrap();
    assert!(cat.pending_operations().unwrap().is_empty());
    assert!(matches!(
        cat.finish_operation(op),
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        cat.begin_operation(DomainId(42), "x", &json!(null)),
        Err(CatalogError::NotFound(_))
    ));
}

#[test]
fn triggers_guard_hand_edits() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let other = cat.insert_domain(&new_domain("db")).unwrap().id;
    let p = cat
        .insert_pending_snapshot(&new_snapshot(d, "p", None))
        .unwrap()
        .id;
    let c = committed(&mut cat, d, "c", None);
    let x = committed(&mut cat, other, "x", None);
    let conn = &cat.conn;
    // A pending snapshot, or one of another domain, cannot become current.
    assert!(
        conn.execute(
            "UPDATE domains SET current_snapshot = ?2 WHERE id = ?1",
            (d, p)
        )
        .is_err()
    );
    assert!(
        conn.execute(
            "UPDATE domains SET current_snapshot = ?2 WHERE id = ?1",
            (d, x)
        )
        .is_err()
    );
    // The current snapshot cannot stop being committed behind the domain's back.
    assert!(
        conn.execute("UPDATE snapshots SET status = 'broken' WHERE id = ?1", [c])
            .is_err()
    );
    // A parent must be in the same domain and must exist.
    assert!(
        conn.execute("UPDATE snapshots SET parent_id = ?2 WHERE id = ?1", (c, x))
            .is_err()
    );
    assert!(
        conn.execute("UPDATE snapshots SET parent_id = 999 WHERE id = ?1", [c])
            .is_err()
    );
    // A parent with children cannot simply be deleted.
    conn.execute("UPDATE snapshots SET parent_id = ?2 WHERE id = ?1", (c, p))
        .unwrap();
    assert!(
        conn.execute("DELETE FROM snapshots WHERE id = ?1", [p])
            .is_err()
    );
    assert_eq!(cat.domain(d).unwrap().current_snapshot, Some(c));
}

#[test]
fn transaction_is_atomic() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let err = cat
        .transaction(|tx| {
            tx.execute("UPDATE domains SET xml = 'changed' WHERE id = ?1", [d])?;
            Err::<(), _>(CatalogError::Invalid("stop".into()))
        })
        .unwrap_err();
    assert!(matches!(err, CatalogError::Invalid(_)));
    assert_ne!(cat.domain(d).unwrap().xml, "changed");
}

#[test]
fn pending_record_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = Catalog::open(dir.path()).unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let s = cat
        .insert_pending_snapshot(&new_snapshot(d, "s1", None))
        .unwrap();
    let op = cat
        .begin_operation(d, "snapshot-create", &json!({"snapshot": s.id}))
        .unwrap();
    // No orderly close: no checkpoint, the WAL stays as it is.
    std::mem::forget(cat);
    let cat = Catalog::open(dir.path()).unwrap();
    let got = cat.snapshot(s.id).unwrap();
    assert_eq!(got.status, SnapshotStatus::Pending);
    assert_eq!(got, s);
    assert_eq!(cat.pending_operations().unwrap()[0].id, op);
}

#[test]
fn corrupt_json_is_reported() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    cat.conn
        .execute("UPDATE domains SET kind = 'managed', xml = 'x'", [])
        .unwrap();
    cat.conn
        .execute_batch("PRAGMA ignore_check_constraints = ON;")
        .unwrap();
    cat.conn
        .execute("UPDATE domains SET settings = 'not json'", [])
        .unwrap();
    assert!(matches!(cat.domain(d), Err(CatalogError::Corrupt(_))));
}

#[test]
fn listing_ten_thousand_snapshots_after_reopen_returns_them_all_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = Catalog::open(dir.path()).unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let xml = format!("<domain>{}</domain>", "<disk/>".repeat(300));
    cat.transaction(|tx| {
        let mut parent = None;
        for i in 0..10_000 {
            let mut s = new_snapshot(d, &format!("snap-{i:05}"), parent);
            s.created_at += i;
            s.domain_xml.clone_from(&xml);
            let rec = insert_snapshot(tx, &s, SnapshotStatus::Committed)?;
            parent = Some(rec.id);
        }
        Ok(())
    })
    .unwrap();
    drop(cat);
    let cat = Catalog::open(dir.path()).unwrap();
    // Speed is measured by the benchmarks, not here: this checks the result at that scale.
    let list = cat.snapshots(d).unwrap();
    assert_eq!(list.len(), 10_000);
    assert!(list.windows(2).all(|w| w[0].created_at <= w[1].created_at));
    assert!(list.windows(2).all(|w| w[1].parent == Some(w[0].id)));
    assert_eq!(cat.all_snapshots().unwrap().len(), 10_000);
}

#[test]
fn loading_all_snapshots_shares_equal_texts_and_refuses_bad_json() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let a = committed(&mut cat, d, "a", None);
    let b = committed(&mut cat, d, "b", Some(a));
    let mut other = new_snapshot(d, "c", Some(b));
    other.domain_xml = "<domain><name>changed</name></domain>".into();
    cat.insert_pending_snapshot(&other).unwrap();
    let all = cat.all_snapshots().unwrap();
    assert_eq!(all.len(), 3);
    // One copy per distinct text, whatever the number of records.
    assert!(Arc::ptr_eq(&all[0].domain_xml, &all[1].domain_xml));
    assert!(!Arc::ptr_eq(&all[1].domain_xml, &all[2].domain_xml));
    assert_eq!(&*all[2].domain_xml, "<domain><name>changed</name></domain>");
    assert_eq!(all[0].disks.as_str(), all[2].disks.as_str());
    assert_eq!(
        all[0].disks,
        json!([{"target": "vda", "file": "/var/lib/vmsnap/a.qcow2"}])
    );
    assert_eq!(all[1].memory, json!({"mode": "internal", "file": null}));
    assert!(JsonText::parse("{\"mode\":").is_err());

    cat.conn
        .execute_batch("PRAGMA ignore_check_constraints = ON;")
        .unwrap();
    cat.conn
        .execute("UPDATE snapshots SET disks = '[{' WHERE name = 'b'", [])
        .unwrap();
    assert!(matches!(cat.all_snapshots(), Err(CatalogError::Corrupt(_))));
}

/// One step of the property test; indices pick among existing snapshots/domains modulo length.
#[derive(Debug, Clone)]
enum Op {
    Insert {
        domain: usize,
        parent: Option<usize>,
    },
    Commit {
        snap: usize,
        make_current: bool,
    },
    Delete {
        snap: usize,
    },
    Break {
        snap: usize,
    },
    SetCurrent {
        domain: usize,
        snap: Option<usize>,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, proptest::option::of(0..64usize))
            .prop_map(|(domain, parent)| Op::Insert { domain, parent }),
        3 => (0..64usize, any::<bool>())
            .prop_map(|(snap, make_current)| Op::Commit { snap, make_current }),
        2 => (0..64usize).prop_map(|snap| Op::Delete { snap }),
        1 => (0..64usize).prop_map(|snap| Op::Break { snap }),
        1 => (0..2usize, proptest::option::of(0..64usize))
            .prop_map(|(domain, snap)| Op::SetCurrent { domain, snap }),
    ]
}

fn check_invariants(cat: &Catalog, domains: &[DomainId]) {
    let all = cat.all_snapshots().unwrap();
    let by_id: std::collections::HashMap<_, _> = all.iter().map(|s| (s.id, s)).collect();
    for s in &all {
        if let Some(p) = s.parent {
            let parent = by_id.get(&p).expect("parent exists");
            assert_eq!(parent.domain_id, s.domain_id, "parent in the same domain");
        }
        // Walking up terminates: no cycles.
        let mut seen = HashSet::new();
        let mut cur = Some(s.id);
        while let Some(id) = cur {
            assert!(seen.insert(id), "cycle through {id}");
            cur = by_id[&id].parent;
        }
    }
    for &d in domains {
        let dom = cat.domain(d).unwrap();
        if let Some(c) = dom.current_snapshot {
            let snap = by_id.get(&c).expect("current exists");
            assert_eq!(snap.status, SnapshotStatus::Committed);
            assert_eq!(snap.domain_id, d);
        }
        let listed = cat.snapshots(d).unwrap();
        assert_eq!(
            listed.len(),
            all.iter().filter(|s| s.domain_id == d).count()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_operations_keep_invariants(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let mut cat = Catalog::open_in_memory().unwrap();
        let domains = [
            cat.insert_domain(&new_domain("a")).unwrap().id,
            cat.insert_domain(&new_domain("b")).unwrap().id,
        ];
        let mut next = 0;
        for op in ops {
            let ids: Vec<SnapshotId> = cat.all_snapshots().unwrap().iter().map(|s| s.id).collect();
            let pick = |i: usize| (!ids.is_empty()).then(|| ids[i % ids.len()]);
            let result = match op {
                Op::Insert { domain, parent } => {
                    next += 1;
                    let parent = parent.and_then(pick);
                    let mut s = new_snapshot(domains[domain], &format!("s{next}"), parent);
                    s.created_at += next;
                    cat.insert_pending_snapshot(&s).map(drop)
                }
                Op::Commit { snap, make_current } => match pick(snap) {
                    Some(id) => cat.commit_snapshot(id, make_current),
                    None => Ok(()),
                },
                Op::Delete { snap } => match pick(snap) {
                    Some(id) => cat.delete_snapshot(id),
                    None => Ok(()),
                },
                Op::Break { snap } => match pick(snap) {
                    Some(id) => cat.mark_broken(id),
                    None => Ok(()),
                },
                Op::SetCurrent { domain, snap } => {
                    cat.set_current_snapshot(domains[domain], snap.and_then(pick))
                }
            };
            // Refusals are fine (parent in the other domain, pending made current); anything
            // else is a bug.
            if let Err(e) = result {
                prop_assert!(matches!(e, CatalogError::Invalid(_)), "unexpected error {e}");
            }
            check_invariants(&cat, &domains);
        }
    }
}

#[test]
fn version_1_catalog_migrates_to_2_keeping_data() {
    let dir = tempfile::tempdir().unwrap();
    // A version-1 file as an older build left it.
    {
        let raw = Connection::open(dir.path().join(CATALOG_FILE_NAME)).unwrap();
        raw.execute_batch(schema::MIGRATIONS[0]).unwrap();
        raw.pragma_update(None, "application_id", schema::APPLICATION_ID)
            .unwrap();
        raw.pragma_update(None, "user_version", 1).unwrap();
        raw.execute(
            "INSERT INTO domains (name, uuid, kind, xml, created_at) \
             VALUES ('old', 'u-old', 'managed', '<domain/>', 1)",
            [],
        )
        .unwrap();
    }
    let cat = Catalog::open(dir.path()).unwrap();
    assert_eq!(cat.schema_version(), 2);
    assert_eq!(cat.domains().unwrap()[0].name, "old");
    let n: i64 = cat
        .conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'snapshot_xml_parts'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn redefined_snapshot_keeps_parts_until_deleted() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap();
    let parts = serde_json::json!({"cookie": "<cookie><x/></cookie>"});
    let rec = cat
        .insert_redefined_snapshot(&new_snapshot(d.id, "r1", None), &parts, true)
        .unwrap();
    assert_eq!(rec.status, SnapshotStatus::Committed);
    assert_eq!(cat.domain(d.id).unwrap().current_snapshot, Some(rec.id));
    assert_eq!(cat.snapshot_xml_parts(rec.id).unwrap(), parts);
    // Nothing kept: no row, an empty object back; not current.
    let plain = cat
        .insert_redefined_snapshot(
            &new_snapshot(d.id, "r2", Some(rec.id)),
            &serde_json::json!({}),
            false,
        )
        .unwrap();
    assert_eq!(
        cat.snapshot_xml_parts(plain.id).unwrap(),
        serde_json::json!({})
    );
    assert_eq!(cat.domain(d.id).unwrap().current_snapshot, Some(rec.id));
    // A clash changes nothing.
    let err = cat
        .insert_redefined_snapshot(&new_snapshot(d.id, "r1", None), &parts, true)
        .unwrap_err();
    assert!(matches!(err, CatalogError::AlreadyExists(_)), "{err:?}");
    assert_eq!(cat.snapshots(d.id).unwrap().len(), 2);
    cat.delete_snapshot(rec.id).unwrap();
    let left: i64 = cat
        .conn
        .query_row("SELECT count(*) FROM snapshot_xml_parts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
}

#[test]
fn create_in_two_transactions_journals_then_commits_atomically() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let d = cat.insert_domain(&new_domain("web")).unwrap().id;
    let (op, rec) = cat
        .begin_operation_with_pending_snapshot(
            "create-snapshot",
            OPERATION_STARTED,
            &json!({"name": "s1"}),
            &new_snapshot(d, "s1", None),
        )
        .unwrap();
    assert_eq!(rec.status, SnapshotStatus::Pending);
    let pending = &cat.pending_operations().unwrap()[0];
    assert_eq!(pending.id, op);
    assert_eq!(
        pending.payload["snapshot"], rec.id.0,
        "the row names its record"
    );
    assert_eq!(cat.domain(d).unwrap().current_snapshot, None);

    // A clashing name adds neither the journal row nor the record.
    assert!(matches!(
        cat.begin_operation_with_pending_snapshot(
            "create-snapshot",
            OPERATION_STARTED,
            &json!({}),
            &new_snapshot(d, "s1", None)
        ),
        Err(CatalogError::AlreadyExists(_))
    ));
    assert_eq!(cat.pending_operations().unwrap().len(), 1);

    cat.commit_snapshot_and_finish(rec.id, "<domain/>", op)
        .unwrap();
    let dom = cat.domain(d).unwrap();
    assert_eq!(
        (dom.current_snapshot, dom.xml.as_str()),
        (Some(rec.id), "<domain/>")
    );
    assert_eq!(
        cat.snapshot(rec.id).unwrap().status,
        SnapshotStatus::Committed
    );
    assert!(cat.pending_operations().unwrap().is_empty());

    // Finishing an unknown operation changes nothing, the commit included.
    let (op2, rec2) = cat
        .begin_operation_with_pending_snapshot(
            "create-snapshot",
            OPERATION_STARTED,
            &json!({}),
            &new_snapshot(d, "s2", Some(rec.id)),
        )
        .unwrap();
    assert!(
        cat.commit_snapshot_and_finish(rec2.id, "<x/>", OperationId(op2.0 + 100))
            .is_err()
    );
    assert_eq!(
        cat.snapshot(rec2.id).unwrap().status,
        SnapshotStatus::Pending
    );
    assert_eq!(cat.domain(d).unwrap().current_snapshot, Some(rec.id));
}
