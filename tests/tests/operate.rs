//! Operating imgfleet with the tools a platform team already runs:
//!
//! - the alert rules in `deploy/prometheus/alerts.yaml` pass their `promtool test rules`;
//! - a real Prometheus scraping a live hub and three agents sees an image that fails to sync
//!   (its upstream stops answering after the hub resolved it) reach `image_sync_failures > 3`
//!   at every agent and, per cluster, at the hub; the rules load and evaluate on those series;
//!   the hub's series per cluster stay the documented fixed set;
//! - every query of the Grafana dashboard `deploy/grafana/imgfleet.json` runs without error
//!   against that Prometheus.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use imgfleet_tests::fleet::{HubOptions, HubProcess};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::prometheus::{Prometheus, promtool};
use imgfleet_tests::{FaultProxy, Registry, RegistryOptions, policy, wait_until};

const CONVERGE: Duration = Duration::from_secs(120);
const CLUSTERS: [&str; 3] = ["edge-1", "edge-2", "edge-3"];
/// Series every cluster has at the hub (`imgfleet_hub::fleet::SERIES_PER_CLUSTER`), plus
/// one `image_sync_failures` per failing Repository.
const SERIES_PER_CLUSTER: usize = 12;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

#[test]
fn alert_rules_pass_promtool() -> Result<()> {
    let dir = workspace_root().join("deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yaml"][..],
        &["test", "rules", "alerts_test.yaml"][..],
    ] {
        let out = Command::new(promtool())
            .args(args)
            .current_dir(&dir)
            .output()
            .context("run promtool")?;
        ensure!(
            out.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The seed's two rules, verbatim.
    let rules = std::fs::read_to_string(dir.join("alerts.yaml"))?;
    let seed =
        std::fs::read_to_string(workspace_root().join("src/model/testdata/seed-alert-rules.yaml"))?;
    for line in seed.lines().filter(|l| !l.trim().is_empty()) {
        ensure!(
            rules.contains(line.trim()),
            "alerts.yaml lacks the seed's line {line:?}"
        );
    }
    Ok(())
}

/// The dashboard's queries, with Grafana's variables replaced as Grafana would for "All".
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let path = workspace_root().join("deploy/grafana/imgfleet.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?,
    )
    .with_context(|| format!("parse {}", path.display()))?;
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("panel {} has a target without expr", panel["title"]))?;
            let expr = expr
                .replace("$__rate_interval", "30s")
                .replace("$cluster", ".*");
            out.push((panel["title"].as_str().unwrap_or("").to_string(), expr));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(q) = var["definition"].as_str()
            && let Some(metric) = q
                .strip_prefix("label_values(")
                .and_then(|r| r.split(',').next())
        {
            out.push((format!("variable {}", var["name"]), metric.to_string()));
        }
    }
    ensure!(
        out.len() >= 10,
        "the dashboard has only {} queries",
        out.len()
    );
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_sync_failures_at_agents_and_hub() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let registry = Registry::start(RegistryOptions::plain()).await?;
    let image = PushTarget::from(&registry)
        .push_image("library/app", "v1", &ImageSpec::random(&[64 << 10], 31))
        .await?;
    // Hub and agents reach the upstream through the proxy, so it can stop answering.
    let proxy = FaultProxy::start(registry.addr().parse()?).await?;
    let hub = HubProcess::start(HubOptions::embedded(root.join("hub"))).await?;
    let cli = hub.cli();
    cli.apply_yaml(&policy::objects(&[
        policy::registry_secret("upstream", &proxy.addr().to_string(), None),
        policy::repository("app", "library/app", "v1", "upstream", ""),
    ]))
    .await?;
    wait_until("the hub resolving app:v1", CONVERGE, || async {
        let v = cli.get_json(&["repository", "app"]).await?;
        Ok(v["status"]["resolved"][0]["digest"] == image.manifest_digest.as_str())
    })
    .await?;

    // The upstream stops answering: every agent's sync of app fails, again and again.
    proxy.set_refuse(true);
    let mut agents = Vec::new();
    for name in CLUSTERS {
        agents.push(hub.start_agent(name, &["default"], root).await?);
    }

    let hub_addr = hub.metrics_url().trim_start_matches("http://").to_string();
    let mut targets = vec![("hub", hub_addr.clone())];
    targets.extend(agents.iter().map(|a| ("agent", a.metrics_addr())));
    let rules = workspace_root().join("deploy/prometheus/alerts.yaml");
    let prom = Prometheus::start(&targets, &[rules.as_path()]).await?;

    let failing = |job: &'static str| {
        let prom = &prom;
        async move {
            let series = prom
                .query(&format!(
                    "image_sync_failures{{job=\"{job}\",namespace=\"default\",repository=\"app\"}} > 3"
                ))
                .await?;
            Ok::<_, anyhow::Error>(series)
        }
    };
    let seen = wait_until(
        "image_sync_failures > 3 at all three agents and for all three clusters at the hub",
        CONVERGE,
        || async {
            let at_agents = failing("agent").await?;
            let at_hub = failing("hub").await?;
            let mut clusters: Vec<&str> = at_hub.iter().map(|s| s.label("cluster")).collect();
            clusters.sort_unstable();
            Ok(at_agents.len() == 3 && clusters == CLUSTERS)
        },
    )
    .await;
    if let Err(e) = seen {
        bail!("{e:#}\nscrape targets: {:?}", prom.targets().await?);
    }

    // Every target is scraped cleanly (a malformed exposition would be "down").
    for (job, instance, health, error) in prom.targets().await? {
        ensure!(
            health == "up",
            "{job} {instance} is {health}: {error}\n{}",
            prom.log_tail(20)
        );
    }

    // The seed's rule loaded and evaluates on these very series: pending for its 15 minutes.
    wait_until("ImageSyncFailure pending", CONVERGE, || async {
        let alerts = prom
            .query("ALERTS{alertname=\"ImageSyncFailure\",alertstate=\"pending\"}")
            .await?;
        Ok(
            alerts.iter().filter(|a| a.label("job") == "hub").count() == 3
                && alerts.iter().filter(|a| a.label("job") == "agent").count() == 3,
        )
    })
    .await?;

    // The hub's fleet series: connected, the fixed set per cluster, one failing Repository.
    let connected = prom
        .query("sum(imgfleet_hub_cluster_connected{job=\"hub\"})")
        .await?;
    ensure!(
        connected.first().map(|s| s.value) == Some(3.0),
        "{connected:?}"
    );
    let per_cluster = prom
        // Without the rules' own ALERTS series, which copy the labels of what they watch.
        .query("count by (cluster) ({job=\"hub\",cluster!=\"\",__name__!~\"ALERTS.*\"})")
        .await?;
    ensure!(per_cluster.len() == 3, "{per_cluster:?}");
    for s in &per_cluster {
        ensure!(
            s.value as usize == SERIES_PER_CLUSTER + 1,
            "cluster {} has {} series at the hub; want {} fixed + 1 failing Repository",
            s.label("cluster"),
            s.value,
            SERIES_PER_CLUSTER
        );
    }
    let storage = prom
        .query("image_storage_usage_percent{job=\"hub\"} >= 0 <= 100")
        .await?;
    ensure!(storage.len() == 3, "{storage:?}");
    let checks = prom
        .query("image_registry_checks_total{job=\"hub\",namespace=\"default\"}")
        .await?;
    ensure!(!checks.is_empty(), "no registry checks counted");
    let queue = prom
        .query("imgfleet_agent_transfer_queue_depth{job=\"agent\"}")
        .await?;
    ensure!(queue.len() == 3, "{queue:?}");

    // The scrape an operator sees, for the record.
    let scrape = reqwest::get(format!("{}/metrics", hub.metrics_url()))
        .await?
        .text()
        .await?;
    println!("--- hub /metrics with 3 agents (image_* and fleet lines) ---");
    for line in scrape
        .lines()
        .filter(|l| l.starts_with("image_") || l.starts_with("imgfleet_hub_cluster"))
    {
        println!("{line}");
    }
    for s in &per_cluster {
        println!("series at the hub for {}: {}", s.label("cluster"), s.value);
    }

    // Every dashboard query runs against the same Prometheus.
    let mut errors = Vec::new();
    let mut empty = Vec::new();
    for (panel, expr) in dashboard_queries()? {
        match prom.query(&expr).await {
            Ok(r) if r.is_empty() => empty.push(format!("{panel}: {expr}")),
            Ok(_) => {}
            Err(e) => errors.push(format!("{panel}: {e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("dashboard queries failed:\n{}", errors.join("\n"));
    }
    println!(
        "dashboard queries with no data in this scenario:\n{}",
        empty.join("\n")
    );
    // The panels about failures and progress have data here.
    for must in [
        "Consecutive sync failures",
        "Images by phase",
        "Storage usage",
    ] {
        ensure!(
            !empty.iter().any(|e| e.starts_with(must)),
            "panel {must} shows nothing though the fleet fails: {empty:?}"
        );
    }
    drop(agents);
    Ok(())
}
