//! Vigil: a host-failure agent for microVM fleets.
//!
//! See `ARCHITECTURE.md` for the map. Each module has one job:
//! `limits` (every bound), `logging` (the stderr logger).

pub mod limits;
pub mod logging;
pub mod raft;
pub mod sim;
