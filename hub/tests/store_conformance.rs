//! One conformance suite for the policy store, run against a real etcd and
//! against the embedded redb store: both backends must behave the same.
//!
//! Every case is an `async fn(&Backend)`; the `conformance!` macro
//! instantiates each case once per backend. Backend-specific durability cases
//! (redb reopen, etcd restart and outage) follow at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use imgfleet_hub::store::watcher::{Event, State, Watcher};
use imgfleet_hub::store::{
    self, EtcdStore, Key, MAX_BATCH_PUTS, PolicyStore, Put, RedbStore, StoreError, WatchEvent,
    WatchStream, Write,
};
use imgfleet_tests::Etcd;

/// How long one watch event may take to arrive.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

// One per test: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Etcd {
        etcd: Etcd,
        store: EtcdStore,
    },
    Redb {
        _dir: tempfile::TempDir,
        store: RedbStore,
    },
}

struct Backend {
    store: Arc<dyn PolicyStore>,
    kind: Kind,
}

impl Backend {
    async fn etcd() -> Result<Backend> {
        let etcd = Etcd::start().await?;
        // A unique prefix per test, so nothing depends on a fresh etcd.
        let prefix = format!("/conformance-{}", std::process::id());
        let store = EtcdStore::connect(&[etcd.endpoint()], &prefix)
            .await
            .context("connect to etcd")?;
        Ok(Backend {
            store: Arc::new(store.clone()),
            kind: Kind::Etcd { etcd, store },
        })
    }

    async fn redb() -> Result<Backend> {
        let dir = tempfile::tempdir()?;
        let store = RedbStore::open(&dir.path().join("policy.redb")).await?;
        Ok(Backend {
            store: Arc::new(store.clone()),
            kind: Kind::Redb { _dir: dir, store },
        })
    }

    /// Makes every revision at or below `revision` too old to replay.
    async fn compact(&self, revision: u64) -> Result<()> {
        match &self.kind {
            Kind::Etcd { store, .. } => store.compact(revision).await?,
            Kind::Redb { store, .. } => store.compact(revision).await?,
        }
        Ok(())
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod etcd {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    super::$case(&super::Backend::etcd().await?).await
                }
            )*
        }
        mod redb {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    super::$case(&super::Backend::redb().await?).await
                }
            )*
        }
    };
}

conformance!(
    create_then_get,
    create_twice_is_already_exists,
    update_checks_revision,
    delete_with_and_without_precondition,
    list_by_kind_and_namespace_sorted,
    revisions_grow_store_wide,
    watch_replays_then_goes_live,
    watch_from_compacted_revision_is_refused,
    concurrent_updates_exactly_one_wins,
    cluster_scoped_keys_round_trip,
    batch_writes_all_and_watchers_see_each,
    batch_with_one_bad_precondition_writes_nothing,
    batch_limits_are_enforced,
    list_pages_through_a_large_kind,
    watcher_lists_then_follows,
    watcher_relists_when_the_history_is_gone,
    commit_stores_the_change_and_its_record_together,
    commit_with_a_failed_precondition_stores_neither,
    commit_without_writes_stores_the_record,
);

fn key(ns: &str, name: &str) -> Key {
    Key::new("repositories", ns, name)
}

async fn next_event(w: &mut WatchStream) -> Result<WatchEvent> {
    match tokio::time::timeout(EVENT_TIMEOUT, w.next()).await {
        Err(_) => bail!("no watch event within {EVENT_TIMEOUT:?}"),
        Ok(None) => bail!("watch stream ended"),
        Ok(Some(r)) => Ok(r?),
    }
}

/// Asserts that no further event arrives within a short time.
async fn no_event(w: &mut WatchStream) -> Result<()> {
    match tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        Err(_) => Ok(()),
        Ok(other) => bail!("expected no event, got {other:?}"),
    }
}

async fn create_then_get(b: &Backend) -> Result<()> {
    let s = &b.store;
    let k = key("team-a", "nginx");
    ensure!(s.get(&k).await?.is_none(), "absent key must read as None");
    let rev = s.create(&k, b"v1".to_vec()).await?;
    let got = s.get(&k).await?.context("created key must be readable")?;
    assert_eq!(got.key, k);
    assert_eq!(got.value, b"v1");
    assert_eq!(got.revision, rev);
    assert_eq!(got.create_revision, rev);
    assert_eq!(s.revision().await?, rev);
    Ok(())
}

async fn create_twice_is_already_exists(b: &Backend) -> Result<()> {
    let s = &b.store;
    let k = key("team-a", "nginx");
    let rev = s.create(&k, b"v1".to_vec()).await?;
    match s.create(&k, b"v2".to_vec()).await {
        Err(StoreError::AlreadyExists(got)) => assert_eq!(got, k),
        other => bail!("second create: expected AlreadyExists, got {other:?}"),
    }
    let got = s.get(&k).await?.context("key vanished")?;
    assert_eq!((got.value.as_slice(), got.revision), (&b"v1"[..], rev));
    Ok(())
}

async fn update_checks_revision(b: &Backend) -> Result<()> {
    let s = &b.store;
    let k = key("team-a", "nginx");
    let r1 = s.create(&k, b"v1".to_vec()).await?;
    let r2 = s.update(&k, b"v2".to_vec(), Some(r1)).await?;
    ensure!(r2 > r1, "update revision {r2} must exceed {r1}");
    let got = s.get(&k).await?.context("missing after update")?;
    assert_eq!(
        (got.value.as_slice(), got.revision, got.create_revision),
        (&b"v2"[..], r2, r1)
    );

    match s.update(&k, b"stale".to_vec(), Some(r1)).await {
        Err(StoreError::Conflict {
            key: ck,
            expected,
            actual,
        }) => {
            assert_eq!(ck, k);
            assert_eq!(expected, r1);
            assert_eq!(actual, r2, "conflict must report the stored revision");
        }
        other => bail!("stale update: expected Conflict, got {other:?}"),
    }
    assert_eq!(s.get(&k).await?.context("missing")?.value, b"v2");

    // Without a precondition the update is unconditional.
    let r3 = s.update(&k, b"v3".to_vec(), None).await?;
    ensure!(r3 > r2);

    let missing = key("team-a", "absent");
    for expected in [None, Some(r3)] {
        match s.update(&missing, b"x".to_vec(), expected).await {
            Err(StoreError::NotFound(got)) => assert_eq!(got, missing),
            other => {
                bail!("update of a missing key ({expected:?}): expected NotFound, got {other:?}")
            }
        }
    }
    ensure!(
        s.get(&missing).await?.is_none(),
        "a failed update must not create"
    );
    Ok(())
}

async fn delete_with_and_without_precondition(b: &Backend) -> Result<()> {
    let s = &b.store;
    let a = key("team-a", "a");
    let c = key("team-a", "c");
    let ra = s.create(&a, b"A".to_vec()).await?;
    let rc = s.create(&c, b"C".to_vec()).await?;

    match s.delete(&a, Some(ra + 100)).await {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (ra + 100, ra)),
        other => bail!("delete with a stale revision: expected Conflict, got {other:?}"),
    }
    ensure!(
        s.get(&a).await?.is_some(),
        "a refused delete must keep the object"
    );

    let gone = s.delete(&a, Some(ra)).await?;
    assert_eq!(
        (gone.key.clone(), gone.value.as_slice()),
        (a.clone(), &b"A"[..])
    );
    assert_eq!(gone.create_revision, ra);
    ensure!(gone.revision > rc, "the deletion gets a new revision");
    ensure!(s.get(&a).await?.is_none());
    assert_eq!(s.revision().await?, gone.revision);

    let gone = s.delete(&c, None).await?;
    assert_eq!(gone.value, b"C");
    ensure!(s.get(&c).await?.is_none());

    for expected in [None, Some(rc)] {
        match s.delete(&c, expected).await {
            Err(StoreError::NotFound(got)) => assert_eq!(got, c),
            other => bail!("delete of a missing key: expected NotFound, got {other:?}"),
        }
    }
    // Re-creating a deleted key starts a new life.
    let again = s.create(&c, b"C2".to_vec()).await?;
    assert_eq!(
        s.get(&c).await?.context("recreated")?.create_revision,
        again
    );
    Ok(())
}

async fn list_by_kind_and_namespace_sorted(b: &Backend) -> Result<()> {
    let s = &b.store;
    // Written out of order, with namespaces whose raw byte order differs
    // from Key order ("a" < "a-b" but "a/" > "a-b/").
    let keys = [
        key("a-b", "x"),
        key("a", "z"),
        key("a", "b"),
        key("b", "a"),
        key("a", "a-1"),
    ];
    for k in &keys {
        s.create(k, k.name.as_bytes().to_vec()).await?;
    }
    s.create(&Key::new("registrysecrets", "a", "other"), b"s".to_vec())
        .await?;
    s.create(&Key::new("repositoriesx", "a", "near"), b"s".to_vec())
        .await?;
    let last = s.revision().await?;

    let (all, rev) = s.list("repositories", None).await?;
    let mut want: Vec<Key> = keys.to_vec();
    want.sort();
    assert_eq!(all.iter().map(|v| v.key.clone()).collect::<Vec<_>>(), want);
    ensure!(
        rev >= last,
        "list revision {rev} older than the last write {last}"
    );
    for v in &all {
        assert_eq!(v.value, v.key.name.as_bytes());
    }

    let (in_a, _) = s.list("repositories", Some("a")).await?;
    assert_eq!(
        in_a.iter().map(|v| v.key.name.as_str()).collect::<Vec<_>>(),
        ["a-1", "b", "z"]
    );
    let (in_ab, _) = s.list("repositories", Some("a-b")).await?;
    assert_eq!(in_ab.len(), 1);
    let (none, _) = s.list("repositories", Some("zzz")).await?;
    ensure!(none.is_empty());
    let (secrets, _) = s.list("registrysecrets", None).await?;
    assert_eq!(secrets.len(), 1);
    let (unknown, _) = s.list("clusters", None).await?;
    ensure!(unknown.is_empty());
    Ok(())
}

async fn cluster_scoped_keys_round_trip(b: &Backend) -> Result<()> {
    let s = &b.store;
    let edge = Key::new("clusters", "", "edge-1");
    s.create(&edge, b"c".to_vec()).await?;
    s.create(&Key::new("clusters", "", "edge-0"), b"c".to_vec())
        .await?;
    let got = s.get(&edge).await?.context("cluster-scoped get")?;
    assert_eq!(got.key, edge);
    let (all, _) = s.list("clusters", None).await?;
    assert_eq!(
        all.iter().map(|v| v.key.clone()).collect::<Vec<_>>(),
        [Key::new("clusters", "", "edge-0"), edge.clone()]
    );
    let (scoped, _) = s.list("clusters", Some("")).await?;
    assert_eq!(scoped.len(), 2);
    Ok(())
}

async fn revisions_grow_store_wide(b: &Backend) -> Result<()> {
    let s = &b.store;
    let mut last = s.revision().await?;
    for i in 0..5 {
        let k = Key::new(
            if i % 2 == 0 {
                "repositories"
            } else {
                "clusters"
            },
            "",
            format!("n{i}"),
        );
        for rev in [
            s.create(&k, b"1".to_vec()).await?,
            s.update(&k, b"2".to_vec(), None).await?,
            s.delete(&k, None).await?.revision,
        ] {
            ensure!(rev > last, "revision {rev} does not exceed {last}");
            last = rev;
        }
    }
    assert_eq!(s.revision().await?, last);
    // A refused write does not consume a revision visible to readers as a change.
    let k = key("x", "y");
    let _ = s.update(&k, b"x".to_vec(), Some(1)).await;
    ensure!(s.get(&k).await?.is_none());
    Ok(())
}

async fn watch_replays_then_goes_live(b: &Backend) -> Result<()> {
    let s = &b.store;
    let a = key("team-a", "a");
    let c = key("team-b", "c");
    let before = s.create(&key("team-a", "old"), b"old".to_vec()).await?;
    let ra = s.create(&a, b"a1".to_vec()).await?;
    s.create(&Key::new("clusters", "", "noise"), b"n".to_vec())
        .await?;
    let ra2 = s.update(&a, b"a2".to_vec(), Some(ra)).await?;
    let rc = s.create(&c, b"c1".to_vec()).await?;
    let del = s.delete(&a, None).await?;

    let mut w = s.watch("repositories", before).await?;
    let expect = [
        ("put", a.clone(), b"a1".to_vec(), ra, ra),
        ("put", a.clone(), b"a2".to_vec(), ra2, ra),
        ("put", c.clone(), b"c1".to_vec(), rc, rc),
        ("delete", a.clone(), b"a2".to_vec(), del.revision, ra),
    ];
    for (i, want) in expect.iter().enumerate() {
        let ev = next_event(&mut w)
            .await
            .with_context(|| format!("replayed event {i}"))?;
        check_event(&ev, want).with_context(|| format!("replayed event {i}: {ev:?}"))?;
    }

    // Live: a write of another kind is not delivered, ours are, in order.
    s.create(&Key::new("clusters", "", "noise2"), b"n".to_vec())
        .await?;
    let rl = s.create(&key("team-c", "live"), b"l1".to_vec()).await?;
    let rl2 = s
        .update(&key("team-c", "live"), b"l2".to_vec(), Some(rl))
        .await?;
    for (i, want) in [
        ("put", key("team-c", "live"), b"l1".to_vec(), rl, rl),
        ("put", key("team-c", "live"), b"l2".to_vec(), rl2, rl),
    ]
    .iter()
    .enumerate()
    {
        let ev = next_event(&mut w)
            .await
            .with_context(|| format!("live event {i}"))?;
        check_event(&ev, want).with_context(|| format!("live event {i}: {ev:?}"))?;
    }
    no_event(&mut w).await?;

    // A watch from the current revision sees only what comes next.
    let now = s.revision().await?;
    let mut w2 = s.watch("repositories", now).await?;
    no_event(&mut w2).await?;
    let r = s.create(&key("team-c", "next"), b"n".to_vec()).await?;
    check_event(
        &next_event(&mut w2).await?,
        &("put", key("team-c", "next"), b"n".to_vec(), r, r),
    )?;
    Ok(())
}

fn check_event(ev: &WatchEvent, want: &(&str, Key, Vec<u8>, u64, u64)) -> Result<()> {
    let (kind, v) = match ev {
        WatchEvent::Put(v) => ("put", v),
        WatchEvent::Delete(v) => ("delete", v),
    };
    let got = (
        kind,
        v.key.clone(),
        v.value.clone(),
        v.revision,
        v.create_revision,
    );
    ensure!(
        got == (want.0, want.1.clone(), want.2.clone(), want.3, want.4),
        "got {got:?}, want {want:?}"
    );
    Ok(())
}

async fn watch_from_compacted_revision_is_refused(b: &Backend) -> Result<()> {
    let s = &b.store;
    let k = key("team-a", "a");
    let mut rev = s.create(&k, b"0".to_vec()).await?;
    let first = rev;
    for i in 1..6 {
        rev = s.update(&k, format!("{i}").into_bytes(), Some(rev)).await?;
    }
    b.compact(rev - 1).await?;
    match s.watch("repositories", first).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, first);
            ensure!(
                oldest > first,
                "oldest {oldest} must be after the requested {first}"
            );
        }
        Ok(_) => bail!("watch from a compacted revision must fail"),
        Err(e) => bail!("expected Compacted, got {e}"),
    }
    // From the compaction point on, the history is still there.
    let mut w = s.watch("repositories", rev - 1).await?;
    let ev = next_event(&mut w).await?;
    check_event(&ev, &("put", k.clone(), b"5".to_vec(), rev, first))?;
    Ok(())
}

/// The watcher's next event, failing the test on an error or a timeout.
async fn next_change(w: &mut Watcher) -> Result<Event> {
    match tokio::time::timeout(EVENT_TIMEOUT, w.next()).await {
        Err(_) => bail!("no watcher event within {EVENT_TIMEOUT:?}"),
        Ok(r) => Ok(r?),
    }
}

/// The store's watcher: the whole kind once, then every change in order.
async fn watcher_lists_then_follows(b: &Backend) -> Result<()> {
    let s = &b.store;
    let (a, other) = (key("team-a", "a"), key("team-b", "b"));
    let r1 = s.create(&a, b"1".to_vec()).await?;
    let r2 = s.create(&other, b"2".to_vec()).await?;
    let mut w = Watcher::new(s.clone(), "repositories");
    match next_change(&mut w).await? {
        Event::Listed { items, revision } => {
            let keys: Vec<&Key> = items.iter().map(|v| &v.key).collect();
            ensure!(keys == vec![&a, &other], "listed {keys:?}");
            ensure!(revision >= r2, "listed at {revision}, before {r2}");
        }
        e => bail!("expected the list first, got {e:?}"),
    }
    let r3 = s.update(&a, b"3".to_vec(), Some(r1)).await?;
    let gone = s.delete(&other, None).await?;
    match next_change(&mut w).await? {
        Event::Put(v) => ensure!(v.key == a && v.value == b"3" && v.revision == r3, "{v:?}"),
        e => bail!("expected the update, got {e:?}"),
    }
    match next_change(&mut w).await? {
        Event::Delete(v) => ensure!(v.key == other && v.revision == gone.revision, "{v:?}"),
        e => bail!("expected the delete, got {e:?}"),
    }
    ensure!(
        w.state()
            == State::Watching {
                revision: gone.revision
            },
        "{:?}",
        w.state()
    );
    Ok(())
}

/// A watcher that must go on from a revision compacted away lists the kind
/// again, and follows it from there.
async fn watcher_relists_when_the_history_is_gone(b: &Backend) -> Result<()> {
    let s = &b.store;
    let (a, other) = (key("team-a", "a"), key("team-a", "b"));
    let first = s.create(&a, b"0".to_vec()).await?;
    let mut rev = first;
    for i in 1..6 {
        rev = s.update(&a, format!("{i}").into_bytes(), Some(rev)).await?;
    }
    let rb = s.create(&other, b"b".to_vec()).await?;
    b.compact(rb - 1).await?;

    let mut w = Watcher::after(s.clone(), "repositories", first);
    let e = match w.open().await {
        Err(e) => e,
        Ok(()) => bail!("a watch from a compacted revision must fail"),
    };
    ensure!(
        matches!(e.store_error(), Some(StoreError::Compacted { .. })),
        "{e}"
    );
    ensure!(
        e.relists() && w.state() == State::Empty,
        "{e}: {:?}",
        w.state()
    );
    match next_change(&mut w).await? {
        Event::Listed { items, revision } => {
            let values: Vec<&[u8]> = items.iter().map(|v| v.value.as_slice()).collect();
            ensure!(values == vec![&b"5"[..], &b"b"[..]], "listed {values:?}");
            ensure!(revision >= rb);
        }
        e => bail!("expected a new list, got {e:?}"),
    }
    let r = s.update(&other, b"c".to_vec(), Some(rb)).await?;
    match next_change(&mut w).await? {
        Event::Put(v) => ensure!(v.key == other && v.revision == r, "{v:?}"),
        e => bail!("expected the update after the list, got {e:?}"),
    }
    Ok(())
}

async fn concurrent_updates_exactly_one_wins(b: &Backend) -> Result<()> {
    let k = key("team-a", "contended");
    let r0 = b.store.create(&k, b"0".to_vec()).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = b.store.clone();
        let k = k.clone();
        tasks.spawn(async move { s.update(&k, format!("w{i}").into_bytes(), Some(r0)).await });
    }
    let (mut won, mut conflicts) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok(rev) => won.push(rev),
            Err(StoreError::Conflict { expected, .. }) => {
                assert_eq!(expected, r0);
                conflicts += 1;
            }
            Err(e) => bail!("unexpected error: {e}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one writer wins");
    assert_eq!(conflicts, 7);
    assert_eq!(b.store.get(&k).await?.context("missing")?.revision, won[0]);
    Ok(())
}

// ---- Backend-specific durability and failure cases ----

#[tokio::test]
async fn redb_data_survives_reopen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sub/policy.redb");
    let (r1, r2) = {
        let s = RedbStore::open(&path).await?;
        let r1 = s.create(&key("a", "kept"), b"kept".to_vec()).await?;
        let r2 = s.create(&key("a", "gone"), b"gone".to_vec()).await?;
        s.delete(&key("a", "gone"), Some(r2)).await?;
        (r1, r2)
    };
    let s = RedbStore::open(&path).await?;
    let got = s
        .get(&key("a", "kept"))
        .await?
        .context("lost after reopen")?;
    assert_eq!((got.value.as_slice(), got.revision), (&b"kept"[..], r1));
    ensure!(s.get(&key("a", "gone")).await?.is_none());
    assert_eq!(s.revision().await?, r2 + 1);
    // The change log survives too: a watch replays from before the reopen.
    let mut w = s.watch("repositories", 0).await?;
    let ev = next_event(&mut w).await?;
    check_event(&ev, &("put", key("a", "kept"), b"kept".to_vec(), r1, r1))?;
    // And revisions continue to grow.
    ensure!(s.create(&key("a", "new"), b"n".to_vec()).await? > r2 + 1);
    Ok(())
}

#[tokio::test]
async fn redb_bounded_log_answers_compacted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = RedbStore::open_with_log_capacity(&dir.path().join("p.redb"), 5).await?;
    let k = key("a", "k");
    let mut rev = s.create(&k, b"0".to_vec()).await?;
    for i in 1..10 {
        rev = s.update(&k, format!("{i}").into_bytes(), None).await?;
    }
    match s.watch("repositories", 0).await {
        Err(StoreError::Compacted {
            requested: 0,
            oldest,
        }) => assert_eq!(oldest, rev - 5),
        Ok(_) => bail!("watch from 0 after the log was cut must fail"),
        Err(e) => bail!("expected Compacted, got {e}"),
    }
    let mut w = s.watch("repositories", rev - 5).await?;
    for want in rev - 4..=rev {
        let ev = next_event(&mut w).await?;
        let WatchEvent::Put(v) = ev else {
            bail!("expected put")
        };
        assert_eq!(v.revision, want);
    }
    Ok(())
}

#[tokio::test]
async fn redb_slow_watcher_loses_nothing() -> Result<()> {
    // More writes than the live channel buffers, while the watcher does not
    // read: it must catch up from the change log, in order, without gaps.
    let dir = tempfile::tempdir()?;
    let s = RedbStore::open(&dir.path().join("p.redb")).await?;
    let start = s.revision().await?;
    let mut w = s.watch("repositories", start).await?;
    let k = key("a", "busy");
    let mut rev = s.create(&k, b"0".to_vec()).await?;
    let n = 3000u64;
    for i in 1..n {
        rev = s.update(&k, i.to_string().into_bytes(), Some(rev)).await?;
    }
    for i in 0..n {
        let ev = next_event(&mut w).await?;
        let WatchEvent::Put(v) = ev else {
            bail!("expected put")
        };
        assert_eq!(v.revision, start + 1 + i);
        assert_eq!(v.value, i.to_string().into_bytes());
    }
    no_event(&mut w).await?;
    Ok(())
}

#[tokio::test]
async fn etcd_survives_restart_and_reports_outage() -> Result<()> {
    let mut b = Backend::etcd().await?;
    let s = b.store.clone();
    let k = key("team-a", "durable");
    let r = s.create(&k, b"v".to_vec()).await?;
    let mut w = s.watch("repositories", r).await?;
    let mut watcher = Watcher::after(s.clone(), "repositories", r);
    watcher.open().await?;

    let Kind::Etcd { etcd, .. } = &mut b.kind else {
        bail!("not etcd")
    };
    etcd.kill();

    // The open watch reports the outage instead of going quiet; so does the
    // watcher, which will go on from where it was rather than list again.
    match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
        Ok(Some(Err(StoreError::Unavailable(_)))) => {}
        other => bail!("watch during an outage: expected Err(Unavailable), got {other:?}"),
    }
    match tokio::time::timeout(Duration::from_secs(30), watcher.next()).await {
        Ok(Err(e)) => ensure!(!e.relists(), "an outage is no reason to list again: {e}"),
        other => bail!("watcher during an outage: expected an error, got {other:?}"),
    }
    ensure!(watcher.state() == State::Listed { revision: r });
    // A call while etcd is down fails promptly with Unavailable.
    let t = Instant::now();
    match s.get(&k).await {
        Err(StoreError::Unavailable(msg)) => ensure!(
            msg.contains("127.0.0.1"),
            "message names the endpoint: {msg}"
        ),
        other => bail!("get while etcd is down: expected Unavailable, got {other:?}"),
    }
    match s.create(&key("team-a", "new"), b"x".to_vec()).await {
        Err(StoreError::Unavailable(_)) => {}
        other => bail!("create while etcd is down: expected Unavailable, got {other:?}"),
    }
    ensure!(
        t.elapsed() < Duration::from_secs(15),
        "outage took {:?} to report",
        t.elapsed()
    );

    etcd.restart().await?;
    // The same client reconnects on its own; the data is still there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        match s.get(&k).await {
            Ok(v) => break v,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).context("get after restart"),
        }
    };
    let got = got.context("object lost across the etcd restart")?;
    assert_eq!((got.value.as_slice(), got.revision), (&b"v"[..], r));
    let r2 = s.update(&k, b"v2".to_vec(), Some(r)).await?;
    ensure!(r2 > r);
    // The watcher opens its watch again after `r` and sees the update, with
    // no list in between (retrying while etcd finishes coming back).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout(EVENT_TIMEOUT, watcher.next()).await {
            Ok(Ok(Event::Put(v))) => {
                ensure!(v.revision == r2 && v.value == b"v2", "{v:?}");
                break;
            }
            Ok(Err(e)) if !e.relists() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => bail!("watcher after the restart: expected the update, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn etcd_connect_to_nothing_is_unavailable() -> Result<()> {
    let port = imgfleet_tests::free_port();
    let t = Instant::now();
    match EtcdStore::connect(&[format!("http://127.0.0.1:{port}")], "/x").await {
        Err(StoreError::Unavailable(msg)) => ensure!(msg.contains(&port.to_string()), "{msg}"),
        other => bail!("expected Unavailable, got {other:?}"),
    }
    ensure!(t.elapsed() < Duration::from_secs(15));
    Ok(())
}

fn put(k: &Key, value: &[u8], expected: Option<u64>) -> Put {
    Put {
        key: k.clone(),
        value: value.to_vec(),
        expected,
    }
}

async fn batch_writes_all_and_watchers_see_each(b: &Backend) -> Result<()> {
    let s = &b.store;
    let old = key("team-a", "old");
    let old_rev = s.create(&old, b"v1".to_vec()).await?;
    let mut w = s.watch("repositories", old_rev).await?;
    let fresh: Vec<Key> = (0..MAX_BATCH_PUTS - 1)
        .map(|i| key("team-a", &format!("n{i:03}")))
        .collect();
    let mut puts = vec![put(&old, b"v2", Some(old_rev))];
    puts.extend(fresh.iter().map(|k| put(k, k.name.as_bytes(), None)));
    let revs = s.put_batch(puts).await?;
    assert_eq!(revs.len(), MAX_BATCH_PUTS);
    ensure!(
        revs.windows(2).all(|w| w[0] <= w[1]),
        "revisions out of order: {revs:?}"
    );
    let rev = *revs.last().context("revisions")?;
    ensure!(
        revs[0] > old_rev,
        "batch revision {} must exceed {old_rev}",
        revs[0]
    );
    assert_eq!(s.revision().await?, rev);
    let got = s.get(&old).await?.context("updated key")?;
    assert_eq!(got.value, b"v2");
    assert_eq!(got.create_revision, old_rev);
    assert_eq!(got.revision, revs[0]);
    for (k, r) in fresh.iter().zip(&revs[1..]) {
        let v = s.get(k).await?.context("created key")?;
        assert_eq!(v.value, k.name.as_bytes());
        assert_eq!(v.revision, *r);
    }
    // One event per put, in the batch's order, none of them older than the batch.
    let mut seen = Vec::new();
    for _ in 0..MAX_BATCH_PUTS {
        match next_event(&mut w).await? {
            WatchEvent::Put(v) => seen.push(v.key),
            other => bail!("expected puts, got {other:?}"),
        }
    }
    let mut expected = vec![old.clone()];
    expected.extend(fresh.iter().cloned());
    assert_eq!(seen, expected);
    no_event(&mut w).await?;
    // An empty batch writes nothing.
    ensure!(s.put_batch(Vec::new()).await?.is_empty());
    assert_eq!(s.revision().await?, rev);
    Ok(())
}

async fn batch_with_one_bad_precondition_writes_nothing(b: &Backend) -> Result<()> {
    let s = &b.store;
    let a = key("team-b", "a");
    let a_rev = s.create(&a, b"a1".to_vec()).await?;
    let fresh = key("team-b", "fresh");
    let missing = key("team-b", "missing");
    let before = s.revision().await?;

    // A stale revision: Conflict naming the key, nothing written.
    match s
        .put_batch(vec![
            put(&fresh, b"f", None),
            put(&a, b"a2", Some(a_rev + 100)),
        ])
        .await
    {
        Err(StoreError::Conflict {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(key, a);
            assert_eq!(expected, a_rev + 100);
            assert_eq!(actual, a_rev);
        }
        other => bail!("expected Conflict, got {other:?}"),
    }
    // A create of an existing key: AlreadyExists.
    match s
        .put_batch(vec![put(&fresh, b"f", None), put(&a, b"a2", None)])
        .await
    {
        Err(StoreError::AlreadyExists(k)) => assert_eq!(k, a),
        other => bail!("expected AlreadyExists, got {other:?}"),
    }
    // An update of a missing key: NotFound.
    match s
        .put_batch(vec![put(&fresh, b"f", None), put(&missing, b"m", Some(5))])
        .await
    {
        Err(StoreError::NotFound(k)) => assert_eq!(k, missing),
        other => bail!("expected NotFound, got {other:?}"),
    }
    ensure!(
        s.get(&fresh).await?.is_none(),
        "a refused batch wrote {fresh:?}"
    );
    assert_eq!(s.get(&a).await?.context("a")?.value, b"a1");
    assert_eq!(
        s.revision().await?,
        before,
        "a refused batch moved the revision"
    );
    Ok(())
}

async fn batch_limits_are_enforced(b: &Backend) -> Result<()> {
    let s = &b.store;
    let limit = s.batch_limits().puts;
    let too_many: Vec<Put> = (0..=limit)
        .map(|i| put(&key("team-c", &format!("k{i}")), b"x", None))
        .collect();
    ensure!(
        s.put_batch(too_many.clone()).await.is_err(),
        "a batch over the limit must be refused"
    );
    let k = key("team-c", "twice");
    ensure!(
        s.put_batch(vec![put(&k, b"1", None), put(&k, b"2", None)])
            .await
            .is_err(),
        "a batch naming a key twice must be refused"
    );
    // store::batches splits it into batches the store takes.
    let parts = store::batches(too_many.clone(), s.batch_limits());
    assert_eq!(parts.len(), 2);
    // put_batches does the splitting itself and writes batches concurrently.
    let mut results = Vec::new();
    store::put_batches(s.as_ref(), too_many, |range, r| results.push((range, r))).await;
    assert_eq!(results.len(), 2);
    for (range, r) in results {
        assert_eq!(r?.len(), range.len());
    }
    let (listed, _) = s.list("repositories", Some("team-c")).await?;
    assert_eq!(listed.len(), limit + 1);
    Ok(())
}

async fn list_pages_through_a_large_kind(b: &Backend) -> Result<()> {
    let s = &b.store;
    // More than one etcd page (1000 keys), with values large enough that one
    // response for all would pass the 4 MiB gRPC limit.
    let n = 2_500;
    let value = vec![b'x'; 2_000];
    let puts: Vec<Put> = (0..n)
        .map(|i| {
            put(
                &Key::new("clusters", "", format!("edge-{i:05}")),
                &value,
                None,
            )
        })
        .collect();
    let mut results = Vec::new();
    store::put_batches(s.as_ref(), puts, |_, r| results.push(r)).await;
    for r in results {
        r?;
    }
    let (listed, rev) = s.list("clusters", None).await?;
    assert_eq!(listed.len(), n);
    ensure!(
        listed.windows(2).all(|w| w[0].key < w[1].key),
        "list must be sorted"
    );
    assert_eq!(listed[0].key.name, "edge-00000");
    assert_eq!(listed[n - 1].key.name, format!("edge-{:05}", n - 1));
    ensure!(rev >= listed.iter().map(|v| v.revision).max().unwrap_or(0));
    Ok(())
}

fn audit_key(name: &str) -> Key {
    Key::new("auditevents", "team-a", name)
}

async fn commit_stores_the_change_and_its_record_together(b: &Backend) -> Result<()> {
    let s = &b.store;
    let a = key("team-a", "a");
    let gone = key("team-a", "gone");
    let a_rev = s.create(&a, b"v1".to_vec()).await?;
    let gone_rev = s.create(&gone, b"bye".to_vec()).await?;
    let mut w = s.watch("repositories", gone_rev).await?;
    let (written, record_rev) = s
        .commit(
            vec![
                Write::Put(put(&a, b"v2", Some(a_rev))),
                Write::Delete {
                    key: gone.clone(),
                    expected: Some(gone_rev),
                },
            ],
            put(&audit_key("r1"), b"record", None),
        )
        .await?;
    assert_eq!(written.len(), 2);
    assert_eq!(written[0].value, b"v2");
    assert_eq!(written[0].create_revision, a_rev);
    assert_eq!(written[1].value, b"bye");
    ensure!(written[1].revision > gone_rev);
    // The record's revision is that of the change's last write.
    assert_eq!(record_rev, written[1].revision);
    let got = s.get(&a).await?.context("a")?;
    assert_eq!(
        (got.value.as_slice(), got.revision),
        (&b"v2"[..], written[0].revision)
    );
    ensure!(s.get(&gone).await?.is_none(), "deleted");
    let rec = s.get(&audit_key("r1")).await?.context("record")?;
    assert_eq!(
        (rec.value.as_slice(), rec.revision),
        (&b"record"[..], record_rev)
    );
    let (records, _) = s.list("auditevents", Some("team-a")).await?;
    assert_eq!(records.len(), 1);
    // Watchers of the changed kind see the change.
    match next_event(&mut w).await? {
        WatchEvent::Put(v) => assert_eq!(v.key, a),
        other => bail!("expected the put, got {other:?}"),
    }
    match next_event(&mut w).await? {
        WatchEvent::Delete(v) => assert_eq!(v.key, gone),
        other => bail!("expected the delete, got {other:?}"),
    }
    // A record key is used once.
    let e = s
        .commit(Vec::new(), put(&audit_key("r1"), b"again", None))
        .await
        .expect_err("record twice");
    ensure!(matches!(e, StoreError::AlreadyExists(_)), "{e:?}");
    Ok(())
}

async fn commit_with_a_failed_precondition_stores_neither(b: &Backend) -> Result<()> {
    let s = &b.store;
    let a = key("team-a", "a");
    let a_rev = s.create(&a, b"v1".to_vec()).await?;
    let before = s.revision().await?;
    let e = s
        .commit(
            vec![Write::Put(put(&a, b"v2", Some(a_rev + 100)))],
            put(&audit_key("r2"), b"record", None),
        )
        .await
        .expect_err("stale");
    ensure!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    let e = s
        .commit(
            vec![Write::Delete {
                key: key("team-a", "missing"),
                expected: None,
            }],
            put(&audit_key("r3"), b"record", None),
        )
        .await
        .expect_err("missing");
    ensure!(matches!(e, StoreError::NotFound(_)), "{e:?}");
    let e = s
        .commit(
            vec![Write::Put(put(&a, b"v2", None))],
            put(&audit_key("r4"), b"record", None),
        )
        .await
        .expect_err("exists");
    ensure!(matches!(e, StoreError::AlreadyExists(_)), "{e:?}");
    assert_eq!(s.get(&a).await?.context("a")?.value, b"v1");
    let (records, _) = s.list("auditevents", None).await?;
    ensure!(
        records.is_empty(),
        "no record without its change: {records:?}"
    );
    assert_eq!(s.revision().await?, before);
    Ok(())
}

async fn commit_without_writes_stores_the_record(b: &Backend) -> Result<()> {
    let s = &b.store;
    let before = s.revision().await?;
    let (written, rev) = s
        .commit(Vec::new(), put(&audit_key("denied"), b"record", None))
        .await?;
    ensure!(written.is_empty());
    ensure!(rev > before, "a record alone takes a new revision");
    assert_eq!(
        s.get(&audit_key("denied"))
            .await?
            .context("record")?
            .revision,
        rev
    );
    Ok(())
}
