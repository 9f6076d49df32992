//! The agent's side of the hub session (DESIGN.md §5): one mTLS gRPC stream
//! that brings desired sets in and sends progress out, reconnecting with
//! exponential backoff and full jitter, rotating through the hub URLs.
//!
//! The shape follows linkerd's `tonic-watch`: the session turns the stream into
//! a `watch` of the held [`DesiredSet`] that the reconciler follows, and it
//! keeps working (or rather, the reconciler does) whether a hub is reachable or
//! not. Every set is persisted before it is acked and before the reconciler
//! sees it, so what the hub records as applied survives a crash.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use imgfleet::api::v1 as pb;
use imgfleet::api::v1::agent_service_client::AgentServiceClient;
use imgfleet_common::tls::{TlsError, TlsMaterial};
use rand::Rng as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{Instrument as _, debug, error, info, warn};

use crate::desired::{DeltaError, DesiredFile, DesiredFileError, DesiredSet};
use crate::report::ProgressBook;
use crate::wire::{self, EmptyMessage, FromHub};

/// Session facts for metrics and health.
#[derive(Debug, Default)]
pub struct SessionStatus {
    /// A session is established now.
    pub connected: AtomicBool,
    /// Sessions that ended and were retried.
    pub reconnects: AtomicU64,
    /// Desired sets and deltas applied.
    pub sets_applied: AtomicU64,
    /// Pull tokens issued before this time (Unix seconds) are refused: set
    /// when the hub says this cluster's certificate was revoked, since
    /// revoking a cluster invalidates its tokens.
    pub tokens_not_before: Arc<std::sync::atomic::AtomicI64>,
}

/// How the session behaves; defaults are the contract's.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Hub URLs, tried in turn.
    pub hubs: Vec<String>,
    /// The cluster's mTLS material.
    pub tls: TlsMaterial,
    /// The cluster name in the certificate.
    pub cluster: String,
    /// Sent in Hello.
    pub agent_version: String,
    /// Between two heartbeats.
    pub heartbeat: Duration,
    /// Silence after which the session is dead.
    pub silence: Duration,
    /// Minimum time between two progress messages.
    pub progress_interval: Duration,
    /// First reconnect delay (before jitter).
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Reconnect delay once the hub said this agent's certificate is revoked,
    /// or the certificate expired: only an operator can fix that, so the
    /// agent asks rarely and keeps serving what it holds.
    pub revoked_backoff: Duration,
    /// The credentials directory; renewed certificates are written back to
    /// it. Without one a renewal lives in memory only.
    pub credentials_dir: Option<std::path::PathBuf>,
}

impl SessionConfig {
    /// The contract's timings.
    pub fn new(hubs: Vec<String>, tls: TlsMaterial, cluster: String) -> SessionConfig {
        SessionConfig {
            hubs,
            tls,
            cluster,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            heartbeat: Duration::from_secs(5),
            silence: Duration::from_secs(15),
            progress_interval: Duration::from_millis(500),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            revoked_backoff: Duration::from_secs(300),
            credentials_dir: None,
        }
    }
}

/// How long after a failed renewal the agent asks again.
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// Why one session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] TlsError),
    #[error("hub answered {code:?}: {message}", code = .0.code(), message = .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("hub closed the stream")]
    Closed,
    #[error("nothing heard from the hub for {0:?}")]
    Silent(Duration),
    #[error("{0}; reconnecting for a full set")]
    Delta(#[from] DeltaError),
    #[error(transparent)]
    Empty(#[from] EmptyMessage),
    /// The agent's certificate is past its end; the hub would refuse it.
    #[error(
        "this agent's certificate expired at {0} (Unix seconds): re-enroll the cluster with `imgfleet cluster enroll {1} --reissue` and give the agent the new credentials"
    )]
    Expired(i64, String),
}

impl SessionError {
    /// Whether only an operator can end this: a revoked or expired
    /// certificate. The agent then retries slowly and keeps serving.
    pub fn needs_operator(&self) -> bool {
        match self {
            SessionError::Expired(..) => true,
            SessionError::Rpc(s) => {
                s.code() == tonic::Code::PermissionDenied && s.message().contains("revoked")
            }
            _ => false,
        }
    }
}

/// The session task: owns the persisted desired set and publishes it.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    /// The mTLS material in use: the configured one until a renewal.
    tls: std::sync::Mutex<TlsMaterial>,
    file: Arc<DesiredFile>,
    desired: watch::Sender<Arc<DesiredSet>>,
    book: Arc<ProgressBook>,
    status: Arc<SessionStatus>,
}

/// What one session loop iteration produced.
enum Outcome {
    Shutdown,
}

impl Session {
    /// A session over `file`, publishing to `desired` (whose current value is
    /// the set loaded from `file`).
    pub fn new(
        config: SessionConfig,
        file: Arc<DesiredFile>,
        desired: watch::Sender<Arc<DesiredSet>>,
        book: Arc<ProgressBook>,
        status: Arc<SessionStatus>,
    ) -> Session {
        Session {
            tls: std::sync::Mutex::new(config.tls.clone()),
            config,
            file,
            desired,
            book,
            status,
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.config.backoff_min)
            .with_max_delay(self.config.backoff_max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// Runs sessions until `shutdown`: Disconnected -> Connecting -> Connected
    /// -> (error) -> Backoff -> Connecting with the next URL.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = self.backoff();
        let mut attempt = 0usize;
        // Failures in a row: an agent cut off for days says so once, then
        // now and then, instead of every few seconds.
        let mut failures = 0u64;
        loop {
            let url = self.config.hubs[attempt % self.config.hubs.len()].clone();
            attempt += 1;
            let span = tracing::info_span!("session", hub = %url, cluster = %self.config.cluster);
            let mut established = false;
            let result = self
                .once(&url, &shutdown, &mut established)
                .instrument(span)
                .await;
            // A revoked cluster's pull tokens stop working before anything
            // else says the session ended.
            if let Err(e @ SessionError::Rpc(_)) = &result
                && e.needs_operator()
            {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                    .unwrap_or(0);
                self.status.tokens_not_before.store(now, Ordering::Relaxed);
            }
            self.status.connected.store(false, Ordering::Relaxed);
            match result {
                Ok(Outcome::Shutdown) => return,
                Err(e) if e.needs_operator() => {
                    error!(hub = %url, error = %e,
                           "The hub refuses this agent's certificate; serving what is held, retrying in {:?}",
                           self.config.revoked_backoff);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(self.config.revoked_backoff) => {}
                    }
                    continue;
                }
                Err(e) => {
                    if established {
                        failures = 0;
                    }
                    failures += 1;
                    if failures <= self.config.hubs.len() as u64 || failures.is_multiple_of(100) {
                        warn!(hub = %url, failures, error = %e, "Hub session ended; will reconnect");
                    } else {
                        debug!(hub = %url, failures, error = %e, "Hub still unreachable; will retry");
                    }
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            self.status.reconnects.fetch_add(1, Ordering::Relaxed);
            // A session that was up starts the backoff over: the link works.
            if established {
                backoff = self.backoff();
            }
            let delay = full_jitter(backoff.next().unwrap_or(self.config.backoff_max));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One session: connect and say hello, then serve the stream until it
    /// ends. `established` turns true once the hub has said something.
    async fn once(
        &self,
        url: &str,
        shutdown: &CancellationToken,
        established: &mut bool,
    ) -> Result<Outcome, SessionError> {
        let Some((tx, inbound)) = self.open(url, shutdown).await? else {
            return Ok(Outcome::Shutdown);
        };
        self.serve(tx, inbound, shutdown, established).await
    }

    /// The mTLS material in use now.
    fn tls(&self) -> TlsMaterial {
        match self.tls.lock() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// When to ask for the next certificate: once two thirds of the current
    /// one's lifetime (from its signing) have passed.
    fn renew_at(&self) -> Option<Instant> {
        let facts = imgfleet_common::pki::cert_facts_pem(&self.tls().cert_pem).ok()?;
        let issued = i64::try_from(facts.issued_at_nanos / 1_000_000_000).ok()?;
        let due = issued + (facts.not_after - issued).max(0) * 2 / 3;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        let wait = u64::try_from(due).ok()?.saturating_sub(now);
        Some(Instant::now() + Duration::from_secs(wait))
    }

    /// Takes a renewed certificate for `key_pem`: written back to the
    /// credentials directory (crash-safe), then used for every connection
    /// from now on. The session itself goes on.
    fn renewed(&self, cert_pem: String, key_pem: String) -> Result<(), String> {
        match imgfleet_common::pki::identity_from_pem(&cert_pem) {
            Ok(imgfleet_common::pki::Identity::Cluster(c)) if c == self.config.cluster => {}
            other => {
                return Err(format!(
                    "the renewed certificate is not for this cluster: {other:?}"
                ));
            }
        }
        if let Some(dir) = &self.config.credentials_dir {
            crate::credentials::store_renewed(dir, &cert_pem, &key_pem)
                .map_err(|e| e.to_string())?;
        }
        let mut tls = match self.tls.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        tls.cert_pem = cert_pem;
        tls.key_pem = key_pem;
        Ok(())
    }

    /// Connects to `url` and sends the Hello; `None` on shutdown.
    async fn open(
        &self,
        url: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Outbound, Streaming<pb::HubMessage>)>, SessionError> {
        let tls = self.tls();
        if let Ok(facts) = imgfleet_common::pki::cert_facts_pem(&tls.cert_pem) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            if facts.not_after <= now {
                return Err(SessionError::Expired(
                    facts.not_after,
                    self.config.cluster.clone(),
                ));
            }
        }
        let channel = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            // A hub that accepts TCP and then says nothing counts as silent.
            c = tokio::time::timeout(self.config.silence, tls.connect(url)) => {
                c.map_err(|_| SessionError::Silent(self.config.silence))??
            }
        };
        let (tx, rx) = mpsc::unbounded_channel::<pb::AgentMessage>();
        let held = self.desired.borrow().clone();
        send(
            &tx,
            wire::hello(
                &self.config.cluster,
                &self.config.agent_version,
                &held,
                self.book.storage(),
            ),
        )?;
        // A desired set of thousands of images can pass tonic's 4 MiB default.
        let mut client =
            AgentServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let response = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = tokio::time::timeout(
                self.config.silence,
                client.connect(UnboundedReceiverStream::new(rx)),
            ) => r.map_err(|_| SessionError::Silent(self.config.silence))??,
        };
        self.status.connected.store(true, Ordering::Relaxed);
        info!(
            hub = %url,
            generation = held.generation,
            epoch = %held.epoch,
            "Connected to hub"
        );
        Ok(Some((tx, response.into_inner())))
    }

    /// Serves an open session: applies what the hub sends, heartbeats, and
    /// sends progress at most every `progress_interval`, until the stream
    /// ends, falls silent or shutdown.
    async fn serve(
        &self,
        tx: Outbound,
        mut inbound: Streaming<pb::HubMessage>,
        shutdown: &CancellationToken,
        established: &mut bool,
    ) -> Result<Outcome, SessionError> {
        // The hub learns the true current state of every image first.
        let mut changes = self.book.subscribe();
        changes.borrow_and_update();
        // And what its store holds, whether or not it changed since the last
        // session: a hub that never heard it (another replica, a restart)
        // has nothing to keep.
        let (mut sent_seq, all) = self.book.snapshot();
        let held = self.book.held_since(0);
        send(
            &tx,
            wire::progress(all, self.book.storage(), held.as_deref()),
        )?;
        let mut last_progress = Instant::now();
        let mut pending = false;
        let mut last_heard = Instant::now();
        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + self.config.heartbeat,
            self.config.heartbeat,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // The renewal: when to ask, and the new key while the hub answers.
        let mut renew_at = self.renew_at();
        let mut pending_key: Option<String> = None;
        loop {
            let progress_due = last_progress + self.config.progress_interval;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Outcome::Shutdown),
                msg = inbound.message() => {
                    let Some(msg) = msg? else { return Err(SessionError::Closed) };
                    last_heard = Instant::now();
                    // Only a hub that talks resets the backoff: one that
                    // accepts and then refuses must not be hammered.
                    *established = true;
                    match FromHub::try_from(msg)? {
                        FromHub::Renewed(answer) => {
                            let result = match (answer, pending_key.take()) {
                                (Ok(cert), Some(key)) => self.renewed(cert, key),
                                (Ok(_), None) => Err("a certificate nobody asked for".to_owned()),
                                (Err(e), _) => Err(e),
                            };
                            match result {
                                Ok(()) => {
                                    info!("Renewed this agent's certificate");
                                    renew_at = self.renew_at();
                                }
                                Err(e) => {
                                    warn!(error = %e, "Certificate renewal failed; asking again in a minute");
                                    renew_at = Some(Instant::now() + RENEW_RETRY);
                                }
                            }
                        }
                        other => self.handle(other, &tx).await?,
                    }
                }
                _ = tokio::time::sleep_until(renew_at.unwrap_or_else(Instant::now)),
                    if renew_at.is_some() && pending_key.is_none() =>
                {
                    // The key is made here and never leaves the agent.
                    match imgfleet_common::pki::generate_csr(&self.config.cluster) {
                        Ok(csr) => {
                            send(&tx, wire::renew(csr.cert_pem))?;
                            pending_key = Some(csr.key_pem);
                        }
                        Err(e) => {
                            warn!(error = %e, "Cannot make a certificate request; asking again in a minute");
                            renew_at = Some(Instant::now() + RENEW_RETRY);
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    seq += 1;
                    send(&tx, wire::heartbeat(seq))?;
                }
                _ = tokio::time::sleep_until(last_heard + self.config.silence) => {
                    return Err(SessionError::Silent(self.config.silence));
                }
                r = changes.changed(), if !pending => {
                    // The book lives as long as the daemon; an error only
                    // means shutdown is near.
                    if r.is_ok() { pending = true; }
                }
                _ = tokio::time::sleep_until(progress_due), if pending => {
                    changes.borrow_and_update();
                    let (seq_now, images) = self.book.changes_since(sent_seq);
                    let held = self.book.held_since(sent_seq);
                    sent_seq = seq_now;
                    send(
                        &tx,
                        wire::progress(images, self.book.storage(), held.as_deref()),
                    )?;
                    pending = false;
                    last_progress = Instant::now();
                }
            }
        }
    }

    /// Applies one hub message: persist, publish, then ack.
    async fn handle(&self, msg: FromHub, tx: &Outbound) -> Result<(), SessionError> {
        // Receiving a set is part of the trace of the change behind its first
        // entry that carries one.
        let traced = match &msg {
            FromHub::Set(set) => set.images.values().find(|i| !i.trace_context.is_empty()),
            FromHub::Delta(d) => d.upserts.iter().find(|i| !i.trace_context.is_empty()),
            FromHub::Heartbeat | FromHub::Renewed(_) => return Ok(()),
        };
        let span = tracing::info_span!("receive desired set");
        if let Some(image) = traced {
            imgfleet_common::telemetry::join(&span, &image.trace_context);
        }
        tracing::Instrument::instrument(self.apply(msg, tx), span).await
    }

    /// Persists, publishes and acks one set or delta.
    async fn apply(&self, msg: FromHub, tx: &Outbound) -> Result<(), SessionError> {
        let next = match msg {
            FromHub::Heartbeat | FromHub::Renewed(_) => return Ok(()),
            FromHub::Set(set) => set,
            FromHub::Delta(delta) => {
                let held = self.desired.borrow().clone();
                held.apply_delta(delta)?
            }
        };
        let (generation, epoch) = (next.generation, next.epoch.clone());
        let file = self.file.clone();
        let saved = {
            let next = next.clone();
            tokio::task::spawn_blocking(move || file.save(&next))
                .await
                .unwrap_or_else(|source| {
                    Err(DesiredFileError::Task {
                        path: self.file.path().to_path_buf(),
                        source,
                    })
                })
        };
        if let Err(e) = saved {
            // Not held durably, so not applied: the hub sees the error and
            // the generation stays where it was.
            error!(generation, error = %e, "Cannot persist the desired set");
            return send(tx, wire::ack(generation, epoch, Some(e.to_string())));
        }
        info!(
            generation,
            epoch = %epoch,
            images = next.images.len(),
            "Applied desired set"
        );
        self.desired.send_replace(Arc::new(next));
        self.status.sets_applied.fetch_add(1, Ordering::Relaxed);
        send(tx, wire::ack(generation, epoch, None))
    }
}

/// What the session sends to the hub on.
type Outbound = mpsc::UnboundedSender<pb::AgentMessage>;

fn send(tx: &Outbound, msg: pb::AgentMessage) -> Result<(), SessionError> {
    tx.send(msg).map_err(|_| SessionError::Closed)
}

/// A delay drawn uniformly from zero to `d` ("full jitter"), so that agents
/// cut off together do not come back together.
pub fn full_jitter(d: Duration) -> Duration {
    let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_the_delay() {
        for _ in 0..100 {
            assert!(full_jitter(Duration::from_millis(300)) <= Duration::from_millis(300));
        }
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
    }
}
