//! Semantic rules of the resource model: names, domains, image references,
//! durations, selectors and which fields go together.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use regex::Regex;

use super::{
    Cluster, LabelSelector, MIN_SYNC_INTERVAL, Object, RegistrySecret, Repository,
    SelectorOperator, ValidationError, format_duration, parse_duration,
};

/// Every violation of the semantic rules by one object.
pub(crate) fn validate_object(object: &Object) -> Vec<ValidationError> {
    let mut v = Errors {
        id: object.id(),
        errors: Vec::new(),
    };
    v.metadata(object);
    match object {
        Object::RegistrySecret(o) => v.registry_secret(o),
        Object::Repository(o) => v.repository(o, object.namespace().unwrap_or_default()),
        Object::Cluster(o) => v.cluster(o),
    }
    v.errors
}

struct Errors {
    id: String,
    errors: Vec<ValidationError>,
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    // The patterns are literals of this file, so compiling them cannot fail at run time
    // once the tests have passed; a failure here is a programming error.
    cell.get_or_init(|| Regex::new(pattern).expect("built-in pattern compiles"))
}

/// DNS-1123 label: namespaces, tenants.
pub(crate) fn is_dns_label(s: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    s.len() <= 63 && re(&RE, r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").is_match(s)
}

/// DNS-1123 subdomain: object names (the seed's `myapp-v1.0.0` has dots).
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && !s.is_empty() && s.split('.').all(is_dns_label)
}

/// OCI distribution repository path: `library/nginx`.
pub(crate) fn is_repository_path(s: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    s.len() <= 255
        && re(
            &RE,
            r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$",
        )
        .is_match(s)
}

/// OCI tag: `latest`, `v1.0.0`.
pub(crate) fn is_tag(s: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    re(&RE, r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$").is_match(s)
}

/// A sha256 digest: `sha256:` and 64 lowercase hex digits.
pub(crate) fn is_digest(s: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    re(&RE, r"^sha256:[0-9a-f]{64}$").is_match(s)
}

fn is_platform(s: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    re(&RE, r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$").is_match(s)
}

fn is_label_name(s: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    s.len() <= 63 && re(&RE, r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$").is_match(s)
}

/// Kubernetes label key: `[prefix/]name`.
pub(crate) fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(s),
    }
}

/// Kubernetes label value: empty or a label name.
pub(crate) fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

/// Checks a registry domain: `host` or `host:port`, without scheme or path.
/// Returns what is wrong, phrased to follow the quoted value.
pub(crate) fn check_domain(domain: &str) -> Result<(), String> {
    const EXPECTED: &str =
        "expected a host or host:port such as harbor.example.com or 127.0.0.1:5000";
    if domain.is_empty() {
        return Err("must not be empty; expected a host or host:port".to_owned());
    }
    if domain.contains("://") {
        return Err(format!(
            "{EXPECTED}, without a scheme (http:// or https://); use insecure: true for plain HTTP"
        ));
    }
    if domain.contains('/') {
        return Err(format!("{EXPECTED}, without a path"));
    }
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // [IPv6] or [IPv6]:port
        let Some((addr, after)) = rest.split_once(']') else {
            return Err(EXPECTED.to_owned());
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{addr:?} is not an IPv6 address; {EXPECTED}"));
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(EXPECTED.to_owned()),
            },
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(port) = port {
        match port.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => {}
            Ok(p) => {
                return Err(format!(
                    "port {p} is out of range; {EXPECTED}, with a port from 1 to 65535"
                ));
            }
            Err(_) => return Err(format!("port {port:?} is not a number; {EXPECTED}")),
        }
    }
    if let Some(host) = host {
        let valid_name = host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid_name && host.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(EXPECTED.to_owned());
        }
    }
    Ok(())
}

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors
            .push(ValidationError::new(self.id.clone(), field, message));
    }

    fn metadata(&mut self, object: &Object) {
        let meta = object.metadata();
        match meta.name.as_deref() {
            None | Some("") => self.push("metadata.name", "required field is missing"),
            Some(name) if !is_dns_subdomain(name) => self.push(
                "metadata.name",
                format!("{name:?}: expected a DNS-1123 name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"),
            ),
            Some(_) => {}
        }
        match (object.kind().namespaced(), meta.namespace.as_deref()) {
            (true, Some(ns)) if !is_dns_label(ns) => self.push(
                "metadata.namespace",
                format!("{ns:?}: expected a DNS-1123 label: lowercase letters, digits and '-', at most 63 characters"),
            ),
            (false, Some(ns)) if !ns.is_empty() => self.push(
                "metadata.namespace",
                format!("{ns:?}: Cluster is cluster-scoped; expected no namespace"),
            ),
            _ => {}
        }
        if let Some(labels) = &meta.labels {
            self.labels("metadata.labels", labels);
        }
    }

    fn labels(&mut self, field: &str, labels: &BTreeMap<String, String>) {
        for (k, v) in labels {
            if !is_label_key(k) {
                self.push(
                    format!("{field}.{k}"),
                    "invalid label key: expected an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.'",
                );
            }
            if !is_label_value(v) {
                self.push(
                    format!("{field}.{k}"),
                    format!("{v:?}: expected a label value of at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"),
                );
            }
        }
    }

    fn registry_secret(&mut self, o: &RegistrySecret) {
        let spec = &o.spec;
        if let Err(why) = check_domain(&spec.domain) {
            self.push("spec.domain", format!("{:?}: {why}", spec.domain));
        }
        match (&spec.username, &spec.password) {
            (Some(u), _) if u.is_empty() => self.push(
                "spec.username",
                "must not be empty; leave username and password out for anonymous pulls",
            ),
            (Some(_), None) => self.push(
                "spec.password",
                "required field is missing: username is set, so password is expected too (or neither, for anonymous pulls); the hub never returns passwords, so add it back when re-applying `get -o yaml` output",
            ),
            (None, Some(_)) => self.push(
                "spec.username",
                "required field is missing: password is set, so username is expected too (or neither, for anonymous pulls)",
            ),
            _ => {}
        }
        if spec.password.as_deref() == Some("") {
            // The value is never echoed, not even when empty.
            self.push(
                "spec.password",
                "must not be empty; leave username and password out for anonymous pulls",
            );
        }
    }

    fn repository(&mut self, o: &Repository, namespace: &str) {
        let spec = &o.spec;
        let repo = &spec.repository;
        if repo.is_empty() {
            self.push(
                "spec.repository",
                "required field is missing; expected a path like library/nginx",
            );
        } else if !is_repository_path(repo) {
            let extra = if repo.contains(':') || repo.contains('@') {
                "; put the tag in spec.tag and the digest in spec.digest, not in the path"
            } else if repo.chars().any(|c| c.is_ascii_uppercase()) {
                "; repository paths are lowercase"
            } else if repo.starts_with('/') || repo.ends_with('/') || repo.contains("//") {
                "; no leading, trailing or double '/'"
            } else {
                ""
            };
            self.push(
                "spec.repository",
                format!("{repo:?}: expected a repository path like library/nginx: lowercase letters and digits separated by '.', '_' or '-', components joined by '/'{extra}"),
            );
        }

        let has_tag = spec.tag.is_some();
        let has_tags = !spec.tags.is_empty();
        let has_pattern = spec.tag_pattern.is_some();
        let has_digest = spec.digest.is_some();
        if !(has_tag || has_tags || has_pattern || has_digest) {
            self.push(
                "spec.tag",
                "required field is missing: expected one of tag, tags, tagPattern or digest",
            );
        }
        let chosen: Vec<&str> = [
            (has_tag, "tag"),
            (has_tags, "tags"),
            (has_pattern, "tagPattern"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if chosen.len() > 1 {
            self.push(
                format!("spec.{}", chosen[1]),
                format!(
                    "set together with spec.{}: expected only one of tag, tags or tagPattern",
                    chosen[0]
                ),
            );
        }
        if has_digest && (has_tags || has_pattern) {
            self.push(
                "spec.digest",
                "a pinned digest cannot be combined with tags or tagPattern: expected digest alone or with a single tag",
            );
        }
        if let Some(tag) = &spec.tag
            && !is_tag(tag)
        {
            self.push(
                "spec.tag",
                format!("{tag:?}: expected a tag: letters, digits, '_', '.' and '-', not starting with '.' or '-', at most 128 characters"),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, tag) in spec.tags.iter().enumerate() {
            if !is_tag(tag) {
                self.push(
                    format!("spec.tags[{i}]"),
                    format!("{tag:?}: expected a tag: letters, digits, '_', '.' and '-', not starting with '.' or '-', at most 128 characters"),
                );
            } else if !seen.insert(tag) {
                self.push(
                    format!("spec.tags[{i}]"),
                    format!("{tag:?}: listed twice; expected each tag once"),
                );
            }
        }
        if let Some(p) = &spec.tag_pattern {
            if p.pattern.is_empty() {
                self.push(
                    "spec.tagPattern.pattern",
                    "must not be empty; expected a regular expression like ^v1\\.[0-9]+\\.[0-9]+$",
                );
            } else if let Err(e) = Regex::new(&p.pattern) {
                let first = e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                self.push(
                    "spec.tagPattern.pattern",
                    format!(
                        "{:?}: expected a valid regular expression ({first})",
                        p.pattern
                    ),
                );
            }
            if p.keep_latest == Some(0) {
                self.push(
                    "spec.tagPattern.keepLatest",
                    "0 is too small: expected at least 1",
                );
            }
        }
        if let Some(d) = &spec.digest
            && !is_digest(d)
        {
            self.push(
                "spec.digest",
                format!("{d:?}: expected sha256: followed by 64 lowercase hex digits"),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, p) in spec.platforms.iter().enumerate() {
            if !is_platform(p) {
                self.push(
                    format!("spec.platforms[{i}]"),
                    format!("{p:?}: expected os/arch or os/arch/variant, e.g. linux/amd64 or linux/arm64/v8"),
                );
            } else if !seen.insert(p) {
                self.push(
                    format!("spec.platforms[{i}]"),
                    format!("{p:?}: listed twice; expected each platform once"),
                );
            }
        }

        let r = &spec.registry_ref;
        if r.name.is_empty() {
            self.push(
                "spec.registryRef.name",
                "required field is missing; expected the name of a RegistrySecret",
            );
        } else if !is_dns_subdomain(&r.name) {
            self.push(
                "spec.registryRef.name",
                format!(
                    "{:?}: expected the DNS-1123 name of a RegistrySecret",
                    r.name
                ),
            );
        }
        if let Some(ns) = &r.namespace
            && ns != namespace
        {
            self.push(
                "spec.registryRef.namespace",
                format!("{ns:?}: expected the Repository's own namespace {namespace:?}; a RegistrySecret is usable only from its own namespace"),
            );
        }
        if let Some(interval) = &spec.sync_interval {
            self.duration("spec.syncInterval", interval, Some(MIN_SYNC_INTERVAL));
        }
        if let Some(placement) = &spec.placement {
            if let Some(sel) = &placement.cluster_selector {
                self.selector("spec.placement.clusterSelector", sel);
            }
            let mut seen = BTreeSet::new();
            for (i, c) in placement.clusters.iter().enumerate() {
                let field = format!("spec.placement.clusters[{i}]");
                if !is_dns_subdomain(c) {
                    self.push(field, format!("{c:?}: expected a cluster name (DNS-1123)"));
                } else if !seen.insert(c) {
                    self.push(
                        field,
                        format!("{c:?}: listed twice; expected each cluster once"),
                    );
                }
            }
        }
        if let Some(retention) = &spec.retention {
            if retention.keep_versions == Some(0) {
                self.push(
                    "spec.retention.keepVersions",
                    "0 is too small: expected at least 1",
                );
            }
            if let Some(g) = &retention.grace_period {
                self.duration("spec.retention.gracePeriod", g, None);
            }
        }
    }

    fn duration(&mut self, field: &str, text: &str, min: Option<std::time::Duration>) {
        match parse_duration(text) {
            Err(e) => self.push(field, format!("{text:?}: {e}")),
            Ok(d) => {
                if let Some(min) = min
                    && d < min
                {
                    self.push(
                        field,
                        format!(
                            "{text:?}: too short; expected at least {}",
                            format_duration(min)
                        ),
                    );
                }
            }
        }
    }

    fn selector(&mut self, field: &str, sel: &LabelSelector) {
        self.labels(&format!("{field}.matchLabels"), &sel.match_labels);
        for (i, e) in sel.match_expressions.iter().enumerate() {
            let base = format!("{field}.matchExpressions[{i}]");
            if !is_label_key(&e.key) {
                self.push(
                    format!("{base}.key"),
                    format!(
                        "{:?}: expected a label key like env or example.com/tier",
                        e.key
                    ),
                );
            }
            match e.operator {
                SelectorOperator::In | SelectorOperator::NotIn if e.values.is_empty() => self.push(
                    format!("{base}.values"),
                    format!("expected at least one value for operator {:?}", e.operator),
                ),
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !e.values.is_empty() =>
                {
                    self.push(
                        format!("{base}.values"),
                        format!("expected no values for operator {:?}", e.operator),
                    )
                }
                _ => {}
            }
            for (j, v) in e.values.iter().enumerate() {
                if !is_label_value(v) {
                    self.push(
                        format!("{base}.values[{j}]"),
                        format!("{v:?}: expected a label value"),
                    );
                }
            }
        }
    }

    fn cluster(&mut self, o: &Cluster) {
        let mut seen = BTreeSet::new();
        for (i, t) in o.spec.tenants.iter().enumerate() {
            let field = format!("spec.tenants[{i}]");
            if !is_dns_label(t) {
                self.push(
                    field,
                    format!("{t:?}: expected a namespace name (DNS-1123 label)"),
                );
            } else if !seen.insert(t) {
                self.push(
                    field,
                    format!("{t:?}: listed twice; expected each namespace once"),
                );
            }
        }
    }
}
