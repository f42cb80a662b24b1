//! The built-in guest runs, counts and reports; pause stops it.

use std::time::{Duration, Instant};

use vigil_kvm::vm::{Vm, VmConfig};

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn guest_counter_increases_and_pause_stops_it() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut config = VmConfig::new(64 << 20, 1);
    config.touch_percent = 10;
    config.touch_pages_per_round = 16;
    let vm = Vm::create(&config, None).expect("create VM");
    vm.resume().expect("resume");
    wait_for("10 reports", Duration::from_secs(60), || {
        assert!(vm.failure().is_none(), "{:?}", vm.failure());
        vm.reports() >= 10
    });
    let first = vm.counters()[0];
    wait_for("the counter to grow", Duration::from_secs(60), || {
        vm.counters()[0] > first + 5
    });
    vm.pause().expect("pause");
    let paused_at = vm.counter_in_memory(0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        vm.counter_in_memory(0),
        paused_at,
        "the guest ran while paused"
    );
    vm.resume().expect("resume again");
    wait_for(
        "the counter to grow after resume",
        Duration::from_secs(60),
        || vm.counter_in_memory(0) > paused_at + 3,
    );
}

#[test]
fn every_vcpu_counts_and_a_snapshot_restores_them_all() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut vm = Vm::create(&VmConfig::new(128 << 20, 2), None).expect("create VM");
    vm.resume().expect("resume");
    wait_for("both vCPUs to report", Duration::from_secs(60), || {
        assert!(vm.failure().is_none(), "{:?}", vm.failure());
        vm.counters().iter().all(|&c| c >= 3)
    });
    vm.pause().expect("pause");
    let at_snapshot = [vm.counter_in_memory(0), vm.counter_in_memory(1)];
    let dir = std::env::temp_dir().join(format!(
        "vigil-kvm-smp-{}-{}",
        std::process::id(),
        vigil_kvm::monotonic_ns()
    ));
    vm.snapshot(vigil_kvm::snapshot::SnapshotKind::Full, &dir)
        .expect("snapshot");
    drop(vm);
    let restored = Vm::restore(std::slice::from_ref(&dir), true, None).expect("restore");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(restored.vcpu_count(), 2);
    restored.resume().expect("resume restored");
    wait_for(
        "both restored vCPUs to count on",
        Duration::from_secs(60),
        || {
            assert!(restored.failure().is_none(), "{:?}", restored.failure());
            (0..2).all(|i| restored.counter_in_memory(i) > at_snapshot[i] + 2)
        },
    );
}

/// Pause and resume in quick succession, landing at arbitrary points of the guest's
/// loop (also inside its port I/O): the guest never fails, never goes backwards, and
/// never runs while paused.
#[test]
fn rapid_pause_resume_is_safe() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let vm = Vm::create(&VmConfig::new(64 << 20, 1), None).expect("create VM");
    let mut last = 0;
    for round in 0..200u64 {
        vm.resume().expect("resume");
        // Vary how long the guest runs: 0 to ~3 ms.
        std::thread::sleep(Duration::from_micros((round * 7919) % 3000));
        vm.pause().expect("pause");
        let now = vm.counter_in_memory(0);
        assert!(now >= last, "counter went back from {last} to {now}");
        std::thread::sleep(Duration::from_micros(200));
        assert_eq!(vm.counter_in_memory(0), now, "the guest ran while paused");
        last = now;
    }
    assert!(vm.failure().is_none(), "{:?}", vm.failure());
    vm.resume().expect("resume");
    wait_for(
        "the counter to grow after the storm",
        Duration::from_secs(60),
        || vm.counter_in_memory(0) > last + 3,
    );
}

/// A guest fault is reported as a failure, not a silent hang.
#[test]
fn a_faulting_guest_is_reported_as_failed() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let vm = Vm::create(&VmConfig::new(64 << 20, 1), None).expect("create VM");
    // `hlt` is privileged: in ring 3 it raises #GP at the first user instruction.
    vm.memory()
        .write_bytes(vigil_kvm::guest::USER_CODE_GPA, &[0xF4]);
    vm.resume().expect("resume");
    wait_for(
        "the failure to be reported",
        Duration::from_secs(60),
        || vm.failure().is_some(),
    );
    let failure = vm.failure().unwrap();
    assert!(failure.contains("#GP at rip 0x8000"), "{failure}");
    assert!(vm.resume().is_err(), "a failed VM must not resume");
}
