//! The fleet end to end, with real processes only: one etcd, two `imgfleet-hub` replicas
//! sharing it, a real upstream registry (behind a fault proxy that can throttle it), and
//! three `imgfleet-agent`s with different labels, driven through the `imgfleet` CLI.
//!
//! One test walks the whole story in order, a step a function over one [`Fleet`], because
//! every step needs the same fleet and starting it once keeps the run short:
//! 1. the seed's YAML plus placements syncs to the targeted agents (`imgfleet watch
//!    --until-synced` follows it), skopeo reads identical digests from each one's mirror,
//!    the untargeted agent holds nothing, and a cluster's certificate is refused as admin;
//! 2. a policy change reaches all three agents; the time is measured and printed;
//! 3. the hub replica an agent is connected to is SIGKILLed: the agent fails over and the
//!    status stays right;
//! 4. an agent's link to the hubs is cut in the middle of a transfer: the transfer completes
//!    anyway, the hub marks the cluster Offline with its states as last known (never
//!    Synced), and after reconnecting it shows Synced;
//! 5. with every hub down an agent is SIGKILLed and restarted: it still serves its images
//!    and finishes its pending work;
//! 6. throughout, no agent ever stores an image placed only on another cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use imgfleet_tests::fleet::{
    AgentOptions, AgentProcess, Cli, HubOptions, HubProcess, wait_repository_synced,
};
use imgfleet_tests::images::{ImageSpec, PushTarget, PushedImage};
use imgfleet_tests::{Etcd, FaultProxy, Registry, RegistryOptions, policy, skopeo, wait_until};
use serde_json::Value;
use tempfile::TempDir;

const USER: &str = "admin";
const PASSWORD: &str = "Harbor12345";
/// How long a sync or a convergence may take in this test.
const CONVERGE: Duration = Duration::from_secs(60);
/// The hubs' `--offline-after`: short to keep the test quick, yet twice the agents' 5 s
/// heartbeat so that connected clusters never look offline.
const OFFLINE_AFTER: Duration = Duration::from_secs(10);

/// A Repository shaped like the seed's, through the seed's `harbor-prod`, with a
/// placement (YAML lines indented by 4).
fn repository(name: &str, repo: &str, tag: &str, placement: &str) -> String {
    policy::repository(
        name,
        repo,
        tag,
        "harbor-prod",
        &format!("  syncInterval: \"1h\"\n  placement:\n{placement}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_syncs_fails_over_and_works_offline() -> Result<()> {
    let mut fleet = Fleet::start().await?;
    fleet.the_seed_syncs_to_the_targeted_agents().await?;
    fleet.a_policy_change_reaches_every_agent().await?;
    fleet.an_agent_fails_over_when_its_hub_dies().await?;
    fleet.a_transfer_survives_a_cut_link().await?;
    fleet
        .an_agent_restarted_without_hubs_serves_and_finishes()
        .await?;
    fleet.no_agent_holds_another_clusters_images().await;
    println!("fleet end-to-end passed in {:?}", fleet.started.elapsed());
    Ok(())
}

/// The images the upstream registry holds.
struct Images {
    /// `library/nginx:latest`, placed on east and west.
    nginx: PushedImage,
    /// `team/west:v1`, placed on edge-2 only.
    west: PushedImage,
    /// `team/fleet:v1`, placed on all three clusters.
    fleet: PushedImage,
    /// `team/big:v1`, large enough to cut edge-1's link in the middle of its transfer.
    big: PushedImage,
    /// `team/pending:v1`, still transferring when edge-1 is killed.
    pending: PushedImage,
}

/// Everything the steps share, declared in the order it stops (fields drop first to
/// last): agents, then the links and hubs they talk to, then what the hubs use.
struct Fleet {
    started: Instant,
    /// edge-1 (region east) reaches the hubs through `link_a` and `link_b` only.
    agent1: AgentProcess,
    /// edge-2 (region west) prefers hub B.
    agent2: AgentProcess,
    /// edge-3 (region north) is untargeted at first.
    agent3: AgentProcess,
    /// edge-1's links to hub A and hub B: cut to isolate it from the hubs.
    link_a: FaultProxy,
    link_b: FaultProxy,
    hub_a: HubProcess,
    hub_b: HubProcess,
    /// The CLI with the admin bundle, talking to hub A.
    cli: Cli,
    _etcd: Etcd,
    images: Images,
    /// The upstream registry's faults: between the agents and `registry`.
    upstream: FaultProxy,
    registry: Registry,
    dir: TempDir,
}

impl Fleet {
    /// Upstream with its images, two hub replicas on one etcd sharing CA and secret key,
    /// and three enrolled clusters with their agents.
    async fn start() -> Result<Fleet> {
        let started = Instant::now();
        println!(
            "logs of every process: {}",
            imgfleet_tests::test_log_dir().display()
        );
        let dir = tempfile::Builder::new()
            .prefix("imgfleet-fleet-e2e-")
            .tempdir()?;
        let root = dir.path();

        // Upstream: a registry with the seed's credentials, reached through a proxy that
        // can throttle it, holding small images (and two bigger ones for mid-transfer faults).
        let registry = Registry::start(RegistryOptions::plain().with_auth(USER, PASSWORD)).await?;
        let upstream = FaultProxy::start(registry.addr().parse()?).await?;
        let push = PushTarget::from(&registry);
        let images = Images {
            nginx: push
                .push_image(
                    "library/nginx",
                    "latest",
                    &ImageSpec::random(&[256 << 10, 512 << 10], 1),
                )
                .await?,
            west: push
                .push_image("team/west", "v1", &ImageSpec::random(&[128 << 10], 2))
                .await?,
            fleet: push
                .push_image("team/fleet", "v1", &ImageSpec::random(&[64 << 10], 3))
                .await?,
            big: push
                .push_image("team/big", "v1", &ImageSpec::random(&[3 << 20, 3 << 20], 4))
                .await?,
            pending: push
                .push_image("team/pending", "v1", &ImageSpec::random(&[2 << 20], 5))
                .await?,
        };

        let etcd = Etcd::start().await?;
        let hub_a = HubProcess::start(HubOptions {
            offline_after: Some(OFFLINE_AFTER),
            ..HubOptions::etcd(&etcd.endpoint(), root.join("hub-a"))
        })
        .await?;
        let hub_b = HubProcess::start(HubOptions {
            offline_after: Some(OFFLINE_AFTER),
            replica_of: Some(root.join("hub-a")),
            ..HubOptions::etcd(&etcd.endpoint(), root.join("hub-b"))
        })
        .await?;
        let cli = hub_a.cli();
        cli.with_hub(&hub_b.url())
            .ok(&["get", "clusters"])
            .await
            .context("the second replica accepts the shared admin bundle")?;

        let mut creds = Vec::new();
        for (name, region) in [("edge-1", "east"), ("edge-2", "west"), ("edge-3", "north")] {
            let out = root.join(name);
            creds.push(
                cli.enroll(name, &[("region", region)], &["default"], &out)
                    .await?,
            );
        }
        let [creds1, creds2, creds3] = <[_; 3]>::try_from(creds).expect("three clusters");
        let link_a = FaultProxy::start(hub_addr(&hub_a)?).await?;
        let link_b = FaultProxy::start(hub_addr(&hub_b)?).await?;
        let agent = |hubs: Vec<String>, creds, data: &str| {
            AgentProcess::start(AgentOptions::new(hubs, creds, root.join(data)))
        };
        let agent1 = agent(
            vec![proxy_url(&link_a), proxy_url(&link_b)],
            creds1,
            "agent-1",
        )
        .await?;
        let agent2 = agent(vec![hub_b.url(), hub_a.url()], creds2, "agent-2").await?;
        let agent3 = agent(vec![hub_a.url(), hub_b.url()], creds3, "agent-3").await?;
        println!("fleet started in {:?}", started.elapsed());
        Ok(Fleet {
            started,
            images,
            upstream,
            link_a,
            link_b,
            hub_a,
            hub_b,
            cli,
            agent1,
            agent2,
            agent3,
            registry,
            _etcd: etcd,
            dir,
        })
    }

    /// Step 1: the seed plus placements: nginx on east and west, team/west on edge-2 only.
    async fn the_seed_syncs_to_the_targeted_agents(&self) -> Result<()> {
        let cli = &self.cli;
        let domain = self.upstream.addr().to_string();
        let policy = policy::objects(&[
            policy::seed_registry_secret(&domain),
            repository(
                "nginx-latest",
                "library/nginx",
                "latest",
                "    clusterSelector:\n      matchExpressions:\n        - key: region\n          operator: In\n          values: [east, west]\n",
            ),
            repository("west-only", "team/west", "v1", "    clusters: [edge-2]\n"),
        ]);
        cli.apply_yaml(&policy).await?;
        // `imgfleet watch --until-synced` follows the sync and ends once both are Synced.
        let watched = cli
            .ok(&[
                "watch",
                "repositories",
                "--until-synced",
                "--timeout",
                "60s",
            ])
            .await?;
        for line in [
            "default/nginx-latest edge-1 Synced 100%",
            "default/nginx-latest edge-2 Synced 100%",
            "default/west-only edge-2 Synced 100%",
            "all watched repositories are synced",
        ] {
            assert!(
                watched.contains(line),
                "watch printed no {line:?}:\n{watched}"
            );
        }
        // A Repository that does not exist ends the watch at once, not at its timeout.
        let missing = cli
            .run(&[
                "watch",
                "repository",
                "nope",
                "--until-synced",
                "--timeout",
                "60s",
            ])
            .await?;
        assert!(
            !missing.success(),
            "watch of a missing repository succeeded"
        );
        assert!(
            missing
                .stderr
                .starts_with("error: Repository default/nope not found"),
            "{}",
            missing.stderr
        );
        wait_repository_synced(cli, "default", "nginx-latest", 2, CONVERGE).await?;
        wait_repository_synced(cli, "default", "west-only", 1, CONVERGE).await?;
        let upstream_digest = skopeo::inspect_digest(
            &self.registry.docker_ref("library/nginx:latest"),
            &[
                "--tls-verify=false",
                "--creds",
                &format!("{USER}:{PASSWORD}"),
            ],
        )
        .await?;
        let Images { nginx, west, .. } = &self.images;
        assert_eq!(upstream_digest, nginx.manifest_digest);
        for agent in [&self.agent1, &self.agent2] {
            assert_eq!(
                mirror_digest(agent, "library/nginx", "latest").await?,
                upstream_digest,
                "mirror {} serves a different library/nginx:latest",
                agent.mirror_addr()
            );
        }
        assert_eq!(
            mirror_digest(&self.agent2, "team/west", "v1").await?,
            west.manifest_digest
        );
        // The untargeted agent holds nothing at all.
        assert_eq!(
            blob_count(self.agent3.data_dir()),
            0,
            "untargeted edge-3 stores blobs"
        );
        assert_not_held(&self.agent3, "library/nginx", "latest", nginx).await;
        assert_not_held(&self.agent3, "team/west", "v1", west).await;
        // edge-1's certificate never got edge-2's image.
        assert_not_held(&self.agent1, "team/west", "v1", west).await;
        let statuses = cluster_statuses(cli).await?;
        for name in ["edge-1", "edge-2", "edge-3"] {
            assert_eq!(
                statuses[name]["phase"], "Connected",
                "{name}: {}",
                statuses[name]
            );
        }
        // A cluster's certificate is no admin: it cannot read policy or secrets.
        let as_edge1 = Cli::new(&self.hub_a.url(), &self.dir.path().join("edge-1"));
        for args in [["get", "registrysecrets"], ["get", "repositories"]] {
            let out = as_edge1.run(&args).await?;
            assert!(
                !out.success(),
                "edge-1's certificate may run imgfleet {args:?}: {}",
                out.stdout
            );
        }
        println!(
            "1. seed synced to 2 targeted agents in {:?}",
            self.started.elapsed()
        );
        Ok(())
    }

    /// Step 2: a policy change reaching all three agents, timed from apply to the last ack.
    async fn a_policy_change_reaches_every_agent(&self) -> Result<()> {
        let cli = &self.cli;
        let before = cluster_statuses(cli).await?;
        let t0 = Instant::now();
        let t0_wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        cli.apply_yaml(&repository(
            "fleet-wide",
            "team/fleet",
            "v1",
            "    clusters: [edge-1, edge-2, edge-3]\n",
        ))
        .await?;
        let acked: Arc<Mutex<BTreeMap<String, Duration>>> = Arc::default();
        let before = Arc::new(before);
        wait_until("all 3 agents acking the new generation", CONVERGE, || {
            let cli = cli.clone();
            let before = before.clone();
            let acked = acked.clone();
            async move {
                let now = cluster_statuses(&cli).await?;
                let mut acked = acked.lock().unwrap_or_else(|e| e.into_inner());
                for name in ["edge-1", "edge-2", "edge-3"] {
                    if !acked.contains_key(name)
                        && applied_generation(&now[name]) > applied_generation(&before[name])
                    {
                        acked.insert(name.to_owned(), t0.elapsed());
                    }
                }
                Ok(acked.len() == 3)
            }
        })
        .await?;
        let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ack_latency = t0.elapsed();
        // The agents' logs time the apply of the new set more finely than polling the hub.
        let from_logs: Vec<String> = [
            ("edge-1", &self.agent1),
            ("edge-2", &self.agent2),
            ("edge-3", &self.agent3),
        ]
        .iter()
        .map(|(name, agent)| {
            match applied_at(agent.log_path(), applied_generation(&before[*name])) {
                Some(at) => format!("{name} {:.0} ms", (at - t0_wall) * 1000.0),
                None => format!("{name} not in its log"),
            }
        })
        .collect();
        wait_repository_synced(cli, "default", "fleet-wide", 3, CONVERGE).await?;
        let synced_latency = t0.elapsed();
        println!(
            "2. POLICY CHANGE LATENCY: apply -> all 3 agents acked the new generation in {ack_latency:?} \
             as polled from the hub (per cluster {acked:?}); applied per the agents' logs: {}; \
             -> synced on all 3 in {synced_latency:?}",
            from_logs.join(", ")
        );
        for agent in [&self.agent1, &self.agent2, &self.agent3] {
            assert_eq!(
                mirror_digest(agent, "team/fleet", "v1").await?,
                self.images.fleet.manifest_digest
            );
        }
        Ok(())
    }

    /// Step 3: SIGKILL the replica edge-2 is connected to; edge-2 fails over.
    async fn an_agent_fails_over_when_its_hub_dies(&mut self) -> Result<()> {
        let replica = cluster_statuses(&self.cli).await?["edge-2"]["hubReplica"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let (victim, survivor) = if self.hub_a.is_replica(&replica) {
            (&mut self.hub_a, self.hub_b.url())
        } else if self.hub_b.is_replica(&replica) {
            (&mut self.hub_b, self.hub_a.url())
        } else {
            bail!(
                "edge-2's hubReplica {replica:?} names neither hub (pids {:?}, {:?})",
                self.hub_a.pid(),
                self.hub_b.pid()
            );
        };
        println!(
            "3. edge-2 is on replica {replica}; SIGKILL {} (pid {:?})",
            victim.url(),
            victim.pid()
        );
        victim.kill();
        let live = self.cli.with_hub(&survivor);
        wait_until(
            "edge-2 reconnected to the surviving replica",
            CONVERGE,
            || {
                let live = live.clone();
                let replica = replica.clone();
                async move {
                    let s = &cluster_statuses(&live).await?["edge-2"];
                    Ok(s["phase"] == "Connected"
                        && s["hubReplica"]
                            .as_str()
                            .is_some_and(|r| !r.is_empty() && r != replica))
                }
            },
        )
        .await?;
        // A change made after the failover reaches edge-2 (the resolver moved too, if needed).
        live.apply_yaml(&repository(
            "after-failover",
            "team/fleet",
            "v1",
            "    clusters: [edge-2]\n",
        ))
        .await?;
        wait_repository_synced(&live, "default", "after-failover", 1, CONVERGE).await?;
        wait_repository_synced(&live, "default", "nginx-latest", 2, CONVERGE).await?;
        wait_repository_synced(&live, "default", "west-only", 1, CONVERGE).await?;
        victim.restart().await?;
        println!("3. failover done at {:?}", self.started.elapsed());
        Ok(())
    }

    /// Step 4: cut edge-1's link to the hubs in the middle of a transfer.
    async fn a_transfer_survives_a_cut_link(&self) -> Result<()> {
        let cli = &self.cli;
        let upstream = &self.upstream;
        upstream.set_throttle(Some(512 << 10));
        cli.apply_yaml(&repository(
            "big-east",
            "team/big",
            "v1",
            "    clusters: [edge-1]\n",
        ))
        .await?;
        wait_phase(cli, "big-east", "edge-1", "Syncing", 1).await?;
        // Both refuse before either cuts, so that edge-1 cannot reconnect through the other.
        for link in [&self.link_a, &self.link_b] {
            link.set_refuse(true);
        }
        for link in [&self.link_a, &self.link_b] {
            link.cut();
        }
        let moved = upstream.bytes_to_client();
        wait_until("the transfer going on after the cut", CONVERGE, || async {
            Ok(upstream.bytes_to_client() > moved + (256 << 10))
        })
        .await?;
        upstream.set_throttle(None);
        let big = &self.images.big;
        wait_mirror_serves(&self.agent1, "team/big", "v1", &big.manifest_digest).await?;
        // The hub heard nothing since the cut, so it cannot claim Synced yet.
        assert_ne!(
            image_phase(cli, "big-east", "edge-1").await?.map(|p| p.0),
            Some("Synced".to_owned()),
            "the hub shows Synced although edge-1 could not report it"
        );
        // After --offline-after of silence the hub shows edge-1 Offline, and its images'
        // states as last known, never as current.
        wait_until("the hub showing edge-1 Offline", CONVERGE, || async {
            Ok(cluster_statuses(cli).await?["edge-1"]["phase"] == "Offline")
        })
        .await?;
        let repo = cli.get_json(&["repository", "big-east"]).await?;
        let entries: Vec<&Value> = repo["status"]["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["cluster"] == "edge-1")
            .collect();
        assert!(!entries.is_empty(), "no edge-1 entry in {repo}");
        for entry in entries {
            assert_eq!(
                entry["lastKnown"], true,
                "offline edge-1 shown as current: {entry}"
            );
            assert_ne!(
                entry["phase"], "Synced",
                "offline edge-1 claimed Synced: {entry}"
            );
        }
        self.link_a.set_refuse(false);
        self.link_b.set_refuse(false);
        wait_repository_synced(cli, "default", "big-east", 1, CONVERGE).await?;
        println!(
            "4. link cut mid-transfer handled at {:?}",
            self.started.elapsed()
        );
        Ok(())
    }

    /// Step 5: all hubs down; edge-1 SIGKILLed mid-transfer and restarted offline.
    async fn an_agent_restarted_without_hubs_serves_and_finishes(&mut self) -> Result<()> {
        let cli = &self.cli;
        self.upstream.set_throttle(Some(64 << 10));
        cli.apply_yaml(&repository(
            "pending-east",
            "team/pending",
            "v1",
            "    clusters: [edge-1]\n",
        ))
        .await?;
        wait_phase(cli, "pending-east", "edge-1", "Syncing", 1).await?;
        self.hub_a.kill();
        self.hub_b.kill();
        self.agent1.kill();
        self.agent1.restart().await?;
        let Images {
            nginx,
            fleet,
            big,
            pending,
            ..
        } = &self.images;
        for (repo, tag, image) in [
            ("library/nginx", "latest", nginx),
            ("team/big", "v1", big),
            ("team/fleet", "v1", fleet),
        ] {
            assert_eq!(
                mirror_digest(&self.agent1, repo, tag).await?,
                image.manifest_digest,
                "edge-1 restarted without hubs no longer serves {repo}:{tag}"
            );
        }
        self.upstream.set_throttle(None);
        wait_mirror_serves(&self.agent1, "team/pending", "v1", &pending.manifest_digest).await?;
        self.hub_a.restart().await?;
        self.hub_b.restart().await?;
        wait_repository_synced(cli, "default", "pending-east", 1, CONVERGE).await?;
        wait_repository_synced(cli, "default", "nginx-latest", 2, CONVERGE).await?;
        println!("5. offline restart handled at {:?}", self.started.elapsed());
        Ok(())
    }

    /// Step 6: no agent ever received another cluster's images.
    async fn no_agent_holds_another_clusters_images(&self) {
        let Images {
            nginx,
            west,
            big,
            pending,
            ..
        } = &self.images;
        assert_not_held(&self.agent1, "team/west", "v1", west).await;
        for (repo, image) in [("team/big", big), ("team/pending", pending)] {
            assert_not_held(&self.agent2, repo, "v1", image).await;
            assert_not_held(&self.agent3, repo, "v1", image).await;
        }
        assert_not_held(&self.agent3, "library/nginx", "latest", nginx).await;
        assert_not_held(&self.agent3, "team/west", "v1", west).await;
    }
}

/// Whether the agent's content store holds the blob `digest`.
fn has_blob(data_dir: &Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    data_dir.join("blobs/sha256").join(hex).is_file()
}

/// Number of complete blobs in the agent's content store.
fn blob_count(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("blobs/sha256"))
        .map(|d| d.filter_map(Result::ok).count())
        .unwrap_or(0)
}

/// Asserts that the agent stores none of `image`'s blobs and its mirror does not serve it.
async fn assert_not_held(agent: &AgentProcess, repo: &str, tag: &str, image: &PushedImage) {
    for digest in image.blob_digests() {
        assert!(
            !has_blob(agent.data_dir(), &digest),
            "agent {} stores blob {digest} of {repo}:{tag}, which is not placed on it",
            agent.data_dir().display()
        );
    }
    let status = agent
        .manifest_status(repo, tag)
        .await
        .expect("ask the mirror");
    assert_eq!(
        status,
        404,
        "mirror {} serves {repo}:{tag}, which is not placed on it",
        agent.mirror_addr()
    );
}

/// The manifest digest skopeo reads for `repo:tag` from the agent's mirror.
async fn mirror_digest(agent: &AgentProcess, repo: &str, tag: &str) -> Result<String> {
    skopeo::inspect_digest(
        &agent.docker_ref(&format!("{repo}:{tag}")),
        &["--tls-verify=false"],
    )
    .await
}

/// `status` of every Cluster by name.
async fn cluster_statuses(cli: &Cli) -> Result<BTreeMap<String, Value>> {
    let list = cli.get_json(&["clusters"]).await?;
    let items = list["items"]
        .as_array()
        .with_context(|| format!("get clusters -o json: no items: {list}"))?;
    Ok(items
        .iter()
        .map(|c| {
            (
                c["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                c["status"].clone(),
            )
        })
        .collect())
}

fn applied_generation(status: &Value) -> u64 {
    status["appliedGeneration"].as_u64().unwrap_or(0)
}

/// The phase the hub shows for `cluster` in Repository `name` (first digest), if any.
async fn image_phase(cli: &Cli, name: &str, cluster: &str) -> Result<Option<(String, u64)>> {
    let repo = cli.get_json(&["repository", name]).await?;
    Ok(repo["status"]["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["cluster"] == cluster)
        .map(|c| {
            (
                c["phase"].as_str().unwrap_or("").to_owned(),
                c["bytesDone"].as_u64().unwrap_or(0),
            )
        }))
}

async fn wait_phase(
    cli: &Cli,
    name: &str,
    cluster: &str,
    want: &str,
    min_bytes: u64,
) -> Result<()> {
    wait_until(
        &format!("hub showing {cluster} {want} on {name} with at least {min_bytes} bytes"),
        CONVERGE,
        move || async move {
            Ok(matches!(image_phase(cli, name, cluster).await?,
                Some((phase, bytes)) if phase == want && bytes >= min_bytes))
        },
    )
    .await
}

/// Waits until the mirror serves `repo:tag` with the manifest digest `want`.
async fn wait_mirror_serves(agent: &AgentProcess, repo: &str, tag: &str, want: &str) -> Result<()> {
    wait_until(
        &format!("mirror {} serving {repo}:{tag}", agent.mirror_addr()),
        CONVERGE,
        move || async move {
            if agent.manifest_status(repo, tag).await? != 200 {
                return Ok(false);
            }
            let got = mirror_digest(agent, repo, tag).await?;
            if got != want {
                bail!("mirror serves {got}, upstream has {want}");
            }
            Ok(true)
        },
    )
    .await
}

/// Seconds since the Unix epoch of a log timestamp `YYYY-MM-DDTHH:MM:SS[.f]Z` (UTC).
fn parse_utc(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    // Days from 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + min * 60) as f64 + sec)
}

/// When (seconds since the epoch) the agent's log first says it applied a desired set of a
/// generation above `above`: the agent persists the set, then acks it.
fn applied_at(log: &Path, above: u64) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|line| {
        let rest = line.split("Applied desired set generation=").nth(1)?;
        let generation: u64 = rest.split_whitespace().next()?.parse().ok()?;
        (generation > above).then(|| parse_utc(line.split_whitespace().next()?))?
    })
}

fn proxy_url(proxy: &FaultProxy) -> String {
    format!("https://{}", proxy.addr())
}

fn hub_addr(hub: &HubProcess) -> Result<SocketAddr> {
    format!("127.0.0.1:{}", hub.port())
        .parse()
        .context("hub address")
}

#[test]
fn log_timestamps_parse() {
    assert_eq!(parse_utc("1970-01-01T00:00:01.5Z"), Some(1.5));
    assert_eq!(parse_utc("2026-11-26T01:10:46Z"), Some(1_795_655_446.0));
    assert_eq!(parse_utc("2000-02-29T23:59:59Z"), Some(951_868_799.0));
    assert_eq!(parse_utc("2026-11-26 01:10:46"), None);
}
