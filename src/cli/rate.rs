//! Transfer rate and time left, estimated from the byte counts agents report
//! through the hub (`bytesDone` of successive polls). Pure: time is passed in
//! as the time since the watch started.
//!
//! The hub writes an agent's progress about once a second while `watch` polls
//! twice a second, so most polls see no change, and a poll cannot tell when
//! within the last second the count it sees was written. The first move of the
//! count therefore only anchors the measurement; from the next move on, the
//! rate is the bytes over the time since that anchor, and once that span passes
//! [`SMOOTHING`] it follows an exponentially weighted moving average whose weight
//! depends on the time between moves, so it means the same whatever the poll
//! rhythm. No rate and no ETA are claimed when the total is unknown, before two
//! moves have been seen, or when the count has not moved for [`STALLED_AFTER`];
//! after a stall, or when the count goes back (a retry, another digest), the
//! measurement starts afresh.

use std::time::Duration;

/// Time constant of the smoothing: a change of speed shows mostly within it.
pub const SMOOTHING: Duration = Duration::from_secs(5);
/// Without progress for this long a transfer counts as stalled: ten of the
/// hub's status writes (one a second) brought nothing.
pub const STALLED_AFTER: Duration = Duration::from_secs(10);

/// The rate estimate of one byte counter (one image on one cluster, or a whole cluster).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Estimator {
    /// The last count seen and when it was first seen; `None` before the first poll.
    last: Option<(Duration, u64)>,
    /// The move the rate is measured from; `None` until the count has moved.
    anchor: Option<(Duration, u64)>,
    /// Bytes per second; `None` until a move after the anchor has been measured.
    rate: Option<f64>,
}

/// What can honestly be said about a counter now.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Not enough seen yet to estimate anything.
    Unknown,
    /// Moving at `rate` bytes per second; `eta` when the total is known.
    Moving {
        /// Smoothed bytes per second.
        rate: f64,
        /// Time left at that rate.
        eta: Option<Duration>,
    },
    /// No progress for at least [`STALLED_AFTER`].
    Stalled,
    /// Everything is there.
    Done,
}

impl Estimator {
    /// Takes the count seen at `now`.
    pub fn observe(&mut self, now: Duration, bytes: u64) {
        let Some((since, before)) = self.last else {
            self.last = Some((now, bytes));
            return;
        };
        if bytes == before {
            return;
        }
        let elapsed = now.saturating_sub(since);
        if bytes < before || elapsed > STALLED_AFTER {
            // Counting again (a retry, another digest), or moving after a wait (queued,
            // retrying) that is not transfer time: measure afresh from this move.
            *self = Estimator {
                last: Some((now, bytes)),
                anchor: Some((now, bytes)),
                rate: None,
            };
            return;
        }
        if elapsed.is_zero() {
            // Two reports in one instant: keep the bytes, measure them with the next move.
            return;
        }
        self.last = Some((now, bytes));
        let Some((anchored, from)) = self.anchor else {
            // The first move took an unknown time: it only anchors the measurement.
            self.anchor = Some((now, bytes));
            return;
        };
        let span = now.saturating_sub(anchored);
        self.rate = Some(match self.rate {
            // The average since the anchor, until it spans a time constant.
            Some(r) if span >= SMOOTHING => {
                let secs = elapsed.as_secs_f64();
                let current = (bytes - before) as f64 / secs;
                let weight = 1.0 - (-secs / SMOOTHING.as_secs_f64()).exp();
                r + weight * (current - r)
            }
            _ => (bytes - from) as f64 / span.as_secs_f64(),
        });
    }

    /// What can be said at `now` of a counter whose total is `total` (0 when unknown).
    pub fn progress(&self, now: Duration, total: u64) -> Progress {
        let Some((since, bytes)) = self.last else {
            return Progress::Unknown;
        };
        if total > 0 && bytes >= total {
            return Progress::Done;
        }
        if now.saturating_sub(since) > STALLED_AFTER {
            return Progress::Stalled;
        }
        match self.rate {
            Some(rate) if rate > 0.0 => {
                let eta = (total > 0).then(|| {
                    // Whole seconds, rounded up: "0s left" while bytes are missing would lie.
                    let secs = ((total - bytes) as f64 / rate).ceil();
                    Duration::from_secs(secs.min(MAX_ETA.as_secs_f64()) as u64)
                });
                Progress::Moving { rate, eta }
            }
            _ => Progress::Unknown,
        }
    }
}

/// Longest ETA worth showing as a number; longer shows as "ETA > 1d".
pub const MAX_ETA: Duration = Duration::from_secs(24 * 3600);

/// `1.5 MiB/s`, `512 B/s`.
pub fn format_rate(bytes_per_sec: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    let mut value = bytes_per_sec.max(0.0);
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `ETA 42s`, `ETA 3m05s`, `ETA 2h10m`, `ETA > 1d`.
pub fn format_eta(eta: Duration) -> String {
    let s = eta.as_secs();
    if eta >= MAX_ETA {
        "ETA > 1d".to_owned()
    } else if s < 60 {
        format!("ETA {s}s")
    } else if s < 3600 {
        format!("ETA {}m{:02}s", s / 60, s % 60)
    } else {
        format!("ETA {}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// The words shown after a progress figure: `1.5 MiB/s ETA 42s`, `stalled`, or
/// nothing when nothing can be said.
pub fn describe(progress: &Progress) -> String {
    match progress {
        Progress::Unknown | Progress::Done => String::new(),
        Progress::Stalled => "stalled".to_owned(),
        Progress::Moving { rate, eta } => match eta {
            Some(eta) => format!("{} {}", format_rate(*rate), format_eta(*eta)),
            None => format_rate(*rate),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn at(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    /// Feeds `(seconds, bytes)` polls, then asks at `now` with `total`.
    fn check(name: &str, polls: &[(f64, u64)], now: f64, total: u64, want: &str) {
        let mut e = Estimator::default();
        for (t, bytes) in polls {
            e.observe(at(*t), *bytes);
        }
        assert_eq!(describe(&e.progress(at(now), total)), want, "{name}: {e:?}");
    }

    /// (name, polls as (seconds, bytes), now, total, shown).
    type Case = (&'static str, Vec<(f64, u64)>, f64, u64, &'static str);

    /// Polls once a second from `from` to `to` seconds, the count growing by
    /// `per_second` MiB a second from `start` MiB.
    fn ramp(from: u32, to: u32, start: u64, per_second: u64) -> impl Iterator<Item = (f64, u64)> {
        (from..=to).map(move |s| {
            (
                f64::from(s),
                (start + per_second * u64::from(s - from)) * MIB,
            )
        })
    }

    #[test]
    fn rate_and_eta_from_successive_polls() {
        let cases: Vec<Case> = vec![
            ("nothing seen", vec![], 0.0, 100 * MIB, ""),
            (
                "one poll is no rate",
                vec![(0.0, 10 * MIB)],
                0.5,
                100 * MIB,
                "",
            ),
            (
                "steady 1 MiB/s with the hub writing once a second and polls twice",
                ramp(0, 3, 0, 1)
                    .flat_map(|(t, bytes)| [(t, bytes), (t + 0.5, bytes)])
                    .take(7)
                    .collect(),
                3.2,
                10 * MIB,
                "1.0 MiB/s ETA 7s",
            ),
            (
                "unknown total: a rate and no ETA",
                vec![(0.0, 0), (1.0, MIB), (2.0, 2 * MIB)],
                2.0,
                0,
                "1.0 MiB/s",
            ),
            (
                "the first move only anchors: its bytes took an unknown time",
                vec![(0.0, 0), (0.5, 10 * MIB)],
                0.5,
                100 * MIB,
                "",
            ),
            (
                "a speed change is smoothed, not taken at once",
                ramp(0, 6, 0, 1).chain([(7.0, 10 * MIB)]).collect(),
                7.0,
                100 * MIB,
                "1.5 MiB/s ETA 59s",
            ),
            (
                "and shows mostly within a few time constants",
                ramp(0, 6, 0, 1).chain(ramp(7, 16, 10, 4)).collect(),
                16.0,
                146 * MIB,
                "3.6 MiB/s ETA 28s",
            ),
            (
                "a first second measured against its poll's phase is corrected as the span grows",
                vec![
                    (0.0, 0),
                    (1.0, MIB),
                    (1.5, 3 * MIB),
                    (3.0, 4 * MIB),
                    (4.0, 5 * MIB),
                ],
                4.0,
                10 * MIB,
                "1.3 MiB/s ETA 4s",
            ),
            (
                "stalled: no move for longer than STALLED_AFTER",
                vec![(0.0, 0), (1.0, MIB), (2.0, 2 * MIB), (12.0, 2 * MIB)],
                12.5,
                100 * MIB,
                "stalled",
            ),
            (
                "not yet stalled at the limit",
                vec![(0.0, 0), (1.0, MIB), (2.0, 2 * MIB)],
                12.0,
                4 * MIB,
                "1.0 MiB/s ETA 2s",
            ),
            (
                "moving again after a stall starts measuring afresh",
                vec![(0.0, 0), (1.0, MIB), (20.0, 2 * MIB)],
                20.0,
                100 * MIB,
                "",
            ),
            (
                "after a stall, the first measured move sets the rate",
                vec![(0.0, 0), (1.0, MIB), (20.0, 2 * MIB), (21.0, 4 * MIB)],
                21.0,
                100 * MIB,
                "2.0 MiB/s ETA 48s",
            ),
            (
                "a long wait before the start is not counted as slow transfer",
                vec![(0.0, 0), (30.0, MIB), (31.0, 2 * MIB)],
                31.0,
                10 * MIB,
                "1.0 MiB/s ETA 8s",
            ),
            (
                "the count going back (a retry, a new digest) resets",
                vec![(0.0, 0), (1.0, 50 * MIB), (2.0, MIB)],
                2.0,
                100 * MIB,
                "",
            ),
            (
                "complete: nothing to say",
                vec![(0.0, 0), (1.0, 10 * MIB)],
                1.0,
                10 * MIB,
                "",
            ),
            (
                "ETA rounds up to whole seconds",
                vec![(0.0, 0), (1.0, MIB), (2.0, 4 * MIB)],
                2.0,
                5 * MIB,
                "3.0 MiB/s ETA 1s",
            ),
            (
                "a very long ETA is capped",
                vec![(0.0, 0), (1.0, 1), (2.0, 2)],
                2.0,
                1 << 40,
                "1 B/s ETA > 1d",
            ),
        ];
        for (name, polls, now, total, want) in cases {
            check(name, &polls, now, total, want);
        }
    }

    #[test]
    fn rates_and_etas_read_well() {
        for (rate, want) in [
            (0.0, "0 B/s"),
            (512.0, "512 B/s"),
            (1536.0, "1.5 KiB/s"),
            (3.25 * MIB as f64, "3.2 MiB/s"),
            (2.0 * 1024.0 * MIB as f64, "2.0 GiB/s"),
        ] {
            assert_eq!(format_rate(rate), want);
        }
        for (secs, want) in [
            (0, "ETA 0s"),
            (59, "ETA 59s"),
            (65, "ETA 1m05s"),
            (3599, "ETA 59m59s"),
            (7800, "ETA 2h10m"),
            (86_400, "ETA > 1d"),
        ] {
            assert_eq!(format_eta(Duration::from_secs(secs)), want);
        }
    }
}
