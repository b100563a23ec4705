#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgcorral::fuzzing::takeover(data));
