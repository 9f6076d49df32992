//! Tag resolution: turns a Repository's tag, tags or tag pattern into pinned
//! digests against its upstream registry, so every cluster gets the same
//! version, and checks each registry's health.
//!
//! With a signature policy (`spec.verify`), each resolved digest's cosign
//! signature is checked here, before it can reach a desired set.
//!
//! The choice of tags ([`select_tags`]), the failure classification
//! ([`FailureReason::of`]) and the status transition ([`next_status`]) are pure
//! functions; only [`resolve`] and [`check_health`] talk to a registry.

use std::cmp::Ordering;
use std::time::{Duration, SystemTime};

use imgfleet::model::{Verify, VerifyMode};
use imgfleet_common::cosign;
use imgfleet_common::registry::{
    DOCKER_LIST, OCI_INDEX, RegistryClient, RegistryError, sha256_hex,
};
use imgfleet_common::scanner::{ScanError, ScanTarget, ScannerClient, Severity};

/// What to resolve for one Repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveSpec {
    /// Repository path inside the registry, e.g. `library/nginx`.
    pub repository: String,
    /// What the operator asked for.
    pub tags: TagChoice,
    /// A pinned digest: tags are then only names for it and are not looked up.
    pub digest: Option<String>,
    /// Platforms the index must offer, e.g. `linux/amd64`. Empty means any.
    pub platforms: Vec<String>,
    /// The signature policy each resolved digest must pass, if any.
    pub verify: Option<Verify>,
    /// The scanner gate each new digest must pass, if any.
    pub scan: Option<ScanGate>,
    /// What is already shipped (the last good resolution): never
    /// rescanned, so a scanner outage never touches it; its scan summaries
    /// are kept.
    pub shipped: Vec<Resolved>,
}

/// The scanner gate of a Repository (`spec.scan`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanGate {
    /// The adapter's base URL.
    pub adapter: String,
    /// The lowest severity that blocks; `None` blocks nothing.
    pub block: Option<Severity>,
}

/// How long the resolver waits for one scan report.
pub const SCAN_WAIT: Duration = Duration::from_secs(120);

/// Which tags of a repository to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagChoice {
    /// These tags, in this order.
    Fixed(Vec<String>),
    /// The newest `keep_latest` tags matching a regular expression in full.
    Pattern { pattern: String, keep_latest: usize },
}

/// One tag pinned to a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub tag: String,
    pub digest: String,
    pub media_type: String,
    /// The scanner gate's report summary, when the digest was scanned.
    pub scan: Option<String>,
    /// The signature check's outcome, under a verify policy.
    pub verification: Option<String>,
}

/// Why a resolution failed, as shown in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    AuthFailed,
    NotFound,
    Unreachable,
    RateLimited,
    /// A resolved digest has no valid cosign signature under the policy.
    VerificationFailed,
    /// The scanner found a vulnerability at or above the threshold.
    ScanBlocked,
    /// The scanner could not scan a new digest.
    ScannerUnavailable,
}

/// A failed resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    /// Human-readable detail; never holds a credential (registry errors do not).
    pub message: String,
    /// For RateLimited: how long the registry asked us to wait.
    pub retry_after: Option<Duration>,
}

impl FailureReason {
    /// Classifies a registry error. Anything not clearly about credentials,
    /// existence or rate limits is reported as Unreachable: the registry did
    /// not give a usable answer.
    pub fn of(error: &RegistryError) -> FailureReason {
        match error {
            RegistryError::AuthFailed { .. } => FailureReason::AuthFailed,
            RegistryError::NotFound { .. } => FailureReason::NotFound,
            RegistryError::RateLimited { .. } => FailureReason::RateLimited,
            RegistryError::Http {
                status: 401 | 403, ..
            } => FailureReason::AuthFailed,
            RegistryError::Http { status: 404, .. } => FailureReason::NotFound,
            RegistryError::Http { status: 429, .. } => FailureReason::RateLimited,
            _ => FailureReason::Unreachable,
        }
    }

    /// The name used in status and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::AuthFailed => "AuthFailed",
            FailureReason::NotFound => "NotFound",
            FailureReason::Unreachable => "Unreachable",
            FailureReason::RateLimited => "RateLimited",
            FailureReason::VerificationFailed => "VerificationFailed",
            FailureReason::ScanBlocked => "ScanBlocked",
            FailureReason::ScannerUnavailable => "ScannerUnavailable",
        }
    }
}

impl From<&RegistryError> for Failure {
    fn from(error: &RegistryError) -> Self {
        Failure {
            reason: FailureReason::of(error),
            message: error.to_string(),
            retry_after: error.retry_after(),
        }
    }
}

/// The resolution part of a Repository's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolveStatus {
    /// The last good resolution.
    pub resolved: Vec<Resolved>,
    /// When `resolved` was obtained.
    pub last_resolve_time: Option<SystemTime>,
    /// Why the latest attempt failed, if it did.
    pub reason: Option<FailureReason>,
    pub message: String,
    /// The latest attempt failed and `resolved` is the last good result.
    pub stale: bool,
    /// For RateLimited: no attempt before this time.
    pub retry_after: Option<SystemTime>,
}

/// The status after an attempt at `now`. A failure keeps the last good digests
/// and marks them stale, so clusters keep the version they have rather than
/// losing it to an upstream outage.
pub fn next_status(
    previous: &ResolveStatus,
    outcome: &Result<Vec<Resolved>, Failure>,
    now: SystemTime,
) -> ResolveStatus {
    match outcome {
        Ok(resolved) => ResolveStatus {
            resolved: resolved.clone(),
            last_resolve_time: Some(now),
            reason: None,
            message: String::new(),
            stale: false,
            retry_after: None,
        },
        Err(failure) => ResolveStatus {
            resolved: previous.resolved.clone(),
            last_resolve_time: previous.last_resolve_time,
            reason: Some(failure.reason),
            message: failure.message.clone(),
            stale: !previous.resolved.is_empty(),
            retry_after: failure.retry_after.map(|d| now + d),
        },
    }
}

/// When the next attempt is due: after a rate limit, not before Retry-After;
/// after a success, one sync interval later; after another failure, a short
/// back-off capped by the interval.
pub fn next_attempt(status: &ResolveStatus, interval: Duration, now: SystemTime) -> SystemTime {
    if let Some(after) = status.retry_after {
        return after.max(now);
    }
    match (status.reason, status.last_resolve_time) {
        (None, Some(last)) => last + interval,
        (None, None) => now,
        (Some(_), _) => now + interval.min(Duration::from_secs(30)),
    }
}

/// The newest `keep` tags matching `pattern` in full, newest first. Tags are
/// ordered as versions: numeric runs compare as numbers (`v1.10` after
/// `v1.9`), a pre-release (`1.0.0-rc1`) sorts before its release, and ties fall
/// back to plain string order so the result is deterministic.
pub fn select_tags(tags: &[String], pattern: &regex::Regex, keep: usize) -> Vec<String> {
    let mut matching: Vec<&String> = tags
        .iter()
        .filter(|t| {
            pattern
                .find(t)
                .is_some_and(|m| m.start() == 0 && m.end() == t.len())
        })
        .collect();
    matching.sort_by(|a, b| compare_versions(b, a));
    matching.dedup();
    matching.into_iter().take(keep).cloned().collect()
}

/// Compares two tags as versions (see [`select_tags`]).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (a_main, a_pre) = split_prerelease(a);
    let (b_main, b_pre) = split_prerelease(b);
    compare_natural(a_main, b_main)
        .then_with(|| match (a_pre, b_pre) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => compare_natural(x, y),
        })
        .then_with(|| a.cmp(b))
}

fn split_prerelease(tag: &str) -> (&str, Option<&str>) {
    let tag = tag.strip_prefix('v').unwrap_or(tag);
    match tag.split_once('-') {
        Some((main, pre)) => (main, Some(pre)),
        None => (tag, None),
    }
}

/// Compares strings chunk by chunk, numeric runs as numbers.
fn compare_natural(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.is_empty(), b.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            _ => {}
        }
        let (a_chunk, a_rest) = next_chunk(a);
        let (b_chunk, b_rest) = next_chunk(b);
        let a_num = a_chunk.bytes().all(|c| c.is_ascii_digit());
        let b_num = b_chunk.bytes().all(|c| c.is_ascii_digit());
        let ord = match (a_num, b_num) {
            (true, true) => {
                let a_trim = a_chunk.trim_start_matches('0');
                let b_trim = b_chunk.trim_start_matches('0');
                a_trim
                    .len()
                    .cmp(&b_trim.len())
                    .then_with(|| a_trim.cmp(b_trim))
            }
            // A number outranks a word at the same place: 1.0.1 > 1.0.beta.
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => a_chunk.cmp(b_chunk),
        };
        if ord != Ordering::Equal {
            return ord;
        }
        a = a_rest;
        b = b_rest;
    }
}

fn next_chunk(s: &str) -> (&str, &str) {
    let first_digit = s.as_bytes()[0].is_ascii_digit();
    let end = s
        .bytes()
        .position(|c| c.is_ascii_digit() != first_digit)
        .unwrap_or(s.len());
    s.split_at(end)
}

/// Resolves a spec against a registry, and checks each digest's signature
/// when the spec has a policy: under `enforce`, a digest without a valid
/// signature fails the whole resolution (so the last good digests stay, and
/// nothing new ships); under `warn` it is logged and kept.
pub async fn resolve(
    client: &RegistryClient,
    spec: &ResolveSpec,
) -> Result<Vec<Resolved>, Failure> {
    let mut resolved = resolve_tags(client, spec).await?;
    if let Some(policy) = &spec.verify {
        // Each digest once, in order; its outcome goes on every tag of it.
        let mut checked: Vec<(String, String)> = Vec::new();
        for r in &mut resolved {
            if let Some((_, outcome)) = checked.iter().find(|(d, _)| *d == r.digest) {
                r.verification = Some(outcome.clone());
                continue;
            }
            let outcome = match verify_digest(client, &spec.repository, &r.digest, policy).await {
                Ok(key) => format!("verified (key {key})"),
                Err(message) => match policy.mode() {
                    VerifyMode::Enforce => {
                        return Err(Failure {
                            reason: FailureReason::VerificationFailed,
                            message,
                            retry_after: None,
                        });
                    }
                    VerifyMode::Warn => {
                        tracing::warn!(
                            repository = %spec.repository,
                            digest = %r.digest,
                            reason = %message,
                            "Signature verification failed; shipping anyway (verify.mode: warn)"
                        );
                        // The status says it, not only the log: a warn
                        // policy is how operators find what enforce would stop.
                        let why = message
                            .strip_prefix(&format!("{}: ", r.digest))
                            .unwrap_or(&message);
                        format!("unverified, shipped under mode warn: {why}")
                    }
                },
            };
            r.verification = Some(outcome.clone());
            checked.push((r.digest.clone(), outcome));
        }
    }
    if let Some(gate) = &spec.scan {
        let mut scanned: Vec<(String, Option<String>)> = Vec::new();
        for r in &mut resolved {
            if let Some(s) = spec.shipped.iter().find(|s| s.digest == r.digest) {
                r.scan = s.scan.clone();
                continue;
            }
            if let Some((_, summary)) = scanned.iter().find(|(d, _)| *d == r.digest) {
                r.scan = summary.clone();
                continue;
            }
            let summary = scan_digest(client, spec, gate, r).await?;
            r.scan = Some(summary.clone());
            scanned.push((r.digest.clone(), Some(summary)));
        }
    }
    Ok(resolved)
}

/// Scans one new digest: a finding at or above the threshold, or a scanner
/// that cannot answer, holds it back.
async fn scan_digest(
    client: &RegistryClient,
    spec: &ResolveSpec,
    gate: &ScanGate,
    r: &Resolved,
) -> Result<String, Failure> {
    let unavailable = |e: ScanError| Failure {
        reason: FailureReason::ScannerUnavailable,
        message: format!("{}: held back until it is scanned: {e}", r.digest),
        retry_after: None,
    };
    let scanner = ScannerClient::new(&gate.adapter).map_err(unavailable)?;
    let target = ScanTarget {
        registry_url: client.base_url().to_string(),
        // The adapter pulls anonymously; registries that need credentials
        // are not scanned yet (the adapter would answer an error, which
        // holds the digest back).
        authorization: String::new(),
        repository: spec.repository.clone(),
        digest: r.digest.clone(),
        mime_type: r.media_type.clone(),
    };
    let id = scanner.request(&target).await.map_err(unavailable)?;
    let summary = scanner.report(&id, SCAN_WAIT).await.map_err(unavailable)?;
    match gate.block {
        Some(threshold) if summary.blocks(threshold) => Err(Failure {
            reason: FailureReason::ScanBlocked,
            message: format!(
                "{}: scan found {} (blockSeverity {threshold:?})",
                r.digest,
                summary.describe()
            ),
            retry_after: None,
        }),
        _ => {
            tracing::info!(
                repository = %spec.repository,
                digest = %r.digest,
                findings = %summary.describe(),
                "Scan passed"
            );
            Ok(summary.describe())
        }
    }
}

/// Checks one digest against a policy: the reason it fails, naming the key,
/// or Ok. A registry that cannot be asked is a failure too, since nothing
/// unverified ships under `enforce`.
async fn verify_digest(
    client: &RegistryClient,
    repository: &str,
    digest: &str,
    policy: &Verify,
) -> Result<String, String> {
    let mut verifiers = Vec::with_capacity(policy.keys.len());
    for k in &policy.keys {
        verifiers.push(
            cosign::Verifier::from_pem(&k.name, &k.public_key)
                .map_err(|e| format!("{digest}: key {}: {e}", k.name))?,
        );
    }
    let layers = cosign::fetch(client, repository, digest)
        .await
        .map_err(|e| format!("{digest}: cannot read its signatures: {e}"))?;
    cosign::verify(&verifiers, digest, &layers)
        .map(|accepted| accepted.key)
        .map_err(|e| format!("{digest}: {e}"))
}

/// Resolves a spec's tags (or pinned digest) against a registry.
async fn resolve_tags(
    client: &RegistryClient,
    spec: &ResolveSpec,
) -> Result<Vec<Resolved>, Failure> {
    let tags = match &spec.tags {
        TagChoice::Fixed(tags) => tags.clone(),
        TagChoice::Pattern {
            pattern,
            keep_latest,
        } => {
            let re = regex::Regex::new(pattern).map_err(|e| Failure {
                reason: FailureReason::NotFound,
                message: format!("tagPattern.pattern {pattern:?}: {e}"),
                retry_after: None,
            })?;
            let all = client
                .list_tags(&spec.repository)
                .await
                .map_err(|e| Failure::from(&e))?;
            let chosen = select_tags(&all, &re, *keep_latest);
            if chosen.is_empty() {
                return Err(Failure {
                    reason: FailureReason::NotFound,
                    message: format!(
                        "no tag of {} matches {pattern:?} ({} tags listed)",
                        spec.repository,
                        all.len()
                    ),
                    retry_after: None,
                });
            }
            chosen
        }
    };
    let mut out = Vec::with_capacity(tags.len().max(1));
    if let Some(digest) = &spec.digest {
        if sha256_hex(digest).is_none() {
            return Err(Failure {
                reason: FailureReason::NotFound,
                message: format!("digest {digest:?}: expected sha256:<64 hex>"),
                retry_after: None,
            });
        }
        let manifest = client
            .get_manifest(&spec.repository, digest)
            .await
            .map_err(|e| Failure::from(&e))?;
        check_platforms(spec, &manifest.media_type, &manifest.bytes)?;
        let names = if tags.is_empty() {
            vec![String::new()]
        } else {
            tags
        };
        for tag in names {
            out.push(Resolved {
                tag,
                digest: manifest.digest.clone(),
                media_type: manifest.media_type.clone(),
                scan: None,
                verification: None,
            });
        }
        return Ok(out);
    }
    for tag in tags {
        let manifest = client
            .get_manifest(&spec.repository, &tag)
            .await
            .map_err(|e| Failure::from(&e))?;
        check_platforms(spec, &manifest.media_type, &manifest.bytes)?;
        out.push(Resolved {
            tag,
            digest: manifest.digest,
            media_type: manifest.media_type,
            scan: None,
            verification: None,
        });
    }
    Ok(out)
}

/// An index must offer every requested platform; a single-platform manifest
/// is accepted as it is (its platform lives in its config, which the agent
/// checks when it fetches it).
fn check_platforms(spec: &ResolveSpec, media_type: &str, bytes: &[u8]) -> Result<(), Failure> {
    if spec.platforms.is_empty() || !(media_type == OCI_INDEX || media_type == DOCKER_LIST) {
        return Ok(());
    }
    let offered = index_platforms(bytes).map_err(|message| Failure {
        reason: FailureReason::NotFound,
        message: format!("index of {}: {message}", spec.repository),
        retry_after: None,
    })?;
    let missing: Vec<&String> = spec
        .platforms
        .iter()
        .filter(|p| !offered.iter().any(|o| platform_matches(p, o)))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Failure {
            reason: FailureReason::NotFound,
            message: format!(
                "{}: platform(s) {} not in the index (it offers {})",
                spec.repository,
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                offered.join(", ")
            ),
            retry_after: None,
        })
    }
}

/// Why an index's platforms could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("no manifests array")]
    NoManifests,
}

/// `os/arch[/variant]` of every manifest in an index.
pub fn index_platforms(bytes: &[u8]) -> Result<Vec<String>, IndexError> {
    let doc: serde_json::Value = serde_json::from_slice(bytes).map_err(IndexError::NotJson)?;
    let manifests = doc
        .get("manifests")
        .and_then(|m| m.as_array())
        .ok_or(IndexError::NoManifests)?;
    Ok(manifests
        .iter()
        .filter_map(|m| {
            let p = m.get("platform")?;
            let os = p.get("os")?.as_str()?;
            let arch = p.get("architecture")?.as_str()?;
            Some(match p.get("variant").and_then(|v| v.as_str()) {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            })
        })
        .collect())
}

/// `linux/arm64` matches `linux/arm64/v8`; a requested variant must match exactly.
pub fn platform_matches(wanted: &str, offered: &str) -> bool {
    wanted == offered
        || (wanted.matches('/').count() == 1 && offered.starts_with(&format!("{wanted}/")))
}

/// Health of a registry as shown on its RegistrySecret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub phase: HealthPhase,
    pub latency: Duration,
    pub message: String,
    pub checked_at: SystemTime,
}

/// Connected, AuthFailed or Unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthPhase {
    Connected,
    AuthFailed,
    Unreachable,
}

/// Checks that the registry answers `GET /v2/` and accepts the credentials.
pub async fn check_health(client: &RegistryClient) -> Health {
    let started = std::time::Instant::now();
    let result = client.ping().await;
    let latency = started.elapsed();
    let (phase, message) = match result {
        Ok(()) => (HealthPhase::Connected, String::new()),
        Err(e) => match FailureReason::of(&e) {
            FailureReason::AuthFailed => (HealthPhase::AuthFailed, e.to_string()),
            // A registry that answers 404 or 429 on /v2/ is up; say so and what it said.
            FailureReason::NotFound | FailureReason::RateLimited => {
                (HealthPhase::Connected, e.to_string())
            }
            // A registry error is never a verification failure; listed for
            // the match only.
            FailureReason::Unreachable
            | FailureReason::VerificationFailed
            | FailureReason::ScanBlocked
            | FailureReason::ScannerUnavailable => (HealthPhase::Unreachable, e.to_string()),
        },
    };
    Health {
        phase,
        latency,
        message,
        checked_at: SystemTime::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn check_select(all: &[&str], pattern: &str, keep: usize, want: &[&str]) {
        let re = regex::Regex::new(pattern).expect("test pattern compiles");
        assert_eq!(
            select_tags(&tags(all), &re, keep),
            tags(want),
            "select_tags({all:?}, {pattern:?}, {keep})"
        );
    }

    #[test]
    fn selects_newest_matching_tags_by_version() {
        check_select(
            &["v1.9.0", "v1.10.0", "v1.2.3", "latest"],
            r"v1\.\d+\.\d+",
            2,
            &["v1.10.0", "v1.9.0"],
        );
        check_select(
            &["1.0.0-rc1", "1.0.0", "0.9.9"],
            r"[0-9.]+(-rc\d+)?",
            3,
            &["1.0.0", "1.0.0-rc1", "0.9.9"],
        );
        // The pattern must match the whole tag, not a part of it.
        check_select(&["v1.0.0-debug", "v1.0.0"], r"v1\.0\.0", 5, &["v1.0.0"]);
        check_select(&["a", "b"], r"c", 3, &[]);
        check_select(&["2", "10", "1"], r"\d+", 10, &["10", "2", "1"]);
        check_select(&["v2", "v10"], r"v\d+", 1, &["v10"]);
    }

    #[test]
    fn versions_compare_naturally() {
        use Ordering::*;
        let cases = [
            ("1.10", "1.9", Greater),
            ("v1.0.0", "1.0.0", Greater), // equal as versions; string order breaks the tie
            ("1.0.0-rc2", "1.0.0-rc10", Less),
            ("1.0.0-rc1", "1.0.0", Less),
            ("1.0.1", "1.0.0", Greater),
            ("007", "7", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    fn resolved(digest: &str) -> Vec<Resolved> {
        vec![Resolved {
            tag: "v1".into(),
            digest: digest.into(),
            media_type: OCI_INDEX.into(),
            scan: None,
            verification: None,
        }]
    }

    #[test]
    fn failure_keeps_last_good_digest_and_marks_it_stale() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let good = next_status(&ResolveStatus::default(), &Ok(resolved("sha256:a")), t0);
        assert!(!good.stale);
        assert_eq!(good.last_resolve_time, Some(t0));

        let t1 = t0 + Duration::from_secs(60);
        let limited = Failure {
            reason: FailureReason::RateLimited,
            message: "rate limited".into(),
            retry_after: Some(Duration::from_secs(120)),
        };
        let bad = next_status(&good, &Err(limited), t1);
        assert_eq!(bad.resolved, good.resolved);
        assert!(bad.stale);
        assert_eq!(bad.reason, Some(FailureReason::RateLimited));
        assert_eq!(bad.last_resolve_time, Some(t0));
        assert_eq!(bad.retry_after, Some(t1 + Duration::from_secs(120)));
        // Nothing is attempted before Retry-After, even if the interval is shorter.
        assert_eq!(
            next_attempt(&bad, Duration::from_secs(10), t1),
            t1 + Duration::from_secs(120)
        );

        let t2 = t1 + Duration::from_secs(200);
        let again = next_status(&bad, &Ok(resolved("sha256:b")), t2);
        assert!(!again.stale);
        assert_eq!(again.reason, None);
        assert_eq!(again.retry_after, None);
        assert_eq!(
            next_attempt(&again, Duration::from_secs(3600), t2),
            t2 + Duration::from_secs(3600)
        );
    }

    #[test]
    fn failure_without_a_previous_result_is_not_stale() {
        let now = SystemTime::UNIX_EPOCH;
        let failure = Failure {
            reason: FailureReason::AuthFailed,
            message: "denied".into(),
            retry_after: None,
        };
        let status = next_status(&ResolveStatus::default(), &Err(failure), now);
        assert!(!status.stale);
        assert!(status.resolved.is_empty());
        assert_eq!(status.reason, Some(FailureReason::AuthFailed));
    }

    #[test]
    fn classifies_registry_errors() {
        let r = || "r".to_string();
        let cases = [
            (
                RegistryError::AuthFailed {
                    registry: r(),
                    message: "x".into(),
                },
                FailureReason::AuthFailed,
            ),
            (
                RegistryError::NotFound {
                    registry: r(),
                    what: "m".into(),
                },
                FailureReason::NotFound,
            ),
            (
                RegistryError::RateLimited {
                    registry: r(),
                    retry_after: None,
                },
                FailureReason::RateLimited,
            ),
            (
                RegistryError::Unreachable {
                    registry: r(),
                    message: "x".into(),
                },
                FailureReason::Unreachable,
            ),
            (
                RegistryError::Http {
                    registry: r(),
                    status: 503,
                    what: "m".into(),
                },
                FailureReason::Unreachable,
            ),
            (
                RegistryError::Http {
                    registry: r(),
                    status: 403,
                    what: "m".into(),
                },
                FailureReason::AuthFailed,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(FailureReason::of(&error), want, "{error}");
        }
    }

    #[test]
    fn platforms_in_an_index() {
        let index = br#"{"manifests":[
            {"platform":{"os":"linux","architecture":"amd64"}},
            {"platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#;
        let offered = index_platforms(index).expect("valid index");
        assert_eq!(offered, vec!["linux/amd64", "linux/arm64/v8"]);
        assert!(platform_matches("linux/arm64", "linux/arm64/v8"));
        assert!(!platform_matches("linux/arm64/v7", "linux/arm64/v8"));
        assert!(!platform_matches("linux/arm", "linux/arm64"));
        let spec = ResolveSpec {
            repository: "demo/app".into(),
            tags: TagChoice::Fixed(vec!["v1".into()]),
            digest: None,
            platforms: vec!["linux/s390x".into()],
            verify: None,
            scan: None,
            shipped: Vec::new(),
        };
        let err = check_platforms(&spec, OCI_INDEX, index).expect_err("s390x is not offered");
        assert_eq!(err.reason, FailureReason::NotFound);
        assert!(err.message.contains("linux/s390x"), "{}", err.message);
    }
}
