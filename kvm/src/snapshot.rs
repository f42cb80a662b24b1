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
//! Restore maps the full snapshot's memory MAP_PRIVATE (lazy, copy-on-write), copies
//! each diff's pages onto that private mapping in chain order, then loads the last
//! snapshot's state.

use std::fs::{File, OpenOptions};
use std::io::Write;
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

/// What a snapshot wrote.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub snapshot_id: u64,
    pub kind: SnapshotKind,
    /// Pages written to the memory file.
    pub pages_written: u64,
    pub state_bytes: u64,
    /// Time with the vCPUs paused for this snapshot, in nanoseconds.
    pub duration_ns: u64,
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

/// Writes the set bits of `bitmap` (runs of pages) from memory to `file`.
fn write_page_runs(memory: &GuestMemory, file: &File, bitmap: &[u64]) -> std::io::Result<u64> {
    let pages = memory.pages();
    let is_set = |page: u64| bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0;
    let mut written = 0;
    let mut page = 0;
    while page < pages {
        if !is_set(page) {
            page += 1;
            continue;
        }
        let first = page;
        while page < pages && is_set(page) {
            page += 1;
        }
        memory.write_pages_to(file, first, page - first)?;
        written += page - first;
    }
    file.set_len(memory.len())?;
    Ok(written)
}

impl Vm {
    /// Writes a snapshot of this VM into `dir` (created if missing). The vCPUs must be
    /// paused (`pause`); they stay paused. A diff snapshot holds the pages written since
    /// the previous snapshot (or restore) of this VM.
    pub fn snapshot(&mut self, kind: SnapshotKind, dir: &Path) -> Result<SnapshotInfo> {
        let started = Instant::now();
        let parent = match kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => Some(self.last_snapshot_id.ok_or_else(|| {
                Error(
                    "a diff snapshot needs a previous snapshot of this VM: take a full one".into(),
                )
            })?),
        };
        std::fs::create_dir_all(dir).context(&format!("create {}", dir.display()))?;
        let snapshot_id = new_snapshot_id();
        // From here until success, a failure leaves the dirty log consumed: the next
        // diff would miss pages, so only a full snapshot may follow.
        self.last_snapshot_id = None;
        let memory = self.memory().clone();
        let (memory_kind, pages_written) = match parent {
            None => {
                // Also resets dirty tracking: the next diff is relative to this snapshot.
                let mut bitmap = self.full_snapshot_candidates()?;
                for page in 0..memory.pages() {
                    let bit = 1 << (page % 64);
                    let word = &mut bitmap[(page / 64) as usize];
                    if *word & bit != 0 && memory.page_is_zero(page) {
                        *word &= !bit;
                    }
                }
                let mut written = 0;
                write_atomically(dir, MEMORY_FILE, |file| {
                    written = write_page_runs(&memory, file, &bitmap)?;
                    Ok(())
                })?;
                (MemoryKind::Full, written)
            }
            Some(parent_id) => {
                let bitmap = self.take_dirty_bitmap()?;
                let mut written = 0;
                write_atomically(dir, MEMORY_FILE, |file| {
                    written = write_page_runs(&memory, file, &bitmap)?;
                    Ok(())
                })?;
                (
                    MemoryKind::Diff {
                        parent_id,
                        dirty_bitmap: bitmap,
                    },
                    written,
                )
            }
        };
        let saved = self.save_state(snapshot_id, memory_kind)?;
        let bytes = state::encode(&saved);
        write_atomically(dir, STATE_FILE, |mut file| file.write_all(&bytes))?;
        fsync_dir(dir)?;
        if let Some(parent_dir) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent_dir)?;
        }
        self.last_snapshot_id = Some(snapshot_id);
        Ok(SnapshotInfo {
            snapshot_id,
            kind,
            pages_written,
            state_bytes: bytes.len() as u64,
            duration_ns: started.elapsed().as_nanos() as u64,
        })
    }

    /// Restores a VM from a snapshot chain: a full snapshot, then zero or more diffs,
    /// each the child of the one before. The vCPUs start paused; call `resume`.
    pub fn restore(chain: &[PathBuf], track_dirty: bool, sink: Option<ReportSink>) -> Result<Vm> {
        let states = read_chain(chain)?;
        let base = &states[0];
        let memory_bytes = base.memory_bytes;
        let image_path = chain[0].join(MEMORY_FILE);
        let image = File::open(&image_path).context(&format!("open {}", image_path.display()))?;
        let memory = GuestMemory::map_image_private(image, memory_bytes)
            .context(&format!("map {}", image_path.display()))?;
        let mut copied_in = vec![0u64; memory.pages().div_ceil(64) as usize];
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
            apply_diff(&memory, &file, dirty_bitmap)
                .context(&format!("apply {}", path.display()))?;
            for (copied, word) in copied_in.iter_mut().zip(dirty_bitmap) {
                *copied |= word;
            }
        }
        // The private copy now equals the last snapshot's memory; the VMM's own writes
        // above must not count as dirty for the next diff.
        memory.take_host_dirty();
        let last = states.last().expect("chain is not empty");
        Vm::restore_from(memory, copied_in, last, track_dirty, sink)
    }
}

fn apply_diff(memory: &GuestMemory, file: &File, bitmap: &[u64]) -> std::io::Result<()> {
    let pages = memory.pages();
    let is_set = |page: u64| bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0;
    let mut page = 0;
    while page < pages {
        if !is_set(page) {
            page += 1;
            continue;
        }
        let first = page;
        while page < pages && is_set(page) {
            page += 1;
        }
        memory.read_pages_from(file, first, page - first)?;
    }
    Ok(())
}

/// Reads one snapshot's state file, naming the file in any error.
pub fn read_state(dir: &Path) -> Result<VmState> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).context(&format!("read {}", path.display()))?;
    state::decode(&bytes).map_err(|e| Error(format!("{}: {e}", path.display())))
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
