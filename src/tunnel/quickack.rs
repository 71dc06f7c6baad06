//! TCP_QUICKACK re-armed after every read on a tunnel socket. Linux leaves quick-ack mode by
//! itself and then delays ACKs (~40 ms); sshd keeps Nagle's algorithm on connections without
//! a terminal, so a response it relays as two SSH packets waits for the ACK of the first
//! before the second is sent. Re-arming quick-ack after each read ACKs every segment at once:
//! a held packet waits one round trip, not a delayed-ACK timer.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that keeps quick-ack mode on, and notes the smallest round-trip estimate
/// the kernel had over its first reads (the SSH handshake's exchanges).
pub(crate) struct QuickAck {
    stream: TcpStream,
    round_trip: Arc<AtomicU32>,
    measured: u32,
}

/// Reads after which the round trip is no longer sampled.
const ROUND_TRIP_SAMPLES: u32 = 32;

impl QuickAck {
    pub(crate) fn new(stream: TcpStream) -> QuickAck {
        set_quickack(&stream);
        let first = round_trip(&stream).map_or(u32::MAX, micros);
        QuickAck {
            stream,
            round_trip: Arc::new(AtomicU32::new(first)),
            measured: 0,
        }
    }

    /// The smallest round trip seen so far, shared: read it once the handshake is done.
    pub(crate) fn round_trip_seen(&self) -> RoundTrip {
        RoundTrip(self.round_trip.clone())
    }
}

/// The smallest round trip a [`QuickAck`] stream saw.
pub(crate) struct RoundTrip(Arc<AtomicU32>);

impl RoundTrip {
    pub(crate) fn get(&self) -> Option<std::time::Duration> {
        match self.0.load(Ordering::Relaxed) {
            u32::MAX => None,
            us => Some(std::time::Duration::from_micros(u64::from(us))),
        }
    }
}

fn micros(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX - 1)
}

/// Turns on TCP_QUICKACK for `s`; a failure only costs latency, so it is ignored.
fn set_quickack(s: &TcpStream) {
    let one: nix::libc::c_int = 1;
    // SAFETY: a valid descriptor, a pointer to a live c_int and its exact size.
    unsafe {
        nix::libc::setsockopt(
            s.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_QUICKACK,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        );
    }
}

/// The kernel's smoothed round-trip time of `s` (`TCP_INFO`'s `tcpi_rtt`); `None` when it
/// cannot be read.
fn round_trip(s: &TcpStream) -> Option<std::time::Duration> {
    // SAFETY: an all-zero tcp_info is a valid value of this plain C struct.
    let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
    // SAFETY: a valid descriptor, a pointer to a live tcp_info and its exact size.
    let r = unsafe {
        nix::libc::getsockopt(
            s.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    (r == 0 && info.tcpi_rtt > 0)
        .then(|| std::time::Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// Whether TCP_QUICKACK is on for `s` now (for tests).
#[cfg(test)]
pub(crate) fn quickack_is_on(s: &impl AsRawFd) -> bool {
    let mut v: nix::libc::c_int = 0;
    let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
    // SAFETY: a valid descriptor, pointers to a live c_int and its size.
    let r = unsafe {
        nix::libc::getsockopt(
            s.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_QUICKACK,
            std::ptr::addr_of_mut!(v).cast(),
            &mut len,
        )
    };
    r == 0 && v != 0
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            set_quickack(&self.stream);
            if self.measured < ROUND_TRIP_SAMPLES {
                self.measured += 1;
                if let Some(rtt) = round_trip(&self.stream) {
                    self.round_trip.fetch_min(micros(rtt), Ordering::Relaxed);
                }
            }
        }
        r
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn quickack_is_set_and_rearmed_after_a_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = l.accept().await.expect("accept");
        let mut q = QuickAck::new(client);
        assert!(quickack_is_on(&q.stream));
        server.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        q.read_exact(&mut buf).await.expect("read");
        assert!(quickack_is_on(&q.stream), "re-armed after the read");
        let rtt = q.round_trip_seen().get().expect("the kernel's round trip");
        assert!(
            rtt < std::time::Duration::from_secs(1),
            "{rtt:?} on loopback"
        );
    }
}
