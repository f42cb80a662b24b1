//! Real `vigil agent` processes on 127.0.0.1: elections, replication, the control API,
//! kill -9 / SIGSTOP of the leader, rolling restarts; each on both io backends.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Cluster;
use vigil::control::client::Client;

fn skip_uring(io: &str) -> bool {
    if io == "uring" && !common::uring_available() {
        eprintln!("skipped: io_uring is not available here");
        return true;
    }
    false
}

/// Writes keys continuously through whichever node answers, recording every
/// acknowledged write, while the main thread injects faults.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(c: &Cluster, prefix: &str) -> Writer {
        let sockets: Vec<_> = c.nodes.iter().map(|n| n.socket.clone()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s2, a2, prefix) = (stop.clone(), acked.clone(), prefix.to_string());
        let handle = std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut via = 0usize;
            while !s2.load(Ordering::Relaxed) {
                let key = format!("{prefix}-{seq}");
                let value = format!("v{seq}");
                let body = serde_json::json!({ "value": value }).to_string();
                let client = Client::new(&sockets[via % sockets.len()], Duration::from_secs(5));
                match client.request("PUT", &format!("/kv/{key}"), Some(body.as_bytes())) {
                    Ok(r) if r.status == 200 => {
                        a2.lock().unwrap().push((key, value));
                        seq += 1;
                    }
                    _ => {
                        // Not acknowledged: it may or may not have committed; use a new
                        // key so every acknowledged key has exactly one candidate value.
                        seq += 1;
                        via += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                via += 1;
            }
        });
        Writer {
            stop,
            acked,
            handle: Some(handle),
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn wait_acked(&self, n: usize, c: &Cluster) {
        let start = std::time::Instant::now();
        while self.acked() < n {
            assert!(
                start.elapsed() < common::LIMIT,
                "only {} writes acknowledged\n{}",
                self.acked(),
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(mut self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn check_all(c: &Cluster, acked: &[(String, String)]) {
    for id in c.alive() {
        for (k, v) in acked {
            assert_eq!(
                c.get_retry(id, k).as_deref(),
                Some(v.as_str()),
                "acknowledged {k} lost on node {id}\n{}",
                c.logs()
            );
        }
    }
}

fn kill9_leader(name: &str, n: usize, io: &str) {
    if skip_uring(io) {
        return;
    }
    let mut c = Cluster::start(name, n, io);
    let leader = c.wait_leader();
    // Status names the leader, the backend and every member.
    let s = c.status(leader).unwrap();
    assert_eq!(s["role"], "leader");
    assert_eq!(s["io_backend"], io);
    assert_eq!(s["members"].as_array().unwrap().len(), n);
    // Writes through every node (followers forward) commit and are readable everywhere.
    for id in 1..=n as u64 {
        let rev = c
            .put(id, &format!("through-{id}"), "x")
            .unwrap_or_else(|e| panic!("put via {id}: {e:?}\n{}", c.logs()));
        assert!(rev > 0);
    }
    let w = Writer::start(&c, "k");
    w.wait_acked(20, &c);
    c.kill9(leader);
    let before = w.acked();
    let new_leader = c.wait_leader();
    assert_ne!(new_leader, leader);
    w.wait_acked(before + 20, &c);
    let acked = w.finish();
    for id in 1..=n as u64 {
        for alive in c.alive() {
            assert_eq!(
                c.get_retry(alive, &format!("through-{id}")).as_deref(),
                Some("x")
            );
        }
    }
    check_all(&c, &acked);
}

#[test]
fn three_nodes_kill9_leader_epoll() {
    kill9_leader("kill9-3-epoll", 3, "epoll");
}

#[test]
fn three_nodes_kill9_leader_uring() {
    kill9_leader("kill9-3-uring", 3, "uring");
}

#[test]
fn five_nodes_kill9_leader_uring() {
    kill9_leader("kill9-5-uring", 5, "uring");
}

#[test]
fn five_nodes_kill9_leader_epoll() {
    kill9_leader("kill9-5-epoll", 5, "epoll");
}

fn sigstop_leader(io: &str) {
    if skip_uring(io) {
        return;
    }
    let mut c = Cluster::start(&format!("sigstop-{io}"), 3, io);
    let old = c.wait_leader();
    c.put_retry("key", "before");
    c.sigstop(old);
    let others: Vec<u64> = c.alive();
    let new = c.wait_leader_among(&others);
    assert_ne!(new, old);
    c.put_retry("key", "after");
    c.sigcont(old);
    // The old leader learns the new term and steps down.
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = c.status(old) {
            if s["role"] == "follower" && s["leader"]["node_id"].as_u64().is_some_and(|l| l != old)
            {
                break;
            }
        }
        assert!(
            start.elapsed() < common::LIMIT,
            "old leader {old} never stepped down\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its stale state is never served: a read through it sees the new value.
    assert_eq!(c.get_retry(old, "key").as_deref(), Some("after"));
}

#[test]
fn sigstop_leader_epoll() {
    sigstop_leader("epoll");
}

#[test]
fn sigstop_leader_uring() {
    sigstop_leader("uring");
}

fn rolling_restart(io: &str) {
    if skip_uring(io) {
        return;
    }
    let mut c = Cluster::start(&format!("rolling-{io}"), 3, io);
    c.wait_leader();
    let mut acked = Vec::new();
    for round in 1..=3u64 {
        for i in 0..10 {
            let (k, v) = (format!("r{round}-{i}"), format!("v{i}"));
            c.put_retry(&k, &v);
            acked.push((k, v));
        }
        let status = c.terminate(round);
        assert!(
            status.success(),
            "node {round} exited with {status} on SIGTERM\n{}",
            c.logs()
        );
        assert!(!c.node(round).socket.exists(), "control socket left behind");
        c.restart(round);
        c.wait_leader();
    }
    // Every node, each restarted once, holds every write.
    check_all(&c, &acked);
    // And a full stop of every node, then a start of all, keeps them too.
    for id in 1..=3 {
        c.kill9(id);
    }
    for id in 1..=3 {
        c.restart(id);
    }
    c.wait_leader();
    check_all(&c, &acked);
}

#[test]
fn rolling_restart_epoll() {
    rolling_restart("epoll");
}

#[test]
fn rolling_restart_uring() {
    rolling_restart("uring");
}

/// The largest value, read twice on one connection with the requests pipelined: each
/// answer spans several I/O buffers (several sends on the ring) and must arrive whole
/// and in order, the second one followed by the close it asked for.
fn full_size_values_round_trip(io: &str) {
    if skip_uring(io) {
        return;
    }
    let c = Cluster::start(&format!("bigvalue-{io}"), 1, io);
    let leader = c.wait_leader();
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let value: String = (0..vigil::limits::MAX_KV_VALUE_BYTES)
        .map(|i| alphabet[(i + i / 36) % alphabet.len()] as char)
        .collect();
    c.put_retry("big", &value);
    let mut s = std::os::unix::net::UnixStream::connect(&c.node(leader).socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /kv/big HTTP/1.1\r\n\r\nGET /kv/big HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut all).expect("the node closes after the second");
    let mut rest = &all[..];
    for answer in 0..2 {
        let head_end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("{io}: answer {answer} has no head"))
            + 4;
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 200 "), "{io}: {head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{io}: no length in {head}"));
        assert!(length > vigil::limits::MAX_KV_VALUE_BYTES, "{io}: {head}");
        let body = &rest[head_end..head_end + length];
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert!(
            json["value"].as_str() == Some(value.as_str()),
            "{io}: answer {answer} differs"
        );
        rest = &rest[head_end + length..];
    }
    assert!(
        rest.is_empty(),
        "{io}: {} bytes after the answers",
        rest.len()
    );
}

#[test]
fn full_size_values_round_trip_epoll() {
    full_size_values_round_trip("epoll");
}

#[test]
fn full_size_values_round_trip_uring() {
    full_size_values_round_trip("uring");
}

#[test]
fn control_api_errors_and_compare_and_set() {
    let c = Cluster::start("api", 3, "auto");
    let leader = c.wait_leader();
    let follower = c.alive().into_iter().find(|&i| i != leader).unwrap();
    let cl = c.client(follower);
    // Compare-and-set through a follower (forwarded).
    let put = |body: &str| cl.request("PUT", "/kv/cas", Some(body.as_bytes())).unwrap();
    let r = put(r#"{"value":"a","if_revision":0}"#);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json().unwrap();
    assert_eq!(v["served_by"].as_u64(), Some(leader));
    let rev = v["revision"].as_u64().unwrap();
    let r = put(r#"{"value":"b","if_revision":0}"#);
    assert_eq!(r.status, 409);
    let v = r.json().unwrap();
    assert_eq!(v["code"], "conflict");
    assert_eq!(v["current_revision"].as_u64(), Some(rev));
    let r = put(&format!(r#"{{"value":"b","if_revision":{rev}}}"#));
    assert_eq!(r.status, 200);
    assert_eq!(c.get(follower, "cas").unwrap().as_deref(), Some("b"));
    // Bad bodies, unknown paths and methods: JSON errors with a code.
    for (method, path, body, status, code) in [
        ("PUT", "/kv/x", "not json", 400, "bad_body"),
        ("PUT", "/kv/x", r#"{"value":5}"#, 400, "bad_body"),
        ("GET", "/nope", "", 404, "not_found"),
        ("POST", "/status", "", 405, "method_not_allowed"),
        ("GET", "/kv/missing", "", 404, "not_found"),
    ] {
        let r = cl
            .request(
                method,
                path,
                if body.is_empty() {
                    None
                } else {
                    Some(body.as_bytes())
                },
            )
            .unwrap();
        assert_eq!(r.status, status, "{method} {path}");
        assert_eq!(r.json().unwrap()["code"], code, "{method} {path}");
    }
    // A delete, then the key is gone.
    let r = cl.request("DELETE", "/kv/cas", None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(c.get(leader, "cas").unwrap(), None);
    // A value over 64 KiB is refused.
    let big = serde_json::json!({ "value": "x".repeat(64 * 1024 + 1) }).to_string();
    let r = cl.request("PUT", "/kv/big", Some(big.as_bytes())).unwrap();
    assert_eq!(r.status, 400);
    // Metrics are Prometheus text with the leader's term.
    let r = c.client(leader).request("GET", "/metrics", None).unwrap();
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.contains("vigil_raft_term "), "{text}");
    assert!(text.contains("vigil_fsync_latency_seconds_count"), "{text}");
}

#[test]
fn stepdown_moves_leadership_and_events_report_it() {
    let c = Cluster::start("stepdown", 3, "auto");
    let leader = c.wait_leader();
    let follower = c.alive().into_iter().find(|&i| i != leader).unwrap();
    // Subscribe to events on the follower before the step-down.
    let socket = c.node(follower).socket.clone();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let _ = Client::new(&socket, Duration::from_secs(30))
            .stream_lines("/events", |line| tx.send(line.to_string()).is_ok());
    });
    let first = rx
        .recv_timeout(common::LIMIT)
        .expect("an event on subscribe");
    assert!(first.contains("\"leader\""), "{first}");
    // Step down through the follower (forwarded to the leader).
    let r = c
        .client(follower)
        .request("POST", "/leadership/stepdown", None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json().unwrap();
    let new = v["leader"].as_u64().unwrap();
    assert_ne!(new, leader);
    // The follower's event stream reports the new leader.
    let start = std::time::Instant::now();
    loop {
        let line = rx.recv_timeout(common::LIMIT).expect("a leader event");
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        if e["leader"].as_u64() == Some(new) {
            break;
        }
        assert!(start.elapsed() < common::LIMIT);
    }
}

#[test]
fn slow_and_hostile_control_clients_do_not_stall_the_node() {
    use std::io::Write;
    let c = Cluster::start("hostile", 3, "auto");
    let leader = c.wait_leader();
    let socket = c.node(leader).socket.clone();
    // Partial requests left hanging, and a huge header.
    let mut hanging = Vec::new();
    for _ in 0..20 {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n").unwrap();
        hanging.push(s);
    }
    let mut huge = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let _ = huge.write_all(b"GET /status HTTP/1.1\r\nX-Big: ");
    let _ = huge.write_all(&vec![b'a'; 64 * 1024]);
    // The node still serves writes and reads.
    c.put_retry("alive", "yes");
    assert_eq!(c.get_retry(leader, "alive").as_deref(), Some("yes"));
    drop(hanging);
}

#[test]
fn members_demote_promote_remove() {
    let c = Cluster::start("members", 3, "auto");
    let leader = c.wait_leader();
    let others: Vec<u64> = c.alive().into_iter().filter(|&i| i != leader).collect();
    let (via, target) = (others[0], others[1]);
    // A new leader refuses membership changes (503 not_ready, retryable) until its
    // term's first entry committed; a committed write shows that it has.
    c.put_retry("leader-ready", "x");
    let cl = c.client(via);
    let role_of = |id: u64| -> Option<String> {
        let r = c.client(leader).request("GET", "/members", None).unwrap();
        let v = r.json().unwrap();
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["node_id"].as_u64() == Some(id))
            .map(|m| m["role"].as_str().unwrap().to_string())
    };
    let r = cl
        .request("POST", &format!("/members/{target}/demote"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(role_of(target).as_deref(), Some("observer"));
    c.put_retry("after-demote", "x");
    let r = cl
        .request("POST", &format!("/members/{target}/promote"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(role_of(target).as_deref(), Some("voter"));
    // Removing a member that is not there is refused; removing the target works.
    let r = cl.request("DELETE", "/members/99", None).unwrap();
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let r = cl
        .request("DELETE", &format!("/members/{target}"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(role_of(target), None);
    // Two voters remain; writes commit with both.
    c.put_retry("after-remove", "y");
    assert_eq!(c.get_retry(via, "after-remove").as_deref(), Some("y"));
}
