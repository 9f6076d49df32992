//! Figures, medians and the Markdown table every suite reports into, plus
//! what the suites need from the machine: process RSS and CPU time from
//! /proc, the machine's description and the release binaries' location.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// How a figure's values are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Values are seconds.
    Seconds,
    /// Values are milliseconds.
    Millis,
    /// Values are bytes; shown in MiB or KiB.
    Bytes,
    /// A ratio (ours against theirs); shown as `1.72×`.
    Ratio,
    /// A percentage.
    Percent,
    /// A plain number.
    Count,
}

impl Unit {
    pub fn show(self, v: f64) -> String {
        match self {
            Unit::Seconds => format!("{v:.3} s"),
            // Small figures (a cost per object) keep two decimals.
            Unit::Millis if v < 10.0 => format!("{v:.2} ms"),
            Unit::Millis => format!("{v:.0} ms"),
            Unit::Bytes if v >= 1024.0 * 1024.0 => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
            Unit::Bytes => format!("{:.1} KiB", v / 1024.0),
            Unit::Ratio => format!("{v:.2}×"),
            Unit::Percent => format!("{v:.0}%"),
            Unit::Count => format!("{v:.0}"),
        }
    }
}

/// A target a figure is held to, and whether its median meets it.
#[derive(Debug, Clone)]
pub struct Target {
    pub text: String,
    pub met: bool,
}

impl Target {
    /// Met when the median is at least `bound`.
    pub fn at_least(median: f64, bound: f64, unit: Unit) -> Target {
        Target {
            text: format!("≥ {}", unit.show(bound)),
            met: median >= bound,
        }
    }

    /// Met when the median is at most `bound`.
    pub fn at_most(median: f64, bound: f64, unit: Unit) -> Target {
        Target {
            text: format!("≤ {}", unit.show(bound)),
            met: median <= bound,
        }
    }
}

/// One reported measurement: every run's value and the median.
#[derive(Debug, Clone)]
pub struct Figure {
    pub suite: &'static str,
    pub metric: String,
    pub unit: Unit,
    pub runs: Vec<f64>,
    pub target: Option<Target>,
}

impl Figure {
    pub fn median(&self) -> f64 {
        median(&self.runs)
    }
}

/// Everything measured in one invocation.
#[derive(Debug, Default)]
pub struct Report {
    figures: Vec<Figure>,
}

impl Report {
    pub fn new() -> Report {
        Report::default()
    }

    /// Records a figure and prints it at once, so long runs show progress.
    /// `target` gets the median and returns the target it is held to.
    pub fn add(
        &mut self,
        suite: &'static str,
        metric: impl Into<String>,
        unit: Unit,
        runs: Vec<f64>,
        target: Option<&dyn Fn(f64) -> Target>,
    ) -> f64 {
        let m = median(&runs);
        let fig = Figure {
            suite,
            metric: metric.into(),
            unit,
            target: target.map(|t| t(m)),
            runs,
        };
        eprintln!(
            "[{suite}] {}: {}{}",
            fig.metric,
            unit.show(m),
            verdict(&fig)
        );
        self.figures.push(fig);
        m
    }

    /// The Markdown table: suite, metric, median, every run, target.
    pub fn markdown(&self, runs: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Machine: {}", machine());
        let args: Vec<String> = std::env::args().collect();
        let _ = writeln!(out, "Command: `{}` (median of {runs})", args.join(" "));
        let _ = writeln!(out);
        let _ = writeln!(out, "| Suite | Measurement | Median | Runs | Target |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        for f in &self.figures {
            let all: Vec<String> = f.runs.iter().map(|v| f.unit.show(*v)).collect();
            let target = match &f.target {
                Some(t) => format!("{} {}", t.text, if t.met { "met" } else { "**missed**" }),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                f.suite,
                f.metric,
                f.unit.show(f.median()),
                all.join(", "),
                target
            );
        }
        out
    }
}

fn verdict(f: &Figure) -> String {
    match &f.target {
        Some(t) if t.met => format!(" (target {}: met)", t.text),
        Some(t) => format!(" (target {}: MISSED)", t.text),
        None => String::new(),
    }
}

/// The median; the mean of the middle two for an even count; NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0–100) by nearest rank; NaN when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// CPU model, cores, memory and kernel, for the report's header.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!(
        "{model}, {cores} cores, {:.0} GiB RAM, Linux {kernel}",
        mem_kib as f64 / (1024.0 * 1024.0)
    )
}

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`, ...).
pub fn proc_status_bytes(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let prefix = format!("{field}:");
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{path} has no {field} line"))?;
    Ok(kib * 1024)
}

/// Resident set size of a process in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    proc_status_bytes(pid, "VmRSS")
}

/// Peak resident set size of a process in bytes.
pub fn peak_rss_bytes(pid: u32) -> Result<u64> {
    proc_status_bytes(pid, "VmHWM")
}

/// User plus system CPU time a process has used, in seconds. Reads
/// `/proc/<pid>/stat` fields 14 and 15, counted in clock ticks of 1/100 s
/// (USER_HZ is 100 on every Linux architecture we run on).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; fields resume after its ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so field n is at index n - 3.
    let ticks = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: no field {n}"))
    };
    Ok((ticks(14)? + ticks(15)?) as f64 / 100.0)
}

/// A workspace binary next to this one (the release build when this is the
/// release build), or an error saying how to build it.
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating imgfleet-bench")?;
    let dir = exe
        .parent()
        .context("imgfleet-bench has no parent directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the workspace first with: cargo build --release --workspace --bins",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
    }

    #[test]
    fn own_process_is_measurable() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(peak_rss_bytes(pid).unwrap() >= rss_bytes(pid).unwrap() / 2);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
    }
}
