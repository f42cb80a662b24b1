//! The monotonic clock: the only time source of the agent.
//!
//! Every deadline (Raft ticks, leases, timeouts) is an [`Instant`] on CLOCK_MONOTONIC,
//! counted in nanoseconds. The wall clock jumps (NTP, an operator) and is never trusted;
//! it is only printed. Raft itself never reads a clock: the loop passes `Instant::now()`
//! in as an input, so the simulator can pass fake time instead.

use std::time::Duration;

/// A point on CLOCK_MONOTONIC, in nanoseconds since an arbitrary start (boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The start of the clock; every real reading is later.
    pub const ZERO: Instant = Instant(0);

    /// Reads CLOCK_MONOTONIC.
    pub fn now() -> Instant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        // CLOCK_MONOTONIC always exists on Linux; failing here means a broken system.
        assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
        assert!(ts.tv_sec >= 0 && ts.tv_nsec >= 0);
        Instant(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    /// An instant from a raw nanosecond count (for the simulator and tests).
    pub const fn from_nanos(nanos: u64) -> Instant {
        Instant(nanos)
    }

    /// Nanoseconds since the start of the clock.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// `self + duration`, saturating at the end of time (u64 nanoseconds ≈ 584 years).
    pub fn saturating_add(self, duration: Duration) -> Instant {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
    }

    /// Time from `earlier` to `self`; zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Time left from `now` until `self` (a deadline); zero once it has passed.
    pub fn remaining(self, now: Instant) -> Duration {
        self.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_arithmetic() {
        let a = Instant::now();
        let b = Instant::now();
        assert!(b >= a);
        let c = a.saturating_add(Duration::from_millis(5));
        assert_eq!(c.as_nanos() - a.as_nanos(), 5_000_000);
        assert_eq!(c.saturating_duration_since(a), Duration::from_millis(5));
        assert_eq!(a.saturating_duration_since(c), Duration::ZERO);
        assert_eq!(c.remaining(a), Duration::from_millis(5));
        assert_eq!(
            Instant::from_nanos(u64::MAX - 1).saturating_add(Duration::from_secs(1)),
            Instant::from_nanos(u64::MAX)
        );
    }
}
