//! The leader's duties, as a pure clock-fed component: feed the `FailureDetector` with
//! Raft's acknowledgement receipt times, then decide what to propose this tick:
//! registrations, host verdicts (`HostDead` / `HostAlive`, with the new leader's
//! L(1 + eps) wait), and `placement::plan` (placements, drains, waiting reasons).
//!
//! The same logic the simulator checks over thousands of seeds (`leader_duties` in
//! `sim/world/hosts.rs`): at most one round of proposals is in flight; a new round
//! waits until this node applied the last proposal of the previous one. The caller
//! proposes the commands in order, stops at the first refused one, and reports each
//! accepted proposal with [`LeaderDuties::proposed`].

use std::collections::BTreeMap;

use super::failure::{FailureDetector, HostHealth};
use super::lease::LeaseRules;
use crate::cluster::command::{Command, HostId, Resources};
use crate::cluster::placement;
use crate::cluster::state::ClusterState;
use crate::raft::{Nanos, NodeId, Raft, Term};

/// What the duties need to know of Raft (built from a `Raft` with [`RaftView::of`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftView {
    pub me: NodeId,
    pub is_leader: bool,
    pub term: Term,
    /// Every member (voters, then observers), this node included.
    pub members: Vec<NodeId>,
    /// Leader: per other member, when its last response of this term was received
    /// (none or 0: not yet).
    pub last_acks: Vec<(NodeId, Nanos)>,
}

impl RaftView {
    pub fn of(raft: &Raft, me: NodeId) -> RaftView {
        let m = raft.membership();
        let members: Vec<NodeId> = m
            .voters
            .as_slice()
            .iter()
            .chain(m.observers.as_slice())
            .copied()
            .collect();
        let last_acks = members
            .iter()
            .filter(|&&p| p != me)
            .filter_map(|&p| raft.peer_last_ack(p).map(|t| (p, t)))
            .collect();
        RaftView {
            me,
            is_leader: raft.is_leader(),
            term: raft.term(),
            members,
            last_acks,
        }
    }
}

/// The leader-side state of one node (it is reset whenever the node is not leader).
#[derive(Clone, Debug)]
pub struct LeaderDuties {
    rules: LeaseRules,
    min_std_dev_ns: u64,
    detector: Option<(Term, FailureDetector)>,
    /// Per member, the acknowledgement time last fed to the detector.
    fed: BTreeMap<NodeId, Nanos>,
    /// The last proposal of this node as leader (term, index).
    proposed: (Term, u64),
    /// Planted bug for the simulator: a new leader does not wait L(1 + eps).
    pub bug_skip_new_leader_lease_wait: bool,
}

impl LeaderDuties {
    /// `min_std_dev_ns`: the phi-accrual floor (about one duty tick).
    pub fn new(rules: LeaseRules, min_std_dev_ns: u64) -> Self {
        LeaderDuties {
            rules,
            min_std_dev_ns,
            detector: None,
            fed: BTreeMap::new(),
            proposed: (0, 0),
            bug_skip_new_leader_lease_wait: false,
        }
    }

    /// Forgets everything (the agent restarted).
    pub fn reset(&mut self) {
        self.detector = None;
        self.fed.clear();
        self.proposed = (0, 0);
    }

    /// The commands to propose at `now_ns` (this node's clock). `register(member)`: the
    /// capacity to register a member the state does not know yet with (None: the leader
    /// does not register it; hosts may register themselves).
    pub fn tick(
        &mut self,
        raft: &RaftView,
        state: &ClusterState,
        now_ns: Nanos,
        register: impl Fn(NodeId) -> Option<Resources>,
    ) -> Vec<Command> {
        if !raft.is_leader {
            self.detector = None;
            return Vec::new();
        }
        let term = raft.term;
        if self.detector.as_ref().is_none_or(|(t, _)| *t != term) {
            // Noticed at the first tick as leader: no earlier than the election.
            let elected_at = if self.bug_skip_new_leader_lease_wait {
                now_ns.saturating_sub(self.rules.new_leader_wait_ns)
            } else {
                now_ns
            };
            self.detector = Some((
                term,
                FailureDetector::new(self.rules, elected_at, self.min_std_dev_ns),
            ));
            self.fed.clear();
        }
        let (_, det) = self.detector.as_mut().expect("set above");
        for &(peer, t) in &raft.last_acks {
            if peer == raft.me || t == 0 {
                continue;
            }
            if self.fed.get(&peer) != Some(&t) {
                self.fed.insert(peer, t);
                det.on_ack(peer, t);
            }
        }
        if self.proposed.0 == term && state.applied_index() < self.proposed.1 {
            return Vec::new();
        }
        let mut cmds = Vec::new();
        for &peer in &raft.members {
            if state.host(peer).is_none() {
                if let Some(capacity) = register(peer) {
                    cmds.push(Command::RegisterHost {
                        host: peer,
                        capacity,
                    });
                }
            }
        }
        if !cmds.is_empty() {
            // Register first; verdicts and placement once the hosts are known.
            return cmds;
        }
        cmds.extend(det.hosts_to_declare_dead(state, raft.me, now_ns));
        cmds.extend(det.hosts_to_revive(state, raft.me, now_ns));
        if cmds.is_empty() {
            cmds.extend(placement::plan(state).commands);
        }
        cmds
    }

    /// The caller proposed a command of this tick at `index` in `term`.
    pub fn proposed(&mut self, term: Term, index: u64) {
        self.proposed = (term, index);
    }

    /// Every known host's health as this leader sees it (None: not leader).
    pub fn health(
        &self,
        state: &ClusterState,
        now_ns: Nanos,
        phi_threshold: f64,
    ) -> Option<Vec<HostHealth>> {
        self.detector
            .as_ref()
            .map(|(_, det)| det.health(state, now_ns, phi_threshold))
    }

    /// Phi of one host (None: not leader).
    pub fn phi(&self, host: HostId, now_ns: Nanos) -> Option<f64> {
        self.detector.as_ref().map(|(_, det)| det.phi(host, now_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testkit::Harness;
    use crate::config::Timing;

    const MS: u64 = 1_000_000;

    fn view(acks: &[(NodeId, Nanos)]) -> RaftView {
        RaftView {
            me: 1,
            is_leader: true,
            term: 3,
            members: vec![1, 2, 3],
            last_acks: acks.to_vec(),
        }
    }

    fn duties() -> LeaderDuties {
        LeaderDuties::new(LeaseRules::new(&Timing::default()), 10 * MS)
    }

    fn dead(cmds: &[Command]) -> Vec<HostId> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::HostDead { host, .. } => Some(*host),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_new_leader_waits_its_lease_before_declaring_a_silent_host_dead() {
        let mut h = Harness::new();
        h.host(1, 4, 4);
        h.host(2, 4, 4);
        h.host(3, 4, 4);
        let wait = LeaseRules::new(&Timing::default()).new_leader_wait_ns;
        let t0 = 1_000 * MS;
        let mut d = duties();
        // Host 3 acknowledges all along; host 2 never does.
        let none = |_| None;
        assert!(dead(&d.tick(&view(&[(3, t0)]), &h.state, t0, none)).is_empty());
        let before = t0 + wait - 1;
        assert!(
            dead(&d.tick(&view(&[(3, before)]), &h.state, before, none)).is_empty(),
            "no verdict before L(1 + eps) since the election"
        );
        let at = t0 + wait;
        assert_eq!(
            dead(&d.tick(&view(&[(3, at)]), &h.state, at, none)),
            vec![2]
        );
        // With the planted bug the verdict comes at once.
        let mut bad = duties();
        bad.bug_skip_new_leader_lease_wait = true;
        assert_eq!(
            dead(&bad.tick(&view(&[(3, t0)]), &h.state, t0, none)),
            vec![2]
        );
        // Not leader: nothing, and the detector is forgotten.
        let mut follower = view(&[]);
        follower.is_leader = false;
        assert!(d.tick(&follower, &h.state, at, none).is_empty());
        assert!(d.phi(2, at).is_none());
    }

    #[test]
    fn registers_first_then_places_one_round_at_a_time() {
        let mut h = Harness::new();
        let mut d = duties();
        let cap = Resources {
            memory_bytes: 4 << 30,
            vcpus: 4,
        };
        let t = 10 * MS;
        let acks = [(2, t), (3, t)];
        let cmds = d.tick(&view(&acks), &h.state, t, |id| (id == 1).then_some(cap));
        assert_eq!(
            cmds,
            vec![Command::RegisterHost {
                host: 1,
                capacity: cap
            }]
        );
        h.ok(cmds[0].clone());
        d.proposed(3, h.state.applied_index());
        h.vm("a", 1024, 1, None);
        // The registration applied: placement of the new VM on the only host.
        let cmds = d.tick(&view(&acks), &h.state, t, |_| None);
        assert!(
            matches!(&cmds[..], [Command::PlaceVm { vm, host: 1, .. }] if vm == "a"),
            "{cmds:?}"
        );
        // Proposed at an index not applied yet: no new round.
        d.proposed(3, h.state.applied_index() + 1);
        assert!(d.tick(&view(&acks), &h.state, t, |_| None).is_empty());
        // A new term starts over.
        let mut v = view(&acks);
        v.term = 4;
        assert!(!d.tick(&v, &h.state, t, |_| None).is_empty());
    }
}
