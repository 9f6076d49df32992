//! A real containerd for tests: its own root, state and socket in a temporary directory (no
//! system service, no CRI plugin), and `ctr` pointed at it. Pulls go through
//! `ctr image pull --hosts-dir DIR`, which reads `DIR/<host>/hosts.toml` the way the CRI
//! plugin reads `config_path`, so a test checks the same files a node would use.
//!
//! containerd needs root (it mounts snapshots to unpack layers); a test that cannot start it
//! fails with the reason, it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::process::{ChildGuard, require_binary};

/// The namespace every pull of the harness goes to.
pub const NAMESPACE: &str = "imgfleet-test";

/// A containerd daemon on its own socket; killed on drop.
pub struct Containerd {
    child: ChildGuard,
    socket: PathBuf,
    ctr: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .field("log", &self.child.log_path())
            .finish()
    }
}

/// Whether this process runs with effective uid 0 (from `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

impl Containerd {
    /// Starts containerd in a fresh temporary directory and waits until `ctr version`
    /// reaches it.
    pub async fn start() -> Result<Containerd> {
        let bin = require_binary("containerd", "containerd");
        let ctr = require_binary("ctr", "containerd");
        if !is_root() {
            bail!("containerd needs root to unpack images (snapshot mounts); run the test as root");
        }
        let dir = tempfile::Builder::new()
            .prefix("imgfleet-containerd-")
            .tempdir()
            .context("creating containerd's directory")?;
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        // The CRI plugin is off: ctr talks to the content, image and snapshot services.
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {root:?}\nstate = {state:?}\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = {socket:?}\n\
                 [ttrpc]\n  address = {ttrpc:?}\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n",
                root = dir.path().join("root"),
                state = dir.path().join("state"),
                socket = socket,
                ttrpc = dir.path().join("containerd.sock.ttrpc"),
                opt = dir.path().join("opt"),
            ),
        )
        .context("writing containerd's config")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config);
        let mut child = ChildGuard::spawn("containerd", cmd)?;
        let (ctr2, sock2) = (ctr.clone(), socket.clone());
        child
            .wait_ready("answering ctr version", Duration::from_secs(30), || {
                let (ctr, sock) = (ctr2.clone(), sock2.clone());
                async move {
                    let out = tokio::process::Command::new(ctr)
                        .arg("--address")
                        .arg(sock)
                        .arg("version")
                        .output()
                        .await?;
                    Ok(out.status.success())
                }
            })
            .await?;
        Ok(Containerd {
            child,
            socket,
            ctr,
            _dir: dir,
        })
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs `ctr --address SOCKET --namespace imgfleet-test ARGS`; returns stdout, or an
    /// error with both outputs.
    pub async fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args)
            .output()
            .await
            .context("running ctr")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}):\n{stdout}\n{}\n--- containerd log ---\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.child.log_tail(20)
            );
        }
        Ok(stdout)
    }

    /// `ctr image pull --hosts-dir HOSTS_DIR REFERENCE`: fetches and unpacks the image for
    /// this machine's platform, through the registries the hosts directory names.
    pub async fn pull(&self, reference: &str, hosts_dir: &Path) -> Result<()> {
        let hosts = hosts_dir.to_string_lossy();
        self.ctr(&["image", "pull", "--hosts-dir", &hosts, reference])
            .await
            .map(|_| ())
    }

    /// The digest `ctr image ls` records for `reference`.
    pub async fn image_digest(&self, reference: &str) -> Result<String> {
        let list = self.ctr(&["image", "ls"]).await?;
        list.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&reference))
            .and_then(|cols| cols.get(2).map(|d| d.to_string()))
            .with_context(|| format!("{reference} is not in `ctr image ls`:\n{list}"))
    }
}
