//! Referrers synced with their image and served by the mirror, against the
//! real docker-registry and skopeo.
//!
//! Debian's docker-registry (distribution 2.8) has no referrers API: it
//! answers 404, which the test checks, so the agent must find the
//! referrers through the tag schema (`sha256-<hex>`), as OCI 1.1 clients
//! keep it on such registries. The mirror then serves them through its own
//! referrers API, filtered by `artifactType`, under the image's repository
//! only.

mod common;

use common::*;
use imgfleet_tests::artifacts::{PushedArtifact, push_artifact, push_referrers_tag};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::registry::{Registry, RegistryOptions};
use imgfleet_tests::skopeo;
use serde_json::{Value, json};

const SBOM: &str = "application/spdx+json";
const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn get_json(url: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn digests(index: &Value) -> Vec<String> {
    let mut v: Vec<String> = index["manifests"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|d| d["digest"].as_str().unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn referrers_sync_by_the_tag_schema_and_the_mirror_serves_them_in_scope() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let target = PushTarget::from(&reg);
    let app = push(&reg, "demo/app", "v1", &ImageSpec::random(&[40_000], 31)).await;
    let other = push(&reg, "demo/other", "v1", &ImageSpec::random(&[30_000], 32)).await;
    let subject = (
        app.manifest_digest.as_str(),
        OCI_MANIFEST,
        app.manifest_bytes.len() as u64,
    );
    let sbom = push_artifact(
        &target,
        "demo/app",
        subject,
        SBOM,
        &[(SBOM, br#"{"spdxVersion":"SPDX-2.3"}"#.to_vec())],
        &json!({"org.opencontainers.image.created": "2026-12-06T00:00:00Z"}),
    )
    .await
    .unwrap();
    let sig = push_artifact(
        &target,
        "demo/app",
        subject,
        SIG,
        &[(SIG, b"signature bytes".to_vec())],
        &json!({}),
    )
    .await
    .unwrap();
    let listed = |a: &PushedArtifact| a.descriptor(&json!({}));
    push_referrers_tag(
        &target,
        "demo/app",
        &app.manifest_digest,
        &[listed(&sbom), listed(&sig)],
    )
    .await
    .unwrap();

    // The upstream has no referrers API: the agent must use the tag schema.
    let (status, _, _) = get_json(&format!(
        "{}/v2/demo/app/referrers/{}",
        reg.base_url(),
        app.manifest_digest
    ))
    .await;
    assert_eq!(status, 404, "docker-registry answered the referrers API");

    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let reports = engine
        .sync(
            vec![
                desired(&reg.addr(), "demo/app", &app.manifest_digest, &["v1"]),
                desired(&reg.addr(), "demo/other", &other.manifest_digest, &["v1"]),
            ],
            None,
        )
        .await;
    for r in &reports {
        assert!(r.result.is_ok(), "{:?}", r.result);
    }
    for blob in sbom.layer_digests.iter().chain(&sig.layer_digests) {
        assert!(engine.store().has_blob(blob), "referrer blob {blob} synced");
    }
    let mirror = start_mirror(engine.store().clone()).await;
    let base = format!("http://{}", mirror.addr);

    // Both referrers, described by their own manifests.
    let url = format!("{base}/v2/demo/app/referrers/{}", app.manifest_digest);
    let (status, headers, index) = get_json(&url).await;
    assert_eq!(status, 200, "{index}");
    assert_eq!(
        headers["content-type"],
        "application/vnd.oci.image.index.v1+json"
    );
    let mut want = vec![sbom.digest.clone(), sig.digest.clone()];
    want.sort();
    assert_eq!(digests(&index), want, "{index}");
    let sbom_entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["digest"] == sbom.digest.as_str())
        .unwrap();
    assert_eq!(sbom_entry["artifactType"], SBOM);
    assert_eq!(sbom_entry["size"], sbom.manifest.len());
    assert_eq!(
        sbom_entry["annotations"]["org.opencontainers.image.created"],
        "2026-12-06T00:00:00Z"
    );

    // Filtered by artifactType, saying so.
    let (status, headers, index) = get_json(&format!("{url}?artifactType={SIG}")).await;
    assert_eq!(status, 200);
    assert_eq!(digests(&index), vec![sig.digest.clone()]);
    assert_eq!(headers["oci-filters-applied"], "artifactType");

    // The signature reads through the mirror with skopeo, byte for byte.
    let raw = skopeo::inspect_raw(
        &format!("docker://{}/demo/app@{}", mirror.addr, sig.digest),
        &["--tls-verify=false"],
    )
    .await
    .unwrap();
    assert_eq!(raw, sig.manifest);

    // Scope: another repository does not reference the subject, so it has
    // no referrers and does not serve the referrer or its blobs.
    let (status, _, index) = get_json(&format!(
        "{base}/v2/demo/other/referrers/{}",
        app.manifest_digest
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(digests(&index), Vec::<String>::new());
    let r = reqwest::get(format!("{base}/v2/demo/other/manifests/{}", sig.digest))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = reqwest::get(format!(
        "{base}/v2/demo/other/blobs/{}",
        sig.layer_digests[0]
    ))
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // A bad digest is a 400; an unknown repository a 404.
    let (status, _, _) = get_json(&format!("{base}/v2/demo/app/referrers/sha256:xyz")).await;
    assert_eq!(status, 400);
    let (status, _, _) = get_json(&format!(
        "{base}/v2/demo/none/referrers/{}",
        app.manifest_digest
    ))
    .await;
    assert_eq!(status, 404);

    // GC keeps a referrer's blobs (which no image manifest names) while its
    // image is kept, and removes them with it.
    use imgfleet_agent::gc::{GcPolicy, Wanted, collect};
    let policy = GcPolicy {
        grace_period: std::time::Duration::ZERO,
        keep_versions: 1,
    };
    let id = |repo: &str, d: &str| Wanted::new((reg.addr(), repo.to_string(), d.to_string()));
    let both = [
        id("demo/app", &app.manifest_digest),
        id("demo/other", &other.manifest_digest),
    ];
    collect(engine.store(), &both, &[], &policy).unwrap();
    for blob in sbom.layer_digests.iter().chain(&sig.layer_digests) {
        assert!(
            engine.store().has_blob(blob),
            "GC kept referrer blob {blob}"
        );
    }
    let (status, _, index) = get_json(&url).await;
    assert_eq!((status, digests(&index)), (200, want.clone()));

    // The records read back from index.json keep the subject.
    let store = imgfleet_agent::store::Store::open_read_only(dir.path()).unwrap();
    let subjects: Vec<_> = store
        .records()
        .into_iter()
        .filter_map(|r| r.subject.map(|s| (r.digest, s)))
        .collect();
    assert_eq!(subjects.len(), 2, "{subjects:?}");
    assert!(subjects.iter().all(|(_, s)| *s == app.manifest_digest));

    drop(store);

    let only_other = [id("demo/other", &other.manifest_digest)];
    collect(engine.store(), &only_other, &[], &policy).unwrap();
    for blob in sbom.layer_digests.iter().chain(&sig.layer_digests) {
        assert!(
            !engine.store().has_blob(blob),
            "GC removed referrer blob {blob}"
        );
    }
    assert!(engine.store().records().iter().all(|r| r.subject.is_none()));
}
