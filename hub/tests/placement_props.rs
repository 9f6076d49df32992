//! Property tests of placement over random fleets: the output does not depend
//! on input order, diff/apply round-trip, diff of a set with itself is empty,
//! a cluster never receives a repository from outside its tenants, a
//! repository without placement reaches exactly the clusters that admit its
//! namespace, and a repository that reaches no cluster is reported.

use std::collections::{BTreeMap, BTreeSet};

use imgfleet_hub::placement::{
    DesiredImage, DesiredSetContent, ObjectId, Placement, PlacementCluster, PlacementRepo,
    RegistryInfo, RegistryRef, Resolution, ResolvedImage, Selector, SelectorOperator,
    SelectorRequirement, apply, diff, place,
};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};

const NAMESPACES: &[&str] = &["ns1", "ns2", "ns3"];
const LABEL_KEYS: &[&str] = &["env", "tier", "region"];
const LABEL_VALUES: &[&str] = &["a", "b", "c"];
const CLUSTERS: &[&str] = &["c0", "c1", "c2", "c3", "c4", "c5"];

fn label_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(
        select(LABEL_KEYS).prop_map(str::to_string),
        select(LABEL_VALUES).prop_map(str::to_string),
        0..3,
    )
}

fn requirement() -> impl Strategy<Value = SelectorRequirement> {
    (
        select(LABEL_KEYS),
        select(
            &[
                SelectorOperator::In,
                SelectorOperator::NotIn,
                SelectorOperator::Exists,
                SelectorOperator::DoesNotExist,
            ][..],
        ),
        subsequence(LABEL_VALUES, 0..3),
    )
        .prop_map(|(k, op, vals)| SelectorRequirement {
            key: k.to_string(),
            operator: op,
            values: vals.into_iter().map(str::to_string).collect(),
        })
}

fn selector() -> impl Strategy<Value = Option<Selector>> {
    proptest::option::of(
        (label_map(), proptest::collection::vec(requirement(), 0..3)).prop_map(|(l, e)| Selector {
            match_labels: l,
            match_expressions: e,
        }),
    )
}

fn clusters() -> impl Strategy<Value = Vec<PlacementCluster>> {
    proptest::collection::vec(
        (label_map(), subsequence(NAMESPACES, 0..=3)),
        0..=CLUSTERS.len(),
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (labels, tenants))| PlacementCluster {
                name: CLUSTERS[i].to_string(),
                labels,
                tenants: tenants.into_iter().map(str::to_string).collect(),
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
struct World {
    repos: Vec<PlacementRepo>,
    clusters: Vec<PlacementCluster>,
    registries: Vec<RegistryInfo>,
    resolutions: BTreeMap<ObjectId, Resolution>,
}

fn repo() -> impl Strategy<Value = (PlacementRepo, Option<Resolution>)> {
    (
        select(NAMESPACES),
        0..4usize,
        selector(),
        subsequence(CLUSTERS, 0..3),
        select(&["", "ns1", "ns2"][..]),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.3),
        proptest::option::weighted(
            0.85,
            proptest::collection::vec(
                (
                    select(&["sha256:1", "sha256:2", "sha256:3"][..]),
                    select(&["v1", "v2", "latest"][..]),
                ),
                1..3,
            ),
        ),
        subsequence(&["linux/amd64", "linux/arm64"][..], 0..=2),
    )
        .prop_map(
            |(ns, n, sel, names, reg_ns, suspend, default_placement, resolved, platforms)| {
                let r = PlacementRepo {
                    id: ObjectId::new(ns, format!("r{n}")),
                    default_placement,
                    selector: sel,
                    clusters: names.into_iter().map(str::to_string).collect(),
                    registry_ref: ObjectId::new(reg_ns, "reg"),
                    repository: format!("library/r{n}"),
                    suspend,
                    platforms: platforms.into_iter().map(str::to_string).collect(),
                    keep_versions: 2,
                    grace_period_seconds: 0,
                    verify_keys: Vec::new(),
                };
                let res = resolved.map(|imgs| Resolution {
                    images: imgs
                        .into_iter()
                        .map(|(d, t)| ResolvedImage {
                            digest: d.to_string(),
                            tags: vec![t.to_string()],
                        })
                        .collect(),
                });
                (r, res)
            },
        )
}

fn world() -> impl Strategy<Value = World> {
    (
        proptest::collection::vec(repo(), 0..8),
        clusters(),
        subsequence(NAMESPACES, 0..=3),
    )
        .prop_map(|(repos, clusters, reg_namespaces)| {
            // Repository ids are unique, as in a store.
            let mut seen = BTreeSet::new();
            let mut resolutions = BTreeMap::new();
            let mut unique = Vec::new();
            for (r, res) in repos {
                if seen.insert(r.id.clone()) {
                    if let Some(res) = res {
                        resolutions.insert(r.id.clone(), res);
                    }
                    unique.push(r);
                }
            }
            World {
                repos: unique,
                clusters,
                registries: reg_namespaces
                    .into_iter()
                    .map(|ns| RegistryInfo {
                        id: ObjectId::new(ns, "reg"),
                        domain: format!("{ns}.registry.example"),
                        insecure: false,
                        fingerprint: format!("fp-{ns}"),
                    })
                    .collect(),
                resolutions,
            }
        })
}

fn run(w: &World) -> Placement {
    place(&w.repos, &w.clusters, &w.registries, &w.resolutions)
}

/// A random desired set in canonical form, from a small key space so that two
/// sets overlap.
fn content() -> impl Strategy<Value = DesiredSetContent> {
    (
        proptest::collection::vec(
            (
                select(&["ns1/a", "ns1/b", "ns2/a"][..]),
                select(&["sha256:1", "sha256:2"][..]),
                select(&["v1", "v2"][..]),
                0..3u32,
            ),
            0..6,
        ),
        // Registries with one of two credential fingerprints, so that two
        // sets differ in a credential as well as in which registries.
        proptest::collection::vec(
            (
                select(&["ns1/reg", "ns2/reg", "ns3/reg"][..]),
                select(&["f1", "f2"][..]),
            ),
            0..=3,
        ),
    )
        .prop_map(|(imgs, regs)| {
            DesiredSetContent::new(
                imgs.into_iter()
                    .map(|(src, digest, tag, keep)| DesiredImage {
                        key: format!("{src}@{digest}"),
                        digest: digest.to_string(),
                        tags: vec![tag.to_string()],
                        keep_versions: keep,
                        ..Default::default()
                    })
                    .collect(),
                regs.into_iter()
                    .map(|(key, fingerprint)| RegistryRef {
                        key: key.to_string(),
                        fingerprint: fingerprint.to_string(),
                    })
                    .collect(),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn output_is_independent_of_input_order(
        (w, repos, clusters, registries) in world().prop_flat_map(|w| {
            let repos = Just(w.repos.clone()).prop_shuffle();
            let clusters = Just(w.clusters.clone()).prop_shuffle();
            let registries = Just(w.registries.clone()).prop_shuffle();
            (Just(w), repos, clusters, registries)
        })
    ) {
        let shuffled = World { repos, clusters, registries, resolutions: w.resolutions.clone() };
        prop_assert_eq!(run(&w), run(&shuffled));
    }

    #[test]
    fn apply_of_diff_gives_the_new_set(old in content(), new in content()) {
        let d = diff(&old, &new);
        prop_assert_eq!(apply(&old, &d), new.clone());
        // A delta never both upserts and removes one key.
        for u in &d.upserts {
            prop_assert!(!d.removals.contains(&u.key));
        }
        // A registry is sent again only when it is new or its credential
        // changed, and never both upserted and removed.
        for r in &d.registry_upserts {
            prop_assert!(!old.registries.contains(r));
            prop_assert!(!d.registry_removals.contains(&r.key));
        }
        prop_assert!(diff(&old, &old).is_empty());
        prop_assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn apply_of_diff_between_placements(a in world(), b in world()) {
        let (pa, pb) = (run(&a), run(&b));
        let names: BTreeSet<&String> = pa.clusters.keys().chain(pb.clusters.keys()).collect();
        let empty = DesiredSetContent::default();
        for name in names {
            let old = pa.clusters.get(name).unwrap_or(&empty);
            let new = pb.clusters.get(name).unwrap_or(&empty);
            prop_assert_eq!(&apply(old, &diff(old, new)), new);
            prop_assert!(diff(new, new).is_empty());
        }
    }

    #[test]
    fn without_placement_every_admitting_cluster_and_no_other(w in world()) {
        let p = run(&w);
        let registries: BTreeSet<&ObjectId> = w.registries.iter().map(|r| &r.id).collect();
        for r in &w.repos {
            let reached: BTreeSet<&String> = p
                .clusters
                .iter()
                .filter(|(_, set)| set.images.iter().any(|i| i.source() == r.id))
                .map(|(name, _)| name)
                .collect();
            let reported = p.skipped.iter().any(|s| s.repo == r.id);
            // Every repository either reaches a cluster or says why not.
            prop_assert!(!reached.is_empty() || reported, "{} reached nothing, silently", r.id);
            let secret_ns = if r.registry_ref.namespace.is_empty() { &r.id.namespace } else { &r.registry_ref.namespace };
            let placeable = !r.suspend
                && *secret_ns == r.id.namespace
                && registries.contains(&ObjectId::new(secret_ns.clone(), "reg"))
                && w.resolutions.get(&r.id).is_some_and(|res| !res.images.is_empty());
            if r.default_placement && placeable {
                let admitting: BTreeSet<&String> = w
                    .clusters
                    .iter()
                    .filter(|c| c.tenants.contains(&r.id.namespace))
                    .map(|c| &c.name)
                    .collect();
                prop_assert_eq!(reached, admitting);
            }
        }
    }

    #[test]
    fn clusters_receive_only_their_tenants(w in world()) {
        let p = run(&w);
        let suspended: BTreeSet<&ObjectId> =
            w.repos.iter().filter(|r| r.suspend).map(|r| &r.id).collect();
        for c in &w.clusters {
            let set = &p.clusters[&c.name];
            for img in &set.images {
                prop_assert!(
                    c.tenants.contains(&img.source_namespace),
                    "{} got {} outside its tenants {:?}", c.name, img.key, c.tenants
                );
                // The secret used is from the repository's own namespace.
                let own = format!("{}/", img.source_namespace);
                prop_assert!(img.registry_key.starts_with(&own), "{} uses {}", img.key, img.registry_key);
                prop_assert!(!suspended.contains(&img.source()));
            }
            // Canonical form: sorted, unique.
            let keys: Vec<&String> = set.images.iter().map(|i| &i.key).collect();
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(keys, sorted);
        }
    }
}
