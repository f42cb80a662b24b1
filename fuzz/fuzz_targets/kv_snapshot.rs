#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil::fuzzing::kv_snapshot(data));
