//! Hostile-input flood against one agent of a live 3-node cluster on 127.0.0.1: does it
//! keep its memory flat, its heartbeats going and its writes committing?
//!
//! The leader is flooded (it sends the heartbeats) for `--seconds` with:
//! - peer port: short connections carrying garbage, wrong-version, oversized, truncated
//!   and stranger handshakes (`--peer-rate` connections/s in all), and `--peer-slow`
//!   slowloris connections trickling a hello one byte every 500 ms (they hold the
//!   pending-handshake slots until the handshake timeout, then reconnect);
//! - control socket: short connections with malformed HTTP, bad JSON, unknown fields and
//!   oversized bodies (`--control-rate`/s), and `--control-slow` slowloris connections
//!   trickling a request head one byte a second (more than the connection limit).
//!
//! Meanwhile one client PUTs to the first leader in a loop (a follower forwards), and
//! every node's `/status` is sampled every 10 ms for the time since it last heard from the
//! leader it knows (the leader itself is skipped). A quiet
//! phase of `--quiet-seconds` before the flood gives the same figures without it.
//!
//! Lines (JSON, stdout): `rss` (leader VmRSS in kB sampled every second: before, after,
//! max), `leader-silence` (ms since a follower last heard the leader, per sample; gaps
//! over two heartbeats counted; elections and leader changes), `put` (latency of the
//! committed puts, per_s), `attack` (connections made and the agent's own counters).
//! Bad-MAC frames are not part of the flood: they need the cluster key, and a holder of
//! the key claiming a member's id displaces that member's connection (tests/hostile_peer
//! covers them).
//!
//! `cargo bench --bench flood -- --seconds 600`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{emit, stats};
use vigil::auth::{handshake, ClusterKey, Handshake, KeyRing};
use vigil::control::client::Client;

fn arg(name: &str, default: u64) -> u64 {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One hostile opening for the peer port.
fn peer_payload(rng: &mut Rng, stranger: &KeyRing, leader: u64) -> Vec<u8> {
    let mut hello = Vec::new();
    let _ = Handshake::initiator(
        stranger,
        2 + rng.next() % 1000,
        leader,
        handshake::fresh_nonce().unwrap(),
        &mut hello,
    );
    match rng.next() % 6 {
        0 => (0..1024).map(|_| rng.next() as u8).collect(),
        1 => {
            hello[4] = 2 + (rng.next() % 200) as u8;
            hello
        }
        2 => {
            hello[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
            hello
        }
        3 => {
            let mut frame = Vec::new();
            vigil::net::frame::encode(2, b"", &mut frame);
            frame[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
            frame
        }
        4 => {
            hello.truncate((rng.next() % hello.len() as u64) as usize);
            hello
        }
        _ => hello,
    }
}

/// One hostile request for the control socket.
fn control_payload(rng: &mut Rng) -> Vec<u8> {
    match rng.next() % 6 {
        0 => (0..512).map(|_| rng.next() as u8).collect(),
        1 => b"PUT /kv/flood HTTP/1.1\r\nContent-Length: 8\r\nConnection: close\r\n\r\nnot json"
            .to_vec(),
        2 => b"PUT /kv/flood HTTP/1.1\r\nContent-Length: 24\r\nConnection: close\r\n\r\n{\"value\":\"a\",\"x\":true}  "
            .to_vec(),
        3 => b"PUT /kv/flood HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{".to_vec(),
        4 => b"BREW /pot HTTP/1.1\r\n\r\n".to_vec(),
        _ => b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
    }
}

/// Runs `f` about `rate` times a second until `stop`.
fn paced(stop: &AtomicBool, rate: u64, mut f: impl FnMut()) {
    if rate == 0 {
        return;
    }
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        f();
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            next = now; // fell behind: do not burst to catch up
        }
    }
}

#[derive(Default)]
struct Phase {
    rss: Vec<f64>,
    silence: Vec<f64>,
    gaps: u64,
    puts: Vec<f64>,
    put_errors: u64,
    seconds: f64,
    /// CPU used by the flooded agent, percent of one core.
    cpu_percent: f64,
    /// /proc/loadavg at the end (the machine is shared).
    load: String,
}

/// How long ago this node last heard from the leader it knows, unless it is the leader
/// itself or knows none.
fn silence_from_leader(socket: &Path) -> Option<f64> {
    let r = Client::new(socket, Duration::from_secs(2))
        .request("GET", "/status", None)
        .ok()?;
    let v = r.json().ok()?;
    let leader = v["leader"]["node_id"].as_u64()?;
    if Some(leader) == v["node_id"].as_u64() {
        return None;
    }
    v["members"]
        .as_array()?
        .iter()
        .find(|m| m["node_id"].as_u64() == Some(leader))?["last_contact_ms"]
        .as_f64()
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Measures for `seconds`: puts to the leader, follower silence, leader RSS.
fn measure(c: &common::Cluster, leader: u64, pid: i32, seconds: u64, heartbeat_ms: f64) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(Mutex::new(Phase::default()));
    let followers: Vec<PathBuf> = (1..=3).map(|i| c.node(i).socket.clone()).collect();
    let mut threads = Vec::new();
    for socket in followers {
        let (stop, phase) = (stop.clone(), phase.clone());
        threads.push(std::thread::spawn(move || {
            let mut in_gap = false;
            while !stop.load(Ordering::Relaxed) {
                if let Some(ms) = silence_from_leader(&socket) {
                    let mut p = phase.lock().unwrap();
                    p.silence.push(ms);
                    let gap = ms > 2.0 * heartbeat_ms;
                    if gap && !in_gap {
                        p.gaps += 1;
                    }
                    in_gap = gap;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    {
        let (stop, phase) = (stop.clone(), phase.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let kb = rss_kb(pid);
                phase.lock().unwrap().rss.push(kb as f64);
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }
    let start = Instant::now();
    let cpu_start = cpu_seconds(pid);
    let mut k = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        let t = Instant::now();
        let ok = c.put(leader, &format!("flood-{}", k % 100), "v").is_ok();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let mut p = phase.lock().unwrap();
        if ok {
            p.puts.push(ms);
        } else {
            p.put_errors += 1;
        }
        k += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let mut p = std::mem::take(&mut *phase.lock().unwrap());
    p.seconds = start.elapsed().as_secs_f64();
    p.cpu_percent = (cpu_seconds(pid) - cpu_start) / p.seconds * 100.0;
    p.load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    p
}

fn metric(c: &common::Cluster, id: u64, name: &str) -> f64 {
    c.metric(id, name).unwrap_or(0.0)
}

fn report(case: &str, p: &Phase, terms: (f64, f64), changes: f64, heartbeat_ms: f64) {
    let rss = stats(&p.rss);
    emit(
        "flood",
        &format!("rss-{case}"),
        "kB",
        &rss,
        None,
        serde_json::json!({
            "rss_first": p.rss.first(), "rss_last": p.rss.last(),
            "interval_s": 1,
            "agent_cpu_percent": (p.cpu_percent * 10.0).round() / 10.0,
            "loadavg_at_end": p.load,
        }),
    );
    emit(
        "flood",
        &format!("leader-silence-{case}"),
        "ms",
        &stats(&p.silence),
        None,
        serde_json::json!({
            "heartbeat_ms": heartbeat_ms,
            "gaps_over_2_heartbeats": p.gaps,
            "term_before": terms.0, "term_after": terms.1,
            "elections": terms.1 - terms.0,
            "leader_changes": changes,
        }),
    );
    let puts = stats(&p.puts);
    emit(
        "flood",
        &format!("put-{case}"),
        "ms",
        &puts,
        None,
        serde_json::json!({
            "per_s": (p.puts.len() as f64 / p.seconds * 10.0).round() / 10.0,
            "errors": p.put_errors,
            "seconds": (p.seconds * 10.0).round() / 10.0,
        }),
    );
}

/// The per-frame cost of authentication: seal on one side, open on the other, for a
/// heartbeat-sized frame, a 64 KiB and a 1 MiB append.
fn mac_cost() {
    use vigil::auth::Session;
    for (case, payload) in [
        ("mac-128B", 128usize),
        ("mac-64KiB", 64 << 10),
        ("mac-1MiB", 1 << 20),
    ] {
        let mut a = Session::new(&[1; 32], &[2; 32]);
        let mut b = Session::new(&[2; 32], &[1; 32]);
        let body = vec![0x5a; payload];
        let mut buf = Vec::with_capacity(payload + 64);
        let n = if payload < 4096 { 20_000 } else { 200 };
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            buf.clear();
            let t = Instant::now();
            vigil::net::frame::encode(2, &body, &mut buf);
            a.sealer.seal(&mut buf, 0).unwrap();
            let framed = b.opener.open(&buf).unwrap();
            std::hint::black_box(framed);
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        emit(
            "flood",
            case,
            "us",
            &stats(&samples),
            None,
            serde_json::json!({"what": "frame encode (CRC) + seal + open (2 x HMAC-SHA256)"}),
        );
    }
}

fn main() {
    mac_cost();
    if std::env::args().any(|a| a == "--mac-only") {
        return;
    }
    let seconds = arg("--seconds", 60);
    let quiet = arg("--quiet-seconds", 20);
    let peer_rate = arg("--peer-rate", 300);
    let peer_slow = arg("--peer-slow", 100) as usize;
    let control_rate = arg("--control-rate", 300);
    let control_slow = arg("--control-slow", 200) as usize;
    let heartbeat_ms = 20.0;

    let mut c = common::Cluster::start("bench-flood", 3, "auto");
    let leader = c.wait_leader();
    let pid = c.pid(leader);
    let peer: SocketAddr = c.peer_addr(leader);
    let socket = c.node(leader).socket.clone();
    for i in 0..200 {
        c.put_retry(&format!("warm-{i}"), "v");
    }

    eprintln!("flood: quiet phase, {quiet} s");
    let term0 = metric(&c, leader, "vigil_raft_term");
    let changes0 = metric(&c, leader, "vigil_raft_leader_changes_total");
    let p = measure(&c, leader, pid, quiet, heartbeat_ms);
    let term1 = metric(&c, leader, "vigil_raft_term");
    let changes1 = metric(&c, leader, "vigil_raft_leader_changes_total");
    report(
        "quiet",
        &p,
        (term0, term1),
        changes1 - changes0,
        heartbeat_ms,
    );

    eprintln!(
        "flood: {seconds} s: peer {peer_rate}/s + {peer_slow} slow, control {control_rate}/s + {control_slow} slow"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new([
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ]);
    let mut attackers = Vec::new();
    // Short hostile peer connections.
    {
        let (stop, made) = (stop.clone(), made.clone());
        attackers.push(std::thread::spawn(move || {
            let stranger = KeyRing::new(ClusterKey::generate().unwrap(), None);
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            paced(&stop, peer_rate, || {
                let Ok(mut s) = TcpStream::connect_timeout(&peer, Duration::from_secs(1)) else {
                    return;
                };
                let _ = s.write_all(&peer_payload(&mut rng, &stranger, leader));
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut sink = [0u8; 256];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                made[0].fetch_add(1, Ordering::Relaxed);
            });
        }));
    }
    // Short hostile control connections.
    {
        let (stop, made, socket) = (stop.clone(), made.clone(), socket.clone());
        attackers.push(std::thread::spawn(move || {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            paced(&stop, control_rate, || {
                let Ok(mut s) = UnixStream::connect(&socket) else {
                    return;
                };
                let _ = s.write_all(&control_payload(&mut rng));
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                made[1].fetch_add(1, Ordering::Relaxed);
            });
        }));
    }
    // Slowloris on both: trickle bytes, reconnect when cut off.
    {
        let (stop, made, socket) = (stop.clone(), made.clone(), socket.clone());
        attackers.push(std::thread::spawn(move || {
            let stranger = KeyRing::new(ClusterKey::generate().unwrap(), None);
            let mut hello = Vec::new();
            let _ = Handshake::initiator(&stranger, 2, leader, [7; 32], &mut hello);
            let head = b"GET /status HTTP/1.1\r\nX-Slow: ".to_vec();
            let mut peers: Vec<(Option<TcpStream>, usize)> =
                (0..peer_slow).map(|_| (None, 0)).collect();
            let mut controls: Vec<(Option<UnixStream>, usize)> =
                (0..control_slow).map(|_| (None, 0)).collect();
            let mut tick = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (s, at) in peers.iter_mut() {
                    if s.is_none() {
                        *s = TcpStream::connect_timeout(&peer, Duration::from_millis(200)).ok();
                        *at = 0;
                        made[2].fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(stream) = s {
                        let byte = hello[*at % hello.len()];
                        if stream.write_all(&[byte]).is_err() {
                            *s = None;
                        }
                        *at += 1;
                    }
                }
                if tick % 2 == 0 {
                    for (s, at) in controls.iter_mut() {
                        if s.is_none() {
                            *s = UnixStream::connect(&socket).ok();
                            *at = 0;
                            made[3].fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(stream) = s {
                            let byte = if *at < head.len() { head[*at] } else { b'a' };
                            if stream.write_all(&[byte]).is_err() {
                                *s = None;
                            }
                            *at += 1;
                        }
                    }
                }
                tick += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
        }));
    }
    let term0 = metric(&c, leader, "vigil_raft_term");
    let changes0 = metric(&c, leader, "vigil_raft_leader_changes_total");
    let p = measure(&c, leader, pid, seconds, heartbeat_ms);
    let term1 = metric(&c, leader, "vigil_raft_term");
    let changes1 = metric(&c, leader, "vigil_raft_leader_changes_total");
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    report(
        "flood",
        &p,
        (term0, term1),
        changes1 - changes0,
        heartbeat_ms,
    );

    // The attack's size and what the agent counted.
    let reasons = [
        "malformed",
        "unknown_node",
        "timeout",
        "too_many_pending",
        "closed",
        "no_common_key",
    ];
    let mut counted = serde_json::Map::new();
    for r in reasons {
        counted.insert(
            format!("handshake_failures_{r}"),
            metric(
                &c,
                leader,
                &format!("vigil_peer_handshake_failures_total{{reason=\"{r}\"}}"),
            )
            .into(),
        );
    }
    for (key, name) in [
        (
            "control_evicted_idle",
            "vigil_control_connections_refused_total{reason=\"evicted_idle\"}",
        ),
        (
            "control_refused_full",
            "vigil_control_connections_refused_total{reason=\"full\"}",
        ),
        ("control_read_timeouts", "vigil_control_read_timeouts_total"),
        ("peer_bad_frames", "vigil_peer_bad_frames_total"),
    ] {
        counted.insert(key.into(), metric(&c, leader, name).into());
    }
    let total: u64 = made.iter().map(|m| m.load(Ordering::Relaxed)).sum();
    let n = stats(&[total as f64 / p.seconds]);
    let mut extra = serde_json::json!({
        "peer_short": made[0].load(Ordering::Relaxed),
        "control_short": made[1].load(Ordering::Relaxed),
        "peer_slow_connects": made[2].load(Ordering::Relaxed),
        "control_slow_connects": made[3].load(Ordering::Relaxed),
        "per_s": (total as f64 / p.seconds).round(),
        "still_running": c.running(leader),
    });
    for (k, v) in counted {
        extra[k] = v;
    }
    emit("flood", "attack", "connections/s", &n, None, extra);
    // Keep the agents' logs for a look afterwards.
    let logs = std::env::temp_dir().join(format!("vigil-flood-logs-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&logs);
    for i in 1..=3u64 {
        let _ = std::fs::copy(c.node(i).dir.join("log"), logs.join(format!("n{i}.log")));
    }
    eprintln!("flood: agent logs in {}", logs.display());
}
