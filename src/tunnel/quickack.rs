//! A tunnel's TCP socket: TCP_QUICKACK re-armed after every read, and small reads served
//! from one larger read.
//!
//! Linux leaves quick-ack mode by itself and then delays ACKs (~40 ms); sshd keeps Nagle's
//! algorithm on connections without a terminal, so a response it relays as two SSH packets
//! waits for the ACK of the first before the second is sent. Re-arming quick-ack after each
//! read ACKs every segment at once: a held packet waits one round trip, not a delayed-ACK
//! timer.
//!
//! The SSH reader asks for each packet's length (4 bytes) and then for its body, so a burst
//! of small packets (fleetd writes its answers 4 KiB at a time, and sshd relays each write
//! as it comes) cost two reads and two re-arms per packet. A read smaller than [`AHEAD`]
//! now takes up to [`AHEAD`] bytes from the socket and later reads are served from them;
//! only a large read with nothing held goes to the socket directly, without a copy.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes taken from the socket at once for a small read.
const AHEAD: usize = 32 * 1024;

/// A TCP stream that keeps quick-ack mode on and reads ahead for small reads.
pub(crate) struct QuickAck {
    stream: TcpStream,
    /// Read from the socket and not yet handed out: `ahead[start..end]`. Allocated at the
    /// first small read.
    ahead: Box<[u8]>,
    start: usize,
    end: usize,
}

impl QuickAck {
    pub(crate) fn new(stream: TcpStream) -> QuickAck {
        set_quickack(&stream);
        QuickAck {
            stream,
            ahead: Box::default(),
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
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end && buf.remaining() >= AHEAD {
            // A large read with nothing held: straight into the caller's buffer.
            let before = buf.filled().len();
            let r = Pin::new(&mut this.stream).poll_read(cx, buf);
            if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                set_quickack(&this.stream);
            }
            return r;
        }
        if this.start == this.end {
            if this.ahead.is_empty() {
                this.ahead = vec![0; AHEAD].into_boxed_slice();
            }
            let mut into = ReadBuf::new(&mut this.ahead);
            match Pin::new(&mut this.stream).poll_read(cx, &mut into) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let n = into.filled().len();
            if n == 0 {
                // The end of the stream.
                return Poll::Ready(Ok(()));
            }
            set_quickack(&this.stream);
            (this.start, this.end) = (0, n);
        }
        let n = buf.remaining().min(this.end - this.start);
        buf.put_slice(&this.ahead[this.start..this.start + n]);
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

    /// Bytes waiting in `s`'s receive queue.
    fn unread(s: &impl AsRawFd) -> i32 {
        let mut n: nix::libc::c_int = 0;
        // SAFETY: a valid descriptor and a pointer to a live c_int, as FIONREAD takes.
        let r = unsafe { nix::libc::ioctl(s.as_raw_fd(), nix::libc::FIONREAD, &mut n) };
        assert_eq!(r, 0, "FIONREAD");
        n
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_read_ahead() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = l.accept().await.expect("accept");
        // Packets as the SSH reader asks for them: a length, then that many bytes; sizes
        // from 1 byte to several read-aheads, then the end of the stream.
        let sizes = [
            1usize,
            3,
            4096,
            17,
            AHEAD - 4,
            AHEAD,
            AHEAD + 5,
            3 * AHEAD + 7,
            2,
        ];
        let mut sent = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            sent.extend_from_slice(&(*n as u32).to_be_bytes());
            sent.extend((0..*n).map(|j| (i * 31 + j) as u8));
        }
        let writer = tokio::spawn(async move {
            server.write_all(&sent).await.expect("write");
            server.shutdown().await.expect("shutdown");
            sent
        });
        let mut q = QuickAck::new(client);
        // The first length read takes what has arrived, up to AHEAD, off the socket.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while unread(&q.stream) < 64 {
            assert!(std::time::Instant::now() < deadline, "nothing arrived");
            tokio::task::yield_now().await;
        }
        let before = unread(&q.stream) as usize;
        let mut got = Vec::new();
        let mut len = [0u8; 4];
        q.read_exact(&mut len).await.expect("first length");
        assert_eq!(
            unread(&q.stream) as usize,
            before - before.min(AHEAD),
            "a small read reads ahead"
        );
        loop {
            let n = u32::from_be_bytes(len) as usize;
            let mut body = vec![0u8; n];
            q.read_exact(&mut body).await.expect("body");
            got.extend_from_slice(&len);
            got.extend_from_slice(&body);
            match q.read_exact(&mut len).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("length: {e}"),
            }
        }
        let sent = writer.await.expect("writer");
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "every byte, in order");
        let mut more = [0u8; 8];
        assert_eq!(q.read(&mut more).await.expect("after the end"), 0);
    }
}
