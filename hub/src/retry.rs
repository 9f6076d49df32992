//! Waiting after a failure, and saying so without flooding the log: the
//! policy every background loop of the hub (store watchers, the controller,
//! the status writer, the sweeper, leader election) applies when the store
//! or etcd does not answer.
//!
//! The waits grow exponentially with jitter, from [`FIRST_WAIT`] to about
//! twice [`LONGEST_WAIT`], so replicas that lost the store together do not
//! retry together. The first failure in a row is a WARN; after that one
//! WARN per [`WARN_EVERY`] says how many failures it stands for, and the rest
//! are DEBUG. Before this, an etcd outage cost thousands of identical
//! warnings a minute. A success after a warning says so once, at INFO.

use std::fmt::Display;
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The wait after the first failure in a row.
pub const FIRST_WAIT: Duration = Duration::from_millis(250);
/// The longest wait before jitter (which adds up to as much again).
pub const LONGEST_WAIT: Duration = Duration::from_millis(2500);
/// At most one warning per this interval while failures go on.
pub const WARN_EVERY: Duration = Duration::from_secs(30);

/// How loudly to log one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loudness {
    /// A warning, standing for itself and `quiet` failures logged at DEBUG
    /// since the last warning.
    Warn { quiet: u32 },
    /// DEBUG only: a warning went out less than [`WARN_EVERY`] ago.
    Debug,
}

/// One loop's retry state. Not shared: each loop owns its own.
#[derive(Debug)]
pub struct Retry {
    /// What is retried, as the start of a log line ("Listing desired sets").
    what: &'static str,
    /// The waits still to come in this run of failures.
    waits: ExponentialBackoff,
    /// Failures in a row.
    failures: u32,
    /// When a failure of this run was last logged at WARN.
    warned: Option<Instant>,
    /// Failures logged at DEBUG since that warning.
    quiet: u32,
}

fn waits() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_WAIT)
        .with_max_delay(LONGEST_WAIT)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Retry {
    /// `what` starts each log line, e.g. "Listing desired sets".
    pub fn new(what: &'static str) -> Retry {
        Retry {
            what,
            waits: waits(),
            failures: 0,
            warned: None,
            quiet: 0,
        }
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts a failure at `now`: how loudly to log it and how long to wait.
    pub fn record_failure(&mut self, now: Instant) -> (Loudness, Duration) {
        self.failures = self.failures.saturating_add(1);
        let wait = self.waits.next().unwrap_or(LONGEST_WAIT);
        let loud = self.warned.is_none_or(|at| now >= at + WARN_EVERY);
        let loudness = if loud {
            self.warned = Some(now);
            Loudness::Warn {
                quiet: std::mem::take(&mut self.quiet),
            }
        } else {
            self.quiet = self.quiet.saturating_add(1);
            Loudness::Debug
        };
        (loudness, wait)
    }

    /// Counts and logs a failure; returns how long to wait before the next try.
    pub fn failed(&mut self, error: &dyn Display) -> Duration {
        let (loudness, wait) = self.record_failure(Instant::now());
        let what = self.what;
        let failures = self.failures;
        match loudness {
            Loudness::Warn { quiet: 0 } => {
                warn!(error = %error, failures, "{what} failed; retrying");
            }
            Loudness::Warn { quiet } => {
                warn!(error = %error, failures, since_last_warning = quiet + 1,
                      "{what} keeps failing; retrying with back-off");
            }
            Loudness::Debug => {
                debug!(error = %error, failures, wait_ms = wait.as_millis() as u64,
                       "{what} failed again; retrying");
            }
        }
        wait
    }

    /// Counts and logs a failure, then waits; false when `shutdown` came
    /// first.
    pub async fn wait_after(
        &mut self,
        error: &(dyn Display + Sync),
        shutdown: &CancellationToken,
    ) -> bool {
        let wait = self.failed(error);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    /// Counts a success: the next failure waits [`FIRST_WAIT`] again, and a
    /// recovery after a warning is said once.
    pub fn succeeded(&mut self) {
        if self.failures == 0 {
            return;
        }
        if self.warned.is_some() {
            let what = self.what;
            info!(failures = self.failures, "{what} works again");
        }
        self.failures = 0;
        self.warned = None;
        self.quiet = 0;
        self.waits = waits();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_grow_to_a_cap_and_warnings_are_rare() {
        let mut r = Retry::new("Testing");
        let start = Instant::now();
        let mut warned = 0;
        let mut last_cap = Duration::ZERO;
        // Five minutes of an outage, trying after every wait.
        let mut now = start;
        while now < start + Duration::from_secs(300) {
            let (loudness, wait) = r.record_failure(now);
            assert!(wait >= FIRST_WAIT, "{wait:?}");
            assert!(wait <= LONGEST_WAIT * 2, "{wait:?}");
            if let Loudness::Warn { quiet } = loudness {
                warned += 1;
                assert!(
                    warned == 1 || quiet > 0,
                    "a later warning stands for others"
                );
            }
            last_cap = last_cap.max(wait);
            now += wait;
        }
        // One warning at the start, then one per WARN_EVERY.
        assert!((10..=11).contains(&warned), "{warned} warnings");
        assert!(last_cap >= LONGEST_WAIT, "the waits reached the cap");
        assert!(r.failures() > 50, "{} tries in five minutes", r.failures());

        r.succeeded();
        assert_eq!(r.failures(), 0);
        let (loudness, wait) = r.record_failure(now);
        assert_eq!(
            loudness,
            Loudness::Warn { quiet: 0 },
            "a new outage warns at once"
        );
        assert!(wait < FIRST_WAIT * 2, "and starts from the shortest wait");
    }
}
