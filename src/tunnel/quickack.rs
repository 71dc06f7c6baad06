//! TCP_QUICKACK re-armed after every read on a tunnel socket. Linux leaves quick-ack mode by
//! itself and then delays ACKs (~40 ms); sshd keeps Nagle's algorithm on connections without
//! a terminal, so a response it relays as two SSH packets waits for the ACK of the first
//! before the second is sent. Re-arming quick-ack after each read ACKs every segment at once:
//! a held packet waits one round trip, not a delayed-ACK timer.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that keeps quick-ack mode on.
pub(crate) struct QuickAck(TcpStream);

impl QuickAck {
    pub(crate) fn new(stream: TcpStream) -> QuickAck {
        set_quickack(&stream);
        QuickAck(stream)
    }
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
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            set_quickack(&self.0);
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
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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
        assert!(quickack_is_on(&q.0));
        server.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        q.read_exact(&mut buf).await.expect("read");
        assert!(quickack_is_on(&q.0), "re-armed after the read");
    }
}
