//! One SSH connection per cluster and the supervisor that keeps it up.
//!
//! The state machine lives in [`Supervisor::run`]: `Idle → Connecting → Ready → Lost →
//! Backoff → Connecting …`, plus `Failed` for errors retrying cannot fix (host key refused,
//! authentication refused), which wait for an operator action (`connect`, reload). Backoff
//! doubles from 250 ms to 30 s with full jitter. A request arriving when the tunnel is idle
//! starts an attempt; one arriving during backoff waits for the next scheduled attempt (never
//! shortening the wait, however many requests wait), and `connect` asks for one attempt now.
//! Users of the tunnel call [`Tunnel::link`] and get the live connection or, within the
//! connect timeout, the reason there is none.

pub(crate) mod channel;
pub mod dial;
pub(crate) mod quickack;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use russh::client::Handle;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

pub(crate) use dial::{ClientHandler, DialSpec};

use crate::config::{ClusterConfig, ConnectMode, InteractiveSession};
pub use crate::protocol::{State, Status};

pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(250);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a Ready tunnel compares the wall clock with the monotonic one.
const CLOCK_CHECK: Duration = Duration::from_secs(5);
/// A wall-clock jump this much larger than the monotonic clock's means a suspend.
const SUSPEND_JUMP: Duration = Duration::from_secs(10);
/// How long a probe after a suspend may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Latency samples kept per cluster for p50/p99.
const LATENCY_SAMPLES: usize = 1024;

/// The shared, live SSH connection.
pub(crate) type SshHandle = Arc<Handle<ClientHandler>>;

/// Why [`Tunnel::link`] has no connection to give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LinkError {
    /// The supervisor stopped on an error retrying cannot fix; it waits for an operator.
    #[error("{0}")]
    Failed(String),
    /// The daemon is stopping this cluster.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// No connection came up within `connect_timeout`.
    #[error("tunnel to {tunnel} not up after {}: {cause}", humantime::format_duration(*after))]
    NotUp {
        /// `host:port` of the tunnel host.
        tunnel: String,
        /// How long the request waited.
        after: Duration,
        /// The last attempt's error, or that one is still under way.
        cause: String,
    },
}

/// What a request sees of the tunnel.
#[derive(Clone)]
enum Link {
    Down,
    Up(SshHandle),
    Failed(String),
}

/// Commands for the supervisor.
#[derive(Debug)]
pub(crate) enum Command {
    Connect,
    Disconnect,
    /// A request stalled on the live connection: probe it now (a keepalive that must be
    /// answered within [`Tunnel::probe_timeout`]) and reconnect if it is not.
    Probe,
    /// A session could not be opened (`MaxSessions`): close the interactive session so that
    /// its slot is free; answers whether there was one.
    GiveUpInteractive(tokio::sync::oneshot::Sender<bool>),
}

#[derive(Debug)]
struct Stats {
    state: State,
    fingerprint: Option<String>,
    interactive: bool,
    /// The live connection reaches the fleet socket through `fleetctl fd-forward` (the
    /// tunnel host refused streamlocal, or the config says so).
    fd_forward: bool,
    /// The interactive session was closed to free a session slot (`MaxSessions`).
    interactive_given_up: bool,
    /// Permits taken out of `fd_forward_sessions` on this connection (the host's
    /// `MaxSessions`), given back on the next.
    fd_forward_forgotten: usize,
    connected_since: Option<SystemTime>,
    last_error: Option<String>,
    reconnects: u64,
    connect_attempts: u64,
    requests: u64,
    bytes_in: u64,
    bytes_out: u64,
    latencies_us: Vec<u64>,
    next_sample: usize,
}

/// One cluster's tunnel, shared by the proxy, the control socket and the supervisor.
pub(crate) struct Tunnel {
    pub config: ClusterConfig,
    /// The ssh-agent socket captured when the daemon started.
    agent: Option<PathBuf>,
    link_tx: watch::Sender<Link>,
    /// Woken by requests that find the tunnel down.
    wake: Notify,
    cmd_tx: mpsc::Sender<Command>,
    stats: Mutex<Stats>,
    /// Exec sessions the fd-forward transport may hold at once, under sshd's `MaxSessions`
    /// (10 by default; the interactive session takes one).
    pub(crate) fd_forward_sessions: Arc<tokio::sync::Semaphore>,
    /// Held while a request finds out why streamlocal was refused, so that requests at once
    /// ask the tunnel host one at a time (each question is an exec session).
    pub(crate) transport_probe: tokio::sync::Mutex<()>,
}

/// Sessions the fd-forward transport holds at most on one connection.
pub(crate) const FD_FORWARD_SESSIONS: usize = 8;

fn percentile(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0)
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Idle => "idle",
            State::Connecting => "connecting",
            State::Ready => "ready",
            State::Backoff => "backoff",
            State::Failed => "failed",
        })
    }
}

impl Tunnel {
    /// Creates the tunnel and spawns its supervisor; the supervisor stops when `shutdown` is cancelled.
    pub(crate) fn spawn(
        config: ClusterConfig,
        agent: Option<PathBuf>,
        shutdown: CancellationToken,
    ) -> Arc<Tunnel> {
        let (link_tx, _) = watch::channel(Link::Down);
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let tunnel = Arc::new(Tunnel {
            config,
            agent,
            link_tx,
            wake: Notify::new(),
            cmd_tx,
            stats: Mutex::new(Stats {
                state: State::Idle,
                fingerprint: None,
                interactive: false,
                fd_forward: false,
                interactive_given_up: false,
                fd_forward_forgotten: 0,
                connected_since: None,
                last_error: None,
                reconnects: 0,
                connect_attempts: 0,
                requests: 0,
                bytes_in: 0,
                bytes_out: 0,
                latencies_us: Vec::new(),
                next_sample: 0,
            }),
            fd_forward_sessions: Arc::new(tokio::sync::Semaphore::new(FD_FORWARD_SESSIONS)),
            transport_probe: tokio::sync::Mutex::new(()),
        });
        let sup = Supervisor {
            tunnel: tunnel.clone(),
            cmd_rx,
            shutdown,
            last_failure: None,
            repeats: 0,
        };
        tokio::spawn(tracing::Instrument::in_current_span(sup.run()));
        tunnel
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    /// The live connection, waiting up to `connect_timeout` for one (and asking for one).
    pub(crate) async fn link(&self) -> Result<SshHandle, LinkError> {
        let mut rx = self.link_tx.subscribe();
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout;
        loop {
            match &*rx.borrow_and_update() {
                Link::Up(h) if !h.is_closed() => return Ok(h.clone()),
                Link::Failed(msg) => return Err(LinkError::Failed(msg.clone())),
                _ => {}
            }
            self.wake.notify_one();
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(LinkError::ShuttingDown),
                Err(_) => {
                    return Err(LinkError::NotUp {
                        tunnel: self.config.tunnel.to_string(),
                        after: self.config.connect_timeout,
                        cause: self
                            .with_stats(|s| s.last_error.clone())
                            .unwrap_or_else(|| "still connecting".into()),
                    });
                }
            }
        }
    }

    /// Waits (at most `limit`) until the supervisor reports `state`; true if it did.
    pub(crate) async fn wait_for_state(&self, state: State, limit: Duration) -> bool {
        let mut rx = self.link_tx.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.with_stats(|s| s.state) == state {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.with_stats(|s| s.state) == state,
            }
        }
    }

    /// How long a probe of a stalled connection may take: a quarter of `connect_timeout`, so
    /// that a request stalled for half of it gets its answer within it.
    pub(crate) fn probe_timeout(&self) -> Duration {
        self.config.connect_timeout / 4
    }

    /// Asks the supervisor to probe the live connection, without waiting (a probe already
    /// asked for is enough).
    pub(crate) fn ask_probe(&self) {
        let _ = self.cmd_tx.try_send(Command::Probe);
    }

    /// Sends an operator command to the supervisor.
    pub(crate) async fn command(&self, cmd: Command) {
        if matches!(cmd, Command::Connect) {
            // From now on requests wait for the new attempt rather than see the old failure.
            self.link_tx.send_if_modified(|l| {
                let failed = matches!(l, Link::Failed(_));
                if failed {
                    *l = Link::Down;
                }
                failed
            });
        }
        let _ = self.cmd_tx.send(cmd).await;
    }

    fn with_stats<T>(&self, f: impl FnOnce(&mut Stats) -> T) -> T {
        let mut guard = match self.stats.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Records one proxied request.
    pub(crate) fn record_request(&self, elapsed: Duration, bytes_in: u64, bytes_out: u64) {
        self.with_stats(|s| {
            s.requests += 1;
            s.bytes_in += bytes_in;
            s.bytes_out += bytes_out;
            let us = elapsed.as_micros() as u64;
            if s.latencies_us.len() < LATENCY_SAMPLES {
                s.latencies_us.push(us);
            } else {
                let i = s.next_sample % LATENCY_SAMPLES;
                s.latencies_us[i] = us;
            }
            s.next_sample = s.next_sample.wrapping_add(1);
        });
    }

    pub(crate) fn add_bytes(&self, bytes_in: u64, bytes_out: u64) {
        self.with_stats(|s| {
            s.bytes_in += bytes_in;
            s.bytes_out += bytes_out;
        });
    }

    /// Whether the fleet socket is reached through `fleetctl fd-forward` on this connection.
    pub(crate) fn uses_fd_forward(&self) -> bool {
        self.config.transport == crate::config::Transport::FdForward
            || self.with_stats(|s| s.fd_forward)
    }

    /// Asks the supervisor to close the live connection's interactive session (its slot
    /// under the tunnel host's `MaxSessions`); true when it did.
    pub(crate) async fn give_up_interactive(&self) -> bool {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self
            .cmd_tx
            .send(Command::GiveUpInteractive(reply))
            .await
            .is_err()
        {
            return false;
        }
        matches!(
            tokio::time::timeout(Duration::from_secs(5), answer).await,
            Ok(Ok(true))
        )
    }

    /// Takes one session out of the fd-forward budget (the host refused one); false when only
    /// one is left, which stays. Restored on the next connection.
    pub(crate) fn shrink_fd_forward_budget(&self) -> bool {
        self.with_stats(|s| {
            if s.fd_forward_forgotten + 1 >= FD_FORWARD_SESSIONS {
                return false;
            }
            s.fd_forward_forgotten += 1;
            true
        })
    }

    /// Remembers, until the next connection, that the tunnel host refused streamlocal.
    pub(crate) fn fall_back_to_fd_forward(&self) {
        self.with_stats(|s| s.fd_forward = true);
    }

    pub(crate) fn status(&self) -> Status {
        self.with_stats(|s| {
            let mut lat = s.latencies_us.clone();
            lat.sort_unstable();
            Status {
                state: s.state,
                host_key_fingerprint: s.fingerprint.clone(),
                connected_since: s
                    .connected_since
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                last_error: s.last_error.clone(),
                reconnects: s.reconnects,
                connect_attempts: s.connect_attempts,
                requests: s.requests,
                bytes_in: s.bytes_in,
                bytes_out: s.bytes_out,
                latency_p50_ms: percentile(&lat, 0.50),
                latency_p99_ms: percentile(&lat, 0.99),
                interactive_session: s.interactive,
                interactive_session_given_up: s.interactive_given_up,
                transport: Some(
                    match (
                        &self.config.endpoint,
                        s.fd_forward
                            || self.config.transport == crate::config::Transport::FdForward,
                    ) {
                        (crate::config::Endpoint::Http { .. }, _) => "direct-tcpip",
                        (_, true) => "fd-forward",
                        (_, false) => "streamlocal",
                    }
                    .to_string(),
                ),
            }
        })
    }

    fn set_state(&self, state: State) {
        self.with_stats(|s| s.state = state);
    }

    fn dial_spec(&self) -> DialSpec {
        dial_spec(&self.config, self.agent.clone())
    }
}

/// The dial parameters of a cluster.
pub(crate) fn dial_spec(c: &ClusterConfig, agent: Option<PathBuf>) -> DialSpec {
    DialSpec {
        label: format!("cluster {:?}", c.name),
        target: c.tunnel.clone(),
        jump: c.jump.clone(),
        user: c.user.clone(),
        keys: crate::auth::KeySource {
            agent,
            identity_files: c.identity_files.clone(),
            certificate_files: c.certificate_files.clone(),
        },
        known_hosts: c.known_hosts.clone(),
        policy: c.host_key_checking,
        keepalive_interval: Some(c.keepalive_interval),
        keepalive_max: c.keepalive_max,
        trust_hint: format!("pin it with `fleet-broker trust {}`", c.name),
        forward_agent: false,
        window_size: dial::WINDOW_SIZE,
    }
}

enum Step {
    Idle,
    Connecting,
    Ready(dial::Connection),
    Backoff,
    Failed(String),
    Stop,
}

struct Supervisor {
    tunnel: Arc<Tunnel>,
    cmd_rx: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    /// The last connect failure logged, and how often it recurred since: a failure that
    /// repeats is logged once, with its count when something changes.
    last_failure: Option<String>,
    repeats: u64,
}

impl Supervisor {
    async fn run(mut self) {
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

/// Attempts to open a session after the interactive session was given up: its close takes a
/// round trip before sshd counts the slot free.
const ROOM_ATTEMPTS: u32 = 10;

/// Opens a session on `handle`. When sshd refuses it (`MaxSessions`) and `make_room` gives
/// up the connection's interactive session, opening is tried again (bounded), so the user's
/// command gets the slot.
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
            tracing::info!("sshd refused another session (MaxSessions); gave up the connection's interactive session for it");
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
