//! The client end of an exec session: asks the daemon's control socket to start a command on
//! a cluster machine, then speaks the frame stream (`protocol::frame`). Also the terminal
//! handling of interactive sessions: raw mode (restored on every exit path) and window size.

use std::os::fd::AsFd;
use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::control::client::error_text;
use crate::protocol::exec::{ExecErrorKind, ExecRequest};
use crate::protocol::frame::{read_frame, signal_number, write_frame, Frame, UPGRADE};

/// Why a session did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The target could not be resolved (`Unable to proceed: …`).
    Resolve(String),
    /// The SSH hop or the daemon failed (exit 255).
    Ssh(String),
    /// The daemon did not understand the request (one older than this fleetctl, say).
    Request(String),
}

/// A started session.
pub struct ExecStream {
    tx: mpsc::Sender<Frame>,
    /// Buffered: a frame's head and payload come in one read, not three.
    reader: tokio::io::BufReader<
        tokio::io::ReadHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
    >,
    _writer: tokio::task::JoinHandle<()>,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The remote command's exit status.
    Exit(u32),
    /// The signal that ended the remote command (`TERM`, …).
    Signal(String),
    /// An SSH-level failure after start.
    Failed(String),
}

impl Outcome {
    /// fleetctl's exit code: the remote status, 128+N for a signal, 255 for SSH failures.
    pub(crate) fn code(&self) -> i32 {
        match self {
            Outcome::Exit(c) => *c as i32,
            Outcome::Signal(s) => 128 + signal_number(s) as i32,
            Outcome::Failed(_) => 255,
        }
    }
}

/// Starts a session on `cluster` through the daemon at `control`.
pub async fn open(
    control: &Path,
    cluster: &str,
    req: &ExecRequest,
) -> Result<ExecStream, StartError> {
    let down = |e: String| {
        StartError::Ssh(format!(
            "cannot reach the fleet-broker daemon at {}: {e}; start it with `fleet-broker serve`",
            control.display()
        ))
    };
    let stream = crate::control::client::connect(control)
        .await
        .map_err(|e| StartError::Ssh(e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| down(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    let body = serde_json::to_vec(req).map_err(|e| StartError::Ssh(e.to_string()))?;
    let request = hyper::Request::post(format!("/v1/clusters/{cluster}/exec"))
        .header("Host", "fleet-broker")
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, UPGRADE)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| StartError::Ssh(e.to_string()))?;
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| down(e.to_string()))?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        use http_body_util::BodyExt;
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let kind = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| serde_json::from_value::<ExecErrorKind>(v["kind"].clone()).ok());
        let msg = error_text(&body);
        return Err(match kind {
            Some(ExecErrorKind::Resolve) => StartError::Resolve(msg),
            Some(ExecErrorKind::Request) => StartError::Request(msg),
            _ => StartError::Ssh(msg),
        });
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| StartError::Ssh(e.to_string()))?;
    let (reader, mut writer) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let writer_task = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if write_frame(&mut writer, &f).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    Ok(ExecStream {
        tx,
        reader: tokio::io::BufReader::with_capacity(64 * 1024, reader),
        _writer: writer_task,
    })
}

impl ExecStream {
    /// Queues a frame for the daemon.
    pub async fn send(&self, f: Frame) -> bool {
        self.tx.send(f).await.is_ok()
    }

    /// A sender for other tasks (stdin, resize).
    pub(crate) fn sender(&self) -> mpsc::Sender<Frame> {
        self.tx.clone()
    }

    /// The next frame from the daemon; `None` when the stream ended.
    pub async fn recv(&mut self) -> Option<Frame> {
        read_frame(&mut self.reader).await.ok().flatten()
    }

    /// Copies output to stdout/stderr until the end; returns how the command ended.
    ///
    /// The writes block this (the CLI's only) thread: a reader that stops reading holds the
    /// session back, as it would hold `ssh` back. tokio's stdout would hand every frame to a
    /// thread of its own, started for the first (a thread start and two switches per frame).
    pub async fn finish(mut self) -> Outcome {
        use std::io::Write;
        loop {
            match self.recv().await {
                Some(Frame::Stdout(b)) => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                Some(Frame::Stderr(b)) => {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(&b);
                    let _ = err.flush();
                }
                Some(Frame::Exit(c)) => return Outcome::Exit(c),
                Some(Frame::ExitSignal(s)) => return Outcome::Signal(s),
                Some(Frame::Error(e)) => return Outcome::Failed(e),
                Some(_) => {}
                None => return Outcome::Failed("the session ended without an exit status".into()),
            }
        }
    }
}

/// Forwards local stdin to the session until EOF.
pub(crate) fn forward_stdin(tx: mpsc::Sender<Frame>) {
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Frame::StdinEof).await;
                    return;
                }
                Ok(n) => {
                    if tx
                        .send(Frame::Stdin(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
}

/// Whether stdin is a terminal.
pub(crate) fn stdin_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// The terminal's size as `(cols, rows)`.
pub(crate) fn terminal_size() -> Option<(u32, u32)> {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass; fd 0 is stdin.
    let r = unsafe { nix::libc::ioctl(0, nix::libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some((u32::from(ws.ws_col), u32::from(ws.ws_row)))
}

/// Sends a resize frame on every SIGWINCH.
pub(crate) fn forward_resizes(tx: mpsc::Sender<Frame>) {
    tokio::spawn(async move {
        let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        else {
            return;
        };
        while winch.recv().await.is_some() {
            if let Some((cols, rows)) = terminal_size() {
                if tx.send(Frame::Resize { cols, rows }).await.is_err() {
                    return;
                }
            }
        }
    });
}

/// Puts the terminal in raw mode; the original mode comes back when this is dropped.
pub(crate) struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    pub(crate) fn enter() -> Option<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}
