//! `fleet-broker import` and `remove`: a cluster from `vagrant ssh-config` or an ssh_config
//! host, its tunnel host pinned first (Vagrant) or the trust command said (ssh_config), the
//! config written in place, and a running daemon told; `remove` the reverse.

use std::path::Path;

use super::args::ImportSource;
use super::{ask, find_cluster, keys, load_config};

/// `fleet-broker remove CLUSTER`.
pub(super) async fn remove(path: &Path, cluster: &str) -> anyhow::Result<()> {
    crate::config_edit::remove_cluster(path, cluster)?;
    println!("removed cluster {cluster:?} from {}", path.display());
    ask::reload_after_change().await;
    Ok(())
}

pub(super) async fn import(path: &Path, source: ImportSource) -> anyhow::Result<()> {
    use crate::import;
    match source {
        ImportSource::Vagrant {
            name,
            file,
            endpoint,
            replace,
            fingerprint,
            trust_on_first_use,
        } => {
            let text = match file.as_deref() {
                Some(f) if f == std::path::Path::new("-") => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                    s
                }
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
                None => {
                    let out = std::process::Command::new("vagrant")
                        .arg("ssh-config")
                        .stdin(std::process::Stdio::null())
                        .output()
                        .map_err(|e| anyhow::anyhow!("cannot run `vagrant ssh-config` ({e}); run it yourself and pass its output as FILE or on stdin (-)"))?;
                    if !out.status.success() {
                        anyhow::bail!(
                            "`vagrant ssh-config` failed (is the VM up?): {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                    String::from_utf8_lossy(&out.stdout).into_owned()
                }
            };
            let hosts = import::parse_vagrant(&text).map_err(|e| {
                let from = file.as_ref().map_or("vagrant ssh-config".to_string(), |f| {
                    f.display().to_string()
                });
                anyhow::anyhow!("{from}: {e}")
            })?;
            let name = match name {
                Some(n) => n,
                None => import::cluster_name(
                    &std::env::current_dir()?
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )?,
            };
            let known_hosts = import::known_hosts_file(path, &name);
            let cluster = import::from_vagrant(&hosts, &name, endpoint, &known_hosts)?;
            for w in import::public_knowledge_identities(&cluster) {
                eprintln!("warning: {w}");
            }
            let confirm = if trust_on_first_use {
                crate::trust::Confirm::TrustOnFirstUse
            } else {
                keys::confirm_mode(false, fingerprint)?
            };
            // Pin first: a host not pinned leaves the config as it was.
            let preview = crate::config_edit::preview(path, &cluster, replace)?;
            let c = find_cluster(&preview, &name)?;
            println!("{}", crate::trust::trust(c, &confirm).await?);
            crate::config_edit::add_cluster(path, &cluster, replace)?;
            println!(
                "added cluster {name:?} ({} VM{}, tunnel {}) to {}",
                hosts.len(),
                if hosts.len() == 1 { "" } else { "s" },
                cluster.tunnel,
                path.display()
            );
            // The machines' keys, fetched through the tunnel of a running daemon.
            let added = find_cluster(&load_config(path)?, &name)?.clone();
            let control = crate::control::client::default_control_socket();
            if !ask::reload_after_change().await {
                println!("pin the machines' keys with `fleet-broker trust {name} --machine ID` once the daemon runs");
                return Ok(());
            }
            match crate::trust::trust_machines(&added, &control, &confirm).await {
                Ok(outcomes) => {
                    for o in outcomes {
                        match o {
                            Ok(line) => println!("{line}"),
                            Err(e) => eprintln!("warning: {e}"),
                        }
                    }
                }
                Err(e) => eprintln!("warning: the machines' keys were not pinned: {e}; `fleet-broker trust {name} --machine ID` pins one"),
            }
            return Ok(());
        }
        ImportSource::SshConfig {
            host,
            name,
            ssh_config,
            endpoint,
            replace,
        } => {
            let name = match name {
                Some(n) => n,
                None => import::cluster_name(&host)?,
            };
            let out = import::ssh_g(&host, ssh_config.as_deref())?;
            let (mut cluster, notes) = import::from_ssh_g(&out, &name, endpoint)?;
            import::resolve_jumps(&mut cluster, ssh_config.as_deref())?;
            crate::config_edit::add_cluster(path, &cluster, replace)?;
            for w in &notes.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "added cluster {name:?} (tunnel {}{}) to {}",
                cluster.tunnel,
                if cluster.jump.is_empty() {
                    String::new()
                } else {
                    format!(" via {}", cluster.jump.join(", "))
                },
                path.display()
            );
            if notes.needs_trust {
                println!("pin its host key, after checking it: fleet-broker trust {name}");
            }
        }
    }
    let _ = ask::reload_after_change().await;
    Ok(())
}
