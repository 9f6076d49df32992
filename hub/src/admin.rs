//! The AdminService: Apply, Get, List, Delete, Watch, EnrollCluster, CanI,
//! IssueUser and the revocations over mutually authenticated gRPC. Every RPC
//! first goes through [`AdminService::authorize`], the one check: the
//! caller's user (certificate CN and groups), not revoked, must hold a role
//! that allows the verb on the kind in the namespace ([`crate::rbac`]);
//! everything else is denied. Lists across namespaces return only what the
//! caller may read. Errors are mapped to gRPC codes in one place
//! (`impl From<AdminError> for Status`). Responses never carry a password
//! (`password_set` says one is stored).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_server::AdminService as AdminApi;
use imgfleet::convert::{ConvertError, kind_from_proto, to_response};
use imgfleet::model::{self, Cluster, ClusterSpec, Kind, Object};
use imgfleet_common::pki::{
    self, CertificateAuthority, DEFAULT_LEAF_VALIDITY_DAYS, Identity, MAX_LEAF_VALIDITY_DAYS,
    PkiError, User,
};
use imgfleet_common::tls::{TlsError, peer_identity};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use crate::audit::{self, Draft};
use crate::controller::{PlacementReport, PlacementReports};
use crate::metrics::HubMetrics;
use crate::objects::{ApplyOutcome, Audit, ObjectError, Objects};
use crate::rbac::{Bindings, Grants, Resource, Verb, denial};
use crate::revocation::{Revocations, Revoked};
use crate::rollout::{self, RolloutError};
use crate::selector::{SelectorError, parse_selector};
use crate::store::watcher::{Event, WatchError, Watcher};
use crate::store::{StoreError, Write};

/// Why an admin request failed; `From<AdminError> for Status` chooses the
/// gRPC code of each in one place.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No client certificate, or one without an imgfleet identity.
    #[error("admin API: {0}")]
    Unauthenticated(#[source] TlsError),
    /// A cluster agent's certificate: authenticated, not allowed.
    #[error("cluster {0} may not use the admin API: it needs a user certificate")]
    NotAdmin(String),
    /// No role of the caller allows this: "user-a may not apply
    /// repositories in namespace team-b".
    #[error("{0}")]
    Denied(String),
    /// The caller's certificate was revoked (`imgfleet user revoke`).
    #[error("the certificate of user {0} was revoked: ask for a new one (imgfleet user issue)")]
    Revoked(String),
    /// A role above the caller's own, in a binding they apply or delete.
    #[error("{user} may not grant role {role}{}: it is above their own", .namespace.as_deref().map(|n| format!(" in namespace {n}")).unwrap_or_default())]
    Escalation {
        user: String,
        role: String,
        namespace: Option<String>,
    },
    #[error("auth can-i: {0}")]
    BadQuestion(String),
    /// A pull token that cannot be minted.
    #[error("{0}")]
    PullToken(String),
    /// A cluster enrolled again without --reissue.
    #[error(
        "Cluster {0} is already enrolled: re-enroll with --reissue (revokes its current certificate; labels and tenants are kept unless given)"
    )]
    AlreadyEnrolled(String),
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
    /// The user certificate could not be issued (a bad name or CSR).
    #[error("user {user}: {source}")]
    IssueUser {
        user: String,
        #[source]
        source: PkiError,
    },
    #[error("this hub has no signing CA: start it with --ca-cert and --ca-key to enroll clusters")]
    NoSigningCa,
    /// An undo or resume that cannot be done.
    #[error(transparent)]
    Rollout(#[from] RolloutError),
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
        Status::new(e.code(), e.to_string())
    }
}

impl AdminError {
    /// The gRPC code of each error, chosen here and nowhere else.
    pub fn code(&self) -> Code {
        match self {
            AdminError::Unauthenticated(_) | AdminError::Revoked(_) => Code::Unauthenticated,
            AdminError::NotAdmin(_) | AdminError::Denied(_) | AdminError::Escalation { .. } => {
                Code::PermissionDenied
            }
            AdminError::AlreadyEnrolled(_) => Code::AlreadyExists,
            AdminError::PullToken(_) => Code::FailedPrecondition,
            AdminError::BadQuestion(_) => Code::InvalidArgument,
            AdminError::Missing(_)
            | AdminError::BadKind(_)
            | AdminError::BadObject(_)
            | AdminError::BadSelector(_)
            | AdminError::BadWatchRevision(_)
            | AdminError::BadValidity { .. }
            | AdminError::Issue { .. }
            | AdminError::IssueUser { .. } => Code::InvalidArgument,
            AdminError::SecretInUse { .. } | AdminError::NoSigningCa => Code::FailedPrecondition,
            AdminError::Rollout(r) => match r {
                RolloutError::NoSuchRevision { .. } => Code::NotFound,
                RolloutError::NoHistory { .. }
                | RolloutError::NoEarlier { .. }
                | RolloutError::NotPinned { .. } => Code::FailedPrecondition,
            },
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
        }
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
    revocations: Revocations,
    /// Lifetime of cluster certificates enrolled without validity_days.
    cluster_cert_lifetime: std::time::Duration,
    shutdown: CancellationToken,
}

/// Who is calling and what they may do, decided once per call.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
    pub grants: Grants,
    /// The caller's address, for the audit trail.
    pub source: Option<std::net::SocketAddr>,
}

impl Caller {
    /// Whether the caller may `verb` `resource` in `namespace`.
    pub fn may(&self, verb: Verb, resource: Resource, namespace: Option<&str>) -> bool {
        self.grants.allows(verb, resource, namespace)
    }

    /// `Ok` if allowed, otherwise the denial naming user, verb, kind and namespace.
    pub fn check(
        &self,
        verb: Verb,
        resource: Resource,
        namespace: Option<&str>,
    ) -> Result<(), AdminError> {
        if self.may(verb, resource, namespace) {
            Ok(())
        } else {
            Err(AdminError::Denied(denial(
                &self.user.name,
                verb,
                resource,
                namespace,
            )))
        }
    }
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
                ca,
                metrics,
                revocations: Revocations::new(objects.store().clone()),
                cluster_cert_lifetime: crate::config::DEFAULT_CLUSTER_CERT_LIFETIME,
                objects,
                placement,
                shutdown,
            }),
        }
    }

    /// Cluster certificates enrolled without validity_days live this long
    /// (`--cluster-cert-lifetime`). Call right after [`AdminService::new`].
    pub fn with_cluster_cert_lifetime(mut self, lifetime: std::time::Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.cluster_cert_lifetime = lifetime;
        }
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::admin_service_server::AdminServiceServer<Self> {
        pb::admin_service_server::AdminServiceServer::new(self)
    }

    /// The one authorization check every AdminService call goes through:
    /// who the certificate names, that it is not revoked, the roles its user
    /// holds, and whether they allow `verb` on `resource` in `namespace`
    /// (`None` for fleet-wide resources and for lists across namespaces,
    /// which are filtered per object with [`Caller::may`] instead).
    pub async fn authorize<T>(
        &self,
        req: &Request<T>,
        verb: Verb,
        resource: Resource,
        namespace: Option<&str>,
    ) -> Result<Caller, AdminError> {
        let caller = self.caller(req).await?;
        let across = namespace.is_none() && resource.namespaced() && verb.reads();
        if !across {
            caller.check(verb, resource, namespace)?;
        }
        Ok(caller)
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, AdminError> {
        let user = match peer_identity(req).map_err(AdminError::Unauthenticated)? {
            Identity::User(u) => u,
            Identity::Cluster(name) => return Err(AdminError::NotAdmin(name)),
        };
        if let Some(certs) = req.peer_certs()
            && let Some(leaf) = certs.first()
        {
            let facts = pki::cert_facts_der(leaf.as_ref())
                .map_err(|e| AdminError::Unauthenticated(TlsError::Identity(e)))?;
            if self
                .inner
                .revocations
                .refuses(&Revoked::User(user.name.clone()), facts.issued_at_nanos)
                .await?
            {
                return Err(AdminError::Revoked(user.name));
            }
        }
        let grants = match Grants::builtin(&user) {
            Some(g) => g,
            None => {
                let (rbs, _) = self.inner.objects.list(Kind::RoleBinding, None).await?;
                let (crbs, _) = self
                    .inner
                    .objects
                    .list(Kind::ClusterRoleBinding, None)
                    .await?;
                Grants::of(&user, &Bindings::from_objects(rbs.iter().chain(&crbs)))
            }
        };
        Ok(Caller {
            user,
            grants,
            source: req.remote_addr(),
        })
    }

    /// Who asks for what, for the audit trail, read from the certificate
    /// alone (the authorization check has not run yet).
    fn draft<T>(
        &self,
        req: &Request<T>,
        verb: Verb,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Draft {
        let (user, groups) = match peer_identity(req) {
            Ok(Identity::User(u)) => (u.name, u.groups),
            Ok(Identity::Cluster(c)) => (format!("cluster:{c}"), Vec::new()),
            Err(_) => ("<unauthenticated>".to_owned(), Vec::new()),
        };
        Draft {
            user,
            groups,
            verb: verb.as_str().to_owned(),
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source: req.remote_addr().map(|a| a.to_string()).unwrap_or_default(),
        }
    }

    /// [`Self::draft`] for a call about one Repository, in `namespace`
    /// (empty: the default one).
    fn repository_draft<T>(
        &self,
        req: &Request<T>,
        verb: Verb,
        namespace: &str,
        name: &str,
    ) -> Draft {
        let ns = ns_arg(Kind::Repository, namespace).unwrap_or_default();
        self.draft(req, verb, Kind::Repository.plural(), ns, name)
    }

    /// Records a refused or failed call: every denial, and every failure of
    /// a call that would have changed something. A record the store cannot
    /// take is logged instead; the caller gets the original error.
    async fn audit_failure(&self, draft: &Draft, error: Option<&AdminError>, changes: bool) {
        let Some(e) = error else { return };
        let code = e.code();
        let denied = matches!(code, Code::PermissionDenied | Code::Unauthenticated);
        if !denied && !changes {
            return;
        }
        // An unavailable store cannot take the record either.
        if code == Code::Unavailable {
            warn!(user = %draft.user, verb = %draft.verb, resource = %draft.resource,
                  "Not audited: the policy store is unavailable");
            return;
        }
        let outcome = if denied {
            audit::Outcome::Denied
        } else {
            audit::Outcome::Failed
        };
        let put = draft.put(outcome, code as i32, false, &e.to_string());
        if let Err(e) = audit::record_alone(self.inner.objects.store().as_ref(), put).await {
            warn!(error = %e, user = %draft.user, verb = %draft.verb, "Writing an audit record failed");
        }
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

    /// A binding may give only a role the caller holds in its scope.
    fn no_escalation(&self, caller: &Caller, obj: &Object) -> Result<(), AdminError> {
        let role = match obj {
            Object::RoleBinding(b) => &b.spec.role,
            Object::ClusterRoleBinding(b) => &b.spec.role,
            _ => return Ok(()),
        };
        // A role that does not parse is refused by validation, with the field.
        let Some(parsed) = model::Role::parse(role) else {
            return Ok(());
        };
        if caller.grants.may_grant(parsed, obj.namespace()) {
            Ok(())
        } else {
            Err(AdminError::Escalation {
                user: caller.user.name.clone(),
                role: role.clone(),
                namespace: obj.namespace().map(str::to_owned),
            })
        }
    }

    async fn issue_user(
        &self,
        req: Request<pb::IssueUserRequest>,
        draft: &Draft,
    ) -> Result<pb::IssueUserResponse, AdminError> {
        let caller = self
            .authorize(&req, Verb::Issue, Resource::Users, None)
            .await?;
        let req = req.into_inner();
        let ca = self.inner.ca.as_ref().ok_or(AdminError::NoSigningCa)?;
        let days = match req.validity_days {
            0 => DEFAULT_LEAF_VALIDITY_DAYS,
            d => d,
        };
        let cert_pem = ca
            .sign_user_csr(&req.csr_pem, &req.name, &req.groups, days)
            .map_err(|source| AdminError::IssueUser {
                user: req.name.clone(),
                source,
            })?;
        let message = format!(
            "certificate issued for {} days, groups [{}]",
            days,
            req.groups.join(", ")
        );
        audit::record_alone(
            self.inner.objects.store().as_ref(),
            draft.put(audit::Outcome::Allowed, 0, false, &message),
        )
        .await?;
        info!(admin = %caller.user.name, user = %req.name, groups = %req.groups.join(","),
              validity_days = days, "Issued user certificate");
        Ok(pb::IssueUserResponse {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem,
        })
    }

    /// Revokes every certificate issued so far to `who`, in one store
    /// transaction with its audit record.
    async fn revoke(
        &self,
        who: Revoked,
        draft: &Draft,
    ) -> Result<crate::revocation::Record, AdminError> {
        let (put, record) = self.inner.revocations.revoke_put(&who).await?;
        let audit = draft.put(
            audit::Outcome::Allowed,
            0,
            true,
            "every certificate issued so far revoked",
        );
        self.inner
            .objects
            .store()
            .commit(vec![Write::Put(put)], audit)
            .await?;
        Ok(record)
    }

    async fn revoke_user(
        &self,
        req: Request<pb::RevokeUserRequest>,
        draft: &Draft,
    ) -> Result<pb::RevokeResponse, AdminError> {
        let caller = self
            .authorize(&req, Verb::Revoke, Resource::Users, None)
            .await?;
        let name = req.into_inner().name;
        pki::validate_user_name(&name).map_err(|source| AdminError::IssueUser {
            user: name.clone(),
            source,
        })?;
        let record = self.revoke(Revoked::User(name.clone()), draft).await?;
        info!(admin = %caller.user.name, user = %name, "Revoked user certificates");
        Ok(revoke_response(record))
    }

    async fn revoke_cluster(
        &self,
        req: Request<pb::RevokeClusterRequest>,
        draft: &Draft,
    ) -> Result<pb::RevokeResponse, AdminError> {
        let caller = self
            .authorize(&req, Verb::Revoke, Resource::Kind(Kind::Cluster), None)
            .await?;
        let name = req.into_inner().name;
        pki::validate_cluster_name(&name).map_err(|source| AdminError::Issue {
            cluster: name.clone(),
            source,
        })?;
        let record = self.revoke(Revoked::Cluster(name.clone()), draft).await?;
        info!(admin = %caller.user.name, cluster = %name, "Revoked cluster certificates");
        Ok(revoke_response(record))
    }

    /// A Repository's revisions, each with the clusters that reported
    /// holding all its digests.
    async fn rollout_history(
        &self,
        req: Request<pb::RolloutRequest>,
    ) -> Result<pb::RolloutHistoryResponse, AdminError> {
        let (ns, name) = rollout_target(&req.get_ref().namespace, &req.get_ref().name)?;
        self.authorize(&req, Verb::Get, Resource::Kind(Kind::Repository), Some(&ns))
            .await?;
        let objects = &self.inner.objects;
        let Object::Repository(repo) = objects.get(Kind::Repository, Some(&ns), &name).await?
        else {
            return Err(ObjectError::WrongKind {
                id: format!("{ns}/{name}"),
                expected: Kind::Repository,
            }
            .into());
        };
        let (secret_ns, secret_name) = repo.registry_secret();
        // A missing RegistrySecret leaves the registry unknown: no cluster
        // can be said to hold the revisions.
        let domain = match objects
            .get(Kind::RegistrySecret, Some(secret_ns), secret_name)
            .await
        {
            Ok(Object::RegistrySecret(rs)) => Some(rs.spec.domain),
            Ok(_) | Err(ObjectError::NotFound(_)) => None,
            Err(ObjectError::Store(StoreError::NotFound(_))) => None,
            Err(e) => return Err(e.into()),
        };
        let (clusters, _) = objects.list(Kind::Cluster, None).await?;
        let status = repo.status.clone().unwrap_or_default();
        let revisions = status
            .revisions
            .iter()
            .map(|r| pb::RevisionHistory {
                revision: Some(imgfleet::convert::revision_to_proto(r)),
                held_by: match &domain {
                    None => Vec::new(),
                    Some(domain) => {
                        let mut names: Vec<String> = clusters
                            .iter()
                            .filter_map(|c| match c {
                                Object::Cluster(c) => Some(c),
                                _ => None,
                            })
                            .filter(|c| {
                                c.status.as_ref().is_some_and(|st| {
                                    !r.resolved.is_empty()
                                        && r.resolved.iter().all(|t| {
                                            st.holds(domain, &repo.spec.repository, &t.digest)
                                        })
                                })
                            })
                            .map(|c| c.metadata.name.clone().unwrap_or_default())
                            .collect();
                        names.sort();
                        names
                    }
                },
            })
            .collect();
        Ok(pb::RolloutHistoryResponse {
            revisions,
            current_revision: rollout::current(&status).unwrap_or_default(),
            pinned_revision: status.pinned_revision.unwrap_or_default(),
            image: match &domain {
                Some(d) => format!("{d}/{}", repo.spec.repository),
                None => repo.spec.repository.clone(),
            },
        })
    }

    /// `rollout undo`: ships an earlier revision's digests, pinned.
    async fn rollout_undo(
        &self,
        req: Request<pb::RolloutUndoRequest>,
        draft: &Draft,
    ) -> Result<pb::RolloutResponse, AdminError> {
        let r = req.get_ref();
        let (ns, name) = (r.namespace.clone(), r.name.clone());
        let to = Some(r.to_revision).filter(|n| *n != 0);
        self.change_rollout(&req, &ns, &name, draft, |user, id, status, generation| {
            let at = Some(Time(k8s_openapi::jiff::Timestamp::now()));
            rollout::undo(id, status, to, user, generation, at)
        })
        .await
    }

    /// `rollout resume`: unpins; the newest upstream revision ships.
    async fn rollout_resume(
        &self,
        req: Request<pb::RolloutRequest>,
        draft: &Draft,
    ) -> Result<pb::RolloutResponse, AdminError> {
        let (ns, name) = (req.get_ref().namespace.clone(), req.get_ref().name.clone());
        self.change_rollout(&req, &ns, &name, draft, |_, id, status, _| {
            rollout::resume(id, status)
        })
        .await
    }

    /// An undo or resume of Repository `namespace`/`name` by `change`,
    /// once the caller may roll it back: read-modify-write of its status,
    /// in one transaction with the audit record; redone when another writer
    /// (the resolver, the status writer) got there first. The synced count
    /// is redone in the same write, so no reader sees the digests that ship
    /// now next to a count about the old ones.
    async fn change_rollout<T>(
        &self,
        req: &Request<T>,
        namespace: &str,
        name: &str,
        draft: &Draft,
        mut change: impl FnMut(
            &str,
            &str,
            &mut model::RepositoryStatus,
            i64,
        ) -> Result<rollout::Outcome, RolloutError>,
    ) -> Result<pb::RolloutResponse, AdminError> {
        let (ns, name) = rollout_target(namespace, name)?;
        let caller = self
            .authorize(
                req,
                Verb::Rollback,
                Resource::Kind(Kind::Repository),
                Some(&ns),
            )
            .await?;
        let user = caller.user.name.as_str();
        let outcome = self
            .write_rollout(&ns, &name, draft, |id, status, generation| {
                change(user, id, status, generation)
            })
            .await?;
        info!(admin = %user, repository = %format!("{ns}/{name}"), verb = %draft.verb,
              revision = outcome.revision, changed = outcome.changed, "Rollout: {}", outcome.message);
        Ok(pb::RolloutResponse {
            revision: outcome.revision,
            changed: outcome.changed,
            message: outcome.message,
        })
    }

    /// The store half of [`Self::change_rollout`].
    async fn write_rollout(
        &self,
        ns: &str,
        name: &str,
        draft: &Draft,
        mut change: impl FnMut(
            &str,
            &mut model::RepositoryStatus,
            i64,
        ) -> Result<rollout::Outcome, RolloutError>,
    ) -> Result<rollout::Outcome, AdminError> {
        let objects = &self.inner.objects;
        let id = format!("{ns}/{name}");
        for _ in 0..ROLLOUT_ATTEMPTS {
            let mut obj = objects.get(Kind::Repository, Some(ns), name).await?;
            let rev = crate::objects::revision_of(&obj).unwrap_or_default();
            let Object::Repository(repo) = &mut obj else {
                return Err(ObjectError::WrongKind {
                    id,
                    expected: Kind::Repository,
                }
                .into());
            };
            let mut status = repo.status.take().unwrap_or_default();
            let generation = repo.metadata.generation.unwrap_or(0);
            let outcome = change(&id, &mut status, generation)?;
            if !outcome.changed {
                let put = draft.put(audit::Outcome::Allowed, 0, false, &outcome.message);
                audit::record_alone(objects.store().as_ref(), put).await?;
                return Ok(outcome);
            }
            repo.status = Some(status);
            let wanted = model::wanted_digests(repo);
            if let Some(st) = repo.status.as_mut() {
                st.synced_clusters = crate::status::count_synced(&st.clusters, &wanted);
            }
            let put = objects.status_put(&obj, rev)?;
            let record = draft.put(audit::Outcome::Allowed, 0, true, &outcome.message);
            match objects.store().commit(vec![Write::Put(put)], record).await {
                Ok(_) => return Ok(outcome),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ObjectError::Contended(id).into())
    }

    async fn query_audit(
        &self,
        req: Request<pb::AuditQuery>,
    ) -> Result<pb::AuditResponse, AdminError> {
        let q = req.get_ref();
        let ns = (!q.all_namespaces && !q.namespace.is_empty()).then(|| q.namespace.clone());
        let caller = self
            .authorize(&req, Verb::List, Resource::Audit, ns.as_deref())
            .await?;
        let q = req.into_inner();
        let since = q
            .since
            .map(|t| {
                u64::try_from(t.seconds).unwrap_or(0) * 1_000_000_000
                    + u64::try_from(t.nanos).unwrap_or(0)
            })
            .unwrap_or(0);
        let entries =
            audit::read(self.inner.objects.store().as_ref(), ns.as_deref(), since).await?;
        let mut events: Vec<pb::AuditEvent> = entries
            .into_iter()
            .filter(|e| q.user.is_empty() || e.record.user == q.user)
            // Across namespaces: only what the caller may read; fleet-wide
            // records only with a fleet role.
            .filter(|e| {
                let ns = (!e.record.namespace.is_empty()).then_some(e.record.namespace.as_str());
                caller.may(Verb::List, Resource::Audit, ns)
            })
            .map(audit_event)
            .collect();
        let limit = if q.limit == 0 { 1000 } else { q.limit as usize };
        if events.len() > limit {
            events.drain(..events.len() - limit);
        }
        Ok(pb::AuditResponse { events })
    }

    async fn issue_pull_token(
        &self,
        req: Request<pb::PullTokenRequest>,
        draft: &Draft,
    ) -> Result<pb::PullTokenResponse, AdminError> {
        let ns = req.get_ref().namespace.clone();
        let caller = self
            .authorize(&req, Verb::Issue, Resource::PullTokens, Some(&ns))
            .await?;
        let q = req.into_inner();
        let ca = self.inner.ca.as_ref().ok_or(AdminError::NoSigningCa)?;
        // Only for a cluster that admits the namespace: any other token
        // would read nothing.
        let Object::Cluster(cluster) = self
            .inner
            .objects
            .get(Kind::Cluster, None, &q.cluster)
            .await?
        else {
            return Err(AdminError::PullToken(format!(
                "Cluster {}: the stored object is not a Cluster",
                q.cluster
            )));
        };
        if !cluster.spec.tenants.contains(&ns) {
            return Err(AdminError::PullToken(format!(
                "Cluster {} does not admit namespace {ns} (spec.tenants): a token for it would read nothing",
                q.cluster
            )));
        }
        let ttl = if q.ttl_seconds == 0 {
            720 * 3600
        } else {
            q.ttl_seconds
        };
        let now = i64::try_from(crate::revocation::now_nanos() / 1_000_000_000).unwrap_or(0);
        let exp = now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX / 2));
        let claims = imgfleet_common::pull_token::Claims {
            cluster: q.cluster.clone(),
            namespace: ns.clone(),
            iat: now,
            exp,
        };
        let token = imgfleet_common::pull_token::mint(ca.key_pem(), &claims)
            .map_err(|e| AdminError::PullToken(e.to_string()))?;
        // The record names the token's scope and lifetime, never the token.
        let message = format!("pull token for cluster {} issued, valid {ttl}s", q.cluster);
        audit::record_alone(
            self.inner.objects.store().as_ref(),
            draft.put(audit::Outcome::Allowed, 0, false, &message),
        )
        .await?;
        info!(admin = %caller.user.name, cluster = %q.cluster, namespace = %ns, ttl_seconds = ttl,
              "Issued pull token");
        Ok(pb::PullTokenResponse {
            token,
            expires: Some(prost_types::Timestamp {
                seconds: exp,
                nanos: 0,
            }),
        })
    }

    async fn can_i(&self, req: Request<pb::CanIRequest>) -> Result<pb::CanIResponse, AdminError> {
        let caller = self.caller(&req).await?;
        let q = req.into_inner();
        let verb = Verb::parse(&q.verb).ok_or_else(|| {
            AdminError::BadQuestion(format!(
                "verb {:?}: expected get, list, watch, apply, delete, rollback, enroll, revoke or issue",
                q.verb
            ))
        })?;
        let resource = Resource::parse(&q.resource).ok_or_else(|| {
            AdminError::BadQuestion(format!(
                "resource {:?}: expected a kind (repositories, registrysecrets, clusters, rolebindings, clusterrolebindings), audit or users",
                q.resource
            ))
        })?;
        let ns = (resource.namespaced() && !q.namespace.is_empty()).then_some(q.namespace.as_str());
        let allowed = if resource.namespaced() && ns.is_none() {
            // Fleet-wide for a namespaced kind: only a fleet role answers yes.
            caller
                .grants
                .fleet
                .is_some_and(|r| crate::rbac::role_allows(r, verb, resource))
        } else {
            caller.may(verb, resource, ns)
        };
        let groups = if caller.user.groups.is_empty() {
            String::new()
        } else {
            format!(" (groups {})", caller.user.groups.join(", "))
        };
        Ok(pb::CanIResponse {
            allowed,
            subject: format!("{}{groups}", caller.user.name),
        })
    }

    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
        draft: &Draft,
    ) -> Result<pb::ApplyResponse, AdminError> {
        let wire = req
            .get_ref()
            .object
            .clone()
            .ok_or_else(|| AdminError::Missing("ApplyRequest.object".into()))?;
        let mut obj = Object::try_from(wire)?;
        if obj.kind().namespaced()
            && obj
                .metadata()
                .namespace
                .as_deref()
                .is_none_or(str::is_empty)
        {
            obj.metadata_mut().namespace = Some(model::DEFAULT_NAMESPACE.to_owned());
        }
        let kind = obj.kind();
        let caller = self
            .authorize(&req, Verb::Apply, Resource::Kind(kind), obj.namespace())
            .await?;
        self.no_escalation(&caller, &obj)?;
        let who = caller.user.name.clone();
        let req = req.into_inner();
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
        let audit = (!req.dry_run).then_some(Audit { draft, extra: &[] });
        let applied = self
            .inner
            .objects
            .apply_audited(obj, req.dry_run, audit)
            .await;
        // Nothing was written: no resolution will continue this trace.
        let wrote = matches!(&applied, Ok((_, o)) if *o != ApplyOutcome::Unchanged);
        if traced
            && !wrote
            && let Some((ns, name)) = &repository
        {
            traces.take_applied(ns, name);
        }
        let (stored, outcome) = applied?;
        if outcome == ApplyOutcome::Unchanged && !req.dry_run {
            let put = draft.put(audit::Outcome::Allowed, 0, false, "unchanged");
            audit::record_alone(self.inner.objects.store().as_ref(), put).await?;
        }
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
        let kind = kind_arg(req.get_ref().kind)?;
        let ns = ns_arg(kind, &req.get_ref().namespace).map(str::to_owned);
        self.authorize(&req, Verb::Get, Resource::Kind(kind), ns.as_deref())
            .await?;
        let req = req.into_inner();
        let name = name_arg(kind, &req.name)?;
        let obj = self
            .inner
            .objects
            .get(kind, ns_arg(kind, &req.namespace), name)
            .await?;
        Ok(response(&obj, &self.inner.placement.latest()))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<pb::ListResponse, AdminError> {
        let kind = kind_arg(req.get_ref().kind)?;
        let ns = if req.get_ref().all_namespaces {
            None
        } else {
            ns_arg(kind, &req.get_ref().namespace).map(str::to_owned)
        };
        let caller = self
            .authorize(&req, Verb::List, Resource::Kind(kind), ns.as_deref())
            .await?;
        let req = req.into_inner();
        let selector = parse_selector(&req.label_selector)?;
        let (items, rev) = self.inner.objects.list(kind, ns.as_deref()).await?;
        let empty = Default::default();
        let report = self.inner.placement.latest();
        let items = items
            .iter()
            // Across namespaces: only what the caller may read.
            .filter(|o| caller.may(Verb::List, Resource::Kind(kind), o.namespace()))
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
        draft: &Draft,
    ) -> Result<pb::DeleteResponse, AdminError> {
        let kind = kind_arg(req.get_ref().kind)?;
        let namespace = ns_arg(kind, &req.get_ref().namespace).map(str::to_owned);
        let caller = self
            .authorize(
                &req,
                Verb::Delete,
                Resource::Kind(kind),
                namespace.as_deref(),
            )
            .await?;
        let who = caller.user.name.clone();
        let req = req.into_inner();
        let name = name_arg(kind, &req.name)?;
        let rv = Some(req.resource_version.as_str()).filter(|s| !s.is_empty());
        let ns = namespace.as_deref();
        if matches!(kind, Kind::RoleBinding | Kind::ClusterRoleBinding) {
            match self.inner.objects.get(kind, ns, name).await {
                Ok(existing) => self.no_escalation(&caller, &existing)?,
                Err(ObjectError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
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
        // A deleted cluster's certificates must not come back with it: the
        // revocation is part of the delete.
        let mut extra = Vec::new();
        if kind == Kind::Cluster {
            let (put, _) = self
                .inner
                .revocations
                .revoke_put(&Revoked::Cluster(name.to_owned()))
                .await?;
            extra.push(Write::Put(put));
        }
        let obj = self
            .inner
            .objects
            .delete_audited(
                kind,
                ns,
                name,
                rv,
                Some(Audit {
                    draft,
                    extra: &extra,
                }),
            )
            .await?;
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
        let kind = kind_arg(req.get_ref().kind)?;
        let ns: Option<String> = if req.get_ref().all_namespaces {
            None
        } else {
            ns_arg(kind, &req.get_ref().namespace).map(str::to_string)
        };
        let caller = self
            .authorize(&req, Verb::Watch, Resource::Kind(kind), ns.as_deref())
            .await?;
        let req = req.into_inner();
        let objects = self.inner.objects.clone();
        let reports = self.inner.placement.clone();

        // List-then-watch: without a resourceVersion the current objects
        // come first as ADDED, then changes after the list's revision.
        let (initial, after) = if req.resource_version.is_empty() {
            let (items, rev) = objects.list(kind, ns.as_deref()).await?;
            let report = reports.latest();
            let events: Vec<Result<pb::WatchEvent, Status>> = items
                .iter()
                .filter(|o| caller.may(Verb::Watch, Resource::Kind(kind), o.namespace()))
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
                        let visible = |key_ns: &str| {
                            let ns = kind.namespaced().then_some(key_ns);
                            caller.may(Verb::Watch, Resource::Kind(kind), ns)
                        };
                        futures::future::ready(convert_event(
                            &objects,
                            &reports.latest(),
                            ns.as_deref(),
                            &visible,
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
        draft: &Draft,
    ) -> Result<pb::EnrollClusterResponse, AdminError> {
        let caller = self
            .authorize(&req, Verb::Enroll, Resource::Kind(Kind::Cluster), None)
            .await?;
        let who = caller.user.name.clone();
        let req = req.into_inner();
        let ca = self.inner.ca.as_ref().ok_or(AdminError::NoSigningCa)?;
        let lifetime = match req.validity_days {
            0 => self.inner.cluster_cert_lifetime,
            d if d > MAX_LEAF_VALIDITY_DAYS => {
                return Err(AdminError::BadValidity {
                    cluster: req.name,
                    days: d,
                });
            }
            d => std::time::Duration::from_secs(u64::from(d) * 86_400),
        };

        // An existing cluster is enrolled again only with reissue, which
        // keeps its labels, tenants and description unless told otherwise.
        let existing = match self.inner.objects.get(Kind::Cluster, None, &req.name).await {
            Ok(Object::Cluster(c)) => Some(c),
            Ok(_) | Err(ObjectError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if existing.is_some() && !req.reissue {
            return Err(AdminError::AlreadyEnrolled(req.name));
        }
        let reissued = existing.is_some();
        let (old_labels, old_tenants, description) = match existing {
            Some(c) => (
                c.metadata.labels.unwrap_or_default(),
                c.spec.tenants,
                c.spec.description,
            ),
            None => Default::default(),
        };
        let tenants = if reissued && !req.replace_tenants {
            old_tenants
        } else {
            req.tenants
        };
        let labels = if reissued && !req.replace_labels {
            old_labels
        } else {
            req.labels.into_iter().collect()
        };
        let mut cluster = Cluster::new(
            &req.name,
            ClusterSpec {
                tenants,
                description,
            },
        );
        cluster.metadata.labels = Some(labels);
        let candidate = Object::Cluster(cluster);

        // Validate (dry run) before issuing, so a bad name or label neither
        // leaves an object behind nor costs a certificate.
        self.inner.objects.apply(candidate.clone(), true).await?;
        // Every certificate issued so far is refused from the revocation's
        // time; the new one is signed after it, and both are committed with
        // the Cluster and the audit record.
        let mut extra = Vec::new();
        if reissued {
            let (put, _) = self
                .inner
                .revocations
                .revoke_put(&Revoked::Cluster(req.name.clone()))
                .await?;
            extra.push(Write::Put(put));
        }
        let leaf = ca
            .issue_cluster_for(&req.name, lifetime)
            .map_err(|source| AdminError::Issue {
                cluster: req.name.clone(),
                source,
            })?;
        let (stored, outcome) = self
            .inner
            .objects
            .apply_audited(
                candidate,
                false,
                Some(Audit {
                    draft,
                    extra: &extra,
                }),
            )
            .await?;
        if outcome == ApplyOutcome::Unchanged {
            // The Cluster is as it was; the revocation still goes in.
            let message = if reissued {
                "certificate reissued; earlier ones revoked"
            } else {
                "enrolled"
            };
            let put = draft.put(audit::Outcome::Allowed, 0, !extra.is_empty(), message);
            self.inner.objects.store().commit(extra, put).await?;
        }
        let Object::Cluster(stored) = stored else {
            return Err(ObjectError::WrongKind {
                id: model::object_id(Kind::Cluster, None, &req.name),
                expected: Kind::Cluster,
            }
            .into());
        };
        self.inner.metrics.enrolled();
        info!(admin = %who, cluster = %req.name, lifetime = ?lifetime, reissued, "Enrolled cluster");
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

/// How often a rollout change is tried against concurrent status writers.
const ROLLOUT_ATTEMPTS: usize = 16;

/// The namespace (default `default`) and name a rollout call names.
fn rollout_target(namespace: &str, name: &str) -> Result<(String, String), AdminError> {
    let name = name_arg(Kind::Repository, name)?.to_owned();
    let ns = ns_arg(Kind::Repository, namespace)
        .unwrap_or(model::DEFAULT_NAMESPACE)
        .to_owned();
    Ok((ns, name))
}

fn audit_event(e: audit::Entry) -> pb::AuditEvent {
    let r = e.record;
    pb::AuditEvent {
        audit_id: r.audit_id,
        time: Some(prost_types::Timestamp {
            seconds: i64::try_from(r.time_nanos / 1_000_000_000).unwrap_or(i64::MAX),
            nanos: i32::try_from(r.time_nanos % 1_000_000_000).unwrap_or(0),
        }),
        user: r.user,
        groups: r.groups,
        verb: r.verb,
        resource: r.resource,
        namespace: r.namespace,
        name: r.name,
        outcome: r.outcome.as_str().to_owned(),
        code: r.code,
        resource_version: e
            .resource_version
            .map(|v| v.to_string())
            .unwrap_or_default(),
        source: r.source,
        message: r.message,
    }
}

fn revoke_response(record: crate::revocation::Record) -> pb::RevokeResponse {
    let nanos = record.revoked_before_nanos;
    pb::RevokeResponse {
        revoked_before: Some(prost_types::Timestamp {
            seconds: i64::try_from(nanos / 1_000_000_000).unwrap_or(i64::MAX),
            nanos: i32::try_from(nanos % 1_000_000_000).unwrap_or(0),
        }),
    }
}

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
    visible: &dyn Fn(&str) -> bool,
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
    // A namespace the caller may not read.
    if !visible(&v.key.namespace) {
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

/// The resource, namespace and name an Apply names, read from the wire
/// before anything is checked (for the audit record of a refusal).
fn apply_target(req: &pb::ApplyRequest) -> (String, String, String) {
    let (kind, meta) = match req.object.as_ref().and_then(|o| o.kind.as_ref()) {
        Some(pb::object::Kind::RegistrySecret(x)) => (Kind::RegistrySecret, x.metadata.as_ref()),
        Some(pb::object::Kind::Repository(x)) => (Kind::Repository, x.metadata.as_ref()),
        Some(pb::object::Kind::Cluster(x)) => (Kind::Cluster, x.metadata.as_ref()),
        Some(pb::object::Kind::RoleBinding(x)) => (Kind::RoleBinding, x.metadata.as_ref()),
        Some(pb::object::Kind::ClusterRoleBinding(x)) => {
            (Kind::ClusterRoleBinding, x.metadata.as_ref())
        }
        None => return (String::new(), String::new(), String::new()),
    };
    let name = meta.map(|m| m.name.clone()).unwrap_or_default();
    let ns = meta.map(|m| m.namespace.as_str()).unwrap_or_default();
    let ns = ns_arg(kind, ns).unwrap_or_default().to_owned();
    (kind.plural().to_owned(), ns, name)
}

fn kind_target(kind: i32, namespace: &str, name: &str) -> (String, String, String) {
    match kind_from_proto(kind) {
        Some(k) => (
            k.plural().to_owned(),
            ns_arg(k, namespace).unwrap_or_default().to_owned(),
            name.to_owned(),
        ),
        None => (String::new(), namespace.to_owned(), name.to_owned()),
    }
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let (res, ns, name) = apply_target(request.get_ref());
        let draft = self.draft(&request, Verb::Apply, &res, &ns, &name);
        let dry_run = request.get_ref().dry_run;
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
        let r =
            tracing::Instrument::instrument(AdminService::apply(self, request, &draft), span).await;
        self.audit_failure(&draft, r.as_ref().err(), !dry_run).await;
        self.done("Apply", r).map(Response::new)
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Object>, Status> {
        let g = request.get_ref();
        let (res, ns, name) = kind_target(g.kind, &g.namespace, &g.name);
        let draft = self.draft(&request, Verb::Get, &res, &ns, &name);
        let r = AdminService::get(self, request).await;
        self.audit_failure(&draft, r.as_ref().err(), false).await;
        self.done("Get", r).map(Response::new)
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let l = request.get_ref();
        let (res, ns, _) = kind_target(l.kind, &l.namespace, "");
        let ns = if l.all_namespaces { String::new() } else { ns };
        let draft = self.draft(&request, Verb::List, &res, &ns, "");
        let r = AdminService::list(self, request).await;
        self.audit_failure(&draft, r.as_ref().err(), false).await;
        self.done("List", r).map(Response::new)
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let d = request.get_ref();
        let (res, ns, name) = kind_target(d.kind, &d.namespace, &d.name);
        let draft = self.draft(&request, Verb::Delete, &res, &ns, &name);
        let r = AdminService::delete(self, request, &draft).await;
        self.audit_failure(&draft, r.as_ref().err(), true).await;
        self.done("Delete", r).map(Response::new)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let w = request.get_ref();
        let (res, ns, _) = kind_target(w.kind, &w.namespace, "");
        let ns = if w.all_namespaces { String::new() } else { ns };
        let draft = self.draft(&request, Verb::Watch, &res, &ns, "");
        let r = AdminService::watch(self, request).await;
        self.audit_failure(&draft, r.as_ref().err(), false).await;
        self.done("Watch", r).map(Response::new)
    }

    async fn enroll_cluster(
        &self,
        request: Request<pb::EnrollClusterRequest>,
    ) -> Result<Response<pb::EnrollClusterResponse>, Status> {
        let name = request.get_ref().name.clone();
        let draft = self.draft(&request, Verb::Enroll, "clusters", "", &name);
        let r = AdminService::enroll(self, request, &draft).await;
        self.audit_failure(&draft, r.as_ref().err(), true).await;
        self.done("EnrollCluster", r).map(Response::new)
    }

    async fn can_i(
        &self,
        request: Request<pb::CanIRequest>,
    ) -> Result<Response<pb::CanIResponse>, Status> {
        let r = AdminService::can_i(self, request).await;
        self.done("CanI", r).map(Response::new)
    }

    async fn issue_user(
        &self,
        request: Request<pb::IssueUserRequest>,
    ) -> Result<Response<pb::IssueUserResponse>, Status> {
        let name = request.get_ref().name.clone();
        let draft = self.draft(&request, Verb::Issue, "users", "", &name);
        let r = AdminService::issue_user(self, request, &draft).await;
        self.audit_failure(&draft, r.as_ref().err(), true).await;
        self.done("IssueUser", r).map(Response::new)
    }

    async fn revoke_user(
        &self,
        request: Request<pb::RevokeUserRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let name = request.get_ref().name.clone();
        let draft = self.draft(&request, Verb::Revoke, "users", "", &name);
        let r = AdminService::revoke_user(self, request, &draft).await;
        self.audit_failure(&draft, r.as_ref().err(), true).await;
        self.done("RevokeUser", r).map(Response::new)
    }

    async fn revoke_cluster(
        &self,
        request: Request<pb::RevokeClusterRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let name = request.get_ref().name.clone();
        let draft = self.draft(&request, Verb::Revoke, "clusters", "", &name);
        let r = AdminService::revoke_cluster(self, request, &draft).await;
        self.audit_failure(&draft, r.as_ref().err(), true).await;
        self.done("RevokeCluster", r).map(Response::new)
    }

    async fn issue_pull_token(
        &self,
        request: Request<pb::PullTokenRequest>,
    ) -> Result<Response<pb::PullTokenResponse>, Status> {
        let (ns, name) = (
            request.get_ref().namespace.clone(),
            request.get_ref().cluster.clone(),
        );
        let draft = self.draft(&request, Verb::Issue, "pulltokens", &ns, &name);
        let r = AdminService::issue_pull_token(self, request, &draft).await;
        self.audit_failure(&draft, r.as_ref().err(), true).await;
        self.done("IssuePullToken", r).map(Response::new)
    }

    async fn rollout_history(
        &self,
        request: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutHistoryResponse>, Status> {
        let r = request.get_ref();
        let draft = self.repository_draft(&request, Verb::Get, &r.namespace, &r.name);
        let r = AdminService::rollout_history(self, request).await;
        self.audit_failure(&draft, r.as_ref().err(), false).await;
        self.done("RolloutHistory", r).map(Response::new)
    }

    async fn rollout_undo(
        &self,
        request: Request<pb::RolloutUndoRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        let r = request.get_ref();
        let draft = self.repository_draft(&request, Verb::Rollback, &r.namespace, &r.name);
        let r = AdminService::rollout_undo(self, request, &draft).await;
        self.audit_failure(&draft, r.as_ref().err(), true).await;
        self.done("RolloutUndo", r).map(Response::new)
    }

    async fn rollout_resume(
        &self,
        request: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        let r = request.get_ref();
        let mut draft = self.repository_draft(&request, Verb::Rollback, &r.namespace, &r.name);
        // The permission is rollback's; the record says what was done.
        draft.verb = "resume".to_owned();
        let r = AdminService::rollout_resume(self, request, &draft).await;
        self.audit_failure(&draft, r.as_ref().err(), true).await;
        self.done("RolloutResume", r).map(Response::new)
    }

    async fn query_audit(
        &self,
        request: Request<pb::AuditQuery>,
    ) -> Result<Response<pb::AuditResponse>, Status> {
        let q = request.get_ref();
        let ns = if q.all_namespaces {
            String::new()
        } else {
            q.namespace.clone()
        };
        let draft = self.draft(&request, Verb::List, "audit", &ns, "");
        let r = AdminService::query_audit(self, request).await;
        self.audit_failure(&draft, r.as_ref().err(), false).await;
        self.done("QueryAudit", r).map(Response::new)
    }
}
