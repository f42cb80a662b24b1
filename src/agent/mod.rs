//! Per-host logic: the host lease, and (with the host-failure work) reconciling
//! committed placements with the VMMs running here.

pub mod lease;
