//! A token bucket shared by every transfer, for the optional bandwidth limit.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Limits the combined rate of all transfers to `rate` bytes per second, with
/// a burst of at most one second's worth.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A limiter for `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        let rate = bytes_per_sec.max(1) as f64;
        RateLimiter {
            rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    /// Takes `n` bytes' worth of tokens, waiting while the bucket is in debt.
    /// Taking first and waiting after keeps one large chunk from starving.
    pub async fn acquire(&self, n: u64) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.rate) - n as f64;
            s.1 = now;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_the_rate() {
        let limiter = RateLimiter::new(1000);
        let start = Instant::now();
        // 1000 burst, then 4000 more at 1000/s = 4 s.
        for _ in 0..50 {
            limiter.acquire(100).await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(3900), "{took:?}");
        assert!(took <= Duration::from_millis(4200), "{took:?}");
    }
}
