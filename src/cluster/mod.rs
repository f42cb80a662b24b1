//! The replicated state machine: what every node applies from the committed log.
//! Today the metadata KV; hosts, VMs, placements and fencing tokens join it with the
//! host-failure work.

pub mod command;
pub mod kv;
