//! A scripted hub for the daemon tests: a real tonic `AgentService` over real
//! mTLS (certificates from `CertificateAuthority`), run on its own runtime in
//! its own thread so that stopping it kills every connection at once, as a hub
//! crash does. It records what agents send and sends what the test says.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use imgfleet::api::v1 as pb;
use imgfleet::api::v1::agent_service_server::{AgentService, AgentServiceServer};
use imgfleet_common::pki::{CertificateAuthority, Identity};
use imgfleet_common::tls::{TlsMaterial, peer_identity};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub const BIN: &str = env!("CARGO_BIN_EXE_imgfleet-agent");

/// What the hub heard, across all its sessions and restarts.
#[derive(Debug, Default)]
pub struct Record {
    pub sessions: u64,
    pub hellos: Vec<pb::Hello>,
    pub acks: Vec<pb::Ack>,
    /// Every progress message, with the session it came in.
    pub progress: Vec<(u64, pb::Progress)>,
    /// When each progress message arrived.
    pub progress_at: Vec<std::time::Instant>,
    /// Latest state per image key.
    pub latest: BTreeMap<String, pb::ImageProgress>,
    pub heartbeats: u64,
    /// Full sets and deltas sent, with the session.
    pub sent: Vec<(u64, pb::HubMessage)>,
}

#[derive(Debug, Default)]
struct HubState {
    set: pb::DesiredSet,
    live: Option<(u64, mpsc::UnboundedSender<Result<pb::HubMessage, Status>>)>,
    record: Record,
}

#[derive(Clone)]
struct Svc {
    state: Arc<Mutex<HubState>>,
}

type HubStream = Pin<Box<dyn Stream<Item = Result<pb::HubMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Svc {
    type ConnectStream = HubStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<HubStream>, Status> {
        let name = match peer_identity(&request) {
            Ok(Identity::Cluster(n)) => n,
            Ok(other) => return Err(Status::permission_denied(format!("{other} is no cluster"))),
            Err(e) => return Err(Status::unauthenticated(e.to_string())),
        };
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.msg) {
            Some(pb::agent_message::Msg::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("first message must be Hello")),
        };
        if hello.cluster_name != name {
            return Err(Status::permission_denied(format!(
                "certificate is for cluster {name}, hello claims {}",
                hello.cluster_name
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let session = {
            let mut st = self.state.lock().unwrap();
            st.record.sessions += 1;
            let session = st.record.sessions;
            let current = (st.set.epoch.clone(), st.set.generation);
            if (hello.current_epoch.clone(), hello.current_generation) != current {
                let msg = pb::HubMessage {
                    msg: Some(pb::hub_message::Msg::DesiredSet(st.set.clone())),
                };
                st.record.sent.push((session, msg.clone()));
                let _ = tx.send(Ok(msg));
            }
            st.record.hellos.push(hello);
            st.live = Some((session, tx.clone()));
            session
        };
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let mut st = state.lock().unwrap();
                match m.msg {
                    Some(pb::agent_message::Msg::Ack(a)) => st.record.acks.push(a),
                    Some(pb::agent_message::Msg::Progress(p)) => {
                        for i in &p.images {
                            st.record.latest.insert(i.key.clone(), i.clone());
                        }
                        st.record.progress.push((session, p));
                        st.record.progress_at.push(std::time::Instant::now());
                    }
                    Some(pb::agent_message::Msg::Heartbeat(_)) => st.record.heartbeats += 1,
                    _ => {}
                }
            }
        });
        let hb = tx.clone();
        tokio::spawn(async move {
            let mut seq = 0;
            let mut every = tokio::time::interval(Duration::from_secs(2));
            every.tick().await;
            loop {
                every.tick().await;
                seq += 1;
                let msg = pb::HubMessage {
                    msg: Some(pb::hub_message::Msg::Heartbeat(pb::Heartbeat {
                        sent_at: None,
                        seq,
                    })),
                };
                if hb.send(Ok(msg)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

/// The running server: a thread with its own runtime.
struct ServerThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A scripted hub on a fixed loopback port; stop and start it at will.
pub struct FakeHub {
    pub port: u16,
    tls: TlsMaterial,
    state: Arc<Mutex<HubState>>,
    server: Option<ServerThread>,
}

impl FakeHub {
    /// A hub holding `set`, serving on a free port.
    pub fn start(tls: TlsMaterial, set: pb::DesiredSet) -> FakeHub {
        let mut hub = FakeHub {
            port: imgfleet_tests::process::free_port(),
            tls,
            state: Arc::new(Mutex::new(HubState {
                set,
                ..Default::default()
            })),
            server: None,
        };
        hub.restart();
        hub
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Kills the server and every session, as a crash would.
    pub fn stop(&mut self) {
        self.state.lock().unwrap().live = None;
        self.server = None;
    }

    /// Starts serving again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc = Svc {
            state: self.state.clone(),
        };
        let tls = self.tls.server_config();
        let port = self.port;
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("hub runtime");
            rt.block_on(async move {
                let listener = (|| {
                    let s = tokio::net::TcpSocket::new_v4()?;
                    s.set_reuseaddr(true)?;
                    s.bind(([127, 0, 0, 1], port).into())?;
                    s.listen(128)
                })();
                let listener = match listener {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let server = tonic::transport::Server::builder()
                    .tls_config(tls)
                    .expect("hub tls")
                    .add_service(AgentServiceServer::new(svc))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
                tokio::select! {
                    _ = server => {}
                    _ = stop_rx => {}
                }
            });
            // Drops every connection task with the runtime.
            rt.shutdown_background();
        });
        ready_rx.recv().expect("hub thread").expect("hub listens");
        self.server = Some(ServerThread {
            stop: Some(stop_tx),
            thread: Some(thread),
        });
    }

    /// Reads what was heard.
    pub fn record<T>(&self, f: impl FnOnce(&Record) -> T) -> T {
        f(&self.state.lock().unwrap().record)
    }

    /// The hub's set now, for the next Hello.
    pub fn set(&self) -> pb::DesiredSet {
        self.state.lock().unwrap().set.clone()
    }

    /// Sends a delta to the live session and makes `next` the hub's set.
    pub fn push_delta(&self, delta: pb::DesiredSetDelta, next: pb::DesiredSet) {
        let mut st = self.state.lock().unwrap();
        st.set = next;
        let msg = pb::HubMessage {
            msg: Some(pb::hub_message::Msg::Delta(delta)),
        };
        if let Some((session, tx)) = st.live.clone() {
            st.record.sent.push((session, msg.clone()));
            let _ = tx.send(Ok(msg));
        }
    }

    /// Changes the set without telling anyone (as while the hub is down).
    pub fn set_quietly(&self, next: pb::DesiredSet) {
        self.state.lock().unwrap().set = next;
    }
}

/// A CA, the hub's server material and one cluster's credentials directory.
pub struct Pki {
    pub ca: CertificateAuthority,
    pub server: TlsMaterial,
    pub creds_dir: PathBuf,
}

pub fn pki(dir: &Path, cluster: &str) -> Pki {
    let ca = CertificateAuthority::generate().unwrap();
    let s = ca.issue_server(&[], 30).unwrap();
    let server = TlsMaterial {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: s.cert_pem,
        key_pem: s.key_pem,
    };
    let c = ca.issue_cluster(cluster, 30).unwrap();
    let creds_dir = dir.join("creds");
    TlsMaterial {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: c.cert_pem,
        key_pem: c.key_pem,
    }
    .write_to_dir(&creds_dir)
    .unwrap();
    Pki {
        ca,
        server,
        creds_dir,
    }
}

/// A desired image entry as the hub sends it.
pub fn image(
    registry: &str,
    name: &str,
    repository: &str,
    digest: &str,
    tag: &str,
) -> pb::DesiredImage {
    pb::DesiredImage {
        key: format!("default/{name}@{digest}"),
        source: Some(pb::ObjectRef {
            name: name.into(),
            namespace: "default".into(),
        }),
        registry_key: "default/lab".into(),
        registry: registry.into(),
        repository: repository.into(),
        digest: digest.into(),
        tags: vec![tag.into()],
        ..Default::default()
    }
}

pub fn credential(domain: &str, user: &str, password: &str) -> pb::RegistryCredential {
    pb::RegistryCredential {
        key: "default/lab".into(),
        domain: domain.into(),
        username: user.into(),
        password: password.into(),
        insecure: true,
        provider: 0,
    }
}

/// The agent binary's command line for one data dir.
pub struct AgentCmd {
    pub hubs: Vec<String>,
    pub creds: PathBuf,
    pub data: PathBuf,
    pub mirror_port: u16,
    pub metrics_port: u16,
}

impl AgentCmd {
    /// The command line of an agent with the credentials of `pki` and a
    /// data dir in `dir`, on free ports, talking to `hubs`.
    pub fn new(dir: &Path, pki: &Pki, hubs: Vec<String>) -> AgentCmd {
        AgentCmd {
            hubs,
            creds: pki.creds_dir.clone(),
            data: dir.join("data"),
            mirror_port: imgfleet_tests::process::free_port(),
            metrics_port: imgfleet_tests::process::free_port(),
        }
    }

    pub fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("--hub")
            .arg(self.hubs.join(","))
            .arg("--credentials")
            .arg(&self.creds)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--mirror-listen")
            .arg(format!("127.0.0.1:{}", self.mirror_port))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .env("RUST_LOG", "imgfleet_agent=info");
        cmd
    }

    pub fn mirror(&self) -> String {
        format!("127.0.0.1:{}", self.mirror_port)
    }
}

/// A hub holding `set` for the cluster `cluster`, and an agent's command
/// line for it, both under `dir`.
pub fn hub_and_agent(dir: &Path, cluster: &str, set: pb::DesiredSet) -> (FakeHub, AgentCmd) {
    let pki = pki(dir, cluster);
    let hub = FakeHub::start(pki.server.clone(), set);
    let cmd = AgentCmd::new(dir, &pki, vec![hub.url()]);
    (hub, cmd)
}

/// Sends SIGTERM and waits for exit status 0.
pub async fn stops_with_0_on_sigterm(agent: &mut imgfleet_tests::process::ChildGuard) {
    agent.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    imgfleet_tests::process::wait_until("exit 0 after SIGTERM", Duration::from_secs(15), || {
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
}

/// The body of a GET that must succeed.
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

pub fn phase_of(p: &pb::ImageProgress) -> pb::ImagePhase {
    pb::ImagePhase::try_from(p.phase).unwrap_or(pb::ImagePhase::Unspecified)
}
