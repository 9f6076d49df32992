//! Semantic rules of the resource model: names, domains, image references,
//! durations, selectors and which fields go together.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use regex::Regex;

use super::{
    Cluster, LabelSelector, MIN_SYNC_INTERVAL, Object, Placement, RegistryRef, RegistrySecret,
    Repository, Retention, Scan, SelectorOperator, TagPattern, ValidationError, Verify,
    format_duration, parse_duration,
};

// Size limits of the fields an operator writes. Each bounds one field, so that
// `validate` names the field over its limit; together they keep the largest valid
// object near 1 MiB, below etcd's 1.5 MiB request limit and gRPC's 4 MiB message
// limit, so what `validate` accepts the hub can store and send. Names, label
// keys and values, namespaces, tags and repository paths keep the Kubernetes and
// OCI limits their format rules already carry.

/// `spec.verify.keys`: a few keys (a release key, a partner's, one being
/// rotated in).
pub(crate) const MAX_VERIFY_KEYS: usize = 16;
/// `spec.verify.keys[].publicKey`: a PEM P-256 key is under 200 bytes.
pub(crate) const MAX_PUBLIC_KEY_BYTES: usize = 4 * 1024;

/// `spec.scan.adapter`: a URL.
pub(crate) const MAX_ADAPTER_URL_BYTES: usize = 2048;

/// `spec.username`: registry user names are short (Harbor's robot accounts, the
/// longest in use, stay under 256 bytes); 1 KiB leaves room for any provider.
pub(crate) const MAX_USERNAME_BYTES: usize = 1024;
/// `spec.password`: passwords and tokens. The largest in use (JWT access tokens,
/// a GCP service-account key used as `_json_key` password) are a few KiB; the
/// password travels in an HTTP Authorization header, which registries cap at
/// 8 KiB to 1 MiB. 64 KiB accepts every real token and still fits the hub's
/// stores with room to spare once sealed and base64-encoded.
pub(crate) const MAX_PASSWORD_BYTES: usize = 64 * 1024;
/// `metadata.labels` and a selector's `matchLabels`: entries.
pub(crate) const MAX_LABELS: usize = 64;
/// `metadata.annotations`: keys and values together, Kubernetes' own limit
/// (`TotalAnnotationSizeLimitB`), so objects exported by kubectl still fit.
pub(crate) const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// `metadata.uid` and `metadata.resourceVersion`: the hub writes both; a copy
/// from `get -o yaml` is far shorter.
pub(crate) const MAX_METADATA_VALUE_BYTES: usize = 128;
/// `spec.tags` entries and `spec.tagPattern.keepLatest`: versions of one
/// Repository every targeted cluster stores.
pub(crate) const MAX_TAGS: usize = 256;
/// `spec.tagPattern.pattern`.
pub(crate) const MAX_PATTERN_BYTES: usize = 1024;
/// `spec.platforms` entries (OCI knows about a dozen os/arch pairs in use).
pub(crate) const MAX_PLATFORMS: usize = 16;
/// One `spec.platforms` entry, `os/arch/variant`.
pub(crate) const MAX_PLATFORM_BYTES: usize = 64;
/// `spec.placement.clusters` entries; a larger set is better chosen by labels.
pub(crate) const MAX_PLACEMENT_CLUSTERS: usize = 1000;
/// `matchExpressions` of a selector.
pub(crate) const MAX_SELECTOR_EXPRESSIONS: usize = 32;
/// `values` of one selector expression.
pub(crate) const MAX_SELECTOR_VALUES: usize = 64;
/// A Cluster's `spec.tenants` entries.
pub(crate) const MAX_TENANTS: usize = 1000;
/// Most subjects one binding may name (select more through a group).
pub(crate) const MAX_SUBJECTS: usize = 1000;
/// A Cluster's `spec.description`.
pub(crate) const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Durations such as `syncInterval` (`24h`, `1h30m`): the longest the grammar
/// reads, four parts (d, h, m, s) of at most 12 digits each.
pub(crate) const MAX_DURATION_BYTES: usize = 4 * (12 + 1);

/// A value quoted for a message, cut short when long, so that an error about
/// an oversized field never repeats megabytes of it.
pub(crate) fn shown(s: &str) -> String {
    const KEEP: usize = 64;
    if s.len() <= KEEP + 16 {
        return format!("{s:?}");
    }
    let mut end = KEEP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({})", &s[..end], size(s.len()))
}

/// A size for messages: `900 bytes`, `64 KiB`, `50.0 MiB`.
pub(crate) fn size(bytes: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    if bytes < KIB {
        format!("{bytes} bytes")
    } else if bytes < MIB {
        if bytes.is_multiple_of(KIB) {
            format!("{} KiB", bytes / KIB)
        } else {
            format!("{:.1} KiB", bytes as f64 / KIB as f64)
        }
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

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
        Object::RoleBinding(o) => v.binding(&o.spec.role, &o.spec.subjects, false),
        Object::ClusterRoleBinding(o) => v.binding(&o.spec.role, &o.spec.subjects, true),
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

/// What a tag must look like, for messages.
const EXPECTED_TAG: &str = "expected a tag: letters, digits, '_', '.' and '-', not starting with '.' or '-', at most 128 characters";

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
    // A host name of 253 characters, ':' and a port.
    const MAX_DOMAIN_BYTES: usize = 253 + 6;
    if domain.len() > MAX_DOMAIN_BYTES {
        return Err(format!(
            "{} long: {EXPECTED}, at most {MAX_DOMAIN_BYTES} characters",
            size(domain.len())
        ));
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

    /// Refuses a string longer than `max` bytes; returns whether it fits, so that
    /// callers check its format only then.
    fn within(&mut self, field: &str, value: &str, max: usize, what: &str) -> bool {
        if value.len() > max {
            self.push(
                field,
                format!(
                    "{} long: expected {what} of at most {}",
                    size(value.len()),
                    size(max)
                ),
            );
            false
        } else {
            true
        }
    }

    /// Refuses a list or map with more than `max` entries.
    fn at_most(&mut self, field: &str, entries: usize, max: usize, hint: &str) {
        if entries > max {
            self.push(
                field,
                format!("{entries} entries: expected at most {max}{hint}"),
            );
        }
    }

    fn metadata(&mut self, object: &Object) {
        let meta = object.metadata();
        match meta.name.as_deref() {
            None | Some("") => self.push("metadata.name", "required field is missing"),
            Some(name) if !is_dns_subdomain(name) => self.push(
                "metadata.name",
                format!("{}: expected a DNS-1123 name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters", shown(name)),
            ),
            Some(_) => {}
        }
        match (object.kind().namespaced(), meta.namespace.as_deref()) {
            (true, Some(ns)) if !is_dns_label(ns) => self.push(
                "metadata.namespace",
                format!("{}: expected a DNS-1123 label: lowercase letters, digits and '-', at most 63 characters", shown(ns)),
            ),
            (false, Some(ns)) if !ns.is_empty() => self.push(
                "metadata.namespace",
                format!("{}: Cluster is cluster-scoped; expected no namespace", shown(ns)),
            ),
            _ => {}
        }
        if let Some(labels) = &meta.labels {
            self.labels("metadata.labels", labels);
        }
        if let Some(annotations) = &meta.annotations {
            let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
            if total > MAX_ANNOTATIONS_BYTES {
                self.push(
                    "metadata.annotations",
                    format!(
                        "{} in keys and values: expected at most {} in total, as in Kubernetes",
                        size(total),
                        size(MAX_ANNOTATIONS_BYTES)
                    ),
                );
            }
            for k in annotations.keys() {
                if !is_label_key(k) {
                    self.push(
                        "metadata.annotations",
                        format!("key {}: expected an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.'", shown(k)),
                    );
                }
            }
        }
        if let Some(uid) = &meta.uid {
            self.within("metadata.uid", uid, MAX_METADATA_VALUE_BYTES, "a uid");
        }
        if let Some(rv) = &meta.resource_version {
            self.within(
                "metadata.resourceVersion",
                rv,
                MAX_METADATA_VALUE_BYTES,
                "the resourceVersion a get returned",
            );
        }
    }

    fn labels(&mut self, field: &str, labels: &BTreeMap<String, String>) {
        self.at_most(field, labels.len(), MAX_LABELS, "");
        for (k, v) in labels {
            if !is_label_key(k) {
                // A key too long to be one is not repeated in the field path.
                let (path, message) = if k.len() > 253 + 1 + 63 {
                    (
                        field.to_owned(),
                        format!(
                            "key {}: invalid label key: expected an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.'",
                            shown(k)
                        ),
                    )
                } else {
                    (
                        format!("{field}.{k}"),
                        "invalid label key: expected an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.'".to_owned(),
                    )
                };
                self.push(path, message);
                continue;
            }
            if !is_label_value(v) {
                self.push(
                    format!("{field}.{k}"),
                    format!("{}: expected a label value of at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit", shown(v)),
                );
            }
        }
    }

    fn registry_secret(&mut self, o: &RegistrySecret) {
        let spec = &o.spec;
        if let Err(why) = check_domain(&spec.domain) {
            self.push("spec.domain", format!("{}: {why}", shown(&spec.domain)));
        }
        if let Some(u) = &spec.username {
            self.within("spec.username", u, MAX_USERNAME_BYTES, "a user name");
        }
        if let Some(p) = &spec.password {
            // Only the size is said, never the value.
            self.within(
                "spec.password",
                p,
                MAX_PASSWORD_BYTES,
                "a password or token",
            );
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
        self.repository_path(&spec.repository);
        self.version_choice(o);
        if let Some(tag) = &spec.tag
            && !is_tag(tag)
        {
            self.push("spec.tag", format!("{}: {EXPECTED_TAG}", shown(tag)));
        }
        self.at_most(
            "spec.tags",
            spec.tags.len(),
            MAX_TAGS,
            "; a tagPattern with keepLatest picks many tags",
        );
        self.each_once("spec.tags", &spec.tags, "tag", |tag| {
            (!is_tag(tag)).then(|| EXPECTED_TAG.to_owned())
        });
        if let Some(p) = &spec.tag_pattern {
            self.tag_pattern(p);
        }
        if let Some(d) = &spec.digest
            && !is_digest(d)
        {
            self.push(
                "spec.digest",
                format!(
                    "{}: expected sha256: followed by 64 lowercase hex digits",
                    shown(d)
                ),
            );
        }
        self.at_most("spec.platforms", spec.platforms.len(), MAX_PLATFORMS, "");
        self.each_once("spec.platforms", &spec.platforms, "platform", |p| {
            (!is_platform(p) || p.len() > MAX_PLATFORM_BYTES).then(|| format!("expected os/arch or os/arch/variant, e.g. linux/amd64 or linux/arm64/v8, at most {MAX_PLATFORM_BYTES} characters"))
        });
        self.registry_ref(&spec.registry_ref, namespace);
        if let Some(interval) = &spec.sync_interval {
            self.duration("spec.syncInterval", interval, Some(MIN_SYNC_INTERVAL));
        }
        if let Some(placement) = &spec.placement {
            self.placement(placement);
        }
        if let Some(retention) = &spec.retention {
            self.retention(retention);
        }
        if let Some(verify) = &spec.verify {
            self.verify(verify);
        }
        if let Some(scan) = &spec.scan {
            self.scan(scan);
        }
    }

    /// `spec.scan.adapter`: an http(s) URL with a host.
    fn scan(&mut self, scan: &Scan) {
        let field = "spec.scan.adapter";
        if scan.adapter.is_empty() {
            self.push(field, "required field is missing");
            return;
        }
        if !self.within(field, &scan.adapter, MAX_ADAPTER_URL_BYTES, "a URL") {
            return;
        }
        let rest = scan
            .adapter
            .strip_prefix("https://")
            .or_else(|| scan.adapter.strip_prefix("http://"));
        let host = rest.map(|r| r.split('/').next().unwrap_or_default());
        let ok = host.is_some_and(|h| {
            !h.is_empty()
                && !h.contains('@')
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
        if !ok {
            self.push(
                field,
                format!(
                    "{}: expected the adapter's URL, e.g. https://scanner.example:8080",
                    shown(&scan.adapter)
                ),
            );
        }
    }

    /// `spec.verify`: at least one key, each with a unique DNS-label name and
    /// a PEM ECDSA P-256 public key.
    fn verify(&mut self, verify: &Verify) {
        use p256::pkcs8::DecodePublicKey;
        if verify.keys.is_empty() {
            self.push(
                "spec.verify.keys",
                "required: expected at least one key ({name, publicKey})",
            );
        }
        self.at_most("spec.verify.keys", verify.keys.len(), MAX_VERIFY_KEYS, "");
        let mut seen = BTreeSet::new();
        for (i, key) in verify.keys.iter().enumerate() {
            let field = format!("spec.verify.keys[{i}]");
            if key.name.is_empty() {
                self.push(format!("{field}.name"), "required field is missing");
            } else if !is_dns_label(&key.name) {
                self.push(
                    format!("{field}.name"),
                    format!("{}: expected a DNS-1123 label: lowercase letters, digits and '-', at most 63 characters", shown(&key.name)),
                );
            } else if !seen.insert(key.name.as_str()) {
                self.push(
                    format!("{field}.name"),
                    format!(
                        "{}: listed twice: expected each key name once",
                        shown(&key.name)
                    ),
                );
            }
            let pk = format!("{field}.publicKey");
            if key.public_key.trim().is_empty() {
                self.push(pk, "required field is missing");
            } else if self.within(
                &pk,
                &key.public_key,
                MAX_PUBLIC_KEY_BYTES,
                "a PEM public key",
            ) && p256::PublicKey::from_public_key_pem(key.public_key.trim()).is_err()
            {
                self.push(
                    pk,
                    "expected an ECDSA P-256 public key in PEM (-----BEGIN PUBLIC KEY-----), as cosign.pub",
                );
            }
        }
    }

    /// `spec.repository`: an OCI repository path, with a hint for the usual mistakes.
    fn repository_path(&mut self, repo: &str) {
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
                format!("{}: expected a repository path like library/nginx: lowercase letters and digits separated by '.', '_' or '-', components joined by '/', at most 255 characters{extra}", shown(repo)),
            );
        }
    }

    /// Which versions a Repository names: one of tag, tags or tagPattern, or a digest
    /// (alone or with a single tag).
    fn version_choice(&mut self, o: &Repository) {
        let spec = &o.spec;
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
    }

    fn tag_pattern(&mut self, p: &TagPattern) {
        if p.pattern.is_empty() {
            self.push(
                "spec.tagPattern.pattern",
                "must not be empty; expected a regular expression like ^v1\\.[0-9]+\\.[0-9]+$",
            );
        } else if self.within(
            "spec.tagPattern.pattern",
            &p.pattern,
            MAX_PATTERN_BYTES,
            "a regular expression",
        ) && let Err(e) = Regex::new(&p.pattern)
        {
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
                    "{}: expected a valid regular expression ({first})",
                    shown(&p.pattern)
                ),
            );
        }
        match p.keep_latest {
            Some(0) => self.push(
                "spec.tagPattern.keepLatest",
                "0 is too small: expected at least 1",
            ),
            Some(n) if n as usize > MAX_TAGS => self.push(
                "spec.tagPattern.keepLatest",
                format!("{n} is too large: expected at most {MAX_TAGS} versions"),
            ),
            _ => {}
        }
    }

    /// `spec.registryRef`: a RegistrySecret of the Repository's own namespace.
    fn registry_ref(&mut self, r: &RegistryRef, namespace: &str) {
        if r.name.is_empty() {
            self.push(
                "spec.registryRef.name",
                "required field is missing; expected the name of a RegistrySecret",
            );
        } else if !is_dns_subdomain(&r.name) {
            self.push(
                "spec.registryRef.name",
                format!(
                    "{}: expected the DNS-1123 name of a RegistrySecret",
                    shown(&r.name)
                ),
            );
        }
        if let Some(ns) = &r.namespace
            && ns != namespace
        {
            self.push(
                "spec.registryRef.namespace",
                format!("{}: expected the Repository's own namespace {namespace:?}; a RegistrySecret is usable only from its own namespace", shown(ns)),
            );
        }
    }

    fn placement(&mut self, placement: &Placement) {
        if let Some(sel) = &placement.cluster_selector {
            self.selector("spec.placement.clusterSelector", sel);
        }
        self.at_most(
            "spec.placement.clusters",
            placement.clusters.len(),
            MAX_PLACEMENT_CLUSTERS,
            "; select that many clusters by label with clusterSelector",
        );
        self.each_once(
            "spec.placement.clusters",
            &placement.clusters,
            "cluster",
            |c| (!is_dns_subdomain(c)).then(|| "expected a cluster name (DNS-1123)".to_owned()),
        );
    }

    fn retention(&mut self, retention: &Retention) {
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

    /// Checks each entry of the list `field` with `invalid` (what was expected, when the
    /// entry is not valid), and refuses a valid entry listed twice: a set written as a
    /// list, such as tags, platforms, clusters or tenants.
    fn each_once(
        &mut self,
        field: &str,
        entries: &[String],
        noun: &str,
        invalid: impl Fn(&str) -> Option<String>,
    ) {
        let mut seen = BTreeSet::new();
        for (i, entry) in entries.iter().enumerate() {
            if let Some(expected) = invalid(entry) {
                self.push(
                    format!("{field}[{i}]"),
                    format!("{}: {expected}", shown(entry)),
                );
            } else if !seen.insert(entry) {
                self.push(
                    format!("{field}[{i}]"),
                    format!("{entry:?}: listed twice; expected each {noun} once"),
                );
            }
        }
    }

    fn duration(&mut self, field: &str, text: &str, min: Option<std::time::Duration>) {
        if !self.within(
            field,
            text,
            MAX_DURATION_BYTES,
            "a duration like 30m, 1h or 24h",
        ) {
            return;
        }
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
        self.at_most(
            &format!("{field}.matchExpressions"),
            sel.match_expressions.len(),
            MAX_SELECTOR_EXPRESSIONS,
            "",
        );
        for (i, e) in sel.match_expressions.iter().enumerate() {
            let base = format!("{field}.matchExpressions[{i}]");
            if !is_label_key(&e.key) {
                self.push(
                    format!("{base}.key"),
                    format!(
                        "{}: expected a label key like env or example.com/tier",
                        shown(&e.key)
                    ),
                );
            }
            self.at_most(
                &format!("{base}.values"),
                e.values.len(),
                MAX_SELECTOR_VALUES,
                "",
            );
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
                        format!("{}: expected a label value", shown(v)),
                    );
                }
            }
        }
    }

    fn binding(&mut self, role: &str, subjects: &[super::Subject], fleet_wide: bool) {
        let expected = if fleet_wide {
            "expected cluster-viewer or cluster-admin"
        } else {
            "expected viewer, editor or admin"
        };
        match super::Role::parse(role) {
            Some(r) if r.fleet_wide() == fleet_wide => {}
            _ => self.push("spec.role", format!("{}: {expected}", shown(role))),
        }
        if subjects.is_empty() {
            self.push(
                "spec.subjects",
                "empty: expected at least one {kind: User|Group, name}",
            );
        }
        self.at_most(
            "spec.subjects",
            subjects.len(),
            MAX_SUBJECTS,
            ": bind a Group instead",
        );
        for (i, s) in subjects.iter().enumerate() {
            if s.kind != "User" && s.kind != "Group" {
                self.push(
                    format!("spec.subjects[{i}].kind"),
                    format!("{}: expected User or Group", shown(&s.kind)),
                );
            }
            let ok = !s.name.is_empty()
                && s.name.len() <= 64
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
            if !ok {
                self.push(
                    format!("spec.subjects[{i}].name"),
                    format!(
                        "{}: expected a user or group name: 1-64 letters, digits, '-', '_', '.', '@'",
                        shown(&s.name)
                    ),
                );
            }
        }
    }

    fn cluster(&mut self, o: &Cluster) {
        self.at_most("spec.tenants", o.spec.tenants.len(), MAX_TENANTS, "");
        if let Some(d) = &o.spec.description {
            self.within(
                "spec.description",
                d,
                MAX_DESCRIPTION_BYTES,
                "a description",
            );
        }
        self.each_once("spec.tenants", &o.spec.tenants, "namespace", |t| {
            (!is_dns_label(t)).then(|| "expected a namespace name (DNS-1123 label)".to_owned())
        });
    }
}
