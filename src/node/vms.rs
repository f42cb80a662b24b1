//! VMs in the node's loop: the leader's duties, this host's `vigil vmm` processes, the
//! VM API and the VM events.
//!
//! Each housekeeping tick:
//! - leader: `agent::leader::LeaderDuties` (failure detector fed with Raft's
//!   acknowledgement times, host verdicts, placement), its commands proposed in order;
//! - host (with a `[vms]` section): registers itself (proposed, or forwarded to the
//!   leader as `POST /internal/command`), runs `agent::reconcile` with its own lease
//!   (`agent::lease::own_lease_expiry`) and carries out the actions against real VMMs.
//!
//! VMMs run in their own session and outlive the agent; each has a directory
//! `<data_dir>/vmm/<vm-id>/` holding `control.sock`, `reports.log` and `vmm.log`. At
//! start the agent finds the VMMs left there and asks each for its status before it
//! reconciles (adoption). The agent talks to every VMM over one connection
//! (`vmm_conn`: a receive always in flight and a send while a request goes out, as ring
//! operations with two slab buffers held for the connection's life), one request in
//! flight per VMM with a timeout; a VMM that does not answer in time is reported and
//! killed. A dropped connection (the VMM closed it, a bad reply, the VMM exited) leaves
//! its VMM at once and waits in `Vms::closing` until its cancelled operations completed;
//! only then is its fd closed and are its buffers back. Connections, closing ones
//! included, are at most `MAX_LOCAL_VMMS` (the slab budget in `limits.rs` counts on it).
//! VMM exits are watched through pidfds (children are reaped; adopted VMMs are found
//! by SO_PEERCRED).
//!
//! Events (`GET /events`) get `at_ms` (CLOCK_MONOTONIC milliseconds, a float) and
//! `node`: host and placement changes are derived from the applied state on every
//! node; `vm_started` / `vm_stopped` are local to the host of the VMM.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use vigil_kvm::control::{Reply as VmmReply, Request, SnapshotKindWire, Status, VmmState};

use super::sweep::{self, Sweep};
use super::vmm_conn::{Progress, VmmConn};
use super::{now_ns, raft_error, Node, Reply};
use crate::agent::leader::{LeaderDuties, RaftView};
use crate::agent::lease::{own_lease_expiry, LeaseRules};
use crate::agent::reconcile::{self, snapshot_record, Action, LocalVmm, SnapshotRequest};
use crate::cluster::command::{Command, Desired, HostId, RequestId, Resources, SnapshotKind};
use crate::cluster::state::{CommittedSnapshot, HostState, Outcome, RejectCode, TokenCheck, Vm};
use crate::config::{Config, VmsConfig};
use crate::control::api::{self, VmRoute};
use crate::control::http::{self, Method};
use crate::io::child::{self, Child, ExitStatus};
use crate::io::{Completion, Instant};
use crate::limits;
use crate::logging::RateLimit;
use crate::net::codec::ForwardRequest;
use crate::raft::{Index, ReadState, Term};

/// Completion token kinds (the top byte; node/mod.rs, net/peers.rs and the control
/// server use 1..=6, 0x10 and 0x22): a VMM connection's receive and send, a VMM's exit.
pub const TOKEN_VMM_RECV: u64 = 7;
pub const TOKEN_VMM_EXIT: u64 = 8;
pub const TOKEN_VMM_SEND: u64 = 9;

/// A completion token: the kind, the VMM's slot and its connection's generation (the
/// completion of a dropped connection, still closing, is told apart from those of the
/// VMM's next connection).
fn token(kind: u64, slot: u64, generation: u16) -> u64 {
    assert!(slot < 1 << 40, "slots fit 40 bits");
    (kind << 56) | (slot << 16) | generation as u64
}

const MS: u64 = 1_000_000;
/// The phi-accrual floor: about one duty tick.
const PHI_MIN_STD_DEV_NS: u64 = 10 * MS;
/// Phi at which an alive host is shown as suspect.
pub const PHI_SUSPECT: f64 = 8.0;
/// A VMM with nothing else to say is asked for its status this often.
const STATUS_EVERY: Duration = Duration::from_millis(250);
/// This host's registration is proposed again after this long if the state still
/// does not show it.
const REGISTER_RETRY: Duration = Duration::from_secs(1);
/// A refused registration is logged at warn at most this often (it is retried every
/// `REGISTER_RETRY`, and shown in /status all the time).
const REGISTER_WARN_EVERY: Duration = Duration::from_secs(30);
/// A forwarded internal proposal not answered by then is forgotten (its sender
/// proposes again when it still needs to).
const INTERNAL_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed start, the same VM is not started again before this long.
const START_BACKOFF: Duration = Duration::from_secs(1);
/// At agent start, how long reconcile waits for the VMMs found on disk to answer.
const DISCOVERY_GRACE: Duration = Duration::from_secs(3);
/// Warnings a second about VMM connections the I/O layer had no room for.
const VMM_IO_WARNINGS_PER_SECOND: u32 = 10;

/// The process of a VMM.
enum Process {
    /// Started by this agent: reaped through its pidfd.
    Child(Child),
    /// Found running (agent restart): watched through a pidfd opened from its pid.
    Adopted { pid: i32, pidfd: OwnedFd },
    /// Found on disk, not connected yet.
    Unknown,
}

impl Process {
    fn pid(&self) -> Option<i32> {
        match self {
            Process::Child(c) => Some(c.pid()),
            Process::Adopted { pid, .. } => Some(*pid),
            Process::Unknown => None,
        }
    }

    fn pidfd(&self) -> Option<RawFd> {
        match self {
            Process::Child(c) => Some(c.pidfd()),
            Process::Adopted { pidfd, .. } => Some(pidfd.as_raw_fd()),
            Process::Unknown => None,
        }
    }

    /// SIGKILL through the pidfd (never a reused pid).
    fn kill(&self) {
        let Some(fd) = self.pidfd() else { return };
        // SAFETY: plain syscall; null siginfo and flags 0 behave like kill(2).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            log::warn!(
                "kill vmm {:?}: {}",
                self.pid(),
                std::io::Error::last_os_error()
            );
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Status,
    Renew,
    Pause,
    Resume,
    Stop,
    Snapshot,
}

/// One VMM this agent looks after.
struct Proc {
    slot: u64,
    local: LocalVmm,
    /// Its token and state are known (started here, or its status arrived).
    known: bool,
    /// Started by this agent process (for `vm_started`).
    started_here: bool,
    dir: PathBuf,
    process: Process,
    conn: Option<VmmConn>,
    /// Started: its control socket must accept by then.
    connect_by: Option<Instant>,
    in_flight: Option<(Purpose, Instant)>,
    queue: VecDeque<(Request, Purpose)>,
    status: Option<Status>,
    status_at: Option<Instant>,
    started_event: bool,
    restored_from: Option<String>,
    snapshot: Option<SnapshotRequest>,
    /// When the VMM wrote the snapshot whose record is being committed.
    snapshot_written_at: Option<Instant>,
    stop_reason: Option<String>,
    /// A pause for a migration was sent: no more renewals while it migrates.
    paused_for_migration: bool,
    /// Generation of `conn` (in its completion token).
    conn_gen: u16,
}

impl Proc {
    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn queued(&self, purpose: Purpose) -> bool {
        self.queue.iter().any(|(_, p)| *p == purpose)
            || self.in_flight.is_some_and(|(p, _)| p == purpose)
    }

    fn enqueue(&mut self, request: Request, purpose: Purpose) {
        if self.queue.len() >= limits::MAX_VMM_QUEUED_REQUESTS {
            log::warn!(
                "vmm {} (token {}): {} requests queued; dropping a {purpose:?}",
                self.local.vm,
                self.local.token,
                self.queue.len()
            );
            return;
        }
        self.queue.push_back((request, purpose));
    }
}

/// What an API request waits for.
enum WaitFor {
    /// The proposed entry to apply.
    Entry {
        index: Index,
        term: Term,
        then: Then,
    },
    /// A snapshot record to commit.
    Snapshot {
        vm: String,
        token: u64,
        seq: u64,
    },
    /// The migrating VM to be placed on another host.
    Migrated {
        vm: String,
        from: HostId,
    },
    Drained {
        host: HostId,
    },
}

enum Then {
    Create(String),
    Delete(String),
    Migrate {
        vm: String,
        from: HostId,
        wait: bool,
    },
    Drain {
        host: HostId,
        wait: bool,
    },
    /// An internal proposal: the outcome as the KV writes show it.
    Outcome,
}

struct Waiter {
    reply: Reply,
    deadline: Instant,
    what: WaitFor,
}

enum ReadKind {
    /// A page of `GET /vms`: VMs with ids after `after`, at most `limit`.
    Vms {
        after: Option<String>,
        limit: usize,
    },
    Vm(String),
    Validate(String, u64),
}

/// What the events were last derived from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct VmView {
    host: Option<HostId>,
    token: u64,
    waiting: String,
    snapshot: Option<u64>,
}

/// The VM side of a node.
pub(super) struct Vms {
    config: Option<VmsConfig>,
    run_dir: PathBuf,
    shared_dir: PathBuf,
    vmm_binary: PathBuf,
    rules: LeaseRules,
    leader: LeaderDuties,
    procs: Vec<Proc>,
    next_slot: u64,
    discovery_until: Option<Instant>,
    register_sent_at: Option<Instant>,
    /// Why the cluster refuses this host's registration (capacity), while it does.
    register_refused: Option<String>,
    register_warned_at: Option<Instant>,
    /// Forwarded internal proposals: (forward id, deadline).
    internal: Vec<(u64, Instant)>,
    waiters: Vec<Waiter>,
    reads: HashMap<u64, (Reply, ReadKind)>,
    view_vms: BTreeMap<String, VmView>,
    view_hosts: BTreeMap<HostId, HostState>,
    view_at: u64,
    start_backoff: BTreeMap<String, Instant>,
    /// Per VM, the chain head (committed index of its full snapshot) whose older
    /// directories this host already removed.
    collected: BTreeMap<String, u64>,
    /// This host's own lease expiry as the last reconcile computed it.
    own_lease: Option<u64>,
    vmm_starts: u64,
    vmm_kills: u64,
    /// Snapshot directories to remove, waiting for a sweeper (bounded by
    /// `limits::MAX_PENDING_SWEEPS`).
    sweeps: VecDeque<(PathBuf, Sweep)>,
    /// Running `vigil sweep-snapshots` children (at most `limits::MAX_SNAPSHOT_SWEEPERS`).
    sweepers: Vec<(Child, PathBuf)>,
    /// Dropped VMM connections whose cancelled operations have not all completed: their
    /// fds stay open and their buffers held until then.
    closing: Vec<VmmConn>,
    /// VMM connections not made because the I/O layer had no buffer or operation slot
    /// for them (retried at the next tick).
    vmm_io_refused: u64,
    log_budget: RateLimit,
}

impl Vms {
    pub(super) fn new(config: &Config, now: Instant) -> Vms {
        let run_dir = config.data_dir.join("vmm");
        let vmm_binary = config
            .vms
            .as_ref()
            .and_then(|v| v.vmm_binary.clone())
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("vigil"));
        let mut vms = Vms {
            config: config.vms.clone(),
            run_dir,
            shared_dir: config.shared_dir.clone(),
            vmm_binary,
            rules: LeaseRules::new(&config.timing),
            leader: LeaderDuties::new(LeaseRules::new(&config.timing), PHI_MIN_STD_DEV_NS),
            procs: Vec::new(),
            next_slot: 1,
            discovery_until: None,
            register_sent_at: None,
            register_refused: None,
            register_warned_at: None,
            internal: Vec::new(),
            waiters: Vec::new(),
            reads: HashMap::new(),
            view_vms: BTreeMap::new(),
            view_hosts: BTreeMap::new(),
            view_at: 0,
            start_backoff: BTreeMap::new(),
            collected: BTreeMap::new(),
            own_lease: None,
            vmm_starts: 0,
            vmm_kills: 0,
            sweeps: VecDeque::new(),
            sweepers: Vec::new(),
            closing: Vec::new(),
            vmm_io_refused: 0,
            log_budget: RateLimit::new(VMM_IO_WARNINGS_PER_SECOND),
        };
        if vms.config.is_some() {
            vms.discover(now);
        }
        vms
    }

    /// VMMs left by an earlier agent process: one directory per VM with a socket.
    /// Runs once, while the node is built, before the loop serves anything; the run
    /// directory is on the local data disk.
    fn discover(&mut self, now: Instant) {
        let Ok(entries) = std::fs::read_dir(&self.run_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(vm) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            if !dir.join("control.sock").exists() || self.procs.len() >= limits::MAX_LOCAL_VMMS {
                continue;
            }
            log::info!("vmm {vm}: found {}; asking for its status", dir.display());
            let slot = self.next_slot;
            self.next_slot += 1;
            self.procs.push(Proc {
                slot,
                local: LocalVmm {
                    vm,
                    token: 0,
                    state: VmmState::Running,
                    adopted: false,
                    stopping: false,
                    since_ns: now_ns(now),
                    last_snapshot_id: 0,
                    last_snapshot_requested_ns: None,
                    last_seq_used: 0,
                    snapshot_in_flight: false,
                },
                known: false,
                started_here: false,
                dir,
                process: Process::Unknown,
                conn: None,
                connect_by: None,
                in_flight: None,
                queue: VecDeque::new(),
                status: None,
                status_at: None,
                started_event: true,
                restored_from: None,
                snapshot: None,
                snapshot_written_at: None,
                stop_reason: None,
                paused_for_migration: false,
                conn_gen: 0,
            });
        }
        if !self.procs.is_empty() {
            self.discovery_until = Some(now.saturating_add(DISCOVERY_GRACE));
        }
    }

    fn proc_index(&self, slot: u64) -> Option<usize> {
        self.procs.iter().position(|p| p.slot == slot)
    }

    fn find(&self, vm: &str, token: u64) -> Option<usize> {
        self.procs
            .iter()
            .position(|p| p.known && p.local.vm == vm && p.local.token == token)
    }

    /// The highest `<token>-<seq>` directory under `vms/<vm>/` on shared storage.
    ///
    /// This listing stays on the loop: it runs once per VMM start or adoption (not per
    /// snapshot), the directory holds at most the committed chain plus a few
    /// directories not yet swept (superseded ones are removed by `vigil
    /// sweep-snapshots`), and the next snapshot's name depends on it, so it is needed
    /// before the VMM's first snapshot. It is timed: a warning above
    /// `limits::SLOW_FS_WARN_MS` tells an operator that shared storage is slow.
    fn highest_seq(&self, vm: &str, token: u64) -> u64 {
        let prefix = format!("{token}-");
        let dir = self.shared_dir.join("vms").join(vm);
        let Ok(entries) = timed_fs("list a VM's snapshots", || std::fs::read_dir(&dir)) else {
            return 0;
        };
        entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(&prefix))
                    .and_then(|s| s.parse::<u64>().ok())
            })
            .max()
            .unwrap_or(0)
    }
}

impl Vms {
    /// Queues the removal of snapshot directories; false when the queue is full.
    fn queue_sweep(&mut self, dir: PathBuf, sweep: Sweep) -> bool {
        if self.sweeps.iter().any(|(d, s)| *d == dir && *s == sweep) {
            return true;
        }
        if self.sweeps.len() >= limits::MAX_PENDING_SWEEPS {
            log::warn!(
                "{} snapshot sweeps queued; {} waits",
                self.sweeps.len(),
                dir.display()
            );
            return false;
        }
        self.sweeps.push_back((dir, sweep));
        true
    }
}

/// What one `GET /vms` page may take of the control output limit (the rest is for the
/// envelope and headers).
const VMS_PAGE_BUDGET_BYTES: usize = limits::MAX_CONTROL_OUTPUT_BYTES - 4096;

/// Takes VMs (in id order) for one page: at most `limit`, and no more than `budget`
/// bytes of JSON. Returns the page and the `next` cursor (the last id taken) when VMs
/// were left out.
fn vms_page<'a>(
    vms: impl Iterator<Item = (&'a str, serde_json::Value)>,
    limit: usize,
    budget: usize,
) -> (Vec<serde_json::Value>, Option<String>) {
    let mut page = Vec::new();
    let mut bytes = 0;
    let mut last: Option<&str> = None;
    for (id, vm) in vms {
        let len = vm.to_string().len() + 1;
        if page.len() == limit || (bytes + len > budget && !page.is_empty()) {
            return (page, last.map(str::to_string));
        }
        // One VM object is far below the budget (its fields are bounded); a page
        // always makes progress.
        assert!(len <= budget, "vm {id}: {len} bytes of JSON");
        bytes += len;
        page.push(vm);
        last = Some(id);
    }
    (page, None)
}

/// Runs a file-system call the loop makes itself and warns when it was slow.
fn timed_fs<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let result = f();
    let took = started.elapsed();
    if took > Duration::from_millis(limits::SLOW_FS_WARN_MS) {
        log::warn!(
            "{what} took {} ms on the event loop (storage is slow)",
            took.as_millis()
        );
    }
    result
}

fn status_for(code: RejectCode) -> (u16, &'static str) {
    match code {
        RejectCode::UnknownVm | RejectCode::UnknownHost => (404, "not_found"),
        RejectCode::VmExists => (409, "exists"),
        RejectCode::WrongState
        | RejectCode::NotPlaced
        | RejectCode::HostNotLive
        | RejectCode::NoCapacity
        | RejectCode::StaleToken
        | RejectCode::LimitReached => (409, "conflict"),
        RejectCode::Invalid | RejectCode::Malformed | RejectCode::BadSnapshot => (400, "rejected"),
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn snapshot_name(c: &CommittedSnapshot) -> String {
    format!("{}-{}", c.token, c.seq)
}

fn kind_name(kind: SnapshotKind) -> &'static str {
    match kind {
        SnapshotKind::Full => "full",
        SnapshotKind::Diff => "diff",
    }
}

fn snapshot_json(vm: &Vm, upto: usize) -> serde_json::Value {
    let c = &vm.chain[upto];
    serde_json::json!({
        "id": snapshot_name(c),
        "kind": kind_name(c.kind),
        "chain": vm.chain[..=upto].iter().map(|s| s.path.clone()).collect::<Vec<_>>(),
        "index": c.committed_index,
        "snapshot_id": format!("{:#x}", c.snapshot_id),
        "taken_at_ms": c.taken_at_ms,
    })
}

impl Node {
    // ---- the loop's hooks -------------------------------------------------------------

    /// Every housekeeping tick.
    pub(super) fn vms_tick(&mut self, now: Instant) -> Result<(), String> {
        self.vms_leader_duties(now)?;
        if self.vms.config.is_some() {
            self.vms_register(now);
            self.vms_timeouts(now);
            self.vms_connect(now);
            self.vms_reconcile(now);
            self.vms_pump(now);
        }
        let expired: Vec<u64> = self
            .vms
            .internal
            .iter()
            .filter(|(_, d)| now >= *d)
            .map(|(id, _)| *id)
            .collect();
        self.vms.internal.retain(|(id, _)| !expired.contains(id));
        self.vms.start_backoff.retain(|_, until| now < *until);
        self.vms_sweep();
        self.vms_check_waiters(now)?;
        Ok(())
    }

    /// A completion of a VMM's exit watch (a pidfd became readable).
    pub(super) fn vms_exit_completion(&mut self, id: u64, c: Completion, now: Instant) {
        let Some(i) = self.vms.proc_index(id >> 16) else {
            return;
        };
        if let Err(e) = c.result {
            log::warn!(
                "vmm {}: watching its exit failed: {e}",
                self.vms.procs[i].local.vm
            );
            return;
        }
        self.vms_exited(i, now);
    }

    /// A completion of a VMM connection's receive or send, whatever its result
    /// (ECANCELED included: it brings the buffer back, and a closing connection closes
    /// its fd only once all of them are in).
    pub(super) fn vms_conn_completion(&mut self, c: Completion, now: Instant) {
        if let Some(k) = self.vms.closing.iter().position(|conn| conn.owns(c.token)) {
            if self.vms.closing[k].on_completion(&mut self.io, &c) == Progress::Closed {
                self.vms.closing.swap_remove(k);
            }
            return;
        }
        let slot = (c.token & ((1 << 56) - 1)) >> 16;
        let i = self
            .vms
            .procs
            .iter()
            .position(|p| p.slot == slot && p.conn.as_ref().is_some_and(|n| n.owns(c.token)))
            .unwrap_or_else(|| {
                panic!(
                    "vmm connection: completion {:?} with token {:#x} for no connection",
                    c.kind, c.token
                )
            });
        let conn = self.vms.procs[i].conn.as_mut().expect("found above");
        match conn.on_completion(&mut self.io, &c) {
            Progress::Replies(replies) => {
                for r in replies {
                    self.vms_reply(slot, r, now);
                }
            }
            Progress::Failed(why) => self.vms_drop_conn(i, &why),
            other => panic!("vmm connection: a live connection reported {other:?}"),
        }
        self.vms_pump(now);
    }

    /// Connections holding buffers: live ones and closing ones.
    fn vms_connections(&self) -> usize {
        self.vms.procs.iter().filter(|p| p.conn.is_some()).count() + self.vms.closing.len()
    }

    /// At shutdown: every VMM connection starts its close (the VMMs keep running). The
    /// `Io` is dropped before `Vms` (field order of `Node`), and its drop waits for the
    /// cancelled operations, so no fd closes under one.
    pub(super) fn vms_close_all(&mut self) {
        for p in &mut self.vms.procs {
            if let Some(mut conn) = p.conn.take() {
                if !conn.begin_close(&mut self.io) {
                    self.vms.closing.push(conn);
                }
            }
        }
    }

    /// After each loop turn's apply: answers, events. Returns the reads that are not
    /// the VM module's.
    pub(super) fn vms_after_apply(
        &mut self,
        applied: &[(Index, Term, Outcome)],
        reads: Vec<ReadState>,
        now: Instant,
    ) -> Result<Vec<ReadState>, String> {
        for (index, term, outcome) in applied {
            let Some(w) = self
                .vms
                .waiters
                .iter()
                .position(|w| matches!(w.what, WaitFor::Entry { index: i, .. } if i == *index))
            else {
                continue;
            };
            let waiter = self.vms.waiters.swap_remove(w);
            self.vms_entry_applied(waiter, *term, outcome, now)?;
        }
        if self.app.state.applied_index() != self.vms.view_at {
            self.vms_events(now);
        }
        let mut rest = Vec::new();
        for r in reads {
            match self.vms.reads.remove(&r.id) {
                Some((reply, kind)) => self.vms_read(reply, kind, now)?,
                None => rest.push(r),
            }
        }
        if !applied.is_empty() {
            self.vms_check_waiters(now)?;
        }
        Ok(rest)
    }

    /// Reads Raft gave up on: answers the VM module's, returns the others.
    pub(super) fn vms_reads_failed(
        &mut self,
        failed: Vec<u64>,
        now: Instant,
    ) -> Result<Vec<u64>, String> {
        let mut rest = Vec::new();
        for id in failed {
            match self.vms.reads.remove(&id) {
                Some((reply, _)) => {
                    let body = api::error_json(
                        "the read could not be confirmed by a leader (leadership changed); retry",
                        "retry",
                    );
                    self.answer_then_next(reply, 503, &body, now)?;
                }
                None => rest.push(id),
            }
        }
        Ok(rest)
    }

    /// A forwarded answer: true if it was for an internal proposal of this module.
    pub(super) fn vms_forward_response(&mut self, id: u64, status: u16, body: &[u8]) -> bool {
        let Some(k) = self.vms.internal.iter().position(|(i, _)| *i == id) else {
            return false;
        };
        self.vms.internal.swap_remove(k);
        if status != 200 {
            log::debug!(
                "internal proposal answered {status}: {}",
                String::from_utf8_lossy(body)
            );
        }
        true
    }

    // ---- leader ----------------------------------------------------------------------

    fn vms_leader_duties(&mut self, now: Instant) -> Result<(), String> {
        let view = RaftView::of(&self.raft, self.id);
        let cmds = self
            .vms
            .leader
            .tick(&view, &self.app.state, now_ns(now), |_| None);
        if cmds.is_empty() {
            return Ok(());
        }
        for c in cmds {
            log::info!("node {}: leader proposes {}: {c:?}", self.id, c.name());
            match self.raft.propose(now_ns(now), &c.to_bytes(RequestId(0))) {
                Ok((index, term)) => self.vms.leader.proposed(term, index),
                Err(e) => {
                    log::debug!("leader proposal refused: {e:?}");
                    break;
                }
            }
        }
        self.collect()
    }

    /// Proposes a command of this host's own (registration, snapshot record): directly
    /// as leader, else forwarded to the leader.
    fn vms_propose_own(&mut self, cmd: &Command, now: Instant) {
        let bytes = cmd.to_bytes(RequestId(0));
        if self.raft.is_leader() {
            if let Err(e) = self.raft.propose(now_ns(now), &bytes) {
                log::debug!("{} not proposed: {e:?}", cmd.name());
            }
            let _ = self.collect();
            return;
        }
        let leader = self.raft.leader();
        if leader == 0
            || !self.peers.is_connected(leader)
            || self.vms.internal.len() >= limits::MAX_INTERNAL_FORWARDS
        {
            log::debug!("{} not forwarded: no leader reachable", cmd.name());
            return;
        }
        let id = self.next_forward;
        self.next_forward += 1;
        let body = api::internal_command_body(&bytes);
        let req = ForwardRequest {
            id,
            method: api::method_code(Method::Post),
            path: "/internal/command",
            body: body.as_bytes(),
        };
        if self.peers.send_forward_request(leader, &req) {
            self.vms
                .internal
                .push((id, now.saturating_add(INTERNAL_TIMEOUT)));
        }
    }

    fn vms_register(&mut self, now: Instant) {
        let Some(cfg) = &self.vms.config else { return };
        let capacity = Resources {
            memory_bytes: cfg.capacity_memory_mib << 20,
            vcpus: cfg.capacity_vcpus,
        };
        let host = self.app.state.host(self.id);
        if host.is_some_and(|h| h.capacity == capacity) {
            if self.vms.register_refused.take().is_some() {
                log::info!("node {}: registered with the configured capacity", self.id);
            }
            return;
        }
        // A new capacity below what this host's VMs use now is refused by the cluster
        // (a rejected no-op): say so, and propose again only once it would fit.
        if host.is_some() {
            let load = self.app.state.load(self.id);
            if !crate::cluster::state::fits(load, Resources::default(), capacity) {
                let why = format!(
                    "configured capacity {} MiB / {} vCPUs is below what this host's VMs use \
                     ({} MiB / {} vCPUs); the cluster keeps the old capacity",
                    capacity.memory_bytes >> 20,
                    capacity.vcpus,
                    load.memory_bytes >> 20,
                    load.vcpus
                );
                self.vms_registration_refused(why, now);
                return;
            }
        }
        if self
            .vms
            .register_sent_at
            .is_some_and(|t| now.saturating_duration_since(t) < REGISTER_RETRY)
        {
            return;
        }
        self.vms.register_sent_at = Some(now);
        let cmd = Command::RegisterHost {
            host: self.id,
            capacity,
        };
        self.vms_propose_own(&cmd, now);
    }

    /// Records (and, rate-limited, logs at warn) why this host's registration is refused.
    fn vms_registration_refused(&mut self, why: String, now: Instant) {
        let warn = self.vms.register_refused.as_ref() != Some(&why)
            || self
                .vms
                .register_warned_at
                .is_none_or(|t| now.saturating_duration_since(t) >= REGISTER_WARN_EVERY);
        if warn {
            log::warn!("node {}: host registration refused: {why}", self.id);
            self.vms.register_warned_at = Some(now);
        }
        self.vms.register_refused = Some(why);
    }

    // ---- host: VMM processes ---------------------------------------------------------

    fn vms_timeouts(&mut self, now: Instant) {
        for i in 0..self.vms.procs.len() {
            let p = &mut self.vms.procs[i];
            if let Some((purpose, deadline)) = p.in_flight {
                if now >= deadline {
                    log::error!(
                        "vmm {} (token {}, pid {:?}) did not answer {purpose:?} in time; killing it",
                        p.local.vm,
                        p.local.token,
                        p.process.pid()
                    );
                    p.stop_reason = Some(format!("hung: no answer to {purpose:?}"));
                    p.process.kill();
                    p.in_flight = None;
                    self.vms.vmm_kills += 1;
                }
            }
            let p = &mut self.vms.procs[i];
            if p.conn.is_none() && p.connect_by.is_some_and(|d| now >= d) {
                log::error!(
                    "vmm {} (token {}): its control socket did not come up in time; killing it",
                    p.local.vm,
                    p.local.token
                );
                p.connect_by = None;
                p.stop_reason = Some("its control socket did not come up".into());
                p.process.kill();
                self.vms.vmm_kills += 1;
            }
            // A written snapshot whose record did not commit is given up.
            let p = &mut self.vms.procs[i];
            if p.local.snapshot_in_flight
                && p.snapshot.is_none()
                && p.snapshot_written_at.is_some_and(|t| {
                    now.saturating_duration_since(t)
                        >= Duration::from_millis(limits::SNAPSHOT_COMMIT_TIMEOUT_MS)
                })
            {
                p.local.snapshot_in_flight = false;
                p.snapshot_written_at = None;
            }
        }
    }

    fn vms_connect(&mut self, now: Instant) {
        let mut gone = Vec::new();
        let mut connections = self.vms_connections();
        for i in 0..self.vms.procs.len() {
            if self.vms.procs[i].conn.is_some() {
                continue;
            }
            if connections >= limits::MAX_LOCAL_VMMS {
                // At most this many connections hold buffers (limits.rs budgets two
                // each); a dropped one keeps its buffers until its cancelled operations
                // completed (at the next wait), so this one waits for the next tick.
                break;
            }
            let path = self.vms.procs[i].socket();
            match VmmConn::connect(&path) {
                Ok(mut conn) => {
                    let p = &mut self.vms.procs[i];
                    p.conn_gen = p.conn_gen.wrapping_add(1);
                    let (slot, generation) = (p.slot, p.conn_gen);
                    let tokens = (
                        token(TOKEN_VMM_RECV, slot, generation),
                        token(TOKEN_VMM_SEND, slot, generation),
                    );
                    if let Err(e) = conn.start(&mut self.io, tokens.0, tokens.1) {
                        self.vms.vmm_io_refused += 1;
                        if self.vms.log_budget.allow("vmm connection warning") {
                            log::warn!(
                                "vmm {}: {e}; connecting again at the next tick",
                                self.vms.procs[i].local.vm
                            );
                        }
                        let closed = conn.begin_close(&mut self.io);
                        assert!(closed, "nothing is in flight after a failed start");
                        continue;
                    }
                    let p = &mut self.vms.procs[i];
                    if matches!(p.process, Process::Unknown) {
                        if let Some(pid) = conn.peer_pid() {
                            match child::pidfd_open(pid) {
                                Ok(pidfd) => {
                                    if self
                                        .io
                                        .poll_in(token(TOKEN_VMM_EXIT, slot, 0), pidfd.as_raw_fd())
                                        .is_ok()
                                    {
                                        p.process = Process::Adopted { pid, pidfd };
                                    }
                                }
                                Err(e) => log::warn!("pidfd_open({pid}): {e}"),
                            }
                        }
                    }
                    p.conn = Some(conn);
                    connections += 1;
                    p.connect_by = None;
                    p.in_flight = None;
                    if !p.known {
                        p.queue.push_front((Request::Status, Purpose::Status));
                    }
                }
                Err(e) => {
                    let p = &self.vms.procs[i];
                    let nobody = matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNREFUSED) | Some(libc::ENOENT)
                    );
                    let late = self.vms.discovery_until.is_none_or(|t| now >= t);
                    if matches!(p.process, Process::Unknown) && (nobody || late) {
                        // Found on disk, but nobody listens: that VMM is gone.
                        log::info!(
                            "vmm {}: {} does not answer ({e}); not adopted",
                            p.local.vm,
                            path.display()
                        );
                        gone.push(p.slot);
                    }
                }
            }
        }
        for slot in gone {
            if let Some(i) = self.vms.proc_index(slot) {
                self.vms.procs.remove(i);
            }
        }
    }

    /// Drops a VMM's connection: it leaves the VMM at once (a new one may be made at the
    /// next tick) and closes once its cancelled operations completed.
    fn vms_drop_conn(&mut self, i: usize, why: &str) {
        let p = &mut self.vms.procs[i];
        if let Some(mut conn) = p.conn.take() {
            log::warn!(
                "vmm {} (token {}): connection dropped: {why}",
                p.local.vm,
                p.local.token
            );
            if !conn.begin_close(&mut self.io) {
                self.vms.closing.push(conn);
            }
        }
        // What was in flight is lost; renewals and status are sent afresh.
        if let Some((purpose, _)) = p.in_flight.take() {
            if purpose == Purpose::Snapshot {
                p.snapshot = None;
                p.local.snapshot_in_flight = false;
            }
        }
    }

    fn vms_exited(&mut self, i: usize, now: Instant) {
        let mut p = self.vms.procs.remove(i);
        let how = match &p.process {
            Process::Child(c) => match c.try_wait() {
                Ok(Some(ExitStatus::Exited(code))) => format!("exit code {code}"),
                Ok(Some(ExitStatus::Signaled(sig))) => format!("signal {sig}"),
                Ok(None) => "exited".to_string(),
                Err(e) => format!("exited ({e})"),
            },
            _ => "exited".to_string(),
        };
        if let Some(mut conn) = p.conn.take() {
            if !conn.begin_close(&mut self.io) {
                self.vms.closing.push(conn);
            }
        }
        let _ = self.io.cancel(token(TOKEN_VMM_EXIT, p.slot, 0));
        let reason = match p.stop_reason.take() {
            Some(r) => format!("{r} ({how})"),
            None => how,
        };
        log::info!(
            "vmm {} (token {}, pid {:?}) ended: {reason}",
            p.local.vm,
            p.local.token,
            p.process.pid()
        );
        if p.started_here && !p.started_event {
            // It never ran: do not start it again at once.
            self.vms
                .start_backoff
                .insert(p.local.vm.clone(), now.saturating_add(START_BACKOFF));
        }
        let counter = p.status.as_ref().map(|s| s.counter);
        self.vm_event(
            "vm_stopped",
            serde_json::json!({"vm": p.local.vm, "host": self.id, "token": p.local.token,
                "reason": reason, "counter": counter}),
            now,
        );
    }

    fn vms_reconcile(&mut self, now: Instant) {
        if let Some(until) = self.vms.discovery_until {
            let pending = self.vms.procs.iter().any(|p| !p.known);
            if pending && now < until {
                return;
            }
            self.vms.discovery_until = None;
        }
        // The one place the host's own lease is computed (shown by /status as well).
        let lease = own_lease_expiry(&self.raft, &self.vms.rules);
        self.vms.own_lease = lease;
        let locals: Vec<LocalVmm> = self
            .vms
            .procs
            .iter()
            .filter(|p| p.known)
            .map(|p| p.local.clone())
            .collect();
        let actions = reconcile::reconcile(&reconcile::Input {
            state: &self.app.state,
            host: self.id,
            vmms: &locals,
            own_lease_expiry_ns: lease,
            now_ns: now_ns(now),
        });
        // Snapshot records become committed-or-not: clear in-flight once the chain has it.
        for p in &mut self.vms.procs {
            if !p.local.snapshot_in_flight || p.snapshot.is_some() {
                continue;
            }
            if let Some(x) = self.app.state.vm(&p.local.vm) {
                if x.chain
                    .iter()
                    .any(|c| c.token == p.local.token && c.seq == p.local.last_seq_used)
                    || x.migration.is_some_and(|m| m.ready)
                {
                    p.local.snapshot_in_flight = false;
                    p.snapshot_written_at = None;
                }
            }
        }
        for a in actions {
            self.vms_act(a, now);
        }
        self.vms_collect_snapshots();
    }

    /// Removes snapshot directories that a new full snapshot superseded: those of the
    /// VMs running here, older than their committed chain's head. Only the host running a
    /// VM does it, once per new head. A restorer trusts only the committed chain, so
    /// nothing removed here is ever restored; a lagging starter that still names one
    /// fails, backs off and retries with the newer chain.
    fn vms_collect_snapshots(&mut self) {
        let state = &self.app.state;
        let mut queued = Vec::new();
        for p in &self.vms.procs {
            let Some(vm) = state
                .vm(&p.local.vm)
                .filter(|v| v.host == Some(self.id) && v.token == p.local.token)
            else {
                continue;
            };
            let Some(head) = vm.chain.first() else {
                continue;
            };
            if self.vms.collected.get(&vm.id) == Some(&head.committed_index) {
                continue;
            }
            queued.push((vm.id.clone(), head.committed_index, head.token, head.seq));
        }
        for (vm, index, token, seq) in queued {
            let dir = self.vms.shared_dir.join("vms").join(&vm);
            // Not marked collected when the queue is full: the next apply tries again.
            if self.vms.queue_sweep(dir, Sweep::Before(token, seq)) {
                self.vms.collected.insert(vm, index);
            }
        }
        let known: Vec<String> = self.vms.procs.iter().map(|p| p.local.vm.clone()).collect();
        self.vms.collected.retain(|vm, _| known.contains(vm));
    }

    /// Reaps finished sweepers and starts queued sweeps, at most
    /// `limits::MAX_SNAPSHOT_SWEEPERS` at once. Listing and removing directories on
    /// shared storage happens only in those children (`vigil sweep-snapshots`).
    fn vms_sweep(&mut self) {
        self.vms.sweepers.retain(|(c, dir)| match c.try_wait() {
            Ok(None) => true,
            Ok(Some(ExitStatus::Exited(0))) => {
                log::debug!("swept {}", dir.display());
                false
            }
            Ok(Some(how)) => {
                // The child logged why (its stderr is ours); a later head retries.
                log::warn!("sweeping {} failed: {how:?}", dir.display());
                false
            }
            Err(e) => {
                log::warn!("sweeping {}: {e}", dir.display());
                false
            }
        });
        while self.vms.sweepers.len() < limits::MAX_SNAPSHOT_SWEEPERS {
            let Some((dir, sweep)) = self.vms.sweeps.pop_front() else {
                break;
            };
            let mut cmd = std::process::Command::new(&self.vms.vmm_binary);
            cmd.args(sweep::args(&dir, sweep))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null());
            // fork + exec only; the child does the storage work.
            match child::spawn(&mut cmd, false) {
                Ok(c) => {
                    log::debug!("sweeping {} ({sweep:?}), pid {}", dir.display(), c.pid());
                    self.vms.sweepers.push((c, dir));
                }
                Err(e) => log::warn!(
                    "cannot spawn {} to sweep {}: {e}",
                    self.vms.vmm_binary.display(),
                    dir.display()
                ),
            }
        }
    }

    fn vms_act(&mut self, action: Action, now: Instant) {
        if !matches!(action, Action::Renew { .. } | Action::Snapshot(_)) {
            log::info!("node {}: reconcile: {action:?}", self.id);
        }
        match action {
            Action::Start {
                vm,
                token,
                spec,
                restore,
                lease_deadline_ns,
            } => self.vms_start(&vm, token, &spec, &restore, lease_deadline_ns, now),
            Action::Adopt { vm, token } => {
                if let Some(i) = self.vms.find(&vm, token) {
                    let p = &mut self.vms.procs[i];
                    if p.local.adopted {
                        return;
                    }
                    p.local.adopted = true;
                    log::info!("vmm {vm} (token {token}): adopted");
                    // A VMM an earlier agent process started, found running and placed
                    // here: it was neither started nor restored now (no `vm_started`).
                    let fields = serde_json::json!({"vm": vm, "host": self.id,
                        "token": token, "counter": p.status.as_ref().map(|s| s.counter),
                        "pid": p.process.pid(), "state": p.local.state.name()});
                    self.vm_event("vm_adopted", fields, now);
                }
            }
            Action::Stop { vm, token, reason } => {
                if let Some(i) = self.vms.find(&vm, token) {
                    let p = &mut self.vms.procs[i];
                    p.local.stopping = true;
                    p.stop_reason = Some(format!("{reason:?}"));
                    if p.conn.is_some() || p.connect_by.is_some() {
                        p.queue.clear();
                        p.enqueue(Request::Stop, Purpose::Stop);
                    } else {
                        p.process.kill();
                    }
                }
            }
            Action::Renew {
                vm,
                token,
                deadline_ns,
            } => {
                let migration = self.app.state.vm(&vm).and_then(|v| v.migration);
                if let Some(i) = self.vms.find(&vm, token) {
                    let p = &mut self.vms.procs[i];
                    // A real VMM that was paused and then fenced forgets the pause: a
                    // renewal would resume it. So a migrating VM is renewed only while it
                    // still runs and no pause was sent; once paused (or its final
                    // snapshot committed) it is left to fence, and never resumes here
                    // unless the migration is called off.
                    if migration.is_none() {
                        p.paused_for_migration = false;
                    }
                    if !renew_allowed(migration, p.paused_for_migration, p.local.state) {
                        return;
                    }
                    let renew = Request::Renew { token, deadline_ns };
                    match p.queue.iter_mut().find(|(_, q)| *q == Purpose::Renew) {
                        Some(queued) => queued.0 = renew,
                        None => p.enqueue(renew, Purpose::Renew),
                    }
                }
            }
            Action::Pause { vm, token } => {
                let migrating = self
                    .app
                    .state
                    .vm(&vm)
                    .is_some_and(|v| v.migration.is_some());
                if let Some(i) = self.vms.find(&vm, token) {
                    let p = &mut self.vms.procs[i];
                    p.paused_for_migration |= migrating;
                    if !p.queued(Purpose::Pause) {
                        p.enqueue(Request::Pause, Purpose::Pause);
                    }
                }
            }
            Action::Resume { vm, token } => {
                if let Some(i) = self.vms.find(&vm, token) {
                    let p = &mut self.vms.procs[i];
                    if !p.queued(Purpose::Resume) {
                        p.enqueue(Request::Resume, Purpose::Resume);
                    }
                }
            }
            Action::Snapshot(req) => self.vms_snapshot(req, now),
        }
    }

    fn vms_snapshot(&mut self, req: SnapshotRequest, now: Instant) {
        let path = self.vms.shared_dir.join(&req.path);
        let Some(i) = self.vms.find(&req.vm, req.token) else {
            return;
        };
        let p = &mut self.vms.procs[i];
        if p.snapshot.is_some() || p.queued(Purpose::Snapshot) {
            return;
        }
        p.local.snapshot_in_flight = true;
        p.local.last_snapshot_requested_ns = Some(now_ns(now));
        p.local.last_seq_used = p.local.last_seq_used.max(req.seq);
        let kind = match req.kind {
            SnapshotKind::Full => SnapshotKindWire::Full,
            SnapshotKind::Diff => SnapshotKindWire::Diff,
        };
        p.snapshot = Some(req);
        p.enqueue(Request::Snapshot { kind, path }, Purpose::Snapshot);
    }

    fn vms_start(
        &mut self,
        vm: &str,
        token: u64,
        spec: &crate::cluster::command::VmSpec,
        restore: &[CommittedSnapshot],
        lease_deadline_ns: u64,
        now: Instant,
    ) {
        if self.vms.procs.len() >= limits::MAX_LOCAL_VMMS {
            log::warn!(
                "vm {vm}: {} VMMs already; not started",
                self.vms.procs.len()
            );
            return;
        }
        if self.vms.start_backoff.get(vm).is_some_and(|&t| now < t) {
            return;
        }
        self.vms.start_backoff.remove(vm);
        let fail = |vms: &mut Vms, why: String| {
            log::error!("vm {vm} (token {token}): not started: {why}");
            vms.start_backoff
                .insert(vm.to_string(), now.saturating_add(START_BACKOFF));
        };
        // Restore only what the committed state names: the VMM checks that each
        // directory's state file carries the committed snapshot id
        // (`--expect-snapshot-id`; a rewrite by an attempt whose record never committed
        // is refused). It reads the state files anyway to restore them, so they are
        // read once, and never here: shared storage may be slow, and the loop must not
        // wait for it. A VMM that refuses exits before it ever runs; `vms_exited` then
        // backs off before the next start.
        let chain: Vec<(PathBuf, u64)> = restore
            .iter()
            .map(|c| (self.vms.shared_dir.join(&c.path), c.snapshot_id))
            .collect();
        let Some(cfg) = self.vms.config.clone() else {
            return;
        };
        let dir = self.vms.run_dir.join(vm);
        // These two stay on the loop: the run directory is on the agent's local data
        // disk (where the WAL lives, which the loop writes every turn anyway), not on
        // shared storage; they are a mkdir and an open of one small file, and they are
        // timed (a warning above `limits::SLOW_FS_WARN_MS`). The VMM's stderr must be
        // open before it is spawned.
        if let Err(e) = timed_fs("create the VMM directory", || std::fs::create_dir_all(&dir)) {
            return fail(&mut self.vms, format!("create {}: {e}", dir.display()));
        }
        let log = match timed_fs("open vmm.log", || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("vmm.log"))
        }) {
            Ok(f) => f,
            Err(e) => return fail(&mut self.vms, format!("vmm.log: {e}")),
        };
        let mut cmd = std::process::Command::new(&self.vms.vmm_binary);
        cmd.arg("vmm")
            .arg("--control")
            .arg(dir.join("control.sock"))
            .arg("--token")
            .arg(token.to_string())
            .arg("--lease-deadline-ns")
            .arg(lease_deadline_ns.to_string())
            .arg("--abandon-after-ms")
            .arg(cfg.abandon_after_ms.to_string())
            .arg("--report-file")
            .arg(dir.join("reports.log"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        match log.try_clone() {
            Ok(l) => cmd.stderr(l),
            Err(_) => cmd.stderr(std::process::Stdio::null()),
        };
        if chain.is_empty() {
            cmd.arg("--memory-mib")
                .arg((spec.resources.memory_bytes >> 20).to_string())
                .arg("--vcpus")
                .arg(spec.resources.vcpus.to_string())
                .arg("--touch-percent")
                .arg(spec.touch_percent.to_string());
        } else {
            for (d, id) in &chain {
                cmd.arg("--restore")
                    .arg(d)
                    .arg("--expect-snapshot-id")
                    .arg(format!("{id:x}"));
            }
        }
        let child = match child::spawn(&mut cmd, true) {
            Ok(c) => c,
            Err(e) => {
                let why = format!("spawn {}: {e}", self.vms.vmm_binary.display());
                return fail(&mut self.vms, why);
            }
        };
        let slot = self.vms.next_slot;
        self.vms.next_slot += 1;
        if let Err(e) = self.io.poll_in(token_exit(slot), child.pidfd()) {
            log::error!("vm {vm}: cannot watch the VMM's exit: {e}");
        }
        let restored_from = restore.last().map(snapshot_name);
        log::info!(
            "vm {vm} (token {token}): started vmm pid {} ({})",
            child.pid(),
            match &restored_from {
                Some(s) => format!("restoring {s}, a chain of {}", chain.len()),
                None => "fresh boot".into(),
            }
        );
        self.vms.vmm_starts += 1;
        let last_seq_used = self.vms.highest_seq(vm, token);
        self.vms.procs.push(Proc {
            slot,
            local: LocalVmm {
                vm: vm.to_string(),
                token,
                state: VmmState::Running,
                adopted: true,
                stopping: false,
                since_ns: now_ns(now),
                last_snapshot_id: restore.last().map_or(0, |c| c.snapshot_id),
                last_snapshot_requested_ns: None,
                last_seq_used,
                snapshot_in_flight: false,
            },
            known: true,
            started_here: true,
            dir,
            process: Process::Child(child),
            conn: None,
            connect_by: Some(
                now.saturating_add(Duration::from_millis(limits::VMM_START_TIMEOUT_MS)),
            ),
            in_flight: None,
            queue: VecDeque::new(),
            status: None,
            status_at: None,
            started_event: false,
            restored_from,
            snapshot: None,
            snapshot_written_at: None,
            stop_reason: None,
            paused_for_migration: false,
            conn_gen: 0,
        });
    }

    /// Sends the next queued request of every idle VMM; asks idle ones for status.
    fn vms_pump(&mut self, now: Instant) {
        let mut broken = Vec::new();
        for (i, p) in self.vms.procs.iter_mut().enumerate() {
            let Some(conn) = p.conn.as_mut() else {
                continue;
            };
            if let Err(e) = conn.flush(&mut self.io) {
                broken.push((i, e));
                continue;
            }
            if p.in_flight.is_some() {
                continue;
            }
            if p.queue.is_empty()
                && p.status_at
                    .is_none_or(|t| now.saturating_duration_since(t) >= STATUS_EVERY)
            {
                p.queue.push_back((Request::Status, Purpose::Status));
            }
            let Some((request, purpose)) = p.queue.pop_front() else {
                continue;
            };
            if let Err(e) = conn.send(&mut self.io, &request) {
                broken.push((i, e));
                continue;
            }
            let timeout = if purpose == Purpose::Snapshot {
                limits::VMM_SNAPSHOT_TIMEOUT_MS
            } else {
                limits::VMM_REQUEST_TIMEOUT_MS
            };
            p.in_flight = Some((purpose, now.saturating_add(Duration::from_millis(timeout))));
        }
        for (i, why) in broken.into_iter().rev() {
            self.vms_drop_conn(i, &why);
        }
    }

    fn vms_reply(&mut self, slot: u64, reply: VmmReply, now: Instant) {
        let Some(i) = self.vms.proc_index(slot) else {
            return;
        };
        let me = self.id;
        let p = &mut self.vms.procs[i];
        let Some((purpose, _)) = p.in_flight.take() else {
            log::warn!("vmm {}: an unasked reply; ignored", p.local.vm);
            return;
        };
        let mut event = None;
        let mut propose = None;
        let mut found = None;
        match reply {
            VmmReply::Status(st) => {
                if !p.known {
                    p.known = true;
                    found = Some((p.local.vm.clone(), st.token));
                    p.local.token = st.token;
                    p.local.last_snapshot_id = st.last_snapshot_id;
                    log::info!(
                        "vmm {} found with token {}, {} (counter {})",
                        p.local.vm,
                        st.token,
                        st.state.name(),
                        st.counter
                    );
                }
                p.local.state = st.state;
                if p.started_here && !p.started_event && st.state == VmmState::Running {
                    p.started_event = true;
                    event = Some(serde_json::json!({"vm": p.local.vm, "host": me,
                        "token": p.local.token, "restored_from": p.restored_from,
                        "counter": st.counter, "pid": p.process.pid()}));
                }
                p.status = Some(st);
                p.status_at = Some(now);
            }
            VmmReply::Snapshot { snapshot_id, .. } => match p.snapshot.take() {
                Some(req) if purpose == Purpose::Snapshot => {
                    p.local.last_snapshot_id = snapshot_id;
                    p.snapshot_written_at = Some(now);
                    propose = Some(Command::SnapshotCommitted(snapshot_record(
                        &req,
                        snapshot_id,
                        wall_ms(),
                    )));
                }
                _ => log::warn!("vmm {}: an unasked snapshot reply", p.local.vm),
            },
            VmmReply::Error { code, message } => {
                log::warn!(
                    "vmm {} (token {}): {purpose:?} refused (code {code}): {message}",
                    p.local.vm,
                    p.local.token
                );
                match purpose {
                    Purpose::Snapshot => {
                        p.snapshot = None;
                        p.local.snapshot_in_flight = false;
                    }
                    Purpose::Stop => p.process.kill(),
                    _ => {}
                }
            }
        }
        if let Some((vm, token)) = found {
            // Snapshot directories this token's VMM wrote (committed or not) are not
            // written again.
            let seq = self.vms.highest_seq(&vm, token);
            self.vms.procs[i].local.last_seq_used = seq;
        }
        if let Some(fields) = event {
            self.vm_event("vm_started", fields, now);
        }
        if let Some(cmd) = propose {
            self.vms_propose_own(&cmd, now);
        }
    }

    // ---- events ----------------------------------------------------------------------

    fn vm_event(&mut self, kind: &str, mut fields: serde_json::Value, now: Instant) {
        if let Some(o) = fields.as_object_mut() {
            o.insert("at_ms".into(), (now_ns(now) as f64 / 1e6).into());
            o.insert("node".into(), self.id.into());
        }
        self.publish(kind, fields);
    }

    /// Host and placement changes, from the applied state (every node).
    fn vms_events(&mut self, now: Instant) {
        let state = &self.app.state;
        let mut events = Vec::new();
        for h in state.hosts() {
            if self.vms.view_hosts.get(&h.id) != Some(&h.state) {
                let kind = match h.state {
                    HostState::Alive => "host_alive",
                    HostState::Dead => "host_dead",
                    HostState::Draining => "host_draining",
                    HostState::Drained => "host_drained",
                };
                let fields = serde_json::json!({"host": h.id, "index": h.state_index,
                    "reason": (!h.reason.is_empty()).then(|| h.reason.clone())});
                events.push((kind, fields));
                self.vms.view_hosts.insert(h.id, h.state);
            }
        }
        let mut seen = Vec::new();
        for vm in state.vms() {
            seen.push(vm.id.clone());
            let now_view = VmView {
                host: vm.host,
                token: vm.token,
                waiting: vm.waiting.clone(),
                snapshot: vm.latest_snapshot().map(|c| c.committed_index),
            };
            let before = self.vms.view_vms.get(&vm.id).cloned();
            let changed_place = before
                .as_ref()
                .is_none_or(|b| b.host != vm.host || b.token != vm.token);
            if let Some(h) = vm.host.filter(|_| changed_place) {
                events.push((
                    "vm_placed",
                    serde_json::json!({"vm": vm.id, "host": h, "token": vm.token, "index": vm.token}),
                ));
            }
            if !vm.waiting.is_empty() && before.as_ref().is_none_or(|b| b.waiting != vm.waiting) {
                events.push((
                    "vm_waiting",
                    serde_json::json!({"vm": vm.id, "reason": vm.waiting}),
                ));
            }
            if let Some(c) = vm.latest_snapshot() {
                if before
                    .as_ref()
                    .is_none_or(|b| b.snapshot != Some(c.committed_index))
                {
                    events.push((
                        "snapshot_committed",
                        serde_json::json!({"vm": vm.id, "snapshot": snapshot_name(c),
                            "kind": kind_name(c.kind), "index": c.committed_index}),
                    ));
                }
            }
            self.vms.view_vms.insert(vm.id.clone(), now_view);
        }
        // Deleted VMs: their snapshot directories are removed by the host they were
        // last placed on, or by the leader when that host is gone (dead, drained or
        // unknown) or the VM was placed nowhere. Off the loop (`vigil sweep-snapshots`).
        let applied = state.applied_index();
        let leader = self.raft.leader() == self.id;
        let mut deleted = Vec::new();
        for (id, view) in &self.vms.view_vms {
            if seen.contains(id) {
                continue;
            }
            let host_alive = view
                .host
                .and_then(|h| state.hosts().find(|x| x.id == h))
                .is_some_and(|h| h.state == HostState::Alive || h.state == HostState::Draining);
            let mine = view.host == Some(self.id) && host_alive;
            if mine || (leader && !host_alive) {
                deleted.push(id.clone());
            }
        }
        self.vms.view_vms.retain(|id, _| seen.contains(id));
        self.vms.view_at = applied;
        for vm in deleted {
            // Every token of the deleted VM is at most `applied`; a VM created again
            // under this id gets larger ones, and its snapshots stay.
            let dir = self.vms.shared_dir.join("vms").join(&vm);
            if self.vms.queue_sweep(dir, Sweep::Deleted(applied + 1)) {
                log::info!("vm {vm}: deleted; its snapshot directory will be removed");
            }
        }
        for (kind, fields) in events {
            self.vm_event(kind, fields, now);
        }
    }

    // ---- API -------------------------------------------------------------------------

    fn vm_json(&self, vm: &Vm) -> serde_json::Value {
        let local = self
            .vms
            .procs
            .iter()
            .find(|p| p.known && p.local.vm == vm.id && p.local.token == vm.token)
            .map(|p| {
                serde_json::json!({
                    "state": p.status.as_ref().map_or(p.local.state, |s| s.state).name(),
                    "counter": p.status.as_ref().map(|s| s.counter),
                    "pid": p.process.pid(),
                })
            });
        serde_json::json!({
            "id": vm.id,
            "memory_mib": vm.spec.resources.memory_bytes >> 20,
            "vcpus": vm.spec.resources.vcpus,
            "touch_percent": vm.spec.touch_percent,
            "snapshot_interval_ms": vm.spec.snapshot_interval_ms,
            "full_every": vm.spec.full_every,
            "anti_affinity": vm.spec.anti_affinity,
            "desired": match vm.desired { Desired::Running => "running", Desired::Stopped => "stopped" },
            "host": vm.host,
            "token": vm.token,
            "waiting": (!vm.waiting.is_empty()).then(|| vm.waiting.clone()),
            "migrating": vm.migration.is_some(),
            "migrating_to": vm.migration.and_then(|m| m.target),
            "snapshot": (!vm.chain.is_empty()).then(|| snapshot_json(vm, vm.chain.len() - 1)),
            "local": local,
        })
    }

    fn hosts_json(&self, now: Instant) -> serde_json::Value {
        let state = &self.app.state;
        let mut hosts = Vec::new();
        for h in state.hosts() {
            let phi = self.vms.leader.phi(h.id, now_ns(now));
            let shown = match h.state {
                HostState::Alive if phi.is_some_and(|p| p >= PHI_SUSPECT) => "suspect",
                s => s.name(),
            };
            let load = state.load(h.id);
            let vms: Vec<&str> = state.vms_on(h.id).map(|v| v.id.as_str()).collect();
            let last_snapshot_ms = state
                .vms_on(h.id)
                .filter_map(|v| v.latest_snapshot().map(|c| c.taken_at_ms))
                .max();
            hosts.push(serde_json::json!({
                "id": h.id,
                "state": shown,
                "phi": phi,
                "reason": (!h.reason.is_empty()).then(|| h.reason.clone()),
                "capacity": {"memory_mib": h.capacity.memory_bytes >> 20, "vcpus": h.capacity.vcpus},
                "used": {"memory_mib": load.memory_bytes >> 20, "vcpus": load.vcpus},
                "vms": vms,
                "last_snapshot_ms": last_snapshot_ms,
            }));
        }
        serde_json::json!({"hosts": hosts, "served_by": self.id})
    }

    /// `/status`: phi per host (leader), and the VMMs this host looks after.
    pub(super) fn vms_status_json(&self, now: Instant) -> serde_json::Value {
        let phi: serde_json::Map<String, serde_json::Value> = self
            .app
            .state
            .hosts()
            .filter_map(|h| {
                self.vms
                    .leader
                    .phi(h.id, now_ns(now))
                    .map(|p| (h.id.to_string(), p.into()))
            })
            .collect();
        let local: Vec<serde_json::Value> = self
            .vms
            .procs
            .iter()
            .map(|p| {
                serde_json::json!({
                    "vm": p.local.vm,
                    "token": p.local.token,
                    "state": p.status.as_ref().map(|s| s.state.name()),
                    "counter": p.status.as_ref().map(|s| s.counter),
                    "pid": p.process.pid(),
                    "connected": p.conn.is_some(),
                })
            })
            .collect();
        let lease_ms = self
            .vms
            .own_lease
            .map(|e| (e as f64 - now_ns(now) as f64) / 1e6);
        serde_json::json!({
            "enabled": self.vms.config.is_some(),
            "phi": phi,
            "own_lease_ms": lease_ms,
            "registration_refused": self.vms.register_refused,
            "vmms": local,
        })
    }

    pub(super) fn vms_metrics(&self, out: &mut String, now: Instant) {
        use std::fmt::Write;
        let _ = out.write_str("# HELP vigil_host_phi Phi-accrual suspicion of each host (leader only).\n# TYPE vigil_host_phi gauge\n");
        for h in self.app.state.hosts() {
            if let Some(p) = self.vms.leader.phi(h.id, now_ns(now)) {
                let _ = writeln!(out, "vigil_host_phi{{host=\"{}\"}} {p}", h.id);
            }
        }
        crate::metrics::render_scalar(
            out,
            "vigil_local_vmms",
            "gauge",
            "VMM processes this agent looks after.",
            self.vms.procs.len() as u64,
        );
        crate::metrics::render_scalar(
            out,
            "vigil_vmm_starts_total",
            "counter",
            "VMMs this agent started.",
            self.vms.vmm_starts,
        );
        crate::metrics::render_scalar(
            out,
            "vigil_vmm_kills_total",
            "counter",
            "VMMs this agent killed (hung, or their socket never came up).",
            self.vms.vmm_kills,
        );
        crate::metrics::render_scalar(
            out,
            "vigil_vmm_io_refused_total",
            "counter",
            "VMM connections not made because the I/O layer had no buffer or operation slot.",
            self.vms.vmm_io_refused,
        );
    }

    /// A request on one of the VM routes.
    // The request's parts, as `Node::handle_request` has them (no struct holds them).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn handle_vm_request(
        &mut self,
        reply: Reply,
        method: Method,
        path: &str,
        query: &str,
        route: VmRoute,
        body: &[u8],
        now: Instant,
    ) -> Result<(), String> {
        if route.needs_leader(method) && !self.raft.is_leader() {
            return self.forward(reply, method, path, body, now);
        }
        macro_rules! parse {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => {
                        return self.answer_then_next(reply, e.status(), &http::error_body(&e), now)
                    }
                }
            };
        }
        match route {
            VmRoute::Vms if method == Method::Get => {
                let (after, limit) = parse!(api::parse_vms_page(query));
                self.vms_read_index(reply, ReadKind::Vms { after, limit }, now)
            }
            VmRoute::Vm(id) if method == Method::Get => {
                self.vms_read_index(reply, ReadKind::Vm(id), now)
            }
            VmRoute::ValidateToken => {
                let (vm, t) = parse!(api::parse_validate(body));
                self.vms_read_index(reply, ReadKind::Validate(vm, t), now)
            }
            VmRoute::Vms => {
                let c = parse!(api::parse_vm_create(body));
                let cmd = Command::CreateVm {
                    vm: c.id.clone(),
                    spec: c.spec,
                };
                self.vms_propose_for(reply, &cmd, c.request_id, Then::Create(c.id), now)
            }
            VmRoute::Vm(id) => {
                let request = parse!(api::parse_request_id_only(body));
                let cmd = Command::DeleteVm { vm: id.clone() };
                self.vms_propose_for(reply, &cmd, request, Then::Delete(id), now)
            }
            VmRoute::Migrate(id) => {
                let (to, wait, request) = parse!(api::parse_migrate(body));
                let Some(from) = self.app.state.vm(&id).and_then(|v| v.host) else {
                    let (status, code) = if self.app.state.vm(&id).is_some() {
                        (409, "conflict")
                    } else {
                        (404, "not_found")
                    };
                    let msg = format!("vm {id:?} does not run anywhere to migrate from");
                    return self.answer_then_next(reply, status, &api::error_json(&msg, code), now);
                };
                let cmd = Command::MigrateVm {
                    vm: id.clone(),
                    target: to,
                };
                self.vms_propose_for(
                    reply,
                    &cmd,
                    request,
                    Then::Migrate { vm: id, from, wait },
                    now,
                )
            }
            VmRoute::Drain(host) => {
                let (wait, request) = parse!(api::parse_drain(body));
                let cmd = Command::DrainHost { host };
                self.vms_propose_for(reply, &cmd, request, Then::Drain { host, wait }, now)
            }
            VmRoute::Hosts => {
                let body = self.hosts_json(now).to_string();
                self.answer_then_next(reply, 200, &body, now)
            }
            VmRoute::InternalCommand => {
                let bytes = parse!(api::parse_internal_command(body));
                let allowed = match Command::decode(&bytes) {
                    Ok((_, Command::RegisterHost { .. } | Command::SnapshotCommitted(_))) => Ok(()),
                    Ok((_, other)) => Err(format!("{} is not an internal command", other.name())),
                    Err(e) => Err(format!("the command does not decode: {e}")),
                };
                if let Err(why) = allowed {
                    return self.answer_then_next(
                        reply,
                        400,
                        &api::error_json(&why, "bad_body"),
                        now,
                    );
                }
                match self.raft.propose(now_ns(now), &bytes) {
                    Ok((index, term)) => {
                        self.vms_wait(
                            reply,
                            WaitFor::Entry {
                                index,
                                term,
                                then: Then::Outcome,
                            },
                            now,
                        );
                        self.collect()
                    }
                    Err(e) => {
                        let (status, body) = raft_error(e);
                        self.answer_then_next(reply, status, &body, now)
                    }
                }
            }
            VmRoute::Snapshot(id) => {
                let kind = parse!(api::parse_snapshot(body));
                self.vms_snapshot_request(reply, path, body, &id, kind, now)
            }
        }
    }

    fn vms_snapshot_request(
        &mut self,
        reply: Reply,
        path: &str,
        body: &[u8],
        id: &str,
        kind: SnapshotKind,
        now: Instant,
    ) -> Result<(), String> {
        let Some(vm) = self.app.state.vm(id) else {
            let msg = format!("no vm {id:?}");
            return self.answer_then_next(reply, 404, &api::error_json(&msg, "not_found"), now);
        };
        let Some(host) = vm.host else {
            let msg = format!("vm {id:?} does not run anywhere");
            return self.answer_then_next(reply, 409, &api::error_json(&msg, "conflict"), now);
        };
        if host != self.id {
            // The VM's host takes it; forward there (once).
            return match reply {
                Reply::Local(conn) if self.peers.is_connected(host) => {
                    let fid = self.next_forward;
                    self.next_forward += 1;
                    let req = ForwardRequest {
                        id: fid,
                        method: api::method_code(Method::Post),
                        path,
                        body,
                    };
                    if self.peers.send_forward_request(host, &req) {
                        self.forwarded.insert(fid, (conn, host, false));
                        Ok(())
                    } else {
                        let msg = format!("host {host} of vm {id:?} is not reachable; retry");
                        self.answer_then_next(
                            reply,
                            503,
                            &api::error_json(&msg, "unreachable"),
                            now,
                        )
                    }
                }
                _ => {
                    let msg = format!("vm {id:?} runs on host {host}, which is not reachable from here (or this node's state lags); retry");
                    self.answer_then_next(reply, 503, &api::error_json(&msg, "unreachable"), now)
                }
            };
        }
        let Some(i) = self.vms.find(id, vm.token) else {
            let msg = format!("vm {id:?} is placed here but its VMM is not running yet; retry");
            return self.answer_then_next(reply, 503, &api::error_json(&msg, "not_running"), now);
        };
        let p = &self.vms.procs[i];
        if p.local.snapshot_in_flight || p.snapshot.is_some() || vm.migration.is_some() {
            let msg = format!("a snapshot of vm {id:?} is in progress (or it migrates); retry");
            return self.answer_then_next(reply, 409, &api::error_json(&msg, "busy"), now);
        }
        let req = match reconcile::requested_snapshot(vm, &p.local, kind) {
            Ok(r) => r,
            Err(why) => {
                return self.answer_then_next(reply, 409, &api::error_json(&why, "conflict"), now)
            }
        };
        let (vm_id, token, seq) = (req.vm.clone(), req.token, req.seq);
        self.vms_snapshot(req, now);
        self.vms_pump(now);
        self.vms_wait(
            reply,
            WaitFor::Snapshot {
                vm: vm_id,
                token,
                seq,
            },
            now,
        );
        Ok(())
    }

    fn vms_read_index(&mut self, reply: Reply, kind: ReadKind, now: Instant) -> Result<(), String> {
        let wid = self.next_wait;
        self.next_wait += 1;
        match self.raft.read_index(now_ns(now), wid) {
            Ok(()) => {
                self.vms.reads.insert(wid, (reply, kind));
                self.collect()
            }
            Err(e) => {
                let (status, body) = raft_error(e);
                self.answer_then_next(reply, status, &body, now)
            }
        }
    }

    fn vms_read(&mut self, reply: Reply, kind: ReadKind, now: Instant) -> Result<(), String> {
        let state = &self.app.state;
        let (status, body) = match kind {
            ReadKind::Vms { after, limit } => {
                let page = state
                    .vms()
                    .filter(|v| after.as_ref().is_none_or(|a| v.id > *a))
                    .map(|v| (v.id.as_str(), self.vm_json(v)));
                let (vms, next) = vms_page(page, limit, VMS_PAGE_BUDGET_BYTES);
                (
                    200,
                    serde_json::json!({"vms": vms, "next": next, "served_by": self.id}).to_string(),
                )
            }
            ReadKind::Vm(id) => match state.vm(&id) {
                Some(v) => {
                    let mut j = self.vm_json(v);
                    j["served_by"] = self.id.into();
                    (200, j.to_string())
                }
                None => (404, api::error_json(&format!("no vm {id:?}"), "not_found")),
            },
            ReadKind::Validate(vm, t) => {
                let (result, current) = match state.validate_token(&vm, t) {
                    TokenCheck::Current => ("current", Some(t)),
                    TokenCheck::Stale { current } => ("stale", Some(current)),
                    TokenCheck::UnknownVm => ("unknown", None),
                };
                (
                    200,
                    serde_json::json!({"vm": vm, "token": t, "result": result,
                        "current": current, "served_by": self.id})
                    .to_string(),
                )
            }
        };
        self.answer_then_next(reply, status, &body, now)
    }

    fn vms_wait(&mut self, reply: Reply, what: WaitFor, now: Instant) {
        self.vms.waiters.push(Waiter {
            reply,
            deadline: now.saturating_add(Duration::from_millis(limits::VM_WAIT_MS)),
            what,
        });
    }

    fn vms_propose_for(
        &mut self,
        reply: Reply,
        cmd: &Command,
        request_id: u64,
        then: Then,
        now: Instant,
    ) -> Result<(), String> {
        if self.vms.waiters.len() >= limits::MAX_VM_WAITERS {
            return self.answer_then_next(
                reply,
                503,
                &api::error_json("too many VM requests waiting", "busy"),
                now,
            );
        }
        match self
            .raft
            .propose(now_ns(now), &cmd.to_bytes(RequestId(request_id)))
        {
            Ok((index, term)) => {
                self.vms_wait(reply, WaitFor::Entry { index, term, then }, now);
                self.collect()
            }
            Err(e) => {
                let (status, body) = raft_error(e);
                self.answer_then_next(reply, status, &body, now)
            }
        }
    }

    fn vms_entry_applied(
        &mut self,
        waiter: Waiter,
        term: Term,
        outcome: &Outcome,
        now: Instant,
    ) -> Result<(), String> {
        let WaitFor::Entry {
            index,
            term: proposed_term,
            then,
        } = waiter.what
        else {
            return Ok(());
        };
        let reply = waiter.reply;
        if term != proposed_term {
            let body = api::error_json("the entry was replaced by a new leader; retry", "retry");
            return self.answer_then_next(reply, 503, &body, now);
        }
        if let Outcome::Rejected(r) = outcome {
            if !matches!(then, Then::Outcome) {
                let (status, code) = status_for(r.code);
                let body = serde_json::json!({"error": r.message, "code": code,
                    "reason": format!("{:?}", r.code), "index": index, "served_by": self.id});
                return self.answer_then_next(reply, status, &body.to_string(), now);
            }
        }
        match then {
            Then::Create(id) => {
                let vm = self.app.state.vm(&id).map(|v| self.vm_json(v));
                let body = serde_json::json!({"vm": vm, "index": index, "served_by": self.id});
                self.answer_then_next(reply, 201, &body.to_string(), now)
            }
            Then::Delete(id) => {
                let body = serde_json::json!({"deleted": id, "index": index, "served_by": self.id});
                self.answer_then_next(reply, 200, &body.to_string(), now)
            }
            Then::Migrate { vm, from, wait } => {
                if wait {
                    self.vms.waiters.push(Waiter {
                        reply,
                        deadline: waiter.deadline,
                        what: WaitFor::Migrated { vm, from },
                    });
                    self.vms_check_waiters(now)
                } else {
                    let body = serde_json::json!({"vm": vm, "index": index, "in_progress": true,
                        "served_by": self.id});
                    self.answer_then_next(reply, 202, &body.to_string(), now)
                }
            }
            Then::Drain { host, wait } => {
                if wait {
                    self.vms.waiters.push(Waiter {
                        reply,
                        deadline: waiter.deadline,
                        what: WaitFor::Drained { host },
                    });
                    self.vms_check_waiters(now)
                } else {
                    let body = serde_json::json!({"host": host, "index": index,
                        "in_progress": true, "served_by": self.id});
                    self.answer_then_next(reply, 202, &body.to_string(), now)
                }
            }
            Then::Outcome => {
                let (status, body) = self.outcome_json(outcome);
                self.answer_then_next(reply, status, &body, now)
            }
        }
    }

    /// Answers the waiters whose condition holds or whose time is up.
    fn vms_check_waiters(&mut self, now: Instant) -> Result<(), String> {
        let mut answers: Vec<(Reply, u16, String)> = Vec::new();
        let leader = self.raft.is_leader();
        let state = &self.app.state;
        let me = self.id;
        self.vms.waiters.retain(|w| {
            let done: Option<(u16, String)> = match &w.what {
                WaitFor::Entry { .. } if !leader => Some((
                    503,
                    api::error_json("leadership lost before commit; the write may or may not apply; retry with the same request_id", "retry"),
                )),
                WaitFor::Entry { .. } => None,
                WaitFor::Snapshot { vm, token, seq } => match state.vm(vm) {
                    None => Some((404, api::error_json(&format!("vm {vm:?} was deleted"), "not_found"))),
                    Some(v) => match v.chain.iter().position(|c| c.token == *token && c.seq == *seq) {
                        Some(k) => Some((200, serde_json::json!({"vm": vm, "snapshot": snapshot_json(v, k), "served_by": me}).to_string())),
                        None if v.token != *token => Some((409, api::error_json(&format!("vm {vm:?} moved before its snapshot committed"), "conflict"))),
                        None => None,
                    },
                },
                WaitFor::Migrated { vm, from } => match state.vm(vm) {
                    None => Some((404, api::error_json(&format!("vm {vm:?} was deleted"), "not_found"))),
                    Some(v) if v.migration.is_none() && v.host.is_some_and(|h| h != *from) => Some((
                        200,
                        serde_json::json!({"vm": vm, "from": from, "host": v.host, "token": v.token, "served_by": me}).to_string(),
                    )),
                    Some(v) if v.migration.is_none() => Some((
                        409,
                        api::error_json(&format!("the migration of vm {vm:?} was called off ({})", if v.waiting.is_empty() { "no other host has room" } else { v.waiting.as_str() }), "conflict"),
                    )),
                    Some(_) => None,
                },
                WaitFor::Drained { host } => match state.host(*host).map(|h| h.state) {
                    Some(HostState::Drained) => Some((200, serde_json::json!({"host": host, "state": "drained", "served_by": me}).to_string())),
                    Some(HostState::Dead) => Some((409, api::error_json(&format!("host {host} died while draining"), "conflict"))),
                    Some(_) => None,
                    None => Some((404, api::error_json(&format!("no host {host}"), "not_found"))),
                },
            };
            let done = done.or_else(|| {
                (now >= w.deadline).then(|| match &w.what {
                    WaitFor::Migrated { vm, .. } => (202, serde_json::json!({"vm": vm, "in_progress": true, "served_by": me}).to_string()),
                    WaitFor::Drained { host } => (202, serde_json::json!({"host": host, "in_progress": true, "served_by": me}).to_string()),
                    WaitFor::Snapshot { vm, .. } => (504, api::error_json(&format!("the snapshot of vm {vm:?} did not commit in time"), "timeout")),
                    WaitFor::Entry { .. } => (504, api::error_json("not committed in time; retry with the same request_id", "timeout")),
                })
            });
            match done {
                Some((status, body)) => {
                    answers.push((w.reply, status, body));
                    false
                }
                None => true,
            }
        });
        for (reply, status, body) in answers {
            self.answer_then_next(reply, status, &body, now)?;
        }
        Ok(())
    }
}

/// Whether a renewal reconcile asked for is sent (see `vms_act`): always, unless the VM
/// migrates and its VMM was paused for it, does not run, or its final snapshot is
/// committed.
fn renew_allowed(
    migration: Option<crate::cluster::state::Migration>,
    paused_for_migration: bool,
    state: VmmState,
) -> bool {
    match migration {
        None => true,
        Some(m) => !m.ready && !paused_for_migration && state == VmmState::Running,
    }
}

fn token_exit(slot: u64) -> u64 {
    token(TOKEN_VMM_EXIT, slot, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::sweep::superseded;
    use std::path::Path;

    #[test]
    fn a_migrating_vmm_is_not_renewed_once_paused_or_final() {
        use crate::cluster::state::Migration;
        let m = |ready| {
            Some(Migration {
                target: None,
                requested_index: 3,
                ready,
            })
        };
        assert!(
            renew_allowed(None, false, VmmState::Fenced),
            "not migrating"
        );
        assert!(renew_allowed(m(false), false, VmmState::Running));
        assert!(
            !renew_allowed(m(false), true, VmmState::Running),
            "pause sent"
        );
        assert!(
            !renew_allowed(m(false), false, VmmState::Fenced),
            "would resume it"
        );
        assert!(!renew_allowed(m(false), false, VmmState::Paused));
        assert!(
            !renew_allowed(m(true), false, VmmState::Running),
            "final snapshot committed"
        );
    }

    #[test]
    fn rejections_map_to_clear_statuses() {
        assert_eq!(status_for(RejectCode::UnknownVm).0, 404);
        assert_eq!(status_for(RejectCode::VmExists), (409, "exists"));
        assert_eq!(status_for(RejectCode::NoCapacity).0, 409);
        assert_eq!(status_for(RejectCode::Invalid).0, 400);
    }

    #[test]
    fn tokens_do_not_collide_with_the_nodes_own() {
        for kind in [TOKEN_VMM_RECV, TOKEN_VMM_EXIT, TOKEN_VMM_SEND] {
            assert!(kind > 6 && kind < 256);
            let t = token(kind, 5, 9);
            assert_eq!(t >> 56, kind);
            let id = t & ((1 << 56) - 1);
            assert_eq!((id >> 16, id & 0xffff), (5, 9));
        }
    }

    #[test]
    fn vms_pages_stop_at_the_limit_or_the_byte_budget_with_a_cursor() {
        let ids: Vec<String> = (0..10).map(|i| format!("vm{i}")).collect();
        let all = || {
            ids.iter()
                .map(|id| (id.as_str(), serde_json::json!({ "id": id })))
        };
        let (page, next) = vms_page(all(), 4, usize::MAX);
        assert_eq!(page.len(), 4);
        assert_eq!(next.as_deref(), Some("vm3"));
        let (page, next) = vms_page(all(), 10, usize::MAX);
        assert_eq!((page.len(), next), (10, None));
        // Each object is 13 bytes + 1: a 30-byte budget holds two.
        let (page, next) = vms_page(all(), 10, 30);
        assert_eq!(page.len(), 2);
        assert_eq!(next.as_deref(), Some("vm1"));
        let (page, next) = vms_page(std::iter::empty(), 10, 30);
        assert!(page.is_empty() && next.is_none());
    }

    #[test]
    fn finds_the_highest_sequence_written_under_a_token() {
        let dir = std::env::temp_dir().join(format!("vigil-vms-seq-{}", std::process::id()));
        for d in ["7-1", "7-3", "8-9", "7-x"] {
            std::fs::create_dir_all(dir.join("vms/a").join(d)).unwrap();
        }
        let config = Config::parse(
            &format!(
                "node_id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"{0}/data\"\nshared_dir = \"{0}\"\ncontrol_socket = \"{0}/s\"\nkey_file = \"{0}/k\"\n[[peers]]\nid = 1\naddress = \"127.0.0.1:7001\"\n",
                dir.display()
            ),
            Path::new("t.toml"),
        )
        .unwrap();
        let vms = Vms::new(&config, Instant::now());
        assert_eq!(vms.highest_seq("a", 7), 3);
        assert_eq!(vms.highest_seq("a", 8), 9);
        assert_eq!(vms.highest_seq("a", 9), 0);
        assert_eq!(vms.highest_seq("b", 7), 0);
        let mut old = superseded(&dir.join("vms/a"), (7, 3)).unwrap();
        old.sort();
        assert_eq!(
            old,
            vec!["7-1".to_string()],
            "older than the head only; 7-x is not ours"
        );
        let mut old = superseded(&dir.join("vms/a"), (8, 9)).unwrap();
        old.sort();
        assert_eq!(old, vec!["7-1".to_string(), "7-3".to_string()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
