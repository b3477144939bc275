//! Token buckets that bound what a guest can make a device do per second.
//!
//! A device asks [`RateLimiter::consume`] before it serves a request (a disk request, a frame,
//! an entropy request). When a bucket is short, nothing is taken, the device leaves the request
//! in its queue, and the limiter's timerfd is armed for the moment the bucket will hold enough;
//! the device registers that fd in its event loop and retries when it fires
//! ([`RateLimiter::on_timer`]). A request larger than a whole bucket is let through once the
//! bucket is full, taking all of it, so it is slowed down but never stuck.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use husk_vmm_api::{RateLimiterConfig, TokenBucketConfig};
use vmm_sys_util::timerfd::TimerFd;

/// One bucket of tokens (bytes or operations).
#[derive(Debug)]
struct TokenBucket {
    size: u64,
    refill_time: Duration,
    /// Tokens available now, at most `size`.
    budget: u64,
    /// Extra tokens spent before the budget, never refilled.
    burst: u64,
    last_refill: Instant,
}

impl TokenBucket {
    fn new(cfg: &TokenBucketConfig, now: Instant) -> TokenBucket {
        TokenBucket {
            size: cfg.size,
            refill_time: Duration::from_millis(cfg.refill_time_ms),
            budget: cfg.size,
            burst: cfg.one_time_burst,
            last_refill: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill);
        let tokens = u128::from(self.size) * elapsed.as_nanos() / self.refill_time.as_nanos();
        if tokens == 0 {
            return;
        }
        // Advance the clock only by the time those whole tokens took, so no fraction is lost.
        let used = tokens * self.refill_time.as_nanos() / u128::from(self.size);
        self.last_refill += Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        self.budget = self.size.min(self.budget.saturating_add(tokens as u64));
    }

    /// What `n` tokens cost here: a request above what the bucket can ever hold (its size and
    /// what is left of the burst) costs all of it.
    fn cost(&self, n: u64) -> u64 {
        n.min(self.size + self.burst)
    }

    fn has(&self, n: u64) -> bool {
        self.burst + self.budget >= self.cost(n)
    }

    fn take(&mut self, n: u64) {
        let mut n = self.cost(n);
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        n -= from_burst;
        self.budget -= n;
    }

    /// How long until `n` tokens are there.
    fn wait_for(&self, n: u64, now: Instant) -> Duration {
        let missing = self.cost(n).saturating_sub(self.burst + self.budget);
        let nanos = u128::from(missing) * self.refill_time.as_nanos() / u128::from(self.size);
        let since = now.saturating_duration_since(self.last_refill);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).saturating_sub(since)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(std::io::Error),
}

/// A device's bandwidth and operations buckets, and the timer that wakes it when it was
/// throttled.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    pub fn new(cfg: &RateLimiterConfig) -> Result<RateLimiter, RateLimiterError> {
        let now = Instant::now();
        Ok(RateLimiter {
            bandwidth: cfg.bandwidth.as_ref().map(|b| TokenBucket::new(b, now)),
            ops: cfg.ops.as_ref().map(|b| TokenBucket::new(b, now)),
            timer: TimerFd::new().map_err(|e| {
                RateLimiterError::Timer(std::io::Error::from_raw_os_error(e.errno()))
            })?,
            blocked: false,
        })
    }

    /// Takes one operation and `bytes` if both buckets have them; otherwise takes nothing,
    /// arms the timer for when they will, and returns false.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(b) = bucket {
                b.refill(now);
                if !b.has(n) {
                    wait = wait.max(b.wait_for(n, now));
                }
            }
        }
        if wait > Duration::ZERO {
            self.block_for(wait);
            return false;
        }
        if let Some(b) = &mut self.bandwidth {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(1);
        }
        true
    }

    fn block_for(&mut self, wait: Duration) {
        // A zero timeout would disarm the timer; a millisecond is the loop's own granularity.
        let wait = wait.max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            // Without a timer the device would never be woken: stay unthrottled instead.
            Err(e) => tracing::error!("rate limiter: cannot arm the timer: {e}"),
        }
    }

    /// The timer fired: the device may try again.
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// Throttled, waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_time_ms: u64, one_time_burst: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst,
            refill_time_ms,
        })
    }

    #[test]
    fn a_bucket_refills_at_its_rate_and_never_past_its_size() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(1000, 100, 0).unwrap(), t0);
        b.take(1000);
        assert!(!b.has(1));
        b.refill(t0 + Duration::from_millis(50));
        assert_eq!(b.budget, 500);
        assert_eq!(
            b.wait_for(1000, t0 + Duration::from_millis(50)),
            Duration::from_millis(50)
        );
        b.refill(t0 + Duration::from_secs(10));
        assert_eq!(b.budget, 1000);
    }

    #[test]
    fn the_burst_is_spent_first_and_once() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, 1000, 50).unwrap(), t0);
        assert!(b.has(150));
        b.take(120);
        assert_eq!((b.burst, b.budget), (0, 30));
        b.refill(t0 + Duration::from_secs(5));
        assert_eq!((b.burst, b.budget), (0, 100), "the burst came back");
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, 1000, 0).unwrap(), t0);
        b.take(40);
        assert!(!b.has(1_000_000));
        assert_eq!(b.wait_for(1_000_000, t0), Duration::from_millis(400));
        b.refill(t0 + Duration::from_millis(400));
        assert!(b.has(1_000_000));
        b.take(1_000_000);
        assert_eq!(b.budget, 0);
    }

    #[test]
    fn a_throttled_limiter_arms_its_timer_and_takes_nothing() {
        let mut r = RateLimiter::new(&RateLimiterConfig {
            bandwidth: bucket(4096, 100, 0),
            ops: bucket(2, 100, 0),
        })
        .unwrap();
        assert!(r.consume(1000));
        assert!(r.consume(1000));
        // Out of operations (2 per 100 ms), though bytes are left.
        assert!(!r.consume(10));
        assert!(r.is_blocked());
        assert!(!r.consume(10), "blocked until the timer fires");
        let started = Instant::now();
        r.on_timer();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(20), "woke after {waited:?}");
        assert!(!r.is_blocked());
        assert!(r.consume(10));
    }

    #[test]
    fn no_buckets_never_throttle() {
        let mut r = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        for _ in 0..10_000 {
            assert!(r.consume(1 << 20));
        }
    }
}
