//! Host faults with real agents and real VMs (root + /dev/kvm; skipped with the reason otherwise): a
//! host killed with SIGKILL (agent and VMMs), a host that leads killed, an agent frozen
//! with SIGSTOP, an agent restarted within its lease, drain and migrate. Safety is
//! checked from the guests' own timestamped report files: a VM's reports from two
//! placements never interleave in time, and counters never go back except to the
//! snapshot a failover restores.
//!
//! Also: a retried create is idempotent and a conflicting one answers 409; a host
//! killed with SIGKILL is shown dead; a restarted agent starts no VMM; a deleted VM's
//! snapshot directory is removed from shared storage. (This file absorbed
//! tests/vm_failover.rs, which covered the same kill -9 and restart cases.)
//!
//! Every agent and VMM is killed by PID when a test ends (also when it fails): see
//! `vigil::demo::local`.

#[path = "common/vms.rs"]
mod vms;

use std::time::{Duration, Instant};

use serde_json::json;
use vigil::demo::snapshot::counter_in_chain;
use vigil::demo::vms::VmView;
use vms::*;

/// kill -9 of the host running VM "a" (its agent and its VMM): the VM runs again on
/// another host, from at least the committed snapshot's counter, and never twice.
fn kill_host_of_a_vm(name: &str, victim_leads: bool) {
    if skip() {
        return;
    }
    let mut c = start(name);
    let before = if victim_leads {
        create_running(&c, "a", 300)
    } else {
        create_idempotently(&c, "a", 300)
    };
    let victim = before.host.unwrap();
    if !victim_leads {
        // A snapshot asked for through the API commits and says what it is. A scheduled
        // snapshot may be in flight: that answer is 409 `busy`, documented as retryable.
        let mut attempts = 0;
        let (status, v) = loop {
            let (status, v) = ok(
                &c,
                c.request(
                    victim,
                    "POST",
                    "/vms/a/snapshot",
                    Some(&json!({"kind": "full"})),
                ),
            );
            attempts += 1;
            if status == 409 && v["code"] == "busy" && attempts < 50 {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            break (status, v);
        };
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["snapshot"]["kind"], "full", "{v}");
    }
    if victim_leads {
        make_leader(&c, victim);
    } else {
        make_not_leader(&c, victim);
    }
    // The committed snapshot right now, a full one and at least one diff on top; the
    // one restored can only be this or newer.
    let before = wait_vm(&c, "a", "running with a diff snapshot committed", |v| {
        v.running() && v.snapshot_chain.len() >= 2
    });
    let snapshot_counter = ok(&c, counter_in_chain(&c.shared, &before.snapshot_chain, 0));
    assert!(snapshot_counter > 0, "the snapshot holds a counter of 0");
    let kill = {
        let r = c.kill_host(victim);
        ok(&c, r)
    };
    assert_eq!(kill.vmm_pids.len(), 1, "host {victim} ran one VMM");
    let last_old = reports_on(&c, victim, "a")
        .into_iter()
        .rev()
        .find(|r| r.vcpu == 0)
        .expect("the guest reported on its first host");

    let after = wait_vm(&c, "a", "running on another host", |v| {
        v.running() && v.host.is_some_and(|h| h != victim)
    });
    assert!(
        after.token > before.token,
        "a new placement has a larger token: {} then {}",
        before.token,
        after.token
    );
    let new_host = after.host.unwrap();
    assert_eq!(
        host_state(&c, victim).as_deref(),
        Some("dead"),
        "the killed host is shown dead"
    );
    let first = wait_first_report(&c, new_host, "a", after.token);
    assert!(
        first.counter >= snapshot_counter,
        "resumed at {} but the committed snapshot held {snapshot_counter}",
        first.counter
    );
    assert!(
        first.counter <= last_old.counter + 1,
        "resumed at {}, beyond anything the killed host ran ({})",
        first.counter,
        last_old.counter
    );
    assert!(first.at_ns > kill.at_ns, "reported before the kill");
    wait_reports_grow(&c, new_host, "a", after.token, 5);
    let runs = check_no_overlap(&c, "a");
    assert_eq!(runs.len(), 2, "one run per placement: {runs:?}");
    assert_eq!((runs[0].host, runs[1].host), (victim, new_host));
}

/// Creates VM `id` with a fixed request id, then checks that the same create again
/// (through every host) gets the original answer and that a different spec under the
/// same id conflicts; waits until it runs with a committed snapshot.
fn create_idempotently(c: &vigil::demo::local::LocalCluster, id: &str, snapshot_ms: u64) -> VmView {
    let body = vigil::demo::vms::spec(id, 64, snapshot_ms, 77);
    let (status, first) = ok(
        c,
        vigil::demo::vms::write_retry(c, "POST", "/vms", &body, PATIENCE),
    );
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["vm"]["id"], id);
    // The token changes once, when the leader places the VM; retry after that, so that
    // any change of token or host afterwards can only come from a retry.
    let placed = wait_vm(c, id, "placed", |v| v.host.is_some());
    for via in c.ids() {
        let (status, again) = ok(c, c.request(via, "POST", "/vms", Some(&body)));
        assert_eq!(
            status, 201,
            "a retried create through host {via} is idempotent: {again}"
        );
        // The VM was not created or placed again: same placement entry (token) and
        // host. (The answer's "index" is the retried entry's own index.)
        assert_eq!(
            (again["vm"]["token"].as_u64(), again["vm"]["host"].as_u64()),
            (Some(placed.token), placed.host),
            "the retry created the VM again: {again}"
        );
    }
    let other = json!({"id": id, "memory_mib": 128, "vcpus": 1});
    let (status, v) = ok(
        c,
        vigil::demo::vms::write_retry(c, "POST", "/vms", &other, PATIENCE),
    );
    assert_eq!(status, 409, "another spec under an existing id: {v}");
    wait_vm(c, id, "running with a committed snapshot", |v| {
        v.running() && !v.snapshot_chain.is_empty()
    })
}

#[test]
fn kill9_of_a_vm_host_restores_the_vm_elsewhere() {
    kill_host_of_a_vm("vm-kill9", false);
}

#[test]
fn kill9_of_a_vm_host_that_is_the_leader() {
    kill_host_of_a_vm("vm-kill9-leader", true);
}

/// SIGSTOP of the agent of VM "a"'s host: the VMM fences itself at its lease deadline,
/// the VM is restored elsewhere, and after SIGCONT the old host never runs it again.
#[test]
fn sigstop_of_an_agent_fences_its_vmm_and_the_vm_runs_once() {
    if skip() {
        return;
    }
    let mut c = start("vm-sigstop");
    let before = create_running(&c, "a", 300);
    let victim = before.host.unwrap();
    make_not_leader(&c, victim);
    {
        let r = c.sigstop(victim);
        ok(&c, r)
    };
    // The VMM enforces the lease by itself while its agent is frozen.
    wait_fenced(&c, victim, "a", "a frozen agent");
    let after = wait_vm(&c, "a", "restored on another host", |v| {
        v.running() && v.host.is_some_and(|h| h != victim)
    });
    let new_host = after.host.unwrap();
    wait_first_report(&c, new_host, "a", after.token);
    {
        let r = c.sigcont(victim);
        ok(&c, r)
    };
    // The thawed agent learns that "a" moved; its VMM must never run again.
    let start = Instant::now();
    loop {
        let gone = vmm_state(&c, victim, "a").is_none();
        if gone {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the old host kept its VMM of a moved VM\n{}",
            c.logs(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_old_host_ran_it_once(&c, "a", victim, before.token, (new_host, after.token));
    let seen_by_victim = ok(&c, vigil::demo::vms::get(&c, victim, "a")).unwrap();
    assert_eq!(seen_by_victim.host, Some(new_host), "the old host's view");
    assert!(seen_by_victim.local_state.is_none(), "{seen_by_victim:?}");
}

/// A VMM that stops answering (SIGSTOP: its control connection stays open, the request
/// in flight is never answered) is killed by its agent after the request timeout, and
/// the VM runs again in a new VMM (on the same host: its placement did not change). The agent's connection
/// to the killed VMM closes with its receive in flight: the agent must keep the fd until
/// the cancelled receive completed, and loses no buffer (it would abort otherwise).
#[test]
fn a_hung_vmm_is_killed_and_its_vm_runs_again() {
    if skip() {
        return;
    }
    // On both I/O backends: the connection's operations are emulated on epoll.
    for io in ["uring", "epoll"] {
        hung_vmm_on(io);
    }
}

fn hung_vmm_on(io: &str) {
    let mut options = options(&format!("vm-hung-vmm-{io}"), None);
    options.io = io.into();
    let c = match vigil::demo::local::LocalCluster::start(options) {
        Ok(c) => c,
        Err(e) => panic!("cluster ({io}) did not start: {e}"),
    };
    registered(&c);
    let a = create_running(&c, "a", 300);
    let host = a.host.unwrap();
    let pid = a.pid.expect("local pid");
    // SAFETY: plain syscall; `pid` is the VMM's (its agent's child, which has not reaped
    // it: it just answered a status request).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let after = wait_vm(&c, "a", "running in a new VMM", |v| {
        v.running() && v.pid.is_some_and(|p| p != pid)
    });
    let new_host = after.host.unwrap();
    wait_first_report(&c, new_host, "a", after.token);
    wait_reports_grow(&c, new_host, "a", after.token, 5);
    // Killed and reaped, not left frozen beside the new one. (It ran under the same
    // placement, so the new VMM restored the committed snapshot: its counter restarts
    // from there, which `check_no_overlap` would call going back within a run.)
    // SAFETY: plain syscall; signal 0 only checks that the pid exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "the hung VMM {pid} still exists\n{}", c.logs(30));
    let metrics = metrics_of(&c, host);
    assert!(
        metrics.contains("vigil_vmm_kills_total 1\n"),
        "the agent did not kill its hung VMM once:\n{metrics}"
    );
    assert!(
        metrics.contains("vigil_vmm_io_refused_total 0\n"),
        "{metrics}"
    );
    assert!(
        c.log_tail(host, 400).contains("did not answer"),
        "{}",
        c.logs(30)
    );
}

/// kill -9 of an agent alone, started again at once: its VMs keep running on that host
/// in the same VMM processes, none moves, none is restored.
#[test]
fn agent_restart_within_the_lease_keeps_its_vms() {
    if skip() {
        return;
    }
    // A 3 s lease: "within the lease" must hold on a slow, shared CI machine too (the
    // restart is a process start, a WAL replay and a reconnect).
    let mut c = start_with("vm-restart", "lease_ms = 3000");
    let a = create_running(&c, "a", 300);
    let host = a.host.unwrap();
    make_not_leader(&c, host);
    let pids = c.vmm_pids(host);
    assert_eq!(
        pids,
        vec![a.pid.expect("local pid")],
        "one VMM, the one named"
    );
    let killed = Instant::now();
    {
        let r = c.kill_agent(host);
        ok(&c, r)
    };
    {
        let r = c.restart(host);
        ok(&c, r)
    };
    // Until well past the time the leader may declare a silent host dead (L(1 + eps)
    // after its last ack), so a host wrongly declared dead would have lost "a" by now.
    while killed.elapsed() < Duration::from_millis(3030 + 1000) {
        wait_reports_grow(&c, host, "a", a.token, 10);
    }
    let now = wait_vm(&c, "a", "running", |v| v.running());
    assert_eq!(now.host, Some(host), "moved: {now:?}");
    assert_eq!(now.token, a.token, "placed again: {now:?}");
    assert_eq!(now.pid, a.pid, "a new VMM process: {now:?}");
    assert_eq!(c.vmm_pids(host), pids);
    assert_eq!(host_state(&c, host).as_deref(), Some("alive"));
    let runs = check_no_overlap(&c, "a");
    assert_eq!(runs.len(), 1, "restored somewhere: {runs:?}");
    let metrics = metrics_of(&c, host);
    assert!(
        metrics.contains("vigil_vmm_starts_total 0"),
        "the restarted agent started a VMM:\n{metrics}"
    );
}

/// A planned move keeps every round of work: the new placement's first counter is past
/// the old one's last.
fn assert_continues(c: &vigil::demo::local::LocalCluster, vm: &str, from: u64) -> u64 {
    let after = wait_vm(c, vm, "running after the move", |v| {
        v.running() && v.host.is_some_and(|h| h != from)
    });
    let host = after.host.unwrap();
    wait_first_report(c, host, vm, after.token);
    wait_reports_grow(c, host, vm, after.token, 5);
    let runs = check_no_overlap(c, vm);
    assert!(runs.len() >= 2, "{vm} never moved: {runs:?}");
    assert_eq!(runs.last().unwrap().host, host);
    for pair in runs.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        assert!(
            new.first_counter >= old.last_counter,
            "{vm}: counter went back from {:?} (host {}) to {:?} (host {}) in a planned move",
            old.last_counter,
            old.host,
            new.first_counter,
            new.host
        );
    }
    host
}

#[test]
fn drain_and_migrate_never_move_a_counter_backwards() {
    if skip() {
        return;
    }
    let c = start("vm-moves");
    let a = create_running(&c, "a", 1000);
    let from = a.host.unwrap();
    accepted(&c, "POST", "/vms/a/migrate", &json!({}));
    let to = assert_continues(&c, "a", from);

    let b = create_running(&c, "b", 1000);
    let drained = b.host.unwrap();
    accepted(&c, "POST", &format!("/hosts/{drained}/drain"), &json!({}));
    let start = Instant::now();
    while host_state(&c, drained).as_deref() != Some("drained") {
        assert!(
            start.elapsed() < PATIENCE,
            "host {drained} never drained: {:?}\n{}",
            host_state(&c, drained),
            c.logs(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_continues(&c, "b", drained);
    if to == drained {
        assert_continues(&c, "a", drained);
    }
    for id in ["a", "b"] {
        let v = wait_vm(&c, id, "running", |v| v.running());
        assert_ne!(v.host, Some(drained), "{id} is still on the drained host");
    }
    // A deleted VM's snapshots leave shared storage (removed off the agents' loops).
    let dir = c.shared.join("vms/a");
    assert!(dir.exists(), "{} holds a's snapshots", dir.display());
    accepted(&c, "DELETE", "/vms/a", &json!({}));
    let start = Instant::now();
    while dir.exists() {
        assert!(
            start.elapsed() < PATIENCE,
            "{} is still there after the delete\n{}",
            dir.display(),
            c.logs(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        c.shared.join("vms/b").exists(),
        "b's snapshots were removed too"
    );
}
