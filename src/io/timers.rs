//! A fixed set of named timers and the loop's next deadline.
//!
//! The loop owns a handful of timers (heartbeat, election, lease, fsync batching, ...),
//! each identified by a small index chosen by the caller. The next time the loop must
//! wake is the minimum of the armed timers; `wait(deadline)` sleeps until then. The set
//! is a fixed array: arming and firing never allocate, and scanning a handful of entries
//! is cheaper than a heap.

use super::clock::Instant;

/// A fixed-capacity set of one-shot timers indexed `0..capacity`.
#[derive(Debug)]
pub struct Timers {
    deadlines: Box<[Option<Instant>]>,
}

impl Timers {
    /// A set of `capacity` disarmed timers. Allocates once.
    pub fn new(capacity: usize) -> Timers {
        assert!(capacity > 0);
        Timers {
            deadlines: vec![None; capacity].into_boxed_slice(),
        }
    }

    /// Arms (or re-arms) timer `id` to fire at `deadline`.
    pub fn set(&mut self, id: usize, deadline: Instant) {
        assert!(id < self.deadlines.len(), "timer {id} out of range");
        self.deadlines[id] = Some(deadline);
    }

    /// Disarms timer `id`.
    pub fn clear(&mut self, id: usize) {
        assert!(id < self.deadlines.len(), "timer {id} out of range");
        self.deadlines[id] = None;
    }

    /// The deadline of timer `id`, if armed.
    pub fn get(&self, id: usize) -> Option<Instant> {
        self.deadlines[id]
    }

    /// The earliest armed deadline: the loop's next wake-up.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// Disarms and returns one timer whose deadline is at or before `now`, the earliest
    /// first. Call until `None` to fire every expired timer.
    pub fn pop_expired(&mut self, now: Instant) -> Option<usize> {
        let (id, _) = self
            .deadlines
            .iter()
            .enumerate()
            .filter_map(|(id, d)| d.map(|d| (id, d)))
            .filter(|&(_, d)| d <= now)
            .min_by_key(|&(_, d)| d)?;
        self.deadlines[id] = None;
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_deadline_is_the_minimum_and_expired_fire_in_order() {
        let mut timers = Timers::new(4);
        assert_eq!(timers.next_deadline(), None);
        timers.set(0, Instant::from_nanos(300));
        timers.set(2, Instant::from_nanos(100));
        timers.set(3, Instant::from_nanos(200));
        assert_eq!(timers.next_deadline(), Some(Instant::from_nanos(100)));
        timers.clear(2);
        assert_eq!(timers.next_deadline(), Some(Instant::from_nanos(200)));
        timers.set(1, Instant::from_nanos(50));
        assert_eq!(timers.pop_expired(Instant::from_nanos(49)), None);
        assert_eq!(timers.pop_expired(Instant::from_nanos(250)), Some(1));
        assert_eq!(timers.pop_expired(Instant::from_nanos(250)), Some(3));
        assert_eq!(timers.pop_expired(Instant::from_nanos(250)), None);
        assert_eq!(timers.get(0), Some(Instant::from_nanos(300)));
        assert_eq!(timers.next_deadline(), Some(Instant::from_nanos(300)));
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn out_of_range_timer_is_a_bug() {
        Timers::new(2).set(2, Instant::ZERO);
    }
}
