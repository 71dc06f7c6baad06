//! The tunnel's supervisor: the state machine of one cluster's connection (`Idle →
//! Connecting → Ready → Lost → Backoff → Connecting …`, and `Failed`), driven by requests,
//! operator commands, keepalives, stall probes and the clock; the contract is at the top of
//! `tunnel/mod.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;

enum Step {
    Idle,
    Connecting,
    Ready(dial::Connection),
    Backoff,
    Failed(String),
    Stop,
}

pub(super) struct Supervisor {
    tunnel: Arc<Tunnel>,
    cmd_rx: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    /// The last connect failure logged, and how often it recurred since: a failure that
    /// repeats is logged once, with its count when something changes.
    last_failure: Option<String>,
    repeats: u64,
}

impl Supervisor {
    pub(super) fn new(
        tunnel: Arc<Tunnel>,
        cmd_rx: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) -> Supervisor {
        Supervisor {
            tunnel,
            cmd_rx,
            shutdown,
            last_failure: None,
            repeats: 0,
        }
    }

    pub(super) async fn run(mut self) {
        let mut step = match self.tunnel.config.connect {
            ConnectMode::Eager => Step::Connecting,
            ConnectMode::Lazy => Step::Idle,
        };
        let mut attempt: u32 = 0;
        // Whether the attempt in progress (or the failure being waited out) was asked for by
        // `connect` rather than scheduled by the backoff.
        let mut forced = false;
        loop {
            step = match step {
                Step::Stop => break,
                Step::Idle => {
                    self.tunnel.set_state(State::Idle);
                    self.tunnel.link_tx.send_replace(Link::Down);
                    tokio::select! {
                        _ = self.tunnel.wake.notified() => Step::Connecting,
                        c = self.cmd_rx.recv() => match c {
                            Some(Command::Connect) => Step::Connecting,
                            Some(Command::Disconnect | Command::Probe) => Step::Idle,
                            Some(Command::GiveUpInteractive(reply)) => {
                                let _ = reply.send(false);
                                Step::Idle
                            }
                            None => Step::Stop,
                        },
                        _ = self.shutdown.cancelled() => Step::Stop,
                    }
                }
                Step::Connecting => {
                    let next = self.connect(&mut attempt).await;
                    if !matches!(next, Step::Backoff) {
                        forced = false;
                    }
                    next
                }
                Step::Ready(conn) => {
                    let s = self.ready(conn).await;
                    if matches!(s, Step::Backoff) {
                        tracing::warn!("tunnel lost; reconnecting");
                        self.tunnel.with_stats(|st| st.reconnects += 1);
                    }
                    s
                }
                Step::Backoff => {
                    self.tunnel.set_state(State::Backoff);
                    self.tunnel.link_tx.send_if_modified(|l| {
                        let up = matches!(l, Link::Up(_));
                        if up {
                            *l = Link::Down;
                        }
                        up
                    });
                    let cap = BACKOFF_MIN
                        .saturating_mul(1u32 << attempt.min(8))
                        .min(BACKOFF_MAX);
                    let delay = rand::thread_rng().gen_range(Duration::ZERO..=cap);
                    let until = tokio::time::Instant::now() + delay;
                    // Waiting requests do not shorten the wait: the next attempt comes when the
                    // backoff says, however many wait. `connect` asks for one attempt now, and
                    // only when the failure being waited out was not itself such an attempt.
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => {
                                forced = false;
                                break Step::Connecting;
                            }
                            c = self.cmd_rx.recv() => match c {
                                Some(Command::Connect) if !forced => {
                                    forced = true;
                                    break Step::Connecting;
                                }
                                Some(Command::Connect | Command::Probe) => continue,
                                Some(Command::GiveUpInteractive(reply)) => {
                                    let _ = reply.send(false);
                                }
                                Some(Command::Disconnect) => break Step::Idle,
                                None => break Step::Stop,
                            },
                            _ = self.shutdown.cancelled() => break Step::Stop,
                        }
                    }
                }
                Step::Failed(msg) => {
                    self.tunnel.set_state(State::Failed);
                    self.tunnel.link_tx.send_replace(Link::Failed(msg));
                    loop {
                        tokio::select! {
                            c = self.cmd_rx.recv() => match c {
                                Some(Command::Connect) => { attempt = 0; break Step::Connecting }
                                Some(Command::Disconnect) => break Step::Idle,
                                Some(Command::Probe) => continue,
                                Some(Command::GiveUpInteractive(reply)) => {
                                    let _ = reply.send(false);
                                    continue;
                                }
                                None => break Step::Stop,
                            },
                            _ = self.shutdown.cancelled() => break Step::Stop,
                        }
                    }
                }
            };
        }
        self.tunnel.link_tx.send_replace(Link::Down);
    }

    async fn connect(&mut self, attempt: &mut u32) -> Step {
        let t = self.tunnel.clone();
        t.set_state(State::Connecting);
        // Requests arriving now wait for this attempt instead of seeing an old failure.
        if matches!(*t.link_tx.borrow(), Link::Failed(_)) {
            t.link_tx.send_replace(Link::Down);
        }
        let spec = t.dial_spec();
        t.with_stats(|s| s.connect_attempts += 1);
        let started = Instant::now();
        let result = tokio::select! {
            r = tokio::time::timeout(t.config.connect_timeout, dial::dial(&spec)) => r,
            _ = self.shutdown.cancelled() => return Step::Stop,
        };
        match result {
            Ok(Ok(conn)) => {
                *attempt = 0;
                if self.last_failure.take().is_some() && self.repeats > 0 {
                    tracing::info!(
                        "the last connect failure repeated {} more times before this success",
                        self.repeats
                    );
                }
                self.repeats = 0;
                tracing::info!(peer = %conn.peer, ms = started.elapsed().as_millis() as u64, "tunnel connected");
                t.with_stats(|s| {
                    s.fingerprint = Some(conn.host_key_fingerprint.clone());
                    s.connected_since = Some(SystemTime::now());
                    s.last_error = None;
                });
                Step::Ready(conn)
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                t.with_stats(|s| s.last_error = Some(msg.clone()));
                if e.is_fatal() {
                    self.last_failure = None;
                    self.repeats = 0;
                    tracing::error!(error = %msg, "tunnel failed; waiting for an operator");
                    Step::Failed(msg)
                } else {
                    self.log_failure(&msg, *attempt);
                    *attempt = attempt.saturating_add(1);
                    Step::Backoff
                }
            }
            Err(_) => {
                let msg = format!(
                    "connecting to {} timed out after {}",
                    t.config.tunnel,
                    humantime::format_duration(t.config.connect_timeout)
                );
                self.log_failure(&msg, *attempt);
                t.with_stats(|s| s.last_error = Some(msg));
                *attempt = attempt.saturating_add(1);
                Step::Backoff
            }
        }
    }

    /// Logs a retryable connect failure at warn the first time it is seen; a repeat only at
    /// debug, counted, and the count is logged when the failure changes or ends.
    fn log_failure(&mut self, msg: &str, attempt: u32) {
        if self.last_failure.as_deref() == Some(msg) {
            self.repeats += 1;
            tracing::debug!(error = %msg, attempt, "tunnel connect failed again");
            return;
        }
        if self.last_failure.is_some() && self.repeats > 0 {
            tracing::warn!(
                "the previous connect failure repeated {} more times",
                self.repeats
            );
        }
        tracing::warn!(error = %msg, "tunnel connect failed; retrying with backoff");
        self.last_failure = Some(msg.to_string());
        self.repeats = 0;
    }

    async fn ready(&mut self, conn: dial::Connection) -> Step {
        let t = self.tunnel.clone();
        t.set_state(State::Ready);
        let handle: SshHandle = Arc::new(conn.handle);
        let hops = conn.hops;
        // A new connection tries streamlocal again (auto), before any request uses it.
        let forgotten = t.with_stats(|s| {
            s.fd_forward = false;
            s.interactive_given_up = false;
            std::mem::take(&mut s.fd_forward_forgotten)
        });
        t.fd_forward_sessions.add_permits(forgotten);
        t.link_tx.send_replace(Link::Up(handle.clone()));
        let mut closed = conn.closed;
        // Held for the connection's life: while it is open, sshd sends without Nagle delays.
        let mut interactive = match t.config.interactive_session {
            InteractiveSession::Auto => open_interactive(&handle, t.probe_timeout()).await,
            InteractiveSession::Off => None,
        };
        t.with_stats(|s| s.interactive = interactive.is_some());
        let mut clock = tokio::time::interval(CLOCK_CHECK);
        clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut wall, mut mono) = (SystemTime::now(), Instant::now());
        let next = loop {
            tokio::select! {
                _ = closed.changed() => {
                    t.with_stats(|s| {
                        s.last_error = Some(format!("connection to {} lost", t.config.tunnel));
                        s.connected_since = None;
                    });
                    break Step::Backoff;
                }
                _ = clock.tick() => {
                    // The monotonic clock stops during suspend, the wall clock does not: a
                    // jump means the machine slept and the connection is probably dead.
                    let walled = SystemTime::now().duration_since(wall).unwrap_or_default();
                    let slept = walled.saturating_sub(mono.elapsed()) > SUSPEND_JUMP;
                    (wall, mono) = (SystemTime::now(), Instant::now());
                    if slept && tokio::time::timeout(PROBE_TIMEOUT, handle.send_ping()).await.is_err() {
                        tracing::warn!("no answer after a clock jump (suspend?); reconnecting");
                        t.with_stats(|s| {
                            s.last_error = Some(format!("connection to {} did not survive a suspend", t.config.tunnel));
                            s.connected_since = None;
                        });
                        break Step::Backoff;
                    }
                }
                c = self.cmd_rx.recv() => match c {
                    Some(Command::Connect) => continue,
                    Some(Command::Probe) => {
                        // Asked for by a stalled request; a probe that finds the connection
                        // alive (a stale ask, or a slow fleet API) changes nothing.
                        let limit = t.probe_timeout();
                        if matches!(tokio::time::timeout(limit, handle.send_ping()).await, Ok(Ok(()))) {
                            continue;
                        }
                        tracing::warn!("a request stalled and the tunnel host did not answer a keepalive within {limit:?}; reconnecting");
                        t.with_stats(|s| {
                            s.last_error = Some(format!(
                                "the tunnel host {} stopped answering (no reply to a keepalive within {})",
                                t.config.tunnel,
                                humantime::format_duration(limit)
                            ));
                            s.connected_since = None;
                            // Before the connection is closed: requests failing with it read
                            // this state and name the cause.
                            s.state = State::Backoff;
                        });
                        break Step::Backoff;
                    }
                    Some(Command::GiveUpInteractive(reply)) => {
                        let had = match interactive.take() {
                            Some(ch) => {
                                let _ = ch.close().await;
                                tracing::info!("gave up the interactive session: the tunnel host allows no more sessions (MaxSessions) and a command needs one");
                                t.with_stats(|s| {
                                    s.interactive = false;
                                    s.interactive_given_up = true;
                                });
                                true
                            }
                            None => false,
                        };
                        let _ = reply.send(had);
                    }
                    Some(Command::Disconnect) => break Step::Idle,
                    None => break Step::Stop,
                },
                _ = self.shutdown.cancelled() => break Step::Stop,
            }
        };
        t.link_tx.send_replace(Link::Down);
        t.with_stats(|s| s.interactive = false);
        drop(interactive);
        if !matches!(next, Step::Backoff) || !handle.is_closed() {
            let _ = handle
                .disconnect(
                    russh::Disconnect::ByApplication,
                    "fleet-broker closing",
                    "en",
                )
                .await;
            t.with_stats(|s| s.connected_since = None);
        }
        for hop in hops {
            let _ = hop
                .disconnect(
                    russh::Disconnect::ByApplication,
                    "fleet-broker closing",
                    "en",
                )
                .await;
        }
        next
    }
}
