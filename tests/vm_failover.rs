//! A VM survives the death of its host, with real agents and real `vigil vmm` processes
//! (needs root and /dev/kvm; skipped with the reason otherwise).
//!
//! Three agents with `[vms]`; create a VM; it runs (its report file grows); take a
//! snapshot through the API after reading the guest's counter C; kill -9 the host's
//! agent AND its VMM (the whole host died); the VM runs on another host under a new
//! fencing token, and its guest counter resumes from at least C (the committed snapshot
//! was taken after C was reported, and counters only grow).
//!
//! And an agent restart (kill -9, start again): the new agent adopts the VMM it finds
//! instead of starting one; the VM keeps its host, token and process.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Cluster;

/// Generous: CI machines are slow and shared; tests poll, they never time behaviour.
const PATIENCE: Duration = Duration::from_secs(60);

fn skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root");
        return true;
    }
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return true;
    }
    false
}

/// `(status, JSON body)` of one request to node `id`.
fn call(
    c: &Cluster,
    id: u64,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    match c.client(id).request(method, path, body.map(str::as_bytes)) {
        Ok(r) => (r.status, r.json().unwrap_or(serde_json::Value::Null)),
        Err(e) => (0, serde_json::json!({ "error": e.to_string() })),
    }
}

/// Polls `f` until it returns Some, or fails the test with `what` and the logs.
fn wait_for<T>(c: &Cluster, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > PATIENCE {
            panic!("timed out waiting for {what}\n{}", c.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `(token, counter)` of every report line in a VMM report file.
fn reports(path: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [_, token, _, counter] => Some((token.parse().ok()?, counter.parse().ok()?)),
                _ => None,
            }
        })
        .collect()
}

fn report_file(c: &Cluster, host: u64, vm: &str) -> std::path::PathBuf {
    c.node(host)
        .dir
        .join("data/vmm")
        .join(vm)
        .join("reports.log")
}

#[test]
fn a_vm_runs_again_on_another_host_after_its_host_dies() {
    if skip() {
        return;
    }
    let mut c = Cluster::start_vms(
        "vmfail",
        3,
        "auto",
        "capacity_memory_mib = 256\ncapacity_vcpus = 4",
    );
    let leader = c.wait_leader();
    wait_for(&c, "three registered hosts", || {
        let (s, v) = call(&c, leader, "GET", "/hosts", None);
        (s == 200 && v["hosts"].as_array().is_some_and(|h| h.len() == 3)).then_some(())
    });
    let create = r#"{"id":"vm1","memory_mib":64,"vcpus":1,"snapshot_interval_ms":500,"full_every":4,"request_id":77}"#;
    let created = wait_for(&c, "the VM to be created", || {
        let (s, v) = call(&c, 1, "POST", "/vms", Some(create));
        (s == 201).then_some(v)
    });
    assert_eq!(created["vm"]["id"], "vm1");
    // The same request again (same id and request id) gets the original answer.
    let (s, _) = call(&c, 2, "POST", "/vms", Some(create));
    assert_eq!(s, 201, "a retried create is idempotent");
    // A different create of the same id conflicts.
    let (s, v) = call(
        &c,
        3,
        "POST",
        "/vms",
        Some(r#"{"id":"vm1","memory_mib":128,"vcpus":1}"#),
    );
    assert_eq!(s, 409, "{v}");

    let (host, token) = wait_for(&c, "the VM to run on a host", || {
        let (s, v) = call(&c, 1, "GET", "/vms/vm1", None);
        let host = v["host"].as_u64()?;
        (s == 200).then_some((host, v["token"].as_u64()?))
    });
    let file = report_file(&c, host, "vm1");
    let grown = wait_for(&c, "the guest to report", || {
        let r = reports(&file);
        (r.len() >= 5).then_some(r.len())
    });
    wait_for(&c, "the report file to grow", || {
        (reports(&file).len() > grown).then_some(())
    });
    assert!(reports(&file).iter().all(|&(t, _)| t == token));

    // C, then a snapshot that is taken after C was reported.
    let counter_before = reports(&file).iter().map(|&(_, n)| n).max().unwrap();
    let snapshot = wait_for(&c, "an API snapshot to commit", || {
        let (s, v) = call(
            &c,
            host,
            "POST",
            "/vms/vm1/snapshot",
            Some(r#"{"kind":"full"}"#),
        );
        (s == 200).then_some(v)
    });
    assert_eq!(snapshot["snapshot"]["kind"], "full");
    let vmm_pid = wait_for(&c, "the VMM's pid", || {
        let (_, v) = call(&c, host, "GET", "/vms/vm1", None);
        v["local"]["pid"].as_i64()
    });

    // The host dies: its agent and its VMM.
    c.kill9(host);
    // SAFETY: plain kill(2) of the VMM this test's cluster started.
    unsafe { libc::kill(vmm_pid as i32, libc::SIGKILL) };
    let survivor = (1..=3).find(|&n| n != host).unwrap();

    let (new_host, new_token) = wait_for(&c, "the VM to be placed on another host", || {
        let (s, v) = call(&c, survivor, "GET", "/vms/vm1", None);
        let h = v["host"].as_u64()?;
        (s == 200 && h != host).then_some((h, v["token"].as_u64()?))
    });
    assert!(new_token > token, "fencing tokens only grow");
    let (_, hosts) = call(&c, survivor, "GET", "/hosts", None);
    let dead = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == host)
        .unwrap();
    assert_eq!(dead["state"], "dead", "{hosts}");

    let new_file = report_file(&c, new_host, "vm1");
    let resumed = wait_for(&c, "the guest to report on its new host", || {
        let r: Vec<u64> = reports(&new_file)
            .into_iter()
            .filter(|&(t, _)| t == new_token)
            .map(|(_, n)| n)
            .collect();
        (r.len() >= 3).then_some(r)
    });
    assert!(
        resumed[0] >= counter_before,
        "restored counter {} is below {counter_before}, reported before the committed snapshot",
        resumed[0]
    );
    assert!(
        resumed.windows(2).all(|w| w[0] < w[1]),
        "the counter keeps growing: {resumed:?}"
    );
    // The old host's report file got nothing after the kill under the new token.
    assert!(reports(&file).iter().all(|&(t, _)| t == token));
}

#[test]
fn a_restarted_agent_adopts_its_running_vmm() {
    if skip() {
        return;
    }
    // A long lease, so that the restart surely beats the leader's L(1 + eps) wait: the
    // test is about adoption, not about how fast an agent starts.
    let mut c = Cluster::start_vms_with(
        "vmadopt",
        3,
        "auto",
        "lease_ms = 3000",
        "capacity_memory_mib = 256\ncapacity_vcpus = 4",
    );
    c.wait_leader();
    let create = r#"{"id":"vm1","memory_mib":64,"vcpus":1,"snapshot_interval_ms":500}"#;
    wait_for(&c, "the VM to be created", || {
        (call(&c, 1, "POST", "/vms", Some(create)).0 == 201).then_some(())
    });
    let (host, token, pid) = wait_for(&c, "the VM to run", || {
        let (_, v) = call(&c, 1, "GET", "/vms/vm1", None);
        let host = v["host"].as_u64()?;
        let (_, local) = call(&c, host, "GET", "/vms/vm1", None);
        (local["local"]["state"] == "running").then_some((
            host,
            v["token"].as_u64()?,
            local["local"]["pid"].as_i64()?,
        ))
    });
    c.kill9(host);
    c.restart(host);
    wait_for(&c, "the restarted agent to adopt the VMM", || {
        let (s, v) = call(&c, host, "GET", "/vms/vm1", None);
        (s == 200 && v["local"]["state"] == "running" && v["local"]["counter"].as_u64().is_some())
            .then_some(())
            .filter(|_| {
                assert_eq!(v["host"], host, "the VM moved: {v}");
                assert_eq!(v["token"], token, "the VM was placed again: {v}");
                assert_eq!(v["local"]["pid"], pid, "another VMM runs it: {v}");
                true
            })
    });
    let metrics = c
        .client(host)
        .request("GET", "/metrics", None)
        .map(|r| String::from_utf8_lossy(&r.body).to_string())
        .unwrap();
    assert!(
        metrics.contains("vigil_vmm_starts_total 0"),
        "the restarted agent started a VMM:\n{metrics}"
    );
    // The guest keeps counting under the same token.
    let file = report_file(&c, host, "vm1");
    let before = reports(&file).len();
    wait_for(&c, "the guest to keep reporting", || {
        (reports(&file).len() > before + 3).then_some(())
    });
    let all = reports(&file);
    assert!(all.iter().all(|&(t, _)| t == token));
    assert!(
        all.windows(2).all(|w| w[0].1 < w[1].1),
        "the counter never went back (no restart from a snapshot)"
    );
}
