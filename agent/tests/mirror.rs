//! The mirror against real clients: skopeo inspect and copy give the
//! upstream's digests; 404s carry the OCI error JSON; Range works.

mod common;

use common::*;
use imgfleet_tests::images::{ImageSpec, LayerSpec, push_image, push_index};
use imgfleet_tests::registry::{Registry, RegistryOptions};
use imgfleet_tests::skopeo;

fn oci_index_digest(dir: &std::path::Path) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    v["manifests"][0]["digest"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn skopeo_sees_upstream_digests_single_and_multi_platform() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let single = push_image(
        &reg,
        "demo/app",
        "v1",
        &ImageSpec::random(&[300_000, 20_000], 11),
    )
    .await
    .unwrap();
    let spec = ImageSpec::random(&[150_000], 12).with_base(LayerSpec::shared(100_000, 13));
    let multi = push_index(
        &reg,
        "demo/multi",
        "v2",
        &[("linux", "amd64"), ("linux", "arm64")],
        &spec,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let reports = engine
        .sync(
            vec![
                desired(&reg.addr(), "demo/app", &single.manifest_digest, &["v1"]),
                desired(&reg.addr(), "demo/multi", &multi.index_digest, &["v2"]),
            ],
            None,
        )
        .await;
    for r in &reports {
        assert!(r.result.is_ok(), "{:?}", r.result);
    }
    let mirror = start_mirror(engine.store().clone()).await;
    let m = mirror.addr;
    let no_tls = ["--tls-verify=false"];

    for (repo, tag, want) in [
        ("demo/app", "v1", &single.manifest_digest),
        ("demo/multi", "v2", &multi.index_digest),
    ] {
        let upstream =
            skopeo::inspect_digest(&format!("docker://{}/{repo}:{tag}", reg.addr()), &no_tls)
                .await
                .unwrap();
        let mirrored = skopeo::inspect_digest(&format!("docker://{m}/{repo}:{tag}"), &no_tls)
            .await
            .unwrap();
        assert_eq!(&upstream, want);
        assert_eq!(&mirrored, want, "{repo}:{tag} from the mirror");
    }

    // Copies keep the digests: single image, and the whole index with --all.
    let out = tempfile::tempdir().unwrap();
    let single_dir = out.path().join("single");
    skopeo::copy(
        &format!("docker://{m}/demo/app:v1"),
        &format!("oci:{}:v1", single_dir.display()),
        &["--src-tls-verify=false"],
    )
    .await
    .unwrap();
    assert_eq!(oci_index_digest(&single_dir), single.manifest_digest);
    let multi_dir = out.path().join("multi");
    skopeo::copy(
        &format!("docker://{m}/demo/multi:v2"),
        &format!("oci:{}:v2", multi_dir.display()),
        &["--src-tls-verify=false", "--all"],
    )
    .await
    .unwrap();
    assert_eq!(oci_index_digest(&multi_dir), multi.index_digest);
    let mut got = skopeo::oci_layout_blobs(&multi_dir).unwrap();
    got.sort();
    for d in multi.blob_digests() {
        assert!(got.contains(&d), "{d} missing from the copy");
    }

    // By digest too, and tags/list.
    let by_digest = skopeo::inspect_digest(
        &format!("docker://{m}/demo/app@{}", single.manifest_digest),
        &no_tls,
    )
    .await
    .unwrap();
    assert_eq!(by_digest, single.manifest_digest);
    let tags = skopeo::list_tags(&format!("docker://{m}/demo/multi"), &no_tls)
        .await
        .unwrap();
    assert_eq!(tags, vec!["v2".to_string()]);
}

#[tokio::test]
async fn http_answers_headers_ranges_and_oci_errors() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push_image(&reg, "demo/app", "v1", &ImageSpec::random(&[100_000], 14))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    engine
        .sync_image(
            &desired(&reg.addr(), "demo/app", &pushed.manifest_digest, &["v1"]),
            None,
        )
        .await
        .unwrap();
    let mirror = start_mirror(engine.store().clone()).await;
    let base = format!("http://{}", mirror.addr);
    let http = reqwest::Client::new();

    let r = http.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );

    let r = http
        .head(format!("{base}/v2/demo/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        pushed.manifest_digest.as_str()
    );
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        pushed.manifest_bytes.len().to_string()
    );

    // ?ns= selects the upstream; a wrong one is unknown.
    let r = http
        .get(format!("{base}/v2/demo/app/manifests/v1?ns={}", reg.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        pushed.manifest_bytes.as_slice()
    );
    let r = http
        .get(format!("{base}/v2/demo/app/manifests/v1?ns=other.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let layer = &pushed.layer_digests[0];
    let full = http
        .get(format!("{base}/v2/demo/app/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(full.status(), 200);
    let full = full.bytes().await.unwrap();
    assert_eq!(imgfleet_tests::images::sha256_digest(&full), *layer);
    let part = http
        .get(format!("{base}/v2/demo/app/blobs/{layer}"))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"].to_str().unwrap(),
        format!("bytes 1000-1999/{}", full.len())
    );
    assert_eq!(part.bytes().await.unwrap().as_ref(), &full[1000..2000]);

    for (path, code) in [
        ("/v2/demo/app/manifests/nope", "MANIFEST_UNKNOWN"),
        (
            "/v2/demo/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "BLOB_UNKNOWN",
        ),
        ("/v2/not/here/manifests/v1", "NAME_UNKNOWN"),
        ("/v2/not/here/tags/list", "NAME_UNKNOWN"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], code, "{path}: {v}");
    }
}

#[tokio::test]
async fn repository_held_from_two_upstreams_needs_ns() {
    let a = Registry::start(RegistryOptions::plain()).await.unwrap();
    let b = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pa = push_image(&a, "shared/app", "v1", &ImageSpec::random(&[10_000], 15))
        .await
        .unwrap();
    let pb = push_image(&b, "shared/app", "v1", &ImageSpec::random(&[10_000], 16))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    for (reg, p) in [(&a, &pa), (&b, &pb)] {
        engine
            .sync_image(
                &desired(&reg.addr(), "shared/app", &p.manifest_digest, &["v1"]),
                None,
            )
            .await
            .unwrap();
    }
    let mirror = start_mirror(engine.store().clone()).await;
    let base = format!("http://{}", mirror.addr);
    let r = reqwest::get(format!("{base}/v2/shared/app/manifests/v1"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let text = r.text().await.unwrap();
    assert!(text.contains("several upstreams"), "{text}");
    for (reg, p) in [(&a, &pa), (&b, &pb)] {
        let r = reqwest::get(format!(
            "{base}/v2/shared/app/manifests/v1?ns={}",
            reg.addr()
        ))
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["docker-content-digest"],
            p.manifest_digest.as_str()
        );
    }
}
