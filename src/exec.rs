//! Exec sessions on cluster machines, for `fleetctl ssh|journal|status`.
//!
//! A session's target is resolved through the cluster's fleet API (a machine ID prefix, a
//! unit, either of those, or the tunnel host itself). A machine other than the tunnel host is
//! reached by a nested SSH connection carried over a `direct-tcpip` channel of the tunnel,
//! verified end to end with the cluster's pins and policy and authenticated by the agent. Nested
//! connections are pooled per machine and user and reused while they have sessions or were
//! used in the last minute; a connection carries at most [`SESSIONS_PER_CONNECTION`] sessions
//! and, unless `interactive_session = "off"`, one interactive (pty) session that makes the
//! machine's sshd send without Nagle delays, so sshd's `MaxSessions` (10) is never hit. Knows nothing of the CLI; speaks frames
//! (`control::frame`) to whoever drives the session.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use russh::client::{Handle, Msg};
use russh::{Channel, ChannelMsg, Sig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{known_hosts_name, HostPort, InteractiveSession};
use crate::control::frame::{read_frame, write_frame, Frame};
use crate::fleet::client::FleetClient;
use crate::proxy::DrainedChannel;
use crate::tunnel::dial::{self, ClientHandler, DialSpec};
use crate::tunnel::{open_interactive, Tunnel};

/// Sessions one SSH connection carries at once (sshd's default `MaxSessions` is 10).
pub const SESSIONS_PER_CONNECTION: usize = 8;
/// An idle nested connection is closed after this long.
pub const NESTED_IDLE: Duration = Duration::from_secs(60);
/// Bound on reading the exec request body.
const MAX_REQUEST: usize = 64 * 1024;
/// Bound on the fleet API lookups of target resolution.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a session runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecTarget {
    /// A machine ID or unique prefix.
    Machine(String),
    /// The machine a (non-global) unit is scheduled to.
    Unit(String),
    /// A machine ID prefix or a unit, whichever matches (`fleetctl ssh TARGET`).
    Auto(String),
    /// The tunnel host itself.
    TunnelHost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

/// The JSON body of `POST /v1/clusters/NAME/exec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub target: ExecTarget,
    /// The remote command line; `None` (and no `action`) starts a login shell.
    #[serde(default)]
    pub command: Option<String>,
    /// A command the daemon builds (`status`, `journal`); excludes `command`.
    #[serde(default)]
    pub action: Option<crate::remote_command::RemoteAction>,
    #[serde(default)]
    pub pty: Option<PtyRequest>,
    #[serde(default)]
    pub forward_agent: bool,
    /// Overrides the cluster's user (`--ssh-username`).
    #[serde(default)]
    pub user: Option<String>,
    /// Overrides the cluster's `machine_ssh_port` (`--ssh-port`).
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// Bounds session setup (`--ssh-timeout`), seconds.
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

/// Why a session could not start: `kind` is `resolve` (the target), `ssh` (the hop) or
/// `request` (the request itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ExecError {
    pub kind: String,
    pub message: String,
}

impl ExecError {
    fn resolve(m: impl Into<String>) -> ExecError {
        ExecError {
            kind: "resolve".into(),
            message: m.into(),
        }
    }
    fn ssh(m: impl Into<String>) -> ExecError {
        ExecError {
            kind: "ssh".into(),
            message: m.into(),
        }
    }
    pub fn request(m: impl Into<String>) -> ExecError {
        ExecError {
            kind: "request".into(),
            message: m.into(),
        }
    }
    fn forbidden(m: impl Into<String>) -> ExecError {
        ExecError {
            kind: "forbidden".into(),
            message: m.into(),
        }
    }
    pub fn status(&self) -> u16 {
        match self.kind.as_str() {
            "resolve" => 404,
            "request" => 400,
            "forbidden" => 403,
            _ => 502,
        }
    }
}

/// A presented host key and its standing, as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKeyReport {
    pub machine: String,
    /// The known_hosts name the key is pinned under.
    pub name: String,
    /// `type base64`, as a known_hosts line carries it.
    pub key: String,
    pub fingerprint: String,
    pub md5: String,
    /// `trusted`, `unknown`, `changed` or `revoked`.
    pub verdict: String,
    /// Where the host is pinned now (`file:line type fingerprint`).
    pub pins: Vec<String>,
}

impl HostKeyReport {
    fn new(machine: String, seen: &dial::PresentedKey) -> HostKeyReport {
        use crate::known_hosts::{fingerprint_md5, fingerprint_sha256, Verdict};
        let (verdict, pins) = match &seen.verdict {
            Verdict::Trusted(p) => ("trusted", vec![p.to_string()]),
            Verdict::Revoked(p) => ("revoked", vec![p.to_string()]),
            Verdict::Changed(ps) => ("changed", ps.iter().map(|p| p.to_string()).collect()),
            Verdict::Unknown => ("unknown", vec![]),
        };
        let key = seen
            .key
            .to_openssh()
            .map(|k| k.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        HostKeyReport {
            machine,
            name: seen.host.lookup.clone(),
            key,
            fingerprint: fingerprint_sha256(&seen.key),
            md5: fingerprint_md5(&seen.key),
            verdict: verdict.into(),
            pins,
        }
    }
}

/// The longest session setup a request may ask for (`--ssh-timeout`).
const MAX_SETUP_TIMEOUT: Duration = Duration::from_secs(3600);

/// A resolved target.
#[derive(Debug, Clone)]
enum Place {
    Tunnel,
    Machine { id: String, ip: String },
}

/// A machine as a place to dial. Its `primaryIP` comes from the fleet API, which anyone who
/// can write to the cluster's etcd controls: only an IP address is dialled, never a name or a
/// pattern that a known_hosts entry or the tunnel host's resolver would read differently. A
/// machine without one gets fleetctl's "Could not determine address of machine.".
fn machine_place(m: &crate::fleet::schema::Machine) -> Place {
    let ip = match m.primary_ip.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => {
            if !m.primary_ip.is_empty() {
                tracing::warn!(machine = %m.id, primary_ip = ?m.primary_ip, "the fleet API reports a primaryIP that is not an IP address; not dialling it");
            }
            String::new()
        }
    };
    Place::Machine {
        id: m.id.clone(),
        ip,
    }
}

type SshHandle = Arc<Handle<ClientHandler>>;

/// A pooled connection and how busy it is.
struct Pooled {
    handle: SshHandle,
    active: AtomicUsize,
    last_used: Mutex<Instant>,
    /// The connection's interactive session (`interactive_session`), which makes the
    /// machine's sshd send without Nagle delays; held as long as the connection.
    _interactive: Option<Channel<Msg>>,
}

/// Held while a session runs; frees its slot on drop.
pub struct Slot {
    pooled: Option<Arc<Pooled>>,
    /// A connection of this session alone (the tunnel host, agent forwarding), closed with it.
    own: Option<SshHandle>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(p) = &self.pooled {
            if let Ok(mut t) = p.last_used.lock() {
                *t = Instant::now();
            }
            p.active.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(h) = self.own.take() {
            tokio::spawn(async move {
                let _ = h
                    .disconnect(russh::Disconnect::ByApplication, "", "en")
                    .await;
            });
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct PoolKey {
    ip: String,
    port: u16,
    user: String,
}

/// Exec sessions of one cluster.
pub struct Exec {
    tunnel: Arc<Tunnel>,
    /// The cluster socket, for the fleet API lookups of target resolution.
    socket: PathBuf,
    agent: Option<PathBuf>,
    pool: Mutex<HashMap<PoolKey, Vec<Arc<Pooled>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Exec {
    pub fn new(tunnel: Arc<Tunnel>, socket: PathBuf, agent: Option<PathBuf>) -> Arc<Exec> {
        let exec = Arc::new(Exec {
            tunnel,
            socket,
            agent,
            pool: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&exec);
        tokio::spawn(sweep(weak));
        exec
    }

    fn short(id: &str) -> &str {
        id.get(..8).unwrap_or(id)
    }

    async fn resolve(&self, target: &ExecTarget) -> Result<Place, ExecError> {
        let cfg = &self.tunnel.config;
        let is_tunnel_name = |s: &str| s == cfg.tunnel.host || s == cfg.tunnel.to_string();
        if let ExecTarget::TunnelHost = target {
            return Ok(Place::Tunnel);
        }
        if let ExecTarget::Auto(s) | ExecTarget::Machine(s) = target {
            if is_tunnel_name(s) {
                return Ok(Place::Tunnel);
            }
        }
        let api = FleetClient::new(&self.socket, LOOKUP_TIMEOUT);
        // A unit target needs the unit and the machine list; both are asked at once.
        let unit_name = match target {
            ExecTarget::Unit(name) => Some(name.clone()),
            ExecTarget::Auto(s) => Some(crate::cli::units::unit_name_mangle(s)),
            _ => None,
        };
        let (machines, unit) = tokio::join!(api.machines(), async {
            match &unit_name {
                Some(name) => Some(api.unit(name).await),
                None => None,
            }
        });
        let machines = machines.map_err(|e| ExecError::resolve(e.to_string()))?;
        let by_machine = |prefix: &str| -> Result<Option<Place>, ExecError> {
            let mut found = machines.iter().filter(|m| m.id.starts_with(prefix));
            let Some(m) = found.next() else {
                return Ok(None);
            };
            if found.next().is_some() {
                return Err(ExecError::resolve("found more than one machine"));
            }
            Ok(Some(machine_place(m)))
        };
        let by_unit = |u: &Option<crate::fleet::schema::Unit>| -> Result<Option<Place>, ExecError> {
            let Some(u) = u else { return Ok(None) };
            if crate::fleet::unit_file::is_global(&u.options) {
                return Err(ExecError::resolve("global units unsupported"));
            }
            let m = machines.iter().find(|m| m.id == u.machine_id);
            Ok(m.map(machine_place))
        };
        let place = match target {
            ExecTarget::Machine(prefix) => {
                by_machine(prefix)?.ok_or_else(|| ExecError::resolve("machine does not exist"))?
            }
            ExecTarget::Unit(_) => {
                let u = unit
                    .transpose()
                    .map_err(|e| ExecError::resolve(e.to_string()))?
                    .flatten();
                if u.is_none() {
                    return Err(ExecError::resolve("unit does not exist"));
                }
                by_unit(&u)?
                    .ok_or_else(|| ExecError::resolve("Could not determine address of machine."))?
            }
            ExecTarget::Auto(s) => {
                let machine = by_machine(s).unwrap_or(None);
                let unit = unit.and_then(Result::ok).flatten();
                let unit = by_unit(&unit).unwrap_or(None);
                match (machine, unit) {
                    (Some(_), Some(_)) => {
                        return Err(ExecError::resolve(format!(
                            "ambiguous argument, both machine and unit found for `{s}`.\nPlease use flag `-m` or `-u` to refine the search"
                        )))
                    }
                    (Some(p), None) | (None, Some(p)) => p,
                    (None, None) => return Err(ExecError::resolve("could not find matching unit or machine")),
                }
            }
            ExecTarget::TunnelHost => Place::Tunnel,
        };
        if let Place::Machine { ip, .. } = &place {
            if ip.is_empty() {
                return Err(ExecError::resolve(
                    "Could not determine address of machine.",
                ));
            }
        }
        Ok(place)
    }

    fn spec(&self, label: String, target: HostPort, user: String, forward_agent: bool) -> DialSpec {
        let c = &self.tunnel.config;
        DialSpec {
            label,
            target,
            jump: Vec::new(),
            user,
            keys: crate::auth::KeySource {
                agent: self.agent.clone(),
                identity_files: c.identity_files.clone(),
            },
            known_hosts: c.known_hosts.clone(),
            policy: c.host_key_checking,
            keepalive_interval: Some(c.keepalive_interval),
            keepalive_max: c.keepalive_max,
            trust_hint: format!("pin it with `fleet-broker trust {} --machine ID`", c.name),
            forward_agent,
            window_size: dial::NESTED_WINDOW_SIZE,
        }
    }

    /// The host key a machine presents, and what the pins say of it (`fleet-broker trust
    /// --machine`). No credentials are offered.
    pub async fn machine_key(
        &self,
        prefix: &str,
        ssh_port: Option<u16>,
    ) -> Result<HostKeyReport, ExecError> {
        let place = self
            .resolve(&ExecTarget::Machine(prefix.to_string()))
            .await?;
        let Place::Machine { id, ip } = place else {
            return Err(ExecError::resolve(
                "that is the tunnel host; use `fleet-broker trust CLUSTER`",
            ));
        };
        let port = ssh_port.unwrap_or(self.tunnel.config.machine_ssh_port);
        let tunnel = self
            .tunnel
            .link()
            .await
            .map_err(|e| ExecError::ssh(format!("cluster {:?}: {e}", self.tunnel.name())))?;
        let ch = tunnel
            .channel_open_direct_tcpip(ip.as_str(), u32::from(port), "127.0.0.1", 0)
            .await
            .map_err(|e| {
                ExecError::ssh(format!(
                    "the tunnel host could not connect to {}: {e}",
                    known_hosts_name(&ip, port)
                ))
            })?;
        let target = HostPort {
            host: ip.clone(),
            port,
        };
        let spec = self.spec(
            format!("machine {}", Self::short(&id)),
            target.clone(),
            self.tunnel.config.user.clone(),
            false,
        );
        let seen = tokio::time::timeout(
            self.tunnel.config.connect_timeout,
            dial::presented_key_over(&spec, DrainedChannel::new(ch)),
        )
        .await
        .map_err(|_| ExecError::ssh("timed out waiting for the machine's host key"))?
        .map_err(|e| ExecError::ssh(e.to_string()))?;
        Ok(HostKeyReport::new(id, &seen))
    }

    /// Dials a machine through the tunnel: direct-tcpip to `ip:port`, then SSH end to end.
    async fn dial_nested(
        &self,
        id: &str,
        ip: &str,
        port: u16,
        user: &str,
        forward_agent: bool,
    ) -> Result<SshHandle, ExecError> {
        let tunnel = self
            .tunnel
            .link()
            .await
            .map_err(|e| ExecError::ssh(format!("cluster {:?}: {e}", self.tunnel.name())))?;
        let ch = tunnel
            .channel_open_direct_tcpip(ip, u32::from(port), "127.0.0.1", 0)
            .await
            .map_err(|e| {
                ExecError::ssh(format!(
                    "the tunnel host could not connect to {}: {e}",
                    known_hosts_name(ip, port)
                ))
            })?;
        let label = format!(
            "cluster {:?} machine {}",
            self.tunnel.name(),
            Self::short(id)
        );
        let target = HostPort {
            host: ip.to_string(),
            port,
        };
        let spec = self.spec(label, target.clone(), user.to_string(), forward_agent);
        let conn = dial::handshake(&spec, DrainedChannel::new(ch), None, target.to_string())
            .await
            .map_err(|e| ExecError::ssh(e.to_string()))?;
        Ok(Arc::new(conn.handle))
    }

    /// A connection with a free session slot for this place and user.
    async fn connection(
        &self,
        place: &Place,
        user: &str,
        port: u16,
        forward_agent: bool,
    ) -> Result<(SshHandle, Slot), ExecError> {
        let cfg = &self.tunnel.config;
        match place {
            // A session on the tunnel host gets a connection of its own: on the tunnel's, an
            // unread session would fill its channel's queue and russh would stop reading the
            // whole connection, stalling every API request of the cluster.
            Place::Tunnel => {
                let label = format!("cluster {:?} tunnel host", self.tunnel.name());
                let mut spec =
                    self.spec(label, cfg.tunnel.clone(), user.to_string(), forward_agent);
                spec.jump = cfg.jump.clone();
                let conn = dial::dial(&spec)
                    .await
                    .map_err(|e| ExecError::ssh(e.to_string()))?;
                let h = Arc::new(conn.handle);
                Ok((
                    h.clone(),
                    Slot {
                        pooled: None,
                        own: Some(h),
                    },
                ))
            }
            Place::Machine { id, ip } if forward_agent => {
                let h = self.dial_nested(id, ip, port, user, true).await?;
                Ok((
                    h.clone(),
                    Slot {
                        pooled: None,
                        own: Some(h),
                    },
                ))
            }
            Place::Machine { id, ip } => {
                let key = PoolKey {
                    ip: ip.clone(),
                    port,
                    user: user.to_string(),
                };
                {
                    let mut pool = lock(&self.pool);
                    let conns = pool.entry(key.clone()).or_default();
                    conns.retain(|p| !p.handle.is_closed());
                    for p in conns.iter() {
                        let n = p.active.fetch_add(1, Ordering::SeqCst);
                        if n < SESSIONS_PER_CONNECTION {
                            return Ok((
                                p.handle.clone(),
                                Slot {
                                    pooled: Some(p.clone()),
                                    own: None,
                                },
                            ));
                        }
                        p.active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let handle = self.dial_nested(id, ip, port, user, false).await?;
                let interactive = match cfg.interactive_session {
                    InteractiveSession::Auto => {
                        open_interactive(&handle, self.tunnel.probe_timeout()).await
                    }
                    InteractiveSession::Off => None,
                };
                let pooled = Arc::new(Pooled {
                    handle: handle.clone(),
                    active: AtomicUsize::new(1),
                    last_used: Mutex::new(Instant::now()),
                    _interactive: interactive,
                });
                lock(&self.pool)
                    .entry(key)
                    .or_default()
                    .push(pooled.clone());
                Ok((
                    handle,
                    Slot {
                        pooled: Some(pooled),
                        own: None,
                    },
                ))
            }
        }
    }

    /// The command line a request runs (`None`: a shell). A read-only cluster runs only
    /// the commands the daemon builds itself (`status`, `journal`).
    fn command_line(&self, req: &ExecRequest) -> Result<Option<String>, ExecError> {
        match (&req.action, &req.command) {
            (Some(_), Some(_)) => Err(ExecError::request(
                "an exec request has either an action or a command, not both",
            )),
            (Some(action), None) => Ok(Some(action.command_line())),
            (None, command) if self.tunnel.config.read_only => Err(ExecError::forbidden(format!(
                "cluster {:?} is read-only in the broker's config: {} on its machines is refused (status and journal work)",
                self.tunnel.name(),
                if command.is_some() { "running a command" } else { "a shell" }
            ))),
            (None, command) => Ok(command.clone()),
        }
    }

    /// Resolves the target, connects and starts the remote command (or shell).
    pub async fn start(&self, req: &ExecRequest) -> Result<Session, ExecError> {
        let command = self.command_line(req)?;
        let setup = async {
            let place = self.resolve(&req.target).await?;
            let cfg = &self.tunnel.config;
            let user = req.user.clone().unwrap_or_else(|| cfg.user.clone());
            let port = req.ssh_port.unwrap_or(cfg.machine_ssh_port);
            let (handle, slot) = self
                .connection(&place, &user, port, req.forward_agent)
                .await?;
            let fail = |what: &str, e: russh::Error| ExecError::ssh(format!("{what}: {e}"));
            let channel = handle
                .channel_open_session()
                .await
                .map_err(|e| fail("cannot open a session", e))?;
            if req.forward_agent {
                channel
                    .agent_forward(false)
                    .await
                    .map_err(|e| fail("agent forwarding", e))?;
            }
            if let Some(p) = &req.pty {
                channel
                    .request_pty(false, &p.term, p.cols, p.rows, 0, 0, &[])
                    .await
                    .map_err(|e| fail("pty request", e))?;
            }
            match &command {
                Some(cmd) => channel
                    .exec(true, cmd.as_bytes())
                    .await
                    .map_err(|e| fail("exec", e))?,
                None => channel
                    .request_shell(true)
                    .await
                    .map_err(|e| fail("shell", e))?,
            }
            tracing::info!(cluster = %cfg.name, target = ?req.target, user = %user, pty = req.pty.is_some(), "exec session started");
            Ok(Session {
                channel,
                _slot: slot,
            })
        };
        // Any number a client sends is bounded here; none can overflow a deadline.
        let limit = req
            .timeout_secs
            .filter(|s| *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .map(|d| d.min(MAX_SETUP_TIMEOUT))
            .unwrap_or(self.tunnel.config.connect_timeout * 2);
        match tokio::time::timeout(limit, setup).await {
            Ok(r) => r,
            Err(_) => Err(ExecError::ssh(format!(
                "timed out while initiating SSH connection ({limit:?})"
            ))),
        }
    }
}

/// Closes idle nested connections.
async fn sweep(exec: Weak<Exec>) {
    loop {
        tokio::time::sleep(NESTED_IDLE / 4).await;
        let Some(exec) = exec.upgrade() else { return };
        let mut idle = Vec::new();
        {
            let mut pool = lock(&exec.pool);
            for conns in pool.values_mut() {
                conns.retain(|p| {
                    let unused = p.active.load(Ordering::SeqCst) == 0
                        && lock(&p.last_used).elapsed() >= NESTED_IDLE;
                    if unused || p.handle.is_closed() {
                        idle.push(p.handle.clone());
                        false
                    } else {
                        true
                    }
                });
            }
            pool.retain(|_, v| !v.is_empty());
        }
        for h in idle {
            let _ = h
                .disconnect(russh::Disconnect::ByApplication, "idle", "en")
                .await;
        }
    }
}

/// A started remote command.
pub struct Session {
    channel: Channel<Msg>,
    _slot: Slot,
}

fn sig(name: &str) -> Sig {
    match name.trim_start_matches("SIG") {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.to_string()),
    }
}

fn sig_name(s: &Sig) -> String {
    match s {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(c) => c.clone(),
    }
}

impl Session {
    /// Pumps frames between `io` (the client) and the remote command until it exits or the
    /// client goes away; a client that goes away ends the remote command.
    pub async fn run<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Session { channel, _slot } = self;
        let (mut rd, mut wr) = tokio::io::split(io);
        let (mut read_half, write_half) = channel.split();
        let write_half = Arc::new(write_half);
        let input_half = write_half.clone();
        // Client → remote.
        let input = tokio::spawn(async move {
            loop {
                match read_frame(&mut rd).await {
                    Ok(Some(Frame::Stdin(b))) => {
                        if input_half.data_bytes(b).await.is_err() {
                            return false;
                        }
                    }
                    Ok(Some(Frame::StdinEof)) => {
                        let _ = input_half.eof().await;
                    }
                    Ok(Some(Frame::Resize { cols, rows })) => {
                        let _ = input_half.window_change(cols, rows, 0, 0).await;
                    }
                    Ok(Some(Frame::Signal(name))) => {
                        let _ = input_half.signal(sig(&name)).await;
                    }
                    Ok(Some(_)) => {}
                    // The client went away.
                    Ok(None) | Err(_) => return true,
                }
            }
        });
        // Remote → client.
        let mut input = input;
        let mut exit: Option<Frame> = None;
        let mut client_ok = true;
        let mut client_gone = false;
        loop {
            let msg = tokio::select! {
                m = read_half.wait() => m,
                r = &mut input, if !client_gone => {
                    // The client closed its side (or stdin could not be delivered): end the
                    // remote command rather than leave it running.
                    client_gone = true;
                    if matches!(r, Ok(true)) {
                        client_ok = false;
                    }
                    break;
                }
            };
            let frame = match msg {
                Some(ChannelMsg::Data { data }) => Some(Frame::Stdout(data)),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => Some(Frame::Stderr(data)),
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    exit = Some(Frame::Exit(exit_status));
                    None
                }
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    exit = Some(Frame::ExitSignal(sig_name(&signal_name)));
                    None
                }
                Some(ChannelMsg::Failure) => {
                    exit = Some(Frame::Error("the server refused to run the command".into()));
                    None
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => None,
            };
            if let Some(f) = frame {
                if write_frame(&mut wr, &f).await.is_err() {
                    client_ok = false;
                    client_gone = true;
                    break;
                }
            }
        }
        if client_gone && exit.is_none() {
            let _ = write_half.signal(Sig::TERM).await;
            let _ = write_half.signal(Sig::HUP).await;
        }
        let _ = write_half.close().await;
        input.abort();
        if client_ok {
            let last = exit.unwrap_or_else(|| {
                Frame::Error(
                    "the SSH session ended without an exit status (connection lost?)".into(),
                )
            });
            let _ = write_frame(&mut wr, &last).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
        }
    }
}

/// Reads and validates an exec request body.
pub fn parse_request(body: &[u8]) -> Result<ExecRequest, ExecError> {
    if body.len() > MAX_REQUEST {
        return Err(ExecError::request("exec request too large"));
    }
    serde_json::from_slice(body).map_err(|e| ExecError::request(format!("bad exec request: {e}")))
}
