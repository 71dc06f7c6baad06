//! TCP_QUICKACK re-armed after every read on a tunnel socket. Linux leaves quick-ack mode by
//! itself and then delays ACKs (~40 ms); sshd keeps Nagle's algorithm on connections without
//! a terminal, so a response it relays as two SSH packets waits for the ACK of the first
//! before the second is sent. Re-arming quick-ack after each read ACKs every segment at once:
//! a held packet waits one round trip, not a delayed-ACK timer.
//!
//! Small reads go through a buffer ([`READ_AHEAD`]): russh asks for each packet's length and
//! then its body, and a multi-packet answer (fleetd writes large ones in 4 KiB pieces) took
//! two `recv`s and two re-arms per packet.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The buffer for small reads. russh reads a packet's length and then its body, each with its
/// own read: a read smaller than this fills the buffer, so a small packet (or several) comes
/// with its length in one `recv` and one re-arm of quick-ack. Larger reads go straight to
/// the caller, as before: a 64 KiB buffer for every read copied every byte of a bulk answer
/// once more and re-armed quick-ack less often, and took 0.86x OpenSSH's throughput where
/// the broker had 1.13x.
const READ_AHEAD: usize = 4 * 1024;

/// A TCP stream that keeps quick-ack mode on, small reads served from a buffer.
pub(crate) struct QuickAck {
    stream: TcpStream,
    buf: Box<[u8]>,
    /// What of `buf` is read and not yet handed out.
    start: usize,
    end: usize,
}

impl QuickAck {
    pub(crate) fn new(stream: TcpStream) -> QuickAck {
        set_quickack(&stream);
        QuickAck {
            stream,
            buf: vec![0; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
        }
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            // Nothing buffered: a large read goes straight to the caller.
            if out.remaining() >= READ_AHEAD {
                let before = out.filled().len();
                let r = Pin::new(&mut this.stream).poll_read(cx, out);
                if matches!(r, Poll::Ready(Ok(()))) && out.filled().len() > before {
                    set_quickack(&this.stream);
                }
                return r;
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            match Pin::new(&mut this.stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            set_quickack(&this.stream);
            this.start = 0;
            this.end = n;
        }
        let n = out.remaining().min(this.end - this.start);
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
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
    }

    /// Whatever the sizes asked (small reads served from the buffer, large ones straight from
    /// the socket), every byte arrives once and in order, and the end is seen.
    #[tokio::test]
    async fn buffered_reads_hand_out_every_byte_in_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = l.accept().await.expect("accept");
        let sent: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let sent = sent.clone();
            async move {
                for piece in sent.chunks(7_001) {
                    server.write_all(piece).await.expect("write");
                }
            }
        });
        let mut q = QuickAck::new(client);
        let mut got = Vec::new();
        let sizes = [4usize, 1, 3_000, READ_AHEAD, 17, 2 * READ_AHEAD, 65_535];
        for size in sizes.iter().cycle() {
            let mut buf = vec![0u8; *size];
            let n = q.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        writer.await.expect("writer");
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes differ from what was sent");
    }
}
