//! `imgfleet watch`: follows the sync of Repositories across clusters, with live progress
//! bars on a terminal and plain lines otherwise, and (with `--until-synced`) ends once every
//! watched Repository is Synced on all the clusters it targets.
//!
//! The hub is polled with List (or Get) every [`POLL_INTERVAL`]: simpler than a Watch stream
//! and it rides over hub restarts by reconnecting. What is shown and whether to stop are
//! decided by the pure functions [`rows`], [`plain_line`], [`summary_line`] and [`verdict`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use imgfleet::api::v1 as pb;
use imgfleet::model::{self, ImagePhase, Kind, Object, Repository};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::format::{human_bytes, progress, short_digest};
use super::hub;

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

/// One line per Repository: how many of its target clusters are Synced, what its tags
/// resolved to, and why resolution failed if it did.
pub fn summary_line(r: &Repository) -> String {
    let status = r.status.clone().unwrap_or_default();
    let mut line = format!(
        "{} synced on {}/{} cluster(s)",
        repo_id(r),
        status.synced_clusters,
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
    if status.target_clusters == 0 && r.spec.placement.is_none() {
        line.push_str("; no placement: it targets no cluster");
    }
    line
}

/// Whether the watch can stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every watched Repository is Synced on every cluster it targets (at least one).
    AllSynced,
    /// Not yet: the Repositories still waited for, as `namespace/name synced/target`.
    Waiting(Vec<String>),
}

/// Decides whether everything watched is Synced. `wanted` names the one Repository watched,
/// if any; a watch with nothing to look at is never done.
pub fn verdict(repos: &[Repository], wanted: Option<&str>) -> Verdict {
    if repos.is_empty() {
        return Verdict::Waiting(vec![match wanted {
            Some(name) => format!("{name}: not found"),
            None => "no repositories".to_owned(),
        }]);
    }
    let waiting: Vec<String> = repos
        .iter()
        .filter_map(|r| {
            let (synced, target) = r
                .status
                .as_ref()
                .map(|s| (s.synced_clusters, s.target_clusters))
                .unwrap_or_default();
            (target == 0 || synced != target).then(|| format!("{} {synced}/{target}", repo_id(r)))
        })
        .collect();
    if waiting.is_empty() {
        Verdict::AllSynced
    } else {
        Verdict::Waiting(waiting)
    }
}

/// How output is drawn.
enum Display {
    /// Plain lines, each printed when it changes.
    Plain { printed: BTreeMap<String, String> },
    /// Progress bars on a terminal.
    Bars {
        multi: MultiProgress,
        summaries: BTreeMap<String, ProgressBar>,
        bars: BTreeMap<String, ProgressBar>,
    },
}

impl Display {
    fn new(terminal: bool) -> Display {
        if terminal {
            Display::Bars {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
                summaries: BTreeMap::new(),
                bars: BTreeMap::new(),
            }
        } else {
            Display::Plain {
                printed: BTreeMap::new(),
            }
        }
    }

    fn show(&mut self, repos: &[Repository]) {
        match self {
            Display::Plain { printed } => {
                let mut lines: Vec<(String, String)> = Vec::new();
                for r in repos {
                    lines.push((format!("{} ~summary", repo_id(r)), summary_line(r)));
                }
                for row in rows(repos) {
                    lines.push((row.key(), plain_line(&row)));
                }
                for (key, line) in lines {
                    if printed.get(&key) != Some(&line) {
                        println!("{line}");
                        printed.insert(key, line);
                    }
                }
            }
            Display::Bars {
                multi,
                summaries,
                bars,
            } => {
                let style = ProgressStyle::with_template(
                    "{prefix:40} [{bar:30.cyan/blue}] {percent:>3}% {bytes:>10}/{total_bytes:10} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                let summary_style = ProgressStyle::with_template("{msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                let mut seen = BTreeSet::new();
                for r in repos {
                    let id = repo_id(r);
                    seen.insert(id.clone());
                    match summaries.get(&id) {
                        Some(bar) => bar.set_message(summary_line(r)),
                        None => {
                            let bar = ProgressBar::new(0).with_style(summary_style.clone());
                            bar.set_message(summary_line(r));
                            summaries.insert(id, multi.add(bar));
                        }
                    }
                }
                summaries.retain(|id, bar| {
                    let keep = seen.contains(id);
                    if !keep {
                        bar.finish_and_clear();
                        multi.remove(bar);
                    }
                    keep
                });
                let mut seen = BTreeSet::new();
                for row in rows(repos) {
                    let key = row.key();
                    seen.insert(key.clone());
                    // A Synced image is complete even if no byte count was reported.
                    let total = row.bytes_total.max(1);
                    let position = if row.phase == Some(ImagePhase::Synced) {
                        total
                    } else {
                        row.bytes_done.min(total)
                    };
                    let mut msg = phase_text(&row);
                    if let Some(m) = row.message.as_deref().filter(|m| !m.is_empty()) {
                        msg.push_str(": ");
                        msg.push_str(m);
                    }
                    match bars.get(&key) {
                        Some(bar) => {
                            bar.set_length(total);
                            bar.set_position(position);
                            bar.set_message(msg);
                        }
                        None => {
                            // Fully set up before it is added, so it never flashes empty.
                            let bar = ProgressBar::new(total).with_style(style.clone());
                            bar.set_prefix(format!(
                                "{} {} {}",
                                row.repository,
                                row.cluster,
                                short_digest(&row.digest)
                            ));
                            bar.set_position(position);
                            bar.set_message(msg);
                            bars.insert(key, multi.add(bar));
                        }
                    }
                }
                bars.retain(|key, bar| {
                    let keep = seen.contains(key);
                    if !keep {
                        bar.finish_and_clear();
                        multi.remove(bar);
                    }
                    keep
                });
            }
        }
    }

    /// Prints a line above the bars (or as a plain line).
    fn note(&self, line: &str) {
        match self {
            Display::Plain { .. } => println!("{line}"),
            Display::Bars { multi, .. } => {
                if multi.println(line).is_err() {
                    println!("{line}");
                }
            }
        }
    }

    /// Leaves the bars on screen as they are.
    fn finish(&mut self) {
        if let Display::Bars {
            summaries, bars, ..
        } = self
        {
            for bar in summaries.values().chain(bars.values()) {
                bar.abandon();
            }
        }
    }
}

/// Reads the watched Repositories once.
async fn fetch(
    client: &mut imgfleet::api::v1::admin_service_client::AdminServiceClient<
        tonic::transport::Channel,
    >,
    args: &WatchArgs,
    target: &hub::Target,
) -> anyhow::Result<Vec<Repository>> {
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
                // Not created yet: keep waiting, verdict() says what is missing.
                Err(s) if s.code() == tonic::Code::NotFound => Vec::new(),
                Err(s) => return Err(hub::status_error(s, &id, target)),
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
                .map_err(|s| hub::status_error(s, "repositories list", target))?
                .into_inner()
                .items
        }
    };
    let mut repos = Vec::new();
    for o in objects {
        match Object::try_from(o).context("the hub sent an object this CLI cannot read")? {
            Object::Repository(r) => repos.push(r),
            other => bail!(
                "the hub sent {} where a Repository was expected",
                other.id()
            ),
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
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(repos) => {
                if last_error.take().is_some() {
                    display.note("reconnected to the hub");
                }
                display.show(&repos);
                match verdict(&repos, args.name.as_deref()) {
                    Verdict::AllSynced if args.until_synced => {
                        display.finish();
                        println!("all watched repositories are synced");
                        return Ok(ExitCode::SUCCESS);
                    }
                    Verdict::AllSynced => last_waiting.clear(),
                    Verdict::Waiting(w) => last_waiting = w,
                }
            }
            Err(e) => {
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
            display.finish();
            if args.until_synced {
                let what = if last_waiting.is_empty() {
                    last_error.unwrap_or_else(|| "no answer from the hub".to_owned())
                } else {
                    last_waiting.join(", ")
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
            },
        );
        r.metadata.namespace = Some("default".into());
        r.status = Some(RepositoryStatus {
            resolved: vec![ResolvedTag {
                tag: "latest".into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
                media_type: String::new(),
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
    fn verdict_needs_every_target_synced_and_at_least_one_target() {
        assert_eq!(
            verdict(&[repo("a", 2, 2, vec![]), repo("b", 1, 1, vec![])], None),
            Verdict::AllSynced
        );
        assert_eq!(
            verdict(&[repo("a", 2, 2, vec![]), repo("b", 1, 2, vec![])], None),
            Verdict::Waiting(vec!["default/b 1/2".into()])
        );
        assert_eq!(
            verdict(&[repo("a", 0, 0, vec![])], None),
            Verdict::Waiting(vec!["default/a 0/0".into()])
        );
        assert_eq!(
            verdict(&[], Some("nginx")),
            Verdict::Waiting(vec!["nginx: not found".into()])
        );
        assert_eq!(
            verdict(&[], None),
            Verdict::Waiting(vec!["no repositories".into()])
        );
    }

    #[test]
    fn summary_names_counts_tags_and_failures() {
        let mut r = repo("nginx-latest", 1, 2, vec![]);
        assert_eq!(
            summary_line(&r),
            "default/nginx-latest synced on 1/2 cluster(s); latest -> sha256:abababababab"
        );
        if let Some(s) = r.status.as_mut() {
            s.resolved.clear();
            s.reason = Some(model::ResolveReason::AuthFailed);
            s.message = Some("401 from 127.0.0.1:5000".into());
            s.target_clusters = 0;
            s.synced_clusters = 0;
        }
        assert_eq!(
            summary_line(&r),
            "default/nginx-latest synced on 0/0 cluster(s); tags not resolved yet; \
             resolve failed: AuthFailed: 401 from 127.0.0.1:5000; no placement: it targets no cluster"
        );
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
