//! Crash test: a child process appends and syncs in a loop and reports each synced index
//! through a pipe; the parent SIGKILLs it at a random moment, reopens the log, and checks
//! that every entry reported synced is there and intact, and that every entry returned at
//! all is exactly what was written (nothing from a torn tail).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{payload_for, small_options, Rng, TempDir};
use vigil_wal::{EntryRef, Wal, WalOptions};

const CHILD_ENV: &str = "VIGIL_WAL_CRASH_CHILD_DIR";
const SEED_ENV: &str = "VIGIL_WAL_CRASH_CHILD_SEED";
const TERM: u64 = 3;
const MAX_PAYLOAD: usize = 1500;

fn options() -> WalOptions {
    small_options(32 * 1024)
}

/// Kills the child by PID when dropped, also when the test fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped yet.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// The child role: runs only when re-executed by `crash_kill_and_recover`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return; // not the child: nothing to do
    };
    let seed: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    let mut rng = Rng::new(seed);
    let mut wal = Wal::open(&dir, options()).unwrap();
    let mut out = std::io::stdout().lock();
    // Bounded: the parent kills us long before this ends.
    for _ in 0..100_000 {
        let start = wal.last_index() + 1;
        let n = rng.range(1, 24);
        let payloads: Vec<Vec<u8>> = (0..n)
            .map(|i| payload_for(start + i, TERM, MAX_PAYLOAD))
            .collect();
        let batch: Vec<EntryRef<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| EntryRef {
                index: start + i as u64,
                term: TERM,
                payload: p,
            })
            .collect();
        wal.append(&batch).unwrap();
        if rng.chance(5) && wal.last_index() > 200 {
            wal.compact(wal.last_index() - 150).unwrap();
        }
        let synced = wal.sync().unwrap();
        writeln!(out, "SYNCED {synced}").unwrap();
        out.flush().unwrap();
    }
}

/// Reopens and checks; returns the last index and whether a torn tail was cut off.
fn verify(dir: &Path, synced: u64, iteration: u32) -> (u64, bool) {
    let wal = Wal::open(dir, options())
        .unwrap_or_else(|e| panic!("iteration {iteration}: reopen after kill: {e}"));
    assert!(
        wal.last_index() >= synced,
        "iteration {iteration}: entry {synced} was reported synced, log ends at {}",
        wal.last_index()
    );
    // The child compacts to (its last index - 150) after appending, and it may run on
    // well past the last report we read (reports wait in the pipe; the kill comes
    // later), so `synced` does not bound the compaction. The log does: a surviving
    // Compact record comes after the entries it was computed from, so at least 150
    // entries remain after the first one.
    assert!(
        wal.first_index() == 1 || wal.first_index() + 150 <= wal.last_index(),
        "iteration {iteration}: compacted too far (log {}..={})",
        wal.first_index(),
        wal.last_index()
    );
    for index in wal.first_index()..=wal.last_index() {
        let e = wal.entry(index).expect("entry in range");
        assert_eq!(e.term, TERM, "iteration {iteration}: term of {index}");
        assert_eq!(
            e.payload,
            &payload_for(index, TERM, MAX_PAYLOAD)[..],
            "iteration {iteration}: payload of {index}"
        );
    }
    (wal.last_index(), wal.recovery().torn_tail.is_some())
}

#[test]
fn crash_kill_and_recover() {
    let dir = TempDir::new("crash");
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::new(0xc0ffee);
    let mut torn_seen = 0;
    let mut highest_synced = 0;
    for iteration in 0..50u32 {
        let child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env(SEED_ENV, (iteration as u64 * 7919).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let reports = rng.range(1, 40);
        let mut synced = highest_synced;
        let mut got = 0;
        while got < reports {
            let Some(line) = lines.next() else { break };
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("SYNCED ") {
                synced = n.parse().unwrap();
                got += 1;
            }
        }
        assert!(got > 0, "iteration {iteration}: the child reported nothing");
        // Kill at a random moment: right away, or after it has run on a little.
        let pause = rng.range(0, 3000);
        if pause > 0 {
            std::thread::sleep(std::time::Duration::from_micros(pause));
        }
        // SAFETY: kill(2) on our own child's PID; it is reaped by the guard below.
        unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGKILL) };
        drop(child);
        // Anything the child printed after our last read is lost with the pipe; the
        // last line we read is a lower bound of what was synced.
        let (last, torn) = verify(dir.path(), synced, iteration);
        highest_synced = synced.max(highest_synced);
        assert!(last >= highest_synced);
        torn_seen += torn as u32;
    }
    eprintln!(
        "crash test: 50 kills, highest synced index {highest_synced}, torn tails cut: {torn_seen}"
    );
}
