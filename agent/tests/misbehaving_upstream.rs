//! Engine behaviour that a well-behaved docker-registry cannot show, against a
//! small in-process upstream: 429 with Retry-After, a body cut mid-blob
//! followed by a 200 that ignores Range, and a manifest that is not what its
//! digest says.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::*;
use imgfleet_common::registry::sha256_digest;

struct Upstream {
    manifest: Vec<u8>,
    config: Vec<u8>,
    layer: Vec<u8>,
    blob_requests: AtomicUsize,
    /// Serve this instead of the manifest (a wrong manifest).
    tampered_manifest: Option<Vec<u8>>,
}

fn upstream(tamper: bool) -> Arc<Upstream> {
    let layer: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256_digest(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let tampered_manifest = tamper.then(|| {
        let mut m = manifest.clone();
        m.push(b' ');
        m
    });
    Arc::new(Upstream {
        manifest,
        config,
        layer,
        blob_requests: AtomicUsize::new(0),
        tampered_manifest,
    })
}

async fn serve(State(u): State<Arc<Upstream>>, req: Request) -> Response {
    let path = req.uri().path();
    let manifest_path = format!("/v2/demo/app/manifests/{}", sha256_digest(&u.manifest));
    if path == manifest_path {
        let body = u
            .tampered_manifest
            .clone()
            .unwrap_or_else(|| u.manifest.clone());
        return (
            [("content-type", "application/vnd.oci.image.manifest.v1+json")],
            body,
        )
            .into_response();
    }
    if path == format!("/v2/demo/app/blobs/{}", sha256_digest(&u.config)) {
        return u.config.clone().into_response();
    }
    if path == format!("/v2/demo/app/blobs/{}", sha256_digest(&u.layer)) {
        let n = u.blob_requests.fetch_add(1, Ordering::SeqCst);
        match n {
            // First: rate limited.
            0 => return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response(),
            // Second: half the body, then the connection breaks.
            1 => {
                let half = Bytes::copy_from_slice(&u.layer[..u.layer.len() / 2]);
                let stream = futures::stream::iter(vec![
                    Ok::<Bytes, std::io::Error>(half),
                    Err(std::io::Error::other("cut")),
                ]);
                let mut resp = Response::new(Body::from_stream(stream));
                resp.headers_mut()
                    .insert("content-length", u.layer.len().to_string().parse().unwrap());
                return resp;
            }
            // Then: Range is ignored, the whole blob comes with 200.
            _ => return u.layer.clone().into_response(),
        }
    }
    StatusCode::NOT_FOUND.into_response()
}

async fn start(u: Arc<Upstream>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(serve).with_state(u);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr.to_string()
}

#[tokio::test]
async fn rate_limit_cut_and_ignored_range_still_complete() {
    let u = upstream(false);
    let addr = start(u.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let start = Instant::now();
    let stats = engine
        .sync_image(
            &desired(&addr, "demo/app", &sha256_digest(&u.manifest), &["v1"]),
            None,
        )
        .await
        .unwrap();
    // Retry-After: 1 was honoured (the engine's own backoff starts at 50 ms here).
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(u.blob_requests.load(Ordering::SeqCst), 3);
    let layer = sha256_digest(&u.layer);
    assert!(engine.store().has_blob(&layer));
    assert_eq!(
        std::fs::read(engine.store().blob_path(&layer).unwrap()).unwrap(),
        u.layer
    );
    // Half, then the whole blob again because Range was ignored.
    assert!(stats.bytes_fetched >= (u.layer.len() + u.layer.len() / 2) as u64 - 100_000);
}

#[tokio::test]
async fn manifest_not_matching_its_digest_is_refused() {
    let u = upstream(true);
    let addr = start(u.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let digest = sha256_digest(&u.manifest);
    let err = engine
        .sync_image(&desired(&addr, "demo/app", &digest, &["v1"]), None)
        .await
        .unwrap_err();
    assert!(err.is_digest_mismatch(), "{err}");
    assert!(!err.is_retryable());
    assert!(!engine.store().has_blob(&digest));
    assert!(engine.store().records().is_empty());
}
