//! The mirror: a read-only OCI distribution API over the content store, for
//! containerd on the cluster's nodes (and any registry client).
//!
//! Only recorded manifests and complete, verified blobs are served, so a node
//! never pulls half an image. `?ns=<upstream host>` (which containerd adds when
//! it uses a mirror) selects the upstream registry; without it, a repository
//! is served when exactly one upstream holds it.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use imgfleet_common::registry::sha256_hex;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Builds the mirror's router over a store.
pub fn router(store: Arc<Store>) -> Router {
    Router::new().fallback(handle).with_state(store)
}

/// Serves the mirror on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?local, "Mirror listening");
    axum::serve(listener, router(store))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// What a request path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Base,
    Manifest { name: String, reference: String },
    Blob { name: String, digest: String },
    Tags { name: String },
}

/// Parses `/v2/...` by hand: repository names contain slashes, so only the
/// last `/manifests/`, `/blobs/` or `/tags/list` splits name from the rest.
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
    if let Some(i) = rest.rfind("/blobs/") {
        let (name, digest) = (&rest[..i], &rest[i + "/blobs/".len()..]);
        return (valid_name(name) && !digest.contains('/')).then(|| Route::Blob {
            name: name.into(),
            digest: digest.into(),
        });
    }
    None
}

/// An OCI distribution error answer: status plus `{"errors":[{code,message}]}`.
#[derive(Debug)]
struct OciError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for OciError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"errors": [{"code": self.code, "message": self.message, "detail": null}]});
        (
            self.status,
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    header::HeaderName::from_static("docker-distribution-api-version"),
                    HeaderValue::from_static("registry/2.0"),
                ),
            ],
            body.to_string(),
        )
            .into_response()
    }
}

fn oci_error(status: StatusCode, code: &'static str, message: &str) -> OciError {
    OciError {
        status,
        code,
        message: message.to_string(),
    }
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%3A", ":").replace("%3a", ":"))
    })
}

/// Which upstream registry serves `name`: the `ns` one, or the only one.
fn pick_registry(store: &Store, name: &str, ns: Option<String>) -> Result<String, OciError> {
    let holders = store.registries_for(name);
    let unknown = || {
        oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            &format!("repository {name} is not held by this mirror"),
        )
    };
    match ns {
        Some(ns) => {
            let ns = if ns == "docker.io" || ns == "index.docker.io" || ns == "registry-1.docker.io"
            {
                holders
                    .iter()
                    .find(|h| {
                        matches!(
                            h.as_str(),
                            "docker.io" | "index.docker.io" | "registry-1.docker.io"
                        )
                    })
                    .cloned()
                    .unwrap_or(ns)
            } else {
                ns
            };
            if holders.contains(&ns) {
                Ok(ns)
            } else {
                Err(unknown())
            }
        }
        None => match holders.as_slice() {
            [] => Err(unknown()),
            [one] => Ok(one.clone()),
            many => Err(oci_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                &format!(
                    "repository {name} is held from several upstreams ({}); add ?ns=<upstream host>",
                    many.join(", ")
                ),
            )),
        },
    }
}

async fn handle(State(store): State<Arc<Store>>, req: Request) -> Response {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return oci_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this mirror is read-only",
        )
        .into_response();
    }
    let head = method == Method::HEAD;
    let ns = query_param(req.uri().query(), "ns");
    let Some(route) = parse_path(req.uri().path()) else {
        return oci_error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown path").into_response();
    };
    let store2 = store.clone();
    let headers = req.headers().clone();
    // The store's reads are small blocking file operations.
    let prepared = tokio::task::spawn_blocking(move || prepare(&store2, route, ns)).await;
    let prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return e.into_response(),
        Err(_) => {
            return oci_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "internal error",
            )
            .into_response();
        }
    };
    match prepared {
        Prepared::Base => (
            StatusCode::OK,
            [
                ("content-type", "application/json"),
                ("docker-distribution-api-version", "registry/2.0"),
            ],
            "{}",
        )
            .into_response(),
        Prepared::Json(body) => {
            let len = body.len();
            let mut resp = Response::new(if head {
                Body::empty()
            } else {
                Body::from(body)
            });
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            resp
        }
        Prepared::Manifest {
            bytes,
            media_type,
            digest,
        } => {
            let len = bytes.len();
            let mut resp = Response::new(if head {
                Body::empty()
            } else {
                Body::from(bytes)
            });
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&media_type) {
                h.insert(header::CONTENT_TYPE, v);
            }
            if let Ok(v) = HeaderValue::from_str(&digest) {
                h.insert("docker-content-digest", v.clone());
                h.insert(
                    header::ETAG,
                    HeaderValue::from_str(&format!("\"{digest}\"")).unwrap_or(v),
                );
            }
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            h.insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            resp
        }
        Prepared::Blob { path, size, digest } => {
            serve_blob(path, size, &digest, &headers, head).await
        }
    }
}

enum Prepared {
    Base,
    Json(String),
    Manifest {
        bytes: Vec<u8>,
        media_type: String,
        digest: String,
    },
    Blob {
        path: std::path::PathBuf,
        size: u64,
        digest: String,
    },
}

fn prepare(store: &Store, route: Route, ns: Option<String>) -> Result<Prepared, OciError> {
    match route {
        Route::Base => Ok(Prepared::Base),
        Route::Tags { name } => {
            let registry = pick_registry(store, &name, ns)?;
            let tags = store.tags(&registry, &name);
            Ok(Prepared::Json(
                serde_json::json!({"name": name, "tags": tags}).to_string(),
            ))
        }
        Route::Manifest { name, reference } => {
            let registry = pick_registry(store, &name, ns)?;
            let unknown = || {
                oci_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    &format!("manifest {name}:{reference} is not held by this mirror"),
                )
            };
            if reference.contains(':') && sha256_hex(&reference).is_none() {
                return Err(oci_error(
                    StatusCode::BAD_REQUEST,
                    "DIGEST_INVALID",
                    "expected a digest of the form sha256:<64 hex>",
                ));
            }
            let record = store
                .find_manifest(&registry, &name, &reference)
                .ok_or_else(unknown)?;
            let bytes = store.read_blob(&record.digest).map_err(|_| unknown())?;
            Ok(Prepared::Manifest {
                bytes,
                media_type: record.media_type,
                digest: record.digest,
            })
        }
        Route::Blob { name, digest } => {
            let _registry = pick_registry(store, &name, ns)?;
            let unknown = || {
                oci_error(
                    StatusCode::NOT_FOUND,
                    "BLOB_UNKNOWN",
                    &format!("blob {digest} is not held by this mirror"),
                )
            };
            if sha256_hex(&digest).is_none() {
                return Err(oci_error(
                    StatusCode::BAD_REQUEST,
                    "DIGEST_INVALID",
                    "expected a digest of the form sha256:<64 hex>",
                ));
            }
            let size = store.blob_size(&digest).ok_or_else(unknown)?;
            let path = store.blob_path(&digest).map_err(|_| unknown())?;
            Ok(Prepared::Blob { path, size, digest })
        }
    }
}

/// Parses a single `bytes=` range against a size: (first, last) inclusive.
/// `Err(())` means unsatisfiable; `Ok(None)` means no usable Range (serve all).
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
    let (first, last) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
    } else {
        let first: u64 = a.parse().map_err(|_| ())?;
        let last = if b.is_empty() {
            size.checked_sub(1).ok_or(())?
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        (first, last)
    };
    if first >= size || first > last {
        return Err(());
    }
    Ok(Some((first, last)))
}

async fn serve_blob(
    path: std::path::PathBuf,
    size: u64,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, size))
        .unwrap_or(Ok(None));
    let (status, first, len) = match range {
        Ok(Some((first, last))) => (StatusCode::PARTIAL_CONTENT, first, last - first + 1),
        Ok(None) => (StatusCode::OK, 0, size),
        Err(()) => {
            let mut resp = oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UNKNOWN",
                "requested range not satisfiable",
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
    };
    let body = if head {
        Body::empty()
    } else {
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(_) => {
                return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob vanished")
                    .into_response();
            }
        };
        if first > 0 && file.seek(std::io::SeekFrom::Start(first)).await.is_err() {
            return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", "seek failed")
                .into_response();
        }
        Body::from_stream(ReaderStream::with_capacity(file.take(len), 256 * 1024))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(digest) {
        h.insert("docker-content-digest", v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{}/{size}", first + len - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
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
    }

    #[test]
    fn parses_ranges() {
        let check = |v: &str, want: Result<Option<(u64, u64)>, ()>| {
            assert_eq!(parse_range(v, 100), want, "{v}")
        };
        check("bytes=0-", Ok(Some((0, 99))));
        check("bytes=10-19", Ok(Some((10, 19))));
        check("bytes=90-200", Ok(Some((90, 99))));
        check("bytes=-10", Ok(Some((90, 99))));
        check("bytes=100-", Err(()));
        check("bytes=20-10", Err(()));
        check("items=0-1", Ok(None));
        check("bytes=0-1,5-6", Ok(None));
    }
}
