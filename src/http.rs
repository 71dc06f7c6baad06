//! The accept loop shared by the cluster sockets and the control socket: peer uid check on
//! every connection, one task per connection serving HTTP/1.1, and graceful shutdown (stop
//! accepting, let in-flight requests finish for up to [`DRAIN_TIMEOUT`]).

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::local::peer_allowed;

/// How long in-flight requests may run after shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

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
    mut shutdown: watch::Receiver<bool>,
    handler: S,
) where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(socket = %label, error = %e, "accept failed");
                        continue;
                    }
                };
                if let Err(why) = peer_allowed(&stream) {
                    tracing::warn!(socket = %label, reason = %why, "refused local connection");
                    drop(stream);
                    continue;
                }
                let h = handler.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let mut stop = shutdown.clone();
                conns.spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    tokio::pin!(conn);
                    let result = tokio::select! {
                        r = conn.as_mut() => r,
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "local connection ended with an error");
                    }
                });
                // Reap finished connection tasks as we go.
                while conns.try_join_next().is_some() {}
            }
            _ = shutdown.changed() => break,
        }
    }
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
