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
/// Entries carried by one AppendEntries message.
pub const MAX_ENTRIES_PER_APPEND: usize = 256;
/// Payload bytes carried by one AppendEntries message.
pub const MAX_APPEND_BYTES: usize = 1024 * 1024;
/// AppendEntries messages in flight (sent, not acknowledged) to one follower.
pub const MAX_INFLIGHT_APPENDS: usize = 64;
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
/// One chunk of an InstallSnapshot transfer.
pub const SNAPSHOT_CHUNK_BYTES: usize = 512 * 1024;

// ---- Write-ahead log -----------------------------------------------------------------

/// Size of one WAL segment file (preallocated with fallocate, then mapped).
pub const WAL_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes reserved in each segment for its header.
pub const WAL_SEGMENT_HEADER_BYTES: u64 = 4096;
/// Bytes of framing around each record (header with its CRC, payload CRC).
pub const WAL_RECORD_OVERHEAD_BYTES: u64 = 64;

// ---- Peer transport ------------------------------------------------------------------

/// Largest frame on the peer wire, header included.
pub const MAX_FRAME_BYTES: usize = MAX_APPEND_BYTES + 64 * 1024;
/// Bytes queued for sending to one peer before the connection is dropped and redialled.
pub const PEER_SEND_QUEUE_BYTES: usize = MAX_INFLIGHT_BYTES + 2 * MAX_FRAME_BYTES;

// ---- Control API ---------------------------------------------------------------------

/// Control connections open at once; further ones are refused.
pub const MAX_CONTROL_CONNECTIONS: usize = 128;
/// Request line and headers of one control request.
pub const MAX_CONTROL_HEADER_BYTES: usize = 16 * 1024;
/// Body of one control request.
pub const MAX_CONTROL_BODY_BYTES: usize = MAX_KV_VALUE_BYTES * 2 + 4096;
/// Subscribers of `GET /events`.
pub const MAX_EVENT_SUBSCRIBERS: usize = 32;
/// Event lines buffered per subscriber before a slow one is disconnected.
pub const MAX_EVENTS_BUFFERED: usize = 1024;

// ---- VMs -----------------------------------------------------------------------------

/// VMs in the cluster.
pub const MAX_VMS: usize = 4096;
/// Smallest guest memory.
pub const MIN_GUEST_MEMORY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest guest memory.
pub const MAX_GUEST_MEMORY_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// vCPUs of one guest.
pub const MAX_VCPUS: usize = 32;

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
const _: () = assert!(MAX_CONTROL_BODY_BYTES >= MAX_KV_VALUE_BYTES);
const _: () = assert!(MIN_GUEST_MEMORY_BYTES <= MAX_GUEST_MEMORY_BYTES);
