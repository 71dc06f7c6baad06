//! Running the daemon as a service: until SIGTERM or SIGINT, re-reading the config on SIGHUP
//! and on `fleet-broker reload` (the control socket's request), and telling the service
//! manager (`READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=`) as it goes.

use std::path::PathBuf;

use crate::config::Config;
use crate::daemon::{Daemon, DaemonOptions, ReloadError, Reloaded};
use crate::notify::{notify, summary};

/// Runs the daemon until SIGTERM/SIGINT; SIGHUP and `fleet-broker reload` re-read the config.
pub async fn serve(path: PathBuf, passed: crate::activation::Passed) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let config = Config::load(&path)?;
    let mut opts = DaemonOptions::from_env();
    for other in &passed.ignored {
        tracing::warn!(descriptor = %other, "ignoring a socket the service manager passed: only `{}` (the control socket) is used", crate::activation::CONTROL_NAME);
    }
    if passed.control.is_some() {
        tracing::info!("serving the control socket the service manager passed");
    }
    opts.control_fd = passed.control.map(std::sync::Arc::new);
    if opts.agent_socket.is_none() {
        tracing::warn!("SSH_AUTH_SOCK is not set: only identity_files can authenticate");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut daemon = Daemon::start(&config, &opts).await?;
    tracing::info!(control = %daemon.control_socket.display(), clusters = config.clusters.len(), "fleet-broker ready");
    // Every socket accepts now.
    notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS={}",
        std::process::id(),
        summary(&daemon.cluster_infos())
    ));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = reload_notified(&daemon, &path).await;
            }
            Some(reply) = daemon.reload_rx.recv() => {
                let result = reload_notified(&daemon, &path).await;
                let _ = reply.send(result);
            }
        }
    }
    tracing::info!("shutting down");
    notify("STOPPING=1\nSTATUS=stopping");
    daemon.shutdown().await;
    Ok(())
}

/// A reload between `RELOADING=1` and `READY=1`; a failure is logged and said in `STATUS=`.
async fn reload_notified(daemon: &Daemon, path: &std::path::Path) -> Result<Reloaded, ReloadError> {
    notify("RELOADING=1\nSTATUS=reloading the config");
    let result = reload(daemon, path).await;
    let status = summary(&daemon.cluster_infos());
    match &result {
        Ok(_) => notify(&format!("READY=1\nSTATUS={status}")),
        Err(e) => {
            tracing::error!(error = %e, "config not reloaded; the running config stays");
            notify(&format!("READY=1\nSTATUS={status} (last reload failed)"));
        }
    }
    result
}

/// Re-reads the config; a file that does not load leaves the running config alone.
async fn reload(daemon: &Daemon, path: &std::path::Path) -> Result<Reloaded, ReloadError> {
    let config = Config::load(path)?;
    Ok(daemon.reload(&config).await?)
}
