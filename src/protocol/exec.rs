//! The exec request of `POST /v1/clusters/NAME/exec` and why a session could not start.

use serde::{Deserialize, Serialize};

use crate::remote_command::RemoteAction;

/// Bound on the exec request body.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Where a session runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecTarget {
    /// A machine ID or unique prefix.
    Machine(String),
    /// The machine a (non-global) unit is scheduled to.
    Unit(String),
    /// A machine ID prefix or a unit, whichever matches (`fleetctl ssh TARGET`).
    Auto(String),
    /// The tunnel host itself.
    TunnelHost,
    /// The machine of a unit that is scheduled (not global, not inactive, with a machine):
    /// `status` and `journal` in one request, the daemon looking the unit up as it starts the
    /// session. Any other unit is refused as [`ExecErrorKind::Resolve`], and the client asks
    /// the API itself to say why in fleetctl's words.
    ScheduledUnit(String),
}

/// A terminal for the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyRequest {
    /// `TERM` of the local terminal.
    pub term: String,
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
}

/// The JSON body of `POST /v1/clusters/NAME/exec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Where the session runs.
    pub target: ExecTarget,
    /// The remote command line; `None` (and no `action`) starts a login shell.
    #[serde(default)]
    pub command: Option<String>,
    /// A command the daemon builds (`status`, `journal`); excludes `command`.
    #[serde(default)]
    pub action: Option<RemoteAction>,
    /// A terminal, for interactive sessions.
    #[serde(default)]
    pub pty: Option<PtyRequest>,
    /// Forward the daemon's agent to the session (`fleetctl ssh -A`).
    #[serde(default)]
    pub forward_agent: bool,
    /// Overrides the cluster's user (`--ssh-username`).
    #[serde(default)]
    pub user: Option<String>,
    /// Overrides the cluster's `machine_ssh_port` (`--ssh-port`).
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// Bounds session setup (`--ssh-timeout`), seconds.
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

/// What kind of failure stopped a session from starting; the error body's `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecErrorKind {
    /// The target: no such machine or unit, ambiguous, no address (fleetctl's
    /// `Unable to proceed: …` texts).
    Resolve,
    /// The SSH hop: the tunnel, the machine's host key, authentication, the channel.
    Ssh,
    /// The request itself is malformed.
    Request,
    /// The cluster's config refuses it (`read_only`).
    Forbidden,
}

impl ExecErrorKind {
    /// The HTTP status the control socket answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ExecErrorKind::Resolve => 404,
            ExecErrorKind::Request => 400,
            ExecErrorKind::Forbidden => 403,
            ExecErrorKind::Ssh => 502,
        }
    }
}

/// Why a session could not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ExecError {
    /// What failed.
    pub kind: ExecErrorKind,
    /// fleetctl's text where it has one, else ours.
    pub message: String,
}

impl ExecError {
    /// A target that could not be resolved.
    pub fn resolve(m: impl Into<String>) -> ExecError {
        ExecError {
            kind: ExecErrorKind::Resolve,
            message: m.into(),
        }
    }
    /// A failed SSH hop.
    pub fn ssh(m: impl Into<String>) -> ExecError {
        ExecError {
            kind: ExecErrorKind::Ssh,
            message: m.into(),
        }
    }
    /// A malformed request.
    pub fn request(m: impl Into<String>) -> ExecError {
        ExecError {
            kind: ExecErrorKind::Request,
            message: m.into(),
        }
    }
    /// A request the config refuses.
    pub fn forbidden(m: impl Into<String>) -> ExecError {
        ExecError {
            kind: ExecErrorKind::Forbidden,
            message: m.into(),
        }
    }
}

/// Reads and validates an exec request body.
pub fn parse_request(body: &[u8]) -> Result<ExecRequest, ExecError> {
    if body.len() > MAX_REQUEST {
        return Err(ExecError::request("exec request too large"));
    }
    serde_json::from_slice(body).map_err(|e| ExecError::request(format!("bad exec request: {e}")))
}
