//! A warning that repeats (a refused connection, a failed accept) said at most once per
//! [`INTERVAL`], with the count of the ones left unsaid since: a flood of connections from
//! another user costs a line a second in the log, not a line a connection.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most one line per this long.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

/// The state of one repeated warning.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// When it was last said, and how many times it was not said since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// `Some(suppressed)` when this occurrence is to be logged, with the number of
    /// occurrences not logged since the last one; `None` when it is to stay unsaid.
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.0 {
            Some(t) if now.duration_since(t) < INTERVAL => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_a_second_with_the_count_of_the_rest() {
        let t = Throttle::default();
        assert_eq!(t.admit(), Some(0));
        for _ in 0..500 {
            assert_eq!(t.admit(), None);
        }
        tokio::time::advance(INTERVAL).await;
        assert_eq!(t.admit(), Some(500));
        assert_eq!(t.admit(), None);
    }
}
