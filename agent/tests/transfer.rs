//! Transfer engine against the real docker-registry: platforms, dedup,
//! resume after a cut and after a restart, corrupt partials, tampered
//! upstream blobs, no-op re-sync, basic auth and the bandwidth limit.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use imgfleet_agent::transfer::{EngineConfig, Phase};
use imgfleet_tests::fault::FaultProxy;
use imgfleet_tests::images::{ImageSpec, LayerSpec, push_image, push_index};
use imgfleet_tests::registry::{Registry, RegistryOptions};

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn syncs_image_and_noop_resync_makes_no_requests() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push_image(
        &reg,
        "demo/app",
        "v1",
        &ImageSpec::random(&[2 * MIB, 300_000], 1),
    )
    .await
    .unwrap();
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
    let idx = push_index(
        &reg,
        "demo/multi",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        &spec,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let mut img = desired(&reg.addr(), "demo/multi", &idx.index_digest, &["v1"]);
    img.platforms = vec!["linux/arm64".into()];
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

    img.platforms = vec!["linux/s390x".into()];
    let err = engine.sync_image(&img, None).await.unwrap_err();
    assert!(err.to_string().contains("s390x"), "{err}");
}

#[tokio::test]
async fn shared_base_layer_is_downloaded_once() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let base = LayerSpec::new(3 * MIB, 77);
    let a = push_image(
        &reg,
        "team-a/app",
        "v1",
        &ImageSpec::random(&[10_000], 3).with_base(base),
    )
    .await
    .unwrap();
    let b = push_image(
        &reg,
        "team-b/svc",
        "v1",
        &ImageSpec::random(&[20_000], 4).with_base(base),
    )
    .await
    .unwrap();
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
    let pushed = push_image(&reg, "demo/big", "v1", &ImageSpec::random(&[size], 5))
        .await
        .unwrap();
    let blob = pushed.layer_digests[0].clone();
    let proxy = Arc::new(
        FaultProxy::start(reg.addr().parse().unwrap())
            .await
            .unwrap(),
    );
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
    let pushed = push_image(&reg, "demo/restart", "v1", &ImageSpec::random(&[size], 6))
        .await
        .unwrap();
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
    let mut offset = file_len(&offset);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = file_len(&engine_partial_path(dir.path(), &blob));
        if now == offset {
            break;
        }
        offset = now;
    }
    assert!(offset > 0 && offset < size);
    // The dropped engine's connection closes; only then count afresh.
    wait_for(
        "the old connection to close",
        Duration::from_secs(10),
        || proxy.connections() == 0,
    )
    .await;
    proxy.set_throttle(None);
    proxy.reset_counters();
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

fn engine_partial_path(dir: &std::path::Path, digest: &str) -> std::path::PathBuf {
    dir.join("partial").join(&digest[7..])
}

#[tokio::test]
async fn corrupt_partial_is_detected_and_redownloaded() {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let size = 2 * MIB;
    let pushed = push_image(&reg, "demo/corrupt", "v1", &ImageSpec::random(&[size], 7))
        .await
        .unwrap();
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
    let pushed = push_image(&reg, "demo/tamper", "v1", &ImageSpec::random(&[500_000], 8))
        .await
        .unwrap();
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
    let pushed = push_image(&reg, "private/app", "v1", &ImageSpec::random(&[100_000], 9))
        .await
        .unwrap();
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
    let pushed = push_image(
        &reg,
        "demo/slow",
        "v1",
        &ImageSpec::random(&[3 * MIB, 3 * MIB], 10),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        bandwidth_limit: Some(2 * MIB),
        ..EngineConfig::default()
    };
    let engine = engine_with(dir.path(), config);
    let start = Instant::now();
    engine
        .sync_image(
            &desired(&reg.addr(), "demo/slow", &pushed.manifest_digest, &["v1"]),
            None,
        )
        .await
        .unwrap();
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
    let pushed = push_image(&reg, "demo/stall", "v1", &ImageSpec::random(&[size], 17))
        .await
        .unwrap();
    let blob = pushed.layer_digests[0].clone();
    let proxy = Arc::new(
        FaultProxy::start(reg.addr().parse().unwrap())
            .await
            .unwrap(),
    );
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
    let p2 = proxy.clone();
    let staller = tokio::spawn(async move {
        wait_for("part of the blob on disk", Duration::from_secs(60), || {
            file_len(&partial) >= 2 * MIB
        })
        .await;
        // A black hole longer than the read timeout: the attempt must fail and resume.
        p2.set_stall(true);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        p2.set_stall(false);
        p2.set_throttle(None);
    });
    engine.sync_image(&img, None).await.unwrap();
    staller.await.unwrap();
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
