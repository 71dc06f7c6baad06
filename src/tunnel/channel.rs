//! An SSH channel as a byte stream whose reading side is drained by its own task into a
//! bounded buffer ([`DrainedChannel`]). russh stops reading the whole connection when one
//! channel's queue fills, so a local reader that stops reading is cut off instead of stalling
//! every other channel of the connection. All channels together hold at most
//! [`MAX_BUFFERED_TOTAL`]: past it, the reader furthest behind is cut off.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use russh::client::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes a channel may hold for a local reader before that reader is cut off.
pub(crate) const MAX_BUFFERED: usize = 32 * 1024 * 1024;
/// Bytes all channels of the process together may hold for local readers.
pub(crate) const MAX_BUFFERED_TOTAL: usize = 64 * 1024 * 1024;

/// Bytes held by all channels now.
static BUFFERED_TOTAL: AtomicUsize = AtomicUsize::new(0);
/// Every live channel's buffer, to find the one furthest behind.
static CHANNELS: Mutex<Vec<Weak<Mutex<Shared>>>> = Mutex::new(Vec::new());

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
}

impl Shared {
    /// Drops everything buffered and closes the channel; the reader gets an error.
    fn cut_off(&mut self) {
        self.cut = true;
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
        v.cut_off();
    }
}

/// A channel as a byte stream whose reading side is drained by a task into a bounded buffer.
pub(crate) struct DrainedChannel {
    shared: Arc<Mutex<Shared>>,
    writer: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    closer: Option<Arc<dyn Fn() + Send + Sync>>,
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
        }));
        CHANNELS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&shared));
        let drain_shared = shared.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            while let Some(msg) = read_half.wait().await {
                let mut grew = false;
                {
                    let mut s = lock(&drain_shared);
                    match msg {
                        ChannelMsg::Data { data } => {
                            if s.cut {
                                continue;
                            }
                            if s.buffered + data.len() > MAX_BUFFERED {
                                tracing::warn!("local client stopped reading; closing its channel");
                                s.cut_off();
                                continue;
                            }
                            s.buffered += data.len();
                            BUFFERED_TOTAL.fetch_add(data.len(), Ordering::Relaxed);
                            s.queue.push_back(data);
                            grew = true;
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
        }
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
                "reader fell too far behind; channel closed",
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
            BUFFERED_TOTAL.fetch_sub(n, Ordering::Relaxed);
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
