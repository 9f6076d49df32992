//! The offline sweeper: marks clusters Offline whose agent was not heard for
//! `--offline-after` by any replica, and flags their image entries in every
//! Repository as last known.

use std::time::{Duration, Instant};

use imgfleet::model::{self, DEFAULT_NAMESPACE, Kind, Object};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::live::{LastHeard, now};
use crate::objects::{ObjectError, Objects};
use crate::retry::Retry;
use crate::status;

/// The sweeper of one replica.
#[derive(Debug)]
pub struct Sweeper {
    /// Where the Clusters and Repositories are.
    pub objects: Objects,
    /// Clusters with a session here: heard recently means not offline,
    /// whatever the stored `lastSeen` says.
    pub heard: LastHeard,
    /// `--offline-after`.
    pub offline_after: Duration,
}

impl Sweeper {
    /// Sweeps every quarter of `offline_after` (within 0.2 to 5 s) until
    /// `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let period =
            (self.offline_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = Retry::new("Offline sweep");
        let started = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // After a (re)start, agents that were connected are still
            // finding their way back (backoff, thousands at once); until
            // they had `offline_after` to do so, an old lastSeen proves
            // nothing.
            if started.elapsed() < self.offline_after {
                continue;
            }
            match self.sweep().await {
                Ok(()) => retry.succeeded(),
                Err(e) => {
                    if !retry.wait_after(&e, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    async fn sweep(&self) -> Result<(), ObjectError> {
        let heard_here = self.heard.ago();
        let offline_after = self.offline_after;
        let (clusters, _) = self.objects.list(Kind::Cluster, None).await?;
        let t = now();
        let mut gone = Vec::new();
        for obj in clusters {
            let Object::Cluster(c) = &obj else { continue };
            let st = c.status.clone().unwrap_or_default();
            let name = obj.name().to_string();
            if st.phase != Some(model::ClusterPhase::Connected)
                || heard_here.get(&name).is_some_and(|d| *d < offline_after)
                || !status::is_overdue(st.last_seen.as_ref(), &t, offline_after)
            {
                continue;
            }
            let changed = self
                .objects
                .update_status(Kind::Cluster, None, &name, |o| {
                    let Object::Cluster(c) = o else { return false };
                    let prev = c.status.clone().unwrap_or_default();
                    if prev.phase != Some(model::ClusterPhase::Connected)
                        || !status::is_overdue(prev.last_seen.as_ref(), &now(), offline_after)
                    {
                        return false;
                    }
                    c.status = Some(status::offline_status(&prev));
                    true
                })
                .await?;
            if changed {
                warn!(cluster = %name, offline_after = ?offline_after, "Cluster offline: no word from its agent");
                gone.push(name);
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        let (repos, _) = self.objects.list(Kind::Repository, None).await?;
        for obj in repos {
            let ns = obj.namespace().unwrap_or(DEFAULT_NAMESPACE).to_string();
            let name = obj.name().to_string();
            let mark = |o: &mut Object| {
                let Object::Repository(r) = o else {
                    return false;
                };
                let wanted = model::wanted_digests(r);
                let Some(st) = r.status.as_mut() else {
                    return false;
                };
                let mut changed = false;
                for c in &gone {
                    changed |= status::mark_last_known(&mut st.clusters, c);
                }
                if changed {
                    st.synced_clusters = status::count_synced(&st.clusters, &wanted);
                }
                changed
            };
            let mut probe = obj.clone();
            if mark(&mut probe) {
                self.objects
                    .update_status(Kind::Repository, Some(&ns), &name, mark)
                    .await?;
            }
        }
        Ok(())
    }
}
