//! The state file format: round trip, and clear rejection of bad files.

use vigil_kvm::state::{self, MemoryKind, VcpuState, VmState};

fn sample_vcpu(seed: u64) -> VcpuState {
    let mut regs: kvm_bindings::kvm_regs = state::zeroed();
    regs.rip = 0x8000 + seed;
    regs.rax = seed * 7;
    let mut sregs: kvm_bindings::kvm_sregs = state::zeroed();
    sregs.cr3 = 0x10000;
    let mut xsave = [0u32; 1024];
    xsave[3] = seed as u32;
    let cpuid_entry = kvm_bindings::kvm_cpuid_entry2 {
        function: 1,
        ebx: seed as u32,
        ..Default::default()
    };
    VcpuState {
        cpuid: vec![cpuid_entry; 3],
        mp_state: kvm_bindings::kvm_mp_state { mp_state: 0 },
        regs,
        sregs,
        fpu: state::zeroed(),
        xsave,
        xcrs: state::zeroed(),
        debug_regs: state::zeroed(),
        lapic: state::zeroed(),
        msrs: (0..5)
            .map(|i| kvm_bindings::kvm_msr_entry {
                index: 0x10 + i,
                reserved: 0,
                data: seed + u64::from(i),
            })
            .collect(),
        events: state::zeroed(),
    }
}

fn sample_state(diff: bool) -> VmState {
    let memory_bytes = 64 << 20;
    let words = (memory_bytes / 4096 / 64) as usize;
    let mut bitmap = vec![0u64; words];
    bitmap[3] = 0xF0F0;
    let mut clock: kvm_bindings::kvm_clock_data = state::zeroed();
    clock.clock = 123_456_789;
    VmState {
        snapshot_id: 0xABCD,
        memory_bytes,
        memory: if diff {
            MemoryKind::Diff {
                parent_id: 0x1234,
                dirty_bitmap: bitmap,
            }
        } else {
            MemoryKind::Full
        },
        pic_master: state::zeroed(),
        pic_slave: state::zeroed(),
        ioapic: state::zeroed(),
        pit: state::zeroed(),
        clock,
        vcpus: vec![sample_vcpu(1), sample_vcpu(2)],
    }
}

#[test]
fn round_trip_is_exact() {
    for diff in [false, true] {
        let original = sample_state(diff);
        let bytes = state::encode(&original);
        let decoded = state::decode(&bytes).expect("decode");
        assert_eq!(decoded.snapshot_id, original.snapshot_id);
        assert_eq!(decoded.memory, original.memory);
        assert_eq!(decoded.vcpus.len(), 2);
        assert_eq!(decoded.vcpus[1].regs.rip, 0x8002);
        assert_eq!(decoded.vcpus[1].msrs[4].data, 6);
        assert_eq!(decoded.clock.clock, 123_456_789);
        // Re-encoding gives the same bytes: nothing was lost or invented.
        assert_eq!(state::encode(&decoded), bytes);
    }
}

#[test]
fn every_truncation_is_rejected() {
    let bytes = state::encode(&sample_state(true));
    for len in 0..bytes.len() {
        let err = state::decode(&bytes[..len])
            .err()
            .expect("truncated file accepted");
        assert!(
            err.what.contains("truncated"),
            "prefix of {len} bytes: unclear error {err}"
        );
    }
}

#[test]
fn bit_flips_are_rejected() {
    let bytes = state::encode(&sample_state(false));
    // Every bit of the header, and a spread of bits through the body.
    let positions =
        (0..state::HEADER_LEN * 8).chain((state::HEADER_LEN * 8..bytes.len() * 8).step_by(97));
    for bit in positions {
        let mut corrupt = bytes.clone();
        corrupt[bit / 8] ^= 1 << (bit % 8);
        let err = state::decode(&corrupt).err().expect("bit flip accepted");
        assert!(!err.what.is_empty());
        if bit / 8 >= state::HEADER_LEN {
            assert!(err.what.contains("body CRC"), "bit {bit}: {err}");
        }
    }
}

/// Rewrites the header's version and CRCs (as a newer or older writer would).
fn with_header(mut bytes: Vec<u8>, version: u32) -> Vec<u8> {
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    let body_crc = crc32fast::hash(&bytes[state::HEADER_LEN..]);
    bytes[24..28].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&bytes[..28]);
    bytes[28..32].copy_from_slice(&header_crc.to_le_bytes());
    bytes
}

#[test]
fn wrong_version_and_magic_are_named() {
    let bytes = state::encode(&sample_state(false));
    let err = state::decode(&with_header(bytes.clone(), 2)).err().unwrap();
    assert!(err.what.contains("unsupported version 2"), "{err}");
    assert_eq!(err.offset, 8);
    let mut bad_magic = bytes;
    bad_magic[0] = b'X';
    let err = state::decode(&bad_magic).err().unwrap();
    assert!(err.what.contains("magic"), "{err}");
    assert_eq!(err.offset, 0);
}

/// Builds a file from raw records (valid header and CRCs around them).
fn file_of(records: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, vcpu, payload) in records {
        body.extend_from_slice(&tag.to_le_bytes());
        body.extend_from_slice(&vcpu.to_le_bytes());
        body.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        body.extend_from_slice(payload);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&state::MAGIC);
    out.extend_from_slice(&state::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(state::HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn vm_info(vcpus: u32) -> Vec<u8> {
    let mut info = Vec::new();
    info.extend_from_slice(&1u64.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes());
    info.extend_from_slice(&(64u64 << 20).to_le_bytes());
    info.extend_from_slice(&vcpus.to_le_bytes());
    info.extend_from_slice(&4096u32.to_le_bytes());
    info
}

#[test]
fn structural_errors_name_the_record_and_offset() {
    let info = (state::TAG_VM_INFO, state::VM_WIDE, vm_info(1));
    // A regs record of the wrong size.
    let bad = file_of(&[info.clone(), (state::TAG_REGS, 0, vec![0; 5])]);
    let err = state::decode(&bad).err().unwrap();
    assert!(err.what.contains("regs record is 5 bytes"), "{err}");
    assert_eq!(err.offset, (state::HEADER_LEN + 8 + 32) as u64);
    // A record for a vCPU that does not exist.
    let bad = file_of(&[info.clone(), (state::TAG_REGS, 3, vec![0; 8])]);
    assert!(state::decode(&bad).err().unwrap().what.contains("vCPU 3"));
    // Missing records.
    let bad = file_of(std::slice::from_ref(&info));
    assert!(state::decode(&bad).err().unwrap().what.contains("missing"));
    // The VM info must come first, and vCPU counts are bounded.
    let bad = file_of(&[(state::TAG_REGS, 0, vec![0; 8])]);
    assert!(state::decode(&bad)
        .err()
        .unwrap()
        .what
        .contains("first record"));
    let bad = file_of(&[(state::TAG_VM_INFO, state::VM_WIDE, vm_info(100_000))]);
    assert!(state::decode(&bad)
        .err()
        .unwrap()
        .what
        .contains("vCPU count"));
    // A record longer than the file.
    let mut bad = file_of(&[info, (state::TAG_LAPIC, 0, vec![0; 16])]);
    let len_at = state::HEADER_LEN + 8 + 32 + 4;
    bad[len_at..len_at + 4].copy_from_slice(&1_000_000u32.to_le_bytes());
    let bad = with_header(bad, state::FORMAT_VERSION);
    assert!(state::decode(&bad)
        .err()
        .unwrap()
        .what
        .contains("past the end"));
}

#[test]
fn garbage_never_panics() {
    // A deterministic xorshift stream of inputs: random bytes, and valid files with
    // random bytes spliced in and CRCs recomputed (so the structure parser is reached).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let valid = state::encode(&sample_state(true));
    for _ in 0..2000 {
        let len = (next() % 600) as usize;
        let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        assert!(state::decode(&random).is_err());
        let mut spliced = valid.clone();
        let at = state::HEADER_LEN + (next() as usize % (valid.len() - state::HEADER_LEN));
        for i in 0..(next() % 16) as usize {
            if at + i < spliced.len() {
                spliced[at + i] = next() as u8;
            }
        }
        let spliced = with_header(spliced, state::FORMAT_VERSION);
        let _ = state::decode(&spliced); // must return, Ok or Err, without panicking
    }
}
