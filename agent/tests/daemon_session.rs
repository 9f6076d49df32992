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
use imgfleet_tests::images::{ImageSpec, PushedImage, push_image};
use imgfleet_tests::process::{ChildGuard, free_port};
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

/// Pushes a random image of `layers` (sizes) to `repo:tag`.
async fn push(reg: &Registry, repo: &str, tag: &str, layers: &[u64], seed: u64) -> PushedImage {
    push_image(reg, repo, tag, &ImageSpec::random(layers, seed))
        .await
        .unwrap()
}

fn synced(hub: &FakeHub, key: &str) -> bool {
    hub.record(|r| synced_in(r, key))
}

fn synced_in(r: &Record, key: &str) -> bool {
    r.latest
        .get(key)
        .is_some_and(|p| phase_of(p) == pb::ImagePhase::Synced)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_syncs_from_hub_and_keeps_working_offline() {
    let mut s = Scenario::start().await;
    s.hello_names_the_certificates_cluster_past_a_dead_hub()
        .await;
    s.the_set_is_acked_once_it_is_on_disk().await;
    s.an_image_is_synced_only_once_the_mirror_serves_it().await;
    s.a_failing_image_is_retried_on_its_own().await;
    s.a_delta_adds_an_image_and_drops_another().await;
    s.a_delta_adds_an_image_whose_registry_is_down().await;
    s.restarted_with_every_hub_down_it_finishes_from_the_held_set()
        .await;
    s.the_hub_back_hears_the_held_generation_and_the_full_state()
        .await;
    s.progress_is_coalesced();
    s.metrics_and_health_tell_the_state().await;
    s.sigterm_exits_0_and_no_password_is_written().await;
    eprintln!("figures: {}", s.figures.join("; "));
}

/// The long scenario of [`daemon_syncs_from_hub_and_keeps_working_offline`]:
/// what its steps share.
struct Scenario {
    _dir: tempfile::TempDir,
    _reg: Registry,
    /// `big` comes through it; it refuses until the agent is offline.
    proxy: FaultProxy,
    app: PushedImage,
    web: PushedImage,
    big: PushedImage,
    app_img: pb::DesiredImage,
    missing_img: pb::DesiredImage,
    web_img: pb::DesiredImage,
    big_img: pb::DesiredImage,
    /// The credential for `big`, through the proxy.
    proxy_cred: pb::RegistryCredential,
    set1: pb::DesiredSet,
    hub: FakeHub,
    cmd: AgentCmd,
    agent: ChildGuard,
    /// Logs of agents that were killed.
    old_logs: Vec<std::path::PathBuf>,
    started: Instant,
    /// Timings, printed at the end.
    figures: Vec<String>,
}

impl Scenario {
    /// A registry with app, web and big (behind a refusing proxy), a hub
    /// holding generation 1 (app and an image that does not exist), and an
    /// agent whose first hub URL is dead.
    async fn start() -> Scenario {
        imgfleet_tests::process::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::start(RegistryOptions::plain().with_auth("edge", PASSWORD))
            .await
            .unwrap();
        let app = push(&reg, "demo/app", "v1", &[300_000], 31).await;
        let web = push(&reg, "demo/web", "v2", &[200_000, 50_000], 32).await;
        let big = push(&reg, "demo/big", "v1", &[3 * MIB], 33).await;
        let proxy = FaultProxy::start(reg.addr().parse().unwrap())
            .await
            .unwrap();
        proxy.set_refuse(true);

        let addr = reg.addr();
        let app_img = image(&addr, "app", "demo/app", &app.manifest_digest, "v1");
        let missing_digest = format!("sha256:{}", "0".repeat(64));
        let missing_img = image(&addr, "missing", "demo/app", &missing_digest, "gone");
        let web_img = image(&addr, "web", "demo/web", &web.manifest_digest, "v2");
        let proxy_addr = proxy.addr().to_string();
        let mut big_img = image(&proxy_addr, "big", "demo/big", &big.manifest_digest, "v1");
        big_img.registry_key = "default/proxy".into();
        let mut proxy_cred = credential(&proxy_addr, "edge", PASSWORD);
        proxy_cred.key = "default/proxy".into();

        let set1 = pb::DesiredSet {
            generation: 1,
            epoch: "e1".into(),
            images: vec![app_img.clone(), missing_img.clone()],
            registries: vec![credential(&addr, "edge", PASSWORD)],
        };
        let pki = pki(dir.path(), "edge-1");
        let hub = FakeHub::start(pki.server.clone(), set1.clone());
        let dead = format!("https://127.0.0.1:{}", free_port());
        let cmd = AgentCmd::new(dir.path(), &pki, vec![dead, hub.url()]);
        let started = Instant::now();
        let agent = ChildGuard::spawn("daemon-session-agent", cmd.command()).unwrap();
        Scenario {
            _dir: dir,
            _reg: reg,
            proxy,
            app,
            web,
            big,
            app_img,
            missing_img,
            web_img,
            big_img,
            proxy_cred,
            set1,
            hub,
            cmd,
            agent,
            old_logs: Vec::new(),
            started,
            figures: Vec::new(),
        }
    }

    /// Waits for what the hub heard to satisfy `f`.
    async fn wait_hub(&mut self, what: &str, secs: u64, f: impl Fn(&Record) -> bool) {
        let hub = &self.hub;
        self.agent
            .wait_ready(what, Duration::from_secs(secs), || async {
                Ok(hub.record(&f))
            })
            .await
            .unwrap();
    }

    async fn hello_names_the_certificates_cluster_past_a_dead_hub(&mut self) {
        self.wait_hub("sends Hello", 30, |r| !r.hellos.is_empty())
            .await;
        let hello = self.hub.record(|r| r.hellos[0].clone());
        assert_eq!(hello.cluster_name, "edge-1");
        assert_eq!(
            (hello.current_generation, hello.current_epoch.as_str()),
            (0, "")
        );
        assert!(hello.storage.is_some_and(|s| s.capacity_bytes > 0));
        let after = self.started.elapsed();
        self.figures
            .push(format!("hello after {after:?} (first URL dead)"));
    }

    async fn the_set_is_acked_once_it_is_on_disk(&mut self) {
        self.wait_hub("acks generation 1", 10, |r| {
            r.acks.iter().any(|a| a.generation == 1)
        })
        .await;
        assert!(self.cmd.data.join("desired.bin").exists());
        let ack = self.hub.record(|r| r.acks[0].clone());
        assert_eq!((ack.epoch.as_str(), ack.error.as_str()), ("e1", ""));
    }

    async fn an_image_is_synced_only_once_the_mirror_serves_it(&mut self) {
        let acked = Instant::now();
        let key = self.app_img.key.clone();
        self.wait_hub("reports app SYNCED", 30, |r| synced_in(r, &key))
            .await;
        let took = acked.elapsed();
        // SYNCED means servable: the mirror answers with the upstream digest.
        assert_eq!(
            mirror_digest(&self.cmd.mirror(), "demo/app:v1")
                .await
                .unwrap(),
            self.app.manifest_digest
        );
        let p = self.hub.record(|r| r.latest[&key].clone());
        assert_eq!(p.digest, self.app.manifest_digest);
        assert!(
            p.bytes_total > 300_000 && p.bytes_done == p.bytes_total,
            "{p:?}"
        );
        assert_eq!(p.layers_done, p.layers_total);
        self.figures.push(format!("ack -> app SYNCED {took:?}"));
    }

    async fn a_failing_image_is_retried_on_its_own(&mut self) {
        let key = self.missing_img.key.clone();
        // It fails on its own, with a retry scheduled.
        self.wait_hub("reports missing FAILED", 30, |r| {
            r.latest
                .get(&key)
                .is_some_and(|p| phase_of(p) == pb::ImagePhase::Failed)
        })
        .await;
        let failed = self.hub.record(|r| r.latest[&key].clone());
        assert!(failed.next_retry_time.is_some(), "{failed:?}");
        assert!(failed.attempts >= 1, "{failed:?}");
        assert!(!failed.message.is_empty(), "{failed:?}");
        // It is retried on its own schedule, and says so.
        self.wait_hub("retries missing", 15, |r| r.latest[&key].attempts >= 2)
            .await;
        let failed = self.hub.record(|r| r.latest[&key].clone());
        assert_eq!(phase_of(&failed), pb::ImagePhase::Failed);
        assert!(failed.next_retry_time.is_some(), "{failed:?}");
    }

    async fn a_delta_adds_an_image_and_drops_another(&mut self) {
        let set2 = pb::DesiredSet {
            generation: 2,
            images: vec![self.app_img.clone(), self.web_img.clone()],
            ..self.set1.clone()
        };
        let sent = Instant::now();
        self.hub.push_delta(
            pb::DesiredSetDelta {
                from_generation: 1,
                generation: 2,
                epoch: "e1".into(),
                upserts: vec![self.web_img.clone()],
                removals: vec![self.missing_img.key.clone()],
                ..Default::default()
            },
            set2,
        );
        let key = self.web_img.key.clone();
        self.wait_hub("reports web SYNCED", 30, |r| synced_in(r, &key))
            .await;
        let took = sent.elapsed();
        assert!(
            self.hub
                .record(|r| r.acks.iter().any(|a| a.generation == 2))
        );
        assert_eq!(
            mirror_digest(&self.cmd.mirror(), "demo/web:v2")
                .await
                .unwrap(),
            self.web.manifest_digest
        );
        self.figures.push(format!("delta -> web SYNCED {took:?}"));
    }

    async fn a_delta_adds_an_image_whose_registry_is_down(&mut self) {
        let set3 = pb::DesiredSet {
            generation: 3,
            images: vec![
                self.app_img.clone(),
                self.web_img.clone(),
                self.big_img.clone(),
            ],
            registries: vec![self.set1.registries[0].clone(), self.proxy_cred.clone()],
            ..self.set1.clone()
        };
        self.hub.push_delta(
            pb::DesiredSetDelta {
                from_generation: 2,
                generation: 3,
                epoch: "e1".into(),
                upserts: vec![self.big_img.clone()],
                registry_upserts: vec![self.proxy_cred.clone()],
                ..Default::default()
            },
            set3,
        );
        self.wait_hub("acks generation 3", 10, |r| {
            r.acks.iter().any(|a| a.generation == 3)
        })
        .await;
        assert!(!synced(&self.hub, &self.big_img.key));
    }

    async fn restarted_with_every_hub_down_it_finishes_from_the_held_set(&mut self) {
        self.hub.stop();
        self.old_logs.push(self.agent.log_path().to_path_buf());
        self.agent.kill();
        self.proxy.set_refuse(false);
        let restarted = Instant::now();
        self.agent =
            ChildGuard::spawn("daemon-session-agent-restarted", self.cmd.command()).unwrap();
        let mirror = self.cmd.mirror();
        let app = self.app.manifest_digest.clone();
        self.agent
            .wait_ready("serves app offline", Duration::from_secs(30), || async {
                Ok(mirror_digest(&mirror, "demo/app:v1").await? == app)
            })
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let big_url = format!("http://{mirror}/v2/demo/big/manifests/v1");
        self.agent
            .wait_ready(
                "finishes big from the persisted set, hub down",
                Duration::from_secs(60),
                || async { Ok(http.head(&big_url).send().await?.status() == 200) },
            )
            .await
            .unwrap();
        let took = restarted.elapsed();
        assert_eq!(
            mirror_digest(&mirror, "demo/big:v1").await.unwrap(),
            self.big.manifest_digest
        );
        assert_eq!(self.hub.record(|r| r.hellos.len()), 1, "no hub was up");
        self.figures
            .push(format!("restart offline -> big served {took:?}"));
    }

    /// The held generation goes in Hello, nothing is resent, and the first
    /// progress is the full current state.
    async fn the_hub_back_hears_the_held_generation_and_the_full_state(&mut self) {
        let sent_before = self.hub.record(|r| r.sent.len());
        self.hub.restart();
        let back = Instant::now();
        self.wait_hub("reconnects", 30, |r| {
            r.hellos.len() == 2 && r.progress.iter().any(|(s, _)| *s == r.sessions)
        })
        .await;
        let took = back.elapsed();
        let (hello, first, sent_after) = self.hub.record(|r| {
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
            (self.app_img.key.clone(), pb::ImagePhase::Synced),
            (self.web_img.key.clone(), pb::ImagePhase::Synced),
            (self.big_img.key.clone(), pb::ImagePhase::Synced),
        ];
        want.sort();
        assert_eq!(keys, want);
        assert!(first.storage.is_some_and(|s| s.used_bytes > 3 * MIB));
        self.figures.push(format!(
            "hub back -> reconnected with full progress {took:?}"
        ));
    }

    /// At most about two progress messages a second per session.
    fn progress_is_coalesced(&self) {
        let gaps = self.hub.record(|r| {
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
    }

    async fn metrics_and_health_tell_the_state(&self) {
        let http = reqwest::Client::new();
        let port = self.cmd.metrics_port;
        let metrics = get_text(&http, &format!("http://127.0.0.1:{port}/metrics")).await;
        for line in [
            "imgfleet_agent_images_synced 3",
            "imgfleet_agent_desired_generation 3",
            "imgfleet_agent_hub_connected 1",
        ] {
            assert!(metrics.contains(line), "{line} in\n{metrics}");
        }
        let health = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
    }

    async fn sigterm_exits_0_and_no_password_is_written(&mut self) {
        stops_with_0_on_sigterm(&mut self.agent).await;
        let logs = self
            .old_logs
            .iter()
            .cloned()
            .chain([self.agent.log_path().to_path_buf()]);
        for log in logs {
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
        let desired = std::fs::read(self.cmd.data.join("desired.bin")).unwrap();
        assert!(
            !desired
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes()),
            "the persisted set is encrypted"
        );
    }
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
    let (hub, cmd) = hub_and_agent(dir.path(), "edge-gc", set1.clone());
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
    let cmd = AgentCmd::new(dir.path(), &pki, vec![format!("https://{}", proxy.addr())]);
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
