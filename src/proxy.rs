//! A cluster socket: a local HTTP/1.1 server whose every request is forwarded to the
//! cluster's fleet API over a pooled upstream HTTP connection carried by an SSH channel
//! (`direct-streamlocal@openssh.com` for a unix endpoint, `direct-tcpip` for http). Paths,
//! queries, status codes and bodies pass through unchanged and streamed. Reads without a
//! body take [`lean`]'s short path; everything else, and the policy (`read_only`, audit,
//! CONNECT), is [`Proxy::handle`]'s, on hyper.
//! Every channel is read through a `tunnel::channel::DrainedChannel`, so a local client that
//! stops reading is cut off instead of stalling every other request of the cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::http::{fleet_error, Body};
use crate::protocol::BROKER_ERROR_HEADER;
use crate::tunnel::api::ApiConnector;
use crate::tunnel::Tunnel;

pub(crate) mod lean;

/// Idle pooled upstream connections kept per cluster: enough for our fleetctl's concurrent
/// requests (a listing asks for its pages ahead and the machine list beside them). Each is
/// a channel, and a connection to fleetd, that the tunnel host's sshd keeps open and polls.
const POOL_MAX_IDLE: usize = 8;
/// How long an idle upstream connection is kept. The pool closes it only with a timer
/// (`pool_timer`); without one, connections past this age stay open until they are checked
/// out again, and the least used never are.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A local request body, counted as it streams upstream.
type UpBody = http_body_util::combinators::MapFrame<
    Incoming,
    Box<dyn Fn(hyper::body::Frame<Bytes>) -> hyper::body::Frame<Bytes> + Send + Sync>,
>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No response within the cluster's `connect_timeout`, and why as far as the tunnel knows.
#[derive(Debug, thiserror::Error)]
#[error("no response within {}: {cause}", humantime::format_duration(*limit))]
struct Stalled {
    limit: Duration,
    cause: String,
}

/// Forwards requests for one cluster.
#[derive(Clone)]
pub struct Proxy {
    tunnel: Arc<Tunnel>,
    client: Client<ApiConnector, UpBody>,
    audit: Arc<crate::audit::AuditLog>,
    /// The upstream connections of the short path for reads ([`lean`]).
    lean: Arc<lean::Pool>,
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether a method only reads: `GET` or `HEAD`, in any case. A read-only cluster forwards
/// nothing else.
fn is_read(method: &hyper::Method) -> bool {
    let m = method.as_str();
    m.eq_ignore_ascii_case("GET") || m.eq_ignore_ascii_case("HEAD")
}

/// Removes the hop-by-hop headers (RFC 9110 7.6.1): the fixed ones and every header that
/// `Connection` names.
fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for h in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
        headers.remove(h);
    }
}

impl Proxy {
    pub fn new(tunnel: Arc<Tunnel>, audit: Arc<crate::audit::AuditLog>) -> Proxy {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(ApiConnector::new(tunnel.clone()));
        Proxy {
            tunnel,
            client,
            audit,
            lean: Arc::default(),
        }
    }

    /// The cluster's tunnel.
    pub(crate) fn tunnel(&self) -> &Arc<Tunnel> {
        &self.tunnel
    }

    /// A 503 in fleet's error shape naming the cluster once, marked with
    /// [`BROKER_ERROR_HEADER`] so that our fleetctl can tell a tunnel fault from fleetd's.
    fn unavailable(&self, cause: &str) -> Response<Body> {
        let name = self.tunnel.name();
        let prefix = format!("cluster {name:?}: ");
        let cause = cause.replace(&prefix, "");
        let mut r = fleet_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{prefix}{cause}"));
        if let Ok(v) = hyper::header::HeaderValue::from_str(name) {
            r.headers_mut().insert(BROKER_ERROR_HEADER, v);
        }
        r
    }

    /// Why the tunnel is not up, if it is not.
    fn tunnel_down_reason(&self) -> Option<String> {
        let status = self.tunnel.status();
        (status.state != crate::tunnel::State::Ready)
            .then_some(status.last_error)
            .flatten()
    }

    /// Sends the request and waits for its response headers until `connect_timeout` after
    /// the request arrived (at least half of it from now). A request still waiting halfway
    /// asks the supervisor to probe the connection, which reconnects when the tunnel host no
    /// longer answers; so a silent tunnel costs one `connect_timeout`, not TCP's minutes.
    async fn response_within(
        &self,
        req: Request<UpBody>,
        started: Instant,
    ) -> Result<Result<Response<Incoming>, hyper_util::client::legacy::Error>, Stalled> {
        let limit = self.tunnel.config.connect_timeout;
        let now = tokio::time::Instant::now();
        let deadline = (tokio::time::Instant::from_std(started) + limit).max(now + limit / 2);
        let stall = now + (deadline - now) / 2;
        let fut = self.client.request(req);
        tokio::pin!(fut);
        if let Ok(r) = tokio::time::timeout_at(stall, &mut fut).await {
            return Ok(r);
        }
        self.tunnel.ask_probe();
        match tokio::time::timeout_at(deadline, &mut fut).await {
            Ok(r) => Ok(r),
            Err(_) => {
                let cause = self
                    .tunnel_down_reason()
                    .unwrap_or_else(|| "the fleet API did not answer".into());
                Err(Stalled { limit, cause })
            }
        }
    }

    /// Handles one local request.
    /// Handles one local request; anything but GET and HEAD is recorded in the audit log
    /// with who sent it and what came of it.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if is_read(req.method()) {
            return self.forward(req).await;
        }
        let started = Instant::now();
        // What the daemon keeps of the cluster's answers (the machine list) is dropped
        // before a change is sent, and again when it has been answered.
        self.tunnel.note_change();
        let peer = req.extensions().get::<crate::audit::Peer>().copied();
        let method = req.method().to_string();
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string());
        let request_bytes = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let resp = self.forward(req).await;
        self.tunnel.note_change();
        let response_bytes = hyper::body::Body::size_hint(resp.body())
            .exact()
            .or_else(|| {
                resp.headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
            });
        self.audit
            .record(
                peer,
                serde_json::json!({
                    "kind": "api",
                    "cluster": self.tunnel.name(),
                    "method": method,
                    "path": path,
                    "status": resp.status().as_u16(),
                    "duration_ms": started.elapsed().as_millis() as u64,
                    "request_bytes": request_bytes,
                    "response_bytes": response_bytes,
                }),
            )
            .await;
        resp
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        if req.method() == hyper::Method::CONNECT {
            let mut resp = fleet_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not forwarded: this socket serves the fleet API only",
            );
            resp.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD, PUT, DELETE"),
            );
            return resp;
        }
        if self.tunnel.config.read_only && !is_read(req.method()) {
            return fleet_error(
                StatusCode::FORBIDDEN,
                &format!(
                    "cluster {:?} is read-only in the broker's config",
                    self.tunnel.name()
                ),
            );
        }
        if let Err(cause) = self.tunnel.link().await {
            return self.unavailable(&cause.to_string());
        }
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let uri = match format!("http://fleet{pq}").parse::<Uri>() {
            Ok(u) => u,
            Err(e) => {
                return fleet_error(StatusCode::BAD_REQUEST, &format!("bad request target: {e}"))
            }
        };
        *req.uri_mut() = uri;
        strip_hop_by_hop(req.headers_mut());
        let method = req.method().clone();
        tracing::debug!(%method, path = %pq, "request");
        let (parts, body) = req.into_parts();
        let counter = self.tunnel.clone();
        let count: Box<
            dyn Fn(hyper::body::Frame<Bytes>) -> hyper::body::Frame<Bytes> + Send + Sync,
        > = Box::new(move |f| {
            if let Some(d) = f.data_ref() {
                counter.add_bytes(0, d.len() as u64);
            }
            f
        });
        let body = body.map_frame(count);
        let req = Request::from_parts(parts, body);
        let response = match self.response_within(req, started).await {
            Ok(r) => r,
            Err(stalled) => {
                tracing::warn!(error = %stalled, "upstream request stalled");
                return self.unavailable(&stalled.to_string());
            }
        };
        match response {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // Only the broker says that the tunnel failed; fleetd cannot.
                parts.headers.remove(BROKER_ERROR_HEADER);
                let tunnel = self.tunnel.clone();
                tunnel.record_request(started.elapsed(), 0, 0);
                let body = body
                    .map_frame(move |f| {
                        if let Some(d) = f.data_ref() {
                            tunnel.add_bytes(d.len() as u64, 0);
                        }
                        f
                    })
                    .map_err(|e| -> BoxError { Box::new(e) })
                    .boxed();
                Response::from_parts(parts, body)
            }
            Err(e) => {
                let mut cause = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    cause = s.to_string();
                    src = s.source();
                }
                // When the tunnel went down under the request, its reason is the cause.
                if let Some(why) = self.tunnel_down_reason() {
                    cause = format!("{cause}: {why}");
                }
                tracing::warn!(error = %cause, "upstream request failed");
                self.unavailable(&cause)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_named_in_connection_are_removed() {
        let mut h = hyper::HeaderMap::new();
        h.insert("connection", "X-Secret, keep-alive".parse().expect("value"));
        h.append("connection", "x-other".parse().expect("value"));
        h.insert("x-secret", "1".parse().expect("value"));
        h.insert("x-other", "1".parse().expect("value"));
        h.insert("x-kept", "1".parse().expect("value"));
        h.insert("te", "trailers".parse().expect("value"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }

    #[test]
    fn only_get_and_head_read() {
        for (m, read) in [
            ("GET", true),
            ("get", true),
            ("HEAD", true),
            ("PUT", false),
            ("put", false),
            ("DELETE", false),
            ("OPTIONS", false),
            ("PROPFIND", false),
        ] {
            let method = hyper::Method::from_bytes(m.as_bytes()).expect("method");
            assert_eq!(is_read(&method), read, "{m}");
        }
    }
}
