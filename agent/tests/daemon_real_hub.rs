//! The agent binary against the real hub (in process, embedded store, its
//! real session part and tag resolver) and a real registry: enroll, apply a
//! RegistrySecret and a Repository, and watch the hub's status reach SYNCED
//! while skopeo pulls the upstream digest from the agent's mirror; then a
//! policy change (a new tag) reaches the agent and is synced too.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_client::AdminServiceClient;
use imgfleet::model::{ClusterPhase, ImagePhase, Kind, Object, parse_documents};
use imgfleet_common::tls::TlsMaterial;
use imgfleet_hub::config::Config;
use imgfleet_hub::objects::Objects;
use imgfleet_hub::server::{self, RunningHub};
use imgfleet_tests::images::{ImageSpec, push_image};
use imgfleet_tests::process::{ChildGuard, free_port};
use imgfleet_tests::registry::{Registry, RegistryOptions};
use imgfleet_tests::skopeo;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_imgfleet-agent");
const PASSWORD: &str = "pw-real-hub-81d2";

fn policy(domain: &str, tag: &str) -> String {
    format!(
        r#"
apiVersion: image.theriseunion.io/v1alpha1
kind: RegistrySecret
metadata: {{name: lab, namespace: default}}
spec:
  domain: "{domain}"
  username: edge
  password: "{PASSWORD}"
  insecure: true
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata: {{name: app, namespace: default}}
spec:
  repository: demo/app
  tag: "{tag}"
  registryRef: {{name: lab}}
  placement:
    clusterSelector:
      matchLabels: {{tier: edge}}
"#
    )
}

async fn apply(objects: &Objects, yaml: &str) {
    for o in parse_documents(yaml).expect("policy parses") {
        objects.apply(o, false).await.expect("apply");
    }
}

async fn enroll(hub: &RunningHub, name: &str) -> TlsMaterial {
    let admin = TlsMaterial::from_dir(hub.admin_dir.as_ref().expect("admin bundle")).unwrap();
    let ch = admin.connect(&hub.url()).await.expect("admin connects");
    let r = AdminServiceClient::new(ch)
        .enroll_cluster(pb::EnrollClusterRequest {
            name: name.into(),
            labels: HashMap::from([("tier".to_string(), "edge".to_string())]),
            tenants: vec!["default".into()],
            validity_days: 1,
        })
        .await
        .expect("enroll")
        .into_inner();
    TlsMaterial {
        ca_pem: r.ca_pem,
        cert_pem: r.cert_pem,
        key_pem: r.key_pem,
    }
}

/// The cluster's entry for `digest` in Repository default/app, if SYNCED.
async fn synced_on_hub(objects: &Objects, cluster: &str, digest: &str) -> bool {
    let Ok(Object::Repository(r)) = objects.get(Kind::Repository, Some("default"), "app").await
    else {
        return false;
    };
    r.status.is_some_and(|s| {
        s.clusters.iter().any(|c| {
            c.cluster == cluster && c.digest == digest && c.phase == Some(ImagePhase::Synced)
        })
    })
}

async fn poll(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "not {what} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_syncs_what_the_real_hub_places_on_it() {
    imgfleet_tests::process::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(RegistryOptions::plain().with_auth("edge", PASSWORD))
        .await
        .unwrap();
    let v1 = push_image(&reg, "demo/app", "v1", &ImageSpec::random(&[400_000], 51))
        .await
        .unwrap();
    let v2 = push_image(&reg, "demo/app", "v2", &ImageSpec::random(&[300_000], 52))
        .await
        .unwrap();

    let mut cfg = Config::for_data_dir(&dir.path().join("hub"));
    cfg.metrics_listen = None;
    let ext = imgfleet_hub::parts::default_extensions(&cfg);
    let hub = server::start_with(cfg, CancellationToken::new(), ext)
        .await
        .expect("hub starts");
    let objects = hub.context.objects.clone();
    let creds = dir.path().join("creds");
    enroll(&hub, "edge-a").await.write_to_dir(&creds).unwrap();

    let mirror_port = free_port();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--hub")
        .arg(hub.url())
        .arg("--credentials")
        .arg(&creds)
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .arg("--mirror-listen")
        .arg(format!("127.0.0.1:{mirror_port}"))
        .arg("--metrics-listen")
        .arg("off");
    let mut agent = ChildGuard::spawn("daemon-real-hub-agent", cmd).unwrap();

    let applied = Instant::now();
    apply(&objects, &policy(&reg.addr(), "v1")).await;
    let mirror = format!("127.0.0.1:{mirror_port}");
    let to_synced = poll("SYNCED on the hub", Duration::from_secs(60), async || {
        if let Some(s) = agent.try_wait() {
            panic!("agent exited with {s}: {}", agent.log_tail(30));
        }
        synced_on_hub(&objects, "edge-a", &v1.manifest_digest).await
    })
    .await;
    let digest = skopeo::inspect_digest(
        &format!("docker://{mirror}/demo/app:v1"),
        &["--tls-verify=false"],
    )
    .await
    .unwrap();
    assert_eq!(digest, v1.manifest_digest);
    let Ok(Object::Cluster(c)) = objects.get(Kind::Cluster, None, "edge-a").await else {
        panic!("cluster edge-a")
    };
    let st = c.status.expect("cluster status");
    assert_eq!(st.phase, Some(ClusterPhase::Connected));
    assert!(st.applied_generation > 0 && st.applied_generation == st.desired_generation);
    assert!(st.storage_capacity_bytes > 0);

    // A policy change: the Repository follows tag v2.
    let changed = Instant::now();
    apply(&objects, &policy(&reg.addr(), "v2")).await;
    let change_to_synced = poll(
        "v2 SYNCED on the hub",
        Duration::from_secs(60),
        async || synced_on_hub(&objects, "edge-a", &v2.manifest_digest).await,
    )
    .await;
    let digest = skopeo::inspect_digest(
        &format!("docker://{mirror}/demo/app:v2"),
        &["--tls-verify=false"],
    )
    .await
    .unwrap();
    assert_eq!(digest, v2.manifest_digest);
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(!log.contains(PASSWORD), "the agent logs the password");
    eprintln!(
        "figures (real hub): apply -> SYNCED in hub status {to_synced:?} ({:?} since apply); \
         tag change -> v2 SYNCED {change_to_synced:?} ({:?})",
        applied.elapsed(),
        changed.elapsed()
    );
    drop(agent);
    let _ = hub.stop().await;
}
