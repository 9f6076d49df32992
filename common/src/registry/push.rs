//! Push support for [`RegistryClient`]: blob existence checks, cross-repository
//! mounts, uploads and manifest puts, for the agent's edge-registry target.

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use super::{RegistryClient, RegistryError, header_str, sha256_hex};

/// How an upload began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadStart {
    /// The registry mounted the blob from the other repository (201): done.
    Mounted,
    /// An upload session to send the blob to (202); the absolute URL.
    Session(String),
}

impl RegistryClient {
    fn push_scope(repository: &str, from: Option<&str>) -> String {
        match from {
            Some(f) => format!("repository:{repository}:pull,push repository:{f}:pull"),
            None => format!("repository:{repository}:pull,push"),
        }
    }

    /// Sends a request that needs push access to `repository`, answering
    /// a challenge.
    async fn send_push(
        &self,
        method: Method,
        url: &str,
        repository: &str,
        headers: HeaderMap,
        body: Option<&(dyn Fn() -> reqwest::Body + Send + Sync)>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let scope = Self::push_scope(repository, None);
        self.send_scoped(method, url, scope, headers, body, what)
            .await
    }

    fn check_digest(&self, what: &str, digest: &str) -> Result<(), RegistryError> {
        if sha256_hex(digest).is_none() {
            return Err(RegistryError::Malformed {
                registry: self.registry.clone(),
                message: format!("{what}: expected a digest of the form sha256:<64 hex>"),
            });
        }
        Ok(())
    }

    /// `HEAD` of a blob in a repository: whether the registry has it there.
    pub async fn has_blob(&self, repository: &str, digest: &str) -> Result<bool, RegistryError> {
        self.check_names(repository, None)?;
        let what = format!("blob {repository}@{digest}");
        self.check_digest(&what, digest)?;
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base_url);
        let resp = self
            .send_push(
                Method::HEAD,
                &url,
                repository,
                HeaderMap::new(),
                None,
                &what,
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        self.check_status(resp, &what).await.map(|_| true)
    }

    /// `POST /v2/<repository>/blobs/uploads/`, with `?mount=<digest>&from=<repo>`
    /// when `mount` names a repository of the same registry that holds the
    /// blob. A registry that cannot mount answers with an upload session.
    pub async fn start_upload(
        &self,
        repository: &str,
        mount: Option<(&str, &str)>,
    ) -> Result<UploadStart, RegistryError> {
        self.check_names(repository, None)?;
        let mut url = format!("{}/v2/{repository}/blobs/uploads/", self.base_url);
        let what = match mount {
            Some((digest, from)) => {
                self.check_names(from, None)?;
                let what = format!("mount of {digest} from {from} into {repository}");
                self.check_digest(&what, digest)?;
                url.push_str(&format!("?mount={digest}&from={from}"));
                what
            }
            None => format!("upload to {repository}"),
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        // A mount also needs pull access to the repository it comes from.
        let scope = Self::push_scope(repository, mount.map(|(_, f)| f));
        let resp = self
            .send_scoped(Method::POST, &url, scope, headers, None, &what)
            .await?;
        let resp = self.check_status(resp, &what).await?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(UploadStart::Mounted),
            StatusCode::ACCEPTED => {
                let location = header_str(resp.headers(), "location").unwrap_or_default();
                self.upload_url(location, &what).map(UploadStart::Session)
            }
            other => Err(RegistryError::Http {
                registry: self.registry.clone(),
                status: other.as_u16(),
                what,
            }),
        }
    }

    /// The absolute URL of an upload session. A Location on another host is
    /// refused: the credentials would follow it there.
    fn upload_url(&self, location: &str, what: &str) -> Result<String, RegistryError> {
        if location.starts_with('/') {
            return Ok(format!("{}{location}", self.base_url));
        }
        let same_origin = location
            .strip_prefix(&self.base_url)
            .is_some_and(|rest| rest.starts_with('/'));
        if same_origin {
            return Ok(location.to_string());
        }
        Err(RegistryError::Malformed {
            registry: self.registry.clone(),
            message: format!(
                "{what}: upload Location {location:?} is not on {}",
                self.base_url
            ),
        })
    }

    /// Completes an upload session with the whole blob in one `PUT`
    /// (`?digest=`). `body` makes the body (again, if a 401 must be answered);
    /// it is streamed, so a large blob does not sit in memory.
    pub async fn put_blob(
        &self,
        repository: &str,
        session_url: &str,
        digest: &str,
        size: u64,
        body: &(dyn Fn() -> reqwest::Body + Send + Sync),
    ) -> Result<(), RegistryError> {
        self.check_names(repository, None)?;
        let what = format!("upload of blob {repository}@{digest}");
        self.check_digest(&what, digest)?;
        let url = self.upload_url(session_url, &what)?;
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}digest={digest}");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        let resp = self
            .send_push(Method::PUT, &url, repository, headers, Some(body), &what)
            .await?;
        self.check_status(resp, &what).await.map(|_| ())
    }

    /// `PUT` of a manifest or index by tag or digest, with its media type as
    /// Content-Type. Returns the digest the registry computed.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Option<String>, RegistryError> {
        self.check_names(repository, Some(reference))?;
        let what = format!("manifest put {repository}:{reference}");
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base_url);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|_| RegistryError::Malformed {
                registry: self.registry.clone(),
                message: format!("{what}: media type {media_type:?} is not a header value"),
            })?,
        );
        let make = move || reqwest::Body::from(bytes.clone());
        let resp = self
            .send_push(Method::PUT, &url, repository, headers, Some(&make), &what)
            .await?;
        let resp = self.check_status(resp, &what).await?;
        Ok(header_str(resp.headers(), "docker-content-digest").map(str::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::super::RegistryConfig;
    use super::*;

    #[test]
    fn upload_locations_stay_on_the_registry() {
        let c = RegistryClient::new(RegistryConfig {
            host: "127.0.0.1:5000".into(),
            insecure: true,
            ..RegistryConfig::default()
        })
        .expect("client");
        assert_eq!(
            c.upload_url("/v2/a/blobs/uploads/x?_state=s", "t").ok(),
            Some("http://127.0.0.1:5000/v2/a/blobs/uploads/x?_state=s".to_string())
        );
        assert!(
            c.upload_url("http://127.0.0.1:5000/v2/a/blobs/uploads/x", "t")
                .is_ok()
        );
        for bad in [
            "http://evil.example/v2/a/blobs/uploads/x",
            "http://127.0.0.1:50000/v2/x",
            "",
        ] {
            assert!(c.upload_url(bad, "t").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn push_scopes_name_the_mount_source() {
        assert_eq!(
            RegistryClient::push_scope("a/b", None),
            "repository:a/b:pull,push"
        );
        assert_eq!(
            RegistryClient::push_scope("a/b", Some("c")),
            "repository:a/b:pull,push repository:c:pull"
        );
    }
}
