//! Cosign verification against the real docker-registry, with signatures
//! made in cosign's layout by PyPI's `cryptography` (see
//! `imgfleet_tests::cosign`): a signed image is accepted, and an unsigned
//! one, a tampered payload, a wrong key and a signature over another digest
//! are each rejected naming the key and the reason. A signature attached as
//! an OCI 1.1 referrer (through the tag schema, which distribution 2.8
//! needs) counts too.

use imgfleet_common::cosign::{self, Rejection, SIG_ARTIFACT_TYPE, Verifier};
use imgfleet_common::registry::{RegistryClient, RegistryConfig};
use imgfleet_tests::artifacts::{push_artifact, push_referrers_tag};
use imgfleet_tests::cosign::{KeyPair, SIMPLESIGNING, payload, push_signature};
use imgfleet_tests::images::{ImageSpec, PushTarget, push_image};
use imgfleet_tests::registry::{Registry, RegistryOptions};
use serde_json::json;

fn client(host: &str) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        host: host.to_string(),
        insecure: true,
        ..RegistryConfig::default()
    })
    .unwrap()
}

async fn check(
    client: &RegistryClient,
    repo: &str,
    digest: &str,
    keys: &[Verifier],
) -> Result<String, Rejection> {
    let layers = cosign::fetch(client, repo, digest).await.unwrap();
    cosign::verify(keys, digest, &layers).map(|a| a.key)
}

#[tokio::test]
async fn signed_images_pass_and_every_bad_signature_is_named() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let target = PushTarget::from(&reg);
    let release = KeyPair::generate().await.unwrap();
    let other = KeyPair::generate().await.unwrap();
    let keys = [Verifier::from_pem("release", &release.public_pem).unwrap()];
    let c = client(&reg.addr());
    let image = |seed| ImageSpec::random(&[10_000], seed);
    let reference = |repo: &str| format!("{}/{repo}", reg.addr());

    // Signed by the release key: accepted, naming it.
    let signed = push_image(&reg, "demo/signed", "v1", &image(41))
        .await
        .unwrap();
    let p = payload(&reference("demo/signed"), &signed.manifest_digest);
    let sig = release.sign(&p).await.unwrap();
    push_signature(&target, "demo/signed", &signed.manifest_digest, &[(p, sig)])
        .await
        .unwrap();
    assert_eq!(
        check(&c, "demo/signed", &signed.manifest_digest, &keys).await,
        Ok("release".to_string())
    );

    // Unsigned: no signature found, naming the tag looked at.
    let unsigned = push_image(&reg, "demo/unsigned", "v1", &image(42))
        .await
        .unwrap();
    let err = check(&c, "demo/unsigned", &unsigned.manifest_digest, &keys)
        .await
        .unwrap_err();
    assert!(matches!(err, Rejection::Unsigned { .. }), "{err:?}");
    assert!(err.to_string().contains(".sig"), "{err}");

    // Tampered: the payload changed after signing (the registry holds the
    // changed bytes under their own digest, as an attacker would push them).
    let tampered = push_image(&reg, "demo/tampered", "v1", &image(43))
        .await
        .unwrap();
    let p = payload(&reference("demo/tampered"), &tampered.manifest_digest);
    let sig = release.sign(&p).await.unwrap();
    let mut changed = p.clone();
    changed.extend_from_slice(b" ");
    push_signature(
        &target,
        "demo/tampered",
        &tampered.manifest_digest,
        &[(changed, sig)],
    )
    .await
    .unwrap();
    let err = check(&c, "demo/tampered", &tampered.manifest_digest, &keys)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key release") && err.contains("does not verify"),
        "{err}"
    );

    // Signed by another key.
    let wrong = push_image(&reg, "demo/wrongkey", "v1", &image(44))
        .await
        .unwrap();
    let p = payload(&reference("demo/wrongkey"), &wrong.manifest_digest);
    let sig = other.sign(&p).await.unwrap();
    push_signature(
        &target,
        "demo/wrongkey",
        &wrong.manifest_digest,
        &[(p, sig)],
    )
    .await
    .unwrap();
    let err = check(&c, "demo/wrongkey", &wrong.manifest_digest, &keys)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key release") && err.contains("does not verify"),
        "{err}"
    );
    // ... which a policy holding that key accepts.
    let both = [
        keys[0].clone(),
        Verifier::from_pem("partner", &other.public_pem).unwrap(),
    ];
    assert_eq!(
        check(&c, "demo/wrongkey", &wrong.manifest_digest, &both).await,
        Ok("partner".to_string())
    );

    // A valid signature over another digest, copied beside this image.
    let copied = push_image(&reg, "demo/copied", "v1", &image(45))
        .await
        .unwrap();
    let p = payload(&reference("demo/signed"), &signed.manifest_digest);
    let sig = release.sign(&p).await.unwrap();
    push_signature(&target, "demo/copied", &copied.manifest_digest, &[(p, sig)])
        .await
        .unwrap();
    let err = check(&c, "demo/copied", &copied.manifest_digest, &keys)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key release") && err.contains(&signed.manifest_digest),
        "{err}"
    );

    // A signature attached as an OCI 1.1 referrer, found through the tag
    // schema index.
    let attached = push_image(&reg, "demo/attached", "v1", &image(46))
        .await
        .unwrap();
    let p = payload(&reference("demo/attached"), &attached.manifest_digest);
    let sig = release.sign(&p).await.unwrap();
    let pushed = push_artifact(
        &target,
        "demo/attached",
        (
            &attached.manifest_digest,
            "application/vnd.oci.image.manifest.v1+json",
            attached.manifest_bytes.len() as u64,
        ),
        SIG_ARTIFACT_TYPE,
        &[(SIMPLESIGNING, p)],
        &json!({}),
    )
    .await
    .unwrap();
    // push_artifact leaves layers unannotated; a referrer signature carries
    // the annotation on its layer, so push that manifest by hand instead.
    let mut m: serde_json::Value = serde_json::from_slice(&pushed.manifest).unwrap();
    m["layers"][0]["annotations"] = json!({cosign::SIGNATURE_ANNOTATION: sig});
    let bytes = serde_json::to_vec(&m).unwrap();
    let digest = imgfleet_tests::images::sha256_digest(&bytes);
    target
        .push_manifest(
            "demo/attached",
            &digest,
            "application/vnd.oci.image.manifest.v1+json",
            &bytes,
        )
        .await
        .unwrap();
    push_referrers_tag(
        &target,
        "demo/attached",
        &attached.manifest_digest,
        &[json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": bytes.len(), "artifactType": SIG_ARTIFACT_TYPE,
        })],
    )
    .await
    .unwrap();
    assert_eq!(
        check(&c, "demo/attached", &attached.manifest_digest, &keys).await,
        Ok("release".to_string())
    );
}

#[test]
fn a_public_key_that_is_not_p256_pem_is_refused_clearly() {
    let err = Verifier::from_pem("release", "not a key").unwrap_err();
    assert!(err.contains("PEM ECDSA P-256 public key"), "{err}");
}
