//! The Kubernetes manifests in `deploy/kubernetes/` are what the API server and the
//! binaries accept: every document parses into its typed `k8s-openapi` struct with no field
//! the struct does not know (a typo such as `readinessProbes` is an error, not a silent
//! no-op), every kustomization lists files that exist and every manifest is listed, every
//! container has requests, limits and (for the long-running ones) probes on `/healthz` and
//! `/readyz`, and every container's arguments are accepted by the parser of the binary its
//! image holds: `imgfleet_hub::config::Config::parse` for the hub, `imgfleet_agent::cli::Cli`
//! (then the daemon's own checks, with real enrollment credentials) for the agent.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser as _;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Container, Namespace, PersistentVolumeClaim, PodTemplateSpec, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn kube_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every `.yaml` under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(yaml_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_saphyr::from_multiple::<Value>(&text)
        .with_context(|| format!("{}: not YAML", path.display()))
}

/// The paths of `original` that `round_trip` lost or changed: fields the typed struct does
/// not know, or values it read differently.
fn lost(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path} ({a} read as {b})")),
    }
}

/// Parses `doc` into `T`, refusing fields `T` does not have.
fn strict<T: DeserializeOwned + serde::Serialize>(doc: &Value, what: &str) -> Result<T> {
    let typed: T = serde_json::from_value(doc.clone()).with_context(|| what.to_string())?;
    let back = serde_json::to_value(&typed)?;
    let mut unknown = Vec::new();
    lost(doc, &back, "", &mut unknown);
    ensure!(
        unknown.is_empty(),
        "{what}: unknown or misread fields: {unknown:?}"
    );
    Ok(typed)
}

/// A pod template of a workload, with the workload's name.
struct Workload {
    what: String,
    template: PodTemplateSpec,
}

/// Parses one document by its apiVersion and kind; returns the pod template of workloads.
fn parse(doc: &Value, what: &str) -> Result<Option<Workload>> {
    let kind = (
        doc["apiVersion"].as_str().unwrap_or(""),
        doc["kind"].as_str().unwrap_or(""),
    );
    let what = format!("{what} {} {}", kind.1, doc["metadata"]["name"]);
    let template = match kind {
        ("v1", "Namespace") => strict::<Namespace>(doc, &what).map(|_| None)?,
        ("v1", "ServiceAccount") => strict::<ServiceAccount>(doc, &what).map(|_| None)?,
        ("v1", "Service") => strict::<Service>(doc, &what).map(|_| None)?,
        ("v1", "PersistentVolumeClaim") => {
            strict::<PersistentVolumeClaim>(doc, &what).map(|_| None)?
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            strict::<NetworkPolicy>(doc, &what).map(|_| None)?
        }
        ("apps/v1", "StatefulSet") => strict::<StatefulSet>(doc, &what)?.spec.map(|s| s.template),
        ("apps/v1", "Deployment") => strict::<Deployment>(doc, &what)?.spec.map(|s| s.template),
        ("apps/v1", "DaemonSet") => strict::<DaemonSet>(doc, &what)?.spec.map(|s| s.template),
        other => bail!("{what}: unexpected kind {other:?}; add it to this test"),
    };
    Ok(template.map(|template| Workload { what, template }))
}

/// Enrollment credentials as `imgfleet cluster enroll` writes them, for the agent's checks.
fn credentials(dir: &Path) -> Result<PathBuf> {
    use imgfleet_common::pki::CertificateAuthority;
    let ca = CertificateAuthority::generate()?;
    let leaf = ca.issue_cluster("edge-manifest-test", 30)?;
    let out = dir.join("credentials");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("ca.pem"), ca.cert_pem())?;
    std::fs::write(out.join("cert.pem"), &leaf.cert_pem)?;
    std::fs::write(out.join("key.pem"), &leaf.key_pem)?;
    Ok(out)
}

/// Checks one container's arguments with the parser of the binary its image holds.
fn check_args(c: &Container, what: &str, creds: &Path) -> Result<()> {
    let image = c.image.as_deref().unwrap_or("");
    let args = c.args.clone().unwrap_or_default();
    ensure!(
        c.command.is_none(),
        "{what}: set args, not command (the image's entrypoint is the binary)"
    );
    let env: HashMap<String, String> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    match image {
        "imgfleet-hub" => {
            let argv = std::iter::once("imgfleet-hub".to_string()).chain(args);
            imgfleet_hub::config::Config::parse(argv, &env)
                .map_err(|e| anyhow::anyhow!("{what}: imgfleet-hub refuses its args: {e}"))?;
        }
        "imgfleet-agent" => {
            // The credentials Secret's mount point holds real credentials here.
            let args: Vec<String> = args
                .iter()
                .map(|a| a.replace("/etc/imgfleet/credentials", &creds.display().to_string()))
                .collect();
            let cli = imgfleet_agent::cli::Cli::try_parse_from(
                std::iter::once("imgfleet-agent".to_string()).chain(args),
            )
            .map_err(|e| anyhow::anyhow!("{what}: imgfleet-agent refuses its args: {e}"))?;
            use imgfleet_agent::cli::Command;
            match cli.command.unwrap_or(Command::Run(cli.daemon)) {
                Command::Run(daemon) => {
                    daemon.validate().map_err(|e| {
                        anyhow::anyhow!("{what}: the agent daemon refuses its settings: {e}")
                    })?;
                }
                Command::HostsToml {
                    mirror, upstream, ..
                } => {
                    use imgfleet_agent::standalone::{Upstream, parse_mirror_url};
                    parse_mirror_url(&mirror)
                        .map_err(|e| anyhow::anyhow!("{what}: --mirror: {e}"))?;
                    for u in &upstream {
                        Upstream::parse(u)
                            .map_err(|e| anyhow::anyhow!("{what}: --upstream: {e}"))?;
                    }
                }
                Command::Serve { limits, .. } => {
                    limits.limits().map_err(|e| {
                        anyhow::anyhow!("{what}: the mirror refuses its limits: {e}")
                    })?;
                }
                other => bail!("{what}: unexpected agent command {other:?}"),
            }
        }
        _ => ensure!(
            args.is_empty(),
            "{what}: image {image:?} is not ours; its args are unchecked"
        ),
    }
    Ok(())
}

/// Requests and limits on every container; probes on the long-running imgfleet ones.
fn check_resources_and_probes(c: &Container, what: &str, init: bool) -> Result<()> {
    let res = c
        .resources
        .as_ref()
        .with_context(|| format!("{what}: no resources"))?;
    for key in ["cpu", "memory"] {
        ensure!(
            res.requests.as_ref().is_some_and(|r| r.contains_key(key)),
            "{what}: no {key} request"
        );
    }
    ensure!(
        res.limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory")),
        "{what}: no memory limit"
    );
    let ours = c
        .image
        .as_deref()
        .is_some_and(|i| i.starts_with("imgfleet-"));
    if ours && !init {
        let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
        };
        ensure!(
            path(&c.liveness_probe).as_deref() == Some("/healthz"),
            "{what}: liveness must be GET /healthz"
        );
        ensure!(
            path(&c.readiness_probe).as_deref() == Some("/readyz"),
            "{what}: readiness must be GET /readyz"
        );
    }
    Ok(())
}

#[test]
fn manifests_parse_strictly_and_their_args_are_accepted() -> Result<()> {
    let root = kube_dir();
    let tmp = tempfile::tempdir()?;
    let creds = credentials(tmp.path())?;
    let files = yaml_files(&root)?;
    let mut listed: BTreeSet<PathBuf> = BTreeSet::new();
    let mut manifests: BTreeSet<PathBuf> = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    let mut containers = 0;
    for file in &files {
        let rel = file.strip_prefix(&root)?.display().to_string();
        if file.file_name().is_some_and(|n| n == "kustomization.yaml") {
            let dir = file.parent().expect("a file has a parent");
            for doc in documents(file)? {
                for r in doc["resources"].as_array().into_iter().flatten() {
                    let r = r.as_str().with_context(|| format!("{rel}: resource {r}"))?;
                    let path = dir.join(r);
                    ensure!(path.exists(), "{rel}: resource {r} does not exist");
                    listed.insert(path.canonicalize()?);
                }
            }
            continue;
        }
        manifests.insert(file.canonicalize()?);
        for (i, doc) in documents(file)?.iter().enumerate() {
            kinds.insert(doc["kind"].as_str().unwrap_or("").to_string());
            let Some(w) = parse(doc, &format!("{rel}#{i}"))? else {
                continue;
            };
            let spec = w
                .template
                .spec
                .as_ref()
                .with_context(|| format!("{}: no pod spec", w.what))?;
            let all = spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| (c, true))
                .chain(spec.containers.iter().map(|c| (c, false)));
            for (c, init) in all {
                let what = format!("{} container {}", w.what, c.name);
                check_args(c, &what, &creds)?;
                check_resources_and_probes(c, &what, init)?;
                containers += 1;
            }
        }
    }
    // Every manifest is part of a kustomization (sub-directories are listed as such).
    for m in &manifests {
        ensure!(
            listed.contains(m),
            "{} is in no kustomization.yaml",
            m.display()
        );
    }
    for want in [
        "StatefulSet",
        "Deployment",
        "DaemonSet",
        "Service",
        "ServiceAccount",
        "NetworkPolicy",
        "PersistentVolumeClaim",
    ] {
        ensure!(kinds.contains(want), "no {want} in deploy/kubernetes");
    }
    ensure!(containers >= 4, "only {containers} containers checked");
    Ok(())
}

/// The `ExecStart=` of a systemd unit as (binary name, args), continuation lines joined.
fn exec_start(unit: &str) -> Option<(String, Vec<String>)> {
    let joined = unit.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("ExecStart="))?
        .trim_start_matches("ExecStart=");
    let mut words = line.split_whitespace().map(str::to_string);
    let binary = words.next()?;
    let name = binary.rsplit('/').next()?.to_string();
    Some((name, words.collect()))
}

#[test]
fn systemd_units_start_the_binaries_with_args_they_accept() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let tmp = tempfile::tempdir()?;
    let creds = credentials(tmp.path())?;
    let mut units = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let (binary, args) =
            exec_start(&text).with_context(|| format!("{}: no ExecStart", path.display()))?;
        // systemd's credentials directory holds the enrollment files at run time.
        let args = args
            .into_iter()
            .map(|a| a.replace("${CREDENTIALS_DIRECTORY}", "/etc/imgfleet/credentials"))
            .collect();
        let c = Container {
            name: binary.clone(),
            image: Some(binary),
            args: Some(args),
            ..Default::default()
        };
        check_args(&c, &path.display().to_string(), &creds)?;
        units += 1;
    }
    ensure!(units >= 3, "only {units} units checked");
    Ok(())
}

#[test]
fn a_typo_in_a_manifest_is_caught() {
    // The check itself: an unknown field, and a flag no binary has.
    let doc: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1, "targtPort": 2}]}
    });
    let err = parse(&doc, "test").err().expect("refused").to_string();
    assert!(err.contains("targtPort"), "{err}");
    let c = Container {
        name: "hub".into(),
        image: Some("imgfleet-hub".into()),
        args: Some(vec!["--listen-address=0.0.0.0:1".into()]),
        ..Default::default()
    };
    let err = check_args(&c, "test", Path::new("/nonexistent")).unwrap_err();
    assert!(err.to_string().contains("refuses its args"), "{err}");
}
