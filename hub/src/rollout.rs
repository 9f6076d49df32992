//! Rollout history, undo and resume of a Repository, as pure functions over
//! its status.
//!
//! A revision is a set of tags and the digests they resolved to. The
//! resolver records a new one each time a successful resolution differs from
//! the last one the upstream gave ([`record`]); `imgfleet rollout undo`
//! appends a rollback revision with an earlier revision's digests and pins
//! the Repository to it ([`undo`]); `imgfleet rollout resume` unpins it and
//! ships the newest upstream revision again ([`resume`]).
//!
//! What ships is always `status.resolved`, which placement reads: an undo
//! only rewrites it, so the controller sends every cluster the older digest
//! at once, and agents that still hold it (retention keeps the last
//! `keepVersions` versions) switch their tag without fetching anything, with
//! the upstream registry down if need be. While pinned, [`record`] keeps
//! `status.resolved` on the pinned revision, so tag moves are recorded,
//! marked held back, and not shipped.

use imgfleet::model::{
    REVISION_HISTORY_LIMIT, RepositoryStatus, ResolvedTag, Revision, RevisionCause,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Why an undo or resume cannot be done. Each names the Repository.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    #[error("repository {repository} has no revisions yet: its tags have not resolved")]
    NoHistory { repository: String },
    #[error(
        "repository {repository}: revision {wanted} not found; the history holds revisions {first} to {last}"
    )]
    NoSuchRevision {
        repository: String,
        wanted: u32,
        first: u32,
        last: u32,
    },
    #[error(
        "repository {repository}: no earlier revision to undo to; the history holds only what ships now"
    )]
    NoEarlier { repository: String },
    #[error("repository {repository} is not pinned: nothing to resume")]
    NotPinned { repository: String },
}

/// What an undo or resume did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The revision that ships now.
    pub revision: u32,
    /// Whether the status changed (a write is needed).
    pub changed: bool,
    /// One line for the operator and the audit trail.
    pub message: String,
}

/// Whether two resolutions are the same tags at the same digests, in order.
pub fn same_set(a: &[ResolvedTag], b: &[ResolvedTag]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.tag == y.tag && x.digest == y.digest)
}

/// The newest revision the upstream resolved to (not a rollback).
pub fn latest_upstream(revisions: &[Revision]) -> Option<&Revision> {
    latest_upstream_at(revisions).map(|i| &revisions[i])
}

/// Where [`latest_upstream`] is in `revisions`.
fn latest_upstream_at(revisions: &[Revision]) -> Option<usize> {
    revisions
        .iter()
        .rposition(|r| r.cause != RevisionCause::Rollback)
}

/// The revision that ships now: the pinned one, else the newest shipped
/// revision with the digests of `status.resolved`.
pub fn current(status: &RepositoryStatus) -> Option<u32> {
    if let Some(p) = status.pinned_revision {
        return Some(p);
    }
    status
        .revisions
        .iter()
        .rev()
        .find(|r| !r.held_back && same_set(&r.resolved, &status.resolved))
        .map(|r| r.revision)
}

/// Whether recording a resolution at `generation` would make an edit (or the
/// first) revision, so that the caller looks up who made the change in the
/// audit trail first.
pub fn needs_editor(status: Option<&RepositoryStatus>, generation: i64) -> bool {
    match status.and_then(|s| latest_upstream(&s.revisions)) {
        None => true,
        Some(r) => r.generation != generation,
    }
}

fn next_number(revisions: &[Revision]) -> u32 {
    revisions.iter().map(|r| r.revision).max().unwrap_or(0) + 1
}

/// Drops the oldest revisions beyond [`REVISION_HISTORY_LIMIT`], never the
/// pinned one.
fn trim(status: &mut RepositoryStatus) {
    while status.revisions.len() > REVISION_HISTORY_LIMIT {
        let pinned = status.pinned_revision;
        match status
            .revisions
            .iter()
            .position(|r| Some(r.revision) != pinned)
        {
            Some(i) => {
                status.revisions.remove(i);
            }
            None => break,
        }
    }
}

/// Takes in a successful resolution to `upstream` for spec `generation` at
/// `at`, after the resolver wrote it into `status.resolved`: records a new
/// revision when the digests differ from the last ones the upstream gave
/// (an edit when the generation changed, by `editor`; else a tag move), and,
/// while pinned, puts `status.resolved` back to the pinned revision's.
/// Returns the new revision's number, if any.
pub fn record(
    status: &mut RepositoryStatus,
    upstream: &[ResolvedTag],
    generation: i64,
    at: Option<Time>,
    editor: Option<String>,
) -> Option<u32> {
    let pinned = status.pinned_revision;
    let mut added = None;
    let latest = latest_upstream_at(&status.revisions);
    match latest.map(|i| &mut status.revisions[i]) {
        Some(last) if same_set(&last.resolved, upstream) => {
            // An edit that changed no digest: remember the generation, so
            // that the next tag move is not taken for an edit.
            last.generation = last.generation.max(generation);
        }
        last => {
            let cause = match last {
                None => RevisionCause::Created,
                Some(l) if l.generation != generation => RevisionCause::Edit,
                Some(_) => RevisionCause::TagMove,
            };
            let revision = next_number(&status.revisions);
            status.revisions.push(Revision {
                revision,
                resolved: upstream.to_vec(),
                first_resolved: at,
                cause,
                user: editor.filter(|_| cause != RevisionCause::TagMove),
                generation,
                rollback_to: None,
                held_back: pinned.is_some(),
            });
            added = Some(revision);
        }
    }
    if let Some(p) = pinned {
        match status.revisions.iter().find(|r| r.revision == p) {
            Some(r) => status.resolved = r.resolved.clone(),
            // A pin whose revision is gone (written by hand): unpinned.
            None => status.pinned_revision = None,
        }
    }
    trim(status);
    added
}

/// Pins `repository` to revision `to` (default: the newest shipped revision
/// with other digests than what ships now) by appending a rollback revision
/// with its digests, made by `user` at `at`.
pub fn undo(
    repository: &str,
    status: &mut RepositoryStatus,
    to: Option<u32>,
    user: &str,
    generation: i64,
    at: Option<Time>,
) -> Result<Outcome, RolloutError> {
    let (Some(first), Some(last)) = (status.revisions.first(), status.revisions.last()) else {
        return Err(RolloutError::NoHistory {
            repository: repository.to_owned(),
        });
    };
    let (first, last) = (first.revision, last.revision);
    let target = match to {
        Some(n) => status.revisions.iter().find(|r| r.revision == n).ok_or(
            RolloutError::NoSuchRevision {
                repository: repository.to_owned(),
                wanted: n,
                first,
                last,
            },
        )?,
        None => status
            .revisions
            .iter()
            .rev()
            .find(|r| !r.held_back && !same_set(&r.resolved, &status.resolved))
            .ok_or(RolloutError::NoEarlier {
                repository: repository.to_owned(),
            })?,
    };
    let (number, resolved) = (target.revision, target.resolved.clone());
    if same_set(&resolved, &status.resolved) {
        // Its digests ship already: pin what ships, without a new revision.
        let revision = current(status).unwrap_or(number);
        let changed = status.pinned_revision.is_none();
        status.pinned_revision = Some(revision);
        return Ok(Outcome {
            revision,
            changed,
            message: format!(
                "the digests of revision {number} ship already (revision {revision}); pinned until `imgfleet rollout resume`"
            ),
        });
    }
    let revision = next_number(&status.revisions);
    status.revisions.push(Revision {
        revision,
        resolved: resolved.clone(),
        first_resolved: at,
        cause: RevisionCause::Rollback,
        user: Some(user.to_owned()),
        generation,
        rollback_to: Some(number),
        held_back: false,
    });
    status.resolved = resolved;
    status.pinned_revision = Some(revision);
    trim(status);
    Ok(Outcome {
        revision,
        changed: true,
        message: format!(
            "rolled back to revision {number} (now revision {revision}); pinned until `imgfleet rollout resume`"
        ),
    })
}

/// Unpins `repository`: the newest revision the upstream resolved to ships
/// again (it was held back if tags moved while pinned).
pub fn resume(repository: &str, status: &mut RepositoryStatus) -> Result<Outcome, RolloutError> {
    if status.pinned_revision.is_none() {
        return Err(RolloutError::NotPinned {
            repository: repository.to_owned(),
        });
    }
    status.pinned_revision = None;
    let Some(latest) = latest_upstream_at(&status.revisions).map(|i| &mut status.revisions[i])
    else {
        // Only rollbacks left (the rest trimmed): what ships stays.
        let revision = current(status).unwrap_or_default();
        return Ok(Outcome {
            revision,
            changed: true,
            message: format!("resumed; revision {revision} ships until the tags resolve again"),
        });
    };
    latest.held_back = false;
    let revision = latest.revision;
    status.resolved = latest.resolved.clone();
    Ok(Outcome {
        revision,
        changed: true,
        message: format!(
            "resumed: revision {revision}, the newest the upstream resolved to, ships"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(t: &str, d: &str) -> ResolvedTag {
        ResolvedTag {
            tag: t.into(),
            digest: format!("sha256:{}", d.repeat(64 / d.len())),
            ..Default::default()
        }
    }

    fn status_after(resolutions: &[(&str, i64)]) -> RepositoryStatus {
        let mut s = RepositoryStatus::default();
        for (d, generation) in resolutions {
            let up = vec![tag("1", d)];
            s.resolved = up.clone();
            record(&mut s, &up, *generation, None, Some("alice".into()));
        }
        s
    }

    fn causes(s: &RepositoryStatus) -> Vec<(u32, RevisionCause, Option<&str>, bool)> {
        s.revisions
            .iter()
            .map(|r| (r.revision, r.cause, r.user.as_deref(), r.held_back))
            .collect()
    }

    #[test]
    fn first_resolution_then_tag_moves_then_an_edit() {
        let s = status_after(&[("a", 1), ("a", 1), ("b", 1), ("c", 1), ("d", 2)]);
        assert_eq!(
            causes(&s),
            vec![
                (1, RevisionCause::Created, Some("alice"), false),
                (2, RevisionCause::TagMove, None, false),
                (3, RevisionCause::TagMove, None, false),
                (4, RevisionCause::Edit, Some("alice"), false),
            ]
        );
        assert_eq!(current(&s), Some(4));
    }

    #[test]
    fn an_edit_that_changes_no_digest_does_not_make_the_next_move_an_edit() {
        let s = status_after(&[("a", 1), ("a", 2), ("b", 2)]);
        assert_eq!(causes(&s)[1].1, RevisionCause::TagMove);
    }

    #[test]
    fn undo_pins_the_older_digests_and_tag_moves_are_held_back_until_resume() {
        let mut s = status_after(&[("a", 1), ("b", 1), ("c", 1)]);
        let o = undo("ns/app", &mut s, Some(1), "bob", 1, None).unwrap();
        assert_eq!(o.revision, 4);
        assert!(o.changed);
        assert_eq!(s.resolved, vec![tag("1", "a")]);
        assert_eq!(s.pinned_revision, Some(4));
        assert_eq!(s.revisions[3].rollback_to, Some(1));
        assert_eq!(s.revisions[3].user.as_deref(), Some("bob"));

        // The resolver finds the tag where it was: nothing new, still pinned.
        let up = vec![tag("1", "c")];
        s.resolved = up.clone();
        assert_eq!(record(&mut s, &up, 1, None, None), None);
        assert_eq!(s.resolved, vec![tag("1", "a")]);

        // The tag moves upstream: recorded, held back, not shipped.
        let up = vec![tag("1", "d")];
        s.resolved = up.clone();
        assert_eq!(record(&mut s, &up, 1, None, None), Some(5));
        assert!(s.revisions[4].held_back);
        assert_eq!(s.resolved, vec![tag("1", "a")]);
        assert_eq!(current(&s), Some(4));

        let o = resume("ns/app", &mut s).unwrap();
        assert_eq!(o.revision, 5);
        assert_eq!(s.resolved, vec![tag("1", "d")]);
        assert_eq!(s.pinned_revision, None);
        assert!(!s.revisions[4].held_back);
        assert_eq!(current(&s), Some(5));
    }

    #[test]
    fn undo_without_a_revision_goes_to_the_previous_shipped_digests() {
        let mut s = status_after(&[("a", 1), ("b", 1)]);
        undo("ns/app", &mut s, None, "bob", 1, None).unwrap();
        assert_eq!(s.resolved, vec![tag("1", "a")]);
        // Again: back to b, like kubectl's undo.
        undo("ns/app", &mut s, None, "bob", 1, None).unwrap();
        assert_eq!(s.resolved, vec![tag("1", "b")]);
        assert_eq!(s.pinned_revision, Some(4));
    }

    #[test]
    fn errors_name_the_repository_and_what_exists() {
        let mut empty = RepositoryStatus::default();
        assert_eq!(
            undo("ns/app", &mut empty, None, "bob", 1, None)
                .unwrap_err()
                .to_string(),
            "repository ns/app has no revisions yet: its tags have not resolved"
        );
        let mut s = status_after(&[("a", 1), ("b", 1)]);
        assert_eq!(
            undo("ns/app", &mut s, Some(9), "bob", 1, None)
                .unwrap_err()
                .to_string(),
            "repository ns/app: revision 9 not found; the history holds revisions 1 to 2"
        );
        let mut one = status_after(&[("a", 1)]);
        assert!(matches!(
            undo("ns/app", &mut one, None, "bob", 1, None),
            Err(RolloutError::NoEarlier { .. })
        ));
        assert!(matches!(
            resume("ns/app", &mut s),
            Err(RolloutError::NotPinned { .. })
        ));
        // Nothing was changed by the failures.
        assert_eq!(s, status_after(&[("a", 1), ("b", 1)]));
    }

    #[test]
    fn history_is_bounded_and_keeps_the_pinned_revision() {
        let mut s2 = status_after(&[("a", 1), ("b", 1)]);
        undo("ns/app", &mut s2, Some(1), "bob", 1, None).unwrap();
        let pinned = s2.pinned_revision.unwrap();
        for (i, d) in "cdefghijklmnop".chars().enumerate() {
            let up = vec![tag("1", &d.to_string())];
            s2.resolved = up.clone();
            record(&mut s2, &up, 1, None, None);
            assert!(s2.revisions.len() <= REVISION_HISTORY_LIMIT, "after {i}");
        }
        assert!(s2.revisions.iter().any(|r| r.revision == pinned));
        assert_eq!(s2.resolved, vec![tag("1", "a")]);
    }

    #[test]
    fn undo_to_what_ships_pins_it_without_a_new_revision() {
        let mut s = status_after(&[("a", 1), ("b", 1)]);
        let o = undo("ns/app", &mut s, Some(2), "bob", 1, None).unwrap();
        assert!(o.changed);
        assert_eq!((o.revision, s.pinned_revision), (2, Some(2)));
        assert_eq!(s.revisions.len(), 2);
    }

    #[test]
    fn undo_to_what_ships_while_pinned_changes_nothing() {
        let mut s = status_after(&[("a", 1), ("b", 1)]);
        undo("ns/app", &mut s, Some(1), "bob", 1, None).unwrap();
        let before = s.clone();
        let o = undo("ns/app", &mut s, Some(1), "bob", 1, None).unwrap();
        assert!(!o.changed);
        assert_eq!(s, before);
    }
}
