//! The service manager's readiness protocol (`sd_notify`): datagrams to `$NOTIFY_SOCKET`
//! saying `READY=1` once every socket accepts, `RELOADING=1` / `READY=1` around a reload,
//! `STOPPING=1` on shutdown, and a one-line `STATUS=`. Nothing is sent when the variable is
//! unset; a failure to send is only logged (the daemon works the same without a manager).

use std::path::PathBuf;

use crate::protocol::{ClusterInfo, State};

/// Sends `state` (newline-separated `KEY=value` lines) to the service manager, if any.
pub fn notify(state: &str) {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET").filter(|a| !a.is_empty()) else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let raw = addr.as_encoded_bytes();
        if let Some(name) = raw.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let a = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &a)?;
        } else {
            sock.send_to(state.as_bytes(), PathBuf::from(&addr))?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// `N clusters: 2 ready, 1 idle`, for `STATUS=`.
pub fn summary(clusters: &[ClusterInfo]) -> String {
    let count = |s: State| clusters.iter().filter(|c| c.status.state == s).count();
    let mut parts = Vec::new();
    for (s, word) in [
        (State::Ready, "ready"),
        (State::Idle, "idle"),
        (State::Connecting, "connecting"),
        (State::Backoff, "retrying"),
        (State::Failed, "failed"),
    ] {
        let n = count(s);
        if n > 0 {
            parts.push(format!("{n} {word}"));
        }
    }
    format!(
        "{} cluster{}: {}",
        clusters.len(),
        if clusters.len() == 1 { "" } else { "s" },
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    )
}
