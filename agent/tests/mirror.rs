//! The mirror against real clients: skopeo inspect and copy give the
//! upstream's digests; 404s carry the OCI error JSON; Range works.

mod common;

use common::*;
use imgfleet_tests::images::{ImageSpec, LayerSpec, push_image};
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
    let single = push(
        &reg,
        "demo/app",
        "v1",
        &ImageSpec::random(&[300_000, 20_000], 11),
    )
    .await;
    let spec = ImageSpec::random(&[150_000], 12).with_base(LayerSpec::shared(100_000, 13));
    let multi = push_two_platforms(&reg, "demo/multi", "v2", &spec).await;
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
    let pushed = push(&reg, "demo/app", "v1", &ImageSpec::random(&[100_000], 14)).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    sync_v1(&engine, &reg, "demo/app", &pushed).await;
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

/// `GET` a path of the mirror; returns status, headers and body.
async fn get(
    base: &str,
    path: &str,
    range: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.unwrap().to_vec())
}

fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn tags_list_pages_with_n_last_and_link() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push(&reg, "demo/app", "a", &ImageSpec::random(&[5_000], 21)).await;
    let target = imgfleet_tests::images::PushTarget::from(&reg);
    let tags = ["a", "b", "c", "d", "e"];
    for t in &tags[1..] {
        target
            .push_manifest(
                "demo/app",
                t,
                imgfleet_tests::images::MANIFEST_MEDIA_TYPE,
                &pushed.manifest_bytes,
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    engine
        .sync_image(
            &desired(&reg.addr(), "demo/app", &pushed.manifest_digest, &tags),
            None,
        )
        .await
        .unwrap();
    let mirror = start_mirror(engine.store().clone()).await;
    let base = format!("http://{}", mirror.addr);
    let list = |body: &[u8]| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        serde_json::from_value(v["tags"].clone()).unwrap()
    };

    // Follow the Link headers two at a time: every tag once, in order.
    let mut path = "/v2/demo/app/tags/list?n=2".to_string();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (status, headers, body) = get(&base, &path, None).await;
        assert_eq!(status, 200, "{path}");
        let page = list(&body);
        assert!(page.len() <= 2, "{path}: {page:?}");
        seen.extend(page);
        pages += 1;
        match headers.get("link").map(|v| v.to_str().unwrap().to_string()) {
            Some(link) => {
                assert!(link.ends_with(">; rel=\"next\""), "{link}");
                path = link
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_string();
            }
            None => break,
        }
    }
    assert_eq!(seen, tags, "paging by Link gives every tag once, in order");
    assert_eq!(pages, 3);

    // `last` is exclusive, with or without n; n=0 is empty and has no Link.
    let (_, h, body) = get(&base, "/v2/demo/app/tags/list?last=b", None).await;
    assert_eq!(list(&body), ["c", "d", "e"]);
    assert!(h.get("link").is_none());
    let (_, h, body) = get(&base, "/v2/demo/app/tags/list?n=2&last=c", None).await;
    assert_eq!(list(&body), ["d", "e"]);
    assert!(h.get("link").is_none(), "nothing follows e");
    let (_, h, body) = get(&base, "/v2/demo/app/tags/list?n=0", None).await;
    assert_eq!(list(&body), Vec::<String>::new());
    assert!(h.get("link").is_none());
    // Skopeo (which pages on its own) sees them all.
    let all = skopeo::list_tags(
        &format!("docker://{}/demo/app", mirror.addr),
        &["--tls-verify=false"],
    )
    .await
    .unwrap();
    assert_eq!(all, tags);

    // A bad n is refused with a clear error.
    for bad in ["-1", "two", "1.5"] {
        let (status, _, body) = get(&base, &format!("/v2/demo/app/tags/list?n={bad}"), None).await;
        assert_eq!(status, 400, "n={bad}");
        assert_eq!(error_code(&body), "PAGINATION_NUMBER_INVALID");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains(&format!("n=\\\"{bad}\\\"")), "{text}");
    }
}

#[tokio::test]
async fn content_is_served_only_under_the_repository_that_references_it() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let a = push(&reg, "team-a/app", "v1", &ImageSpec::random(&[20_000], 31)).await;
    let b = push(
        &reg,
        "team-b/secret",
        "v1",
        &ImageSpec::random(&[30_000], 32),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    for (repo, p) in [("team-a/app", &a), ("team-b/secret", &b)] {
        engine
            .sync_image(
                &desired(&reg.addr(), repo, &p.manifest_digest, &["v1"]),
                None,
            )
            .await
            .unwrap();
    }
    let mirror = start_mirror(engine.store().clone()).await;
    let base = format!("http://{}", mirror.addr);
    let ns = format!("?ns={}", reg.addr());

    // Under its own repository, team-b's content is served.
    let (status, _, body) = get(
        &base,
        &format!("/v2/team-b/secret/blobs/{}", b.config_digest),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        imgfleet_tests::images::sha256_digest(&body),
        b.config_digest
    );

    // Under team-a's, every piece of it is unknown, with or without ns:
    // exactly the answer for a digest nobody holds.
    for suffix in ["", ns.as_str()] {
        for d in b.blob_digests() {
            let (status, _, body) =
                get(&base, &format!("/v2/team-a/app/blobs/{d}{suffix}"), None).await;
            assert_eq!(status, 404, "team-b's blob {d} under team-a");
            assert_eq!(error_code(&body), "BLOB_UNKNOWN");
        }
        let (status, _, body) = get(
            &base,
            &format!("/v2/team-a/app/manifests/{}{suffix}", b.manifest_digest),
            None,
        )
        .await;
        assert_eq!(status, 404, "team-b's manifest under team-a");
        assert_eq!(error_code(&body), "MANIFEST_UNKNOWN");
        let head = reqwest::Client::new()
            .head(format!(
                "{base}/v2/team-a/app/blobs/{}{suffix}",
                b.layer_digests[0]
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 404);
    }
    // A repository name nobody synced is unknown, tags/list included.
    for path in [
        format!("/v2/team-b/other/blobs/{}", b.config_digest),
        "/v2/team-b/other/tags/list".to_string(),
        format!("/v2/team-b/secret/blobs/{}{ns}x", b.config_digest),
    ] {
        let (status, _, body) = get(&base, &path, None).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(error_code(&body), "NAME_UNKNOWN", "{path}");
    }
    // skopeo cannot assemble team-b's image under team-a's name either.
    let err = skopeo::inspect_digest(
        &format!("docker://{}/team-a/app@{}", mirror.addr, b.manifest_digest),
        &["--tls-verify=false"],
    )
    .await;
    assert!(err.is_err(), "skopeo read team-b's manifest under team-a");
}

#[tokio::test]
async fn digests_are_served_without_ns_when_two_upstreams_hold_the_name() {
    let a = Registry::start(RegistryOptions::plain()).await.unwrap();
    let b = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pa = push_image(&a, "shared/app", "v1", &ImageSpec::random(&[40_000], 33))
        .await
        .unwrap();
    let pb = push_image(&b, "shared/app", "v2", &ImageSpec::random(&[50_000], 34))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    for (reg, p, tag) in [(&a, &pa, "v1"), (&b, &pb, "v2")] {
        engine
            .sync_image(
                &desired(&reg.addr(), "shared/app", &p.manifest_digest, &[tag]),
                None,
            )
            .await
            .unwrap();
    }
    let mirror = start_mirror(engine.store().clone()).await;
    let base = format!("http://{}", mirror.addr);
    // By digest, each upstream's content is served without ns: skopeo and
    // podman send none.
    for p in [&pa, &pb] {
        let digest = skopeo::inspect_digest(
            &format!("docker://{}/shared/app@{}", mirror.addr, p.manifest_digest),
            &["--tls-verify=false"],
        )
        .await
        .unwrap();
        assert_eq!(digest, p.manifest_digest);
        let out = tempfile::tempdir().unwrap();
        skopeo::copy(
            &format!("docker://{}/shared/app@{}", mirror.addr, p.manifest_digest),
            &format!("oci:{}:x", out.path().join("img").display()),
            &["--src-tls-verify=false"],
        )
        .await
        .unwrap();
        let mut got = skopeo::oci_layout_blobs(&out.path().join("img")).unwrap();
        got.sort();
        for d in p.blob_digests() {
            assert!(got.contains(&d), "{d} missing from the copy");
        }
    }
    // A tag that only one upstream holds is served too; ns still selects.
    let (status, h, _) = get(&base, "/v2/shared/app/manifests/v2", None).await;
    assert_eq!(status, 200);
    assert_eq!(h["docker-content-digest"], pb.manifest_digest.as_str());
    let (status, _, _) = get(
        &base,
        &format!("/v2/shared/app/manifests/v2?ns={}", a.addr()),
        None,
    )
    .await;
    assert_eq!(status, 404, "upstream a has no v2");
    // A digest of one upstream asked for with the other's ns is not served.
    let (status, _, _) = get(
        &base,
        &format!("/v2/shared/app/blobs/{}?ns={}", pa.config_digest, b.addr()),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn ranges_past_the_end_are_416_and_huge_ends_are_clamped() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push(&reg, "demo/app", "v1", &ImageSpec::random(&[70_000], 35)).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    sync_v1(&engine, &reg, "demo/app", &pushed).await;
    let mirror = start_mirror(engine.store().clone()).await;
    let base = format!("http://{}", mirror.addr);
    let layer = &pushed.layer_digests[0];
    let size = pushed.layer_sizes[0];
    let path = format!("/v2/demo/app/blobs/{layer}");
    let (_, _, full) = get(&base, &path, None).await;
    assert_eq!(full.len() as u64, size);

    for range in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 10, size + 20),
        "bytes=20-10".into(),
    ] {
        let (status, h, body) = get(&base, &path, Some(&range)).await;
        assert_eq!(status, 416, "{range}");
        assert_eq!(error_code(&body), "RANGE_INVALID", "{range}");
        assert_eq!(
            h["content-range"].to_str().unwrap(),
            format!("bytes */{size}")
        );
    }
    for (range, first) in [
        ("bytes=0-18446744073709551616".to_string(), 0),
        (format!("bytes=100-{}", u64::MAX), 100),
        ("bytes=-1000".to_string(), size - 1000),
    ] {
        let (status, h, body) = get(&base, &path, Some(&range)).await;
        assert_eq!(status, 206, "{range}");
        assert_eq!(
            h["content-range"].to_str().unwrap(),
            format!("bytes {first}-{}/{size}", size - 1),
            "{range}"
        );
        assert_eq!(body, &full[first as usize..], "{range}");
    }
    // A range of a large blob goes by sendfile from its offset.
    let (status, _, body) = get(&base, &path, Some("bytes=30000-59999")).await;
    assert_eq!(status, 206);
    assert_eq!(body, &full[30000..60000]);
}
