//! The daemon: one tunnel and one cluster socket per configured cluster, plus the control
//! socket, all under a private runtime directory. [`Daemon::start`] binds everything before
//! returning (so callers can connect at once); [`Daemon::shutdown`] stops accepting, lets
//! in-flight requests finish for up to five seconds and removes the sockets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, HostKeyPolicy};
use crate::control::Control;
use crate::local::{self, LocalError};
use crate::proxy::Proxy;
use crate::tunnel::Tunnel;

/// Where the daemon lives and which agent it uses.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Private directory for `control.sock` and `clusters/*.sock`.
    pub runtime_dir: PathBuf,
    /// The ssh-agent socket (`SSH_AUTH_SOCK` at start).
    pub agent_socket: Option<PathBuf>,
}

impl DaemonOptions {
    /// The default runtime dir and the agent from the environment.
    pub fn from_env() -> DaemonOptions {
        DaemonOptions {
            runtime_dir: local::default_runtime_dir(),
            agent_socket: std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        }
    }
}

pub struct Daemon {
    pub runtime_dir: PathBuf,
    pub control_socket: PathBuf,
    pub tunnels: BTreeMap<String, (Arc<Tunnel>, PathBuf)>,
    shutdown_tx: watch::Sender<bool>,
    tasks: JoinSet<()>,
    sockets: Vec<PathBuf>,
}

impl Daemon {
    /// Binds every socket and starts the supervisors.
    pub async fn start(config: &Config, opts: &DaemonOptions) -> Result<Daemon, LocalError> {
        let runtime_dir = opts.runtime_dir.as_path();
        local::ensure_private_dir(runtime_dir)?;
        local::ensure_private_dir(&runtime_dir.join("clusters"))?;
        let control_socket = local::control_socket(runtime_dir);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut listeners = Vec::new();
        let mut sockets = Vec::new();
        let control_listener = local::bind_socket(&control_socket).await?;
        sockets.push(control_socket.clone());
        for name in config.clusters.keys() {
            let path = local::cluster_socket(runtime_dir, name);
            match local::bind_socket(&path).await {
                Ok(l) => {
                    sockets.push(path.clone());
                    listeners.push((name.clone(), path, l));
                }
                Err(e) => {
                    for s in &sockets {
                        let _ = std::fs::remove_file(s);
                    }
                    return Err(e);
                }
            }
        }
        let mut tasks = JoinSet::new();
        let mut tunnels = BTreeMap::new();
        for (name, path, listener) in listeners {
            let cfg = config.clusters[&name].clone();
            if cfg.host_key_checking == HostKeyPolicy::Off {
                tracing::warn!(cluster = %name, "HOST KEY CHECKING IS OFF: any server can impersonate {} and receive root-equivalent fleet requests", cfg.tunnel);
            }
            let tunnel = Tunnel::spawn(cfg, opts.agent_socket.clone(), shutdown_rx.clone());
            let proxy = Proxy::new(tunnel.clone());
            tasks.spawn(crate::http::serve(
                listener,
                path.display().to_string(),
                shutdown_rx.clone(),
                move |req| {
                    let p = proxy.clone();
                    async move { p.handle(req).await }
                },
            ));
            tracing::info!(cluster = %name, socket = %path.display(), "serving cluster socket");
            tunnels.insert(name, (tunnel, path));
        }
        let exec = tunnels
            .iter()
            .map(|(name, (t, path))| {
                (
                    name.clone(),
                    crate::exec::Exec::new(t.clone(), path.clone(), opts.agent_socket.clone()),
                )
            })
            .collect();
        let control = Arc::new(Control {
            tunnels: tunnels.clone(),
            exec,
        });
        tasks.spawn(crate::http::serve(
            control_listener,
            control_socket.display().to_string(),
            shutdown_rx,
            move |req| control.clone().handle(req),
        ));
        Ok(Daemon {
            runtime_dir: runtime_dir.to_path_buf(),
            control_socket,
            tunnels,
            shutdown_tx,
            tasks,
            sockets,
        })
    }

    /// Stops accepting, drains in-flight requests (bounded) and removes the sockets.
    pub async fn shutdown(mut self) {
        self.shutdown_tx.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        tracing::info!("fleet-broker stopped");
    }
}
