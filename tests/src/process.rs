//! Process plumbing shared by every component the harness starts: finding binaries,
//! free ports, per-test log files, readiness polling and a guard that kills a child's
//! whole process group on drop.

use std::collections::HashSet;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How many log lines a readiness error quotes from the component's log.
pub const LOG_TAIL_LINES: usize = 30;

/// Finds the executable `name` on `PATH` (and in `/usr/sbin`, `/usr/bin`, `/usr/local/bin`,
/// which a minimal `PATH` may lack).
///
/// # Panics
/// When the binary is missing. Tests that need a component must fail, never skip, and the
/// message says how to install it:
/// ``<name> not found: install it with `sudo apt-get install -y <apt_package>` ``.
pub fn require_binary(name: &str, apt_package: &str) -> PathBuf {
    match find_binary(name) {
        Some(path) => path,
        None => panic!("{name} not found: install it with `sudo apt-get install -y {apt_package}`"),
    }
}

/// Like [`require_binary`] but returns `None` instead of panicking.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    // A name with a slash is a path already; honour it as given.
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin", "/bin"];
    std::env::split_paths(&path_var)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Ports this process has already handed out, so that two components started by tests
/// running in parallel threads never get the same one.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Returns a free TCP port on 127.0.0.1 that this process has not handed out before.
///
/// The port is found by binding `127.0.0.1:0` and then released, so another process could
/// in theory grab it in between; on a test machine that is rare enough to accept.
///
/// # Panics
/// When the OS cannot bind a loopback socket at all (the test cannot run then).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for a free port");
        let port = listener
            .local_addr()
            .expect("local_addr of a bound socket")
            .port();
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no free 127.0.0.1 port found after 1000 attempts");
}

/// The workspace's target directory: `$CARGO_TARGET_DIR` when set, else the `target/`
/// next to this crate.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        if dir.is_absolute() {
            return dir;
        }
        // A relative CARGO_TARGET_DIR is relative to the workspace root.
        return workspace_root().join(dir);
    }
    workspace_root().join("target")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The directory holding the logs of this test binary:
/// `<target>/test-logs/<test-binary-name>/` (created on first use).
///
/// The name is the test executable's name without cargo's hash suffix, or the pid when the
/// executable cannot be named.
pub fn test_log_dir() -> PathBuf {
    let name = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            // cargo names test binaries `<name>-<16 hex digits>`.
            Some((base, hash))
                if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                base.to_string()
            }
            _ => stem,
        })
        .unwrap_or_else(|| format!("pid-{}", std::process::id()));
    let dir = target_dir().join("test-logs").join(name);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Returns a fresh log file path for one run of `component`:
/// `<target>/test-logs/<test-binary-name>/<component>-<n>.log`, `n` counting up within
/// this process. The directory exists; the file does not yet.
pub fn log_file(component: &str) -> PathBuf {
    let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
    test_log_dir().join(format!("{component}-{n}.log"))
}

/// The name the brief gave [`log_file`]; returns the same kind of path (a *file* path
/// `<target>/test-logs/<test-binary-name>/<component>-<n>.log`).
pub fn log_dir(component: &str) -> PathBuf {
    log_file(component)
}

/// Returns the last `n` lines of the file at `path` (reads at most the last 64 KiB), or a
/// note saying why it could not be read.
pub fn tail_file(path: &Path, n: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let start = len.saturating_sub(64 * 1024);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read log {}: {e})", path.display()),
    }
}

/// A child process in its own process group. Its stdout and stderr go to a log file under
/// `target/test-logs/`. Dropping the guard (or calling [`ChildGuard::kill`]) sends SIGKILL
/// to the whole group and reaps the child, so nothing outlives the test.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    component: String,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group with stdin closed and stdout/stderr written to a
    /// fresh [`log_file`] for `component` (truncating a log of an earlier test run).
    pub fn spawn(component: &str, cmd: Command) -> Result<ChildGuard> {
        let log = log_file(component);
        // The numbering restarts with each test run; drop what an earlier run left there.
        let _ = std::fs::remove_file(&log);
        Self::spawn_with_log(component, cmd, log)
    }

    /// Like [`ChildGuard::spawn`] but appends to the given log file (used by restarts that
    /// want one log per component run, or callers that chose the path).
    pub fn spawn_with_log(component: &str, mut cmd: Command, log: PathBuf) -> Result<ChildGuard> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("create log dir {}", dir.display()))?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open log file {}", log.display()))?;
        let err = out.try_clone().context("clone log file handle")?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Own process group, so that SIGKILL to the group also takes any grandchildren.
            .process_group(0);
        let child = cmd.spawn().with_context(|| {
            format!(
                "spawn {component} ({:?}); log {}",
                cmd.get_program(),
                log.display()
            )
        })?;
        Ok(ChildGuard {
            child: Some(child),
            component: component.to_string(),
            log,
        })
    }

    /// The OS process id (also the process group id), or `None` once killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The component name given at spawn.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The log file receiving the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_file(&self.log, n)
    }

    /// Returns the exit status if the child has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// True while the child has not exited and has not been killed.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// Sends SIGKILL to the child's process group and reaps the child. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // ESRCH just means the group is gone already.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the child's process group without reaping (e.g. SIGSTOP/SIGCONT to
    /// freeze a component, SIGTERM for a graceful stop).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", self.component))?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        killpg(Pid::from_raw(pid), signal)
            .with_context(|| format!("send {signal} to {}", self.component))
    }

    /// An error saying `what` failed for this component, with the last
    /// [`LOG_TAIL_LINES`] lines of its log.
    pub fn error_with_log(&self, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: {what}\n--- last {LOG_TAIL_LINES} lines of {} ---\n{}",
            self.component,
            self.log.display(),
            self.log_tail(LOG_TAIL_LINES)
        )
    }

    /// Waits until `GET {base_url}/v2/` answers 200 or 401: the readiness of
    /// anything that speaks the OCI distribution API (a registry, the agent's
    /// mirror).
    pub async fn wait_distribution_api(
        &mut self,
        http: &reqwest::Client,
        base_url: &str,
        timeout: Duration,
    ) -> Result<()> {
        let url = format!("{base_url}/v2/");
        self.wait_ready("answering GET /v2/", timeout, || {
            let request = http.get(&url).send();
            async move {
                let status = request.await?.status().as_u16();
                Ok(status == 200 || status == 401)
            }
        })
        .await
    }

    /// Polls `probe` every 50 ms until it returns `Ok(true)`, for at most `timeout`.
    /// Fails early if the child exits. The error carries the last lines of the log and the
    /// last probe error, so a failed start explains itself.
    pub async fn wait_ready<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool>>,
    {
        let mut last_err = String::from("not ready yet");
        let outcome = poll(timeout, async || {
            if let Some(status) = self.try_wait() {
                return Some(Err(
                    self.error_with_log(format!("exited with {status} before {what}"))
                ));
            }
            if self.child.is_none() {
                return Some(Err(anyhow!("{} was killed before {what}", self.component)));
            }
            match probe().await {
                Ok(true) => Some(Ok(())),
                Ok(false) => None,
                Err(e) => {
                    last_err = format!("{e:#}");
                    None
                }
            }
        })
        .await;
        outcome.unwrap_or_else(|| {
            Err(self.error_with_log(format!(
                "not {what} after {timeout:?} (last probe: {last_err})"
            )))
        })
    }

    /// Waits (at most `timeout`) for the child to exit by itself and returns its status.
    /// On timeout it is left running and the error quotes its log.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match poll(timeout, async || self.try_wait()).await {
            Some(status) => {
                self.child = None;
                Ok(status)
            }
            None => Err(self.error_with_log(format!("still running after {timeout:?}"))),
        }
    }

    /// Stops the child the way an operator does: SIGTERM to its process group, then waits
    /// (at most `timeout`) for it to exit and returns its status. A child still running
    /// then is killed, and the error quotes its log.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        let outcome = self.wait_exit(timeout).await;
        if outcome.is_err() {
            self.kill();
        }
        outcome.with_context(|| format!("{} did not end on SIGTERM", self.component))
    }
}

/// The methods every component with one process shares, written once: a component
/// struct with a field `child: Option<ChildGuard>` (empty while it is down) and an
/// `async fn spawn(&mut self) -> Result<()>` that starts it and waits until it is ready.
/// `$what` names the component in the docs. With `log`, the struct also has a field
/// `log: PathBuf`, the one log every run of the component appends to.
macro_rules! restartable {
    ($what:literal, log) => {
        $crate::process::restartable!($what);

        #[doc = concat!("The log of ", $what, " (all its runs, appended).")]
        pub fn log_path(&self) -> &std::path::Path {
            &self.log
        }

        /// The last `n` lines of the log.
        pub fn log_tail(&self, n: usize) -> String {
            $crate::process::tail_file(&self.log, n)
        }
    };
    ($what:literal) => {
        #[doc = concat!("SIGKILLs ", $what, " (no graceful shutdown), keeping its data dir, ports and log. Idempotent.")]
        pub fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                child.kill();
            }
        }

        #[doc = concat!("True while ", $what, " runs.")]
        pub fn is_running(&mut self) -> bool {
            self.child
                .as_mut()
                .is_some_and($crate::process::ChildGuard::is_running)
        }

        #[doc = concat!("The process id while ", $what, " runs.")]
        pub fn pid(&self) -> Option<u32> {
            self.child
                .as_ref()
                .and_then($crate::process::ChildGuard::pid)
        }

        #[doc = concat!("Kills ", $what, " if it runs and starts it again with the same options, ports and data, waiting until it is ready.")]
        pub async fn restart(&mut self) -> anyhow::Result<()> {
            self.kill();
            self.spawn().await
        }
    };
}
pub(crate) use restartable;

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `probe` every 50 ms until it returns `Ok(true)` or `timeout` passes; the error
/// names `what` and quotes the last probe error. For conditions not tied to one child.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let mut last_err = String::from("condition false");
    let outcome = poll(timeout, async || match probe().await {
        Ok(true) => Some(()),
        Ok(false) => None,
        Err(e) => {
            last_err = format!("{e:#}");
            None
        }
    })
    .await;
    match outcome {
        Some(()) => Ok(()),
        None => bail!("timed out after {timeout:?} waiting for {what} (last: {last_err})"),
    }
}

/// How often the harness looks at a condition it waits for: short next to the seconds a
/// component takes to start, long enough not to load the machine.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Runs `step` every [`POLL_EVERY`] until it returns `Some`, for at most `timeout` (it
/// runs at least once); `None` when time ran out. The one polling loop of the harness.
async fn poll<T>(timeout: Duration, mut step: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(done) = step().await {
            return Some(done);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Installs rustls's ring crypto provider as the process default (idempotent). Call it before
/// building any TLS client; the harness's own clients call it for you.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
