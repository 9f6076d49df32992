//! Retention and garbage collection of the content store.
//!
//! Deciding is pure ([`plan`]): which recorded images are no longer wanted,
//! given the images wanted now, each repository's own retention (how many
//! versions it keeps, the desired ones included, and how long unwanted
//! content stays), and how long each image has been unwanted. Acting
//! ([`collect`]) removes their records in one atomic write, then deletes the
//! blobs that neither a kept record nor a wanted image needs.
//!
//! Collection may run while transfers do: a transfer pins what it uses until
//! its image is recorded ([`crate::store::Pins`]), and a blob is deleted only
//! under the pin lock and only if the records did not change since GC
//! decided. So one image that keeps failing never holds up collection for
//! the others.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::{Kept, ManifestRecord, Store, StoreError, Usage};

/// The agent's own retention, used by every repository that does not set
/// its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPolicy {
    /// How long content stays after it stops being desired.
    pub grace_period: Duration,
    /// Versions (image digests) kept per still-desired repository, the
    /// desired ones included, newest first: 1 keeps only what is desired, 2
    /// keeps one older version for rollback.
    pub keep_versions: usize,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            grace_period: Duration::from_secs(24 * 3600),
            keep_versions: 2,
        }
    }
}

/// A repository's own retention, as its Repository object sets it. Zero
/// fields mean "the agent's default" (as on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Versions kept, the desired ones included; 0 for the default.
    #[serde(default)]
    pub keep_versions: u32,
    /// Grace period in seconds; 0 for the default.
    #[serde(default)]
    pub grace_period_seconds: u64,
}

impl Retention {
    /// Two Repository objects may name the same upstream repository: the
    /// larger of each setting wins, so neither loses what it asked to keep.
    fn merge(self, other: Retention) -> Retention {
        Retention {
            keep_versions: self.keep_versions.max(other.keep_versions),
            grace_period_seconds: self.grace_period_seconds.max(other.grace_period_seconds),
        }
    }

    /// Versions to keep and grace period, defaults filled in.
    fn resolve(self, policy: &GcPolicy) -> (usize, Duration) {
        let keep = match self.keep_versions {
            0 => policy.keep_versions.max(1),
            n => n as usize,
        };
        let grace = match self.grace_period_seconds {
            0 => policy.grace_period,
            s => Duration::from_secs(s),
        };
        (keep, grace)
    }
}

/// An image root: (registry, repository, digest).
pub type ImageId = (String, String, String);

/// A repository: (registry, repository).
pub type RepoId = (String, String);

/// An image wanted now, with its repository's retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The image.
    pub id: ImageId,
    /// Its Repository's retention settings.
    pub retention: Retention,
}

impl Wanted {
    /// A wanted image that uses the agent's defaults.
    pub fn new(id: ImageId) -> Self {
        Wanted {
            id,
            retention: Retention::default(),
        }
    }
}

/// What GC remembers between runs (`gc-state.json`). Older files hold only
/// `unwanted_since`; the rest defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    /// `registry/repository@digest` of each unwanted image still in its grace
    /// period, with the unix second it became unwanted.
    #[serde(default)]
    pub unwanted_since: BTreeMap<String, u64>,
    /// The retention last seen for each repository (`registry/repository`)
    /// that set one, kept while the store holds any of it, so that a
    /// repository that left the desired set still gets its own grace period.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retention: BTreeMap<String, Retention>,
}

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcPlan {
    /// Images whose records go now.
    pub remove: Vec<ImageId>,
    /// What to remember for the next run.
    pub state: GcState,
    /// Seconds from `now` until the first grace period still running ends:
    /// when the next run has something to remove.
    pub next_due: Option<u64>,
}

fn id_key(id: &ImageId) -> String {
    format!("{}/{}@{}", id.0, id.1, id.2)
}

fn repo_key(registry: &str, repository: &str) -> String {
    format!("{registry}/{repository}")
}

/// Decides which recorded images to remove.
///
/// - `wanted`: the images desired now, with their repository's retention.
/// - `unresolved`: repositories whose desired digests are not known this run
///   (a tag that did not resolve): nothing of them is removed.
/// - `previous`: what the last run remembered; `now`: unix seconds.
///
/// Per still-desired repository, `keep_versions` counts the desired versions
/// that are present plus the newest other versions kept for rollback. A
/// desired version that is not synced yet takes no slot, so the version it
/// replaces stays until it is. Every other image is removed once it has been
/// unwanted for its repository's grace period.
pub fn plan(
    records: &[ManifestRecord],
    wanted: &[Wanted],
    unresolved: &[RepoId],
    previous: &GcState,
    policy: &GcPolicy,
    now: u64,
) -> GcPlan {
    // Each root image once, with its newest record time.
    let mut roots: BTreeMap<ImageId, u64> = BTreeMap::new();
    for r in records.iter().filter(|r| r.parent.is_none()) {
        let id = (r.registry.clone(), r.repository.clone(), r.digest.clone());
        let t = roots.entry(id).or_default();
        *t = (*t).max(r.recorded_at);
    }
    let wanted_ids: BTreeSet<&ImageId> = wanted.iter().map(|w| &w.id).collect();
    let unresolved: BTreeSet<(&str, &str)> = unresolved
        .iter()
        .map(|(g, r)| (g.as_str(), r.as_str()))
        .collect();
    let desired_repos = desired_retention(wanted);
    // What each repository with content uses: its desired retention, else
    // the one remembered from when it was desired.
    let retention_of = |registry: &str, repository: &str| -> Retention {
        desired_repos
            .get(&(registry, repository))
            .copied()
            .or_else(|| {
                previous
                    .retention
                    .get(&repo_key(registry, repository))
                    .copied()
            })
            .unwrap_or_default()
    };

    // Per repository: its roots, newest first.
    let mut by_repo: BTreeMap<(&str, &str), Vec<(&ImageId, u64)>> = BTreeMap::new();
    for (id, t) in &roots {
        by_repo.entry((&id.0, &id.1)).or_default().push((id, *t));
    }
    let mut out = GcPlan::default();
    for ((registry, repository), mut list) in by_repo {
        let retention = retention_of(registry, repository);
        if retention != Retention::default() {
            out.state
                .retention
                .insert(repo_key(registry, repository), retention);
        }
        if unresolved.contains(&(registry, repository)) {
            // Nothing is known to be unwanted here: keep it all, and keep the
            // clocks of what was already unwanted running.
            for (id, _) in &list {
                let key = id_key(id);
                if let Some(since) = previous.unwanted_since.get(&key) {
                    out.state.unwanted_since.insert(key, *since);
                }
            }
            continue;
        }
        let (keep, grace) = retention.resolve(policy);
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let present_desired = list
            .iter()
            .filter(|(id, _)| wanted_ids.contains(id))
            .count();
        let rollback_slots = if desired_repos.contains_key(&(registry, repository)) {
            keep.saturating_sub(present_desired)
        } else {
            // A repository no longer desired keeps nothing for rollback.
            0
        };
        let undesired = list
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| !wanted_ids.contains(id))
            .skip(rollback_slots);
        expire(undesired, grace, previous, now, &mut out);
    }
    // Desired repositories with nothing recorded yet still have their
    // retention remembered.
    for ((registry, repository), retention) in &desired_repos {
        if *retention != Retention::default() {
            out.state
                .retention
                .insert(repo_key(registry, repository), *retention);
        }
    }
    out
}

/// The retention of every desired repository, merged over its images.
fn desired_retention(wanted: &[Wanted]) -> BTreeMap<(&str, &str), Retention> {
    let mut desired: BTreeMap<(&str, &str), Retention> = BTreeMap::new();
    for w in wanted {
        let e = desired
            .entry((w.id.0.as_str(), w.id.1.as_str()))
            .or_default();
        *e = e.merge(w.retention);
    }
    desired
}

/// Removes each of `images` (unwanted, beyond the rollback slots) that has
/// been unwanted for `grace`, and marks the rest with when they became
/// unwanted.
fn expire<'i>(
    images: impl Iterator<Item = &'i ImageId>,
    grace: Duration,
    previous: &GcState,
    now: u64,
    out: &mut GcPlan,
) {
    for id in images {
        let key = id_key(id);
        let since = previous.unwanted_since.get(&key).copied().unwrap_or(now);
        let waited = now.saturating_sub(since);
        if waited >= grace.as_secs() {
            out.remove.push(id.clone());
        } else {
            out.state.unwanted_since.insert(key, since);
            let left = grace.as_secs() - waited;
            out.next_due = Some(out.next_due.map_or(left, |d| d.min(left)));
        }
    }
}

/// What a collection did, and the storage it leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Images whose records were removed.
    pub images_removed: Vec<ImageId>,
    /// Blobs deleted.
    pub blobs_removed: u64,
    /// Bytes freed (blobs and stale partials).
    pub bytes_freed: u64,
    /// Blobs left for the next run because a transfer held them or the
    /// records changed meanwhile.
    pub blobs_deferred: u64,
    /// When the first grace period still running ends (see [`GcPlan`]).
    pub next_due: Option<Duration>,
    /// Use after collection.
    pub usage: Usage,
    /// Capacity of the filesystem holding the store, bytes.
    pub capacity: Option<u64>,
    /// Free bytes on that filesystem.
    pub available: Option<u64>,
}

/// Applies retention to the store: removes the records of images past their
/// grace period, then every blob that no remaining record and no wanted image
/// needs, and partial downloads nothing needs that are older than the
/// agent's grace period. `policy` is the agent's default retention.
pub fn collect(
    store: &Store,
    wanted: &[Wanted],
    unresolved: &[RepoId],
    policy: &GcPolicy,
) -> Result<GcReport, StoreError> {
    let now = SystemTime::now();
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let state_path = store.root().join("gc-state.json");
    let previous: GcState = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let decided = plan(
        &store.records(),
        wanted,
        unresolved,
        &previous,
        policy,
        now_secs,
    );

    let gone: BTreeSet<ImageId> = decided.remove.iter().cloned().collect();
    let removed_records = store.remove_records(|r| {
        let root = r.parent.clone().unwrap_or_else(|| r.digest.clone());
        gone.contains(&(r.registry.clone(), r.repository.clone(), root))
    })?;
    store.write_file_atomic(
        "gc-state.json",
        &serde_json::to_vec_pretty(&decided.state).unwrap_or_default(),
    )?;

    // Blobs and partials are listed before the references are worked out. A
    // transfer stores an image's manifests before its blobs, so any blob
    // listed here whose image is wanted has its manifest in the store by the
    // time the references are read, and is found referenced.
    let blobs = store.list_blobs()?;
    let partials = list_partials(&store.root().join("partial"));
    let (generation, records) = store.records_at();
    let referenced = references(store, &records, wanted);

    let mut blobs_removed = 0;
    let mut bytes_freed = 0;
    let mut deferred = 0;
    for (digest, size, _) in blobs {
        if referenced.contains(&digest) {
            continue;
        }
        match store.remove_blob_unless_in_use(&digest, generation)? {
            Ok(()) => {
                blobs_removed += 1;
                bytes_freed += size;
            }
            Err(Kept::Pinned) => deferred += 1,
            Err(Kept::RecordsChanged) => {
                // Images were recorded meanwhile: decide again next time.
                tracing::debug!("Records changed during GC; the rest waits for the next run");
                deferred += 1;
                break;
            }
        }
    }
    // A partial nothing wants is kept for a while anyway, in case its image
    // comes back and the download can resume.
    let old_enough =
        |mtime: SystemTime| now.duration_since(mtime).unwrap_or_default() >= policy.grace_period;
    for (path, digest, len, mtime) in partials {
        if referenced.contains(&digest) || store.is_pinned(&digest) || !old_enough(mtime) {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            bytes_freed += len;
        }
    }
    if !removed_records.is_empty() || blobs_removed > 0 {
        tracing::info!(
            images = decided.remove.len(),
            blobs = blobs_removed,
            bytes = bytes_freed,
            "Garbage collected"
        );
    }
    report(store, &decided, blobs_removed, bytes_freed, deferred)
}

fn report(
    store: &Store,
    decided: &GcPlan,
    blobs_removed: u64,
    bytes_freed: u64,
    blobs_deferred: u64,
) -> Result<GcReport, StoreError> {
    let (capacity, available) = capacity(store.root());
    Ok(GcReport {
        images_removed: decided.remove.clone(),
        blobs_removed,
        bytes_freed,
        blobs_deferred,
        next_due: decided.next_due.map(Duration::from_secs),
        usage: store.usage()?,
        capacity,
        available,
    })
}

/// Every digest a recorded image or a wanted image (synced or not, as far as
/// its manifests are in the store) needs: manifests, configs, layers.
///
/// An image whose manifests cannot be read or parsed (only a damaged disk
/// does that: they were verified and walked when synced) keeps only what its
/// records name; the mirror cannot serve the rest of it either, and stopping
/// all collection for it would let the disk fill.
fn references(store: &Store, records: &[ManifestRecord], wanted: &[Wanted]) -> HashSet<String> {
    let mut referenced: HashSet<String> = HashSet::new();
    for r in records {
        referenced.insert(r.digest.clone());
    }
    // A referrer is walked as a root of its own: its blobs are named by no
    // image manifest.
    let recorded_roots = records
        .iter()
        .filter(|r| r.parent.is_none() || r.subject.is_some())
        .map(|r| (r.digest.as_str(), Some(r.media_type.as_str())));
    let wanted_roots = wanted
        .iter()
        .filter(|w| store.has_blob(&w.id.2))
        .map(|w| (w.id.2.as_str(), None));
    let mut walked: HashSet<&str> = HashSet::new();
    for (root, media_type) in recorded_roots.chain(wanted_roots) {
        if !walked.insert(root) {
            continue;
        }
        referenced.insert(root.to_string());
        match store.tree(root, media_type, &[]) {
            Ok(tree) => {
                referenced.extend(tree.manifests.into_iter().map(|m| m.digest));
                referenced.extend(tree.blobs.into_iter().map(|b| b.digest));
            }
            Err(e) => {
                tracing::warn!(manifest = %root, error = %e, "GC cannot read an image's manifests; only its recorded manifests are kept");
            }
        }
    }
    referenced
}

/// (path, digest, length, mtime) of each partial download.
fn list_partials(dir: &Path) -> Vec<(std::path::PathBuf, String, u64, SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            Some((
                e.path(),
                digest,
                meta.len(),
                meta.modified().unwrap_or(UNIX_EPOCH),
            ))
        })
        .collect()
}

/// (capacity, available) bytes of the filesystem holding `path`.
// The statvfs field types differ between platforms (u32 on some), so the casts
// stay even where they are no-ops.
#[allow(clippy::unnecessary_cast)]
pub fn capacity(path: &Path) -> (Option<u64>, Option<u64>) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let frag = s.fragment_size() as u64;
            (
                Some(s.blocks() as u64 * frag),
                Some(s.blocks_available() as u64 * frag),
            )
        }
        Err(_) => (None, None),
    }
}

#[cfg(test)]
mod tests;
