//! One SSH connection to the front door: its russh handler (the user's keys only; the exec
//! request `fleetctl fd-forward`, streamlocal to the fleet socket, direct-tcpip to a machine;
//! everything else refused), the bridges it runs, and the audit record of a forward.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::*;

/// One SSH connection to the front door.
pub(super) struct Connection {
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
    pub(super) fn new(
        door: Arc<Door>,
        peer: Peer,
        authed: oneshot::Sender<()>,
        active: watch::Sender<usize>,
        stop: CancellationToken,
    ) -> Connection {
        Connection {
            door,
            peer,
            keys: None,
            sessions: HashMap::new(),
            authed: Some(authed),
            active: Arc::new(active),
            stop,
        }
    }

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
            Ok(ip) if port_ok => machine_at(&self.door.lookups, ip).await,
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
async fn machine_at(api: &crate::fleet_client::FleetClient, ip: IpAddr) -> Option<String> {
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
