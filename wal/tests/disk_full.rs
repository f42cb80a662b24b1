//! Disk full: when a new segment cannot be preallocated, append returns an error, the
//! batch is not appended, everything before stays readable and syncable, and nothing
//! crashes (no SIGBUS from a sparse mapping).
//!
//! Two ways to run out of space: RLIMIT_FSIZE in a child process (SIGXFSZ ignored; runs
//! everywhere), and a tiny tmpfs (needs root to mount; skipped otherwise).

mod common;

use std::path::Path;
use std::process::Command;

use common::{small_options, TempDir};
use vigil_wal::{EntryRef, Error, Wal, WalOptions};

const CHILD_ENV: &str = "VIGIL_WAL_DISK_FULL_CHILD_DIR";
const SEGMENT: u64 = 64 * 1024;

fn options() -> WalOptions {
    small_options(SEGMENT)
}

fn append_one(wal: &mut Wal, payload_len: usize) -> vigil_wal::Result<()> {
    let index = wal.last_index() + 1;
    let payload = vec![(index % 251) as u8; payload_len];
    wal.append(&[EntryRef {
        index,
        term: 1,
        payload: &payload,
    }])
}

/// Appends until the first error; checks it is a preallocation error, that the log is
/// intact and still syncs, and returns (last index, errno).
fn fill_until_error(wal: &mut Wal) -> (u64, i32) {
    for _ in 0..100_000 {
        let before = wal.last_index();
        match append_one(wal, 1500) {
            Ok(()) => {
                wal.sync().unwrap();
            }
            Err(e) => {
                let errno = match &e {
                    Error::Preallocate { source, .. } => source.raw_os_error().unwrap_or(0),
                    other => panic!("expected a preallocation error, got: {other}"),
                };
                assert!(e.to_string().contains(".seg"), "error names the file: {e}");
                assert_eq!(wal.last_index(), before, "the failed append added nothing");
                assert_eq!(wal.sync().unwrap(), before);
                for index in wal.first_index()..=before {
                    let entry = wal.entry(index).unwrap();
                    assert!(entry.payload.iter().all(|&b| b == (index % 251) as u8));
                }
                return (before, errno);
            }
        }
    }
    panic!("the disk never filled");
}

fn no_temp_files_left(dir: &Path) {
    for item in std::fs::read_dir(dir).unwrap() {
        let name = item.unwrap().file_name();
        assert!(
            !name.to_string_lossy().ends_with(".tmp"),
            "leftover {name:?}"
        );
    }
}

/// The child role of `file_size_limit_gives_an_error`.
#[test]
fn disk_full_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return; // not the child
    };
    // A first segment, created while no limit applies, smaller than the limit: writes
    // into it stay below RLIMIT_FSIZE (which also applies to writes inside a file).
    let first = WalOptions {
        segment_bytes: SEGMENT / 4,
        ..options()
    };
    let mut wal = Wal::open(&dir, first).unwrap();
    append_one(&mut wal, 100).unwrap();
    wal.sync().unwrap();
    drop(wal);
    // SAFETY: plain libc calls on this (child) process only.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: SEGMENT / 2,
            rlim_max: SEGMENT / 2,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    // New segments are SEGMENT bytes, more than the limit: preallocating one fails.
    let mut wal = Wal::open(&dir, options()).unwrap();
    let (last, errno) = fill_until_error(&mut wal);
    assert_eq!(errno, libc::EFBIG);
    // Again: still an error, still no crash.
    assert!(append_one(&mut wal, 1500).is_err());
    no_temp_files_left(Path::new(&dir));
    println!("DISK-FULL-CHILD-OK {last}");
}

#[test]
fn file_size_limit_gives_an_error() {
    let dir = TempDir::new("fsize");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "disk_full_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("DISK-FULL-CHILD-OK"),
        "child failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "child: {}",
        stdout.lines().find(|l| l.contains("OK")).unwrap_or("")
    );
    // After the limit is gone, the log opens and grows again.
    let mut wal = Wal::open(dir.path(), options()).unwrap();
    let last = wal.last_index();
    assert!(last > 1);
    for _ in 0..60 {
        append_one(&mut wal, 1500).unwrap();
    }
    wal.sync().unwrap();
    assert!(wal.segment_count() >= 2);
}

/// Unmounts the tmpfs on drop, also when the test fails.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: umount2 of the tmpfs this test mounted, with a valid C string.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn full_tmpfs_gives_an_error_and_compaction_frees_space() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = TempDir::new("tmpfs");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let target = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
    // SAFETY: mount(2) with valid C strings; undone by the Mount guard.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=256k".as_ptr().cast(),
        )
    };
    if rc != 0 {
        eprintln!(
            "skipped: cannot mount a tmpfs here: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let _mount = Mount(mnt.clone());
    let wal_dir = mnt.join("wal");
    let mut wal = Wal::open(&wal_dir, options()).unwrap();
    let (last, errno) = fill_until_error(&mut wal);
    assert_eq!(errno, libc::ENOSPC);
    eprintln!(
        "tmpfs full after entry {last} in {} segments",
        wal.segment_count()
    );
    no_temp_files_left(&wal_dir);
    // A snapshot lets the old segments go; then there is room again.
    wal.compact(last + 1).unwrap();
    wal.sync().unwrap();
    assert_eq!(wal.segment_count(), 1);
    for _ in 0..60 {
        append_one(&mut wal, 1500).unwrap();
        wal.sync().unwrap();
    }
    drop(wal);
    let wal = Wal::open(&wal_dir, options()).unwrap();
    assert_eq!(wal.first_index(), last + 1);
    assert_eq!(wal.last_index(), last + 60);
}
