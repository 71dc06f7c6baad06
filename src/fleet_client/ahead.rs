//! How many pages of a listing to have asked for at once.
//!
//! fleetd rebuilds the whole list for every page (reference A.4), so a page asked past the
//! end is a whole listing computed for nothing, and a server that computes one page at a
//! time (one lock, one core) gains nothing from more than the next page waiting. But a
//! server that serves pages in parallel behind a long round trip sits idle unless many are
//! asked at once. The window is set as a delay-based congestion control (TCP Vegas) sets
//! its own: the shortest answer seen is the round trip without queueing (`base`); a page
//! asked with `depth` pages in flight that took `took` says that
//! `depth x (1 - base / took)` pages were waiting at the server. Once per round (a
//! window's pages, at least [`ROUND`]) the round decides: fewer than half a page waiting
//! for every page of it, the round trip and not the server limits, and the window doubles
//! (up to [`MAX`]); more than one and a half for the round's median page, it shrinks to
//! leave about one waiting. Every page is asked to agree before the window opens because
//! each page asked past the end costs the server a whole listing, and a page that found a
//! busy server idle for a moment is common on a loaded machine; the median keeps one page
//! held up on the way from closing it. Deciding once per round keeps the window from
//! swinging behind its own effect; a reader held up for a moment only makes answers look
//! later, so it can shrink the window but never open it.
//!
//! Only the listing's speed depends on this; which pages are taken does not.

use std::time::{Duration, Instant};

/// The fewest pages in flight: the page awaited and the next, so that a server computing
/// one page at a time always has the next waiting.
pub(super) const MIN: usize = 2;
/// The most pages in flight.
pub(super) const MAX: usize = 8;
/// Fewer pages waiting at the server than this for every page of a round: the window
/// grows.
const GROW_BELOW: f64 = 0.5;
/// More pages waiting at the server than this for a round's median page: the window
/// shrinks.
const SHRINK_ABOVE: f64 = 1.5;
/// The fewest pages in a round.
const ROUND: usize = 4;
const _: () = assert!(MIN <= ROUND && ROUND <= MAX);

#[derive(Debug)]
pub(super) struct Ahead {
    window: usize,
    /// The shortest time from asking for a page to its whole answer.
    base: Option<Duration>,
    /// The pages found waiting at the server by each page of this round.
    waiting: [f64; MAX],
    /// Pages asked ahead taken in this round.
    taken: usize,
}

impl Ahead {
    pub(super) fn new() -> Self {
        Ahead {
            window: MIN,
            base: None,
            waiting: [0.0; MAX],
            taken: 0,
        }
    }

    /// How many pages to have asked for and not yet taken.
    pub(super) fn window(&self) -> usize {
        self.window
    }

    /// A page was taken: asked for at `asked`, its whole answer read at `answered`;
    /// `depth`: the pages asked for and not yet taken when it was asked, itself included
    /// (1: asked alone, as the first page is, which only tells the round trip).
    pub(super) fn taken(&mut self, asked: Instant, answered: Instant, depth: usize) {
        let took = answered.saturating_duration_since(asked);
        let base = self.base.map_or(took, |b| b.min(took));
        self.base = Some(base);
        if depth <= 1 || took.is_zero() {
            return;
        }
        if let Some(slot) = self.waiting.get_mut(self.taken) {
            *slot = depth as f64 * (1.0 - base.as_secs_f64() / took.as_secs_f64());
            self.taken += 1;
        }
        if self.taken < self.window.clamp(ROUND, MAX) {
            return;
        }
        let round = &mut self.waiting[..self.taken];
        round.sort_by(f64::total_cmp);
        let most = round.last().copied().unwrap_or(0.0);
        let median = round.get(round.len() / 2).copied().unwrap_or(0.0);
        self.taken = 0;
        if most < GROW_BELOW {
            self.window = (self.window * 2).min(MAX);
        } else if median > SHRINK_ABOVE {
            let fewer = (median - 1.0).round() as usize;
            self.window = self.window.saturating_sub(fewer).max(MIN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A listing of `pages` pages through a server that answers `parallel` pages at a time,
    /// each in `service`, behind a round trip of `rtt`, driven the way
    /// `FleetClient::pages` drives [`Ahead`]. Returns the windows after each page taken
    /// and how many pages were asked for past the last.
    fn list(
        pages: usize,
        parallel: usize,
        service: Duration,
        rtt: Duration,
    ) -> (Vec<usize>, usize) {
        let t0 = Instant::now();
        let mut ahead = Ahead::new();
        // When each of the server's `parallel` workers is next free.
        let mut free = vec![t0; parallel];
        let mut serve = |asked: Instant| {
            let at = asked + rtt / 2;
            let worker = (0..parallel).min_by_key(|&i| free[i]).unwrap_or(0);
            let start = free[worker].max(at);
            free[worker] = start + service;
            start + service + rtt / 2
        };
        // The first page, alone.
        let answered = serve(t0);
        ahead.taken(t0, answered, 1);
        let mut now = answered;
        let mut windows = vec![ahead.window()];
        // (page, asked, answered, depth) in flight, in order.
        let mut flight: VecDeque<(usize, Instant, Instant, usize)> = VecDeque::new();
        let mut next_page = 2;
        let mut past_end = 0;
        let mut page = 1;
        while page < pages {
            while flight.len() < ahead.window() {
                if next_page > pages {
                    past_end += 1;
                }
                let answered = serve(now);
                flight.push_back((next_page, now, answered, flight.len() + 1));
                next_page += 1;
            }
            let Some((p, asked, answered, depth)) = flight.pop_front() else {
                break;
            };
            assert_eq!(p, page + 1, "pages are taken in order");
            now = now.max(answered);
            ahead.taken(asked, answered, depth);
            windows.push(ahead.window());
            page = p;
        }
        (windows, past_end)
    }

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1000.0)
    }

    #[test]
    fn one_page_at_a_time_server_nearby_gets_the_next_page_waiting_and_no_more() {
        // The simulator: 1.8 ms a page under one lock, a local hop.
        let (windows, past_end) = list(11, 1, ms(1.8), ms(0.2));
        assert!(windows.iter().all(|&w| w <= 3), "{windows:?}");
        assert_eq!(windows.last(), Some(&MIN), "{windows:?}");
        assert!(
            past_end <= 2,
            "{past_end} pages asked past the end ({windows:?})"
        );
    }

    #[test]
    fn parallel_server_behind_a_long_round_trip_gets_the_whole_window() {
        let (windows, _) = list(40, 16, ms(2.0), ms(50.0));
        assert_eq!(windows.iter().max(), Some(&MAX), "{windows:?}");
        assert_eq!(windows.last(), Some(&MAX), "{windows:?}");
    }

    #[test]
    fn one_page_at_a_time_server_far_away_gets_enough_to_cover_the_round_trip() {
        // 10 ms away, 1.8 ms a page: about (10 + 1.8) / 1.8 = 6.6 pages keep it busy.
        let (windows, _) = list(60, 1, ms(1.8), ms(10.0));
        let settled = &windows[windows.len() - 20..];
        assert!(
            settled.iter().all(|&w| (6..=MAX).contains(&w)),
            "{windows:?}"
        );
    }

    #[test]
    fn a_reader_held_up_does_not_open_the_window() {
        // A server nearby answering a page every 2 ms, two asked at a time; the reader is
        // held up twice and takes four answers at once, with one timestamp.
        let t0 = Instant::now();
        let answered = |i: u32| t0 + ms(2.0) * (i + 1);
        let mut ahead = Ahead::new();
        ahead.taken(t0, answered(0), 1);
        let mut windows = Vec::new();
        for i in 1..=24u32 {
            let seen = match i {
                5..=8 => answered(8),
                13..=16 => answered(16),
                _ => answered(i),
            };
            ahead.taken(answered(i) - ms(4.0), seen, 2);
            windows.push(ahead.window());
        }
        assert!(windows.iter().all(|&w| w <= 3), "{windows:?}");
    }

    /// A window opened all the way by answers that each took `round_trip`, never queued.
    fn opened(t0: Instant, round_trip: Duration) -> Ahead {
        let mut ahead = Ahead::new();
        ahead.taken(t0, t0 + round_trip, 1);
        for _ in 0..8 {
            let depth = ahead.window();
            ahead.taken(t0, t0 + round_trip, depth);
        }
        assert_eq!(ahead.window(), MAX);
        ahead
    }

    #[test]
    fn a_window_opened_comes_back_when_the_server_queues() {
        // Answers as fast as the round trip at first, then a server busy elsewhere that
        // serves one page at a time, 2 ms each: the pages asked wait behind each other.
        let t0 = Instant::now();
        let mut ahead = opened(t0, ms(2.0));
        for _ in 0..10 {
            let depth = ahead.window();
            ahead.taken(t0, t0 + ms(2.0) * depth as u32, depth);
        }
        assert!(ahead.window() <= 3, "window {}", ahead.window());
    }

    #[test]
    fn a_page_that_found_the_server_idle_does_not_open_the_window() {
        // Two asked at a time of a server nearby that is busy but not always: half the
        // pages wait behind the one before them (3.5 ms against 2 unqueued), half do not.
        let t0 = Instant::now();
        let mut ahead = Ahead::new();
        ahead.taken(t0, t0 + ms(2.0), 1);
        for i in 0..40 {
            let took = if i % 2 == 0 { ms(2.0) } else { ms(3.5) };
            ahead.taken(t0, t0 + took, 2);
            assert_eq!(ahead.window(), MIN, "page {i}");
        }
    }

    #[test]
    fn one_page_held_up_on_the_way_does_not_close_the_window() {
        let t0 = Instant::now();
        let mut ahead = opened(t0, ms(50.0));
        for i in 0..40 {
            // One page in four held up for a second; the rest one round trip.
            let took = if i % 4 == 0 { ms(1000.0) } else { ms(50.0) };
            ahead.taken(t0, t0 + took, MAX);
            assert_eq!(ahead.window(), MAX, "page {i}");
        }
    }
}
