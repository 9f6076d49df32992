//! The `imgfleet-agent` binary: the daemon (hub session, sync, mirror),
//! standalone sync, the mirror server, and the containerd `hosts.toml` generator.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use imgfleet_agent::cli::{Cli, Command, SyncArgs};
use imgfleet_agent::gc::{self, GcPolicy};
use imgfleet_agent::standalone::{self, ResolveFailure};
use imgfleet_agent::store::Store;
use imgfleet_agent::transfer::{Engine, EngineConfig, Phase, Progress, SyncReport};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    tune_malloc();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // The daemon's log is its record of sessions and transfers; one-shot
    // commands print their own summary.
    let default_filter = match cli.command {
        None | Some(Command::Run(_)) => "info",
        Some(_) => "warn",
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The trace exporter, when asked for, runs on the runtime.
    let telemetry = {
        let _entered = runtime.enter();
        imgfleet_common::telemetry::init(
            "imgfleet-agent",
            imgfleet_common::telemetry::LogOptions {
                json: false,
                // Colour codes only on a terminal: the daemon's log usually goes to a file.
                ansi: std::io::stderr().is_terminal(),
                default_filter,
            },
        )
    };
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let result = runtime.block_on(run(cli));
    {
        // Export the last spans while the runtime still runs.
        let _entered = runtime.enter();
        telemetry.shutdown();
    }
    imgfleet::process::exit_code(result)
}

/// The malloc tunable the agent runs with, and its value: glibc's default
/// mmap threshold (128 KiB), fixed.
/// Set in the environment of the re-executed agent (see [`tune_malloc`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const REEXEC_MARKER: &str = "IMGFLEET_AGENT_MALLOC_TUNED";

#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_TUNABLE: (&str, &str) = ("glibc.malloc.mmap_threshold", "131072");

/// Re-executes the agent once (same pid, same arguments) with glibc's mmap
/// threshold fixed at 128 KiB.
///
/// Why: by default glibc raises the threshold each time a large block is
/// freed (up to 32 MiB); from then on the transfers' 1 MiB buffers come from
/// per-thread malloc arenas, which keep the memory after it is freed. Measured
/// on the release daemon after a 256 MiB sync: 19.8 MB idle RSS untuned
/// against 12.3 MB tuned (28.6 MB against 12.4 MB with 16 runtime workers),
/// with the same throughput. A glibc tunable is read only at process start,
/// and `mallopt` is out of reach without unsafe code, hence the exec.
///
/// An operator's own setting of this tunable in GLIBC_TUNABLES wins. The
/// re-executed agent finds [`REEXEC_MARKER`] set and goes on: glibc drops
/// GLIBC_TUNABLES for privileged (setuid or file-capability) programs, so the
/// tunable alone cannot end the recursion. When exec fails the agent runs on
/// untuned; nothing else changes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    use std::os::unix::process::CommandExt as _;
    if std::env::var_os(REEXEC_MARKER).is_some() {
        return;
    }
    let (name, value) = MMAP_THRESHOLD_TUNABLE;
    let current = match std::env::var("GLIBC_TUNABLES") {
        Ok(c) => c,
        Err(std::env::VarError::NotPresent) => String::new(),
        // Not ours to rewrite.
        Err(std::env::VarError::NotUnicode(_)) => return,
    };
    if current.contains(name) {
        return;
    }
    let tunables = if current.is_empty() {
        format!("{name}={value}")
    } else {
        format!("{current}:{name}={value}")
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    // Returns only on failure.
    let err = cmd
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .env(REEXEC_MARKER, "1")
        .exec();
    eprintln!("warning: cannot re-execute with {name}={value} ({err}); running untuned");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// Most runtime worker threads the agent uses. Its work is moving bytes at
/// link speed; hashing and file writes run on the blocking pool. More workers
/// only add stacks and malloc arenas on nodes with many cores.
const MAX_WORKERS: usize = 4;
/// Most blocking-pool threads (tokio's default is 512): file writes and
/// hashes of at most `--concurrency-blobs` transfers plus mirror reads.
const MAX_BLOCKING_THREADS: usize = 64;
/// Idle blocking threads exit after this (tokio's default is 10 s).
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(5);

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.clamp(1, MAX_WORKERS))
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .enable_all()
        .build()
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let command = cli.command.unwrap_or(Command::Run(cli.daemon));
    match command {
        Command::Run(args) => run_daemon(args).await,
        Command::Sync(args) => sync(args).await,
        Command::Serve {
            data_dir,
            mirror_listen,
            limits,
        } => match limits.token_auth().and_then(|token| {
            if token {
                Err(imgfleet_agent::settings::ConfigError::new(
                    "--mirror-auth token",
                    "needs the daemon, which holds the hub's CA and the cluster's desired set: run imgfleet-agent --credentials DIR",
                ))
            } else {
                limits.limits()
            }
        }) {
            Ok(limits) => serve(data_dir, mirror_listen, limits)
                .await
                .map(|()| ExitCode::SUCCESS),
            Err(e) => Ok(usage_error(e)),
        },
        Command::HostsToml {
            mirror,
            upstream,
            out_dir,
            token_file,
        } => hosts_toml(&mirror, &upstream, out_dir.as_deref(), token_file.as_deref()),
    }
}

/// The one exit for bad settings: the message names the setting, and the
/// status is 64 (`EX_USAGE`), apart from anything that went wrong later.
fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(64)
}

/// `hosts-toml`: every input checked (exit 64 naming the bad one), since
/// each ends up in a TOML file containerd trusts.
fn hosts_toml(
    mirror: &str,
    upstreams: &[String],
    out_dir: Option<&std::path::Path>,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let token_text = match token_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) => {
                return Ok(usage_error(format!("--token-file {}: {e}", path.display())));
            }
        },
    };
    let token = match &token_text {
        None => None,
        Some(t) => match standalone::parse_token(t) {
            Some(t) => Some(t),
            None => {
                return Ok(usage_error(format!(
                    "--token-file {}: expected a pull token from imgfleet cluster pull-token",
                    token_file
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )));
            }
        },
    };
    let checked = standalone::parse_mirror_url(mirror).and_then(|m| {
        let ups = upstreams
            .iter()
            .map(|u| standalone::Upstream::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((m, ups))
    });
    let (mirror, ups) = match checked {
        Ok(c) => c,
        Err(e) => return Ok(usage_error(e)),
    };
    let files = standalone::hosts_toml(&mirror, &ups, token);
    match out_dir {
        None => {
            for (_, text) in files {
                print!("{text}");
            }
        }
        Some(dir) => {
            for (name, text) in files {
                let sub = dir.join(name);
                std::fs::create_dir_all(&sub)
                    .with_context(|| format!("creating {}", sub.display()))?;
                let path = sub.join("hosts.toml");
                // With a token the file holds a secret.
                let mode = if token.is_some() { 0o600 } else { 0o644 };
                imgfleet_common::pki::write_atomic(&path, text.as_bytes(), mode)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon: exit 64 on bad configuration, 0 after SIGTERM or Ctrl-C.
async fn run_daemon(args: imgfleet_agent::daemon::DaemonArgs) -> anyhow::Result<ExitCode> {
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => return Ok(usage_error(e)),
    };
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Signal received; stopping");
        trigger.cancel();
    });
    imgfleet_agent::daemon::run(config, shutdown)
        .await
        .context("running the agent daemon")?;
    Ok(ExitCode::SUCCESS)
}

/// The engine's settings of `sync`, with the extra CA roots read.
fn engine_config(args: &SyncArgs) -> anyhow::Result<EngineConfig> {
    let mut config = EngineConfig {
        concurrency_images: args.concurrency_images,
        concurrency_blobs: args.concurrency_blobs,
        bandwidth_limit: args.bandwidth_limit,
        min_progress: Some(imgfleet_common::registry::MinProgress {
            window: args.stall_timeout,
            ..Default::default()
        }),
        ..EngineConfig::default()
    };
    config.retry.max_retries = args.retries;
    for f in &args.ca_file {
        config
            .extra_roots_pem
            .push(std::fs::read(f).with_context(|| format!("reading --ca-file {}", f.display()))?);
    }
    Ok(config)
}

/// `sync --from FILE`: read the YAML, resolve its tags, sync the images,
/// push them to the edge registry if asked, then collect what the file no
/// longer names. Exit 64 for a file that does not validate, 1 when an
/// image failed.
async fn sync(args: SyncArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let config = engine_config(&args)?;
    let push = args.push.config(
        config.extra_roots_pem.clone(),
        args.concurrency_images,
        args.concurrency_blobs,
        args.retries,
    )?;
    let from = &args.from;
    let text = tokio::fs::read_to_string(from)
        .await
        .with_context(|| format!("reading {}", from.display()))?;
    let targets = match standalone::targets_from_yaml(&text) {
        Ok(t) => t,
        Err(errors) => {
            for e in errors {
                eprintln!("error: {}: {e}", from.display());
            }
            return Ok(ExitCode::from(64));
        }
    };
    if targets.is_empty() {
        println!("No Repository to sync in {}.", from.display());
    }
    let engine = open_engine(&args.data_dir, config).await?;
    tracing::debug!(elapsed = ?started.elapsed(), targets = targets.len(), "Store opened");
    let (pulls, failures) = standalone::resolve(&engine, &targets).await;
    tracing::debug!(elapsed = ?started.elapsed(), images = pulls.len(), "Tags resolved");

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let display = tokio::spawn(show_progress(rx, std::io::stderr().is_terminal()));
    let mut reports = engine.sync(pulls, Some(tx)).await;
    reports.sort_by(|a, b| a.image.key.cmp(&b.image.key));
    tracing::debug!(elapsed = ?started.elapsed(), "Images synced");
    let _ = display.await;

    let ok = print_summary(&reports, &failures, started.elapsed());
    // Pushed from the store after the sync, so a failed push leaves the
    // synced content in place for the next run.
    let ok = match push {
        Some(p) => imgfleet_agent::edge::push_synced(p, engine.store(), &reports).await? && ok,
        None => ok,
    };
    // Collected even when some images failed: a failed image is still wanted
    // (its content stays), and a repository whose tags did not resolve loses
    // nothing; everything else follows its retention.
    if !args.no_gc {
        let policy = GcPolicy {
            grace_period: args.grace_period,
            keep_versions: args.keep_versions as usize,
        };
        collect(engine.store(), &targets, &reports, &failures, policy).await?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The content store in `data_dir`, opened (and locked) on the blocking
/// pool, under a new engine.
async fn open_engine(data_dir: &std::path::Path, config: EngineConfig) -> anyhow::Result<Engine> {
    let dir = data_dir.to_path_buf();
    let store = tokio::task::spawn_blocking(move || Store::open(dir))
        .await?
        .with_context(|| format!("opening the content store {}", data_dir.display()))?;
    Ok(Engine::new(Arc::new(store), config))
}

/// GC after a sync: every image of the file is wanted, each repository with
/// the retention merged over the Repositories naming it; repositories with
/// a tag that did not resolve lose nothing.
async fn collect(
    store: &Arc<Store>,
    targets: &[standalone::Target],
    reports: &[SyncReport],
    failures: &[ResolveFailure],
    policy: GcPolicy,
) -> anyhow::Result<()> {
    let mut retention: HashMap<(String, String), gc::Retention> = HashMap::new();
    for t in targets {
        let e = retention
            .entry((t.registry.clone(), t.repository.clone()))
            .or_default();
        e.keep_versions = e.keep_versions.max(t.retention.keep_versions);
        e.grace_period_seconds = e.grace_period_seconds.max(t.retention.grace_period_seconds);
    }
    let wanted: Vec<gc::Wanted> = reports
        .iter()
        .map(|r| {
            let repo = (r.image.registry.clone(), r.image.repository.clone());
            gc::Wanted {
                retention: retention.get(&repo).copied().unwrap_or_default(),
                id: (repo.0, repo.1, r.image.digest.clone()),
            }
        })
        .collect();
    let unresolved: Vec<gc::RepoId> = failures.iter().map(|f| f.repository.clone()).collect();
    let store = store.clone();
    let report =
        tokio::task::spawn_blocking(move || gc::collect(&store, &wanted, &unresolved, &policy))
            .await?
            .context("collecting unwanted content")?;
    println!(
        "GC: removed {} images, {} blobs, {} freed; store holds {} in {} blobs{}",
        report.images_removed.len(),
        report.blobs_removed,
        mib(report.bytes_freed),
        mib(report.usage.blob_bytes),
        report.usage.blobs,
        match (report.available, report.capacity) {
            (Some(a), Some(c)) => format!(", {} free of {}", mib(a), mib(c)),
            _ => String::new(),
        }
    );
    Ok(())
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// Prints one line per image and per resolution failure; true when all is well.
fn print_summary(reports: &[SyncReport], failures: &[ResolveFailure], took: Duration) -> bool {
    let mut ok = failures.is_empty();
    for f in failures {
        println!("FAILED  {}: {}", f.what, f.error);
    }
    for r in reports {
        let i = &r.image;
        let name = format!("{}/{}@{}", i.registry, i.repository, i.digest);
        let tags = if i.tags.is_empty() {
            String::new()
        } else {
            format!(" tags={}", i.tags.join(","))
        };
        match &r.result {
            Ok(s) if s.already_present && s.blobs_fetched == 0 => {
                println!(
                    "SYNCED  {} {name}{tags}: already present ({} blobs, {})",
                    i.key,
                    s.blobs_total,
                    mib(s.bytes_total)
                );
            }
            Ok(s) => println!(
                "SYNCED  {} {name}{tags}: fetched {} blobs ({}) of {} ({})",
                i.key,
                s.blobs_fetched,
                mib(s.bytes_fetched),
                s.blobs_total,
                mib(s.bytes_total)
            ),
            Err(e) => {
                ok = false;
                println!("FAILED  {} {name}{tags}: {e}", i.key);
            }
        }
    }
    let synced = reports.iter().filter(|r| r.result.is_ok()).count();
    println!(
        "{synced} of {} images synced, {} failed, in {:.1}s",
        reports.len() + failures.len(),
        reports.len() - synced + failures.len(),
        took.as_secs_f64()
    );
    ok
}

/// Progress bars on a terminal; plain lines on phase changes otherwise.
async fn show_progress(mut rx: tokio::sync::mpsc::UnboundedReceiver<Progress>, tty: bool) {
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:40!} {bar:30} {bytes}/{total_bytes} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut phases: HashMap<String, Phase> = HashMap::new();
    while let Some(p) = rx.recv().await {
        if tty {
            let bar = bars.entry(p.key.clone()).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(0));
                b.set_style(style.clone());
                b.set_prefix(p.key.clone());
                b
            });
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done.min(p.bytes_total));
            bar.set_message(format!(
                "{:?} {}/{} blobs",
                p.phase, p.layers_done, p.layers_total
            ));
            if p.phase.is_terminal() {
                bar.finish_with_message(match &p.message {
                    Some(m) => format!("{:?}: {m}", p.phase),
                    None => format!("{:?}", p.phase),
                });
            }
        } else if phases.get(&p.key) != Some(&p.phase) {
            phases.insert(p.key.clone(), p.phase);
            eprintln!(
                "{} {:?} {}/{} bytes {}/{} blobs{}",
                p.key,
                p.phase,
                p.bytes_done,
                p.bytes_total,
                p.layers_done,
                p.layers_total,
                p.message.map(|m| format!(": {m}")).unwrap_or_default()
            );
        }
    }
}

async fn serve(
    data_dir: PathBuf,
    listen: String,
    limits: imgfleet_agent::mirror::Limits,
) -> anyhow::Result<()> {
    // Create the layout if it is missing, then serve read-only so that a
    // `sync` can write to the same directory meanwhile. Both read the disk:
    // on the blocking pool.
    let dir = data_dir.clone();
    let store = tokio::task::spawn_blocking(move || {
        if !dir.join("blobs/sha256").exists() {
            drop(
                Store::open(&dir)
                    .with_context(|| format!("creating the content store {}", dir.display()))?,
            );
        }
        Store::open_read_only(&dir)
            .with_context(|| format!("opening the content store {}", dir.display()))
    })
    .await??;
    let store = Arc::new(store);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on --mirror-listen {listen}"))?;
    let local = listener
        .local_addr()
        .context("reading the listen address")?;
    println!("Mirror listening on http://{local}");
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.cancel();
    });
    imgfleet_agent::mirror::serve(listener, store, limits, shutdown)
        .await
        .context("serving the mirror")
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
