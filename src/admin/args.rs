//! `fleet-broker`'s arguments: the daemon's and the operator commands' (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fleet-broker",
    version,
    about = "SSH tunnel and access broker for CoreOS fleet clusters"
)]
pub(crate) struct Cli {
    /// Config file (default: $FLEET_BROKER_CONFIG or $XDG_CONFIG_HOME/fleet-broker/config.toml)
    #[arg(long, global = true, help_heading = "Global options")]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum PassphraseCmd {
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
pub(crate) enum ImportSource {
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
pub(crate) enum Cmd {
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
    /// Compare the units of two clusters: only in one, different unit files, different desired states (exit 0 same, 1 different, 2 trouble)
    Diff {
        /// The first cluster (e.g. staging)
        a: String,
        /// The second cluster (e.g. prod)
        b: String,
        /// Show the unified diff of unit files that differ
        #[arg(long)]
        content: bool,
    },
    /// The configured cluster names, one a line (for shell completion)
    #[command(hide = true)]
    CompleteClusters,
    /// Print this shell's cluster (FLEETCTL_CLUSTER or FLEETCTL_ENDPOINT) and its state, for a shell prompt; nothing when none is chosen
    Prompt {
        /// What to print: {cluster}, {state} and {guard} ("!" for a guarded cluster) are filled in (default "{cluster}{guard}:{state}")
        #[arg(long, value_name = "FMT")]
        format: Option<String>,
    },
    /// Run a built-in demo cluster through the real daemon
    #[cfg(feature = "demo")]
    Demo {
        /// Check once and exit 0/1 instead of serving until Ctrl-C
        #[arg(long)]
        once: bool,
    },
}
