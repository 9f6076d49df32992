//! Benchmark, not a timed test (ignored by default): the agent against skopeo
//! on the same local docker-registry, in one run.
//!
//! ```text
//! cargo test -p imgfleet-agent --release --test bench -- --ignored --nocapture
//! ```
//!
//! 1. a 256 MiB image of 4 layers: `imgfleet-agent sync` into an empty store
//!    against `skopeo copy` to an `oci:` directory;
//! 2. 50 small images sharing a 20 MiB base layer: `imgfleet-agent sync`
//!    against `skopeo sync` (yaml source, dir destination);
//! 3. the no-op re-sync of those 50 images: the agent on its store, skopeo
//!    sync into a second local registry it filled before (skopeo refuses to
//!    sync into a `dir` destination that already holds the images).
//!
//! Also the raw limit for case 1: `curl --parallel` GETs the image's blobs
//! to /dev/null from the same registry; the agent's time is printed as a
//! percentage of it (curl time / agent time).
//!
//! Three runs each; prints medians and ratios (skopeo time / agent time).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use imgfleet_tests::images::{ImageSpec, LayerSpec, push_image};
use imgfleet_tests::registry::{Registry, RegistryOptions};

const MIB: u64 = 1024 * 1024;
const BIN: &str = env!("CARGO_BIN_EXE_imgfleet-agent");
const RUNS: usize = 3;

/// Repositories pinned by digest instead of tag: `(repository, digest)`.
fn yaml_pinned(domain: &str, repos: &[(String, String)]) -> String {
    let mut out = format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\nmetadata:\n  name: lab\nspec:\n  domain: \"{domain}\"\n  insecure: true\n"
    );
    for (i, (repo, digest)) in repos.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata:\n  name: r{i}\nspec:\n  repository: {repo}\n  digest: \"{digest}\"\n  registryRef:\n    name: lab\n"
        ));
    }
    out
}

fn yaml(domain: &str, repos: &[String]) -> String {
    let mut out = format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\nmetadata:\n  name: lab\nspec:\n  domain: \"{domain}\"\n  insecure: true\n"
    );
    for (i, repo) in repos.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata:\n  name: r{i}\nspec:\n  repository: {repo}\n  tag: v1\n  registryRef:\n    name: lab\n"
        ));
    }
    out
}

async fn timed(mut cmd: tokio::process::Command) -> Duration {
    let start = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("run benchmark command");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn agent_sync(file: &Path, data: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BIN);
    c.args(["sync", "--no-gc", "--from"])
        .arg(file)
        .arg("--data-dir")
        .arg(data);
    c
}

fn skopeo(args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(imgfleet_tests::skopeo::binary());
    c.arg("--insecure-policy").args(args);
    c
}

/// curl, which the raw-limit measurement needs.
fn require_curl() -> std::path::PathBuf {
    imgfleet_tests::require_binary("curl", "curl")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(name: &str, agent: Vec<Duration>, skopeo: Vec<Duration>) {
    let (a, s) = (median(agent.clone()), median(skopeo.clone()));
    println!(
        "{name:<34} agent {:>8.3}s  skopeo {:>8.3}s  ratio {:>6.2}x   (runs: agent {:?}, skopeo {:?})",
        a.as_secs_f64(),
        s.as_secs_f64(),
        s.as_secs_f64() / a.as_secs_f64(),
        agent
            .iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>(),
        skopeo
            .iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>(),
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn agent_vs_skopeo() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let addr = reg.addr();
    let work = tempfile::tempdir().unwrap();

    // 1. One 256 MiB image of 4 layers.
    let big = push_image(
        &reg,
        "bench/big",
        "v1",
        &ImageSpec::random(&[64 * MIB; 4], 1000),
    )
    .await
    .unwrap();
    let big_yaml = work.path().join("big.yaml");
    std::fs::write(&big_yaml, yaml(&addr, &["bench/big".to_string()])).unwrap();
    let (mut agent, mut sk) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let data = work.path().join(format!("big-agent-{run}"));
        agent.push(timed(agent_sync(&big_yaml, &data)).await);
        let _ = std::fs::remove_dir_all(&data);
        let oci = work.path().join(format!("big-skopeo-{run}"));
        sk.push(
            timed(skopeo(&[
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                &format!("docker://{addr}/bench/big:v1"),
                &format!("oci:{}:v1", oci.display()),
            ]))
            .await,
        );
        let _ = std::fs::remove_dir_all(&oci);
    }
    report("256 MiB / 4 layers, copy", agent.clone(), sk);

    // The raw limit of this machine and registry for the same bytes: curl
    // GETs every blob of the image to /dev/null, as many at once as the
    // agent runs (--parallel), without hashing or writing anything.
    let mut raw = Vec::new();
    for _ in 0..RUNS {
        let mut c = tokio::process::Command::new(require_curl());
        c.args(["--silent", "--fail", "--parallel", "--parallel-max", "8"]);
        for d in big.blob_digests() {
            c.arg("-o")
                .arg("/dev/null")
                .arg(format!("http://{addr}/v2/bench/big/blobs/{d}"));
        }
        raw.push(timed(c).await);
    }
    let (a, r) = (median(agent), median(raw.clone()));
    println!(
        "{:<34} agent {:>8.3}s  curl   {:>8.3}s  agent at {:>5.1}% of curl   (runs: curl {:?})",
        "256 MiB / 4 layers, raw limit",
        a.as_secs_f64(),
        r.as_secs_f64(),
        100.0 * r.as_secs_f64() / a.as_secs_f64(),
        raw.iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>(),
    );

    // 2. 50 small images sharing a 20 MiB base.
    let base = LayerSpec::new(20 * MIB, 2000);
    let mut repos = Vec::new();
    let mut pinned = Vec::new();
    for i in 0..50u64 {
        let repo = format!("bench/small-{i}");
        let p = push_image(
            &reg,
            &repo,
            "v1",
            &ImageSpec::random(&[200_000], 3000 + i).with_base(base),
        )
        .await
        .unwrap();
        pinned.push((repo.clone(), p.manifest_digest));
        repos.push(repo);
    }
    let small_yaml = work.path().join("small.yaml");
    std::fs::write(&small_yaml, yaml(&addr, &repos)).unwrap();
    let sync_yaml = work.path().join("skopeo-sync.yaml");
    let mut s = format!("{addr}:\n  tls-verify: false\n  images:\n");
    for r in &repos {
        s.push_str(&format!("    {r}: [\"v1\"]\n"));
    }
    std::fs::write(&sync_yaml, s).unwrap();
    let skopeo_sync = |dest: &Path| {
        skopeo(&[
            "sync",
            "--src",
            "yaml",
            "--dest",
            "dir",
            sync_yaml.to_str().unwrap(),
            dest.to_str().unwrap(),
        ])
    };
    let (mut agent, mut sk, mut agent_noop) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let data = work.path().join(format!("small-agent-{run}"));
        agent.push(timed(agent_sync(&small_yaml, &data)).await);
        agent_noop.push(timed(agent_sync(&small_yaml, &data)).await);
        if std::env::var_os("BENCH_TRACE").is_some() {
            let out = agent_sync(&small_yaml, &data)
                .env("RUST_LOG", "imgfleet_agent=debug")
                .output()
                .await
                .unwrap();
            println!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let _ = std::fs::remove_dir_all(&data);
        let dest = work.path().join(format!("small-skopeo-{run}"));
        std::fs::create_dir_all(&dest).unwrap();
        sk.push(timed(skopeo_sync(&dest)).await);
        let _ = std::fs::remove_dir_all(&dest);
    }
    report("50 images sharing a 20 MiB base", agent, sk);

    // skopeo sync refuses to overwrite a `dir` destination, so its re-sync is
    // measured into a second local registry (an edge registry), filled once
    // beforehand, which is how a cron job running skopeo would keep one.
    let edge = Registry::start(RegistryOptions::plain()).await.unwrap();
    let to_edge = || {
        skopeo(&[
            "sync",
            "--src",
            "yaml",
            "--dest",
            "docker",
            "--dest-tls-verify=false",
            sync_yaml.to_str().unwrap(),
            &format!("{}/edge", edge.addr()),
        ])
    };
    timed(to_edge()).await;
    let mut sk_noop = Vec::new();
    for _ in 0..RUNS {
        sk_noop.push(timed(to_edge()).await);
    }
    report(
        "no-op re-sync of the 50 (by tag)",
        agent_noop.clone(),
        sk_noop,
    );

    // The floor of a no-op by tag: the registry answering the 50 tag HEADs,
    // asked by curl, all at once, with nothing else done.
    let mut heads = Vec::new();
    for _ in 0..RUNS {
        let mut c = tokio::process::Command::new(require_curl());
        c.args([
            "--silent",
            "--fail",
            "--head",
            "--parallel",
            "--parallel-max",
            "64",
        ])
        .args([
            "-H",
            &format!("Accept: {}", imgfleet_common::registry::MANIFEST_ACCEPT),
        ]);
        for r in &repos {
            c.arg("-o")
                .arg("/dev/null")
                .arg(format!("http://{addr}/v2/{r}/manifests/v1"));
        }
        heads.push(timed(c).await);
    }
    let (a, h) = (median(agent_noop), median(heads.clone()));
    println!(
        "{:<34} agent {:>8.3}s  curl   {:>8.3}s  (curl HEADs of the 50 tags only; runs: {:?})",
        "no-op floor: the 50 tag lookups",
        a.as_secs_f64(),
        h.as_secs_f64(),
        heads
            .iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>(),
    );

    // The same pinned by digest (as the hub sends them): no tag to resolve.
    let pinned_yaml = work.path().join("pinned.yaml");
    std::fs::write(&pinned_yaml, yaml_pinned(&addr, &pinned)).unwrap();
    let data = work.path().join("pinned-agent");
    timed(agent_sync(&pinned_yaml, &data)).await;
    let pinned_sync = work.path().join("skopeo-pinned.yaml");
    let mut s = format!("{addr}:\n  tls-verify: false\n  images:\n");
    for (r, d) in &pinned {
        s.push_str(&format!("    {r}: [\"{d}\"]\n"));
    }
    std::fs::write(&pinned_sync, s).unwrap();
    let pinned_to_edge = || {
        skopeo(&[
            "sync",
            "--src",
            "yaml",
            "--dest",
            "docker",
            "--dest-tls-verify=false",
            pinned_sync.to_str().unwrap(),
            &format!("{}/pinned", edge.addr()),
        ])
    };
    timed(pinned_to_edge()).await;
    let (mut agent_pinned, mut sk_pinned) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        agent_pinned.push(timed(agent_sync(&pinned_yaml, &data)).await);
        sk_pinned.push(timed(pinned_to_edge()).await);
    }
    report(
        "no-op re-sync of the 50 (by digest)",
        agent_pinned,
        sk_pinned,
    );
}
