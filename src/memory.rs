//! Freed memory given back to the system after a burst. glibc keeps memory freed in the
//! middle of its heap: after a hostile fleetd's answer was cut at its cap, megabytes would
//! stay resident for good although nothing uses them (measured: a daemon of 17 MB stayed at
//! 21 to 30 MB; `malloc_trim` brought it back to 17.5 MB). [`trim_soon`] asks glibc to give
//! them back once the burst's buffers, some freed by other tasks a little later, are gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// When to trim after a burst: soon, and once more when slower teardowns are done.
const TRIM_AFTER: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(4)];

/// Whether trims are already planned (bursts close together share them).
static PLANNED: AtomicBool = AtomicBool::new(false);

/// Plans `malloc_trim` calls after a burst of large buffers, off the runtime's thread (a trim
/// walks the heap). Does nothing outside a runtime or glibc.
pub(crate) fn trim_soon() {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if PLANNED.swap(true, Ordering::AcqRel) {
        return;
    }
    rt.spawn(async {
        let mut waited = Duration::ZERO;
        for at in TRIM_AFTER {
            tokio::time::sleep(at - waited).await;
            waited = at;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
        PLANNED.store(false, Ordering::Release);
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only returns free heap pages to the system; thread-safe in glibc.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
