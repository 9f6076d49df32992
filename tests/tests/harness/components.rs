//! Self-tests for process plumbing, etcd and the registry.

use std::time::Duration;

use std::process::Command;

use imgfleet_tests::{
    ChildGuard, Etcd, Registry, RegistryOptions, free_port, log_file, require_binary, wait_until,
};

#[test]
fn missing_binary_panics_with_install_hint() {
    let result = std::panic::catch_unwind(|| {
        require_binary("imgfleet-no-such-binary-xyz", "imgfleet-fake-pkg")
    });
    let payload = result.expect_err("require_binary must panic for a missing binary");
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .expect("panic payload is a string");
    assert_eq!(
        msg,
        "imgfleet-no-such-binary-xyz not found: install it with `sudo apt-get install -y imgfleet-fake-pkg`"
    );
}

#[test]
fn present_binary_is_found() {
    let sh = require_binary("sh", "dash");
    assert!(sh.is_absolute(), "{sh:?}");
}

#[test]
fn free_ports_are_distinct_and_log_files_fresh() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut sorted = ports.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        ports.len(),
        "free_port handed out a port twice: {ports:?}"
    );
    let a = log_file("x");
    let b = log_file("x");
    assert_ne!(a, b);
    assert!(
        a.to_string_lossy().contains("test-logs/harness/x-"),
        "{a:?}"
    );
}

#[tokio::test]
async fn readiness_failure_quotes_the_log() {
    let mut cmd = Command::new(require_binary("sh", "dash"));
    cmd.arg("-c")
        .arg("echo starting up; echo 'fatal: bad config' >&2; exit 3");
    let mut child = ChildGuard::spawn("failing", cmd).unwrap();
    let err = child
        .wait_ready("ready", Duration::from_secs(10), || async { Ok(false) })
        .await
        .expect_err("a child that exits is never ready");
    let msg = format!("{err:#}");
    assert!(msg.contains("exited"), "{msg}");
    assert!(
        msg.contains("starting up") && msg.contains("fatal: bad config"),
        "{msg}"
    );
}

/// True while `/proc/<pid>` shows a process that is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[tokio::test]
async fn dropping_a_child_guard_kills_the_whole_group() {
    let mut cmd = Command::new(require_binary("sh", "dash"));
    cmd.arg("-c").arg("sleep 1000 & echo grandchild=$!; wait");
    let child = ChildGuard::spawn("sleeper", cmd).unwrap();
    let pid = child.pid().unwrap();
    let log = child.log_path().to_path_buf();
    let mut grandchild = 0u32;
    wait_until("grandchild pid logged", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .find_map(|l| l.strip_prefix("grandchild=")?.trim().parse().ok());
        if let Some(p) = found {
            grandchild = p;
        }
        async move { Ok(found.is_some()) }
    })
    .await
    .unwrap();
    assert!(alive(pid) && alive(grandchild));
    drop(child);
    assert!(!alive(pid), "the child survived its guard");
    wait_until("grandchild gone", Duration::from_secs(5), || async move {
        Ok(!alive(grandchild))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn etcd_put_get_and_restart_keeps_data() {
    let mut etcd = Etcd::start().await.expect("etcd starts");
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    let rev = etcd.put("/harness/k", b"v1").await.unwrap();
    assert!(rev >= 2, "revision after first put: {rev}");
    assert_eq!(
        etcd.get("/harness/k").await.unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(etcd.get("/harness/missing").await.unwrap(), None);

    etcd.kill();
    assert!(
        etcd.get("/harness/k").await.is_err(),
        "a killed etcd must not answer"
    );
    etcd.restart().await.expect("etcd restarts");
    assert_eq!(
        etcd.get("/harness/k").await.unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(etcd.revision().await.unwrap(), rev);

    // Compaction works through the gateway: a second put then compacting to it succeeds,
    // and compacting again to an older revision is refused.
    let rev2 = etcd.put("/harness/k", b"v2").await.unwrap();
    etcd.compact(rev2).await.expect("compact");
    let err = etcd
        .compact(rev)
        .await
        .expect_err("compacting to an older revision fails");
    assert!(format!("{err:#}").contains("compacted"), "{err:#}");
}

async fn status(
    client: &reqwest::Client,
    url: &str,
    creds: Option<(&str, &str)>,
) -> reqwest::Result<u16> {
    let mut req = client.get(url);
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    Ok(req.send().await?.status().as_u16())
}

#[tokio::test]
async fn registry_plain_and_restart() {
    let mut reg = Registry::start(RegistryOptions::default())
        .await
        .expect("registry starts");
    assert!(reg.base_url().starts_with("http://127.0.0.1:"));
    let url = format!("{}/v2/", reg.base_url());
    assert_eq!(status(reg.http_client(), &url, None).await.unwrap(), 200);
    reg.kill();
    assert!(status(reg.http_client(), &url, None).await.is_err());
    reg.restart().await.expect("registry restarts");
    assert_eq!(status(reg.http_client(), &url, None).await.unwrap(), 200);
}

#[tokio::test]
async fn registry_with_basic_auth() {
    let reg = Registry::start(RegistryOptions::default().with_auth("alice", "s3cret"))
        .await
        .expect("registry starts");
    let url = format!("{}/v2/", reg.base_url());
    let http = reg.http_client();
    assert_eq!(status(http, &url, None).await.unwrap(), 401);
    assert_eq!(
        status(http, &url, Some(("alice", "wrong"))).await.unwrap(),
        401
    );
    assert_eq!(status(http, &url, reg.credentials()).await.unwrap(), 200);
    assert!(
        !format!("{reg:?}").contains("s3cret"),
        "Debug output leaks the password"
    );
}

#[tokio::test]
async fn registry_with_tls_trusts_only_its_ca() {
    let reg = Registry::start(RegistryOptions::default().with_tls())
        .await
        .expect("registry starts");
    assert!(reg.base_url().starts_with("https://127.0.0.1:"));
    let ca_dir = reg.ca_dir().expect("TLS registry has a CA dir");
    assert!(ca_dir.join("ca.pem").is_file() && ca_dir.join("ca.crt").is_file());
    let url = format!("{}/v2/", reg.base_url());

    let ca = reqwest::Certificate::from_pem(reg.ca_pem().unwrap().as_bytes()).unwrap();
    let trusting = reqwest::Client::builder()
        .tls_certs_only([ca])
        .no_proxy()
        .build()
        .unwrap();
    assert_eq!(status(&trusting, &url, None).await.unwrap(), 200);
    // Also by the name `localhost`, which the certificate covers too.
    let by_name = url.replace("127.0.0.1", "localhost");
    assert_eq!(status(&trusting, &by_name, None).await.unwrap(), 200);

    let untrusting = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap();
    let err = status(&untrusting, &url, None)
        .await
        .expect_err("a client without the CA must fail");
    assert!(err.is_connect() || err.is_request(), "{err:?}");
}
