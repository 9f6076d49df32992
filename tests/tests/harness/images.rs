//! Self-tests for the image generator: what it pushes comes back through skopeo with the
//! same digests, over plain HTTP, with basic auth and with TLS.

use std::process::Command;
use std::time::Instant;

use imgfleet_tests::images::{
    ImageSpec, LayerSpec, MIN_LAYER_SIZE, Platform, push_image, push_index, sha256_digest,
};
use imgfleet_tests::{Registry, RegistryOptions, skopeo};

#[test]
fn layers_are_deterministic_and_distinct() {
    let a = LayerSpec::new(100_003, 7);
    assert_eq!(a.bytes(), a.bytes());
    assert_eq!(a.bytes().len(), 100_003);
    assert_eq!(a.digest(), sha256_digest(&a.bytes()));
    assert_ne!(a.digest(), LayerSpec::new(100_003, 8).digest());
    let spec = ImageSpec::random(&[1000, 2000], 1);
    assert_eq!(
        spec.build(&Platform::linux_amd64()).manifest_digest,
        spec.build(&Platform::linux_amd64()).manifest_digest
    );
    assert_ne!(
        spec.build(&Platform::linux_amd64()).manifest_digest,
        ImageSpec::random(&[1000, 2000], 2)
            .build(&Platform::linux_amd64())
            .manifest_digest
    );
    // Per-platform layers differ between platforms; shared ones do not.
    let spec = spec.with_base(LayerSpec::shared(500, 99));
    let amd = spec.build(&Platform::linux_amd64());
    let arm = spec.build(&Platform::linux_arm64());
    assert_eq!(amd.layers[0].1, arm.layers[0].1);
    assert_ne!(amd.layers[1].1, arm.layers[1].1);
    assert_ne!(amd.config_digest, arm.config_digest);
}

#[test]
fn layers_have_exact_sizes_and_are_valid_tar_gzip() {
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [
        0u64,
        24,
        100,
        1558,
        1559,
        1560,
        2048,
        65_535 + 1600,
        200_000,
        1024 * 1024 + 3,
    ]
    .into_iter()
    .enumerate()
    {
        let layer = LayerSpec::new(size, i as u64);
        let blob = layer.bytes();
        assert_eq!(blob.len() as u64, size.max(MIN_LAYER_SIZE), "size {size}");
        assert_eq!(layer.blob_size(), blob.len() as u64);
        let path = dir.path().join(format!("l{i}.gz"));
        std::fs::write(&path, &blob).unwrap();
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .expect("run gzip");
        assert!(
            out.status.success(),
            "size {size}: gzip -dc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            layer.diff_id(),
            sha256_digest(&out.stdout),
            "size {size}: diff_id"
        );
        if size >= 1600 {
            let out = Command::new("tar")
                .arg("-tzf")
                .arg(&path)
                .output()
                .expect("run tar");
            assert!(
                out.status.success(),
                "size {size}: tar -tzf: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let listing = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                listing.trim(),
                format!("layer-{:016x}.bin", i as u64),
                "size {size}"
            );
        }
    }
}

#[test]
fn large_layer_generation_is_fast() {
    const SIZE: u64 = 256 * 1024 * 1024;
    let layer = LayerSpec::new(SIZE, 3);
    let start = Instant::now();
    let n: u64 = layer.chunks().map(|c| c.len() as u64).sum();
    let gen_time = start.elapsed();
    assert_eq!(n, SIZE);
    // Chunks stay small so a large layer never sits in memory whole.
    assert!(
        layer
            .chunks()
            .all(|c| c.len() <= imgfleet_tests::images::CHUNK_SIZE)
    );
    let start = Instant::now();
    let _ = layer.digest();
    let hash_time = start.elapsed();
    eprintln!("256 MiB: generate {gen_time:?}, generate+sha256+diff_id {hash_time:?}");
    // Well under a second on this machine with the workspace's opt-level overrides; the bound
    // is loose for noisy CI, but catches a build that lost them (about 20 s then).
    assert!(
        hash_time.as_secs() < 10,
        "256 MiB digest took {hash_time:?}"
    );
}

/// Copies `repo:tag` into an OCI layout with skopeo and returns the layout's blob digests.
async fn copy_to_layout(
    reg: &Registry,
    image: &str,
    all: bool,
) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let src_args = reg.skopeo_src_args();
    let mut extra: Vec<&str> = src_args.iter().map(String::as_str).collect();
    if all {
        extra.push("--all");
    }
    skopeo::copy(
        &reg.docker_ref(image),
        &format!("oci:{}:copied", layout.display()),
        &extra,
    )
    .await
    .expect("skopeo copy");
    let blobs = skopeo::oci_layout_blobs(&layout).unwrap();
    if std::env::var_os("KEEP_LAYOUT").is_some() {
        let _ = std::process::Command::new("cp")
            .arg("-r")
            .arg(&layout)
            .arg("/tmp/sk/")
            .status();
    }
    (dir, blobs)
}

async fn check_single(reg: &Registry) {
    let spec = ImageSpec::random(&[1024 * 1024, 300_001, 17], 42);
    let pushed = push_image(reg, "team/app", "v1", &spec)
        .await
        .expect("push image");
    assert_eq!(pushed.layer_digests.len(), 3);
    assert_eq!(
        pushed.manifest_digest,
        sha256_digest(&pushed.manifest_bytes)
    );

    let args = reg.skopeo_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let image = reg.docker_ref("team/app:v1");
    assert_eq!(
        skopeo::inspect_digest(&image, &args).await.unwrap(),
        pushed.manifest_digest
    );

    let (_dir, blobs) = copy_to_layout(reg, "team/app:v1", false).await;
    for d in pushed.blob_digests() {
        assert!(blobs.contains(&d), "layout lacks {d}; has {blobs:?}");
    }
    assert!(
        blobs.contains(&pushed.manifest_digest),
        "layout lacks the manifest; has {blobs:?}"
    );

    // Pushing the same image again skips existing blobs and yields the same digest.
    let again = push_image(reg, "team/app", "v1-again", &spec)
        .await
        .unwrap();
    assert_eq!(again.manifest_digest, pushed.manifest_digest);
}

#[tokio::test]
async fn single_image_roundtrips_through_skopeo_plain() {
    let reg = Registry::start(RegistryOptions::default()).await.unwrap();
    check_single(&reg).await;
}

#[tokio::test]
async fn single_image_roundtrips_through_skopeo_with_auth() {
    let reg = Registry::start(RegistryOptions::default().with_auth("bob", "pa55"))
        .await
        .unwrap();
    check_single(&reg).await;
}

#[tokio::test]
async fn single_image_roundtrips_through_skopeo_with_tls() {
    let reg = Registry::start(
        RegistryOptions::default()
            .with_tls()
            .with_auth("carol", "pw"),
    )
    .await
    .unwrap();
    check_single(&reg).await;
    // Without the CA, skopeo refuses the registry.
    let image = reg.docker_ref("team/app:v1");
    let err = skopeo::inspect_digest(&image, &["--creds=carol:pw"])
        .await
        .expect_err("untrusted CA must fail");
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    assert!(
        !format!("{err:#}").contains(":pw"),
        "error leaks the password: {err:#}"
    );
}

#[tokio::test]
async fn index_roundtrips_through_skopeo() {
    let reg = Registry::start(RegistryOptions::default()).await.unwrap();
    let spec = ImageSpec::random(&[200_000, 50_000], 5).with_base(LayerSpec::shared(100_000, 6));
    let pushed = push_index(
        &reg,
        "multi",
        "latest",
        &[("linux", "amd64"), ("linux", "arm64")],
        &spec,
    )
    .await
    .expect("push index");
    assert_eq!(pushed.manifests.len(), 2);
    let (amd, arm) = (&pushed.manifests[0].1, &pushed.manifests[1].1);
    assert_eq!(
        amd.layer_digests[0], arm.layer_digests[0],
        "shared base layer"
    );
    assert_ne!(amd.layer_digests[1], arm.layer_digests[1]);
    // 2 configs + 1 shared + 2x2 own layers.
    assert_eq!(pushed.blob_digests().len(), 7);

    let image = reg.docker_ref("multi:latest");
    assert_eq!(
        skopeo::inspect_digest(&image, &["--tls-verify=false"])
            .await
            .unwrap(),
        pushed.index_digest
    );
    let raw = skopeo::inspect_raw(&image, &["--tls-verify=false"])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(v["manifests"][1]["platform"]["architecture"], "arm64");

    let (_dir, blobs) = copy_to_layout(&reg, "multi:latest", true).await;
    assert!(blobs.contains(&pushed.index_digest));
    for (platform, m) in &pushed.manifests {
        assert!(
            blobs.contains(&m.manifest_digest),
            "{platform} manifest missing"
        );
        for d in m.blob_digests() {
            assert!(blobs.contains(&d), "{platform}: layout lacks {d}");
        }
    }
}
