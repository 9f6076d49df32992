//! What the mirror may serve, per repository name and upstream: the tags,
//! manifests and blobs that the synced images of that repository reference.
//!
//! The store keeps one copy of each blob by digest for every tenant. Serving
//! a digest because the store has it would let any node read any tenant's
//! content by guessing or learning a digest (`GET /v2/team-a/app/blobs/<a
//! digest of team-b's>`). The catalog is the scope: content is served under
//! a repository only when that repository's synced content, from the
//! upstream the request selects, references it. Everything else is answered
//! exactly as if it did not exist. Per-tenant pull tokens (a later step)
//! narrow which (upstream, repository) pairs a node may ask for; the catalog
//! stays the one place that says what each pair holds.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::store::{ManifestRecord, Store};

/// A manifest the mirror can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    /// Its media type (Content-Type).
    pub media_type: String,
    /// Its length in bytes.
    pub size: u64,
}

/// One repository name as held from one upstream registry.
#[derive(Debug, Default)]
pub struct Held {
    /// The upstream registry host.
    pub registry: String,
    /// Tag to manifest digest.
    tags: BTreeMap<String, String>,
    /// Every manifest of its synced images (roots, nested indexes, platform
    /// manifests).
    manifests: HashMap<String, ManifestInfo>,
    /// Every config and layer its synced image manifests name.
    blobs: HashSet<String>,
}

impl Held {
    /// The manifest a tag names.
    pub fn tag(&self, tag: &str) -> Option<&str> {
        self.tags.get(tag).map(String::as_str)
    }

    /// The tags, in lexical (byte) order.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.tags.keys().map(String::as_str)
    }

    /// A manifest of this repository, by digest.
    pub fn manifest(&self, digest: &str) -> Option<&ManifestInfo> {
        self.manifests.get(digest)
    }

    /// Whether this repository's content references a blob (or manifest) by
    /// this digest.
    pub fn references(&self, digest: &str) -> bool {
        self.blobs.contains(digest) || self.manifests.contains_key(digest)
    }
}

/// Everything the mirror serves, by repository name.
#[derive(Debug, Default)]
pub struct Catalog {
    repos: HashMap<String, Vec<Held>>,
}

impl Catalog {
    /// Builds the catalog from the store's records, reading the manifests of
    /// each synced image to find what it references.
    pub fn build(store: &Store, records: &[ManifestRecord]) -> Catalog {
        let mut by_repo: BTreeMap<(&str, &str), Held> = BTreeMap::new();
        for r in records {
            let held = by_repo
                .entry((r.registry.as_str(), r.repository.as_str()))
                .or_insert_with(|| Held {
                    registry: r.registry.clone(),
                    ..Held::default()
                });
            if let Some(t) = &r.tag {
                held.tags.insert(t.clone(), r.digest.clone());
            }
            held.manifests.insert(
                r.digest.clone(),
                ManifestInfo {
                    media_type: r.media_type.clone(),
                    size: r.size,
                },
            );
            if r.parent.is_some() {
                continue;
            }
            match store.tree(&r.digest, Some(&r.media_type), &[]) {
                Ok(tree) => {
                    for m in tree.manifests {
                        held.manifests.entry(m.digest).or_insert(ManifestInfo {
                            media_type: m.media_type,
                            size: m.size,
                        });
                    }
                    held.blobs.extend(tree.blobs.into_iter().map(|b| b.digest));
                }
                Err(e) => tracing::warn!(
                    registry = %r.registry,
                    repository = %r.repository,
                    manifest = %r.digest,
                    error = %e,
                    "Cannot read a synced image's manifests; the mirror serves only what is recorded of it"
                ),
            }
        }
        let mut repos: HashMap<String, Vec<Held>> = HashMap::new();
        for ((_, repository), held) in by_repo {
            repos.entry(repository.to_string()).or_default().push(held);
        }
        Catalog { repos }
    }

    /// The upstreams a repository name is held from, sorted by registry.
    pub fn holders(&self, repository: &str) -> &[Held] {
        self.repos.get(repository).map_or(&[], Vec::as_slice)
    }
}
