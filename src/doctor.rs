//! `fleet-broker doctor [CLUSTER]`: every check in one run, one line each, `✓` or `✗` with
//! what to do. Nothing stops at the first problem; every network step is bounded by the
//! cluster's `connect_timeout`. The exit status says whether anything failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{ClusterConfig, Config, Endpoint};
use crate::known_hosts::{fingerprint_sha256, HostId, KnownHosts, Verdict};
use crate::tunnel::dial::{self, DialSpec};

/// Collects the lines of a run and whether any check failed.
#[derive(Debug, Default)]
pub struct Report {
    /// The lines printed, in order.
    pub lines: Vec<String>,
    /// Whether a check failed.
    pub failed: bool,
}

impl Report {
    fn ok(&mut self, line: String) {
        self.say(format!("✓ {line}"));
    }
    fn bad(&mut self, line: String) {
        self.failed = true;
        self.say(format!("✗ {line}"));
    }
    fn say(&mut self, line: String) {
        println!("{line}");
        self.lines.push(line);
    }
}

/// Runs every check of the config at `path` (of one cluster when `only` names it), with the
/// agent at `agent`.
pub async fn run(path: &Path, only: Option<&str>, agent: Option<PathBuf>) -> Report {
    let mut r = Report::default();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            r.bad(format!("config: {e}"));
            return r;
        }
    };
    if config.clusters.is_empty() {
        r.bad(format!(
            "config {}: no clusters; add one with `fleet-broker import vagrant` or `fleet-broker import ssh-config HOST`, or a [clusters.NAME] table",
            path.display()
        ));
        return r;
    }
    r.ok(format!(
        "config {}: {} cluster{}",
        path.display(),
        config.clusters.len(),
        if config.clusters.len() == 1 { "" } else { "s" }
    ));
    check_agent(&mut r, agent.as_deref()).await;
    for c in config.clusters.values() {
        if only.is_some_and(|o| o != c.name) {
            continue;
        }
        check_cluster(&mut r, c, agent.clone()).await;
    }
    if let Some(o) = only.filter(|o| !config.clusters.contains_key(*o)) {
        r.bad(format!(
            "no cluster named {o:?}; configured: {}",
            config.names()
        ));
    }
    r
}

async fn check_agent(r: &mut Report, agent: Option<&Path>) {
    let Some(path) = agent else {
        r.bad("agent: SSH_AUTH_SOCK is not set; start one (`eval \"$(ssh-agent)\"`) and add your key (`ssh-add`), or use identity_files".into());
        return;
    };
    let client = russh::keys::agent::client::AgentClient::connect_uds(path).await;
    let Ok(mut client) = client else {
        r.bad(format!(
            "agent {}: nobody answers; is ssh-agent still running? (check SSH_AUTH_SOCK)",
            path.display()
        ));
        return;
    };
    match client.request_identities().await {
        Ok(ids) if ids.is_empty() => r.bad(format!(
            "agent {}: no keys (locked? `ssh-add -X` unlocks it; else add your key with `ssh-add`)",
            path.display()
        )),
        Ok(ids) => {
            let fps: Vec<String> = ids
                .iter()
                .map(|k| fingerprint_sha256(&k.public_key()))
                .collect();
            r.ok(format!("agent {}: {}", path.display(), fps.join(", ")));
            for id in &ids {
                if let russh::keys::agent::AgentIdentity::Certificate { certificate, .. } = id {
                    report_certificate(r, &format!("agent {}", path.display()), certificate);
                }
            }
        }
        Err(e) => r.bad(format!("agent {}: {e}", path.display())),
    }
}

fn check_identity_file(r: &mut Report, c: &ClusterConfig, file: &Path) {
    use std::os::unix::fs::MetadataExt;
    let name = format!("cluster {}: identity file {}", c.name, file.display());
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) => {
            r.bad(format!("{name}: {e}; fix the path in identity_files"));
            return;
        }
    };
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        r.bad(format!(
            "{name}: permissions {mode:04o} are too open, so it is ignored (as OpenSSH does); run `chmod 600 {}`",
            file.display()
        ));
        return;
    }
    match russh::keys::load_secret_key(file, None) {
        Ok(_) => r.ok(format!("{name}: private ({mode:04o}), not encrypted")),
        Err(russh::keys::Error::KeyIsEncrypted) => match crate::passphrase::get(file) {
            Ok(Some(p)) => match russh::keys::load_secret_key(file, Some(&p)) {
                Ok(_) => r.ok(format!("{name}: encrypted, passphrase stored")),
                Err(_) => r.bad(format!(
                    "{name}: encrypted, and the stored passphrase does not decrypt it; run `fleet-broker passphrase set {}`",
                    file.display()
                )),
            },
            Ok(None) => r.bad(format!(
                "{name}: encrypted and no passphrase stored; run `fleet-broker passphrase set {}` (or `ssh-add` it)",
                file.display()
            )),
            Err(e) => r.bad(format!("{name}: encrypted; {e}")),
        },
        Err(e) => r.bad(format!("{name}: {e}")),
    }
}

/// One certificate line: its principals and validity, ✗ when it cannot be used now.
fn report_certificate(r: &mut Report, whose: &str, cert: &russh::keys::Certificate) {
    let (usable, text) = crate::auth::describe_certificate(cert);
    if usable {
        r.ok(format!("{whose}: {text}"));
    } else {
        r.bad(format!(
            "{whose}: {text}; it is skipped: get a new one from your CA"
        ));
    }
}

/// The certificates `identity_files` (`KEY-cert.pub`) and `certificate_files` name.
fn check_certificates(r: &mut Report, c: &ClusterConfig) {
    let beside = c.identity_files.iter().map(|f| {
        let mut p = f.as_os_str().to_owned();
        p.push("-cert.pub");
        (PathBuf::from(p), false)
    });
    let named = c.certificate_files.iter().map(|f| (f.clone(), true));
    for (file, configured) in beside.chain(named) {
        let whose = format!("cluster {}: certificate file {}", c.name, file.display());
        if !configured && !file.exists() {
            continue;
        }
        match russh::keys::load_openssh_certificate(&file) {
            Ok(cert) => report_certificate(r, &whose, &cert),
            Err(e) => r.bad(format!("{whose}: {e}; fix the path in certificate_files")),
        }
    }
}

async fn check_cluster(r: &mut Report, c: &ClusterConfig, agent: Option<PathBuf>) {
    for f in &c.identity_files {
        check_identity_file(r, c, f);
    }
    check_certificates(r, c);
    let spec = crate::tunnel::dial_spec(c, agent);
    let limit = c.connect_timeout;
    // The first hop is reachable from here: its key against the pins.
    let first = match c.jump.first() {
        Some(hop) => DialSpec {
            target: hop.target.clone(),
            jump: Vec::new(),
            ..spec.clone()
        },
        None => spec.clone(),
    };
    let what = if c.jump.is_empty() {
        format!("cluster {}: tunnel host {}", c.name, c.tunnel)
    } else {
        format!("cluster {}: jump host {}", c.name, first.target)
    };
    match tokio::time::timeout(limit, dial::presented_key(&first)).await {
        Err(_) => r.bad(format!(
            "{what}: no answer within {}; check the address and that sshd runs",
            humantime::format_duration(limit)
        )),
        Ok(Err(e)) => r.bad(format!("{what}: {e}")),
        Ok(Ok(seen)) => match seen.verdict {
            Verdict::Trusted(pin) => r.ok(format!(
                "{what}: reachable, key {} pinned at {pin}",
                fingerprint_sha256(&seen.key)
            )),
            Verdict::Unknown => r.bad(format!(
                "{what}: reachable, but its key {} is not pinned; check it and run `fleet-broker trust {}`",
                fingerprint_sha256(&seen.key),
                c.name
            )),
            Verdict::Changed(_) | Verdict::Revoked(_) => r.bad(format!(
                "{what}: its key {} is not the pinned one (or revoked); see `fleet-broker trust {}`",
                fingerprint_sha256(&seen.key),
                c.name
            )),
        },
    }
    check_ssh_and_api(r, c, &spec).await;
    if let Some(addr) = c.front_door {
        check_front_door(r, c, addr).await;
    }
}

/// The whole way in, authenticated, then the fleet API through it.
async fn check_ssh_and_api(r: &mut Report, c: &ClusterConfig, spec: &DialSpec) {
    let limit = c.connect_timeout;
    let conn = match tokio::time::timeout(limit, dial::dial(spec)).await {
        Err(_) => {
            r.bad(format!(
                "cluster {}: SSH: no connection within {}",
                c.name,
                humantime::format_duration(limit)
            ));
            return;
        }
        Ok(Err(e)) => {
            r.bad(format!("cluster {}: SSH: {e}", c.name));
            return;
        }
        Ok(Ok(conn)) => conn,
    };
    r.ok(format!(
        "cluster {}: SSH: authenticated as {} on {}",
        c.name, c.user, c.tunnel
    ));
    match tokio::time::timeout(limit, fleet_api(&conn, &c.endpoint)).await {
        Ok(Ok(summary)) => r.ok(format!(
            "cluster {}: fleet API {}: {summary}",
            c.name, c.endpoint
        )),
        Ok(Err(e)) => r.bad(format!("cluster {}: fleet API {}: {e}", c.name, c.endpoint)),
        Err(_) => r.bad(format!(
            "cluster {}: fleet API {}: no answer within {}",
            c.name,
            c.endpoint,
            humantime::format_duration(limit)
        )),
    }
    let _ = conn
        .handle
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
}

/// `GET /fleet/v1/machines` through the connection: how many machines answer.
/// Why the fleet API check failed.
#[derive(Debug, thiserror::Error)]
enum ApiProblem {
    #[error("cannot open a channel: {0}")]
    NoChannel(russh::Error),
    #[error("cannot open a channel, nor a session for `fleetctl fd-forward`: {0}")]
    NoFdForward(russh::Error),
    #[error("{0}")]
    Write(std::io::Error),
    #[error("no answer (is fleet running on the tunnel host?)")]
    NoAnswer,
    #[error("answered {0:?}")]
    Answered(String),
}

async fn fleet_api(conn: &dial::Connection, endpoint: &Endpoint) -> Result<String, ApiProblem> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ch, via) = match (
        crate::tunnel::open_endpoint(&conn.handle, endpoint).await,
        endpoint,
    ) {
        (Ok(ch), _) => (ch, ""),
        // A tunnel host that refuses streamlocal is reached as the daemon reaches it.
        (Err(russh::Error::ChannelOpenFailure(_)), Endpoint::Unix(path)) => {
            let ch = crate::tunnel::api::fd_forward_session(&conn.handle, path, || async { false })
                .await
                .map_err(ApiProblem::NoFdForward)?;
            (
                ch,
                " (through `fleetctl fd-forward`: the tunnel host refuses streamlocal forwarding)",
            )
        }
        (Err(e), _) => return Err(ApiProblem::NoChannel(e)),
    };
    let mut s = crate::tunnel::channel::DrainedChannel::new(ch);
    s.write_all(b"GET /fleet/v1/machines?alt=json HTTP/1.1\r\nHost: domain-sock\r\nConnection: close\r\n\r\n")
        .await
        .map_err(ApiProblem::Write)?;
    let mut buf = Vec::new();
    let _ = s.take(4 << 20).read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let status = text.lines().next().unwrap_or("").to_string();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(if status.is_empty() {
            ApiProblem::NoAnswer
        } else {
            ApiProblem::Answered(status)
        });
    }
    Ok(format!(
        "answers, {} machine(s){via}",
        text.matches("\"primaryIP\"").count()
    ))
}

async fn check_front_door(r: &mut Report, c: &ClusterConfig, addr: std::net::SocketAddr) {
    let what = format!("cluster {}: front door {addr}", c.name);
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => r.ok(format!("{what}: listening")),
        _ => r.bad(format!(
            "{what}: not listening; is the daemon running (`fleet-broker serve`)?"
        )),
    }
    let pins = crate::config::expand_tilde("~/.fleetctl/known_hosts");
    let host = HostId::new(&addr.ip().to_string(), addr.port());
    let key = crate::front_door::existing_host_key(&crate::local::default_state_dir());
    let pinned = match (KnownHosts::load(std::slice::from_ref(&pins)), key) {
        (Ok(k), Some(key)) => matches!(k.check(&host, key.public_key()), Verdict::Trusted(_)),
        _ => false,
    };
    if pinned {
        r.ok(format!("{what}: pinned in {}", pins.display()));
    } else {
        r.bad(format!(
            "{what}: not pinned in {}; run `fleet-broker trust {} --front-door`",
            pins.display(),
            c.name
        ));
    }
}
