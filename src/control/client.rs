//! A small client for the control socket, for the CLIs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::local::LocalError;
use crate::protocol::{ClusterInfo, ClusterList};

/// Why the daemon could not be asked, or what it answered instead.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control socket or its directory is not safe to talk to (another owner, open
    /// permissions): nothing was sent.
    #[error(transparent)]
    Unsafe(LocalError),
    /// No daemon answered there.
    #[error("cannot reach the fleet-broker daemon at {}: {reason}; start it with `fleet-broker serve`", socket.display())]
    Unreachable {
        /// The control socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// The daemon answered with an error.
    #[error("fleet-broker answered {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The daemon's message.
        message: String,
    },
    /// The daemon's answer is not what was asked for.
    #[error("unexpected answer from fleet-broker: {0}")]
    Unexpected(serde_json::Error),
}

/// How long a control request may take.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to the control socket after the checks of [`crate::local::connect`]; the error
/// says what to do next.
pub(crate) async fn connect(control: &Path) -> Result<tokio::net::UnixStream, ControlError> {
    match crate::local::connect(control).await {
        Ok(s) => Ok(s),
        Err(e @ LocalError::Unsafe { .. }) => Err(ControlError::Unsafe(e)),
        Err(LocalError::Io { source, .. }) => Err(unreachable(control, source.to_string())),
        Err(e) => Err(unreachable(control, e.to_string())),
    }
}

fn unreachable(control: &Path, reason: String) -> ControlError {
    ControlError::Unreachable {
        socket: control.to_path_buf(),
        reason,
    }
}

/// `METHOD path` on the control socket; returns status and body.
pub async fn request(
    control: &Path,
    method: &str,
    path: &str,
) -> Result<(u16, Bytes), ControlError> {
    request_with_body(control, method, path, Vec::new()).await
}

/// `METHOD path` with a JSON `body` on the control socket; returns status and body.
pub(crate) async fn request_with_body(
    control: &Path,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Bytes), ControlError> {
    let unreachable = |reason: String| unreachable(control, reason);
    let stream = connect(control).await?;
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "fleet-broker")
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(CONTROL_TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {CONTROL_TIMEOUT:?}")))?
}

/// The message of a `{"error":{…}}` body, or the body itself.
pub fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// One configured cluster, from the daemon; `Refused` with 404 when it does not know it.
pub(crate) async fn cluster_info(control: &Path, name: &str) -> Result<ClusterInfo, ControlError> {
    let (status, body) = request(control, "GET", &format!("/v1/clusters/{name}")).await?;
    if status != 200 {
        return Err(ControlError::Refused {
            status,
            message: error_text(&body),
        });
    }
    serde_json::from_slice(&body).map_err(ControlError::Unexpected)
}

/// Every configured cluster, from the daemon.
pub(crate) async fn list_clusters(control: &Path) -> Result<ClusterList, ControlError> {
    let (status, body) = request(control, "GET", "/v1/clusters").await?;
    if status != 200 {
        return Err(ControlError::Refused {
            status,
            message: error_text(&body),
        });
    }
    serde_json::from_slice(&body).map_err(ControlError::Unexpected)
}

/// Asks the daemon behind `control` for its clusters, which starts a socket-activated daemon
/// (the service manager holds the control socket; the daemon answers once every cluster
/// socket is bound). True when it answered within 10 s; false at once when there is no
/// control socket.
pub(crate) async fn wake(control: &Path) -> bool {
    if std::fs::symlink_metadata(control).is_err() {
        return false;
    }
    tokio::time::timeout(std::time::Duration::from_secs(10), list_clusters(control))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// The control socket of the default runtime dir.
pub fn default_control_socket() -> PathBuf {
    crate::local::control_socket(&crate::local::default_runtime_dir())
}
