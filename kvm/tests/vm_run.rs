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
