//! The guest counter a snapshot chain holds, read from the snapshot files themselves.
//!
//! The built-in guest keeps each vCPU's counter in its parameter page
//! (`vigil_kvm::guest`). A full snapshot's memory file holds every non-zero page at its
//! guest physical address; a diff holds only the pages its state file's bitmap names.
//! So the counter is read from the newest snapshot in the chain that holds that page.
//! This is what a restore from the chain starts from: the tests check that a restored
//! guest resumes from at least this value.

use std::io::Read;
use std::path::{Path, PathBuf};

use vigil_kvm::guest::{PAGE_SIZE, PARAMS_GPA, PARAM_SLOTS, SLOT_BYTES, SLOT_COUNTER};
use vigil_kvm::snapshot::{read_state, MEMORY_FILE};
use vigil_kvm::state::MemoryKind;

/// Guest physical address of vCPU `vcpu`'s counter.
pub fn counter_gpa(vcpu: usize) -> u64 {
    PARAMS_GPA + PARAM_SLOTS + vcpu as u64 * SLOT_BYTES + SLOT_COUNTER
}

/// Index (into the chain) of the newest snapshot whose memory file holds `page`:
/// `None` in `bitmaps` is a full snapshot (holds every page), `Some(bits)` a diff.
pub fn holder(bitmaps: &[Option<&[u64]>], page: u64) -> Option<usize> {
    bitmaps.iter().rposition(|bits| match bits {
        None => true,
        Some(bits) => bits
            .get((page / 64) as usize)
            .is_some_and(|word| word & (1 << (page % 64)) != 0),
    })
}

/// vCPU `vcpu`'s counter as saved in `chain` (full snapshot first, then diffs; relative
/// paths are taken under `shared_dir`).
pub fn counter_in_chain(shared_dir: &Path, chain: &[PathBuf], vcpu: usize) -> Result<u64, String> {
    if chain.is_empty() {
        return Err("the snapshot chain is empty".into());
    }
    let dirs: Vec<PathBuf> = chain.iter().map(|p| shared_dir.join(p)).collect();
    let mut states = Vec::with_capacity(dirs.len());
    for dir in &dirs {
        states.push(read_state(dir).map_err(|e| e.to_string())?);
    }
    let bitmaps: Vec<Option<&[u64]>> = states
        .iter()
        .map(|s| match &s.memory {
            MemoryKind::Full => None,
            MemoryKind::Diff { dirty_bitmap, .. } => Some(dirty_bitmap.as_slice()),
        })
        .collect();
    let gpa = counter_gpa(vcpu);
    let index = holder(&bitmaps, gpa / PAGE_SIZE).ok_or_else(|| {
        format!(
            "no snapshot in the chain holds guest page {:#x} (the chain does not start with a full snapshot)",
            gpa / PAGE_SIZE
        )
    })?;
    let path = dirs[index].join(MEMORY_FILE);
    let mut file =
        std::fs::File::open(&path).map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(gpa))
        .map_err(|e| format!("{}: seek to {gpa:#x}: {e}", path.display()))?;
    let mut bytes = [0u8; 8];
    file.read_exact(&mut bytes).map_err(|e| {
        format!(
            "{}: read 8 bytes at byte offset {gpa:#x}: {e}",
            path.display()
        )
    })?;
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_snapshot_holding_the_page_wins() {
        let page = counter_gpa(0) / PAGE_SIZE;
        assert_eq!(page, 6);
        let with = [1u64 << 6];
        let without = [1u64 << 7];
        assert_eq!(holder(&[None], page), Some(0));
        assert_eq!(holder(&[None, Some(&with)], page), Some(1));
        assert_eq!(holder(&[None, Some(&with), Some(&without)], page), Some(1));
        assert_eq!(holder(&[None, Some(&without)], page), Some(0));
        assert_eq!(holder(&[Some(&without)], page), None);
        // A bitmap too short to name the page does not hold it.
        assert_eq!(holder(&[Some(&[])], page), None);
    }

    #[test]
    fn a_missing_snapshot_is_named() {
        let e = counter_in_chain(Path::new("/nonexistent-vigil"), &["vms/a/1-1".into()], 0)
            .unwrap_err();
        assert!(e.contains("/nonexistent-vigil/vms/a/1-1/state"), "{e}");
        assert!(counter_in_chain(Path::new("/"), &[], 0).is_err());
    }
}
