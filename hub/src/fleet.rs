//! The desired-set controller: adapts the stored policy (Repositories,
//! Clusters, RegistrySecrets) to [`crate::placement`] inputs, computes every
//! cluster's desired set and stores it (kind "desiredsets") with a
//! generation that grows with every change. Sessions on any replica watch
//! those stored sets, so a change computed once reaches every agent.
//!
//! The pure adapter ([`placement_inputs`], [`desired_sets`]) does no I/O;
//! [`run`] watches the store and writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use imgfleet::model::{self, DEFAULT_NAMESPACE, Kind, Object};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::objects::Objects;
use crate::placement::{
    self, DesiredImageEntry, ObjectId, PlacementCluster, PlacementRepo, RegistryInfo, Resolution,
    ResolvedImage, Selector, SelectorOperator, SelectorRequirement,
};
use crate::store::{Key, PolicyStore, Put, StoreError};

/// Store kind of the per-cluster desired sets (cluster-scoped: empty namespace).
pub const DESIRED_KIND: &str = "desiredsets";
/// Store kind of hub-wide metadata.
pub const META_KIND: &str = "meta";
/// Name of the epoch record in [`META_KIND`].
pub const EPOCH_NAME: &str = "epoch";
/// How many changed desired sets a recompute logs one by one; a change to a
/// whole fleet logs one summary line beyond that.
const LOGGED_CHANGES: usize = 20;
/// How long the controller waits for more changes before recomputing.
pub const DEBOUNCE: Duration = Duration::from_millis(30);

/// One desired image as stored; mirrors [`DesiredImageEntry`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StoredImage {
    pub key: String,
    pub source_namespace: String,
    pub source_name: String,
    pub registry_key: String,
    pub registry: String,
    pub repository: String,
    pub digest: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub platforms: Vec<String>,
    #[serde(default)]
    pub keep_versions: u32,
    #[serde(default)]
    pub grace_period_seconds: u64,
}

impl From<&DesiredImageEntry> for StoredImage {
    fn from(e: &DesiredImageEntry) -> Self {
        StoredImage {
            key: e.key.clone(),
            source_namespace: e.source.namespace.clone(),
            source_name: e.source.name.clone(),
            registry_key: e.registry_key.clone(),
            registry: e.registry.clone(),
            repository: e.repository.clone(),
            digest: e.digest.clone(),
            tags: e.tags.clone(),
            platforms: e.platforms.clone(),
            keep_versions: e.keep_versions,
            grace_period_seconds: e.grace_period_seconds,
        }
    }
}

/// A registry a desired set needs, with a fingerprint of its credential so
/// that a rotated password changes the set (and so reaches the agent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StoredRegistry {
    pub key: String,
    pub fingerprint: String,
}

/// The content of one cluster's desired set, in canonical (sorted) form.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredContent {
    #[serde(default)]
    pub images: Vec<StoredImage>,
    #[serde(default)]
    pub registries: Vec<StoredRegistry>,
}

/// A stored desired set: its generation and content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct StoredDesiredSet {
    pub generation: u64,
    pub content: DesiredContent,
}

/// [`StoredDesiredSet`] by reference, to encode without cloning the content;
/// must serialize exactly like it.
#[derive(Serialize)]
struct StoredDesiredSetRef<'a> {
    generation: u64,
    content: &'a DesiredContent,
}

/// Errors of the controller's store access. `Store(Unavailable)` is worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("policy store: {0}")]
    Store(#[from] StoreError),
    #[error("reading policy: {0}")]
    Objects(#[from] crate::objects::ObjectError),
    #[error("stored desired set of cluster {cluster} is unreadable: {source}")]
    Corrupt {
        cluster: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Placement inputs read from the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub repos: Vec<PlacementRepo>,
    pub clusters: Vec<PlacementCluster>,
    pub registries: Vec<RegistryInfo>,
    pub resolutions: BTreeMap<ObjectId, Resolution>,
    /// Credential fingerprint per registry key `<namespace>/<name>`.
    pub fingerprints: BTreeMap<String, String>,
    /// Registry keys whose password cannot be opened, with why (never the
    /// password). Their images stay placed: see [`placement_inputs`].
    pub unusable: BTreeMap<String, String>,
}

/// What the controller found about Repositories at its last recompute: why a
/// Repository reaches no cluster, or what keeps clusters from pulling it.
/// The admin API shows it as `status.placement` when a Repository is read; it
/// is never stored, so it cannot go stale in the store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlacementReport {
    problems: HashMap<ObjectId, model::PlacementStatus>,
}

impl PlacementReport {
    /// The problem of one Repository, if it has one.
    pub fn of(&self, namespace: &str, name: &str) -> Option<&model::PlacementStatus> {
        self.problems.get(&ObjectId::new(namespace, name))
    }

    /// How many Repositories have a problem.
    pub fn len(&self) -> usize {
        self.problems.len()
    }

    /// True when every Repository is placed without a problem.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The latest [`PlacementReport`] of this replica's controller. A cheap
/// handle: the controller publishes, the admin API reads.
#[derive(Debug, Clone, Default)]
pub struct PlacementReports(Arc<tokio::sync::watch::Sender<Arc<PlacementReport>>>);

impl PlacementReports {
    /// The newest report (empty before the first recompute).
    pub fn latest(&self) -> Arc<PlacementReport> {
        self.0.borrow().clone()
    }

    fn publish(&self, report: PlacementReport) {
        self.0.send_replace(Arc::new(report));
    }
}

/// The desired content of every cluster, and what placement reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placed {
    pub sets: BTreeMap<String, DesiredContent>,
    pub report: PlacementReport,
}

fn ns_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

fn convert_selector(s: &model::LabelSelector) -> Selector {
    Selector {
        match_labels: s.match_labels.clone(),
        match_expressions: s
            .match_expressions
            .iter()
            .map(|e| SelectorRequirement {
                key: e.key.clone(),
                operator: match e.operator {
                    model::SelectorOperator::In => SelectorOperator::In,
                    model::SelectorOperator::NotIn => SelectorOperator::NotIn,
                    model::SelectorOperator::Exists => SelectorOperator::Exists,
                    model::SelectorOperator::DoesNotExist => SelectorOperator::DoesNotExist,
                },
                values: e.values.clone(),
            })
            .collect(),
    }
}

/// The placement input of one Repository and its resolution (tags grouped by digest).
pub fn repo_input(r: &model::Repository) -> (PlacementRepo, Resolution) {
    let id = ObjectId::new(
        ns_of(&r.metadata),
        r.metadata.name.clone().unwrap_or_default(),
    );
    let placement = r.spec.placement.clone().unwrap_or_default();
    let retention = r.spec.retention.clone().unwrap_or_default();
    let grace = retention
        .grace_period
        .as_deref()
        .and_then(|g| model::parse_duration(g).ok())
        .map_or(0, |d| d.as_secs());
    let repo = PlacementRepo {
        id,
        default_placement: r.spec.placement.is_none(),
        selector: placement.cluster_selector.as_ref().map(convert_selector),
        clusters: placement.clusters.clone(),
        registry_ref: ObjectId::new(
            r.spec.registry_ref.namespace.clone().unwrap_or_default(),
            r.spec.registry_ref.name.clone(),
        ),
        repository: r.spec.repository.clone(),
        suspend: r.spec.suspend,
        platforms: r.spec.platforms.clone(),
        keep_versions: retention.keep_versions.unwrap_or(0),
        grace_period_seconds: grace,
    };
    let mut by_digest: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in r.status.iter().flat_map(|s| s.resolved.iter()) {
        let tags = by_digest.entry(t.digest.clone()).or_default();
        if !t.tag.is_empty() {
            tags.push(t.tag.clone());
        }
    }
    let resolution = Resolution {
        images: by_digest
            .into_iter()
            .map(|(digest, tags)| ResolvedImage { digest, tags })
            .collect(),
    };
    (repo, resolution)
}

/// A fingerprint of everything an agent's credential is built from. The
/// password enters sealed, so the fingerprint reveals nothing about it.
pub fn credential_fingerprint(rs: &model::RegistrySecret) -> String {
    let mut h = sha2::Sha256::new();
    for part in [
        rs.spec.domain.as_str(),
        rs.spec.username.as_deref().unwrap_or(""),
        rs.spec.password.as_deref().unwrap_or(""),
        rs.spec.provider.as_str(),
        if rs.spec.insecure { "insecure" } else { "tls" },
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..12])
}

/// Placement inputs from the model. `unusable` says why a RegistrySecret's
/// password cannot be opened (`None` when it can). Such a secret still places
/// its images: a credential the hub cannot open must never take an image off
/// a cluster. Sessions then send the set without that credential, so agents
/// keep the one they hold, and the Repositories report the problem.
pub fn placement_inputs(
    repos: &[model::Repository],
    clusters: &[model::Cluster],
    secrets: &[model::RegistrySecret],
    unusable: impl Fn(&model::RegistrySecret) -> Option<String>,
) -> Inputs {
    let mut inputs = Inputs::default();
    for r in repos {
        let (repo, resolution) = repo_input(r);
        inputs.resolutions.insert(repo.id.clone(), resolution);
        inputs.repos.push(repo);
    }
    for c in clusters {
        inputs.clusters.push(PlacementCluster {
            name: c.metadata.name.clone().unwrap_or_default(),
            labels: c.metadata.labels.clone().unwrap_or_default(),
            tenants: c.spec.tenants.iter().cloned().collect(),
        });
    }
    for s in secrets {
        let id = ObjectId::new(
            ns_of(&s.metadata),
            s.metadata.name.clone().unwrap_or_default(),
        );
        if let Some(why) = unusable(s) {
            inputs.unusable.insert(id.key(), why);
        }
        inputs
            .fingerprints
            .insert(id.key(), credential_fingerprint(s));
        inputs.registries.push(RegistryInfo {
            id,
            domain: s.spec.domain.clone(),
            insecure: s.spec.insecure,
        });
    }
    inputs
}

/// Every cluster's desired content, and the Repositories' placement problems.
pub fn desired_sets(inputs: &Inputs) -> Placed {
    let placed = placement::place(
        &inputs.repos,
        &inputs.clusters,
        &inputs.registries,
        &inputs.resolutions,
    );
    let report = placement_report(inputs, &placed.skipped);
    let sets = placed
        .clusters
        .into_iter()
        .map(|(name, c)| {
            let registries = c
                .registries
                .iter()
                .map(|k| StoredRegistry {
                    key: k.clone(),
                    fingerprint: inputs.fingerprints.get(k).cloned().unwrap_or_default(),
                })
                .collect();
            (
                name,
                DesiredContent {
                    images: c.images.iter().map(StoredImage::from).collect(),
                    registries,
                },
            )
        })
        .collect();
    Placed { sets, report }
}

/// One problem per Repository: the most telling reason first (what keeps it
/// from every cluster before what concerns only some), every reason in the
/// message.
fn placement_report(inputs: &Inputs, skipped: &[placement::Skipped]) -> PlacementReport {
    use model::PlacementReason as R;
    use placement::SkipReason as S;
    let mut found: HashMap<ObjectId, Vec<(R, String)>> = HashMap::new();
    for s in skipped {
        let reason = match &s.reason {
            S::Suspended => R::Suspended,
            S::CrossNamespaceSecret { .. } => R::SecretInOtherNamespace,
            S::SecretNotFound { .. } => R::SecretNotFound,
            S::NotResolved => R::NotResolved,
            S::NoClusterAdmitsNamespace => R::NoClusterAdmitsNamespace,
            S::NoClusterMatches => R::NoClusterMatches,
            S::TenantNotAllowed { .. } => R::TenantNotAllowed,
        };
        let message = match &s.reason {
            S::Suspended => "spec.suspend is true: nothing new is resolved or shipped; \
                             content already synced stays"
                .to_string(),
            S::NotResolved => "no tag is resolved to a digest yet".to_string(),
            other => other.to_string(),
        };
        found
            .entry(s.repo.clone())
            .or_default()
            .push((reason, message));
    }
    for r in &inputs.repos {
        let secret = r.secret();
        if let Some(why) = inputs.unusable.get(&secret.key()) {
            found.entry(r.id.clone()).or_default().push((
                R::CredentialUnusable,
                format!(
                    "RegistrySecret {secret}: the stored password cannot be opened with this \
                     hub's keys ({why}); clusters keep what they hold, but cannot pull anything new"
                ),
            ));
        }
    }
    let rank = |r: &R| match r {
        R::Suspended => 0,
        R::SecretInOtherNamespace => 1,
        R::SecretNotFound => 2,
        R::NotResolved => 3,
        R::NoClusterAdmitsNamespace => 4,
        R::NoClusterMatches => 5,
        R::CredentialUnusable => 6,
        R::TenantNotAllowed => 7,
    };
    let problems = found
        .into_iter()
        .map(|(id, mut reasons)| {
            reasons.sort_by(|a, b| (rank(&a.0), &a.1).cmp(&(rank(&b.0), &b.1)));
            reasons.dedup();
            let status = model::PlacementStatus {
                reason: reasons[0].0,
                message: reasons
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            };
            (id, status)
        })
        .collect();
    PlacementReport { problems }
}

/// The store key of a cluster's desired set.
pub fn desired_key(cluster: &str) -> Key {
    Key::new(DESIRED_KIND, "", cluster)
}

/// Decode a stored desired set.
pub fn decode_desired(cluster: &str, bytes: &[u8]) -> Result<StoredDesiredSet, FleetError> {
    serde_json::from_slice(bytes).map_err(|source| FleetError::Corrupt {
        cluster: cluster.to_string(),
        source,
    })
}

/// The generation of a stored desired set, read without building its
/// content.
pub fn peek_generation(bytes: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Generation {
        generation: u64,
    }
    serde_json::from_slice::<Generation>(bytes)
        .ok()
        .map(|g| g.generation)
}

/// The hub store's epoch, created (once, by whichever replica is first) if absent.
pub async fn ensure_epoch(store: &dyn PolicyStore) -> Result<String, StoreError> {
    let key = Key::new(META_KIND, "", EPOCH_NAME);
    loop {
        if let Some(v) = store.get(&key).await? {
            return Ok(String::from_utf8_lossy(&v.value).into_owned());
        }
        let fresh = uuid::Uuid::new_v4().to_string();
        match store.create(&key, fresh.clone().into_bytes()).await {
            Ok(_) => return Ok(fresh),
            // Another replica won the race: read its epoch.
            Err(StoreError::AlreadyExists(_)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Store `content` as the cluster's desired set unless it is already the
/// stored content. Returns the new generation when it wrote. Two replicas
/// computing the same change bump the generation once: the loser's
/// conditional write conflicts, it re-reads and finds the content equal.
pub async fn store_desired(
    store: &dyn PolicyStore,
    cluster: &str,
    content: &DesiredContent,
) -> Result<Option<u64>, FleetError> {
    let key = desired_key(cluster);
    for _ in 0..10 {
        let current = store.get(&key).await?;
        let (generation, revision) = match &current {
            Some(v) => {
                let old = decode_desired(cluster, &v.value)?;
                if &old.content == content {
                    return Ok(None);
                }
                (old.generation + 1, Some(v.revision))
            }
            None => (1, None),
        };
        let bytes = serde_json::to_vec(&StoredDesiredSet {
            generation,
            content: content.clone(),
        })
        .map_err(|source| FleetError::Corrupt {
            cluster: cluster.to_string(),
            source,
        })?;
        let written = match revision {
            Some(rev) => store.update(&key, bytes, Some(rev)).await,
            None => store.create(&key, bytes).await,
        };
        match written {
            Ok(_) => return Ok(Some(generation)),
            Err(StoreError::Conflict { .. }) | Err(StoreError::AlreadyExists(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Unavailable(format!(
        "desired set of cluster {cluster}: changed concurrently ten times in a row"
    ))
    .into())
}

/// Read the policy, compute every desired set and store the changed ones.
/// Clusters that no longer exist get an empty set (their generation keeps
/// growing, so a re-enrolled cluster never sees a generation go back).
/// Returns the clusters whose set was written.
pub async fn recompute(
    objects: &Objects,
    reports: &PlacementReports,
    on_written: &WrittenFn,
) -> Result<Vec<(String, Arc<StoredDesiredSet>)>, FleetError> {
    let started = std::time::Instant::now();
    // The four reads are independent; on etcd each is several pages, so
    // overlap their round trips. The writes below are conditional, so the
    // order of the reads does not matter.
    let ((repos, _), (clusters, _), (secrets, _), (stored, _)) = tokio::try_join!(
        async { Ok::<_, FleetError>(objects.list(Kind::Repository, None).await?) },
        async { Ok(objects.list(Kind::Cluster, None).await?) },
        async { Ok(objects.list(Kind::RegistrySecret, None).await?) },
        async { Ok(objects.store().list(DESIRED_KIND, None).await?) },
    )?;
    let repos: Vec<_> = repos
        .into_iter()
        .filter_map(|o| match o {
            Object::Repository(r) => Some(r),
            _ => None,
        })
        .collect();
    let clusters: Vec<_> = clusters
        .into_iter()
        .filter_map(|o| match o {
            Object::Cluster(c) => Some(c),
            _ => None,
        })
        .collect();
    let secrets: Vec<_> = secrets
        .into_iter()
        .filter_map(|o| match o {
            Object::RegistrySecret(s) => Some(s),
            _ => None,
        })
        .collect();
    let inputs = placement_inputs(&repos, &clusters, &secrets, |s| match objects.password(s) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    });
    for (key, why) in &inputs.unusable {
        warn!(registry_secret = %key, error = %why,
              "Registry credential cannot be opened; its images stay placed with the credential agents hold");
    }
    let read_ms = started.elapsed().as_millis();
    let Placed { sets, report } = desired_sets(&inputs);
    reports.publish(report);
    let mut stored: BTreeMap<String, crate::store::Versioned> = stored
        .into_iter()
        .map(|v| (v.key.name.clone(), v))
        .collect();
    // Clusters that are gone keep a stored set: it becomes empty.
    let gone: Vec<(String, DesiredContent)> = stored
        .keys()
        .filter(|name| !sets.contains_key(*name))
        .map(|name| (name.clone(), DesiredContent::default()))
        .collect();
    let sets: BTreeMap<String, DesiredContent> = sets.into_iter().chain(gone).collect();

    // Every changed set, written in batches (a hundred clusters per etcd
    // transaction, several in flight; the whole fleet in one embedded-store
    // transaction) rather than one write per cluster.
    let mut puts = Vec::new();
    let mut changed = Vec::new();
    for (cluster, content) in &sets {
        let (generation, expected) = match stored.remove(cluster) {
            Some(v) => {
                // Compare encodings rather than decode every stored set: a
                // fleet-wide recompute reads thousands of them. Encoding is
                // deterministic, so equal content gives equal bytes.
                let old_generation = match peek_generation(&v.value) {
                    Some(g) => g,
                    None => decode_desired(cluster, &v.value)?.generation,
                };
                let same = serde_json::to_vec(&StoredDesiredSetRef {
                    generation: old_generation,
                    content,
                })
                .is_ok_and(|bytes| bytes == v.value);
                if same {
                    continue;
                }
                (old_generation + 1, Some(v.revision))
            }
            None => (1, None),
        };
        let set = Arc::new(StoredDesiredSet {
            generation,
            content: content.clone(),
        });
        let value = serde_json::to_vec(set.as_ref()).map_err(|source| FleetError::Corrupt {
            cluster: cluster.clone(),
            source,
        })?;
        puts.push(Put {
            key: desired_key(cluster),
            value,
            expected,
        });
        changed.push((cluster.clone(), set));
    }
    let compute_ms = started.elapsed().as_millis() - read_ms;
    // Sessions get each batch as soon as it is durable, while later
    // batches are still being written.
    let mut written = Vec::new();
    let mut refused = Vec::new();
    let mut failed = None;
    crate::store::put_batches(
        objects.store().as_ref(),
        puts,
        |range, result| match result {
            Ok(_) => {
                on_written(&changed[range.clone()]);
                written.extend(changed[range].iter().cloned());
            }
            // Another replica wrote some of them first: redone below.
            Err(StoreError::Conflict { .. })
            | Err(StoreError::AlreadyExists(_))
            | Err(StoreError::NotFound(_)) => refused.extend(changed[range].iter().cloned()),
            Err(e) => failed = Some(e),
        },
    )
    .await;
    if let Some(e) = failed {
        return Err(e.into());
    }
    // One by one, each re-reading what is stored.
    for (cluster, _) in refused {
        let content = sets.get(&cluster).cloned().unwrap_or_default();
        if let Some(generation) =
            store_desired(objects.store().as_ref(), &cluster, &content).await?
        {
            let set = (
                cluster,
                Arc::new(StoredDesiredSet {
                    generation,
                    content,
                }),
            );
            on_written(std::slice::from_ref(&set));
            written.push(set);
        }
    }
    for (cluster, set) in written.iter().take(LOGGED_CHANGES) {
        info!(cluster = %cluster, generation = set.generation,
              images = set.content.images.len(), "Desired set changed");
    }
    if written.len() > LOGGED_CHANGES {
        info!(
            clusters = written.len(),
            read_ms,
            compute_ms,
            total_ms = started.elapsed().as_millis(),
            "Desired sets changed (the first {LOGGED_CHANGES} are logged one by one)"
        );
    }
    Ok(written)
}

/// Watch one store kind and ring `notify` on every change placement can see
/// (see [`placement_fingerprint`]). A broken or compacted watch is relisted,
/// with a notify, because changes in between may have been missed (the
/// receiver recomputes from a full list).
pub async fn watch_kind(
    store: Arc<dyn PolicyStore>,
    kind: &'static str,
    notify: Arc<Notify>,
    shutdown: CancellationToken,
) {
    use futures::StreamExt;
    // What placement reads of each object, so that the status writes of
    // agent sessions (thousands a minute in a large fleet) do not each cause
    // a recompute.
    loop {
        let listed = tokio::select! {
            _ = shutdown.cancelled() => return,
            l = store.list(kind, None) => l,
        };
        let (mut seen, mut after) = match listed {
            Ok((items, revision)) => {
                let seen: HashMap<Key, u64> = items
                    .iter()
                    .map(|v| (v.key.clone(), placement_fingerprint(&v.value)))
                    .collect();
                (seen, revision)
            }
            Err(e) => {
                debug!(kind, error = %e, "Listing failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
        };
        // Anything may have changed before this list (the first pass of the
        // controller can read older state than this list): recompute.
        notify.notify_one();
        match store.watch(kind, after).await {
            Ok(mut stream) => loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                match next {
                    Some(Ok(ev)) => {
                        let relevant = match &ev {
                            crate::store::WatchEvent::Put(v) => {
                                after = v.revision;
                                let print = placement_fingerprint(&v.value);
                                seen.insert(v.key.clone(), print) != Some(print)
                            }
                            crate::store::WatchEvent::Delete(v) => {
                                after = v.revision;
                                seen.remove(&v.key);
                                true
                            }
                        };
                        if relevant {
                            notify.notify_one();
                        }
                    }
                    Some(Err(e)) => {
                        debug!(kind, after, error = %e, "Watch broke; relisting");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => debug!(kind, error = %e, "Watch failed; relisting"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// A hash of what placement reads from a stored object: its metadata and
/// spec, and of the status only a Repository's resolved digests. Everything
/// else in a status is written by others (agent sessions, the tag resolver's
/// messages and times, registry health), thousands of times a minute in a
/// large fleet, and must not each cause a recompute. Stored objects carry no
/// resourceVersion (it is the store revision). Hashed from the raw JSON,
/// without building a tree.
fn placement_fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    #[derive(Deserialize)]
    struct Resolved<'a> {
        #[serde(borrow)]
        resolved: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    struct Placed<'a> {
        #[serde(borrow)]
        metadata: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow)]
        spec: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow)]
        status: Option<Resolved<'a>>,
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match serde_json::from_slice::<Placed<'_>>(bytes) {
        Ok(p) => {
            p.metadata.map(|m| m.get()).hash(&mut hasher);
            p.spec.map(|m| m.get()).hash(&mut hasher);
            p.status
                .and_then(|s| s.resolved)
                .map(|r| r.get())
                .hash(&mut hasher);
        }
        // Unreadable: hash the bytes, so any rewrite counts as a change.
        Err(_) => bytes.hash(&mut hasher),
    }
    hasher.finish()
}

/// Told about desired sets as soon as they are stored, before the store's
/// watch delivers them (which also happens, to every replica).
pub type OnWritten = Arc<WrittenFn>;
/// See [`OnWritten`].
pub type WrittenFn = dyn Fn(&[(String, Arc<StoredDesiredSet>)]) + Send + Sync;

/// The controller: recompute on every change of repositories, clusters or
/// registry secrets (debounced), until `shutdown`. `on_written` gets every
/// set this replica stored, so its own sessions need not wait for the watch.
pub async fn run(
    objects: Objects,
    reports: PlacementReports,
    on_written: OnWritten,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let store = objects.store().clone();
    let notify = Arc::new(Notify::new());
    let mut watchers = tokio::task::JoinSet::new();
    for kind in [
        Kind::Repository.plural(),
        Kind::Cluster.plural(),
        Kind::RegistrySecret.plural(),
    ] {
        watchers.spawn(watch_kind(
            store.clone(),
            kind,
            notify.clone(),
            shutdown.clone(),
        ));
    }
    // The first pass runs unconditionally.
    notify.notify_one();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = notify.notified() => {}
        }
        // Debounce: let a burst of changes (an apply of many objects) settle.
        tokio::time::sleep(DEBOUNCE).await;
        match recompute(&objects, &reports, on_written.as_ref()).await {
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "Computing desired sets failed; retrying");
                let n = notify.clone();
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => n.notify_one(),
                }
            }
        }
    }
    watchers.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgfleet::model::parse_documents;

    const POLICY: &str = r#"
apiVersion: image.theriseunion.io/v1alpha1
kind: RegistrySecret
metadata: {name: reg, namespace: default}
spec: {domain: "127.0.0.1:5000", insecure: true}
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata: {name: app, namespace: default}
spec:
  repository: library/app
  tag: v1
  registryRef: {name: reg}
  placement:
    clusterSelector:
      matchLabels: {tier: edge}
  retention: {keepVersions: 2, gracePeriod: 1h}
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Cluster
metadata: {name: a, labels: {tier: edge}}
spec: {tenants: [default]}
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Cluster
metadata: {name: b, labels: {tier: core}}
spec: {tenants: [default]}
"#;

    fn split(
        objs: Vec<Object>,
    ) -> (
        Vec<model::Repository>,
        Vec<model::Cluster>,
        Vec<model::RegistrySecret>,
    ) {
        let (mut r, mut c, mut s) = (vec![], vec![], vec![]);
        for o in objs {
            match o {
                Object::Repository(x) => r.push(x),
                Object::Cluster(x) => c.push(x),
                Object::RegistrySecret(x) => s.push(x),
            }
        }
        (r, c, s)
    }

    fn resolved(repo: &mut model::Repository, tags: &[(&str, &str)]) {
        let status = repo.status.get_or_insert_with(Default::default);
        status.resolved = tags
            .iter()
            .map(|(t, d)| model::ResolvedTag {
                tag: t.to_string(),
                digest: d.to_string(),
                media_type: String::new(),
            })
            .collect();
    }

    #[test]
    fn model_to_desired_sets() {
        let (mut repos, clusters, secrets) = split(parse_documents(POLICY).expect("parses"));
        // Not resolved yet: nothing anywhere, and the report says so.
        let placed = desired_sets(&placement_inputs(&repos, &clusters, &secrets, |_| None));
        assert_eq!(placed.sets.len(), 2);
        assert!(placed.sets.values().all(|s| s.images.is_empty()));
        let problem = placed.report.of("default", "app").expect("reported");
        assert_eq!(problem.reason, model::PlacementReason::NotResolved);

        resolved(
            &mut repos[0],
            &[("v1", "sha256:aa"), ("stable", "sha256:aa")],
        );
        let placed = desired_sets(&placement_inputs(&repos, &clusters, &secrets, |_| None));
        assert!(placed.report.is_empty(), "{:?}", placed.report);
        let sets = placed.sets;
        let a = &sets["a"];
        assert_eq!(a.images.len(), 1);
        let img = &a.images[0];
        assert_eq!(img.key, "default/app@sha256:aa");
        assert_eq!(img.tags, vec!["stable".to_string(), "v1".to_string()]);
        assert_eq!(img.registry, "127.0.0.1:5000");
        assert_eq!(img.keep_versions, 2);
        assert_eq!(img.grace_period_seconds, 3600);
        assert_eq!(a.registries.len(), 1);
        assert_eq!(a.registries[0].key, "default/reg");
        assert!(!a.registries[0].fingerprint.is_empty());
        assert!(sets["b"].images.is_empty());

        // A credential that cannot be opened never takes an image off a
        // cluster: the set is unchanged, and the Repository reports why.
        let placed = desired_sets(&placement_inputs(&repos, &clusters, &secrets, |_| {
            Some("sealed value uses key \"k9\", which is not in the keyring".into())
        }));
        assert_eq!(placed.sets, sets);
        let problem = placed.report.of("default", "app").expect("reported");
        assert_eq!(problem.reason, model::PlacementReason::CredentialUnusable);
        assert!(
            problem.message.contains("default/reg"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn the_seeds_repository_without_placement_reaches_every_admitting_cluster() {
        let (mut repos, clusters, secrets) = split(parse_documents(POLICY).expect("parses"));
        repos[0].spec.placement = None;
        resolved(&mut repos[0], &[("v1", "sha256:aa")]);
        let placed = desired_sets(&placement_inputs(&repos, &clusters, &secrets, |_| None));
        assert_eq!(placed.sets["a"].images.len(), 1);
        assert_eq!(placed.sets["b"].images.len(), 1);
        assert!(placed.report.is_empty());

        // No cluster admits the namespace: nothing goes anywhere, and why.
        repos[0].metadata.namespace = Some("team-z".into());
        let placed = desired_sets(&placement_inputs(&repos, &clusters, &secrets, |_| None));
        assert!(placed.sets.values().all(|s| s.images.is_empty()));
        let problem = placed.report.of("team-z", "app").expect("reported");
        // The secret is looked up in team-z, where there is none.
        assert_eq!(problem.reason, model::PlacementReason::SecretNotFound);
    }

    #[test]
    fn only_what_placement_reads_wakes_the_controller() {
        let base = serde_json::json!({
            "apiVersion": "image.theriseunion.io/v1alpha1",
            "kind": "Repository",
            "metadata": {"name": "app", "namespace": "default", "generation": 1},
            "spec": {"repository": "x/app", "tag": "v1", "registryRef": {"name": "reg"}},
            "status": {"resolved": [{"tag": "v1", "digest": "sha256:1"}]}
        });
        let print = |v: &serde_json::Value| placement_fingerprint(&serde_json::to_vec(v).unwrap());
        let with = |path: &str, value: serde_json::Value| {
            let mut v = base.clone();
            *v.pointer_mut(path).expect("path") = value;
            v
        };
        let mut status_only = base.clone();
        status_only["status"]["message"] = "registry down".into();
        status_only["status"]["syncedClusters"] = 3.into();
        status_only["status"]["clusters"] = serde_json::json!([{"cluster": "a"}]);
        assert_eq!(
            print(&base),
            print(&status_only),
            "status writes are not placement"
        );
        assert_ne!(
            print(&base),
            print(&with("/status/resolved/0/digest", "sha256:2".into())),
            "a new digest is"
        );
        assert_ne!(
            print(&base),
            print(&with("/spec/tag", "v2".into())),
            "a spec change is"
        );
        assert_ne!(
            print(&base),
            print(&with("/metadata/generation", 2.into())),
            "metadata is"
        );
    }

    #[test]
    fn fingerprint_changes_with_the_credential() {
        let (_, _, secrets) = split(parse_documents(POLICY).expect("parses"));
        let mut s = secrets[0].clone();
        let before = credential_fingerprint(&s);
        s.spec.password = Some("sealed-other".into());
        assert_ne!(before, credential_fingerprint(&s));
    }

    #[test]
    fn the_borrowed_encoding_equals_the_stored_one() {
        let set = StoredDesiredSet {
            generation: 7,
            content: DesiredContent {
                images: vec![StoredImage {
                    key: "k".into(),
                    digest: "sha256:1".into(),
                    tags: vec!["v1".into()],
                    ..Default::default()
                }],
                registries: vec![StoredRegistry {
                    key: "default/reg".into(),
                    fingerprint: "f".into(),
                }],
            },
        };
        let owned = serde_json::to_vec(&set).unwrap();
        let borrowed = serde_json::to_vec(&StoredDesiredSetRef {
            generation: 7,
            content: &set.content,
        })
        .unwrap();
        assert_eq!(owned, borrowed);
        assert_eq!(peek_generation(&owned), Some(7));
        assert_eq!(peek_generation(b"{}"), None);
    }
}
