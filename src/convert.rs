//! Conversions between the resource model and the wire contract (`api::v1`).
//!
//! Model to wire cannot fail. Wire to model fails only on structure (a missing
//! message, an enum number this build does not know, a bad timestamp) and names
//! the field; the semantic rules are [`Object::validate`]'s job. Durations stay
//! strings on both sides. Empty wire strings and zero numbers mean "not set".

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::api::v1 as pb;
use crate::model::{
    BlockSeverity, Cluster, ClusterImageStatus, ClusterPhase, ClusterRoleBinding,
    ClusterRoleBindingSpec, ClusterSpec, ClusterStatus, ConnectionPhase, HeldRepository,
    ImagePhase, Kind, LabelSelector, LabelSelectorRequirement, Object, Placement, PlacementReason,
    PlacementStatus, Provider, RegistryRef, RegistrySecret, RegistrySecretSpec,
    RegistrySecretStatus, Repository, RepositorySpec, RepositoryStatus, ResolveReason, ResolvedTag,
    Retention, Revision, RevisionCause, RoleBinding, RoleBindingSpec, Scan, SelectorOperator,
    Subject, TagPattern, Verify, VerifyKey, VerifyMode, object_id,
};

/// A wire object that does not map onto the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct ConvertError {
    /// The object, e.g. `Repository default/nginx`.
    pub object: String,
    /// The field, e.g. `spec.registryRef`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(object: &str, field: &str, message: impl Into<String>) -> ConvertError {
    ConvertError {
        object: object.to_owned(),
        field: field.to_owned(),
        message: message.into(),
    }
}

fn opt(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

fn opt_u32(n: u32) -> Option<u32> {
    if n == 0 { None } else { Some(n) }
}

// ---------------------------------------------------------------------------
// Time, Kind, metadata
// ---------------------------------------------------------------------------

/// A model time as a protobuf timestamp.
pub fn time_to_proto(t: &Time) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.as_second(),
        nanos: t.0.subsec_nanosecond(),
    }
}

/// A protobuf timestamp as a model time; `None` when it is out of range.
pub fn time_from_proto(t: &prost_types::Timestamp) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::new(t.seconds, t.nanos)
        .ok()
        .map(Time)
}

fn time_field(
    object: &str,
    field: &str,
    t: Option<prost_types::Timestamp>,
) -> Result<Option<Time>, ConvertError> {
    match t {
        None => Ok(None),
        Some(t) => time_from_proto(&t).map(Some).ok_or_else(|| {
            err(
                object,
                field,
                format!("timestamp {}s {}ns is out of range", t.seconds, t.nanos),
            )
        }),
    }
}

impl From<Kind> for pb::Kind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::RegistrySecret => pb::Kind::RegistrySecret,
            Kind::Repository => pb::Kind::Repository,
            Kind::Cluster => pb::Kind::Cluster,
            Kind::RoleBinding => pb::Kind::RoleBinding,
            Kind::ClusterRoleBinding => pb::Kind::ClusterRoleBinding,
        }
    }
}

/// A wire kind number as a model kind; `None` for unspecified or unknown.
pub fn kind_from_proto(kind: i32) -> Option<Kind> {
    match pb::Kind::try_from(kind).ok()? {
        pb::Kind::RegistrySecret => Some(Kind::RegistrySecret),
        pb::Kind::Repository => Some(Kind::Repository),
        pb::Kind::Cluster => Some(Kind::Cluster),
        pb::Kind::RoleBinding => Some(Kind::RoleBinding),
        pb::Kind::ClusterRoleBinding => Some(Kind::ClusterRoleBinding),
        pb::Kind::Unspecified => None,
    }
}

fn meta_to_proto(m: &ObjectMeta) -> pb::ObjectMeta {
    let map = |m: &Option<BTreeMap<String, String>>| -> HashMap<String, String> {
        m.iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    pb::ObjectMeta {
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        labels: map(&m.labels),
        resource_version: m.resource_version.clone().unwrap_or_default(),
        generation: m.generation.unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        creation_timestamp: m.creation_timestamp.as_ref().map(time_to_proto),
        annotations: map(&m.annotations),
    }
}

fn meta_from_proto(
    kind: Kind,
    m: Option<pb::ObjectMeta>,
) -> Result<(String, ObjectMeta), ConvertError> {
    let Some(m) = m else {
        return Err(err(&format!("{kind} (unnamed)"), "metadata", "missing"));
    };
    let namespace = kind.namespaced().then(|| m.namespace.clone()).and_then(opt);
    let id = object_id(
        kind,
        kind.namespaced().then(|| {
            namespace
                .as_deref()
                .unwrap_or(crate::model::DEFAULT_NAMESPACE)
        }),
        &m.name,
    );
    let map = |h: HashMap<String, String>| -> Option<BTreeMap<String, String>> {
        if h.is_empty() {
            None
        } else {
            Some(h.into_iter().collect())
        }
    };
    let creation_timestamp = time_field(&id, "metadata.creationTimestamp", m.creation_timestamp)?;
    let meta = ObjectMeta {
        namespace,
        name: opt(m.name),
        labels: map(m.labels),
        annotations: map(m.annotations),
        resource_version: opt(m.resource_version),
        generation: if m.generation == 0 {
            None
        } else {
            Some(m.generation)
        },
        uid: opt(m.uid),
        creation_timestamp,
        ..ObjectMeta::default()
    };
    Ok((id, meta))
}

/// Decodes a wire enum number, naming the field when it is unknown.
fn enum_field<T: TryFrom<i32>>(object: &str, field: &str, n: i32) -> Result<T, ConvertError> {
    T::try_from(n).map_err(|_| err(object, field, format!("unknown enum value {n}")))
}

// ---------------------------------------------------------------------------
// Object
// ---------------------------------------------------------------------------

impl From<&Object> for pb::Object {
    /// The full object, password included: what the CLI sends on Apply.
    fn from(o: &Object) -> Self {
        let kind = match o {
            Object::RegistrySecret(x) => pb::object::Kind::RegistrySecret(x.into()),
            Object::Repository(x) => pb::object::Kind::Repository(x.into()),
            Object::Cluster(x) => pb::object::Kind::Cluster(x.into()),
            Object::RoleBinding(x) => pb::object::Kind::RoleBinding(pb::RoleBinding {
                metadata: Some(meta_to_proto(&x.metadata)),
                spec: Some(binding_spec_to_proto(&x.spec.role, &x.spec.subjects)),
            }),
            Object::ClusterRoleBinding(x) => {
                pb::object::Kind::ClusterRoleBinding(pb::ClusterRoleBinding {
                    metadata: Some(meta_to_proto(&x.metadata)),
                    spec: Some(binding_spec_to_proto(&x.spec.role, &x.spec.subjects)),
                })
            }
        };
        pb::Object { kind: Some(kind) }
    }
}

impl TryFrom<pb::Object> for Object {
    type Error = ConvertError;
    fn try_from(o: pb::Object) -> Result<Self, Self::Error> {
        match o.kind {
            Some(pb::object::Kind::RegistrySecret(x)) => Ok(Object::RegistrySecret(x.try_into()?)),
            Some(pb::object::Kind::Repository(x)) => Ok(Object::Repository(x.try_into()?)),
            Some(pb::object::Kind::Cluster(x)) => Ok(Object::Cluster(x.try_into()?)),
            Some(pb::object::Kind::RoleBinding(x)) => {
                let (id, metadata) = meta_from_proto(Kind::RoleBinding, x.metadata)?;
                let (role, subjects) = binding_spec_from_proto(&id, x.spec)?;
                Ok(Object::RoleBinding(RoleBinding {
                    metadata,
                    spec: RoleBindingSpec { role, subjects },
                }))
            }
            Some(pb::object::Kind::ClusterRoleBinding(x)) => {
                let (id, metadata) = meta_from_proto(Kind::ClusterRoleBinding, x.metadata)?;
                let (role, subjects) = binding_spec_from_proto(&id, x.spec)?;
                Ok(Object::ClusterRoleBinding(ClusterRoleBinding {
                    metadata,
                    spec: ClusterRoleBindingSpec { role, subjects },
                }))
            }
            None => Err(err(
                "object",
                "kind",
                "missing: expected a RegistrySecret, Repository, Cluster, RoleBinding or ClusterRoleBinding",
            )),
        }
    }
}

fn binding_spec_to_proto(role: &str, subjects: &[Subject]) -> pb::RoleBindingSpec {
    pb::RoleBindingSpec {
        role: role.to_owned(),
        subjects: subjects
            .iter()
            .map(|s| pb::Subject {
                kind: s.kind.clone(),
                name: s.name.clone(),
            })
            .collect(),
    }
}

fn binding_spec_from_proto(
    id: &str,
    spec: Option<pb::RoleBindingSpec>,
) -> Result<(String, Vec<Subject>), ConvertError> {
    let s = spec.ok_or_else(|| err(id, "spec", "missing"))?;
    Ok((
        s.role,
        s.subjects
            .into_iter()
            .map(|x| Subject {
                kind: x.kind,
                name: x.name,
            })
            .collect(),
    ))
}

/// The object as an API *response* carries it: the password removed and
/// `password_set` telling whether one is stored.
pub fn to_response(o: &Object) -> pb::Object {
    let mut out = pb::Object::from(o);
    if let Some(pb::object::Kind::RegistrySecret(rs)) = &mut out.kind {
        redact(rs);
    }
    out
}

/// Removes the password of a wire RegistrySecret, setting `password_set`.
pub fn redact(rs: &mut pb::RegistrySecret) {
    if let Some(spec) = &mut rs.spec {
        spec.password_set = spec.password_set || !spec.password.is_empty();
        spec.password.clear();
    }
}

// ---------------------------------------------------------------------------
// RegistrySecret
// ---------------------------------------------------------------------------

fn provider_to_proto(p: Provider) -> pb::Provider {
    match p {
        Provider::Harbor => pb::Provider::Harbor,
        Provider::Dockerhub => pb::Provider::Dockerhub,
        Provider::Aliyun => pb::Provider::Aliyun,
        Provider::Generic => pb::Provider::Generic,
    }
}

impl From<&RegistrySecret> for pb::RegistrySecret {
    /// Keeps the password; use [`to_response`] or [`redact`] for responses.
    fn from(o: &RegistrySecret) -> Self {
        let s = &o.spec;
        pb::RegistrySecret {
            metadata: Some(meta_to_proto(&o.metadata)),
            spec: Some(pb::RegistrySecretSpec {
                domain: s.domain.clone(),
                username: s.username.clone().unwrap_or_default(),
                password: s.password.clone().unwrap_or_default(),
                provider: provider_to_proto(s.provider) as i32,
                insecure: s.insecure,
                password_set: s.password.is_some(),
            }),
            status: o.status.as_ref().map(|st| pb::RegistrySecretStatus {
                phase: match st.phase {
                    None => pb::ConnectionPhase::Unspecified,
                    Some(ConnectionPhase::Connected) => pb::ConnectionPhase::Connected,
                    Some(ConnectionPhase::AuthFailed) => pb::ConnectionPhase::AuthFailed,
                    Some(ConnectionPhase::Unreachable) => pb::ConnectionPhase::Unreachable,
                    Some(ConnectionPhase::CredentialUnusable) => {
                        pb::ConnectionPhase::CredentialUnusable
                    }
                } as i32,
                last_check_time: st.last_check_time.as_ref().map(time_to_proto),
                latency_ms: st.latency_ms,
                message: st.message.clone().unwrap_or_default(),
            }),
        }
    }
}

impl TryFrom<pb::RegistrySecret> for RegistrySecret {
    type Error = ConvertError;
    fn try_from(o: pb::RegistrySecret) -> Result<Self, Self::Error> {
        let (id, metadata) = meta_from_proto(Kind::RegistrySecret, o.metadata)?;
        let s = o.spec.ok_or_else(|| err(&id, "spec", "missing"))?;
        let provider = match enum_field::<pb::Provider>(&id, "spec.provider", s.provider)? {
            pb::Provider::Harbor => Provider::Harbor,
            pb::Provider::Dockerhub => Provider::Dockerhub,
            pb::Provider::Aliyun => Provider::Aliyun,
            pb::Provider::Generic | pb::Provider::Unspecified => Provider::Generic,
        };
        let status = match o.status {
            None => None,
            Some(st) => Some(RegistrySecretStatus {
                phase: match enum_field::<pb::ConnectionPhase>(&id, "status.phase", st.phase)? {
                    pb::ConnectionPhase::Unspecified => None,
                    pb::ConnectionPhase::Connected => Some(ConnectionPhase::Connected),
                    pb::ConnectionPhase::AuthFailed => Some(ConnectionPhase::AuthFailed),
                    pb::ConnectionPhase::Unreachable => Some(ConnectionPhase::Unreachable),
                    pb::ConnectionPhase::CredentialUnusable => {
                        Some(ConnectionPhase::CredentialUnusable)
                    }
                },
                last_check_time: time_field(&id, "status.lastCheckTime", st.last_check_time)?,
                latency_ms: st.latency_ms,
                message: opt(st.message),
            }),
        };
        Ok(RegistrySecret {
            metadata,
            spec: RegistrySecretSpec {
                domain: s.domain,
                username: opt(s.username),
                password: opt(s.password),
                provider,
                insecure: s.insecure,
            },
            status,
        })
    }
}

// ---------------------------------------------------------------------------
// Repository
// ---------------------------------------------------------------------------

fn operator_to_proto(op: SelectorOperator) -> pb::SelectorOperator {
    match op {
        SelectorOperator::In => pb::SelectorOperator::In,
        SelectorOperator::NotIn => pb::SelectorOperator::NotIn,
        SelectorOperator::Exists => pb::SelectorOperator::Exists,
        SelectorOperator::DoesNotExist => pb::SelectorOperator::DoesNotExist,
    }
}

/// A model label selector on the wire.
pub fn selector_to_proto(sel: &LabelSelector) -> pb::LabelSelector {
    pb::LabelSelector {
        match_labels: sel
            .match_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        match_expressions: sel
            .match_expressions
            .iter()
            .map(|e| pb::LabelSelectorRequirement {
                key: e.key.clone(),
                operator: operator_to_proto(e.operator) as i32,
                values: e.values.clone(),
            })
            .collect(),
    }
}

fn selector_from_proto(
    id: &str,
    field: &str,
    sel: pb::LabelSelector,
) -> Result<LabelSelector, ConvertError> {
    let mut match_expressions = Vec::with_capacity(sel.match_expressions.len());
    for (i, e) in sel.match_expressions.into_iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}].operator");
        let operator = match enum_field::<pb::SelectorOperator>(id, &f, e.operator)? {
            pb::SelectorOperator::In => SelectorOperator::In,
            pb::SelectorOperator::NotIn => SelectorOperator::NotIn,
            pb::SelectorOperator::Exists => SelectorOperator::Exists,
            pb::SelectorOperator::DoesNotExist => SelectorOperator::DoesNotExist,
            pb::SelectorOperator::Unspecified => {
                return Err(err(
                    id,
                    &f,
                    "unspecified: expected In, NotIn, Exists or DoesNotExist",
                ));
            }
        };
        match_expressions.push(LabelSelectorRequirement {
            key: e.key,
            operator,
            values: e.values,
        });
    }
    Ok(LabelSelector {
        match_labels: sel.match_labels.into_iter().collect(),
        match_expressions,
    })
}

fn image_phase_to_proto(p: Option<ImagePhase>) -> pb::ImagePhase {
    match p {
        None => pb::ImagePhase::Unspecified,
        Some(ImagePhase::Pending) => pb::ImagePhase::Pending,
        Some(ImagePhase::Syncing) => pb::ImagePhase::Syncing,
        Some(ImagePhase::Synced) => pb::ImagePhase::Synced,
        Some(ImagePhase::Failed) => pb::ImagePhase::Failed,
        Some(ImagePhase::Offline) => pb::ImagePhase::Offline,
    }
}

/// A model per-cluster image status on the wire.
pub fn cluster_image_status_to_proto(c: &ClusterImageStatus) -> pb::ClusterImageStatus {
    pb::ClusterImageStatus {
        cluster: c.cluster.clone(),
        digest: c.digest.clone(),
        phase: image_phase_to_proto(c.phase) as i32,
        bytes_done: c.bytes_done,
        bytes_total: c.bytes_total,
        layers_done: c.layers_done,
        layers_total: c.layers_total,
        last_sync_time: c.last_sync_time.as_ref().map(time_to_proto),
        message: c.message.clone().unwrap_or_default(),
        next_retry_time: c.next_retry_time.as_ref().map(time_to_proto),
        last_known: c.last_known,
        held_digests: c.held_digests.clone(),
    }
}

fn placement_reason_to_proto(r: PlacementReason) -> pb::PlacementReason {
    match r {
        PlacementReason::NoClusterAdmitsNamespace => pb::PlacementReason::NoClusterAdmitsNamespace,
        PlacementReason::NoClusterMatches => pb::PlacementReason::NoClusterMatches,
        PlacementReason::SecretNotFound => pb::PlacementReason::SecretNotFound,
        PlacementReason::SecretInOtherNamespace => pb::PlacementReason::SecretInOtherNamespace,
        PlacementReason::CredentialUnusable => pb::PlacementReason::CredentialUnusable,
        PlacementReason::Suspended => pb::PlacementReason::Suspended,
        PlacementReason::NotResolved => pb::PlacementReason::NotResolved,
        PlacementReason::TenantNotAllowed => pb::PlacementReason::TenantNotAllowed,
    }
}

fn placement_status_from_proto(
    object: &str,
    p: pb::PlacementStatus,
) -> Result<Option<PlacementStatus>, ConvertError> {
    let reason =
        match enum_field::<pb::PlacementReason>(object, "status.placement.reason", p.reason)? {
            pb::PlacementReason::Unspecified => return Ok(None),
            pb::PlacementReason::NoClusterAdmitsNamespace => {
                PlacementReason::NoClusterAdmitsNamespace
            }
            pb::PlacementReason::NoClusterMatches => PlacementReason::NoClusterMatches,
            pb::PlacementReason::SecretNotFound => PlacementReason::SecretNotFound,
            pb::PlacementReason::SecretInOtherNamespace => PlacementReason::SecretInOtherNamespace,
            pb::PlacementReason::CredentialUnusable => PlacementReason::CredentialUnusable,
            pb::PlacementReason::Suspended => PlacementReason::Suspended,
            pb::PlacementReason::NotResolved => PlacementReason::NotResolved,
            pb::PlacementReason::TenantNotAllowed => PlacementReason::TenantNotAllowed,
        };
    Ok(Some(PlacementStatus {
        reason,
        message: p.message,
    }))
}

/// A wire per-cluster image status in the model; `object` and `field` name it in errors.
pub fn cluster_image_status_from_proto(
    object: &str,
    field: &str,
    c: pb::ClusterImageStatus,
) -> Result<ClusterImageStatus, ConvertError> {
    let phase = match enum_field::<pb::ImagePhase>(object, &format!("{field}.phase"), c.phase)? {
        pb::ImagePhase::Unspecified => None,
        pb::ImagePhase::Pending => Some(ImagePhase::Pending),
        pb::ImagePhase::Syncing => Some(ImagePhase::Syncing),
        pb::ImagePhase::Synced => Some(ImagePhase::Synced),
        pb::ImagePhase::Failed => Some(ImagePhase::Failed),
        pb::ImagePhase::Offline => Some(ImagePhase::Offline),
    };
    Ok(ClusterImageStatus {
        cluster: c.cluster,
        digest: c.digest,
        phase,
        bytes_done: c.bytes_done,
        bytes_total: c.bytes_total,
        layers_done: c.layers_done,
        layers_total: c.layers_total,
        last_sync_time: time_field(object, &format!("{field}.lastSyncTime"), c.last_sync_time)?,
        message: opt(c.message),
        next_retry_time: time_field(object, &format!("{field}.nextRetryTime"), c.next_retry_time)?,
        last_known: c.last_known,
        held_digests: c.held_digests,
    })
}

impl From<&Repository> for pb::Repository {
    fn from(o: &Repository) -> Self {
        let s = &o.spec;
        pb::Repository {
            metadata: Some(meta_to_proto(&o.metadata)),
            spec: Some(pb::RepositorySpec {
                repository: s.repository.clone(),
                tag: s.tag.clone().unwrap_or_default(),
                registry_ref: Some(pb::ObjectRef {
                    name: s.registry_ref.name.clone(),
                    namespace: s.registry_ref.namespace.clone().unwrap_or_default(),
                }),
                sync_interval: s.sync_interval.clone().unwrap_or_default(),
                tags: s.tags.clone(),
                tag_pattern: s.tag_pattern.as_ref().map(|p| pb::TagPattern {
                    pattern: p.pattern.clone(),
                    keep_latest: p.keep_latest.unwrap_or_default(),
                }),
                digest: s.digest.clone().unwrap_or_default(),
                platforms: s.platforms.clone(),
                placement: s.placement.as_ref().map(|p| pb::Placement {
                    cluster_selector: p.cluster_selector.as_ref().map(selector_to_proto),
                    clusters: p.clusters.clone(),
                }),
                retention: s.retention.as_ref().map(|r| pb::Retention {
                    keep_versions: r.keep_versions.unwrap_or_default(),
                    grace_period: r.grace_period.clone().unwrap_or_default(),
                }),
                suspend: s.suspend,
                scan: s.scan.as_ref().map(|c| pb::Scan {
                    adapter: c.adapter.clone(),
                    block_severity: c
                        .block_severity
                        .map(|b| format!("{b:?}"))
                        .unwrap_or_default(),
                }),
                verify: s.verify.as_ref().map(|v| pb::Verify {
                    keys: v
                        .keys
                        .iter()
                        .map(|k| pb::VerifyKey {
                            name: k.name.clone(),
                            public_key: k.public_key.clone(),
                        })
                        .collect(),
                    mode: match v.mode {
                        None => pb::VerifyMode::Unspecified,
                        Some(VerifyMode::Enforce) => pb::VerifyMode::Enforce,
                        Some(VerifyMode::Warn) => pb::VerifyMode::Warn,
                    } as i32,
                }),
            }),
            status: o.status.as_ref().map(|st| pb::RepositoryStatus {
                resolved: st.resolved.iter().map(resolved_tag_to_proto).collect(),
                last_resolve_time: st.last_resolve_time.as_ref().map(time_to_proto),
                reason: match st.reason {
                    None => pb::ResolveReason::Unspecified,
                    Some(ResolveReason::AuthFailed) => pb::ResolveReason::AuthFailed,
                    Some(ResolveReason::NotFound) => pb::ResolveReason::NotFound,
                    Some(ResolveReason::Unreachable) => pb::ResolveReason::Unreachable,
                    Some(ResolveReason::RateLimited) => pb::ResolveReason::RateLimited,
                    Some(ResolveReason::VerificationFailed) => {
                        pb::ResolveReason::VerificationFailed
                    }
                    Some(ResolveReason::ScanBlocked) => pb::ResolveReason::ScanBlocked,
                    Some(ResolveReason::ScannerUnavailable) => {
                        pb::ResolveReason::ScannerUnavailable
                    }
                } as i32,
                message: st.message.clone().unwrap_or_default(),
                stale: st.stale,
                retry_after: st.retry_after.as_ref().map(time_to_proto),
                clusters: st
                    .clusters
                    .iter()
                    .map(cluster_image_status_to_proto)
                    .collect(),
                synced_clusters: st.synced_clusters,
                target_clusters: st.target_clusters,
                observed_generation: st.observed_generation,
                placement: st.placement.as_ref().map(|p| pb::PlacementStatus {
                    reason: placement_reason_to_proto(p.reason) as i32,
                    message: p.message.clone(),
                }),
                revisions: st.revisions.iter().map(revision_to_proto).collect(),
                pinned_revision: st.pinned_revision.unwrap_or_default(),
            }),
        }
    }
}

impl TryFrom<pb::Repository> for Repository {
    type Error = ConvertError;
    fn try_from(o: pb::Repository) -> Result<Self, Self::Error> {
        let (id, metadata) = meta_from_proto(Kind::Repository, o.metadata)?;
        let s = o.spec.ok_or_else(|| err(&id, "spec", "missing"))?;
        let r = s.registry_ref.ok_or_else(|| {
            err(
                &id,
                "spec.registryRef",
                "missing: expected the name of a RegistrySecret",
            )
        })?;
        let placement = match s.placement {
            None => None,
            Some(p) => Some(Placement {
                cluster_selector: match p.cluster_selector {
                    None => None,
                    Some(sel) => Some(selector_from_proto(
                        &id,
                        "spec.placement.clusterSelector",
                        sel,
                    )?),
                },
                clusters: p.clusters,
            }),
        };
        let status = match o.status {
            None => None,
            Some(st) => {
                let mut clusters = Vec::with_capacity(st.clusters.len());
                for (i, c) in st.clusters.into_iter().enumerate() {
                    clusters.push(cluster_image_status_from_proto(
                        &id,
                        &format!("status.clusters[{i}]"),
                        c,
                    )?);
                }
                Some(RepositoryStatus {
                    resolved: st
                        .resolved
                        .into_iter()
                        .map(resolved_tag_from_proto)
                        .collect(),
                    last_resolve_time: time_field(
                        &id,
                        "status.lastResolveTime",
                        st.last_resolve_time,
                    )?,
                    reason: match enum_field::<pb::ResolveReason>(&id, "status.reason", st.reason)?
                    {
                        pb::ResolveReason::Unspecified => None,
                        pb::ResolveReason::AuthFailed => Some(ResolveReason::AuthFailed),
                        pb::ResolveReason::NotFound => Some(ResolveReason::NotFound),
                        pb::ResolveReason::Unreachable => Some(ResolveReason::Unreachable),
                        pb::ResolveReason::RateLimited => Some(ResolveReason::RateLimited),
                        pb::ResolveReason::VerificationFailed => {
                            Some(ResolveReason::VerificationFailed)
                        }
                        pb::ResolveReason::ScanBlocked => Some(ResolveReason::ScanBlocked),
                        pb::ResolveReason::ScannerUnavailable => {
                            Some(ResolveReason::ScannerUnavailable)
                        }
                    },
                    message: opt(st.message),
                    stale: st.stale,
                    retry_after: time_field(&id, "status.retryAfter", st.retry_after)?,
                    clusters,
                    synced_clusters: st.synced_clusters,
                    target_clusters: st.target_clusters,
                    observed_generation: st.observed_generation,
                    placement: match st.placement {
                        Some(p) => placement_status_from_proto(&id, p)?,
                        None => None,
                    },
                    revisions: st
                        .revisions
                        .into_iter()
                        .enumerate()
                        .map(|(i, r)| revision_from_proto(&id, i, r))
                        .collect::<Result<_, _>>()?,
                    pinned_revision: (st.pinned_revision != 0).then_some(st.pinned_revision),
                })
            }
        };
        Ok(Repository {
            metadata,
            spec: RepositorySpec {
                repository: s.repository,
                tag: opt(s.tag),
                tags: s.tags,
                tag_pattern: s.tag_pattern.map(|p| TagPattern {
                    pattern: p.pattern,
                    keep_latest: opt_u32(p.keep_latest),
                }),
                digest: opt(s.digest),
                platforms: s.platforms,
                registry_ref: RegistryRef {
                    name: r.name,
                    namespace: opt(r.namespace),
                },
                sync_interval: opt(s.sync_interval),
                placement,
                retention: s.retention.map(|r| Retention {
                    keep_versions: opt_u32(r.keep_versions),
                    grace_period: opt(r.grace_period),
                }),
                suspend: s.suspend,
                scan: match s.scan {
                    None => None,
                    Some(c) => Some(Scan {
                        adapter: c.adapter,
                        block_severity: match c.block_severity.as_str() {
                            "" => None,
                            "Critical" => Some(BlockSeverity::Critical),
                            "High" => Some(BlockSeverity::High),
                            "Medium" => Some(BlockSeverity::Medium),
                            "Low" => Some(BlockSeverity::Low),
                            "None" => Some(BlockSeverity::None),
                            other => {
                                return Err(err(
                                    &id,
                                    "spec.scan.blockSeverity",
                                    format!(
                                        "{other:?}: expected Critical, High, Medium, Low or None"
                                    ),
                                ));
                            }
                        },
                    }),
                },
                verify: match s.verify {
                    None => None,
                    Some(v) => Some(Verify {
                        keys: v
                            .keys
                            .into_iter()
                            .map(|k| VerifyKey {
                                name: k.name,
                                public_key: k.public_key,
                            })
                            .collect(),
                        mode: match enum_field::<pb::VerifyMode>(&id, "spec.verify.mode", v.mode)? {
                            pb::VerifyMode::Unspecified => None,
                            pb::VerifyMode::Enforce => Some(VerifyMode::Enforce),
                            pb::VerifyMode::Warn => Some(VerifyMode::Warn),
                        },
                    }),
                },
            },
            status,
        })
    }
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// One repository of a Cluster's `status.held` on the wire.
pub fn held_to_proto(h: &HeldRepository) -> pb::HeldRepository {
    pb::HeldRepository {
        registry: h.registry.clone(),
        repository: h.repository.clone(),
        digests: h.digests.clone(),
    }
}

/// One repository of a Cluster's `status.held` from the wire. Nothing to
/// check: the hub wrote it from an agent's inventory, and readers only compare it.
pub fn held_from_proto(h: pb::HeldRepository) -> HeldRepository {
    HeldRepository {
        registry: h.registry,
        repository: h.repository,
        digests: h.digests,
    }
}

impl From<&Cluster> for pb::Cluster {
    fn from(o: &Cluster) -> Self {
        pb::Cluster {
            metadata: Some(meta_to_proto(&o.metadata)),
            spec: Some(pb::ClusterSpec {
                tenants: o.spec.tenants.clone(),
                description: o.spec.description.clone().unwrap_or_default(),
            }),
            status: o.status.as_ref().map(|st| pb::ClusterStatus {
                phase: match st.phase {
                    None => pb::ClusterPhase::Unspecified,
                    Some(ClusterPhase::Connected) => pb::ClusterPhase::Connected,
                    Some(ClusterPhase::Offline) => pb::ClusterPhase::Offline,
                } as i32,
                last_seen: st.last_seen.as_ref().map(time_to_proto),
                agent_version: st.agent_version.clone().unwrap_or_default(),
                storage_used_bytes: st.storage_used_bytes,
                storage_capacity_bytes: st.storage_capacity_bytes,
                desired_generation: st.desired_generation,
                applied_generation: st.applied_generation,
                hub_replica: st.hub_replica.clone().unwrap_or_default(),
                images_desired: st.images_desired,
                images_synced: st.images_synced,
                held: st.held.iter().map(held_to_proto).collect(),
                held_truncated: st.held_truncated,
            }),
        }
    }
}

impl TryFrom<pb::Cluster> for Cluster {
    type Error = ConvertError;
    fn try_from(o: pb::Cluster) -> Result<Self, Self::Error> {
        let (id, metadata) = meta_from_proto(Kind::Cluster, o.metadata)?;
        // A Cluster's spec is all optional, so a missing one is an empty one.
        let s = o.spec.unwrap_or_default();
        let status = match o.status {
            None => None,
            Some(st) => Some(ClusterStatus {
                phase: match enum_field::<pb::ClusterPhase>(&id, "status.phase", st.phase)? {
                    pb::ClusterPhase::Unspecified => None,
                    pb::ClusterPhase::Connected => Some(ClusterPhase::Connected),
                    pb::ClusterPhase::Offline => Some(ClusterPhase::Offline),
                },
                last_seen: time_field(&id, "status.lastSeen", st.last_seen)?,
                agent_version: opt(st.agent_version),
                storage_used_bytes: st.storage_used_bytes,
                storage_capacity_bytes: st.storage_capacity_bytes,
                desired_generation: st.desired_generation,
                applied_generation: st.applied_generation,
                hub_replica: opt(st.hub_replica),
                images_desired: st.images_desired,
                images_synced: st.images_synced,
                held: st.held.into_iter().map(held_from_proto).collect(),
                held_truncated: st.held_truncated,
            }),
        };
        Ok(Cluster {
            metadata,
            spec: ClusterSpec {
                tenants: s.tenants,
                description: opt(s.description),
            },
            status,
        })
    }
}

fn resolved_tag_to_proto(r: &ResolvedTag) -> pb::ResolvedTag {
    pb::ResolvedTag {
        tag: r.tag.clone(),
        digest: r.digest.clone(),
        media_type: r.media_type.clone(),
        scan: r.scan.clone().unwrap_or_default(),
        verification: r.verification.clone().unwrap_or_default(),
    }
}

fn resolved_tag_from_proto(r: pb::ResolvedTag) -> ResolvedTag {
    ResolvedTag {
        tag: r.tag,
        digest: r.digest,
        media_type: r.media_type,
        scan: opt(r.scan),
        verification: opt(r.verification),
    }
}

/// A Repository's revision on the wire.
pub fn revision_to_proto(r: &Revision) -> pb::Revision {
    pb::Revision {
        revision: r.revision,
        resolved: r.resolved.iter().map(resolved_tag_to_proto).collect(),
        first_resolved: r.first_resolved.as_ref().map(time_to_proto),
        cause: match r.cause {
            RevisionCause::Created => pb::RevisionCause::Created,
            RevisionCause::TagMove => pb::RevisionCause::TagMove,
            RevisionCause::Edit => pb::RevisionCause::Edit,
            RevisionCause::Rollback => pb::RevisionCause::Rollback,
        } as i32,
        user: r.user.clone().unwrap_or_default(),
        generation: r.generation,
        rollback_to: r.rollback_to.unwrap_or_default(),
        held_back: r.held_back,
    }
}

/// A revision from the wire; `i` is its place in `status.revisions`.
pub fn revision_from_proto(id: &str, i: usize, r: pb::Revision) -> Result<Revision, ConvertError> {
    let field = format!("status.revisions[{i}]");
    Ok(Revision {
        revision: r.revision,
        resolved: r
            .resolved
            .into_iter()
            .map(resolved_tag_from_proto)
            .collect(),
        first_resolved: time_field(id, &format!("{field}.firstResolved"), r.first_resolved)?,
        cause: match enum_field::<pb::RevisionCause>(id, &format!("{field}.cause"), r.cause)? {
            pb::RevisionCause::Created => RevisionCause::Created,
            pb::RevisionCause::TagMove => RevisionCause::TagMove,
            pb::RevisionCause::Edit => RevisionCause::Edit,
            pb::RevisionCause::Rollback => RevisionCause::Rollback,
        },
        user: opt(r.user),
        generation: r.generation,
        rollback_to: (r.rollback_to != 0).then_some(r.rollback_to),
        held_back: r.held_back,
    })
}
