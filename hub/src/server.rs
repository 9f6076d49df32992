//! Starting and stopping a hub: open the policy store and the keyring, load
//! or generate the PKI, then serve the gRPC services over mTLS and the
//! metrics endpoint until the shutdown token fires. Used by `main` and by
//! in-process tests (which listen on 127.0.0.1:0).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;
use tracing::{info, warn};

use crate::admin::AdminService;
use crate::ca::{CaError, HubPki};
use crate::config::{Config, SecretKeySource, StoreConfig};
use crate::metrics::HubMetrics;
use crate::objects::Objects;
use crate::secrets::{Keyring, SecretsError};
use crate::store::{PolicyStore, StoreError};

/// How long in-flight requests get to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the hub could not start. `Config` errors are the operator's to fix
/// (exit 64); the others may be transient (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
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
    #[error("{0}")]
    Io(String),
    /// The keyring does not fit what the store holds (or the store could not
    /// be read to tell).
    #[error(transparent)]
    KeyCheck(crate::keycheck::KeyCheckError),
}

impl StartError {
    /// True when the configuration is at fault (exit code 64).
    pub fn is_config(&self) -> bool {
        match self {
            StartError::Config(_) | StartError::Pki { .. } | StartError::Keyring { .. } => true,
            StartError::KeyCheck(e) => e.is_config(),
            _ => false,
        }
    }
}

/// Everything the hub's services share. Other services (the agent API) are
/// built from this.
#[derive(Clone, Debug)]
pub struct HubContext {
    pub objects: Objects,
    pub metrics: HubMetrics,
    pub pki: Arc<HubPki>,
    /// The desired-set controller's latest placement report, which the admin
    /// API shows as `status.placement`.
    pub placement: crate::fleet::PlacementReports,
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
    tasks: JoinSet<Result<(), String>>,
}

impl RunningHub {
    /// `https://127.0.0.1:PORT` for clients on this machine.
    pub fn url(&self) -> String {
        client_url(self.grpc_addr)
    }

    /// Request shutdown and wait (up to [`SHUTDOWN_GRACE`]) for in-flight
    /// requests to finish.
    pub async fn stop(self) -> Result<(), String> {
        self.context.shutdown.cancel();
        self.wait().await
    }

    /// Wait until the hub stops: after shutdown is requested, or when a
    /// server fails (which also cancels the rest).
    pub async fn wait(mut self) -> Result<(), String> {
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
                    let r = r
                        .map_err(|e| format!("server task panicked: {e}"))
                        .and_then(|r| r);
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

/// Adds a gRPC service (such as the agent API) to the hub's listener.
pub type ServiceHook = Box<dyn FnOnce(&HubContext, &mut RoutesBuilder) + Send>;
/// A long-running part of the hub (such as the tag resolver): it must return
/// when the context's shutdown token fires; an `Err` stops the hub.
pub type TaskHook = Box<dyn FnOnce(HubContext) -> BoxFuture<'static, Result<(), String>> + Send>;

/// What other parts of the hub plug into [`start_with`].
#[derive(Default)]
pub struct Extensions {
    pub services: Vec<ServiceHook>,
    pub tasks: Vec<TaskHook>,
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extensions")
            .field("services", &self.services.len())
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

/// Open everything and start serving the admin API. Returns once the
/// listeners are bound, so callers may connect immediately.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<RunningHub, StartError> {
    start_with(config, shutdown, Extensions::default()).await
}

/// Like [`start`], with further services on the same mTLS listener and
/// further background tasks.
pub async fn start_with(
    config: Config,
    shutdown: CancellationToken,
    extensions: Extensions,
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
    let placement = crate::fleet::PlacementReports::default();
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
    );

    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "--listen",
            addr: config.listen,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|e| StartError::Io(format!("--listen: {e}")))?;
    let mut tasks = JoinSet::new();
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let l = crate::metrics::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "--metrics-listen",
                    addr,
                    source,
                })?;
            let bound = l
                .local_addr()
                .map_err(|e| StartError::Io(format!("--metrics-listen: {e}")))?;
            let m = metrics.clone();
            let ready = crate::metrics::Readiness::new(context.objects.store().clone());
            let token = shutdown.clone();
            tasks.spawn(async move {
                crate::metrics::serve(l, m, ready, token)
                    .await
                    .map_err(|e| format!("metrics server: {e}"))
            });
            Some(bound)
        }
        None => None,
    };

    let mut routes = RoutesBuilder::default();
    routes.add_service(admin.into_server());
    for hook in extensions.services {
        hook(&context, &mut routes);
    }
    for task in extensions.tasks {
        tasks.spawn(task(context.clone()));
    }
    let tls = pki.server.server_config();
    let router = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| StartError::Config(format!("TLS configuration: {e}")))?
        .add_routes(routes.routes());
    let token = shutdown.clone();
    tasks.spawn(async move {
        router
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(grpc_listener),
                token.cancelled_owned(),
            )
            .await
            .map_err(|e| format!("gRPC server: {e}"))
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
    let err = |e: std::io::Error| StartError::Config(format!("--data-dir {}: {e}", dir.display()));
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
