//! Per-host logic: the host lease (`lease`), the leader's failure detection
//! (`failure`), and reconciling committed placements with the VMMs running here
//! (`reconcile`), and the leader's duties (`leader`). All pure: the event loop feeds in clock readings and what it found.

pub mod failure;
pub mod leader;
pub mod lease;
pub mod reconcile;
