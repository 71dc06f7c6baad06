//! The broker's configuration: the TOML file of `[defaults]` and `[clusters.NAME]` tables,
//! parsed once into validated types. Every error names the file, line and column (or the
//! cluster and field) so the user can fix it; nothing outside this module sees raw strings
//! for durations, endpoints or policies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer};

mod values;

/// Default user on CoreOS hosts, as fleetctl assumed.
pub(crate) const DEFAULT_USER: &str = "core";
pub(crate) const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub(crate) const DEFAULT_KEEPALIVE_MAX: usize = 3;
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_KNOWN_HOSTS: [&str; 2] = ["~/.fleetctl/known_hosts", "~/.ssh/known_hosts"];

/// Why a config file was refused; each names the file (and the line, or the field).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// Not valid TOML, or a value of the wrong type.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// Valid TOML that does not make a valid config (the message names the field).
    #[error("{path}: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the cluster and field.
        message: String,
    },
}

pub(crate) use values::known_hosts_name;
pub use values::{
    ConnectMode, Endpoint, HostKeyPolicy, HostPort, InteractiveSession, JumpHop, Transport,
    ValueError,
};

/// One named cluster, with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The cluster's name: the table name, and the socket's.
    pub name: String,
    /// The tunnel host's SSH server.
    pub tunnel: HostPort,
    /// ProxyJump hops to go through before the tunnel host, in order.
    pub jump: Vec<JumpHop>,
    /// Where fleet's API listens, as the tunnel host reaches it.
    pub endpoint: Endpoint,
    /// The SSH user on the tunnel host and the machines.
    pub user: String,
    /// Tried after the agent; their agent twins are offered first.
    pub identity_files: Vec<PathBuf>,
    /// User certificates (OpenSSH's `CertificateFile`), offered with the matching key of the
    /// agent or of an identity file; `KEY-cert.pub` beside an identity file is found without.
    pub certificate_files: Vec<PathBuf>,
    /// Pins are read from all; accept-new writes to the first.
    pub known_hosts: Vec<PathBuf>,
    /// What to do with hosts whose key is not pinned.
    pub host_key_checking: HostKeyPolicy,
    /// How often an idle connection is probed.
    pub keepalive_interval: Duration,
    /// Missed keepalives before the tunnel is declared dead.
    pub keepalive_max: usize,
    /// Bounds TCP connect + SSH handshake + authentication, and how long a request waits
    /// for a tunnel that is not up.
    pub connect_timeout: Duration,
    /// A local client that takes nothing of an API answer for this long, while the answer
    /// waits, has its upstream channel closed (shorter pauses lose nothing).
    pub stalled_reader_timeout: Duration,
    /// When the tunnel is first dialled.
    pub connect: ConnectMode,
    /// sshd's port on the cluster's machines (`fleetctl --ssh-port` overrides it).
    pub machine_ssh_port: u16,
    /// When true the broker refuses PUT/DELETE/PATCH with 403.
    pub read_only: bool,
    /// When true our fleetctl asks for the cluster's name before it changes anything there
    /// (`--confirm-cluster NAME` without a terminal); other clients are not held up.
    pub guard: bool,
    /// Whether connections carry an interactive session (no Nagle delays on sshd's side).
    pub interactive_session: InteractiveSession,
    /// How a unix `endpoint` is reached on the tunnel host.
    pub transport: Transport,
    /// A loopback address where the unchanged original fleetctl can use the warm tunnel as
    /// its `--tunnel` (`front_door`).
    pub front_door: Option<std::net::SocketAddr>,
    /// Public keys the front door accepts besides the agent's and `identity_files`'.
    pub front_door_authorized_keys: Option<PathBuf>,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// The clusters by name, in the order the file lists them.
    pub clusters: IndexMap<String, ClusterConfig>,
    /// Where mutating requests and exec sessions are recorded (`audit_log`).
    pub audit_log: AuditLogSetting,
}

/// `audit_log`: where the audit trail goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AuditLogSetting {
    /// `audit.jsonl` in the state directory.
    #[default]
    Default,
    /// No audit trail (`audit_log = "off"`).
    Off,
    /// This file.
    File(PathBuf),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    /// `"off"`, or the audit log's path (default: the state directory's audit.jsonl).
    audit_log: Option<String>,
    #[serde(default)]
    defaults: RawSettings,
    #[serde(default)]
    clusters: IndexMap<String, RawSettings>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default, deserialize_with = "de_hostport")]
    tunnel: Option<HostPort>,
    #[serde(default, deserialize_with = "de_jump")]
    jump: Option<Vec<JumpHop>>,
    user: Option<String>,
    identity_files: Option<Vec<String>>,
    certificate_files: Option<Vec<String>>,
    known_hosts: Option<Vec<String>>,
    host_key_checking: Option<HostKeyPolicy>,
    #[serde(default, deserialize_with = "de_keepalive_interval")]
    keepalive_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_keepalive_max")]
    keepalive_max: Option<usize>,
    #[serde(default, deserialize_with = "de_connect_timeout")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_stalled_reader_timeout")]
    stalled_reader_timeout: Option<Duration>,
    connect: Option<ConnectMode>,
    interactive_session: Option<InteractiveSession>,
    transport: Option<Transport>,
    machine_ssh_port: Option<u16>,
    read_only: Option<bool>,
    guard: Option<bool>,
    #[serde(default, deserialize_with = "de_endpoint")]
    endpoint: Option<Endpoint>,
    #[serde(default, deserialize_with = "de_front_door")]
    front_door: Option<std::net::SocketAddr>,
    front_door_authorized_keys: Option<String>,
}

/// Allowed range of `keepalive_interval`.
pub(crate) const KEEPALIVE_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
/// Allowed range of `connect_timeout`.
pub(crate) const CONNECT_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(600));
/// Allowed range of `stalled_reader_timeout`.
pub(crate) const STALLED_READER_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(86400));
/// `stalled_reader_timeout` when none is given.
pub const DEFAULT_STALLED_READER_TIMEOUT: Duration = Duration::from_secs(60);
/// Allowed range of `keepalive_max`.
pub(crate) const KEEPALIVE_MAX_RANGE: (usize, usize) = (1, 100);

fn de_duration_in<'de, D: Deserializer<'de>>(
    d: D,
    field: &str,
    (min, max): (Duration, Duration),
) -> Result<Option<Duration>, D::Error> {
    /// A duration as written: a string with a unit, or a bare number (refused, with the
    /// string it should be).
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Number(f64),
    }
    let s = match Written::deserialize(d)? {
        Written::Text(s) => s,
        Written::Number(n) => {
            return Err(serde::de::Error::custom(format!(
                "{field} is a duration with a unit: write \"{n}s\" (or \"{}ms\"), not {n}",
                n * 1000.0
            )))
        }
    };
    let v = humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?}: {e} (write e.g. \"15s\" or \"500ms\")"
        ))
    })?;
    if v < min || v > max {
        return Err(serde::de::Error::custom(format!(
            "{field} {s:?} is out of range: allowed from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        )));
    }
    Ok(Some(v))
}

fn de_keepalive_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration_in(d, "keepalive_interval", KEEPALIVE_INTERVAL_RANGE)
}

fn de_connect_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration_in(d, "connect_timeout", CONNECT_TIMEOUT_RANGE)
}

fn de_stalled_reader_timeout<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration_in(d, "stalled_reader_timeout", STALLED_READER_TIMEOUT_RANGE)
}

fn de_keepalive_max<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let v = usize::deserialize(d)?;
    let (min, max) = KEEPALIVE_MAX_RANGE;
    if !(min..=max).contains(&v) {
        return Err(serde::de::Error::custom(format!(
            "keepalive_max {v} is out of range: allowed from {min} to {max}"
        )));
    }
    Ok(Some(v))
}

fn de_hostport<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HostPort>, D::Error> {
    let s = String::deserialize(d)?;
    HostPort::parse(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn de_jump<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<JumpHop>>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|h| JumpHop::parse(h))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `front_door`: a loopback `address:port` only; every local user can reach loopback, and
/// nothing else should reach this at all.
fn de_front_door<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    let addr: std::net::SocketAddr = s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "front_door {s:?}: expected a loopback address and port, such as \"127.0.0.1:2222\""
        ))
    })?;
    if !addr.ip().is_loopback() || addr.port() == 0 {
        return Err(serde::de::Error::custom(format!(
            "front_door {s:?}: must be a loopback address (127.0.0.0/8 or ::1) with a port other than 0"
        )));
    }
    Ok(Some(addr))
}

fn de_endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Endpoint>, D::Error> {
    let s = String::deserialize(d)?;
    Endpoint::parse(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Is `name` usable as a cluster name (and so as a socket file name)?
pub fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Expands `~` and a leading `~/` from `$HOME`.
pub fn expand_tilde(p: &str) -> PathBuf {
    if p == "~" {
        return home_dir();
    }
    match p.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None => PathBuf::from(p),
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The config file path: `$FLEET_BROKER_CONFIG`, else `$XDG_CONFIG_HOME/fleet-broker/config.toml`,
/// else `~/.config/fleet-broker/config.toml`.
pub fn default_config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEET_BROKER_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir().join(".config"));
    base.join("fleet-broker").join("config.toml")
}

/// serde's `unknown field `usr`, expected one of …` with the nearest known key suggested.
fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let nearest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (edit_distance(unknown, k), k))
        .min();
    match nearest {
        Some((d, k)) if d <= 2.max(unknown.len() / 3) => {
            format!("{message}; did you mean `{k}`?")
        }
        _ => message.to_string(),
    }
}

/// Levenshtein distance of two short keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

impl Config {
    /// The cluster names, in the file's order, for messages: `a, b, c`.
    pub fn names(&self) -> String {
        self.clusters
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (used in error messages).
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: with_suggestion(e.message().trim()),
            }
        })?;
        let not_a_default = |message: &str| {
            let (line, column) = line_col(text, text.find("[defaults]").unwrap_or(0));
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: message.into(),
            }
        };
        if raw.defaults.front_door.is_some() {
            return Err(not_a_default("`front_door` belongs in a [clusters.NAME] table (each cluster needs a port of its own), not in [defaults]"));
        }
        if raw.defaults.tunnel.is_some() {
            return Err(not_a_default(
                "`tunnel` belongs in a [clusters.NAME] table, not in [defaults]",
            ));
        }
        let mut clusters = IndexMap::new();
        for (name, rc) in raw.clusters {
            let at = |message: String| {
                let header = format!("[clusters.{name}]");
                let quoted = format!("[clusters.\"{name}\"]");
                match text.find(&header).or_else(|| text.find(&quoted)) {
                    Some(off) => {
                        let (line, column) = line_col(text, off);
                        ConfigError::Syntax {
                            path: path.to_path_buf(),
                            line,
                            column,
                            message,
                        }
                    }
                    None => ConfigError::Invalid {
                        path: path.to_path_buf(),
                        message,
                    },
                }
            };
            if !valid_cluster_name(&name) {
                return Err(at(format!(
                    "cluster name {name:?} may only contain letters, digits, '_', '.' and '-'"
                )));
            }
            let Some(tunnel) = rc.tunnel.clone() else {
                return Err(at(format!(
                    "cluster {name:?}: missing field `tunnel` (the SSH host[:port] that reaches fleet)"
                )));
            };
            if let Some(addr) = rc.front_door {
                if let Some(other) = clusters
                    .values()
                    .find(|c: &&ClusterConfig| c.front_door == Some(addr))
                {
                    return Err(at(format!(
                        "cluster {name:?}: front_door {addr} is already cluster {:?}'s",
                        other.name
                    )));
                }
            }
            let c = merge(&name, tunnel, rc, &raw.defaults);
            if c.user.is_empty() {
                return Err(at(format!("cluster {name:?}: user must not be empty")));
            }
            if c.known_hosts.is_empty() && c.host_key_checking != HostKeyPolicy::Off {
                return Err(at(format!(
                    "cluster {name:?}: known_hosts is empty; list at least one file or set host_key_checking = \"off\""
                )));
            }
            clusters.insert(name, c);
        }
        Ok(Config {
            path: path.to_path_buf(),
            clusters,
            audit_log: match raw.audit_log.as_deref() {
                None => AuditLogSetting::Default,
                Some("off") => AuditLogSetting::Off,
                Some(p) => AuditLogSetting::File(expand_tilde(p)),
            },
        })
    }
}

fn merge(name: &str, tunnel: HostPort, s: RawSettings, d: &RawSettings) -> ClusterConfig {
    let paths =
        |v: Option<Vec<String>>, dv: &Option<Vec<String>>, default: &[&str]| -> Vec<PathBuf> {
            v.or_else(|| dv.clone())
                .unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
                .iter()
                .map(|p| expand_tilde(p))
                .collect()
        };
    ClusterConfig {
        name: name.to_string(),
        tunnel,
        jump: s.jump.or_else(|| d.jump.clone()).unwrap_or_default(),
        endpoint: s
            .endpoint
            .or_else(|| d.endpoint.clone())
            .unwrap_or_else(|| Endpoint::Unix("/var/run/fleet.sock".into())),
        user: s
            .user
            .or_else(|| d.user.clone())
            .unwrap_or_else(|| DEFAULT_USER.into()),
        identity_files: paths(s.identity_files, &d.identity_files, &[]),
        certificate_files: paths(s.certificate_files, &d.certificate_files, &[]),
        known_hosts: paths(s.known_hosts, &d.known_hosts, &DEFAULT_KNOWN_HOSTS),
        host_key_checking: s
            .host_key_checking
            .or(d.host_key_checking)
            .unwrap_or(HostKeyPolicy::Strict),
        keepalive_interval: s
            .keepalive_interval
            .or(d.keepalive_interval)
            .unwrap_or(DEFAULT_KEEPALIVE_INTERVAL),
        keepalive_max: s
            .keepalive_max
            .or(d.keepalive_max)
            .unwrap_or(DEFAULT_KEEPALIVE_MAX)
            .max(1),
        connect_timeout: s
            .connect_timeout
            .or(d.connect_timeout)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        stalled_reader_timeout: s
            .stalled_reader_timeout
            .or(d.stalled_reader_timeout)
            .unwrap_or(DEFAULT_STALLED_READER_TIMEOUT),
        connect: s.connect.or(d.connect).unwrap_or(ConnectMode::Lazy),
        transport: s.transport.or(d.transport).unwrap_or(Transport::Auto),
        interactive_session: s
            .interactive_session
            .or(d.interactive_session)
            .unwrap_or(InteractiveSession::Auto),
        machine_ssh_port: s.machine_ssh_port.or(d.machine_ssh_port).unwrap_or(22),
        read_only: s.read_only.or(d.read_only).unwrap_or(false),
        guard: s.guard.or(d.guard).unwrap_or(false),
        front_door: s.front_door,
        front_door_authorized_keys: s
            .front_door_authorized_keys
            .or_else(|| d.front_door_authorized_keys.clone())
            .map(|p| expand_tilde(&p)),
    }
}

impl ClusterConfig {
    /// The effective settings as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        let hops: Vec<String> = self
            .jump
            .iter()
            .map(|h| format!("{:?}", h.to_string()))
            .collect();
        let list = |v: &[PathBuf]| {
            let items: Vec<String> = v
                .iter()
                .map(|p| format!("{:?}", p.display().to_string()))
                .collect();
            format!("[{}]", items.join(", "))
        };
        format!(
            "[clusters.{name}]\ntunnel = \"{tunnel}\"\njump = [{hops}]\nendpoint = \"{endpoint}\"\nuser = {user:?}\nidentity_files = {ids}\nknown_hosts = {kh}\nhost_key_checking = \"{hkc}\"\nkeepalive_interval = \"{ka}\"\nkeepalive_max = {kam}\nconnect_timeout = \"{ct}\"\nstalled_reader_timeout = \"{srt}\"\nconnect = \"{conn}\"\nmachine_ssh_port = {msp}\nread_only = {ro}\nguard = {guard}\ninteractive_session = \"{isess}\"\n{door}",
            name = self.name,
            tunnel = self.tunnel,
            hops = hops.join(", "),
            endpoint = self.endpoint,
            user = self.user,
            ids = list(&self.identity_files),
            kh = list(&self.known_hosts),
            hkc = self.host_key_checking,
            ka = humantime::format_duration(self.keepalive_interval),
            kam = self.keepalive_max,
            ct = humantime::format_duration(self.connect_timeout),
            srt = humantime::format_duration(self.stalled_reader_timeout),
            conn = match self.connect {
                ConnectMode::Lazy => "lazy",
                ConnectMode::Eager => "eager",
            },
            msp = self.machine_ssh_port,
            ro = self.read_only,
            guard = self.guard,
            isess = match self.interactive_session {
                InteractiveSession::Auto => "auto",
                InteractiveSession::Off => "off",
            },
            door = match self.front_door {
                Some(a) => format!("front_door = \"{a}\"\n"),
                None => String::new(),
            } + match self.transport {
                Transport::Auto => "",
                Transport::Streamlocal => "transport = \"streamlocal\"\n",
                Transport::FdForward => "transport = \"fd-forward\"\n",
            } + &if self.certificate_files.is_empty() {
                String::new()
            } else {
                format!("certificate_files = {}\n", list(&self.certificate_files))
            },
        )
    }
}

#[cfg(test)]
mod tests;
