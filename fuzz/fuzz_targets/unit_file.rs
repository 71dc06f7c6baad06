#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fleet_broker::fuzzing::unit_file(data);
});
