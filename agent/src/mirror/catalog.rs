//! What the mirror may serve, per repository name and upstream: the tags,
//! manifests and blobs that the synced images of that repository reference.
//!
//! The store keeps one copy of each blob by digest for every tenant. Serving
//! a digest because the store has it would let any node read any tenant's
//! content by guessing or learning a digest (`GET /v2/team-a/app/blobs/<a
//! digest of team-b's>`). The catalog is the scope: content is served under
//! a repository only when that repository's synced content, from the
//! upstream the request selects, references it. Everything else is answered
//! exactly as if it did not exist. Referrers follow the same rule: a
//! manifest naming a `subject` is listed in that subject's referrers only
//! under a repository whose content references the subject, and holds it.
//! Per-tenant pull tokens (a later step) narrow which (upstream, repository)
//! pairs a node may ask for; the catalog stays the one place that says what
//! each pair holds.

use std::collections::{BTreeMap, HashMap, HashSet};

use imgfleet_common::registry::ReferrerDescriptor;

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
    /// Per subject digest, the manifests held here that name it as their
    /// `subject` (by referrer digest, so each is listed once).
    referrers: HashMap<String, BTreeMap<String, ReferrerDescriptor>>,
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

    /// The referrers of `subject` held here, by digest; none unless this
    /// repository's content references the subject itself (the scope).
    pub fn referrers(&self, subject: &str) -> impl Iterator<Item = &ReferrerDescriptor> {
        self.referrers
            .get(subject)
            .filter(|_| self.references(subject))
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// Adds everything `root`'s tree holds (manifests, blobs), and `root`
    /// to its subject's referrers when it names one.
    fn add_tree(&mut self, store: &Store, r: &ManifestRecord) {
        match store.tree(&r.digest, Some(&r.media_type), &[]) {
            Ok(tree) => {
                for m in tree.manifests {
                    self.manifests.entry(m.digest).or_insert(ManifestInfo {
                        media_type: m.media_type,
                        size: m.size,
                    });
                }
                self.blobs.extend(tree.blobs.into_iter().map(|b| b.digest));
            }
            Err(e) => tracing::warn!(
                registry = %r.registry,
                repository = %r.repository,
                manifest = %r.digest,
                error = %e,
                "Cannot read a synced image's manifests; the mirror serves only what is recorded of it"
            ),
        }
        if let Ok(bytes) = store.read_blob(&r.digest)
            && let Some((subject, descriptor)) = referrer_of(&bytes, &r.digest, &r.media_type)
        {
            self.referrers
                .entry(subject)
                .or_default()
                .insert(descriptor.digest.clone(), descriptor);
        }
    }
}

/// When a manifest names a `subject`: that digest, and the manifest's
/// descriptor as the referrers API lists it (its `artifactType`, else its
/// config's media type for an image manifest, and its annotations). Pure.
pub fn referrer_of(
    bytes: &[u8],
    digest: &str,
    media_type: &str,
) -> Option<(String, ReferrerDescriptor)> {
    #[derive(serde::Deserialize)]
    struct Subject {
        digest: String,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        subject: Option<Subject>,
        #[serde(rename = "artifactType")]
        artifact_type: Option<String>,
        config: Option<Config>,
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    let doc: Doc = serde_json::from_slice(bytes).ok()?;
    let subject = doc.subject?.digest;
    let artifact_type = doc
        .artifact_type
        .or_else(|| doc.config.and_then(|c| c.media_type));
    Some((
        subject,
        ReferrerDescriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size: bytes.len() as u64,
            artifact_type,
            annotations: doc.annotations,
        },
    ))
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
            // Roots and referrers are walked; an index's children are in
            // its root's tree.
            if r.parent.is_none() || r.subject.is_some() {
                held.add_tree(store, r);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_referrers() {
        let check = |doc: &str, want: Option<(&str, Option<&str>, usize)>| {
            let got = referrer_of(doc.as_bytes(), "sha256:r", "m/t");
            let got = got.as_ref().map(|(s, d)| {
                assert_eq!(
                    (d.digest.as_str(), d.media_type.as_str()),
                    ("sha256:r", "m/t")
                );
                assert_eq!(d.size, doc.len() as u64);
                (s.as_str(), d.artifact_type.as_deref(), d.annotations.len())
            });
            assert_eq!(got, want, "{doc}");
        };
        // artifactType wins over the config's media type.
        check(
            r#"{"artifactType":"a/sbom","config":{"mediaType":"c/t"},"subject":{"digest":"sha256:s"},"annotations":{"k":"v"}}"#,
            Some(("sha256:s", Some("a/sbom"), 1)),
        );
        // Without it, an image manifest's config media type.
        check(
            r#"{"config":{"mediaType":"c/t"},"subject":{"digest":"sha256:s"}}"#,
            Some(("sha256:s", Some("c/t"), 0)),
        );
        // An index without artifactType has none.
        check(
            r#"{"manifests":[],"subject":{"digest":"sha256:s"}}"#,
            Some(("sha256:s", None, 0)),
        );
        // No subject, or not JSON: not a referrer.
        check(r#"{"config":{"mediaType":"c/t"}}"#, None);
        check("not json", None);
    }
}
