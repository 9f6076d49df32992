//! The desired-set controller: adapts the stored policy (Repositories,
//! Clusters, RegistrySecrets) to [`crate::placement`] inputs, computes every
//! cluster's desired set and stores it (kind "desiredsets", see
//! [`crate::desired`]) with a generation that grows with every change.
//! Sessions on any replica follow those stored sets, so a change computed
//! once reaches every agent.
//!
//! The pure adapter ([`placement_inputs`], [`desired_sets`]) does no I/O;
//! [`run`] follows the policy kinds through the store's [`Watcher`] and
//! recomputes: [`recompute`] reads, plans the writes, writes and reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgfleet::model::{self, DEFAULT_NAMESPACE, Kind, Object};
use serde::Deserialize;
use sha2::Digest as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::desired::{self, DESIRED_KIND, DesiredSetError, StoredDesiredSet};
use crate::desired_cache::Handoff;
use crate::objects::{ObjectError, Objects};
use crate::placement::{
    self, DesiredSetContent, ObjectId, PlacementCluster, PlacementRepo, RegistryInfo, Resolution,
    ResolvedImage, Selector, SelectorOperator, SelectorRequirement,
};
use crate::retry::Retry;
use crate::store::watcher::{Event, Watcher, recover};
use crate::store::{Key, PolicyStore, Put, StoreError, Versioned};
use crate::traces::TraceBook;

/// How many changed desired sets a recompute logs one by one; a change to a
/// whole fleet logs one summary line beyond that.
const LOGGED_CHANGES: usize = 20;
/// How long the controller waits for more changes before recomputing.
pub const DEBOUNCE: Duration = Duration::from_millis(30);

/// Why a recompute failed; every variant is worth a retry (the next change,
/// or the controller's back-off, recomputes from scratch).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Reading the policy failed.
    #[error("reading policy: {0}")]
    ReadPolicy(#[from] ObjectError),
    /// Listing the stored desired sets failed.
    #[error("listing the stored desired sets: {0}")]
    ListDesired(#[source] StoreError),
    /// Writing a batch of desired sets failed.
    #[error("writing desired sets: {0}")]
    WriteBatch(#[source] StoreError),
    /// Reading or writing one stored desired set failed.
    #[error(transparent)]
    DesiredSet(#[from] DesiredSetError),
}

/// Placement inputs read from the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub repos: Vec<PlacementRepo>,
    pub clusters: Vec<PlacementCluster>,
    /// With each one's credential fingerprint.
    pub registries: Vec<RegistryInfo>,
    pub resolutions: BTreeMap<ObjectId, Resolution>,
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
        verify_keys: r
            .spec
            .enforced_keys()
            .iter()
            .map(|k| crate::placement::VerifyKey {
                name: k.name.clone(),
                public_key: k.public_key.clone(),
            })
            .collect(),
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

/// The desired content of every cluster, and what placement reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placed {
    pub sets: BTreeMap<String, DesiredSetContent>,
    pub report: PlacementReport,
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
        inputs.registries.push(RegistryInfo {
            id,
            domain: s.spec.domain.clone(),
            insecure: s.spec.insecure,
            fingerprint: credential_fingerprint(s),
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
    Placed {
        sets: placed.clusters,
        report,
    }
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

/// The policy objects, by kind.
#[derive(Default)]
struct Policy {
    repos: Vec<model::Repository>,
    clusters: Vec<model::Cluster>,
    secrets: Vec<model::RegistrySecret>,
}

impl Policy {
    fn add(&mut self, o: Object) {
        match o {
            Object::Repository(r) => self.repos.push(r),
            Object::Cluster(c) => self.clusters.push(c),
            Object::RegistrySecret(s) => self.secrets.push(s),
            // Bindings say who may change policy, not where images go.
            Object::RoleBinding(_) | Object::ClusterRoleBinding(_) => {}
        }
    }
}

/// The policy as the controller reads it for one recompute, and the stored
/// desired sets it compares against.
struct Read {
    inputs: Inputs,
    /// The stored desired sets by cluster.
    stored: BTreeMap<String, Versioned>,
}

/// Reads the policy and the stored desired sets. The four reads are
/// independent; on etcd each is several pages, so their round trips
/// overlap. The writes that follow are conditional, so the order of the
/// reads does not matter.
async fn read(objects: &Objects) -> Result<Read, ControllerError> {
    let ((repos, _), (clusters, _), (secrets, _), (stored, _)) = tokio::try_join!(
        async { Ok::<_, ControllerError>(objects.list(Kind::Repository, None).await?) },
        async { Ok(objects.list(Kind::Cluster, None).await?) },
        async { Ok(objects.list(Kind::RegistrySecret, None).await?) },
        async {
            objects
                .store()
                .list(DESIRED_KIND, None)
                .await
                .map_err(ControllerError::ListDesired)
        },
    )?;
    let mut policy = Policy::default();
    for o in repos.into_iter().chain(clusters).chain(secrets) {
        policy.add(o);
    }
    let Policy {
        repos,
        clusters,
        secrets,
    } = policy;
    let inputs = placement_inputs(&repos, &clusters, &secrets, |s| match objects.password(s) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    });
    for (key, why) in &inputs.unusable {
        warn!(registry_secret = %key, error = %why,
              "Registry credential cannot be opened; its images stay placed with the credential agents hold");
    }
    let stored = stored
        .into_iter()
        .map(|v| (v.key.name.clone(), v))
        .collect();
    Ok(Read { inputs, stored })
}

/// The writes one recompute makes: one conditional put per changed set,
/// and the sets they store, in the same order.
#[derive(Default)]
struct Writes {
    puts: Vec<Put>,
    changed: Vec<(String, Arc<StoredDesiredSet>)>,
}

/// What to write so that the store holds `sets`: every set whose encoding
/// differs from the stored one, at the next generation. Clusters that are
/// gone keep a stored set, which becomes empty (their generation keeps
/// growing, so a re-enrolled cluster never sees a generation go back).
fn plan_writes(
    mut sets: BTreeMap<String, DesiredSetContent>,
    mut stored: BTreeMap<String, Versioned>,
    traces: Option<&TraceBook>,
) -> Result<(Writes, BTreeMap<String, DesiredSetContent>), DesiredSetError> {
    for name in stored.keys() {
        if !sets.contains_key(name) {
            sets.insert(name.clone(), DesiredSetContent::default());
        }
    }
    let mut writes = Writes::default();
    for (cluster, content) in sets.iter_mut() {
        let (generation, expected) = match stored.remove(cluster) {
            Some(v) => {
                // Compare encodings rather than decode every stored set: a
                // fleet-wide recompute reads thousands of them. Encoding is
                // deterministic, so equal content gives equal bytes.
                let old_generation = match desired::peek_generation(&v.value) {
                    Some(g) => g,
                    None => desired::decode(cluster, &v.value)?.generation,
                };
                let same = desired::encode(cluster, old_generation, content)
                    .is_ok_and(|bytes| bytes == v.value);
                if same {
                    continue;
                }
                // With traces exported, stored entries carry trace contexts
                // that placement does not compute: decode (only then) and
                // compare without them, keeping each entry's own.
                if let Some(book) = traces {
                    let old = desired::decode(cluster, &v.value)?;
                    if stamp(content, Some(&old.content), book) {
                        continue;
                    }
                }
                (old_generation + 1, Some(v.revision))
            }
            None => {
                if let Some(book) = traces {
                    stamp(content, None, book);
                }
                (1, None)
            }
        };
        let set = Arc::new(StoredDesiredSet {
            generation,
            content: content.clone(),
        });
        writes.puts.push(Put {
            key: desired::desired_key(cluster),
            value: desired::encode(cluster, generation, content)?,
            expected,
        });
        writes.changed.push((cluster.clone(), set));
    }
    Ok((writes, sets))
}

/// Gives each entry of `content` (computed by placement, without trace
/// contexts) the trace context it has in `old`, or, for an entry the change
/// adds, the trace of its Repository's latest resolution. True when the
/// result equals `old`: only trace contexts differed.
fn stamp(
    content: &mut DesiredSetContent,
    old: Option<&DesiredSetContent>,
    book: &TraceBook,
) -> bool {
    let held: std::collections::HashMap<&str, &str> = old
        .map(|o| {
            o.images
                .iter()
                .map(|i| (i.key.as_str(), i.trace_context.as_str()))
                .collect()
        })
        .unwrap_or_default();
    for image in &mut content.images {
        image.trace_context = match held.get(image.key.as_str()) {
            Some(tc) => tc.to_string(),
            None => book.resolution(&image.source_namespace, &image.source_name),
        };
    }
    old.is_some_and(|o| o == &*content)
}

/// Writes `writes` in batches (a hundred clusters per etcd transaction,
/// several in flight; the whole fleet in one embedded-store transaction),
/// handing each batch to this replica's sessions as soon as it is durable.
/// Sets another replica wrote first are redone one by one, each re-reading
/// what is stored. Returns the sets written.
async fn write(
    store: &dyn PolicyStore,
    writes: Writes,
    sets: &BTreeMap<String, DesiredSetContent>,
    handoff: &Handoff,
) -> Result<Vec<(String, Arc<StoredDesiredSet>)>, ControllerError> {
    let Writes { puts, changed } = writes;
    let mut written = Vec::new();
    let mut refused = Vec::new();
    let mut failed = None;
    crate::store::put_batches(store, puts, |range, result| match result {
        Ok(_) => {
            handoff.written(&changed[range.clone()]);
            written.extend(changed[range].iter().cloned());
        }
        // Another replica wrote some of them first: redone below.
        Err(StoreError::Conflict { .. })
        | Err(StoreError::AlreadyExists(_))
        | Err(StoreError::NotFound(_)) => refused.extend(changed[range].iter().cloned()),
        Err(e) => failed = Some(e),
    })
    .await;
    if let Some(e) = failed {
        return Err(ControllerError::WriteBatch(e));
    }
    for (cluster, _) in refused {
        let content = sets.get(&cluster).cloned().unwrap_or_default();
        if let Some(generation) = desired::store_desired(store, &cluster, &content).await? {
            let set = (
                cluster,
                Arc::new(StoredDesiredSet {
                    generation,
                    content,
                }),
            );
            handoff.written(std::slice::from_ref(&set));
            written.push(set);
        }
    }
    Ok(written)
}

/// How long each part of a recompute took, for the summary line.
struct Timings {
    started: Instant,
    read_ms: u128,
    compute_ms: u128,
}

fn log_written(written: &[(String, Arc<StoredDesiredSet>)], t: &Timings) {
    for (cluster, set) in written.iter().take(LOGGED_CHANGES) {
        info!(cluster = %cluster, generation = set.generation,
              images = set.content.images.len(), "Desired set changed");
    }
    if written.len() > LOGGED_CHANGES {
        info!(
            clusters = written.len(),
            read_ms = t.read_ms,
            compute_ms = t.compute_ms,
            total_ms = t.started.elapsed().as_millis(),
            "Desired sets changed (the first {LOGGED_CHANGES} are logged one by one)"
        );
    }
}

/// Read the policy, compute every desired set and store the changed ones,
/// handing them to this replica's sessions. Returns the clusters whose set
/// was written.
pub async fn recompute(
    objects: &Objects,
    reports: &PlacementReports,
    handoff: &Handoff,
) -> Result<Vec<(String, Arc<StoredDesiredSet>)>, ControllerError> {
    // Part of the trace of the change that woke this pass, when one is known.
    let span = tracing::info_span!("compute desired sets", written = tracing::field::Empty);
    imgfleet_common::telemetry::join(&span, &objects.traces().take_latest());
    let written =
        tracing::Instrument::instrument(compute_and_write(objects, reports, handoff), span.clone())
            .await?;
    span.record("written", written.len());
    Ok(written)
}

async fn compute_and_write(
    objects: &Objects,
    reports: &PlacementReports,
    handoff: &Handoff,
) -> Result<Vec<(String, Arc<StoredDesiredSet>)>, ControllerError> {
    let started = Instant::now();
    let Read { inputs, stored } = read(objects).await?;
    let read_ms = started.elapsed().as_millis();
    let Placed { sets, report } = desired_sets(&inputs);
    reports.publish(report);
    let traces = imgfleet_common::telemetry::enabled().then(|| objects.traces());
    let (writes, sets) = plan_writes(sets, stored, traces)?;
    let compute_ms = started.elapsed().as_millis() - read_ms;
    let written = write(objects.store().as_ref(), writes, &sets, handoff).await?;
    let timings = Timings {
        started,
        read_ms,
        compute_ms,
    };
    log_written(&written, &timings);
    Ok(written)
}

/// Follow one policy kind and ring `notify` on every change placement can
/// see (see [`placement_fingerprint`]). A (re)list rings too: anything may
/// have changed before it (the first pass of the controller can read older
/// state than this list). Failures wait with [`Retry`].
pub async fn watch_kind(
    store: Arc<dyn PolicyStore>,
    kind: &'static str,
    notify: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut watcher = Watcher::new(store, kind);
    let mut retry = Retry::new(match kind {
        "repositories" => "Watching Repositories for the controller",
        "clusters" => "Watching Clusters for the controller",
        _ => "Watching RegistrySecrets for the controller",
    });
    // What placement reads of each object, so that the status writes of
    // agent sessions (thousands a minute in a large fleet) do not each cause
    // a recompute.
    let mut seen: HashMap<Key, u64> = HashMap::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = watcher.next() => e,
        };
        let relevant = match event {
            Ok(Event::Listed { items, .. }) => {
                seen = items
                    .iter()
                    .map(|v| (v.key.clone(), placement_fingerprint(&v.value)))
                    .collect();
                true
            }
            Ok(Event::Put(v)) => {
                let print = placement_fingerprint(&v.value);
                seen.insert(v.key, print) != Some(print)
            }
            Ok(Event::Delete(v)) => {
                seen.remove(&v.key);
                true
            }
            Err(e) => {
                if !recover(&mut watcher, e, &mut retry, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        retry.succeeded();
        if relevant {
            notify.notify_one();
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

/// The controller: recompute on every change of repositories, clusters or
/// registry secrets (debounced), until `shutdown`. Every set it stores is
/// handed over through `handoff`, so this replica's sessions need not wait
/// for the store's watch.
pub async fn run(
    objects: Objects,
    reports: PlacementReports,
    handoff: Handoff,
    shutdown: CancellationToken,
) {
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
    let mut retry = Retry::new("Computing desired sets");
    // The first pass runs unconditionally.
    notify.notify_one();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = notify.notified() => {}
        }
        // Debounce: let a burst of changes (an apply of many objects) settle.
        tokio::time::sleep(DEBOUNCE).await;
        match recompute(&objects, &reports, &handoff).await {
            Ok(_) => retry.succeeded(),
            Err(e) => {
                if !retry.wait_after(&e, &shutdown).await {
                    break;
                }
                notify.notify_one();
            }
        }
    }
    watchers.shutdown().await;
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
                Object::RoleBinding(_) | Object::ClusterRoleBinding(_) => {}
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
                scan: None,
                verification: None,
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
    fn trace_contexts_stay_with_the_entries_a_change_added() {
        let image = |key: &str, source: &str, tc: &str| crate::placement::DesiredImage {
            key: key.into(),
            source_namespace: "default".into(),
            source_name: source.into(),
            trace_context: tc.into(),
            ..Default::default()
        };
        let book = TraceBook::default();
        book.resolved("default", "new", "00-aa-bb-01".into());
        let old = DesiredSetContent {
            images: vec![image("default/old@sha256:1", "old", "00-old-01")],
            registries: vec![],
        };
        // Placement computes no trace contexts.
        let mut same = DesiredSetContent {
            images: vec![image("default/old@sha256:1", "old", "")],
            registries: vec![],
        };
        assert!(
            stamp(&mut same, Some(&old), &book),
            "only the context differed"
        );
        let mut changed = DesiredSetContent {
            images: vec![
                image("default/new@sha256:2", "new", ""),
                image("default/old@sha256:1", "old", ""),
            ],
            registries: vec![],
        };
        assert!(!stamp(&mut changed, Some(&old), &book));
        assert_eq!(changed.images[0].trace_context, "00-aa-bb-01");
        assert_eq!(changed.images[1].trace_context, "00-old-01");
    }
}
