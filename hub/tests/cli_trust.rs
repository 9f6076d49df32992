//! The `imgfleet` CLI's behaviour at its edges, against the real `imgfleet-hub`
//! binary (and a real etcd where the store matters):
//! - a closed pipe (`imgfleet get ... -o yaml | head -1`) ends quietly: exit 141, no
//!   panic, no backtrace, no message;
//! - a field over its size limit is refused by the hub's apply with the very message
//!   `imgfleet validate` prints, naming object, field and limit;
//! - with etcd stopped, `/readyz` answers 503 while `/healthz` stays 200, and the CLI
//!   says the hub's policy store is unavailable (not that the hub cannot be reached);
//!   with etcd back, both recover;
//! - `imgfleet watch` of a Repository that does not exist fails at once.
//!
//! The CLI binary must be built first: `cargo build -p imgfleet --bin imgfleet` (cargo
//! builds it for the workspace's tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_client::AdminServiceClient;
use imgfleet::model::{Object, RegistrySecret, RegistrySecretSpec};
use imgfleet_common::tls::TlsMaterial;
use imgfleet_tests::fleet::{HubOptions, HubProcess, workspace_binary};
use imgfleet_tests::{Etcd, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the hub may take to notice etcd stopped or came back (its readiness
/// check times out after 0.8 s and is cached for 1 s; etcd takes a few seconds to start).
const STORE_CHANGE: Duration = Duration::from_secs(30);

fn cli_binary() -> PathBuf {
    workspace_binary("imgfleet").expect("the imgfleet CLI binary")
}

/// `imgfleet --hub URL --credentials DIR <args>` as a command.
fn imgfleet(hub: &HubProcess, args: &[&str]) -> Command {
    let mut cmd = Command::new(cli_binary());
    cmd.arg("--hub")
        .arg(hub.url())
        .arg("--credentials")
        .arg(hub.admin_credentials_dir())
        .args(args)
        .env_remove("IMGFLEET_HUB")
        .env_remove("IMGFLEET_CREDENTIALS")
        .env("RUST_BACKTRACE", "1");
    cmd
}

fn repositories_yaml(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata:\n  name: app-{i:04}\n  namespace: default\nspec:\n  repository: library/app-{i}\n  tag: v1.0.{i}\n  registryRef:\n    name: harbor-prod\n  syncInterval: 24h\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write test file");
    path.to_str().expect("utf-8 temp path").to_owned()
}

/// Asserts that a run ended quietly on its closed pipe.
fn assert_quiet_exit(what: &str, status: std::process::ExitStatus, stderr: &str) {
    assert_eq!(
        status.code(),
        Some(141),
        "{what}: expected the SIGPIPE-like exit 141, got {status}; stderr:\n{stderr}"
    );
    assert!(
        stderr.is_empty(),
        "{what}: a closed pipe must end quietly, but stderr says:\n{stderr}"
    );
}

#[tokio::test]
async fn a_closed_pipe_ends_every_command_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = HubProcess::start(HubOptions::embedded(dir.path().join("hub")))
        .await
        .expect("hub starts");
    // Enough objects that `get -o yaml` writes well over a pipe's 64 KiB buffer, so the
    // write after `head` has gone fails whatever the timing.
    let file = write(dir.path(), "repos.yaml", &repositories_yaml(300));
    hub.cli()
        .ok(&["apply", "-f", &file])
        .await
        .expect("apply 300 repositories");

    // As a user types it: `imgfleet get repositories -A -o yaml | head -1`.
    let mut cmd = imgfleet(&hub, &["get", "repositories", "-A", "-o", "yaml"]);
    let mut producer = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("imgfleet starts");
    let head = Command::new("head")
        .arg("-1")
        .stdin(Stdio::from(producer.stdout.take().expect("piped")))
        .output()
        .expect("head runs");
    let out = producer.wait_with_output().expect("imgfleet ends");
    assert_eq!(
        String::from_utf8_lossy(&head.stdout),
        "apiVersion: image.theriseunion.io/v1alpha1\n"
    );
    assert_quiet_exit(
        "get -o yaml | head -1",
        out.status,
        &String::from_utf8_lossy(&out.stderr),
    );

    // Every command's output: a reader that is gone before anything is written.
    let pipe_file = write(dir.path(), "one.yaml", &repositories_yaml(1));
    for args in [
        vec!["get", "repositories", "-A"],
        vec!["get", "repositories", "-A", "-o", "json"],
        vec!["get", "repository", "app-0001", "-o", "wide"],
        vec!["describe", "repository", "app-0001"],
        vec!["apply", "-f", &pipe_file],
        vec!["validate", "-f", &pipe_file],
        vec!["watch", "repository", "app-0001", "--timeout", "30s"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = imgfleet(&hub, &args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("imgfleet runs");
        assert_quiet_exit(
            &args.join(" "),
            out.status,
            &String::from_utf8_lossy(&out.stderr),
        );
    }
}

#[tokio::test]
async fn the_hub_refuses_an_oversized_field_with_the_message_validate_gives() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = HubProcess::start(HubOptions::embedded(dir.path().join("hub")))
        .await
        .expect("hub starts");
    let password = "p".repeat(100 * 1024);
    let yaml = format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\nmetadata:\n  name: harbor-prod\n  namespace: default\nspec:\n  domain: 127.0.0.1:9\n  username: admin\n  password: {password}\n"
    );
    let file = write(dir.path(), "secret.yaml", &yaml);
    let message = "RegistrySecret default/harbor-prod: spec.password: 100 KiB long: \
                   expected a password or token of at most 64 KiB";

    let out = hub
        .cli()
        .run(&["validate", "-f", &file])
        .await
        .expect("validate runs");
    assert!(!out.success());
    assert!(out.stderr.contains(message), "{}", out.stderr);
    assert!(
        !out.stderr.contains(&password[..100]),
        "the password is echoed"
    );

    // The CLI refuses before sending; a client that sends it anyway gets the same words.
    let out = hub
        .cli()
        .run(&["apply", "-f", &file])
        .await
        .expect("apply runs");
    assert!(!out.success());
    assert!(out.stderr.contains(message), "{}", out.stderr);

    let admin = TlsMaterial::from_dir(&hub.admin_credentials_dir()).expect("admin bundle");
    let mut client = AdminServiceClient::new(admin.connect(&hub.url()).await.expect("connect"));
    let mut secret = RegistrySecret::new(
        "harbor-prod",
        RegistrySecretSpec {
            domain: "127.0.0.1:9".into(),
            username: Some("admin".into()),
            password: Some(password.clone()),
            provider: Default::default(),
            insecure: false,
        },
    );
    secret.metadata.namespace = Some("default".into());
    let status = client
        .apply(pb::ApplyRequest {
            object: Some(pb::Object::from(&Object::RegistrySecret(secret))),
            dry_run: false,
        })
        .await
        .expect_err("the hub refuses the oversized password");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), message);

    let out = hub
        .cli()
        .run(&["get", "rs", "harbor-prod"])
        .await
        .expect("get runs");
    assert!(!out.success(), "nothing was stored: {}", out.stdout);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
}

/// `GET path` on the hub's metrics listener: (status code, body).
async fn http_get(base: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP answer: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_owned()))
}

async fn wait_ready_code(hub: &HubProcess, want: u16) -> String {
    let base = hub.metrics_url();
    let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = last.clone();
    wait_until(
        &format!("/readyz answers {want}"),
        STORE_CHANGE,
        move || {
            let base = base.clone();
            let seen = seen.clone();
            async move {
                let (code, body) = http_get(&base, "/readyz").await?;
                *seen.lock().expect("lock") = body;
                Ok(code == want)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", hub.log_tail(30)));
    last.lock().expect("lock").clone()
}

#[tokio::test]
async fn a_stopped_store_is_not_ready_and_the_cli_says_so() {
    let mut etcd = Etcd::start().await.expect("etcd starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = HubProcess::start(HubOptions::etcd(&etcd.endpoint(), dir.path().join("hub")))
        .await
        .expect("hub starts");
    let cli = hub.cli();
    let file = write(dir.path(), "repos.yaml", &repositories_yaml(1));
    cli.ok(&["apply", "-f", &file]).await.expect("apply");

    assert_eq!(wait_ready_code(&hub, 200).await, "ok\n");

    etcd.kill();
    let body = wait_ready_code(&hub, 503).await;
    assert!(
        body.starts_with("policy store unavailable: etcd "),
        "/readyz body: {body}"
    );
    // Liveness is not readiness: the process is fine.
    let (code, _) = http_get(&hub.metrics_url(), "/healthz")
        .await
        .expect("healthz");
    assert_eq!(code, 200);

    let store_down = format!(
        "the hub at {} is up, but its policy store is unavailable: etcd ",
        hub.url()
    );
    for args in [
        vec!["get", "repositories"],
        vec!["describe", "repository", "app-0000"],
        vec!["apply", "-f", &file],
        vec!["delete", "repository", "app-0000"],
    ] {
        let out = cli.run(&args).await.expect("imgfleet runs");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", out.stdout);
        assert!(
            out.stderr.contains(&store_down),
            "{args:?}: expected {store_down:?} in:\n{}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("cannot reach the hub"),
            "{args:?}: the hub was reached:\n{}",
            out.stderr
        );
    }

    etcd.restart().await.expect("etcd restarts");
    assert_eq!(wait_ready_code(&hub, 200).await, "ok\n");
    let out = cli
        .ok(&["get", "repositories"])
        .await
        .expect("get after etcd is back");
    assert!(out.contains("app-0000"), "{out}");
}

#[tokio::test]
async fn watching_a_repository_that_does_not_exist_fails_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = HubProcess::start(HubOptions::embedded(dir.path().join("hub")))
        .await
        .expect("hub starts");
    for args in [
        vec!["watch", "repository", "nope"],
        vec![
            "watch",
            "repository",
            "nope",
            "--until-synced",
            "-n",
            "team-a",
        ],
    ] {
        // Without a timeout of its own, a watch that waited would never end: the
        // test's timeout would fail it.
        let out = tokio::time::timeout(Duration::from_secs(60), hub.cli().run(&args))
            .await
            .unwrap_or_else(|_| panic!("{args:?} kept waiting for a missing Repository"))
            .expect("imgfleet runs");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", out.stdout);
        let ns = if args.contains(&"team-a") {
            "team-a"
        } else {
            "default"
        };
        assert!(
            out.stderr.starts_with(&format!(
                "error: Repository {ns}/nope not found; create it first"
            )),
            "{args:?}: {}",
            out.stderr
        );
    }
}
