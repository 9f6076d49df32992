//! The AdminService: Apply, Get, List, Delete, Watch and EnrollCluster over
//! mutually authenticated gRPC. Every RPC first checks that the caller's
//! client certificate is an admin identity; errors are mapped to gRPC codes
//! in one place (`impl From<AdminError> for Status`). Responses never carry a
//! password (`password_set` says one is stored).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_server::AdminService as AdminApi;
use imgfleet::convert::{kind_from_proto, to_response};
use imgfleet::model::{self, Cluster, ClusterSpec, Kind, Object};
use imgfleet_common::pki::{
    CertificateAuthority, DEFAULT_LEAF_VALIDITY_DAYS, Identity, MAX_LEAF_VALIDITY_DAYS,
};
use imgfleet_common::tls::{TlsError, peer_identity};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use crate::fleet::{PlacementReport, PlacementReports};
use crate::metrics::HubMetrics;
use crate::objects::{ApplyOutcome, ObjectError, Objects};
use crate::selector::parse_selector;
use crate::store::{StoreError, WatchEvent};

/// Errors of the admin API, each mapped to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No client certificate, or one without an imgfleet identity.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid identity that may not call the admin API (a cluster agent).
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A stale resourceVersion.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Concurrent writers kept winning; retry.
    #[error("{0}")]
    Aborted(String),
    /// The store is down; retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        let code = match &e {
            AdminError::Unauthenticated(_) => Code::Unauthenticated,
            AdminError::PermissionDenied(_) => Code::PermissionDenied,
            AdminError::InvalidArgument(_) => Code::InvalidArgument,
            AdminError::NotFound(_) => Code::NotFound,
            AdminError::AlreadyExists(_) => Code::AlreadyExists,
            AdminError::FailedPrecondition(_) => Code::FailedPrecondition,
            AdminError::Aborted(_) => Code::Aborted,
            AdminError::Unavailable(_) => Code::Unavailable,
            AdminError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<ObjectError> for AdminError {
    fn from(e: ObjectError) -> Self {
        let msg = e.to_string();
        match e {
            ObjectError::Invalid(_) | ObjectError::BadRequest(_) => {
                AdminError::InvalidArgument(msg)
            }
            ObjectError::NotFound(_) => AdminError::NotFound(msg),
            ObjectError::AlreadyExists(_) => AdminError::AlreadyExists(msg),
            ObjectError::Stale { .. } => AdminError::FailedPrecondition(msg),
            ObjectError::Contended(_) => AdminError::Aborted(msg),
            ObjectError::Unavailable(_) => AdminError::Unavailable(msg),
            ObjectError::Internal(_) => AdminError::Internal(msg),
        }
    }
}

impl From<TlsError> for AdminError {
    fn from(e: TlsError) -> Self {
        AdminError::Unauthenticated(format!("admin API: {e}"))
    }
}

/// The admin service. Cheap to clone.
#[derive(Clone)]
pub struct AdminService {
    inner: Arc<Inner>,
}

struct Inner {
    objects: Objects,
    ca: Option<Arc<CertificateAuthority>>,
    metrics: HubMetrics,
    /// The controller's placement report, shown as a Repository's
    /// `status.placement` when it is read.
    placement: PlacementReports,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService")
            .field("can_enroll", &self.inner.ca.is_some())
            .finish_non_exhaustive()
    }
}

impl AdminService {
    /// `ca` signs enrolled clusters' certificates; without one EnrollCluster
    /// answers FailedPrecondition. Watch streams end when `shutdown` fires.
    pub fn new(
        objects: Objects,
        ca: Option<Arc<CertificateAuthority>>,
        metrics: HubMetrics,
        placement: PlacementReports,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                objects,
                ca,
                metrics,
                placement,
                shutdown,
            }),
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::admin_service_server::AdminServiceServer<Self> {
        pb::admin_service_server::AdminServiceServer::new(self)
    }

    fn done<T>(&self, method: &'static str, r: Result<T, AdminError>) -> Result<T, Status> {
        let r = r.map_err(Status::from);
        let code = match &r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.inner.metrics.admin_request(method, code);
        if let Err(s) = &r
            && matches!(s.code(), Code::Internal | Code::Unavailable)
        {
            warn!(method, code = ?s.code(), message = s.message(), "Admin request failed");
        }
        r
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<pb::ApplyResponse, AdminError> {
        let who = require_admin(&req)?;
        let req = req.into_inner();
        let wire = req
            .object
            .ok_or_else(|| AdminError::InvalidArgument("ApplyRequest.object: missing".into()))?;
        let obj = Object::try_from(wire).map_err(|e| AdminError::InvalidArgument(e.to_string()))?;
        let kind = obj.kind();
        let (stored, outcome) = self.inner.objects.apply(obj, req.dry_run).await?;
        let outcome_str = match outcome {
            ApplyOutcome::Created => "created",
            ApplyOutcome::Updated => "updated",
            ApplyOutcome::Unchanged => "unchanged",
        };
        if !req.dry_run {
            self.inner.metrics.applied(kind.as_str(), outcome_str);
            info!(admin = %who, object = %stored.id(), outcome = outcome_str,
                  resource_version = stored.metadata().resource_version.as_deref().unwrap_or(""),
                  "Applied");
        }
        Ok(pb::ApplyResponse {
            object: Some(to_response(&stored)),
            outcome: match outcome {
                ApplyOutcome::Created => pb::ApplyOutcome::Created,
                ApplyOutcome::Updated => pb::ApplyOutcome::Updated,
                ApplyOutcome::Unchanged => pb::ApplyOutcome::Unchanged,
            } as i32,
        })
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<pb::Object, AdminError> {
        require_admin(&req)?;
        let req = req.into_inner();
        let kind = kind_arg(req.kind)?;
        let name = name_arg(kind, &req.name)?;
        let obj = self
            .inner
            .objects
            .get(kind, ns_arg(kind, &req.namespace), name)
            .await?;
        Ok(response(&obj, &self.inner.placement.latest()))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<pb::ListResponse, AdminError> {
        require_admin(&req)?;
        let req = req.into_inner();
        let kind = kind_arg(req.kind)?;
        let selector = parse_selector(&req.label_selector)
            .map_err(|e| AdminError::InvalidArgument(e.to_string()))?;
        let ns = if req.all_namespaces {
            None
        } else {
            ns_arg(kind, &req.namespace)
        };
        let (items, rev) = self.inner.objects.list(kind, ns).await?;
        let empty = Default::default();
        let report = self.inner.placement.latest();
        let items = items
            .iter()
            .filter(|o| selector.matches(o.metadata().labels.as_ref().unwrap_or(&empty)))
            .map(|o| response(o, &report))
            .collect();
        Ok(pb::ListResponse {
            items,
            resource_version: rev.to_string(),
        })
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<pb::DeleteResponse, AdminError> {
        let who = require_admin(&req)?;
        let req = req.into_inner();
        let kind = kind_arg(req.kind)?;
        let name = name_arg(kind, &req.name)?;
        let rv = Some(req.resource_version.as_str()).filter(|s| !s.is_empty());
        let ns = ns_arg(kind, &req.namespace);
        if kind == Kind::RegistrySecret {
            let users = self.secret_users(ns.unwrap_or_default(), name).await?;
            if !users.is_empty() && !req.force {
                return Err(AdminError::FailedPrecondition(format!(
                    "{}: still used by {} {}: delete or repoint them first, or delete with \
                     --force (they then reach no cluster, and their status says the secret is gone)",
                    model::object_id(kind, ns, name),
                    if users.len() == 1 {
                        "Repository"
                    } else {
                        "Repositories"
                    },
                    users.join(", ")
                )));
            }
            if !users.is_empty() {
                warn!(admin = %who, object = %model::object_id(kind, ns, name),
                      repositories = %users.join(","), "Deleting a RegistrySecret still in use (--force)");
            }
        }
        let obj = self.inner.objects.delete(kind, ns, name, rv).await?;
        info!(admin = %who, object = %obj.id(), "Deleted");
        Ok(pb::DeleteResponse {
            object: Some(to_response(&obj)),
        })
    }

    /// The Repositories (`namespace/name`, sorted) whose `registryRef` names
    /// the RegistrySecret `namespace/name`.
    async fn secret_users(&self, namespace: &str, name: &str) -> Result<Vec<String>, AdminError> {
        let (repos, _) = self.inner.objects.list(Kind::Repository, None).await?;
        let mut users: Vec<String> = repos
            .iter()
            .filter_map(|o| match o {
                Object::Repository(r) => (r.registry_secret() == (namespace, name)).then(|| {
                    format!(
                        "{}/{}",
                        o.namespace().unwrap_or(model::DEFAULT_NAMESPACE),
                        o.name()
                    )
                }),
                _ => None,
            })
            .collect();
        users.sort();
        Ok(users)
    }

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<WatchStream, AdminError> {
        require_admin(&req)?;
        let req = req.into_inner();
        let kind = kind_arg(req.kind)?;
        let ns: Option<String> = if req.all_namespaces {
            None
        } else {
            ns_arg(kind, &req.namespace).map(str::to_string)
        };
        let objects = self.inner.objects.clone();
        let store = objects.store().clone();
        let reports = self.inner.placement.clone();

        // List-then-watch: without a resourceVersion the current objects
        // come first as ADDED, then changes after the list's revision.
        let (initial, after) = if req.resource_version.is_empty() {
            let (items, rev) = objects.list(kind, ns.as_deref()).await?;
            let report = reports.latest();
            let events: Vec<Result<pb::WatchEvent, Status>> = items
                .iter()
                .map(|o| {
                    Ok(pb::WatchEvent {
                        r#type: pb::WatchEventType::Added as i32,
                        resource_version: o.metadata().resource_version.clone().unwrap_or_default(),
                        object: Some(response(o, &report)),
                    })
                })
                .collect();
            (events, rev)
        } else {
            let rev = req.resource_version.parse::<u64>().map_err(|_| {
                AdminError::InvalidArgument(format!(
                    "WatchRequest.resource_version {:?}: expected a number from List",
                    req.resource_version
                ))
            })?;
            (Vec::new(), rev)
        };

        let guard = self.inner.metrics.watch_opened();
        let stop = self.inner.shutdown.clone().cancelled_owned();
        let live: WatchStream = match store.watch(kind.plural(), after).await {
            Ok(s) => {
                let s = s.filter_map(move |ev| {
                    let out = convert_event(&objects, &reports.latest(), ns.as_deref(), ev);
                    async move { out }
                });
                Box::pin(s)
            }
            Err(StoreError::Compacted { .. }) => Box::pin(futures::stream::once(async move {
                Ok(pb::WatchEvent {
                    r#type: pb::WatchEventType::Relist as i32,
                    object: None,
                    resource_version: after.to_string(),
                })
            })),
            Err(e) => return Err(store_err(e)),
        };
        let stream = futures::stream::iter(initial)
            .chain(live)
            // An error ends the stream after it is sent.
            .scan(false, |ended, item| {
                let out = if *ended {
                    None
                } else {
                    *ended = item.is_err();
                    Some(item)
                };
                futures::future::ready(out)
            })
            .take_until(stop)
            .map(move |item| {
                let _keep = &guard;
                item
            });
        Ok(Box::pin(stream))
    }

    async fn enroll(
        &self,
        req: Request<pb::EnrollClusterRequest>,
    ) -> Result<pb::EnrollClusterResponse, AdminError> {
        let who = require_admin(&req)?;
        let req = req.into_inner();
        let ca = self.inner.ca.as_ref().ok_or_else(|| {
            AdminError::FailedPrecondition(
                "this hub has no signing CA: start it with --ca-cert and --ca-key to enroll clusters".into(),
            )
        })?;
        let days = match req.validity_days {
            0 => DEFAULT_LEAF_VALIDITY_DAYS,
            d if d > MAX_LEAF_VALIDITY_DAYS => {
                return Err(AdminError::InvalidArgument(format!(
                    "Cluster {}: validity_days {d}: expected 1..={MAX_LEAF_VALIDITY_DAYS}",
                    req.name
                )));
            }
            d => d,
        };

        // Keep what enrollment does not set (the description) from an
        // earlier enrollment or apply.
        let existing = match self.inner.objects.get(Kind::Cluster, None, &req.name).await {
            Ok(Object::Cluster(c)) => Some(c),
            Ok(_) | Err(ObjectError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let mut cluster = Cluster::new(
            &req.name,
            ClusterSpec {
                tenants: req.tenants,
                description: existing.and_then(|c| c.spec.description),
            },
        );
        cluster.metadata.labels = Some(req.labels.into_iter().collect());
        let candidate = Object::Cluster(cluster);

        // Validate (dry run) before issuing, so a bad name or label neither
        // leaves an object behind nor costs a certificate.
        self.inner.objects.apply(candidate.clone(), true).await?;
        let leaf = ca
            .issue_cluster(&req.name, days)
            .map_err(|e| AdminError::InvalidArgument(format!("Cluster {}: {e}", req.name)))?;
        let (stored, _) = self.inner.objects.apply(candidate, false).await?;
        let Object::Cluster(stored) = stored else {
            return Err(AdminError::Internal(
                "enrollment stored a non-cluster".into(),
            ));
        };
        self.inner.metrics.enrolled();
        info!(admin = %who, cluster = %req.name, validity_days = days, "Enrolled cluster");
        Ok(pb::EnrollClusterResponse {
            cluster: Some((&stored).into()),
            ca_pem: ca.cert_pem().to_string(),
            cert_pem: leaf.cert_pem,
            // Returned once and never stored: the hub keeps no copy of the key.
            key_pem: leaf.key_pem,
        })
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// Maps a store error met outside [`Objects`] (watch streams) to the admin
/// API's codes: an unavailable store is `Unavailable`, retryable, and its
/// message starts with [`imgfleet::api::STORE_UNAVAILABLE`] (as
/// [`crate::objects::ObjectError::Unavailable`]'s does), which the CLI shows
/// apart from a hub it cannot reach.
fn store_err(e: StoreError) -> AdminError {
    match e {
        StoreError::Unavailable(m) => {
            AdminError::Unavailable(format!("{}: {m}", imgfleet::api::STORE_UNAVAILABLE))
        }
        other => AdminError::Internal(other.to_string()),
    }
}

fn convert_event(
    objects: &Objects,
    report: &PlacementReport,
    ns: Option<&str>,
    ev: Result<WatchEvent, StoreError>,
) -> Option<Result<pb::WatchEvent, Status>> {
    let (typ, v) = match ev {
        Ok(WatchEvent::Put(v)) => {
            let t = if v.create_revision == v.revision {
                pb::WatchEventType::Added
            } else {
                pb::WatchEventType::Modified
            };
            (t, v)
        }
        Ok(WatchEvent::Delete(v)) => (pb::WatchEventType::Deleted, v),
        Err(StoreError::Compacted { requested, .. }) => {
            return Some(Ok(pb::WatchEvent {
                r#type: pb::WatchEventType::Relist as i32,
                object: None,
                resource_version: requested.to_string(),
            }));
        }
        Err(e) => return Some(Err(store_err(e).into())),
    };
    if let Some(ns) = ns
        && v.key.namespace != ns
    {
        return None;
    }
    let rev = v.revision;
    match objects.decode(&v) {
        Ok(mut obj) => {
            obj.metadata_mut().resource_version = Some(rev.to_string());
            Some(Ok(pb::WatchEvent {
                r#type: typ as i32,
                object: Some(response(&obj, report)),
                resource_version: rev.to_string(),
            }))
        }
        Err(e) => Some(Err(AdminError::from(e).into())),
    }
}

/// The wire form of a stored object as the admin API answers it: secrets
/// removed, and a Repository's `status.placement` filled in from the
/// controller's latest report.
fn response(obj: &Object, report: &PlacementReport) -> pb::Object {
    if let Object::Repository(r) = obj {
        let ns = obj.namespace().unwrap_or(model::DEFAULT_NAMESPACE);
        if let Some(problem) = report.of(ns, obj.name()) {
            let mut r = r.clone();
            r.status.get_or_insert_with(Default::default).placement = Some(problem.clone());
            return to_response(&Object::Repository(r));
        }
    }
    to_response(obj)
}

/// The caller must present an admin certificate from the hub's CA.
fn require_admin<T>(req: &Request<T>) -> Result<String, AdminError> {
    match peer_identity(req)? {
        Identity::Admin(name) => Ok(name),
        Identity::Cluster(name) => Err(AdminError::PermissionDenied(format!(
            "cluster {name} may not use the admin API: it needs an admin certificate"
        ))),
    }
}

fn kind_arg(kind: i32) -> Result<Kind, AdminError> {
    kind_from_proto(kind).ok_or_else(|| {
        AdminError::InvalidArgument(format!(
            "kind {kind}: expected RegistrySecret, Repository or Cluster"
        ))
    })
}

fn ns_arg(kind: Kind, ns: &str) -> Option<&str> {
    if !kind.namespaced() {
        None
    } else if ns.is_empty() {
        Some(model::DEFAULT_NAMESPACE)
    } else {
        Some(ns)
    }
}

fn name_arg(kind: Kind, name: &str) -> Result<&str, AdminError> {
    if name.is_empty() {
        Err(AdminError::InvalidArgument(format!(
            "{kind}: name: missing"
        )))
    } else {
        Ok(name)
    }
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let r = AdminService::apply(self, request).await;
        self.done("Apply", r).map(Response::new)
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Object>, Status> {
        let r = AdminService::get(self, request).await;
        self.done("Get", r).map(Response::new)
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let r = AdminService::list(self, request).await;
        self.done("List", r).map(Response::new)
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = AdminService::delete(self, request).await;
        self.done("Delete", r).map(Response::new)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = AdminService::watch(self, request).await;
        self.done("Watch", r).map(Response::new)
    }

    async fn enroll_cluster(
        &self,
        request: Request<pb::EnrollClusterRequest>,
    ) -> Result<Response<pb::EnrollClusterResponse>, Status> {
        let r = AdminService::enroll(self, request).await;
        self.done("EnrollCluster", r).map(Response::new)
    }
}
