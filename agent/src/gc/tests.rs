//! Table tests of the pure retention plan: per-repository keepVersions
//! (the desired version included) and grace periods.

use super::*;

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn rec(repo: &str, c: char, at: u64) -> ManifestRecord {
    ManifestRecord {
        registry: "r".into(),
        repository: repo.into(),
        tag: None,
        digest: digest(c),
        media_type: imgfleet_common::registry::OCI_MANIFEST.into(),
        size: 1,
        parent: None,
        subject: None,
        recorded_at: at,
    }
}

fn id(repo: &str, c: char) -> ImageId {
    ("r".into(), repo.into(), digest(c))
}

/// A wanted image: repository, digest letter, keepVersions, grace seconds.
fn want(repo: &str, c: char, keep: u32, grace: u64) -> Wanted {
    Wanted {
        id: id(repo, c),
        retention: Retention {
            keep_versions: keep,
            grace_period_seconds: grace,
        },
    }
}

/// The agent's defaults in these cases: keep 2 (desired + one for rollback),
/// grace 100 s.
const POLICY: GcPolicy = GcPolicy {
    grace_period: Duration::from_secs(100),
    keep_versions: 2,
};

struct Case {
    name: &'static str,
    records: Vec<ManifestRecord>,
    wanted: Vec<Wanted>,
    unresolved: Vec<RepoId>,
    previous: GcState,
    now: u64,
    /// Removed now, as (repository, digest letter).
    remove: Vec<(&'static str, char)>,
    /// Marked unwanted (in their grace period), as (repository, digest letter).
    unwanted: Vec<(&'static str, char)>,
}

impl Default for Case {
    /// The history below at t = 1000, nothing unresolved or remembered,
    /// nothing removed or marked.
    fn default() -> Self {
        Case {
            name: "",
            records: history(),
            wanted: Vec::new(),
            unresolved: Vec::new(),
            previous: GcState::default(),
            now: 1000,
            remove: Vec::new(),
            unwanted: Vec::new(),
        }
    }
}

fn check(case: Case) {
    let p = plan(
        &case.records,
        &case.wanted,
        &case.unresolved,
        &case.previous,
        &POLICY,
        case.now,
    );
    let mut remove = p.remove.clone();
    remove.sort();
    let mut want_remove: Vec<ImageId> = case.remove.iter().map(|(r, c)| id(r, *c)).collect();
    want_remove.sort();
    assert_eq!(remove, want_remove, "{}: removed", case.name);
    let marked: BTreeSet<String> = p.state.unwanted_since.keys().cloned().collect();
    let want_marked: BTreeSet<String> = case
        .unwanted
        .iter()
        .map(|(r, c)| id_key(&id(r, *c)))
        .collect();
    assert_eq!(marked, want_marked, "{}: marked unwanted", case.name);
}

/// Three versions of app (a oldest, c newest) and one of web.
fn history() -> Vec<ManifestRecord> {
    vec![
        rec("app", 'a', 10),
        rec("app", 'b', 20),
        rec("app", 'c', 30),
        rec("web", 'w', 10),
    ]
}

/// Previous state with every undesired image of `history` unwanted since `t`.
fn unwanted_since(t: u64, items: &[(&str, char)]) -> GcState {
    GcState {
        unwanted_since: items.iter().map(|(r, c)| (id_key(&id(r, *c)), t)).collect(),
        retention: BTreeMap::new(),
    }
}

#[test]
fn keep_versions_counts_the_desired_version() {
    let cases = vec![
        Case {
            name: "keepVersions 1: only the desired digest stays",
            wanted: vec![want("app", 'c', 1, 0), want("web", 'w', 0, 0)],
            previous: unwanted_since(0, &[("app", 'a'), ("app", 'b')]),
            remove: vec![("app", 'a'), ("app", 'b')],
            ..Case::default()
        },
        Case {
            name: "keepVersions 2: the newest older version stays for rollback",
            wanted: vec![want("app", 'c', 2, 0), want("web", 'w', 0, 0)],
            previous: unwanted_since(0, &[("app", 'a'), ("app", 'b')]),
            remove: vec![("app", 'a')],
            ..Case::default()
        },
        Case {
            name: "keepVersions 0 is the agent's default (2)",
            wanted: vec![want("app", 'c', 0, 0), want("web", 'w', 0, 0)],
            previous: unwanted_since(0, &[("app", 'a')]),
            remove: vec![("app", 'a')],
            ..Case::default()
        },
        Case {
            name: "keepVersions 3 keeps everything of app",
            wanted: vec![want("app", 'c', 3, 0), want("web", 'w', 0, 0)],
            ..Case::default()
        },
        Case {
            name: "each repository uses its own keepVersions",
            records: {
                let mut r = history();
                r.extend([rec("web", 'x', 20), rec("web", 'y', 30)]);
                r
            },
            wanted: vec![want("app", 'c', 1, 0), want("web", 'y', 3, 0)],
            previous: unwanted_since(0, &[("app", 'a'), ("app", 'b')]),
            remove: vec![("app", 'a'), ("app", 'b')],
            ..Case::default()
        },
        Case {
            name: "two desired digests with keepVersions 2 leave no rollback slot",
            wanted: vec![
                want("app", 'b', 2, 0),
                want("app", 'c', 2, 0),
                want("web", 'w', 0, 0),
            ],
            previous: unwanted_since(0, &[("app", 'a')]),
            remove: vec![("app", 'a')],
            ..Case::default()
        },
        Case {
            name: "a desired version not synced yet takes no slot: the old one stays",
            records: vec![rec("app", 'a', 10), rec("app", 'b', 20)],
            wanted: vec![want("app", 'c', 1, 0)],
            previous: unwanted_since(0, &[("app", 'a')]),
            remove: vec![("app", 'a')],
            ..Case::default()
        },
        Case {
            name: "two Repositories of one upstream repository: the larger keepVersions wins",
            wanted: vec![
                want("app", 'c', 1, 0),
                want("app", 'c', 3, 0),
                want("web", 'w', 0, 0),
            ],
            ..Case::default()
        },
    ];
    for case in cases {
        check(case);
    }
}

#[test]
fn grace_periods_are_per_repository() {
    let cases = vec![
        Case {
            name: "first run: unwanted images start their grace period",
            wanted: vec![want("app", 'c', 1, 0)],
            unwanted: vec![("app", 'a'), ("app", 'b'), ("web", 'w')],
            ..Case::default()
        },
        Case {
            name: "app's own 10 s grace is over, web's default 100 s is not",
            wanted: vec![want("app", 'c', 1, 10)],
            previous: unwanted_since(1000, &[("app", 'a'), ("app", 'b'), ("web", 'w')]),
            now: 1050,
            remove: vec![("app", 'a'), ("app", 'b')],
            unwanted: vec![("web", 'w')],
            ..Case::default()
        },
        Case {
            name: "a long grace of its own keeps app's old versions past the default",
            wanted: vec![want("app", 'c', 1, 5000), want("web", 'w', 0, 0)],
            previous: unwanted_since(1000, &[("app", 'a'), ("app", 'b')]),
            now: 1200,
            unwanted: vec![("app", 'a'), ("app", 'b')],
            ..Case::default()
        },
        Case {
            name: "a repository that left the desired set keeps its remembered grace",
            wanted: vec![want("app", 'c', 1, 0)],
            previous: GcState {
                unwanted_since: [(id_key(&id("web", 'w')), 1000)].into(),
                retention: [(
                    "r/web".to_string(),
                    Retention {
                        keep_versions: 0,
                        grace_period_seconds: 5000,
                    },
                )]
                .into(),
            },
            now: 1200,
            unwanted: vec![("app", 'a'), ("app", 'b'), ("web", 'w')],
            ..Case::default()
        },
        Case {
            name: "desired again within the grace period: the mark is dropped",
            wanted: vec![
                want("app", 'a', 3, 0),
                want("app", 'c', 3, 0),
                want("web", 'w', 0, 0),
            ],
            previous: unwanted_since(1000, &[("app", 'a'), ("web", 'w')]),
            now: 1050,
            ..Case::default()
        },
        Case {
            name: "an unresolved repository loses nothing and its clocks keep running",
            wanted: vec![want("web", 'w', 0, 0)],
            unresolved: vec![("r".into(), "app".into())],
            previous: unwanted_since(1000, &[("app", 'a')]),
            now: 5000,
            unwanted: vec![("app", 'a')],
            ..Case::default()
        },
    ];
    for case in cases {
        check(case);
    }
}

#[test]
fn retention_is_remembered_while_content_remains() {
    let p = plan(
        &history(),
        &[want("app", 'c', 1, 30)],
        &[],
        &GcState::default(),
        &POLICY,
        1000,
    );
    assert_eq!(
        p.state.retention.get("r/app"),
        Some(&Retention {
            keep_versions: 1,
            grace_period_seconds: 30
        })
    );
    assert!(!p.state.retention.contains_key("r/web"), "web set nothing");
    // Once app's content is gone, so is what was remembered for it.
    let later = plan(&[], &[], &[], &p.state, &POLICY, 2000);
    assert!(later.state.retention.is_empty());
}

#[test]
fn the_next_run_is_due_when_the_first_grace_period_ends() {
    let p = plan(
        &history(),
        &[want("app", 'c', 1, 30)],
        &[],
        &unwanted_since(1000, &[("app", 'a')]),
        &POLICY,
        1010,
    );
    // a: 20 s of app's 30 s left; b: just marked, 30 s; web: the default 100 s.
    assert_eq!(p.next_due, Some(20));
    let none = plan(
        &history(),
        &[want("app", 'c', 3, 0), want("web", 'w', 0, 0)],
        &[],
        &GcState::default(),
        &POLICY,
        1000,
    );
    assert_eq!(none.next_due, None, "nothing is waiting");
}

#[test]
fn old_state_files_still_load() {
    let old = r#"{"unwanted_since": {"r/app@sha256:aa": 12}}"#;
    let state: GcState = serde_json::from_str(old).unwrap();
    assert_eq!(state.unwanted_since.get("r/app@sha256:aa"), Some(&12));
    assert!(state.retention.is_empty());
}
