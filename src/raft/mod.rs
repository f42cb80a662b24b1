//! A hand-written Raft: pure state machine (`core`), its log (`log`), per-follower
//! replication state (`progress`), message and entry types (`types`), and the
//! driver (`driver`) that orders persist / sync / send / apply for any event loop.
//!
//! The core does no I/O, reads no clock, spawns nothing; time and a seed are inputs.

pub mod core;
pub mod driver;
pub mod log;
pub mod progress;
pub mod rng;
pub mod types;

pub use self::core::{Bugs, Config, Outputs, Raft, Recovered};
pub use self::driver::{Driver, LogStorage, StateMachine, Transport};
pub use self::types::*;
