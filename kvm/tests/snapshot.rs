//! Full and diff snapshots: restore continues the guest; a diff chain restores memory
//! exactly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil_kvm::snapshot::SnapshotKind;
use vigil_kvm::vm::{Vm, VmConfig};

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "vigil-kvm-{name}-{}-{}",
            std::process::id(),
            vigil_kvm::monotonic_ns()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_until_counter_grows(vm: &Vm, by: u64) {
    let start = vm.counter_in_memory(0);
    vm.resume().expect("resume");
    wait_for("the counter to grow", Duration::from_secs(60), || {
        assert!(vm.failure().is_none(), "{:?}", vm.failure());
        vm.counter_in_memory(0) >= start + by
    });
    vm.pause().expect("pause");
}

fn memory_copy(vm: &Vm) -> Vec<u8> {
    let mut bytes = vec![0u8; vm.memory().len() as usize];
    vm.memory().read_bytes(0, &mut bytes);
    bytes
}

#[test]
fn full_snapshot_restores_and_the_counter_continues() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("full");
    let snap = dir.path().join("snap-1");
    let mut config = VmConfig::new(64 << 20, 1);
    config.touch_percent = 25;
    config.touch_pages_per_round = 64;
    let mut vm = Vm::create(&config, None).expect("create");
    run_until_counter_grows(&vm, 5);
    let at_snapshot = vm.counter_in_memory(0);
    let info = vm.snapshot(SnapshotKind::Full, &snap).expect("snapshot");
    assert!(info.pages_written > 0);
    // The original keeps running past the snapshot; the restored one must start from
    // the snapshot, not from where the original got to, and never from 0.
    run_until_counter_grows(&vm, 3);
    drop(vm);

    let restored = Vm::restore(std::slice::from_ref(&snap), true, None).expect("restore");
    assert_eq!(restored.counter_in_memory(0), at_snapshot);
    restored.resume().expect("resume restored");
    wait_for(
        "the restored counter to grow",
        Duration::from_secs(60),
        || {
            assert!(restored.failure().is_none(), "{:?}", restored.failure());
            restored.reports() >= 3
        },
    );
    let reported = restored.counters()[0];
    assert!(
        reported > at_snapshot,
        "restored guest reported {reported}, snapshot had {at_snapshot}"
    );
    // A restored VM can itself be snapshotted and restored again.
    restored.pause().expect("pause restored");
    let again = dir.path().join("snap-2");
    let mut restored = restored;
    let at_second = restored.counter_in_memory(0);
    restored
        .snapshot(SnapshotKind::Full, &again)
        .expect("second snapshot");
    drop(restored);
    let twice = Vm::restore(&[again], true, None).expect("restore twice");
    assert_eq!(twice.counter_in_memory(0), at_second);
    twice.resume().unwrap();
    wait_for(
        "the twice-restored counter to grow",
        Duration::from_secs(60),
        || twice.counter_in_memory(0) > at_second + 2,
    );
}

#[test]
fn diff_chain_restores_memory_exactly() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("diff");
    let mut config = VmConfig::new(64 << 20, 1);
    config.touch_percent = 50;
    config.touch_pages_per_round = 32;
    let mut vm = Vm::create(&config, None).expect("create");
    run_until_counter_grows(&vm, 3);
    let base = dir.path().join("0-full");
    vm.snapshot(SnapshotKind::Full, &base).expect("full");
    let mut chain = vec![base];
    for i in 1..=3 {
        run_until_counter_grows(&vm, 3);
        let path = dir.path().join(format!("{i}-diff"));
        let info = vm.snapshot(SnapshotKind::Diff, &path).expect("diff");
        let total = vm.memory().pages();
        assert!(
            info.pages_written > 0 && info.pages_written < total / 2,
            "diff {i} wrote {} of {total} pages",
            info.pages_written
        );
        chain.push(path);
    }
    let expected = memory_copy(&vm);
    let counter = vm.counter_in_memory(0);
    drop(vm);

    let restored = Vm::restore(&chain, true, None).expect("restore chain");
    let actual = memory_copy(&restored);
    let first_difference = expected.iter().zip(&actual).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "restored memory differs");
    assert_eq!(restored.counter_in_memory(0), counter);
    // A chain with a link missing is refused, naming the broken link.
    let broken = [chain[0].clone(), chain[2].clone()];
    let err = Vm::restore(&broken, true, None)
        .err()
        .expect("broken chain accepted");
    assert!(err.to_string().contains("diff of snapshot"), "{err}");
    // And the restored guest runs on.
    restored.resume().unwrap();
    wait_for(
        "the chain-restored counter to grow",
        Duration::from_secs(60),
        || restored.counter_in_memory(0) > counter + 2,
    );
}

/// A large guest (2 GiB, sparse: the guest keeps writing 1 % of it) through a full
/// snapshot and a chain of two diffs. The restored memory equals the original in every
/// page the guest or the VMM wrote (low memory and the touch region) and in a sample
/// of the untouched rest; the counter continues.
#[test]
fn large_guest_restores_through_a_full_and_diff_chain() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("large");
    let mut config = VmConfig::new(2 << 30, 1);
    config.touch_percent = 1;
    config.touch_pages_per_round = 256;
    let mut vm = Vm::create(&config, None).expect("create a 2 GiB VM");
    run_until_counter_grows(&vm, 3);
    let base = dir.path().join("0-full");
    vm.snapshot(SnapshotKind::Full, &base).expect("full");
    let mut chain = vec![base];
    for i in 1..=2 {
        run_until_counter_grows(&vm, 3);
        let path = dir.path().join(format!("{i}-diff"));
        let info = vm.snapshot(SnapshotKind::Diff, &path).expect("diff");
        let total = vm.memory().pages();
        assert!(
            info.pages_written > 0 && info.pages_written < total / 50,
            "diff {i} wrote {} of {total} pages",
            info.pages_written
        );
        chain.push(path);
    }
    // Low memory and the touch region (1 % of memory, rounded up), plus a margin.
    let written = vigil_kvm::guest::TOUCH_REGION_GPA + vm.memory().len() / 100 + (1 << 20);
    let mut ranges = vec![(0, written)];
    // Samples of memory nobody wrote: they must read back as zero on both sides.
    let len = vm.memory().len();
    for at in [len / 4, len / 2, len - (1 << 20)] {
        ranges.push((at, 1 << 20));
    }
    let read = |vm: &Vm| -> Vec<Vec<u8>> {
        ranges
            .iter()
            .map(|&(start, n)| {
                let mut bytes = vec![0u8; n as usize];
                vm.memory().read_bytes(start, &mut bytes);
                bytes
            })
            .collect()
    };
    let expected = read(&vm);
    let counter = vm.counter_in_memory(0);
    drop(vm);

    let restored = Vm::restore(&chain, true, None).expect("restore the chain");
    assert_eq!(restored.memory().len(), 2 << 30);
    let actual = read(&restored);
    for (i, (e, a)) in expected.iter().zip(&actual).enumerate() {
        let first = e.iter().zip(a).position(|(x, y)| x != y);
        assert_eq!(
            first, None,
            "restored memory differs in range {i} (from {:#x})",
            ranges[i].0
        );
    }
    assert!(expected[1..].iter().all(|r| r.iter().all(|&b| b == 0)));
    assert_eq!(restored.counter_in_memory(0), counter);
    restored.resume().unwrap();
    wait_for(
        "the large restored counter to grow",
        Duration::from_secs(60),
        || {
            assert!(restored.failure().is_none(), "{:?}", restored.failure());
            restored.counter_in_memory(0) > counter + 2
        },
    );
}
