//! Our `fleetctl`: the original's commands, flags, `FLEETCTL_*` variables, messages and
//! output bytes, talking only to fleet-broker's sockets. Knows nothing of SSH.
//!
//! Exit codes: as the original for real outcomes (0 success, 1 failure, 2 `verify`); usage
//! errors and unknown commands exit 2 (the original exits 0). See docs/compatibility.md.

pub(crate) mod args;
pub(crate) mod fanout;
pub(crate) mod guard;
pub(crate) mod lists;
pub(crate) mod remote;
pub mod session;
pub(crate) mod table;
pub(crate) mod target;
pub(crate) mod units;

use std::ffi::OsString;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};

use args::{Cli, Cmd};
use units::{Block, CreateCommand, StopCommand};

/// What `fleetctl version` reports: the fleet release whose behaviour we match.
pub(crate) const FLEET_VERSION: &str = "1.0.0";
/// fleetctl's default `--request-timeout`.
const DEFAULT_REQUEST_TIMEOUT: f64 = 3.0;
/// Added to a broker cluster's `connect_timeout` for the default request timeout.
const BROKER_SLACK_SECS: f64 = 2.0;

fn truthy(v: &str) -> bool {
    matches!(
        v.to_ascii_lowercase().as_str(),
        "1" | "t" | "true" | "yes" | "on"
    )
}

fn version_line() -> String {
    format!(
        "fleetctl version {FLEET_VERSION} (fleet-broker {})",
        env!("CARGO_PKG_VERSION")
    )
}

/// fleetctl's command line, for completions and man pages.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Runs fleetctl with `argv` (including the program name); returns the exit code.
pub async fn run(argv: Vec<OsString>) -> i32 {
    let (mut cmd, matches, cli) = match parse(argv.clone()) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let g = &cli.global;
    if g.version {
        println!("{}", version_line());
        return 0;
    }
    let Some(command) = cli.command else {
        let _ = cmd.print_help();
        return 0;
    };
    for flag in g.ignored() {
        eprintln!(
            "WARNING: {flag} is ignored: this fleetctl reaches fleet only through fleet-broker"
        );
    }
    if let Some(code) = run_local(&command, &mut cmd) {
        return code;
    }
    let sub_matches = matches.subcommand().map(|(_, m)| m).unwrap_or(&matches);
    if let Some(spec) = g.cluster.as_deref().filter(|s| fanout::is_fan_out(s)) {
        if target::chosen_flag(sub_matches) == Some("cluster") {
            return fanout::run(spec, &command, g, &argv).await;
        }
    }
    let target = match target::resolve(sub_matches, g).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("Unable to initialize client: {e}");
            return 1;
        }
    };
    let timeout = match request_timeout(g, &target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("Unable to initialize client: {e}");
            return 1;
        }
    };
    let mut api = crate::fleet_client::FleetClient::new(&target.socket, timeout);
    if target.cluster.is_some() {
        // A broker's cluster socket that is not there yet: a request to the control socket
        // starts a socket-activated daemon.
        let control = std::sync::Arc::new(target.control.clone());
        api = api.waking(std::sync::Arc::new(move || {
            let control = control.clone();
            Box::pin(async move { crate::control::client::wake(&control).await })
        }));
    }
    api.debug = g.debug || std::env::var("FLEETCTL_DEBUG").is_ok_and(|v| truthy(&v));
    let sessions = remote::Sessions {
        control: target.control.clone(),
        cluster: target.cluster.clone(),
        user: g.ssh_username.clone(),
        timeout_secs: g.ssh_timeout,
    };
    if let Some(change) = change_of(&command) {
        if let Err(code) = guard::confirm(&target, &change, g.confirm_cluster.as_deref()).await {
            return code;
        }
    }
    dispatch(command, &api, &sessions).await
}

/// What a command would change on the cluster, for its guard; `None` for commands that only
/// read.
fn change_of(command: &Cmd) -> Option<guard::Change<'_>> {
    let (command, units) = match command {
        Cmd::Submit { units, .. } => ("submit", units),
        Cmd::Load { units, .. } => ("load", units),
        Cmd::Start { units, .. } => ("start", units),
        Cmd::Stop { units, .. } => ("stop", units),
        Cmd::Unload { units, .. } => ("unload", units),
        Cmd::Destroy { units, .. } => ("destroy", units),
        // Listed one by one: a new command has to say whether it changes the cluster.
        Cmd::ListUnits(_)
        | Cmd::ListUnitFiles(_)
        | Cmd::ListMachines(_)
        | Cmd::Cat { .. }
        | Cmd::Status { .. }
        | Cmd::Journal { .. }
        | Cmd::Ssh { .. }
        | Cmd::Version { .. }
        | Cmd::Help { .. }
        | Cmd::Verify { .. } => return None,
    };
    Some(guard::Change {
        command,
        units: &units.units,
    })
}

/// The parsed command line, or the exit code when parsing ends the run (`--version`, usage
/// errors, `--help`).
fn parse(argv: Vec<OsString>) -> Result<(clap::Command, clap::ArgMatches, Cli), i32> {
    if matches!(
        argv.get(1).and_then(|a| a.to_str()),
        Some("--version" | "-v")
    ) {
        println!("{}", version_line());
        return Err(0);
    }
    // Parsed in place: the command tree is built once and kept for `help`, not cloned.
    let mut cmd = Cli::command();
    let matches = match cmd.try_get_matches_from_mut(argv) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return Err(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return Err(2);
        }
    };
    if let Err(e) = cli.global.parse_numbers(&matches) {
        eprintln!("{e}");
        return Err(2);
    }
    Ok((cmd, matches, cli))
}

/// Commands answered without a cluster: `version`, `help`, `verify`.
fn run_local(command: &Cmd, cmd: &mut clap::Command) -> Option<i32> {
    match command {
        Cmd::Version { .. } => {
            println!("{}", version_line());
            Some(0)
        }
        Cmd::Help { command } => {
            cmd.build();
            let Some(name) = command.first() else {
                let _ = cmd.print_help();
                return Some(0);
            };
            match cmd.find_subcommand_mut(name) {
                Some(s) => {
                    let _ = s.print_help();
                }
                // cobra's `%#q` of the arguments.
                None => eprintln!(
                    "Unknown help topic [{}].",
                    command
                        .iter()
                        .map(|a| format!("`{a}`"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            }
            Some(0)
        }
        Cmd::Verify { .. } => {
            eprintln!("Command \"verify\" is deprecated, DEPRECATED - No longer works");
            eprintln!(
                "WARNING: The signed/verified units feature is DEPRECATED and cannot be used."
            );
            Some(2)
        }
        _ => None,
    }
}

/// `--request-timeout`, or by default long enough for the broker to answer 503 with the
/// cause when a tunnel is down, rather than time out first and say less.
fn request_timeout(
    g: &args::GlobalFlags,
    target: &target::Target,
) -> Result<Duration, args::FlagError> {
    let secs = g.request_timeout.unwrap_or_else(|| {
        target
            .connect_timeout_secs
            .map_or(DEFAULT_REQUEST_TIMEOUT, |c| {
                (c + BROKER_SLACK_SECS).max(DEFAULT_REQUEST_TIMEOUT)
            })
    });
    if !(secs.is_finite() && secs > 0.0) {
        return Err(args::FlagError::NotPositive("request-timeout"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Runs a command that talks to the cluster.
async fn dispatch(
    command: Cmd,
    api: &crate::fleet_client::FleetClient,
    sessions: &remote::Sessions,
) -> i32 {
    let ctx = units::Ctx::new(api.clone());
    match command {
        Cmd::Status { ssh_port, units } => {
            remote::status(api, sessions, &units.units, ssh_port).await
        }
        Cmd::Journal {
            lines,
            follow,
            output,
            sudo,
            ssh_port,
            units,
        } => {
            let o = remote::JournalOpts {
                lines,
                follow,
                output,
                sudo,
                ssh_port,
            };
            remote::journal(api, sessions, &units.units, &o).await
        }
        Cmd::Ssh {
            forward_agent,
            machine,
            unit,
            ssh_port,
            args,
        } => remote::ssh(api, sessions, machine, unit, args, ssh_port, forward_agent).await,
        Cmd::ListUnits(f) => lists::list_units(api, &f).await,
        Cmd::ListUnitFiles(f) => lists::list_unit_files(api, &f).await,
        Cmd::ListMachines(f) => lists::list_machines(api, &f).await,
        Cmd::Submit { replace, units, .. } => {
            units::run_create(
                &ctx,
                CreateCommand::Submit,
                &units.units,
                replace,
                Block::Forever,
            )
            .await
        }
        Cmd::Load {
            block,
            replace,
            units,
            ..
        } => {
            units::run_create(
                &ctx,
                CreateCommand::Load,
                &units.units,
                replace,
                block.block(),
            )
            .await
        }
        Cmd::Start {
            block,
            replace,
            units,
            ..
        } => {
            units::run_create(
                &ctx,
                CreateCommand::Start,
                &units.units,
                replace,
                block.block(),
            )
            .await
        }
        Cmd::Stop { block, units } => {
            units::run_stop_unload(&ctx, StopCommand::Stop, &units.units, block.block()).await
        }
        Cmd::Unload { block, units } => {
            units::run_stop_unload(&ctx, StopCommand::Unload, &units.units, block.block()).await
        }
        Cmd::Destroy { block, units } => {
            units::run_destroy(&ctx, &units.units, block.block()).await
        }
        Cmd::Cat { units } => units::run_cat(&ctx, &units.units).await,
        Cmd::Version { .. } | Cmd::Help { .. } | Cmd::Verify { .. } => 0,
    }
}
