//! Referrers of a manifest (signatures, SBOMs, attestations): the OCI 1.1
//! referrers API, with the tag-schema fallback (`sha256-<hex>`) for
//! registries that do not offer it, as the distribution spec tells clients
//! to do ("Unavailable Referrers API").

use std::collections::BTreeMap;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use super::{
    OCI_INDEX, RegistryClient, RegistryError, header_str, parse_next_link, sha256_hex, strip_params,
};

/// The most referrers one subject may list; more is treated as a malformed
/// answer rather than followed (a hostile registry could name millions).
pub const MAX_REFERRERS: usize = 1000;

/// One referrer as the registry lists it: an OCI descriptor with the
/// referrer's `artifactType` and annotations.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ReferrerDescriptor {
    /// The referrer manifest's media type.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<hex>` of the referrer manifest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// What kind of artifact it is (a signature, an SBOM, ...).
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    /// Its manifest's annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct ReferrersIndex {
    #[serde(default)]
    manifests: Vec<ReferrerDescriptor>,
}

/// The tag under which the tag schema keeps the referrers index of a digest:
/// `sha256-<hex>`.
pub fn referrers_tag(digest: &str) -> Option<String> {
    sha256_hex(digest).map(|hex| format!("sha256-{hex}"))
}

impl RegistryClient {
    /// The referrers of `digest` in `repository`: from the referrers API
    /// when the registry offers it, else from the tag-schema index
    /// (`sha256-<hex>`); none when neither exists. Descriptors whose digest
    /// is not `sha256:<hex>` are dropped (the store keeps sha256 only).
    pub async fn referrers(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<Vec<ReferrerDescriptor>, RegistryError> {
        self.check_names(repository, Some(digest))?;
        let Some(tag) = referrers_tag(digest) else {
            return Err(RegistryError::Malformed {
                registry: self.registry.clone(),
                message: format!(
                    "{repository}@{digest}: expected a digest of the form sha256:<64 hex>"
                ),
            });
        };
        let mut found = match self.referrers_api(repository, digest).await? {
            Some(list) => list,
            None => match self.get_manifest(repository, &tag).await {
                Ok(m) => {
                    self.parse_index(&m.bytes, &format!("referrers tag {repository}:{tag}"))?
                }
                Err(RegistryError::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(e),
            },
        };
        found.retain(|d| sha256_hex(&d.digest).is_some());
        let mut seen = std::collections::HashSet::new();
        found.retain(|d| seen.insert(d.digest.clone()));
        Ok(found)
    }

    /// `GET /v2/<name>/referrers/<digest>`, following `Link` pages; `None`
    /// when the registry does not offer the API (a 404, or an answer that is
    /// not an image index, as registries that predate it give).
    async fn referrers_api(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<Option<Vec<ReferrerDescriptor>>, RegistryError> {
        let what = format!("referrers of {repository}@{digest}");
        let mut url = format!("{}/v2/{repository}/referrers/{digest}", self.base_url);
        let mut out = Vec::new();
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(OCI_INDEX));
        for _ in 0..100 {
            let resp = self
                .send(Method::GET, &url, Some(repository), headers.clone(), &what)
                .await?;
            let status = resp.status();
            // 404 is the spec's "no referrers API"; older registries also
            // answer 400 or 405 to a path they do not route.
            if status == StatusCode::NOT_FOUND
                || status == StatusCode::BAD_REQUEST
                || status == StatusCode::METHOD_NOT_ALLOWED
            {
                return Ok(None);
            }
            let mut resp = self.check_status(resp, &what).await?;
            let content_type = header_str(resp.headers(), "content-type").map(strip_params);
            if content_type.as_deref() != Some(OCI_INDEX) {
                return Ok(None);
            }
            let next = header_str(resp.headers(), "link").and_then(parse_next_link);
            let body = self.read_manifest_body(&mut resp, what.clone()).await?;
            out.extend(self.parse_index(&body, &what)?);
            if out.len() > MAX_REFERRERS {
                return Err(self.malformed(format!("{what}: more than {MAX_REFERRERS} referrers")));
            }
            match next {
                Some(n) if n.starts_with("http://") || n.starts_with("https://") => url = n,
                Some(n) if n.starts_with('/') => url = format!("{}{n}", self.base_url),
                Some(n) => return Err(self.malformed(format!("{what}: unusable Link {n:?}"))),
                None => return Ok(Some(out)),
            }
        }
        Err(self.malformed(format!("{what}: more than 100 pages")))
    }

    fn parse_index(
        &self,
        bytes: &[u8],
        what: &str,
    ) -> Result<Vec<ReferrerDescriptor>, RegistryError> {
        let index: ReferrersIndex = serde_json::from_slice(bytes)
            .map_err(|e| self.malformed(format!("{what}: expected an image index: {e}")))?;
        if index.manifests.len() > MAX_REFERRERS {
            return Err(self.malformed(format!("{what}: more than {MAX_REFERRERS} referrers")));
        }
        Ok(index.manifests)
    }

    fn malformed(&self, message: String) -> RegistryError {
        RegistryError::Malformed {
            registry: self.registry.clone(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_fallback_tag() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            referrers_tag(&d).as_deref(),
            Some(format!("sha256-{}", "a".repeat(64)).as_str())
        );
        assert_eq!(referrers_tag("sha256:abc"), None);
        assert_eq!(referrers_tag("md5:abc"), None);
    }
}
