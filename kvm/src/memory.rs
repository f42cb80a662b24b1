//! Guest memory: one file-backed mapping, registered with KVM as memory slot 0.
//!
//! A fresh VM maps a memfd `MAP_SHARED`. A restored VM maps the snapshot's memory
//! image `MAP_PRIVATE` (lazy and copy-on-write, as Firecracker does): pages are read
//! from the file only when touched, and guest writes never reach the image. Diffs of a
//! chain are applied onto that private mapping before the guest runs.
//!
//! Writes the VMM itself makes (the parameter block) are not seen by KVM's dirty log,
//! so they are recorded in a host-side dirty bitmap that diff snapshots merge in.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::guest::PAGE_SIZE;

pub struct GuestMemory {
    ptr: *mut u8,
    len: u64,
    /// The file behind the mapping (memfd or snapshot image), kept open for its lifetime.
    backing: File,
    /// MAP_PRIVATE of an image: written pages no longer match the file.
    private: bool,
    /// Pages the VMM wrote, one bit per page.
    host_dirty: Vec<AtomicU64>,
}

// SAFETY: the mapping is plain memory owned by this value for its whole lifetime; all
// accesses go through raw pointers with bounds checks, and the guest writing it
// concurrently is inherent to a VM (reads and writes here are volatile).
unsafe impl Send for GuestMemory {}
// SAFETY: as above; shared access only performs volatile reads/writes and atomic bit
// updates.
unsafe impl Sync for GuestMemory {}

fn bitmap_words(len: u64) -> usize {
    (len / PAGE_SIZE).div_ceil(64) as usize
}

impl GuestMemory {
    /// Fresh, zeroed memory of `len` bytes backed by a memfd.
    pub fn new_memfd(len: u64) -> io::Result<GuestMemory> {
        assert!(len > 0 && len % PAGE_SIZE == 0);
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(c"vigil-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid file descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len)?;
        Self::map(file, len, libc::MAP_SHARED)
    }

    /// A private (copy-on-write) mapping of a memory image of exactly `len` bytes.
    pub fn map_image_private(file: File, len: u64) -> io::Result<GuestMemory> {
        assert!(len > 0 && len % PAGE_SIZE == 0);
        let file_len = file.metadata()?.len();
        if file_len != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("memory image is {file_len} bytes, the state file says {len}"),
            ));
        }
        Self::map(file, len, libc::MAP_PRIVATE)
    }

    fn map(file: File, len: u64, flags: libc::c_int) -> io::Result<GuestMemory> {
        // SAFETY: mapping a file we own with a checked length at a kernel-chosen address;
        // the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let host_dirty = (0..bitmap_words(len)).map(|_| AtomicU64::new(0)).collect();
        Ok(GuestMemory {
            ptr: ptr as *mut u8,
            len,
            backing: file,
            private: flags & libc::MAP_PRIVATE != 0,
            host_dirty,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// Host address of the mapping (for KVM_SET_USER_MEMORY_REGION).
    pub fn host_address(&self) -> u64 {
        self.ptr as u64
    }

    fn check(&self, gpa: u64, len: u64) {
        assert!(
            gpa.checked_add(len).is_some_and(|end| end <= self.len),
            "guest access out of range: {gpa:#x}+{len}"
        );
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        self.check(gpa, 8);
        assert!(gpa % 8 == 0);
        // SAFETY: in bounds (checked) and 8-byte aligned (the mapping is page-aligned);
        // volatile because the guest may write it concurrently.
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize) as *const u64) }
    }

    pub fn write_u64(&self, gpa: u64, value: u64) {
        self.check(gpa, 8);
        assert!(gpa % 8 == 0);
        self.mark_host_dirty(gpa, 8);
        // SAFETY: in bounds (checked) and aligned, as in `read_u64`.
        unsafe { std::ptr::write_volatile(self.ptr.add(gpa as usize) as *mut u64, value) }
    }

    pub fn write_bytes(&self, gpa: u64, bytes: &[u8]) {
        self.check(gpa, bytes.len() as u64);
        self.mark_host_dirty(gpa, bytes.len() as u64);
        // SAFETY: the destination range is in bounds (checked) and cannot overlap `bytes`,
        // which is Rust-owned memory outside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(gpa as usize), bytes.len())
        }
    }

    /// Copies guest memory out (used with vCPUs paused).
    pub fn read_bytes(&self, gpa: u64, out: &mut [u8]) {
        self.check(gpa, out.len() as u64);
        // SAFETY: the source range is in bounds (checked) and does not overlap `out`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), out.as_mut_ptr(), out.len())
        }
    }

    fn mark_host_dirty(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        for page in gpa / PAGE_SIZE..=(gpa + len - 1) / PAGE_SIZE {
            self.host_dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// Takes (and clears) the host-side dirty bitmap.
    pub fn take_host_dirty(&self) -> Vec<u64> {
        self.host_dirty
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect()
    }

    /// Whether the mapping is a private (copy-on-write) mapping of an image file.
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// Page ranges `(first, count)` where the backing file has data (SEEK_DATA /
    /// SEEK_HOLE); the rest of the file is holes, which read as zeroes. For a shared
    /// memfd this is exactly the memory that may be non-zero; for a private mapping, only
    /// what the image held (pages written since are not in the file).
    pub fn backing_data_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        let fd = self.backing.as_raw_fd();
        let len = self.len as libc::off_t;
        let mut ranges = Vec::new();
        let mut offset: libc::off_t = 0;
        while offset < len {
            // SAFETY: lseek on a file descriptor we own; results are checked.
            let data = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
            if data < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after `offset`
                }
                return Err(err);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io::Error::last_os_error());
            }
            let first = data as u64 / PAGE_SIZE;
            let end = (hole.min(len) as u64).div_ceil(PAGE_SIZE);
            if end > first {
                ranges.push((first, end - first));
            }
            if hole <= offset {
                break; // defensive: no progress
            }
            offset = hole;
        }
        Ok(ranges)
    }

    /// Whether the page is all zeroes (vCPUs paused).
    pub fn page_is_zero(&self, page: u64) -> bool {
        self.check(page * PAGE_SIZE, PAGE_SIZE);
        // SAFETY: the page is in bounds (checked) and u64-aligned; vCPUs are paused, and
        // the slice does not outlive this call.
        let words = unsafe {
            std::slice::from_raw_parts(
                self.ptr.add((page * PAGE_SIZE) as usize) as *const u64,
                (PAGE_SIZE / 8) as usize,
            )
        };
        words.iter().all(|&w| w == 0)
    }

    /// Writes pages `[first, first + count)` to `file` at the same offset.
    pub fn write_pages_to(&self, file: &File, first: u64, count: u64) -> io::Result<()> {
        self.transfer_pages(first, count, |at, len, offset| {
            // SAFETY: `transfer_pages` hands out only ranges inside the mapping; pwrite only
            // reads them.
            unsafe { libc::pwrite(file.as_raw_fd(), at as *const libc::c_void, len, offset) }
        })
        .map_err(|e| match e {
            Transfer::Zero { .. } => io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote 0"),
            Transfer::Io(e) => e,
        })
    }

    /// Reads pages `[first, first + count)` from `file` (same offsets) into memory.
    pub fn read_pages_from(&self, file: &File, first: u64, count: u64) -> io::Result<()> {
        let end = (first + count) * PAGE_SIZE;
        self.transfer_pages(first, count, |at, len, offset| {
            // SAFETY: `transfer_pages` hands out only ranges inside the mapping, which is
            // writable; no Rust reference to it exists during the call.
            unsafe { libc::pread(file.as_raw_fd(), at as *mut libc::c_void, len, offset) }
        })
        .map_err(|e| match e {
            Transfer::Zero { at } => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("memory file ends at byte {at}, expected {end}"),
            ),
            Transfer::Io(e) => e,
        })
    }

    /// Replaces pages `[first, first + count)` of a private mapping with a private
    /// (copy-on-write, lazy) mapping of the same range of `file`: nothing is read now,
    /// the pages come from `file` when first touched. `&mut self`: no vCPU or KVM slot
    /// may use the memory meanwhile (a restore does this before creating the VM).
    pub fn map_file_pages(&mut self, file: &File, first: u64, count: u64) -> io::Result<()> {
        assert!(self.private, "only a private mapping takes file pages");
        let offset = first * PAGE_SIZE;
        let len = count * PAGE_SIZE;
        self.check(offset, len);
        let file_len = file.metadata()?.len();
        if offset + len > file_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "memory file ends at byte {file_len}, expected {}",
                    offset + len
                ),
            ));
        }
        // SAFETY: the target range lies inside our own mapping (checked), so MAP_FIXED
        // replaces only pages this value owns; nothing else references them (`&mut`).
        let at = unsafe {
            libc::mmap(
                self.ptr.add(offset as usize) as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        assert_eq!(at as usize, self.ptr as usize + offset as usize);
        Ok(())
    }

    /// Runs `call` (a pread or pwrite between the file and guest memory at the same
    /// offset) over pages `[first, first + count)` in chunks of at most 1 GiB, retrying
    /// on EINTR and continuing after short transfers.
    fn transfer_pages(
        &self,
        first: u64,
        count: u64,
        mut call: impl FnMut(*mut u8, usize, libc::off_t) -> isize,
    ) -> Result<(), Transfer> {
        let mut offset = first * PAGE_SIZE;
        let end = (first + count) * PAGE_SIZE;
        self.check(offset, end - offset);
        while offset < end {
            let chunk = (end - offset).min(1 << 30) as usize;
            // SAFETY: `offset` is inside the mapping (checked above), so the pointer is too.
            let at = unsafe { self.ptr.add(offset as usize) };
            let n = call(at, chunk, offset as libc::off_t);
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Transfer::Io(err));
            }
            if n == 0 {
                return Err(Transfer::Zero { at: offset });
            }
            offset += n as u64;
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `map`; no references remain
        // (KVM's slot is gone with the VM fd, which owners drop first).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len as usize) };
    }
}

/// Why a page transfer stopped early.
enum Transfer {
    Io(io::Error),
    /// A call moved 0 bytes at this offset (end of file, or a full device).
    Zero {
        at: u64,
    },
}
