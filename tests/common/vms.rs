//! Helpers for the real-process VM tests (`tests/vm_*.rs`) and the resurrect benchmark:
//! a cluster of agents with `[vms]` sections (`vigil::demo::local`: every process is
//! killed by PID on drop, VMMs included), the skip rule, waits on VM state, the guests'
//! report files, and network namespaces for the partition test.
//!
//! Included with `#[path = "common/vms.rs"] mod vms;` (it does not need `common/mod.rs`).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vigil::demo::local::{LocalCluster, Options, VmsConfig};
use vigil::demo::reports::{self, Report};
use vigil::demo::vms::{self, VmView};

/// Generous: CI machines are slow and shared; tests poll, they never time behaviour.
pub const PATIENCE: Duration = Duration::from_secs(40);

/// Why the VM tests cannot run here, if they cannot (they need root and /dev/kvm).
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    vigil_kvm::kvm_available().err()
}

/// Prints the reason and returns true when the test must skip.
pub fn skip() -> bool {
    match skip_reason() {
        Some(why) => {
            eprintln!("skipped: {why}");
            true
        }
        None => false,
    }
}

pub fn options(name: &str, netns: Option<String>) -> Options {
    Options {
        name: name.into(),
        hosts: 3,
        vms: Some(VmsConfig {
            capacity_memory_mib: 1024,
            capacity_vcpus: 8,
            // A fenced VMM nobody renews exits after this (it is killed on drop anyway).
            abandon_after_ms: 10_000,
        }),
        timing_toml: String::new(),
        exe: PathBuf::from(env!("CARGO_BIN_EXE_vigil")),
        io: "auto".into(),
        log_level: None,
        netns,
    }
}

/// A 3-host cluster with VMs on 127.0.0.1 and default timings; panics with the agents'
/// logs on failure.
pub fn start(name: &str) -> LocalCluster {
    start_with(name, "")
}

/// The same with extra `[timing]` lines.
pub fn start_with(name: &str, timing_toml: &str) -> LocalCluster {
    let mut options = options(name, None);
    options.timing_toml = timing_toml.to_string();
    match LocalCluster::start(options) {
        Ok(c) => {
            registered(&c);
            c
        }
        Err(e) => panic!("cluster did not start: {e}"),
    }
}

/// Waits until every host has registered with the cluster as alive.
pub fn registered(c: &LocalCluster) {
    let all = c.ids();
    ok(c, vms::wait_hosts_alive(c, &all, PATIENCE));
}

/// Unwraps or panics with the cluster's logs.
/// Host `host`'s `/metrics` text (fails the test, with the logs, if it cannot be read).
pub fn metrics_of(c: &LocalCluster, host: u64) -> String {
    let response = ok(
        c,
        c.client(host, PATIENCE)
            .request("GET", "/metrics", None)
            .map_err(|e| e.to_string()),
    );
    String::from_utf8_lossy(&response.body).into_owned()
}

pub fn ok<T>(c: &LocalCluster, r: Result<T, String>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}\n{}", c.logs(30)),
    }
}

pub fn leader(c: &LocalCluster) -> (u64, u64) {
    let alive = c.alive();
    ok(c, c.wait_leader(&alive, PATIENCE))
}

/// Creates VM `id` (64 MiB test guest, snapshots every `snapshot_ms`) and waits until it
/// runs and has a committed snapshot.
pub fn create_running(c: &LocalCluster, id: &str, snapshot_ms: u64) -> VmView {
    let body = vms::spec(id, 64, snapshot_ms, vigil::demo::monotonic_ns());
    ok(c, vms::create(c, &body, PATIENCE));
    wait_vm(c, id, "running with a committed snapshot", |v| {
        v.running() && !v.snapshot_chain.is_empty()
    })
}

pub fn wait_vm(c: &LocalCluster, id: &str, what: &str, done: impl Fn(&VmView) -> bool) -> VmView {
    ok(c, vms::wait_for(c, id, what, PATIENCE, done))
}

/// Makes `want` the leader (step-down with a target) and waits until it leads.
pub fn make_leader(c: &LocalCluster, want: u64) {
    let start = Instant::now();
    loop {
        let (l, _) = leader(c);
        if l == want {
            return;
        }
        let _ = c.request(
            l,
            "POST",
            "/leadership/stepdown",
            Some(&json!({ "to": want })),
        );
        assert!(
            start.elapsed() < PATIENCE,
            "leadership never moved to host {want}\n{}",
            c.logs(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Moves leadership away from `host` if it leads.
pub fn make_not_leader(c: &LocalCluster, host: u64) {
    let (l, _) = leader(c);
    if l == host {
        let other = c.ids().into_iter().find(|&h| h != host).unwrap();
        make_leader(c, other);
    }
}

/// One host's reports of VM `vm`, parsed (panics with the parse error).
pub fn reports_on(c: &LocalCluster, host: u64, vm: &str) -> Vec<Report> {
    match reports::read(&c.reports_path(host, vm)) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

/// Every host's reports of VM `vm`.
pub fn reports_of(c: &LocalCluster, vm: &str) -> Vec<(u64, Vec<Report>)> {
    c.ids()
        .into_iter()
        .map(|h| (h, reports_on(c, h, vm)))
        .collect()
}

/// The split-brain check from the guests' own reports (see `reports::check_runs`).
pub fn check_no_overlap(c: &LocalCluster, vm: &str) -> Vec<reports::Run> {
    match reports::check_runs(&reports_of(c, vm)) {
        Ok(runs) => runs,
        Err(e) => panic!("{vm}: {e}\n{}", c.logs(30)),
    }
}

/// Waits for vCPU 0's first report with `token` in `host`'s report file of `vm`.
pub fn wait_first_report(c: &LocalCluster, host: u64, vm: &str, token: u64) -> Report {
    let start = Instant::now();
    loop {
        if let Some(r) = reports_on(c, host, vm)
            .into_iter()
            .find(|r| r.token == token && r.vcpu == 0)
        {
            return r;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{vm}: no report with token {token} on host {host}\n{}",
            c.logs(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After a VM moved off `victim` (a frozen or cut-off host) to `new`: the VM runs on
/// at its new place, no two runs overlap in time, and the old host ran it exactly once,
/// under its old token (it never came back there).
pub fn assert_old_host_ran_it_once(
    c: &LocalCluster,
    vm: &str,
    victim: u64,
    old_token: u64,
    (new_host, new_token): (u64, u64),
) {
    wait_reports_grow(c, new_host, vm, new_token, 20);
    let runs = check_no_overlap(c, vm);
    let on_victim: Vec<_> = runs.iter().filter(|r| r.host == victim).collect();
    assert_eq!(
        on_victim.len(),
        1,
        "the old host ran it once only: {runs:?}"
    );
    assert_eq!(on_victim[0].token, old_token);
}

/// Waits until `host`'s report file of `vm` has `more` lines with `token` than now.
pub fn wait_reports_grow(c: &LocalCluster, host: u64, vm: &str, token: u64, more: usize) {
    let count = || {
        reports_on(c, host, vm)
            .iter()
            .filter(|r| r.token == token)
            .count()
    };
    let base = count();
    let start = Instant::now();
    while count() < base + more {
        assert!(
            start.elapsed() < PATIENCE,
            "{vm}: guest on host {host} (token {token}) stopped reporting\n{}",
            c.logs(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A write that may answer 202 (in progress): 200 or 202 is fine, anything else panics.
pub fn accepted(c: &LocalCluster, method: &str, path: &str, body: &Value) -> Value {
    let (status, v) = ok(c, vms::write_retry(c, method, path, body, PATIENCE));
    assert!(
        status == 200 || status == 202,
        "{method} {path} answered {status}: {v}\n{}",
        c.logs(30)
    );
    v
}

/// `GET /hosts` through any live host: the host object of `id`.
pub fn host_state(c: &LocalCluster, id: u64) -> Option<String> {
    for via in c.alive() {
        if let Ok((200, v)) = c.request(via, "GET", "/hosts", None) {
            return v["hosts"]
                .as_array()?
                .iter()
                .find(|h| h["id"].as_u64() == Some(id))
                .and_then(|h| h["state"].as_str().map(str::to_string));
        }
    }
    None
}

/// Waits until the VMM of `vm` on `host` has fenced (paused itself for want of a lease);
/// `why` names the situation in the failure message.
pub fn wait_fenced(c: &LocalCluster, host: u64, vm: &str, why: &str) {
    let start = Instant::now();
    loop {
        match vmm_state(c, host, vm) {
            Some(s) if s.state == vigil_kvm::control::VmmState::Fenced => return,
            other => assert!(
                start.elapsed() < PATIENCE,
                "the VMM of {why} never fenced: {other:?}\n{}",
                c.logs(30)
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VMM state of `vm` on `host`, asked over its control socket directly.
pub fn vmm_state(c: &LocalCluster, host: u64, vm: &str) -> Option<vigil_kvm::control::Status> {
    let socket = c.vmm_dir(host, vm).join("control.sock");
    let mut client = vigil_kvm::control::Client::connect(
        &socket,
        Duration::from_secs(2),
        vigil::limits::MAX_VMM_CONTROL_FRAME_BYTES,
    )
    .ok()?;
    client.status_of(&vigil_kvm::control::Request::Status).ok()
}

// ---- network namespaces (root) ---------------------------------------------------------

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Why network namespaces cannot be used here, if they cannot (`netns::probe`).
pub fn netns_problem() -> Option<String> {
    netns::probe().err()
}

#[path = "netns.rs"]
mod netns;

/// Host i in namespace `{prefix}n{i}` (10.200.0.i on a veth), all on a bridge in
/// `{prefix}hub`; deleted on drop (after the cluster, which must be dropped first).
pub struct Namespaces {
    pub prefix: String,
    pub hosts: u64,
}

impl Namespaces {
    pub fn create(hosts: u64) -> Namespaces {
        use std::sync::atomic::{AtomicU64, Ordering};
        static K: AtomicU64 = AtomicU64::new(0);
        let ns = Namespaces {
            prefix: format!(
                "vgv{}x{}",
                std::process::id(),
                K.fetch_add(1, Ordering::Relaxed)
            ),
            hosts,
        };
        let hub = format!("{}hub", ns.prefix);
        let nodes: Vec<String> = (1..=hosts).map(|i| ns.host(i)).collect();
        netns::build_bridged(&hub, &nodes, &|args: &[&str]| {
            sh(args).unwrap_or_else(|e| panic!("{e}"))
        });
        ns
    }

    pub fn host(&self, id: u64) -> String {
        format!("{}n{id}", self.prefix)
    }

    /// Drops every packet between host `id` and all other hosts (nft in its namespace).
    pub fn isolate(&self, id: u64) {
        let others: Vec<String> = (1..=self.hosts)
            .filter(|&h| h != id)
            .map(|h| format!("10.200.0.{h}"))
            .collect();
        let set = others.join(", ");
        let script = format!(
            "table inet vigil_fault {{\n chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("{}-{id}.nft", self.prefix));
        std::fs::write(&path, script).unwrap();
        let ns = self.host(id);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "nft",
            "-f",
            path.to_str().unwrap(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_file(&path);
    }

    pub fn heal(&self, id: u64) {
        let ns = self.host(id);
        let _ = sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "nft",
            "delete",
            "table",
            "inet",
            "vigil_fault",
        ]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for i in 1..=self.hosts {
            let _ = sh(&["ip", "netns", "del", &self.host(i)]);
        }
        let _ = sh(&["ip", "netns", "del", &format!("{}hub", self.prefix)]);
    }
}
