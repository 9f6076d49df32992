//! Placement: a pure function from repositories, clusters, registry secrets and
//! tag resolutions to the desired image set of every cluster, plus the diff
//! between two desired sets (the delta a session sends its agent).
//!
//! It works on small plain input types of its own, so it does no I/O and does
//! not depend on the shape of the resource model; adapters from the model
//! fill them in. The rules:
//!
//! - A repository **without a placement** (the seed's YAML has none) goes to
//!   every cluster whose tenants include its namespace. Tenant isolation is the
//!   guard: a cluster receives only the namespaces it admits.
//! - A repository with a placement goes to the clusters its label selector
//!   matches, plus the clusters it names explicitly (the union), of those the
//!   ones that admit its namespace.
//! - An **empty selector selects nothing** (unlike Kubernetes, where it selects
//!   everything): a placement written but left unfinished must not ship an
//!   image to the whole fleet. Leave the placement out to target every cluster
//!   that admits the namespace.
//! - `NotIn` matches a cluster without the label, as in Kubernetes.
//! - Tenants: a cluster receives a repository only if the repository's
//!   namespace is one of the cluster's tenants. An explicitly named cluster
//!   that does not allow the namespace is reported; a selector merely matching
//!   another tenant's cluster is not (that is normal in a shared fleet).
//! - A RegistrySecret is usable only from its own namespace: a repository whose
//!   `registryRef` points into another namespace is skipped and reported.
//! - Suspended and not yet resolved repositories produce nothing (reported).
//! - A repository that reaches no cluster is reported with why: no cluster
//!   admits its namespace, or its placement matches none that does.
//!
//! The output is deterministic: it does not depend on the order of the inputs,
//! and every list in it is sorted.
//!
//! Its output types are also the stored form of a desired set (see
//! [`crate::desired`]): one shape for one image from placement to the wire.
//! Their JSON must not change, since the controller compares stored sets by
//! their encoding.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Namespace and name of an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ObjectId {
    pub namespace: String,
    pub name: String,
}

impl ObjectId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ObjectId {
        ObjectId {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `<namespace>/<name>`, the form used as registry key.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    pub values: Vec<String>,
}

impl SelectorRequirement {
    /// Kubernetes semantics: `In` needs the label with one of the values (so an
    /// empty value list matches nothing), `NotIn` matches when the label is
    /// absent or has none of the values, `Exists`/`DoesNotExist` ignore values.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector: all `match_labels` and all `match_expressions` must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<SelectorRequirement>,
}

impl Selector {
    /// True when the selector has no terms at all.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether the selector matches `labels`. An empty selector matches nothing
    /// here; see the module documentation for why.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.is_empty()
            && self
                .match_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| e.matches(labels))
    }
}

/// What placement needs of a Repository.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlacementRepo {
    pub id: ObjectId,
    /// True when the Repository has no `spec.placement`: it goes to every
    /// cluster that admits its namespace, and `selector`/`clusters` are unused.
    pub default_placement: bool,
    /// `spec.placement.clusterSelector`.
    pub selector: Option<Selector>,
    /// `spec.placement.clusters`: cluster names.
    pub clusters: Vec<String>,
    /// `spec.registryRef`; an empty namespace means the repository's own.
    pub registry_ref: ObjectId,
    /// Repository path inside the registry, e.g. `library/nginx`.
    pub repository: String,
    pub suspend: bool,
    /// Platforms to fetch from an index, e.g. `linux/amd64`; empty means all.
    pub platforms: Vec<String>,
    /// How many versions to keep on the cluster; 0 = agent default.
    pub keep_versions: u32,
    /// Grace period before undesired content is collected; 0 = agent default.
    pub grace_period_seconds: u64,
    /// Under `spec.verify.mode: enforce`, the keys the agent checks again
    /// before an image becomes visible; empty otherwise.
    pub verify_keys: Vec<VerifyKey>,
}

impl PlacementRepo {
    /// The RegistrySecret it uses: `registry_ref`, in its own namespace when
    /// that is left empty.
    pub fn secret(&self) -> ObjectId {
        ObjectId::new(
            if self.registry_ref.namespace.is_empty() {
                self.id.namespace.clone()
            } else {
                self.registry_ref.namespace.clone()
            },
            self.registry_ref.name.clone(),
        )
    }
}

/// What placement needs of a Cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlacementCluster {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Namespaces allowed to target this cluster.
    pub tenants: BTreeSet<String>,
}

/// One resolved digest of a repository and the tags pointing at it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedImage {
    pub digest: String,
    pub tags: Vec<String>,
}

/// The tag resolver's result for one repository.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolution {
    pub images: Vec<ResolvedImage>,
}

/// What placement needs of a RegistrySecret (never the credentials).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegistryInfo {
    pub id: ObjectId,
    /// Registry host and optional port.
    pub domain: String,
    pub insecure: bool,
    /// A fingerprint of the credential, so that a rotated password changes
    /// the desired sets that use it (and so reaches the agents).
    pub fingerprint: String,
}

/// One image a cluster must hold, as placement computes it, as the stored
/// desired set keeps it and as the wire's `DesiredImage` carries it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredImage {
    /// `<namespace>/<repository name>@<digest>`.
    pub key: String,
    /// The Repository it comes from.
    pub source_namespace: String,
    pub source_name: String,
    /// `<namespace>/<RegistrySecret name>`.
    pub registry_key: String,
    /// Registry host and optional port.
    pub registry: String,
    pub repository: String,
    pub digest: String,
    /// Sorted, without duplicates.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Sorted, without duplicates; empty means all.
    #[serde(default)]
    pub platforms: Vec<String>,
    #[serde(default)]
    pub keep_versions: u32,
    #[serde(default)]
    pub grace_period_seconds: u64,
    /// W3C `traceparent` of the change that produced this entry, so the
    /// agent's sync joins its trace; empty when traces are not exported
    /// (and then not stored: sets stored before it load unchanged).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_context: String,
    /// Keys the agent checks the image's cosign signature against before it
    /// becomes visible (the Repository's `verify` under `enforce`). Sets
    /// stored before signatures were checked have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_keys: Vec<VerifyKey>,
}

/// One public key of a Repository's signature policy: its name and PEM.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyKey {
    pub name: String,
    pub public_key: String,
}

impl DesiredImage {
    /// The Repository it comes from.
    pub fn source(&self) -> ObjectId {
        ObjectId::new(self.source_namespace.clone(), self.source_name.clone())
    }
}

/// A registry a desired set needs: its key `<namespace>/<name>` and the
/// fingerprint of its credential.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct RegistryRef {
    pub key: String,
    pub fingerprint: String,
}

/// The desired set of one cluster, without its generation. Images are sorted
/// by key and unique by key; registries are sorted and unique by key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DesiredSetContent {
    #[serde(default)]
    pub images: Vec<DesiredImage>,
    #[serde(default)]
    pub registries: Vec<RegistryRef>,
}

impl DesiredSetContent {
    /// Builds a content in canonical form: images sorted and unique by key,
    /// registries sorted and unique by key (the last entry of a key wins).
    pub fn new(images: Vec<DesiredImage>, registries: Vec<RegistryRef>) -> DesiredSetContent {
        let by_key: BTreeMap<String, DesiredImage> =
            images.into_iter().map(|i| (i.key.clone(), i)).collect();
        let registries: BTreeMap<String, RegistryRef> =
            registries.into_iter().map(|r| (r.key.clone(), r)).collect();
        DesiredSetContent {
            images: by_key.into_values().collect(),
            registries: registries.into_values().collect(),
        }
    }
}

/// Why a repository (or one of its explicit cluster names) produced nothing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    Suspended,
    /// No digest yet from the tag resolver.
    NotResolved,
    /// `registryRef` points into another namespace.
    CrossNamespaceSecret {
        secret: ObjectId,
    },
    /// `registryRef` names a RegistrySecret that does not exist.
    SecretNotFound {
        secret: ObjectId,
    },
    /// An explicitly named cluster does not list the repository's namespace as a tenant.
    TenantNotAllowed {
        cluster: String,
    },
    /// No placement, and no cluster lists the repository's namespace as a tenant.
    NoClusterAdmitsNamespace,
    /// The placement selects or names no cluster that admits the namespace.
    NoClusterMatches,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::Suspended => write!(f, "suspended"),
            SkipReason::NotResolved => write!(f, "not resolved"),
            SkipReason::CrossNamespaceSecret { secret } => write!(
                f,
                "registryRef {secret}: a RegistrySecret is usable only from its own namespace"
            ),
            SkipReason::SecretNotFound { secret } => {
                write!(f, "registryRef {secret}: RegistrySecret not found")
            }
            SkipReason::TenantNotAllowed { cluster } => write!(
                f,
                "cluster {cluster} does not allow this namespace (not in its tenants)"
            ),
            SkipReason::NoClusterAdmitsNamespace => write!(
                f,
                "no cluster admits this namespace: add it to a cluster's tenants \
                 (imgfleet cluster enroll NAME --namespace NS, or spec.tenants of a Cluster)"
            ),
            SkipReason::NoClusterMatches => write!(
                f,
                "the placement selects no cluster that admits this namespace \
                 (check the selector, the cluster names and the clusters' tenants)"
            ),
        }
    }
}

/// A repository placement left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Skipped {
    pub repo: ObjectId,
    pub reason: SkipReason,
}

/// The result of [`place`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// Every input cluster, with its (possibly empty) desired set.
    pub clusters: BTreeMap<String, DesiredSetContent>,
    /// Sorted.
    pub skipped: Vec<Skipped>,
}

/// Computes every cluster's desired set. Duplicate input objects (same id or
/// cluster name) are resolved deterministically: the smallest by content wins.
pub fn place(
    repos: &[PlacementRepo],
    clusters: &[PlacementCluster],
    registries: &[RegistryInfo],
    resolutions: &BTreeMap<ObjectId, Resolution>,
) -> Placement {
    let clusters = dedupe_clusters(clusters);
    let registries: BTreeMap<&ObjectId, &RegistryInfo> = {
        let mut sorted: Vec<&RegistryInfo> = registries.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.id, &a.domain, a.insecure, &a.fingerprint).cmp(&(
                &b.id,
                &b.domain,
                b.insecure,
                &b.fingerprint,
            ))
        });
        let mut map = BTreeMap::new();
        for r in sorted {
            map.entry(&r.id).or_insert(r);
        }
        map
    };

    let fingerprints: BTreeMap<String, &str> = registries
        .values()
        .map(|r| (r.id.key(), r.fingerprint.as_str()))
        .collect();

    let mut images: BTreeMap<&str, Vec<DesiredImage>> = clusters
        .keys()
        .map(|name| (name.as_str(), Vec::new()))
        .collect();
    let mut skipped = BTreeSet::new();
    let skip = |skipped: &mut BTreeSet<Skipped>, repo: &PlacementRepo, reason| {
        skipped.insert(Skipped {
            repo: repo.id.clone(),
            reason,
        });
    };

    for repo in dedupe_repos(repos) {
        if repo.suspend {
            skip(&mut skipped, repo, SkipReason::Suspended);
            continue;
        }
        let secret = repo.secret();
        if secret.namespace != repo.id.namespace {
            skip(
                &mut skipped,
                repo,
                SkipReason::CrossNamespaceSecret { secret },
            );
            continue;
        }
        let Some(registry) = registries.get(&secret) else {
            skip(&mut skipped, repo, SkipReason::SecretNotFound { secret });
            continue;
        };
        let resolved = merge_resolution(resolutions.get(&repo.id));
        if resolved.is_empty() {
            skip(&mut skipped, repo, SkipReason::NotResolved);
            continue;
        }

        let named: BTreeSet<&str> = repo.clusters.iter().map(String::as_str).collect();
        let mut reached = 0usize;
        for (name, cluster) in &clusters {
            let by_name = !repo.default_placement && named.contains(name.as_str());
            let by_selector = repo.default_placement
                || repo
                    .selector
                    .as_ref()
                    .is_some_and(|s| s.matches(&cluster.labels));
            if !by_name && !by_selector {
                continue;
            }
            if !cluster.tenants.contains(&repo.id.namespace) {
                if by_name {
                    skip(
                        &mut skipped,
                        repo,
                        SkipReason::TenantNotAllowed {
                            cluster: name.clone(),
                        },
                    );
                }
                continue;
            }
            let Some(list) = images.get_mut(name.as_str()) else {
                continue;
            };
            reached += 1;
            for (digest, tags) in &resolved {
                list.push(DesiredImage {
                    key: format!("{}/{}@{}", repo.id.namespace, repo.id.name, digest),
                    source_namespace: repo.id.namespace.clone(),
                    source_name: repo.id.name.clone(),
                    registry_key: secret.key(),
                    registry: registry.domain.clone(),
                    repository: repo.repository.clone(),
                    digest: digest.to_string(),
                    tags: tags.iter().map(|t| t.to_string()).collect(),
                    platforms: sorted_unique(&repo.platforms),
                    keep_versions: repo.keep_versions,
                    grace_period_seconds: repo.grace_period_seconds,
                    // Stamped by the controller on entries a change adds.
                    trace_context: String::new(),
                    verify_keys: repo.verify_keys.clone(),
                });
            }
        }
        if reached == 0 {
            let reason = if repo.default_placement {
                SkipReason::NoClusterAdmitsNamespace
            } else {
                SkipReason::NoClusterMatches
            };
            skip(&mut skipped, repo, reason);
        }
    }

    let clusters = images
        .into_iter()
        .map(|(name, list)| {
            let registries = list
                .iter()
                .map(|i| RegistryRef {
                    fingerprint: fingerprints
                        .get(i.registry_key.as_str())
                        .map(|f| f.to_string())
                        .unwrap_or_default(),
                    key: i.registry_key.clone(),
                })
                .collect();
            (name.to_string(), DesiredSetContent::new(list, registries))
        })
        .collect();
    Placement {
        clusters,
        skipped: skipped.into_iter().collect(),
    }
}

/// Digest -> tags, merging duplicate digests; empty digests are ignored.
fn merge_resolution(r: Option<&Resolution>) -> BTreeMap<&str, BTreeSet<&str>> {
    let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for img in r.map(|r| r.images.as_slice()).unwrap_or_default() {
        if img.digest.is_empty() {
            continue;
        }
        out.entry(img.digest.as_str())
            .or_default()
            .extend(img.tags.iter().map(String::as_str));
    }
    out
}

fn sorted_unique(v: &[String]) -> Vec<String> {
    v.iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn dedupe_clusters(clusters: &[PlacementCluster]) -> BTreeMap<String, &PlacementCluster> {
    let mut sorted: Vec<&PlacementCluster> = clusters.iter().collect();
    sorted.sort_by(|a, b| (&a.name, &a.labels, &a.tenants).cmp(&(&b.name, &b.labels, &b.tenants)));
    let mut map = BTreeMap::new();
    for c in sorted {
        map.entry(c.name.clone()).or_insert(c);
    }
    map
}

fn dedupe_repos(repos: &[PlacementRepo]) -> Vec<&PlacementRepo> {
    let mut sorted: Vec<&PlacementRepo> = repos.iter().collect();
    // Debug output is a total, content-based tie-breaker for duplicate ids.
    sorted.sort_by_cached_key(|r| (r.id.clone(), format!("{r:?}")));
    sorted.dedup_by(|b, a| a.id == b.id);
    sorted
}

/// Changes that turn one desired set into another.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    /// New or changed images, sorted by key.
    pub upserts: Vec<DesiredImage>,
    /// Keys of images no longer desired, sorted.
    pub removals: Vec<String>,
    /// Registries newly needed, or whose credential changed (another
    /// fingerprint: the agent gets the credential again), sorted by key.
    pub registry_upserts: Vec<RegistryRef>,
    /// Keys of registries no longer needed, sorted.
    pub registry_removals: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.removals.is_empty()
            && self.registry_upserts.is_empty()
            && self.registry_removals.is_empty()
    }
}

/// The changes from `old` to `new` (both in canonical form).
pub fn diff(old: &DesiredSetContent, new: &DesiredSetContent) -> Delta {
    let (upserts, removals) = changes(&old.images, &new.images, |i| &i.key);
    let (registry_upserts, registry_removals) =
        changes(&old.registries, &new.registries, |r| &r.key);
    Delta {
        upserts,
        removals,
        registry_upserts,
        registry_removals,
    }
}

/// The entries of `new` that are new or differ from `old`'s of the same
/// key, and the keys of `old` that `new` lacks; both sorted by key.
fn changes<T: PartialEq + Clone>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> &String,
) -> (Vec<T>, Vec<String>) {
    let old: BTreeMap<&String, &T> = old.iter().map(|e| (key(e), e)).collect();
    let new: BTreeMap<&String, &T> = new.iter().map(|e| (key(e), e)).collect();
    let upserts = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(_, v)| (*v).clone())
        .collect();
    let removals = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    (upserts, removals)
}

/// Applies `delta` to `old`: `apply(old, &diff(old, new)) == new`.
pub fn apply(old: &DesiredSetContent, delta: &Delta) -> DesiredSetContent {
    let mut images: BTreeMap<String, DesiredImage> = old
        .images
        .iter()
        .map(|i| (i.key.clone(), i.clone()))
        .collect();
    for k in &delta.removals {
        images.remove(k);
    }
    for i in &delta.upserts {
        images.insert(i.key.clone(), i.clone());
    }
    let mut registries: BTreeMap<String, RegistryRef> = old
        .registries
        .iter()
        .map(|r| (r.key.clone(), r.clone()))
        .collect();
    for k in &delta.registry_removals {
        registries.remove(k);
    }
    for r in &delta.registry_upserts {
        registries.insert(r.key.clone(), r.clone());
    }
    DesiredSetContent {
        images: images.into_values().collect(),
        registries: registries.into_values().collect(),
    }
}
