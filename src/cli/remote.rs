//! status, journal and ssh: commands on the machine that hosts a unit, run by the daemon over
//! the cluster's tunnel (reference B.7, C.4). `journal --follow` polls with journal cursors
//! so that it resumes across a tunnel reconnect without losing or repeating lines.

use std::path::PathBuf;
use std::time::Duration;

use super::session::{
    self, forward_resizes, forward_stdin, stdin_is_tty, terminal_size, Outcome, RawMode, StartError,
};
use crate::fleet::names::unit_name_mangle;
use crate::fleet::unit_file::is_global;
use crate::fleet_client::FleetClient;
use crate::protocol::exec::{ExecRequest, ExecTarget, PtyRequest};
use crate::protocol::frame::Frame;
use crate::remote_command::RemoteAction;

/// How often `journal --follow` asks for new entries.
pub(crate) const FOLLOW_POLL: Duration = Duration::from_millis(500);
/// Pause before retrying when the cluster cannot be reached while following.
const FOLLOW_RETRY: Duration = Duration::from_secs(1);
const CURSOR_PREFIX: &str = "-- cursor: ";

/// Why a command on a machine cannot run through an endpoint that is not a broker cluster's
/// socket (fleetd's own, say): the original dials SSH itself; we leave SSH to the daemon.
const BROKER_NEEDED: &str = "this endpoint is not a broker cluster: commands on machines run over SSH, which fleet-broker does through a broker cluster (--cluster NAME or a …/clusters/NAME.sock endpoint)";

/// Where sessions go and with which overrides.
#[derive(Debug, Clone)]
pub(crate) struct Sessions {
    pub control: PathBuf,
    pub cluster: Option<String>,
    pub user: Option<String>,
    pub timeout_secs: Option<f64>,
}

/// What a session runs: a command the daemon builds, or the user's own (`None`: a shell).
enum Run {
    Action(RemoteAction),
    Command(Option<String>),
}

impl Sessions {
    fn cluster(&self) -> Result<&str, StartError> {
        self.cluster
            .as_deref()
            .ok_or_else(|| StartError::Ssh(BROKER_NEEDED.into()))
    }

    fn request(
        &self,
        target: ExecTarget,
        run: Run,
        ssh_port: Option<u16>,
        forward_agent: bool,
        pty: bool,
    ) -> ExecRequest {
        let pty = pty.then(|| {
            let (cols, rows) = terminal_size().unwrap_or((80, 24));
            PtyRequest {
                term: std::env::var("TERM")
                    .ok()
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "xterm-256color".into()),
                cols,
                rows,
            }
        });
        let (action, command) = match run {
            Run::Action(a) => (Some(a), None),
            Run::Command(c) => (None, c),
        };
        ExecRequest {
            target,
            command,
            action,
            pty,
            forward_agent,
            user: self.user.clone(),
            ssh_port,
            timeout_secs: self.timeout_secs,
        }
    }

    /// Runs a command with the local terminal attached (pty and raw mode when stdin is one).
    pub(crate) async fn run_attached(
        &self,
        req: ExecRequest,
        forward_input: bool,
    ) -> Result<Outcome, StartError> {
        let cluster = self.cluster()?.to_string();
        let interactive = req.pty.is_some();
        let stream = session::open(&self.control, &cluster, &req).await?;
        Ok(attach(stream, interactive, forward_input).await)
    }

    /// Starts `action` on the machine of the scheduled unit `name` in one request, the daemon
    /// looking the unit up as it starts the session (instead of our asking the API first).
    /// `None` when it cannot: no broker cluster, or a unit that is missing, unreadable,
    /// global or not scheduled, or a daemon that does not know the request. The caller then
    /// asks the API itself and says why in fleetctl's words.
    async fn start_on_scheduled_unit(
        &self,
        name: &str,
        action: RemoteAction,
        ssh_port: Option<u16>,
        pty: bool,
    ) -> Option<Result<session::ExecStream, StartError>> {
        let cluster = self.cluster.as_deref()?;
        let req = self.request(
            ExecTarget::ScheduledUnit(name.to_string()),
            Run::Action(action),
            ssh_port,
            false,
            pty,
        );
        match session::open(&self.control, cluster, &req).await {
            Err(StartError::Resolve(_) | StartError::Request(_)) => None,
            started => Some(started),
        }
    }

    /// Runs a command and collects its stdout (stderr passes through).
    pub(crate) async fn run_captured(
        &self,
        req: ExecRequest,
    ) -> Result<(Outcome, Vec<u8>), StartError> {
        let cluster = self.cluster()?.to_string();
        let mut stream = session::open(&self.control, &cluster, &req).await?;
        stream.send(Frame::StdinEof).await;
        let mut out = Vec::new();
        loop {
            match stream.recv().await {
                Some(Frame::Stdout(b)) => out.extend_from_slice(&b),
                Some(Frame::Stderr(b)) => {
                    use std::io::Write;
                    let _ = std::io::stderr().write_all(&b);
                }
                Some(Frame::Exit(c)) => return Ok((Outcome::Exit(c), out)),
                Some(Frame::ExitSignal(s)) => return Ok((Outcome::Signal(s), out)),
                Some(Frame::Error(e)) => return Ok((Outcome::Failed(e), out)),
                Some(_) => {}
                None => {
                    return Ok((
                        Outcome::Failed("the session ended without an exit status".into()),
                        out,
                    ))
                }
            }
        }
    }
}

/// Attaches the local terminal to a started session until it ends: pty and raw mode when
/// `interactive`, stdin forwarded when `forward_input`.
async fn attach(stream: session::ExecStream, interactive: bool, forward_input: bool) -> Outcome {
    let raw = if interactive { RawMode::enter() } else { None };
    if interactive {
        forward_resizes(stream.sender());
    }
    if forward_input {
        forward_stdin(stream.sender());
    } else {
        stream.send(Frame::StdinEof).await;
    }
    let outcome = stream.finish().await;
    drop(raw);
    outcome
}

/// The exit code of a `status` or `journal` session, with fleetctl's message when SSH failed.
fn session_code(r: Result<Outcome, StartError>) -> i32 {
    match r {
        Ok(Outcome::Failed(e))
        | Err(StartError::Ssh(e) | StartError::Request(e) | StartError::Resolve(e)) => {
            eprintln!("Unable to SSH to remote host: {e}");
            255
        }
        Ok(o) => o.code(),
    }
}

/// The unit, or fleetctl's message when it does not exist or cannot be read.
async fn unit_or_report(api: &FleetClient, name: &str) -> Result<crate::fleet::schema::Unit, ()> {
    match api.unit(name).await {
        Ok(Some(u)) => Ok(u),
        Ok(None) => {
            eprintln!("Unit {name} does not exist.");
            Err(())
        }
        Err(e) => {
            eprintln!("Error retrieving Unit {name}: {e}");
            Err(())
        }
    }
}

/// `fleetctl status UNIT…`.
pub(crate) async fn status(
    api: &FleetClient,
    s: &Sessions,
    args: &[String],
    ssh_port: Option<u16>,
) -> i32 {
    let mut printed = false;
    for arg in args {
        let name = unit_name_mangle(arg);
        let action = RemoteAction::Status { unit: name.clone() };
        let pty = stdin_is_tty();
        if let Some(started) = s
            .start_on_scheduled_unit(&name, action.clone(), ssh_port, pty)
            .await
        {
            if printed {
                println!();
            }
            printed = true;
            let ended = match started {
                Ok(stream) => Ok(attach(stream, pty, false).await),
                Err(e) => Err(e),
            };
            match session_code(ended) {
                0 => continue,
                code => return code,
            }
        }
        let Ok(u) = unit_or_report(api, &name).await else {
            return 1;
        };
        let machines: Vec<String> = if is_global(&u.options) {
            match api.unit_states(None, Some(&name)).await {
                Ok(states) => states.into_iter().map(|st| st.machine_id).collect(),
                Err(e) => {
                    eprintln!("Error retrieving state of Unit {name}: {e}");
                    return 1;
                }
            }
        } else if u.current_state == "inactive" {
            eprintln!("Unit {name} does not appear to be loaded.");
            return 1;
        } else {
            vec![u.machine_id.clone()]
        };
        for machine in machines {
            if printed {
                println!();
            }
            printed = true;
            let req = s.request(
                ExecTarget::Machine(machine),
                Run::Action(action.clone()),
                ssh_port,
                false,
                pty,
            );
            match session_code(s.run_attached(req, false).await) {
                0 => {}
                code => return code,
            }
        }
    }
    0
}

/// Options of `fleetctl journal`.
#[derive(Debug, Clone)]
pub(crate) struct JournalOpts {
    pub lines: u32,
    pub follow: bool,
    pub output: String,
    pub sudo: bool,
    pub ssh_port: Option<u16>,
}

fn journal_action(
    unit: &str,
    o: &JournalOpts,
    lines: bool,
    cursor: Option<&str>,
    show_cursor: bool,
) -> RemoteAction {
    RemoteAction::Journal {
        unit: unit.to_string(),
        lines: lines.then_some(o.lines),
        output: o.output.clone(),
        sudo: o.sudo,
        show_cursor,
        after_cursor: cursor.map(str::to_string),
    }
}

/// `fleetctl journal UNIT`.
pub(crate) async fn journal(
    api: &FleetClient,
    s: &Sessions,
    args: &[String],
    o: &JournalOpts,
) -> i32 {
    if args.len() != 1 {
        eprintln!("One unit file must be provided.");
        return 1;
    }
    let name = unit_name_mangle(&args[0]);
    if !o.follow {
        let action = journal_action(&name, o, true, None, false);
        if let Some(started) = s
            .start_on_scheduled_unit(&name, action, o.ssh_port, false)
            .await
        {
            return session_code(match started {
                Ok(stream) => Ok(attach(stream, false, false).await),
                Err(e) => Err(e),
            });
        }
    }
    let Ok(u) = unit_or_report(api, &name).await else {
        return 1;
    };
    if is_global(&u.options) {
        eprintln!("Unable to retrieve journal of global unit {name}.");
        return 1;
    }
    if u.current_state == "inactive" {
        eprintln!("Unit {name} does not appear to be running.");
        return 1;
    }
    let target = ExecTarget::Machine(u.machine_id.clone());
    if !o.follow {
        let req = s.request(
            target,
            Run::Action(journal_action(&name, o, true, None, false)),
            o.ssh_port,
            false,
            false,
        );
        return session_code(s.run_attached(req, false).await);
    }
    follow(s, target, &name, o).await
}

/// Splits journalctl output into the entries to print and the trailing cursor.
fn split_cursor(out: &[u8]) -> (&[u8], Option<String>) {
    let text = out.strip_suffix(b"\n").unwrap_or(out);
    let start = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let last = &text[start..];
    match std::str::from_utf8(last)
        .ok()
        .and_then(|l| l.strip_prefix(CURSOR_PREFIX))
    {
        Some(c) => (&out[..start], Some(c.trim().to_string())),
        None => (out, None),
    }
}

/// Follows the journal by asking for the entries after the last cursor seen, so that a
/// reconnect of the tunnel neither loses nor repeats a line.
async fn follow(s: &Sessions, target: ExecTarget, name: &str, o: &JournalOpts) -> i32 {
    use std::io::Write;
    let mut cursor: Option<String> = None;
    let mut first = true;
    let mut down_since: Option<std::time::Instant> = None;
    loop {
        let action = journal_action(name, o, first, cursor.as_deref(), true);
        let req = s.request(
            target.clone(),
            Run::Action(action),
            o.ssh_port,
            false,
            false,
        );
        match s.run_captured(req).await {
            Ok((Outcome::Exit(0), out)) => {
                if down_since.take().is_some() {
                    eprintln!("fleetctl: connection to the cluster is back; resuming the journal");
                }
                let (entries, next) = split_cursor(&out);
                let mut stdout = std::io::stdout().lock();
                if stdout
                    .write_all(entries)
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    return 0;
                }
                if let Some(c) = next {
                    cursor = Some(c);
                    first = false;
                }
                tokio::time::sleep(FOLLOW_POLL).await;
            }
            Ok((Outcome::Exit(code), _)) => return code as i32,
            Ok((Outcome::Signal(sig), _)) => return Outcome::Signal(sig).code(),
            Err(StartError::Resolve(e)) => {
                eprintln!("Unable to SSH to remote host: {e}");
                return 255;
            }
            Ok((Outcome::Failed(e), _)) | Err(StartError::Ssh(e) | StartError::Request(e)) => {
                if down_since.is_none() {
                    eprintln!("fleetctl: lost the journal session ({e}); retrying");
                    down_since = Some(std::time::Instant::now());
                }
                tokio::time::sleep(FOLLOW_RETRY).await;
            }
        }
    }
}

/// `fleetctl ssh`.
pub(crate) async fn ssh(
    api: &FleetClient,
    s: &Sessions,
    machine: Option<String>,
    unit: Option<String>,
    args: Vec<String>,
    ssh_port: Option<u16>,
    forward_agent: bool,
) -> i32 {
    if machine.is_some() && unit.is_some() {
        eprintln!("Both machine and unit flags provided, please specify only one.");
        return 1;
    }
    let mut rest = args;
    let target = match (machine, unit) {
        (Some(m), None) => ExecTarget::Machine(m),
        (None, Some(u)) => ExecTarget::Unit(unit_name_mangle(&u)),
        _ => {
            if rest.is_empty() {
                eprintln!("Unable to proceed: one machine or unit must be provided");
                return 1;
            }
            ExecTarget::Auto(rest.remove(0))
        }
    };
    if let Some(i) = rest.iter().position(|a| a == "--") {
        rest.drain(..=i);
    }
    let command = (!rest.is_empty()).then(|| rest.join(" "));
    let shell = command.is_none();
    if s.cluster.is_none() {
        return ssh_without_broker(api, &target, shell).await;
    }
    let req = s.request(
        target,
        Run::Command(command),
        ssh_port,
        forward_agent,
        stdin_is_tty(),
    );
    match s.run_attached(req, true).await {
        Err(StartError::Resolve(e)) if e == "Could not determine address of machine." => {
            eprintln!("{e}");
            1
        }
        Err(StartError::Resolve(e)) => {
            eprintln!("Unable to proceed: {e}");
            1
        }
        Err(StartError::Ssh(e) | StartError::Request(e)) | Ok(Outcome::Failed(e)) if shell => {
            eprintln!("Failed opening shell over SSH: {e}");
            1
        }
        Err(StartError::Ssh(e) | StartError::Request(e)) | Ok(Outcome::Failed(e)) => {
            eprintln!("Failed running command over SSH: {e}");
            255
        }
        Ok(outcome) => outcome.code(),
    }
}

/// `ssh` through an endpoint that is not a broker cluster (fleetd's own socket): the target is
/// looked up as the original looks it up, with its messages, and a machine that is found is
/// named with what running something there needs.
async fn ssh_without_broker(api: &FleetClient, target: &ExecTarget, shell: bool) -> i32 {
    use crate::fleet::target::{find, Wanted};
    let (wanted, unit_name) = match target {
        ExecTarget::Machine(m) => (Wanted::Machine(m), None),
        ExecTarget::Unit(u) | ExecTarget::ScheduledUnit(u) => (Wanted::Unit, Some(u.clone())),
        ExecTarget::Auto(a) => (Wanted::Auto(a), Some(unit_name_mangle(a))),
        ExecTarget::TunnelHost => (Wanted::Machine(""), None),
    };
    let machines = match api.machines().await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("Unable to proceed: {e}");
            return 1;
        }
    };
    let unit = match &unit_name {
        Some(n) => match api.unit(n).await {
            Ok(u) => u,
            Err(e) if matches!(wanted, Wanted::Unit) => {
                eprintln!("Unable to proceed: {e}");
                return 1;
            }
            Err(_) => None,
        },
        None => None,
    };
    match find(wanted, &machines, unit.as_ref()) {
        Err(e @ crate::fleet::target::TargetError::NoAddress) => {
            eprintln!("{e}");
            1
        }
        Err(e) => {
            eprintln!("Unable to proceed: {e}");
            1
        }
        Ok(m) if m.primary_ip.is_empty() => {
            eprintln!("Could not determine address of machine.");
            1
        }
        Ok(m) => {
            let (what, code) = if shell {
                ("Failed opening shell over SSH", 1)
            } else {
                ("Failed running command over SSH", 255)
            };
            eprintln!(
                "{what}: machine {} ({}): {BROKER_NEEDED}",
                crate::escape::display(&m.id),
                crate::escape::display(&m.primary_ip)
            );
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_line_is_split_off() {
        let (e, c) = split_cursor(b"one\ntwo\n-- cursor: s=abc;i=1\n");
        assert_eq!(e, b"one\ntwo\n");
        assert_eq!(c.as_deref(), Some("s=abc;i=1"));
        let (e, c) = split_cursor(b"");
        assert_eq!((e, c), (&b""[..], None));
        let (e, c) = split_cursor(b"-- cursor: x\n");
        assert_eq!((e, c.as_deref()), (&b""[..], Some("x")));
    }
}
