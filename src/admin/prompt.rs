//! `fleet-broker prompt`: the cluster this shell's fleetctl talks to (`FLEETCTL_CLUSTER`, or
//! the cluster socket `FLEETCTL_ENDPOINT` names, as `fleet-broker env` sets them) and its
//! state, for a shell prompt. It asks the control socket once, bounded, and never the
//! tunnel; with no cluster chosen it prints nothing.

use std::path::PathBuf;
use std::time::Duration;

/// How long the daemon is waited for: a prompt must not hang on a stuck daemon.
const ASK_LIMIT: Duration = Duration::from_millis(200);

/// The format when none is given.
pub(super) const DEFAULT_FORMAT: &str = "{cluster}{guard}:{state}";

/// What `{guard}` becomes for a cluster with `guard = true`.
const GUARD_MARK: &str = "!";

/// The shell's cluster and the control socket that serves it, from the environment; `None`
/// when fleetctl would not talk to a broker's cluster.
fn current() -> Option<(String, PathBuf)> {
    let named = std::env::var("FLEETCTL_CLUSTER")
        .ok()
        .filter(|n| !n.is_empty());
    let endpoint = std::env::var("FLEETCTL_ENDPOINT")
        .ok()
        .and_then(|e| crate::cli::target::parse_endpoint(&e).ok())
        .map(|(socket, _)| socket);
    // A broker's cluster socket names its cluster and its daemon: …/clusters/NAME.sock.
    let by_socket = endpoint
        .as_deref()
        .and_then(crate::cli::target::broker_cluster_of);
    let chosen = match (named, by_socket) {
        (Some(n), Some((m, control))) if n == m => Some((n, control)),
        // An endpoint that is not this cluster's socket wins, as it does for fleetctl.
        (Some(_), Some(s)) | (None, Some(s)) => Some(s),
        (Some(n), None) if endpoint.is_none() => {
            Some((n, crate::control::client::default_control_socket()))
        }
        _ => None,
    };
    chosen.filter(|(n, _)| crate::config::valid_cluster_name(n))
}

/// The cluster's state as the daemon reports it (`?` when the daemon does not answer within
/// [`ASK_LIMIT`], or at all; `unknown` when it does not know the cluster), and whether it is
/// guarded.
async fn state(cluster: &str, control: &std::path::Path) -> (String, bool) {
    use crate::control::client::{cluster_info, ControlError};
    match tokio::time::timeout(ASK_LIMIT, cluster_info(control, cluster)).await {
        Ok(Ok(info)) => (info.status.state.to_string(), info.guard),
        Ok(Err(ControlError::Refused { status: 404, .. })) => ("unknown".to_string(), false),
        _ => ("?".to_string(), false),
    }
}

/// `format` with `{cluster}`, `{state}` and `{guard}` filled in; other text as it is.
fn render(format: &str, cluster: &str, state: &str, guard: bool) -> String {
    format
        .replace("{cluster}", cluster)
        .replace("{state}", state)
        .replace("{guard}", if guard { GUARD_MARK } else { "" })
}

/// `fleet-broker prompt [--format FMT]`.
pub(super) async fn prompt(format: &str) -> anyhow::Result<()> {
    let Some((cluster, control)) = current() else {
        return Ok(());
    };
    let (state, guard) = state(&cluster, &control).await;
    print!(
        "{}",
        crate::escape::display(&render(format, &cluster, &state, guard))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_filled_and_other_text_kept() {
        assert_eq!(
            super::render(super::DEFAULT_FORMAT, "prod", "ready", true),
            "prod!:ready"
        );
        assert_eq!(
            super::render(super::DEFAULT_FORMAT, "dev", "idle", false),
            "dev:idle"
        );
        assert_eq!(
            super::render("[{cluster} {x}]", "prod", "ready", true),
            "[prod {x}]"
        );
    }
}
