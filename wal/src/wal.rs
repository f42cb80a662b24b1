//! The log: append, sync (blocking or split for io_uring), read, truncate, compact, and
//! recovery on open.
//!
//! The log is append-only on disk. A Raft conflict (`truncate_suffix`) and a snapshot
//! (`compact`) are records too, so no byte that may already be durable is ever
//! overwritten, and a crash at any moment leaves a prefix of what was written plus, at
//! most, a torn tail. Replay on open applies the records in order.

use std::collections::VecDeque;
use std::fs;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::{
    self, position, ForwardScan, RecordHeader, RecordKind, ScanEnd, MAX_RECORD_OVERHEAD,
    RECORD_ALIGN, RECORD_HEADER_LEN,
};
use crate::segment::{self, Segment, Spare};
use crate::sys;

/// Sizes of the log. The agent fills these from `src/limits.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalOptions {
    /// Size of each segment file.
    pub segment_bytes: u64,
    /// Bytes reserved at the start of each segment for its header (records follow).
    pub segment_header_bytes: u64,
    /// Largest payload of one entry.
    pub max_entry_bytes: u32,
    /// Index of the first entry of a brand-new log.
    pub first_index: u64,
}

impl WalOptions {
    /// Checks that the sizes fit together and the format.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidOptions(what));
        if !(format::MIN_SEGMENT_BYTES..=format::MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return bad(format!("segment_bytes {} out of range", self.segment_bytes));
        }
        if self.segment_header_bytes < format::SEGMENT_HEADER_LEN as u64
            || self.segment_header_bytes % RECORD_ALIGN as u64 != 0
            || self.segment_header_bytes > u32::MAX as u64
        {
            return bad(format!(
                "segment_header_bytes {} (at least {}, a multiple of {RECORD_ALIGN})",
                self.segment_header_bytes,
                format::SEGMENT_HEADER_LEN
            ));
        }
        let largest = self.max_entry_bytes as u64 + MAX_RECORD_OVERHEAD as u64;
        if self.segment_header_bytes + largest + RECORD_HEADER_LEN as u64 > self.segment_bytes {
            return bad(format!(
                "an entry of {} bytes does not fit a segment of {} bytes",
                self.max_entry_bytes, self.segment_bytes
            ));
        }
        if self.first_index == 0 {
            return bad("first_index must be at least 1".to_string());
        }
        Ok(())
    }
}

/// One log entry, borrowed: for appending, and as returned by reads (then `payload` is a
/// slice of the mapped segment, no copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub index: u64,
    pub term: u64,
    pub payload: &'a [u8],
}

/// A file descriptor and byte range that must be flushed with fdatasync (for example an
/// io_uring `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`) for an in-flight sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncTarget {
    pub fd: RawFd,
    pub offset: u64,
    pub len: u64,
    /// Flush with a full fsync, not fdatasync: this is the log's directory (a segment
    /// renamed into place, or removed, must have its name made durable).
    pub full_fsync: bool,
}

/// Names one in-flight sync; hand it back to [`Wal::complete_sync`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an in-flight sync must be completed"]
pub struct SyncToken {
    id: u64,
}

/// What recovery found and repaired on open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The log ended in a torn (partly written, never synced) tail that was cut off.
    pub torn_tail: Option<TornTail>,
}

/// A torn tail cut off during recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    pub offset: u64,
    /// Non-zero bytes wiped after `offset` in that segment.
    pub wiped_bytes: u64,
    /// Later segment files deleted because they lay wholly after the tear.
    pub removed_segments: Vec<PathBuf>,
}

struct InFlight {
    id: u64,
    upto_pos: u64,
    upto_index: u64,
    from_seq: u64,
    to_seq: u64,
    to_offset: usize,
    /// The spare segment file is flushed too (its allocation and size).
    spare: bool,
    /// The directory is fsynced too (segment names changed since the last sync).
    dir: bool,
}

/// The write-ahead log. Single-threaded: one owner calls everything. Dropping it does not
/// sync: what was appended after the last sync may or may not survive a crash.
///
/// Group commit from an event loop: each turn, `append` every batch the turn produced,
/// then sync ONCE. Blocking: `sync()`. With io_uring: `begin_sync()` captures what is
/// written so far, `sync_targets()` gives the descriptors to submit as fdatasync (fsync
/// where `full_fsync`: the directory), and when all of them completed successfully,
/// `complete_sync(token)`; `synced_index()` then says what is durable. Appends, truncations and compactions may continue while a sync is in
/// flight; they are covered by the next one. Segment files are deleted only inside
/// `complete_sync`/`sync`, so a descriptor handed out stays valid while its flush runs.
///
/// Files besides the segments, both deleted on open: `{seq}.seg.tmp` is the next
/// segment made ahead of need (the spare; a rollover writes and flushes its header and
/// renames it, and the sync after fsyncs the directory), `{seq}.seg.del` a segment
/// removed from the log and being freed a slice per sync (one unlink of 64 MiB stalled
/// the loop for 50-120 ms).
/// If a flush fails, the caller must not retry: `Wal::sync_failed` logs and aborts.
pub struct Wal {
    dir: PathBuf,
    /// The directory, held open with an exclusive flock: one process per log. Its
    /// descriptor is also the sync target that makes segment names durable.
    lock: std::fs::File,
    /// The next segment's file, made ahead of need (see `Spare`).
    spare: Option<Spare>,
    /// A segment was renamed into place or removed since the last sync began: the next
    /// sync fsyncs the directory.
    dir_unsynced: bool,
    /// Segments removed from the log (renamed `*.seg.del`), freed a slice per sync.
    trash: VecDeque<Trash>,
    /// True inside `Wal::open`: removals happen at once there.
    opening: bool,
    /// The segment for which making a spare failed (tried once per segment, so a full
    /// disk does not log at every sync).
    spare_failed: Option<u64>,
    opts: WalOptions,
    segments: VecDeque<Segment>,
    first_index: u64,
    next_index: u64,
    /// Log position before which everything is durable.
    durable_pos: u64,
    synced_index: u64,
    in_flight: Option<InFlight>,
    next_sync_id: u64,
    /// End position, segment and index of the latest Compact record not yet durable.
    compact_pending: Option<(u64, u64, u64)>,
    /// Segment and index of the latest durable Compact record.
    compact_durable: Option<(u64, u64)>,
    /// End position and segment of the latest record that left the log empty (a compact
    /// at or past the end, a truncate to the first index), not yet durable.
    reset_pending: Option<(u64, u64)>,
    /// Segment of the latest durable such record: nothing before it is needed.
    reset_durable: Option<u64>,
    recovery: RecoveryReport,
    /// Record headers staged for the write segment (records start at its `write_pos`),
    /// not yet written. Payloads are not copied: `write_staged` hands pwritev the
    /// headers and the caller's payload slices.
    staged_heads: Vec<u8>,
    staged_parts: Vec<StagedPart>,
    /// On-disk bytes of the staged records (headers, payloads, padding).
    staged_len: usize,
    /// While replaying segment k on open: k + 1, the segments replayed so far (the later
    /// ones are not part of the log yet). None afterwards.
    replay_limit: Option<usize>,
}

const SEAL_LEN: usize = RECORD_HEADER_LEN;
/// Bytes of a removed segment freed per sync (see `Wal::reclaim_step`): 64 MiB in 16
/// steps of a few milliseconds instead of one unlink of 50-120 ms.
const RECLAIM_STEP_BYTES: u64 = 4 << 20;

/// A segment file removed from the log, being freed.
struct Trash {
    file: std::fs::File,
    path: PathBuf,
    freed: u64,
    len: u64,
    /// Longest step so far, for the log.
    longest: std::time::Duration,
}
/// Records the staging buffers hold before growing (to the largest batch appended).
const STAGE_RECORDS: usize = 1024;
/// iovecs per pwritev call (each record takes up to three: header, payload, padding).
const MAX_IOV: usize = 384;

/// One staged record: its header in `staged_heads`, its payload (if any) the payload of
/// entry `entry` of the batch being appended.
struct StagedPart {
    head_at: usize,
    entry: Option<usize>,
    payload_len: usize,
}
/// Raft indexes stay far below this; larger ones on disk are corruption (and could
/// overflow index arithmetic).
const MAX_INDEX: u64 = u64::MAX / 4;
/// Log positions keep the segment sequence in 32 bits.
const MAX_SEGMENT_SEQ: u64 = u32::MAX as u64;

/// Maps in the rest of a segment from `offset` in one call before the forward scan reads
/// it (much cheaper than a page fault per page on a 64 MiB tail). Only an optimisation:
/// kernels without MADV_POPULATE_READ (before 5.14) just fault as they read.
fn prefault(seg: &Segment, offset: usize) {
    let start = offset / 4096 * 4096;
    let _ = seg
        .map
        .advise_range(memmap2::Advice::PopulateRead, start, seg.map.len() - start);
}

impl Wal {
    /// Opens the log in `dir` (created if missing), recovering from whatever a crash left:
    /// a torn tail is cut off and reported in [`Wal::recovery`]; damage anywhere else is
    /// an [`Error::Corrupt`] naming the file and byte offset, and nothing is changed.
    pub fn open(dir: impl AsRef<Path>, opts: WalOptions) -> Result<Wal> {
        opts.validate()?;
        let dir = dir.as_ref().to_path_buf();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create directory", e))?;
            // The new directory's own name must survive a crash too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sys::fsync_dir_or_abort(parent)?;
            }
        }
        let lock = sys::lock_dir(&dir)?;
        let mut seqs = Vec::new();
        for item in fs::read_dir(&dir).map_err(|e| Error::io(&dir, "read directory", e))? {
            let item = item.map_err(|e| Error::io(&dir, "read directory", e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".seg.tmp") || name.ends_with(".seg.del") {
                // A segment whose creation did not finish: never part of the log.
                let path = item.path();
                fs::remove_file(&path).map_err(|e| Error::io(&path, "remove", e))?;
            } else if let Some(seq) = segment::parse_file_name(name) {
                if seq >= MAX_SEGMENT_SEQ {
                    let path = item.path();
                    return Err(Error::corrupt(
                        path,
                        0,
                        "segment sequence number out of range",
                    ));
                }
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        for pair in seqs.windows(2) {
            if pair[1] != pair[0] + 1 {
                return Err(Error::MissingSegment {
                    dir,
                    seq: pair[0] + 1,
                });
            }
        }
        let mut segments = VecDeque::with_capacity(seqs.len() + 1);
        for &seq in &seqs {
            segments.push_back(Segment::open(dir.join(segment::file_name(seq)), seq)?);
        }
        let mut wal = Wal {
            dir,
            lock,
            spare: None,
            dir_unsynced: false,
            trash: VecDeque::new(),
            opening: true,
            spare_failed: None,
            opts,
            segments,
            first_index: opts.first_index,
            next_index: opts.first_index,
            durable_pos: 0,
            synced_index: 0,
            in_flight: None,
            next_sync_id: 1,
            compact_pending: None,
            compact_durable: None,
            reset_pending: None,
            reset_durable: None,
            recovery: RecoveryReport::default(),
            replay_limit: None,
            staged_heads: Vec::with_capacity(STAGE_RECORDS * RECORD_HEADER_LEN),
            staged_parts: Vec::with_capacity(STAGE_RECORDS),
            staged_len: 0,
        };
        wal.replay()?;
        if wal.segments.back().is_none_or(|s| s.sealed) {
            let seq = wal.segments.back().map_or(0, |s| s.seq + 1);
            let seg = Segment::create(
                &wal.dir,
                seq,
                wal.next_index,
                wal.opts.segment_bytes,
                wal.opts.segment_header_bytes as u32,
            )?;
            wal.segments.push_back(seg);
        }
        // What we recovered may sit only in the page cache (the previous process died
        // before syncing): flush it before calling it durable.
        for seg in &mut wal.segments {
            sys::fdatasync_or_abort(&seg.file, &seg.path);
            seg.synced_pos = seg.write_pos;
        }
        sys::fsync_dir_or_abort(&wal.dir)?;
        wal.durable_pos = wal.write_position();
        wal.synced_index = wal.last_index();
        // Everything replayed is durable now: drop segments replay showed unneeded.
        wal.delete_compacted()?;
        if std::mem::take(&mut wal.dir_unsynced) {
            sys::fsync_dir_or_abort(&wal.dir)?;
        }
        wal.opening = false;
        if let Some(seg) = wal.segments.back_mut() {
            let want = (seg.map.len() - seg.header.data_offset as usize) / RECORD_HEADER_LEN;
            seg.offsets
                .reserve_exact(want.saturating_sub(seg.offsets.len()));
        }
        Ok(wal)
    }

    /// Rebuilds the in-memory index from the segments; see the module docs of `format`
    /// for how a torn tail is told from corruption.
    fn replay(&mut self) -> Result<()> {
        let count = self.segments.len();
        let mut k = 0;
        while k < count {
            let seg = &self.segments[k];
            let first = seg.header.first_index;
            if !(1..=MAX_INDEX).contains(&first) {
                return Err(Error::corrupt(
                    &seg.path,
                    24,
                    format!("segment first index {first} out of range"),
                ));
            }
            if k == 0 {
                self.first_index = first;
                self.next_index = first;
            } else if first != self.next_index {
                return Err(Error::corrupt(
                    &seg.path,
                    24,
                    format!(
                        "segment starts at index {first} but the log continues at {}",
                        self.next_index
                    ),
                ));
            }
            self.segments[k].first_live = first;
            self.replay_limit = Some(k + 1);
            let end = self.replay_segment(k);
            self.replay_limit = None;
            let end = end?;
            match end {
                ScanEnd::Sealed { offset } => {
                    let seg = &mut self.segments[k];
                    seg.write_pos = offset + SEAL_LEN;
                    seg.sealed = true;
                    seg.offsets.shrink_to_fit();
                    k += 1;
                }
                ScanEnd::Stopped { offset, why } => {
                    self.end_of_log(k, offset, why)?;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Applies the records of segment `k` in order; returns how its scan ended.
    fn replay_segment(&mut self, k: usize) -> Result<ScanEnd> {
        let seq = self.segments[k].seq;
        let data_offset = self.segments[k].header.data_offset as usize;
        let mut offset = data_offset;
        loop {
            let decoded = format::decode_record(&self.segments[k].map, seq, offset);
            let record = match decoded {
                Ok(r) => (r.header, r.len),
                Err(why) => return Ok(ScanEnd::Stopped { offset, why }),
            };
            let (header, len) = record;
            let here = position(seq, offset as u64);
            if header.synced_to > here {
                return Err(Error::corrupt(
                    &self.segments[k].path,
                    offset as u64,
                    "record claims durability beyond itself",
                ));
            }
            let path = &self.segments[k].path;
            let bounded = (1..=MAX_INDEX).contains(&header.index);
            if header.kind != RecordKind::Seal && !bounded {
                return Err(Error::corrupt(
                    path,
                    offset as u64,
                    format!("record index {} out of range", header.index),
                ));
            }
            match header.kind {
                RecordKind::Seal => return Ok(ScanEnd::Sealed { offset }),
                RecordKind::Entry => {
                    if header.index != self.next_index {
                        return Err(Error::corrupt(
                            path,
                            offset as u64,
                            format!(
                                "entry index {} where the log continues at {}",
                                header.index, self.next_index
                            ),
                        ));
                    }
                    let seg = &mut self.segments[k];
                    if seg.offsets.is_empty() {
                        seg.first_live = header.index;
                    }
                    seg.offsets.push(offset as u32);
                    seg.max_entry_index = Some(header.index);
                    self.next_index += 1;
                }
                RecordKind::Truncate => {
                    if header.index > self.next_index {
                        return Err(Error::corrupt(
                            path,
                            offset as u64,
                            format!(
                                "truncate at {} beyond the log end {}",
                                header.index, self.next_index
                            ),
                        ));
                    }
                    self.apply_truncate(header.index);
                    if self.first_index == self.next_index {
                        self.reset_durable = Some(seq);
                    }
                }
                RecordKind::Compact => {
                    self.apply_compact(header.index);
                    self.compact_durable = Some((seq, header.index));
                    if self.first_index == self.next_index {
                        self.reset_durable = Some(seq);
                    }
                }
            }
            offset += len;
        }
    }

    /// The scan of segment `k` stopped at `offset`: decide torn tail or corruption.
    fn end_of_log(&mut self, k: usize, offset: usize, why: format::RecordError) -> Result<()> {
        let seg = &self.segments[k];
        prefault(seg, offset);
        let mut later = format::forward_scan(&seg.map, seg.seq, offset + RECORD_ALIGN);
        let own_nonzero = later.nonzero_end;
        for other in self.segments.iter().skip(k + 1) {
            prefault(other, 0);
            let scan =
                format::forward_scan(&other.map, other.seq, other.header.data_offset as usize);
            // Only claims matter here: later segments are removed whole, not wiped.
            later.merge(ForwardScan {
                max_synced_to: scan.max_synced_to,
                nonzero_end: None,
            });
        }
        let stop = position(seg.seq, offset as u64);
        if later.max_synced_to.is_some_and(|claim| claim > stop) {
            return Err(Error::corrupt(
                &seg.path,
                offset as u64,
                format!("{why}, and later records show this part of the log was synced"),
            ));
        }
        // Also count the bytes of the bad record itself (forward scan began after it).
        let head_nonzero = seg
            .map
            .get(offset..(offset + RECORD_ALIGN).min(seg.map.len()))
            .is_some_and(|b| b.iter().any(|&x| x != 0));
        let wipe_end = own_nonzero.unwrap_or(if head_nonzero {
            offset + RECORD_ALIGN
        } else {
            offset
        });
        let wipe_end = wipe_end.min(seg.map.len());
        if seg.map.len() - offset < SEAL_LEN {
            // The writer always leaves room for a Seal record.
            return Err(Error::corrupt(
                &seg.path,
                offset as u64,
                "records run into the space reserved for the seal record",
            ));
        }
        let mut removed = Vec::new();
        while self.segments.len() > k + 1 {
            let gone = self.segments.pop_back().expect("segments past k exist");
            let path = gone.path.clone();
            drop(gone);
            fs::remove_file(&path).map_err(|e| Error::io(&path, "remove", e))?;
            removed.push(path);
        }
        let seg = &mut self.segments[k];
        seg.write_pos = offset;
        if wipe_end > offset || !removed.is_empty() {
            // Wipe the torn bytes, so records of the torn batch that happen to be intact
            // can never line up behind later appends and be read as part of the log.
            seg.write_at(&vec![0u8; wipe_end - offset], offset);
            sys::fdatasync_or_abort(&seg.file, &seg.path);
            if !removed.is_empty() {
                sys::fsync_dir_or_abort(&self.dir)?;
            }
            log::warn!(
                "WAL {}: torn tail at byte offset {offset} ({why}); wiped {} bytes, removed {} later segment(s)",
                seg.path.display(),
                wipe_end - offset,
                removed.len()
            );
            self.recovery.torn_tail = Some(TornTail {
                path: seg.path.clone(),
                offset: offset as u64,
                wiped_bytes: (wipe_end - offset) as u64,
                removed_segments: removed,
            });
        }
        Ok(())
    }

    /// What recovery found on open.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Index of the first entry (when empty: the index the next entry will have).
    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    /// Index of the last entry (`first_index() - 1` when empty).
    pub fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    /// Every entry with index <= this is durable (or was removed by a durable record).
    pub fn synced_index(&self) -> u64 {
        self.synced_index
    }

    /// Number of segment files in use.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn write_segment(&self) -> &Segment {
        self.segments
            .back()
            .expect("the log always has a write segment")
    }

    fn write_position(&self) -> u64 {
        let seg = self.write_segment();
        position(seg.seq, seg.write_pos as u64)
    }

    // ---- reads -------------------------------------------------------------------

    fn locate(&self, index: u64) -> Option<(&Segment, usize)> {
        if index < self.first_index || index >= self.next_index {
            return None;
        }
        let k = self.segments.partition_point(|s| s.end_live() <= index);
        let seg = self.segments.get(k)?;
        assert!(seg.first_live <= index && index < seg.end_live());
        Some((seg, seg.offsets[(index - seg.first_live) as usize] as usize))
    }

    /// The entry at `index`, its payload a slice of the mapped segment.
    pub fn entry(&self, index: u64) -> Option<EntryRef<'_>> {
        let (seg, offset) = self.locate(index)?;
        let (at, term, payload) = format::peek_record(&seg.map, offset)?;
        assert_eq!(at, index, "WAL index points at the wrong record");
        Some(EntryRef {
            index,
            term,
            payload,
        })
    }

    /// The term of the entry at `index`.
    pub fn term(&self, index: u64) -> Option<u64> {
        self.entry(index).map(|e| e.term)
    }

    /// The entries with indexes in `range`, in order; None unless the whole range lies in
    /// `first_index()..=last_index()` (an empty range at `last_index() + 1` is fine).
    pub fn entries(&self, range: Range<u64>) -> Option<impl Iterator<Item = EntryRef<'_>> + '_> {
        if range.start > range.end || range.start < self.first_index || range.end > self.next_index
        {
            return None;
        }
        Some(range.map(move |i| self.entry(i).expect("index in range")))
    }

    // ---- writes ------------------------------------------------------------------

    /// Appends a batch of entries; the first must have index `last_index() + 1` and the
    /// rest follow without gaps. Written to the map only: call a sync to make it durable.
    /// All or nothing: if a new segment cannot be created (disk full), nothing of the
    /// batch is appended and the error says why.
    pub fn append(&mut self, entries: &[EntryRef<'_>]) -> Result<()> {
        for (index, e) in (self.next_index..).zip(entries) {
            if e.index != index {
                return Err(Error::InvalidArgument(format!(
                    "append: entry index {} where the log continues at {index}",
                    e.index
                )));
            }
            if e.payload.len() > self.opts.max_entry_bytes as usize {
                return Err(Error::InvalidArgument(format!(
                    "append: entry {} has {} bytes, the limit is {}",
                    e.index,
                    e.payload.len(),
                    self.opts.max_entry_bytes
                )));
            }
        }
        let lens = entries
            .iter()
            .map(|e| (e.index, format::record_len(e.payload.len())));
        let mut spare = self.prepare_segments(lens)?;
        for (i, e) in entries.iter().enumerate() {
            let header = RecordHeader {
                kind: RecordKind::Entry,
                index: e.index,
                term: e.term,
                synced_to: self.durable_pos,
            };
            let offset = self.stage_record(&mut spare, &header, entries, Some(i));
            let seg = self.segments.back_mut().expect("write segment");
            if seg.offsets.is_empty() {
                seg.first_live = e.index;
            }
            seg.offsets.push(offset as u32);
            seg.max_entry_index = Some(e.index);
            self.next_index += 1;
        }
        self.write_staged(entries);
        assert!(spare.is_empty(), "every prepared segment is used");
        Ok(())
    }

    /// Removes the entries with index >= `index` (a Raft conflict). `index` must lie in
    /// `first_index()..=last_index() + 1`. Durable with the next sync; until then a crash
    /// may bring the removed entries back (which Raft tolerates: they were never acked as
    /// durable beyond `synced_index()`, which drops to `index - 1` now).
    pub fn truncate_suffix(&mut self, index: u64) -> Result<()> {
        if index < self.first_index || index > self.next_index {
            return Err(Error::InvalidArgument(format!(
                "truncate_suffix({index}) outside {}..={}",
                self.first_index, self.next_index
            )));
        }
        if index == self.next_index {
            return Ok(());
        }
        self.write_meta(RecordKind::Truncate, index)?;
        self.apply_truncate(index);
        self.note_reset();
        self.synced_index = self.synced_index.min(index - 1);
        if let Some(f) = &mut self.in_flight {
            f.upto_index = f.upto_index.min(index - 1);
        }
        Ok(())
    }

    /// Drops the entries with index < `index` (their effect is in a durable snapshot).
    /// Segments holding only dropped entries are deleted after the next sync made this
    /// durable. An `index` past the end empties the log, which continues at `index`.
    pub fn compact(&mut self, index: u64) -> Result<()> {
        if index <= self.first_index {
            return Ok(());
        }
        self.write_meta(RecordKind::Compact, index)?;
        self.apply_compact(index);
        let seq = self.write_segment().seq;
        self.compact_pending = Some((self.write_position(), seq, index));
        self.note_reset();
        Ok(())
    }

    /// After a record that may have emptied the log: once durable, no earlier segment is
    /// needed by replay (which starts from an empty log there whatever came before).
    fn note_reset(&mut self) {
        if self.first_index == self.next_index {
            let seq = self.write_segment().seq;
            self.reset_pending = Some((self.write_position(), seq));
        }
    }

    fn write_meta(&mut self, kind: RecordKind, index: u64) -> Result<()> {
        let mut spare =
            self.prepare_segments(std::iter::once((self.next_index, RECORD_HEADER_LEN)))?;
        let header = RecordHeader {
            kind,
            index,
            term: 0,
            synced_to: self.durable_pos,
        };
        self.stage_record(&mut spare, &header, &[], None);
        self.write_staged(&[]);
        assert!(spare.is_empty());
        Ok(())
    }

    /// Creates, before anything is written, every segment that records of the given
    /// lengths will roll over into (so a failure leaves the log untouched).
    fn prepare_segments(
        &mut self,
        records: impl Iterator<Item = (u64, usize)>,
    ) -> Result<VecDeque<Segment>> {
        let mut room = self.room();
        let mut seq = self.write_segment().seq;
        let mut spare: VecDeque<Segment> = VecDeque::new();
        let capacity = self.opts.segment_bytes as usize - self.opts.segment_header_bytes as usize;
        for (index, len) in records {
            if len + SEAL_LEN > room {
                seq += 1;
                let made = if spare.is_empty() {
                    self.segment_from_spare(seq, index)
                } else {
                    None
                };
                let made = match made {
                    Some(seg) => seg,
                    None => Segment::create(
                        &self.dir,
                        seq,
                        index,
                        self.opts.segment_bytes,
                        self.opts.segment_header_bytes as u32,
                    ),
                };
                match made {
                    Ok(seg) => spare.push_back(seg),
                    Err(e) => {
                        for seg in spare.drain(..) {
                            let path = seg.path.clone();
                            drop(seg);
                            let _ = fs::remove_file(&path);
                        }
                        return Err(e);
                    }
                }
                room = capacity;
            }
            assert!(
                len + SEAL_LEN <= room,
                "options guarantee a record fits a segment"
            );
            room -= len;
        }
        Ok(spare)
    }

    /// Segment `seq` made from the spare file, if there is one for it: a header write,
    /// a flush of that page, and a rename; the next sync fsyncs the directory. A spare
    /// whose own flush has not completed yet is flushed here first.
    fn segment_from_spare(&mut self, seq: u64, first_index: u64) -> Option<Result<Segment>> {
        let mut spare = self.spare.take()?;
        assert_eq!(spare.seq, seq, "the spare is made for the next segment");
        if !spare.durable {
            sys::fdatasync_or_abort(&spare.file, &spare.tmp);
            spare.durable = true;
        }
        let made = Segment::from_spare(
            spare,
            &self.dir,
            first_index,
            self.opts.segment_header_bytes as u32,
        );
        if made.is_ok() {
            self.dir_unsynced = true;
        }
        Some(made)
    }

    /// Room for records in the write segment after what is written and staged.
    fn room(&self) -> usize {
        let seg = self.write_segment();
        seg.map.len() - seg.write_pos - self.staged_len
    }

    /// Stages one record at the write position, first sealing the write segment (and
    /// writing what it staged) and moving to the next prepared one if it does not fit.
    /// `entry` is the record's position in `entries` (None for a record without
    /// payload). Returns the record's offset in the (new) write segment.
    fn stage_record(
        &mut self,
        spare: &mut VecDeque<Segment>,
        header: &RecordHeader,
        entries: &[EntryRef<'_>],
        entry: Option<usize>,
    ) -> usize {
        let payload = entry.map_or(&[][..], |i| entries[i].payload);
        let len = format::record_len(payload.len());
        if len + SEAL_LEN > self.room() {
            let seal = RecordHeader {
                kind: RecordKind::Seal,
                index: 0,
                term: 0,
                synced_to: self.durable_pos,
            };
            self.stage_one(&seal, &[], None);
            self.write_staged(entries);
            let seg = self.segments.back_mut().expect("write segment");
            seg.sealed = true;
            seg.offsets.shrink_to_fit();
            let next = spare.pop_front().expect("segment prepared for rollover");
            self.segments.push_back(next);
        }
        self.stage_one(header, payload, entry)
    }

    fn stage_one(&mut self, header: &RecordHeader, payload: &[u8], entry: Option<usize>) -> usize {
        let seg = self.segments.back().expect("write segment");
        let at = seg.write_pos + self.staged_len;
        let head = format::encode_record_header(seg.seq, header, payload);
        self.staged_parts.push(StagedPart {
            head_at: self.staged_heads.len(),
            entry,
            payload_len: payload.len(),
        });
        self.staged_heads.extend_from_slice(&head);
        self.staged_len += format::record_len(payload.len());
        at
    }

    /// Writes the staged records to the write segment: pwritev of headers, the caller's
    /// payloads and padding, a few hundred slices per call (normally one call).
    fn write_staged(&mut self, entries: &[EntryRef<'_>]) {
        const PAD: [u8; RECORD_ALIGN] = [0; RECORD_ALIGN];
        let seg = self.segments.back().expect("write segment");
        let mut iov = [std::io::IoSlice::new(&[]); MAX_IOV];
        let (mut count, mut bytes, mut at) = (0, 0, seg.write_pos);
        for part in &self.staged_parts {
            if count + 3 > MAX_IOV {
                seg.write_vectored_at(&iov[..count], at, bytes);
                at += bytes;
                (count, bytes) = (0, 0);
            }
            let head = &self.staged_heads[part.head_at..part.head_at + RECORD_HEADER_LEN];
            iov[count] = std::io::IoSlice::new(head);
            count += 1;
            let len = format::record_len(part.payload_len);
            if let Some(i) = part.entry {
                let payload = entries[i].payload;
                assert_eq!(payload.len(), part.payload_len);
                if !payload.is_empty() {
                    iov[count] = std::io::IoSlice::new(payload);
                    count += 1;
                }
            }
            let pad = len - RECORD_HEADER_LEN - part.payload_len;
            if pad > 0 {
                iov[count] = std::io::IoSlice::new(&PAD[..pad]);
                count += 1;
            }
            bytes += len;
        }
        if count > 0 {
            seg.write_vectored_at(&iov[..count], at, bytes);
            at += bytes;
        }
        assert_eq!(at, seg.write_pos + self.staged_len);
        let seg = self.segments.back_mut().expect("write segment");
        seg.write_pos = at;
        self.staged_heads.clear();
        self.staged_parts.clear();
        self.staged_len = 0;
    }

    /// The segments that are part of the log (all of them, except during replay).
    fn log_segments(&mut self) -> impl DoubleEndedIterator<Item = &mut Segment> {
        let limit = self.replay_limit.unwrap_or(self.segments.len());
        self.segments.range_mut(..limit)
    }

    fn apply_truncate(&mut self, index: u64) {
        if index < self.first_index {
            // Only in replay, when the segments before this record were deleted after a
            // later compaction: everything before is gone.
            for seg in self.log_segments() {
                seg.offsets.clear();
                seg.first_live = index;
            }
            self.first_index = index;
            self.next_index = index;
            return;
        }
        for seg in self.log_segments().rev() {
            if seg.first_live >= index {
                seg.offsets.clear();
                seg.first_live = index;
            } else {
                let keep = (index - seg.first_live) as usize;
                seg.offsets.truncate(keep);
                break;
            }
        }
        self.next_index = index;
    }

    fn apply_compact(&mut self, index: u64) {
        if index <= self.first_index {
            return;
        }
        if index >= self.next_index {
            for seg in self.log_segments() {
                seg.offsets.clear();
                seg.first_live = index;
            }
            self.first_index = index;
            self.next_index = index;
            return;
        }
        // Live ranges stay ordered: a segment left empty starts (and ends) at `index`.
        for seg in self.log_segments() {
            if seg.end_live() <= index {
                seg.offsets.clear();
                seg.first_live = index;
            } else if seg.first_live < index {
                let drop = (index - seg.first_live) as usize;
                seg.offsets.drain(..drop);
                seg.first_live = index;
            }
        }
        self.first_index = index;
    }

    // ---- sync --------------------------------------------------------------------

    /// Makes everything appended so far durable with one fdatasync per segment touched
    /// since the last sync (normally one). Returns `synced_index()`. A flush error aborts
    /// the process (see `sys::fatal_sync_error`).
    pub fn sync(&mut self) -> Result<u64> {
        if let Some(token) = self.begin_sync() {
            for target in self.sync_targets() {
                // SAFETY: fsync/fdatasync on descriptors the log keeps open.
                let rc = unsafe {
                    if target.full_fsync {
                        libc::fsync(target.fd)
                    } else {
                        libc::fdatasync(target.fd)
                    }
                };
                if rc != 0 {
                    self.sync_failed(&std::io::Error::last_os_error());
                }
            }
            self.complete_sync(token)?;
        }
        Ok(self.synced_index)
    }

    /// Starts a sync of everything appended so far. None if nothing is unsynced. Only
    /// one sync may be in flight (a caller bug otherwise: panics).
    pub fn begin_sync(&mut self) -> Option<SyncToken> {
        assert!(self.in_flight.is_none(), "only one sync may be in flight");
        let upto_pos = self.write_position();
        if upto_pos == self.durable_pos {
            self.synced_index = self.last_index();
            return None;
        }
        let from_seq = self
            .segments
            .iter()
            .find(|s| s.synced_pos < s.write_pos)
            .map_or(self.write_segment().seq, |s| s.seq);
        let (to_seq, to_offset) = (self.write_segment().seq, self.write_segment().write_pos);
        let id = self.next_sync_id;
        self.next_sync_id += 1;
        let spare = self.spare.as_ref().is_some_and(|s| !s.durable);
        let dir = std::mem::take(&mut self.dir_unsynced);
        self.in_flight = Some(InFlight {
            id,
            upto_pos,
            upto_index: self.last_index(),
            from_seq,
            to_seq,
            to_offset,
            spare,
            dir,
        });
        Some(SyncToken { id })
    }

    /// The descriptors and ranges to fdatasync for the sync in flight (empty if none).
    /// They stay open until `complete_sync`.
    pub fn sync_targets(&self) -> impl Iterator<Item = SyncTarget> + '_ {
        let f = self.in_flight.as_ref();
        let spare = self
            .spare
            .as_ref()
            .filter(|_| f.is_some_and(|f| f.spare))
            .map(|s| SyncTarget {
                fd: s.file.as_raw_fd(),
                offset: 0,
                len: s.map.len() as u64,
                full_fsync: false,
            });
        let dir = f.filter(|f| f.dir).map(|_| SyncTarget {
            fd: self.lock.as_raw_fd(),
            offset: 0,
            len: 0,
            full_fsync: true,
        });
        let segments = self.segments.iter().filter_map(move |s| {
            let f = f?;
            if s.seq < f.from_seq || s.seq > f.to_seq {
                return None;
            }
            let end = if s.seq == f.to_seq {
                f.to_offset
            } else {
                s.write_pos
            };
            Some(SyncTarget {
                fd: s.file.as_raw_fd(),
                offset: s.synced_pos as u64,
                len: (end - s.synced_pos.min(end)) as u64,
                full_fsync: false,
            })
        });
        segments.chain(spare).chain(dir)
    }

    /// Every target of the sync in flight was flushed successfully. Deletes segments a
    /// now-durable compaction made unnecessary.
    pub fn complete_sync(&mut self, token: SyncToken) -> Result<()> {
        let f = self.in_flight.take().expect("a sync is in flight");
        assert_eq!(f.id, token.id, "complete_sync with a stale token");
        for seg in &mut self.segments {
            if seg.seq >= f.from_seq && seg.seq <= f.to_seq {
                seg.synced_pos = if seg.seq == f.to_seq {
                    f.to_offset
                } else {
                    seg.write_pos
                };
            }
        }
        if f.spare {
            if let Some(spare) = &mut self.spare {
                spare.durable = true;
            }
        }
        assert!(f.upto_pos >= self.durable_pos);
        self.durable_pos = f.upto_pos;
        self.synced_index = f.upto_index;
        if let Some((end, seq, index)) = self.compact_pending {
            if end <= self.durable_pos {
                self.compact_durable = Some((seq, index));
                self.compact_pending = None;
            }
        }
        if let Some((end, seq)) = self.reset_pending {
            if end <= self.durable_pos {
                self.reset_durable = Some(seq);
                self.reset_pending = None;
            }
        }
        self.delete_compacted()?;
        self.reclaim_step()?;
        self.make_spare();
        Ok(())
    }

    /// Makes the next segment's file ahead of need, right after a sync completed, so a
    /// rollover does not allocate 64 MiB and flush inside the turn that needs it. Its
    /// flush rides along with the next sync. A failure (disk full) is only logged: the
    /// rollover then creates the segment itself and reports the error to the caller.
    fn make_spare(&mut self) {
        if self.spare.is_some() || self.replay_limit.is_some() {
            return;
        }
        let seq = self.write_segment().seq + 1;
        if seq >= MAX_SEGMENT_SEQ || self.spare_failed == Some(seq) {
            return;
        }
        let started = std::time::Instant::now();
        match Spare::create(
            &self.dir,
            seq,
            self.opts.segment_bytes,
            self.opts.segment_header_bytes,
        ) {
            Ok(spare) => {
                log::info!(
                    "wal: spare segment {seq:016x} made in {:.2} ms",
                    started.elapsed().as_secs_f64() * 1e3
                );
                self.spare = Some(spare);
            }
            Err(e) => {
                self.spare_failed = Some(seq);
                log::warn!("wal: could not make the next segment ahead of need: {e}");
            }
        }
    }

    /// A flush of a sync target failed: the process must stop (retrying could report
    /// success for lost data). Logs and aborts.
    pub fn sync_failed(&self, err: &std::io::Error) -> ! {
        sys::fatal_sync_error("fdatasync", &self.dir, err)
    }

    /// Deletes front segments that replay no longer needs: those before a durable record
    /// that emptied the log, and those all of whose entries lie below a durable
    /// compaction in a later segment. (Segments holding only entries removed by a
    /// truncation go once a compaction passes them.)
    fn delete_compacted(&mut self) -> Result<()> {
        while self.segments.len() > 1 {
            let front = &self.segments[0];
            let before_reset = self.reset_durable.is_some_and(|seq| front.seq < seq);
            let compacted = self.compact_durable.is_some_and(|(seq, index)| {
                front.seq < seq && front.max_entry_index.is_none_or(|m| m < index)
            });
            if !before_reset && !compacted {
                break;
            }
            assert!(
                front.offsets.is_empty(),
                "a deleted segment holds no live entry"
            );
            let seg = self.segments.pop_front().expect("front segment");
            let path = seg.path.clone();
            if self.opening {
                drop(seg);
                fs::remove_file(&path).map_err(|e| Error::io(&path, "remove", e))?;
            } else {
                // Unlinking a 64 MiB segment at once stalled the loop for 50-120 ms
                // (freeing its page cache and blocks). Rename it out of the log instead
                // and free it a slice per sync (`reclaim_step`).
                let trash = path.with_extension("seg.del");
                fs::rename(&path, &trash).map_err(|e| Error::io(&path, "rename", e))?;
                let len = seg.map.len() as u64;
                let Segment { file, .. } = seg;
                self.trash.push_back(Trash {
                    file,
                    path: trash,
                    freed: 0,
                    len,
                    longest: std::time::Duration::ZERO,
                });
            }
            // The removal becomes durable with the next sync's directory fsync. Until
            // then a crash may bring the file back: harmless, replay finds it before the
            // durable record that made it unneeded and removes it again.
            self.dir_unsynced = true;
        }
        Ok(())
    }

    /// Frees the next slice of a segment removed from the log (punches a hole of
    /// `RECLAIM_STEP_BYTES`), and unlinks it once it is empty: bounded work per sync
    /// instead of one long unlink. Where holes cannot be punched it unlinks at once.
    fn reclaim_step(&mut self) -> Result<()> {
        let Some(t) = self.trash.front_mut() else {
            return Ok(());
        };
        if t.freed < t.len {
            let step = RECLAIM_STEP_BYTES.min(t.len - t.freed);
            let started = std::time::Instant::now();
            match sys::punch_hole(&t.file, t.freed, step) {
                Ok(true) => t.freed += step,
                Ok(false) => t.freed = t.len,
                Err(e) => return Err(Error::io(&t.path, "punch a hole in", e)),
            }
            t.longest = t.longest.max(started.elapsed());
            if t.freed < t.len {
                return Ok(());
            }
        }
        let t = self.trash.pop_front().expect("front trash");
        let (path, longest) = (t.path.clone(), t.longest);
        drop(t);
        let started = std::time::Instant::now();
        fs::remove_file(&path).map_err(|e| Error::io(&path, "remove", e))?;
        log::info!(
            "wal: freed {}: longest step {:.2} ms, unlink {:.2} ms",
            path.display(),
            longest.as_secs_f64() * 1e3,
            started.elapsed().as_secs_f64() * 1e3
        );
        self.dir_unsynced = true;
        Ok(())
    }
}
