//! Replays every file of the committed fuzz corpus (`fuzz/corpus/TARGET/`) through the same
//! entry point its fuzz target calls, so a fixed crash stays fixed without a nightly
//! toolchain. The fuzz targets themselves run with `cargo +nightly fuzz run TARGET`.

use std::path::Path;

type Entry = fn(&[u8]);

const TARGETS: [(&str, Entry); 4] = [
    ("known_hosts", fleet_broker::fuzzing::known_hosts),
    ("config", fleet_broker::fuzzing::config),
    ("unit_file", fleet_broker::fuzzing::unit_file),
    ("exec_frames", fleet_broker::fuzzing::exec_frames),
];

#[test]
fn every_corpus_file_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, entry) in TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} has no seeds", dir.display());
        for f in files {
            let data = std::fs::read(&f).expect("corpus file");
            let result = std::panic::catch_unwind(|| entry(&data));
            assert!(result.is_ok(), "{target}: {} panics", f.display());
        }
    }
}
