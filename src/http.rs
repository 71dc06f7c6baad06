//! The accept discipline of every local door ([`accept_loop`]: the cluster sockets, the
//! control socket and the front door) and HTTP/1.1 on the unix sockets: peer uid check on
//! every connection (refusals logged at most once a second), one task per connection, and
//! graceful shutdown (stop accepting, let in-flight requests finish for up to
//! [`DRAIN_TIMEOUT`]). Bounded: at most [`MAX_CONNECTIONS`] connections per socket (more
//! wait in the kernel's backlog), request headers must arrive within
//! [`HEADER_READ_TIMEOUT`], and accept errors (EMFILE) back off instead of spinning, logged
//! at most once a second. When a burst of [`BURST`] or more connections at once has ended,
//! the memory it took is given back to the system.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::audit::Peer;
use crate::local::peer_allowed;
use crate::throttle::Throttle;

/// How long in-flight requests may run after shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Local connections served at once per socket.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send a request's headers (also closes idle keep-alive
/// connections after this long).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause after a failed accept.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// fleet's error shape: `{"error":{"code":N,"message":"…"}}`.
pub fn fleet_error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": status.as_u16(), "message": message}});
    json_response(status, body.to_string())
}

pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves `listener` until `shutdown` turns true, then drains: connections finish their
/// in-flight request (HTTP upgrades included) for up to [`DRAIN_TIMEOUT`].
pub async fn serve<S, F>(
    listener: UnixListener,
    label: String,
    shutdown: CancellationToken,
    handler: S,
) where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_streams(
        listener,
        label,
        shutdown,
        move |stream, peer, stop, slot| {
            serve_connection(
                TokioIo::new(stream),
                peer,
                handler.clone(),
                stop,
                false,
                slot,
            )
        },
    )
    .await;
}

/// [`serve`] with the connection's own server: `conn` gets every accepted connection whose
/// peer passed the uid check, with the stop token and the slot to hold until it ends.
pub(crate) async fn serve_streams<C, CF>(
    listener: UnixListener,
    label: String,
    shutdown: CancellationToken,
    conn: C,
) where
    C: Fn(tokio::net::UnixStream, Peer, CancellationToken, tokio::sync::OwnedSemaphorePermit) -> CF,
    CF: Future<Output = ()> + Send + 'static,
{
    let refusals = Throttle::default();
    let stop = shutdown.clone();
    accept_loop(
        &label,
        MAX_CONNECTIONS,
        listener,
        &shutdown,
        |(stream, _), slot| {
            let peer = match peer_allowed(&stream) {
                Ok(p) => p,
                Err(why) => {
                    if let Some(suppressed) = refusals.admit() {
                        tracing::warn!(socket = %label, reason = %why, suppressed, "refused local connection");
                    }
                    return None;
                }
            };
            Some(conn(stream, peer, stop.clone(), slot))
        },
    )
    .await;
}

/// The accept discipline of every local door: at most `max` connections at once (more wait
/// in the kernel's backlog), accept errors (EMFILE) backed off 5 ms doubling to 1 s and
/// logged at most once a second, one task per connection from `handle` (which may refuse a
/// connection by returning `None`), and on `shutdown` the listener closed and the tasks given
/// [`DRAIN_TIMEOUT`] to finish before they are aborted.
pub(crate) async fn accept_loop<L, H, HF>(
    label: &str,
    max: usize,
    listener: L,
    shutdown: &CancellationToken,
    mut handle: H,
) where
    L: Listen,
    H: FnMut(L::Conn, tokio::sync::OwnedSemaphorePermit) -> Option<HF>,
    HF: Future<Output = ()> + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    let burst = std::sync::Arc::new(Burst::default());
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max));
    let mut pause = Duration::ZERO;
    let accept_errors = Throttle::default();
    loop {
        // At the cap, stop accepting until a connection ends.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                tracing::warn!(socket = %label, "{max} connections open; new ones wait");
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            a = listener.accept_one() => a,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok(conn) => {
                pause = Duration::ZERO;
                if let Some(task) = handle(conn, slot) {
                    burst.begin();
                    let burst = burst.clone();
                    conns.spawn(tracing::Instrument::in_current_span(async move {
                        task.await;
                        burst.end();
                    }));
                }
                // Reap finished connection tasks as we go.
                while conns.try_join_next().is_some() {}
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin, and say so at most once a
                // second.
                pause = (pause * 2).clamp(Duration::from_millis(5), ACCEPT_BACKOFF_MAX);
                if let Some(suppressed) = accept_errors.admit() {
                    tracing::warn!(socket = %label, error = %e, suppressed, "accept failed; pausing {pause:?}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    // No new connections while the ones in flight finish.
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(socket = %label, "in-flight requests still running after {:?}; closing them", DRAIN_TIMEOUT);
        conns.abort_all();
    }
}

/// Connections at once from which their end gives memory back.
const BURST: usize = 64;

/// The connections of one door at once, and the most since they last all ended: when a
/// burst of at least [`BURST`] has ended, glibc is asked to give the memory its buffers
/// took back to the system (otherwise a daemon stays at the burst's high-water mark: 31 MB
/// after 256 clients at once, 13 MB once trimmed).
#[derive(Default)]
struct Burst {
    live: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

impl Burst {
    fn begin(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.live.fetch_add(1, Relaxed) + 1;
        self.peak.fetch_max(now, Relaxed);
    }

    fn end(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.live.fetch_sub(1, Relaxed) == 1 && self.peak.swap(0, Relaxed) >= BURST {
            crate::memory::trim_soon();
        }
    }
}

/// A listening socket [`accept_loop`] takes connections from.
pub(crate) trait Listen {
    /// An accepted connection (with its peer's address).
    type Conn;
    /// The next connection.
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Listen for UnixListener {
    type Conn = (tokio::net::UnixStream, tokio::net::unix::SocketAddr);
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send {
        self.accept()
    }
}

impl Listen for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send {
        self.accept()
    }
}

/// Serves HTTP/1.1 on one accepted connection of `peer` until it ends; when `stop` is
/// cancelled, the request in flight (an upgrade included) may finish. `slot` is held until
/// then. Shared by the local sockets and the front door's fleet API channels, whose clients
/// may close their sending side before the answer (`half_close`).
pub(crate) async fn serve_connection<I, S, F>(
    io: I,
    peer: Peer,
    handler: S,
    stop: CancellationToken,
    half_close: bool,
    slot: impl Send + 'static,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let _slot = slot;
    // Each request carries who sent it (for the audit log and the policy).
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(peer);
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h(req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .half_close(half_close)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "local connection ended with an error");
    }
}
