//! `fleet-broker trust CLUSTER`: shows the host key a cluster's tunnel host presents and,
//! once the user confirms it, pins it in the first known_hosts file of that cluster. A key
//! that contradicts an existing pin is never replaced here: the old pin must be removed by
//! hand first, after the change was checked.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::config::ClusterConfig;
use crate::known_hosts::{append_pin, fingerprint_md5, fingerprint_sha256, Verdict};
use crate::tunnel::dial::presented_key;

/// Runs the trust flow; `assume_yes` skips the prompt. Returns a line to print.
pub async fn trust(cluster: &ClusterConfig, assume_yes: bool) -> anyhow::Result<String> {
    let spec = crate::tunnel::dial_spec(cluster, None);
    let seen = tokio::time::timeout(
        cluster.connect_timeout.max(Duration::from_secs(1)),
        presented_key(&spec),
    )
    .await
    .with_context(|| format!("connecting to {} timed out", cluster.tunnel))??;
    let fp = fingerprint_sha256(&seen.key);
    let alg = seen.key.algorithm();
    match seen.verdict {
        Verdict::Trusted(pin) => {
            return Ok(format!(
                "cluster {:?}: {} {fp} is already pinned at {}:{}",
                cluster.name,
                alg,
                pin.file.display(),
                pin.line
            ))
        }
        Verdict::Revoked(pin) => bail!(
            "cluster {:?}: {} presents {alg} {fp}, which is @revoked at {}:{}; refusing to pin it",
            cluster.name,
            cluster.tunnel,
            pin.file.display(),
            pin.line
        ),
        Verdict::Changed(pins) => {
            let list: Vec<String> = pins.iter().map(|p| p.to_string()).collect();
            bail!(
                "cluster {:?}: {} presents {alg} {fp}, but known_hosts pins {}. If you have checked that the host was re-keyed, remove the old pin (`ssh-keygen -R '{}' -f {}`) and run this again",
                cluster.name,
                cluster.tunnel,
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
        "cluster {:?}: {} ({}) presents\n  {alg} {fp}\n  {}",
        cluster.name,
        cluster.tunnel,
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
