//! `fleet-broker`, the daemon's binary: its arguments (`args`), the daemon's logging
//! (`logging`), and the operator commands, each in its room: `ask` (what asks the running
//! daemon: reload, connect, disconnect), `show` (check-config, env, audit, completions, man
//! pages), `prompt` (the shell's cluster and its state), `keys` (trust, passphrases), `import` (import and remove), `status`, `install`.
//! `serve` is the library's `service`, `demo` the library's `demo`.
//!
//! Errors here are what the user reads, so they are `anyhow` chains: this room, like the
//! binaries, is where every typed error of the library becomes its message.
//!
//! Exit codes: 0 success, 1 failure (the message says what to do), 2 usage error (clap).

mod args;
mod ask;
mod diff;
mod import;
mod install;
mod keys;
mod logging;
mod prompt;
mod show;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{default_config_path, ClusterConfig, Config};
use args::{Cli, Cmd, PassphraseCmd};

/// `fleet-broker`'s whole run: parse the arguments, start logging for the daemon, take
/// socket-activated descriptors before any thread starts, run the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let serves = match cli.command {
        Cmd::Serve => true,
        #[cfg(feature = "demo")]
        Cmd::Demo { .. } => true,
        _ => false,
    };
    if serves {
        logging::init_logging();
    }
    // Before any other thread: taking the passed descriptors removes their variables.
    let passed = match cli.command {
        Cmd::Serve => {
            let control = crate::local::control_socket(&crate::local::default_runtime_dir());
            match crate::activation::take_from_env(&control) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("fleet-broker: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => Default::default(),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet-broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, passed)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleet-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon runs on one thread by default: its work is moving bytes between sockets and
/// SSH channels, and measured on two cores one thread beats a work-stealing pool (no
/// cross-thread wake-ups): bulk 0.8-1.06x OpenSSH instead of 0.71x, 19-23k instead of 15k
/// small requests/s. `FLEET_BROKER_THREADS=N` (N > 1) uses N worker threads, for many busy clusters.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    match std::env::var("FLEET_BROKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) if n > 1 => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
}

async fn run(cli: Cli, passed: crate::activation::Passed) -> anyhow::Result<ExitCode> {
    let asks_daemon = match &cli.command {
        Cmd::Reload => Some("reload"),
        Cmd::Status { .. } => Some("status"),
        Cmd::Connect { .. } => Some("connect"),
        Cmd::Disconnect { .. } => Some("disconnect"),
        _ => None,
    };
    if let (Some(cmd), Some(path)) = (asks_daemon, &cli.config) {
        anyhow::bail!(
            "--config {} does not apply to `fleet-broker {cmd}`: it asks the running daemon, which uses the config file it was started with (`fleet-broker reload` re-reads that file; `fleet-broker --config FILE check-config` checks another)",
            path.display()
        );
    }
    let config_path = cli.config.unwrap_or_else(default_config_path);
    let done = match cli.command {
        Cmd::Serve => crate::service::serve(config_path, passed).await,
        Cmd::Reload => ask::reload().await,
        Cmd::CheckConfig => show::check_config(&config_path),
        Cmd::Status {
            json,
            watch: Some(every),
            count,
        } => status::watch_status(json, every, count).await,
        Cmd::Status { json, .. } => status::print_once(json).await,
        Cmd::Completions { shell, fleetctl } => {
            show::completions(shell, fleetctl);
            Ok(())
        }
        Cmd::Man { dir } => show::man_pages(&dir),
        Cmd::CompleteClusters => {
            show::cluster_names(&config_path);
            Ok(())
        }
        // diff answers as diff(1) does: 0 same, 1 different, 2 trouble.
        Cmd::Diff { a, b, content } => return Ok(diff::diff(&a, &b, content).await),
        Cmd::Prompt { format } => {
            prompt::prompt(format.as_deref().unwrap_or(prompt::DEFAULT_FORMAT)).await
        }
        Cmd::Connect { cluster } => ask::cluster(&cluster, "connect").await,
        Cmd::Disconnect { cluster } => ask::cluster(&cluster, "disconnect").await,
        #[cfg(feature = "demo")]
        Cmd::Demo { once } => Ok(crate::demo::run(once).await?),
        Cmd::Env {
            cluster,
            shell,
            unset,
        } => show::env(&config_path, cluster.filter(|_| !unset), shell == "fish"),
        Cmd::Import(source) => import::import(&config_path, source).await,
        Cmd::InstallService { dry_run, socket } => install::install_service(dry_run, socket),
        Cmd::Audit { cluster, since } => show::audit(&config_path, cluster.as_deref(), since),
        Cmd::Doctor { cluster } => {
            let agent = std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from);
            let report = crate::doctor::run(&config_path, cluster.as_deref(), agent).await;
            if report.failed {
                anyhow::bail!("some checks failed (✗ above)");
            }
            Ok(())
        }
        Cmd::Passphrase(PassphraseCmd::Set { path, stdin }) => {
            keys::set_passphrase(&path, stdin).await
        }
        Cmd::Passphrase(PassphraseCmd::Forget { path }) => keys::forget_passphrase(&path),
        Cmd::Remove { cluster } => import::remove(&config_path, &cluster).await,
        Cmd::Trust {
            cluster,
            front_door: true,
            known_hosts_file,
            ..
        } => keys::trust_front_door(&config_path, &cluster, &known_hosts_file),
        Cmd::Trust {
            cluster,
            machine: Some(machine),
            ssh_port,
            yes,
            fingerprint,
            ..
        } => {
            let confirm = keys::confirm_mode(yes, fingerprint)?;
            keys::trust_machine(&config_path, &cluster, &machine, ssh_port, &confirm).await
        }
        Cmd::Trust {
            cluster,
            yes,
            fingerprint,
            ..
        } => {
            let confirm = keys::confirm_mode(yes, fingerprint)?;
            keys::trust_host(&config_path, &cluster, &confirm).await
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

/// A configured cluster, or an error listing the configured ones.
fn find_cluster<'a>(config: &'a Config, name: &str) -> anyhow::Result<&'a ClusterConfig> {
    config.clusters.get(name).ok_or_else(|| {
        anyhow::anyhow!(
            "no cluster named {name:?} in {}; configured: {}",
            config.path.display(),
            config.names()
        )
    })
}

/// The clap command of `fleet-broker`, for completions, man pages and the help tests.
fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}
