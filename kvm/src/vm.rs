//! A VM: the KVM VM fd with in-kernel irqchip and PIT, guest memory as slot 0, and its
//! vCPUs (one thread each, see `vcpu`).
//!
//! Each piece of state has one save/restore pair below. Restore order (also the order
//! of `set_vcpu_state` and `set_vm_state`), per vCPU first:
//!   1. CPUID (KVM fixes the vCPU model from it; everything after depends on it)
//!   2. MP state
//!   3. regs, 4. sregs (also sets CR0/CR4/EFER and the APIC base)
//!   5. FPU, then XSAVE (a superset that overrides the FPU part), 6. XCRs
//!   7. debug regs
//!   8. LAPIC (after sregs, which enable the APIC through its base MSR)
//!   9. MSRs (after CPUID, which decides which MSRs exist)
//!  10. vCPU events (pending exceptions/interrupts/NMIs last, on top of the rest)
//!
//! then VM-wide: PIT, KVM clock, irqchip (PIC master, PIC slave, IOAPIC).

use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_mp_state, kvm_msr_entry, kvm_pit_config,
    kvm_userspace_memory_region, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::guest;
use crate::memory::GuestMemory;
use crate::snapshot::RestoreTimings;
use crate::state::{self, VcpuState};
use crate::vcpu::{ReportSink, RunState, VcpuHandle, Want};

/// What a fresh VM looks like.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub memory_bytes: u64,
    pub vcpus: usize,
    /// Share of the touch region (memory above 2 MiB) the guest keeps writing, 0..=100.
    pub touch_percent: u8,
    /// Pages the guest writes per ~10 ms round (0: none).
    pub touch_pages_per_round: u64,
    /// Enable KVM dirty-page logging (needed for diff snapshots).
    pub track_dirty: bool,
}

impl VmConfig {
    pub fn new(memory_bytes: u64, vcpus: usize) -> VmConfig {
        VmConfig {
            memory_bytes,
            vcpus,
            touch_percent: 0,
            touch_pages_per_round: 0,
            track_dirty: true,
        }
    }
}

/// An error with what was being done.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Adds context to KVM and I/O errors.
pub trait Context<T> {
    fn context(self, what: &str) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|e| Error(format!("{what}: {e}")))
    }
}

/// Initial spin count per round, before calibration.
const INITIAL_ITERATIONS: u64 = 2_000_000;
/// Where KVM may put the three-page real-mode TSS it needs on Intel CPUs without
/// "unrestricted guest" (elsewhere, as on AMD, modern Intel and PVM, the call is a
/// no-op). Just below 4 GiB, as QEMU and Firecracker do; on such old CPUs a guest with
/// more than ~4 GiB of RAM would overlap it (RAM is one slot from 0; no memory hole).
const KVM_TSS_ADDRESS: usize = 0xFFFB_D000;

pub struct Vm {
    // Field order is drop order: vCPU threads stop and their fds close first, then the
    // VM fd, then the memory KVM referenced.
    vcpus: Vec<VcpuHandle>,
    vm_fd: VmFd,
    kvm: Kvm,
    memory: Arc<GuestMemory>,
    msr_indices: Vec<u32>,
    track_dirty: bool,
    /// The snapshot this VM's memory matches since its last snapshot or restore (the
    /// parent of the next diff), if dirty tracking has been reset then.
    pub(crate) last_snapshot_id: Option<u64>,
    /// Pages written since the memory was mapped (every dirty bitmap taken, and the
    /// pages a restore copied in): with the backing file's data ranges, the pages a
    /// full snapshot must look at.
    ever_dirty: Vec<u64>,
    /// Pages changed since `last_snapshot_id` that dirty tracking no longer shows,
    /// because a snapshot took them and then failed: the next diff includes them.
    pub(crate) carried_dirty: Vec<u64>,
    /// The snapshot captured and not yet finished (written, or failed), if any.
    pub(crate) in_flight: Option<u64>,
    /// Reused between snapshots for the pages copied aside while paused (its size
    /// stays within the largest `SnapshotOptions::buffer_cap_bytes` used).
    pub(crate) snapshot_buffer: Vec<u8>,
    /// Where the time went, for a VM made by `restore`.
    pub(crate) restore_timings: Option<RestoreTimings>,
    started: bool,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with irqchip, PIT and `memory` as slot 0.
    fn create_base(memory: GuestMemory, track_dirty: bool) -> Result<Vm> {
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let vm_fd = kvm.create_vm().context("KVM_CREATE_VM")?;
        // The state file holds the legacy 4 KiB XSAVE area (KVM_GET_XSAVE). That is all
        // of the guest's XSAVE state unless this process requested dynamic features
        // (AMX) for guests, which it never does; refuse rather than lose state.
        let xsave_size = vm_fd.check_extension_int(kvm_ioctls::Cap::Xsave2);
        if xsave_size > 4096 {
            return Err(Error(format!(
                "guest XSAVE state is {xsave_size} bytes; only 4096 are supported"
            )));
        }
        // The memory slot first, before the irqchip and PIT. Each of those registers
        // I/O bus devices, which waits for an SRCU grace period of the VM; a memory
        // slot installed after them waited another 1-2 scheduler ticks (4-8 ms here,
        // measured), installed first it takes 0.2 ms.
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if track_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: memory.len(),
            userspace_addr: memory.host_address(),
        };
        // SAFETY: the region is our live mapping of exactly `memory.len()` bytes, and it
        // outlives the VM fd (field order in `Vm`).
        unsafe { vm_fd.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .context("KVM_SET_TSS_ADDR")?;
        vm_fd.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).context("KVM_CREATE_PIT2")?;
        let words = memory.pages().div_ceil(64) as usize;
        Ok(Vm {
            vcpus: Vec::new(),
            vm_fd,
            kvm,
            memory: Arc::new(memory),
            msr_indices: Vec::new(),
            track_dirty,
            last_snapshot_id: None,
            ever_dirty: vec![0; words],
            carried_dirty: vec![0; words],
            in_flight: None,
            snapshot_buffer: Vec::new(),
            restore_timings: None,
            started: false,
        })
    }

    /// A fresh VM running the built-in guest (threads start paused; call `resume`).
    pub fn create(config: &VmConfig, sink: Option<ReportSink>) -> Result<Vm> {
        check_shape(config.memory_bytes, config.vcpus)?;
        if config.touch_percent > 100 {
            return Err(Error(format!(
                "touch share {}% is over 100%",
                config.touch_percent
            )));
        }
        let memory = GuestMemory::new_memfd(config.memory_bytes).context("guest memory")?;
        let mut vm = Vm::create_base(memory, config.track_dirty)?;
        vm.load_guest(config);
        for index in 0..config.vcpus {
            let fd = vm.create_vcpu(index)?;
            setup_boot_vcpu(&vm.kvm, &fd, index)?;
            vm.vcpus.push(VcpuHandle::new(index, fd));
        }
        vm.msr_indices = vm.readable_msrs()?;
        vm.start(sink);
        Ok(vm)
    }

    /// A VM with the given memory and saved state (threads start paused).
    pub(crate) fn restore_from(
        memory: GuestMemory,
        copied_in: Vec<u64>,
        saved: &state::VmState,
        track_dirty: bool,
        sink: Option<ReportSink>,
        timings: &mut RestoreTimings,
    ) -> Result<Vm> {
        check_shape(saved.memory_bytes, saved.vcpus.len())?;
        let creating = Instant::now();
        let mut vm = Vm::create_base(memory, track_dirty)?;
        timings.create_vm_ns = elapsed_ns(creating);
        assert_eq!(copied_in.len(), vm.ever_dirty.len());
        vm.ever_dirty = copied_in;
        let loading = Instant::now();
        for (index, vcpu_state) in saved.vcpus.iter().enumerate() {
            let fd = vm.create_vcpu(index)?;
            set_vcpu_state(&fd, vcpu_state).map_err(|e| Error(format!("vCPU {index}: {e}")))?;
            vm.vcpus.push(VcpuHandle::new(index, fd));
        }
        timings.vcpus_ns = elapsed_ns(loading);
        let loading = Instant::now();
        vm.set_vm_state(saved)?;
        timings.vm_state_ns = elapsed_ns(loading);
        // The MSRs the snapshot saved, which KVM has just accepted: no need to probe
        // the index list again (that took ~40 ioctls).
        vm.msr_indices = saved.vcpus[0].msrs.iter().map(|m| m.index).collect();
        vm.last_snapshot_id = Some(saved.snapshot_id);
        let starting = Instant::now();
        vm.start(sink);
        timings.threads_ns = elapsed_ns(starting);
        Ok(vm)
    }

    fn create_vcpu(&self, index: usize) -> Result<VcpuFd> {
        self.vm_fd
            .create_vcpu(index as u64)
            .context(&format!("KVM_CREATE_VCPU {index}"))
    }

    fn start(&mut self, sink: Option<ReportSink>) {
        assert!(!self.started);
        for vcpu in &mut self.vcpus {
            vcpu.spawn(self.memory.clone(), sink.clone());
        }
        self.started = true;
    }

    /// Writes the guest program, its tables and the parameter block into memory.
    fn load_guest(&self, config: &VmConfig) {
        let m = &self.memory;
        for (i, entry) in guest::gdt().iter().enumerate() {
            m.write_u64(guest::GDT_GPA + i as u64 * 8, *entry);
        }
        let gate = guest::gp_gate();
        m.write_u64(guest::IDT_GPA + guest::GP_VECTOR * 16, gate[0]);
        m.write_u64(guest::IDT_GPA + guest::GP_VECTOR * 16 + 8, gate[1]);
        for index in 0..config.vcpus {
            // RSP0 sits at an unaligned offset (4) in the TSS.
            let rsp0 = guest::kernel_stack_top(index).to_le_bytes();
            m.write_bytes(guest::tss_gpa(index) + guest::TSS_RSP0, &rsp0);
            for (i, word) in guest::iret_frame().iter().enumerate() {
                m.write_u64(guest::iret_frame_gpa(index) + i as u64 * 8, *word);
            }
        }
        m.write_bytes(guest::KERNEL_CODE_GPA, &guest::kernel_code());
        m.write_bytes(guest::USER_CODE_GPA, &guest::user_code());
        for (gpa, entry) in guest::page_table_entries(config.memory_bytes) {
            m.write_u64(gpa, entry);
        }
        let region_pages = (config.memory_bytes - guest::TOUCH_REGION_GPA) / guest::PAGE_SIZE;
        let touch_pages = region_pages * u64::from(config.touch_percent) / 100;
        let p = guest::PARAMS_GPA;
        m.write_u64(p + guest::PARAM_MAGIC, guest::PARAMS_MAGIC);
        m.write_u64(p + guest::PARAM_ITERATIONS, INITIAL_ITERATIONS);
        m.write_u64(p + guest::PARAM_TOUCH_BASE, guest::TOUCH_REGION_GPA);
        m.write_u64(p + guest::PARAM_TOUCH_PAGES, touch_pages);
        m.write_u64(
            p + guest::PARAM_TOUCH_PER_ROUND,
            config.touch_pages_per_round,
        );
    }

    /// The MSRs KVM lists (KVM_GET_MSR_INDEX_LIST) that this vCPU can actually read.
    /// KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read,
    /// so one call per unreadable MSR (plus one) finds them all, instead of one per MSR.
    fn readable_msrs(&self) -> Result<Vec<u32>> {
        let list = self
            .kvm
            .get_msr_index_list()
            .context("KVM_GET_MSR_INDEX_LIST")?;
        let listed = list.as_slice();
        let fd = self.vcpus[0].fd.lock().unwrap_or_else(|e| e.into_inner());
        let mut readable = Vec::with_capacity(listed.len());
        let mut rest = listed;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
            let mut msrs = msr_buffer(batch)?;
            let read = fd.get_msrs(&mut msrs).unwrap_or(0).min(batch.len());
            readable.extend_from_slice(&batch[..read]);
            // Go on after the batch, or after the MSR that stopped the call (skipped).
            let done = if read == batch.len() { read } else { read + 1 };
            rest = &rest[done..];
        }
        log::debug!(
            "{} of {} listed MSRs are readable",
            readable.len(),
            listed.len()
        );
        Ok(readable)
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// The latest counter each vCPU reported.
    pub fn counters(&self) -> Vec<u64> {
        self.vcpus
            .iter()
            .map(|v| v.shared.counter.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// Reports seen, summed over vCPUs.
    pub fn reports(&self) -> u64 {
        self.vcpus
            .iter()
            .map(|v| v.shared.reports.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// The counter of vCPU `index` as it is in guest memory now.
    pub fn counter_in_memory(&self, index: usize) -> u64 {
        self.memory
            .read_u64(guest::slot_gpa(index) + guest::SLOT_COUNTER)
    }

    /// A vCPU that stopped on its own (guest or KVM failure), if any.
    pub fn failure(&self) -> Option<String> {
        self.vcpus.iter().find_map(|v| match v.state() {
            RunState::Exited(Some(reason)) => Some(format!("vCPU {}: {reason}", v.index)),
            _ => None,
        })
    }

    /// Lets all vCPUs run.
    pub fn resume(&self) -> Result<()> {
        if let Some(failure) = self.failure() {
            return Err(Error(failure));
        }
        for vcpu in &self.vcpus {
            vcpu.request(Want::Run);
        }
        Ok(())
    }

    /// Stops all vCPUs and waits until none is inside KVM_RUN.
    pub fn pause(&self) -> Result<()> {
        for vcpu in &self.vcpus {
            vcpu.request(Want::Pause);
        }
        for vcpu in &self.vcpus {
            if let RunState::Exited(Some(reason)) = vcpu.wait_stopped() {
                return Err(Error(format!("vCPU {}: {reason}", vcpu.index)));
            }
        }
        Ok(())
    }

    fn assert_paused(&self) {
        for vcpu in &self.vcpus {
            assert!(
                vcpu.state() != RunState::Running,
                "vCPU state accessed while it runs"
            );
        }
    }

    /// Saves the state of every vCPU and the VM (vCPUs must be paused).
    pub fn save_state(
        &self,
        snapshot_id: u64,
        memory: state::MemoryKind,
    ) -> Result<state::VmState> {
        self.assert_paused();
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            let fd = vcpu.fd.lock().unwrap_or_else(|e| e.into_inner());
            let saved = get_vcpu_state(&fd, &self.msr_indices)
                .map_err(|e| Error(format!("vCPU {}: {e}", vcpu.index)))?;
            vcpus.push(saved);
        }
        let chip = |id| -> Result<kvm_irqchip> {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut chip)
                .context("KVM_GET_IRQCHIP")?;
            Ok(chip)
        };
        Ok(state::VmState {
            snapshot_id,
            memory_bytes: self.memory.len(),
            memory,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm_fd.get_pit2().context("KVM_GET_PIT2")?,
            clock: self.vm_fd.get_clock().context("KVM_GET_CLOCK")?,
            vcpus,
        })
    }

    /// VM-wide state, in restore order: PIT, clock, irqchip.
    fn set_vm_state(&self, saved: &state::VmState) -> Result<()> {
        self.vm_fd.set_pit2(&saved.pit).context("KVM_SET_PIT2")?;
        // Restore the clock's value as saved: no KVM_CLOCK_REALTIME adjustment for the
        // time the snapshot spent on disk (the guest continues where it stopped).
        let clock = kvm_clock_data {
            clock: saved.clock.clock,
            ..Default::default()
        };
        self.vm_fd.set_clock(&clock).context("KVM_SET_CLOCK")?;
        for chip in [&saved.pic_master, &saved.pic_slave, &saved.ioapic] {
            self.vm_fd
                .set_irqchip(chip)
                .context(&format!("KVM_SET_IRQCHIP (chip {})", chip.chip_id))?;
        }
        Ok(())
    }

    /// KVM's dirty log merged with the VMM's own writes and the pages a failed
    /// snapshot gave back; clears all three.
    pub(crate) fn take_dirty_bitmap(&mut self) -> Result<Vec<u64>> {
        self.assert_paused();
        if !self.track_dirty {
            return Err(Error("dirty-page tracking is off for this VM".into()));
        }
        let mut bitmap = self
            .vm_fd
            .get_dirty_log(0, self.memory.len() as usize)
            .context("KVM_GET_DIRTY_LOG")?;
        let host = self.memory.take_host_dirty();
        assert_eq!(bitmap.len(), host.len());
        assert_eq!(bitmap.len(), self.carried_dirty.len());
        for (((word, host_word), carried), ever) in bitmap
            .iter_mut()
            .zip(host)
            .zip(&mut self.carried_dirty)
            .zip(&mut self.ever_dirty)
        {
            *word |= host_word | std::mem::take(carried);
            *ever |= *word;
        }
        Ok(bitmap)
    }

    /// Gives back pages a snapshot took from dirty tracking, when that snapshot failed:
    /// they changed since the parent, which stays the parent of the next diff.
    pub(crate) fn give_back_dirty(&mut self, taken: &[u64]) {
        assert_eq!(taken.len(), self.carried_dirty.len());
        for (carried, word) in self.carried_dirty.iter_mut().zip(taken) {
            *carried |= word;
        }
    }

    /// Pages a full snapshot must examine (it skips the zero ones among them), and
    /// what it took from dirty tracking (see `take_dirty_bitmap`). Candidates: a fresh
    /// VM's memfd data; for a restored VM the image's data plus every page written
    /// since; everything if that cannot be known.
    pub(crate) fn full_snapshot_candidates(&mut self) -> Result<(Vec<u64>, Vec<u64>)> {
        let words = self.ever_dirty.len();
        let pages = self.memory.pages();
        if self.memory.is_private() && !self.track_dirty {
            let mut all = vec![u64::MAX; words];
            if pages % 64 != 0 {
                all[words - 1] = (1u64 << (pages % 64)) - 1;
            }
            return Ok((all, vec![0; words]));
        }
        let taken = if self.track_dirty {
            // Folds into ever_dirty, and resets: the next diff is relative to this.
            self.take_dirty_bitmap()?
        } else {
            vec![0; words]
        };
        let mut bitmap = if self.memory.is_private() {
            self.ever_dirty.clone()
        } else {
            vec![0; words]
        };
        let ranges = match self.memory.backing_data_ranges() {
            Ok(ranges) => ranges,
            Err(e) => {
                self.give_back_dirty(&taken);
                return Err(Error(format!("SEEK_DATA on guest memory: {e}")));
            }
        };
        for (first, count) in ranges {
            for page in first..(first + count).min(pages) {
                bitmap[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        Ok((bitmap, taken))
    }

    /// The snapshot the next diff would be relative to (the last one taken or restored).
    pub fn last_snapshot_id(&self) -> Option<u64> {
        self.last_snapshot_id
    }

    pub fn tracks_dirty(&self) -> bool {
        self.track_dirty
    }

    /// Where the time of the restore that made this VM went (None for a fresh VM).
    pub fn restore_timings(&self) -> Option<RestoreTimings> {
        self.restore_timings
    }
}

fn check_shape(memory_bytes: u64, vcpus: usize) -> Result<()> {
    if memory_bytes <= guest::TOUCH_REGION_GPA
        || memory_bytes > guest::MAX_GUEST_MEMORY
        || memory_bytes % guest::PAGE_SIZE != 0
    {
        return Err(Error(format!(
            "guest memory {memory_bytes} bytes: must be a multiple of 4 KiB in ({}, {}]",
            guest::TOUCH_REGION_GPA,
            guest::MAX_GUEST_MEMORY
        )));
    }
    if vcpus == 0 || vcpus > guest::MAX_GUEST_VCPUS {
        return Err(Error(format!(
            "{vcpus} vCPUs: must be 1..={}",
            guest::MAX_GUEST_VCPUS
        )));
    }
    Ok(())
}

/// Sets up a fresh vCPU to start the guest: 64-bit mode, ring 0, at the `iretq`.
fn setup_boot_vcpu(kvm: &Kvm, fd: &VcpuFd, index: usize) -> Result<()> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    set_apic_id(&mut cpuid, index as u32);
    fd.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;

    let mut sregs = fd.get_sregs().context("KVM_GET_SREGS")?;
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: guest::KERNEL_CS,
        type_: 0xB, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_bindings::kvm_segment {
        selector: guest::KERNEL_DS,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    // Every vCPU loads the same TSS selector, with its own TSS base in the cached
    // descriptor (the guest never reloads TR).
    sregs.tr = kvm_bindings::kvm_segment {
        base: guest::tss_gpa(index),
        limit: guest::TSS_LIMIT,
        selector: guest::TSS_SELECTOR,
        type_: 0xB, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.gdt.base = guest::GDT_GPA;
    sregs.gdt.limit = (guest::gdt().len() * 8 - 1) as u16;
    sregs.idt.base = guest::IDT_GPA;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr3 = guest::PML4_GPA;
    // CR4: PAE (long mode), OSFXSR + OSXMMEXCPT (SSE usable).
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
    // CR0: PE, MP, ET, NE, WP, PG.
    sregs.cr0 = 0x8005_0033;
    // EFER: LME + LMA (long mode active).
    sregs.efer = (1 << 8) | (1 << 10);
    fd.set_sregs(&sregs).context("KVM_SET_SREGS")?;

    let regs = kvm_bindings::kvm_regs {
        rip: guest::KERNEL_CODE_GPA,
        rsp: guest::iret_frame_gpa(index),
        rflags: 0x2,
        rbx: guest::slot_gpa(index),
        rsi: guest::PARAMS_GPA,
        ..Default::default()
    };
    fd.set_regs(&regs).context("KVM_SET_REGS")?;

    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37F,
        mxcsr: 0x1F80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).context("KVM_SET_FPU")?;
    // Application processors start waiting for SIPI; this guest starts them all at once.
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .context("KVM_SET_MP_STATE")?;
    Ok(())
}

/// Puts the vCPU index into the APIC-ID fields of CPUID leaves 1 and 0xB.
fn set_apic_id(cpuid: &mut CpuId, id: u32) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00FF_FFFF) | (id << 24),
            0xB => entry.edx = id,
            _ => {}
        }
    }
}

/// A KVM_GET_MSRS buffer asking for these MSRs.
fn msr_buffer(indices: &[u32]) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).context("MSR buffer")
}

/// Saves one vCPU (paused).
pub fn get_vcpu_state(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_CPUID2")?;
    let mp_state = fd.get_mp_state().context("KVM_GET_MP_STATE")?;
    let regs = fd.get_regs().context("KVM_GET_REGS")?;
    let sregs = fd.get_sregs().context("KVM_GET_SREGS")?;
    let fpu = fd.get_fpu().context("KVM_GET_FPU")?;
    let xsave = fd.get_xsave().context("KVM_GET_XSAVE")?;
    let xcrs = fd.get_xcrs().context("KVM_GET_XCRS")?;
    let debug_regs = fd.get_debug_regs().context("KVM_GET_DEBUGREGS")?;
    let lapic = fd.get_lapic().context("KVM_GET_LAPIC")?;
    let mut msrs = Vec::with_capacity(msr_indices.len());
    for chunk in msr_indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let mut buffer = msr_buffer(chunk)?;
        let read = fd.get_msrs(&mut buffer).context("KVM_GET_MSRS")?;
        if read != chunk.len() {
            return Err(Error(format!(
                "KVM_GET_MSRS read {read} of {} MSRs; MSR {:#x} failed",
                chunk.len(),
                chunk[read]
            )));
        }
        msrs.extend_from_slice(buffer.as_slice());
    }
    let events = fd.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        fpu,
        xsave: xsave.region,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// Restores one vCPU, in the order documented at the top of this file.
pub fn set_vcpu_state(fd: &VcpuFd, saved: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&saved.cpuid).context("CPUID buffer")?;
    fd.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
    fd.set_mp_state(saved.mp_state)
        .context("KVM_SET_MP_STATE")?;
    fd.set_regs(&saved.regs).context("KVM_SET_REGS")?;
    fd.set_sregs(&saved.sregs).context("KVM_SET_SREGS")?;
    fd.set_fpu(&saved.fpu).context("KVM_SET_FPU")?;
    let xsave = kvm_bindings::kvm_xsave {
        region: saved.xsave,
        ..Default::default()
    };
    // SAFETY: `xsave` is a full 4 KiB kvm_xsave. This process never enables dynamic
    // XSTATE features (arch_prctl), so KVM_SET_XSAVE reads no more than those 4 KiB.
    unsafe { fd.set_xsave(&xsave) }.context("KVM_SET_XSAVE")?;
    fd.set_xcrs(&saved.xcrs).context("KVM_SET_XCRS")?;
    fd.set_debug_regs(&saved.debug_regs)
        .context("KVM_SET_DEBUGREGS")?;
    fd.set_lapic(&saved.lapic).context("KVM_SET_LAPIC")?;
    for chunk in saved.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let buffer = Msrs::from_entries(chunk).context("MSR buffer")?;
        let written = fd.set_msrs(&buffer).context("KVM_SET_MSRS")?;
        if written != chunk.len() {
            return Err(Error(format!(
                "KVM_SET_MSRS wrote {written} of {} MSRs; MSR {:#x} was refused",
                chunk.len(),
                chunk[written].index
            )));
        }
    }
    fd.set_vcpu_events(&saved.events)
        .context("KVM_SET_VCPU_EVENTS")?;
    Ok(())
}

fn elapsed_ns(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Stop the vCPU threads before the VM fd and memory go away.
        self.vcpus.clear();
    }
}
