//! Medians, formatting and the markdown table.

use std::time::Duration;

/// Median of `samples` (the mean of the two middle ones for an even count); `None` if empty.
pub fn median(samples: &[Duration]) -> Option<Duration> {
    let mut s = samples.to_vec();
    s.sort();
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some((s[n / 2 - 1] + s[n / 2]) / 2),
    }
}

/// A duration for the table: `12.3 ms`, `1.234 s` or `850 µs`.
pub fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.3} s", us / 1e6)
    }
}

/// `a / b` as `1.23x`.
pub fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// One operation's row.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// What was measured.
    pub operation: String,
    /// Repetitions per column.
    pub reps: usize,
    /// Median D-Bus call to reply, or a text such as "not supported yet".
    pub dbus: Cell,
    /// Median `vmsnap` client run, end to end.
    pub client: Cell,
    /// Median raw QMP floor.
    pub floor: Cell,
    /// The target ratio D-Bus/floor (1.5 or 1.2).
    pub target: f64,
}

/// A measured median, or nothing.
#[derive(Debug, Clone, Default)]
pub enum Cell {
    /// Not measured.
    #[default]
    None,
    /// A median.
    Time(Duration),
}

impl Cell {
    /// The median of `samples`.
    pub fn of(samples: &[Duration]) -> Self {
        median(samples).map_or(Cell::None, Cell::Time)
    }

    fn time(&self) -> Option<Duration> {
        match self {
            Cell::Time(d) => Some(*d),
            _ => None,
        }
    }

    fn show(&self) -> String {
        match self {
            Cell::None => "–".into(),
            Cell::Time(d) => fmt(*d),
        }
    }
}

impl Row {
    /// The D-Bus/floor ratio when both are numbers.
    pub fn ratio(&self) -> Option<f64> {
        Some(ratio(self.dbus.time()?, self.floor.time()?))
    }

    /// Whether the target is met (`None` when there is no ratio).
    pub fn met(&self) -> Option<bool> {
        self.ratio().map(|r| r <= self.target)
    }
}

/// The operations table in markdown.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| operation | n | vmsnap D-Bus | vmsnap client | raw QMP floor | D-Bus / floor | target | met |\n\
         |---|---:|---:|---:|---:|---:|---:|:---:|\n",
    );
    for r in rows {
        let ratio = r.ratio().map_or("–".into(), |x| format!("{x:.2}x"));
        let met = match r.met() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | ≤ {:.1}x | {} |\n",
            r.operation,
            r.reps,
            r.dbus.show(),
            r.client.show(),
            r.floor.show(),
            ratio,
            r.target,
            met
        ));
    }
    out
}
