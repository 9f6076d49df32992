//! Unit tests of the content store on a temp dir.

use super::*;

fn record(repo: &str, tag: Option<&str>, digest: &str) -> ManifestRecord {
    ManifestRecord {
        registry: "r.example:5000".into(),
        repository: repo.into(),
        tag: tag.map(str::to_string),
        digest: digest.into(),
        media_type: imgfleet_common::registry::OCI_MANIFEST.into(),
        size: 3,
        parent: None,
        subject: None,
        recorded_at: 1,
    }
}

#[test]
fn put_blob_verifies_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let good = sha256_digest(b"abc");
    store.put_blob(&good, b"abc").unwrap();
    assert!(store.has_blob(&good));
    assert_eq!(store.read_blob(&good).unwrap(), b"abc");
    let wrong = sha256_digest(b"abd");
    assert!(matches!(
        store.put_blob(&wrong, b"abc"),
        Err(StoreError::DigestMismatch { .. })
    ));
    assert!(!store.has_blob(&wrong));
    assert!(matches!(
        store.put_blob("sha256:../../x", b"abc"),
        Err(StoreError::InvalidDigest(_))
    ));
}

#[tokio::test]
async fn partial_resumes_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = sha256_digest(&data);
    {
        let store = Store::open(dir.path()).unwrap();
        let mut p = store.open_partial(&digest).unwrap();
        p.append(&data[..1_500_000]).await.unwrap();
        p.flush().await.unwrap();
        // Dropped without commit: a crash.
    }
    let store = Store::open(dir.path()).unwrap();
    let mut p = store.open_partial(&digest).unwrap();
    assert_eq!(p.offset(), 1_500_000);
    assert_eq!(p.resumed_from(), 1_500_000);
    p.append(&data[1_500_000..]).await.unwrap();
    assert!(!store.has_blob(&digest), "not visible before commit");
    assert_eq!(
        store.commit_partial(p, data.len() as u64).unwrap(),
        data.len() as u64
    );
    assert!(store.has_blob(&digest));
    assert!(!store.partial_path(&digest).unwrap().exists());
}

#[tokio::test]
async fn corrupt_partial_is_refused_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data = vec![7u8; 100_000];
    let digest = sha256_digest(&data);
    std::fs::write(store.partial_path(&digest).unwrap(), vec![8u8; 50_000]).unwrap();
    let mut p = store.open_partial(&digest).unwrap();
    assert_eq!(p.offset(), 50_000);
    p.append(&data[50_000..]).await.unwrap();
    assert!(matches!(
        store.commit_partial(p, data.len() as u64),
        Err(StoreError::DigestMismatch { .. })
    ));
    assert!(!store.has_blob(&digest));
    assert!(!store.partial_path(&digest).unwrap().exists());
}

#[test]
fn open_cleans_temp_keeps_partials_and_locks() {
    let dir = tempfile::tempdir().unwrap();
    let d = sha256_digest(b"x");
    {
        let store = Store::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/index.json.123"), b"half").unwrap();
        std::fs::write(store.partial_path(&d).unwrap(), b"").unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
    }
    let _store = Store::open(dir.path()).unwrap();
    assert!(!dir.path().join("tmp/index.json.123").exists());
    assert!(dir.path().join("partial").join(&d[7..]).exists());
    assert!(dir.path().join("oci-layout").exists());
}

#[test]
fn records_replace_by_tag_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = sha256_digest(b"a");
    let b = sha256_digest(b"b");
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .record(vec![record("demo/app", Some("v1"), &a)])
            .unwrap();
        store
            .record(vec![record("demo/app", Some("v1"), &b)])
            .unwrap();
        store.record(vec![record("demo/app", None, &a)]).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let reader = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(store.records().len(), 2);
    assert_eq!(
        reader
            .find_manifest("r.example:5000", "demo/app", "v1")
            .unwrap()
            .digest,
        b
    );
    assert!(
        reader
            .find_manifest("r.example:5000", "demo/app", &a)
            .is_some()
    );
    assert_eq!(
        reader.tags("r.example:5000", "demo/app"),
        vec!["v1".to_string()]
    );
    assert_eq!(
        reader.registries_for("demo/app"),
        vec!["r.example:5000".to_string()]
    );
    assert!(matches!(reader.record(vec![]), Err(StoreError::ReadOnly)));
    // The index is a valid OCI index.
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(v["schemaVersion"], 2);
    // A reader sees a later write.
    store
        .record(vec![record("demo/other", Some("v2"), &a)])
        .unwrap();
    assert_eq!(
        reader.tags("r.example:5000", "demo/other"),
        vec!["v2".to_string()]
    );
}

#[tokio::test]
async fn partial_writes_batches_while_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Several batches of 1 MiB, appended in network-sized pieces, so that a
    // batch is in flight while the next gathers.
    let data: Vec<u8> = (0..5_300_000u32).map(|i| (i % 253) as u8).collect();
    let digest = sha256_digest(&data);
    let mut p = store.open_partial(&digest).unwrap();
    let mut appended = 0u64;
    for piece in data.chunks(65_536) {
        p.append(piece).await.unwrap();
        appended += piece.len() as u64;
        assert_eq!(p.offset(), appended, "the offset counts bytes in flight");
    }
    p.flush().await.unwrap();
    let on_disk = std::fs::metadata(store.partial_path(&digest).unwrap())
        .unwrap()
        .len();
    assert_eq!(
        on_disk,
        data.len() as u64,
        "flush leaves every byte on disk"
    );
    assert_eq!(
        store.commit_partial(p, data.len() as u64).unwrap(),
        data.len() as u64
    );
    assert_eq!(store.read_blob(&digest).unwrap(), data);
}
