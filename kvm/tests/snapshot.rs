//! Full and diff snapshots: restore continues the guest; a diff chain restores memory
//! exactly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil_kvm::snapshot::{RestoreOptions, SnapshotKind, SnapshotOptions};
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

/// A 64 MiB guest that keeps rewriting a quarter of its memory.
fn busy_vm() -> Vm {
    let mut config = VmConfig::new(64 << 20, 1);
    config.touch_percent = 25;
    config.touch_pages_per_round = 64;
    Vm::create(&config, None).expect("create")
}

/// A snapshot buffer that holds every page of a 64 MiB guest.
const BUFFER_FOR_ALL: SnapshotOptions = SnapshotOptions {
    buffer_cap_bytes: 64 << 20,
};

/// Restores `chain` and checks memory byte for byte and vCPU 0's counter.
fn restores_to(chain: &[PathBuf], memory: &[u8], counter: u64) -> Vm {
    restores_with(chain, &RestoreOptions::default(), memory, counter)
}

fn restores_with(chain: &[PathBuf], options: &RestoreOptions, memory: &[u8], counter: u64) -> Vm {
    let restored = Vm::restore_with(chain, true, None, options).expect("restore");
    let actual = memory_copy(&restored);
    let first_difference = memory.iter().zip(&actual).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "restored memory differs");
    assert_eq!(restored.counter_in_memory(0), counter);
    restored
}

/// A capture with a buffer big enough for the pages: the snapshot is memory at the
/// pause instant, also when the guest runs (and rewrites those pages) before it is
/// written. Full, then two diffs, each written only after the guest ran on; the chain
/// restores to exactly the memory of the last capture, and the guest continues.
#[test]
fn a_snapshot_written_after_resume_holds_memory_at_the_pause_instant() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("deferred");
    let mut vm = busy_vm();
    let options = BUFFER_FOR_ALL;
    let mut chain = Vec::new();
    let mut at_capture = Vec::new();
    let mut counter_at_capture = 0;
    for (i, kind) in [SnapshotKind::Full, SnapshotKind::Diff, SnapshotKind::Diff]
        .into_iter()
        .enumerate()
    {
        run_until_counter_grows(&vm, 3);
        let path = dir.path().join(format!("{i}"));
        let capture = vm.capture(kind, &path, &options).expect("capture");
        assert!(!capture.written_while_paused());
        assert!(capture.pages() > 0);
        at_capture = memory_copy(&vm);
        counter_at_capture = vm.counter_in_memory(0);
        // The guest runs on and rewrites its pages before the snapshot is written.
        run_until_counter_grows(&vm, 3);
        assert_ne!(memory_copy(&vm), at_capture, "the guest changed nothing");
        let info = vm.finish_snapshot(capture.write()).expect("write");
        assert!(!info.written_while_paused);
        assert_eq!(vm.last_snapshot_id(), Some(info.snapshot_id));
        chain.push(path);
    }
    drop(vm);

    let restored = restores_to(&chain, &at_capture, counter_at_capture);
    restored.resume().unwrap();
    wait_for(
        "the restored counter to grow",
        Duration::from_secs(60),
        || {
            assert!(restored.failure().is_none(), "{:?}", restored.failure());
            restored.counter_in_memory(0) > counter_at_capture + 2
        },
    );
}

/// A diff whose pages exceed the buffer is written while the vCPUs are paused (and
/// says so); it restores exactly too.
#[test]
fn a_diff_over_the_buffer_is_written_while_paused_and_restores() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("overcap");
    let mut vm = busy_vm();
    run_until_counter_grows(&vm, 3);
    let base = dir.path().join("full");
    vm.snapshot(SnapshotKind::Full, &base).expect("full");
    run_until_counter_grows(&vm, 3);
    let diff = dir.path().join("diff");
    // Room for two pages: the guest dirtied far more.
    let options = SnapshotOptions {
        buffer_cap_bytes: 2 * 4096,
    };
    let capture = vm
        .capture(SnapshotKind::Diff, &diff, &options)
        .expect("capture");
    assert!(capture.pages() > 2, "only {} dirty pages", capture.pages());
    assert!(capture.written_while_paused());
    let at_capture = memory_copy(&vm);
    let counter = vm.counter_in_memory(0);
    run_until_counter_grows(&vm, 3);
    let info = vm.finish_snapshot(capture.write()).expect("write");
    assert!(info.written_while_paused);
    drop(vm);

    restores_to(&[base, diff], &at_capture, counter);
}

/// A snapshot whose write fails does not become the parent: the next diff is relative
/// to the previous snapshot and includes the pages the failed one took. One capture at
/// a time.
#[test]
fn a_failed_write_keeps_the_parent_and_the_next_diff_covers_its_pages() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("failed");
    let mut vm = busy_vm();
    let options = BUFFER_FOR_ALL;
    run_until_counter_grows(&vm, 3);
    let base = dir.path().join("full");
    let full_id = vm
        .snapshot(SnapshotKind::Full, &base)
        .expect("full")
        .snapshot_id;
    run_until_counter_grows(&vm, 3);
    // A file where the snapshot directory should go: the write cannot succeed.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, b"not a directory").unwrap();
    let capture = vm
        .capture(SnapshotKind::Diff, &blocked, &options)
        .expect("capture");
    let other = vm.capture(SnapshotKind::Diff, &dir.path().join("x"), &options);
    assert!(other
        .err()
        .expect("a second capture in flight")
        .to_string()
        .contains("one snapshot at a time"));
    run_until_counter_grows(&vm, 3);
    let err = vm
        .finish_snapshot(capture.write())
        .expect_err("write into a file succeeded");
    assert!(err.to_string().contains("blocked"), "{err}");
    assert_eq!(vm.last_snapshot_id(), Some(full_id));

    run_until_counter_grows(&vm, 3);
    let diff = dir.path().join("diff");
    vm.snapshot(SnapshotKind::Diff, &diff)
        .expect("diff after the failure");
    let expected = memory_copy(&vm);
    let counter = vm.counter_in_memory(0);
    drop(vm);
    restores_to(&[base, diff], &expected, counter);
}

/// A chain restores the same whether its diffs' pages are mapped over the image (the
/// default) or copied in (no mappings allowed).
#[test]
fn diff_pages_mapped_or_copied_restore_the_same_memory() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("mapped");
    let mut vm = busy_vm();
    run_until_counter_grows(&vm, 3);
    let mut chain = vec![dir.path().join("full")];
    vm.snapshot(SnapshotKind::Full, &chain[0]).expect("full");
    for i in 1..=2 {
        run_until_counter_grows(&vm, 3);
        let path = dir.path().join(format!("diff-{i}"));
        vm.snapshot(SnapshotKind::Diff, &path).expect("diff");
        chain.push(path);
    }
    let expected = memory_copy(&vm);
    let counter = vm.counter_in_memory(0);
    drop(vm);
    let mapped = restores_to(&chain, &expected, counter);
    let timings = mapped.restore_timings().expect("restore timings");
    assert!(timings.diff_runs_mapped > 0 && timings.diff_runs_copied == 0);
    drop(mapped);
    let copy_all = RestoreOptions {
        max_mapped_diff_runs: 0,
    };
    let copied = restores_with(&chain, &copy_all, &expected, counter);
    let timings = copied.restore_timings().expect("restore timings");
    assert!(timings.diff_runs_copied > 0 && timings.diff_runs_mapped == 0);
}

#[test]
fn a_restore_that_expects_other_snapshot_ids_is_refused() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("expect");
    let snap = dir.path().join("snap-1");
    let config = VmConfig::new(64 << 20, 1);
    let mut vm = Vm::create(&config, None).expect("create");
    let info = vm.snapshot(SnapshotKind::Full, &snap).expect("snapshot");
    drop(vm);
    let chain = std::slice::from_ref(&snap);
    let options = RestoreOptions::default();
    let wrong = info.snapshot_id ^ 1;
    let err = Vm::restore_checked(chain, Some(&[wrong]), true, None, &options)
        .err()
        .expect("a restore of another snapshot than the expected one must fail");
    assert!(
        err.to_string().contains(&format!("{wrong:#x}")) && err.to_string().contains("snap-1"),
        "the error names the file and the expected id: {err}"
    );
    let err = Vm::restore_checked(chain, Some(&[]), true, None, &options)
        .err()
        .expect("a count mismatch must fail");
    assert!(err.to_string().contains("expected"), "{err}");
    let vm = Vm::restore_checked(chain, Some(&[info.snapshot_id]), true, None, &options)
        .expect("the expected snapshot restores");
    drop(vm);
}
