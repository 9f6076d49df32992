//! One list-then-watch loop for every reader of the store: the desired-set
//! controller, the desired-set cache, the tag resolver and the admin API's
//! Watch all follow a kind through [`Watcher`].
//!
//! It is written as a state machine after kube-runtime's `watcher.rs`: the
//! [`State`] says what the next step does (list, open a watch from the listed
//! revision, or take the next event), and the pure [`step`] holds every
//! recovery rule in one match, so a table of cases tests them. A compacted
//! history is the only reason to list again: any other failure resumes the
//! watch from the last revision delivered, which replays what was missed.
//!
//! The watcher never sleeps. It hands every failure to its caller as an
//! `Err`, and the caller waits as it sees fit (see [`crate::retry`]) before
//! asking for the next event.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{PolicyStore, StoreError, Versioned, WatchEvent, WatchStream};
use crate::retry::Retry;

/// What a reader of one kind is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every object of the kind as it stood at `revision`, sorted by key.
    /// It replaces whatever the reader held: objects it held that are not
    /// here were deleted while no watch ran.
    Listed {
        items: Vec<Versioned>,
        revision: u64,
    },
    /// Created or updated (`create_revision == revision` means created).
    Put(Versioned),
    /// Deleted; the value is the last one before the deletion.
    Delete(Versioned),
}

/// Why the watcher could not go on; it is ready to try again on the next
/// call. Every variant is worth a retry: [`WatchError::relists`] says whether
/// the next step lists the kind again.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// Listing the kind failed.
    #[error("listing {kind}: {source}")]
    List {
        kind: &'static str,
        #[source]
        source: StoreError,
    },
    /// Opening a watch from `revision` failed.
    #[error("watching {kind} after revision {revision}: {source}")]
    Open {
        kind: &'static str,
        revision: u64,
        #[source]
        source: StoreError,
    },
    /// An open watch broke after delivering `revision`.
    #[error("the watch of {kind} broke after revision {revision}: {source}")]
    Broke {
        kind: &'static str,
        revision: u64,
        #[source]
        source: StoreError,
    },
    /// An open watch ended without an error.
    #[error("the watch of {kind} ended after revision {revision}")]
    Ended { kind: &'static str, revision: u64 },
}

impl WatchError {
    /// The store's error, if the store gave one.
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            WatchError::List { source, .. }
            | WatchError::Open { source, .. }
            | WatchError::Broke { source, .. } => Some(source),
            WatchError::Ended { .. } => None,
        }
    }

    /// True when the history the watch needed is gone: the next step lists
    /// the kind again, and the reader gets an [`Event::Listed`].
    pub fn relists(&self) -> bool {
        matches!(self.store_error(), Some(StoreError::Compacted { .. }))
            || matches!(self, WatchError::List { .. })
    }
}

/// Where the watcher stands, which says what its next step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Nothing is known: the next step lists the kind.
    Empty,
    /// Everything up to `revision` is known: the next step opens a watch
    /// after it.
    Listed { revision: u64 },
    /// A watch is open and has delivered everything up to `revision`: the
    /// next step takes its next event.
    Watching { revision: u64 },
}

/// What the store answered to the step a [`State`] asked for.
#[derive(Debug)]
pub enum Outcome {
    /// The answer to a list (from [`State::Empty`]).
    Listed(Result<(Vec<Versioned>, u64), StoreError>),
    /// Whether a watch opened (from [`State::Listed`]).
    Opened(Result<(), StoreError>),
    /// The open watch's next item (from [`State::Watching`]).
    Next(Option<Result<WatchEvent, StoreError>>),
}

/// The next state, and what to tell the reader, when a step of `state` came
/// back with `outcome`. Pure: every recovery rule is here.
///
/// - A list moves to `Listed` and tells the whole kind; a failed list stays
///   `Empty`.
/// - A compacted history, when opening a watch or from an open one, goes
///   back to `Empty`: only a new list can say what changed.
/// - Any other failure, and a watch that just ends, goes back to `Listed` at
///   the last revision delivered: the next watch replays what was missed.
///   (etcd delivers the events of one revision, such as a batch, in one
///   response, and the store yields all of a response before it can fail,
///   so a revision is never half delivered.)
pub fn step(
    kind: &'static str,
    state: State,
    outcome: Outcome,
) -> (State, Option<Result<Event, WatchError>>) {
    match (state, outcome) {
        (State::Empty, Outcome::Listed(Ok((items, revision)))) => (
            State::Listed { revision },
            Some(Ok(Event::Listed { items, revision })),
        ),
        (State::Empty, Outcome::Listed(Err(source))) => {
            (State::Empty, Some(Err(WatchError::List { kind, source })))
        }
        (State::Listed { revision }, Outcome::Opened(Ok(()))) => {
            (State::Watching { revision }, None)
        }
        (State::Listed { revision }, Outcome::Opened(Err(source))) => (
            after_failure(&source, revision),
            Some(Err(WatchError::Open {
                kind,
                revision,
                source,
            })),
        ),
        (State::Watching { revision }, Outcome::Next(Some(Ok(event)))) => {
            let (seen, event) = match event {
                WatchEvent::Put(v) => (v.revision, Event::Put(v)),
                WatchEvent::Delete(v) => (v.revision, Event::Delete(v)),
            };
            let revision = revision.max(seen);
            (State::Watching { revision }, Some(Ok(event)))
        }
        (State::Watching { revision }, Outcome::Next(Some(Err(source)))) => (
            after_failure(&source, revision),
            Some(Err(WatchError::Broke {
                kind,
                revision,
                source,
            })),
        ),
        (State::Watching { revision }, Outcome::Next(None)) => (
            State::Listed { revision },
            Some(Err(WatchError::Ended { kind, revision })),
        ),
        // The driver asks each state only for its own outcome; any other
        // pairing changes nothing.
        (state, _) => (state, None),
    }
}

/// Where a watch that failed after `revision` goes on: a compacted history
/// lists again, anything else opens a watch after `revision` again.
fn after_failure(source: &StoreError, revision: u64) -> State {
    match source {
        StoreError::Compacted { .. } => State::Empty,
        _ => State::Listed { revision },
    }
}

/// Follows one kind of the store: [`Watcher::next`] gives its events, one
/// [`Event::Listed`] first. Cancel-safe: a `next` dropped half-way (in a
/// `select!`) loses nothing, and the next call takes the same step again.
pub struct Watcher {
    /// Where the events come from.
    store: Arc<dyn PolicyStore>,
    /// The kind followed.
    kind: &'static str,
    /// What the next step does.
    state: State,
    /// The open watch while `state` is [`State::Watching`].
    stream: Option<WatchStream>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("kind", &self.kind)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// A watcher of `kind` that starts with a list.
    pub fn new(store: Arc<dyn PolicyStore>, kind: &'static str) -> Watcher {
        Watcher {
            store,
            kind,
            state: State::Empty,
            stream: None,
        }
    }

    /// A watcher of `kind` that goes on after `revision`, which the caller
    /// read itself: the first step opens a watch instead of listing.
    pub fn after(store: Arc<dyn PolicyStore>, kind: &'static str, revision: u64) -> Watcher {
        Watcher {
            store,
            kind,
            state: State::Listed { revision },
            stream: None,
        }
    }

    /// Opens the watch now if the next step would open it, so that a failure
    /// to open is the caller's to answer before any event (the admin API
    /// answers a compacted revision with RELIST). Tells no event: in any
    /// other state it does nothing.
    pub async fn open(&mut self) -> Result<(), WatchError> {
        if !matches!(self.state, State::Listed { .. }) {
            return Ok(());
        }
        match self.take_step().await {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Where the watcher stands.
    pub fn state(&self) -> State {
        self.state
    }

    /// The next event, or why there is none yet; call again to go on.
    pub async fn next(&mut self) -> Result<Event, WatchError> {
        loop {
            if let Some(out) = self.take_step().await {
                return out;
            }
        }
    }

    /// The watcher as a stream that never ends by itself.
    pub fn into_stream(self) -> impl Stream<Item = Result<Event, WatchError>> + Send {
        futures::stream::unfold(self, |mut w| async move {
            let item = w.next().await;
            Some((item, w))
        })
    }

    /// One step of the state machine: the I/O its state asks for, then
    /// [`step`].
    async fn take_step(&mut self) -> Option<Result<Event, WatchError>> {
        let outcome = match self.state {
            State::Empty => Outcome::Listed(self.store.list(self.kind, None).await),
            State::Listed { revision } => match self.store.watch(self.kind, revision).await {
                Ok(stream) => {
                    self.stream = Some(stream);
                    Outcome::Opened(Ok(()))
                }
                Err(e) => Outcome::Opened(Err(e)),
            },
            State::Watching { .. } => match self.stream.as_mut() {
                Some(stream) => Outcome::Next(stream.next().await),
                None => Outcome::Next(None),
            },
        };
        let (state, out) = step(self.kind, self.state, outcome);
        if !matches!(state, State::Watching { .. }) {
            self.stream = None;
        }
        self.state = state;
        out
    }
}

/// Waits out `error` of `watcher` with `retry`, then opens the watch again
/// if that is the next step, retrying that too: a kind that stays idle may
/// bring no event for hours, and the caller should still learn (and log)
/// at once that the store works again. False when `shutdown` came first.
pub async fn recover(
    watcher: &mut Watcher,
    mut error: WatchError,
    retry: &mut Retry,
    shutdown: &CancellationToken,
) -> bool {
    loop {
        if !retry.wait_after(&error, shutdown).await {
            return false;
        }
        match watcher.open().await {
            Ok(()) => {
                if matches!(watcher.state(), State::Watching { .. }) {
                    retry.succeeded();
                }
                return true;
            }
            Err(e) => error = e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Key;

    fn v(name: &str, revision: u64) -> Versioned {
        Versioned {
            key: Key::new("repositories", "default", name),
            value: b"{}".to_vec(),
            revision,
            create_revision: revision,
        }
    }

    fn compacted() -> StoreError {
        StoreError::Compacted {
            requested: 3,
            oldest: 7,
        }
    }

    fn down() -> StoreError {
        StoreError::Unavailable("etcd is down".into())
    }

    /// What a step told the reader, reduced to compare in a table.
    #[derive(Debug, PartialEq)]
    enum Told {
        Nothing,
        Listed(usize, u64),
        Put(u64),
        Delete(u64),
        Failed { relists: bool },
    }

    fn told(out: Option<Result<Event, WatchError>>) -> Told {
        match out {
            None => Told::Nothing,
            Some(Ok(Event::Listed { items, revision })) => Told::Listed(items.len(), revision),
            Some(Ok(Event::Put(v))) => Told::Put(v.revision),
            Some(Ok(Event::Delete(v))) => Told::Delete(v.revision),
            Some(Err(e)) => Told::Failed {
                relists: e.relists(),
            },
        }
    }

    #[test]
    fn every_recovery_rule() {
        use State::*;
        let cases: Vec<(&str, State, Outcome, State, Told)> = vec![
            (
                "a list tells the whole kind",
                Empty,
                Outcome::Listed(Ok((vec![v("a", 4), v("b", 5)], 9))),
                Listed { revision: 9 },
                Told::Listed(2, 9),
            ),
            (
                "a failed list lists again",
                Empty,
                Outcome::Listed(Err(down())),
                Empty,
                Told::Failed { relists: true },
            ),
            (
                "an opened watch tells nothing",
                Listed { revision: 9 },
                Outcome::Opened(Ok(())),
                Watching { revision: 9 },
                Told::Nothing,
            ),
            (
                "a watch that cannot open is tried again from the same revision",
                Listed { revision: 9 },
                Outcome::Opened(Err(down())),
                Listed { revision: 9 },
                Told::Failed { relists: false },
            ),
            (
                "a revision compacted away before the watch opened: list again",
                Listed { revision: 3 },
                Outcome::Opened(Err(compacted())),
                Empty,
                Told::Failed { relists: true },
            ),
            (
                "a put moves the revision on",
                Watching { revision: 9 },
                Outcome::Next(Some(Ok(WatchEvent::Put(v("a", 11))))),
                Watching { revision: 11 },
                Told::Put(11),
            ),
            (
                "a delete moves the revision on",
                Watching { revision: 11 },
                Outcome::Next(Some(Ok(WatchEvent::Delete(v("a", 12))))),
                Watching { revision: 12 },
                Told::Delete(12),
            ),
            (
                "the revision never goes back",
                Watching { revision: 12 },
                Outcome::Next(Some(Ok(WatchEvent::Put(v("b", 10))))),
                Watching { revision: 12 },
                Told::Put(10),
            ),
            (
                "a broken watch resumes after the last revision delivered",
                Watching { revision: 12 },
                Outcome::Next(Some(Err(down()))),
                Listed { revision: 12 },
                Told::Failed { relists: false },
            ),
            (
                "a watch that ends resumes too",
                Watching { revision: 12 },
                Outcome::Next(None),
                Listed { revision: 12 },
                Told::Failed { relists: false },
            ),
            (
                "a watch compacted under it: list again",
                Watching { revision: 12 },
                Outcome::Next(Some(Err(compacted()))),
                Empty,
                Told::Failed { relists: true },
            ),
            (
                "an outcome of another state changes nothing",
                Empty,
                Outcome::Opened(Ok(())),
                Empty,
                Told::Nothing,
            ),
        ];
        for (name, state, outcome, want_state, want_told) in cases {
            let (next, out) = step("repositories", state, outcome);
            assert_eq!((next, told(out)), (want_state, want_told), "{name}");
        }
    }

    #[test]
    fn errors_name_the_kind_and_the_revision() {
        let (_, out) = step(
            "desiredsets",
            State::Watching { revision: 12 },
            Outcome::Next(Some(Err(down()))),
        );
        let e = out.expect("told").expect_err("an error");
        assert_eq!(
            e.to_string(),
            "the watch of desiredsets broke after revision 12: store unavailable: etcd is down"
        );
        assert!(matches!(e.store_error(), Some(StoreError::Unavailable(_))));
    }
}
