//! The daemon: one tunnel and one cluster socket per configured cluster, plus the control
//! socket, all under a private runtime directory. [`Daemon::start`] binds everything before
//! returning (so callers can connect at once); [`Daemon::reload`] applies a new config
//! (clusters that did not change keep their connection; a config that cannot be applied
//! leaves the running one alone); [`Daemon::shutdown`] stops accepting, lets in-flight
//! requests finish for up to five seconds and removes the sockets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{ClusterConfig, Config, HostKeyPolicy};
use crate::control::Control;
use crate::exec::Exec;
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

/// One served cluster.
pub struct ClusterRuntime {
    pub tunnel: Arc<Tunnel>,
    pub exec: Arc<Exec>,
    pub socket: PathBuf,
    /// Stops this cluster's supervisor and socket.
    stop_tx: watch::Sender<bool>,
    serve_task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// The clusters being served, shared with the control socket.
#[derive(Default)]
pub struct Registry {
    clusters: RwLock<BTreeMap<String, Arc<ClusterRuntime>>>,
}

impl Registry {
    /// A snapshot of the served clusters.
    pub fn all(&self) -> Vec<Arc<ClusterRuntime>> {
        match self.clusters.read() {
            Ok(c) => c.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        match self.clusters.read() {
            Ok(c) => c.get(name).cloned(),
            Err(p) => p.into_inner().get(name).cloned(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|c| c.tunnel.name().to_string())
            .collect()
    }

    fn set(&self, name: String, c: Option<Arc<ClusterRuntime>>) {
        let mut map = match self.clusters.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        match c {
            Some(c) => {
                map.insert(name, c);
            }
            None => {
                map.remove(&name);
            }
        }
    }
}

/// A reload request from the control socket, answered with the outcome.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;

pub struct Daemon {
    pub runtime_dir: PathBuf,
    pub control_socket: PathBuf,
    pub registry: Arc<Registry>,
    opts: DaemonOptions,
    shutdown_tx: watch::Sender<bool>,
    control_task: JoinHandle<()>,
    /// Reload requests from the control socket, for the owner of the daemon to act on.
    pub reload_rx: mpsc::Receiver<ReloadRequest>,
}

fn stop_cluster(c: &ClusterRuntime) -> Option<JoinHandle<()>> {
    c.stop_tx.send_replace(true);
    match c.serve_task.lock() {
        Ok(mut t) => t.take(),
        Err(p) => p.into_inner().take(),
    }
}

/// Undoes a start that failed part-way: no half-served state is left behind.
fn abandon(registry: &Registry, sockets: &[PathBuf]) {
    for rt in registry.all() {
        stop_cluster(&rt);
    }
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
}

impl Daemon {
    /// Binds every socket and starts the supervisors.
    pub async fn start(config: &Config, opts: &DaemonOptions) -> Result<Daemon, LocalError> {
        let runtime_dir = opts.runtime_dir.as_path();
        local::ensure_private_dir(runtime_dir)?;
        local::ensure_private_dir(&runtime_dir.join("clusters"))?;
        let control_socket = local::control_socket(runtime_dir);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let registry = Arc::new(Registry::default());
        let mut started = Vec::new();
        for c in config.clusters.values() {
            match Self::start_cluster(c, opts).await {
                Ok(rt) => {
                    started.push(rt.socket.clone());
                    registry.set(c.name.clone(), Some(rt));
                }
                Err(e) => {
                    abandon(&registry, &started);
                    return Err(e);
                }
            }
        }
        // Bound last: once the control socket answers, every cluster socket is listening.
        let control_listener = match local::bind_socket(&control_socket).await {
            Ok(l) => l,
            Err(e) => {
                abandon(&registry, &started);
                return Err(e);
            }
        };
        let (reload_tx, reload_rx) = mpsc::channel(4);
        let control = Arc::new(Control {
            registry: registry.clone(),
            reload_tx,
        });
        let control_task = tokio::spawn(crate::http::serve(
            control_listener,
            control_socket.display().to_string(),
            shutdown_rx,
            move |req| control.clone().handle(req),
        ));
        Ok(Daemon {
            runtime_dir: runtime_dir.to_path_buf(),
            control_socket,
            registry,
            opts: opts.clone(),
            shutdown_tx,
            control_task,
            reload_rx,
        })
    }

    async fn start_cluster(
        cfg: &ClusterConfig,
        opts: &DaemonOptions,
    ) -> Result<Arc<ClusterRuntime>, LocalError> {
        let path = local::cluster_socket(&opts.runtime_dir, &cfg.name);
        let listener = local::bind_socket(&path).await?;
        if cfg.host_key_checking == HostKeyPolicy::Off {
            tracing::warn!(cluster = %cfg.name, "HOST KEY CHECKING IS OFF: any server can impersonate {} and receive root-equivalent fleet requests", cfg.tunnel);
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let tunnel = Tunnel::spawn(cfg.clone(), opts.agent_socket.clone(), stop_rx.clone());
        let exec = Exec::new(tunnel.clone(), path.clone(), opts.agent_socket.clone());
        let proxy = Proxy::new(tunnel.clone());
        let task = tokio::spawn(crate::http::serve(
            listener,
            path.display().to_string(),
            stop_rx,
            move |req| {
                let p = proxy.clone();
                async move { p.handle(req).await }
            },
        ));
        tracing::info!(cluster = %cfg.name, socket = %path.display(), "serving cluster socket");
        Ok(Arc::new(ClusterRuntime {
            tunnel,
            exec,
            socket: path,
            stop_tx,
            serve_task: std::sync::Mutex::new(Some(task)),
        }))
    }

    /// Stops a cluster: its socket drains (bounded) and is removed.
    async fn remove_cluster(&self, name: &str) {
        if let Some(rt) = self.registry.get(name) {
            self.registry.set(name.to_string(), None);
            if let Some(task) = stop_cluster(&rt) {
                let _ = task.await;
            }
            let _ = std::fs::remove_file(&rt.socket);
            tracing::info!(cluster = %name, "stopped serving cluster");
        }
    }

    /// Applies `config`: unchanged clusters keep their tunnel, changed ones restart, removed
    /// ones stop, new ones start. Returns a summary.
    pub async fn reload(&self, config: &Config) -> Result<String, LocalError> {
        let (mut kept, mut changed, mut added, mut removed) = (0, 0, 0, 0);
        for name in self.registry.names() {
            match config.clusters.get(&name) {
                Some(c)
                    if self
                        .registry
                        .get(&name)
                        .is_some_and(|rt| rt.tunnel.config == *c) =>
                {
                    kept += 1
                }
                Some(_) => {
                    self.remove_cluster(&name).await;
                    changed += 1;
                }
                None => {
                    self.remove_cluster(&name).await;
                    removed += 1;
                }
            }
        }
        for (name, c) in &config.clusters {
            if self.registry.get(name).is_none() {
                let rt = Self::start_cluster(c, &self.opts).await?;
                self.registry.set(name.clone(), Some(rt));
                added += 1;
            }
        }
        added -= changed.min(added);
        let summary =
            format!("{kept} unchanged, {changed} restarted, {added} added, {removed} removed");
        tracing::info!(summary = %summary, "config reloaded");
        Ok(summary)
    }

    /// Stops accepting, drains in-flight requests (bounded) and removes the sockets.
    pub async fn shutdown(self) {
        self.shutdown_tx.send_replace(true);
        let mut tasks = Vec::new();
        for rt in self.registry.all() {
            if let Some(t) = stop_cluster(&rt) {
                tasks.push(t);
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.control_task.await;
        for rt in self.registry.all() {
            let _ = std::fs::remove_file(&rt.socket);
        }
        let _ = std::fs::remove_file(&self.control_socket);
        tracing::info!("fleet-broker stopped");
    }
}
