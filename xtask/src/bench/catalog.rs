//! Catalog scale: the daemon with 10, 1,000 and 10,000 snapshot records of one shut-off
//! domain. Records are written straight into `STATE_DIR/catalog.sqlite3` while the daemon is
//! stopped (a parent chain, committed, the last one current), then the daemon is started again.
//! Measured per scale: start until `READY=1`, resident memory, `ListSnapshots`,
//! `GetManagedObjects` at the root, listing plus reading every snapshot's `Name`, and one
//! offline internal disk-only create (then deleted again, untimed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rusqlite::Connection;
use serde_json::json;
use vmsnap_dbus::names::{BUS_NAME, ROOT_PATH};
use vmsnap_dbus::proxy::{DomainProxy, ManagerProxy, SnapshotProxy};
use vmsnap_tests::{DiskSpec, TestEnv, counter_boot_qcow2, domain_xml};
use zbus::Variant as Value;

use super::stats::{fmt, median};
use super::{Settings, block};

/// Time a start with a large catalog may take until `READY=1`.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// Measurements at one catalog size.
#[derive(Debug, Clone)]
pub struct Scale {
    /// Snapshot records in the catalog.
    pub records: usize,
    /// Median start until READY=1.
    pub start: Duration,
    /// How many starts were timed.
    pub starts: usize,
    /// VmRSS after READY=1 and after the listings, KiB.
    pub rss_ready_kib: u64,
    /// VmRSS after all the calls at this scale, KiB.
    pub rss_after_kib: u64,
    /// Median `ListSnapshots`.
    pub list: Duration,
    /// `ListSnapshots` plus `Name` of every snapshot (median, or why not).
    pub list_names: Result<Duration, String>,
    /// `GetManagedObjects` at the root, decoded into zbus's variant maps (median, or why not).
    pub managed: Result<Duration, String>,
    /// The same call until its reply message is in, not decoded (median, or why not).
    pub managed_raw: Result<Duration, String>,
    /// Size of that reply's body, bytes.
    pub managed_bytes: usize,
    /// `vmsnap list DOMAIN --json` end to end (median, or why not).
    pub client_list: Result<Duration, String>,
    /// Median offline internal disk-only create.
    pub create: Duration,
    /// How many creates were timed.
    pub creates: usize,
}

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
}

/// Appends records to reach `total` for domain `domain_id` (a chain after the last one).
fn populate(
    db: &std::path::Path,
    domain_id: i64,
    total: usize,
    xml: &str,
    image: &str,
) -> Result<()> {
    let mut conn = Connection::open(db)?;
    let tx = conn.transaction()?;
    let have: i64 = tx.query_row(
        "SELECT count(*) FROM snapshots WHERE domain_id = ?1",
        [domain_id],
        |r| r.get(0),
    )?;
    let mut parent: Option<i64> = tx
        .query_row(
            "SELECT max(id) FROM snapshots WHERE domain_id = ?1",
            [domain_id],
            |r| r.get(0),
        )
        .unwrap_or(None);
    let memory = json!({"mode": "none"}).to_string();
    let disks = json!([{"target": "vda", "mode": "internal", "format": "qcow2", "image": image}])
        .to_string();
    {
        let mut insert = tx.prepare(
            "INSERT INTO snapshots (domain_id, name, description, created_at, state, kind, \
             parent_id, domain_xml, memory, disks, status) \
             VALUES (?1, ?2, '', ?3, 'disk-snapshot', 'disk-only', ?4, ?5, ?6, ?7, 'committed')",
        )?;
        for i in usize::try_from(have)?..total {
            insert.execute((
                domain_id,
                format!("rec-{i:05}"),
                1_700_000_000 + i64::try_from(i)?,
                parent,
                xml,
                &memory,
                &disks,
            ))?;
            parent = Some(tx.last_insert_rowid());
        }
    }
    tx.execute(
        "UPDATE domains SET current_snapshot = ?1 WHERE id = ?2",
        (parent, domain_id),
    )?;
    tx.commit()?;
    Ok(())
}

/// Runs `f` up to `reps` times, stopping early once `budget` is spent; `Err` if the first run
/// does not finish within `budget` (the daemon is then restarted by the caller).
fn bounded(
    reps: usize,
    budget: Duration,
    mut f: impl FnMut(Duration) -> Result<Option<Duration>>,
) -> Result<Result<Duration, String>> {
    let start = Instant::now();
    let mut samples = Vec::new();
    for _ in 0..reps {
        let left = budget.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        match f(left)? {
            Some(d) => samples.push(d),
            None if samples.is_empty() => {
                return Ok(Err(format!("> {} (stopped)", fmt(budget))));
            }
            None => break,
        }
    }
    Ok(median(&samples).ok_or_else(|| "–".to_string()))
}

/// Measures every scale in `settings.scales`, ascending.
pub fn run(settings: &Settings) -> Result<Vec<Scale>> {
    let mut env = TestEnv::start();
    let disk = env.images_dir().join("cat-vda.qcow2");
    counter_boot_qcow2(&disk);
    let xml = domain_xml("cat", &[DiskSpec::new(&disk, "qcow2", "vda")]);
    let xml_path = env.write_xml("cat", &xml);
    env.client
        .ok(["domain", "define", xml_path.to_str().context("path")?]);
    let conn = block(async { Ok(vmsnap_tests::connect(env.bus_address()).await?) })?;
    let domain_path =
        block(async { Ok(ManagerProxy::new(&conn).await?.find_domain("cat").await?) })?;
    let domain_id: i64 = domain_path
        .as_str()
        .rsplit('/')
        .next()
        .context("domain path")?
        .parse()?;
    let db = env.daemon.state_dir().join("catalog.sqlite3");
    let image = disk.to_str().context("path")?.to_owned();
    let n = settings.reps;
    let mut out = Vec::new();
    for &records in &settings.scales {
        env.daemon.stop();
        populate(&db, domain_id, records, &xml, &image)?;
        // At least one start; more while the budget lasts (a start grows fast with records).
        let mut starts = Vec::new();
        let began = Instant::now();
        for i in 0..n {
            if i > 0 {
                if began.elapsed() > settings.slow_call_budget {
                    break;
                }
                env.daemon.stop();
            }
            let t = Instant::now();
            env.daemon.start_again_within(START_TIMEOUT);
            starts.push(t.elapsed());
        }
        let pid = env.daemon.pid().context("daemon pid")?;
        let rss_ready_kib = vm_rss_kib(pid)?;
        let conn = block(async { Ok(vmsnap_tests::connect(env.bus_address()).await?) })?;
        let domain: DomainProxy<'static> = block(async {
            Ok(DomainProxy::builder(&conn)
                .path(domain_path.clone())
                .build()
                .await?)
        })?;

        let mut lists = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let paths = block(async { Ok(domain.list_snapshots().await?) })?;
            lists.push(t.elapsed());
            ensure!(
                paths.len() == records,
                "listed {} of {records}",
                paths.len()
            );
        }

        let mut creates = Vec::new();
        let began = Instant::now();
        for i in 0..n {
            if i > 0 && began.elapsed() > settings.slow_call_budget {
                break;
            }
            let name = format!("new-{records}-{i}");
            let t = Instant::now();
            let path = block(async {
                let o: HashMap<&str, Value<'_>> = [
                    ("disk-only", Value::from(true)),
                    ("disks", Value::from(vec!["vda=internal"])),
                ]
                .into_iter()
                .collect();
                Ok(domain.create_snapshot(&name, "", o).await?)
            })?;
            creates.push(t.elapsed());
            block(async {
                let s = SnapshotProxy::builder(&conn).path(path).build().await?;
                s.delete(HashMap::new()).await?;
                Ok(())
            })?;
        }

        let budget = settings.slow_call_budget;
        let list_names = bounded(n, budget, |left| {
            block(async {
                let t = Instant::now();
                let work = async {
                    for p in domain.list_snapshots().await? {
                        let s = SnapshotProxy::builder(&conn)
                            .path(p)
                            .cache_properties(zbus::proxy::CacheProperties::No)
                            .build()
                            .await?;
                        s.name().await?;
                    }
                    anyhow::Ok(())
                };
                match tokio::time::timeout(left, work).await {
                    Ok(r) => r.map(|()| Some(t.elapsed())),
                    Err(_) => Ok(None),
                }
            })
        })?;
        let managed = bounded(n, budget, |left| {
            block(async {
                let om = zbus::fdo::ObjectManagerProxy::builder(&conn)
                    .destination(BUS_NAME)
                    .path(ROOT_PATH)
                    .build()
                    .await?;
                let t = Instant::now();
                match tokio::time::timeout(left, om.get_managed_objects()).await {
                    Ok(r) => {
                        let objects = r?;
                        ensure!(
                            objects.len() > records,
                            "GetManagedObjects: {} objects",
                            objects.len()
                        );
                        Ok(Some(t.elapsed()))
                    }
                    Err(_) => Ok(None),
                }
            })
        })?;
        let mut managed_bytes = 0;
        let managed_raw = bounded(n, budget, |left| {
            block(async {
                let t = Instant::now();
                let call = conn.call_method(
                    Some(BUS_NAME),
                    ROOT_PATH,
                    Some("org.freedesktop.DBus.ObjectManager"),
                    "GetManagedObjects",
                    &(),
                );
                match tokio::time::timeout(left, call).await {
                    Ok(r) => {
                        let reply = r?;
                        let took = t.elapsed();
                        managed_bytes = reply.body().len();
                        Ok(Some(took))
                    }
                    Err(_) => Ok(None),
                }
            })
        })?;
        let client_list = bounded(n, budget, |_| {
            let t = Instant::now();
            let v = env.client.json(["list", "cat"]);
            let took = t.elapsed();
            let rows = v.as_array().map_or(0, Vec::len);
            ensure!(rows == records, "vmsnap list printed {rows} of {records}");
            Ok(Some(took))
        })?;
        let rss_after_kib = vm_rss_kib(pid)?;
        let scale = Scale {
            records,
            start: median(&starts).context("starts")?,
            starts: starts.len(),
            rss_ready_kib,
            rss_after_kib,
            list: median(&lists).context("lists")?,
            list_names,
            managed,
            managed_raw,
            managed_bytes,
            client_list,
            create: median(&creates).context("creates")?,
            creates: creates.len(),
        };
        eprintln!("bench: catalog {scale:?}");
        out.push(scale);
    }
    Ok(out)
}
