//! The VM side of the control API (see the contract in the `vms` work) as the demo, the
//! tests and the benchmark use it: create VMs, read where they run, wait for states.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::demo::interrupted;
use crate::demo::local::LocalCluster;

/// What one VM looks like from the cluster and from the host that runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct VmView {
    pub id: String,
    pub host: Option<u64>,
    pub token: u64,
    pub waiting: Option<String>,
    /// The committed snapshot's chain (paths under the shared dir) and its id.
    pub snapshot_chain: Vec<PathBuf>,
    pub snapshot_id: Option<String>,
    /// From the running host's VMM: state, counter, pid.
    pub local_state: Option<String>,
    pub counter: Option<u64>,
    pub pid: Option<i32>,
}

impl VmView {
    pub fn from_json(v: &Value) -> Result<VmView, String> {
        let id = v["id"]
            .as_str()
            .ok_or_else(|| format!("VM object without an \"id\": {v}"))?
            .to_string();
        let snapshot = &v["snapshot"];
        let chain = match &snapshot["chain"] {
            Value::Array(items) => items
                .iter()
                .map(|p| {
                    p.as_str()
                        .map(PathBuf::from)
                        .ok_or_else(|| format!("VM {id}: snapshot chain entry {p} is not a path"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        let snapshot_id = match &snapshot["id"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        };
        let local = &v["local"];
        Ok(VmView {
            host: v["host"].as_u64(),
            token: v["token"].as_u64().unwrap_or(0),
            waiting: v["waiting"].as_str().map(str::to_string),
            snapshot_chain: chain,
            snapshot_id,
            local_state: local["state"].as_str().map(str::to_string),
            counter: local["counter"].as_u64(),
            pid: local["pid"].as_i64().map(|p| p as i32),
            id,
        })
    }

    /// Placed, and its host's VMM runs it and has reported at least once.
    pub fn running(&self) -> bool {
        self.host.is_some()
            && self.local_state.as_deref() == Some("running")
            && self.counter.is_some_and(|c| c > 0)
    }
}

/// The body of `POST /vms` for a built-in test guest.
pub fn spec(id: &str, memory_mib: u64, snapshot_interval_ms: u64, request_id: u64) -> Value {
    json!({
        "id": id,
        "memory_mib": memory_mib,
        "vcpus": 1,
        "touch_percent": 0,
        "snapshot_interval_ms": snapshot_interval_ms,
        "full_every": 10,
        "request_id": request_id,
    })
}

/// Sends a write to each live host in turn until one answers with a status other than
/// 503 (no leader yet / retry), with the same body (and request id) each time.
pub fn write_retry(
    cluster: &LocalCluster,
    method: &str,
    path: &str,
    body: &Value,
    limit: Duration,
) -> Result<(u16, Value), String> {
    let start = Instant::now();
    let mut k = 0;
    loop {
        let alive = cluster.alive();
        if alive.is_empty() {
            return Err(format!("{method} {path}: no host is running"));
        }
        let via = alive[k % alive.len()];
        k += 1;
        let last = match cluster.request(via, method, path, Some(body)) {
            Ok((503, v)) => format!("host {via} answered 503 {v}"),
            Ok(answer) => return Ok(answer),
            Err(e) => e,
        };
        if interrupted() {
            return Err("interrupted".into());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "{method} {path}: no answer within {limit:?}; last: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates a VM; an error names what the cluster answered.
pub fn create(cluster: &LocalCluster, body: &Value, limit: Duration) -> Result<VmView, String> {
    let (status, v) = write_retry(cluster, "POST", "/vms", body, limit)?;
    match status {
        200 | 201 => VmView::from_json(&v["vm"]),
        404 | 405 => Err(format!(
            "POST /vms answered {status} {v}: this agent has no VM API"
        )),
        _ => Err(format!("POST /vms answered {status}: {v}")),
    }
}

/// The cluster's view of VM `id` through host `via` (None: 404).
/// A 503 (leadership changing under a linearizable read: documented as retryable) is
/// retried for up to `READ_RETRY`.
pub fn get(cluster: &LocalCluster, via: u64, id: &str) -> Result<Option<VmView>, String> {
    const READ_RETRY: Duration = Duration::from_secs(3);
    let start = Instant::now();
    loop {
        match cluster.request(via, "GET", &format!("/vms/{id}"), None)? {
            (200, v) => return VmView::from_json(&v).map(Some),
            (404, _) => return Ok(None),
            (503, _) if start.elapsed() < READ_RETRY && !interrupted() => {
                std::thread::sleep(Duration::from_millis(20));
            }
            (status, v) => return Err(format!("host {via}: GET /vms/{id} answered {status}: {v}")),
        }
    }
}

/// VM `id` as seen by the host that runs it (which fills `local`), asked through any
/// live host first to learn where it is.
pub fn view(cluster: &LocalCluster, id: &str) -> Result<Option<VmView>, String> {
    let alive = cluster.alive();
    let mut last = String::from("no host is running");
    for via in alive.iter().copied() {
        match get(cluster, via, id) {
            Ok(Some(v)) => {
                return match v.host {
                    Some(h) if h != via && alive.contains(&h) => get(cluster, h, id),
                    _ => Ok(Some(v)),
                }
            }
            Ok(None) => return Ok(None),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Polls VM `id` until `done` holds; the error says what was seen last.
pub fn wait_for(
    cluster: &LocalCluster,
    id: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&VmView) -> bool,
) -> Result<VmView, String> {
    let start = Instant::now();
    loop {
        let last = match view(cluster, id) {
            Ok(Some(v)) if done(&v) => return Ok(v),
            Ok(Some(v)) => format!("{v:?}"),
            Ok(None) => format!("{id} does not exist"),
            Err(e) => e,
        };
        if interrupted() {
            return Err("interrupted".into());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "{id}: {what}: not within {limit:?}; last seen: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `GET /hosts` lists every host of `hosts` as alive (registered with the
/// cluster, so placement can spread VMs over all of them).
pub fn wait_hosts_alive(
    cluster: &LocalCluster,
    hosts: &[u64],
    limit: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let mut last = String::from("no answer");
        for via in cluster.alive() {
            match cluster.request(via, "GET", "/hosts", None) {
                Ok((200, v)) => {
                    let alive: Vec<u64> = v["hosts"]
                        .as_array()
                        .map(|list| {
                            list.iter()
                                .filter(|h| h["state"] == "alive")
                                .filter_map(|h| h["id"].as_u64())
                                .collect()
                        })
                        .unwrap_or_default();
                    if hosts.iter().all(|h| alive.contains(h)) {
                        return Ok(());
                    }
                    last = format!("alive: {alive:?}");
                    break;
                }
                Ok((status, v)) => last = format!("GET /hosts answered {status}: {v}"),
                Err(e) => last = e,
            }
        }
        if interrupted() {
            return Err("interrupted".into());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "hosts {hosts:?} did not all register as alive within {limit:?} ({last})"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_contracts_vm_object() {
        let v = json!({
            "id": "vm1", "memory_mib": 64, "vcpus": 1, "desired": "running", "host": 2,
            "token": 17, "waiting": null, "migrating_to": null,
            "snapshot": {"id": "17-3", "kind": "diff", "chain": ["vms/vm1/17-1", "vms/vm1/17-3"], "index": 40},
            "local": {"state": "running", "counter": 1234, "pid": 4321}
        });
        let view = VmView::from_json(&v).unwrap();
        assert_eq!(view.host, Some(2));
        assert_eq!(view.token, 17);
        assert_eq!(view.snapshot_chain.len(), 2);
        assert_eq!(view.snapshot_id.as_deref(), Some("17-3"));
        assert_eq!((view.counter, view.pid), (Some(1234), Some(4321)));
        assert!(view.running());
        let waiting = json!({"id": "vm2", "host": null, "token": 0, "waiting": "no host has room",
                             "snapshot": null, "local": null});
        let view = VmView::from_json(&waiting).unwrap();
        assert!(!view.running());
        assert_eq!(view.waiting.as_deref(), Some("no host has room"));
        assert!(VmView::from_json(&json!({"host": 1})).is_err());
        let bad_chain = json!({"id": "x", "snapshot": {"chain": [5]}});
        assert!(VmView::from_json(&bad_chain)
            .unwrap_err()
            .contains("chain entry 5"));
    }
}
