//! Unit tests of the resource model: the seed, malformed variants, round trips.

use super::*;
use crate::api::v1 as pb;

/// The YAML blocks of the seed document, byte for byte (see testdata/).
const SEED_QUICKSTART_RS: &str = include_str!("testdata/seed-quickstart-registrysecret.yaml");
const SEED_QUICKSTART_REPO: &str = include_str!("testdata/seed-quickstart-repository.yaml");
const SEED_PRODUCTION: &str = include_str!("testdata/seed-production.yaml");
const SEED_DEVELOPMENT: &str = include_str!("testdata/seed-development.yaml");
const SEED_ALERT_RULES: &str = include_str!("testdata/seed-alert-rules.yaml");

const REPO: &str = "\
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata:
  name: nginx
  namespace: default
spec:
  repository: library/nginx
  tag: latest
  registryRef:
    name: harbor-prod
  syncInterval: 1h
";

const SECRET: &str = "\
apiVersion: image.theriseunion.io/v1alpha1
kind: RegistrySecret
metadata:
  name: harbor-prod
spec:
  domain: harbor.example.com
  username: admin
  password: Hunter2Secret
  provider: harbor
";

/// `REPO` with one line replaced (`from` must occur exactly once).
fn repo_with(from: &str, to: &str) -> String {
    assert_eq!(
        REPO.matches(from).count(),
        1,
        "{from:?} occurs once in REPO"
    );
    REPO.replace(from, to)
}

fn secret_with(from: &str, to: &str) -> String {
    assert_eq!(
        SECRET.matches(from).count(),
        1,
        "{from:?} occurs once in SECRET"
    );
    SECRET.replace(from, to)
}

/// Asserts that `yaml` is refused and that the errors, as displayed, contain
/// every expected substring.
fn check(yaml: &str, expected: &[&str]) {
    let errors = match parse_documents(yaml) {
        Ok(objects) => panic!("accepted malformed input:\n{yaml}\nas {objects:?}"),
        Err(errors) => errors,
    };
    let text = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    for want in expected {
        assert!(
            text.contains(want),
            "expected {want:?} in the errors of\n{yaml}\ngot:\n{text}"
        );
    }
    assert!(
        !text.contains("Hunter2Secret"),
        "a password leaked into an error:\n{text}"
    );
}

#[test]
fn seed_blocks_are_accepted_unchanged() {
    for (name, text, count) in [
        ("quickstart registrysecret", SEED_QUICKSTART_RS, 1),
        ("quickstart repository", SEED_QUICKSTART_REPO, 1),
        ("production", SEED_PRODUCTION, 2),
        ("development", SEED_DEVELOPMENT, 2),
    ] {
        let objects =
            parse_documents(text).unwrap_or_else(|e| panic!("seed block {name} refused: {e:?}"));
        assert_eq!(objects.len(), count, "{name}");
    }
}

#[test]
fn seed_testdata_is_byte_identical_to_the_seed() {
    // The product document is kept in the repository so the tests build from
    // any checkout; where the project's shared/ folder sits beside the
    // checkout (as in CI), the copy must still equal the original.
    let seed = include_str!("testdata/seed-original.txt");
    let original = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/seed/000_c61e726a87493ad6.txt"
    );
    if let Ok(text) = std::fs::read_to_string(original) {
        assert_eq!(
            text, seed,
            "src/model/testdata/seed-original.txt differs from {original}"
        );
    }
    for block in [
        SEED_QUICKSTART_RS,
        SEED_QUICKSTART_REPO,
        SEED_PRODUCTION,
        SEED_DEVELOPMENT,
        SEED_ALERT_RULES,
    ] {
        assert!(
            seed.contains(block),
            "testdata block not in the seed:\n{block}"
        );
    }
}

#[test]
fn seed_values_mean_what_they_say() {
    let objects = parse_documents(SEED_PRODUCTION).expect("seed parses");
    let Object::RegistrySecret(rs) = &objects[0] else {
        panic!("first is a RegistrySecret")
    };
    assert_eq!(objects[0].id(), "RegistrySecret production/harbor-prod");
    assert_eq!(rs.spec.domain, "harbor.example.com");
    assert_eq!(rs.spec.username.as_deref(), Some("prod-puller"));
    assert_eq!(rs.spec.password.as_deref(), Some("SecurePassword123"));
    assert_eq!(rs.spec.provider, Provider::Harbor);
    let Object::Repository(repo) = &objects[1] else {
        panic!("second is a Repository")
    };
    assert_eq!(objects[1].id(), "Repository production/myapp-v1.0.0");
    assert_eq!(repo.spec.repository, "myapp/myapp");
    assert_eq!(repo.spec.tag.as_deref(), Some("v1.0.0"));
    assert_eq!(repo.spec.registry_ref.name, "harbor-prod");
    assert_eq!(
        repo.spec.registry_ref.namespace.as_deref(),
        Some("production")
    );
    // The trailing `# comment` is not part of the value.
    assert_eq!(repo.spec.sync_interval.as_deref(), Some("24h"));
    assert_eq!(
        repo.spec.sync_interval_duration(),
        std::time::Duration::from_secs(86_400)
    );
}

#[test]
fn alert_rules_are_not_an_imgfleet_object() {
    check(
        SEED_ALERT_RULES,
        &["document 1: not an imgfleet object", "got a list"],
    );
}

#[test]
fn defaults_are_filled_in() {
    // Flow style, as short objects are often written.
    let text = "\
apiVersion: image.theriseunion.io/v1alpha1
kind: RegistrySecret
metadata: {name: anon}
spec: {domain: 127.0.0.1:5000, insecure: true}
";
    let objects = parse_documents(text).expect("valid");
    assert_eq!(objects[0].namespace(), Some("default"));
    assert_eq!(objects[0].metadata().namespace.as_deref(), Some("default"));
    let Object::RegistrySecret(rs) = &objects[0] else {
        panic!()
    };
    assert_eq!(rs.spec.provider, Provider::Generic);
    assert!(rs.spec.insecure);
    assert_eq!(rs.spec.username, None);

    let cluster = "\
apiVersion: image.theriseunion.io/v1alpha1
kind: Cluster
metadata:
  name: edge-1
  labels:
    region: east
";
    let objects = parse_documents(cluster).expect("a Cluster without spec is valid");
    assert_eq!(objects[0].namespace(), None);
    assert_eq!(objects[0].id(), "Cluster edge-1");
}

#[test]
fn a_full_repository_is_accepted() {
    let text = "\
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata:
  name: app
  namespace: team-a
  labels:
    app.kubernetes.io/name: app
spec:
  repository: team-a/app
  tagPattern:
    pattern: '^v1\\.[0-9]+\\.[0-9]+$'
    keepLatest: 3
  platforms: [linux/amd64, linux/arm64/v8]
  registryRef:
    name: harbor
  syncInterval: 1h30m
  placement:
    clusterSelector:
      matchLabels:
        region: east
      matchExpressions:
      - key: tier
        operator: In
        values: [edge, store]
      - key: maintenance
        operator: DoesNotExist
    clusters: [edge-7]
  retention:
    keepVersions: 3
    gracePeriod: 24h
  suspend: false
  verify:
    keys:
    - name: release
      publicKey: |
        -----BEGIN PUBLIC KEY-----
        MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEscTIV1qPEmBNCW5fu6mVPA5bfDcP
        xpQ01hPrQC4gwaLwVjTbjphlJMUlV7GNdBL14cKe5GJtGgLm6CdrEWoIgg==
        -----END PUBLIC KEY-----
    mode: warn
  scan:
    adapter: https://scanner.example:8080
    blockSeverity: High
";
    let objects = parse_documents(text).unwrap_or_else(|e| panic!("{e:?}"));
    let Object::Repository(r) = &objects[0] else {
        panic!()
    };
    let p = r.spec.tag_pattern.as_ref().expect("pattern");
    assert_eq!(p.pattern, "^v1\\.[0-9]+\\.[0-9]+$");
    assert_eq!(p.keep_latest, Some(3));
    let sel = r
        .spec
        .placement
        .as_ref()
        .and_then(|p| p.cluster_selector.as_ref())
        .expect("selector");
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert!(sel.matches(&labels(&[("region", "east"), ("tier", "edge")])));
    assert!(!sel.matches(&labels(&[("region", "east"), ("tier", "core")])));
    assert!(!sel.matches(&labels(&[
        ("region", "east"),
        ("tier", "edge"),
        ("maintenance", "yes")
    ])));
    assert_eq!(
        r.spec.grace_period_duration(),
        Some(std::time::Duration::from_secs(86_400))
    );
    let scan = r.spec.scan.as_ref().expect("scan");
    assert_eq!(scan.block_severity(), crate::model::BlockSeverity::High);
    let verify = r.spec.verify.as_ref().expect("verify");
    assert_eq!(verify.mode(), crate::model::VerifyMode::Warn);
    assert_eq!(verify.keys[0].name, "release");
    assert!(
        verify.keys[0]
            .public_key
            .starts_with("-----BEGIN PUBLIC KEY-----\n")
    );
}

/// Malformed variants of `REPO`: the line replaced, what replaces it, and what the
/// errors must say.
const MALFORMED_REPOSITORIES: &[(&str, &str, &[&str])] = &[
    // Durations.
    (
        "syncInterval: 1h",
        "syncInterval: 1x",
        &[
            r#"Repository default/nginx: spec.syncInterval "1x": expected a duration like 30m, 1h or 24h"#,
        ],
    ),
    (
        "syncInterval: 1h",
        "syncInterval: \"0\"",
        &[r#"spec.syncInterval "0": expected a duration"#],
    ),
    (
        "syncInterval: 1h",
        "syncInterval: \"\"",
        &[r#"spec.syncInterval "": expected a duration"#],
    ),
    (
        "syncInterval: 1h",
        "syncInterval: -1h",
        &[r#"spec.syncInterval "-1h": expected a duration"#],
    ),
    (
        "syncInterval: 1h",
        "syncInterval: 5s",
        &[r#"spec.syncInterval "5s": too short; expected at least 10s"#],
    ),
    (
        "syncInterval: 1h",
        "syncInterval: 30",
        &["spec.syncInterval: expected a string, got the number 30"],
    ),
    (
        "  syncInterval: 1h",
        "  syncInterval: 1h\n  retention:\n    gracePeriod: forever",
        &[r#"spec.retention.gracePeriod "forever": expected a duration"#],
    ),
    (
        "  syncInterval: 1h",
        "  syncInterval: 1h\n  verify:\n    mode: enforce",
        &["spec.verify.keys: required: expected at least one key"],
    ),
    (
        "  syncInterval: 1h",
        "  syncInterval: 1h\n  verify:\n    keys:\n    - {name: Release, publicKey: nope}\n    - {name: b}\n    mode: strict",
        &[
            r#"spec.verify.keys[0].name "Release": expected a DNS-1123 label"#,
            "spec.verify.keys[0].publicKey: expected an ECDSA P-256 public key in PEM",
            r#"spec.verify.mode "strict": expected one of enforce, warn"#,
            "spec.verify.keys[1].publicKey: required field is missing",
        ],
    ),
    (
        "  syncInterval: 1h",
        "  syncInterval: 1h\n  verify:\n    keys:\n    - {name: a, publicKey: x}\n    - {name: a, publicKey: x}",
        &[r#"spec.verify.keys[1].name "a": listed twice"#],
    ),
    (
        "  syncInterval: 1h",
        "  syncInterval: 1h\n  scan:\n    adapter: scanner:8080\n    blockSeverity: Severe",
        &[
            r#"spec.scan.adapter "scanner:8080": expected the adapter's URL"#,
            r#"spec.scan.blockSeverity "Severe": expected one of Critical, High, Medium, Low, None"#,
        ],
    ),
    // Unknown fields, with hints, at every level.
    (
        "syncInterval: 1h",
        "syncIntervall: 1h",
        &[
            "Repository default/nginx: spec.syncIntervall: unknown field, did you mean syncInterval?",
        ],
    ),
    (
        "  name: nginx",
        "  nmae: nginx",
        &[
            "metadata.nmae: unknown field, did you mean name?",
            "metadata.name: required field is missing",
        ],
    ),
    (
        "    name: harbor-prod",
        "    name: harbor-prod\n    namespce: default",
        &["spec.registryRef.namespce: unknown field, did you mean namespace?"],
    ),
    // Missing required fields.
    (
        "  repository: library/nginx\n",
        "",
        &["Repository default/nginx: spec.repository: required field is missing"],
    ),
    (
        "  registryRef:\n    name: harbor-prod\n",
        "",
        &["spec.registryRef: required field is missing"],
    ),
    (
        "    name: harbor-prod\n",
        "    namespace: default\n",
        &["spec.registryRef.name: required field is missing"],
    ),
    (
        "  tag: latest\n",
        "",
        &["spec.tag: required field is missing: expected one of tag, tags, tagPattern or digest"],
    ),
    // Wrong types.
    (
        "tag: latest",
        "tag: [a]",
        &["spec.tag: expected a string, got a list"],
    ),
    (
        "  syncInterval: 1h",
        "  syncInterval: 1h\n  suspend: \"yes\"",
        &[r#"spec.suspend: expected true or false, got the string "yes""#],
    ),
    (
        "  syncInterval: 1h",
        "  syncInterval: 1h\n  retention:\n    keepVersions: -1",
        &[
            "spec.retention.keepVersions: -1 is out of range: expected an integer from 0 to 4294967295",
        ],
    ),
    (
        "  registryRef:\n    name: harbor-prod\n",
        "  registryRef: harbor-prod\n",
        &["spec.registryRef: expected a mapping, got the string \"harbor-prod\""],
    ),
    // apiVersion and kind.
    (
        "kind: Repository",
        "kind: Deployment",
        &[r#"document 1: kind "Deployment": expected one of RegistrySecret, Repository, Cluster"#],
    ),
    (
        "kind: Repository",
        "kind: Repositroy",
        &["did you mean Repository?"],
    ),
    (
        "apiVersion: image.theriseunion.io/v1alpha1",
        "apiVersion: v1",
        &[r#"document 1: apiVersion "v1": expected image.theriseunion.io/v1alpha1"#],
    ),
    (
        "apiVersion: image.theriseunion.io/v1alpha1\n",
        "",
        &["document 1: apiVersion: required field is missing"],
    ),
    // Repository fields.
    (
        "repository: library/nginx",
        "repository: Library/Nginx",
        &[
            r#"spec.repository "Library/Nginx": expected a repository path like library/nginx"#,
            "lowercase",
        ],
    ),
    (
        "repository: library/nginx",
        "repository: nginx:latest",
        &[
            r#"spec.repository "nginx:latest": expected a repository path"#,
            "put the tag in spec.tag",
        ],
    ),
    (
        "repository: library/nginx",
        "repository: /nginx",
        &[
            r#"spec.repository "/nginx": expected a repository path"#,
            "leading",
        ],
    ),
    (
        "tag: latest",
        "tag: -bad",
        &[r#"spec.tag "-bad": expected a tag"#],
    ),
    (
        "tag: latest",
        "tag: latest\n  tags: [a, b]",
        &["spec.tags: set together with spec.tag: expected only one of tag, tags or tagPattern"],
    ),
    (
        "tag: latest",
        "tags: [a, a]",
        &[r#"spec.tags[1] "a": listed twice"#],
    ),
    (
        "tag: latest",
        "tagPattern:\n    pattern: \"v(1\"\n    keepLatest: 0",
        &[
            r#"spec.tagPattern.pattern "v(1": expected a valid regular expression"#,
            "spec.tagPattern.keepLatest: 0 is too small: expected at least 1",
        ],
    ),
    (
        "tag: latest",
        "digest: sha256:1234",
        &[r#"spec.digest "sha256:1234": expected sha256: followed by 64 lowercase hex digits"#],
    ),
    (
        "tag: latest",
        "tag: latest\n  platforms: [linux, linux/amd64]",
        &[r#"spec.platforms[0] "linux": expected os/arch or os/arch/variant"#],
    ),
    (
        "    name: harbor-prod",
        "    name: harbor-prod\n    namespace: other",
        &[
            r#"spec.registryRef.namespace "other": expected the Repository's own namespace "default""#,
        ],
    ),
    // Metadata.
    (
        "  name: nginx",
        "  name: Nginx_1",
        &[r#"metadata.name "Nginx_1": expected a DNS-1123 name"#],
    ),
    (
        "  namespace: default",
        "  namespace: my.ns",
        &[r#"metadata.namespace "my.ns": expected a DNS-1123 label"#],
    ),
    (
        "  tag: latest\n",
        "  tag: latest\n  tag: other\n",
        &["input: not valid YAML", "duplicate mapping key: tag"],
    ),
];

/// Malformed placements of `REPO`: the `placement` block, and what the errors must say.
const MALFORMED_PLACEMENTS: &[(&str, &[&str])] = &[
    (
        "    clusterSelector:\n      matchExpressions:\n      - key: tier\n        operator: Maybe\n        values: [a]",
        &[
            r#"spec.placement.clusterSelector.matchExpressions[0].operator "Maybe": expected one of In, NotIn, Exists, DoesNotExist"#,
        ],
    ),
    (
        "    clusterSelector:\n      matchExpressions:\n      - key: tier\n        operator: Exists\n        values: [a]",
        &[
            "spec.placement.clusterSelector.matchExpressions[0].values: expected no values for operator Exists",
        ],
    ),
    (
        "    clusterSelector:\n      matchExpressions:\n      - key: tier\n        operator: In\n        values: []",
        &[
            "spec.placement.clusterSelector.matchExpressions[0].values: expected at least one value for operator In",
        ],
    ),
    (
        "    clusterSelector:\n      matchLabels:\n        tier: \"bad value!\"",
        &[
            r#"spec.placement.clusterSelector.matchLabels.tier "bad value!": expected a label value"#,
        ],
    ),
    (
        "    clusters: [Edge_1]",
        &[r#"spec.placement.clusters[0] "Edge_1": expected a cluster name"#],
    ),
];

/// Malformed variants of `SECRET`: the line replaced, what replaces it, and what the
/// errors must say.
const MALFORMED_SECRETS: &[(&str, &str, &[&str])] = &[
    (
        "provider: harbor",
        "provider: quay",
        &[
            r#"RegistrySecret default/harbor-prod: spec.provider "quay": expected one of harbor, dockerhub, aliyun, generic"#,
        ],
    ),
    (
        "provider: harbor",
        "provider: Harbor",
        &[
            r#"spec.provider "Harbor": expected one of harbor, dockerhub, aliyun, generic, did you mean harbor?"#,
        ],
    ),
    (
        "domain: harbor.example.com",
        "domain: harbor..example.com",
        &[r#"spec.domain "harbor..example.com": expected a host or host:port"#],
    ),
    (
        "domain: harbor.example.com",
        "domain: https://x",
        &[
            r#"spec.domain "https://x": expected a host or host:port"#,
            "without a scheme",
        ],
    ),
    (
        "domain: harbor.example.com",
        "domain: \"harbor example.com\"",
        &[r#"spec.domain "harbor example.com": expected a host or host:port"#],
    ),
    (
        "domain: harbor.example.com",
        "domain: harbor.example.com:70000",
        &["port 70000 is out of range", "from 1 to 65535"],
    ),
    (
        "domain: harbor.example.com",
        "domain: harbor.example.com/v2",
        &["without a path"],
    ),
    (
        "  password: Hunter2Secret\n",
        "",
        &["spec.password: required field is missing: username is set"],
    ),
    (
        "  username: admin\n",
        "",
        &["spec.username: required field is missing: password is set"],
    ),
    (
        "password: Hunter2Secret",
        "password: [Hunter2Secret]",
        &["spec.password: expected a string"],
    ),
    (
        "  domain: harbor.example.com\n",
        "",
        &["spec.domain: required field is missing"],
    ),
];

/// `REPO` with a `placement` block (lines indented by 4).
fn repo_with_placement(body: &str) -> String {
    repo_with(
        "  syncInterval: 1h",
        &format!("  syncInterval: 1h\n  placement:\n{body}"),
    )
}

#[test]
fn malformed_repositories_are_refused_naming_field_and_expectation() {
    for (from, to, expected) in MALFORMED_REPOSITORIES {
        check(&repo_with(from, to), expected);
    }
    for (placement, expected) in MALFORMED_PLACEMENTS {
        check(&repo_with_placement(placement), expected);
    }
}

#[test]
fn malformed_secrets_are_refused_naming_field_and_expectation() {
    for (from, to, expected) in MALFORMED_SECRETS {
        check(&secret_with(from, to), expected);
    }
}

#[test]
fn malformed_documents_are_refused_naming_what_is_wrong() {
    check(
        &format!("{REPO}status:\n  foo: 1\nextra: true\n"),
        &[
            "status.foo: unknown field; expected one of",
            "extra: unknown field; expected one of",
        ],
    );
    // Cluster.
    check(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: edge-1\n  namespace: default\nspec:\n  tenants: [team-a, Team_B]\n",
        &[
            r#"Cluster edge-1: metadata.namespace "default": Cluster is cluster-scoped; expected no namespace"#,
            r#"Cluster edge-1: spec.tenants[1] "Team_B": expected a namespace name"#,
        ],
    );
    // Whole documents.
    check(
        &format!("{REPO}---\n{REPO}"),
        &["Repository default/nginx: defined twice in one input (documents 1 and 2)"],
    );
    check("kind: [unclosed\n", &["input: not valid YAML: line 1"]);
}

#[test]
fn every_error_of_a_document_is_reported() {
    let text = repo_with("syncInterval: 1h", "syncIntervall: 1h")
        .replace("repository: library/nginx", "repository: Library/Nginx")
        .replace("tag: latest", "tag: -x");
    let errors = parse_documents(&format!(
        "{text}---\n{}",
        secret_with("provider: harbor", "provider: quay")
    ))
    .expect_err("malformed");
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 4, "{text:#?}");
    assert!(text[0].contains("spec.syncIntervall: unknown field"));
    assert!(
        text.iter()
            .any(|e| e.contains("spec.repository \"Library/Nginx\""))
    );
    assert!(text.iter().any(|e| e.contains("spec.tag \"-x\"")));
    assert!(text[3].starts_with("RegistrySecret default/harbor-prod: spec.provider"));
}

#[test]
fn check_documents_keeps_valid_objects_beside_errors() {
    let checked = check_documents(&format!(
        "{SECRET}---\n{}",
        repo_with("tag: latest", "tag: -x")
    ));
    assert_eq!(checked.objects.len(), 1);
    assert_eq!(
        checked.objects[0].id(),
        "RegistrySecret default/harbor-prod"
    );
    assert_eq!(checked.errors.len(), 1);
}

#[test]
fn json_input_is_accepted() {
    let text = r#"{"apiVersion": "image.theriseunion.io/v1alpha1", "kind": "Cluster",
        "metadata": {"name": "edge-1", "labels": {"region": "east"}},
        "spec": {"tenants": ["default"]}}"#;
    let objects = parse_documents(text).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(objects[0].kind(), Kind::Cluster);
}

#[test]
fn passwords_never_appear_in_debug_output() {
    let objects = parse_documents(SECRET).expect("valid");
    let debug = format!("{:?} {:#?}", objects, objects[0]);
    assert!(!debug.contains("Hunter2Secret"), "{debug}");
    assert!(debug.contains("<redacted>"));
    let redacted = objects[0].redacted();
    let yaml = serde_saphyr::to_string(&redacted).expect("serializes");
    assert!(
        !yaml.contains("Hunter2Secret") && !yaml.contains("password"),
        "{yaml}"
    );
}

#[test]
fn kinds_parse_in_every_form() {
    for (text, kind) in [
        ("registrysecret", Kind::RegistrySecret),
        ("RegistrySecrets", Kind::RegistrySecret),
        ("rs", Kind::RegistrySecret),
        ("repository", Kind::Repository),
        ("Repositories", Kind::Repository),
        ("REPO", Kind::Repository),
        ("cluster", Kind::Cluster),
        ("clusters", Kind::Cluster),
        ("rolebindings", Kind::RoleBinding),
        ("rb", Kind::RoleBinding),
        ("ClusterRoleBinding", Kind::ClusterRoleBinding),
        ("crb", Kind::ClusterRoleBinding),
    ] {
        assert_eq!(Kind::parse(text), Ok(kind), "{text}");
    }
    assert_eq!(
        Kind::parse("foo").map_err(|e| e.to_string()),
        Err(r#"unknown kind "foo": expected one of registrysecret (rs), repository (repo), cluster, rolebinding (rb), clusterrolebinding (crb)"#.to_owned())
    );
}

const BINDINGS: &str = r#"
apiVersion: image.theriseunion.io/v1alpha1
kind: RoleBinding
metadata: {name: team-a-devs, namespace: team-a}
spec:
  role: editor
  subjects: [{kind: Group, name: dev}, {kind: User, name: user-a}]
---
apiVersion: image.theriseunion.io/v1alpha1
kind: ClusterRoleBinding
metadata: {name: auditors}
spec:
  role: cluster-viewer
  subjects: [{kind: User, name: auditor}]
"#;

#[test]
fn bindings_parse_and_round_trip_the_wire() {
    let objects = parse_documents(BINDINGS).expect("valid");
    assert_eq!(objects.len(), 2);
    assert_eq!(objects[0].id(), "RoleBinding team-a/team-a-devs");
    assert_eq!(objects[1].id(), "ClusterRoleBinding auditors");
    for o in &objects {
        assert_eq!(&wire_round_trip(o), o);
    }
}

#[test]
fn bad_bindings_name_the_field() {
    let check = |yaml: &str, want: &[&str]| {
        let errors: Vec<String> = parse_documents(yaml)
            .expect_err(yaml)
            .iter()
            .map(ToString::to_string)
            .collect();
        for w in want {
            assert!(
                errors.iter().any(|e| e.contains(w)),
                "{w} not in {errors:#?}"
            );
        }
    };
    check(
        &BINDINGS.replace("role: editor", "role: owner"),
        &[r#"RoleBinding team-a/team-a-devs: spec.role "owner": expected viewer, editor or admin"#],
    );
    check(
        &BINDINGS.replace("role: editor", "role: cluster-admin"),
        &[r#"spec.role "cluster-admin": expected viewer, editor or admin"#],
    );
    check(
        &BINDINGS.replace("role: cluster-viewer", "role: admin"),
        &[
            r#"ClusterRoleBinding auditors: spec.role "admin": expected cluster-viewer or cluster-admin"#,
        ],
    );
    check(
        &BINDINGS.replace("kind: Group", "kind: Team"),
        &[r#"spec.subjects[0].kind "Team": expected User or Group"#],
    );
    check(
        &BINDINGS.replace("name: user-a}", "name: \"user a\"}"),
        &[r#"spec.subjects[1].name "user a": expected a user or group name"#],
    );
    check(
        &BINDINGS.replace("subjects: [{kind: User, name: auditor}]", "subjects: []"),
        &["ClusterRoleBinding auditors: spec.subjects: empty"],
    );
}

fn wire_round_trip(object: &Object) -> Object {
    let wire = pb::Object::from(object);
    // Through the bytes too, so nothing relies on in-memory sharing.
    let bytes = prost::Message::encode_to_vec(&wire);
    let decoded: pb::Object = prost::Message::decode(bytes.as_slice()).expect("decodes");
    Object::try_from(decoded).expect("converts back")
}

#[test]
fn yaml_model_wire_model_round_trips() {
    let with_status = "\
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata: {name: web, namespace: team-b, labels: {tier: edge}, resourceVersion: \"42\",
  generation: 3, uid: 0b6c-11, creationTimestamp: 2026-01-08T10:00:00Z}
spec:
  repository: team-b/web
  tags: [v1, v2]
  platforms: [linux/amd64]
  registryRef:
    name: harbor
    namespace: team-b
  syncInterval: 30m
  placement:
    clusterSelector:
      matchLabels: {region: east}
      matchExpressions:
      - {key: tier, operator: NotIn, values: [core]}
    clusters: [edge-1]
  retention: {keepVersions: 2, gracePeriod: 12h}
  suspend: true
  verify:
    keys:
    - name: release
      publicKey: |
        -----BEGIN PUBLIC KEY-----
        MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEscTIV1qPEmBNCW5fu6mVPA5bfDcP
        xpQ01hPrQC4gwaLwVjTbjphlJMUlV7GNdBL14cKe5GJtGgLm6CdrEWoIgg==
        -----END PUBLIC KEY-----
    mode: enforce
  scan: {adapter: \"http://127.0.0.1:9\", blockSeverity: None}
status:
  resolved:
  - {tag: v1, digest: \"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\", mediaType: application/vnd.oci.image.index.v1+json}
  lastResolveTime: 2026-01-08T10:05:00Z
  reason: RateLimited
  message: slow down
  stale: true
  retryAfter: 2026-01-08T10:10:00Z
  clusters:
  - cluster: edge-1
    digest: \"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"
    phase: Syncing
    bytesDone: 100
    bytesTotal: 400
    layersDone: 1
    layersTotal: 4
    lastSyncTime: 2026-01-08T09:00:00Z
    message: copying
    lastKnown: true
  syncedClusters: 0
  targetClusters: 1
  observedGeneration: 3
  revisions:
  - {revision: 1, resolved: [{tag: v1, digest: \"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"}],
     firstResolved: 2026-01-08T09:00:00Z, cause: Created, user: alice, generation: 2}
  - {revision: 2, resolved: [{tag: v1, digest: \"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\", scan: no findings, verification: verified (key release)}],
     firstResolved: 2026-01-08T10:00:00Z, cause: TagMove, generation: 3, heldBack: true}
  - {revision: 3, resolved: [{tag: v1, digest: \"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"}],
     firstResolved: 2026-01-08T10:01:00Z, cause: Rollback, user: bob, generation: 3, rollbackTo: 1}
  pinnedRevision: 3
";
    let cluster = "\
apiVersion: image.theriseunion.io/v1alpha1
kind: Cluster
metadata:
  name: edge-1
  labels: {region: east}
spec:
  tenants: [team-a]
  description: store 7
status:
  phase: Connected
  lastSeen: 2026-01-08T10:00:00Z
  agentVersion: 0.1.0
  storageUsedBytes: 10
  storageCapacityBytes: 100
  desiredGeneration: 5
  appliedGeneration: 4
  hubReplica: hub-0
  imagesDesired: 2
  imagesSynced: 1
";
    // The agent's inventory: written by the hub, read by `rollout history`.
    let holding = "\
apiVersion: image.theriseunion.io/v1alpha1
kind: Cluster
metadata: {name: edge-2}
status:
  phase: Offline
  held:
  - registry: harbor.example.com
    repository: team-b/web
    digests:
    - \"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"
    - \"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"
  heldTruncated: true
";
    let secret_with_status = format!(
        "{SECRET}  insecure: true\nstatus:\n  phase: AuthFailed\n  lastCheckTime: 2026-01-08T10:00:00Z\n  latencyMs: 12\n  message: unauthorized\n"
    );
    let mut all = Vec::new();
    for text in [
        SEED_QUICKSTART_RS,
        SEED_QUICKSTART_REPO,
        SEED_PRODUCTION,
        SEED_DEVELOPMENT,
        with_status,
        cluster,
        holding,
        &secret_with_status,
    ] {
        all.extend(parse_documents(text).unwrap_or_else(|e| panic!("{e:?}")));
    }
    for object in &all {
        assert_eq!(&wire_round_trip(object), object, "{}", object.id());
        // And back out through YAML, the way `get -o yaml` prints it.
        let yaml = serde_saphyr::to_string(object).expect("serializes");
        let again = parse_documents(&yaml).unwrap_or_else(|e| panic!("{yaml}\n{e:?}"));
        assert_eq!(&again[0], object, "{yaml}");
    }
}

#[test]
fn cluster_status_says_what_the_cluster_holds() {
    let objects = parse_documents(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: Cluster\nmetadata: {name: edge-1}\n\
         status:\n  held:\n  - {registry: r.example, repository: team/app, digests: [\"sha256:1\", \"sha256:2\"]}\n",
    )
    .expect("valid");
    let Object::Cluster(c) = &objects[0] else {
        panic!("a Cluster")
    };
    let st = c.status.as_ref().expect("status");
    assert!(st.holds("r.example", "team/app", "sha256:2"));
    assert!(!st.holds("r.example", "team/app", "sha256:3"));
    assert!(!st.holds("r.example", "team/web", "sha256:1"));
    assert!(!st.holds("s.example", "team/app", "sha256:1"));
    assert!(!st.held_truncated);
    // A Cluster stored before `held` existed loads, holding nothing known.
    let old: Cluster = serde_json::from_str(
        r#"{"apiVersion":"image.theriseunion.io/v1alpha1","kind":"Cluster","metadata":{"name":"edge-1"},"spec":{},"status":{"phase":"Connected","imagesSynced":1}}"#,
    )
    .expect("an older Cluster loads");
    let st = old.status.expect("status");
    assert!(st.held.is_empty() && !st.held_truncated);
    // And an empty inventory is not written at all.
    let json = serde_json::to_string(&st).expect("serializes");
    assert!(!json.contains("held"), "{json}");
}

#[test]
fn responses_never_carry_the_password() {
    let objects = parse_documents(SECRET).expect("valid");
    let wire = crate::convert::to_response(&objects[0]);
    let Some(pb::object::Kind::RegistrySecret(rs)) = &wire.kind else {
        panic!("a RegistrySecret")
    };
    let spec = rs.spec.as_ref().expect("spec");
    assert!(spec.password.is_empty());
    assert!(spec.password_set);
    assert_eq!(spec.username, "admin");
    // The request form keeps it, since Apply must deliver it.
    let Some(pb::object::Kind::RegistrySecret(rs)) = pb::Object::from(&objects[0]).kind else {
        panic!("a RegistrySecret")
    };
    assert_eq!(
        rs.spec.map(|s| s.password),
        Some("Hunter2Secret".to_owned())
    );
}

#[test]
fn wire_errors_name_the_field() {
    let mut wire = pb::Repository::from(match &parse_documents(REPO).expect("valid")[0] {
        Object::Repository(r) => r,
        _ => panic!(),
    });
    if let Some(spec) = &mut wire.spec {
        spec.registry_ref = None;
    }
    let e = Repository::try_from(wire.clone()).expect_err("no registryRef");
    assert_eq!(e.field, "spec.registryRef");
    assert!(
        e.to_string()
            .starts_with("Repository default/nginx: spec.registryRef: missing")
    );

    let secret = pb::RegistrySecret {
        metadata: Some(pb::ObjectMeta {
            name: "x".into(),
            namespace: "ns".into(),
            ..Default::default()
        }),
        spec: Some(pb::RegistrySecretSpec {
            domain: "r.example".into(),
            provider: 99,
            ..Default::default()
        }),
        status: None,
    };
    let e = RegistrySecret::try_from(secret).expect_err("unknown provider");
    assert_eq!(
        e.to_string(),
        "RegistrySecret ns/x: spec.provider: unknown enum value 99"
    );
    let mut bad_time = pb::Cluster {
        metadata: Some(pb::ObjectMeta {
            name: "edge-1".into(),
            creation_timestamp: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
            ..Default::default()
        }),
        spec: None,
        status: None,
    };
    let e = Cluster::try_from(bad_time.clone()).expect_err("time out of range");
    assert_eq!(e.field, "metadata.creationTimestamp");
    assert!(
        e.to_string()
            .starts_with("Cluster edge-1: metadata.creationTimestamp: timestamp")
    );
    bad_time.metadata = None;
    let e = Cluster::try_from(bad_time).expect_err("no metadata");
    assert_eq!(e.field, "metadata");
    let e = Object::try_from(pb::Object { kind: None }).expect_err("empty");
    assert_eq!(e.field, "kind");
}

#[test]
fn objects_deserialize_by_their_kind() {
    // Stored objects are read back with plain serde; the kind decides the type
    // even when the shapes would also fit another kind.
    let cluster = parse_documents(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: Cluster\nmetadata: {name: edge-1}\n",
    )
    .expect("valid");
    let json = serde_json::to_string(&cluster[0]).expect("json");
    let back: Object = serde_json::from_str(&json).expect("reads back");
    assert_eq!(back, cluster[0]);
    let all = parse_documents(SEED_PRODUCTION).expect("valid");
    for o in &all {
        let back: Object =
            serde_json::from_slice(&serde_json::to_vec(o).expect("json")).expect("reads back");
        assert_eq!(&back, o);
    }
    let e = serde_json::from_str::<Object>(r#"{"kind": "Deployment"}"#).expect_err("unknown kind");
    assert!(e.to_string().contains("kind \"Deployment\""), "{e}");
}

/// A YAML flow list of `n` distinct values made by `item`.
fn flow_list(n: usize, item: impl Fn(usize) -> String) -> String {
    let items: Vec<String> = (0..n).map(item).collect();
    format!("[{}]", items.join(", "))
}

/// A string of `n` bytes.
fn long(n: usize) -> String {
    "a".repeat(n)
}

/// A Cluster `edge-1` with one line of `spec`.
fn cluster_with(spec_line: &str) -> String {
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: edge-1\nspec:\n  {spec_line}\n"
    )
}

/// A Repository placed by a `clusterSelector` with the given body.
fn selector_with(selector: &str) -> String {
    repo_with(
        "tag: latest",
        &format!("tag: latest\n  placement: {{clusterSelector: {{{selector}}}}}"),
    )
}

#[test]
fn oversized_fields_are_refused_naming_field_and_limit() {
    use super::validate::*;
    // (the object with n of the field's unit, the limit, what the error says one past
    // it); at the limit the object is valid.
    type OfSize = fn(usize) -> String;
    let cases: &[(OfSize, usize, &str)] = &[
        (
            |n| {
                secret_with(
                    "password: Hunter2Secret",
                    &format!("password: Hunter2Secret{}", long(n - 13)),
                )
            },
            MAX_PASSWORD_BYTES,
            "RegistrySecret default/harbor-prod: spec.password: 64.0 KiB long: expected a password or token of at most 64 KiB",
        ),
        (
            |n| secret_with("username: admin", &format!("username: {}", long(n))),
            MAX_USERNAME_BYTES,
            "spec.username: 1.0 KiB long: expected a user name of at most 1 KiB",
        ),
        (
            |n| {
                repo_with(
                    "tag: latest",
                    &format!("tags: {}", flow_list(n, |i| format!("v{i}"))),
                )
            },
            MAX_TAGS,
            "spec.tags: 257 entries: expected at most 256; a tagPattern with keepLatest picks many tags",
        ),
        (
            |n| {
                repo_with(
                    "tag: latest",
                    &format!("tagPattern: {{pattern: '^v', keepLatest: {n}}}"),
                )
            },
            MAX_TAGS,
            "spec.tagPattern.keepLatest: 257 is too large: expected at most 256 versions",
        ),
        (
            |n| {
                repo_with(
                    "tag: latest",
                    &format!("tagPattern: {{pattern: '{}'}}", long(n)),
                )
            },
            MAX_PATTERN_BYTES,
            "spec.tagPattern.pattern: 1.0 KiB long: expected a regular expression of at most 1 KiB",
        ),
        (
            |n| {
                repo_with(
                    "tag: latest",
                    &format!(
                        "tag: latest\n  platforms: {}",
                        flow_list(n, |i| format!("linux/arch{i}"))
                    ),
                )
            },
            MAX_PLATFORMS,
            "spec.platforms: 17 entries: expected at most 16",
        ),
        (
            |n| {
                repo_with(
                    "tag: latest",
                    &format!(
                        "tag: latest\n  placement: {{clusters: {}}}",
                        flow_list(n, |i| format!("edge-{i}"))
                    ),
                )
            },
            MAX_PLACEMENT_CLUSTERS,
            "spec.placement.clusters: 1001 entries: expected at most 1000; select that many clusters by label with clusterSelector",
        ),
        (
            |n| {
                selector_with(&format!(
                    "matchExpressions: [{{key: site, operator: In, values: {}}}]",
                    flow_list(n, |i| format!("s{i}"))
                ))
            },
            MAX_SELECTOR_VALUES,
            "spec.placement.clusterSelector.matchExpressions[0].values: 65 entries: expected at most 64",
        ),
        (
            |n| {
                selector_with(&format!(
                    "matchExpressions: {}",
                    flow_list(n, |i| format!("{{key: k{i}, operator: Exists}}"))
                ))
            },
            MAX_SELECTOR_EXPRESSIONS,
            "spec.placement.clusterSelector.matchExpressions: 33 entries: expected at most 32",
        ),
        (
            |n| {
                repo_with(
                    "  namespace: default\n",
                    &format!(
                        "  namespace: default\n  labels: {{{}}}\n",
                        (0..n)
                            .map(|i| format!("k{i}: v"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            },
            MAX_LABELS,
            "metadata.labels: 65 entries: expected at most 64",
        ),
        (
            |n| {
                repo_with(
                    "  namespace: default\n",
                    &format!(
                        "  namespace: default\n  annotations: {{note: {}}}\n",
                        long(n - 4)
                    ),
                )
            },
            MAX_ANNOTATIONS_BYTES,
            "metadata.annotations: 256.0 KiB in keys and values: expected at most 256 KiB in total, as in Kubernetes",
        ),
        (
            |n| cluster_with(&format!("tenants: {}", flow_list(n, |i| format!("t{i}")))),
            MAX_TENANTS,
            "Cluster edge-1: spec.tenants: 1001 entries: expected at most 1000",
        ),
        (
            |n| cluster_with(&format!("description: {}", long(n))),
            MAX_DESCRIPTION_BYTES,
            "Cluster edge-1: spec.description: 4.0 KiB long: expected a description of at most 4 KiB",
        ),
    ];
    for (object, limit, want) in cases {
        check(&object(limit + 1), &[want]);
        if let Err(e) = parse_documents(&object(*limit)) {
            panic!("at the limit of {want:?}, refused: {e:?}");
        }
    }
    // A duration's limit is its longest form, which no repetition of one unit reaches.
    check(
        &repo_with(
            "syncInterval: 1h",
            &format!("syncInterval: \"{}\"", "1h".repeat(MAX_DURATION_BYTES)),
        ),
        &[
            "spec.syncInterval: 104 bytes long: expected a duration like 30m, 1h or 24h of at most 52 bytes",
        ],
    );
    parse_documents(&repo_with(
        "syncInterval: 1h",
        "syncInterval: \"000000000001d000000000001h000000000001m000000000001s\"",
    ))
    .expect("the longest duration is valid");
}

#[test]
fn errors_about_long_values_do_not_repeat_them() {
    let name = "x".repeat(10_000);
    let errors = parse_documents(&repo_with("tag: latest", &format!("tag: {name}")))
        .expect_err("too long a tag");
    let text = errors[0].to_string();
    assert!(
        text.starts_with(&format!(
            "Repository default/nginx: spec.tag \"{}\"... (9.8 KiB): expected a tag",
            "x".repeat(64)
        )),
        "{text}"
    );
    assert!(text.len() < 400, "{text}");
    let errors = parse_documents(&secret_with(
        "domain: harbor.example.com",
        &format!("domain: {name}"),
    ))
    .expect_err("too long a domain");
    assert!(
        errors[0].to_string().contains("spec.domain \"xxxx"),
        "{errors:?}"
    );
    assert!(
        errors[0]
            .to_string()
            .contains("9.8 KiB long: expected a host")
    );
    assert!(errors[0].to_string().len() < 400);
}

#[test]
fn the_document_limit_is_named_with_what_to_do() {
    use super::parse::MAX_DOCUMENTS;
    let object = |i: usize| repo_with("name: nginx", &format!("name: r{i}"));
    let many = |n: usize| (0..n).map(object).collect::<Vec<_>>().join("---\n");
    // At the limit, with or without a trailing separator, every object is read.
    for text in [many(MAX_DOCUMENTS), format!("{}---\n", many(MAX_DOCUMENTS))] {
        let objects = parse_documents(&text).unwrap_or_else(|e| panic!("{:?}", &e[..1]));
        assert_eq!(objects.len(), MAX_DOCUMENTS);
    }
    for text in [many(MAX_DOCUMENTS + 1), many(MAX_DOCUMENTS + 100)] {
        let checked = check_documents(&text);
        assert!(checked.objects.is_empty());
        assert_eq!(checked.errors.len(), 1, "{:?}", &checked.errors[..2]);
        assert_eq!(
            checked.errors[0].to_string(),
            "input: more than 1024 documents: one file holds at most 1024 objects \
             (documents separated by ---); split it into several files and give each with -f, \
             e.g. imgfleet apply -f part-1.yaml -f part-2.yaml"
        );
    }
    // Other limits of the YAML reader are named too, not shown as debug output.
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let checked = check_documents(&deep);
    assert_eq!(checked.errors.len(), 1);
    assert!(
        checked.errors[0]
            .to_string()
            .starts_with("input: nested more than 64 levels deep"),
        "{}",
        checked.errors[0]
    );
}
