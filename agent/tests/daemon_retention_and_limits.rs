//! The agent daemon's edge data plane under a scripted hub and a real
//! registry: each Repository's own retention (keepVersions counts the desired
//! version; grace periods per repository), and the daemon's own files when
//! mirror clients hold every connection it allows.

mod daemon_support;

use std::time::{Duration, Instant};

use daemon_support::*;
use imgfleet::api::v1 as pb;
use imgfleet_tests::images::{ImageSpec, PushedImage, push_image};
use imgfleet_tests::process::ChildGuard;
use imgfleet_tests::registry::{Registry, RegistryOptions};

fn synced(hub: &FakeHub, key: &str) -> bool {
    hub.record(|r| {
        r.latest
            .get(key)
            .is_some_and(|p| phase_of(p) == pb::ImagePhase::Synced)
    })
}

fn blob_file(data: &std::path::Path, digest: &str) -> std::path::PathBuf {
    data.join("blobs/sha256").join(&digest["sha256:".len()..])
}

async fn status(http: &reqwest::Client, url: &str) -> u16 {
    match http.head(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_repository_keeps_its_own_number_of_versions() {
    imgfleet_tests::process::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let push = |repo: &'static str, tag: &'static str, seed: u64| {
        let reg = &reg;
        async move {
            push_image(reg, repo, tag, &ImageSpec::random(&[60_000], seed))
                .await
                .unwrap()
        }
    };
    let (app1, app2) = (
        push("demo/app", "v1", 61).await,
        push("demo/app", "v2", 62).await,
    );
    let (web1, web2) = (
        push("demo/web", "v1", 63).await,
        push("demo/web", "v2", 64).await,
    );
    let addr = reg.addr();
    // app keeps only its desired version, and for one second; web uses the
    // agent's defaults (two versions, an hour).
    let app = |p: &PushedImage, tag| pb::DesiredImage {
        keep_versions: 1,
        grace_period_seconds: 1,
        ..image(&addr, "app", "demo/app", &p.manifest_digest, tag)
    };
    let web = |p: &PushedImage, tag| image(&addr, "web", "demo/web", &p.manifest_digest, tag);
    let set1 = pb::DesiredSet {
        generation: 1,
        epoch: "e1".into(),
        images: vec![app(&app1, "v1"), web(&web1, "v1")],
        registries: vec![credential(&addr, "", "")],
    };
    let (hub, cmd) = hub_and_agent(dir.path(), "edge-retention", set1.clone());
    let mut command = cmd.command();
    command.args(["--grace-period", "1h", "--keep-versions", "2"]);
    let mut agent = ChildGuard::spawn("daemon-retention-agent", command).unwrap();
    let (app1_key, web1_key) = (app(&app1, "v1").key, web(&web1, "v1").key);
    agent
        .wait_ready("v1 of both SYNCED", Duration::from_secs(30), || async {
            Ok(synced(&hub, &app1_key) && synced(&hub, &web1_key))
        })
        .await
        .unwrap();

    // Both repositories move to v2.
    let (app2_img, web2_img) = (app(&app2, "v2"), web(&web2, "v2"));
    hub.push_delta(
        pb::DesiredSetDelta {
            from_generation: 1,
            generation: 2,
            epoch: "e1".into(),
            upserts: vec![app2_img.clone(), web2_img.clone()],
            removals: vec![app1_key.clone(), web1_key.clone()],
            ..Default::default()
        },
        pb::DesiredSet {
            generation: 2,
            images: vec![app2_img.clone(), web2_img.clone()],
            ..set1
        },
    );
    let http = reqwest::Client::new();
    let mirror = cmd.mirror();
    let manifest = |repo: &str, d: &str| format!("http://{mirror}/v2/{repo}/manifests/{d}");
    let app1_layer = blob_file(&cmd.data, &app1.layer_digests[0]);
    let moved = Instant::now();
    agent
        .wait_ready(
            "app v1 collected after its own 1 s grace",
            Duration::from_secs(40),
            || async {
                Ok(synced(&hub, &app2_img.key)
                    && synced(&hub, &web2_img.key)
                    && status(&http, &manifest("demo/app", &app1.manifest_digest)).await == 404
                    && !app1_layer.exists())
            },
        )
        .await
        .unwrap();
    eprintln!(
        "figures: app v1 collected {:?} after the move",
        moved.elapsed()
    );
    // web keeps v1 for rollback (two versions, the desired one included),
    // and app's setting did not leak into it.
    assert_eq!(
        status(&http, &manifest("demo/web", &web1.manifest_digest)).await,
        200,
        "web's older version was collected"
    );
    for d in web1.blob_digests() {
        assert!(blob_file(&cmd.data, &d).exists(), "web v1 blob {d} removed");
    }
    assert_eq!(
        status(&http, &manifest("demo/app", &app2.manifest_digest)).await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_keeps_its_own_files_when_clients_hold_every_connection() {
    imgfleet_tests::process::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let first = push_image(&reg, "demo/app", "v1", &ImageSpec::random(&[50_000], 65))
        .await
        .unwrap();
    let second = push_image(
        &reg,
        "demo/web",
        "v1",
        &ImageSpec::random(&[2_000_000, 30_000], 66),
    )
    .await
    .unwrap();
    let addr = reg.addr();
    let img1 = image(&addr, "app", "demo/app", &first.manifest_digest, "v1");
    let set1 = pb::DesiredSet {
        generation: 1,
        epoch: "e1".into(),
        images: vec![img1.clone()],
        registries: vec![credential(&addr, "", "")],
    };
    let (hub, cmd) = hub_and_agent(dir.path(), "edge-fds", set1.clone());
    // 600 descriptors: room for (600 - 256) / 2 = 172 mirror connections.
    let mut agent = spawn_with_descriptors(&cmd, 600, "daemon-fds-agent");
    agent
        .wait_ready("app SYNCED", Duration::from_secs(30), || async {
            Ok(synced(&hub, &img1.key))
        })
        .await
        .unwrap();

    // 700 clients connect and send nothing: more than the process could
    // hold descriptors for.
    let idle = idle_clients(&cmd.mirror(), 700).await;
    // The daemon still opens its own files: a new image syncs (partials,
    // blobs, desired.bin) and /healthz answers.
    let img2 = image(&addr, "web", "demo/web", &second.manifest_digest, "v1");
    hub.push_delta(
        pb::DesiredSetDelta {
            from_generation: 1,
            generation: 2,
            epoch: "e1".into(),
            upserts: vec![img2.clone()],
            ..Default::default()
        },
        pb::DesiredSet {
            generation: 2,
            images: vec![img1.clone(), img2.clone()],
            ..set1
        },
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let healthz = format!("http://127.0.0.1:{}/healthz", cmd.metrics_port);
    agent
        .wait_ready(
            "web SYNCED and /healthz up with every mirror connection taken",
            Duration::from_secs(40),
            || async {
                let health = http.get(&healthz).send().await.map(|r| r.status().as_u16());
                Ok(synced(&hub, &img2.key) && matches!(health, Ok(200)))
            },
        )
        .await
        .unwrap();
    // A real client is still served: idle connections make room for it.
    let started = Instant::now();
    let r = http
        .get(format!("http://{}/v2/demo/web/manifests/v1", cmd.mirror()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eprintln!(
        "figures: manifest served in {:?} with 700 idle clients",
        started.elapsed()
    );
    // /metrics counts it: never more open than the descriptors allow, and
    // idle ones were closed to make room.
    let metrics = get_text(
        &http,
        &format!("http://127.0.0.1:{}/metrics", cmd.metrics_port),
    )
    .await;
    assert!(
        metric(&metrics, "imgfleet_agent_mirror_connections") <= 172,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "imgfleet_agent_mirror_drained_total") >= 1,
        "{metrics}"
    );
    let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
    assert!(
        !log.contains("Too many open files"),
        "the daemon ran out of descriptors:\n{}",
        agent.log_tail(40)
    );
    drop(idle);
}

/// The agent of `cmd` under `prlimit --nofile=N:N`.
fn spawn_with_descriptors(cmd: &AgentCmd, n: u32, name: &str) -> ChildGuard {
    let prlimit = imgfleet_tests::process::require_binary("prlimit", "util-linux");
    let inner = cmd.command();
    let mut command = std::process::Command::new(prlimit);
    command
        .arg(format!("--nofile={n}:{n}"))
        .arg(inner.get_program())
        .args(inner.get_args())
        .envs(inner.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
    ChildGuard::spawn(name, command).unwrap()
}

/// `n` connections to `addr` that never send anything.
async fn idle_clients(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connecting idle client {}: {e}", idle.len()),
        }
    }
    idle
}

/// The value of one metric in Prometheus text.
fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}
