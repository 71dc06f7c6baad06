//! How late the daemon's one thread runs: a task wakes every [`TICK`] and records how late
//! it woke. Anything that blocks the runtime (a KDF, a file or keyring read, a child process)
//! shows here as lag, for every cluster at once; `GET /metrics` reports the largest and a
//! histogram, and `status --json` the largest.
//!
//! On a busy machine a tick is also late while the thread waits for a CPU, which says nothing
//! about the daemon. The kernel counts that wait (`run_delay` in
//! `/proc/thread-self/schedstat`); the lag less that wait is what the daemon's own work or a
//! blocking call cost: reported as the largest *blocked* time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the probe wakes.
pub(crate) const TICK: Duration = Duration::from_millis(10);
/// Upper bounds of the histogram's buckets, in seconds (Prometheus `le`).
pub(crate) const BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0];

/// The lag seen so far.
#[derive(Debug, Default)]
pub(crate) struct Lag {
    /// The largest, in microseconds.
    max_us: AtomicU64,
    /// The largest less the time the thread waited for a CPU meanwhile, in microseconds.
    blocked_max_us: AtomicU64,
    /// Ticks per bucket of [`BUCKETS`] (not cumulative), the last one for larger lags.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of all lags, in microseconds.
    sum_us: AtomicU64,
    /// Ticks recorded.
    count: AtomicU64,
}

/// A copy of [`Lag`] for a report.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    pub max_seconds: f64,
    /// Cumulative counts for each bound of [`BUCKETS`], then the total (`+Inf`).
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Lag {
    /// Records one tick that fired `late`.
    pub(crate) fn record(&self, late: Duration) {
        let us = late.as_micros().min(u128::from(u64::MAX)) as u64;
        self.max_us.fetch_max(us, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let secs = late.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The largest lag so far, in milliseconds.
    pub(crate) fn max_ms(&self) -> f64 {
        self.max_us.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Records a tick's lag less the time the thread waited for a CPU meanwhile.
    pub(crate) fn record_blocked(&self, blocked: Duration) {
        let us = blocked.as_micros().min(u128::from(u64::MAX)) as u64;
        self.blocked_max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// The largest blocked time so far, in milliseconds.
    pub(crate) fn blocked_max_ms(&self) -> f64 {
        self.blocked_max_us.load(Ordering::Relaxed) as f64 / 1000.0
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        Snapshot {
            max_seconds: self.max_us.load(Ordering::Relaxed) as f64 / 1e6,
            cumulative,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }

    /// Ticks every [`TICK`] until `stop`, recording how late each tick fires.
    pub(crate) async fn probe(self: std::sync::Arc<Self>, stop: CancellationToken) {
        // Opened on the runtime's thread, so it is that thread's; a procfs file, read with
        // one pread of a few bytes from memory per tick.
        let schedstat = std::fs::File::open("/proc/thread-self/schedstat").ok();
        let mut waited = schedstat.as_ref().and_then(run_delay);
        loop {
            let due = tokio::time::Instant::now() + TICK;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            let late = tokio::time::Instant::now().saturating_duration_since(due);
            self.record(late);
            let now_waited = schedstat.as_ref().and_then(run_delay);
            let wait = match (waited, now_waited) {
                (Some(a), Some(b)) => b.saturating_sub(a),
                _ => Duration::ZERO,
            };
            waited = now_waited;
            self.record_blocked(late.saturating_sub(wait));
        }
    }
}

/// The time the thread has waited for a CPU (`run_delay`, the second field of schedstat).
fn run_delay(file: &std::fs::File) -> Option<Duration> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 96];
    let n = file.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(buf.get(..n)?).ok()?;
    let ns: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_land_in_their_buckets_and_the_largest_is_kept() {
        let lag = Lag::default();
        for ms in [0, 3, 3, 40, 2000] {
            lag.record(Duration::from_millis(ms));
        }
        let s = lag.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.max_seconds, 2.0);
        assert_eq!(s.cumulative, vec![1, 3, 3, 3, 4, 4, 4, 4, 5]);
        assert!((s.sum_seconds - 2.046).abs() < 1e-9);
        assert_eq!(lag.max_ms(), 2000.0);
    }

    /// A thread blocked for 300 ms shows as a lag of about that.
    #[test]
    fn blocking_the_runtime_shows_as_lag() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let lag = std::sync::Arc::new(Lag::default());
        rt.block_on(async {
            let stop = CancellationToken::new();
            let probe = tokio::spawn(lag.clone().probe(stop.clone()));
            // Let it tick, then block the only thread.
            while lag.snapshot().count < 3 {
                tokio::task::yield_now().await;
                tokio::time::sleep(TICK).await;
            }
            std::thread::sleep(Duration::from_millis(300));
            while lag.max_ms() < 250.0 && lag.snapshot().count < 50 {
                tokio::time::sleep(TICK).await;
            }
            stop.cancel();
            let _ = probe.await;
        });
        assert!(lag.max_ms() >= 250.0, "{:?}", lag.snapshot());
        // Blocking is not waiting for a CPU: it counts as blocked time too.
        assert!(lag.blocked_max_ms() >= 250.0, "{}", lag.blocked_max_ms());
    }

    #[test]
    fn the_threads_wait_for_a_cpu_is_read_from_schedstat() {
        let f = std::fs::File::open("/proc/thread-self/schedstat").expect("schedstat");
        let a = run_delay(&f).expect("run_delay");
        let b = run_delay(&f).expect("run_delay again");
        assert!(b >= a);
    }
}
