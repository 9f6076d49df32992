//! Signed images only, end to end (real registry, hub, 3 agents): with a
//! Repository `verify` policy, a validly signed image syncs to every
//! cluster, while an unsigned one and one whose signed payload was tampered
//! with never reach any mirror, and their status says `VerificationFailed`
//! with the reason. Signatures follow cosign's layout and are made with
//! PyPI's `cryptography` (see `imgfleet_tests::cosign`); no cosign binary
//! installs here.

use std::time::Duration;

use anyhow::Result;
use imgfleet_tests::cosign::{KeyPair, payload, push_signature};
use imgfleet_tests::fleet::{HubOptions, HubProcess};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::{Registry, RegistryOptions, policy, wait_until};

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_and_tampered_images_never_reach_a_mirror() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let registry = Registry::start(RegistryOptions::plain()).await?;
    let target = PushTarget::from(&registry);
    let release = KeyPair::generate().await?;
    let reference = |repo: &str| format!("{}/{repo}", registry.addr());

    let signed = target
        .push_image("demo/signed", "v1", &ImageSpec::random(&[50_000], 71))
        .await?;
    let p = payload(&reference("demo/signed"), &signed.manifest_digest);
    let sig = release.sign(&p).await?;
    push_signature(&target, "demo/signed", &signed.manifest_digest, &[(p, sig)]).await?;
    let unsigned = target
        .push_image("demo/unsigned", "v1", &ImageSpec::random(&[50_000], 72))
        .await?;
    let tampered = target
        .push_image("demo/tampered", "v1", &ImageSpec::random(&[50_000], 73))
        .await?;
    let p = payload(&reference("demo/tampered"), &tampered.manifest_digest);
    let sig = release.sign(&p).await?;
    let changed = String::from_utf8(p)?.replace(
        "cosign container image signature",
        "cosign container image signature ",
    );
    push_signature(
        &target,
        "demo/tampered",
        &tampered.manifest_digest,
        &[(changed.into_bytes(), sig)],
    )
    .await?;

    let hub = HubProcess::start(HubOptions::embedded(root.join("hub"))).await?;
    let cli = hub.cli();
    let key_lines: String = release
        .public_pem
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    let verify = format!(
        "  verify:\n    keys:\n    - name: release\n      publicKey: |\n{key_lines}    mode: enforce\n"
    );
    let mut docs = vec![policy::registry_secret("lab", &registry.addr(), None)];
    for name in ["signed", "unsigned", "tampered"] {
        docs.push(policy::repository(
            name,
            &format!("demo/{name}"),
            "v1",
            "lab",
            &verify,
        ));
    }
    cli.apply_yaml(&policy::objects(&docs)).await?;
    let mut agents = Vec::new();
    for name in ["edge-1", "edge-2", "edge-3"] {
        agents.push(hub.start_agent(name, &["default"], root).await?);
    }

    wait_until(
        "the signed image synced on all 3 clusters",
        CONVERGE,
        || async {
            let table = cli.ok(&["get", "repositories"]).await?;
            Ok(table
                .lines()
                .any(|l| l.split_whitespace().any(|w| w == "signed") && l.contains(" 3/3 ")))
        },
    )
    .await?;
    for (name, why) in [
        ("unsigned", "no cosign signature"),
        ("tampered", "key release: the signature does not verify"),
    ] {
        wait_until(
            &format!("describe {name} saying VerificationFailed"),
            CONVERGE,
            || async {
                let text = cli.ok(&["describe", "repository", name]).await?;
                Ok(text.contains("VerificationFailed") && text.contains(why))
            },
        )
        .await?;
    }
    let signed_text = cli.ok(&["describe", "repository", "signed"]).await?;
    assert!(
        signed_text.contains("SIGNATURE") && signed_text.contains("verified (key release)"),
        "describe shows the signature check: {signed_text}"
    );
    let unsigned_text = cli.ok(&["describe", "repository", "unsigned"]).await?;
    assert!(
        unsigned_text.contains(&unsigned.manifest_digest),
        "the failure names the digest: {unsigned_text}"
    );
    for agent in &agents {
        assert_eq!(agent.manifest_status("demo/signed", "v1").await?, 200);
        assert_eq!(agent.manifest_status("demo/unsigned", "v1").await?, 404);
        assert_eq!(agent.manifest_status("demo/tampered", "v1").await?, 404);
        for digest in [&unsigned.manifest_digest, &tampered.manifest_digest] {
            let repo = if digest == &unsigned.manifest_digest {
                "demo/unsigned"
            } else {
                "demo/tampered"
            };
            assert_eq!(agent.manifest_status(repo, digest).await?, 404);
        }
    }
    Ok(())
}
