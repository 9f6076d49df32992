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
use imgfleet::convert::{ConvertError, kind_from_proto, to_response};
use imgfleet::model::{self, Cluster, ClusterSpec, Kind, Object};
use imgfleet_common::pki::{
    CertificateAuthority, DEFAULT_LEAF_VALIDITY_DAYS, Identity, MAX_LEAF_VALIDITY_DAYS, PkiError,
};
use imgfleet_common::tls::{TlsError, peer_identity};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use crate::controller::{PlacementReport, PlacementReports};
use crate::metrics::HubMetrics;
use crate::objects::{ApplyOutcome, ObjectError, Objects};
use crate::selector::{SelectorError, parse_selector};
use crate::store::StoreError;
use crate::store::watcher::{Event, WatchError, Watcher};

/// Why an admin request failed; `From<AdminError> for Status` chooses the
/// gRPC code of each in one place.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No client certificate, or one without an imgfleet identity.
    #[error("admin API: {0}")]
    Unauthenticated(#[source] TlsError),
    /// A cluster agent's certificate: authenticated, not allowed.
    #[error("cluster {0} may not use the admin API: it needs an admin certificate")]
    NotAdmin(String),
    /// A request field that is missing.
    #[error("{0}: missing")]
    Missing(String),
    #[error("kind {0}: expected RegistrySecret, Repository or Cluster")]
    BadKind(i32),
    /// An object that does not convert to the model.
    #[error(transparent)]
    BadObject(#[from] ConvertError),
    #[error(transparent)]
    BadSelector(#[from] SelectorError),
    #[error("WatchRequest.resource_version {0:?}: expected a number from List")]
    BadWatchRevision(String),
    #[error("Cluster {cluster}: validity_days {days}: expected 1..={MAX_LEAF_VALIDITY_DAYS}")]
    BadValidity { cluster: String, days: u32 },
    /// The cluster certificate could not be issued (a bad name).
    #[error("Cluster {cluster}: {source}")]
    Issue {
        cluster: String,
        #[source]
        source: PkiError,
    },
    /// A RegistrySecret that Repositories still use, deleted without force.
    #[error(
        "{id}: still used by {} {}: delete or repoint them first, or delete with \
         --force (they then reach no cluster, and their status says the secret is gone)",
        if .users.len() == 1 { "Repository" } else { "Repositories" },
        .users.join(", ")
    )]
    SecretInUse { id: String, users: Vec<String> },
    #[error("this hub has no signing CA: start it with --ca-cert and --ca-key to enroll clusters")]
    NoSigningCa,
    /// Reading or writing the objects failed.
    #[error(transparent)]
    Objects(#[from] ObjectError),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        AdminError::Objects(e.into())
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        let code = match &e {
            AdminError::Unauthenticated(_) => Code::Unauthenticated,
            AdminError::NotAdmin(_) => Code::PermissionDenied,
            AdminError::Missing(_)
            | AdminError::BadKind(_)
            | AdminError::BadObject(_)
            | AdminError::BadSelector(_)
            | AdminError::BadWatchRevision(_)
            | AdminError::BadValidity { .. }
            | AdminError::Issue { .. } => Code::InvalidArgument,
            AdminError::SecretInUse { .. } | AdminError::NoSigningCa => Code::FailedPrecondition,
            AdminError::Objects(o) => match o {
                ObjectError::Invalid(_) | ObjectError::BadResourceVersion { .. } => {
                    Code::InvalidArgument
                }
                ObjectError::NotFound(_) | ObjectError::Store(StoreError::NotFound(_)) => {
                    Code::NotFound
                }
                ObjectError::AlreadyExists(_)
                | ObjectError::Store(StoreError::AlreadyExists(_)) => Code::AlreadyExists,
                // A stale resourceVersion.
                ObjectError::Stale { .. } => Code::FailedPrecondition,
                // Concurrent writers kept winning; retry.
                ObjectError::Contended(_) | ObjectError::Store(StoreError::Conflict { .. }) => {
                    Code::Aborted
                }
                // The store is down; retry.
                ObjectError::Unavailable(_) | ObjectError::Store(StoreError::Unavailable(_)) => {
                    Code::Unavailable
                }
                ObjectError::Corrupt { .. }
                | ObjectError::WrongKind { .. }
                | ObjectError::Unopenable { .. }
                | ObjectError::Seal { .. }
                | ObjectError::Encode { .. }
                | ObjectError::Store(_) => Code::Internal,
            },
        };
        Status::new(code, e.to_string())
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
            .ok_or_else(|| AdminError::Missing("ApplyRequest.object".into()))?;
        let obj = Object::try_from(wire)?;
        let kind = obj.kind();
        tracing::Span::current().record("object", tracing::field::display(obj.id()));
        // The change's trace, recorded before the write that wakes the
        // resolver and the controller.
        let traced = !req.dry_run && imgfleet_common::telemetry::enabled();
        let repository = matches!(obj, Object::Repository(_)).then(|| {
            let ns = obj
                .namespace()
                .unwrap_or(imgfleet::model::DEFAULT_NAMESPACE);
            (ns.to_string(), obj.name().to_string())
        });
        let traces = self.inner.objects.traces().clone();
        if traced {
            let here = imgfleet_common::telemetry::traceparent(&tracing::Span::current());
            traces.applied(
                repository.as_ref().map(|(n, m)| (n.as_str(), m.as_str())),
                here,
            );
        }
        let applied = self.inner.objects.apply(obj, req.dry_run).await;
        // Nothing was written: no resolution will continue this trace.
        let wrote = matches!(&applied, Ok((_, o)) if *o != ApplyOutcome::Unchanged);
        if traced
            && !wrote
            && let Some((ns, name)) = &repository
        {
            traces.take_applied(ns, name);
        }
        let (stored, outcome) = applied?;
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
        let selector = parse_selector(&req.label_selector)?;
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
                return Err(AdminError::SecretInUse {
                    id: model::object_id(kind, ns, name),
                    users,
                });
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
            let rev = req
                .resource_version
                .parse::<u64>()
                .map_err(|_| AdminError::BadWatchRevision(req.resource_version.clone()))?;
            (Vec::new(), rev)
        };

        let guard = self.inner.metrics.watch_opened();
        let stop = self.inner.shutdown.clone().cancelled_owned();
        // The client lists again itself on RELIST, so the watcher is only
        // asked to go on after `after`: the first history it lacks, or the
        // first failure, ends the stream (after a RELIST or the error).
        let mut watcher = Watcher::after(objects.store().clone(), kind.plural(), after);
        let live: WatchStream = match watcher.open().await {
            Ok(()) => Box::pin(
                watcher
                    .into_stream()
                    // The store's watch ended: so does the client's.
                    .take_while(|ev| {
                        futures::future::ready(!matches!(ev, Err(WatchError::Ended { .. })))
                    })
                    .filter_map(move |ev| {
                        futures::future::ready(convert_event(
                            &objects,
                            &reports.latest(),
                            ns.as_deref(),
                            ev,
                        ))
                    }),
            ),
            Err(e) if e.relists() => {
                Box::pin(futures::stream::once(async move { Ok(relist(after)) }))
            }
            Err(e) => return Err(watch_err(e)),
        };
        let stream = futures::stream::iter(initial)
            .chain(live)
            // An error or a RELIST ends the stream after it is sent.
            .scan(false, |ended, item| {
                let out = if *ended {
                    None
                } else {
                    *ended = match &item {
                        Err(_) => true,
                        Ok(ev) => ev.r#type == pb::WatchEventType::Relist as i32,
                    };
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
        let ca = self.inner.ca.as_ref().ok_or(AdminError::NoSigningCa)?;
        let days = match req.validity_days {
            0 => DEFAULT_LEAF_VALIDITY_DAYS,
            d if d > MAX_LEAF_VALIDITY_DAYS => {
                return Err(AdminError::BadValidity {
                    cluster: req.name,
                    days: d,
                });
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
            .map_err(|source| AdminError::Issue {
                cluster: req.name.clone(),
                source,
            })?;
        let (stored, _) = self.inner.objects.apply(candidate, false).await?;
        let Object::Cluster(stored) = stored else {
            return Err(ObjectError::WrongKind {
                id: model::object_id(Kind::Cluster, None, &req.name),
                expected: Kind::Cluster,
            }
            .into());
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

/// A watch failure as the admin API answers it: an unavailable store is
/// `Unavailable` (retryable) with the message the CLI recognises, like every
/// other store error met through [`Objects`].
fn watch_err(e: WatchError) -> AdminError {
    match e {
        WatchError::List { source, .. }
        | WatchError::Open { source, .. }
        | WatchError::Broke { source, .. } => source.into(),
        WatchError::Ended { .. } => StoreError::Unavailable(e.to_string()).into(),
    }
}

/// The RELIST event: the history after `revision` is gone; list again.
fn relist(revision: u64) -> pb::WatchEvent {
    pb::WatchEvent {
        r#type: pb::WatchEventType::Relist as i32,
        object: None,
        resource_version: revision.to_string(),
    }
}

fn convert_event(
    objects: &Objects,
    report: &PlacementReport,
    ns: Option<&str>,
    ev: Result<Event, WatchError>,
) -> Option<Result<pb::WatchEvent, Status>> {
    let (typ, v) = match ev {
        Ok(Event::Put(v)) => {
            let t = if v.create_revision == v.revision {
                pb::WatchEventType::Added
            } else {
                pb::WatchEventType::Modified
            };
            (t, v)
        }
        Ok(Event::Delete(v)) => (pb::WatchEventType::Deleted, v),
        // Only after a compaction, which the client has been told of.
        Ok(Event::Listed { revision, .. }) => return Some(Ok(relist(revision))),
        Err(e) if e.relists() => {
            let revision = match e {
                WatchError::Broke { revision, .. } | WatchError::Open { revision, .. } => revision,
                _ => 0,
            };
            return Some(Ok(relist(revision)));
        }
        Err(e) => return Some(Err(watch_err(e).into())),
    };
    // Another namespace than the one watched.
    if let Some(ns) = ns
        && v.key.namespace != ns
    {
        return None;
    }
    let rev = v.revision;
    Some(match objects.decode(&v) {
        Ok(mut obj) => {
            obj.metadata_mut().resource_version = Some(rev.to_string());
            Ok(pb::WatchEvent {
                r#type: typ as i32,
                object: Some(response(&obj, report)),
                resource_version: rev.to_string(),
            })
        }
        Err(e) => Err(AdminError::from(e).into()),
    })
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
    match peer_identity(req).map_err(AdminError::Unauthenticated)? {
        Identity::Admin(name) => Ok(name),
        Identity::Cluster(name) => Err(AdminError::NotAdmin(name)),
    }
}

fn kind_arg(kind: i32) -> Result<Kind, AdminError> {
    kind_from_proto(kind).ok_or(AdminError::BadKind(kind))
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
        Err(AdminError::Missing(format!("{kind}: name")))
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
        // The root of a change's trace, or a child of the caller's when it
        // sends a W3C `traceparent`.
        let span = tracing::info_span!("Apply", object = tracing::field::Empty);
        if let Some(parent) = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
        {
            imgfleet_common::telemetry::join(&span, parent);
        }
        let r = tracing::Instrument::instrument(AdminService::apply(self, request), span).await;
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
