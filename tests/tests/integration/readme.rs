//! The README's busctl walk-through works as written: the fenced block marked
//! `sh busctl-walkthrough` is run by bash, unchanged, against a real daemon on the private bus,
//! with only `ADDR` set to that bus's address; then the daemon's state shows what it did.

use std::process::Command;

use vmsnap_tests::process::run;
use vmsnap_tests::{Deadline, DiskSpec, TestEnv, counter_boot_qcow2, domain_xml};

/// The info string that marks the tested block.
const MARK: &str = "```sh busctl-walkthrough";

/// The lines of the marked block of `readme`.
fn walkthrough(readme: &str) -> String {
    let mut lines = readme.lines().skip_while(|l| l.trim_end() != MARK);
    assert!(
        lines.next().is_some(),
        "README.md has no block marked {MARK:?}"
    );
    let body: Vec<&str> = lines.take_while(|l| l.trim_end() != "```").collect();
    assert!(!body.is_empty(), "the walk-through block is empty");
    body.join("\n")
}

#[test]
fn readme_busctl_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let script = walkthrough(&readme);
    assert!(
        !script.contains("--system"),
        "the walk-through must use $ADDR"
    );

    let env = TestEnv::start();
    let disk = env.images_dir().join("demo.qcow2");
    counter_boot_qcow2(&disk);
    let xml = env.write_xml(
        "demo.xml",
        &domain_xml("demo", &[DiskSpec::new(&disk, "qcow2", "vda")]),
    );
    env.client.ok(["domain", "define", xml.to_str().unwrap()]);
    env.client.ok(["domain", "start", "demo"]);

    let out = run(
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env("ADDR", env.bus_address()),
        Deadline::step(),
    );
    assert!(
        out.status.success(),
        "the walk-through failed ({}):\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    // What busctl printed: the tree, the interface, the snapshots, the job's end.
    for want in [
        "/org/vmsnap/VmSnap1/domain/1",
        ".CreateSnapshot",
        "s \"before\"",
        "s \"after\"",
        "b true",
        "s \"\"",
        "s \"running\"",
    ] {
        assert!(
            out.stdout.contains(want),
            "busctl printed no {want:?}:\n{}",
            out.stdout
        );
    }
    // What the daemon did: two snapshots, reverted to the first, guest running.
    let rows = env.client.json(["list", "demo"]);
    let current: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["current"] == true)
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(rows.as_array().unwrap().len(), 2, "{rows}");
    assert_eq!(current, ["before"], "{rows}");
    assert_eq!(rows[0]["description"], "from busctl");
    assert_eq!(
        env.client.json(["domain", "info", "demo"])["state"],
        "running"
    );
}
