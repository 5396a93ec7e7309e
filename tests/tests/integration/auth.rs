//! Who may do what, tried with real unix users against the private bus: an unprivileged user
//! is refused every mutating method (enumerated from the live introspection, so a new method
//! without a guard fails here) and allowed every read; a member of the admin group may act;
//! a job is cancelled only by its owner or root.

use std::collections::BTreeSet;

use vmsnap_dbus::names::{
    BUS_NAME, DOMAIN_INTERFACE, JOB_INTERFACE, MANAGER_INTERFACE, ROOT_PATH, SNAPSHOT_INTERFACE,
};
use vmsnap_tests::users::{TestUser, open_for_test_users, test_users};
use vmsnap_tests::{
    Deadline, DiskSpec, Output, STEP_TIMEOUT, TestEnv, domain_xml, qemu_img_create,
};

/// Methods that only read. Every other method of the vmsnap interfaces must refuse an
/// unprivileged caller; add a method here only if it changes nothing.
const READ_ONLY: &[(&str, &str)] = &[
    (MANAGER_INTERFACE, "ListDomains"),
    (MANAGER_INTERFACE, "FindDomain"),
    (DOMAIN_INTERFACE, "GetXml"),
    (DOMAIN_INTERFACE, "ListSnapshots"),
    (DOMAIN_INTERFACE, "FindSnapshot"),
    (DOMAIN_INTERFACE, "Check"),
    (DOMAIN_INTERFACE, "PlanPrune"),
    (SNAPSHOT_INTERFACE, "GetXml"),
];

const NOT_AUTHORIZED: &str = "org.vmsnap.VmSnap1.Error.NotAuthorized";
const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";

/// One member of an introspected interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Member {
    /// A method and the types of its in-arguments.
    Method {
        interface: String,
        name: String,
        args: Vec<String>,
    },
    /// A writable property and its type.
    Writable {
        interface: String,
        name: String,
        ty: String,
    },
}

/// The methods and writable properties of the `org.vmsnap.VmSnap1.*` interfaces of the object
/// an introspection document describes.
fn vmsnap_members(xml: &str) -> Vec<Member> {
    // Doc comments may hold anything that looks like a tag: drop them first.
    let mut text = String::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<!--") {
        text.push_str(&rest[..start]);
        let end = rest[start..].find("-->").expect("unterminated comment");
        rest = &rest[start + end + 3..];
    }
    text.push_str(rest);

    let attr = |tag: &str, name: &str| -> Option<String> {
        let key = format!(" {name}=\"");
        let start = tag.find(&key)? + key.len();
        Some(tag[start..].split('"').next()?.to_string())
    };
    let mut out = Vec::new();
    let mut interface: Option<String> = None;
    let mut method: Option<(String, Vec<String>)> = None;
    // zbus describes child objects inline: only the outermost node is this object.
    let mut depth = 0;
    for piece in text.split('<').skip(1) {
        let tag = piece.split('>').next().unwrap_or_default();
        if tag.starts_with("node") && !tag.ends_with('/') {
            depth += 1;
        } else if tag.starts_with("/node") {
            depth -= 1;
        }
        if depth != 1 {
            continue;
        }
        if tag.starts_with("interface ") {
            interface = attr(tag, "name").filter(|n| n.starts_with("org.vmsnap.VmSnap1."));
        } else if tag.starts_with("/interface") {
            interface = None;
        } else if let Some(iface) = &interface {
            if tag.starts_with("method ") {
                method = Some((attr(tag, "name").unwrap(), Vec::new()));
                if tag.ends_with('/') {
                    let (name, args) = method.take().unwrap();
                    out.push(Member::Method {
                        interface: iface.clone(),
                        name,
                        args,
                    });
                }
            } else if tag.starts_with("arg ") {
                if let Some((_, args)) = &mut method
                    && attr(tag, "direction").as_deref() != Some("out")
                {
                    args.push(attr(tag, "type").unwrap());
                }
            } else if tag.starts_with("/method") {
                let (name, args) = method.take().unwrap();
                out.push(Member::Method {
                    interface: iface.clone(),
                    name,
                    args,
                });
            } else if tag.starts_with("property ")
                && attr(tag, "access").is_some_and(|a| a.contains("write"))
            {
                out.push(Member::Writable {
                    interface: iface.clone(),
                    name: attr(tag, "name").unwrap(),
                    ty: attr(tag, "type").unwrap(),
                });
            }
        }
    }
    out
}

/// A harmless value of D-Bus type `ty` in GVariant text (what `gdbus call` reads).
fn dummy(ty: &str) -> String {
    match ty {
        "s" => "'x'".into(),
        "o" => "objectpath '/'".into(),
        "b" => "false".into(),
        "y" => "byte 0".into(),
        "n" => "int16 0".into(),
        "q" => "uint16 0".into(),
        "i" => "int32 0".into(),
        "u" => "uint32 0".into(),
        "x" => "int64 0".into(),
        "t" => "uint64 0".into(),
        "d" => "0.0".into(),
        "v" => "<'x'>".into(),
        t if t.starts_with("a{") => format!("@{t} {{}}"),
        t if t.starts_with('a') => format!("@{t} []"),
        t => panic!("the test has no dummy value for D-Bus type {t}: add one"),
    }
}

/// Runs `gdbus call` as `user` and returns its output.
fn gdbus_call(env: &TestEnv, user: &TestUser, path: &str, method: &str, args: &[String]) -> Output {
    let mut cmd = user.command("gdbus");
    cmd.args(["call", "--address", env.bus_address(), "--dest", BUS_NAME])
        .args(["--object-path", path, "--method", method])
        .arg("--")
        .args(args);
    vmsnap_tests::process::run(&mut cmd, Deadline::after(STEP_TIMEOUT))
}

async fn introspect(conn: &zbus::Connection, path: &str) -> String {
    zbus::fdo::IntrospectableProxy::builder(conn)
        .destination(BUS_NAME)
        .path(path.to_string())
        .build()
        .await
        .unwrap()
        .introspect()
        .await
        .unwrap()
}

/// A running domain `name` (no OS: it sits in the firmware) with an offline snapshot `s1`,
/// reachable by the test users.
fn domain_with_snapshot(env: &TestEnv, name: &str) {
    // The bus socket lives in a private directory: let the test users reach it.
    open_for_test_users(env.bus.config_file().parent().unwrap());
    let img = env.images_dir().join(format!("{name}.qcow2"));
    qemu_img_create(&img, "qcow2", "16M");
    let xml = env.write_xml(
        name,
        &domain_xml(name, &[DiskSpec::new(&img, "qcow2", "vda")]),
    );
    env.client.ok(["domain", "define", xml.to_str().unwrap()]);
    env.client.ok(["create", name, "--name", "s1"]);
    env.client.ok(["domain", "start", name]);
}

/// Starts a shutdown that cannot finish (no OS answers the power button) as `client`'s user
/// and returns the job's path.
fn long_job(client: &vmsnap_tests::Client, name: &str) -> String {
    let v = client.json(["domain", "shutdown", name, "--timeout", "600", "--no-wait"]);
    let job = v["job"].as_str().unwrap().to_string();
    assert!(job.starts_with("/org/vmsnap/VmSnap1/job/"), "{job}");
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_unprivileged_user_is_refused_every_mutation_and_allowed_every_read() {
    let (nobody, _) = test_users();
    let env = TestEnv::start();
    domain_with_snapshot(&env, "au");
    let job = long_job(&env.client, "au");
    let conn = env.connect().await;
    let m = vmsnap_dbus::proxy::ManagerProxy::new(&conn).await.unwrap();
    let dpath = m.find_domain("au").await.unwrap().to_string();
    let spath = format!("{dpath}/snapshot/1");

    let mut members = BTreeSet::new();
    for path in [ROOT_PATH, &dpath, &spath, &job] {
        for member in vmsnap_members(&introspect(&conn, path).await) {
            members.insert((path.to_string(), member));
        }
    }
    let interfaces: BTreeSet<&str> = members
        .iter()
        .map(|(_, m)| match m {
            Member::Method { interface, .. } | Member::Writable { interface, .. } => {
                interface.as_str()
            }
        })
        .collect();
    assert_eq!(
        interfaces,
        BTreeSet::from([
            MANAGER_INTERFACE,
            DOMAIN_INTERFACE,
            SNAPSHOT_INTERFACE,
            JOB_INTERFACE
        ]),
        "every vmsnap interface was introspected"
    );

    let mut mutating = 0;
    for (path, member) in &members {
        let (shown, out, read_only) = match member {
            Member::Method {
                interface,
                name,
                args,
            } => {
                let args: Vec<String> = args.iter().map(|t| dummy(t)).collect();
                let method = format!("{interface}.{name}");
                let out = gdbus_call(&env, &nobody, path, &method, &args);
                let ro = READ_ONLY.contains(&(interface.as_str(), name.as_str()));
                (method, out, ro)
            }
            Member::Writable {
                interface,
                name,
                ty,
            } => {
                let value = format!("<{}>", dummy(ty));
                let args = [format!("'{interface}'"), format!("'{name}'"), value];
                let out = gdbus_call(
                    &env,
                    &nobody,
                    path,
                    "org.freedesktop.DBus.Properties.Set",
                    &args,
                );
                (format!("{interface}.{name} (write)"), out, false)
            }
        };
        assert!(
            !out.stderr.contains(ACCESS_DENIED),
            "the bus policy stopped {shown}; the daemon must decide: {}",
            out.stderr
        );
        if read_only {
            assert!(
                !out.stderr.contains(NOT_AUTHORIZED),
                "reading with {shown} was refused: {}",
                out.stderr
            );
        } else {
            mutating += 1;
            assert!(
                !out.status.success() && out.stderr.contains(NOT_AUTHORIZED),
                "{shown} on {path} was not refused with NotAuthorized: status {}, stdout {}, \
                 stderr {}",
                out.status,
                out.stdout,
                out.stderr
            );
        }
    }
    assert!(
        mutating >= 15,
        "only {mutating} mutating members were found"
    );

    // The standard read-only interfaces are open too.
    for (path, method, args) in [
        (
            ROOT_PATH,
            "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
            vec![],
        ),
        (
            dpath.as_str(),
            "org.freedesktop.DBus.Properties.GetAll",
            vec![format!("'{DOMAIN_INTERFACE}'")],
        ),
        (
            spath.as_str(),
            "org.freedesktop.DBus.Properties.GetAll",
            vec![format!("'{SNAPSHOT_INTERFACE}'")],
        ),
        (
            job.as_str(),
            "org.freedesktop.DBus.Properties.GetAll",
            vec![format!("'{JOB_INTERFACE}'")],
        ),
        (
            dpath.as_str(),
            "org.freedesktop.DBus.Introspectable.Introspect",
            vec![],
        ),
    ] {
        let out = gdbus_call(&env, &nobody, path, method, &args);
        assert!(
            out.status.success(),
            "{method} on {path} failed for an unprivileged user: {}",
            out.stderr
        );
    }

    // The real client, as the unprivileged user: reads work, changes exit 6 naming the action.
    let client = env.client.clone().as_user(&nobody);
    client.ok(["domain", "list"]);
    client.ok(["list", "au"]);
    client.ok(["info", "au", "s1"]);
    client.ok(["dumpxml", "au", "s1"]);
    for (args, action) in [
        (vec!["create", "au", "--name", "s2"], "create"),
        (vec!["revert", "au", "s1"], "revert"),
        (vec!["delete", "au", "s1"], "delete"),
        (vec!["domain", "destroy", "au"], "manage"),
        (vec!["domain", "undefine", "au"], "manage"),
    ] {
        let (code, err) = client.err(&args);
        assert_eq!(code, 6, "{args:?}: {err}");
        let id = format!("org.vmsnap.VmSnap1.{action}");
        assert!(err.contains(&id), "{args:?} names {id}: {err}");
    }

    // Nothing changed: the guest runs, the snapshot and the job are there.
    let v = env.client.json(["list", "au"]);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1"]);
    let d = env.client.json(["domain", "list"]);
    assert_eq!(d[0]["state"], "running", "{d}");
    let out = gdbus_call(
        &env,
        &nobody,
        &job,
        "org.freedesktop.DBus.Properties.Get",
        &[format!("'{JOB_INTERFACE}'"), "'Finished'".into()],
    );
    assert!(out.stdout.contains("false"), "{}", out.stdout);
    env.client.ok(["domain", "destroy", "au"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_group_member_may_act_and_cancel_only_own_jobs() {
    let (nobody, member) = test_users();
    let env = TestEnv::start();
    domain_with_snapshot(&env, "ag");
    let as_member = env.client.clone().as_user(&member);

    // A member of the admin group may take and delete snapshots.
    as_member.ok(["create", "ag", "--name", "by-member", "--disk-only"]);
    let v = env.client.json(["list", "ag"]);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "by-member"),
        "{v}"
    );

    // Monitor commands reach anything root can: the group is not enough for them.
    let (code, err) = as_member.err(["domain", "monitor", "ag", r#"{"execute":"query-status"}"#]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("org.vmsnap.VmSnap1.manage"), "{err}");

    // root's job: neither the member nor the unprivileged user may cancel it.
    let root_job = long_job(&env.client, "ag");
    for user in [&member, &nobody] {
        let out = gdbus_call(
            &env,
            user,
            &root_job,
            &format!("{JOB_INTERFACE}.Cancel"),
            &[],
        );
        assert!(
            out.stderr.contains(NOT_AUTHORIZED) && out.stderr.contains("another user"),
            "{} cancelled root's job: {} {}",
            user.name,
            out.status,
            out.stderr
        );
    }
    let root = TestUser {
        name: "root".into(),
        uid: 0,
        gid: 0,
    };
    let out = gdbus_call(
        &env,
        &root,
        &root_job,
        &format!("{JOB_INTERFACE}.Cancel"),
        &[],
    );
    assert!(out.status.success(), "root cannot cancel: {}", out.stderr);

    // The member's own job: the member may cancel it, the unprivileged user may not.
    let member_job = vmsnap_tests::poll_until(
        Deadline::step(),
        "the cancelled shutdown to end so another can start",
        || {
            let out = as_member.run([
                "--json",
                "domain",
                "shutdown",
                "ag",
                "--timeout",
                "600",
                "--no-wait",
            ]);
            out.status.success().then(|| {
                let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
                v["job"].as_str().unwrap().to_string()
            })
        },
    );
    let out = gdbus_call(
        &env,
        &nobody,
        &member_job,
        &format!("{JOB_INTERFACE}.Cancel"),
        &[],
    );
    assert!(out.stderr.contains(NOT_AUTHORIZED), "{}", out.stderr);
    let out = gdbus_call(
        &env,
        &member,
        &member_job,
        &format!("{JOB_INTERFACE}.Cancel"),
        &[],
    );
    assert!(
        out.status.success(),
        "the member cannot cancel its own job: {}",
        out.stderr
    );
    env.client.ok(["domain", "destroy", "ag"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_polkit_grants_only_its_action_to_a_user_outside_the_group() {
    if !vmsnap_tests::polkit::Polkit::available() {
        panic!("polkitd is not installed (scripts/install-deps.sh installs it)");
    }
    let (nobody, _) = test_users();
    let env = TestEnv::start();
    let (_polkit, pk_user) = vmsnap_tests::polkit::Polkit::start(env.bus_address()).await;
    domain_with_snapshot(&env, "ap");

    // The rule gives this user `create` and nothing else.
    let client = env.client.clone().as_user(&pk_user);
    client.ok(["create", "ap", "--name", "by-polkit", "--disk-only"]);
    for (args, action) in [
        (vec!["delete", "ap", "s1"], "delete"),
        (vec!["revert", "ap", "s1"], "revert"),
        (vec!["domain", "destroy", "ap"], "manage"),
    ] {
        let (code, err) = client.err(&args);
        assert_eq!(code, 6, "{args:?}: {err}");
        assert!(
            err.contains(&format!("org.vmsnap.VmSnap1.{action}")),
            "{err}"
        );
    }
    // The rule is for that user only.
    let (code, err) = env.client.clone().as_user(&nobody).err([
        "create",
        "ap",
        "--name",
        "by-nobody",
        "--disk-only",
    ]);
    assert_eq!(code, 6, "{err}");
    let v = env.client.json(["list", "ap"]);
    let names: BTreeSet<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["s1", "by-polkit"]));
    env.client.ok(["domain", "destroy", "ap"]);
}
