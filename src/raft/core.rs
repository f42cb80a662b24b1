//! The Raft state machine: pure, single-threaded, no I/O, no clock, seeded randomness.
//!
//! Inputs: [`Raft::step`] (a message), [`Raft::tick`] (the time), [`Raft::propose`],
//! [`Raft::read_index`], [`Raft::change_membership`], [`Raft::transfer_leadership`],
//! [`Raft::persisted`], [`Raft::applied_to`], [`Raft::compact`]. Outputs accumulate in
//! [`Outputs`] until the driver takes them (see `driver.rs` for the required order).

use super::log::RaftLog;
use super::progress::{Progress, ProgressState};
use super::rng::Rng;
use super::types::*;
use crate::limits;
use std::collections::VecDeque;

/// Deliberate bugs for checking that the simulator's checks can fail. All off by default;
/// never set outside tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs {
    /// Grant votes without the "candidate's log is at least as up to date" check.
    pub vote_without_log_check: bool,
    /// Commit an entry of an earlier term by counting replicas.
    pub commit_old_term_by_count: bool,
    /// Send votes and append acknowledgements before they are durable.
    pub ack_before_persist: bool,
    /// A follower takes the leader's commit index up to its own last index, not only
    /// up to the last entry known to match the leader's log.
    pub follower_commit_unchecked: bool,
    /// Grant a vote even when this node already voted for another candidate in the term.
    pub vote_twice: bool,
    /// Start the leader's lease at its election instead of at answered heartbeats.
    pub lease_from_election: bool,
    /// A follower serves reads at its own commit index without asking the leader.
    pub follower_read_local: bool,
}

impl Bugs {
    pub fn any(&self) -> bool {
        self.vote_without_log_check
            || self.commit_old_term_by_count
            || self.ack_before_persist
            || self.follower_commit_unchecked
            || self.vote_twice
            || self.lease_from_election
            || self.follower_read_local
    }
}

/// Settings of one node.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    pub heartbeat_interval: Nanos,
    /// The election timeout is drawn uniformly from
    /// `[election_timeout, election_timeout + election_spread)`. The lower bound is also
    /// the CheckQuorum period and how long a follower stays loyal to a live leader.
    pub election_timeout: Nanos,
    pub election_spread: Nanos,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub max_entries_per_append: usize,
    pub max_append_bytes: usize,
    pub max_inflight_appends: usize,
    pub max_inflight_bytes: usize,
    /// Entries held in memory (after the last snapshot); proposals wait when full.
    pub log_capacity: usize,
    pub max_pending_reads: usize,
    pub snapshot_chunk_bytes: usize,
    pub seed: u64,
    /// Which process of this node this is: nonzero, and different for every start of
    /// the node (a random number). Acknowledgements carry it and the leader echoes it
    /// with its host lease confirmation (`Body::Append::lease_incarnation`), so that a
    /// restarted process never takes a confirmation meant for its predecessor.
    /// `Config::new` derives it from the seed, which must then differ per start too.
    pub incarnation: u64,
    pub bugs: Bugs,
}

impl Config {
    pub fn new(id: NodeId, seed: u64) -> Config {
        Config {
            id,
            heartbeat_interval: 20_000_000,
            election_timeout: 100_000_000,
            election_spread: 100_000_000,
            pre_vote: true,
            check_quorum: true,
            max_entries_per_append: limits::MAX_ENTRIES_PER_APPEND,
            max_append_bytes: limits::MAX_APPEND_BYTES,
            max_inflight_appends: limits::MAX_INFLIGHT_APPENDS,
            max_inflight_bytes: limits::MAX_INFLIGHT_BYTES,
            log_capacity: limits::RAFT_LOG_CAPACITY,
            max_pending_reads: limits::MAX_PENDING_READS,
            snapshot_chunk_bytes: limits::SNAPSHOT_CHUNK_BYTES,
            seed,
            incarnation: Rng::new(seed ^ id.rotate_left(32) ^ 0x1dc4_a7e0).next_u64() | 1,
            bugs: Bugs::default(),
        }
    }
}

/// What a node recovered from its storage at start.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    /// The latest snapshot: metadata and the bytes produced by [`Raft::snapshot_data`].
    pub snapshot: Option<(SnapshotMeta, Vec<u8>)>,
    /// Entries after the snapshot, in order.
    pub entries: Vec<Entry>,
}

/// Outputs waiting for the driver, which must handle them in the documented order.
#[derive(Debug)]
pub struct Outputs {
    /// Messages that may leave now.
    pub messages: Vec<Message>,
    /// Messages that promise durability: send only after the next sync completes.
    pub messages_after_persist: Vec<Message>,
    /// Storage must drop entries `>= persist_from` and write `persist_from ..= last_index`.
    pub persist_from: Option<Index>,
    /// The hard state changed; persist it.
    pub hard_state: Option<HardState>,
    /// A new snapshot (made locally or received) to persist before the log changes.
    pub snapshot: Option<SnapshotMeta>,
    /// The snapshot was received from the leader: the state machine must restore it.
    pub install_snapshot: bool,
    /// Reads that may be served once the state machine has applied their index.
    pub reads: Vec<ReadState>,
    /// Reads that will not be confirmed (leadership lost, or the leader refused).
    pub reads_failed: Vec<u64>,
    /// The known leader or the role changed.
    pub leader_changed: bool,
}

impl Outputs {
    fn new(capacity: usize) -> Outputs {
        Outputs {
            messages: Vec::with_capacity(capacity),
            messages_after_persist: Vec::with_capacity(capacity),
            persist_from: None,
            hard_state: None,
            snapshot: None,
            install_snapshot: false,
            reads: Vec::with_capacity(limits::MAX_PENDING_READS),
            reads_failed: Vec::with_capacity(limits::MAX_PENDING_READS),
            leader_changed: false,
        }
    }
    /// Forgets everything (keeps the buffers).
    pub fn clear(&mut self) {
        self.messages.clear();
        self.messages_after_persist.clear();
        self.persist_from = None;
        self.hard_state = None;
        self.snapshot = None;
        self.install_snapshot = false;
        self.reads.clear();
        self.reads_failed.clear();
        self.leader_changed = false;
    }
}

/// Heartbeat rounds remembered for the leader-lease computation.
const ROUND_HISTORY: usize = limits::RAFT_LEASE_ROUNDS;
/// Confirmed host lease anchors a follower keeps.
const LEASE_ANCHORS: usize = limits::RAFT_LEASE_ANCHORS;

#[derive(Clone, Copy, Debug)]
struct PendingRead {
    id: u64,
    /// The node that asked (this node for a local read).
    from: NodeId,
    index: Index,
    seq: u64,
}

/// Bytes of the snapshot header the core puts before the state machine's bytes.
fn snapshot_header_len(data: &[u8]) -> Result<(Membership, usize), &'static str> {
    Membership::decode(data)
}

pub struct Raft {
    cfg: Config,
    rng: Rng,
    now: Nanos,
    started: bool,
    /// No votes before this time (one election timeout after start).
    vote_fence_until: Nanos,
    /// This leader sent TimeoutNow in its term: it holds no lease any more.
    lease_void: bool,
    term: Term,
    vote: NodeId,
    role: Role,
    leader: NodeId,
    log: RaftLog,
    commit: Index,
    applied: Index,
    persisted_index: Index,
    /// The membership in effect (the latest in the log) and the index of its entry.
    membership: Membership,
    membership_index: Index,
    snapshot_membership: Membership,
    snapshot_data: Vec<u8>,
    /// A snapshot being received: (index, term, total) and the bytes so far.
    incoming: Option<(Index, Term, u64)>,
    incoming_data: Vec<u8>,
    progress: Vec<Progress>,
    votes: Vec<(NodeId, bool)>,
    election_deadline: Nanos,
    heartbeat_deadline: Nanos,
    check_quorum_deadline: Nanos,
    last_leader_contact: Nanos,
    /// The leader whose message set `last_leader_contact`.
    contact_from: NodeId,
    /// The connection to `contact_from` broke (`leader_connection_lost`): its lease is
    /// no longer honoured, until a message of a leader arrives.
    loyalty_dropped: bool,
    /// Follower: per round of the current leader (`read_seq % ROUND_HISTORY`), the
    /// first successful append's receipt time and the leader's commit index in it.
    round_receipts: [(u64, Nanos, Index); ROUND_HISTORY],
    /// Follower: the newest round recorded in `round_receipts`.
    latest_round: u64,
    /// The term `round_receipts` belong to.
    rounds_term: Term,
    /// Follower: host lease anchors, oldest first: (receipt time of a round the leader
    /// confirmed, the index this node must have applied before it may use it).
    lease_anchors: [(Nanos, Index); LEASE_ANCHORS],
    lease_anchor_count: usize,
    transfer_target: NodeId,
    transfer_deadline: Nanos,
    /// Replace: the voter to remove once the promotion of its replacement commits.
    replace_remove: NodeId,
    /// Heartbeat rounds: every Append carries the current round; a round starts with
    /// each heartbeat broadcast and each ReadIndex request. Answers echo it.
    read_seq: u64,
    /// When recent rounds started: (round, time), indexed by round modulo the length.
    round_started: [(u64, Nanos); ROUND_HISTORY],
    pending_reads: VecDeque<PendingRead>,
    out: Outputs,
}

impl Raft {
    /// A node that starts from `recovered`; `initial` is the membership every founding
    /// member shares (index 0). A node that joins later passes an empty membership.
    pub fn new(cfg: Config, initial: Membership, recovered: Recovered) -> Result<Raft, String> {
        assert!(cfg.id != 0, "node id 0 is reserved");
        assert!(cfg.heartbeat_interval > 0 && cfg.election_timeout > cfg.heartbeat_interval);
        assert!(cfg.election_spread > 0, "randomised timeouts need a spread");
        assert!(cfg.incarnation != 0, "incarnation 0 is reserved");
        let mut log = RaftLog::new(cfg.log_capacity);
        let mut snapshot_membership = initial;
        let mut snapshot_data = Vec::with_capacity(MEMBERSHIP_MAX_BYTES);
        if let Some((meta, data)) = recovered.snapshot {
            let (m, _) = snapshot_header_len(&data).map_err(|e| format!("snapshot {e}"))?;
            snapshot_membership = m;
            snapshot_data = data;
            log.reset(meta.index, meta.term);
        } else {
            initial.encode(&mut snapshot_data);
        }
        for e in &recovered.entries {
            if e.index != log.last_index() + 1 || e.term < log.last_term() {
                return Err(format!(
                    "recovered entry {} (term {}) does not follow {} (term {})",
                    e.index,
                    e.term,
                    log.last_index(),
                    log.last_term()
                ));
            }
            if log.free_slots() == 0 {
                return Err("recovered log exceeds the in-memory log capacity".into());
            }
            log.append(e.term, e.kind, &e.data);
        }
        let snapshot_index = log.snapshot_index();
        let commit = recovered
            .hard_state
            .commit
            .clamp(snapshot_index, log.last_index());
        let capacity = limits::RAFT_OUTPUT_MESSAGES;
        let mut raft = Raft {
            rng: Rng::new(cfg.seed ^ cfg.id.wrapping_mul(0x9e37_79b9)),
            now: 0,
            started: false,
            vote_fence_until: 0,
            lease_void: false,
            term: recovered.hard_state.term,
            vote: recovered.hard_state.vote,
            role: Role::Follower,
            leader: 0,
            commit,
            applied: snapshot_index,
            persisted_index: log.last_index(),
            membership: snapshot_membership,
            membership_index: snapshot_index,
            snapshot_membership,
            snapshot_data,
            incoming: None,
            incoming_data: Vec::new(),
            progress: Vec::with_capacity(limits::MAX_MEMBERS),
            votes: Vec::with_capacity(limits::MAX_VOTERS),
            election_deadline: 0,
            heartbeat_deadline: 0,
            check_quorum_deadline: 0,
            last_leader_contact: 0,
            contact_from: 0,
            loyalty_dropped: false,
            round_receipts: [(0, 0, 0); ROUND_HISTORY],
            latest_round: 0,
            rounds_term: 0,
            lease_anchors: [(0, 0); LEASE_ANCHORS],
            lease_anchor_count: 0,
            transfer_target: 0,
            transfer_deadline: 0,
            replace_remove: 0,
            read_seq: 0,
            round_started: [(0, 0); ROUND_HISTORY],
            pending_reads: VecDeque::with_capacity(cfg.max_pending_reads),
            out: Outputs::new(capacity),
            log,
            cfg,
        };
        raft.recompute_membership();
        raft.reset_election_deadline();
        Ok(raft)
    }

    // ---- Accessors -----------------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn vote(&self) -> NodeId {
        self.vote
    }
    pub fn role(&self) -> Role {
        self.role
    }
    /// The known leader of the current term, 0 if none.
    pub fn leader(&self) -> NodeId {
        self.leader
    }
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
    pub fn commit_index(&self) -> Index {
        self.commit
    }
    pub fn applied_index(&self) -> Index {
        self.applied
    }
    pub fn persisted_index(&self) -> Index {
        self.persisted_index
    }
    pub fn first_index(&self) -> Index {
        self.log.first_index()
    }
    pub fn last_index(&self) -> Index {
        self.log.last_index()
    }
    pub fn last_term(&self) -> Term {
        self.log.last_term()
    }
    pub fn term_at(&self, index: Index) -> Option<Term> {
        self.log.term(index)
    }
    /// The entry at `index` (between `first_index` and `last_index`).
    pub fn entry(&self, index: Index) -> &Entry {
        self.log.entry(index)
    }
    pub fn entries(&self, lo: Index, hi: Index) -> EntriesView<'_> {
        self.log.view(lo, hi)
    }
    pub fn membership(&self) -> &Membership {
        &self.membership
    }
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.commit,
        }
    }
    pub fn snapshot_meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            index: self.log.snapshot_index(),
            term: self.log.snapshot_term(),
        }
    }
    /// The current snapshot: a membership header, then the state machine's bytes.
    pub fn snapshot_data(&self) -> &[u8] {
        &self.snapshot_data
    }
    /// The state machine's part of the current snapshot.
    pub fn snapshot_state(&self) -> &[u8] {
        let (_, len) = snapshot_header_len(&self.snapshot_data).expect("own snapshot is valid");
        &self.snapshot_data[len..]
    }
    pub fn outputs(&self) -> &Outputs {
        &self.out
    }
    pub fn outputs_mut(&mut self) -> &mut Outputs {
        &mut self.out
    }
    /// The earliest time at which `tick` has something to do.
    pub fn next_deadline(&self) -> Nanos {
        match self.role {
            Role::Leader => {
                let mut d = self.heartbeat_deadline;
                if self.cfg.check_quorum {
                    d = d.min(self.check_quorum_deadline);
                }
                if self.transfer_target != 0 {
                    d = d.min(self.transfer_deadline);
                }
                d
            }
            _ => self.election_deadline,
        }
    }
    /// Leader: the start of the leader's lease: the latest time T such that a quorum of
    /// voters (this node included) answered a heartbeat round that started at or after
    /// T. Measured from the round's start (not the answer's receipt), so the followers'
    /// receipt of that heartbeat is never earlier than T. None unless leader.
    ///
    /// None as well once this leader has sent TimeoutNow in its term: the target's
    /// election bypasses leader stickiness, so no lease holds for the rest of the term.
    /// A lease based on this must end before `quorum_contact + election_timeout *
    /// (1 - 2 eps)` on this node's clock (followers ignore votes for one election
    /// timeout, on their own clocks, after the heartbeat they acknowledged).
    pub fn quorum_contact(&self) -> Option<Nanos> {
        if self.role != Role::Leader || self.lease_void || self.transfer_target != 0 {
            return None;
        }
        Some(self.quorum_contact_time()).filter(|&t| t != 0)
    }
    /// Leader: when the last response from `peer` (in this term) was received (the
    /// leader may declare a host dead only L(1 + eps) after this).
    pub fn peer_last_ack(&self, peer: NodeId) -> Option<Nanos> {
        if self.role != Role::Leader {
            return None;
        }
        self.progress
            .iter()
            .find(|p| p.id == peer)
            .map(|p| p.last_ack_at)
    }
    /// Follower: when the last message from the current leader was received (a host's
    /// lease runs from the receipt of a heartbeat it acknowledged).
    pub fn last_leader_contact(&self) -> Option<Nanos> {
        if self.leader == 0 || self.role == Role::Leader {
            return None;
        }
        Some(self.last_leader_contact)
    }
    /// Follower: where this host's lease may run from: (receipt time, required index) of
    /// the latest round of the current leader's appends that this process acknowledged
    /// with success, that the leader confirmed it received while it held its leader
    /// lease, and whose required index this node has applied (the leader's last log
    /// index, and its commit index, when it sent the confirmation).
    ///
    /// The rule, precisely: the leader numbers its heartbeat rounds (`read_seq`). This
    /// process records the first receipt of any append of a round, for rounds newer
    /// than every round it recorded in the term. The leader confirms round R to this
    /// node (`lease_seq = R`, `lease_incarnation`) only after it received a successful
    /// acknowledgement of R, sent by the process with that incarnation, while it held
    /// its leader lease. The anchor is this process's receipt of the latest round
    /// confirmed for its own incarnation whose required index this node applied. So the
    /// anchor precedes (in true time) an acknowledgement the leader received, and the
    /// leader's L(1 + eps) wait from its last acknowledgement covers the host's lease
    /// against any verdict proposed after that confirmation; a verdict proposed before
    /// it (or inherited in the log by a new leader) is below the required index, so
    /// this node applies it before it uses the anchor. (Requiring only the commit index
    /// let a host keep a lease confirmed right after the leader proposed its `HostDead`,
    /// which committed later: the simulator's split brain on seed 2461 once failover
    /// got faster.) Without the incarnation a restarted process, which forgot its
    /// predecessor's receipts, took the confirmation of its predecessor's
    /// acknowledgement for a late copy of the same round that it received itself (the
    /// simulator's split brain on seeds 14195, 15458, 16906 and 17224).
    ///
    /// Why not `last_leader_contact`: that is refreshed by any message of the leader,
    /// also by appends this node rejects, by appends whose acknowledgement is lost
    /// (one-way loss, a partition, an append read late after a freeze) and by a deposed
    /// leader that no longer holds its lease; the leader that declares hosts dead knows
    /// nothing of those, so a lease from them can outlive the leader's L(1 + eps) wait.
    pub fn host_lease_anchor(&self) -> Option<(Nanos, Index)> {
        if self.leader == 0 || self.role == Role::Leader {
            return None;
        }
        self.lease_anchors[..self.lease_anchor_count]
            .iter()
            .rev()
            .find(|&&(_, required)| required <= self.applied)
            .copied()
    }
    /// The connection to `leader` broke because the leader's side closed it (every
    /// survivor sees that when the leader's process dies). From now until the next
    /// message of a leader, this node no longer honours that leader's lease: it grants
    /// PreVotes and votes at once rather than an election timeout after the leader's
    /// last message. Returns true if it did: `leader` is the leader this node last heard
    /// from (whatever its role now, unless it leads); the caller may then campaign at
    /// once (`campaign_now`), staggered against the other survivors. False otherwise.
    ///
    /// Why it is safe: a voter's loyalty backs the leader lease (`quorum_contact`),
    /// which only matters while the leader can still act on it. A dead leader receives
    /// no acknowledgement after its death, and the reset is seen after it, so every vote
    /// this enables comes after the last acknowledgement the old leader ever counted.
    /// Host leases need exactly that (the old leader confirms rounds only from
    /// acknowledgements it received; see `host_lease_anchor`). Call it only when the
    /// peer closed the connection (end of stream, reset), not when this node closed it
    /// (a bad frame, its own full queue): a leader that is alive would still count this
    /// node's earlier acknowledgements in its lease.
    pub fn leader_connection_lost(&mut self, now: Nanos, leader: NodeId) -> bool {
        self.advance_clock(now);
        if self.role == Role::Leader || leader == 0 || self.contact_from != leader {
            return false;
        }
        self.loyalty_dropped = true;
        true
    }
    /// Leader: the replication state of a peer (match, next).
    pub fn peer_progress(&self, peer: NodeId) -> Option<(Index, Index)> {
        self.progress
            .iter()
            .find(|p| p.id == peer)
            .map(|p| (p.match_index, p.next_index))
    }

    // ---- Inputs ----------------------------------------------------------------------

    /// Advances time.
    pub fn tick(&mut self, now: Nanos) {
        self.advance_clock(now);
        match self.role {
            Role::Leader => {
                if now >= self.heartbeat_deadline {
                    self.heartbeat_deadline = now + self.cfg.heartbeat_interval;
                    self.broadcast_heartbeat();
                }
                if self.cfg.check_quorum && now >= self.check_quorum_deadline {
                    self.check_quorum_deadline = now + self.cfg.election_timeout;
                    // CheckQuorum: answers received within the last election timeout.
                    if self.quorum_time(|p| p.last_ack_at) + self.cfg.election_timeout < now {
                        log::debug!("{} steps down: no quorum contact", self.cfg.id);
                        self.become_follower(self.term, 0);
                        return;
                    }
                }
                if self.transfer_target != 0 && now >= self.transfer_deadline {
                    self.transfer_target = 0;
                    if self.lease_void {
                        // The transfer did not happen, but TimeoutNow went out: no lease
                        // holds for the rest of this term (see `quorum_contact`), and
                        // hosts whose leases this leader confirms would all fence. Step
                        // down so that an election makes a leader with a lease. (The
                        // simulator's VM mode found every VM fenced for good after a
                        // failed transfer.)
                        log::debug!("{} steps down: leadership transfer failed", self.cfg.id);
                        self.become_follower(self.term, 0);
                    }
                }
            }
            _ => {
                if now >= self.election_deadline {
                    if self.may_campaign() {
                        self.campaign(self.cfg.pre_vote, false);
                    } else {
                        self.reset_election_deadline();
                    }
                }
            }
        }
    }

    /// Starts an election now, as if the election timer had fired (etcd's MsgHup):
    /// for tests and for operators bootstrapping a cluster. Ignored by leaders and
    /// non-voters.
    pub fn campaign_now(&mut self, now: Nanos) {
        self.advance_clock(now);
        if self.role != Role::Leader && self.may_campaign() {
            self.campaign(self.cfg.pre_vote, false);
        }
    }

    /// Proposes a command; returns the index and term it was appended at.
    pub fn propose(&mut self, now: Nanos, data: &[u8]) -> Result<(Index, Term), RaftError> {
        self.advance_clock(now);
        self.check_can_append(data.len())?;
        let index = self.append_local(EntryKind::Normal, data);
        self.broadcast_append();
        Ok((index, self.term))
    }

    /// Starts a linearizable read; it is reported in `Outputs::reads` once a quorum has
    /// confirmed the leader's leadership (on a follower: once the leader answered), with
    /// the index the state machine must have applied before the read is served.
    pub fn read_index(&mut self, now: Nanos, id: u64) -> Result<(), RaftError> {
        self.advance_clock(now);
        if self.role == Role::Follower && self.leader != 0 && self.cfg.bugs.follower_read_local {
            let index = self.commit;
            self.out.reads.push(ReadState { id, index });
            return Ok(());
        }
        if self.role == Role::Follower && self.leader != 0 {
            // A follower asks the leader; the answer arrives as a `ReadIndexResp` and is
            // reported in `Outputs::reads` like a local one (or never: callers time out).
            self.send(self.leader, Body::ReadIndex { id }, false);
            return Ok(());
        }
        self.register_read(id, self.cfg.id)
    }

    /// Leader: queues a read for `from` (this node or a follower) behind a new round.
    fn register_read(&mut self, id: u64, from: NodeId) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if self.log.term(self.commit) != Some(self.term) {
            return Err(RaftError::NotReady);
        }
        if self.pending_reads.len() >= self.cfg.max_pending_reads {
            return Err(RaftError::TooManyReads);
        }
        self.start_round();
        self.pending_reads.push_back(PendingRead {
            id,
            from,
            index: self.commit,
            seq: self.read_seq,
        });
        if self.membership.voters.len() == 1 && self.membership.is_voter(self.cfg.id) {
            self.release_reads();
        } else {
            self.broadcast_heartbeat();
        }
        Ok(())
    }

    /// Proposes one membership change (the previous one must have committed).
    pub fn change_membership(
        &mut self,
        now: Nanos,
        change: ConfChange,
    ) -> Result<(Index, Term), RaftError> {
        self.advance_clock(now);
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if self.membership_index > self.commit || self.replace_remove != 0 {
            return Err(RaftError::ChangePending);
        }
        if self.log.term(self.commit) != Some(self.term) {
            return Err(RaftError::NotReady);
        }
        let (next, then_remove) = match change {
            ConfChange::Replace { old, new } => {
                if !self.membership.is_voter(old) || !self.membership.observers.contains(new) {
                    return Err(RaftError::InvalidChange);
                }
                (
                    Self::apply_change(&self.membership, ConfChange::Promote(new))?,
                    old,
                )
            }
            other => (Self::apply_change(&self.membership, other)?, 0),
        };
        let r = self.append_membership(next)?;
        self.replace_remove = then_remove;
        Ok(r)
    }

    /// Hands leadership to `target`, or to the most caught-up voter if 0.
    pub fn transfer_leadership(&mut self, now: Nanos, target: NodeId) -> Result<NodeId, RaftError> {
        self.advance_clock(now);
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        let target = if target == 0 {
            let mut best: Option<&Progress> = None;
            for p in &self.progress {
                if self.membership.is_voter(p.id)
                    && best.is_none_or(|b| p.match_index > b.match_index)
                {
                    best = Some(p);
                }
            }
            match best {
                Some(p) => p.id,
                None => return Err(RaftError::InvalidChange),
            }
        } else {
            target
        };
        if target == self.cfg.id || !self.membership.is_voter(target) {
            return Err(RaftError::InvalidChange);
        }
        self.transfer_target = target;
        self.transfer_deadline = now + self.cfg.election_timeout;
        let pi = self.progress_slot(target).expect("voters have progress");
        if self.progress[pi].match_index == self.log.last_index() {
            self.lease_void = true;
            self.send(target, Body::TimeoutNow, false);
        } else {
            self.send_append(pi, false);
        }
        Ok(target)
    }

    /// The driver made the log durable up to `index` (whose term is `term`).
    pub fn persisted(&mut self, index: Index, term: Term) {
        if index > self.persisted_index && self.log.term(index) == Some(term) {
            self.persisted_index = index;
            if self.role == Role::Leader {
                self.maybe_commit();
            }
        }
    }

    /// The state machine applied everything up to `index`.
    pub fn applied_to(&mut self, index: Index) {
        assert!(
            index <= self.commit,
            "applied {index} beyond commit {}",
            self.commit
        );
        if index > self.applied {
            self.applied = index;
        }
    }

    /// The entries committed and not yet applied (`lo ..= hi`), if any.
    pub fn to_apply(&self) -> Option<(Index, Index)> {
        if self.commit > self.applied {
            Some((self.applied + 1, self.commit))
        } else {
            None
        }
    }

    /// Replaces the log prefix up to `index` by a snapshot of the state machine
    /// (`state`, its bytes as of `index`). `index` must be applied and durable.
    pub fn compact(&mut self, index: Index, state: &[u8]) {
        assert!(index <= self.applied && index <= self.persisted_index);
        if index <= self.log.snapshot_index() {
            return;
        }
        let m = self.membership_at(index);
        self.snapshot_data.clear();
        m.encode(&mut self.snapshot_data);
        self.snapshot_data.extend_from_slice(state);
        self.snapshot_membership = m;
        self.log.compact_to(index);
        self.out.snapshot = Some(self.snapshot_meta());
    }

    /// Handles a message; `payload` carries an Append's entries or a Snapshot's bytes.
    pub fn step(&mut self, now: Nanos, m: &Message, payload: Payload<'_>) {
        self.advance_clock(now);
        if m.to != self.cfg.id || m.from == self.cfg.id {
            return;
        }
        if m.term > self.term {
            match m.body {
                Body::PreVote { .. } | Body::Vote { .. } => {
                    let transfer = matches!(m.body, Body::Vote { transfer: true, .. });
                    if !transfer && self.in_lease() {
                        return;
                    }
                }
                _ => {}
            }
            match m.body {
                Body::PreVote { .. } => {}
                Body::PreVoteResp { granted: true } => {}
                Body::Append { .. } | Body::Snapshot { .. } | Body::TimeoutNow => {
                    self.become_follower(m.term, m.from)
                }
                _ => self.become_follower(m.term, 0),
            }
        } else if m.term < self.term {
            match m.body {
                Body::Append { .. } | Body::Snapshot { .. } => {
                    // Tell a stale leader about the newer term so it steps down.
                    self.send(
                        m.from,
                        Body::AppendResp {
                            success: false,
                            index: 0,
                            hint_index: 0,
                            hint_term: 0,
                            read_seq: 0,
                            incarnation: self.cfg.incarnation,
                        },
                        false,
                    );
                }
                Body::PreVote { .. } => {
                    self.send(m.from, Body::PreVoteResp { granted: false }, false);
                }
                _ => {}
            }
            return;
        }
        match m.body {
            Body::PreVote {
                last_index,
                last_term,
            } => {
                let granted = m.term > self.term && self.log_ok(last_index, last_term);
                let term = if granted { m.term } else { self.term };
                self.out.messages.push(Message {
                    from: self.cfg.id,
                    to: m.from,
                    term,
                    body: Body::PreVoteResp { granted },
                });
            }
            Body::Vote {
                last_index,
                last_term,
                ..
            } => {
                let can_vote = self.vote == m.from
                    || (self.vote == 0 && self.leader == 0 && self.role != Role::Leader)
                    || (self.cfg.bugs.vote_twice && self.role != Role::Leader);
                // Votes are granted without consulting this node's own membership
                // (Raft thesis §4.1); candidates count only their voters' votes.
                let granted = can_vote && self.log_ok(last_index, last_term);
                if granted {
                    self.vote = m.from;
                    self.hard_state_changed();
                    self.reset_election_deadline();
                }
                self.send(m.from, Body::VoteResp { granted }, true);
            }
            Body::PreVoteResp { granted } => {
                let this_round = m.term == self.term + 1 || (!granted && m.term == self.term);
                if self.role == Role::PreCandidate && this_round {
                    self.record_vote(m.from, granted);
                } else if self.role == Role::PreCandidate && !granted && m.term > self.term {
                    self.become_follower(m.term, 0);
                }
            }
            Body::VoteResp { granted } => {
                if self.role == Role::Candidate {
                    self.record_vote(m.from, granted);
                }
            }
            Body::Append {
                prev_index,
                prev_term,
                commit,
                count,
                read_seq,
                lease_seq,
                lease_incarnation,
                lease_index,
            } => {
                self.accept_leader(m.from);
                if self.rounds_term != self.term {
                    // Rounds are per leader, and a term has one leader: forget them
                    // with the term (only then: while the leader is merely unknown for
                    // a while, a late copy of an old round must still look old).
                    self.rounds_term = self.term;
                    self.round_receipts = [(0, 0, 0); ROUND_HISTORY];
                    self.latest_round = 0;
                    self.lease_anchor_count = 0;
                }
                let slot = (lease_seq % ROUND_HISTORY as u64) as usize;
                let (seq, at, _) = self.round_receipts[slot];
                let confirmed =
                    lease_seq != 0 && lease_incarnation == self.cfg.incarnation && seq == lease_seq;
                let newest = match self.lease_anchor_count {
                    0 => (0, 0),
                    n => self.lease_anchors[n - 1],
                };
                if confirmed && at > newest.0 {
                    // The indexes of this (confirming) append, not of the round's: the
                    // round's append may have waited long (a freeze) and predate verdicts
                    // the leader proposed before it confirmed the round. Required indexes
                    // only grow, so the usable anchors are a prefix.
                    let required = newest.1.max(commit).max(lease_index);
                    if self.lease_anchor_count == LEASE_ANCHORS {
                        self.lease_anchors.copy_within(1.., 0);
                        self.lease_anchor_count -= 1;
                    }
                    self.lease_anchors[self.lease_anchor_count] = (at, required);
                    self.lease_anchor_count += 1;
                }
                if read_seq > self.latest_round {
                    // The first append of the round this node received (whatever it
                    // answers): the earliest receipt a confirmation of the round can
                    // refer to. Only rounds newer than all recorded: a late copy of an
                    // old round (duplicated, or read after a freeze) must not give that
                    // round, which the leader may have confirmed from an earlier
                    // acknowledgement, a new receipt time (the simulator found that).
                    self.latest_round = read_seq;
                    let slot = (read_seq % ROUND_HISTORY as u64) as usize;
                    self.round_receipts[slot] = (read_seq, self.now, commit);
                }
                let entries = match payload {
                    Payload::Entries(v) => v,
                    _ => EntriesView::EMPTY,
                };
                if entries.len() != count as usize {
                    log::warn!(
                        "append from {} with {} entries, header says {count}",
                        m.from,
                        entries.len()
                    );
                    return;
                }
                self.handle_append(m.from, prev_index, prev_term, commit, entries, read_seq);
            }
            Body::AppendResp {
                success,
                index,
                hint_index,
                hint_term,
                read_seq,
                incarnation,
            } => {
                if self.role == Role::Leader {
                    let round = (read_seq, incarnation);
                    self.handle_append_resp(m.from, success, index, hint_index, hint_term, round);
                }
            }
            Body::Snapshot {
                index,
                term,
                total,
                offset,
                len,
            } => {
                self.accept_leader(m.from);
                let chunk = match payload {
                    Payload::Chunk(c) if c.len() == len as usize => c,
                    _ => {
                        log::warn!("snapshot chunk from {} with a wrong payload", m.from);
                        return;
                    }
                };
                self.handle_snapshot_chunk(m.from, index, term, total, offset, chunk);
            }
            Body::SnapshotResp { index, next_offset } => {
                if self.role == Role::Leader {
                    self.handle_snapshot_resp(m.from, index, next_offset);
                }
            }
            Body::ReadIndex { id } => {
                if self.register_read(id, m.from).is_err() {
                    let body = Body::ReadIndexResp {
                        id,
                        index: 0,
                        ok: false,
                    };
                    self.send(m.from, body, false);
                }
            }
            Body::ReadIndexResp { id, index, ok } => {
                // Only from the leader this follower asked, in the same term.
                if ok && self.role == Role::Follower && m.from == self.leader {
                    self.out.reads.push(ReadState { id, index });
                } else if !ok {
                    self.out.reads_failed.push(id);
                }
            }
            Body::TimeoutNow => {
                if self.role == Role::Follower && self.may_campaign() {
                    self.campaign(false, true);
                }
            }
        }
    }

    /// The payload that goes with an outgoing message (read while encoding it).
    pub fn payload(&self, m: &Message) -> Payload<'_> {
        match m.body {
            Body::Append {
                prev_index, count, ..
            } if count > 0 => {
                Payload::Entries(self.log.view(prev_index + 1, prev_index + count as u64))
            }
            Body::Snapshot {
                index, offset, len, ..
            } => {
                assert_eq!(
                    index,
                    self.log.snapshot_index(),
                    "snapshot chunk of an old snapshot"
                );
                Payload::Chunk(&self.snapshot_data[offset as usize..offset as usize + len as usize])
            }
            _ => Payload::None,
        }
    }

    // ---- Roles -------------------------------------------------------------------------

    fn advance_clock(&mut self, now: Nanos) {
        if !self.started {
            // The first input tells the core what time it is: timers start from it.
            self.started = true;
            self.now = now;
            self.vote_fence_until = now + self.cfg.election_timeout;
            self.reset_election_deadline();
            self.last_leader_contact = now;
        }
        if now > self.now {
            self.now = now;
        }
    }

    fn reset_election_deadline(&mut self) {
        let (et, spread) = (self.cfg.election_timeout, self.cfg.election_spread);
        self.election_deadline = self.now + et + self.rng.below(spread);
    }

    fn hard_state_changed(&mut self) {
        self.out.hard_state = Some(self.hard_state());
    }

    fn in_lease(&self) -> bool {
        if !self.cfg.check_quorum {
            return false;
        }
        // After a restart this node may have acknowledged a heartbeat it no longer
        // remembers: it waits one election timeout before it votes (leader leases).
        if self.now < self.vote_fence_until {
            return true;
        }
        match self.role {
            Role::Leader => true,
            // The leader's connection broke: it is gone (see `leader_connection_lost`).
            _ if self.loyalty_dropped => false,
            // Measured from the last message of any leader, even if a higher term has
            // since cleared `leader` (the promise behind the old leader's lease stands).
            _ => self.now < self.last_leader_contact + self.cfg.election_timeout,
        }
    }

    /// Voters campaign. So does a node that an uncommitted change has just removed or
    /// demoted: it may hold the longest log, and the remaining voters (whose votes it
    /// counts, by its latest configuration) may need it to elect anyone at all.
    fn may_campaign(&self) -> bool {
        if self.membership.is_voter(self.cfg.id) {
            return true;
        }
        self.membership_index > self.commit
            && self.membership_index > self.log.snapshot_index()
            && self
                .membership_at(self.membership_index - 1)
                .is_voter(self.cfg.id)
    }

    fn log_ok(&self, last_index: Index, last_term: Term) -> bool {
        if self.cfg.bugs.vote_without_log_check {
            return true;
        }
        let (my_index, my_term) = (self.log.last_index(), self.log.last_term());
        last_term > my_term || (last_term == my_term && last_index >= my_index)
    }

    fn become_follower(&mut self, term: Term, leader: NodeId) {
        if term > self.term {
            self.term = term;
            self.vote = 0;
            self.hard_state_changed();
        }
        if self.role != Role::Follower || self.leader != leader {
            self.out.leader_changed = true;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.transfer_target = 0;
        self.replace_remove = 0;
        self.fail_pending_reads();
        if leader != 0 {
            self.last_leader_contact = self.now;
            self.contact_from = leader;
            self.loyalty_dropped = false;
        }
        self.reset_election_deadline();
    }

    /// Reads waiting for a quorum round can no longer be confirmed: fail them (local
    /// ones in `Outputs::reads_failed`, a follower's with a refusal).
    fn fail_pending_reads(&mut self) {
        while let Some(r) = self.pending_reads.pop_front() {
            if r.from == self.cfg.id {
                self.out.reads_failed.push(r.id);
            } else {
                let body = Body::ReadIndexResp {
                    id: r.id,
                    index: 0,
                    ok: false,
                };
                self.send(r.from, body, false);
            }
        }
    }

    fn accept_leader(&mut self, from: NodeId) {
        if self.role != Role::Follower || self.leader != from {
            self.become_follower(self.term, from);
        }
        self.last_leader_contact = self.now;
        self.contact_from = from;
        self.loyalty_dropped = false;
        self.reset_election_deadline();
    }

    fn campaign(&mut self, pre: bool, transfer: bool) {
        self.votes.clear();
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let msg_term;
        if pre {
            self.role = Role::PreCandidate;
            msg_term = self.term + 1;
        } else {
            self.role = Role::Candidate;
            self.term += 1;
            self.vote = self.cfg.id;
            self.hard_state_changed();
            msg_term = self.term;
        }
        if self.leader != 0 {
            self.out.leader_changed = true;
        }
        self.leader = 0;
        self.reset_election_deadline();
        self.record_vote(self.cfg.id, true);
        if self.role == Role::Leader {
            return;
        }
        for i in 0..self.membership.voters.len() {
            let id = self.membership.voters.as_slice()[i];
            if id == self.cfg.id {
                continue;
            }
            let body = if pre {
                Body::PreVote {
                    last_index,
                    last_term,
                }
            } else {
                Body::Vote {
                    last_index,
                    last_term,
                    transfer,
                }
            };
            let m = Message {
                from: self.cfg.id,
                to: id,
                term: msg_term,
                body,
            };
            // A vote request must not leave before the candidate's own vote is durable.
            if pre {
                self.out.messages.push(m);
            } else {
                self.out.messages_after_persist.push(m);
            }
        }
    }

    fn record_vote(&mut self, from: NodeId, granted: bool) {
        if !self.membership.is_voter(from) || self.votes.iter().any(|(id, _)| *id == from) {
            return;
        }
        self.votes.push((from, granted));
        let yes = self.votes.iter().filter(|(_, g)| *g).count();
        let no = self.votes.len() - yes;
        let q = self.membership.quorum();
        if yes >= q {
            if self.role == Role::PreCandidate {
                self.campaign(false, false);
            } else {
                self.become_leader();
            }
        } else if no >= q {
            self.become_follower(self.term, 0);
        }
    }

    fn become_leader(&mut self) {
        assert!(self.role == Role::Candidate);
        self.role = Role::Leader;
        self.leader = self.cfg.id;
        self.lease_void = false;
        self.out.leader_changed = true;
        self.transfer_target = 0;
        self.replace_remove = 0;
        self.pending_reads.clear();
        self.progress.clear();
        self.rebuild_progress();
        for p in &mut self.progress {
            // A grace period of one election timeout before CheckQuorum can fire; no
            // lease until a quorum has answered a heartbeat round of this term (a vote
            // is not a promise to ignore other candidates later).
            p.last_ack_at = self.now;
            p.acked_round_started_at = if self.cfg.bugs.lease_from_election {
                self.now
            } else {
                0
            };
        }
        self.heartbeat_deadline = self.now + self.cfg.heartbeat_interval;
        self.check_quorum_deadline = self.now + self.cfg.election_timeout;
        assert!(
            self.log.free_slots() > 0,
            "log full at election; compaction is overdue"
        );
        self.append_local(EntryKind::Noop, &[]);
        // The first appends open a heartbeat round: their answers start the lease.
        self.start_round();
        self.broadcast_append();
    }

    /// Progress entries for every member but this node (kept where they exist).
    fn rebuild_progress(&mut self) {
        let next = self.log.last_index() + 1;
        let now = self.now;
        let m = self.membership;
        let me = self.cfg.id;
        self.progress.retain(|p| m.is_member(p.id) && p.id != me);
        for &id in m.voters.as_slice().iter().chain(m.observers.as_slice()) {
            if id != me && !self.progress.iter().any(|p| p.id == id) {
                assert!(self.progress.len() < limits::MAX_MEMBERS);
                self.progress.push(Progress::new(id, next, now));
            }
        }
    }

    fn progress_slot(&self, id: NodeId) -> Option<usize> {
        self.progress.iter().position(|p| p.id == id)
    }

    // ---- Leader: appending and replicating -----------------------------------------

    fn check_can_append(&self, len: usize) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if self.transfer_target != 0 {
            return Err(RaftError::Transferring);
        }
        if len > limits::MAX_ENTRY_BYTES {
            return Err(RaftError::TooLarge);
        }
        if self.log.free_slots() == 0 {
            return Err(RaftError::LogFull);
        }
        Ok(())
    }

    fn append_local(&mut self, kind: EntryKind, data: &[u8]) -> Index {
        // A single voter commits once its own log is durable (see `persisted`).
        let index = self.log.append(self.term, kind, data);
        self.mark_persist_from(index);
        index
    }

    fn mark_persist_from(&mut self, index: Index) {
        self.out.persist_from = Some(self.out.persist_from.map_or(index, |p| p.min(index)));
    }

    fn apply_change(cur: &Membership, change: ConfChange) -> Result<Membership, RaftError> {
        let mut m = *cur;
        let ok = match change {
            ConfChange::AddObserver(id) => !m.is_member(id) && m.observers.insert(id),
            ConfChange::Promote(id) => m.observers.remove(id) && m.voters.insert(id),
            ConfChange::Demote(id) => {
                m.voters.len() > 1 && m.voters.remove(id) && m.observers.insert(id)
            }
            ConfChange::Remove(id) => {
                if m.voters.contains(id) {
                    m.voters.len() > 1 && m.voters.remove(id)
                } else {
                    m.observers.remove(id)
                }
            }
            ConfChange::Replace { .. } => false,
        };
        if ok {
            Ok(m)
        } else {
            Err(RaftError::InvalidChange)
        }
    }

    fn append_membership(&mut self, next: Membership) -> Result<(Index, Term), RaftError> {
        // Membership changes are rare: this small allocation is off the steady-state path.
        let mut encoded = Vec::with_capacity(MEMBERSHIP_MAX_BYTES);
        next.encode(&mut encoded);
        self.check_can_append(encoded.len())?;
        let index = self.append_local(EntryKind::Config, &encoded);
        self.membership = next;
        self.membership_index = index;
        self.rebuild_progress();
        self.broadcast_append();
        Ok((index, self.term))
    }

    fn broadcast_append(&mut self) {
        for i in 0..self.progress.len() {
            self.send_append(i, false);
        }
        self.maybe_commit();
    }

    fn start_round(&mut self) {
        self.read_seq += 1;
        self.round_started[(self.read_seq % ROUND_HISTORY as u64) as usize] =
            (self.read_seq, self.now);
    }

    fn broadcast_heartbeat(&mut self) {
        self.start_round();
        let now = self.now;
        for i in 0..self.progress.len() {
            let p = &mut self.progress[i];
            match p.state {
                ProgressState::Probe => {
                    p.paused = false;
                    self.send_append(i, true);
                }
                ProgressState::Replicate => {
                    if p.match_index + 1 < p.next_index
                        && now >= p.last_progress_at + 2 * self.cfg.heartbeat_interval
                    {
                        // Nothing acknowledged for a while: appends were lost; go back.
                        p.become_probe();
                        self.send_append(i, true);
                    } else {
                        self.send_heartbeat(i);
                        self.send_append(i, false);
                    }
                }
                ProgressState::Snapshot => {
                    if now >= p.snapshot_sent_at + 2 * self.cfg.heartbeat_interval {
                        self.send_snapshot_chunk(i);
                    }
                }
            }
        }
    }

    fn send_heartbeat(&mut self, i: usize) {
        let p = &self.progress[i];
        let prev_index = p.match_index.max(self.log.snapshot_index());
        let Some(prev_term) = self.log.term(prev_index) else {
            return;
        };
        let body = Body::Append {
            prev_index,
            prev_term,
            commit: self.commit,
            count: 0,
            read_seq: self.read_seq,
            lease_seq: p.lease_acked_seq,
            lease_incarnation: p.lease_acked_incarnation,
            lease_index: self.log.last_index(),
        };
        let to = p.id;
        self.send(to, body, false);
    }

    /// Sends what the window allows to peer slot `i`; `force` sends an empty append
    /// (a probe) even when there is nothing new.
    fn send_append(&mut self, i: usize, force: bool) {
        let mut force = force;
        loop {
            let p = &self.progress[i];
            match p.state {
                ProgressState::Snapshot => return,
                ProgressState::Probe if p.paused => return,
                ProgressState::Replicate
                    if p.inflights.is_full(
                        self.cfg.max_inflight_appends,
                        self.cfg.max_inflight_bytes as u64,
                    ) =>
                {
                    return
                }
                _ => {}
            }
            if p.next_index <= self.log.snapshot_index() {
                self.start_snapshot(i);
                return;
            }
            let prev_index = p.next_index - 1;
            let prev_term = self
                .log
                .term(prev_index)
                .expect("next_index within the log");
            let last = self.log.last_index();
            let mut count = 0u64;
            let mut bytes = 0u64;
            while prev_index + count < last && (count as usize) < self.cfg.max_entries_per_append {
                let e = self.log.entry(prev_index + count + 1);
                let len = e.data.len() as u64 + 32;
                if count > 0 && bytes + len > self.cfg.max_append_bytes as u64 {
                    break;
                }
                bytes += len;
                count += 1;
            }
            if count == 0 && !force {
                return;
            }
            force = false;
            let body = Body::Append {
                prev_index,
                prev_term,
                commit: self.commit,
                count: count as u32,
                read_seq: self.read_seq,
                lease_seq: self.progress[i].lease_acked_seq,
                lease_incarnation: self.progress[i].lease_acked_incarnation,
                lease_index: self.log.last_index(),
            };
            let to = self.progress[i].id;
            self.send(to, body, false);
            let p = &mut self.progress[i];
            match p.state {
                ProgressState::Replicate => {
                    if count == 0 {
                        return;
                    }
                    p.next_index = prev_index + count + 1;
                    p.inflights.add(prev_index + count, bytes);
                }
                _ => {
                    p.paused = true;
                    return;
                }
            }
        }
    }

    fn start_snapshot(&mut self, i: usize) {
        let snap = self.log.snapshot_index();
        let p = &mut self.progress[i];
        p.state = ProgressState::Snapshot;
        p.inflights.reset();
        p.snapshot_index = snap;
        p.snapshot_offset = 0;
        self.send_snapshot_chunk(i);
    }

    fn send_snapshot_chunk(&mut self, i: usize) {
        let snap = self.snapshot_meta();
        let total = self.snapshot_data.len() as u64;
        let p = &mut self.progress[i];
        if p.snapshot_index != snap.index {
            // The leader compacted again: start over with the new snapshot.
            p.snapshot_index = snap.index;
            p.snapshot_offset = 0;
        }
        let offset = p.snapshot_offset.min(total);
        let len = (total - offset).min(self.cfg.snapshot_chunk_bytes as u64) as u32;
        p.snapshot_sent_at = self.now;
        let to = p.id;
        self.send(
            to,
            Body::Snapshot {
                index: snap.index,
                term: snap.term,
                total,
                offset,
                len,
            },
            false,
        );
    }

    fn send(&mut self, to: NodeId, body: Body, after_persist: bool) {
        let m = Message {
            from: self.cfg.id,
            to,
            term: self.term,
            body,
        };
        if after_persist && !self.cfg.bugs.ack_before_persist {
            self.out.messages_after_persist.push(m);
        } else {
            self.out.messages.push(m);
        }
    }

    fn handle_append_resp(
        &mut self,
        from: NodeId,
        success: bool,
        index: Index,
        hint_index: Index,
        hint_term: Term,
        (read_seq, incarnation): (u64, u64),
    ) {
        let Some(i) = self.progress_slot(from) else {
            return;
        };
        let now = self.now;
        let last = self.log.last_index();
        // Confirm the round for the follower's host lease only while this leader holds
        // its own lease (no other leader can have been elected meanwhile).
        let et = self.cfg.election_timeout;
        let leader_lease = self
            .quorum_contact()
            .is_some_and(|q| now < q + et - et * 3 / 100);
        let p = &mut self.progress[i];
        p.last_ack_at = now;
        if success && leader_lease {
            if p.lease_acked_incarnation == incarnation {
                p.lease_acked_seq = p.lease_acked_seq.max(read_seq);
            } else {
                // Another process of the follower answered (it restarted, or a late
                // answer of its predecessor arrived): confirm rounds for that process
                // only. A late predecessor answer delays the new process's lease by a
                // round; it never lends the predecessor's rounds to the new process.
                p.lease_acked_incarnation = incarnation;
                p.lease_acked_seq = read_seq;
            }
        }
        p.acked_read_seq = p.acked_read_seq.max(read_seq);
        let (round, started) = self.round_started[(read_seq % ROUND_HISTORY as u64) as usize];
        if round == read_seq && read_seq != 0 {
            p.acked_round_started_at = p.acked_round_started_at.max(started);
        }
        if success {
            if index > p.match_index {
                if index > last {
                    // Only possible with a planted bug (or a follower that lies).
                    assert!(
                        self.cfg.bugs.any(),
                        "ack of {index} beyond the leader's log {last}"
                    );
                    return;
                }
                p.match_index = index;
                p.last_progress_at = now;
                match p.state {
                    ProgressState::Probe => p.become_replicate(),
                    ProgressState::Snapshot if index >= p.snapshot_index => p.become_replicate(),
                    ProgressState::Snapshot => {}
                    ProgressState::Replicate => {
                        p.inflights.free_to(index);
                        p.next_index = p.next_index.max(index + 1);
                    }
                }
                self.maybe_commit();
                // Committing may have changed the membership or the role.
                let Some(i) = self
                    .progress_slot(from)
                    .filter(|_| self.role == Role::Leader)
                else {
                    return;
                };
                if from == self.transfer_target && self.progress[i].match_index == last {
                    self.lease_void = true;
                    self.send(from, Body::TimeoutNow, false);
                }
                self.send_append(i, false);
                self.release_reads();
                return;
            } else if p.state == ProgressState::Probe {
                p.paused = false;
            }
        } else {
            // `index` is the rejected prev_index.
            // A follower never lacks entries it acknowledged: such a rejection is old.
            let stale = index <= p.match_index
                || match p.state {
                    ProgressState::Replicate => false,
                    ProgressState::Probe => index + 1 != p.next_index,
                    ProgressState::Snapshot => true,
                };
            if stale || index == 0 && hint_index == 0 {
                self.release_reads();
                return;
            }
            let mut next = if hint_term != 0 {
                match self.log.last_index_of_term(hint_term, index) {
                    Some(k) => k + 1,
                    None => hint_index,
                }
            } else {
                hint_index
            };
            next = next.min(index).max(p.match_index + 1).max(1);
            let unchanged = p.state == ProgressState::Probe && next == p.next_index;
            p.become_probe();
            p.next_index = next;
            if unchanged {
                // No progress from this answer: wait for the next heartbeat rather than
                // resend at once (duplicated answers would otherwise multiply).
                p.paused = true;
                self.release_reads();
                return;
            }
        }
        self.send_append(i, false);
        self.release_reads();
    }

    fn handle_snapshot_resp(&mut self, from: NodeId, index: Index, next_offset: u64) {
        let Some(i) = self.progress_slot(from) else {
            return;
        };
        let now = self.now;
        let p = &mut self.progress[i];
        p.last_ack_at = now;
        if p.state != ProgressState::Snapshot || p.snapshot_index != index {
            return;
        }
        if next_offset > p.snapshot_offset || next_offset == 0 {
            p.snapshot_offset = next_offset;
            self.send_snapshot_chunk(i);
        }
    }

    fn maybe_commit(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let mut matches = [0 as Index; limits::MAX_VOTERS];
        let mut n = 0;
        for &id in self.membership.voters.as_slice() {
            matches[n] = if id == self.cfg.id {
                self.persisted_index
            } else {
                self.progress
                    .iter()
                    .find(|p| p.id == id)
                    .map_or(0, |p| p.match_index)
            };
            n += 1;
        }
        if n == 0 {
            return;
        }
        let slice = &mut matches[..n];
        slice.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = slice[self.membership.quorum() - 1];
        if candidate <= self.commit {
            return;
        }
        // Only an entry of the current term commits by counting (Raft §5.4.2).
        if self.log.term(candidate) != Some(self.term) && !self.cfg.bugs.commit_old_term_by_count {
            return;
        }
        self.commit = candidate;
        self.hard_state_changed();
        self.after_commit_advanced();
        self.broadcast_commit();
    }

    fn broadcast_commit(&mut self) {
        for i in 0..self.progress.len() {
            self.send_append(i, false);
        }
    }

    fn after_commit_advanced(&mut self) {
        if self.role != Role::Leader || self.membership_index > self.commit {
            return;
        }
        if self.replace_remove != 0 {
            let old = self.replace_remove;
            self.replace_remove = 0;
            if let Ok(next) = Self::apply_change(&self.membership, ConfChange::Remove(old)) {
                if self.append_membership(next).is_err() {
                    log::warn!("replace: removing {old} failed; retry the removal");
                }
                return;
            }
        }
        if !self.membership.is_voter(self.cfg.id) {
            // The change that removed or demoted this leader has committed.
            self.become_follower(self.term, 0);
        }
    }

    /// The lease start: see `quorum_contact`. Zero until a quorum answered a round.
    fn quorum_contact_time(&self) -> Nanos {
        self.quorum_time(|p| p.acked_round_started_at)
    }

    /// The q-th latest of `time(progress)` over the voters (this node counting `now`).
    fn quorum_time(&self, time: impl Fn(&Progress) -> Nanos) -> Nanos {
        let mut times = [0 as Nanos; limits::MAX_VOTERS];
        let mut n = 0;
        for &id in self.membership.voters.as_slice() {
            times[n] = if id == self.cfg.id {
                self.now
            } else {
                self.progress.iter().find(|p| p.id == id).map_or(0, &time)
            };
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        let slice = &mut times[..n];
        slice.sort_unstable_by(|a, b| b.cmp(a));
        slice[self.membership.quorum() - 1]
    }

    fn release_reads(&mut self) {
        while let Some(r) = self.pending_reads.front().copied() {
            let mut acks = 0;
            for &id in self.membership.voters.as_slice() {
                let ok = id == self.cfg.id
                    || self
                        .progress
                        .iter()
                        .find(|p| p.id == id)
                        .is_some_and(|p| p.acked_read_seq >= r.seq);
                if ok {
                    acks += 1;
                }
            }
            if acks < self.membership.quorum() {
                return;
            }
            self.pending_reads.pop_front();
            if r.from == self.cfg.id {
                self.out.reads.push(ReadState {
                    id: r.id,
                    index: r.index,
                });
            } else {
                let body = Body::ReadIndexResp {
                    id: r.id,
                    index: r.index,
                    ok: true,
                };
                self.send(r.from, body, false);
            }
        }
    }

    // ---- Follower ----------------------------------------------------------------------

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: Index,
        prev_term: Term,
        leader_commit: Index,
        entries: EntriesView<'_>,
        read_seq: u64,
    ) {
        let reject = |me: &mut Raft, hint_index: Index, hint_term: Term| {
            me.send(
                from,
                Body::AppendResp {
                    success: false,
                    index: prev_index,
                    hint_index,
                    hint_term,
                    read_seq,
                    incarnation: me.cfg.incarnation,
                },
                true,
            );
        };
        if prev_index > self.log.last_index() {
            let hint = self.log.last_index() + 1;
            reject(self, hint, 0);
            return;
        }
        // Entries covered by our snapshot are committed and therefore match.
        let snap = self.log.snapshot_index();
        let mut skip = 0usize;
        let mut base = prev_index;
        if prev_index < snap {
            skip = ((snap - prev_index) as usize).min(entries.len());
            base = prev_index + skip as u64;
            if base < snap {
                self.send(
                    from,
                    Body::AppendResp {
                        success: true,
                        index: snap,
                        hint_index: 0,
                        hint_term: 0,
                        read_seq,
                        incarnation: self.cfg.incarnation,
                    },
                    true,
                );
                return;
            }
            if skip > 0 && entries.get(skip - 1).term != self.log.snapshot_term() {
                // Cannot happen with a correct leader: committed entries match.
                log::error!("append disagrees with the snapshot at {snap}");
                return;
            }
        } else if self.log.term(prev_index) != Some(prev_term) {
            let t = self.log.term(prev_index).expect("in range");
            let hint = self.log.first_index_of_term_run(prev_index);
            reject(self, hint, t);
            return;
        }
        let mut last_new = base;
        for k in skip..entries.len() {
            let e = entries.get(k);
            let idx = base + (k - skip) as u64 + 1;
            if e.index != idx {
                log::warn!("append entry index {} where {idx} was expected", e.index);
                break;
            }
            if idx <= self.log.last_index() {
                if self.log.term(idx) == Some(e.term) {
                    last_new = idx;
                    continue;
                }
                assert!(
                    idx > self.commit || self.cfg.bugs.any(),
                    "truncating committed entry {idx} (commit {})",
                    self.commit
                );
                self.truncate_from(idx);
            }
            if self.log.free_slots() == 0 {
                break;
            }
            self.log.append(e.term, e.kind, &e.data);
            self.mark_persist_from(idx);
            if e.kind == EntryKind::Config {
                self.adopt_config_entry(idx);
            }
            last_new = idx;
        }
        let new_commit = if self.cfg.bugs.follower_commit_unchecked {
            leader_commit.min(self.log.last_index())
        } else {
            leader_commit.min(last_new)
        };
        if new_commit > self.commit {
            self.commit = new_commit;
            self.hard_state_changed();
        }
        self.send(
            from,
            Body::AppendResp {
                success: true,
                index: last_new,
                hint_index: 0,
                hint_term: 0,
                read_seq,
                incarnation: self.cfg.incarnation,
            },
            true,
        );
    }

    fn truncate_from(&mut self, from: Index) {
        self.log.truncate_from(from);
        self.mark_persist_from(from);
        if self.persisted_index >= from {
            self.persisted_index = from - 1;
        }
        if self.membership_index >= from {
            self.recompute_membership();
        }
    }

    fn adopt_config_entry(&mut self, index: Index) {
        match Membership::decode(&self.log.entry(index).data) {
            Ok((m, _)) => {
                self.membership = m;
                self.membership_index = index;
            }
            Err(e) => log::error!("config entry {index}: {e}"),
        }
    }

    /// The membership in effect as of `index` (the latest config entry at or below it).
    fn membership_at(&self, index: Index) -> Membership {
        let mut i = index.min(self.log.last_index());
        while i > self.log.snapshot_index() {
            let e = self.log.entry(i);
            if e.kind == EntryKind::Config {
                if let Ok((m, _)) = Membership::decode(&e.data) {
                    return m;
                }
            }
            i -= 1;
        }
        self.snapshot_membership
    }

    fn recompute_membership(&mut self) {
        let last = self.log.last_index();
        let mut i = last;
        while i > self.log.snapshot_index() {
            if self.log.entry(i).kind == EntryKind::Config {
                self.adopt_config_entry(i);
                return;
            }
            i -= 1;
        }
        self.membership = self.snapshot_membership;
        self.membership_index = self.log.snapshot_index();
    }

    fn handle_snapshot_chunk(
        &mut self,
        from: NodeId,
        index: Index,
        term: Term,
        total: u64,
        offset: u64,
        chunk: &[u8],
    ) {
        if index <= self.commit {
            // Already have it (or newer): report what matches.
            self.send(
                from,
                Body::AppendResp {
                    success: true,
                    index: self.commit,
                    hint_index: 0,
                    hint_term: 0,
                    read_seq: 0,
                    incarnation: self.cfg.incarnation,
                },
                true,
            );
            return;
        }
        if offset == 0 {
            self.incoming = Some((index, term, total));
            self.incoming_data.clear();
        }
        let expected = match self.incoming {
            Some((i, t, n)) if i == index && t == term && n == total => {
                self.incoming_data.len() as u64
            }
            _ => 0,
        };
        if offset != expected || self.incoming.is_none() {
            self.send(
                from,
                Body::SnapshotResp {
                    index,
                    next_offset: expected,
                },
                false,
            );
            return;
        }
        self.incoming_data.extend_from_slice(chunk);
        let have = self.incoming_data.len() as u64;
        if have < total {
            self.send(
                from,
                Body::SnapshotResp {
                    index,
                    next_offset: have,
                },
                false,
            );
            return;
        }
        self.incoming = None;
        let membership = match Membership::decode(&self.incoming_data) {
            Ok((m, _)) => m,
            Err(e) => {
                log::error!("snapshot from {from}: {e}");
                self.send(
                    from,
                    Body::SnapshotResp {
                        index,
                        next_offset: 0,
                    },
                    false,
                );
                return;
            }
        };
        std::mem::swap(&mut self.snapshot_data, &mut self.incoming_data);
        self.snapshot_membership = membership;
        if self.log.term(index) == Some(term) {
            self.log.compact_to(index);
        } else {
            self.log.reset(index, term);
            self.mark_persist_from(index + 1);
            self.persisted_index = index;
        }
        self.persisted_index = self.persisted_index.max(index);
        self.commit = index;
        self.applied = index;
        self.hard_state_changed();
        self.recompute_membership();
        self.out.snapshot = Some(SnapshotMeta { index, term });
        self.out.install_snapshot = true;
        self.send(
            from,
            Body::AppendResp {
                success: true,
                index,
                hint_index: 0,
                hint_term: 0,
                read_seq: 0,
                incarnation: self.cfg.incarnation,
            },
            true,
        );
    }
}
