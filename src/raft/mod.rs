//! A hand-written Raft: the pure state machine (`core`), its in-memory log (`log`), the
//! leader's per-follower replication state (`progress`), plain message and entry types
//! (`types`), a seeded generator (`rng`), and the driver (`driver`) that orders persist
//! / sync / send / apply for any event loop (the simulator's and the agent's).
//!
//! The core does no I/O, reads no clock, spawns nothing; time (monotonic nanoseconds)
//! and a seed are inputs. One loop turn of a node looks like this:
//!
//! ```text
//! for each input:            raft.step(now, &msg, payload) | raft.tick(now)
//!                            | raft.propose(now, data) | raft.read_index(now, id)
//!                            | raft.change_membership(now, change)
//!                            | raft.transfer_leadership(now, target)
//!     driver.collect(..)     write snapshot / entries / hard state (not yet synced),
//!                            send messages that promise nothing, queue votes and acks
//! driver.finish_turn(..)     ONE sync; raft.persisted(..); send the queued messages;
//!                            apply committed entries; answer reads whose index is applied
//!                            (or split: driver.end_turn(..) starts the sync and applies,
//!                            driver.complete_sync(..) when the flushes are done)
//! occasionally:              raft.compact(applied, state_machine_bytes)
//! ```
//!
//! Features: elections with randomised timeouts, PreVote, CheckQuorum, leader
//! stickiness (bypassed by TimeoutNow), a no-op per term, the current-term commit rule,
//! pipelined and batched replication with per-follower bounds on appends and bytes in
//! flight, conflict backtracking by term, leadership transfer, observers (non-voting
//! members), single-server membership changes (effective when appended, one at a time),
//! snapshots with chunked InstallSnapshot, ReadIndex, and lease information: the
//! leader's lease (`quorum_contact`), acknowledgement times (`peer_last_ack`), and the
//! anchor of a follower host's lease (`host_lease_anchor`: rounds confirmed per
//! follower process, by `Config::incarnation`).
//!
//! Steady state does not allocate: the log is a preallocated ring whose payload buffers
//! are recycled, outputs reuse their buffers, per-peer state has fixed capacity
//! (`tests/raft_alloc.rs` counts allocations over 10,000 commits).
//!
//! Rules for the code around it: node ids are never reused for a node that lost its
//! disk; a node whose log is corrupt before its tail must not start (it may have
//! acknowledged entries or given votes it no longer has).

pub mod core;
pub mod driver;
pub mod log;
pub mod progress;
pub mod rng;
pub mod types;

pub use self::core::{Bugs, Config, Outputs, Raft, Recovered};
pub use self::driver::{Driver, LogStorage, SplitSync, StateMachine, Transport};
pub use self::types::*;
