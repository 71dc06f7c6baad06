//! The control socket (`control.sock`, HTTP/1.1 + JSON): cluster health and counters, and
//! operator commands. Routes:
//! `GET /metrics` (Prometheus text), `GET /v1/clusters`, `GET /v1/clusters/NAME`, `POST /v1/reload`, `POST /v1/clusters/NAME/connect`,
//! `POST /v1/clusters/NAME/disconnect`, `POST /v1/clusters/NAME/exec` (upgraded to the frame
//! stream of [`frame`]), `GET /v1/clusters/NAME/host-key?machine=ID` (what a machine presents).

pub mod client;

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tracing::Instrument;

use crate::http::{fleet_error, json_response, Body};
use crate::protocol::frame;
use crate::protocol::{ClusterInfo, ClusterList};
use crate::tunnel::{Command, State, Status};

/// How long `disconnect` waits for the tunnel to be closed before it answers.
const DISCONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the control socket serves.
pub(crate) struct Control {
    pub(crate) registry: Arc<crate::registry::Registry>,
    /// Asks the daemon's owner to reload the config.
    pub(crate) reload_tx: tokio::sync::mpsc::Sender<crate::registry::ReloadRequest>,
    /// Where exec sessions are recorded.
    pub(crate) audit: Arc<crate::audit::AuditLog>,
    /// How late the daemon's thread runs.
    pub(crate) lag: Arc<crate::lag::Lag>,
}

fn exec_error(e: &crate::protocol::exec::ExecError) -> Response<Body> {
    let status = StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = serde_json::json!({
        "error": {"code": status.as_u16(), "message": e.message},
        "kind": e.kind,
    });
    json_response(status, body.to_string())
}

/// Who sent `req` (the peer the control socket admitted), for the audit trail.
fn caller_of(req: &Request<Incoming>) -> Option<crate::audit::Caller> {
    req.extensions()
        .get::<crate::audit::Peer>()
        .copied()
        .map(crate::audit::Caller::of)
}

/// `POST /v1/clusters/NAME/guard-refused`: our fleetctl did not change a guarded cluster
/// (not confirmed); the refusal goes into the audit trail with who asked.
async fn guard_refused(
    audit: &Arc<crate::audit::AuditLog>,
    cluster: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    use http_body_util::BodyExt;
    let caller = caller_of(&req);
    let body = match http_body_util::Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return fleet_error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
    };
    let refusal: crate::protocol::GuardRefusal = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return fleet_error(StatusCode::BAD_REQUEST, &format!("not a refusal: {e}")),
    };
    audit
        .record_as(
            caller.as_ref(),
            serde_json::json!({
                "kind": "guard",
                "phase": "refused",
                "cluster": cluster,
                "command": refusal.command,
                "units": refusal.units,
                "error": refusal.reason,
            }),
        )
        .await;
    json_response(StatusCode::OK, "{}".into())
}

/// `POST /v1/clusters/NAME/exec`: starts the session, then upgrades to the frame stream.
async fn exec(
    exec: Arc<crate::exec::Exec>,
    audit: Arc<crate::audit::AuditLog>,
    cluster: String,
    req: Request<Incoming>,
) -> Response<Body> {
    use http_body_util::BodyExt;
    let caller = caller_of(&req);
    let wants_upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(frame::UPGRADE));
    if !wants_upgrade {
        return exec_error(&crate::protocol::exec::ExecError::request(format!(
            "exec needs `Connection: upgrade` and `Upgrade: {}`",
            frame::UPGRADE
        )));
    }
    let (mut parts, body) = req.into_parts();
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return exec_error(&crate::protocol::exec::ExecError::request(
            "connection cannot be upgraded",
        ));
    };
    let body = match http_body_util::Limited::new(body, 64 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return exec_error(&crate::protocol::exec::ExecError::request(format!(
                "reading exec request: {e}"
            )))
        }
    };
    let request = match crate::protocol::exec::parse_request(&body) {
        Ok(r) => r,
        Err(e) => return exec_error(&e),
    };
    // Every session asked for is recorded, started or not, and again when it ends (so one
    // that never ends is on record too); never its output.
    let started = std::time::Instant::now();
    let id = crate::audit::session_id();
    let what = serde_json::json!({
        "kind": "exec",
        "session": id,
        "cluster": cluster,
        "target": request.target,
        "command": request
            .action
            .as_ref()
            .map(|a| a.command_line())
            .or_else(|| request.command.clone()),
        "pty": request.pty.is_some(),
    });
    let record = move |fields: serde_json::Value| crate::audit::session_line(&what, fields);
    let session = match exec.start(&request).await {
        Ok(s) => {
            audit
                .record_as(
                    caller.as_ref(),
                    record(serde_json::json!({"phase": "start", "status": 101})),
                )
                .await;
            s
        }
        Err(e) => {
            audit
                .record_as(
                    caller.as_ref(),
                    record(serde_json::json!({
                        "phase": "refused",
                        "status": e.kind.http_status(),
                        "error": e.message,
                        "duration_ms": started.elapsed().as_millis() as u64,
                    })),
                )
                .await;
            return exec_error(&e);
        }
    };
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let ended = match on_upgrade.await {
            Ok(upgraded) => session.run(hyper_util::rt::TokioIo::new(upgraded)).await,
            Err(e) => {
                tracing::warn!(error = %e, "exec upgrade failed; ending the session");
                crate::exec::Ended {
                    outcome: crate::exec::Outcome::Ended(format!("upgrade failed: {e}")),
                    bytes_in: 0,
                    bytes_out: 0,
                }
            }
        };
        let mut end = serde_json::json!({
            "phase": "end",
            "status": 101,
            "duration_ms": started.elapsed().as_millis() as u64,
            "bytes_in": ended.bytes_in,
            "bytes_out": ended.bytes_out,
        });
        let (key, value) = match ended.outcome {
            crate::exec::Outcome::Exit(code) => ("exit", serde_json::json!(code)),
            crate::exec::Outcome::Signal(s) => ("signal", serde_json::json!(s)),
            crate::exec::Outcome::Ended(why) => ("error", serde_json::json!(why)),
        };
        end[key] = value;
        audit.record_as(caller.as_ref(), record(end)).await;
    }));
    let mut resp = Response::new(crate::http::full(bytes::Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    resp.headers_mut().insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static(frame::UPGRADE),
    );
    resp
}

/// What the control socket reports of one cluster.
pub(crate) fn info(rt: &crate::registry::ClusterRuntime) -> ClusterInfo {
    let (t, socket) = (&rt.tunnel, &rt.socket);
    ClusterInfo {
        name: t.config.name.clone(),
        tunnel: t.config.tunnel.to_string(),
        user: t.config.user.clone(),
        endpoint: t.config.endpoint.to_string(),
        socket: socket.to_path_buf(),
        connect_timeout_secs: t.config.connect_timeout.as_secs_f64(),
        status: t.status(),
        front_door: rt.front_door.as_ref().map(|d| d.info()),
        guard: t.config.guard,
    }
}

fn to_json<T: Serialize>(v: &T) -> Response<Body> {
    match serde_json::to_string(v) {
        Ok(s) => json_response(StatusCode::OK, s),
        Err(e) => fleet_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

impl Control {
    /// Prometheus text exposition of every cluster's counters.
    fn metrics(&self) -> Response<Body> {
        use std::fmt::Write;
        // One snapshot per cluster: a status sorts its latency samples.
        let clusters: Vec<(String, Status)> = self
            .registry
            .all()
            .iter()
            .map(|c| (c.tunnel.name().to_string(), c.tunnel.status()))
            .collect();
        let mut out = String::new();
        let mut family =
            |name: &str, kind: &str, help: &str, value: &dyn Fn(&Status) -> Option<f64>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (cluster, status) in &clusters {
                    if let Some(v) = value(status) {
                        let _ = writeln!(out, "{name}{{cluster=\"{cluster}\"}} {v}");
                    }
                }
            };
        family(
            "fleet_broker_tunnel_up",
            "gauge",
            "1 when the cluster's tunnel is ready.",
            &|s| {
                Some(if s.state == crate::tunnel::State::Ready {
                    1.0
                } else {
                    0.0
                })
            },
        );
        family(
            "fleet_broker_tunnel_failed",
            "gauge",
            "1 when the tunnel waits for an operator.",
            &|s| {
                Some(if s.state == crate::tunnel::State::Failed {
                    1.0
                } else {
                    0.0
                })
            },
        );
        family(
            "fleet_broker_interactive_session",
            "gauge",
            "1 when the tunnel connection carries an interactive (pty) session, so sshd sends without Nagle delays.",
            &|s| Some(if s.interactive_session { 1.0 } else { 0.0 }),
        );
        family(
            "fleet_broker_reconnects_total",
            "counter",
            "Tunnel connections lost and re-established.",
            &|s| Some(s.reconnects as f64),
        );
        family(
            "fleet_broker_connect_attempts_total",
            "counter",
            "Tunnel connection attempts, successful or not.",
            &|s| Some(s.connect_attempts as f64),
        );
        family(
            "fleet_broker_requests_total",
            "counter",
            "Requests forwarded to the fleet API.",
            &|s| Some(s.requests as f64),
        );
        family(
            "fleet_broker_response_bytes_total",
            "counter",
            "Response bytes from the fleet API.",
            &|s| Some(s.bytes_in as f64),
        );
        family(
            "fleet_broker_request_bytes_total",
            "counter",
            "Request body bytes to the fleet API.",
            &|s| Some(s.bytes_out as f64),
        );
        family(
            "fleet_broker_latency_p50_seconds",
            "gauge",
            "Median time to response headers, recent requests.",
            &|s| s.latency_p50_ms.map(|v| v / 1000.0),
        );
        family(
            "fleet_broker_latency_p99_seconds",
            "gauge",
            "99th percentile time to response headers, recent requests.",
            &|s| s.latency_p99_ms.map(|v| v / 1000.0),
        );
        let _ = writeln!(
            out,
            "# HELP fleet_broker_buffered_bytes Bytes held for local readers that are behind, all clusters (limit {}).\n# TYPE fleet_broker_buffered_bytes gauge\nfleet_broker_buffered_bytes {}",
            crate::tunnel::channel::MAX_BUFFERED_TOTAL,
            crate::tunnel::channel::buffered_total()
        );
        let _ = writeln!(
            out,
            "# HELP fleet_broker_channels Tunnel channels whose byte stream is in use (upstream connections of the fleet API among them), all clusters.\n# TYPE fleet_broker_channels gauge\nfleet_broker_channels {}",
            crate::tunnel::channel::live_channels()
        );
        let lag = self.lag.snapshot();
        let tick = crate::lag::TICK.as_millis();
        let _ = writeln!(
            out,
            "# HELP fleet_broker_runtime_lag_max_seconds The longest a {tick} ms tick of the daemon's thread fired late.\n# TYPE fleet_broker_runtime_lag_max_seconds gauge\nfleet_broker_runtime_lag_max_seconds {}",
            lag.max_seconds
        );
        let _ = writeln!(
            out,
            "# HELP fleet_broker_runtime_blocked_max_seconds The longest a {tick} ms tick of the daemon's thread fired late, less the time the thread waited for a CPU meanwhile: what the daemon's own work or a blocking call held up.\n# TYPE fleet_broker_runtime_blocked_max_seconds gauge\nfleet_broker_runtime_blocked_max_seconds {}",
            self.lag.blocked_max_ms() / 1000.0
        );
        let _ = writeln!(
            out,
            "# HELP fleet_broker_runtime_lag_seconds How late {tick} ms ticks of the daemon's thread fired: whatever blocked it held up every cluster.\n# TYPE fleet_broker_runtime_lag_seconds histogram"
        );
        let bounds = crate::lag::BUCKETS
            .iter()
            .map(|b| b.to_string())
            .chain(std::iter::once("+Inf".to_string()));
        for (bound, count) in bounds.zip(&lag.cumulative) {
            let _ = writeln!(
                out,
                "fleet_broker_runtime_lag_seconds_bucket{{le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "fleet_broker_runtime_lag_seconds_sum {}\nfleet_broker_runtime_lag_seconds_count {}",
            lag.sum_seconds, lag.count
        );
        let mut r = Response::new(crate::http::full(out));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    }

    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (req.method(), segs.as_slice()) {
            (&Method::GET, ["v1", "clusters"]) => to_json(&ClusterList {
                clusters: self.registry.all().iter().map(|c| info(c)).collect(),
                runtime_lag_max_ms: Some(self.lag.max_ms()),
                runtime_blocked_max_ms: Some(self.lag.blocked_max_ms()),
            }),
            (&Method::GET, ["metrics"]) => self.metrics(),
            (&Method::POST, ["v1", "reload"]) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if self.reload_tx.send(tx).await.is_err() {
                    return fleet_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "this daemon cannot reload",
                    );
                }
                match rx.await {
                    Ok(Ok(done)) => to_json(&serde_json::json!({ "reloaded": done.to_string() })),
                    Ok(Err(e)) => fleet_error(StatusCode::BAD_REQUEST, &e.to_string()),
                    Err(_) => fleet_error(StatusCode::SERVICE_UNAVAILABLE, "reload was dropped"),
                }
            }
            (m, ["v1", "clusters", name, rest @ ..]) => {
                let Some(rt) = self.registry.get(name) else {
                    return fleet_error(
                        StatusCode::NOT_FOUND,
                        &format!(
                            "no cluster named {name:?}; configured: {}",
                            self.registry.names().join(", ")
                        ),
                    );
                };
                let t = &rt.tunnel;
                let span = tracing::info_span!("cluster", cluster = %t.name());
                match (m, rest) {
                    (&Method::GET, []) => to_json(&info(&rt)),
                    (&Method::POST, ["connect"]) => {
                        t.command(Command::Connect).await;
                        let _ = t.link().await;
                        to_json(&info(&rt))
                    }
                    (&Method::POST, ["exec"]) => {
                        exec(
                            rt.exec.clone(),
                            self.audit.clone(),
                            t.name().to_string(),
                            req,
                        )
                        .instrument(span)
                        .await
                    }
                    (&Method::GET, ["host-key"]) => {
                        let query = req.uri().query().unwrap_or("");
                        let param = |k: &str| {
                            query
                                .split('&')
                                .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                        };
                        let Some(machine) = param("machine").filter(|m| !m.is_empty()) else {
                            return fleet_error(
                                StatusCode::BAD_REQUEST,
                                "host-key needs ?machine=ID",
                            );
                        };
                        let port = param("ssh_port").and_then(|p| p.parse().ok());
                        match rt.exec.machine_key(machine, port).instrument(span).await {
                            Ok(r) => to_json(&r),
                            Err(e) => exec_error(&e),
                        }
                    }
                    (&Method::POST, ["guard-refused"]) => {
                        guard_refused(&self.audit, t.name(), req).await
                    }
                    (&Method::POST, ["disconnect"]) => {
                        t.command(Command::Disconnect).await;
                        t.wait_for_state(State::Idle, DISCONNECT_WAIT).await;
                        to_json(&info(&rt))
                    }
                    _ => fleet_error(StatusCode::NOT_FOUND, &format!("no route {m} {path}")),
                }
            }
            (m, _) => fleet_error(StatusCode::NOT_FOUND, &format!("no route {m} {path}")),
        }
    }
}
