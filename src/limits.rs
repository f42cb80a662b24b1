//! Every capacity and size bound of Vigil, in one place.
//!
//! Memory is bounded by configuration: each queue and buffer names its limit here, and
//! the compile-time assertions at the bottom check how the limits relate, so that a
//! change to one that breaks another fails the build instead of a running cluster.

// ---- Cluster shape -------------------------------------------------------------------

/// Raft voters. Five tolerates two failures; seven is the most we support.
pub const MAX_VOTERS: usize = 7;
/// Non-voting observers: hosts that run VMs and hold leases but do not vote.
pub const MAX_OBSERVERS: usize = 64;
/// Every member, voter or observer.
pub const MAX_MEMBERS: usize = MAX_VOTERS + MAX_OBSERVERS;

// ---- Raft log entries and replication ------------------------------------------------

/// Largest payload of one log entry (a command, a KV value with its key and framing).
pub const MAX_ENTRY_BYTES: usize = 96 * 1024;
/// Largest value stored in the metadata KV.
pub const MAX_KV_VALUE_BYTES: usize = 64 * 1024;
/// Largest key in the metadata KV.
pub const MAX_KV_KEY_BYTES: usize = 512;
/// Keys in the metadata KV.
pub const MAX_KV_KEYS: usize = 16 * 1024;
/// Key and value bytes held by the metadata KV.
pub const MAX_KV_TOTAL_BYTES: usize = 64 * 1024 * 1024;
/// Recent request ids (with their outcomes) remembered to answer retries.
pub const MAX_DEDUP_REQUESTS: usize = 4096;
/// Entries carried by one AppendEntries message.
pub const MAX_ENTRIES_PER_APPEND: usize = 256;
/// Payload bytes carried by one AppendEntries message.
pub const MAX_APPEND_BYTES: usize = 1024 * 1024;
/// AppendEntries messages in flight (sent, not acknowledged) to one follower: the most
/// any Raft configuration may ask for (the size of the window's ring).
pub const MAX_INFLIGHT_APPENDS: usize = 64;
/// The window the agent uses: double buffering, one batch being made durable on the
/// follower and the next one waiting; everything proposed meanwhile rides in the append
/// after that. A deeper window sends one small append per leader turn, which costs each
/// follower a wakeup and a flush per message: `cargo bench --bench commit` pipelined
/// throughput was about 10 % higher with 2 than with 64 (47.0 k/s mean of 5 runs against
/// 42.6 k/s mean of 10, quiet 2-core machine), sequential latency unchanged.
pub const AGENT_INFLIGHT_APPENDS: usize = 2;
/// Payload bytes in flight to one follower.
pub const MAX_INFLIGHT_BYTES: usize = 8 * 1024 * 1024;
/// Client proposals waiting for the leader to append them.
pub const MAX_PENDING_PROPOSALS: usize = 4096;
/// Linearizable reads waiting for their ReadIndex round.
pub const MAX_PENDING_READS: usize = 4096;
/// Raft log entries held in memory after the last snapshot; the leader refuses
/// proposals when full, until the state machine takes a snapshot and the log is compacted.
pub const RAFT_LOG_CAPACITY: usize = 16 * 1024;
/// Messages one call into the Raft core may emit before its output buffer grows
/// (a broadcast to every member, a few pipelined appends each).
pub const RAFT_OUTPUT_MESSAGES: usize = MAX_MEMBERS * 4;
/// Heartbeat rounds whose start times the leader remembers for its lease.
pub const RAFT_LEASE_ROUNDS: usize = 64;
/// Confirmed host lease anchors a follower keeps: the newest one whose required index
/// it has applied is its lease (one per heartbeat round; applying lags a round or two).
pub const RAFT_LEASE_ANCHORS: usize = 8;
/// One chunk of an InstallSnapshot transfer.
pub const SNAPSHOT_CHUNK_BYTES: usize = 512 * 1024;

// ---- Write-ahead log -----------------------------------------------------------------

/// Size of one WAL segment file (preallocated with fallocate, then mapped).
pub const WAL_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes reserved in each segment for its header.
pub const WAL_SEGMENT_HEADER_BYTES: u64 = 4096;
/// Bytes of framing around each record (header with its CRC, payload CRC).
pub const WAL_RECORD_OVERHEAD_BYTES: u64 = 64;

/// The WAL's sizes, as the vigil-wal crate takes them.
pub const WAL_OPTIONS: vigil_wal::WalOptions = vigil_wal::WalOptions {
    segment_bytes: WAL_SEGMENT_BYTES,
    segment_header_bytes: WAL_SEGMENT_HEADER_BYTES,
    max_entry_bytes: MAX_ENTRY_BYTES as u32,
    first_index: 1,
};

// ---- Peer transport ------------------------------------------------------------------

/// Largest frame on the peer wire, header included.
pub const MAX_FRAME_BYTES: usize = MAX_APPEND_BYTES + 64 * 1024;
/// Bytes queued for sending to one peer before the connection is dropped and redialled.
pub const PEER_SEND_QUEUE_BYTES: usize = MAX_INFLIGHT_BYTES + 2 * MAX_FRAME_BYTES;
/// A frame on an authenticated connection: the frame and its MAC tag.
pub const MAX_SEALED_FRAME_BYTES: usize = MAX_FRAME_BYTES + crate::auth::TAG_BYTES;
/// Accepted peer connections still in their handshake (not yet authenticated), in each
/// of two pools: from members' IP addresses, and from anywhere else. Further ones are
/// closed at once, so strangers cannot hold more than this many slots, and strangers on
/// other hosts cannot take the members' slots.
pub const MAX_PENDING_HANDSHAKES: usize = 32;
/// A peer connection must finish its handshake this long after the dial or the accept
/// (the TCP connect included), or it is closed: an honest peer needs 1.5 round trips.
pub const PEER_HANDSHAKE_TIMEOUT_MS: u64 = 2_000;
/// First and largest delay between redials of a lost peer connection (plus jitter).
pub const PEER_RECONNECT_INITIAL_MS: u64 = 5;
pub const PEER_RECONNECT_MAX_MS: u64 = 1000;
/// Accepts kept in flight on the peer listener (each resubmitted when it completes).
pub const PEER_ACCEPTS_IN_FLIGHT: usize = 4;
/// An accept that failed for lack of descriptors or memory waits this long before it is
/// resubmitted (the pending connection stays in the backlog: retrying at once would spin).
pub const PEER_ACCEPT_RETRY_MS: u64 = 10;
/// How long a starting agent retries binding its peer port while the previous process's
/// closing connections still hold it.
pub const LISTEN_RETRY_MS: u64 = 10_000;
/// Control requests forwarded to the leader and not yet answered, per node.
pub const MAX_FORWARDED_REQUESTS: usize = MAX_CONTROL_CONNECTIONS;
/// Forwarded requests waiting on the leader from all followers.
pub const MAX_FORWARDED_FROM_PEERS: usize = MAX_CONTROL_CONNECTIONS * (MAX_MEMBERS - 1);

const _: () = assert!(PEER_RECONNECT_INITIAL_MS <= PEER_RECONNECT_MAX_MS);

// ---- Control API ---------------------------------------------------------------------

/// Control connections at once; when full, the idlest is closed to make room, or a new
/// one is refused. Closing connections count: one keeps its slot (and its I/O buffers)
/// until its cancelled operations have completed.
pub const MAX_CONTROL_CONNECTIONS: usize = 128;
/// Accept operations kept in flight on the control socket.
pub const CONTROL_ACCEPTS_IN_FLIGHT: usize = 4;
/// Request line and headers of one control request.
pub const MAX_CONTROL_HEADER_BYTES: usize = 16 * 1024;
/// Body of one control request.
pub const MAX_CONTROL_BODY_BYTES: usize = MAX_KV_VALUE_BYTES * 2 + 4096;
/// Subscribers of `GET /events`.
pub const MAX_EVENT_SUBSCRIBERS: usize = 32;
/// Event lines buffered per subscriber before a slow one is disconnected.
pub const MAX_EVENTS_BUFFERED: usize = 1024;
/// A control connection silent this long (no complete request) is closed.
pub const CONTROL_IDLE_TIMEOUT_MS: u64 = 30_000;
/// A request must arrive whole (head and body) this long after its first byte, or the
/// connection is answered 408 and closed: a slowloris client trickling bytes cannot hold
/// a connection slot past this.
pub const CONTROL_READ_TIMEOUT_MS: u64 = 10_000;
/// A request waiting for commit, a read or the leader is answered with a timeout error
/// after this long.
pub const CONTROL_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Bytes of responses queued on one control connection (an `/events` stream included)
/// before a slow reader is cut off.
pub const MAX_CONTROL_OUTPUT_BYTES: usize = 1024 * 1024;
/// A loop turn (or the in-loop part of a Raft snapshot: serialize, write) longer than
/// this is logged as a warning: heartbeats wait while it runs (the election timeout is
/// 100 ms by default).
pub const SLOW_TURN_MS: u64 = 50;
/// Committed entries kept in the in-memory log before a snapshot compacts them.
pub const RAFT_COMPACT_AFTER_ENTRIES: u64 = 4096;
/// A leader holds a compaction back while it would drop entries a follower has not been
/// sent yet (that follower would need the whole snapshot), at most until the log holds
/// this many committed entries.
pub const RAFT_COMPACT_DEFER_MAX_ENTRIES: u64 = 2 * RAFT_COMPACT_AFTER_ENTRIES;

const _: () = assert!(RAFT_COMPACT_AFTER_ENTRIES * 2 < RAFT_LOG_CAPACITY as u64);
// Deferring leaves room for the proposals waiting to be appended.
const _: () = assert!(RAFT_COMPACT_AFTER_ENTRIES <= RAFT_COMPACT_DEFER_MAX_ENTRIES);
const _: () = assert!(
    RAFT_COMPACT_DEFER_MAX_ENTRIES + MAX_PENDING_PROPOSALS as u64 <= RAFT_LOG_CAPACITY as u64
);
const _: () = assert!(CONTROL_REQUEST_TIMEOUT_MS < CONTROL_IDLE_TIMEOUT_MS);
const _: () = assert!(CONTROL_READ_TIMEOUT_MS < CONTROL_IDLE_TIMEOUT_MS);
const _: () = assert!(
    PEER_HANDSHAKE_TIMEOUT_MS >= 10 * PEER_RECONNECT_INITIAL_MS,
    "a handshake gets many round trips on a slow link before it is cut"
);

// ---- Event loop I/O -------------------------------------------------------------------

/// Submission queue entries of the io_uring (a power of two). The kernel sizes the
/// completion queue at twice this, which leaves room for one cancel per operation.
pub const IO_RING_ENTRIES: u32 = 2048;
/// Operations in flight at once (submitted, completion not yet handed to the loop).
pub const IO_MAX_IN_FLIGHT: usize = 1536;
/// Buffers in the I/O layer's slab (each is lent to at most one operation at a time).
/// The slab is allocated up front but its pages are touched only when a buffer is used
/// (and only as far as it is written), so an idle agent does not pay for the worst case.
pub const IO_BUFFER_COUNT: usize = 1088;
/// Bytes of one slab buffer. A larger frame is sent and received in several operations.
pub const IO_BUFFER_BYTES: usize = 64 * 1024;
/// Completions the loop takes out of one `wait` call (its preallocated array).
pub const IO_COMPLETIONS_PER_WAIT: usize = 256;

// ---- `vigil demo`, the VM tests and the resurrect benchmark ---------------------------

/// A VMM's report file is read whole; at 100 lines/s per vCPU and about 40 bytes a line
/// this is hours of reports.
pub const MAX_REPORT_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Hosts `vigil demo` starts at most (all voters).
pub const MAX_DEMO_HOSTS: usize = MAX_VOTERS;
/// VMs `vigil demo` creates at most.
pub const MAX_DEMO_VMS: usize = 8;
/// Events kept from the agents' `/events` streams for one timeline; older ones are
/// dropped first (a timeline needs the few after the kill).
pub const MAX_DEMO_EVENTS: usize = 4096;

// ---- VMs -----------------------------------------------------------------------------

/// VMs in the cluster.
pub const MAX_VMS: usize = 4096;
/// VMs in one `GET /vms` answer (`?limit=` may ask for fewer); the answer also stops
/// early, with a `next` cursor, before it would pass `MAX_CONTROL_OUTPUT_BYTES`.
pub const MAX_VMS_PAGE: usize = 256;
/// Smallest guest memory.
pub const MIN_GUEST_MEMORY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest guest memory.
pub const MAX_GUEST_MEMORY_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// vCPUs of one guest.
pub const MAX_VCPUS: usize = 32;
/// Hosts known to the cluster state (every member can run VMs).
pub const MAX_HOSTS: usize = MAX_MEMBERS;
/// Longest VM id (it names a directory on shared storage: `vms/<vm-id>/`).
pub const MAX_VM_ID_BYTES: usize = 64;
/// Longest anti-affinity group name.
pub const MAX_GROUP_BYTES: usize = 64;
/// Longest reason carried by a command or kept with a rejected outcome.
pub const MAX_REASON_BYTES: usize = 256;
/// Snapshots in one restore chain (one full, then diffs); a longer chain needs a full one.
pub const MAX_SNAPSHOT_CHAIN: usize = 16;
/// Longest snapshot path relative to the shared dir: `vms/<vm-id>/<token>-<seq>`.
pub const MAX_SNAPSHOT_PATH_BYTES: usize = 4 + MAX_VM_ID_BYTES + 1 + 20 + 1 + 20;
/// Inter-arrival samples of heartbeat acknowledgements kept per host (phi accrual).
pub const PHI_WINDOW: usize = 64;
/// Largest frame on a `vigil vmm` control socket, header included (requests are small:
/// the largest is a snapshot request carrying a path).
pub const MAX_VMM_CONTROL_FRAME_BYTES: usize = 8 * 1024;
/// Control connections one VMM accepts at once (the agent, plus people debugging).
pub const MAX_VMM_CONTROL_CONNECTIONS: usize = 8;

/// Memory a host may offer in its `[vms]` section.
pub const MAX_HOST_MEMORY_BYTES: u64 = 16 * 1024 * 1024 * 1024 * 1024;
/// vCPUs a host may offer in its `[vms]` section.
pub const MAX_HOST_VCPUS: u32 = 4096;
/// `vigil vmm` processes one agent looks after at once (started, adopted or stopping);
/// each has at most one control request in flight, so this also bounds those. It also
/// bounds the agent's VMM control connections, closing ones (waiting for their cancelled
/// operations) included: each holds two slab buffers for its life.
pub const MAX_LOCAL_VMMS: usize = 256;
/// `vigil sweep-snapshots` children (snapshot directory removal off the event loop) one
/// agent runs at once.
pub const MAX_SNAPSHOT_SWEEPERS: usize = 2;
/// Snapshot sweeps waiting for a sweeper: one per local VM (superseded snapshots) plus
/// as many deleted VMs.
pub const MAX_PENDING_SWEEPS: usize = 2 * MAX_LOCAL_VMMS;
/// A file-system call the agent's loop still makes itself (the VMM's local run
/// directory, one listing of a VM's snapshot directory at VMM start) is logged as a
/// warning when it takes longer than this.
pub const SLOW_FS_WARN_MS: u64 = 20;
/// Requests queued for one VMM behind the one in flight.
pub const MAX_VMM_QUEUED_REQUESTS: usize = 8;
/// A VMM that does not answer a control request within this long is reported and
/// killed (a hung VMM never holds the agent's loop).
pub const VMM_REQUEST_TIMEOUT_MS: u64 = 2_000;
/// The same for a snapshot request (it writes guest memory to shared storage).
pub const VMM_SNAPSHOT_TIMEOUT_MS: u64 = 60_000;
/// A started VMM whose control socket does not accept a connection within this long is
/// killed (and started again by reconcile).
pub const VMM_START_TIMEOUT_MS: u64 = 30_000;
/// A written snapshot whose record did not commit within this long is given up (the
/// next scheduled snapshot is a full one).
pub const SNAPSHOT_COMMIT_TIMEOUT_MS: u64 = 5_000;
/// Internal proposals (this host's registration, snapshot records) a follower has
/// forwarded to the leader and not yet seen answered.
pub const MAX_INTERNAL_FORWARDS: usize = MAX_LOCAL_VMMS + 1;
/// VM API requests (create, snapshot, migrate, drain...) waiting for their outcome.
pub const MAX_VM_WAITERS: usize = MAX_CONTROL_CONNECTIONS * MAX_MEMBERS;
/// A VM request still waiting after this long is answered 202 (in progress); below the
/// control timeout so the answer beats the generic 504.
pub const VM_WAIT_MS: u64 = CONTROL_REQUEST_TIMEOUT_MS - 1_000;

// ---- How the limits relate -----------------------------------------------------------

const _: () = assert!(
    MAX_VOTERS >= 3 && MAX_VOTERS % 2 == 1,
    "voters: odd, at least 3"
);
const _: () = assert!(MAX_OBSERVERS >= 64, "at least 64 observers are promised");
const _: () = assert!(MAX_KV_VALUE_BYTES + MAX_KV_KEY_BYTES + 1024 <= MAX_ENTRY_BYTES);
const _: () = assert!(
    MAX_ENTRY_BYTES <= MAX_APPEND_BYTES,
    "one entry fits one append"
);
const _: () = assert!(MAX_APPEND_BYTES <= MAX_INFLIGHT_BYTES);
const _: () =
    assert!(AGENT_INFLIGHT_APPENDS >= 1 && AGENT_INFLIGHT_APPENDS <= MAX_INFLIGHT_APPENDS);
const _: () = assert!(
    4 * MAX_ENTRIES_PER_APPEND <= RAFT_LOG_CAPACITY,
    "the in-memory log holds several full appends"
);
const _: () = assert!(SNAPSHOT_CHUNK_BYTES + 4096 <= MAX_FRAME_BYTES);
const _: () = assert!(
    MAX_APPEND_BYTES + 4096 <= MAX_FRAME_BYTES,
    "an append fits a frame"
);
const _: () = assert!(PEER_SEND_QUEUE_BYTES >= MAX_INFLIGHT_BYTES + MAX_FRAME_BYTES);
const _: () = assert!(
    (MAX_ENTRY_BYTES as u64) + WAL_RECORD_OVERHEAD_BYTES
        <= WAL_SEGMENT_BYTES - WAL_SEGMENT_HEADER_BYTES,
    "a record of the largest entry fits one segment"
);
const _: () = assert!(WAL_SEGMENT_BYTES % 4096 == 0 && WAL_SEGMENT_HEADER_BYTES % 4096 == 0);
const _: () = assert!(
    vigil_wal::format::MAX_RECORD_OVERHEAD as u64 <= WAL_RECORD_OVERHEAD_BYTES,
    "the WAL format's framing fits the stated overhead"
);
const _: () = assert!(
    vigil_wal::format::SEGMENT_HEADER_LEN as u64 <= WAL_SEGMENT_HEADER_BYTES,
    "the segment header fits its reserved area"
);
const _: () = assert!(
    WAL_SEGMENT_BYTES >= vigil_wal::format::MIN_SEGMENT_BYTES
        && WAL_SEGMENT_BYTES <= vigil_wal::format::MAX_SEGMENT_BYTES,
    "segment size within what the format can address"
);
const _: () = assert!(
    (MAX_ENTRY_BYTES as u64)
        + WAL_RECORD_OVERHEAD_BYTES
        + vigil_wal::format::RECORD_HEADER_LEN as u64
        <= WAL_SEGMENT_BYTES - WAL_SEGMENT_HEADER_BYTES,
    "the largest record plus the seal record fit one segment (WalOptions::validate)"
);
const _: () = assert!(MAX_ENTRY_BYTES <= u32::MAX as usize);
const _: () = assert!(MAX_CONTROL_BODY_BYTES >= MAX_KV_VALUE_BYTES);
const _: () = assert!(MAX_KV_TOTAL_BYTES >= MAX_KV_VALUE_BYTES + MAX_KV_KEY_BYTES);
const _: () = assert!(MIN_GUEST_MEMORY_BYTES <= MAX_GUEST_MEMORY_BYTES);
const _: () = assert!(
    MIN_GUEST_MEMORY_BYTES % (2 * 1024 * 1024) == 0 && MAX_GUEST_MEMORY_BYTES % 4096 == 0,
    "guest memory is whole pages; the built-in guest's layout needs the first 2 MiB"
);
const _: () = assert!(
    MAX_GUEST_MEMORY_BYTES <= vigil_kvm::guest::MAX_GUEST_MEMORY,
    "the guest's identity page tables cover all of guest memory"
);
const _: () = assert!(
    MAX_VCPUS <= vigil_kvm::guest::MAX_GUEST_VCPUS,
    "the guest's layout has a slot, TSS and stack per vCPU"
);
const _: () = assert!(
    MAX_VMM_CONTROL_FRAME_BYTES >= vigil_kvm::control::HEADER_LEN + 1 + 4096 + 1024,
    "a control frame holds a snapshot request with a PATH_MAX path, and an error reply"
);
const _: () = assert!(IO_RING_ENTRIES.is_power_of_two());
const _: () = assert!(
    IO_MAX_IN_FLIGHT <= IO_RING_ENTRIES as usize,
    "every in-flight operation fits the submission queue, and it and its cancel the completion queue"
);
const _: () = assert!(
    IO_BUFFER_COUNT <= IO_MAX_IN_FLIGHT,
    "every buffer can be lent at once"
);
const _: () = assert!(
    IO_BUFFER_COUNT >= 2 * (MAX_MEMBERS + MAX_CONTROL_CONNECTIONS),
    "a receive and a send buffer for every peer and control connection"
);
const _: () = assert!(IO_BUFFER_BYTES <= u32::MAX as usize && IO_BUFFER_BYTES >= 4096);
const _: () = assert!(
    MAX_SEALED_FRAME_BYTES <= u32::MAX as usize,
    "a sealed frame's length fits the frame header's u32"
);
const _: () = assert!(
    crate::auth::handshake::MAX_MESSAGE_BYTES <= IO_BUFFER_BYTES,
    "a whole handshake message fits one receive buffer"
);
const _: () = assert!(
    MAX_PENDING_HANDSHAKES >= 2 * MAX_VOTERS,
    "every voter can redial every other at once after a restart"
);
// A peer connection holds a receive buffer while it lives and a send buffer while bytes
// wait; a pending handshake sends one message (the responder's challenge), so it too may
// hold both. A closed connection gives its buffers back when its cancelled operations
// complete (the next `wait`); a connection refused a buffer is closed, never a panic.
// A VMM control connection (the agent's side) takes a receive and a send buffer when it
// is made and holds both until its close finished, so a renewal to a connected VMM never
// needs a buffer; connections, closing ones included, are at most MAX_LOCAL_VMMS. With
// every class at its worst case at once (peers, pending handshakes, control clients,
// VMMs) a buffer is still left for each: a flood of control clients cannot take the VMM
// connections' buffers, and a connected VMM's two are its own whatever else happens.
const _: () = assert!(
    IO_BUFFER_COUNT
        >= 2 * (MAX_MEMBERS + MAX_CONTROL_CONNECTIONS)
            + 2 * (2 * MAX_PENDING_HANDSHAKES)
            + 2 * MAX_LOCAL_VMMS,
    "a receive and a send buffer for every connection: peers, pending handshakes in both \
     pools, control clients and VMM connections"
);
const _: () = assert!(
    IO_BUFFER_COUNT + PEER_ACCEPTS_IN_FLIGHT + MAX_MEMBERS <= IO_MAX_IN_FLIGHT,
    "every buffer lent at once, the peer accepts and a connect to every member fit in flight"
);
const _: () = assert!(IO_COMPLETIONS_PER_WAIT <= IO_MAX_IN_FLIGHT);
const _: () = assert!(
    IO_MAX_IN_FLIGHT
        >= IO_BUFFER_COUNT
            + PEER_ACCEPTS_IN_FLIGHT
            + MAX_MEMBERS
            + CONTROL_ACCEPTS_IN_FLIGHT
            + MAX_LOCAL_VMMS
            + 64,
    "every buffer lent, the peer and control accepts, a connect to every member, an exit \
     watch (pidfd poll) per VMM, and room for the signal poll, timers and fsyncs"
);
const _: () = assert!(
    MAX_VMM_CONTROL_FRAME_BYTES <= IO_BUFFER_BYTES,
    "a VMM request goes out in one send, a reply comes in one receive (unless cut)"
);
const _: () = assert!(MAX_DEMO_HOSTS <= MAX_VOTERS, "every demo host is a voter");
const _: () = assert!(MAX_DEMO_VMS <= MAX_VMS, "the demo's VMs fit the cluster");
const _: () = assert!(MAX_HOSTS >= MAX_MEMBERS, "every member is a host");
const _: () = assert!(
    MAX_SNAPSHOT_CHAIN >= 2,
    "a chain holds a full snapshot and a diff"
);
const _: () = assert!(
    MAX_SNAPSHOT_PATH_BYTES + 64 <= 4096,
    "a snapshot path fits PATH_MAX under the shared dir's own path"
);
const _: () = assert!(
    4 * MAX_VM_ID_BYTES + MAX_SNAPSHOT_PATH_BYTES + MAX_REASON_BYTES + 1024 <= MAX_ENTRY_BYTES,
    "every cluster command fits one log entry"
);
const _: () = assert!(PHI_WINDOW >= 2, "phi needs a mean and a deviation");
const _: () = assert!(
    MAX_LOCAL_VMMS <= MAX_VMS,
    "a host never looks after more VMMs than the cluster has VMs"
);
const _: () = assert!(
    VM_WAIT_MS > 0 && VM_WAIT_MS < CONTROL_REQUEST_TIMEOUT_MS,
    "a VM request is answered before the control socket's own timeout"
);
const _: () = assert!(
    VMM_REQUEST_TIMEOUT_MS < VMM_SNAPSHOT_TIMEOUT_MS,
    "a snapshot gets longer than a plain request"
);
const _: () = assert!(
    MAX_HOST_MEMORY_BYTES >= MAX_GUEST_MEMORY_BYTES && MAX_HOST_VCPUS as usize >= MAX_VCPUS,
    "a host can offer room for the largest guest"
);

#[cfg(test)]
mod tests {
    #[test]
    fn wal_options_are_accepted_by_the_wal() {
        super::WAL_OPTIONS.validate().unwrap();
    }
}
