//! `imgfleet watch`: follows the sync of Repositories across clusters, with a live
//! block of progress bars on a terminal and plain lines otherwise, shows the transfer
//! rate and time left per image and per cluster, and (with `--until-synced`) ends once
//! every watched Repository's clusters hold every digest it resolves to.
//!
//! The hub is polled with List (or Get) every [`POLL_INTERVAL`]: simpler than a Watch
//! stream and it rides over hub restarts by reconnecting. A named Repository that does
//! not exist ends the watch at once. What is shown and whether to stop are decided by
//! pure functions: [`rows`], [`cluster_totals`], [`plain_line`], [`summary_line`],
//! [`frame`] and [`verdict`] (which asks [`model::clusters_holding`]).
//!
//! On a terminal the whole block is drawn again in place on every poll: the cursor
//! goes back up over the lines drawn last time, which are cleared, and the new block
//! is written in one piece. Every line is cut to the terminal's width and the block
//! to its height, so the terminal never wraps or scrolls a line the next redraw would
//! miss; nothing of an older block can stay behind.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use imgfleet::api::v1 as pb;
use imgfleet::model::{self, ImagePhase, Kind, Object, Repository};

use super::format::{human_bytes, progress, short_digest};
use super::hub;
use super::output;
use super::rate::{self, Estimator};

/// How often the hub is asked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What to watch and when to stop.
#[derive(Debug, Clone)]
pub struct WatchArgs {
    /// Only this Repository.
    pub name: Option<String>,
    /// Namespace of the Repositories.
    pub namespace: String,
    /// Every namespace.
    pub all_namespaces: bool,
    /// Exit 0 once everything watched is Synced.
    pub until_synced: bool,
    /// Give up after this long.
    pub timeout: Option<Duration>,
}

/// Parses the positional `KIND` of `watch`: only Repositories can be watched.
pub fn parse_watch_kind(text: &str) -> Result<Kind, String> {
    match Kind::parse(text) {
        Ok(Kind::Repository) => Ok(Kind::Repository),
        Ok(other) => Err(format!(
            "cannot watch {}: expected repository (repo)",
            other.plural()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// One image of one Repository on one cluster, as shown.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `namespace/name` of the Repository.
    pub repository: String,
    /// The cluster.
    pub cluster: String,
    /// The digest.
    pub digest: String,
    /// The phase; `None` while not reported.
    pub phase: Option<ImagePhase>,
    /// Bytes done.
    pub bytes_done: u64,
    /// Bytes in total (0 when unknown).
    pub bytes_total: u64,
    /// Detail such as the last error.
    pub message: Option<String>,
    /// The cluster is offline and this is its last report.
    pub last_known: bool,
}

impl Row {
    /// Identifies the row across polls.
    pub fn key(&self) -> String {
        format!("{} {} {}", self.repository, self.cluster, self.digest)
    }
}

fn repo_id(r: &Repository) -> String {
    format!(
        "{}/{}",
        r.metadata
            .namespace
            .as_deref()
            .unwrap_or(model::DEFAULT_NAMESPACE),
        r.metadata.name.as_deref().unwrap_or("")
    )
}

/// The rows of every Repository, sorted by Repository, cluster and digest.
pub fn rows(repos: &[Repository]) -> Vec<Row> {
    let mut out: Vec<Row> = repos
        .iter()
        .flat_map(|r| {
            let id = repo_id(r);
            r.status
                .iter()
                .flat_map(|s| s.clusters.iter())
                .map(move |c| Row {
                    repository: id.clone(),
                    cluster: c.cluster.clone(),
                    digest: c.digest.clone(),
                    phase: c.phase,
                    bytes_done: c.bytes_done,
                    bytes_total: c.bytes_total,
                    message: c.message.clone(),
                    last_known: c.last_known,
                })
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.repository, &a.cluster, &a.digest).cmp(&(&b.repository, &b.cluster, &b.digest))
    });
    out
}

fn phase_text(row: &Row) -> String {
    let phase = row
        .phase
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "Pending".to_owned());
    if row.last_known {
        format!("{phase} (last known)")
    } else {
        phase
    }
}

/// `12.0/26.7 MiB`: both numbers in the unit of the total.
fn bytes_pair(done: u64, total: u64) -> String {
    if total == 0 {
        return human_bytes(done);
    }
    let total_text = human_bytes(total);
    match total_text.split_once(' ') {
        Some((_, unit)) if unit != "B" => {
            let scale = match unit {
                "KiB" => 1024f64,
                "MiB" => 1024f64.powi(2),
                "GiB" => 1024f64.powi(3),
                _ => 1024f64.powi(4),
            };
            format!("{:.1}/{total_text}", done.min(total) as f64 / scale)
        }
        _ => format!("{}/{total} B", done.min(total)),
    }
}

/// One plain output line:
/// `default/nginx-latest edge-1 Syncing 45% 12.0/26.7 MiB sha256:0123456789ab`, plus the
/// message when there is one.
pub fn plain_line(row: &Row) -> String {
    let mut line = format!(
        "{} {} {} {} {} {}",
        row.repository,
        row.cluster,
        phase_text(row),
        progress(row.phase, row.bytes_done, row.bytes_total),
        bytes_pair(row.bytes_done, row.bytes_total),
        short_digest(&row.digest)
    );
    if let Some(m) = row.message.as_deref().filter(|m| !m.is_empty()) {
        line.push_str(": ");
        line.push_str(m);
    }
    line
}

/// One line per Repository: on how many of its target clusters every digest it resolves
/// to is Synced, what its tags resolved to, and why resolution failed if it did.
pub fn summary_line(r: &Repository) -> String {
    let status = r.status.clone().unwrap_or_default();
    let holding = model::clusters_holding(r);
    let mut line = format!(
        "{} synced on {}/{} cluster(s)",
        repo_id(r),
        holding.holding_count(),
        status.target_clusters
    );
    if status.resolved.is_empty() {
        line.push_str("; tags not resolved yet");
    } else {
        let tags: Vec<String> = status
            .resolved
            .iter()
            .map(|t| {
                if t.tag.is_empty() {
                    short_digest(&t.digest)
                } else {
                    format!("{} -> {}", t.tag, short_digest(&t.digest))
                }
            })
            .collect();
        line.push_str("; ");
        line.push_str(&tags.join(", "));
    }
    if let Some(reason) = status.reason {
        line.push_str(&format!(
            "; resolve failed: {reason:?}{}",
            status
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    if status.target_clusters == 0 {
        line.push_str("; targets no cluster (imgfleet describe says why)");
    }
    line
}

/// Whether the watch can stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The clusters of every watched Repository hold every digest it resolves to.
    AllSynced,
    /// Not yet: the Repositories still waited for, as `namespace/name: why`.
    Waiting(Vec<String>),
}

/// Decides whether everything watched is synced, by digest ([`model::clusters_holding`]):
/// counts alone never end a watch. A watch with nothing to look at is never done.
pub fn verdict(repos: &[Repository]) -> Verdict {
    if repos.is_empty() {
        return Verdict::Waiting(vec!["no repositories".to_owned()]);
    }
    let waiting: Vec<String> = repos
        .iter()
        .filter_map(|r| {
            let holding = model::clusters_holding(r);
            (!holding.is_complete()).then(|| format!("{}: {}", repo_id(r), holding.waiting_for()))
        })
        .collect();
    if waiting.is_empty() {
        Verdict::AllSynced
    } else {
        Verdict::Waiting(waiting)
    }
}

/// The images of one cluster across the watched Repositories, summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTotal {
    /// The cluster.
    pub cluster: String,
    /// Images (rows) on it.
    pub images: usize,
    /// Of those, Synced and current.
    pub synced: usize,
    /// Bytes done, a Synced image counting as complete.
    pub bytes_done: u64,
    /// Bytes in total; 0 when an image not yet Synced has no known total.
    pub bytes_total: u64,
}

/// Sums the rows per cluster, sorted by cluster.
pub fn cluster_totals(rows: &[Row]) -> Vec<ClusterTotal> {
    let mut by: BTreeMap<&str, (ClusterTotal, bool)> = BTreeMap::new();
    for row in rows {
        let (t, known) = by.entry(row.cluster.as_str()).or_insert_with(|| {
            (
                ClusterTotal {
                    cluster: row.cluster.clone(),
                    images: 0,
                    synced: 0,
                    bytes_done: 0,
                    bytes_total: 0,
                },
                true,
            )
        });
        t.images += 1;
        if row.phase == Some(ImagePhase::Synced) {
            let size = row.bytes_total.max(row.bytes_done);
            t.bytes_done += size;
            t.bytes_total += size;
            if !row.last_known {
                t.synced += 1;
            }
        } else {
            t.bytes_done += row.bytes_done;
            t.bytes_total += row.bytes_total;
            *known &= row.bytes_total > 0;
        }
    }
    by.into_values()
        .map(|(mut t, known)| {
            if !known {
                t.bytes_total = 0;
            }
            t
        })
        .collect()
}

/// `edge-1: 1/2 image(s) synced, 12.0/26.7 MiB`, then the rate and ETA when known.
pub fn cluster_line(t: &ClusterTotal, speed: &str) -> String {
    let mut line = format!(
        "{}: {}/{} image(s) synced, {}",
        t.cluster,
        t.synced,
        t.images,
        bytes_pair(t.bytes_done, t.bytes_total)
    );
    if !speed.is_empty() {
        line.push_str(", ");
        line.push_str(speed);
    }
    line
}

/// Rate estimates per image (by [`Row::key`]) and per cluster, across polls.
#[derive(Debug, Default)]
pub struct Speeds {
    images: BTreeMap<String, Estimator>,
    clusters: BTreeMap<String, Estimator>,
}

impl Speeds {
    /// Takes the counts of one poll at `now` (time since the watch started); forgets
    /// images and clusters no longer shown.
    pub fn observe(&mut self, now: Duration, rows: &[Row], totals: &[ClusterTotal]) {
        let mut seen = BTreeSet::new();
        for row in rows {
            let key = row.key();
            self.images
                .entry(key.clone())
                .or_default()
                .observe(now, row.bytes_done);
            seen.insert(key);
        }
        self.images.retain(|k, _| seen.contains(k));
        let mut seen = BTreeSet::new();
        for t in totals {
            self.clusters
                .entry(t.cluster.clone())
                .or_default()
                .observe(now, t.bytes_done);
            seen.insert(t.cluster.clone());
        }
        self.clusters.retain(|k, _| seen.contains(k));
    }

    /// `1.2 MiB/s ETA 12s`, `stalled` or nothing, for one image.
    pub fn of_image(&self, now: Duration, row: &Row) -> String {
        if row.phase == Some(ImagePhase::Synced) {
            return String::new();
        }
        self.images
            .get(&row.key())
            .map(|e| rate::describe(&e.progress(now, row.bytes_total)))
            .unwrap_or_default()
    }

    /// The same for one cluster's images together.
    pub fn of_cluster(&self, now: Duration, t: &ClusterTotal) -> String {
        if t.synced == t.images {
            return String::new();
        }
        self.clusters
            .get(&t.cluster)
            .map(|e| rate::describe(&e.progress(now, t.bytes_total)))
            .unwrap_or_default()
    }
}

/// `[=========>          ]` of `width` cells inside the brackets.
pub fn bar(phase: Option<ImagePhase>, done: u64, total: u64, width: usize) -> String {
    let filled = if phase == Some(ImagePhase::Synced) {
        width
    } else if total == 0 {
        0
    } else {
        (u128::from(done.min(total)) * width as u128 / u128::from(total)) as usize
    };
    let mut cells = "=".repeat(filled);
    if filled < width {
        if filled > 0 {
            cells.pop();
            cells.push('>');
        }
        cells.push_str(&" ".repeat(width - filled));
    }
    format!("[{cells}]")
}

/// Terminal cells a character is counted as: outside ASCII, two, so that a line is
/// never wider than counted, whatever its script.
fn cells(c: char) -> usize {
    if c.is_ascii() { 1 } else { 2 }
}

/// How many terminal rows `lines`, drawn when the terminal was wider, take once it is
/// `width` cells wide: terminals (tmux, VTE, iTerm2, kitty) rewrap what is on screen
/// when they shrink, so a line drawn to fit may now take several rows.
pub fn rows_at_width(lines: &[String], width: usize) -> usize {
    let width = width.max(1);
    lines
        .iter()
        .map(|l| l.chars().map(cells).sum::<usize>().div_ceil(width).max(1))
        .sum()
}

/// Cuts `line` to at most `width` terminal cells (see [`cells`]), and turns control
/// characters into spaces.
pub fn fit(line: &str, width: usize) -> String {
    let mut used = 0;
    let mut out = String::new();
    for c in line.chars() {
        let w = cells(c);
        if c.is_ascii_control() {
            // A newline or tab in a message would break the line count.
            if used + 1 > width {
                break;
            }
            out.push(' ');
            used += 1;
            continue;
        }
        if used + w > width {
            break;
        }
        out.push(c);
        used += w;
    }
    out
}

/// Width of the bars in the live block.
const BAR_WIDTH: usize = 24;

/// The live block: per Repository its summary and one bar per image and cluster, then
/// one line per cluster with its totals. Each line fits in `width` cells, and the block
/// in `height` lines (the rest is counted on a last line).
pub fn frame(
    repos: &[Repository],
    speeds: &Speeds,
    now: Duration,
    width: usize,
    height: usize,
) -> Vec<String> {
    let all = rows(repos);
    let name_width = all.iter().map(|r| r.cluster.len()).max().unwrap_or(0);
    let mut lines = Vec::new();
    for r in repos {
        lines.push(summary_line(r));
        let id = repo_id(r);
        for row in all.iter().filter(|row| row.repository == id) {
            let mut line = format!(
                "  {:<name_width$} {} {} {:>4} {}",
                row.cluster,
                short_digest(&row.digest),
                bar(row.phase, row.bytes_done, row.bytes_total, BAR_WIDTH),
                progress(row.phase, row.bytes_done, row.bytes_total),
                bytes_pair(row.bytes_done, row.bytes_total),
            );
            let speed = speeds.of_image(now, row);
            if !speed.is_empty() {
                line.push(' ');
                line.push_str(&speed);
            }
            line.push(' ');
            line.push_str(&phase_text(row));
            if let Some(m) = row.message.as_deref().filter(|m| !m.is_empty()) {
                line.push_str(": ");
                line.push_str(m);
            }
            lines.push(line);
        }
    }
    let totals = cluster_totals(&all);
    if !totals.is_empty() {
        lines.push("clusters:".to_owned());
        for t in &totals {
            lines.push(format!("  {}", cluster_line(t, &speeds.of_cluster(now, t))));
        }
    }
    let height = height.max(2);
    if lines.len() > height {
        let hidden = lines.len() - (height - 1);
        lines.truncate(height - 1);
        lines.push(format!(
            "... {hidden} more line(s) below; a taller terminal, or --until-synced piped to a file, shows all"
        ));
    }
    lines.into_iter().map(|l| fit(&l, width)).collect()
}

/// How output is drawn.
enum Display {
    /// Plain lines, each printed when it changes (rate and ETA aside).
    Plain { printed: BTreeMap<String, String> },
    /// A block redrawn in place on a terminal.
    Live {
        /// The block last drawn, to draw it again below a note.
        last: Vec<String>,
        /// The terminal's width then.
        width: usize,
    },
}

/// Moves the cursor to the start of a block of `lines` lines just above it and
/// clears from there to the end of the screen.
fn erase(lines: usize) -> String {
    if lines == 0 {
        "\r\x1b[J".to_owned()
    } else {
        format!("\r\x1b[{lines}A\x1b[J")
    }
}

impl Display {
    fn new(terminal: bool) -> Display {
        if terminal {
            Display::Live {
                last: Vec::new(),
                width: 0,
            }
        } else {
            Display::Plain {
                printed: BTreeMap::new(),
            }
        }
    }

    fn show(&mut self, repos: &[Repository], speeds: &Speeds, now: Duration) {
        match self {
            Display::Plain { printed } => {
                // (key, what decides whether it changed, what is printed)
                let mut lines: Vec<(String, String, String)> = Vec::new();
                for r in repos {
                    let line = summary_line(r);
                    lines.push((format!("{} ~summary", repo_id(r)), line.clone(), line));
                }
                let all = rows(repos);
                for row in &all {
                    let line = plain_line(row);
                    let speed = speeds.of_image(now, row);
                    let shown = if speed.is_empty() {
                        line.clone()
                    } else {
                        format!("{line} {speed}")
                    };
                    lines.push((row.key(), line, shown));
                }
                for t in cluster_totals(&all) {
                    let line = format!("cluster {}", cluster_line(&t, ""));
                    let speed = speeds.of_cluster(now, &t);
                    let shown = format!("cluster {}", cluster_line(&t, &speed));
                    lines.push((format!("~cluster {}", t.cluster), line, shown));
                }
                for (key, line, shown) in lines {
                    if printed.get(&key) != Some(&line) {
                        println!("{shown}");
                        printed.insert(key, line);
                    }
                }
            }
            Display::Live { last, width } => {
                let (rows, columns) = console::Term::stdout().size();
                let columns = usize::from(columns);
                // The block on screen takes one row a line, unless the terminal shrank
                // since and rewrapped it.
                let on_screen = if columns == *width {
                    last.len()
                } else {
                    rows_at_width(last, columns)
                };
                // One column spare: a line as wide as the terminal leaves some terminals
                // waiting to wrap, which would throw the next redraw off by a line.
                let lines = frame(
                    repos,
                    speeds,
                    now,
                    columns.saturating_sub(1).max(20),
                    usize::from(rows).saturating_sub(1).max(2),
                );
                let mut out = erase(on_screen);
                for l in &lines {
                    out.push_str(l);
                    out.push('\n');
                }
                output::write_raw_and_flush(out.as_bytes());
                *last = lines;
                *width = columns;
            }
        }
    }

    /// Prints a line above the block (or as a plain line).
    fn note(&mut self, line: &str) {
        match self {
            Display::Plain { .. } => println!("{line}"),
            Display::Live { last, width } => {
                let columns = usize::from(console::Term::stdout().size().1);
                let on_screen = if columns == *width {
                    last.len()
                } else {
                    rows_at_width(last, columns)
                };
                // The note stays above the block and is never redrawn, so it may wrap.
                let mut out = erase(on_screen);
                out.push_str(line);
                out.push('\n');
                // The block is drawn again as it was; the next poll fits it to the width.
                for l in last.iter() {
                    out.push_str(l);
                    out.push('\n');
                }
                output::write_raw_and_flush(out.as_bytes());
            }
        }
    }
}

/// Why one poll gave nothing to show.
enum FetchError {
    /// The named Repository does not exist: the watch ends.
    NotFound(anyhow::Error),
    /// Anything else (the hub restarting, its store down): retried.
    Other(anyhow::Error),
}

/// Reads the watched Repositories once.
async fn fetch(
    client: &mut imgfleet::api::v1::admin_service_client::AdminServiceClient<
        tonic::transport::Channel,
    >,
    args: &WatchArgs,
    target: &hub::Target,
) -> Result<Vec<Repository>, FetchError> {
    let objects: Vec<pb::Object> = match &args.name {
        Some(name) => {
            let id = model::object_id(Kind::Repository, Some(&args.namespace), name);
            let request = pb::GetRequest {
                kind: pb::Kind::from(Kind::Repository) as i32,
                namespace: args.namespace.clone(),
                name: name.clone(),
            };
            match client.get(request).await {
                Ok(o) => vec![o.into_inner()],
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(FetchError::NotFound(anyhow!(
                        "{id} not found; create it first (imgfleet apply -f FILE), or check the name and -n NAMESPACE"
                    )));
                }
                Err(s) => return Err(FetchError::Other(hub::status_error(s, &id, target))),
            }
        }
        None => {
            let request = pb::ListRequest {
                kind: pb::Kind::from(Kind::Repository) as i32,
                namespace: args.namespace.clone(),
                all_namespaces: args.all_namespaces,
                label_selector: String::new(),
            };
            client
                .list(request)
                .await
                .map_err(|s| FetchError::Other(hub::status_error(s, "repositories list", target)))?
                .into_inner()
                .items
        }
    };
    let mut repos = Vec::new();
    for o in objects {
        match Object::try_from(o).context("the hub sent an object this CLI cannot read") {
            Ok(Object::Repository(r)) => repos.push(r),
            Ok(other) => {
                return Err(FetchError::Other(anyhow!(
                    "the hub sent {} where a Repository was expected",
                    other.id()
                )));
            }
            Err(e) => return Err(FetchError::Other(e)),
        }
    }
    Ok(repos)
}

/// Runs `imgfleet watch`.
pub async fn run(target: &hub::Target, args: WatchArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // Bad credentials or a wrong URL fail at once; later failures (a hub restarting) are
    // retried until the timeout.
    let mut client = Some(hub::connect(target).await?);
    let mut display = Display::new(std::io::stdout().is_terminal());
    let mut speeds = Speeds::default();
    let mut last_error: Option<String> = None;
    let mut last_waiting = Vec::new();
    loop {
        let result = match client.as_mut() {
            Some(c) => fetch(c, &args, target).await,
            None => match hub::connect(target).await {
                Ok(mut c) => {
                    let r = fetch(&mut c, &args, target).await;
                    client = Some(c);
                    r
                }
                Err(e) => Err(FetchError::Other(e)),
            },
        };
        match result {
            Ok(repos) => {
                if last_error.take().is_some() {
                    display.note("reconnected to the hub");
                }
                let now = started.elapsed();
                let all = rows(&repos);
                speeds.observe(now, &all, &cluster_totals(&all));
                display.show(&repos, &speeds, now);
                match verdict(&repos) {
                    Verdict::AllSynced if args.until_synced => {
                        println!("all watched repositories are synced");
                        return Ok(ExitCode::SUCCESS);
                    }
                    Verdict::AllSynced => last_waiting.clear(),
                    Verdict::Waiting(w) => last_waiting = w,
                }
            }
            Err(FetchError::NotFound(e)) => return Err(e),
            Err(FetchError::Other(e)) => {
                let text = format!("{e:#}");
                if last_error.as_deref() != Some(text.as_str()) {
                    display.note(&format!("warning: {text}; retrying"));
                }
                last_error = Some(text);
                client = None;
            }
        }
        if let Some(timeout) = args.timeout
            && started.elapsed() >= timeout
        {
            if args.until_synced {
                let what = if last_waiting.is_empty() {
                    last_error.unwrap_or_else(|| "no answer from the hub".to_owned())
                } else {
                    last_waiting.join("; ")
                };
                eprintln!(
                    "error: not synced after {}: {what}",
                    model::format_duration(timeout)
                );
                return Ok(ExitCode::FAILURE);
            }
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgfleet::model::{ClusterImageStatus, RepositorySpec, RepositoryStatus, ResolvedTag};

    fn repo(name: &str, synced: u32, target: u32, images: Vec<ClusterImageStatus>) -> Repository {
        let mut r = Repository::new(
            name,
            RepositorySpec {
                repository: "library/nginx".into(),
                tag: Some("latest".into()),
                tags: Vec::new(),
                tag_pattern: None,
                digest: None,
                platforms: Vec::new(),
                registry_ref: model::RegistryRef {
                    name: "harbor-prod".into(),
                    namespace: None,
                },
                sync_interval: None,
                placement: None,
                retention: None,
                suspend: false,
                verify: None,
                scan: None,
            },
        );
        r.metadata.namespace = Some("default".into());
        r.status = Some(RepositoryStatus {
            resolved: vec![ResolvedTag {
                tag: "latest".into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
                media_type: String::new(),
                scan: None,
                verification: None,
            }],
            clusters: images,
            synced_clusters: synced,
            target_clusters: target,
            ..Default::default()
        });
        r
    }

    fn image(
        cluster: &str,
        phase: Option<ImagePhase>,
        done: u64,
        total: u64,
    ) -> ClusterImageStatus {
        ClusterImageStatus {
            cluster: cluster.into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            phase,
            bytes_done: done,
            bytes_total: total,
            layers_done: 0,
            layers_total: 0,
            last_sync_time: None,
            message: None,
            next_retry_time: None,
            last_known: false,
            held_digests: Vec::new(),
        }
    }

    #[test]
    fn plain_line_shows_phase_percent_bytes_and_digest() {
        let mib = 1024 * 1024;
        let r = repo(
            "nginx-latest",
            0,
            1,
            vec![image(
                "edge-1",
                Some(ImagePhase::Syncing),
                12 * mib,
                267 * mib / 10,
            )],
        );
        let rows = rows(&[r]);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            plain_line(&rows[0]),
            "default/nginx-latest edge-1 Syncing 44% 12.0/26.7 MiB sha256:abababababab"
        );
    }

    #[test]
    fn plain_line_marks_last_known_and_messages() {
        let mut img = image("edge-2", Some(ImagePhase::Failed), 0, 0);
        img.message = Some("connection refused; retry at 10:00".into());
        img.last_known = true;
        let rows = rows(&[repo("x", 0, 1, vec![img])]);
        assert_eq!(
            plain_line(&rows[0]),
            "default/x edge-2 Failed (last known) - 0 B sha256:abababababab: connection refused; retry at 10:00"
        );
    }

    #[test]
    fn synced_image_is_100_percent() {
        let rows = rows(&[repo(
            "x",
            1,
            1,
            vec![image("edge-1", Some(ImagePhase::Synced), 0, 2048)],
        )]);
        assert!(plain_line(&rows[0]).contains(" Synced 100% 0.0/2.0 KiB "));
    }

    #[test]
    fn rows_are_sorted_by_repository_then_cluster() {
        let a = repo(
            "b-repo",
            0,
            2,
            vec![image("edge-2", None, 0, 0), image("edge-1", None, 0, 0)],
        );
        let b = repo("a-repo", 0, 1, vec![image("edge-3", None, 0, 0)]);
        let keys: Vec<String> = rows(&[a, b])
            .iter()
            .map(|r| format!("{} {}", r.repository, r.cluster))
            .collect();
        assert_eq!(
            keys,
            [
                "default/a-repo edge-3",
                "default/b-repo edge-1",
                "default/b-repo edge-2"
            ]
        );
    }

    #[test]
    fn verdict_compares_digests_and_needs_a_target() {
        let synced = |c: &str| image(c, Some(ImagePhase::Synced), 10, 10);
        assert_eq!(
            verdict(&[
                repo("a", 2, 2, vec![synced("edge-1"), synced("edge-2")]),
                repo("b", 1, 1, vec![synced("edge-1")])
            ]),
            Verdict::AllSynced
        );
        assert_eq!(
            verdict(&[
                repo("a", 2, 2, vec![synced("edge-1"), synced("edge-2")]),
                repo(
                    "b",
                    1,
                    2,
                    vec![synced("edge-1"), image("edge-2", None, 0, 0)]
                )
            ]),
            Verdict::Waiting(vec!["default/b: edge-2 lacks sha256:abababababab".into()])
        );
        // Counts that say 1/1 do not end the watch when the entry is another digest.
        let mut moved = synced("edge-1");
        moved.digest = format!("sha256:{}", "cd".repeat(32));
        assert_eq!(
            verdict(&[repo("a", 1, 1, vec![moved])]),
            Verdict::Waiting(vec!["default/a: edge-1 lacks sha256:abababababab".into()])
        );
        assert_eq!(
            verdict(&[repo("a", 0, 0, vec![])]),
            Verdict::Waiting(vec!["default/a: targets no cluster".into()])
        );
        assert_eq!(
            verdict(&[]),
            Verdict::Waiting(vec!["no repositories".into()])
        );
    }

    #[test]
    fn summary_names_counts_by_digest_tags_and_failures() {
        let mut r = repo(
            "nginx-latest",
            2,
            2,
            vec![
                image("edge-1", Some(ImagePhase::Synced), 0, 0),
                image("edge-2", Some(ImagePhase::Syncing), 0, 0),
            ],
        );
        assert_eq!(
            summary_line(&r),
            "default/nginx-latest synced on 1/2 cluster(s); latest -> sha256:abababababab"
        );
        if let Some(s) = r.status.as_mut() {
            s.resolved.clear();
            s.clusters.clear();
            s.reason = Some(model::ResolveReason::AuthFailed);
            s.message = Some("401 from 127.0.0.1:5000".into());
            s.target_clusters = 0;
            s.synced_clusters = 0;
        }
        assert_eq!(
            summary_line(&r),
            "default/nginx-latest synced on 0/0 cluster(s); tags not resolved yet; \
             resolve failed: AuthFailed: 401 from 127.0.0.1:5000; targets no cluster (imgfleet describe says why)"
        );
    }

    #[test]
    fn clusters_sum_their_images() {
        let mib = 1024 * 1024;
        let a = repo(
            "a",
            0,
            2,
            vec![
                image("edge-1", Some(ImagePhase::Syncing), 10 * mib, 40 * mib),
                image("edge-2", Some(ImagePhase::Synced), 0, 30 * mib),
            ],
        );
        let b = repo(
            "b",
            0,
            2,
            vec![
                image("edge-1", Some(ImagePhase::Synced), 20 * mib, 20 * mib),
                image("edge-2", Some(ImagePhase::Pending), 0, 0),
            ],
        );
        let totals = cluster_totals(&rows(&[a, b]));
        assert_eq!(
            totals,
            vec![
                ClusterTotal {
                    cluster: "edge-1".into(),
                    images: 2,
                    synced: 1,
                    bytes_done: 30 * mib,
                    bytes_total: 60 * mib,
                },
                // An image of unknown size leaves the cluster's total unknown.
                ClusterTotal {
                    cluster: "edge-2".into(),
                    images: 2,
                    synced: 1,
                    bytes_done: 30 * mib,
                    bytes_total: 0,
                },
            ]
        );
        assert_eq!(
            cluster_line(&totals[0], "1.0 MiB/s ETA 30s"),
            "edge-1: 1/2 image(s) synced, 30.0/60.0 MiB, 1.0 MiB/s ETA 30s"
        );
        assert_eq!(
            cluster_line(&totals[1], ""),
            "edge-2: 1/2 image(s) synced, 30.0 MiB"
        );
    }

    #[test]
    fn speeds_follow_images_and_clusters_across_polls() {
        let mib = 1024 * 1024;
        let mut speeds = Speeds::default();
        let poll = |done: u64| {
            vec![repo(
                "a",
                0,
                1,
                vec![image("edge-1", Some(ImagePhase::Syncing), done, 10 * mib)],
            )]
        };
        for (secs, done) in [(0, 0), (1, mib), (2, 2 * mib)] {
            let all = rows(&poll(done));
            speeds.observe(Duration::from_secs(secs), &all, &cluster_totals(&all));
        }
        let now = Duration::from_secs(2);
        let all = rows(&poll(2 * mib));
        assert_eq!(speeds.of_image(now, &all[0]), "1.0 MiB/s ETA 8s");
        assert_eq!(
            speeds.of_cluster(now, &cluster_totals(&all)[0]),
            "1.0 MiB/s ETA 8s"
        );
        // Stalled, then gone from the watch: forgotten.
        assert_eq!(speeds.of_image(Duration::from_secs(13), &all[0]), "stalled");
        speeds.observe(Duration::from_secs(14), &[], &[]);
        assert_eq!(speeds.of_image(Duration::from_secs(14), &all[0]), "");
    }

    #[test]
    fn bars_and_lines_fit() {
        assert_eq!(bar(None, 0, 0, 10), "[          ]");
        assert_eq!(bar(Some(ImagePhase::Syncing), 5, 10, 10), "[====>     ]");
        assert_eq!(bar(Some(ImagePhase::Syncing), 10, 10, 10), "[==========]");
        assert_eq!(bar(Some(ImagePhase::Synced), 0, 0, 4), "[====]");
        assert_eq!(fit("abcdef", 4), "abcd");
        assert_eq!(fit("a\nb\tc", 10), "a b c");
        // Wide characters count twice, so the line never outgrows the terminal.
        assert_eq!(fit("ab镜像cd", 5), "ab镜");
        // Lines drawn 79 wide take two rows each once the terminal is 40 wide.
        let drawn = vec![
            "x".repeat(79),
            "y".repeat(40),
            String::new(),
            "镜".repeat(30),
        ];
        assert_eq!(rows_at_width(&drawn, 80), 4);
        assert_eq!(rows_at_width(&drawn, 40), 2 + 1 + 1 + 2);
    }

    #[test]
    fn the_live_block_fits_the_terminal() {
        let mib = 1024 * 1024;
        let mut img = image("edge-1", Some(ImagePhase::Syncing), 12 * mib, 24 * mib);
        img.message = Some("a message\nover two lines that is rather long".into());
        let repos = vec![repo(
            "nginx-latest",
            0,
            2,
            vec![img, image("edge-22", Some(ImagePhase::Synced), 0, 24 * mib)],
        )];
        let speeds = Speeds::default();
        let lines = frame(&repos, &speeds, Duration::ZERO, 200, 40);
        assert_eq!(
            lines,
            vec![
                "default/nginx-latest synced on 1/2 cluster(s); latest -> sha256:abababababab",
                "  edge-1  sha256:abababababab [===========>            ]  50% 12.0/24.0 MiB Syncing: a message over two lines that is rather long",
                "  edge-22 sha256:abababababab [========================] 100% 0.0/24.0 MiB Synced",
                "clusters:",
                "  edge-1: 0/1 image(s) synced, 12.0/24.0 MiB",
                "  edge-22: 1/1 image(s) synced, 24.0/24.0 MiB",
            ]
        );
        let narrow = frame(&repos, &speeds, Duration::ZERO, 30, 4);
        assert_eq!(narrow.len(), 4);
        assert!(
            narrow.iter().all(|l| l.chars().count() <= 30),
            "{narrow:#?}"
        );
        assert_eq!(narrow[3], "... 3 more line(s) below; a ta");
    }

    #[test]
    fn only_repositories_can_be_watched() {
        assert_eq!(parse_watch_kind("repo"), Ok(Kind::Repository));
        assert_eq!(parse_watch_kind("Repositories"), Ok(Kind::Repository));
        assert_eq!(
            parse_watch_kind("cluster"),
            Err("cannot watch clusters: expected repository (repo)".into())
        );
        assert!(parse_watch_kind("nope").is_err());
    }
}
