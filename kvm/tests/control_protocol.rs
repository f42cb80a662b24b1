//! The control protocol decoder: garbage, truncated and oversized frames are rejected
//! (or wait for more bytes) without panicking.

use vigil_kvm::control::{decode_frame, Reply, Request, SnapshotKindWire, HEADER_LEN};

const MAX: usize = 8192;

#[test]
fn truncated_frames_wait_for_more_bytes() {
    let frame = Request::Snapshot {
        kind: SnapshotKindWire::Full,
        path: "/shared/vms/1/9-1".into(),
    }
    .encode();
    for len in 0..frame.len() {
        assert_eq!(
            decode_frame(&frame[..len], MAX).unwrap(),
            None,
            "prefix {len}"
        );
    }
    assert!(decode_frame(&frame, MAX).unwrap().is_some());
}

#[test]
fn oversized_frames_are_refused_at_the_header() {
    let mut frame = Request::Status.encode();
    frame[8..12].copy_from_slice(&(MAX as u32).to_le_bytes());
    let err = decode_frame(&frame[..HEADER_LEN], MAX).unwrap_err();
    assert!(err.what.contains("exceeds"), "{err}");
    assert_eq!(err.offset, 8);
}

#[test]
fn bad_fields_are_named() {
    let frame = Request::Status.encode();
    let mut bad_magic = frame.clone();
    bad_magic[1] = b'x';
    assert!(decode_frame(&bad_magic[..2], MAX)
        .unwrap_err()
        .what
        .contains("magic"));
    let mut bad_version = frame.clone();
    bad_version[4] = 9;
    assert!(decode_frame(&bad_version, MAX)
        .unwrap_err()
        .what
        .contains("version 9"));
    let mut bad_crc = frame.clone();
    bad_crc[15] ^= 1;
    assert!(decode_frame(&bad_crc, MAX)
        .unwrap_err()
        .what
        .contains("CRC"));
    // A well-framed request with a payload of the wrong size.
    let renew = Request::Renew {
        token: 1,
        deadline_ns: 2,
    }
    .encode();
    let (frame, _) = decode_frame(&renew, MAX).unwrap().unwrap();
    let short = vigil_kvm::control::Frame {
        kind: frame.kind,
        payload: &frame.payload[..15],
    };
    assert!(Request::decode(&short)
        .unwrap_err()
        .what
        .contains("renew payload"));
}

#[test]
fn garbage_never_panics() {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let valid = [
        Request::Status.encode(),
        Request::Renew {
            token: 3,
            deadline_ns: 4,
        }
        .encode(),
        Request::Snapshot {
            kind: SnapshotKindWire::Diff,
            path: "/a/b".into(),
        }
        .encode(),
    ];
    for round in 0..20_000 {
        let mut bytes = if round % 2 == 0 {
            let len = (next() % 64) as usize;
            (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
        } else {
            valid[round % valid.len()].clone()
        };
        // Corrupt a few bytes, keeping the magic half the time so deeper fields are hit.
        for _ in 0..(next() % 4) {
            if !bytes.is_empty() {
                let at = next() as usize % bytes.len();
                if at >= 4 || round % 4 == 1 {
                    bytes[at] = next() as u8;
                }
            }
        }
        // A third of the time, fix the length and CRC so the message decoders are reached.
        if round % 3 == 0 && bytes.len() >= HEADER_LEN {
            let len = (bytes.len() - HEADER_LEN) as u32;
            bytes[8..12].copy_from_slice(&len.to_le_bytes());
            let mut crc = crc32fast::Hasher::new();
            crc.update(&bytes[..12]);
            crc.update(&bytes[HEADER_LEN..]);
            let crc = crc.finalize().to_le_bytes();
            bytes[12..16].copy_from_slice(&crc);
        }
        if let Ok(Some((frame, used))) = decode_frame(&bytes, MAX) {
            assert!(used <= bytes.len());
            let _ = Request::decode(&frame);
            let _ = Reply::decode(&frame);
        }
    }
}
