//! fleetctl's command line (reference B.1, B.2, B.7): global flags with `FLEETCTL_*`
//! environment forms, cobra-style unique-prefix subcommands, and the per-command flags.

use clap::{ArgAction, Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "fleetctl",
    about = "fleetctl is a command-line interface to fleet, the cluster-wide CoreOS init system.",
    disable_version_flag = true,
    infer_subcommands = true,
    disable_help_subcommand = true
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub global: GlobalFlags,
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Global options")]
pub(crate) struct GlobalFlags {
    /// Broker cluster to talk to (see `fleet-broker status`)
    #[arg(long, global = true, env = "FLEETCTL_CLUSTER", value_name = "NAME")]
    pub cluster: Option<String>,
    /// fleet API location: unix:///path/to/socket (a broker cluster socket or fleet.sock)
    #[arg(long, global = true, env = "FLEETCTL_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Tunnel host of a configured broker cluster (host[:port]); selects that cluster
    #[arg(long, global = true, env = "FLEETCTL_TUNNEL")]
    pub tunnel: Option<String>,
    /// Username for SSH sessions to machines
    #[arg(long = "ssh-username", global = true, env = "FLEETCTL_SSH_USERNAME")]
    pub ssh_username: Option<String>,
    /// File used to store remote machine fingerprints (sessions use the broker's pins)
    #[arg(
        long = "known-hosts-file",
        global = true,
        env = "FLEETCTL_KNOWN_HOSTS_FILE"
    )]
    pub known_hosts_file: Option<String>,
    /// Verify host keys presented by remote machines before initiating SSH connections
    #[arg(
        long = "strict-host-key-checking",
        global = true,
        env = "FLEETCTL_STRICT_HOST_KEY_CHECKING"
    )]
    pub strict_host_key_checking: Option<String>,
    /// Seconds to wait when establishing an SSH connection
    #[arg(
        long = "ssh-timeout",
        global = true,
        env = "FLEETCTL_SSH_TIMEOUT",
        value_name = "SSH_TIMEOUT"
    )]
    ssh_timeout_raw: Option<String>,
    /// Seconds to wait for each fleet API request
    #[arg(
        long = "request-timeout",
        global = true,
        env = "FLEETCTL_REQUEST_TIMEOUT",
        value_name = "REQUEST_TIMEOUT"
    )]
    request_timeout_raw: Option<String>,
    /// `--ssh-timeout`, parsed ([`GlobalFlags::parse_numbers`]).
    #[arg(skip)]
    pub ssh_timeout: Option<f64>,
    /// `--request-timeout`, parsed ([`GlobalFlags::parse_numbers`]).
    #[arg(skip)]
    pub request_timeout: Option<f64>,
    /// Name of the cluster a change is meant for: what a guarded cluster asks for when there
    /// is no terminal to type it on
    #[arg(long = "confirm-cluster", global = true, value_name = "NAME")]
    pub confirm_cluster: Option<String>,
    /// Print out more debug information to stderr
    #[arg(long, global = true, action = ArgAction::SetTrue)]
    pub debug: bool,
    /// Print the version and exit
    #[arg(short = 'v', long = "version", action = ArgAction::SetTrue)]
    pub version: bool,
    /// Ignored: fleetctl's etcd driver (the broker speaks the API only)
    #[arg(long, global = true, env = "FLEETCTL_DRIVER", hide = true)]
    pub driver: Option<String>,
    #[arg(long = "ca-file", global = true, env = "FLEETCTL_CA_FILE", hide = true)]
    pub ca_file: Option<String>,
    #[arg(
        long = "cert-file",
        global = true,
        env = "FLEETCTL_CERT_FILE",
        hide = true
    )]
    pub cert_file: Option<String>,
    #[arg(
        long = "key-file",
        global = true,
        env = "FLEETCTL_KEY_FILE",
        hide = true
    )]
    pub key_file: Option<String>,
    #[arg(
        long = "etcd-key-prefix",
        global = true,
        env = "FLEETCTL_ETCD_KEY_PREFIX",
        hide = true
    )]
    pub etcd_key_prefix: Option<String>,
    #[arg(
        long = "experimental-api",
        global = true,
        env = "FLEETCTL_EXPERIMENTAL_API",
        hide = true
    )]
    pub experimental_api: Option<String>,
    #[arg(long = "etcd-keyfile", global = true, hide = true)]
    pub etcd_keyfile: Option<String>,
    #[arg(long = "etcd-certfile", global = true, hide = true)]
    pub etcd_certfile: Option<String>,
    #[arg(long = "etcd-cafile", global = true, hide = true)]
    pub etcd_cafile: Option<String>,
}

/// A numeric flag's value that cannot be used, worded as clap words a usage error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlagError {
    #[error("error: invalid value '{value}' for '--{flag} <{}>': {error}", flag.to_uppercase().replace('-', "_"))]
    NotANumber {
        flag: &'static str,
        value: String,
        error: std::num::ParseFloatError,
    },
    #[error("--{0} must be a positive number of seconds")]
    NotPositive(&'static str),
}

impl GlobalFlags {
    /// Parses the numeric flags. As in the original, a value from the environment that
    /// does not parse is ignored; one from the command line is a usage error.
    pub(crate) fn parse_numbers(&mut self, m: &clap::ArgMatches) -> Result<(), FlagError> {
        let seconds = |id: &str,
                       flag: &'static str,
                       raw: &Option<String>|
         -> Result<Option<f64>, FlagError> {
            let Some(s) = raw else { return Ok(None) };
            match s.trim().parse::<f64>() {
                Ok(v) => Ok(Some(v)),
                Err(_) if m.value_source(id) == Some(clap::parser::ValueSource::EnvVariable) => {
                    Ok(None)
                }
                Err(error) => Err(FlagError::NotANumber {
                    flag,
                    value: s.clone(),
                    error,
                }),
            }
        };
        self.ssh_timeout = seconds("ssh_timeout_raw", "ssh-timeout", &self.ssh_timeout_raw)?;
        self.request_timeout = seconds(
            "request_timeout_raw",
            "request-timeout",
            &self.request_timeout_raw,
        )?;
        Ok(())
    }

    /// The etcd-only flags that were set, for a warning.
    pub(crate) fn ignored(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (set, name) in [
            (self.driver.is_some(), "--driver"),
            (
                self.ca_file.is_some() || self.etcd_cafile.is_some(),
                "--ca-file",
            ),
            (
                self.cert_file.is_some() || self.etcd_certfile.is_some(),
                "--cert-file",
            ),
            (
                self.key_file.is_some() || self.etcd_keyfile.is_some(),
                "--key-file",
            ),
            (self.etcd_key_prefix.is_some(), "--etcd-key-prefix"),
            (self.experimental_api.is_some(), "--experimental-api"),
        ] {
            if set {
                out.push(name);
            }
        }
        out
    }
}

#[derive(Debug, Args, Clone)]
pub(crate) struct ListFlags {
    /// Columns to print, comma-separated
    #[arg(long)]
    pub fields: Option<String>,
    /// Do not ellipsize fields on output
    #[arg(long)]
    pub full: bool,
    /// Shorthand for --full
    #[arg(long = "l", short = 'l')]
    pub l: bool,
    /// Do not print a legend (column headers)
    #[arg(long = "no-legend")]
    pub no_legend: bool,
    /// Arguments the original ignores, and so do we.
    #[arg(hide = true)]
    pub ignored: Vec<String>,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct ListUnitFilesFlags {
    /// Columns to print, comma-separated
    #[arg(long)]
    pub fields: Option<String>,
    /// Do not ellipsize fields on output
    #[arg(long)]
    pub full: bool,
    /// Do not print a legend (column headers)
    #[arg(long = "no-legend")]
    pub no_legend: bool,
    /// Arguments the original ignores, and so do we.
    #[arg(hide = true)]
    pub ignored: Vec<String>,
}

#[derive(Debug, Args, Clone, Default)]
pub(crate) struct BlockFlags {
    /// Do not wait until the units have reached the desired state
    #[arg(long = "no-block")]
    pub no_block: bool,
    /// Wait until the units reach the desired state, trying N times (about 2 s each); 0 means no limit
    #[arg(long = "block-attempts", default_value_t = 0, value_name = "N")]
    pub block_attempts: u32,
}

impl BlockFlags {
    /// fleetctl's `getBlockAttempts`, typed.
    pub(crate) fn block(&self) -> super::units::Block {
        super::units::Block::from_flags(self.no_block, self.block_attempts)
    }
}

#[derive(Debug, Args, Clone)]
pub(crate) struct UnitArgs {
    /// Unit files or names
    pub units: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
    /// List the current state of units in the cluster
    #[command(name = "list-units")]
    ListUnits(ListFlags),
    /// List the units that exist in the cluster.
    #[command(name = "list-unit-files")]
    ListUnitFiles(ListUnitFilesFlags),
    /// Enumerate the current hosts in the cluster
    #[command(name = "list-machines")]
    ListMachines(ListFlags),
    /// Upload one or more units to the cluster without starting them
    Submit {
        /// Replace the already submitted units in the cluster with new versions
        #[arg(long)]
        replace: bool,
        /// DEPRECATED - this option cannot be used
        #[arg(long, hide = true)]
        sign: bool,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Schedule one or more units in the cluster, first submitting them if necessary.
    Load {
        #[command(flatten)]
        block: BlockFlags,
        /// Replace the old scheduled units in the cluster with new versions.
        #[arg(long)]
        replace: bool,
        #[arg(long, hide = true)]
        sign: bool,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Instruct systemd to start one or more units in the cluster, first submitting and loading if necessary.
    Start {
        #[command(flatten)]
        block: BlockFlags,
        /// Replace the already started units in the cluster with new versions.
        #[arg(long)]
        replace: bool,
        #[arg(long, hide = true)]
        sign: bool,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Instruct systemd to stop one or more units in the cluster.
    Stop {
        #[command(flatten)]
        block: BlockFlags,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Unschedule one or more units in the cluster.
    Unload {
        #[command(flatten)]
        block: BlockFlags,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Destroy one or more units in the cluster
    Destroy {
        #[command(flatten)]
        block: BlockFlags,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Output the contents of a submitted unit
    Cat {
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Output the status of one or more units in the cluster
    Status {
        /// SSH port of the target machines
        #[arg(long = "ssh-port", value_name = "N")]
        ssh_port: Option<u16>,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Print the journal of a unit in the cluster to stdout
    Journal {
        /// Number of recent log lines to return
        #[arg(long, default_value_t = 10)]
        lines: u32,
        /// Continuously print new entries as they are appended to the journal.
        #[arg(long = "follow", visible_alias = "f", short = 'f')]
        follow: bool,
        /// Output mode: short, short-iso, short-precise, short-monotonic, verbose, export, json, json-pretty, json-sse, cat
        #[arg(long, default_value = "short")]
        output: String,
        /// Execute journal command with sudo
        #[arg(long)]
        sudo: bool,
        /// SSH port of the target machine
        #[arg(long = "ssh-port", value_name = "N")]
        ssh_port: Option<u16>,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Open interactive shell on a machine in the cluster
    Ssh {
        /// Forward local ssh-agent to target machine.
        #[arg(long = "forward-agent", visible_alias = "A", short = 'A')]
        forward_agent: bool,
        /// Open SSH connection to machine identified by ID (or a unique prefix)
        #[arg(long, short = 'm', value_name = "ID")]
        machine: Option<String>,
        /// Open SSH connection to the machine hosting this unit
        #[arg(long, short = 'u', value_name = "NAME")]
        unit: Option<String>,
        /// SSH port of the target machine
        #[arg(long = "ssh-port", value_name = "N")]
        ssh_port: Option<u16>,
        /// [TARGET] [--] [COMMAND…]
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print the version and exit
    Version {
        /// Arguments the original ignores, and so do we.
        #[arg(hide = true)]
        ignored: Vec<String>,
    },
    /// Help about any command
    Help {
        /// The command to explain
        command: Vec<String>,
    },
    /// DEPRECATED - No longer works
    #[command(hide = true)]
    Verify {
        /// Ignored
        units: Vec<String>,
    },
}
