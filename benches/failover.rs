//! Failover: kill -9 (and SIGSTOP) the leader of a real 3- or 5-node cluster on
//! 127.0.0.1; measure (a) until a surviving node names a new leader that says it leads,
//! (b) until the first write commits through a surviving node. When `etcd` is installed,
//! the same trials against an etcd cluster with matching heartbeat / election settings
//! (20 ms / 100 ms), in the same run, and the ratio. JSON lines on stdout.
//!
//! `cargo bench --bench failover -- --nodes 3|5 [--trials N]`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use support::{emit, stats, Etcd};

const HEARTBEAT_MS: u64 = 20;
const ELECTION_MS: u64 = 100;
/// etcd holds a proposal while it has no leader; each put attempt gives up after this
/// and retries (vigil answers `no_leader` at once, so it needs no such deadline).
const PUT_ATTEMPT_MS: u64 = 50;

fn args() -> (usize, usize) {
    let mut nodes = 3;
    let mut trials = 30;
    let a: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < a.len() {
        match a[i].as_str() {
            "--nodes" => {
                nodes = a[i + 1].parse().expect("--nodes N");
                i += 1;
            }
            "--trials" => {
                trials = a[i + 1].parse().expect("--trials N");
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    (nodes, trials)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One vigil trial: returns (leader known ms, first write ms, terms advanced).
fn vigil_trial(c: &mut common::Cluster, sigstop: bool, trial: usize) -> (f64, f64, u64) {
    let old = c.wait_leader();
    let term_before = c.status(old).and_then(|s| s["term"].as_u64()).unwrap_or(0);
    let survivors: Vec<u64> = c.alive().into_iter().filter(|&i| i != old).collect();
    let t0 = Instant::now();
    if sigstop {
        c.sigstop(old);
    } else {
        c.kill9(old);
    }
    let mut known: Option<Duration> = None;
    let mut written: Option<Duration> = None;
    let mut k = 0;
    while known.is_none() || written.is_none() {
        let via = survivors[k % survivors.len()];
        k += 1;
        if known.is_none() {
            if let Some(s) = c.status(via) {
                if let Some(l) = s["leader"]["node_id"].as_u64() {
                    if l != old && s["term"].as_u64() > Some(term_before) {
                        known = Some(t0.elapsed());
                    }
                }
            }
        }
        if written.is_none() && c.put(via, &format!("failover-{trial}"), "x").is_ok() {
            written = Some(t0.elapsed());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no failover in 30 s\n{}",
            c.logs()
        );
    }
    let new = c.wait_leader_among(&survivors);
    let term_after = c.status(new).and_then(|s| s["term"].as_u64()).unwrap_or(0);
    if term_after > term_before + 1 {
        // A multi-round election: show what the nodes logged, for diagnosis.
        eprintln!(
            "trial {trial}: {} terms\n{}",
            term_after - term_before,
            c.logs()
        );
    }
    if sigstop {
        c.sigcont(old);
    } else {
        c.restart(old);
    }
    // Let the old node rejoin and catch up before the next trial.
    let start = Instant::now();
    loop {
        if let Some(s) = c.status(old) {
            if s["role"] == "follower" && s["leader"]["node_id"].as_u64().is_some() {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "old leader never rejoined\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    (
        ms(known.unwrap()),
        ms(written.unwrap()),
        term_after - term_before,
    )
}

fn etcd_trial(e: &mut Etcd, sigstop: bool, trial: usize) -> Option<f64> {
    let old = e.wait_leader(Duration::from_secs(20))?;
    let survivors: Vec<usize> = (0..e.nodes.len())
        .filter(|&i| i != old && e.nodes[i].child.is_some())
        .collect();
    let t0 = Instant::now();
    if sigstop {
        e.signal(old, libc::SIGSTOP);
    } else {
        e.kill9(old);
    }
    let mut k = 0;
    let written = loop {
        let via = survivors[k % survivors.len()];
        k += 1;
        if let Ok(mut c) = e.connect_with_timeout(via, Duration::from_millis(PUT_ATTEMPT_MS)) {
            if Etcd::put(&mut c, &format!("failover-{trial}"), "x") {
                break t0.elapsed();
            }
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return None;
        }
    };
    if sigstop {
        e.signal(old, libc::SIGCONT);
    } else {
        e.restart(old);
    }
    std::thread::sleep(Duration::from_millis(1500));
    Some(ms(written))
}

fn main() {
    let (nodes, trials) = args();
    let timing = format!(
        "heartbeat_ms = {HEARTBEAT_MS}\nelection_min_ms = {ELECTION_MS}\nelection_max_ms = {}\n",
        2 * ELECTION_MS
    );
    let have_etcd = support::etcd_available();
    for sigstop in [false, true] {
        let case = format!("{}-{nodes}nodes", if sigstop { "sigstop" } else { "kill9" });
        let mut c = common::Cluster::start_with(&format!("bench-{case}"), nodes, "auto", &timing);
        let (mut known, mut written, mut max_terms) = (Vec::new(), Vec::new(), 0);
        for t in 0..trials {
            let (a, b, terms) = vigil_trial(&mut c, sigstop, t);
            eprintln!("vigil {case} trial {t}: leader known {a:.1} ms, first write {b:.1} ms, terms +{terms}");
            known.push(a);
            written.push(b);
            max_terms = max_terms.max(terms);
        }
        drop(c);
        let mut baseline = None;
        if have_etcd {
            let root = common::unique_dir(&format!("bench-etcd-{case}"));
            let mut e = Etcd::start(&root, nodes, HEARTBEAT_MS, ELECTION_MS);
            let mut samples = Vec::new();
            for t in 0..trials {
                match etcd_trial(&mut e, sigstop, t) {
                    Some(x) => {
                        eprintln!("etcd {case} trial {t}: first put {x:.1} ms");
                        samples.push(x);
                    }
                    None => {
                        eprintln!("etcd {case} trial {t}: failed (no leader or put within 30 s)")
                    }
                }
            }
            drop(e);
            let _ = std::fs::remove_dir_all(&root);
            if !samples.is_empty() {
                baseline = Some(stats(&samples));
            }
        } else {
            eprintln!("etcd not installed: no baseline (tools/install-etcd)");
        }
        let name = format!("etcd-3.4 hb={HEARTBEAT_MS} et={ELECTION_MS}");
        let extra = serde_json::json!({ "max_terms_per_failover": max_terms });
        if !sigstop {
            emit(
                "failover",
                &format!("{case}-leader-known"),
                "ms",
                &stats(&known),
                None,
                extra.clone(),
            );
        }
        emit(
            "failover",
            &format!("{case}-first-write"),
            "ms",
            &stats(&written),
            baseline.as_ref().map(|b| (name.as_str(), b)),
            extra,
        );
    }
}
