//! WAL benchmark: append + sync latency and throughput against a raw baseline.
//!
//! For entry sizes 128 B, 1 KiB, 4 KiB and batch sizes 1, 16, 128, one operation is
//! "append a batch, then sync it" (group commit). The baseline, in the same run and on the
//! same disk, is one `write` of the batch's bytes plus one `fdatasync` into a file
//! preallocated the same way the WAL preallocates its segments (fallocate).
//!
//! Prints one JSON object per line on stdout; progress goes to stderr.
//! `cargo bench --bench wal -- --quick` (or VIGIL_BENCH_QUICK=1) runs a short version.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vigil::limits::WAL_OPTIONS;
use vigil_wal::{EntryRef, Wal};

const ENTRY_SIZES: [usize; 3] = [128, 1024, 4096];
const BATCH_SIZES: [usize; 3] = [1, 16, 128];

struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
    /// Entries per second over the whole run.
    per_s: f64,
    /// Payload megabytes (1e6) per second.
    mb_s: f64,
}

fn stats(mut lat_us: Vec<f64>, entries: usize, payload_bytes: usize, total_s: f64) -> Stats {
    lat_us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| lat_us[((lat_us.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        n: lat_us.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: *lat_us.last().unwrap(),
        per_s: entries as f64 / total_s,
        mb_s: payload_bytes as f64 / total_s / 1e6,
    }
}

fn payload(entry: usize, i: usize) -> Vec<u8> {
    (0..entry).map(|k| (i * 31 + k) as u8).collect()
}

/// The baseline: write + fdatasync into a preallocated file.
struct Baseline {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    offset: u64,
}

impl Baseline {
    fn new(dir: &Path, entry: usize, batch: usize, ops: usize) -> Baseline {
        let path = dir.join("baseline.dat");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let bytes = (entry * batch * ops) as u64 + 4096;
        // SAFETY: fallocate on a file we own.
        assert_eq!(
            unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) },
            0
        );
        fsync(&file);
        let buf = (0..batch).flat_map(|i| payload(entry, i)).collect();
        Baseline {
            path,
            file,
            buf,
            offset: 0,
        }
    }

    fn op(&mut self) {
        self.file.write_all_at(&self.buf, self.offset).unwrap();
        // SAFETY: fdatasync on a file we own.
        assert_eq!(unsafe { libc::fdatasync(self.file.as_raw_fd()) }, 0);
        self.offset += self.buf.len() as u64;
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The WAL: append a batch, then one sync.
struct WalCase {
    dir: PathBuf,
    wal: Wal,
    /// Reused every op (payloads leaked once: they live for the whole bench).
    batch: Vec<EntryRef<'static>>,
}

impl WalCase {
    fn new(dir: &Path, entry: usize, batch: usize) -> WalCase {
        let dir = dir.join("wal");
        let _ = std::fs::remove_dir_all(&dir);
        let wal = Wal::open(&dir, WAL_OPTIONS).unwrap();
        let batch = (0..batch)
            .map(|i| EntryRef {
                index: 0,
                term: 1,
                payload: Box::leak(payload(entry, i).into_boxed_slice()),
            })
            .collect();
        WalCase { dir, wal, batch }
    }

    fn op(&mut self) {
        let first = self.wal.last_index() + 1;
        for (i, e) in self.batch.iter_mut().enumerate() {
            e.index = first + i as u64;
        }
        self.wal.append(&self.batch).unwrap();
        let synced = self.wal.sync().unwrap();
        assert_eq!(synced, first + self.batch.len() as u64 - 1);
    }
}

impl Drop for WalCase {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs both in lockstep (baseline op, WAL op, alternating which goes first) so that
/// noise from other work on the machine hits both alike.
fn run_case(dir: &Path, entry: usize, batch: usize, ops: usize) -> (Stats, Stats) {
    let mut base = Baseline::new(dir, entry, batch, ops);
    let mut wal = WalCase::new(dir, entry, batch);
    let (mut base_lat, mut wal_lat) = (Vec::with_capacity(ops), Vec::with_capacity(ops));
    let (mut base_total, mut wal_total) = (0.0f64, 0.0f64);
    for i in 0..ops {
        for which in [i % 2, 1 - i % 2] {
            let t = Instant::now();
            if which == 0 {
                base.op();
            } else {
                wal.op();
            }
            let us = t.elapsed().as_secs_f64() * 1e6;
            if which == 0 {
                base_lat.push(us);
                base_total += us / 1e6;
            } else {
                wal_lat.push(us);
                wal_total += us / 1e6;
            }
        }
    }
    let entries = ops * batch;
    let bytes = entries * entry;
    (
        stats(base_lat, entries, bytes, base_total),
        stats(wal_lat, entries, bytes, wal_total),
    )
}

fn fsync(file: &File) {
    // SAFETY: fsync on a file we own.
    assert_eq!(unsafe { libc::fsync(file.as_raw_fd()) }, 0);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("VIGIL_BENCH_QUICK").is_ok_and(|v| v != "0");
    // Same disk as the build: under target/.
    let dir: PathBuf =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("wal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in ENTRY_SIZES {
        for batch in BATCH_SIZES {
            // About 48 MiB of payload per case (fewer ops for big batches), 100..=2000 ops.
            let budget = if quick { 4 << 20 } else { 48 << 20 };
            let max_ops = if quick { 300 } else { 2000 };
            let ops = (budget / (entry * batch)).clamp(100, max_ops);
            eprintln!("wal bench: entry={entry} batch={batch} ops={ops}");
            let (base, wal) = run_case(&dir, entry, batch, ops);
            println!(
                "{{\"bench\":\"wal\",\"case\":\"entry={entry},batch={batch}\",\"unit\":\"us\",\
                 \"n\":{},\"p50\":{:.1},\"p99\":{:.1},\"max\":{:.1},\"per_s\":{:.0},\"mb_s\":{:.2},\
                 \"baseline\":\"write+fdatasync prealloc\",\"baseline_p50\":{:.1},\
                 \"baseline_p99\":{:.1},\"baseline_per_s\":{:.0},\"ratio_p50\":{:.3},\
                 \"ratio_per_s\":{:.3}}}",
                wal.n,
                wal.p50,
                wal.p99,
                wal.max,
                wal.per_s,
                wal.mb_s,
                base.p50,
                base.p99,
                base.per_s,
                wal.p50 / base.p50,
                wal.per_s / base.per_s,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
