//! The example front end (`examples/snapshot-tree.py`, Python with python3-dbus and gi) against
//! the real daemon: it prints the snapshot tree once, then again on every change it hears of by
//! signal, and the printed tree follows creates, branches and deletes made meanwhile.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use serde_json::{Value, json};
use vmsnap_tests::process::ChildGuard;
use vmsnap_tests::{Deadline, DiskSpec, TestEnv, qemu_img_create};

/// The system Python, which has Debian's python3-dbus and python3-gi.
const PYTHON: &str = "/usr/bin/python3";

/// The front end's JSON lines, read on a thread so that waits can have a deadline.
struct FrontEnd {
    _child: ChildGuard,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl FrontEnd {
    fn start(env: &TestEnv, domain: &str, extra: &[&str]) -> FrontEnd {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/snapshot-tree.py");
        let mut child = ChildGuard::spawn(
            "snapshot-tree.py",
            Command::new(PYTHON)
                .arg(script)
                .args(["--address", env.bus_address(), "--json", domain])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::piped()),
        )
        .expect("cannot start the example front end");
        let out = child.child_mut().stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        FrontEnd {
            _child: child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next rendering that satisfies `pred`; panics at the deadline with all it printed.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Deadline::step();
        loop {
            match self.lines.recv_timeout(deadline.remaining()) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let v: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "the front end never showed {what}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

/// The tree as `name[*](children...)`, `*` marking the current snapshot.
fn shape(nodes: &Value) -> String {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let cur = if n["current"] == true { "*" } else { "" };
            let kids = shape(&n["children"]);
            if kids.is_empty() {
                format!("{}{cur}", n["name"].as_str().unwrap())
            } else {
                format!("{}{cur}({kids})", n["name"].as_str().unwrap())
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn frontend_example_tree_follows_changes_by_signal() {
    let env = TestEnv::start();
    let img = env.images_dir().join("fe.qcow2");
    qemu_img_create(&img, "qcow2", "16M");
    let xml = env.write_xml(
        "fe.xml",
        &vmsnap_tests::domain_xml("fe", &[DiskSpec::new(&img, "qcow2", "vda")]),
    );
    env.client.ok(["domain", "define", xml.to_str().unwrap()]);
    env.client.ok(["create", "fe", "--name", "s1"]);

    // --once: the tree as it is, then exit.
    let mut once = FrontEnd::start(&env, "fe", &["--once"]);
    let v = once.wait_for("the initial tree", |_| true);
    assert_eq!(v["domain"], "fe");
    assert_eq!(v["state"], "shutoff");
    assert_eq!(shape(&v["tree"]), "s1*");

    // For people: the tree drawn as text.
    let text = vmsnap_tests::process::run(
        Command::new(PYTHON)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../examples/snapshot-tree.py"
            ))
            .args(["--address", env.bus_address(), "fe", "--once"]),
        Deadline::step(),
    );
    assert!(text.status.success(), "{}", text.stderr);
    assert_eq!(text.stdout.trim_end(), "fe (shutoff)\ns1 (current)");

    // Live: every change made meanwhile shows up without the front end polling.
    let mut fe = FrontEnd::start(&env, "fe", &[]);
    fe.wait_for("the initial tree", |v| shape(&v["tree"]) == "s1*");
    env.client.ok(["create", "fe", "--name", "s2"]);
    fe.wait_for("s2 under s1", |v| shape(&v["tree"]) == "s1(s2*)");
    env.client
        .ok(["create", "fe", "--name", "s3", "--parent", "s1"]);
    let v = fe.wait_for("the branch s3", |v| shape(&v["tree"]) == "s1(s2,s3*)");
    assert_eq!(v["current"], "s3");
    env.client.ok(["delete", "fe", "s1"]);
    fe.wait_for("s2 and s3 as roots after s1 went", |v| {
        shape(&v["tree"]) == "s2,s3*"
    });
    env.client.ok(["delete", "fe", "s3"]);
    let v = fe.wait_for("s2 alone", |v| shape(&v["tree"]) == "s2");
    assert_eq!(
        v["current"],
        Value::Null,
        "no current snapshot after deleting a root"
    );
    assert_eq!(v["tree"][0]["children"], json!([]));
}
