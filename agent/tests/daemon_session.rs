//! The agent daemon against a scripted hub over real mTLS and a real registry:
//! Hello with the certificate's name, full set persisted then acked, SYNCED
//! only when the mirror serves it, a failing image retried on its own, deltas,
//! failover past a dead hub URL, SIGKILL and restart with every hub down, and
//! a reconnect that resends nothing and reports the full current state.

mod daemon_support;

use std::time::{Duration, Instant};

use daemon_support::*;
use imgfleet::api::v1 as pb;
use imgfleet_tests::fault::FaultProxy;
use imgfleet_tests::images::{ImageSpec, push_image};
use imgfleet_tests::process::{ChildGuard, free_port, wait_until};
use imgfleet_tests::registry::{Registry, RegistryOptions};
use imgfleet_tests::skopeo;

const PASSWORD: &str = "pw-daemon-6f1c9";
const MIB: u64 = 1024 * 1024;

async fn mirror_digest(mirror: &str, reference: &str) -> anyhow::Result<String> {
    skopeo::inspect_digest(
        &format!("docker://{mirror}/{reference}"),
        &["--tls-verify=false"],
    )
    .await
}

fn synced(hub: &FakeHub, key: &str) -> bool {
    hub.record(|r| {
        r.latest
            .get(key)
            .is_some_and(|p| phase_of(p) == pb::ImagePhase::Synced)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_syncs_from_hub_and_keeps_working_offline() {
    imgfleet_tests::process::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(RegistryOptions::plain().with_auth("edge", PASSWORD))
        .await
        .unwrap();
    let app = push_image(&reg, "demo/app", "v1", &ImageSpec::random(&[300_000], 31))
        .await
        .unwrap();
    let web = push_image(
        &reg,
        "demo/web",
        "v2",
        &ImageSpec::random(&[200_000, 50_000], 32),
    )
    .await
    .unwrap();
    let big = push_image(&reg, "demo/big", "v1", &ImageSpec::random(&[3 * MIB], 33))
        .await
        .unwrap();
    // "big" comes through a proxy that is down until the agent is offline.
    let proxy = FaultProxy::start(reg.addr().parse().unwrap())
        .await
        .unwrap();
    proxy.set_refuse(true);

    let addr = reg.addr();
    let app_img = image(&addr, "app", "demo/app", &app.manifest_digest, "v1");
    let missing_digest = format!("sha256:{}", "0".repeat(64));
    let missing_img = image(&addr, "missing", "demo/app", &missing_digest, "gone");
    let web_img = image(&addr, "web", "demo/web", &web.manifest_digest, "v2");
    let mut big_img = image(
        &proxy.addr().to_string(),
        "big",
        "demo/big",
        &big.manifest_digest,
        "v1",
    );
    big_img.registry_key = "default/proxy".into();
    let mut proxy_cred = credential(&proxy.addr().to_string(), "edge", PASSWORD);
    proxy_cred.key = "default/proxy".into();

    let set1 = pb::DesiredSet {
        generation: 1,
        epoch: "e1".into(),
        images: vec![app_img.clone(), missing_img.clone()],
        registries: vec![credential(&addr, "edge", PASSWORD)],
    };
    let pki = pki(dir.path(), "edge-1");
    let mut hub = FakeHub::start(pki.server.clone(), set1.clone());
    let dead = format!("https://127.0.0.1:{}", free_port());
    let cmd = AgentCmd {
        hubs: vec![dead, hub.url()],
        creds: pki.creds_dir.clone(),
        data: dir.path().join("data"),
        mirror_port: free_port(),
        metrics_port: free_port(),
    };
    let started = Instant::now();
    let mut agent = ChildGuard::spawn("daemon-session-agent", cmd.command()).unwrap();

    // Hello from the certificate's cluster, past the dead first URL.
    agent
        .wait_ready("sends Hello", Duration::from_secs(30), || async {
            Ok(hub.record(|r| !r.hellos.is_empty()))
        })
        .await
        .unwrap();
    let hello = hub.record(|r| r.hellos[0].clone());
    assert_eq!(hello.cluster_name, "edge-1");
    assert_eq!(
        (hello.current_generation, hello.current_epoch.as_str()),
        (0, "")
    );
    assert!(hello.storage.is_some_and(|s| s.capacity_bytes > 0));
    let hello_after = started.elapsed();

    // Ack after the set is on disk.
    agent
        .wait_ready("acks generation 1", Duration::from_secs(10), || async {
            Ok(hub.record(|r| r.acks.iter().any(|a| a.generation == 1)))
        })
        .await
        .unwrap();
    let acked = Instant::now();
    assert!(cmd.data.join("desired.bin").exists());
    let ack = hub.record(|r| r.acks[0].clone());
    assert_eq!((ack.epoch.as_str(), ack.error.as_str()), ("e1", ""));

    let app_key = &app_img.key;
    agent
        .wait_ready("reports app SYNCED", Duration::from_secs(30), || async {
            Ok(synced(&hub, app_key))
        })
        .await
        .unwrap();
    let set_to_synced = acked.elapsed();
    // SYNCED means servable: the mirror answers with the upstream digest.
    assert_eq!(
        mirror_digest(&cmd.mirror(), "demo/app:v1").await.unwrap(),
        app.manifest_digest
    );
    let p = hub.record(|r| r.latest[app_key].clone());
    assert_eq!(p.digest, app.manifest_digest);
    assert!(
        p.bytes_total > 300_000 && p.bytes_done == p.bytes_total,
        "{p:?}"
    );
    assert_eq!(p.layers_done, p.layers_total);

    // The image that cannot be fetched fails on its own, with a retry scheduled.
    agent
        .wait_ready(
            "reports missing FAILED",
            Duration::from_secs(30),
            || async {
                Ok(hub.record(|r| {
                    r.latest
                        .get(&missing_img.key)
                        .is_some_and(|p| phase_of(p) == pb::ImagePhase::Failed)
                }))
            },
        )
        .await
        .unwrap();
    let failed = hub.record(|r| r.latest[&missing_img.key].clone());
    assert!(failed.next_retry_time.is_some(), "{failed:?}");
    assert!(failed.attempts >= 1, "{failed:?}");
    assert!(!failed.message.is_empty(), "{failed:?}");
    // It is retried on its own schedule, and says so.
    agent
        .wait_ready("retries missing", Duration::from_secs(15), || async {
            Ok(hub.record(|r| r.latest[&missing_img.key].attempts >= 2))
        })
        .await
        .unwrap();
    let failed = hub.record(|r| r.latest[&missing_img.key].clone());
    assert_eq!(phase_of(&failed), pb::ImagePhase::Failed);
    assert!(failed.next_retry_time.is_some(), "{failed:?}");

    // A delta adds web and drops the failing image.
    let set2 = pb::DesiredSet {
        generation: 2,
        images: vec![app_img.clone(), web_img.clone()],
        ..set1.clone()
    };
    let delta_sent = Instant::now();
    hub.push_delta(
        pb::DesiredSetDelta {
            from_generation: 1,
            generation: 2,
            epoch: "e1".into(),
            upserts: vec![web_img.clone()],
            removals: vec![missing_img.key.clone()],
            ..Default::default()
        },
        set2.clone(),
    );
    agent
        .wait_ready("reports web SYNCED", Duration::from_secs(30), || async {
            Ok(synced(&hub, &web_img.key))
        })
        .await
        .unwrap();
    let delta_to_synced = delta_sent.elapsed();
    assert!(hub.record(|r| r.acks.iter().any(|a| a.generation == 2)));
    assert_eq!(
        mirror_digest(&cmd.mirror(), "demo/web:v2").await.unwrap(),
        web.manifest_digest
    );

    // A delta adds big, whose registry is unreachable: pending work.
    let set3 = pb::DesiredSet {
        generation: 3,
        images: vec![app_img.clone(), web_img.clone(), big_img.clone()],
        registries: vec![credential(&addr, "edge", PASSWORD), proxy_cred.clone()],
        ..set1.clone()
    };
    hub.push_delta(
        pb::DesiredSetDelta {
            from_generation: 2,
            generation: 3,
            epoch: "e1".into(),
            upserts: vec![big_img.clone()],
            registry_upserts: vec![proxy_cred.clone()],
            ..Default::default()
        },
        set3,
    );
    agent
        .wait_ready("acks generation 3", Duration::from_secs(10), || async {
            Ok(hub.record(|r| r.acks.iter().any(|a| a.generation == 3)))
        })
        .await
        .unwrap();
    assert!(!synced(&hub, &big_img.key));

    // Every hub down, the agent killed and restarted, the registry back.
    hub.stop();
    let log1 = agent.log_path().to_path_buf();
    agent.kill();
    proxy.set_refuse(false);
    let restarted = Instant::now();
    let mut agent = ChildGuard::spawn("daemon-session-agent-restarted", cmd.command()).unwrap();
    let mirror = cmd.mirror();
    agent
        .wait_ready("serves app offline", Duration::from_secs(30), || async {
            Ok(mirror_digest(&mirror, "demo/app:v1").await? == app.manifest_digest)
        })
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let big_url = format!("http://{mirror}/v2/demo/big/manifests/v1");
    agent
        .wait_ready(
            "finishes big from the persisted set, hub down",
            Duration::from_secs(60),
            || async { Ok(http.head(&big_url).send().await?.status() == 200) },
        )
        .await
        .unwrap();
    let offline_finish = restarted.elapsed();
    assert_eq!(
        mirror_digest(&mirror, "demo/big:v1").await.unwrap(),
        big.manifest_digest
    );
    assert_eq!(hub.record(|r| r.hellos.len()), 1, "no hub was up");

    // The hub comes back: the held generation goes in Hello, nothing is
    // resent, and the first progress is the full current state.
    let sent_before = hub.record(|r| r.sent.len());
    hub.restart();
    let back = Instant::now();
    agent
        .wait_ready("reconnects", Duration::from_secs(30), || async {
            Ok(hub.record(|r| {
                r.hellos.len() == 2 && r.progress.iter().any(|(s, _)| *s == r.sessions)
            }))
        })
        .await
        .unwrap();
    let reconnect = back.elapsed();
    let (hello, first, sent_after) = hub.record(|r| {
        let first = r
            .progress
            .iter()
            .find(|(s, _)| *s == r.sessions)
            .map(|(_, p)| p.clone())
            .unwrap();
        (r.hellos[1].clone(), first, r.sent.len())
    });
    assert_eq!(
        (hello.current_generation, hello.current_epoch.as_str()),
        (3, "e1")
    );
    assert_eq!(sent_after, sent_before, "the held generation is current");
    let mut keys: Vec<_> = first
        .images
        .iter()
        .map(|i| (i.key.clone(), phase_of(i)))
        .collect();
    keys.sort();
    let mut want = vec![
        (app_img.key.clone(), pb::ImagePhase::Synced),
        (web_img.key.clone(), pb::ImagePhase::Synced),
        (big_img.key.clone(), pb::ImagePhase::Synced),
    ];
    want.sort();
    assert_eq!(keys, want);
    assert!(first.storage.is_some_and(|s| s.used_bytes > 3 * MIB));

    // Progress is coalesced: at most about two messages a second per session.
    let gaps = hub.record(|r| {
        let mut gaps = Vec::new();
        for i in 1..r.progress.len() {
            if r.progress[i].0 == r.progress[i - 1].0 {
                gaps.push(r.progress_at[i] - r.progress_at[i - 1]);
            }
        }
        gaps
    });
    assert!(!gaps.is_empty());
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(400)),
        "progress messages closer than 400 ms: {gaps:?}"
    );

    // Metrics and health.
    let metrics = http
        .get(format!("http://127.0.0.1:{}/metrics", cmd.metrics_port))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("imgfleet_agent_images_synced 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("imgfleet_agent_desired_generation 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("imgfleet_agent_hub_connected 1"),
        "{metrics}"
    );
    let health = http
        .get(format!("http://127.0.0.1:{}/healthz", cmd.metrics_port))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // SIGTERM: exit 0.
    agent.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("agent exits after SIGTERM", Duration::from_secs(15), || {
        let done = agent.try_wait();
        async move {
            match done {
                Some(s) => {
                    anyhow::ensure!(s.success(), "exit status {s}");
                    Ok(true)
                }
                None => Ok(false),
            }
        }
    })
    .await
    .unwrap();

    for log in [log1, agent.log_path().to_path_buf()] {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("Applied desired set") || text.contains("Starting from"),
            "{}",
            log.display()
        );
        assert!(
            !text.contains(PASSWORD),
            "{} logs the registry password",
            log.display()
        );
    }
    let desired = std::fs::read(cmd.data.join("desired.bin")).unwrap();
    assert!(
        !desired
            .windows(PASSWORD.len())
            .any(|w| w == PASSWORD.as_bytes()),
        "the persisted set is encrypted"
    );
    eprintln!(
        "figures: hello after {hello_after:?} (first URL dead); ack -> app SYNCED {set_to_synced:?}; \
         delta -> web SYNCED {delta_to_synced:?}; restart offline -> big served {offline_finish:?}; \
         hub back -> reconnected with full progress {reconnect:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_images_are_collected_after_the_grace_period() {
    imgfleet_tests::process::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let app = push_image(&reg, "demo/app", "v1", &ImageSpec::random(&[100_000], 41))
        .await
        .unwrap();
    let web = push_image(&reg, "demo/web", "v1", &ImageSpec::random(&[120_000], 42))
        .await
        .unwrap();
    let addr = reg.addr();
    let app_img = image(&addr, "app", "demo/app", &app.manifest_digest, "v1");
    let web_img = image(&addr, "web", "demo/web", &web.manifest_digest, "v1");
    let set1 = pb::DesiredSet {
        generation: 1,
        epoch: "e1".into(),
        images: vec![app_img.clone(), web_img.clone()],
        registries: vec![credential(&addr, "", "")],
    };
    let pki = pki(dir.path(), "edge-gc");
    let hub = FakeHub::start(pki.server.clone(), set1.clone());
    let cmd = AgentCmd {
        hubs: vec![hub.url()],
        creds: pki.creds_dir.clone(),
        data: dir.path().join("data"),
        mirror_port: free_port(),
        metrics_port: free_port(),
    };
    let mut command = cmd.command();
    command.args(["--grace-period", "0s", "--keep-versions", "1"]);
    let mut agent = ChildGuard::spawn("daemon-gc-agent", command).unwrap();
    agent
        .wait_ready("both SYNCED", Duration::from_secs(30), || async {
            Ok(synced(&hub, &app_img.key) && synced(&hub, &web_img.key))
        })
        .await
        .unwrap();
    let web_layer = cmd
        .data
        .join("blobs/sha256")
        .join(&web.layer_digests[0]["sha256:".len()..]);
    assert!(web_layer.exists());
    hub.push_delta(
        pb::DesiredSetDelta {
            from_generation: 1,
            generation: 2,
            epoch: "e1".into(),
            removals: vec![web_img.key.clone()],
            ..Default::default()
        },
        pb::DesiredSet {
            generation: 2,
            images: vec![app_img.clone()],
            ..set1
        },
    );
    let http = reqwest::Client::new();
    let web_url = format!("http://{}/v2/demo/web/manifests/v1", cmd.mirror());
    let removed = Instant::now();
    agent
        .wait_ready("web collected", Duration::from_secs(30), || async {
            Ok(http.head(&web_url).send().await?.status() == 404 && !web_layer.exists())
        })
        .await
        .unwrap();
    eprintln!("figures: removal -> collected {:?}", removed.elapsed());
    assert_eq!(
        mirror_digest(&cmd.mirror(), "demo/app:v1").await.unwrap(),
        app.manifest_digest,
        "what is still desired stays"
    );
    assert!(
        hub.record(|r| !r.latest.is_empty()),
        "progress was reported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_hub_is_left_after_15_seconds() {
    imgfleet_tests::process::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "edge-hb");
    let hub = FakeHub::start(
        pki.server.clone(),
        pb::DesiredSet {
            generation: 1,
            epoch: "e1".into(),
            ..Default::default()
        },
    );
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", hub.port).parse().unwrap())
        .await
        .unwrap();
    let cmd = AgentCmd {
        hubs: vec![format!("https://{}", proxy.addr())],
        creds: pki.creds_dir.clone(),
        data: dir.path().join("data"),
        mirror_port: free_port(),
        metrics_port: free_port(),
    };
    let mut agent = ChildGuard::spawn("daemon-heartbeat-agent", cmd.command()).unwrap();
    agent
        .wait_ready(
            "a heartbeat from the agent",
            Duration::from_secs(20),
            || async { Ok(hub.record(|r| !r.acks.is_empty() && r.heartbeats >= 1)) },
        )
        .await
        .unwrap();
    // The link goes dead without closing: only silence tells.
    proxy.set_stall(true);
    let stalled = Instant::now();
    let log = agent.log_path().to_path_buf();
    agent
        .wait_ready(
            "gives up the silent session",
            Duration::from_secs(30),
            || async { Ok(std::fs::read_to_string(&log)?.contains("nothing heard from the hub")) },
        )
        .await
        .unwrap();
    let silent_after = stalled.elapsed();
    assert!(
        silent_after >= Duration::from_secs(12) && silent_after <= Duration::from_secs(22),
        "{silent_after:?}"
    );
    proxy.set_stall(false);
    proxy.cut();
    agent
        .wait_ready("reconnects", Duration::from_secs(40), || async {
            Ok(hub.record(|r| r.hellos.len() >= 2))
        })
        .await
        .unwrap();
    let hello = hub.record(|r| r.hellos.last().cloned().unwrap());
    assert_eq!(hello.current_generation, 1);
    eprintln!("figures: silent hub left after {silent_after:?}");
}
