//! The agent's own signature check, against the real docker-registry, with
//! cosign-format signatures made by PyPI's `cryptography` (see
//! `imgfleet_tests::cosign`): an image whose Repository names keys is
//! recorded, and so served, only with a valid signature under one of them.

mod common;

use common::*;
use imgfleet_agent::transfer::TransferError;
use imgfleet_common::cosign;
use imgfleet_common::registry::{RegistryClient, RegistryConfig};
use imgfleet_tests::cosign::{KeyPair, payload, push_signature};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::registry::{Registry, RegistryOptions};

#[tokio::test]
async fn only_validly_signed_images_become_visible() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let target = PushTarget::from(&reg);
    let release = KeyPair::generate().await.unwrap();
    let signed = push(&reg, "demo/signed", "v1", &ImageSpec::random(&[20_000], 61)).await;
    let p = payload(
        &format!("{}/demo/signed", reg.addr()),
        &signed.manifest_digest,
    );
    let sig = release.sign(&p).await.unwrap();
    push_signature(&target, "demo/signed", &signed.manifest_digest, &[(p, sig)])
        .await
        .unwrap();
    let unsigned = push(
        &reg,
        "demo/unsigned",
        "v1",
        &ImageSpec::random(&[20_000], 62),
    )
    .await;
    let tampered = push(
        &reg,
        "demo/tampered",
        "v1",
        &ImageSpec::random(&[20_000], 63),
    )
    .await;
    let p = payload(
        &format!("{}/demo/tampered", reg.addr()),
        &tampered.manifest_digest,
    );
    let sig = release.sign(&p).await.unwrap();
    let mut changed = p.clone();
    changed.push(b'\n');
    push_signature(
        &target,
        "demo/tampered",
        &tampered.manifest_digest,
        &[(changed, sig)],
    )
    .await
    .unwrap();

    let keyed = |repo: &str, digest: &str| {
        let mut pull = desired(&reg.addr(), repo, digest, &["v1"]);
        pull.image.verify_keys = vec![("release".into(), release.public_pem.clone())];
        pull
    };
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let reports = engine
        .sync(
            vec![
                keyed("demo/signed", &signed.manifest_digest),
                keyed("demo/unsigned", &unsigned.manifest_digest),
                keyed("demo/tampered", &tampered.manifest_digest),
            ],
            None,
        )
        .await;
    let result = |repo: &str| {
        &reports
            .iter()
            .find(|r| r.image.repository == repo)
            .unwrap()
            .result
    };
    assert!(result("demo/signed").is_ok(), "{:?}", result("demo/signed"));
    for (repo, why) in [
        ("demo/unsigned", "no cosign signature"),
        (
            "demo/tampered",
            "key release: the signature does not verify",
        ),
    ] {
        match result(repo) {
            Err(e @ TransferError::VerificationFailed { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("VerificationFailed") && text.contains(why),
                    "{repo}: {text}"
                );
            }
            other => panic!("{repo}: expected VerificationFailed, got {other:?}"),
        }
    }

    // The check comes before the layers: a rejected image cost no layer.
    for layer in unsigned.layer_digests.iter().chain(&tampered.layer_digests) {
        assert!(!engine.store().has_blob(layer), "layer {layer} fetched");
    }

    // Only the signed image is recorded, so only it is served.
    let mirror = start_mirror(engine.store().clone()).await;
    for (repo, status) in [
        ("demo/signed", 200),
        ("demo/unsigned", 404),
        ("demo/tampered", 404),
    ] {
        let r = reqwest::get(format!("http://{}/v2/{repo}/manifests/v1", mirror.addr))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{repo}");
    }

    // The signature itself is served where cosign looks for it (its
    // `sha256-<hex>.sig` tag), byte for byte, so a node can verify against
    // the mirror alone.
    let sig_tag = cosign::signature_tag(&signed.manifest_digest).unwrap();
    let upstream = target_client(&reg.addr());
    let at_mirror = target_client(&mirror.addr.to_string());
    let want = upstream
        .get_manifest("demo/signed", &sig_tag)
        .await
        .unwrap();
    let got = at_mirror
        .get_manifest("demo/signed", &sig_tag)
        .await
        .unwrap();
    assert_eq!(got.digest, want.digest);
    assert_eq!(got.bytes, want.bytes);
    let layers = cosign::fetch(&at_mirror, "demo/signed", &signed.manifest_digest)
        .await
        .unwrap();
    let keys = [cosign::Verifier::from_pem("release", &release.public_pem).unwrap()];
    let accepted = cosign::verify(&keys, &signed.manifest_digest, &layers).unwrap();
    assert_eq!(accepted.key, "release");
    // Not under a repository whose content does not reference it.
    assert!(
        at_mirror
            .get_manifest("demo/unsigned", &sig_tag)
            .await
            .is_err()
    );
}

fn target_client(host: &str) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        host: host.to_owned(),
        insecure: true,
        ..Default::default()
    })
    .unwrap()
}
