//! `vigil sweep-snapshots`: removes snapshot directories from shared storage, in a
//! short-lived child process of the agent.
//!
//! Listing and removing directories on shared storage can take as long as that storage
//! likes (NFS, a busy Ceph), so the agent's event loop never does it: it spawns this
//! command (at most `limits::MAX_SNAPSHOT_SWEEPERS` at once) and reaps it later.
//!
//! - `--dir <shared>/vms/<vm> --before <token>-<seq>`: removes the `<token>-<seq>`
//!   directories older than that chain head (superseded by a newer full snapshot).
//! - `--dir <shared>/vms/<vm> --deleted-before <token>`: the VM was deleted: removes
//!   every `<token>-<seq>` directory with a smaller token, then the VM's directory if
//!   that left it empty. Tokens only grow, so a VM created again under the same id
//!   (tokens above the delete's index) keeps its snapshots even if a sweep of its
//!   earlier life runs late.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// What to remove from a VM's snapshot directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sweep {
    /// Every `<token>-<seq>` directory older than this (token, seq).
    Before(u64, u64),
    /// Everything of a deleted VM: directories with a token below this, then the VM's
    /// directory if it is empty.
    Deleted(u64),
}

/// The arguments after `vigil` that run `sweep` on `dir`.
pub fn args(dir: &Path, sweep: Sweep) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["sweep-snapshots".into(), "--dir".into(), dir.into()];
    match sweep {
        Sweep::Before(token, seq) => {
            args.push("--before".into());
            args.push(format!("{token}-{seq}").into());
        }
        Sweep::Deleted(token) => {
            args.push("--deleted-before".into());
            args.push(token.to_string().into());
        }
    }
    args
}

/// Parses `<token>-<seq>`.
pub fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (t, q) = name.split_once('-')?;
    Some((t.parse().ok()?, q.parse().ok()?))
}

/// The `<token>-<seq>` directories in `dir` older than `head` (token, then sequence).
pub fn superseded(dir: &Path, head: (u64, u64)) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if parse_name(&name).is_some_and(|ts| ts < head) {
            names.push(name);
        }
    }
    Ok(names)
}

/// Runs one sweep; returns how many directories it removed.
pub fn run(dir: &Path, sweep: Sweep) -> Result<usize, String> {
    match sweep {
        Sweep::Deleted(token) => {
            let removed = run(dir, Sweep::Before(token, 0))?;
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                // Not empty (a newer life of the VM, or a stray file): left alone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {}
                Err(e) => return Err(format!("remove {}: {e}", dir.display())),
            }
            Ok(removed)
        }
        Sweep::Before(token, seq) => {
            let names = match superseded(dir, (token, seq)) {
                Ok(names) => names,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(format!("list {}: {e}", dir.display())),
            };
            let mut removed = 0;
            let mut failed = Vec::new();
            for name in names {
                let path = dir.join(&name);
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => failed.push(format!("remove {}: {e}", path.display())),
                }
            }
            if failed.is_empty() {
                Ok(removed)
            } else {
                Err(failed.join("; "))
            }
        }
    }
}

const USAGE: &str =
    "Usage: vigil sweep-snapshots --dir DIR (--before TOKEN-SEQ | --deleted-before TOKEN)

Removes snapshot directories of one VM from shared storage (the agent runs this in a
child process so its event loop never waits on storage).
  --dir DIR             the VM's directory, <shared_dir>/vms/<vm-id>
  --before TOKEN-SEQ    remove the <token>-<seq> directories older than this one
  --deleted-before TOKEN  the VM was deleted: remove the directories with a smaller
                        token, then DIR if it is empty
";

/// `vigil sweep-snapshots`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut dir: Option<PathBuf> = None;
    let mut sweep: Option<Sweep> = None;
    let parsed: Result<(), String> = (|| {
        while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
            match arg {
                Long("dir") => dir = Some(parser.value().map_err(|e| e.to_string())?.into()),
                Long("before") => {
                    let v = parser.value().map_err(|e| e.to_string())?;
                    let v = v.to_string_lossy();
                    let (t, q) = parse_name(&v)
                        .ok_or_else(|| format!("--before {v}: expected <token>-<seq>"))?;
                    sweep = Some(Sweep::Before(t, q));
                }
                Long("deleted-before") => {
                    let v = parser.value().map_err(|e| e.to_string())?;
                    let v = v.to_string_lossy();
                    let t = v
                        .parse()
                        .map_err(|_| format!("--deleted-before {v}: expected a token"))?;
                    sweep = Some(Sweep::Deleted(t));
                }
                Long("help") | Short('h') => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                _ => return Err(arg.unexpected().to_string()),
            }
        }
        Ok(())
    })();
    let (dir, sweep) = match (parsed, dir, sweep) {
        (Ok(()), Some(d), Some(s)) => (d, s),
        (Err(e), _, _) => {
            eprintln!("vigil sweep-snapshots: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
        _ => {
            eprintln!("vigil sweep-snapshots: --dir and one of --before/--deleted-before are required\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&dir, sweep) {
        Ok(n) => {
            log::debug!("sweep {}: removed {n}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::warn!("sweep {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_what_the_head_superseded_or_everything() {
        let dir = std::env::temp_dir().join(format!("vigil-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["3-1", "3-2", "5-1", "5-2", "9-1", "tmp-x", "notes"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("3-1/memory"), b"x").unwrap();
        assert_eq!(run(&dir, Sweep::Before(5, 2)), Ok(3));
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["5-2", "9-1", "notes", "tmp-x"]);
        // Missing directories are not an error: the work is already done.
        assert_eq!(run(&dir.join("gone"), Sweep::Before(1, 1)), Ok(0));
        // A deleted VM: its old life goes, a newer life (token 9) stays.
        assert_eq!(run(&dir, Sweep::Deleted(6)), Ok(1));
        assert!(dir.join("9-1").exists());
        std::fs::remove_dir_all(dir.join("notes")).unwrap();
        std::fs::remove_dir_all(dir.join("tmp-x")).unwrap();
        assert_eq!(run(&dir, Sweep::Deleted(10)), Ok(1));
        assert!(!dir.exists(), "an emptied directory is removed too");
        assert_eq!(run(&dir, Sweep::Deleted(10)), Ok(0));
    }

    #[test]
    fn args_round_trip_through_the_parser_names() {
        let a = args(Path::new("/s/vms/a"), Sweep::Before(7, 3));
        assert_eq!(a[0], "sweep-snapshots");
        assert_eq!(a[4], "7-3");
        assert_eq!(parse_name("7-3"), Some((7, 3)));
        assert_eq!(parse_name("7-x"), None);
        assert_eq!(parse_name("tmp"), None);
    }
}
