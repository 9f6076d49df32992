//! The mirror: a read-only OCI distribution API over the content store, for
//! containerd on the cluster's nodes (and any registry client).
//!
//! - [`catalog`] says what may be served under which repository name and
//!   upstream: only what that repository's synced content references. The
//!   store holds every tenant's blobs side by side; anything a repository
//!   does not reference is answered 404, exactly as if it did not exist.
//! - [`http`] is the server: connection limit with backpressure, header and
//!   idle timeouts, a bounded send buffer, stalled readers cut, blob bodies
//!   sent with `sendfile(2)`.
//! - This file routes a parsed request to an answer.
//!
//! Only recorded manifests and complete, verified blobs are served, so a node
//! never pulls half an image. Referrers (`/v2/<name>/referrers/<digest>`,
//! OCI 1.1) are listed from the manifests held that name a subject. `?ns=<upstream host>` (which containerd adds when
//! it uses a mirror) selects the upstream registry. Without it, a tag is
//! served when exactly one upstream of that repository name holds it, and a
//! digest whenever one of them references it (the bytes of a digest are the
//! same whichever upstream they came from).

pub mod catalog;
pub mod http;

pub use http::{Limits, Stats};

use std::collections::HashSet;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imgfleet_common::registry::{OCI_INDEX, ReferrerDescriptor, sha256_hex};
use tokio_util::sync::CancellationToken;

use crate::settings::{ConfigError, parse_duration};
use crate::store::Store;
use catalog::{Catalog, Held};
use http::{Body, Request, Response};
use imgfleet_common::pull_token::Verifier;

/// How long responses in progress may go on after shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Bodies up to this size (manifests, mostly) are read into memory and sent
/// with the response head in one write; larger ones go by `sendfile`.
const INLINE_BODY: u64 = 16 * 1024;

/// The most tags one `tags/list` page holds; with more, a `Link` names the
/// next page.
pub const MAX_TAGS_PAGE: usize = 1000;

/// The mirror's flags (daemon and `serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct MirrorArgs {
    /// Connections the mirror serves at once; more wait (backpressure). Also
    /// capped by the file-descriptor limit, keeping room for the agent's own files.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub mirror_max_connections: usize,
    /// Time a client has to send a complete request head, e.g. 10s.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub mirror_header_timeout: String,
    /// Time a kept-alive connection may wait for its next request, e.g. 60s.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub mirror_idle_timeout: String,
    /// A response the client stops reading for this long is cut, e.g. 30s.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub mirror_stall_timeout: String,
    /// Socket send buffer per connection in bytes (0: the kernel's autotuning).
    #[arg(long, default_value_t = 256 * 1024, value_name = "BYTES")]
    pub mirror_send_buffer: usize,
    /// none: any client reads what the mirror holds. token: a request needs a
    /// pull token (`imgfleet cluster pull-token`) and reads only its namespace's
    /// repositories; checked offline against the hub's CA (daemon only).
    #[arg(long, default_value = "none", value_name = "none|token")]
    pub mirror_auth: String,
}

impl MirrorArgs {
    /// Whether `--mirror-auth token` is asked for, or the flag that is wrong.
    pub fn token_auth(&self) -> Result<bool, ConfigError> {
        match self.mirror_auth.as_str() {
            "none" => Ok(false),
            "token" => Ok(true),
            other => Err(ConfigError::new(
                format!("--mirror-auth {other}"),
                "expected none or token",
            )),
        }
    }
}

/// What `--mirror-auth token` checks a request against: the token's
/// signature and cluster ([`Verifier`]), and which repositories the
/// namespace it names has synced here (the held desired set).
#[derive(Debug)]
pub struct TokenAuth {
    pub verifier: Verifier,
    pub desired: tokio::sync::watch::Receiver<Arc<crate::desired::DesiredSet>>,
    /// Tokens issued at or before this time (Unix seconds) are refused: set when
    /// the hub says this cluster was revoked, which invalidates its tokens.
    pub not_before: Arc<std::sync::atomic::AtomicI64>,
}

impl TokenAuth {
    /// The namespace a request's token grants, or `None` (answered 401).
    fn namespace(&self, req: &Request) -> Option<String> {
        let token = req
            .authorization
            .as_deref()?
            .strip_prefix("Bearer ")
            .or_else(|| req.authorization.as_deref()?.strip_prefix("bearer "))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok())?;
        let claims = self.verifier.verify(token, now).ok()?;
        let floor = self.not_before.load(std::sync::atomic::Ordering::Relaxed);
        // Issued in the second of the revocation or before: refused.
        (claims.iat > floor).then_some(claims.namespace)
    }

    /// The (upstream, repository) pairs synced for `namespace`.
    fn scope(&self, namespace: &str) -> HashSet<(String, String)> {
        self.desired
            .borrow()
            .images
            .values()
            .filter(|i| i.source.0 == namespace)
            .map(|i| (i.registry.clone(), i.repository.clone()))
            .collect()
    }
}

impl MirrorArgs {
    /// The checked limits, or the flag that is wrong.
    pub fn limits(&self) -> Result<Limits, ConfigError> {
        let duration = |flag: &str, v: &str| {
            parse_duration(v).filter(|d| !d.is_zero()).ok_or_else(|| {
                ConfigError::new(
                    format!("--{flag} {v}"),
                    "expected a duration like 10s or 2m",
                )
            })
        };
        if self.mirror_max_connections == 0 {
            return Err(ConfigError::new(
                "--mirror-max-connections 0",
                "expected at least 1",
            ));
        }
        Ok(Limits {
            max_connections: self.mirror_max_connections,
            header_timeout: duration("mirror-header-timeout", &self.mirror_header_timeout)?,
            idle_timeout: duration("mirror-idle-timeout", &self.mirror_idle_timeout)?,
            stall_timeout: duration("mirror-stall-timeout", &self.mirror_stall_timeout)?,
            send_buffer: self.mirror_send_buffer,
        })
    }
}

/// The mirror's state behind every request: the store and the catalog built
/// from its records, rebuilt when they change.
struct Mirror {
    store: Arc<Store>,
    catalog: Mutex<Option<(u64, Arc<Catalog>)>>,
    auth: Option<TokenAuth>,
}

impl Mirror {
    fn catalog(&self) -> Arc<Catalog> {
        // Held while rebuilding, so that concurrent requests wait for one
        // rebuild instead of each doing it.
        let mut cached = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.store.generation();
        if let Some((g, c)) = cached.as_ref()
            && *g == generation
        {
            return c.clone();
        }
        let (generation, records) = self.store.records_at();
        let catalog = Arc::new(Catalog::build(&self.store, &records));
        *cached = Some((generation, catalog.clone()));
        catalog
    }
}

/// Serves the mirror on `listener` with `limits` until `shutdown` is
/// cancelled; responses in progress then get [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<Store>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with_stats(
        listener,
        store,
        limits,
        Arc::new(Stats::default()),
        shutdown,
    )
    .await
}

/// [`serve`], counting into `stats`.
pub async fn serve_with_stats(
    listener: tokio::net::TcpListener,
    store: Arc<Store>,
    limits: Limits,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with_auth(listener, store, limits, stats, None, shutdown).await
}

/// [`serve_with_stats`], asking every request for a pull token when `auth`
/// is given (`--mirror-auth token`).
pub async fn serve_with_auth(
    listener: tokio::net::TcpListener,
    store: Arc<Store>,
    mut limits: Limits,
    stats: Arc<Stats>,
    auth: Option<TokenAuth>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let budget = http::connection_budget();
    if limits.max_connections > budget {
        tracing::warn!(
            requested = limits.max_connections,
            allowed = budget,
            "The file-descriptor limit allows fewer mirror connections than asked; raise `ulimit -n` for more"
        );
        limits.max_connections = budget;
    }
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        max_connections = limits.max_connections,
        "Mirror listening"
    );
    let mirror = Arc::new(Mirror {
        store,
        catalog: Mutex::new(None),
        auth,
    });
    let handler: Arc<http::Handler> = Arc::new(move |req: &Request| handle(&mirror, req));
    http::serve(listener, limits, handler, stats, shutdown, SHUTDOWN_GRACE).await
}

/// What a request path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Base,
    Manifest { name: String, reference: String },
    Blob { name: String, digest: String },
    Tags { name: String },
    Referrers { name: String, digest: String },
}

/// The `handler` label of a request path in the mirror's metrics.
pub(crate) fn handler_label(path: &str) -> &'static str {
    match parse_path(path) {
        Some(Route::Base) => "base",
        Some(Route::Manifest { .. }) => "manifest",
        Some(Route::Blob { .. }) => "blob",
        Some(Route::Tags { .. }) => "tags",
        Some(Route::Referrers { .. }) => "referrers",
        None => "other",
    }
}

/// Parses `/v2/...` by hand: repository names contain slashes, so only the
/// last `/manifests/`, `/blobs/`, `/referrers/` or `/tags/list` splits name
/// from the rest.
fn parse_path(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.split('/').all(|c| {
                !c.is_empty()
                    && c != "."
                    && c != ".."
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            })
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return valid_name(name).then(|| Route::Tags { name: name.into() });
    }
    if let Some(i) = rest.rfind("/manifests/") {
        let (name, reference) = (&rest[..i], &rest[i + "/manifests/".len()..]);
        return (valid_name(name) && !reference.is_empty() && !reference.contains('/')).then(
            || Route::Manifest {
                name: name.into(),
                reference: reference.into(),
            },
        );
    }
    if let Some(i) = rest.rfind("/referrers/") {
        let (name, digest) = (&rest[..i], &rest[i + "/referrers/".len()..]);
        if valid_name(name) && !digest.is_empty() && !digest.contains('/') {
            return Some(Route::Referrers {
                name: name.into(),
                digest: digest.into(),
            });
        }
    }
    if let Some(i) = rest.rfind("/blobs/") {
        let (name, digest) = (&rest[..i], &rest[i + "/blobs/".len()..]);
        return (valid_name(name) && !digest.contains('/')).then(|| Route::Blob {
            name: name.into(),
            digest: digest.into(),
        });
    }
    None
}

const API_VERSION: (&str, &str) = ("Docker-Distribution-API-Version", "registry/2.0");

/// An OCI distribution error answer: `{"errors":[{code,message,detail}]}`.
pub(crate) fn error_response(status: (u16, &'static str), code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]});
    Response {
        status,
        headers: vec![
            ("Content-Type", "application/json".into()),
            (API_VERSION.0, API_VERSION.1.into()),
        ],
        body: Body::Bytes(body.to_string().into_bytes()),
    }
}

const NOT_FOUND: (u16, &str) = (404, "Not Found");
const BAD_REQUEST: (u16, &str) = (400, "Bad Request");

fn json(body: String) -> Response {
    Response {
        status: (200, "OK"),
        headers: vec![
            ("Content-Type", "application/json".into()),
            (API_VERSION.0, API_VERSION.1.into()),
        ],
        body: Body::Bytes(body.into_bytes()),
    }
}

/// The value of a query parameter, percent-decoded.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| http::percent_decode(v).unwrap_or_else(|| v.to_string()))
    })
}

fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

/// The upstreams a request may be answered from: the one `ns` names (Docker
/// Hub under any of its names), or all that hold the name.
fn candidates<'c>(catalog: &'c Catalog, name: &str, ns: Option<&str>) -> Vec<&'c Held> {
    let holders = catalog.holders(name);
    match ns {
        Some(ns) => holders
            .iter()
            .filter(|h| h.registry == ns || (is_docker_hub(ns) && is_docker_hub(&h.registry)))
            .take(1)
            .collect(),
        None => holders.iter().collect(),
    }
}

/// Answers with `f` over the upstreams that may answer for `name`, or
/// NAME_UNKNOWN when none holds it.
fn with_holders(
    mirror: &Scoped<'_>,
    name: &str,
    ns: Option<&str>,
    f: impl FnOnce(&[&Held]) -> Response,
) -> Response {
    let catalog = mirror.mirror.catalog();
    let mut holders = candidates(&catalog, name, ns);
    // A token's namespace sees only its own repositories; the rest answer
    // exactly as if they did not exist.
    if let Some(scope) = mirror.scope {
        holders.retain(|h| scope.contains(&(h.registry.clone(), name.to_owned())));
    }
    match holders.as_slice() {
        [] => name_unknown(name),
        holders => f(holders),
    }
}

/// A 404 with `code` for `what` (a manifest or blob) this mirror does not hold.
fn not_held(code: &str, what: std::fmt::Arguments<'_>) -> Response {
    error_response(
        NOT_FOUND,
        code,
        &format!("{what} is not held by this mirror"),
    )
}

fn name_unknown(name: &str) -> Response {
    error_response(
        NOT_FOUND,
        "NAME_UNKNOWN",
        &format!("repository {name} is not held by this mirror"),
    )
}

fn several_upstreams(name: &str, holders: &[&Held]) -> Response {
    let list: Vec<&str> = holders.iter().map(|h| h.registry.as_str()).collect();
    error_response(
        NOT_FOUND,
        "NAME_UNKNOWN",
        &format!(
            "repository {name} is held from several upstreams ({}); add ?ns=<upstream host>",
            list.join(", ")
        ),
    )
}

/// The mirror as one request may see it: with a pull token, only the
/// (upstream, repository) pairs its namespace synced.
struct Scoped<'a> {
    mirror: &'a Mirror,
    scope: Option<&'a HashSet<(String, String)>>,
}

/// Answers one request. Runs on the blocking pool.
fn handle(mirror: &Mirror, req: &Request) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = error_response(
            (405, "Method Not Allowed"),
            "UNSUPPORTED",
            "this mirror is read-only",
        );
        r.headers.push(("Allow", "GET, HEAD".into()));
        return r;
    }
    // With tokens, a request without a valid one learns nothing, not even
    // whether a path exists.
    let scope = match &mirror.auth {
        None => None,
        Some(auth) => match auth.namespace(req) {
            Some(namespace) => Some(auth.scope(&namespace)),
            None => {
                let mut r = error_response(
                    (401, "Unauthorized"),
                    "UNAUTHORIZED",
                    "a pull token is required",
                );
                r.headers.push((
                    "WWW-Authenticate",
                    "Bearer realm=\"imgfleet-mirror\"".into(),
                ));
                return r;
            }
        },
    };
    let Some(route) = parse_path(&req.path) else {
        return error_response(NOT_FOUND, "NOT_FOUND", "unknown path");
    };
    let query = req.query.as_deref();
    let ns = query_param(query, "ns");
    let scoped = Scoped {
        mirror,
        scope: scope.as_ref(),
    };
    let mirror = &scoped;
    match route {
        Route::Base => json("{}".into()),
        Route::Tags { name } => tags(mirror, &name, ns.as_deref(), query),
        Route::Manifest { name, reference } => manifest(mirror, &name, &reference, ns.as_deref()),
        Route::Blob { name, digest } => {
            blob(mirror, &name, &digest, ns.as_deref(), req.range.as_deref())
        }
        Route::Referrers { name, digest } => referrers(
            mirror,
            &name,
            &digest,
            ns.as_deref(),
            query_param(query, "artifactType").as_deref(),
        ),
    }
}

/// `GET /v2/<name>/referrers/<digest>`: an image index of the manifests
/// held under `name` that name `digest` as their subject, filtered by
/// `artifactType` when asked. A subject this repository does not reference
/// has no referrers here (an empty index, as the spec wants for an unknown
/// subject), whatever other repositories hold.
fn referrers(
    mirror: &Scoped<'_>,
    name: &str,
    digest: &str,
    ns: Option<&str>,
    artifact_type: Option<&str>,
) -> Response {
    if let Err(e) = digest_form(digest) {
        return e;
    }
    with_holders(mirror, name, ns, |holders| {
        // One digest from several upstreams is the same bytes: list each once.
        let mut found: std::collections::BTreeMap<&str, &ReferrerDescriptor> = Default::default();
        for d in holders.iter().flat_map(|h| h.referrers(digest)) {
            if artifact_type.is_none_or(|t| d.artifact_type.as_deref() == Some(t)) {
                found.entry(d.digest.as_str()).or_insert(d);
            }
        }
        let manifests: Vec<&ReferrerDescriptor> = found.into_values().collect();
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        let mut headers = vec![
            ("Content-Type", OCI_INDEX.to_string()),
            (API_VERSION.0, API_VERSION.1.to_string()),
        ];
        if artifact_type.is_some() {
            headers.push(("OCI-Filters-Applied", "artifactType".to_string()));
        }
        Response {
            status: (200, "OK"),
            headers,
            body: Body::Bytes(body.to_string().into_bytes()),
        }
    })
}

/// Whether a digest is well-formed for a lookup: `sha256:<64 hex>`, or a
/// `sha512:<128 hex>` this store never holds (a 404, not a 400).
fn digest_form(digest: &str) -> Result<(), Response> {
    let sha512 = digest
        .strip_prefix("sha512:")
        .is_some_and(|h| h.len() == 128 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if sha256_hex(digest).is_some() || sha512 {
        Ok(())
    } else {
        Err(error_response(
            BAD_REQUEST,
            "DIGEST_INVALID",
            "expected a digest of the form sha256:<64 hex>",
        ))
    }
}

fn tags(mirror: &Scoped<'_>, name: &str, ns: Option<&str>, query: Option<&str>) -> Response {
    let n = match query_param(query, "n") {
        None => None,
        Some(v) => match v.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error_response(
                    BAD_REQUEST,
                    "PAGINATION_NUMBER_INVALID",
                    &format!("query parameter n={v:?}: expected a whole number of tags, 0 or more"),
                );
            }
        },
    };
    let last = query_param(query, "last");
    with_holders(mirror, name, ns, |holders| {
        let held = match holders {
            [one] => *one,
            many => return several_upstreams(name, many),
        };
        let (page, more) = tags_page(held.tags(), n, last.as_deref());
        let mut resp = json(serde_json::json!({"name": name, "tags": page}).to_string());
        if let (true, Some(next)) = (more, page.last()) {
            let size = n.unwrap_or(MAX_TAGS_PAGE).min(MAX_TAGS_PAGE);
            let ns = ns.map(|ns| format!("&ns={ns}")).unwrap_or_default();
            resp.headers.push((
                "Link",
                format!("</v2/{name}/tags/list?n={size}&last={next}{ns}>; rel=\"next\""),
            ));
        }
        resp
    })
}

/// One page of tags (already in lexical order): those after `last`
/// (exclusive), at most `n` and at most [`MAX_TAGS_PAGE`] when `n` is given,
/// and whether more follow. `n = 0` is an empty page with nothing following.
fn tags_page<'t>(
    tags: impl Iterator<Item = &'t str>,
    n: Option<usize>,
    last: Option<&str>,
) -> (Vec<&'t str>, bool) {
    if n == Some(0) {
        return (Vec::new(), false);
    }
    let mut after = tags.filter(|t| last.is_none_or(|l| *t > l));
    let Some(n) = n else {
        return (after.collect(), false);
    };
    let page: Vec<&str> = after.by_ref().take(n.min(MAX_TAGS_PAGE)).collect();
    let more = after.next().is_some();
    (page, more)
}

fn manifest(mirror: &Scoped<'_>, name: &str, reference: &str, ns: Option<&str>) -> Response {
    let by_digest = reference.contains(':');
    if by_digest && let Err(e) = digest_form(reference) {
        return e;
    }
    with_holders(mirror, name, ns, |holders| {
        let unknown = || {
            not_held(
                "MANIFEST_UNKNOWN",
                format_args!("manifest {name}:{reference}"),
            )
        };
        let found: Vec<(&str, &catalog::ManifestInfo)> = holders
            .iter()
            .filter_map(|h| {
                let digest = if by_digest {
                    reference
                } else {
                    h.tag(reference)?
                };
                h.manifest(digest).map(|m| (digest, m))
            })
            .collect();
        let (digest, info) = match found.as_slice() {
            [] => return unknown(),
            [one] => *one,
            // One digest from several upstreams is the same bytes.
            [first, ..] if by_digest => *first,
            // A tag held from several upstreams may name different images.
            _ => return several_upstreams(name, holders),
        };
        let Some(body) = open(&mirror.mirror.store, digest, 0, info.size) else {
            return unknown();
        };
        Response {
            status: (200, "OK"),
            headers: vec![
                ("Content-Type", info.media_type.clone()),
                ("Docker-Content-Digest", digest.to_string()),
                ("ETag", format!("\"{digest}\"")),
                (API_VERSION.0, API_VERSION.1.into()),
            ],
            body,
        }
    })
}

fn blob(
    mirror: &Scoped<'_>,
    name: &str,
    digest: &str,
    ns: Option<&str>,
    range: Option<&str>,
) -> Response {
    if let Err(e) = digest_form(digest) {
        return e;
    }
    with_holders(mirror, name, ns, |holders| {
        let unknown = || not_held("BLOB_UNKNOWN", format_args!("blob {digest}"));
        // The scope: only a digest this repository's content references.
        if !holders.iter().any(|h| h.references(digest)) {
            return unknown();
        }
        let Some(size) = mirror.mirror.store.blob_size(digest) else {
            return unknown();
        };
        let (status, first, len) = match range.map(|r| parse_range(r, size)) {
            None | Some(Ok(None)) => ((200, "OK"), 0, size),
            Some(Ok(Some((first, last)))) => ((206, "Partial Content"), first, last - first + 1),
            Some(Err(())) => {
                // RANGE_INVALID is distribution's code for 416 (the OCI table has
                // none for ranges); Content-Range says what is satisfiable.
                let mut r = error_response(
                    (416, "Range Not Satisfiable"),
                    "RANGE_INVALID",
                    &format!("requested range not satisfiable: the blob is {size} bytes"),
                );
                r.headers.push(("Content-Range", format!("bytes */{size}")));
                return r;
            }
        };
        let Some(body) = open(&mirror.mirror.store, digest, first, len) else {
            return unknown();
        };
        let mut headers = vec![
            ("Content-Type", "application/octet-stream".to_string()),
            ("Accept-Ranges", "bytes".to_string()),
            ("Docker-Content-Digest", digest.to_string()),
            ("ETag", format!("\"{digest}\"")),
            (API_VERSION.0, API_VERSION.1.to_string()),
        ];
        if status.0 == 206 {
            headers.push((
                "Content-Range",
                format!("bytes {first}-{}/{size}", first + len - 1),
            ));
        }
        Response {
            status,
            headers,
            body,
        }
    })
}

/// A body of `len` bytes of a verified blob from `offset`: small ones read
/// into memory, large ones left open for `sendfile` (with the kernel told to
/// read ahead). `None` when the blob is not there.
fn open(store: &Store, digest: &str, offset: u64, len: u64) -> Option<Body> {
    let path = store.blob_path(digest).ok()?;
    let file = File::open(path).ok()?;
    if len <= INLINE_BODY {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = file;
        let mut bytes = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(offset)).ok()?;
        file.read_exact(&mut bytes).ok()?;
        return Some(Body::Bytes(bytes));
    }
    if let (Ok(at), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        let _ = posix_fadvise(&file, at, n, PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
    }
    Some(Body::File { file, offset, len })
}

/// Parses a single `bytes=` range against a size: (first, last) inclusive.
/// `Err(())` means unsatisfiable; `Ok(None)` means no usable Range (serve all).
/// A last byte past the end (however large the number) is clamped to it.
#[allow(clippy::result_unit_err)]
fn parse_range(v: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Multipart ranges are not used by registry clients; serve everything.
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    // A run of digits too large for u64 is past any end.
    let number = |s: &str| -> Result<u64, ()> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(());
        }
        Ok(s.parse().unwrap_or(u64::MAX))
    };
    let (first, last) = if a.is_empty() {
        let n = number(b)?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
    } else {
        let first = number(a)?;
        let last = if b.is_empty() {
            size.checked_sub(1).ok_or(())?
        } else {
            let last = number(b)?;
            if last < first {
                return Err(());
            }
            last.min(size.saturating_sub(1))
        };
        (first, last)
    };
    if first >= size || first > last {
        return Err(());
    }
    Ok(Some((first, last)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths() {
        let check = |p: &str, want: Option<Route>| assert_eq!(parse_path(p), want, "{p}");
        check("/v2/", Some(Route::Base));
        check("/v2", Some(Route::Base));
        check(
            "/v2/demo/app/manifests/v1",
            Some(Route::Manifest {
                name: "demo/app".into(),
                reference: "v1".into(),
            }),
        );
        check(
            "/v2/a/manifests/b/manifests/c",
            Some(Route::Manifest {
                name: "a/manifests/b".into(),
                reference: "c".into(),
            }),
        );
        check(
            "/v2/x/y/z/blobs/sha256:ab",
            Some(Route::Blob {
                name: "x/y/z".into(),
                digest: "sha256:ab".into(),
            }),
        );
        check(
            "/v2/a/b/tags/list",
            Some(Route::Tags { name: "a/b".into() }),
        );
        check("/v2/../etc/manifests/x", None);
        check("/v2/A/manifests/x", None);
        check("/v3/a/manifests/x", None);
        check("/v2/a/other", None);
        check(
            "/v2/a/b/referrers/sha256:ab",
            Some(Route::Referrers {
                name: "a/b".into(),
                digest: "sha256:ab".into(),
            }),
        );
        check("/v2/a/referrers/", None);
        check("/v2/a/referrers/x/y", None);
    }

    #[test]
    fn parses_ranges() {
        let check = |v: &str, want: Result<Option<(u64, u64)>, ()>| {
            assert_eq!(parse_range(v, 100), want, "{v}")
        };
        check("bytes=0-", Ok(Some((0, 99))));
        check("bytes=10-19", Ok(Some((10, 19))));
        check("bytes=90-200", Ok(Some((90, 99))));
        check("bytes=0-18446744073709551616", Ok(Some((0, 99))));
        check("bytes=0-99999999999999999999999999", Ok(Some((0, 99))));
        check("bytes=-10", Ok(Some((90, 99))));
        check("bytes=-1000", Ok(Some((0, 99))));
        check("bytes=100-", Err(()));
        check("bytes=100-200", Err(()));
        check("bytes=18446744073709551616-", Err(()));
        check("bytes=20-10", Err(()));
        check("bytes=-0", Err(()));
        check("bytes=a-b", Err(()));
        check("bytes=1-+5", Err(()));
        check("items=0-1", Ok(None));
        check("bytes=0-1,5-6", Ok(None));
        assert_eq!(parse_range("bytes=0-", 0), Err(()));
    }

    #[test]
    fn pages_tags() {
        let all = ["a", "b", "c", "d", "e"];
        let check = |n: Option<usize>, last: Option<&str>, want: &[&str], more: bool| {
            let (page, m) = tags_page(all.iter().copied(), n, last);
            assert_eq!((page.as_slice(), m), (want, more), "n={n:?} last={last:?}");
        };
        check(None, None, &all, false);
        check(Some(2), None, &["a", "b"], true);
        check(Some(2), Some("b"), &["c", "d"], true);
        check(Some(2), Some("c"), &["d", "e"], false);
        check(Some(10), None, &all, false);
        check(Some(0), None, &[], false);
        check(None, Some("c"), &["d", "e"], false);
        check(None, Some("bb"), &["c", "d", "e"], false);
        check(Some(3), Some("e"), &[], false);
        let many: Vec<String> = (0..MAX_TAGS_PAGE + 5).map(|i| format!("t{i:05}")).collect();
        let (page, more) = tags_page(many.iter().map(String::as_str), Some(usize::MAX), None);
        assert_eq!(page.len(), MAX_TAGS_PAGE);
        assert!(more);
    }

    #[test]
    fn reads_query_parameters() {
        let q = Some("n=2&last=v1.0&ns=reg.example%3A5000&flag");
        assert_eq!(query_param(q, "n").as_deref(), Some("2"));
        assert_eq!(query_param(q, "last").as_deref(), Some("v1.0"));
        assert_eq!(query_param(q, "ns").as_deref(), Some("reg.example:5000"));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "x"), None);
        assert_eq!(query_param(None, "n"), None);
    }
}
