//! `fleet-broker import`: a cluster from where users already describe it — the output of
//! `vagrant ssh-config`, or an ssh_config host as OpenSSH itself resolves it (`ssh -G`).
//! What is never copied: `StrictHostKeyChecking no` and `UserKnownHostsFile /dev/null`; a
//! cluster is imported with strict host key checking and its host pinned, or with the
//! `trust` command to run said.

use std::path::{Path, PathBuf};

use crate::config::{valid_cluster_name, HostKeyPolicy, HostPort};
use crate::config_edit::NewCluster;

/// One `Host` block of `vagrant ssh-config`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VagrantHost {
    /// The VM's name (`core-01`).
    pub name: String,
    /// `HostName`.
    pub host_name: Option<String>,
    /// `Port`.
    pub port: Option<u16>,
    /// `User`.
    pub user: Option<String>,
    /// Every `IdentityFile`, unquoted.
    pub identity_files: Vec<String>,
}

/// An ssh_config value: `"quoted with spaces"` or a bare word.
fn unquote(v: &str) -> String {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
        .to_string()
}

/// Why an import found no cluster to add; each names the line, the host or the field.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A line of `vagrant ssh-config` output with a key and no value.
    #[error("line {line}: {text:?} has no value (is this `vagrant ssh-config` output?)")]
    NoValue {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A key before the first `Host` line.
    #[error("line {line}: {key} before any `Host` line (is this `vagrant ssh-config` output?)")]
    BeforeHost {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
    },
    /// A `Port` that is not a port number.
    #[error("line {line}: Port {value:?} is not a port number")]
    BadPort {
        /// 1-based line number.
        line: usize,
        /// The value given.
        value: String,
    },
    /// No `Host` entries at all.
    #[error("no `Host` entries (is this `vagrant ssh-config` output? is the VM up?)")]
    NoHosts,
    /// A VM without a `HostName`.
    #[error("Host {host}: no HostName")]
    NoHostName {
        /// The `Host` name.
        host: String,
    },
    /// `ssh` could not be started.
    #[error("cannot run `ssh -G {host}` ({source}); is OpenSSH's ssh installed?")]
    CannotRunSsh {
        /// The host asked about.
        host: String,
        /// Why.
        source: std::io::Error,
    },
    /// `ssh -G` refused the host or the ssh_config.
    #[error("`ssh -G {host}` failed: {stderr}")]
    SshFailed {
        /// The host asked about.
        host: String,
        /// What ssh said.
        stderr: String,
    },
    /// `ssh -G` printed a port that is not one.
    #[error("ssh -G: port {value:?}")]
    SshPort {
        /// The value printed.
        value: String,
    },
    /// `ssh -G` printed no hostname.
    #[error("ssh -G printed no hostname")]
    SshNoHostName,
    /// A ProxyJump hop written as an `ssh://` URI.
    #[error("ProxyJump {hop:?}: ssh:// URIs are not supported; write it as [user@]host[:port]")]
    JumpUri {
        /// The hop.
        hop: String,
    },
    /// A ProxyJump hop that does not resolve to `host:port`.
    #[error("ProxyJump {hop:?}: {reason}")]
    JumpHop {
        /// The hop.
        hop: String,
        /// What is wrong with it.
        reason: crate::config::ValueError,
    },
    /// A ProxyCommand, which the broker cannot run in its place.
    #[error("ProxyCommand {command:?}: not supported; the broker dials the tunnel host itself. If it is `ssh -W %h:%p HOST`, write `ProxyJump HOST` in its place and import again")]
    ProxyCommand {
        /// The command.
        command: String,
    },
    /// A directory or host name that does not make a cluster name.
    #[error("{raw:?} does not make a cluster name; pass --name NAME")]
    BadName {
        /// The name it was made from.
        raw: String,
    },
}

/// Parses `vagrant ssh-config` output; errors name the line.
pub fn parse_vagrant(text: &str) -> Result<Vec<VagrantHost>, ImportError> {
    let mut hosts: Vec<VagrantHost> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = match line.split_once(char::is_whitespace) {
            Some((k, r)) => (k.to_ascii_lowercase(), r.trim()),
            None => {
                return Err(ImportError::NoValue {
                    line: i + 1,
                    text: line.to_string(),
                })
            }
        };
        if key == "host" {
            hosts.push(VagrantHost {
                name: unquote(rest),
                ..Default::default()
            });
            continue;
        }
        let Some(h) = hosts.last_mut() else {
            return Err(ImportError::BeforeHost { line: i + 1, key });
        };
        match key.as_str() {
            "hostname" => h.host_name = Some(unquote(rest)),
            "port" => {
                h.port = Some(unquote(rest).parse().map_err(|_| ImportError::BadPort {
                    line: i + 1,
                    value: rest.to_string(),
                })?)
            }
            "user" => h.user = Some(unquote(rest)),
            "identityfile" => {
                let f = unquote(rest);
                if !h.identity_files.contains(&f) {
                    h.identity_files.push(f);
                }
            }
            // StrictHostKeyChecking, UserKnownHostsFile, PasswordAuthentication, IdentitiesOnly,
            // LogLevel, …: never copied.
            _ => {}
        }
    }
    if hosts.is_empty() {
        return Err(ImportError::NoHosts);
    }
    Ok(hosts)
}

/// A cluster from a Vagrant project: the first VM is the tunnel host; every VM's key is
/// offered (newer Vagrant makes one per VM); the host is pinned in `known_hosts`.
pub fn from_vagrant(
    hosts: &[VagrantHost],
    name: &str,
    endpoint: Option<String>,
    known_hosts: &Path,
) -> Result<NewCluster, ImportError> {
    let first = hosts.first().ok_or(ImportError::NoHosts)?;
    let host = first
        .host_name
        .clone()
        .ok_or_else(|| ImportError::NoHostName {
            host: first.name.clone(),
        })?;
    let mut identity_files = Vec::new();
    for h in hosts {
        for f in &h.identity_files {
            if !identity_files.contains(f) {
                identity_files.push(f.clone());
            }
        }
    }
    Ok(NewCluster {
        name: name.to_string(),
        tunnel: HostPort {
            host,
            port: first.port.unwrap_or(22),
        },
        jump: vec![],
        user: first.user.clone().unwrap_or_else(|| "core".into()),
        identity_files,
        known_hosts: vec![known_hosts.display().to_string()],
        host_key_checking: HostKeyPolicy::Strict,
        endpoint,
    })
}

/// Warnings for identity files of `cluster` whose keys are public knowledge (Vagrant's
/// insecure key): anyone can log in where they are accepted. Reads the files (blocking).
pub fn public_knowledge_identities(cluster: &NewCluster) -> Vec<String> {
    cluster
        .identity_files
        .iter()
        .filter(|f| {
            crate::auth::identity_public_key(&crate::config::expand_tilde(f))
                .is_some_and(|k| crate::auth::is_public_knowledge(&k))
        })
        .map(|f| {
            format!(
                "{f} is Vagrant's insecure key: its private half is published, so anyone who can reach the VM can log in as this user. Let Vagrant replace it (`config.ssh.insert_key = true`, the default) or put your own key on the box; the broker's front door never accepts it"
            )
        })
        .collect()
}

/// What an import has to tell the user besides the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    /// Lines to print on stderr (`warning: …`).
    pub warnings: Vec<String>,
    /// Whether the tunnel host still has to be pinned (`fleet-broker trust NAME`).
    pub needs_trust: bool,
}

/// Runs `ssh -G HOST` (with `-F FILE` when given): the host as `ssh` itself resolves it.
pub fn ssh_g(host: &str, ssh_config: Option<&Path>) -> Result<String, ImportError> {
    let mut cmd = std::process::Command::new("ssh");
    if let Some(f) = ssh_config {
        cmd.arg("-F").arg(f);
    }
    let out = cmd
        .arg("-G")
        .arg("--")
        .arg(host)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| ImportError::CannotRunSsh {
            host: host.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImportError::SshFailed {
            host: host.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A cluster from `ssh -G` output. Identity files that do not exist are left out (`ssh -G`
/// lists the defaults too); `/dev/null` pin files are never copied; `StrictHostKeyChecking
/// no` is imported as strict, with a warning.
pub fn from_ssh_g(
    output: &str,
    name: &str,
    endpoint: Option<String>,
) -> Result<(NewCluster, Notes), ImportError> {
    let mut notes = Notes::default();
    let (mut host, mut port, mut user) = (None, 22u16, None);
    let (mut ids, mut known, mut jump) = (Vec::new(), Vec::new(), Vec::new());
    let mut policy = HostKeyPolicy::Strict;
    for line in output.lines() {
        let Some((key, v)) = line.trim().split_once(' ') else {
            continue;
        };
        let v = v.trim();
        match key {
            "hostname" => host = Some(v.to_string()),
            "port" => {
                port = v.parse().map_err(|_| ImportError::SshPort {
                    value: v.to_string(),
                })?
            }
            "user" => user = Some(v.to_string()),
            "identityfile" => {
                let f = unquote(v);
                if crate::config::expand_tilde(&f).exists() && !ids.contains(&f) {
                    ids.push(f);
                }
            }
            "userknownhostsfile" => {
                for f in v.split_whitespace().map(unquote) {
                    if f == "/dev/null" {
                        notes.warnings.push(
                            "UserKnownHostsFile /dev/null is not copied: the host will be pinned in the default files".into(),
                        );
                    } else if crate::config::expand_tilde(&f).exists() {
                        known.push(f);
                    }
                }
            }
            "proxyjump" if v != "none" => {
                for hop in v.split(',') {
                    if hop.contains("://") {
                        return Err(ImportError::JumpUri {
                            hop: hop.to_string(),
                        });
                    }
                    jump.push(hop.trim().to_string());
                }
            }
            // The broker dials the tunnel host itself; a command in between would be silently
            // skipped, dialling HostName directly where `ssh` does not.
            "proxycommand" if v != "none" => {
                return Err(ImportError::ProxyCommand {
                    command: v.to_string(),
                });
            }
            "stricthostkeychecking" => match v {
                "false" | "no" | "off" => {
                    notes.warnings.push(
                        "StrictHostKeyChecking no is not copied: the cluster is imported with strict host key checking".into(),
                    );
                    notes.needs_trust = true;
                }
                "accept-new" => policy = HostKeyPolicy::AcceptNew,
                _ => {}
            },
            _ => {}
        }
    }
    let host = host.ok_or(ImportError::SshNoHostName)?;
    if known.is_empty() {
        notes.needs_trust = true;
    }
    Ok((
        NewCluster {
            name: name.to_string(),
            tunnel: HostPort { host, port },
            jump,
            user: user.unwrap_or_else(|| "core".into()),
            identity_files: ids,
            known_hosts: known,
            host_key_checking: policy,
            endpoint,
        },
        notes,
    ))
}

/// Resolves each ProxyJump hop as `ssh` would (`ssh -G`: an alias becomes its HostName, Port
/// and User), so the broker dials what `ssh` dials.
pub fn resolve_jumps(
    cluster: &mut NewCluster,
    ssh_config: Option<&Path>,
) -> Result<(), ImportError> {
    let mut resolved = Vec::new();
    for hop in &cluster.jump {
        let (user, rest) = match hop.rsplit_once('@') {
            Some((u, r)) => (Some(u.to_string()), r),
            None => (None, hop.as_str()),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            _ => (rest, None),
        };
        let mut spec = String::new();
        if let Some(u) = &user {
            spec.push_str(u);
            spec.push('@');
        }
        spec.push_str(host);
        let out = ssh_g(&spec, ssh_config)?;
        let field = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
                .map(str::to_string)
        };
        let name = field("hostname").unwrap_or_else(|| host.to_string());
        let port = port
            .map(str::to_string)
            .or_else(|| field("port"))
            .unwrap_or_else(|| "22".into());
        let user = user.or_else(|| field("user"));
        let target =
            HostPort::parse(&format!("{name}:{port}")).map_err(|reason| ImportError::JumpHop {
                hop: hop.clone(),
                reason,
            })?;
        resolved.push(match user {
            Some(u) => format!("{u}@{target}"),
            None => target.to_string(),
        });
    }
    cluster.jump = resolved;
    Ok(())
}

/// A valid cluster name from `raw` (a directory or host name): other characters become `-`.
pub fn cluster_name(raw: &str) -> Result<String, ImportError> {
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if valid_cluster_name(&name) {
        Ok(name)
    } else {
        Err(ImportError::BadName {
            raw: raw.to_string(),
        })
    }
}

/// The per-cluster pin file of an import: `known_hosts.d/NAME` beside the config file.
pub fn known_hosts_file(config: &Path, name: &str) -> PathBuf {
    config
        .parent()
        .unwrap_or(Path::new("."))
        .join("known_hosts.d")
        .join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VAGRANT: &str = "Host core-01\n  HostName 127.0.0.1\n  User core\n  Port 2222\n  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  PasswordAuthentication no\n  IdentityFile \"/home/u/my project/.vagrant/machines/core-01/virtualbox/private_key\"\n  IdentitiesOnly yes\n  LogLevel FATAL\n\nHost core-02\n  HostName 127.0.0.1\n  User core\n  Port 2200\n  IdentityFile /home/u/.vagrant.d/insecure_private_key\n";

    #[test]
    fn vagrant_output_makes_one_cluster_from_every_vm() {
        let hosts = parse_vagrant(VAGRANT).unwrap();
        assert_eq!(hosts.len(), 2);
        let c = from_vagrant(&hosts, "proj", None, Path::new("/c/known_hosts.d/proj")).unwrap();
        assert_eq!(c.tunnel.to_string(), "127.0.0.1:2222");
        assert_eq!(c.user, "core");
        assert_eq!(
            c.identity_files,
            vec![
                "/home/u/my project/.vagrant/machines/core-01/virtualbox/private_key".to_string(),
                "/home/u/.vagrant.d/insecure_private_key".to_string()
            ]
        );
        assert_eq!(c.host_key_checking, HostKeyPolicy::Strict);
        assert_eq!(c.known_hosts, vec!["/c/known_hosts.d/proj".to_string()]);
        assert!(matches!(parse_vagrant(""), Err(ImportError::NoHosts)));
        assert!(matches!(
            parse_vagrant("  HostName x\n"),
            Err(ImportError::BeforeHost { line: 1, .. })
        ));
        assert!(matches!(
            parse_vagrant("Host a\n  Port abc\n"),
            Err(ImportError::BadPort { line: 2, .. })
        ));
    }

    #[test]
    fn ssh_g_output_maps_and_never_copies_no_checking() {
        let out = "hostname 10.0.0.5\nport 2222\nuser ops\nidentityfile /nonexistent/id\nproxyjump gw@bastion:22\nstricthostkeychecking false\nuserknownhostsfile /dev/null\n";
        let (c, notes) = from_ssh_g(out, "prod", None).unwrap();
        assert_eq!(c.tunnel.to_string(), "10.0.0.5:2222");
        assert_eq!(c.jump, vec!["gw@bastion:22".to_string()]);
        assert_eq!(c.user, "ops");
        assert!(c.identity_files.is_empty());
        assert!(c.known_hosts.is_empty());
        assert_eq!(c.host_key_checking, HostKeyPolicy::Strict);
        assert!(notes.needs_trust);
        assert_eq!(notes.warnings.len(), 2);
        assert!(matches!(
            from_ssh_g("hostname h\nproxyjump ssh://x\n", "p", None),
            Err(ImportError::JumpUri { .. })
        ));
    }

    #[test]
    fn a_proxy_command_is_refused_not_skipped() {
        let err = from_ssh_g(
            "hostname 10.0.0.5\nproxycommand ssh -W %h:%p gw\n",
            "p",
            None,
        )
        .expect_err("a ProxyCommand is refused");
        assert!(matches!(err, ImportError::ProxyCommand { .. }), "{err}");
        let err = err.to_string();
        assert!(
            err.contains("ProxyCommand") && err.contains("ProxyJump"),
            "{err}"
        );
        assert!(from_ssh_g("hostname h\nproxycommand none\n", "p", None).is_ok());
    }

    #[test]
    fn vagrants_insecure_key_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let insecure = dir.path().join("insecure_private_key");
        std::fs::write(
            format!("{}.pub", insecure.display()),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN1YdxBpNlzxDqfJyw/QKow1F+wvG9hXGoqiysfJOn5Y vagrant insecure public key\n",
        )
        .expect("pub");
        let own = dir.path().join("id_ed25519");
        std::fs::write(
            format!("{}.pub", own.display()),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ me\n",
        )
        .expect("pub");
        let mut c = from_ssh_g("hostname h\n", "p", None).expect("cluster").0;
        c.identity_files = vec![insecure.display().to_string(), own.display().to_string()];
        let warnings = public_knowledge_identities(&c);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with(&insecure.display().to_string()));
    }

    #[test]
    fn names_are_sanitised() {
        assert_eq!(cluster_name("my project").unwrap(), "my-project");
        assert!(matches!(
            cluster_name(".."),
            Err(ImportError::BadName { .. })
        ));
    }
}
