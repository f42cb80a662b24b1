//! Hard-state file: newest valid slot wins, a torn slot write falls back to the other
//! slot, both slots bad is an error naming the file.

mod common;

use common::{Rng, TempDir};
use vigil_wal::hard_state::SLOT_OFFSETS;
use vigil_wal::{Error, HardState, HardStateFile};

fn hs(n: u64) -> HardState {
    HardState {
        term: n,
        voted_for: n % 5,
        commit: n * 10,
    }
}

#[test]
fn fresh_file_then_saves_survive_reopen() {
    let dir = TempDir::new("hs-fresh");
    let path = dir.path().join("hard_state");
    let mut file = HardStateFile::open(&path).unwrap();
    assert_eq!(file.get(), HardState::default());
    for n in 1..=5 {
        file.save(hs(n)).unwrap();
        assert_eq!(file.get(), hs(n));
    }
    drop(file);
    assert_eq!(HardStateFile::open(&path).unwrap().get(), hs(5));
}

/// Which slot the newest state is in after `saves` saves (creation writes slot 0).
fn newest_slot(saves: u64) -> usize {
    (saves % 2) as usize
}

#[test]
fn torn_write_of_one_slot_falls_back_to_the_other() {
    let mut rng = Rng::new(7);
    for saves in 1..=6u64 {
        let dir = TempDir::new("hs-torn");
        let path = dir.path().join("hard_state");
        let mut file = HardStateFile::open(&path).unwrap();
        for n in 1..=saves {
            file.save(hs(n)).unwrap();
        }
        drop(file);
        // Tear the newest slot: damage a random byte of it.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = SLOT_OFFSETS[newest_slot(saves)] as usize + rng.range(0, 64) as usize;
        bytes[at] ^= rng.range(1, 256) as u8;
        std::fs::write(&path, &bytes).unwrap();
        let file = HardStateFile::open(&path).unwrap();
        let expect = if saves == 1 {
            HardState::default()
        } else {
            hs(saves - 1)
        };
        assert_eq!(file.get(), expect, "after {saves} saves");
        // The next save goes to the torn slot, never over the only good one.
        let mut file = file;
        file.save(hs(100)).unwrap();
        drop(file);
        assert_eq!(HardStateFile::open(&path).unwrap().get(), hs(100));
    }
}

#[test]
fn both_slots_corrupt_is_an_error_naming_the_file() {
    let dir = TempDir::new("hs-both");
    let path = dir.path().join("hard_state");
    let mut file = HardStateFile::open(&path).unwrap();
    file.save(hs(1)).unwrap();
    drop(file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[SLOT_OFFSETS[0] as usize + 20] ^= 0xff;
    bytes[SLOT_OFFSETS[1] as usize + 9] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = HardStateFile::open(&path).err().expect("both slots bad");
    assert!(matches!(err, Error::HardStateCorrupt { .. }));
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
}

#[test]
fn garbage_file_is_an_error_and_short_file_uses_what_is_there() {
    let dir = TempDir::new("hs-garbage");
    let path = dir.path().join("hard_state");
    let mut rng = Rng::new(99);
    let junk: Vec<u8> = (0..1024).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&path, &junk).unwrap();
    assert!(HardStateFile::open(&path).is_err());

    // A file cut short after slot 0 (which holds the newest state) still opens.
    let path = dir.path().join("hard_state_2");
    let mut file = HardStateFile::open(&path).unwrap();
    file.save(hs(1)).unwrap();
    file.save(hs(2)).unwrap(); // slot 0
    drop(file);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..100]).unwrap();
    assert_eq!(HardStateFile::open(&path).unwrap().get(), hs(2));

    // An empty file is a fresh one.
    let path = dir.path().join("hard_state_3");
    std::fs::write(&path, b"").unwrap();
    assert_eq!(
        HardStateFile::open(&path).unwrap().get(),
        HardState::default()
    );
}
