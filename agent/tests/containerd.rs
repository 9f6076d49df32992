//! containerd on a node, as configured by `imgfleet-agent hosts-toml`, against a
//! plain-HTTP upstream: it pulls through the mirror while the upstream refuses
//! every connection, and from the upstream (the `server` of the generated
//! file) once the mirror is stopped. A real containerd 1.6 with its own socket,
//! `ctr image pull --hosts-dir`, a real registry behind a fault proxy.

use std::process::Command;
use std::time::Duration;

use imgfleet_tests::containerd::Containerd;
use imgfleet_tests::fault::FaultProxy;
use imgfleet_tests::images::{ImageSpec, push_image};
use imgfleet_tests::process::{ChildGuard, free_port};
use imgfleet_tests::registry::{Registry, RegistryOptions};

const BIN: &str = env!("CARGO_BIN_EXE_imgfleet-agent");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_the_mirror_then_falls_back_to_the_http_upstream() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    // The upstream as nodes name it: a plain-HTTP registry behind a proxy
    // that can refuse every connection.
    let proxy = FaultProxy::start(reg.addr().parse().unwrap())
        .await
        .unwrap();
    let upstream = proxy.addr().to_string();
    let pushed = push_image(
        &reg,
        "demo/app",
        "v1",
        &ImageSpec::random(&[300_000, 40_000], 81),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The agent syncs from that upstream and serves its store.
    let yaml = dir.path().join("images.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\nmetadata: {{name: lab}}\n\
             spec: {{domain: \"{upstream}\", insecure: true}}\n---\n\
             apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata: {{name: app}}\n\
             spec: {{repository: demo/app, tag: v1, registryRef: {{name: lab}}}}\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let sync = tokio::process::Command::new(BIN)
        .args(["sync", "--from"])
        .arg(&yaml)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .await
        .unwrap();
    assert!(
        sync.status.success(),
        "{}",
        String::from_utf8_lossy(&sync.stdout)
    );
    let mirror_addr = format!("127.0.0.1:{}", free_port());
    let mut serve = Command::new(BIN);
    serve
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--mirror-listen", &mirror_addr]);
    let mut mirror = ChildGuard::spawn("containerd-test-mirror", serve).unwrap();
    mirror
        .wait_distribution_api(
            &reqwest::Client::new(),
            &format!("http://{mirror_addr}"),
            Duration::from_secs(20),
        )
        .await
        .unwrap();

    // The hosts.toml files, written by the agent in containerd's layout.
    let hosts = dir.path().join("certs.d");
    let out = tokio::process::Command::new(BIN)
        .args(["hosts-toml", "--mirror"])
        .arg(format!("http://{mirror_addr}"))
        .arg("--upstream")
        .arg(format!("http://{upstream}"))
        .arg("--out-dir")
        .arg(&hosts)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = hosts.join(&upstream).join("hosts.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains(&format!("server = \"http://{upstream}\"")),
        "{text}"
    );
    assert!(
        text.contains(&format!("[host.\"http://{mirror_addr}\"]")),
        "{text}"
    );

    let reference = format!("{upstream}/demo/app:v1");

    // 1. The upstream refuses everything: the image can only come from the mirror.
    proxy.set_refuse(true);
    let node = Containerd::start().await.unwrap();
    node.pull(&reference, &hosts).await.unwrap();
    assert_eq!(
        node.image_digest(&reference).await.unwrap(),
        pushed.manifest_digest
    );
    drop(node);

    // 2. The mirror is down and the upstream is back: a fresh node gets the
    //    image from the upstream, over plain HTTP as the file says.
    mirror.kill();
    proxy.set_refuse(false);
    let before = proxy.total_connections();
    let node = Containerd::start().await.unwrap();
    node.pull(&reference, &hosts).await.unwrap();
    assert_eq!(
        node.image_digest(&reference).await.unwrap(),
        pushed.manifest_digest
    );
    assert!(
        proxy.total_connections() > before,
        "the image did not come from the upstream"
    );
}
