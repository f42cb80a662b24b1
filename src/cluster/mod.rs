//! The replicated state machine: what every node applies from the committed log
//! (`state`: hosts, VMs, placements, fencing tokens, snapshots, and the metadata KV),
//! and the leader's pure decisions about it (`placement`, `drain`).

pub mod command;
pub mod dedup;
pub mod kv;
pub mod placement;
pub mod state;

#[cfg(test)]
mod random_tests;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;
