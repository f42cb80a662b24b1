//! The `vigil vmm` process: one VM, its control socket and its lease watchdog.
//!
//! Threads: one per vCPU (running KVM_RUN, see `vcpu`), plus this control thread, as
//! in Firecracker. The control thread is a single poll loop over the listening socket
//! and its connections; its timeout is the next deadline, so it wakes when the lease
//! runs out even if no agent ever talks to it again (agent SIGSTOPped, killed or cut
//! off). Then it fences: it kicks every vCPU out of KVM_RUN (signal + immediate_exit)
//! and keeps them paused; guest memory is kept. A fenced VMM resumes only on a renewal
//! carrying its current fencing token (a VMM paused by request before it fenced stays
//! paused until `resume`), exits on `stop`, and exits by itself once it has been fenced
//! for the abandon timeout.
//!
//! A snapshot pauses the vCPUs only to capture it (dirty log, state, pages copied
//! into a bounded buffer, see `Vm::capture`); a writer thread then writes and fsyncs
//! the files while the guest runs again and this loop keeps serving (renewals, the
//! watchdog). The snapshot's reply is sent once its files are durable; meanwhile that
//! connection's further requests, and snapshot requests from other connections, wait.
//!
//! The process calls setsid() so it outlives the agent that spawned it.

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::control::{
    self, DecodeError, Reply, Request, SnapshotKindWire, Status, VmmState, ERROR_BAD_FRAME,
    ERROR_BAD_REQUEST, ERROR_FAILED, ERROR_FENCED, ERROR_STALE_TOKEN,
};
use crate::monotonic_ns;
use crate::snapshot::{Capture, RestoreOptions, SnapshotKind, SnapshotOptions, Written};
use crate::vcpu::{Report, ReportSink};
use crate::vm::{Error, Result, Vm, VmConfig};

/// Bounds the caller (the `vigil` binary, from its `limits`) imposes.
#[derive(Clone, Debug)]
pub struct VmmLimits {
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    pub min_memory_bytes: u64,
    pub max_memory_bytes: u64,
    pub max_vcpus: usize,
}

/// Where the VM comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Fresh(VmConfig),
    /// A full snapshot, then diffs in order.
    Restore(Vec<PathBuf>),
}

#[derive(Clone, Debug)]
pub struct VmmOptions {
    pub source: Source,
    pub token: u64,
    pub control_path: PathBuf,
    /// Absolute CLOCK_MONOTONIC deadline of the lease, in nanoseconds.
    pub lease_deadline_ns: u64,
    /// How long a fenced VMM waits for a renewal before it exits.
    pub abandon_after_ns: u64,
    /// Guest reports are appended here as `<monotonic_ns> <token> <vcpu> <counter>`.
    pub report_file: Option<PathBuf>,
    /// Most bytes of guest memory a snapshot copies aside while the vCPUs are paused
    /// (`SnapshotOptions::buffer_cap_bytes`); the VMM keeps a buffer up to this size.
    pub snapshot_buffer_bytes: u64,
    /// When not empty: the snapshot id each `Source::Restore` entry must hold.
    pub expected_snapshot_ids: Vec<u64>,
}

/// Default of `--snapshot-buffer-mib`: 1 % of a 6 GiB guest. The agent should pass its
/// own bound (vigil's limits) explicitly.
pub const DEFAULT_SNAPSHOT_BUFFER_MIB: u64 = 64;

/// Exit codes of `vigil vmm`.
pub const EXIT_STOPPED: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_ABANDONED: u8 = 3;

const USAGE: &str = "\
Usage: vigil vmm --control <PATH> --token <N> --lease-deadline-ns <NS> [options]

Runs one VM (the built-in guest, or a restored snapshot) until told to stop.

  --control <PATH>           control socket (Unix stream) to listen on
  --token <N>                fencing token of this placement
  --lease-deadline-ns <NS>   lease deadline, absolute CLOCK_MONOTONIC nanoseconds
  --abandon-after-ms <MS>    exit after being fenced this long (default 60000)
  --memory-mib <N>           guest memory for a fresh VM (default 64)
  --vcpus <N>                vCPUs for a fresh VM (default 1)
  --touch-percent <P>        share of memory the guest keeps writing (default 0)
  --touch-pages <N>          pages written per ~10 ms round (default 64)
  --restore <DIR>            restore this snapshot instead; repeat for a diff chain
                             (full snapshot first)
  --expect-snapshot-id <HEX> the snapshot id the matching --restore must hold (repeat,
                             one per --restore, in order); a mismatch is an error
  --report-file <PATH>       append guest reports: <monotonic_ns> <token> <vcpu> <counter>
  --snapshot-buffer-mib <N>  snapshot pages copied aside while paused and written after
                             resuming, at most this much (default 64); a larger
                             snapshot is written while paused. 0: always while paused
";

fn parse(args: Vec<OsString>, limits: &VmmLimits) -> std::result::Result<VmmOptions, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut control_path = None;
    let mut token = None;
    let mut deadline = None;
    let mut abandon_ms: u64 = 60_000;
    let mut memory_mib: u64 = 64;
    let mut vcpus: usize = 1;
    let mut touch_percent: u8 = 0;
    let mut touch_pages: u64 = 64;
    let mut restore = Vec::new();
    let mut expected_ids = Vec::new();
    let mut report_file = None;
    let mut snapshot_buffer_mib = DEFAULT_SNAPSHOT_BUFFER_MIB;
    let e = |e: lexopt::Error| e.to_string();
    while let Some(arg) = parser.next().map_err(e)? {
        match arg {
            Long("control") => control_path = Some(PathBuf::from(parser.value().map_err(e)?)),
            Long("token") => token = Some(parser.value().map_err(e)?.parse::<u64>().map_err(e)?),
            Long("lease-deadline-ns") => {
                deadline = Some(parser.value().map_err(e)?.parse::<u64>().map_err(e)?)
            }
            Long("abandon-after-ms") => {
                abandon_ms = parser.value().map_err(e)?.parse().map_err(e)?
            }
            Long("memory-mib") => memory_mib = parser.value().map_err(e)?.parse().map_err(e)?,
            Long("vcpus") => vcpus = parser.value().map_err(e)?.parse().map_err(e)?,
            Long("touch-percent") => {
                touch_percent = parser.value().map_err(e)?.parse().map_err(e)?
            }
            Long("touch-pages") => touch_pages = parser.value().map_err(e)?.parse().map_err(e)?,
            Long("restore") => restore.push(PathBuf::from(parser.value().map_err(e)?)),
            Long("expect-snapshot-id") => {
                let text = parser.value().map_err(e)?.string().map_err(e)?;
                let hex = text.trim_start_matches("0x");
                let id = u64::from_str_radix(hex, 16)
                    .map_err(|_| format!("--expect-snapshot-id {text}: not a hex u64"))?;
                expected_ids.push(id);
            }
            Long("report-file") => report_file = Some(PathBuf::from(parser.value().map_err(e)?)),
            Long("snapshot-buffer-mib") => {
                snapshot_buffer_mib = parser.value().map_err(e)?.parse().map_err(e)?
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    let memory_bytes = memory_mib
        .checked_mul(1 << 20)
        .ok_or("--memory-mib is too large")?;
    if !(limits.min_memory_bytes..=limits.max_memory_bytes).contains(&memory_bytes) {
        return Err(format!(
            "--memory-mib {memory_mib}: must be {}..={} MiB",
            limits.min_memory_bytes >> 20,
            limits.max_memory_bytes >> 20
        ));
    }
    if vcpus == 0 || vcpus > limits.max_vcpus {
        return Err(format!("--vcpus {vcpus}: must be 1..={}", limits.max_vcpus));
    }
    if touch_percent > 100 {
        return Err(format!("--touch-percent {touch_percent}: must be 0..=100"));
    }
    // Never more than the largest guest: that buffer could hold any snapshot.
    let snapshot_buffer_bytes = snapshot_buffer_mib
        .checked_mul(1 << 20)
        .filter(|&b| b <= limits.max_memory_bytes)
        .ok_or_else(|| {
            format!(
                "--snapshot-buffer-mib {snapshot_buffer_mib}: must be 0..={} MiB",
                limits.max_memory_bytes >> 20
            )
        })?;
    if !expected_ids.is_empty() && expected_ids.len() != restore.len() {
        return Err(format!(
            "{} --expect-snapshot-id for {} --restore: give one per snapshot or none",
            expected_ids.len(),
            restore.len()
        ));
    }
    let source = if restore.is_empty() {
        let mut config = VmConfig::new(memory_bytes, vcpus);
        config.touch_percent = touch_percent;
        config.touch_pages_per_round = if touch_percent == 0 { 0 } else { touch_pages };
        Source::Fresh(config)
    } else {
        Source::Restore(restore)
    };
    Ok(VmmOptions {
        source,
        token: token.ok_or("--token is required")?,
        control_path: control_path.ok_or("--control is required")?,
        lease_deadline_ns: deadline.ok_or("--lease-deadline-ns is required")?,
        abandon_after_ns: abandon_ms.saturating_mul(1_000_000),
        report_file,
        snapshot_buffer_bytes,
        expected_snapshot_ids: expected_ids,
    })
}

/// CLOCK_MONOTONIC when `main` was entered (0 if the VMM runs in another process's
/// `run`), for the restore timings in the log.
static MAIN_ENTERED_NS: AtomicU64 = AtomicU64::new(0);

/// `vigil vmm`: parses the arguments and runs the VMM until it stops.
pub fn main(args: Vec<OsString>, limits: &VmmLimits) -> ExitCode {
    MAIN_ENTERED_NS.store(monotonic_ns(), Ordering::Relaxed);
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let options = match parse(args, limits) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("vigil vmm: {message}\n\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Own session: the VMM outlives the agent (and its terminal or process group).
    // SAFETY: setsid has no memory-safety preconditions; failure (already a group
    // leader) is harmless and only logged.
    if unsafe { libc::setsid() } < 0 {
        log::debug!("setsid: {}", std::io::Error::last_os_error());
    }
    match run(options, limits) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            log::error!("vmm: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

struct Connection {
    /// Names the connection a snapshot reply goes to once its files are written.
    id: u64,
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once `output` is sent (after a bad frame).
    close_after_flush: bool,
}

struct Vmm {
    vm: Vm,
    options: VmmOptions,
    limits: VmmLimits,
    state: VmmState,
    lease_deadline_ns: u64,
    fenced_at_ns: Option<u64>,
    /// The agent asked for a pause (and no resume since). Fencing does not forget it: a
    /// renewal of a fenced VMM that was paused by request leaves the vCPUs paused, so a
    /// VM paused for its final migration snapshot never runs again here.
    pause_requested: bool,
    stop_requested: bool,
    writer: SnapshotWriter,
    next_connection_id: u64,
}

/// The snapshot writer thread: captures go in, written (or failed) snapshots come
/// back, and `wake` becomes readable for each one (it is in the poll set).
struct SnapshotWriter {
    jobs: mpsc::Sender<Capture>,
    done: mpsc::Receiver<Written>,
    wake: UnixStream,
    /// The snapshot being written: who asked, and what, for the reply.
    in_flight: Option<InFlight>,
}

struct InFlight {
    connection: u64,
    kind: SnapshotKindWire,
    path: PathBuf,
}

impl SnapshotWriter {
    fn start() -> Result<SnapshotWriter> {
        let (wake, wake_writer) =
            UnixStream::pair().map_err(|e| Error(format!("snapshot writer socket: {e}")))?;
        wake.set_nonblocking(true)
            .map_err(|e| Error(format!("snapshot writer socket: {e}")))?;
        let (jobs, jobs_in) = mpsc::channel::<Capture>();
        let (done_out, done) = mpsc::channel::<Written>();
        std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || {
                // Ends when the VMM drops `jobs`.
                for capture in jobs_in {
                    if done_out.send(capture.write()).is_err() {
                        return;
                    }
                    // One byte per snapshot; the loop drains them.
                    let _ = (&wake_writer).write_all(&[1]);
                }
            })
            .map_err(|e| Error(format!("spawning the snapshot writer: {e}")))?;
        Ok(SnapshotWriter {
            jobs,
            done,
            wake,
            in_flight: None,
        })
    }
}

fn report_sink(options: &VmmOptions) -> Result<Option<ReportSink>> {
    let Some(path) = &options.report_file else {
        return Ok(None);
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error(format!("open report file {}: {e}", path.display())))?;
    let token = options.token;
    Ok(Some(Arc::new(move |report: &Report| {
        let line = format!(
            "{} {} {} {}\n",
            report.monotonic_ns, token, report.vcpu, report.counter
        );
        // One append per line; a failed write is logged, the guest keeps running.
        if let Err(e) = (&file).write_all(line.as_bytes()) {
            log::warn!("report file: {e}");
        }
    })))
}

/// Runs the VMM; returns the exit code.
pub fn run(options: VmmOptions, limits: &VmmLimits) -> Result<u8> {
    let sink = report_sink(&options)?;
    let vm = match &options.source {
        Source::Fresh(config) => Vm::create(config, sink)?,
        Source::Restore(chain) => {
            let expected = (!options.expected_snapshot_ids.is_empty())
                .then_some(&options.expected_snapshot_ids[..]);
            Vm::restore_checked(chain, expected, true, sink, &RestoreOptions::default())?
        }
    };
    if let Some(t) = vm.restore_timings() {
        let ms = |ns: u64| ns as f64 / 1e6;
        // The instants are for measurements (benches/snapshot.rs, `restore-*`).
        log::info!(
            "vmm: main entered at {} ns; restore took {:.2} ms: states {:.2}, memory {:.2} \
             ({} diff runs mapped, {} copied), VM {:.2}, vCPUs {:.2}, VM state {:.2}, \
             threads {:.2} ms",
            MAIN_ENTERED_NS.load(Ordering::Relaxed),
            ms(t.total_ns),
            ms(t.read_states_ns),
            ms(t.memory_ns),
            t.diff_runs_mapped,
            t.diff_runs_copied,
            ms(t.create_vm_ns),
            ms(t.vcpus_ns),
            ms(t.vm_state_ns),
            ms(t.threads_ns)
        );
    }
    let writer = SnapshotWriter::start()?;
    let listener = bind(&options.control_path)?;
    // Wake at the lease deadline itself, not up to the default 50 us timer slack later.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut vmm = Vmm {
        vm,
        lease_deadline_ns: options.lease_deadline_ns,
        options,
        limits: limits.clone(),
        state: VmmState::Paused,
        fenced_at_ns: None,
        pause_requested: false,
        stop_requested: false,
        writer,
        next_connection_id: 0,
    };
    if monotonic_ns() < vmm.lease_deadline_ns {
        vmm.vm.resume()?;
        vmm.state = VmmState::Running;
        // The instant the vCPUs were released into KVM_RUN, for measurements
        // (benches/snapshot.rs, `restore-to-run`).
        log::info!("vmm: vCPUs released at {} ns", monotonic_ns());
    } else {
        vmm.fence("the lease deadline had passed at start");
    }
    log::info!(
        "vmm: VM {} with token {}, control socket {}",
        vmm.state.name(),
        vmm.options.token,
        vmm.options.control_path.display()
    );
    let code = vmm.serve(&listener);
    let _ = std::fs::remove_file(&vmm.options.control_path);
    code
}

/// Binds the control socket, replacing a stale socket file but never a live VMM's.
fn bind(path: &std::path::Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error(format!(
                "{} is in use by a live process",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error(format!("remove stale {}: {e}", path.display())))?;
    }
    // Bound and listening under a private name, then renamed into place: whoever sees
    // the socket file (the agent adopting VMMs, a test waiting for it) can connect at
    // once, never between bind and listen (ECONNREFUSED).
    let tmp = path.with_file_name(format!(".b{}", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error(format!("remove stale {}: {e}", tmp.display()))),
    }
    let listener =
        UnixListener::bind(&tmp).map_err(|e| Error(format!("bind {}: {e}", tmp.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error(format!("nonblocking listener: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error(format!(
            "rename {} to {}: {e}",
            tmp.display(),
            path.display()
        ))
    })?;
    Ok(listener)
}

impl Vmm {
    fn fence(&mut self, why: &str) {
        if let Err(e) = self.vm.pause() {
            // A failed vCPU is not running either; the guest is stopped regardless.
            log::error!("vmm: pausing for fencing: {e}");
        }
        // The instant is logged for measurements (benches/snapshot.rs, `fence-lateness`).
        log::warn!(
            "vmm: fenced ({why}); vCPUs paused at {} ns, memory kept",
            monotonic_ns()
        );
        self.state = VmmState::Fenced;
        self.fenced_at_ns = Some(monotonic_ns());
    }

    /// Enforces the lease; returns an exit code when the VMM is abandoned.
    fn watchdog(&mut self, now: u64) -> Option<u8> {
        if now >= self.lease_deadline_ns && self.fenced_at_ns.is_none() {
            let late_us = (now - self.lease_deadline_ns) / 1000;
            match self.state {
                VmmState::Running | VmmState::Paused => {
                    self.fence(&format!("lease deadline passed {late_us} us ago"))
                }
                // Not running anyway; the abandon timer starts all the same.
                VmmState::Failed => self.fenced_at_ns = Some(now),
                VmmState::Fenced => {}
            }
        }
        if let Some(fenced_at) = self.fenced_at_ns {
            if now.saturating_sub(fenced_at) >= self.options.abandon_after_ns {
                log::warn!("vmm: fenced for the abandon timeout without a renewal; exiting");
                return Some(EXIT_ABANDONED);
            }
        }
        if self.state == VmmState::Running {
            if let Some(failure) = self.vm.failure() {
                log::error!("vmm: {failure}");
                self.state = VmmState::Failed;
            }
        }
        None
    }

    /// The poll timeout: until the next deadline this loop must act on.
    fn timeout_ns(&self, now: u64) -> u64 {
        let next = match self.fenced_at_ns {
            Some(fenced_at) => fenced_at.saturating_add(self.options.abandon_after_ns),
            None => self.lease_deadline_ns,
        };
        next.saturating_sub(now).min(1_000_000_000)
    }

    fn serve(&mut self, listener: &UnixListener) -> Result<u8> {
        let mut connections: Vec<Connection> = Vec::new();
        loop {
            let now = monotonic_ns();
            if let Some(code) = self.watchdog(now) {
                self.wait_for_writer(&mut connections);
                return Ok(code);
            }
            if self.stop_requested {
                // A snapshot being written is finished and answered first.
                self.wait_for_writer(&mut connections);
                flush_before_exit(&mut connections);
                if let Err(e) = self.vm.pause() {
                    log::warn!("vmm: pausing before exit: {e}");
                }
                log::info!("vmm: stopped on request");
                return Ok(EXIT_STOPPED);
            }
            let mut fds = Vec::with_capacity(connections.len() + 2);
            let accepting = connections.len() < self.limits.max_connections;
            fds.push(libc::pollfd {
                fd: listener.as_raw_fd(),
                events: if accepting { libc::POLLIN } else { 0 },
                revents: 0,
            });
            fds.push(libc::pollfd {
                fd: self.writer.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for c in &connections {
                let mut events = 0;
                // A connection waiting for the writer keeps at most one frame's worth.
                if !c.close_after_flush && c.input.len() <= self.limits.max_frame_bytes {
                    events |= libc::POLLIN;
                }
                if !c.output.is_empty() {
                    events |= libc::POLLOUT;
                }
                fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            let timeout = self.timeout_ns(now);
            let ts = libc::timespec {
                tv_sec: (timeout / 1_000_000_000) as libc::time_t,
                tv_nsec: (timeout % 1_000_000_000) as libc::c_long,
            };
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds; `ts` is a valid
            // timespec; no signal mask is changed.
            let n = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    &ts,
                    std::ptr::null(),
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error(format!("ppoll: {err}")));
            }
            // The deadline may have passed while we slept or while requests were waiting:
            // fence before acting on them.
            if let Some(code) = self.watchdog(monotonic_ns()) {
                return Ok(code);
            }
            // `fds[2..]` matches `connections` as they were before this poll.
            assert_eq!(fds.len(), connections.len() + 2);
            let mut keep = Vec::with_capacity(connections.len() + 1);
            for (mut c, fd) in connections.drain(..).zip(fds.iter().skip(2)) {
                if fd.revents != 0 && !self.service(&mut c, fd.revents) {
                    continue; // closed
                }
                keep.push(c);
            }
            connections = keep;
            if fds[1].revents != 0 {
                self.writer_done(&mut connections);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.accept(listener, &mut connections);
            }
        }
    }

    fn accept(&mut self, listener: &UnixListener, connections: &mut Vec<Connection>) {
        while connections.len() < self.limits.max_connections {
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.next_connection_id += 1;
                    connections.push(Connection {
                        id: self.next_connection_id,
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        close_after_flush: false,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("vmm: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads, handles and answers; false when the connection is done.
    fn service(&mut self, c: &mut Connection, revents: i16) -> bool {
        if revents & libc::POLLIN != 0 && !c.close_after_flush {
            let mut chunk = [0u8; 4096];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => return false,
                    Ok(n) => c.input.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
                // Oversized frames are refused at their header; never buffer more.
                if c.input.len() > self.limits.max_frame_bytes {
                    break;
                }
            }
            self.handle_input(c);
        } else if revents & (libc::POLLHUP | libc::POLLERR) != 0 && c.output.is_empty() {
            return false;
        }
        if !c.output.is_empty() {
            match c.stream.write(&c.output) {
                Ok(n) => {
                    c.output.drain(..n);
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        !(c.close_after_flush && c.output.is_empty())
    }

    fn handle_input(&mut self, c: &mut Connection) {
        loop {
            if self
                .writer
                .in_flight
                .as_ref()
                .is_some_and(|w| w.connection == c.id)
            {
                return; // its snapshot reply comes first
            }
            let decoded = match control::decode_frame(&c.input, self.limits.max_frame_bytes) {
                Ok(None) => return,
                Ok(Some((frame, used))) => Request::decode(&frame).map(|r| (r, used)),
                Err(e) => Err(e),
            };
            match decoded {
                Ok((request, used)) => {
                    if matches!(request, Request::Snapshot { .. })
                        && self.writer.in_flight.is_some()
                    {
                        return; // one snapshot at a time: this one waits for the writer
                    }
                    c.input.drain(..used);
                    if let Some(reply) = self.handle(request, c.id) {
                        c.output.extend_from_slice(&reply.encode());
                    }
                }
                Err(DecodeError { offset, what }) => {
                    log::warn!("vmm: bad control frame: {what} (byte {offset}); closing");
                    let reply = Reply::Error {
                        code: ERROR_BAD_FRAME,
                        message: format!("bad frame: {what} (at byte {offset})"),
                    };
                    c.output.extend_from_slice(&reply.encode());
                    c.input.clear();
                    c.close_after_flush = true;
                    return;
                }
            }
        }
    }

    fn status(&self) -> Status {
        Status {
            state: self.state,
            token: self.options.token,
            counter: self.vm.counters().first().copied().unwrap_or(0),
            reports: self.vm.reports(),
            lease_deadline_ns: self.lease_deadline_ns,
            last_snapshot_id: self.vm.last_snapshot_id().unwrap_or(0),
        }
    }

    fn error(code: u16, message: impl Into<String>) -> Reply {
        Reply::Error {
            code,
            message: message.into(),
        }
    }

    /// The reply to `request`; `None` for a snapshot whose reply comes when the writer
    /// is done (`writer_done`).
    fn handle(&mut self, request: Request, connection: u64) -> Option<Reply> {
        log::debug!("vmm: request {request:?}");
        match request {
            Request::Snapshot { kind, path } => self.snapshot(kind, path, connection),
            other => Some(self.handle_now(other)),
        }
    }

    /// The reply to any request but a snapshot.
    fn handle_now(&mut self, request: Request) -> Reply {
        match request {
            Request::Status => Reply::Status(self.status()),
            Request::Stop => {
                self.stop_requested = true;
                Reply::Status(self.status())
            }
            Request::Pause => match self.state {
                VmmState::Running => match self.vm.pause() {
                    Ok(()) => {
                        self.state = VmmState::Paused;
                        self.pause_requested = true;
                        Reply::Status(self.status())
                    }
                    Err(e) => Self::error(ERROR_FAILED, e.to_string()),
                },
                // Already stopped; a fenced VMM remembers the pause for its renewal.
                VmmState::Paused | VmmState::Fenced => {
                    self.pause_requested = true;
                    Reply::Status(self.status())
                }
                VmmState::Failed => Self::error(ERROR_FAILED, "the VM failed"),
            },
            Request::Resume => match self.state {
                VmmState::Running => Reply::Status(self.status()),
                VmmState::Paused => {
                    self.pause_requested = false;
                    self.resume_if_leased()
                }
                VmmState::Fenced => Self::error(
                    ERROR_FENCED,
                    "fenced: renew the lease with the current token to resume",
                ),
                VmmState::Failed => Self::error(ERROR_FAILED, "the VM failed"),
            },
            Request::Renew { token, deadline_ns } => {
                if token != self.options.token {
                    return Self::error(
                        ERROR_STALE_TOKEN,
                        format!(
                            "token {token} refused: this VM's fencing token is {}",
                            self.options.token
                        ),
                    );
                }
                if deadline_ns <= monotonic_ns() {
                    return Self::error(ERROR_BAD_REQUEST, "the new deadline is already past");
                }
                self.lease_deadline_ns = deadline_ns;
                if self.state == VmmState::Failed {
                    self.fenced_at_ns = None;
                }
                if self.state == VmmState::Fenced && self.pause_requested {
                    // The vCPUs are already paused: the VMM is leased again but stays
                    // paused until it is asked to resume.
                    self.fenced_at_ns = None;
                    log::info!("vmm: lease renewed with the current token; staying paused");
                    self.state = VmmState::Paused;
                } else if self.state == VmmState::Fenced {
                    self.fenced_at_ns = None;
                    match self.vm.resume() {
                        Ok(()) => {
                            log::info!("vmm: lease renewed with the current token; resuming");
                            self.state = VmmState::Running;
                        }
                        Err(e) => {
                            self.state = VmmState::Failed;
                            return Self::error(ERROR_FAILED, e.to_string());
                        }
                    }
                }
                Reply::Status(self.status())
            }
            Request::Snapshot { .. } => unreachable!("`handle` answers snapshots"),
        }
    }

    fn resume_if_leased(&mut self) -> Reply {
        if monotonic_ns() >= self.lease_deadline_ns {
            self.fence("lease deadline passed");
            return Self::error(ERROR_FENCED, "fenced: the lease has expired");
        }
        match self.vm.resume() {
            Ok(()) => {
                self.state = VmmState::Running;
                Reply::Status(self.status())
            }
            Err(e) => {
                self.state = VmmState::Failed;
                Self::error(ERROR_FAILED, e.to_string())
            }
        }
    }

    /// Captures a snapshot (vCPUs paused only for that) and hands it to the writer;
    /// `None`: the reply follows when it is written.
    fn snapshot(
        &mut self,
        kind: SnapshotKindWire,
        path: PathBuf,
        connection: u64,
    ) -> Option<Reply> {
        assert!(self.writer.in_flight.is_none(), "one snapshot at a time");
        if self.state == VmmState::Failed {
            return Some(Self::error(
                ERROR_FAILED,
                "the VM failed; its state is not worth saving",
            ));
        }
        let was_running = self.state == VmmState::Running;
        if was_running {
            if let Err(e) = self.vm.pause() {
                return Some(Self::error(ERROR_FAILED, e.to_string()));
            }
            self.state = VmmState::Paused;
        }
        let options = SnapshotOptions {
            buffer_cap_bytes: self.options.snapshot_buffer_bytes,
        };
        let kind_now = match kind {
            SnapshotKindWire::Full => SnapshotKind::Full,
            SnapshotKindWire::Diff => SnapshotKind::Diff,
        };
        let captured = self.vm.capture(kind_now, &path, &options);
        // Resume only if the lease still holds after the capture.
        if was_running {
            let _ = self.resume_if_leased();
        }
        let capture = match captured {
            Ok(capture) => capture,
            Err(e) => return Some(Self::error(ERROR_FAILED, format!("snapshot failed: {e}"))),
        };
        self.writer
            .jobs
            .send(capture)
            .expect("the snapshot writer thread never exits before the VMM");
        self.writer.in_flight = Some(InFlight {
            connection,
            kind,
            path,
        });
        None
    }

    /// The writer finished a snapshot: end it in the VM, answer the connection that
    /// asked (if still open), and go on with the requests that waited for it.
    fn writer_done(&mut self, connections: &mut [Connection]) {
        let mut byte = [0u8; 16];
        while matches!((&self.writer.wake).read(&mut byte), Ok(n) if n > 0) {}
        let Ok(written) = self.writer.done.try_recv() else {
            return;
        };
        self.finish_snapshot(written, connections);
    }

    /// Blocks until no snapshot is being written, each finished and answered (one
    /// that waited behind another starts when that one is done).
    fn wait_for_writer(&mut self, connections: &mut [Connection]) {
        while self.writer.in_flight.is_some() {
            match self.writer.done.recv() {
                Ok(written) => self.finish_snapshot(written, connections),
                Err(_) => {
                    log::error!("vmm: the snapshot writer is gone");
                    return;
                }
            }
        }
    }

    fn finish_snapshot(&mut self, written: Written, connections: &mut [Connection]) {
        let in_flight = self
            .writer
            .in_flight
            .take()
            .expect("a written snapshot was in flight");
        let path = in_flight.path.display();
        let reply = match self.vm.finish_snapshot(written) {
            Ok(info) => {
                let ms = |ns: u64| ns as f64 / 1e6;
                let p = info.pause;
                log::info!(
                    "vmm: {:?} snapshot {:#x} to {path}: {} pages; vCPUs paused {:.2} ms \
                     (dirty log {:.2}, select {:.2}, memory {:.2}, state {:.2}){}; \
                     written in {:.2} ms",
                    info.kind,
                    info.snapshot_id,
                    info.pages_written,
                    ms(info.duration_ns),
                    ms(p.dirty_log_ns),
                    ms(p.select_ns),
                    ms(p.memory_ns),
                    ms(p.state_ns),
                    if info.written_while_paused {
                        ", memory written while paused (over the snapshot buffer)"
                    } else {
                        ""
                    },
                    ms(info.write_ns)
                );
                Reply::Snapshot {
                    snapshot_id: info.snapshot_id,
                    kind: in_flight.kind,
                    pages_written: info.pages_written,
                    duration_ns: info.duration_ns,
                }
            }
            Err(e) => {
                log::warn!("vmm: snapshot to {path} failed: {e}");
                Self::error(ERROR_FAILED, format!("snapshot failed: {e}"))
            }
        };
        if let Some(c) = connections
            .iter_mut()
            .find(|c| c.id == in_flight.connection)
        {
            c.output.extend_from_slice(&reply.encode());
        }
        // Requests that waited for the writer (on any connection) go on now.
        for c in connections.iter_mut() {
            if !c.close_after_flush {
                self.handle_input(c);
            }
        }
    }
}

/// Sends what is queued (the reply to `stop`) before the process exits.
fn flush_before_exit(connections: &mut [Connection]) {
    for c in connections {
        if c.output.is_empty() {
            continue;
        }
        let _ = c.stream.set_nonblocking(false);
        let _ = c.stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = c.stream.write_all(&c.output);
        c.output.clear();
    }
}
