//! A VM's host cut off the network (each agent in its own network namespace, veth +
//! bridge, nftables drops every packet between the host and the others; root,
//! /dev/kvm, ip and nft): its VMM fences itself, the VM is restored elsewhere, and once
//! the network heals the old host never runs it again. Proved from the guests' own
//! timestamped reports across both hosts.

#[path = "common/vms.rs"]
mod vms;

use std::time::{Duration, Instant};

use vigil::demo::local::LocalCluster;
use vms::*;

#[test]
fn a_partitioned_vm_host_fences_and_the_vm_runs_once() {
    if skip() {
        return;
    }
    if let Some(why) = netns_problem() {
        eprintln!("skipped: {why}");
        return;
    }
    let namespaces = Namespaces::create(3);
    // Declared after `namespaces`: dropped first, so every process is dead before the
    // namespaces go.
    let c = match LocalCluster::start(options("vm-partition", Some(namespaces.prefix.clone()))) {
        Ok(c) => c,
        Err(e) => panic!("cluster did not start: {e}"),
    };
    registered(&c);
    let before = create_running(&c, "a", 300);
    let victim = before.host.unwrap();
    make_not_leader(&c, victim);
    namespaces.isolate(victim);

    wait_fenced(&c, victim, "a", "a cut-off host");
    // Ask the majority side only: the cut-off host still believes "a" is its own.
    let majority: Vec<u64> = c.ids().into_iter().filter(|&h| h != victim).collect();
    let after = {
        let start = Instant::now();
        loop {
            let seen = majority.iter().find_map(|&h| {
                let v = vigil::demo::vms::get(&c, h, "a").ok()??;
                let host = v.host?;
                (host != victim).then(|| vigil::demo::vms::get(&c, host, "a").ok()?)?
            });
            if let Some(v) = seen.filter(|v| v.running()) {
                break v;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "\"a\" was never restored on the majority side\n{}",
                c.logs(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(after.token > before.token);
    let new_host = after.host.unwrap();
    wait_first_report(&c, new_host, "a", after.token);
    namespaces.heal(victim);

    let start = Instant::now();
    while vmm_state(&c, victim, "a").is_some() {
        assert!(
            start.elapsed() < PATIENCE,
            "the healed host kept its VMM of a moved VM\n{}",
            c.logs(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_old_host_ran_it_once(&c, "a", victim, before.token, (new_host, after.token));
    drop(c);
    drop(namespaces);
}
