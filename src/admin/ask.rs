//! Operator commands that ask the running daemon over its control socket: `reload`,
//! `connect`, `disconnect`, and the word sent after a change (`import`, `remove`, a stored
//! passphrase) so a running daemon acts on it at once.

use crate::control::client::{default_control_socket, error_text, request};
use crate::protocol::{ClusterInfo, ClusterList};
use crate::tunnel::State;

/// One request to the running daemon's control socket.
pub(super) async fn control_request(
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, bytes::Bytes)> {
    request(&default_control_socket(), method, path)
        .await
        .map_err(anyhow::Error::msg)
}

/// `fleet-broker reload`.
pub(super) async fn reload() -> anyhow::Result<()> {
    let (status, body) = control_request("POST", "/v1/reload").await?;
    if status != 200 {
        anyhow::bail!("config not reloaded: {}", error_text(&body));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    println!("reloaded: {}", v["reloaded"].as_str().unwrap_or_default());
    Ok(())
}

/// `fleet-broker connect|disconnect CLUSTER`: the cluster's state after it, with its last
/// error; `connect` fails unless the tunnel is up, and its line says why not.
pub(super) async fn cluster(cluster: &str, what: &str) -> anyhow::Result<()> {
    if !crate::config::valid_cluster_name(cluster) {
        anyhow::bail!("{cluster:?} is not a valid cluster name")
    }
    let (status, body) = control_request("POST", &format!("/v1/clusters/{cluster}/{what}")).await?;
    if status != 200 {
        anyhow::bail!("{}", error_text(&body));
    }
    let info: ClusterInfo = serde_json::from_slice(&body)?;
    let line = format!(
        "{}: {}{}",
        info.name,
        info.status.state,
        info.status
            .last_error
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    if what == "connect" && info.status.state != State::Ready {
        anyhow::bail!("{line}");
    }
    println!("{line}");
    Ok(())
}

/// Asks a running daemon to retry its clusters now (a stored passphrase may be what they
/// lacked); quiet when none runs.
pub(super) async fn reconnect_failed() {
    let Ok((200, body)) = control_request("GET", "/v1/clusters").await else {
        return;
    };
    let Ok(list) = serde_json::from_slice::<ClusterList>(&body) else {
        return;
    };
    for c in list
        .clusters
        .iter()
        .filter(|c| c.status.state != State::Ready && c.status.state != State::Idle)
    {
        if control_request("POST", &format!("/v1/clusters/{}/connect", c.name))
            .await
            .is_ok()
        {
            println!("asked the running daemon to retry cluster {:?}", c.name);
        }
    }
}

/// Asks a running daemon to reconnect one cluster at once (a failed tunnel waits for a new
/// pin); says so when it did.
pub(super) async fn reconnect(cluster: &str) {
    if control_request("POST", &format!("/v1/clusters/{cluster}/connect"))
        .await
        .is_ok()
    {
        println!("asked the running daemon to reconnect {cluster}");
    }
}

/// Asks a running daemon to reload, and says what happened; whether it reloaded.
pub(super) async fn reload_after_change() -> bool {
    match control_request("POST", "/v1/reload").await {
        Ok((200, body)) => {
            println!(
                "the running daemon reloaded: {}",
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["reloaded"].as_str().map(str::to_string))
                    .unwrap_or_default()
            );
            true
        }
        Ok((_, body)) => {
            eprintln!(
                "warning: the running daemon did not reload: {}",
                error_text(&body)
            );
            false
        }
        Err(_) => {
            println!("no daemon is running; `fleet-broker serve` will use it");
            false
        }
    }
}
