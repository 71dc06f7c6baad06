//! The broker's configuration: the TOML file of `[defaults]` and `[clusters.NAME]` tables,
//! parsed once into validated types. Every error names the file, line and column (or the
//! cluster and field) so the user can fix it; nothing outside this module sees raw strings
//! for durations, endpoints or policies.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

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

/// How an unknown or changed host key is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyPolicy {
    /// Unknown hosts are refused; the user pins them with `fleet-broker trust`.
    Strict,
    /// Unknown hosts are pinned on first use; changed keys are still refused.
    AcceptNew,
    /// No checking at all (warned about loudly at start).
    Off,
}

impl fmt::Display for HostKeyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostKeyPolicy::Strict => "strict",
            HostKeyPolicy::AcceptNew => "accept-new",
            HostKeyPolicy::Off => "off",
        })
    }
}

/// When the tunnel is first dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectMode {
    /// On the first local request.
    Lazy,
    /// As soon as the daemon starts.
    Eager,
}

/// Whether each tunnel connection, and each nested connection to a machine, carries an
/// interactive (pty) session, which makes sshd turn on TCP_NODELAY for the whole connection
/// as it does for `ssh -tt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InteractiveSession {
    /// Ask for one; go without, quietly, when sshd refuses it.
    Auto,
    /// Never ask for one.
    Off,
}

/// How the fleet API's unix socket is reached on the tunnel host (`transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// `direct-streamlocal@openssh.com`, and `fleetctl fd-forward` over an exec session when
    /// the tunnel host refuses it (`AllowStreamLocalForwarding no`), as the original does.
    Auto,
    /// `direct-streamlocal@openssh.com` only.
    Streamlocal,
    /// `fleetctl fd-forward PATH` on the tunnel host only (one SSH session a connection).
    FdForward,
}

/// `host[:port]` of an SSH server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// A host name or address (IPv6 without brackets).
    pub host: String,
    /// The TCP port.
    pub port: u16,
}

impl HostPort {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`; port defaults to 22.
    pub(crate) fn parse(s: &str) -> Result<HostPort, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("host must not be empty".into());
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: missing ']' after IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: expected ':port' after ']'"))?,
                ),
            };
            (h.to_string(), port)
        } else if s.matches(':').count() > 1 {
            (s.to_string(), None)
        } else if let Some((h, p)) = s.split_once(':') {
            (h.to_string(), Some(p))
        } else {
            (s.to_string(), None)
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(format!("{s:?}: invalid host name"));
        }
        let port = match port {
            None => 22,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("{s:?}: port must be a number from 1 to 65535")),
            },
        };
        Ok(HostPort { host, port })
    }

    /// The name OpenSSH writes into known_hosts for this host: `host` on port 22,
    /// `[host]:port` elsewhere.
    pub(crate) fn known_hosts_name(&self) -> String {
        known_hosts_name(&self.host, self.port)
    }
}

/// known_hosts spelling of a host and port.
pub(crate) fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where fleet's API listens, as seen from the tunnel host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket on the tunnel host, reached by `direct-streamlocal@openssh.com`.
    Unix(String),
    /// A TCP address reachable from the tunnel host, reached by `direct-tcpip`.
    Http {
        /// Host name or address, as the tunnel host resolves it.
        host: String,
        /// TCP port.
        port: u16,
    },
}

impl Endpoint {
    pub(crate) fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a unix endpoint needs an absolute path, e.g. unix:///var/run/fleet.sock"
                ));
            }
            return Ok(Endpoint::Unix(path.to_string()));
        }
        if let Some(rest) = s.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/');
            if authority.contains('/') {
                return Err(format!("{s:?}: an http endpoint must not have a path"));
            }
            let hp = HostPort::parse(authority)?;
            let port = if authority.contains(':') && !authority.ends_with(']') {
                hp.port
            } else {
                80
            };
            return Ok(Endpoint::Http {
                host: hp.host,
                port,
            });
        }
        Err(format!(
            "{s:?}: endpoint must start with unix:// or http:// (https is not carried by the tunnel)"
        ))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{p}"),
            Endpoint::Http { host, port } => write!(f, "http://{host}:{port}"),
        }
    }
}

/// A ProxyJump hop: `[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpHop {
    /// The hop's user; the cluster's `user` when absent.
    pub user: Option<String>,
    /// The hop's SSH server.
    pub target: HostPort,
}

impl JumpHop {
    pub(crate) fn parse(s: &str) -> Result<JumpHop, String> {
        let (user, rest) = match s.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(format!("{s:?}: empty user before '@'")),
            None => (None, s),
        };
        Ok(JumpHop {
            user,
            target: HostPort::parse(rest)?,
        })
    }
}

impl fmt::Display for JumpHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.user {
            Some(u) => write!(f, "{u}@{}", self.target),
            None => write!(f, "{}", self.target),
        }
    }
}

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
    /// The clusters, by name.
    pub clusters: BTreeMap<String, ClusterConfig>,
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
    clusters: BTreeMap<String, RawSettings>,
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
        let mut clusters = BTreeMap::new();
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
            "[clusters.{name}]\ntunnel = \"{tunnel}\"\njump = [{hops}]\nendpoint = \"{endpoint}\"\nuser = {user:?}\nidentity_files = {ids}\nknown_hosts = {kh}\nhost_key_checking = \"{hkc}\"\nkeepalive_interval = \"{ka}\"\nkeepalive_max = {kam}\nconnect_timeout = \"{ct}\"\nstalled_reader_timeout = \"{srt}\"\nconnect = \"{conn}\"\nmachine_ssh_port = {msp}\nread_only = {ro}\ninteractive_session = \"{isess}\"\n{door}",
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
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/fb.toml"), text)
    }

    #[test]
    fn unknown_keys_get_the_nearest_and_bare_numbers_the_unit() {
        let e = parse("[clusters.a]\ntunnel = \"h\"\nusr = \"core\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `user`?"), "{e}");
        let e = parse("[clusters.a]\ntunnel = \"h\"\nzzzzzzzz = 1\n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("did you mean"), "{e}");
        let e = parse("[clusters.a]\ntunnel = \"h\"\nconnect_timeout = 10\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("write \"10s\""), "{e}");
        assert!(e.starts_with("/etc/fb.toml:3:"), "{e}");
    }

    #[test]
    fn front_door_is_loopback_only_and_per_cluster() {
        let ok = parse("[clusters.a]\ntunnel = \"h\"\nfront_door = \"127.0.0.1:2222\"\n").unwrap();
        assert_eq!(
            ok.clusters["a"].front_door,
            Some("127.0.0.1:2222".parse().unwrap())
        );
        for bad in [
            "0.0.0.0:2222",
            "192.168.1.5:22",
            "127.0.0.1:0",
            "localhost:22",
            "[::]:22",
        ] {
            let e = parse(&format!(
                "[clusters.a]\ntunnel = \"h\"\nfront_door = \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("front_door") && e.starts_with("/etc/fb.toml:3:"),
                "{bad}: {e}"
            );
        }
        let e =
            parse("[defaults]\nfront_door = \"127.0.0.1:2222\"\n[clusters.a]\ntunnel = \"h\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("not in [defaults]"), "{e}");
        let e = parse("[clusters.a]\ntunnel = \"h\"\nfront_door = \"127.0.0.1:2222\"\n[clusters.b]\ntunnel = \"h\"\nfront_door = \"127.0.0.1:2222\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("already cluster \"a\"'s"), "{e}");
    }

    #[test]
    fn defaults_apply_and_clusters_override_them() {
        let c = parse(
            "[defaults]\nuser = \"elroy\"\nconnect_timeout = \"3s\"\n\n[clusters.prod]\ntunnel = \"bastion:2222\"\n\n[clusters.dev]\ntunnel = \"10.0.0.1\"\nuser = \"jane\"\nendpoint = \"http://10.0.0.5:49153\"\n",
        )
        .expect("valid config");
        let prod = &c.clusters["prod"];
        assert_eq!(prod.user, "elroy");
        assert_eq!(
            prod.tunnel,
            HostPort {
                host: "bastion".into(),
                port: 2222
            }
        );
        assert_eq!(prod.connect_timeout, Duration::from_secs(3));
        assert_eq!(prod.endpoint, Endpoint::Unix("/var/run/fleet.sock".into()));
        assert_eq!(prod.host_key_checking, HostKeyPolicy::Strict);
        let dev = &c.clusters["dev"];
        assert_eq!(dev.user, "jane");
        assert_eq!(dev.tunnel.port, 22);
        assert_eq!(
            dev.endpoint,
            Endpoint::Http {
                host: "10.0.0.5".into(),
                port: 49153
            }
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_column() {
        let e = parse("[clusters.prod]\ntunnel = \"h\"\ntunel = \"x\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("/etc/fb.toml:3:1: unknown field `tunel`"),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_are_rejected_with_position() {
        let e = parse("[clusters.a]\ntunnel = \"h\"\nhost_key_checking = \"maybe\"\n").unwrap_err();
        assert!(e.to_string().starts_with("/etc/fb.toml:3:"), "{e}");
        assert!(e.to_string().contains("maybe"), "{e}");
        let e = parse("[clusters.a]\ntunnel = \"h\"\nkeepalive_interval = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("invalid duration \"soon\""), "{e}");
        let e = parse("[clusters.a]\ntunnel = \"h:99999\"\n").unwrap_err();
        assert!(e.to_string().contains("port must be a number"), "{e}");
        let e = parse("[clusters.a]\ntunnel = \"h\"\nendpoint = \"https://x\"\n").unwrap_err();
        assert!(e.to_string().contains("endpoint must start with"), "{e}");
        let e = parse("[clusters.a]\n").unwrap_err();
        assert!(e.to_string().contains("missing field `tunnel`"), "{e}");
    }

    #[test]
    fn durations_and_counts_are_range_checked() {
        for (line, field) in [
            ("connect_timeout = \"500000000000y\"", "connect_timeout"),
            ("connect_timeout = \"1ms\"", "connect_timeout"),
            ("keepalive_interval = \"0s\"", "keepalive_interval"),
            ("keepalive_interval = \"2days\"", "keepalive_interval"),
            ("keepalive_max = 0", "keepalive_max"),
            ("keepalive_max = 100000", "keepalive_max"),
        ] {
            let e = parse(&format!("[clusters.a]\ntunnel = \"h\"\n{line}\n")).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("/etc/fb.toml:3:"), "{msg}");
            assert!(msg.contains("out of range: allowed from"), "{msg}");
            assert!(msg.contains(field), "{msg}");
        }
        let c =
            parse("[clusters.a]\ntunnel = \"h\"\nconnect_timeout = \"10m\"\nkeepalive_max = 100\n")
                .expect("limits are allowed");
        assert_eq!(c.clusters["a"].connect_timeout, Duration::from_secs(600));
    }

    #[test]
    fn cluster_names_are_restricted() {
        let e = parse("[clusters.\"a/b\"]\ntunnel = \"h\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/fb.toml:1:1: cluster name \"a/b\" may only contain letters, digits, '_', '.' and '-'"
        );
        assert!(valid_cluster_name("prod-1.eu_west"));
        assert!(!valid_cluster_name(".."));
    }

    #[test]
    fn hostport_forms() {
        assert_eq!(
            HostPort::parse("[::1]:2200").unwrap(),
            HostPort {
                host: "::1".into(),
                port: 2200
            }
        );
        assert_eq!(HostPort::parse("::1").unwrap().port, 22);
        assert_eq!(HostPort::parse("h:22").unwrap().known_hosts_name(), "h");
        assert_eq!(
            HostPort::parse("h:2222").unwrap().known_hosts_name(),
            "[h]:2222"
        );
        assert!(HostPort::parse("h:0").is_err());
        assert!(HostPort::parse("").is_err());
        let j = JumpHop::parse("ops@jump.example:2200").unwrap();
        assert_eq!(j.user.as_deref(), Some("ops"));
        assert_eq!(
            j.target,
            HostPort {
                host: "jump.example".into(),
                port: 2200
            }
        );
        assert_eq!(JumpHop::parse("j").unwrap().to_string(), "j:22");
        assert!(JumpHop::parse("@j").is_err());
    }
}
