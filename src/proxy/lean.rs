//! The short path of a cluster socket for what nearly every request is: a `GET` or `HEAD`
//! without a body. Such a request needs none of the proxy's policy (a read is allowed on a
//! read-only cluster and not audited), so it skips hyper's server and client and their pool:
//! the head is parsed once (`httparse`), checked, written again without hop-by-hop headers on
//! a pooled upstream connection, and the answer is framed from its own head (length,
//! chunked, or until the end) and streamed back. On a warm daemon this takes a tenth of the
//! request's latency off, and on cold caches more (docs/performance.md).
//!
//! Everything else goes to hyper and [`Proxy::handle`] with the bytes already read, for the
//! rest of the connection: a request with a body or framing headers (`Content-Length`,
//! `Transfer-Encoding`, so no request is ever framed by this code), `Upgrade`, `Expect`, a
//! method other than `GET`/`HEAD`, a head that does not parse or is too large, HTTP/1.0, a
//! tunnel that is not up this moment, the `fd-forward` transport, and a request whose
//! upstream connection fails before its answer began (a read, so asking again is safe).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Proxy, HOP_BY_HOP, POOL_IDLE_TIMEOUT, POOL_MAX_IDLE};
use crate::audit::Peer;
use crate::http::HEADER_READ_TIMEOUT;
use crate::protocol::BROKER_ERROR_HEADER;
use crate::tunnel::api::Upstream;

/// The largest request head taken on this path (hyper's limit applies past it).
const MAX_HEAD: usize = 64 * 1024;
/// The largest answer head from fleetd.
const MAX_ANSWER_HEAD: usize = 64 * 1024;
/// Headers parsed in a head; more go to hyper (requests) or fail (answers).
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line of a chunked answer.
const MAX_CHUNK_LINE: usize = 4096;
/// Informational answers (1xx) skipped before the final one.
const MAX_INFORMATIONAL: usize = 16;
/// Bytes read from fleetd at once.
const READ_SIZE: usize = 16 * 1024;
/// Bytes of a request read (or peeked at) from the client at once: a head is rarely
/// longer, and a longer one is read on in the same steps.
const HEAD_READ: usize = 4096;
/// Bytes of an answer's body gathered for one write to the client, when they have arrived.
const BATCH: usize = 256 * 1024;
/// Bytes of framing and small data copied together to go in one piece (see [`Gathered`]);
/// larger data is queued for the same write as it is, without a copy.
const STAGED: usize = 16 * 1024;

/// An idle upstream connection with the buffer its answers are read into.
type Idle = (Upstream, BytesMut, Instant);

/// Idle upstream connections of the short path, newest last.
#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<VecDeque<Idle>>,
    sweeping: std::sync::atomic::AtomicBool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest idle connection that is still open and not too old.
    fn take(&self) -> Option<(Upstream, BytesMut)> {
        let mut idle = self.lock();
        while let Some((up, buf, at)) = idle.pop_back() {
            if up.is_idle_and_open() && at.elapsed() < POOL_IDLE_TIMEOUT {
                return Some((up, buf));
            }
        }
        None
    }

    /// Keeps `up` for the next request (the oldest goes past [`POOL_MAX_IDLE`]), and closes
    /// what has been idle for [`POOL_IDLE_TIMEOUT`] when that time comes.
    fn put(self: &Arc<Self>, up: Upstream, mut buf: BytesMut) {
        // A buffer a long answer grew is not kept.
        if buf.capacity() > 4 * READ_SIZE {
            buf = BytesMut::new();
        }
        buf.clear();
        {
            let mut idle = self.lock();
            idle.push_back((up, buf, Instant::now()));
            while idle.len() > POOL_MAX_IDLE {
                idle.pop_front();
            }
        }
        if !self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(POOL_IDLE_TIMEOUT).await;
                    let Some(pool) = pool.upgrade() else { return };
                    let mut idle = pool.lock();
                    idle.retain(|(up, _, at)| {
                        up.is_idle_and_open() && at.elapsed() < POOL_IDLE_TIMEOUT
                    });
                    if idle.is_empty() {
                        pool.sweeping
                            .store(false, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    }
}

/// A request the short path takes: its head for fleetd, and how the client wants the
/// connection kept.
struct Taken {
    /// The request as it goes upstream: request line and headers, hop-by-hop ones removed.
    upstream: Vec<u8>,
    /// Bytes of the head in the client's buffer.
    head_len: usize,
    head: bool,
    close: bool,
    /// Where the request target stands in `upstream` (for the debug log).
    path: std::ops::Range<usize>,
}

/// What the client's buffer holds.
enum Head {
    /// A request for the short path.
    Take(Taken),
    /// A request for hyper (which answers malformed ones as well).
    Hyper,
    /// Not a whole head yet.
    Partial,
}

fn is(name: &str, other: &str) -> bool {
    name.eq_ignore_ascii_case(other)
}

/// Whether a header goes no further than this hop: the fixed hop-by-hop ones and those the
/// message's `Connection` header names (lower-cased in `named`).
fn is_hop(name: &str, named: &[String]) -> bool {
    HOP_BY_HOP.iter().any(|h| is(name, h)) || named.iter().any(|n| is(name, n))
}

/// Writes `name: value` and its CRLF, the name lower-cased as hyper writes header names.
fn put_header(out: &mut Vec<u8>, h: &httparse::Header<'_>) {
    out.extend(h.name.bytes().map(|b| b.to_ascii_lowercase()));
    out.extend_from_slice(b": ");
    out.extend_from_slice(h.value);
    out.extend_from_slice(b"\r\n");
}

/// The comma-separated tokens of a header value, lower-cased.
fn tokens(v: &[u8]) -> impl Iterator<Item = String> + '_ {
    v.split(|b| *b == b',')
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// Reads the request head at the start of `buf`, and decides who serves it.
fn parse_request(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Head::Partial,
        _ => return Head::Hyper,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Head::Hyper;
    };
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Head::Hyper,
    };
    // Origin form in visible ASCII only; anything else is hyper's to judge.
    if !path.starts_with('/') || !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Head::Hyper;
    }
    let mut close = false;
    let mut named: Vec<String> = Vec::new();
    let mut host = false;
    for h in req.headers.iter() {
        let n = h.name;
        if is(n, "content-length")
            || is(n, "transfer-encoding")
            || is(n, "upgrade")
            || is(n, "expect")
        {
            return Head::Hyper;
        }
        if is(n, "connection") {
            for t in tokens(h.value) {
                match t.as_str() {
                    "close" => close = true,
                    "upgrade" => return Head::Hyper,
                    _ => named.push(t),
                }
            }
        }
        host |= is(n, "host");
    }
    let mut upstream = Vec::with_capacity(head_len + 16);
    upstream.extend_from_slice(method.as_bytes());
    upstream.push(b' ');
    let path_at = upstream.len()..upstream.len() + path.len();
    upstream.extend_from_slice(path.as_bytes());
    upstream.extend_from_slice(b" HTTP/1.1\r\n");
    if !host {
        // As hyper's client writes it for the proxy's `http://fleet/…` requests.
        upstream.extend_from_slice(b"host: fleet\r\n");
    }
    for h in req.headers.iter() {
        if !is_hop(h.name, &named) {
            put_header(&mut upstream, h);
        }
    }
    upstream.extend_from_slice(b"\r\n");
    Head::Take(Taken {
        upstream,
        head_len,
        head,
        close,
        path: path_at,
    })
}

/// How an answer's body ends (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// An answer head from fleetd, ready for the client.
#[derive(Debug)]
struct Answer {
    /// The head for the client, ending with the blank line.
    head: Vec<u8>,
    framing: Framing,
    /// Whether the upstream connection can carry another request after this answer.
    reusable: bool,
}

/// Why an answer from fleetd could not be forwarded.
#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("the fleet API's answer head is malformed: {0}")]
    Malformed(String),
    #[error("the fleet API's answer head is larger than {MAX_ANSWER_HEAD} bytes")]
    TooLarge,
}

/// Parses an answer head at the start of `buf`; `Ok(None)` when it is not whole yet, and
/// `(head, consumed)` when it is. Informational answers (1xx) are skipped, as hyper's client
/// does.
fn parse_answer(
    buf: &[u8],
    request_head: bool,
    client_close: bool,
) -> Result<Option<(Answer, usize)>, AnswerError> {
    let mut skipped = 0;
    for _ in 0..=MAX_INFORMATIONAL {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let rest = &buf[skipped..];
        let n = match resp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() < MAX_ANSWER_HEAD => return Ok(None),
            Ok(httparse::Status::Partial) => return Err(AnswerError::TooLarge),
            Err(e) => return Err(AnswerError::Malformed(e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        if status == 101 {
            return Err(AnswerError::Malformed("101 Switching Protocols".into()));
        }
        if (100..200).contains(&status) {
            skipped += n;
            continue;
        }
        let answer = final_answer(&resp, status, request_head, client_close);
        return answer.map(|a| Some((a, skipped + n)));
    }
    Err(AnswerError::Malformed(format!(
        "more than {MAX_INFORMATIONAL} informational answers"
    )))
}

/// The client's head and the framing of a final (non-1xx) answer.
fn final_answer(
    resp: &httparse::Response<'_, '_>,
    status: u16,
    request_head: bool,
    client_close: bool,
) -> Result<Answer, AnswerError> {
    let mut chunked = None;
    let mut length: Option<u64> = None;
    let mut upstream_close = resp.version != Some(1);
    let mut named: Vec<String> = Vec::new();
    for h in resp.headers.iter() {
        if is(h.name, "transfer-encoding") {
            // The last coding decides (RFC 9112 6.3): chunked, or the body runs to the end.
            chunked = tokens(h.value).last().map(|t| t == "chunked");
        } else if is(h.name, "content-length") {
            for t in tokens(h.value) {
                let v: u64 = t
                    .parse()
                    .ok()
                    .filter(|_| t.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| AnswerError::Malformed(format!("content-length {t:?}")))?;
                if length.is_some_and(|l| l != v) {
                    return Err(AnswerError::Malformed(
                        "content-length values differ".into(),
                    ));
                }
                length = Some(v);
            }
        } else if is(h.name, "connection") {
            for t in tokens(h.value) {
                if t == "close" {
                    upstream_close = true;
                }
                named.push(t);
            }
        }
    }
    let no_body = request_head || status == 204 || status == 304;
    let framing = match (no_body, chunked, length) {
        (true, _, _) => Framing::None,
        (false, Some(true), _) => Framing::Chunked,
        (false, Some(false), _) => Framing::UntilClose,
        (false, None, Some(l)) => Framing::Length(l),
        (false, None, None) => Framing::UntilClose,
    };
    let mut head = Vec::with_capacity(512);
    let reason = hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("<unknown status code>");
    head.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    let keep_length = request_head || matches!(framing, Framing::None);
    for h in resp.headers.iter() {
        if !is_hop(h.name, &named)
            && !is(h.name, BROKER_ERROR_HEADER)
            && (keep_length || !is(h.name, "content-length"))
        {
            put_header(&mut head, h);
        }
    }
    match framing {
        Framing::Length(l) => head.extend_from_slice(format!("content-length: {l}\r\n").as_bytes()),
        Framing::Chunked | Framing::UntilClose => {
            head.extend_from_slice(b"transfer-encoding: chunked\r\n")
        }
        Framing::None => {}
    }
    if client_close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok(Answer {
        head,
        framing,
        reusable: !upstream_close && framing != Framing::UntilClose,
    })
}

/// Serves one accepted connection of a cluster socket.
pub(crate) async fn serve(
    proxy: Proxy,
    mut stream: UnixStream,
    peer: Peer,
    stop: CancellationToken,
    slot: impl Send + 'static,
) {
    let mut buf = BytesMut::new();
    // Bytes of `buf` still in the socket: a request is first only peeked at (see
    // [`read_ready`]) and taken off after its answer went.
    let mut peeked = 0;
    loop {
        // The next head, whole within the header timeout (which also ends an idle kept
        // connection), as hyper's server has it; shutdown ends a connection waiting here.
        let deadline = Instant::now() + HEADER_READ_TIMEOUT;
        let taken = loop {
            match parse_request(&buf) {
                Head::Take(t) => break Some(t),
                Head::Hyper => break None,
                Head::Partial => {}
            }
            // A request is peeked at while none of it is in `buf`; what was peeked is taken
            // off before more is read.
            let peek = buf.is_empty();
            if !peek && discard(&stream, &mut peeked).is_err() {
                return;
            }
            // What the client has sent already is read without setting up the wait (a new
            // connection's request is nearly always there when it is accepted).
            let read = match read_ready(&stream, &mut buf, peek) {
                Some(r) => r,
                None => tokio::select! {
                    r = tokio::time::timeout_at(deadline, read_when_ready(&stream, &mut buf, peek)) => {
                        r.unwrap_or(Ok(0))
                    }
                    _ = stop.cancelled() => return,
                },
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) if peek => peeked = n,
                Ok(_) => {}
            }
        };
        let served = match taken {
            Some(t) if proxy.tunnel().is_up() && !proxy.tunnel().uses_fd_forward() => {
                forward(&proxy, &mut stream, t, &mut buf).await
            }
            _ => Served::Hyper,
        };
        if discard(&stream, &mut peeked).is_err() {
            return;
        }
        match served {
            Served::KeepAlive if !stop.is_cancelled() => continue,
            Served::KeepAlive | Served::Close => return,
            Served::Hyper => break,
        }
    }
    // hyper serves the rest of the connection, starting with the bytes already read.
    let io = hyper_util::rt::TokioIo::new(Prefixed {
        prefix: buf,
        inner: stream,
    });
    let handler = move |req| {
        let p = proxy.clone();
        async move { p.handle(req).await }
    };
    crate::http::serve_connection(io, peer, handler, stop, false, slot).await;
}

/// Reads what the client has sent so far without waiting; `None` when nothing is there yet
/// (the socket is non-blocking, as tokio keeps it; tokio's own readiness is not asked, as
/// it knows nothing of a socket just accepted).
///
/// With `peek` the bytes stay in the socket ([`discard`] takes them off later). Taking a
/// request off a unix socket wakes its client, which is waiting for the answer by then: the
/// kernel wakes a sleeper on the sender's socket whenever the receiver frees what it sent.
/// That wake finds nothing to read, and on the daemon's CPU it preempts the daemon before
/// the request goes on; peeked, the request is taken off once the answer is out.
fn read_ready(
    stream: &UnixStream,
    buf: &mut BytesMut,
    peek: bool,
) -> Option<std::io::Result<usize>> {
    match recv_buf(stream, buf, peek) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        r => Some(r),
    }
}

/// [`read_ready`] once the socket is readable.
async fn read_when_ready(
    stream: &UnixStream,
    buf: &mut BytesMut,
    peek: bool,
) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        // `try_io` clears tokio's readiness when nothing is there, so the next wait is real.
        match stream.try_io(tokio::io::Interest::READABLE, || {
            recv_buf(stream, buf, peek)
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// One non-blocking `recv` (with `peek`, a `MSG_PEEK`) appended to `buf`.
fn recv_buf(stream: &UnixStream, buf: &mut BytesMut, peek: bool) -> std::io::Result<usize> {
    buf.reserve(HEAD_READ);
    let flags = if peek { nix::libc::MSG_PEEK } else { 0 };
    let n = recv_into(stream, buf.spare_capacity_mut(), flags)?;
    // SAFETY: `recv` wrote the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Takes the `peeked` bytes, already in the caller's buffer, off the socket.
fn discard(stream: &UnixStream, peeked: &mut usize) -> Result<(), ()> {
    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
    while *peeked > 0 {
        let want = (*peeked).min(scratch.len());
        match recv_into(stream, scratch.get_mut(..want).ok_or(())?, 0) {
            Ok(n) if n > 0 => *peeked -= n.min(*peeked),
            // Peeked bytes are in the socket until taken: anything else is a fault.
            _ => return Err(()),
        }
    }
    Ok(())
}

/// One non-blocking `recv` into `into`, which it may leave partly uninitialised; returns
/// how many bytes it wrote.
fn recv_into(
    stream: &UnixStream,
    into: &mut [std::mem::MaybeUninit<u8>],
    flags: nix::libc::c_int,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor; the kernel writes at most `into.len()` bytes at its start.
    let n = unsafe {
        nix::libc::recv(
            stream.as_raw_fd(),
            into.as_mut_ptr().cast(),
            into.len(),
            flags,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// How a request ended.
enum Served {
    /// Answered; the connection may carry another request.
    KeepAlive,
    /// Answered (or failed while answering); the connection is closed.
    Close,
    /// Not answered: hyper is to serve it from the bytes still in the buffer.
    Hyper,
}

/// Sends a taken request upstream and streams the answer back.
async fn forward(
    proxy: &Proxy,
    client: &mut UnixStream,
    taken: Taken,
    buf: &mut BytesMut,
) -> Served {
    let started = std::time::Instant::now();
    let tunnel = proxy.tunnel().clone();
    tracing::debug!(
        method = if taken.head { "HEAD" } else { "GET" },
        path = %String::from_utf8_lossy(&taken.upstream[taken.path.clone()]),
        "request"
    );
    let (mut up, mut answer_buf) = match proxy.lean.take() {
        Some(taken) => taken,
        None => {
            let limit = tunnel.config.connect_timeout;
            match tokio::time::timeout(limit, crate::tunnel::api::connect(&tunnel)).await {
                Ok(Ok(up)) => (up, BytesMut::new()),
                // hyper's path waits for the tunnel and names the cause.
                _ => return Served::Hyper,
            }
        }
    };
    if up.write_all(&taken.upstream).await.is_err() {
        return Served::Hyper;
    }
    // The answer head, within connect_timeout; halfway, the supervisor is asked to probe.
    let limit = tunnel.config.connect_timeout;
    let deadline = Instant::now() + limit;
    let stall = Instant::now() + limit / 2;
    let mut probed = false;
    answer_buf.reserve(READ_SIZE);
    let (answer, consumed) = loop {
        match parse_answer(&answer_buf, taken.head, taken.close) {
            Ok(Some(a)) => break a,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "upstream request failed");
                return answer_error(proxy, client, &taken, buf, &e.to_string()).await;
            }
        }
        let until = if probed { deadline } else { stall };
        match tokio::time::timeout_at(until, up.read_buf(&mut answer_buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) if answer_buf.is_empty() => return Served::Hyper,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return answer_error(
                    proxy,
                    client,
                    &taken,
                    buf,
                    "the fleet API closed the connection within its answer's head",
                )
                .await
            }
            Ok(Ok(_)) => {}
            Err(_) if !probed => {
                tunnel.ask_probe();
                probed = true;
            }
            Err(_) => {
                let cause = proxy
                    .tunnel_down_reason()
                    .unwrap_or_else(|| "the fleet API did not answer".into());
                let why = format!(
                    "no response within {}: {cause}",
                    humantime::format_duration(limit)
                );
                tracing::warn!(error = %why, "upstream request stalled");
                return answer_error(proxy, client, &taken, buf, &why).await;
            }
        }
    };
    buf.advance(taken.head_len);
    tunnel.record_request(started.elapsed(), 0, 0);
    answer_buf.advance(consumed);
    let mut body = Body {
        up: &mut up,
        client,
        pending: &mut answer_buf,
        tunnel: &tunnel,
        turns: Turns::default(),
        out: Gathered::starting_with(answer.head),
    };
    let copied = match answer.framing {
        Framing::None => body.flush().await.map(|()| true),
        Framing::Length(n) => body.copy_length(n).await,
        Framing::Chunked => body.copy_chunked().await,
        Framing::UntilClose => body.copy_until_close().await,
    };
    if copied.is_err() {
        // What came before the fault still goes, as hyper sends it; the cut follows.
        let _ = body.flush().await;
    }
    match copied {
        Ok(complete) => {
            // An fd-forward session goes back to the host at once: the budget of sessions
            // is shared with hyper's path, which serves the cluster from now on.
            if complete && answer.reusable && answer_buf.is_empty() && !up.holds_session() {
                proxy.lean.put(up, answer_buf);
            }
            if taken.close {
                let _ = client.shutdown().await;
                Served::Close
            } else {
                Served::KeepAlive
            }
        }
        // The client's answer is cut: the connection ends, as hyper ends it.
        Err(()) => Served::Close,
    }
}

/// Answers a request whose upstream exchange failed with the proxy's 503.
async fn answer_error(
    proxy: &Proxy,
    client: &mut UnixStream,
    taken: &Taken,
    buf: &mut BytesMut,
    cause: &str,
) -> Served {
    buf.advance(taken.head_len);
    let resp = proxy.unavailable(cause);
    let (parts, body) = resp.into_parts();
    let body = match http_body_util::BodyExt::collect(body).await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Served::Close,
    };
    let reason = parts.status.canonical_reason().unwrap_or("");
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", parts.status.as_u16()).into_bytes();
    for (k, v) in parts.headers.iter() {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if taken.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !taken.head {
        out.extend_from_slice(&body);
    }
    if client.write_all(&out).await.is_err() || taken.close {
        let _ = client.shutdown().await;
        return Served::Close;
    }
    Served::KeepAlive
}

/// Lets the daemon's other tasks run after every [`BATCH`] bytes of a long answer: reads of
/// a channel do not count against tokio's budget, and a fast reader would otherwise keep the
/// thread for megabytes while small requests of other clients wait (a small answer never
/// waits for its turn).
#[derive(Default)]
struct Turns(usize);

impl Turns {
    async fn after(&mut self, written: usize) {
        self.0 += written;
        if self.0 >= BATCH {
            self.0 = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// Writes all of `parts` to the client (one `writev` when the socket takes it).
async fn write_all_vectored(
    client: &mut UnixStream,
    parts: &mut [std::io::IoSlice<'_>],
) -> Result<(), ()> {
    let mut slices = parts;
    while !slices.is_empty() {
        if slices[0].is_empty() {
            slices = &mut slices[1..];
            continue;
        }
        match client.write_vectored(slices).await {
            Ok(0) | Err(_) => return Err(()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut slices, n),
        }
    }
    Ok(())
}

/// What waits to go to the client, in order: the answer's head, framing and small data
/// copied into `out`, larger data (and the `out` before it) in `queued`, uncopied.
#[derive(Default)]
struct Gathered {
    /// What goes before `out`; at most two pieces per [`STAGED`] bytes (a piece is queued
    /// only when it does not fit in `out` beside what `out` holds), so one `writev` of it
    /// stays far below the system's limit of slices.
    queued: Vec<Bytes>,
    /// The bytes in `queued`.
    queued_len: usize,
    out: Vec<u8>,
}

impl Gathered {
    fn starting_with(head: Vec<u8>) -> Gathered {
        Gathered {
            out: head,
            ..Default::default()
        }
    }

    /// The bytes waiting.
    fn len(&self) -> usize {
        self.queued_len + self.out.len()
    }

    /// Framing or other bytes of our own, copied.
    fn put(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Body data, as it is or as one chunk: copied when it fits in `out` within [`STAGED`]
    /// bytes, queued as it is otherwise.
    fn put_data(&mut self, data: BytesMut, chunked: bool) {
        if chunked {
            self.put(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if self.out.len() + data.len() <= STAGED {
            self.out.extend_from_slice(&data);
        } else {
            self.queued_len += self.out.len() + data.len();
            if !self.out.is_empty() {
                self.queued.push(Bytes::from(std::mem::take(&mut self.out)));
            }
            self.queued.push(data.freeze());
        }
        if chunked {
            self.put(b"\r\n");
        }
    }

    /// Everything waiting, for one `writev`.
    fn slices(&self) -> Vec<std::io::IoSlice<'_>> {
        self.queued
            .iter()
            .map(|b| std::io::IoSlice::new(b))
            .chain(std::iter::once(std::io::IoSlice::new(&self.out)))
            .collect()
    }

    fn clear(&mut self) {
        self.queued.clear();
        self.queued_len = 0;
        self.out.clear();
    }
}

/// An answer's body on its way from fleetd (`pending` holds what was read of it) to the
/// client. Every copier returns `Ok(true)` when the body came whole and its end is known.
///
/// What goes to the client is gathered until the answer ends, more of it has to be waited
/// for, or [`BATCH`] bytes wait, and then goes in one `writev`: that wakes the client once,
/// where a write per piece woke it (and, on its CPU, preempted the daemon) for each. A
/// chunked answer's last piece and its end go together.
struct Body<'a> {
    up: &'a mut Upstream,
    client: &'a mut UnixStream,
    pending: &'a mut BytesMut,
    tunnel: &'a crate::tunnel::Tunnel,
    turns: Turns,
    out: Gathered,
}

impl Body<'_> {
    /// Writes what was gathered, in one `writev` when the socket takes it.
    async fn flush(&mut self) -> Result<(), ()> {
        let written = self.out.len();
        if written == 0 {
            return Ok(());
        }
        if self.out.queued.is_empty() {
            // A small answer, or the small rest of one: one buffer, no list of slices.
            self.client.write_all(&self.out.out).await.map_err(|_| ())?;
        } else {
            write_all_vectored(self.client, &mut self.out.slices()).await?;
        }
        self.out.clear();
        self.turns.after(written).await;
        Ok(())
    }

    /// Reads more of the answer, waiting for the first bytes (after writing what waits,
    /// so the client never waits on fleetd for bytes the daemon holds) and then taking
    /// whatever else has arrived, up to [`BATCH`]: one write to the client for all of it, as
    /// hyper's queued writes do. False at the answer's end.
    async fn fill(&mut self) -> Result<bool, ()> {
        use futures::FutureExt;
        if self.pending.capacity() - self.pending.len() < READ_SIZE {
            self.pending.reserve(READ_SIZE);
        }
        let read = match self.up.read_buf(self.pending).now_or_never() {
            Some(r) => r,
            None => {
                self.flush().await?;
                self.up.read_buf(self.pending).await
            }
        };
        match read {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(_) => return Err(()),
        }
        while self.pending.len() < BATCH {
            if self.pending.capacity() - self.pending.len() < READ_SIZE {
                self.pending.reserve(READ_SIZE);
            }
            match self.up.read_buf(self.pending).now_or_never() {
                Some(Ok(n)) if n > 0 => {}
                // Nothing more now (or the end, or an error): the next fill finds it.
                _ => break,
            }
        }
        Ok(true)
    }

    /// Up to `n` bytes of the body (at least one); the answer ending first is an error.
    async fn take(&mut self, n: u64) -> Result<BytesMut, ()> {
        if self.pending.is_empty() && !self.fill().await? {
            return Err(());
        }
        let take = self
            .pending
            .len()
            .min(usize::try_from(n).unwrap_or(usize::MAX));
        Ok(self.pending.split_to(take))
    }

    /// Sends body bytes to the client, as they are or as one chunk, and counts them; once
    /// [`BATCH`] bytes wait, they go.
    async fn send(&mut self, data: BytesMut, chunked: bool) -> Result<(), ()> {
        if data.is_empty() {
            return Ok(());
        }
        self.tunnel.add_bytes(data.len() as u64, 0);
        self.out.put_data(data, chunked);
        if self.out.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// A line (without its CRLF) at the start of what was read, reading more as needed.
    async fn line(&mut self) -> Result<BytesMut, ()> {
        loop {
            if let Some(i) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let l = self.pending.split_to(i);
                self.pending.advance(2);
                return Ok(l);
            }
            if self.pending.len() > MAX_CHUNK_LINE || !self.fill().await? {
                return Err(());
            }
        }
    }

    /// A body of `n` bytes.
    async fn copy_length(&mut self, mut n: u64) -> Result<bool, ()> {
        while n > 0 {
            let data = self.take(n).await?;
            n -= data.len() as u64;
            self.send(data, false).await?;
        }
        self.flush().await.map(|()| true)
    }

    /// A chunked body, chunk data re-framed for the client; trailers are dropped.
    async fn copy_chunked(&mut self) -> Result<bool, ()> {
        loop {
            let size_line = self.line().await?;
            let size_text = size_line[..]
                .split(|b| *b == b';')
                .next()
                .and_then(|s| std::str::from_utf8(s).ok())
                .map(str::trim)
                .unwrap_or_default();
            if size_text.is_empty() || !size_text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(());
            }
            let size = u64::from_str_radix(size_text, 16).map_err(|_| ())?;
            if size == 0 {
                // Trailers (dropped, as hyper drops them), up to the blank line.
                let mut trailers = 0;
                while !self.line().await?.is_empty() {
                    trailers += 1;
                    if trailers > MAX_HEADERS {
                        return Err(());
                    }
                }
                self.out.put(b"0\r\n\r\n");
                return self.flush().await.map(|()| true);
            }
            let mut left = size;
            while left > 0 {
                let data = self.take(left).await?;
                left -= data.len() as u64;
                self.send(data, true).await?;
            }
            if !self.line().await?.is_empty() {
                return Err(());
            }
        }
    }

    /// A body that ends with the connection, as chunks; never known whole.
    async fn copy_until_close(&mut self) -> Result<bool, ()> {
        loop {
            if !self.pending.is_empty() {
                let data = self.pending.split();
                self.send(data, true).await?;
            }
            if !self.fill().await? {
                self.out.put(b"0\r\n\r\n");
                return self.flush().await.map(|()| false);
            }
        }
    }
}

/// A stream whose first bytes were already read (into `prefix`).
struct Prefixed {
    prefix: BytesMut,
    inner: UnixStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(raw: &str) -> Taken {
        match parse_request(raw.as_bytes()) {
            Head::Take(t) => t,
            Head::Hyper => panic!("went to hyper: {raw:?}"),
            Head::Partial => panic!("partial: {raw:?}"),
        }
    }

    fn goes_to_hyper(raw: &str) -> bool {
        matches!(parse_request(raw.as_bytes()), Head::Hyper)
    }

    fn joined(g: &Gathered) -> Vec<u8> {
        g.slices().iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn gathered_pieces_go_in_order_and_large_data_uncopied() {
        let mut g = Gathered::starting_with(b"HEAD\r\n\r\n".to_vec());
        let large = BytesMut::from(&vec![b'L'; STAGED + 1][..]);
        let at = large.as_ptr();
        g.put_data(BytesMut::from(&b"small"[..]), true);
        g.put_data(large, true);
        g.put_data(BytesMut::from(&b"tail"[..]), true);
        g.put(b"0\r\n\r\n");
        let mut want = b"HEAD\r\n\r\n5\r\nsmall\r\n".to_vec();
        want.extend_from_slice(format!("{:x}\r\n", STAGED + 1).as_bytes());
        want.extend_from_slice(&vec![b'L'; STAGED + 1]);
        want.extend_from_slice(b"\r\n4\r\ntail\r\n0\r\n\r\n");
        assert_eq!(
            joined(&g),
            want,
            "one writev carries the whole answer, in order"
        );
        assert_eq!(g.len(), want.len());
        assert!(
            g.slices().iter().any(|s| s.as_ptr() == at),
            "the large piece is written from where it was read"
        );
        g.clear();
        assert_eq!(g.len(), 0);
        assert!(joined(&g).is_empty());
        // Unchunked, as read.
        g.put_data(BytesMut::from(&b"abc"[..]), false);
        assert_eq!(joined(&g), b"abc");
    }

    #[test]
    fn gathered_slices_stay_few() {
        // The worst case: each piece just too large for what `out` holds beside it.
        let mut g = Gathered::default();
        let mut want = Vec::new();
        let mut n = 0u8;
        while g.len() < BATCH {
            n = n.wrapping_add(1);
            let small = vec![n; STAGED - 10];
            g.put_data(BytesMut::from(&small[..]), false);
            let piece = vec![n.wrapping_add(100); 11];
            g.put_data(BytesMut::from(&piece[..]), false);
            want.extend_from_slice(&small);
            want.extend_from_slice(&piece);
        }
        assert_eq!(joined(&g), want);
        assert!(
            g.slices().len() <= 2 * g.len() / STAGED + 2,
            "{} slices for {} bytes",
            g.slices().len(),
            g.len()
        );
    }

    #[test]
    fn a_plain_get_is_written_again_without_hop_by_hop_headers() {
        let t = taken("GET /fleet/v1/machines?alt=json HTTP/1.1\r\nHost: domain-sock\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUser-Agent: Go-http-client/1.1\r\n\r\nGET /next");
        assert_eq!(
            String::from_utf8(t.upstream).unwrap(),
            "GET /fleet/v1/machines?alt=json HTTP/1.1\r\nhost: domain-sock\r\nuser-agent: Go-http-client/1.1\r\n\r\n"
        );
        assert!(t.close && !t.head);
        assert_eq!(t.head_len, "GET /fleet/v1/machines?alt=json HTTP/1.1\r\nHost: domain-sock\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUser-Agent: Go-http-client/1.1\r\n\r\n".len());
        let t = taken("HEAD /fleet/v1/units HTTP/1.1\r\n\r\n");
        assert!(t.head && !t.close);
        assert!(String::from_utf8(t.upstream)
            .unwrap()
            .contains("host: fleet\r\n"));
    }

    #[test]
    fn requests_with_a_body_or_anything_unusual_go_to_hyper() {
        for raw in [
            // Framing of a request is never decided here.
            "GET /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET /x HTTP/1.1\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n",
            "PUT /fleet/v1/units/a.service HTTP/1.1\r\n\r\n",
            "DELETE /fleet/v1/units/a.service HTTP/1.1\r\n\r\n",
            "get /x HTTP/1.1\r\n\r\n",
            "CONNECT fleet:80 HTTP/1.1\r\n\r\n",
            "GET http://fleet/x HTTP/1.1\r\n\r\n",
            "GET /x HTTP/1.0\r\n\r\n",
            "GET /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n",
            "GET /x HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "GARBAGE\r\n\r\n",
            "GET /caf\u{e9} HTTP/1.1\r\n\r\n",
        ] {
            assert!(goes_to_hyper(raw), "{raw:?}");
        }
        assert!(matches!(
            parse_request(b"GET /x HTTP/1.1\r\nHost: a\r\n"),
            Head::Partial
        ));
        let huge = format!("GET /x HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert!(goes_to_hyper(&huge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: 1\r\n")).collect();
        assert!(goes_to_hyper(&format!("GET /x HTTP/1.1\r\n{many}\r\n")));
    }

    fn answer(raw: &str, head: bool, close: bool) -> (Answer, usize) {
        parse_answer(raw.as_bytes(), head, close)
            .expect("parses")
            .expect("whole")
    }

    #[test]
    fn answers_are_framed_from_their_own_head() {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nDate: x\r\n\r\n";
        let (a, n) = answer(&format!("{head}{{}}"), false, false);
        assert_eq!(n, head.len());
        assert_eq!(a.framing, Framing::Length(2));
        assert!(a.reusable);
        assert_eq!(
            String::from_utf8(a.head).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: x\r\ncontent-length: 2\r\n\r\n"
        );
        let (a, _) = answer(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nConnection: X-Hop\r\nX-Hop: 1\r\nFleet-Broker-Error: c1\r\n\r\n",
            false,
            true,
        );
        assert_eq!(a.framing, Framing::Chunked);
        assert_eq!(
            String::from_utf8(a.head).unwrap(),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        let (a, _) = answer("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false, false);
        assert_eq!(a.framing, Framing::UntilClose);
        assert!(!a.reusable);
        let (a, _) = answer("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true, false);
        assert_eq!(a.framing, Framing::None);
        assert!(String::from_utf8(a.head)
            .unwrap()
            .contains("content-length: 7\r\n"));
        let (a, _) = answer("HTTP/1.1 204 No Content\r\n\r\n", false, false);
        assert_eq!(a.framing, Framing::None);
        let two =
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let (a, n) = answer(two, false, false);
        assert_eq!((a.framing, n), (Framing::Length(0), two.len()));
        assert!(a.head.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        let many = "HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INFORMATIONAL + 1);
        assert!(parse_answer(many.as_bytes(), false, false).is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Le", false, false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn answers_a_client_could_be_misled_by_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                parse_answer(raw.as_bytes(), false, false).is_err(),
                "{raw:?}"
            );
        }
        let big = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_ANSWER_HEAD));
        assert!(matches!(
            parse_answer(big.as_bytes(), false, false),
            Err(AnswerError::TooLarge)
        ));
    }
}
