//! The leader's failure detection: which hosts it may declare dead (the lease rules,
//! a safety decision), and how suspicious each host looks (phi accrual, information for
//! `/status` and `/metrics` only).
//!
//! Pure: the caller passes the leader's CLOCK_MONOTONIC readings in nanoseconds.
//!
//! "Suspect" is not replicated. It is the current leader's local opinion, derived from
//! its own clock and changing at heartbeat frequency; putting it in the log would add
//! clock-driven entries at that rate, and no decision depends on it: only the lease
//! rules declare a host dead. A follower's `/status` shows the replicated state and
//! leaves suspicion to the leader's.

use std::collections::BTreeMap;

use super::lease::LeaseRules;
use crate::cluster::command::{Command, HostId};
use crate::cluster::state::{ClusterState, HostState};
use crate::limits::PHI_WINDOW;

/// Phi accrual failure detector (Hayashibara et al., 2004) for one host: from the
/// inter-arrival times of its heartbeat acknowledgements, assumed normally
/// distributed, `phi(t) = -log10(P(the next ack comes later than t - last))`.
/// Fixed-size ring buffer of the latest [`PHI_WINDOW`] intervals: no allocation per
/// sample.
#[derive(Clone, Debug)]
pub struct PhiAccrual {
    intervals_ns: [u64; PHI_WINDOW],
    len: usize,
    next: usize,
    last_ns: Option<u64>,
    /// A floor under the standard deviation: very regular acks would otherwise make a
    /// few milliseconds of jitter look like certain death.
    min_std_dev_ns: f64,
}

impl PhiAccrual {
    pub fn new(min_std_dev_ns: u64) -> Self {
        PhiAccrual {
            intervals_ns: [0; PHI_WINDOW],
            len: 0,
            next: 0,
            last_ns: None,
            min_std_dev_ns: min_std_dev_ns.max(1) as f64,
        }
    }

    /// Records an acknowledgement received at `now_ns`.
    pub fn record(&mut self, now_ns: u64) {
        if let Some(last) = self.last_ns {
            let interval = now_ns.saturating_sub(last);
            self.intervals_ns[self.next] = interval;
            self.next = (self.next + 1) % PHI_WINDOW;
            self.len = (self.len + 1).min(PHI_WINDOW);
        }
        self.last_ns = Some(self.last_ns.map_or(now_ns, |last| last.max(now_ns)));
    }

    pub fn last_ns(&self) -> Option<u64> {
        self.last_ns
    }

    pub fn samples(&self) -> usize {
        self.len
    }

    /// Mean and standard deviation of the recorded intervals (None before the first).
    pub fn mean_and_std_dev_ns(&self) -> Option<(f64, f64)> {
        if self.len == 0 {
            return None;
        }
        let samples = &self.intervals_ns[..self.len];
        let n = self.len as f64;
        let mean = samples.iter().map(|&x| x as f64).sum::<f64>() / n;
        let variance = samples
            .iter()
            .map(|&x| (x as f64 - mean) * (x as f64 - mean))
            .sum::<f64>()
            / n;
        Some((mean, variance.sqrt().max(self.min_std_dev_ns)))
    }

    /// The suspicion level at `now_ns`: 0 with nothing to go on (no interval yet), and
    /// growing without bound the longer acks stay away. phi = 1 means a 10 % chance
    /// the host is fine and the ack merely late, phi = 3 a 0.1 % chance.
    pub fn phi(&self, now_ns: u64) -> f64 {
        let (Some(last), Some((mean, std_dev))) = (self.last_ns, self.mean_and_std_dev_ns()) else {
            return 0.0;
        };
        let elapsed = now_ns.saturating_sub(last) as f64;
        let z = (elapsed - mean) / (std_dev * std::f64::consts::SQRT_2);
        // P_later = 1 - Phi(elapsed) = erfc(z) / 2; computed as a logarithm so that it
        // does not underflow to zero when the host has been silent for long.
        let ln_p_later = ln_erfc(z) - std::f64::consts::LN_2;
        (-ln_p_later / std::f64::consts::LN_10).max(0.0)
    }
}

/// ln(erfc(x)), from the Chebyshev fit of Numerical Recipes (`erfcc`, fractional error
/// below 1.2e-7), in log form for large x.
fn ln_erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398
                                + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let ln_erfc_z = t.ln() - z * z + poly;
    if x >= 0.0 {
        ln_erfc_z
    } else {
        // erfc(-z) = 2 - erfc(z)
        (2.0 - ln_erfc_z.exp()).ln()
    }
}

/// Per-host acknowledgement bookkeeping of the current leader.
#[derive(Clone, Debug)]
pub struct FailureDetector {
    rules: LeaseRules,
    elected_at_ns: u64,
    min_std_dev_ns: u64,
    hosts: BTreeMap<HostId, PhiAccrual>,
}

/// How a host looks to the leader, for `/status` (replicated state plus suspicion).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostHealth {
    pub host: HostId,
    pub state: HostState,
    /// Alive, but phi passed the suspicion threshold.
    pub suspect: bool,
    pub phi: f64,
    /// Nanoseconds since the last acknowledgement this leader received (None: none).
    pub since_last_ack_ns: Option<u64>,
}

impl FailureDetector {
    /// A detector for a leader elected at `elected_at_ns`; it knows no acknowledgement
    /// yet (its predecessor's are unknown to it).
    pub fn new(rules: LeaseRules, elected_at_ns: u64, min_std_dev_ns: u64) -> Self {
        FailureDetector {
            rules,
            elected_at_ns,
            min_std_dev_ns,
            hosts: BTreeMap::new(),
        }
    }

    /// A heartbeat acknowledgement from `host` was received at `now_ns`.
    pub fn on_ack(&mut self, host: HostId, now_ns: u64) {
        let min = self.min_std_dev_ns;
        self.hosts
            .entry(host)
            .or_insert_with(|| PhiAccrual::new(min))
            .record(now_ns);
    }

    /// Forgets hosts no longer in the state (bounded memory).
    pub fn retain_known(&mut self, state: &ClusterState) {
        self.hosts.retain(|id, _| state.host(*id).is_some());
    }

    pub fn last_ack_ns(&self, host: HostId) -> Option<u64> {
        self.hosts.get(&host).and_then(|p| p.last_ns())
    }

    pub fn phi(&self, host: HostId, now_ns: u64) -> f64 {
        self.hosts.get(&host).map_or(0.0, |p| p.phi(now_ns))
    }

    /// The `HostDead` commands to propose at `now_ns`: every host not yet dead, other
    /// than the leader's own, whose last acknowledgement (to this leader) is at least
    /// L(1 + eps) old, once L(1 + eps) has passed since this leader's election.
    pub fn hosts_to_declare_dead(
        &self,
        state: &ClusterState,
        leader: HostId,
        now_ns: u64,
    ) -> Vec<Command> {
        declare_dead(
            state,
            &self.rules,
            leader,
            now_ns,
            self.elected_at_ns,
            |host| self.last_ack_ns(host),
        )
    }

    /// The `HostAlive` commands to propose at `now_ns`: dead hosts that acknowledged a
    /// heartbeat of this leader recently enough that they could not be declared dead
    /// now, and the leader's own host if an earlier leader declared it dead (it never
    /// acknowledges itself; without this its host stayed dead for good, and with no
    /// other host left its VMs waited forever: the simulator's seed 3144). Safe at any
    /// time: their VMs were moved under new tokens when they were declared dead, and
    /// reconcile on the returning host stops its stale VMMs.
    pub fn hosts_to_revive(
        &self,
        state: &ClusterState,
        leader: HostId,
        now_ns: u64,
    ) -> Vec<Command> {
        state
            .hosts()
            .filter(|host| host.state == HostState::Dead)
            .filter(|host| {
                host.id == leader
                    || self
                        .last_ack_ns(host.id)
                        .is_some_and(|ack| now_ns.saturating_sub(ack) < self.rules.leader_wait_ns)
            })
            .map(|host| Command::HostAlive { host: host.id })
            .collect()
    }

    /// Every known host's health, for `/status` and `/metrics`.
    pub fn health(&self, state: &ClusterState, now_ns: u64, phi_threshold: f64) -> Vec<HostHealth> {
        state
            .hosts()
            .map(|host| {
                let phi = self.phi(host.id, now_ns);
                HostHealth {
                    host: host.id,
                    state: host.state,
                    suspect: host.state != HostState::Dead && phi >= phi_threshold,
                    phi,
                    since_last_ack_ns: self.last_ack_ns(host.id).map(|t| now_ns.saturating_sub(t)),
                }
            })
            .collect()
    }
}

/// The decision itself, as a pure function of the state, the lease rules, the
/// leader's election time and each host's last acknowledgement receipt time.
pub fn declare_dead(
    state: &ClusterState,
    rules: &LeaseRules,
    leader: HostId,
    now_ns: u64,
    elected_at_ns: u64,
    last_ack_ns: impl Fn(HostId) -> Option<u64>,
) -> Vec<Command> {
    state
        .hosts()
        .filter(|host| host.state != HostState::Dead && host.id != leader)
        .filter(|host| rules.may_declare_dead(now_ns, last_ack_ns(host.id), elected_at_ns))
        .map(|host| {
            let reason = match last_ack_ns(host.id) {
                Some(ack) => format!(
                    "no heartbeat acknowledgement for {} ms",
                    now_ns.saturating_sub(ack) / 1_000_000
                ),
                None => format!(
                    "no heartbeat acknowledgement since this leader's election {} ms ago",
                    now_ns.saturating_sub(elected_at_ns) / 1_000_000
                ),
            };
            Command::HostDead {
                host: host.id,
                reason,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::command::{RequestId, Resources};
    use crate::config::Timing;

    const MS: u64 = 1_000_000;

    fn state_with_hosts(ids: &[HostId]) -> ClusterState {
        let mut state = ClusterState::new();
        for (i, &id) in ids.iter().enumerate() {
            let command = Command::RegisterHost {
                host: id,
                capacity: Resources {
                    memory_bytes: 1 << 30,
                    vcpus: 4,
                },
            };
            state.apply(i as u64 + 1, &command.to_bytes(RequestId(0)));
        }
        state
    }

    fn dead_hosts(commands: &[Command]) -> Vec<HostId> {
        commands
            .iter()
            .map(|c| match c {
                Command::HostDead { host, .. } => *host,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn declared_dead_only_after_the_wait_since_ack_and_since_election() {
        let rules = LeaseRules::new(&Timing::default());
        let wait = rules.leader_wait_ns;
        let election_wait = rules.new_leader_wait_ns;
        let mut state = state_with_hosts(&[1, 2, 3]);
        let elected = 10_000 * MS;
        let mut detector = FailureDetector::new(rules, elected, MS);
        // Host 2 acks shortly after the election; host 3 never does.
        detector.on_ack(2, elected + 200 * MS);
        // Before the election wait nobody is declared dead, not even the silent host 3.
        assert!(detector
            .hosts_to_declare_dead(&state, 1, elected + election_wait - 1)
            .is_empty());
        // At the election wait: host 3 (never acked); host 2 is protected by its ack;
        // host 1 is the leader itself.
        assert_eq!(
            dead_hosts(&detector.hosts_to_declare_dead(&state, 1, elected + election_wait)),
            vec![3]
        );
        let ack = elected + 200 * MS;
        assert_eq!(
            dead_hosts(&detector.hosts_to_declare_dead(&state, 1, ack + wait - 1)),
            vec![3]
        );
        assert_eq!(
            dead_hosts(&detector.hosts_to_declare_dead(&state, 1, ack + wait)),
            vec![2, 3]
        );
        // A later ack pushes host 2's verdict back again.
        detector.on_ack(2, ack + wait - 10 * MS);
        assert_eq!(
            dead_hosts(&detector.hosts_to_declare_dead(&state, 1, ack + wait)),
            vec![3]
        );
        // Hosts already dead are not declared again.
        let command = Command::HostDead {
            host: 3,
            reason: "test".into(),
        };
        state.apply(10, &command.to_bytes(RequestId(0)));
        assert!(detector
            .hosts_to_declare_dead(&state, 1, ack + wait)
            .is_empty());
        // Host 3 acks again: it is revived (and only it; host 2 is alive already).
        let back = ack + wait + 50 * MS;
        assert!(detector.hosts_to_revive(&state, 1, back).is_empty());
        detector.on_ack(3, back);
        assert_eq!(
            detector.hosts_to_revive(&state, 1, back + 10 * MS),
            vec![Command::HostAlive { host: 3 }]
        );
        // An old ack does not revive it.
        assert!(detector.hosts_to_revive(&state, 1, back + wait).is_empty());
        // A leader whose own host an earlier leader declared dead revives it.
        assert_eq!(
            detector.hosts_to_revive(&state, 3, back + wait),
            vec![Command::HostAlive { host: 3 }]
        );
    }

    #[test]
    fn phi_rises_as_acks_stop_arriving() {
        let mut phi = PhiAccrual::new(MS);
        assert_eq!(phi.phi(0), 0.0, "nothing to go on");
        // Acks every 20 ms with a little jitter.
        let mut t = 0;
        for i in 0..200u64 {
            t += 20 * MS + (i % 5) * MS / 2;
            phi.record(t);
        }
        assert_eq!(phi.samples(), PHI_WINDOW, "the window is bounded");
        let (mean, _) = phi.mean_and_std_dev_ns().unwrap();
        assert!(
            (20.0 * MS as f64..=23.0 * MS as f64).contains(&mean),
            "{mean}"
        );
        // Right after an ack: no suspicion.
        assert!(phi.phi(t + MS) < 0.1, "{}", phi.phi(t + MS));
        // Strictly rising while the acks stay away, and high after a few missed ones.
        let mut previous = phi.phi(t);
        for ms in (5..=500).step_by(5) {
            let now = phi.phi(t + ms * MS);
            assert!(now >= previous, "phi fell at {ms} ms: {previous} -> {now}");
            assert!(now.is_finite());
            previous = now;
        }
        assert!(phi.phi(t + 60 * MS) > 8.0, "{}", phi.phi(t + 60 * MS));
        assert!(phi.phi(t + 500 * MS) > phi.phi(t + 100 * MS));
        // An ack brings it back down.
        phi.record(t + 500 * MS);
        assert!(phi.phi(t + 501 * MS) < 1.0);
    }

    #[test]
    fn ln_erfc_matches_known_values() {
        // erfc(0) = 1, erfc(1) = 0.157299207, erfc(-1) = 1.842700793, erfc(3) = 2.209e-5.
        for (x, expected) in [
            (0.0, 1.0),
            (1.0, 0.157_299_207),
            (-1.0, 1.842_700_793),
            (3.0, 2.209_049_7e-5),
        ] {
            let got = ln_erfc(x).exp();
            assert!(
                ((got - expected) / expected).abs() < 1e-6,
                "erfc({x}) = {got}"
            );
        }
        // Far out it stays finite (no underflow to ln 0).
        assert!(ln_erfc(100.0).is_finite());
    }

    #[test]
    fn health_reports_suspects() {
        let state = state_with_hosts(&[1, 2]);
        let rules = LeaseRules::new(&Timing::default());
        let mut detector = FailureDetector::new(rules, 0, MS);
        for i in 1..=50 {
            detector.on_ack(1, i * 20 * MS);
            detector.on_ack(2, i * 20 * MS);
        }
        let now = 50 * 20 * MS + 10 * MS;
        assert!(detector.health(&state, now, 8.0).iter().all(|h| !h.suspect));
        let later = now + 200 * MS;
        detector.on_ack(1, later);
        let health = detector.health(&state, later, 8.0);
        assert!(!health[0].suspect);
        assert!(health[1].suspect, "{health:?}");
        assert_eq!(health[1].since_last_ack_ns, Some(210 * MS));
    }
}
