//! What an agent of version 0.1.0 stored still loads: `fixtures/data-dir-0.1.0`
//! is a data dir written by that version's own encoders (`desired.bin`
//! sealed under its `local.key`, the content store's `index.json` and blobs,
//! `gc-state.json`; see `fixtures/README.md`). Today's code opens it, finds the same
//! facts, writes the desired set back byte for byte as it was, and the
//! mirror serves the same content from it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use common::*;
use imgfleet_agent::desired::{DesiredFile, DesiredImage, DesiredSet, RegistryCredential};
use imgfleet_agent::gc::{GcState, Retention};
use imgfleet_agent::store::Store;
use imgfleet_common::registry::{OCI_INDEX, OCI_MANIFEST, sha256_digest};

const INDEX: &str = "sha256:43f8c296a1a9cb890351e4659a2f5ed28a8cba5ed5f893cb7ac9c03853872175";
const MANIFEST: &str = "sha256:6b35f3ae5343234091b0f3deca2004a4367466922be326484082e346f0d78636";
const LAYER: &str = "sha256:78d6e131e7976d55308432e73faac5fe5b3e08265f3a22cc30209d9fa0d0ea1d";
const UPSTREAM: &str = "registry.example:5000";

/// A copy of the fixture to open (opening takes the store's lock and may
/// tidy it), with the key file private again: git keeps no modes but 0644
/// and 0755, and the agent refuses a key others may read.
fn fixture() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("create");
        for entry in std::fs::read_dir(from).expect("read fixture") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy");
            }
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    copy(&fixture_dir(), dir.path());
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(
        dir.path().join("local.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod local.key");
    dir
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data-dir-0.1.0")
}

/// The set the fixture's generator saved.
fn expected_set() -> DesiredSet {
    let multi = DesiredImage {
        key: format!("default/multi@{INDEX}"),
        source: ("default".into(), "multi".into()),
        registry_key: "default/lab".into(),
        registry: UPSTREAM.into(),
        repository: "demo/multi".into(),
        digest: INDEX.into(),
        tags: vec!["v1".into()],
        platforms: vec!["linux/amd64".into()],
        keep_versions: 3,
        grace_period_seconds: 600,
        trace_context: String::new(),
        verify_keys: Vec::new(),
    };
    let app = DesiredImage {
        key: format!("team-b/app@{MANIFEST}"),
        source: ("team-b".into(), "app".into()),
        registry_key: "team-b/hub".into(),
        registry: "hub.example".into(),
        repository: "library/app".into(),
        digest: MANIFEST.into(),
        tags: vec!["1.0".into()],
        platforms: Vec::new(),
        keep_versions: 0,
        grace_period_seconds: 0,
        trace_context: String::new(),
        verify_keys: Vec::new(),
    };
    let lab = RegistryCredential {
        key: "default/lab".into(),
        domain: UPSTREAM.into(),
        username: "robot".into(),
        password: "fixture-password".into(),
        insecure: true,
    };
    let hub = RegistryCredential {
        key: "team-b/hub".into(),
        domain: "hub.example".into(),
        username: String::new(),
        password: String::new().into(),
        insecure: false,
    };
    DesiredSet {
        generation: 7,
        epoch: "epoch-fixture".into(),
        images: BTreeMap::from([(multi.key.clone(), multi), (app.key.clone(), app)]),
        registries: BTreeMap::from([(lab.key.clone(), lab), (hub.key.clone(), hub)]),
    }
}

/// The plaintext of a sealed desired-set file: magic, nonce, AES-256-GCM.
fn unseal(dir: &Path) -> Vec<u8> {
    let key: [u8; 32] = std::fs::read(dir.join("local.key"))
        .expect("key")
        .try_into()
        .expect("a 32-byte key");
    let sealed = std::fs::read(dir.join("desired.bin")).expect("desired.bin");
    let body = sealed
        .strip_prefix(b"IMGFDS1\n".as_slice())
        .expect("the magic");
    let (nonce, ciphertext) = body.split_at(12);
    Aes256Gcm::new(&key.into())
        .decrypt(Nonce::from_slice(nonce), ciphertext)
        .expect("opens with its key")
}

#[test]
fn a_desired_set_written_by_0_1_0_loads_and_is_written_back_the_same() {
    let dir = fixture();
    let file = DesiredFile::open(dir.path()).expect("open");
    let held = file.load().expect("load");
    assert_eq!(held, expected_set());
    // Today's encoder writes exactly what 0.1.0 wrote.
    let written_then = unseal(dir.path());
    file.save(&held).expect("save");
    assert_eq!(
        String::from_utf8_lossy(&unseal(dir.path())),
        String::from_utf8_lossy(&written_then)
    );
    assert_eq!(file.load().expect("reload"), held);
}

#[test]
fn gc_state_written_by_0_1_0_loads() {
    let text = std::fs::read(fixture_dir().join("gc-state.json")).expect("gc-state.json");
    let state: GcState = serde_json::from_slice(&text).expect("parses");
    assert_eq!(
        state.unwanted_since,
        BTreeMap::from([(
            format!("hub.example/library/old@sha256:{}", "e".repeat(64)),
            1_764_000_050
        )])
    );
    assert_eq!(
        state.retention,
        BTreeMap::from([(
            format!("{UPSTREAM}/demo/multi"),
            Retention {
                keep_versions: 3,
                grace_period_seconds: 600
            }
        )])
    );
}

#[tokio::test]
async fn a_content_store_written_by_0_1_0_serves_the_same_content() {
    imgfleet_tests::process::install_crypto_provider();
    let dir = fixture();
    let store = std::sync::Arc::new(Store::open(dir.path()).expect("open"));
    // (registry, repository, tag, digest, media type, parent, recorded at)
    let t0 = 1_764_000_000;
    #[rustfmt::skip]
    let mut want = vec![
        (UPSTREAM, "demo/multi", None, MANIFEST, OCI_MANIFEST, Some(INDEX), t0),
        (UPSTREAM, "demo/multi", None, INDEX, OCI_INDEX, None, t0),
        (UPSTREAM, "demo/multi", Some("v1"), INDEX, OCI_INDEX, None, t0),
        ("hub.example", "library/app", None, MANIFEST, OCI_MANIFEST, None, t0 + 100),
        ("hub.example", "library/app", Some("1.0"), MANIFEST, OCI_MANIFEST, None, t0 + 100),
    ];
    let records = store.records();
    let mut held: Vec<_> = records
        .iter()
        .map(|r| {
            let size = store.blob_size(&r.digest);
            assert_eq!(size, Some(r.size), "{r:?}: the size of what it names");
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.tag.as_deref(),
                r.digest.as_str(),
                r.media_type.as_str(),
                r.parent.as_deref(),
                r.recorded_at,
            )
        })
        .collect();
    held.sort();
    want.sort();
    assert_eq!(held, want);

    let mirror = start_mirror(store.clone()).await;
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("http://{}{path}", mirror.addr);
        async move {
            let resp = http.get(&url).send().await.expect("GET");
            assert_eq!(resp.status(), 200, "{url}");
            let digest = resp
                .headers()
                .get("docker-content-digest")
                .map(|v| v.to_str().expect("ascii").to_string());
            (digest, resp.bytes().await.expect("body"))
        }
    };
    let (digest, body) = get(format!("/v2/demo/multi/manifests/v1?ns={UPSTREAM}")).await;
    assert_eq!(digest.as_deref(), Some(INDEX));
    assert_eq!(sha256_digest(&body), INDEX);
    let (digest, body) = get("/v2/library/app/manifests/1.0?ns=hub.example".into()).await;
    assert_eq!(digest.as_deref(), Some(MANIFEST));
    assert_eq!(sha256_digest(&body), MANIFEST);
    let (_, layer) = get(format!("/v2/demo/multi/blobs/{LAYER}?ns={UPSTREAM}")).await;
    assert_eq!(sha256_digest(&layer), LAYER);
}
