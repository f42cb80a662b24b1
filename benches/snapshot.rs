//! Snapshot and restore latency of the built-in guest, and its report interval.
//!
//! `cargo bench --bench snapshot` prints one JSON object per line on stdout (progress
//! on stderr). Cases, per guest size (64 MiB and 1 GiB; `VIGIL_BENCH_SIZES_MIB=64,4096`
//! overrides):
//! - `full-<size>`: pause + full snapshot (memory + state written, fsynced, renamed);
//! - `diff-<size>`: pause + diff snapshot after ~100 ms of guest work;
//! - `restore-<size>`: restore of full + one diff until the vCPUs are ready to run;
//! - `restore-to-report-<size>`: restore, resume, until the guest's first report;
//! - `report-interval-<size>`: time between two guest reports (target ~10 ms).
//!
//! `VIGIL_BENCH_PREFILL=1` writes non-zero bytes into all guest memory above 2 MiB
//! before the guest starts, so full snapshots and restores move every page (cases get
//! a `-prefilled` suffix).
//!
//! Needs /dev/kvm; without it, prints why on stderr and exits successfully.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vigil_kvm::snapshot::SnapshotKind;
use vigil_kvm::vcpu::{Report, ReportSink};
use vigil_kvm::vm::{Vm, VmConfig};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn emit(case: &str, unit: &str, samples: &mut [f64], extra: &str) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{{\"bench\":\"snapshot\",\"case\":\"{case}\",\"unit\":\"{unit}\",\"n\":{},\"p50\":{:.3},\"p99\":{:.3},\"max\":{:.3}{extra}}}",
        samples.len(),
        percentile(samples, 50.0),
        percentile(samples, 99.0),
        samples[samples.len() - 1]
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn wait_reports(vm: &Vm, more: u64) {
    let target = vm.reports() + more;
    let start = Instant::now();
    while vm.reports() < target {
        assert!(vm.failure().is_none(), "{:?}", vm.failure());
        assert!(start.elapsed() < Duration::from_secs(120), "no reports");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn bench_size(mib: u64, rounds: usize, dir: &std::path::Path) {
    let label = if mib >= 1024 && mib % 1024 == 0 {
        format!("{}GiB", mib / 1024)
    } else {
        format!("{mib}MiB")
    };
    eprintln!("snapshot bench: {label}, {rounds} rounds");
    let reports: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let sink_reports = reports.clone();
    let sink: ReportSink = Arc::new(move |r: &Report| {
        sink_reports.lock().unwrap().push(r.monotonic_ns);
    });
    let mut config = VmConfig::new(mib << 20, 1);
    config.touch_percent = 10;
    config.touch_pages_per_round = 64;
    let mut vm = Vm::create(&config, Some(sink)).expect("create VM");
    let label = if std::env::var_os("VIGIL_BENCH_PREFILL").is_some() {
        let chunk = vec![0xA5u8; 1 << 20];
        let mut gpa = vigil_kvm::guest::TOUCH_REGION_GPA;
        while gpa < vm.memory().len() {
            let n = chunk.len().min((vm.memory().len() - gpa) as usize);
            vm.memory().write_bytes(gpa, &chunk[..n]);
            gpa += n as u64;
        }
        format!("{label}-prefilled")
    } else {
        label
    };
    vm.resume().unwrap();
    wait_reports(&vm, 50);

    let (mut full, mut diff, mut restore, mut to_report) = (vec![], vec![], vec![], vec![]);
    let (mut full_pages, mut diff_pages) = (0, 0);
    for round in 0..rounds {
        let base = dir.join(format!("{label}-{round}-full"));
        let child = dir.join(format!("{label}-{round}-diff"));
        let start = Instant::now();
        vm.pause().unwrap();
        let info = vm.snapshot(SnapshotKind::Full, &base).unwrap();
        full.push(ms(start.elapsed()));
        full_pages = info.pages_written;
        vm.resume().unwrap();
        wait_reports(&vm, 10);
        let start = Instant::now();
        vm.pause().unwrap();
        let info = vm.snapshot(SnapshotKind::Diff, &child).unwrap();
        diff.push(ms(start.elapsed()));
        diff_pages = info.pages_written;
        vm.resume().unwrap();

        let chain: Vec<PathBuf> = vec![base.clone(), child.clone()];
        let start = Instant::now();
        let restored = Vm::restore(&chain, true, None).unwrap();
        restore.push(ms(start.elapsed()));
        restored.resume().unwrap();
        wait_reports(&restored, 1);
        to_report.push(ms(start.elapsed()));
        drop(restored);
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&child);
        eprintln!(
            "  round {round}: full {:.1} ms, diff {:.1} ms",
            full[round], diff[round]
        );
    }
    vm.pause().unwrap();
    let mut intervals: Vec<f64> = {
        let times = reports.lock().unwrap();
        times
            .windows(2)
            .map(|w| (w[1] - w[0]) as f64 / 1e6)
            .filter(|&d| d < 100.0) // gaps across pauses are not guest work
            .collect()
    };
    emit(
        &format!("full-{label}"),
        "ms",
        &mut full,
        &format!(",\"pages\":{full_pages}"),
    );
    emit(
        &format!("diff-{label}"),
        "ms",
        &mut diff,
        &format!(",\"pages\":{diff_pages}"),
    );
    emit(&format!("restore-{label}"), "ms", &mut restore, "");
    emit(
        &format!("restore-to-report-{label}"),
        "ms",
        &mut to_report,
        "",
    );
    let per_s = if intervals.is_empty() {
        0.0
    } else {
        1000.0 / (intervals.iter().sum::<f64>() / intervals.len() as f64)
    };
    emit(
        &format!("report-interval-{label}"),
        "ms",
        &mut intervals,
        &format!(",\"per_s\":{per_s:.1}"),
    );
}

fn main() {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("snapshot bench skipped: {why}");
        return;
    }
    let sizes: Vec<u64> = std::env::var("VIGIL_BENCH_SIZES_MIB")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![64, 1024]);
    let dir = std::env::temp_dir().join(format!("vigil-snapshot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for mib in sizes {
        let rounds = if mib <= 256 { 20 } else { 5 };
        bench_size(mib, rounds, &dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
