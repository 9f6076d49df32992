//! The scanner adapter client against the harness's adapter, which speaks
//! Harbor's pluggable scanner adapter API v1.2 and answers with recorded
//! Trivy-adapter reports (no scanner or vulnerability database can be
//! installed here; see `imgfleet_tests::scanner`).

use std::time::Duration;

use imgfleet_common::scanner::{OCI_MANIFEST, ScanError, ScanTarget, ScannerClient, Severity};
use imgfleet_tests::scanner::{CLEAN, CRITICAL, ScannerAdapter};

fn target(digest: &str) -> ScanTarget {
    ScanTarget {
        registry_url: "http://127.0.0.1:5000".into(),
        authorization: "Basic dXNlcjpwYXNz".into(),
        repository: "demo/app".into(),
        digest: digest.into(),
        mime_type: OCI_MANIFEST.into(),
    }
}

#[tokio::test]
async fn scans_wait_for_the_report_and_summarise_it() {
    let bad = format!("sha256:{}", "b".repeat(64));
    let good = format!("sha256:{}", "c".repeat(64));
    let unknown = format!("sha256:{}", "d".repeat(64));
    let adapter = ScannerAdapter::start(&[(&bad, CRITICAL), (&good, CLEAN)])
        .await
        .unwrap();
    let client = ScannerClient::new(&adapter.url).unwrap();
    assert_eq!(client.metadata().await.unwrap(), "Trivy v0.58.1");

    // The first poll answers 302 + Refresh-After; the client waits and asks again.
    let id = client.request(&target(&bad)).await.unwrap();
    let summary = client.report(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(summary.highest(), Some(Severity::Critical));
    assert!(summary.blocks(Severity::Critical));
    assert_eq!(summary.describe(), "Critical: 1, High: 1, Low: 1");

    let id = client.request(&target(&good)).await.unwrap();
    let summary = client.report(&id, Duration::from_secs(30)).await.unwrap();
    assert!(!summary.blocks(Severity::Medium));
    assert_eq!(summary.describe(), "Low: 1");
    assert_eq!(adapter.requests(), 2);

    // A wait shorter than the scan: still running, not a result.
    let id = client.request(&target(&good)).await.unwrap();
    match client.report(&id, Duration::from_millis(10)).await {
        Err(ScanError::StillRunning { .. }) => {}
        other => panic!("expected StillRunning, got {other:?}"),
    }
    // A failed scan, and a scanner that is down, give no result either.
    let id = client.request(&target(&unknown)).await.unwrap();
    let err = client
        .report(&id, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, ScanError::Protocol { .. }), "{err:?}");
    let url = adapter.url.clone();
    drop(adapter);
    let down = ScannerClient::new(&url).unwrap();
    let mut err = down.request(&target(&good)).await;
    // The listener closes as the adapter shuts down; wait for that.
    for _ in 0..50 {
        if matches!(err, Err(ScanError::Unreachable { .. })) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        err = down.request(&target(&good)).await;
    }
    assert!(matches!(err, Err(ScanError::Unreachable { .. })), "{err:?}");
}
