//! Flow control end to end: a real sshd, a real agent, the daemon, and a fleetd of the
//! test's own behind sshd that answers with as many bytes as asked. Every byte of a large
//! answer arrives, however fast or slowly the local client reads, while other requests on
//! the same tunnel keep being answered.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// A broker whose cluster `c1` reaches a [`bulk_fleetd`] behind the world's sshd.
fn bulk_broker(w: &World, extra: &str) -> Broker {
    w.broker_on(&bulk_fleetd(w.keys.path()), extra)
}

#[test]
fn a_gigabyte_arrives_whole_to_a_fast_reader_and_to_one_that_pauses_while_others_are_served() {
    let w = World::new();
    let b = bulk_broker(&w, "");
    let sock = b.socket("c1");
    assert_eq!(http(&sock, "GET", "/fleet/v1/machines", None).0, 200);

    const GIB: usize = 1 << 30;
    let started = Instant::now();
    let run = two_readers_and_a_loop(&sock, GIB);
    for got in [&run.fast, &run.pausing] {
        assert!(got.status.starts_with("HTTP/1.1 200"), "{got:?}");
        assert_eq!(got.error, None, "{got:?}\n{}", b.log());
        assert_eq!(got.blocks, GIB / BLOCK, "{got:?}");
    }
    assert_eq!(run.failed, 0, "small requests failed\n{}", b.log());
    eprintln!(
        "1 GiB to a fast reader in {:.1} s ({:.0} MiB/s); both readers done in {:.1} s; {} small requests meanwhile: p50 {:?}, p99 {:?}, max {:?}",
        run.fast_took.as_secs_f64(),
        1024.0 / run.fast_took.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        run.latencies.len(),
        run.pct(0.5),
        run.pct(0.99),
        run.pct(1.0)
    );
    assert!(
        run.latencies.len() >= 10,
        "{} requests",
        run.latencies.len()
    );
    // Not a speed check (the benchmark measures that): a request held up behind the pause
    // would take the whole 10 s.
    assert!(
        run.pct(1.0) < Duration::from_secs(5),
        "a small request waited {:?}",
        run.pct(1.0)
    );
    assert!(!b.log().contains("closing its channel"), "{}", b.log());
}

#[test]
fn a_client_that_stops_reading_is_closed_after_the_stall_limit_with_an_error_not_a_short_answer() {
    let w = World::new();
    let b = bulk_broker(&w, "stalled_reader_timeout = \"2s\"\n");
    let sock = b.socket("c1");
    // Reads 4 blocks of 256, then nothing for 8 s (four times the limit).
    let got = read_bulk(&sock, 256 * BLOCK, 4, Duration::from_secs(8));
    assert!(got.status.starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(got.blocks < 256, "{got:?}");
    assert!(got.error.is_some(), "{got:?}");
    assert!(
        b.log()
            .contains("local client took nothing for 2 s while data waited; closing its channel"),
        "{}",
        b.log()
    );
    // The cluster is served, and the closed channel holds nothing.
    assert_eq!(http(&sock, "GET", "/fleet/v1/machines", None).0, 200);
    let (_, metrics) = http(&b.control_socket(), "GET", "/metrics", None);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("fleet_broker_buffered_bytes 0\n"),
        "{metrics}"
    );
}
