//! The hub side of the agent session (`AgentService.Connect`): identity from
//! the client certificate, the full desired set or nothing on connect, deltas
//! as the stored desired set changes, acks, progress and heartbeats; plus the
//! background parts that serve it: the desired-set controller, a cache of the
//! stored desired sets, the coalescing status writer and the offline sweeper.
//!
//! Sessions learn about changes only from the stored desired sets (kind
//! "desiredsets"), never from the controller directly, so a change computed by
//! one hub replica reaches agents connected to any replica.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use imgfleet::api::v1 as pb;
use imgfleet::api::v1::agent_message::Msg as AgentMsg;
use imgfleet::api::v1::hub_message::Msg as HubMsg;
use imgfleet::model::{self, ClusterStatus, DEFAULT_NAMESPACE, ImagePhase, Kind, Object};
use imgfleet_common::pki::Identity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::fleet::{self, DESIRED_KIND, DesiredContent, StoredDesiredSet, StoredImage};
use crate::objects::{ObjectError, Objects};
use crate::server::{Extensions, HubContext};
use crate::status::{self, ImageState, LiveCluster};
use crate::store::{StoreError, WatchEvent};

/// How often each side sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Silence after which the hub ends a session (three heartbeats).
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
/// How long the first message (Hello) may take.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Store writes per cluster are coalesced to at most one per this interval.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How long the desired sets must stay unchanged before the status writer
/// makes its pass over every cluster.
const DESIRED_SETTLE: Duration = Duration::from_millis(500);
/// Longest the status writer holds back while desired sets keep changing.
const MAX_DEFER: Duration = Duration::from_secs(2);
/// Most image states kept per session; an agent reporting more is misbehaving.
const MAX_IMAGES: usize = 100_000;

type DesiredMap = Arc<BTreeMap<String, Arc<StoredDesiredSet>>>;
type ClusterDesired = Option<Arc<StoredDesiredSet>>;

struct LiveEntry {
    session: u64,
    state: LiveCluster,
    /// Cluster status fields changed since the last flush.
    dirty: bool,
    /// Image states changed since the last flush.
    images_dirty: bool,
    ended: bool,
    last_flush: Option<Instant>,
    last_heard: Instant,
}

/// State shared by the service and the background tasks of one hub.
pub struct Shared {
    replica: String,
    offline_after: Duration,
    epoch: watch::Sender<Option<String>>,
    /// Every stored desired set; for the status writer and readiness.
    desired: watch::Sender<Option<DesiredMap>>,
    /// Each cluster's stored desired set, so that a change wakes only the
    /// session of that cluster (a fleet-wide change is one wake-up per
    /// session, not one per session per changed cluster).
    per_cluster: Mutex<HashMap<String, watch::Sender<ClusterDesired>>>,
    desired_changed: AtomicBool,
    /// When the desired sets last changed, for the status writer's debounce.
    desired_changed_at: Mutex<Option<Instant>>,
    live: Mutex<HashMap<String, LiveEntry>>,
    next_session: AtomicU64,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// The id of this hub replica as shown in `Cluster.status.hubReplica`:
/// host name, process id and a counter (several hubs may share a process in tests).
pub fn replica_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hub".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    if n == 0 {
        format!("{host}-{}", std::process::id())
    } else {
        format!("{host}-{}-{n}", std::process::id())
    }
}

impl Shared {
    pub fn new(offline_after: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            replica: replica_id(),
            offline_after,
            epoch: watch::Sender::new(None),
            desired: watch::Sender::new(None),
            per_cluster: Mutex::new(HashMap::new()),
            desired_changed: AtomicBool::new(false),
            desired_changed_at: Mutex::new(None),
            live: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            tracker: TaskTracker::new(),
        })
    }

    fn with_live<R>(&self, f: impl FnOnce(&mut HashMap<String, LiveEntry>) -> R) -> R {
        let mut guard = match self.live.lock() {
            Ok(g) => g,
            // A panic while holding the lock leaves plain data behind; keep going.
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    fn with_per_cluster<R>(
        &self,
        f: impl FnOnce(&mut HashMap<String, watch::Sender<ClusterDesired>>) -> R,
    ) -> R {
        let mut guard = match self.per_cluster.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// The channel of one cluster's stored desired set.
    fn subscribe_cluster(&self, cluster: &str) -> watch::Receiver<ClusterDesired> {
        self.with_per_cluster(|map| {
            map.entry(cluster.to_string())
                .or_insert_with(|| watch::Sender::new(None))
                .subscribe()
        })
    }

    /// Sets one cluster's stored desired set; its session wakes only when
    /// the generation changed. Unless `relist`, a set never replaces a newer
    /// generation: the controller hands its sets over before the store's
    /// watch delivers them, and an older event still in flight must not
    /// take an agent back.
    fn set_cluster(
        map: &mut HashMap<String, watch::Sender<ClusterDesired>>,
        cluster: &str,
        set: ClusterDesired,
        relist: bool,
    ) {
        let tx = match map.get(cluster) {
            Some(tx) => tx,
            None => map
                .entry(cluster.to_string())
                .or_insert_with(|| watch::Sender::new(None)),
        };
        tx.send_if_modified(|cur| {
            let take = match (cur.as_ref(), set.as_ref()) {
                (Some(a), Some(b)) if relist => a.generation != b.generation,
                (Some(a), Some(b)) => b.generation > a.generation,
                (None, None) => false,
                _ => true,
            };
            if take {
                *cur = set;
            }
            take
        });
    }

    /// The set a cluster's channel holds if it is of `generation`.
    fn held_set(&self, cluster: &str, generation: u64) -> ClusterDesired {
        self.with_per_cluster(|map| {
            map.get(cluster)
                .and_then(|tx| tx.borrow().clone())
                .filter(|s| s.generation == generation)
        })
    }

    /// Update this session's live entry (ignored once a newer session for the
    /// same cluster took over).
    fn update(&self, cluster: &str, session: u64, f: impl FnOnce(&mut LiveEntry)) {
        self.with_live(|live| {
            if let Some(e) = live.get_mut(cluster).filter(|e| e.session == session) {
                e.last_heard = Instant::now();
                e.state.last_seen = Some(now());
                f(e);
            }
        });
    }
}

/// Registers the agent service and its background tasks (controller, desired
/// set cache, status writer, offline sweeper) with a hub.
pub fn register(extensions: &mut Extensions, config: &Config) {
    let shared = Shared::new(config.offline_after);
    let for_service = shared.clone();
    extensions.services.push(Box::new(move |ctx, routes| {
        routes.add_service(pb::agent_service_server::AgentServiceServer::new(
            AgentService {
                objects: ctx.objects.clone(),
                shared: for_service,
                shutdown: ctx.shutdown.clone(),
            },
        ));
    }));
    extensions
        .tasks
        .push(Box::new(move |ctx| Box::pin(run_background(ctx, shared))));
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct AgentService {
    objects: Objects,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentService {
    type ConnectStream = ReceiverStream<Result<pb::HubMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let cluster = match imgfleet_common::tls::peer_identity(&request) {
            Ok(Identity::Cluster(name)) => name,
            Ok(other) => {
                return Err(Status::permission_denied(format!(
                    "the agent API needs a cluster certificate; this one is for {other}"
                )));
            }
            Err(e) => {
                return Err(Status::unauthenticated(format!(
                    "the agent API needs a cluster certificate issued by the hub's CA: {e}"
                )));
            }
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "cluster {cluster}: no Hello within {HELLO_TIMEOUT:?}"
                ))
            })??;
        let hello = match first.and_then(|m| m.msg) {
            Some(AgentMsg::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "cluster {cluster}: the first message must be a Hello"
                )));
            }
        };
        if hello.cluster_name != cluster {
            return Err(Status::permission_denied(format!(
                "certificate is for cluster {cluster}, hello claims {}",
                hello.cluster_name
            )));
        }
        match self.objects.get(Kind::Cluster, None, &cluster).await {
            Ok(_) => {}
            Err(ObjectError::NotFound(_)) => {
                return Err(Status::not_found(format!(
                    "cluster {cluster} is not enrolled (no Cluster object)"
                )));
            }
            Err(ObjectError::Unavailable(m)) => return Err(Status::unavailable(m)),
            Err(e) => return Err(Status::internal(e.to_string())),
        }
        let epoch = wait_ready(&self.shared.epoch, Duration::from_secs(10))
            .await
            .ok_or_else(|| Status::unavailable("the hub is still starting; try again"))?;
        wait_ready(&self.shared.desired, Duration::from_secs(10))
            .await
            .ok_or_else(|| Status::unavailable("the hub is still starting; try again"))?;

        let session = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        let storage = hello.storage.unwrap_or_default();
        self.shared.with_live(|live| {
            live.insert(
                cluster.clone(),
                LiveEntry {
                    session,
                    state: LiveCluster {
                        last_seen: Some(now()),
                        agent_version: hello.agent_version.clone(),
                        storage_used_bytes: storage.used_bytes,
                        storage_capacity_bytes: storage.capacity_bytes,
                        applied_generation: if hello.current_epoch == epoch {
                            hello.current_generation
                        } else {
                            0
                        },
                        images: BTreeMap::new(),
                    },
                    dirty: true,
                    images_dirty: true,
                    ended: false,
                    last_flush: None,
                    last_heard: Instant::now(),
                },
            );
        });
        info!(cluster = %cluster, agent_version = %hello.agent_version,
              generation = hello.current_generation, "Agent connected");
        let (tx, rx) = mpsc::channel(16);
        let s = Session {
            objects: self.objects.clone(),
            shared: self.shared.clone(),
            cluster,
            session,
            epoch,
            tx,
        };
        let token = self.shutdown.clone();
        self.shared.tracker.spawn(s.run(
            hello.current_epoch,
            hello.current_generation,
            inbound,
            token,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn wait_ready<T: Clone>(tx: &watch::Sender<Option<T>>, limit: Duration) -> Option<T> {
    let mut rx = tx.subscribe();
    tokio::time::timeout(limit, rx.wait_for(Option::is_some))
        .await
        .ok()?
        .ok()
        .and_then(|v| v.clone())
}

struct Session {
    objects: Objects,
    shared: Arc<Shared>,
    cluster: String,
    session: u64,
    epoch: String,
    tx: mpsc::Sender<Result<pb::HubMessage, Status>>,
}

impl Session {
    async fn run(
        self,
        held_epoch: String,
        held_generation: u64,
        mut inbound: Streaming<pb::AgentMessage>,
        shutdown: CancellationToken,
    ) {
        let mut desired_rx = self.shared.subscribe_cluster(&self.cluster);
        let current = desired_rx.borrow_and_update().clone();
        // What the agent holds, as far as this session knows.
        let mut held: ClusterDesired = None;
        if let Some(cur) = current {
            if held_epoch == self.epoch && held_generation == cur.generation {
                debug!(cluster = %self.cluster, generation = cur.generation, "Agent is up to date");
            } else if !self.send_full(&cur).await {
                self.end();
                return;
            }
            held = Some(cur);
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let mut seq = 0u64;
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        last_heard = Instant::now();
                        self.handle(m);
                    }
                    Ok(None) => {
                        info!(cluster = %self.cluster, "Agent closed the session");
                        break;
                    }
                    Err(e) => {
                        warn!(cluster = %self.cluster, error = %e, "Agent session broke");
                        break;
                    }
                },
                changed = desired_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let Some(cur) = desired_rx.borrow_and_update().clone() else { continue };
                    let sent = match &held {
                        Some(h) if h.generation == cur.generation => true,
                        Some(h) if cur.generation > h.generation => self.send_delta(h, &cur).await,
                        _ => self.send_full(&cur).await,
                    };
                    if !sent {
                        break;
                    }
                    held = Some(cur);
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() >= DEAD_AFTER {
                        warn!(cluster = %self.cluster, silent = ?last_heard.elapsed(), "Agent silent; ending its session");
                        break;
                    }
                    seq += 1;
                    let msg = HubMsg::Heartbeat(pb::Heartbeat {
                        sent_at: Some(imgfleet::convert::time_to_proto(&now())),
                        seq,
                    });
                    if !self.send(msg).await {
                        break;
                    }
                }
            }
        }
        self.end();
    }

    fn end(&self) {
        self.shared.with_live(|live| {
            if let Some(e) = live
                .get_mut(&self.cluster)
                .filter(|e| e.session == self.session)
            {
                e.ended = true;
            }
        });
    }

    async fn send(&self, msg: HubMsg) -> bool {
        self.tx
            .send(Ok(pb::HubMessage { msg: Some(msg) }))
            .await
            .is_ok()
    }

    fn handle(&self, m: pb::AgentMessage) {
        match m.msg {
            Some(AgentMsg::Ack(ack)) => {
                if !ack.error.is_empty() {
                    warn!(cluster = %self.cluster, generation = ack.generation, error = %ack.error,
                          "Agent could not apply the desired set");
                    self.shared.update(&self.cluster, self.session, |_| {});
                } else if ack.epoch == self.epoch {
                    debug!(cluster = %self.cluster, generation = ack.generation, "Agent acked");
                    self.shared.update(&self.cluster, self.session, |e| {
                        e.state.applied_generation = ack.generation;
                        e.dirty = true;
                    });
                }
            }
            Some(AgentMsg::Progress(p)) => {
                self.shared.update(&self.cluster, self.session, |e| {
                    if let Some(s) = &p.storage {
                        e.state.storage_used_bytes = s.used_bytes;
                        e.state.storage_capacity_bytes = s.capacity_bytes;
                    }
                    for img in p.images {
                        if e.state.images.len() >= MAX_IMAGES
                            && !e.state.images.contains_key(&img.key)
                        {
                            continue;
                        }
                        e.state.images.insert(img.key.clone(), image_state(&img));
                    }
                    e.dirty = true;
                    e.images_dirty = true;
                });
            }
            Some(AgentMsg::Heartbeat(_)) => {
                self.shared.update(&self.cluster, self.session, |e| {
                    e.dirty = true;
                });
            }
            Some(AgentMsg::Hello(_)) | None => {
                self.shared.update(&self.cluster, self.session, |_| {});
            }
        }
    }

    async fn credentials(&self, keys: &[String]) -> Vec<pb::RegistryCredential> {
        let mut out = Vec::new();
        for key in keys {
            match credential(&self.objects, key).await {
                Ok(c) => out.push(c),
                Err(e) => warn!(cluster = %self.cluster, registry = %key, error = %e,
                                "Registry credential left out of the desired set"),
            }
        }
        out
    }

    async fn send_full(&self, set: &StoredDesiredSet) -> bool {
        let keys: Vec<String> = set
            .content
            .registries
            .iter()
            .map(|r| r.key.clone())
            .collect();
        let registries = self.credentials(&keys).await;
        info!(cluster = %self.cluster, generation = set.generation,
              images = set.content.images.len(), "Sending full desired set");
        self.send(HubMsg::DesiredSet(pb::DesiredSet {
            generation: set.generation,
            epoch: self.epoch.clone(),
            images: set.content.images.iter().map(image_to_pb).collect(),
            registries,
        }))
        .await
    }

    async fn send_delta(&self, old: &StoredDesiredSet, new: &StoredDesiredSet) -> bool {
        let d = delta(&old.content, &new.content);
        let registry_upserts = self.credentials(&d.registry_upserts).await;
        // Debug, not info: a fleet-wide change would log one line per agent.
        debug!(cluster = %self.cluster, from = old.generation, generation = new.generation,
              upserts = d.upserts.len(), removals = d.removals.len(), "Sending desired-set delta");
        self.send(HubMsg::Delta(pb::DesiredSetDelta {
            from_generation: old.generation,
            generation: new.generation,
            epoch: self.epoch.clone(),
            upserts: d.upserts.iter().map(image_to_pb).collect(),
            removals: d.removals,
            registry_upserts,
            registry_removals: d.registry_removals,
        }))
        .await
    }
}

/// Changes between two stored desired sets (registries by key and fingerprint).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContentDelta {
    pub upserts: Vec<StoredImage>,
    pub removals: Vec<String>,
    pub registry_upserts: Vec<String>,
    pub registry_removals: Vec<String>,
}

/// The changes that turn `old` into `new`; a registry whose credential
/// fingerprint changed is sent again.
pub fn delta(old: &DesiredContent, new: &DesiredContent) -> ContentDelta {
    let old_images: BTreeMap<&str, &StoredImage> =
        old.images.iter().map(|i| (i.key.as_str(), i)).collect();
    let new_images: BTreeMap<&str, &StoredImage> =
        new.images.iter().map(|i| (i.key.as_str(), i)).collect();
    let old_regs: BTreeMap<&str, &str> = old
        .registries
        .iter()
        .map(|r| (r.key.as_str(), r.fingerprint.as_str()))
        .collect();
    let new_regs: BTreeMap<&str, &str> = new
        .registries
        .iter()
        .map(|r| (r.key.as_str(), r.fingerprint.as_str()))
        .collect();
    ContentDelta {
        upserts: new_images
            .iter()
            .filter(|(k, v)| old_images.get(*k) != Some(*v))
            .map(|(_, v)| (*v).clone())
            .collect(),
        removals: old_images
            .keys()
            .filter(|k| !new_images.contains_key(*k))
            .map(|k| k.to_string())
            .collect(),
        registry_upserts: new_regs
            .iter()
            .filter(|(k, v)| old_regs.get(*k) != Some(*v))
            .map(|(k, _)| k.to_string())
            .collect(),
        registry_removals: old_regs
            .keys()
            .filter(|k| !new_regs.contains_key(*k))
            .map(|k| k.to_string())
            .collect(),
    }
}

fn image_to_pb(i: &StoredImage) -> pb::DesiredImage {
    pb::DesiredImage {
        key: i.key.clone(),
        source: Some(pb::ObjectRef {
            name: i.source_name.clone(),
            namespace: i.source_namespace.clone(),
        }),
        registry_key: i.registry_key.clone(),
        registry: i.registry.clone(),
        repository: i.repository.clone(),
        digest: i.digest.clone(),
        tags: i.tags.clone(),
        platforms: i.platforms.clone(),
        keep_versions: i.keep_versions,
        grace_period_seconds: i.grace_period_seconds,
    }
}

fn image_state(p: &pb::ImageProgress) -> ImageState {
    let phase = match pb::ImagePhase::try_from(p.phase) {
        Ok(pb::ImagePhase::Pending) => Some(ImagePhase::Pending),
        Ok(pb::ImagePhase::Syncing) => Some(ImagePhase::Syncing),
        Ok(pb::ImagePhase::Synced) => Some(ImagePhase::Synced),
        Ok(pb::ImagePhase::Failed) => Some(ImagePhase::Failed),
        Ok(pb::ImagePhase::Offline) | Ok(pb::ImagePhase::Unspecified) | Err(_) => None,
    };
    ImageState {
        digest: p.digest.clone(),
        phase,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        layers_done: p.layers_done,
        layers_total: p.layers_total,
        message: Some(p.message.clone()).filter(|m| !m.is_empty()),
        updated_at: p
            .updated_at
            .as_ref()
            .and_then(imgfleet::convert::time_from_proto),
        next_retry_time: p
            .next_retry_time
            .as_ref()
            .and_then(imgfleet::convert::time_from_proto),
    }
}

/// The credential for registry key `<namespace>/<name>`, password opened.
async fn credential(objects: &Objects, key: &str) -> Result<pb::RegistryCredential, String> {
    let (ns, name) = key
        .split_once('/')
        .ok_or_else(|| format!("registry key {key:?}: expected <namespace>/<name>"))?;
    let rs = match objects
        .get(Kind::RegistrySecret, Some(ns), name)
        .await
        .map_err(|e| e.to_string())?
    {
        Object::RegistrySecret(rs) => rs,
        _ => {
            return Err(format!(
                "RegistrySecret {key}: stored object has another kind"
            ));
        }
    };
    let password = objects.password(&rs).map_err(|e| e.to_string())?;
    Ok(pb::RegistryCredential {
        key: key.to_string(),
        domain: rs.spec.domain.clone(),
        username: rs.spec.username.clone().unwrap_or_default(),
        password: password.map(|p| p.to_string()).unwrap_or_default(),
        insecure: rs.spec.insecure,
        provider: match rs.spec.provider {
            model::Provider::Harbor => pb::Provider::Harbor,
            model::Provider::Dockerhub => pb::Provider::Dockerhub,
            model::Provider::Aliyun => pb::Provider::Aliyun,
            model::Provider::Generic => pb::Provider::Generic,
        } as i32,
    })
}

// ---------------------------------------------------------------------------
// Background: epoch, controller, desired-set cache, status writer, sweeper
// ---------------------------------------------------------------------------

async fn run_background(ctx: HubContext, shared: Arc<Shared>) -> Result<(), String> {
    let HubContext {
        objects,
        placement,
        shutdown,
        ..
    } = ctx;
    let epoch = async {
        loop {
            match fleet::ensure_epoch(objects.store().as_ref()).await {
                Ok(e) => {
                    shared.epoch.send_replace(Some(e));
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "Reading the hub epoch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    };
    let (_, controller, ()) = tokio::join!(
        epoch,
        fleet::run(
            objects.clone(),
            placement,
            {
                let shared = shared.clone();
                Arc::new(move |written: &[(String, Arc<StoredDesiredSet>)]| {
                    shared.with_per_cluster(|channels| {
                        for (name, set) in written {
                            Shared::set_cluster(channels, name, Some(set.clone()), false);
                        }
                    });
                })
            },
            shutdown.clone(),
        ),
        async {
            tokio::join!(
                desired_cache(&objects, &shared, &shutdown),
                status_writer(&objects, &shared, &shutdown),
                sweeper(&objects, &shared, &shutdown),
            );
        }
    );
    shared.tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), shared.tracker.wait()).await;
    controller
}

/// Keeps `shared.desired` and the per-cluster channels equal to the stored
/// desired sets.
async fn desired_cache(objects: &Objects, shared: &Shared, shutdown: &CancellationToken) {
    use futures::FutureExt as _;
    let store = objects.store().clone();
    loop {
        let (items, rev) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = store.list(DESIRED_KIND, None) => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "Listing desired sets failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let mut map: BTreeMap<String, Arc<StoredDesiredSet>> = BTreeMap::new();
        for v in &items {
            match fleet::decode_desired(&v.key.name, &v.value) {
                Ok(s) => {
                    map.insert(v.key.name.clone(), Arc::new(s));
                }
                Err(e) => warn!(error = %e, "Skipping an unreadable desired set"),
            }
        }
        shared.with_per_cluster(|channels| {
            for (name, set) in &map {
                Shared::set_cluster(channels, name, Some(set.clone()), true);
            }
            for (name, tx) in channels.iter() {
                if !map.contains_key(name) {
                    tx.send_replace(None);
                }
            }
        });
        publish(shared, &map);
        let mut stream = match store.watch(DESIRED_KIND, rev).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "Watching desired sets failed; relisting");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        'events: loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = stream.next() => n,
            };
            // Take every event that is already there before publishing the
            // whole map: a fleet-wide change arrives as thousands of events.
            let mut next = first;
            let burst_start = Instant::now();
            let mut burst = 0usize;
            loop {
                burst += 1;
                match next {
                    Some(Ok(WatchEvent::Put(v))) => {
                        // Sets this replica wrote are already in their
                        // channel: reuse them instead of decoding again.
                        let known = fleet::peek_generation(&v.value)
                            .and_then(|g| shared.held_set(&v.key.name, g));
                        let decoded = match known {
                            Some(s) => Ok(s),
                            None => fleet::decode_desired(&v.key.name, &v.value).map(Arc::new),
                        };
                        match decoded {
                            Ok(s) => {
                                shared.with_per_cluster(|c| {
                                    Shared::set_cluster(c, &v.key.name, Some(s.clone()), false)
                                });
                                map.insert(v.key.name.clone(), s);
                            }
                            Err(e) => warn!(error = %e, "Skipping an unreadable desired set"),
                        }
                    }
                    Some(Ok(WatchEvent::Delete(v))) => {
                        shared
                            .with_per_cluster(|c| Shared::set_cluster(c, &v.key.name, None, false));
                        map.remove(&v.key.name);
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "Desired-set watch broke; relisting");
                        break 'events;
                    }
                    None => break 'events,
                }
                // Unconstrained: tokio's cooperative budget would otherwise
                // end the drain every 128 events and publish the whole map
                // each time.
                match tokio::task::unconstrained(stream.next()).now_or_never() {
                    Some(n) => next = n,
                    None => break,
                }
            }
            publish(shared, &map);
            if burst >= 100 {
                info!(
                    changes = burst,
                    elapsed_ms = burst_start.elapsed().as_millis(),
                    "Desired sets handed to sessions"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn publish(shared: &Shared, map: &BTreeMap<String, Arc<StoredDesiredSet>>) {
    shared.desired.send_replace(Some(Arc::new(map.clone())));
    shared.desired_changed.store(true, Ordering::SeqCst);
    if let Ok(mut at) = shared.desired_changed_at.lock() {
        *at = Some(Instant::now());
    }
}

/// Read-modify-write of an object's status, retried when another writer (the
/// tag resolver, another replica) changed the object in between. `f` returns
/// false when nothing needs writing.
async fn update_status(
    objects: &Objects,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
    f: impl Fn(&mut Object) -> bool,
) -> Result<bool, ObjectError> {
    for _ in 0..8 {
        let mut obj = objects.get(kind, namespace, name).await?;
        let rev = obj
            .metadata()
            .resource_version
            .as_deref()
            .and_then(|r| r.parse::<u64>().ok());
        if !f(&mut obj) {
            return Ok(false);
        }
        match objects.write_status(&obj, rev).await {
            Ok(_) => return Ok(true),
            Err(ObjectError::Stale { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ObjectError::Contended(model::object_id(
        kind, namespace, name,
    )))
}

/// What the status writer last read or wrote of each Cluster, so that a
/// heartbeat that changes nothing costs no store access. Refreshed by one
/// list when older than [`STATUS_CACHE_TTL`]; an entry that turns out stale
/// fails its conditional write and is re-read.
#[derive(Default)]
struct StatusCache {
    clusters: HashMap<String, (model::Cluster, u64)>,
    listed: Option<Instant>,
}

/// How long the status writer trusts its cached Cluster objects.
const STATUS_CACHE_TTL: Duration = Duration::from_secs(30);
/// Above this many uncached clusters one list is cheaper than many gets.
const LIST_ABOVE: usize = 32;

impl StatusCache {
    async fn fill(&mut self, objects: &Objects, names: &[String]) -> Result<(), ObjectError> {
        let expired = self.listed.is_none_or(|t| t.elapsed() >= STATUS_CACHE_TTL);
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !self.clusters.contains_key(*n))
            .collect();
        if expired || missing.len() > LIST_ABOVE {
            let (list, _) = objects.list(Kind::Cluster, None).await?;
            self.clusters.clear();
            for obj in list {
                if let Object::Cluster(c) = obj {
                    let rev = revision_of(&c.metadata);
                    let name = c.metadata.name.clone().unwrap_or_default();
                    self.clusters.insert(name, (c, rev));
                }
            }
            self.listed = Some(Instant::now());
            return Ok(());
        }
        for name in missing {
            match objects.get(Kind::Cluster, None, name).await {
                Ok(Object::Cluster(c)) => {
                    let rev = revision_of(&c.metadata);
                    self.clusters.insert(name.clone(), (c, rev));
                }
                Ok(_) | Err(ObjectError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn revision_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Whether `next` differs from `prev` in more than a `lastSeen` that was
/// stored recently enough. Refreshing `lastSeen` on every heartbeat would be
/// a store write per agent every few seconds; the offline sweeper only needs
/// it fresher than `offline_after`.
fn worth_writing(prev: &ClusterStatus, next: &ClusterStatus, refresh: Duration) -> bool {
    if prev == next {
        return false;
    }
    let mut same_but_seen = next.clone();
    same_but_seen.last_seen = prev.last_seen.clone();
    if &same_but_seen != prev {
        return true;
    }
    match (&prev.last_seen, &next.last_seen) {
        (Some(old), Some(new)) => {
            new.0.as_millisecond() - old.0.as_millisecond() >= refresh.as_millis() as i64
        }
        _ => true,
    }
}

/// Writes Cluster status for `clusters` and, when `repos`, every
/// Repository's cluster entries and counts.
async fn flush(
    objects: &Objects,
    shared: &Shared,
    cache: &mut StatusCache,
    clusters: &[String],
    live: &BTreeMap<String, LiveCluster>,
    repos: bool,
) -> Result<(), ObjectError> {
    let desired: DesiredMap = shared.desired.borrow().clone().unwrap_or_default();
    cache.fill(objects, clusters).await?;
    let refresh = (shared.offline_after / 4).max(Duration::from_secs(1));
    let mut puts = Vec::new();
    let mut written = Vec::new();
    for (i, name) in clusters.iter().enumerate() {
        // A full pass over a large fleet is long; let sessions run between
        // slices of it.
        if i % 256 == 255 {
            tokio::task::yield_now().await;
        }
        let Some((cluster, rev)) = cache.clusters.get(name) else {
            continue;
        };
        let prev = cluster.status.clone().unwrap_or_default();
        let next = status::cluster_status(
            &prev,
            desired.get(name).map(|d| d.as_ref()),
            live.get(name),
            &shared.replica,
        );
        if !worth_writing(&prev, &next, refresh) {
            continue;
        }
        let mut updated = cluster.clone();
        updated.status = Some(next);
        puts.push(objects.status_put(&Object::Cluster(updated.clone()), *rev)?);
        written.push((name.clone(), updated));
    }
    // Batched; a batch that meets a concurrent write (an apply, another
    // replica) is redone one cluster at a time.
    let mut results = Vec::new();
    crate::store::put_batches(objects.store().as_ref(), puts, |range, result| {
        results.push((range, result))
    })
    .await;
    for (range, result) in results {
        let these = &written[range];
        match result {
            Ok(revs) => {
                for ((name, c), rev) in these.iter().zip(revs) {
                    cache.clusters.insert(name.clone(), (c.clone(), rev));
                }
            }
            Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound(_)) => {
                for (name, _) in these {
                    cache.clusters.remove(name);
                    let d = desired.get(name).map(|d| d.as_ref());
                    let l = live.get(name);
                    let r = update_status(objects, Kind::Cluster, None, name, |obj| {
                        let Object::Cluster(c) = obj else {
                            return false;
                        };
                        let prev = c.status.clone().unwrap_or_default();
                        let next = status::cluster_status(&prev, d, l, &shared.replica);
                        if next == prev {
                            return false;
                        }
                        c.status = Some(next);
                        true
                    })
                    .await;
                    match r {
                        Ok(_) | Err(ObjectError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(ObjectError::Unavailable(e.to_string())),
        }
    }
    if !repos {
        return Ok(());
    }
    let live_refs: BTreeMap<String, &LiveCluster> =
        live.iter().map(|(k, v)| (k.clone(), v)).collect();
    let (list, _) = objects.list(Kind::Repository, None).await?;
    for obj in list {
        let ns = obj.namespace().unwrap_or(DEFAULT_NAMESPACE).to_string();
        let name = obj.name().to_string();
        let targets = status::targets_of(&ns, &name, &desired);
        let prefix = status::image_key_prefix(&ns, &name);
        let compute = |obj: &mut Object| {
            let Object::Repository(r) = obj else {
                return false;
            };
            // Read from the object being written, so that a resolution
            // written in between is counted against.
            let wanted = model::wanted_digests(r);
            let mut st = r.status.clone().unwrap_or_default();
            let (entries, synced, target) =
                status::repository_clusters(&prefix, &st.clusters, &targets, &wanted, &live_refs);
            if entries == st.clusters
                && synced == st.synced_clusters
                && target == st.target_clusters
            {
                return false;
            }
            st.clusters = entries;
            st.synced_clusters = synced;
            st.target_clusters = target;
            r.status = Some(st);
            true
        };
        let mut probe = obj.clone();
        if !compute(&mut probe) {
            continue;
        }
        match update_status(objects, Kind::Repository, Some(&ns), &name, compute).await {
            Ok(_) | Err(ObjectError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Coalesces session state into store writes: about once a second per
/// cluster, and a pass over everything when desired sets change.
async fn status_writer(objects: &Objects, shared: &Shared, shutdown: &CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_all = false;
    let mut cache = StatusCache::default();
    let mut deferred_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The full pass waits until the desired sets stop changing: during a
        // fleet-wide change it would otherwise rewrite every Cluster once per
        // tick while the sessions need the CPU. Clusters with a session here
        // are written as their acks arrive anyway.
        let settled = shared
            .desired_changed_at
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_none_or(|at| at.elapsed() >= DESIRED_SETTLE);
        // While a change is going out, the acks it brings back wait too (at
        // most MAX_DEFER): their status writes would compete with the
        // desired-set writes for the store.
        if !settled {
            let since = *deferred_since.get_or_insert_with(Instant::now);
            if since.elapsed() < MAX_DEFER {
                continue;
            }
        }
        deferred_since = None;
        let all = (settled && shared.desired_changed.swap(false, Ordering::SeqCst)) || retry_all;
        retry_all = false;
        let (due, images_due, live) = shared.with_live(|map| {
            let mut due = Vec::new();
            let mut images_due = false;
            for (name, e) in map.iter_mut() {
                let ready = e.last_flush.is_none_or(|t| t.elapsed() >= FLUSH_INTERVAL);
                if (e.dirty || e.images_dirty) && ready || e.ended {
                    due.push(name.clone());
                    images_due |= e.images_dirty || e.ended;
                    e.dirty = false;
                    e.images_dirty = false;
                    e.last_flush = Some(Instant::now());
                }
            }
            // Copy only what this pass reads: every session's state for a
            // full pass or one over repositories, else the due clusters'.
            let live: BTreeMap<String, LiveCluster> = if all || images_due {
                map.iter()
                    .map(|(k, v)| (k.clone(), v.state.clone()))
                    .collect()
            } else {
                due.iter()
                    .filter_map(|k| map.get(k).map(|v| (k.clone(), v.state.clone())))
                    .collect()
            };
            map.retain(|_, e| !e.ended);
            (due, images_due, live)
        });
        if !all && due.is_empty() {
            continue;
        }
        let clusters = if all {
            // Every cluster the writer knows of or has a desired set for;
            // `fill` lists them all again when its cache has aged.
            let mut names: std::collections::BTreeSet<String> =
                cache.clusters.keys().cloned().collect();
            if let Some(d) = shared.desired.borrow().as_ref() {
                names.extend(d.keys().cloned());
            }
            names.into_iter().collect()
        } else {
            due
        };
        let result = flush(
            objects,
            shared,
            &mut cache,
            &clusters,
            &live,
            all || images_due,
        )
        .await;
        if let Err(e) = result {
            warn!(error = %e, "Writing session status failed; retrying");
            retry_all = true;
        }
    }
}

/// Marks clusters Offline whose agent was not heard for `offline_after`, and
/// flags their image entries as last known.
async fn sweeper(objects: &Objects, shared: &Shared, shutdown: &CancellationToken) {
    let period =
        (shared.offline_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // After a (re)start, agents that were connected are still finding
        // their way back (backoff, thousands at once); until they had
        // `offline_after` to do so, an old lastSeen proves nothing.
        if started.elapsed() < shared.offline_after {
            continue;
        }
        if let Err(e) = sweep(objects, shared).await {
            warn!(error = %e, "Offline sweep failed; retrying");
        }
    }
}

async fn sweep(objects: &Objects, shared: &Shared) -> Result<(), ObjectError> {
    let heard_here: HashMap<String, Duration> = shared.with_live(|m| {
        m.iter()
            .filter(|(_, e)| !e.ended)
            .map(|(k, e)| (k.clone(), e.last_heard.elapsed()))
            .collect()
    });
    let (clusters, _) = objects.list(Kind::Cluster, None).await?;
    let t = now();
    let mut gone = Vec::new();
    for obj in clusters {
        let Object::Cluster(c) = &obj else { continue };
        let st = c.status.clone().unwrap_or_default();
        let name = obj.name().to_string();
        if st.phase != Some(model::ClusterPhase::Connected) {
            continue;
        }
        if heard_here
            .get(&name)
            .is_some_and(|d| *d < shared.offline_after)
        {
            continue;
        }
        if !status::is_overdue(st.last_seen.as_ref(), &t, shared.offline_after) {
            continue;
        }
        let offline_after = shared.offline_after;
        let changed = update_status(objects, Kind::Cluster, None, &name, |o| {
            let Object::Cluster(c) = o else { return false };
            let prev = c.status.clone().unwrap_or_default();
            if prev.phase != Some(model::ClusterPhase::Connected)
                || !status::is_overdue(prev.last_seen.as_ref(), &now(), offline_after)
            {
                return false;
            }
            c.status = Some(status::offline_status(&prev));
            true
        })
        .await?;
        if changed {
            warn!(cluster = %name, offline_after = ?shared.offline_after, "Cluster offline: no word from its agent");
            gone.push(name);
        }
    }
    if gone.is_empty() {
        return Ok(());
    }
    let (repos, _) = objects.list(Kind::Repository, None).await?;
    for obj in repos {
        let ns = obj.namespace().unwrap_or(DEFAULT_NAMESPACE).to_string();
        let name = obj.name().to_string();
        let mark = |o: &mut Object| {
            let Object::Repository(r) = o else {
                return false;
            };
            let wanted = model::wanted_digests(r);
            let Some(st) = r.status.as_mut() else {
                return false;
            };
            let mut changed = false;
            for c in &gone {
                changed |= status::mark_last_known(&mut st.clusters, c);
            }
            if changed {
                st.synced_clusters = status::count_synced(&st.clusters, &wanted);
            }
            changed
        };
        let mut probe = obj.clone();
        if mark(&mut probe) {
            update_status(objects, Kind::Repository, Some(&ns), &name, mark).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::StoredRegistry;

    fn img(key: &str, tags: &[&str]) -> StoredImage {
        StoredImage {
            key: key.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    fn reg(key: &str, fp: &str) -> StoredRegistry {
        StoredRegistry {
            key: key.into(),
            fingerprint: fp.into(),
        }
    }

    #[test]
    fn delta_table() {
        let old = DesiredContent {
            images: vec![img("a", &["1"]), img("b", &["1"])],
            registries: vec![reg("ns/r1", "x"), reg("ns/r2", "y")],
        };
        let new = DesiredContent {
            images: vec![img("b", &["1", "2"]), img("c", &[])],
            registries: vec![reg("ns/r1", "x2"), reg("ns/r3", "z")],
        };
        let d = delta(&old, &new);
        assert_eq!(d.upserts, vec![img("b", &["1", "2"]), img("c", &[])]);
        assert_eq!(d.removals, vec!["a".to_string()]);
        assert_eq!(
            d.registry_upserts,
            vec!["ns/r1".to_string(), "ns/r3".to_string()]
        );
        assert_eq!(d.registry_removals, vec!["ns/r2".to_string()]);
        assert_eq!(delta(&new, &new), ContentDelta::default());
    }
}
