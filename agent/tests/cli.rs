//! The `imgfleet-agent` binary end to end: `sync --from FILE` (success,
//! failure, SIGKILL mid-transfer then resume), `serve`, and `hosts-toml`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{count_afresh, file_len, push, push_on_base, wait_for, yaml};
use imgfleet_tests::fault::FaultProxy;
use imgfleet_tests::images::{ImageSpec, push_image};
use imgfleet_tests::registry::{Registry, RegistryOptions};
use imgfleet_tests::skopeo;

const MIB: u64 = 1024 * 1024;
const BIN: &str = env!("CARGO_BIN_EXE_imgfleet-agent");

/// Writes `images.yaml` in `dir` for anonymous pulls of `repos` from
/// `domain`; returns its path.
fn write_yaml(
    dir: &std::path::Path,
    domain: &str,
    repos: &[(&str, &str, &str)],
) -> std::path::PathBuf {
    let file = dir.join("images.yaml");
    std::fs::write(&file, yaml(domain, None, repos)).unwrap();
    file
}

/// `imgfleet-agent sync --from FILE --data-dir DATA`, running, silent.
fn spawn_sync(file: &std::path::Path, data: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .args(["sync", "--from"])
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn run_sync(file: &std::path::Path, data: &std::path::Path) -> std::process::Output {
    run_sync_with(file, data, &[]).await
}

/// `imgfleet-agent sync FLAGS --from FILE --data-dir DATA`, to its end.
async fn run_sync_with(
    file: &std::path::Path,
    data: &std::path::Path,
    flags: &[&str],
) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .arg("sync")
        .args(flags)
        .arg("--from")
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run imgfleet-agent")
}

#[tokio::test]
async fn sync_from_file_then_serve_to_skopeo() {
    let reg = Registry::start(RegistryOptions::plain().with_auth("edge", "pw-xyz-123"))
        .await
        .unwrap();
    let a = push(&reg, "demo/app", "v1", &ImageSpec::random(&[200_000], 21)).await;
    let b = push(&reg, "demo/web", "2.0", &ImageSpec::random(&[100_000], 22)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("images.yaml");
    std::fs::write(
        &file,
        yaml(
            &reg.addr(),
            Some(("edge", "pw-xyz-123")),
            &[("app", "demo/app", "v1"), ("web", "demo/web", "2.0")],
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = run_sync(&file, &data).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains(&format!("SYNCED  default/app@{}", a.manifest_digest)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("SYNCED  default/web@{}", b.manifest_digest)),
        "{stdout}"
    );
    assert!(stdout.contains("2 of 2 images synced"), "{stdout}");
    assert!(!stdout.contains("pw-xyz-123") && !stderr.contains("pw-xyz-123"));

    // Again: nothing to fetch.
    let out = run_sync(&file, &data).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.matches("already present").count(), 2, "{stdout}");

    // Serve it, and pull with skopeo.
    let port = imgfleet_tests::process::free_port();
    let mut serve = tokio::process::Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--mirror-listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v2/");
    imgfleet_tests::process::wait_until(
        "the mirror to come up",
        Duration::from_secs(5),
        || async { Ok(reqwest::get(&url).await?.status() == 200) },
    )
    .await
    .unwrap();
    let d = skopeo::inspect_digest(
        &format!("docker://127.0.0.1:{port}/demo/web:2.0"),
        &["--tls-verify=false"],
    )
    .await
    .unwrap();
    assert_eq!(d, b.manifest_digest);
    serve.kill().await.unwrap();
}

#[tokio::test]
async fn failing_image_exits_nonzero_and_is_named() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    push(&reg, "demo/app", "v1", &ImageSpec::random(&[10_000], 23)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_yaml(
        dir.path(),
        &reg.addr(),
        &[("app", "demo/app", "v1"), ("missing", "demo/missing", "v9")],
    );
    let out = run_sync(&file, &dir.path().join("data")).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("FAILED  Repository default/missing tag v9"),
        "{stdout}"
    );
    assert!(stdout.contains("not found"), "{stdout}");
    assert!(stdout.contains("SYNCED  default/app@"), "{stdout}");

    // Invalid YAML names the object and field, exit 64.
    std::fs::write(&file, yaml(&reg.addr(), None, &[("bad", "", "v1")])).unwrap();
    let out = run_sync(&file, &dir.path().join("data")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("Repository default/bad"), "{stderr}");
}

#[tokio::test]
async fn sigkill_mid_transfer_then_restart_resumes() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let size = 12 * MIB;
    let pushed = push(&reg, "demo/big", "v1", &ImageSpec::random(&[size], 24)).await;
    let blob = &pushed.layer_digests[0];
    let proxy = FaultProxy::start(reg.addr().parse().unwrap())
        .await
        .unwrap();
    proxy.set_throttle(Some(4 * MIB));
    let dir = tempfile::tempdir().unwrap();
    let file = write_yaml(
        dir.path(),
        &proxy.addr().to_string(),
        &[("big", "demo/big", "v1")],
    );
    let data = dir.path().join("data");
    let partial = data.join("partial").join(&blob[7..]);

    let mut child = spawn_sync(&file, &data);
    wait_for(
        "a third of the blob on disk",
        Duration::from_secs(60),
        || file_len(&partial) >= size / 3,
    )
    .await;
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let offset = file_len(&partial);
    assert!(offset >= size / 3 && offset < size, "offset {offset}");
    count_afresh(&proxy).await;

    let out = run_sync(&file, &data).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(data.join("blobs/sha256").join(&blob[7..]).exists());
    let through = proxy.bytes_to_client();
    assert!(
        through < size - offset + MIB,
        "{through} bytes after a restart at {offset} of {size}: it did not resume"
    );
}

#[tokio::test]
async fn hosts_toml_names_the_mirror() {
    // An HTTPS upstream: containerd falls back to it over HTTPS.
    let (out, stdout) = hosts_toml(&["--upstream", "harbor.example.com"]).await;
    assert!(out.status.success());
    for line in [
        "# /etc/containerd/certs.d/harbor.example.com/hosts.toml",
        "server = \"https://harbor.example.com\"",
        "[host.\"http://10.1.2.3:5050\"]",
    ] {
        assert!(stdout.contains(line), "{line} in\n{stdout}");
    }
    let bad = tokio::process::Command::new(BIN)
        .args(["hosts-toml", "--mirror", "10.1.2.3:5050"])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));

    // A plain-HTTP upstream: containerd falls back to it over HTTP.
    let (out, stdout) = hosts_toml(&["--upstream", "http://127.0.0.1:5000"]).await;
    assert!(out.status.success());
    for line in [
        "# /etc/containerd/certs.d/127.0.0.1:5000/hosts.toml",
        "server = \"http://127.0.0.1:5000\"",
    ] {
        assert!(stdout.contains(line), "{line} in\n{stdout}");
    }
    assert!(!stdout.contains("https://http"), "{stdout}");

    // Input that would inject a [host] section is refused, naming the flag.
    for (flag, value) in [
        ("--upstream", "evil.com\"]\n[host.\"http://attacker:80"),
        ("--upstream", "harbor.example.com/path"),
        ("--mirror", "http://m:5050\"]\n[host.\"http://attacker:80"),
    ] {
        let mut args = vec!["hosts-toml", "--mirror", "http://10.1.2.3:5050"];
        if flag == "--mirror" {
            args[2] = value;
        } else {
            args.extend([flag, value]);
        }
        let out = tokio::process::Command::new(BIN)
            .args(&args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{value:?}: {stderr}");
        assert!(stderr.contains(flag), "{value:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{value:?} printed something");
    }

    // --out-dir writes containerd's config_path layout.
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let (out, _) = hosts_toml(&[
        "--upstream",
        "docker.io",
        "--upstream",
        "http://127.0.0.1:5000",
        "--out-dir",
        out_dir,
    ])
    .await;
    assert!(out.status.success());
    let hub = std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).unwrap();
    assert!(
        hub.contains("server = \"https://registry-1.docker.io\""),
        "{hub}"
    );
    let lab = std::fs::read_to_string(dir.path().join("127.0.0.1:5000/hosts.toml")).unwrap();
    assert!(lab.contains("server = \"http://127.0.0.1:5000\""), "{lab}");
}

/// `imgfleet-agent hosts-toml --mirror http://10.1.2.3:5050 ARGS...`, and
/// its standard output.
async fn hosts_toml(args: &[&str]) -> (std::process::Output, String) {
    let out = tokio::process::Command::new(BIN)
        .args(["hosts-toml", "--mirror", "http://10.1.2.3:5050"])
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (out, stdout)
}

#[tokio::test]
async fn removed_repository_is_collected_after_grace_keeping_shared_blobs() {
    use imgfleet_tests::images::LayerSpec;
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let base = LayerSpec::new(300_000, 31);
    let [app, web] = push_on_base(
        &reg,
        base,
        [("demo/app", 40_000, 32), ("demo/web", 50_000, 33)],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_yaml(
        dir.path(),
        &reg.addr(),
        &[("app", "demo/app", "v1"), ("web", "demo/web", "v1")],
    );
    let data = dir.path().join("data");
    assert!(run_sync(&file, &data).await.status.success());
    let blob = |d: &str| data.join("blobs/sha256").join(&d[7..]);
    assert!(blob(&web.layer_digests[1]).exists());

    // web leaves the file; within the grace period nothing goes.
    std::fs::write(&file, yaml(&reg.addr(), None, &[("app", "demo/app", "v1")])).unwrap();
    let out = run_sync(&file, &data).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("GC: removed 0 images"), "{stdout}");
    assert!(blob(&web.layer_digests[1]).exists());

    // After the grace period (0s here) web's own content goes, the shared base stays.
    let out = run_sync_with(&file, &data, &["--grace-period", "0s"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("GC: removed 1 images"), "{stdout}");
    assert!(
        !blob(&web.layer_digests[1]).exists(),
        "web's own layer kept"
    );
    assert!(!blob(&web.config_digest).exists());
    assert!(!blob(&web.manifest_digest).exists());
    for d in app.blob_digests() {
        assert!(blob(&d).exists(), "{d} of app removed");
    }
    assert!(blob(&app.manifest_digest).exists());
    let index = std::fs::read_to_string(data.join("index.json")).unwrap();
    assert!(!index.contains("demo/web"), "{index}");
}

/// The high-water mark of a process's resident memory, from /proc.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test]
async fn memory_does_not_grow_with_blob_size() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let size = 96 * MIB;
    let pushed = push(&reg, "demo/huge", "v1", &ImageSpec::random(&[size], 41)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("images.yaml");
    std::fs::write(
        &file,
        yaml(&reg.addr(), None, &[("huge", "demo/huge", "v1")]),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut child = spawn_sync(&file, &data);
    let pid = child.id().unwrap();
    // VmHWM is the peak so far: the last reading before the exit holds it.
    let mut peak = 0;
    let mut sample = tokio::time::interval(Duration::from_millis(10));
    let status = loop {
        sample.tick().await;
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
    };
    assert!(status.success());
    assert!(
        data.join("blobs/sha256")
            .join(&pushed.layer_digests[0][7..])
            .exists()
    );
    let peak_mib = peak / 1024;
    assert!(peak > 0, "no memory reading");
    assert!(
        peak_mib < 64,
        "peak RSS {peak_mib} MiB while syncing a {} MiB blob",
        size / MIB
    );
    println!("peak RSS {peak_mib} MiB for a {} MiB blob", size / MIB);
}

#[tokio::test]
async fn sync_applies_each_repositorys_retention_even_when_an_image_fails() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let spec = |seed| ImageSpec::random(&[30_000], seed);
    let app1 = push_image(&reg, "demo/app", "v1", &spec(91)).await.unwrap();
    let web1 = push_image(&reg, "demo/web", "v1", &spec(92)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("images.yaml");
    let data = dir.path().join("data");
    // app keeps only its desired version; web uses the agent's default (2);
    // "gone" names a tag that does not exist, so its image fails.
    let mut text = yaml(
        &reg.addr(),
        None,
        &[
            ("app", "demo/app", "v1"),
            ("web", "demo/web", "v1"),
            ("gone", "demo/gone", "v1"),
        ],
    );
    text = text.replacen(
        "  repository: demo/app\n",
        "  repository: demo/app\n  retention:\n    keepVersions: 1\n",
        1,
    );
    std::fs::write(&file, &text).unwrap();
    let sync = || async {
        let out = run_sync_with(&file, &data, &["--grace-period", "0s"]).await;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(out.status.code(), Some(1), "demo/gone fails: {stdout}");
        assert!(
            stdout.contains("FAILED  Repository default/gone"),
            "{stdout}"
        );
        stdout
    };
    let stdout = sync().await;
    assert!(stdout.contains("GC: removed 0 images"), "{stdout}");

    // Both tags move to new content.
    let app2 = push_image(&reg, "demo/app", "v1", &spec(93)).await.unwrap();
    let web2 = push_image(&reg, "demo/web", "v1", &spec(94)).await.unwrap();
    let stdout = sync().await;
    // GC ran despite the failing image, and only app's old version went.
    assert!(stdout.contains("GC: removed 1 images"), "{stdout}");
    let blob = |d: &str| data.join("blobs/sha256").join(&d[7..]);
    assert!(!blob(&app1.manifest_digest).exists(), "app v1 kept");
    assert!(
        !blob(&app1.layer_digests[0]).exists(),
        "app v1's layer kept"
    );
    for d in [
        &app2.manifest_digest,
        &web1.manifest_digest,
        &web2.manifest_digest,
    ] {
        assert!(blob(d).exists(), "{d} removed");
    }
    assert!(
        blob(&web1.layer_digests[0]).exists(),
        "web's rollback layer removed"
    );
}
