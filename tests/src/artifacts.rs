//! OCI 1.1 artifacts that refer to an image (signatures, SBOMs, attestations):
//! pushed with a `subject`, and listed in the tag-schema index
//! (`sha256-<hex>`) that clients keep for registries without the referrers
//! API, such as Debian's docker-registry (distribution 2.8).

use anyhow::Result;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::images::{PushTarget, sha256_digest};

/// The OCI empty descriptor's media type and content (`{}`).
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An artifact as pushed.
#[derive(Debug, Clone)]
pub struct PushedArtifact {
    /// `sha256:` of its manifest.
    pub digest: String,
    /// The manifest bytes.
    pub manifest: Vec<u8>,
    /// Its artifact type.
    pub artifact_type: String,
    /// Its layer digests.
    pub layer_digests: Vec<String>,
}

impl PushedArtifact {
    /// Its descriptor as a referrers index lists it.
    pub fn descriptor(&self, annotations: &Value) -> Value {
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.digest,
            "size": self.manifest.len(),
            "artifactType": self.artifact_type,
            "annotations": annotations,
        })
    }
}

/// Pushes an artifact manifest (by digest, untagged) into `repo`, naming
/// `subject` (digest, media type, size) and holding `layers` (media type,
/// bytes), with an empty config and `annotations`.
pub async fn push_artifact(
    target: &PushTarget,
    repo: &str,
    subject: (&str, &str, u64),
    artifact_type: &str,
    layers: &[(&str, Vec<u8>)],
    annotations: &Value,
) -> Result<PushedArtifact> {
    let empty = b"{}".to_vec();
    let empty_digest = sha256_digest(&empty);
    target
        .push_blob(repo, &empty_digest, 2, std::iter::once(Bytes::from(empty)))
        .await?;
    let mut descs = Vec::new();
    let mut layer_digests = Vec::new();
    for (media_type, bytes) in layers {
        let d = sha256_digest(bytes);
        target
            .push_blob(
                repo,
                &d,
                bytes.len() as u64,
                std::iter::once(Bytes::from(bytes.clone())),
            )
            .await?;
        descs.push(json!({"mediaType": media_type, "digest": d, "size": bytes.len()}));
        layer_digests.push(d);
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": empty_digest, "size": 2},
        "layers": descs,
        "subject": {"mediaType": subject.1, "digest": subject.0, "size": subject.2},
        "annotations": annotations,
    }))?;
    let digest = sha256_digest(&manifest);
    target
        .push_manifest(repo, &digest, OCI_MANIFEST, &manifest)
        .await?;
    Ok(PushedArtifact {
        digest,
        manifest,
        artifact_type: artifact_type.to_string(),
        layer_digests,
    })
}

/// Pushes the tag-schema referrers index of `subject` (tag `sha256-<hex>`)
/// listing `descriptors`, as an OCI 1.1 client does on a registry without
/// the referrers API.
pub async fn push_referrers_tag(
    target: &PushTarget,
    repo: &str,
    subject: &str,
    descriptors: &[Value],
) -> Result<String> {
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": descriptors,
    }))?;
    let tag = subject.replacen(':', "-", 1);
    target.push_manifest(repo, &tag, OCI_INDEX, &index).await
}
