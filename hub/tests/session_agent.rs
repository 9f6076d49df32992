//! The hub side of the agent session over real mTLS, in process on
//! 127.0.0.1:0, with the embedded store and with a real etcd: identity checks,
//! full sets and deltas, credentials only for the cluster's own registries,
//! acks, progress into Repository/Cluster status, offline detection, and two
//! hub replicas on one etcd. A gRPC client in the test plays the agent.
//!
//! The tag resolver does not run in these hubs: the tests write
//! `status.resolved` themselves, so what they measure is the session path
//! alone (the resolver has its own tests).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_client::AdminServiceClient;
use imgfleet::api::v1::agent_message::Msg as AgentMsg;
use imgfleet::api::v1::agent_service_client::AgentServiceClient;
use imgfleet::api::v1::hub_message::Msg as HubMsg;
use imgfleet::model::{self, ClusterPhase, ImagePhase, Kind, Object, parse_documents};
use imgfleet_common::tls::TlsMaterial;
use imgfleet_hub::config::{Config, SecretKeySource, StoreConfig};
use imgfleet_hub::objects::Objects;
use imgfleet_hub::server::{self, Parts, RunningHub};
use imgfleet_tests::Etcd;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const PASSWORD: &str = "s3cret-registry-pw";
const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const DIGEST2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

const POLICY: &str = r#"
apiVersion: image.theriseunion.io/v1alpha1
kind: RegistrySecret
metadata: {name: upstream, namespace: default}
spec:
  domain: "127.0.0.1:5999"
  username: puller
  password: "s3cret-registry-pw"
  insecure: true
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata: {name: app, namespace: default}
spec:
  repository: library/app
  tag: v1
  registryRef: {name: upstream}
  placement:
    clusterSelector:
      matchLabels: {tier: edge}
"#;

fn config(dir: &Path, etcd: Option<&Etcd>, prefix: &str) -> Config {
    let mut cfg = Config::for_data_dir(dir);
    cfg.offline_after = Duration::from_secs(2);
    cfg.metrics_listen = None;
    cfg.secret_key = SecretKeySource::Raw(zeroize::Zeroizing::new(vec![7u8; 32]));
    if let Some(e) = etcd {
        cfg.store = StoreConfig::Etcd {
            endpoints: vec![e.endpoint()],
            prefix: prefix.into(),
        };
    }
    cfg
}

/// A hub with the session part only (no tag resolver; see the module doc).
async fn start_hub(cfg: Config) -> RunningHub {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let parts = Parts {
        agent_api: true,
        resolver: false,
    };
    server::start_with(cfg, CancellationToken::new(), parts)
        .await
        .expect("hub starts")
}

fn admin_material(hub: &RunningHub) -> TlsMaterial {
    TlsMaterial::from_dir(hub.admin_dir.as_ref().expect("admin bundle"))
        .expect("admin bundle loads")
}

async fn enroll(hub: &RunningHub, name: &str, tier: &str) -> TlsMaterial {
    let ch = admin_material(hub)
        .connect(&hub.url())
        .await
        .expect("connect");
    let r = AdminServiceClient::new(ch)
        .enroll_cluster(pb::EnrollClusterRequest {
            name: name.into(),
            labels: HashMap::from([("tier".to_string(), tier.to_string())]),
            tenants: vec!["default".into()],
            validity_days: 1,
            ..Default::default()
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

async fn apply_yaml(objects: &Objects, yaml: &str) {
    for o in parse_documents(yaml).expect("policy parses") {
        objects.apply(o, false).await.expect("apply");
    }
}

/// Plays the tag resolver: sets `status.resolved` of Repository default/app.
async fn set_resolved(objects: &Objects, digests: &[(&str, &str)]) {
    let resolved: Vec<model::ResolvedTag> = digests
        .iter()
        .map(|&(tag, digest)| model::ResolvedTag {
            tag: tag.into(),
            digest: digest.into(),
            ..Default::default()
        })
        .collect();
    let wrote = objects
        .update_status(Kind::Repository, Some("default"), "app", |obj| {
            let Object::Repository(r) = obj else {
                return false;
            };
            r.status.get_or_insert_with(Default::default).resolved = resolved.clone();
            true
        })
        .await
        .expect("write status.resolved");
    assert!(wrote);
}

async fn set_label(objects: &Objects, cluster: &str, tier: &str) {
    let obj = objects
        .get(Kind::Cluster, None, cluster)
        .await
        .expect("get cluster");
    let Object::Cluster(mut c) = obj else {
        panic!("kind")
    };
    c.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("tier".into(), tier.into());
    c.metadata.resource_version = None;
    objects
        .apply(Object::Cluster(c), false)
        .await
        .expect("apply cluster");
}

struct Agent {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: tonic::Streaming<pb::HubMessage>,
    /// Sends heartbeats every 500 ms, so that the 2 s --offline-after of
    /// these tests sees only the silences a test makes on purpose.
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

fn hello(cluster: &str, epoch: &str, generation: u64) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(AgentMsg::Hello(pb::Hello {
            cluster_name: cluster.into(),
            agent_version: "test-agent 0.1".into(),
            current_generation: generation,
            current_epoch: epoch.into(),
            storage: Some(pb::StorageReport {
                used_bytes: 1000,
                capacity_bytes: 100_000,
            }),
        })),
    }
}

async fn connect(
    url: &str,
    m: &TlsMaterial,
    first: pb::AgentMessage,
) -> Result<Agent, tonic::Status> {
    let ch = m.connect(url).await.expect("tls connect");
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.expect("queue hello");
    let rx = AgentServiceClient::new(ch)
        .connect(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let beat = tx.clone();
    let keepalive = tokio::spawn(async move {
        // The agent's heartbeat, every half second.
        let mut beat_every = tokio::time::interval(Duration::from_millis(500));
        beat_every.tick().await;
        for seq in 1.. {
            beat_every.tick().await;
            let m = pb::AgentMessage {
                msg: Some(AgentMsg::Heartbeat(pb::Heartbeat { sent_at: None, seq })),
            };
            if beat.send(m).await.is_err() {
                return;
            }
        }
    });
    Ok(Agent { tx, rx, keepalive })
}

impl Agent {
    /// The next desired set or delta, skipping heartbeats; None on timeout.
    async fn next_change(&mut self, limit: Duration) -> Option<HubMsg> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let m = tokio::time::timeout_at(deadline, self.rx.message())
                .await
                .ok()?;
            match m.expect("stream ok").expect("stream open").msg {
                Some(HubMsg::Heartbeat(_)) | None => continue,
                Some(other) => return Some(other),
            }
        }
    }

    async fn send(&self, msg: AgentMsg) {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .expect("send");
    }
}

fn full(m: Option<HubMsg>) -> pb::DesiredSet {
    match m {
        Some(HubMsg::DesiredSet(s)) => s,
        other => panic!("expected a full desired set, got {other:?}"),
    }
}

async fn poll<T>(limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn cluster_status(objects: &Objects, name: &str) -> model::ClusterStatus {
    match objects.get(Kind::Cluster, None, name).await.expect("get") {
        Object::Cluster(c) => c.status.unwrap_or_default(),
        _ => panic!("kind"),
    }
}

async fn repo_status(objects: &Objects) -> model::RepositoryStatus {
    match objects
        .get(Kind::Repository, Some("default"), "app")
        .await
        .expect("get")
    {
        Object::Repository(r) => r.status.unwrap_or_default(),
        _ => panic!("kind"),
    }
}

async fn stored_images(objects: &Objects, cluster: &str) -> usize {
    let key = imgfleet_hub::desired::desired_key(cluster);
    match objects.store().get(&key).await.expect("store get") {
        Some(v) => imgfleet_hub::desired::decode(cluster, &v.value)
            .expect("decode")
            .content
            .images
            .len(),
        None => 0,
    }
}

/// A hub with three enrolled clusters (a: edge, b and c: core) and the
/// policy placing `app` on edge clusters, resolved to [`DIGEST`].
struct Fleet {
    hub: RunningHub,
    objects: Objects,
    url: String,
    a_cert: TlsMaterial,
    b_cert: TlsMaterial,
    c_cert: TlsMaterial,
    /// Keeps the hub's data until the end.
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(etcd: Option<&Etcd>) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = start_hub(config(dir.path(), etcd, "/imgfleet-session")).await;
        let objects = hub.context.objects.clone();
        let url = hub.url();
        let a_cert = enroll(&hub, "a", "edge").await;
        let b_cert = enroll(&hub, "b", "core").await;
        let c_cert = enroll(&hub, "c", "core").await;
        apply_yaml(&objects, POLICY).await;
        set_resolved(&objects, &[("v1", DIGEST)]).await;
        poll(Duration::from_secs(5), async || {
            (stored_images(&objects, "a").await == 1).then_some(())
        })
        .await
        .expect("the controller places the image on a");
        Fleet {
            hub,
            objects,
            url,
            a_cert,
            b_cert,
            c_cert,
            _dir: dir,
        }
    }
}

/// The next message, which must be a delta, within `limit`.
async fn next_delta(agent: &mut Agent, limit: Duration) -> pb::DesiredSetDelta {
    match agent.next_change(limit).await {
        Some(HubMsg::Delta(d)) => d,
        other => panic!("expected a delta, got {other:?}"),
    }
}

/// Progress on `app` at [`DIGEST2`]: `done` of 200 bytes.
fn progress(phase: pb::ImagePhase, done: u64) -> AgentMsg {
    AgentMsg::Progress(pb::Progress {
        images: vec![pb::ImageProgress {
            key: format!("default/app@{DIGEST2}"),
            digest: DIGEST2.into(),
            phase: phase as i32,
            bytes_done: done,
            bytes_total: 200,
            layers_done: 1,
            layers_total: 2,
            message: String::new(),
            updated_at: Some(prost_types::Timestamp {
                seconds: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_secs() as i64,
                nanos: 0,
            }),
            next_retry_time: None,
            attempts: 0,
        }],
        storage: Some(pb::StorageReport {
            used_bytes: 5000,
            capacity_bytes: 100_000,
        }),
        held: None,
    })
}

/// An inventory: the store holds both digests of `app` (the old one kept
/// by retention).
fn held_both() -> AgentMsg {
    AgentMsg::Progress(pb::Progress {
        held: Some(pb::HeldInventory {
            repositories: vec![pb::HeldRepository {
                registry: "r.example".into(),
                repository: "library/app".into(),
                digests: vec![DIGEST.into(), DIGEST2.into()],
            }],
            truncated: false,
        }),
        ..Default::default()
    })
}

/// A hello claiming another cluster, an admin certificate, and a cluster
/// that is no longer enrolled are refused.
async fn only_an_enrolled_clusters_own_certificate_gets_in(f: &Fleet) {
    let e = connect(&f.url, &f.a_cert, hello("b", "", 0))
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("certificate is for cluster a, hello claims b"),
        "{}",
        e.message()
    );
    let e = connect(&f.url, &admin_material(&f.hub), hello("a", "", 0))
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    f.objects
        .delete(Kind::Cluster, None, "c", None)
        .await
        .expect("delete c");
    let e = connect(&f.url, &f.c_cert, hello("c", "", 0))
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

/// Full set on connect: a gets the image and its credential, b nothing.
async fn each_agent_gets_its_full_set_on_connect(
    f: &Fleet,
) -> ((Agent, pb::DesiredSet), (Agent, pb::DesiredSet)) {
    let mut a = connect(&f.url, &f.a_cert, hello("a", "", 0))
        .await
        .expect("a connects");
    let set_a = full(a.next_change(Duration::from_secs(3)).await);
    assert_eq!(set_a.images.len(), 1, "{set_a:?}");
    let img = &set_a.images[0];
    assert_eq!(img.key, format!("default/app@{DIGEST}"));
    assert_eq!(img.tags, vec!["v1".to_string()]);
    assert_eq!(img.registry, "127.0.0.1:5999");
    assert_eq!(set_a.registries.len(), 1);
    assert_eq!(set_a.registries[0].key, "default/upstream");
    assert_eq!(set_a.registries[0].username, "puller");
    assert_eq!(
        set_a.registries[0].password, PASSWORD,
        "the credential is sent opened"
    );
    assert!(!set_a.epoch.is_empty());
    let mut b = connect(&f.url, &f.b_cert, hello("b", "", 0))
        .await
        .expect("b connects");
    let set_b = full(b.next_change(Duration::from_secs(3)).await);
    assert!(
        set_b.images.is_empty() && set_b.registries.is_empty(),
        "{set_b:?}"
    );
    assert_eq!(set_b.epoch, set_a.epoch);
    ((a, set_a), (b, set_b))
}

/// A label change on b reaches b as a delta within 1 s, with the credential.
async fn a_label_change_reaches_the_agent_as_a_delta(
    f: &Fleet,
    b: &mut Agent,
    set_b: &pb::DesiredSet,
) {
    let t0 = Instant::now();
    set_label(&f.objects, "b", "edge").await;
    let delta = next_delta(b, Duration::from_secs(3)).await;
    let latency = t0.elapsed();
    println!("label change -> delta at agent b: {latency:?}");
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    assert_eq!(delta.from_generation, set_b.generation);
    assert_eq!(delta.generation, set_b.generation + 1);
    assert_eq!(delta.upserts.len(), 1);
    assert_eq!(delta.registry_upserts.len(), 1);
    assert_eq!(delta.registry_upserts[0].password, PASSWORD);
}

/// A tag resolution change reaches a connected agent within 1 s as well,
/// without its unchanged credential.
async fn a_new_digest_reaches_the_agent_as_a_delta(
    f: &Fleet,
    a: &mut Agent,
) -> pb::DesiredSetDelta {
    let t0 = Instant::now();
    set_resolved(&f.objects, &[("v1", DIGEST2)]).await;
    let d = next_delta(a, Duration::from_secs(3)).await;
    let latency = t0.elapsed();
    println!("tag resolution change -> delta at agent a: {latency:?}");
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    assert_eq!(d.removals, vec![format!("default/app@{DIGEST}")]);
    assert_eq!(d.upserts.len(), 1);
    assert_eq!(d.upserts[0].digest, DIGEST2);
    assert!(
        d.registry_upserts.is_empty(),
        "credential unchanged: not resent"
    );
    d
}

/// A rotated registry password reaches the agent as a credential upsert.
/// Returns the delta.
async fn a_rotated_password_is_sent_again(
    f: &Fleet,
    a: &mut Agent,
    b: &mut Agent,
    before: &pb::DesiredSetDelta,
) -> pb::DesiredSetDelta {
    let t0 = Instant::now();
    apply_yaml(
        &f.objects,
        &POLICY
            .split("---")
            .next()
            .expect("secret document")
            .replace(PASSWORD, "rotated-pw"),
    )
    .await;
    let d2 = next_delta(a, Duration::from_secs(3)).await;
    println!("password rotation -> delta at agent a: {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(d2.from_generation, before.generation);
    assert!(d2.upserts.is_empty() && d2.removals.is_empty(), "{d2:?}");
    assert_eq!(d2.registry_upserts.len(), 1);
    assert_eq!(d2.registry_upserts[0].password, "rotated-pw");
    // b holds the same image now: drain its two deltas.
    for _ in 0..2 {
        next_delta(b, Duration::from_secs(2)).await;
    }
    d2
}

/// Reconnecting with the current (epoch, generation) resends nothing;
/// with another epoch, the full set. Returns a's current session.
async fn a_reconnect_gets_only_what_it_lacks(
    f: &Fleet,
    a: Agent,
    epoch: &str,
    generation: u64,
) -> Agent {
    drop(a);
    let mut a = connect(&f.url, &f.a_cert, hello("a", epoch, generation))
        .await
        .expect("a reconnects");
    assert!(
        a.next_change(Duration::from_millis(1500)).await.is_none(),
        "nothing resent to an up-to-date agent"
    );
    let mut a2 = connect(&f.url, &f.a_cert, hello("a", "other-epoch", generation))
        .await
        .expect("a reconnects");
    let again = full(a2.next_change(Duration::from_secs(3)).await);
    assert_eq!(again.generation, generation);
    drop(a2);
    drop(a);
    let mut fresh = connect(&f.url, &f.a_cert, hello("a", epoch, generation))
        .await
        .expect("a reconnects");
    assert!(
        fresh
            .next_change(Duration::from_millis(300))
            .await
            .is_none()
    );
    fresh
}

/// An ack sets the Cluster's appliedGeneration, and the Hello's facts are
/// in its status.
async fn an_ack_sets_the_applied_generation(f: &Fleet, a: &Agent, epoch: &str, generation: u64) {
    a.send(AgentMsg::Ack(pb::Ack {
        generation,
        epoch: epoch.to_string(),
        error: String::new(),
    }))
    .await;
    let st = poll(Duration::from_secs(3), async || {
        let s = cluster_status(&f.objects, "a").await;
        (s.applied_generation == generation).then_some(s)
    })
    .await
    .expect("appliedGeneration recorded");
    assert_eq!(st.phase, Some(ClusterPhase::Connected));
    assert_eq!(st.desired_generation, generation);
    assert_eq!(st.agent_version.as_deref(), Some("test-agent 0.1"));
    assert_eq!(st.storage_capacity_bytes, 100_000);
    assert!(st.hub_replica.is_some());
}

/// Progress: a Synced, b Syncing -> 1 of 2 synced, in the Repository's and
/// the Cluster's status.
async fn progress_reaches_the_status(f: &Fleet, a: &Agent, b: &Agent) {
    let t0 = Instant::now();
    a.send(progress(pb::ImagePhase::Synced, 200)).await;
    b.send(progress(pb::ImagePhase::Syncing, 100)).await;
    let rs = poll(Duration::from_secs(4), async || {
        let s = repo_status(&f.objects).await;
        (s.synced_clusters == 1
            && s.target_clusters == 2
            && s.clusters.len() == 2
            && s.clusters
                .iter()
                .any(|c| c.cluster == "b" && c.bytes_done == 100))
        .then_some(s)
    })
    .await
    .expect("progress reaches Repository status");
    println!("progress -> Repository status: {:?}", t0.elapsed());
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    let ea = rs
        .clusters
        .iter()
        .find(|c| c.cluster == "a")
        .expect("a entry");
    assert_eq!(ea.phase, Some(ImagePhase::Synced));
    assert_eq!(ea.digest, DIGEST2);
    assert!(!ea.last_known);
    assert!(ea.last_sync_time.is_some());
    // Cluster status writes are coalesced to one a second: allow for that.
    let st = poll(Duration::from_secs(3), async || {
        let s = cluster_status(&f.objects, "a").await;
        (s.images_synced == 1).then_some(s)
    })
    .await
    .expect("imagesSynced recorded");
    assert_eq!(st.images_desired, 1);
    assert_eq!(st.storage_used_bytes, 5000);
    // The inventory, sent on its own, lands in the Cluster's status.
    a.send(held_both()).await;
    let st = poll(Duration::from_secs(4), async || {
        let s = cluster_status(&f.objects, "a").await;
        s.holds("r.example", "library/app", DIGEST).then_some(s)
    })
    .await
    .expect("status.held recorded");
    assert!(st.holds("r.example", "library/app", DIGEST2));
    assert!(!st.held_truncated);
}

/// What an operator sees (the `imgfleet` binary: cargo build -p imgfleet --bin imgfleet).
async fn the_cli_shows_the_progress(f: &Fleet) {
    let cli = imgfleet_tests::fleet::Cli::new(&f.url, f.hub.admin_dir.as_ref().expect("admin"));
    let list = cli
        .ok(&["get", "repositories"])
        .await
        .expect("get repositories");
    println!("{list}");
    assert!(
        list.lines()
            .any(|l| l.contains(" app ") && l.contains("1/2")),
        "{list}"
    );
    let text = cli
        .ok(&["describe", "repository", "app"])
        .await
        .expect("describe");
    println!("{text}");
    assert!(text.contains("Clusters (1/2 synced):"), "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("a ")
            && l.contains("Synced")
            && l.contains("100%")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("b ")
            && l.contains("Syncing")
            && l.contains("50%")),
        "{text}"
    );
    let clusters = cli.ok(&["get", "clusters"]).await.expect("get clusters");
    println!("{clusters}");
    assert!(
        clusters
            .lines()
            .any(|l| l.starts_with("a ") && l.contains("Connected")),
        "{clusters}"
    );
}

/// Drop a's session: Offline after --offline-after (2 s), its entries last
/// known and no longer counted as synced; b, heartbeating, stays Connected.
async fn a_silent_cluster_goes_offline(f: &Fleet, a: Agent, b: &Agent, generation: u64) {
    let t0 = Instant::now();
    drop(a);
    let st = poll(Duration::from_secs(8), async || {
        let s = cluster_status(&f.objects, "a").await;
        (s.phase == Some(ClusterPhase::Offline)).then_some(s)
    })
    .await
    .expect("a goes Offline");
    println!("session dropped -> Offline: {:?}", t0.elapsed());
    assert_eq!(st.applied_generation, generation, "last known state kept");
    assert!(
        st.holds("r.example", "library/app", DIGEST)
            && st.holds("r.example", "library/app", DIGEST2),
        "the last inventory is kept: {:?}",
        st.held
    );
    let rs = poll(Duration::from_secs(3), async || {
        let s = repo_status(&f.objects).await;
        s.clusters
            .iter()
            .any(|c| c.cluster == "a" && c.last_known)
            .then_some(s)
    })
    .await
    .expect("a's entries flagged last known");
    assert_eq!(
        rs.synced_clusters, 0,
        "an offline cluster is not reported as synced"
    );
    let ea = rs
        .clusters
        .iter()
        .find(|c| c.cluster == "a")
        .expect("a entry");
    assert_eq!(
        ea.phase,
        Some(ImagePhase::Synced),
        "the last known phase is kept"
    );
    b.send(AgentMsg::Heartbeat(pb::Heartbeat {
        sent_at: None,
        seq: 1,
    }))
    .await;
    assert_eq!(
        cluster_status(&f.objects, "b").await.phase,
        Some(ClusterPhase::Connected)
    );
}

/// Reconnect: Connected again and current (not last known) once it reports.
async fn a_returning_cluster_is_current_again(f: &Fleet, epoch: &str, generation: u64) {
    let a = connect(&f.url, &f.a_cert, hello("a", epoch, generation))
        .await
        .expect("a back");
    a.send(progress(pb::ImagePhase::Synced, 200)).await;
    poll(Duration::from_secs(4), async || {
        let s = repo_status(&f.objects).await;
        let c = cluster_status(&f.objects, "a").await;
        (s.synced_clusters == 1 && c.phase == Some(ClusterPhase::Connected)).then_some(())
    })
    .await
    .expect("a current again");
    // A progress without an inventory leaves the stored one as it was.
    let c = cluster_status(&f.objects, "a").await;
    assert!(c.holds("r.example", "library/app", DIGEST2), "{:?}", c.held);
}

async fn scenario(etcd: Option<&Etcd>) {
    let f = Fleet::start(etcd).await;
    only_an_enrolled_clusters_own_certificate_gets_in(&f).await;
    let ((mut a, _), (mut b, set_b)) = each_agent_gets_its_full_set_on_connect(&f).await;
    a_label_change_reaches_the_agent_as_a_delta(&f, &mut b, &set_b).await;
    let d = a_new_digest_reaches_the_agent_as_a_delta(&f, &mut a).await;
    let d2 = a_rotated_password_is_sent_again(&f, &mut a, &mut b, &d).await;
    let (epoch, generation) = (d2.epoch.clone(), d2.generation);
    let a = a_reconnect_gets_only_what_it_lacks(&f, a, &epoch, generation).await;
    an_ack_sets_the_applied_generation(&f, &a, &epoch, generation).await;
    progress_reaches_the_status(&f, &a, &b).await;
    the_cli_shows_the_progress(&f).await;
    a_silent_cluster_goes_offline(&f, a, &b, generation).await;
    a_returning_cluster_is_current_again(&f, &epoch, generation).await;
    drop(b);
    f.hub.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_with_embedded_store() {
    scenario(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_with_etcd() {
    let etcd = Etcd::start()
        .await
        .expect("etcd starts (apt-get install -y etcd-server)");
    scenario(Some(&etcd)).await;
}

/// Two hub replicas on one etcd: a change applied through hub 1 reaches an
/// agent connected to hub 2 within 1 s, and the generation grows by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_share_desired_sets() {
    let etcd = Etcd::start()
        .await
        .expect("etcd starts (apt-get install -y etcd-server)");
    // One data directory: both replicas use the same CA and secret key, as
    // replicas of one hub do.
    let dir = tempfile::tempdir().expect("tempdir");
    let hub1 = start_hub(config(dir.path(), Some(&etcd), "/imgfleet-ha")).await;
    let hub2 = start_hub(config(dir.path(), Some(&etcd), "/imgfleet-ha")).await;
    let o1 = hub1.context.objects.clone();

    let a_cert = enroll(&hub1, "a", "core").await;
    apply_yaml(&o1, POLICY).await;
    set_resolved(&o1, &[("v1", DIGEST)]).await;
    // Hub 1's controller has stored a's (empty) set.
    poll(Duration::from_secs(5), async || {
        let key = imgfleet_hub::desired::desired_key("a");
        o1.store().get(&key).await.expect("store get").map(|_| ())
    })
    .await
    .expect("a desired set for a");

    let mut a = connect(&hub2.url(), &a_cert, hello("a", "", 0))
        .await
        .expect("a on hub 2");
    let set = full(a.next_change(Duration::from_secs(3)).await);
    assert!(set.images.is_empty(), "{set:?}");

    let t0 = Instant::now();
    set_label(&o1, "a", "edge").await;
    let d = match a.next_change(Duration::from_secs(3)).await {
        Some(HubMsg::Delta(d)) => d,
        other => panic!("expected a delta, got {other:?}"),
    };
    let latency = t0.elapsed();
    println!("change through hub 1 -> delta at agent on hub 2: {latency:?}");
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    assert_eq!(
        d.generation,
        set.generation + 1,
        "both controllers: one bump"
    );
    assert_eq!(d.upserts.len(), 1);
    assert_eq!(d.registry_upserts[0].password, PASSWORD);
    // Nothing further: the second controller did not bump again.
    assert!(a.next_change(Duration::from_millis(800)).await.is_none());

    // The session's status is written by hub 2, visible through hub 1.
    let st = poll(Duration::from_secs(3), async || {
        let s = cluster_status(&o1, "a").await;
        (s.phase == Some(ClusterPhase::Connected)).then_some(s)
    })
    .await
    .expect("hub 2 writes a's status");
    assert_eq!(
        st.hub_replica,
        cluster_status(&hub2.context.objects, "a").await.hub_replica
    );

    drop(a);
    hub2.stop().await.expect("stop 2");
    hub1.stop().await.expect("stop 1");
}

/// The hub as the binary starts it (`Parts::ALL`, tag resolver included)
/// serves the agent API: an enrolled cluster gets its (empty) set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_part_serves_the_agent_api() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), None, "");
    let hub = server::start_with(cfg, CancellationToken::new(), Parts::ALL)
        .await
        .expect("hub starts");
    let cert = enroll(&hub, "edge-1", "edge").await;
    let mut agent = connect(&hub.url(), &cert, hello("edge-1", "", 0))
        .await
        .expect("agent connects");
    let set = full(agent.next_change(Duration::from_secs(5)).await);
    assert!(set.generation >= 1 && set.images.is_empty(), "{set:?}");
    drop(agent);
    hub.stop().await.expect("clean stop");
}

/// `--offline-after` and IMGFLEET_OFFLINE_AFTER: default 30 s, bad values named.
#[test]
fn offline_after_setting() {
    let env = HashMap::new();
    let c = Config::parse(["imgfleet-hub"], &env).expect("defaults");
    assert_eq!(c.offline_after, Duration::from_secs(30));
    let c = Config::parse(["imgfleet-hub", "--offline-after", "2m"], &env).expect("flag");
    assert_eq!(c.offline_after, Duration::from_secs(120));
    let env = HashMap::from([("IMGFLEET_OFFLINE_AFTER".to_string(), "5s".to_string())]);
    let c = Config::parse(["imgfleet-hub"], &env).expect("env");
    assert_eq!(c.offline_after, Duration::from_secs(5));
    for bad in ["1x", "0s"] {
        let e = Config::parse(["imgfleet-hub", "--offline-after", bad], &HashMap::new())
            .expect_err("refused")
            .to_string();
        assert!(e.contains("--offline-after") && e.contains(bad), "{e}");
    }
}
