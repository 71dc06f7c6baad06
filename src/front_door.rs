//! A cluster's local SSH front door (`front_door = "127.0.0.1:PORT"`): an SSH server on
//! loopback that lets the unchanged original fleetctl use the broker's warm tunnel as its
//! `--tunnel`. It serves exactly what that fleetctl asks of a tunnel host:
//!
//! - the exec request `fleetctl fd-forward PATH` and `direct-streamlocal` channels to the
//!   cluster's fleet socket: both bridged to the cluster's fleet API through the warm tunnel;
//! - `direct-tcpip` channels to a machine of the cluster (its `primaryIP` from the API, on
//!   port 22 or `machine_ssh_port`), carried as channels of the warm tunnel, so the original's
//!   own nested SSH to the machine runs end to end over it.
//!
//! Everything else (a shell, other commands, other addresses, port forwarding) is refused,
//! with a message where the protocol has room for one. Authentication is public key only,
//! and only the user's own keys: the agent's, the cluster's `identity_files`' and those of
//! `front_door_authorized_keys`, never a key whose private half is public knowledge
//! (Vagrant's insecure keys).
//!
//! Loopback TCP is reachable by every local user, so the door keeps the rules of the
//! cluster socket: a connection is served only when the kernel's socket diagnostics
//! (`sock_diag`) say that its client socket belongs to the broker's uid or root; one whose
//! owner cannot be established is refused (fail closed). Refusals are logged at most once a
//! second ([`Throttle`]). At most [`MAX_CONNECTIONS`] connections at once, each with
//! [`LOGIN_GRACE_TIME`] to authenticate and closed after [`UNUSED_TIMEOUT`] without an open
//! channel (OpenSSH's `UnusedConnectionTimeout`); dead clients are found by keepalives.
//! Fleet API requests through `fd-forward` or streamlocal are served as HTTP by the
//! cluster's [`Proxy`], so `read_only`, the audit trail and the request checks apply as on
//! the cluster socket; a `direct-tcpip` channel to a machine counts as an ssh session:
//! refused on a `read_only` cluster, audited at start and end.
//!
//! The host key is generated once, in the state directory (0600), and shared by every
//! cluster's front door; `fleet-broker trust --front-door NAME` pins it in
//! `~/.fleetctl/known_hosts`, the original's default file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Peer};
use crate::config::Endpoint;
use crate::local::Refused;
use crate::proxy::Proxy;
use crate::throttle::Throttle;
use crate::tunnel::channel::DrainedChannel;
use crate::tunnel::Tunnel;
use connection::Connection;

mod connection;

/// The fleet socket path the original fleetctl uses when its endpoint is the default.
const DEFAULT_FLEET_SOCKET: &str = "/var/run/fleet.sock";
/// Bound on the machine lookup that decides whether a `direct-tcpip` target is a machine.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once per front door; more wait in the kernel's backlog.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// How long a client may take from connecting to being authenticated (sshd's
/// `LoginGraceTime`, shorter: the client is local).
pub(crate) const LOGIN_GRACE_TIME: Duration = Duration::from_secs(10);
/// An authenticated connection without any open channel for this long is closed.
pub(crate) const UNUSED_TIMEOUT: Duration = Duration::from_secs(60);
/// Keepalives to a silent client; it is dead after [`KEEPALIVE_MAX`] unanswered ones.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 3;
/// Bound on finding who owns a connection (a netlink query and a `/proc` scan).
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long in-flight API requests may run after the door starts closing.
const DRAIN_TIMEOUT: Duration = crate::http::DRAIN_TIMEOUT;

/// File name of the host key in the state directory.
const HOST_KEY_FILE: &str = "front_door_ed25519_key";

/// A new random ed25519 key.
pub(crate) fn random_ed25519() -> PrivateKey {
    use rand::RngCore;
    let mut seed = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ))
}

/// The front door's host key if one was made already (never makes one).
pub(crate) fn existing_host_key(state_dir: &Path) -> Option<PrivateKey> {
    russh::keys::load_secret_key(state_dir.join(HOST_KEY_FILE), None).ok()
}

/// Why the front door's host key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The state directory is not private, or cannot be made.
    #[error(transparent)]
    StateDir(#[from] crate::local::LocalError),
    /// A key file is there but is not a key we can read.
    #[error("{}: cannot read the front door's host key; remove it to have a new one made (then pin it again with `fleet-broker trust --front-door NAME`)", path.display())]
    Unreadable {
        /// The key file.
        path: PathBuf,
    },
    /// A new key could not be encoded.
    #[error("{}: {cause}", path.display())]
    Encode {
        /// The key file.
        path: PathBuf,
        /// Why.
        cause: russh::keys::ssh_key::Error,
    },
    /// A new key could not be written.
    #[error("{}: {cause}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
}

/// The front door's host key, generated on first use (0600, in a 0700 state directory).
/// Reads and writes files: the daemon calls it off its thread.
pub(crate) fn host_key(state_dir: &Path) -> Result<PrivateKey, HostKeyError> {
    crate::local::ensure_private_dir(state_dir)?;
    let path = state_dir.join(HOST_KEY_FILE);
    match russh::keys::load_secret_key(&path, None) {
        Ok(k) => return Ok(k),
        Err(_) if path.exists() => return Err(HostKeyError::Unreadable { path }),
        Err(_) => {}
    }
    let key = random_ed25519();
    let text = match key.to_openssh(russh::keys::ssh_key::LineEnding::LF) {
        Ok(t) => t,
        Err(cause) => return Err(HostKeyError::Encode { path, cause }),
    };
    let write = |cause| HostKeyError::Write {
        path: path.clone(),
        cause,
    };
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(write)?;
    f.write_all(text.as_bytes()).map_err(write)?;
    Ok(key)
}

/// What every connection of one cluster's front door shares.
pub(crate) struct Door {
    tunnel: Arc<Tunnel>,
    /// The cluster's fleet API over the tunnel, for the machine lookups of `direct-tcpip`.
    lookups: crate::fleet_client::FleetClient,
    agent: Option<PathBuf>,
    config: Arc<russh::server::Config>,
    /// The cluster socket's request handling: fleet API requests through the door get the
    /// same policy, checks and audit.
    proxy: Proxy,
    /// Where sessions to machines are recorded.
    audit: Arc<AuditLog>,
    /// Refused connections, logged at most once a second.
    refusals: Throttle,
}

impl Door {
    /// A front door for the cluster behind `tunnel`, with `host_key`.
    pub(crate) fn new(
        proxy: Proxy,
        audit: Arc<AuditLog>,
        lookups: crate::fleet_client::FleetClient,
        agent: Option<PathBuf>,
        host_key: PrivateKey,
    ) -> Arc<Door> {
        let config = Arc::new(russh::server::Config {
            keys: vec![host_key],
            methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
            auth_rejection_time: Duration::from_millis(100),
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: None,
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_max: KEEPALIVE_MAX,
            nodelay: true,
            ..Default::default()
        });
        Arc::new(Door {
            tunnel: proxy.tunnel().clone(),
            lookups,
            agent,
            config,
            proxy,
            audit,
            refusals: Throttle::default(),
        })
    }

    /// Whether `path` names the cluster's fleet socket: its configured unix endpoint, or the
    /// original's default path, which means the same thing to a user of the original.
    fn is_fleet_socket(&self, path: &str) -> bool {
        match &self.tunnel.config.endpoint {
            Endpoint::Unix(p) => path == p || path == DEFAULT_FLEET_SOCKET,
            Endpoint::Http { .. } => path == DEFAULT_FLEET_SOCKET,
        }
    }

    /// The keys this user may log in with, read now (the agent's keys change), less those
    /// whose private halves are public knowledge. Files are read off the runtime's thread.
    async fn user_keys(&self) -> Vec<PublicKey> {
        let mut keys = Vec::new();
        if let Some(agent) = &self.agent {
            if let Ok(mut client) =
                russh::keys::agent::client::AgentClient::connect_uds(agent).await
            {
                if let Ok(ids) = client.request_identities().await {
                    keys.extend(ids.into_iter().map(|id| id.public_key().into_owned()));
                }
            }
        }
        let identity_files = self.tunnel.config.identity_files.clone();
        let authorized = self.tunnel.config.front_door_authorized_keys.clone();
        match tokio::task::spawn_blocking(move || key_files(&identity_files, authorized.as_deref()))
            .await
        {
            Ok(k) => keys.extend(k),
            Err(e) => tracing::warn!(error = %e, "front door: reading key files failed"),
        }
        let before = keys.len();
        keys.retain(|k| !crate::auth::is_public_knowledge(k));
        if keys.len() != before {
            tracing::warn!("front door: Vagrant's insecure key is among the user's keys; it is public knowledge and never accepted here");
        }
        keys
    }
}

/// The public keys of the cluster's identity files and of `front_door_authorized_keys`
/// (blocking reads).
fn key_files(identity_files: &[PathBuf], authorized: Option<&Path>) -> Vec<PublicKey> {
    let mut keys = Vec::new();
    keys.extend(
        identity_files
            .iter()
            .filter_map(|f| crate::auth::identity_public_key(f)),
    );
    if let Some(file) = authorized {
        match std::fs::read_to_string(file) {
            Ok(text) => keys.extend(authorized_keys(&text)),
            Err(e) => {
                tracing::warn!(file = %crate::escape::display(&file.display().to_string()), error = %e, "cannot read front_door_authorized_keys")
            }
        }
    }
    keys
}

/// The keys of an authorized_keys file (options before a key are allowed and ignored; the
/// front door permits only its own few requests whatever they say).
fn authorized_keys(text: &str) -> Vec<PublicKey> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (0..words.len()).find_map(|i| PublicKey::from_openssh(&words[i..].join(" ")).ok())
        })
        .collect()
}

/// `fleetctl fd-forward PATH`, as the original sends it, split into the path.
fn fd_forward_path(command: &str) -> Option<&str> {
    let rest = command.trim().strip_prefix("fleetctl fd-forward ")?.trim();
    (!rest.is_empty() && !rest.contains(char::is_whitespace)).then_some(rest)
}

/// What `status` shows of a front door: listening, or why not.
pub(crate) struct DoorState {
    info: std::sync::Mutex<crate::protocol::FrontDoorInfo>,
}

impl DoorState {
    /// The state of a door on `addr` after its first bind.
    pub(crate) fn new(addr: SocketAddr, bound: &std::io::Result<TcpListener>) -> DoorState {
        DoorState {
            info: std::sync::Mutex::new(crate::protocol::FrontDoorInfo {
                address: addr.to_string(),
                listening: bound.is_ok(),
                error: bound.as_ref().err().map(|e| bind_error(addr, e)),
            }),
        }
    }

    pub(crate) fn info(&self) -> crate::protocol::FrontDoorInfo {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, listening: bool, error: Option<String>) {
        let mut i = self.info.lock().unwrap_or_else(|p| p.into_inner());
        i.listening = listening;
        i.error = error;
    }
}

/// First and longest wait between attempts to bind a front door's port.
const BIND_RETRY_MIN: Duration = Duration::from_secs(1);
const BIND_RETRY_MAX: Duration = Duration::from_secs(60);

/// Binds a door's loopback port (at once, without waiting on the runtime).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// What `status` and the log say when a door's port cannot be bound.
fn bind_error(addr: SocketAddr, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        format!(
            "front door {addr}: the port is taken by another program (`ss -ltnp sport = :{}` shows which); the door is tried again until it is free, or choose another `front_door` port",
            addr.port()
        )
    } else {
        format!("front door {addr}: {e}; tried again until it works")
    }
}

/// Serves the door on `first` (the bind the daemon made at start) until `stop`. A port that
/// cannot be bound (another program, perhaps another user's, holds it) fails this door
/// only: the error is logged and shown by `status`, and binding is tried again, 1 s doubling
/// to a minute apart.
pub(crate) async fn run(
    addr: SocketAddr,
    first: std::io::Result<TcpListener>,
    door: Arc<Door>,
    state: Arc<DoorState>,
    stop: CancellationToken,
) {
    let mut wait = BIND_RETRY_MIN;
    let mut said: Option<String> = None;
    let mut attempt = first;
    loop {
        match attempt {
            Ok(listener) => {
                state.set(true, None);
                tracing::info!(%addr, "serving the front door");
                serve(listener, door, stop).await;
                state.set(false, None);
                return;
            }
            Err(e) => {
                let why = bind_error(addr, &e);
                if said.as_deref() != Some(why.as_str()) {
                    tracing::error!(error = %why, "the front door cannot listen; the cluster socket still serves");
                    said = Some(why.clone());
                }
                state.set(false, Some(why));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(BIND_RETRY_MAX);
        attempt = bind(addr);
    }
}

/// Accepts local connections until `stop` is cancelled, with the accept discipline of the
/// cluster sockets ([`crate::http::accept_loop`]), then lets in-flight API requests finish
/// for up to [`DRAIN_TIMEOUT`].
pub(crate) async fn serve(listener: TcpListener, door: Arc<Door>, stop: CancellationToken) {
    let label = listener
        .local_addr()
        .map_or_else(|_| "front door".to_string(), |a| format!("front door {a}"));
    crate::http::accept_loop(
        &label,
        MAX_CONNECTIONS,
        listener,
        &stop,
        |(stream, peer), slot| Some(connection(door.clone(), stream, peer, stop.clone(), slot)),
    )
    .await;
}

/// Whether a connection whose client socket belongs to `uid` may be served: only the
/// broker's own user and root, as on the cluster sockets.
fn admit(uid: u32, me: u32) -> Result<(), Refused> {
    if uid == me || uid == 0 {
        Ok(())
    } else {
        Err(Refused::OtherUser { uid, pid: None, me })
    }
}

/// Who opened the connection from `peer` to `local`: its uid and, for the audit, its pid.
/// An owner that cannot be established is an error (the connection is refused).
async fn identify(peer: SocketAddr, local: SocketAddr) -> Result<Peer, Refused> {
    use crate::sock_diag::{holder, owner, Owner};
    let me = crate::local::my_uid();
    let lookup = tokio::task::spawn_blocking(move || match owner(peer, local) {
        Owner::Uid { uid, inode } => {
            admit(uid, me)?;
            let pid = if uid == me { holder(uid, inode) } else { None };
            Ok((uid, pid))
        }
        Owner::Unknown(why) => Err(Refused::Unknown(why)),
    });
    let (uid, pid) = match tokio::time::timeout(IDENTIFY_TIMEOUT, lookup).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(Refused::Unknown(e.to_string())),
        Err(_) => return Err(Refused::Slow(IDENTIFY_TIMEOUT)),
    };
    Ok(Peer {
        uid,
        pid,
        door: Some(peer),
    })
}

/// One accepted connection: identified, then served as SSH within the door's limits.
async fn connection(
    door: Arc<Door>,
    stream: TcpStream,
    peer_addr: SocketAddr,
    stop: CancellationToken,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let identified = match stream.local_addr() {
        Ok(local) => identify(peer_addr, local).await,
        Err(e) => Err(Refused::Unknown(format!(
            "its local address is unknown: {e}"
        ))),
    };
    let peer = match identified {
        Ok(p) => p,
        Err(why) => {
            if let Some(suppressed) = door.refusals.admit() {
                tracing::warn!(peer = %peer_addr, reason = %why, suppressed, "front door: refused a connection");
            }
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (authed_tx, authed_rx) = oneshot::channel();
    let (active_tx, active_rx) = watch::channel(0usize);
    let handler = Connection::new(door.clone(), peer, authed_tx, active_tx, stop.clone());
    let run = async move {
        if let Ok(session) = russh::server::run_stream(door.config.clone(), stream, handler).await {
            let _ = session.await;
        }
    };
    tokio::pin!(run);
    let mut idle_rx = active_rx.clone();
    tokio::select! {
        _ = &mut run => {}
        why = limits(authed_rx, active_rx) => {
            tracing::debug!(peer = %peer_addr, reason = why, "front door: closing a connection");
        }
        _ = stop.cancelled() => {
            // API requests in flight were told to finish; the connection carries them.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
                tokio::select! {
                    _ = &mut run => {}
                    _ = idle_rx.wait_for(|n| *n == 0) => {}
                }
            })
            .await;
        }
    }
}

/// Resolves when a connection has overstayed: not authenticated within
/// [`LOGIN_GRACE_TIME`], or without an open channel for [`UNUSED_TIMEOUT`]; says which.
async fn limits(authed: oneshot::Receiver<()>, mut active: watch::Receiver<usize>) -> &'static str {
    match tokio::time::timeout(LOGIN_GRACE_TIME, authed).await {
        Ok(Ok(())) => {}
        // The handler is gone: the connection ends by itself.
        Ok(Err(_)) => std::future::pending().await,
        Err(_) => return "not authenticated within the login grace time",
    }
    loop {
        if *active.borrow_and_update() == 0 {
            match tokio::time::timeout(UNUSED_TIMEOUT, active.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => std::future::pending().await,
                Err(_) => return "no channel open for the unused-connection timeout",
            }
        } else if active.changed().await.is_err() {
            std::future::pending().await
        }
    }
}

/// Counts an open channel of a connection while it lives.
struct Active(Arc<watch::Sender<usize>>);

impl Active {
    fn new(tx: &Arc<watch::Sender<usize>>) -> Active {
        tx.send_modify(|n| *n += 1);
        Active(tx.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests;
