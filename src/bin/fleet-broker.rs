//! `fleet-broker`: the daemon and its admin commands. Thin: parse arguments, call the library.
//!
//! Exit codes: 0 success, 1 failure (the message says what to do), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_broker::config::{default_config_path, Config};
use fleet_broker::control::client::error_text;
use fleet_broker::daemon::DaemonOptions;
use fleet_broker::protocol::{ClusterInfo, ClusterList};

#[derive(Parser)]
#[command(
    name = "fleet-broker",
    version,
    about = "SSH tunnel and access broker for CoreOS fleet clusters"
)]
struct Cli {
    /// Config file (default: $FLEET_BROKER_CONFIG or $XDG_CONFIG_HOME/fleet-broker/config.toml)
    #[arg(long, global = true, help_heading = "Global options")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum PassphraseCmd {
    /// Ask for the passphrase on the terminal (never echoed), check it decrypts the file, store it
    Set {
        /// The encrypted identity file
        path: PathBuf,
        /// Read the passphrase from the first line of stdin (for scripts)
        #[arg(long)]
        stdin: bool,
    },
    /// Forget the stored passphrase
    Forget {
        /// The identity file
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum ImportSource {
    /// From `vagrant ssh-config` (run in the current directory, or read from FILE or - for stdin)
    Vagrant {
        /// Cluster name (default: the current directory's name)
        #[arg(long)]
        name: Option<String>,
        /// Output of `vagrant ssh-config`; - for stdin
        file: Option<PathBuf>,
        /// fleet's API on the VM (default unix:///var/run/fleet.sock)
        #[arg(long)]
        endpoint: Option<String>,
        /// Overwrite a cluster of the same name
        #[arg(long)]
        replace: bool,
        /// Pin only a host key with this fingerprint (SHA256:… or MD5:…); for scripts
        #[arg(long, value_name = "FP", conflicts_with = "trust_on_first_use")]
        fingerprint: Vec<String>,
        /// Pin whatever key the VM presents now, unchecked; for scripts that accept that
        #[arg(long = "trust-on-first-use")]
        trust_on_first_use: bool,
    },
    /// From an ssh_config host, resolved by OpenSSH itself (`ssh -G HOST`)
    SshConfig {
        /// The Host as you would give it to ssh
        host: String,
        /// Cluster name (default: HOST)
        #[arg(long)]
        name: Option<String>,
        /// ssh_config file to read instead of ~/.ssh/config (`ssh -F`)
        #[arg(long = "ssh-config", value_name = "FILE")]
        ssh_config: Option<PathBuf>,
        /// fleet's API on the tunnel host (default unix:///var/run/fleet.sock)
        #[arg(long)]
        endpoint: Option<String>,
        /// Overwrite a cluster of the same name
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground (logs to stderr; RUST_LOG sets the level)
    Serve,
    /// Ask the running daemon to re-read its config (as SIGHUP does)
    Reload,
    /// Validate the config and print the effective settings
    CheckConfig,
    /// Show each cluster's tunnel state
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        /// Refresh every SECONDS (default 2) in place until Ctrl-C; with --json, one line per refresh
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
        /// With --watch: stop after N refreshes
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
    },
    /// Ask the daemon to connect a cluster now (also clears a failed state)
    Connect {
        /// The cluster's name in the config
        cluster: String,
    },
    /// Ask the daemon to close a cluster's tunnel
    Disconnect {
        /// The cluster's name in the config
        cluster: String,
    },
    /// Show a cluster's host key and pin it in its first known_hosts file
    Trust {
        /// The cluster's name in the config
        cluster: String,
        /// A machine of the cluster (ID or unique prefix), reached through the running daemon
        #[arg(long, value_name = "ID")]
        machine: Option<String>,
        /// SSH port of the machine (default: the cluster's machine_ssh_port)
        #[arg(long = "ssh-port", value_name = "N", requires = "machine")]
        ssh_port: Option<u16>,
        /// Pin without asking, at a terminal, after checking the fingerprint another way
        #[arg(long, conflicts_with = "fingerprint")]
        yes: bool,
        /// Pin only a key with this fingerprint (SHA256:… or MD5:…; repeat for jump hosts).
        /// For scripts: confirmation otherwise comes from the terminal, never stdin
        #[arg(long, value_name = "FP")]
        fingerprint: Vec<String>,
        /// Pin the cluster's front door in the original fleetctl's known_hosts instead
        #[arg(long = "front-door", conflicts_with_all = ["machine", "yes", "fingerprint"])]
        front_door: bool,
        /// The original fleetctl's known_hosts file (with --front-door)
        #[arg(
            long = "known-hosts-file",
            env = "FLEETCTL_KNOWN_HOSTS_FILE",
            default_value = "~/.fleetctl/known_hosts",
            requires = "front_door"
        )]
        known_hosts_file: String,
    },
    /// Add a cluster from a Vagrant project or an ssh_config host, and pin its host
    #[command(subcommand)]
    Import(ImportSource),
    /// Store or forget the passphrase of an encrypted identity file, in the OS keyring
    #[command(subcommand)]
    Passphrase(PassphraseCmd),
    /// Check everything a cluster needs, in one run: each line ✓ or ✗ with what to do
    Doctor {
        /// Only this cluster
        cluster: Option<String>,
    },
    /// Print a shell completion script (for fleet-broker, or with --fleetctl for fleetctl)
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        /// For our fleetctl instead
        #[arg(long)]
        fleetctl: bool,
    },
    /// Write man pages of fleet-broker and fleetctl (and their subcommands) into DIR
    Man {
        /// Where to write the pages (e.g. ~/.local/share/man/man1)
        dir: PathBuf,
    },
    /// Print the audit trail: mutating API requests and exec sessions, who asked, what came of it
    Audit {
        /// Only this cluster
        #[arg(long)]
        cluster: Option<String>,
        /// Only the last DURATION (e.g. 1h, 30m)
        #[arg(long, value_name = "DURATION")]
        since: Option<humantime::Duration>,
    },
    /// Install the systemd user unit with this binary's path, reload the user manager, enable and start it
    InstallService {
        /// Print the unit and the commands instead
        #[arg(long)]
        dry_run: bool,
        /// Also install fleet-broker.socket and enable it instead of the service: the daemon starts on the first request to its control socket
        #[arg(long)]
        socket: bool,
    },
    /// Remove a cluster from the config (and tell a running daemon)
    Remove {
        /// The cluster's name in the config
        cluster: String,
    },
    /// Print shell commands that point fleetctl at a cluster: eval "$(fleet-broker env NAME)"
    Env {
        /// The cluster fleetctl should use
        #[arg(required_unless_present = "unset")]
        cluster: Option<String>,
        /// Shell syntax: sh (bash, zsh, …) or fish
        #[arg(long, default_value = "sh", value_parser = ["sh", "bash", "zsh", "fish"])]
        shell: String,
        /// Print the commands that undo it instead
        #[arg(long, conflicts_with = "cluster")]
        unset: bool,
    },
    /// Run a built-in demo cluster through the real daemon
    #[cfg(feature = "demo")]
    Demo {
        /// Check once and exit 0/1 instead of serving until Ctrl-C
        #[arg(long)]
        once: bool,
    },
}

/// The log filter: `RUST_LOG`, where russh's packet-level messages stay at `warn` unless the
/// filter names russh itself; an invalid `RUST_LOG` is reported and `info` used instead.
fn log_filter(env: Option<&str>) -> (String, Option<String>) {
    let Some(raw) = env.map(str::trim).filter(|v| !v.is_empty()) else {
        return ("info,russh=warn".into(), None);
    };
    let wanted = if raw.contains("russh") {
        raw.to_string()
    } else {
        format!("{raw},russh=warn")
    };
    match tracing_subscriber::EnvFilter::try_new(&wanted) {
        Ok(_) => (wanted, None),
        Err(e) => (
            "info,russh=warn".into(),
            Some(format!(
                "RUST_LOG={raw:?} is not a valid log filter ({e}); logging at info"
            )),
        ),
    }
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` names its device and inode
/// (systemd sets it for a service whose output goes to the journal).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsRawFd;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_raw_fd())
        .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// Logs to stderr, or natively to the journal when stderr is the journal's stream: one entry
/// per event with its priority, its fields as journal fields (`CLUSTER=prod`, `ERROR=…`) and
/// no timestamp of our own. A journal that cannot be reached falls back to stderr.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, mut problem) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let filter = tracing_subscriber::EnvFilter::new(filter);
    let journal = if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(l) => Some(
                l.with_field_prefix(None)
                    .with_syslog_identifier("fleet-broker".into())
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        ..tracing_journald::PriorityMappings::new()
                    }),
            ),
            Err(e) => {
                problem = Some(format!(
                    "JOURNAL_STREAM is set but the journal's socket cannot be used ({e}); logging to stderr"
                ));
                None
            }
        }
    } else {
        None
    };
    let registry = tracing_subscriber::registry().with(filter);
    match journal {
        Some(j) => registry.with(j).init(),
        None => {
            use std::io::IsTerminal;
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(std::io::stderr().is_terminal()),
                )
                .init()
        }
    }
    if let Some(p) = problem {
        tracing::warn!("{p}");
    }
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let path = path.unwrap_or_else(default_config_path);
    Ok(Config::load(&path)?)
}

async fn control_request(method: &str, path: &str) -> anyhow::Result<(u16, bytes::Bytes)> {
    let sock = fleet_broker::control::client::default_control_socket();
    fleet_broker::control::client::request(&sock, method, path)
        .await
        .map_err(anyhow::Error::msg)
}

async fn run(cli: Cli, passed: fleet_broker::activation::Passed) -> anyhow::Result<()> {
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
    match cli.command {
        Cmd::Serve => {
            fleet_broker::service::serve(cli.config.unwrap_or_else(default_config_path), passed)
                .await
        }
        Cmd::Reload => {
            let (status, body) = control_request("POST", "/v1/reload").await?;
            if status != 200 {
                anyhow::bail!("config not reloaded: {}", error_text(&body));
            }
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            println!("reloaded: {}", v["reloaded"].as_str().unwrap_or_default());
            Ok(())
        }
        Cmd::CheckConfig => {
            let config = load_config(cli.config)?;
            println!(
                "# {}: OK, {} cluster(s)",
                config.path.display(),
                config.clusters.len()
            );
            if config.clusters.is_empty() {
                println!("# no clusters yet: `fleet-broker import vagrant` (in a Vagrant project), `fleet-broker import ssh-config HOST`, or a [clusters.NAME] table with a `tunnel` (see config/example.toml)");
            }
            for c in config.clusters.values() {
                for f in &c.identity_files {
                    if !f.exists() {
                        eprintln!(
                            "warning: cluster {:?}: identity file {} does not exist",
                            c.name,
                            f.display()
                        );
                    }
                }
                if !c.known_hosts.iter().any(|f| f.exists())
                    && c.host_key_checking != fleet_broker::config::HostKeyPolicy::Off
                {
                    eprintln!(
                        "warning: cluster {:?}: none of its known_hosts files exists yet; pin the tunnel host with `fleet-broker trust {}`",
                        c.name, c.name
                    );
                }
            }
            for c in config.clusters.values() {
                println!();
                print!("{}", c.to_toml());
            }
            Ok(())
        }
        Cmd::Status {
            json,
            watch: Some(every),
            count,
        } => fleet_broker::status::watch_status(json, every, count).await,
        Cmd::Status { json, .. } => {
            let (text, verdict) = fleet_broker::status::status_once(json)
                .await
                .map_err(anyhow::Error::msg)?;
            print!("{text}");
            verdict.map_err(anyhow::Error::msg)
        }
        Cmd::Completions { shell, fleetctl } => {
            let (mut cmd, name) = if fleetctl {
                (fleet_broker::cli::command(), "fleetctl")
            } else {
                (<Cli as clap::CommandFactory>::command(), "fleet-broker")
            };
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            let mut written = 0;
            for (cmd, name) in [
                (<Cli as clap::CommandFactory>::command(), "fleet-broker"),
                (fleet_broker::cli::command(), "fleetctl"),
            ] {
                let cmd = cmd.name(name);
                written += write_man_pages(&dir, &cmd, name)?;
            }
            println!("wrote {written} man pages to {}", dir.display());
            Ok(())
        }
        Cmd::Connect { cluster } | Cmd::Disconnect { cluster }
            if !fleet_broker::config::valid_cluster_name(&cluster) =>
        {
            anyhow::bail!("{cluster:?} is not a valid cluster name")
        }
        Cmd::Connect { cluster } => control_cmd(&cluster, "connect").await,
        Cmd::Disconnect { cluster } => control_cmd(&cluster, "disconnect").await,
        #[cfg(feature = "demo")]
        Cmd::Demo { once } => Ok(fleet_broker::demo::run(once).await?),
        Cmd::Env {
            cluster,
            shell,
            unset,
        } => {
            let fish = shell == "fish";
            let Some(cluster) = cluster.filter(|_| !unset) else {
                if fish {
                    println!("set -e FLEETCTL_ENDPOINT; set -e FLEETCTL_CLUSTER;");
                } else {
                    println!("unset FLEETCTL_ENDPOINT FLEETCTL_CLUSTER");
                }
                return Ok(());
            };
            let config = load_config(cli.config)?;
            find_cluster(&config, &cluster)?;
            let socket = fleet_broker::local::cluster_socket(
                &fleet_broker::local::default_runtime_dir(),
                &cluster,
            );
            let endpoint = format!("unix://{}", socket.display());
            if fish {
                // fish: inside single quotes only \\ and \' are escapes.
                let q = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
                println!("set -gx FLEETCTL_ENDPOINT {};", q(&endpoint));
                println!("set -gx FLEETCTL_CLUSTER {};", q(&cluster));
            } else {
                use fleet_broker::remote_command::shell_quote;
                println!(
                    "export FLEETCTL_ENDPOINT={} FLEETCTL_CLUSTER={}",
                    shell_quote(&endpoint),
                    shell_quote(&cluster)
                );
            }
            Ok(())
        }
        Cmd::Import(source) => import(cli.config, source).await,
        Cmd::InstallService { dry_run, socket } => {
            fleet_broker::install::install_service(dry_run, socket)
        }
        Cmd::Audit { cluster, since } => {
            let config = load_config(cli.config)?;
            let path = match config.audit_log {
                fleet_broker::config::AuditLogSetting::Off => {
                    anyhow::bail!(
                        "the audit log is off (audit_log = \"off\" in {})",
                        config.path.display()
                    )
                }
                fleet_broker::config::AuditLogSetting::File(p) => p,
                fleet_broker::config::AuditLogSetting::Default => {
                    DaemonOptions::from_env().state_dir.join("audit.jsonl")
                }
            };
            let cutoff = since.map(|d| std::time::SystemTime::now() - *d);
            let mut text = String::new();
            let mut old = path.clone().into_os_string();
            old.push(".1");
            for f in [PathBuf::from(old), path.clone()] {
                if let Ok(t) = std::fs::read_to_string(&f) {
                    text.push_str(&t);
                }
            }
            for line in text.lines() {
                if let Some(l) = fleet_broker::audit::readable(line, cluster.as_deref(), cutoff) {
                    println!("{l}");
                }
            }
            Ok(())
        }
        Cmd::Doctor { cluster } => {
            let path = cli.config.unwrap_or_else(default_config_path);
            let agent = std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from);
            let report = fleet_broker::doctor::run(&path, cluster.as_deref(), agent).await;
            if report.failed {
                anyhow::bail!("some checks failed (✗ above)");
            }
            Ok(())
        }
        Cmd::Passphrase(PassphraseCmd::Set { path, stdin }) => {
            let secret = if stdin {
                let mut line = String::new();
                std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut line)?;
                zeroize::Zeroizing::new(line.trim_end_matches(['\n', '\r']).to_string())
            } else {
                fleet_broker::passphrase::read_from_terminal(&format!(
                    "Passphrase for {}: ",
                    path.display()
                ))?
            };
            fleet_broker::passphrase::set(&path, &secret).map_err(anyhow::Error::msg)?;
            println!(
                "stored the passphrase of {} in {}",
                path.display(),
                fleet_broker::passphrase::STORE
            );
            tell_daemon_to_reconnect_failed().await;
            Ok(())
        }
        Cmd::Passphrase(PassphraseCmd::Forget { path }) => {
            if fleet_broker::passphrase::forget(&path).map_err(anyhow::Error::msg)? {
                println!("forgot the passphrase of {}", path.display());
            } else {
                println!("no passphrase of {} was stored", path.display());
            }
            Ok(())
        }
        Cmd::Remove { cluster } => {
            let path = cli.config.unwrap_or_else(default_config_path);
            fleet_broker::config_edit::remove_cluster(&path, &cluster)
                .map_err(anyhow::Error::msg)?;
            println!("removed cluster {cluster:?} from {}", path.display());
            tell_daemon_to_reload().await;
            Ok(())
        }
        Cmd::Trust {
            cluster,
            front_door: true,
            known_hosts_file,
            ..
        } => {
            let config = load_config(cli.config)?;
            let c = find_cluster(&config, &cluster)?;
            let file = fleet_broker::config::expand_tilde(&known_hosts_file);
            println!(
                "{}",
                fleet_broker::trust::trust_front_door(
                    c,
                    &fleet_broker::daemon::DaemonOptions::from_env().state_dir,
                    &file
                )?
            );
            Ok(())
        }
        Cmd::Trust {
            cluster,
            machine: Some(machine),
            ssh_port,
            yes,
            fingerprint,
            ..
        } => {
            let confirm = confirm_mode(yes, fingerprint)?;
            let config = load_config(cli.config)?;
            let c = find_cluster(&config, &cluster)?;
            let control = fleet_broker::control::client::default_control_socket();
            println!(
                "{}",
                fleet_broker::trust::trust_machine(c, &control, &machine, ssh_port, &confirm)
                    .await?
            );
            Ok(())
        }
        Cmd::Trust {
            cluster,
            yes,
            fingerprint,
            ..
        } => {
            let confirm = confirm_mode(yes, fingerprint)?;
            let config = load_config(cli.config)?;
            let c = find_cluster(&config, &cluster)?;
            println!("{}", fleet_broker::trust::trust(c, &confirm).await?);
            // A running daemon retries at once (a failed tunnel waits for this).
            if control_request("POST", &format!("/v1/clusters/{cluster}/connect"))
                .await
                .is_ok()
            {
                println!("asked the running daemon to reconnect {cluster}");
            }
            Ok(())
        }
    }
}

async fn control_cmd(cluster: &str, what: &str) -> anyhow::Result<()> {
    let (status, body) = control_request("POST", &format!("/v1/clusters/{cluster}/{what}")).await?;
    if status != 200 {
        anyhow::bail!("{}", error_text(&body));
    }
    let info: ClusterInfo = serde_json::from_slice(&body)?;
    let line = format!(
        "{}: {}{}",
        info.name,
        info.status.state,
        info.status
            .last_error
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    // `connect` succeeds only when the tunnel is up; its line says why not.
    if what == "connect" && info.status.state != fleet_broker::tunnel::State::Ready {
        anyhow::bail!("{line}");
    }
    println!("{line}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = match cli.command {
        Cmd::Serve => true,
        #[cfg(feature = "demo")]
        Cmd::Demo { .. } => true,
        _ => false,
    };
    if logs {
        init_logging();
    }
    // Before any other thread: taking the passed descriptors removes their variables.
    let passed = match cli.command {
        Cmd::Serve => {
            let control =
                fleet_broker::local::control_socket(&fleet_broker::local::default_runtime_dir());
            match fleet_broker::activation::take_from_env(&control) {
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A configured cluster, or an error listing the configured ones.
fn find_cluster<'a>(
    config: &'a Config,
    name: &str,
) -> anyhow::Result<&'a fleet_broker::config::ClusterConfig> {
    config.clusters.get(name).ok_or_else(|| {
        anyhow::anyhow!(
            "no cluster named {name:?} in {}; configured: {}",
            config.path.display(),
            config
                .clusters
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
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

/// Asks a running daemon to retry its clusters now (a stored passphrase may be what they
/// lacked); quiet when none runs.
async fn tell_daemon_to_reconnect_failed() {
    let Ok((200, body)) = control_request("GET", "/v1/clusters").await else {
        return;
    };
    let Ok(list) = serde_json::from_slice::<ClusterList>(&body) else {
        return;
    };
    for c in list.clusters.iter().filter(|c| {
        c.status.state != fleet_broker::tunnel::State::Ready
            && c.status.state != fleet_broker::tunnel::State::Idle
    }) {
        if control_request("POST", &format!("/v1/clusters/{}/connect", c.name))
            .await
            .is_ok()
        {
            println!("asked the running daemon to retry cluster {:?}", c.name);
        }
    }
}

/// Writes `NAME.1` for `cmd` and `NAME-SUB.1` for each visible subcommand; returns how many.
fn write_man_pages(
    dir: &std::path::Path,
    cmd: &clap::Command,
    name: &str,
) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    n += 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let full = format!("{name}-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(
            sub.clone()
                .display_name(full.clone())
                .bin_name(format!("{name} {}", sub.get_name())),
        )
        .render(&mut page)?;
        let path = dir.join(format!("{full}.1"));
        std::fs::write(&path, page).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        n += 1;
    }
    Ok(n)
}

/// Asks a running daemon to reload, and says what happened.
async fn tell_daemon_to_reload() -> bool {
    match control_request("POST", "/v1/reload").await {
        Ok((200, body)) => {
            println!(
                "the running daemon reloaded: {}",
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["reloaded"].as_str().map(str::to_string))
                    .unwrap_or_default()
            );
            true
        }
        Ok((_, body)) => {
            eprintln!(
                "warning: the running daemon did not reload: {}",
                error_text(&body)
            );
            false
        }
        Err(_) => {
            println!("no daemon is running; `fleet-broker serve` will use it");
            false
        }
    }
}

/// `fleet-broker import …`: the cluster, its host pinned (Vagrant) or the trust command to run
/// said (ssh_config), the config written in place, and a running daemon told.
async fn import(config: Option<PathBuf>, source: ImportSource) -> anyhow::Result<()> {
    use fleet_broker::import;
    let path = config.unwrap_or_else(default_config_path);
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
                )
                .map_err(anyhow::Error::msg)?,
            };
            let known_hosts = import::known_hosts_file(&path, &name);
            let cluster = import::from_vagrant(&hosts, &name, endpoint, &known_hosts)
                .map_err(anyhow::Error::msg)?;
            for w in import::public_knowledge_identities(&cluster) {
                eprintln!("warning: {w}");
            }
            let confirm = if trust_on_first_use {
                fleet_broker::trust::Confirm::TrustOnFirstUse
            } else {
                confirm_mode(false, fingerprint)?
            };
            // Pin first: a host not pinned leaves the config as it was.
            let preview = fleet_broker::config_edit::preview(&path, &cluster, replace)
                .map_err(anyhow::Error::msg)?;
            let c = find_cluster(&preview, &name)?;
            println!("{}", fleet_broker::trust::trust(c, &confirm).await?);
            fleet_broker::config_edit::add_cluster(&path, &cluster, replace)
                .map_err(anyhow::Error::msg)?;
            println!(
                "added cluster {name:?} ({} VM{}, tunnel {}) to {}",
                hosts.len(),
                if hosts.len() == 1 { "" } else { "s" },
                cluster.tunnel,
                path.display()
            );
            // The machines' keys, fetched through the tunnel of a running daemon.
            let added = find_cluster(&load_config(Some(path.clone()))?, &name)?.clone();
            let control = fleet_broker::control::client::default_control_socket();
            if !tell_daemon_to_reload().await {
                println!("pin the machines' keys with `fleet-broker trust {name} --machine ID` once the daemon runs");
                return Ok(());
            }
            match fleet_broker::trust::trust_machines(&added, &control, &confirm).await {
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
                None => import::cluster_name(&host).map_err(anyhow::Error::msg)?,
            };
            let out = import::ssh_g(&host, ssh_config.as_deref()).map_err(anyhow::Error::msg)?;
            let (mut cluster, notes) =
                import::from_ssh_g(&out, &name, endpoint).map_err(anyhow::Error::msg)?;
            import::resolve_jumps(&mut cluster, ssh_config.as_deref())
                .map_err(anyhow::Error::msg)?;
            fleet_broker::config_edit::add_cluster(&path, &cluster, replace)
                .map_err(anyhow::Error::msg)?;
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
    let _ = tell_daemon_to_reload().await;
    Ok(())
}

fn confirm_mode(
    yes: bool,
    fingerprint: Vec<String>,
) -> anyhow::Result<fleet_broker::trust::Confirm> {
    use fleet_broker::trust::Confirm;
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

#[cfg(test)]
mod help_tests {
    use super::*;

    /// Every visible positional argument of every (sub)command has a description, and global
    /// options sit under their own heading.
    fn check(cmd: &clap::Command, path: &str) {
        for a in cmd.get_positionals().filter(|a| !a.is_hide_set()) {
            assert!(
                a.get_help().is_some(),
                "{path}: positional {} has no description",
                a.get_id()
            );
        }
        for a in cmd
            .get_arguments()
            .filter(|a| a.is_global_set() && !a.is_hide_set())
        {
            assert_eq!(
                a.get_help_heading(),
                Some("Global options"),
                "{path}: --{}",
                a.get_id()
            );
        }
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            check(sub, &format!("{path} {}", sub.get_name()));
        }
    }

    #[test]
    fn help_describes_every_positional_and_groups_global_options() {
        let mut broker = <Cli as clap::CommandFactory>::command();
        broker.build();
        check(&broker, "fleet-broker");
        let mut fleetctl = fleet_broker::cli::command();
        fleetctl.build();
        check(&fleetctl, "fleetctl");
    }
}
