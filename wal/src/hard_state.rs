//! The Raft hard state (term, vote, commit index) in a small file with two slots.
//!
//! ```text
//! file: slot 0 at byte 0, slot 1 at byte 512 (separate sectors), 1024 bytes
//! slot (64 bytes, little-endian):
//!   0  magic "VGHS"   [4]
//!   4  version        u32   = 1
//!   8  sequence       u64   grows by one per write; the newest valid slot wins
//!  16  term           u64
//!  24  voted_for      u64   0 = none
//!  32  commit         u64
//!  40  reserved       [20]  zero
//!  60  crc32          u32   of bytes 0..60
//! ```
//!
//! Each save writes the slot NOT holding the current state (pwrite) and fdatasyncs, so a
//! torn write damages only the slot being written and the other still holds the last
//! synced state.

use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys;

const MAGIC: [u8; 4] = *b"VGHS";
const VERSION: u32 = 1;
const SLOT_LEN: usize = 64;
/// Byte offset of each slot.
pub const SLOT_OFFSETS: [u64; 2] = [0, 512];
const FILE_LEN: u64 = 1024;

/// The Raft state that must survive a crash before a vote or an ack is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    /// The node voted for in `term`; 0 = none.
    pub voted_for: u64,
    pub commit: u64,
}

fn encode_slot(seq: u64, hs: &HardState) -> [u8; SLOT_LEN] {
    let mut b = [0u8; SLOT_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&hs.term.to_le_bytes());
    b[24..32].copy_from_slice(&hs.voted_for.to_le_bytes());
    b[32..40].copy_from_slice(&hs.commit.to_le_bytes());
    let crc = crc32fast::hash(&b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes one slot; None if it is not a valid slot. Pure; any bytes are fine.
pub fn decode_slot(bytes: &[u8]) -> Option<(u64, HardState)> {
    let b = bytes.get(..SLOT_LEN)?;
    let u64_at = |at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(x)
    };
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&b[60..64]);
    if b[0..4] != MAGIC || crc32fast::hash(&b[0..60]) != u32::from_le_bytes(crc) {
        return None;
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&b[4..8]);
    if u32::from_le_bytes(version) != VERSION {
        return None;
    }
    Some((
        u64_at(8),
        HardState {
            term: u64_at(16),
            voted_for: u64_at(24),
            commit: u64_at(32),
        },
    ))
}

/// The open hard-state file.
pub struct HardStateFile {
    path: PathBuf,
    file: File,
    /// Sequence number of the newest slot written.
    seq: u64,
    /// Which slot holds it.
    slot: usize,
    state: HardState,
}

impl HardStateFile {
    /// Opens `path`, creating it (durably, with the default state) if missing or empty.
    /// A non-empty file with no valid slot is [`Error::HardStateCorrupt`].
    pub fn open(path: impl AsRef<Path>) -> Result<HardStateFile> {
        let path = path.as_ref().to_path_buf();
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(Error::io(&path, "stat", e)),
        };
        if len == 0 {
            Self::create(&path)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "open", e))?;
        let mut best: Option<(u64, usize, HardState)> = None;
        for (slot, &offset) in SLOT_OFFSETS.iter().enumerate() {
            let mut buf = [0u8; SLOT_LEN];
            let n = read_up_to(&file, &mut buf, offset).map_err(|e| Error::io(&path, "read", e))?;
            if let Some((seq, hs)) = decode_slot(&buf[..n]) {
                if best.is_none_or(|(s, _, _)| seq > s) {
                    best = Some((seq, slot, hs));
                }
            }
        }
        let Some((seq, slot, state)) = best else {
            return Err(Error::HardStateCorrupt { path });
        };
        Ok(HardStateFile {
            path,
            file,
            seq,
            slot,
            state,
        })
    }

    /// Writes a fresh file under a temporary name and renames it into place, so a crash
    /// never leaves a half-created file that would read as corrupt.
    fn create(path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, "create", e))?;
        file.set_len(FILE_LEN)
            .map_err(|e| Error::io(&tmp, "set length of", e))?;
        file.write_all_at(&encode_slot(1, &HardState::default()), SLOT_OFFSETS[0])
            .map_err(|e| Error::io(&tmp, "write", e))?;
        sys::fdatasync_or_abort(&file, &tmp);
        fs::rename(&tmp, path).map_err(|e| Error::io(&tmp, "rename", e))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        sys::fsync_dir_or_abort(dir.unwrap_or(Path::new(".")))
    }

    /// The newest saved state.
    pub fn get(&self) -> HardState {
        self.state
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Saves `state` durably: pwrite to the other slot, then fdatasync (abort on error).
    pub fn save(&mut self, state: HardState) -> Result<()> {
        self.write_unsynced(state)?;
        sys::fdatasync_or_abort(&self.file, &self.path);
        Ok(())
    }

    /// The split form of `save` for io_uring: writes the other slot and returns the
    /// descriptor to fdatasync. `get()` already returns the new state; it is durable
    /// only once that flush completed (a flush error must abort, see
    /// `fatal_sync_error`). Do not write again before the flush completed, or a torn
    /// second write could hit the only durable slot.
    pub fn write_unsynced(&mut self, state: HardState) -> Result<RawFd> {
        let slot = 1 - self.slot;
        let seq = self.seq + 1;
        self.file
            .write_all_at(&encode_slot(seq, &state), SLOT_OFFSETS[slot])
            .map_err(|e| Error::io(&self.path, "write", e))?;
        self.slot = slot;
        self.seq = seq;
        self.state = state;
        Ok(self.file.as_raw_fd())
    }
}

fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
