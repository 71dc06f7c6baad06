//! A channel the client closes first: once the server answers with its own CHANNEL_CLOSE,
//! the client's end of the channel is done. Its reader gets the end of the channel, and the
//! session lets go of it (the reader's queue is not held for the rest of the connection).
//!
//! Client and server talk over an in-memory pipe on a paused clock: once a virtual sleep
//! returns, every task has run as far as it can, so "nothing more arrived" is a fact, not a
//! guess about timing.

use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelMsg, client};
use ssh_key::PrivateKey;
use tokio::time::timeout;

/// Accepts every session channel and leaves it open: the close comes from the client.
#[derive(Clone)]
struct Keeper;

impl server::Handler for Keeper {
    type Error = anyhow::Error;

    async fn auth_publickey(
        &mut self,
        _: &str,
        _: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        // Kept until the client closes it.
        tokio::spawn(async move {
            let mut channel = channel;
            while channel.wait().await.is_some() {}
        });
        Ok(())
    }
}

struct Trusting;

impl client::Handler for Trusting {
    type Error = anyhow::Error;

    async fn check_server_key(&mut self, _: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

async fn connect() -> client::Handle<Trusting> {
    let (client_end, server_end) = tokio::io::duplex(256 * 1024);
    let server_config = Arc::new(server::Config {
        keys: vec![PrivateKey::random(&mut rand::rng(), ssh_key::Algorithm::Ed25519).unwrap()],
        ..Default::default()
    });
    tokio::spawn(async move {
        if let Ok(running) = server::run_stream(server_config, server_end, Keeper).await {
            let _ = running.await;
        }
    });
    let mut handle =
        client::connect_stream(Arc::new(client::Config::default()), client_end, Trusting)
            .await
            .unwrap();
    let key = Arc::new(PrivateKey::random(&mut rand::rng(), ssh_key::Algorithm::Ed25519).unwrap());
    let auth = handle
        .authenticate_publickey("user", PrivateKeyWithHashAlg::new(key, None))
        .await
        .unwrap();
    assert!(auth.success());
    handle
}

#[tokio::test(start_paused = true)]
async fn a_channel_closed_by_the_client_ends_when_the_server_answers() {
    let handle = connect().await;
    for i in 0..50 {
        let channel = handle.channel_open_session().await.unwrap();
        let (mut read, write) = channel.split();
        write.close().await.unwrap();
        // The server's CLOSE comes back; the reader then sees the channel end. Before, the
        // session ignored that CLOSE (the channel was no longer open on its side) and kept
        // the reader's queue: the reader waited for ever, and every such channel stayed in
        // the session for the life of the connection.
        let end = timeout(Duration::from_secs(10), async {
            loop {
                match read.wait().await {
                    Some(ChannelMsg::Close) | None => return,
                    Some(_) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "channel {i}: no end after the server's CLOSE");
    }
}
