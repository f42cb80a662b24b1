#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil::fuzzing::cluster_command(data));
