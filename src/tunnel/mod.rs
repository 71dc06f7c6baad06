//! One SSH connection per cluster and the supervisor that keeps it up.
//!
//! The state machine lives in `supervisor` (`Supervisor::run`): `Idle → Connecting → Ready → Lost →
//! Backoff → Connecting …`, plus `Failed` for errors retrying cannot fix (host key refused,
//! authentication refused), which wait for an operator action (`connect`, reload). Backoff
//! doubles from 250 ms to 30 s with full jitter. A request arriving when the tunnel is idle
//! starts an attempt; one arriving during backoff waits for the next scheduled attempt (never
//! shortening the wait, however many requests wait), and `connect` asks for one attempt now.
//! Users of the tunnel call [`Tunnel::link`] and get the live connection or, within the
//! connect timeout, the reason there is none.

pub(crate) mod api;
pub(crate) mod channel;
pub mod dial;
mod open;
pub(crate) mod quickack;
mod supervisor;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use russh::client::Handle;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

pub(crate) use dial::{ClientHandler, DialSpec};
pub use open::open_endpoint;
pub(crate) use open::{open_interactive, open_session_making_room};
use supervisor::Supervisor;

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
    /// Counts the changing requests (anything but GET and HEAD) sent through this cluster's
    /// socket: what the daemon keeps of the cluster's answers is good only while it stays.
    changes: std::sync::atomic::AtomicU64,
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
            changes: std::sync::atomic::AtomicU64::new(0),
        });
        let sup = Supervisor::new(tunnel.clone(), cmd_rx, shutdown);
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

    /// Whether the connection is up now (without waiting or asking for one).
    pub(crate) fn is_up(&self) -> bool {
        matches!(&*self.link_tx.borrow(), Link::Up(h) if !h.is_closed())
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

    /// Notes a changing request on its way to the cluster.
    pub(crate) fn note_change(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many changing requests were sent so far ([`Tunnel::note_change`]).
    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::SeqCst)
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
