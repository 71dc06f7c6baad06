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
//! `front_door_authorized_keys`. Loopback TCP is reachable by every local user, so a
//! connection whose socket belongs to another uid is closed before the handshake when the
//! kernel's socket diagnostics can tell (`local::tcp_peer_uid`).
//!
//! The host key is generated once, in the state directory (0600), and shared by every
//! cluster's front door; `fleet-broker trust --front-door NAME` pins it in
//! `~/.fleetctl/known_hosts`, the original's default file.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Endpoint;
use crate::fleet_client::FleetClient;
use crate::tunnel::channel::DrainedChannel;
use crate::tunnel::Tunnel;

/// The fleet socket path the original fleetctl uses when its endpoint is the default.
const DEFAULT_FLEET_SOCKET: &str = "/var/run/fleet.sock";
/// Bound on the machine lookup that decides whether a `direct-tcpip` target is a machine.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
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
}

impl Door {
    /// A front door for the cluster behind `tunnel`, with `host_key`.
    pub(crate) fn new(
        tunnel: Arc<Tunnel>,
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
            nodelay: true,
            ..Default::default()
        });
        Arc::new(Door {
            tunnel,
            socket,
            agent,
            config,
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

    /// The keys this user may log in with, read now (the agent's keys change).
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
        for file in &self.tunnel.config.identity_files {
            let public = PathBuf::from(format!("{}.pub", file.display()));
            match std::fs::read_to_string(&public)
                .ok()
                .and_then(|t| PublicKey::from_openssh(t.trim()).ok())
            {
                Some(k) => keys.push(k),
                None => {
                    if let Ok(k) = russh::keys::load_secret_key(file, None) {
                        keys.push(k.public_key().clone());
                    }
                }
            }
        }
        if let Some(file) = &self.tunnel.config.front_door_authorized_keys {
            match std::fs::read_to_string(file) {
                Ok(text) => keys.extend(authorized_keys(&text)),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "cannot read front_door_authorized_keys")
                }
            }
        }
        keys
    }
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

/// Accepts local connections until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, door: Arc<Door>, stop: CancellationToken) {
    let me = crate::local::my_uid();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "front door: accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        if let Ok(local) = stream.local_addr() {
            if let Some(uid) = crate::local::tcp_peer_uid(peer, local) {
                if uid != me && uid != 0 {
                    tracing::warn!(%peer, uid, "front door: refused a connection of another user");
                    continue;
                }
            }
        }
        let _ = stream.set_nodelay(true);
        let handler = Connection {
            door: door.clone(),
            keys: None,
            sessions: HashMap::new(),
        };
        let config = door.config.clone();
        let stop = stop.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let run = async {
                if let Ok(session) = russh::server::run_stream(config, stream, handler).await {
                    let _ = session.await;
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = run => {}
            }
        }));
    }
}

/// One SSH connection to the front door.
struct Connection {
    door: Arc<Door>,
    /// The user's keys, read at the first authentication attempt.
    keys: Option<Vec<PublicKey>>,
    /// Session channels waiting for their exec request.
    sessions: HashMap<ChannelId, Channel<Msg>>,
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
    fn refuse(session: &mut Session, id: ChannelId, message: &str) -> Result<(), russh::Error> {
        session.extended_data(id, 1, format!("fleet-broker front door: {message}\r\n"))?;
        session.exit_status_request(id, 1)?;
        session.eof(id)?;
        session.close(id)
    }
}

/// Copies between a client's channel and an upstream stream. The client may close its side
/// first (the upstream then sees end of input and may still answer); once the upstream has
/// nothing more to say the bridge ends, whatever the client's side still has open.
async fn bridge<S>(channel: Channel<Msg>, upstream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let stream = channel.into_stream();
    let (mut client_rd, mut client_wr) = tokio::io::split(stream);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let to_upstream = async {
        let _ = tokio::io::copy(&mut client_rd, &mut up_wr).await;
        let _ = up_wr.shutdown().await;
        std::future::pending::<()>().await
    };
    let to_client = async {
        let _ = tokio::io::copy(&mut up_rd, &mut client_wr).await;
        let _ = client_wr.flush().await;
    };
    tokio::select! {
        _ = to_upstream => {}
        _ = to_client => {}
    }
}

/// A stream to the cluster's fleet API through the warm tunnel.
async fn fleet_stream(tunnel: &Tunnel) -> Result<DrainedChannel, String> {
    let handle = tunnel.link().await.map_err(|e| e.to_string())?;
    let ch = crate::proxy::open_endpoint(&handle, &tunnel.config.endpoint)
        .await
        .map_err(|e| format!("cannot open a channel to {}: {e}", tunnel.config.endpoint))?;
    Ok(DrainedChannel::new(ch))
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
        Ok(if self.is_users(key.public_key).await {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.sessions.insert(channel.id(), channel);
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
            tracing::warn!(command = %command, "front door: refused a command");
            return Self::refuse(
                session,
                id,
                "only `fleetctl fd-forward` to the cluster's fleet socket is served here",
            );
        };
        let Some(channel) = self.sessions.remove(&id) else {
            return Self::refuse(session, id, "no such session");
        };
        tracing::debug!(path, "front door: fd-forward");
        let tunnel = self.door.tunnel.clone();
        let handle = session.handle();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let code = match fleet_stream(&tunnel).await {
                Ok(up) => {
                    bridge(channel, up).await;
                    0
                }
                Err(e) => {
                    let _ = handle
                        .extended_data(id, 1, format!("fleet-broker front door: {e}\r\n"))
                        .await;
                    1
                }
            };
            let _ = handle.exit_status_request(id, code).await;
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
        Self::refuse(
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
                path = socket_path,
                "front door: refused a socket other than the fleet API's"
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        match fleet_stream(&self.door.tunnel).await {
            Ok(up) => {
                reply.accept().await;
                tokio::spawn(tracing::Instrument::in_current_span(bridge(channel, up)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "front door: cannot reach the fleet API");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
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
            Ok(ip) if port_ok => is_machine(&self.door.socket, ip).await,
            _ => false,
        };
        if !machine {
            tracing::warn!(
                host = host_to_connect,
                port = port_to_connect,
                "front door: refused an address that is not a machine's sshd"
            );
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
        match upstream {
            Ok(ch) => {
                reply.accept().await;
                tokio::spawn(tracing::Instrument::in_current_span(bridge(
                    channel,
                    DrainedChannel::new(ch),
                )));
            }
            Err(e) => {
                tracing::warn!(host = host_to_connect, error = %e, "front door: the tunnel host could not connect");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }
}

/// Whether `ip` is the `primaryIP` of a machine of the cluster.
async fn is_machine(socket: &Path, ip: IpAddr) -> bool {
    let api = FleetClient::new(socket, LOOKUP_TIMEOUT);
    match api.machines().await {
        Ok(ms) => ms
            .iter()
            .any(|m| m.primary_ip.parse::<IpAddr>().is_ok_and(|p| p == ip)),
        Err(e) => {
            tracing::warn!(error = %e, "front door: cannot list the cluster's machines");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
