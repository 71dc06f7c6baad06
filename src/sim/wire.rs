//! How the simulator puts a response on the wire. Real servers do not answer in one
//! `write()`: fleetd's Go net/http sends a body of up to 2 KiB with Content-Length in one
//! write, and a larger one chunked, flushed in 4 KiB pieces; Python's http.server writes the
//! headers, then the body. Latency through SSH depends on that (a response relayed as two SSH
//! packets can wait for a delayed ACK), so the simulator writes as the server it stands for.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::Body;

/// A server's write pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WritePattern {
    /// Go's net/http, as fleetd: ≤ 2 KiB in one write with Content-Length; larger bodies
    /// chunked, written in 4 KiB pieces.
    #[default]
    GoNetHttp,
    /// Python's http.server: the headers in one write, the body in the next.
    HeadersThenBody,
    /// Headers and body in a single write (no real server is this kind).
    SingleWrite,
}

/// Go's `bufferBeforeChunkingSize`: bodies up to this size get a Content-Length.
const GO_UNCHUNKED_MAX: usize = 2048;
/// Go's connection write buffer: larger responses reach the socket in pieces this big.
const GO_WRITE_BUFFER: usize = 4096;

/// The response body as the pattern sends it: Go chunks bodies over 2 KiB.
pub async fn body_for(pattern: WritePattern, body: Body) -> Body {
    if pattern != WritePattern::GoNetHttp {
        return body;
    }
    let Ok(collected) = body.collect().await else {
        return crate::http::full(Bytes::new());
    };
    let bytes = collected.to_bytes();
    if bytes.len() <= GO_UNCHUNKED_MAX {
        return crate::http::full(bytes);
    }
    // No size hint: hyper sends it chunked, as net/http does for a body it did not buffer.
    let frames = futures::stream::iter([Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
        hyper::body::Frame::data(bytes),
    )]);
    http_body_util::StreamBody::new(frames).boxed()
}

/// A connection that writes as the simulator's current pattern says (read at every write,
/// so a test can switch it under a kept-alive connection).
pub struct Paced<S> {
    inner: S,
    pattern: Box<dyn Fn() -> WritePattern + Send + Sync>,
}

impl<S> Paced<S> {
    pub fn new(inner: S, pattern: impl Fn() -> WritePattern + Send + Sync + 'static) -> Paced<S> {
        Paced {
            inner,
            pattern: Box::new(pattern),
        }
    }
}

/// How much of `buf` one write of the pattern takes.
fn next_write(pattern: WritePattern, buf: &[u8]) -> usize {
    match pattern {
        WritePattern::SingleWrite => buf.len(),
        WritePattern::GoNetHttp => buf.len().min(GO_WRITE_BUFFER),
        WritePattern::HeadersThenBody => buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
            .filter(|&end| end < buf.len())
            .unwrap_or(buf.len()),
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = next_write((self.pattern)(), buf);
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_cut_as_the_servers_cut_them() {
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(
            next_write(WritePattern::HeadersThenBody, resp),
            resp.len() - 2
        );
        assert_eq!(next_write(WritePattern::SingleWrite, resp), resp.len());
        let big = vec![b'x'; 10_000];
        assert_eq!(next_write(WritePattern::GoNetHttp, &big), 4096);
        assert_eq!(next_write(WritePattern::HeadersThenBody, &big), big.len());
    }
}
