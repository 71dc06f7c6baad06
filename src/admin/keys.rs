//! Operator commands about keys: `trust` (a cluster's host, a machine, or the front door in
//! the original fleetctl's known_hosts) and `passphrase set|forget`.

use std::path::Path;

use super::{ask, find_cluster, load_config};
use crate::trust::Confirm;

/// How a pin is confirmed: `--fingerprint`s, `--yes`, or the terminal; refused up front when
/// that way cannot work here (no terminal to ask on).
pub(super) fn confirm_mode(yes: bool, fingerprint: Vec<String>) -> anyhow::Result<Confirm> {
    let confirm = if !fingerprint.is_empty() {
        Confirm::Fingerprints(fingerprint)
    } else if yes {
        Confirm::Yes
    } else {
        Confirm::Ask
    };
    confirm.check_usable()?;
    Ok(confirm)
}

/// `trust CLUSTER`: the tunnel host (and jump hosts) pinned; a running daemon reconnects.
pub(super) async fn trust_host(
    config: &Path,
    cluster: &str,
    confirm: &Confirm,
) -> anyhow::Result<()> {
    let config = load_config(config)?;
    let c = find_cluster(&config, cluster)?;
    println!("{}", crate::trust::trust(c, confirm).await?);
    ask::reconnect(cluster).await;
    Ok(())
}

/// `trust CLUSTER --machine ID`: a machine's key, fetched through the running daemon.
pub(super) async fn trust_machine(
    config: &Path,
    cluster: &str,
    machine: &str,
    ssh_port: Option<u16>,
    confirm: &Confirm,
) -> anyhow::Result<()> {
    let config = load_config(config)?;
    let c = find_cluster(&config, cluster)?;
    let control = crate::control::client::default_control_socket();
    println!(
        "{}",
        crate::trust::trust_machine(c, &control, machine, ssh_port, confirm).await?
    );
    Ok(())
}

/// `trust CLUSTER --front-door`: the cluster's front door pinned in the original fleetctl's
/// known_hosts.
pub(super) fn trust_front_door(
    config: &Path,
    cluster: &str,
    known_hosts_file: &str,
) -> anyhow::Result<()> {
    let config = load_config(config)?;
    let c = find_cluster(&config, cluster)?;
    let file = crate::config::expand_tilde(known_hosts_file);
    let state_dir = crate::daemon::DaemonOptions::from_env().state_dir;
    println!("{}", crate::trust::trust_front_door(c, &state_dir, &file)?);
    Ok(())
}

/// `passphrase set FILE [--stdin]`: read (never echoed), checked against the file, stored;
/// a running daemon retries the clusters that lacked it.
pub(super) async fn set_passphrase(path: &Path, stdin: bool) -> anyhow::Result<()> {
    let secret = if stdin {
        let mut line = zeroize::Zeroizing::new(String::new());
        std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut line)?;
        zeroize::Zeroizing::new(line.trim_end_matches(['\n', '\r']).to_string())
    } else {
        crate::passphrase::read_from_terminal(&format!("Passphrase for {}: ", path.display()))?
    };
    crate::passphrase::set(path, &secret)?;
    println!(
        "stored the passphrase of {} in {}",
        path.display(),
        crate::passphrase::STORE
    );
    ask::reconnect_failed().await;
    Ok(())
}

/// `passphrase forget FILE`.
pub(super) fn forget_passphrase(path: &Path) -> anyhow::Result<()> {
    if crate::passphrase::forget(path)? {
        println!("forgot the passphrase of {}", path.display());
    } else {
        println!("no passphrase of {} was stored", path.display());
    }
    Ok(())
}
