//! A cluster's certificates can be revoked, with real processes (a hub on the
//! embedded store and one on etcd, an enrolled agent): after `imgfleet cluster
//! revoke` the live agent's session ends at once and the agent says why, its
//! old certificate is refused when it reconnects, and a certificate from
//! `cluster enroll --reissue` connects with the cluster's labels kept.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use imgfleet_tests::fleet::{AgentOptions, AgentProcess, HubOptions, HubProcess};
use imgfleet_tests::{Etcd, wait_until};

/// Generous for a loaded machine; the measured time is printed.
const DISCONNECT_WITHIN: Duration = Duration::from_secs(5);
const CONNECT_WITHIN: Duration = Duration::from_secs(30);

async fn connected(agent: &AgentProcess) -> Result<bool> {
    Ok(agent.metric("imgfleet_agent_hub_connected").await? == Some(1.0))
}

async fn scenario(hub: HubProcess, root: &std::path::Path) -> Result<()> {
    let cli = hub.cli();
    let creds = cli
        .enroll(
            "edge-1",
            &[("region", "eu")],
            &["default"],
            &root.join("edge-1"),
        )
        .await?;
    let mut agent = AgentProcess::start(AgentOptions {
        extra_args: vec!["--mirror-auth".into(), "token".into()],
        ..AgentOptions::new(vec![hub.url()], &creds, root.join("agent"))
    })
    .await?;
    wait_until("the agent connected", CONNECT_WITHIN, || async {
        connected(&agent).await
    })
    .await?;
    let token_file = root.join("default.token");
    let token_text = token_file.to_string_lossy().into_owned();
    cli.ok(&[
        "cluster",
        "pull-token",
        "edge-1",
        "--namespace",
        "default",
        "--out",
        &token_text,
    ])
    .await?;
    let bearer = format!("Bearer {}", std::fs::read_to_string(&token_file)?.trim());
    let http = reqwest::Client::builder().no_proxy().build()?;
    let base = format!("http://{}/v2/", agent.mirror_addr());
    let with_token = || http.get(&base).header("Authorization", &bearer).send();
    ensure!(
        with_token().await?.status().as_u16() == 200,
        "the token works"
    );

    cli.ok(&["cluster", "revoke", "edge-1"]).await?;
    let revoked_at = Instant::now();
    wait_until(
        "the revoked agent disconnected",
        DISCONNECT_WITHIN,
        || async { Ok(!connected(&agent).await?) },
    )
    .await?;
    println!(
        "revocation to disconnect: {} ms",
        revoked_at.elapsed().as_millis()
    );
    let log = std::fs::read_to_string(agent.log_path())?;
    ensure!(
        log.contains("revoked") && log.contains("--reissue"),
        "the agent says it was revoked and what to do: {}",
        agent.log_tail(20)
    );
    // Revoking the cluster invalidates its tokens; the mirror still answers.
    ensure!(
        with_token().await?.status().as_u16() == 401,
        "a token of the revoked cluster still reads"
    );

    // The old certificate is refused when it connects again.
    agent.restart().await?;
    wait_until("the old certificate refused again", CONNECT_WITHIN, || {
        let path = agent.log_path().to_owned();
        async move {
            let log = std::fs::read_to_string(path)?;
            Ok(log.matches("refuses this agent's certificate").count() >= 2)
        }
    })
    .await?;
    ensure!(!connected(&agent).await?, "a revoked certificate connected");
    agent.kill();

    // A reissued certificate connects; the labels and tenants are kept.
    let fresh = cli.reissue("edge-1", &root.join("edge-1-new")).await?;
    let cluster = cli.get_json(&["cluster", "edge-1"]).await?;
    ensure!(
        cluster["metadata"]["labels"]["region"] == "eu"
            && cluster["spec"]["tenants"][0] == "default",
        "{cluster}"
    );
    let agent = AgentProcess::start(AgentOptions::new(
        vec![hub.url()],
        &fresh,
        root.join("agent"),
    ))
    .await?;
    wait_until("the reissued agent connected", CONNECT_WITHIN, || async {
        connected(&agent).await
    })
    .await?;

    // The refused connection is in the audit trail.
    let trail = cli.ok(&["audit", "-A", "-o", "json"]).await?;
    ensure!(
        trail.contains("\"verb\":\"connect\"") && trail.contains("cluster:edge-1"),
        "{trail}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_on_the_embedded_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = HubProcess::start(HubOptions::embedded(dir.path().join("hub"))).await?;
    scenario(hub, dir.path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_on_etcd() -> Result<()> {
    let etcd = Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    let hub = HubProcess::start(HubOptions::etcd(&etcd.endpoint(), dir.path().join("hub"))).await?;
    scenario(hub, dir.path()).await
}
