//! Starting and stopping a hub: open the policy store and the keyring, load
//! or generate the PKI, then serve the gRPC services over mTLS and the
//! metrics endpoint until the shutdown token fires. Used by `main` and by
//! in-process tests (which listen on 127.0.0.1:0).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;
use tracing::{info, warn};

use crate::admin::AdminService;
use crate::ca::{CaError, HubPki};
use crate::config::{Config, SecretKeySource, StoreConfig};
use crate::controller::PlacementReports;
use crate::desired_cache::DesiredCache;
use crate::live::LiveClusters;
use crate::metrics::HubMetrics;
use crate::objects::Objects;
use crate::retry::Retry;
use crate::secrets::{Keyring, SecretsError};
use crate::session::AgentService;
use crate::status_writer::StatusWriter;
use crate::store::{PolicyStore, StoreError};
use crate::sweeper::Sweeper;

/// How long in-flight requests get to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long agent sessions get to end after shutdown is requested.
const SESSION_GRACE: Duration = Duration::from_secs(5);

/// Why the hub could not start. `Config` errors are the operator's to fix
/// (exit 64); the others may be transient (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory cannot be created.
    #[error("--data-dir {}: {source}", .path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TLS configuration is refused by the server.
    #[error("TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("{setting}: {source}")]
    Pki {
        setting: &'static str,
        #[source]
        source: CaError,
    },
    #[error("{setting}: {source}")]
    Keyring {
        setting: &'static str,
        #[source]
        source: SecretsError,
    },
    #[error("opening the policy store ({what}): {source}")]
    Store {
        what: String,
        #[source]
        source: StoreError,
    },
    #[error("{what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A bound listener whose address cannot be read.
    #[error("{what}: {source}")]
    LocalAddr {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The keyring does not fit what the store holds (or the store could not
    /// be read to tell).
    #[error(transparent)]
    KeyCheck(crate::keycheck::KeyCheckError),
    /// The built-in descriptors of the wire contract do not load (a build
    /// defect).
    #[error("gRPC reflection: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
}

impl StartError {
    /// True when the configuration is at fault (exit code 64).
    pub fn is_config(&self) -> bool {
        match self {
            StartError::DataDir { .. }
            | StartError::Tls(_)
            | StartError::Pki { .. }
            | StartError::Keyring { .. } => true,
            StartError::KeyCheck(e) => e.is_config(),
            _ => false,
        }
    }
}

/// Why a running hub stopped with a failure (one failing part stops the
/// whole hub; its supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Grpc(#[source] tonic::transport::Error),
    #[error("metrics server: {0}")]
    Metrics(#[source] std::io::Error),
    #[error("a hub task panicked: {0}")]
    Panicked(#[source] tokio::task::JoinError),
}

/// Which of the hub's parts run beside the admin API. The binary runs them
/// all; a test leaves out a part it plays itself, or whose writes would get
/// in its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// The agent API, with the desired-set controller, the desired-set
    /// cache, the status writer and the offline sweeper that serve it.
    pub agent_api: bool,
    /// The tag resolver and the registry health checks (leader-elected).
    pub resolver: bool,
}

impl Parts {
    /// Everything: the hub an operator runs.
    pub const ALL: Parts = Parts {
        agent_api: true,
        resolver: true,
    };
    /// The admin API alone.
    pub const ADMIN_ONLY: Parts = Parts {
        agent_api: false,
        resolver: false,
    };
}

/// What the hub's parts share.
#[derive(Clone, Debug)]
pub struct HubContext {
    pub objects: Objects,
    pub metrics: HubMetrics,
    pub pki: Arc<HubPki>,
    /// The desired-set controller's latest placement report, which the admin
    /// API shows as `status.placement`.
    pub placement: PlacementReports,
    pub shutdown: CancellationToken,
}

/// A started hub.
#[derive(Debug)]
pub struct RunningHub {
    /// The bound gRPC address (admin and agent APIs).
    pub grpc_addr: SocketAddr,
    /// The bound metrics address, if metrics are on.
    pub metrics_addr: Option<SocketAddr>,
    /// The generated admin bundle, in development mode.
    pub admin_dir: Option<PathBuf>,
    /// True when this start generated a new CA.
    pub first_start: bool,
    pub context: HubContext,
    tasks: JoinSet<Result<(), ServeError>>,
}

impl RunningHub {
    /// `https://127.0.0.1:PORT` for clients on this machine.
    pub fn url(&self) -> String {
        client_url(self.grpc_addr)
    }

    /// Request shutdown and wait (up to [`SHUTDOWN_GRACE`]) for in-flight
    /// requests to finish.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.context.shutdown.cancel();
        self.wait().await
    }

    /// Wait until the hub stops: after shutdown is requested, or when a
    /// server fails (which also cancels the rest).
    pub async fn wait(mut self) -> Result<(), ServeError> {
        let token = self.context.shutdown.clone();
        let mut first_err = None;
        loop {
            let next = tokio::select! {
                r = self.tasks.join_next() => r,
                _ = token.cancelled() => break,
            };
            match next {
                None => return first_err.map_or(Ok(()), Err),
                Some(r) => {
                    let r = r.map_err(ServeError::Panicked).and_then(|r| r);
                    if let Err(e) = r {
                        // One server failing takes the hub down; the
                        // supervisor restarts it.
                        first_err.get_or_insert(e);
                        token.cancel();
                        break;
                    }
                }
            }
        }
        let drain = async {
            while let Some(r) = self.tasks.join_next().await {
                if let Ok(Err(e)) = r {
                    first_err.get_or_insert(e);
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            warn!(grace = ?SHUTDOWN_GRACE, "Requests still in flight after the grace period; closing them");
            self.tasks.abort_all();
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// How a local client reaches `addr`: an unspecified address becomes loopback.
pub fn client_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => "127.0.0.1".to_string(),
            SocketAddr::V6(_) => "[::1]".to_string(),
        }
    } else {
        match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        }
    };
    format!("https://{ip}:{}", addr.port())
}

/// Open everything and start serving the admin API alone. Returns once the
/// listeners are bound, so callers may connect immediately.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<RunningHub, StartError> {
    start_with(config, shutdown, Parts::ADMIN_ONLY).await
}

/// Like [`start`], with the other `parts` on the same mTLS listener.
pub async fn start_with(
    config: Config,
    shutdown: CancellationToken,
    parts: Parts,
) -> Result<RunningHub, StartError> {
    create_private_dir(&config.data_dir)?;

    let pki = HubPki::load_or_init(&config).map_err(|source| StartError::Pki {
        setting: if config.tls.server.is_some() || config.tls.ca.is_some() {
            "TLS flags"
        } else {
            "--data-dir PKI"
        },
        source,
    })?;
    let (store, what): (Arc<dyn PolicyStore>, String) = match &config.store {
        StoreConfig::Embedded { path } => {
            let s = crate::store::redb::RedbStore::open(path)
                .await
                .map_err(|source| StartError::Store {
                    what: format!("embedded {}", path.display()),
                    source,
                })?;
            (Arc::new(s), format!("embedded {}", path.display()))
        }
        StoreConfig::Etcd { endpoints, prefix } => {
            let what = format!("etcd {} prefix {prefix}", endpoints.join(","));
            let s = crate::store::etcd::EtcdStore::connect(endpoints, prefix)
                .await
                .map_err(|source| StartError::Store {
                    what: what.clone(),
                    source,
                })?;
            (Arc::new(s), what)
        }
    };

    let (keyring, setting) = open_keyring(&config.secret_key, store.as_ref()).await?;
    let keyring = Arc::new(keyring);
    let objects = Objects::new(store, keyring.clone());
    crate::keycheck::verify(&objects, &keyring, &setting)
        .await
        .map_err(StartError::KeyCheck)?;

    let pki = Arc::new(pki);
    let metrics = HubMetrics::new();
    let placement = PlacementReports::default();
    let context = HubContext {
        objects: objects.clone(),
        metrics: metrics.clone(),
        pki: pki.clone(),
        placement: placement.clone(),
        shutdown: shutdown.clone(),
    };
    let admin = AdminService::new(
        objects,
        pki.ca.clone(),
        metrics.clone(),
        placement,
        shutdown.clone(),
    )
    .with_cluster_cert_lifetime(config.cluster_cert_lifetime);

    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "--listen",
            addr: config.listen,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::LocalAddr {
            what: "--listen",
            source,
        })?;
    let mut tasks = JoinSet::new();
    let readiness = crate::metrics::Readiness::new(context.objects.store().clone());
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let l = crate::metrics::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "--metrics-listen",
                    addr,
                    source,
                })?;
            let bound = l.local_addr().map_err(|source| StartError::LocalAddr {
                what: "--metrics-listen",
                source,
            })?;
            let m = metrics.clone();
            let ready = readiness.clone();
            let token = shutdown.clone();
            tasks.spawn(async move {
                crate::metrics::serve(l, m, ready, token)
                    .await
                    .map_err(ServeError::Metrics)
            });
            Some(bound)
        }
        None => None,
    };

    let mut routes = RoutesBuilder::default();
    routes.add_service(admin.into_server());
    let mut served = vec![ADMIN_SERVICE];
    if parts.agent_api {
        start_agent_api(&context, &config, &mut routes, &mut tasks);
        served.push(AGENT_SERVICE);
    }
    add_grpc_conventions(&mut routes, &mut tasks, readiness, served, shutdown.clone())?;
    if parts.resolver {
        let (objects, token) = (context.objects.clone(), shutdown.clone());
        let election = crate::resolve_loop::election(&config);
        let metrics = metrics.clone();
        tasks.spawn(async move {
            crate::resolve_loop::serve(objects, metrics, election, token).await;
            Ok(())
        });
    }
    {
        let (store, token) = (context.objects.store().clone(), shutdown.clone());
        let retention = config.audit_retention;
        tasks.spawn(async move {
            crate::audit::run_retention(store, retention, token).await;
            Ok(())
        });
    }
    let tls = pki.server.server_config();
    let router = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(StartError::Tls)?
        .add_routes(routes.routes());
    let token = shutdown.clone();
    tasks.spawn(async move {
        router
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(grpc_listener),
                token.cancelled_owned(),
            )
            .await
            .map_err(ServeError::Grpc)
    });

    info!(listen = %grpc_addr, metrics = ?metrics_addr, store = %what,
          enrollment = pki.ca.is_some(), "Hub serving");
    Ok(RunningHub {
        grpc_addr,
        metrics_addr,
        admin_dir: pki.admin_dir.clone(),
        first_start: pki.generated,
        context,
        tasks,
    })
}

/// The gRPC names of the hub's own services, as health checks name them.
const ADMIN_SERVICE: &str = "imgfleet.v1.AdminService";
const AGENT_SERVICE: &str = "imgfleet.v1.AgentService";
/// How often the health service's status follows readiness.
const HEALTH_PERIOD: Duration = Duration::from_secs(2);

/// The standard services generic tooling expects on a gRPC port, behind the
/// same mTLS as the rest (an unauthenticated caller does not get past the
/// handshake): `grpc.health.v1.Health`, whose status follows readiness (the
/// policy store answers), and server reflection (`grpc.reflection.v1`, and
/// `v1alpha` for older clients) of the wire contract.
fn add_grpc_conventions(
    routes: &mut RoutesBuilder,
    tasks: &mut JoinSet<Result<(), ServeError>>,
    readiness: crate::metrics::Readiness,
    served: Vec<&'static str>,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    use tonic_health::ServingStatus;
    let (reporter, health) = tonic_health::server::health_reporter();
    routes.add_service(health);
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(imgfleet::api::FILE_DESCRIPTOR_SET)
    };
    routes.add_service(builder().build_v1().map_err(StartError::Reflection)?);
    routes.add_service(builder().build_v1alpha().map_err(StartError::Reflection)?);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let status = tokio::select! {
                _ = tick.tick() => match readiness.check().await {
                    Ok(()) => ServingStatus::Serving,
                    Err(_) => ServingStatus::NotServing,
                },
                _ = shutdown.cancelled() => ServingStatus::NotServing,
            };
            // "" is the server as a whole.
            for name in std::iter::once("").chain(served.iter().copied()) {
                reporter.set_service_status(name, status).await;
            }
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
    });
    Ok(())
}

/// The agent API and what serves it: each task gets the handles it needs
/// of the desired-set cache and the live-session table, no more.
fn start_agent_api(
    context: &HubContext,
    config: &Config,
    routes: &mut RoutesBuilder,
    tasks: &mut JoinSet<Result<(), ServeError>>,
) {
    let objects = context.objects.clone();
    let store = objects.store().clone();
    let shutdown = context.shutdown.clone();
    let cache = DesiredCache::new();
    let live = LiveClusters::default();
    let (epoch_tx, epoch_rx) = watch::channel(None);
    context.metrics.attach_fleet(crate::fleet::FleetCollector {
        live: live.fleet(),
        desired: cache.snapshots(),
    });
    let service = AgentService::new(
        objects.clone(),
        epoch_rx,
        cache.sets(),
        live.sessions(),
        shutdown.clone(),
    )
    .with_renewal(context.pki.ca.clone(), config.cluster_cert_lifetime);
    routes.add_service(service.clone().into_server());
    let writer = StatusWriter {
        objects: objects.clone(),
        desired: cache.snapshots(),
        live: live.status_feed(),
        replica: replica_id(),
        offline_after: config.offline_after,
    };
    let sweeper = Sweeper {
        objects: objects.clone(),
        heard: live.last_heard(),
        offline_after: config.offline_after,
    };
    let controller = crate::controller::run(
        objects,
        context.placement.clone(),
        cache.handoff(),
        shutdown.clone(),
    );
    tasks.spawn(async move {
        tokio::join!(
            read_epoch(store.as_ref(), &epoch_tx, &shutdown),
            controller,
            cache.run(store.clone(), shutdown.clone()),
            writer.run(shutdown.clone()),
            sweeper.run(shutdown.clone()),
        );
        service.drain(SESSION_GRACE).await;
        Ok(())
    });
}

/// Reads (or creates) the hub epoch and publishes it to the sessions,
/// retrying until the store answers or `shutdown`.
async fn read_epoch(
    store: &dyn PolicyStore,
    epoch: &watch::Sender<Option<String>>,
    shutdown: &CancellationToken,
) {
    let mut retry = Retry::new("Reading the hub epoch");
    loop {
        match crate::desired::ensure_epoch(store).await {
            Ok(e) => {
                epoch.send_replace(Some(e));
                return;
            }
            Err(e) => {
                if !retry.wait_after(&e, shutdown).await {
                    return;
                }
            }
        }
    }
}

/// The id of this hub replica as shown in `Cluster.status.hubReplica`:
/// host name, process id and a counter (several hubs may share a process in
/// tests).
pub fn replica_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
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
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if n == 0 {
        format!("{host}-{}", std::process::id())
    } else {
        format!("{host}-{}-{n}", std::process::id())
    }
}

/// The keyring and how its setting is named in errors. A missing key file
/// is created only on a store that holds nothing sealed yet: over sealed
/// data a new key could open nothing.
async fn open_keyring(
    source: &SecretKeySource,
    store: &dyn PolicyStore,
) -> Result<(Keyring, String), StartError> {
    match source {
        SecretKeySource::File(path) => {
            let setting = format!("--secret-key-file {}", path.display());
            let exists = std::fs::symlink_metadata(path).is_ok();
            if !exists
                && crate::keycheck::store_has_sealed_data(store)
                    .await
                    .map_err(StartError::KeyCheck)?
            {
                return Err(StartError::KeyCheck(
                    crate::keycheck::KeyCheckError::KeyMissing { setting },
                ));
            }
            let ring = Keyring::load_or_create(path).map_err(|source| StartError::Keyring {
                setting: "--secret-key-file",
                source,
            })?;
            Ok((ring, setting))
        }
        SecretKeySource::Raw(bytes) => {
            let ring = Keyring::from_key("flag", bytes).map_err(|source| StartError::Keyring {
                setting: "--secret-key",
                source,
            })?;
            Ok((ring, "--secret-key".to_string()))
        }
    }
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), StartError> {
    let err = |source: std::io::Error| StartError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        // The data directory holds the CA key and the keyring: only a
        // directory this hub created is tightened, never an operator's own.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}
