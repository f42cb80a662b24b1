//! Vigil: a host-failure agent for microVM fleets.
//!
//! See `ARCHITECTURE.md` for the map. Each module has one job:
//! `config` (the agent config file), `limits` (every bound), `logging` (the stderr logger),
//! `io` (the event loop's I/O: io_uring or epoll, clock, timers, signals, children, sockets).

pub mod agent;
pub mod auth;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod control;
pub mod demo;
pub mod fuzzing;
pub mod io;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod node;
pub mod raft;
pub mod sim;
