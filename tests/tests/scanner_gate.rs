//! The scanner gate end to end (real registry, hub, 3 agents): a digest
//! whose scan finds a Critical vulnerability never reaches a mirror and its
//! status says `ScanBlocked` with the report summary, while a clean report
//! lets the other image through to every cluster. The scanner is the
//! harness's adapter, which speaks Harbor's pluggable scanner adapter API
//! v1.2 and answers with recorded Trivy-adapter reports: no scanner or
//! vulnerability database can be installed here.

use std::time::Duration;

use anyhow::Result;
use imgfleet_tests::fleet::{HubOptions, HubProcess};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::scanner::{CLEAN, CRITICAL, ScannerAdapter};
use imgfleet_tests::{Registry, RegistryOptions, policy, wait_until};

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_finding_holds_a_digest_back_and_a_clean_report_lets_it_through() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let registry = Registry::start(RegistryOptions::plain()).await?;
    let target = PushTarget::from(&registry);
    let vulnerable = target
        .push_image("demo/vulnerable", "v1", &ImageSpec::random(&[40_000], 81))
        .await?;
    let clean = target
        .push_image("demo/clean", "v1", &ImageSpec::random(&[40_000], 82))
        .await?;
    let adapter = ScannerAdapter::start(&[
        (&vulnerable.manifest_digest, CRITICAL),
        (&clean.manifest_digest, CLEAN),
    ])
    .await?;

    let hub = HubProcess::start(HubOptions::embedded(root.join("hub"))).await?;
    let cli = hub.cli();
    let scan = format!(
        "  scan:\n    adapter: {}\n    blockSeverity: Critical\n",
        adapter.url
    );
    let docs = vec![
        policy::registry_secret("lab", &registry.addr(), None),
        policy::repository("vulnerable", "demo/vulnerable", "v1", "lab", &scan),
        policy::repository("clean", "demo/clean", "v1", "lab", &scan),
    ];
    cli.apply_yaml(&policy::objects(&docs)).await?;
    let mut agents = Vec::new();
    for name in ["edge-1", "edge-2", "edge-3"] {
        agents.push(hub.start_agent(name, &["default"], root).await?);
    }

    wait_until(
        "the clean image synced on all 3 clusters",
        CONVERGE,
        || async {
            let table = cli.ok(&["get", "repositories"]).await?;
            Ok(table
                .lines()
                .any(|l| l.split_whitespace().any(|w| w == "clean") && l.contains(" 3/3 ")))
        },
    )
    .await?;
    wait_until(
        "describe vulnerable saying ScanBlocked",
        CONVERGE,
        || async {
            let text = cli.ok(&["describe", "repository", "vulnerable"]).await?;
            Ok(text.contains("ScanBlocked") && text.contains("Critical: 1, High: 1, Low: 1"))
        },
    )
    .await?;
    let text = cli.ok(&["describe", "repository", "clean"]).await?;
    assert!(
        text.contains("SCAN") && text.contains("Low: 1"),
        "describe shows the report summary: {text}"
    );
    for agent in &agents {
        assert_eq!(agent.manifest_status("demo/clean", "v1").await?, 200);
        assert_eq!(agent.manifest_status("demo/vulnerable", "v1").await?, 404);
        assert_eq!(
            agent
                .manifest_status("demo/vulnerable", &vulnerable.manifest_digest)
                .await?,
            404
        );
    }
    assert!(adapter.requests() >= 2, "both digests were scanned");
    Ok(())
}
