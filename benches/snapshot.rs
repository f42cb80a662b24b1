//! Snapshot, restore and fencing latency of the built-in guest.
//!
//! `cargo bench --bench snapshot` prints one JSON object per line on stdout
//! (`bench`, `case`, `unit`, `n`, `p50`, `p99`, `max`); progress goes to stderr. Cases,
//! per guest size (64 MiB, 512 MiB and 2 GiB; `VIGIL_BENCH_SIZES_MIB=64,4096`
//! overrides), with the guest writing 1 % of its memory (every page of that 1 % in
//! each ~10 ms round, so each diff covers the whole 1 %):
//! - `full-snapshot-<size>`: a full snapshot, from its capture until its files are
//!   written, fsynced and renamed (the guest runs again during the writing);
//! - `full-pause-<size>`: how long the vCPUs were paused for it (pause, capture,
//!   resume), as `vigil vmm` does it, with its default snapshot buffer;
//! - `diff-snapshot-<size>`, `diff-pause-<size>`: the same for a diff snapshot after
//!   the guest touched 1 % of memory;
//! - `{full,diff}-pause-{dirty-log,select,copy,state}-<size>`: parts of the capture:
//!   the dirty log (full: also SEEK_DATA), finding the non-zero pages (full only),
//!   copying the pages aside, saving vCPU and VM state;
//! - `restore-to-run-<size>`: from the spawn of `vigil vmm --restore <full> --restore
//!   <diff>` until its vCPUs are released into KVM_RUN (the VMM logs that instant);
//!   `restore-exec-<size>`: the part until the VMM's `main` is entered (fork + exec);
//!   `restore-in-vmm-<size>`: the part in `Vm::restore` (the VMM logs its breakdown);
//! - `restore-to-report-<size>`: from the same spawn until the restored guest's first
//!   report (an upper bound on the first guest instruction: the guest resumes in the
//!   middle of a ~10 ms round of work and reports at its end).
//!
//! And once, for a 64 MiB `vigil vmm` whose lease nobody renews:
//! - `fence-lateness`: from the lease deadline until the VMM has paused its vCPUs;
//! - `fence-last-report`: the guest's last report relative to the deadline (negative:
//!   before it).
//!
//! Needs /dev/kvm; without it, prints why on stderr and exits successfully.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vigil_kvm::control::{Client, Request, VmmState};
use vigil_kvm::monotonic_ns;
use vigil_kvm::snapshot::{CaptureTimings, SnapshotInfo, SnapshotKind, SnapshotOptions};
use vigil_kvm::vm::{Vm, VmConfig};

const MAX_FRAME: usize = vigil::limits::MAX_VMM_CONTROL_FRAME_BYTES;
const PATIENCE: Duration = Duration::from_secs(120);
/// What `vigil vmm` uses unless told otherwise.
const SNAPSHOT_OPTIONS: SnapshotOptions = SnapshotOptions {
    buffer_cap_bytes: vigil_kvm::vmm::DEFAULT_SNAPSHOT_BUFFER_MIB << 20,
};

/// One snapshot as `vigil vmm` takes it: pause, capture, resume, then write while the
/// guest runs. Returns what it wrote, the pause (ms) and capture-to-durable time (ms).
fn snapshot(vm: &mut Vm, kind: SnapshotKind, dir: &Path) -> (SnapshotInfo, f64, f64) {
    let paused = Instant::now();
    vm.pause().unwrap();
    let start = Instant::now();
    let capture = vm.capture(kind, dir, &SNAPSHOT_OPTIONS).unwrap();
    vm.resume().unwrap();
    let pause = ms(paused.elapsed());
    let info = vm.finish_snapshot(capture.write()).unwrap();
    (info, pause, ms(start.elapsed()))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn emit(case: &str, samples: &mut [f64]) {
    assert!(!samples.is_empty(), "{case}: no samples");
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{{\"bench\":\"snapshot\",\"case\":\"{case}\",\"unit\":\"ms\",\"n\":{},\"p50\":{:.3},\"p99\":{:.3},\"max\":{:.3}}}",
        samples.len(),
        percentile(samples, 50.0),
        percentile(samples, 99.0),
        samples[samples.len() - 1]
    );
}

/// The parts of captures, one case each (`%` in `case` names the part).
fn emit_parts(case: &str, parts: &[CaptureTimings], with_select: bool) {
    let ms = |f: fn(&CaptureTimings) -> u64| -> Vec<f64> {
        parts.iter().map(|p| ns_to_ms(f(p) as i64)).collect()
    };
    emit(&case.replace('%', "dirty-log"), &mut ms(|p| p.dirty_log_ns));
    if with_select {
        emit(&case.replace('%', "select"), &mut ms(|p| p.select_ns));
    }
    emit(&case.replace('%', "copy"), &mut ms(|p| p.memory_ns));
    emit(&case.replace('%', "state"), &mut ms(|p| p.state_ns));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ns_to_ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

fn wait_reports(vm: &Vm, more: u64) {
    let target = vm.reports() + more;
    let start = Instant::now();
    while vm.reports() < target {
        assert!(vm.failure().is_none(), "{:?}", vm.failure());
        assert!(start.elapsed() < PATIENCE, "no reports");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A `vigil vmm` child, killed by PID when dropped.
struct VmmChild(Child);

impl Drop for VmmChild {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn spawn_vmm(dir: &Path, name: &str, deadline_ns: u64, extra: &[&str]) -> VmmChild {
    let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("vmm")
        .arg("--control")
        .arg(dir.join(format!("{name}.sock")))
        .args(["--token", "1"])
        .args(["--lease-deadline-ns", &deadline_ns.to_string()])
        .arg("--report-file")
        .arg(dir.join(format!("{name}.reports")))
        .args(extra)
        .env("VIGIL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("spawn vigil vmm");
    VmmChild(child)
}

/// Report timestamps (first field of each line) of a report file.
fn report_times(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

/// The number logged after `marker` (e.g. "released at ") in a VMM log.
fn logged<T: std::str::FromStr>(path: &Path, marker: &str) -> Option<T> {
    let log = std::fs::read_to_string(path).ok()?;
    let at = log.find(marker)? + marker.len();
    log[at..].split(' ').next()?.parse().ok()
}

fn label(mib: u64) -> String {
    if mib >= 1024 && mib % 1024 == 0 {
        format!("{}GiB", mib / 1024)
    } else {
        format!("{mib}MiB")
    }
}

fn bench_size(mib: u64, rounds: usize, dir: &Path) {
    let label = label(mib);
    eprintln!("snapshot bench: {label}, {rounds} rounds");
    let mut config = VmConfig::new(mib << 20, 1);
    config.touch_percent = 1;
    // Every page of the 1 % in each round.
    let region_pages = ((mib << 20) - vigil_kvm::guest::TOUCH_REGION_GPA) / 4096;
    config.touch_pages_per_round = (region_pages / 100).max(1);
    let mut vm = Vm::create(&config, None).expect("create VM");
    vm.resume().unwrap();
    wait_reports(&vm, 20);

    let (mut full, mut full_pause, mut diff, mut diff_pause) = (vec![], vec![], vec![], vec![]);
    let (mut full_parts, mut diff_parts) = (vec![], vec![]);
    let (mut to_run, mut to_report, mut exec, mut in_vmm) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let base = dir.join(format!("{label}-{round}-full"));
        let child = dir.join(format!("{label}-{round}-diff"));
        let (full_info, pause, total) = snapshot(&mut vm, SnapshotKind::Full, &base);
        full.push(total);
        full_pause.push(pause);
        // Two rounds: the guest has written its whole 1 % since the full snapshot.
        wait_reports(&vm, 2);
        let (diff_info, pause, total) = snapshot(&mut vm, SnapshotKind::Diff, &child);
        diff.push(total);
        diff_pause.push(pause);
        assert!(
            !diff_info.written_while_paused,
            "the diff exceeded the buffer"
        );
        full_parts.push(full_info.pause);
        diff_parts.push(diff_info.pause);

        // Restore in a new process, as the agent does after a host failure.
        let name = format!("{label}-{round}-restored");
        let spawned = monotonic_ns();
        let restored = spawn_vmm(
            dir,
            &name,
            spawned + 600_000_000_000,
            &[
                "--restore",
                base.to_str().unwrap(),
                "--restore",
                child.to_str().unwrap(),
            ],
        );
        let reports = dir.join(format!("{name}.reports"));
        let log = dir.join(format!("{name}.log"));
        let start = Instant::now();
        // The first report, and the release instant: the VMM logs it right after
        // releasing the vCPUs, so on a loaded machine the guest may report first.
        let first_report = loop {
            let first = report_times(&reports).first().copied();
            if let (Some(t), Some(_)) = (first, logged::<u64>(&log, "released at ")) {
                break t;
            }
            assert!(start.elapsed() < PATIENCE, "the restored VM never reported");
            std::thread::sleep(Duration::from_micros(200));
        };
        let released = logged::<u64>(&log, "released at ").expect("no release instant logged");
        to_run.push(ns_to_ms(released as i64 - spawned as i64));
        let entered = logged::<u64>(&log, "main entered at ").expect("no main instant logged");
        exec.push(ns_to_ms(entered as i64 - spawned as i64));
        let took = logged::<f64>(&log, "restore took ").expect("no restore time logged");
        in_vmm.push(took);
        to_report.push(ns_to_ms(first_report as i64 - spawned as i64));
        drop(restored);
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&child);
        eprintln!(
            "  round {round}: full {:.1} ms ({} pages), diff {:.1} ms ({} pages), \
             pauses {:.2} / {:.2} ms, restore to run {:.1} ms (exec {:.1}, restore {:.1}), \
             to report {:.1} ms",
            full[round],
            full_info.pages_written,
            diff[round],
            diff_info.pages_written,
            full_pause[round],
            diff_pause[round],
            to_run[round],
            exec[round],
            in_vmm[round],
            to_report[round]
        );
    }
    vm.pause().unwrap();
    emit(&format!("full-snapshot-{label}"), &mut full);
    emit(&format!("full-pause-{label}"), &mut full_pause);
    emit(&format!("diff-snapshot-{label}"), &mut diff);
    emit(&format!("diff-pause-{label}"), &mut diff_pause);
    emit_parts(&format!("full-pause-%-{label}"), &full_parts, true);
    emit_parts(&format!("diff-pause-%-{label}"), &diff_parts, false);
    emit(&format!("restore-to-run-{label}"), &mut to_run);
    emit(&format!("restore-exec-{label}"), &mut exec);
    emit(&format!("restore-in-vmm-{label}"), &mut in_vmm);
    emit(&format!("restore-to-report-{label}"), &mut to_report);
}

/// A VMM whose lease nobody renews: how late after the deadline its vCPUs stop.
fn bench_fencing(rounds: usize, dir: &Path) {
    eprintln!("snapshot bench: fencing, {rounds} rounds");
    let (mut lateness, mut last_report) = (vec![], vec![]);
    for round in 0..rounds {
        let name = format!("fence-{round}");
        let deadline = monotonic_ns() + 1_500_000_000;
        let vmm = spawn_vmm(dir, &name, deadline, &["--abandon-after-ms", "600000"]);
        let socket = dir.join(format!("{name}.sock"));
        let start = Instant::now();
        loop {
            let fenced = Client::connect(&socket, PATIENCE, MAX_FRAME)
                .ok()
                .and_then(|mut c| c.status_of(&Request::Status).ok())
                .is_some_and(|s| s.state == VmmState::Fenced);
            if fenced {
                break;
            }
            assert!(start.elapsed() < PATIENCE, "the VMM never fenced");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        let log = dir.join(format!("{name}.log"));
        let paused = logged::<u64>(&log, "paused at ").expect("no fencing instant logged");
        let last = *report_times(&dir.join(format!("{name}.reports")))
            .last()
            .expect("the guest never reported");
        lateness.push(ns_to_ms(paused as i64 - deadline as i64));
        last_report.push(ns_to_ms(last as i64 - deadline as i64));
        drop(vmm);
        eprintln!(
            "  round {round}: vCPUs paused {:.3} ms after the deadline, last report at {:+.3} ms",
            lateness[round], last_report[round]
        );
    }
    emit("fence-lateness", &mut lateness);
    emit("fence-last-report", &mut last_report);
}

fn main() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("snapshot bench skipped: {why}");
        return;
    }
    let sizes: Vec<u64> = std::env::var("VIGIL_BENCH_SIZES_MIB")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![64, 512, 2048]);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("vigil-snapshot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for mib in sizes {
        bench_size(mib, 30, &dir);
    }
    bench_fencing(10, &dir);
    let _ = std::fs::remove_dir_all(&dir);
}
