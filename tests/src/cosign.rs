//! Cosign-format signatures for tests: P-256 keys and signatures made by
//! PyPI's `cryptography` (`cosign_sign.py`; no cosign binary installs here),
//! in cosign's own layout: simple-signing payloads, and a signature manifest
//! at tag `sha256-<hex>.sig` whose layers carry the base64 DER signature in
//! `dev.cosignproject.cosign/signature`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde_json::json;

use crate::images::{PushTarget, sha256_digest};

const SCRIPT: &str = include_str!("cosign_sign.py");
const INSTALL: &str = "bash scripts/install-deps.sh (or: python3 -m venv /opt/imgfleet-py && \
     /opt/imgfleet-py/bin/pip install cryptography)";

/// The layer media type and annotation cosign uses.
pub const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The signature annotation.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// A P-256 key pair in a temporary directory.
#[derive(Debug)]
pub struct KeyPair {
    dir: tempfile::TempDir,
    private: PathBuf,
    /// The public key, PEM (what a policy's `publicKey` holds).
    pub public_pem: String,
}

async fn python(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let out = tokio::process::Command::new(crate::otlp::VENV_PYTHON)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {} ({INSTALL})", crate::otlp::VENV_PYTHON))?;
    if !out.status.success() {
        bail!(
            "cosign_sign.py failed: {} (needs PyPI's cryptography: {INSTALL})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

impl KeyPair {
    /// A new key pair.
    pub async fn generate() -> Result<KeyPair> {
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("cosign_sign.py");
        std::fs::write(&script, SCRIPT)?;
        let private = dir.path().join("cosign.key");
        let public = python(&[script.as_os_str(), "keygen".as_ref(), private.as_os_str()]).await?;
        Ok(KeyPair {
            dir,
            private,
            public_pem: String::from_utf8(public)?,
        })
    }

    /// base64 of the DER ECDSA P-256/SHA-256 signature over `payload`.
    pub async fn sign(&self, payload: &[u8]) -> Result<String> {
        let file = self
            .dir
            .path()
            .join(format!("payload-{}", &sha256_digest(payload)[7..19]));
        std::fs::write(&file, payload)?;
        let script = self.dir.path().join("cosign_sign.py");
        let out = python(&[
            script.as_os_str(),
            "sign".as_ref(),
            self.private.as_os_str(),
            file.as_os_str(),
        ])
        .await?;
        Ok(String::from_utf8(out)?)
    }
}

/// Cosign's simple-signing payload for `reference` (e.g. `reg/demo/app`) at
/// `digest`.
pub fn payload(reference: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": null,
    }))
    .unwrap_or_default()
}

/// Pushes a signature manifest for `image_digest` at its cosign tag
/// (`sha256-<hex>.sig`), with one layer per (payload, signature); returns
/// the manifest digest.
pub async fn push_signature(
    target: &PushTarget,
    repo: &str,
    image_digest: &str,
    layers: &[(Vec<u8>, String)],
) -> Result<String> {
    let config = serde_json::to_vec(&json!({
        "architecture": "", "config": {}, "created": "0001-01-01T00:00:00Z",
        "os": "", "rootfs": {"type": "layers", "diff_ids": []},
    }))?;
    let config_digest = sha256_digest(&config);
    target
        .push_blob(
            repo,
            &config_digest,
            config.len() as u64,
            std::iter::once(Bytes::from(config.clone())),
        )
        .await?;
    let mut descs = Vec::new();
    for (payload, signature) in layers {
        let d = sha256_digest(payload);
        target
            .push_blob(
                repo,
                &d,
                payload.len() as u64,
                std::iter::once(Bytes::from(payload.clone())),
            )
            .await?;
        descs.push(json!({
            "mediaType": SIMPLESIGNING, "digest": d, "size": payload.len(),
            "annotations": {SIGNATURE_ANNOTATION: signature},
        }));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))?;
    let tag = format!("{}.sig", image_digest.replacen(':', "-", 1));
    target
        .push_manifest(
            repo,
            &tag,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        )
        .await
}
