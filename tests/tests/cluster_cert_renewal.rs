//! Cluster certificates are short-lived and renewed over the session, with
//! real processes: a hub whose `--cluster-cert-lifetime` is 30 s (the
//! shortest it takes, so the test waits about a minute rather than the
//! minutes a longer lifetime would cost) and an enrolled agent. The agent
//! asks for a new certificate after two thirds of each lifetime, with a key
//! it made itself, and keeps one session across three renewals, past the end
//! of its first certificate; the renewed certificate is written back to its
//! credentials directory, so a restarted agent connects with it.

use std::time::Duration;

use anyhow::{Result, ensure};
use imgfleet_tests::fleet::{AgentOptions, AgentProcess, HubOptions, HubProcess};
use imgfleet_tests::wait_until;

const LIFETIME: &str = "30s";
/// Three renewals at 20 s each, with room for a loaded machine.
const THREE_RENEWALS: Duration = Duration::from_secs(150);

async fn metric(agent: &AgentProcess, name: &str) -> Result<f64> {
    Ok(agent.metric(name).await?.unwrap_or(-1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_its_session_across_three_renewals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let hub = HubProcess::start(HubOptions {
        extra_args: vec!["--cluster-cert-lifetime".into(), LIFETIME.into()],
        ..HubOptions::embedded(root.join("hub"))
    })
    .await?;
    let cli = hub.cli();
    let creds = cli
        .enroll(
            "edge-1",
            &[("region", "eu")],
            &["default"],
            &root.join("edge-1"),
        )
        .await?;
    let first_cert = std::fs::read_to_string(creds.join("cert.pem"))?;
    let first_key = std::fs::read_to_string(creds.join("key.pem"))?;
    let mut agent = AgentProcess::start(AgentOptions::new(
        vec![hub.url()],
        &creds,
        root.join("agent"),
    ))
    .await?;
    wait_until("the agent connected", Duration::from_secs(30), || async {
        Ok(metric(&agent, "imgfleet_agent_hub_connected").await? == 1.0)
    })
    .await?;

    let renewals = || async {
        let trail = cli.ok(&["audit", "-A", "-o", "json"]).await?;
        Ok::<usize, anyhow::Error>(
            trail
                .lines()
                .filter(|l| l.contains("\"verb\":\"renew\"") && l.contains("\"code\":200"))
                .count(),
        )
    };
    wait_until("three renewals", THREE_RENEWALS, || async {
        Ok(renewals().await? >= 3)
    })
    .await?;
    // One session throughout: never reconnected, still connected, though
    // the first certificate ended long ago.
    ensure!(
        metric(&agent, "imgfleet_agent_hub_reconnects_total").await? == 0.0,
        "the agent reconnected: {}",
        agent.log_tail(30)
    );
    ensure!(metric(&agent, "imgfleet_agent_hub_connected").await? == 1.0);
    let cert = std::fs::read_to_string(creds.join("cert.pem"))?;
    let key = std::fs::read_to_string(creds.join("key.pem"))?;
    ensure!(
        cert != first_cert && key != first_key,
        "credentials not renewed on disk"
    );
    // The hub never saw the key: it is not in its store.
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let redb = std::fs::read(root.join("hub").join("policy.redb"))?;
    ensure!(
        !redb.windows(body.len()).any(|w| w == body.as_bytes()),
        "the agent's key reached the hub"
    );

    // A restarted agent connects with the renewed certificate from disk.
    agent.restart().await?;
    wait_until(
        "the restarted agent connected",
        Duration::from_secs(30),
        || async { Ok(metric(&agent, "imgfleet_agent_hub_connected").await? == 1.0) },
    )
    .await?;
    Ok(())
}
