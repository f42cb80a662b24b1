//! The VM API's shape on a real agent, without running any VM (no root or /dev/kvm
//! needed: the host's capacity is below the smallest VM, so every VM waits):
//! `GET /vms` answers in bounded pages with a `next` cursor, and every `/events` line
//! (also the `leader` greeting) carries `at_ms` and `node`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::Cluster;

const PATIENCE: Duration = Duration::from_secs(30);

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

#[test]
fn vms_are_listed_in_pages_and_events_say_who_and_when() {
    // 32 MiB: less than any VM, so VMs are created but wait; no VMM is started.
    let c = Cluster::start_vms(
        "vmapi",
        1,
        "auto",
        "capacity_memory_mib = 32\ncapacity_vcpus = 1",
    );
    c.wait_leader();

    let mut greeting = None;
    c.client(1)
        .stream_lines("/events", |line| {
            greeting = serde_json::from_str::<serde_json::Value>(line).ok();
            false
        })
        .expect("GET /events");
    let greeting = greeting.expect("a first event");
    assert_eq!(greeting["type"], "leader", "{greeting}");
    assert_eq!(greeting["node"], 1, "{greeting}");
    assert!(
        greeting["at_ms"].as_f64().is_some_and(|t| t > 0.0),
        "{greeting}"
    );

    let ids: BTreeSet<String> = (0..7).map(|i| format!("vm{i}")).collect();
    for id in &ids {
        let body = format!(r#"{{"id":"{id}","memory_mib":64,"vcpus":1}}"#);
        let start = Instant::now();
        loop {
            let (s, v) = call(&c, 1, "POST", "/vms", Some(&body));
            if s == 201 {
                break;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "create {id}: {s} {v}\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // Pages of 3: 3 + 3 + 1, each naming where the next starts.
    let mut seen = Vec::new();
    let mut path = "/vms?limit=3".to_string();
    let mut pages = 0;
    loop {
        let (s, v) = call(&c, 1, "GET", &path, None);
        assert_eq!(s, 200, "{path}: {v}");
        let page = v["vms"].as_array().expect("vms").clone();
        assert!(page.len() <= 3, "{path}: {v}");
        for vm in &page {
            assert!(vm["waiting"].is_string(), "{vm}");
            seen.push(vm["id"].as_str().unwrap().to_string());
        }
        pages += 1;
        match v["next"].as_str() {
            Some(next) => {
                assert_eq!(Some(next), seen.last().map(String::as_str), "{v}");
                path = format!("/vms?limit=3&after={next}");
            }
            None => break,
        }
        assert!(pages <= ids.len(), "the cursor does not advance: {v}");
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        ids.iter().cloned().collect::<Vec<_>>(),
        "every VM once, in id order"
    );

    // Without a query: everything fits one default page.
    let (s, v) = call(&c, 1, "GET", "/vms", None);
    assert_eq!(s, 200);
    assert_eq!(v["vms"].as_array().unwrap().len(), ids.len());
    assert!(v["next"].is_null(), "{v}");

    // A bad page request is a clear 400.
    for bad in [
        "/vms?limit=0",
        "/vms?limit=100000",
        "/vms?after=",
        "/vms?sort=id",
    ] {
        let (s, v) = call(&c, 1, "GET", bad, None);
        assert_eq!(s, 400, "{bad}: {v}");
        assert!(v["error"].is_string(), "{bad}: {v}");
    }
}
