//! Snapshots on disk, and restoring a VM from a chain of them.
//!
//! A snapshot is a directory with two files:
//! - `memory`: a sparse image of all guest memory (guest physical address = file
//!   offset). A full snapshot writes every non-zero page; a diff snapshot writes only
//!   the pages dirtied since its parent (the rest are holes, not "zero").
//! - `state`: the state file (`state` module), which records the snapshot's id, and for
//!   a diff its parent's id and the bitmap of pages its memory file holds.
//!
//! Each file is written under a temporary name, fsynced and renamed, `state` last, then
//! the directory and its parent are fsynced: a directory with a `state` file is complete.
//!
//! Taking a snapshot has two steps, so the vCPUs are paused only for the first:
//! `Vm::capture` (vCPUs paused) takes the dirty log, saves the state and copies the
//! pages into a buffer bounded by `SnapshotOptions::buffer_cap_bytes` (more pages than
//! that: it writes the memory file right then, still paused); `Capture::write` (vCPUs
//! running, any thread) writes the files; `Vm::finish_snapshot` makes the snapshot the
//! parent of the next diff if the write succeeded, and otherwise puts the pages it took
//! back into dirty tracking, so the old parent stays valid.
//!
//! Restore maps the full snapshot's memory MAP_PRIVATE (lazy, copy-on-write), then maps
//! each diff's page runs over it in chain order, also MAP_PRIVATE (copying them in
//! instead past `RestoreOptions::max_mapped_diff_runs`), then loads the last snapshot's
//! state.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::guest::PAGE_SIZE;
use crate::memory::GuestMemory;
use crate::state::{self, MemoryKind, VmState};
use crate::vcpu::ReportSink;
use crate::vm::{Context, Error, Result, Vm};

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// Bounds of taking a snapshot.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotOptions {
    /// Most bytes of guest memory a capture copies aside while the vCPUs are paused,
    /// to be written after they resume. A snapshot with more pages than this writes its
    /// memory file while the vCPUs are paused instead (correct, just slower), and says
    /// so (`SnapshotInfo::written_while_paused`). 0: always write while paused.
    pub buffer_cap_bytes: u64,
}

/// Where the pause of one capture went, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureTimings {
    /// KVM_GET_DIRTY_LOG and merging bitmaps (for a full snapshot: also SEEK_DATA).
    pub dirty_log_ns: u64,
    /// Finding the pages to save (a full snapshot skips zero pages).
    pub select_ns: u64,
    /// Copying the pages aside, or, over the cap, writing the memory file.
    pub memory_ns: u64,
    /// Saving vCPU and VM state (ioctls).
    pub state_ns: u64,
}

/// What a snapshot wrote.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub snapshot_id: u64,
    pub kind: SnapshotKind,
    /// Pages written to the memory file.
    pub pages_written: u64,
    pub state_bytes: u64,
    /// Time with the vCPUs paused for this snapshot (its capture), in nanoseconds.
    pub duration_ns: u64,
    /// Where that pause went.
    pub pause: CaptureTimings,
    /// Time writing the files after the capture (the vCPUs may run), in nanoseconds.
    pub write_ns: u64,
    /// The memory file was written while the vCPUs were paused: the pages were more
    /// than `SnapshotOptions::buffer_cap_bytes`.
    pub written_while_paused: bool,
}

/// A random, non-zero snapshot id.
fn new_snapshot_id() -> u64 {
    loop {
        let mut bytes = [0u8; 8];
        // SAFETY: writing at most 8 bytes into an 8-byte buffer.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr() as *mut libc::c_void, 8, 0) };
        assert_eq!(n, 8, "getrandom failed");
        let id = u64::from_le_bytes(bytes);
        if id != 0 {
            return id;
        }
    }
}

fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .context(&format!("fsync directory {}", path.display()))
}

/// Creates `dir/name.tmp`, lets `fill` write it, fsyncs, renames to `dir/name`.
fn write_atomically(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .context(&format!("create {}", tmp.display()))?;
    fill(&file).context(&format!("write {}", tmp.display()))?;
    file.sync_all()
        .context(&format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).context(&format!("rename to {}", path.display()))?;
    Ok(())
}

/// Runs `(first page, count)` of the set bits of `bitmap`, over `pages` pages.
fn page_runs(bitmap: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let is_set = |page: u64| bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0;
    let mut runs = Vec::new();
    let mut page = 0;
    while page < pages {
        if bitmap[(page / 64) as usize] == 0 {
            page = (page / 64 + 1) * 64; // a whole empty word
            continue;
        }
        if !is_set(page) {
            page += 1;
            continue;
        }
        let first = page;
        while page < pages && is_set(page) {
            page += 1;
        }
        runs.push((first, page - first));
    }
    runs
}

/// Writes the runs from memory to `file`, then sizes the file to all of memory.
fn write_page_runs(memory: &GuestMemory, file: &File, runs: &[(u64, u64)]) -> std::io::Result<()> {
    for &(first, count) in runs {
        memory.write_pages_to(file, first, count)?;
    }
    file.set_len(memory.len())
}

fn elapsed_ns(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

/// A snapshot captured while the vCPUs were paused: its state, and its pages copied
/// aside (or already written). `write` it after the vCPUs resume, on any thread, then
/// hand the result to `Vm::finish_snapshot`.
pub struct Capture {
    snapshot_id: u64,
    kind: SnapshotKind,
    dir: PathBuf,
    state: VmState,
    runs: Vec<(u64, u64)>,
    /// The pages of `runs`, back to back; `None`: the memory file is already written.
    buffer: Option<Vec<u8>>,
    /// What this capture took from dirty tracking (given back if it fails).
    taken: Vec<u64>,
    pause: CaptureTimings,
    paused_ns: u64,
}

/// A written (or failed) capture, for `Vm::finish_snapshot`.
pub struct Written {
    snapshot_id: u64,
    result: Result<SnapshotInfo>,
    taken: Vec<u64>,
    buffer: Option<Vec<u8>>,
}

impl Capture {
    pub fn snapshot_id(&self) -> u64 {
        self.snapshot_id
    }

    /// Pages the snapshot holds.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|&(_, count)| count).sum()
    }

    /// Whether the memory file was written while the vCPUs were paused (over the cap).
    pub fn written_while_paused(&self) -> bool {
        self.buffer.is_none()
    }

    /// Writes the memory file (unless already written) and the state file, each under
    /// a temporary name, fsynced and renamed, `state` last; then fsyncs the directory
    /// and its parent. Touches no VM state: the vCPUs may run meanwhile.
    pub fn write(self) -> Written {
        let started = Instant::now();
        let result = self.write_files();
        let write_ns = elapsed_ns(started);
        Written {
            snapshot_id: self.snapshot_id,
            result: result.map(|state_bytes| SnapshotInfo {
                snapshot_id: self.snapshot_id,
                kind: self.kind,
                pages_written: self.pages(),
                state_bytes,
                duration_ns: self.paused_ns,
                pause: self.pause,
                write_ns,
                written_while_paused: self.buffer.is_none(),
            }),
            taken: self.taken,
            buffer: self.buffer,
        }
    }

    fn write_files(&self) -> Result<u64> {
        let dir = &self.dir;
        std::fs::create_dir_all(dir).context(&format!("create {}", dir.display()))?;
        if let Some(buffer) = &self.buffer {
            write_atomically(dir, MEMORY_FILE, |file| {
                let mut at = 0;
                for &(first, count) in &self.runs {
                    let len = (count * PAGE_SIZE) as usize;
                    file.write_all_at(&buffer[at..at + len], first * PAGE_SIZE)?;
                    at += len;
                }
                file.set_len(self.state.memory_bytes)
            })?;
        }
        let bytes = state::encode(&self.state);
        write_atomically(dir, STATE_FILE, |mut file| file.write_all(&bytes))?;
        fsync_dir(dir)?;
        if let Some(parent_dir) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent_dir)?;
        }
        Ok(bytes.len() as u64)
    }
}

impl Written {
    pub fn snapshot_id(&self) -> u64 {
        self.snapshot_id
    }
}

impl Vm {
    /// Writes a snapshot of this VM into `dir` (created if missing), all while the
    /// vCPUs are paused (`pause`); they stay paused. A diff snapshot holds the pages
    /// written since the previous snapshot (or restore) of this VM. To keep the pause
    /// short, use `capture`, resume, then `Capture::write` and `finish_snapshot`.
    pub fn snapshot(&mut self, kind: SnapshotKind, dir: &Path) -> Result<SnapshotInfo> {
        let options = SnapshotOptions {
            buffer_cap_bytes: 0,
        };
        let capture = self.capture(kind, dir, &options)?;
        self.finish_snapshot(capture.write())
    }

    /// Captures a snapshot while the vCPUs are paused: takes the dirty log (diff) or
    /// the non-zero pages (full), saves the vCPU and VM state, and copies the pages
    /// into a buffer of at most `options.buffer_cap_bytes`; with more pages than that,
    /// writes the memory file into `dir` now instead. The snapshot equals memory at
    /// this instant. The parent of the next diff advances only when `finish_snapshot`
    /// sees the write succeed; one capture at a time.
    pub fn capture(
        &mut self,
        kind: SnapshotKind,
        dir: &Path,
        options: &SnapshotOptions,
    ) -> Result<Capture> {
        let started = Instant::now();
        if let Some(id) = self.in_flight {
            return Err(Error(format!(
                "snapshot {id:#x} is still being written; one snapshot at a time"
            )));
        }
        let parent = match kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => Some(self.last_snapshot_id.ok_or_else(|| {
                Error(
                    "a diff snapshot needs a previous snapshot of this VM: take a full one".into(),
                )
            })?),
        };
        let mut pause = CaptureTimings::default();
        let memory = self.memory().clone();
        let pages = memory.pages();
        let (bitmap, taken) = match parent {
            None => {
                let (mut bitmap, taken) = self.full_snapshot_candidates()?;
                pause.dirty_log_ns = elapsed_ns(started);
                let selecting = Instant::now();
                for (first, count) in page_runs(&bitmap, pages) {
                    for page in first..first + count {
                        if memory.page_is_zero(page) {
                            bitmap[(page / 64) as usize] &= !(1 << (page % 64));
                        }
                    }
                }
                pause.select_ns = elapsed_ns(selecting);
                (bitmap, taken)
            }
            Some(_) => {
                let bitmap = self.take_dirty_bitmap()?;
                pause.dirty_log_ns = elapsed_ns(started);
                (bitmap.clone(), bitmap)
            }
        };
        // From here on a failure gives back what was taken from dirty tracking, so
        // the parent stays valid for the next diff.
        let snapshot_id = new_snapshot_id();
        let result = self.capture_taken(snapshot_id, dir, parent, &bitmap, options, &mut pause);
        match result {
            Ok((runs, buffer, state)) => {
                self.in_flight = Some(snapshot_id);
                Ok(Capture {
                    snapshot_id,
                    kind,
                    dir: dir.to_path_buf(),
                    state,
                    runs,
                    buffer,
                    taken,
                    pause,
                    paused_ns: elapsed_ns(started),
                })
            }
            Err(e) => {
                self.give_back_dirty(&taken);
                Err(e)
            }
        }
    }

    /// The part of `capture` after the pages are chosen: memory, then state.
    #[allow(clippy::type_complexity)]
    fn capture_taken(
        &mut self,
        snapshot_id: u64,
        dir: &Path,
        parent: Option<u64>,
        bitmap: &[u64],
        options: &SnapshotOptions,
        pause: &mut CaptureTimings,
    ) -> Result<(Vec<(u64, u64)>, Option<Vec<u8>>, VmState)> {
        let memory = self.memory().clone();
        let runs = page_runs(bitmap, memory.pages());
        let bytes: u64 = runs.iter().map(|&(_, count)| count * PAGE_SIZE).sum();
        let copying = Instant::now();
        let buffer = if bytes <= options.buffer_cap_bytes {
            let mut buffer = std::mem::take(&mut self.snapshot_buffer);
            if (buffer.len() as u64) < bytes {
                buffer.resize(bytes as usize, 0);
            }
            let mut at = 0;
            for &(first, count) in &runs {
                let len = (count * PAGE_SIZE) as usize;
                memory.read_bytes(first * PAGE_SIZE, &mut buffer[at..at + len]);
                at += len;
            }
            Some(buffer)
        } else {
            if options.buffer_cap_bytes > 0 {
                log::warn!(
                    "snapshot {snapshot_id:#x}: {bytes} bytes of pages exceed the snapshot \
                     buffer of {} bytes; writing them while the vCPUs are paused",
                    options.buffer_cap_bytes
                );
            }
            std::fs::create_dir_all(dir).context(&format!("create {}", dir.display()))?;
            write_atomically(dir, MEMORY_FILE, |file| {
                write_page_runs(&memory, file, &runs)
            })?;
            None
        };
        pause.memory_ns = elapsed_ns(copying);
        let saving = Instant::now();
        let memory_kind = match parent {
            None => MemoryKind::Full,
            Some(parent_id) => MemoryKind::Diff {
                parent_id,
                dirty_bitmap: bitmap.to_vec(),
            },
        };
        let state = self.save_state(snapshot_id, memory_kind)?;
        pause.state_ns = elapsed_ns(saving);
        Ok((runs, buffer, state))
    }

    /// Ends the snapshot `capture` began: on success the snapshot becomes the parent
    /// of the next diff; on failure the parent stays, and the pages the capture took
    /// from dirty tracking go back into it (the next diff still includes them).
    pub fn finish_snapshot(&mut self, written: Written) -> Result<SnapshotInfo> {
        assert_eq!(
            self.in_flight,
            Some(written.snapshot_id),
            "finish_snapshot of a snapshot that is not in flight"
        );
        self.in_flight = None;
        if let Some(buffer) = written.buffer {
            self.snapshot_buffer = buffer;
        }
        match written.result {
            Ok(info) => {
                self.last_snapshot_id = Some(info.snapshot_id);
                Ok(info)
            }
            Err(e) => {
                self.give_back_dirty(&written.taken);
                Err(e)
            }
        }
    }

    /// Restores a VM from a snapshot chain: a full snapshot, then zero or more diffs,
    /// each the child of the one before. The vCPUs start paused; call `resume`.
    pub fn restore(chain: &[PathBuf], track_dirty: bool, sink: Option<ReportSink>) -> Result<Vm> {
        Vm::restore_with(chain, track_dirty, sink, &RestoreOptions::default())
    }

    /// `restore` with explicit options.
    pub fn restore_with(
        chain: &[PathBuf],
        track_dirty: bool,
        sink: Option<ReportSink>,
        options: &RestoreOptions,
    ) -> Result<Vm> {
        Vm::restore_checked(chain, None, track_dirty, sink, options)
    }

    /// `restore_with`, which first checks that chain entry `i` holds the snapshot
    /// `expected_ids[i]` (when given): a caller that trusts only certain snapshots (the
    /// agent: the ones its committed cluster state names) has the state files read once,
    /// here, rather than reading them itself beforehand.
    pub fn restore_checked(
        chain: &[PathBuf],
        expected_ids: Option<&[u64]>,
        track_dirty: bool,
        sink: Option<ReportSink>,
        options: &RestoreOptions,
    ) -> Result<Vm> {
        let started = Instant::now();
        let mut timings = RestoreTimings::default();
        let states = read_chain(chain)?;
        if let Some(expected) = expected_ids {
            check_ids(chain, &states, expected)?;
        }
        timings.read_states_ns = elapsed_ns(started);
        let mapping = Instant::now();
        let base = &states[0];
        let memory_bytes = base.memory_bytes;
        let image_path = chain[0].join(MEMORY_FILE);
        let image = File::open(&image_path).context(&format!("open {}", image_path.display()))?;
        let mut memory = GuestMemory::map_image_private(image, memory_bytes)
            .context(&format!("map {}", image_path.display()))?;
        let mut copied_in = vec![0u64; memory.pages().div_ceil(64) as usize];
        let mut runs_left = options.max_mapped_diff_runs;
        for (dir, saved) in chain.iter().zip(&states).skip(1) {
            let MemoryKind::Diff { dirty_bitmap, .. } = &saved.memory else {
                unreachable!("read_chain checked that every later snapshot is a diff");
            };
            let path = dir.join(MEMORY_FILE);
            let file = File::open(&path).context(&format!("open {}", path.display()))?;
            let len = file
                .metadata()
                .context(&format!("stat {}", path.display()))?
                .len();
            if len != memory_bytes {
                return Err(Error(format!(
                    "{}: {len} bytes, the state file says {memory_bytes}",
                    path.display()
                )));
            }
            let runs = page_runs(dirty_bitmap, memory.pages());
            // Map the diff's pages over the image (lazy, nothing read now) while the
            // mappings stay few; otherwise copy them in.
            if runs.len() <= runs_left {
                runs_left -= runs.len();
                for &(first, count) in &runs {
                    memory
                        .map_file_pages(&file, first, count)
                        .context(&format!("map {}", path.display()))?;
                }
                timings.diff_runs_mapped += runs.len() as u64;
            } else {
                for &(first, count) in &runs {
                    memory
                        .read_pages_from(&file, first, count)
                        .context(&format!("apply {}", path.display()))?;
                }
                timings.diff_runs_copied += runs.len() as u64;
            }
            for (copied, word) in copied_in.iter_mut().zip(dirty_bitmap) {
                *copied |= word;
            }
        }
        // The private copy now equals the last snapshot's memory; the VMM's own writes
        // above must not count as dirty for the next diff.
        memory.take_host_dirty();
        timings.memory_ns = elapsed_ns(mapping);
        let last = states.last().expect("chain is not empty");
        let mut vm = Vm::restore_from(memory, copied_in, last, track_dirty, sink, &mut timings)?;
        timings.total_ns = elapsed_ns(started);
        vm.restore_timings = Some(timings);
        Ok(vm)
    }
}

/// How a restore treats the diffs of a chain.
#[derive(Clone, Copy, Debug)]
pub struct RestoreOptions {
    /// Diff page runs one restore maps rather than copies. Each mapped run costs the
    /// process up to two more VMAs (the kernel's default limit, vm.max_map_count, is
    /// 65530); a diff whose runs do not fit in what is left is copied in instead.
    pub max_mapped_diff_runs: usize,
}

impl Default for RestoreOptions {
    fn default() -> RestoreOptions {
        RestoreOptions {
            max_mapped_diff_runs: 4096,
        }
    }
}

/// Where the time of one restore went, in nanoseconds (from `Vm::restore`'s start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreTimings {
    /// Reading and checking the chain's state files.
    pub read_states_ns: u64,
    /// Mapping the image and mapping (or copying) the diffs' pages.
    pub memory_ns: u64,
    pub diff_runs_mapped: u64,
    pub diff_runs_copied: u64,
    /// KVM_CREATE_VM, the memory slot, irqchip and PIT.
    pub create_vm_ns: u64,
    /// Creating the vCPUs and loading their state.
    pub vcpus_ns: u64,
    /// PIT, clock and irqchip state.
    pub vm_state_ns: u64,
    /// Starting the (paused) vCPU threads.
    pub threads_ns: u64,
    pub total_ns: u64,
}

/// Reads one snapshot's state file, naming the file in any error.
pub fn read_state(dir: &Path) -> Result<VmState> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).context(&format!("read {}", path.display()))?;
    state::decode(&bytes).map_err(|e| Error(format!("{}: {e}", path.display())))
}

/// Checks that each chain entry holds the snapshot the caller expects there.
fn check_ids(chain: &[PathBuf], states: &[VmState], expected: &[u64]) -> Result<()> {
    if expected.len() != states.len() {
        return Err(Error(format!(
            "{} snapshot ids expected for a chain of {}",
            expected.len(),
            states.len()
        )));
    }
    for ((dir, saved), &id) in chain.iter().zip(states).zip(expected) {
        if saved.snapshot_id != id {
            return Err(Error(format!(
                "{} holds snapshot {:#x}, the expected one is {id:#x}",
                dir.display(),
                saved.snapshot_id
            )));
        }
    }
    Ok(())
}

/// Reads and checks a chain: first a full snapshot, then diffs whose parents match.
fn read_chain(chain: &[PathBuf]) -> Result<Vec<VmState>> {
    if chain.is_empty() {
        return Err(Error("restore needs at least one snapshot".into()));
    }
    let mut states: Vec<VmState> = Vec::with_capacity(chain.len());
    for (i, dir) in chain.iter().enumerate() {
        let saved = read_state(dir)?;
        match (&saved.memory, states.last()) {
            (MemoryKind::Full, None) => {}
            (MemoryKind::Full, Some(_)) => {
                return Err(Error(format!(
                    "{}: a full snapshot cannot follow another in a chain",
                    dir.display()
                )))
            }
            (MemoryKind::Diff { .. }, None) => {
                return Err(Error(format!(
                    "{}: a chain must start with a full snapshot, this is a diff",
                    dir.display()
                )))
            }
            (MemoryKind::Diff { parent_id, .. }, Some(previous)) => {
                if *parent_id != previous.snapshot_id {
                    return Err(Error(format!(
                        "{}: diff of snapshot {parent_id:#x}, but chain entry {} is {:#x}",
                        dir.display(),
                        i - 1,
                        previous.snapshot_id
                    )));
                }
                if saved.memory_bytes != previous.memory_bytes {
                    return Err(Error(format!(
                        "{}: memory size {} differs from its parent's {}",
                        dir.display(),
                        saved.memory_bytes,
                        previous.memory_bytes
                    )));
                }
            }
        }
        if saved.memory_bytes % PAGE_SIZE != 0 {
            return Err(Error(format!(
                "{}: memory size not page-aligned",
                dir.display()
            )));
        }
        states.push(saved);
    }
    Ok(states)
}
