//! Dialling one SSH connection: TCP connect to the tunnel host, handshake with the host key
//! checked against the pins under the cluster's policy, then agent/identity authentication.
//! The whole dial is bounded by the caller's deadline (russh sends no keepalive before auth).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{Algorithm, PublicKeyOrCertificate};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::quickack::QuickAck;
use crate::auth::{self, AuthError, KeySource};
use crate::config::{known_hosts_name, HostKeyPolicy, HostPort};
use crate::known_hosts::{self, fingerprint_md5, fingerprint_sha256, HostId, KnownHosts, Verdict};

/// Window per channel: OpenSSH's own (64 packets of 32 KiB), which keeps a bulk transfer
/// on a par with `ssh -L`. A larger one costs the tunnel host: with 16 MiB, its sshd spent
/// 54-62 % more CPU per byte of a 1 GiB transfer than for `ssh -L` beside it (the same with
/// 2 MiB), and on a busy host sshd is what limits the rate (docs/performance.md).
pub const WINDOW_SIZE: u32 = 2 * 1024 * 1024;
/// Window per channel of a nested connection (a machine's sessions). What of a nested
/// connection waits in the daemon's buffer for the tunnel channel under it is bounded by that
/// channel's own window, [`WINDOW_SIZE`], whatever the sessions' windows add up to.
pub(crate) const NESTED_WINDOW_SIZE: u32 = 2 * 1024 * 1024;
/// Largest packet we accept (OpenSSH's default maximum).
pub(crate) const MAX_PACKET: u32 = 32 * 1024;

/// What a dial needs to know, independent of fleet.
#[derive(Debug, Clone)]
pub struct DialSpec {
    /// Shown in every error (`cluster "prod"`).
    pub label: String,
    /// The SSH server.
    pub target: HostPort,
    /// Hops to go through first (`[user@]host[:port]`), each verified and authenticated.
    pub jump: Vec<crate::config::JumpHop>,
    /// The user to log in as.
    pub user: String,
    /// The agent and identity files to authenticate with.
    pub keys: KeySource,
    /// The pin files, in order.
    pub known_hosts: Vec<PathBuf>,
    /// What to do with a key that is not pinned.
    pub policy: HostKeyPolicy,
    /// Keepalive period; `None` for none.
    pub keepalive_interval: Option<Duration>,
    /// Unanswered keepalives before the connection is given up.
    pub keepalive_max: usize,
    /// What a user runs to pin this host's key once checked (shown in refusals).
    pub trust_hint: String,
    /// Serve `auth-agent@openssh.com` channels from the agent (agent forwarding).
    pub forward_agent: bool,
    /// The receive window per channel. A nested connection uses a small one: its bytes
    /// arrive through a drained channel of the tunnel, and only the window (adjusted as the
    /// nested session consumes) keeps a slow session reader from filling that buffer.
    pub window_size: u32,
}

impl DialSpec {
    /// The target as known_hosts names it.
    pub(crate) fn host_id(&self) -> HostId {
        HostId::new(&self.target.host, self.target.port)
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP (or the jump host's channel) could not reach the server.
    #[error("cannot connect to {target}: {reason}")]
    Connect {
        /// `host:port`.
        target: String,
        /// The error.
        reason: String,
    },
    /// The host key was refused: the message names the key, the pins and what to run.
    #[error("{0}")]
    HostKey(String),
    /// A known_hosts file could not be read or written.
    #[error("{0}")]
    KnownHosts(#[from] known_hosts::KnownHostsError),
    /// No key was accepted.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The SSH handshake failed.
    #[error("SSH handshake with {target} failed: {reason}")]
    Ssh {
        /// `host:port`.
        target: String,
        /// The error.
        reason: String,
    },
}

impl DialError {
    /// Errors that retrying cannot fix: they wait for the operator.
    pub(crate) fn is_fatal(&self) -> bool {
        match self {
            DialError::HostKey(_) | DialError::KnownHosts(_) => true,
            DialError::Auth(AuthError::AgentUnreachable { .. }) => false,
            // A locked agent offers no keys, and unlocking it is a fix the daemon can see.
            DialError::Auth(AuthError::EmptyAgent(_)) => false,
            DialError::Auth(AuthError::Transport { .. }) => false,
            DialError::Auth(_) => true,
            _ => false,
        }
    }
}

/// Where `fleet-broker trust` receives the presented key and its verdict.
type Captured = Arc<Mutex<Option<(russh::keys::PublicKey, Verdict)>>>;

/// The client side of one SSH connection. Signals `closed` when the session ends.
pub struct ClientHandler {
    label: String,
    /// The host as the config names it: the only name its key is looked up by.
    host: HostId,
    /// The connected address (`[ip]:port`), consulted only for OpenSSH's CheckHostIP warning.
    address: Option<String>,
    display_addr: String,
    policy: HostKeyPolicy,
    /// The pins, shared with the blocking pool where keys are judged (hashed names cost a
    /// HMAC per line).
    known: Arc<KnownHosts>,
    pin_file: Option<PathBuf>,
    /// Why the host key was refused, for the error the dialer returns.
    refusal: Arc<Mutex<Option<String>>>,
    /// The SHA256 fingerprint of the accepted host key.
    accepted: Arc<Mutex<Option<String>>>,
    /// When set, the presented key is only recorded here and the handshake stops
    /// (`fleet-broker trust`).
    capture: Option<Captured>,
    /// The agent socket to bridge `auth-agent@openssh.com` channels to, when forwarding.
    agent_bridge: Option<PathBuf>,
    trust_hint: String,
    /// Dropped with the handler, i.e. when the connection is gone.
    _closed: watch::Sender<()>,
}

/// Pins `public` for `host` in `file` (accept-new), hashed if `ssh -G` says so: a child
/// process and a file write, both run off the runtime's thread.
async fn pin_off_thread(
    file: &std::path::Path,
    host: &HostId,
    public: &russh::keys::PublicKey,
) -> Result<(), known_hosts::KnownHostsError> {
    let (path, host, public) = (file.to_path_buf(), host.clone(), public.clone());
    tokio::task::spawn_blocking(move || {
        let hashed = crate::local::hash_known_hosts(&host.principal);
        known_hosts::append_pin(&path, &host.lookup, &public, hashed)
    })
    .await
    .map_err(|e| known_hosts::KnownHostsError::Write {
        file: file.to_path_buf(),
        source: std::io::Error::other(format!("pinning was interrupted: {e}")),
    })?
}

/// The pins of `files`, read off the runtime's thread.
async fn load_known_hosts(files: &[PathBuf]) -> Result<KnownHosts, DialError> {
    let owned = files.to_vec();
    match tokio::task::spawn_blocking(move || KnownHosts::load(&owned)).await {
        Ok(r) => Ok(r?),
        // Only a panic or a runtime shutting down ends the read early.
        Err(e) => Err(DialError::Ssh {
            target: files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            reason: format!("reading the pins was interrupted: {e}"),
        }),
    }
}

impl ClientHandler {
    /// OpenSSH's CheckHostIP: a pin under the connected address that contradicts the
    /// trusted key is reported, and changes nothing.
    fn warn_address_contradiction(&self, key: &russh::keys::PublicKey) {
        let Some(address) = &self.address else {
            return;
        };
        for pin in self.known.address_contradicts(address, key) {
            tracing::warn!(
                host = %self.host,
                address = %address,
                pinned = %pin,
                "the host key is trusted under the host's name, but a different key is pinned for its address; the address entry is ignored"
            );
        }
    }
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Judged off the runtime's thread: a large hashed known_hosts costs a HMAC a line.
        let (known, host) = (self.known.clone(), self.host.clone());
        let judged = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                let key = key.clone();
                tokio::task::spawn_blocking(move || (known.check(&host, &key), key)).await
            }
            PublicKeyOrCertificate::Certificate(cert) => {
                let cert = cert.clone();
                tokio::task::spawn_blocking(move || {
                    (
                        known.check_certificate(&host, &cert),
                        russh::keys::PublicKey::from(cert.public_key().clone()),
                    )
                })
                .await
            }
        };
        let Ok((verdict, public)) = judged else {
            if let Ok(mut r) = self.refusal.lock() {
                *r = Some(format!("{}: judging the host key failed", self.label));
            }
            return Ok(false);
        };
        if let Some(c) = &self.capture {
            if let Ok(mut c) = c.lock() {
                *c = Some((public, verdict));
            }
            return Ok(false);
        }
        let fp = fingerprint_sha256(&public);
        let set_refusal = |m: String| {
            if let Ok(mut r) = self.refusal.lock() {
                *r = Some(m);
            }
        };
        let ok = match (verdict, self.policy) {
            (_, HostKeyPolicy::Off) => true,
            (Verdict::Trusted(_), _) => {
                self.warn_address_contradiction(&public);
                true
            }
            (Verdict::Revoked(pin), _) => {
                set_refusal(format!(
                    "{}: host key {} {fp} of {} is marked @revoked at {}:{}; it is never accepted. Ask the host's administrator for its new key",
                    self.label, public.algorithm(), self.display_addr, pin.file.display(), pin.line
                ));
                false
            }
            (Verdict::Changed(pins), _) => {
                let pinned: Vec<String> = pins.iter().map(|p| p.to_string()).collect();
                let first = &pins[0];
                set_refusal(format!(
                    "{label}: HOST KEY CHANGED for {addr}: it presents {alg} {fp} ({md5}), but known_hosts pins {pinned}. Someone may be intercepting the connection. If the host was really re-keyed, check the new fingerprint out of band, remove the old pin (`ssh-keygen -R '{name}' -f {file}`) and {hint}",
                    label = self.label,
                    addr = self.display_addr,
                    alg = public.algorithm(),
                    md5 = fingerprint_md5(&public),
                    pinned = pinned.join(", "),
                    name = self.host.lookup,
                    file = first.file.display(),
                    hint = self.trust_hint,
                ));
                false
            }
            (Verdict::Unknown, HostKeyPolicy::AcceptNew) => match &self.pin_file {
                Some(file) => match pin_off_thread(file, &self.host, &public).await {
                    Ok(()) => {
                        tracing::warn!(target_host = %self.display_addr, fingerprint = %fp, file = %file.display(), "pinned previously unknown host key (accept-new)");
                        true
                    }
                    Err(e) => {
                        set_refusal(format!("{}: {e}", self.label));
                        false
                    }
                },
                None => false,
            },
            (Verdict::Unknown, _) => {
                let file = self.pin_file.as_ref().map_or_else(
                    || "~/.fleetctl/known_hosts".into(),
                    |f| f.display().to_string(),
                );
                set_refusal(format!(
                    "{label}: host {addr} is not in known_hosts ({file}) and host_key_checking is strict; it presents {alg} {fp}. Check that fingerprint with the host's administrator, then {hint}",
                    label = self.label,
                    addr = self.display_addr,
                    alg = public.algorithm(),
                    hint = self.trust_hint,
                ));
                false
            }
        };
        if ok {
            if let Ok(mut a) = self.accepted.lock() {
                *a = Some(fp);
            }
        }
        Ok(ok)
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(agent) = self.agent_bridge.clone() else {
            tracing::warn!(host = %self.display_addr, "refused an agent channel: agent forwarding was not requested");
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        match tokio::net::UnixStream::connect(&agent).await {
            Ok(mut local) => {
                reply.accept().await;
                tokio::spawn(tracing::Instrument::in_current_span(async move {
                    let mut remote = crate::tunnel::channel::DrainedChannel::new(channel);
                    let _ = tokio::io::copy_bidirectional(&mut remote, &mut local).await;
                }));
            }
            Err(e) => {
                tracing::warn!(agent = %agent.display(), error = %e, "cannot reach the agent for a forwarded request");
                reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }
}

/// A live, authenticated connection.
pub struct Connection {
    /// russh's handle: channels are opened on it.
    pub handle: Handle<ClientHandler>,
    /// Changes (closes) when the connection ends.
    pub closed: watch::Receiver<()>,
    /// `SHA256:…` of the server's key.
    pub host_key_fingerprint: String,
    /// The address as shown in messages.
    pub peer: String,
    /// The jump hosts' connections, kept open as long as this one.
    pub hops: Vec<Handle<ClientHandler>>,
}

fn preferred_keys(pinned: &[Algorithm]) -> Vec<Algorithm> {
    let mut out: Vec<Algorithm> = pinned.to_vec();
    for a in russh::Preferred::DEFAULT.key.iter() {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// AES-GCM first where the CPU has AES instructions (it is then the fastest AEAD), else
/// russh's default order (ChaCha20-Poly1305 first).
fn preferred_ciphers() -> Vec<russh::cipher::Name> {
    let mut order: Vec<russh::cipher::Name> = russh::Preferred::DEFAULT.cipher.to_vec();
    #[cfg(target_arch = "x86_64")]
    let aes = std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq");
    #[cfg(target_arch = "aarch64")]
    let aes = std::arch::is_aarch64_feature_detected!("aes");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let aes = false;
    if aes {
        order.retain(|c| *c != russh::cipher::AES_256_GCM);
        order.insert(0, russh::cipher::AES_256_GCM);
    }
    order
}

/// The client config for a spec (shared by the tunnel and nested hops).
pub(crate) fn client_config(spec: &DialSpec, pinned: &[Algorithm]) -> client::Config {
    // Certificates are asked for first, as `ssh` does by default; one that no
    // `@cert-authority` entry vouches for is judged by its plain key.
    let preferred = russh::Preferred {
        key: preferred_keys(pinned).into(),
        host_key_certificates: preferred_keys(pinned).into(),
        cipher: preferred_ciphers().into(),
        ..Default::default()
    };
    client::Config {
        preferred,
        nodelay: true,
        keepalive_interval: spec.keepalive_interval,
        keepalive_max: spec.keepalive_max,
        window_size: spec.window_size,
        maximum_packet_size: MAX_PACKET,
        // Every reader gives its channel's window back for what it consumed
        // (`tunnel::channel`, exec sessions), so a slow one holds only its own channel.
        manual_window_release: true,
        ..Default::default()
    }
}

async fn tcp_connect(target: &HostPort) -> Result<TcpStream, DialError> {
    let err = |reason: String| DialError::Connect {
        target: target.to_string(),
        reason,
    };
    let addrs: Vec<_> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| err(format!("cannot resolve {}: {e}", target.host)))?
        .collect();
    let mut last = String::from("no addresses");
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Err(err(last))
}

/// What `fleet-broker trust` learns about a host before pinning it.
pub(crate) struct PresentedKey {
    pub key: russh::keys::PublicKey,
    /// The name the host is looked up and pinned by.
    pub host: HostId,
    pub verdict: Verdict,
}

/// Connects far enough to see the host key, then stops; no credentials are offered.
pub(crate) async fn presented_key(spec: &DialSpec) -> Result<PresentedKey, DialError> {
    let (tcp, _address) = connect_tcp(spec).await?;
    presented_key_over(spec, tcp).await
}

/// [`presented_key`] over any byte stream (a channel to a machine, for nested hops).
pub(crate) async fn presented_key_over<S>(
    spec: &DialSpec,
    stream: S,
) -> Result<PresentedKey, DialError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let known = load_known_hosts(&spec.known_hosts).await?;
    let capture = Arc::new(Mutex::new(None));
    let tcp = stream;
    let host = spec.host_id();
    let pinned = known.pinned_algorithms(&host);
    let config = client_config(spec, &pinned);
    let (closed_tx, _closed_rx) = watch::channel(());
    let handler = ClientHandler {
        label: spec.label.clone(),
        host: host.clone(),
        address: None,
        display_addr: spec.target.to_string(),
        policy: spec.policy,
        known: Arc::new(known),
        pin_file: None,
        refusal: Arc::new(Mutex::new(None)),
        accepted: Arc::new(Mutex::new(None)),
        capture: Some(capture.clone()),
        agent_bridge: None,
        trust_hint: spec.trust_hint.clone(),
        _closed: closed_tx,
    };
    let result = client::connect_stream(Arc::new(config), tcp, handler).await;
    let seen = capture.lock().ok().and_then(|mut c| c.take());
    match (seen, result) {
        (Some((key, verdict)), _) => Ok(PresentedKey { key, host, verdict }),
        (None, Err(e)) => Err(DialError::Ssh {
            target: spec.target.to_string(),
            reason: e.to_string(),
        }),
        (None, Ok(_)) => Err(DialError::Ssh {
            target: spec.target.to_string(),
            reason: "the server presented no host key".into(),
        }),
    }
}

/// Connects to the spec's target; returns the stream and the connected address as
/// known_hosts spells it (`[ip]:port`).
async fn connect_tcp(spec: &DialSpec) -> Result<(TcpStream, String), DialError> {
    let tcp = tcp_connect(&spec.target).await?;
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().map_err(|e| DialError::Connect {
        target: spec.target.to_string(),
        reason: e.to_string(),
    })?;
    Ok((tcp, known_hosts_name(&peer.ip().to_string(), peer.port())))
}

/// Dials, verifies and authenticates, through the jump hosts if any. The caller bounds it
/// with a timeout.
pub async fn dial(spec: &DialSpec) -> Result<Connection, DialError> {
    if spec.jump.is_empty() {
        return dial_direct(spec).await;
    }
    let hop_spec = |hop: &crate::config::JumpHop, i: usize| DialSpec {
        label: format!("{} jump host {}", spec.label, i + 1),
        target: hop.target.clone(),
        jump: Vec::new(),
        user: hop.user.clone().unwrap_or_else(|| spec.user.clone()),
        forward_agent: false,
        ..spec.clone()
    };
    let mut hops = Vec::new();
    let mut conn = dial_direct(&hop_spec(&spec.jump[0], 0)).await?;
    let last = DialSpec {
        jump: Vec::new(),
        ..spec.clone()
    };
    for i in 1..=spec.jump.len() {
        let next = match spec.jump.get(i) {
            Some(hop) => hop_spec(hop, i),
            None => last.clone(),
        };
        let ch = conn
            .handle
            .channel_open_direct_tcpip(
                next.target.host.clone(),
                u32::from(next.target.port),
                "127.0.0.1",
                0,
            )
            .await
            .map_err(|e| DialError::Connect {
                target: next.target.to_string(),
                reason: format!("jump host {} could not connect: {e}", conn.peer),
            })?;
        let via = conn.peer.clone();
        hops.push(conn.handle);
        hops.extend(conn.hops);
        conn = handshake(
            &next,
            crate::tunnel::channel::DrainedChannel::new(ch),
            None,
            format!("{} via {via}", next.target),
        )
        .await?;
    }
    conn.hops = hops;
    Ok(conn)
}

async fn dial_direct(spec: &DialSpec) -> Result<Connection, DialError> {
    let (tcp, address) = connect_tcp(spec).await?;
    let peer = tcp.peer_addr().map_err(|e| DialError::Connect {
        target: spec.target.to_string(),
        reason: e.to_string(),
    })?;
    let display_addr = if spec.target.host == peer.ip().to_string() {
        spec.target.to_string()
    } else {
        format!("{} ({peer})", spec.target)
    };
    handshake(spec, QuickAck::new(tcp), Some(address), display_addr).await
}

/// SSH handshake, host key check and authentication over any byte stream (a TCP socket, or
/// a channel of another connection for a nested hop). The host key is looked up by the
/// spec's target alone; `address` is the connected address, consulted only for a warning.
pub(crate) async fn handshake<S>(
    spec: &DialSpec,
    stream: S,
    address: Option<String>,
    display_addr: String,
) -> Result<Connection, DialError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let known = if spec.policy == HostKeyPolicy::Off {
        KnownHosts::default()
    } else {
        load_known_hosts(&spec.known_hosts).await?
    };
    let host = spec.host_id();
    let pinned = known.pinned_algorithms(&host);
    let config = client_config(spec, &pinned);
    let (closed_tx, closed_rx) = watch::channel(());
    let refusal = Arc::new(Mutex::new(None));
    let accepted = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        label: spec.label.clone(),
        host,
        address: address.filter(|a| *a != spec.target.known_hosts_name()),
        display_addr: display_addr.clone(),
        policy: spec.policy,
        known: Arc::new(known),
        pin_file: spec.known_hosts.first().cloned(),
        refusal: refusal.clone(),
        accepted: accepted.clone(),
        capture: None,
        agent_bridge: if spec.forward_agent {
            spec.keys.agent.clone()
        } else {
            None
        },
        trust_hint: spec.trust_hint.clone(),
        _closed: closed_tx,
    };
    let target = spec.target.to_string();
    let mut handle = match client::connect_stream(Arc::new(config), stream, handler).await {
        Ok(h) => h,
        Err(e) => {
            if let Some(msg) = refusal.lock().ok().and_then(|mut r| r.take()) {
                return Err(DialError::HostKey(msg));
            }
            return Err(DialError::Ssh {
                target,
                reason: e.to_string(),
            });
        }
    };
    auth::authenticate(
        &mut handle,
        &spec.user,
        &spec.keys,
        &format!("{} ({})", target, spec.user),
    )
    .await?;
    let host_key_fingerprint = accepted
        .lock()
        .ok()
        .and_then(|a| a.clone())
        .unwrap_or_default();
    Ok(Connection {
        handle,
        closed: closed_rx,
        host_key_fingerprint,
        peer: display_addr,
        hops: Vec::new(),
    })
}
