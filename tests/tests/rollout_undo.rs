//! Rollout history and undo, end to end (real registry, hub, 3 agents):
//! after two tag moves `imgfleet rollout history` shows three revisions and
//! which clusters still hold each; `imgfleet rollout undo --to-revision 1`
//! with the upstream registry stopped makes all three mirrors serve the
//! first digest again, with no byte received by any agent; while pinned, a
//! tag move upstream is recorded but not shipped, and `rollout resume`
//! ships it. The undo and the resume are in the audit trail, by user.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use imgfleet_tests::fleet::{self, AgentProcess, Cli, HubOptions, HubProcess, bytes_received};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::{Registry, RegistryOptions, policy, wait_until};

const CONVERGE: Duration = Duration::from_secs(90);
const REPO: &str = "demo/app";
const TAG: &str = "1";

async fn all_serve(agents: &[AgentProcess], digest: &str) -> Result<bool> {
    fleet::all_serve(agents, REPO, TAG, digest).await
}

async fn wait_all_serve(agents: &[AgentProcess], digest: &str) -> Result<()> {
    fleet::wait_all_serve(agents, REPO, TAG, digest, CONVERGE).await
}

/// The rows of `rollout history --wide`: the lines that start with a
/// revision number.
async fn history_rows(cli: &Cli) -> Result<Vec<String>> {
    let text = cli
        .ok(&["rollout", "history", "repository", "app", "--wide"])
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_owned)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_with_the_upstream_down_serves_the_first_digest_on_every_cluster() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let mut registry = Registry::start(RegistryOptions::plain()).await?;
    let target = PushTarget::from(&registry);
    let push = |seed: u64| {
        let target = target.clone();
        async move {
            target
                .push_image(REPO, TAG, &ImageSpec::random(&[300_000, 40_000], seed))
                .await
                .map(|p| p.manifest_digest)
        }
    };
    let v1 = push(91).await?;

    let hub = HubProcess::start(HubOptions::embedded(root.join("hub"))).await?;
    let cli = hub.cli();
    cli.apply_yaml(&policy::objects(&[
        policy::registry_secret("lab", &registry.addr(), None),
        policy::repository(
            "app",
            REPO,
            TAG,
            "lab",
            "  syncInterval: 10s\n  retention:\n    keepVersions: 3\n",
        ),
    ]))
    .await?;
    let mut agents = Vec::new();
    for name in ["edge-1", "edge-2", "edge-3"] {
        agents.push(hub.start_agent(name, &["default"], root).await?);
    }
    wait_all_serve(&agents, &v1).await?;

    // Two tag moves, each found by the resolver within its syncInterval.
    let v2 = push(92).await?;
    wait_all_serve(&agents, &v2).await?;
    let v3 = push(93).await?;
    wait_all_serve(&agents, &v3).await?;

    let rows = history_rows(&cli).await?;
    ensure!(
        rows.len() == 3,
        "three revisions after two tag moves: {rows:#?}"
    );
    for (row, (n, digest, cause)) in rows.iter().zip([
        ("1", &v1, "Created"),
        ("2", &v2, "TagMove"),
        ("3", &v3, "TagMove"),
    ]) {
        ensure!(
            row.starts_with(n) && row.contains(digest.as_str()) && row.contains(cause),
            "revision {n} is {digest} by {cause}: {row}"
        );
    }
    ensure!(rows[2].contains("shipping"), "revision 3 ships: {rows:#?}");
    // Every cluster reports holding all three versions (keepVersions: 3).
    wait_until(
        "rollout history showing all 3 clusters holding revision 1",
        CONVERGE,
        || async {
            let rows = history_rows(&cli).await?;
            Ok(rows
                .first()
                .is_some_and(|r| r.contains("edge-1,edge-2,edge-3")))
        },
    )
    .await?;

    // The upstream goes away; the undo is served from what the edge holds.
    let before = bytes_received(&agents).await?;
    registry.kill();
    let started = Instant::now();
    let said = cli
        .ok(&["rollout", "undo", "repository", "app", "--to-revision", "1"])
        .await?;
    ensure!(
        said.contains("rolled back to revision 1 (now revision 4)"),
        "undo says what it did: {said}"
    );
    wait_until(
        "all 3 mirrors serving the first digest after the undo",
        CONVERGE,
        || all_serve(&agents, &v1),
    )
    .await?;
    let elapsed = started.elapsed();
    println!(
        "rollout undo to all 3 mirrors serving the first digest, upstream down: {} ms",
        elapsed.as_millis()
    );
    let after = bytes_received(&agents).await?;
    ensure!(
        after == before,
        "no byte received for the undo: {before} before, {after} after"
    );

    let rows = history_rows(&cli).await?;
    ensure!(rows.len() == 4, "the rollback is revision 4: {rows:#?}");
    ensure!(
        rows[3].contains("Rollback to 1")
            && rows[3].contains(&v1)
            && rows[3].contains("shipping (pinned)"),
        "revision 4 restores revision 1 and is pinned: {}",
        rows[3]
    );

    // While pinned, a tag move is recorded and held back, not shipped.
    registry.restart().await?;
    let v4 = push(94).await?;
    wait_until(
        "the tag move made while pinned recorded as held back",
        CONVERGE,
        || async {
            let rows = history_rows(&cli).await?;
            Ok(rows.len() == 5 && rows[4].contains(&v4) && rows[4].contains("held back"))
        },
    )
    .await?;
    ensure!(
        all_serve(&agents, &v1).await?,
        "a pinned Repository keeps serving the pinned digest"
    );

    let said = cli.ok(&["rollout", "resume", "repository", "app"]).await?;
    ensure!(
        said.contains("revision 5"),
        "resume ships revision 5: {said}"
    );
    wait_all_serve(&agents, &v4).await?;

    let audit = cli.ok(&["audit", "-n", "default"]).await?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("rollback") && l.contains("app")),
        "the undo is in the audit trail: {audit}"
    );
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("resume") && l.contains("app")),
        "the resume is in the audit trail: {audit}"
    );
    Ok(())
}
