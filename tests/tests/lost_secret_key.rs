//! Failures that keep data: a hub whose secret key is lost, or a second replica started
//! with a key of its own, refuses to start (exit 64, naming the key setting) instead of
//! minting a new key and shipping agents desired sets it cannot fill. The agent keeps
//! serving what it holds throughout, and the hub comes back once the key is restored.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use anyhow::{Context, Result};
use imgfleet_tests::fleet::{HubOptions, HubProcess, wait_repository_synced};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::{Etcd, Registry, RegistryOptions, policy, wait_until};

const CONVERGE: Duration = Duration::from_secs(60);
const REFUSE_WITHIN: Duration = Duration::from_secs(30);

fn policy_yaml(domain: &str) -> String {
    policy::objects(&[
        policy::registry_secret("harbor-prod", domain, Some(("admin", "Harbor12345"))),
        policy::repository(
            "app",
            "library/app",
            "v1",
            "harbor-prod",
            "  syncInterval: 10s\n",
        ),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_key_stops_the_hub_and_the_agent_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let registry =
        Registry::start(RegistryOptions::plain().with_auth("admin", "Harbor12345")).await?;
    let image = PushTarget::from(&registry)
        .push_image("library/app", "v1", &ImageSpec::random(&[128 << 10], 31))
        .await?;
    let mut hub = HubProcess::start(HubOptions::embedded(root.join("hub"))).await?;
    let cli = hub.cli();
    let agent = hub.start_agent("edge-1", &["default"], root).await?;
    cli.apply_yaml(&policy_yaml(&registry.addr())).await?;
    wait_repository_synced(&cli, "default", "app", 1, CONVERGE).await?;

    // The key is lost. The hub refuses to start, names the setting, and creates no new key.
    let key = hub.data_dir().join("secret.key");
    let saved = std::fs::read(&key).context("read the key file")?;
    std::fs::remove_file(&key)?;
    let (status, log) = hub.restart_expecting_exit(REFUSE_WITHIN).await?;
    assert_eq!(
        status.code(),
        Some(64),
        "exit 64 (bad configuration): {log}"
    );
    assert!(
        log.contains("--secret-key-file") && log.contains("key file is missing"),
        "the error names the key setting: {log}"
    );
    assert!(!key.exists(), "no new key was created over sealed data");
    assert!(
        !log.contains("Harbor12345"),
        "the password never appears in the log"
    );

    // The agent keeps serving everything while the hub is down: as it is, and again after
    // it has tried the hub twice more and failed.
    let serves = || async {
        assert_eq!(agent.manifest_status("library/app", "v1").await?, 200);
        assert_eq!(
            agent
                .manifest_status("library/app", &image.manifest_digest)
                .await?,
            200
        );
        anyhow::Ok(())
    };
    serves().await?;
    let reconnects = || async {
        let value = agent.metric("imgfleet_agent_hub_reconnects_total").await?;
        value.context("the agent reports no imgfleet_agent_hub_reconnects_total")
    };
    let tried = reconnects().await?;
    wait_until(
        "the agent failing to reach the hub twice more",
        CONVERGE,
        || async {
            Ok(reconnects().await? >= tried + 2.0
                && agent.metric("imgfleet_agent_hub_connected").await? == Some(0.0))
        },
    )
    .await?;
    serves().await?;

    // A wrong key (another hub's) is refused the same way, naming the key check.
    std::fs::write(
        &key,
        b"k1:0000000000000000000000000000000000000000000000000000000000000000\n",
    )?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let (status, log) = hub.restart_expecting_exit(REFUSE_WITHIN).await?;
    assert_eq!(status.code(), Some(64), "exit 64: {log}");
    assert!(
        log.contains("cannot open the policy store's key check"),
        "{log}"
    );

    // Restored, the hub starts and the cluster is still synced, its content untouched.
    std::fs::write(&key, &saved)?;
    hub.restart().await?;
    wait_repository_synced(&cli, "default", "app", 1, CONVERGE).await?;
    assert_eq!(agent.manifest_status("library/app", "v1").await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_its_own_key_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let etcd = Etcd::start().await?;
    let hub_a = HubProcess::start(HubOptions::etcd(&etcd.endpoint(), root.join("hub-a"))).await?;
    // The first replica sealed the key check even before any password is stored.
    let (status, log) = HubProcess::start_expecting_exit(
        HubOptions {
            replica_of: Some(root.join("hub-a")),
            share_secret_key: false,
            ..HubOptions::etcd(&etcd.endpoint(), root.join("hub-b"))
        },
        REFUSE_WITHIN,
    )
    .await?;
    assert_eq!(status.code(), Some(64), "exit 64: {log}");
    assert!(
        status.signal().is_none() && log.contains("--secret-key-file"),
        "{log}"
    );
    assert!(
        log.contains("every hub replica must use the same key file"),
        "the error says how replicas share a key: {log}"
    );
    // The first replica is unaffected.
    wait_until("the first replica still answering", CONVERGE, || async {
        Ok(hub_a.cli().run(&["get", "rs"]).await?.success())
    })
    .await?;
    // With the key shared, a replica starts.
    let _hub_c = HubProcess::start(HubOptions {
        replica_of: Some(root.join("hub-a")),
        ..HubOptions::etcd(&etcd.endpoint(), root.join("hub-c"))
    })
    .await?;
    Ok(())
}
