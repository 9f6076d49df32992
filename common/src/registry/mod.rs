//! An OCI distribution client: manifests, blobs (with HTTP Range), tag lists,
//! and anonymous, basic and bearer-token authentication.
//!
//! Both the hub's tag resolver and the agent's transfer engine use it. It is a
//! thin, streaming client: blob bodies are handed out chunk by chunk so a
//! caller can write them to disk with bounded memory, and manifests are
//! verified against the digest they were asked for and capped in size.

mod auth;
mod error;
mod push;
mod referrers;

pub use auth::{Challenge, Credentials, parse_challenge};
pub use error::RegistryError;
pub use push::UploadStart;
pub use referrers::{MAX_REFERRERS, ReferrerDescriptor, referrers_tag};

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};

/// The manifest media types we ask for, most preferred first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest (schema 2) media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The largest manifest we accept; distribution itself refuses over 4 MiB.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// How to reach one registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Host and optional port, e.g. `harbor.example.com` or `127.0.0.1:5000`.
    /// `docker.io` is mapped to its API host.
    pub host: String,
    /// Credentials; `None` for anonymous pulls.
    pub credentials: Option<Credentials>,
    /// Use plain HTTP (a lab registry).
    pub insecure: bool,
    /// Extra trusted CA certificates, PEM.
    pub extra_roots_pem: Vec<Vec<u8>>,
    /// Give up on a connection attempt after this long (default 10 s).
    pub connect_timeout: Option<Duration>,
    /// Give up when no byte arrives for this long (default 30 s); this is what
    /// turns a dead edge link into a retryable error.
    pub read_timeout: Option<Duration>,
    /// Give up on a body that trickles: see [`MinProgress`]. `None` (the
    /// default) checks only `read_timeout`, which a body arriving at one byte
    /// a second never trips.
    pub min_progress: Option<MinProgress>,
}

/// The least progress a manifest or blob body must make: at least `bytes`
/// in every `window` of time spent waiting on the network. Only time spent
/// waiting for the next chunk counts, so a caller that reads slowly on
/// purpose (a bandwidth limit, a slow disk) never trips it: its socket
/// buffer is full and the next chunk is there at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinProgress {
    /// How long a measuring window is.
    pub window: Duration,
    /// Bytes that must arrive within each window.
    pub bytes: u64,
}

impl Default for MinProgress {
    /// 16 KiB per 30 s: about 550 bytes/s, far below any usable link, far
    /// above a stalled one.
    fn default() -> Self {
        MinProgress {
            window: Duration::from_secs(30),
            bytes: 16 * 1024,
        }
    }
}

/// Measures a body against a [`MinProgress`].
#[derive(Debug, Clone)]
struct ProgressCheck {
    rule: MinProgress,
    /// Time spent waiting on the network in the current window.
    waited: Duration,
    /// Bytes received in the current window.
    received: u64,
}

impl ProgressCheck {
    fn new(rule: MinProgress) -> Self {
        ProgressCheck {
            rule,
            waited: Duration::ZERO,
            received: 0,
        }
    }

    /// The longest the next wait may last before the window is judged.
    fn budget(&self) -> Duration {
        self.rule.window.saturating_sub(self.waited)
    }

    /// Counts a wait that ended (with `bytes`, 0 on a timeout). `Err` says
    /// how little arrived when the window closed with too little progress.
    fn account(&mut self, waited: Duration, bytes: u64) -> Result<(), TooSlow> {
        self.waited += waited;
        self.received += bytes;
        if self.waited < self.rule.window {
            return Ok(());
        }
        let outcome = if self.received < self.rule.bytes {
            Err(TooSlow {
                received: self.received,
                waited: self.waited,
                expected: self.rule.bytes,
            })
        } else {
            Ok(())
        };
        self.waited = Duration::ZERO;
        self.received = 0;
        outcome
    }
}

/// A window of waiting that closed with too little progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{received} bytes in {waited:?} of waiting, expected at least {expected}")]
struct TooSlow {
    received: u64,
    waited: Duration,
    expected: u64,
}

/// Receives the next chunk of a body, holding it to `check`.
async fn next_chunk(
    response: &mut reqwest::Response,
    check: &mut Option<ProgressCheck>,
    registry: &str,
    what: &str,
) -> Result<Option<Bytes>, RegistryError> {
    let Some(check) = check else {
        return response
            .chunk()
            .await
            .map_err(|e| transport_error(registry, e));
    };
    let stalled = |slow: TooSlow| RegistryError::Stalled {
        registry: registry.to_string(),
        what: what.to_string(),
        message: slow.to_string(),
    };
    loop {
        let started = Instant::now();
        // `chunk` takes a frame only when one is ready, so abandoning it on
        // the timeout loses nothing.
        match tokio::time::timeout(check.budget(), response.chunk()).await {
            Ok(result) => {
                let chunk = result.map_err(|e| transport_error(registry, e))?;
                let len = chunk.as_ref().map_or(0, |c| c.len() as u64);
                check.account(started.elapsed(), len).map_err(stalled)?;
                return Ok(chunk);
            }
            Err(_) => check.account(started.elapsed(), 0).map_err(stalled)?,
        }
    }
}

/// A manifest or index as fetched, with its verified digest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The exact bytes, which the digest covers.
    pub bytes: Bytes,
    /// Media type, from Content-Type or the document's `mediaType`.
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
}

/// What a HEAD of a manifest told.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`, when the registry sent it.
    pub digest: Option<String>,
    /// Content-Type, when sent.
    pub media_type: Option<String>,
    /// Content-Length, when sent.
    pub size: Option<u64>,
}

/// A blob body being received.
#[derive(Debug)]
pub struct BlobStream {
    /// Offset of the first byte of this body: the requested offset when the
    /// registry honoured Range (206), else 0 (a 200 that ignored it).
    pub start: u64,
    /// The full size of the blob, when the registry said it.
    pub total: Option<u64>,
    registry: String,
    what: String,
    response: reqwest::Response,
    progress: Option<ProgressCheck>,
}

impl BlobStream {
    /// The next chunk of the body, `None` at its end. A broken connection is
    /// `Unreachable` and a trickle below the client's [`MinProgress`] is
    /// `Stalled`; both are retryable: resume from what was written.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        next_chunk(
            &mut self.response,
            &mut self.progress,
            &self.registry,
            &self.what,
        )
        .await
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The hex part of a `sha256:<64 lowercase hex>` digest, or `None` when the
/// string is not one. Callers use this before putting a digest in a path.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// Whether a repository name follows the distribution grammar: lowercase
/// path components of `[a-z0-9._-]`, separated by `/`. Anything else could
/// change the meaning of the URL it is put in.
pub fn valid_repository(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        })
}

/// Whether a tag follows the distribution grammar `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

/// Whether a manifest reference is a digest rather than a tag.
pub fn is_digest(reference: &str) -> bool {
    reference.contains(':')
}

/// Maps `docker.io` style names to the host that serves the API.
pub fn api_host(host: &str) -> &str {
    match host {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

#[derive(Default)]
struct AuthState {
    /// The registry asked for Basic: send the credentials up front.
    basic: bool,
    /// Bearer tokens per scope ("" for none), with their expiry.
    tokens: HashMap<String, (String, Instant)>,
}

/// A client for one registry. Cheap to share behind an `Arc`; tokens are
/// cached per scope.
pub struct RegistryClient {
    registry: String,
    base_url: String,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    min_progress: Option<MinProgress>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("registry", &self.registry)
            .field("base_url", &self.base_url)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// Refuses names that would change the URL they are put in.
    fn check_names(&self, repository: &str, reference: Option<&str>) -> Result<(), RegistryError> {
        let bad = |message: String| {
            Err(RegistryError::Malformed {
                registry: self.registry.clone(),
                message,
            })
        };
        if !valid_repository(repository) {
            return bad(format!(
                "repository {repository:?}: expected lowercase path components of [a-z0-9._-]"
            ));
        }
        match reference {
            Some(r) if is_digest(r) && sha256_hex(r).is_none() => bad(format!(
                "{repository}@{r}: expected a digest of the form sha256:<64 hex>"
            )),
            Some(r) if !is_digest(r) && !valid_tag(r) => bad(format!(
                "{repository}:{r}: expected a tag of [A-Za-z0-9_.-], at most 128"
            )),
            _ => Ok(()),
        }
    }

    /// Builds a client. Installs rustls' ring provider if none is installed.
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = config.host.clone();
        let malformed = |message: String| RegistryError::Malformed {
            registry: registry.clone(),
            message,
        };
        if config.host.is_empty() || config.host.contains('/') {
            return Err(malformed(format!(
                "registry host {:?}: expected a host name with an optional port",
                config.host
            )));
        }
        let scheme = if config.insecure { "http" } else { "https" };
        let base_url = format!("{scheme}://{}", api_host(&config.host));
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout.unwrap_or(Duration::from_secs(10)))
            .read_timeout(config.read_timeout.unwrap_or(Duration::from_secs(30)))
            .user_agent(concat!("imgfleet/", env!("CARGO_PKG_VERSION")));
        let mut roots = Vec::new();
        for pem in &config.extra_roots_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| malformed(format!("extra CA roots: {e}")))?;
            roots.extend(certs);
        }
        if config.insecure {
            // A plain-HTTP registry needs no system roots, and loading them
            // (the platform verifier reads the system store) is most of the
            // cost of building a client: a no-op re-sync pays it per run.
            // TLS is then only for a token realm, which --ca-file can trust.
            builder = builder.tls_certs_only(roots);
        } else if !roots.is_empty() {
            builder = builder.tls_certs_merge(roots);
        }
        let http = builder
            .build()
            .map_err(|e| malformed(format!("building HTTP client: {e}")))?;
        Ok(RegistryClient {
            registry,
            base_url,
            http,
            credentials: config.credentials,
            auth: Mutex::new(AuthState::default()),
            min_progress: config.min_progress,
        })
    }

    /// The registry's base URL, `http(s)://host[:port]`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The registry host this client talks to.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// `GET /v2/`: checks that the registry answers and accepts the credentials.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let url = format!("{}/v2/", self.base_url);
        let resp = self
            .send(Method::GET, &url, None, HeaderMap::new(), "API root")
            .await?;
        self.check_status(resp, "API root").await.map(|_| ())
    }

    /// `HEAD` of a manifest by tag or digest.
    pub async fn head_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<ManifestHead, RegistryError> {
        let what = format!("manifest {repository}:{reference}");
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base_url);
        let resp = self
            .send(
                Method::HEAD,
                &url,
                Some(repository),
                accept_headers(),
                &what,
            )
            .await?;
        let resp = self.check_status(resp, &what).await?;
        let h = resp.headers();
        Ok(ManifestHead {
            digest: header_str(h, "docker-content-digest").map(str::to_string),
            media_type: header_str(h, "content-type").map(strip_params),
            // The header itself: a HEAD has no body for reqwest to size.
            size: header_str(h, "content-length").and_then(|v| v.trim().parse().ok()),
        })
    }

    /// Resolves a tag to the digest of its manifest or index: a HEAD when the
    /// registry sends `Docker-Content-Digest`, else a GET.
    pub async fn resolve_tag(&self, repository: &str, tag: &str) -> Result<String, RegistryError> {
        let head = self.head_manifest(repository, tag).await?;
        if let Some(d) = head.digest.filter(|d| sha256_hex(d).is_some()) {
            return Ok(d);
        }
        Ok(self.get_manifest(repository, tag).await?.digest)
    }

    /// Reads a manifest or index body of at most [`MAX_MANIFEST_BYTES`],
    /// with the minimum-progress check on every wait.
    pub(crate) async fn read_manifest_body(
        &self,
        resp: &mut reqwest::Response,
        what: String,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut body = Vec::new();
        let mut progress = self.min_progress.map(ProgressCheck::new);
        while let Some(chunk) = next_chunk(resp, &mut progress, &self.registry, &what).await? {
            let size = body.len() as u64 + chunk.len() as u64;
            if size > MAX_MANIFEST_BYTES {
                return Err(RegistryError::TooLarge {
                    what,
                    size,
                    limit: MAX_MANIFEST_BYTES,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// `GET` of a manifest by tag or digest, capped at [`MAX_MANIFEST_BYTES`]
    /// and, when asked for by digest, verified against it.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Manifest, RegistryError> {
        self.check_names(repository, Some(reference))?;
        let what = format!("manifest {repository}:{reference}");
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base_url);
        let resp = self
            .send(Method::GET, &url, Some(repository), accept_headers(), &what)
            .await?;
        let mut resp = self.check_status(resp, &what).await?;
        if let Some(len) = resp.content_length()
            && len > MAX_MANIFEST_BYTES
        {
            return Err(RegistryError::TooLarge {
                what,
                size: len,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let content_type = header_str(resp.headers(), "content-type").map(strip_params);
        let body = self.read_manifest_body(&mut resp, what.clone()).await?;
        let digest = sha256_digest(&body);
        if is_digest(reference) && digest != reference {
            return Err(RegistryError::DigestMismatch {
                expected: reference.to_string(),
                actual: digest,
            });
        }
        let declared = serde_json::from_slice::<MediaTypeOnly>(&body)
            .map_err(|e| RegistryError::Malformed {
                registry: self.registry.clone(),
                message: format!("{what}: not a JSON manifest: {e}"),
            })?
            .media_type;
        let media_type = match (declared, content_type) {
            (Some(d), _) => d,
            (None, Some(c)) if c != "application/json" && c != "text/plain" => c,
            _ => {
                return Err(RegistryError::Malformed {
                    registry: self.registry.clone(),
                    message: format!("{what}: no media type in the document or Content-Type"),
                });
            }
        };
        Ok(Manifest {
            bytes: Bytes::from(body),
            media_type,
            digest,
        })
    }

    /// Starts receiving a blob from `offset` (0 for the whole blob). A registry
    /// that ignores Range answers the whole blob: check [`BlobStream::start`].
    pub async fn get_blob(
        &self,
        repository: &str,
        digest: &str,
        offset: u64,
    ) -> Result<BlobStream, RegistryError> {
        self.check_names(repository, None)?;
        let what = format!("blob {repository}@{digest}");
        if sha256_hex(digest).is_none() {
            return Err(RegistryError::Malformed {
                registry: self.registry.clone(),
                message: format!("{what}: expected a digest of the form sha256:<64 hex>"),
            });
        }
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base_url);
        let mut headers = HeaderMap::new();
        if offset > 0 {
            let range = HeaderValue::from_str(&format!("bytes={offset}-")).map_err(|e| {
                RegistryError::Malformed {
                    registry: self.registry.clone(),
                    message: e.to_string(),
                }
            })?;
            headers.insert(header::RANGE, range);
        }
        let resp = self
            .send(Method::GET, &url, Some(repository), headers, &what)
            .await?;
        let resp = self.check_status(resp, &what).await?;
        let (start, total) = if resp.status() == StatusCode::PARTIAL_CONTENT {
            let range = header_str(resp.headers(), "content-range").unwrap_or_default();
            match parse_content_range(range) {
                Some((first, total)) if first == offset => (first, total),
                _ => {
                    return Err(RegistryError::Malformed {
                        registry: self.registry.clone(),
                        message: format!(
                            "{what}: asked for bytes from {offset}, got Content-Range {range:?}"
                        ),
                    });
                }
            }
        } else {
            (0, resp.content_length())
        };
        Ok(BlobStream {
            start,
            total,
            registry: self.registry.clone(),
            what,
            response: resp,
            progress: self.min_progress.map(ProgressCheck::new),
        })
    }

    /// All tags of a repository, following `Link: <..>; rel="next"` pages.
    pub async fn list_tags(&self, repository: &str) -> Result<Vec<String>, RegistryError> {
        self.check_names(repository, None)?;
        let what = format!("tags of {repository}");
        let mut url = format!("{}/v2/{repository}/tags/list?n=1000", self.base_url);
        let mut tags = Vec::new();
        // A bound on pages so that a registry with a Link loop cannot keep us forever.
        for _ in 0..1000 {
            let resp = self
                .send(Method::GET, &url, Some(repository), HeaderMap::new(), &what)
                .await?;
            let resp = self.check_status(resp, &what).await?;
            let next = header_str(resp.headers(), "link").and_then(parse_next_link);
            let body = resp
                .bytes()
                .await
                .map_err(|e| transport_error(&self.registry, e))?;
            let page: TagList =
                serde_json::from_slice(&body).map_err(|e| RegistryError::Malformed {
                    registry: self.registry.clone(),
                    message: format!("{what}: {e}"),
                })?;
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(n) if n.starts_with("http://") || n.starts_with("https://") => url = n,
                Some(n) if n.starts_with('/') => url = format!("{}{n}", self.base_url),
                Some(n) => {
                    return Err(RegistryError::Malformed {
                        registry: self.registry.clone(),
                        message: format!("{what}: unusable Link {n:?}"),
                    });
                }
                None => return Ok(tags),
            }
        }
        Err(RegistryError::Malformed {
            registry: self.registry.clone(),
            message: format!("{what}: more than 1000 pages"),
        })
    }

    /// Sends a request, answering one 401 challenge (basic or bearer) and
    /// retrying once with the new authorization.
    async fn send(
        &self,
        method: Method,
        url: &str,
        repository: Option<&str>,
        headers: HeaderMap,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let scope = repository
            .map(|r| format!("repository:{r}:pull"))
            .unwrap_or_default();
        self.send_scoped(method, url, scope, headers, None, what)
            .await
    }

    /// [`Self::send`] with an explicit token scope (space-separated scopes
    /// for several repositories) and an optional body. The body is made by a
    /// function because answering a 401 sends the request again.
    async fn send_scoped(
        &self,
        method: Method,
        url: &str,
        scope: String,
        headers: HeaderMap,
        body: Option<&(dyn Fn() -> reqwest::Body + Send + Sync)>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut answered = false;
        loop {
            let mut req = self
                .http
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(make) = body {
                req = req.body(make());
            }
            let (token, basic) = {
                let state = self.auth.lock().unwrap_or_else(|p| p.into_inner());
                let token = state
                    .tokens
                    .get(&scope)
                    .filter(|(_, exp)| *exp > Instant::now())
                    .map(|(t, _)| t.clone());
                (token, state.basic)
            };
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            } else if basic && let Some(c) = &self.credentials {
                req = req.basic_auth(&c.username, Some(&c.password));
            }
            let resp = req
                .send()
                .await
                .map_err(|e| transport_error(&self.registry, e))?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if answered {
                return Err(self.auth_failed(format!("{what}: credentials refused (401)")));
            }
            answered = true;
            let challenge =
                header_str(resp.headers(), "www-authenticate").and_then(parse_challenge);
            match challenge {
                Some(Challenge::Basic) => {
                    if self.credentials.is_none() {
                        return Err(self.auth_failed(format!(
                            "{what}: the registry requires credentials and none are configured"
                        )));
                    }
                    self.auth.lock().unwrap_or_else(|p| p.into_inner()).basic = true;
                }
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: challenge_scope,
                }) => {
                    // A push (or a mount from another repository) needs
                    // more than the challenge names; a pull takes what the
                    // registry asked for.
                    let want = if scope.contains(":push") {
                        scope.clone()
                    } else {
                        challenge_scope.unwrap_or_else(|| scope.clone())
                    };
                    let (token, ttl) = self.fetch_token(&realm, service.as_deref(), &want).await?;
                    self.auth
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .tokens
                        .insert(scope.clone(), (token, Instant::now() + ttl));
                }
                None => {
                    return Err(self.auth_failed(format!(
                        "{what}: 401 without a usable WWW-Authenticate challenge"
                    )));
                }
            }
        }
    }

    /// The token endpoint of the bearer flow (docker token spec).
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(String, Duration), RegistryError> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service {
            query.push(("service", s));
        }
        // Several scopes go as several `scope` parameters (token spec).
        for one in scope.split(' ').filter(|s| !s.is_empty()) {
            query.push(("scope", one));
        }
        let url = reqwest::Url::parse_with_params(realm, &query).map_err(|e| {
            RegistryError::Malformed {
                registry: self.registry.clone(),
                message: format!("token realm {realm:?}: {e}"),
            }
        })?;
        if self.base_url.starts_with("https://") && url.scheme() != "https" {
            // Never send credentials in clear text to a realm a TLS registry named.
            return Err(self.auth_failed(format!("token realm {realm:?} is not HTTPS")));
        }
        let mut req = self.http.get(url);
        if let Some(c) = &self.credentials {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| transport_error(&self.registry, e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(
                self.auth_failed(format!("token service refused the credentials ({status})"))
            );
        }
        let resp = self.check_status(resp, "bearer token").await?;
        let body = resp
            .bytes()
            .await
            .map_err(|e| transport_error(&self.registry, e))?;
        let t: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Malformed {
                registry: self.registry.clone(),
                message: format!("token response: {e}"),
            })?;
        let token = t
            .token
            .or(t.access_token)
            .ok_or_else(|| RegistryError::Malformed {
                registry: self.registry.clone(),
                message: "token response without token".into(),
            })?;
        // Renew a little early so a token never expires in flight; the spec's
        // default lifetime is 60 s.
        let secs = t.expires_in.unwrap_or(60).max(20);
        Ok((token, Duration::from_secs(secs - 10)))
    }

    fn auth_failed(&self, message: String) -> RegistryError {
        RegistryError::AuthFailed {
            registry: self.registry.clone(),
            message,
        }
    }

    /// Maps a non-success status to the error enum.
    async fn check_status(
        &self,
        resp: reqwest::Response,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let registry = self.registry.clone();
        Err(match status {
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                registry,
                what: what.to_string(),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::AuthFailed {
                registry,
                message: format!("{what}: {status}"),
            },
            StatusCode::TOO_MANY_REQUESTS => RegistryError::RateLimited {
                registry,
                retry_after: header_str(resp.headers(), "retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs),
            },
            _ => RegistryError::Http {
                registry,
                status: status.as_u16(),
                what: what.to_string(),
            },
        })
    }
}

fn accept_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
    h
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn strip_params(v: &str) -> String {
    v.split(';').next().unwrap_or_default().trim().to_string()
}

/// Flattens a transport error without its URL (which carries no secret today,
/// but a token realm's query could).
fn transport_error(registry: &str, e: reqwest::Error) -> RegistryError {
    let mut causes = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        causes.push_str(": ");
        causes.push_str(&s.to_string());
        source = s.source();
    }
    let message = format!("{}{causes}", e.without_url());
    RegistryError::Unreachable {
        registry: registry.to_string(),
        message,
    }
}

/// Parses `bytes <first>-<last>/<total|*>` into (first, total).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim();
    let (range, total) = rest.split_once('/')?;
    let (first, _last) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((first.parse().ok()?, total))
}

/// Finds the `rel="next"` target in a Link header.
fn parse_next_link(v: &str) -> Option<String> {
    v.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace('"', "").eq_ignore_ascii_case("rel=next"));
        let t = target.trim();
        (is_next && t.starts_with('<') && t.ends_with('>')).then(|| t[1..t.len() - 1].to_string())
    })
}

#[derive(serde::Deserialize)]
struct MediaTypeOnly {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
}

#[derive(serde::Deserialize)]
struct TagList {
    tags: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_windows() {
        let rule = MinProgress {
            window: Duration::from_secs(10),
            bytes: 100,
        };
        let s = Duration::from_secs;
        // (wait, bytes) steps and whether each is judged a stall.
        let check = |steps: &[(u64, u64, bool)]| {
            let mut c = ProgressCheck::new(rule);
            for (i, (wait, bytes, stalls)) in steps.iter().enumerate() {
                assert_eq!(
                    c.account(s(*wait), *bytes).is_err(),
                    *stalls,
                    "step {i} of {steps:?}"
                );
            }
        };
        // Enough within the window, twice over.
        check(&[(4, 60, false), (6, 60, false), (10, 100, false)]);
        // A trickle: one byte per second.
        check(&[(1, 1, false), (1, 1, false), (8, 8, true)]);
        // Silence judged at the end of the window.
        check(&[(10, 0, true)]);
        // A fresh window after a good one.
        check(&[(10, 100, false), (9, 0, false), (1, 99, true)]);
        let mut c = ProgressCheck::new(rule);
        assert_eq!(c.budget(), s(10));
        c.account(s(3), 0).unwrap();
        assert_eq!(c.budget(), s(7));
    }

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 10-99/100"),
            Some((10, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 10-99/*"), Some((10, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn next_link() {
        assert_eq!(
            parse_next_link("</v2/a/tags/list?n=2&last=b>; rel=\"next\"").as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(parse_next_link("<x>; rel=\"prev\""), None);
    }

    #[test]
    fn names() {
        assert!(valid_repository("library/nginx"));
        assert!(valid_repository("a.b/c_d-e"));
        assert!(!valid_repository("Library/nginx"));
        assert!(!valid_repository("a//b"));
        assert!(!valid_repository("a/../b"));
        assert!(!valid_repository("a?x=1"));
        assert!(valid_tag("v1.2.3-rc_1"));
        assert!(!valid_tag(".hidden"));
        assert!(!valid_tag("a/b"));
        assert!(!valid_tag(""));
    }

    #[test]
    fn digests() {
        let d = sha256_digest(b"");
        assert_eq!(
            d,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(sha256_hex(&d).is_some());
        assert!(sha256_hex("sha256:../../etc/passwd").is_none());
        assert!(sha256_hex("sha512:abc").is_none());
    }
}
