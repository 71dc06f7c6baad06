//! Channels the broker opens on a connection: sessions (making room under sshd's
//! `MaxSessions` by giving up the interactive session), the interactive session itself, and
//! the channel to the cluster's fleet endpoint.

use std::time::Duration;

use super::{ClientHandler, SshHandle};

/// Attempts to open a session after the interactive session was given up: its close takes a
/// round trip before sshd counts the slot free.
const ROOM_ATTEMPTS: u32 = 10;

/// Opens a session on `handle`. When sshd refuses it (`MaxSessions`) and `make_room` says a
/// slot is being freed (it gave up the connection's interactive session, or a session of
/// ours ended just now), opening is tried again (bounded), so the user's command gets it.
pub(crate) async fn open_session_making_room<F, Fut>(
    handle: &russh::client::Handle<ClientHandler>,
    make_room: F,
) -> Result<russh::Channel<russh::client::Msg>, russh::Error>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    match handle.channel_open_session().await {
        Err(russh::Error::ChannelOpenFailure(_)) if make_room().await => {
            tracing::info!(
                "sshd refused another session (MaxSessions); trying again as a slot is freed"
            );
            let mut attempt = 0;
            loop {
                match handle.channel_open_session().await {
                    Err(russh::Error::ChannelOpenFailure(_)) if attempt + 1 < ROOM_ATTEMPTS => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(10 << attempt.min(5))).await;
                    }
                    other => return other,
                }
            }
        }
        other => other,
    }
}

/// Opens the interactive session of an SSH connection (the tunnel's, or a nested one to a
/// machine): a pty (sshd then turns on TCP_NODELAY for the connection, as for `ssh -tt`)
/// running `cat`, which waits for input that never comes. `None`, quietly, when sshd
/// refuses the pty or the command (PermitTTY no, a restricted account) or does not answer
/// within `limit`.
pub(crate) async fn open_interactive(
    handle: &SshHandle,
    limit: Duration,
) -> Option<russh::Channel<russh::client::Msg>> {
    let attempt = async {
        let mut ch = handle.channel_open_session().await.ok()?;
        ch.request_pty(true, "dumb", 80, 24, 0, 0, &[]).await.ok()?;
        if !answered_yes(&mut ch).await {
            return None;
        }
        ch.exec(true, "cat").await.ok()?;
        if !answered_yes(&mut ch).await {
            return None;
        }
        Some(ch)
    };
    let ch = tokio::time::timeout(limit, attempt).await.ok().flatten();
    if ch.is_none() {
        tracing::debug!(
            "no interactive session on this connection (sshd refused a pty or the command)"
        );
    }
    ch
}

/// Waits for the reply to a request sent with want-reply.
async fn answered_yes(ch: &mut russh::Channel<russh::client::Msg>) -> bool {
    loop {
        match ch.wait().await {
            Some(russh::ChannelMsg::Success) => return true,
            Some(russh::ChannelMsg::Failure) | Some(russh::ChannelMsg::Close) | None => {
                return false
            }
            Some(_) => continue,
        }
    }
}

/// Attempts to open a channel to the endpoint when sshd reports the remote connect failed
/// (its listener backlog was full).
const ENDPOINT_OPEN_ATTEMPTS: u32 = 6;

/// Opens a byte stream to the cluster's fleet endpoint on the tunnel's SSH connection,
/// retrying when sshd could not connect to the endpoint (its listener backlog was full).
pub async fn open_endpoint(
    handle: &russh::client::Handle<ClientHandler>,
    endpoint: &crate::config::Endpoint,
) -> Result<russh::Channel<russh::client::Msg>, russh::Error> {
    let mut attempt = 0;
    loop {
        let r = match endpoint {
            crate::config::Endpoint::Unix(path) => {
                handle.channel_open_direct_streamlocal(path.clone()).await
            }
            crate::config::Endpoint::Http { host, port } => {
                handle
                    .channel_open_direct_tcpip(host.clone(), u32::from(*port), "127.0.0.1", 0)
                    .await
            }
        };
        match r {
            Err(russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ConnectFailed))
                if attempt + 1 < ENDPOINT_OPEN_ATTEMPTS =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5u64 << attempt)).await;
            }
            other => return other,
        }
    }
}
