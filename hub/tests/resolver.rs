//! Tag resolution and registry health against the real distribution registry:
//! fixed tags, tag patterns with keep-latest-N, platform filters, and each
//! failure reason the status can show, and signature policies (cosign
//! signatures made with PyPI's cryptography; see `imgfleet_tests::cosign`),
//! and the scanner gate, against the harness's adapter that speaks Harbor's
//! pluggable scanner API v1.2 with recorded reports (no scanner or
//! vulnerability database can be installed here).

use imgfleet::model::{Verify, VerifyKey, VerifyMode};
use imgfleet_common::registry::{Credentials, RegistryClient, RegistryConfig};
use imgfleet_common::scanner::Severity;
use imgfleet_hub::resolver::{
    FailureReason, HealthPhase, ResolveSpec, ScanGate, TagChoice, check_health, resolve,
};
use imgfleet_tests::cosign::{KeyPair, payload, push_signature};
use imgfleet_tests::images::{ImageSpec, PushTarget, push_image, push_index};
use imgfleet_tests::scanner::{CLEAN, CRITICAL, ScannerAdapter};
use imgfleet_tests::{Registry, RegistryOptions};

fn client(registry: &Registry, credentials: Option<(&str, &str)>) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        host: registry.addr(),
        credentials: credentials.map(|(u, p)| Credentials::new(u, p)),
        insecure: true,
        ..Default::default()
    })
    .expect("client for a loopback registry")
}

fn fixed(repository: &str, tags: &[&str]) -> ResolveSpec {
    ResolveSpec {
        repository: repository.into(),
        tags: TagChoice::Fixed(tags.iter().map(|t| t.to_string()).collect()),
        digest: None,
        platforms: vec![],
        verify: None,
        scan: None,
        shipped: vec![],
    }
}

#[tokio::test]
async fn resolves_tags_patterns_and_platforms() -> anyhow::Result<()> {
    let registry = Registry::start(RegistryOptions::plain()).await?;
    let mut pushed = Vec::new();
    for (i, tag) in ["v1.2.0", "v1.9.0", "v1.10.0", "latest"].iter().enumerate() {
        let image = push_image(
            &registry,
            "demo/app",
            tag,
            &ImageSpec::random(&[1024], i as u64),
        )
        .await?;
        pushed.push((tag.to_string(), image.manifest_digest));
    }
    let index = push_index(
        &registry,
        "demo/multi",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        &ImageSpec::random(&[512], 99),
    )
    .await?;
    let client = client(&registry, None);

    let got = resolve(&client, &fixed("demo/app", &["v1.9.0"]))
        .await
        .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].digest, pushed[1].1,
        "v1.9.0 resolves to the digest that was pushed"
    );

    let pattern = ResolveSpec {
        tags: TagChoice::Pattern {
            pattern: r"v1\.\d+\.\d+".into(),
            keep_latest: 2,
        },
        ..fixed("demo/app", &[])
    };
    let got = resolve(&client, &pattern)
        .await
        .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    let tags: Vec<&str> = got.iter().map(|r| r.tag.as_str()).collect();
    assert_eq!(
        tags,
        ["v1.10.0", "v1.9.0"],
        "keep-latest-2 picks the two newest versions"
    );
    assert_eq!(got[0].digest, pushed[2].1);

    let multi = ResolveSpec {
        platforms: vec!["linux/arm64".into()],
        ..fixed("demo/multi", &["v1"])
    };
    let got = resolve(&client, &multi)
        .await
        .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    assert_eq!(got[0].digest, index.index_digest);
    assert!(got[0].media_type.contains("index"), "{}", got[0].media_type);

    let missing_platform = ResolveSpec {
        platforms: vec!["linux/s390x".into()],
        ..fixed("demo/multi", &["v1"])
    };
    let failure = resolve(&client, &missing_platform)
        .await
        .expect_err("s390x is not in the index");
    assert_eq!(failure.reason, FailureReason::NotFound);
    assert!(
        failure.message.contains("linux/s390x"),
        "{}",
        failure.message
    );

    let failure = resolve(&client, &fixed("demo/app", &["nope"]))
        .await
        .expect_err("tag nope does not exist");
    assert_eq!(failure.reason, FailureReason::NotFound);

    let pinned = ResolveSpec {
        digest: Some(pushed[0].1.clone()),
        ..fixed("demo/app", &["pinned"])
    };
    let got = resolve(&client, &pinned)
        .await
        .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    assert_eq!(
        got[0].digest, pushed[0].1,
        "a pinned digest is kept as given"
    );

    let health = check_health(&client).await;
    assert_eq!(health.phase, HealthPhase::Connected, "{}", health.message);
    Ok(())
}

#[tokio::test]
async fn reports_auth_failures_and_unreachable_registries() -> anyhow::Result<()> {
    let mut registry =
        Registry::start(RegistryOptions::plain().with_auth("puller", "s3cret-pass")).await?;
    push_image(&registry, "demo/app", "v1", &ImageSpec::random(&[256], 1)).await?;

    let good = client(&registry, Some(("puller", "s3cret-pass")));
    let got = resolve(&good, &fixed("demo/app", &["v1"]))
        .await
        .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    assert_eq!(got.len(), 1);
    assert_eq!(check_health(&good).await.phase, HealthPhase::Connected);

    let bad = client(&registry, Some(("puller", "wrong-pass")));
    let failure = resolve(&bad, &fixed("demo/app", &["v1"]))
        .await
        .expect_err("wrong password");
    assert_eq!(
        failure.reason,
        FailureReason::AuthFailed,
        "{}",
        failure.message
    );
    assert!(
        !failure.message.contains("wrong-pass"),
        "the password leaked: {}",
        failure.message
    );
    let health = check_health(&bad).await;
    assert_eq!(health.phase, HealthPhase::AuthFailed, "{}", health.message);

    let anonymous = client(&registry, None);
    let failure = resolve(&anonymous, &fixed("demo/app", &["v1"]))
        .await
        .expect_err("anonymous is refused");
    assert_eq!(
        failure.reason,
        FailureReason::AuthFailed,
        "{}",
        failure.message
    );

    registry.kill();
    let failure = resolve(&good, &fixed("demo/app", &["v1"]))
        .await
        .expect_err("registry is down");
    assert_eq!(
        failure.reason,
        FailureReason::Unreachable,
        "{}",
        failure.message
    );
    assert_eq!(check_health(&good).await.phase, HealthPhase::Unreachable);
    Ok(())
}

#[tokio::test]
async fn a_signature_policy_lets_signed_digests_through_and_names_why_others_fail()
-> anyhow::Result<()> {
    let registry = Registry::start(RegistryOptions::plain()).await?;
    let target = PushTarget::from(&registry);
    let release = KeyPair::generate().await?;
    let signed = push_image(
        &registry,
        "demo/app",
        "signed",
        &ImageSpec::random(&[1024], 7),
    )
    .await?;
    let p = payload(
        &format!("{}/demo/app", registry.addr()),
        &signed.manifest_digest,
    );
    let sig = release.sign(&p).await?;
    push_signature(&target, "demo/app", &signed.manifest_digest, &[(p, sig)]).await?;
    let unsigned = push_image(
        &registry,
        "demo/app",
        "unsigned",
        &ImageSpec::random(&[1024], 8),
    )
    .await?;
    let client = client(&registry, None);
    let policy = |mode| Verify {
        keys: vec![VerifyKey {
            name: "release".into(),
            public_key: release.public_pem.clone(),
        }],
        mode,
    };
    let spec = |tags: &[&str], mode| ResolveSpec {
        verify: Some(policy(mode)),
        ..fixed("demo/app", tags)
    };

    let got = resolve(&client, &spec(&["signed"], None))
        .await
        .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    assert_eq!(got[0].digest, signed.manifest_digest);
    assert_eq!(
        got[0].verification.as_deref(),
        Some("verified (key release)")
    );

    // Enforce (the default): an unsigned digest fails the resolution, naming
    // the digest and why.
    let failure = resolve(&client, &spec(&["signed", "unsigned"], None))
        .await
        .expect_err("an unsigned digest must not resolve under enforce");
    assert_eq!(failure.reason, FailureReason::VerificationFailed);
    assert!(
        failure.message.contains(&unsigned.manifest_digest)
            && failure.message.contains("no cosign signature"),
        "{}",
        failure.message
    );

    // A signature by another key names the key.
    let other = KeyPair::generate().await?;
    let p = payload(
        &format!("{}/demo/app", registry.addr()),
        &unsigned.manifest_digest,
    );
    let sig = other.sign(&p).await?;
    push_signature(&target, "demo/app", &unsigned.manifest_digest, &[(p, sig)]).await?;
    let failure = resolve(&client, &spec(&["unsigned"], Some(VerifyMode::Enforce)))
        .await
        .expect_err("a signature by another key does not count");
    assert_eq!(failure.reason, FailureReason::VerificationFailed);
    assert!(
        failure.message.contains("key release") && failure.message.contains("does not verify"),
        "{}",
        failure.message
    );

    // Warn: it resolves, and says why it would not under enforce (in
    // status and `describe`, not only in the hub's log); a signed digest
    // beside it still says it verified.
    let got = resolve(
        &client,
        &spec(&["unsigned", "signed"], Some(VerifyMode::Warn)),
    )
    .await
    .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    assert_eq!(got[0].digest, unsigned.manifest_digest);
    let warned = got[0].verification.as_deref().unwrap_or_default();
    assert!(
        warned.starts_with("unverified, shipped under mode warn: ")
            && warned.contains("key release")
            && warned.contains("does not verify"),
        "{warned}"
    );
    assert_eq!(
        got[1].verification.as_deref(),
        Some("verified (key release)")
    );
    Ok(())
}

#[tokio::test]
async fn the_scanner_gate_holds_back_critical_findings_and_new_digests_while_it_is_down()
-> anyhow::Result<()> {
    let registry = Registry::start(RegistryOptions::plain()).await?;
    let bad = push_image(
        &registry,
        "demo/app",
        "bad",
        &ImageSpec::random(&[1024], 11),
    )
    .await?;
    let good = push_image(
        &registry,
        "demo/app",
        "good",
        &ImageSpec::random(&[1024], 12),
    )
    .await?;
    let adapter = ScannerAdapter::start(&[
        (&bad.manifest_digest, CRITICAL),
        (&good.manifest_digest, CLEAN),
    ])
    .await?;
    let client = client(&registry, None);
    let gated = |tag: &str, block: Option<Severity>, adapter: &str| ResolveSpec {
        scan: Some(ScanGate {
            adapter: adapter.to_string(),
            block,
        }),
        ..fixed("demo/app", &[tag])
    };

    // A Critical finding holds the digest back, with the report summary.
    let failure = resolve(
        &client,
        &gated("bad", Some(Severity::Critical), &adapter.url),
    )
    .await
    .expect_err("a Critical finding blocks");
    assert_eq!(failure.reason, FailureReason::ScanBlocked);
    assert!(
        failure.message.contains(&bad.manifest_digest)
            && failure.message.contains("Critical: 1, High: 1, Low: 1"),
        "{}",
        failure.message
    );
    // A clean report lets it through.
    let passed = resolve(
        &client,
        &gated("good", Some(Severity::Critical), &adapter.url),
    )
    .await
    .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    assert_eq!(passed[0].digest, good.manifest_digest);
    assert_eq!(
        passed[0].scan.as_deref(),
        Some("Low: 1"),
        "the summary is kept"
    );
    // blockSeverity None scans without blocking.
    resolve(&client, &gated("bad", None, &adapter.url))
        .await
        .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    let scans = adapter.requests();
    assert_eq!(scans, 3);

    // A digest already shipped is not scanned again, even with the scanner down.
    let url = adapter.url.clone();
    drop(adapter);
    // The adapter's listener closes as it shuts down; wait for that.
    let probe = imgfleet_common::scanner::ScannerClient::new(&url)?;
    imgfleet_tests::wait_until(
        "the scanner down",
        std::time::Duration::from_secs(10),
        || async { Ok(probe.metadata().await.is_err()) },
    )
    .await?;
    let mut shipped = gated("good", Some(Severity::Critical), &url);
    shipped.shipped = passed;
    let got = resolve(&client, &shipped)
        .await
        .map_err(|f| anyhow::anyhow!("{f:?}"))?;
    assert_eq!(got[0].digest, good.manifest_digest);
    assert_eq!(
        got[0].scan.as_deref(),
        Some("Low: 1"),
        "carried over, not rescanned"
    );
    // A new digest is held back while the scanner is down.
    let failure = resolve(&client, &gated("good", Some(Severity::Critical), &url))
        .await
        .expect_err("a scanner that is down holds new digests back");
    assert_eq!(failure.reason, FailureReason::ScannerUnavailable);
    assert!(
        failure.message.contains("held back") && failure.message.contains("unreachable"),
        "{}",
        failure.message
    );
    Ok(())
}
