//! vCPU threads: one thread per vCPU runs KVM_RUN; the control thread pauses, resumes
//! and stops them.
//!
//! Pausing: the control thread sets `want = Pause`, writes 1 to the vCPU's
//! `kvm_run.immediate_exit` and sends the thread [`kick_signal`] (a no-op handler,
//! installed without SA_RESTART), all under the vCPU's control lock. Whether the
//! thread is inside KVM_RUN (the signal makes it return EINTR) or about to enter it
//! (immediate_exit makes it return EINTR at once), it cannot miss the request. Before
//! reporting itself paused, the thread runs KVM_RUN once more with immediate_exit set,
//! so that KVM completes any pending I/O instruction and the saved state is
//! consistent (the KVM API's rule for saving state; needed on VMX/SVM hosts).
//!
//! While a vCPU is paused its thread holds no lock on the vCPU fd, so the control
//! thread can read and write its state.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::guest;
use crate::memory::GuestMemory;
use crate::monotonic_ns;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the no-op handler for [`kick_signal`] once per process.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; we set a handler that does nothing (it is
        // async-signal-safe) and no SA_RESTART, so KVM_RUN returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = 0;
            let rc = libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
            assert!(rc == 0, "sigaction for the vCPU kick signal failed");
        }
    });
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Run,
    Pause,
    Exit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Not started, or paused: the fd is free for state access.
    Paused,
    Running,
    /// The thread ended; `Some(reason)` if the guest or KVM failed.
    Exited(Option<String>),
}

pub struct Control {
    pub want: Want,
    pub state: RunState,
}

/// A pointer to `kvm_run.immediate_exit` of one vCPU.
struct ImmediateExit(*const AtomicU8);
// SAFETY: the pointer targets the vCPU's kvm_run mapping, which lives as long as the
// VcpuFd, which `Shared`'s owner (VcpuHandle) keeps alive; only atomic stores are made.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn set(&self, value: u8) {
        // SAFETY: see the type's Send/Sync comment: the target is a live u8 in the
        // kvm_run mapping, and the kernel only reads it at KVM_RUN entry.
        unsafe { (*self.0).store(value, Ordering::SeqCst) }
    }
}

/// A guest report: the counter of one vCPU and when the VMM saw it.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub vcpu: usize,
    pub counter: u64,
    pub monotonic_ns: u64,
}

/// Called on the vCPU thread for each report (keep it short).
pub type ReportSink = Arc<dyn Fn(&Report) + Send + Sync>;

/// What the vCPU thread and the control thread share.
pub struct Shared {
    pub control: Mutex<Control>,
    pub changed: Condvar,
    immediate_exit: ImmediateExit,
    pub counter: AtomicU64,
    pub reports: AtomicU64,
}

pub struct VcpuHandle {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub fd: Arc<Mutex<VcpuFd>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Target guest time between two reports.
const REPORT_INTERVAL: Duration = Duration::from_millis(10);

impl VcpuHandle {
    pub fn new(index: usize, mut fd: VcpuFd) -> VcpuHandle {
        let ptr = &mut fd.get_kvm_run().immediate_exit as *mut u8 as *const AtomicU8;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                want: Want::Pause,
                state: RunState::Paused,
            }),
            changed: Condvar::new(),
            immediate_exit: ImmediateExit(ptr),
            counter: AtomicU64::new(0),
            reports: AtomicU64::new(0),
        });
        VcpuHandle {
            index,
            shared,
            fd: Arc::new(Mutex::new(fd)),
            thread: None,
        }
    }

    /// Starts the thread (paused until `resume`).
    pub fn spawn(&mut self, memory: Arc<GuestMemory>, sink: Option<ReportSink>) {
        assert!(self.thread.is_none());
        install_kick_handler();
        let shared = self.shared.clone();
        let fd = self.fd.clone();
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu_thread(index, shared, fd, memory, sink))
            .expect("spawning a vCPU thread");
        self.thread = Some(thread);
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        self.shared
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the vCPU to pause and kicks it out of KVM_RUN (does not wait).
    pub fn request(&self, want: Want) {
        let mut control = self.lock();
        control.want = want;
        if want != Want::Run {
            self.shared.immediate_exit.set(1);
            if let Some(thread) = &self.thread {
                use std::os::unix::thread::JoinHandleExt;
                // SAFETY: the thread is not joined yet (joined only in Drop), so its
                // pthread_t is valid; the signal's handler does nothing.
                unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            }
        }
        self.shared.changed.notify_all();
    }

    /// Waits until the vCPU is no longer running (paused or exited).
    pub fn wait_stopped(&self) -> RunState {
        let mut control = self.lock();
        loop {
            if control.state != RunState::Running || self.thread.is_none() {
                return control.state.clone();
            }
            let (c, _) = self
                .shared
                .changed
                .wait_timeout(control, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner());
            control = c;
        }
    }

    pub fn state(&self) -> RunState {
        self.lock().state.clone()
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.request(Want::Exit);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn is_interrupt(e: &kvm_ioctls::Error) -> bool {
    e.errno() == libc::EINTR || e.errno() == libc::EAGAIN
}

fn vcpu_thread(
    index: usize,
    shared: Arc<Shared>,
    fd: Arc<Mutex<VcpuFd>>,
    memory: Arc<GuestMemory>,
    sink: Option<ReportSink>,
) {
    let lock = || shared.control.lock().unwrap_or_else(|e| e.into_inner());
    let mut calibration = Calibration::new();
    loop {
        // Wait for Run (or Exit) while paused.
        {
            let mut control = lock();
            loop {
                match control.want {
                    Want::Exit => {
                        control.state = RunState::Exited(None);
                        shared.changed.notify_all();
                        return;
                    }
                    Want::Pause => {
                        if control.state != RunState::Paused {
                            control.state = RunState::Paused;
                            shared.changed.notify_all();
                        }
                        control = shared
                            .changed
                            .wait(control)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                    Want::Run => break,
                }
            }
            control.state = RunState::Running;
            shared.immediate_exit.set(0);
            shared.changed.notify_all();
        }
        calibration.resumed();
        let mut vcpu = fd.lock().unwrap_or_else(|e| e.into_inner());
        let failure = loop {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) if port == guest::REPORT_PORT => {
                    let mut low = [0u8; 4];
                    let n = data.len().min(4);
                    low[..n].copy_from_slice(&data[..n]);
                    on_report(index, u32::from_le_bytes(low), &shared, &memory, &sink);
                    if index == 0 {
                        calibration.on_report(&memory);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) if port == guest::PANIC_PORT => {
                    let mut rip = [0u8; 4];
                    let n = data.len().min(4);
                    rip[..n].copy_from_slice(&data[..n]);
                    break Some(format!(
                        "the guest hit an unexpected #GP at rip {:#x}",
                        u32::from_le_bytes(rip)
                    ));
                }
                Ok(VcpuExit::IoOut(..)) => {}
                Ok(VcpuExit::IoIn(_, data)) => data.fill(0xFF),
                Ok(VcpuExit::Hlt) => {
                    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                    break Some(format!("the guest halted at rip {rip:#x}"));
                }
                Ok(VcpuExit::Shutdown) => {
                    let at = vcpu
                        .get_regs()
                        .map(|r| (r.rip, r.rflags))
                        .unwrap_or_default();
                    let cs = vcpu.get_sregs().map(|s| s.cs.selector).unwrap_or_default();
                    break Some(format!(
                        "the guest shut down (triple fault) at rip {:#x} rflags {:#x} cs {cs:#x}",
                        at.0, at.1
                    ));
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    break Some(format!("VM entry failed: reason {reason:#x} on cpu {cpu}"))
                }
                Ok(VcpuExit::InternalError) => break Some("KVM internal error".into()),
                // KVM_EXIT_INTR: a signal arrived as KVM was about to enter the guest.
                Ok(VcpuExit::Intr) => {
                    let control = lock();
                    if control.want != Want::Run {
                        break None;
                    }
                    shared.immediate_exit.set(0);
                }
                Ok(other) => break Some(format!("unexpected vCPU exit {other:?}")),
                Err(e) if is_interrupt(&e) => {
                    let control = lock();
                    if control.want != Want::Run {
                        break None;
                    }
                    // A stale kick (pause then resume before we saw it): clear it.
                    shared.immediate_exit.set(0);
                }
                Err(e) => break Some(format!("KVM_RUN failed: {e}")),
            }
        };
        if let Some(reason) = failure {
            drop(vcpu);
            log::error!("vcpu{index}: {reason}");
            let mut control = lock();
            control.state = RunState::Exited(Some(reason));
            shared.changed.notify_all();
            return;
        }
        // Complete a pending I/O instruction before the state can be saved.
        shared.immediate_exit.set(1);
        match vcpu.run() {
            Err(e) if is_interrupt(&e) => {}
            Ok(exit) => log::warn!("vcpu{index}: exit {exit:?} while completing pending I/O"),
            Err(e) => log::warn!("vcpu{index}: KVM_RUN with immediate_exit: {e}"),
        }
        drop(vcpu);
    }
}

fn on_report(
    index: usize,
    low: u32,
    shared: &Shared,
    memory: &GuestMemory,
    sink: &Option<ReportSink>,
) {
    let counter = memory.read_u64(guest::slot_gpa(index) + guest::SLOT_COUNTER);
    if counter as u32 != low {
        log::warn!("vcpu{index}: reported {low} but the counter in memory is {counter}");
    }
    shared.counter.store(counter, Ordering::Relaxed);
    shared.reports.fetch_add(1, Ordering::Relaxed);
    if let Some(sink) = sink {
        sink(&Report {
            vcpu: index,
            counter,
            monotonic_ns: monotonic_ns(),
        });
    }
}

/// Adjusts the guest's spin count so a round takes about [`REPORT_INTERVAL`].
struct Calibration {
    last: Option<Instant>,
}

impl Calibration {
    fn new() -> Self {
        Calibration { last: None }
    }
    /// Time spent paused must not count as guest work.
    fn resumed(&mut self) {
        self.last = None;
    }
    fn on_report(&mut self, memory: &GuestMemory) {
        let now = Instant::now();
        if let Some(last) = self.last.replace(now) {
            let elapsed = now.duration_since(last);
            if elapsed.is_zero() || elapsed > REPORT_INTERVAL * 20 {
                return;
            }
            let gpa = guest::PARAMS_GPA + guest::PARAM_ITERATIONS;
            let current = memory.read_u64(gpa).max(1);
            let wanted = (current as u128 * REPORT_INTERVAL.as_nanos() / elapsed.as_nanos())
                .clamp(current as u128 / 2, current as u128 * 2)
                .clamp(1_000, 1 << 40) as u64;
            // Only rewrite on a real change (>5 %), so the page is not dirtied for noise.
            if wanted.abs_diff(current) * 20 > current {
                memory.write_u64(gpa, wanted);
            }
        }
    }
}
