//! The resource model: RegistrySecret, Repository and Cluster as plain Rust types.
//!
//! The same types serve YAML and JSON (serde, camelCase field names), the
//! Kubernetes CRDs in `deploy/crds/` (kube's `CustomResource` derive), and the
//! conversions to the wire contract in [`crate::convert`].
//!
//! - [`parse_documents`] reads multi-document YAML strictly: unknown fields
//!   (with a "did you mean" hint), wrong types, missing required fields and every
//!   semantic rule are reported, all of them, each naming the object and field.
//! - [`Object::validate`] runs the semantic rules on an object that is already
//!   typed, e.g. one that arrived over gRPC.

// kube's `printcolumn(..)` attributes repeat keys such as `type_ = "string"`,
// which clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

mod duration;
mod parse;
mod sync;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use duration::{DurationError, format_duration, parse_duration};
pub use parse::{Checked, check_documents, parse_documents};
pub use sync::{Holding, clusters_holding, holds_all, wanted_digests};

/// The API group of every imgfleet kind.
pub const GROUP: &str = "image.theriseunion.io";
/// The API version of every imgfleet kind.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in YAML.
pub const API_VERSION: &str = "image.theriseunion.io/v1alpha1";
/// The namespace a namespaced object without one is put in.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The sync interval of a Repository that does not set one.
pub const DEFAULT_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);
/// The shortest sync interval accepted; shorter ones would hammer registries.
pub const MIN_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

// ---------------------------------------------------------------------------
// RegistrySecret
// ---------------------------------------------------------------------------

/// The kind of upstream registry, which selects its authentication quirks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Harbor.
    Harbor,
    /// Docker Hub.
    Dockerhub,
    /// Alibaba Cloud Container Registry.
    Aliyun,
    /// Any registry speaking the OCI distribution API.
    #[default]
    Generic,
}

impl Provider {
    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Harbor => "harbor",
            Provider::Dockerhub => "dockerhub",
            Provider::Aliyun => "aliyun",
            Provider::Generic => "generic",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Credentials and endpoint of an upstream registry.
#[derive(CustomResource, Serialize, Deserialize, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "image.theriseunion.io",
    version = "v1alpha1",
    kind = "RegistrySecret",
    doc = "Credentials and endpoint of an upstream registry (imgfleet).",
    plural = "registrysecrets",
    namespaced,
    status = "RegistrySecretStatus",
    shortname = "rs",
    derive = "PartialEq",
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySecretSpec {
    /// Host and optional port of the registry, e.g. `harbor.example.com` or `127.0.0.1:5000`.
    pub domain: String,
    /// User name; leave out together with password for anonymous pulls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password or token. Write-only: never returned by the hub, never printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The kind of registry: harbor, dockerhub, aliyun or generic (the default).
    #[serde(default)]
    pub provider: Provider,
    /// Reach the registry over plain HTTP (lab registries only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure: bool,
}

// The password must never reach a log line or an error message, and those are
// usually built with `{:?}`; so Debug is written by hand.
impl fmt::Debug for RegistrySecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrySecretSpec")
            .field("domain", &self.domain)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| Redacted))
            .field("provider", &self.provider)
            .field("insecure", &self.insecure)
            .finish()
    }
}

struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Health of the connection from the hub to a registry.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConnectionPhase {
    /// The registry answered and accepted the credentials.
    Connected,
    /// The registry answered but refused the credentials.
    AuthFailed,
    /// The registry could not be reached.
    Unreachable,
    /// The stored password cannot be opened with the hub's keys (a key missing
    /// from the keyring, or a damaged value). Images already placed stay placed.
    CredentialUnusable,
}

/// Observed health of an upstream registry.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySecretStatus {
    /// Result of the last check; absent before the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ConnectionPhase>,
    /// When the last check ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<Time>,
    /// Round-trip time of the last check, in milliseconds.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub latency_ms: u32,
    /// Detail of the last check (never contains a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

// ---------------------------------------------------------------------------
// Repository
// ---------------------------------------------------------------------------

/// An image repository and the tags of it to keep in clusters.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "image.theriseunion.io",
    version = "v1alpha1",
    kind = "Repository",
    doc = "An image repository and the tags of it to keep in edge clusters (imgfleet).",
    plural = "repositories",
    namespaced,
    status = "RepositoryStatus",
    shortname = "repo",
    derive = "PartialEq",
    printcolumn(name = "Repository", type_ = "string", json_path = ".spec.repository"),
    printcolumn(name = "Tag", type_ = "string", json_path = ".spec.tag"),
    printcolumn(
        name = "Synced",
        type_ = "integer",
        json_path = ".status.syncedClusters"
    ),
    printcolumn(
        name = "Targets",
        type_ = "integer",
        json_path = ".status.targetClusters"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RepositorySpec {
    /// Path of the image inside the registry, e.g. `library/nginx`.
    pub repository: String,
    /// A single tag to keep. One of tag, tags, tagPattern or digest is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Several tags to keep.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Keep the newest tags that match a pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_pattern: Option<TagPattern>,
    /// Pin to this manifest digest (`sha256:` and 64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Platforms to keep from a multi-platform index (`os/arch[/variant]`). Empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// The RegistrySecret with the registry's endpoint and credentials, in this namespace.
    pub registry_ref: RegistryRef,
    /// How often tags are re-resolved, e.g. `30m`, `1h`, `24h`. Default 1h, minimum 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_interval: Option<String>,
    /// Which clusters receive the image. Unset (as in the seed's YAML) means every
    /// cluster whose tenants include this Repository's namespace: tenant isolation is
    /// the guard. Set, only the clusters it selects or names, and of those only the
    /// ones that admit the namespace; an empty selector selects nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// How long versions no longer desired are kept on clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Stop resolving and syncing; content already synced stays.
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspend: bool,
    /// Cosign signatures an image must carry before it ships: checked by the
    /// hub when it resolves a digest, and by each agent before the image
    /// becomes visible. Unset: no check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    /// A vulnerability scan each newly resolved digest must pass before it
    /// ships (Harbor's pluggable scanner adapter API). Unset: no scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<Scan>,
}

/// Scanner gate: each newly resolved digest is scanned by the adapter, and
/// held back when a finding is at or above `blockSeverity`, or when the
/// scanner cannot answer. Digests already shipped are never rescanned.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scan {
    /// The adapter's base URL, e.g. `https://scanner.example:8080`.
    pub adapter: String,
    /// The lowest severity that holds a digest back (default `Critical`);
    /// `None` scans without blocking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_severity: Option<BlockSeverity>,
}

/// The lowest finding severity that blocks a digest.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BlockSeverity {
    /// Critical findings block.
    Critical,
    /// High and above block.
    High,
    /// Medium and above block.
    Medium,
    /// Low and above block.
    Low,
    /// Nothing blocks; the scan is only reported.
    None,
}

impl Scan {
    /// The threshold, with its default.
    pub fn block_severity(&self) -> BlockSeverity {
        self.block_severity.unwrap_or(BlockSeverity::Critical)
    }
}

impl Repository {
    /// `(namespace, name)` of the RegistrySecret it uses: `spec.registryRef`,
    /// whose namespace defaults to the Repository's own.
    pub fn registry_secret(&self) -> (&str, &str) {
        let own = self
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE);
        let ns = self
            .spec
            .registry_ref
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(own);
        (ns, &self.spec.registry_ref.name)
    }
}

impl RepositorySpec {
    /// The sync interval as a duration: the default when unset or unparsable
    /// (validation refuses the latter, so it only happens to unvalidated objects).
    pub fn sync_interval_duration(&self) -> std::time::Duration {
        self.sync_interval
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
            .unwrap_or(DEFAULT_SYNC_INTERVAL)
    }

    /// The grace period of the retention policy, when one is set and valid.
    pub fn grace_period_duration(&self) -> Option<std::time::Duration> {
        self.retention
            .as_ref()
            .and_then(|r| r.grace_period.as_deref())
            .and_then(|s| parse_duration(s).ok())
    }
}

/// Signature policy: an image is accepted when one cosign signature that
/// verifies under one of `keys` covers its manifest digest. Keyless
/// verification (certificate identities) would be a sibling of `keys`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verify {
    /// Public keys (ECDSA P-256, PEM), any one of which may sign.
    #[serde(default)]
    pub keys: Vec<VerifyKey>,
    /// `Enforce` (the default): an image without a valid signature never
    /// ships, and the status says VerificationFailed. `Warn`: it ships, and
    /// the failure is logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<VerifyMode>,
}

impl RepositorySpec {
    /// The keys one of which must have signed an image before it ships: the
    /// policy's keys under `enforce`, none without a policy or under `warn`
    /// (which only the hub checks, to log).
    pub fn enforced_keys(&self) -> &[VerifyKey] {
        match &self.verify {
            Some(v) if v.mode() == VerifyMode::Enforce => &v.keys,
            _ => &[],
        }
    }
}

impl Verify {
    /// The mode, with its default.
    pub fn mode(&self) -> VerifyMode {
        self.mode.unwrap_or(VerifyMode::Enforce)
    }
}

/// One public key of a signature policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyKey {
    /// The key's name, shown when verification fails (a DNS label).
    pub name: String,
    /// The public key, PEM (`-----BEGIN PUBLIC KEY-----`), as `cosign.pub`.
    pub public_key: String,
}

/// What a failed verification does (`enforce` or `warn`, as the policy
/// YAML writes them).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// The image never ships.
    Enforce,
    /// The image ships; the failure is logged.
    Warn,
}

/// A reference to a RegistrySecret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryRef {
    /// Name of the RegistrySecret.
    pub name: String,
    /// Its namespace; must be the Repository's own (the default when left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A tag pattern with keep-latest-N.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TagPattern {
    /// Regular expression a tag must match in full, e.g. `^v1\.[0-9]+\.[0-9]+$`.
    pub pattern: String,
    /// How many matching tags to keep, newest first by semantic version. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_latest: Option<u32>,
}

/// Which clusters an object targets: those matching the selector and those named.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Clusters whose labels match this selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_selector: Option<LabelSelector>,
    /// Clusters named explicitly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
}

/// A Kubernetes-style label selector; all conditions must hold.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One set-based label condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// The label key.
    pub key: String,
    /// How the key's value is compared.
    pub operator: SelectorOperator,
    /// The values, for In and NotIn only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// The operator of a set-based label condition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// Whether a set of labels satisfies every condition of the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator {
                    SelectorOperator::In => value.is_some_and(|v| e.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// Lifecycle of synced versions on a cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// How many versions a cluster keeps for rollback, the desired one included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_versions: Option<u32>,
    /// How long content no longer desired stays before garbage collection, e.g. `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<String>,
}

/// Why tag resolution failed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ResolveReason {
    /// The registry refused the credentials.
    AuthFailed,
    /// The repository or tag does not exist.
    NotFound,
    /// The registry could not be reached.
    Unreachable,
    /// The registry answered 429.
    RateLimited,
    /// The resolved digest carries no valid cosign signature under the
    /// policy's keys (`spec.verify`); the message names the key and the reason.
    VerificationFailed,
    /// The scanner found a vulnerability at or above `spec.scan.blockSeverity`;
    /// the message holds the report summary.
    ScanBlocked,
    /// The scanner could not scan a new digest; it is held back until it can.
    ScannerUnavailable,
}

/// One tag resolved to a digest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedTag {
    /// The tag (empty for a digest-only Repository).
    #[serde(default)]
    pub tag: String,
    /// The manifest or index digest it pointed to.
    pub digest: String,
    /// Media type of that manifest or index.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// The scanner gate's report summary for the digest (`spec.scan`), e.g.
    /// `High: 2, Low: 1` or `no findings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<String>,
    /// The signature check of `spec.verify` for the digest: `verified (key
    /// release)`, or, under `mode: warn`, why it failed (it shipped anyway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<String>,
}

/// Phase of one image on one cluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePhase {
    /// Desired but not started.
    Pending,
    /// Transfer in progress.
    Syncing,
    /// Complete, verified and servable from the cluster's mirror.
    Synced,
    /// The last attempt failed.
    Failed,
    /// The cluster is offline; the state shown is its last report.
    Offline,
}

/// The state of one image of one Repository on one cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterImageStatus {
    /// The cluster's name.
    pub cluster: String,
    /// The digest being synced.
    #[serde(default)]
    pub digest: String,
    /// The phase; absent when not reported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ImagePhase>,
    /// Bytes transferred or already present.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub bytes_done: u64,
    /// Bytes in total, when known.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub bytes_total: u64,
    /// Layers complete.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub layers_done: u32,
    /// Layers in total, when known.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub layers_total: u32,
    /// When the image last became Synced there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Detail, such as the last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When a failed image will be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_time: Option<Time>,
    /// True when the cluster is offline and this is its last known state.
    #[serde(default, skip_serializing_if = "is_false")]
    pub last_known: bool,
    /// Digests of this Repository the cluster reported as servable (Synced). While
    /// `digest` is not among them, these are the versions its mirror still serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_digests: Vec<String>,
}

/// Why a Repository reaches no cluster, or what keeps clusters from pulling it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PlacementReason {
    /// No enrolled cluster lists the Repository's namespace in its tenants.
    NoClusterAdmitsNamespace,
    /// The placement selects or names no cluster that admits the namespace.
    NoClusterMatches,
    /// `spec.registryRef` names a RegistrySecret that does not exist.
    SecretNotFound,
    /// `spec.registryRef` points into another namespace.
    SecretInOtherNamespace,
    /// The RegistrySecret's password cannot be opened with the hub's keys.
    CredentialUnusable,
    /// `spec.suspend` is true.
    Suspended,
    /// No tag is resolved to a digest yet.
    NotResolved,
    /// A cluster named in the placement does not admit the namespace.
    TenantNotAllowed,
}

/// What the hub's desired-set controller found when it placed a Repository.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// The first reason that applies.
    pub reason: PlacementReason,
    /// Detail for people, naming the object or cluster at fault.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What the hub and the agents observed about a Repository.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryStatus {
    /// The tags resolved to digests, in the order they are kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved: Vec<ResolvedTag>,
    /// When tags were last resolved successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resolve_time: Option<Time>,
    /// Why the last resolution failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ResolveReason>,
    /// Detail of the last resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// True when the last resolution failed and `resolved` is the last good result.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stale: bool,
    /// For RateLimited: when the next attempt is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Time>,
    /// Per-cluster state, one entry per cluster and digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterImageStatus>,
    /// Number of targeted clusters that reported, as servable, every digest in
    /// `resolved`: a cluster still holding an older digest does not count.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub synced_clusters: u32,
    /// Number of clusters targeted.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub target_clusters: u32,
    /// The spec generation the status describes.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub observed_generation: i64,
    /// Set when the Repository reaches no cluster, or something keeps clusters
    /// from pulling it. Computed by the hub when the object is read; never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
    /// Every distinct set of digests the Repository resolved to, and every
    /// rollback, oldest first; the newest [`REVISION_HISTORY_LIMIT`] are kept.
    /// `imgfleet rollout history` lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<Revision>,
    /// Set by `imgfleet rollout undo`: the revision that ships, whatever the
    /// upstream tags say. Tag moves are still recorded as revisions, held
    /// back, until `imgfleet rollout resume` clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_revision: Option<u32>,
}

/// How many revisions a Repository keeps (the pinned one is never dropped).
pub const REVISION_HISTORY_LIMIT: usize = 10;

/// One version of what a Repository ships: the tags and digests it
/// resolved to, when, and why it changed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// Numbered from 1; each new revision takes the next number.
    pub revision: u32,
    /// The tags and the digests they pointed to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved: Vec<ResolvedTag>,
    /// When this revision was recorded: when its digests were first resolved,
    /// or when the rollback was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_resolved: Option<Time>,
    /// Why the Repository changed.
    pub cause: RevisionCause,
    /// Who changed it: for an edit, the user whose apply changed the spec
    /// (from the audit trail); for a rollback, who ran it. None for a tag
    /// moved upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The spec generation it was resolved for.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub generation: i64,
    /// For a rollback: the revision whose digests it restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<u32>,
    /// Resolved while the Repository was pinned: recorded, not shipped.
    #[serde(default, skip_serializing_if = "is_false")]
    pub held_back: bool,
}

/// Why a Repository has a new revision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RevisionCause {
    /// The first resolution (or the first after an upgrade that added history).
    #[default]
    Created,
    /// A tag moved upstream; the spec did not change.
    TagMove,
    /// An apply changed the spec.
    Edit,
    /// `imgfleet rollout undo` restored an earlier revision's digests.
    Rollback,
}

impl RevisionCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RevisionCause::Created => "Created",
            RevisionCause::TagMove => "TagMove",
            RevisionCause::Edit => "Edit",
            RevisionCause::Rollback => "Rollback",
        }
    }
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// Policy for one enrolled edge cluster. Its `metadata.labels` are what placements select on.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "image.theriseunion.io",
    version = "v1alpha1",
    kind = "Cluster",
    doc = "An enrolled edge cluster: labels, tenants and agent status (imgfleet).",
    plural = "clusters",
    status = "ClusterStatus",
    derive = "PartialEq",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Last-Seen", type_ = "date", json_path = ".status.lastSeen"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Namespaces (tenants) whose Repositories may target this cluster. Empty means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    /// Free-form description for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Whether a cluster's agent is connected.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ClusterPhase {
    /// A session is live.
    Connected,
    /// Heartbeats stopped; the status shown is the last one known.
    Offline,
}

/// What the hub observed of a cluster's agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// Connected or Offline; absent when the agent never connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClusterPhase>,
    /// Last time anything was heard from the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// Version string the agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Bytes used by the agent's content store.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub storage_used_bytes: u64,
    /// Capacity of the filesystem holding the content store.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub storage_capacity_bytes: u64,
    /// Generation of the desired set the hub computed most recently.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub desired_generation: u64,
    /// Generation of the desired set the agent last acknowledged.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub applied_generation: u64,
    /// Which hub replica holds the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_replica: Option<String>,
    /// Number of images desired on the cluster.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub images_desired: u32,
    /// Number of desired images Synced on the cluster.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub images_synced: u32,
    /// The images the agent's store holds (complete and servable), desired or
    /// kept by retention, per upstream repository: what `rollout history`
    /// shows as the clusters still holding a revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldRepository>,
    /// True when the agent held more than MAX_HELD digests and `held` lists only some.
    #[serde(default, skip_serializing_if = "is_false")]
    pub held_truncated: bool,
}

/// At most this many digests in a Cluster's `status.held`, over all its
/// repositories: 2000 digests of ~71 bytes plus the names keep a Cluster
/// object far under etcd's 1.5 MiB request limit.
pub const MAX_HELD: usize = 2000;

/// The image digests an agent's store holds of one upstream repository.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldRepository {
    /// Registry host and optional port, e.g. `harbor.example.com`.
    pub registry: String,
    /// Repository path inside the registry, e.g. `library/nginx`.
    pub repository: String,
    /// Image (root manifest or index) digests, sorted, without duplicates.
    pub digests: Vec<String>,
}

impl ClusterStatus {
    /// Whether the agent reported `digest` of (`registry`, `repository`) in
    /// its store. False when the inventory was truncated before it: a caller
    /// that must tell "not held" from "not listed" checks `held_truncated`.
    pub fn holds(&self, registry: &str, repository: &str, digest: &str) -> bool {
        self.held.iter().any(|h| {
            h.registry == registry
                && h.repository == repository
                && h.digests.iter().any(|d| d == digest)
        })
    }
}

// ---------------------------------------------------------------------------
// RoleBinding, ClusterRoleBinding
// ---------------------------------------------------------------------------

/// Whom a binding gives its role: a user (a client certificate's CN) or a
/// group (one of its O values).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Subject {
    /// `User` or `Group`.
    pub kind: String,
    /// The user's or group's name.
    pub name: String,
}

/// Gives users and groups a role in the binding's namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "image.theriseunion.io",
    version = "v1alpha1",
    kind = "RoleBinding",
    doc = "Gives users and groups a role (viewer, editor, admin) in one namespace (imgfleet).",
    plural = "rolebindings",
    namespaced,
    shortname = "rb",
    derive = "PartialEq",
    printcolumn(name = "Role", type_ = "string", json_path = ".spec.role"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RoleBindingSpec {
    /// The role given: viewer, editor or admin.
    pub role: String,
    /// The users and groups it is given to.
    pub subjects: Vec<Subject>,
}

/// Gives users and groups a fleet-wide role.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "image.theriseunion.io",
    version = "v1alpha1",
    kind = "ClusterRoleBinding",
    doc = "Gives users and groups a fleet-wide role (cluster-viewer, cluster-admin) (imgfleet).",
    plural = "clusterrolebindings",
    shortname = "crb",
    derive = "PartialEq",
    printcolumn(name = "Role", type_ = "string", json_path = ".spec.role"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRoleBindingSpec {
    /// The role given: cluster-viewer or cluster-admin.
    pub role: String,
    /// The users and groups it is given to.
    pub subjects: Vec<Subject>,
}

/// The built-in roles, a ladder: each holds the rights of those below it in
/// its scope, and the fleet-wide ones hold the namespace ones everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read RegistrySecrets, Repositories and their status in a namespace.
    Viewer,
    /// Viewer, plus apply, delete and roll back in a namespace.
    Editor,
    /// Editor, plus the namespace's RoleBindings and audit events.
    Admin,
    /// Read everything, including Clusters and the audit trail.
    ClusterViewer,
    /// Everything.
    ClusterAdmin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Editor,
        Role::Admin,
        Role::ClusterViewer,
        Role::ClusterAdmin,
    ];

    /// The name as written in a binding.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
            Role::ClusterViewer => "cluster-viewer",
            Role::ClusterAdmin => "cluster-admin",
        }
    }

    /// The role of a name, if it is one.
    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Whether the role is fleet-wide (for ClusterRoleBindings).
    pub fn fleet_wide(self) -> bool {
        matches!(self, Role::ClusterViewer | Role::ClusterAdmin)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Kind, Object, ValidationError
// ---------------------------------------------------------------------------

/// One of the kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// RegistrySecret (namespaced).
    RegistrySecret,
    /// Repository (namespaced).
    Repository,
    /// Cluster (cluster-scoped).
    Cluster,
    /// RoleBinding (namespaced).
    RoleBinding,
    /// ClusterRoleBinding (cluster-scoped).
    ClusterRoleBinding,
}

/// A kind name that is none of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown kind {0:?}: expected one of registrysecret (rs), repository (repo), cluster, rolebinding (rb), clusterrolebinding (crb)"
)]
pub struct UnknownKind(pub String);

impl Kind {
    /// All kinds, in dependency order (a Repository refers to a RegistrySecret).
    pub const ALL: [Kind; 5] = [
        Kind::RegistrySecret,
        Kind::Repository,
        Kind::Cluster,
        Kind::RoleBinding,
        Kind::ClusterRoleBinding,
    ];

    /// Parses a kind as typed on a command line: singular, plural or short
    /// form, any case (`rs`, `Repositories`, `cluster`).
    pub fn parse(text: &str) -> Result<Kind, UnknownKind> {
        match text.to_ascii_lowercase().as_str() {
            "registrysecret" | "registrysecrets" | "rs" => Ok(Kind::RegistrySecret),
            "repository" | "repositories" | "repo" | "repos" => Ok(Kind::Repository),
            "cluster" | "clusters" => Ok(Kind::Cluster),
            "rolebinding" | "rolebindings" | "rb" => Ok(Kind::RoleBinding),
            "clusterrolebinding" | "clusterrolebindings" | "crb" => Ok(Kind::ClusterRoleBinding),
            _ => Err(UnknownKind(text.to_owned())),
        }
    }

    /// The `kind` field as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RegistrySecret => "RegistrySecret",
            Kind::Repository => "Repository",
            Kind::Cluster => "Cluster",
            Kind::RoleBinding => "RoleBinding",
            Kind::ClusterRoleBinding => "ClusterRoleBinding",
        }
    }

    /// The lowercase plural, as in the CRD names.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::RegistrySecret => "registrysecrets",
            Kind::Repository => "repositories",
            Kind::Cluster => "clusters",
            Kind::RoleBinding => "rolebindings",
            Kind::ClusterRoleBinding => "clusterrolebindings",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Cluster | Kind::ClusterRoleBinding)
    }

    /// The kind from the exact `kind` field of a document.
    pub fn from_kind_field(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::parse(s)
    }
}

/// Any one object. Serializes as the object itself (with apiVersion and kind);
/// deserializes by its `kind` field (lenient: no unknown-field checks, for
/// stored objects; user input goes through [`parse_documents`]).
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    /// A RegistrySecret.
    RegistrySecret(RegistrySecret),
    /// A Repository.
    Repository(Repository),
    /// A Cluster.
    Cluster(Cluster),
    /// A RoleBinding.
    RoleBinding(RoleBinding),
    /// A ClusterRoleBinding.
    ClusterRoleBinding(ClusterRoleBinding),
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // Dispatch on `kind` rather than trying each variant: the variants'
        // shapes overlap (a Cluster's spec is all optional), so guessing could
        // type an object as the wrong kind.
        let value = serde_json::Value::deserialize(deserializer)?;
        let kind = value
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                D::Error::custom(
                    "kind: missing; expected RegistrySecret, Repository, Cluster, RoleBinding or ClusterRoleBinding",
                )
            })?;
        match Kind::from_kind_field(kind) {
            Some(Kind::RegistrySecret) => serde_json::from_value(value).map(Object::RegistrySecret),
            Some(Kind::Repository) => serde_json::from_value(value).map(Object::Repository),
            Some(Kind::Cluster) => serde_json::from_value(value).map(Object::Cluster),
            Some(Kind::RoleBinding) => serde_json::from_value(value).map(Object::RoleBinding),
            Some(Kind::ClusterRoleBinding) => {
                serde_json::from_value(value).map(Object::ClusterRoleBinding)
            }
            None => {
                return Err(D::Error::custom(format!(
                    "kind {kind:?}: expected RegistrySecret, Repository, Cluster, RoleBinding or ClusterRoleBinding"
                )));
            }
        }
        .map_err(D::Error::custom)
    }
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::RegistrySecret(_) => Kind::RegistrySecret,
            Object::Repository(_) => Kind::Repository,
            Object::Cluster(_) => Kind::Cluster,
            Object::RoleBinding(_) => Kind::RoleBinding,
            Object::ClusterRoleBinding(_) => Kind::ClusterRoleBinding,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::RegistrySecret(o) => &o.metadata,
            Object::Repository(o) => &o.metadata,
            Object::Cluster(o) => &o.metadata,
            Object::RoleBinding(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
        }
    }

    /// The object's metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::RegistrySecret(o) => &mut o.metadata,
            Object::Repository(o) => &mut o.metadata,
            Object::Cluster(o) => &mut o.metadata,
            Object::RoleBinding(o) => &mut o.metadata,
            Object::ClusterRoleBinding(o) => &mut o.metadata,
        }
    }

    /// The namespace; `None` for a Cluster. A parsed namespaced object always has one.
    pub fn namespace(&self) -> Option<&str> {
        if self.kind().namespaced() {
            Some(
                self.metadata()
                    .namespace
                    .as_deref()
                    .unwrap_or(DEFAULT_NAMESPACE),
            )
        } else {
            None
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }

    /// How messages name the object: `Repository default/nginx`, `Cluster edge-1`.
    pub fn id(&self) -> String {
        object_id(self.kind(), self.namespace(), self.name())
    }

    /// Runs every semantic rule (names, domains, repositories, durations,
    /// selectors, combinations of fields) and returns all violations.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let errors = validate::validate_object(self);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// A copy with secrets removed, for output (`get -o yaml`, API responses).
    pub fn redacted(&self) -> Object {
        let mut copy = self.clone();
        if let Object::RegistrySecret(rs) = &mut copy {
            rs.spec.password = None;
        }
        copy
    }
}

/// How messages name an object: `Repository default/nginx`, `Cluster edge-1`.
pub fn object_id(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    let name = if name.is_empty() { "<unnamed>" } else { name };
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// One violation: which object, which field, and what was expected.
///
/// Displays as `Repository default/nginx: spec.syncInterval "1x": expected a
/// duration like 30m, 1h or 24h`: `message` starts with the offending value
/// when there is one, so it follows the field after a space, otherwise after `: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The object (`Repository default/nginx`), or `document 2` when it cannot be named.
    pub object: String,
    /// Dotted path of the field (`spec.registryRef.name`); empty for the whole document.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl ValidationError {
    /// A violation of `field` of `object`.
    pub fn new(
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ValidationError {
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.field.is_empty(), self.message.starts_with('"')) {
            (true, _) => write!(f, "{}: {}", self.object, self.message),
            (false, true) => write!(f, "{}: {} {}", self.object, self.field, self.message),
            (false, false) => write!(f, "{}: {}: {}", self.object, self.field, self.message),
        }
    }
}

impl std::error::Error for ValidationError {}
