//! `fleet-broker trust CLUSTER`: shows the host key a cluster's tunnel host presents and,
//! once the user confirms it, pins it in the first known_hosts file of that cluster. A key
//! that contradicts an existing pin is never replaced here: the old pin must be removed by
//! hand first, after the change was checked.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::config::ClusterConfig;
use crate::known_hosts::{append_pin, fingerprint_md5, fingerprint_sha256, Verdict};
use crate::tunnel::dial::{
    dial, presented_key, presented_key_over, DialError, DialSpec, PresentedKey,
};

/// Runs the trust flow for the tunnel host and, first, each jump host on the way to it
/// (reached through the hops before it, which must be trusted by then); `assume_yes` skips
/// the prompts. Returns the lines to print.
pub async fn trust(cluster: &ClusterConfig, assume_yes: bool) -> anyhow::Result<String> {
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
            presented_key_over(
                &spec,
                crate::proxy::DrainedChannel::new(ch),
                vec![target.known_hosts_name()],
            )
            .await
        })
        .await
        .with_context(|| format!("connecting to {target} timed out"))??;
        let what = if i < cluster.jump.len() {
            format!("jump host {target}")
        } else {
            target.to_string()
        };
        lines.push(judge(cluster, &what, seen, assume_yes)?);
    }
    Ok(lines.join("\n"))
}

/// Pins a presented key after confirmation, or says why not.
fn judge(
    cluster: &ClusterConfig,
    what: &str,
    seen: PresentedKey,
    assume_yes: bool,
) -> anyhow::Result<String> {
    let fp = fingerprint_sha256(&seen.key);
    let alg = seen.key.algorithm();
    match seen.verdict {
        Verdict::Trusted(pin) => {
            return Ok(format!(
                "cluster {:?}: {what}: {} {fp} is already pinned at {}:{}",
                cluster.name,
                alg,
                pin.file.display(),
                pin.line
            ))
        }
        Verdict::Revoked(pin) => bail!(
            "cluster {:?}: {what} presents {alg} {fp}, which is @revoked at {}:{}; refusing to pin it",
            cluster.name,
            pin.file.display(),
            pin.line
        ),
        Verdict::Changed(pins) => {
            let list: Vec<String> = pins.iter().map(|p| p.to_string()).collect();
            bail!(
                "cluster {:?}: {what} presents {alg} {fp}, but known_hosts pins {}. If you have checked that the host was re-keyed, remove the old pin (`ssh-keygen -R '{}' -f {}`) and run this again",
                cluster.name,
                list.join(", "),
                seen.names[0],
                pins[0].file.display()
            )
        }
        Verdict::Unknown => {}
    }
    let Some(file) = cluster.known_hosts.first() else {
        bail!(
            "cluster {:?} has no known_hosts file to pin into",
            cluster.name
        );
    };
    eprintln!(
        "cluster {:?}: {what} ({}) presents\n  {alg} {fp}\n  {}",
        cluster.name,
        seen.names.join(", "),
        fingerprint_md5(&seen.key)
    );
    if !assume_yes {
        eprint!("Compare it with the fingerprint from the host's administrator. Pin it in {}? (yes/no) ", file.display());
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "yes" | "y") {
            bail!("not pinned");
        }
    }
    append_pin(file, &seen.names[0], &seen.key)?;
    Ok(format!(
        "cluster {:?}: pinned {alg} {fp} for {} in {}",
        cluster.name,
        seen.names[0],
        file.display()
    ))
}

/// `fleet-broker trust CLUSTER --machine ID`: asks the running daemon for the key the machine
/// presents through the tunnel, then pins it like [`trust`].
pub async fn trust_machine(
    cluster: &ClusterConfig,
    control: &std::path::Path,
    machine: &str,
    ssh_port: Option<u16>,
    assume_yes: bool,
) -> anyhow::Result<String> {
    use crate::control::client::{error_text, request};
    let mut path = format!("/v1/clusters/{}/host-key?machine={machine}", cluster.name);
    if let Some(p) = ssh_port {
        path.push_str(&format!("&ssh_port={p}"));
    }
    let (status, body) = request(control, "GET", &path)
        .await
        .map_err(anyhow::Error::msg)?;
    if status != 200 {
        bail!("cluster {:?}: {}", cluster.name, error_text(&body));
    }
    let r: crate::exec::HostKeyReport = serde_json::from_slice(&body)?;
    let short = r.machine.get(..8).unwrap_or(&r.machine).to_string();
    match r.verdict.as_str() {
        "trusted" => {
            return Ok(format!(
                "cluster {:?} machine {short}: {} is already pinned ({})",
                cluster.name,
                r.fingerprint,
                r.pins.join(", ")
            ))
        }
        "revoked" => bail!(
            "cluster {:?} machine {short} presents {}, which is @revoked ({}); refusing to pin it",
            cluster.name,
            r.fingerprint,
            r.pins.join(", ")
        ),
        "changed" => bail!(
            "cluster {:?} machine {short} ({}) presents {}, but known_hosts pins {}. If you have checked that the machine was re-keyed, remove the old pin (`ssh-keygen -R '{}' -f FILE`) and run this again",
            cluster.name,
            r.name,
            r.fingerprint,
            r.pins.join(", "),
            r.name
        ),
        _ => {}
    }
    let Some(file) = cluster.known_hosts.first() else {
        bail!(
            "cluster {:?} has no known_hosts file to pin into",
            cluster.name
        );
    };
    eprintln!(
        "cluster {:?} machine {short} ({}) presents\n  {}\n  {}",
        cluster.name, r.name, r.fingerprint, r.md5
    );
    if !assume_yes {
        eprint!(
            "Compare it with the machine's fingerprint. Pin it in {}? (yes/no) ",
            file.display()
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "yes" | "y") {
            bail!("not pinned");
        }
    }
    let key = russh::keys::PublicKey::from_openssh(&r.key)
        .map_err(|e| anyhow::anyhow!("the daemon sent an unreadable key: {e}"))?;
    append_pin(file, &r.name, &key)?;
    Ok(format!(
        "cluster {:?} machine {short}: pinned {} for {} in {}",
        cluster.name,
        r.fingerprint,
        r.name,
        file.display()
    ))
}
