//! Faults injected for real against a real sshd and agent: the broker's retries, waits and
//! logs stay bounded.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// sshd's count of TCP connections it accepted (LogLevel VERBOSE logs each).
fn sshd_connections(sshd: &Sshd) -> usize {
    sshd.log().matches("Connection from").count()
}

#[test]
fn waiting_requests_and_repeated_connects_do_not_shorten_the_backoff() {
    let w = World::new();
    // An agent socket nobody serves: every attempt connects, shakes hands and then fails to
    // authenticate, a failure worth retrying.
    let gone = w.keys.path().join("no-agent.sock");
    let b = Broker::start(&w.config("connect_timeout = \"2s\""), Some(&gone));
    let before = sshd_connections(&w.sshd);
    let window = Duration::from_secs(6);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..20 {
        let socket = b.socket("c1");
        workers.push(std::thread::spawn(move || {
            let mut answers = Vec::new();
            // Bounded: each request returns within connect_timeout (2 s) + a little.
            while started.elapsed() < window {
                answers.push(try_http(&socket, "GET", "/fleet/v1/machines", None).map(|r| r.0));
            }
            answers
        }));
    }
    // An impatient user: `connect` over and over; each says it failed.
    let mut connects = 0;
    while started.elapsed() < window && connects < 30 {
        let out = b.cli(&["connect", "c1"]);
        assert_eq!(out.status.code(), Some(1), "connect reports the failure");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("c1: backoff (") || err.contains("c1: connecting"),
            "{err}"
        );
        connects += 1;
    }
    let mut statuses = Vec::new();
    for t in workers {
        statuses.extend(t.join().expect("worker"));
    }
    let elapsed = started.elapsed();
    let attempts = sshd_connections(&w.sshd) - before;
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(503))),
        "every request gets the 503: {statuses:?}"
    );
    // 250 ms doubling, full jitter: about 5 scheduled attempts in 6 s, plus at most one asked
    // for by `connect` after each failure. The old supervisor made hundreds.
    assert!(
        attempts <= 16,
        "{attempts} SSH connections in {elapsed:?} ({} requests, {connects} connects)",
        statuses.len()
    );
    let warns = b.log().matches("tunnel connect failed; retrying").count();
    assert!(
        warns <= 2,
        "a repeated failure is logged once:\n{}",
        b.log()
    );
}
