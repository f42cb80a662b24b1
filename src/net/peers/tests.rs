//! The transport between two `Peers` in this process over loopback, on both io backends:
//! a close by the other end is reported as such, a close with a receive in flight keeps
//! the fd and the buffers until the cancelled receive completes, a frame larger than a
//! slab buffer arrives whole and in order, a node out of buffers closes connections
//! instead of failing, and a failed accept is paused or resubmitted by its error.

use super::*;
use crate::auth::ClusterKey;
use crate::io::{Backend, BackendChoice, Config};

const LISTEN_KIND: u64 = 1;

fn io_for(backend: Backend, buffer_count: usize, buffer_bytes: usize) -> Option<Io> {
    let config = Config {
        backend: match backend {
            Backend::Uring => BackendChoice::Uring,
            Backend::Epoll => BackendChoice::Epoll,
        },
        ring_entries: 256,
        max_in_flight: 256,
        buffer_count,
        buffer_bytes,
        fail_uring_setup: None,
    };
    match Io::new(&config) {
        Ok(io) => Some(io),
        Err(e) => {
            assert_eq!(backend, Backend::Uring, "epoll always works: {e}");
            eprintln!("skipped: io_uring is not available here ({e})");
            None
        }
    }
}

/// One side: the `Io` first, so that it drops (draining what it has in flight) before
/// the transport closes its fds.
struct Side {
    io: Io,
    peers: Peers,
    events: Vec<PeerEvent>,
    /// Free buffers when the side was made (nothing held yet).
    start_free: usize,
    /// The kind of every completion dispatched, in order.
    seen: Vec<OpKind>,
}

impl Side {
    /// One loop turn as the node runs it: dial, send, wait a little, dispatch.
    fn turn(&mut self) {
        let now = Instant::now();
        self.peers.maintain(&mut self.io, now, &mut self.events);
        self.peers.flush(&mut self.io);
        let mut out = [Completion::EMPTY; 64];
        let deadline = now.saturating_add(Duration::from_millis(1));
        let n = self.io.wait(Some(deadline), &mut out).unwrap();
        for c in out[..n].iter().copied() {
            assert!(self.peers.owns(c.token), "token {:#x}", c.token);
            self.seen.push(c.kind);
            self.peers
                .on_completion(&mut self.io, c, Instant::now(), &mut self.events)
                .unwrap();
        }
    }

    fn lost(&self, peer: NodeId) -> Option<bool> {
        self.events.iter().find_map(|e| match e {
            PeerEvent::Lost { peer: p, by_peer } if *p == peer => Some(*by_peer),
            _ => None,
        })
    }

    /// The live connection bound to `peer`: its id and fd.
    fn conn_to(&self, peer: NodeId) -> (u64, RawFd) {
        let id = self
            .peers
            .slots
            .iter()
            .find(|s| s.id == peer)
            .and_then(|s| s.conn)
            .expect("a connection to the peer");
        (id, self.peers.conns[&id].fd.as_raw_fd())
    }
}

fn listener() -> (OwnedFd, SocketAddr) {
    let fd = socket::tcp_listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let addr = socket::local_addr(fd.as_raw_fd()).unwrap();
    (fd, addr)
}

/// Nodes 1 and 2 (1 dials), connected and authenticated.
fn connected_pair(backend: Backend, buffer_count: usize, buffer_bytes: usize) -> Option<[Side; 2]> {
    let keys = KeyRing::new(ClusterKey::from_bytes([7; crate::auth::KEY_BYTES]), None);
    let (l1, a1) = listener();
    let (l2, a2) = listener();
    let members = [(1, a1), (2, a2)];
    let make = |id: NodeId, l: OwnedFd| -> Option<Side> {
        let mut io = io_for(backend, buffer_count, buffer_bytes)?;
        let start_free = io.buffers_free();
        let mut peers = Peers::new(id, &members, 42 + id, keys.clone());
        peers.listen(&mut io, LISTEN_KIND, l).unwrap();
        Some(Side {
            io,
            peers,
            events: Vec::new(),
            start_free,
            seen: Vec::new(),
        })
    };
    let mut pair = [make(1, l1)?, make(2, l2)?];
    run_until(&mut pair, "the handshake", |s| {
        s[0].peers.is_connected(2) && s[1].peers.is_connected(1)
    });
    Some(pair)
}

fn run_until(sides: &mut [Side], what: &str, mut done: impl FnMut(&[Side]) -> bool) {
    let start = Instant::now();
    while !done(sides) {
        assert!(
            Instant::now().saturating_duration_since(start) < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        for side in sides.iter_mut() {
            side.turn();
        }
    }
}

/// The identity of the file an fd number names now (None: the number is closed).
fn file_of(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: stat is plain old data; fstat writes it whole or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable; an fd number that is not open gives EBADF.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    (rc == 0).then_some((st.st_dev, st.st_ino))
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn uring() {
                super::$name(crate::io::Backend::Uring)
            }
            #[test]
            fn epoll() {
                super::$name(crate::io::Backend::Epoll)
            }
        }
    )*};
}

both_backends!(
    closed_by_the_other_end_is_lost_by_peer,
    close_with_a_receive_in_flight_waits_for_its_completion,
    frames_larger_than_a_buffer_arrive_whole_and_in_order,
    out_of_buffers_closes_the_connection,
    accept_errors_pause_or_resubmit,
);

/// The other end's process goes away (its sockets close): Lost says `by_peer`. This
/// node dropping a connection says not `by_peer` here, and `by_peer` at the other end.
fn closed_by_the_other_end_is_lost_by_peer(backend: Backend) {
    let Some([mut one, two]) = connected_pair(backend, 16, 64 * 1024) else {
        return;
    };
    drop(two); // as when its process died: every fd of it closes
    run_until(std::slice::from_mut(&mut one), "Lost at node 1", |s| {
        s[0].lost(2).is_some()
    });
    assert_eq!(one.lost(2), Some(true), "the peer closed: {:?}", one.events);

    let Some(mut pair) = connected_pair(backend, 16, 64 * 1024) else {
        return;
    };
    // Node 1 forgets node 2: it closes the connection itself.
    let [one, _] = &mut pair;
    assert!(one.peers.set_members(&mut one.io, &[], &mut one.events));
    assert_eq!(
        one.lost(2),
        Some(false),
        "reported when the close starts, as closed here"
    );
    run_until(&mut pair, "Lost at node 2", |s| s[1].lost(1).is_some());
    assert_eq!(
        pair[1].lost(1),
        Some(true),
        "node 1 closed it: {:?}",
        pair[1].events
    );
}

/// Closing a connection whose receive is in flight: the fd stays open until the
/// cancelled receive completed, then closes; every buffer goes back to the slab.
fn close_with_a_receive_in_flight_waits_for_its_completion(backend: Backend) {
    let Some(mut pair) = connected_pair(backend, 16, 64 * 1024) else {
        return;
    };
    // Idle: both queues drained (the sends' buffers went back), receives in flight.
    run_until(&mut pair, "idle connections", |s| {
        s.iter()
            .all(|side| side.peers.conns.values().all(|c| c.send_buffer.is_none()))
    });
    let [one, _] = &mut pair;
    let (id, fd) = one.conn_to(2);
    assert!(one.peers.conns[&id].recv_in_flight);
    let file = file_of(fd).expect("the connection's fd is open");
    assert_eq!(
        one.io.buffers_free(),
        one.start_free - 1,
        "one receive buffer held"
    );

    one.peers.set_members(&mut one.io, &[], &mut one.events);
    assert_eq!(one.peers.closing(), 1, "waiting for the cancelled receive");
    assert_eq!(
        file_of(fd),
        Some(file),
        "the fd stays open until it completed"
    );
    assert_eq!(
        one.io.buffers_free(),
        one.start_free - 1,
        "its buffer is still lent"
    );

    run_until(std::slice::from_mut(one), "the close to finish", |s| {
        s[0].peers.closing() == 0
    });
    // Closed: the number is free, or (tests run in parallel) names another file now.
    assert_ne!(file_of(fd), Some(file), "the fd was closed");
    assert_eq!(
        one.io.buffers_free(),
        one.start_free,
        "every buffer is back"
    );
    assert_eq!(one.io.in_flight(), limits::PEER_ACCEPTS_IN_FLIGHT);
}

/// With 4 KiB buffers, frames of 100 KiB go out in many sends and come in through many
/// receives: each arrives whole, in the order sent, in both directions.
fn frames_larger_than_a_buffer_arrive_whole_and_in_order(backend: Backend) {
    const BUFFER: usize = 4096;
    let Some(mut pair) = connected_pair(backend, 16, BUFFER) else {
        return;
    };
    let body = |from: u64, i: u64| -> Vec<u8> {
        (0..100 * 1024u64)
            .map(|j| (j * 7 + i * 31 + from) as u8)
            .collect()
    };
    for (from, to) in [(0usize, 2u64), (1, 1)] {
        for i in 1..=3u64 {
            let request = codec::ForwardRequest {
                id: i,
                method: 1,
                path: "/kv/big",
                body: &body(from as u64, i),
            };
            assert!(pair[from].peers.send_forward_request(to, &request));
        }
        assert!(pair[from]
            .peers
            .conns
            .values()
            .all(|c| c.queue.len() > 3 * BUFFER));
    }
    run_until(&mut pair, "three requests each way", |s| {
        s.iter().all(|side| {
            side.events
                .iter()
                .filter(|e| matches!(e, PeerEvent::ForwardRequest { .. }))
                .count()
                == 3
        })
    });
    for (side, from) in [(1usize, 0u64), (0, 1)] {
        let got: Vec<(u64, &Vec<u8>)> = pair[side]
            .events
            .iter()
            .filter_map(|e| match e {
                PeerEvent::ForwardRequest { id, body, .. } => Some((*id, body)),
                _ => None,
            })
            .collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 2, 3]);
        for (i, b) in got {
            assert!(
                *b == body(from, i),
                "request {i} to node {} differs",
                side + 1
            );
        }
    }
    for side in &pair {
        assert_eq!(
            side.peers.counters.bad_frames + side.peers.counters.bad_mac,
            0
        );
    }
}

/// A node with a single buffer: the accepted connection takes it for its receive, so
/// its handshake reply finds no buffer. The connection is closed and counted, nothing
/// panics, and the buffer comes back.
fn out_of_buffers_closes_the_connection(backend: Backend) {
    let keys = KeyRing::new(ClusterKey::from_bytes([9; crate::auth::KEY_BYTES]), None);
    let (l1, a1) = listener();
    let (l2, a2) = listener();
    let members = [(1, a1), (2, a2)];
    let mut sides = Vec::new();
    for (id, l, buffers) in [(1, l1, 16), (2, l2, 1)] {
        let Some(mut io) = io_for(backend, buffers, 64 * 1024) else {
            return;
        };
        let start_free = io.buffers_free();
        let mut peers = Peers::new(id, &members, 7, keys.clone());
        peers.listen(&mut io, LISTEN_KIND, l).unwrap();
        sides.push(Side {
            io,
            peers,
            events: Vec::new(),
            start_free,
            seen: Vec::new(),
        });
    }
    run_until(&mut sides, "a refused connection", |s| {
        s[1].peers.counters.io_refused > 0
    });
    run_until(&mut sides, "its close", |s| {
        s[1].peers.closing() == 0 && s[1].peers.conns.is_empty()
    });
    assert!(!sides[1].peers.is_connected(1));
    assert_eq!(sides[1].io.buffers_free(), sides[1].start_free);
}

/// An accept that failed for lack of descriptors is resubmitted only after a pause (a
/// timeout operation, then the accept); another error resubmits the accept at once; a
/// cancelled one (shutdown) is not resubmitted.
fn accept_errors_pause_or_resubmit(backend: Backend) {
    let Some(mut io) = io_for(backend, 4, 4096) else {
        return;
    };
    let (l, addr) = listener();
    let keys = KeyRing::new(ClusterKey::from_bytes([3; crate::auth::KEY_BYTES]), None);
    let mut peers = Peers::new(1, &[(1, addr)], 5, keys);
    peers.listen(&mut io, LISTEN_KIND, l).unwrap();
    assert_eq!(io.in_flight(), limits::PEER_ACCEPTS_IN_FLIGHT);
    let mut side = Side {
        start_free: io.buffers_free(),
        io,
        peers,
        events: Vec::new(),
        seen: Vec::new(),
    };
    for slot in 0..limits::PEER_ACCEPTS_IN_FLIGHT as u64 {
        side.io.cancel(token(LISTEN_KIND, slot)).unwrap();
    }
    run_until(
        std::slice::from_mut(&mut side),
        "the cancelled accepts",
        |s| s[0].io.in_flight() == 0,
    );
    assert!(side.seen.iter().all(|k| *k == OpKind::Accept));
    side.seen.clear();

    let failed = |slot: u64, errno: i32| Completion {
        token: token(LISTEN_KIND, slot),
        kind: OpKind::Accept,
        result: Err(Errno(errno)),
        buffer: None,
    };
    let now = Instant::now();
    let mut events = Vec::new();
    side.peers
        .on_completion(&mut side.io, failed(0, libc::EMFILE), now, &mut events)
        .unwrap();
    assert_eq!(side.io.in_flight(), 1, "one operation: the pause");
    let _client = std::net::TcpStream::connect(addr).unwrap();
    run_until(
        std::slice::from_mut(&mut side),
        "the client accepted",
        |s| s[0].peers.conns.len() == 1,
    );
    assert_eq!(
        side.seen,
        [OpKind::Timeout, OpKind::Accept],
        "the accept came back after the pause"
    );
    side.seen.clear();

    side.peers
        .on_completion(
            &mut side.io,
            failed(1, libc::ECONNABORTED),
            now,
            &mut events,
        )
        .unwrap();
    let _second = std::net::TcpStream::connect(addr).unwrap();
    run_until(
        std::slice::from_mut(&mut side),
        "the second client accepted",
        |s| s[0].peers.conns.len() == 2,
    );
    assert_eq!(side.seen, [OpKind::Accept], "resubmitted at once");
    assert_eq!(side.peers.counters.accept_errors, 2);
    assert!(events.is_empty());
    assert!(
        side.io.buffers_free() < side.start_free,
        "the two receive buffers"
    );
}
