//! The channel to a cluster's fleet API: `direct-streamlocal@openssh.com` to a unix
//! endpoint (`direct-tcpip` for http), or `fleetctl fd-forward PATH` over an exec session
//! where the tunnel host refuses streamlocal (within the host's session budget), each read
//! through a [`DrainedChannel`]. [`ApiConnector`] opens one per upstream connection, for the
//! cluster socket's proxy and for the daemon's own lookups alike.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use russh::client::Msg;
use russh::Channel;

use super::channel::DrainedChannel;
use super::{open_endpoint, LinkError, Tunnel};
use crate::config::Endpoint;
use crate::fleet_client::FleetClient;

/// Why no channel to the fleet API was opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The tunnel host refused the channel.
    #[error("{0}")]
    Ssh(russh::Error),
    /// The host refuses streamlocal by policy and the config does not allow fd-forward.
    #[error("the tunnel host refuses streamlocal forwarding to {path}, which is there (sshd's AllowStreamLocalForwarding or DisableForwarding); set `transport = \"auto\"` or `\"fd-forward\"` to use `fleetctl fd-forward` there, as the original fleetctl does")]
    StreamlocalRefused {
        /// The fleet socket.
        path: String,
    },
    /// The fd-forward session failed.
    #[error("`fleetctl fd-forward {path}` on the tunnel host: {cause}")]
    FdForward {
        /// The fleet socket.
        path: String,
        /// Why (not an error source: the proxy's 503 names the innermost cause, and this
        /// message is that cause).
        cause: russh::Error,
    },
    /// The host allows no session at all.
    #[error("`fleetctl fd-forward {path}` on the tunnel host: it allows no session (MaxSessions)")]
    NoSession {
        /// The fleet socket.
        path: String,
    },
    /// The connection is being closed.
    #[error("the connection is closing")]
    Closing,
}

/// Why [`connect`] gave no upstream connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The tunnel is not up.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The channel did not open within the cluster's `connect_timeout`.
    #[error("the tunnel host did not open a channel to {endpoint} within {} (is the connection alive?)", humantime::format_duration(*after))]
    Timeout {
        /// The fleet endpoint.
        endpoint: Endpoint,
        /// `connect_timeout`.
        after: Duration,
    },
    /// The channel was refused.
    #[error("cannot open a channel to {endpoint}: {cause}")]
    Open {
        /// The fleet endpoint.
        endpoint: Endpoint,
        /// Why (not an error source, as for [`OpenError::FdForward`]).
        cause: OpenError,
    },
}

/// A new upstream connection to the cluster's fleet API on the live tunnel: waits for the
/// tunnel as [`Tunnel::link`] does, then for the channel up to `connect_timeout`.
pub(crate) async fn connect(tunnel: &Tunnel) -> Result<Upstream, ConnectError> {
    let handle = tunnel.link().await?;
    let endpoint = &tunnel.config.endpoint;
    let after = tunnel.config.connect_timeout;
    tokio::time::timeout(after, open_upstream(tunnel, &handle))
        .await
        .map_err(|_| ConnectError::Timeout {
            endpoint: endpoint.clone(),
            after,
        })?
        .map_err(|cause| ConnectError::Open {
            endpoint: endpoint.clone(),
            cause,
        })
}

/// The daemon's own client of the cluster's fleet API (target lookups of exec sessions and
/// of the front door): its connections are channels of the tunnel opened by [`connect`], the
/// proxy's way, not requests to the cluster's own socket. Clones share one pool of warm
/// connections. Answers are read with the lookup cap.
pub(crate) fn lookup_client(tunnel: &Arc<Tunnel>, timeout: Duration) -> FleetClient {
    let tunnel = tunnel.clone();
    let name = format!("cluster {:?}'s fleet API", tunnel.name());
    FleetClient::dialing(&name, timeout, move || {
        let tunnel = tunnel.clone();
        async move { connect(&tunnel).await.map_err(std::io::Error::other) }
    })
    .limit_responses(crate::fleet_client::LOOKUP_MAX_BYTES)
}

/// hyper-util connector: each new upstream connection is a fresh channel ([`connect`]).
#[derive(Clone)]
pub(crate) struct ApiConnector {
    tunnel: Arc<Tunnel>,
}

impl ApiConnector {
    pub(crate) fn new(tunnel: Arc<Tunnel>) -> ApiConnector {
        ApiConnector { tunnel }
    }
}

impl tower_service::Service<Uri> for ApiConnector {
    type Response = TokioIo<Upstream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let tunnel = self.tunnel.clone();
        Box::pin(async move { connect(&tunnel).await.map(TokioIo::new) })
    }
}

/// An upstream connection: a drained channel, and for the fd-forward transport the session
/// budget it holds until it closes.
pub(crate) struct Upstream {
    channel: DrainedChannel,
    _session: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Upstream {
    /// Whether this connection may be used for another request ([`DrainedChannel::is_idle_and_open`]).
    pub(crate) fn is_idle_and_open(&self) -> bool {
        self.channel.is_idle_and_open()
    }

    /// Whether this connection holds one of the tunnel host's sessions (`fleetctl
    /// fd-forward`), which the connection's other requests may be waiting for.
    pub(crate) fn holds_session(&self) -> bool {
        self._session.is_some()
    }
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl tokio::io::AsyncRead for Upstream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.channel).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Upstream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.channel).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.channel).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.channel).poll_shutdown(cx)
    }
}

/// `fleetctl fd-forward PATH` on the tunnel host over an exec session, as the original
/// fleetctl's `--tunnel` reaches the fleet socket: the session's stdin and stdout are the
/// socket's bytes. For tunnel hosts that refuse streamlocal (`AllowStreamLocalForwarding no`).
async fn open_fd_forward(
    handle: &russh::client::Handle<crate::tunnel::ClientHandler>,
    path: &str,
    tunnel: &Tunnel,
) -> Result<Channel<Msg>, russh::Error> {
    fd_forward_session(handle, path, || tunnel.give_up_interactive()).await
}

/// An exec session running `fleetctl fd-forward PATH` (the path quoted for the remote
/// shell); `make_room` may free a session slot when sshd refuses one (`MaxSessions`).
pub(crate) async fn fd_forward_session<F, Fut>(
    handle: &russh::client::Handle<crate::tunnel::ClientHandler>,
    path: &str,
    make_room: F,
) -> Result<Channel<Msg>, russh::Error>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = bool>,
{
    let ch = crate::tunnel::open_session_making_room(handle, make_room).await?;
    ch.exec(
        true,
        format!(
            "fleetctl fd-forward {}",
            crate::remote_command::shell_quote(path)
        ),
    )
    .await?;
    Ok(ch)
}

/// A new upstream connection to the cluster's fleet endpoint: streamlocal (or direct-tcpip),
/// or `fleetctl fd-forward` within the session budget when the connection uses it. With
/// `transport = "auto"`, a tunnel host that refuses streamlocal is remembered to need
/// fd-forward until the next connection.
async fn open_upstream(
    tunnel: &Tunnel,
    handle: &russh::client::Handle<crate::tunnel::ClientHandler>,
) -> Result<Upstream, OpenError> {
    use crate::config::Transport;
    let direct = |ch: Channel<Msg>| Upstream {
        channel: DrainedChannel::new(ch).with_stall_limit(tunnel.config.stalled_reader_timeout),
        _session: None,
    };
    let Endpoint::Unix(path) = &tunnel.config.endpoint else {
        return open_endpoint(handle, &tunnel.config.endpoint)
            .await
            .map(direct)
            .map_err(OpenError::Ssh);
    };
    if !tunnel.uses_fd_forward() {
        match open_endpoint(handle, &tunnel.config.endpoint).await {
            Ok(ch) => return Ok(direct(ch)),
            // One request at a time asks why; those waiting find the answer made.
            Err(russh::Error::ChannelOpenFailure(why))
                if {
                    let _deciding = tunnel.transport_probe.lock().await;
                    tunnel.uses_fd_forward() || refused_by_policy(tunnel, handle, path, &why).await
                } =>
            {
                if tunnel.uses_fd_forward() {
                    // Another request found it out meanwhile.
                } else if tunnel.config.transport != Transport::Auto {
                    return Err(OpenError::StreamlocalRefused { path: path.clone() });
                }
                tracing::info!("the tunnel host refuses streamlocal forwarding (AllowStreamLocalForwarding no?); using `fleetctl fd-forward` over exec sessions until the next connection");
                tunnel.fall_back_to_fd_forward();
            }
            Err(e) => return Err(OpenError::Ssh(e)),
        }
    }
    // The budget starts at FD_FORWARD_SESSIONS and shrinks to what the host allows: a
    // session the host refuses (MaxSessions) gives its permit up, and the request waits for
    // one of the sessions that are open.
    // At the smallest budget a refusal is a session still closing: sshd frees its slot a
    // round trip after the close, so opening is tried again (bounded).
    let mut retries = 0u32;
    for _ in 0..crate::tunnel::FD_FORWARD_SESSIONS + FD_FORWARD_RETRIES as usize {
        let session = tunnel
            .fd_forward_sessions
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| OpenError::Closing)?;
        match open_fd_forward(handle, path, tunnel).await {
            Ok(ch) => {
                return Ok(Upstream {
                    channel: DrainedChannel::new(ch)
                        .with_stall_limit(tunnel.config.stalled_reader_timeout),
                    _session: Some(session),
                })
            }
            Err(russh::Error::ChannelOpenFailure(_)) if tunnel.shrink_fd_forward_budget() => {
                tracing::info!("the tunnel host allows no more sessions (MaxSessions); fd-forward now keeps one fewer open");
                session.forget();
            }
            Err(russh::Error::ChannelOpenFailure(_)) if retries < FD_FORWARD_RETRIES => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(10 << retries.min(6))).await;
            }
            Err(cause) => {
                return Err(OpenError::FdForward {
                    path: path.clone(),
                    cause,
                })
            }
        }
    }
    Err(OpenError::NoSession { path: path.clone() })
}

/// Whether a refused streamlocal open was the tunnel host's policy rather than a fleet
/// socket that is not there: sshd answers both with "connect failed", so for that answer the
/// host is asked (`test -S PATH` over an exec session, bounded) whether the socket exists.
async fn refused_by_policy(
    tunnel: &Tunnel,
    handle: &russh::client::Handle<crate::tunnel::ClientHandler>,
    path: &str,
    why: &russh::ChannelOpenFailure,
) -> bool {
    use russh::ChannelOpenFailure::{
        AdministrativelyProhibited, ConnectFailed, UnknownChannelType,
    };
    match why {
        AdministrativelyProhibited | UnknownChannelType => true,
        ConnectFailed => {
            let probe = async {
                let mut ch = crate::tunnel::open_session_making_room(handle, || {
                    tunnel.give_up_interactive()
                })
                .await
                .ok()?;
                ch.exec(
                    true,
                    format!("test -S {}", crate::remote_command::shell_quote(path)),
                )
                .await
                .ok()?;
                while let Some(msg) = ch.wait().await {
                    if let russh::ChannelMsg::ExitStatus { exit_status } = msg {
                        return Some(exit_status == 0);
                    }
                }
                None
            };
            tokio::time::timeout(POLICY_PROBE_TIMEOUT, probe)
                .await
                .ok()
                .flatten()
                .unwrap_or(false)
        }
        _ => false,
    }
}

/// Attempts to open an fd-forward session at the smallest budget while others close.
const FD_FORWARD_RETRIES: u32 = 10;

/// Bound on asking the tunnel host whether the fleet socket exists.
const POLICY_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
