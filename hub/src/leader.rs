//! Leader election for the hub's singleton tasks (the tag resolver and the
//! registry health checks): with the embedded store there is one hub, which
//! always leads; with etcd, replicas campaign for `<prefix>/leader/resolver`
//! with a create-if-absent transaction bound to a lease (TTL
//! [`LEASE_TTL`]) that the leader keeps alive. A replica that is SIGKILLed
//! stops keeping its lease alive, so etcd deletes the key after the TTL and
//! a follower takes over on its next campaign tick.
//!
//! The outcome is a `watch::Receiver<bool>`: "this replica leads now".

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::StoreConfig;
use crate::retry::Retry;

/// Lifetime of the leader's lease: how long a dead leader blocks a takeover.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the leader renews its lease and a follower retries.
pub const CAMPAIGN_TICK: Duration = Duration::from_secs(1);
/// Longest wait for one etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a campaign ended; the replica campaigns again after a back-off.
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    /// An etcd call failed; `what` names it ("granting a lease").
    #[error("{what}: {source}")]
    Etcd {
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{what}: timed out after {CALL_TIMEOUT:?}")]
    Timeout { what: &'static str },
    /// etcd says the lease is gone.
    #[error("lease {0:x} expired")]
    LeaseExpired(i64),
    /// The lease could not be renewed in time to be sure of it.
    #[error("lease {lease:x} not renewed for {silent:?}")]
    LeaseNotRenewed { lease: i64, silent: Duration },
}

/// Where and as whom to campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    /// A single hub on the embedded store: always the leader.
    Alone,
    /// Replicas sharing an etcd.
    Etcd {
        endpoints: Vec<String>,
        /// `<prefix>/leader/<name>`.
        key: String,
        /// Written as the key's value, so operators can see who leads.
        identity: String,
    },
}

impl Election {
    /// The election of the named singleton task for a hub with this store.
    pub fn for_store(store: &StoreConfig, name: &str, identity: String) -> Election {
        match store {
            StoreConfig::Embedded { .. } => Election::Alone,
            StoreConfig::Etcd { endpoints, prefix } => Election::Etcd {
                endpoints: endpoints.clone(),
                key: format!("{}/leader/{name}", prefix.trim_end_matches('/')),
                identity,
            },
        }
    }

    /// Campaigns until `shutdown`, publishing leadership on `leader`. A
    /// leader that shuts down revokes its lease so a follower takes over at
    /// once rather than after the TTL.
    pub async fn run(self, leader: watch::Sender<bool>, shutdown: CancellationToken) {
        match self {
            Election::Alone => {
                info!("Leading the tag resolver (embedded store: single hub)");
                let _ = leader.send(true);
                shutdown.cancelled().await;
                let _ = leader.send(false);
            }
            Election::Etcd {
                endpoints,
                key,
                identity,
            } => {
                // While etcd is down every campaign fails at once: back off,
                // and warn once in a while rather than every second.
                let mut retry = Retry::new("Leader election");
                while !shutdown.is_cancelled() {
                    let result =
                        campaign(&endpoints, &key, &identity, &leader, &shutdown, &mut retry).await;
                    let _ = leader.send_if_modified(|l| std::mem::replace(l, false));
                    if let Err(e) = result
                        && !retry.wait_after(&e, &shutdown).await
                    {
                        break;
                    }
                }
            }
        }
    }
}

async fn timed<T>(
    what: &'static str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CampaignError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(CampaignError::Etcd { what, source }),
        Err(_) => Err(CampaignError::Timeout { what }),
    }
}

/// One lease's worth of campaigning: returns `Ok` on shutdown, `Err` when
/// the lease or the connection is lost (the caller starts over). A campaign
/// that got a lease counts as a success for `retry`: etcd answered.
async fn campaign(
    endpoints: &[String],
    key: &str,
    identity: &str,
    leader: &watch::Sender<bool>,
    shutdown: &CancellationToken,
    retry: &mut Retry,
) -> Result<(), CampaignError> {
    let options = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT);
    let mut client = timed(
        "connecting to etcd",
        Client::connect(endpoints, Some(options)),
    )
    .await?;
    let ttl = LEASE_TTL.as_secs() as i64;
    let lease = timed("granting a lease", client.lease_grant(ttl, None))
        .await?
        .id();
    let (mut keeper, mut responses) =
        timed("keeping the lease alive", client.lease_keep_alive(lease)).await?;
    retry.succeeded();
    let mut renewed = Instant::now();
    let mut leading = false;
    loop {
        // Renew first: a leader must step down before its lease can expire
        // in etcd, so it never acts while another replica already leads.
        let renewal = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(CALL_TIMEOUT, renewal).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => renewed = Instant::now(),
            Ok(Ok(_)) => return Err(CampaignError::LeaseExpired(lease)),
            Ok(Err(e)) => debug!(error = %e, "Lease renewal failed"),
            Err(_) => debug!("Lease renewal timed out"),
        }
        if renewed.elapsed() + CAMPAIGN_TICK >= LEASE_TTL {
            if leading {
                warn!(
                    key,
                    identity, "Lost the resolver leadership: lease not renewed in time"
                );
            }
            return Err(CampaignError::LeaseNotRenewed {
                lease,
                silent: renewed.elapsed(),
            });
        }
        if !leading {
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key,
                    identity,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key, None)]);
            let resp = timed("campaigning", client.txn(txn)).await?;
            if resp.succeeded() {
                leading = true;
                info!(key, identity, "Became the tag resolver leader");
                let _ = leader.send(true);
            } else {
                let holder = resp.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Get(g) => g
                        .kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                    _ => None,
                });
                debug!(key, holder = ?holder, "Another replica leads the tag resolver");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CAMPAIGN_TICK) => {}
            _ = shutdown.cancelled() => {
                if leading {
                    let _ = leader.send(false);
                    // Hand over at once instead of after the TTL.
                    let _ = timed("revoking the lease", client.lease_revoke(lease)).await;
                    info!(key, identity, "Stepped down as tag resolver leader");
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn election_follows_the_store() {
        let embedded = StoreConfig::Embedded {
            path: PathBuf::from("/tmp/x.redb"),
        };
        assert_eq!(
            Election::for_store(&embedded, "resolver", "a".into()),
            Election::Alone
        );
        let etcd = StoreConfig::Etcd {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/imgfleet/".into(),
        };
        assert_eq!(
            Election::for_store(&etcd, "resolver", "hub-1".into()),
            Election::Etcd {
                endpoints: vec!["http://127.0.0.1:2379".into()],
                key: "/imgfleet/leader/resolver".into(),
                identity: "hub-1".into(),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_hub_leads_until_shutdown() {
        let (tx, mut rx) = watch::channel(false);
        let token = CancellationToken::new();
        let run = tokio::spawn(Election::Alone.run(tx, token.clone()));
        rx.wait_for(|l| *l).await.expect("leads");
        token.cancel();
        run.await.expect("election ends");
        assert!(!*rx.borrow());
    }
}
