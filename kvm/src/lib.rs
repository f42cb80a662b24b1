//! vigil-kvm: microVMs on KVM for Vigil.
//!
//! Thin, safe wrappers over the KVM ioctls (through kvm-ioctls / kvm-bindings):
//! - `memory`: guest memory, one file-backed mapping (memfd, or a snapshot image mapped
//!   MAP_PRIVATE), with a host-side dirty bitmap;
//! - `guest`: the built-in x86-64 guest (page tables, GDT, ring-3 work loop);
//! - `vcpu`: one thread per vCPU, pause/resume with signal + immediate_exit;
//! - `vm`: VM creation (irqchip, PIT, memory slot), x86-64 setup, and every
//!   save/restore pair of vCPU and VM state, in the documented order;
//! - `state`: the versioned, CRC-checked state file format (pure encode/decode);
//! - `snapshot`: full and diff snapshots on disk, restore of a snapshot chain;
//! - `control`: the framed protocol of the `vigil vmm` control socket, and a client;
//! - `vmm`: the `vigil vmm` process (one per VM): control socket and lease watchdog.

pub mod control;
pub mod guest;
pub mod memory;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod vm;
pub mod vmm;

/// Nanoseconds of CLOCK_MONOTONIC (system-wide, so other processes can compute
/// deadlines on the same clock).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether /dev/kvm can be opened (tests skip when it cannot, and say why).
pub fn kvm_available() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm is not usable: {e}"))
}
