//! Entry points shared by the fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`): each takes arbitrary bytes, exercises one parser of untrusted
//! input the way the broker uses it, and must never panic.

use std::path::Path;

use crate::known_hosts::{match_pattern_list, HostId, KnownHosts};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA07NpDdhNQM35x9Ium8d8qQdYUa1LbUOJhPhOeC5ThL";

/// known_hosts text: parsed, then every lookup the dialer makes, for a few names.
pub fn known_hosts(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut kh = KnownHosts::default();
    kh.add_text(Path::new("fuzz"), &text);
    let Ok(key) = russh::keys::PublicKey::from_openssh(KEY) else {
        return;
    };
    for host in ["localhost", "10.0.0.1", "h.example", "::1"] {
        for port in [22, 2222] {
            let id = HostId::new(host, port);
            let _ = kh.check(&id, &key);
            let _ = kh.pinned_algorithms(&id);
            let _ = kh.address_contradicts(&id.lookup, &key);
        }
    }
    // The first line's first field as a pattern list, against a name from the input.
    let mut fields = text.split_whitespace();
    if let (Some(list), Some(name)) = (fields.next(), fields.next()) {
        let _ = match_pattern_list(name, list);
    }
}

/// A config file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = crate::config::Config::parse(Path::new("fuzz.toml"), text) {
            for cluster in c.clusters.values() {
                let _ = cluster.to_toml();
            }
        }
    }
}

/// A unit file, and the name rules.
pub fn unit_file(data: &[u8]) {
    use crate::fleet::unit_file;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = unit_file::validate_name(text);
    let _ = unit_file::instance_of(text);
    if let Ok(options) = unit_file::parse(text) {
        let _ = unit_file::serialize(&options);
        let _ = unit_file::hash(&options);
        let _ = unit_file::validate_options(&options);
        let _ = unit_file::is_global(&options);
        let _ = unit_file::unknown_fleet_keys(&options);
    }
}

/// A stream of exec frames, as the daemon and the CLI read them from each other; every
/// frame that decodes encodes back to the same frame.
pub fn exec_frames(data: &[u8]) {
    use crate::protocol::frame::{read_frame, write_frame};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    rt.block_on(async {
        let mut input = data;
        // Bounded by the input: each frame consumes at least its 5-byte header.
        while let Ok(Some(frame)) = read_frame(&mut input).await {
            let mut encoded = Vec::new();
            if write_frame(&mut encoded, &frame).await.is_err() {
                return;
            }
            let mut again = encoded.as_slice();
            let back = read_frame(&mut again).await.ok().flatten();
            assert_eq!(
                back.as_ref(),
                Some(&frame),
                "a frame changed in a round trip"
            );
        }
    });
}
