//! `imgfleet-bench`: the benchmarks behind BENCHMARKS.md. Six suites, each
//! run side by side with what it is compared against, repeated `--runs` times
//! and reported as medians:
//!
//! - `transfer`: the agent's copy against `skopeo copy`/`skopeo sync` and the
//!   raw limit of `curl` GETs of the same blobs;
//! - `fanout`: thousands of simulated mTLS agents against one hub, with the
//!   embedded store and with etcd;
//! - `footprint`: the agent's RSS idle and during a transfer, binary sizes;
//! - `mirror`: the agent's mirror against docker-registry serving the same
//!   image to 1 and 8 nodes, and both under clients that never read;
//! - `control`: bulk-apply cost as the hub's store grows, and the hub's CPU
//!   while thousands of Repositories keep failing to resolve;
//! - `rollout`: `imgfleet rollout undo` until every cluster's mirror serves
//!   the older digest, with the upstream registry stopped.
//!
//! Run the release build (`bash scripts/bench.sh`); it finds the other
//! binaries next to itself.

mod control;
mod fanout;
mod footprint;
mod image;
mod mirror;
mod report;
mod rollout;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::report::Report;

#[derive(Parser, Debug)]
#[command(name = "imgfleet-bench", version, about = "imgfleet's benchmarks")]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
    #[command(flatten)]
    common: Common,
}

/// Options every suite takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// How many times each measurement is repeated; figures are medians.
    #[arg(long, global = true, default_value_t = 3)]
    pub runs: usize,
    /// Also write the results as a Markdown table to this file.
    #[arg(long, global = true)]
    pub out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Suite {
    /// The agent's copy against skopeo copy/sync and curl.
    Transfer(transfer::Options),
    /// N simulated agents against one hub (embedded store and etcd).
    Fanout(fanout::Options),
    /// Agent RSS idle and during a 256 MiB transfer; release binary sizes.
    Footprint(footprint::Options),
    /// The mirror against docker-registry: serve throughput, non-reading clients.
    Mirror(mirror::Options),
    /// Bulk apply as the store grows; hub CPU with every resolution failing.
    Control(control::Options),
    /// Rollout undo to every mirror serving the older digest, upstream down.
    Rollout(rollout::Options),
    /// Every suite with its defaults.
    All,
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if cli.common.runs == 0 {
        eprintln!("error: --runs must be at least 1");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut report = Report::new();
    let result = runtime.block_on(async {
        match cli.suite {
            Suite::Transfer(o) => transfer::run(&cli.common, &o, &mut report).await,
            Suite::Fanout(o) => fanout::run(&cli.common, &o, &mut report).await,
            Suite::Footprint(o) => footprint::run(&cli.common, &o, &mut report).await,
            Suite::Mirror(o) => mirror::run(&cli.common, &o, &mut report).await,
            Suite::Control(o) => control::run(&cli.common, &o, &mut report).await,
            Suite::Rollout(o) => rollout::run(&cli.common, &o, &mut report).await,
            Suite::All => {
                // A failing suite does not keep the others from reporting.
                let c = &cli.common;
                let results = [
                    transfer::run(c, &transfer::Options::default(), &mut report).await,
                    footprint::run(c, &footprint::Options::default(), &mut report).await,
                    mirror::run(c, &mirror::Options::default(), &mut report).await,
                    fanout::run(c, &fanout::Options::default(), &mut report).await,
                    control::run(c, &control::Options::default(), &mut report).await,
                    rollout::run(c, &rollout::Options::default(), &mut report).await,
                ];
                results
                    .into_iter()
                    .collect::<Result<Vec<()>, _>>()
                    .map(|_| ())
            }
        }
    });
    let table = report.markdown(cli.common.runs);
    println!("\n{table}");
    // The folder is created, so that a run right after `cargo clean` keeps its table.
    let write = |path: &std::path::Path| {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, &table)
    };
    if let Some(path) = &cli.common.out
        && let Err(e) = write(path)
    {
        eprintln!("error: writing {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
