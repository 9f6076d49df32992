//! The simulated agents of the `fanout` suite: each one a real mTLS client with
//! its own certificate, its own connection and its own `AgentService.Connect`
//! stream, speaking the agent protocol (Hello, Ack, Heartbeat) and reconnecting
//! like the real agent (exponential backoff with full jitter), while recording
//! only what the measurements need in a few atomics.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use imgfleet::api::v1 as pb;
use imgfleet::api::v1::agent_message::Msg as AgentMsg;
use imgfleet::api::v1::agent_service_client::AgentServiceClient;
use imgfleet::api::v1::hub_message::Msg as HubMsg;
use imgfleet_common::tls::TlsMaterial;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// How often an agent sends a heartbeat (the hub ends sessions silent for 15 s).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Silence after which an agent gives up on a session, as the real agent does.
const SILENCE: Duration = Duration::from_secs(15);
/// First reconnect delay before jitter, as in agent/src/session.rs.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Largest reconnect delay before jitter.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest a TCP+TLS connect or the Connect call (the hub answers it after
/// reading Hello) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What all agents share: the hub, the two digests the Repository flips
/// between, the bound on concurrent connects, and the clock origin.
#[derive(Debug)]
pub struct Fleet {
    pub url: String,
    /// Digest index 1 and 2 (index 0 means "neither").
    pub digests: [String; 2],
    /// Connects (TCP, TLS, Connect call) in flight at once. Without it 10,000
    /// handshakes would all start together and most would time out on 2 cores.
    pub gate: Semaphore,
}

impl Fleet {
    fn digest_id(&self, digest: &str) -> u8 {
        if digest == self.digests[0] {
            1
        } else if digest == self.digests[1] {
            2
        } else {
            0
        }
    }
}

/// Nanoseconds since the suite's clock origin; 0 is reserved for "not yet".
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(|| Instant::now() - Duration::from_secs(1));
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What an agent holds between sessions (the real agent keeps it on disk).
#[derive(Debug, Default)]
struct Held {
    generation: u64,
    epoch: String,
}

/// One simulated agent: its credentials and what the measurements read.
/// Kept small: 10,000 of them live in this process.
#[derive(Debug)]
pub struct Agent {
    pub name: String,
    tls: TlsMaterial,
    held: Mutex<Held>,
    /// Digest index (see [`Fleet`]) of the image in the set the agent holds.
    pub holds: AtomicU8,
    /// Digest index a fan-out waits for; 0 when none is awaited.
    pub want: AtomicU8,
    /// When a set holding `want` first arrived ([`now_ns`]); 0 until then.
    pub got_at: AtomicU64,
    /// Sessions established so far (the Connect call returned its stream).
    pub sessions: AtomicU64,
    /// A session is up now.
    pub connected: AtomicBool,
}

impl Agent {
    pub fn new(name: String, tls: TlsMaterial) -> Agent {
        Agent {
            name,
            tls,
            held: Mutex::new(Held::default()),
            holds: AtomicU8::new(0),
            want: AtomicU8::new(0),
            got_at: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        }
    }

    /// Arms the fan-out measurement for digest index `id`.
    pub fn expect(&self, id: u8) {
        self.got_at.store(0, Ordering::SeqCst);
        self.want.store(id, Ordering::SeqCst);
    }

    fn held(&self) -> (u64, String) {
        let h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        (h.generation, h.epoch.clone())
    }

    fn set_held(&self, generation: u64, epoch: &str) {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        h.generation = generation;
        if h.epoch != epoch {
            h.epoch = epoch.to_owned();
        }
    }

    /// Records that a set with image digest index `id` (0: none of ours) arrived.
    fn received(&self, id: u8) {
        if id == 0 {
            return;
        }
        self.holds.store(id, Ordering::SeqCst);
        if self.want.load(Ordering::SeqCst) == id {
            let _ = self
                .got_at
                .compare_exchange(0, now_ns(), Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

/// Runs one agent until the task is aborted: connect, hold the session,
/// reconnect with backoff when it breaks.
pub async fn run(agent: Arc<Agent>, fleet: Arc<Fleet>) {
    let mut attempt: u32 = 0;
    loop {
        let established = session(&agent, &fleet).await;
        agent.connected.store(false, Ordering::SeqCst);
        if established {
            attempt = 0;
        }
        let exp = BACKOFF_MIN
            .saturating_mul(2u32.saturating_pow(attempt.min(16)))
            .min(BACKOFF_MAX);
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(full_jitter(exp)).await;
    }
}

/// A delay drawn uniformly from zero to `d`, so agents cut off together do not
/// come back together.
fn full_jitter(d: Duration) -> Duration {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

/// One session; true when it was established (whatever ended it).
async fn session(agent: &Agent, fleet: &Fleet) -> bool {
    let Ok(permit) = fleet.gate.acquire().await else {
        return false;
    };
    let Ok(endpoint) = agent.tls.endpoint(&fleet.url) else {
        return false;
    };
    let channel = match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(c)) => c,
        _ => return false,
    };
    let (generation, epoch) = agent.held();
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(8);
    let hello = AgentMsg::Hello(pb::Hello {
        cluster_name: agent.name.clone(),
        agent_version: "imgfleet-bench".into(),
        current_generation: generation,
        current_epoch: epoch.clone(),
        storage: None,
    });
    if tx
        .send(pb::AgentMessage { msg: Some(hello) })
        .await
        .is_err()
    {
        return false;
    }
    let mut client = AgentServiceClient::new(channel);
    let response = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        client.connect(ReceiverStream::new(rx)),
    )
    .await
    {
        Ok(Ok(r)) => r,
        _ => return false,
    };
    drop(permit);
    agent.sessions.fetch_add(1, Ordering::SeqCst);
    agent.connected.store(true, Ordering::SeqCst);
    let mut inbound = response.into_inner();
    let (mut generation, mut epoch) = (generation, epoch);
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Ok(Some(msg)) = msg else { return true };
                last_heard = Instant::now();
                let ack = match msg.msg {
                    Some(HubMsg::DesiredSet(set)) => {
                        generation = set.generation;
                        epoch = set.epoch;
                        agent.set_held(generation, &epoch);
                        let id = set.images.iter().map(|i| fleet.digest_id(&i.digest)).find(|&i| i != 0).unwrap_or(0);
                        agent.received(id);
                        true
                    }
                    Some(HubMsg::Delta(delta)) => {
                        // A delta for another base must be ignored; the agent
                        // reconnects for a full set, as the protocol says.
                        if delta.epoch != epoch || delta.from_generation != generation {
                            return true;
                        }
                        generation = delta.generation;
                        agent.set_held(generation, &epoch);
                        let id = delta.upserts.iter().map(|i| fleet.digest_id(&i.digest)).find(|&i| i != 0).unwrap_or(0);
                        agent.received(id);
                        true
                    }
                    Some(HubMsg::Heartbeat(_) | HubMsg::Renewed(_)) | None => false,
                };
                if ack {
                    let msg = AgentMsg::Ack(pb::Ack { generation, epoch: epoch.clone(), error: String::new() });
                    if tx.send(pb::AgentMessage { msg: Some(msg) }).await.is_err() {
                        return true;
                    }
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() >= SILENCE {
                    return true;
                }
                seq += 1;
                let msg = AgentMsg::Heartbeat(pb::Heartbeat { sent_at: None, seq });
                if tx.send(pb::AgentMessage { msg: Some(msg) }).await.is_err() {
                    return true;
                }
            }
        }
    }
}
