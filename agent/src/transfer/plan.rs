//! Pure planning over manifests: which child manifests of an index match the
//! requested platforms, which blobs an image manifest needs, the whole tree
//! of an image (indexes may nest, up to [`MAX_INDEX_DEPTH`]), and what a
//! transfer must fetch and record ([`image`]). No I/O: [`walk`] takes the
//! manifests it descends into from a function, and [`image`] from a map of
//! the manifests fetched so far.

use std::collections::HashMap;

use imgfleet_common::registry::{
    DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, sha256_hex,
};
use serde::Deserialize;

use crate::desired::DesiredImage;
use crate::store::ManifestRecord;

/// What kind of manifest a document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// An OCI index or Docker manifest list.
    Index,
    /// An OCI or Docker schema-2 image manifest.
    Image,
}

/// A blob an image needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes, from the manifest.
    pub size: u64,
}

/// A child manifest of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRef {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Media type named by the index.
    pub media_type: String,
    /// Size from the index.
    pub size: u64,
    /// `os/arch[/variant]`, when the index says.
    pub platform: Option<String>,
}

/// Why a manifest could not be planned. None is worth a retry: the same
/// bytes give the same answer.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A media type we do not handle (e.g. Docker schema 1).
    #[error("unsupported manifest media type {0:?}")]
    Unsupported(String),
    /// Not valid JSON of the expected shape.
    #[error("malformed manifest: {0}")]
    Json(#[source] serde_json::Error),
    /// A descriptor whose digest is not `sha256:<64 hex>`: it could change
    /// the meaning of the path or URL it is put in.
    #[error("malformed manifest: digest {0:?}: expected sha256:<64 hex>")]
    BadDigest(String),
    /// An image manifest that names no config.
    #[error("malformed manifest: image manifest without config")]
    NoConfig,
    /// A manifest that declares no media type where nothing else says it.
    #[error("malformed manifest: no mediaType")]
    NoMediaType,
    /// No child of the index matches the requested platforms.
    #[error("no manifest for platforms {wanted:?} in the index (it has {available:?})")]
    NoMatchingPlatform {
        /// What was asked for.
        wanted: Vec<String>,
        /// What the index offers.
        available: Vec<String>,
    },
    /// Indexes nested deeper than [`MAX_INDEX_DEPTH`].
    #[error("index {digest} is nested {depth} levels deep; at most {MAX_INDEX_DEPTH} are accepted")]
    TooDeep {
        /// The index that is too deep.
        digest: String,
        /// Its depth (the root is 0).
        depth: usize,
    },
    /// More manifests in one image than [`MAX_MANIFESTS`].
    #[error("the image names more than {MAX_MANIFESTS} manifests")]
    TooManyManifests,
    /// A manifest whose length is not what the index that names it says.
    #[error("manifest {digest} is {actual} bytes, but its index says {expected}")]
    SizeMismatch {
        /// The manifest.
        digest: String,
        /// The size in the index.
        expected: u64,
        /// Its length.
        actual: u64,
    },
}

/// A manifest of an image's tree that could not be planned: which one, and why.
#[derive(Debug, thiserror::Error)]
#[error("manifest {digest}: {source}")]
pub struct WalkError {
    /// The manifest the problem is in (the root for a tree that is too
    /// large, the index for a child of the wrong size).
    pub digest: String,
    /// What was wrong.
    #[source]
    pub source: PlanError,
}

impl WalkError {
    fn at(digest: &str) -> impl FnOnce(PlanError) -> WalkError + use<> {
        let digest = digest.to_string();
        move |source| WalkError { digest, source }
    }
}

/// How deep indexes may nest below the root: the root index is depth 0, an
/// index it names depth 1, and so on. The image spec allows nesting and sets
/// no limit; this one keeps a hostile registry from sending us down forever.
pub const MAX_INDEX_DEPTH: usize = 4;

/// The most manifests (indexes and image manifests) one image may consist of.
pub const MAX_MANIFESTS: usize = 1024;

/// Classifies a media type.
pub fn kind_of(media_type: &str) -> Result<ManifestKind, PlanError> {
    match media_type {
        OCI_INDEX | DOCKER_LIST => Ok(ManifestKind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(ManifestKind::Image),
        other => Err(PlanError::Unsupported(other.to_string())),
    }
}

#[derive(Deserialize)]
struct Doc {
    #[serde(default)]
    manifests: Vec<DescDoc>,
    config: Option<DescDoc>,
    #[serde(default)]
    layers: Vec<DescDoc>,
}

#[derive(Deserialize)]
struct DescDoc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    platform: Option<PlatformDoc>,
    #[serde(default)]
    urls: Vec<String>,
}

#[derive(Deserialize)]
struct PlatformDoc {
    os: String,
    architecture: String,
    variant: Option<String>,
}

fn check_digest(d: &str) -> Result<(), PlanError> {
    sha256_hex(d)
        .map(|_| ())
        .ok_or_else(|| PlanError::BadDigest(d.to_string()))
}

/// The children of an index that match `platforms` (all when empty).
/// Nested indexes are always taken: their own children are chosen in turn.
/// Fails when nothing matches at all.
pub fn select_children(bytes: &[u8], platforms: &[String]) -> Result<Vec<ChildRef>, PlanError> {
    let (chosen, available) = choose_children(bytes, platforms)?;
    if chosen.is_empty() && !platforms.is_empty() {
        return Err(PlanError::NoMatchingPlatform {
            wanted: platforms.to_vec(),
            available,
        });
    }
    Ok(chosen)
}

/// Whether a child descriptor names an index (by its declared media type).
pub fn is_index(child: &ChildRef) -> bool {
    matches!(kind_of(&child.media_type), Ok(ManifestKind::Index))
}

/// The children of an index to take for `platforms`: every nested index and
/// the image manifests whose platform matches (all when `platforms` is
/// empty). Also returns the platforms the index offers, for a message when
/// nothing matches.
pub fn choose_children(
    bytes: &[u8],
    platforms: &[String],
) -> Result<(Vec<ChildRef>, Vec<String>), PlanError> {
    let doc: Doc = serde_json::from_slice(bytes).map_err(PlanError::Json)?;
    let mut all = Vec::new();
    for m in doc.manifests {
        check_digest(&m.digest)?;
        let platform = m
            .platform
            .map(|p| match p.variant.filter(|v| !v.is_empty()) {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            });
        all.push(ChildRef {
            digest: m.digest,
            media_type: m.media_type,
            size: m.size,
            platform,
        });
    }
    let available: Vec<String> = all.iter().filter_map(|c| c.platform.clone()).collect();
    if platforms.is_empty() {
        return Ok((all, available));
    }
    let chosen: Vec<ChildRef> = all
        .into_iter()
        .filter(|c| {
            is_index(c)
                || c.platform
                    .as_deref()
                    .is_some_and(|p| platforms.iter().any(|w| platform_matches(w, p)))
        })
        .collect();
    Ok((chosen, available))
}

/// Whether a wanted `os/arch[/variant]` matches an index entry's platform. A
/// wanted platform without a variant matches every variant; `arm64` and
/// `arm64/v8` are the same thing.
pub fn platform_matches(wanted: &str, have: &str) -> bool {
    let norm = |s: &str| {
        let mut parts: Vec<String> = s.split('/').map(str::to_ascii_lowercase).collect();
        if parts.len() == 3 && parts[1] == "arm64" && parts[2] == "v8" {
            parts.truncate(2);
        }
        parts
    };
    let w = norm(wanted);
    let h = norm(have);
    if w.len() < 2 || h.len() < 2 {
        return false;
    }
    w[0] == h[0] && w[1] == h[1] && (w.len() == 2 || h.get(2) == w.get(2))
}

/// The blobs (config first, then layers) an image manifest needs. Foreign
/// layers, which live outside the registry (`urls`), are left out.
pub fn image_blobs(bytes: &[u8]) -> Result<Vec<BlobRef>, PlanError> {
    let doc: Doc = serde_json::from_slice(bytes).map_err(PlanError::Json)?;
    let config = doc.config.ok_or(PlanError::NoConfig)?;
    let mut out = Vec::new();
    for d in std::iter::once(config).chain(doc.layers) {
        check_digest(&d.digest)?;
        if !d.urls.is_empty() && d.media_type.contains("foreign") {
            continue;
        }
        if !out.iter().any(|b: &BlobRef| b.digest == d.digest) {
            out.push(BlobRef {
                digest: d.digest,
                size: d.size,
            });
        }
    }
    Ok(out)
}

/// One manifest of an image's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its length in bytes.
    pub size: u64,
}

/// Everything an image consists of, as far as [`walk`] could see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// Every manifest, each once, children before the indexes that name
    /// them; the root is last.
    pub manifests: Vec<Node>,
    /// The blobs of every image manifest, each once.
    pub blobs: Vec<BlobRef>,
    /// Children that `load` did not have.
    pub missing: Vec<ChildRef>,
    /// The platforms the walked indexes offer, for a message when none of
    /// them is the one asked for.
    pub offered: Vec<String>,
}

impl Tree {
    /// How many image manifests (as opposed to indexes) the tree holds.
    fn image_manifests(&self) -> usize {
        self.manifests
            .iter()
            .filter(|n| matches!(kind_of(&n.media_type), Ok(ManifestKind::Image)))
            .count()
    }
}

/// What [`walk`] reads children with: their bytes and media type, if held.
pub type Loader<'a> = dyn FnMut(&ChildRef) -> Option<(Vec<u8>, String)> + 'a;

/// Walks an image from its root manifest: the children `platforms` selects
/// (all when empty), nested indexes up to [`MAX_INDEX_DEPTH`], and the blobs
/// of every image manifest. `load` gives a child's bytes and media type, or
/// `None` when it does not have the child (the walk goes on without it).
/// An error names the manifest it is in.
pub fn walk(
    root: Node,
    root_bytes: &[u8],
    platforms: &[String],
    mut load: impl FnMut(&ChildRef) -> Option<(Vec<u8>, String)>,
) -> Result<Tree, WalkError> {
    let mut walker = Walker {
        root: root.digest.clone(),
        platforms,
        load: &mut load,
        tree: Tree::default(),
        seen: std::collections::HashSet::from([root.digest.clone()]),
    };
    walker.visit(root, root_bytes, 0)?;
    Ok(walker.tree)
}

/// The state of one [`walk`].
struct Walker<'w, 'l> {
    /// The root's digest, which a tree that is too large is blamed on.
    root: String,
    platforms: &'w [String],
    load: &'w mut Loader<'l>,
    tree: Tree,
    /// Digests met so far: the same manifest named twice (or by two
    /// indexes) is one node.
    seen: std::collections::HashSet<String>,
}

impl Walker<'_, '_> {
    fn visit(&mut self, node: Node, bytes: &[u8], depth: usize) -> Result<(), WalkError> {
        let here = WalkError::at(&node.digest);
        match kind_of(&node.media_type).map_err(WalkError::at(&node.digest))? {
            ManifestKind::Image => {
                for b in image_blobs(bytes).map_err(here)? {
                    if !self.tree.blobs.iter().any(|x| x.digest == b.digest) {
                        self.tree.blobs.push(b);
                    }
                }
            }
            ManifestKind::Index => {
                if depth > MAX_INDEX_DEPTH {
                    return Err(here(PlanError::TooDeep {
                        digest: node.digest,
                        depth,
                    }));
                }
                let (children, offered) =
                    choose_children(bytes, self.platforms).map_err(WalkError::at(&node.digest))?;
                self.tree.offered.extend(offered);
                for child in children {
                    self.child(&node, child, depth)?;
                }
            }
        }
        self.tree.manifests.push(node);
        Ok(())
    }

    /// Loads and visits one child of `parent`, unless it was met already.
    fn child(&mut self, parent: &Node, child: ChildRef, depth: usize) -> Result<(), WalkError> {
        if !self.seen.insert(child.digest.clone()) {
            return Ok(());
        }
        if self.seen.len() > MAX_MANIFESTS {
            return Err(WalkError::at(&self.root)(PlanError::TooManyManifests));
        }
        let Some((child_bytes, media_type)) = (self.load)(&child) else {
            self.tree.missing.push(child);
            return Ok(());
        };
        let size = child_bytes.len() as u64;
        if size != child.size {
            return Err(WalkError::at(&parent.digest)(PlanError::SizeMismatch {
                digest: child.digest,
                expected: child.size,
                actual: size,
            }));
        }
        let node = Node {
            digest: child.digest,
            media_type,
            size,
        };
        self.visit(node, &child_bytes, depth + 1)
    }
}

/// A manifest's bytes and media type.
pub type Document = (Vec<u8>, String);

/// What one image needs, as far as its manifests are known: what to fetch
/// and what to record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImagePlan {
    /// Child manifests the image names that were not given: fetch them and
    /// plan again. While any is missing, `blobs` and `records` are partial.
    pub missing: Vec<ChildRef>,
    /// Every blob the image's manifests name, each once, with the size its
    /// descriptor states.
    pub blobs: Vec<BlobRef>,
    /// What makes the image servable once every blob is present: each
    /// manifest below the root (naming the root as its parent, so that GC
    /// removes the whole tree with it), the root, and the root under each tag.
    pub records: Vec<ManifestRecord>,
}

/// Plans one image over its manifests: `root` is the root manifest, `held`
/// every child fetched so far by digest, `now` the time the records carry.
/// Pure; the transfer fetches what [`ImagePlan::missing`] names and calls
/// it again until nothing is missing.
pub fn image(
    image: &DesiredImage,
    root: &Document,
    held: &HashMap<String, Document>,
    now: u64,
) -> Result<ImagePlan, WalkError> {
    let (root_bytes, root_type) = root;
    let root = Node {
        digest: image.digest.clone(),
        media_type: root_type.clone(),
        size: root_bytes.len() as u64,
    };
    let tree = walk(root.clone(), root_bytes, &image.platforms, |child| {
        held.get(&child.digest).cloned()
    })?;
    if tree.missing.is_empty() && tree.image_manifests() == 0 && !image.platforms.is_empty() {
        let mut available = tree.offered;
        available.sort();
        available.dedup();
        return Err(WalkError::at(&image.digest)(
            PlanError::NoMatchingPlatform {
                wanted: image.platforms.clone(),
                available,
            },
        ));
    }
    let record = |node: &Node, tag: Option<&String>, parent: Option<&String>| ManifestRecord {
        registry: image.registry.clone(),
        repository: image.repository.clone(),
        tag: tag.cloned(),
        digest: node.digest.clone(),
        media_type: node.media_type.clone(),
        size: node.size,
        parent: parent.cloned(),
        subject: None,
        recorded_at: now,
    };
    let mut records = Vec::with_capacity(tree.manifests.len() + image.tags.len());
    // The walk lists the root last, after every manifest below it.
    let below_root = &tree.manifests[..tree.manifests.len().saturating_sub(1)];
    records.extend(
        below_root
            .iter()
            .map(|child| record(child, None, Some(&image.digest))),
    );
    records.push(record(&root, None, None));
    records.extend(image.tags.iter().map(|t| record(&root, Some(t), None)));
    Ok(ImagePlan {
        missing: tree.missing,
        blobs: tree.blobs,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn platforms() {
        let check =
            |w: &str, h: &str, want: bool| assert_eq!(platform_matches(w, h), want, "{w} vs {h}");
        check("linux/amd64", "linux/amd64", true);
        check("linux/arm64", "linux/arm64/v8", true);
        check("linux/arm64/v8", "linux/arm64", true);
        check("linux/arm/v7", "linux/arm/v6", false);
        check("linux/arm", "linux/arm/v6", true);
        check("linux/amd64", "windows/amd64", false);
        check("linux", "linux/amd64", false);
    }

    #[test]
    fn selects_children() {
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d('a'), "size": 10, "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": OCI_MANIFEST, "digest": d('b'), "size": 11, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": d('c'), "size": 12}
            ]
        });
        let bytes = serde_json::to_vec(&index).unwrap();
        assert_eq!(select_children(&bytes, &[]).unwrap().len(), 3);
        let arm = select_children(&bytes, &["linux/arm64".into()]).unwrap();
        assert_eq!(arm.len(), 1);
        assert_eq!(arm[0].digest, d('b'));
        assert!(matches!(
            select_children(&bytes, &["linux/s390x".into()]),
            Err(PlanError::NoMatchingPlatform { .. })
        ));
    }

    #[test]
    fn lists_blobs_and_rejects_bad_digests() {
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d('1'), "size": 5},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('2'), "size": 7},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('2'), "size": 7},
                {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": d('3'), "size": 9, "urls": ["https://x"]}
            ]
        });
        let blobs = image_blobs(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(
            blobs,
            vec![
                BlobRef {
                    digest: d('1'),
                    size: 5
                },
                BlobRef {
                    digest: d('2'),
                    size: 7
                }
            ]
        );
        let bad =
            serde_json::json!({"config": {"digest": "sha256:../../x", "size": 1}, "layers": []});
        assert!(matches!(
            image_blobs(&serde_json::to_vec(&bad).unwrap()),
            Err(PlanError::BadDigest(_))
        ));
        assert!(matches!(
            kind_of("application/vnd.docker.distribution.manifest.v1+prettyjws"),
            Err(PlanError::Unsupported(_))
        ));
    }

    /// An index document naming `children` as (media type, digest, size, platform).
    /// (media type, digest, size, platform) of one index entry.
    type Entry<'a> = (&'a str, String, u64, Option<(&'a str, &'a str)>);

    fn index(children: &[Entry<'_>]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = children
            .iter()
            .map(|(mt, d, size, p)| {
                let mut v = serde_json::json!({"mediaType": mt, "digest": d, "size": size});
                if let Some((os, arch)) = p {
                    v["platform"] = serde_json::json!({"os": os, "architecture": arch});
                }
                v
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})).unwrap()
    }

    fn image(config: char, layer: char) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d(config), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d(layer), "size": 3}]
        }))
        .unwrap()
    }

    fn digest_of(bytes: &[u8]) -> String {
        imgfleet_common::registry::sha256_digest(bytes)
    }

    /// Image manifests for linux/amd64 and linux/arm64, and an index of both.
    fn two_platforms() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let amd = image('1', '2');
        let arm = image('3', '4');
        let entry = |m: &Vec<u8>, arch| {
            (
                OCI_MANIFEST,
                digest_of(m),
                m.len() as u64,
                Some(("linux", arch)),
            )
        };
        let idx = index(&[entry(&amd, "amd64"), entry(&arm, "arm64")]);
        (amd, arm, idx)
    }

    #[test]
    fn walks_nested_indexes_children_first() {
        let (amd, arm, inner) = two_platforms();
        let outer = index(&[(OCI_INDEX, digest_of(&inner), inner.len() as u64, None)]);
        let docs: std::collections::HashMap<String, Vec<u8>> = [&amd, &arm, &inner]
            .into_iter()
            .map(|b| (digest_of(b), b.clone()))
            .collect();
        let load = |c: &ChildRef| {
            docs.get(&c.digest)
                .map(|b| (b.clone(), c.media_type.clone()))
        };
        let root = Node {
            digest: digest_of(&outer),
            media_type: OCI_INDEX.into(),
            size: outer.len() as u64,
        };
        let tree = walk(root.clone(), &outer, &[], load).unwrap();
        let order: Vec<&str> = tree.manifests.iter().map(|n| n.digest.as_str()).collect();
        assert_eq!(
            order,
            vec![
                digest_of(&amd).as_str(),
                digest_of(&arm).as_str(),
                digest_of(&inner).as_str(),
                root.digest.as_str()
            ]
        );
        assert_eq!(tree.blobs.len(), 4);
        // A platform filter applies inside the nested index.
        let arm_only = walk(root.clone(), &outer, &["linux/arm64".into()], load).unwrap();
        assert_eq!(arm_only.manifests.len(), 3);
        assert_eq!(
            arm_only
                .blobs
                .iter()
                .map(|b| b.digest.clone())
                .collect::<Vec<_>>(),
            vec![d('3'), d('4')]
        );
        // What the loader lacks is listed, not fatal.
        let partial = walk(root.clone(), &outer, &[], |c: &ChildRef| {
            (c.digest != digest_of(&arm)).then(|| load(c)).flatten()
        })
        .unwrap();
        assert_eq!(partial.missing.len(), 1);
        // A manifest whose size is not what its index says is refused.
        let lying = index(&[(OCI_MANIFEST, digest_of(&amd), amd.len() as u64 + 1, None)]);
        let lying_root = Node {
            digest: digest_of(&lying),
            media_type: OCI_INDEX.into(),
            size: lying.len() as u64,
        };
        assert!(matches!(
            walk(lying_root, &lying, &[], load),
            Err(WalkError {
                source: PlanError::SizeMismatch { .. },
                ..
            })
        ));
    }

    #[test]
    fn refuses_indexes_nested_too_deep() {
        // A chain of indexes, each naming the next, ending in an image.
        let leaf = image('5', '6');
        let mut docs = std::collections::HashMap::new();
        docs.insert(digest_of(&leaf), leaf.clone());
        let mut top = (OCI_MANIFEST, leaf.clone());
        for _ in 0..=MAX_INDEX_DEPTH + 1 {
            let next = index(&[(top.0, digest_of(&top.1), top.1.len() as u64, None)]);
            docs.insert(digest_of(&next), next.clone());
            top = (OCI_INDEX, next);
        }
        let load = |c: &ChildRef| {
            docs.get(&c.digest)
                .map(|b| (b.clone(), c.media_type.clone()))
        };
        let root = Node {
            digest: digest_of(&top.1),
            media_type: OCI_INDEX.into(),
            size: top.1.len() as u64,
        };
        assert!(matches!(
            walk(root, &top.1, &[], load),
            Err(WalkError {
                source: PlanError::TooDeep { .. },
                ..
            })
        ));
    }

    fn desired(digest: &str, tags: &[&str], platforms: &[&str]) -> DesiredImage {
        DesiredImage {
            key: format!("default/app@{digest}"),
            source: ("default".into(), "app".into()),
            registry_key: "default/lab".into(),
            registry: "r.example".into(),
            repository: "demo/app".into(),
            digest: digest.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            platforms: platforms.iter().map(|p| p.to_string()).collect(),
            keep_versions: 0,
            grace_period_seconds: 0,
            trace_context: String::new(),
            verify_keys: Vec::new(),
        }
    }

    /// (digest, tag, parent) of each record a plan makes.
    fn recorded(plan: &ImagePlan) -> Vec<(String, Option<String>, Option<String>)> {
        plan.records
            .iter()
            .map(|r| (r.digest.clone(), r.tag.clone(), r.parent.clone()))
            .collect()
    }

    #[test]
    fn plans_what_to_fetch_and_record() {
        let (amd, _, idx) = two_platforms();
        let (amd_d, idx_d) = (digest_of(&amd), digest_of(&idx));
        let root = (idx.clone(), OCI_INDEX.to_string());
        let held = |docs: &[&Vec<u8>]| -> HashMap<String, Document> {
            docs.iter()
                .map(|b| (digest_of(b), ((*b).clone(), OCI_MANIFEST.to_string())))
                .collect()
        };

        // Nothing below the root is held yet: the children to fetch, no blobs.
        let first = super::image(
            &desired(&idx_d, &["v1"], &["linux/amd64"]),
            &root,
            &held(&[]),
            7,
        )
        .unwrap();
        assert_eq!(
            first.missing.iter().map(|c| &c.digest).collect::<Vec<_>>(),
            [&amd_d]
        );
        assert!(first.blobs.is_empty());

        // With the child: its blobs, the child under the root, the root, its tag.
        let done = super::image(
            &desired(&idx_d, &["v1"], &["linux/amd64"]),
            &root,
            &held(&[&amd]),
            7,
        )
        .unwrap();
        assert!(done.missing.is_empty());
        assert_eq!(
            done.blobs
                .iter()
                .map(|b| b.digest.clone())
                .collect::<Vec<_>>(),
            [d('1'), d('2')]
        );
        assert_eq!(
            recorded(&done),
            [
                (amd_d.clone(), None, Some(idx_d.clone())),
                (idx_d.clone(), None, None),
                (idx_d.clone(), Some("v1".to_string()), None),
            ]
        );
        assert!(
            done.records
                .iter()
                .all(|r| r.recorded_at == 7 && r.repository == "demo/app")
        );

        // An image manifest as the root: no child, its blobs, root and tags.
        let single = (amd.clone(), OCI_MANIFEST.to_string());
        let plain = super::image(
            &desired(&amd_d, &["a", "b"], &["linux/s390x"]),
            &single,
            &held(&[]),
            7,
        )
        .unwrap();
        assert_eq!(recorded(&plain).len(), 3);
        assert_eq!(plain.blobs.len(), 2);

        // A platform no index entry offers fails, naming what is offered.
        let err = super::image(
            &desired(&idx_d, &[], &["linux/s390x"]),
            &root,
            &held(&[]),
            7,
        )
        .unwrap_err();
        assert_eq!(err.digest, idx_d);
        match err.source {
            PlanError::NoMatchingPlatform { available, .. } => {
                assert_eq!(available, ["linux/amd64", "linux/arm64"])
            }
            other => panic!("expected NoMatchingPlatform, got {other}"),
        }
    }
}
