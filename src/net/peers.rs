//! Peer connections: one TCP connection per peer pair, the lower node id dials.
//!
//! Each connection starts with a hello frame naming the sender's node id (its cluster
//! key field is the seam for authentication, see `codec`). The dialer reconnects with
//! capped exponential backoff and jitter. Every connection has a bounded send queue:
//! when a peer is too slow to drain it, the connection is dropped (and redialled), so
//! memory never grows without bound. Reads go through `Io::poll_in` readiness, then
//! non-blocking `recv` into a read buffer bounded by the maximum frame size; writes are
//! non-blocking `send` from the queue, retried each loop turn while bytes are pending.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::backoff::Backoff;
use super::codec::{self, OwnedPayload};
use super::frame;
use super::send_queue::SendQueue;
use crate::io::{socket, Instant, Io};
use crate::limits;
use crate::raft::{Message, NodeId, Payload, Transport};

/// Token kinds for peer operations (the top byte of an I/O token).
pub const TOKEN_PEER_POLL: u64 = 2;
pub const TOKEN_PEER_CONNECT: u64 = 3;

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
    /// The connection to this peer closed or failed.
    Lost(NodeId),
}

struct Conn {
    fd: OwnedFd,
    /// The peer, once known (dialled, or its hello arrived).
    peer: NodeId,
    /// Outbound connection still connecting.
    connecting: bool,
    rbuf: Vec<u8>,
    queue: SendQueue,
    broken: bool,
}

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
    slots: Vec<Slot>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    scratch: Vec<u8>,
    rng: u64,
    /// Frames dropped because the peer was not connected or its queue was full.
    pub dropped_frames: u64,
}

impl Peers {
    pub fn new(me: NodeId, peers: &[(NodeId, SocketAddr)], seed: u64) -> Peers {
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
            slots,
            conns: HashMap::new(),
            next_conn: 1,
            scratch: Vec::with_capacity(limits::MAX_FRAME_BYTES),
            rng: seed | 1,
            dropped_frames: 0,
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

    pub fn is_connected(&self, peer: NodeId) -> bool {
        self.slots
            .iter()
            .find(|s| s.id == peer)
            .and_then(|s| s.conn)
            .and_then(|c| self.conns.get(&c))
            .is_some_and(|c| !c.connecting && !c.broken)
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
        let mut next: Option<Instant> = None;
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
            self.conns.insert(id, Conn::new(fd, peer, true));
            self.slots[i].conn = Some(id);
        }
        next
    }

    fn schedule_dial(&mut self, slot: usize, now: Instant) {
        let r = self.random();
        let delay = self.slots[slot].backoff.next_delay_ns(r);
        self.slots[slot].next_dial = now.saturating_add(std::time::Duration::from_nanos(delay));
    }

    /// A new inbound connection (accepted by the node).
    pub fn accepted(&mut self, io: &mut Io, fd: OwnedFd) {
        let _ = socket::set_tcp_nodelay(fd.as_raw_fd());
        let id = self.next_conn;
        self.next_conn += 1;
        let raw = fd.as_raw_fd();
        let mut conn = Conn::new(fd, 0, false);
        self.scratch.clear();
        codec::encode_hello(self.me, &mut self.scratch);
        let _ = conn.queue.push_frame(codec::KIND_HELLO, &self.scratch);
        if io.poll_in(token(TOKEN_PEER_POLL, id), raw).is_ok() {
            self.conns.insert(id, conn);
        }
    }

    /// An outbound connect finished.
    pub fn connected(
        &mut self,
        io: &mut Io,
        id: u64,
        result: Result<u32, crate::io::Errno>,
        now: Instant,
        events: &mut Vec<PeerEvent>,
    ) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let peer = conn.peer;
        match result {
            Ok(_) => {
                conn.connecting = false;
                self.scratch.clear();
                codec::encode_hello(self.me, &mut self.scratch);
                let _ = conn.queue.push_frame(codec::KIND_HELLO, &self.scratch);
                let raw = conn.fd.as_raw_fd();
                if io.poll_in(token(TOKEN_PEER_POLL, id), raw).is_err() {
                    conn.broken = true;
                }
                log::info!("peer {peer}: connected");
                if let Some(i) = self.slots.iter().position(|s| s.id == peer) {
                    self.slots[i].backoff.reset();
                }
            }
            Err(e) => {
                log::debug!("peer {peer}: connect failed: {}", e.io_error());
                self.conns.remove(&id);
                if let Some(i) = self.slots.iter().position(|s| s.id == peer) {
                    self.slots[i].conn = None;
                    self.schedule_dial(i, now);
                }
                let _ = events;
            }
        }
    }

    /// The connection is readable: reads what is there, decodes frames, re-arms.
    pub fn readable(&mut self, io: &mut Io, id: u64, now: Instant, events: &mut Vec<PeerEvent>) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut closed = false;
        loop {
            if conn.rbuf.len() >= limits::MAX_FRAME_BYTES {
                break;
            }
            let room = (limits::MAX_FRAME_BYTES - conn.rbuf.len()).min(64 * 1024);
            let len = conn.rbuf.len();
            conn.rbuf.resize(len + room, 0);
            // SAFETY: the pointer and length describe the writable tail of rbuf.
            let n = unsafe {
                libc::recv(
                    conn.fd.as_raw_fd(),
                    conn.rbuf[len..].as_mut_ptr() as *mut libc::c_void,
                    room,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                conn.rbuf.truncate(len);
                if n == 0 {
                    closed = true;
                } else {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                        _ => closed = true,
                    }
                }
                break;
            }
            conn.rbuf.truncate(len + n as usize);
        }
        // Decode every whole frame.
        let mut at = 0;
        let mut bad = false;
        let mut hello = None;
        while !bad {
            match frame::decode(&conn.rbuf[at..]) {
                Ok(None) => break,
                Err(e) => {
                    log::warn!("peer {}: bad frame: {e}; closing", conn.peer);
                    bad = true;
                }
                Ok(Some(f)) => {
                    at += f.consumed;
                    match f.kind {
                        codec::KIND_HELLO => match codec::decode_hello(f.payload) {
                            Ok(node) if conn.peer == 0 || conn.peer == node => {
                                if conn.peer == 0 {
                                    if self.slots.iter().any(|s| s.id == node) {
                                        conn.peer = node;
                                        hello = Some(node);
                                    } else {
                                        log::warn!("hello from unknown node {node}; closing");
                                        bad = true;
                                    }
                                }
                            }
                            Ok(node) => {
                                log::warn!(
                                    "hello from {node} on the connection to {}; closing",
                                    conn.peer
                                );
                                bad = true;
                            }
                            Err(e) => {
                                log::warn!("bad hello: {e}; closing");
                                bad = true;
                            }
                        },
                        _ if conn.peer == 0 => {
                            log::warn!("frame kind {} before hello; closing", f.kind);
                            bad = true;
                        }
                        codec::KIND_RAFT => match codec::decode_message(f.payload) {
                            Ok((m, p)) if m.from == conn.peer && m.to == self.me => {
                                events.push(PeerEvent::Raft(m, p))
                            }
                            Ok((m, _)) => {
                                log::warn!(
                                    "peer {}: message from {} to {} on its connection; closing",
                                    conn.peer,
                                    m.from,
                                    m.to
                                );
                                bad = true;
                            }
                            Err(e) => {
                                log::warn!("peer {}: bad raft message: {e}; closing", conn.peer);
                                bad = true;
                            }
                        },
                        codec::KIND_FORWARD_REQUEST => {
                            match codec::decode_forward_request(f.payload) {
                                Ok(r) => events.push(PeerEvent::ForwardRequest {
                                    from: conn.peer,
                                    id: r.id,
                                    method: r.method,
                                    path: r.path.to_string(),
                                    body: r.body.to_vec(),
                                }),
                                Err(e) => {
                                    log::warn!(
                                        "peer {}: bad forward request: {e}; closing",
                                        conn.peer
                                    );
                                    bad = true;
                                }
                            }
                        }
                        codec::KIND_FORWARD_RESPONSE => {
                            match codec::decode_forward_response(f.payload) {
                                Ok((rid, status, body)) => {
                                    events.push(PeerEvent::ForwardResponse {
                                        id: rid,
                                        status,
                                        body: body.to_vec(),
                                    })
                                }
                                Err(e) => {
                                    log::warn!(
                                        "peer {}: bad forward response: {e}; closing",
                                        conn.peer
                                    );
                                    bad = true;
                                }
                            }
                        }
                        other => {
                            log::warn!("peer {}: unknown frame kind {other}; closing", conn.peer);
                            bad = true;
                        }
                    }
                }
            }
        }
        conn.rbuf.drain(..at);
        let peer = conn.peer;
        let raw = conn.fd.as_raw_fd();
        if let Some(node) = hello {
            // Bind the connection to the peer's slot; an older connection is replaced.
            if let Some(slot) = self.slots.iter_mut().find(|s| s.id == node) {
                if let Some(old) = slot.conn.replace(id) {
                    if old != id {
                        if let Some(o) = self.conns.get_mut(&old) {
                            o.broken = true;
                        }
                    }
                }
                log::info!("peer {node}: accepted");
            }
        }
        if peer != 0 && at > 0 {
            if let Some(slot) = self.slots.iter_mut().find(|s| s.id == peer) {
                slot.last_received = Some(now);
            }
        }
        if closed || bad || io.poll_in(token(TOKEN_PEER_POLL, id), raw).is_err() {
            self.close(io, id, events);
        }
    }

    fn close(&mut self, io: &mut Io, id: u64, events: &mut Vec<PeerEvent>) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        let _ = io.cancel(token(TOKEN_PEER_POLL, id));
        let _ = io.cancel(token(TOKEN_PEER_CONNECT, id));
        let now = Instant::now();
        if let Some(i) = self.slots.iter().position(|s| s.conn == Some(id)) {
            self.slots[i].conn = None;
            self.schedule_dial(i, now);
            log::info!("peer {}: connection lost", self.slots[i].id);
            events.push(PeerEvent::Lost(self.slots[i].id));
        }
        drop(conn.fd);
    }

    /// Sends what the queues hold; returns true if bytes are still pending.
    pub fn flush(&mut self) -> bool {
        let mut pending = false;
        for conn in self.conns.values_mut() {
            if conn.connecting || conn.broken {
                continue;
            }
            while !conn.queue.is_empty() {
                let bytes = conn.queue.pending();
                // SAFETY: `bytes` is a valid readable slice.
                let n = unsafe {
                    libc::send(
                        conn.fd.as_raw_fd(),
                        bytes.as_ptr() as *const libc::c_void,
                        bytes.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => pending = true,
                        Some(libc::EINTR) => continue,
                        _ => conn.broken = true,
                    }
                    break;
                }
                conn.queue.consume(n as usize);
            }
        }
        pending
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
        if conn.connecting || conn.broken {
            self.dropped_frames += 1;
            return false;
        }
        if let Err(full) = conn.queue.push_frame(kind, payload) {
            log::warn!("peer {peer}: {full}; dropping the connection");
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

    /// Closes every connection (shutdown).
    pub fn close_all(&mut self, io: &mut Io) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        let mut events = Vec::new();
        for id in ids {
            self.close(io, id, &mut events);
        }
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
    fn new(fd: OwnedFd, peer: NodeId, connecting: bool) -> Conn {
        Conn {
            fd,
            peer,
            connecting,
            rbuf: Vec::new(),
            queue: SendQueue::new(limits::PEER_SEND_QUEUE_BYTES),
            broken: false,
        }
    }
}

/// Accepts every pending connection on a non-blocking listener.
pub fn accept_all(listener: &OwnedFd) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    loop {
        // SAFETY: null address pointers are allowed; flags are valid.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            break;
        }
        // SAFETY: accept4 returned a new descriptor that nobody else owns.
        out.push(unsafe { OwnedFd::from_raw_fd(fd) });
        if out.len() >= limits::MAX_ACCEPT_PER_TURN {
            break;
        }
    }
    out
}
