//! Agents report what their store holds, and the hub keeps it in the
//! Cluster's status (real registry, hub and agent): `app:1` syncs, the tag
//! moves to a new image, the new digest syncs, and the Cluster read through
//! `imgfleet get cluster edge-1 -o yaml` lists BOTH digests under the
//! (registry, repository): the old one is no longer desired but the
//! Repository's `retention.keepVersions: 2` keeps it on the cluster. This is
//! what `rollout history` reads to say which clusters still hold a revision.

use std::time::Duration;

use anyhow::{Context, Result};
use imgfleet_tests::fleet::{Cli, HubOptions, HubProcess};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::{Registry, RegistryOptions, policy, wait_until};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(90);

/// `(resolved digest, syncedClusters)` of Repository `app`.
async fn resolved(cli: &Cli) -> Result<(String, u64)> {
    let v = cli.get_json(&["repository", "app"]).await?;
    let st = &v["status"];
    Ok((
        st["resolved"][0]["digest"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        st["syncedClusters"].as_u64().unwrap_or(0),
    ))
}

/// Cluster `edge-1` as `imgfleet get cluster edge-1 -o yaml` prints it.
async fn cluster_yaml(cli: &Cli) -> Result<Value> {
    let text = cli.ok(&["get", "cluster", "edge-1", "-o", "yaml"]).await?;
    serde_saphyr::from_str(&text).with_context(|| format!("not YAML: {text}"))
}

/// The digests `status.held` lists for (`registry`, `repository`).
fn held_digests(cluster: &Value, registry: &str, repository: &str) -> Vec<String> {
    cluster["status"]["held"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["registry"] == registry && h["repository"] == repository)
        .flat_map(|h| h["digests"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_status_lists_every_digest_its_agent_still_holds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let registry = Registry::start(RegistryOptions::plain()).await?;
    let push = PushTarget::from(&registry);
    let first = push
        .push_image("library/app", "1", &ImageSpec::random(&[60 << 10], 151))
        .await?;
    let hub = HubProcess::start(HubOptions::embedded(root.join("hub"))).await?;
    let cli = hub.cli();
    let _agent = hub.start_agent("edge-1", &["default"], root).await?;
    cli.apply_yaml(&policy::objects(&[
        policy::registry_secret("upstream", &registry.addr(), None),
        policy::repository(
            "app",
            "library/app",
            "1",
            "upstream",
            "  syncInterval: 10s\n  retention: {keepVersions: 2}\n",
        ),
    ]))
    .await?;

    wait_until("app:1 synced at the first digest", CONVERGE, || async {
        let (digest, synced) = resolved(&cli).await?;
        Ok(digest == first.manifest_digest && synced == 1)
    })
    .await?;
    wait_until("the cluster holding the first digest", CONVERGE, || async {
        let c = cluster_yaml(&cli).await?;
        Ok(held_digests(&c, &registry.addr(), "library/app") == [first.manifest_digest.clone()])
    })
    .await?;

    // The tag moves: a new image under the same tag.
    let second = push
        .push_image("library/app", "1", &ImageSpec::random(&[60 << 10], 152))
        .await?;
    assert_ne!(first.manifest_digest, second.manifest_digest);
    wait_until("app:1 synced at the new digest", CONVERGE, || async {
        let (digest, synced) = resolved(&cli).await?;
        Ok(digest == second.manifest_digest && synced == 1)
    })
    .await?;

    let mut both = vec![
        first.manifest_digest.clone(),
        second.manifest_digest.clone(),
    ];
    both.sort();
    let listed = wait_until("the cluster holding both digests", CONVERGE, || async {
        let c = cluster_yaml(&cli).await?;
        Ok(held_digests(&c, &registry.addr(), "library/app") == both)
    })
    .await;
    let c = cluster_yaml(&cli).await?;
    listed.with_context(|| format!("status of edge-1: {:#}", c["status"]))?;
    assert_eq!(
        c["status"]["held"].as_array().map(Vec::len),
        Some(1),
        "one repository held: {:#}",
        c["status"]
    );
    assert!(
        c["status"]["heldTruncated"].is_null(),
        "nothing left out: {:#}",
        c["status"]
    );

    // describe shows it too, short.
    let text = cli.ok(&["describe", "cluster", "edge-1"]).await?;
    let row = format!("{}/library/app", registry.addr());
    let short = |d: &str| d[..7 + 12].to_owned();
    assert!(
        text.lines().any(|l| l.contains(&row)
            && l.contains(&short(&first.manifest_digest))
            && l.contains(&short(&second.manifest_digest))),
        "{text}"
    );
    Ok(())
}
