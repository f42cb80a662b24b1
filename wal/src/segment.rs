//! One segment file: created preallocated and durable, mapped read-only for zero-copy
//! reads, plus the compact in-memory index of the live entries it holds.
//!
//! Records are written with pwrite(2), not through the map: one system call per batch
//! copies it into the page cache, which the shared mapping sees at once, without a page
//! fault per page and without write-protecting every page again at each fdatasync. (This
//! measured clearly faster for large batches than writing through a writable mapping.)

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};

use crate::error::{Error, Result};
use crate::format::{self, SegmentHeader, RECORD_HEADER_LEN};
use crate::sys;

/// A mapped segment and the offsets of its live entries.
///
/// Memory bound: `offsets` holds one u32 per live entry and nothing else is allocated per
/// entry. A record takes at least `RECORD_HEADER_LEN` (40) bytes, so a segment holds at
/// most `(segment_bytes - data_offset) / 40` entries: 4 bytes of index per 40 bytes of
/// log, at most 10 % of the log's disk size, about 6.4 MiB for a 64 MiB segment. The
/// write segment reserves that maximum once (virtual memory; pages are touched only as
/// entries arrive) and shrinks it to fit when sealed, so appends never reallocate.
pub(crate) struct Segment {
    pub seq: u64,
    pub path: PathBuf,
    pub file: File,
    /// The whole file, read-only.
    pub map: Mmap,
    pub header: SegmentHeader,
    /// Index of the entry at `offsets[0]` (where the live range starts if empty).
    pub first_live: u64,
    /// Byte offset of each live entry's record, in index order.
    pub offsets: Vec<u32>,
    /// Highest index of any entry record physically in this segment (live or not).
    pub max_entry_index: Option<u64>,
    /// End of the written records (after the Seal record once sealed).
    pub write_pos: usize,
    /// Bytes before this offset are known durable.
    pub synced_pos: usize,
    pub sealed: bool,
}

/// The file name of segment `seq`.
pub(crate) fn file_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

/// The sequence number in a segment file name, if it is one.
pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn map_file(file: &File, path: &Path, len: u64) -> Result<Mmap> {
    let len = usize::try_from(len).map_err(|_| Error::corrupt(path, 0, "segment too large"))?;
    // SAFETY: the file is preallocated to `len` bytes before it is mapped and its length
    // never changes while mapped (segments are never truncated; they are only deleted
    // after being unmapped). Only this process writes it (the log directory is locked),
    // and only at offsets no live slice of the map points into: past the write position.
    unsafe { MmapOptions::new().len(len).map(file) }.map_err(|e| Error::io(path, "mmap", e))
}

/// A segment file made ahead of need: preallocated and mapped under its temporary name
/// `{seq}.seg.tmp` (which recovery deletes), its header area written with zeroes (so
/// the header written at the rollover overwrites allocated, written blocks, and its
/// flush needs no extent conversion). Making it costs a fallocate and a small write; its
/// flush rides along with the next WAL sync instead of blocking the loop. A rollover
/// then writes the header, flushes that one page and renames the file
/// (see `Segment::from_spare`).
pub(crate) struct Spare {
    pub seq: u64,
    pub tmp: PathBuf,
    pub file: File,
    pub map: Mmap,
    /// Its allocation and size reached the disk (a sync flushed it).
    pub durable: bool,
}

impl Spare {
    /// Creates the spare file for segment `seq` in `dir`, without any flush.
    pub fn create(dir: &Path, seq: u64, segment_bytes: u64, header_bytes: u64) -> Result<Spare> {
        let tmp = dir.join(format!("{}.tmp", file_name(seq)));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, "create", e))?;
        let made = sys::preallocate(&file, &tmp, segment_bytes)
            .and_then(|()| {
                let zeroes = vec![0u8; header_bytes as usize];
                file.write_all_at(&zeroes, 0)
                    .map_err(|e| Error::io(&tmp, "write header area of", e))
            })
            .and_then(|()| map_file(&file, &tmp, segment_bytes));
        match made {
            Ok(map) => Ok(Spare {
                seq,
                tmp,
                file,
                map,
                durable: false,
            }),
            Err(e) => {
                drop(file);
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

impl Segment {
    /// Index of the live entry one past the last.
    pub fn end_live(&self) -> u64 {
        self.first_live + self.offsets.len() as u64
    }

    /// Creates segment `seq` in `dir`, durable before it returns: a temporary file is
    /// preallocated, its header written and synced, then it is renamed into place and the
    /// directory synced. A crash leaves either no segment or a complete empty one.
    pub fn create(
        dir: &Path,
        seq: u64,
        first_index: u64,
        segment_bytes: u64,
        data_offset: u32,
    ) -> Result<Segment> {
        let path = dir.join(file_name(seq));
        let tmp = dir.join(format!("{}.tmp", file_name(seq)));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, "create", e))?;
        let result = (|| {
            let t0 = std::time::Instant::now();
            sys::preallocate(&file, &tmp, segment_bytes)?;
            let t_alloc = t0.elapsed();
            let header = SegmentHeader {
                seq,
                first_index,
                segment_bytes,
                data_offset,
            };
            let mut head = [0u8; format::SEGMENT_HEADER_LEN];
            format::encode_segment_header(&mut head, &header);
            file.write_all_at(&head, 0)
                .map_err(|e| Error::io(&tmp, "write header of", e))?;
            let map = map_file(&file, &tmp, segment_bytes)?;
            let t1 = std::time::Instant::now();
            sys::fdatasync_or_abort(&file, &tmp);
            let t_sync = t1.elapsed();
            let t2 = std::time::Instant::now();
            fs::rename(&tmp, &path).map_err(|e| Error::io(&tmp, "rename", e))?;
            let t_rename = t2.elapsed();
            let t3 = std::time::Instant::now();
            sys::fsync_dir_or_abort(dir)?;
            let t_dir = t3.elapsed();
            log::info!(
                "wal: created segment {seq:016x}: create+fallocate {:.2} ms, header fdatasync {:.2} ms, rename {:.2} ms, directory fsync {:.2} ms",
                t_alloc.as_secs_f64() * 1e3,
                t_sync.as_secs_f64() * 1e3,
                t_rename.as_secs_f64() * 1e3,
                t_dir.as_secs_f64() * 1e3
            );
            let capacity = (segment_bytes - data_offset as u64) as usize / RECORD_HEADER_LEN;
            Ok(Segment {
                seq,
                path: path.clone(),
                file: file.try_clone().map_err(|e| Error::io(&path, "dup", e))?,
                map,
                header,
                first_live: first_index,
                offsets: Vec::with_capacity(capacity),
                max_entry_index: None,
                write_pos: data_offset as usize,
                synced_pos: data_offset as usize,
                sealed: false,
            })
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Turns a durable spare into segment `spare.seq`: writes its header, flushes it
    /// (one page, already allocated and written: no journal commit), and renames the
    /// file into place, WITHOUT the directory fsync. Nothing written to it may count as
    /// durable until a sync has fsynced the directory (the name); the caller arranges
    /// that. A crash before leaves the temporary name (deleted on open, and the log ends
    /// in the sealed segment before) or the real name with a durable header: the same
    /// states as `Segment::create`.
    pub fn from_spare(
        spare: Spare,
        dir: &Path,
        first_index: u64,
        data_offset: u32,
    ) -> Result<Segment> {
        assert!(spare.durable, "only a flushed spare becomes a segment");
        let seq = spare.seq;
        let path = dir.join(file_name(seq));
        let header = SegmentHeader {
            seq,
            first_index,
            segment_bytes: spare.map.len() as u64,
            data_offset,
        };
        let mut head = [0u8; format::SEGMENT_HEADER_LEN];
        format::encode_segment_header(&mut head, &header);
        spare
            .file
            .write_all_at(&head, 0)
            .map_err(|e| Error::io(&spare.tmp, "write header of", e))?;
        sys::fdatasync_or_abort(&spare.file, &spare.tmp);
        fs::rename(&spare.tmp, &path).map_err(|e| Error::io(&spare.tmp, "rename", e))?;
        let capacity = (header.segment_bytes - data_offset as u64) as usize / RECORD_HEADER_LEN;
        Ok(Segment {
            seq,
            path,
            file: spare.file,
            map: spare.map,
            header,
            first_live: first_index,
            offsets: Vec::with_capacity(capacity),
            max_entry_index: None,
            write_pos: data_offset as usize,
            synced_pos: data_offset as usize,
            sealed: false,
        })
    }

    /// Opens and maps an existing segment and checks its header; records are not read.
    pub fn open(path: PathBuf, seq: u64) -> Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(&path, "stat", e))?
            .len();
        if len < format::SEGMENT_HEADER_LEN as u64 {
            return Err(Error::corrupt(
                &path,
                len,
                format!("segment file is only {len} bytes"),
            ));
        }
        let map = map_file(&file, &path, len)?;
        let header = format::decode_segment_header(&map)
            .map_err(|e| Error::corrupt(&path, 0, e.to_string()))?;
        if header.seq != seq {
            return Err(Error::corrupt(
                &path,
                16,
                format!("header names segment {:016x}", header.seq),
            ));
        }
        if header.segment_bytes != len {
            return Err(Error::corrupt(
                &path,
                len.min(header.segment_bytes),
                format!(
                    "segment file is {len} bytes but its header says {}",
                    header.segment_bytes
                ),
            ));
        }
        let data_offset = header.data_offset as usize;
        Ok(Segment {
            seq,
            path,
            file,
            map,
            first_live: header.first_index,
            header,
            offsets: Vec::new(),
            max_entry_index: None,
            write_pos: data_offset,
            synced_pos: data_offset,
            sealed: false,
        })
    }

    /// Writes the concatenation of `bufs` (`total` bytes) at `offset` with pwritev(2);
    /// failures are fatal as in `write_at`.
    pub fn write_vectored_at(&self, bufs: &[std::io::IoSlice<'_>], offset: usize, total: usize) {
        assert!(
            offset + total <= self.map.len(),
            "write past the segment end"
        );
        assert!(bufs.len() <= libc::c_int::MAX as usize);
        let written = loop {
            // SAFETY: IoSlice is guaranteed ABI-compatible with struct iovec on Unix; the
            // slices borrow live memory for the duration of the call; the fd is ours.
            let rc = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    bufs.as_ptr().cast::<libc::iovec>(),
                    bufs.len() as libc::c_int,
                    offset as libc::off_t,
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                sys::fatal_sync_error("pwritev", &self.path, &err);
            }
        };
        if written < total {
            // A short write (rare for regular files): finish slice by slice.
            let (mut skip, mut at) = (written, offset + written);
            for buf in bufs {
                if skip >= buf.len() {
                    skip -= buf.len();
                    continue;
                }
                let rest = &buf[skip..];
                skip = 0;
                self.write_at(rest, at);
                at += rest.len();
            }
        }
    }

    /// Writes `bytes` at `offset` through the page cache. A failure here (an I/O error on
    /// space that is already allocated) is treated like a failed flush: fatal.
    pub fn write_at(&self, bytes: &[u8], offset: usize) {
        assert!(
            offset + bytes.len() <= self.map.len(),
            "write past the segment end"
        );
        if let Err(e) = self.file.write_all_at(bytes, offset as u64) {
            sys::fatal_sync_error("pwrite", &self.path, &e);
        }
    }
}
