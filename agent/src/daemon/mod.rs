//! The agent daemon: the hub session, the reconciler that turns the held
//! desired set into synced images, the mirror, GC and `/metrics`, for the
//! whole life of the process.
//!
//! The reconciler never waits for the hub: it starts from the set persisted on
//! disk and follows the session's `watch` of it, so the agent keeps syncing and
//! serving through hub outages and its own restarts.
//!
//! - [`config`]: the flags, checked into a [`Config`] (exit 64 on a bad one).
//! - [`reconciler`]: the held set to synced images, and GC.
//! - `metrics`: `/metrics` and `/healthz`.
//! - This file: opening the data dir and listeners, and the tasks' lives.

mod config;
mod metrics;
pub mod reconciler;

pub use config::{Config, DaemonArgs};
pub use reconciler::{Reconciler, retry_delay};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::desired::{DesiredFile, DesiredFileError, DesiredSet};
use crate::report::ProgressBook;
use crate::session::{Session, SessionConfig, SessionStatus};
use crate::store::{Store, StoreError};
use crate::transfer::Engine;
use metrics::MetricsState;
use reconciler::storage_report;

/// How long in-flight mirror requests may run on after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `--mirror-auth token` with a CA certificate that cannot check tokens.
    #[error("--mirror-auth token: {0}")]
    PullTokens(#[source] imgfleet_common::pull_token::TokenError),
    /// The content store would not open (locked by another agent, say).
    #[error("opening the content store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    /// The local key or the desired-set file is unusable.
    #[error(transparent)]
    DesiredFile(#[from] DesiredFileError),
    /// A listen address is taken or not ours.
    #[error("listening on {setting} {addr}: {source}")]
    Listen {
        setting: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Opening the data dir on the blocking pool did not finish.
    #[error("opening the data dir {path}: {source}")]
    Task {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The data dir, opened: the content store, the desired-set file and the
/// set it holds.
struct DataDir {
    store: Arc<Store>,
    file: Arc<DesiredFile>,
    held: DesiredSet,
}

/// Runs the daemon until `shutdown`; then stops accepting, lets transfers
/// stop where they are (partials stay on disk for the next start) and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let DataDir { store, file, held } = open_data_dir(&config.data_dir).await?;
    info!(
        cluster = %config.cluster,
        generation = held.generation,
        images = held.images.len(),
        "Starting from the held desired set"
    );
    let mirror = bind("--mirror-listen", config.mirror_listen).await?;
    let metrics = match config.metrics_listen {
        Some(addr) => Some(bind("--metrics-listen", addr).await?),
        None => None,
    };
    let mirror_addr = mirror.local_addr().ok();
    let book = ProgressBook::new();
    book.set_storage(storage_report(&store).await);
    let status = Arc::new(SessionStatus::default());
    let (desired_tx, desired_rx) = watch::channel(Arc::new(held));
    let engine = Arc::new(Engine::new(store.clone(), config.engine.clone()));
    let mirror_stats = Arc::new(crate::mirror::Stats::default());

    let tasks = TaskTracker::new();
    let token_auth = if config.mirror_token_auth {
        Some(crate::mirror::TokenAuth {
            verifier: imgfleet_common::pull_token::Verifier::new(
                &config.tls.ca_pem,
                &config.cluster,
            )
            .map_err(DaemonError::PullTokens)?,
            desired: desired_rx.clone(),
            not_before: status.tokens_not_before.clone(),
        })
    } else {
        None
    };
    tasks.spawn(serve_mirror(
        mirror,
        store,
        config.mirror.clone(),
        mirror_stats.clone(),
        token_auth,
        shutdown.clone(),
    ));
    if let Some(listener) = metrics {
        let state = MetricsState {
            book: book.clone(),
            status: status.clone(),
            engine: engine.clone(),
            desired: desired_rx.clone(),
            mirror: mirror_stats,
        };
        tasks.spawn(serve_metrics(listener, state, shutdown.clone()));
    }
    let mut session_config = SessionConfig::new(
        config.hubs.clone(),
        config.tls.clone(),
        config.cluster.clone(),
    );
    session_config.credentials_dir = config.credentials_dir.clone();
    let session = Session::new(session_config, file, desired_tx, book.clone(), status);
    tasks.spawn(session.run(shutdown.clone()));
    let reconciler = Reconciler::new(
        engine,
        desired_rx,
        book,
        config.gc,
        config.engine.concurrency_images,
    );
    tasks.spawn(reconciler.run(shutdown.clone()));
    tasks.close();
    println!(
        "imgfleet-agent for cluster {} serving the mirror on http://{}",
        config.cluster,
        mirror_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    stopped(&tasks, &shutdown).await;
    Ok(())
}

/// Opens the content store (taking its lock) and the desired-set file on
/// the blocking pool. A set that cannot be read is left behind: the hub
/// resends a full set to an agent that holds none.
async fn open_data_dir(data_dir: &std::path::Path) -> Result<DataDir, DaemonError> {
    let dir = data_dir.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || {
        let store = Store::open(&dir).map_err(|source| DaemonError::Store {
            path: dir.clone(),
            source,
        })?;
        let file = DesiredFile::open(&dir)?;
        let held = file.load().unwrap_or_else(|e| {
            error!(error = %e, "Cannot read the held desired set; starting with none");
            DesiredSet::default()
        });
        Ok::<_, DaemonError>(DataDir {
            store: Arc::new(store),
            file: Arc::new(file),
            held,
        })
    });
    opened.await.map_err(|source| DaemonError::Task {
        path: data_dir.to_path_buf(),
        source,
    })?
}

async fn bind(setting: &'static str, addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen {
            setting,
            addr,
            source,
        })
}

async fn serve_mirror(
    listener: TcpListener,
    store: Arc<Store>,
    limits: crate::mirror::Limits,
    stats: Arc<crate::mirror::Stats>,
    auth: Option<crate::mirror::TokenAuth>,
    shutdown: CancellationToken,
) {
    let served =
        crate::mirror::serve_with_auth(listener, store, limits, stats, auth, shutdown).await;
    if let Err(e) = served {
        error!(error = %e, "Mirror stopped");
    }
}

async fn serve_metrics(listener: TcpListener, state: MetricsState, shutdown: CancellationToken) {
    let served = axum::serve(listener, metrics::router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        error!(error = %e, "Metrics server stopped");
    }
}

/// Waits until every task ended. After shutdown, in-flight mirror responses
/// get a bounded grace period; transfers stop at once (their partials are
/// resumed on the next start).
async fn stopped(tasks: &TaskTracker, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tasks.wait() => info!("Stopped"),
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => warn!(grace = ?SHUTDOWN_GRACE, "Stopped with requests still in flight"),
    }
}
