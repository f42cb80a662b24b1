//! Thin wrappers over the system calls the WAL needs, and the fatal-sync policy.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// An fsync/fdatasync/msync error is fatal. After a failed flush the kernel may have
/// dropped the dirty pages and cleared the error, so a retry can report success for data
/// that is gone. The only safe answer: stop now and recover from what is on disk.
pub fn fatal_sync_error(op: &str, path: &Path, err: &io::Error) -> ! {
    log::error!(
        "{op} {} failed: {err}; aborting (recovery on restart reads what reached the disk)",
        path.display()
    );
    eprintln!("vigil-wal: fatal: {op} {} failed: {err}", path.display());
    std::process::abort()
}

/// fdatasync, aborting the process on failure.
pub fn fdatasync_or_abort(file: &File, path: &Path) {
    // SAFETY: fdatasync on an open descriptor we own; no memory is passed.
    let rc = unsafe { libc::fdatasync(file.as_raw_fd()) };
    if rc != 0 {
        fatal_sync_error("fdatasync", path, &io::Error::last_os_error());
    }
}

/// fsync of a directory (makes creations, renames and deletions in it durable), aborting
/// the process on failure.
pub fn fsync_dir_or_abort(dir: &Path) -> Result<()> {
    let handle = File::open(dir).map_err(|e| Error::io(dir, "open directory", e))?;
    // SAFETY: fsync on an open descriptor we own.
    let rc = unsafe { libc::fsync(handle.as_raw_fd()) };
    if rc != 0 {
        fatal_sync_error("fsync directory", dir, &io::Error::last_os_error());
    }
    Ok(())
}

/// Reserves `len` bytes of real disk blocks for `file` (and sets its size), so later
/// writes through a mapping cannot hit ENOSPC (which would be a SIGBUS). Falls back to
/// writing zeroes where the filesystem has no fallocate.
pub fn preallocate(file: &File, path: &Path, len: u64) -> Result<()> {
    let fail = |source: io::Error| Error::Preallocate {
        path: path.to_path_buf(),
        bytes: len,
        source,
    };
    let len_off =
        libc::off_t::try_from(len).map_err(|_| fail(io::Error::from_raw_os_error(libc::EFBIG)))?;
    loop {
        // SAFETY: fallocate on an open descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) => break,
            _ => return Err(fail(err)),
        }
    }
    // No fallocate here: write zeroes so every block exists before it is mapped.
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at).map_err(fail)?;
        at += n as u64;
    }
    Ok(())
}

/// How long `lock_dir` retries a lock held elsewhere.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// Opens `dir` and takes an exclusive, non-blocking flock on it, so a second process (or
/// a second `Wal` in this one) cannot open the same log. Released when the file closes.
pub fn lock_dir(dir: &Path) -> Result<File> {
    let handle = File::open(dir).map_err(|e| Error::io(dir, "open directory", e))?;
    // A lock held only by a child that the previous holder was spawning (between fork
    // and exec it holds a copy of every descriptor, the lock's included) goes away within
    // moments; a lock held by a live process does not. So a refusal is retried briefly
    // before it is reported.
    let give_up = std::time::Instant::now() + LOCK_RETRY;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(handle.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(handle);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || std::time::Instant::now() >= give_up {
            return Err(Error::io(
                dir,
                "lock (is another process using this WAL?)",
                e,
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Frees `len` bytes at `offset` of `file` (the size stays). Ok(false) where the file
/// system cannot punch holes.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    loop {
        // SAFETY: fallocate on an open descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) => return Ok(false),
            _ => return Err(err),
        }
    }
}
