//! An agent refuses to start on unsafe or damaged local state, and says why: a key file
//! that group or others may read, a config without a key file, a damaged WAL segment or
//! hard-state file (file and byte offset named). The WAL crate's own tests cover every
//! kind of damage on the files; these check that the agent process stops on it instead of
//! serving.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Cluster;

/// Waits for node `id` to exit; returns its exit status and its log.
fn exit_of(c: &mut Cluster, id: u64) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    let node = &mut c.nodes[id as usize - 1];
    let child = node.child.as_mut().expect("started");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            node.child = None;
            let log = std::fs::read_to_string(node.dir.join("log")).unwrap();
            return (status, log);
        }
        assert!(start.elapsed() < common::LIMIT, "the agent kept running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A one-node cluster that committed a few puts and was stopped cleanly.
fn stopped_node(name: &str) -> Cluster {
    let mut c = Cluster::start(name, 1, "auto");
    c.wait_leader();
    for i in 0..20 {
        c.put_retry(&format!("k{i}"), &"v".repeat(200));
    }
    assert!(c.terminate(1).success());
    c
}

#[test]
fn a_key_file_others_may_read_is_refused_with_the_fix() {
    let mut c = stopped_node("start-key-mode");
    let key = c.key_file();
    for mode in [0o640, 0o604, 0o660] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        c.restart(1);
        let (status, log) = exit_of(&mut c, 1);
        assert!(!status.success(), "started with key mode {mode:o}");
        assert!(
            log.contains(&format!("mode {mode:04o}")) && log.contains("chmod 600"),
            "mode {mode:o}: {log}"
        );
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    c.restart(1);
    c.wait_leader();
}

#[test]
fn a_config_without_a_key_file_is_refused() {
    let mut c = stopped_node("start-no-key");
    let config = c.node(1).config.clone();
    let text = std::fs::read_to_string(&config).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("key_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&config, without).unwrap();
    c.restart(1);
    let (status, log) = exit_of(&mut c, 1);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("missing key 'key_file'") && log.contains("vigil keygen"),
        "{log}"
    );
}

fn segments(data: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn a_damaged_wal_segment_stops_the_agent_naming_file_and_offset() {
    let mut c = stopped_node("start-wal");
    let data = c.node(1).dir.join("data");
    let segment = segments(&data).into_iter().next().expect("a WAL segment");
    // A byte inside the first record: later records prove it was synced, so this is
    // damage, not a torn tail.
    let offset = vigil::limits::WAL_SEGMENT_HEADER_BYTES + 40;
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[offset as usize] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();
    c.restart(1);
    let (status, log) = exit_of(&mut c, 1);
    assert!(!status.success(), "started on a damaged WAL");
    let name = segment.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        log.contains("corrupt WAL file") && log.contains(&name) && log.contains("byte offset"),
        "{log}"
    );
}

#[test]
fn a_damaged_hard_state_file_stops_the_agent_naming_it() {
    let mut c = stopped_node("start-hardstate");
    let path = c.node(1).dir.join("data").join("hardstate");
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    std::fs::write(&path, vec![0xA5; len]).unwrap();
    c.restart(1);
    let (status, log) = exit_of(&mut c, 1);
    assert!(!status.success(), "started on a damaged hard-state file");
    assert!(
        log.contains("hard-state file")
            && log.contains(&path.display().to_string())
            && log.contains("byte offsets 0 and 512"),
        "{log}"
    );
}
