//! `fleet-broker trust CLUSTER`: shows the host key a cluster's tunnel host presents and,
//! once the user confirms it, pins it in the first known_hosts file of that cluster. A key
//! that contradicts an existing pin is never replaced here: the old pin must be removed by
//! hand first, after the change was checked.
//!
//! Everything shown is computed here from the key's bytes (never taken from a server's or
//! the daemon's words), the answer comes from the controlling terminal (never stdin, which a
//! pipe can fill), and scripts name the fingerprint they checked instead of saying yes.

use std::io::{BufRead, Write};
use std::time::Duration;

use crate::config::ClusterConfig;
use crate::known_hosts::{
    append_pin, fingerprint_md5, fingerprint_sha256, HostId, KnownHosts, KnownHostsError, Verdict,
};
use crate::tunnel::dial::{dial, presented_key, presented_key_over, DialError, DialSpec};

/// Why a key was not pinned.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The key is revoked or contradicts a pin, the user said no, or it is not a key the
    /// script named: the message says which and what to do.
    #[error("{0}")]
    NotPinned(String),
    /// No terminal to ask on (or to stand behind `--yes`).
    #[error("{0}")]
    NoTerminal(String),
    /// The host did not show its key.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The host did not answer in time.
    #[error("connecting to {0} timed out")]
    Timeout(String),
    /// The daemon could not report a machine's key, or reported one that cannot be pinned.
    #[error("{0}")]
    Daemon(String),
    /// The cluster's known_hosts files.
    #[error(transparent)]
    KnownHosts(#[from] KnownHostsError),
    /// The terminal.
    #[error("the terminal: {0}")]
    Tty(#[from] std::io::Error),
}

/// Runs the trust flow for the tunnel host and, first, each jump host on the way to it
/// (reached through the hops before it, which must be trusted by then). Returns the lines to
/// print.
pub async fn trust(cluster: &ClusterConfig, confirm: &Confirm) -> Result<String, TrustError> {
    let full = crate::tunnel::dial_spec(cluster, crate::auth::KeySource::from_env(&[]).agent);
    let limit = cluster.connect_timeout.max(Duration::from_secs(1));
    let mut lines = Vec::new();
    for i in 0..=cluster.jump.len() {
        let (target, user) = match cluster.jump.get(i) {
            Some(hop) => (
                hop.target.clone(),
                hop.user.clone().unwrap_or_else(|| cluster.user.clone()),
            ),
            None => (cluster.tunnel.clone(), cluster.user.clone()),
        };
        let spec = DialSpec {
            target: target.clone(),
            user,
            jump: Vec::new(),
            ..full.clone()
        };
        let seen = tokio::time::timeout(limit, async {
            if i == 0 {
                return presented_key(&spec).await;
            }
            // Through the hops before this one: dial the previous hop via the ones before it.
            let prev = &cluster.jump[i - 1];
            let via = DialSpec {
                target: prev.target.clone(),
                user: prev.user.clone().unwrap_or_else(|| cluster.user.clone()),
                jump: cluster.jump[..i - 1].to_vec(),
                ..full.clone()
            };
            let conn = dial(&via).await?;
            let ch = conn
                .handle
                .channel_open_direct_tcpip(
                    target.host.clone(),
                    u32::from(target.port),
                    "127.0.0.1",
                    0,
                )
                .await
                .map_err(|e| DialError::Connect {
                    target: target.to_string(),
                    reason: format!("jump host could not connect: {e}"),
                })?;
            presented_key_over(&spec, crate::tunnel::channel::DrainedChannel::new(ch)).await
        })
        .await
        .map_err(|_| TrustError::Timeout(target.to_string()))??;
        let what = if i < cluster.jump.len() {
            format!("jump host {target}")
        } else {
            target.to_string()
        };
        lines.push(judge(
            cluster,
            &what,
            &seen.host,
            &seen.key,
            seen.verdict,
            confirm,
        )?);
    }
    Ok(lines.join("\n"))
}

/// How the user agrees to a pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    /// Ask on the controlling terminal.
    Ask,
    /// `--yes`: the user at the terminal has checked the fingerprint already.
    Yes,
    /// `--fingerprint`: pin only keys with one of these fingerprints (`SHA256:…` or `MD5:…`).
    Fingerprints(Vec<String>),
    /// `--trust-on-first-use`: pin whatever key the host presents now, without asking; for
    /// scripts that accept that risk, named as such.
    TrustOnFirstUse,
}

impl Confirm {
    /// Refuses `--yes` without a terminal before anything is dialled: a script must say
    /// which key it checked.
    pub fn check_usable(&self) -> Result<(), TrustError> {
        if *self == Confirm::Yes && open_tty().is_err() {
            return Err(TrustError::NoTerminal("--yes needs a terminal (it stands for a person who checked the fingerprint); scripts pass --fingerprint SHA256:… with the fingerprint they checked".into()));
        }
        Ok(())
    }
}

fn open_tty() -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
}

/// Asks `question` on the controlling terminal; true for yes.
fn ask_tty(question: &str) -> Result<bool, TrustError> {
    let mut tty = open_tty().map_err(|e| {
        TrustError::NoTerminal(format!("no terminal to confirm on ({e}); pass --fingerprint SHA256:… with the fingerprint you checked"))
    })?;
    tty.write_all(question.as_bytes())?;
    tty.flush()?;
    let mut answer = String::new();
    std::io::BufReader::new(tty).read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "yes" | "y"
    ))
}

/// Pins a presented key after confirmation, or says why not.
fn judge(
    cluster: &ClusterConfig,
    what: &str,
    host: &HostId,
    key: &russh::keys::PublicKey,
    verdict: Verdict,
    confirm: &Confirm,
) -> Result<String, TrustError> {
    let fp = fingerprint_sha256(key);
    let md5 = fingerprint_md5(key);
    let alg = key.algorithm();
    match verdict {
        Verdict::Trusted(pin) => {
            return Ok(format!(
                "cluster {:?}: {what}: {} {fp} is already pinned at {}:{}",
                cluster.name,
                alg,
                pin.file.display(),
                pin.line
            ))
        }
        Verdict::Revoked(pin) => return Err(TrustError::NotPinned(format!(
            "cluster {:?}: {what} presents {alg} {fp}, which is @revoked at {}:{}; refusing to pin it",
            cluster.name,
            pin.file.display(),
            pin.line
        ))),
        Verdict::Changed(pins) => {
            let list: Vec<String> = pins.iter().map(|p| p.to_string()).collect();
            return Err(TrustError::NotPinned(format!(
                "cluster {:?}: {what} presents {alg} {fp}, but known_hosts pins {}. If you have checked that the host was re-keyed, remove the old pin (`ssh-keygen -R '{host}' -f {}`) and run this again",
                cluster.name,
                list.join(", "),
                pins[0].file.display()
            )))
        }
        Verdict::Unknown => {}
    }
    let Some(file) = cluster.known_hosts.first() else {
        return Err(TrustError::NotPinned(format!(
            "cluster {:?} has no known_hosts file to pin into",
            cluster.name
        )));
    };
    eprintln!(
        "cluster {:?}: {what} ({host}) presents\n  {alg} {fp}\n  {md5}",
        cluster.name
    );
    match confirm {
        Confirm::Fingerprints(wanted) => {
            if !wanted
                .iter()
                .any(|w| *w == fp || w.eq_ignore_ascii_case(&md5))
            {
                return Err(TrustError::NotPinned(format!(
                    "cluster {:?}: {what} presents {fp}, which is not a fingerprint given with --fingerprint ({}); not pinned",
                    cluster.name,
                    wanted.join(", ")
                )));
            }
        }
        Confirm::Yes => Confirm::Yes.check_usable()?,
        Confirm::TrustOnFirstUse => {
            eprintln!("  pinned on first use, unchecked (--trust-on-first-use)");
        }
        Confirm::Ask => {
            let q = format!(
                "Compare it with the fingerprint from the host's administrator. Pin it in {}? (yes/no) ",
                file.display()
            );
            if !ask_tty(&q)? {
                return Err(TrustError::NotPinned("not pinned".into()));
            }
        }
    }
    let hashed = crate::local::hash_known_hosts(&host.principal);
    append_pin(file, &host.lookup, key, hashed)?;
    Ok(format!(
        "cluster {:?}: {what}: pinned {alg} {fp} as {host}{} in {}",
        cluster.name,
        if hashed {
            " (hashed, as HashKnownHosts asks)"
        } else {
            ""
        },
        file.display()
    ))
}

/// `[ip]:port` or `ip` as a machine's known_hosts name; anything else is refused.
fn machine_host_id(name: &str) -> Option<HostId> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Some(HostId::new(&ip.to_string(), 22));
    }
    let (ip, port) = name.strip_prefix('[')?.split_once("]:")?;
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    Some(HostId::new(&ip.to_string(), port))
}

/// `fleet-broker trust CLUSTER --machine ID`: asks the running daemon for the key the machine
/// presents through the tunnel, then judges and pins it here like [`trust`]: the verdict and
/// fingerprints are computed from this cluster's known_hosts files and the key's bytes.
pub async fn trust_machine(
    cluster: &ClusterConfig,
    control: &std::path::Path,
    machine: &str,
    ssh_port: Option<u16>,
    confirm: &Confirm,
) -> Result<String, TrustError> {
    use crate::control::client::{error_text, request};
    let mut path = format!("/v1/clusters/{}/host-key?machine={machine}", cluster.name);
    if let Some(p) = ssh_port {
        path.push_str(&format!("&ssh_port={p}"));
    }
    let (status, body) = request(control, "GET", &path)
        .await
        .map_err(|e| TrustError::Daemon(e.to_string()))?;
    if status != 200 {
        return Err(TrustError::Daemon(format!(
            "cluster {:?}: {}",
            cluster.name,
            error_text(&body)
        )));
    }
    let r: crate::protocol::HostKeyReport = serde_json::from_slice(&body)
        .map_err(|e| TrustError::Daemon(format!("the daemon sent an unreadable report: {e}")))?;
    let Some(host) = machine_host_id(&r.name) else {
        return Err(TrustError::Daemon(format!(
            "cluster {:?}: the daemon named the machine {:?}, which is not an IP address or [IP]:port; refusing to pin",
            cluster.name,
            r.name
        )));
    };
    let key = russh::keys::PublicKey::from_openssh(&r.key)
        .map_err(|e| TrustError::Daemon(format!("the daemon sent an unreadable key: {e}")))?;
    let short = r.machine.get(..8).unwrap_or(&r.machine);
    let known = KnownHosts::load(&cluster.known_hosts)?;
    let verdict = known.check(&host, &key);
    judge(
        cluster,
        &format!("machine {short}"),
        &host,
        &key,
        verdict,
        confirm,
    )
}

/// Every machine of a cluster the running daemon serves, judged and pinned like
/// [`trust_machine`] with the same confirmation: one outcome per machine.
pub async fn trust_machines(
    cluster: &ClusterConfig,
    control: &std::path::Path,
    confirm: &Confirm,
) -> Result<Vec<Result<String, TrustError>>, TrustError> {
    let list = crate::control::client::list_clusters(control)
        .await
        .map_err(|e| TrustError::Daemon(e.to_string()))?;
    let Some(info) = list.clusters.into_iter().find(|c| c.name == cluster.name) else {
        return Err(TrustError::Daemon(format!(
            "the running daemon does not serve cluster {:?}",
            cluster.name
        )));
    };
    let api = crate::fleet_client::FleetClient::new(&info.socket, cluster.connect_timeout * 2);
    let machines = api
        .machines()
        .await
        .map_err(|e| TrustError::Daemon(format!("listing the machines: {e}")))?;
    let mut out = Vec::new();
    for m in machines {
        out.push(trust_machine(cluster, control, &m.id, None, confirm).await);
    }
    Ok(out)
}

/// `fleet-broker trust CLUSTER --front-door`: pins the front door's host key (ours, read
/// from our own 0600 file, so no question is asked) for the cluster's `front_door` address in
/// `file`, the original fleetctl's known_hosts (`~/.fleetctl/known_hosts` by default), as a
/// plain `[127.0.0.1]:PORT` line: the original ignores hashed entries.
pub fn trust_front_door(
    cluster: &ClusterConfig,
    state_dir: &std::path::Path,
    file: &std::path::Path,
) -> Result<String, TrustError> {
    let Some(addr) = cluster.front_door else {
        return Err(TrustError::NotPinned(format!(
            "cluster {:?} has no front_door; add `front_door = \"127.0.0.1:PORT\"` to its table in the config",
            cluster.name
        )));
    };
    let key =
        crate::front_door::host_key(state_dir).map_err(|e| TrustError::NotPinned(e.to_string()))?;
    let key = key.public_key();
    let host = HostId::new(&addr.ip().to_string(), addr.port());
    let known = KnownHosts::load(&[file.to_path_buf()])?;
    match known.check(&host, key) {
        Verdict::Trusted(pin) => Ok(format!(
            "cluster {:?}: front door {host}: already pinned at {}:{}",
            cluster.name,
            pin.file.display(),
            pin.line
        )),
        Verdict::Changed(pins) => Err(TrustError::NotPinned(format!(
            "cluster {:?}: {} pins another key for the front door {host} (a host key made before this one?); remove it with `ssh-keygen -R '{host}' -f {}` and run this again",
            cluster.name,
            pins.first().map_or_else(|| file.display().to_string(), |p| p.to_string()),
            file.display()
        ))),
        Verdict::Revoked(pin) => Err(TrustError::NotPinned(format!(
            "cluster {:?}: the front door's key is @revoked at {pin}; not pinned",
            cluster.name
        ))),
        Verdict::Unknown => {
            append_pin(file, &host.lookup, key, false)?;
            Ok(format!(
                "cluster {:?}: pinned the front door {host} ({} {}) in {}; the original fleetctl can now use FLEETCTL_TUNNEL={addr}",
                cluster.name,
                key.algorithm(),
                fingerprint_sha256(key),
                file.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_are_addresses_only() {
        assert_eq!(
            machine_host_id("10.0.0.1").map(|h| h.lookup),
            Some("10.0.0.1".into())
        );
        assert_eq!(
            machine_host_id("[10.0.0.1]:2222").map(|h| h.lookup),
            Some("[10.0.0.1]:2222".into())
        );
        for bad in [
            "*",
            "[*]:22",
            "host.example",
            "[10.0.0.1]:0",
            "10.0.0.1,*",
            "",
        ] {
            assert!(machine_host_id(bad).is_none(), "{bad}");
        }
    }
}
