//! The one error type of the WAL: each variant names the file (and byte offset where
//! there is one) so an operator can find what went wrong.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the WAL or the hard-state file.
#[derive(Debug)]
pub enum Error {
    /// A system call on a file or directory failed.
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    /// Reserving disk space for a new segment failed (disk full, file size limit). Nothing
    /// of the batch that needed the space was appended.
    Preallocate {
        path: PathBuf,
        bytes: u64,
        source: io::Error,
    },
    /// Bytes on disk that are damaged, not merely torn: the log cannot be trusted past
    /// this point and nothing was repaired.
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// A segment file in the middle of the log is missing.
    MissingSegment { dir: PathBuf, seq: u64 },
    /// The hard-state file is non-empty but neither slot is valid.
    HardStateCorrupt { path: PathBuf },
    /// The caller asked for something the log cannot do (a bug in the caller).
    InvalidArgument(String),
    /// The options are inconsistent.
    InvalidOptions(String),
}

/// The WAL's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, offset: u64, what: impl Into<String>) -> Error {
        Error::Corrupt {
            path: path.into(),
            offset,
            what: what.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, op, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
            Error::Preallocate {
                path,
                bytes,
                source,
            } => write!(
                f,
                "cannot preallocate {bytes} bytes for {}: {source}",
                path.display()
            ),
            Error::Corrupt { path, offset, what } => {
                write!(
                    f,
                    "corrupt WAL file {} at byte offset {offset}: {what}",
                    path.display()
                )
            }
            Error::MissingSegment { dir, seq } => write!(
                f,
                "WAL directory {}: segment {seq:016x}.seg is missing from the middle of the log",
                dir.display()
            ),
            Error::HardStateCorrupt { path } => write!(
                f,
                "hard-state file {}: both slots are invalid (byte offsets 0 and 512)",
                path.display()
            ),
            Error::InvalidArgument(what) => write!(f, "invalid WAL call: {what}"),
            Error::InvalidOptions(what) => write!(f, "invalid WAL options: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } | Error::Preallocate { source, .. } => Some(source),
            _ => None,
        }
    }
}
