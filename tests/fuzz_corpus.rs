//! Replays the committed fuzz inputs on stable Rust: every seed (`fuzz/seeds/<target>/`)
//! and every crash the fuzzer ever found (`fuzz/regressions/<target>/`) goes through the
//! same entry point as the fuzz target (`vigil::fuzzing`). A crash that comes back fails
//! here, naming the file.
//!
//! `cargo test --test fuzz_corpus -- --ignored write_seeds` rewrites the seeds from the
//! encoders (valid messages the fuzzer then mutates).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use vigil::fuzzing::{Target, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("read_dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target` over every file in `dir`; returns the files that panicked.
fn replay(target: &Target, dir: &Path) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let inputs = files(dir);
    for file in &inputs {
        let data = std::fs::read(file).expect("read input");
        if catch_unwind(AssertUnwindSafe(|| (target.run)(&data))).is_err() {
            failures.push(file.display().to_string());
        }
    }
    (inputs.len(), failures)
}

#[test]
fn every_regression_input_runs_clean() {
    let mut failures = Vec::new();
    for target in TARGETS {
        let (_, failed) = replay(target, &fuzz_dir().join("regressions").join(target.name));
        failures.extend(failed);
    }
    assert!(failures.is_empty(), "crashing inputs: {failures:#?}");
}

#[test]
fn every_seed_runs_clean_and_every_target_has_seeds() {
    let mut failures = Vec::new();
    for target in TARGETS {
        let (count, failed) = replay(target, &fuzz_dir().join("seeds").join(target.name));
        assert!(count > 0, "no seeds for fuzz target {}", target.name);
        failures.extend(failed);
    }
    assert!(failures.is_empty(), "crashing seeds: {failures:#?}");
}

#[test]
fn every_target_has_a_cargo_fuzz_binary_and_vice_versa() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for target in TARGETS {
        let source = fuzz_dir()
            .join("fuzz_targets")
            .join(format!("{}.rs", target.name));
        let text = std::fs::read_to_string(&source)
            .unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        assert!(
            text.contains(&format!("vigil::fuzzing::{}(data)", target.name)),
            "{} does not call its entry point",
            source.display()
        );
        assert!(manifest.contains(&format!("name = \"{}\"", target.name)));
    }
    let binaries = files(&fuzz_dir().join("fuzz_targets")).len();
    assert_eq!(
        binaries,
        TARGETS.len(),
        "a fuzz target missing from TARGETS"
    );
}

#[test]
fn the_handshake_seeds_complete_a_handshake() {
    let dir = fuzz_dir().join("seeds").join("handshake");
    let seeds = files(&dir);
    assert!(seeds.len() >= 2);
    for file in seeds {
        let data = std::fs::read(&file).unwrap();
        assert!(
            vigil::fuzzing::handshake_established(&data),
            "{} does not complete",
            file.display()
        );
        // One byte changed anywhere after the role byte and it no longer does.
        for at in [1, data.len() / 2, data.len() - 1] {
            let mut changed = data.clone();
            changed[at] ^= 0x40;
            assert!(!vigil::fuzzing::handshake_established(&changed), "{at}");
        }
    }
}

/// The seeds themselves are replayed by the tests above; this only (re)writes them.
#[test]
#[ignore = "writes fuzz/seeds/; run by hand after a format change"]
fn write_seeds() {
    for (target, name, bytes) in seeds::all() {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

mod seeds {
    use vigil::auth::handshake::{Handshake, Step};
    use vigil::auth::{ClusterKey, KeyRing, Session};
    use vigil::cluster::command::{Command, KvCommand, RequestId};
    use vigil::cluster::kv::KvStore;
    use vigil::net::frame;
    use vigil_kvm::control::{Reply, Request, SnapshotKindWire, Status, VmmState};
    use vigil_kvm::state::{self, zeroed, MemoryKind, VcpuState, VmState};

    type Seed = (&'static str, String, Vec<u8>);

    pub fn all() -> Vec<Seed> {
        let mut out = Vec::new();
        peer_frame(&mut out);
        handshake(&mut out);
        frame_mac(&mut out);
        http(&mut out);
        config(&mut out);
        commands(&mut out);
        vm_state(&mut out);
        vmm_control(&mut out);
        wal_segment(&mut out);
        out
    }

    /// A segment with entries, a truncation, a torn record and a record after it that
    /// claims the log was synced beyond the torn one (corruption, not a torn tail).
    fn wal_segment(out: &mut Vec<Seed>) {
        use vigil_wal::format::{self, RecordHeader, RecordKind, SegmentHeader};
        let seq = 3;
        let mut buf = vec![0u8; 4096];
        format::encode_segment_header(
            &mut buf,
            &SegmentHeader {
                seq,
                first_index: 10,
                segment_bytes: 4096,
                data_offset: 64,
            },
        );
        let mut at = 64;
        for (kind, index, payload) in [
            (RecordKind::Entry, 10, &b"put a"[..]),
            (RecordKind::Entry, 11, &b"put b"[..]),
            (RecordKind::Truncate, 11, &b""[..]),
            (RecordKind::Entry, 11, &b"put c"[..]),
            (RecordKind::Compact, 10, &b""[..]),
        ] {
            let header = RecordHeader {
                kind,
                index,
                term: 2,
                synced_to: format::position(seq, at as u64),
            };
            at += format::encode_record(&mut buf[at..], seq, &header, payload);
        }
        let mut sealed = buf.clone();
        let header = RecordHeader {
            kind: RecordKind::Seal,
            index: 12,
            term: 2,
            synced_to: format::position(seq, at as u64),
        };
        format::encode_record(&mut sealed[at..], seq, &header, b"");
        out.push(("wal_segment", "sealed".into(), sealed));

        let torn = at;
        at += format::encode_record(
            &mut buf[at..],
            seq,
            &RecordHeader {
                kind: RecordKind::Entry,
                index: 12,
                term: 2,
                synced_to: format::position(seq, torn as u64),
            },
            b"torn entry",
        );
        buf[torn + 45] ^= 0xff;
        format::encode_record(
            &mut buf[at..],
            seq,
            &RecordHeader {
                kind: RecordKind::Entry,
                index: 13,
                term: 2,
                synced_to: format::position(seq, at as u64 + 100),
            },
            b"later",
        );
        let summary = format::scan_segment(&buf).expect("the seed's header is valid");
        assert_eq!(summary.records, 5);
        assert!(summary.after.max_synced_to.is_some());
        out.push(("wal_segment", "torn-then-synced".into(), buf));
    }

    fn peer_frame(out: &mut Vec<Seed>) {
        let mut two = Vec::new();
        frame::encode(1, b"append entries", &mut two);
        frame::encode(2, &[], &mut two);
        out.push(("peer_frame", "two-frames".into(), two));
    }

    /// The same keys and nonces as `vigil::fuzzing::handshake`, so that these seeds
    /// reach the end of the handshake.
    fn handshake(out: &mut Vec<Seed>) {
        let keys = KeyRing::new(
            ClusterKey::from_bytes([0x5a; 32]),
            Some(ClusterKey::from_bytes([0xa5; 32])),
        );
        let everyone = |_: u64| true;
        // Role 0: the fuzzed machine is responder 2 with nonce 0x22; a real initiator 3.
        let mut hello = Vec::new();
        let mut initiator = Handshake::initiator(&keys, 3, 2, [0x33; 32], &mut hello);
        let mut responder = Handshake::responder(&keys, 2, [0x22; 32]);
        let mut challenge = Vec::new();
        responder
            .receive(&hello, &everyone, &mut challenge)
            .unwrap();
        let mut proof = Vec::new();
        assert!(matches!(
            initiator.receive(&challenge, &everyone, &mut proof),
            Ok(Step::Established(_))
        ));
        let mut seed = vec![0u8];
        seed.extend_from_slice(&hello);
        seed.extend_from_slice(&proof);
        out.push(("handshake", "responder-full".into(), seed));
        // Role 1: the fuzzed machine is initiator 1 -> 2 with nonce 0x11.
        let mut hello = Vec::new();
        let _ = Handshake::initiator(&keys, 1, 2, [0x11; 32], &mut hello);
        let mut responder = Handshake::responder(&keys, 2, [0x44; 32]);
        let mut challenge = Vec::new();
        responder
            .receive(&hello, &everyone, &mut challenge)
            .unwrap();
        let mut seed = vec![1u8];
        seed.extend_from_slice(&challenge);
        out.push(("handshake", "initiator-full".into(), seed));
    }

    fn frame_mac(out: &mut Vec<Seed>) {
        let mut session = Session::new(&[1; 32], &[2; 32]);
        let mut sealed = b"\x05frame".to_vec();
        session.sealer.seal(&mut sealed, 0).unwrap();
        out.push(("frame_mac", "sealed".into(), sealed));
    }

    fn http(out: &mut Vec<Seed>) {
        let requests = b"GET /status HTTP/1.1\r\nHost: vigil\r\n\r\n\
            PUT /kv/a HTTP/1.1\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc\
            POST /fence-token/validate?x=1 HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}";
        out.push(("http_request", "pipelined".into(), requests.to_vec()));
    }

    fn config(out: &mut Vec<Seed>) {
        let text = r#"node_id = 1
listen = "127.0.0.1:7001"
data_dir = "/var/lib/vigil"
shared_dir = "/srv/vigil-shared"
control_socket = "/run/vigil/vigil.sock"
key_file = "/etc/vigil/cluster.key"

[timing]
heartbeat_ms = 20
election_min_ms = 100
election_max_ms = 200
lease_ms = 500
clock_rate_bound_ppm = 10000
fence_margin_ms = 50

[[peers]]
id = 1
address = "127.0.0.1:7001"
role = "voter"

[[peers]]
id = 2
address = "[::1]:7002"
role = "observer"
"#;
        out.push(("config", "two-peers.toml".into(), text.as_bytes().to_vec()));
    }

    fn commands(out: &mut Vec<Seed>) {
        let put = Command::Kv(KvCommand::Put {
            key: "vm/1/owner".into(),
            value: b"host-3".to_vec(),
            if_revision: Some(4),
        });
        let delete = Command::Kv(KvCommand::Delete {
            key: "vm/1/owner".into(),
            if_revision: None,
        });
        let mut store = KvStore::new();
        for (i, command) in [&put, &delete, &put].into_iter().enumerate() {
            let mut bytes = Vec::new();
            command.encode(RequestId(i as u64 + 1), &mut bytes);
            out.push(("cluster_command", format!("command-{i}"), bytes));
            if let Command::Kv(kv) = command {
                store.apply(i as u64 + 1, kv);
            }
        }
        let unconditional = KvCommand::Put {
            key: "a".into(),
            value: vec![],
            if_revision: None,
        };
        store.apply(9, &unconditional);
        let mut bytes = Vec::new();
        store.encode(&mut bytes);
        out.push(("kv_snapshot", "store".into(), bytes));
    }

    fn vm_state(out: &mut Vec<Seed>) {
        let vcpu = VcpuState {
            cpuid: vec![zeroed(), zeroed()],
            mp_state: zeroed(),
            regs: zeroed(),
            sregs: zeroed(),
            fpu: zeroed(),
            xsave: [0; 1024],
            xcrs: zeroed(),
            debug_regs: zeroed(),
            lapic: zeroed(),
            msrs: vec![zeroed(), zeroed()],
            events: zeroed(),
        };
        for (name, memory) in [
            ("full", MemoryKind::Full),
            (
                "diff",
                MemoryKind::Diff {
                    parent_id: 6,
                    dirty_bitmap: vec![0b1011, 0],
                },
            ),
        ] {
            let vm = VmState {
                snapshot_id: 7,
                memory_bytes: 128 * 4096,
                memory,
                pic_master: zeroed(),
                pic_slave: zeroed(),
                ioapic: zeroed(),
                pit: zeroed(),
                clock: zeroed(),
                vcpus: vec![vcpu.clone()],
            };
            let bytes = state::encode(&vm);
            state::decode(&bytes).expect("the seed decodes");
            out.push(("vm_state", name.into(), bytes));
        }
    }

    fn vmm_control(out: &mut Vec<Seed>) {
        let mut requests = Vec::new();
        for request in [
            Request::Pause,
            Request::Resume,
            Request::Status,
            Request::Stop,
            Request::Renew {
                token: 42,
                deadline_ns: 1_000_000,
            },
            Request::Snapshot {
                kind: SnapshotKindWire::Diff,
                path: "/srv/vigil-shared/vms/1/42-3".into(),
            },
        ] {
            requests.extend_from_slice(&request.encode());
        }
        out.push(("vmm_control", "requests".into(), requests));
        let mut replies = Vec::new();
        for reply in [
            Reply::Status(Status {
                state: VmmState::Running,
                token: 42,
                counter: 7,
                reports: 1,
                lease_deadline_ns: 99,
                last_snapshot_id: 3,
            }),
            Reply::Error {
                code: 3,
                message: "stale token".into(),
            },
        ] {
            replies.extend_from_slice(&reply.encode());
        }
        out.push(("vmm_control", "replies".into(), replies));
    }
}
