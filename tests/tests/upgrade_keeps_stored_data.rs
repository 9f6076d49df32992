//! What a running fleet stored stays readable by the code of today. Each fixture set under
//! `tests/fixtures/stored-data/<commit>/` was written by the binaries of that commit (see
//! the README there): a hub's embedded-store data dir, a hub on etcd (its data dir and a
//! dump of etcd), and an agent's data dir after a completed sync.
//!
//! For every set the hub of today starts on a copy of the embedded store, and on a fresh
//! etcd loaded from the dump: its key check passes (it serves at all), `get` and `describe`
//! show the objects as the old CLI showed them, and the registry password still opens (the
//! hub uses it and finds the upstream gone, not the credential unusable). The agent of
//! today starts on a copy of the agent's data dir with the upstream registry absent: its
//! mirror serves every image with the digests and bytes it held, first with no hub at all
//! (from its own `desired.bin`), then connected, when the hub counts it synced again.
//!
//! Certificates in a fixture expire a year after it was written, so the test never uses
//! them: the hub issues itself a fresh server certificate and admin bundle from the
//! fixture's CA (it does so for leaves that are missing), and the cluster is enrolled
//! again for fresh agent credentials.
//!
//! `write_fixture_set` (ignored) is how the fixtures were made; the README says how to
//! run it against the binaries of a commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use imgfleet_tests::etcd::KeyValue;
use imgfleet_tests::fleet::{
    AgentOptions, AgentProcess, Cli, HubOptions, HubProcess, wait_repository_synced,
};
use imgfleet_tests::images::{ImageSpec, Platform, PushTarget, PushedImage, sha256_digest};
use imgfleet_tests::{Etcd, Registry, RegistryOptions, free_port, wait_until};
use serde_json::{Value, json};

/// Where the fixture sets are, one folder per commit.
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/stored-data");
/// How long a start, a sync or a status change may take here.
const CONVERGE: Duration = Duration::from_secs(90);
/// The enrolled cluster, its labels and tenants, as in every fixture set.
const CLUSTER: &str = "edge-1";
const CLUSTER_LABELS: &[(&str, &str)] = &[("region", "lab")];
const TENANTS: &[&str] = &["default"];
/// The registry credentials the fixtures seal.
const USER: &str = "admin";
const PASSWORD: &str = "Harbor12345";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_release_b9cd7a9_on_the_embedded_store() -> Result<()> {
    upgrade("b9cd7a9", EMBEDDED).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_release_b9cd7a9_on_etcd() -> Result<()> {
    upgrade("b9cd7a9", ETCD).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_998f18c_on_the_embedded_store() -> Result<()> {
    upgrade("998f18c", EMBEDDED).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_998f18c_on_etcd() -> Result<()> {
    upgrade("998f18c", ETCD).await
}

/// Which policy store a hub of the fixture ran on: the fixture folder of that hub's data
/// dir, also the key of its objects in `fixture.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Store(&'static str);

const EMBEDDED: Store = Store("hub-embedded");
const ETCD: Store = Store("hub-etcd");

/// One fixture set: its folder and its `fixture.json` (what the old binaries showed).
#[derive(Debug)]
struct Fixture {
    dir: PathBuf,
    facts: Value,
}

impl Fixture {
    fn open(commit: &str) -> Result<Fixture> {
        let dir = Path::new(FIXTURES).join(commit);
        let path = dir.join("fixture.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read {} (see {FIXTURES}/README.md)", path.display()))?;
        let facts = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(Fixture { dir, facts })
    }

    /// `host:port` of the upstream registry the fixture was synced from.
    fn upstream(&self) -> Result<&str> {
        self.facts["upstream"]
            .as_str()
            .context("fixture.json: no upstream")
    }

    /// The images the agent held, as `fixture.json` lists them.
    fn images(&self) -> Result<&Vec<Value>> {
        self.facts["images"]
            .as_array()
            .context("fixture.json: no images")
    }

    /// What `imgfleet get KIND -o json` listed on the old hub of `store`.
    fn objects(&self, store: Store, kind: &str) -> Result<&Vec<Value>> {
        self.facts["objects"][store.0][kind]
            .as_array()
            .with_context(|| format!("fixture.json: no objects.{}.{kind}", store.0))
    }

    /// The etcd dump of the hub on etcd.
    fn etcd_dump(&self) -> Result<Vec<KeyValue>> {
        let path = self.dir.join("etcd.json");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        dump_from_json(&serde_json::from_str(&text).context("etcd.json is not JSON")?)
    }
}

/// Keeps the fixture's upstream address absent while this test binary runs: its port is
/// bound without listening, so connections to it are refused, and no other process
/// (another test's registry) can take it meanwhile. The tests of one fixture share it.
fn hold_upstream_absent(upstream: &str) -> Result<()> {
    static HELD: Mutex<BTreeMap<String, tokio::net::TcpSocket>> = Mutex::new(BTreeMap::new());
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.contains_key(upstream) {
        return Ok(());
    }
    let addr: std::net::SocketAddr = upstream.parse().context("upstream address")?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(addr).with_context(|| {
        format!(
            "another process uses {upstream}, the fixture's upstream registry; this test \
             needs it absent (run it again)"
        )
    })?;
    held.insert(upstream.to_owned(), socket);
    Ok(())
}

async fn upgrade(commit: &str, store: Store) -> Result<()> {
    let fixture = Fixture::open(commit)?;
    hold_upstream_absent(fixture.upstream()?)?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("imgfleet-upgrade-{commit}-"))
        .tempdir()?;
    let root = dir.path();

    // The hub of today on a copy of the old hub's data dir (and etcd, loaded from the dump).
    let hub_dir = root.join("hub");
    copy_data_dir(&fixture.dir.join(store.0), &hub_dir)?;
    renew_leaves(&hub_dir)?;
    let ca = std::fs::read(hub_dir.join("pki/ca.pem")).context("the fixture's CA")?;
    let mut etcd = None;
    let options = if store == ETCD {
        let started = etcd.insert(Etcd::start().await?);
        started.load(&fixture.etcd_dump()?).await?;
        HubOptions::etcd(&started.endpoint(), &hub_dir)
    } else {
        HubOptions::embedded(&hub_dir)
    };
    let hub = HubProcess::start(options).await.with_context(|| {
        format!(
            "the hub of today starting on the {commit} fixture's {}",
            store.0
        )
    })?;
    assert_eq!(
        std::fs::read(hub_dir.join("pki/ca.pem"))?,
        ca,
        "the hub replaced the fixture's CA instead of issuing leaves from it"
    );
    let cli = hub.cli();

    same_objects(&cli, &fixture, store).await?;
    described(&cli, &fixture).await?;
    password_opens(&cli).await?;
    if store == EMBEDDED {
        agent_serves(&hub, &fixture, root).await?;
    }
    Ok(())
}

/// `get` shows every object the old CLI showed: the same names, uids, labels and specs
/// (fields the new code adds may appear), and each Repository's resolved digests.
async fn same_objects(cli: &Cli, fixture: &Fixture, store: Store) -> Result<()> {
    for kind in ["registrysecrets", "repositories", "clusters"] {
        let old = fixture.objects(store, kind)?;
        let new = cli.get_json(&[kind, "-A"]).await?;
        let new = new["items"]
            .as_array()
            .with_context(|| format!("get {kind} -A -o json: no items: {new}"))?;
        ensure!(
            old.len() == new.len(),
            "{kind}: the old hub listed {}, the new one {}",
            old.len(),
            new.len()
        );
        for (old, new) in old.iter().zip(new) {
            let id = format!("{kind} {}", old["metadata"]["name"]);
            for field in [
                "name",
                "namespace",
                "uid",
                "labels",
                "annotations",
                "creationTimestamp",
                "generation",
            ] {
                ensure!(
                    old["metadata"][field] == new["metadata"][field],
                    "{id}: metadata.{field} was {}, is {}",
                    old["metadata"][field],
                    new["metadata"][field]
                );
            }
            contains(&old["spec"], &new["spec"]).with_context(|| format!("{id}: spec"))?;
            if kind == "repositories" {
                let digests = |o: &Value| -> Vec<(String, String)> {
                    o["status"]["resolved"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| (r["tag"].to_string(), r["digest"].to_string()))
                        .collect()
                };
                ensure!(
                    digests(old) == digests(new),
                    "{id}: resolved {:?}, now {:?}",
                    digests(old),
                    digests(new)
                );
            }
        }
    }
    Ok(())
}

/// Whether `new` holds every field of `old` with the same value (objects recursively).
fn contains(old: &Value, new: &Value) -> Result<()> {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (key, value) in o {
                contains(value, n.get(key).unwrap_or(&Value::Null))
                    .with_context(|| format!(".{key}"))?;
            }
            Ok(())
        }
        _ if old == new => Ok(()),
        _ => bail!("was {old}, is {new}"),
    }
}

/// `describe` names the registry and the digest each Repository resolved to, and never
/// shows the password.
async fn described(cli: &Cli, fixture: &Fixture) -> Result<()> {
    for image in fixture.images()? {
        let name = image["name"].as_str().context("image without a name")?;
        let digest = image["digest"].as_str().context("image without a digest")?;
        let text = cli.ok(&["describe", "repository", name]).await?;
        ensure!(
            text.contains(digest) && text.contains("default/harbor-prod"),
            "describe repository {name} shows neither {digest} nor its registry:\n{text}"
        );
    }
    let text = cli
        .ok(&["describe", "registrysecret", "harbor-prod"])
        .await?;
    ensure!(text.contains(USER), "no username in:\n{text}");
    let yaml = cli.ok(&["get", "registrysecrets", "-o", "yaml"]).await?;
    ensure!(
        !text.contains(PASSWORD) && !yaml.contains(PASSWORD),
        "the password is shown"
    );
    Ok(())
}

/// The hub opens the sealed password and uses it: the registry's health turns from the
/// fixture's Connected to Unreachable (the upstream is gone), never CredentialUnusable.
async fn password_opens(cli: &Cli) -> Result<()> {
    wait_until(
        "the hub checking the upstream with the fixture's credential",
        CONVERGE,
        || async {
            let rs = cli.get_json(&["registrysecret", "harbor-prod"]).await?;
            match rs["status"]["phase"].as_str() {
                Some("CredentialUnusable") => bail!("the stored password does not open: {rs}"),
                phase => Ok(phase == Some("Unreachable")),
            }
        },
    )
    .await
}

/// The agent of today serves what the old agent held, with no upstream: first with no hub
/// at all, then connected to the upgraded hub, which counts it synced.
async fn agent_serves(hub: &HubProcess, fixture: &Fixture, root: &Path) -> Result<()> {
    let cli = hub.cli();
    // The cluster is enrolled in the stored data: new credentials need
    // --reissue, which keeps its labels and tenants.
    let creds = cli.reissue(CLUSTER, &root.join("credentials")).await?;
    let data_dir = root.join("agent");
    copy_data_dir(&fixture.dir.join("agent"), &data_dir)?;

    let nowhere = format!("https://127.0.0.1:{}", free_port());
    let mut alone =
        AgentProcess::start(AgentOptions::new(vec![nowhere], &creds, &data_dir)).await?;
    serves_every_image(&alone, fixture).await?;
    alone.stop().await?;

    let agent = AgentProcess::start(AgentOptions::new(vec![hub.url()], &creds, &data_dir)).await?;
    // The stored status already says synced (the old agent reported it): wait for this
    // agent's own report, through this hub, of every image held.
    wait_until(
        "the agent reporting to the upgraded hub",
        CONVERGE,
        || async {
            let c = cli.get_json(&["cluster", CLUSTER]).await?;
            let st = &c["status"];
            Ok(st["phase"] == "Connected"
                && st["hubReplica"].as_str().is_some_and(|r| hub.is_replica(r))
                && st["appliedGeneration"] == st["desiredGeneration"]
                && st["imagesDesired"] == fixture.images()?.len()
                && st["imagesSynced"] == st["imagesDesired"])
        },
    )
    .await?;
    for image in fixture.images()? {
        let name = image["name"].as_str().context("image without a name")?;
        wait_repository_synced(&cli, "default", name, 1, CONVERGE).await?;
    }
    serves_every_image(&agent, fixture).await
}

/// The mirror serves each image under its tag with the digest it had, and every manifest
/// and blob of it byte for byte as the old agent stored it.
async fn serves_every_image(agent: &AgentProcess, fixture: &Fixture) -> Result<()> {
    let blobs = fixture.dir.join("agent/blobs/sha256");
    for image in fixture.images()? {
        let repo = image["repository"].as_str().context("no repository")?;
        let tag = image["tag"].as_str().context("no tag")?;
        let digest = image["digest"].as_str().context("no digest")?;
        let (status, body) = wait_served(agent, &format!("{repo}/manifests/{tag}")).await?;
        ensure!(
            status == 200 && sha256_digest(&body) == digest,
            "{repo}:{tag}: HTTP {status}, digest {} instead of {digest}",
            sha256_digest(&body)
        );
        let manifests = image["manifests"].as_array().context("no manifests")?;
        let layers = image["blobs"].as_array().context("no blobs")?;
        for (kind, list) in [("manifests", manifests), ("blobs", layers)] {
            for d in list {
                let d = d.as_str().context("a digest that is no string")?;
                let (status, body) = agent.mirror_get(&format!("{repo}/{kind}/{d}")).await?;
                let stored = std::fs::read(blobs.join(d.trim_start_matches("sha256:")))
                    .with_context(|| format!("the fixture's copy of {d}"))?;
                ensure!(
                    status == 200 && sha256_digest(&body) == d && body == stored,
                    "{repo} {kind} {d}: HTTP {status}, not the bytes the old agent stored"
                );
            }
        }
    }
    Ok(())
}

/// `GET /v2/<path>` once the mirror answers 200 (it loads its store as it starts).
async fn wait_served(agent: &AgentProcess, path: &str) -> Result<(u16, Vec<u8>)> {
    wait_until(&format!("the mirror serving {path}"), CONVERGE, || async {
        Ok(agent.mirror_get(path).await?.0 == 200)
    })
    .await?;
    agent.mirror_get(path).await
}

/// Removes the hub's server certificate and admin bundle from its data dir, so that it
/// issues fresh ones from the fixture's CA as it starts: the fixture's leaves expire a
/// year after it was written, the CA ten years after.
fn renew_leaves(hub_dir: &Path) -> Result<()> {
    for leaf in [
        "pki/server.pem",
        "pki/server-key.pem",
        "admin/cert.pem",
        "admin/key.pem",
        "admin/ca.pem",
    ] {
        let path = hub_dir.join(leaf);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

/// Copies a fixture data dir, giving the files that hold keys the mode 0600 the hub and
/// the agent insist on (git keeps no modes).
fn copy_data_dir(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        let (source, dest) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_data_dir(&source, &dest)?;
            continue;
        }
        std::fs::copy(&source, &dest).with_context(|| format!("copy {}", source.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".key") || name.ends_with("key.pem") {
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// An etcd dump as `etcd.json` keeps it: text values as text, others in base64.
fn dump_to_json(kvs: &[KeyValue]) -> Result<Value> {
    use base64::Engine as _;
    kvs.iter()
        .map(|kv| {
            let key = String::from_utf8(kv.key.clone()).context("an etcd key that is no text")?;
            Ok(match std::str::from_utf8(&kv.value) {
                Ok(text) => json!({"key": key, "value": text}),
                Err(_) => json!({
                    "key": key,
                    "value_base64": base64::engine::general_purpose::STANDARD.encode(&kv.value),
                }),
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Value::Array)
}

fn dump_from_json(dump: &Value) -> Result<Vec<KeyValue>> {
    use base64::Engine as _;
    let entries = dump.as_array().context("etcd.json: expected a list")?;
    entries
        .iter()
        .map(|e| {
            let key = e["key"]
                .as_str()
                .context("etcd.json: an entry without a key")?;
            let value = match (e["value"].as_str(), e["value_base64"].as_str()) {
                (Some(text), _) => text.as_bytes().to_vec(),
                (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .with_context(|| format!("etcd.json: {key}: bad base64"))?,
                (None, None) => bail!("etcd.json: {key} has no value"),
            };
            Ok(KeyValue {
                key: key.as_bytes().to_vec(),
                value,
                lease: 0,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Writing a fixture set (not run in CI).
// ---------------------------------------------------------------------------------------

/// The policy every fixture set holds: a RegistrySecret with a password, a Repository of
/// one tag with a retention, placed by name, and one of a multi-platform index narrowed
/// to one platform and placed by label. Both are placed explicitly: before 5645c87 a
/// Repository without placement went to no cluster.
fn policy(upstream: &str) -> String {
    format!(
        r#"apiVersion: image.theriseunion.io/v1alpha1
kind: RegistrySecret
metadata:
  name: harbor-prod
  namespace: default
  labels: {{team: platform}}
spec:
  domain: "{upstream}"
  username: "{USER}"
  password: "{PASSWORD}"
  provider: "harbor"
  insecure: true
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata:
  name: nginx-latest
  namespace: default
spec:
  repository: library/nginx
  tag: latest
  registryRef: {{name: harbor-prod, namespace: default}}
  syncInterval: 10s
  placement: {{clusters: [{CLUSTER}]}}
  retention: {{keepVersions: 1, gracePeriod: 1h}}
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata:
  name: multi
  namespace: default
  annotations: {{owner: fixtures}}
spec:
  repository: team/multi
  tags: [v1]
  platforms: [linux/amd64]
  registryRef: {{name: harbor-prod}}
  syncInterval: 10s
  placement:
    clusterSelector: {{matchLabels: {{region: lab}}}}
"#
    )
}

/// Writes one fixture set with the binaries in `$IMGFLEET_FIXTURE_BINARIES` (`imgfleet`,
/// `imgfleet-hub`, `imgfleet-agent` of one commit) into `$IMGFLEET_FIXTURE_OUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a fixture set with older binaries; see tests/fixtures/stored-data/README.md"]
async fn write_fixture_set() -> Result<()> {
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .with_context(|| format!("set {name} (see {FIXTURES}/README.md)"))
    };
    let writer = Writer {
        binaries: var("IMGFLEET_FIXTURE_BINARIES")?,
        out: var("IMGFLEET_FIXTURE_OUT")?,
        work: tempfile::Builder::new()
            .prefix("imgfleet-fixture-")
            .tempdir()?,
    };
    ensure!(
        !writer.out.exists(),
        "{} exists: remove it first, a fixture set is written whole",
        writer.out.display()
    );
    let registry = Registry::start(RegistryOptions::plain().with_auth(USER, PASSWORD)).await?;
    let push = PushTarget::from(&registry);
    let first = push
        .push_image("library/nginx", "latest", &ImageSpec::random(&[2048], 1201))
        .await?;
    let multi = push
        .push_index(
            "team/multi",
            "v1",
            &[Platform::linux_amd64(), Platform::linux_arm64()],
            &ImageSpec::random(&[1024, 1536], 1202),
        )
        .await?;
    let policy = policy(&registry.addr());
    let moved = || async {
        let latest = push
            .push_image("library/nginx", "latest", &ImageSpec::random(&[3072], 1203))
            .await?;
        ensure!(first.manifest_digest != latest.manifest_digest);
        Ok(latest)
    };
    let (embedded, latest) = writer.embedded_store(&policy, moved).await?;
    let etcd = writer.etcd_store(&policy).await?;

    let amd64 = &multi
        .manifests
        .iter()
        .find(|(p, _)| *p == Platform::linux_amd64())
        .context("the index has no linux/amd64 image")?
        .1;
    let facts = json!({
        "commit": std::env::var("IMGFLEET_FIXTURE_COMMIT").unwrap_or_default(),
        "upstream": registry.addr(),
        "images": [
            {
                "name": "nginx-latest",
                "repository": "library/nginx",
                "tag": "latest",
                "digest": latest.manifest_digest,
                "manifests": [latest.manifest_digest],
                "blobs": latest.blob_digests(),
            },
            {
                "name": "multi",
                "repository": "team/multi",
                "tag": "v1",
                "digest": multi.index_digest,
                "manifests": [multi.index_digest, amd64.manifest_digest],
                "blobs": amd64.blob_digests(),
            },
        ],
        "objects": { EMBEDDED.0: embedded, ETCD.0: etcd },
    });
    write_json(&writer.out.join("fixture.json"), &facts)
}

/// Runs the old binaries to write one fixture set.
struct Writer {
    /// `imgfleet`, `imgfleet-hub` and `imgfleet-agent` of the commit.
    binaries: PathBuf,
    /// The fixture set's folder.
    out: PathBuf,
    /// Credentials and the etcd hub's agent, which the fixture does not keep.
    work: tempfile::TempDir,
}

impl Writer {
    async fn hub(&self, options: HubOptions) -> Result<HubProcess> {
        HubProcess::start(HubOptions {
            binary: Some(self.binaries.join("imgfleet-hub")),
            cli_binary: Some(self.binaries.join("imgfleet")),
            ..options
        })
        .await
    }

    /// Applies the policy, enrolls the cluster and starts its agent on `data_dir`;
    /// returns once both Repositories are synced.
    async fn synced_agent(
        &self,
        hub: &HubProcess,
        policy: &str,
        data_dir: PathBuf,
    ) -> Result<AgentProcess> {
        let cli = hub.cli();
        cli.apply_yaml(policy).await?;
        let creds = self.work.path().join(format!("creds-{}", hub.port()));
        let creds = cli.enroll(CLUSTER, CLUSTER_LABELS, TENANTS, &creds).await?;
        let agent = AgentProcess::start(AgentOptions {
            binary: Some(self.binaries.join("imgfleet-agent")),
            ..AgentOptions::new(vec![hub.url()], creds, data_dir)
        })
        .await?;
        wait_repository_synced(&cli, "default", "nginx-latest", 1, CONVERGE).await?;
        wait_repository_synced(&cli, "default", "multi", 1, CONVERGE).await?;
        Ok(agent)
    }

    /// The embedded store, with the agent whose data dir the fixture keeps. The tag moves
    /// once (`move_tag` pushes another image to it), so that the store holds two versions
    /// and GC remembers the older one. Returns what `get` listed and the moved-to image.
    async fn embedded_store<F, Fut>(
        &self,
        policy: &str,
        move_tag: F,
    ) -> Result<(Value, PushedImage)>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<PushedImage>>,
    {
        let mut hub = self
            .hub(HubOptions::embedded(self.out.join(EMBEDDED.0)))
            .await?;
        let cli = hub.cli();
        let agent_dir = self.out.join("agent");
        let mut agent = self.synced_agent(&hub, policy, agent_dir.clone()).await?;
        let latest = move_tag().await?;
        wait_until("the moved tag resolved and synced", CONVERGE, || async {
            let repo = cli.get_json(&["repository", "nginx-latest"]).await?;
            Ok(
                repo["status"]["resolved"][0]["digest"] == latest.manifest_digest.as_str()
                    && repo["status"]["syncedClusters"] == 1,
            )
        })
        .await?;
        wait_until("GC having run", CONVERGE, || async {
            Ok(agent_dir.join("gc-state.json").is_file())
        })
        .await?;
        let objects = listed_objects(&cli).await?;
        agent.stop().await?;
        hub.stop().await?;
        Ok((objects, latest))
    }

    /// A hub on etcd, with an agent of its own so that statuses and desired sets are
    /// stored too; writes the dump and returns what `get` listed.
    async fn etcd_store(&self, policy: &str) -> Result<Value> {
        let etcd = Etcd::start().await?;
        let mut hub = self
            .hub(HubOptions::etcd(&etcd.endpoint(), self.out.join(ETCD.0)))
            .await?;
        let mut agent = self
            .synced_agent(&hub, policy, self.work.path().join("agent-etcd"))
            .await?;
        let objects = listed_objects(&hub.cli()).await?;
        agent.stop().await?;
        hub.stop().await?;
        // A key bound to a lease (the resolver's leader) would outlive nothing: leave it out.
        let dump: Vec<KeyValue> = etcd
            .dump()
            .await?
            .into_iter()
            .filter(|kv| kv.lease == 0)
            .collect();
        write_json(&self.out.join("etcd.json"), &dump_to_json(&dump)?)?;
        Ok(objects)
    }
}

/// What `get KIND -A -o json` lists, for every kind the fixture holds.
async fn listed_objects(cli: &Cli) -> Result<Value> {
    let mut all = serde_json::Map::new();
    for kind in ["registrysecrets", "repositories", "clusters"] {
        let list = cli.get_json(&[kind, "-A"]).await?;
        all.insert(kind.to_owned(), list["items"].clone());
    }
    Ok(Value::Object(all))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}
