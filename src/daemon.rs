//! The daemon: one tunnel and one cluster socket per configured cluster, plus the control
//! socket, all under a private runtime directory. [`Daemon::start`] binds everything before
//! returning (so callers can connect at once); [`Daemon::reload`] applies a new config
//! (clusters that did not change keep their connection; a config that cannot be applied
//! leaves the running one alone); [`Daemon::shutdown`] stops accepting, lets in-flight
//! requests finish for up to five seconds and removes the sockets.
//!
//! # Shutdown
//!
//! One [`CancellationToken`] per daemon, and a child of it per cluster. Every task the
//! daemon starts is handed one of them and ends when it is cancelled:
//!
//! - the control socket's accept loop: the daemon's token;
//! - per cluster (its child token, cancelled on shutdown, on reload when the cluster changed
//!   or went away): the tunnel's supervisor (which closes the SSH connection), the cluster
//!   socket's accept loop and its connections (which drain for up to five seconds), the
//!   exec pool's sweeper and every exec session (whose remote command gets its channel
//!   closed).
//!
//! Tasks below those need no token of their own: a channel's drain task ends with its
//! channel, and every channel ends with the connection its owner closes. Each cluster's tasks
//! run inside a `cluster` tracing span, so their events carry the cluster's name.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{ClusterConfig, Config, HostKeyPolicy};
use crate::control::Control;
use crate::exec::Exec;
use crate::local::{self, LocalError};

use crate::proxy::Proxy;
use crate::registry::{ClusterRuntime, Registry, ReloadRequest};
use crate::tunnel::Tunnel;

/// Where the daemon lives and which agent it uses.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Private directory for `control.sock` and `clusters/*.sock`.
    pub runtime_dir: PathBuf,
    /// The ssh-agent socket (`SSH_AUTH_SOCK` at start).
    pub agent_socket: Option<PathBuf>,
    /// Private directory for what outlives a run (the front door's host key).
    pub state_dir: PathBuf,
    /// The control socket passed by the service manager (socket activation), already
    /// checked to be bound at `runtime_dir/control.sock`; `None`: the daemon binds it.
    pub control_fd: Option<Arc<std::os::fd::OwnedFd>>,
}

impl DaemonOptions {
    /// The default runtime dir and the agent from the environment.
    pub fn from_env() -> DaemonOptions {
        DaemonOptions {
            runtime_dir: local::default_runtime_dir(),
            agent_socket: std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            state_dir: local::default_state_dir(),
            control_fd: None,
        }
    }
}

/// A running daemon.
pub struct Daemon {
    /// The private directory holding the sockets.
    pub runtime_dir: PathBuf,
    /// `control.sock` in it.
    pub control_socket: PathBuf,
    pub(crate) registry: Arc<Registry>,
    opts: DaemonOptions,
    /// Cancelled on shutdown; every cluster's token is a child of it.
    shutdown: CancellationToken,
    /// The audit trail, shared by every cluster and the control socket.
    audit: Arc<crate::audit::AuditLog>,
    control_task: JoinHandle<()>,
    /// Reload requests from the control socket, acted on by the service loop (`service`).
    pub(crate) reload_rx: mpsc::Receiver<ReloadRequest>,
}

/// Undoes a start that failed part-way: no half-served state is left behind.
fn abandon(registry: &Registry, sockets: &[PathBuf]) {
    for rt in registry.all() {
        rt.stop();
    }
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
}

pub use crate::registry::{ReloadError, Reloaded, StartError};

impl Daemon {
    /// Binds every socket and starts the supervisors.
    pub async fn start(config: &Config, opts: &DaemonOptions) -> Result<Daemon, StartError> {
        let runtime_dir = opts.runtime_dir.as_path();
        local::ensure_private_dir(runtime_dir)?;
        local::ensure_private_dir(&runtime_dir.join("clusters"))?;
        let control_socket = local::control_socket(runtime_dir);
        let shutdown = CancellationToken::new();
        let registry = Arc::new(Registry::default());
        registry.set_order(config.clusters.keys().cloned().collect());
        let audit = Arc::new(crate::audit::AuditLog::new(crate::audit::log_path(
            &config.audit_log,
            &opts.state_dir,
        )));
        // An audit log someone else could read or forge stops the start, with the reason;
        // one the system will not let us write (a read-only home under systemd) is said once
        // and requests are still served, as each failed write is said again.
        if let Some(path) = audit.path() {
            match crate::audit::check(path) {
                Ok(()) => {}
                Err(crate::audit::FileError::Unsafe(message)) => {
                    return Err(LocalError::Unsafe {
                        path: path.to_path_buf(),
                        message: format!("the audit log {message}"),
                    }
                    .into())
                }
                Err(crate::audit::FileError::Io(e)) => {
                    tracing::warn!(file = %path.display(), error = %e, "the audit log cannot be written; mutating requests are served but not recorded until it can")
                }
            }
        }
        let mut started = Vec::new();
        for c in config.clusters.values() {
            match Self::start_cluster(c, opts, shutdown.child_token(), audit.clone()).await {
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
        // A socket passed by the service manager has queued the requests that started us.
        let control_listener = match &opts.control_fd {
            Some(fd) => crate::activation::listener(fd).map_err(|source| LocalError::Io {
                path: control_socket.clone(),
                source,
            }),
            None => local::bind_socket(&control_socket).await,
        };
        let control_listener = match control_listener {
            Ok(l) => l,
            Err(e) => {
                abandon(&registry, &started);
                return Err(e.into());
            }
        };
        let (reload_tx, reload_rx) = mpsc::channel(4);
        // The lag probe runs for the daemon's life; its token is the daemon's.
        let lag = Arc::new(crate::lag::Lag::default());
        tokio::spawn(lag.clone().probe(shutdown.clone()));
        let control = Arc::new(Control {
            registry: registry.clone(),
            reload_tx,
            audit: audit.clone(),
            lag,
        });
        let control_task = tokio::spawn(crate::http::serve(
            control_listener,
            control_socket.display().to_string(),
            shutdown.clone(),
            move |req| control.clone().handle(req),
        ));
        Ok(Daemon {
            runtime_dir: runtime_dir.to_path_buf(),
            control_socket,
            registry,
            opts: opts.clone(),
            shutdown,
            audit,
            control_task,
            reload_rx,
        })
    }

    async fn start_cluster(
        cfg: &ClusterConfig,
        opts: &DaemonOptions,
        stop: CancellationToken,
        audit: Arc<crate::audit::AuditLog>,
    ) -> Result<Arc<ClusterRuntime>, StartError> {
        let path = local::cluster_socket(&opts.runtime_dir, &cfg.name);
        let listener = local::bind_socket(&path).await?;
        let span = tracing::info_span!("cluster", cluster = %cfg.name);
        let _entered = span.enter();
        if cfg.host_key_checking == HostKeyPolicy::Off {
            tracing::warn!("HOST KEY CHECKING IS OFF: any server can impersonate {} and receive root-equivalent fleet requests", cfg.tunnel);
        }
        let tunnel = Tunnel::spawn(cfg.clone(), opts.agent_socket.clone(), stop.clone());
        let lookups = crate::tunnel::api::lookup_client(&tunnel, crate::exec::LOOKUP_TIMEOUT);
        let exec = Exec::new(
            tunnel.clone(),
            lookups.clone(),
            opts.agent_socket.clone(),
            stop.clone(),
        );
        let proxy = Proxy::new(tunnel.clone(), audit.clone());
        let mut tasks = Vec::new();
        let mut door_state = None;
        if let Some(addr) = cfg.front_door {
            // Without its host key no door can be served: that fails the start, and nothing
            // half-served remains. A port that cannot be bound (another program holds it)
            // fails this door only, which keeps trying.
            let door = match Self::front_door(opts, &proxy, &audit, lookups).await {
                Ok(d) => d,
                Err(e) => {
                    stop.cancel();
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            };
            let first = crate::front_door::bind(addr);
            let state = Arc::new(crate::front_door::DoorState::new(addr, &first));
            door_state = Some(state.clone());
            tasks.push(tokio::spawn(tracing::Instrument::instrument(
                crate::front_door::run(addr, first, door, state, stop.clone()),
                span.clone(),
            )));
        }
        let task = tokio::spawn(
            crate::http::serve_streams(
                listener,
                path.display().to_string(),
                stop.clone(),
                move |stream, peer, stop, slot| {
                    crate::proxy::lean::serve(proxy.clone(), stream, peer, stop, slot)
                },
            )
            .instrument(span.clone()),
        );
        tracing::info!(socket = %path.display(), "serving cluster socket");
        tasks.push(task);
        Ok(Arc::new(ClusterRuntime::new(
            tunnel, exec, path, door_state, stop, tasks,
        )))
    }

    /// A cluster's front door with the shared host key.
    async fn front_door(
        opts: &DaemonOptions,
        proxy: &Proxy,
        audit: &Arc<crate::audit::AuditLog>,
        lookups: crate::fleet_client::FleetClient,
    ) -> Result<Arc<crate::front_door::Door>, StartError> {
        let state_dir = opts.state_dir.clone();
        let key = tokio::task::spawn_blocking(move || crate::front_door::host_key(&state_dir))
            .await
            .map_err(|e| LocalError::Io {
                path: opts.state_dir.clone(),
                source: std::io::Error::other(e),
            })??;
        let door = crate::front_door::Door::new(
            proxy.clone(),
            audit.clone(),
            lookups,
            opts.agent_socket.clone(),
            key,
        );
        Ok(door)
    }

    /// Stops a cluster: its socket drains (bounded) and is removed.
    async fn remove_cluster(&self, name: &str) {
        if let Some(rt) = self.registry.get(name) {
            self.registry.set(name.to_string(), None);
            for task in rt.stop() {
                let _ = task.await;
            }
            let _ = std::fs::remove_file(&rt.socket);
            tracing::info_span!("cluster", cluster = %name).in_scope(|| {
                tracing::info!("stopped serving cluster");
            });
        }
    }

    /// Applies `config`: unchanged clusters keep their tunnel, changed ones restart, removed
    /// ones stop, new ones start. Returns a summary.
    pub async fn reload(&self, config: &Config) -> Result<Reloaded, StartError> {
        self.registry
            .set_order(config.clusters.keys().cloned().collect());
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
                let rt = Self::start_cluster(
                    c,
                    &self.opts,
                    self.shutdown.child_token(),
                    self.audit.clone(),
                )
                .await?;
                self.registry.set(name.clone(), Some(rt));
                added += 1;
            }
        }
        added -= changed.min(added);
        let done = Reloaded {
            kept,
            changed,
            added,
            removed,
        };
        tracing::info!(summary = %done, "config reloaded");
        Ok(done)
    }

    /// Every served cluster as the control socket reports it.
    pub fn cluster_infos(&self) -> Vec<crate::protocol::ClusterInfo> {
        self.registry
            .all()
            .iter()
            .map(|c| crate::control::info(c))
            .collect()
    }

    /// Stops accepting, drains in-flight requests (bounded) and removes the sockets.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let mut tasks = Vec::new();
        for rt in self.registry.all() {
            tasks.extend(rt.stop());
        }
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.control_task.await;
        for rt in self.registry.all() {
            let _ = std::fs::remove_file(&rt.socket);
        }
        // A passed control socket stays: its manager keeps listening and starts us again on
        // the next request.
        if self.opts.control_fd.is_none() {
            let _ = std::fs::remove_file(&self.control_socket);
        }
        tracing::info!("fleet-broker stopped");
    }
}
