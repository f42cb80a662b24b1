//! The simulated world: N real Raft nodes (core + driver) over a fake network, fake
//! disks and drifting clocks, one event queue, one seed.

use super::check::Checker;
use super::disk::SimDisk;
use super::kv::{KvState, Op, OpResult, CHECKED_KEYS, KEYS};
use super::linearizability::{HistoryOp, INFINITY};
use crate::raft::rng::Rng;
use crate::raft::{
    Bugs, ConfChange, Config, Driver, Entry, Index, Membership, Message, Nanos, NodeId, Payload,
    Raft, RaftError, Role, StateMachine, Term, Transport,
};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

mod hosts;
pub use hosts::{VmBugs, Workload};

pub const MS: Nanos = 1_000_000;
/// The agent's fast-failover stagger between survivors' campaigns, and its jitter.
const HINT_STAGGER: Nanos = 8 * MS;
const HINT_JITTER: Nanos = MS;

/// Delay, loss and duplication of every link.
#[derive(Clone, Copy, Debug)]
pub struct LinkModel {
    pub min_delay: Nanos,
    pub jitter: Nanos,
    pub loss: f64,
    pub duplicate: f64,
    /// Probability that a message is held back much longer (reordering).
    pub straggle: f64,
}

/// Everything one simulation run depends on, besides the seed.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub voters: usize,
    pub observers: usize,
    /// Nodes outside the initial membership, added later as observers.
    pub spares: usize,
    pub clients: usize,
    /// Faults happen in `[0, fault_time)`; then everything heals.
    pub fault_time: Nanos,
    /// Simulated time after the heal.
    pub quiet_time: Nanos,
    /// After the heal, a new entry must commit within this time.
    pub liveness_bound: Nanos,
    pub link: LinkModel,
    /// Every link exactly `link` (otherwise each link varies around it).
    pub uniform_links: bool,
    pub faults: bool,
    pub disk_faults: bool,
    pub membership_changes: bool,
    pub sync_latency: (Nanos, Nanos),
    /// Compact a node's log once this many applied entries follow its snapshot.
    pub compact_every: u64,
    pub heartbeat: Nanos,
    pub election_timeout: Nanos,
    pub max_history: usize,
    pub bugs: Bugs,
    /// VM mode: every node is a host with fake VMMs (see `hosts`).
    pub vms: bool,
    pub vm_bugs: VmBugs,
    /// Print every event to stderr (debugging a seed).
    pub verbose: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        let mut rng = Rng::new(seed ^ 0xc0ff_ee00);
        let voters = [3, 3, 5, 5, 7][rng.below(5) as usize];
        SimConfig {
            seed,
            voters,
            observers: rng.below(3) as usize,
            spares: rng.below(2) as usize,
            clients: 3,
            fault_time: 3_000 * MS,
            quiet_time: 4_000 * MS,
            liveness_bound: 3_000 * MS,
            link: LinkModel {
                min_delay: MS / 2,
                jitter: (1 + rng.below(5)) * MS,
                loss: [0.0, 0.01, 0.05, 0.15][rng.below(4) as usize],
                duplicate: [0.0, 0.01, 0.05][rng.below(3) as usize],
                straggle: [0.0, 0.01][rng.below(2) as usize],
            },
            uniform_links: false,
            faults: true,
            disk_faults: true,
            membership_changes: true,
            // Fast and slow disks.
            sync_latency: [(MS / 10, 2 * MS), (MS, 15 * MS)][rng.below(2) as usize],
            compact_every: 48 + rng.below(64),
            heartbeat: 20 * MS,
            election_timeout: 100 * MS,
            max_history: 600,
            bugs: Bugs::default(),
            vms: false,
            vm_bugs: VmBugs::default(),
            verbose: std::env::var_os("VIGIL_SIM_VERBOSE").is_some(),
        }
    }
}

impl SimConfig {
    /// VM mode for `seed`: the same cluster and faults, plus hosts, VMMs, host freezes
    /// and power losses, and one KV client (the log carries cluster commands too).
    pub fn vm_mode(seed: u64) -> SimConfig {
        let mut cfg = SimConfig::new(seed);
        cfg.vms = true;
        cfg.clients = 1;
        cfg.max_history = 200;
        cfg
    }
}

/// A message payload owned by the network.
#[derive(Clone, Debug)]
pub enum OwnedPayload {
    None,
    Entries(Vec<Entry>),
    Chunk(Vec<u8>),
}

#[derive(Clone, Debug)]
pub enum Fault {
    Partition(Vec<usize>),
    Isolate(usize),
    OneWay(usize, usize),
    Heal,
    Crash(usize),
    /// VM mode: the host machine loses power (its VMMs die with the agent).
    PowerOff(usize),
    /// VM mode: the agent is stopped (SIGSTOP) for this long; its VMMs keep running.
    Freeze(usize, Nanos),
    Restart(usize),
    FlipBit(usize),
    TransferLeader,
    Membership,
    HealAll,
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: usize,
        msg: Message,
        payload: OwnedPayload,
    },
    Tick {
        node: usize,
        epoch: u64,
    },
    SyncDone {
        node: usize,
        epoch: u64,
    },
    Client(usize),
    ClientTimeout {
        client: usize,
        hist: usize,
    },
    Fault(usize),
    HostTick(usize),
    Workload(usize),
    /// `node` sees its connection to `peer` reset: `peer`'s process died (kill -9, power
    /// loss). Only for the process `epoch` of `node` (a restarted one has new ones).
    ConnectionLost {
        node: usize,
        peer: usize,
        epoch: u64,
    },
    /// The fast-failover campaign planned after a lost leader connection (as the agent
    /// does: staggered by rank), unless a leader was heard from meanwhile.
    HintCampaign {
        node: usize,
        lost: NodeId,
        epoch: u64,
    },
}

struct Live {
    raft: Raft,
    driver: Driver,
    kv: KvState,
    sync_pending: bool,
}

pub struct SimNode {
    pub id: NodeId,
    live: Option<Live>,
    pub disk: SimDisk,
    /// Recovery found a corrupt record: the node refuses to start, forever.
    pub corrupt: bool,
    rate: f64,
    offset: Nanos,
    epoch: u64,
    next_tick: Nanos,
    /// Whether this node is in the founding membership (joiners start empty).
    founding: bool,
}

enum Wait {
    Entry { index: Index, term: Term },
    Read { id: u64 },
}

struct Pending {
    hist: usize,
    node: usize,
    wait: Wait,
}

struct Client {
    guess: usize,
    pending: Option<Pending>,
}

/// Collects a node's outgoing messages during one call into the driver.
struct Outbox<'a> {
    out: &'a mut Vec<(Message, OwnedPayload)>,
}

impl Transport for Outbox<'_> {
    fn send(&mut self, m: &Message, payload: Payload<'_>) {
        let owned = match payload {
            Payload::None => OwnedPayload::None,
            Payload::Entries(v) => OwnedPayload::Entries(v.iter().cloned().collect()),
            Payload::Chunk(c) => OwnedPayload::Chunk(c.to_vec()),
        };
        self.out.push((*m, owned));
    }
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub seed: u64,
    pub violation: Option<String>,
    pub trace_hash: u64,
    pub sim_nanos: Nanos,
    pub events: u64,
    pub committed: Index,
    pub leaders: usize,
    pub history_ops: usize,
    pub linearizability: &'static str,
    pub schedule: Vec<(Nanos, Fault)>,
    pub snapshots_installed: u64,
    pub corrupt_nodes: usize,
    /// Membership changes and leadership transfers the leader accepted.
    pub membership_changes: u64,
    pub transfers: u64,
    /// VM mode: VMs created, and per resurrection (ns of simulated time): host declared
    /// dead -> VM running again, and VM stopped running -> running again.
    pub vms: usize,
    pub vm_after_declared_dead: Vec<Nanos>,
    pub vm_outages: Vec<Nanos>,
}

pub struct World {
    pub cfg: SimConfig,
    rng: Rng,
    now: Nanos,
    seq: u64,
    queue: BinaryHeap<Reverse<(Nanos, u64, usize)>>,
    slab: Vec<Option<Ev>>,
    free: Vec<usize>,
    pub nodes: Vec<SimNode>,
    blocked: Vec<Vec<bool>>,
    /// Per link (from, to): minimum delay and jitter (uniform extra delay).
    delays: Vec<Vec<(Nanos, Nanos)>>,
    clients: Vec<Client>,
    pub history: Vec<HistoryOp>,
    next_value: u64,
    next_read_id: u64,
    schedule: Vec<(Nanos, Fault)>,
    pub checker: Checker,
    trace: u64,
    events: u64,
    outbox: Vec<(Message, OwnedPayload)>,
    snap_buf: Vec<u8>,
    initial: Membership,
    liveness_target: Option<(Nanos, Index)>,
    liveness_met: bool,
    pub snapshots_installed: u64,
    membership_changes: u64,
    transfers: u64,
    vm: Option<hosts::VmWorld>,
}

fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x100_0000_01b3).rotate_left(17)
}

impl World {
    pub fn new(cfg: SimConfig) -> World {
        let mut rng = Rng::new(cfg.seed);
        let members = cfg.voters + cfg.observers;
        let total = members + cfg.spares;
        let voters: Vec<NodeId> = (1..=cfg.voters as u64).collect();
        let observers: Vec<NodeId> = (cfg.voters as u64 + 1..=members as u64).collect();
        let initial = Membership::new(&voters, &observers).expect("valid membership");
        let mut nodes = Vec::new();
        for i in 0..total {
            let rate = 0.99 + 0.02 * (rng.below(1_000_001) as f64 / 1_000_000.0);
            let offset = rng.below(1_000_000_000_000);
            nodes.push(SimNode {
                id: i as u64 + 1,
                live: None,
                disk: SimDisk::new(),
                corrupt: false,
                rate,
                offset,
                epoch: 0,
                next_tick: u64::MAX,
                founding: i < members,
            });
        }
        let clients = (0..cfg.clients)
            .map(|c| Client {
                guess: c % cfg.voters,
                pending: None,
            })
            .collect();
        // Each link gets its own delay distribution around the configured one: the
        // minimum scaled by 1..3x, the jitter by 0.5..2x.
        let mut delays = vec![vec![(0, 0); total]; total];
        for row in delays.iter_mut() {
            for d in row.iter_mut() {
                *d = if cfg.uniform_links {
                    (cfg.link.min_delay, cfg.link.jitter)
                } else {
                    let min = cfg.link.min_delay * (100 + rng.below(201)) / 100;
                    let jitter = cfg.link.jitter * (50 + rng.below(151)) / 100;
                    (min, jitter)
                };
            }
        }
        let mut w = World {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            blocked: vec![vec![false; total]; total],
            delays,
            clients,
            history: Vec::new(),
            next_value: 1,
            next_read_id: 1,
            schedule: Vec::new(),
            checker: Checker::new(),
            trace: 0xcbf2_9ce4_8422_2325,
            events: 0,
            outbox: Vec::new(),
            snap_buf: Vec::new(),
            initial,
            liveness_target: None,
            liveness_met: false,
            snapshots_installed: 0,
            membership_changes: 0,
            transfers: 0,
            vm: None,
            nodes,
            cfg,
        };
        if w.cfg.vms {
            let fault_time = w.cfg.fault_time;
            let mut vm = hosts::VmWorld::new(total, w.cfg.vm_bugs, &mut w.rng, fault_time);
            if !w.cfg.faults {
                // Nothing to heal: the liveness checks hold from the start.
                vm.healed_at = Some(0);
            }
            w.vm = Some(vm);
        }
        for n in 0..total {
            w.start_node(n);
        }
        for c in 0..w.cfg.clients {
            let t = w.rng.below(50 * MS);
            w.push(t, Ev::Client(c));
        }
        w.make_schedule();
        w.vm_schedule();
        w
    }

    fn push(&mut self, at: Nanos, ev: Ev) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.slab[s] = Some(ev);
                s
            }
            None => {
                self.slab.push(Some(ev));
                self.slab.len() - 1
            }
        };
        self.seq += 1;
        self.queue.push(Reverse((at.max(self.now), self.seq, slot)));
    }

    /// The node's own clock at global time `t`.
    fn local(&self, n: usize, t: Nanos) -> Nanos {
        let node = &self.nodes[n];
        node.offset + (t as f64 * node.rate) as u64
    }

    /// The global time at which the node's clock reads `local`.
    fn global(&self, n: usize, local: Nanos) -> Nanos {
        let node = &self.nodes[n];
        if local <= node.offset {
            return self.now;
        }
        ((local - node.offset) as f64 / node.rate).ceil() as u64 + 1
    }

    fn make_schedule(&mut self) {
        if !self.cfg.faults {
            return;
        }
        let total = self.nodes.len();
        let voters = self.cfg.voters;
        let mut t = 100 * MS + self.rng.below(300 * MS);
        let mut flipped = false;
        while t < self.cfg.fault_time {
            let f = match self.rng.below(12) {
                0 | 1 => {
                    let mut side = Vec::new();
                    for n in 0..total {
                        if self.rng.chance(0.5) {
                            side.push(n);
                        }
                    }
                    Fault::Partition(side)
                }
                2 => Fault::Isolate(self.rng.below(total as u64) as usize),
                3 => {
                    let a = self.rng.below(total as u64) as usize;
                    let b = self.rng.below(total as u64) as usize;
                    Fault::OneWay(a, b)
                }
                4 | 5 => Fault::Heal,
                7 if self.cfg.vms && self.rng.chance(0.4) => {
                    let n = self.rng.below(total as u64) as usize;
                    let back = t + 20 * MS + self.rng.below(600 * MS);
                    if back < self.cfg.fault_time {
                        self.schedule.push((back, Fault::Restart(n)));
                    }
                    Fault::PowerOff(n)
                }
                6 | 7 => {
                    let n = self.rng.below(total as u64) as usize;
                    let back = t + 20 * MS + self.rng.below(600 * MS);
                    if back < self.cfg.fault_time {
                        self.schedule.push((back, Fault::Restart(n)));
                    }
                    Fault::Crash(n)
                }
                8 if self.cfg.disk_faults && !flipped && voters >= 3 => {
                    flipped = true;
                    Fault::FlipBit(self.rng.below(total as u64) as usize)
                }
                9 => Fault::TransferLeader,
                11 if self.cfg.vms => {
                    let n = self.rng.below(total as u64) as usize;
                    Fault::Freeze(n, 100 * MS + self.rng.below(1_400 * MS))
                }
                10 if self.cfg.membership_changes => Fault::Membership,
                _ => Fault::Heal,
            };
            self.schedule.push((t, f));
            t += 50 * MS + self.rng.below(400 * MS);
        }
        self.schedule.push((self.cfg.fault_time, Fault::HealAll));
        self.schedule.sort_by_key(|(t, _)| *t);
        for i in 0..self.schedule.len() {
            let at = self.schedule[i].0;
            self.push(at, Ev::Fault(i));
        }
    }

    // ---- Nodes -----------------------------------------------------------------------

    fn start_node(&mut self, n: usize) {
        if self.nodes[n].corrupt || self.nodes[n].live.is_some() {
            return;
        }
        let recovered = match self.nodes[n].disk.recover() {
            Ok(r) => r,
            Err(c) => {
                log::debug!("node {} refuses to start: {c}", self.nodes[n].id);
                self.nodes[n].corrupt = true;
                return;
            }
        };
        let mut cfg = Config::new(
            self.nodes[n].id,
            self.cfg.seed.wrapping_add(self.nodes[n].epoch),
        );
        cfg.heartbeat_interval = self.cfg.heartbeat;
        cfg.election_timeout = self.cfg.election_timeout;
        cfg.election_spread = self.cfg.election_timeout;
        cfg.bugs = self.cfg.bugs;
        cfg.log_capacity = 4096;
        let initial = if self.nodes[n].founding {
            self.initial
        } else {
            Membership::default()
        };
        let snapshot_state = recovered.snapshot.as_ref().map(|(_, d)| d.clone());
        let raft = match Raft::new(cfg, initial, recovered) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("node {} refuses to start: {e}", self.nodes[n].id);
                self.nodes[n].corrupt = true;
                return;
            }
        };
        let mut kv = KvState::default();
        if self.cfg.vms {
            kv.cluster = Some(Box::new(crate::cluster::state::ClusterState::new()));
        }
        if snapshot_state.is_some() {
            kv.restore(raft.snapshot_state());
        }
        self.nodes[n].epoch += 1;
        self.nodes[n].live = Some(Live {
            raft,
            driver: Driver::new(1024, 1024),
            kv,
            sync_pending: false,
        });
        self.nodes[n].next_tick = u64::MAX;
        self.after_input(n);
    }

    fn crash_node(&mut self, n: usize) {
        self.crash_host(n, false);
    }

    fn crash_host(&mut self, n: usize, power_loss: bool) {
        if power_loss {
            // The VMMs die even if the agent was already down.
            self.host_crashed(n, true);
        }
        if self.nodes[n].live.take().is_none() {
            return;
        }
        // Every peer that still reaches it sees its connection reset.
        for m in 0..self.nodes.len() {
            if m != n && self.nodes[m].live.is_some() && !self.blocked[n][m] {
                let at = self.now + self.delays[n][m].0;
                let epoch = self.nodes[m].epoch;
                self.push(
                    at,
                    Ev::ConnectionLost {
                        node: m,
                        peer: n,
                        epoch,
                    },
                );
            }
        }
        if let Some(vm) = self.vm.as_mut() {
            vm.hosts[n].frozen_until = 0;
        }
        self.host_crashed(n, power_loss);
        let mut rng = Rng::new(self.rng.next_u64());
        self.nodes[n].disk.crash(&mut rng);
        self.nodes[n].epoch += 1;
        self.checker.node_crashed(n);
        self.checker.crashed_at(n, self.now);
        for c in 0..self.clients.len() {
            if self.clients[c]
                .pending
                .as_ref()
                .is_some_and(|p| p.node == n)
            {
                // Outcome unknown: the history op keeps an infinite return time.
                self.clients[c].pending = None;
                let t = self.now + self.rng.below(20 * MS);
                self.push(t, Ev::Client(c));
            }
        }
    }

    /// Node `n` saw its connection to `peer` reset: if that was its leader, it drops its
    /// loyalty and campaigns after a stagger by rank (the agent's fast failover).
    fn connection_lost(&mut self, n: usize, peer: usize, epoch: u64) {
        if self.nodes[n].epoch != epoch {
            return;
        }
        let local = self.local(n, self.now);
        let lost = self.nodes[peer].id;
        let me = self.nodes[n].id;
        let Some(live) = self.nodes[n].live.as_mut() else {
            return;
        };
        if !live.raft.leader_connection_lost(local, lost) {
            return;
        }
        let rank = live
            .raft
            .membership()
            .voters
            .as_slice()
            .iter()
            .filter(|&&v| v != lost && v < me)
            .count() as u64;
        self.after_input(n);
        let at = self.now + rank * HINT_STAGGER + self.rng.below(HINT_JITTER);
        self.push(
            at,
            Ev::HintCampaign {
                node: n,
                lost,
                epoch,
            },
        );
    }

    /// Handles the driver's work after any input to node `n`.
    fn after_input(&mut self, n: usize) {
        let now = self.now;
        let epoch = self.nodes[n].epoch;
        let node = &mut self.nodes[n];
        let Some(live) = node.live.as_mut() else {
            return;
        };
        if live.raft.outputs().install_snapshot {
            self.snapshots_installed += 1;
        }
        let mut outbox = Outbox {
            out: &mut self.outbox,
        };
        live.driver
            .collect(&mut live.raft, &mut node.disk, &mut outbox, &mut live.kv)
            .expect("sim disk does not fail writes");
        if !live.sync_pending {
            if live.driver.needs_sync() {
                live.sync_pending = true;
                let (lo, hi) = self.cfg.sync_latency;
                let d = lo + self.rng.below(hi - lo + 1);
                self.push(now + d, Ev::SyncDone { node: n, epoch });
            } else {
                self.finish_turn(n);
            }
        }
        self.flush_outbox(n);
        self.observe(n);
        self.schedule_tick(n);
        self.after_apply(n);
    }

    /// VM mode: a host reconciles after it applied cluster commands.
    fn after_apply(&mut self, n: usize) {
        if self.nodes[n]
            .live
            .as_ref()
            .is_some_and(|l| l.kv.cluster_changed)
        {
            self.host_reconcile(n);
        }
    }

    fn finish_turn(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let Some(live) = node.live.as_mut() else {
            return;
        };
        let mut outbox = Outbox {
            out: &mut self.outbox,
        };
        live.driver
            .finish_turn(&mut live.raft, &mut node.disk, &mut outbox, &mut live.kv)
            .expect("sim disk does not fail");
        live.sync_pending = false;
        // Compaction policy: keep the in-memory log short.
        let raft = &live.raft;
        let applied = raft.applied_index();
        if applied >= raft.first_index() + self.cfg.compact_every
            && raft.persisted_index() >= applied
        {
            self.snap_buf.clear();
            live.kv.encode(&mut self.snap_buf);
            live.raft.compact(applied, &self.snap_buf);
            let mut outbox = Outbox {
                out: &mut self.outbox,
            };
            live.driver
                .collect(&mut live.raft, &mut node.disk, &mut outbox, &mut live.kv)
                .expect("sim disk");
            if live.driver.needs_sync() {
                live.sync_pending = true;
                let (lo, hi) = self.cfg.sync_latency;
                let d = lo + self.rng.below(hi - lo + 1);
                let epoch = node.epoch;
                let at = self.now + d;
                self.push(at, Ev::SyncDone { node: n, epoch });
            }
        }
        self.drain_applied(n);
    }

    fn flush_outbox(&mut self, n: usize) {
        let msgs = std::mem::take(&mut self.outbox);
        for (m, p) in msgs {
            self.trace = mix(
                self.trace,
                m.to ^ (m.term << 8) ^ (m.body.name().len() as u64) << 4,
            );
            let to = (m.to - 1) as usize;
            if to >= self.nodes.len() || self.blocked[n][to] {
                continue;
            }
            if self.rng.chance(self.cfg.link.loss) {
                continue;
            }
            let copies = if self.rng.chance(self.cfg.link.duplicate) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let (min, jitter) = self.delays[n][to];
                let mut d = min + self.rng.below(jitter + 1);
                if self.rng.chance(self.cfg.link.straggle) {
                    d += self.rng.below(200 * MS);
                }
                let at = self.now + d;
                self.push(
                    at,
                    Ev::Deliver {
                        to,
                        msg: m,
                        payload: p.clone(),
                    },
                );
            }
        }
    }

    fn schedule_tick(&mut self, n: usize) {
        let Some(live) = self.nodes[n].live.as_ref() else {
            return;
        };
        let d = live.raft.next_deadline();
        let g = self.global(n, d).max(self.now + 1);
        let node = &self.nodes[n];
        if g < node.next_tick || node.next_tick <= self.now {
            let epoch = node.epoch;
            self.nodes[n].next_tick = g;
            self.push(g, Ev::Tick { node: n, epoch });
        }
    }

    fn drain_applied(&mut self, n: usize) {
        let Some(live) = self.nodes[n].live.as_mut() else {
            return;
        };
        let applied = std::mem::take(&mut live.kv.applied);
        let reads = std::mem::take(&mut live.kv.reads_ready);
        let failed = std::mem::take(&mut live.kv.reads_failed);
        let values = live.kv.values;
        for a in &applied {
            self.checker.applied(n, a.index, a.term, a.hash);
            for c in 0..self.clients.len() {
                let done = match &self.clients[c].pending {
                    Some(p) if p.node == n => match p.wait {
                        Wait::Entry { index, term } if index == a.index => {
                            Some((p.hist, term == a.term))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                if let Some((hist, ours)) = done {
                    if ours {
                        self.history[hist].ret = self.now;
                        self.history[hist].result = a.result;
                    }
                    self.client_done(c);
                }
            }
        }
        for r in &reads {
            for c in 0..self.clients.len() {
                let done = match &self.clients[c].pending {
                    Some(p) if p.node == n => match p.wait {
                        Wait::Read { id } if id == r.id => Some(p.hist),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(hist) = done {
                    let key = self.history[hist].op.key() as usize;
                    self.history[hist].ret = self.now;
                    self.history[hist].result = Some(OpResult::Value(values[key]));
                    self.client_done(c);
                }
            }
        }
        for &id in &failed {
            for c in 0..self.clients.len() {
                let mine = matches!(&self.clients[c].pending,
                    Some(p) if p.node == n && matches!(p.wait, Wait::Read { id: r } if r == id));
                if mine {
                    // Not served: the read has no effect and no result (left unknown).
                    self.client_done(c);
                }
            }
        }
        if let Some(live) = self.nodes[n].live.as_mut() {
            live.kv.applied = applied;
            live.kv.applied.clear();
            live.kv.reads_ready = reads;
            live.kv.reads_ready.clear();
        }
    }

    fn client_done(&mut self, c: usize) {
        self.clients[c].pending = None;
        let t = self.now + self.rng.below(10 * MS);
        self.push(t, Ev::Client(c));
    }

    /// Runs the invariant checks that are cheap after an event at node `n`.
    fn observe(&mut self, n: usize) {
        let Some(live) = self.nodes[n].live.as_ref() else {
            return;
        };
        self.checker.observe(n, &live.raft, self.now);
        if live.raft.is_leader() {
            // The lease a leader may claim (see `Raft::quorum_contact`), in global time.
            let term = live.raft.term();
            match live.raft.quorum_contact() {
                Some(q) => {
                    let et = self.cfg.election_timeout;
                    let start = self.global(n, q);
                    let end = self.global(n, q + et - et * 3 / 100);
                    self.checker.lease(n, term, start, end);
                }
                None => self.checker.lease_none(n, self.now),
            }
        } else {
            self.checker.lease_none(n, self.now);
        }
        if let Some((deadline, target)) = self.liveness_target {
            if !self.liveness_met && live.raft.commit_index() > target {
                self.liveness_met = true;
                self.checker.liveness_latency =
                    Some(self.now - (deadline - self.cfg.liveness_bound));
            }
        }
    }

    // ---- Events ----------------------------------------------------------------------

    fn handle(&mut self, ev: Ev) {
        self.events += 1;
        if self.cfg.verbose {
            let roles: Vec<String> = (0..self.nodes.len())
                .map(|n| match self.raft(n) {
                    Some(r) => format!(
                        "{}:{:?}/t{}/c{}/l{}",
                        n + 1,
                        r.role(),
                        r.term(),
                        r.commit_index(),
                        r.last_index()
                    ),
                    None => format!("{}:down", n + 1),
                })
                .collect();
            eprintln!("{:>10} {:?} | {}", self.now, ev, roles.join(" "));
        }
        // A frozen agent (SIGSTOP) handles nothing: its inputs wait until it thaws.
        let target = match &ev {
            Ev::Deliver { to, .. } => Some(*to),
            Ev::Tick { node, .. }
            | Ev::SyncDone { node, .. }
            | Ev::ConnectionLost { node, .. }
            | Ev::HintCampaign { node, .. } => Some(*node),
            _ => None,
        };
        if let Some(until) = target.and_then(|n| self.frozen(n)) {
            if let Ev::Tick { node, .. } = ev {
                // The tick moves: a tick fires only at the node's `next_tick`.
                self.nodes[node].next_tick = until;
            }
            self.push(until, ev);
            return;
        }
        match ev {
            Ev::Deliver { to, msg, payload } => {
                self.trace = mix(self.trace, self.now ^ (to as u64) << 1);
                let local = self.local(to, self.now);
                let Some(live) = self.nodes[to].live.as_mut() else {
                    return;
                };
                let p = match &payload {
                    OwnedPayload::None => Payload::None,
                    OwnedPayload::Entries(e) => {
                        Payload::Entries(crate::raft::EntriesView::from_slice(e))
                    }
                    OwnedPayload::Chunk(c) => Payload::Chunk(c),
                };
                live.raft.step(local, &msg, p);
                self.after_input(to);
            }
            Ev::Tick { node, epoch } => {
                if self.nodes[node].epoch != epoch || self.nodes[node].next_tick != self.now {
                    return;
                }
                self.trace = mix(self.trace, self.now ^ 0x7);
                let local = self.local(node, self.now);
                self.nodes[node].next_tick = u64::MAX;
                if let Some(live) = self.nodes[node].live.as_mut() {
                    live.raft.tick(local);
                    self.after_input(node);
                }
            }
            Ev::SyncDone { node, epoch } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                self.trace = mix(self.trace, self.now ^ 0x9);
                self.finish_turn(node);
                self.flush_outbox(node);
                self.observe(node);
                self.schedule_tick(node);
                self.after_apply(node);
            }
            Ev::HostTick(n) => self.host_tick(n),
            Ev::ConnectionLost { node, peer, epoch } => self.connection_lost(node, peer, epoch),
            Ev::HintCampaign { node, lost, epoch } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                let local = self.local(node, self.now);
                if let Some(live) = self.nodes[node].live.as_mut() {
                    let r = &live.raft;
                    if r.role() == Role::Follower && (r.leader() == 0 || r.leader() == lost) {
                        live.raft.campaign_now(local);
                        self.after_input(node);
                    }
                }
            }
            Ev::Workload(i) => self.workload(i),
            Ev::Client(c) => self.client_step(c),
            Ev::ClientTimeout { client, hist } => {
                if self.clients[client]
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.hist == hist)
                {
                    self.clients[client].pending = None;
                    self.clients[client].guess = self.rng.below(self.nodes.len() as u64) as usize;
                    let t = self.now + self.rng.below(10 * MS);
                    self.push(t, Ev::Client(client));
                }
            }
            Ev::Fault(i) => {
                let f = self.schedule[i].1.clone();
                self.trace = mix(self.trace, i as u64 ^ 0xfa);
                self.apply_fault(f);
            }
        }
    }

    fn client_step(&mut self, c: usize) {
        if self.clients[c].pending.is_some() {
            return;
        }
        let end = self.cfg.fault_time + self.cfg.quiet_time;
        if self.history.len() >= self.cfg.max_history && self.liveness_target.is_none() {
            // History is full; clients pause until the heal (liveness needs new writes).
            let t = self.cfg.fault_time.max(self.now + MS);
            self.push(t, Ev::Client(c));
            return;
        }
        if self.now >= end {
            return;
        }
        let mut n = self.clients[c].guess;
        let retry = |w: &mut World, guess: Option<usize>| {
            w.clients[c].guess =
                guess.unwrap_or_else(|| w.rng.below(w.nodes.len() as u64) as usize);
            let t = w.now + MS + w.rng.below(10 * MS);
            w.push(t, Ev::Client(c));
        };
        if self.nodes[n].live.is_none() || self.frozen(n).is_some() {
            retry(self, None);
            return;
        }
        let over_budget = self.history.len() >= self.cfg.max_history;
        let key = self.rng.below(CHECKED_KEYS as u64) as u8;
        let follower_read = self.rng.chance(0.3);
        let op = match self.rng.below(10) {
            _ if over_budget => {
                self.next_value += 1;
                Op::Put {
                    key: (KEYS - 1) as u8,
                    value: self.next_value,
                }
            }
            0..=3 => {
                self.next_value += 1;
                Op::Put {
                    key,
                    value: self.next_value,
                }
            }
            4..=6 => Op::Get { key },
            _ => {
                self.next_value += 1;
                // Expect a recent value to make successful CAS likely.
                let expected = if self.rng.chance(0.3) {
                    0
                } else {
                    self.next_value - 1 - self.rng.below(4).min(self.next_value - 1)
                };
                Op::Cas {
                    key,
                    expected,
                    new: self.next_value,
                }
            }
        };
        if matches!(op, Op::Get { .. }) && follower_read {
            // Reads also go to any node: followers ask the leader for a read index.
            let other = self.rng.below(self.nodes.len() as u64) as usize;
            if self.nodes[other].live.is_some() && self.frozen(other).is_none() {
                n = other;
            }
        }
        let local = self.local(n, self.now);
        let live = self.nodes[n].live.as_mut().expect("checked");
        let result = match op {
            Op::Get { .. } => {
                let id = self.next_read_id;
                self.next_read_id += 1;
                live.raft.read_index(local, id).map(|_| Wait::Read { id })
            }
            _ => {
                let mut data = Vec::with_capacity(32);
                op.encode(c as u32, &mut data);
                live.raft
                    .propose(local, &data)
                    .map(|(index, term)| Wait::Entry { index, term })
            }
        };
        match result {
            Ok(wait) => {
                let hist = self.history.len();
                if !over_budget {
                    self.history.push(HistoryOp {
                        client: c as u32,
                        op,
                        call: self.now,
                        ret: INFINITY,
                        result: None,
                    });
                }
                self.clients[c].pending = Some(Pending {
                    hist: if over_budget { usize::MAX } else { hist },
                    node: n,
                    wait,
                });
                if over_budget {
                    // Past the history bound: the op still runs (liveness) but is not
                    // recorded; complete it without touching the history.
                    self.clients[c].pending = None;
                    let t = self.now + 5 * MS;
                    self.push(t, Ev::Client(c));
                } else {
                    let t = self.now + 1_000 * MS;
                    self.push(t, Ev::ClientTimeout { client: c, hist });
                }
                self.after_input(n);
            }
            Err(RaftError::NotLeader { leader }) => {
                let guess = (leader != 0).then(|| (leader - 1) as usize);
                retry(self, guess);
            }
            Err(_) => retry(self, Some(n)),
        }
    }

    fn apply_fault(&mut self, f: Fault) {
        let total = self.nodes.len();
        match f {
            Fault::Partition(side) => {
                for a in 0..total {
                    for b in 0..total {
                        self.blocked[a][b] = side.contains(&a) != side.contains(&b);
                    }
                }
            }
            Fault::Isolate(n) => {
                for o in 0..total {
                    if o != n {
                        self.blocked[n][o] = true;
                        self.blocked[o][n] = true;
                    }
                }
            }
            Fault::OneWay(a, b) => {
                if a != b {
                    self.blocked[a][b] = true;
                }
            }
            Fault::Heal => {
                for row in &mut self.blocked {
                    row.iter_mut().for_each(|x| *x = false);
                }
            }
            Fault::Crash(n) => self.crash_node(n),
            Fault::PowerOff(n) => self.crash_host(n, true),
            Fault::Freeze(n, d) => {
                let until = (self.now + d).min(self.cfg.fault_time);
                if let Some(vm) = self.vm.as_mut() {
                    if self.nodes[n].live.is_some() {
                        vm.hosts[n].frozen_until = until;
                    }
                }
            }
            Fault::Restart(n) => self.start_node(n),
            Fault::FlipBit(n) => {
                let mut rng = Rng::new(self.rng.next_u64());
                if self.nodes[n].disk.flip_bit(&mut rng) {
                    // The flip is found when the node next reads its disk: crash it now.
                    self.crash_node(n);
                    self.start_node(n);
                }
            }
            Fault::TransferLeader => {
                for n in 0..total {
                    let local = self.local(n, self.now);
                    if let Some(live) = self.nodes[n].live.as_mut() {
                        if live.raft.is_leader() {
                            if live.raft.transfer_leadership(local, 0).is_ok() {
                                self.transfers += 1;
                            }
                            self.after_input(n);
                            break;
                        }
                    }
                }
            }
            Fault::Membership => self.membership_fault(),
            Fault::HealAll => {
                if let Some(vm) = self.vm.as_mut() {
                    for h in &mut vm.hosts {
                        h.frozen_until = 0;
                    }
                    vm.healed_at = Some(self.now);
                }
                for row in &mut self.blocked {
                    row.iter_mut().for_each(|x| *x = false);
                }
                for n in 0..total {
                    self.start_node(n);
                }
                let target = self
                    .nodes
                    .iter()
                    .filter_map(|n| n.live.as_ref().map(|l| l.raft.last_index()))
                    .max()
                    .unwrap_or(0);
                self.liveness_target = Some((self.now + self.cfg.liveness_bound, target));
            }
        }
    }

    /// Proposes a random single-server change at the leader: demote/promote or
    /// remove/add-back of one node, keeping at least 3 voters.
    fn membership_fault(&mut self) {
        let total = self.nodes.len();
        let Some(l) = (0..total).find(|&n| {
            self.nodes[n]
                .live
                .as_ref()
                .is_some_and(|l| l.raft.is_leader())
        }) else {
            return;
        };
        let live = self.nodes[l].live.as_ref().unwrap();
        let m = *live.raft.membership();
        let pick = self.rng.below(total as u64) + 1;
        let change = if m.voters.contains(pick) {
            // Three voters at least: the fault model may keep one down for good.
            if m.voters.len() > 3 {
                if self.rng.chance(0.5) {
                    ConfChange::Demote(pick)
                } else {
                    ConfChange::Remove(pick)
                }
            } else {
                return;
            }
        } else if m.observers.contains(pick) {
            if m.voters.len() < self.cfg.voters.max(3) {
                ConfChange::Promote(pick)
            } else if let Some(&old) = m.voters.as_slice().iter().find(|&&v| v != pick) {
                ConfChange::Replace { old, new: pick }
            } else {
                return;
            }
        } else {
            // Removed earlier: it comes back as an observer, with its disk. (A node id
            // must never come back with an empty disk: a stale configuration may still
            // count its votes, and it would not remember them. The simulator found
            // exactly that double vote when it wiped re-added nodes.)
            ConfChange::AddObserver(pick)
        };
        let local = self.local(l, self.now);
        if let Some(live) = self.nodes[l].live.as_mut() {
            if live.raft.change_membership(local, change).is_ok() {
                self.membership_changes += 1;
            }
            self.after_input(l);
        }
    }

    /// Runs to the end (or until `stop_when` says so) and checks everything.
    pub fn run(&mut self) -> RunReport {
        let end = self.cfg.fault_time + self.cfg.quiet_time;
        let mut since_full_check = 0;
        while let Some(Reverse((at, _, slot))) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now = at;
            let ev = self.slab[slot].take().expect("event present");
            self.free.push(slot);
            self.handle(ev);
            if self.vm.is_some() {
                self.check_split_brain();
            }
            since_full_check += 1;
            if since_full_check >= 256 {
                since_full_check = 0;
                self.full_check();
            }
            if self.checker.violation.is_some() {
                break;
            }
        }
        self.finish()
    }

    fn full_check(&mut self) {
        let rafts: Vec<(usize, &Raft)> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.live.as_ref().map(|l| (i, &l.raft)))
            .collect();
        self.checker.log_matching(&rafts);
    }

    fn finish(&mut self) -> RunReport {
        self.full_check();
        if self.cfg.verbose {
            for h in &self.history {
                eprintln!("history {h:?}");
            }
        }
        let mut lin = "skipped";
        if self.checker.violation.is_none() {
            match super::linearizability::check(&self.history, CHECKED_KEYS) {
                super::linearizability::Verdict::Ok => lin = "ok",
                super::linearizability::Verdict::Unknown => lin = "unknown",
                super::linearizability::Verdict::Violation(v) => {
                    lin = "violation";
                    self.checker.violation = Some(format!("linearizability: {v}"));
                }
            }
            if self.checker.violation.is_none() {
                if let Some(v) = self.check_vm_liveness() {
                    self.checker.violation = Some(v);
                }
            }
            if self.cfg.faults && self.liveness_target.is_some() && !self.liveness_met {
                self.checker.violation = Some(format!(
                    "liveness: nothing new committed within {} ms after the last fault healed",
                    self.cfg.liveness_bound / MS
                ));
            }
        }
        let committed = self
            .nodes
            .iter()
            .filter_map(|n| n.live.as_ref().map(|l| l.raft.commit_index()))
            .max()
            .unwrap_or(0);
        RunReport {
            seed: self.cfg.seed,
            violation: self.checker.violation.clone(),
            trace_hash: self.trace,
            sim_nanos: self.now,
            events: self.events,
            committed,
            leaders: self.checker.leaders_seen(),
            history_ops: self.history.len(),
            linearizability: lin,
            schedule: self.schedule.clone(),
            snapshots_installed: self.snapshots_installed,
            corrupt_nodes: self.nodes.iter().filter(|n| n.corrupt).count(),
            membership_changes: self.membership_changes,
            transfers: self.transfers,
            vms: self.vm.as_ref().map_or(0, |v| v.vms_created),
            vm_after_declared_dead: self
                .vm
                .as_ref()
                .map_or(Vec::new(), |v| v.after_declared_dead.clone()),
            vm_outages: self.vm.as_ref().map_or(Vec::new(), |v| v.outages.clone()),
        }
    }

    // ---- For benchmarks and tests ---------------------------------------------------

    pub fn now(&self) -> Nanos {
        self.now
    }
    pub fn raft(&self, n: usize) -> Option<&Raft> {
        self.nodes[n].live.as_ref().map(|l| &l.raft)
    }
    /// The node that is leader with the highest term, if any.
    pub fn leader(&self) -> Option<usize> {
        (0..self.nodes.len())
            .filter(|&n| self.raft(n).is_some_and(|r| r.role() == Role::Leader))
            .max_by_key(|&n| self.raft(n).unwrap().term())
    }
    pub fn crash(&mut self, n: usize) {
        self.crash_node(n);
    }
    pub fn restart(&mut self, n: usize) {
        self.start_node(n);
    }
    /// Runs events until `until` (simulated) or until `stop` returns true.
    pub fn run_until(&mut self, until: Nanos, mut stop: impl FnMut(&World) -> bool) -> bool {
        while let Some(Reverse((at, _, slot))) = self.queue.peek().copied() {
            if at > until {
                self.now = until;
                return false;
            }
            self.queue.pop();
            self.now = at;
            let ev = self.slab[slot].take().expect("event present");
            self.free.push(slot);
            self.handle(ev);
            if stop(self) {
                return true;
            }
        }
        false
    }
}
