//! Following a job to its end, fed by the job's `PropertiesChanged` and `Completed` signals.
//!
//! On a terminal the progress is an indicatif bar (bytes, rate and time left when the job
//! counts bytes; a spinner with the phase otherwise); when stderr is not a terminal it is
//! plain lines (each new phase, and every tenth of the bytes); with `--json` nothing is drawn,
//! so that stderr carries only the JSON error if there is one.
//!
//! Invariant: the signal subscriptions exist before the job's state is first read, so no
//! change can fall between the two; a slow re-check of `Finished` covers a daemon that went
//! away without a last signal.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use vmsnap_dbus::names::{BUS_NAME, JOB_INTERFACE};
use vmsnap_dbus::proxy::JobProxy;
use zbus::fdo::PropertiesProxy;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

use crate::output::Failure;

/// How often `Finished` is read again when no signal came, in case the daemon went away.
const RECHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How often the terminal bar redraws by itself (elapsed time, spinner).
const TICK: Duration = Duration::from_millis(120);

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An indicatif bar on the terminal.
    Bar,
    /// Plain lines on stderr.
    Lines,
    /// Nothing (JSON output).
    Quiet,
}

impl Mode {
    /// The mode for this invocation: quiet with `--json`, a bar when stderr is a terminal.
    pub fn detect(json_mode: bool) -> Mode {
        if json_mode {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        }
    }
}

/// What the client knows of the job, updated from signals.
#[derive(Debug, Default, Clone)]
struct View {
    operation: String,
    phase: String,
    progress: f64,
    progress_valid: bool,
    bytes_done: u64,
    bytes_total: u64,
    finished: bool,
}

impl View {
    fn apply(&mut self, name: &str, value: &Variant<'_>) {
        match (name, value) {
            ("Operation", Variant::Str(s)) => self.operation = s.to_string(),
            ("Phase", Variant::Str(s)) => self.phase = s.to_string(),
            ("Progress", Variant::F64(p)) => self.progress = *p,
            ("ProgressValid", Variant::Bool(b)) => self.progress_valid = *b,
            ("BytesDone", Variant::U64(n)) => self.bytes_done = *n,
            ("BytesTotal", Variant::U64(n)) => self.bytes_total = *n,
            ("Finished", Variant::Bool(b)) => self.finished = *b,
            _ => {}
        }
    }
}

/// Draws a view in one of the modes.
struct Painter {
    mode: Mode,
    bar: Option<ProgressBar>,
    /// Lines mode: the last phase and tenth printed.
    last_line: Option<(String, u64)>,
    /// Lines mode: when bytes were first seen, and how many, for the rate.
    first_bytes: Option<(Instant, u64)>,
}

fn mib(n: u64) -> f64 {
    n as f64 / (1024.0 * 1024.0)
}

impl Painter {
    fn new(mode: Mode) -> Painter {
        Painter {
            mode,
            bar: None,
            last_line: None,
            first_bytes: None,
        }
    }

    fn paint(&mut self, v: &View) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Bar => self.paint_bar(v),
            Mode::Lines => self.paint_line(v),
        }
    }

    fn paint_bar(&mut self, v: &View) {
        let with_bytes = v.bytes_total > 0;
        let template = if with_bytes {
            "{spinner} {prefix} {msg:10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} \
             {eta} left"
        } else if v.progress_valid {
            "{spinner} {prefix} {msg:10} [{bar:30}] {percent:>3}% {elapsed}"
        } else {
            "{spinner} {prefix} {msg} {elapsed}"
        };
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(0);
            b.enable_steady_tick(TICK);
            b
        });
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(v.operation.clone());
        bar.set_message(v.phase.clone());
        if with_bytes {
            bar.set_length(v.bytes_total);
            bar.set_position(v.bytes_done.min(v.bytes_total));
        } else if v.progress_valid {
            bar.set_length(1000);
            bar.set_position((v.progress.clamp(0.0, 1.0) * 1000.0) as u64);
        }
    }

    fn paint_line(&mut self, v: &View) {
        if v.finished {
            return;
        }
        let tenth = v
            .bytes_done
            .saturating_mul(10)
            .checked_div(v.bytes_total)
            .map_or(0, |t| t.min(10));
        let key = (v.phase.clone(), tenth);
        if self.last_line.as_ref() == Some(&key) {
            return;
        }
        self.last_line = Some(key);
        if v.bytes_total == 0 {
            eprintln!("vmsnap: {}: {}", v.operation, v.phase);
            return;
        }
        let (t0, b0) = *self
            .first_bytes
            .get_or_insert((Instant::now(), v.bytes_done));
        let secs = t0.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            format!(", {:.1} MiB/s", mib(v.bytes_done.saturating_sub(b0)) / secs)
        } else {
            String::new()
        };
        eprintln!(
            "vmsnap: {}: {} {}% ({:.1} of {:.1} MiB{rate})",
            v.operation,
            v.phase,
            tenth * 10,
            mib(v.bytes_done),
            mib(v.bytes_total)
        );
    }

    fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Follows the job at `path` to its end, showing progress in `mode`; returns the job's
/// `Result` object, or its error as a failure.
pub async fn follow(
    conn: &Connection,
    path: OwnedObjectPath,
    mode: Mode,
) -> Result<OwnedObjectPath, Failure> {
    let props = PropertiesProxy::builder(conn)
        .destination(BUS_NAME)
        .path(path.clone())
        .build()
        .await?;
    let mut changes = props.receive_properties_changed().await?;
    // Uncached: a cached Result/Finished could lag behind the Completed signal.
    let job = JobProxy::builder(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let mut completed = job.receive_completed().await?;
    let iface = zbus::names::InterfaceName::from_static_str_unchecked(JOB_INTERFACE);
    let all: HashMap<String, OwnedVariant> = props
        .get_all(iface)
        .await
        .map_err(|e| Failure::from(zbus::Error::from(e)))?;
    let mut view = View::default();
    for (k, v) in &all {
        view.apply(k, v);
    }
    let mut painter = Painter::new(mode);
    while !view.finished {
        painter.paint(&view);
        tokio::select! {
            change = changes.next() => match change {
                Some(signal) => {
                    if let Ok(args) = signal.args()
                        && args.interface_name.as_str() == JOB_INTERFACE
                    {
                        for (k, v) in args.changed_properties.iter() {
                            view.apply(k, v);
                        }
                    }
                }
                None => view.finished = job.finished().await?,
            },
            _ = completed.next() => view.finished = true,
            _ = tokio::time::sleep(RECHECK_INTERVAL) => view.finished = job.finished().await?,
        }
    }
    painter.done();
    let err = job.error_name().await?;
    if !err.is_empty() {
        let msg = job.error_message().await?;
        return Err(Failure::wire(crate::snapshot::error_from_name(&err, msg)));
    }
    Ok(job.result().await?)
}
