//! vigil-wal: the memory-mapped, CRC-checked write-ahead log of Raft entries, and the
//! two-slot hard-state file.
//!
//! - [`format`]: the on-disk layout (one place, versioned) and the pure segment scanner.
//! - [`Wal`]: append, group-commit sync (blocking, or split for io_uring), zero-copy
//!   reads, truncate suffix, compact prefix, crash recovery on open.
//! - [`HardStateFile`]: term, vote and commit index in two alternating CRC-checked slots.
//!
//! Durability rules: segments are preallocated before they are mapped (a write into a
//! sparse mapping on a full disk is a SIGBUS, not an error), and any flush error aborts
//! the process (a retried fsync may report success for data the kernel dropped).
//!
//! The crate takes its sizes through [`WalOptions`]; it does not know the agent's limits.

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
