//! The installed units under a real systemd manager: readiness, D-Bus activation, the
//! watchdog, guests in transient units across daemon restarts, journald fields, the snapshot
//! timer; and, without a manager, `systemd-analyze verify` and the sandbox's exposure score.
//!
//! Tests that boot a container ([`Sandbox`]) need root; elsewhere they print why they skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmsnap_tests::install::{self, InstallPlan};
use vmsnap_tests::process::{project_binary, run, run_ok};
use vmsnap_tests::systemd::Sandbox;
use vmsnap_tests::{Deadline, DiskSpec, counter_boot_qcow2, domain_xml, poll_until};

/// The highest `systemd-analyze security` exposure the units may have (vmsnapd.service
/// scores 1.0, its session variant 1.3, vmsnap-snapshot@.service 0.9; comparable daemons
/// score 6.7 to 9.6).
const EXPOSURE_BOUND: f64 = 1.5;

/// Where the container's tests keep guest images: under /var, which the daemon's sandbox
/// leaves writable.
/// Where the tests put guest images: the system daemon's default storage directory
/// (`STATE_DIR/images`), the one place it accepts images without `--storage-dir`.
const IMAGES: &str = "/var/lib/vmsnap/images";

const DAEMON_UNIT: &str = "vmsnapd.service";

/// Installs into a temporary prefix on the host (binaries copied) and returns it.
fn install_to_temp() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("usr");
    let bin_dir = project_binary("vmsnapd", "VMSNAPD_BIN")
        .parent()
        .unwrap()
        .to_path_buf();
    install::install(&InstallPlan {
        bin_dir,
        destdir: PathBuf::from("/"),
        prefix: prefix.clone(),
    })
    .unwrap();
    (tmp, prefix)
}

/// The exposure `systemd-analyze security --offline=true` gives the unit file `path`; with
/// `user` as a unit of a user's manager (`runtime` is its `XDG_RUNTIME_DIR`).
fn exposure(path: &Path, user: Option<&Path>) -> f64 {
    let mut cmd = Command::new("systemd-analyze");
    if let Some(runtime) = user {
        cmd.arg("--user").env("XDG_RUNTIME_DIR", runtime);
    }
    let out = run_ok(
        cmd.args(["security", "--offline=true", "--no-pager"])
            .arg(path),
        Deadline::step(),
    );
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure in:\n{}", out.stdout));
    line.split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure of {line:?}"))
}

#[test]
fn units_installed_pass_verify_and_stay_under_exposure_bound() {
    let (_tmp, prefix) = install_to_temp();
    let units = prefix.join("lib/systemd/system");
    // Templates are verified through an instance, as systemd loads them.
    for (instance, template) in [
        ("vmsnap-snapshot@web1.service", "vmsnap-snapshot@.service"),
        ("vmsnap-snapshot@web1.timer", "vmsnap-snapshot@.timer"),
    ] {
        std::os::unix::fs::symlink(units.join(template), units.join(instance)).unwrap();
    }
    let out = run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(units.join(DAEMON_UNIT))
            .arg(units.join("vmsnap-snapshot@web1.service"))
            .arg(units.join("vmsnap-snapshot@web1.timer"))
            // Our folder first, then the system's (dbus.socket, timers.target, ...).
            .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display())),
        Deadline::step(),
    );
    assert!(
        out.status.success() && out.stderr.trim().is_empty(),
        "systemd-analyze verify complained ({}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let daemon = exposure(&units.join(DAEMON_UNIT), None);
    assert!(
        daemon < EXPOSURE_BOUND,
        "vmsnapd.service exposure {daemon} is not under {EXPOSURE_BOUND}"
    );
    let oneshot = exposure(&units.join("vmsnap-snapshot@web1.service"), None);
    assert!(
        oneshot < EXPOSURE_BOUND,
        "vmsnap-snapshot@.service exposure {oneshot} is not under {EXPOSURE_BOUND}"
    );

    // The same for the session variant, as units of a user's manager.
    let user_units = prefix.join("lib/systemd/user");
    let runtime = tempfile::tempdir().unwrap();
    for (instance, template) in [
        ("vmsnap-snapshot@web1.service", "vmsnap-snapshot@.service"),
        ("vmsnap-snapshot@web1.timer", "vmsnap-snapshot@.timer"),
    ] {
        std::os::unix::fs::symlink(user_units.join(template), user_units.join(instance)).unwrap();
    }
    let out = run(
        Command::new("systemd-analyze")
            .args(["--user", "verify", "--man=no"])
            .arg(user_units.join(DAEMON_UNIT))
            .arg(user_units.join("vmsnap-snapshot@web1.service"))
            .arg(user_units.join("vmsnap-snapshot@web1.timer"))
            .env("SYSTEMD_UNIT_PATH", format!("{}:", user_units.display()))
            .env("XDG_RUNTIME_DIR", runtime.path()),
        Deadline::step(),
    );
    assert!(
        out.status.success() && out.stderr.trim().is_empty(),
        "systemd-analyze --user verify complained ({}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let session = exposure(&user_units.join(DAEMON_UNIT), Some(runtime.path()));
    assert!(
        session < EXPOSURE_BOUND,
        "the user unit vmsnapd.service exposure {session} is not under {EXPOSURE_BOUND}"
    );
    let activation = std::fs::read_to_string(
        prefix.join("share/dbus-1/system-services/org.vmsnap.VmSnap1.service"),
    )
    .unwrap();
    assert!(activation.contains("SystemdService=vmsnapd.service"));
    // One polkit action per kind of change, named as the daemon checks them.
    let policy =
        std::fs::read_to_string(prefix.join("share/polkit-1/actions/org.vmsnap.VmSnap1.policy"))
            .unwrap();
    for verb in ["create", "revert", "delete", "prune", "manage", "cancel"] {
        assert_eq!(
            policy
                .matches(&format!("<action id=\"org.vmsnap.VmSnap1.{verb}\">"))
                .count(),
            1,
            "action {verb} in:\n{policy}"
        );
    }
    assert_eq!(policy.matches("<action ").count(), 6, "{policy}");
}

/// Boots a container with the project installed, or `None` (after saying why) where that is
/// not possible.
fn sandbox(test: &str) -> Option<Sandbox> {
    if !Sandbox::available(test) {
        return None;
    }
    let sb = Sandbox::boot();
    sb.install();
    std::fs::create_dir_all(sb.path(IMAGES)).unwrap();
    Some(sb)
}

/// Runs the `vmsnap` client inside the container (system bus, as a user would).
fn vmsnap(sb: &Sandbox, args: &[&str]) -> String {
    let mut all = vec!["vmsnap"];
    all.extend_from_slice(args);
    sb.exec_ok(&all).stdout
}

/// The counter guest's counter, read through the daemon's monitor passthrough.
fn counter(sb: &Sandbox, domain: &str) -> u32 {
    let out = vmsnap(
        sb,
        &["domain", "monitor", domain, "--hmp", "xp /1wx 0x9000"],
    );
    let hex = out
        .split(':')
        .nth(1)
        .map(str::trim)
        .and_then(|v| v.strip_prefix("0x"))
        .unwrap_or_else(|| panic!("unexpected xp output {out:?}"));
    u32::from_str_radix(hex, 16).unwrap()
}

/// Waits until the counter of `domain` is above `than`: the guest runs.
fn counter_moves(sb: &Sandbox, domain: &str, than: u32) -> u32 {
    poll_until(Deadline::step(), "the guest's counter to move", || {
        let now = counter(sb, domain);
        (now > than).then_some(now)
    })
}

#[test]
fn vmsnapd_service_active_only_after_ready_then_bus_activated() {
    let Some(sb) = sandbox("vmsnapd_service_active_only_after_ready_then_bus_activated") else {
        return;
    };
    // The daemon owns its name at once but says READY=1 two seconds later.
    sb.drop_in(
        DAEMON_UNIT,
        "50-test",
        "[Service]\nEnvironment=VMSNAPD_TEST_HOOKS=delay-ready=2\n",
    );
    sb.exec_ok(&["systemctl", "start", "--no-block", DAEMON_UNIT]);
    poll_until(Deadline::step(), "the name owned while activating", || {
        let owned = sb
            .exec(&["busctl", "status", "org.vmsnap.VmSnap1"])
            .status
            .success();
        (owned && sb.unit_property(DAEMON_UNIT, "ActiveState") == "activating").then_some(())
    });
    poll_until(Deadline::step(), "vmsnapd active", || {
        (sb.unit_property(DAEMON_UNIT, "ActiveState") == "active").then_some(())
    });
    let status = sb.unit_property(DAEMON_UNIT, "StatusText");
    assert!(
        status.starts_with("0 domain(s), 0 running, 0 job(s)"),
        "{status:?}"
    );

    // journald got the daemon's structured fields (tracing-journald prefixes them with F_).
    let json = sb
        .exec_ok(&["journalctl", "-u", DAEMON_UNIT, "-o", "json", "--no-pager"])
        .stdout;
    let ready = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["MESSAGE"] == "vmsnapd ready")
        .unwrap_or_else(|| panic!("no structured 'vmsnapd ready' record in:\n{json}"));
    assert_eq!(ready["F_VERSION"], env!("CARGO_PKG_VERSION"), "{ready}");
    assert_eq!(ready["_SYSTEMD_UNIT"], DAEMON_UNIT, "{ready}");
    assert!(ready["TARGET"].as_str().is_some(), "{ready}");

    // Stopped, the service comes back for the first bus call.
    sb.drop_in(DAEMON_UNIT, "50-test", "[Service]\n");
    sb.exec_ok(&["systemctl", "stop", DAEMON_UNIT]);
    assert_eq!(sb.unit_property(DAEMON_UNIT, "ActiveState"), "inactive");
    let reply = sb.exec_ok(&[
        "busctl",
        "call",
        "org.vmsnap.VmSnap1",
        "/org/vmsnap/VmSnap1",
        "org.vmsnap.VmSnap1.Manager",
        "ListDomains",
    ]);
    assert_eq!(reply.stdout.trim(), "ao 0");
    assert_eq!(sb.unit_property(DAEMON_UNIT, "ActiveState"), "active");
    let bus_log = sb
        .exec_ok(&[
            "journalctl",
            "-u",
            "dbus.service",
            "-o",
            "cat",
            "--no-pager",
        ])
        .stdout;
    assert!(
        bus_log.contains("Activating via systemd: service name='org.vmsnap.VmSnap1'"),
        "{bus_log}"
    );
}

#[test]
fn vmsnapd_service_with_hung_main_loop_is_restarted_by_watchdog() {
    let Some(sb) = sandbox("vmsnapd_service_with_hung_main_loop_is_restarted_by_watchdog") else {
        return;
    };
    // A healthy daemon keeps a one-second watchdog fed for several periods.
    sb.drop_in(
        DAEMON_UNIT,
        "50-test",
        "[Service]\nWatchdogSec=1s\nRestartSec=100ms\n",
    );
    sb.exec_ok(&["systemctl", "start", DAEMON_UNIT]);
    let healthy = sb.unit_property(DAEMON_UNIT, "MainPID");
    // Watching for the absence of a restart needs time to pass: three watchdog periods.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sb.unit_property(DAEMON_UNIT, "NRestarts"), "0");
    assert_eq!(sb.unit_property(DAEMON_UNIT, "MainPID"), healthy);

    // The same with a main loop that hangs one second after READY=1.
    sb.drop_in(
        DAEMON_UNIT,
        "50-test",
        "[Service]\nWatchdogSec=1s\nRestartSec=100ms\n\
         Environment=VMSNAPD_TEST_HOOKS=hang-main-loop-after=1\n",
    );
    sb.exec_ok(&["systemctl", "restart", DAEMON_UNIT]);
    let hung = sb.unit_property(DAEMON_UNIT, "MainPID");
    poll_until(Deadline::step(), "a watchdog restart", || {
        let restarts: u32 = sb.unit_property(DAEMON_UNIT, "NRestarts").parse().unwrap();
        let pid = sb.unit_property(DAEMON_UNIT, "MainPID");
        (restarts >= 1 && pid != hung && pid != "0").then_some(())
    });
    let log = sb
        .exec_ok(&["journalctl", "-u", DAEMON_UNIT, "-o", "cat", "--no-pager"])
        .stdout;
    assert!(log.contains("Watchdog timeout"), "{log}");
}

#[test]
fn vmsnapd_service_stop_and_restart_leave_guest_running_in_its_unit() {
    let Some(sb) = sandbox("vmsnapd_service_stop_and_restart_leave_guest_running_in_its_unit")
    else {
        return;
    };
    sb.exec_ok(&["systemctl", "start", DAEMON_UNIT]);
    let disk = format!("{IMAGES}/g1.qcow2");
    counter_boot_qcow2(&sb.path(&disk));
    let xml = domain_xml("g1", &[DiskSpec::new(Path::new(&disk), "qcow2", "vda")]);
    let xml_path = format!("{IMAGES}/g1.xml");
    std::fs::write(sb.path(&xml_path), xml).unwrap();
    vmsnap(&sb, &["domain", "define", &xml_path]);
    // The daemon's sandbox lets it do its work: qemu-img for an offline snapshot.
    vmsnap(&sb, &["create", "g1", "--name", "off1", "--disk-only"]);
    vmsnap(&sb, &["domain", "start", "g1"]);
    let guest_unit = "vmsnap-guest-1.service";
    assert_eq!(sb.unit_property(guest_unit, "ActiveState"), "active");
    assert_eq!(sb.unit_property(guest_unit, "Slice"), "machine.slice");
    let qemu = sb.unit_property(guest_unit, "MainPID");
    let c0 = counter_moves(&sb, "g1", 0);

    // QEMU does not share the daemon's sandbox: the daemon has a network namespace of its
    // own (PrivateNetwork=yes), QEMU has the host's.
    let daemon = sb.unit_property(DAEMON_UNIT, "MainPID");
    let netns = |pid: &str| {
        sb.exec_ok(&["readlink", &format!("/proc/{pid}/ns/net")])
            .stdout
            .trim()
            .to_string()
    };
    assert_eq!(netns(&qemu), netns("1"));
    assert_ne!(netns(&daemon), netns("1"));
    let status = poll_until(
        Deadline::step(),
        "the status line to count the guest",
        || {
            let s = sb.unit_property(DAEMON_UNIT, "StatusText");
            s.starts_with("1 domain(s), 1 running").then_some(s)
        },
    );
    assert!(status.contains("0 job(s)"), "{status}");

    // Live snapshots (an overlay the daemon creates, an internal checkpoint), and a delete
    // that merges the overlay back with block-commit.
    vmsnap(&sb, &["create", "g1", "--name", "live1", "--disk-only"]);
    vmsnap(&sb, &["delete", "g1", "live1"]);
    vmsnap(&sb, &["create", "g1", "--name", "cp1"]);
    // VM state written by QEMU to a file the daemon opened and passed over QMP.
    let mem = format!("{IMAGES}/g1.ext1.mem");
    vmsnap(
        &sb,
        &[
            "create",
            "g1",
            "--name",
            "ext1",
            "--memory",
            "external",
            "--memory-file",
            &mem,
        ],
    );
    assert!(std::fs::metadata(sb.path(&mem)).unwrap().len() > 0);
    let list = vmsnap(&sb, &["--json", "list", "g1"]);
    assert!(
        list.contains("\"off1\"")
            && list.contains("\"cp1\"")
            && list.contains("\"ext1\"")
            && !list.contains("\"live1\""),
        "{list}"
    );

    // A restart re-attaches the running guest.
    sb.exec_ok(&["systemctl", "restart", DAEMON_UNIT]);
    assert_ne!(sb.unit_property(DAEMON_UNIT, "MainPID"), daemon);
    assert_eq!(sb.unit_property(guest_unit, "MainPID"), qemu);
    let info = vmsnap(&sb, &["--json", "domain", "info", "g1"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    let c1 = counter_moves(&sb, "g1", c0);

    // A stop leaves it running; the next daemon finds it again.
    sb.exec_ok(&["systemctl", "stop", DAEMON_UNIT]);
    assert_eq!(sb.unit_property(guest_unit, "ActiveState"), "active");
    assert_eq!(sb.unit_property(guest_unit, "MainPID"), qemu);
    sb.exec_ok(&["systemctl", "start", DAEMON_UNIT]);
    counter_moves(&sb, "g1", c1);

    // A running job shows in the status line: the counter guest ignores the power button,
    // so a graceful shutdown stays pending until the guest is destroyed.
    vmsnap(
        &sb,
        &["domain", "shutdown", "g1", "--timeout", "120", "--no-wait"],
    );
    poll_until(Deadline::step(), "the status line to name the job", || {
        let s = sb.unit_property(DAEMON_UNIT, "StatusText");
        (s.starts_with("1 domain(s), 1 running, 1 job(s): shutdown ") && s.contains(" of g1 ("))
            .then_some(())
    });

    // Destroying the guest ends its unit, which systemd then forgets.
    vmsnap(&sb, &["domain", "destroy", "g1"]);
    poll_until(Deadline::step(), "the guest unit to be collected", || {
        (sb.unit_property(guest_unit, "LoadState") == "not-found").then_some(())
    });
    poll_until(
        Deadline::step(),
        "the status line without guest or job",
        || {
            let s = sb.unit_property(DAEMON_UNIT, "StatusText");
            (s == "1 domain(s), 0 running, 0 job(s)").then_some(())
        },
    );
}

/// The desktop user of the session test, created in the container.
const USER: &str = "vmuser";
const USER_ID: u32 = 1500;

/// Runs `args` inside the container as [`USER`], in the user's session (user manager,
/// session bus); panics unless it succeeds.
fn in_session(sb: &Sandbox, args: &[&str]) -> String {
    let runtime = format!("XDG_RUNTIME_DIR=/run/user/{USER_ID}");
    let bus = format!("DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{USER_ID}/bus");
    let home = format!("HOME=/home/{USER}");
    let mut all: Vec<&str> = vec![&runtime, &bus, &home];
    all.extend_from_slice(args);
    let out = sb.exec_as(Some((USER_ID, USER_ID)), &all, Deadline::step());
    if !out.status.success() {
        panic!(
            "{args:?} failed as {USER} ({})\nstdout:\n{}\nstderr:\n{}\njournal:\n{}",
            out.status,
            out.stdout,
            out.stderr,
            sb.journal_tail()
        );
    }
    out.stdout
}

fn user_property(sb: &Sandbox, unit: &str, property: &str) -> String {
    in_session(
        sb,
        &[
            "systemctl",
            "--user",
            "show",
            "-p",
            property,
            "--value",
            unit,
        ],
    )
    .trim()
    .to_string()
}

#[test]
fn vmsnapd_session_is_bus_activated_and_keeps_guest_across_restart() {
    let Some(sb) = sandbox("vmsnapd_session_is_bus_activated_and_keeps_guest_across_restart")
    else {
        return;
    };
    // A user without privileges, with a running user manager, as after a desktop login.
    let uid = USER_ID.to_string();
    sb.exec_ok(&[
        "useradd",
        "--create-home",
        "--uid",
        &uid,
        "--user-group",
        USER,
    ]);
    sb.exec_ok(&["systemctl", "start", &format!("user@{USER_ID}.service")]);
    // The session daemon's default storage directory: `$XDG_STATE_HOME/vmsnap/images`.
    let images = format!("/home/{USER}/.local/state/vmsnap/images");
    in_session(&sb, &["mkdir", "-p", &images]);
    let disk = format!("{images}/s1.qcow2");
    counter_boot_qcow2(&sb.path(&disk));
    let xml = domain_xml("s1", &[DiskSpec::new(Path::new(&disk), "qcow2", "vda")]);
    let xml_path = format!("{images}/s1.xml");
    std::fs::write(sb.path(&xml_path), xml).unwrap();
    sb.exec_ok(&["chown", "-R", &format!("{USER}:{USER}"), &images]);

    // The first call on the session bus starts the user unit.
    assert_ne!(user_property(&sb, DAEMON_UNIT, "ActiveState"), "active");
    in_session(&sb, &["vmsnap", "--session", "domain", "define", &xml_path]);
    assert_eq!(user_property(&sb, DAEMON_UNIT, "ActiveState"), "active");
    assert!(
        sb.path(&format!("/home/{USER}/.local/state/vmsnap"))
            .is_dir(),
        "the session daemon keeps its state in $XDG_STATE_HOME/vmsnap"
    );
    in_session(&sb, &["vmsnap", "--session", "domain", "start", "s1"]);
    let guest_unit = "vmsnap-guest-1.service";
    assert_eq!(user_property(&sb, guest_unit, "ActiveState"), "active");
    let qemu = user_property(&sb, guest_unit, "MainPID");
    assert!(
        sb.path(&format!("/run/user/{USER_ID}/vmsnap/domains/1/qmp.sock"))
            .exists()
    );
    let owner = sb
        .exec_ok(&["stat", "-c", "%u", &format!("/proc/{qemu}")])
        .stdout;
    assert_eq!(owner.trim(), uid, "QEMU runs as the user");

    in_session(&sb, &["systemctl", "--user", "restart", DAEMON_UNIT]);
    assert_eq!(user_property(&sb, guest_unit, "MainPID"), qemu);
    let info = in_session(
        &sb,
        &["vmsnap", "--session", "--json", "domain", "info", "s1"],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    in_session(&sb, &["vmsnap", "--session", "domain", "destroy", "s1"]);
    poll_until(Deadline::step(), "the guest unit to be collected", || {
        (user_property(&sb, guest_unit, "LoadState") == "not-found").then_some(())
    });
}

/// The names of `domain`'s snapshots other than `manual1`, oldest first (scheduled names
/// carry their UTC time, so they sort by age); panics unless `manual1` is still there.
fn scheduled_names(sb: &Sandbox, domain: &str) -> Vec<String> {
    let list = vmsnap(sb, &["--json", "list", domain]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("a list: {list}"))
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.iter().any(|n| n == "manual1"), "{names:?}");
    let mut scheduled: Vec<String> = names.into_iter().filter(|n| n != "manual1").collect();
    scheduled.sort();
    scheduled
}

#[test]
fn snapshot_timer_fires_takes_snapshots_and_prunes_by_policy() {
    let Some(sb) = sandbox("snapshot_timer_fires_takes_snapshots_and_prunes_by_policy") else {
        return;
    };
    sb.exec_ok(&["systemctl", "start", DAEMON_UNIT]);
    let disk = format!("{IMAGES}/t1.qcow2");
    counter_boot_qcow2(&sb.path(&disk));
    let xml = domain_xml("t1", &[DiskSpec::new(Path::new(&disk), "qcow2", "vda")]);
    let xml_path = format!("{IMAGES}/t1.xml");
    std::fs::write(sb.path(&xml_path), xml).unwrap();
    vmsnap(&sb, &["domain", "define", &xml_path]);
    vmsnap(&sb, &["domain", "start", "t1"]);
    // A manual snapshot, which the schedule's pruning must leave alone.
    vmsnap(&sb, &["create", "t1", "--name", "manual1", "--disk-only"]);
    vmsnap(
        &sb,
        &[
            "schedule",
            "set",
            "t1",
            "--kind",
            "disk-only",
            "--keep-last",
            "2",
        ],
    );

    // The installed hourly timer, made to fire every two seconds, precisely.
    let timer = "vmsnap-snapshot@t1.timer";
    let service = "vmsnap-snapshot@t1.service";
    sb.drop_in(
        "vmsnap-snapshot@.timer",
        "50-test",
        "[Timer]\nOnCalendar=\nOnCalendar=*:*:0/2\nAccuracySec=100ms\nRandomizedDelaySec=0\n",
    );
    sb.exec_ok(&["systemctl", "enable", "--now", timer]);
    let runs = || {
        sb.exec_ok(&["journalctl", "-u", service, "-o", "cat", "--no-pager"])
            .stdout
            .lines()
            .filter(|l| l.starts_with("Finished "))
            .count()
    };
    poll_until(
        Deadline::after(Duration::from_secs(60)),
        "four scheduled runs",
        || (runs() >= 4).then_some(()),
    );
    sb.exec_ok(&["systemctl", "disable", "--now", timer]);
    poll_until(Deadline::step(), "the last run to end", || {
        (sb.unit_property(service, "ActiveState") != "activating").then_some(())
    });
    assert_eq!(sb.unit_property(service, "Result"), "success");

    // Four or more runs, and the policy keeps two scheduled snapshots plus the manual one.
    let before = scheduled_names(&sb, "t1");
    assert_eq!(before.len(), 2, "{before:?}");
    // One more run by hand, as the service runs it: the newest two are what stays.
    vmsnap(&sb, &["schedule", "run", "t1"]);
    let after = scheduled_names(&sb, "t1");
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(
        after[0], before[1],
        "the newer of the two survives: {before:?} -> {after:?}"
    );
    assert!(
        !before.contains(&after[1]),
        "a new snapshot: {before:?} -> {after:?}"
    );
}
