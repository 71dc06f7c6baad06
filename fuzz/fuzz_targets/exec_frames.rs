#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fleet_broker::fuzzing::exec_frames(data);
});
