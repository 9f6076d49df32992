//! The hub task that keeps tag resolution and registry health current: while
//! this replica leads (see [`crate::leader`]) it watches Repositories and
//! RegistrySecrets, resolves each Repository when it is new, when its spec or
//! its RegistrySecret changed, and then on its `syncInterval` (honouring
//! Retry-After and retrying failures sooner), and checks every registry's
//! health on a short period.
//!
//! What is due is decided by pure functions ([`repository_due`],
//! [`health_due`]) over plain data; the loop only feeds them and acts. Status
//! is written read-modify-write, touching only the resolver's fields, because
//! the session code writes the per-cluster fields of the same objects.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use imgfleet::model::{
    BlockSeverity, ConnectionPhase, DEFAULT_NAMESPACE, Kind, Object, RegistrySecret,
    RegistrySecretStatus, Repository, RepositoryStatus, ResolveReason, ResolvedTag,
};
use imgfleet_common::registry::{Credentials, RegistryClient, RegistryConfig, RegistryError};
use imgfleet_common::scanner::Severity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::audit::SpecEditors;
use crate::config::Config;
use crate::leader::Election;
use crate::metrics::HubMetrics;
use crate::objects::{ObjectError, Objects};
use crate::resolver::{
    self, Failure, FailureReason, HealthPhase, ResolveSpec, ResolveStatus, Resolved, ScanGate,
    TagChoice,
};
use crate::retry::Retry;
use crate::store::Key;
use crate::store::watcher::{Event, Watcher, recover};

/// How many registry calls run at once, so one dead registry does not stall the rest.
pub const MAX_CONCURRENT: usize = 8;
/// How often every registry's health is checked.
pub const HEALTH_PERIOD: Duration = Duration::from_secs(30);
/// How soon a failed resolution is first retried; each further failure in a
/// row doubles it, up to the Repository's sync interval (see [`failure_backoff`]).
pub const FAILURE_RETRY: Duration = Duration::from_secs(30);
/// How often a summary of failing Repositories is logged; the failures
/// themselves are logged when they start or change.
const FAILURE_SUMMARY: Duration = Duration::from_secs(60);
/// Longest a whole resolution of one Repository may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often due work is looked for between watch events.
const TICK: Duration = Duration::from_millis(250);

/// The resolver's election for a hub with `config`: the replica's identity
/// in it is its listen address and pid.
pub fn election(config: &Config) -> Election {
    let identity = format!("{}/pid-{}", config.listen, std::process::id());
    Election::for_store(&config.store, "resolver", identity)
}

/// Campaigns in `election` and does the work while this replica leads,
/// until `shutdown`.
pub async fn serve(
    objects: Objects,
    metrics: HubMetrics,
    election: Election,
    shutdown: CancellationToken,
) {
    let (tx, rx) = watch::channel(false);
    tokio::join!(
        election.run(tx, shutdown.clone()),
        run(objects, metrics, rx, shutdown.clone())
    );
}

/// Identifies the version of a RegistrySecret a resolution used: its uid and
/// spec generation (a status write changes neither).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVersion {
    pub uid: String,
    pub generation: i64,
}

/// What this leader remembers about its last attempt at one Repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub at: SystemTime,
    /// The spec generation resolved.
    pub generation: i64,
    /// The RegistrySecret used, `None` when it was missing.
    pub secret: Option<SecretVersion>,
    /// When the next attempt is due by the attempt's own outcome.
    pub next: SystemTime,
    /// Failed attempts in a row; 0 after a success.
    pub failures: u32,
}

/// What [`repository_due`] looks at.
#[derive(Debug, Clone)]
pub struct RepoView {
    pub generation: i64,
    pub observed_generation: i64,
    pub suspended: bool,
    pub interval: Duration,
    pub status: ResolveStatus,
    /// The RegistrySecret as it is now, `None` when missing.
    pub secret: Option<SecretVersion>,
    pub in_flight: bool,
}

/// When a Repository should be resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Suspended or already being resolved.
    Skip,
    Now,
    At(SystemTime),
}

/// Decides when a Repository is next resolved. New or changed specs and a
/// changed RegistrySecret are due at once; otherwise the last attempt's own
/// schedule applies, or, for a result written by another leader, the stored
/// status (a failure without a remembered attempt is retried at once).
pub fn repository_due(view: &RepoView, last: Option<&Attempt>, now: SystemTime) -> Due {
    if view.suspended || view.in_flight {
        return Due::Skip;
    }
    let at = match last {
        Some(a) if a.generation == view.generation => {
            if a.secret != view.secret {
                return Due::Now;
            }
            a.next
        }
        _ => {
            if view.observed_generation != view.generation {
                return Due::Now;
            }
            if view.status.reason.is_some() && view.status.retry_after.is_none() {
                return Due::Now;
            }
            resolver::next_attempt(&view.status, view.interval, now)
        }
    };
    if at <= now { Due::Now } else { Due::At(at) }
}

/// The wait after `failures` failed attempts in a row: [`FAILURE_RETRY`],
/// doubled for each further failure, capped at `interval`, then spread by
/// `jitter` (in `[0, 1)`) over its upper half, so that Repositories failing
/// together (one registry down) do not retry together. A fleet of thousands
/// of Repositories behind a dead registry then costs the hub next to nothing.
pub fn failure_backoff(failures: u32, interval: Duration, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let full = FAILURE_RETRY
        .saturating_mul(1u32 << doublings)
        .min(interval);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// The next attempt after one that ended with `status` at `at`, the
/// `failures`-th failure in a row when it failed: after a failure,
/// [`failure_backoff`] unless Retry-After says later.
pub fn next_after(
    status: &ResolveStatus,
    interval: Duration,
    at: SystemTime,
    failures: u32,
    jitter: f64,
) -> SystemTime {
    match (status.reason, status.retry_after) {
        (_, Some(after)) => after.max(at),
        (Some(_), None) => at + failure_backoff(failures, interval, jitter),
        (None, None) => at + interval,
    }
}

/// A registry's health is checked when never checked by this leader, when
/// its spec changed since, or [`HEALTH_PERIOD`] after the last check.
pub fn health_due(
    last: Option<&(SystemTime, SecretVersion)>,
    current: &SecretVersion,
    now: SystemTime,
    period: Duration,
) -> bool {
    match last {
        None => true,
        Some((at, version)) => version != current || *at + period <= now,
    }
}

/// The resolver's part of a stored status.
pub fn resolve_status_of(status: Option<&RepositoryStatus>) -> ResolveStatus {
    let Some(s) = status else {
        return ResolveStatus::default();
    };
    ResolveStatus {
        resolved: s
            .resolved
            .iter()
            .map(|r| Resolved {
                tag: r.tag.clone(),
                digest: r.digest.clone(),
                media_type: r.media_type.clone(),
                scan: r.scan.clone(),
                verification: r.verification.clone(),
            })
            .collect(),
        last_resolve_time: s.last_resolve_time.as_ref().map(to_system),
        reason: s.reason.map(|r| match r {
            ResolveReason::AuthFailed => FailureReason::AuthFailed,
            ResolveReason::NotFound => FailureReason::NotFound,
            ResolveReason::Unreachable => FailureReason::Unreachable,
            ResolveReason::RateLimited => FailureReason::RateLimited,
            ResolveReason::VerificationFailed => FailureReason::VerificationFailed,
            ResolveReason::ScanBlocked => FailureReason::ScanBlocked,
            ResolveReason::ScannerUnavailable => FailureReason::ScannerUnavailable,
        }),
        message: s.message.clone().unwrap_or_default(),
        stale: s.stale,
        retry_after: s.retry_after.as_ref().map(to_system),
    }
}

/// Writes the resolver's fields into `status`, leaving the others (the
/// per-cluster fields) as they are.
pub fn apply_resolve_status(status: &mut RepositoryStatus, r: &ResolveStatus, generation: i64) {
    status.resolved = r
        .resolved
        .iter()
        .map(|x| ResolvedTag {
            tag: x.tag.clone(),
            digest: x.digest.clone(),
            media_type: x.media_type.clone(),
            scan: x.scan.clone(),
            verification: x.verification.clone(),
        })
        .collect();
    status.last_resolve_time = r.last_resolve_time.and_then(to_time);
    status.reason = r.reason.map(|f| match f {
        FailureReason::AuthFailed => ResolveReason::AuthFailed,
        FailureReason::NotFound => ResolveReason::NotFound,
        FailureReason::Unreachable => ResolveReason::Unreachable,
        FailureReason::RateLimited => ResolveReason::RateLimited,
        FailureReason::VerificationFailed => ResolveReason::VerificationFailed,
        FailureReason::ScanBlocked => ResolveReason::ScanBlocked,
        FailureReason::ScannerUnavailable => ResolveReason::ScannerUnavailable,
    });
    status.message = Some(r.message.clone()).filter(|m| !m.is_empty());
    status.stale = r.stale;
    status.retry_after = r.retry_after.and_then(to_time);
    status.observed_generation = generation;
}

/// What a Repository's spec asks the resolver for.
pub fn resolve_spec(repo: &Repository) -> ResolveSpec {
    let s = &repo.spec;
    let tags = match &s.tag_pattern {
        Some(tp) => TagChoice::Pattern {
            pattern: tp.pattern.clone(),
            keep_latest: tp.keep_latest.unwrap_or(1).max(1) as usize,
        },
        None => {
            let mut tags: Vec<String> = s.tag.iter().cloned().collect();
            for t in &s.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
            TagChoice::Fixed(tags)
        }
    };
    ResolveSpec {
        repository: s.repository.clone(),
        tags,
        digest: s.digest.clone().filter(|d| !d.is_empty()),
        platforms: s.platforms.clone(),
        verify: s.verify.clone(),
        scan: s.scan.as_ref().map(|c| ScanGate {
            adapter: c.adapter.clone(),
            block: match c.block_severity() {
                BlockSeverity::Critical => Some(Severity::Critical),
                BlockSeverity::High => Some(Severity::High),
                BlockSeverity::Medium => Some(Severity::Medium),
                BlockSeverity::Low => Some(Severity::Low),
                BlockSeverity::None => None,
            },
        }),
        shipped: {
            // What ships, and every digest a revision records: each passed
            // the gate when it was resolved (a pinned Repository keeps its
            // upstream's digest out of `resolved`, not out of the history).
            let mut shipped = resolve_status_of(repo.status.as_ref()).resolved;
            let revisions = repo.status.iter().flat_map(|st| &st.revisions);
            shipped.extend(revisions.flat_map(|rev| &rev.resolved).map(|t| Resolved {
                tag: t.tag.clone(),
                digest: t.digest.clone(),
                media_type: t.media_type.clone(),
                scan: t.scan.clone(),
                verification: t.verification.clone(),
            }));
            shipped
        },
    }
}

fn to_system(t: &Time) -> SystemTime {
    SystemTime::from(t.0)
}

fn to_time(t: SystemTime) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(t).ok().map(Time)
}

fn repo_namespace(o: &Object) -> String {
    o.namespace().unwrap_or(DEFAULT_NAMESPACE).to_string()
}

/// `(namespace, name)` of the RegistrySecret a Repository uses.
fn secret_ref(repo: &Repository) -> (String, String) {
    let (ns, name) = repo.registry_secret();
    (ns.to_owned(), name.to_owned())
}

fn version_of(rs: &RegistrySecret) -> SecretVersion {
    SecretVersion {
        uid: rs.metadata.uid.clone().unwrap_or_default(),
        generation: rs.metadata.generation.unwrap_or(0),
    }
}

type Id = (String, String);

/// The objects the leader works on, kept current by watches.
#[derive(Default)]
struct Cache {
    repos: HashMap<Id, Repository>,
    secrets: HashMap<Id, RegistrySecret>,
}

/// What a watch event changed, for the scheduler.
enum Changed {
    /// A kind was listed again: every Repository's due time is worked out
    /// again.
    All,
    Repository(Id),
    /// A RegistrySecret whose spec or identity changed (a new one, an edit, a
    /// deletion); a status write (its health) is not a change here.
    Secret(Id),
    Nothing,
}

impl Cache {
    fn put(&mut self, obj: Object) -> Changed {
        let id = (repo_namespace(&obj), obj.name().to_string());
        match obj {
            Object::Repository(r) => {
                self.repos.insert(id.clone(), r);
                Changed::Repository(id)
            }
            Object::RegistrySecret(s) => {
                let version = version_of(&s);
                let before = self.secrets.insert(id.clone(), s);
                if before.is_some_and(|b| version_of(&b) == version) {
                    Changed::Nothing
                } else {
                    Changed::Secret(id)
                }
            }
            Object::Cluster(_) | Object::RoleBinding(_) | Object::ClusterRoleBinding(_) => {
                Changed::Nothing
            }
        }
    }

    /// A kind as listed: it replaces what the cache held of it.
    fn relisted(&mut self, kind: Kind, objects: Vec<Object>) {
        match kind {
            Kind::Repository => self.repos.clear(),
            _ => self.secrets.clear(),
        }
        for o in objects {
            self.put(o);
        }
    }

    fn remove(&mut self, kind: Kind, key: &Key) -> Changed {
        let id = (key.namespace.clone(), key.name.clone());
        if kind == Kind::Repository {
            self.repos.remove(&id);
            Changed::Repository(id)
        } else {
            self.secrets.remove(&id);
            Changed::Secret(id)
        }
    }

    /// The Repositories that use RegistrySecret `secret`.
    fn users_of<'a>(&'a self, secret: &'a Id) -> impl Iterator<Item = &'a Id> + 'a {
        self.repos
            .iter()
            .filter(move |(_, r)| {
                let (ns, name) = r.registry_secret();
                ns == secret.0 && name == secret.1
            })
            .map(|(id, _)| id)
    }
}

/// When each Repository is next due, in time order, so that a tick looks only
/// at what is due and an event at only what it changed: with thousands of
/// Repositories, going over all of them on every tick and every event was
/// most of an idle hub's CPU.
#[derive(Default)]
struct DueQueue {
    at: HashMap<Id, SystemTime>,
    order: BTreeSet<(SystemTime, Id)>,
    /// Repositories whose due time must be worked out again: new or changed,
    /// an attempt finished, or their RegistrySecret changed.
    dirty: HashSet<Id>,
}

impl DueQueue {
    fn set(&mut self, id: &Id, when: Option<SystemTime>) {
        if let Some(old) = self.at.remove(id) {
            self.order.remove(&(old, id.clone()));
        }
        if let Some(t) = when {
            self.at.insert(id.clone(), t);
            self.order.insert((t, id.clone()));
        }
    }

    /// The earliest Repository due at `now`, taken off the queue.
    fn pop_due(&mut self, now: SystemTime) -> Option<Id> {
        let first = self.order.first()?;
        if first.0 > now {
            return None;
        }
        let (_, id) = self.order.pop_first()?;
        self.at.remove(&id);
        Some(id)
    }
}

enum Done {
    Resolved {
        id: Id,
        attempt: Attempt,
        /// `"success"` or the failure reason, for the metrics.
        result: &'static str,
    },
    Checked {
        id: Id,
        version: SecretVersion,
        at: SystemTime,
        /// The registry checked and the outcome, for the metrics.
        registry: String,
        phase: ConnectionPhase,
    },
}

impl Done {
    /// Counts the outcome; remembers which registry each RegistrySecret's
    /// health series is about, so a deleted one's series can go.
    fn count(&self, metrics: &HubMetrics, reported: &mut HashMap<Id, String>) {
        match self {
            Done::Resolved { result, .. } => metrics.resolved(result),
            Done::Checked {
                id,
                registry,
                phase,
                ..
            } => {
                if let Some(old) = reported.insert(id.clone(), registry.clone())
                    && old != *registry
                {
                    metrics.registry_forgotten(&id.0, &id.1, &old);
                }
                metrics.registry_checked(&id.0, &id.1, registry, phase_label(*phase));
            }
        }
    }
}

/// A connection phase as the metrics' labels write it.
fn phase_label(phase: ConnectionPhase) -> &'static str {
    match phase {
        ConnectionPhase::Connected => "Connected",
        ConnectionPhase::AuthFailed => "AuthFailed",
        ConnectionPhase::Unreachable => "Unreachable",
        ConnectionPhase::CredentialUnusable => "CredentialUnusable",
    }
}

/// Runs while the hub runs: does the work whenever `leader` says this
/// replica leads, and stops doing it as soon as it does not.
pub async fn run(
    objects: Objects,
    metrics: HubMetrics,
    mut leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            r = leader.wait_for(|l| *l) => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        info!("Tag resolver and registry health checks running on this replica");
        let lost = async {
            let _ = leader.wait_for(|l| !*l).await;
        };
        tokio::select! {
            _ = lead(&objects, &metrics) => {}
            _ = lost => info!("Tag resolver paused: this replica no longer leads"),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The leader's work; returns never (it is dropped, with its in-flight
/// requests, when leadership ends). Follows Repositories and
/// RegistrySecrets through two watchers; nothing is scheduled before both
/// were listed, since a Repository whose RegistrySecret is not read yet
/// would fail as if the secret were missing.
async fn lead(objects: &Objects, metrics: &HubMetrics) {
    let store = objects.store().clone();
    let mut secret_events = Watcher::new(store.clone(), Kind::RegistrySecret.plural());
    let mut repo_events = Watcher::new(store, Kind::Repository.plural());
    let mut retry = Retry::new("Watching Repositories and RegistrySecrets for the tag resolver");
    // The leader's work ends by being dropped, never by a token.
    let never = CancellationToken::new();
    let mut leader = Leader::default();
    let mut listed = (false, false);
    let mut work: JoinSet<Done> = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut summary = tokio::time::interval(FAILURE_SUMMARY);
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_logged = 0usize;
    // The registry of each RegistrySecret whose health this leader exported.
    let mut reported: HashMap<Id, String> = HashMap::new();
    loop {
        if listed == (true, true) {
            leader.schedule(objects, &mut work);
        }
        let event = tokio::select! {
            ev = secret_events.next() => Some((Kind::RegistrySecret, ev)),
            ev = repo_events.next() => Some((Kind::Repository, ev)),
            Some(done) = work.join_next(), if !work.is_empty() => {
                match done {
                    Ok(done) => {
                        done.count(metrics, &mut reported);
                        leader.finished(done);
                    }
                    Err(e) => {
                        // Which task failed is unknown: start the work
                        // over, as after a new list.
                        warn!(error = %e, "A resolver task failed; starting the work over");
                        work.abort_all();
                        while work.join_next().await.is_some() {}
                        leader.in_flight.clear();
                        leader.changed(Changed::All);
                    }
                }
                None
            }
            _ = tick.tick() => None,
            _ = summary.tick() => {
                let failing = leader.attempts.values().filter(|a| a.failures > 0).count();
                if failing > 0 || failing_logged > 0 {
                    info!(failing, "Repositories whose tag resolution keeps failing (each retried with back-off, up to its syncInterval)");
                }
                failing_logged = failing;
                None
            }
        };
        match event {
            None => {}
            Some((kind, Ok(ev))) => {
                retry.succeeded();
                if matches!(ev, Event::Listed { .. }) {
                    match kind {
                        Kind::Repository => listed.1 = true,
                        _ => listed.0 = true,
                    }
                }
                let changed = leader.cache.apply(objects, kind, ev);
                if matches!(changed, Changed::All | Changed::Secret(_)) {
                    reported.retain(|id, registry| {
                        let kept = leader.cache.secrets.contains_key(id);
                        if !kept {
                            metrics.registry_forgotten(&id.0, &id.1, registry);
                        }
                        kept
                    });
                }
                leader.changed(changed);
            }
            Some((kind, Err(e))) => {
                // While it waits, nothing else is scheduled: without the
                // store, there is nothing to record results in either.
                let watcher = match kind {
                    Kind::Repository => &mut repo_events,
                    _ => &mut secret_events,
                };
                recover(watcher, e, &mut retry, &never).await;
            }
        }
    }
}

/// What the leader knows and has going.
#[derive(Default)]
struct Leader {
    /// Who changed each Repository's spec, for the revisions it makes.
    editors: SpecEditors,
    /// The Repositories and RegistrySecrets as watched.
    cache: Cache,
    /// This leader's last attempt at each Repository.
    attempts: HashMap<Id, Attempt>,
    /// This leader's last health check of each RegistrySecret.
    checks: HashMap<Id, (SystemTime, SecretVersion)>,
    /// When each Repository is due next.
    queue: DueQueue,
    /// Resolutions and health checks under way.
    in_flight: HashSet<(Kind, Id)>,
}

impl Leader {
    fn finished(&mut self, done: Done) {
        match done {
            Done::Resolved { id, attempt, .. } => {
                self.in_flight.remove(&(Kind::Repository, id.clone()));
                self.attempts.insert(id.clone(), attempt);
                self.changed(Changed::Repository(id));
            }
            Done::Checked {
                id, version, at, ..
            } => {
                self.in_flight.remove(&(Kind::RegistrySecret, id.clone()));
                self.checks.insert(id, (at, version));
            }
        }
    }

    fn changed(&mut self, changed: Changed) {
        match changed {
            Changed::All => {
                // Forget what was deleted while no watch ran, so a
                // re-created object starts afresh.
                let cache = &self.cache;
                self.attempts.retain(|id, _| cache.repos.contains_key(id));
                self.checks.retain(|id, _| cache.secrets.contains_key(id));
                self.queue.dirty.extend(cache.repos.keys().cloned());
            }
            Changed::Repository(id) => {
                if !self.cache.repos.contains_key(&id) {
                    self.attempts.remove(&id);
                }
                self.queue.dirty.insert(id);
            }
            Changed::Secret(id) => {
                if !self.cache.secrets.contains_key(&id) {
                    self.checks.remove(&id);
                }
                let users: Vec<Id> = self.cache.users_of(&id).cloned().collect();
                self.queue.dirty.extend(users);
            }
            Changed::Nothing => {}
        }
    }

    fn schedule(&mut self, objects: &Objects, work: &mut JoinSet<Done>) {
        schedule(objects, self, work);
    }
}

impl Cache {
    /// Takes in one watcher event.
    fn apply(&mut self, objects: &Objects, kind: Kind, ev: Event) -> Changed {
        let decode = |v: &crate::store::Versioned| match objects.decode(v) {
            Ok(o) => Some(o),
            Err(e) => {
                warn!(error = %e, "Skipping an unreadable object");
                None
            }
        };
        match ev {
            Event::Listed { items, .. } => {
                self.relisted(kind, items.iter().filter_map(decode).collect());
                Changed::All
            }
            Event::Put(v) => match decode(&v) {
                Some(o) => self.put(o),
                None => Changed::Nothing,
            },
            Event::Delete(v) => self.remove(kind, &v.key),
        }
    }
}

/// Starts what is due, up to [`MAX_CONCURRENT`] at once: registry health
/// checks (a few secrets, looked at each time), then Repositories, earliest
/// due first, after working out again when the changed ones are due.
fn schedule(objects: &Objects, leader: &mut Leader, work: &mut JoinSet<Done>) {
    let Leader {
        editors,
        cache,
        attempts,
        checks,
        queue,
        in_flight,
    } = leader;
    let now = SystemTime::now();
    for (id, rs) in &cache.secrets {
        if in_flight.len() >= MAX_CONCURRENT {
            break;
        }
        let key = (Kind::RegistrySecret, id.clone());
        let version = version_of(rs);
        if in_flight.contains(&key) || !health_due(checks.get(id), &version, now, HEALTH_PERIOD) {
            continue;
        }
        in_flight.insert(key);
        let (objects, id, rs) = (objects.clone(), id.clone(), rs.clone());
        work.spawn(async move {
            let at = SystemTime::now();
            let phase = check_and_record(&objects, &id, &rs).await;
            Done::Checked {
                id,
                version,
                at,
                registry: rs.spec.domain.clone(),
                phase,
            }
        });
    }
    for id in std::mem::take(&mut queue.dirty) {
        let Some(repo) = cache.repos.get(&id) else {
            queue.set(&id, None);
            continue;
        };
        let view = RepoView {
            generation: repo.metadata.generation.unwrap_or(0),
            observed_generation: repo.status.as_ref().map_or(0, |s| s.observed_generation),
            suspended: repo.spec.suspend,
            interval: repo.spec.sync_interval_duration(),
            status: resolve_status_of(repo.status.as_ref()),
            secret: cache.secrets.get(&secret_ref(repo)).map(version_of),
            in_flight: in_flight.contains(&(Kind::Repository, id.clone())),
        };
        let when = match repository_due(&view, attempts.get(&id), now) {
            // In flight: worked out again when the attempt finishes.
            Due::Skip => None,
            Due::Now => Some(now),
            Due::At(t) => Some(t),
        };
        queue.set(&id, when);
    }
    while in_flight.len() < MAX_CONCURRENT {
        let Some(id) = queue.pop_due(now) else {
            break;
        };
        let Some(repo) = cache.repos.get(&id) else {
            continue;
        };
        in_flight.insert((Kind::Repository, id.clone()));
        let rs = cache.secrets.get(&secret_ref(repo)).cloned();
        let secret = rs.as_ref().map(version_of);
        let failures = attempts.get(&id).map_or(0, |a| a.failures);
        let (objects, editors, repo) = (objects.clone(), editors.clone(), repo.clone());
        work.spawn(async move {
            // Continues the trace of the Apply that changed the Repository,
            // if any; the desired-set entries it produces continue this span.
            let span =
                tracing::info_span!("resolve tags", repository = %format!("{}/{}", id.0, id.1));
            imgfleet_common::telemetry::join(&span, &objects.traces().take_applied(&id.0, &id.1));
            // Recorded before the status write that wakes the controller.
            let here = imgfleet_common::telemetry::traceparent(&span);
            objects.traces().resolved(&id.0, &id.1, here);
            let (attempt, result) = tracing::Instrument::instrument(
                resolve_and_record(
                    &objects,
                    &editors,
                    &id,
                    &repo,
                    rs.as_ref(),
                    secret,
                    failures,
                ),
                span,
            )
            .await;
            Done::Resolved {
                id,
                attempt,
                result,
            }
        });
    }
}

/// Why no registry client could be made for a RegistrySecret.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    /// The stored password does not open with this hub's keys.
    #[error(transparent)]
    Credential(ObjectError),
    /// The client could not be built (a bad domain, TLS setup).
    #[error(transparent)]
    Build(RegistryError),
}

/// A client for the registry a RegistrySecret describes.
fn client_for(objects: &Objects, rs: &RegistrySecret) -> Result<RegistryClient, ClientError> {
    let password = objects.password(rs).map_err(ClientError::Credential)?;
    let credentials = rs.spec.username.as_ref().map(|u| {
        Credentials::new(
            u.clone(),
            password.as_ref().map(|p| p.to_string()).unwrap_or_default(),
        )
    });
    RegistryClient::new(RegistryConfig {
        host: rs.spec.domain.clone(),
        credentials,
        insecure: rs.spec.insecure,
        connect_timeout: Some(Duration::from_secs(5)),
        read_timeout: Some(Duration::from_secs(15)),
        ..Default::default()
    })
    .map_err(ClientError::Build)
}

async fn resolve_and_record(
    objects: &Objects,
    editors: &SpecEditors,
    id: &Id,
    repo: &Repository,
    rs: Option<&RegistrySecret>,
    secret: Option<SecretVersion>,
    failures_before: u32,
) -> (Attempt, &'static str) {
    let generation = repo.metadata.generation.unwrap_or(0);
    let interval = repo.spec.sync_interval_duration();
    let started = std::time::Instant::now();
    let (secret_ns, secret_name) = secret_ref(repo);
    let outcome: Result<Vec<Resolved>, Failure> = match rs {
        _ if secret_ns != id.0 => Err(Failure {
            reason: FailureReason::NotFound,
            message: format!(
                "spec.registryRef: RegistrySecret {secret_ns}/{secret_name} is in another namespace; a Repository may only use its own namespace's"
            ),
            retry_after: None,
        }),
        None => Err(Failure {
            reason: FailureReason::NotFound,
            message: format!(
                "spec.registryRef: RegistrySecret {secret_ns}/{secret_name} not found"
            ),
            retry_after: None,
        }),
        Some(rs) => match client_for(objects, rs) {
            Err(e) => Err(Failure {
                reason: FailureReason::Unreachable,
                message: format!("RegistrySecret {secret_ns}/{secret_name}: {e}"),
                retry_after: None,
            }),
            Ok(client) => {
                let spec = resolve_spec(repo);
                // A scan may take minutes; the timeout leaves room for it.
                let budget = match spec.scan {
                    Some(_) => RESOLVE_TIMEOUT + resolver::SCAN_WAIT,
                    None => RESOLVE_TIMEOUT,
                };
                match tokio::time::timeout(budget, resolver::resolve(&client, &spec)).await {
                    Ok(r) => r,
                    Err(_) => Err(Failure {
                        reason: FailureReason::Unreachable,
                        message: format!("{}: no answer within {budget:?}", rs.spec.domain),
                        retry_after: None,
                    }),
                }
            }
        },
    };
    let at = SystemTime::now();
    let result = match &outcome {
        Ok(_) => "success",
        Err(f) => f.reason.as_str(),
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let repository = format!("{}/{}", id.0, id.1);
    match &outcome {
        Ok(r) => {
            let digests = r
                .iter()
                .map(|x| format!("{}={}", x.tag, x.digest))
                .collect::<Vec<_>>()
                .join(",");
            // A success after failures is news; a periodic re-resolution
            // that finds the same digests is not.
            let previous = resolve_status_of(repo.status.as_ref());
            // While pinned, what ships is not what the upstream said last.
            let last_upstream: Vec<&String> = match repo.status.as_ref() {
                Some(st) if st.pinned_revision.is_some() => {
                    crate::rollout::latest_upstream(&st.revisions)
                        .map(|rev| rev.resolved.iter().map(|x| &x.digest).collect())
                        .unwrap_or_default()
                }
                _ => previous.resolved.iter().map(|x| &x.digest).collect(),
            };
            let same = previous.reason.is_none()
                && last_upstream.into_iter().eq(r.iter().map(|x| &x.digest));
            if same && failures_before == 0 {
                debug!(repository = %repository, generation, digests = %digests, elapsed_ms, "Resolved tags (unchanged)");
            } else {
                info!(repository = %repository, generation, digests = %digests, elapsed_ms, "Resolved tags");
            }
        }
        Err(f) => {
            // Warn when a failure starts or changes; the same failure again
            // (a registry that stays down) is debug, summarised each minute.
            let previous = resolve_status_of(repo.status.as_ref());
            if failures_before == 0 || previous.message != f.message {
                warn!(repository = %repository, generation, reason = f.reason.as_str(),
                      message = %f.message, elapsed_ms, "Tag resolution failed; retrying with back-off");
            } else {
                debug!(repository = %repository, generation, reason = f.reason.as_str(),
                       message = %f.message, failures = failures_before + 1, elapsed_ms,
                       "Tag resolution failed again");
            }
        }
    }
    // Who changed the spec, for a revision the change makes (read before
    // the write, which cannot wait on the store inside its retry loop).
    let editor = match &outcome {
        Ok(_) if crate::rollout::needs_editor(repo.status.as_ref(), generation) => {
            let seen_at = repo
                .metadata
                .resource_version
                .as_deref()
                .and_then(|r| r.parse().ok());
            editors
                .last(
                    objects.store().as_ref(),
                    Kind::Repository.plural(),
                    &id.0,
                    &id.1,
                    seen_at.unwrap_or(u64::MAX),
                )
                .await
            .unwrap_or_else(|e| {
                debug!(repository = %repository, error = %e, "Could not read who changed the spec");
                None
            })
        }
        _ => None,
    };
    let written = write_repo_status(objects, id, &outcome, generation, at, editor).await;
    let status = match written {
        Ok(s) => s,
        Err(e) => {
            warn!(repository = %repository, error = %e, "Could not record the resolution");
            // Try again soon rather than waiting a whole interval.
            next_status_failed(&e)
        }
    };
    let failures = if status.reason.is_some() {
        failures_before.saturating_add(1)
    } else {
        0
    };
    let attempt = Attempt {
        at,
        generation,
        secret,
        next: next_after(&status, interval, at, failures, rand::random::<f64>()),
        failures,
    };
    (attempt, result)
}

fn next_status_failed(e: &ObjectError) -> ResolveStatus {
    ResolveStatus {
        reason: Some(FailureReason::Unreachable),
        message: e.to_string(),
        ..Default::default()
    }
}

/// Writes the resolver's status fields of Repository `id` after an
/// attempt, read-modify-write (the status writer writes the per-cluster
/// fields of the same object). Returns the resolver's status as written.
async fn write_repo_status(
    objects: &Objects,
    id: &Id,
    outcome: &Result<Vec<Resolved>, Failure>,
    generation: i64,
    at: SystemTime,
    editor: Option<String>,
) -> Result<ResolveStatus, ObjectError> {
    let mut written = None;
    objects
        .update_status(Kind::Repository, Some(&id.0), &id.1, |obj| {
            let Object::Repository(repo) = obj else {
                written = None;
                return false;
            };
            let previous = resolve_status_of(repo.status.as_ref());
            let next = resolver::next_status(&previous, outcome, at);
            let before = repo.status.clone().unwrap_or_default();
            let mut status = before.clone();
            apply_resolve_status(&mut status, &next, generation);
            if outcome.is_ok() {
                // A new revision when the digests moved; while pinned,
                // `resolved` goes back to the pinned revision's.
                let upstream = status.resolved.clone();
                crate::rollout::record(
                    &mut status,
                    &upstream,
                    generation,
                    to_time(at),
                    editor.clone(),
                );
            }
            // A new digest counts as synced nowhere until clusters report
            // it: recount in the same write, so no reader ever sees the new
            // digest next to the old count.
            repo.status = Some(status);
            let wanted = imgfleet::model::wanted_digests(repo);
            let mut status = repo.status.take().unwrap_or_default();
            status.synced_clusters = crate::status::count_synced(&status.clusters, &wanted);
            written = Some(next);
            // The same outcome as last time (a registry that stays down):
            // nothing to write, and no watch event for every replica.
            let changed = status != before;
            repo.status = Some(status);
            changed
        })
        .await?;
    written.ok_or_else(|| ObjectError::WrongKind {
        id: format!("{}/{}", id.0, id.1),
        expected: Kind::Repository,
    })
}

/// Checks a registry's health and records it in the RegistrySecret's status;
/// returns the phase found.
async fn check_and_record(objects: &Objects, id: &Id, rs: &RegistrySecret) -> ConnectionPhase {
    let client = client_for(objects, rs);
    let health = match &client {
        Ok(client) => {
            match tokio::time::timeout(RESOLVE_TIMEOUT, resolver::check_health(client)).await {
                Ok(h) => h,
                Err(_) => resolver::Health {
                    phase: HealthPhase::Unreachable,
                    latency: RESOLVE_TIMEOUT,
                    message: format!("{}: no answer within {RESOLVE_TIMEOUT:?}", rs.spec.domain),
                    checked_at: SystemTime::now(),
                },
            }
        }
        Err(e) => resolver::Health {
            phase: HealthPhase::Unreachable,
            latency: Duration::ZERO,
            message: e.to_string(),
            checked_at: SystemTime::now(),
        },
    };
    let phase = match (&client, health.phase) {
        (Err(ClientError::Credential(_)), _) => ConnectionPhase::CredentialUnusable,
        (_, HealthPhase::Connected) => ConnectionPhase::Connected,
        (_, HealthPhase::AuthFailed) => ConnectionPhase::AuthFailed,
        (_, HealthPhase::Unreachable) => ConnectionPhase::Unreachable,
    };
    let name = format!("{}/{}", id.0, id.1);
    debug!(registry_secret = %name, domain = %rs.spec.domain,
           phase = ?phase, latency_ms = health.latency.as_millis() as u64, "Checked registry health");
    let mut previous = None;
    let written = objects
        .update_status(Kind::RegistrySecret, Some(&id.0), &id.1, |obj| {
            let Object::RegistrySecret(current) = obj else {
                return false;
            };
            previous = current.status.as_ref().and_then(|s| s.phase);
            current.status = Some(RegistrySecretStatus {
                phase: Some(phase),
                last_check_time: to_time(health.checked_at),
                latency_ms: health.latency.as_millis().min(u32::MAX as u128) as u32,
                message: Some(health.message.clone()).filter(|m| !m.is_empty()),
            });
            true
        })
        .await;
    match written {
        Ok(true) if previous != Some(phase) => {
            info!(registry_secret = %name, domain = %rs.spec.domain,
                  phase = ?phase, "Registry health changed");
        }
        Ok(_) | Err(ObjectError::NotFound(_)) => {}
        Err(e) => {
            warn!(registry_secret = %name, error = %e, "Could not record registry health");
        }
    }
    phase
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const T0: Duration = Duration::from_secs(1_000_000);
    const HOUR: Duration = Duration::from_secs(3600);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn secret(generation: i64) -> Option<SecretVersion> {
        Some(SecretVersion {
            uid: "u1".into(),
            generation,
        })
    }

    fn good_status(at: SystemTime) -> ResolveStatus {
        ResolveStatus {
            resolved: vec![Resolved {
                tag: "v1".into(),
                digest: "sha256:a".into(),
                media_type: String::new(),
                scan: None,
                verification: None,
            }],
            last_resolve_time: Some(at),
            ..Default::default()
        }
    }

    fn view(generation: i64, observed: i64, status: ResolveStatus) -> RepoView {
        RepoView {
            generation,
            observed_generation: observed,
            suspended: false,
            interval: HOUR,
            status,
            secret: secret(1),
            in_flight: false,
        }
    }

    fn attempt(at: u64, generation: i64, next: u64) -> Attempt {
        Attempt {
            at: t(at),
            generation,
            secret: secret(1),
            next: t(next),
            failures: 0,
        }
    }

    #[test]
    fn which_repositories_are_due() {
        let failed = ResolveStatus {
            reason: Some(FailureReason::AuthFailed),
            message: "denied".into(),
            ..Default::default()
        };
        let limited = ResolveStatus {
            reason: Some(FailureReason::RateLimited),
            retry_after: Some(t(500)),
            ..good_status(t(0))
        };
        let mut suspended = view(1, 0, ResolveStatus::default());
        suspended.suspended = true;
        let mut busy = view(1, 0, ResolveStatus::default());
        busy.in_flight = true;
        let mut secret_changed = view(1, 1, good_status(t(0)));
        secret_changed.secret = secret(2);
        let mut secret_gone = view(1, 1, good_status(t(0)));
        secret_gone.secret = None;

        let cases: Vec<(&str, RepoView, Option<Attempt>, u64, Due)> = vec![
            (
                "new repository",
                view(1, 0, ResolveStatus::default()),
                None,
                10,
                Due::Now,
            ),
            (
                "spec changed",
                view(2, 1, good_status(t(0))),
                Some(attempt(0, 1, 3600)),
                10,
                Due::Now,
            ),
            ("suspended is skipped", suspended, None, 10, Due::Skip),
            ("in flight is skipped", busy, None, 10, Due::Skip),
            (
                "resolved by an earlier leader: on the interval",
                view(1, 1, good_status(t(0))),
                None,
                10,
                Due::At(t(3600)),
            ),
            (
                "interval elapsed",
                view(1, 1, good_status(t(0))),
                None,
                3600,
                Due::Now,
            ),
            (
                "remembered attempt wins over a lagging cache",
                view(1, 0, ResolveStatus::default()),
                Some(attempt(5, 1, 3605)),
                10,
                Due::At(t(3605)),
            ),
            (
                "failure remembered: retried after the back-off",
                view(1, 1, failed.clone()),
                Some(attempt(5, 1, 35)),
                10,
                Due::At(t(35)),
            ),
            (
                "failure remembered: back-off over",
                view(1, 1, failed.clone()),
                Some(attempt(5, 1, 35)),
                35,
                Due::Now,
            ),
            (
                "failure from an earlier leader: retried now",
                view(1, 1, failed),
                None,
                10,
                Due::Now,
            ),
            (
                "rate limited: not before Retry-After",
                view(1, 1, limited.clone()),
                None,
                10,
                Due::At(t(500)),
            ),
            (
                "rate limited: Retry-After passed",
                view(1, 1, limited),
                None,
                501,
                Due::Now,
            ),
            (
                "RegistrySecret changed",
                secret_changed,
                Some(attempt(0, 1, 3600)),
                10,
                Due::Now,
            ),
            (
                "RegistrySecret deleted",
                secret_gone,
                Some(attempt(0, 1, 3600)),
                10,
                Due::Now,
            ),
        ];
        for (name, v, last, now, want) in cases {
            assert_eq!(repository_due(&v, last.as_ref(), t(now)), want, "{name}");
        }
    }

    #[test]
    fn next_attempt_after_an_outcome() {
        let interval = Duration::from_secs(20);
        let failed = ResolveStatus {
            reason: Some(FailureReason::Unreachable),
            ..Default::default()
        };
        let limited = ResolveStatus {
            reason: Some(FailureReason::RateLimited),
            retry_after: Some(t(300)),
            ..Default::default()
        };
        // (name, status, interval, failures in a row, jitter, when)
        let cases = [
            (
                "success: one interval",
                good_status(t(0)),
                HOUR,
                0,
                0.3,
                t(HOUR.as_secs()),
            ),
            (
                "first failure: 30 s",
                failed.clone(),
                HOUR,
                1,
                0.999_999,
                t(30),
            ),
            (
                "first failure, least jitter: half",
                failed.clone(),
                HOUR,
                1,
                0.0,
                t(15),
            ),
            (
                "second failure: doubled",
                failed.clone(),
                HOUR,
                2,
                0.999_999,
                t(60),
            ),
            (
                "fifth failure: 16 × 30 s",
                failed.clone(),
                HOUR,
                5,
                0.999_999,
                t(480),
            ),
            (
                "many failures: capped at the interval",
                failed.clone(),
                HOUR,
                40,
                0.999_999,
                t(3600),
            ),
            (
                "failure: capped by a short interval",
                failed,
                interval,
                3,
                0.999_999,
                t(20),
            ),
            (
                "rate limited: Retry-After",
                limited,
                interval,
                9,
                0.5,
                t(300),
            ),
        ];
        for (name, status, interval, failures, jitter, want) in cases {
            let got = next_after(&status, interval, t(0), failures, jitter);
            let diff = got.duration_since(want).unwrap_or_else(|e| e.duration());
            assert!(
                diff < Duration::from_millis(5),
                "{name}: {got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn backoff_grows_spreads_and_stays_under_the_interval() {
        let mut last = Duration::ZERO;
        for n in 1..30 {
            let full = failure_backoff(n, HOUR, 0.999_999_999);
            assert!(full >= last, "{n}: never shrinks");
            assert!(full <= HOUR, "{n}: capped");
            // Jitter spreads over the upper half, never beyond the cap.
            let low = failure_backoff(n, HOUR, 0.0);
            assert!(
                low * 2 >= full - Duration::from_millis(1) && low <= full,
                "{n}"
            );
            last = full;
        }
        assert_eq!(
            failure_backoff(u32::MAX, HOUR, 0.999_999_999).as_secs(),
            3599
        );
    }

    #[test]
    fn the_due_queue_gives_what_is_due_earliest_first() {
        let id = |n: &str| ("default".to_string(), n.to_string());
        let mut q = DueQueue::default();
        q.set(&id("late"), Some(t(30)));
        q.set(&id("early"), Some(t(10)));
        q.set(&id("moved"), Some(t(5)));
        q.set(&id("moved"), Some(t(50)));
        q.set(&id("gone"), Some(t(1)));
        q.set(&id("gone"), None);
        assert_eq!(q.pop_due(t(9)), None, "nothing due before 10");
        assert_eq!(q.pop_due(t(40)), Some(id("early")));
        assert_eq!(q.pop_due(t(40)), Some(id("late")));
        assert_eq!(q.pop_due(t(40)), None, "moved to 50");
        assert_eq!(q.pop_due(t(50)), Some(id("moved")));
        assert_eq!(q.pop_due(t(1000)), None);
        assert!(q.at.is_empty() && q.order.is_empty());
    }

    #[test]
    fn health_is_checked_on_change_and_period() {
        let v1 = secret(1).expect("v");
        let v2 = secret(2).expect("v");
        let p = HEALTH_PERIOD;
        assert!(health_due(None, &v1, t(0), p), "never checked");
        assert!(
            !health_due(Some(&(t(0), v1.clone())), &v1, t(10), p),
            "fresh"
        );
        assert!(
            health_due(Some(&(t(0), v1.clone())), &v1, t(30), p),
            "period over"
        );
        assert!(health_due(Some(&(t(0), v1)), &v2, t(1), p), "spec changed");
    }

    fn repo(yaml: &str) -> Repository {
        match imgfleet::model::parse_documents(yaml)
            .expect("test YAML parses")
            .remove(0)
        {
            Object::Repository(r) => r,
            other => panic!("not a repository: {other:?}"),
        }
    }

    #[test]
    fn spec_maps_to_what_is_resolved() {
        let head = "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata: {name: a, namespace: prod}\nspec:\n  repository: library/nginx\n  registryRef: {name: hub}\n";
        let r = repo(&format!(
            "{head}  tags: [latest, v1]\n  platforms: [linux/amd64]\n"
        ));
        let spec = resolve_spec(&r);
        assert_eq!(
            spec.tags,
            TagChoice::Fixed(vec!["latest".into(), "v1".into()])
        );
        assert_eq!(spec.platforms, vec!["linux/amd64".to_string()]);
        assert_eq!(secret_ref(&r), ("prod".to_string(), "hub".to_string()));
        let r = repo(&format!(
            "{head}  tagPattern: {{pattern: 'v1\\.[0-9]+', keepLatest: 3}}\n"
        ));
        assert_eq!(
            resolve_spec(&r).tags,
            TagChoice::Pattern {
                pattern: "v1\\.[0-9]+".into(),
                keep_latest: 3
            }
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = repo(&format!("{head}  digest: \"{d}\"\n"));
        let spec = resolve_spec(&r);
        assert_eq!(spec.digest, Some(d));
        assert_eq!(spec.tags, TagChoice::Fixed(vec![]));
    }

    #[test]
    fn status_round_trips_and_keeps_cluster_fields() {
        let mut status = RepositoryStatus {
            synced_clusters: 2,
            target_clusters: 3,
            ..Default::default()
        };
        let r = ResolveStatus {
            reason: Some(FailureReason::RateLimited),
            message: "slow down".into(),
            stale: true,
            retry_after: Some(t(60)),
            ..good_status(t(0))
        };
        apply_resolve_status(&mut status, &r, 7);
        assert_eq!(status.synced_clusters, 2);
        assert_eq!(status.target_clusters, 3);
        assert_eq!(status.observed_generation, 7);
        assert_eq!(resolve_status_of(Some(&status)), r);
    }

    /// The loop's timing with the tokio clock paused: an election that is
    /// lost stops the work at once, and a regained one starts it again.
    #[tokio::test(start_paused = true)]
    async fn work_follows_leadership() {
        let (tx, rx) = watch::channel(false);
        let token = CancellationToken::new();
        let store = Arc::new(
            crate::store::redb::RedbStore::open(&tempfile_path("work_follows_leadership.redb"))
                .await
                .expect("redb opens"),
        );
        let keyring = crate::secrets::Keyring::from_key("test", &[7u8; 32]).expect("key");
        let objects = Objects::new(store, Arc::new(keyring));
        let run = tokio::spawn(run(objects, HubMetrics::new(), rx, token.clone()));
        tx.send(true).expect("send");
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.send(false).expect("send");
        tokio::time::sleep(Duration::from_secs(1)).await;
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("run ends on shutdown")
            .expect("no panic");
    }

    fn tempfile_path(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("imgfleet-resolve-loop-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }
}
