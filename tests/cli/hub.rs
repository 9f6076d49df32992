//! Runs the hub-talking verbs of the real `imgfleet` binary: against a closed
//! port (the "cannot reach the hub" message), and against a small in-memory
//! AdminService served by tonic over real mutual TLS, so apply, get, describe,
//! delete and cluster enroll are exercised over the wire contract before the
//! real hub exists.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_server::{AdminService, AdminServiceServer};
use imgfleet::model::{Kind, Object};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tonic::{Request, Response, Status};

/// A throwaway CA with a server certificate for 127.0.0.1 and a client certificate.
struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "imgfleet test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("server key");
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .expect("server cert");

    let client_key = KeyPair::generate().expect("client key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    client_params
        .distinguished_name
        .push(DnType::CommonName, "admin");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params
        .signed_by(&client_key, &issuer)
        .expect("client cert");

    Pki {
        ca_pem: ca_cert.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn write_client_credentials(dir: &Path, pki: &Pki) {
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).expect("ca.pem");
    std::fs::write(dir.join("cert.pem"), &pki.client_cert).expect("cert.pem");
    std::fs::write(dir.join("key.pem"), &pki.client_key).expect("key.pem");
}

fn imgfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imgfleet"))
        .args(args)
        .env_remove("IMGFLEET_HUB")
        .env_remove("IMGFLEET_CREDENTIALS")
        .output()
        .expect("imgfleet runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[test]
fn an_unreachable_hub_is_reported_with_its_url() {
    let pki = pki();
    let creds = tempfile::tempdir().expect("tempdir");
    write_client_credentials(creds.path(), &pki);
    let hub = format!("https://127.0.0.1:{}", closed_port());
    let dir = creds.path().display().to_string();
    for args in [
        vec!["get", "repositories", "--hub", &hub, "--credentials", &dir],
        vec!["describe", "rs", "x", "--hub", &hub, "--credentials", &dir],
        vec![
            "delete",
            "cluster",
            "x",
            "--hub",
            &hub,
            "--credentials",
            &dir,
        ],
    ] {
        let out = imgfleet(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: cannot reach the hub at {hub}: ")),
            "{args:?}: {stderr}"
        );
        // The cause is there too, not only the wrapper.
        assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
    }
}

#[test]
fn missing_credentials_are_named_with_a_hint() {
    let empty = tempfile::tempdir().expect("tempdir");
    let dir = empty.path().display().to_string();
    let out = imgfleet(&["get", "rs", "--credentials", &dir]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read {dir}/ca.pem")),
        "{stderr}"
    );
    assert!(
        stderr.contains("imgfleet-hub prints where its admin bundle is"),
        "{stderr}"
    );

    let out = imgfleet(&["get", "rs"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no client credentials given"));
}

#[test]
fn invalid_input_is_refused_before_contacting_the_hub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata: {name: x}\nspec: {repository: x, tag: y, registryRef: {name: r}, syncInterval: 1x}\n",
    )
    .expect("write");
    let hub = format!("https://127.0.0.1:{}", closed_port());
    let file = file.display().to_string();
    let out = imgfleet(&["apply", "-f", &file, "--hub", &hub]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("spec.syncInterval \"1x\""), "{stderr}");
    assert!(stderr.contains("nothing applied"), "{stderr}");
    assert!(!stderr.contains("cannot reach"), "{stderr}");

    let out = imgfleet(&[
        "cluster",
        "enroll",
        "Edge_1",
        "--label",
        "region=east",
        "--out",
        "/nonexistent/x",
        "--hub",
        &hub,
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("metadata.name \"Edge_1\""), "{stderr}");
}

// ---------------------------------------------------------------------------
// An in-memory AdminService over mutual TLS.
// ---------------------------------------------------------------------------

type Key = (Kind, String, String);

struct MemoryHub {
    objects: Mutex<BTreeMap<Key, Object>>,
    issued: (String, String, String),
}

fn key_of(o: &Object) -> Key {
    (
        o.kind(),
        o.namespace().unwrap_or_default().to_owned(),
        o.name().to_owned(),
    )
}

fn kind_of(n: i32) -> Result<Kind, Status> {
    imgfleet::convert::kind_from_proto(n)
        .ok_or_else(|| Status::invalid_argument("kind: unspecified"))
}

#[tonic::async_trait]
impl AdminService for MemoryHub {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let wire = request
            .into_inner()
            .object
            .ok_or_else(|| Status::invalid_argument("object: missing"))?;
        let object = Object::try_from(wire).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Err(errors) = object.validate() {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Err(Status::invalid_argument(text.join("; ")));
        }
        let mut objects = self
            .objects
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        let outcome = match objects.insert(key_of(&object), object.clone()) {
            None => pb::ApplyOutcome::Created,
            Some(old) if old == object => pb::ApplyOutcome::Unchanged,
            Some(_) => pb::ApplyOutcome::Updated,
        };
        Ok(Response::new(pb::ApplyResponse {
            object: Some(imgfleet::convert::to_response(&object)),
            outcome: outcome as i32,
        }))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Object>, Status> {
        let r = request.into_inner();
        let key = (kind_of(r.kind)?, r.namespace, r.name);
        let objects = self
            .objects
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        objects
            .get(&key)
            .map(|o| Response::new(imgfleet::convert::to_response(o)))
            .ok_or_else(|| Status::not_found("no such object"))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let r = request.into_inner();
        let kind = kind_of(r.kind)?;
        let objects = self
            .objects
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        let items = objects
            .iter()
            .filter(|((k, ns, _), _)| {
                *k == kind && (r.all_namespaces || !kind.namespaced() || *ns == r.namespace)
            })
            .map(|(_, o)| imgfleet::convert::to_response(o))
            .collect();
        Ok(Response::new(pb::ListResponse {
            items,
            resource_version: "1".into(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = request.into_inner();
        let key = (kind_of(r.kind)?, r.namespace, r.name);
        let mut objects = self
            .objects
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        objects
            .remove(&key)
            .map(|o| {
                Response::new(pb::DeleteResponse {
                    object: Some(imgfleet::convert::to_response(&o)),
                })
            })
            .ok_or_else(|| Status::not_found("no such object"))
    }

    type WatchStream = tokio_stream::Empty<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        _request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }

    // The RBAC and revocation calls are exercised against the real hub
    // (hub/tests/rbac.rs); this double does not take part in them.
    async fn can_i(
        &self,
        _: Request<pb::CanIRequest>,
    ) -> Result<Response<pb::CanIResponse>, Status> {
        Err(Status::unimplemented("not in the in-memory hub"))
    }

    async fn issue_user(
        &self,
        _: Request<pb::IssueUserRequest>,
    ) -> Result<Response<pb::IssueUserResponse>, Status> {
        Err(Status::unimplemented("not in the in-memory hub"))
    }

    async fn revoke_user(
        &self,
        _: Request<pb::RevokeUserRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        Err(Status::unimplemented("not in the in-memory hub"))
    }

    async fn revoke_cluster(
        &self,
        _: Request<pb::RevokeClusterRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        Err(Status::unimplemented("not in the in-memory hub"))
    }

    async fn query_audit(
        &self,
        _: Request<pb::AuditQuery>,
    ) -> Result<Response<pb::AuditResponse>, Status> {
        Err(Status::unimplemented("not in the in-memory hub"))
    }

    async fn issue_pull_token(
        &self,
        _: Request<pb::PullTokenRequest>,
    ) -> Result<Response<pb::PullTokenResponse>, Status> {
        Err(Status::unimplemented("not in the in-memory hub"))
    }

    async fn rollout_history(
        &self,
        _: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutHistoryResponse>, Status> {
        Err(Status::unimplemented("not in the in-memory hub"))
    }

    async fn rollout_undo(
        &self,
        _: Request<pb::RolloutUndoRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        Err(Status::unimplemented("not in the in-memory hub"))
    }

    async fn rollout_resume(
        &self,
        _: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        Err(Status::unimplemented("not in the in-memory hub"))
    }

    async fn enroll_cluster(
        &self,
        request: Request<pb::EnrollClusterRequest>,
    ) -> Result<Response<pb::EnrollClusterResponse>, Status> {
        let r = request.into_inner();
        let cluster = pb::Cluster {
            metadata: Some(pb::ObjectMeta {
                name: r.name,
                labels: r.labels,
                ..Default::default()
            }),
            spec: Some(pb::ClusterSpec {
                tenants: r.tenants,
                description: String::new(),
            }),
            status: None,
        };
        let object = Object::try_from(pb::Object {
            kind: Some(pb::object::Kind::Cluster(cluster.clone())),
        })
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut objects = self
            .objects
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        objects.insert(key_of(&object), object);
        Ok(Response::new(pb::EnrollClusterResponse {
            cluster: Some(cluster),
            ca_pem: self.issued.0.clone(),
            cert_pem: self.issued.1.clone(),
            key_pem: self.issued.2.clone(),
        }))
    }
}

#[test]
fn verbs_work_against_an_admin_service_over_mutual_tls() {
    let hub = ServedHub::start();
    let seed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/model/testdata/seed-production.yaml")
        .display()
        .to_string();
    apply_reports_each_object(&hub, &seed);
    get_shows_tables_yaml_and_json_without_passwords(&hub);
    describe_and_a_missing_object(&hub);
    enroll_writes_private_credentials(&hub);
    delete_goes_in_reverse_order(&hub, &seed);
    a_foreign_certificate_is_refused(&hub);
}

/// The in-memory AdminService on a free port, and the admin credentials for it.
struct ServedHub {
    pki: Pki,
    url: String,
    creds: tempfile::TempDir,
    /// Serves the AdminService; stopped on drop.
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    _runtime: tokio::runtime::Runtime,
}

impl ServedHub {
    fn start() -> ServedHub {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = pki();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let service = MemoryHub {
            objects: Mutex::new(BTreeMap::new()),
            issued: (
                pki.ca_pem.clone(),
                pki.client_cert.clone(),
                pki.client_key.clone(),
            ),
        };
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &pki.server_cert,
                &pki.server_key,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(&pki.ca_pem));
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("server tls")
            .add_service(AdminServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = runtime.spawn(server);
        let creds = tempfile::tempdir().expect("tempdir");
        write_client_credentials(creds.path(), &pki);
        ServedHub {
            pki,
            url: format!("https://127.0.0.1:{port}"),
            creds,
            server,
            _runtime: runtime,
        }
    }

    /// Runs `imgfleet ARGS --hub URL --credentials DIR`: (exit code, stdout, stderr).
    fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let dir = self.creds.path().display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--hub", &self.url, "--credentials", &dir]);
        let out = imgfleet(&all);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    }
}

impl Drop for ServedHub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn apply_reports_each_object(hub: &ServedHub, seed: &str) {
    let (code, stdout, stderr) = hub.run(&["apply", "-f", seed]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        "RegistrySecret production/harbor-prod created\nRepository production/myapp-v1.0.0 created\n"
    );
    let (_, stdout, _) = hub.run(&["apply", "-f", seed]);
    assert!(
        stdout.contains("Repository production/myapp-v1.0.0 unchanged"),
        "{stdout}"
    );
}

fn get_shows_tables_yaml_and_json_without_passwords(hub: &ServedHub) {
    let (code, stdout, stderr) = hub.run(&["get", "repo", "-n", "production"]);
    assert_eq!(code, Some(0), "{stderr}");
    let mut lines = stdout.lines();
    let mut words = || -> Vec<&str> {
        lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect()
    };
    let header = "NAMESPACE NAME REPOSITORY TAG DIGEST SYNCED AGE";
    assert_eq!(words(), header.split_whitespace().collect::<Vec<_>>());
    // Nothing resolves tags in this fake hub, so DIGEST says so.
    assert_eq!(
        words()[..6],
        [
            "production",
            "myapp-v1.0.0",
            "myapp/myapp",
            "v1.0.0",
            "<none>",
            "0/0"
        ]
    );

    let (code, stdout, stderr) =
        hub.run(&["get", "rs", "harbor-prod", "-n", "production", "-o", "yaml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("domain: harbor.example.com"), "{stdout}");
    assert!(
        !stdout.contains("SecurePassword123") && !stdout.contains("password"),
        "{stdout}"
    );

    let (code, stdout, _) = hub.run(&["get", "rs", "-A", "-o", "json"]);
    assert_eq!(code, Some(0));
    let list: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(list["items"][0]["spec"]["provider"], "harbor");
}

fn describe_and_a_missing_object(hub: &ServedHub) {
    let (code, stdout, stderr) =
        hub.run(&["describe", "repository", "myapp-v1.0.0", "-n", "production"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("Registry:       production/harbor-prod"),
        "{stdout}"
    );
    assert!(stdout.contains("Sync interval:  24h"), "{stdout}");

    let (code, _, stderr) = hub.run(&["get", "repo", "nope"]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.trim(), "error: Repository default/nope not found");
}

fn enroll_writes_private_credentials(hub: &ServedHub) {
    use std::os::unix::fs::PermissionsExt;
    let out_dir = hub.creds.path().join("edge-1");
    let out_str = out_dir.display().to_string();
    let (code, stdout, stderr) = hub.run(&[
        "cluster",
        "enroll",
        "edge-1",
        "--label",
        "region=east",
        "--namespace",
        "production",
        "--out",
        &out_str,
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("Cluster edge-1 enrolled"), "{stdout}");
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .expect("stat")
    };
    assert_eq!(mode(&out_dir), 0o700);
    assert_eq!(mode(&out_dir.join("key.pem")), 0o600);
    assert_eq!(
        std::fs::read_to_string(out_dir.join("cert.pem")).expect("cert"),
        hub.pki.client_cert
    );
    let (code, stdout, _) = hub.run(&["get", "clusters"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("edge-1")
            && stdout.contains("region=east")
            && stdout.contains("production"),
        "{stdout}"
    );
}

fn delete_goes_in_reverse_order(hub: &ServedHub, seed: &str) {
    let (code, stdout, stderr) = hub.run(&["delete", "-f", seed]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        "Repository production/myapp-v1.0.0 deleted\nRegistrySecret production/harbor-prod deleted\n"
    );
    let (code, _, stderr) = hub.run(&["delete", "rs", "harbor-prod", "-n", "production"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("RegistrySecret production/harbor-prod not found"),
        "{stderr}"
    );
}

/// A client certificate from another CA is refused by the hub.
fn a_foreign_certificate_is_refused(hub: &ServedHub) {
    let stranger = crate::pki();
    let other = tempfile::tempdir().expect("tempdir");
    write_client_credentials(
        other.path(),
        &Pki {
            ca_pem: hub.pki.ca_pem.clone(),
            ..stranger
        },
    );
    let other_dir = other.path().display().to_string();
    let out = imgfleet(&["get", "rs", "--hub", &hub.url, "--credentials", &other_dir]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "error: the connection to the hub at {} failed: ",
            hub.url
        )),
        "{stderr}"
    );
    assert!(stderr.contains("check --credentials"), "{stderr}");
}
