//! With `manual_window_release`, a reader that gives its channel's window back itself
//! (`WindowRelease`) holds the sender
//! to one window of unconsumed data, and a stalled channel does not hold up the others.
//!
//! Client and server talk over an in-memory pipe on a paused clock: once a virtual sleep
//! returns, every task has run as far as it can, so "nothing more arrived" is a fact, not a
//! guess about timing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelMsg, ChannelReadHalf, client};
use ssh_key::PrivateKey;
use tokio::io::AsyncWriteExt;
use tokio::time::{sleep, timeout};

/// The client's receive window per channel.
const WINDOW: u32 = 64 * 1024;
/// What the server sends on every channel.
const TOTAL: usize = 1024 * 1024;
/// The size of the server's writes.
const CHUNK: usize = 5000;

/// The byte at offset `i` of every channel's stream.
fn byte_at(i: usize) -> u8 {
    (i % 251) as u8
}

#[derive(Clone)]
struct Pusher {
    /// Bytes the server has handed to each channel (by open order).
    sent: Arc<Vec<AtomicUsize>>,
    opened: Arc<AtomicUsize>,
}

impl server::Handler for Pusher {
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
        let index = self.opened.fetch_add(1, Ordering::SeqCst);
        let sent = self.sent.clone();
        reply.accept().await;
        tokio::spawn(async move {
            let mut writer = channel.make_writer();
            let mut offset = 0;
            while offset < TOTAL {
                let n = CHUNK.min(TOTAL - offset);
                let chunk: Vec<u8> = (offset..offset + n).map(byte_at).collect();
                if writer.write_all(&chunk).await.is_err() {
                    return;
                }
                offset += n;
                sent[index].store(offset, Ordering::SeqCst);
            }
            drop(writer);
            let _ = channel.eof().await;
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

/// A client connected to a [`Pusher`] over an in-memory pipe, and the server's counters.
async fn connect(channels: usize) -> (client::Handle<Trusting>, Arc<Vec<AtomicUsize>>) {
    let (client_end, server_end) = tokio::io::duplex(256 * 1024);
    let sent: Arc<Vec<AtomicUsize>> =
        Arc::new((0..channels).map(|_| AtomicUsize::new(0)).collect());
    let pusher = Pusher {
        sent: sent.clone(),
        opened: Arc::new(AtomicUsize::new(0)),
    };
    let server_config = Arc::new(server::Config {
        keys: vec![PrivateKey::random(&mut rand::rng(), ssh_key::Algorithm::Ed25519).unwrap()],
        ..Default::default()
    });
    tokio::spawn(async move {
        if let Ok(running) = server::run_stream(server_config, server_end, pusher).await {
            let _ = running.await;
        }
    });
    let client_config = Arc::new(client::Config {
        window_size: WINDOW,
        manual_window_release: true,
        ..Default::default()
    });
    let mut handle = client::connect_stream(client_config, client_end, Trusting)
        .await
        .unwrap();
    let key = Arc::new(PrivateKey::random(&mut rand::rng(), ssh_key::Algorithm::Ed25519).unwrap());
    let auth = handle
        .authenticate_publickey("user", PrivateKeyWithHashAlg::new(key, None))
        .await
        .unwrap();
    assert!(auth.success());
    (handle, sent)
}

/// Lets every task run as far as it can.
async fn settle() {
    sleep(Duration::from_secs(10)).await;
}

/// Takes every message already queued for the reader; returns the data bytes, checked
/// against the stream's pattern from `offset`, and whether the channel ended.
async fn take_queued(read: &mut ChannelReadHalf, offset: usize) -> (usize, bool) {
    let mut got = 0;
    loop {
        match timeout(Duration::from_millis(1), read.wait()).await {
            Ok(Some(ChannelMsg::Data { data })) => {
                for (i, b) in data.iter().enumerate() {
                    assert_eq!(*b, byte_at(offset + got + i), "byte {}", offset + got + i);
                }
                got += data.len();
            }
            Ok(Some(ChannelMsg::Eof | ChannelMsg::Close) | None) => return (got, true),
            Ok(Some(_)) => {}
            Err(_) => return (got, false),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_sender_gets_only_as_much_window_as_the_reader_consumed() {
    let (handle, sent) = connect(1).await;
    let channel = handle.channel_open_session().await.unwrap();
    let (mut read, _write) = channel.split();
    let release = read.window_release();

    settle().await;
    let first = sent[0].load(Ordering::SeqCst);
    assert!(
        first > 0 && first <= WINDOW as usize,
        "a reader that consumed nothing let the server send {first} bytes (window {WINDOW})"
    );
    let (queued, _) = take_queued(&mut read, 0).await;
    assert_eq!(queued, WINDOW as usize, "the sender filled its window");
    settle().await;
    assert_eq!(
        sent[0].load(Ordering::SeqCst),
        first,
        "taking data off the channel is not consuming it"
    );

    // Consume in small steps: the sender is never more than one window ahead.
    let mut consumed = 0;
    let mut received = queued;
    let mut ended = false;
    for _ in 0..100_000 {
        if ended && consumed == received {
            break;
        }
        let step = 3000.min(received - consumed);
        consumed += step;
        release.release(step);
        settle().await;
        let (got, end) = take_queued(&mut read, received).await;
        received += got;
        ended |= end;
        let ahead = received - consumed;
        assert!(
            ahead <= WINDOW as usize,
            "{ahead} bytes arrived ahead of the reader"
        );
    }
    assert!(ended, "the channel did not end");
    assert_eq!(received, TOTAL);
}

#[tokio::test(start_paused = true)]
async fn a_channel_whose_reader_stalled_does_not_hold_up_another() {
    let (handle, sent) = connect(2).await;
    let stalled = handle.channel_open_session().await.unwrap();
    let _release = stalled.window_release();
    // Its data is never read: its queue would fill and stop the session if the server
    // could keep sending.
    settle().await;
    let received = timeout(Duration::from_secs(600), async {
        let other = handle.channel_open_session().await.unwrap();
        let (mut read, _write) = other.split();
        let release = read.window_release();
        let mut received = 0;
        loop {
            let (got, ended) = take_queued(&mut read, received).await;
            received += got;
            release.release(got);
            if got == 0 && !ended {
                settle().await;
            }
            if ended {
                return received;
            }
        }
    })
    .await
    .expect("the second channel stalled behind the first");
    assert_eq!(received, TOTAL);
    assert!(sent[0].load(Ordering::SeqCst) <= WINDOW as usize);
    drop(stalled);
}
