//! The deterministic simulator: real Raft nodes (core + driver) over a simulated
//! network, disks and clocks, driven by one seed, with safety, linearizability and
//! liveness checks. `vigil sim` runs it (see `cli`). `vigil sim --vms` makes every node
//! a host with fake VMMs under the real cluster/agent code (see `world::hosts`).

pub mod check;
pub mod cli;
pub mod disk;
pub mod kv;
pub mod linearizability;
pub mod world;

pub use world::{RunReport, SimConfig, VmBugs, World};

/// Runs one seed with the given configuration.
pub fn run(cfg: SimConfig) -> RunReport {
    World::new(cfg).run()
}
