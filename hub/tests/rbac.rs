//! Who may do what, over real mTLS against the hub in process, on the
//! embedded store and on a real etcd: user certificates issued from a CSR,
//! role bindings, the one denial message, lists filtered to what the caller
//! may read, `can-i`, no escalation, user revocation, and re-enrollment.

use std::collections::HashMap;

use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_client::AdminServiceClient;
use imgfleet::model::parse_documents;
use imgfleet_common::pki::{self, Identity};
use imgfleet_common::tls::TlsMaterial;
use imgfleet_hub::config::{Config, StoreConfig};
use imgfleet_hub::server::{self, RunningHub};
use imgfleet_tests::Etcd;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

type Client = AdminServiceClient<Channel>;

struct TestHub {
    hub: RunningHub,
    _dir: tempfile::TempDir,
    admin: TlsMaterial,
    _etcd: Option<Etcd>,
}

impl TestHub {
    async fn start(etcd: Option<Etcd>) -> TestHub {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::for_data_dir(dir.path());
        if let Some(e) = &etcd {
            cfg.store = StoreConfig::Etcd {
                endpoints: vec![e.endpoint()],
                prefix: "/imgfleet-rbac".into(),
            };
        }
        let hub = server::start(cfg, CancellationToken::new())
            .await
            .expect("hub starts");
        let admin = TlsMaterial::from_dir(&hub.admin_dir.clone().expect("admin bundle"))
            .expect("admin bundle loads");
        TestHub {
            hub,
            _dir: dir,
            admin,
            _etcd: etcd,
        }
    }

    async fn client(&self, m: &TlsMaterial) -> Client {
        AdminServiceClient::new(m.connect(&self.hub.url()).await.expect("connect"))
    }

    /// A user's credentials as `imgfleet user issue` makes them: the key
    /// made here, the hub signing a CSR.
    async fn issue(&self, admin: &mut Client, name: &str, groups: &[&str]) -> TlsMaterial {
        let csr = pki::generate_csr(name).expect("csr");
        let r = admin
            .issue_user(pb::IssueUserRequest {
                name: name.into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                validity_days: 1,
                csr_pem: csr.cert_pem,
            })
            .await
            .expect("issue user")
            .into_inner();
        TlsMaterial {
            ca_pem: r.ca_pem,
            cert_pem: r.cert_pem,
            key_pem: csr.key_pem,
        }
    }
}

fn objects(yaml: &str) -> Vec<pb::Object> {
    parse_documents(yaml)
        .expect("valid yaml")
        .iter()
        .map(pb::Object::from)
        .collect()
}

fn apply(o: pb::Object) -> pb::ApplyRequest {
    pb::ApplyRequest {
        object: Some(o),
        dry_run: false,
    }
}

fn repo(ns: &str, name: &str) -> pb::Object {
    objects(&format!(
        r#"
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata: {{name: {name}, namespace: {ns}}}
spec:
  repository: library/nginx
  tag: latest
  registryRef: {{name: harbor-prod}}
"#
    ))
    .remove(0)
}

fn binding(kind: &str, ns: &str, name: &str, role: &str, subjects: &str) -> pb::Object {
    let ns = if ns.is_empty() {
        String::new()
    } else {
        format!(", namespace: {ns}")
    };
    objects(&format!(
        r#"
apiVersion: image.theriseunion.io/v1alpha1
kind: {kind}
metadata: {{name: {name}{ns}}}
spec:
  role: {role}
  subjects: {subjects}
"#
    ))
    .remove(0)
}

fn denied(r: Result<impl std::fmt::Debug, tonic::Status>, message: &str) {
    let e = r.expect_err(message);
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(e.message(), message);
}

fn names(items: &[pb::Object]) -> Vec<String> {
    items
        .iter()
        .filter_map(|o| match &o.kind {
            Some(pb::object::Kind::Repository(r)) => r
                .metadata
                .as_ref()
                .map(|m| format!("{}/{}", m.namespace, m.name)),
            _ => None,
        })
        .collect()
}

async fn can_i(c: &mut Client, verb: &str, resource: &str, ns: &str) -> bool {
    c.can_i(pb::CanIRequest {
        verb: verb.into(),
        resource: resource.into(),
        namespace: ns.into(),
    })
    .await
    .expect("can-i")
    .into_inner()
    .allowed
}

async fn scenario(hub: &TestHub) {
    let mut admin = hub.client(&hub.admin).await;
    // The first start's admin bundle is a user in the built-in admin group.
    assert_eq!(
        pki::identity_from_pem(&hub.admin.cert_pem).expect("id"),
        Identity::User(pki::User {
            name: "admin".into(),
            groups: vec![pki::ADMIN_ORGANIZATION.into()],
        })
    );
    for o in [
        binding(
            "RoleBinding",
            "team-a",
            "team-a-devs",
            "editor",
            "[{kind: Group, name: dev}]",
        ),
        binding(
            "RoleBinding",
            "team-b",
            "team-b-viewers",
            "viewer",
            "[{kind: User, name: user-v}]",
        ),
        binding(
            "RoleBinding",
            "team-a",
            "team-a-lead",
            "admin",
            "[{kind: User, name: lead}]",
        ),
        repo("team-b", "b-app"),
    ] {
        admin.apply(apply(o)).await.expect("admin applies");
    }

    let user_a = hub.issue(&mut admin, "user-a", &["dev"]).await;
    assert_eq!(
        pki::identity_from_pem(&user_a.cert_pem).expect("id"),
        Identity::User(pki::User {
            name: "user-a".into(),
            groups: vec!["dev".into()],
        })
    );
    let mut a = hub.client(&user_a).await;

    // Editor in team-a: applies there.
    a.apply(apply(repo("team-a", "a-app")))
        .await
        .expect("user-a applies in team-a");
    // Refused elsewhere, with the message naming user, verb, kind and namespace.
    denied(
        a.apply(apply(repo("team-b", "sneaky"))).await,
        "user-a may not apply repositories in namespace team-b",
    );
    denied(
        a.get(pb::GetRequest {
            kind: pb::Kind::Repository as i32,
            namespace: "team-b".into(),
            name: "b-app".into(),
        })
        .await,
        "user-a may not get repositories in namespace team-b",
    );
    denied(
        a.enroll_cluster(pb::EnrollClusterRequest {
            name: "edge-9".into(),
            ..Default::default()
        })
        .await,
        "user-a may not enroll clusters",
    );
    denied(
        a.list(pb::ListRequest {
            kind: pb::Kind::Cluster as i32,
            ..Default::default()
        })
        .await,
        "user-a may not list clusters",
    );
    // An editor manages no bindings.
    denied(
        a.apply(apply(binding(
            "RoleBinding",
            "team-a",
            "self",
            "admin",
            "[{kind: User, name: user-a}]",
        )))
        .await,
        "user-a may not apply rolebindings in namespace team-a",
    );

    // Across namespaces: only what the caller may read.
    let all = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.list(pb::ListRequest {
                kind: pb::Kind::Repository as i32,
                all_namespaces: true,
                ..Default::default()
            })
            .await
            .expect("list -A")
            .into_inner()
            .items
        }
    };
    assert_eq!(names(&all(&mut a).await), vec!["team-a/a-app"]);
    assert_eq!(
        names(&all(&mut admin).await),
        vec!["team-a/a-app", "team-b/b-app"]
    );

    // can-i answers as the check decides.
    assert!(can_i(&mut a, "apply", "repositories", "team-a").await);
    assert!(can_i(&mut a, "create", "repo", "team-a").await);
    assert!(!can_i(&mut a, "apply", "repositories", "team-b").await);
    assert!(!can_i(&mut a, "enroll", "clusters", "").await);
    assert!(!can_i(&mut a, "list", "audit", "team-a").await);
    assert!(can_i(&mut admin, "enroll", "clusters", "").await);
    let e = a
        .can_i(pb::CanIRequest {
            verb: "fly".into(),
            resource: "repositories".into(),
            namespace: String::new(),
        })
        .await
        .expect_err("bad verb");
    assert_eq!(e.code(), Code::InvalidArgument);

    // A namespace admin manages the namespace's bindings, up to their own
    // role, and nothing fleet-wide.
    let lead = hub.issue(&mut admin, "lead", &[]).await;
    let mut l = hub.client(&lead).await;
    l.apply(apply(binding(
        "RoleBinding",
        "team-a",
        "more-admins",
        "admin",
        "[{kind: User, name: user-z}]",
    )))
    .await
    .expect("lead binds in team-a");
    denied(
        l.apply(apply(binding(
            "RoleBinding",
            "team-b",
            "grab",
            "viewer",
            "[{kind: User, name: lead}]",
        )))
        .await,
        "lead may not apply rolebindings in namespace team-b",
    );
    denied(
        l.apply(apply(binding(
            "ClusterRoleBinding",
            "",
            "grab",
            "cluster-admin",
            "[{kind: User, name: lead}]",
        )))
        .await,
        "lead may not apply clusterrolebindings",
    );
    let rbs = admin
        .list(pb::ListRequest {
            kind: pb::Kind::RoleBinding as i32,
            all_namespaces: true,
            ..Default::default()
        })
        .await
        .expect("list rolebindings")
        .into_inner();
    assert_eq!(rbs.items.len(), 4);

    // A fleet-wide viewer reads everything and changes nothing.
    admin
        .apply(apply(binding(
            "ClusterRoleBinding",
            "",
            "auditors",
            "cluster-viewer",
            "[{kind: User, name: auditor}]",
        )))
        .await
        .expect("admin binds fleet-wide");
    let auditor = hub.issue(&mut admin, "auditor", &[]).await;
    let mut v = hub.client(&auditor).await;
    assert_eq!(names(&all(&mut v).await).len(), 2);
    denied(
        v.apply(apply(repo("team-a", "nope"))).await,
        "auditor may not apply repositories in namespace team-a",
    );

    // Rolling back needs the rollback verb (editor and up); reading the
    // history needs only get.
    let undo = |ns: &str, name: &str| pb::RolloutUndoRequest {
        namespace: ns.into(),
        name: name.into(),
        to_revision: 0,
    };
    denied(
        v.rollout_undo(undo("team-a", "a-app")).await,
        "auditor may not rollback repositories in namespace team-a",
    );
    denied(
        a.rollout_undo(undo("team-b", "b-app")).await,
        "user-a may not rollback repositories in namespace team-b",
    );
    denied(
        a.rollout_resume(pb::RolloutRequest {
            namespace: "team-b".into(),
            name: "b-app".into(),
        })
        .await,
        "user-a may not rollback repositories in namespace team-b",
    );
    let history = v
        .rollout_history(pb::RolloutRequest {
            namespace: "team-a".into(),
            name: "a-app".into(),
        })
        .await
        .expect("a viewer reads the history")
        .into_inner();
    assert!(history.revisions.is_empty(), "{history:?}");
    // Allowed, but nothing resolved yet: the error says so.
    let e = a
        .rollout_undo(undo("team-a", "a-app"))
        .await
        .expect_err("no revisions");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        e.message(),
        "repository team-a/a-app has no revisions yet: its tags have not resolved"
    );

    // Revoking a user refuses every certificate issued to them so far; a
    // new one works.
    admin
        .revoke_user(pb::RevokeUserRequest {
            name: "user-a".into(),
        })
        .await
        .expect("revoke");
    let e = a
        .get(pb::GetRequest {
            kind: pb::Kind::Repository as i32,
            namespace: "team-a".into(),
            name: "a-app".into(),
        })
        .await
        .expect_err("revoked");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{}", e.message());
    let again = hub.issue(&mut admin, "user-a", &["dev"]).await;
    hub.client(&again)
        .await
        .get(pb::GetRequest {
            kind: pb::Kind::Repository as i32,
            namespace: "team-a".into(),
            name: "a-app".into(),
        })
        .await
        .expect("a new certificate works");
    // A user cannot issue users (nor give themselves the admin group).
    denied(
        hub.client(&again)
            .await
            .issue_user(pb::IssueUserRequest {
                name: "user-a".into(),
                groups: vec![pki::ADMIN_ORGANIZATION.into()],
                validity_days: 1,
                csr_pem: pki::generate_csr("x").expect("csr").cert_pem,
            })
            .await,
        "user-a may not issue users",
    );

    audit_trail(hub, &mut admin, &mut l).await;

    // Re-enrolling needs --reissue and keeps labels and tenants.
    admin
        .enroll_cluster(pb::EnrollClusterRequest {
            name: "edge-1".into(),
            labels: HashMap::from([("region".to_string(), "eu".to_string())]),
            tenants: vec!["team-a".into()],
            validity_days: 1,
            ..Default::default()
        })
        .await
        .expect("enroll");
    let e = admin
        .enroll_cluster(pb::EnrollClusterRequest {
            name: "edge-1".into(),
            ..Default::default()
        })
        .await
        .expect_err("enrolled twice");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("--reissue"), "{}", e.message());
    let r = admin
        .enroll_cluster(pb::EnrollClusterRequest {
            name: "edge-1".into(),
            reissue: true,
            ..Default::default()
        })
        .await
        .expect("reissue")
        .into_inner();
    let cl = r.cluster.expect("cluster");
    assert_eq!(
        cl.metadata
            .expect("meta")
            .labels
            .get("region")
            .map(String::as_str),
        Some("eu")
    );
    assert_eq!(cl.spec.expect("spec").tenants, vec!["team-a".to_string()]);

    // Deleting the cluster revokes the certificate just issued, in the same
    // transaction as the delete.
    let issued = pki::cert_facts_pem(&r.cert_pem)
        .expect("facts")
        .issued_at_nanos;
    admin
        .delete(pb::DeleteRequest {
            kind: pb::Kind::Cluster as i32,
            name: "edge-1".into(),
            ..Default::default()
        })
        .await
        .expect("delete cluster");
    let revocations =
        imgfleet_hub::revocation::Revocations::new(hub.hub.context.objects.store().clone());
    assert!(
        revocations
            .refuses(
                &imgfleet_hub::revocation::Revoked::Cluster("edge-1".into()),
                issued
            )
            .await
            .expect("read revocations")
    );
}

async fn query(c: &mut Client, ns: &str) -> Result<Vec<pb::AuditEvent>, tonic::Status> {
    c.query_audit(pb::AuditQuery {
        namespace: ns.into(),
        all_namespaces: ns.is_empty(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().events)
}

/// The trail holds user-a's allowed and denied calls, each change with the
/// resourceVersion it produced, and never a password; namespace admins read
/// their namespace's records only; old records are pruned, and that is
/// recorded too.
async fn audit_trail(hub: &TestHub, admin: &mut Client, lead: &mut Client) {
    const PASSWORD: &str = "S3cret-Pa55word";
    let secret = objects(&format!(
        r#"
apiVersion: image.theriseunion.io/v1alpha1
kind: RegistrySecret
metadata: {{name: harbor-prod, namespace: team-a}}
spec: {{domain: harbor.example.com, username: robot, password: "{PASSWORD}"}}
"#
    ))
    .remove(0);
    admin.apply(apply(secret.clone())).await.expect("secret");
    let mut changed = secret;
    if let Some(pb::object::Kind::RegistrySecret(rs)) = &mut changed.kind {
        rs.spec.as_mut().expect("spec").password = format!("{PASSWORD}-2");
    }
    admin.apply(apply(changed)).await.expect("new password");

    let all = query(admin, "").await.expect("admin reads the trail");
    let of = |user: &str, verb: &str, outcome: &str| -> Vec<&pb::AuditEvent> {
        all.iter()
            .filter(|e| e.user == user && e.verb == verb && e.outcome == outcome)
            .collect()
    };
    let applied = of("user-a", "apply", "allowed");
    assert_eq!(applied.len(), 1, "{all:#?}");
    assert_eq!(
        (applied[0].namespace.as_str(), applied[0].name.as_str()),
        ("team-a", "a-app")
    );
    assert!(!applied[0].resource_version.is_empty());
    assert_eq!(applied[0].groups, vec!["dev".to_string()]);
    assert!(
        applied[0].source.starts_with("127.0.0.1:"),
        "{:?}",
        applied[0]
    );
    let denied_apply = of("user-a", "apply", "denied");
    assert!(
        denied_apply.iter().any(|e| e.message
            == "user-a may not apply repositories in namespace team-b"
            && e.code == Code::PermissionDenied as i32),
        "{all:#?}"
    );
    // The get in team-b, and the one with the revoked certificate.
    let gets = of("user-a", "get", "denied");
    assert_eq!(gets.len(), 2, "{gets:#?}");
    assert!(gets[1].message.contains("revoked"), "{:?}", gets[1]);
    assert_eq!(of("user-a", "enroll", "denied").len(), 1);
    assert_eq!(of("admin", "issue", "allowed").len(), 4);
    assert_eq!(of("user-a", "issue", "denied").len(), 1);
    assert_eq!(of("admin", "revoke", "allowed").len(), 1);
    let pw: Vec<&pb::AuditEvent> = all
        .iter()
        .filter(|e| e.resource == "registrysecrets" && e.outcome == "allowed")
        .collect();
    assert_eq!(pw.len(), 2);
    assert!(pw[1].message.contains("password changed"), "{:?}", pw[1]);
    for e in &all {
        assert!(!format!("{e:?}").contains(PASSWORD), "a password in {e:?}");
    }
    // The change and its record share the revision: the object's
    // resourceVersion is the record's.
    let got = admin
        .get(pb::GetRequest {
            kind: pb::Kind::RegistrySecret as i32,
            namespace: "team-a".into(),
            name: "harbor-prod".into(),
        })
        .await
        .expect("get")
        .into_inner();
    let Some(pb::object::Kind::RegistrySecret(rs)) = got.kind else {
        panic!("not a secret")
    };
    assert_eq!(
        rs.metadata.expect("meta").resource_version,
        pw[1].resource_version
    );

    // A namespace admin reads that namespace only; an editor reads none.
    let team_a = query(lead, "team-a").await.expect("lead reads team-a");
    assert!(!team_a.is_empty());
    assert!(team_a.iter().all(|e| e.namespace == "team-a"));
    let across = query(lead, "").await.expect("lead reads across");
    assert!(
        across.iter().all(|e| e.namespace == "team-a"),
        "{across:#?}"
    );
    let e = query(lead, "team-b").await.expect_err("team-b");
    assert_eq!(e.message(), "lead may not list audit in namespace team-b");

    // Retention: everything is older than a millisecond.
    let store = hub.hub.context.objects.store().clone();
    let removed = imgfleet_hub::audit::prune(store.as_ref(), std::time::Duration::from_millis(1))
        .await
        .expect("prune");
    assert!(removed >= all.len(), "{removed} < {}", all.len());
    let after = query(admin, "").await.expect("trail after pruning");
    assert!(
        after
            .iter()
            .any(|e| e.verb == "prune" && e.message.contains("removed")),
        "{after:#?}"
    );
}

#[tokio::test]
async fn rbac_on_the_embedded_store() {
    let hub = TestHub::start(None).await;
    scenario(&hub).await;
    hub.hub.stop().await.expect("stop");
}

#[tokio::test]
async fn rbac_on_etcd() {
    let etcd = Etcd::start()
        .await
        .expect("etcd (apt-get install etcd-server)");
    let hub = TestHub::start(Some(etcd)).await;
    scenario(&hub).await;
    hub.hub.stop().await.expect("stop");
}
