//! Exec sessions on cluster machines, for `fleetctl ssh|journal|status`.
//!
//! A session's target is resolved through the cluster's fleet API ([`resolve`]: a machine ID
//! prefix, a unit, either of those, or the tunnel host itself). A machine other than the
//! tunnel host is reached by a nested SSH connection carried over a `direct-tcpip` channel of
//! the tunnel, verified end to end with the cluster's pins and policy and authenticated by the
//! agent ([`pool`]: connections per machine and user, reused while they have sessions or were
//! used in the last minute; at most [`SESSIONS_PER_CONNECTION`] sessions each and, unless
//! `interactive_session = "off"`, one interactive (pty) session that makes the machine's sshd
//! send without Nagle delays, and a session channel opened ahead for the next command, so
//! sshd's `MaxSessions` (10) is never hit). A started command is
//! pumped to and from the client as frames ([`session`], `protocol::frame`). Knows nothing of
//! the CLI.

mod pool;
mod resolve;
mod session;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{known_hosts_name, HostPort};
use crate::fleet_client::FleetClient;
use crate::protocol::exec::{ExecError, ExecRequest, ExecTarget};
use crate::protocol::{HostKeyReport, HostKeyVerdict};
use crate::tunnel::channel::DrainedChannel;
use crate::tunnel::dial::{self, DialSpec};
use crate::tunnel::Tunnel;

use pool::{sweep, PoolKey, Pooled};
use resolve::Place;
pub(crate) use session::{Ended, Outcome, Session};

/// Sessions one SSH connection carries at once (sshd's default `MaxSessions` is 10).
pub(crate) const SESSIONS_PER_CONNECTION: usize = 8;
/// An idle nested connection is closed after this long.
pub(crate) const NESTED_IDLE: Duration = Duration::from_secs(60);
/// Bound on the fleet API lookups of target resolution.
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a machine list the daemon asked for answers the next target lookups (unless a
/// changing request went through the cluster's socket meanwhile): machines come and go far
/// more rarely than commands run, and each lookup saved is a round trip to the tunnel host.
const MACHINES_FRESH: Duration = Duration::from_secs(5);

/// A machine list, when it was asked for, and the cluster's change count then.
struct KeptMachines {
    at: std::time::Instant,
    changes: u64,
    machines: Arc<Vec<crate::fleet::schema::Machine>>,
}

/// The longest session setup a request may ask for (`--ssh-timeout`).
const MAX_SETUP_TIMEOUT: Duration = Duration::from_secs(3600);

/// Exec sessions of one cluster.
pub(crate) struct Exec {
    tunnel: Arc<Tunnel>,
    /// The cluster's fleet API over the tunnel, for the lookups of target resolution.
    api: FleetClient,
    agent: Option<PathBuf>,
    pool: Mutex<HashMap<PoolKey, Vec<Arc<Pooled>>>>,
    /// The last machine list, for [`MACHINES_FRESH`].
    machines: Mutex<Option<KeptMachines>>,
    /// The cluster's token: ends the pool's sweeper and every session.
    stop: CancellationToken,
}

impl Exec {
    /// Exec sessions through `tunnel`; target lookups ask `api` (the daemon's lookup
    /// client, [`crate::tunnel::api::lookup_client`]). The pool's sweeper and every session
    /// end when `stop` is cancelled.
    pub(crate) fn new(
        tunnel: Arc<Tunnel>,
        api: FleetClient,
        agent: Option<PathBuf>,
        stop: CancellationToken,
    ) -> Arc<Exec> {
        let exec = Arc::new(Exec {
            tunnel,
            api,
            agent,
            pool: Mutex::new(HashMap::new()),
            machines: Mutex::new(None),
            stop: stop.clone(),
        });
        let weak = Arc::downgrade(&exec);
        tokio::spawn(tracing::Instrument::in_current_span(sweep(weak, stop)));
        exec
    }

    /// The cluster's machines: the list asked for less than [`MACHINES_FRESH`] ago when no
    /// changing request went through the cluster's socket since, else asked again. Units are
    /// never kept: a unit's state is always asked.
    async fn machines(
        &self,
    ) -> Result<Arc<Vec<crate::fleet::schema::Machine>>, crate::fleet_client::ApiError> {
        let changes = self.tunnel.changes();
        if let Ok(kept) = self.machines.lock() {
            if let Some(k) = kept
                .as_ref()
                .filter(|k| k.changes == changes && k.at.elapsed() < MACHINES_FRESH)
            {
                return Ok(k.machines.clone());
            }
        }
        let at = std::time::Instant::now();
        let machines = Arc::new(self.api.machines().await?);
        if let Ok(mut kept) = self.machines.lock() {
            *kept = Some(KeptMachines {
                at,
                changes,
                machines: machines.clone(),
            });
        }
        Ok(machines)
    }

    fn short(id: &str) -> &str {
        id.get(..8).unwrap_or(id)
    }

    fn spec(&self, label: String, target: HostPort, user: String, forward_agent: bool) -> DialSpec {
        let c = &self.tunnel.config;
        DialSpec {
            label,
            target,
            jump: Vec::new(),
            user,
            keys: crate::auth::KeySource {
                agent: self.agent.clone(),
                identity_files: c.identity_files.clone(),
                certificate_files: c.certificate_files.clone(),
            },
            known_hosts: c.known_hosts.clone(),
            policy: c.host_key_checking,
            keepalive_interval: Some(c.keepalive_interval),
            keepalive_max: c.keepalive_max,
            trust_hint: format!("pin it with `fleet-broker trust {} --machine ID`", c.name),
            forward_agent,
            window_size: dial::NESTED_WINDOW_SIZE,
        }
    }

    /// A `direct-tcpip` channel of the tunnel to a machine's sshd.
    async fn channel_to(
        &self,
        ip: &str,
        port: u16,
    ) -> Result<russh::Channel<russh::client::Msg>, ExecError> {
        let tunnel = self
            .tunnel
            .link()
            .await
            .map_err(|e| ExecError::ssh(format!("cluster {:?}: {e}", self.tunnel.name())))?;
        tunnel
            .channel_open_direct_tcpip(ip, u32::from(port), "127.0.0.1", 0)
            .await
            .map_err(|e| {
                ExecError::ssh(format!(
                    "the tunnel host could not connect to {}: {e}",
                    known_hosts_name(ip, port)
                ))
            })
    }

    /// The host key a machine presents, and what the pins say of it (`fleet-broker trust
    /// --machine`). No credentials are offered.
    pub(crate) async fn machine_key(
        &self,
        prefix: &str,
        ssh_port: Option<u16>,
    ) -> Result<HostKeyReport, ExecError> {
        let place = self
            .resolve(&ExecTarget::Machine(prefix.to_string()))
            .await?;
        let Place::Machine { id, ip } = place else {
            return Err(ExecError::resolve(
                "that is the tunnel host; use `fleet-broker trust CLUSTER`",
            ));
        };
        let port = ssh_port.unwrap_or(self.tunnel.config.machine_ssh_port);
        let ch = self.channel_to(&ip, port).await?;
        let target = HostPort {
            host: ip.clone(),
            port,
        };
        let spec = self.spec(
            format!("machine {}", Self::short(&id)),
            target.clone(),
            self.tunnel.config.user.clone(),
            false,
        );
        let seen = tokio::time::timeout(
            self.tunnel.config.connect_timeout,
            dial::presented_key_over(&spec, DrainedChannel::new(ch)),
        )
        .await
        .map_err(|_| ExecError::ssh("timed out waiting for the machine's host key"))?
        .map_err(|e| ExecError::ssh(e.to_string()))?;
        Ok(host_key_report(id, &seen))
    }

    /// The command line a request runs (`None`: a shell). A read-only cluster runs only
    /// the commands the daemon builds itself (`status`, `journal`).
    fn command_line(&self, req: &ExecRequest) -> Result<Option<String>, ExecError> {
        match (&req.action, &req.command) {
            (Some(_), Some(_)) => Err(ExecError::request(
                "an exec request has either an action or a command, not both",
            )),
            (Some(action), None) => Ok(Some(action.command_line())),
            (None, command) if self.tunnel.config.read_only => Err(ExecError::forbidden(format!(
                "cluster {:?} is read-only in the broker's config: {} on its machines is refused (status and journal work)",
                self.tunnel.name(),
                if command.is_some() { "running a command" } else { "a shell" }
            ))),
            (None, command) => Ok(command.clone()),
        }
    }

    /// Resolves the target, connects and starts the remote command (or shell).
    pub(crate) async fn start(&self, req: &ExecRequest) -> Result<Session, ExecError> {
        let command = self.command_line(req)?;
        let setup = async {
            let place = self.resolve(&req.target).await?;
            let cfg = &self.tunnel.config;
            let user = req.user.clone().unwrap_or_else(|| cfg.user.clone());
            let port = req.ssh_port.unwrap_or(cfg.machine_ssh_port);
            let (handle, slot) = self
                .connection(&place, &user, port, req.forward_agent)
                .await?;
            let fail = |what: &str, e: russh::Error| ExecError::ssh(format!("{what}: {e}"));
            let channel = slot
                .session(&handle, &self.stop)
                .await
                .map_err(|e| fail("cannot open a session", e))?;
            if req.forward_agent {
                channel
                    .agent_forward(false)
                    .await
                    .map_err(|e| fail("agent forwarding", e))?;
            }
            if let Some(p) = &req.pty {
                channel
                    .request_pty(false, &p.term, p.cols, p.rows, 0, 0, &[])
                    .await
                    .map_err(|e| fail("pty request", e))?;
            }
            match &command {
                Some(cmd) => channel
                    .exec(true, cmd.as_bytes())
                    .await
                    .map_err(|e| fail("exec", e))?,
                None => channel
                    .request_shell(true)
                    .await
                    .map_err(|e| fail("shell", e))?,
            }
            tracing::info!(target = ?req.target, user = %user, pty = req.pty.is_some(), "exec session started");
            Ok(Session {
                channel,
                _slot: slot,
                stop: self.stop.clone(),
            })
        };
        // Any number a client sends is bounded here; none can overflow a deadline.
        let limit = req
            .timeout_secs
            .filter(|s| *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .map(|d| d.min(MAX_SETUP_TIMEOUT))
            .unwrap_or(self.tunnel.config.connect_timeout * 2);
        match tokio::time::timeout(limit, setup).await {
            Ok(r) => r,
            Err(_) => Err(ExecError::ssh(format!(
                "timed out while initiating SSH connection ({limit:?})"
            ))),
        }
    }
}

/// What the control socket reports of a presented machine key.
fn host_key_report(machine: String, seen: &dial::PresentedKey) -> HostKeyReport {
    use crate::known_hosts::{fingerprint_md5, fingerprint_sha256, Verdict};
    let (verdict, pins) = match &seen.verdict {
        Verdict::Trusted(p) => (HostKeyVerdict::Trusted, vec![p.to_string()]),
        Verdict::Revoked(p) => (HostKeyVerdict::Revoked, vec![p.to_string()]),
        Verdict::Changed(ps) => (
            HostKeyVerdict::Changed,
            ps.iter().map(|p| p.to_string()).collect(),
        ),
        Verdict::Unknown => (HostKeyVerdict::Unknown, vec![]),
    };
    let key = seen
        .key
        .to_openssh()
        .map(|k| k.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    HostKeyReport {
        machine,
        name: seen.host.lookup.clone(),
        key,
        fingerprint: fingerprint_sha256(&seen.key),
        md5: fingerprint_md5(&seen.key),
        verdict,
        pins,
    }
}
