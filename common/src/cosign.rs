//! Cosign signature verification, key-based, for the hub (when it resolves a
//! digest) and the agent (before an image becomes visible).
//!
//! The format is cosign's own:
//! - a signature manifest at tag `sha256-<hex>.sig` beside the image, or
//!   attached as an OCI 1.1 referrer of it;
//! - its layers of type `application/vnd.dev.cosign.simplesigning.v1+json`,
//!   each a payload whose `critical.image.docker-manifest-digest` names the
//!   image manifest it covers;
//! - the signature over the payload bytes in the layer annotation
//!   `dev.cosignproject.cosign/signature`: base64 of a DER ECDSA P-256
//!   signature with SHA-256.
//!
//! An image is accepted when one signature that verifies under one of the
//! policy's keys covers its manifest digest. [`verify`] is pure; [`fetch`]
//! reads the signatures from a registry.
//!
//! Keyless verification (Fulcio certificates, Rekor entries) is not here.
//! It fits as another [`Verifier`] variant: a layer already carries what it
//! would need (the certificate and bundle annotations ride beside the
//! signature), and [`verify`] asks each verifier in turn.

use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;

use crate::registry::{RegistryClient, RegistryError, sha256_digest, sha256_hex};

/// The media type of a cosign signature layer.
pub const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 DER signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The artifact type of a cosign signature attached as an OCI 1.1 referrer.
pub const SIG_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// The largest signature payload read (cosign's are a few hundred bytes).
pub const MAX_PAYLOAD_BYTES: u64 = 64 * 1024;
/// The most signature layers considered for one image.
pub const MAX_SIGNATURES: usize = 64;

/// The tag cosign keeps an image's signatures under: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> Option<String> {
    sha256_hex(digest).map(|hex| format!("sha256-{hex}.sig"))
}

/// One way to accept a signature. Only public keys today; keyless
/// (certificate identity and issuer) would be a second variant.
#[derive(Clone)]
pub enum Verifier {
    /// An ECDSA P-256 public key, by the name the policy gives it.
    Key {
        /// The key's name in the policy (`verify.keys[].name`).
        name: String,
        /// The key.
        key: VerifyingKey,
    },
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verifier::Key { name, .. } => write!(f, "Key({name})"),
        }
    }
}

impl Verifier {
    /// A key verifier from a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as
    /// `cosign generate-key-pair` writes `cosign.pub`.
    pub fn from_pem(name: &str, pem: &str) -> Result<Verifier, String> {
        let key = VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| {
            format!("expected a PEM ECDSA P-256 public key (-----BEGIN PUBLIC KEY-----): {e}")
        })?;
        Ok(Verifier::Key {
            name: name.to_string(),
            key,
        })
    }

    /// The name a status shows.
    pub fn name(&self) -> &str {
        match self {
            Verifier::Key { name, .. } => name,
        }
    }
}

/// One signature layer as read from a signature manifest: its payload
/// (already checked against the layer digest by [`fetch`]) and its
/// annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    /// The payload bytes the signature covers.
    pub payload: Vec<u8>,
    /// `dev.cosignproject.cosign/signature`, when present.
    pub signature: Option<String>,
}

/// Why an image was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No signature layer was found.
    #[error("no cosign signature found (tag {tag} or an attached referrer)")]
    Unsigned {
        /// The tag looked at.
        tag: String,
    },
    /// Signatures were found, but none verifies under a key and covers the
    /// image; one reason per key.
    #[error("{}", .reasons.join("; "))]
    NoValidSignature {
        /// `key <name>: <why>` for each key.
        reasons: Vec<String>,
    },
}

/// What verified an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The name of the key whose signature covers the image.
    pub key: String,
}

#[derive(serde::Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(serde::Deserialize)]
struct Critical {
    image: PayloadImage,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(serde::Deserialize)]
struct PayloadImage {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

/// Why one layer does not count under one verifier, the most telling
/// first: the one reported for a key is the least of its layers'.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Miss {
    /// The signature verifies but covers another image.
    OtherDigest(String),
    /// The payload is not a cosign simple-signing payload.
    BadPayload(String),
    /// The signature does not verify under this key.
    BadSignature,
    /// The layer has no signature annotation, or not base64 DER.
    NoSignature(String),
}

impl Miss {
    fn describe(&self, digest: &str) -> String {
        match self {
            Miss::OtherDigest(other) => {
                format!("the signature verifies but covers {other}, not {digest}")
            }
            Miss::BadPayload(why) => format!("the signed payload is not a cosign payload: {why}"),
            Miss::BadSignature => "the signature does not verify (a payload changed after signing, or another key signed it)".to_string(),
            Miss::NoSignature(why) => format!("a signature layer has no usable signature: {why}"),
        }
    }
}

/// Decides whether `layers` hold a signature over `digest` under one of
/// `verifiers`. Pure.
pub fn verify(
    verifiers: &[Verifier],
    digest: &str,
    layers: &[SignatureLayer],
) -> Result<Accepted, Rejection> {
    if layers.is_empty() {
        return Err(Rejection::Unsigned {
            tag: signature_tag(digest).unwrap_or_else(|| digest.to_string()),
        });
    }
    let mut reasons = Vec::new();
    for v in verifiers {
        let mut best: Option<Miss> = None;
        for layer in layers {
            match check_layer(v, digest, layer) {
                Ok(()) => {
                    return Ok(Accepted {
                        key: v.name().to_string(),
                    });
                }
                Err(miss) => {
                    if best.as_ref().is_none_or(|b| miss < *b) {
                        best = Some(miss);
                    }
                }
            }
        }
        if let Some(miss) = best {
            reasons.push(format!("key {}: {}", v.name(), miss.describe(digest)));
        }
    }
    Err(Rejection::NoValidSignature { reasons })
}

fn check_layer(v: &Verifier, digest: &str, layer: &SignatureLayer) -> Result<(), Miss> {
    use base64::Engine as _;
    let Verifier::Key { key, .. } = v;
    let b64 = layer
        .signature
        .as_deref()
        .ok_or_else(|| Miss::NoSignature(format!("no {SIGNATURE_ANNOTATION} annotation")))?;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| Miss::NoSignature(format!("not base64: {e}")))?;
    let sig = Signature::from_der(&der)
        .map_err(|e| Miss::NoSignature(format!("not a DER ECDSA signature: {e}")))?;
    key.verify(&layer.payload, &sig)
        .map_err(|_| Miss::BadSignature)?;
    let payload: Payload =
        serde_json::from_slice(&layer.payload).map_err(|e| Miss::BadPayload(e.to_string()))?;
    if payload.critical.kind != "cosign container image signature" {
        return Err(Miss::BadPayload(format!(
            "critical.type is {:?}",
            payload.critical.kind
        )));
    }
    if payload.critical.image.digest != digest {
        return Err(Miss::OtherDigest(payload.critical.image.digest));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct SigManifest {
    #[serde(default)]
    layers: Vec<SigLayerDesc>,
}

#[derive(serde::Deserialize)]
struct SigLayerDesc {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// Reads the cosign signatures of `repository@digest`: the signature
/// manifest at `sha256-<hex>.sig`, and every referrer of the image with the
/// cosign signature artifact type. Each payload is fetched (at most
/// [`MAX_PAYLOAD_BYTES`]) and checked against its layer digest. A missing
/// tag is no signatures, not an error.
pub async fn fetch(
    client: &RegistryClient,
    repository: &str,
    digest: &str,
) -> Result<Vec<SignatureLayer>, RegistryError> {
    let malformed = |message: String| RegistryError::Malformed {
        registry: client.registry().to_string(),
        message,
    };
    let tag = signature_tag(digest)
        .ok_or_else(|| malformed(format!("{repository}@{digest}: expected a sha256 digest")))?;
    let mut manifests = Vec::new();
    match client.get_manifest(repository, &tag).await {
        Ok(m) => manifests.push(m),
        Err(RegistryError::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    for r in client.referrers(repository, digest).await? {
        if r.artifact_type.as_deref() == Some(SIG_ARTIFACT_TYPE) {
            manifests.push(client.get_manifest(repository, &r.digest).await?);
        }
    }
    let mut layers = Vec::new();
    for m in manifests {
        let parsed: SigManifest = serde_json::from_slice(&m.bytes)
            .map_err(|e| malformed(format!("signature manifest {repository}@{}: {e}", m.digest)))?;
        for l in parsed
            .layers
            .into_iter()
            .filter(|l| l.media_type == SIMPLESIGNING)
        {
            if layers.len() >= MAX_SIGNATURES {
                break;
            }
            if l.size > MAX_PAYLOAD_BYTES {
                return Err(RegistryError::TooLarge {
                    what: format!("signature payload {repository}@{}", l.digest),
                    size: l.size,
                    limit: MAX_PAYLOAD_BYTES,
                });
            }
            let payload = read_small_blob(client, repository, &l.digest, l.size).await?;
            layers.push(SignatureLayer {
                payload,
                signature: l.annotations.get(SIGNATURE_ANNOTATION).cloned(),
            });
        }
    }
    Ok(layers)
}

/// A small blob in full, checked against its digest and size.
async fn read_small_blob(
    client: &RegistryClient,
    repository: &str,
    digest: &str,
    size: u64,
) -> Result<Vec<u8>, RegistryError> {
    let mut stream = client.get_blob(repository, digest, 0).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.chunk().await? {
        if out.len() as u64 + chunk.len() as u64 > size.min(MAX_PAYLOAD_BYTES) {
            return Err(RegistryError::TooLarge {
                what: format!("signature payload {repository}@{digest}"),
                size: out.len() as u64 + chunk.len() as u64,
                limit: size.min(MAX_PAYLOAD_BYTES),
            });
        }
        out.extend_from_slice(&chunk);
    }
    let actual = sha256_digest(&out);
    if actual != digest {
        return Err(RegistryError::DigestMismatch {
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(out)
}
