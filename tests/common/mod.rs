//! Cluster harness for tests with real `vigil agent` processes on 127.0.0.1.
//!
//! Every process is killed by PID when the [`Cluster`] is dropped (also when a test
//! fails); every cluster has its own temp dir. Ports are checked free by binding them,
//! below the ephemeral range (see `free_port`); an unlikely reuse by another process
//! before the agent binds shows up as a start failure, not a wrong result. Conditions
//! are polled with generous limits.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vigil::control::client::{agreed_leader, Client};

pub const LIMIT: Duration = Duration::from_secs(30);

pub struct Node {
    pub id: u64,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub child: Option<Child>,
    pub stopped: bool,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub io: String,
    /// With network namespaces: the hub namespace (a bridge) and one per node.
    pub netns: Option<Netns>,
}

/// Node i runs in namespace `{prefix}n{i}` with address 10.200.0.{i} on a veth whose
/// other end sits on a bridge in `{prefix}hub`.
#[path = "netns.rs"]
mod netns;

pub struct Netns {
    pub prefix: String,
}

impl Netns {
    pub fn node(&self, id: u64) -> String {
        format!("{}n{id}", self.prefix)
    }
    pub fn hub(&self) -> String {
        format!("{}hub", self.prefix)
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process may create network namespaces and run nft (root, tools present).
pub fn netns_available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    netns::probe()
}

/// A free port below the kernel's ephemeral range (32768 and up by default), so that a
/// restarted node's port cannot have been taken meanwhile as the source port of some
/// outgoing connection. Spread by process id and a counter, checked by binding.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let base = (std::process::id() as u64).wrapping_mul(7919);
    loop {
        let k = N.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((base + k * 13) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn unique_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vigil-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Cluster {
    /// Starts `n` voters with the given io backend ("uring", "epoll" or "auto").
    pub fn start(name: &str, n: usize, io: &str) -> Cluster {
        Cluster::start_with(name, n, io, "")
    }

    /// `timing`: extra TOML for the `[timing]` table (may be empty).
    pub fn start_with(name: &str, n: usize, io: &str, timing: &str) -> Cluster {
        Cluster::build(name, n, io, timing, None)
    }

    /// `n` voters that run VMs: each gets a `[vms]` section with `vms` (TOML lines, e.g.
    /// capacities), and all share one shared dir (`<cluster dir>/shared`). VMMs the
    /// agents started are killed on drop too (found by their command lines, which name
    /// this cluster's dir).
    pub fn start_vms(name: &str, n: usize, io: &str, vms: &str) -> Cluster {
        Cluster::build_full(name, n, io, "", None, Some(vms))
    }

    /// [`Cluster::start_vms`] with extra `[timing]` lines.
    pub fn start_vms_with(name: &str, n: usize, io: &str, timing: &str, vms: &str) -> Cluster {
        Cluster::build_full(name, n, io, timing, None, Some(vms))
    }

    /// The shared dir of a cluster started with [`Cluster::start_vms`].
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// Each node in its own network namespace, all joined by a bridge (needs root; see
    /// [`netns_available`]). Namespaces are deleted on drop.
    pub fn start_netns(name: &str, n: usize, io: &str) -> Cluster {
        use std::sync::atomic::{AtomicU64, Ordering};
        static K: AtomicU64 = AtomicU64::new(0);
        let ns = Netns {
            prefix: format!(
                "vgl{}x{}",
                std::process::id(),
                K.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let nodes: Vec<String> = (1..=n as u64).map(|i| ns.node(i)).collect();
        netns::build_bridged(&ns.hub(), &nodes, &|args: &[&str]| sh(args));
        Cluster::build(name, n, io, "", Some(ns))
    }

    fn build(name: &str, n: usize, io: &str, timing: &str, netns: Option<Netns>) -> Cluster {
        Cluster::build_full(name, n, io, timing, netns, None)
    }

    fn build_full(
        name: &str,
        n: usize,
        io: &str,
        timing: &str,
        netns: Option<Netns>,
        vms: Option<&str>,
    ) -> Cluster {
        let dir = unique_dir(name);
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let host = |i: usize| {
            if netns.is_some() {
                format!("10.200.0.{}", i + 1)
            } else {
                "127.0.0.1".to_string()
            }
        };
        let mut peers = String::new();
        for (i, p) in ports.iter().enumerate() {
            peers.push_str(&format!(
                "[[peers]]\nid = {}\naddress = \"{}:{p}\"\nrole = \"voter\"\n\n",
                i + 1,
                host(i)
            ));
        }
        // One cluster key for all members (the agent refuses to start without one).
        let key_file = dir.join("cluster.key");
        let key = vigil::auth::ClusterKey::generate().expect("getrandom");
        vigil::auth::write_key_file(&key_file, &key, false).expect("write the cluster key");
        let mut nodes = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let ndir = dir.join(format!("n{id}"));
            std::fs::create_dir_all(ndir.join("data")).unwrap();
            std::fs::create_dir_all(ndir.join("shared")).unwrap();
            let socket = ndir.join("vigil.sock");
            let mut timing_table = if timing.is_empty() {
                String::new()
            } else {
                format!("[timing]\n{timing}\n")
            };
            let shared = match vms {
                Some(v) => {
                    timing_table.push_str(&format!("[vms]\n{v}\n\n"));
                    dir.join("shared")
                }
                None => ndir.join("shared"),
            };
            std::fs::create_dir_all(&shared).unwrap();
            let config = format!(
                "node_id = {id}\nlisten = \"{}:{p}\"\ndata_dir = \"{}\"\nshared_dir = \"{}\"\ncontrol_socket = \"{}\"\nkey_file = \"{}\"\n\n{timing_table}{peers}",
                host(i),
                ndir.join("data").display(),
                shared.display(),
                socket.display(),
                key_file.display()
            );
            let config_path = ndir.join("config.toml");
            std::fs::write(&config_path, config).unwrap();
            nodes.push(Node {
                id,
                dir: ndir,
                config: config_path,
                socket,
                child: None,
                stopped: false,
            });
        }
        let mut c = Cluster {
            netns,
            dir,
            nodes,
            io: io.to_string(),
        };
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("log"))
            .unwrap();
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the agent in place: the child's PID is the agent's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    &ns.node(node.id),
                    env!("CARGO_BIN_EXE_vigil"),
                ]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_vigil")),
        };
        let child = cmd
            .arg("agent")
            .arg("--config")
            .arg(&node.config)
            .arg("--io")
            .arg(&self.io)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn vigil agent");
        node.child = Some(child);
        node.stopped = false;
    }

    /// Starts one more node, configured to join the running cluster (`join = true`):
    /// its config lists itself and every node started so far, with node 1's timing and
    /// key. It is not a member until someone adds it (`POST /members`). Returns its id.
    pub fn start_joining_node(&mut self) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        assert!(self.netns.is_none(), "joining nodes run on loopback only");
        let port = free_port();
        let template = std::fs::read_to_string(&self.nodes[0].config).unwrap();
        let (old_dir, new_dir) = (self.nodes[0].dir.clone(), self.dir.join(format!("n{id}")));
        std::fs::create_dir_all(new_dir.join("data")).unwrap();
        std::fs::create_dir_all(new_dir.join("shared")).unwrap();
        let mut config = String::new();
        for line in template.lines() {
            if line.starts_with("node_id = ") {
                config.push_str(&format!("node_id = {id}\njoin = true\n"));
            } else if line.starts_with("listen = ") {
                config.push_str(&format!("listen = \"127.0.0.1:{port}\"\n"));
            } else {
                let dirs = (
                    format!("{}/", old_dir.display()),
                    format!("{}/", new_dir.display()),
                );
                config.push_str(&line.replace(&dirs.0, &dirs.1));
                config.push('\n');
            }
        }
        config.push_str(&format!(
            "\n[[peers]]\nid = {id}\naddress = \"127.0.0.1:{port}\"\nrole = \"observer\"\n"
        ));
        let config_path = new_dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        self.nodes.push(Node {
            id,
            socket: new_dir.join("vigil.sock"),
            dir: new_dir,
            config: config_path,
            child: None,
            stopped: false,
        });
        self.spawn(id as usize - 1);
        id
    }

    /// A membership request through `via`, retried while the answer is retryable (503:
    /// no leader yet, the new leader not ready, a change still pending (409)). Returns
    /// the final status and body.
    pub fn members_request(
        &self,
        via: u64,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let start = Instant::now();
        let body = body.map(|b| b.to_string());
        loop {
            let r = self
                .client(via)
                .request(method, path, body.as_deref().map(str::as_bytes));
            match r {
                Ok(r) => {
                    let v: serde_json::Value = r.json().unwrap_or(serde_json::Value::Null);
                    let retry =
                        r.status == 503 || (r.status == 409 && v["code"] == "change_pending");
                    if !retry || start.elapsed() >= LIMIT {
                        return (r.status, v);
                    }
                }
                Err(e) => assert!(
                    start.elapsed() < LIMIT,
                    "{method} {path} via {via}: {e}\n{}",
                    self.logs()
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `GET /members` list of node `id`.
    pub fn members(&self, id: u64) -> Vec<serde_json::Value> {
        let r = self.client(id).request("GET", "/members", None).unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json().unwrap()["members"].as_array().unwrap().clone()
    }

    /// The cluster key file every member uses.
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("cluster.key")
    }

    /// The peer (Raft) address of a node, as its config file says.
    pub fn peer_addr(&self, id: u64) -> std::net::SocketAddr {
        let text = std::fs::read_to_string(&self.node(id).config).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("listen = "))
            .expect("listen in config");
        line["listen = ".len()..].trim_matches('"').parse().unwrap()
    }

    /// The value of one metric line (`name` with its labels, as printed) from /metrics.
    pub fn metric(&self, id: u64, name: &str) -> Option<f64> {
        let r = self.client(id).request("GET", "/metrics", None).ok()?;
        let text = String::from_utf8_lossy(&r.body).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Whether the node's process is still running (it did not exit or abort).
    pub fn running(&mut self, id: u64) -> bool {
        match self.nodes[id as usize - 1].child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn client(&self, id: u64) -> Client {
        Client::new(&self.node(id).socket, Duration::from_secs(10))
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize - 1]
    }

    pub fn pid(&self, id: u64) -> i32 {
        self.node(id).child.as_ref().expect("running").id() as i32
    }

    pub fn alive(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some() && !n.stopped)
            .map(|n| n.id)
            .collect()
    }

    pub fn kill9(&mut self, id: u64) {
        let node = &mut self.nodes[id as usize - 1];
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self, id: u64) -> std::process::ExitStatus {
        let node = &mut self.nodes[id as usize - 1];
        let mut c = node.child.take().expect("running");
        // SAFETY: plain kill(2) on a child we own.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    pub fn restart(&mut self, id: u64) {
        assert!(self.node(id).child.is_none());
        self.spawn(id as usize - 1);
    }

    pub fn sigstop(&mut self, id: u64) {
        // SAFETY: plain kill(2) on a child we own.
        unsafe { libc::kill(self.pid(id), libc::SIGSTOP) };
        self.nodes[id as usize - 1].stopped = true;
    }

    pub fn sigcont(&mut self, id: u64) {
        // SAFETY: plain kill(2) on a child we own.
        unsafe { libc::kill(self.pid(id), libc::SIGCONT) };
        self.nodes[id as usize - 1].stopped = false;
    }

    pub fn status(&self, id: u64) -> Option<serde_json::Value> {
        let r = Client::new(&self.node(id).socket, Duration::from_secs(2))
            .request("GET", "/status", None)
            .ok()?;
        if r.status != 200 {
            return None;
        }
        r.json().ok()
    }

    /// Waits until a majority of the `among` nodes report the same leader (one of
    /// `among`) in the same term, and that leader says it is leader. Returns its id.
    pub fn wait_leader_among(&self, among: &[u64]) -> u64 {
        let start = Instant::now();
        loop {
            let seen = match agreed_leader(among, self.nodes.len(), |id| self.status(id)) {
                Ok((leader, _term)) => return leader,
                Err(seen) => seen,
            };
            assert!(
                start.elapsed() < LIMIT,
                "no leader among {among:?} within {LIMIT:?}; saw {seen:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_leader(&self) -> u64 {
        self.wait_leader_among(&self.alive())
    }

    /// One PUT; Ok(revision) or Err((status, body)).
    pub fn put(&self, via: u64, key: &str, value: &str) -> Result<u64, (u16, String)> {
        let body = serde_json::json!({ "value": value }).to_string();
        let r = self
            .client(via)
            .request("PUT", &format!("/kv/{key}"), Some(body.as_bytes()))
            .map_err(|e| (0, e.to_string()))?;
        let text = String::from_utf8_lossy(&r.body).to_string();
        if r.status != 200 {
            return Err((r.status, text));
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| (r.status, format!("{e}: {text}")))?;
        v["revision"].as_u64().ok_or((r.status, text))
    }

    /// PUT through any live node until one acknowledges it (within the limit).
    pub fn put_retry(&self, key: &str, value: &str) -> u64 {
        let start = Instant::now();
        let mut k = 0;
        loop {
            let alive = self.alive();
            let via = alive[k % alive.len()];
            k += 1;
            match self.put(via, key, value) {
                Ok(rev) => return rev,
                Err(e) => {
                    assert!(
                        start.elapsed() < LIMIT,
                        "put {key} never acknowledged: last error {e:?}\n{}",
                        self.logs()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Linearizable GET: Ok(Some(value)), Ok(None) for not found, Err otherwise.
    pub fn get(&self, via: u64, key: &str) -> Result<Option<String>, (u16, String)> {
        let r = self
            .client(via)
            .request("GET", &format!("/kv/{key}"), None)
            .map_err(|e| (0, e.to_string()))?;
        let text = String::from_utf8_lossy(&r.body).to_string();
        match r.status {
            200 => {
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| (200, e.to_string()))?;
                Ok(v["value"].as_str().map(str::to_string))
            }
            404 => Ok(None),
            s => Err((s, text)),
        }
    }

    /// GET that retries transient errors (no leader yet) within the limit.
    pub fn get_retry(&self, via: u64, key: &str) -> Option<String> {
        let start = Instant::now();
        loop {
            match self.get(via, key) {
                Ok(v) => return v,
                Err(e) => {
                    assert!(
                        start.elapsed() < LIMIT,
                        "get {key} via {via} kept failing: {e:?}\n{}",
                        self.logs()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(n.dir.join("log")).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- node {} log (last 30 lines) ---\n", n.id));
            for l in tail.iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SAFETY: plain kill(2) on a child we own; SIGCONT first so a stopped
                // process can die.
                unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        kill_vmms_under(&self.dir);
        if let Some(ns) = &self.netns {
            for n in &self.nodes {
                let _ = Command::new("ip")
                    .args(["netns", "del", &ns.node(n.id)])
                    .status();
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &ns.hub()])
                .status();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("cluster files kept in {}", self.dir.display());
        }
    }
}

/// Kills (SIGKILL, by PID) every `vigil vmm` whose command line names a path under
/// `dir`: VMMs run in their own session and outlive the agents that started them.
pub fn kill_vmms_under(dir: &Path) {
    let needle = dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if args.get(1).map(String::as_str) == Some("vmm")
            && args.iter().any(|a| a.contains(&needle))
        {
            // SAFETY: plain kill(2) of a process this test's cluster started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Whether io_uring can be set up here (the uring variants skip otherwise).
pub fn uring_available() -> bool {
    vigil::io::Io::new(&vigil::io::Config {
        backend: vigil::io::BackendChoice::Uring,
        ring_entries: 8,
        max_in_flight: 8,
        buffer_count: 1,
        buffer_bytes: 4096,
        fail_uring_setup: None,
    })
    .is_ok()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

impl Cluster {
    /// Drops every packet between node `id` and the nodes in `from` (nft in `id`'s
    /// namespace, both directions), plus `loss_percent` random loss on all its traffic.
    pub fn nft_rules(&self, id: u64, cut: &[u64], loss_percent: u32) {
        let ns = self.netns.as_ref().expect("a netns cluster").node(id);
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "nft",
                "delete",
                "table",
                "inet",
                "vigil_fault",
            ])
            .output();
        let mut input = String::new();
        let mut output = String::new();
        if !cut.is_empty() {
            let set: Vec<String> = cut.iter().map(|i| format!("10.200.0.{i}")).collect();
            input.push_str(&format!("ip saddr {{ {} }} drop; ", set.join(", ")));
            output.push_str(&format!("ip daddr {{ {} }} drop; ", set.join(", ")));
        }
        if loss_percent > 0 {
            input.push_str(&format!(
                "ip saddr 10.200.0.0/24 numgen random mod 100 < {loss_percent} drop; "
            ));
            output.push_str(&format!(
                "ip daddr 10.200.0.0/24 numgen random mod 100 < {loss_percent} drop; "
            ));
        }
        let script = format!(
            "table inet vigil_fault {{\n chain input {{ type filter hook input priority 0; policy accept; {input}}}\n chain output {{ type filter hook output priority 0; policy accept; {output}}}\n}}\n"
        );
        let path = self.dir.join(format!("nft-{id}.nft"));
        std::fs::write(&path, script).unwrap();
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "nft",
            "-f",
            path.to_str().unwrap(),
        ]);
    }

    /// Removes the fault rules of node `id`.
    pub fn nft_heal(&self, id: u64) {
        let ns = self.netns.as_ref().expect("a netns cluster").node(id);
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "nft",
                "delete",
                "table",
                "inet",
                "vigil_fault",
            ])
            .output();
    }
}
