//! fleet's v1 HTTP API over the simulated cluster: routing under `/fleet/v1` and `/v1-alpha`,
//! pagination tokens, status codes and messages exactly as reference section A gives them.

use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, SERVER};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use super::engine::Sim;
use crate::fleet::schema::{MachinePage, Unit, UnitPage, UnitStatePage};
use crate::fleet::unit_file::{hash, is_template, validate_name, validate_options};
use crate::http::{full, Body};

const SERVER_HEADER: &str = "fleetd/1.0.0";
/// Largest request body the simulator reads.
const MAX_BODY: usize = 4 * 1024 * 1024;

fn with_server(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(SERVER, HeaderValue::from_static(SERVER_HEADER));
    r
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        serde_json::json!({"error": {"code": status.as_u16(), "message": message}}).to_string(),
    )
}

fn ok<T: Serialize>(v: &T) -> Response<Body> {
    match serde_json::to_string(v) {
        Ok(s) => json(StatusCode::OK, s),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, ""),
    }
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// `(page, limit)` from the query, or the 400 message.
fn page_of(query: Option<&str>, limit: u16) -> Result<u16, String> {
    let tokens: Vec<String> = query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| *k == "nextPageToken")
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    match tokens.len() {
        0 => Ok(1),
        1 => {
            let t = &tokens[0];
            let raw = base64::engine::general_purpose::URL_SAFE
                .decode(t)
                .map_err(|e| match e {
                    base64::DecodeError::InvalidByte(i, _) => {
                        format!("illegal base64 data at input byte {i}")
                    }
                    base64::DecodeError::InvalidLength(i)
                    | base64::DecodeError::InvalidLastSymbol(i, _) => {
                        format!("illegal base64 data at input byte {i}")
                    }
                    base64::DecodeError::InvalidPadding => {
                        format!("illegal base64 data at input byte {}", t.len())
                    }
                })?;
            if raw.is_empty() {
                return Err("EOF".into());
            }
            if raw.len() < 4 {
                return Err("unexpected EOF".into());
            }
            let tl = u16::from_le_bytes([raw[0], raw[1]]);
            let page = u16::from_le_bytes([raw[2], raw[3]]);
            if tl != limit {
                return Err(format!("token limit must be {limit}"));
            }
            if page == 0 {
                return Err("token page must be greater than zero".into());
            }
            Ok(page)
        }
        _ => Err("too many values for page token".into()),
    }
}

fn token(limit: u16, page: u16) -> String {
    let mut b = Vec::with_capacity(4);
    b.extend_from_slice(&limit.to_le_bytes());
    b.extend_from_slice(&page.to_le_bytes());
    base64::engine::general_purpose::URL_SAFE.encode(b)
}

/// Slices a page; the token is sent whenever `page*limit <= total` (the exact-fill quirk).
fn paginate<T: Clone>(items: &[T], page: u16, limit: u16) -> (Vec<T>, String) {
    let (p, l) = (page as usize, limit as usize);
    let start = (p - 1) * l;
    if start >= items.len() {
        return (Vec::new(), String::new());
    }
    let end = (start + l).min(items.len());
    let next = if p * l <= items.len() {
        token(limit, page + 1)
    } else {
        String::new()
    };
    (items[start..end].to_vec(), next)
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
}

/// Serves the simulator on a unix socket until `shutdown` is cancelled.
pub async fn serve(listener: UnixListener, sim: Arc<Mutex<Sim>>, shutdown: CancellationToken) {
    accept_loop(
        || async { listener.accept().await.map(|(s, _)| s) },
        sim,
        shutdown,
    )
    .await
}

/// Serves the simulator on TCP (fleetd's optional `ListenStream`) until `shutdown`.
pub async fn serve_tcp(listener: TcpListener, sim: Arc<Mutex<Sim>>, shutdown: CancellationToken) {
    accept_loop(
        || async { listener.accept().await.map(|(s, _)| s) },
        sim,
        shutdown,
    )
    .await
}

async fn accept_loop<A, F, S>(accept: A, sim: Arc<Mutex<Sim>>, shutdown: CancellationToken)
where
    A: Fn() -> F,
    F: std::future::Future<Output = std::io::Result<S>>,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    loop {
        tokio::select! {
            accepted = accept() => {
                if let Ok(stream) = accepted {
                    spawn_conn(stream, sim.clone());
                }
            }
            _ = shutdown.cancelled() => break,
        }
    }
}

fn spawn_conn<S>(stream: S, sim: Arc<Mutex<Sim>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let for_writes = sim.clone();
    let svc = hyper::service::service_fn(move |req| {
        let sim = sim.clone();
        async move {
            let (parts, body) = with_server(handle(&sim, req).await).into_parts();
            let pattern = lock(&sim).write_pattern;
            let body = super::wire::body_for(pattern, body).await;
            Ok::<_, std::convert::Infallible>(Response::from_parts(parts, body))
        }
    });
    tokio::spawn(async move {
        let io = super::wire::Paced::new(stream, move || lock(&for_writes).write_pattern);
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
            .await;
    });
}

fn lock(sim: &Mutex<Sim>) -> std::sync::MutexGuard<'_, Sim> {
    match sim.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn handle(sim: &Mutex<Sim>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/" {
        return error(StatusCode::METHOD_NOT_ALLOWED, "");
    }
    let failing = lock(sim).failing;
    if let Some(code) = failing {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, "simulated fleetd failure");
    }
    if path == "/metrics" {
        return metrics(sim);
    }
    // Go's ServeMux answers a path that is not clean (`//`, `/./`, `/../`) with a redirect
    // to the clean one.
    let clean = clean_path(&path);
    if clean != path {
        let location = match req.uri().query() {
            Some(q) => format!("{clean}?{q}"),
            None => clean,
        };
        return redirect(&location, req.method());
    }
    let rest = match path
        .strip_prefix("/fleet/v1")
        .or_else(|| path.strip_prefix("/v1-alpha"))
    {
        Some(r) => r.to_string(),
        None => return error(StatusCode::NOT_FOUND, ""),
    };
    let segs: Vec<&str> = if rest.is_empty() {
        vec![]
    } else if let Some(r) = rest.strip_prefix('/') {
        r.split('/').collect()
    } else {
        return error(StatusCode::NOT_FOUND, "");
    };
    let query = req.uri().query().map(str::to_string);
    let q = query.as_deref();
    let get_only = || {
        error(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET supported against this resource",
        )
    };
    let is_get = req.method() == Method::GET;
    match segs.as_slice() {
        [] => error(StatusCode::METHOD_NOT_ALLOWED, ""),
        ["discovery"] if is_get => json(StatusCode::OK, DISCOVERY.to_string()),
        ["discovery"] => error(
            StatusCode::BAD_REQUEST,
            "only HTTP GET supported against this resource",
        ),
        ["machines"] => machines(sim, q, req).await,
        ["units"] if is_get => units(sim, q),
        ["units", raw] if !raw.is_empty() => {
            let name = decode(raw);
            // Go routes on the decoded path: `a%2Fb` is two segments, which no handler takes.
            if name.contains('/') {
                return error(StatusCode::NOT_FOUND, "");
            }
            unit(sim, &name, req).await
        }
        ["state"] if is_get => states(sim, q),
        ["state", raw] if !raw.is_empty() && is_get => state(sim, &decode(raw)),
        ["state", raw] if !raw.is_empty() => get_only(),
        ["units"] | ["state"] => get_only(),
        _ => error(StatusCode::NOT_FOUND, ""),
    }
}

/// Go's `path.Clean` as ServeMux applies it: one slash between segments, `.` and `..`
/// resolved, a trailing slash kept.
fn clean_path(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut clean = format!("/{}", out.join("/"));
    if p.ends_with('/') && clean != "/" {
        clean.push('/');
    }
    clean
}

/// A 301 as Go's `http.Redirect` writes it: an HTML body for GET only.
fn redirect(location: &str, method: &Method) -> Response<Body> {
    let body = if method == Method::GET {
        format!(
            "<a href=\"{}\">Moved Permanently</a>.\n\n",
            html_escape(location)
        )
    } else {
        String::new()
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(hyper::header::LOCATION, v);
    }
    if method == Method::GET || method == Method::HEAD {
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
    }
    with_server(r)
}

/// Go's `htmlEscape` (`html.EscapeString`'s five characters).
fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&#34;")
        .replace('\'', "&#39;")
}

/// A path segment, percent-decoded as Go's router does.
fn decode(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// `GET /metrics`: the registry's size, for tests that watch the simulator.
fn metrics(sim: &Mutex<Sim>) -> Response<Body> {
    let units = lock(sim).units().len();
    let mut r = Response::new(full(format!(
        "# HELP fleet_sim_units Units in the simulated registry.\n# TYPE fleet_sim_units gauge\nfleet_sim_units {units}\n"
    )));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// `/machines`: GET a page, PATCH metadata.
async fn machines(sim: &Mutex<Sim>, q: Option<&str>, req: Request<Incoming>) -> Response<Body> {
    let limit = lock(sim).token_limit;
    match *req.method() {
        Method::GET => match page_of(q, limit) {
            Ok(p) => {
                let all = lock(sim).machines().to_vec();
                let (machines, next_page_token) = paginate(&all, p, limit);
                ok(&MachinePage {
                    machines,
                    next_page_token,
                })
            }
            Err(m) => error(StatusCode::BAD_REQUEST, &m),
        },
        Method::PATCH => patch_machines(sim, req).await,
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and PATCH supported against this resource",
        ),
    }
}

/// `GET /units`: a page of units.
fn units(sim: &Mutex<Sim>, q: Option<&str>) -> Response<Body> {
    let limit = lock(sim).token_limit;
    match page_of(q, limit) {
        Ok(p) => {
            let all = lock(sim).units();
            let (units, next_page_token) = paginate(&all, p, limit);
            ok(&UnitPage {
                next_page_token,
                units,
            })
        }
        Err(m) => error(StatusCode::BAD_REQUEST, &m),
    }
}

/// `/units/NAME`: GET, PUT, DELETE.
async fn unit(sim: &Mutex<Sim>, name: &str, req: Request<Incoming>) -> Response<Body> {
    match *req.method() {
        Method::GET => match lock(sim).unit(name) {
            Some(u) => ok(&u),
            None => error(StatusCode::NOT_FOUND, "unit does not exist"),
        },
        Method::DELETE => {
            if lock(sim).delete_through_api(name) {
                empty(StatusCode::NO_CONTENT)
            } else {
                error(StatusCode::NOT_FOUND, "unit does not exist")
            }
        }
        Method::PUT => put_unit(sim, name, req).await,
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET, PUT and DELETE supported against this resource",
        ),
    }
}

/// `GET /state[?machineID=…&unitName=…]`: a page of unit states.
fn states(sim: &Mutex<Sim>, q: Option<&str>) -> Response<Body> {
    let limit = lock(sim).token_limit;
    match page_of(q, limit) {
        Ok(p) => {
            let machine = query_param(q, "machineID");
            let unit = query_param(q, "unitName");
            let all: Vec<_> = lock(sim)
                .states()
                .into_iter()
                .filter(|s| machine.as_ref().is_none_or(|m| &s.machine_id == m))
                .filter(|s| unit.as_ref().is_none_or(|u| &s.name == u))
                .collect();
            let (states, next_page_token) = paginate(&all, p, limit);
            ok(&UnitStatePage {
                next_page_token,
                states,
            })
        }
        Err(m) => error(StatusCode::BAD_REQUEST, &m),
    }
}

/// `GET /state/NAME`: the first state of the unit.
fn state(sim: &Mutex<Sim>, name: &str) -> Response<Body> {
    let first = lock(sim).states().into_iter().find(|s| s.name == name);
    match first {
        Some(s) => ok(&s),
        // fleetd's handler panics here and the connection drops without a response; the
        // simulator answers instead of reproducing a crash.
        None => error(StatusCode::NOT_FOUND, "unit state does not exist"),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("unable to decode body: {e}"),
        )),
    }
}

async fn put_unit(sim: &Mutex<Sim>, url_name: &str, req: Request<Incoming>) -> Response<Body> {
    // Go's server reads what the handler left of the body before answering, so a client
    // still sending it is not cut off by an early 415: read it first here.
    let headers = req.headers().clone();
    let body = read_body(req).await;
    let cts: Vec<&HeaderValue> = headers.get_all(CONTENT_TYPE).iter().collect();
    if cts.len() != 1 {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("expected 1 Content-Type, got {}", cts.len()),
        );
    }
    let media = cts[0]
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if media != "application/json" {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only acceptable Content-Type is application/json",
        );
    }
    let body = match body {
        Ok(b) => b,
        Err(r) => return r,
    };
    // Go's Decoder reads the first value only; what follows it is never looked at.
    let mut unit: Unit = match super::go_json::decode(&body, &super::go_json::UNIT) {
        Ok(u) => u,
        Err(why) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("unable to decode body: {why}"),
            );
        }
    };
    if unit.name.is_empty() {
        unit.name = url_name.to_string();
    } else if unit.name != url_name {
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "name in URL {url_name:?} differs from unit name in request body {:?}",
                unit.name
            ),
        );
    }
    if let Err(m) = validate_name(&unit.name) {
        return error(StatusCode::BAD_REQUEST, &m);
    }
    let mut s = lock(sim);
    let existing_hash = s.unit_hash(&unit.name);
    match existing_hash {
        None => {
            if unit.options.is_empty() {
                return error(
                    StatusCode::CONFLICT,
                    "unit does not exist and options field empty",
                );
            }
            if let Err(m) = validate_options(&unit.options) {
                return error(StatusCode::BAD_REQUEST, &m);
            }
            let desired = if unit.desired_state.is_empty() {
                "inactive".to_string()
            } else {
                unit.desired_state
            };
            if !matches!(desired.as_str(), "inactive" | "loaded" | "launched") {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "");
            }
            let before = s.before_change(&unit.name);
            s.put(&unit.name, unit.options, desired);
            s.changed(&unit.name, before);
            empty(StatusCode::CREATED)
        }
        Some(h) if !unit.options.is_empty() && hash(&unit.options) != h => {
            let desired = if unit.desired_state.is_empty() {
                "inactive".to_string()
            } else {
                unit.desired_state
            };
            let before = s.before_change(&unit.name);
            s.put(&unit.name, unit.options, desired);
            s.changed(&unit.name, before);
            empty(StatusCode::CREATED)
        }
        Some(_) => {
            if unit.desired_state.is_empty() {
                return error(
                    StatusCode::CONFLICT,
                    "must provide DesiredState to update existing unit",
                );
            }
            if is_template(&unit.name) && unit.desired_state != "inactive" {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot activate template {:?}", unit.name),
                );
            }
            let before = s.before_change(&unit.name);
            s.set_desired(&unit.name, &unit.desired_state);
            s.changed(&unit.name, before);
            empty(StatusCode::NO_CONTENT)
        }
    }
}

async fn patch_machines(sim: &Mutex<Sim>, req: Request<Incoming>) -> Response<Body> {
    // What `go_json::METADATA_OPS` leaves: the keys of fleet's Go struct, absent when empty.
    #[derive(serde::Deserialize)]
    struct Value {
        #[serde(default)]
        value: String,
    }
    #[derive(serde::Deserialize)]
    struct Op {
        #[serde(default)]
        op: String,
        #[serde(default)]
        path: String,
        #[serde(rename = "Value")]
        value: Option<Value>,
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ops: Vec<Op> = match super::go_json::decode(&body, &super::go_json::METADATA_OPS) {
        Ok(o) => o,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    for op in &ops {
        if !matches!(op.op.as_str(), "add" | "remove" | "replace") {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid op: expect add, remove, or replace",
            );
        }
        let parts: Vec<&str> = op.path.split('/').collect();
        let key_ok = |k: &str| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        };
        if parts.len() != 4
            || !parts[0].is_empty()
            || parts[1].is_empty()
            || parts[2] != "metadata"
            || !key_ok(parts[3])
        {
            return error(StatusCode::BAD_REQUEST, "machine metadata path invalid");
        }
        if op.op != "remove" && op.value.as_ref().is_none_or(|v| v.value.is_empty()) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid value: add and replace require a value",
            );
        }
    }
    // All validated; applied in order.
    let mut s = lock(sim);
    for op in &ops {
        let parts: Vec<&str> = op.path.split('/').collect();
        let [_, id, _, key] = parts.as_slice() else {
            continue;
        };
        let value = match op.op.as_str() {
            "remove" => None,
            _ => op.value.as_ref().map(|v| v.value.as_str()),
        };
        s.set_machine_metadata(id, key, value);
    }
    drop(s);
    let mut r = empty(StatusCode::NO_CONTENT);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

const DISCOVERY: &str = r#"{
  "kind": "discovery#restDescription",
  "discoveryVersion": "v1",
  "id": "fleet:v1",
  "name": "schema",
  "version": "v1",
  "title": "fleet API",
  "description": "",
  "protocol": "rest",
  "basePath": "/fleet/v1/",
  "servicePath": "fleet/v1/"
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_fleet() {
        assert_eq!(token(100, 2), "ZAACAA==");
        assert_eq!(token(2, 2), "AgACAA==");
        assert_eq!(page_of(Some("nextPageToken=AgACAA%3D%3D"), 2), Ok(2));
        assert_eq!(
            page_of(Some("nextPageToken=AgACAA%3D%3D"), 100),
            Err("token limit must be 100".into())
        );
        assert_eq!(
            page_of(Some("nextPageToken=AgAAAA%3D%3D"), 2),
            Err("token page must be greater than zero".into())
        );
        assert_eq!(
            page_of(Some("nextPageToken=a&nextPageToken=b"), 2),
            Err("too many values for page token".into())
        );
        assert_eq!(page_of(Some("nextPageToken="), 2), Err("EOF".into()));
        assert_eq!(
            page_of(Some("nextPageToken=AgA%3D"), 2),
            Err("unexpected EOF".into())
        );
        assert!(page_of(Some("nextPageToken=!!!!"), 2)
            .unwrap_err()
            .starts_with("illegal base64 data at input byte 0"));
    }

    #[test]
    fn exactly_full_last_page_still_gets_a_token() {
        let items = vec![1, 2, 3, 4];
        assert_eq!(paginate(&items, 2, 2), (vec![3, 4], token(2, 3)));
        assert_eq!(paginate(&items, 3, 2), (vec![], String::new()));
        assert_eq!(paginate(&items[..3], 2, 2), (vec![3], String::new()));
    }
}
