//! Retention and garbage collection of the content store.
//!
//! Deciding is pure ([`plan`]): which recorded images are no longer wanted,
//! given the desired set, the last N versions kept per repository, and how long
//! each image has been unwanted. Acting ([`collect`]) removes their records in
//! one atomic write, then deletes blobs that no kept manifest references and
//! that are older than the grace period (so a blob committed by a transfer
//! whose image is not recorded yet is never taken).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::{ManifestRecord, Store, StoreError, Usage};
use crate::transfer::plan;

/// Retention settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPolicy {
    /// How long content stays after it stops being desired.
    pub grace_period: Duration,
    /// Versions (image digests) kept per still-desired repository besides the
    /// desired ones, newest first, for rollback.
    pub keep_versions: usize,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            grace_period: Duration::from_secs(24 * 3600),
            keep_versions: 1,
        }
    }
}

/// An image root: (registry, repository, digest).
pub type ImageId = (String, String, String);

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcPlan {
    /// Images whose records go now.
    pub remove: Vec<ImageId>,
    /// Unwanted images still in their grace period, with the unix second they
    /// became unwanted; persisted between runs.
    pub unwanted_since: BTreeMap<String, u64>,
}

fn id_key(id: &ImageId) -> String {
    format!("{}/{}@{}", id.0, id.1, id.2)
}

/// Decides which recorded images to remove. `desired` are the images wanted
/// now; `previous` the unwanted-since marks of the last run; `now` unix seconds.
pub fn plan(
    records: &[ManifestRecord],
    desired: &[ImageId],
    previous: &BTreeMap<String, u64>,
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
    let desired_set: BTreeSet<&ImageId> = desired.iter().collect();
    let desired_repos: BTreeSet<(&str, &str)> = desired
        .iter()
        .map(|(g, r, _)| (g.as_str(), r.as_str()))
        .collect();
    // Rollback versions: per desired repository, the newest N undesired roots.
    let mut by_repo: BTreeMap<(&str, &str), Vec<(&ImageId, u64)>> = BTreeMap::new();
    for (id, t) in &roots {
        if !desired_set.contains(id) {
            by_repo.entry((&id.0, &id.1)).or_default().push((id, *t));
        }
    }
    let mut kept_for_rollback: BTreeSet<&ImageId> = BTreeSet::new();
    for (repo, mut list) in by_repo {
        if desired_repos.contains(&repo) {
            list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            kept_for_rollback.extend(list.iter().take(policy.keep_versions).map(|(id, _)| *id));
        }
    }
    let mut out = GcPlan::default();
    for id in roots.keys() {
        if desired_set.contains(id) || kept_for_rollback.contains(id) {
            continue;
        }
        let key = id_key(id);
        let since = previous.get(&key).copied().unwrap_or(now);
        if now.saturating_sub(since) >= policy.grace_period.as_secs() {
            out.remove.push(id.clone());
        } else {
            out.unwanted_since.insert(key, since);
        }
    }
    out
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
    /// Use after collection.
    pub usage: Usage,
    /// Capacity of the filesystem holding the store, bytes.
    pub capacity: Option<u64>,
    /// Free bytes on that filesystem.
    pub available: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct GcState {
    unwanted_since: BTreeMap<String, u64>,
}

/// Applies the policy to the store: removes unwanted records past their grace
/// period, then unreferenced blobs and stale partials older than the grace.
pub fn collect(
    store: &Store,
    desired: &[ImageId],
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
    let records = store.records();
    let decided = plan(
        &records,
        desired,
        &previous.unwanted_since,
        policy,
        now_secs,
    );

    let gone: BTreeSet<ImageId> = decided.remove.iter().cloned().collect();
    let removed_records = store.remove_records(|r| {
        let root = r.parent.clone().unwrap_or_else(|| r.digest.clone());
        gone.contains(&(r.registry.clone(), r.repository.clone(), root))
    })?;
    let state = GcState {
        unwanted_since: decided.unwanted_since,
    };
    store.write_file_atomic(
        "gc-state.json",
        &serde_json::to_vec_pretty(&state).unwrap_or_default(),
    )?;

    // Every blob a kept manifest needs: the manifests themselves, their
    // children, configs and layers.
    let mut referenced: BTreeSet<String> = BTreeSet::new();
    for r in store.records() {
        referenced.insert(r.digest.clone());
        if let Ok(bytes) = store.read_blob(&r.digest) {
            match plan::kind_of(&r.media_type) {
                Ok(plan::ManifestKind::Image) => {
                    if let Ok(blobs) = plan::image_blobs(&bytes) {
                        referenced.extend(blobs.into_iter().map(|b| b.digest));
                    }
                }
                Ok(plan::ManifestKind::Index) => {
                    if let Ok(children) = plan::select_children(&bytes, &[]) {
                        referenced.extend(children.into_iter().map(|c| c.digest));
                    }
                }
                Err(_) => {}
            }
        }
    }
    let old_enough =
        |mtime: SystemTime| now.duration_since(mtime).unwrap_or_default() >= policy.grace_period;
    let mut blobs_removed = 0;
    let mut bytes_freed = 0;
    for (digest, size, mtime) in store.list_blobs()? {
        if !referenced.contains(&digest) && old_enough(mtime) {
            store.remove_blob(&digest)?;
            blobs_removed += 1;
            bytes_freed += size;
        }
    }
    bytes_freed += remove_stale_partials(&store.root().join("partial"), &old_enough);
    let (capacity, available) = capacity(store.root());
    if !removed_records.is_empty() || blobs_removed > 0 {
        tracing::info!(
            images = decided.remove.len(),
            blobs = blobs_removed,
            bytes = bytes_freed,
            "Garbage collected"
        );
    }
    Ok(GcReport {
        images_removed: decided.remove,
        blobs_removed,
        bytes_freed,
        usage: store.usage()?,
        capacity,
        available,
    })
}

fn remove_stale_partials(dir: &Path, old_enough: &dyn Fn(SystemTime) -> bool) -> u64 {
    let mut freed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if old_enough(meta.modified().unwrap_or(UNIX_EPOCH))
            && std::fs::remove_file(e.path()).is_ok()
        {
            freed += meta.len();
        }
    }
    freed
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
mod tests {
    use super::*;

    fn rec(repo: &str, tag: Option<&str>, digest: char, at: u64) -> ManifestRecord {
        ManifestRecord {
            registry: "r".into(),
            repository: repo.into(),
            tag: tag.map(str::to_string),
            digest: format!("sha256:{}", digest.to_string().repeat(64)),
            media_type: imgfleet_common::registry::OCI_MANIFEST.into(),
            size: 1,
            parent: None,
            recorded_at: at,
        }
    }

    fn id(repo: &str, digest: char) -> ImageId {
        (
            "r".into(),
            repo.into(),
            format!("sha256:{}", digest.to_string().repeat(64)),
        )
    }

    #[test]
    fn plans_retention() {
        let policy = GcPolicy {
            grace_period: Duration::from_secs(100),
            keep_versions: 1,
        };
        let records = vec![
            rec("app", Some("v1"), 'a', 10),
            rec("app", Some("v2"), 'b', 20),
            rec("app", Some("v3"), 'c', 30),
            rec("gone", Some("v1"), 'd', 10),
        ];
        let desired = vec![id("app", 'c')];
        // First run: b kept for rollback; a and d become unwanted, not removed yet.
        let p = plan(&records, &desired, &BTreeMap::new(), &policy, 1000);
        assert!(p.remove.is_empty());
        assert_eq!(p.unwanted_since.len(), 2);
        // Within the grace period: still nothing.
        let p2 = plan(&records, &desired, &p.unwanted_since, &policy, 1050);
        assert!(p2.remove.is_empty());
        // After it: a and d go; b stays (rollback), c stays (desired).
        let p3 = plan(&records, &desired, &p2.unwanted_since, &policy, 1100);
        assert_eq!(p3.remove, vec![id("app", 'a'), id("gone", 'd')]);
        // Desired again before the grace ends: the mark is dropped.
        let p4 = plan(
            &records,
            &[id("app", 'c'), id("app", 'a'), id("gone", 'd')],
            &p.unwanted_since,
            &policy,
            1100,
        );
        assert!(p4.remove.is_empty() && p4.unwanted_since.is_empty());
        // keep_versions 0: b goes too.
        let none = GcPolicy {
            keep_versions: 0,
            ..policy
        };
        let p5 = plan(&records, &desired, &BTreeMap::new(), &none, 1000);
        assert_eq!(p5.unwanted_since.len(), 3);
    }
}
