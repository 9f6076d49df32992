//! The tag resolver as a hub task, in process against a real registry (and a
//! real etcd for the election): a missing RegistrySecret is reported by
//! name and resolution follows once it exists, a spec change is resolved at
//! once without touching the per-cluster status fields, suspended
//! Repositories are left alone, a dead registry does not hold up the others,
//! and the resolver leadership passes to another replica when the leader stops.

use std::path::Path;
use std::time::{Duration, Instant};

use imgfleet::model::{Kind, Object, RepositoryStatus, parse_documents};
use imgfleet_hub::config::{Config, SecretKeySource};
use imgfleet_hub::leader::Election;
use imgfleet_hub::objects::Objects;
use imgfleet_hub::server::{self, Parts, RunningHub};
use imgfleet_tests::images::{ImageSpec, push_image};
use imgfleet_tests::{Etcd, Registry, RegistryOptions, free_port};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "loop-test-pw-42";

async fn start_hub(dir: &Path) -> RunningHub {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cfg = Config::for_data_dir(dir);
    cfg.metrics_listen = None;
    cfg.secret_key = SecretKeySource::Raw(zeroize::Zeroizing::new(vec![9u8; 32]));
    let parts = Parts {
        agent_api: false,
        resolver: true,
    };
    server::start_with(cfg, CancellationToken::new(), parts)
        .await
        .expect("hub starts")
}

async fn apply(objects: &Objects, yaml: &str) {
    for obj in parse_documents(yaml).expect("test YAML is valid") {
        objects.apply(obj, false).await.expect("apply");
    }
}

async fn repo_status(objects: &Objects, name: &str) -> (Option<RepositoryStatus>, i64) {
    match objects
        .get(Kind::Repository, Some("default"), name)
        .await
        .expect("get repository")
    {
        Object::Repository(r) => (r.status, r.metadata.generation.unwrap_or(0)),
        other => panic!("not a repository: {}", other.id()),
    }
}

/// Polls until `check` accepts the Repository's status, at most 10 s.
async fn wait_status(
    objects: &Objects,
    name: &str,
    what: &str,
    check: impl Fn(&RepositoryStatus, i64) -> bool,
) -> RepositoryStatus {
    let started = Instant::now();
    loop {
        let (status, generation) = repo_status(objects, name).await;
        if let Some(s) = status.filter(|s| check(s, generation)) {
            return s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: {what} not within 10 s; status {:?}",
            repo_status(objects, name).await.0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn secret_yaml(name: &str, domain: &str) -> String {
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\nmetadata: {{name: {name}, namespace: default}}\nspec: {{domain: \"{domain}\", username: admin, password: \"{PASSWORD}\", insecure: true}}\n"
    )
}

fn repo_yaml(name: &str, secret: &str, tag: &str, extra: &str) -> String {
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  repository: demo/app\n  tag: {tag}\n  registryRef: {{name: {secret}}}\n  syncInterval: 1h\n{extra}"
    )
}

#[tokio::test]
async fn resolver_task_follows_changes() {
    let registry = Registry::start(RegistryOptions::plain().with_auth("admin", PASSWORD))
        .await
        .expect("registry starts");
    let v1 = push_image(&registry, "demo/app", "v1", &ImageSpec::random(&[1024], 11))
        .await
        .expect("push v1");
    let v2 = push_image(&registry, "demo/app", "v2", &ImageSpec::random(&[1024], 12))
        .await
        .expect("push v2");
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = start_hub(dir.path()).await;
    let objects = hub.context.objects.clone();

    // A missing RegistrySecret is reported by name.
    apply(&objects, &repo_yaml("app", "upstream", "v1", "")).await;
    apply(
        &objects,
        &repo_yaml("paused", "upstream", "v1", "  suspend: true\n"),
    )
    .await;
    let s = wait_status(&objects, "app", "reason NotFound", |s, _| {
        s.reason == Some(imgfleet::model::ResolveReason::NotFound)
    })
    .await;
    let message = s.message.unwrap_or_default();
    assert!(message.contains("default/upstream"), "{message}");

    // Creating it resolves the Repository at once (not after the back-off).
    let created = Instant::now();
    apply(&objects, &secret_yaml("upstream", &registry.addr())).await;
    let s = wait_status(&objects, "app", "resolved v1", |s, _| {
        s.resolved.first().map(|r| r.digest.as_str()) == Some(v1.manifest_digest.as_str())
    })
    .await;
    assert!(s.reason.is_none() && !s.stale && s.last_resolve_time.is_some());
    assert!(
        created.elapsed() < Duration::from_secs(5),
        "resolved {:?} after the secret appeared",
        created.elapsed()
    );

    // The session's fields survive the resolver's writes.
    let Object::Repository(mut r) = objects
        .get(Kind::Repository, Some("default"), "app")
        .await
        .expect("get")
    else {
        panic!("a repository")
    };
    let rev: u64 = r
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("revision");
    let mut status = r.status.take().unwrap_or_default();
    status.clusters = ["edge-1", "edge-2"]
        .iter()
        .map(|c| imgfleet::model::ClusterImageStatus {
            cluster: c.to_string(),
            digest: v1.manifest_digest.clone(),
            phase: Some(imgfleet::model::ImagePhase::Synced),
            ..Default::default()
        })
        .collect();
    status.synced_clusters = 2;
    status.target_clusters = 3;
    r.status = Some(status);
    objects
        .write_status(&Object::Repository(r), Some(rev))
        .await
        .expect("session-like status write");

    // A spec change is resolved at once.
    let changed = Instant::now();
    apply(&objects, &repo_yaml("app", "upstream", "v2", "")).await;
    let s = wait_status(&objects, "app", "resolved v2", |s, g| {
        s.observed_generation == g
            && s.resolved.first().map(|r| r.digest.as_str()) == Some(v2.manifest_digest.as_str())
    })
    .await;
    let spec_change_ms = changed.elapsed().as_millis();
    // The session's entries and target count are kept; the synced count is
    // recounted in the same write: nobody reported the new digest yet.
    assert_eq!(s.clusters.len(), 2, "{s:?}");
    assert_eq!((s.synced_clusters, s.target_clusters), (0, 3), "{s:?}");
    eprintln!("spec change -> new digest in status: {spec_change_ms} ms");

    // A dead registry fails as Unreachable and holds up nobody.
    let dead = format!("127.0.0.1:{}", free_port());
    apply(&objects, &secret_yaml("dead", &dead)).await;
    apply(&objects, &repo_yaml("stuck", "dead", "v1", "")).await;
    apply(&objects, &repo_yaml("other", "upstream", "v1", "")).await;
    wait_status(&objects, "other", "resolved", |s, _| !s.resolved.is_empty()).await;
    wait_status(&objects, "stuck", "reason Unreachable", |s, _| {
        s.reason == Some(imgfleet::model::ResolveReason::Unreachable)
    })
    .await;

    // Registry health shows on the secrets.
    let started = Instant::now();
    loop {
        let phases: Vec<_> = objects
            .list(Kind::RegistrySecret, None)
            .await
            .expect("list")
            .0
            .into_iter()
            .filter_map(|o| match o {
                Object::RegistrySecret(rs) => Some((
                    rs.metadata.name.clone().unwrap_or_default(),
                    rs.status.as_ref().and_then(|s| s.phase),
                    rs.status
                        .as_ref()
                        .and_then(|s| s.last_check_time.clone())
                        .is_some(),
                )),
                _ => None,
            })
            .collect();
        use imgfleet::model::ConnectionPhase::*;
        let want = [
            ("dead".to_string(), Some(Unreachable), true),
            ("upstream".to_string(), Some(Connected), true),
        ];
        if phases == want {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{phases:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Suspended: never resolved.
    assert!(
        repo_status(&objects, "paused")
            .await
            .0
            .is_none_or(|s| s.resolved.is_empty() && s.reason.is_none()),
        "a suspended Repository was resolved"
    );
    hub.stop().await.expect("hub stops");
}

#[tokio::test]
async fn resolver_leadership_passes_on_when_the_leader_stops() {
    let etcd = Etcd::start().await.expect("etcd starts");
    let election = |id: &str| Election::Etcd {
        endpoints: etcd.endpoints(),
        key: "/imgfleet-test/leader/resolver".into(),
        identity: id.into(),
    };
    let (tx_a, rx_a) = watch::channel(false);
    let (tx_b, rx_b) = watch::channel(false);
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let a = tokio::spawn(election("a").run(tx_a, stop_a.clone()));
    let b = tokio::spawn(election("b").run(tx_b, stop_b.clone()));

    let started = Instant::now();
    while !*rx_a.borrow() && !*rx_b.borrow() {
        assert!(started.elapsed() < Duration::from_secs(10), "nobody leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Over several campaign ticks, exactly one leads all along.
    let watched = Instant::now();
    while watched.elapsed() < imgfleet_hub::leader::CAMPAIGN_TICK * 3 {
        let (a_leads, b_leads) = (*rx_a.borrow(), *rx_b.borrow());
        assert!(
            a_leads ^ b_leads,
            "exactly one leads: a={a_leads} b={b_leads} after {:?}",
            watched.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a_leads = *rx_a.borrow();
    assert_eq!(
        etcd.get("/imgfleet-test/leader/resolver")
            .await
            .expect("etcd get")
            .as_deref(),
        Some(if a_leads {
            b"a".as_slice()
        } else {
            b"b".as_slice()
        }),
        "the key names the leader"
    );

    // The leader steps down (revoking its lease); the other takes over
    // without waiting for the lease to expire.
    let (stop_leader, rx_other) = if a_leads {
        (stop_a.clone(), rx_b.clone())
    } else {
        (stop_b.clone(), rx_a.clone())
    };
    let stepped = Instant::now();
    stop_leader.cancel();
    while !*rx_other.borrow() {
        assert!(
            stepped.elapsed() < Duration::from_secs(4),
            "no takeover within 4 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "leader stepped down -> other leads: {} ms",
        stepped.elapsed().as_millis()
    );
    stop_a.cancel();
    stop_b.cancel();
    a.await.expect("election a ends");
    b.await.expect("election b ends");
}

/// Applies `yaml` as `user` would through the admin API: with its audit
/// record, which is where a revision finds who made an edit.
async fn apply_as(objects: &Objects, user: &str, yaml: &str) {
    for obj in parse_documents(yaml).expect("test YAML is valid") {
        let draft = imgfleet_hub::audit::Draft {
            user: user.into(),
            verb: "apply".into(),
            resource: obj.kind().plural().into(),
            namespace: obj.namespace().unwrap_or_default().into(),
            name: obj.name().into(),
            ..Default::default()
        };
        let audit = imgfleet_hub::objects::Audit {
            draft: &draft,
            extra: &[],
        };
        objects
            .apply_audited(obj, false, Some(audit))
            .await
            .expect("apply");
    }
}

#[tokio::test]
async fn revisions_name_who_created_and_who_edited() {
    use imgfleet::model::RevisionCause;
    let registry = Registry::start(RegistryOptions::plain().with_auth("admin", PASSWORD))
        .await
        .expect("registry starts");
    let v1 = push_image(&registry, "demo/app", "v1", &ImageSpec::random(&[1024], 21))
        .await
        .expect("push v1");
    let v2 = push_image(&registry, "demo/app", "v2", &ImageSpec::random(&[1024], 22))
        .await
        .expect("push v2");
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = start_hub(dir.path()).await;
    let objects = hub.context.objects.clone();
    apply_as(
        &objects,
        "carol",
        &secret_yaml("upstream", &registry.addr()),
    )
    .await;
    apply_as(&objects, "alice", &repo_yaml("app", "upstream", "v1", "")).await;
    let s = wait_status(&objects, "app", "revision 1", |s, _| s.revisions.len() == 1).await;
    let r = &s.revisions[0];
    assert_eq!(
        (
            r.revision,
            r.cause,
            r.user.as_deref(),
            r.resolved[0].digest.as_str()
        ),
        (
            1,
            RevisionCause::Created,
            Some("alice"),
            v1.manifest_digest.as_str()
        )
    );
    // Another user's edit that moves the digest: revision 2, by them.
    apply_as(&objects, "bob", &repo_yaml("app", "upstream", "v2", "")).await;
    let s = wait_status(&objects, "app", "revision 2", |s, _| s.revisions.len() == 2).await;
    let r = &s.revisions[1];
    assert_eq!(
        (
            r.revision,
            r.cause,
            r.user.as_deref(),
            r.resolved[0].digest.as_str()
        ),
        (
            2,
            RevisionCause::Edit,
            Some("bob"),
            v2.manifest_digest.as_str()
        )
    );
    assert_eq!(s.resolved[0].digest, v2.manifest_digest);
    hub.stop().await.expect("hub stops");
}
