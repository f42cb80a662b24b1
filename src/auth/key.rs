//! The cluster key: 32 random bytes every member holds, in a file only its owner can read.
//!
//! `vigil keygen PATH` writes one ([`write_key_file`]); the agent reads it with
//! [`ClusterKey::load`], which refuses a file that others may read or write, a file of the
//! wrong size and anything that is not a regular file, naming the file and the fix.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a cluster key (and of its file).
pub const KEY_BYTES: usize = 32;
/// Bytes of a key's public identifier ([`ClusterKey::id`]).
pub const KEY_ID_BYTES: usize = 8;

/// Domain-separation label of the key identifier.
const KEY_ID_LABEL: &[u8] = b"vigil-auth v1 key id";

pub type HmacSha256 = Hmac<Sha256>;

/// A public fingerprint of a key: the first 8 bytes of HMAC-SHA256(key, label). It names
/// a key (in the handshake's key offer, in logs, in `vigil keygen`'s output) without
/// revealing anything about it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_BYTES]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A cluster key. `Debug` shows only its [`KeyId`]; the bytes are wiped on drop.
#[derive(Clone)]
pub struct ClusterKey {
    bytes: [u8; KEY_BYTES],
}

impl ClusterKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        ClusterKey { bytes }
    }

    /// A fresh key from the kernel's random source.
    pub fn generate() -> io::Result<Self> {
        let mut bytes = [0u8; KEY_BYTES];
        fill_random(&mut bytes)?;
        Ok(ClusterKey { bytes })
    }

    pub fn id(&self) -> KeyId {
        let mut mac = self.mac();
        mac.update(KEY_ID_LABEL);
        let full = mac.finalize().into_bytes();
        let mut id = [0u8; KEY_ID_BYTES];
        id.copy_from_slice(&full[..KEY_ID_BYTES]);
        KeyId(id)
    }

    /// An HMAC-SHA256 instance keyed with this key.
    pub(crate) fn mac(&self) -> HmacSha256 {
        <HmacSha256 as Mac>::new_from_slice(&self.bytes).expect("HMAC accepts any key length")
    }

    /// Reads a key file: exactly [`KEY_BYTES`] bytes, a regular file, mode 0600 or
    /// stricter (no group or other permission bits).
    pub fn load(path: &Path) -> Result<ClusterKey, KeyFileError> {
        let error = |message: String| KeyFileError {
            path: path.to_path_buf(),
            message,
        };
        // O_NONBLOCK: opening a FIFO someone put there must not hang the agent; the type
        // check below then refuses it.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| error(format!("cannot open the cluster key file: {e}")))?;
        let metadata = file
            .metadata()
            .map_err(|e| error(format!("cannot stat the cluster key file: {e}")))?;
        if !metadata.file_type().is_file() {
            return Err(error(
                "the cluster key file is not a regular file (create one with `vigil keygen PATH`)"
                    .into(),
            ));
        }
        let mode = metadata.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(error(format!(
                "the cluster key file has mode {mode:04o}: group or others may read or write it; \
                 fix with `chmod 600 {}`",
                path.display()
            )));
        }
        // Read one byte more than a key so that a file that grew after the stat is caught.
        let mut bytes = Vec::with_capacity(KEY_BYTES + 1);
        (&file)
            .take(KEY_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| error(format!("cannot read the cluster key file: {e}")))?;
        if bytes.len() != KEY_BYTES || metadata.len() != KEY_BYTES as u64 {
            return Err(error(format!(
                "the cluster key file holds {} bytes, a key is exactly {KEY_BYTES} \
                 (create one with `vigil keygen PATH`)",
                metadata.len().max(bytes.len() as u64)
            )));
        }
        let mut key = [0u8; KEY_BYTES];
        key.copy_from_slice(&bytes);
        bytes.fill(0);
        Ok(ClusterKey { bytes: key })
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(id {})", self.id())
    }
}

impl Drop for ClusterKey {
    fn drop(&mut self) {
        for byte in self.bytes.iter_mut() {
            // SAFETY: `byte` is a valid, aligned, exclusive reference into our own array;
            // the volatile write keeps the compiler from eliding the wipe.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

/// The keys a node holds: the current one and, during a rotation, the next one. A peer
/// proving either is accepted (see the rotation steps in the `auth` module docs).
#[derive(Clone, Debug)]
pub struct KeyRing {
    pub current: ClusterKey,
    pub next: Option<ClusterKey>,
}

impl KeyRing {
    pub fn new(current: ClusterKey, next: Option<ClusterKey>) -> Self {
        KeyRing { current, next }
    }

    /// The held keys, current first.
    pub fn keys(&self) -> impl Iterator<Item = &ClusterKey> {
        std::iter::once(&self.current).chain(self.next.as_ref())
    }

    pub fn find(&self, id: KeyId) -> Option<&ClusterKey> {
        self.keys().find(|key| key.id() == id)
    }
}

/// A key file that could not be written or read, and why.
#[derive(Debug)]
pub struct KeyFileError {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for KeyFileError {}

/// Fills `buf` from getrandom(2) (blocking only until the kernel's pool is initialised).
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, exclusively borrowed
        // byte slice; getrandom writes at most `rest.len()` bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Writes `key` to a new file at `path` with mode 0600, fsyncing the file and its
/// directory. An existing file is an error unless `force`, in which case the key goes to
/// a temporary file first and is renamed over the old one (never a half-written key).
pub fn write_key_file(path: &Path, key: &ClusterKey, force: bool) -> Result<(), KeyFileError> {
    let error = |message: String| KeyFileError {
        path: path.to_path_buf(),
        message,
    };
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let exists = path.symlink_metadata().is_ok();
    if exists && !force {
        return Err(error(
            "already exists; refusing to overwrite a cluster key (pass --force to replace it)"
                .into(),
        ));
    }
    let target = if exists {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        directory.join(name)
    } else {
        path.to_path_buf()
    };
    let written = (|| -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true) // O_CREAT | O_EXCL
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&target)?;
        file.write_all(&key.bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        if exists {
            let _ = std::fs::remove_file(&target);
        }
        return Err(error(if exists {
            format!(
                "cannot write the new key to the temporary file {}: {e}",
                target.display()
            )
        } else {
            format!("cannot write the cluster key file: {e}")
        }));
    }
    if exists {
        std::fs::rename(&target, path).map_err(|e| {
            let _ = std::fs::remove_file(&target);
            error(format!("cannot replace the old key file: {e}"))
        })?;
    }
    File::open(&directory)
        .and_then(|d| d.sync_all())
        .map_err(|e| {
            error(format!(
                "written, but fsync of the directory {} failed: {e}",
                directory.display()
            ))
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vigil-auth-key-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn keygen_writes_mode_0600_and_the_key_loads_back() {
        let dir = temp_dir("keygen");
        let path = dir.join("cluster.key");
        let key = ClusterKey::generate().unwrap();
        write_key_file(&path, &key, false).unwrap();
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!(metadata.mode() & 0o7777, 0o600);
        assert_eq!(metadata.len(), KEY_BYTES as u64);
        let loaded = ClusterKey::load(&path).unwrap();
        assert_eq!(loaded.bytes, key.bytes);
        assert_eq!(loaded.id(), key.id());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn keygen_refuses_to_overwrite_without_force_and_replaces_with_force() {
        let dir = temp_dir("overwrite");
        let path = dir.join("cluster.key");
        let first = ClusterKey::generate().unwrap();
        write_key_file(&path, &first, false).unwrap();
        let second = ClusterKey::generate().unwrap();
        let refused = write_key_file(&path, &second, false).unwrap_err();
        assert!(refused.message.contains("--force"), "{refused}");
        assert_eq!(ClusterKey::load(&path).unwrap().bytes, first.bytes);

        write_key_file(&path, &second, true).unwrap();
        assert_eq!(ClusterKey::load(&path).unwrap().bytes, second.bytes);
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!(metadata.mode() & 0o7777, 0o600);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn generated_keys_differ() {
        let a = ClusterKey::generate().unwrap();
        let b = ClusterKey::generate().unwrap();
        assert_ne!(a.bytes, b.bytes);
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn load_refuses_group_or_world_access_and_names_the_fix() {
        let dir = temp_dir("mode");
        let path = dir.join("cluster.key");
        write_key_file(&path, &ClusterKey::generate().unwrap(), false).unwrap();
        for mode in [0o640, 0o604, 0o620, 0o602, 0o644, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let refused = ClusterKey::load(&path).unwrap_err();
            let text = refused.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(
                text.contains(&format!("chmod 600 {}", path.display())),
                "{text}"
            );
            assert!(text.contains(&format!("{mode:04o}")), "{text}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        ClusterKey::load(&path).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_refuses_wrong_sizes() {
        let dir = temp_dir("size");
        for len in [0usize, 1, 31, 33, 64] {
            let path = dir.join(format!("key-{len}"));
            std::fs::write(&path, vec![7u8; len]).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let refused = ClusterKey::load(&path).unwrap_err();
            assert_eq!(refused.path, path);
            assert!(
                refused.message.contains(&format!("holds {len} bytes")),
                "{refused}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_refuses_non_regular_files_and_missing_ones() {
        let dir = temp_dir("type");
        let refused = ClusterKey::load(&dir).unwrap_err();
        assert!(refused.message.contains("not a regular file"), "{refused}");

        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c_path is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let refused = ClusterKey::load(&fifo).unwrap_err();
        assert!(refused.message.contains("not a regular file"), "{refused}");

        let missing = dir.join("missing");
        let refused = ClusterKey::load(&missing).unwrap_err();
        assert!(refused
            .to_string()
            .starts_with(&missing.display().to_string()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
