//! The config's value types: host key policy, connect mode, interactive session, transport,
//! `host[:port]`, the fleet endpoint and jump hops, each parsed from its TOML spelling with an
//! error naming what is wrong, and written back the same way.

use std::fmt;

use serde::Deserialize;

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

/// Why a value of the config (a host, an endpoint, a jump hop) does not parse; the message
/// quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// An empty host.
    #[error("host must not be empty")]
    EmptyHost,
    /// `[v6` without its `]`.
    #[error("{0:?}: missing ']' after IPv6 address")]
    UnclosedBracket(String),
    /// Something other than `:port` after `]`.
    #[error("{0:?}: expected ':port' after ']'")]
    AfterBracket(String),
    /// A host name with spaces or slashes.
    #[error("{0:?}: invalid host name")]
    HostName(String),
    /// A port out of range or not a number.
    #[error("{0:?}: port must be a number from 1 to 65535")]
    Port(String),
    /// A unix endpoint with a relative path.
    #[error("{0:?}: a unix endpoint needs an absolute path, e.g. unix:///var/run/fleet.sock")]
    RelativeSocket(String),
    /// An http endpoint with a path.
    #[error("{0:?}: an http endpoint must not have a path")]
    HttpPath(String),
    /// Neither unix:// nor http://.
    #[error(
        "{0:?}: endpoint must start with unix:// or http:// (https is not carried by the tunnel)"
    )]
    Scheme(String),
    /// `@host`.
    #[error("{0:?}: empty user before '@'")]
    EmptyUser(String),
}

impl HostPort {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`; port defaults to 22.
    pub(crate) fn parse(s: &str) -> Result<HostPort, ValueError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ValueError::EmptyHost);
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| ValueError::UnclosedBracket(s.to_string()))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| ValueError::AfterBracket(s.to_string()))?,
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
            return Err(ValueError::HostName(s.to_string()));
        }
        let port = match port {
            None => 22,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(ValueError::Port(s.to_string())),
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
    pub(crate) fn parse(s: &str) -> Result<Endpoint, ValueError> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(ValueError::RelativeSocket(s.to_string()));
            }
            return Ok(Endpoint::Unix(path.to_string()));
        }
        if let Some(rest) = s.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/');
            if authority.contains('/') {
                return Err(ValueError::HttpPath(s.to_string()));
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
        Err(ValueError::Scheme(s.to_string()))
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
    pub(crate) fn parse(s: &str) -> Result<JumpHop, ValueError> {
        let (user, rest) = match s.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(ValueError::EmptyUser(s.to_string())),
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
