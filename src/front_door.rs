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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Peer};
use crate::config::Endpoint;
use crate::fleet_client::FleetClient;
use crate::proxy::Proxy;
use crate::throttle::Throttle;
use crate::tunnel::channel::DrainedChannel;
use crate::tunnel::Tunnel;

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

/// The front door's host key, generated on first use (0600, in a 0700 state directory).
pub(crate) fn host_key(state_dir: &Path) -> Result<PrivateKey, String> {
    crate::local::ensure_private_dir(state_dir).map_err(|e| e.to_string())?;
    let path = state_dir.join(HOST_KEY_FILE);
    match russh::keys::load_secret_key(&path, None) {
        Ok(k) => return Ok(k),
        Err(_) if path.exists() => {
            return Err(format!(
                "{}: cannot read the front door's host key; remove it to have a new one made (then pin it again with `fleet-broker trust --front-door NAME`)",
                path.display()
            ))
        }
        Err(_) => {}
    }
    let key = random_ed25519();
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(key)
}

/// What every connection of one cluster's front door shares.
pub(crate) struct Door {
    tunnel: Arc<Tunnel>,
    /// The cluster socket, for the machine lookups of `direct-tcpip`.
    socket: PathBuf,
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
        socket: PathBuf,
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
            socket,
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
fn admit(uid: u32, me: u32) -> Result<(), String> {
    if uid == me || uid == 0 {
        Ok(())
    } else {
        Err(format!("uid {uid} is not the broker's uid {me}"))
    }
}

/// Who opened the connection from `peer` to `local`: its uid and, for the audit, its pid.
/// An owner that cannot be established is an error (the connection is refused).
async fn identify(peer: SocketAddr, local: SocketAddr) -> Result<Peer, String> {
    use crate::sock_diag::{holder, owner, Owner};
    let me = crate::local::my_uid();
    let lookup = tokio::task::spawn_blocking(move || match owner(peer, local) {
        Owner::Uid { uid, inode } => {
            admit(uid, me)?;
            let pid = if uid == me { holder(uid, inode) } else { None };
            Ok((uid, pid))
        }
        Owner::Unknown(why) => Err(format!("its owner cannot be established: {why}")),
    });
    let (uid, pid) = match tokio::time::timeout(IDENTIFY_TIMEOUT, lookup).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(format!("its owner cannot be established: {e}")),
        Err(_) => {
            return Err(format!(
                "its owner cannot be established within {IDENTIFY_TIMEOUT:?}"
            ))
        }
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
        Err(e) => Err(format!("its local address is unknown: {e}")),
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
    let handler = Connection {
        door: door.clone(),
        peer,
        keys: None,
        sessions: HashMap::new(),
        authed: Some(authed_tx),
        active: Arc::new(active_tx),
        stop: stop.clone(),
    };
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

/// One SSH connection to the front door.
struct Connection {
    door: Arc<Door>,
    /// Who opened it (uid, pid, address), for the policy and the audit trail.
    peer: Peer,
    /// The user's keys, read at the first authentication attempt.
    keys: Option<Vec<PublicKey>>,
    /// Session channels waiting for their exec request, each counted as open.
    sessions: HashMap<ChannelId, (Channel<Msg>, Active)>,
    /// Told once the client has authenticated (ends the login grace time).
    authed: Option<oneshot::Sender<()>>,
    /// The number of open channels, for the unused-connection timeout.
    active: Arc<watch::Sender<usize>>,
    /// The cluster's stop token: channels end with it.
    stop: CancellationToken,
}

impl Connection {
    async fn is_users(&mut self, key: &PublicKey) -> bool {
        if self.keys.is_none() {
            self.keys = Some(self.door.user_keys().await);
        }
        self.keys
            .as_ref()
            .is_some_and(|ks| ks.iter().any(|k| k.key_data() == key.key_data()))
    }

    /// Ends a session channel with a message on its stderr and exit status 1.
    fn refuse(
        &mut self,
        session: &mut Session,
        id: ChannelId,
        message: &str,
    ) -> Result<(), russh::Error> {
        self.sessions.remove(&id);
        session.extended_data(id, 1, format!("fleet-broker front door: {message}\r\n"))?;
        session.exit_status_request(id, 1)?;
        session.eof(id)?;
        session.close(id)
    }

    /// Serves the cluster's fleet API as HTTP on `channel` (through the cluster socket's
    /// proxy: the same policy, checks and audit) until the client is done or the cluster
    /// stops; `active` is held until then.
    async fn serve_api(
        door: Arc<Door>,
        peer: Peer,
        channel: Channel<Msg>,
        stop: CancellationToken,
        active: Active,
    ) {
        let proxy = door.proxy.clone();
        crate::http::serve_connection(
            hyper_util::rt::TokioIo::new(channel.into_stream()),
            peer,
            move |req| {
                let p = proxy.clone();
                async move { p.handle(req).await }
            },
            stop,
            true,
            active,
        )
        .await;
    }
}

/// Copies between a client's channel and an upstream stream until the upstream has nothing
/// more to say (the client may close its side first; the upstream may still answer) or
/// `stop`. Returns the bytes sent upstream and to the client.
async fn bridge<S>(channel: Channel<Msg>, upstream: S, stop: &CancellationToken) -> (u64, u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let stream = channel.into_stream();
    let (mut client_rd, mut client_wr) = tokio::io::split(stream);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let sent_up = AtomicU64::new(0);
    let sent_down = AtomicU64::new(0);
    let to_upstream = async {
        pump(&mut client_rd, &mut up_wr, &sent_up).await;
        let _ = up_wr.shutdown().await;
        std::future::pending::<()>().await
    };
    let to_client = pump(&mut up_rd, &mut client_wr, &sent_down);
    tokio::select! {
        _ = to_upstream => {}
        _ = to_client => {}
        _ = stop.cancelled() => {}
    }
    (
        sent_up.load(Ordering::Relaxed),
        sent_down.load(Ordering::Relaxed),
    )
}

/// Copies `rd` to `wr` until either ends, counting what was written.
async fn pump<R, W>(rd: &mut R, wr: &mut W, count: &AtomicU64)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if wr.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = wr.flush().await;
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.is_users(offer.public_key).await {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.is_users(key.public_key).await {
            return Ok(Auth::reject());
        }
        if let Some(tx) = self.authed.take() {
            let _ = tx.send(());
        }
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let active = Active::new(&self.active);
        self.sessions.insert(channel.id(), (channel, active));
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        session.channel_success(id)?;
        let Some(path) = fd_forward_path(&command).filter(|p| self.door.is_fleet_socket(p)) else {
            tracing::warn!(command = %crate::escape::display(&command), "front door: refused a command");
            return self.refuse(
                session,
                id,
                "only `fleetctl fd-forward` to the cluster's fleet socket is served here",
            );
        };
        let Some((channel, active)) = self.sessions.remove(&id) else {
            return self.refuse(session, id, "no such session");
        };
        tracing::debug!(path = %crate::escape::display(path), "front door: fd-forward");
        let handle = session.handle();
        let (door, peer, stop) = (self.door.clone(), self.peer, self.stop.clone());
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            Self::serve_api(door, peer, channel, stop, active).await;
            let _ = handle.exit_status_request(id, 0).await;
            let _ = handle.eof(id).await;
            let _ = handle.close(id).await;
        }));
        Ok(())
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(id)?;
        self.refuse(
            session,
            id,
            "no shell here; this is the broker's tunnel for fleetctl",
        )
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(id)
    }

    async fn channel_close(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // A session closed before (or without) its exec request no longer counts as open.
        self.sessions.remove(&id);
        Ok(())
    }

    async fn agent_request(
        &mut self,
        _id: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // The original asks on its first session; nothing here ever uses a forwarded agent.
        Ok(true)
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.door.is_fleet_socket(socket_path) {
            tracing::warn!(
                path = %crate::escape::display(socket_path),
                "front door: refused a socket other than the fleet API's"
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        reply.accept().await;
        let active = Active::new(&self.active);
        tokio::spawn(tracing::Instrument::in_current_span(Self::serve_api(
            self.door.clone(),
            self.peer,
            channel,
            self.stop.clone(),
            active,
        )));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let cfg = &self.door.tunnel.config;
        let port_ok = port_to_connect == 22 || port_to_connect == u32::from(cfg.machine_ssh_port);
        let machine = match host_to_connect.parse::<IpAddr>() {
            Ok(ip) if port_ok => machine_at(&self.door.socket, ip).await,
            _ => None,
        };
        let Some(machine) = machine else {
            tracing::warn!(
                host = %crate::escape::display(host_to_connect),
                port = port_to_connect,
                "front door: refused an address that is not a machine's sshd"
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let record = ForwardRecord::new(
            &self.door,
            self.peer,
            &machine,
            host_to_connect,
            port_to_connect,
        );
        if cfg.read_only {
            tracing::warn!(machine = %machine, "front door: refused a session to a machine of a read-only cluster");
            record
                .write(serde_json::json!({
                    "phase": "refused",
                    "status": 403,
                    "error": "the cluster is read-only in the broker's config",
                }))
                .await;
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let upstream = match self.door.tunnel.link().await {
            Ok(h) => h
                .channel_open_direct_tcpip(host_to_connect, port_to_connect, "127.0.0.1", 0)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let ch = match upstream {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(host = %host_to_connect, error = %e, "front door: the tunnel host could not connect");
                record
                    .write(serde_json::json!({
                        "phase": "refused",
                        "status": 502,
                        "error": e,
                    }))
                    .await;
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return Ok(());
            }
        };
        reply.accept().await;
        record
            .write(serde_json::json!({"phase": "start", "status": 101}))
            .await;
        let active = Active::new(&self.active);
        let stop = self.stop.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _active = active;
            let (up, down) = bridge(channel, DrainedChannel::new(ch), &stop).await;
            let how = if stop.is_cancelled() {
                "the cluster stopped"
            } else {
                "the connection ended"
            };
            record
                .write(serde_json::json!({
                    "phase": "end",
                    "status": 101,
                    "error": how,
                    "bytes_in": up,
                    "bytes_out": down,
                }))
                .await;
        }));
        Ok(())
    }
}

/// The audit lines of one `direct-tcpip` session to a machine: one `session` id, the
/// machine, the address, who asked and when it started.
struct ForwardRecord {
    audit: Arc<AuditLog>,
    caller: crate::audit::Caller,
    what: serde_json::Value,
    started: Instant,
}

impl ForwardRecord {
    fn new(door: &Door, peer: Peer, machine: &str, host: &str, port: u32) -> ForwardRecord {
        ForwardRecord {
            audit: door.audit.clone(),
            caller: crate::audit::Caller::of(peer),
            what: serde_json::json!({
                "kind": "forward",
                "session": crate::audit::session_id(),
                "cluster": door.tunnel.name(),
                "target": {"machine": machine},
                "address": format!("{host}:{port}"),
            }),
            started: Instant::now(),
        }
    }

    async fn write(&self, fields: serde_json::Value) {
        let mut line = crate::audit::session_line(&self.what, fields);
        line["duration_ms"] = (self.started.elapsed().as_millis() as u64).into();
        self.audit.record_as(Some(&self.caller), line).await;
    }
}

/// The ID of the machine of the cluster whose `primaryIP` is `ip`, if there is one.
async fn machine_at(socket: &Path, ip: IpAddr) -> Option<String> {
    let api = FleetClient::new(socket, LOOKUP_TIMEOUT)
        .limit_responses(crate::fleet_client::LOOKUP_MAX_BYTES);
    match tokio::time::timeout(LOOKUP_TIMEOUT, api.machines()).await {
        Ok(Ok(ms)) => ms
            .into_iter()
            .find(|m| m.primary_ip.parse::<IpAddr>().is_ok_and(|p| p == ip))
            .map(|m| m.id),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "front door: cannot list the cluster's machines");
            None
        }
        Err(_) => {
            tracing::warn!(
                "front door: the cluster's machine list did not come within {LOOKUP_TIMEOUT:?}"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The login grace time ends a connection that never authenticates; once authenticated,
    /// only a connection without an open channel for the unused-connection timeout ends.
    #[tokio::test(start_paused = true)]
    async fn connections_end_unauthenticated_or_unused_not_while_a_channel_is_open() {
        let (_authed_tx, authed_rx) = oneshot::channel::<()>();
        let (_active_tx, active_rx) = watch::channel(0usize);
        let started = tokio::time::Instant::now();
        let why = limits(authed_rx, active_rx).await;
        assert_eq!(started.elapsed(), LOGIN_GRACE_TIME);
        assert!(why.contains("login grace"), "{why}");

        let (authed_tx, authed_rx) = oneshot::channel::<()>();
        let active_tx = Arc::new(watch::channel(0usize).0);
        let active_rx = active_tx.subscribe();
        let _ = authed_tx.send(());
        let channel = Active::new(&active_tx);
        let limit = tokio::spawn(limits(authed_rx, active_rx));
        // Ten minutes with a channel open: still served.
        tokio::time::sleep(UNUSED_TIMEOUT * 10).await;
        assert!(!limit.is_finished());
        drop(channel);
        let closed_at = tokio::time::Instant::now();
        let why = limit.await.expect("limits");
        assert_eq!(closed_at.elapsed(), UNUSED_TIMEOUT);
        assert!(why.contains("no channel open"), "{why}");
    }

    #[test]
    fn only_fd_forward_with_one_path_is_recognised() {
        assert_eq!(
            fd_forward_path("fleetctl fd-forward /var/run/fleet.sock"),
            Some("/var/run/fleet.sock")
        );
        for bad in [
            "fleetctl fd-forward",
            "fleetctl fd-forward /a /b",
            "fleetctl fd-forward /a; rm -rf /",
            "sh -c 'fleetctl fd-forward /a'",
            "fleetctl list-units",
        ] {
            assert_eq!(fd_forward_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn authorized_keys_lines_with_options_and_comments() {
        let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
        let text = format!("# c\n\n{k} me@host\nrestrict,command=\"x\" {k}\nnot a key\n");
        assert_eq!(authorized_keys(&text).len(), 2);
    }
}
