//! The daemon's command line: bad settings exit 64 and name the setting;
//! `run` with environment fallbacks starts the mirror and /metrics with every
//! hub down and stops with exit 0 on SIGTERM; a delta on the wrong base makes
//! the agent reconnect and take the full set.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;
use imgfleet::api::v1 as pb;
use imgfleet_tests::process::{ChildGuard, free_port};

async fn run(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("IMGFLEET_HUB")
        .env_remove("IMGFLEET_CREDENTIALS")
        .stdin(std::process::Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("a bad configuration exits at once")
        .expect("run imgfleet-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_settings_exit_64_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "edge-2");
    let creds = pki.creds_dir.to_str().unwrap().to_string();
    let admin_dir = dir.path().join("admin");
    let a = pki.ca.issue_admin("ops", 30).unwrap();
    imgfleet_common::tls::TlsMaterial {
        ca_pem: pki.ca.cert_pem().into(),
        cert_pem: a.cert_pem,
        key_pem: a.key_pem,
    }
    .write_to_dir(&admin_dir)
    .unwrap();
    let admin = admin_dir.to_str().unwrap();
    let hub = "https://127.0.0.1:1";
    let cases: &[(&[&str], &str)] = &[
        (&["--credentials", &creds], "--hub: required"),
        (&["--hub", hub], "--credentials: required"),
        (
            &["--hub", hub, "--credentials", "/nonexistent-creds"],
            "--credentials /nonexistent-creds: CA certificate /nonexistent-creds/ca.pem",
        ),
        (
            &["--hub", hub, "--credentials", admin],
            "expected a cluster certificate",
        ),
        (
            &["--hub", "http://127.0.0.1:1", "--credentials", &creds],
            "--hub http://127.0.0.1:1",
        ),
        (
            &[
                "--hub",
                hub,
                "--credentials",
                &creds,
                "--mirror-listen",
                "nowhere",
            ],
            "--mirror-listen nowhere",
        ),
        (
            &[
                "--hub",
                hub,
                "--credentials",
                &creds,
                "--grace-period",
                "soon",
            ],
            "--grace-period soon",
        ),
        (
            &[
                "run",
                "--hub",
                hub,
                "--credentials",
                &creds,
                "--concurrency-images",
                "0",
            ],
            "--concurrency-images 0",
        ),
        (
            &[
                "--hub",
                hub,
                "--credentials",
                &creds,
                "--keep-versions",
                "0",
            ],
            "--keep-versions 0: expected at least 1",
        ),
        (
            &[
                "--hub",
                hub,
                "--credentials",
                &creds,
                "--stall-timeout",
                "0s",
            ],
            "--stall-timeout 0s",
        ),
        (
            &[
                "--hub",
                hub,
                "--credentials",
                &creds,
                "--mirror-max-connections",
                "0",
            ],
            "--mirror-max-connections 0",
        ),
        (
            &[
                "--hub",
                hub,
                "--credentials",
                &creds,
                "--mirror-header-timeout",
                "never",
            ],
            "--mirror-header-timeout never",
        ),
    ];
    for (args, want) in cases {
        let (code, stderr) = run(args, &[]).await;
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want:?} in {stderr}");
    }
    // The environment fills in missing flags, and is checked the same way.
    let (code, stderr) = run(
        &[],
        &[("IMGFLEET_HUB", hub), ("IMGFLEET_CREDENTIALS", "/nope")],
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--credentials /nope"), "{stderr}");
}

#[tokio::test]
async fn run_from_environment_serves_with_every_hub_down_and_stops_on_sigterm() {
    imgfleet_tests::process::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "edge-3");
    let (mirror, metrics) = (free_port(), free_port());
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["run", "--mirror-listen", &format!("127.0.0.1:{mirror}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .env(
            "IMGFLEET_HUB",
            format!(
                "https://127.0.0.1:{},https://127.0.0.1:{}",
                free_port(),
                free_port()
            ),
        )
        .env("IMGFLEET_CREDENTIALS", &pki.creds_dir)
        .env("IMGFLEET_DATA_DIR", dir.path().join("data"))
        .env("RUST_LOG", "imgfleet_agent=info");
    let mut agent = ChildGuard::spawn("daemon-cli-agent", cmd).unwrap();
    let http = reqwest::Client::new();
    agent
        .wait_ready("mirror up", Duration::from_secs(20), || async {
            Ok(http
                .get(format!("http://127.0.0.1:{mirror}/v2/"))
                .send()
                .await?
                .status()
                == 200)
        })
        .await
        .unwrap();
    let text = get_text(&http, &format!("http://127.0.0.1:{metrics}/metrics")).await;
    assert!(text.contains("imgfleet_agent_hub_connected 0"), "{text}");
    assert!(dir.path().join("data/local.key").exists());
    // Reconnect attempts to the dead hubs are logged as warnings.
    let log_path = agent.log_path().to_path_buf();
    agent
        .wait_ready("logs a retried disconnect", Duration::from_secs(20), || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            async move { Ok(log.contains("WARN") && log.contains("will reconnect")) }
        })
        .await
        .unwrap();
    stops_with_0_on_sigterm(&mut agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_on_the_wrong_base_brings_a_full_set() {
    imgfleet_tests::process::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let set5 = pb::DesiredSet {
        generation: 5,
        epoch: "e9".into(),
        ..Default::default()
    };
    let (hub, cmd) = hub_and_agent(dir.path(), "edge-4", set5);
    let mut agent = ChildGuard::spawn("daemon-cli-resync", cmd.command()).unwrap();
    agent
        .wait_ready("acks 5", Duration::from_secs(20), || async {
            Ok(hub.record(|r| r.acks.iter().any(|a| a.generation == 5)))
        })
        .await
        .unwrap();
    // A delta from a generation the agent does not hold.
    let set10 = pb::DesiredSet {
        generation: 10,
        epoch: "e9".into(),
        ..Default::default()
    };
    hub.push_delta(
        pb::DesiredSetDelta {
            from_generation: 9,
            generation: 10,
            epoch: "e9".into(),
            ..Default::default()
        },
        set10,
    );
    agent
        .wait_ready(
            "reconnects and acks 10",
            Duration::from_secs(20),
            || async { Ok(hub.record(|r| r.acks.iter().any(|a| a.generation == 10))) },
        )
        .await
        .unwrap();
    let (hellos, acks) = hub.record(|r| (r.hellos.clone(), r.acks.clone()));
    assert_eq!(hellos.len(), 2);
    assert_eq!(hellos[1].current_generation, 5, "the held generation");
    assert!(
        acks.iter().all(|a| a.generation != 9),
        "the bad delta is not acked"
    );
}
