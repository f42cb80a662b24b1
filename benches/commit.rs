//! Commit latency and throughput on a real 3-node cluster on 127.0.0.1, beside etcd (when
//! installed) in the same run and beside the fsync floor of the disk under the temp dir.
//!
//! - `seq-put`: one client, one keep-alive connection to the leader, sequential PUTs.
//! - `pipelined-put`: `CLIENTS` connections, each with one request outstanding, for a
//!   fixed time; `per_s` is acknowledged writes per second.
//! - `fsync-floor`: a 64-byte pwrite + fdatasync in the same file system.
//!
//! etcd is driven through its JSON gateway (`/v3/kv/put`; grpc-gateway adds overhead
//! compared with a native gRPC client; no gRPC client is in this dependency set).
//!
//! `cargo bench --bench commit [-- --puts N --seconds S --clients C]`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{emit, stats, Etcd, KeepAlive};

/// Keys each pipelined client cycles through (the KV store holds at most 16 Ki keys).
const KEYS_PER_CLIENT: u64 = 100;

fn arg(name: &str, default: u64) -> u64 {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fsync_floor(dir: &std::path::Path, n: usize) -> Vec<f64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("floor"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    f.sync_all().unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        f.write_at(&[i as u8; 64], (i as u64 * 64) % (1 << 20))
            .unwrap();
        f.sync_data().unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out
}

fn vigil_seq(socket: &std::path::Path, puts: usize) -> Vec<f64> {
    let mut c = KeepAlive::new(UnixStream::connect(socket).unwrap());
    let mut out = Vec::new();
    for i in 0..puts {
        let body = format!(r#"{{"value":"value-{i}"}}"#);
        let t = Instant::now();
        let (st, b) = c
            .request("PUT", &format!("/kv/seq-{i}"), body.as_bytes())
            .unwrap();
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out
}

fn throughput<F>(clients: usize, seconds: u64, make: F) -> f64
where
    F: Fn(usize) -> Box<dyn FnMut(u64) -> bool + Send> + Sync,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for k in 0..clients {
        let mut put = make(k);
        let (stop, done) = (stop.clone(), done.clone());
        handles.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if put(i) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    eprintln!("throughput: {n} acknowledged in {:?}", t.elapsed());
    assert!(n > 0, "no write was acknowledged");
    let elapsed = t.elapsed().as_secs_f64();
    for h in handles {
        let _ = h.join();
    }
    n as f64 / elapsed
}

fn main() {
    let puts = arg("--puts", 2000) as usize;
    let seconds = arg("--seconds", 5);
    let clients = arg("--clients", 64) as usize;
    let c = common::Cluster::start("bench-commit", 3, "auto");
    let leader = c.wait_leader();
    c.put_retry("warmup", "x");
    let socket = c.node(leader).socket.clone();
    let term_before = c
        .status(leader)
        .and_then(|s| s["term"].as_u64())
        .unwrap_or(0);
    eprintln!("vigil: sequential puts to leader {leader}");
    let seq = vigil_seq(&socket, puts);
    eprintln!("vigil: pipelined puts, {clients} clients, {seconds} s");
    let sock2 = socket.clone();
    let vigil_tput = throughput(clients, seconds, move |k| {
        let mut c = KeepAlive::new(UnixStream::connect(&sock2).unwrap());
        Box::new(move |i| {
            let body = format!(r#"{{"value":"v{i}"}}"#);
            // Overwrites within a bounded key set: the KV holds at most 16 Ki keys.
            let path = format!("/kv/p{k}-{}", i % KEYS_PER_CLIENT);
            matches!(c.request("PUT", &path, body.as_bytes()), Ok((200, _)))
        })
    });
    let floor = fsync_floor(&c.dir, 1000);
    // No election may happen under steady load: the leader and term are unchanged.
    let after = c.status(leader);
    let term_after = after.as_ref().and_then(|s| s["term"].as_u64()).unwrap_or(0);
    let still_leader = after.is_some_and(|s| s["role"] == "leader");
    let logs = c.logs();
    if term_after != term_before || !still_leader || logs.contains(" WARN ") {
        // An election or a slow loop turn under load: show what the nodes logged.
        eprintln!("terms {term_before} -> {term_after}, leader kept: {still_leader}\n{logs}");
    }
    drop(c);

    let mut etcd_seq = None;
    let mut etcd_tput = None;
    if support::etcd_available() {
        let root = common::unique_dir("bench-commit-etcd");
        let e = Etcd::start(&root, 3, 20, 100);
        if let Some(l) = e.wait_leader(Duration::from_secs(20)) {
            eprintln!("etcd: sequential puts to leader e{l}");
            let mut conn = e.connect(l).unwrap();
            assert!(Etcd::put(&mut conn, "warmup", "x"));
            let mut s = Vec::new();
            for i in 0..puts {
                let t = Instant::now();
                assert!(Etcd::put(
                    &mut conn,
                    &format!("seq-{i}"),
                    &format!("value-{i}")
                ));
                s.push(t.elapsed().as_secs_f64() * 1e6);
            }
            etcd_seq = Some(stats(&s));
            eprintln!("etcd: pipelined puts, {clients} clients, {seconds} s");
            let port = e.nodes[l].client_port;
            etcd_tput = Some(throughput(clients, seconds, move |k| {
                let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_nodelay(true).unwrap();
                let mut c = KeepAlive::new(s);
                Box::new(move |i| {
                    Etcd::put(
                        &mut c,
                        &format!("p{k}-{}", i % KEYS_PER_CLIENT),
                        &format!("v{i}"),
                    )
                })
            }));
        }
        drop(e);
        let _ = std::fs::remove_dir_all(&root);
    } else {
        eprintln!("etcd not installed: no baseline (tools/install-etcd)");
    }
    let floor = stats(&floor);
    let extra = serde_json::json!({
        "fsync_floor_p50_us": (floor.p50 * 10.0).round() / 10.0,
        "terms_during_run": term_after - term_before,
        "leader_kept": still_leader,
    });
    emit(
        "commit",
        "seq-put-3nodes",
        "us",
        &stats(&seq),
        etcd_seq.as_ref().map(|b| ("etcd-3.4 json-gateway", b)),
        extra,
    );
    let mut v = serde_json::json!({
        "bench": "commit", "case": format!("pipelined-put-3nodes-{clients}clients"), "unit": "ops/s", "n": 1,
        "p50": vigil_tput.round(), "p99": vigil_tput.round(), "max": vigil_tput.round(), "per_s": vigil_tput.round(),
    });
    if let Some(t) = etcd_tput {
        v["baseline"] = "etcd-3.4 json-gateway".into();
        v["baseline_per_s"] = t.round().into();
        v["ratio_per_s"] = ((vigil_tput / t * 100.0).round() / 100.0).into();
    }
    println!("{v}");
    emit(
        "commit",
        "fsync-floor",
        "us",
        &floor,
        None,
        serde_json::json!({}),
    );
}
