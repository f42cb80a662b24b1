//! Host leases: the arithmetic that keeps a VM from running on two hosts at once.
//!
//! Every host measures time on its own CLOCK_MONOTONIC, and clock rates differ by at
//! most eps. The rules (ARCHITECTURE.md, "Time, leases and fencing"):
//!
//! - A host's lease starts when it *received* a leader heartbeat round that it
//!   acknowledged and whose acknowledgement the leader confirmed it received, and ends at
//!   `receipt + L(1 - eps) - fence_margin` on the host's clock. Past that, its VMMs fence
//!   themselves. Precisely (`Raft::host_lease_anchor`): the leader numbers its heartbeat
//!   rounds; a follower process records the first receipt of each round newer than all
//!   it recorded; the leader confirms round R to the follower (`lease_seq`) only after it
//!   received a successful acknowledgement of R *from that same process* (its
//!   incarnation, `lease_incarnation`) while it held its own leader lease; the lease runs
//!   from the process's recorded receipt of the latest confirmed round, and only once the
//!   host applied the commit index the confirming append carried.
//! - The leader may declare a host dead only once `L(1 + eps)` has passed on the
//!   leader's clock since it received that host's last acknowledgement.
//! - A newly elected leader first waits `L(1 + eps) + ET(1 + eps)` from its election
//!   before declaring anyone dead (ET: the election timeout, the leader lease's length).
//!   It does not know which acknowledgements its predecessor received: the predecessor
//!   confirms host lease rounds only from acknowledgements it received while it held
//!   its leader lease, and that lease may still run for up to ET after the new leader's
//!   election when voters stopped honouring it early, after they saw the old leader's
//!   connection break (fast failover, `Raft::leader_connection_lost`). Were the
//!   connection break spurious (the old leader alive), the extra ET still covers it.
//!
//! Why it is safe: the confirmed acknowledgement was sent by the same process after it
//! received the round (a restarted process does not remember its predecessor's
//! receipts, hence the incarnation), so in true time `host receipt <= leader receipt`
//! of that acknowledgement `<=` the leader's last acknowledgement from the host. A host clock that runs slow by eps
//! turns the host's `L(1 - eps)` into at most `L` of true time; a leader clock that runs
//! fast by eps turns the leader's `L(1 + eps)` into at least `L` of true time. So the
//! host fences at least `fence_margin` before the leader may act, and the margin covers
//! the time a VMM needs to stop its vCPUs.
//!
//! All times here are nanoseconds of CLOCK_MONOTONIC on the machine that reads them;
//! a lease is never extended by a wall-clock reading.

use crate::config::Timing;

const PPM: u64 = 1_000_000;
const NS_PER_MS: u64 = 1_000_000;

/// The lease figures derived from the configured timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRules {
    /// `L(1 - eps) - fence_margin`: how long a host may run its VMs after the receipt
    /// of an acknowledged heartbeat.
    pub host_lease_ns: u64,
    /// `L(1 + eps)`: how long the leader waits after a host's last acknowledgement
    /// before it may declare the host dead.
    pub leader_wait_ns: u64,
    /// `L(1 + eps) + ET(1 + eps)`: how long a new leader waits after its election before
    /// it may declare any host dead.
    pub new_leader_wait_ns: u64,
}

impl LeaseRules {
    pub fn new(timing: &Timing) -> Self {
        let lease_ns = timing.lease_ms * NS_PER_MS;
        let eps_ns = lease_ns * timing.clock_rate_bound_ppm / PPM;
        let margin_ns = timing.fence_margin_ms * NS_PER_MS;
        assert!(
            eps_ns + margin_ns < lease_ns,
            "config validation keeps a positive lease"
        );
        // Round the host's lease down and the leader's wait up: both err on the safe side.
        let host_lease_ns = lease_ns - eps_ns - margin_ns;
        let leader_wait_ns = lease_ns + (lease_ns * timing.clock_rate_bound_ppm).div_ceil(PPM);
        let election_ns = timing.election_min_ms * NS_PER_MS;
        let new_leader_wait_ns = leader_wait_ns
            + election_ns
            + (election_ns * timing.clock_rate_bound_ppm).div_ceil(PPM);
        LeaseRules {
            host_lease_ns,
            leader_wait_ns,
            new_leader_wait_ns,
        }
    }

    /// When a host's lease ends, given when it received the acknowledged heartbeat.
    pub fn host_lease_expiry(&self, heartbeat_receipt_ns: u64) -> u64 {
        heartbeat_receipt_ns + self.host_lease_ns
    }

    /// Whether the leader may declare a host dead at `now`, given when it received the
    /// host's last acknowledgement (None: never since this leader took over) and when
    /// this leader was elected.
    pub fn may_declare_dead(
        &self,
        now_ns: u64,
        last_ack_receipt_ns: Option<u64>,
        elected_at_ns: u64,
    ) -> bool {
        let since_election = now_ns.saturating_sub(elected_at_ns);
        if since_election < self.new_leader_wait_ns {
            return false;
        }
        match last_ack_receipt_ns {
            Some(ack) => now_ns.saturating_sub(ack) >= self.leader_wait_ns,
            None => true,
        }
    }
}

/// This host's own lease expiry on its clock (None: no lease), exactly as the simulator
/// computes it (`own_lease` in `sim/world/hosts.rs`). The lease runs from a leader
/// contact only once this host's state machine applied everything the leader had
/// committed at that contact; otherwise a host whose state lags the log (restart,
/// partition) would renew VMMs of VMs that were moved meanwhile. A leader's lease runs
/// from its last quorum contact; a follower's from `Raft::host_lease_anchor`. Never
/// from a wall-clock reading.
pub fn own_lease_expiry(raft: &crate::raft::Raft, rules: &LeaseRules) -> Option<u64> {
    let start = if raft.is_leader() {
        let caught_up = raft.applied_index() >= raft.commit_index()
            && raft.term_at(raft.commit_index()) == Some(raft.term());
        raft.quorum_contact().filter(|_| caught_up)
    } else {
        raft.host_lease_anchor()
            .filter(|&(_, commit)| raft.applied_index() >= commit)
            .map(|(t, _)| t)
    }?;
    Some(rules.host_lease_expiry(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> LeaseRules {
        LeaseRules::new(&Timing::default())
    }

    #[test]
    fn default_figures() {
        // L = 500 ms, eps = 1 %, margin = 50 ms.
        let r = rules();
        assert_eq!(r.host_lease_ns, 445 * NS_PER_MS);
        assert_eq!(r.leader_wait_ns, 505 * NS_PER_MS);
        // Plus ET = 100 ms (1 %) after an election.
        assert_eq!(r.new_leader_wait_ns, 606 * NS_PER_MS);
    }

    #[test]
    fn leader_waits_after_ack_and_after_election() {
        let r = rules();
        let ms = NS_PER_MS;
        let elected = 1_000 * ms;
        // Right after the election nobody may be declared dead, even without any ack.
        assert!(!r.may_declare_dead(elected + 605 * ms, None, elected));
        assert!(r.may_declare_dead(elected + 606 * ms, None, elected));
        // A recent ack protects the host for L(1 + eps).
        let ack = elected + 700 * ms;
        assert!(!r.may_declare_dead(ack + 504 * ms, Some(ack), elected));
        assert!(r.may_declare_dead(ack + 505 * ms, Some(ack), elected));
    }

    /// The predecessor's late confirmations: the old leader's lease (ET less 3 % on its
    /// clock) started no earlier than the new leader's election can have (a voter of the
    /// new leader answered the old leader's round first). At worst the old leader
    /// received a host's acknowledgement, and the host the heartbeat, at the very end of
    /// that lease, right after the election: over clock rates within the bound the host
    /// still fences at least the fence margin before the new leader may declare it dead.
    #[test]
    fn new_leader_waits_out_the_predecessors_lease_too() {
        let r = rules();
        let timing = Timing::default();
        let et = (timing.election_min_ms * NS_PER_MS) as f64;
        let margin = (timing.fence_margin_ms * NS_PER_MS) as f64;
        let true_ns = |own: f64, rate_ppm: i64| own / (1.0 + rate_ppm as f64 / 1e6);
        for old_rate in [-10_000i64, 0, 10_000] {
            for host_rate in [-10_000i64, 0, 10_000] {
                for new_rate in [-10_000i64, 0, 10_000] {
                    // True time; the old leader's lease round started at 0, the election
                    // right after it.
                    let lease_end = true_ns(et - et * 3.0 / 100.0, old_rate);
                    let host_fences = lease_end + true_ns(r.host_lease_ns as f64, host_rate);
                    let new_leader_acts = true_ns(r.new_leader_wait_ns as f64, new_rate);
                    assert!(
                        new_leader_acts - host_fences >= margin - 1.0,
                        "rates {old_rate}/{host_rate}/{new_rate} ppm: host fences at \
                         {host_fences}, new leader acts at {new_leader_acts}"
                    );
                }
            }
        }
        // Without the ET the new leader could act before the host fences.
        let short = true_ns(r.leader_wait_ns as f64, 10_000);
        let late_host = true_ns(et * 0.97, -10_000) + true_ns(r.host_lease_ns as f64, -10_000);
        assert!(short - late_host < margin);
    }

    /// Over a grid of clock rates within the bound and message delays, the host's
    /// fencing (in true time) never comes after the leader's verdict (in true time), and
    /// comes at least the fence margin before it. With a zero margin the inequality is
    /// tight at the extreme rates, so an error in either formula makes this fail.
    #[test]
    fn host_always_fences_before_the_leader_may_act() {
        for margin_ms in [0, 50] {
            let timing = Timing {
                fence_margin_ms: margin_ms,
                ..Timing::default()
            };
            let r = LeaseRules::new(&timing);
            for host_rate_ppm in [-10_000i64, -5_000, 0, 5_000, 10_000] {
                for leader_rate_ppm in [-10_000i64, 0, 10_000] {
                    for delay_us in [0u64, 10, 1_000, 100_000] {
                        // True time of the host's receipt; the ack reaches the leader later.
                        let host_receipt = 10_000_000_000u64;
                        let leader_receipt = host_receipt + delay_us * 1_000;
                        // A clock running at (1 + rate) needs own / (1 + rate) true time.
                        let true_ns =
                            |own: u64, rate_ppm: i64| own as f64 / (1.0 + rate_ppm as f64 / 1e6);
                        let host_fences =
                            host_receipt as f64 + true_ns(r.host_lease_ns, host_rate_ppm);
                        let leader_acts =
                            leader_receipt as f64 + true_ns(r.leader_wait_ns, leader_rate_ppm);
                        let gap_ns = leader_acts - host_fences;
                        assert!(
                            gap_ns >= (margin_ms * NS_PER_MS) as f64 - 1.0,
                            "margin {margin_ms} ms, host rate {host_rate_ppm} ppm, leader rate \
                             {leader_rate_ppm} ppm, delay {delay_us} us: gap {gap_ns} ns"
                        );
                    }
                }
            }
        }
    }
}
