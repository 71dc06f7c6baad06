//! The exec stream framing, shared by the daemon and the CLI. After `POST
//! /v1/clusters/NAME/exec` is upgraded (HTTP 101, `Upgrade: fleet-broker-exec`), both sides
//! exchange frames: one type byte, a 4-byte big-endian payload length, the payload.
//! See docs/exec-protocol.md.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The `Upgrade` token of the exec stream.
pub const UPGRADE: &str = "fleet-broker-exec";
/// Largest payload either side accepts.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// One message on the exec stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → daemon: bytes for the remote stdin.
    Stdin(Bytes),
    /// Daemon → client: remote stdout.
    Stdout(Bytes),
    /// Daemon → client: remote stderr.
    Stderr(Bytes),
    /// Client → daemon: the terminal's new size.
    Resize {
        /// Columns.
        cols: u32,
        /// Rows.
        rows: u32,
    },
    /// Client → daemon: no more stdin.
    StdinEof,
    /// Client → daemon: deliver a signal (`INT`, `TERM`, …) to the remote process.
    Signal(String),
    /// Daemon → client: the remote command exited with this status (last frame).
    Exit(u32),
    /// Daemon → client: the remote command was killed by this signal (last frame).
    ExitSignal(String),
    /// Daemon → client: the session failed at the SSH level (last frame).
    Error(String),
}

const STDIN: u8 = 1;
const STDOUT: u8 = 2;
const STDERR: u8 = 3;
const RESIZE: u8 = 4;
const STDIN_EOF: u8 = 5;
const SIGNAL: u8 = 6;
const EXIT: u8 = 7;
const EXIT_SIGNAL: u8 = 8;
const ERROR: u8 = 9;

impl Frame {
    fn encode(&self) -> (u8, Vec<u8>) {
        match self {
            Frame::Stdin(b) => (STDIN, b.to_vec()),
            Frame::Stdout(b) => (STDOUT, b.to_vec()),
            Frame::Stderr(b) => (STDERR, b.to_vec()),
            Frame::Resize { cols, rows } => {
                let mut v = cols.to_be_bytes().to_vec();
                v.extend_from_slice(&rows.to_be_bytes());
                (RESIZE, v)
            }
            Frame::StdinEof => (STDIN_EOF, Vec::new()),
            Frame::Signal(s) => (SIGNAL, s.as_bytes().to_vec()),
            Frame::Exit(c) => (EXIT, c.to_be_bytes().to_vec()),
            Frame::ExitSignal(s) => (EXIT_SIGNAL, s.as_bytes().to_vec()),
            Frame::Error(s) => (ERROR, s.as_bytes().to_vec()),
        }
    }
}

/// Writes one frame (large stdout/stderr payloads are split).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let (kind, payload) = frame.encode();
    let mut chunks: Vec<&[u8]> = payload.chunks(MAX_PAYLOAD).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    // Head and payload in one write: one system call per frame on an unbuffered socket.
    let mut framed = Vec::with_capacity(5 + chunks[0].len());
    for chunk in chunks {
        framed.clear();
        framed.push(kind);
        framed.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        framed.extend_from_slice(chunk);
        w.write_all(&framed).await?;
    }
    w.flush().await
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn text(p: Vec<u8>) -> std::io::Result<String> {
    String::from_utf8(p).map_err(|e| bad(format!("frame text is not UTF-8: {e}")))
}

fn u32_at(p: &[u8], at: usize) -> std::io::Result<u32> {
    p.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| bad("short frame".into()))
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..]).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(bad(format!("frame of {len} bytes exceeds {MAX_PAYLOAD}")));
    }
    let mut p = vec![0u8; len];
    r.read_exact(&mut p).await?;
    Ok(Some(match head[0] {
        STDIN => Frame::Stdin(p.into()),
        STDOUT => Frame::Stdout(p.into()),
        STDERR => Frame::Stderr(p.into()),
        RESIZE => Frame::Resize {
            cols: u32_at(&p, 0)?,
            rows: u32_at(&p, 4)?,
        },
        STDIN_EOF => Frame::StdinEof,
        SIGNAL => Frame::Signal(text(p)?),
        EXIT => Frame::Exit(u32_at(&p, 0)?),
        EXIT_SIGNAL => Frame::ExitSignal(text(p)?),
        ERROR => Frame::Error(text(p)?),
        k => return Err(bad(format!("unknown frame type {k}"))),
    }))
}

/// The number of a signal name as Linux numbers it, for `128 + N` exit codes.
pub fn signal_number(name: &str) -> u32 {
    match name.trim_start_matches("SIG") {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let frames = vec![
            Frame::Stdin(Bytes::from_static(b"hi")),
            Frame::Stdout(Bytes::new()),
            Frame::Stderr(Bytes::from_static(b"e")),
            Frame::Resize {
                cols: 100,
                rows: 40,
            },
            Frame::StdinEof,
            Frame::Signal("INT".into()),
            Frame::Exit(7),
            Frame::ExitSignal("TERM".into()),
            Frame::Error("boom".into()),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            write_frame(&mut buf, f).await.unwrap();
        }
        let mut r = &buf[..];
        for f in &frames {
            assert_eq!(read_frame(&mut r).await.unwrap().as_ref(), Some(f));
        }
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
        let mut bad: &[u8] = &[42, 0, 0, 0, 0];
        assert!(read_frame(&mut bad).await.is_err());
        assert_eq!(signal_number("TERM"), 15);
    }
}
