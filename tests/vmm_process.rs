//! `vigil vmm` as a process: control socket, lease watchdog and fencing, abandon,
//! snapshot and restore into a new process, and bad frames.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vigil_kvm::control::{
    Client, Reply, Request, SnapshotKindWire, Status, VmmState, ERROR_BAD_FRAME, ERROR_FENCED,
    ERROR_STALE_TOKEN,
};

const MAX_FRAME: usize = vigil::limits::MAX_VMM_CONTROL_FRAME_BYTES;
/// Generous: CI machines are slow and shared; tests poll, they never time behaviour.
const PATIENCE: Duration = Duration::from_secs(60);

fn skip() -> bool {
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return true;
    }
    false
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "vigil-vmm-{name}-{}-{}",
            std::process::id(),
            vigil_kvm::monotonic_ns()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `vigil vmm` child, killed by PID when the test ends (also on failure).
struct Vmm {
    child: Child,
    socket: PathBuf,
}

impl Vmm {
    fn spawn(dir: &TempDir, name: &str, token: u64, lease: Duration, extra: &[&str]) -> Vmm {
        let socket = dir.join(&format!("{name}.sock"));
        let deadline = vigil_kvm::monotonic_ns() + lease.as_nanos() as u64;
        let log = std::fs::File::create(dir.join(&format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .arg("vmm")
            .arg("--control")
            .arg(&socket)
            .args(["--token", &token.to_string()])
            .args(["--lease-deadline-ns", &deadline.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn vigil vmm");
        let mut vmm = Vmm { child, socket };
        vmm.wait_for_socket();
        vmm
    }

    fn wait_for_socket(&mut self) {
        let start = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("vigil vmm exited early: {status}");
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the control socket never came up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket, PATIENCE, MAX_FRAME).expect("connect")
    }

    fn status(&self) -> Status {
        self.client().status_of(&Request::Status).expect("status")
    }

    fn wait_until(&self, what: &str, mut done: impl FnMut(&Status) -> bool) -> Status {
        let start = Instant::now();
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(status.state != VmmState::Failed, "the VM failed");
            assert!(
                start.elapsed() < PATIENCE,
                "timed out waiting for {what}: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < PATIENCE, "vigil vmm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: plain kill(2) of our own child's PID, which has not been reaped.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

fn expect_error(reply: Reply, code: u16) -> String {
    match reply {
        Reply::Error { code: c, message } if c == code => message,
        other => panic!("expected error {code}, got {other:?}"),
    }
}

fn report_counters(path: &std::path::Path) -> Vec<Vec<u64>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| line.split(' ').map(|f| f.parse().unwrap()).collect())
        .collect()
}

#[test]
fn lease_expiry_fences_and_only_the_current_token_resumes() {
    if skip() {
        return;
    }
    let dir = TempDir::new("watchdog");
    let reports = dir.join("reports");
    let reports_arg = reports.to_str().unwrap().to_string();
    // The lease runs out by itself: nobody renews it.
    let vmm = Vmm::spawn(
        &dir,
        "vmm",
        41,
        Duration::from_secs(3),
        &[
            "--report-file",
            &reports_arg,
            "--abandon-after-ms",
            "600000",
        ],
    );
    let fenced = vmm.wait_until("fencing", |s| s.state == VmmState::Fenced);
    assert_eq!(fenced.token, 41);
    // Fenced: the guest no longer runs. Its report file stops growing and its
    // counter stays put however long we look.
    let lines = report_counters(&reports).len();
    let counter = fenced.counter;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(vmm.status().counter, counter, "a fenced guest advanced");
    }
    assert_eq!(report_counters(&reports).len(), lines);

    let mut client = vmm.client();
    // Resume alone does not lift fencing.
    expect_error(client.call(&Request::Resume).unwrap(), ERROR_FENCED);
    // A renewal with a stale token is refused and changes nothing.
    let deadline = vigil_kvm::monotonic_ns() + 600_000_000_000;
    let message = expect_error(
        client
            .call(&Request::Renew {
                token: 40,
                deadline_ns: deadline,
            })
            .unwrap(),
        ERROR_STALE_TOKEN,
    );
    assert!(message.contains("40"), "{message}");
    assert_eq!(vmm.status().state, VmmState::Fenced);
    // The current token resumes the guest, which counts on from where it stopped.
    let status = client
        .status_of(&Request::Renew {
            token: 41,
            deadline_ns: deadline,
        })
        .expect("renew");
    assert_eq!(status.state, VmmState::Running);
    vmm.wait_until("the counter to advance after renewal", |s| {
        s.counter > counter + 2
    });
    // Every report line carries the token and a counter that only grows.
    let mut last = 0;
    for fields in report_counters(&reports) {
        assert_eq!(fields.len(), 4, "{fields:?}");
        assert_eq!(fields[1], 41);
        assert!(
            fields[3] > last,
            "counter went from {last} to {}",
            fields[3]
        );
        last = fields[3];
    }
    assert!(last > counter);
}

#[test]
fn a_paused_vmm_stays_paused_after_fencing_and_renewal() {
    if skip() {
        return;
    }
    let dir = TempDir::new("pause-fence");
    let vmm = Vmm::spawn(
        &dir,
        "vmm",
        7,
        Duration::from_secs(3),
        &["--abandon-after-ms", "600000"],
    );
    vmm.wait_until("the guest to report", |s| s.counter > 0);
    let mut client = vmm.client();
    // Paused by the agent (say, for a migration's final snapshot), then the lease runs out.
    let paused = client.status_of(&Request::Pause).expect("pause");
    assert_eq!(paused.state, VmmState::Paused);
    let fenced = vmm.wait_until("fencing", |s| s.state == VmmState::Fenced);
    assert_eq!(fenced.counter, paused.counter);
    // A renewal with the current token lifts the fence but not the pause.
    let deadline = vigil_kvm::monotonic_ns() + 600_000_000_000;
    let renewed = client
        .status_of(&Request::Renew {
            token: 7,
            deadline_ns: deadline,
        })
        .expect("renew");
    assert_eq!(
        renewed.state,
        VmmState::Paused,
        "a renewal resumed a paused VM"
    );
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(50));
        let now = vmm.status();
        assert_eq!(now.state, VmmState::Paused);
        assert_eq!(now.counter, paused.counter, "a paused guest advanced");
    }
    // Only an explicit resume runs it again.
    let resumed = client.status_of(&Request::Resume).expect("resume");
    assert_eq!(resumed.state, VmmState::Running);
    vmm.wait_until("the counter to advance after resume", |s| {
        s.counter > paused.counter
    });
}

#[test]
fn fenced_vmm_exits_after_the_abandon_timeout() {
    if skip() {
        return;
    }
    let dir = TempDir::new("abandon");
    // The lease is already over at start: the guest never runs, and nobody renews.
    let mut vmm = Vmm::spawn(
        &dir,
        "vmm",
        5,
        Duration::ZERO,
        &["--abandon-after-ms", "500"],
    );
    let status = vmm.wait_exit();
    assert_eq!(status.code(), Some(vigil_kvm::vmm::EXIT_ABANDONED as i32));
}

#[test]
fn snapshot_chain_restores_in_a_new_process_and_the_counter_continues() {
    if skip() {
        return;
    }
    let dir = TempDir::new("restore");
    let reports = dir.join("reports-b");
    let mut a = Vmm::spawn(
        &dir,
        "a",
        7,
        Duration::from_secs(600),
        &["--touch-percent", "20", "--touch-pages", "32"],
    );
    a.wait_until("reports", |s| s.reports >= 3);
    let full = dir.join("snap-full");
    let diff = dir.join("snap-diff");
    let mut client = a.client();
    let before_full = a.status().counter;
    match client
        .call(&Request::Snapshot {
            kind: SnapshotKindWire::Full,
            path: full.clone(),
        })
        .unwrap()
    {
        Reply::Snapshot { pages_written, .. } => assert!(pages_written > 0),
        other => panic!("full snapshot: {other:?}"),
    }
    // The snapshot resumed the guest; let it run, then pause and take a diff.
    let after_full = a.status().counter;
    a.wait_until("progress after the full snapshot", |s| {
        s.counter > after_full + 2
    });
    let paused = client.status_of(&Request::Pause).expect("pause");
    assert_eq!(paused.state, VmmState::Paused);
    let at_snapshot = a.status().counter;
    match client
        .call(&Request::Snapshot {
            kind: SnapshotKindWire::Diff,
            path: diff.clone(),
        })
        .unwrap()
    {
        Reply::Snapshot { kind, .. } => assert_eq!(kind, SnapshotKindWire::Diff),
        other => panic!("diff snapshot: {other:?}"),
    }
    assert_eq!(
        a.status().state,
        VmmState::Paused,
        "a snapshot must not resume a paused VM"
    );
    client.status_of(&Request::Stop).expect("stop");
    assert_eq!(a.wait_exit().code(), Some(0));

    let b = Vmm::spawn(
        &dir,
        "b",
        8,
        Duration::from_secs(600),
        &[
            "--restore",
            full.to_str().unwrap(),
            "--restore",
            diff.to_str().unwrap(),
            "--report-file",
            reports.to_str().unwrap(),
        ],
    );
    b.wait_until("reports from the restored VM", |s| s.reports >= 3);
    let lines = report_counters(&reports);
    let first = lines[0][3];
    assert!(
        first > at_snapshot,
        "the restored guest reported {first} first; the snapshot was taken at {at_snapshot}"
    );
    assert!(
        lines.iter().all(|l| l[1] == 8),
        "reports carry the new token"
    );
    drop(b);

    // The full snapshot alone restores too, from where it was taken.
    let reports_c = dir.join("reports-c");
    let c = Vmm::spawn(
        &dir,
        "c",
        9,
        Duration::from_secs(600),
        &[
            "--restore",
            full.to_str().unwrap(),
            "--report-file",
            reports_c.to_str().unwrap(),
        ],
    );
    c.wait_until("reports from the VM restored from the full snapshot", |s| {
        s.reports >= 3
    });
    let first = report_counters(&reports_c)[0][3];
    assert!(
        first > before_full,
        "restored from the full snapshot, the guest reported {first} first; it had reported \
         {before_full} before that snapshot"
    );
}

#[test]
fn bad_frames_get_an_error_and_the_vmm_keeps_serving() {
    if skip() {
        return;
    }
    let dir = TempDir::new("frames");
    let vmm = Vmm::spawn(&dir, "vmm", 9, Duration::from_secs(600), &[]);
    let valid = Request::Status.encode();
    let mut oversized = valid.clone();
    oversized[8..12].copy_from_slice(&(MAX_FRAME as u32 * 4).to_le_bytes());
    let mut bad_crc = valid.clone();
    bad_crc[12] ^= 0xFF;
    let mut unknown_type = valid.clone();
    unknown_type[6] = 0x7F;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&unknown_type[..12]);
    unknown_type[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    let garbage: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11) as u8).collect();
    for (name, bytes) in [
        ("garbage", garbage),
        ("oversized", oversized),
        ("bad crc", bad_crc),
        ("unknown type", unknown_type),
    ] {
        let mut client = vmm.client();
        client.send_raw(&bytes).unwrap();
        let reply = client
            .read_reply()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let message = expect_error(reply, ERROR_BAD_FRAME);
        assert!(!message.is_empty(), "{name}");
    }
    // A truncated frame and a hang-up must not disturb the VMM either.
    let mut stream = UnixStream::connect(&vmm.socket).unwrap();
    stream.write_all(&valid[..7]).unwrap();
    drop(stream);
    // Two requests in one write are both answered, in order.
    let mut stream = UnixStream::connect(&vmm.socket).unwrap();
    let mut two = Request::Status.encode();
    two.extend_from_slice(&Request::Status.encode());
    stream.write_all(&two).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let status_frame = 16 + 41;
    while got.len() < 2 * status_frame {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), 2 * status_frame);
    assert_eq!(vmm.status().token, 9);
}

/// A VMM started by a process that then goes away (the agent dying): it keeps
/// running in its own session, and its own watchdog still fences it.
#[test]
fn vmm_outlives_its_parent_and_still_fences() {
    if skip() {
        return;
    }
    struct KillOnDrop(libc::pid_t);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: kill(2) of the PID the test started (through the shell).
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let dir = TempDir::new("orphan");
    let socket = dir.join("vmm.sock");
    let deadline = vigil_kvm::monotonic_ns() + 3_000_000_000;
    // The shell plays the agent: it starts the VMM in the background and exits.
    let output = Command::new("sh")
        .arg("-c")
        .arg("\"$0\" vmm --control \"$1\" --token 3 --lease-deadline-ns \"$2\" >/dev/null 2>\"$3\" </dev/null & echo $!")
        .arg(env!("CARGO_BIN_EXE_vigil"))
        .arg(&socket)
        .arg(deadline.to_string())
        .arg(dir.join("vmm.log"))
        .output()
        .expect("run sh");
    let pid: libc::pid_t = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("pid");
    let _guard = KillOnDrop(pid);
    let start = Instant::now();
    let status = loop {
        if let Ok(mut client) = Client::connect(&socket, PATIENCE, MAX_FRAME) {
            if let Ok(status) = client.status_of(&Request::Status) {
                if status.state == VmmState::Fenced {
                    break status;
                }
            }
        }
        assert!(start.elapsed() < PATIENCE, "the orphaned VMM never fenced");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.token, 3);
    // Its session is its own, not the test's.
    // SAFETY: getsid(2) only reads process attributes.
    let (sid, ours) = unsafe { (libc::getsid(pid), libc::getsid(0)) };
    assert_eq!(sid, pid, "the VMM leads its own session");
    assert_ne!(sid, ours);
}

const RENEWER_SOCKET: &str = "VIGIL_TEST_RENEWER_SOCKET";

/// Not a test of its own: the body of the helper process that plays a renewing agent
/// for `a_frozen_agent_stops_renewing_and_the_vmm_fences` (it re-runs this test binary
/// with the environment variable set). Without the variable it does nothing.
#[test]
fn helper_renewing_agent() {
    let Some(socket) = std::env::var_os(RENEWER_SOCKET) else {
        return;
    };
    let token: u64 = std::env::var("VIGIL_TEST_RENEWER_TOKEN")
        .unwrap()
        .parse()
        .unwrap();
    loop {
        if let Ok(mut client) = Client::connect(socket.as_ref(), PATIENCE, MAX_FRAME) {
            let deadline_ns = vigil_kvm::monotonic_ns() + 1_000_000_000;
            let _ = client.call(&Request::Renew { token, deadline_ns });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An agent that renews the lease keeps the VM running; SIGSTOP it and the VMM fences
/// by itself; SIGCONT it and its renewals (current token) resume the VM.
#[test]
fn a_frozen_agent_stops_renewing_and_the_vmm_fences() {
    if skip() {
        return;
    }
    struct Helper(Child);
    impl Drop for Helper {
        fn drop(&mut self) {
            // SAFETY: kill(2) of our own unreaped child, then reap it.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
    let dir = TempDir::new("frozen-agent");
    let vmm = Vmm::spawn(&dir, "vmm", 12, Duration::from_secs(2), &[]);
    let initial_deadline = vmm.status().lease_deadline_ns;
    let agent = Helper(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "helper_renewing_agent", "--nocapture"])
            .env(RENEWER_SOCKET, &vmm.socket)
            .env("VIGIL_TEST_RENEWER_TOKEN", "12")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the renewing agent"),
    );
    let pid = agent.0.id() as libc::pid_t;
    vmm.wait_until("renewals to keep the VM running", |s| {
        s.state == VmmState::Running && s.lease_deadline_ns > initial_deadline + 1_000_000_000
    });
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let fenced = vmm.wait_until("fencing while the agent is frozen", |s| {
        s.state == VmmState::Fenced
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        vmm.status().counter,
        fenced.counter,
        "a fenced guest advanced"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    vmm.wait_until("the thawed agent's renewal to resume the VM", |s| {
        s.state == VmmState::Running && s.counter > fenced.counter + 2
    });
}

/// A corrupt snapshot is refused at start, with the file and offset named.
#[test]
fn restoring_a_corrupt_snapshot_fails_with_a_clear_error() {
    if skip() {
        return;
    }
    let dir = TempDir::new("corrupt");
    let snap = dir.join("snap");
    {
        let mut vm = vigil_kvm::vm::Vm::create(&vigil_kvm::vm::VmConfig::new(64 << 20, 1), None)
            .expect("create");
        vm.snapshot(vigil_kvm::snapshot::SnapshotKind::Full, &snap)
            .expect("snapshot");
    }
    let state = snap.join(vigil_kvm::snapshot::STATE_FILE);
    let mut bytes = std::fs::read(&state).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();
    let deadline = vigil_kvm::monotonic_ns() + 600_000_000_000;
    let output = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("vmm")
        .arg("--control")
        .arg(dir.join("vmm.sock"))
        .args(["--token", "1", "--lease-deadline-ns", &deadline.to_string()])
        .arg("--restore")
        .arg(&snap)
        .stdin(Stdio::null())
        .output()
        .expect("run vigil vmm");
    assert_eq!(
        output.status.code(),
        Some(vigil_kvm::vmm::EXIT_ERROR as i32)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(state.to_str().unwrap()) && stderr.contains("CRC"),
        "unclear error: {stderr}"
    );
    assert!(stderr.contains("offset"), "no offset in: {stderr}");
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: it has exited all the same).
fn process_exited(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

/// Re-adoption: a VMM started by one process (a shell playing the agent, which exits
/// at once) is attached by another process (this test), which renews its lease with
/// the current token, snapshots it, and stops it. The snapshot then restores.
#[test]
fn a_new_process_adopts_a_running_vmm_renews_snapshots_and_stops_it() {
    if skip() {
        return;
    }
    struct KillOnDrop(libc::pid_t);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if !process_exited(self.0) {
                // SAFETY: kill(2) of the PID the test started (through the shell).
                unsafe { libc::kill(self.0, libc::SIGKILL) };
            }
        }
    }
    let dir = TempDir::new("adopt");
    let socket = dir.join("vmm.sock");
    let reports = dir.join("reports");
    // Short enough that only a renewal keeps the VM running through this test.
    let first_deadline = vigil_kvm::monotonic_ns() + 5_000_000_000;
    let output = Command::new("sh")
        .arg("-c")
        .arg(
            "\"$0\" vmm --control \"$1\" --token 21 --lease-deadline-ns \"$2\" \
             --report-file \"$4\" --abandon-after-ms 600000 \
             >/dev/null 2>\"$3\" </dev/null & echo $!",
        )
        .arg(env!("CARGO_BIN_EXE_vigil"))
        .arg(&socket)
        .arg(first_deadline.to_string())
        .arg(dir.join("vmm.log"))
        .arg(&reports)
        .output()
        .expect("run sh");
    assert!(output.status.success(), "the starting process failed");
    let pid: libc::pid_t = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("pid");
    let _guard = KillOnDrop(pid);
    // The starting process has exited (output() waited for it); the VMM has not.
    let start = Instant::now();
    let mut client = loop {
        if let Ok(client) = Client::connect(&socket, PATIENCE, MAX_FRAME) {
            break client;
        }
        assert!(!process_exited(pid), "the VMM died with its starter");
        assert!(
            start.elapsed() < PATIENCE,
            "the control socket never came up"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let attached = client.status_of(&Request::Status).expect("status");
    assert_eq!(attached.token, 21);
    assert_eq!(attached.state, VmmState::Running);

    // Renew with the current token: the lease now runs well past the first deadline.
    let renewed_deadline = vigil_kvm::monotonic_ns() + 600_000_000_000;
    let renewed = client
        .status_of(&Request::Renew {
            token: 21,
            deadline_ns: renewed_deadline,
        })
        .expect("renew");
    assert_eq!(renewed.state, VmmState::Running);
    assert_eq!(renewed.lease_deadline_ns, renewed_deadline);

    // Snapshot it; the snapshot leaves it running.
    let snap = dir.join("snap");
    let before = client.status_of(&Request::Status).unwrap().counter;
    match client
        .call(&Request::Snapshot {
            kind: SnapshotKindWire::Full,
            path: snap.clone(),
        })
        .unwrap()
    {
        Reply::Snapshot { pages_written, .. } => assert!(pages_written > 0),
        other => panic!("snapshot: {other:?}"),
    }
    assert!(snap.join(vigil_kvm::snapshot::STATE_FILE).exists());
    // The renewal carried it past the first deadline: still running, still counting.
    while vigil_kvm::monotonic_ns() < first_deadline + 500_000_000 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let later = client.status_of(&Request::Status).unwrap();
    assert_eq!(later.state, VmmState::Running, "the renewal did not hold");
    assert!(later.counter > before, "the adopted guest stopped counting");

    // Stop it: the process exits.
    client.status_of(&Request::Stop).expect("stop");
    let start = Instant::now();
    while !process_exited(pid) {
        assert!(start.elapsed() < PATIENCE, "the adopted VMM did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!socket.exists(), "the stopped VMM left its socket behind");
    let ran = report_counters(&reports);
    assert!(
        ran.iter().all(|l| l[1] == 21),
        "reports under another token"
    );

    // The snapshot the adopter took restores in a fresh VMM.
    let restored_reports = dir.join("reports-restored");
    let restored = Vmm::spawn(
        &dir,
        "restored",
        22,
        Duration::from_secs(600),
        &[
            "--restore",
            snap.to_str().unwrap(),
            "--report-file",
            restored_reports.to_str().unwrap(),
        ],
    );
    restored.wait_until("reports from the restored VM", |s| s.reports >= 2);
    let first = report_counters(&restored_reports)[0][3];
    assert!(
        first > before,
        "restored guest reported {first} first; the snapshot was taken after {before}"
    );
}

/// No renewals: once the lease deadline passes, the guest stops. Measured on the
/// guest's own reports (CLOCK_MONOTONIC, written by the vCPU thread on each report
/// exit): no report may be stamped later than the deadline plus a generous bound.
/// The actual lateness (typically well under a millisecond) is measured by
/// `cargo bench --bench snapshot` (case `fence-lateness`); this test only proves that
/// the vCPUs stop, with room for a descheduled thread on a loaded 2-core CI machine.
#[test]
fn without_renewals_the_guest_stops_at_the_lease_deadline() {
    if skip() {
        return;
    }
    const BOUND_NS: u64 = 100_000_000;
    let dir = TempDir::new("deadline");
    let reports = dir.join("reports");
    let lease = Duration::from_secs(3);
    let before_spawn = vigil_kvm::monotonic_ns();
    let vmm = Vmm::spawn(
        &dir,
        "vmm",
        31,
        lease,
        &[
            "--report-file",
            reports.to_str().unwrap(),
            "--abandon-after-ms",
            "600000",
        ],
    );
    let deadline = vmm.status().lease_deadline_ns;
    assert!(deadline >= before_spawn + lease.as_nanos() as u64);
    vmm.wait_until("fencing", |s| s.state == VmmState::Fenced);
    // Let any report still in flight land in the file before reading it.
    std::thread::sleep(Duration::from_millis(300));
    let lines = report_counters(&reports);
    assert!(
        lines.iter().any(|l| l[0] < deadline),
        "the guest never ran before its deadline; the test proves nothing"
    );
    let last = lines.iter().map(|l| l[0]).max().unwrap();
    assert!(
        last <= deadline + BOUND_NS,
        "the guest reported {} ms after its lease deadline",
        (last - deadline) / 1_000_000
    );
    assert_eq!(vmm.status().state, VmmState::Fenced);
}
