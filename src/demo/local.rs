//! A local cluster of real `vigil agent` processes on 127.0.0.1, for `vigil demo`, the
//! VM tests and the resurrect benchmark.
//!
//! Everything lives under one fresh temp dir: per host a config, data dir, control
//! socket and log, plus one shared-storage dir that every host's config names. Agents
//! are our children, each in its own process group (a Ctrl-C at the terminal reaches
//! only the demo, which then stops them). Their VMMs are not our children (they setsid
//! to outlive the agent); they are found by their command line, which names the host's
//! data dir (see `procs`). Dropping the cluster kills every process it started, by
//! PID, and removes the temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::control::client::{agreed_leader, Client};
use crate::demo::procs::{self, Process};
use crate::demo::{interrupted, monotonic_ns};
use crate::limits::MAX_DEMO_HOSTS;

/// The `[vms]` section of every host's config.
#[derive(Clone, Debug)]
pub struct VmsConfig {
    pub capacity_memory_mib: u64,
    pub capacity_vcpus: u64,
    pub abandon_after_ms: u64,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Part of the temp dir's name.
    pub name: String,
    pub hosts: usize,
    /// None: no `[vms]` section (VMs disabled).
    pub vms: Option<VmsConfig>,
    /// Extra lines for the `[timing]` table (may be empty: the defaults).
    pub timing_toml: String,
    /// The `vigil` executable to run as the agent.
    pub exe: PathBuf,
    /// The agent's `--io` choice.
    pub io: String,
    /// `VIGIL_LOG` for every agent (e.g. `debug`).
    pub log_level: Option<String>,
    /// Network namespaces (tests, root): host i runs in namespace `{prefix}n{i}` with
    /// address 10.200.0.{i}; the caller creates and deletes them. None: all on 127.0.0.1.
    pub netns: Option<String>,
}

impl Options {
    /// The address host `id` listens on.
    pub fn ip(&self, id: u64) -> String {
        match self.netns {
            Some(_) => format!("10.200.0.{id}"),
            None => "127.0.0.1".to_string(),
        }
    }
}

pub struct Host {
    pub id: u64,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    child: Option<Child>,
    /// SIGSTOPped by us.
    pub stopped: bool,
}

pub struct LocalCluster {
    pub root: PathBuf,
    pub shared: PathBuf,
    pub hosts: Vec<Host>,
    options: Options,
    /// Leave the temp dir in place on drop (to look at logs).
    pub keep: bool,
    cleaned: bool,
}

/// What [`LocalCluster::kill_host`] killed.
#[derive(Clone, Debug)]
pub struct HostKill {
    pub host: u64,
    pub agent_pid: i32,
    pub vmm_pids: Vec<i32>,
    /// CLOCK_MONOTONIC nanoseconds just before the first SIGKILL.
    pub at_ns: u64,
}

/// What [`LocalCluster::cleanup`] stopped.
#[derive(Clone, Debug, Default)]
pub struct Cleanup {
    pub agents: Vec<i32>,
    pub vmms: Vec<i32>,
    pub removed: Option<PathBuf>,
}

/// `n` distinct ports that are free now, below the kernel's ephemeral range (32768 and
/// up by default), so a restarted agent's port cannot meanwhile have become the source
/// port of some outgoing connection. Spread by process id, clock and a counter; each is
/// checked by binding it, and held bound until all are picked (so none is picked twice).
pub fn pick_ports(n: usize) -> Result<Vec<u16>, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let base = (std::process::id() as u64).wrapping_mul(7919) ^ (monotonic_ns() / 1000);
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    for _ in 0..1000 {
        if ports.len() == n {
            return Ok(ports);
        }
        let k = N.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base.wrapping_add(k * 13) % 12_000) as u16;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
            ports.push(port);
        }
    }
    if ports.len() == n {
        return Ok(ports);
    }
    Err(format!(
        "only {} of {n} free TCP ports on 127.0.0.1 in 20000..32000 after 1000 tries",
        ports.len()
    ))
}

/// A fresh temp dir `vigil-<name>-<pid>-<n>`.
pub fn temp_dir(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "vigil-{name}-{}-{}",
        std::process::id(),
        monotonic_ns() % 1_000_000_000_000
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

/// The config of host `id` (1-based) among `ports`.
pub fn config_text(
    id: u64,
    ports: &[u16],
    data_dir: &Path,
    shared: &Path,
    socket: &Path,
    key_file: &Path,
    options: &Options,
) -> String {
    let mut text = format!(
        "node_id = {id}\nlisten = \"{}:{}\"\ndata_dir = \"{}\"\nshared_dir = \"{}\"\ncontrol_socket = \"{}\"\nkey_file = \"{}\"\n\n",
        options.ip(id),
        ports[id as usize - 1],
        data_dir.display(),
        shared.display(),
        socket.display(),
        key_file.display()
    );
    if !options.timing_toml.is_empty() {
        text.push_str(&format!("[timing]\n{}\n\n", options.timing_toml.trim_end()));
    }
    if let Some(vms) = &options.vms {
        text.push_str(&format!(
            "[vms]\ncapacity_memory_mib = {}\ncapacity_vcpus = {}\nabandon_after_ms = {}\n\n",
            vms.capacity_memory_mib, vms.capacity_vcpus, vms.abandon_after_ms
        ));
    }
    for (i, port) in ports.iter().enumerate() {
        text.push_str(&format!(
            "[[peers]]\nid = {}\naddress = \"{}:{port}\"\nrole = \"voter\"\n\n",
            i + 1,
            options.ip(i as u64 + 1)
        ));
    }
    text
}

impl LocalCluster {
    /// Writes the configs and starts every agent; returns once each answers `/status`
    /// (or the error of the first that did not, with its log).
    pub fn start(options: Options) -> Result<LocalCluster, String> {
        if options.hosts == 0 || options.hosts > MAX_DEMO_HOSTS {
            return Err(format!(
                "{} hosts: a local cluster has 1 to {MAX_DEMO_HOSTS}",
                options.hosts
            ));
        }
        let root = temp_dir(&options.name)?;
        let shared = root.join("shared");
        let mut cluster = LocalCluster {
            shared: shared.clone(),
            root: root.clone(),
            hosts: Vec::new(),
            options,
            keep: false,
            cleaned: false,
        };
        // From here on, an error drops `cluster`, which removes the dir.
        std::fs::create_dir_all(&shared)
            .map_err(|e| format!("create {}: {e}", shared.display()))?;
        // One cluster key for every host, mode 0600 like `vigil keygen` writes it.
        let key_file = root.join("cluster.key");
        let key = crate::auth::ClusterKey::generate()
            .map_err(|e| format!("generate the cluster key: {e}"))?;
        crate::auth::write_key_file(&key_file, &key, false)
            .map_err(|e| format!("write {}: {e}", key_file.display()))?;
        let ports = pick_ports(cluster.options.hosts)?;
        for id in 1..=cluster.options.hosts as u64 {
            let dir = root.join(format!("n{id}"));
            let data_dir = dir.join("data");
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| format!("create {}: {e}", data_dir.display()))?;
            let socket = dir.join("vigil.sock");
            let config = dir.join("config.toml");
            write(
                &config,
                &config_text(
                    id,
                    &ports,
                    &data_dir,
                    &shared,
                    &socket,
                    &key_file,
                    &cluster.options,
                ),
            )?;
            cluster.hosts.push(Host {
                id,
                log: dir.join("agent.log"),
                dir,
                data_dir,
                config,
                socket,
                port: ports[id as usize - 1],
                child: None,
                stopped: false,
            });
        }
        for id in 1..=cluster.options.hosts as u64 {
            cluster.spawn(id)?;
        }
        for id in 1..=cluster.options.hosts as u64 {
            cluster.wait_ready(id, Duration::from_secs(30))?;
        }
        Ok(cluster)
    }

    pub fn host(&self, id: u64) -> &Host {
        &self.hosts[id as usize - 1]
    }

    pub fn ids(&self) -> Vec<u64> {
        self.hosts.iter().map(|h| h.id).collect()
    }

    /// Hosts whose agent runs and is not stopped.
    pub fn alive(&self) -> Vec<u64> {
        self.hosts
            .iter()
            .filter(|h| h.child.is_some() && !h.stopped)
            .map(|h| h.id)
            .collect()
    }

    fn spawn(&mut self, id: u64) -> Result<(), String> {
        use std::os::unix::process::CommandExt;
        let exe = self.options.exe.clone();
        let io = self.options.io.clone();
        let level = self.options.log_level.clone();
        let netns = self.options.netns.clone();
        let host = &mut self.hosts[id as usize - 1];
        assert!(host.child.is_none(), "host {id} already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&host.log)
            .map_err(|e| format!("open {}: {e}", host.log.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", host.log.display()))?;
        // `ip netns exec` execs the agent in place: the child's PID is the agent's.
        let mut command = match &netns {
            Some(prefix) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &format!("{prefix}n{id}")])
                    .arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        command
            .arg("agent")
            .arg("--config")
            .arg(&host.config)
            .arg("--io")
            .arg(&io)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        if let Some(level) = level {
            command.env("VIGIL_LOG", level);
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {} agent: {e}", exe.display()))?;
        host.child = Some(child);
        host.stopped = false;
        Ok(())
    }

    /// Starts host `id`'s agent again (after [`kill_agent`](Self::kill_agent) or
    /// [`kill_host`](Self::kill_host)) and waits until it answers.
    pub fn restart(&mut self, id: u64) -> Result<(), String> {
        self.spawn(id)?;
        self.wait_ready(id, Duration::from_secs(30))
    }

    /// Waits until host `id` answers `/status`; fails early if its agent exited.
    pub fn wait_ready(&mut self, id: u64, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if self.status(id).is_some() {
                return Ok(());
            }
            let host = &mut self.hosts[id as usize - 1];
            if let Some(child) = host.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    host.child = None;
                    return Err(format!(
                        "the agent of host {id} exited at start ({status}); its log:\n{}",
                        self.log_tail(id, 20)
                    ));
                }
            }
            if interrupted() {
                return Err("interrupted".into());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "the agent of host {id} did not answer on {} within {limit:?}; its log:\n{}",
                    self.host(id).socket.display(),
                    self.log_tail(id, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self, id: u64, timeout: Duration) -> Client {
        Client::new(&self.host(id).socket, timeout)
    }

    /// One request to host `id`: (status, JSON body) or a transport error.
    pub fn request(
        &self,
        id: u64,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), String> {
        let body = body.map(|b| b.to_string());
        let response = self
            .client(id, Duration::from_secs(10))
            .request(method, path, body.as_deref().map(str::as_bytes))
            .map_err(|e| format!("host {id}: {method} {path}: {e}"))?;
        let value = if response.body.is_empty() {
            serde_json::Value::Null
        } else {
            response.json().map_err(|e| {
                format!(
                    "host {id}: {method} {path}: {e}: {}",
                    String::from_utf8_lossy(&response.body)
                )
            })?
        };
        Ok((response.status, value))
    }

    pub fn status(&self, id: u64) -> Option<serde_json::Value> {
        match self.request(id, "GET", "/status", None) {
            Ok((200, v)) => Some(v),
            _ => None,
        }
    }

    /// Waits until a majority of all hosts agree on a leader among `among` that says it
    /// leads; returns (leader, term).
    pub fn wait_leader(&self, among: &[u64], limit: Duration) -> Result<(u64, u64), String> {
        let start = Instant::now();
        loop {
            let seen = match agreed_leader(among, self.hosts.len(), |id| self.status(id)) {
                Ok(found) => return Ok(found),
                Err(seen) => seen,
            };
            if interrupted() {
                return Err("interrupted".into());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "no leader among hosts {among:?} within {limit:?} (saw {seen:?})"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn agent_pid(&self, id: u64) -> Option<i32> {
        self.host(id).child.as_ref().map(|c| c.id() as i32)
    }

    /// Where host `id` keeps VM `vm`'s control socket and report file.
    pub fn vmm_dir(&self, id: u64, vm: &str) -> PathBuf {
        self.host(id).data_dir.join("vmm").join(vm)
    }

    pub fn reports_path(&self, id: u64, vm: &str) -> PathBuf {
        self.vmm_dir(id, vm).join("reports.log")
    }

    /// PIDs of host `id`'s VMM processes (their command lines name its data dir).
    pub fn vmm_pids(&self, id: u64) -> Vec<i32> {
        let agent = self.agent_pid(id);
        // With the trailing '/': ".../n1/data/" is no prefix of another host's paths.
        procs::pids_mentioning(&self.host(id).data_dir.join(""))
            .into_iter()
            .filter(|&pid| Some(pid) != agent)
            .collect()
    }

    /// The whole host dies: SIGKILL to its agent and every VMM it runs, then waits for
    /// them to exit.
    pub fn kill_host(&mut self, id: u64) -> Result<HostKill, String> {
        let data_dir = self.host(id).data_dir.join("");
        // Open the VMMs first so the kills follow each other as closely as possible.
        let vmms: Vec<Process> = self
            .vmm_pids(id)
            .into_iter()
            .filter_map(|pid| Process::open_checked(pid, &data_dir))
            .collect();
        let host = &mut self.hosts[id as usize - 1];
        let mut child = host
            .child
            .take()
            .ok_or_else(|| format!("host {id}'s agent is not running"))?;
        let agent_pid = child.id() as i32;
        let at_ns = monotonic_ns();
        // SAFETY: kill(2) on our own child, not yet waited for (its PID is still ours).
        unsafe { libc::kill(agent_pid, libc::SIGKILL) };
        for p in &vmms {
            p.signal(libc::SIGKILL);
        }
        let _ = child.wait();
        host.stopped = false;
        for p in &vmms {
            if !p.wait_exit(Duration::from_secs(10)) {
                return Err(format!("VMM {} of host {id} survived SIGKILL", p.pid));
            }
        }
        Ok(HostKill {
            host: id,
            agent_pid,
            vmm_pids: vmms.iter().map(|p| p.pid).collect(),
            at_ns,
        })
    }

    /// SIGKILL to host `id`'s agent only (its VMMs keep running, to be re-adopted).
    pub fn kill_agent(&mut self, id: u64) -> Result<i32, String> {
        let host = &mut self.hosts[id as usize - 1];
        let mut child = host
            .child
            .take()
            .ok_or_else(|| format!("host {id}'s agent is not running"))?;
        let pid = child.id() as i32;
        // SAFETY: kill(2) on our own child, not yet waited for.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let _ = child.kill();
        let _ = child.wait();
        host.stopped = false;
        Ok(pid)
    }

    fn signal_agent(&mut self, id: u64, signal: libc::c_int) -> Result<(), String> {
        let pid = self
            .agent_pid(id)
            .ok_or_else(|| format!("host {id}'s agent is not running"))?;
        // SAFETY: kill(2) on our own child, not yet waited for.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(format!(
                "signal {signal} to agent {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// SIGSTOP host `id`'s agent (its VMMs keep running and must fence themselves).
    pub fn sigstop(&mut self, id: u64) -> Result<(), String> {
        self.signal_agent(id, libc::SIGSTOP)?;
        self.hosts[id as usize - 1].stopped = true;
        Ok(())
    }

    pub fn sigcont(&mut self, id: u64) -> Result<(), String> {
        self.signal_agent(id, libc::SIGCONT)?;
        self.hosts[id as usize - 1].stopped = false;
        Ok(())
    }

    /// The last `lines` lines of host `id`'s agent log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.host(id).log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every host's log tail, for failure messages.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            out.push_str(&format!(
                "--- host {} ({}) ---\n{}\n",
                h.id,
                h.log.display(),
                self.log_tail(h.id, lines)
            ));
        }
        out
    }

    /// Kills every agent and VMM this cluster started (by PID; stopped ones too),
    /// waits for them, and removes the temp dir unless `keep`.
    pub fn cleanup(&mut self) -> Cleanup {
        let mut done = Cleanup::default();
        for host in &mut self.hosts {
            if let Some(mut child) = host.child.take() {
                let pid = child.id() as i32;
                // SAFETY: kill(2) on our own child, not yet waited for; SIGCONT so a
                // stopped agent can die.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                let _ = child.kill();
                let _ = child.wait();
                done.agents.push(pid);
            }
            host.stopped = false;
        }
        // With the trailing '/': no other cluster's root can start with it.
        done.vmms = procs::kill_all_mentioning(&self.root.join(""), Duration::from_secs(10));
        if !self.keep && std::fs::remove_dir_all(&self.root).is_ok() {
            done.removed = Some(self.root.clone());
        }
        self.cleaned = true;
        done
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if !self.cleaned {
            if std::thread::panicking() {
                self.keep = true;
                eprintln!("cluster files kept in {}", self.root.display());
            }
            self.cleanup();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_every_peer_timing_and_vms() {
        let options = Options {
            name: "t".into(),
            hosts: 3,
            vms: Some(VmsConfig {
                capacity_memory_mib: 512,
                capacity_vcpus: 4,
                abandon_after_ms: 5000,
            }),
            timing_toml: "lease_ms = 600\n".into(),
            exe: "vigil".into(),
            io: "auto".into(),
            log_level: None,
            netns: None,
        };
        let text = config_text(
            2,
            &[20001, 20002, 20003],
            Path::new("/t/n2/data"),
            Path::new("/t/shared"),
            Path::new("/t/n2/vigil.sock"),
            Path::new("/t/cluster.key"),
            &options,
        );
        assert!(text.contains("listen = \"127.0.0.1:20002\""), "{text}");
        assert!(text.contains("[timing]\nlease_ms = 600\n"), "{text}");
        assert!(
            text.contains("[vms]\ncapacity_memory_mib = 512\n"),
            "{text}"
        );
        assert_eq!(text.matches("[[peers]]").count(), 3);
        // Without the vms section and timing, the config is what the agent reads today.
        let plain = Options {
            vms: None,
            timing_toml: String::new(),
            ..options
        };
        let text = config_text(
            1,
            &[20001, 20002, 20003],
            Path::new("/t/n1/data"),
            Path::new("/t/shared"),
            Path::new("/t/n1/vigil.sock"),
            Path::new("/t/cluster.key"),
            &plain,
        );
        let config = crate::config::Config::parse(&text, Path::new("n1.toml")).unwrap();
        assert_eq!(config.peers.len(), 3);
        assert_eq!(config.shared_dir, Path::new("/t/shared"));
    }

    #[test]
    fn picked_ports_are_distinct_and_below_the_ephemeral_range() {
        for _ in 0..50 {
            let mut ports = pick_ports(7).unwrap();
            assert!(ports.iter().all(|p| (20_000..32_000).contains(p)));
            ports.sort_unstable();
            ports.dedup();
            assert_eq!(ports.len(), 7, "a port picked twice");
        }
    }
}
