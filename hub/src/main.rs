//! `imgfleet-hub`: the fleet's control plane. Parses its configuration,
//! starts the hub, prints how to point the CLI at it on first start, and
//! drains on SIGTERM/SIGINT. Exit codes: 0 after a clean shutdown, 64 for bad
//! configuration, 1 for any other failure.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use imgfleet_hub::config::{Config, ConfigError, LogFormat};
use imgfleet_hub::server::{self, Parts, StartError};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// sysexits.h EX_USAGE: the command was used incorrectly.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match Config::parse(std::env::args_os(), &env) {
        Ok(c) => c,
        Err(ConfigError::Display(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("imgfleet-hub: {}", e.to_string().trim_end());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("imgfleet-hub: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // The trace exporter, when asked for, runs on the runtime.
    let telemetry = {
        let _entered = runtime.enter();
        imgfleet_common::telemetry::init(
            "imgfleet-hub",
            imgfleet_common::telemetry::LogOptions {
                json: config.log_format == LogFormat::Json,
                ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                default_filter: "info",
            },
        )
    };
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("imgfleet-hub: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = runtime.block_on(run(config));
    {
        // Export the last spans while the runtime still runs.
        let _entered = runtime.enter();
        telemetry.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            error!(error = %e, "Bad configuration");
            eprintln!("imgfleet-hub: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(e)) => {
            error!(error = format!("{e:#}"), "Hub failed");
            eprintln!("imgfleet-hub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Config(StartError),
    Other(anyhow::Error),
}

async fn run(config: Config) -> Result<(), Failure> {
    let shutdown = CancellationToken::new();
    let data_dir = config.data_dir.clone();
    let hub = match server::start_with(config, shutdown.clone(), Parts::ALL).await {
        Ok(h) => h,
        Err(e) if e.is_config() => return Err(Failure::Config(e)),
        Err(e) => {
            return Err(Failure::Other(
                anyhow::Error::new(e).context("starting the hub"),
            ));
        }
    };
    if hub.first_start
        && let Some(admin) = &hub.admin_dir
    {
        let admin = std::path::absolute(admin).unwrap_or_else(|_| admin.clone());
        // Printed once, on the start that created the CA and admin bundle.
        println!(
            "imgfleet hub initialised in {}. Point the CLI at it with:\n  export IMGFLEET_HUB={} IMGFLEET_CREDENTIALS={}",
            std::path::absolute(&data_dir).unwrap_or(data_dir).display(),
            hub.url(),
            admin.display()
        );
    }

    let wait = hub.wait();
    tokio::pin!(wait);
    let result = tokio::select! {
        r = &mut wait => r,
        _ = wait_for_signal() => {
            info!("Shutdown requested; draining");
            shutdown.cancel();
            wait.await
        }
    };
    result.map_err(|e| Failure::Other(anyhow::Error::new(e)))?;
    info!("Hub stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
