//! The real `imgfleet-hub` binary: first start prints how to point the CLI
//! at it (once), SIGTERM drains and exits 0 even with a Watch open, bad
//! configuration exits 64 naming the setting, and the log never contains a
//! password.

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_client::AdminServiceClient;
use imgfleet::model::parse_documents;
use imgfleet_common::tls::TlsMaterial;
use imgfleet_tests::{ChildGuard, free_port};
use nix::sys::signal::Signal;

const HUB: &str = env!("CARGO_BIN_EXE_imgfleet-hub");
const SEED: &str = include_str!("testdata/seed-quickstart.yaml");

fn hub_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(HUB);
    cmd.args(args)
        .env_remove("IMGFLEET_SECRET_KEY")
        .env("RUST_LOG", "debug");
    cmd
}

/// Run to completion, returning the exit status and stderr.
fn run(args: &[&str]) -> (ExitStatus, String) {
    let out = hub_cmd(args).output().expect("run imgfleet-hub");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Async, so that the test's own gRPC connections keep being served while
/// the hub drains (they must answer its GOAWAY ping).
async fn wait_exit(child: &mut ChildGuard, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "hub did not exit within {within:?}\n{}",
            child.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Started {
    child: ChildGuard,
    url: String,
    metrics: String,
}

async fn start(data: &Path, log: &Path) -> Started {
    let port = free_port();
    let mport = free_port();
    let listen = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{mport}");
    let mut cmd = hub_cmd(&["--listen", &listen, "--metrics-listen", &metrics]);
    cmd.arg("--data-dir").arg(data);
    let mut child =
        ChildGuard::spawn_with_log("imgfleet-hub", cmd, log.to_path_buf()).expect("spawn hub");
    let m = metrics.clone();
    child
        .wait_ready("healthz answers", Duration::from_secs(30), move || {
            let m = m.clone();
            async move { Ok(tokio::net::TcpStream::connect(&m).await.is_ok()) }
        })
        .await
        .expect("hub ready");
    Started {
        child,
        url: format!("https://{listen}"),
        metrics,
    }
}

#[tokio::test]
async fn first_start_prints_once_and_sigterm_drains_to_exit_0() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("hub-data");
    let log1 = dir.path().join("hub1.log");
    let mut hub = start(&data, &log1).await;

    let want = format!(
        "export IMGFLEET_HUB={} IMGFLEET_CREDENTIALS={}",
        hub.url,
        data.join("admin").display()
    );
    // The metrics port answers a moment before the setup line is printed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log1).expect("log");
        if text.contains(&want) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.contains(&want),
        "first start must print {want:?}:\n{text}"
    );

    // Use it: apply the seed with the printed credentials, and keep a Watch open.
    let admin = TlsMaterial::from_dir(&data.join("admin")).expect("admin bundle");
    let mut c = AdminServiceClient::new(admin.connect(&hub.url).await.expect("connect"));
    // Point the seed at a closed loopback port: tests send no traffic off
    // this machine, not even a DNS lookup.
    let seed = SEED.replace("harbor.example.com", "127.0.0.1:9");
    for o in parse_documents(&seed).expect("seed") {
        c.apply(pb::ApplyRequest {
            object: Some(pb::Object::from(&o)),
            dry_run: false,
        })
        .await
        .expect("apply");
    }
    let mut watch = c
        .watch(pb::WatchRequest {
            kind: pb::Kind::Repository as i32,
            all_namespaces: true,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("event").expect("open");
    assert_eq!(first.r#type, pb::WatchEventType::Added as i32);

    hub.child.signal(Signal::SIGTERM).expect("SIGTERM");
    let t0 = Instant::now();
    let status = wait_exit(&mut hub.child, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", hub.child.log_tail(30));
    // Draining must not wait out the grace period because of idle connections.
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "drain took {:?}\n{}",
        t0.elapsed(),
        hub.child.log_tail(20)
    );
    // The open Watch ended instead of holding the hub up. Events already
    // sent before the drain (the resolver's status write) may still arrive
    // first; what matters is that the stream ends.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_event)) = watch.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the Watch stream outlived the hub's drain");

    let text = std::fs::read_to_string(&log1).expect("log");
    assert!(!text.contains("Harbor12345"), "password in the hub log");
    assert!(text.contains("Applied"), "the debug log has the applies");

    // The second start on the same data directory prints nothing about setup
    // and still holds the objects; SIGINT also exits 0.
    let log2 = dir.path().join("hub2.log");
    let mut hub2 = start(&data, &log2).await;
    let mut c = AdminServiceClient::new(admin.connect(&hub2.url).await.expect("reconnect"));
    let got = c
        .get(pb::GetRequest {
            kind: pb::Kind::Repository as i32,
            namespace: "default".into(),
            name: "nginx-latest".into(),
        })
        .await
        .expect("object survived the restart");
    assert!(got.get_ref().kind.is_some());
    let metrics = http_get(&hub2.metrics, "/metrics").await;
    assert!(
        metrics.contains("imgfleet_hub_admin_requests_total{method=\"Get\",code=\"Ok\"} 1"),
        "{metrics}"
    );
    hub2.child.signal(Signal::SIGINT).expect("SIGINT");
    let status = wait_exit(&mut hub2.child, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    let text2 = std::fs::read_to_string(&log2).expect("log2");
    assert!(
        !text2.contains("export IMGFLEET_HUB"),
        "printed again:\n{text2}"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let data = data.to_str().expect("utf8 path");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().expect("utf8 path");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--listen", "abc"],
            "--listen \"abc\": expected HOST:PORT",
        ),
        (
            vec!["--metrics-listen", "1.2.3.4"],
            "--metrics-listen \"1.2.3.4\"",
        ),
        (vec!["--no-such-flag"], "--no-such-flag"),
        (vec!["--etcd-endpoints", "nohost"], "--etcd-endpoints"),
        (vec!["--secret-key", "1234"], "--secret-key"),
        (vec!["--tls-cert", missing], "--tls-key"),
        (
            vec![
                "--data-dir",
                data,
                "--tls-cert",
                missing,
                "--tls-key",
                missing,
                "--client-ca",
                missing,
            ],
            "missing.pem",
        ),
        (
            vec![
                "--data-dir",
                data,
                "--ca-cert",
                missing,
                "--ca-key",
                missing,
            ],
            "--ca-cert",
        ),
    ];
    for (args, want) in cases {
        let (status, stderr) = run(&args);
        assert_eq!(status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: stderr lacks {want:?}:\n{stderr}"
        );
        assert!(
            !stderr.contains("1234") || !args.contains(&"--secret-key"),
            "{stderr}"
        );
    }
    let (status, stdout_err) = run(&["--help"]);
    assert_eq!(status.code(), Some(0), "{stdout_err}");
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}
