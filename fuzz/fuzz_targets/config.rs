#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lb_agent::fuzz::config(data));
