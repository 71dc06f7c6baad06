//! What the daemon and its clients say to each other on the control socket: cluster health
//! ([`ClusterInfo`], [`Status`]), host-key reports, exec requests and errors ([`exec`]) and the
//! frame stream of a running session ([`frame`]). Pure data; both the daemon and the CLI use it.

/// Names the cluster on an answer the broker made itself because the tunnel could not carry
/// the request (never on fleetd's own answers); our fleetctl tells a tunnel fault by it.
pub const BROKER_ERROR_HEADER: &str = "fleet-broker-error";

pub mod exec;
pub mod frame;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A mutating command our fleetctl did not run on a guarded cluster, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardRefusal {
    /// The fleetctl command (`destroy`, `start`, …).
    pub command: String,
    /// The units it named.
    pub units: Vec<String>,
    /// Why it was not run.
    pub reason: String,
}

/// Where a cluster's tunnel is in its life (the supervisor's states, `tunnel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// No connection and none wanted until a request or `connect` comes.
    Idle,
    /// An attempt is under way.
    Connecting,
    /// The connection is up.
    Ready,
    /// Waiting before the next attempt.
    Backoff,
    /// Stopped on an error retrying cannot fix; waits for `connect` or a reload.
    Failed,
}

/// Counters and the current status, read by the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The supervisor's state.
    pub state: State,
    /// `SHA256:…` of the tunnel host's key on the live connection.
    pub host_key_fingerprint: Option<String>,
    /// When the live connection came up (RFC 3339).
    pub connected_since: Option<String>,
    /// Why the last attempt or connection failed.
    pub last_error: Option<String>,
    /// Connections lost and re-established.
    pub reconnects: u64,
    /// Connection attempts made, successful or not.
    #[serde(default)]
    pub connect_attempts: u64,
    /// Requests forwarded to the fleet API.
    pub requests: u64,
    /// Response bytes from the fleet API.
    pub bytes_in: u64,
    /// Request body bytes to the fleet API.
    pub bytes_out: u64,
    /// Median time to response headers over recent requests.
    pub latency_p50_ms: Option<f64>,
    /// 99th percentile time to response headers over recent requests.
    pub latency_p99_ms: Option<f64>,
    /// Whether the live connection carries an interactive (pty) session, so that sshd sends
    /// without Nagle delays (`interactive_session`).
    #[serde(default)]
    pub interactive_session: bool,
    /// The interactive session was closed so that a command could have its session slot
    /// (the tunnel host's `MaxSessions`).
    #[serde(default)]
    pub interactive_session_given_up: bool,
    /// How the fleet API is reached on the tunnel host: `streamlocal`, `fd-forward` or
    /// `direct-tcpip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// One cluster as the control socket reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The cluster's name in the config.
    pub name: String,
    /// `host:port` of the tunnel host.
    pub tunnel: String,
    /// The SSH user on the tunnel host.
    pub user: String,
    /// The fleet API endpoint as the tunnel host reaches it.
    pub endpoint: String,
    /// The local cluster socket.
    pub socket: PathBuf,
    /// How long the broker waits for a tunnel before answering 503.
    pub connect_timeout_secs: f64,
    /// The tunnel's state and counters.
    #[serde(flatten)]
    pub status: Status,
    /// The cluster's SSH front door, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front_door: Option<FrontDoorInfo>,
    /// `guard = true`: our fleetctl asks for the cluster's name before changing anything.
    #[serde(default)]
    pub guard: bool,
}

/// A cluster's front door as the control socket reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontDoorInfo {
    /// The loopback `address:port` it is configured on.
    pub address: String,
    /// Whether it is accepting connections.
    pub listening: bool,
    /// Why it is not, while it is not (it keeps trying).
    pub error: Option<String>,
}

/// `GET /v1/clusters`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterList {
    /// Every served cluster, by name.
    pub clusters: Vec<ClusterInfo>,
    /// The longest the daemon's thread has run late (its 10 ms lag probe), in milliseconds:
    /// anything that blocked it held up every cluster that long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_lag_max_ms: Option<f64>,
    /// The same less the time the thread waited for a CPU meanwhile (a busy machine): what
    /// the daemon's own work or a blocking call cost, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_blocked_max_ms: Option<f64>,
}

/// A presented host key and its standing, as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKeyReport {
    /// The machine ID asked about.
    pub machine: String,
    /// The known_hosts name the key is pinned under.
    pub name: String,
    /// `type base64`, as a known_hosts line carries it.
    pub key: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// `MD5:…`, as `ssh-keygen -l -E md5` prints it.
    pub md5: String,
    /// The key's standing in the cluster's known_hosts files.
    pub verdict: HostKeyVerdict,
    /// Where the host is pinned now (`file:line type fingerprint`).
    pub pins: Vec<String>,
}

/// A presented key's standing in the cluster's known_hosts files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKeyVerdict {
    /// Pinned (or signed by a pinned CA).
    Trusted,
    /// Not pinned under this name.
    Unknown,
    /// The name is pinned with other keys.
    Changed,
    /// Marked `@revoked`.
    Revoked,
}
