//! Per-host logic: the host lease (`lease`), the leader's failure detection
//! (`failure`) and duties (`leader`: verdicts and placement each tick), and reconciling
//! committed placements with the VMMs running here (`reconcile`). All pure: the event
//! loop feeds in clock readings and what it found.

pub mod failure;
pub mod leader;
pub mod lease;
pub mod reconcile;
