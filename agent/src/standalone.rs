//! Standalone mode: turns the RegistrySecret and Repository YAML the hub takes
//! into desired images, resolving tags (and tag patterns) against the
//! registries directly, for `imgfleet-agent sync --from FILE`.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use futures::StreamExt;
use imgfleet::model::{self, DEFAULT_NAMESPACE, Object, ValidationError};
use imgfleet_common::registry::{Credentials, RegistryError};

use crate::desired::DesiredImage;
use crate::gc::Retention;
use crate::settings::ConfigError;
use crate::transfer::{Engine, Pull, TransferError};

/// One Repository to sync, with its registry settings, before tag resolution.
#[derive(Debug, Clone)]
pub struct Target {
    /// `Repository <namespace>/<name>`, for messages.
    pub object: String,
    /// Namespace and name of the Repository.
    pub source: (String, String),
    /// `<namespace>/<name>` of its RegistrySecret.
    pub registry_key: String,
    /// Registry host.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Pinned digest.
    pub digest: Option<String>,
    /// Tags to resolve.
    pub tags: Vec<String>,
    /// Tag pattern and how many of the newest matches to keep.
    pub pattern: Option<(String, u32)>,
    /// Platforms.
    pub platforms: Vec<String>,
    /// Credentials.
    pub credentials: Option<Credentials>,
    /// Plain HTTP.
    pub insecure: bool,
    /// The Repository's retention (0: the agent's default).
    pub retention: Retention,
    /// Under `verify.mode: enforce`, the keys (name, PEM) the image must be
    /// signed with; it is then not recorded without a valid signature.
    pub verify_keys: Vec<(String, String)>,
}

/// Reads the YAML: every Repository that is not suspended, joined with its
/// RegistrySecret. Errors name the object and field.
pub fn targets_from_yaml(text: &str) -> Result<Vec<Target>, Vec<ValidationError>> {
    let objects = model::parse_documents(text)?;
    let mut secrets = BTreeMap::new();
    for o in &objects {
        if let Object::RegistrySecret(s) = o {
            let ns = o.namespace().unwrap_or(DEFAULT_NAMESPACE).to_string();
            secrets.insert((ns, o.name().to_string()), s.spec.clone());
        }
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for o in &objects {
        let Object::Repository(r) = o else { continue };
        let ns = o.namespace().unwrap_or(DEFAULT_NAMESPACE).to_string();
        let object = format!("Repository {ns}/{}", o.name());
        if r.spec.suspend {
            continue;
        }
        let secret_ns = r
            .spec
            .registry_ref
            .namespace
            .clone()
            .unwrap_or_else(|| ns.clone());
        let secret_name = r.spec.registry_ref.name.clone();
        let Some(secret) = secrets.get(&(secret_ns.clone(), secret_name.clone())) else {
            errors.push(ValidationError::new(
                object,
                "spec.registryRef",
                format!("RegistrySecret {secret_ns}/{secret_name} is not in the file"),
            ));
            continue;
        };
        let credentials = match (&secret.username, &secret.password) {
            (Some(u), Some(p)) => Some(Credentials::new(u.clone(), p.clone())),
            _ => None,
        };
        let mut tags: Vec<String> = r.spec.tag.iter().cloned().collect();
        tags.extend(r.spec.tags.iter().cloned());
        out.push(Target {
            object,
            source: (ns.clone(), o.name().to_string()),
            registry_key: format!("{secret_ns}/{secret_name}"),
            registry: secret.domain.clone(),
            repository: r.spec.repository.clone(),
            digest: r.spec.digest.clone(),
            tags,
            pattern: r
                .spec
                .tag_pattern
                .as_ref()
                .map(|p| (p.pattern.clone(), p.keep_latest.unwrap_or(1))),
            platforms: r.spec.platforms.clone(),
            credentials,
            insecure: secret.insecure,
            retention: Retention {
                keep_versions: r
                    .spec
                    .retention
                    .as_ref()
                    .and_then(|x| x.keep_versions)
                    .unwrap_or(0),
                grace_period_seconds: r.spec.grace_period_duration().map_or(0, |d| d.as_secs()),
            },
            verify_keys: r
                .spec
                .enforced_keys()
                .iter()
                .map(|k| (k.name.clone(), k.public_key.clone()))
                .collect(),
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Compares tags the way people number versions: numeric runs as numbers.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    fn parts(s: &str) -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut digits = false;
        for c in s.trim_start_matches('v').chars() {
            let d = c.is_ascii_digit();
            if !cur.is_empty() && d != digits {
                out.push(if digits {
                    cur.parse().map_err(|_| cur.clone())
                } else {
                    Err(cur.clone())
                });
                cur.clear();
            }
            digits = d;
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(if digits {
                cur.parse().map_err(|_| cur.clone())
            } else {
                Err(cur)
            });
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x, y) {
            (Ok(x), Ok(y)) => x.cmp(y),
            (Err(x), Err(y)) => x.cmp(y),
            (Ok(_), Err(_)) => Ordering::Greater,
            (Err(_), Ok(_)) => Ordering::Less,
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len()).then_with(|| a.cmp(b))
}

/// A `tagPattern` that is not a regular expression.
#[derive(Debug, thiserror::Error)]
#[error("spec.tagPattern.pattern {pattern:?}: {source}")]
pub struct PatternError {
    /// The pattern.
    pub pattern: String,
    /// Why it does not compile.
    #[source]
    pub source: regex::Error,
}

/// The newest `keep` tags that match `pattern` in full, newest first.
pub fn select_tags(tags: &[String], pattern: &str, keep: u32) -> Result<Vec<String>, PatternError> {
    let re = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|source| PatternError {
        pattern: pattern.to_string(),
        source,
    })?;
    let mut matching: Vec<String> = tags.iter().filter(|t| re.is_match(t)).cloned().collect();
    matching.sort_by(|a, b| version_cmp(b, a));
    matching.truncate(keep as usize);
    Ok(matching)
}

/// A target that could not be turned into images.
#[derive(Debug)]
pub struct ResolveFailure {
    /// Object and reference, e.g. `Repository default/app tag v1`.
    pub what: String,
    /// Why.
    pub error: ResolveError,
    /// The (registry, repository) whose desired digests are not known.
    pub repository: (String, String),
}

/// Why tags could not be resolved. Each is final for this run; the next
/// run asks again.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No client for the registry.
    #[error(transparent)]
    Client(TransferError),
    /// The tag list could not be read.
    #[error("listing tags: {0}")]
    ListTags(#[source] RegistryError),
    /// The tag pattern does not compile.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// No tag matches the pattern.
    #[error("no tag of {repository} matches {pattern:?}")]
    NoMatch {
        /// The repository.
        repository: String,
        /// The pattern.
        pattern: String,
    },
    /// The tag could not be resolved to a digest.
    #[error(transparent)]
    Tag(RegistryError),
}

/// Tag lookups in flight at once.
const RESOLVE_CONCURRENCY: usize = 64;

/// Resolves tags to digests and groups tags by digest into desired images,
/// several targets at once (a no-op re-sync is mostly these lookups).
pub async fn resolve(engine: &Engine, targets: &[Target]) -> (Vec<Pull>, Vec<ResolveFailure>) {
    let results: Vec<(Vec<Pull>, Vec<ResolveFailure>)> = futures::stream::iter(targets)
        .map(|t| resolve_one(engine, t))
        // A no-op re-sync is bounded by these round trips: ask for up to 64
        // at once (the registry's own concurrency does the rest), each on
        // its own kept-alive connection.
        .buffered(RESOLVE_CONCURRENCY)
        .collect()
        .await;
    let mut pulls = Vec::new();
    let mut failures = Vec::new();
    for (p, f) in results {
        pulls.extend(p);
        failures.extend(f);
    }
    (pulls, failures)
}

async fn resolve_one(engine: &Engine, t: &Target) -> (Vec<Pull>, Vec<ResolveFailure>) {
    let mut failures = Vec::new();
    let mut fail = |what: &str, error: ResolveError| {
        failures.push(ResolveFailure {
            what: what.to_string(),
            error,
            repository: (t.registry.clone(), t.repository.clone()),
        })
    };
    let client = match engine
        .client(&t.registry, t.credentials.as_ref(), t.insecure)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            fail(&t.object, ResolveError::Client(e));
            return (Vec::new(), failures);
        }
    };
    let mut tags = t.tags.clone();
    if let Some((pattern, keep)) = &t.pattern {
        match client.list_tags(&t.repository).await {
            Ok(all) => match select_tags(&all, pattern, *keep) {
                Ok(sel) if sel.is_empty() => fail(
                    &t.object,
                    ResolveError::NoMatch {
                        repository: t.repository.clone(),
                        pattern: pattern.clone(),
                    },
                ),
                Ok(sel) => tags.extend(sel),
                Err(e) => fail(&t.object, e.into()),
            },
            Err(e) => fail(&t.object, ResolveError::ListTags(e)),
        }
    }
    let mut by_digest: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |digest: String, tag: Option<String>| match by_digest
        .iter_mut()
        .find(|(d, _)| *d == digest)
    {
        Some((_, ts)) => ts.extend(tag),
        None => by_digest.push((digest, tag.into_iter().collect())),
    };
    if let Some(d) = &t.digest {
        add(d.clone(), None);
    }
    for tag in tags {
        match client.resolve_tag(&t.repository, &tag).await {
            Ok(d) => add(d, Some(tag)),
            Err(e) => fail(&format!("{} tag {tag}", t.object), ResolveError::Tag(e)),
        }
    }
    let pulls = by_digest
        .into_iter()
        .map(|(digest, tags)| t.pull(digest, tags))
        .collect();
    (pulls, failures)
}

impl Target {
    /// The pull of one resolved digest of this target, with the tags that
    /// name it.
    fn pull(&self, digest: String, tags: Vec<String>) -> Pull {
        let (namespace, name) = &self.source;
        Pull {
            image: DesiredImage {
                key: format!("{namespace}/{name}@{digest}"),
                source: self.source.clone(),
                registry_key: self.registry_key.clone(),
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                digest,
                tags,
                platforms: self.platforms.clone(),
                keep_versions: self.retention.keep_versions,
                grace_period_seconds: self.retention.grace_period_seconds,
                // No hub, no change to trace.
                trace_context: String::new(),
                verify_keys: self.verify_keys.clone(),
            },
            credentials: self.credentials.clone(),
            insecure: self.insecure,
        }
    }
}

/// Whether `s` is a host name or IP address with an optional port: what may
/// go into a `hosts.toml` path, URL and table name without changing their
/// meaning. IPv6 addresses go in brackets.
fn valid_authority(s: &str) -> bool {
    let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|p| p > 0);
    if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        return ip.parse::<std::net::Ipv6Addr>().is_ok()
            && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok));
    }
    let host = match s.split_once(':') {
        Some((h, p)) if port_ok(p) => h,
        Some(_) => return false,
        None => s,
    };
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// An upstream registry as `hosts-toml --upstream` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `HOST[:PORT]`: the name images use, the `ns` the mirror sees, and the
    /// directory under `certs.d`.
    pub host: String,
    /// Plain HTTP (`http://HOST[:PORT]`).
    pub plain_http: bool,
}

impl Upstream {
    /// Parses `HOST[:PORT]`, `http://HOST[:PORT]` or `https://HOST[:PORT]`
    /// (a trailing `/` is allowed). Anything else is refused with what was
    /// expected.
    pub fn parse(s: &str) -> Result<Upstream, ConfigError> {
        let (plain_http, rest) = if let Some(r) = s.strip_prefix("http://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (false, r)
        } else {
            (false, s)
        };
        let host = rest.strip_suffix('/').unwrap_or(rest);
        if !valid_authority(host) {
            return Err(ConfigError::new(
                format!("--upstream {s:?}"),
                "expected HOST[:PORT], http://HOST[:PORT] or https://HOST[:PORT]",
            ));
        }
        Ok(Upstream {
            host: host.to_string(),
            plain_http,
        })
    }

    /// Where containerd falls back to when the mirror cannot answer.
    fn server(&self) -> String {
        match (self.host.as_str(), self.plain_http) {
            ("docker.io", false) => "https://registry-1.docker.io".to_string(),
            (h, true) => format!("http://{h}"),
            (h, false) => format!("https://{h}"),
        }
    }
}

/// Checks the mirror URL for `hosts-toml --mirror`: `http://` or `https://`
/// and a host with an optional port. Returns it without a trailing `/`.
pub fn parse_mirror_url(s: &str) -> Result<String, ConfigError> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    let host = rest.map(|r| r.strip_suffix('/').unwrap_or(r));
    match host {
        Some(h) if valid_authority(h) => Ok(s.trim_end_matches('/').to_string()),
        _ => Err(ConfigError::new(
            format!("--mirror {s:?}"),
            "expected a URL like http://10.0.0.5:5050",
        )),
    }
}

/// A pull token as read from a file: trimmed, and only the characters a
/// token has (so that it cannot break out of the TOML string).
pub fn parse_token(text: &str) -> Option<&str> {
    let t = text.trim();
    (t.starts_with("imgfleet1.")
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    .then_some(t)
}

/// The containerd `hosts.toml` files that point nodes at the mirror: one per
/// upstream (its directory name and content), or `_default` (every registry)
/// when none is named. containerd asks the mirror first (adding
/// `?ns=<upstream>`) and falls back to `server`, over plain HTTP for an
/// `http://` upstream.
pub fn hosts_toml(
    mirror: &str,
    upstreams: &[Upstream],
    token: Option<&str>,
) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let list: Vec<Option<&Upstream>> = if upstreams.is_empty() {
        vec![None]
    } else {
        upstreams.iter().map(Some).collect()
    };
    for up in list {
        let dir = up.map_or("_default".to_string(), |u| u.host.clone());
        let mut out = format!("# /etc/containerd/certs.d/{dir}/hosts.toml\n");
        if let Some(u) = up {
            out.push_str(&format!("server = \"{}\"\n\n", u.server()));
        }
        out.push_str(&format!("[host.\"{mirror}\"]\n"));
        out.push_str("  capabilities = [\"pull\", \"resolve\"]\n");
        if let Some(t) = token {
            // containerd sends this header with every request to the mirror
            // (--mirror-auth token).
            out.push_str(&format!(
                "\n  [host.\"{mirror}\".header]\n    Authorization = \"Bearer {t}\"\n"
            ));
        }
        files.push((dir, out));
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_newest_matching_tags() {
        let tags: Vec<String> = [
            "v1.2.0",
            "v1.10.0",
            "v1.9.3",
            "latest",
            "v2.0.0-rc1",
            "v1.2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            select_tags(&tags, r"v1\.[0-9]+\.[0-9]+", 2).unwrap(),
            vec!["v1.10.0".to_string(), "v1.9.3".to_string()]
        );
        assert!(select_tags(&tags, "(", 1).is_err());
        assert_eq!(version_cmp("1.10", "1.9"), Ordering::Greater);
    }

    #[test]
    fn reads_yaml_and_reports_missing_secret() {
        let yaml = r#"
apiVersion: image.theriseunion.io/v1alpha1
kind: RegistrySecret
metadata: {name: lab, namespace: default}
spec: {domain: "127.0.0.1:5000", username: u, password: p, insecure: true}
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata: {name: app, namespace: default}
spec: {repository: demo/app, tag: v1, registryRef: {name: lab}}
"#;
        let t = targets_from_yaml(yaml).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].registry, "127.0.0.1:5000");
        assert_eq!(t[0].tags, vec!["v1".to_string()]);
        assert!(t[0].insecure);
        assert!(!format!("{:?}", t[0]).contains("password: \"p\""));
        let missing = yaml.replace("name: lab}", "name: other}");
        let err = targets_from_yaml(&missing).unwrap_err()[0].to_string();
        assert!(err.contains("Repository default/app"), "{err}");
        assert!(err.contains("RegistrySecret default/other"), "{err}");
    }

    #[test]
    fn hosts_toml_with_a_pull_token() {
        let mirror = parse_mirror_url("http://10.0.0.5:5050/").unwrap();
        let token = parse_token(" imgfleet1.abc-_.def\n").expect("token");
        let files = hosts_toml(&mirror, &[], Some(token));
        assert!(
            files[0].1.contains(
                "[host.\"http://10.0.0.5:5050\".header]\n    Authorization = \"Bearer imgfleet1.abc-_.def\"\n"
            ),
            "{}",
            files[0].1
        );
        for bad in ["", "abc", "imgfleet1.a\"b", "imgfleet1.a b"] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn hosts_toml_per_upstream() {
        let mirror = parse_mirror_url("http://10.0.0.5:5050/").unwrap();
        let ups = |list: &[&str]| -> Vec<Upstream> {
            list.iter().map(|u| Upstream::parse(u).unwrap()).collect()
        };
        let files = hosts_toml(&mirror, &ups(&["docker.io"]), None);
        assert_eq!(files[0].0, "docker.io");
        assert!(
            files[0]
                .1
                .contains("server = \"https://registry-1.docker.io\"")
        );
        assert!(files[0].1.contains("[host.\"http://10.0.0.5:5050\"]"));
        let files = hosts_toml(
            &mirror,
            &ups(&["http://127.0.0.1:5000", "https://h.example:8443/"]),
            None,
        );
        assert_eq!(files[0].0, "127.0.0.1:5000");
        assert!(
            files[0].1.contains("server = \"http://127.0.0.1:5000\"\n"),
            "{}",
            files[0].1
        );
        assert_eq!(files[1].0, "h.example:8443");
        assert!(files[1].1.contains("server = \"https://h.example:8443\"\n"));
        assert!(
            hosts_toml(&mirror, &[], None)[0]
                .1
                .contains("_default/hosts.toml")
        );
    }

    #[test]
    fn upstreams_and_mirrors_are_validated() {
        let check = |s: &str, want: Option<(&str, bool)>| {
            let got = Upstream::parse(s).ok().map(|u| (u.host, u.plain_http));
            assert_eq!(got, want.map(|(h, p)| (h.to_string(), p)), "{s:?}");
        };
        check("harbor.example.com", Some(("harbor.example.com", false)));
        check("127.0.0.1:5000", Some(("127.0.0.1:5000", false)));
        check("http://127.0.0.1:5000", Some(("127.0.0.1:5000", true)));
        check("https://reg.local/", Some(("reg.local", false)));
        check("[::1]:5000", Some(("[::1]:5000", false)));
        check("evil.com\"]\n[host.\"http://attacker:80", None);
        check("evil.com\"", None);
        check("ftp://x", None);
        check("http://", None);
        check("h:0", None);
        check("h:99999", None);
        check("a/b", None);
        check("-bad.example", None);
        check("::1", None);
        check("[::1", None);
        check("", None);
        assert!(parse_mirror_url("http://m:5050").is_ok());
        assert!(parse_mirror_url("m:5050").is_err());
        assert!(parse_mirror_url("http://m:5050\"]").is_err());
    }
}
