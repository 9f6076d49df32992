//! The registry client against a real docker-registry (anonymous and basic
//! auth) and against a small in-process server for what distribution 2.8
//! cannot show without a token service: the bearer flow, 429, oversized and
//! mismatching manifests, and tag pagination.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use imgfleet_common::registry::{
    Credentials, RegistryClient, RegistryConfig, RegistryError, sha256_digest,
};
use imgfleet_tests::images::{ImageSpec, push_image};
use imgfleet_tests::registry::{Registry, RegistryOptions};

fn client(host: &str, creds: Option<(&str, &str)>) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        host: host.to_string(),
        credentials: creds.map(|(u, p)| Credentials::new(u, p)),
        insecure: true,
        ..RegistryConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn real_registry_with_basic_auth() {
    let reg = Registry::start(RegistryOptions::plain().with_auth("u1", "pw-777"))
        .await
        .unwrap();
    let pushed = push_image(&reg, "demo/app", "v1", &ImageSpec::random(&[50_000], 1))
        .await
        .unwrap();
    push_image(&reg, "demo/app", "v2", &ImageSpec::random(&[50_000], 2))
        .await
        .unwrap();

    let c = client(&reg.addr(), Some(("u1", "pw-777")));
    c.ping().await.unwrap();
    assert_eq!(
        c.resolve_tag("demo/app", "v1").await.unwrap(),
        pushed.manifest_digest
    );
    let m = c
        .get_manifest("demo/app", &pushed.manifest_digest)
        .await
        .unwrap();
    assert_eq!(m.digest, pushed.manifest_digest);
    assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");
    let mut tags = c.list_tags("demo/app").await.unwrap();
    tags.sort();
    assert_eq!(tags, vec!["v1", "v2"]);

    // A blob from an offset: 206 and the right bytes.
    let layer = &pushed.layer_digests[0];
    let mut full = Vec::new();
    let mut s = c.get_blob("demo/app", layer, 0).await.unwrap();
    while let Some(b) = s.chunk().await.unwrap() {
        full.extend_from_slice(&b);
    }
    assert_eq!(sha256_digest(&full), *layer);
    let mut s = c.get_blob("demo/app", layer, 1000).await.unwrap();
    assert_eq!(s.start, 1000);
    let mut rest = Vec::new();
    while let Some(b) = s.chunk().await.unwrap() {
        rest.extend_from_slice(&b);
    }
    assert_eq!(rest, full[1000..]);

    let e = c.get_manifest("demo/app", "nope").await.unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    assert!(!e.is_retryable());

    let bad = client(&reg.addr(), Some(("u1", "wrong-pass-9")));
    let e = bad.ping().await.unwrap_err();
    assert!(matches!(e, RegistryError::AuthFailed { .. }), "{e}");
    assert!(!format!("{e} {e:?} {bad:?}").contains("wrong-pass-9"));
    let anon = client(&reg.addr(), None);
    assert!(matches!(
        anon.ping().await.unwrap_err(),
        RegistryError::AuthFailed { .. }
    ));

    // Unreachable is retryable.
    let port = imgfleet_tests::process::free_port();
    let e = client(&format!("127.0.0.1:{port}"), None)
        .ping()
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Unreachable { .. }) && e.is_retryable(),
        "{e}"
    );
}

#[derive(Default)]
struct Fake {
    token_requests: AtomicUsize,
    base: std::sync::Mutex<String>,
}

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;

async fn fake(State(f): State<Arc<Fake>>, headers: HeaderMap, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let base = f.base.lock().unwrap().clone();
    if path == "/token" {
        f.token_requests.fetch_add(1, Ordering::SeqCst);
        // "alice:secret" in base64.
        if auth != "Basic YWxpY2U6c2VjcmV0" {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        assert!(query.contains("service=fake"), "{query}");
        return r#"{"token":"tok-1","expires_in":300}"#.into_response();
    }
    if auth != "Bearer tok-1" {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                "www-authenticate",
                format!(
                    r#"Bearer realm="{base}/token",service="fake",scope="repository:demo/app:pull""#
                ),
            )],
        )
            .into_response();
    }
    match path.as_str() {
        "/v2/demo/app/manifests/v1" => (
            [("content-type", "application/vnd.oci.image.manifest.v1+json")],
            MANIFEST,
        )
            .into_response(),
        "/v2/demo/app/manifests/huge" => (
            [("content-type", "application/vnd.oci.image.manifest.v1+json")],
            vec![b' '; 5 * 1024 * 1024],
        )
            .into_response(),
        "/v2/demo/app/manifests/limited" => {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "7")]).into_response()
        }
        "/v2/demo/app/tags/list" if !query.contains("last=") => (
            [(
                "link",
                r#"</v2/demo/app/tags/list?n=2&last=b>; rel="next""#.to_string(),
            )],
            r#"{"name":"demo/app","tags":["a","b"]}"#,
        )
            .into_response(),
        "/v2/demo/app/tags/list" => r#"{"name":"demo/app","tags":["c"]}"#.into_response(),
        p if p.starts_with("/v2/demo/app/manifests/sha256:") => (
            [("content-type", "application/vnd.oci.image.manifest.v1+json")],
            MANIFEST,
        )
            .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::test]
async fn bearer_flow_limits_and_pagination() {
    let state = Arc::new(Fake::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    *state.base.lock().unwrap() = format!("http://{addr}");
    let app = Router::new().fallback(fake).with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let c = client(&addr.to_string(), Some(("alice", "secret")));
    let m = c.get_manifest("demo/app", "v1").await.unwrap();
    assert_eq!(m.digest, sha256_digest(MANIFEST));
    // The token is cached per scope: a second request fetches none.
    c.get_manifest("demo/app", "v1").await.unwrap();
    assert_eq!(state.token_requests.load(Ordering::SeqCst), 1);

    let e = c.get_manifest("demo/app", "huge").await.unwrap_err();
    assert!(matches!(e, RegistryError::TooLarge { .. }), "{e}");
    let e = c.get_manifest("demo/app", "limited").await.unwrap_err();
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    let wrong = format!("sha256:{}", "1".repeat(64));
    let e = c.get_manifest("demo/app", &wrong).await.unwrap_err();
    assert!(
        matches!(e, RegistryError::DigestMismatch { .. }) && !e.is_retryable(),
        "{e}"
    );
    assert_eq!(c.list_tags("demo/app").await.unwrap(), vec!["a", "b", "c"]);

    let bad = client(&addr.to_string(), Some(("alice", "nope")));
    let e = bad.get_manifest("demo/app", "v1").await.unwrap_err();
    assert!(matches!(e, RegistryError::AuthFailed { .. }), "{e}");
}

#[tokio::test]
async fn tls_registry_with_extra_ca_root() {
    let reg = Registry::start(RegistryOptions::plain().with_tls())
        .await
        .unwrap();
    let pushed = push_image(&reg, "demo/tls", "v1", &ImageSpec::random(&[10_000], 3))
        .await
        .unwrap();
    let ca = reg.ca_pem().unwrap().as_bytes().to_vec();
    let c = RegistryClient::new(RegistryConfig {
        host: reg.addr(),
        extra_roots_pem: vec![ca],
        ..RegistryConfig::default()
    })
    .unwrap();
    assert_eq!(
        c.resolve_tag("demo/tls", "v1").await.unwrap(),
        pushed.manifest_digest
    );
    // Without the CA the certificate is refused.
    let untrusted = RegistryClient::new(RegistryConfig {
        host: reg.addr(),
        ..RegistryConfig::default()
    })
    .unwrap();
    let e = untrusted.ping().await.unwrap_err();
    assert!(matches!(e, RegistryError::Unreachable { .. }), "{e}");
}
