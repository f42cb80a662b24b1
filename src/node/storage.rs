//! The node's durable Raft storage: the WAL (entries), the hard-state file, and the
//! latest Raft snapshot file, all in the data directory.
//!
//! - Entries go to `wal/` with their kind as the first payload byte.
//! - The hard state is kept in memory until the turn's sync, then saved (two-slot file,
//!   synced), so a slot is never written twice before a flush.
//! - Syncs are split ([`SplitSync`]): `begin_sync` captures what the WAL holds and writes
//!   the hard state; the node runs the flushes ([`Storage::sync_targets`]) as fdatasync
//!   operations on its ring; `complete_sync` once all of them succeeded. A failed flush
//!   is fatal ([`Storage::sync_failed`]). The blocking `LogStorage::sync` does the same
//!   with fdatasync(2) inside the call (tests use it).
//! - The Raft snapshot lives in `snapshot`, always replaced by a rename, and reaches it in
//!   one of two ways:
//!   - A **local** snapshot (the node compacts its own applied state,
//!     [`LogStorage::write_local_snapshot`]) does not wait for the disk inside the
//!     loop; what runs there is a plain write of its bytes to `snapshot.local.tmp`
//!     (into the page cache) and, later, a rename. Its flushes are operations of their
//!     own on the node's ring ([`Storage::snapshot_flush`] names the next one,
//!     [`Storage::snapshot_flushed`] takes the step after it), independent of the
//!     WAL's syncs, so no commit or acknowledgement waits for them: fdatasync of the
//!     tmp file; then the rename to `snapshot`; then fsync of the data directory; then
//!     the WAL prefix the snapshot covers is compacted. Until then the WAL keeps every
//!     entry (all of them durable before the snapshot was made: it covers only
//!     persisted entries), so a crash at any point recovers the old snapshot or the new
//!     one, plus the whole log after it. One local snapshot is in progress at most
//!     ([`Storage::snapshot_in_progress`]); a newer one replaces it.
//!   - An **installed** snapshot (received from the leader) is written synchronously:
//!     `snapshot.install.tmp`, fsync, rename, fsync the directory, compact the WAL, all
//!     inside the call, because the acknowledgement that follows it promises it is
//!     durable. It is rare (a new member, a follower far behind). It wins over a local
//!     snapshot in progress: that one is abandoned (its tmp file removed, never renamed).
//! - The blocking `LogStorage::sync` finishes a local snapshot inside the call.
//!   [`Storage::open`] removes the tmp files a crash left behind.
//!
//! Recovery ([`Storage::open`]) refuses to start when the log lost entries the hard
//! state says were committed (a damaged last batch looks like a torn tail to the WAL).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use vigil_wal::{EntryRef, HardState as WalHardState, HardStateFile, SyncToken, Wal};

use crate::codec::{put_u32, put_u64, Reader};
use crate::limits;
use crate::raft::{
    EntriesView, Entry, EntryKind, HardState, Index, LogStorage, Recovered, SnapshotMeta, SplitSync,
};

const SNAPSHOT_MAGIC: [u8; 4] = *b"VGLS";
const SNAPSHOT_VERSION: u32 = 1;
const SNAPSHOT_HEADER_BYTES: usize = 4 + 4 + 8 + 8 + 4 + 4;

/// The snapshot recovery reads.
const SNAPSHOT_FILE: &str = "snapshot";
/// Where a local snapshot is written before its rename.
const LOCAL_TMP: &str = "snapshot.local.tmp";
/// Where an installed snapshot is written before its rename (a distinct name, so an
/// install never meets the tmp file of a local snapshot in progress).
const INSTALL_TMP: &str = "snapshot.install.tmp";
/// Tmp files a crash may leave: removed at open. `snapshot.tmp` is the name earlier
/// versions used for both kinds.
const STRAY_TMP: [&str; 3] = [LOCAL_TMP, INSTALL_TMP, "snapshot.tmp"];

pub struct Storage {
    dir: PathBuf,
    wal: Wal,
    hard_state: HardStateFile,
    pending_hard_state: Option<HardState>,
    /// Kind-prefixed payloads of the batch being appended (reused).
    scratch: Vec<u8>,
    /// Where each entry of a piece of the batch lies in `scratch` (reused).
    bounds: Vec<(usize, usize)>,
    /// The sync in flight, if any: when it began, the WAL's part (None when the WAL had
    /// nothing unsynced), and the hard-state file's descriptor if it was written.
    sync: Option<InFlightSync>,
    /// The local snapshot on its way to `snapshot`, if any.
    local: Option<LocalSnapshot>,
    /// A snapshot flush was handed out and has not completed.
    snapshot_flush_in_flight: bool,
    /// The file of a local snapshot abandoned while its flush runs: it stays open until
    /// that flush completed (the ring may still use the descriptor).
    abandoned_in_flight: Option<File>,
    /// Durations of the last syncs in nanoseconds, for metrics (drained by the node).
    pub last_sync_ns: Option<u64>,
}

struct InFlightSync {
    started: crate::io::Instant,
    wal: Option<SyncToken>,
    hard_state_fd: Option<RawFd>,
}

/// A local snapshot between its write and the compaction of the WAL.
struct LocalSnapshot {
    meta: SnapshotMeta,
    bytes: usize,
    stage: LocalStage,
    /// The tmp file while its data waits for a flush; the data directory after the
    /// rename.
    file: File,
    /// The flush in flight is `file`'s, for this stage.
    flushing: bool,
    /// For the debug log: when it was written, and what it cost inside the loop.
    started: crate::io::Instant,
    write_ms: f64,
    rename_ms: f64,
    data_flushed_ms: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LocalStage {
    /// Written to `snapshot.local.tmp`; its data waits for (or is in) an fdatasync.
    Data,
    /// Renamed to `snapshot`; the directory waits for (or is in) an fsync, then the WAL
    /// is compacted.
    Directory,
}

#[derive(Debug)]
pub struct StorageError(pub String);

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<vigil_wal::Error> for StorageError {
    fn from(e: vigil_wal::Error) -> Self {
        StorageError(e.to_string())
    }
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> StorageError {
    StorageError(format!("{what} {}: {e}", path.display()))
}

impl Storage {
    /// Opens (or creates) the storage in `dir` and returns what Raft recovers from it.
    pub fn open(dir: &Path) -> Result<(Storage, Recovered), StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, "create", e))?;
        let wal = Wal::open(dir.join("wal"), limits::WAL_OPTIONS)?;
        // Only now: the WAL's lock says no other process uses this data directory.
        remove_stray_tmp_files(dir)?;
        if let Some(torn) = &wal.recovery().torn_tail {
            log::warn!(
                "wal: cut a torn tail at {} offset {} ({} bytes wiped)",
                torn.path.display(),
                torn.offset,
                torn.wiped_bytes
            );
        }
        let hard_state = HardStateFile::open(dir.join("hardstate"))?;
        let snapshot = read_snapshot(&dir.join(SNAPSHOT_FILE))?;
        let hs = hard_state.get();
        let snapshot_index = snapshot.as_ref().map_or(0, |(m, _)| m.index);
        let mut entries = Vec::new();
        let first = wal.first_index().max(snapshot_index + 1);
        let last = wal.last_index();
        if first <= last {
            let Some(iter) = wal.entries(first..last + 1) else {
                return Err(StorageError(format!(
                    "wal: entries {first}..={last} unreadable"
                )));
            };
            for e in iter {
                let Some((&kind, data)) = e.payload.split_first() else {
                    return Err(StorageError(format!(
                        "wal: entry {} has no kind byte",
                        e.index
                    )));
                };
                let Some(kind) = EntryKind::from_u8(kind) else {
                    return Err(StorageError(format!(
                        "wal: entry {} has unknown kind {kind}",
                        e.index
                    )));
                };
                entries.push(Entry {
                    term: e.term,
                    index: e.index,
                    kind,
                    data: data.to_vec(),
                });
            }
        }
        let last_known = last.max(snapshot_index);
        if last_known < hs.commit {
            return Err(StorageError(format!(
                "refusing to start: the log ends at {last_known} but entries up to {} were committed \
                 (the WAL lost committed entries; this node's disk must be replaced and the node re-added under a new id)",
                hs.commit
            )));
        }
        if entries.len() > limits::RAFT_LOG_CAPACITY {
            return Err(StorageError(format!(
                "the log holds {} entries after the snapshot, more than the in-memory capacity {}",
                entries.len(),
                limits::RAFT_LOG_CAPACITY
            )));
        }
        log::info!(
            "storage: recovered term {} vote {} commit {}, snapshot at {}, log {}..={}",
            hs.term,
            hs.voted_for,
            hs.commit,
            snapshot_index,
            first,
            last
        );
        let recovered = Recovered {
            hard_state: HardState {
                term: hs.term,
                vote: hs.voted_for,
                commit: hs.commit,
            },
            snapshot,
            entries,
        };
        Ok((
            Storage {
                dir: dir.to_path_buf(),
                wal,
                hard_state,
                pending_hard_state: None,
                scratch: Vec::with_capacity(
                    limits::MAX_APPEND_BYTES + limits::MAX_ENTRIES_PER_APPEND,
                ),
                bounds: Vec::with_capacity(limits::MAX_ENTRIES_PER_APPEND),
                sync: None,
                local: None,
                snapshot_flush_in_flight: false,
                abandoned_in_flight: None,
                last_sync_ns: None,
            },
            recovered,
        ))
    }
}

impl Storage {
    /// The descriptors to flush for the sync in flight, each with whether it needs a
    /// full fsync (the WAL directory, after a segment was renamed into place or removed)
    /// rather than fdatasync: the WAL segments it touched (normally one, two at a
    /// rollover), the WAL's spare segment while it is new, then the hard-state file if
    /// it was written. They stay open until `complete_sync`.
    pub fn sync_targets(&self) -> impl Iterator<Item = (RawFd, bool)> + '_ {
        let sync = self.sync.as_ref();
        let wal = sync
            .filter(|s| s.wal.is_some())
            .into_iter()
            .flat_map(|_| self.wal.sync_targets().map(|t| (t.fd, t.full_fsync)));
        wal.chain(sync.and_then(|s| s.hard_state_fd).map(|fd| (fd, false)))
    }

    /// Whether a local snapshot is on its way (written, not yet durable with the WAL
    /// compacted). The node starts no other meanwhile.
    pub fn snapshot_in_progress(&self) -> bool {
        self.local.is_some()
    }

    /// Forgets the local snapshot in progress, if any, without renaming it: its tmp
    /// file is removed (or, already renamed, it stays `snapshot` until what replaces it
    /// is renamed over it). Its WAL prefix is not compacted.
    fn abandon_local_snapshot(&mut self, why: &str) {
        let Some(local) = self.local.take() else {
            return;
        };
        if local.stage == LocalStage::Data {
            let tmp = self.dir.join(LOCAL_TMP);
            if let Err(e) = std::fs::remove_file(&tmp) {
                // Harmless: open removes it; and a later local snapshot recreates it.
                log::warn!("storage: could not remove {}: {e}", tmp.display());
            }
        }
        if local.flushing {
            assert!(self.snapshot_flush_in_flight && self.abandoned_in_flight.is_none());
            self.abandoned_in_flight = Some(local.file);
        }
        log::info!(
            "storage: local snapshot at {} abandoned ({:?} stage): {why}",
            local.meta.index,
            local.stage
        );
    }

    /// The next flush a local snapshot waits for, if any and none is in flight: the
    /// descriptor, and whether it needs a full fsync (the directory) rather than
    /// fdatasync. The caller runs it (on the ring) and calls
    /// [`Storage::snapshot_flushed`] when it succeeded; a failed one is fatal
    /// ([`Storage::sync_failed`]). The descriptor stays open until then.
    pub fn snapshot_flush(&mut self) -> Option<(RawFd, bool)> {
        if self.snapshot_flush_in_flight {
            return None;
        }
        let local = self.local.as_mut()?;
        assert!(!local.flushing);
        local.flushing = true;
        self.snapshot_flush_in_flight = true;
        Some((local.file.as_raw_fd(), local.stage == LocalStage::Directory))
    }

    /// The flush [`Storage::snapshot_flush`] named succeeded: take the snapshot's next
    /// step (rename after the data flush; compact the WAL after the directory flush).
    pub fn snapshot_flushed(&mut self) -> Result<(), StorageError> {
        assert!(
            self.snapshot_flush_in_flight,
            "a snapshot flush completed with none in flight"
        );
        self.snapshot_flush_in_flight = false;
        // An abandoned snapshot's file is closed only now that its flush is over.
        if self.abandoned_in_flight.take().is_some() {
            return Ok(());
        }
        let local = self
            .local
            .as_mut()
            .filter(|l| l.flushing)
            .expect("a snapshot flush belongs to the snapshot in progress or an abandoned one");
        local.flushing = false;
        let ms = |since: crate::io::Instant| {
            crate::io::Instant::now()
                .saturating_duration_since(since)
                .as_secs_f64()
                * 1e3
        };
        match local.stage {
            LocalStage::Data => {
                local.data_flushed_ms = ms(local.started);
                let t = crate::io::Instant::now();
                let (tmp, path) = (self.dir.join(LOCAL_TMP), self.dir.join(SNAPSHOT_FILE));
                std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, "rename to", e))?;
                local.file = File::open(&self.dir).map_err(|e| io_err(&self.dir, "open", e))?;
                local.stage = LocalStage::Directory;
                local.rename_ms = ms(t);
            }
            LocalStage::Directory => {
                let local = self.local.take().expect("checked above");
                self.wal.compact(local.meta.index + 1)?;
                log::debug!(
                    "storage: local snapshot at {} ({} bytes): in the loop: write {:.2} ms, rename {:.2} ms; \
                     durable: data {:.2} ms, directory {:.2} ms after the write",
                    local.meta.index,
                    local.bytes,
                    local.write_ms,
                    local.rename_ms,
                    local.data_flushed_ms,
                    ms(local.started)
                );
            }
        }
        Ok(())
    }

    /// Whether the sync in flight carries a new term or vote (an election is waiting).
    pub fn sync_writes_hard_state(&self) -> bool {
        self.sync
            .as_ref()
            .is_some_and(|s| s.hard_state_fd.is_some())
    }

    /// Runs the flushes of the sync in flight here, blocking (fdatasync(2)); a failure
    /// aborts. The caller then completes the sync as if the flushes had run on the ring.
    pub fn flush_blocking(&self) {
        for (fd, full) in self.sync_targets() {
            // The storage keeps these descriptors open until complete_sync.
            if let Err(e) = flush_fd(fd, full) {
                self.sync_failed(&e);
            }
        }
    }

    /// A flush of the sync in flight failed: stop now (a retried flush may report
    /// success for data the kernel dropped). Logs and aborts.
    pub fn sync_failed(&self, err: &std::io::Error) -> ! {
        self.wal.sync_failed(err)
    }

    /// The last log index the WAL holds durably.
    pub fn synced_index(&self) -> Index {
        self.wal.synced_index()
    }
}

impl SplitSync for Storage {
    fn begin_sync(&mut self) -> Result<usize, StorageError> {
        assert!(self.sync.is_none(), "one sync in flight at most");
        // The hard-state write and the WAL's flush run in parallel, and the hard state's
        // block may even reach the disk by writeback before either flush. Recovery
        // refuses a hard state whose commit index the log does not hold, so the commit
        // index written rides along only as far as the log was durable before this sync.
        let durable_before = self.wal.synced_index();
        let wal = self.wal.begin_sync();
        let hard_state_fd = match self.pending_hard_state.take() {
            Some(hs) => Some(self.hard_state.write_unsynced(WalHardState {
                term: hs.term,
                voted_for: hs.vote,
                commit: hs.commit.min(durable_before),
            })?),
            None => None,
        };
        self.sync = Some(InFlightSync {
            started: crate::io::Instant::now(),
            wal,
            hard_state_fd,
        });
        Ok(self.sync_targets().count())
    }

    fn complete_sync(&mut self) -> Result<Index, StorageError> {
        let sync = self
            .sync
            .take()
            .expect("complete_sync without a sync in flight");
        if let Some(token) = sync.wal {
            self.wal.complete_sync(token)?;
        }
        self.last_sync_ns = Some(
            crate::io::Instant::now()
                .saturating_duration_since(sync.started)
                .as_nanos() as u64,
        );
        Ok(self.wal.synced_index())
    }
}

impl LogStorage for Storage {
    type Error = StorageError;

    fn write_entries(&mut self, from: Index, entries: EntriesView<'_>) -> Result<(), StorageError> {
        if from <= self.wal.last_index() {
            self.wal.truncate_suffix(from.max(self.wal.first_index()))?;
        }
        // Append in pieces so the scratch buffer stays bounded.
        let mut i = 0;
        while i < entries.len() {
            self.scratch.clear();
            let start = i;
            let bounds = &mut self.bounds;
            bounds.clear();
            while i < entries.len()
                && bounds.len() < limits::MAX_ENTRIES_PER_APPEND
                && (bounds.is_empty()
                    || self.scratch.len() + entries.get(i).data.len() < limits::MAX_APPEND_BYTES)
            {
                let e = entries.get(i);
                let at = self.scratch.len();
                self.scratch.push(e.kind.to_u8());
                self.scratch.extend_from_slice(&e.data);
                bounds.push((at, self.scratch.len()));
                i += 1;
            }
            // On the stack: the steady-state write path does not allocate.
            let mut refs = [EntryRef {
                index: 0,
                term: 0,
                payload: &[],
            }; limits::MAX_ENTRIES_PER_APPEND];
            for (k, &(a, b)) in bounds.iter().enumerate() {
                let e = entries.get(start + k);
                refs[k] = EntryRef {
                    index: e.index,
                    term: e.term,
                    payload: &self.scratch[a..b],
                };
            }
            let refs = &refs[..bounds.len()];
            if let Some(first) = refs.first() {
                let expected = self.wal.last_index() + 1;
                if first.index != expected {
                    return Err(StorageError(format!(
                        "wal: entry {} does not follow the log's last index {}",
                        first.index,
                        expected - 1
                    )));
                }
            }
            let segments = self.wal.segment_count();
            let started = crate::io::Instant::now();
            self.wal.append(refs)?;
            if self.wal.segment_count() > segments {
                // Creating a segment (fallocate, fdatasync, rename, directory fsync)
                // blocks the loop: worth knowing when a turn was slow.
                let took = crate::io::Instant::now().saturating_duration_since(started);
                log::info!(
                    "wal: new segment at entry {} ({:.1} ms, blocking)",
                    refs[0].index,
                    took.as_secs_f64() * 1e3
                );
            }
        }
        Ok(())
    }

    fn write_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        // Term and vote must be durable before a vote or an ack leaves; the commit index
        // is only a hint (Raft relearns it), so a change of commit alone is not worth a
        // second fsync per turn: it rides along with the next term/vote change. The
        // recovery check "the log holds every committed entry" then uses an older
        // commit index: weaker, never wrong.
        let saved = self.pending_hard_state.unwrap_or_else(|| {
            let h = self.hard_state.get();
            HardState {
                term: h.term,
                vote: h.voted_for,
                commit: h.commit,
            }
        });
        if hs.term != saved.term || hs.vote != saved.vote {
            self.pending_hard_state = Some(*hs);
        }
        Ok(())
    }

    /// An installed snapshot: durable when this returns (see the module docs).
    fn write_snapshot(&mut self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        self.abandon_local_snapshot("a snapshot from the leader is installed");
        write_snapshot_file(&self.dir, meta, data)?;
        self.wal.compact(meta.index + 1)?;
        Ok(())
    }

    /// A local snapshot: written now, made durable by two flushes of its own (see the
    /// module docs).
    fn write_local_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.abandon_local_snapshot("a newer local snapshot replaces it");
        let started = crate::io::Instant::now();
        let tmp = self.dir.join(LOCAL_TMP);
        let mut file = File::create(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
        file.write_all(&snapshot_header(meta, data))
            .and_then(|()| file.write_all(data))
            .map_err(|e| io_err(&tmp, "write", e))?;
        self.local = Some(LocalSnapshot {
            meta: *meta,
            bytes: data.len(),
            stage: LocalStage::Data,
            file,
            flushing: false,
            started,
            write_ms: crate::io::Instant::now()
                .saturating_duration_since(started)
                .as_secs_f64()
                * 1e3,
            rename_ms: 0.0,
            data_flushed_ms: 0.0,
        });
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        assert!(
            self.sync.is_none(),
            "blocking sync while a split sync is in flight"
        );
        let start = crate::io::Instant::now();
        self.wal.sync()?;
        if let Some(hs) = self.pending_hard_state.take() {
            self.hard_state.save(WalHardState {
                term: hs.term,
                voted_for: hs.vote,
                commit: hs.commit,
            })?;
        }
        // A local snapshot in progress takes its remaining steps here, in order.
        assert!(
            !self.snapshot_flush_in_flight,
            "blocking sync while a snapshot flush is in flight"
        );
        while let Some((fd, full)) = self.snapshot_flush() {
            // The local snapshot keeps this descriptor open until its flush completed.
            if let Err(e) = flush_fd(fd, full) {
                self.sync_failed(&e);
            }
            self.snapshot_flushed()?;
        }
        self.last_sync_ns = Some(
            crate::io::Instant::now()
                .saturating_duration_since(start)
                .as_nanos() as u64,
        );
        Ok(())
    }
}

/// fsync(2) (`full`) or fdatasync(2) of an open descriptor, blocking.
fn flush_fd(fd: RawFd, full: bool) -> std::io::Result<()> {
    // SAFETY: fsync/fdatasync take no memory; an fd closed meanwhile gives EBADF, not UB.
    let rc = unsafe {
        if full {
            libc::fsync(fd)
        } else {
            libc::fdatasync(fd)
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the tmp files of snapshot writes a crash interrupted (the snapshot they were
/// to replace, or none, and the WAL hold that state).
fn remove_stray_tmp_files(dir: &Path) -> Result<(), StorageError> {
    for name in STRAY_TMP {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!(
                "storage: removed {} (a snapshot write was interrupted)",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, "remove", e)),
        }
    }
    Ok(())
}

/// The snapshot file's header: magic, version, index, term, data length, CRC of the
/// header fields and the data.
fn snapshot_header(meta: &SnapshotMeta, data: &[u8]) -> Vec<u8> {
    let mut header = Vec::with_capacity(SNAPSHOT_HEADER_BYTES);
    header.extend_from_slice(&SNAPSHOT_MAGIC);
    put_u32(&mut header, SNAPSHOT_VERSION);
    put_u64(&mut header, meta.index);
    put_u64(&mut header, meta.term);
    put_u32(&mut header, data.len() as u32);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(data);
    put_u32(&mut header, crc.finalize());
    header
}

/// Writes an installed snapshot durably: tmp file, fsync, rename, directory fsync.
fn write_snapshot_file(dir: &Path, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
    let tmp = dir.join(INSTALL_TMP);
    let path = dir.join(SNAPSHOT_FILE);
    let header = snapshot_header(meta, data);
    let t0 = crate::io::Instant::now();
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
    f.write_all(&header).map_err(|e| io_err(&tmp, "write", e))?;
    f.write_all(data).map_err(|e| io_err(&tmp, "write", e))?;
    let t1 = crate::io::Instant::now();
    f.sync_all().map_err(|e| io_err(&tmp, "fsync", e))?;
    drop(f);
    let t2 = crate::io::Instant::now();
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, "rename to", e))?;
    let t3 = crate::io::Instant::now();
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "fsync directory", e))?;
    let t4 = crate::io::Instant::now();
    let ms = |a: crate::io::Instant, b: crate::io::Instant| {
        b.saturating_duration_since(a).as_secs_f64() * 1e3
    };
    log::debug!(
        "storage: installed snapshot at {} ({} bytes): write {:.2} ms, fsync {:.2} ms, rename {:.2} ms, directory fsync {:.2} ms",
        meta.index,
        data.len(),
        ms(t0, t1),
        ms(t1, t2),
        ms(t2, t3),
        ms(t3, t4)
    );
    Ok(())
}

/// Reads the snapshot file; a missing file is no snapshot, a damaged one an error that
/// names the file and offset.
fn read_snapshot(path: &Path) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "read", e)),
    };
    let bad = |what: String| StorageError(format!("snapshot {}: {what}", path.display()));
    let mut r = Reader::new(&bytes);
    let magic = r
        .take("snapshot.magic", 4)
        .map_err(|e| bad(e.to_string()))?;
    if magic != SNAPSHOT_MAGIC {
        return Err(bad("bad magic at byte 0".into()));
    }
    let version = r.u32("snapshot.version").map_err(|e| bad(e.to_string()))?;
    if version != SNAPSHOT_VERSION {
        return Err(bad(format!("unsupported version {version} at byte 4")));
    }
    let index = r.u64("snapshot.index").map_err(|e| bad(e.to_string()))?;
    let term = r.u64("snapshot.term").map_err(|e| bad(e.to_string()))?;
    let len = r.u32("snapshot.len").map_err(|e| bad(e.to_string()))? as usize;
    let crc_at = r.offset();
    let crc = r.u32("snapshot.crc").map_err(|e| bad(e.to_string()))?;
    let data = r
        .take("snapshot.data", len)
        .map_err(|e| bad(e.to_string()))?;
    r.finish("snapshot").map_err(|e| bad(e.to_string()))?;
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..crc_at]);
    h.update(data);
    if h.finalize() != crc {
        return Err(bad(format!("checksum mismatch (stored at byte {crc_at})")));
    }
    Ok(Some((SnapshotMeta { index, term }, data.to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vigil-storage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn entry(index: u64) -> Entry {
        Entry {
            term: 1,
            index,
            kind: EntryKind::Normal,
            data: vec![index as u8; 10],
        }
    }

    #[test]
    fn recovers_entries_and_hard_state() {
        let dir = temp_dir("recover");
        {
            let (mut s, r) = Storage::open(&dir).unwrap();
            assert!(r.entries.is_empty());
            let es: Vec<Entry> = (1..=5).map(entry).collect();
            s.write_entries(1, EntriesView::from_slice(&es)).unwrap();
            s.write_hard_state(&HardState {
                term: 1,
                vote: 2,
                commit: 3,
            })
            .unwrap();
            s.sync().unwrap();
            // An overwrite from index 4 (a conflict above the commit) replaces the tail.
            let mut e4 = entry(4);
            e4.term = 2;
            s.write_entries(4, EntriesView::from_slice(&[e4])).unwrap();
            s.sync().unwrap();
        }
        let (_, r) = Storage::open(&dir).unwrap();
        assert_eq!(
            r.hard_state,
            HardState {
                term: 1,
                vote: 2,
                commit: 3
            }
        );
        assert_eq!(r.entries.len(), 4);
        assert_eq!(r.entries[3].term, 2);
        assert_eq!(r.entries[0], entry(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn flush(fds: &[(RawFd, bool)]) {
        for &(fd, full) in fds {
            // The storage keeps these descriptors open until complete_sync.
            flush_fd(fd, full).unwrap();
        }
    }

    #[test]
    fn split_sync_names_its_flushes_and_covers_what_was_written_before_it_began() {
        let dir = temp_dir("split");
        {
            let (mut s, _) = Storage::open(&dir).unwrap();
            let es: Vec<Entry> = (1..=5).map(entry).collect();
            s.write_entries(1, EntriesView::from_slice(&es)).unwrap();
            s.write_hard_state(&HardState {
                term: 1,
                vote: 2,
                commit: 5,
            })
            .unwrap();
            assert_eq!(
                s.begin_sync().unwrap(),
                2,
                "the WAL segment and the hard state"
            );
            let fds: Vec<(RawFd, bool)> = s.sync_targets().collect();
            assert_eq!(fds.len(), 2);
            // Writes go on while the flushes run; they belong to the next sync.
            s.write_entries(6, EntriesView::from_slice(&[entry(6)]))
                .unwrap();
            flush(&fds);
            assert_eq!(
                s.complete_sync().unwrap(),
                5,
                "entry 6 came after the begin"
            );
            assert_eq!(
                s.begin_sync().unwrap(),
                2,
                "the WAL segment and the spare segment made after the first sync; \
                 no new term or vote"
            );
            flush(&s.sync_targets().collect::<Vec<_>>());
            assert_eq!(s.complete_sync().unwrap(), 6);
            assert_eq!(s.begin_sync().unwrap(), 0, "nothing left to flush");
            assert_eq!(s.complete_sync().unwrap(), 6);
        }
        let (_, r) = Storage::open(&dir).unwrap();
        // The hard state's flush ran beside the WAL's, so its commit index was cut to
        // what the log held durably before that sync (nothing): recovery never sees a
        // commit index beyond the log.
        assert_eq!(
            r.hard_state,
            HardState {
                term: 1,
                vote: 2,
                commit: 0
            }
        );
        assert_eq!(r.entries.len(), 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_to_start_when_committed_entries_are_missing() {
        let dir = temp_dir("lost");
        {
            let (mut s, _) = Storage::open(&dir).unwrap();
            let es: Vec<Entry> = (1..=5).map(entry).collect();
            s.write_entries(1, EntriesView::from_slice(&es)).unwrap();
            s.write_hard_state(&HardState {
                term: 1,
                vote: 1,
                commit: 5,
            })
            .unwrap();
            s.sync().unwrap();
        }
        {
            // The log loses its last two entries (as a cut torn tail would).
            let mut wal = Wal::open(dir.join("wal"), limits::WAL_OPTIONS).unwrap();
            wal.truncate_suffix(4).unwrap();
            wal.sync().unwrap();
        }
        let err = match Storage::open(&dir) {
            Ok(_) => panic!("started although committed entries 4 and 5 are gone"),
            Err(e) => e,
        };
        assert!(err.0.contains("refusing to start"), "{err}");
        assert!(err.0.contains("up to 5"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Entries 1..=10 durable, and a snapshot at 3 done by the blocking path.
    fn storage_with_old_snapshot(dir: &Path) -> Storage {
        let (mut s, _) = Storage::open(dir).unwrap();
        let es: Vec<Entry> = (1..=10).map(entry).collect();
        s.write_entries(1, EntriesView::from_slice(&es)).unwrap();
        s.sync().unwrap();
        s.write_local_snapshot(&SnapshotMeta { index: 3, term: 1 }, b"state-3")
            .unwrap();
        s.sync().unwrap();
        assert!(!s.snapshot_in_progress());
        assert_eq!(s.wal.first_index(), 4);
        // The compaction record, and the spare segment the WAL made: durable too, so
        // that the syncs below flush only what the snapshot needs.
        s.sync().unwrap();
        s
    }

    /// The stages of a local snapshot at 6, as the node runs them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd)]
    enum Stage {
        Written,
        DataFlushing,
        Renamed,
        DirectoryFlushing,
        Done,
    }
    const STAGES: [Stage; 5] = [
        Stage::Written,
        Stage::DataFlushing,
        Stage::Renamed,
        Stage::DirectoryFlushing,
        Stage::Done,
    ];

    /// Runs a local snapshot at 6 up to `stage`, as the node does; returns the snapshot
    /// flush in flight, if any.
    fn local_snapshot_to(s: &mut Storage, stage: Stage) -> Option<(RawFd, bool)> {
        let dir = s.dir.clone();
        s.write_local_snapshot(&SnapshotMeta { index: 6, term: 1 }, b"state-6")
            .unwrap();
        assert!(s.snapshot_in_progress());
        assert!(dir.join(LOCAL_TMP).exists());
        // The WAL's syncs carry nothing of it (no commit waits for the snapshot).
        assert_eq!(s.begin_sync().unwrap(), 0);
        s.complete_sync().unwrap();
        if stage == Stage::Written {
            return None;
        }
        let data = s.snapshot_flush().expect("the data flush");
        assert!(!data.1, "the data flush is a fdatasync");
        assert_eq!(s.snapshot_flush(), None, "one snapshot flush at a time");
        if stage == Stage::DataFlushing {
            return Some(data);
        }
        flush(&[data]);
        s.snapshot_flushed().unwrap();
        assert!(!dir.join(LOCAL_TMP).exists());
        assert_eq!(
            read_snapshot(&dir.join(SNAPSHOT_FILE))
                .unwrap()
                .unwrap()
                .0
                .index,
            6,
            "renamed once its data was durable"
        );
        assert_eq!(s.wal.first_index(), 4, "the WAL keeps everything meanwhile");
        assert!(s.snapshot_in_progress());
        if stage == Stage::Renamed {
            return None;
        }
        let directory = s.snapshot_flush().expect("the directory flush");
        assert!(directory.1, "the directory gets a full fsync");
        if stage == Stage::DirectoryFlushing {
            return Some(directory);
        }
        flush(&[directory]);
        s.snapshot_flushed().unwrap();
        assert!(!s.snapshot_in_progress());
        assert_eq!(s.snapshot_flush(), None);
        assert_eq!(
            s.wal.first_index(),
            7,
            "compacted after the directory flush"
        );
        None
    }

    #[test]
    fn a_local_snapshot_takes_two_flushes_and_a_crash_at_any_stage_recovers_every_entry() {
        for stage in STAGES {
            let dir = temp_dir(&format!("local-{stage:?}"));
            {
                let mut s = storage_with_old_snapshot(&dir);
                // A crash below: the storage goes away with whatever flush is in flight.
                let _in_flight = local_snapshot_to(&mut s, stage);
                if stage < Stage::Renamed {
                    assert_eq!(
                        read_snapshot(&dir.join(SNAPSHOT_FILE))
                            .unwrap()
                            .unwrap()
                            .0
                            .index,
                        3,
                        "{stage:?}: the snapshot was replaced before its data was durable"
                    );
                }
            }
            let (s, r) = Storage::open(&dir).unwrap();
            let (meta, data) = r.snapshot.expect("a snapshot");
            let expected: (u64, &[u8]) = if stage < Stage::Renamed {
                (3, b"state-3")
            } else {
                (6, b"state-6")
            };
            assert_eq!((meta.index, data.as_slice()), expected, "{stage:?}");
            let indexes: Vec<Index> = r.entries.iter().map(|e| e.index).collect();
            assert_eq!(
                indexes,
                (expected.0 + 1..=10).collect::<Vec<_>>(),
                "{stage:?}: every entry after the recovered snapshot"
            );
            assert_eq!(r.entries.last(), Some(&entry(10)));
            assert!(!dir.join(LOCAL_TMP).exists(), "{stage:?}: stray tmp kept");
            assert!(!s.snapshot_in_progress());
            drop(s);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn an_install_during_a_local_snapshot_wins() {
        for stage in &STAGES[..4] {
            let stage = *stage;
            let dir = temp_dir(&format!("install-{stage:?}"));
            {
                let mut s = storage_with_old_snapshot(&dir);
                let in_flight = local_snapshot_to(&mut s, stage);
                s.write_snapshot(&SnapshotMeta { index: 20, term: 2 }, b"installed")
                    .unwrap();
                assert!(!s.snapshot_in_progress(), "{stage:?}: the local one goes");
                assert!(!dir.join(LOCAL_TMP).exists(), "{stage:?}");
                if let Some(fd) = in_flight {
                    // The ring still flushes the abandoned file: its descriptor stays
                    // valid until the flush completed (flush asserts success).
                    assert_eq!(s.snapshot_flush(), None, "one flush at a time");
                    flush(&[fd]);
                    s.snapshot_flushed().unwrap();
                }
                assert_eq!(s.snapshot_flush(), None, "nothing left to flush");
                s.write_entries(21, EntriesView::from_slice(&[entry(21)]))
                    .unwrap();
                s.begin_sync().unwrap();
                flush(&s.sync_targets().collect::<Vec<_>>());
                s.complete_sync().unwrap();
                let (meta, _) = read_snapshot(&dir.join(SNAPSHOT_FILE)).unwrap().unwrap();
                assert_eq!(meta.index, 20, "{stage:?}: the install was replaced");
            }
            let (_, r) = Storage::open(&dir).unwrap();
            let (meta, data) = r.snapshot.expect("a snapshot");
            assert_eq!(
                (meta.index, meta.term, data.as_slice()),
                (20, 2, &b"installed"[..]),
                "{stage:?}"
            );
            assert_eq!(r.entries, vec![entry(21)], "{stage:?}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_newer_local_snapshot_replaces_one_in_progress() {
        let dir = temp_dir("local-twice");
        {
            let mut s = storage_with_old_snapshot(&dir);
            let in_flight = local_snapshot_to(&mut s, Stage::DataFlushing);
            s.write_local_snapshot(&SnapshotMeta { index: 8, term: 1 }, b"state-8")
                .unwrap();
            assert_eq!(s.snapshot_flush(), None, "the abandoned flush still runs");
            flush(&[in_flight.unwrap()]);
            s.snapshot_flushed().unwrap();
            assert!(
                read_snapshot(&dir.join(SNAPSHOT_FILE))
                    .unwrap()
                    .unwrap()
                    .0
                    .index
                    == 3,
                "the abandoned snapshot's flush renamed something"
            );
            s.sync().unwrap();
            assert_eq!(s.wal.first_index(), 9);
        }
        let (_, r) = Storage::open(&dir).unwrap();
        assert_eq!(r.snapshot.unwrap().1, b"state-8");
        assert_eq!(r.entries, vec![entry(9), entry(10)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_blocking_sync_finishes_a_local_snapshot() {
        let dir = temp_dir("local-blocking");
        {
            let mut s = storage_with_old_snapshot(&dir);
            s.write_local_snapshot(&SnapshotMeta { index: 6, term: 1 }, b"state-6")
                .unwrap();
            s.write_entries(11, EntriesView::from_slice(&[entry(11)]))
                .unwrap();
            s.sync().unwrap();
            assert!(!s.snapshot_in_progress());
            assert!(!dir.join(LOCAL_TMP).exists());
            assert_eq!(s.wal.first_index(), 7);
        }
        let (_, r) = Storage::open(&dir).unwrap();
        assert_eq!(r.snapshot.unwrap().1, b"state-6");
        assert_eq!(r.entries.len(), 5);
        assert_eq!(r.entries.last(), Some(&entry(11)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_removes_stray_tmp_files() {
        let dir = temp_dir("stray");
        drop(storage_with_old_snapshot(&dir));
        for name in STRAY_TMP {
            std::fs::write(dir.join(name), b"half a snapshot").unwrap();
        }
        let (_, r) = Storage::open(&dir).unwrap();
        for name in STRAY_TMP {
            assert!(!dir.join(name).exists(), "{name} kept");
        }
        assert_eq!(r.snapshot.unwrap().1, b"state-3");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshot_file_round_trip_and_damage() {
        let dir = std::env::temp_dir().join(format!("vigil-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let meta = SnapshotMeta { index: 9, term: 2 };
        write_snapshot_file(&dir, &meta, b"state").unwrap();
        let (m, d) = read_snapshot(&dir.join("snapshot")).unwrap().unwrap();
        assert_eq!((m, d.as_slice()), (meta, &b"state"[..]));
        let mut bytes = std::fs::read(dir.join("snapshot")).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(dir.join("snapshot"), &bytes).unwrap();
        let e = read_snapshot(&dir.join("snapshot")).unwrap_err();
        assert!(e.0.contains("checksum"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
