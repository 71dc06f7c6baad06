//! A small client for the control socket, for the CLIs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::protocol::ClusterList;

/// How long a control request may take.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to the control socket after the checks of [`crate::local::connect`]; the error
/// says what to do next.
pub(crate) async fn connect(control: &Path) -> Result<tokio::net::UnixStream, String> {
    match crate::local::connect(control).await {
        Ok(s) => Ok(s),
        Err(e @ crate::local::LocalError::Unsafe { .. }) => Err(e.to_string()),
        Err(e) => Err(format!(
            "cannot reach the fleet-broker daemon: {e}; start it with `fleet-broker serve`"
        )),
    }
}

/// `METHOD path` on the control socket; returns status and body.
pub async fn request(control: &Path, method: &str, path: &str) -> Result<(u16, Bytes), String> {
    let unreachable = |e: String| {
        format!(
            "cannot reach the fleet-broker daemon at {}: {e}; start it with `fleet-broker serve`",
            control.display()
        )
    };
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
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
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

/// Every configured cluster, from the daemon.
pub(crate) async fn list_clusters(control: &Path) -> Result<ClusterList, String> {
    let (status, body) = request(control, "GET", "/v1/clusters").await?;
    if status != 200 {
        return Err(format!(
            "fleet-broker answered {status}: {}",
            error_text(&body)
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("unexpected answer from fleet-broker: {e}"))
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
