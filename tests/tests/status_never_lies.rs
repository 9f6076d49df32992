//! The status never says Synced for content a cluster does not hold. A tag is synced to one
//! cluster; its agent is frozen (SIGSTOP); a new image is pushed to the same tag upstream.
//! The hub resolves the new digest, and from then on `get repositories` shows the new digest
//! with `SYNCED 0/1`, `describe` shows the cluster holding the old digest next to the one
//! wanted, and `watch --until-synced` does not end, until the agent resumes (SIGCONT) and
//! reports the new digest servable: then `1/1`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use imgfleet_tests::fleet::{Cli, CliOutput, HubOptions, HubProcess};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::{Registry, RegistryOptions, policy, skopeo, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(90);

fn policy_yaml(domain: &str) -> String {
    policy::objects(&[
        policy::registry_secret("upstream", domain, None),
        policy::repository(
            "app",
            "library/app",
            "v1",
            "upstream",
            "  syncInterval: 10s\n",
        ),
    ])
}

/// `(resolved digest, syncedClusters, targetClusters)` of Repository `app`.
async fn state(cli: &Cli) -> Result<(String, u64, u64, Value)> {
    let v = cli.get_json(&["repository", "app"]).await?;
    let st = &v["status"];
    Ok((
        st["resolved"][0]["digest"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        st["syncedClusters"].as_u64().unwrap_or(0),
        st["targetClusters"].as_u64().unwrap_or(0),
        v,
    ))
}

/// The row of `app` in `get repositories`.
async fn table_row(cli: &Cli) -> Result<String> {
    let table = cli.ok(&["get", "repositories"]).await?;
    table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("app"))
        .map(str::to_owned)
        .with_context(|| format!("no row for app in:\n{table}"))
}

/// `imgfleet watch repository app --until-synced --timeout TIMEOUT`.
async fn watch_until_synced(cli: &Cli, timeout: &str) -> Result<CliOutput> {
    cli.run(&[
        "watch",
        "repository",
        "app",
        "--until-synced",
        "--timeout",
        timeout,
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_is_not_synced_until_the_cluster_holds_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let registry = Registry::start(RegistryOptions::plain()).await?;
    let push = PushTarget::from(&registry);
    let first = push
        .push_image("library/app", "v1", &ImageSpec::random(&[200 << 10], 21))
        .await?;
    let hub = HubProcess::start(HubOptions::embedded(root.join("hub"))).await?;
    let cli = hub.cli();
    let agent = hub.start_agent("edge-1", &["default"], root).await?;
    cli.apply_yaml(&policy_yaml(&registry.addr())).await?;

    // Step 1: the first image synced, as the status says.
    wait_until("app synced 1/1 at the first digest", CONVERGE, || async {
        let (digest, synced, target, _) = state(&cli).await?;
        Ok(digest == first.manifest_digest && synced == 1 && target == 1)
    })
    .await?;

    // Step 2: the agent freezes; the tag moves upstream; the hub resolves the new digest.
    agent.signal(Signal::SIGSTOP)?;
    let second = push
        .push_image("library/app", "v1", &ImageSpec::random(&[200 << 10], 22))
        .await?;
    assert_ne!(first.manifest_digest, second.manifest_digest);
    wait_until("the hub resolving the moved tag", CONVERGE, || async {
        let (digest, _, _, _) = state(&cli).await?;
        Ok(digest == second.manifest_digest)
    })
    .await?;

    // Step 3: from the first read that shows the new digest, and for as long as the agent
    // is frozen, no read may claim the cluster holds it.
    let frozen_until = Instant::now() + Duration::from_secs(8);
    let mut reads = 0;
    while Instant::now() < frozen_until {
        let (digest, synced, target, v) = state(&cli).await?;
        if digest == second.manifest_digest && synced != 0 {
            bail!(
                "the status claims {synced}/{target} synced at the new digest while the only cluster is frozen: {v}"
            );
        }
        let row = table_row(&cli).await?;
        if row.contains(&second.manifest_digest) && !row.contains(" 0/1 ") {
            bail!("get repositories claims the frozen cluster holds the new digest: {row}");
        }
        reads += 1;
    }
    assert!(reads > 3, "the status was read while frozen");
    let short = |d: &str| d[..7 + 12].to_owned();
    wait_until(
        "describe showing the old digest held next to the new one wanted",
        CONVERGE,
        || async {
            let text = cli.ok(&["describe", "repository", "app"]).await?;
            let row = text
                .lines()
                .find(|l| l.trim_start().starts_with("edge-1"))
                .unwrap_or_default()
                .to_owned();
            Ok(row.contains(&format!(
                "{}   {}",
                short(&second.manifest_digest),
                short(&first.manifest_digest)
            )) && text.contains("Clusters (0/1 synced)"))
        },
    )
    .await?;
    let watched = watch_until_synced(&cli, "3s").await?;
    assert!(
        !watched.success(),
        "watch --until-synced ended successfully while the cluster lacks the new digest:\n{}\n{}",
        watched.stdout,
        watched.stderr
    );

    // Step 4: the agent resumes and syncs the new digest; only then 1/1.
    agent.signal(Signal::SIGCONT)?;
    wait_until("app synced 1/1 at the new digest", CONVERGE, || async {
        let (digest, synced, target, _) = state(&cli).await?;
        Ok(digest == second.manifest_digest && synced == 1 && target == 1)
    })
    .await?;
    let served =
        skopeo::inspect_digest(&agent.docker_ref("library/app:v1"), &["--tls-verify=false"])
            .await?;
    assert_eq!(served, second.manifest_digest);
    let watched = watch_until_synced(&cli, "30s").await?;
    assert!(watched.success(), "{}", watched.stderr);
    Ok(())
}
