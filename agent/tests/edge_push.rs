//! The edge-registry target end to end: `imgfleet-agent sync --push-to` into a
//! second, real docker-registry with htpasswd auth. skopeo reads the upstream
//! digests back from it, a base layer shared with another repository arrives
//! by cross-repository mount, and a re-run sends only HEADs.

mod common;

use std::process::Stdio;

use common::yaml;
use imgfleet_tests::images::{
    ImageSpec, LayerSpec, PushedImage, PushedIndex, push_image, push_index,
};
use imgfleet_tests::registry::{Registry, RegistryOptions};
use imgfleet_tests::skopeo;

const BIN: &str = env!("CARGO_BIN_EXE_imgfleet-agent");
const EDGE_USER: &str = "pusher";
const EDGE_PASS: &str = "edge-pw-7731";

async fn run(args: &[&str], extra: &[std::ffi::OsString]) -> (bool, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run imgfleet-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sums the `N <what>` counts of every `PUSHED` line, e.g. `mounted`.
fn pushed_count(stdout: &str, what: &str) -> u64 {
    stdout
        .lines()
        .filter(|l| l.starts_with("PUSHED "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| w.trim_end_matches(',') == what)?;
            words.get(i.checked_sub(1)?)?.parse::<u64>().ok()
        })
        .sum()
}

/// Lines of the registry's log holding every one of `needles`.
fn log_lines(reg: &Registry, needles: &[&str]) -> Vec<String> {
    let path = reg.log_path().expect("edge registry runs");
    std::fs::read_to_string(path)
        .expect("read the edge registry log")
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Requests with `needle` in the registry's access log (combined log format:
/// `"METHOD /path HTTP/1.1" STATUS`).
fn log_count(reg: &Registry, needle: &str) -> usize {
    log_lines(reg, &[needle, "HTTP/1.1\" 2"]).len()
}

#[tokio::test]
async fn push_to_edge_registry_mounts_shared_layers_and_reruns_with_heads_only() {
    let upstream = Upstream::start().await;
    let edge = Registry::start(RegistryOptions::plain().with_auth(EDGE_USER, EDGE_PASS))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let push = Push::new(dir.path(), &upstream, &edge);
    let (ok, stdout, stderr) = push.run().await;
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stdout.contains(EDGE_PASS) && !stderr.contains(EDGE_PASS));
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("PUSHED ")).count(),
        3,
        "{stdout}"
    );
    skopeo_reads_the_upstream_digests_back(&upstream, &edge).await;
    every_platform_of_the_index_is_there(&upstream, &edge, dir.path()).await;
    the_shared_base_went_up_once_and_was_mounted(&upstream, &edge, &stdout);
    a_rerun_pushes_nothing(&push, &edge).await;
}

/// The upstream of the push test: app and web on a shared base layer, and
/// a 2-platform index.
struct Upstream {
    reg: Registry,
    base: LayerSpec,
    app: PushedImage,
    web: PushedImage,
    multi: PushedIndex,
}

impl Upstream {
    async fn start() -> Upstream {
        let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
        let base = LayerSpec::shared(300_000, 41);
        let on_base = |size, seed| ImageSpec::random(&[size], seed).with_base(base);
        let app = push_image(&reg, "demo/app", "v1", &on_base(100_000, 42))
            .await
            .unwrap();
        let web = push_image(&reg, "demo/web", "2.0", &on_base(50_000, 43))
            .await
            .unwrap();
        let platforms = [("linux", "amd64"), ("linux", "arm64")];
        let multi = push_index(
            &reg,
            "demo/multi",
            "v2",
            &platforms,
            &ImageSpec::random(&[80_000], 44),
        )
        .await
        .unwrap();
        assert!(app.layer_digests.contains(&base.digest()));
        assert!(web.layer_digests.contains(&base.digest()));
        Upstream {
            reg,
            base,
            app,
            web,
            multi,
        }
    }
}

/// `sync --push-to` of the three upstream images into the edge registry,
/// with the password in a file.
struct Push {
    args: [&'static str; 5],
    extra: Vec<std::ffi::OsString>,
}

impl Push {
    fn new(dir: &std::path::Path, upstream: &Upstream, edge: &Registry) -> Push {
        let file = dir.join("images.yaml");
        let repos = [
            ("app", "demo/app", "v1"),
            ("web", "demo/web", "2.0"),
            ("multi", "demo/multi", "v2"),
        ];
        std::fs::write(&file, yaml(&upstream.reg.addr(), None, &repos)).unwrap();
        let pw_file = dir.join("edge-password");
        std::fs::write(&pw_file, format!("{EDGE_PASS}\n")).unwrap();
        let extra: Vec<std::ffi::OsString> = vec![
            "--from".into(),
            file.into(),
            "--data-dir".into(),
            dir.join("data").into(),
            "--push-to".into(),
            edge.addr().into(),
            "--push-password-file".into(),
            pw_file.into(),
        ];
        Push {
            args: [
                "sync",
                "--no-gc",
                "--push-insecure",
                "--push-username",
                EDGE_USER,
            ],
            extra,
        }
    }

    async fn run(&self) -> (bool, String, String) {
        run(&self.args, &self.extra).await
    }
}

async fn skopeo_reads_the_upstream_digests_back(upstream: &Upstream, edge: &Registry) {
    let creds = format!("--creds={EDGE_USER}:{EDGE_PASS}");
    let edge_args = ["--tls-verify=false", creds.as_str()];
    for (repo, tag, want) in [
        ("demo/app", "v1", &upstream.app.manifest_digest),
        ("demo/web", "2.0", &upstream.web.manifest_digest),
        ("demo/multi", "v2", &upstream.multi.index_digest),
    ] {
        let got = skopeo::inspect_digest(
            &format!("docker://{}/{repo}:{tag}", edge.addr()),
            &edge_args,
        )
        .await
        .unwrap();
        assert_eq!(&got, want, "{repo}:{tag} in the edge registry");
    }
}

/// Every platform of the index reached the edge, not only the index.
async fn every_platform_of_the_index_is_there(
    upstream: &Upstream,
    edge: &Registry,
    dir: &std::path::Path,
) {
    let copy_dir = dir.join("copy");
    skopeo::copy(
        &format!("docker://{}/demo/multi:v2", edge.addr()),
        &format!("oci:{}:v2", copy_dir.display()),
        &[
            "--all",
            "--src-tls-verify=false",
            &format!("--src-creds={EDGE_USER}:{EDGE_PASS}"),
        ],
    )
    .await
    .unwrap();
    let mut copied = skopeo::oci_layout_blobs(&copy_dir).unwrap();
    copied.sort();
    for d in upstream.multi.blob_digests() {
        assert!(
            copied.contains(&d),
            "{d} of demo/multi copied from the edge"
        );
    }
}

/// The shared base went up once and reached the other repository by a
/// cross-repository mount; everything else was uploaded once.
fn the_shared_base_went_up_once_and_was_mounted(
    upstream: &Upstream,
    edge: &Registry,
    stdout: &str,
) {
    let distinct: std::collections::HashSet<String> = upstream
        .app
        .blob_digests()
        .into_iter()
        .chain(upstream.web.blob_digests())
        .chain(upstream.multi.blob_digests())
        .collect();
    assert_eq!(pushed_count(stdout, "mounted"), 1, "{stdout}");
    assert_eq!(
        pushed_count(stdout, "blobs") as usize,
        distinct.len(),
        "uploads: {stdout}"
    );
    let mount_line = format!("mount={}", upstream.base.digest());
    let mounts = log_lines(edge, &[&mount_line, "HTTP/1.1\" 201"]);
    assert_eq!(
        mounts.len(),
        1,
        "one mount of the base answered 201 in the edge registry's log: {mounts:#?}\n{:#?}",
        log_lines(edge, &[&mount_line])
    );
}

/// A re-run pushes nothing: no PUT, POST or PATCH reaches the edge.
async fn a_rerun_pushes_nothing(push: &Push, edge: &Registry) {
    let writes = |reg: &Registry| {
        log_count(reg, "\"PUT ") + log_count(reg, "\"POST ") + log_count(reg, "\"PATCH ")
    };
    let before = writes(edge);
    assert!(before > 0, "the access log records writes");
    let (ok, stdout, stderr) = push.run().await;
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stdout.matches(": already there").count(),
        3,
        "re-run: {stdout}"
    );
    assert_eq!(writes(edge), before, "a re-run sent no write to the edge");
}

#[tokio::test]
async fn push_prefix_and_bad_push_flags() {
    let upstream = Registry::start(RegistryOptions::plain()).await.unwrap();
    let edge = Registry::start(RegistryOptions::plain()).await.unwrap();
    let app = push_image(
        &upstream,
        "demo/app",
        "v1",
        &ImageSpec::random(&[10_000], 51),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("images.yaml");
    std::fs::write(
        &file,
        yaml(&upstream.addr(), None, &[("app", "demo/app", "v1")]),
    )
    .unwrap();
    let data = dir.path().join("data");
    let common: Vec<std::ffi::OsString> = vec![
        "--from".into(),
        file.clone().into(),
        "--data-dir".into(),
        data.clone().into(),
    ];
    let addr = edge.addr();
    let (ok, stdout, stderr) = run(
        &[
            "sync",
            "--push-to",
            &addr,
            "--push-insecure",
            "--push-prefix",
            "site-a",
        ],
        &common,
    )
    .await;
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let got = skopeo::inspect_digest(
        &format!("docker://{addr}/site-a/demo/app:v1"),
        &["--tls-verify=false"],
    )
    .await
    .unwrap();
    assert_eq!(got, app.manifest_digest);

    // A prefix that cannot be a repository path is refused, naming the flag.
    let (ok, _, stderr) = run(
        &[
            "sync",
            "--push-to",
            &addr,
            "--push-insecure",
            "--push-prefix",
            "Bad//x",
        ],
        &common,
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("push prefix \"Bad//x\""), "{stderr}");
    // A missing password file is named.
    let missing = dir.path().join("no-such-file");
    let (ok, _, stderr) = run(
        &[
            "sync",
            "--push-to",
            &addr,
            "--push-username",
            "u",
            "--push-password-file",
            missing.to_str().unwrap(),
        ],
        &common,
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("--push-password-file"), "{stderr}");
    // An edge that refuses the push fails the run, naming the image.
    let locked = Registry::start(RegistryOptions::plain().with_auth("u", "right-pw"))
        .await
        .unwrap();
    let locked_addr = locked.addr();
    let (ok, stdout, _) = run(
        &["sync", "--push-to", &locked_addr, "--push-insecure"],
        &common,
    )
    .await;
    assert!(!ok);
    assert!(
        stdout.contains(&format!("PUSH FAILED default/app@{}", app.manifest_digest)),
        "{stdout}"
    );
}
