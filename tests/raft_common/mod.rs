//! A small in-memory cluster for Raft unit tests: nodes with the real core and driver,
//! an in-memory storage, a message queue delivered by hand (as in etcd's raft tests).
#![allow(dead_code)]

use std::collections::VecDeque;
use vigil::raft::*;

pub const MS: Nanos = 1_000_000;

#[derive(Default)]
pub struct MemStorage {
    pub entries: Vec<Entry>,
    pub hard_state: HardState,
    pub snapshot: Option<(SnapshotMeta, Vec<u8>)>,
    pub syncs: u64,
}

impl LogStorage for MemStorage {
    type Error = String;
    fn write_entries(&mut self, from: Index, entries: EntriesView<'_>) -> Result<(), String> {
        let base = self.snapshot.as_ref().map_or(0, |(m, _)| m.index);
        let keep = (from.saturating_sub(base + 1)) as usize;
        self.entries.truncate(keep.min(self.entries.len()));
        self.entries.extend(entries.iter().cloned());
        Ok(())
    }
    fn write_hard_state(&mut self, hs: &HardState) -> Result<(), String> {
        self.hard_state = *hs;
        Ok(())
    }
    fn write_snapshot(&mut self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), String> {
        let base = self.snapshot.as_ref().map_or(0, |(m, _)| m.index);
        let drop = (meta.index - base) as usize;
        if drop <= self.entries.len()
            && self
                .entries
                .get(drop.wrapping_sub(1))
                .is_some_and(|e| e.term == meta.term)
        {
            self.entries.drain(..drop);
        } else {
            self.entries.clear();
        }
        self.snapshot = Some((*meta, data.to_vec()));
        Ok(())
    }
    fn sync(&mut self) -> Result<(), String> {
        self.syncs += 1;
        Ok(())
    }
}

/// A state machine that records what it applied.
#[derive(Default)]
pub struct RecordingSm {
    pub applied: Vec<(Index, Term, Vec<u8>)>,
    pub reads: Vec<ReadState>,
    pub restored: Vec<Vec<u8>>,
}

impl StateMachine for RecordingSm {
    fn apply(&mut self, e: &Entry) {
        if e.kind == EntryKind::Normal {
            self.applied.push((e.index, e.term, e.data.clone()));
        }
    }
    fn restore(&mut self, state: &[u8]) {
        self.restored.push(state.to_vec());
    }
    fn read_ready(&mut self, read: ReadState) {
        self.reads.push(read);
    }
}

pub struct Outbox<'a>(pub &'a mut VecDeque<(Message, OwnedPayload)>);

#[derive(Clone, Debug)]
pub enum OwnedPayload {
    None,
    Entries(Vec<Entry>),
    Chunk(Vec<u8>),
}

impl Transport for Outbox<'_> {
    fn send(&mut self, m: &Message, p: Payload<'_>) {
        let owned = match p {
            Payload::None => OwnedPayload::None,
            Payload::Entries(v) => OwnedPayload::Entries(v.iter().cloned().collect()),
            Payload::Chunk(c) => OwnedPayload::Chunk(c.to_vec()),
        };
        self.0.push_back((*m, owned));
    }
}

pub struct Node {
    pub raft: Raft,
    pub driver: Driver,
    pub storage: MemStorage,
    pub sm: RecordingSm,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub queue: VecDeque<(Message, OwnedPayload)>,
    pub now: Nanos,
    /// Messages from a to b are dropped while `cut[a][b]`.
    pub cut: Vec<Vec<bool>>,
    pub delivered: Vec<Message>,
}

pub fn config(id: NodeId) -> Config {
    let mut c = Config::new(id, 42);
    c.log_capacity = 1024;
    c
}

impl Cluster {
    /// `voters` voters (ids 1..) and `observers` observers; nodes with ids above
    /// `voters + observers` up to `extra` start outside the membership.
    pub fn new(voters: u64, observers: u64, extra: u64, tweak: impl Fn(&mut Config)) -> Cluster {
        let v: Vec<NodeId> = (1..=voters).collect();
        let o: Vec<NodeId> = (voters + 1..=voters + observers).collect();
        let m = Membership::new(&v, &o).unwrap();
        let total = voters + observers + extra;
        let mut nodes = Vec::new();
        for id in 1..=total {
            let mut c = config(id);
            tweak(&mut c);
            let initial = if id <= voters + observers {
                m
            } else {
                Membership::default()
            };
            nodes.push(Node {
                raft: Raft::new(c, initial, Recovered::default()).unwrap(),
                driver: Driver::new(1024, 1024),
                storage: MemStorage::default(),
                sm: RecordingSm::default(),
            });
        }
        let n = nodes.len();
        let mut c = Cluster {
            nodes,
            queue: VecDeque::new(),
            now: 1_000 * MS,
            cut: vec![vec![false; n]; n],
            delivered: Vec::new(),
        };
        for i in 0..n {
            let now = c.now;
            c.nodes[i].raft.tick(now);
            c.flush(i);
        }
        // Nodes refuse votes for one election timeout after they start.
        c.now += 100 * MS;
        c
    }

    pub fn node(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }
    pub fn raft(&self, id: NodeId) -> &Raft {
        &self.nodes[(id - 1) as usize].raft
    }

    /// Runs the driver for node index `i` (collect + finish the turn).
    pub fn flush(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let mut out = Outbox(&mut self.queue);
        n.driver
            .finish_turn(&mut n.raft, &mut n.storage, &mut out, &mut n.sm)
            .unwrap();
    }

    /// Delivers queued messages (and the ones they cause) until none are left.
    pub fn deliver_all(&mut self) {
        let mut budget = 100_000;
        while let Some((m, p)) = self.queue.pop_front() {
            budget -= 1;
            assert!(budget > 0, "message storm");
            let (from, to) = ((m.from - 1) as usize, (m.to - 1) as usize);
            if to >= self.nodes.len() || self.cut[from][to] {
                continue;
            }
            self.delivered.push(m);
            let payload = match &p {
                OwnedPayload::None => Payload::None,
                OwnedPayload::Entries(e) => Payload::Entries(EntriesView::from_slice(e)),
                OwnedPayload::Chunk(c) => Payload::Chunk(c),
            };
            let now = self.now;
            self.nodes[to].raft.step(now, &m, payload);
            self.flush(to);
        }
    }

    /// Delivers only the first queued message; returns it.
    pub fn deliver_one(&mut self) -> Option<Message> {
        let (m, p) = self.queue.pop_front()?;
        let (from, to) = ((m.from - 1) as usize, (m.to - 1) as usize);
        if to >= self.nodes.len() || self.cut[from][to] {
            return Some(m);
        }
        self.delivered.push(m);
        let payload = match &p {
            OwnedPayload::None => Payload::None,
            OwnedPayload::Entries(e) => Payload::Entries(EntriesView::from_slice(e)),
            OwnedPayload::Chunk(c) => Payload::Chunk(c),
        };
        let now = self.now;
        self.nodes[to].raft.step(now, &m, payload);
        self.flush(to);
        Some(m)
    }

    /// Drops queued messages matching `f`.
    pub fn drop_where(&mut self, f: impl Fn(&Message) -> bool) {
        self.queue.retain(|(m, _)| !f(m));
    }

    /// Advances time by `dt` and ticks every node.
    pub fn advance(&mut self, dt: Nanos) {
        self.now += dt;
        for i in 0..self.nodes.len() {
            let now = self.now;
            self.nodes[i].raft.tick(now);
            self.flush(i);
        }
    }

    /// Advances time in heartbeat-sized steps, delivering everything after each.
    pub fn run_for(&mut self, dt: Nanos) {
        let end = self.now + dt;
        while self.now < end {
            self.advance(5 * MS);
            self.deliver_all();
        }
    }

    /// Makes `id` campaign now (its election timer fires) and delivers everything.
    pub fn campaign(&mut self, id: NodeId) {
        let i = (id - 1) as usize;
        let now = self.now;
        self.nodes[i].raft.campaign_now(now);
        self.flush(i);
        self.deliver_all();
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.raft.is_leader())
            .max_by_key(|n| n.raft.term())
            .map(|n| n.raft.id())
    }

    pub fn propose(&mut self, id: NodeId, data: &[u8]) -> Result<(Index, Term), RaftError> {
        let now = self.now;
        let r = self.node(id).raft.propose(now, data);
        self.flush((id - 1) as usize);
        r
    }

    pub fn isolate(&mut self, id: NodeId) {
        let i = (id - 1) as usize;
        for j in 0..self.nodes.len() {
            if j != i {
                self.cut[i][j] = true;
                self.cut[j][i] = true;
            }
        }
    }

    pub fn heal(&mut self) {
        for row in &mut self.cut {
            row.iter_mut().for_each(|x| *x = false);
        }
    }
}
