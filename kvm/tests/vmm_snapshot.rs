//! Snapshots through a `vigil vmm` control socket (the VMM runs in this process, on a
//! thread): the reply comes once the files are written, requests pipelined behind a
//! snapshot are answered after it and see it as the new parent, and the chain the VMM
//! wrote restores, with the snapshot buffer large enough and with none at all.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil_kvm::control::{Client, Reply, Request, SnapshotKindWire, Status, VmmState};
use vigil_kvm::vm::{Vm, VmConfig};
use vigil_kvm::vmm::{self, Source, VmmLimits, VmmOptions};

const MAX_FRAME: usize = 8192;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "vigil-kvm-vmm-{name}-{}-{}",
            std::process::id(),
            vigil_kvm::monotonic_ns()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts a VMM on a thread; returns its control socket and the thread.
fn start_vmm(dir: &Path, buffer_bytes: u64) -> (PathBuf, std::thread::JoinHandle<u8>) {
    let mut config = VmConfig::new(64 << 20, 1);
    config.touch_percent = 25;
    config.touch_pages_per_round = 64;
    let socket = dir.join("vmm.sock");
    let options = VmmOptions {
        source: Source::Fresh(config),
        token: 5,
        control_path: socket.clone(),
        lease_deadline_ns: vigil_kvm::monotonic_ns() + 600_000_000_000,
        abandon_after_ns: 60_000_000_000,
        report_file: None,
        snapshot_buffer_bytes: buffer_bytes,
        expected_snapshot_ids: Vec::new(),
    };
    let limits = VmmLimits {
        max_frame_bytes: MAX_FRAME,
        max_connections: 4,
        min_memory_bytes: 64 << 20,
        max_memory_bytes: 1 << 30,
        max_vcpus: 4,
    };
    let thread = std::thread::spawn(move || vmm::run(options, &limits).expect("vmm run"));
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no control socket"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (socket, thread)
}

fn status(client: &mut Client) -> Status {
    client.status_of(&Request::Status).expect("status")
}

fn wait_reports(client: &mut Client, more: u64) {
    let target = status(client).reports + more;
    let start = Instant::now();
    while status(client).reports < target {
        assert!(start.elapsed() < Duration::from_secs(60), "no reports");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn snapshot_id(reply: Reply) -> u64 {
    match reply {
        Reply::Snapshot { snapshot_id, .. } => snapshot_id,
        other => panic!("expected a snapshot reply, got {other:?}"),
    }
}

/// Takes full, diff, diff through the socket, the diffs pipelined (the second waits for
/// the first, a status behind each snapshot sees it as the parent), then restores the
/// chain: the counter is where the guest was when the last snapshot was asked for.
fn snapshots_through_the_socket_restore(buffer_bytes: u64) {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new(&format!("buffer{buffer_bytes}"));
    let (socket, thread) = start_vmm(&dir.0, buffer_bytes);
    let mut client = Client::connect(&socket, Duration::from_secs(60), MAX_FRAME).unwrap();
    wait_reports(&mut client, 3);
    let chain: Vec<PathBuf> = (0..3).map(|i| dir.0.join(format!("snap-{i}"))).collect();

    // A snapshot and a status in one write: the status is answered after the snapshot
    // is written, and names it as the parent of the next diff.
    let mut bytes = Request::Snapshot {
        kind: SnapshotKindWire::Full,
        path: chain[0].clone(),
    }
    .encode();
    bytes.extend_from_slice(&Request::Status.encode());
    client.send_raw(&bytes).unwrap();
    let full = snapshot_id(client.read_reply().unwrap());
    assert!(chain[0].join(vigil_kvm::snapshot::STATE_FILE).exists());
    match client.read_reply().unwrap() {
        Reply::Status(s) => assert_eq!(s.last_snapshot_id, full),
        other => panic!("expected a status, got {other:?}"),
    }
    wait_reports(&mut client, 3);

    // Two diffs back to back, then a status: answered in order, each diff the child
    // of the one before.
    let before = status(&mut client).counter;
    let mut bytes = Vec::new();
    for path in &chain[1..] {
        bytes.extend_from_slice(
            &Request::Snapshot {
                kind: SnapshotKindWire::Diff,
                path: path.clone(),
            }
            .encode(),
        );
    }
    bytes.extend_from_slice(&Request::Status.encode());
    client.send_raw(&bytes).unwrap();
    let first_diff = snapshot_id(client.read_reply().unwrap());
    let second_diff = snapshot_id(client.read_reply().unwrap());
    assert!(first_diff != full && second_diff != first_diff);
    let after = match client.read_reply().unwrap() {
        Reply::Status(s) => {
            assert_eq!(s.last_snapshot_id, second_diff);
            assert_eq!(
                s.state,
                VmmState::Running,
                "the snapshots resumed the guest"
            );
            s.counter
        }
        other => panic!("expected a status, got {other:?}"),
    };
    client.status_of(&Request::Stop).expect("stop");
    assert_eq!(thread.join().unwrap(), vmm::EXIT_STOPPED);

    let restored = Vm::restore(&chain, true, None).expect("restore the VMM's chain");
    let counter = restored.counter_in_memory(0);
    // Reports lag the counter by at most one round.
    assert!(
        (before..=after + 1).contains(&counter),
        "restored counter {counter}, the guest reported {before} before the diffs and \
         {after} after"
    );
    restored.resume().unwrap();
    let start = Instant::now();
    while restored.counter_in_memory(0) <= counter + 2 {
        assert!(restored.failure().is_none(), "{:?}", restored.failure());
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "restored guest stuck"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn snapshots_written_after_resume_restore_and_pipelined_requests_wait() {
    snapshots_through_the_socket_restore(64 << 20);
}

#[test]
fn snapshots_without_a_buffer_are_written_while_paused_and_restore() {
    snapshots_through_the_socket_restore(0);
}
