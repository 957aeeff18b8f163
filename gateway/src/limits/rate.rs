//! GCRA primitives shared by every limit: a [`Rate`], direct limiters and
//! [`take`], and `Keyed` limiters that can be pruned and reset.
//!
//! Owns how a rate becomes a `governor` quota and how a keyed limiter is
//! swept. It is the leaf of `limits`: both the connection limits
//! (`limits`) and admission control (`limits::admission`) build on it, and it
//! uses neither. Does not own which limits exist or their defaults
//! (`limits::LimitConfig`).
//!
//! Concurrency: direct limiters are atomics; a keyed limiter is a sharded
//! map behind an `RwLock` that is only written when the map is replaced.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use parking_lot::RwLock;

/// A direct (unkeyed) GCRA limiter.
pub type DirectLimiter<C = MonotonicClock> =
    RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type KeyedLimiter<K> = RateLimiter<K, DashMapStateStore<K>, MonotonicClock, NoOpMiddleware<std::time::Instant>>;

/// A rate: `per_sec` cells refill each second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
}

impl Rate {
    /// `None` when `per_sec` is 0 (the limit is off). A zero burst is raised to 1.
    pub fn new(per_sec: u32, burst: u32) -> Option<Rate> {
        (per_sec > 0).then_some(Rate {
            per_sec,
            burst: burst.max(1),
        })
    }

    pub(super) fn quota(self) -> Quota {
        Quota::per_second(nonzero(self.per_sec)).allow_burst(nonzero(self.burst))
    }

    pub(super) fn direct(self) -> DirectLimiter {
        RateLimiter::direct_with_clock(self.quota(), MonotonicClock)
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Takes `n` cells (at most the burst, at least 1) from `lim`, or says how long
/// until they would be available. Capping at the burst lets a frame larger
/// than the burst through when the bucket is full (it then empties it).
pub fn take<C: Clock>(lim: &DirectLimiter<C>, n: usize, burst: u32) -> Result<(), Duration> {
    let n = nonzero(u32::try_from(n).unwrap_or(u32::MAX).min(burst));
    match lim.check_n(n) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(not_until.wait_time_from(lim.clock().now())),
        // Unreachable with n <= burst; refuse for a second rather than panic.
        Err(_) => Err(Duration::from_secs(1)),
    }
}

/// A keyed limiter that can be reset when it holds too many keys.
pub(super) struct Keyed<K: Hash + Eq + Clone> {
    quota: Quota,
    inner: RwLock<KeyedLimiter<K>>,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    pub(super) fn new(rate: Rate) -> Self {
        let quota = rate.quota();
        Self {
            quota,
            inner: RwLock::new(RateLimiter::dashmap_with_clock(quota, MonotonicClock)),
        }
    }

    pub(super) fn check(&self, key: &K) -> Result<(), Duration> {
        let lim = self.inner.read();
        lim.check_key(key)
            .map_err(|not_until| not_until.wait_time_from(lim.clock().now()))
    }

    /// Prunes keys back to fresh state; resets the map when more than `max`
    /// remain. Returns the keys left and whether it reset.
    pub(super) fn sweep(&self, max: usize, shrink: bool) -> (usize, bool) {
        let left = {
            let lim = self.inner.read();
            lim.retain_recent();
            if shrink {
                lim.shrink_to_fit();
            }
            lim.len()
        };
        if left > max {
            *self.inner.write() = RateLimiter::dashmap_with_clock(self.quota, MonotonicClock);
            return (0, true);
        }
        (left, false)
    }

    /// Keys held now.
    pub(super) fn len(&self) -> usize {
        self.inner.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn fake(rate: Rate) -> (DirectLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimiter::direct_with_clock(rate.quota(), clock.clone()), clock)
    }

    #[test]
    fn burst_then_refill_with_retry_after() {
        let (lim, clock) = fake(Rate::new(5, 10).unwrap());
        for _ in 0..10 {
            assert_eq!(take(&lim, 1, 10), Ok(()));
        }
        // One cell refills every 200 ms.
        assert_eq!(take(&lim, 1, 10), Err(Duration::from_millis(200)));
        clock.advance(Duration::from_millis(150));
        assert_eq!(take(&lim, 1, 10), Err(Duration::from_millis(50)));
        clock.advance(Duration::from_millis(50));
        assert_eq!(take(&lim, 1, 10), Ok(()));
    }

    #[test]
    fn a_frame_larger_than_the_burst_passes_on_a_full_bucket_and_empties_it() {
        let (lim, clock) = fake(Rate::new(100, 50).unwrap());
        assert_eq!(take(&lim, 2_000, 50), Ok(()));
        assert!(take(&lim, 1, 50).is_err());
        clock.advance(Duration::from_millis(500));
        assert_eq!(take(&lim, 50, 50), Ok(()));
        // An empty subscribe still costs one cell.
        assert_eq!(take(&lim, 0, 50), Err(Duration::from_millis(10)));
    }
}
