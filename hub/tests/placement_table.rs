//! Table-driven tests of placement: every selector operator, explicit names,
//! their union, tenants, suspend, registry secrets and resolutions, through
//! one `check(..)` helper.

use std::collections::{BTreeMap, BTreeSet};

use imgfleet_hub::placement::{
    DesiredImage, DesiredSetContent, ObjectId, PlacementCluster, PlacementRepo, RegistryInfo,
    RegistryRef, Resolution, ResolvedImage, Selector, SelectorOperator, SelectorRequirement,
    SkipReason, apply, diff, place,
};

fn cluster(name: &str, labels: &[(&str, &str)], tenants: &[&str]) -> PlacementCluster {
    PlacementCluster {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        tenants: tenants.iter().map(|t| t.to_string()).collect(),
    }
}

fn repo(ns: &str, name: &str) -> PlacementRepo {
    PlacementRepo {
        id: ObjectId::new(ns, name),
        registry_ref: ObjectId::new(ns, "reg"),
        repository: format!("library/{name}"),
        ..Default::default()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Selector {
    Selector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        match_expressions: vec![],
    }
}

fn expr(key: &str, operator: SelectorOperator, values: &[&str]) -> Selector {
    Selector {
        match_labels: BTreeMap::new(),
        match_expressions: vec![SelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }],
    }
}

trait With {
    fn sel(self, s: Selector) -> Self;
    fn names(self, n: &[&str]) -> Self;
}

impl With for PlacementRepo {
    fn sel(mut self, s: Selector) -> Self {
        self.selector = Some(s);
        self
    }
    fn names(mut self, n: &[&str]) -> Self {
        self.clusters = n.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// A fleet used by most cases: three clusters of two tenants.
fn fleet() -> Vec<PlacementCluster> {
    vec![
        cluster(
            "edge-a",
            &[("env", "prod"), ("tier", "core")],
            &["team-a", "team-b"],
        ),
        cluster("edge-b", &[("env", "prod")], &["team-a"]),
        cluster("edge-c", &[("env", "dev"), ("tier", "edge")], &["team-b"]),
    ]
}

fn registries() -> Vec<RegistryInfo> {
    ["team-a", "team-b", "team-z"]
        .iter()
        .map(|ns| RegistryInfo {
            id: ObjectId::new(*ns, "reg"),
            domain: format!("registry.{ns}.example"),
            insecure: false,
            fingerprint: format!("fp-{ns}"),
        })
        .collect()
}

/// Every repository resolves to `sha256:<name>` with tag `latest`.
fn resolutions(repos: &[PlacementRepo]) -> BTreeMap<ObjectId, Resolution> {
    repos
        .iter()
        .map(|r| {
            (
                r.id.clone(),
                Resolution {
                    images: vec![ResolvedImage {
                        digest: format!("sha256:{}", r.id.name),
                        tags: vec!["latest".into()],
                    }],
                },
            )
        })
        .collect()
}

/// Places `repos` on `clusters` and compares image keys per cluster and the
/// skipped list. Clusters absent from `want` must get an empty set.
fn check(
    case: &str,
    repos: Vec<PlacementRepo>,
    clusters: Vec<PlacementCluster>,
    want: &[(&str, &[&str])],
    want_skipped: &[(&str, SkipReason)],
) {
    let res = resolutions(&repos);
    let p = place(&repos, &clusters, &registries(), &res);
    let names: BTreeSet<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        p.clusters
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        names,
        "{case}: every cluster gets a desired set"
    );
    for (name, set) in &p.clusters {
        let got: Vec<&str> = set.images.iter().map(|i| i.key.as_str()).collect();
        let expected: Vec<&str> = want
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, k)| k.to_vec())
            .unwrap_or_default();
        assert_eq!(got, expected, "{case}: images of {name}");
        let regs: BTreeSet<&str> = set.images.iter().map(|i| i.registry_key.as_str()).collect();
        assert_eq!(
            set.registries
                .iter()
                .map(|r| r.key.as_str())
                .collect::<BTreeSet<_>>(),
            regs,
            "{case}: registries of {name} are exactly those its images need"
        );
    }
    let skipped: Vec<(String, SkipReason)> = p
        .skipped
        .iter()
        .map(|s| (s.repo.to_string(), s.reason.clone()))
        .collect();
    let mut expected: Vec<(String, SkipReason)> = want_skipped
        .iter()
        .map(|(r, reason)| (r.to_string(), reason.clone()))
        .collect();
    expected.sort();
    assert_eq!(skipped, expected, "{case}: skipped");

    // The same inputs in reverse order give the same answer.
    let mut rrepos = repos.clone();
    rrepos.reverse();
    let mut rclusters = clusters.clone();
    rclusters.reverse();
    let mut rregs = registries();
    rregs.reverse();
    assert_eq!(
        place(&rrepos, &rclusters, &rregs, &res),
        p,
        "{case}: order independent"
    );
}

/// Image keys expected per cluster.
type Want = &'static [(&'static str, &'static [&'static str])];

const A: &str = "team-a/web@sha256:web";

#[test]
fn selectors() {
    use SelectorOperator::*;
    let web = || repo("team-a", "web");
    let cases: Vec<(&str, PlacementRepo, Want)> = vec![
        (
            "matchLabels",
            web().sel(labels(&[("env", "prod")])),
            &[("edge-a", &[A]), ("edge-b", &[A])],
        ),
        (
            "matchLabels two terms",
            web().sel(labels(&[("env", "prod"), ("tier", "core")])),
            &[("edge-a", &[A])],
        ),
        (
            "matchLabels no match",
            web().sel(labels(&[("env", "staging")])),
            &[],
        ),
        (
            "In",
            web().sel(expr("tier", In, &["core", "edge"])),
            &[("edge-a", &[A])],
        ),
        ("In empty values", web().sel(expr("env", In, &[])), &[]),
        // NotIn matches edge-b, which has no tier label at all.
        (
            "NotIn absent label",
            web().sel(expr("tier", NotIn, &["core"])),
            &[("edge-b", &[A])],
        ),
        (
            "NotIn excludes",
            web().sel(expr("env", NotIn, &["prod"])),
            &[],
        ),
        (
            "Exists",
            web().sel(expr("tier", Exists, &[])),
            &[("edge-a", &[A])],
        ),
        (
            "DoesNotExist",
            web().sel(expr("tier", DoesNotExist, &[])),
            &[("edge-b", &[A])],
        ),
        (
            "labels and expressions together",
            web().sel(Selector {
                match_labels: [("env".to_string(), "prod".to_string())].into(),
                match_expressions: vec![SelectorRequirement {
                    key: "tier".into(),
                    operator: DoesNotExist,
                    values: vec![],
                }],
            }),
            &[("edge-b", &[A])],
        ),
        (
            "empty selector selects nothing",
            web().sel(Selector::default()),
            &[],
        ),
        ("no selector, no names", web(), &[]),
    ];
    for (case, r, want) in cases {
        // A repository that reaches no cluster says why.
        let skipped: &[(&str, SkipReason)] = if want.is_empty() {
            &[("team-a/web", SkipReason::NoClusterMatches)]
        } else {
            &[]
        };
        check(case, vec![r], fleet(), want, skipped);
    }
}

#[test]
fn without_placement_every_cluster_that_admits_the_namespace() {
    let everywhere = |ns: &str, name: &str| PlacementRepo {
        default_placement: true,
        ..repo(ns, name)
    };
    check(
        "team-a: the two clusters admitting team-a",
        vec![everywhere("team-a", "web")],
        fleet(),
        &[("edge-a", &[A]), ("edge-b", &[A])],
        &[],
    );
    check(
        "team-b: edge-a and edge-c",
        vec![everywhere("team-b", "db")],
        fleet(),
        &[
            ("edge-a", &["team-b/db@sha256:db"]),
            ("edge-c", &["team-b/db@sha256:db"]),
        ],
        &[],
    );
    // Selector and names are unused without a placement (the model cannot
    // express both; the adapter never sets them together).
    check(
        "selector fields are ignored",
        vec![everywhere("team-a", "web").sel(labels(&[("env", "dev")]))],
        fleet(),
        &[("edge-a", &[A]), ("edge-b", &[A])],
        &[],
    );
    check(
        "no cluster admits the namespace",
        vec![everywhere("team-z", "app")],
        fleet(),
        &[],
        &[("team-z/app", SkipReason::NoClusterAdmitsNamespace)],
    );
    check(
        "no cluster at all",
        vec![everywhere("team-a", "web")],
        vec![],
        &[],
        &[("team-a/web", SkipReason::NoClusterAdmitsNamespace)],
    );
}

#[test]
fn names_union_and_tenants() {
    let web = || repo("team-a", "web");
    check(
        "explicit names",
        vec![web().names(&["edge-b"])],
        fleet(),
        &[("edge-b", &[A])],
        &[],
    );
    check(
        "unknown names are ignored",
        vec![web().names(&["edge-b", "not-enrolled"])],
        fleet(),
        &[("edge-b", &[A])],
        &[],
    );
    check(
        "union of selector and names",
        vec![web().sel(labels(&[("tier", "core")])).names(&["edge-b"])],
        fleet(),
        &[("edge-a", &[A]), ("edge-b", &[A])],
        &[],
    );
    check(
        "empty selector with names: only the names",
        vec![web().sel(Selector::default()).names(&["edge-b"])],
        fleet(),
        &[("edge-b", &[A])],
        &[],
    );
    // edge-c is env=dev but only allows team-b: a selector match is silently
    // not placed, an explicit name is reported.
    check(
        "tenant refuses a selector match",
        vec![web().sel(labels(&[("env", "dev")]))],
        fleet(),
        &[],
        &[("team-a/web", SkipReason::NoClusterMatches)],
    );
    check(
        "tenant refuses an explicit name",
        vec![web().names(&["edge-c", "edge-a"])],
        fleet(),
        &[("edge-a", &[A])],
        &[(
            "team-a/web",
            SkipReason::TenantNotAllowed {
                cluster: "edge-c".into(),
            },
        )],
    );
    check(
        "two tenants share a cluster",
        vec![
            web().sel(labels(&[("tier", "core")])),
            repo("team-b", "db").sel(expr("tier", SelectorOperator::Exists, &[])),
        ],
        fleet(),
        &[
            ("edge-a", &[A, "team-b/db@sha256:db"]),
            ("edge-c", &["team-b/db@sha256:db"]),
        ],
        &[],
    );
}

#[test]
fn suspend_secrets_and_resolution() {
    let all = || expr("env", SelectorOperator::Exists, &[]);
    let mut suspended = repo("team-a", "web").sel(all());
    suspended.suspend = true;
    check(
        "suspended",
        vec![suspended],
        fleet(),
        &[],
        &[("team-a/web", SkipReason::Suspended)],
    );

    let mut cross = repo("team-a", "web").sel(all());
    cross.registry_ref = ObjectId::new("team-b", "reg");
    check(
        "registryRef into another namespace",
        vec![cross],
        fleet(),
        &[],
        &[(
            "team-a/web",
            SkipReason::CrossNamespaceSecret {
                secret: ObjectId::new("team-b", "reg"),
            },
        )],
    );

    let mut same_ns_default = repo("team-a", "web").sel(all());
    same_ns_default.registry_ref = ObjectId::new("", "reg");
    check(
        "registryRef without namespace means the repository's own",
        vec![same_ns_default],
        fleet(),
        &[("edge-a", &[A]), ("edge-b", &[A])],
        &[],
    );

    let mut missing = repo("team-a", "web").sel(all());
    missing.registry_ref = ObjectId::new("team-a", "nope");
    check(
        "registryRef to a missing secret",
        vec![missing],
        fleet(),
        &[],
        &[(
            "team-a/web",
            SkipReason::SecretNotFound {
                secret: ObjectId::new("team-a", "nope"),
            },
        )],
    );

    // Not resolved: no entry in the resolution map.
    let r = repo("team-a", "web").sel(all());
    let p = place(&[r], &fleet(), &registries(), &BTreeMap::new());
    assert!(p.clusters.values().all(|s| s.images.is_empty()));
    assert_eq!(p.skipped.len(), 1);
    assert_eq!(p.skipped[0].reason, SkipReason::NotResolved);
}

#[test]
fn entries_carry_everything_the_agent_needs() {
    let mut r = repo("team-a", "web").names(&["edge-a"]);
    r.platforms = vec![
        "linux/arm64".into(),
        "linux/amd64".into(),
        "linux/arm64".into(),
    ];
    r.keep_versions = 3;
    r.grace_period_seconds = 600;
    let res: BTreeMap<ObjectId, Resolution> = [(
        r.id.clone(),
        Resolution {
            images: vec![
                ResolvedImage {
                    digest: "sha256:bbb".into(),
                    tags: vec!["1.2".into()],
                },
                ResolvedImage {
                    digest: "sha256:aaa".into(),
                    tags: vec!["1.1".into()],
                },
                // Two tags of one digest merge into one entry.
                ResolvedImage {
                    digest: "sha256:bbb".into(),
                    tags: vec!["latest".into(), "1.2".into()],
                },
                ResolvedImage {
                    digest: String::new(),
                    tags: vec!["broken".into()],
                },
            ],
        },
    )]
    .into();
    let p = place(&[r], &fleet(), &registries(), &res);
    let set = &p.clusters["edge-a"];
    let want = |digest: &str, tags: &[&str]| DesiredImage {
        key: format!("team-a/web@{digest}"),
        source_namespace: "team-a".into(),
        source_name: "web".into(),
        registry_key: "team-a/reg".into(),
        registry: "registry.team-a.example".into(),
        repository: "library/web".into(),
        digest: digest.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
        keep_versions: 3,
        grace_period_seconds: 600,
        trace_context: String::new(),
        verify_keys: Vec::new(),
    };
    assert_eq!(
        *set,
        DesiredSetContent {
            images: vec![
                want("sha256:aaa", &["1.1"]),
                want("sha256:bbb", &["1.2", "latest"])
            ],
            registries: vec![reg("team-a/reg", "fp-team-a")],
        }
    );
    assert!(p.skipped.is_empty());
}

fn reg(key: &str, fingerprint: &str) -> RegistryRef {
    RegistryRef {
        key: key.into(),
        fingerprint: fingerprint.into(),
    }
}

#[test]
fn diff_and_apply() {
    let entry = |k: &str, tag: &str| DesiredImage {
        key: k.into(),
        tags: vec![tag.into()],
        registry_key: "ns/reg".into(),
        ..Default::default()
    };
    let old = DesiredSetContent::new(
        vec![
            entry("ns/a@1", "x"),
            entry("ns/b@1", "x"),
            entry("ns/c@1", "x"),
        ],
        vec![
            reg("ns/reg", "f1"),
            reg("ns/old", "f2"),
            reg("ns/same", "f3"),
        ],
    );
    let new = DesiredSetContent::new(
        vec![
            entry("ns/d@1", "x"),
            entry("ns/b@1", "y"),
            entry("ns/a@1", "x"),
        ],
        vec![
            reg("ns/reg", "f1-rotated"),
            reg("ns/new", "f4"),
            reg("ns/same", "f3"),
        ],
    );
    let d = diff(&old, &new);
    assert_eq!(
        d.upserts.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["ns/b@1", "ns/d@1"],
        "changed and added images, not the unchanged one"
    );
    assert_eq!(d.removals, ["ns/c@1"]);
    assert_eq!(
        d.registry_upserts,
        [reg("ns/new", "f4"), reg("ns/reg", "f1-rotated")],
        "a new registry, and one whose credential changed (sent again); not the unchanged one"
    );
    assert_eq!(d.registry_removals, ["ns/old"]);
    assert_eq!(apply(&old, &d), new);
    assert!(diff(&new, &new).is_empty());
    assert_eq!(
        apply(
            &DesiredSetContent::default(),
            &diff(&DesiredSetContent::default(), &new)
        ),
        new
    );
}

/// A rotated password changes the fingerprint placement gives a registry,
/// so the set changes and its delta sends the credential again.
#[test]
fn a_new_fingerprint_resends_the_credential() {
    let mut r = repo("team-a", "web");
    r.default_placement = true;
    let res = resolutions(std::slice::from_ref(&r));
    let before = place(std::slice::from_ref(&r), &fleet(), &registries(), &res);
    let mut rotated = registries();
    rotated[0].fingerprint = "fp-team-a-rotated".into();
    let after = place(std::slice::from_ref(&r), &fleet(), &rotated, &res);
    let (old, new) = (&before.clusters["edge-a"], &after.clusters["edge-a"]);
    assert_eq!(old.images, new.images, "the images stay");
    let d = diff(old, new);
    assert!(d.upserts.is_empty() && d.removals.is_empty());
    assert_eq!(d.registry_upserts, [reg("team-a/reg", "fp-team-a-rotated")]);
    assert!(d.registry_removals.is_empty());
}
