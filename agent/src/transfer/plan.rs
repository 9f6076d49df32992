//! Pure planning over manifests: which child manifests of an index match the
//! requested platforms, and which blobs an image manifest needs. No I/O.

use imgfleet_common::registry::{
    DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, sha256_hex,
};
use serde::Deserialize;

/// What kind of manifest a document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// An OCI index or Docker manifest list.
    Index,
    /// An OCI or Docker schema-2 image manifest.
    Image,
}

/// A blob an image needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes, from the manifest.
    pub size: u64,
}

/// A child manifest of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRef {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Media type named by the index.
    pub media_type: String,
    /// Size from the index.
    pub size: u64,
    /// `os/arch[/variant]`, when the index says.
    pub platform: Option<String>,
}

/// Why a manifest could not be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// A media type we do not handle (e.g. Docker schema 1).
    #[error("unsupported manifest media type {0:?}")]
    Unsupported(String),
    /// Not valid JSON of the expected shape.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// No child of the index matches the requested platforms.
    #[error("no manifest for platforms {wanted:?} in the index (it has {available:?})")]
    NoMatchingPlatform {
        /// What was asked for.
        wanted: Vec<String>,
        /// What the index offers.
        available: Vec<String>,
    },
}

/// Classifies a media type.
pub fn kind_of(media_type: &str) -> Result<ManifestKind, PlanError> {
    match media_type {
        OCI_INDEX | DOCKER_LIST => Ok(ManifestKind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(ManifestKind::Image),
        other => Err(PlanError::Unsupported(other.to_string())),
    }
}

#[derive(Deserialize)]
struct Doc {
    #[serde(default)]
    manifests: Vec<DescDoc>,
    config: Option<DescDoc>,
    #[serde(default)]
    layers: Vec<DescDoc>,
}

#[derive(Deserialize)]
struct DescDoc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    platform: Option<PlatformDoc>,
    #[serde(default)]
    urls: Vec<String>,
}

#[derive(Deserialize)]
struct PlatformDoc {
    os: String,
    architecture: String,
    variant: Option<String>,
}

fn check_digest(d: &str) -> Result<(), PlanError> {
    sha256_hex(d)
        .map(|_| ())
        .ok_or_else(|| PlanError::Malformed(format!("digest {d:?}: expected sha256:<64 hex>")))
}

/// The children of an index that match `platforms` (all when empty).
pub fn select_children(bytes: &[u8], platforms: &[String]) -> Result<Vec<ChildRef>, PlanError> {
    let doc: Doc =
        serde_json::from_slice(bytes).map_err(|e| PlanError::Malformed(e.to_string()))?;
    let mut all = Vec::new();
    for m in doc.manifests {
        check_digest(&m.digest)?;
        let platform = m
            .platform
            .map(|p| match p.variant.filter(|v| !v.is_empty()) {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            });
        all.push(ChildRef {
            digest: m.digest,
            media_type: m.media_type,
            size: m.size,
            platform,
        });
    }
    if platforms.is_empty() {
        return Ok(all);
    }
    let chosen: Vec<ChildRef> = all
        .iter()
        .filter(|c| {
            c.platform
                .as_deref()
                .is_some_and(|p| platforms.iter().any(|w| platform_matches(w, p)))
        })
        .cloned()
        .collect();
    if chosen.is_empty() {
        return Err(PlanError::NoMatchingPlatform {
            wanted: platforms.to_vec(),
            available: all.into_iter().filter_map(|c| c.platform).collect(),
        });
    }
    Ok(chosen)
}

/// Whether a wanted `os/arch[/variant]` matches an index entry's platform. A
/// wanted platform without a variant matches every variant; `arm64` and
/// `arm64/v8` are the same thing.
pub fn platform_matches(wanted: &str, have: &str) -> bool {
    let norm = |s: &str| {
        let mut parts: Vec<String> = s.split('/').map(str::to_ascii_lowercase).collect();
        if parts.len() == 3 && parts[1] == "arm64" && parts[2] == "v8" {
            parts.truncate(2);
        }
        parts
    };
    let w = norm(wanted);
    let h = norm(have);
    if w.len() < 2 || h.len() < 2 {
        return false;
    }
    w[0] == h[0] && w[1] == h[1] && (w.len() == 2 || h.get(2) == w.get(2))
}

/// The blobs (config first, then layers) an image manifest needs. Foreign
/// layers, which live outside the registry (`urls`), are left out.
pub fn image_blobs(bytes: &[u8]) -> Result<Vec<BlobRef>, PlanError> {
    let doc: Doc =
        serde_json::from_slice(bytes).map_err(|e| PlanError::Malformed(e.to_string()))?;
    let config = doc
        .config
        .ok_or_else(|| PlanError::Malformed("image manifest without config".into()))?;
    let mut out = Vec::new();
    for d in std::iter::once(config).chain(doc.layers) {
        check_digest(&d.digest)?;
        if !d.urls.is_empty() && d.media_type.contains("foreign") {
            continue;
        }
        if !out.iter().any(|b: &BlobRef| b.digest == d.digest) {
            out.push(BlobRef {
                digest: d.digest,
                size: d.size,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn platforms() {
        let check =
            |w: &str, h: &str, want: bool| assert_eq!(platform_matches(w, h), want, "{w} vs {h}");
        check("linux/amd64", "linux/amd64", true);
        check("linux/arm64", "linux/arm64/v8", true);
        check("linux/arm64/v8", "linux/arm64", true);
        check("linux/arm/v7", "linux/arm/v6", false);
        check("linux/arm", "linux/arm/v6", true);
        check("linux/amd64", "windows/amd64", false);
        check("linux", "linux/amd64", false);
    }

    #[test]
    fn selects_children() {
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d('a'), "size": 10, "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": OCI_MANIFEST, "digest": d('b'), "size": 11, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": d('c'), "size": 12}
            ]
        });
        let bytes = serde_json::to_vec(&index).unwrap();
        assert_eq!(select_children(&bytes, &[]).unwrap().len(), 3);
        let arm = select_children(&bytes, &["linux/arm64".into()]).unwrap();
        assert_eq!(arm.len(), 1);
        assert_eq!(arm[0].digest, d('b'));
        assert!(matches!(
            select_children(&bytes, &["linux/s390x".into()]),
            Err(PlanError::NoMatchingPlatform { .. })
        ));
    }

    #[test]
    fn lists_blobs_and_rejects_bad_digests() {
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d('1'), "size": 5},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('2'), "size": 7},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('2'), "size": 7},
                {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": d('3'), "size": 9, "urls": ["https://x"]}
            ]
        });
        let blobs = image_blobs(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(
            blobs,
            vec![
                BlobRef {
                    digest: d('1'),
                    size: 5
                },
                BlobRef {
                    digest: d('2'),
                    size: 7
                }
            ]
        );
        let bad =
            serde_json::json!({"config": {"digest": "sha256:../../x", "size": 1}, "layers": []});
        assert!(matches!(
            image_blobs(&serde_json::to_vec(&bad).unwrap()),
            Err(PlanError::Malformed(_))
        ));
        assert!(matches!(
            kind_of("application/vnd.docker.distribution.manifest.v1+prettyjws"),
            Err(PlanError::Unsupported(_))
        ));
    }
}
