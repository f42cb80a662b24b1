//! Peer connections: one TCP connection per peer pair, the lower node id dials.
//!
//! Each connection starts with the peer handshake (`auth::handshake`): the dialler is the
//! initiator, the acceptor the responder; both prove they hold a cluster key and the
//! responder refuses ids outside the membership. Every frame after it is sealed with a
//! MAC under the connection's per-direction session key (`auth::session`); a frame whose
//! MAC fails closes the connection and is counted (`vigil_peer_bad_mac_total`). A
//! handshake not finished within `PEER_HANDSHAKE_TIMEOUT_MS` (counted from the dial or
//! the accept) is closed, and at most `MAX_PENDING_HANDSHAKES` accepted connections may
//! be in their handshake at once: further ones are closed at once. Every failure is
//! counted by reason (`vigil_peer_handshake_failures_total{reason}`). The dialer
//! reconnects with capped exponential backoff and jitter. Every connection has a bounded send queue:
//! when a peer is too slow to drain it, the connection is dropped (and redialled), so
//! memory never grows without bound.
//!
//! All socket work is operations on the `Io` (the ring on io_uring, emulated on epoll),
//! so one code path serves both backends:
//!
//! - Accept: `limits::PEER_ACCEPTS_IN_FLIGHT` `Io::accept`s stay in flight on the
//!   listener, each resubmitted when it completes (after a short pause when the process
//!   or the system ran out of descriptors or memory, so that an error cannot spin).
//! - Receive: one `Io::recv` in flight per connection, into a slab buffer the connection
//!   holds while it lives. A completion's bytes are appended to the connection's read
//!   buffer, decoded (the handshake, then sealed frames) and the receive is resubmitted.
//!   Its range keeps the read bounds: at most `handshake::MAX_MESSAGE_BYTES` pending
//!   during the handshake, at most `MAX_SEALED_FRAME_BYTES` after it.
//! - Send: one `Io::send` in flight per connection. [`Peers::flush`] (once a loop turn)
//!   starts one where the queue holds bytes and none is in flight: it copies up to one
//!   slab buffer from the front of the queue. The completion consumes what was sent (a
//!   short send sends the rest next) and starts the next send while bytes remain; the
//!   buffer goes back to the slab once the queue is empty.
//! - Close: the connection leaves the peer's slot and [`PeerEvent::Lost`] is reported at
//!   once; its receive, send or connect in flight is cancelled, and the fd is closed and
//!   its buffers released only when every one of them completed (the kernel may be
//!   writing a buffer until then). A connection that cannot get a buffer or an operation
//!   slot is closed (warned, rate-limited; `vigil_peer_io_refused_total`).
//!
//! Every completion of a peer token must reach [`Peers::on_completion`], the cancelled
//! ones (ECANCELED) included: they hand back buffers and let closes finish.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::backoff::Backoff;
use super::codec::{self, OwnedPayload};
use super::frame;
use super::send_queue::SendQueue;
use crate::auth::{handshake, Handshake, KeyRing, Session, Step, TAG_BYTES};
use crate::io::{socket, BufferId, Completion, Errno, Instant, Io, OpKind};
use crate::limits;
use crate::logging::RateLimit;
use crate::metrics;
use crate::raft::{Message, NodeId, Payload, Transport};

/// Token kinds for peer operations (the top byte of an I/O token; the low 56 bits name
/// the connection). The listener's accepts use the kind given to [`Peers::listen`].
pub const TOKEN_PEER_RECV: u64 = 2;
pub const TOKEN_PEER_CONNECT: u64 = 3;
pub const TOKEN_PEER_SEND: u64 = 0x22;

/// In an accept token: set on the pause after a resource error (EMFILE, ...).
const ACCEPT_RETRY: u64 = 1 << 16;

pub fn token(kind: u64, id: u64) -> u64 {
    (kind << 56) | id
}

/// What arrived from peers, for the node to handle.
#[derive(Debug)]
pub enum PeerEvent {
    Raft(Message, OwnedPayload),
    ForwardRequest {
        from: NodeId,
        id: u64,
        method: u8,
        path: String,
        body: Vec<u8>,
    },
    ForwardResponse {
        id: u64,
        status: u16,
        body: Vec<u8>,
    },
    /// The connection to this peer closed or failed. `by_peer`: the other end closed or
    /// reset it (end of stream, ECONNRESET, EPIPE), as when its process died; false when
    /// this node dropped it (bad frame, slow peer, replaced, handshake timeout, shutdown).
    /// Only the first is evidence that the peer's process is gone.
    Lost {
        peer: NodeId,
        by_peer: bool,
    },
}

/// Where a connection is in proving who is at the other end.
enum Auth {
    /// Outbound, TCP connect still in flight.
    Connecting,
    /// Handshake messages are being exchanged; no frame is accepted yet.
    Handshaking(Box<Handshake>),
    /// The peer proved its id and key: frames flow, each sealed under the session.
    Established(Box<Session>),
}

struct Conn {
    fd: OwnedFd,
    /// The peer: the dialled member, or (inbound) the member the handshake proved.
    peer: NodeId,
    /// Accepted (not dialled) by this node.
    inbound: bool,
    /// Inbound from the IP address of a configured member: its handshake counts against
    /// the members' own pending pool, which strangers elsewhere cannot fill.
    from_member_ip: bool,
    auth: Auth,
    /// The handshake must be over by then (set at dial or accept).
    deadline: Instant,
    rbuf: Vec<u8>,
    queue: SendQueue,
    broken: bool,
    /// The other end closed or reset the connection (see `PeerEvent::Lost`).
    closed_by_peer: bool,
    /// The slab buffer of this connection's receives: held from the first receive until
    /// the close finishes, lent to the receive while one is in flight.
    recv_buffer: Option<BufferId>,
    /// The slab buffer of the send in flight (held between sends only while bytes wait).
    send_buffer: Option<BufferId>,
    /// Operations in flight, each with its own token (`token(TOKEN_PEER_*, id)`).
    recv_in_flight: bool,
    send_in_flight: bool,
    connect_in_flight: bool,
}

impl Conn {
    fn established(&self) -> bool {
        matches!(self.auth, Auth::Established(_)) && !self.broken
    }

    fn pending_inbound(&self) -> bool {
        self.inbound && !matches!(self.auth, Auth::Established(_))
    }

    fn pending_in_pool(&self, member_pool: bool) -> bool {
        self.pending_inbound() && self.from_member_ip == member_pool
    }

    fn in_flight(&self) -> bool {
        self.recv_in_flight || self.send_in_flight || self.connect_in_flight
    }

    /// Submits the connection's receive: its held buffer (taken from the slab on the
    /// first call), limited so that the read buffer never holds more than one message
    /// (a handshake message before authentication, a sealed frame after).
    fn start_recv(&mut self, io: &mut Io, id: u64) -> Result<(), crate::io::Error> {
        assert!(!self.recv_in_flight, "one receive in flight per connection");
        let limit = match self.auth {
            Auth::Established(_) => limits::MAX_SEALED_FRAME_BYTES,
            _ => handshake::MAX_MESSAGE_BYTES,
        };
        // Decoding consumes every whole message, and no message is longer than `limit`
        // (the decoders refuse longer ones), so there is always room for one more byte.
        assert!(
            self.rbuf.len() < limit,
            "read buffer holds {} bytes, limit {limit}",
            self.rbuf.len()
        );
        let buffer = match self.recv_buffer {
            Some(b) => b,
            None => {
                let b = io.buffer_acquire()?;
                self.recv_buffer = Some(b);
                b
            }
        };
        let room = (limit - self.rbuf.len()).min(io.buffer_bytes());
        io.recv(
            token(TOKEN_PEER_RECV, id),
            self.fd.as_raw_fd(),
            buffer,
            0..room,
        )?;
        self.recv_in_flight = true;
        Ok(())
    }

    /// Submits a send of the front of the queue (up to one slab buffer), if bytes wait,
    /// the connection may send and no send is in flight.
    fn start_send(&mut self, io: &mut Io, id: u64) -> Result<(), crate::io::Error> {
        if self.send_in_flight || self.queue.is_empty() || matches!(self.auth, Auth::Connecting) {
            return Ok(());
        }
        let buffer = match self.send_buffer {
            Some(b) => b,
            None => {
                let b = io.buffer_acquire()?;
                self.send_buffer = Some(b);
                b
            }
        };
        let n = self.queue.copy_front(io.buffer_mut(buffer));
        io.send(
            token(TOKEN_PEER_SEND, id),
            self.fd.as_raw_fd(),
            buffer,
            0..n,
        )?;
        self.send_in_flight = true;
        Ok(())
    }

    /// Gives the connection's buffers back to the slab (nothing may be in flight).
    fn release_buffers(&mut self, io: &mut Io) {
        assert!(
            !self.in_flight(),
            "buffers released with an operation in flight"
        );
        if let Some(b) = self.recv_buffer.take() {
            io.buffer_release(b);
        }
        if let Some(b) = self.send_buffer.take() {
            io.buffer_release(b);
        }
    }
}

/// Security counters of the peer transport, rendered into /metrics.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Frames whose MAC failed (each closed its connection).
    pub bad_mac: u64,
    /// Frames that were not valid frames or messages on an authenticated connection.
    pub bad_frames: u64,
    /// Handshakes that finished.
    pub handshakes: u64,
    /// Failed handshakes by reason (`HandshakeError::reason`, or a transport reason).
    pub handshake_failures: Vec<(&'static str, u64)>,
    /// Connections closed because the I/O layer had no buffer or operation slot for them.
    pub io_refused: u64,
    /// Accepts on the listener that failed (each was resubmitted).
    pub accept_errors: u64,
}

impl PeerCounters {
    fn handshake_failed(&mut self, reason: &'static str) {
        match self
            .handshake_failures
            .iter_mut()
            .find(|(r, _)| *r == reason)
        {
            Some((_, n)) => *n += 1,
            None => self.handshake_failures.push((reason, 1)),
        }
    }

    pub fn handshake_failures(&self, reason: &str) -> u64 {
        self.handshake_failures
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// Warnings a second about hostile or broken inbound connections; the rest are counted.
const LOG_LINES_PER_SECOND: u32 = 20;

struct Slot {
    id: NodeId,
    addr: SocketAddr,
    conn: Option<u64>,
    next_dial: Instant,
    backoff: Backoff,
    last_received: Option<Instant>,
}

pub struct Peers {
    me: NodeId,
    keys: KeyRing,
    slots: Vec<Slot>,
    /// Live connections: dialling, in the handshake, or established.
    conns: HashMap<u64, Conn>,
    /// Closed connections whose cancelled operations have not all completed yet: the fd
    /// stays open and the buffers held until then.
    closing: HashMap<u64, Conn>,
    /// The token kind of the listener's accepts, and the listener (see [`Peers::listen`]).
    /// Dropped after the `Io` in the node, so never closed under an accept in flight.
    listener: Option<(u64, OwnedFd)>,
    next_conn: u64,
    scratch: Vec<u8>,
    rng: u64,
    /// Frames dropped because the peer was not connected or its queue was full.
    pub dropped_frames: u64,
    pub counters: PeerCounters,
    log_budget: RateLimit,
}

impl Peers {
    pub fn new(me: NodeId, peers: &[(NodeId, SocketAddr)], seed: u64, keys: KeyRing) -> Peers {
        let slots = peers
            .iter()
            .filter(|(id, _)| *id != me)
            .map(|&(id, addr)| Slot {
                id,
                addr,
                conn: None,
                next_dial: Instant::ZERO,
                backoff: Backoff::new(
                    limits::PEER_RECONNECT_INITIAL_MS * 1_000_000,
                    limits::PEER_RECONNECT_MAX_MS * 1_000_000,
                ),
                last_received: None,
            })
            .collect();
        Peers {
            me,
            keys,
            slots,
            conns: HashMap::new(),
            closing: HashMap::new(),
            listener: None,
            next_conn: 1,
            scratch: Vec::with_capacity(limits::MAX_FRAME_BYTES),
            rng: seed | 1,
            dropped_frames: 0,
            counters: PeerCounters::default(),
            log_budget: RateLimit::new(LOG_LINES_PER_SECOND),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Learns a new member's address (a member added at run time); known ids keep theirs.
    pub fn add_peer(&mut self, id: NodeId, addr: SocketAddr) {
        if id == self.me
            || self.slots.iter().any(|s| s.id == id)
            || self.slots.len() >= limits::MAX_MEMBERS
        {
            return;
        }
        self.slots.push(Slot {
            id,
            addr,
            conn: None,
            next_dial: Instant::ZERO,
            backoff: Backoff::new(
                limits::PEER_RECONNECT_INITIAL_MS * 1_000_000,
                limits::PEER_RECONNECT_MAX_MS * 1_000_000,
            ),
            last_received: None,
        });
    }

    /// Makes the known peers exactly `members` (this node skipped): new ones are
    /// learned, a changed address is used from the next dial on (the old connection is
    /// dropped), and peers no longer listed are forgotten: their connections close at
    /// once and their handshakes fail from then on (the responder only admits known
    /// ids). Returns whether anything changed.
    pub fn set_members(
        &mut self,
        io: &mut Io,
        members: &[(NodeId, SocketAddr)],
        events: &mut Vec<PeerEvent>,
    ) -> bool {
        let mut changed = false;
        let gone: Vec<NodeId> = self
            .slots
            .iter()
            .map(|s| s.id)
            .filter(|id| !members.iter().any(|(m, _)| m == id))
            .collect();
        for id in gone {
            log::info!("peer {id}: no longer a member; forgetting it");
            self.forget(io, id, events);
            changed = true;
        }
        for &(id, addr) in members {
            if id == self.me {
                continue;
            }
            match self.slots.iter().position(|s| s.id == id) {
                Some(i) if self.slots[i].addr != addr => {
                    log::info!("peer {id}: address {} -> {addr}", self.slots[i].addr);
                    self.slots[i].addr = addr;
                    if let Some(c) = self.slots[i].conn {
                        if let Some(conn) = self.conns.get_mut(&c) {
                            conn.broken = true;
                        }
                    }
                    changed = true;
                }
                Some(_) => {}
                None => {
                    log::info!("peer {id}: new member at {addr}");
                    self.add_peer(id, addr);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Forgets a peer: its slot goes, and every connection with it (dialled, accepted,
    /// established or still in its handshake) closes.
    fn forget(&mut self, io: &mut Io, peer: NodeId, events: &mut Vec<PeerEvent>) {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer == peer)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.close(io, id, events);
        }
        self.slots.retain(|s| s.id != peer);
    }

    pub fn is_connected(&self, peer: NodeId) -> bool {
        self.slots
            .iter()
            .find(|s| s.id == peer)
            .and_then(|s| s.conn)
            .and_then(|c| self.conns.get(&c))
            .is_some_and(Conn::established)
    }

    pub fn last_received(&self, peer: NodeId) -> Option<Instant> {
        self.slots
            .iter()
            .find(|s| s.id == peer)
            .and_then(|s| s.last_received)
    }

    /// Dials peers with a higher id whose connection is down and whose backoff passed.
    /// Returns the earliest next dial time, if any dial is waiting.
    pub fn maintain(
        &mut self,
        io: &mut Io,
        now: Instant,
        events: &mut Vec<PeerEvent>,
    ) -> Option<Instant> {
        let broken: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.broken)
            .map(|(&id, _)| id)
            .collect();
        for id in broken {
            self.close(io, id, events);
        }
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.auth, Auth::Established(_)) && c.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            self.counters.handshake_failed("timeout");
            if let Some(c) = self.conns.get(&id) {
                let (peer, inbound) = (c.peer, c.inbound);
                if !inbound || self.log_budget.allow("peer transport warning") {
                    log::warn!(
                        "peer {}: handshake not finished within {} ms; closing",
                        if inbound {
                            "(inbound)".to_string()
                        } else {
                            peer.to_string()
                        },
                        limits::PEER_HANDSHAKE_TIMEOUT_MS
                    );
                }
            }
            self.close(io, id, events);
        }
        let mut next: Option<Instant> = self
            .conns
            .values()
            .filter(|c| !matches!(c.auth, Auth::Established(_)))
            .map(|c| c.deadline)
            .min();
        for i in 0..self.slots.len() {
            if self.slots[i].id < self.me || self.slots[i].conn.is_some() {
                continue;
            }
            if self.slots[i].next_dial > now {
                next =
                    Some(next.map_or(self.slots[i].next_dial, |n| n.min(self.slots[i].next_dial)));
                continue;
            }
            let addr = self.slots[i].addr;
            let peer = self.slots[i].id;
            let fd = match socket::tcp_socket(&addr) {
                Ok(fd) => fd,
                Err(e) => {
                    log::warn!("peer {peer}: socket: {e}");
                    self.schedule_dial(i, now);
                    continue;
                }
            };
            let id = self.next_conn;
            self.next_conn += 1;
            if let Err(e) = io.connect(token(TOKEN_PEER_CONNECT, id), fd.as_raw_fd(), addr) {
                log::warn!("peer {peer}: connect: {e}");
                self.schedule_dial(i, now);
                continue;
            }
            let mut conn = Conn::new(fd, peer, false, Auth::Connecting, now);
            conn.connect_in_flight = true;
            self.conns.insert(id, conn);
            self.slots[i].conn = Some(id);
        }
        next
    }

    fn schedule_dial(&mut self, slot: usize, now: Instant) {
        let r = self.random();
        let delay = self.slots[slot].backoff.next_delay_ns(r);
        self.slots[slot].next_dial = now.saturating_add(std::time::Duration::from_nanos(delay));
    }

    /// A new inbound connection (from the listener's accepts): the responder's side of
    /// the handshake starts. Connections from a member's IP address and from elsewhere have
    /// separate pools of `MAX_PENDING_HANDSHAKES`; beyond its pool's limit a connection is
    /// closed at once. (So strangers on other hosts holding their pool full cannot keep
    /// a restarted member from reconnecting; an attacker on a member's own host can.)
    fn accepted(&mut self, io: &mut Io, fd: OwnedFd, now: Instant) {
        let from_member_ip =
            peer_ip(&fd).is_some_and(|ip| self.slots.iter().any(|s| s.addr.ip() == ip));
        let pending = self
            .conns
            .values()
            .filter(|c| c.pending_in_pool(from_member_ip))
            .count();
        if pending >= limits::MAX_PENDING_HANDSHAKES {
            self.counters.handshake_failed("too_many_pending");
            if self.log_budget.allow("peer transport warning") {
                log::warn!(
                    "peer transport: {pending} inbound handshakes pending; closing a new connection"
                );
            }
            return;
        }
        let nonce = match handshake::fresh_nonce() {
            Ok(nonce) => nonce,
            Err(e) => {
                log::error!("peer transport: getrandom for a handshake nonce: {e}");
                self.counters.handshake_failed("no_randomness");
                return;
            }
        };
        let _ = socket::set_tcp_nodelay(fd.as_raw_fd());
        let id = self.next_conn;
        self.next_conn += 1;
        let responder = Handshake::responder(&self.keys, self.me, nonce);
        let mut conn = Conn::new(fd, 0, true, Auth::Handshaking(Box::new(responder)), now);
        conn.from_member_ip = from_member_ip;
        match conn.start_recv(io, id) {
            Ok(()) => {
                self.conns.insert(id, conn);
            }
            Err(e) => {
                // Nothing is in flight: the buffer goes back and the fd closes here.
                self.io_refused("(inbound)", &e);
                conn.release_buffers(io);
            }
        }
    }

    /// An outbound connect finished: the initiator's side of the handshake starts.
    fn connected(
        &mut self,
        io: &mut Io,
        id: u64,
        result: Result<u32, Errno>,
        now: Instant,
        events: &mut Vec<PeerEvent>,
    ) {
        let conn = self
            .conns
            .get_mut(&id)
            .expect("a connect completion for a live connection");
        assert!(conn.connect_in_flight);
        conn.connect_in_flight = false;
        let peer = conn.peer;
        match result {
            Ok(_) => {
                let nonce = match handshake::fresh_nonce() {
                    Ok(nonce) => nonce,
                    Err(e) => {
                        log::error!("peer {peer}: getrandom for a handshake nonce: {e}");
                        conn.broken = true;
                        return;
                    }
                };
                self.scratch.clear();
                let initiator =
                    Handshake::initiator(&self.keys, self.me, peer, nonce, &mut self.scratch);
                conn.auth = Auth::Handshaking(Box::new(initiator));
                if conn.queue.push_raw(&self.scratch).is_err() {
                    conn.broken = true;
                }
                if let Err(e) = conn.start_recv(io, id) {
                    self.io_refused(&peer.to_string(), &e);
                    self.close(io, id, events);
                    return;
                }
                log::debug!("peer {peer}: connected; handshake started");
            }
            Err(e) => {
                log::debug!("peer {peer}: connect failed: {}", e.io_error());
                // Nothing else was in flight (the connect is a connection's first
                // operation): the fd closes here, and no Lost is reported (it never
                // was connected).
                let conn = self.conns.remove(&id).expect("looked up above");
                assert!(!conn.in_flight());
                drop(conn);
                if let Some(i) = self.slots.iter().position(|s| s.conn == Some(id)) {
                    self.slots[i].conn = None;
                    self.schedule_dial(i, now);
                }
            }
        }
    }

    /// A receive completed: its bytes join the read buffer and are decoded, and the
    /// next receive is submitted; end of stream or an error closes the connection.
    fn on_recv(
        &mut self,
        io: &mut Io,
        id: u64,
        c: &Completion,
        now: Instant,
        events: &mut Vec<PeerEvent>,
    ) {
        let conn = self
            .conns
            .get_mut(&id)
            .expect("a receive completion for a live connection");
        assert!(conn.recv_in_flight);
        conn.recv_in_flight = false;
        assert_eq!(
            c.buffer, conn.recv_buffer,
            "a receive hands back its connection's buffer"
        );
        let n = match c.result {
            Ok(n) if n > 0 => n as usize,
            Err(Errno(libc::EAGAIN | libc::EINTR)) => 0,
            other => {
                // End of stream (0) or an error: the connection is over. Only the end of
                // stream and a reset say that the other end (its process) closed it.
                conn.closed_by_peer =
                    matches!(other, Ok(0) | Err(Errno(libc::ECONNRESET | libc::EPIPE)));
                if let Err(e) = other {
                    log::debug!("peer {}: receive: {e}", conn.peer);
                }
                if matches!(conn.auth, Auth::Handshaking(_)) {
                    self.counters.handshake_failed("closed");
                }
                self.close(io, id, events);
                return;
            }
        };
        if n > 0 {
            let buffer = conn.recv_buffer.expect("a receive buffer is held");
            conn.rbuf.extend_from_slice(&io.buffer(buffer)[..n]);
            if !self.decode_input(id, now, events) {
                self.close(io, id, events);
                return;
            }
        }
        let conn = self.conns.get_mut(&id).expect("still live");
        if let Err(e) = conn.start_recv(io, id) {
            let who = conn.peer.to_string();
            self.io_refused(&who, &e);
            self.close(io, id, events);
        }
    }

    /// Decodes what the read buffer holds: the handshake first, then sealed frames (each
    /// an event). Returns false when the input was bad (the caller closes).
    fn decode_input(&mut self, id: u64, now: Instant, events: &mut Vec<PeerEvent>) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        let mut at = 0;
        let mut bad = false;
        let mut proven = None;
        // The handshake first: nothing but its messages until the peer proved itself.
        if let Auth::Handshaking(hs) = &mut conn.auth {
            let slots = &self.slots;
            let is_member = |node: NodeId| slots.iter().any(|s| s.id == node);
            self.scratch.clear();
            match hs.receive(&conn.rbuf, &is_member, &mut self.scratch) {
                Ok(Step::NeedMore) => {}
                Ok(Step::Continue { consumed }) => {
                    at = consumed;
                    if conn.queue.push_raw(&self.scratch).is_err() {
                        bad = true;
                    }
                }
                Ok(Step::Established(e)) => {
                    at = e.consumed;
                    if conn.queue.push_raw(&self.scratch).is_err() {
                        bad = true;
                    }
                    log::info!(
                        "peer {}: authenticated ({}, key {})",
                        e.peer,
                        if conn.inbound { "accepted" } else { "dialled" },
                        e.key
                    );
                    conn.peer = e.peer;
                    conn.auth = Auth::Established(Box::new(e.session));
                    self.counters.handshakes += 1;
                    proven = Some(e.peer);
                }
                Err(e) => {
                    self.counters.handshake_failed(e.reason());
                    if !conn.inbound || self.log_budget.allow("peer transport warning") {
                        let who = if conn.inbound {
                            "inbound connection".to_string()
                        } else {
                            format!("peer {}", conn.peer)
                        };
                        log::warn!("{who}: handshake failed: {e}; closing");
                    }
                    bad = true;
                }
            }
        }
        // Then sealed frames: header, MAC, checksum, message, in that order.
        while !bad {
            let Auth::Established(session) = &mut conn.auth else {
                break;
            };
            let rest = &conn.rbuf[at..];
            let header = match frame::decode_header(rest) {
                Ok(None) => break,
                Ok(Some(h)) => h,
                Err(e) => {
                    log::warn!("peer {}: bad frame: {e}; closing", conn.peer);
                    self.counters.bad_frames += 1;
                    bad = true;
                    break;
                }
            };
            let sealed_len = header.frame_len() + TAG_BYTES;
            if rest.len() < sealed_len {
                break;
            }
            let framed = match session.opener.open(&rest[..sealed_len]) {
                Ok(framed) => framed,
                Err(e) => {
                    log::warn!("peer {}: {e}; closing", conn.peer);
                    self.counters.bad_mac += 1;
                    bad = true;
                    break;
                }
            };
            let f = match frame::decode(framed) {
                Ok(Some(f)) if f.consumed == framed.len() => f,
                Ok(_) => {
                    log::warn!("peer {}: frame length disagrees; closing", conn.peer);
                    self.counters.bad_frames += 1;
                    bad = true;
                    break;
                }
                Err(e) => {
                    log::warn!("peer {}: bad frame: {e}; closing", conn.peer);
                    self.counters.bad_frames += 1;
                    bad = true;
                    break;
                }
            };
            at += sealed_len;
            let problem = match f.kind {
                codec::KIND_RAFT => match codec::decode_message(f.payload) {
                    Ok((m, p)) if m.from == conn.peer && m.to == self.me => {
                        events.push(PeerEvent::Raft(m, p));
                        None
                    }
                    Ok((m, _)) => Some(format!(
                        "message from {} to {} on its connection",
                        m.from, m.to
                    )),
                    Err(e) => Some(format!("bad raft message: {e}")),
                },
                codec::KIND_FORWARD_REQUEST => match codec::decode_forward_request(f.payload) {
                    Ok(r) => {
                        events.push(PeerEvent::ForwardRequest {
                            from: conn.peer,
                            id: r.id,
                            method: r.method,
                            path: r.path.to_string(),
                            body: r.body.to_vec(),
                        });
                        None
                    }
                    Err(e) => Some(format!("bad forward request: {e}")),
                },
                codec::KIND_FORWARD_RESPONSE => match codec::decode_forward_response(f.payload) {
                    Ok((rid, status, body)) => {
                        events.push(PeerEvent::ForwardResponse {
                            id: rid,
                            status,
                            body: body.to_vec(),
                        });
                        None
                    }
                    Err(e) => Some(format!("bad forward response: {e}")),
                },
                other => Some(format!("unknown frame kind {other}")),
            };
            if let Some(problem) = problem {
                log::warn!("peer {}: {problem}; closing", conn.peer);
                self.counters.bad_frames += 1;
                bad = true;
            }
        }
        conn.rbuf.drain(..at);
        let peer = conn.peer;
        let received = at > 0 && matches!(conn.auth, Auth::Established(_));
        if let Some(node) = proven {
            // Bind the connection to the peer's slot; an older connection is replaced.
            if let Some(i) = self.slots.iter().position(|s| s.id == node) {
                if let Some(old) = self.slots[i].conn.replace(id) {
                    if old != id {
                        if let Some(o) = self.conns.get_mut(&old) {
                            o.broken = true;
                        }
                    }
                }
                self.slots[i].backoff.reset();
            }
        }
        if received {
            if let Some(slot) = self.slots.iter_mut().find(|s| s.id == peer) {
                slot.last_received = Some(now);
            }
        }
        !bad
    }

    /// Closes a live connection: it leaves its peer's slot (a redial is scheduled) and
    /// `Lost` is reported now, so the node learns of it in this turn. The operations in
    /// flight are cancelled; the fd and the buffers stay until they all completed (see
    /// `finish_closing`), then the fd is closed.
    fn close(&mut self, io: &mut Io, id: u64, events: &mut Vec<PeerEvent>) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        let now = Instant::now();
        if let Some(i) = self.slots.iter().position(|s| s.conn == Some(id)) {
            self.slots[i].conn = None;
            self.schedule_dial(i, now);
            let by_peer = conn.closed_by_peer;
            log::info!(
                "peer {}: connection lost ({})",
                self.slots[i].id,
                if by_peer {
                    "closed by the peer"
                } else {
                    "closed here"
                }
            );
            events.push(PeerEvent::Lost {
                peer: self.slots[i].id,
                by_peer,
            });
        }
        for (in_flight, kind) in [
            (conn.recv_in_flight, TOKEN_PEER_RECV),
            (conn.send_in_flight, TOKEN_PEER_SEND),
            (conn.connect_in_flight, TOKEN_PEER_CONNECT),
        ] {
            if !in_flight {
                continue;
            }
            match io.cancel(token(kind, id)) {
                // UnknownToken: it completed and its completion is in the batch being
                // dispatched; it still arrives at `on_completion`.
                Ok(()) | Err(crate::io::Error::UnknownToken { .. }) => {}
                Err(e) => log::error!(
                    "peer {}: cancelling an operation of a closed connection: {e}",
                    conn.peer
                ),
            }
        }
        conn.queue.clear();
        conn.rbuf = Vec::new();
        if conn.in_flight() {
            self.closing.insert(id, conn);
        } else {
            conn.release_buffers(io);
        }
    }

    /// A completion for a closed connection: once its last operation is in, its buffers
    /// go back and its fd closes.
    fn finish_closing(&mut self, io: &mut Io, id: u64, c: &Completion) {
        let conn = self
            .closing
            .get_mut(&id)
            .expect("a completion for a closing connection");
        let in_flight = match c.kind {
            OpKind::Recv => &mut conn.recv_in_flight,
            OpKind::Send => &mut conn.send_in_flight,
            OpKind::Connect => &mut conn.connect_in_flight,
            other => panic!("peer connection {id}: unexpected {other:?} completion"),
        };
        assert!(*in_flight, "a completion for an operation not in flight");
        *in_flight = false;
        if c.buffer.is_some() {
            assert!(
                c.buffer == conn.recv_buffer || c.buffer == conn.send_buffer,
                "a completion hands back one of its connection's buffers"
            );
        }
        if !conn.in_flight() {
            let mut conn = self.closing.remove(&id).expect("looked up above");
            conn.release_buffers(io);
            drop(conn); // closes the fd: nothing of it is in flight any more
        }
    }

    /// Starts a send on every connection whose queue holds bytes and has none in flight
    /// (the completions keep each one going until its queue is empty). Returns true when
    /// a send could not be submitted because every operation slot is taken: the caller
    /// tries again soon.
    pub fn flush(&mut self, io: &mut Io) -> bool {
        let mut retry = false;
        for (&id, conn) in self.conns.iter_mut() {
            if conn.broken {
                continue;
            }
            match conn.start_send(io, id) {
                Ok(()) => {}
                Err(crate::io::Error::InFlightFull { .. }) => retry = true,
                Err(e) => {
                    self.counters.io_refused += 1;
                    if self.log_budget.allow("peer transport warning") {
                        log::warn!("peer {}: send: {e}; dropping the connection", conn.peer);
                    }
                    conn.broken = true;
                }
            }
        }
        retry
    }

    /// A send completed: what went out leaves the queue, and the next send starts while
    /// bytes remain. A reset or broken pipe closes the connection as closed by the peer.
    fn on_send(&mut self, io: &mut Io, id: u64, c: &Completion, events: &mut Vec<PeerEvent>) {
        let conn = self
            .conns
            .get_mut(&id)
            .expect("a send completion for a live connection");
        assert!(conn.send_in_flight);
        conn.send_in_flight = false;
        assert_eq!(
            c.buffer, conn.send_buffer,
            "a send hands back its connection's buffer"
        );
        match c.result {
            Ok(n) => conn.queue.consume(n as usize),
            Err(Errno(libc::EAGAIN | libc::EINTR)) => {}
            Err(e) => {
                conn.closed_by_peer = matches!(e.0, libc::ECONNRESET | libc::EPIPE);
                log::debug!("peer {}: send: {e}", conn.peer);
                self.close(io, id, events);
                return;
            }
        }
        if conn.queue.is_empty() {
            if let Some(b) = conn.send_buffer.take() {
                io.buffer_release(b);
            }
            return;
        }
        if conn.broken {
            return; // closed at the next `maintain`
        }
        match conn.start_send(io, id) {
            Ok(()) => {}
            // `flush` tries again at the end of the turn.
            Err(crate::io::Error::InFlightFull { .. }) => {}
            Err(e) => {
                let who = conn.peer.to_string();
                self.io_refused(&who, &e);
                self.close(io, id, events);
            }
        }
    }

    /// Counts and (rate-limited) warns about a connection the I/O layer had no room for.
    fn io_refused(&mut self, who: &str, e: &crate::io::Error) {
        self.counters.io_refused += 1;
        if self.log_budget.allow("peer transport warning") {
            log::warn!("peer {who}: {e}; closing the connection");
        }
    }

    /// Starts accepting on `listener` (non-blocking, listening), which the transport
    /// keeps: `limits::PEER_ACCEPTS_IN_FLIGHT` accepts stay in flight, with tokens of kind
    /// `kind` (which no other operation of the node may use).
    pub fn listen(&mut self, io: &mut Io, kind: u64, listener: OwnedFd) -> Result<(), String> {
        assert!(self.listener.is_none(), "one listener");
        let raw = listener.as_raw_fd();
        self.listener = Some((kind, listener));
        for slot in 0..limits::PEER_ACCEPTS_IN_FLIGHT as u64 {
            io.accept(token(kind, slot), raw)
                .map_err(|e| format!("accept on the peer listener: {e}"))?;
        }
        Ok(())
    }

    /// Whether a completion belongs to the transport (its connections or its listener).
    pub fn owns(&self, token: u64) -> bool {
        let kind = token >> 56;
        matches!(kind, TOKEN_PEER_RECV | TOKEN_PEER_SEND | TOKEN_PEER_CONNECT)
            || self.listener.as_ref().is_some_and(|(k, _)| *k == kind)
    }

    /// Handles a completion the transport [`owns`](Peers::owns), whatever its result
    /// (ECANCELED included). Fails only when the listener's accept cannot be resubmitted.
    pub fn on_completion(
        &mut self,
        io: &mut Io,
        c: Completion,
        now: Instant,
        events: &mut Vec<PeerEvent>,
    ) -> Result<(), String> {
        let kind = c.token >> 56;
        let id = c.token & ((1 << 56) - 1);
        if let Some((listen_kind, listener)) = &self.listener {
            if kind == *listen_kind {
                let (listen_kind, listener) = (*listen_kind, listener.as_raw_fd());
                return self.on_accept(io, listen_kind, listener, id, &c, now);
            }
        }
        if self.closing.contains_key(&id) {
            self.finish_closing(io, id, &c);
            return Ok(());
        }
        match (kind, c.kind) {
            (TOKEN_PEER_RECV, OpKind::Recv) => self.on_recv(io, id, &c, now, events),
            (TOKEN_PEER_SEND, OpKind::Send) => self.on_send(io, id, &c, events),
            (TOKEN_PEER_CONNECT, OpKind::Connect) => self.connected(io, id, c.result, now, events),
            _ => panic!(
                "peer transport: completion {:?} with token {:#x} for no operation of it",
                c.kind, c.token
            ),
        }
        Ok(())
    }

    /// An accept (or the pause after a failed one) completed: a new connection starts
    /// its handshake, and the accept is resubmitted. Resource errors (EMFILE, ENFILE,
    /// ENOBUFS, ENOMEM) pause that accept for `PEER_ACCEPT_RETRY_MS`, so that a listener
    /// whose backlog cannot be taken does not spin the loop; other errors (a connection
    /// aborted before it was taken) resubmit at once. ECANCELED (shutdown) stops it.
    fn on_accept(
        &mut self,
        io: &mut Io,
        kind: u64,
        listener: RawFd,
        slot: u64,
        c: &Completion,
        now: Instant,
    ) -> Result<(), String> {
        let accept_token = token(kind, slot & !ACCEPT_RETRY);
        match (c.kind, c.result) {
            (_, Err(Errno(libc::ECANCELED))) => return Ok(()),
            (OpKind::Timeout, _) => {}
            (OpKind::Accept, Ok(raw)) => {
                // SAFETY: a successful accept returns a new descriptor that nobody else
                // owns; from here the OwnedFd closes it.
                let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
                self.accepted(io, fd, now);
            }
            (OpKind::Accept, Err(e)) => {
                self.counters.accept_errors += 1;
                let pause = matches!(
                    e.0,
                    libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
                );
                if self.log_budget.allow("peer transport warning") {
                    log::warn!(
                        "peer listener: accept: {e}{}",
                        if pause { "; pausing that accept" } else { "" }
                    );
                }
                if pause {
                    let until =
                        now.saturating_add(Duration::from_millis(limits::PEER_ACCEPT_RETRY_MS));
                    return io
                        .timeout(accept_token | ACCEPT_RETRY, until)
                        .map_err(|e| format!("peer listener: pausing an accept: {e}"));
                }
            }
            (other, _) => panic!("peer listener: unexpected {other:?} completion"),
        }
        io.accept(accept_token, listener)
            .map_err(|e| format!("peer listener: resubmitting an accept: {e}"))
    }

    /// Queues a frame to `peer`; false when it was dropped.
    pub fn send_frame(&mut self, peer: NodeId, kind: u8, payload: &[u8]) -> bool {
        let Some(cid) = self
            .slots
            .iter()
            .find(|s| s.id == peer)
            .and_then(|s| s.conn)
        else {
            self.dropped_frames += 1;
            return false;
        };
        let Some(conn) = self.conns.get_mut(&cid) else {
            return false;
        };
        let Auth::Established(session) = &mut conn.auth else {
            self.dropped_frames += 1;
            return false;
        };
        if conn.broken {
            self.dropped_frames += 1;
            return false;
        }
        if let Err(e) = conn
            .queue
            .push_sealed_frame(kind, payload, &mut session.sealer)
        {
            log::warn!("peer {peer}: {e}; dropping the connection");
            conn.broken = true;
            self.dropped_frames += 1;
            return false;
        }
        true
    }

    pub fn send_forward_request(&mut self, peer: NodeId, req: &codec::ForwardRequest<'_>) -> bool {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        codec::encode_forward_request(req, &mut buf);
        let ok = self.send_frame(peer, codec::KIND_FORWARD_REQUEST, &buf);
        self.scratch = buf;
        ok
    }

    pub fn send_forward_response(
        &mut self,
        peer: NodeId,
        id: u64,
        status: u16,
        body: &[u8],
    ) -> bool {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        codec::encode_forward_response(id, status, body, &mut buf);
        let ok = self.send_frame(peer, codec::KIND_FORWARD_RESPONSE, &buf);
        self.scratch = buf;
        ok
    }

    /// The transport's counters in Prometheus text.
    pub fn render_metrics(&self, out: &mut String) {
        metrics::render_scalar(
            out,
            "vigil_peer_bad_mac_total",
            "counter",
            "Peer frames whose MAC failed (each closed its connection).",
            self.counters.bad_mac,
        );
        metrics::render_scalar(
            out,
            "vigil_peer_bad_frames_total",
            "counter",
            "Undecodable frames on authenticated peer connections (each closed it).",
            self.counters.bad_frames,
        );
        metrics::render_scalar(
            out,
            "vigil_peer_handshakes_total",
            "counter",
            "Peer handshakes that finished.",
            self.counters.handshakes,
        );
        metrics::render_scalar(
            out,
            "vigil_peer_io_refused_total",
            "counter",
            "Peer connections closed because the I/O layer had no buffer or operation slot.",
            self.counters.io_refused,
        );
        metrics::render_scalar(
            out,
            "vigil_peer_accept_errors_total",
            "counter",
            "Failed accepts on the peer listener (each was resubmitted).",
            self.counters.accept_errors,
        );
        metrics::render_scalar(
            out,
            "vigil_peer_pending_handshakes",
            "gauge",
            "Accepted peer connections still in their handshake.",
            self.conns.values().filter(|c| c.pending_inbound()).count() as u64,
        );
        out.push_str(
            "# HELP vigil_peer_handshake_failures_total Failed peer handshakes by reason.\n\
             # TYPE vigil_peer_handshake_failures_total counter\n",
        );
        for (reason, n) in &self.counters.handshake_failures {
            out.push_str(&format!(
                "vigil_peer_handshake_failures_total{{reason=\"{reason}\"}} {n}\n"
            ));
        }
    }

    /// Closes every connection (shutdown): cancels their operations and reports nothing.
    /// The fds of connections with operations still in flight stay open until the
    /// transport is dropped; drop the `Io` before (it waits for what it cancelled), or
    /// keep dispatching completions until [`Peers::closing`] is 0.
    pub fn close_all(&mut self, io: &mut Io) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        let mut events = Vec::new();
        for id in ids {
            self.close(io, id, &mut events);
        }
    }

    /// Closed connections still waiting for completions of their cancelled operations.
    pub fn closing(&self) -> usize {
        self.closing.len()
    }
}

impl Transport for Peers {
    fn send(&mut self, message: &Message, payload: Payload<'_>) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        codec::encode_message(message, payload, &mut buf);
        self.send_frame(message.to, codec::KIND_RAFT, &buf);
        self.scratch = buf;
    }
}

impl Conn {
    fn new(fd: OwnedFd, peer: NodeId, inbound: bool, auth: Auth, now: Instant) -> Conn {
        Conn {
            fd,
            peer,
            inbound,
            from_member_ip: false,
            auth,
            deadline: now.saturating_add(Duration::from_millis(limits::PEER_HANDSHAKE_TIMEOUT_MS)),
            rbuf: Vec::new(),
            queue: SendQueue::new(limits::PEER_SEND_QUEUE_BYTES),
            broken: false,
            closed_by_peer: false,
            recv_buffer: None,
            send_buffer: None,
            recv_in_flight: false,
            send_in_flight: false,
            connect_in_flight: false,
        }
    }
}

/// The IP address at the other end of a TCP connection.
fn peer_ip(fd: &OwnedFd) -> Option<std::net::IpAddr> {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is writable for `len` bytes; getpeername writes at most that.
    let rc = unsafe {
        libc::getpeername(
            fd.as_raw_fd(),
            &mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr,
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    socket::sockaddr_to(&storage).map(|a| a.ip())
}

#[cfg(test)]
mod tests;
