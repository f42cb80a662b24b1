//! vigil-wal: the memory-mapped, CRC-checked write-ahead log of Raft entries, and the
//! two-slot hard-state file.
//!
//! - [`format`](mod@format): the on-disk layout (one place, versioned) and the pure segment scanner.
//! - [`Wal`]: append, group-commit sync (blocking, or split for io_uring), zero-copy
//!   reads, truncate suffix, compact prefix, crash recovery on open.
//! - [`HardStateFile`]: term, vote and commit index in two alternating CRC-checked slots.
//!
//! Durability rules: segments are preallocated with fallocate before they are mapped or
//! written (disk full shows up as an error when a segment is created, never later as a
//! SIGBUS or a failed write), and any flush error aborts the process (a retried fsync may
//! report success for data the kernel dropped); so does a failed write into preallocated
//! space, for the same reason.
//!
//! Writes and reads: a batch is written with one pwritev (record headers plus the
//! caller's payload slices, no extra copy) into the page cache; segments are mapped
//! read-only (memmap2), so reads return slices of the map without copying, and see the
//! written bytes at once. One fdatasync per touched segment makes a batch durable.
//!
//! The crate takes its sizes through [`WalOptions`]; it does not know the agent's limits.
//!
//! # Use from the event loop (group commit, fsync on io_uring)
//!
//! ```text
//! each loop turn:
//!     wal.truncate_suffix(i) / wal.append(&batch) / wal.compact(i)   (any number: memory only)
//!     hard_state.write_unsynced(hs)                                  (if it changed)
//!     if no sync in flight:
//!         token = wal.begin_sync()                 // captures everything written so far
//!         for t in wal.sync_targets():             // normally one segment, two at a rollover
//!             submit IORING_OP_FSYNC(t.fd, IORING_FSYNC_DATASYNC)
//!         submit IORING_OP_FSYNC(hard_state fd, DATASYNC)
//! on completion of all of them:
//!     any error  -> wal.sync_failed(err)           // logs and aborts; never retry a flush
//!     else       -> wal.complete_sync(token); now wal.synced_index() is durable:
//!                   send the votes/acks that promised it
//! ```
//!
//! The blocking `Wal::sync` does the same with fdatasync(2) and is what tests and tools
//! use. Segment rollover (creating and syncing the next file) is still a blocking step
//! inside `append`, once per segment (64 MiB); moving it off the loop (pre-creating the
//! next segment) is future work.
//!
//! # Memory
//!
//! Per live entry one u32 offset, nothing else; per segment one mapping (virtual memory
//! of the segment's size) and one file descriptor. See `segment.rs` for the bound.

pub mod error;
pub mod format;
pub mod hard_state;
mod segment;
mod sys;
mod wal;

pub use error::{Error, Result};
pub use hard_state::{HardState, HardStateFile};
pub use sys::fatal_sync_error;
pub use wal::{EntryRef, RecoveryReport, SyncTarget, SyncToken, TornTail, Wal, WalOptions};
