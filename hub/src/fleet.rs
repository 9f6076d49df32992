//! Fleet metrics: what agents report, exported by the hub per cluster, so
//! that one scrape of the hub covers edge clusters a central Prometheus
//! cannot reach.
//!
//! [`summarize`] is the pure part: one cluster's live report boiled down to
//! the few numbers the metrics show. [`FleetCollector`] reads the live
//! session table and the desired-set cache at each scrape and encodes them.
//!
//! **Cardinality.** Every per-cluster metric has a fixed number of series
//! per cluster (12, see [`SERIES_PER_CLUSTER`]); no label carries a digest,
//! a tag or an image key. The only per-(cluster, Repository) metric,
//! `image_sync_failures`, is exported only for Repositories failing now
//! (value above 0), at most [`FAILING_PER_CLUSTER`] per cluster, the worst
//! first; `imgfleet_hub_cluster_failing_repositories` counts them all. A
//! series that disappears reads as 0 (the failure ended), which is how
//! Prometheus resolves the alert. So a fleet of N clusters costs at most
//! N × (12 + 20) series, and a healthy one N × 12.

use std::collections::BTreeMap;

use imgfleet::model::ImagePhase;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use crate::desired_cache::DesiredSnapshots;
use crate::live::FleetView;
use crate::status::LiveCluster;

/// Most `image_sync_failures` series per cluster at the hub.
pub const FAILING_PER_CLUSTER: usize = 20;
/// Series every cluster has at the hub, whatever it holds.
pub const SERIES_PER_CLUSTER: usize = 12;

/// One cluster's report, as the metrics show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSummary {
    pub applied_generation: u64,
    pub storage_used_bytes: u64,
    pub storage_capacity_bytes: u64,
    /// Images by phase: pending, syncing, synced, failed.
    pub images: [u64; 4],
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Failing Repositories ((namespace, name), failures in a row), the
    /// worst first, at most [`FAILING_PER_CLUSTER`].
    pub failing: Vec<((String, String), u32)>,
    /// How many Repositories fail, including those cut from `failing`.
    pub failing_total: usize,
}

/// The phases in the order of [`ClusterSummary::images`], as labels.
const PHASES: [&str; 4] = ["pending", "syncing", "synced", "failed"];

/// Boils one cluster's live report down to what the metrics show.
pub fn summarize(live: &LiveCluster) -> ClusterSummary {
    let mut out = ClusterSummary {
        applied_generation: live.applied_generation,
        storage_used_bytes: live.storage_used_bytes,
        storage_capacity_bytes: live.storage_capacity_bytes,
        ..Default::default()
    };
    let mut failing: BTreeMap<(String, String), u32> = BTreeMap::new();
    for (key, image) in &live.images {
        let slot = match image.phase {
            Some(ImagePhase::Syncing) => 1,
            Some(ImagePhase::Synced) => 2,
            Some(ImagePhase::Failed) => 3,
            Some(ImagePhase::Pending) | Some(ImagePhase::Offline) | None => 0,
        };
        out.images[slot] += 1;
        out.bytes_done = out.bytes_done.saturating_add(image.bytes_done);
        out.bytes_total = out.bytes_total.saturating_add(image.bytes_total);
        // A retry waiting (pending) after failures still counts them, as the
        // agent's own gauge does.
        if image.phase != Some(ImagePhase::Synced) && image.attempts > 0 {
            let Some((ns, name)) = key
                .split_once('@')
                .and_then(|(source, _)| source.split_once('/'))
            else {
                continue;
            };
            let worst = failing
                .entry((ns.to_string(), name.to_string()))
                .or_default();
            *worst = (*worst).max(image.attempts);
        }
    }
    out.failing_total = failing.len();
    let mut failing: Vec<_> = failing.into_iter().collect();
    // Worst first; by name among equals, so the cut is stable.
    failing.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    failing.truncate(FAILING_PER_CLUSTER);
    out.failing = failing;
    out
}

/// `used / capacity` in percent; 0 while the capacity is unknown.
pub fn usage_percent(used: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        0.0
    } else {
        (used as f64 * 100.0 / capacity as f64).min(100.0)
    }
}

/// Encodes the fleet metrics at each scrape.
pub struct FleetCollector {
    pub live: FleetView,
    pub desired: DesiredSnapshots,
}

impl std::fmt::Debug for FleetCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCollector").finish_non_exhaustive()
    }
}

/// One gauge family: name, help, and its series (labels, value).
type Gauges<'a> = Vec<(Vec<(&'static str, &'a str)>, f64)>;

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: Gauges<'_>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in &series {
        family.encode_family(labels)?.encode_gauge(value)?;
    }
    Ok(())
}

impl Collector for FleetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = self.live.summaries();
        let desired = self.desired.all();
        // Every cluster with a desired set or a session here.
        let mut clusters: Vec<&str> = desired.keys().map(String::as_str).collect();
        clusters.extend(live.keys().map(String::as_str));
        clusters.sort_unstable();
        clusters.dedup();
        let connected = clusters.iter().filter(|c| live.contains_key(**c)).count();

        gauge(
            &mut encoder,
            "imgfleet_hub_clusters",
            "Clusters with a desired set or a session, by whether their agent is connected to this hub replica.",
            vec![
                (vec![("state", "connected")], connected as f64),
                (
                    vec![("state", "offline")],
                    (clusters.len() - connected) as f64,
                ),
            ],
        )?;
        gauge(
            &mut encoder,
            "imgfleet_hub_cluster_connected",
            "1 while the cluster's agent holds a session with this hub replica.",
            clusters
                .iter()
                .map(|c| {
                    (
                        vec![("cluster", *c)],
                        f64::from(u8::from(live.contains_key(*c))),
                    )
                })
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "imgfleet_hub_cluster_desired_generation",
            "Generation of the cluster's stored desired set.",
            desired
                .iter()
                .map(|(c, s)| (vec![("cluster", c.as_str())], s.generation as f64))
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "imgfleet_hub_cluster_applied_generation",
            "Desired-set generation the connected agent acknowledged.",
            live.iter()
                .map(|(c, s)| (vec![("cluster", c.as_str())], s.applied_generation as f64))
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "imgfleet_hub_cluster_generation_lag",
            "Stored desired-set generation minus the generation the connected agent applied; 0 when up to date.",
            live.iter()
                .filter_map(|(c, s)| {
                    let want = desired.get(c)?.generation;
                    Some((
                        vec![("cluster", c.as_str())],
                        want.saturating_sub(s.applied_generation) as f64,
                    ))
                })
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "imgfleet_hub_cluster_images",
            "Desired images of the connected cluster by the phase its agent reported.",
            live.iter()
                .flat_map(|(c, s)| {
                    PHASES.iter().zip(s.images).map(move |(phase, n)| {
                        (vec![("cluster", c.as_str()), ("phase", *phase)], n as f64)
                    })
                })
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "imgfleet_hub_cluster_bytes_done",
            "Blob bytes the connected cluster holds of its desired images.",
            live.iter()
                .map(|(c, s)| (vec![("cluster", c.as_str())], s.bytes_done as f64))
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "imgfleet_hub_cluster_bytes_total",
            "Blob bytes of the connected cluster's desired images, as far as known.",
            live.iter()
                .map(|(c, s)| (vec![("cluster", c.as_str())], s.bytes_total as f64))
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "imgfleet_hub_cluster_failing_repositories",
            "Repositories with an image whose last sync attempts failed on the connected cluster (all of them, also those beyond the image_sync_failures cap).",
            live.iter()
                .map(|(c, s)| (vec![("cluster", c.as_str())], s.failing_total as f64))
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "image_storage_usage_percent",
            "Used share of the cluster's content store filesystem, 0 to 100, as its agent reported.",
            live.iter()
                .map(|(c, s)| {
                    (
                        vec![("cluster", c.as_str())],
                        usage_percent(s.storage_used_bytes, s.storage_capacity_bytes),
                    )
                })
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "image_sync_failures",
            "Failed sync attempts in a row of the Repository's worst image on the cluster; only failing Repositories, at most 20 per cluster.",
            live.iter()
                .flat_map(|(c, s)| {
                    s.failing.iter().map(move |((ns, name), n)| {
                        (
                            vec![
                                ("cluster", c.as_str()),
                                ("namespace", ns.as_str()),
                                ("repository", name.as_str()),
                            ],
                            f64::from(*n),
                        )
                    })
                })
                .collect(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ImageState;

    fn image(phase: ImagePhase, attempts: u32, done: u64) -> ImageState {
        ImageState {
            phase: Some(phase),
            attempts,
            bytes_done: done,
            bytes_total: 10,
            ..Default::default()
        }
    }

    #[test]
    fn a_cluster_summary_counts_phases_and_keeps_the_worst_failures() {
        let mut live = LiveCluster {
            applied_generation: 7,
            storage_used_bytes: 30,
            storage_capacity_bytes: 120,
            ..Default::default()
        };
        let images = [
            ("ns/ok@sha256:1", image(ImagePhase::Synced, 0, 10)),
            ("ns/app@sha256:2", image(ImagePhase::Failed, 4, 0)),
            ("ns/app@sha256:3", image(ImagePhase::Pending, 6, 0)),
            ("ns/busy@sha256:4", image(ImagePhase::Syncing, 0, 5)),
            // A retry after two failures is still failing.
            ("other/db@sha256:5", image(ImagePhase::Pending, 2, 0)),
        ];
        for (k, s) in images {
            live.images.insert(k.into(), s);
        }
        let s = summarize(&live);
        assert_eq!(s.images, [2, 1, 1, 1]);
        assert_eq!((s.bytes_done, s.bytes_total), (15, 50));
        assert_eq!(
            s.failing,
            vec![
                (("ns".into(), "app".into()), 6),
                (("other".into(), "db".into()), 2)
            ]
        );
        assert_eq!(s.failing_total, 2);
        assert_eq!(usage_percent(30, 120), 25.0);
        assert_eq!(usage_percent(5, 0), 0.0);
    }

    #[test]
    fn failing_series_are_capped_per_cluster() {
        let mut live = LiveCluster::default();
        for i in 0..(FAILING_PER_CLUSTER + 5) {
            live.images.insert(
                format!("ns/r{i:03}@sha256:x"),
                image(ImagePhase::Failed, 1 + i as u32, 0),
            );
        }
        let s = summarize(&live);
        assert_eq!(s.failing.len(), FAILING_PER_CLUSTER);
        assert_eq!(s.failing_total, FAILING_PER_CLUSTER + 5);
        // The worst are kept.
        assert_eq!(s.failing[0].1, (FAILING_PER_CLUSTER + 5) as u32);
        assert!(s.failing.iter().all(|(_, n)| *n > 5));
    }
}
