//! The agent service (`AgentService.Connect`) and the per-cluster session:
//! identity from the client certificate, the full desired set or nothing on
//! connect, deltas as the cluster's stored desired set changes, acks,
//! progress and heartbeats.
//!
//! Shaped after mini-redis's `Listener` and `Handler`: [`AgentService`]
//! checks who connects and spawns one [`Session`] per agent. A session
//! learns about changes only from its cluster's channel in the desired-set
//! cache ([`crate::desired_cache`]), records what its agent reports in the
//! live table ([`crate::live`]), and converts to and from the wire in
//! [`crate::wire`] only. The status writer and the offline sweeper, which
//! turn those reports into stored status, run beside it
//! ([`crate::status_writer`], [`crate::sweeper`]).

use std::time::{Duration, Instant};

use imgfleet::api::v1 as pb;
use imgfleet::model::{Kind, Object};
use imgfleet_common::pki::Identity;
use imgfleet_common::tls::TlsError;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::desired::StoredDesiredSet;
use crate::desired_cache::{ClusterDesired, DesiredSets};
use crate::live::{SessionBook, SessionId};
use crate::objects::{ObjectError, Objects};
use crate::placement;
use crate::revocation::{ClusterRevocations, Revocations, Revoked};
use crate::status::LiveCluster;
use crate::wire::{self, Credential, FromAgent, Hello};

/// How often each side sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Silence after which the hub ends a session (three heartbeats).
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
/// How long the first message (Hello) may take.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a Connect waits for a hub that is still starting.
const STARTING_WAIT: Duration = Duration::from_secs(10);

/// Why a Connect was refused; each variant is one gRPC code, chosen in
/// `From<AgentError> for Status`.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A valid certificate that is not a cluster's (an admin's).
    #[error("the agent API needs a cluster certificate; this one is for {0}")]
    NotACluster(Identity),
    /// No certificate from the hub's CA, or one without an imgfleet identity.
    #[error("the agent API needs a cluster certificate issued by the hub's CA: {0}")]
    Unauthenticated(#[source] TlsError),
    #[error("cluster {cluster}: no Hello within {HELLO_TIMEOUT:?}")]
    NoHello { cluster: String },
    #[error("cluster {cluster}: the first message must be a Hello")]
    NotHello { cluster: String },
    /// The Hello names another cluster than the certificate.
    #[error("certificate is for cluster {cluster}, hello claims {claimed}")]
    WrongCluster { cluster: String, claimed: String },
    #[error("cluster {0} is not enrolled (no Cluster object)")]
    NotEnrolled(String),
    /// The certificate was revoked (`imgfleet cluster revoke`, a delete, or
    /// a re-enroll); the agent keeps serving what it holds.
    #[error(
        "cluster {0}: this certificate was revoked; re-enroll with `imgfleet cluster enroll {0} --reissue` and give the agent the new credentials"
    )]
    Revoked(String),
    /// Reading the Cluster object failed.
    #[error("cluster {cluster}: {source}")]
    Lookup {
        cluster: String,
        #[source]
        source: ObjectError,
    },
    /// The epoch or the desired sets are not read yet; worth a retry.
    #[error("the hub is still starting; try again")]
    Starting,
    /// The agent's stream failed before its Hello arrived.
    #[error("reading the Hello: {}", .0.message())]
    Stream(#[source] Status),
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        match e {
            AgentError::NotACluster(_)
            | AgentError::WrongCluster { .. }
            | AgentError::Revoked(_) => Status::permission_denied(e.to_string()),
            AgentError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
            AgentError::NoHello { .. } => Status::deadline_exceeded(e.to_string()),
            AgentError::NotHello { .. } => Status::invalid_argument(e.to_string()),
            AgentError::NotEnrolled(_) => Status::not_found(e.to_string()),
            AgentError::Lookup {
                source: ObjectError::Unavailable(m),
                ..
            } => Status::unavailable(m),
            AgentError::Lookup { source, .. } => Status::internal(source.to_string()),
            AgentError::Starting => Status::unavailable(e.to_string()),
            AgentError::Stream(s) => s,
        }
    }
}

/// Why a registry credential was left out of a desired set.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("registry key {0:?}: expected <namespace>/<name>")]
    BadKey(String),
    /// Reading the RegistrySecret, or opening its password, failed.
    #[error(transparent)]
    Read(#[from] ObjectError),
    #[error("RegistrySecret {0}: stored object has another kind")]
    WrongKind(String),
}

/// The gRPC service: checks who connects and starts one [`Session`] per
/// agent. Cheap to clone; every field is a handle.
#[derive(Clone)]
pub struct AgentService {
    /// Cluster objects (enrollment) and RegistrySecrets (credentials).
    objects: Objects,
    /// The hub epoch, `None` until it is read.
    epoch: watch::Receiver<Option<String>>,
    /// Each cluster's stored desired set.
    desired: DesiredSets,
    /// Where sessions record what their agents report.
    live: SessionBook,
    /// Owns the session tasks, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Ends every session.
    shutdown: CancellationToken,
    /// Every cluster's revocation; a session whose certificate it refuses
    /// ends at once.
    revoked: watch::Receiver<ClusterRevocations>,
    /// Signs renewals, when this hub holds the CA.
    renewal: Option<Renewal>,
}

/// What renewing a cluster certificate takes.
#[derive(Clone)]
struct Renewal {
    ca: std::sync::Arc<imgfleet_common::pki::CertificateAuthority>,
    lifetime: Duration,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService").finish_non_exhaustive()
    }
}

impl AgentService {
    pub fn new(
        objects: Objects,
        epoch: watch::Receiver<Option<String>>,
        desired: DesiredSets,
        live: SessionBook,
        shutdown: CancellationToken,
    ) -> AgentService {
        let tracker = TaskTracker::new();
        // Every replica follows the revocations itself, so a revoke made on
        // any of them ends the session wherever it lives.
        let (revoked, follow) =
            crate::revocation::follow_clusters(objects.store().clone(), shutdown.clone());
        tracker.spawn(follow);
        AgentService {
            objects,
            epoch,
            desired,
            live,
            tracker,
            shutdown,
            revoked,
            renewal: None,
        }
    }

    /// Renew cluster certificates over the session with `ca`, each valid for
    /// `lifetime` (`--cluster-cert-lifetime`); without a CA renewal requests
    /// are answered with an error.
    pub fn with_renewal(
        mut self,
        ca: Option<std::sync::Arc<imgfleet_common::pki::CertificateAuthority>>,
        lifetime: Duration,
    ) -> Self {
        self.renewal = ca.map(|ca| Renewal { ca, lifetime });
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::agent_service_server::AgentServiceServer<Self> {
        pb::agent_service_server::AgentServiceServer::new(self)
    }

    /// Waits up to `grace` for the sessions to end after shutdown.
    pub async fn drain(&self, grace: Duration) {
        self.tracker.close();
        let _ = tokio::time::timeout(grace, self.tracker.wait()).await;
    }

    async fn open(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<ReceiverStream<Result<pb::HubMessage, Status>>, AgentError> {
        let cluster = match imgfleet_common::tls::peer_identity(&request) {
            Ok(Identity::Cluster(name)) => name,
            Ok(other) => return Err(AgentError::NotACluster(other)),
            Err(e) => return Err(AgentError::Unauthenticated(e)),
        };
        let mut issued_at = i128::MAX;
        if let Some(certs) = request.peer_certs()
            && let Some(leaf) = certs.first()
        {
            let facts = imgfleet_common::pki::cert_facts_der(leaf.as_ref())
                .map_err(|e| AgentError::Unauthenticated(TlsError::Identity(e)))?;
            issued_at = facts.issued_at_nanos;
            let revocations = Revocations::new(self.objects.store().clone());
            match revocations
                .refuses(&Revoked::Cluster(cluster.clone()), facts.issued_at_nanos)
                .await
            {
                Ok(false) => {}
                Ok(true) => {
                    warn!(cluster = %cluster, "A revoked certificate tried to connect");
                    let draft = crate::audit::Draft {
                        user: format!("cluster:{cluster}"),
                        verb: "connect".into(),
                        resource: "clusters".into(),
                        name: cluster.clone(),
                        source: request
                            .remote_addr()
                            .map(|a| a.to_string())
                            .unwrap_or_default(),
                        ..Default::default()
                    };
                    let e = AgentError::Revoked(cluster);
                    let put = draft.put(
                        crate::audit::Outcome::Denied,
                        tonic::Code::PermissionDenied as i32,
                        false,
                        &e.to_string(),
                    );
                    if let Err(err) =
                        crate::audit::record_alone(self.objects.store().as_ref(), put).await
                    {
                        warn!(error = %err, "Writing an audit record failed");
                    }
                    return Err(e);
                }
                Err(e) => {
                    return Err(AgentError::Lookup {
                        cluster,
                        source: e.into(),
                    });
                }
            }
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| AgentError::NoHello {
                cluster: cluster.clone(),
            })?
            .map_err(AgentError::Stream)?;
        let hello = Hello::from_first(first).ok_or_else(|| AgentError::NotHello {
            cluster: cluster.clone(),
        })?;
        if hello.cluster != cluster {
            return Err(AgentError::WrongCluster {
                cluster,
                claimed: hello.cluster,
            });
        }
        match self.objects.get(Kind::Cluster, None, &cluster).await {
            Ok(_) => {}
            Err(ObjectError::NotFound(_)) => return Err(AgentError::NotEnrolled(cluster)),
            Err(source) => return Err(AgentError::Lookup { cluster, source }),
        }
        let mut epoch = self.epoch.clone();
        let epoch = match tokio::time::timeout(STARTING_WAIT, epoch.wait_for(Option::is_some)).await
        {
            Ok(Ok(e)) => e.clone().unwrap_or_default(),
            _ => return Err(AgentError::Starting),
        };
        if !self.desired.ready(STARTING_WAIT).await {
            return Err(AgentError::Starting);
        }

        let id = self.live.open(
            &cluster,
            LiveCluster {
                last_seen: Some(crate::live::now()),
                agent_version: hello.agent_version.clone(),
                storage_used_bytes: hello.storage.0,
                storage_capacity_bytes: hello.storage.1,
                applied_generation: if hello.epoch == epoch {
                    hello.generation
                } else {
                    0
                },
                images: Default::default(),
                held: None,
            },
        );
        info!(cluster = %cluster, agent_version = %hello.agent_version,
              generation = hello.generation, "Agent connected");
        let (tx, rx) = mpsc::channel(16);
        let session = Session {
            objects: self.objects.clone(),
            live: self.live.clone(),
            id,
            epoch,
            tx,
            issued_at,
            revoked: self.revoked.clone(),
            renewal: self.renewal.clone(),
        };
        let desired = self.desired.subscribe(&cluster);
        self.tracker
            .spawn(session.run(hello, desired, inbound, self.shutdown.clone()));
        Ok(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentService {
    type ConnectStream = ReceiverStream<Result<pb::HubMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        self.open(request)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// One agent's session: sends its cluster's desired set as it changes, and
/// records what the agent reports.
struct Session {
    /// RegistrySecrets, for the credentials a set needs.
    objects: Objects,
    /// Where the session records what its agent reports.
    live: SessionBook,
    /// The session's cluster and its entry in `live`.
    id: SessionId,
    /// The hub epoch the session serves.
    epoch: String,
    /// Messages to the agent.
    tx: mpsc::Sender<Result<pb::HubMessage, Status>>,
    /// When the agent's certificate was issued (Unix nanoseconds).
    issued_at: i128,
    /// Every cluster's revocation.
    revoked: watch::Receiver<ClusterRevocations>,
    /// Signs renewals.
    renewal: Option<Renewal>,
}

impl Session {
    async fn run(
        self,
        hello: Hello,
        mut desired_rx: watch::Receiver<ClusterDesired>,
        mut inbound: Streaming<pb::AgentMessage>,
        shutdown: CancellationToken,
    ) {
        let cluster = self.id.cluster.clone();
        let current = desired_rx.borrow_and_update().clone();
        // What the agent holds, as far as this session knows.
        let mut held: ClusterDesired = None;
        if let Some(cur) = current {
            if hello.epoch == self.epoch && hello.generation == cur.generation {
                debug!(cluster = %cluster, generation = cur.generation, "Agent is up to date");
            } else if !self.send_full(&cur).await {
                self.live.end(&self.id);
                return;
            }
            held = Some(cur);
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let mut seq = 0u64;
        let mut last_heard = Instant::now();
        let mut revoked = self.revoked.clone();
        revoked.mark_changed();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = revoked.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let refused = revoked
                        .borrow_and_update()
                        .get(&cluster)
                        .is_some_and(|r| r.refuses(self.issued_at));
                    if refused {
                        warn!(cluster = %cluster, "Certificate revoked; ending the agent's session");
                        let _ = self
                            .tx
                            .send(Err(Status::from(AgentError::Revoked(cluster.clone()))))
                            .await;
                        break;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        last_heard = Instant::now();
                        match FromAgent::from(m) {
                            FromAgent::Renew { csr_pem } => {
                                self.live.heard(&self.id);
                                if !self.renew(&csr_pem).await {
                                    break;
                                }
                            }
                            other => self.handle(other),
                        }
                    }
                    Ok(None) => {
                        info!(cluster = %cluster, "Agent closed the session");
                        break;
                    }
                    Err(e) => {
                        warn!(cluster = %cluster, error = %e, "Agent session broke");
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
                        warn!(cluster = %cluster, silent = ?last_heard.elapsed(), "Agent silent; ending its session");
                        break;
                    }
                    seq += 1;
                    if !self.send(wire::heartbeat(seq)).await {
                        break;
                    }
                }
            }
        }
        self.live.end(&self.id);
    }

    /// Signs the agent's CSR for its own cluster (the subject is the
    /// hub's), records it in the audit trail, and answers.
    async fn renew(&self, csr_pem: &str) -> bool {
        let cluster = &self.id.cluster;
        let result = match &self.renewal {
            None => Err("this hub has no signing CA: renew against a hub started with --ca-cert and --ca-key".to_owned()),
            Some(r) => r
                .ca
                .sign_cluster_csr(csr_pem, cluster, r.lifetime)
                .map_err(|e| format!("cluster {cluster}: renewal refused: {e}")),
        };
        let draft = crate::audit::Draft {
            user: format!("cluster:{cluster}"),
            verb: "renew".into(),
            resource: "clusters".into(),
            name: cluster.clone(),
            ..Default::default()
        };
        let put = match &result {
            Ok(_) => draft.put(
                crate::audit::Outcome::Allowed,
                0,
                false,
                "certificate renewed",
            ),
            Err(e) => draft.put(
                crate::audit::Outcome::Failed,
                tonic::Code::InvalidArgument as i32,
                false,
                e,
            ),
        };
        if let Err(e) = crate::audit::record_alone(self.objects.store().as_ref(), put).await {
            // Unaudited, so not issued.
            warn!(cluster = %cluster, error = %e, "Renewal not audited; refused");
            return self
                .send(wire::renewed(Err(format!(
                    "the hub could not record the renewal: {e}"
                ))))
                .await;
        }
        match &result {
            Ok(_) => info!(cluster = %cluster, "Renewed the cluster certificate"),
            Err(e) => warn!(cluster = %cluster, error = %e, "Renewal refused"),
        }
        self.send(wire::renewed(result)).await
    }

    async fn send(&self, msg: wire::Outbound) -> bool {
        self.tx.send(Ok(msg)).await.is_ok()
    }

    fn handle(&self, m: FromAgent) {
        let cluster = &self.id.cluster;
        match m {
            FromAgent::Ack {
                generation,
                error: Some(error),
                ..
            } => {
                warn!(cluster = %cluster, generation, error = %error,
                      "Agent could not apply the desired set");
                self.live.heard(&self.id);
            }
            FromAgent::Ack {
                epoch, generation, ..
            } => {
                if epoch == self.epoch {
                    debug!(cluster = %cluster, generation, "Agent acked");
                    self.live.acked(&self.id, generation);
                }
            }
            FromAgent::Progress(mut p) => {
                let held = p.take_held();
                let (storage, images) = p.into_parts();
                self.live.progress(&self.id, storage, held, images);
            }
            FromAgent::Heartbeat => self.live.heartbeat(&self.id),
            FromAgent::Renew { .. } | FromAgent::Other => self.live.heard(&self.id),
        }
    }

    /// The credentials of `keys` that could be read and opened; the others
    /// are left out (the agent keeps what it holds), with a warning.
    async fn credentials<'a>(&self, keys: impl Iterator<Item = &'a str>) -> Vec<Credential> {
        let mut out = Vec::new();
        for key in keys {
            match credential(&self.objects, key).await {
                Ok(c) => out.push(c),
                Err(e) => warn!(cluster = %self.id.cluster, registry = %key, error = %e,
                                "Registry credential left out of the desired set"),
            }
        }
        out
    }

    async fn send_full(&self, set: &StoredDesiredSet) -> bool {
        let keys = set.content.registries.iter().map(|r| r.key.as_str());
        let registries = self.credentials(keys).await;
        info!(cluster = %self.id.cluster, generation = set.generation,
              images = set.content.images.len(), "Sending full desired set");
        let span = send_span(&self.id.cluster, set.generation, &set.content.images);
        tracing::Instrument::instrument(
            self.send(wire::full_set(set, &self.epoch, registries)),
            span,
        )
        .await
    }

    async fn send_delta(&self, old: &StoredDesiredSet, new: &StoredDesiredSet) -> bool {
        let d = placement::diff(&old.content, &new.content);
        let keys = d.registry_upserts.iter().map(|r| r.key.as_str());
        let registry_upserts = self.credentials(keys).await;
        // Debug, not info: a fleet-wide change would log one line per agent.
        debug!(cluster = %self.id.cluster, from = old.generation, generation = new.generation,
              upserts = d.upserts.len(), removals = d.removals.len(), "Sending desired-set delta");
        let span = send_span(&self.id.cluster, new.generation, &d.upserts);
        let msg = wire::delta(
            old.generation,
            new.generation,
            &self.epoch,
            d,
            registry_upserts,
        );
        tracing::Instrument::instrument(self.send(msg), span).await
    }
}

/// The span of sending a cluster its desired set: part of the trace of the
/// change behind the first entry sent that carries one.
fn send_span(cluster: &str, generation: u64, images: &[placement::DesiredImage]) -> tracing::Span {
    // No span at all unless spans are exported: a fleet-wide change sends to
    // every session at once.
    if !imgfleet_common::telemetry::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("send desired set", cluster = %cluster, generation);
    if let Some(i) = images.iter().find(|i| !i.trace_context.is_empty()) {
        imgfleet_common::telemetry::join(&span, &i.trace_context);
    }
    span
}

/// The credential for registry key `<namespace>/<name>`, password opened.
async fn credential(objects: &Objects, key: &str) -> Result<Credential, CredentialError> {
    let (ns, name) = key
        .split_once('/')
        .ok_or_else(|| CredentialError::BadKey(key.to_string()))?;
    let Object::RegistrySecret(rs) = objects.get(Kind::RegistrySecret, Some(ns), name).await?
    else {
        return Err(CredentialError::WrongKind(key.to_string()));
    };
    let password = objects.password(&rs)?;
    Ok(Credential::new(
        key,
        &rs,
        password.as_deref().map(|p| p.as_str()),
    ))
}
