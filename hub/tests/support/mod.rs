//! What the hub's end-to-end tests share: starting the real `imgfleet-hub`
//! binary on a free loopback port, and running the real `imgfleet` CLI
//! against it.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imgfleet_tests::{ChildGuard, Etcd, free_port};

pub const HUB: &str = env!("CARGO_BIN_EXE_imgfleet-hub");
pub const ETCD_PREFIX: &str = "/imgfleet";

/// The CLI binary beside the hub's; cargo builds it for the workspace's tests.
pub fn cli_binary() -> PathBuf {
    let p = Path::new(HUB).with_file_name("imgfleet");
    assert!(
        p.is_file(),
        "the imgfleet CLI is not built at {}: run `cargo build -p imgfleet --bin imgfleet` before this test",
        p.display()
    );
    p
}

/// A running hub process.
pub struct Hub {
    pub child: ChildGuard,
    pub url: String,
    pub data: PathBuf,
    pub log: PathBuf,
}

/// Starts the hub on `data` (and `etcd`, when given) with debug logging, so
/// that password checks of the log cover its most verbose output, and waits
/// until its gRPC port accepts connections.
pub async fn start_hub(data: &Path, log: &Path, etcd: Option<&Etcd>) -> Hub {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(HUB);
    cmd.arg("--listen")
        .arg(&listen)
        .arg("--metrics-listen")
        .arg("off")
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "debug");
    if let Some(e) = etcd {
        cmd.arg("--etcd-endpoints")
            .arg(e.endpoint())
            .arg("--etcd-prefix")
            .arg(ETCD_PREFIX);
    }
    let mut child =
        ChildGuard::spawn_with_log("imgfleet-hub", cmd, log.to_path_buf()).expect("spawn hub");
    let l = listen.clone();
    child
        .wait_ready("gRPC port open", Duration::from_secs(30), move || {
            let l = l.clone();
            async move { Ok(tokio::net::TcpStream::connect(&l).await.is_ok()) }
        })
        .await
        .expect("hub ready");
    Hub {
        child,
        url: format!("https://{listen}"),
        data: data.to_path_buf(),
        log: log.to_path_buf(),
    }
}

/// What one CLI run printed.
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the CLI against `hub` with the admin bundle the hub wrote.
pub fn run_cli(hub: &Hub, args: &[&str]) -> Out {
    let out = Command::new(cli_binary())
        .args(args)
        .env("IMGFLEET_HUB", &hub.url)
        .env("IMGFLEET_CREDENTIALS", hub.data.join("admin"))
        .output()
        .expect("run imgfleet");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
