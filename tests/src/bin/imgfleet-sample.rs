//! Pushes a generated sample image to a registry: the quickstart's upstream
//! content, and a way to make test data by hand.
//!
//! ```text
//! imgfleet-sample --registry 127.0.0.1:5000 --repo library/nginx --tag latest \
//!     [--user U --password P] [--layers 1048576,4194304] [--platforms linux/amd64,linux/arm64] [--seed N]
//! ```
//! Prints the pushed manifest (or index) digest on stdout.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use imgfleet_tests::images::{ImageSpec, Platform, PushTarget};

#[derive(Debug)]
struct Args {
    registry: String,
    repo: String,
    tag: String,
    credentials: Option<(String, String)>,
    layers: Vec<u64>,
    platforms: Vec<Platform>,
    seed: u64,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args> {
    let (mut registry, mut repo, mut tag) = (None, None, None);
    let (mut user, mut password) = (None, None);
    let mut layers = vec![1 << 20, 3 << 20];
    let mut platforms = vec![Platform::linux_amd64()];
    let mut seed = 1;
    while let Some(flag) = argv.next() {
        let mut value = || {
            argv.next()
                .with_context(|| format!("{flag}: expected a value"))
        };
        match flag.as_str() {
            "--registry" => registry = Some(value()?),
            "--repo" => repo = Some(value()?),
            "--tag" => tag = Some(value()?),
            "--user" => user = Some(value()?),
            "--password" => password = Some(value()?),
            "--seed" => seed = value()?.parse().context("--seed: expected a number")?,
            "--layers" => {
                layers = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .context("--layers: expected comma-separated sizes in bytes")?
            }
            "--platforms" => {
                platforms = value()?
                    .split(',')
                    .map(|p| match p.split_once('/') {
                        Some((os, arch)) if !os.is_empty() && !arch.is_empty() => {
                            Ok(Platform::new(os, arch))
                        }
                        _ => bail!("--platforms {p:?}: expected os/arch, e.g. linux/amd64"),
                    })
                    .collect::<Result<_>>()?
            }
            "-h" | "--help" => bail!(
                "usage: imgfleet-sample --registry HOST:PORT --repo REPO --tag TAG [--user U --password P] \
                 [--layers SIZES] [--platforms os/arch,...] [--seed N]"
            ),
            other => bail!("unknown flag {other:?} (see --help)"),
        }
    }
    let credentials = match (user, password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => bail!("--user and --password go together"),
    };
    Ok(Args {
        registry: registry.context("--registry is required")?,
        repo: repo.context("--repo is required")?,
        tag: tag.context("--tag is required")?,
        credentials,
        layers,
        platforms,
        seed,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(digest) => {
            println!("{digest}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("imgfleet-sample: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<String> {
    let args = parse(std::env::args().skip(1))?;
    let mut target = PushTarget::plain_http(&args.registry)?;
    target.credentials = args.credentials.clone();
    let spec = ImageSpec::random(&args.layers, args.seed);
    if args.platforms.len() == 1 && args.platforms[0] == Platform::linux_amd64() {
        Ok(target
            .push_image(&args.repo, &args.tag, &spec)
            .await?
            .manifest_digest)
    } else {
        Ok(target
            .push_index(&args.repo, &args.tag, &args.platforms, &spec)
            .await?
            .index_digest)
    }
}
