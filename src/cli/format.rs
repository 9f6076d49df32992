//! What the CLI prints: tables, descriptions, YAML and JSON. Pure functions of
//! objects and the current time, so they are tested without a hub.

use std::fmt::Write as _;

use imgfleet::api::v1 as pb;
use imgfleet::model::{
    Cluster, ClusterImageStatus, ClusterStatus, ImagePhase, Kind, LabelSelector, Object, Placement,
    RegistrySecret, Repository, RepositoryStatus, SelectorOperator, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Columns aligned like kubectl's: each as wide as its widest cell, three spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("   ");
            }
            let pad = widths.get(i).copied().unwrap_or(0);
            let _ = write!(text, "{cell:<pad$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// How long ago `t` was, kubectl style: `45s`, `12m`, `5h`, `3d`.
pub fn age(t: Option<&Time>, now: Timestamp) -> String {
    let Some(t) = t else {
        return "<unknown>".to_owned();
    };
    let secs = now.as_second() - t.0.as_second();
    if secs < 0 {
        return "0s".to_owned();
    }
    match secs {
        0..120 => format!("{secs}s"),
        120..7_200 => format!("{}m", secs / 60),
        7_200..172_800 => format!("{}h", secs / 3_600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// A time and how long ago it was: `2026-01-08T10:00:00Z (5m ago)`, or `<never>`.
fn when(t: Option<&Time>, now: Timestamp) -> String {
    match t {
        Some(time) => format!(
            "{} ({} ago)",
            time.0.strftime("%Y-%m-%dT%H:%M:%SZ"),
            age(t, now)
        ),
        None => "<never>".to_owned(),
    }
}

/// `sha256:0123456789ab` for a full digest, for narrow columns.
pub fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algo, hex)) if hex.len() > 12 => format!("{algo}:{}", &hex[..12]),
        _ => digest.to_owned(),
    }
}

/// A label selector in kubectl syntax: `region=east,tier in (a,b),!maintenance`.
pub fn selector_string(sel: &LabelSelector) -> String {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in &sel.match_expressions {
        parts.push(match e.operator {
            SelectorOperator::In => format!("{} in ({})", e.key, e.values.join(",")),
            SelectorOperator::NotIn => format!("{} notin ({})", e.key, e.values.join(",")),
            SelectorOperator::Exists => e.key.clone(),
            SelectorOperator::DoesNotExist => format!("!{}", e.key),
        });
    }
    if parts.is_empty() {
        "<everything>".to_owned()
    } else {
        parts.join(",")
    }
}

fn labels_string(o: &Object) -> String {
    match &o.metadata().labels {
        Some(l) if !l.is_empty() => l
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
        _ => "<none>".to_owned(),
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "<none>".to_owned()
    } else {
        items.join(",")
    }
}

/// What a Repository keeps, in one cell: its tag, tags, pattern or digest.
fn tag_cell(r: &Repository) -> String {
    let s = &r.spec;
    if let Some(tag) = &s.tag {
        tag.clone()
    } else if !s.tags.is_empty() {
        s.tags.join(",")
    } else if let Some(p) = &s.tag_pattern {
        format!("/{}/ (latest {})", p.pattern, p.keep_latest.unwrap_or(1))
    } else if let Some(d) = &s.digest {
        format!("@{}", short_digest(d))
    } else {
        "<none>".to_owned()
    }
}

fn synced_cell(r: &Repository) -> String {
    let (synced, target) = r
        .status
        .as_ref()
        .map(|s| (s.synced_clusters, s.target_clusters))
        .unwrap_or_default();
    format!("{synced}/{target}")
}

/// The full resolved digest, so it can be compared with what the registry
/// serves; `(+N)` when more tags are kept, `(stale)` when the last
/// resolution failed, and the failure reason when nothing resolved yet.
fn digest_cell(r: &Repository) -> String {
    let status = r.status.as_ref();
    let resolved = status.map(|s| s.resolved.as_slice()).unwrap_or_default();
    let mut cell = match resolved.first() {
        Some(first) => first.digest.clone(),
        None => match (status.and_then(|s| s.reason), r.spec.digest.as_deref()) {
            (Some(reason), _) => return format!("<{reason:?}>"),
            (None, Some(pinned)) => pinned.to_owned(),
            (None, None) => return "<none>".to_owned(),
        },
    };
    if resolved.len() > 1 {
        cell.push_str(&format!(" (+{})", resolved.len() - 1));
    }
    if status.is_some_and(|s| s.stale) {
        cell.push_str(" (stale)");
    }
    cell
}

/// Why a Repository reaches no cluster or cannot be pulled (the hub's
/// placement report), else why its last resolution failed, else `-`.
fn reason_cell(r: &Repository) -> String {
    let status = r.status.as_ref();
    if let Some(p) = status.and_then(|s| s.placement.as_ref()) {
        return format!("{:?}", p.reason);
    }
    match status.and_then(|s| s.reason) {
        Some(reason) => format!("Resolve{reason:?}"),
        None => "-".to_owned(),
    }
}

fn rs_status(rs: &RegistrySecret) -> String {
    rs.status
        .as_ref()
        .and_then(|s| s.phase)
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "Unknown".to_owned())
}

fn cluster_status(c: &Cluster) -> String {
    c.status
        .as_ref()
        .and_then(|s| s.phase)
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "NeverConnected".to_owned())
}

/// The `get` table for objects of one kind (objects of other kinds are skipped).
pub fn table_for(kind: Kind, objects: &[Object], wide: bool, now: Timestamp) -> String {
    match kind {
        Kind::RegistrySecret => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .filter_map(|o| match o {
                    Object::RegistrySecret(rs) => Some(vec![
                        o.namespace().unwrap_or_default().to_owned(),
                        o.name().to_owned(),
                        rs.spec.domain.clone(),
                        rs.spec.provider.to_string(),
                        rs_status(rs),
                        age(o.metadata().creation_timestamp.as_ref(), now),
                    ]),
                    _ => None,
                })
                .collect();
            table(
                &["NAMESPACE", "NAME", "DOMAIN", "PROVIDER", "STATUS", "AGE"],
                &rows,
            )
        }
        Kind::Repository => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .filter_map(|o| match o {
                    Object::Repository(r) => {
                        let mut row = vec![
                            o.namespace().unwrap_or_default().to_owned(),
                            o.name().to_owned(),
                            r.spec.repository.clone(),
                            tag_cell(r),
                            digest_cell(r),
                            synced_cell(r),
                            age(o.metadata().creation_timestamp.as_ref(), now),
                        ];
                        if wide {
                            row.push(
                                r.spec
                                    .sync_interval
                                    .clone()
                                    .unwrap_or_else(|| "1h".to_owned()),
                            );
                            row.push(reason_cell(r));
                        }
                        Some(row)
                    }
                    _ => None,
                })
                .collect();
            let mut headers = vec![
                "NAMESPACE",
                "NAME",
                "REPOSITORY",
                "TAG",
                "DIGEST",
                "SYNCED",
                "AGE",
            ];
            if wide {
                headers.extend(["INTERVAL", "REASON"]);
            }
            table(&headers, &rows)
        }
        Kind::Cluster => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .filter_map(|o| match o {
                    Object::Cluster(c) => {
                        let last_seen = c.status.as_ref().and_then(|s| s.last_seen.as_ref());
                        let mut row = vec![
                            o.name().to_owned(),
                            labels_string(o),
                            list_or_none(&c.spec.tenants),
                            cluster_status(c),
                            if last_seen.is_some() {
                                format!("{} ago", age(last_seen, now))
                            } else {
                                "<never>".to_owned()
                            },
                        ];
                        if wide {
                            let s = c.status.clone().unwrap_or_default();
                            row.push(format!("{}/{}", s.images_synced, s.images_desired));
                            row.push(s.agent_version.unwrap_or_else(|| "<unknown>".to_owned()));
                        }
                        Some(row)
                    }
                    _ => None,
                })
                .collect();
            let mut headers = vec!["NAME", "LABELS", "TENANTS", "STATUS", "LAST-SEEN"];
            if wide {
                headers.extend(["IMAGES", "AGENT"]);
            }
            table(&headers, &rows)
        }
        Kind::RoleBinding | Kind::ClusterRoleBinding => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .filter(|o| o.kind() == kind)
                .filter_map(|o| {
                    let (role, subjects) = binding_parts(o)?;
                    let mut row = Vec::new();
                    if kind.namespaced() {
                        row.push(o.namespace().unwrap_or_default().to_owned());
                    }
                    row.extend([
                        o.name().to_owned(),
                        role.to_owned(),
                        subjects_cell(subjects),
                        age(o.metadata().creation_timestamp.as_ref(), now),
                    ]);
                    Some(row)
                })
                .collect();
            let mut headers = Vec::new();
            if kind.namespaced() {
                headers.push("NAMESPACE");
            }
            headers.extend(["NAME", "ROLE", "SUBJECTS", "AGE"]);
            table(&headers, &rows)
        }
    }
}

/// The role and subjects of a binding; `None` for other kinds.
fn binding_parts(o: &Object) -> Option<(&str, &[Subject])> {
    match o {
        Object::RoleBinding(b) => Some((&b.spec.role, &b.spec.subjects)),
        Object::ClusterRoleBinding(b) => Some((&b.spec.role, &b.spec.subjects)),
        _ => None,
    }
}

/// `Group/dev,User/user-a`.
fn subjects_cell(subjects: &[Subject]) -> String {
    let all: Vec<String> = subjects
        .iter()
        .map(|s| format!("{}/{}", s.kind, s.name))
        .collect();
    list_or_none(&all)
}

/// Bytes for people: `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Progress of one image on one cluster, in percent of bytes (or `-`).
pub fn progress(phase: Option<ImagePhase>, done: u64, total: u64) -> String {
    if phase == Some(ImagePhase::Synced) {
        return "100%".to_owned();
    }
    // u128 so that done * 100 cannot overflow; no total means no percentage.
    match (u128::from(done.min(total)) * 100).checked_div(u128::from(total)) {
        Some(pct) => format!("{pct}%"),
        None => "-".to_owned(),
    }
}

fn field(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{:<16}{value}", format!("{name}:"));
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// The `describe` text of one object.
pub fn describe(object: &Object, now: Timestamp) -> String {
    let mut out = String::new();
    let meta = object.metadata();
    field(&mut out, "Kind", object.kind());
    field(&mut out, "Name", object.name());
    if let Some(ns) = object.namespace() {
        field(&mut out, "Namespace", ns);
    }
    field(&mut out, "Labels", labels_string(object));
    field(
        &mut out,
        "Created",
        when(meta.creation_timestamp.as_ref(), now),
    );
    if let Some(g) = meta.generation {
        field(&mut out, "Generation", g);
    }
    match object {
        Object::RegistrySecret(rs) => {
            let s = &rs.spec;
            field(&mut out, "Domain", &s.domain);
            field(&mut out, "Provider", s.provider);
            field(&mut out, "Insecure", s.insecure);
            field(
                &mut out,
                "Username",
                s.username.as_deref().unwrap_or("<anonymous>"),
            );
            let st = rs.status.clone().unwrap_or_default();
            field(&mut out, "Status", rs_status(rs));
            field(
                &mut out,
                "Last check",
                when(st.last_check_time.as_ref(), now),
            );
            if st.latency_ms > 0 {
                field(&mut out, "Latency", format!("{} ms", st.latency_ms));
            }
            if let Some(m) = &st.message {
                field(&mut out, "Message", m);
            }
        }
        Object::Repository(r) => describe_repository(&mut out, r, object, now),
        Object::RoleBinding(_) | Object::ClusterRoleBinding(_) => {
            if let Some((role, subjects)) = binding_parts(object) {
                field(&mut out, "Role", role);
                field(&mut out, "Subjects", subjects_cell(subjects));
            }
        }
        Object::Cluster(c) => {
            field(&mut out, "Tenants", list_or_none(&c.spec.tenants));
            if let Some(d) = &c.spec.description {
                field(&mut out, "Description", d);
            }
            let st = c.status.clone().unwrap_or_default();
            field(&mut out, "Status", cluster_status(c));
            field(&mut out, "Last seen", when(st.last_seen.as_ref(), now));
            field(
                &mut out,
                "Agent version",
                st.agent_version.as_deref().unwrap_or("<unknown>"),
            );
            field(
                &mut out,
                "Storage",
                format!(
                    "{} used of {}",
                    human_bytes(st.storage_used_bytes),
                    human_bytes(st.storage_capacity_bytes)
                ),
            );
            field(
                &mut out,
                "Images",
                format!("{} of {} synced", st.images_synced, st.images_desired),
            );
            field(
                &mut out,
                "Generation",
                format!(
                    "desired {}, applied {}",
                    st.desired_generation, st.applied_generation
                ),
            );
            if let Some(h) = &st.hub_replica {
                field(&mut out, "Hub replica", h);
            }
            describe_held(&mut out, &st);
        }
    }
    out
}

/// Repositories the Held section lists before it only counts the rest.
const HELD_REPOSITORIES_SHOWN: usize = 20;
/// Digests shown per repository; more are only counted.
const HELD_DIGESTS_SHOWN: usize = 3;

/// What the cluster's store holds, per upstream repository: its few digests
/// short, or how many. `rollout history` has the detail.
fn describe_held(out: &mut String, st: &ClusterStatus) {
    if st.held.is_empty() {
        field(out, "Held", "<none reported>");
        return;
    }
    out.push_str("Held:\n");
    let rows: Vec<Vec<String>> = st
        .held
        .iter()
        .take(HELD_REPOSITORIES_SHOWN)
        .map(|h| {
            let digests = if h.digests.len() <= HELD_DIGESTS_SHOWN {
                h.digests
                    .iter()
                    .map(|d| short_digest(d))
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                format!("{} digests", h.digests.len())
            };
            vec![format!("{}/{}", h.registry, h.repository), digests]
        })
        .collect();
    out.push_str(&indent(&table(&["REPOSITORY", "DIGESTS"], &rows)));
    if st.held.len() > HELD_REPOSITORIES_SHOWN {
        let _ = writeln!(
            out,
            "  ({} more repositories)",
            st.held.len() - HELD_REPOSITORIES_SHOWN
        );
    }
    if st.held_truncated {
        out.push_str("  (the agent holds more than it reported)\n");
    }
}

fn describe_repository(out: &mut String, r: &Repository, object: &Object, now: Timestamp) {
    describe_repository_spec(out, r, object);
    let st = r.status.clone().unwrap_or_default();
    describe_resolution(out, &st, now);
    describe_clusters(out, &st, now);
}

/// What the Repository asks for: source, versions, platforms, placement, retention.
fn describe_repository_spec(out: &mut String, r: &Repository, object: &Object) {
    let s = &r.spec;
    field(out, "Repository", &s.repository);
    field(
        out,
        "Registry",
        format!(
            "{}/{}",
            s.registry_ref
                .namespace
                .as_deref()
                .or(object.namespace())
                .unwrap_or_default(),
            s.registry_ref.name
        ),
    );
    if let Some(t) = &s.tag {
        field(out, "Tag", t);
    }
    if !s.tags.is_empty() {
        field(out, "Tags", s.tags.join(", "));
    }
    if let Some(p) = &s.tag_pattern {
        field(
            out,
            "Tag pattern",
            format!("{} (keep latest {})", p.pattern, p.keep_latest.unwrap_or(1)),
        );
    }
    if let Some(d) = &s.digest {
        field(out, "Digest", d);
    }
    field(
        out,
        "Platforms",
        if s.platforms.is_empty() {
            "all".to_owned()
        } else {
            s.platforms.join(", ")
        },
    );
    field(
        out,
        "Sync interval",
        s.sync_interval.as_deref().unwrap_or("1h (default)"),
    );
    field(out, "Placement", placement_line(s.placement.as_ref()));
    if let Some(ret) = &s.retention {
        let versions = ret
            .keep_versions
            .map(|n| format!("keep {n} versions"))
            .unwrap_or_else(|| "keep the agent's default number of versions".to_owned());
        let grace = ret
            .grace_period
            .as_deref()
            .map(|g| format!(", grace period {g}"))
            .unwrap_or_default();
        field(out, "Retention", format!("{versions}{grace}"));
    }
    field(out, "Suspended", s.suspend);
}

/// Where a placement sends a Repository, in words.
fn placement_line(placement: Option<&Placement>) -> String {
    let Some(p) = placement else {
        return "<none>: every cluster that admits this namespace".to_owned();
    };
    let mut parts = Vec::new();
    if let Some(sel) = &p.cluster_selector {
        parts.push(format!("clusters matching {}", selector_string(sel)));
    }
    if !p.clusters.is_empty() {
        parts.push(format!("clusters {}", p.clusters.join(", ")));
    }
    if parts.is_empty() {
        "<empty>: selects no cluster".to_owned()
    } else {
        parts.join("; ")
    }
}

/// Why the Repository reaches no cluster (if so), and what its tags resolved to.
fn describe_resolution(out: &mut String, st: &RepositoryStatus, now: Timestamp) {
    if let Some(p) = &st.placement {
        let what = if st.target_clusters == 0 {
            "Not placed"
        } else {
            "Problem"
        };
        field(out, what, format!("{:?}: {}", p.reason, p.message));
    }
    field(
        out,
        "Last resolve",
        when(st.last_resolve_time.as_ref(), now),
    );
    if let Some(reason) = st.reason {
        let stale = if st.stale {
            " (showing the last good result)"
        } else {
            ""
        };
        field(
            out,
            "Resolve error",
            format!("{reason:?}: {}{stale}", st.message.as_deref().unwrap_or("")),
        );
    }
    if let Some(pinned) = st.pinned_revision {
        let held_back = st
            .revisions
            .iter()
            .filter(|r| r.held_back && r.revision > pinned)
            .count();
        field(
            out,
            "Pinned",
            format!(
                "revision {pinned} (rollout undo): tag moves are recorded, not shipped ({held_back} held back), until `imgfleet rollout resume`"
            ),
        );
    }
    out.push_str("Resolved:\n");
    if st.resolved.is_empty() {
        out.push_str("  <none yet>\n");
        return;
    }
    // SCAN and SIGNATURE only when some digest has one.
    let scanned = st.resolved.iter().any(|t| t.scan.is_some());
    let verified = st.resolved.iter().any(|t| t.verification.is_some());
    let mut headers = vec!["TAG", "DIGEST", "MEDIA TYPE"];
    headers.extend(scanned.then_some("SCAN"));
    headers.extend(verified.then_some("SIGNATURE"));
    let rows: Vec<Vec<String>> = st
        .resolved
        .iter()
        .map(|t| {
            let mut row = vec![
                if t.tag.is_empty() {
                    "<digest>".to_owned()
                } else {
                    t.tag.clone()
                },
                t.digest.clone(),
                t.media_type.clone(),
            ];
            let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
            row.extend(scanned.then(|| or_dash(&t.scan)));
            row.extend(verified.then(|| or_dash(&t.verification)));
            row
        })
        .collect();
    out.push_str(&indent(&table(&headers, &rows)));
}

/// One row per cluster and image: wanted, held, phase and progress.
fn describe_clusters(out: &mut String, st: &RepositoryStatus, now: Timestamp) {
    let _ = writeln!(
        out,
        "Clusters ({}/{} synced):",
        st.synced_clusters, st.target_clusters
    );
    if st.clusters.is_empty() {
        out.push_str("  <none reported>\n");
        return;
    }
    let rows: Vec<Vec<String>> = st.clusters.iter().map(|c| cluster_row(c, now)).collect();
    out.push_str(&indent(&table(
        &[
            "CLUSTER",
            "WANTED",
            "HOLDS",
            "PHASE",
            "PROGRESS",
            "LAST SYNC",
            "MESSAGE",
        ],
        &rows,
    )));
    // The hub lists at most 1000 clusters (those not synced first).
    let listed: std::collections::BTreeSet<&str> =
        st.clusters.iter().map(|c| c.cluster.as_str()).collect();
    if (listed.len() as u32) < st.target_clusters {
        let _ = writeln!(
            out,
            "  ({} of {} clusters listed, those not synced first)",
            listed.len(),
            st.target_clusters
        );
    }
}

fn cluster_row(c: &ClusterImageStatus, now: Timestamp) -> Vec<String> {
    let phase = c
        .phase
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "Unknown".to_owned());
    vec![
        c.cluster.clone(),
        short_digest(&c.digest),
        holds_cell(c),
        if c.last_known {
            format!("{phase} (last known)")
        } else {
            phase
        },
        progress(c.phase, c.bytes_done, c.bytes_total),
        c.last_sync_time
            .as_ref()
            .map(|t| format!("{} ago", age(Some(t), now)))
            .unwrap_or_else(|| "<never>".to_owned()),
        // A failed image with a retry scheduled says so, so that
        // Failed never reads as final while a retry is pending.
        match (&c.next_retry_time, c.phase) {
            (Some(t), Some(ImagePhase::Failed)) => format!(
                "{} (retry at {})",
                c.message.as_deref().unwrap_or("failed"),
                t.0.strftime("%Y-%m-%dT%H:%M:%SZ")
            ),
            _ => c.message.clone().unwrap_or_default(),
        },
    ]
}

/// What a cluster holds of a Repository next to the digest it should hold:
/// the wanted digest once servable there, else the digests its mirror still
/// serves (an older version during a change), else `<nothing>`.
fn holds_cell(c: &ClusterImageStatus) -> String {
    if c.phase == Some(ImagePhase::Synced) || c.held_digests.contains(&c.digest) {
        return short_digest(&c.digest);
    }
    if c.held_digests.is_empty() {
        return "<nothing>".to_owned();
    }
    c.held_digests
        .iter()
        .map(|d| short_digest(d))
        .collect::<Vec<_>>()
        .join(",")
}

/// The line `apply` prints per object.
pub fn apply_line(id: &str, outcome: pb::ApplyOutcome, dry_run: bool) -> String {
    let what = match outcome {
        pb::ApplyOutcome::Created => "created",
        pb::ApplyOutcome::Updated => "configured",
        pb::ApplyOutcome::Unchanged => "unchanged",
        pb::ApplyOutcome::Unspecified => "applied",
    };
    if dry_run {
        format!("{id} {what} (dry run)")
    } else {
        format!("{id} {what}")
    }
}

/// Objects as YAML: one document, or several separated by `---`.
pub fn to_yaml(objects: &[Object], single: bool) -> anyhow::Result<String> {
    let objects: Vec<Object> = objects.iter().map(Object::redacted).collect();
    if single && objects.len() == 1 {
        return Ok(serde_saphyr::to_string(&objects[0])?);
    }
    Ok(serde_saphyr::to_string_multiple(&objects)?)
}

/// Objects as JSON: the object, or a kubectl-style `List`.
pub fn to_json(objects: &[Object], single: bool) -> anyhow::Result<String> {
    let objects: Vec<Object> = objects.iter().map(Object::redacted).collect();
    if single && objects.len() == 1 {
        return Ok(serde_json::to_string_pretty(&objects[0])?);
    }
    Ok(serde_json::to_string_pretty(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": objects,
    }))?)
}

/// `imgfleet rollout history`: one row per revision, oldest first, with
/// what ships now and where each revision still is; `None` for the
/// Repository `id` without revisions. Digests are shortened unless `wide`.
pub fn rollout_history(
    id: &str,
    h: &pb::RolloutHistoryResponse,
    wide: bool,
    now: Timestamp,
) -> String {
    let (ns, name) = id.split_once('/').unwrap_or(("default", id));
    let mut out = format!("repository {id} ({})\n", h.image);
    if h.revisions.is_empty() {
        out.push_str("No revisions yet: its tags have not resolved.\n");
        return out;
    }
    let digest = |d: &str| if wide { d.to_owned() } else { short_digest(d) };
    let rows: Vec<Vec<String>> = h
        .revisions
        .iter()
        .filter_map(|e| {
            let r = e.revision.as_ref()?;
            let tags: Vec<&str> = r.resolved.iter().map(|t| t.tag.as_str()).collect();
            let digests: Vec<String> = r.resolved.iter().map(|t| digest(&t.digest)).collect();
            let resolved = r
                .first_resolved
                .as_ref()
                .and_then(imgfleet::convert::time_from_proto);
            let cause = match pb::RevisionCause::try_from(r.cause) {
                Ok(pb::RevisionCause::Rollback) => format!("Rollback to {}", r.rollback_to),
                Ok(pb::RevisionCause::TagMove) => "TagMove".to_owned(),
                Ok(pb::RevisionCause::Edit) => "Edit".to_owned(),
                _ => "Created".to_owned(),
            };
            let state = if r.revision == h.current_revision {
                if h.pinned_revision == r.revision {
                    "shipping (pinned)"
                } else {
                    "shipping"
                }
            } else if r.held_back {
                "held back"
            } else {
                ""
            };
            Some(vec![
                r.revision.to_string(),
                list_or_none(&tags.iter().map(|t| t.to_string()).collect::<Vec<_>>()),
                digests.join(","),
                match &resolved {
                    Some(t) => format!("{} ago", age(Some(t), now)),
                    None => "<unknown>".to_owned(),
                },
                cause,
                if r.user.is_empty() {
                    "-".to_owned()
                } else {
                    r.user.clone()
                },
                list_or_none(&e.held_by),
                state.to_owned(),
            ])
        })
        .collect();
    out.push_str(&table(
        &[
            "REVISION", "TAGS", "DIGESTS", "RESOLVED", "CAUSE", "USER", "HELD BY", "STATE",
        ],
        &rows,
    ));
    if h.pinned_revision != 0 {
        let _ = writeln!(
            out,
            "Pinned to revision {}: tag moves are recorded, not shipped, until `imgfleet rollout resume repository {name} -n {ns}`.",
            h.pinned_revision,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgfleet::model::parse_documents;

    fn now() -> Timestamp {
        "2026-01-08T12:00:00Z".parse().expect("time")
    }

    fn parse(text: &str) -> Vec<Object> {
        parse_documents(text).unwrap_or_else(|e| panic!("{e:?}"))
    }

    const OBJECTS: &str = "\
apiVersion: image.theriseunion.io/v1alpha1
kind: RegistrySecret
metadata: {name: harbor-prod, namespace: production, creationTimestamp: 2026-01-08T11:55:00Z}
spec: {domain: harbor.example.com, username: u, password: TopSecret99, provider: harbor}
status: {phase: Connected, latencyMs: 12}
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Repository
metadata: {name: nginx, namespace: default, creationTimestamp: 2026-01-06T12:00:00Z}
spec:
  repository: library/nginx
  tag: latest
  registryRef: {name: harbor-prod}
  syncInterval: 30m
status:
  resolved:
  - {tag: latest, digest: \"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"}
  syncedClusters: 3
  targetClusters: 4
  clusters:
  - {cluster: edge-1, digest: \"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\", phase: Synced, lastSyncTime: 2026-01-08T11:00:00Z}
  - {cluster: edge-2, digest: \"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\", phase: Syncing, bytesDone: 250, bytesTotal: 1000, message: copying layer 2 of 4}
---
apiVersion: image.theriseunion.io/v1alpha1
kind: Cluster
metadata: {name: edge-1, labels: {region: east, tier: store}}
spec: {tenants: [default, production]}
status: {phase: Connected, lastSeen: 2026-01-08T11:59:30Z}
";

    #[test]
    fn tables_have_kubectl_columns() {
        let objects = parse(OBJECTS);
        let rs = table_for(Kind::RegistrySecret, &objects, false, now());
        assert_eq!(
            rs,
            "NAMESPACE    NAME          DOMAIN               PROVIDER   STATUS      AGE\n\
             production   harbor-prod   harbor.example.com   harbor     Connected   5m\n"
        );
        let repo = table_for(Kind::Repository, &objects, false, now());
        assert_eq!(
            repo,
            "NAMESPACE   NAME    REPOSITORY      TAG      DIGEST                                                                    SYNCED   AGE\n\
             default     nginx   library/nginx   latest   sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef   3/4      2d\n"
        );
        let wide = table_for(Kind::Repository, &objects, true, now());
        assert!(
            wide.starts_with("NAMESPACE   NAME    REPOSITORY      TAG      DIGEST "),
            "{wide}"
        );
        assert!(wide.contains("3/4      2d    30m        -\n"), "{wide}");
        let clusters = table_for(Kind::Cluster, &objects, false, now());
        assert_eq!(
            clusters,
            "NAME     LABELS                   TENANTS              STATUS      LAST-SEEN\n\
             edge-1   region=east,tier=store   default,production   Connected   30s ago\n"
        );
    }

    #[test]
    fn digest_column_says_what_resolution_gave() {
        let base = "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata: {name: a, namespace: default}\nspec: {repository: x/y, tag: v1, registryRef: {name: r}}\n";
        let d = format!("sha256:{}", "b".repeat(64));
        let cases = [
            (String::new(), "<none>".to_owned()),
            (
                "status: {reason: AuthFailed}\n".to_owned(),
                "<AuthFailed>".to_owned(),
            ),
            (
                format!(
                    "status: {{resolved: [{{tag: v1, digest: \"{d}\"}}, {{tag: v2, digest: \"{d}\"}}], stale: true, reason: RateLimited}}\n"
                ),
                format!("{d} (+1) (stale)"),
            ),
        ];
        for (status, want) in cases {
            let objects = parse(&format!("{base}{status}"));
            let Object::Repository(r) = &objects[0] else {
                panic!("a repository")
            };
            assert_eq!(digest_cell(r), want, "{status}");
        }
    }

    #[test]
    fn describe_repository_shows_clusters_with_progress() {
        let objects = parse(OBJECTS);
        let text = describe(&objects[1], now());
        assert!(text.contains("Repository:     library/nginx"), "{text}");
        assert!(
            text.contains("Registry:       default/harbor-prod"),
            "{text}"
        );
        assert!(text.contains("Clusters (3/4 synced):"), "{text}");
        // Two entries for four targets: the hub capped the list.
        assert!(
            text.contains("(2 of 4 clusters listed, those not synced first)"),
            "{text}"
        );
        let edge1 = text
            .lines()
            .find(|l| l.trim_start().starts_with("edge-1"))
            .expect("edge-1 row");
        assert!(
            edge1.contains("Synced") && edge1.contains("100%") && edge1.contains("60m ago"),
            "{edge1}"
        );
        let edge2 = text
            .lines()
            .find(|l| l.trim_start().starts_with("edge-2"))
            .expect("edge-2 row");
        assert!(
            edge2.contains("Syncing")
                && edge2.contains("25%")
                && edge2.contains("copying layer 2 of 4"),
            "{edge2}"
        );
        assert!(
            text.contains(
                "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            )
        );
    }

    #[test]
    fn describe_says_a_pinned_repository_holds_tag_moves_back() {
        let mut objects = parse(OBJECTS);
        assert!(!describe(&objects[1], now()).contains("Pinned:"));
        let Object::Repository(r) = &mut objects[1] else {
            panic!("a Repository")
        };
        let st = r.status.as_mut().expect("status");
        st.pinned_revision = Some(4);
        st.revisions = (1..=5)
            .map(|n| imgfleet::model::Revision {
                revision: n,
                held_back: n == 5,
                ..Default::default()
            })
            .collect();
        let text = describe(&objects[1], now());
        assert!(
            text.contains(
                "Pinned:         revision 4 (rollout undo): tag moves are recorded, not shipped (1 held back), until `imgfleet rollout resume`"
            ),
            "{text}"
        );
    }

    #[test]
    fn describe_says_why_nothing_is_placed_and_what_clusters_hold() {
        let new = format!("sha256:{}", "a".repeat(64));
        let old = format!("sha256:{}", "b".repeat(64));
        let yaml = format!(
            "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\n\
             metadata: {{name: app, namespace: team-z}}\n\
             spec: {{repository: x/app, tag: v1, registryRef: {{name: r}}}}\n\
             status:\n  resolved: [{{tag: v1, digest: \"{new}\"}}]\n  targetClusters: 2\n  clusters:\n\
             \x20 - {{cluster: edge-1, digest: \"{new}\", phase: Pending, heldDigests: [\"{old}\"]}}\n\
             \x20 - {{cluster: edge-2, digest: \"{new}\", phase: Synced, heldDigests: [\"{new}\"]}}\n\
             \x20 - {{cluster: edge-3, digest: \"{new}\", phase: Pending}}\n\
             \x20 placement: {{reason: TenantNotAllowed, message: cluster edge-9 does not allow this namespace}}\n"
        );
        let objects = parse(&yaml);
        let text = describe(&objects[0], now());
        assert!(
            text.contains("Placement:      <none>: every cluster that admits this namespace"),
            "{text}"
        );
        assert!(
            text.contains("Problem:        TenantNotAllowed: cluster edge-9"),
            "{text}"
        );
        assert!(text.contains("WANTED"), "{text}");
        let row = |c: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(c))
                .unwrap_or_else(|| panic!("{c} row in {text}"))
                .to_owned()
        };
        let (short_new, short_old) = (short_digest(&new), short_digest(&old));
        let e1 = row("edge-1");
        assert!(
            e1.contains(&format!("{short_new}   {short_old}   Pending")),
            "{e1}"
        );
        let e2 = row("edge-2");
        assert!(
            e2.contains(&format!("{short_new}   {short_new}   Synced")),
            "{e2}"
        );
        assert!(row("edge-3").contains("<nothing>"));
        let Object::Repository(r) = &objects[0] else {
            panic!("a repository")
        };
        assert_eq!(reason_cell(r), "TenantNotAllowed");

        // Reaching no cluster is said as such.
        let nowhere = yaml
            .replace("targetClusters: 2", "targetClusters: 0")
            .replace(
                "TenantNotAllowed, message: cluster edge-9 does not allow this namespace",
                "NoClusterAdmitsNamespace, message: no cluster admits this namespace",
            );
        let text = describe(&parse(&nowhere)[0], now());
        assert!(
            text.contains("Not placed:     NoClusterAdmitsNamespace: no cluster admits"),
            "{text}"
        );
    }

    #[test]
    fn describe_cluster_lists_what_it_holds() {
        let d = |c: char| format!("\"sha256:{}\"", c.to_string().repeat(64));
        let yaml = format!(
            "apiVersion: image.theriseunion.io/v1alpha1\nkind: Cluster\nmetadata: {{name: edge-1}}\n\
             status:\n  phase: Connected\n  held:\n\
             \x20 - {{registry: r.example, repository: team/app, digests: [{}, {}]}}\n\
             \x20 - {{registry: r.example, repository: team/web, digests: [{}, {}, {}, {}]}}\n",
            d('a'),
            d('b'),
            d('c'),
            d('d'),
            d('e'),
            d('f')
        );
        let text = describe(&parse(&yaml)[0], now());
        assert!(text.contains("Held:\n  REPOSITORY"), "{text}");
        assert!(
            text.contains("r.example/team/app   sha256:aaaaaaaaaaaa, sha256:bbbbbbbbbbbb\n"),
            "{text}"
        );
        assert!(text.contains("r.example/team/web   4 digests\n"), "{text}");
        assert!(!text.contains("holds more"), "{text}");
        let truncated = yaml.replace(
            "  phase: Connected\n",
            "  phase: Connected\n  heldTruncated: true\n",
        );
        let text = describe(&parse(&truncated)[0], now());
        assert!(
            text.contains("(the agent holds more than it reported)"),
            "{text}"
        );
        // An agent that never reported (or an older hub) says so.
        let objects = parse(OBJECTS);
        let text = describe(&objects[2], now());
        assert!(text.contains("Held:           <none reported>"), "{text}");
    }

    #[test]
    fn output_never_shows_the_password() {
        let objects = parse(OBJECTS);
        let yaml = to_yaml(&objects, false).expect("yaml");
        let json = to_json(&objects, false).expect("json");
        let text = describe(&objects[0], now());
        for out in [&yaml, &json, &text] {
            assert!(!out.contains("TopSecret99"), "{out}");
        }
        // What `get -o yaml` prints reads back as the same objects; the
        // RegistrySecret only with a password added, since it is write-only.
        let docs: Vec<&str> = yaml.split("\n---\n").collect();
        assert_eq!(docs.len(), 3, "{yaml}");
        assert!(
            docs[0].contains("username: u") && !docs[0].contains("password"),
            "{yaml}"
        );
        assert_eq!(parse(docs[1]), vec![objects[1].clone()]);
        assert_eq!(parse(docs[2]), vec![objects[2].clone()]);
        let single = to_json(&objects[2..], true).expect("json");
        assert!(single.contains("\"kind\": \"Cluster\""), "{single}");
    }

    #[test]
    fn small_formatters() {
        let t = |s: &str| Some(Time(s.parse().expect("time")));
        assert_eq!(age(t("2026-01-08T11:59:15Z").as_ref(), now()), "45s");
        assert_eq!(age(t("2026-01-08T11:48:00Z").as_ref(), now()), "12m");
        assert_eq!(age(t("2026-01-08T07:00:00Z").as_ref(), now()), "5h");
        assert_eq!(age(t("2026-01-05T12:00:00Z").as_ref(), now()), "3d");
        assert_eq!(age(None, now()), "<unknown>");
        assert_eq!(progress(Some(ImagePhase::Syncing), 1, 3), "33%");
        assert_eq!(progress(Some(ImagePhase::Pending), 0, 0), "-");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 B");
        let sel = parse(
            "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata: {name: a}\nspec:\n  repository: a\n  tag: b\n  registryRef: {name: r}\n  placement:\n    clusterSelector:\n      matchLabels: {region: east}\n      matchExpressions:\n      - {key: tier, operator: In, values: [a, b]}\n      - {key: gone, operator: DoesNotExist}\n",
        );
        let Object::Repository(r) = &sel[0] else {
            panic!()
        };
        let s = r
            .spec
            .placement
            .as_ref()
            .and_then(|p| p.cluster_selector.as_ref())
            .expect("selector");
        assert_eq!(selector_string(s), "region=east,tier in (a,b),!gone");
        assert_eq!(
            apply_line("Repository default/x", pb::ApplyOutcome::Updated, true),
            "Repository default/x configured (dry run)"
        );
    }

    #[test]
    fn rollout_history_marks_what_ships_what_is_held_back_and_where_each_is() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let rev = |n: u32, digest: &str, cause: pb::RevisionCause, user: &str| pb::Revision {
            revision: n,
            resolved: vec![pb::ResolvedTag {
                tag: "1.25".into(),
                digest: digest.to_owned(),
                ..Default::default()
            }],
            first_resolved: Some(prost_types::Timestamp {
                seconds: now().as_second() - 600,
                nanos: 0,
            }),
            cause: cause as i32,
            user: user.into(),
            ..Default::default()
        };
        let mut held = rev(3, &d('c'), pb::RevisionCause::TagMove, "");
        held.held_back = true;
        let mut rollback = rev(4, &d('a'), pb::RevisionCause::Rollback, "bob");
        rollback.rollback_to = 1;
        let h = pb::RolloutHistoryResponse {
            revisions: vec![
                pb::RevisionHistory {
                    revision: Some(rev(1, &d('a'), pb::RevisionCause::Created, "alice")),
                    held_by: vec!["edge-1".into(), "edge-2".into()],
                },
                pb::RevisionHistory {
                    revision: Some(rev(2, &d('b'), pb::RevisionCause::TagMove, "")),
                    held_by: vec!["edge-1".into()],
                },
                pb::RevisionHistory {
                    revision: Some(held),
                    held_by: vec![],
                },
                pb::RevisionHistory {
                    revision: Some(rollback),
                    held_by: vec!["edge-1".into(), "edge-2".into()],
                },
            ],
            current_revision: 4,
            pinned_revision: 4,
            image: "harbor.example.com/library/nginx".into(),
        };
        assert_eq!(
            rollout_history("team-a/nginx", &h, false, now()),
            "repository team-a/nginx (harbor.example.com/library/nginx)\n\
             REVISION   TAGS   DIGESTS               RESOLVED   CAUSE           USER    HELD BY         STATE\n\
             1          1.25   sha256:aaaaaaaaaaaa   10m ago    Created         alice   edge-1,edge-2\n\
             2          1.25   sha256:bbbbbbbbbbbb   10m ago    TagMove         -       edge-1\n\
             3          1.25   sha256:cccccccccccc   10m ago    TagMove         -       <none>          held back\n\
             4          1.25   sha256:aaaaaaaaaaaa   10m ago    Rollback to 1   bob     edge-1,edge-2   shipping (pinned)\n\
             Pinned to revision 4: tag moves are recorded, not shipped, until `imgfleet rollout resume repository nginx -n team-a`.\n"
        );
        let empty = pb::RolloutHistoryResponse {
            image: "r.example/app".into(),
            ..Default::default()
        };
        assert_eq!(
            rollout_history("default/app", &empty, false, now()),
            "repository default/app (r.example/app)\nNo revisions yet: its tags have not resolved.\n"
        );
    }
}
