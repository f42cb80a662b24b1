//! Shared pieces of the cluster benchmarks: statistics, JSON lines, an etcd cluster
//! driven through its JSON gateway with a minimal keep-alive HTTP client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn stats(samples: &[f64]) -> Stats {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats {
        n: s.len(),
        p50: percentile(&s, 0.5),
        p99: percentile(&s, 0.99),
        max: *s.last().unwrap_or(&f64::NAN),
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One JSON line: the case's own stats and, when given, the baseline's and the ratio.
pub fn emit(
    bench: &str,
    case: &str,
    unit: &str,
    ours: &Stats,
    baseline: Option<(&str, &Stats)>,
    extra: serde_json::Value,
) {
    let mut v = serde_json::json!({
        "bench": bench, "case": case, "unit": unit, "n": ours.n,
        "p50": round(ours.p50), "p99": round(ours.p99), "max": round(ours.max),
    });
    if let Some((name, b)) = baseline {
        v["baseline"] = name.into();
        v["baseline_n"] = b.n.into();
        v["baseline_p50"] = round(b.p50).into();
        v["baseline_p99"] = round(b.p99).into();
        v["baseline_max"] = round(b.max).into();
        v["ratio_p50"] = round(ours.p50 / b.p50).into();
        v["ratio_p99"] = round(ours.p99 / b.p99).into();
    }
    if let (Some(obj), Some(x)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in x {
            obj.insert(k.clone(), val.clone());
        }
    }
    println!("{v}");
}

/// A keep-alive HTTP/1.1 connection (Unix socket or TCP), requests with a JSON body.
pub struct KeepAlive<S: Read + Write> {
    reader: BufReader<S>,
}

impl<S: Read + Write> KeepAlive<S> {
    pub fn new(stream: S) -> Self {
        KeepAlive {
            reader: BufReader::new(stream),
        }
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        self.reader.get_mut().write_all(&request)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad status line {line:?}"),
                )
            })?;
        let mut len = 0usize;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok((status, body))
    }
}

/// Ports below the ephemeral range (a restarted member's port cannot be taken meanwhile).
pub fn free_port() -> u16 {
    crate::common::free_port()
}

pub fn etcd_available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub struct EtcdNode {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

pub struct Etcd {
    pub nodes: Vec<EtcdNode>,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    cluster: String,
}

impl Etcd {
    pub fn start(root: &Path, n: usize, heartbeat_ms: u64, election_ms: u64) -> Etcd {
        let mut nodes = Vec::new();
        for i in 0..n {
            let dir = root.join(format!("etcd{i}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            nodes.push(EtcdNode {
                name: format!("e{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                dir,
                child: None,
            });
        }
        let cluster = nodes
            .iter()
            .map(|x| format!("{}=http://127.0.0.1:{}", x.name, x.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut e = Etcd {
            nodes,
            heartbeat_ms,
            election_ms,
            cluster,
        };
        for i in 0..n {
            e.spawn(i, "new");
        }
        e
    }

    pub fn spawn(&mut self, i: usize, state: &str) {
        let x = &mut self.nodes[i];
        let log = std::fs::File::create(x.dir.join("log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &x.name])
            .arg("--data-dir")
            .arg(x.dir.join("data"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", x.client_port),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", x.client_port),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", x.peer_port),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", x.peer_port),
            ])
            .args(["--initial-cluster", &self.cluster])
            .args(["--initial-cluster-state", state])
            .args(["--heartbeat-interval", &self.heartbeat_ms.to_string()])
            .args(["--election-timeout", &self.election_ms.to_string()])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        x.child = Some(child);
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, i: usize, sig: i32) {
        if let Some(c) = &self.nodes[i].child {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.spawn(i, "existing");
    }

    pub fn connect(&self, i: usize) -> std::io::Result<KeepAlive<TcpStream>> {
        self.connect_with_timeout(i, Duration::from_secs(3))
    }

    /// A connection whose requests give up after `timeout` (failover trials retry on a
    /// fresh connection, like a client with a short per-request deadline).
    pub fn connect_with_timeout(
        &self,
        i: usize,
        timeout: Duration,
    ) -> std::io::Result<KeepAlive<TcpStream>> {
        let s = TcpStream::connect(("127.0.0.1", self.nodes[i].client_port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(KeepAlive::new(s))
    }

    /// The member index that is leader, if node `i` answers.
    pub fn leader_seen_by(&self, i: usize) -> Option<usize> {
        let mut c = self.connect(i).ok()?;
        let (st, body) = c.request("POST", "/v3/maintenance/status", b"{}").ok()?;
        if st != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let leader = v["leader"].as_str()?.to_string();
        let me = v["header"]["member_id"].as_str()?.to_string();
        if leader == me {
            return Some(i);
        }
        // Map the leader's member id to an index through each member's own id.
        (0..self.nodes.len()).find(|&j| {
            self.nodes[j].child.is_some()
                && self
                    .connect(j)
                    .ok()
                    .and_then(|mut c| c.request("POST", "/v3/maintenance/status", b"{}").ok())
                    .and_then(|(_, b)| {
                        serde_json::from_slice::<serde_json::Value>(&b)
                            .ok()
                            .and_then(|v| v["header"]["member_id"].as_str().map(|s| s == leader))
                    })
                    == Some(true)
        })
    }

    pub fn wait_leader(&self, limit: Duration) -> Option<usize> {
        let start = Instant::now();
        while start.elapsed() < limit {
            for i in 0..self.nodes.len() {
                if self.nodes[i].child.is_some() {
                    if let Some(l) = self.leader_seen_by(i) {
                        return Some(l);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn put(c: &mut KeepAlive<TcpStream>, key: &str, value: &str) -> bool {
        use base64_lite::encode;
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            encode(key.as_bytes()),
            encode(value.as_bytes())
        );
        matches!(
            c.request("POST", "/v3/kv/put", body.as_bytes()),
            Ok((200, _))
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.signal(i, libc::SIGCONT);
            self.kill9(i);
        }
    }
}

/// Standard base64 for the etcd gateway's byte fields.
pub mod base64_lite {
    pub fn encode(b: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for k in 0..4 {
                if k <= c.len() {
                    out.push(T[(n >> (18 - 6 * k)) as usize & 63] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
