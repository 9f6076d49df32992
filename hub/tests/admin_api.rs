//! The hub's AdminService over real mTLS, in process on 127.0.0.1:0, against
//! the embedded store and against a real etcd: apply/get/list/delete/watch of
//! the seed's objects, optimistic concurrency, validation, secrets at rest,
//! authentication and enrollment.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_client::AdminServiceClient;
use imgfleet::model::parse_documents;
use imgfleet_common::pki::{self, CertificateAuthority, Identity};
use imgfleet_common::tls::TlsMaterial;
use imgfleet_hub::config::{Config, StoreConfig};
use imgfleet_hub::server::{self, RunningHub};
use imgfleet_tests::Etcd;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

const SEED: &str = include_str!("testdata/seed-quickstart.yaml");
const SEED_PASSWORD: &str = "Harbor12345";
/// Where the seed's registry points in these tests: a closed loopback port,
/// so that the hub's resolver sends nothing off this machine.
const SEED_DOMAIN: &str = "127.0.0.1:9";
const ETCD_PREFIX: &str = "/imgfleet-test";

struct TestHub {
    hub: Option<RunningHub>,
    dir: tempfile::TempDir,
    admin: TlsMaterial,
    etcd: Option<Etcd>,
}

impl TestHub {
    async fn start(etcd: Option<Etcd>) -> TestHub {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::for_data_dir(dir.path());
        if let Some(e) = &etcd {
            cfg.store = StoreConfig::Etcd {
                endpoints: vec![e.endpoint()],
                prefix: ETCD_PREFIX.into(),
            };
        }
        let hub = server::start(cfg, CancellationToken::new())
            .await
            .expect("hub starts");
        let admin_dir = hub
            .admin_dir
            .clone()
            .expect("development mode writes an admin bundle");
        let admin = TlsMaterial::from_dir(&admin_dir).expect("admin bundle loads");
        TestHub {
            hub: Some(hub),
            dir,
            admin,
            etcd,
        }
    }

    fn url(&self) -> String {
        self.hub.as_ref().expect("running").url()
    }

    async fn client_with(&self, m: &TlsMaterial) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(m.connect(&self.url()).await.expect("connect"))
    }

    async fn client(&self) -> AdminServiceClient<Channel> {
        self.client_with(&self.admin).await
    }

    fn ca(&self) -> std::sync::Arc<CertificateAuthority> {
        self.hub
            .as_ref()
            .expect("running")
            .context
            .pki
            .ca
            .clone()
            .expect("development CA")
    }

    /// The bytes the store holds for the seed's RegistrySecret: the whole
    /// redb file, or the etcd value.
    async fn raw_secret_bytes(&self) -> Vec<u8> {
        match &self.etcd {
            Some(e) => e
                .get(&format!(
                    "{ETCD_PREFIX}/registrysecrets/default/harbor-prod"
                ))
                .await
                .expect("etcd get")
                .expect("key present"),
            None => std::fs::read(self.dir.path().join("policy.redb")).expect("read redb file"),
        }
    }

    async fn stop(mut self) {
        if let Some(h) = self.hub.take() {
            h.stop().await.expect("clean stop");
        }
    }
}

fn seed_objects() -> Vec<pb::Object> {
    parse_documents(&SEED.replace("harbor.example.com", SEED_DOMAIN))
        .expect("seed parses")
        .iter()
        .map(pb::Object::from)
        .collect()
}

fn apply_req(o: pb::Object) -> pb::ApplyRequest {
    pb::ApplyRequest {
        object: Some(o),
        dry_run: false,
    }
}

fn meta(o: &pb::Object) -> &pb::ObjectMeta {
    match &o.kind {
        Some(pb::object::Kind::RegistrySecret(x)) => x.metadata.as_ref(),
        Some(pb::object::Kind::Repository(x)) => x.metadata.as_ref(),
        Some(pb::object::Kind::Cluster(x)) => x.metadata.as_ref(),
        Some(pb::object::Kind::RoleBinding(x)) => x.metadata.as_ref(),
        Some(pb::object::Kind::ClusterRoleBinding(x)) => x.metadata.as_ref(),
        None => None,
    }
    .expect("metadata")
}

fn meta_mut(o: &mut pb::Object) -> &mut pb::ObjectMeta {
    match &mut o.kind {
        Some(pb::object::Kind::RegistrySecret(x)) => x.metadata.as_mut(),
        Some(pb::object::Kind::Repository(x)) => x.metadata.as_mut(),
        Some(pb::object::Kind::Cluster(x)) => x.metadata.as_mut(),
        Some(pb::object::Kind::RoleBinding(x)) => x.metadata.as_mut(),
        Some(pb::object::Kind::ClusterRoleBinding(x)) => x.metadata.as_mut(),
        None => None,
    }
    .expect("metadata")
}

fn repo_spec_mut(o: &mut pb::Object) -> &mut pb::RepositorySpec {
    match &mut o.kind {
        Some(pb::object::Kind::Repository(x)) => x.spec.as_mut().expect("spec"),
        _ => panic!("not a repository"),
    }
}

fn rs_spec(o: &pb::Object) -> &pb::RegistrySecretSpec {
    match &o.kind {
        Some(pb::object::Kind::RegistrySecret(x)) => x.spec.as_ref().expect("spec"),
        _ => panic!("not a registry secret"),
    }
}

fn get_req(kind: pb::Kind, ns: &str, name: &str) -> pb::GetRequest {
    pb::GetRequest {
        kind: kind as i32,
        namespace: ns.into(),
        name: name.into(),
    }
}

fn assert_conflict(s: &tonic::Status, what: &str) {
    assert!(
        matches!(s.code(), Code::FailedPrecondition | Code::Aborted),
        "{what}: expected a conflict, got {s:?}"
    );
    assert!(
        s.message().contains("resourceVersion"),
        "{what}: {}",
        s.message()
    );
}

/// The whole admin API against one backend, step by step.
async fn scenario(hub: &TestHub) {
    let mut c = hub.client().await;
    let seed = seed_objects();
    assert_eq!(seed.len(), 2);
    let created = the_seed_applies_and_answers_carry_no_password(&mut c, &seed).await;
    reapplying_changes_nothing(&mut c, &seed).await;
    get_returns_what_was_stored(&mut c, &created).await;
    the_store_holds_the_password_sealed_only(hub).await;
    list_filters_by_namespace_and_labels(&mut c, &seed).await;
    a_stale_resource_version_is_refused(&mut c, &seed, &created).await;
    labels_alone_keep_the_generation(&mut c, &seed).await;
    an_omitted_password_is_kept_and_a_new_one_replaces_it(&mut c, &seed, hub).await;
    missing_objects_are_not_found(&mut c, &seed).await;
    concurrent_creates_create_once(&mut c, &seed).await;
    invalid_objects_are_refused_naming_the_field(&mut c, &seed).await;
    delete_checks_the_resource_version(&mut c).await;
    watch_sequence(&mut c, &seed).await;
}

type Client = AdminServiceClient<Channel>;

/// Apply the seed: both created, secrets removed from the answers.
async fn the_seed_applies_and_answers_carry_no_password(
    c: &mut Client,
    seed: &[pb::Object],
) -> Vec<pb::Object> {
    let mut created = Vec::new();
    for o in seed {
        let r = c
            .apply(apply_req(o.clone()))
            .await
            .expect("apply")
            .into_inner();
        assert_eq!(r.outcome, pb::ApplyOutcome::Created as i32);
        let obj = r.object.expect("object");
        let m = meta(&obj);
        assert!(!m.resource_version.is_empty() && !m.uid.is_empty());
        assert_eq!(m.generation, 1);
        assert!(m.creation_timestamp.is_some());
        created.push(obj);
    }
    let rs = &created[0];
    assert_eq!(rs_spec(rs).password, "");
    assert!(rs_spec(rs).password_set);
    assert_eq!(rs_spec(rs).username, "admin");
    created
}

/// Re-applying the same YAML changes nothing.
async fn reapplying_changes_nothing(c: &mut Client, seed: &[pb::Object]) {
    for o in seed {
        let r = c
            .apply(apply_req(o.clone()))
            .await
            .expect("reapply")
            .into_inner();
        assert_eq!(r.outcome, pb::ApplyOutcome::Unchanged as i32);
    }
}

/// Get returns what was stored, with defaults, never the password.
async fn get_returns_what_was_stored(c: &mut Client, created: &[pb::Object]) {
    let got = c
        .get(get_req(pb::Kind::RegistrySecret, "default", "harbor-prod"))
        .await
        .expect("get rs")
        .into_inner();
    assert_eq!(rs_spec(&got).password, "");
    assert!(rs_spec(&got).password_set);
    assert_eq!(rs_spec(&got).domain, SEED_DOMAIN);
    assert_eq!(rs_spec(&got).provider, pb::Provider::Harbor as i32);
    let repo = c
        .get(get_req(pb::Kind::Repository, "default", "nginx-latest"))
        .await
        .expect("get repo")
        .into_inner();
    assert_eq!(
        meta(&repo).resource_version,
        meta(&created[1]).resource_version
    );
}

/// The password is not in the store's bytes in plaintext, but its sealed form is.
async fn the_store_holds_the_password_sealed_only(hub: &TestHub) {
    let raw = hub.raw_secret_bytes().await;
    assert!(
        !contains(&raw, SEED_PASSWORD.as_bytes()),
        "plaintext password in the store"
    );
    assert!(
        contains(&raw, b"enc:v1:"),
        "sealed password not found in the store bytes"
    );
    assert!(
        contains(&raw, SEED_DOMAIN.as_bytes()),
        "the object itself is in the bytes read"
    );
}

/// List: one namespace, all namespaces, label selector.
async fn list_filters_by_namespace_and_labels(c: &mut Client, seed: &[pb::Object]) {
    let list = |ns: &str, all: bool, sel: &str| pb::ListRequest {
        kind: pb::Kind::Repository as i32,
        namespace: ns.into(),
        all_namespaces: all,
        label_selector: sel.into(),
    };
    let mut other = seed[1].clone();
    meta_mut(&mut other).namespace = "staging".into();
    meta_mut(&mut other).labels = HashMap::from([("tier".to_string(), "web".to_string())]);
    // The RegistrySecret must be in the Repository's namespace, so reference one there.
    repo_spec_mut(&mut other).registry_ref = Some(pb::ObjectRef {
        name: "harbor-prod".into(),
        namespace: "staging".into(),
    });
    c.apply(apply_req(other)).await.expect("apply staging repo");
    let l = c
        .list(list("default", false, ""))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(l.items.len(), 1);
    assert!(!l.resource_version.is_empty());
    let l = c
        .list(list("", true, ""))
        .await
        .expect("list all")
        .into_inner();
    let names: Vec<(String, String)> = l
        .items
        .iter()
        .map(|o| (meta(o).namespace.clone(), meta(o).name.clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("default".to_string(), "nginx-latest".to_string()),
            ("staging".to_string(), "nginx-latest".to_string())
        ]
    );
    let l = c
        .list(list("", true, "tier in (web,db)"))
        .await
        .expect("list sel")
        .into_inner();
    assert_eq!(l.items.len(), 1);
    assert_eq!(meta(&l.items[0]).namespace, "staging");
    let e = c
        .list(list("", true, "tier in (web"))
        .await
        .expect_err("bad selector");
    assert_eq!(e.code(), Code::InvalidArgument);
}

/// Optimistic concurrency: an update with the current resourceVersion
/// wins, a second one with the same (now stale) version is refused.
async fn a_stale_resource_version_is_refused(
    c: &mut Client,
    seed: &[pb::Object],
    created: &[pb::Object],
) {
    let rv0 = meta(&created[1]).resource_version.clone();
    let mut upd = seed[1].clone();
    meta_mut(&mut upd).resource_version = rv0.clone();
    repo_spec_mut(&mut upd).sync_interval = "30m".into();
    let r = c
        .apply(apply_req(upd.clone()))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(r.outcome, pb::ApplyOutcome::Updated as i32);
    let after = r.object.expect("object");
    assert_eq!(
        meta(&after).generation,
        2,
        "a spec change bumps the generation"
    );
    assert_ne!(meta(&after).resource_version, rv0);
    assert_eq!(meta(&after).uid, meta(&created[1]).uid);
    repo_spec_mut(&mut upd).sync_interval = "45m".into();
    let e = c.apply(apply_req(upd)).await.expect_err("stale");
    assert_conflict(&e, "stale apply");
    assert!(
        e.message().contains("Repository default/nginx-latest"),
        "{}",
        e.message()
    );
}

/// Labels only: updated without a generation bump.
async fn labels_alone_keep_the_generation(c: &mut Client, seed: &[pb::Object]) {
    let mut lab = seed[1].clone();
    meta_mut(&mut lab).labels = HashMap::from([("team".to_string(), "a".to_string())]);
    repo_spec_mut(&mut lab).sync_interval = "30m".into();
    let r = c.apply(apply_req(lab)).await.expect("labels").into_inner();
    assert_eq!(r.outcome, pb::ApplyOutcome::Updated as i32);
    assert_eq!(meta(r.object.as_ref().expect("obj")).generation, 2);
}

/// Password rules: omitted keeps it (username still set); a new one replaces it.
async fn an_omitted_password_is_kept_and_a_new_one_replaces_it(
    c: &mut Client,
    seed: &[pb::Object],
    hub: &TestHub,
) {
    let mut no_pw = seed[0].clone();
    if let Some(pb::object::Kind::RegistrySecret(x)) = &mut no_pw.kind {
        x.spec.as_mut().expect("spec").password.clear();
    }
    let r = c
        .apply(apply_req(no_pw))
        .await
        .expect("apply without password")
        .into_inner();
    assert_eq!(r.outcome, pb::ApplyOutcome::Unchanged as i32);
    assert!(rs_spec(r.object.as_ref().expect("obj")).password_set);
    let mut new_pw = seed[0].clone();
    if let Some(pb::object::Kind::RegistrySecret(x)) = &mut new_pw.kind {
        x.spec.as_mut().expect("spec").password = "N3wSecret!".into();
    }
    let r = c
        .apply(apply_req(new_pw))
        .await
        .expect("apply new password")
        .into_inner();
    assert_eq!(r.outcome, pb::ApplyOutcome::Updated as i32);
    assert_eq!(meta(r.object.as_ref().expect("obj")).generation, 2);
    let raw = hub.raw_secret_bytes().await;
    assert!(
        !contains(&raw, b"N3wSecret!"),
        "new plaintext password in the store"
    );
}

/// Missing objects and preconditions on objects that do not exist.
async fn missing_objects_are_not_found(c: &mut Client, seed: &[pb::Object]) {
    let e = c
        .get(get_req(pb::Kind::Repository, "default", "nope"))
        .await
        .expect_err("missing");
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("Repository default/nope"),
        "{}",
        e.message()
    );
    let mut ghost = seed[1].clone();
    meta_mut(&mut ghost).name = "ghost".into();
    meta_mut(&mut ghost).resource_version = "12345".into();
    let e = c
        .apply(apply_req(ghost))
        .await
        .expect_err("rv on a missing object");
    assert_eq!(e.code(), Code::NotFound);
}

/// Concurrent creates of one new object: exactly one creates it, none fails.
async fn concurrent_creates_create_once(c: &mut Client, seed: &[pb::Object]) {
    let mut fresh = seed[1].clone();
    meta_mut(&mut fresh).name = "raced".into();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let mut cc = c.clone();
        let o = fresh.clone();
        tasks.spawn(async move { cc.apply(apply_req(o)).await.map(|r| r.into_inner().outcome) });
    }
    let mut outcomes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        outcomes.push(r.expect("task").expect("concurrent apply"));
    }
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == pb::ApplyOutcome::Created as i32)
            .count(),
        1,
        "{outcomes:?}"
    );
}

/// Validation: errors name the object and the field.
async fn invalid_objects_are_refused_naming_the_field(c: &mut Client, seed: &[pb::Object]) {
    let mut bad = seed[1].clone();
    repo_spec_mut(&mut bad).sync_interval = "1x".into();
    let e = c.apply(apply_req(bad)).await.expect_err("invalid");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("Repository default/nginx-latest")
            && e.message().contains("syncInterval"),
        "{}",
        e.message()
    );
    let mut bad = seed[0].clone();
    if let Some(pb::object::Kind::RegistrySecret(x)) = &mut bad.kind {
        x.spec.as_mut().expect("spec").domain = "not a domain!".into();
    }
    let e = c.apply(apply_req(bad)).await.expect_err("invalid domain");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("spec.domain"), "{}", e.message());
    assert!(!e.message().contains(SEED_PASSWORD), "{}", e.message());
    let e = c
        .apply(pb::ApplyRequest {
            object: None,
            dry_run: false,
        })
        .await
        .expect_err("no object");
    assert_eq!(e.code(), Code::InvalidArgument);
}

/// Delete: stale version refused, current version deletes, then NotFound.
async fn delete_checks_the_resource_version(c: &mut Client) {
    let cur = c
        .get(get_req(pb::Kind::Repository, "default", "raced"))
        .await
        .expect("get raced")
        .into_inner();
    let del = |rv: &str| pb::DeleteRequest {
        kind: pb::Kind::Repository as i32,
        namespace: "default".into(),
        name: "raced".into(),
        resource_version: rv.into(),
        force: false,
    };
    let e = c.delete(del("1")).await.expect_err("stale delete");
    assert_conflict(&e, "stale delete");
    let d = c
        .delete(del(&meta(&cur).resource_version))
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(meta(d.object.as_ref().expect("obj")).name, "raced");
    let e = c.delete(del("")).await.expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);
}

/// Watch: the current objects as ADDED, then ADDED, MODIFIED and DELETED of
/// a new one, in order.
async fn watch_sequence(c: &mut AdminServiceClient<Channel>, seed: &[pb::Object]) {
    let mut stream = c
        .watch(pb::WatchRequest {
            kind: pb::Kind::Repository as i32,
            namespace: "default".into(),
            all_namespaces: false,
            resource_version: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(first.r#type, pb::WatchEventType::Added as i32);
    assert_eq!(
        meta(first.object.as_ref().expect("obj")).name,
        "nginx-latest"
    );

    let mut o = seed[1].clone();
    meta_mut(&mut o).name = "watched".into();
    c.apply(apply_req(o.clone())).await.expect("create");
    repo_spec_mut(&mut o).tag = "1.27".into();
    c.apply(apply_req(o)).await.expect("modify");
    c.delete(pb::DeleteRequest {
        kind: pb::Kind::Repository as i32,
        namespace: "default".into(),
        name: "watched".into(),
        resource_version: String::new(),
        force: false,
    })
    .await
    .expect("delete");

    let mut seen = Vec::new();
    let mut last_rv = 0u64;
    while seen.len() < 3 {
        let ev = next(&mut stream).await;
        let obj = ev.object.as_ref().expect("object");
        if meta(obj).name != "watched" {
            continue;
        }
        let rv: u64 = ev.resource_version.parse().expect("numeric rv");
        assert!(rv > last_rv, "revisions grow");
        last_rv = rv;
        seen.push(ev.r#type);
    }
    assert_eq!(
        seen,
        vec![
            pb::WatchEventType::Added as i32,
            pb::WatchEventType::Modified as i32,
            pb::WatchEventType::Deleted as i32
        ]
    );
}

async fn next(s: &mut tonic::Streaming<pb::WatchEvent>) -> pb::WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("watch event within 10s")
        .expect("stream open")
        .expect("event ok")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn admin_api_on_embedded_store() {
    let hub = TestHub::start(None).await;
    scenario(&hub).await;
    hub.stop().await;
}

#[tokio::test]
async fn admin_api_on_etcd() {
    let etcd = Etcd::start().await.expect("etcd starts");
    let hub = TestHub::start(Some(etcd)).await;
    scenario(&hub).await;

    // A watch from a compacted revision answers RELIST.
    let e = hub.etcd.as_ref().expect("etcd");
    let rev = e.revision().await.expect("revision");
    e.compact(rev).await.expect("compact");
    let mut c = hub.client().await;
    let mut stream = c
        .watch(pb::WatchRequest {
            kind: pb::Kind::Repository as i32,
            all_namespaces: true,
            resource_version: "1".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let ev = next(&mut stream).await;
    assert_eq!(ev.r#type, pb::WatchEventType::Relist as i32, "{ev:?}");

    // The store going away is Unavailable (worth a retry), not Internal.
    let mut hub = hub;
    hub.etcd.as_mut().expect("etcd").kill();
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        c.get(get_req(pb::Kind::Repository, "default", "nginx-latest")),
    )
    .await
    .expect("answer within 30s")
    .expect_err("etcd is down");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    hub.stop().await;
}

/// Objects survive a restart of the hub on the same data directory, and the
/// restart reuses the CA (the old admin bundle still works).
#[tokio::test]
async fn restart_keeps_objects_and_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config::for_data_dir(dir.path());
    let hub = server::start(cfg.clone(), CancellationToken::new())
        .await
        .expect("start");
    assert!(hub.first_start);
    let admin = TlsMaterial::from_dir(&dir.path().join("admin")).expect("bundle");
    let mut c = AdminServiceClient::new(admin.connect(&hub.url()).await.expect("connect"));
    for o in seed_objects() {
        c.apply(apply_req(o)).await.expect("apply");
    }
    hub.stop().await.expect("stop");

    let hub = server::start(cfg, CancellationToken::new())
        .await
        .expect("restart");
    assert!(!hub.first_start);
    let mut c = AdminServiceClient::new(admin.connect(&hub.url()).await.expect("reconnect"));
    let got = c
        .get(get_req(pb::Kind::RegistrySecret, "default", "harbor-prod"))
        .await
        .expect("still there")
        .into_inner();
    assert!(rs_spec(&got).password_set);
    hub.stop().await.expect("stop");
}

/// Only admin certificates from the hub's CA get in.
#[tokio::test]
async fn admin_api_requires_an_admin_certificate_from_the_hub_ca() {
    let hub = TestHub::start(None).await;
    let req = || pb::ListRequest {
        kind: pb::Kind::Repository as i32,
        namespace: String::new(),
        all_namespaces: true,
        label_selector: String::new(),
    };
    // The admin bundle works.
    hub.client().await.list(req()).await.expect("admin lists");

    // No client certificate: the TLS handshake (or the first RPC, with TLS 1.3) fails.
    let ep = tonic::transport::Endpoint::from_shared(hub.url())
        .expect("url")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&hub.admin.ca_pem)),
        )
        .expect("tls");
    match ep.connect().await {
        Err(_) => {}
        Ok(ch) => {
            let e = AdminServiceClient::new(ch)
                .list(req())
                .await
                .expect_err("no client cert");
            assert_ne!(e.code(), Code::Ok);
        }
    }

    // A client certificate from another CA.
    let other = CertificateAuthority::generate().expect("other ca");
    let foreign = other.issue_admin("admin", 1).expect("foreign admin");
    let m = TlsMaterial {
        ca_pem: hub.admin.ca_pem.clone(),
        cert_pem: foreign.cert_pem,
        key_pem: foreign.key_pem,
    };
    match m.connect(&hub.url()).await {
        Err(_) => {}
        Ok(ch) => {
            let e = AdminServiceClient::new(ch)
                .list(req())
                .await
                .expect_err("foreign CA");
            assert_ne!(e.code(), Code::Ok);
        }
    }

    // A cluster certificate from the right CA: authenticated, not allowed.
    let leaf = hub.ca().issue_cluster("edge-x", 1).expect("cluster cert");
    let m = TlsMaterial {
        ca_pem: hub.admin.ca_pem.clone(),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
    };
    let e = hub
        .client_with(&m)
        .await
        .list(req())
        .await
        .expect_err("cluster on admin API");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = hub
        .client_with(&m)
        .await
        .watch(pb::WatchRequest {
            kind: pb::Kind::Repository as i32,
            namespace: String::new(),
            all_namespaces: true,
            resource_version: String::new(),
        })
        .await
        .expect_err("cluster watch");
    assert_eq!(e.code(), Code::PermissionDenied);

    // A certificate without an imgfleet identity (the hub's own server
    // certificate has no client usage at all) is refused too.
    let server_leaf = hub.ca().issue_server(&[], 1).expect("server cert");
    let m = TlsMaterial {
        ca_pem: hub.admin.ca_pem.clone(),
        cert_pem: server_leaf.cert_pem,
        key_pem: server_leaf.key_pem,
    };
    match m.connect(&hub.url()).await {
        Err(_) => {}
        Ok(ch) => {
            let e = AdminServiceClient::new(ch)
                .list(req())
                .await
                .expect_err("server cert");
            assert_ne!(e.code(), Code::Ok);
        }
    }
    hub.stop().await;
}

/// EnrollCluster stores the Cluster and issues a certificate whose CN and URI
/// SAN bind the cluster name; the issued credentials work as an agent identity.
#[tokio::test]
async fn enrollment_binds_the_cluster_name() {
    let hub = TestHub::start(None).await;
    let mut c = hub.client().await;
    let r = c
        .enroll_cluster(pb::EnrollClusterRequest {
            name: "edge-1".into(),
            labels: HashMap::from([("region".to_string(), "eu".to_string())]),
            tenants: vec!["default".into()],
            validity_days: 30,
            ..Default::default()
        })
        .await
        .expect("enroll")
        .into_inner();
    assert_eq!(r.ca_pem, hub.admin.ca_pem);

    // Written as the CLI writes it, and read back.
    let out = tempfile::tempdir().expect("out");
    TlsMaterial {
        ca_pem: r.ca_pem.clone(),
        cert_pem: r.cert_pem.clone(),
        key_pem: r.key_pem.clone(),
    }
    .write_to_dir(out.path())
    .expect("write bundle");
    let loaded = TlsMaterial::from_dir(out.path()).expect("load bundle");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.path().join("key.pem"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Parse the certificate: CN, O and URI SAN name the cluster; the hub's CA signed it.
    let (_, pem) = x509_parser::pem::parse_x509_pem(loaded.cert_pem.as_bytes()).expect("pem");
    let cert = pem.parse_x509().expect("x509");
    let cn: Vec<&str> = cert
        .subject()
        .iter_common_name()
        .map(|a| a.as_str().expect("cn"))
        .collect();
    assert_eq!(cn, vec!["edge-1"]);
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .expect("san ext")
        .expect("san present")
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec!["imgfleet://cluster/edge-1".to_string()]);
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(r.ca_pem.as_bytes()).expect("ca pem");
    let ca_cert = ca_pem.parse_x509().expect("ca x509");
    cert.verify_signature(Some(ca_cert.public_key()))
        .expect("signed by the hub CA");
    assert_eq!(
        pki::identity_from_pem(&loaded.cert_pem).expect("identity"),
        Identity::Cluster("edge-1".into())
    );
    // The hub keeps no copy of the key.
    let key_body: String = r
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let redb = std::fs::read(hub.dir.path().join("policy.redb")).expect("redb");
    assert!(!contains(&redb, key_body.as_bytes()));

    // The Cluster object is stored with its labels and tenants.
    let cl = c
        .get(get_req(pb::Kind::Cluster, "", "edge-1"))
        .await
        .expect("get cluster")
        .into_inner();
    let Some(pb::object::Kind::Cluster(cl)) = cl.kind else {
        panic!("not a cluster")
    };
    let m = cl.metadata.expect("meta");
    assert_eq!(m.labels.get("region").map(String::as_str), Some("eu"));
    assert_eq!(cl.spec.expect("spec").tenants, vec!["default".to_string()]);
    let l = c
        .list(pb::ListRequest {
            kind: pb::Kind::Cluster as i32,
            namespace: String::new(),
            all_namespaces: false,
            label_selector: "region=eu".into(),
        })
        .await
        .expect("list clusters")
        .into_inner();
    assert_eq!(l.items.len(), 1);

    // The issued credentials authenticate as the cluster (and so are refused here).
    let e = hub
        .client_with(&loaded)
        .await
        .list(pb::ListRequest {
            kind: pb::Kind::Cluster as i32,
            ..Default::default()
        })
        .await
        .expect_err("agent on the admin API");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("edge-1"), "{}", e.message());

    // A bad cluster name is refused and stores nothing.
    let e = c
        .enroll_cluster(pb::EnrollClusterRequest {
            name: "Edge_1".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("Edge_1"), "{}", e.message());
    let e = c
        .get(get_req(pb::Kind::Cluster, "", "Edge_1"))
        .await
        .expect_err("not stored");
    assert_eq!(e.code(), Code::NotFound);

    // Metrics count the requests.
    let maddr = hub
        .hub
        .as_ref()
        .expect("hub")
        .metrics_addr
        .expect("metrics on");
    let body = http_get(maddr, "/metrics").await;
    assert!(
        body.contains("imgfleet_hub_admin_requests_total{method=\"EnrollCluster\",code=\"Ok\"} 1"),
        "{body}"
    );
    assert!(body.contains("imgfleet_hub_enrollments_total 1"), "{body}");
    assert!(http_get(maddr, "/healthz").await.contains("ok"));
    hub.stop().await;
}

/// A minimal HTTP/1.0 GET, to keep the test free of an HTTP client dependency.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

/// Production mode: the server certificate, client CA and signing CA come
/// from files; nothing is generated; without a signing CA enrollment is
/// refused with FailedPrecondition.
#[tokio::test]
async fn production_tls_from_files() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::generate().expect("ca");
    let server = ca
        .issue_server(&["hub.internal".into()], 30)
        .expect("server");
    let admin = ca.issue_admin("ops", 30).expect("admin");
    let p = |n: &str| dir.path().join(n);
    pki::write_public_file(&p("ca.pem"), ca.cert_pem()).expect("w");
    pki::write_private_file(&p("ca-key.pem"), ca.key_pem()).expect("w");
    pki::write_public_file(&p("server.pem"), &server.cert_pem).expect("w");
    pki::write_private_file(&p("server-key.pem"), &server.key_pem).expect("w");
    let admin_m = TlsMaterial {
        ca_pem: ca.cert_pem().into(),
        cert_pem: admin.cert_pem,
        key_pem: admin.key_pem,
    };

    for with_signing_ca in [true, false] {
        let data = dir.path().join(format!("data-{with_signing_ca}"));
        let mut cfg = Config::for_data_dir(&data);
        cfg.tls.server = Some(imgfleet_hub::config::ServerTlsFiles {
            cert: p("server.pem"),
            key: p("server-key.pem"),
            client_ca: p("ca.pem"),
        });
        if with_signing_ca {
            cfg.tls.ca = Some(imgfleet_hub::config::CaFiles {
                cert: p("ca.pem"),
                key: p("ca-key.pem"),
            });
        }
        let hub = server::start(cfg, CancellationToken::new())
            .await
            .expect("start");
        assert!(!hub.first_start && hub.admin_dir.is_none());
        assert!(!data.join("pki").exists() && !data.join("admin").exists());
        let mut c = AdminServiceClient::new(admin_m.connect(&hub.url()).await.expect("connect"));
        c.apply(apply_req(seed_objects()[0].clone()))
            .await
            .expect("apply as ops");
        let r = c
            .enroll_cluster(pb::EnrollClusterRequest {
                name: "edge-2".into(),
                ..Default::default()
            })
            .await;
        if with_signing_ca {
            let r = r.expect("enroll").into_inner();
            assert_eq!(r.ca_pem, ca.cert_pem());
            assert_eq!(
                pki::identity_from_pem(&r.cert_pem).expect("id"),
                Identity::Cluster("edge-2".into())
            );
        } else {
            let e = r.expect_err("no signing CA");
            assert_eq!(e.code(), Code::FailedPrecondition);
            assert!(e.message().contains("--ca-cert"), "{}", e.message());
        }
        hub.stop().await.expect("stop");
    }
}

/// A RegistrySecret that Repositories use is not deleted by accident: the
/// refusal is FAILED_PRECONDITION naming the Repositories, and `force`
/// deletes it anyway.
#[tokio::test]
async fn a_registry_secret_in_use_is_deleted_only_with_force() {
    let hub = TestHub::start(None).await;
    let mut c = hub.client().await;
    let seed = seed_objects();
    for o in &seed {
        c.apply(apply_req(o.clone())).await.expect("apply");
    }
    // A second user of the same secret, and an unrelated namespace's
    // Repository of the same name that does not use it.
    let mut second = seed[1].clone();
    meta_mut(&mut second).name = "nginx-stable".into();
    c.apply(apply_req(second)).await.expect("apply second");
    let mut elsewhere = seed[1].clone();
    meta_mut(&mut elsewhere).namespace = "team-b".into();
    repo_spec_mut(&mut elsewhere).registry_ref = Some(pb::ObjectRef {
        name: "harbor-prod".into(),
        namespace: "team-b".into(),
    });
    c.apply(apply_req(elsewhere))
        .await
        .expect("apply elsewhere");

    let del = |force| pb::DeleteRequest {
        kind: pb::Kind::RegistrySecret as i32,
        namespace: "default".into(),
        name: "harbor-prod".into(),
        resource_version: String::new(),
        force,
    };
    let e = c.delete(del(false)).await.expect_err("in use");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("RegistrySecret default/harbor-prod")
            && e.message()
                .contains("Repositories default/nginx-latest, default/nginx-stable")
            && !e.message().contains("team-b"),
        "{}",
        e.message()
    );
    c.get(get_req(pb::Kind::RegistrySecret, "default", "harbor-prod"))
        .await
        .expect("still there");
    c.delete(del(true)).await.expect("forced delete");
    let e = c
        .get(get_req(pb::Kind::RegistrySecret, "default", "harbor-prod"))
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);
    hub.stop().await;
}
