//! Reconnect pacing for peer connections: capped exponential backoff with jitter.
//!
//! The first retry after a loss is almost immediate (a restarted peer should be reached
//! within a heartbeat or two); each failed attempt doubles the ceiling up to a cap, and
//! the actual delay is drawn uniformly from [ceiling/2, ceiling] ("equal jitter") so a
//! whole cluster that lost the same peer does not redial it in lockstep. Randomness is an
//! input, so the simulator and tests stay deterministic.

/// Backoff state for one peer. Times are nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    initial_ns: u64,
    cap_ns: u64,
    ceiling_ns: u64,
}

impl Backoff {
    pub fn new(initial_ns: u64, cap_ns: u64) -> Self {
        assert!(
            initial_ns > 0 && initial_ns <= cap_ns,
            "backoff bounds out of order"
        );
        Backoff {
            initial_ns,
            cap_ns,
            ceiling_ns: initial_ns,
        }
    }

    /// The delay before the next attempt, given a uniformly random `random` value;
    /// doubles the ceiling for the attempt after.
    pub fn next_delay_ns(&mut self, random: u64) -> u64 {
        let half = self.ceiling_ns / 2;
        let spread = self.ceiling_ns - half;
        let delay = half + random % (spread + 1);
        self.ceiling_ns = self.ceiling_ns.saturating_mul(2).min(self.cap_ns);
        assert!(delay <= self.cap_ns);
        delay
    }

    /// A connection succeeded: the next loss starts from the initial delay again.
    pub fn reset(&mut self) {
        self.ceiling_ns = self.initial_ns;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(10, 1000);
        let mut ceilings = Vec::new();
        let mut random = 0x1234_5678u64;
        for _ in 0..10 {
            random = random.wrapping_mul(6364136223846793005).wrapping_add(1);
            let before = backoff.ceiling_ns;
            let delay = backoff.next_delay_ns(random);
            assert!(
                delay >= before / 2 && delay <= before,
                "{delay} outside [{}, {before}]",
                before / 2
            );
            ceilings.push(before);
        }
        assert_eq!(&ceilings[..8], &[10, 20, 40, 80, 160, 320, 640, 1000]);
        assert_eq!(ceilings[9], 1000);
        backoff.reset();
        assert!(backoff.next_delay_ns(u64::MAX) <= 10);
    }
}
