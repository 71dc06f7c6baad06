//! The clusters a daemon serves, by name: what the control socket reads and the daemon
//! changes on reload.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::exec::Exec;
use crate::tunnel::Tunnel;

/// One served cluster.
pub(crate) struct ClusterRuntime {
    /// The cluster's tunnel and its supervisor.
    pub(crate) tunnel: Arc<Tunnel>,
    /// Exec sessions on the cluster's machines.
    pub(crate) exec: Arc<Exec>,
    /// The local cluster socket.
    pub(crate) socket: PathBuf,
    /// The front door's state, when the cluster has one.
    pub(crate) front_door: Option<Arc<crate::front_door::DoorState>>,
    /// Cancelled to stop everything of this cluster (a child of the daemon's token).
    stop: CancellationToken,
    /// The cluster socket's accept loop, and the front door's if there is one.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl ClusterRuntime {
    /// A served cluster whose tasks all obey `stop`.
    pub(crate) fn new(
        tunnel: Arc<Tunnel>,
        exec: Arc<Exec>,
        socket: PathBuf,
        front_door: Option<Arc<crate::front_door::DoorState>>,
        stop: CancellationToken,
        tasks: Vec<JoinHandle<()>>,
    ) -> ClusterRuntime {
        ClusterRuntime {
            tunnel,
            exec,
            socket,
            front_door,
            stop,
            tasks: Mutex::new(tasks),
        }
    }

    /// Cancels the cluster's tasks; returns its listeners' tasks, to wait until the cluster
    /// socket has drained and the front door's port is free again.
    pub(crate) fn stop(&self) -> Vec<JoinHandle<()>> {
        self.stop.cancel();
        match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }
}

/// The clusters being served, shared with the control socket.
#[derive(Default)]
pub(crate) struct Registry {
    clusters: RwLock<BTreeMap<String, Arc<ClusterRuntime>>>,
    /// The clusters' names in the config's order, the order every list of them is given in.
    order: RwLock<Vec<String>>,
}

impl Registry {
    /// A snapshot of the served clusters, in the config's order.
    pub(crate) fn all(&self) -> Vec<Arc<ClusterRuntime>> {
        let mut all: Vec<Arc<ClusterRuntime>> = match self.clusters.read() {
            Ok(c) => c.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        };
        let order = match self.order.read() {
            Ok(o) => o.clone(),
            Err(p) => p.into_inner().clone(),
        };
        // Stable: a name the order does not know (none, once it is set) stays by name.
        all.sort_by_key(|c| {
            order
                .iter()
                .position(|n| n == c.tunnel.name())
                .unwrap_or(usize::MAX)
        });
        all
    }

    /// The config's order of the clusters (at start and at each reload).
    pub(crate) fn set_order(&self, names: Vec<String>) {
        match self.order.write() {
            Ok(mut o) => *o = names,
            Err(p) => *p.into_inner() = names,
        }
    }

    /// The served cluster called `name`.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        match self.clusters.read() {
            Ok(c) => c.get(name).cloned(),
            Err(p) => p.into_inner().get(name).cloned(),
        }
    }

    /// The names of the served clusters, in the config's order.
    pub(crate) fn names(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|c| c.tunnel.name().to_string())
            .collect()
    }

    /// Adds (`Some`) or removes (`None`) the cluster called `name`.
    pub(crate) fn set(&self, name: String, c: Option<Arc<ClusterRuntime>>) {
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
pub(crate) type ReloadRequest = oneshot::Sender<Result<Reloaded, ReloadError>>;

/// What a reload did to the served clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Clusters whose config did not change (their tunnels stay up).
    pub kept: usize,
    /// Clusters whose config changed (restarted).
    pub changed: usize,
    /// Clusters new in the config.
    pub added: usize,
    /// Clusters no longer in the config.
    pub removed: usize,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unchanged, {} restarted, {} added, {} removed",
            self.kept, self.changed, self.added, self.removed
        )
    }
}

/// Why the daemon, or a cluster added by a reload, did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A socket, directory or file of the runtime or state directory.
    #[error(transparent)]
    Local(#[from] crate::local::LocalError),
    /// The front door's host key.
    #[error(transparent)]
    FrontDoorKey(#[from] crate::front_door::HostKeyError),
}

/// Why a reload left the running config as it was.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config file does not load.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A new cluster's socket (or front door key) could not be set up.
    #[error(transparent)]
    Start(#[from] StartError),
}
