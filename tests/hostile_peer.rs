//! Hostile bytes on a live agent's peer port: before the handshake (garbage, wrong
//! magic or version, oversized, truncated, strangers, wrong keys, forged proofs) and
//! after a genuine handshake (bad MACs, oversized, wrong-version and undecodable frames).
//! Each connection must be closed by the node and counted in /metrics, and the node must
//! keep serving: a put still commits, the process did not exit.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::Cluster;
use vigil::auth::{handshake, ClusterKey, Handshake, KeyRing, Session, Step};
use vigil::net::frame;

/// Whether the node closes the connection within `limit` (anything it sends meanwhile is
/// read and dropped).
fn closed_by_node(s: &mut TcpStream, limit: Duration) -> bool {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    false
}

fn send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    // The node may close before everything is written; that is a pass, not an error.
    let _ = s.write_all(bytes);
    s
}

fn hello(keys: &KeyRing, from: u64, to: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = Handshake::initiator(keys, from, to, handshake::fresh_nonce().unwrap(), &mut out);
    out
}

/// Runs the initiator's side of a genuine handshake claiming to be member `from`.
fn authenticate(addr: SocketAddr, keys: &KeyRing, from: u64, to: u64) -> (TcpStream, Session) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let mut hs = Handshake::initiator(keys, from, to, handshake::fresh_nonce().unwrap(), &mut out);
    s.write_all(&out).unwrap();
    let mut input = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).expect("the challenge");
        assert!(
            n > 0,
            "the node closed the connection during a genuine handshake"
        );
        input.extend_from_slice(&buf[..n]);
        out.clear();
        match hs.receive(&input, &|_| true, &mut out).expect("handshake") {
            Step::NeedMore => continue,
            Step::Continue { .. } => panic!("the initiator finishes on the challenge"),
            Step::Established(e) => {
                s.write_all(&out).unwrap();
                return (s, e.session);
            }
        }
    }
}

fn sealed(session: &mut Session, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(kind, payload, &mut out);
    session.sealer.seal(&mut out, 0).unwrap();
    out
}

/// Builds one hostile frame for an authenticated connection.
type MakeFrame = Box<dyn Fn(&mut Session) -> Vec<u8>>;

fn failures(c: &Cluster, node: u64, reason: &str) -> f64 {
    c.metric(
        node,
        &format!("vigil_peer_handshake_failures_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn hostile_peer_bytes_close_the_connection_and_the_node_keeps_serving() {
    let mut c = Cluster::start("hostile-peer", 3, "auto");
    let leader = c.wait_leader();
    let addr = c.peer_addr(leader);
    let key = ClusterKey::load(&c.key_file()).unwrap();
    let keys = KeyRing::new(key, None);
    let other = ClusterKey::generate().unwrap();
    let wrong_keys = KeyRing::new(other, None);
    let member = if leader == 1 { 2 } else { 1 };
    let limit = Duration::from_secs(10);

    // Before the handshake.
    let mut garbage = vec![0u8; 1000];
    vigil::auth::key::fill_random(&mut garbage).unwrap();
    let mut old_frame = Vec::new();
    frame::encode(1, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut old_frame);
    let mut wrong_version = hello(&keys, member, leader);
    wrong_version[4] = 9;
    let mut oversized = hello(&keys, member, leader);
    oversized[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", garbage),
        ("an unauthenticated frame", old_frame),
        ("a wrong handshake version", wrong_version),
        ("an oversized hello", oversized),
        ("a hello from a stranger", hello(&keys, 99, leader)),
        (
            "a hello with another key",
            hello(&wrong_keys, member, leader),
        ),
        (
            "a hello claiming the node's own id",
            hello(&keys, leader, leader),
        ),
        (
            "a hello addressed to another node",
            hello(&keys, member, 77),
        ),
    ];
    for (what, bytes) in &cases {
        let mut s = send(addr, bytes);
        assert!(
            closed_by_node(&mut s, limit),
            "{what}: not closed\n{}",
            c.logs()
        );
    }
    assert!(failures(&c, leader, "malformed") >= 4.0, "{}", c.logs());
    assert!(failures(&c, leader, "unknown_node") >= 1.0);
    assert!(failures(&c, leader, "no_common_key") >= 1.0);
    assert!(failures(&c, leader, "own_id") >= 1.0);
    assert!(failures(&c, leader, "wrong_destination") >= 1.0);

    // A forged proof: an honest hello, then 32 random bytes as the proof.
    let mut s = send(addr, &hello(&keys, member, leader));
    let mut challenge = [0u8; handshake::MAX_MESSAGE_BYTES];
    s.set_read_timeout(Some(limit)).unwrap();
    s.read_exact(&mut challenge).expect("a challenge");
    let mut proof = b"VGLH\x01\x03\x20\x00".to_vec();
    proof.extend_from_slice(&[0x5a; 32]);
    let _ = s.write_all(&proof);
    assert!(closed_by_node(&mut s, limit), "forged proof: not closed");
    assert!(failures(&c, leader, "bad_proof") >= 1.0);

    // A truncated hello: the node waits for the rest until the handshake timeout.
    let truncated = hello(&keys, member, leader);
    let mut s = send(addr, &truncated[..truncated.len() / 2]);
    assert!(closed_by_node(&mut s, limit), "truncated hello: not closed");
    assert!(failures(&c, leader, "timeout") >= 1.0);

    // After a genuine handshake (the test holds the cluster key and claims a member's id).
    // That member is stopped first, so that its own reconnects cannot replace the test's
    // connection before its frame is read; two voters still commit.
    c.kill9(member);
    let bad_mac_before = c.metric(leader, "vigil_peer_bad_mac_total").unwrap();
    let bad_frames_before = c.metric(leader, "vigil_peer_bad_frames_total").unwrap();
    let frames: Vec<(&str, MakeFrame)> = vec![
        (
            "a flipped MAC",
            Box::new(|s: &mut Session| {
                let mut f = sealed(s, 2, b"anything");
                *f.last_mut().unwrap() ^= 1;
                f
            }),
        ),
        (
            "a MAC under another session",
            Box::new(|_: &mut Session| {
                let mut other = Session::new(&[7; 32], &[8; 32]);
                sealed(&mut other, 2, b"anything")
            }),
        ),
        (
            "an undecodable raft message",
            Box::new(|s: &mut Session| sealed(s, 2, &[0xff; 40])),
        ),
        (
            "the retired hello kind",
            Box::new(|s: &mut Session| sealed(s, 1, &[0; 10])),
        ),
        (
            "a wrong frame version",
            Box::new(|s: &mut Session| {
                let mut f = sealed(s, 2, b"x");
                f[4] = 7;
                f
            }),
        ),
        (
            "an oversized frame header",
            Box::new(|_: &mut Session| {
                let mut f = Vec::new();
                frame::encode(2, b"", &mut f);
                f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
                f
            }),
        ),
    ];
    for (what, make) in &frames {
        let (mut s, mut session) = authenticate(addr, &keys, member, leader);
        let _ = s.write_all(&make(&mut session));
        assert!(
            closed_by_node(&mut s, limit),
            "{what}: not closed\n{}",
            c.logs()
        );
    }
    let bad_mac = c.metric(leader, "vigil_peer_bad_mac_total").unwrap();
    let bad_frames = c.metric(leader, "vigil_peer_bad_frames_total").unwrap();
    assert!(
        bad_mac >= bad_mac_before + 2.0,
        "bad MACs {bad_mac_before} -> {bad_mac}"
    );
    assert!(
        bad_frames >= bad_frames_before + 4.0,
        "bad frames {bad_frames_before} -> {bad_frames}"
    );

    // A truncated sealed frame is waited for; the node closes when the peer does.
    let (mut s, mut session) = authenticate(addr, &keys, member, leader);
    let f = sealed(&mut session, 2, &[0; 100]);
    s.write_all(&f[..f.len() - 10]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed_by_node(&mut s, limit), "truncated frame: not closed");

    // The node kept serving, and no process died.
    c.put_retry("after-hostile-peers", "ok");
    assert_eq!(
        c.get_retry(leader, "after-hostile-peers").as_deref(),
        Some("ok")
    );
    for id in (1..=3).filter(|&id| id != member) {
        assert!(c.running(id), "node {id} exited\n{}", c.logs());
    }
}

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8).
fn connect_from(from: std::net::Ipv4Addr, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns, with valid
    // sockaddr_in values and their size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let local = sin(from, 0);
        assert_eq!(
            libc::bind(fd, &local as *const _ as *const libc::sockaddr, len),
            0
        );
        let remote = sin(*to.ip(), to.port());
        assert_eq!(
            libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len),
            0
        );
        TcpStream::from_raw_fd(fd)
    }
}

#[test]
fn handshakes_beyond_the_pending_limit_are_closed_at_once() {
    let mut c = Cluster::start("hostile-pending", 3, "auto");
    let leader = c.wait_leader();
    let addr = c.peer_addr(leader);
    let limit = vigil::limits::MAX_PENDING_HANDSHAKES;
    // Silent connections hold the pending slots (until the handshake timeout).
    let mut silent: Vec<TcpStream> = (0..limit)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // Let the node accept them all before the extra ones arrive.
    let start = Instant::now();
    while c
        .metric(leader, "vigil_peer_pending_handshakes")
        .unwrap_or(0.0)
        < limit as f64
    {
        assert!(
            start.elapsed() < common::LIMIT,
            "pending handshakes never reached the limit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..8 {
        let mut extra = TcpStream::connect(addr).unwrap();
        assert!(
            closed_by_node(&mut extra, Duration::from_secs(1)),
            "extra connection {i} was not closed at once"
        );
    }
    assert!(failures(&c, leader, "too_many_pending") >= 8.0);
    // Strangers (not from a member's IP address) have a pool of their own: the members'
    // pool being full does not close theirs at once, and their pool being full does not
    // close a connection from a member's address.
    let stranger_ip = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let mut strangers: Vec<TcpStream> = (0..limit)
        .map(|_| connect_from(stranger_ip, addr))
        .collect();
    // Let the node accept them, then one more stranger is one too many.
    std::thread::sleep(Duration::from_millis(200));
    let refused = failures(&c, leader, "too_many_pending");
    let mut extra = connect_from(stranger_ip, addr);
    assert!(
        closed_by_node(&mut extra, Duration::from_secs(1)),
        "extra stranger kept"
    );
    assert!(failures(&c, leader, "too_many_pending") > refused);
    for s in strangers.iter_mut().take(2) {
        assert!(
            !closed_by_node(s, Duration::from_millis(200)),
            "a stranger in its pool was closed before the handshake timeout"
        );
    }
    // The silent ones are cut at the handshake timeout.
    for s in silent.iter_mut().chain(strangers.iter_mut()) {
        assert!(
            closed_by_node(s, Duration::from_secs(10)),
            "silent connection kept"
        );
    }
    assert!(failures(&c, leader, "timeout") >= 2.0 * limit as f64);
    c.put_retry("after-pending", "ok");
    assert!(c.running(leader));
}
