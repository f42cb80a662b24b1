//! The agent's node: one thread, one event loop that owns the Raft core, its WAL-backed
//! storage, the peer connections, the control socket and the signal fd.
//!
//! One loop turn:
//!
//! ```text
//! io.wait(next deadline)                       completions: readable sockets, connects,
//!                                              signals, the flushes of the sync in flight
//!   -> sync flush completions: when the last one is in, driver.complete_sync: raft learns
//!      what is durable (leader: its own match index), the votes/acks it covers leave
//!   -> peers: decode frames -> raft.step       -> driver.collect (persist, send, queue acks)
//!   -> control: parse requests -> propose / read_index / answer / forward to the leader
//!   -> raft.tick when due; dial lost peers
//! driver.end_turn                              no sync in flight and something written:
//!                                              begin ONE sync (WAL + hard state) and submit
//!                                              its fdatasyncs; apply, linearizable reads
//! answer applied writes and ready reads; publish leadership events; compact; flush sockets
//! ```
//!
//! Sockets are operations on the ring (emulated on epoll): accepts, connects, one recv
//! and one send in flight per connection, with slab buffers: see `net::peers` for the
//! peers, `control::server` for the control socket and `vmm_conn` for the connections to
//! this host's `vigil vmm` processes (their completions reach them before the ECANCELED
//! filter). The WAL sync runs as fdatasync operations on the ring
//! (group commit: at most one sync in flight; everything written meanwhile goes into the
//! next one), so the loop keeps serving timers, peers and control clients while the disk
//! works. On the epoll backend the same operations run as blocking fdatasync(2) inside
//! the next `io.wait` (the fallback has no threads): same ordering, but the loop stalls
//! for the flush there. A sync that carries a new term or vote flushes inline on both
//! backends (see `finish_turn`). See `raft::driver` for the ordering argument and its
//! assertions.
//!
//! Fast failover hint: when the connection to the leader drops, a follower starts a
//! PreVote at once (PreVote keeps this safe: voters that still hear from a live leader
//! refuse it).

pub mod storage;
pub mod sweep;
mod vmm_conn;
mod vms;

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::cluster::command::{Command, KvCommand, RequestId};
use crate::cluster::kv;
use crate::cluster::state::{ClusterState, Outcome};
use crate::config::{Config, Role as ConfigRole};
use crate::control::api::{self, Route};
use crate::control::events::EventHub;
use crate::control::http::{self, Method};
use crate::control::server::{self as ctlserver, ControlServer};
use crate::io::Errno;
use crate::io::{self, BackendChoice, Completion, Instant, Io};
use crate::limits;
use crate::metrics::{self, Histogram};
use crate::net::codec::ForwardRequest;
use crate::net::peers::{PeerEvent, Peers};
use crate::raft::{
    self, ConfChange, Driver, Entry, EntryKind, Index, Membership, Nanos, NodeId, RaftError,
    ReadState, Role, StateMachine, Term,
};
use storage::Storage;

const TOKEN_LISTEN: u64 = 1 << 56;
const TOKEN_SIGNAL: u64 = 6 << 56;
/// The flushes of the sync in flight (the low bits number them).
const TOKEN_SYNC: u64 = 0x10 << 56;
/// The flush of a local Raft snapshot's file or directory (one at a time; independent
/// of the WAL's syncs: see node::storage).
const TOKEN_SNAPSHOT_FLUSH: u64 = 0x11 << 56;
/// The fast hint campaigns this long after the old leader's lease ran out on this node's
/// clock, so the other voters (who heard its last message a little later) agree it ran out.
const HINT_MARGIN_NS: Nanos = 2_000_000;
/// Between the campaigns of successive survivors after a leader's connection dropped:
/// well above a vote round trip (loopback or LAN plus one fsync).
const HINT_STAGGER_NS: Nanos = 8_000_000;
/// Random spread on top of the stagger.
const HINT_JITTER_NS: Nanos = 1_000_000;

/// Where an answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    Local(u64),
    Forward { peer: NodeId, id: u64 },
}

/// What a waiting request will be answered with.
#[derive(Clone, Debug)]
enum Waiting {
    Write {
        term: Term,
        reply: Reply,
        proposed_at: Instant,
    },
    Read {
        key: String,
        reply: Reply,
    },
}

/// The state machine side of the driver: applies entries, collects outcomes and reads
/// for the node to answer after the turn.
struct App {
    state: ClusterState,
    applied: Vec<(Index, Term, Outcome)>,
    reads: Vec<ReadState>,
    /// Reads Raft gave up on (leadership lost, or the leader refused a follower's read).
    reads_failed: Vec<u64>,
}

impl StateMachine for App {
    fn apply(&mut self, entry: &Entry) {
        match entry.kind {
            EntryKind::Normal => {
                let outcome = self.state.apply(entry.index, &entry.data);
                self.applied.push((entry.index, entry.term, outcome));
            }
            // Membership changes are Raft's own; a waiting request learns they committed.
            EntryKind::Config => self.applied.push((entry.index, entry.term, Outcome::Done)),
            EntryKind::Noop => {}
        }
    }
    fn restore(&mut self, state: &[u8]) {
        match ClusterState::decode(state) {
            Ok(s) => self.state = s,
            // The snapshot passed a CRC on the wire or disk: a decode failure is a bug.
            Err(e) => panic!("snapshot state does not decode: {e}"),
        }
    }
    fn read_ready(&mut self, read: ReadState) {
        self.reads.push(read);
    }
    fn read_failed(&mut self, id: u64) {
        self.reads_failed.push(id);
    }
}

struct Node {
    id: NodeId,
    io: Io,
    raft: raft::Raft,
    driver: Driver,
    storage: Storage,
    peers: Peers,
    app: App,
    control: ControlServer,
    control_path: PathBuf,
    signals: io::signals::SignalFd,
    peer_events: Vec<PeerEvent>,
    waiting: HashMap<u64, Waiting>,
    /// Proposal index -> waiting key (writes).
    writes: HashMap<Index, u64>,
    next_wait: u64,
    /// Follower: forwarded request id -> (local control connection, the leader it went
    /// to, whether it is a step-down (answered by the old leader after the change)).
    forwarded: HashMap<u64, (u64, NodeId, bool)>,
    next_forward: u64,
    /// Step-downs waiting for leadership to move: reply and deadline.
    stepdowns: Vec<(Reply, Instant)>,
    events: EventHub,
    subscribers: Vec<u64>,
    last_leader: (NodeId, Term),
    elections_won: u64,
    leader_changes: u64,
    commit_latency: Histogram,
    fsync_latency: Histogram,
    /// Flushes of the sync in flight not completed yet (0: no sync in flight).
    sync_flushes: usize,
    shutdown: bool,
    heartbeat: Duration,
    election_ns: Nanos,
    /// A campaign planned because the connection to the leader dropped.
    hint: Option<Hint>,
    rng: u64,
    /// VMs: leader duties, this host's VMMs, the VM API (`vms.rs`).
    vms: vms::Vms,
    /// The `[[peers]]` of the config file: addresses of members that have no replicated
    /// one, and where a joining node finds the cluster.
    config_peers: Vec<(NodeId, std::net::SocketAddr)>,
    /// What `sync_peers` last applied (membership and addresses, hashed).
    members_fingerprint: u64,
    /// A member added as a voter, promoted when it has caught up.
    promotion: Option<Promotion>,
}

/// A member added as a voter, waiting to be promoted (see `promote_when_caught_up`).
#[derive(Clone, Copy, Debug)]
struct Promotion {
    id: NodeId,
    /// The index of the entry that added it as an observer.
    added_at: Index,
    reply: Reply,
    deadline: Instant,
}

/// The fast failover hint: campaign at `at` unless the leader `leader` was heard from
/// after `contact` (the connection came back) or another leader appeared.
#[derive(Clone, Copy, Debug)]
struct Hint {
    leader: NodeId,
    contact: Nanos,
    at: Nanos,
}

fn now_ns(now: Instant) -> Nanos {
    now.as_nanos()
}

/// `vigil agent --config FILE [--io auto|uring|epoll]`
pub fn main(args: Vec<OsString>) -> ExitCode {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut config_path: Option<PathBuf> = None;
    let mut backend = BackendChoice::Auto;
    let usage = "Usage: vigil agent --config FILE [--io auto|uring|epoll]";
    loop {
        match parser.next() {
            Ok(Some(Long("config"))) => match parser.value() {
                Ok(v) => config_path = Some(v.into()),
                Err(e) => {
                    eprintln!("vigil agent: {e}\n{usage}");
                    return ExitCode::from(2);
                }
            },
            Ok(Some(Long("io"))) => {
                let v = parser
                    .value()
                    .ok()
                    .and_then(|v| v.into_string().ok())
                    .unwrap_or_default();
                backend = match v.as_str() {
                    "auto" => BackendChoice::Auto,
                    "uring" => BackendChoice::Uring,
                    "epoll" => BackendChoice::Epoll,
                    other => {
                        eprintln!("vigil agent: --io must be auto, uring or epoll, not {other:?}");
                        return ExitCode::from(2);
                    }
                };
            }
            Ok(Some(Short('h') | Long("help"))) => {
                println!("{usage}");
                return ExitCode::SUCCESS;
            }
            Ok(Some(other)) => {
                eprintln!("vigil agent: unexpected {}\n{usage}", other.unexpected());
                return ExitCode::from(2);
            }
            Ok(None) => break,
            Err(e) => {
                eprintln!("vigil agent: {e}\n{usage}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = config_path else {
        eprintln!("vigil agent: --config is required\n{usage}");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vigil agent: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config, backend) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the node until SIGTERM or SIGINT.
pub fn run(config: Config, backend: BackendChoice) -> Result<(), String> {
    let mut node = Node::start(&config, backend)?;
    node.run_loop()?;
    node.stop();
    Ok(())
}

impl Node {
    fn start(config: &Config, backend: BackendChoice) -> Result<Node, String> {
        let keys = crate::auth::load_key_ring(&config.key_file, config.next_key_file.as_deref())?;
        let signals = io::signals::SignalFd::new(&[libc::SIGTERM, libc::SIGINT])
            .map_err(|e| format!("signalfd: {e}"))?;
        let io_config = io::Config {
            backend,
            ..io::Config::default()
        };
        let mut io = Io::new(&io_config).map_err(|e| format!("io: {e}"))?;
        log::info!("node {}: io backend {:?}", config.node_id, io.backend());
        let (storage, recovered) = Storage::open(&config.data_dir)
            .map_err(|e| format!("storage {}: {e}", config.data_dir.display()))?;
        let voters: Vec<NodeId> = config
            .peers
            .iter()
            .filter(|p| p.role == ConfigRole::Voter)
            .map(|p| p.id)
            .collect();
        let observers: Vec<NodeId> = config
            .peers
            .iter()
            .filter(|p| p.role == ConfigRole::Observer)
            .map(|p| p.id)
            .collect();
        // A joining node starts outside every membership (Raft's convention for a node
        // that joins later): it never campaigns, and learns the cluster's configuration
        // from the leader's log or snapshot once it has been added.
        let initial = if config.join {
            log::info!(
                "node {}: join mode: waiting to be added to the cluster (POST /members)",
                config.node_id
            );
            Membership::new(&[], &[]).expect("the empty membership is valid")
        } else {
            Membership::new(&voters, &observers)
                .ok_or("the peers do not form a valid membership")?
        };
        let seed = config.node_id ^ Instant::now().as_nanos().rotate_left(17);
        let mut rcfg = raft::Config::new(config.node_id, seed);
        // Each process of this node must have its own incarnation (host-lease
        // confirmations name it); from getrandom, not from the clock.
        let mut random = [0u8; 8];
        crate::auth::key::fill_random(&mut random)
            .map_err(|e| format!("getrandom for the incarnation: {e}"))?;
        rcfg.incarnation = u64::from_le_bytes(random) | 1;
        rcfg.max_inflight_appends = limits::AGENT_INFLIGHT_APPENDS;
        rcfg.heartbeat_interval = config.timing.heartbeat_ms * 1_000_000;
        rcfg.election_timeout = config.timing.election_min_ms * 1_000_000;
        rcfg.election_spread =
            (config.timing.election_max_ms - config.timing.election_min_ms) * 1_000_000;
        let snapshot_state = recovered.snapshot.as_ref().map(|_| ());
        let raft = raft::Raft::new(rcfg, initial, recovered).map_err(|e| format!("raft: {e}"))?;
        let mut state = ClusterState::new();
        if snapshot_state.is_some() {
            state = ClusterState::decode(raft.snapshot_state())
                .map_err(|e| format!("snapshot state: {e}"))?;
        }
        let listener = listen_retrying(config.listen)?;
        let (control_listener, access) =
            ctlserver::listen(&config.control_socket, config.control_group.as_ref())?;
        io.poll_in(TOKEN_SIGNAL, signals.fd())
            .map_err(|e| e.to_string())?;
        let addrs: Vec<(NodeId, std::net::SocketAddr)> =
            config.peers.iter().map(|p| (p.id, p.address)).collect();
        log::info!(
            "node {}: listening on {} (control {}), {} members",
            config.node_id,
            config.listen,
            config.control_socket.display(),
            addrs.len()
        );
        let mut peers = Peers::new(config.node_id, &addrs, seed, keys);
        peers.listen(&mut io, TOKEN_LISTEN >> 56, listener)?;
        let mut driver = Driver::new(limits::RAFT_OUTPUT_MESSAGES * 4, limits::MAX_PENDING_READS);
        driver.recovered(&raft);
        // One WAL write per turn for all the entries the turn appended.
        driver.batch_entry_writes(true);
        Ok(Node {
            id: config.node_id,
            io,
            raft,
            driver,
            storage,
            peers,
            app: App {
                state,
                applied: Vec::new(),
                reads: Vec::new(),
                reads_failed: Vec::new(),
            },
            control: ControlServer::new(access, control_listener),
            control_path: config.control_socket.clone(),
            signals,
            peer_events: Vec::new(),
            waiting: HashMap::new(),
            writes: HashMap::new(),
            next_wait: 1,
            forwarded: HashMap::new(),
            next_forward: 1,
            stepdowns: Vec::new(),
            events: EventHub::new(config.node_id),
            subscribers: Vec::new(),
            last_leader: (0, 0),
            elections_won: 0,
            leader_changes: 0,
            commit_latency: Histogram::new(),
            fsync_latency: Histogram::new(),
            sync_flushes: 0,
            shutdown: false,
            heartbeat: Duration::from_millis(config.timing.heartbeat_ms),
            election_ns: config.timing.election_min_ms * 1_000_000,
            hint: None,
            rng: seed | 1,
            vms: vms::Vms::new(config, Instant::now()),
            config_peers: addrs,
            members_fingerprint: 0,
            promotion: None,
        })
    }

    /// Keeps the transport's peers equal to the Raft membership, each at its replicated
    /// address (`MemberAddress`, else the config file's): members added by any node are
    /// dialled, removed ones forgotten (their connections close, their handshakes fail).
    /// A node outside the membership it knows (joining, or removed) keeps the config
    /// file's peers: that is how it finds the cluster. Cheap when nothing changed.
    fn sync_peers(&mut self) {
        use std::hash::{Hash, Hasher};
        let membership = self.raft.membership();
        let addresses = self.app.state.member_addresses();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        membership.voters.as_slice().hash(&mut h);
        membership.observers.as_slice().hash(&mut h);
        for (id, a) in addresses {
            (id, a).hash(&mut h);
        }
        let fingerprint = h.finish() | 1;
        if fingerprint == self.members_fingerprint {
            return;
        }
        self.members_fingerprint = fingerprint;
        let mut wanted: Vec<(NodeId, std::net::SocketAddr)> = Vec::new();
        if membership.is_member(self.id) {
            for &m in membership
                .voters
                .as_slice()
                .iter()
                .chain(membership.observers.as_slice())
            {
                match self.member_address(m) {
                    Some(a) => wanted.push((m, a)),
                    None if m != self.id => log::info!(
                        "node {}: member {m} has no known address (not in the config file, \
                         no replicated address yet)",
                        self.id
                    ),
                    None => {}
                }
            }
        } else {
            wanted.extend(
                self.config_peers
                    .iter()
                    .map(|&(p, a)| (p, addresses.get(&p).copied().unwrap_or(a))),
            );
        }
        self.peers
            .set_members(&mut self.io, &wanted, &mut self.peer_events);
    }

    fn collect(&mut self) -> Result<(), String> {
        self.driver
            .collect(
                &mut self.raft,
                &mut self.storage,
                &mut self.peers,
                &mut self.app,
            )
            .map_err(|e| format!("storage: {e}"))
    }

    fn run_loop(&mut self) -> Result<(), String> {
        let mut completions = [Completion::EMPTY; limits::IO_COMPLETIONS_PER_WAIT];
        let mut pending_output = false;
        let mut next_dial: Option<Instant> = None;
        let mut next_housekeeping = Instant::now();
        while !self.shutdown {
            let now = Instant::now();
            let mut deadline =
                Instant::from_nanos(self.raft.next_deadline()).min(next_housekeeping);
            if let Some(d) = next_dial {
                deadline = deadline.min(d);
            }
            if let Some(h) = self.hint {
                deadline = deadline.min(Instant::from_nanos(h.at));
            }
            if pending_output {
                deadline = deadline.min(now.saturating_add(Duration::from_millis(1)));
            }
            let n = self
                .io
                .wait(Some(deadline.max(now)), &mut completions)
                .map_err(|e| format!("io wait: {e}"))?;
            let now = Instant::now();
            let turn_started = now;
            for c in completions[..n].iter().copied() {
                self.on_completion(c, now)?;
            }
            self.handle_peer_events(now)?;
            if let Some(h) = self.hint {
                if now_ns(now) >= h.at {
                    self.hint = None;
                    let silent = self.raft.last_leader_contact() == Some(h.contact);
                    let same = self.raft.leader() == h.leader || self.raft.leader() == 0;
                    if silent && same && self.raft.role() == Role::Follower {
                        self.raft.campaign_now(now_ns(now));
                        self.collect()?;
                    }
                }
            }
            if now_ns(now) >= self.raft.next_deadline() {
                self.raft.tick(now_ns(now));
                self.collect()?;
            }
            if now >= next_housekeeping {
                self.housekeeping(now)?;
                next_housekeeping =
                    now.saturating_add(Duration::from_millis(50).min(self.heartbeat));
            }
            self.finish_turn(now)?;
            self.sync_peers();
            next_dial = self
                .peers
                .maintain(&mut self.io, now, &mut self.peer_events);
            if !self.peer_events.is_empty() {
                self.handle_peer_events(now)?;
                self.finish_turn(now)?;
            }
            // Sends start here and their completions keep them going; `p` is set only
            // when no operation slot was free for a peer send (then retry in 1 ms).
            let p = self.peers.flush(&mut self.io);
            self.control.flush(&mut self.io, now);
            pending_output = p;
            let took = Instant::now().saturating_duration_since(turn_started);
            if took >= Duration::from_millis(limits::SLOW_TURN_MS) {
                // Heartbeats wait while a turn runs: a long one risks an election.
                log::warn!(
                    "node {}: a loop turn took {:.1} ms ({n} completions)",
                    self.id,
                    took.as_secs_f64() * 1e3
                );
            }
        }
        Ok(())
    }

    fn on_completion(&mut self, c: Completion, now: Instant) -> Result<(), String> {
        let kind = c.token >> 56;
        let id = c.token & ((1 << 56) - 1);
        if kind == TOKEN_SYNC >> 56 {
            // Before the ECANCELED filter: a flush is never cancelled, and any error of
            // one is fatal.
            return self.on_flush(c.result);
        }
        if kind == TOKEN_SNAPSHOT_FLUSH >> 56 {
            if let Err(e) = c.result {
                self.storage.sync_failed(&e.io_error());
            }
            // Its next flush, if any, is submitted at the end of this turn.
            return self
                .storage
                .snapshot_flushed()
                .map_err(|e| format!("storage: {e}"));
        }
        if self.peers.owns(c.token) {
            // Before the ECANCELED filter too: a cancelled peer operation hands back its
            // buffer, and a closing connection's fd closes only once all of them are in.
            return self
                .peers
                .on_completion(&mut self.io, c, now, &mut self.peer_events);
        }
        if ctlserver::owns(c.token) {
            // Before the ECANCELED filter: a cancelled recv or send brings its buffer
            // back, and a closing connection waits for it.
            if let Some((conn, req)) = self.control.on_completion(&mut self.io, c, now) {
                self.serve_local(conn, &req, now)?;
            }
            return Ok(());
        }
        if kind == vms::TOKEN_VMM_RECV || kind == vms::TOKEN_VMM_SEND {
            // Before the ECANCELED filter: a cancelled recv or send of a dropped VMM
            // connection brings its buffer back, and its fd closes only once all are in.
            self.vms_conn_completion(c, now);
            return Ok(());
        }
        if matches!(c.result, Err(e) if e.0 == libc::ECANCELED) {
            return Ok(());
        }
        match (kind, c.kind) {
            (_, _) if c.token == TOKEN_SIGNAL => {
                while let Ok(Some(info)) = self.signals.read() {
                    log::info!("node {}: signal {}; shutting down", self.id, info.signal);
                    self.shutdown = true;
                }
                if !self.shutdown {
                    self.io
                        .poll_in(TOKEN_SIGNAL, self.signals.fd())
                        .map_err(|e| e.to_string())?;
                }
            }
            (_, _) if kind == vms::TOKEN_VMM_EXIT => self.vms_exit_completion(id, c, now),
            _ => log::debug!("completion for unknown token {:#x}", c.token),
        }
        Ok(())
    }

    fn handle_peer_events(&mut self, now: Instant) -> Result<(), String> {
        let events = std::mem::take(&mut self.peer_events);
        for ev in events {
            match ev {
                PeerEvent::Raft(m, payload) => {
                    self.raft.step(now_ns(now), &m, payload.as_payload());
                    self.collect()?;
                }
                PeerEvent::Lost { peer, by_peer } => {
                    self.fail_forwarded(|to, _| to == peer, now)?;
                    if peer == self.raft.leader() && self.raft.role() == Role::Follower {
                        // Voters honour the old leader's lease for an election timeout
                        // after its last message (that keeps leader leases safe), so a
                        // PreVote before then is refused. Campaign right when the lease
                        // runs out, staggered by rank so that the survivors do not split
                        // the vote, instead of waiting for a full random timeout. Every
                        // survivor ranks the voters other than the lost leader by id the
                        // same way; rank r waits r x HINT_STAGGER_NS more (plus a little
                        // jitter), so the first one usually wins before the next starts.
                        if let Some(contact) = self.raft.last_leader_contact() {
                            self.rng ^= self.rng << 13;
                            self.rng ^= self.rng >> 7;
                            self.rng ^= self.rng << 17;
                            let rank = self
                                .raft
                                .membership()
                                .voters
                                .as_slice()
                                .iter()
                                .filter(|&&v| v != peer && v < self.id)
                                .count() as u64;
                            let jitter = rank * HINT_STAGGER_NS + self.rng % HINT_JITTER_NS;
                            // Only the peer's own close or reset (its process died) lets
                            // this node stop honouring the leader's lease at once; a
                            // connection this node dropped says nothing about the leader.
                            let at =
                                if by_peer && self.raft.leader_connection_lost(now_ns(now), peer) {
                                    now_ns(now) + jitter
                                } else {
                                    contact + self.election_ns + HINT_MARGIN_NS + jitter
                                };
                            log::info!(
                                "node {}: connection to leader {peer} lost; PreVote in {:.1} ms",
                                self.id,
                                at.saturating_sub(now_ns(now)) as f64 / 1e6
                            );
                            self.hint = Some(Hint {
                                leader: peer,
                                contact,
                                at,
                            });
                        }
                    }
                }
                PeerEvent::ForwardRequest {
                    from,
                    id,
                    method,
                    path,
                    body,
                } => {
                    let reply = Reply::Forward { peer: from, id };
                    if self.waiting.len() >= limits::MAX_FORWARDED_FROM_PEERS {
                        self.answer(
                            reply,
                            503,
                            &api::error_json("too many forwarded requests", "busy"),
                        );
                        continue;
                    }
                    match api::method_from_code(method) {
                        Some(m) => self.handle_request(reply, m, &path, "", &body, now)?,
                        None => self.answer(
                            reply,
                            400,
                            &api::error_json("bad forwarded method", "malformed_request"),
                        ),
                    }
                }
                PeerEvent::ForwardResponse { id, status, body } => {
                    if self.vms_forward_response(id, status, &body) {
                        continue;
                    }
                    if let Some((conn, _, _)) = self.forwarded.remove(&id) {
                        self.control
                            .respond(conn, status, "application/json", &body, false);
                        self.after_response(conn, now)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// After answering a local connection, serve the next request it already sent.
    fn after_response(&mut self, conn: u64, now: Instant) -> Result<(), String> {
        if let Some(req) = self.control.next_request(conn) {
            self.serve_local(conn, &req, now)?;
        }
        Ok(())
    }

    /// Serves a request read from a local control connection.
    fn serve_local(&mut self, conn: u64, req: &http::Request, now: Instant) -> Result<(), String> {
        self.handle_request(
            Reply::Local(conn),
            req.method,
            &req.path,
            &req.query,
            &req.body,
            now,
        )
    }

    fn answer(&mut self, reply: Reply, status: u16, body: &str) {
        match reply {
            Reply::Local(conn) => {
                self.control
                    .respond(conn, status, "application/json", body.as_bytes(), false)
            }
            Reply::Forward { peer, id } => {
                self.peers
                    .send_forward_response(peer, id, status, body.as_bytes());
            }
        }
    }

    fn answer_then_next(
        &mut self,
        reply: Reply,
        status: u16,
        body: &str,
        now: Instant,
    ) -> Result<(), String> {
        self.answer(reply, status, body);
        if let Reply::Local(conn) = reply {
            self.after_response(conn, now)?;
        }
        Ok(())
    }

    fn handle_request(
        &mut self,
        reply: Reply,
        method: Method,
        path: &str,
        query: &str,
        body: &[u8],
        now: Instant,
    ) -> Result<(), String> {
        if let Some(vm_route) = api::vm_route(method, path) {
            return match vm_route {
                Ok(r) => self.handle_vm_request(reply, method, path, query, r, body, now),
                Err(e) => self.answer_then_next(reply, e.status(), &http::error_body(&e), now),
            };
        }
        let route = match api::route(method, path) {
            Ok(r) => r,
            Err(e) => return self.answer_then_next(reply, e.status(), &http::error_body(&e), now),
        };
        if route.needs_leader(method) && !self.raft.is_leader() {
            return self.forward(reply, method, path, body, now);
        }
        match route {
            Route::Status => {
                let s = self.status_json(now).to_string();
                self.answer_then_next(reply, 200, &s, now)
            }
            Route::Metrics => {
                let text = self.metrics_text(now);
                match reply {
                    Reply::Local(conn) => {
                        self.control.respond(
                            conn,
                            200,
                            "text/plain; version=0.0.4",
                            text.as_bytes(),
                            false,
                        );
                        self.after_response(conn, now)
                    }
                    Reply::Forward { .. } => self.answer_then_next(reply, 200, &text, now),
                }
            }
            Route::Events => match reply {
                Reply::Local(conn) => {
                    if self.events.subscribe(conn).is_err() {
                        return self.answer_then_next(
                            reply,
                            503,
                            &api::error_json("too many subscribers", "busy"),
                            now,
                        );
                    }
                    self.subscribers.push(conn);
                    self.control.start_stream(conn);
                    let (leader, term) = (self.raft.leader(), self.raft.term());
                    self.publish(
                        "leader",
                        serde_json::json!({"leader": leader, "term": term, "node_id": self.id}),
                    );
                    Ok(())
                }
                Reply::Forward { .. } => self.answer_then_next(
                    reply,
                    400,
                    &api::error_json("events are not forwarded", "bad_request"),
                    now,
                ),
            },
            Route::Stepdown => {
                let to = match api::parse_stepdown(body) {
                    Ok(t) => t,
                    Err(e) => {
                        return self.answer_then_next(reply, e.status(), &http::error_body(&e), now)
                    }
                };
                let target = to.unwrap_or_else(|| self.best_transfer_target());
                if target == 0 {
                    return self.answer_then_next(
                        reply,
                        409,
                        &api::error_json("no other voter to take over", "no_target"),
                        now,
                    );
                }
                match self.raft.transfer_leadership(now_ns(now), target) {
                    Ok(_) => {
                        self.collect()?;
                        self.stepdowns.push((
                            reply,
                            now.saturating_add(Duration::from_millis(
                                limits::CONTROL_REQUEST_TIMEOUT_MS,
                            )),
                        ));
                        Ok(())
                    }
                    Err(e) => {
                        let (status, body) = raft_error(e);
                        self.answer_then_next(reply, status, &body, now)
                    }
                }
            }
            Route::Members if method == Method::Get => {
                let s = self.status_json(now);
                let body =
                    serde_json::json!({"members": s["members"], "served_by": self.id}).to_string();
                self.answer_then_next(reply, 200, &body, now)
            }
            Route::Members => match api::parse_member_add(body) {
                Ok((id, address, role)) => self.add_member(reply, id, address, role, now),
                Err(e) => self.answer_then_next(reply, e.status(), &http::error_body(&e), now),
            },
            Route::Member(id, action) => {
                let change = match action {
                    api::MemberAction::Promote => ConfChange::Promote(id),
                    api::MemberAction::Demote => ConfChange::Demote(id),
                    api::MemberAction::Remove => ConfChange::Remove(id),
                };
                if self.change_membership(reply, change, now)?
                    && action == api::MemberAction::Remove
                {
                    // After the removal in the log: every node forgets the address once
                    // the member is gone (the transport already dropped it then).
                    self.propose_member_address(id, None, now)?;
                }
                Ok(())
            }
            Route::Kv(key) => match method {
                Method::Get => {
                    let wid = self.next_wait;
                    self.next_wait += 1;
                    match self.raft.read_index(now_ns(now), wid) {
                        Ok(()) => {
                            self.waiting.insert(wid, Waiting::Read { key, reply });
                            self.collect()
                        }
                        Err(e) => {
                            let (status, body) = raft_error(e);
                            self.answer_then_next(reply, status, &body, now)
                        }
                    }
                }
                _ => {
                    let w = match api::parse_kv_write(method, body) {
                        Ok(w) => w,
                        Err(e) => {
                            return self.answer_then_next(
                                reply,
                                e.status(),
                                &http::error_body(&e),
                                now,
                            )
                        }
                    };
                    let command = if method == Method::Put {
                        KvCommand::Put {
                            key,
                            value: w.value.unwrap_or_default().into_bytes(),
                            if_revision: w.if_revision,
                        }
                    } else {
                        KvCommand::Delete {
                            key,
                            if_revision: w.if_revision,
                        }
                    };
                    let bytes = Command::Kv(command).to_bytes(RequestId(w.request_id));
                    match self.raft.propose(now_ns(now), &bytes) {
                        Ok((index, term)) => {
                            self.wait_for_commit(index, term, reply, now);
                            self.collect()
                        }
                        Err(e) => {
                            let (status, body) = raft_error(e);
                            self.answer_then_next(reply, status, &body, now)
                        }
                    }
                }
            },
        }
    }

    /// Remembers `reply` until the entry proposed at `index` in `term` applies. An older
    /// proposal waiting on the same index was overwritten by a new leader: it is told to
    /// retry.
    fn wait_for_commit(&mut self, index: Index, term: Term, reply: Reply, now: Instant) {
        let wid = self.next_wait;
        self.next_wait += 1;
        self.waiting.insert(
            wid,
            Waiting::Write {
                term,
                reply,
                proposed_at: now,
            },
        );
        if let Some(old) = self.writes.insert(index, wid) {
            if let Some(Waiting::Write { reply, .. }) = self.waiting.remove(&old) {
                self.answer(
                    reply,
                    503,
                    &api::error_json("the entry was replaced by a new leader; retry", "retry"),
                );
            }
        }
    }

    /// Proposes `change`; `reply` is answered when it commits (or at once when Raft
    /// refuses it). Returns whether it was proposed.
    fn change_membership(
        &mut self,
        reply: Reply,
        change: ConfChange,
        now: Instant,
    ) -> Result<bool, String> {
        match self.raft.change_membership(now_ns(now), change) {
            Ok((index, term)) => {
                self.wait_for_commit(index, term, reply, now);
                self.publish("membership", serde_json::json!({"change": format!("{change:?}"), "index": index, "node_id": self.id}));
                self.collect()?;
                Ok(true)
            }
            Err(e) => {
                let (status, body) = raft_error(e);
                self.answer_then_next(reply, status, &body, now)?;
                Ok(false)
            }
        }
    }

    /// `POST /members` on the leader. The address is replicated first (a
    /// `MemberAddress` entry), then the member is added as an observer in the next
    /// entry: log order means every node applies the address no later than it can
    /// commit the change, and a snapshot that holds the change holds the address. A
    /// voter is promoted by `promote_when_caught_up` once it has the log up to its own
    /// addition; the request is answered when the promotion commits.
    fn add_member(
        &mut self,
        reply: Reply,
        id: NodeId,
        address: std::net::SocketAddr,
        role: api::MemberRole,
        now: Instant,
    ) -> Result<(), String> {
        if self.raft.membership().is_member(id) {
            // A retry (say after a leader change) finds its own earlier work: the same
            // address is success, and an observer that was to become a voter is
            // promoted now. Anything else is a conflict.
            if self.member_address(id) != Some(address) {
                let body = api::error_json(
                    &format!("node {id} is already a member with another address"),
                    "exists",
                );
                return self.answer_then_next(reply, 409, &body, now);
            }
            if role == api::MemberRole::Voter && !self.raft.membership().is_voter(id) {
                if self.promotion.is_some() {
                    let body = api::error_json("a membership change is pending", "change_pending");
                    return self.answer_then_next(reply, 409, &body, now);
                }
                self.promotion = Some(Promotion {
                    id,
                    added_at: self.raft.commit_index(),
                    reply,
                    deadline: now
                        .saturating_add(Duration::from_millis(limits::CONTROL_REQUEST_TIMEOUT_MS)),
                });
                return Ok(());
            }
            let body = serde_json::json!({"committed": true, "already_member": true, "served_by": self.id}).to_string();
            return self.answer_then_next(reply, 200, &body, now);
        }
        let m = self.raft.membership();
        let taken = m
            .voters
            .as_slice()
            .iter()
            .chain(m.observers.as_slice())
            .find(|&&other| self.member_address(other) == Some(address))
            .copied();
        if let Some(other) = taken {
            let body = api::error_json(
                &format!("address {address} belongs to member {other}"),
                "address_in_use",
            );
            return self.answer_then_next(reply, 409, &body, now);
        }
        if self.promotion.is_some() {
            let body = api::error_json("a membership change is pending", "change_pending");
            return self.answer_then_next(reply, 409, &body, now);
        }
        if !self.propose_member_address(id, Some(address), now)? {
            let body = api::error_json("could not propose the member's address; retry", "busy");
            return self.answer_then_next(reply, 503, &body, now);
        }
        let added = match role {
            api::MemberRole::Observer => {
                self.change_membership(reply, ConfChange::AddObserver(id), now)?
            }
            api::MemberRole::Voter => {
                match self
                    .raft
                    .change_membership(now_ns(now), ConfChange::AddObserver(id))
                {
                    Ok((index, _)) => {
                        self.publish("membership", serde_json::json!({"change": format!("{:?}", ConfChange::AddObserver(id)), "index": index, "node_id": self.id}));
                        self.promotion = Some(Promotion {
                            id,
                            added_at: index,
                            reply,
                            deadline: now.saturating_add(Duration::from_millis(
                                limits::CONTROL_REQUEST_TIMEOUT_MS,
                            )),
                        });
                        self.collect()?;
                        true
                    }
                    Err(e) => {
                        let (status, body) = raft_error(e);
                        self.answer_then_next(reply, status, &body, now)?;
                        false
                    }
                }
            }
        };
        if !added {
            // Raft refused the change (one pending, or a new leader not ready): take
            // the address back, so refused requests leave no records behind.
            self.propose_member_address(id, None, now)?;
        }
        Ok(())
    }

    /// Proposes where member `id` listens (`None`: forget it). Returns whether Raft
    /// took the entry.
    fn propose_member_address(
        &mut self,
        id: NodeId,
        address: Option<std::net::SocketAddr>,
        now: Instant,
    ) -> Result<bool, String> {
        let bytes = Command::MemberAddress { id, address }.to_bytes(RequestId(0));
        match self.raft.propose(now_ns(now), &bytes) {
            Ok(_) => {
                self.collect()?;
                Ok(true)
            }
            Err(e) => {
                log::warn!(
                    "node {}: proposing the address of member {id}: {e:?}",
                    self.id
                );
                Ok(false)
            }
        }
    }

    /// A member added as a voter: promoted once its log reaches its own addition (and
    /// that committed), so that it can vote usefully at once. Answered with the
    /// promotion's commit, or an error when leadership moved or time ran out.
    fn promote_when_caught_up(&mut self, now: Instant) -> Result<(), String> {
        let Some(p) = self.promotion else {
            return Ok(());
        };
        if !self.raft.is_leader() {
            self.promotion = None;
            let body = api::error_json(
                &format!(
                    "leadership moved before node {} was promoted; it may be an observer: \
                     check GET /members and promote it with POST /members/{}/promote",
                    p.id, p.id
                ),
                "retry",
            );
            return self.answer_then_next(p.reply, 503, &body, now);
        }
        let caught_up = self.raft.commit_index() >= p.added_at
            && self
                .raft
                .peer_progress(p.id)
                .is_some_and(|(matched, _)| matched >= p.added_at);
        if caught_up {
            self.promotion = None;
            self.change_membership(p.reply, ConfChange::Promote(p.id), now)?;
        } else if now >= p.deadline {
            self.promotion = None;
            let body = api::error_json(
                &format!(
                    "node {} was added as an observer but has not caught up; promote it \
                     later with POST /members/{}/promote",
                    p.id, p.id
                ),
                "timeout",
            );
            self.answer_then_next(p.reply, 504, &body, now)?;
        }
        Ok(())
    }

    /// Where member `id` listens: its replicated address, else the config file's.
    fn member_address(&self, id: NodeId) -> Option<std::net::SocketAddr> {
        self.app
            .state
            .member_addresses()
            .get(&id)
            .copied()
            .or_else(|| {
                self.config_peers
                    .iter()
                    .find(|(p, _)| *p == id)
                    .map(|&(_, a)| a)
            })
    }

    fn forward(
        &mut self,
        reply: Reply,
        method: Method,
        path: &str,
        body: &[u8],
        now: Instant,
    ) -> Result<(), String> {
        let leader = self.raft.leader();
        let Reply::Local(conn) = reply else {
            // A forwarded request reached a node that is no longer leader: never forward twice.
            return self.answer_then_next(
                reply,
                503,
                &api::error_json("this node is not the leader; retry", "no_leader"),
                now,
            );
        };
        if leader == 0
            || leader == self.id
            || !self.peers.is_connected(leader)
            || self.forwarded.len() >= limits::MAX_FORWARDED_REQUESTS
        {
            return self.answer_then_next(
                reply,
                503,
                &api::error_json("no leader reachable; retry", "no_leader"),
                now,
            );
        }
        let id = self.next_forward;
        self.next_forward += 1;
        let req = ForwardRequest {
            id,
            method: api::method_code(method),
            path,
            body,
        };
        if !self.peers.send_forward_request(leader, &req) {
            return self.answer_then_next(
                reply,
                503,
                &api::error_json("no leader reachable; retry", "no_leader"),
                now,
            );
        }
        let stepdown = path == "/leadership/stepdown";
        self.forwarded.insert(id, (conn, leader, stepdown));
        Ok(())
    }

    /// Answers forwarded requests whose leader matches `gone` with a retryable error.
    fn fail_forwarded(
        &mut self,
        gone: impl Fn(NodeId, bool) -> bool,
        now: Instant,
    ) -> Result<(), String> {
        let ids: Vec<u64> = self
            .forwarded
            .iter()
            .filter(|(_, (_, to, stepdown))| gone(*to, *stepdown))
            .map(|(&k, _)| k)
            .collect();
        for id in ids {
            if let Some((conn, to, _)) = self.forwarded.remove(&id) {
                let body = api::error_json(
                    &format!("lost the leader {to} before it answered; a write may or may not have applied; retry with the same request_id"),
                    "no_leader",
                );
                self.answer_then_next(Reply::Local(conn), 503, &body, now)?;
            }
        }
        Ok(())
    }

    /// Leader: whether compacting the log up to `upto` would drop entries that a
    /// follower still replicating from the log has not been sent yet.
    fn compaction_cuts_off_a_follower(&self, upto: Index) -> bool {
        if !self.raft.is_leader() {
            return false;
        }
        let first = self.raft.first_index();
        let m = self.raft.membership();
        m.voters
            .as_slice()
            .iter()
            .chain(m.observers.as_slice())
            .filter(|&&p| p != self.id)
            .filter_map(|&p| self.raft.peer_progress(p))
            .any(|(_, next)| first <= next && next <= upto)
    }

    fn best_transfer_target(&self) -> NodeId {
        let mut best = (0, 0);
        for &v in self.raft.membership().voters.as_slice() {
            if v == self.id {
                continue;
            }
            let m = self.raft.peer_progress(v).map_or(0, |p| p.0);
            if best.0 == 0 || m > best.1 {
                best = (v, m);
            }
        }
        best.0
    }

    /// One flush of the sync in flight completed; after the last one, the sync is
    /// complete: the driver tells Raft what is durable and releases the votes and acks
    /// that waited for it.
    fn on_flush(&mut self, result: Result<u32, Errno>) -> Result<(), String> {
        if let Err(e) = result {
            self.storage.sync_failed(&e.io_error());
        }
        assert!(
            self.sync_flushes > 0,
            "a flush completed with no sync in flight"
        );
        self.sync_flushes -= 1;
        if self.sync_flushes > 0 {
            return Ok(());
        }
        self.driver
            .complete_sync(
                &mut self.raft,
                &mut self.storage,
                &mut self.peers,
                &mut self.app,
            )
            .map_err(|e| format!("storage: {e}"))?;
        assert!(
            self.driver.durable_index() <= Some(self.storage.synced_index()),
            "the driver counts more as durable than the WAL holds"
        );
        if let Some(ns) = self.storage.last_sync_ns.take() {
            self.fsync_latency.record_us(ns / 1000);
        }
        Ok(())
    }

    fn finish_turn(&mut self, now: Instant) -> Result<(), String> {
        loop {
            let flushes = self
                .driver
                .end_turn(
                    &mut self.raft,
                    &mut self.storage,
                    &mut self.peers,
                    &mut self.app,
                )
                .map_err(|e| format!("storage: {e}"))?;
            if flushes == 0 {
                if let Some(ns) = self.storage.last_sync_ns.take() {
                    self.fsync_latency.record_us(ns / 1000);
                }
                break;
            }
            assert_eq!(self.sync_flushes, 0, "one sync in flight at most");
            self.sync_flushes = flushes;
            if self.storage.sync_writes_hard_state() {
                // A new term or vote: an election waits for this flush. On the ring a
                // flush costs two wakeups (the kernel's io-wq worker, then this loop);
                // under CPU contention that added milliseconds per election round and
                // made split votes measurably more frequent. Term and vote changes are
                // rare, so they flush here, blocking, as the whole sync did before;
                // then end the turn again to apply what the sync let commit.
                self.storage.flush_blocking();
                for _ in 0..flushes {
                    self.on_flush(Ok(0))?;
                }
                continue;
            }
            let mut submitted = 0;
            for (fd, full) in self.storage.sync_targets() {
                let token = TOKEN_SYNC | submitted as u64;
                if full {
                    self.io.fsync(token, fd)
                } else {
                    self.io.fdatasync(token, fd)
                }
                .map_err(|e| format!("submitting the WAL sync: {e}"))?;
                submitted += 1;
            }
            assert_eq!(submitted, flushes);
            break;
        }
        let applied = std::mem::take(&mut self.app.applied);
        let reads = std::mem::take(&mut self.app.reads);
        self.app.reads = self.vms_after_apply(&applied, reads, now)?;
        let failed = std::mem::take(&mut self.app.reads_failed);
        self.app.reads_failed = self.vms_reads_failed(failed, now)?;
        for (index, term, outcome) in applied {
            let Some(wid) = self.writes.remove(&index) else {
                continue;
            };
            let Some(Waiting::Write {
                term: wterm,
                reply,
                proposed_at,
            }) = self.waiting.remove(&wid)
            else {
                continue;
            };
            if wterm != term {
                self.answer_then_next(
                    reply,
                    503,
                    &api::error_json("the entry was replaced by a new leader; retry", "retry"),
                    now,
                )?;
                continue;
            }
            self.commit_latency
                .record_us(now.saturating_duration_since(proposed_at).as_micros() as u64);
            let (status, body) = self.outcome_json(&outcome);
            self.answer_then_next(reply, status, &body, now)?;
        }
        let reads = std::mem::take(&mut self.app.reads);
        for r in reads {
            let Some(Waiting::Read { key, reply }) = self.waiting.remove(&r.id) else {
                continue;
            };
            let body = match self.app.state.kv().get(&key) {
                Some(e) => (
                    200,
                    serde_json::json!({
                        "key": key,
                        "value": String::from_utf8_lossy(&e.value),
                        "revision": e.mod_revision,
                        "create_revision": e.create_revision,
                        "served_by": self.id,
                    })
                    .to_string(),
                ),
                None => (
                    404,
                    api::error_json(&format!("key {key:?} not found"), "not_found"),
                ),
            };
            self.answer_then_next(reply, body.0, &body.1, now)?;
        }
        let failed = std::mem::take(&mut self.app.reads_failed);
        for id in failed {
            let Some(Waiting::Read { reply, .. }) = self.waiting.remove(&id) else {
                continue;
            };
            let body = api::error_json(
                "the read could not be confirmed by a leader (leadership changed); retry",
                "retry",
            );
            self.answer_then_next(reply, 503, &body, now)?;
        }
        self.after_leader_change(now)?;
        // Compact the in-memory log (a snapshot of the state machine replaces it). One
        // local snapshot at a time: the last one's file must be durable first. A leader
        // holds off while that would drop entries a follower has not been sent yet (its
        // send window is full for a moment), up to a bound: otherwise that follower
        // needs the whole snapshot, which it installs inline.
        let applied = self.raft.applied_index();
        let since = applied.saturating_sub(self.raft.first_index());
        if since >= limits::RAFT_COMPACT_AFTER_ENTRIES
            && (since >= limits::RAFT_COMPACT_DEFER_MAX_ENTRIES
                || !self.compaction_cuts_off_a_follower(applied))
            && applied <= self.raft.persisted_index()
            && !self.storage.snapshot_in_progress()
        {
            let started = Instant::now();
            let bytes = self.app.state.to_bytes();
            let serialized = Instant::now().saturating_duration_since(started);
            self.raft.compact(applied, &bytes);
            self.collect()?;
            // Serialized and written to the page cache here; its flushes run on the ring
            // (below; node::storage).
            let took = Instant::now().saturating_duration_since(started);
            log::debug!(
                "node {}: snapshot at {applied}: serialize {:.2} ms, in the loop {:.2} ms",
                self.id,
                serialized.as_secs_f64() * 1e3,
                took.as_secs_f64() * 1e3
            );
            if took >= Duration::from_millis(limits::SLOW_TURN_MS) {
                log::warn!(
                    "node {}: snapshot at {applied} ({} bytes) took {:.1} ms in the loop \
                     (serialize and write)",
                    self.id,
                    bytes.len(),
                    took.as_secs_f64() * 1e3
                );
            }
        }
        // A local snapshot's next flush runs on the ring beside the WAL's syncs.
        if let Some((fd, full)) = self.storage.snapshot_flush() {
            if full {
                self.io.fsync(TOKEN_SNAPSHOT_FLUSH, fd)
            } else {
                self.io.fdatasync(TOKEN_SNAPSHOT_FLUSH, fd)
            }
            .map_err(|e| format!("submitting a snapshot flush: {e}"))?;
        }
        Ok(())
    }

    fn after_leader_change(&mut self, now: Instant) -> Result<(), String> {
        let current = (self.raft.leader(), self.raft.term());
        if current == self.last_leader {
            return Ok(());
        }
        if current.0 != self.last_leader.0 {
            self.leader_changes += 1;
            if current.0 == self.id {
                self.elections_won += 1;
            }
            log::info!(
                "node {}: leader is {} in term {}",
                self.id,
                current.0,
                current.1
            );
            self.publish(
                "leader",
                serde_json::json!({"leader": current.0, "term": current.1, "node_id": self.id}),
            );
        }
        self.last_leader = current;
        // Requests forwarded to an earlier leader will not be answered by it.
        let leader = current.0;
        self.fail_forwarded(|to, stepdown| to != leader && !stepdown, now)?;
        if !self.raft.is_leader() {
            // Writes this node proposed as leader may never commit in their term: answer
            // them as retryable (they may still commit; request ids make a retry safe).
            let stale: Vec<u64> = self
                .waiting
                .iter()
                .filter(|(_, w)| matches!(w, Waiting::Write { .. }))
                .map(|(&k, _)| k)
                .collect();
            for wid in stale {
                if let Some(Waiting::Write { reply, .. }) = self.waiting.remove(&wid) {
                    self.answer_then_next(reply, 503, &api::error_json("leadership lost before commit; the write may or may not apply; retry with the same request_id", "retry"), now)?;
                }
            }
            self.writes.clear();
        }
        let stepdowns = std::mem::take(&mut self.stepdowns);
        for (reply, deadline) in stepdowns {
            if current.0 != self.id && current.0 != 0 {
                let body = serde_json::json!({"leader": current.0, "term": current.1, "served_by": self.id}).to_string();
                self.answer_then_next(reply, 200, &body, now)?;
            } else {
                self.stepdowns.push((reply, deadline));
            }
        }
        Ok(())
    }

    fn publish(&mut self, kind: &str, fields: serde_json::Value) {
        let dropped = self.events.publish(kind, fields);
        self.subscribers.retain(|s| !dropped.contains(s));
        for &s in &self.subscribers {
            if let Some(out) = self.control.stream_bytes(s) {
                self.events.drain(s, out);
            }
        }
    }

    fn housekeeping(&mut self, now: Instant) -> Result<(), String> {
        for conn in self.control.expired(now) {
            let fwd: Vec<u64> = self
                .forwarded
                .iter()
                .filter(|(_, (c, _, _))| *c == conn)
                .map(|(&k, _)| k)
                .collect();
            for f in fwd {
                self.forwarded.remove(&f);
            }
            self.waiting.retain(|_, w| match w {
                Waiting::Write { reply, .. } | Waiting::Read { reply, .. } => {
                    *reply != Reply::Local(conn)
                }
            });
            self.stepdowns.retain(|(r, _)| *r != Reply::Local(conn));
            self.control.respond(
                conn,
                504,
                "application/json",
                api::error_json("timed out waiting for the cluster", "timeout").as_bytes(),
                true,
            );
        }
        let stepdowns = std::mem::take(&mut self.stepdowns);
        for (reply, deadline) in stepdowns {
            if now >= deadline {
                self.answer(
                    reply,
                    504,
                    &api::error_json("leadership did not move in time", "timeout"),
                );
            } else {
                self.stepdowns.push((reply, deadline));
            }
        }
        self.vms_tick(now)?;
        self.promote_when_caught_up(now)?;
        // Forwarded requests from peers that never got an answer are forgotten with
        // their waiting entries when the leader steps down (answered above).
        self.subscribers.retain(|&s| self.control.is_open(s));
        let subs = self.subscribers.clone();
        for s in subs {
            if let Some(out) = self.control.stream_bytes(s) {
                self.events.drain(s, out);
            }
        }
        Ok(())
    }

    fn outcome_json(&self, outcome: &Outcome) -> (u16, String) {
        match outcome {
            Outcome::Kv(kv::Outcome::Stored { revision }) | Outcome::Kv(kv::Outcome::Deleted { revision }) => {
                (200, serde_json::json!({"revision": revision, "served_by": self.id}).to_string())
            }
            Outcome::Kv(kv::Outcome::NotFound) => (404, api::error_json("key not found", "not_found")),
            Outcome::Kv(kv::Outcome::Conflict { current }) => (
                409,
                serde_json::json!({"error": "revision mismatch", "code": "conflict", "current_revision": current, "served_by": self.id}).to_string(),
            ),
            Outcome::Kv(kv::Outcome::Rejected { reason }) => (400, api::error_json(reason, "rejected")),
            Outcome::Rejected(r) => (400, api::error_json(&r.to_string(), "rejected")),
            Outcome::Done => (200, serde_json::json!({"committed": true, "served_by": self.id}).to_string()),
            other => (200, serde_json::json!({"outcome": format!("{other:?}"), "served_by": self.id}).to_string()),
        }
    }

    fn status_json(&self, now: Instant) -> serde_json::Value {
        let role = role_name(self.raft.role());
        let ns = now_ns(now);
        let lease_expiry_ms = self.raft.quorum_contact().map(|t| {
            let end = t + self.raft_election_timeout();
            (end.saturating_sub(ns)) as f64 / 1e6
        });
        let membership = self.raft.membership();
        let mut members = Vec::new();
        for (ids, mrole) in [
            (membership.voters.as_slice(), "voter"),
            (membership.observers.as_slice(), "observer"),
        ] {
            for &m in ids {
                let (match_index, lag) = if m == self.id {
                    (Some(self.raft.persisted_index()), Some(0))
                } else {
                    match self.raft.peer_progress(m) {
                        Some((mi, _)) => {
                            (Some(mi), Some(self.raft.last_index().saturating_sub(mi)))
                        }
                        None => (None, None),
                    }
                };
                let last_contact_ms = if m == self.id {
                    Some(0.0)
                } else {
                    self.peers
                        .last_received(m)
                        .map(|t| now.saturating_duration_since(t).as_secs_f64() * 1e3)
                };
                members.push(serde_json::json!({
                    "node_id": m,
                    "address": self.member_address(m).map(|a| a.to_string()),
                    "role": mrole,
                    "is_leader": m == self.raft.leader(),
                    "connected": m == self.id || self.peers.is_connected(m),
                    "match_index": match_index,
                    "lag": lag,
                    "last_contact_ms": last_contact_ms,
                }));
            }
        }
        serde_json::json!({
            "node_id": self.id,
            "role": role,
            "term": self.raft.term(),
            "leader": {
                "node_id": if self.raft.leader() == 0 { serde_json::Value::Null } else { self.raft.leader().into() },
                "term": self.raft.term(),
                "lease_expiry_ms": lease_expiry_ms,
            },
            "commit_index": self.raft.commit_index(),
            "applied_index": self.raft.applied_index(),
            "last_index": self.raft.last_index(),
            "io_backend": format!("{:?}", self.io.backend()).to_lowercase(),
            "members": members,
            "vms": self.vms_status_json(now),
        })
    }

    /// The lease a leader may rely on after quorum contact: an election timeout less
    /// 2 eps for clock rates (see `Raft::quorum_contact`).
    fn raft_election_timeout(&self) -> Nanos {
        self.election_ns - self.election_ns / 50
    }

    fn metrics_text(&self, now: Instant) -> String {
        let mut out = String::new();
        self.vms_metrics(&mut out, now);
        metrics::render_scalar(
            &mut out,
            "vigil_raft_term",
            "gauge",
            "Current Raft term.",
            self.raft.term(),
        );
        let role_value = match self.raft.role() {
            Role::Follower => 0,
            Role::PreCandidate => 1,
            Role::Candidate => 2,
            Role::Leader => 3,
        };
        metrics::render_scalar(
            &mut out,
            "vigil_raft_role",
            "gauge",
            "0 follower, 1 pre-candidate, 2 candidate, 3 leader.",
            role_value,
        );
        metrics::render_scalar(
            &mut out,
            "vigil_raft_commit_index",
            "gauge",
            "Commit index.",
            self.raft.commit_index(),
        );
        metrics::render_scalar(
            &mut out,
            "vigil_raft_applied_index",
            "gauge",
            "Applied index.",
            self.raft.applied_index(),
        );
        metrics::render_scalar(
            &mut out,
            "vigil_raft_elections_won_total",
            "counter",
            "Elections this node won.",
            self.elections_won,
        );
        metrics::render_scalar(
            &mut out,
            "vigil_raft_leader_changes_total",
            "counter",
            "Leader changes seen.",
            self.leader_changes,
        );
        metrics::render_scalar(
            &mut out,
            "vigil_peer_dropped_frames_total",
            "counter",
            "Frames dropped (peer down or queue full).",
            self.peers.dropped_frames,
        );
        self.peers.render_metrics(&mut out);
        self.control.render_metrics(&mut out);
        self.commit_latency.render(
            &mut out,
            "vigil_commit_latency_seconds",
            "Proposal to apply on the leader.",
            "",
        );
        self.fsync_latency.render(
            &mut out,
            "vigil_fsync_latency_seconds",
            "WAL + hard state sync, from its start to its completion.",
            "",
        );
        let _ = std::fmt::Write::write_str(&mut out, "# HELP vigil_peer_lag_entries Entries the peer lags behind the leader's log.\n# TYPE vigil_peer_lag_entries gauge\n");
        for &m in self
            .raft
            .membership()
            .voters
            .as_slice()
            .iter()
            .chain(self.raft.membership().observers.as_slice())
        {
            if let Some((mi, _)) = self.raft.peer_progress(m) {
                let _ = std::fmt::Write::write_fmt(
                    &mut out,
                    format_args!(
                        "vigil_peer_lag_entries{{peer=\"{m}\"}} {}\n",
                        self.raft.last_index().saturating_sub(mi)
                    ),
                );
            }
        }
        out
    }

    fn stop(&mut self) {
        // Finish the sync in flight (its flushes cannot be cancelled anyway); other
        // completions that arrive meanwhile no longer matter. Then close sockets.
        let mut completions = [Completion::EMPTY; 16];
        while self.sync_flushes > 0 {
            let n = match self.io.wait(None, &mut completions) {
                Ok(n) => n,
                Err(e) => {
                    log::error!("node {}: waiting for the sync in flight: {e}", self.id);
                    break;
                }
            };
            for c in completions[..n].iter().copied() {
                if c.token >> 56 == TOKEN_SYNC >> 56 {
                    if let Err(e) = self.on_flush(c.result) {
                        log::error!("node {}: completing the sync in flight: {e}", self.id);
                    }
                }
            }
        }
        self.peers.close_all(&mut self.io);
        self.control.close_all(&mut self.io);
        self.vms_close_all();
        let _ = std::fs::remove_file(&self.control_path);
        log::info!("node {}: stopped", self.id);
    }
}

/// Binds the peer listener. After a crash, connections of the previous process may
/// still hold the port for a moment (orphaned sockets finishing their close), which even
/// SO_REUSEADDR does not bypass: retry for a while before giving up.
fn listen_retrying(addr: std::net::SocketAddr) -> Result<OwnedFd, String> {
    let start = Instant::now();
    loop {
        match io::socket::tcp_listen(addr, 128) {
            Ok(fd) => return Ok(fd),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && Instant::now().saturating_duration_since(start)
                        < Duration::from_millis(limits::LISTEN_RETRY_MS) =>
            {
                log::warn!("listen {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("listen {addr}: {e}")),
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Follower => "follower",
        Role::PreCandidate => "pre-candidate",
        Role::Candidate => "candidate",
        Role::Leader => "leader",
    }
}

fn raft_error(e: RaftError) -> (u16, String) {
    match e {
        RaftError::NotLeader { .. } => {
            (503, api::error_json("no leader known; retry", "no_leader"))
        }
        RaftError::Transferring => (
            503,
            api::error_json("leadership transfer in progress; retry", "transferring"),
        ),
        RaftError::LogFull => (503, api::error_json("log full; retry", "busy")),
        RaftError::TooLarge => (413, api::error_json("entry too large", "too_large")),
        RaftError::ChangePending => (
            409,
            api::error_json("a membership change is pending", "change_pending"),
        ),
        RaftError::NotReady => (
            503,
            api::error_json("the new leader has not committed yet; retry", "not_ready"),
        ),
        RaftError::InvalidChange => (
            400,
            api::error_json("invalid membership change", "invalid_change"),
        ),
        RaftError::TooManyReads => (
            503,
            api::error_json("too many reads waiting; retry", "busy"),
        ),
    }
}
