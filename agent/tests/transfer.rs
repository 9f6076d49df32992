//! Transfer engine against the real docker-registry: platforms, dedup,
//! resume after a cut and after a restart, corrupt partials, tampered
//! upstream blobs, no-op re-sync, basic auth, the bandwidth limit, nested
//! indexes, descriptor sizes checked against stored blobs, and the
//! minimum-progress timeout on a trickling upstream.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use imgfleet_agent::transfer::{EngineConfig, Phase, TransferError};
use imgfleet_common::registry::{Credentials, MinProgress};
use imgfleet_tests::fault::FaultProxy;
use imgfleet_tests::images::{ImageSpec, LayerSpec, push_image, push_index};
use imgfleet_tests::registry::{Registry, RegistryOptions};

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn syncs_image_and_noop_resync_makes_no_requests() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push(
        &reg,
        "demo/app",
        "v1",
        &ImageSpec::random(&[2 * MIB, 300_000], 1),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let img = desired(&reg.addr(), "demo/app", &pushed.manifest_digest, &["v1"]);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stats = engine.sync_image(&img, Some(tx)).await.unwrap();
    assert_eq!(stats.blobs_total, 3);
    assert_eq!(stats.blobs_fetched, 3);
    assert_eq!(stats.bytes_total, pushed.total_size);
    for d in pushed.blob_digests() {
        assert!(engine.store().has_blob(&d), "{d} missing");
    }
    let rec = engine
        .store()
        .find_manifest(&reg.addr(), "demo/app", "v1")
        .unwrap();
    assert_eq!(rec.digest, pushed.manifest_digest);
    let mut last = None;
    while let Ok(p) = rx.try_recv() {
        last = Some(p);
    }
    let last = last.unwrap();
    assert_eq!(last.phase, Phase::Synced);
    assert_eq!(last.bytes_done, last.bytes_total);
    assert_eq!((last.layers_done, last.layers_total), (3, 3));

    // Nothing changed: no manifest and no blob request.
    let before = engine.counters();
    let again = engine.sync_image(&img, None).await.unwrap();
    assert!(again.already_present);
    assert_eq!(again.blobs_fetched, 0);
    let after = engine.counters();
    assert_eq!(after.blob_requests, before.blob_requests);
    assert_eq!(after.manifest_requests, before.manifest_requests);
}

#[tokio::test]
async fn multi_platform_takes_only_requested_platforms() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let spec = ImageSpec::random(&[100_000, 50_000], 2).with_base(LayerSpec::shared(200_000, 99));
    let idx = push_two_platforms(&reg, "demo/multi", "v1", &spec).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let mut img = desired(&reg.addr(), "demo/multi", &idx.index_digest, &["v1"]);
    img.image.platforms = vec!["linux/arm64".into()];
    engine.sync_image(&img, None).await.unwrap();
    let (_, arm) = idx
        .manifests
        .iter()
        .find(|(p, _)| p.architecture == "arm64")
        .unwrap();
    let (_, amd) = idx
        .manifests
        .iter()
        .find(|(p, _)| p.architecture == "amd64")
        .unwrap();
    for d in arm.blob_digests() {
        assert!(engine.store().has_blob(&d));
    }
    let amd_only: Vec<_> = amd
        .blob_digests()
        .into_iter()
        .filter(|d| !arm.blob_digests().contains(d))
        .collect();
    assert!(!amd_only.is_empty());
    for d in amd_only {
        assert!(!engine.store().has_blob(&d), "amd64 blob {d} fetched");
    }
    assert!(
        engine
            .store()
            .find_manifest(&reg.addr(), "demo/multi", &arm.manifest_digest)
            .is_some()
    );

    img.image.platforms = vec!["linux/s390x".into()];
    let err = engine.sync_image(&img, None).await.unwrap_err();
    assert!(err.to_string().contains("s390x"), "{err}");
}

#[tokio::test]
async fn shared_base_layer_is_downloaded_once() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let base = LayerSpec::new(3 * MIB, 77);
    let [a, b] = push_on_base(
        &reg,
        base,
        [("team-a/app", 10_000, 3), ("team-b/svc", 20_000, 4)],
    )
    .await;
    assert_eq!(a.layer_digests[0], b.layer_digests[0]);
    let proxy = FaultProxy::start(reg.addr().parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let addr = proxy.addr().to_string();
    let reports = engine
        .sync(
            vec![
                desired(&addr, "team-a/app", &a.manifest_digest, &["v1"]),
                desired(&addr, "team-b/svc", &b.manifest_digest, &["v1"]),
            ],
            None,
        )
        .await;
    for r in &reports {
        assert!(r.result.is_ok(), "{:?}", r.result);
    }
    let mut distinct = a.blob_digests();
    distinct.extend(b.blob_digests());
    distinct.sort();
    distinct.dedup();
    assert_eq!(engine.counters().blob_requests, distinct.len() as u64);
    let total: u64 = a.total_size + b.total_size - a.layer_sizes[0];
    assert!(
        proxy.bytes_to_client() < total + MIB / 2,
        "{} bytes through the proxy for {total} bytes of distinct blobs",
        proxy.bytes_to_client()
    );
}

#[tokio::test]
async fn cut_mid_blob_resumes_by_range() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let size = 64 * MIB;
    let pushed = push(&reg, "demo/big", "v1", &ImageSpec::random(&[size], 5)).await;
    let blob = pushed.layer_digests[0].clone();
    let proxy = proxy_in_front(&reg).await;
    proxy.set_throttle(Some(48 * MIB));
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let partial = engine.store().partial_path(&blob).unwrap();
    let img = desired(
        &proxy.addr().to_string(),
        "demo/big",
        &pushed.manifest_digest,
        &["v1"],
    );
    let p2 = proxy.clone();
    let cutter = tokio::spawn(async move {
        wait_for("half the blob on disk", Duration::from_secs(60), || {
            file_len(&partial) >= size / 2
        })
        .await;
        p2.cut();
        p2.set_throttle(None);
    });
    let stats = engine.sync_image(&img, None).await.unwrap();
    cutter.await.unwrap();
    assert!(engine.store().has_blob(&blob));
    assert!(
        engine.counters().blob_requests >= 3,
        "the cut blob was requested again"
    );
    let through = proxy.bytes_to_client();
    println!(
        "{through} bytes through the proxy, {} received, for {size}",
        stats.bytes_fetched
    );
    // The proxy also counts what sat in socket buffers when it cut.
    assert!(
        through < size + 4 * MIB,
        "{through} bytes through the proxy for a {size} byte blob: it restarted from zero"
    );
    assert!(
        stats.bytes_fetched <= size + MIB,
        "received {} for {size}: more than 1 MiB twice",
        stats.bytes_fetched
    );
}

#[tokio::test]
async fn new_engine_resumes_from_partial_offset() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let size = 8 * MIB;
    let pushed = push(&reg, "demo/restart", "v1", &ImageSpec::random(&[size], 6)).await;
    let blob = pushed.layer_digests[0].clone();
    let proxy = FaultProxy::start(reg.addr().parse().unwrap())
        .await
        .unwrap();
    proxy.set_throttle(Some(4 * MIB));
    let dir = tempfile::tempdir().unwrap();
    let addr = proxy.addr().to_string();
    let img = desired(&addr, "demo/restart", &pushed.manifest_digest, &["v1"]);
    let offset = {
        let engine = engine(dir.path());
        let partial = engine.store().partial_path(&blob).unwrap();
        let run = engine.sync_image(&img, None);
        tokio::select! {
            r = run => panic!("finished before the interruption: {r:?}"),
            _ = wait_for("part of the blob on disk", Duration::from_secs(60), || file_len(&partial) >= 3 * MIB) => {}
        }
        // The engine (and its store lock) is dropped here, mid-transfer.
        partial
    };
    // A write already handed to the blocking pool may still land; wait until
    // the partial stops growing before taking its length as the offset.
    let offset = settled_len(&offset).await;
    assert!(offset > 0 && offset < size);
    // The dropped engine's connection closes; only then count afresh.
    count_afresh(&proxy).await;
    let engine = engine(dir.path());
    let stats = engine.sync_image(&img, None).await.unwrap();
    assert!(engine.store().has_blob(&blob));
    assert_eq!(stats.bytes_fetched, size - offset, "resumed from {offset}");
    let through = proxy.bytes_to_client();
    assert!(
        through < size - offset + MIB / 2,
        "{through} bytes through the proxy after resuming at {offset} of {size}"
    );
}

#[tokio::test]
async fn corrupt_partial_is_detected_and_redownloaded() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let size = 2 * MIB;
    let pushed = push(&reg, "demo/corrupt", "v1", &ImageSpec::random(&[size], 7)).await;
    let blob = pushed.layer_digests[0].clone();
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = engine(dir.path());
        // A partial whose bytes are wrong: the right length, the wrong content.
        std::fs::write(
            engine.store().partial_path(&blob).unwrap(),
            vec![0x5a; (size / 2) as usize],
        )
        .unwrap();
    }
    let engine = engine(dir.path());
    let stats = engine
        .sync_image(
            &desired(
                &reg.addr(),
                "demo/corrupt",
                &pushed.manifest_digest,
                &["v1"],
            ),
            None,
        )
        .await
        .unwrap();
    assert!(engine.store().has_blob(&blob));
    let stored = std::fs::read(engine.store().blob_path(&blob).unwrap()).unwrap();
    assert_eq!(imgfleet_tests::images::sha256_digest(&stored), blob);
    // The rest after the bad half, then the whole blob again.
    assert!(
        stats.bytes_fetched >= size + size / 2,
        "{}",
        stats.bytes_fetched
    );
}

#[tokio::test]
async fn tampered_upstream_blob_is_refused_and_never_served() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push(&reg, "demo/tamper", "v1", &ImageSpec::random(&[500_000], 8)).await;
    let blob = pushed.layer_digests[0].clone();
    let file = registry_blob_file(&reg.storage_dir(), &blob);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let err = engine
        .sync_image(
            &desired(&reg.addr(), "demo/tamper", &pushed.manifest_digest, &["v1"]),
            None,
        )
        .await
        .unwrap_err();
    assert!(err.is_digest_mismatch(), "{err}");
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert!(!engine.store().has_blob(&blob));
    assert!(
        engine
            .store()
            .find_manifest(&reg.addr(), "demo/tamper", "v1")
            .is_none()
    );
    let mirror = start_mirror(engine.store().clone()).await;
    let resp = reqwest::get(format!(
        "http://{}/v2/demo/tamper/blobs/{blob}",
        mirror.addr
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = reqwest::get(format!(
        "http://{}/v2/demo/tamper/manifests/v1",
        mirror.addr
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn basic_auth_registry() {
    let reg = Registry::start(RegistryOptions::plain().with_auth("edge", "s3cret-pw"))
        .await
        .unwrap();
    let pushed = push(&reg, "private/app", "v1", &ImageSpec::random(&[100_000], 9)).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let img = desired(&reg.addr(), "private/app", &pushed.manifest_digest, &["v1"]);
    engine
        .sync_image(&with_creds(img.clone(), "edge", "s3cret-pw"), None)
        .await
        .unwrap();
    assert!(engine.store().has_blob(&pushed.layer_digests[0]));

    let dir2 = tempfile::tempdir().unwrap();
    let engine2 = common::engine(dir2.path());
    let err = engine2
        .sync_image(&with_creds(img.clone(), "edge", "wrong-pw"), None)
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!text.contains("wrong-pw"), "the password leaked: {text}");
    let err = engine2.sync_image(&img, None).await.unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
}

#[tokio::test]
async fn bandwidth_limit_slows_transfers() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push(
        &reg,
        "demo/slow",
        "v1",
        &ImageSpec::random(&[3 * MIB, 3 * MIB], 10),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        bandwidth_limit: Some(2 * MIB),
        ..EngineConfig::default()
    };
    let engine = engine_with(dir.path(), config);
    let start = Instant::now();
    sync_v1(&engine, &reg, "demo/slow", &pushed).await;
    // 6 MiB at 2 MiB/s with a one-second burst: at least 2 s.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1900), "took only {took:?}");
}

#[test]
fn engine_futures_can_be_spawned() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<imgfleet_agent::transfer::Engine>();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let img = desired(
        "127.0.0.1:1",
        "a/b",
        &format!("sha256:{}", "0".repeat(64)),
        &[],
    );
    let one = engine.sync_image(&img, None);
    assert_send(&one);
    let all = engine.sync(vec![img.clone()], None);
    assert_send(&all);
}

#[tokio::test]
async fn stalled_link_times_out_and_resumes() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let size = 6 * MIB;
    let pushed = push(&reg, "demo/stall", "v1", &ImageSpec::random(&[size], 17)).await;
    let blob = pushed.layer_digests[0].clone();
    let proxy = proxy_in_front(&reg).await;
    proxy.set_throttle(Some(4 * MIB));
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        read_timeout: Duration::from_millis(700),
        ..EngineConfig::default()
    };
    let engine = engine_with(dir.path(), config);
    let partial = engine.store().partial_path(&blob).unwrap();
    let img = desired(
        &proxy.addr().to_string(),
        "demo/stall",
        &pushed.manifest_digest,
        &["v1"],
    );
    let staller = async {
        wait_for("part of the blob on disk", Duration::from_secs(60), || {
            file_len(&partial) >= 2 * MIB
        })
        .await;
        // A black hole until the read timeout fails the attempt and it resumes.
        let requests = engine.counters().blob_requests;
        proxy.set_stall(true);
        wait_for(
            "the stalled attempt to time out and resume",
            Duration::from_secs(30),
            || engine.counters().blob_requests > requests,
        )
        .await;
        proxy.set_stall(false);
        proxy.set_throttle(None);
    };
    let (synced, ()) = tokio::join!(engine.sync_image(&img, None), staller);
    synced.unwrap();
    assert!(engine.store().has_blob(&blob));
    assert!(
        engine.counters().blob_requests >= 3,
        "the stalled blob was requested again"
    );
    assert!(
        proxy.bytes_to_client() < size + size / 2,
        "restarted from zero"
    );
}

#[tokio::test]
async fn nested_indexes_sync_and_are_served() {
    use imgfleet_tests::images::{INDEX_MEDIA_TYPE, PushTarget};
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let inner = push_index(
        &reg,
        "demo/nested",
        "inner",
        &[("linux", "amd64"), ("linux", "arm64")],
        &ImageSpec::random(&[30_000], 51),
    )
    .await
    .unwrap();
    let single = push(
        &reg,
        "demo/nested",
        "single",
        &ImageSpec::random(&[20_000], 52),
    )
    .await;
    // An index naming that index and an image manifest beside it.
    let outer = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [
            {"mediaType": INDEX_MEDIA_TYPE, "digest": inner.index_digest, "size": inner.index_bytes.len()},
            {"mediaType": imgfleet_tests::images::MANIFEST_MEDIA_TYPE, "digest": single.manifest_digest,
             "size": single.manifest_bytes.len(), "platform": {"os": "linux", "architecture": "s390x"}}
        ]
    }))
    .unwrap();
    let outer_digest = PushTarget::from(&reg)
        .push_manifest("demo/nested", "v1", INDEX_MEDIA_TYPE, &outer)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let stats = engine
        .sync_image(
            &desired(&reg.addr(), "demo/nested", &outer_digest, &["v1"]),
            None,
        )
        .await
        .unwrap();
    let mut want: Vec<String> = inner.blob_digests();
    want.extend(single.blob_digests());
    assert_eq!(stats.blobs_total as usize, want.len());
    for d in &want {
        assert!(engine.store().has_blob(d), "{d} not synced");
    }
    assert!(
        engine
            .store()
            .has_image(&reg.addr(), "demo/nested", &outer_digest)
    );

    // The mirror serves the whole tree: the outer index by tag, the nested
    // index and every manifest by digest, every blob.
    let mirror = start_mirror(engine.store().clone()).await;
    let raw = imgfleet_tests::skopeo::inspect_raw(
        &format!("docker://{}/demo/nested:v1", mirror.addr),
        &["--tls-verify=false"],
    )
    .await
    .unwrap();
    assert_eq!(raw, outer);
    let http = reqwest::Client::new();
    let base = format!("http://{}/v2/demo/nested", mirror.addr);
    let mut manifests = vec![(inner.index_digest.clone(), INDEX_MEDIA_TYPE)];
    manifests.push((
        single.manifest_digest.clone(),
        imgfleet_tests::images::MANIFEST_MEDIA_TYPE,
    ));
    for (_, m) in &inner.manifests {
        manifests.push((
            m.manifest_digest.clone(),
            imgfleet_tests::images::MANIFEST_MEDIA_TYPE,
        ));
    }
    for (d, media_type) in manifests {
        let r = http
            .get(format!("{base}/manifests/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{d}");
        assert_eq!(r.headers()["content-type"], media_type);
        let body = r.bytes().await.unwrap();
        assert_eq!(imgfleet_tests::images::sha256_digest(&body), d);
    }
    for d in &want {
        let r = http.get(format!("{base}/blobs/{d}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{d}");
        assert_eq!(
            imgfleet_tests::images::sha256_digest(&r.bytes().await.unwrap()),
            *d
        );
    }

    // A platform filter reaches into the nested index.
    let dir2 = tempfile::tempdir().unwrap();
    let arm_only = engine_with(dir2.path(), EngineConfig::default());
    let mut img = desired(&reg.addr(), "demo/nested", &outer_digest, &["v1"]);
    img.image.platforms = vec!["linux/arm64".into()];
    arm_only.sync_image(&img, None).await.unwrap();
    let (arm, amd) = (&inner.manifests[1].1, &inner.manifests[0].1);
    for d in arm.blob_digests() {
        assert!(arm_only.store().has_blob(&d), "arm64 blob {d} missing");
    }
    for d in amd.blob_digests().iter().chain(&single.blob_digests()) {
        assert!(
            !arm_only.store().has_blob(d),
            "{d} of another platform fetched"
        );
    }
}

#[tokio::test]
async fn a_wrong_layer_size_fails_even_when_the_blob_is_already_present() {
    use imgfleet_tests::images::{MANIFEST_MEDIA_TYPE, PushTarget};
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let spec = ImageSpec::random(&[40_000], 53);
    let good = push_image(&reg, "demo/app", "v1", &spec).await.unwrap();
    // The liar's repository holds the same blobs (a registry checks that).
    push_image(&reg, "demo/liar", "honest", &spec)
        .await
        .unwrap();
    // The same config and layer, but the manifest states the layer one byte larger.
    let mut m: serde_json::Value = serde_json::from_slice(&good.manifest_bytes).unwrap();
    m["layers"][0]["size"] = serde_json::json!(good.layer_sizes[0] + 1);
    let lying = serde_json::to_vec(&m).unwrap();
    let lying_digest = PushTarget::from(&reg)
        .push_manifest("demo/liar", "v1", MANIFEST_MEDIA_TYPE, &lying)
        .await
        .unwrap();

    let check = |r: Result<imgfleet_agent::transfer::ImageStats, TransferError>| match r {
        Err(TransferError::SizeMismatch {
            digest,
            expected,
            actual,
        }) => {
            assert_eq!(digest, good.layer_digests[0]);
            assert_eq!(expected, good.layer_sizes[0] + 1);
            assert_eq!(actual, good.layer_sizes[0]);
        }
        other => panic!("expected a size mismatch, got {other:?}"),
    };
    // On a fresh store the registry's length gives it away at once.
    let fresh = tempfile::tempdir().unwrap();
    let engine1 = engine(fresh.path());
    let liar = desired(&reg.addr(), "demo/liar", &lying_digest, &["v1"]);
    check(engine1.sync_image(&liar, None).await);
    assert_eq!(
        engine1.counters().blob_requests,
        2,
        "refused without retries"
    );

    // With the blob already present (from the honest image), the same.
    let dir = tempfile::tempdir().unwrap();
    let engine2 = engine(dir.path());
    engine2
        .sync_image(
            &desired(&reg.addr(), "demo/app", &good.manifest_digest, &["v1"]),
            None,
        )
        .await
        .unwrap();
    check(engine2.sync_image(&liar, None).await);
    assert!(
        !engine2
            .store()
            .has_image(&reg.addr(), "demo/liar", &lying_digest)
    );
    let mirror = start_mirror(engine2.store().clone()).await;
    let r = reqwest::get(format!("http://{}/v2/demo/liar/manifests/v1", mirror.addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the lying image is never served");
}

#[tokio::test]
async fn a_trickling_blob_is_cut_by_the_minimum_progress_and_resumed() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let size = 2 * MIB;
    let pushed = push(&reg, "demo/slow", "v1", &ImageSpec::random(&[size], 54)).await;
    let proxy = proxy_in_front(&reg).await;
    // Bytes keep coming, so the read timeout never fires, but far too slowly.
    proxy.set_throttle(Some(16 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        min_progress: Some(MinProgress {
            window: Duration::from_secs(1),
            bytes: 256 * 1024,
        }),
        ..EngineConfig::default()
    };
    let engine = Arc::new(engine_with(dir.path(), config));
    let img = desired(
        &proxy.addr().to_string(),
        "demo/slow",
        &pushed.manifest_digest,
        &["v1"],
    );
    let (e2, p2) = (engine.clone(), proxy.clone());
    let lifter = tokio::spawn(async move {
        // Config and layer, then the layer again after the cut.
        wait_for(
            "the stalled layer asked for again",
            Duration::from_secs(30),
            || e2.counters().blob_requests >= 3,
        )
        .await;
        p2.set_throttle(None);
    });
    let started = Instant::now();
    engine.sync_image(&img, None).await.unwrap();
    lifter.await.unwrap();
    assert!(engine.store().has_blob(&pushed.layer_digests[0]));
    assert!(
        proxy.bytes_to_client() < size + size / 4,
        "the second attempt resumed by Range instead of starting over"
    );
    eprintln!(
        "figures: trickle cut and resumed, synced in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn engine_debug_never_shows_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    engine
        .client(
            "registry.example:5000",
            Some(&Credentials::new("robot", "pw-never-shown-42")),
            true,
        )
        .await
        .unwrap();
    let debug = format!("{engine:?}");
    assert!(!debug.contains("pw-never-shown-42"), "{debug}");
    assert!(debug.contains("registry.example:5000 as robot"), "{debug}");
    let pretty = format!("{engine:#?}");
    assert!(!pretty.contains("pw-never-shown-42"));
}
