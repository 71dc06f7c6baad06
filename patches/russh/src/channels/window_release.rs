//! Receive windows given back as the application consumes data, not as data arrives.
//!
//! By default a client session tops a channel's receive window back up as soon as data
//! arrives, so the peer may keep sending however slowly the application reads: the data
//! piles up in the channel's queue, and once that queue is full the session stops reading
//! the connection, stalling every other channel, keepalives and key re-exchange with it.
//!
//! With [`client::Config::manual_window_release`](crate::client::Config), each reader
//! gives its channel's window back itself, through its [`WindowRelease`] (see
//! [`ChannelReadHalf::window_release`](super::ChannelReadHalf::window_release)), for the
//! bytes it has consumed. The choice is made when the channel is opened, so no data can
//! arrive before it. The peer then never has more than one
//! window of data in flight or queued for this channel, and a slow reader slows down only
//! its own channel's sender. Such a reader must still take messages off the channel promptly
//! (into a buffer of its own, bounded by the window), since the session waits for room in
//! the channel's queue.
//!
//! This is the flow control of RFC 4254 §5.2 as OpenSSH does it (`channel_check_window`
//! adjusts by what the consumer has taken out of the channel's buffer).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

/// Wakes the session to send a window adjustment for one channel.
pub(crate) type Wake = Box<dyn Fn() + Send + Sync>;

/// The window state a channel's reader shares with its session.
pub(crate) struct ChannelFlow {
    /// Set when the channel is registered with a session whose readers give the window
    /// back themselves: the session then stops giving it back on receipt.
    manual: AtomicBool,
    /// Bytes consumed and not yet given back.
    released: AtomicU32,
    /// Set by the session when it registers the channel.
    link: OnceLock<Link>,
}

struct Link {
    /// Released bytes worth a window adjustment.
    threshold: u32,
    wake: Wake,
}

impl std::fmt::Debug for ChannelFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelFlow")
            .field("manual", &self.manual.load(Ordering::Relaxed))
            .field("released", &self.released.load(Ordering::Relaxed))
            .finish()
    }
}

impl ChannelFlow {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ChannelFlow {
            manual: AtomicBool::new(false),
            released: AtomicU32::new(0),
            link: OnceLock::new(),
        })
    }

    /// Called by the session when it registers the channel: `wake` asks it to give back
    /// what was released, once at least `threshold` bytes are.
    pub(crate) fn link(&self, threshold: u32, wake: Wake) {
        if self.link.set(Link { threshold, wake }).is_ok()
            && let Some(link) = self.link.get()
            && self.released.load(Ordering::SeqCst) >= link.threshold
        {
            (link.wake)();
        }
    }

    /// Whether the reader gives the window back itself.
    pub(crate) fn is_manual(&self) -> bool {
        self.manual.load(Ordering::SeqCst)
    }

    /// Takes the bytes released since the last call.
    pub(crate) fn take_released(&self) -> u32 {
        self.released.swap(0, Ordering::SeqCst)
    }

    pub(crate) fn make_manual(&self) {
        self.manual.store(true, Ordering::SeqCst);
    }

    pub(crate) fn release_handle(self: &Arc<Self>) -> WindowRelease {
        WindowRelease { flow: self.clone() }
    }
}

/// Gives a channel's receive window back for data the application has consumed.
///
/// Cloneable, so that the part of an application that consumes the data (a writer task, a
/// buffer's reader) can hold it apart from the part that receives messages.
#[derive(Clone, Debug)]
pub struct WindowRelease {
    flow: Arc<ChannelFlow>,
}

impl WindowRelease {
    /// Reports `bytes` of the channel's data as consumed: the session lets the peer send
    /// that much more. Adjustments are batched (half a window at a time, as the session
    /// does on its own); releasing more than was received never grows the window past
    /// the configured size.
    pub fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        let before = match self.flow.released.fetch_update(
            Ordering::SeqCst,
            Ordering::SeqCst,
            |r| Some(r.saturating_add(bytes)),
        ) {
            Ok(before) | Err(before) => before,
        };
        let after = before.saturating_add(bytes);
        if let Some(link) = self.flow.link.get()
            && before < link.threshold
            && after >= link.threshold
        {
            (link.wake)();
        }
    }
}
