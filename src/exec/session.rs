//! A started remote command and the pump between it and the client's frame stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use russh::client::Msg;
use russh::{Channel, ChannelMsg, Sig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::protocol::frame::{read_frame, write_frame, Frame};

use super::pool::Slot;

/// A started remote command.
pub(crate) struct Session {
    pub(super) channel: Channel<Msg>,
    pub(super) _slot: Slot,
    /// The cluster's token: cancelling it ends the session and closes its channel.
    pub(super) stop: CancellationToken,
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

/// How a session ended, for the audit trail: never its output, only how much there was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ended {
    /// The remote command's exit status, its signal, or why the session ended without one.
    pub(crate) outcome: Outcome,
    /// Bytes of stdin delivered to the remote command.
    pub(crate) bytes_in: u64,
    /// Bytes of stdout and stderr sent to the client.
    pub(crate) bytes_out: u64,
}

/// The last word of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Exited with this status.
    Exit(u32),
    /// Killed by this signal.
    Signal(String),
    /// Ended without either: the client went away, the cluster stopped, the connection broke.
    Ended(String),
}

/// Byte counts that survive the pump being cancelled.
#[derive(Default)]
struct Counts {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Session {
    /// Pumps frames between `io` (the client) and the remote command until it exits, the
    /// client goes away (which ends the remote command) or the cluster stops; says how it
    /// ended.
    pub(crate) async fn run<IO>(self, io: IO) -> Ended
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Session {
            channel,
            _slot,
            stop,
        } = self;
        let counts = Arc::new(Counts::default());
        let outcome = tokio::select! {
            _ = stop.cancelled() => Outcome::Ended("the cluster stopped".into()),
            o = pump(channel, _slot, io, counts.clone()) => o,
        };
        Ended {
            outcome,
            bytes_in: counts.bytes_in.load(Ordering::Relaxed),
            bytes_out: counts.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// The frame pump of [`Session::run`].
async fn pump<IO>(channel: Channel<Msg>, _slot: Slot, io: IO, counts: Arc<Counts>) -> Outcome
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    {
        let input_counts = counts.clone();
        let (mut rd, mut wr) = tokio::io::split(io);
        let (mut read_half, write_half) = channel.split();
        // The window is given back for output once it is written to the client, so a
        // client that stops reading holds the remote command back, and nothing piles up.
        let release = read_half.window_release();
        let write_half = Arc::new(write_half);
        let input_half = write_half.clone();
        // Client → remote.
        let input = tokio::spawn(async move {
            loop {
                match read_frame(&mut rd).await {
                    Ok(Some(Frame::Stdin(b))) => {
                        let n = b.len() as u64;
                        if input_half.data_bytes(b).await.is_err() {
                            return false;
                        }
                        input_counts.bytes_in.fetch_add(n, Ordering::Relaxed);
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
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    release.release(data.len());
                    None
                }
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
                if let Frame::Stdout(b) | Frame::Stderr(b) = &f {
                    counts
                        .bytes_out
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                if write_frame(&mut wr, &f).await.is_err() {
                    client_ok = false;
                    client_gone = true;
                    break;
                }
                if let Frame::Stdout(b) | Frame::Stderr(b) = &f {
                    release.release(b.len());
                }
            }
        }
        if client_gone && exit.is_none() {
            let _ = write_half.signal(Sig::TERM).await;
            let _ = write_half.signal(Sig::HUP).await;
        }
        let _ = write_half.close().await;
        input.abort();
        let last = exit.unwrap_or_else(|| {
            Frame::Error(if client_gone && !client_ok {
                "the client went away; the remote command was sent TERM and HUP".into()
            } else {
                "the SSH session ended without an exit status (connection lost?)".into()
            })
        });
        if client_ok {
            let _ = write_frame(&mut wr, &last).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
        }
        match last {
            Frame::Exit(code) => Outcome::Exit(code),
            Frame::ExitSignal(name) => Outcome::Signal(name),
            Frame::Error(e) => Outcome::Ended(e),
            other => Outcome::Ended(format!("{other:?}")),
        }
    }
}
