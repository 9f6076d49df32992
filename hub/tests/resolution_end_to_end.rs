//! Tag resolution end to end with real processes: the `imgfleet-hub` binary
//! and the `imgfleet` CLI, a htpasswd-protected distribution registry, and
//! (once) a real etcd. The seed's YAML, pointed at the registry, is applied;
//! every Repository's resolved digest equals the pushed manifest's; a wrong
//! password turns the RegistrySecret AuthFailed; a stale resourceVersion is
//! refused; the plaintext password is in no stored byte, log or answer; a
//! SIGKILLed hub restarts with everything. On etcd, two replicas elect
//! exactly one resolver leader, and the other takes over when the leader is
//! SIGKILLed. Each step of the scenario is a function named for what it
//! shows.
//!
//! The CLI binary must be built first: `cargo build -p imgfleet --bin imgfleet`.

use std::path::Path;
use std::time::{Duration, Instant};

use imgfleet_tests::images::{ImageSpec, PushedImage, push_image};
use imgfleet_tests::{Etcd, Registry, RegistryOptions};
use serde_json::Value;

mod support;
use support::{ETCD_PREFIX, Hub, Out, cli_binary, run_cli, start_hub};

const SEEDS: [&str; 2] = [
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/testdata/seed-quickstart.yaml"
    ),
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/testdata/seed-production.yaml"
    ),
];
const USER: &str = "admin";
const PASSWORD: &str = "Harbor12345";
/// The production seed's own password; the test registry has one user, so
/// the seed is pointed at it, and this must appear nowhere either.
const SEED_PROD_PASSWORD: &str = "SecurePassword123";
const WRONG_PASSWORD: &str = "WrongPassword999";
const SECRETS: [&str; 3] = [PASSWORD, SEED_PROD_PASSWORD, WRONG_PASSWORD];
/// How long resolution may take to show after a change.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(20);

fn cli(hub: &Hub, args: &[&str]) -> Out {
    let o = run_cli(hub, args);
    // No answer of the CLI ever shows a password.
    for secret in SECRETS {
        assert!(
            !o.stdout.contains(secret) && !o.stderr.contains(secret),
            "imgfleet {args:?} printed a password"
        );
    }
    o
}

fn ok(hub: &Hub, args: &[&str]) -> String {
    let o = cli(hub, args);
    assert_eq!(
        o.code,
        Some(0),
        "imgfleet {args:?}\nstdout: {}\nstderr: {}",
        o.stdout,
        o.stderr
    );
    o.stdout
}

fn json(hub: &Hub, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = ok(hub, &all);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("imgfleet {all:?}: not JSON ({e}):\n{out}"))
}

/// The objects of a `get -o json` answer (a List or one object).
fn items(v: &Value) -> Vec<Value> {
    match v.get("items").and_then(Value::as_array) {
        Some(items) => items.clone(),
        None => vec![v.clone()],
    }
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    field(v, path).and_then(Value::as_str)
}

/// `namespace/name` -> first resolved digest, for every Repository.
fn resolved_digests(hub: &Hub) -> Vec<(String, Option<String>)> {
    items(&json(hub, &["get", "repositories", "-A"]))
        .iter()
        .map(|r| {
            let id = format!(
                "{}/{}",
                str_at(r, &["metadata", "namespace"]).unwrap_or(""),
                str_at(r, &["metadata", "name"]).unwrap_or("")
            );
            let digest = field(r, &["status", "resolved"])
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(|t| str_at(t, &["digest"]))
                .map(str::to_owned);
            (id, digest)
        })
        .collect()
}

/// Polls `probe` until it returns `Some`, at most `deadline`.
async fn eventually<T>(what: &str, deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The seeds, with the domain pointed at the local registry over plain HTTP
/// and the production credentials set to the registry's one user.
fn seed_yaml(registry: &Registry) -> String {
    SEEDS
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("seed file"))
        .collect::<Vec<_>>()
        .join("\n---\n")
        .replace(
            "domain: \"harbor.example.com\"",
            &format!("domain: \"{}\"\n  insecure: true", registry.addr()),
        )
        .replace(
            "username: \"prod-puller\"",
            &format!("username: \"{USER}\""),
        )
        .replace(
            &format!("password: \"{SEED_PROD_PASSWORD}\""),
            &format!("password: \"{PASSWORD}\""),
        )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write YAML");
    p.to_str().expect("utf8 path").to_owned()
}

fn log_has(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle))
}

const LEADER_LINE: &str = "Became the tag resolver leader";

/// Asserts that `invariant` holds on every look for `window`.
async fn holds_for(what: &str, window: Duration, mut invariant: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < window {
        assert!(invariant(), "{what}: broken after {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the steps share: the registry with its two images, and where the
/// hubs keep their data and logs.
struct World {
    /// "etcd" or "embedded", for the figures printed.
    store: &'static str,
    registry: Registry,
    nginx: PushedImage,
    myapp: PushedImage,
    /// Every Repository's `namespace/name` and the digest it must resolve to.
    want: Vec<(String, String)>,
    dir: tempfile::TempDir,
    /// The hubs' data directory (one for all replicas).
    data: std::path::PathBuf,
    /// Every hub's log, in start order.
    logs: Vec<std::path::PathBuf>,
}

impl World {
    async fn new(etcd: Option<&Etcd>) -> World {
        let registry = Registry::start(RegistryOptions::plain().with_auth(USER, PASSWORD))
            .await
            .expect("registry starts");
        let nginx = push_image(
            &registry,
            "library/nginx",
            "latest",
            &ImageSpec::random(&[4096], 1),
        )
        .await
        .expect("push nginx");
        let myapp = push_image(
            &registry,
            "myapp/myapp",
            "v1.0.0",
            &ImageSpec::random(&[4096], 2),
        )
        .await
        .expect("push myapp");
        let mut want = vec![
            (
                "default/nginx-latest".to_string(),
                nginx.manifest_digest.clone(),
            ),
            (
                "production/myapp-v1.0.0".to_string(),
                myapp.manifest_digest.clone(),
            ),
        ];
        want.sort();
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("hub-data");
        World {
            store: if etcd.is_some() { "etcd" } else { "embedded" },
            registry,
            nginx,
            myapp,
            want,
            dir,
            data,
            logs: Vec::new(),
        }
    }

    /// Starts one more hub on the shared data, logging to a file of its own.
    async fn start_hub(&mut self, etcd: Option<&Etcd>) -> Hub {
        let log = self
            .dir
            .path()
            .join(format!("hub{}.log", self.logs.len() + 1));
        self.logs.push(log.clone());
        start_hub(&self.data, &log, etcd).await
    }

    fn write(&self, name: &str, text: &str) -> String {
        write(self.dir.path(), name, text)
    }

    /// Asserts that `table` shows every Repository with its digest.
    fn shows_every_digest(&self, table: &str, when: &str) {
        for (id, digest) in &self.want {
            let name = id.split('/').nth(1).expect("ns/name");
            assert!(
                table
                    .lines()
                    .any(|l| l.contains(name) && l.contains(digest.as_str())),
                "{id} with {digest} {when}:\n{table}"
            );
        }
    }
}

async fn the_seed_applies_and_every_digest_resolves(w: &World, hub: &Hub) {
    let seed = w.write("seed.yaml", &seed_yaml(&w.registry));
    let applied = Instant::now();
    let out = ok(hub, &["apply", "-f", &seed]);
    assert!(
        out.contains("RegistrySecret default/harbor-prod created"),
        "{out}"
    );
    assert!(
        out.contains("Repository production/myapp-v1.0.0 created"),
        "{out}"
    );
    let got = eventually("every Repository resolved", RESOLVE_DEADLINE, || {
        let got = resolved_digests(hub);
        got.iter().all(|(_, d)| d.is_some()).then_some(got)
    })
    .await;
    let resolve_ms = applied.elapsed().as_millis();
    let mut got: Vec<(String, String)> = got
        .into_iter()
        .map(|(id, d)| (id, d.unwrap_or_default()))
        .collect();
    got.sort();
    assert_eq!(got, w.want, "resolved digests equal the pushed manifests'");
    eprintln!(
        "[{}] apply -> every resolved digest shown: {resolve_ms} ms",
        w.store
    );
    let table = ok(hub, &["get", "repositories", "-A"]);
    assert!(
        table.lines().next().is_some_and(|h| h.contains("DIGEST")),
        "{table}"
    );
    w.shows_every_digest(&table, "in the table");
}

async fn both_registries_are_connected(hub: &Hub) {
    for ns in ["default", "production"] {
        eventually("RegistrySecret Connected", RESOLVE_DEADLINE, || {
            let v = json(hub, &["get", "rs", "harbor-prod", "-n", ns]);
            let last_check = str_at(&v, &["status", "lastCheckTime"]).is_some();
            (str_at(&v, &["status", "phase"]) == Some("Connected") && last_check).then_some(())
        })
        .await;
    }
    let rs_table = ok(hub, &["get", "rs", "-A"]);
    assert!(
        rs_table.lines().filter(|l| l.contains("Connected")).count() == 2,
        "{rs_table}"
    );
}

/// A wrong password: the RegistrySecret becomes AuthFailed, and so does
/// resolution of its Repository, which keeps its last good digest as stale.
async fn a_wrong_password_fails_and_keeps_the_digest_as_stale(w: &World, hub: &Hub) {
    let wrong = std::fs::read_to_string(SEEDS[1])
        .expect("seed")
        .replace(
            "domain: \"harbor.example.com\"",
            &format!("domain: \"{}\"\n  insecure: true", w.registry.addr()),
        )
        .replace(
            "username: \"prod-puller\"",
            &format!("username: \"{USER}\""),
        )
        .replace(SEED_PROD_PASSWORD, WRONG_PASSWORD);
    let wrong = w.write("wrong.yaml", &wrong);
    let changed = Instant::now();
    ok(hub, &["apply", "-f", &wrong]);
    eventually("RegistrySecret AuthFailed", RESOLVE_DEADLINE, || {
        let v = json(hub, &["get", "rs", "harbor-prod", "-n", "production"]);
        (str_at(&v, &["status", "phase"]) == Some("AuthFailed")).then_some(())
    })
    .await;
    let repo = eventually("Repository reason AuthFailed", RESOLVE_DEADLINE, || {
        let v = json(
            hub,
            &["get", "repository", "myapp-v1.0.0", "-n", "production"],
        );
        (str_at(&v, &["status", "reason"]) == Some("AuthFailed")).then_some(v)
    })
    .await;
    eprintln!(
        "[{}] wrong password -> AuthFailed shown: {} ms",
        w.store,
        changed.elapsed().as_millis()
    );
    assert_eq!(
        field(&repo, &["status", "stale"]).and_then(Value::as_bool),
        Some(true),
        "the last good digest is kept and marked stale: {repo}"
    );
    let table = ok(hub, &["get", "repositories", "-n", "production"]);
    assert!(
        table.contains(&format!("{} (stale)", w.myapp.manifest_digest)),
        "{table}"
    );
    // The default namespace's secret is untouched.
    let v = json(hub, &["get", "rs", "harbor-prod"]);
    assert_eq!(str_at(&v, &["status", "phase"]), Some("Connected"), "{v}");
}

/// An apply with a stale resourceVersion is refused, after an apply that
/// moved the Repository on. Returns that apply's file (syncInterval 2h).
fn a_stale_resource_version_is_refused(w: &World, hub: &Hub) -> String {
    let shown = json(hub, &["get", "repository", "nginx-latest"]);
    let rv = str_at(&shown, &["metadata", "resourceVersion"])
        .expect("resourceVersion")
        .to_owned();
    let quick = std::fs::read_to_string(SEEDS[0]).expect("seed");
    let bumped = w.write(
        "bumped.yaml",
        &quick
            .replace("harbor.example.com", &w.registry.addr())
            .replace("syncInterval: \"1h\"", "syncInterval: \"2h\""),
    );
    let old = w.write(
        "old-rv.yaml",
        &quick
            .replace("harbor.example.com", &w.registry.addr())
            .replace(
                "  name: nginx-latest\n",
                &format!("  name: nginx-latest\n  resourceVersion: \"{rv}\"\n"),
            )
            .replace("syncInterval: \"1h\"", "syncInterval: \"3h\""),
    );
    // Only the Repository document of each file is wanted here.
    for f in [&bumped, &old] {
        let text = std::fs::read_to_string(f).expect("read");
        let repo_doc = text
            .split("---")
            .find(|d| d.contains("kind: Repository"))
            .expect("Repository document")
            .to_owned();
        std::fs::write(f, repo_doc).expect("write");
    }
    ok(hub, &["apply", "-f", &bumped]);
    let o = cli(hub, &["apply", "-f", &old]);
    assert_ne!(
        o.code,
        Some(0),
        "an apply with a stale resourceVersion was accepted: {}",
        o.stdout
    );
    assert!(o.stderr.contains("resourceVersion"), "{}", o.stderr);
    bumped
}

/// No answer shows a password (`cli` checks every output for them).
fn no_answer_shows_a_password(hub: &Hub) {
    for args in [
        ["get", "rs", "-A", "-o", "yaml"].as_slice(),
        &["get", "rs", "-A", "-o", "json"],
        &[
            "describe",
            "registrysecret",
            "harbor-prod",
            "-n",
            "production",
        ],
        &["describe", "repository", "nginx-latest"],
        &["get", "repositories", "-A", "-o", "yaml"],
    ] {
        ok(hub, args);
    }
}

/// SIGKILL and restart on the same data: every object is still there.
async fn a_killed_hub_restarts_with_everything(
    w: &mut World,
    mut hub: Hub,
    etcd: Option<&Etcd>,
) -> Hub {
    hub.child.kill();
    let hub2 = w.start_hub(etcd).await;
    let table = ok(&hub2, &["get", "repositories", "-A"]);
    w.shows_every_digest(&table, "after the restart");
    let rs = ok(&hub2, &["get", "rs", "-A"]);
    assert_eq!(
        rs.lines().filter(|l| l.contains("harbor-prod")).count(),
        2,
        "{rs}"
    );
    let v = json(&hub2, &["get", "repository", "nginx-latest"]);
    assert_eq!(str_at(&v, &["spec", "syncInterval"]), Some("2h"), "{v}");
    hub2
}

/// A second replica on the same etcd (sharing the data dir, hence the
/// keyring and the admin bundle): exactly one leads the resolver. When the
/// leader is SIGKILLed, the other takes over and resolves a new digest.
async fn one_replica_leads_and_the_other_takes_over(
    w: &mut World,
    hub: Hub,
    etcd: &Etcd,
    bumped: &str,
) {
    let second = w.start_hub(Some(etcd)).await;
    let mut replicas = [hub, second];
    let leader = eventually("one resolver leader", Duration::from_secs(15), || {
        let leading: Vec<usize> = (0..2)
            .filter(|&i| log_has(&replicas[i].log, LEADER_LINE))
            .collect();
        (leading.len() == 1).then(|| leading[0])
    })
    .await;
    let follower = 1 - leader;
    // Several campaign ticks later, still exactly one.
    holds_for(
        "only one replica leads",
        imgfleet_hub::leader::CAMPAIGN_TICK * 3,
        || !log_has(&replicas[follower].log, LEADER_LINE),
    )
    .await;

    // SIGKILL the leader; push a new `latest` and change the spec through
    // the follower: it takes over and resolves the new digest.
    let nginx2 = push_image(
        &w.registry,
        "library/nginx",
        "latest",
        &ImageSpec::random(&[4096], 3),
    )
    .await
    .expect("push a new nginx:latest");
    assert_ne!(nginx2.manifest_digest, w.nginx.manifest_digest);
    replicas[leader].child.kill();
    let killed = Instant::now();
    let third = w.write(
        "third.yaml",
        &std::fs::read_to_string(bumped)
            .expect("read")
            .replace("syncInterval: \"2h\"", "syncInterval: \"30m\""),
    );
    ok(&replicas[follower], &["apply", "-f", &third]);
    eventually(
        "the follower resolves the new digest",
        RESOLVE_DEADLINE,
        || {
            resolved_digests(&replicas[follower])
                .into_iter()
                .any(|(id, d)| {
                    id == "default/nginx-latest"
                        && d.as_deref() == Some(nginx2.manifest_digest.as_str())
                })
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "[{}] leader SIGKILLed -> new digest resolved by the other replica: {} ms",
        w.store,
        killed.elapsed().as_millis()
    );
    assert!(
        log_has(&replicas[follower].log, LEADER_LINE),
        "the follower took over"
    );
}

/// Nothing under the prefix holds a plaintext password.
async fn no_password_in_etcd(etcd: &Etcd) {
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .expect("etcd client");
    let resp = client
        .get(
            ETCD_PREFIX,
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("etcd get --prefix");
    assert!(resp.kvs().len() >= 4, "objects stored under {ETCD_PREFIX}");
    let mut sealed = 0;
    for kv in resp.kvs() {
        for secret in SECRETS {
            assert!(
                !contains(kv.key(), secret.as_bytes()) && !contains(kv.value(), secret.as_bytes()),
                "a plaintext password in etcd key {}",
                String::from_utf8_lossy(kv.key())
            );
        }
        sealed += usize::from(contains(kv.value(), b"enc:v1:"));
    }
    assert!(
        sealed >= 2,
        "both passwords are stored sealed ({sealed} sealed values)"
    );
}

fn no_password_in_the_redb_file(data: &Path) {
    let raw = std::fs::read(data.join("policy.redb")).expect("redb file");
    assert!(contains(&raw, b"enc:v1:"), "sealed password stored");
    for secret in SECRETS {
        assert!(
            !contains(&raw, secret.as_bytes()),
            "plaintext password in the redb file"
        );
    }
}

/// No log holds a password, though the first hub's log holds resolutions.
fn no_log_holds_a_password(logs: &[std::path::PathBuf]) {
    for log in logs {
        let text = std::fs::read_to_string(log).expect("hub log");
        for secret in SECRETS {
            assert!(!text.contains(secret), "a password in {}", log.display());
        }
    }
    assert!(log_has(&logs[0], "Resolved tags"), "the first hub resolved");
}

async fn scenario(etcd: Option<&Etcd>) {
    cli_binary();
    let mut w = World::new(etcd).await;
    let hub = w.start_hub(etcd).await;
    the_seed_applies_and_every_digest_resolves(&w, &hub).await;
    both_registries_are_connected(&hub).await;
    a_wrong_password_fails_and_keeps_the_digest_as_stale(&w, &hub).await;
    let bumped = a_stale_resource_version_is_refused(&w, &hub);
    no_answer_shows_a_password(&hub);
    let hub = a_killed_hub_restarts_with_everything(&mut w, hub, etcd).await;
    match etcd {
        Some(etcd) => {
            one_replica_leads_and_the_other_takes_over(&mut w, hub, etcd, &bumped).await;
            no_password_in_etcd(etcd).await;
        }
        None => {
            drop(hub);
            no_password_in_the_redb_file(&w.data);
        }
    }
    no_log_holds_a_password(&w.logs);
}

#[tokio::test]
async fn seed_resolves_and_survives_a_kill_on_the_embedded_store() {
    scenario(None).await;
}

#[tokio::test]
async fn seed_resolves_on_etcd_and_a_second_replica_takes_over() {
    let etcd = Etcd::start().await.expect("etcd starts");
    scenario(Some(&etcd)).await;
}
