//! A fleet v1 API client over a unix socket (a broker cluster socket or fleetd's own), shaped
//! like fleetctl's: `http://domain-sock/fleet/v1/…?alt=json`, all pages fetched, `@` sent as
//! `%40`, errors worded as Go's googleapi and net/http word them. Every request is bounded by
//! the caller's timeout. Knows nothing of SSH or of the broker.

mod ahead;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::fleet::schema::{Machine, MachinePage, Unit, UnitPage, UnitState, UnitStatePage};

/// Characters kept as they are in a unit name path segment (Go's path escaping).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':');
/// Upper bound on pages followed, so a misbehaving server cannot loop us forever.
const MAX_PAGES: usize = 100_000;
/// Idle connections kept: the most pages asked ahead, the machine list and a unit beside
/// them.
const POOL_MAX_IDLE: usize = ahead::MAX + 2;
/// How long an idle connection is kept.
const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Fleet's page token: base64url with padding of the page size and the 1-based page
/// number, each a little-endian u16 (reference A.4).
fn decode_page_token(token: &str) -> Option<(u16, u16)> {
    use base64::Engine;
    let b = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .ok()?;
    let [l0, l1, p0, p1] = b.as_slice() else {
        return None;
    };
    let (limit, page) = (
        u16::from_le_bytes([*l0, *l1]),
        u16::from_le_bytes([*p0, *p1]),
    );
    (limit > 0 && page > 0).then_some((limit, page))
}

fn encode_page_token(limit: u16, page: u16) -> String {
    use base64::Engine;
    let mut b = limit.to_le_bytes().to_vec();
    b.extend_from_slice(&page.to_le_bytes());
    base64::engine::general_purpose::URL_SAFE.encode(b)
}
/// The largest response body read. fleet's largest page is 100 units with their unit files
/// (`token_limit`), a few MiB at most; anything larger is a broken or hostile server, and
/// reading it whole would let that server fill our memory.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// The largest listing read, all its pages together.
pub const MAX_LISTING_BYTES: usize = 64 << 20;
/// The largest answer the daemon reads for its own lookups (the machine list, one unit):
/// a page of 100 machines is tens of KiB, a unit a few KiB.
pub const LOOKUP_MAX_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The server answered with fleet's error body.
    #[error("googleapi: Error {code}: {message}")]
    Api { code: u16, message: String },
    /// A status without fleet's error body.
    #[error("googleapi: got HTTP response code {code} with body: {body}")]
    Status { code: u16, body: String },
    /// The request did not complete.
    #[error("{method} \"{url}\": {reason}")]
    Transport {
        method: String,
        url: String,
        reason: String,
    },
    #[error("{method} \"{url}\": no response within {timeout:?} (raise --request-timeout)")]
    Timeout {
        method: String,
        url: String,
        timeout: Duration,
    },
    /// The broker could not carry the request to the cluster (its tunnel is down): what it
    /// said, and what to run.
    #[error("googleapi: Error {code}: {message}; `fleet-broker status` shows the tunnel, `fleet-broker connect {cluster}` retries now")]
    Broker {
        code: u16,
        cluster: String,
        message: String,
    },
    /// The server sent more than a fleet API answer can be.
    #[error("{method} \"{url}\": the answer is larger than {limit} bytes, more than fleet ever sends; the server is broken or not fleetd")]
    TooLarge {
        method: String,
        url: String,
        limit: usize,
    },
    #[error("{method} \"{url}\": cannot decode response: {reason}")]
    Decode {
        method: String,
        url: String,
        reason: String,
    },
}

impl ApiError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Api { code: 404, .. })
    }
}

/// A byte stream to a fleet API server.
pub(crate) trait Stream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

type DialFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Box<dyn Stream>>> + Send>>;

/// Opens a new connection to a fleet API server; the caller knows how (the daemon: a channel
/// of a cluster's tunnel).
type Dial = std::sync::Arc<dyn Fn() -> DialFuture + Send + Sync>;

/// How each upstream connection is made: a unix socket connected with
/// [`crate::local::connect`] (the socket's directory and the uid answering on it are checked
/// before a request is written), or the caller's [`Dial`].
#[derive(Clone)]
enum Connector {
    Unix {
        socket: std::sync::Arc<PathBuf>,
        wake: Option<Wake>,
    },
    Dial(Dial),
}

/// What to do, once, when the socket is not there: true when connecting again may succeed.
/// The caller, who knows whose socket it is, supplies it ([`FleetClient::waking`]); a
/// broker's cluster socket is brought up by a request to its daemon's control socket, which
/// starts a socket-activated daemon.
pub type Wake = std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> + Send + Sync,
>;

/// A connection made by [`Connector`].
struct CheckedStream(TokioIo<Box<dyn Stream>>);

impl hyper::rt::Read for CheckedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for CheckedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for CheckedStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl tower_service::Service<hyper::Uri> for Connector {
    type Response = CheckedStream;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<CheckedStream, std::io::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: hyper::Uri) -> Self::Future {
        let (socket, wake) = match self {
            Connector::Dial(dial) => {
                let dialing = dial();
                return Box::pin(async move { Ok(CheckedStream(TokioIo::new(dialing.await?))) });
            }
            Connector::Unix { socket, wake } => (socket.clone(), wake.clone()),
        };
        Box::pin(async move {
            let mut connected = crate::local::connect(&socket).await;
            let missing = matches!(&connected, Err(crate::local::LocalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound);
            if let (true, Some(wake)) = (missing, wake) {
                if wake().await {
                    connected = crate::local::connect(&socket).await;
                }
            }
            match connected {
                Ok(s) => Ok(CheckedStream(TokioIo::new(Box::new(s)))),
                Err(crate::local::LocalError::Io { source, .. }) => Err(source),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            }
        })
    }
}

/// A fleet API client bound to one unix socket, or to the caller's way of reaching one
/// server ([`FleetClient::dialing`]).
#[derive(Clone)]
pub struct FleetClient {
    socket: PathBuf,
    /// Whether connections come from the caller's [`Dial`] (then `socket` only names them).
    dialed: bool,
    client: Client<Connector, Full<Bytes>>,
    timeout: Duration,
    /// The largest response body read ([`MAX_RESPONSE_BYTES`] unless limited further).
    max_response: usize,
    /// Log each request as fleetctl's debug mode does.
    pub debug: bool,
}

fn go_method(m: &Method) -> String {
    let s = m.as_str();
    let mut out = s[..1].to_string();
    out.push_str(&s[1..].to_ascii_lowercase());
    out
}

fn io_reason(socket: &Path, e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            let what = match io.kind() {
                std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                _ => io.to_string(),
            };
            return format!("dial unix {}: connect: {what}", socket.display());
        }
        cur = err.source();
    }
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

/// `name` as a path segment (`web@1.service` → `web%401.service`).
pub fn escape_name(name: &str) -> String {
    utf8_percent_encode(name, SEGMENT).to_string()
}

impl FleetClient {
    pub fn new(socket: &Path, timeout: Duration) -> FleetClient {
        let client = Self::client(Connector::Unix {
            socket: std::sync::Arc::new(socket.to_path_buf()),
            wake: None,
        });
        FleetClient {
            socket: socket.to_path_buf(),
            dialed: false,
            client,
            timeout,
            max_response: MAX_RESPONSE_BYTES,
            debug: false,
        }
    }

    /// A client whose every connection is opened by `dial` (each one used for many
    /// requests, kept warm while idle as hyper's pool keeps them); `name` stands for the
    /// server in messages. Only a broker in between could mark an answer as its own, so no
    /// answer here is taken for the broker's.
    pub(crate) fn dialing<F, Fut, S>(name: &str, timeout: Duration, dial: F) -> FleetClient
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::io::Result<S>> + Send + 'static,
        S: Stream + 'static,
    {
        let dial: Dial = std::sync::Arc::new(move || {
            let opening = dial();
            Box::pin(async move { Ok(Box::new(opening.await?) as Box<dyn Stream>) })
        });
        FleetClient {
            socket: PathBuf::from(name),
            dialed: true,
            client: Self::client(Connector::Dial(dial)),
            timeout,
            max_response: MAX_RESPONSE_BYTES,
            debug: false,
        }
    }

    /// Idle connections are kept for a while (few: each is a channel of the tunnel in the
    /// daemon) and closed by the pool's timer when that while is over.
    fn client(connector: Connector) -> Client<Connector, Full<Bytes>> {
        Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector)
    }

    /// The same client, calling `wake` once when the socket is not there, and connecting
    /// again if it says so.
    pub fn waking(mut self, wake: Wake) -> FleetClient {
        if !self.dialed {
            self.client = Self::client(Connector::Unix {
                socket: std::sync::Arc::new(self.socket.clone()),
                wake: Some(wake),
            });
        }
        self
    }

    /// The same client reading at most `bytes` of any one answer and of a listing.
    pub fn limit_responses(mut self, bytes: usize) -> FleetClient {
        self.max_response = bytes.min(MAX_RESPONSE_BYTES);
        self
    }

    /// One request; returns status and body. `path_query` starts with `/fleet/v1/`.
    async fn request(
        &self,
        method: Method,
        path_query: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let url = format!("http://domain-sock{path_query}");
        if self.debug {
            let now = chrono_like_now();
            eprintln!("{now} DEBUG http.go:28: HTTP {method} {url}");
        }
        let uri: hyper::Uri = hyperlocal::Uri::new(&self.socket, path_query).into();
        let mut b = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header("Host", "domain-sock")
            .header("User-Agent", "google-api-go-client/0.5");
        if body.is_some() {
            b = b.header("Content-Type", "application/json");
        }
        let transport = |reason: String| ApiError::Transport {
            method: go_method(&method),
            url: url.clone(),
            reason,
        };
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(e.to_string()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| transport(self.reason(&e)))?;
            let status = resp.status();
            if self.debug {
                let reason = status.canonical_reason().unwrap_or("");
                eprintln!(
                    "{} DEBUG http.go:31: HTTP {method} {url} {} {reason}",
                    chrono_like_now(),
                    status.as_u16()
                );
            }
            let broker = resp
                .headers()
                .get(crate::protocol::BROKER_ERROR_HEADER)
                .filter(|_| !self.dialed)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = http_body_util::Limited::new(resp.into_body(), self.max_response)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        crate::memory::trim_soon();
                        ApiError::TooLarge {
                            method: go_method(&method),
                            url: url.clone(),
                            limit: self.max_response,
                        }
                    } else {
                        transport(e.to_string())
                    }
                })?
                .to_bytes();
            if let Some(cluster) = broker {
                let message = match Self::check(status, &bytes) {
                    Err(ApiError::Api { message, .. }) => message,
                    _ => String::from_utf8_lossy(&bytes).into_owned(),
                };
                return Err(ApiError::Broker {
                    code: status.as_u16(),
                    cluster,
                    message,
                });
            }
            Ok::<_, ApiError>((status, bytes))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout {
                method: go_method(&method),
                url,
                timeout: self.timeout,
            }),
        }
    }

    /// Why a request did not complete, as Go's net/http says it for a unix socket; for a
    /// dialed server, what the dial said.
    fn reason(&self, e: &(dyn std::error::Error + 'static)) -> String {
        if !self.dialed {
            return io_reason(&self.socket, e);
        }
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                return format!("{}: {io}", self.socket.display());
            }
            cur = err.source();
        }
        io_reason(&self.socket, e)
    }

    fn check(status: StatusCode, body: &Bytes) -> Result<(), ApiError> {
        if status.is_success() {
            return Ok(());
        }
        #[derive(serde::Deserialize)]
        struct Inner {
            code: u16,
            message: String,
        }
        #[derive(serde::Deserialize)]
        struct Outer {
            error: Inner,
        }
        match serde_json::from_slice::<Outer>(body) {
            Ok(o) if !o.error.message.is_empty() => Err(ApiError::Api {
                code: o.error.code,
                message: o.error.message,
            }),
            _ => Err(ApiError::Status {
                code: status.as_u16(),
                body: String::from_utf8_lossy(body).into_owned(),
            }),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path_query: &str,
    ) -> Result<T, ApiError> {
        Ok(self.get_json_sized(path_query).await?.0)
    }

    /// A GET decoded, with the size of the body it was decoded from.
    async fn get_json_sized<T: serde::de::DeserializeOwned>(
        &self,
        path_query: &str,
    ) -> Result<(T, usize), ApiError> {
        let (status, body) = self.request(Method::GET, path_query, None).await?;
        Self::check(status, &body)?;
        let value = serde_json::from_slice(&body).map_err(|e| ApiError::Decode {
            method: "Get".into(),
            url: format!("http://domain-sock{path_query}"),
            reason: e.to_string(),
        })?;
        Ok((value, body.len()))
    }

    /// Every page of a listing, in order, exactly as asking for each page's
    /// `nextPageToken` in turn would give them. Fleet's tokens are its page size and page
    /// number (reference A.4), so once a page names the next one, the pages after it are
    /// asked for too, as many at a time as [`ahead::Ahead`] finds keep the server busy, and
    /// each is taken only when its predecessor's token names it; a token of another shape,
    /// or one that differs, goes on one page at a time from the token the server gave.
    /// Answers past the last page are dropped unread.
    async fn pages<P, T>(
        &self,
        base: &str,
        extra: &[(&str, &str)],
        take: impl Fn(P) -> (Vec<T>, String),
    ) -> Result<Vec<T>, ApiError>
    where
        P: serde::de::DeserializeOwned,
    {
        use futures::StreamExt;
        let path_for = |token: &str| {
            let mut params: Vec<(String, String)> = vec![("alt".into(), "json".into())];
            for (k, v) in extra {
                params.push((k.to_string(), v.to_string()));
            }
            if !token.is_empty() {
                params.push(("nextPageToken".into(), token.to_string()));
            }
            params.sort();
            let q: Vec<String> = params
                .iter()
                .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
                .collect();
            format!("{base}?{}", q.join("&"))
        };
        let most = MAX_LISTING_BYTES.min(self.max_response * 4);
        let mut out = Vec::new();
        let mut read = 0usize;
        // The pages asked for ahead: their tokens, and their answers in the same order.
        let mut ahead_tokens: std::collections::VecDeque<String> = Default::default();
        let mut ahead = futures::stream::FuturesOrdered::new();
        let mut window = ahead::Ahead::new();
        // One page asked for: its answer, when it was asked and answered, and how many pages
        // were waiting when it was asked, itself included.
        let ask = |path: String, depth: usize| async move {
            let asked = Instant::now();
            let answer = self.get_json_sized::<P>(&path).await;
            (answer, asked, Instant::now(), depth)
        };
        let mut token = String::new();
        for _ in 0..MAX_PAGES {
            let asked = ahead_tokens.front() == Some(&token);
            let answer = match (asked, asked.then(|| ahead.next())) {
                (true, Some(next)) => {
                    ahead_tokens.pop_front();
                    next.await
                }
                _ => None,
            };
            let (answer, asked, answered, depth) = match answer {
                Some(a) => a,
                None => {
                    // Not the page asked ahead: what was asked ahead is dropped.
                    ahead_tokens.clear();
                    ahead = futures::stream::FuturesOrdered::new();
                    ask(path_for(&token), 1).await
                }
            };
            window.taken(asked, answered, depth);
            let (page, size) = answer?;
            read += size;
            if read > most {
                crate::memory::trim_soon();
                return Err(ApiError::TooLarge {
                    method: "Get".into(),
                    url: format!("http://domain-sock{base}"),
                    limit: most,
                });
            }
            let (items, next) = take(page);
            out.extend(items);
            if next.is_empty() {
                return Ok(out);
            }
            if let Some((limit, named)) = decode_page_token(&next) {
                let mut p = match ahead_tokens.back().and_then(|t| decode_page_token(t)) {
                    Some((_, last)) => last,
                    None => named.saturating_sub(1),
                };
                while ahead_tokens.len() < window.window() && p < u16::MAX {
                    p += 1;
                    let t = encode_page_token(limit, p);
                    let path = path_for(&t);
                    ahead_tokens.push_back(t);
                    ahead.push_back(ask(path, ahead_tokens.len()));
                }
            }
            token = next;
        }
        Ok(out)
    }

    /// `GET /units`, every page.
    pub async fn units(&self) -> Result<Vec<Unit>, ApiError> {
        self.pages("/fleet/v1/units", &[], |p: UnitPage| {
            (p.units, p.next_page_token)
        })
        .await
    }

    /// `GET /units/NAME`; `None` on 404.
    pub async fn unit(&self, name: &str) -> Result<Option<Unit>, ApiError> {
        match self
            .get_json::<Unit>(&format!("/fleet/v1/units/{}?alt=json", escape_name(name)))
            .await
        {
            Ok(u) => Ok(Some(u)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /state`, every page, optionally filtered.
    pub async fn unit_states(
        &self,
        machine: Option<&str>,
        unit: Option<&str>,
    ) -> Result<Vec<UnitState>, ApiError> {
        let mut extra = Vec::new();
        if let Some(m) = machine {
            extra.push(("machineID", m));
        }
        if let Some(u) = unit {
            extra.push(("unitName", u));
        }
        self.pages("/fleet/v1/state", &extra, |p: UnitStatePage| {
            (p.states, p.next_page_token)
        })
        .await
    }

    /// `GET /machines`, every page.
    pub async fn machines(&self) -> Result<Vec<Machine>, ApiError> {
        self.pages("/fleet/v1/machines", &[], |p: MachinePage| {
            (p.machines, p.next_page_token)
        })
        .await
    }

    async fn put_unit(&self, name: &str, body: String) -> Result<(), ApiError> {
        let (status, resp) = self
            .request(
                Method::PUT,
                &format!("/fleet/v1/units/{}?alt=json", escape_name(name)),
                Some(body),
            )
            .await?;
        Self::check(status, &resp)
    }

    /// Creates (or replaces) a unit from its options, as fleetctl does: no desired state.
    pub async fn create_unit(&self, unit: &Unit) -> Result<(), ApiError> {
        let body = serde_json::json!({"name": unit.name, "options": unit.options});
        self.put_unit(&unit.name, format!("{body}\n")).await
    }

    /// Sets a unit's desired state.
    pub async fn set_unit_target_state(&self, name: &str, state: &str) -> Result<(), ApiError> {
        let body = serde_json::json!({"desiredState": state, "name": name});
        self.put_unit(name, format!("{body}\n")).await
    }

    /// `DELETE /units/NAME`.
    pub async fn destroy_unit(&self, name: &str) -> Result<(), ApiError> {
        let (status, body) = self
            .request(
                Method::DELETE,
                &format!("/fleet/v1/units/{}?alt=json", escape_name(name)),
                None,
            )
            .await?;
        Self::check(status, &body)
    }
}

/// `YYYY/MM/DD HH:MM:SS` in local time as Go's log package prints it (UTC here: the
/// broker does not read time zone files).
pub fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}/{m:02}/{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests;
