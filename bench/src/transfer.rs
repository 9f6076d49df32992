//! The `transfer` suite: the agent's copy against `skopeo copy`/`skopeo sync`
//! and against the raw limit of `curl`, on the same data in one registry.
//!
//! One local docker-registry (plain HTTP on a free loopback port) holds three
//! data sets, pushed once: a large image of a few layers, many small images
//! sharing one base layer, and a 2-platform index. Every run then measures, in
//! turn and on the same data:
//!
//! 1. the large image: `imgfleet-agent sync` into an empty store against
//!    `skopeo copy docker:// oci:`;
//! 2. the small images: the agent against `skopeo sync` (yaml → dir);
//! 3. the index: the agent against `skopeo copy --multi-arch all`;
//! 4. the no-op re-sync of the small images, pinned by digest (the product's
//!    path: the hub sends digests) and by tag (standalone `sync --from`), the
//!    agent on its store against `skopeo sync` into a second registry it has
//!    filled before (skopeo refuses to sync into a `dir` that holds the images);
//! 5. the raw limit for the large image: `curl --parallel` GETs of its blobs,
//!    once to /dev/null and once to files beside the agent's store followed by
//!    an fsync of each file (what a crash-safe store must at least do).
//!
//! Before each timed command the whole machine is `sync`ed (untimed), so that
//! dirty pages one tool left behind (skopeo does not fsync) are not written
//! back on the next tool's clock.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use imgfleet_tests::images::{ImageSpec, LayerSpec, PushedImage, push_image, push_index};
use imgfleet_tests::registry::{Registry, RegistryOptions};

use crate::Common;
use crate::image::ImageSize;
use crate::report::{Report, Target, Unit, sibling_binary};

const SUITE: &str = "transfer";
const MIB: u64 = 1024 * 1024;
/// One benchmarked command may take this long before it counts as hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(900);

/// Options of the `transfer` suite.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// The large image.
    #[command(flatten)]
    pub image: ImageSize,
    /// Number of small images sharing one base layer.
    #[arg(long, default_value_t = 50)]
    pub images: u64,
    /// Size of the small images' shared base layer in MiB.
    #[arg(long, default_value_t = 20)]
    pub base_mib: u64,
    /// Size of each platform of the 2-platform index in MiB (two layers each).
    #[arg(long, default_value_t = 64)]
    pub index_mib: u64,
    /// Blob downloads at once: the agent's --concurrency-blobs and curl's
    /// --parallel-max.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Directory for stores and downloads (default: the system temp dir). It
    /// should be on the disk an agent would use: fsync is measured.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: ImageSize::default(),
            images: 50,
            base_mib: 20,
            index_mib: 64,
            parallel: 8,
            work_dir: None,
        }
    }
}

/// Per-run values of one comparison.
#[derive(Debug, Default)]
struct Pair {
    ours: Vec<f64>,
    theirs: Vec<f64>,
}

impl Pair {
    fn push(&mut self, ours: f64, theirs: f64) {
        self.ours.push(ours);
        self.theirs.push(theirs);
    }

    /// theirs / ours per run: above 1 means the agent is faster.
    fn ratios(&self) -> Vec<f64> {
        self.ours
            .iter()
            .zip(&self.theirs)
            .map(|(o, t)| t / o)
            .collect()
    }
}

pub async fn run(common: &Common, options: &Options, report: &mut Report) -> Result<()> {
    check_options(options)?;
    let agent = sibling_binary("imgfleet-agent")?;
    let skopeo = tool("skopeo", "skopeo")?;
    let curl = tool("curl", "curl")?;
    let sync = tool("sync", "coreutils")?;
    let tools = Tools {
        agent,
        skopeo,
        curl,
        sync,
        parallel: options.parallel,
    };

    let work = match &options.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            tempfile::tempdir_in(dir)
        }
        None => tempfile::tempdir(),
    }
    .context("creating the work directory")?;
    let work = work.path();

    progress("starting docker-registry");
    let reg = Registry::start(RegistryOptions::plain())
        .await
        .context("starting the source docker-registry")?;
    let edge = Registry::start(RegistryOptions::plain())
        .await
        .context("starting the second docker-registry (skopeo's no-op target)")?;
    let addr = reg.addr();
    let data = push_data(&reg, options).await?;
    let files = DataFiles::write(work, &addr, &data)?;

    // The no-op stores are filled once, untimed: the agent's pinned store and
    // skopeo's two edge repositories.
    progress("filling the no-op targets (untimed)");
    let pinned_store = work.join("noop-pinned-agent");
    tools
        .timed(
            "agent sync (pinned, fill)",
            tools.agent_sync(&files.pinned, &pinned_store),
        )
        .await?;
    let edge_tag = format!("{}/bytag", edge.addr());
    let edge_pinned = format!("{}/pinned", edge.addr());
    tools
        .timed(
            "skopeo sync (fill)",
            tools.skopeo_sync_registry(&files.skopeo_tags, &edge_tag),
        )
        .await?;
    tools
        .timed(
            "skopeo sync (pinned, fill)",
            tools.skopeo_sync_registry(&files.skopeo_pinned, &edge_pinned),
        )
        .await?;

    let (mut big, mut small, mut index) = (Pair::default(), Pair::default(), Pair::default());
    let (mut noop_pinned, mut noop_tag) = (Pair::default(), Pair::default());
    let (mut curl_null, mut curl_fsync, mut heads) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=common.runs {
        let step = |what: &str| progress(&format!("run {run}/{}: {what}", common.runs));
        let dir = work.join(format!("run-{run}"));

        step(&format!("{} MiB image: agent sync", options.image.size_mib));
        let store = dir.join("big-agent");
        let a = tools
            .timed("agent sync", tools.agent_sync(&files.big, &store))
            .await?;
        remove(&store)?;
        step(&format!(
            "{} MiB image: skopeo copy",
            options.image.size_mib
        ));
        let oci = dir.join("big-skopeo");
        let s = tools
            .timed(
                "skopeo copy",
                tools.skopeo(&[
                    "copy".into(),
                    "--quiet".into(),
                    "--src-tls-verify=false".into(),
                    format!("docker://{addr}/bench/big:v1"),
                    format!("oci:{}:v1", oci.display()),
                ]),
            )
            .await?;
        remove(&oci)?;
        big.push(a, s);

        step("raw limit: curl to /dev/null");
        let urls: Vec<String> = data
            .big
            .blob_digests()
            .iter()
            .map(|d| format!("http://{addr}/v2/bench/big/blobs/{d}"))
            .collect();
        curl_null.push(tools.curl_null(&urls).await?);
        step("raw limit: curl to files + fsync");
        let into = dir.join("big-curl");
        curl_fsync.push(tools.curl_fsync(&urls, &into).await?);
        remove(&into)?;

        step(&format!("{} images: agent sync", options.images));
        let store = dir.join("small-agent");
        let a = tools
            .timed("agent sync", tools.agent_sync(&files.small, &store))
            .await?;
        step(&format!("{} images: skopeo sync", options.images));
        let dest = dir.join("small-skopeo");
        std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
        let s = tools
            .timed(
                "skopeo sync",
                tools.skopeo(&[
                    "sync".into(),
                    "--src".into(),
                    "yaml".into(),
                    "--dest".into(),
                    "dir".into(),
                    files.skopeo_tags.display().to_string(),
                    dest.display().to_string(),
                ]),
            )
            .await?;
        remove(&dest)?;
        small.push(a, s);

        step("no-op re-sync by tag: agent, skopeo");
        let a = tools
            .timed("agent sync (no-op)", tools.agent_sync(&files.small, &store))
            .await?;
        let s = tools
            .timed(
                "skopeo sync (no-op)",
                tools.skopeo_sync_registry(&files.skopeo_tags, &edge_tag),
            )
            .await?;
        noop_tag.push(a, s);
        remove(&store)?;
        heads.push(tools.curl_heads(&addr, &data.small_repos).await?);

        step("no-op re-sync pinned by digest: agent, skopeo");
        let a = tools
            .timed(
                "agent sync (no-op, pinned)",
                tools.agent_sync(&files.pinned, &pinned_store),
            )
            .await?;
        let s = tools
            .timed(
                "skopeo sync (no-op, pinned)",
                tools.skopeo_sync_registry(&files.skopeo_pinned, &edge_pinned),
            )
            .await?;
        noop_pinned.push(a, s);

        step("2-platform index: agent sync");
        let store = dir.join("index-agent");
        let a = tools
            .timed("agent sync", tools.agent_sync(&files.index, &store))
            .await?;
        remove(&store)?;
        step("2-platform index: skopeo copy --multi-arch all");
        let oci = dir.join("index-skopeo");
        let s = tools
            .timed(
                "skopeo copy --multi-arch all",
                tools.skopeo(&[
                    "copy".into(),
                    "--quiet".into(),
                    "--multi-arch".into(),
                    "all".into(),
                    "--src-tls-verify=false".into(),
                    format!("docker://{addr}/bench/index:v1"),
                    format!("oci:{}:v1", oci.display()),
                ]),
            )
            .await?;
        remove(&oci)?;
        index.push(a, s);
        remove(&dir)?;
    }

    let big_name = format!(
        "{} MiB / {} layers",
        options.image.size_mib, options.image.layers
    );
    let big_mib = data.big.total_size as f64 / MIB as f64;
    compare(report, &big_name, "skopeo copy", &big, 1.5);
    report.add(
        SUITE,
        format!("{big_name}: agent throughput (MiB/s)"),
        Unit::Count,
        big.ours.iter().map(|s| big_mib / s).collect(),
        None,
    );
    report.add(
        SUITE,
        format!("{big_name}: curl GET limit, to /dev/null"),
        Unit::Seconds,
        curl_null.clone(),
        None,
    );
    report.add(
        SUITE,
        format!("{big_name}: curl GET limit, to files + fsync"),
        Unit::Seconds,
        curl_fsync.clone(),
        None,
    );
    let percent = |limit: &[f64]| -> Vec<f64> {
        limit
            .iter()
            .zip(&big.ours)
            .map(|(l, a)| 100.0 * l / a)
            .collect()
    };
    report.add(
        SUITE,
        format!("{big_name}: agent speed, % of curl + fsync limit"),
        Unit::Percent,
        percent(&curl_fsync),
        Some(&|m| Target::at_least(m, 90.0, Unit::Percent)),
    );
    report.add(
        SUITE,
        format!("{big_name}: agent speed, % of curl to /dev/null limit"),
        Unit::Percent,
        percent(&curl_null),
        Some(&|m| Target::at_least(m, 90.0, Unit::Percent)),
    );

    let small_name = format!(
        "{} images sharing a {} MiB base",
        options.images, options.base_mib
    );
    compare(report, &small_name, "skopeo sync", &small, 1.5);
    let index_name = format!("2-platform index, {} MiB each", options.index_mib);
    compare(
        report,
        &index_name,
        "skopeo copy --multi-arch all",
        &index,
        1.5,
    );
    compare(
        report,
        &format!(
            "no-op re-sync of the {}, pinned by digest (the hub's path)",
            options.images
        ),
        "skopeo sync",
        &noop_pinned,
        10.0,
    );
    compare(
        report,
        &format!(
            "no-op re-sync of the {}, by tag (sync --from)",
            options.images
        ),
        "skopeo sync",
        &noop_tag,
        10.0,
    );
    report.add(
        SUITE,
        format!("no-op floor: curl HEAD of the {} tags", options.images),
        Unit::Seconds,
        heads,
        None,
    );
    Ok(())
}

fn check_options(o: &Options) -> Result<()> {
    let positive = [
        ("--size-mib", o.image.size_mib),
        ("--layers", o.image.layers),
        ("--images", o.images),
        ("--base-mib", o.base_mib),
        ("--index-mib", o.index_mib),
        ("--parallel", o.parallel as u64),
    ];
    for (name, v) in positive {
        if v == 0 {
            bail!("transfer {name}: expected a number of at least 1, got 0");
        }
    }
    Ok(())
}

/// Records ours, theirs and the ratio (theirs / ours) with its target.
fn compare(report: &mut Report, name: &str, theirs: &str, pair: &Pair, bound: f64) {
    report.add(
        SUITE,
        format!("{name}: imgfleet-agent sync"),
        Unit::Seconds,
        pair.ours.clone(),
        None,
    );
    report.add(
        SUITE,
        format!("{name}: {theirs}"),
        Unit::Seconds,
        pair.theirs.clone(),
        None,
    );
    report.add(
        SUITE,
        format!("{name}: {theirs} ÷ agent"),
        Unit::Ratio,
        pair.ratios(),
        Some(&|m| Target::at_least(m, bound, Unit::Ratio)),
    );
}

fn progress(what: &str) {
    eprintln!("[{SUITE}] {what}");
}

fn tool(name: &str, package: &str) -> Result<PathBuf> {
    imgfleet_tests::process::find_binary(name).with_context(|| {
        format!("{name} not found: install it with `sudo apt-get install -y {package}`")
    })
}

fn remove(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// What was pushed.
struct Data {
    big: PushedImage,
    small_repos: Vec<String>,
    /// (repository, manifest digest) of each small image.
    small_pinned: Vec<(String, String)>,
}

async fn push_data(reg: &Registry, o: &Options) -> Result<Data> {
    progress(&format!(
        "pushing a {} MiB image of {} layers",
        o.image.size_mib, o.image.layers
    ));
    let sizes = o.image.layer_sizes();
    let big = push_image(reg, "bench/big", "v1", &ImageSpec::random(&sizes, 1000))
        .await
        .context("pushing the large image")?;

    progress(&format!(
        "pushing {} images sharing a {} MiB base",
        o.images, o.base_mib
    ));
    let base = LayerSpec::new(o.base_mib * MIB, 2000);
    let mut small_repos = Vec::new();
    let mut small_pinned = Vec::new();
    for i in 0..o.images {
        let repo = format!("bench/small-{i}");
        let p = push_image(
            reg,
            &repo,
            "v1",
            &ImageSpec::random(&[200_000], 3000 + i).with_base(base),
        )
        .await
        .with_context(|| format!("pushing {repo}"))?;
        small_pinned.push((repo.clone(), p.manifest_digest));
        small_repos.push(repo);
    }

    progress(&format!(
        "pushing a 2-platform index of {} MiB per platform",
        o.index_mib
    ));
    let half = (o.index_mib * MIB / 2).max(1);
    push_index(
        reg,
        "bench/index",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        &ImageSpec::random(&[half, half], 5000),
    )
    .await
    .context("pushing the 2-platform index")?;
    Ok(Data {
        big,
        small_repos,
        small_pinned,
    })
}

/// The input files of the agent (`sync --from`) and of `skopeo sync`.
struct DataFiles {
    big: PathBuf,
    small: PathBuf,
    pinned: PathBuf,
    index: PathBuf,
    skopeo_tags: PathBuf,
    skopeo_pinned: PathBuf,
}

impl DataFiles {
    fn write(work: &Path, addr: &str, data: &Data) -> Result<DataFiles> {
        let write = |name: &str, text: String| -> Result<PathBuf> {
            let p = work.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let by_tag = |repos: &[String]| {
            let mut out = secret_yaml(addr);
            for (i, repo) in repos.iter().enumerate() {
                out.push_str(&format!(
                    "---\napiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata:\n  name: r{i}\nspec:\n  repository: {repo}\n  tag: v1\n  registryRef:\n    name: lab\n"
                ));
            }
            out
        };
        let mut pinned = secret_yaml(addr);
        for (i, (repo, digest)) in data.small_pinned.iter().enumerate() {
            pinned.push_str(&format!(
                "---\napiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata:\n  name: r{i}\nspec:\n  repository: {repo}\n  digest: \"{digest}\"\n  registryRef:\n    name: lab\n"
            ));
        }
        let mut skopeo_tags = format!("{addr}:\n  tls-verify: false\n  images:\n");
        for r in &data.small_repos {
            skopeo_tags.push_str(&format!("    {r}: [\"v1\"]\n"));
        }
        let mut skopeo_pinned = format!("{addr}:\n  tls-verify: false\n  images:\n");
        for (r, d) in &data.small_pinned {
            skopeo_pinned.push_str(&format!("    {r}: [\"{d}\"]\n"));
        }
        Ok(DataFiles {
            big: write("big.yaml", by_tag(&["bench/big".to_string()]))?,
            small: write("small.yaml", by_tag(&data.small_repos))?,
            pinned: write("pinned.yaml", pinned)?,
            index: write("index.yaml", by_tag(&["bench/index".to_string()]))?,
            skopeo_tags: write("skopeo-tags.yaml", skopeo_tags)?,
            skopeo_pinned: write("skopeo-pinned.yaml", skopeo_pinned)?,
        })
    }
}

fn secret_yaml(domain: &str) -> String {
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\nmetadata:\n  name: lab\nspec:\n  domain: \"{domain}\"\n  insecure: true\n"
    )
}

/// The programs the suite runs.
struct Tools {
    agent: PathBuf,
    skopeo: PathBuf,
    curl: PathBuf,
    sync: PathBuf,
    parallel: usize,
}

impl Tools {
    fn agent_sync(&self, file: &Path, data_dir: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.agent);
        c.args(["sync", "--no-gc", "--concurrency-blobs"])
            .arg(self.parallel.to_string())
            .arg("--from")
            .arg(file)
            .arg("--data-dir")
            .arg(data_dir);
        c
    }

    fn skopeo(&self, args: &[String]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.skopeo);
        c.arg("--insecure-policy").args(args);
        c
    }

    /// `skopeo sync` of a yaml source into a registry (`host:port/prefix`).
    fn skopeo_sync_registry(&self, yaml: &Path, dest: &str) -> tokio::process::Command {
        self.skopeo(&[
            "sync".into(),
            "--src".into(),
            "yaml".into(),
            "--dest".into(),
            "docker".into(),
            "--dest-tls-verify=false".into(),
            yaml.display().to_string(),
            dest.to_string(),
        ])
    }

    fn curl(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.curl);
        c.args(["--silent", "--show-error", "--fail", "--parallel"])
            .arg("--parallel-max")
            .arg(self.parallel.to_string());
        c
    }

    /// curl GETs every URL to /dev/null, `parallel` at once: the network and
    /// registry limit, with nothing hashed or written.
    async fn curl_null(&self, urls: &[String]) -> Result<f64> {
        let mut c = self.curl();
        for u in urls {
            c.arg("-o").arg("/dev/null").arg(u);
        }
        self.timed("curl to /dev/null", c).await
    }

    /// curl GETs every URL to a file in `dir`, then every file is fsynced
    /// (`sync FILE...` fsyncs each named file; `sync -f` would flush the whole
    /// file system, other processes' dirty pages included). Both are timed.
    async fn curl_fsync(&self, urls: &[String], dir: &Path) -> Result<f64> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files: Vec<PathBuf> = (0..urls.len())
            .map(|i| dir.join(format!("blob-{i}")))
            .collect();
        let mut c = self.curl();
        for (u, f) in urls.iter().zip(&files) {
            c.arg("-o").arg(f).arg(u);
        }
        let download = self.timed("curl to files", c).await?;
        let mut s = tokio::process::Command::new(&self.sync);
        s.args(&files);
        // Not `timed`: that syncs everything first, which is what is measured here.
        let flush = run_timed("sync of the downloaded files", s).await?;
        Ok(download + flush)
    }

    /// curl HEADs every repository's tag at once: the floor of a by-tag no-op.
    async fn curl_heads(&self, addr: &str, repos: &[String]) -> Result<f64> {
        let mut c = tokio::process::Command::new(&self.curl);
        c.args(["--silent", "--show-error", "--fail", "--head", "--parallel"])
            .args(["--parallel-max", "64", "-H"])
            .arg(format!(
                "Accept: {}",
                imgfleet_common::registry::MANIFEST_ACCEPT
            ));
        for r in repos {
            c.arg("-o")
                .arg("/dev/null")
                .arg(format!("http://{addr}/v2/{r}/manifests/v1"));
        }
        self.timed("curl HEADs", c).await
    }

    /// Flushes the machine's dirty pages (untimed), then runs and times `cmd`.
    async fn timed(&self, what: &str, cmd: tokio::process::Command) -> Result<f64> {
        let flush = tokio::process::Command::new(&self.sync);
        run_timed("sync (before a measurement)", flush).await?;
        run_timed(what, cmd).await
    }
}

/// Runs a command to completion and returns its wall time in seconds; a
/// failure is an error with the command's output.
async fn run_timed(what: &str, mut cmd: tokio::process::Command) -> Result<f64> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let start = Instant::now();
    let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("{what}: no result after {COMMAND_TIMEOUT:?}"))?
        .with_context(|| format!("{what}: running {:?}", cmd.as_std().get_program()))?;
    let took = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        );
    }
    Ok(took)
}

/// The last lines of a command's output, for an error.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
