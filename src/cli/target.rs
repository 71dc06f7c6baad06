//! Which fleet API socket a command talks to. There is no global "current" cluster: a
//! `--cluster`, `--endpoint` (unix sockets only) or `--tunnel` choice, from the command line
//! or `FLEETCTL_*`, or else the only configured cluster. The CLI never opens a network
//! connection of its own.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::ArgMatches;

use super::args::GlobalFlags;
use crate::config::{HostPort, ValueError};
use crate::control::client::{default_control_socket, list_clusters, ControlError};
use crate::protocol::ClusterInfo;

/// Why no socket was chosen. An endpoint is refused in the words of Go's `url.Parse` and the
/// original fleetctl; the rest says which clusters there are and how to choose one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TargetError {
    #[error("URL scheme undefined")]
    NoScheme,
    #[error("unable to connect to host {host:?} with scheme {scheme:?}")]
    HostWithScheme { host: String, scheme: String },
    #[error("endpoint {0:?} has no socket path")]
    NoPath(String),
    #[error("{0}: this fleetctl talks only to fleet-broker's unix sockets and never opens network connections; add the cluster to fleet-broker's config and use --cluster NAME (or FLEETCTL_ENDPOINT=unix://…/clusters/NAME.sock)")]
    Network(String),
    #[error("unsupported URL scheme {0:?}")]
    Scheme(String),
    /// The daemon could not be asked for its clusters.
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("no cluster named {name:?} in fleet-broker ({})", listing(names))]
    NoSuchCluster { name: String, names: Vec<String> },
    #[error("--tunnel {0}")]
    Tunnel(ValueError),
    #[error("endpoint unix://{} is not the fleet endpoint of cluster {cluster:?} ({endpoint}), the only one the broker reaches on {tunnel}", path.display())]
    NotItsEndpoint {
        path: PathBuf,
        cluster: String,
        endpoint: String,
        tunnel: HostPort,
    },
    #[error("no fleet-broker cluster has tunnel {tunnel} ({}); add one to the broker's config or use --cluster NAME", listing(names))]
    NoSuchTunnel {
        tunnel: HostPort,
        names: Vec<String>,
    },
    #[error("no cluster chosen and fleet-broker has {} ({}); pass --cluster NAME, or set it for this shell with: eval \"$(fleet-broker env {})\"", if names.is_empty() { "none".to_string() } else { names.len().to_string() }, listing(names), names.first().map_or("NAME", String::as_str))]
    NotChosen { names: Vec<String> },
}

/// The chosen socket and how to name it in messages.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Target {
    pub socket: PathBuf,
    /// The broker cluster, when known.
    pub cluster: Option<String>,
    /// The control socket of the daemon serving it.
    pub control: PathBuf,
    /// How long the broker may wait for the cluster's tunnel (when known).
    pub connect_timeout_secs: Option<f64>,
    /// Whether the cluster is guarded (`guard = true`), when the daemon said so.
    pub guard: Option<bool>,
}

fn rank(m: &ArgMatches, id: &str) -> Option<u8> {
    match m.value_source(id)? {
        ValueSource::CommandLine => Some(0),
        ValueSource::EnvVariable => Some(1),
        _ => None,
    }
}

/// Parses `--endpoint` as fleetctl does, accepting only unix sockets.
pub(crate) fn parse_endpoint(raw: &str) -> Result<(PathBuf, Option<String>), TargetError> {
    let mut warning = None;
    let first = match raw.split_once(',') {
        Some((first, _)) => {
            warning = Some(format!(
                "multiple endpoints provided but only the first ({first}) is used"
            ));
            first
        }
        None => raw,
    };
    // As Go's url.Parse reads it: `unix:///p` and `unix:/p` both have the path `/p`.
    let (scheme, rest) = match first.split_once("://") {
        Some(sr) => sr,
        None => match first.split_once(':') {
            Some((scheme, path)) if path.starts_with('/') && matches!(scheme, "unix" | "file") => {
                (scheme, path)
            }
            _ => return Err(TargetError::NoScheme),
        },
    };
    match scheme {
        "unix" | "file" => {
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            };
            if !host.is_empty() {
                return Err(TargetError::HostWithScheme {
                    host: host.to_string(),
                    scheme: scheme.to_string(),
                });
            }
            if path.is_empty() {
                return Err(TargetError::NoPath(first.to_string()));
            }
            Ok((PathBuf::from(path), warning))
        }
        "http" | "https" => Err(TargetError::Network(first.to_string())),
        other => Err(TargetError::Scheme(other.to_string())),
    }
}

fn listing(names: &[String]) -> String {
    if names.is_empty() {
        "none are configured".into()
    } else {
        format!("configured: {}", names.join(", "))
    }
}

/// The flag that chooses the cluster: the one given most directly (command line, then
/// environment, then default), `--cluster` before `--endpoint` before `--tunnel` at a tie.
pub(crate) fn chosen_flag(m: &ArgMatches) -> Option<&'static str> {
    let mut choices: Vec<(u8, u8, &'static str)> = Vec::new();
    for (order, id) in [(0u8, "cluster"), (1, "endpoint"), (2, "tunnel")] {
        if let Some(r) = rank(m, id) {
            choices.push((r, order, id));
        }
    }
    choices.sort();
    choices.first().map(|c| c.2)
}

/// Resolves the target; warnings go to stderr.
pub(crate) async fn resolve(m: &ArgMatches, g: &GlobalFlags) -> Result<Target, TargetError> {
    let control = default_control_socket();
    let tunnel = g.tunnel.as_deref().filter(|_| rank(m, "tunnel").is_some());
    // With a tunnel, the original reads the endpoint on the tunnel host (its usual setup is
    // `FLEETCTL_TUNNEL=host FLEETCTL_ENDPOINT=unix:///var/run/fleet.sock`): such an endpoint
    // names the cluster's fleet socket, not a local one.
    let remote_endpoint = g
        .endpoint
        .as_deref()
        .filter(|_| rank(m, "endpoint").is_some())
        .and_then(|raw| parse_endpoint(raw).ok())
        .map(|(path, _)| path)
        .filter(|p| !is_cluster_socket(p));
    match (chosen_flag(m), tunnel) {
        (Some("endpoint"), Some(t)) if remote_endpoint.is_some() => {
            by_tunnel(t, remote_endpoint.as_deref(), control).await
        }
        (Some("endpoint"), _) => by_endpoint(g.endpoint.as_deref().unwrap_or_default(), control),
        (Some("cluster"), _) => by_name(g.cluster.as_deref().unwrap_or_default(), control).await,
        (Some(_), t) => by_tunnel(t.unwrap_or_default(), remote_endpoint.as_deref(), control).await,
        (None, _) => the_only_cluster(control).await,
    }
}

/// Whether `path` is a broker's cluster socket (`…/clusters/NAME.sock`).
fn is_cluster_socket(path: &std::path::Path) -> bool {
    path.parent()
        .is_some_and(|p| p.file_name() == Some("clusters".as_ref()))
}

pub(crate) fn target(c: ClusterInfo, control: PathBuf) -> Target {
    Target {
        socket: c.socket,
        cluster: Some(c.name),
        control,
        connect_timeout_secs: Some(c.connect_timeout_secs),
        guard: Some(c.guard),
    }
}

/// The cluster a broker's cluster socket serves, and its daemon's control socket:
/// `…/clusters/NAME.sock` gives NAME and `…/control.sock`.
pub(crate) fn broker_cluster_of(socket: &std::path::Path) -> Option<(String, PathBuf)> {
    let dir = socket
        .parent()
        .filter(|p| p.file_name() == Some("clusters".as_ref()))?;
    let name = socket.file_stem()?.to_string_lossy().into_owned();
    Some((name, crate::local::control_socket(dir.parent()?)))
}

/// `--endpoint unix://…`: the socket itself; a cluster socket of a broker also names its
/// cluster and control socket.
fn by_endpoint(raw: &str, control: PathBuf) -> Result<Target, TargetError> {
    let (socket, warning) = parse_endpoint(raw)?;
    if let Some(w) = warning {
        eprintln!(
            "{} WARN fleetctl.go:317: {w}",
            crate::fleet_client::chrono_like_now()
        );
    }
    let (cluster, control) = match broker_cluster_of(&socket) {
        Some((name, control)) => (Some(name), control),
        None => (None, control),
    };
    Ok(Target {
        socket,
        cluster,
        control,
        connect_timeout_secs: None,
        guard: None,
    })
}

/// `--cluster NAME`.
async fn by_name(name: &str, control: PathBuf) -> Result<Target, TargetError> {
    let list = list_clusters(&control).await?;
    let names: Vec<String> = list.clusters.iter().map(|c| c.name.clone()).collect();
    match list.clusters.into_iter().find(|c| c.name == name) {
        Some(c) => Ok(target(c, control)),
        None => Err(TargetError::NoSuchCluster {
            name: name.to_string(),
            names,
        }),
    }
}

/// `--tunnel HOST[:PORT]`: the cluster whose tunnel host it is. An endpoint given with it is
/// read on the tunnel host, so it must be the cluster's own.
async fn by_tunnel(
    raw: &str,
    endpoint: Option<&std::path::Path>,
    control: PathBuf,
) -> Result<Target, TargetError> {
    let want = HostPort::parse(raw).map_err(TargetError::Tunnel)?;
    let list = list_clusters(&control).await?;
    let names: Vec<String> = list
        .clusters
        .iter()
        .map(|c| format!("{} ({})", c.name, c.tunnel))
        .collect();
    match list
        .clusters
        .into_iter()
        .find(|c| HostPort::parse(&c.tunnel).is_ok_and(|t| t == want))
    {
        Some(c) => {
            if let Some(path) = endpoint {
                let ours = parse_endpoint(&c.endpoint).ok().map(|(p, _)| p);
                if ours.as_deref() != Some(path) {
                    return Err(TargetError::NotItsEndpoint {
                        path: path.to_path_buf(),
                        cluster: c.name,
                        endpoint: c.endpoint,
                        tunnel: want,
                    });
                }
            }
            Ok(target(c, control))
        }
        None => Err(TargetError::NoSuchTunnel {
            tunnel: want,
            names,
        }),
    }
}

/// No flag: the broker's only cluster, or a message saying how to choose.
async fn the_only_cluster(control: PathBuf) -> Result<Target, TargetError> {
    let mut list = list_clusters(&control).await?;
    if list.clusters.len() == 1 {
        if let Some(c) = list.clusters.pop() {
            return Ok(target(c, control));
        }
    }
    Err(TargetError::NotChosen {
        names: list.clusters.into_iter().map(|c| c.name).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_like_fleetctl() {
        assert_eq!(
            parse_endpoint("unix:///var/run/fleet.sock").unwrap().0,
            PathBuf::from("/var/run/fleet.sock")
        );
        assert_eq!(
            parse_endpoint("file:///x.sock").unwrap().0,
            PathBuf::from("/x.sock")
        );
        assert_eq!(
            parse_endpoint("/var/run/fleet.sock")
                .unwrap_err()
                .to_string(),
            "URL scheme undefined"
        );
        assert_eq!(
            parse_endpoint("unix://var/run/x").unwrap_err().to_string(),
            "unable to connect to host \"var\" with scheme \"unix\""
        );
        let (p, w) = parse_endpoint("unix:///a.sock,unix:///b.sock").unwrap();
        assert_eq!(p, PathBuf::from("/a.sock"));
        assert_eq!(
            w.unwrap(),
            "multiple endpoints provided but only the first (unix:///a.sock) is used"
        );
        assert!(parse_endpoint("http://10.0.0.1:49153")
            .unwrap_err()
            .to_string()
            .contains("never opens network connections"));
    }
}
