//! A tree of eight snapshots with three branches, mixing internal checkpoints, external
//! disk-only snapshots and external checkpoints: every node reverts to its own disk data (and
//! RAM, for checkpoints), and after each delete, in several orders (leaf, middle with branches,
//! root, current), every remaining snapshot still does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use vmsnap_tests::{
    COUNTER_ADDR, Deadline, DiskSpec, TestEnv, counter_boot_qcow2, domain_xml, poll_until,
    qemu_img_create, qemu_io_verify_pattern,
};

const OFF: u64 = 512 * 1024;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    InternalCheckpoint,
    ExternalDiskOnly,
    ExternalCheckpoint,
}

struct Node {
    pattern: u8,
    kind: Kind,
    counter: Option<u32>,
}

struct Tree<'a> {
    env: &'a TestEnv,
    nodes: BTreeMap<String, Node>,
}

impl Tree<'_> {
    fn hmp(&self, cmd: &str) -> String {
        self.env.client.ok(["domain", "monitor", "t", "--hmp", cmd])
    }

    fn counter(&self) -> u32 {
        vmsnap_tests::guest::parse_xp_word(&self.hmp(&format!("xp /1wx 0x{COUNTER_ADDR:x}")))
            .unwrap()
    }

    fn state(&self) -> String {
        self.env.client.json(["domain", "info", "t"])["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn vdb(&self) -> PathBuf {
        let v = self.env.client.json(["domain", "info", "t"]);
        let d = v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["target"] == "vdb")
            .unwrap()
            .clone();
        PathBuf::from(d["file"].as_str().unwrap())
    }

    fn write_vdb(&self, pattern: u8) {
        let v = self
            .env
            .client
            .json(["domain", "monitor", "t", r#"{"execute":"query-block"}"#]);
        let node = v
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["qdev"].as_str().unwrap_or("").contains("/vdb/"))
            .unwrap()["inserted"]["node-name"]
            .as_str()
            .unwrap()
            .to_string();
        let out = self.hmp(&format!(
            "qemu-io {node} \"write -P 0x{pattern:02x} {OFF} 4096\""
        ));
        assert!(!out.contains("rror"), "{out}");
    }

    /// Takes snapshot `name` of `kind` as a child of `parent` (reverting there first when needed).
    fn take(&mut self, name: &str, kind: Kind, parent: Option<&str>, pattern: u8) {
        if let Some(p) = parent {
            let current = self.env.client.json(["list", "t"]);
            let is_current = current
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == p && s["current"] == true);
            if !is_current || self.state() == "shutoff" {
                self.env.client.ok(["revert", "t", p, "--running"]);
            }
        }
        if self.state() == "paused" {
            self.env.client.ok(["domain", "resume", "t"]);
        }
        poll_until(Deadline::step(), "the counter guest to count", || {
            (self.counter() != 0).then_some(())
        });
        self.write_vdb(pattern);
        let mut counter = None;
        let mut args: Vec<String> = vec!["create".into(), "t".into(), "--name".into(), name.into()];
        match kind {
            Kind::InternalCheckpoint => {
                self.env.client.ok(["domain", "pause", "t"]);
                counter = Some(self.counter());
            }
            Kind::ExternalCheckpoint => {
                self.env.client.ok(["domain", "pause", "t"]);
                counter = Some(self.counter());
                let mem = self.env.images_dir().join(format!("{name}.mem"));
                args.extend([
                    "--memory".into(),
                    "external".into(),
                    "--memory-file".into(),
                    mem.display().to_string(),
                ]);
            }
            Kind::ExternalDiskOnly => args.push("--disk-only".into()),
        }
        let v = self.env.client.json(&args);
        assert_eq!(v["parent"].as_str(), parent, "{name}'s parent");
        if self.state() == "paused" {
            self.env.client.ok(["domain", "resume", "t"]);
        }
        self.nodes.insert(
            name.to_string(),
            Node {
                pattern,
                kind,
                counter,
            },
        );
    }

    /// Reverts to every remaining node and checks its disk data and, for checkpoints, its RAM.
    fn verify_all(&self, when: &str) {
        let names: Vec<String> = self
            .env
            .client
            .json(["list", "t"])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        let mut expected: Vec<&String> = self.nodes.keys().collect();
        expected.sort();
        let mut listed: Vec<&String> = names.iter().collect();
        listed.sort();
        assert_eq!(
            listed, expected,
            "{when}: the catalog lists exactly the remaining snapshots"
        );
        for (name, node) in &self.nodes {
            self.env.client.ok(["revert", "t", name, "--paused"]);
            if let Some(c) = node.counter {
                assert_eq!(self.counter(), c, "{when}: {name}'s RAM");
            }
            assert_eq!(self.state(), "paused", "{when}: {name}");
            self.env.client.ok(["domain", "destroy", "t"]);
            let vdb = self.vdb();
            assert!(
                qemu_io_verify_pattern(&vdb, "qcow2", node.pattern, OFF, 4096),
                "{when}: {name} ({}) must hold 0x{:02x} on vdb",
                match node.kind {
                    Kind::InternalCheckpoint => "internal checkpoint",
                    Kind::ExternalDiskOnly => "external disk-only",
                    Kind::ExternalCheckpoint => "external checkpoint",
                },
                node.pattern
            );
        }
    }

    fn delete(&mut self, name: &str) {
        self.env.client.ok(["delete", "t", name]);
        self.nodes.remove(name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_of_eight_snapshots_reverts_and_deletes_in_any_order() {
    let env = TestEnv::start();
    let a = env.images_dir().join("vda.qcow2");
    counter_boot_qcow2(&a);
    let b = env.images_dir().join("vdb.qcow2");
    qemu_img_create(&b, "qcow2", "16M");
    let xml = domain_xml(
        "t",
        &[
            DiskSpec::new(&a, "qcow2", "vda"),
            DiskSpec::new(&b, "qcow2", "vdb"),
        ],
    );
    let f = env.write_xml("t.xml", &xml);
    env.client.ok(["domain", "define", f.to_str().unwrap()]);
    env.client.ok(["domain", "start", "t"]);
    let mut t = Tree {
        env: &env,
        nodes: BTreeMap::new(),
    };
    use Kind::*;
    t.take("n1", InternalCheckpoint, None, 0x11);
    t.take("n2", ExternalDiskOnly, Some("n1"), 0x22);
    t.take("n3", ExternalCheckpoint, Some("n2"), 0x33);
    t.take("n4", InternalCheckpoint, Some("n3"), 0x44);
    t.take("n5", InternalCheckpoint, Some("n2"), 0x55);
    t.take("n6", ExternalDiskOnly, Some("n5"), 0x66);
    t.take("n7", ExternalCheckpoint, Some("n1"), 0x77);
    t.take("n8", ExternalDiskOnly, Some("n7"), 0x88);
    if t.state() != "shutoff" {
        env.client.ok(["domain", "destroy", "t"]);
    }
    t.verify_all("the whole tree");
    // A leaf.
    t.delete("n8");
    t.verify_all("after deleting leaf n8");
    // A middle node whose children are two branches.
    t.delete("n2");
    t.verify_all("after deleting n2 (two branches below)");
    // The root.
    t.delete("n1");
    t.verify_all("after deleting root n1");
    // The current snapshot (the last one verified).
    let current = env
        .client
        .json(["list", "t"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["current"] == true)
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    t.delete(&current);
    t.verify_all(&format!("after deleting current {current}"));
    assert!(
        !env.daemon.log().contains("cannot read the backing file"),
        "every image the domain knows keeps a readable chain"
    );
    let _ = b;
}
