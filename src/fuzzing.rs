//! Entry points of the fuzz targets (`fuzz/`, run with `tools/fuzz`).
//!
//! Each function takes arbitrary bytes, feeds them to one decoder of hostile input and
//! checks what must hold for every input: no panic, and for input that decodes, that
//! encoding it again gives back the same value. The cargo-fuzz targets call these, and
//! `tests/fuzz_corpus.rs` replays every committed crash (`fuzz/regressions/<target>/`)
//! and seed (`fuzz/seeds/<target>/`) through them on stable Rust, so a fixed crash stays
//! fixed. A failed check panics: that is how a fuzzer learns about it.

use std::path::Path;

use crate::auth::handshake::{self, Handshake, Step};
use crate::auth::{ClusterKey, KeyRing, Session};
use crate::cluster::command::Command;
use crate::cluster::kv::KvStore;
use crate::codec::Reader;
use crate::config::Config;
use crate::control::http;
use crate::limits;
use crate::net::frame;

/// A fuzz target: its name (the directory under `fuzz/`) and its entry point.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order `tools/fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "peer_frame",
        run: peer_frame,
    },
    Target {
        name: "handshake",
        run: handshake,
    },
    Target {
        name: "frame_mac",
        run: frame_mac,
    },
    Target {
        name: "http_request",
        run: http_request,
    },
    Target {
        name: "config",
        run: config,
    },
    Target {
        name: "cluster_command",
        run: cluster_command,
    },
    Target {
        name: "kv_snapshot",
        run: kv_snapshot,
    },
    Target {
        name: "vm_state",
        run: vm_state,
    },
    Target {
        name: "vmm_control",
        run: vmm_control,
    },
    Target {
        name: "wal_segment",
        run: wal_segment,
    },
];

/// The peer frame decoder over a stream of frames: every frame found re-encodes to the
/// bytes it was decoded from.
pub fn peer_frame(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some(found)) = frame::decode(rest) {
        assert!(found.consumed >= frame::HEADER_BYTES && found.consumed <= rest.len());
        let mut again = Vec::new();
        frame::encode(found.kind, found.payload, &mut again);
        assert_eq!(again, rest[..found.consumed], "frame does not re-encode");
        rest = &rest[found.consumed..];
    }
    let _ = frame::decode_header(data);
}

fn fuzz_keys() -> KeyRing {
    KeyRing::new(
        ClusterKey::from_bytes([0x5a; 32]),
        Some(ClusterKey::from_bytes([0xa5; 32])),
    )
}

/// The handshake decoder, and both roles of the state machine fed the bytes as a peer's
/// stream. The first byte picks the role.
pub fn handshake(data: &[u8]) {
    handshake_established(data);
}

/// [`handshake`], saying whether the bytes completed a handshake (the committed seeds
/// do, so the fuzzer starts from the deepest path).
pub fn handshake_established(data: &[u8]) -> bool {
    if let Ok(Some((message, used))) = handshake::decode(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        message.encode(&mut again);
        assert_eq!(again, data[..used], "handshake message does not re-encode");
    }
    let Some((&role, stream)) = data.split_first() else {
        return false;
    };
    let keys = fuzz_keys();
    let members = |id: u64| (1..=7).contains(&id);
    let mut out = Vec::new();
    let mut machine = if role & 1 == 0 {
        Handshake::responder(&keys, 2, [0x22; 32])
    } else {
        Handshake::initiator(&keys, 1, 2, [0x11; 32], &mut out)
    };
    let mut at = 0;
    // Feed the stream in pieces whose sizes come from the role byte, as reads would.
    let piece = 1 + (role as usize >> 1);
    let mut end = piece.min(stream.len());
    loop {
        let before = out.len();
        match machine.receive(&stream[at..end], &members, &mut out) {
            Ok(Step::NeedMore) => {
                assert_eq!(out.len(), before, "nothing is sent while waiting");
                if end == stream.len() {
                    break;
                }
                end = (end + piece).min(stream.len());
            }
            Ok(Step::Continue { consumed }) => {
                assert!(consumed > 0 && at + consumed <= end);
                at += consumed;
                end = end.max(at);
            }
            Ok(Step::Established(done)) => {
                assert!(at + done.consumed <= end);
                assert!(members(done.peer));
                return true;
            }
            Err(_) => {
                assert_eq!(out.len(), before, "nothing is sent on an error");
                return false;
            }
        }
    }
    false
}

/// Opening arbitrary sealed frames: never panics, and a refused frame poisons the session.
pub fn frame_mac(data: &[u8]) {
    let mut session = Session::new(&[1; 32], &[2; 32]);
    let mut peer = Session::new(&[2; 32], &[1; 32]);
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let (first, second) = data.split_at(split);
    for piece in [first, second] {
        let mut sealed = piece.to_vec();
        peer.sealer.seal(&mut sealed, 0).unwrap();
        assert_eq!(session.opener.open(&sealed).unwrap(), piece);
    }
    // Now the raw bytes as a forged frame: refused, and the session stays refused.
    assert!(session.opener.open(data).is_err());
    let mut sealed = first.to_vec();
    peer.sealer.seal(&mut sealed, 0).unwrap();
    assert!(session.opener.open(&sealed).is_err());
}

/// The control API's HTTP request parser over a stream of pipelined requests.
pub fn http_request(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some(request)) = http::parse_request(rest) {
        assert!(request.consumed > 0 && request.consumed <= rest.len());
        assert!(request.body.len() <= limits::MAX_CONTROL_BODY_BYTES);
        assert!(request.path.starts_with('/'));
        rest = &rest[request.consumed..];
    }
}

/// The config loader (TOML subset and checks) over arbitrary text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, Path::new("fuzz.toml")) {
        let _ = config.this_peer();
    }
}

/// The cluster command decoder: a decoded command re-encodes to a command that decodes
/// to the same value.
pub fn cluster_command(data: &[u8]) {
    if let Ok((request, command)) = Command::decode(data) {
        let mut again = Vec::new();
        command.encode(request, &mut again);
        assert_eq!(
            Command::decode(&again).as_ref(),
            Ok(&(request, command)),
            "command does not round-trip"
        );
    }
}

/// The metadata KV snapshot decoder, with the same round-trip check.
pub fn kv_snapshot(data: &[u8]) {
    let mut reader = Reader::new(data);
    if let Ok(store) = KvStore::decode(&mut reader) {
        let mut again = Vec::new();
        store.encode(&mut again);
        let mut reader = Reader::new(&again);
        let decoded = KvStore::decode(&mut reader).expect("an encoded store decodes");
        assert_eq!(reader.remaining(), 0);
        assert!(decoded == store, "KV store does not round-trip");
    }
}

/// The VM snapshot state-file parser: a decoded state encodes and decodes again to the
/// same bytes. The input is decoded as it is, and again with its lengths and CRCs
/// fixed up, so that the fuzzer reaches the record parser behind the checksums.
pub fn vm_state(data: &[u8]) {
    use vigil_kvm::state::HEADER_LEN;
    vm_state_once(data);
    if data.len() >= HEADER_LEN {
        let mut fixed = data.to_vec();
        let body_len = (data.len() - HEADER_LEN) as u64;
        fixed[16..24].copy_from_slice(&body_len.to_le_bytes());
        let body_crc = crc32fast::hash(&fixed[HEADER_LEN..]);
        fixed[24..28].copy_from_slice(&body_crc.to_le_bytes());
        let header_crc = crc32fast::hash(&fixed[..28]);
        fixed[28..32].copy_from_slice(&header_crc.to_le_bytes());
        vm_state_once(&fixed);
    }
}

fn vm_state_once(data: &[u8]) {
    if let Ok(state) = vigil_kvm::state::decode(data) {
        let encoded = vigil_kvm::state::encode(&state);
        let again = vigil_kvm::state::decode(&encoded).expect("an encoded state decodes");
        assert_eq!(
            vigil_kvm::state::encode(&again),
            encoded,
            "state does not round-trip"
        );
    }
}

/// The `vigil vmm` control protocol: frames, requests and replies; decoded as they are
/// and again with each frame's CRC fixed up, to reach the message decoders.
pub fn vmm_control(data: &[u8]) {
    use vigil_kvm::control::HEADER_LEN;
    vmm_control_once(data);
    let mut fixed = data.to_vec();
    let mut at = 0;
    while let Some(header) = fixed.get(at..at + HEADER_LEN) {
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let Some(end) = (at + HEADER_LEN)
            .checked_add(len)
            .filter(|&e| e <= fixed.len())
        else {
            break;
        };
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fixed[at..at + 12]);
        crc.update(&fixed[at + HEADER_LEN..end]);
        fixed[at + 12..at + 16].copy_from_slice(&crc.finalize().to_le_bytes());
        at = end;
    }
    vmm_control_once(&fixed);
}

fn vmm_control_once(data: &[u8]) {
    use vigil_kvm::control::{decode_frame, Reply, Request};
    let max = limits::MAX_VMM_CONTROL_FRAME_BYTES;
    let mut rest = data;
    while let Ok(Some((found, used))) = decode_frame(rest, max) {
        assert!(used <= rest.len() && used <= max);
        if let Ok(request) = Request::decode(&found) {
            let encoded = request.encode();
            let (frame, _) = decode_frame(&encoded, usize::MAX).unwrap().unwrap();
            assert_eq!(Request::decode(&frame).as_ref(), Ok(&request));
        }
        if let Ok(reply) = Reply::decode(&found) {
            let encoded = reply.encode();
            let (frame, _) = decode_frame(&encoded, usize::MAX).unwrap().unwrap();
            let again = Reply::decode(&frame).unwrap();
            // Error messages are cut at 1 KiB on encoding; everything else round-trips.
            let truncated = matches!(&reply, Reply::Error { message, .. } if message.len() > 1024);
            if !truncated {
                assert_eq!(again, reply);
            }
        }
        rest = &rest[used..];
    }
}

/// WAL recovery's pure segment scanner (`vigil_wal::format::scan_segment`: header, the
/// records in order, and the forward scan that tells a torn tail from corruption) over
/// the bytes as they are, and again with the header and every record's checksums fixed
/// up, so that the fuzzer controls record kinds, lengths, indexes and `synced_to` claims.
pub fn wal_segment(data: &[u8]) {
    use vigil_wal::format::{
        record_len, ScanEnd, FORMAT_VERSION, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SEGMENT_MAGIC,
    };
    let check = |buf: &[u8]| {
        if let Ok(summary) = vigil_wal::format::scan_segment(buf) {
            let data_offset = summary.header.data_offset as usize;
            assert!(summary.records <= buf.len().saturating_sub(data_offset) / RECORD_HEADER_LEN);
            let end = match summary.end {
                ScanEnd::Sealed { offset } | ScanEnd::Stopped { offset, .. } => offset,
            };
            assert!(end >= data_offset, "the scan ended before the data");
            if let Some(nonzero_end) = summary.after.nonzero_end {
                assert!(nonzero_end <= buf.len());
            }
        }
    };
    check(data);
    if data.len() < SEGMENT_HEADER_LEN {
        return;
    }
    let mut buf = data.to_vec();
    buf[0..8].copy_from_slice(&SEGMENT_MAGIC);
    buf[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // A plausible data offset and segment size, from the fuzzer's bytes.
    let data_offset = (SEGMENT_HEADER_LEN + (buf[12] as usize % 8) * 8).min(buf.len() / 8 * 8);
    buf[12..16].copy_from_slice(&(data_offset as u32).to_le_bytes());
    let segment_bytes = buf.len().max(4096) as u64;
    buf[32..40].copy_from_slice(&segment_bytes.to_le_bytes());
    let crc = crc32fast::hash(&buf[0..60]);
    buf[60..64].copy_from_slice(&crc.to_le_bytes());
    let seq = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
    let mut at = data_offset;
    while at + RECORD_HEADER_LEN <= buf.len() {
        let head = &buf[at..at + RECORD_HEADER_LEN];
        let payload_len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
        let end = at + record_len(payload_len.min(buf.len()));
        if payload_len > buf.len() || end > buf.len() {
            break;
        }
        let mut pcrc = crc32fast::Hasher::new();
        pcrc.update(&seq.to_le_bytes());
        pcrc.update(&buf[at + 8..at + 16]);
        pcrc.update(&buf[at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + payload_len]);
        let pcrc = pcrc.finalize();
        buf[at + 28..at + 32].copy_from_slice(&pcrc.to_le_bytes());
        let mut hcrc = crc32fast::Hasher::new();
        hcrc.update(&seq.to_le_bytes());
        hcrc.update(&buf[at + 4..at + RECORD_HEADER_LEN]);
        let hcrc = hcrc.finalize();
        buf[at..at + 4].copy_from_slice(&hcrc.to_le_bytes());
        at = end;
    }
    check(&buf);
}
