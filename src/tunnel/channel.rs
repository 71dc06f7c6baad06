//! An SSH channel as a byte stream whose reading side is drained by its own task into a
//! buffer ([`DrainedChannel`]), so that the connection's session never waits for a slow
//! local reader.
//!
//! Flow control bounds that buffer: every connection is dialled with
//! `manual_window_release` (our patched russh), and a channel's window is given back only
//! for the bytes its local reader has taken out of the buffer. The server therefore never
//! has more than one window (`dial::WINDOW_SIZE` on the tunnel) of unread data in flight or
//! buffered for a channel, a slow reader slows down only its own channel, and memory is
//! bounded by the window times the open channels. Nothing is cut for being slow: a reader
//! that keeps reading gets every byte.
//!
//! Two last lines remain against a server that ignores flow control: a channel holding more
//! than [`MAX_BUFFERED`] is closed, and past [`MAX_BUFFERED_TOTAL`] for all channels the
//! reader furthest behind is. And a channel may be given a stall limit
//! ([`DrainedChannel::with_stall_limit`]): a reader that takes nothing for that long while
//! data waits is closed with a logged reason. The reader of a closed channel gets an error,
//! never a quiet end of stream.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use russh::client::Msg;
use russh::{Channel, ChannelMsg, WindowRelease};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes a channel may hold for a local reader: more than any window we give, so only a
/// server that ignores flow control reaches it.
pub(crate) const MAX_BUFFERED: usize = 2 * super::dial::WINDOW_SIZE as usize;
/// Bytes all channels of the process together may hold for local readers; reached only
/// when more than this many windows' worth of readers all stall at once.
pub(crate) const MAX_BUFFERED_TOTAL: usize = 256 * 1024 * 1024;

/// Bytes held by all channels now.
static BUFFERED_TOTAL: AtomicUsize = AtomicUsize::new(0);
/// Every live channel's buffer, to find the one furthest behind.
static CHANNELS: Mutex<Vec<Weak<Mutex<Shared>>>> = Mutex::new(Vec::new());

/// Adds a live channel's buffer to `all`. When the list is full, the entries of channels gone
/// are dropped first, so that it holds at most twice as many as were ever live at once
/// (and each push costs O(1) on average). Without this, every channel ever opened left its
/// entry, and the daemon grew by about a kilobyte per upstream connection it closed.
fn register(all: &mut Vec<Weak<Mutex<Shared>>>, shared: &Arc<Mutex<Shared>>) {
    if all.len() == all.capacity() {
        all.retain(|w| w.strong_count() > 0);
    }
    all.push(Arc::downgrade(shared));
}

/// Channels of every tunnel whose stream is still in use, by us or by the session that feeds
/// it (for metrics): the open upstream connections of the fleet API, sessions' agent
/// channels and the like. It comes back down when connections close.
pub(crate) fn live_channels() -> usize {
    CHANNELS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|w| w.strong_count() > 0)
        .count()
}

/// Bytes held for slow local readers across all channels (for metrics).
pub(crate) fn buffered_total() -> usize {
    BUFFERED_TOTAL.load(Ordering::Relaxed)
}

struct Shared {
    queue: VecDeque<Bytes>,
    buffered: usize,
    eof: bool,
    cut: bool,
    waker: Option<Waker>,
    /// Closes the channel (when its reader is cut off).
    closer: Option<Arc<dyn Fn() + Send + Sync>>,
    /// When the reader last took data, or data arrived for a reader that had taken all.
    progress: Instant,
    /// A reader that takes nothing for this long while data waits is cut off.
    stall_limit: Option<Duration>,
    /// Why the reader was cut off (its error).
    cut_reason: &'static str,
}

impl Shared {
    /// Drops everything buffered and closes the channel; the reader gets an error.
    fn cut_off(&mut self, reason: &'static str) {
        self.cut = true;
        self.cut_reason = reason;
        self.queue.clear();
        BUFFERED_TOTAL.fetch_sub(self.buffered, Ordering::Relaxed);
        self.buffered = 0;
        if let Some(c) = &self.closer {
            c();
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// While the total is over [`MAX_BUFFERED_TOTAL`], cuts off the reader furthest behind.
/// Called with no channel's lock held.
fn enforce_total() {
    while BUFFERED_TOTAL.load(Ordering::Relaxed) > MAX_BUFFERED_TOTAL {
        let victim = {
            let mut all = CHANNELS.lock().unwrap_or_else(|p| p.into_inner());
            all.retain(|w| w.strong_count() > 0);
            all.iter()
                .filter_map(Weak::upgrade)
                .max_by_key(|s| lock(s).buffered)
        };
        let Some(victim) = victim else { return };
        let mut v = lock(&victim);
        if v.buffered == 0 {
            return;
        }
        tracing::warn!(
            buffered = v.buffered,
            total_limit = MAX_BUFFERED_TOTAL,
            "local readers hold too much unread data; cutting off the one furthest behind"
        );
        v.cut_off("local readers held too much unread data; this one, furthest behind, was closed");
    }
}

/// A channel as a byte stream whose reading side is drained by a task into a bounded buffer.
pub(crate) struct DrainedChannel {
    shared: Arc<Mutex<Shared>>,
    writer: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    closer: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Gives the window back for what the reader takes.
    release: WindowRelease,
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl DrainedChannel {
    pub(crate) fn new(channel: Channel<Msg>) -> DrainedChannel {
        let (mut read_half, write_half) = channel.split();
        let writer = Box::pin(write_half.make_writer());
        let write_half = Arc::new(write_half);
        let close_half = write_half.clone();
        let closer: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            let h = close_half.clone();
            tokio::spawn(tracing::Instrument::in_current_span(async move {
                let _ = h.close().await;
            }));
        });
        let shared = Arc::new(Mutex::new(Shared {
            queue: VecDeque::new(),
            buffered: 0,
            eof: false,
            cut: false,
            waker: None,
            closer: Some(closer.clone()),
            progress: Instant::now(),
            stall_limit: None,
            cut_reason: "",
        }));
        register(
            &mut CHANNELS.lock().unwrap_or_else(|p| p.into_inner()),
            &shared,
        );
        let release = read_half.window_release();
        let drain_release = release.clone();
        let drain_shared = shared.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            // One timer for the stall limit, moved only when the deadline moves.
            let stall = tokio::time::sleep_until(Instant::now());
            tokio::pin!(stall);
            let mut armed: Option<Instant> = None;
            loop {
                let stall_at = {
                    let s = lock(&drain_shared);
                    match s.stall_limit {
                        Some(limit) if s.buffered > 0 && !s.cut => Some(s.progress + limit),
                        _ => None,
                    }
                };
                if let Some(at) = stall_at {
                    if armed != Some(at) {
                        stall.as_mut().reset(at);
                    }
                }
                armed = stall_at;
                let msg = tokio::select! {
                    m = read_half.wait() => m,
                    () = &mut stall, if stall_at.is_some() => {
                        let mut s = lock(&drain_shared);
                        if let Some(limit) = s.stall_limit {
                            if s.buffered > 0 && !s.cut && s.progress.elapsed() >= limit {
                                tracing::warn!(
                                    waiting_bytes = s.buffered,
                                    "local client took nothing for {} s while data waited; closing its channel",
                                    limit.as_secs()
                                );
                                s.cut_off("the local reader took nothing while data waited; channel closed");
                            }
                        }
                        // Fired: armed again on the next turn, if still due.
                        armed = None;
                        continue;
                    }
                };
                let Some(msg) = msg else { break };
                let mut grew = false;
                {
                    let mut s = lock(&drain_shared);
                    match msg {
                        ChannelMsg::Data { data } => {
                            if s.cut {
                                continue;
                            }
                            if s.buffered + data.len() > MAX_BUFFERED {
                                tracing::warn!(
                                    buffered = s.buffered,
                                    "the server sent past the channel's window; closing it"
                                );
                                s.cut_off(
                                    "the server sent past the channel's window; channel closed",
                                );
                                continue;
                            }
                            if s.buffered == 0 {
                                s.progress = Instant::now();
                            }
                            s.buffered += data.len();
                            BUFFERED_TOTAL.fetch_add(data.len(), Ordering::Relaxed);
                            s.queue.push_back(data);
                            grew = true;
                        }
                        // Nothing reads a channel's stderr here: it is consumed as it comes.
                        ChannelMsg::ExtendedData { data, .. } => {
                            drain_release.release(data.len());
                            continue;
                        }
                        ChannelMsg::Eof | ChannelMsg::Close => s.eof = true,
                        _ => continue,
                    }
                    if let Some(w) = s.waker.take() {
                        w.wake();
                    }
                }
                if grew {
                    enforce_total();
                }
            }
            let mut s = lock(&drain_shared);
            s.eof = true;
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }));
        DrainedChannel {
            shared,
            writer,
            closer: Some(closer),
            release,
        }
    }

    /// Whether the channel can carry another exchange: not ended, not cut off, and nothing
    /// unread (an idle upstream connection that received bytes nobody asked for is broken).
    pub(crate) fn is_idle_and_open(&self) -> bool {
        let s = lock(&self.shared);
        !s.eof && !s.cut && s.queue.is_empty()
    }

    /// Closes the channel when its reader takes nothing for `limit` while data waits (a
    /// local client that stopped reading an answer).
    pub(crate) fn with_stall_limit(self, limit: Duration) -> DrainedChannel {
        lock(&self.shared).stall_limit = Some(limit);
        self
    }
}

impl Drop for DrainedChannel {
    fn drop(&mut self) {
        if let Some(c) = self.closer.take() {
            c();
        }
        // What the reader never read no longer counts against the total.
        let mut s = lock(&self.shared);
        s.queue.clear();
        BUFFERED_TOTAL.fetch_sub(s.buffered, Ordering::Relaxed);
        s.buffered = 0;
        s.cut = true;
    }
}

impl AsyncRead for DrainedChannel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut s = lock(&self.shared);
        if s.cut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                s.cut_reason,
            )));
        }
        if let Some(front) = s.queue.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            if n == front.len() {
                s.queue.pop_front();
            } else {
                *front = front.slice(n..);
            }
            s.buffered -= n;
            s.progress = Instant::now();
            BUFFERED_TOTAL.fetch_sub(n, Ordering::Relaxed);
            drop(s);
            self.release.release(n);
            return Poll::Ready(Ok(()));
        }
        if s.eof {
            return Poll::Ready(Ok(()));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for DrainedChannel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writer.as_mut().poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Mutex<Shared>> {
        Arc::new(Mutex::new(Shared {
            queue: VecDeque::new(),
            buffered: 0,
            eof: false,
            cut: false,
            waker: None,
            closer: None,
            progress: Instant::now(),
            stall_limit: None,
            cut_reason: "",
        }))
    }

    #[test]
    fn the_list_of_channels_holds_the_live_ones_not_every_one_ever_opened() {
        let mut all = Vec::new();
        let live: Vec<_> = (0..10).map(|_| shared()).collect();
        for s in &live {
            register(&mut all, s);
        }
        // Ten thousand channels opened and closed beside the ten that stay.
        for _ in 0..10_000 {
            register(&mut all, &shared());
        }
        assert!(
            all.len() <= 2 * 11 + 1,
            "{} entries for 10 live channels",
            all.len()
        );
        let alive = all.iter().filter(|w| w.strong_count() > 0).count();
        assert_eq!(alive, live.len());
    }
}
