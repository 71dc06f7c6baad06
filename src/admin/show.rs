//! Operator commands that read and print, without the daemon: `check-config`, `env`,
//! `audit`, `completions`, `man`.

use std::path::Path;

use super::{find_cluster, load_config};

/// `fleet-broker check-config`: the config checked whole, warnings for files a cluster names
/// that are not there yet, and each cluster's effective settings as TOML.
pub(super) fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path)?;
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
            && c.host_key_checking != crate::config::HostKeyPolicy::Off
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

/// `fleet-broker env [CLUSTER]`: the shell commands that point fleetctl at a configured
/// cluster's socket, every value quoted for the shell; with no cluster, the commands that
/// undo them.
pub(super) fn env(config: &Path, cluster: Option<String>, fish: bool) -> anyhow::Result<()> {
    let Some(cluster) = cluster else {
        if fish {
            println!("set -e FLEETCTL_ENDPOINT; set -e FLEETCTL_CLUSTER;");
        } else {
            println!("unset FLEETCTL_ENDPOINT FLEETCTL_CLUSTER");
        }
        return Ok(());
    };
    let config = load_config(config)?;
    find_cluster(&config, &cluster)?;
    let socket = crate::local::cluster_socket(&crate::local::default_runtime_dir(), &cluster);
    let endpoint = format!("unix://{}", socket.display());
    if fish {
        println!("set -gx FLEETCTL_ENDPOINT {};", fish_quote(&endpoint));
        println!("set -gx FLEETCTL_CLUSTER {};", fish_quote(&cluster));
    } else {
        use crate::remote_command::shell_quote;
        println!(
            "export FLEETCTL_ENDPOINT={} FLEETCTL_CLUSTER={}",
            shell_quote(&endpoint),
            shell_quote(&cluster)
        );
    }
    Ok(())
}

/// A word quoted for fish: inside single quotes only `\\` and `\'` are escapes.
fn fish_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `fleet-broker audit`: the trail the config's `audit_log` names, as readable lines.
pub(super) fn audit(
    config: &Path,
    cluster: Option<&str>,
    since: Option<humantime::Duration>,
) -> anyhow::Result<()> {
    let config = load_config(config)?;
    let state_dir = crate::daemon::DaemonOptions::from_env().state_dir;
    let Some(path) = crate::audit::log_path(&config.audit_log, &state_dir) else {
        anyhow::bail!(
            "the audit log is off (audit_log = \"off\" in {})",
            config.path.display()
        )
    };
    let cutoff = since.map(|d| std::time::SystemTime::now() - *d);
    for line in crate::audit::read_trail(&path, cluster, cutoff) {
        println!("{line}");
    }
    Ok(())
}

/// `fleet-broker completions SHELL [--fleetctl]`: clap's script, and for bash, zsh and fish
/// the configured cluster names (asked of `fleet-broker complete-clusters` as you type) for
/// `--cluster` and for the commands that take a cluster.
pub(super) fn completions(shell: clap_complete::Shell, fleetctl: bool) {
    let (mut cmd, name) = if fleetctl {
        (crate::cli::command(), "fleetctl")
    } else {
        (super::command(), "fleet-broker")
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    let script = String::from_utf8_lossy(&script);
    print!("{}", with_cluster_names(shell, &script, fleetctl));
}

/// The subcommands of fleet-broker whose positional arguments are cluster names.
const TAKES_CLUSTER: &str = "connect disconnect trust env remove doctor diff";

/// `script` (clap's, for `shell`) completing cluster names where a cluster is asked for.
fn with_cluster_names(shell: clap_complete::Shell, script: &str, fleetctl: bool) -> String {
    use clap_complete::Shell;
    let names = "fleet-broker complete-clusters 2>/dev/null";
    match shell {
        Shell::Bash => {
            let (func, program) = if fleetctl {
                ("_fleetctl", "fleetctl")
            } else {
                ("_fleet__broker", "fleet-broker")
            };
            let positional = if fleetctl { "" } else { TAKES_CLUSTER };
            format!(
                r#"{script}
# Cluster names, from fleet-broker's config, where a cluster is asked for.
{func}__clusters() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" sub="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            --config|--cluster) ((i++)) ;;
            -*) ;;
            *) sub="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    if [[ "$prev" == "--cluster" ]] || {{ [[ -n "$sub" && " {positional} " == *" $sub "* && "$cur" != -* && "$prev" != -* ]]; }}; then
        COMPREPLY=($(compgen -W "$({names})" -- "$cur"))
        return 0
    fi
    {func} "$@"
}}
complete -F {func}__clusters -o bashdefault -o default {program}
"#
            )
        }
        Shell::Zsh => {
            let mut out = String::new();
            for line in script.lines() {
                let asks_cluster = line.starts_with("'--cluster=[")
                    || line.starts_with("':cluster -- ")
                    || line.starts_with("'::cluster -- ")
                    || line.starts_with("':a -- The first cluster")
                    || line.starts_with("':b -- The second cluster");
                if asks_cluster {
                    out.push_str(&line.replacen(":_default'", ":_fleet_broker_clusters'", 1));
                } else {
                    out.push_str(line);
                }
                out.push('\n');
            }
            let function = format!(
                "# Cluster names, from fleet-broker's config.\n(( $+functions[_fleet_broker_clusters] )) ||\n_fleet_broker_clusters() {{\n    compadd -- ${{(f)\"$({names})\"}}\n}}\n\n"
            );
            match out.rfind("if [ \"$funcstack[1]\"") {
                Some(at) => {
                    out.insert_str(at, &function);
                    out
                }
                None => out + &function,
            }
        }
        Shell::Fish => {
            let program = if fleetctl { "fleetctl" } else { "fleet-broker" };
            let mut out = format!(
                "{script}# Cluster names, from fleet-broker's config.\ncomplete -c {program} -l cluster -x -a '({names})'\n"
            );
            if !fleetctl {
                out.push_str(&format!(
                    "complete -c fleet-broker -n '__fish_seen_subcommand_from {TAKES_CLUSTER}' -f -a '({names})'\n"
                ));
            }
            out
        }
        _ => script.to_string(),
    }
}

/// `fleet-broker complete-clusters`: the configured cluster names, one a line, for shell
/// completion; nothing when the config cannot be read.
pub(super) fn cluster_names(config: &Path) {
    if let Ok(config) = crate::config::Config::load(config) {
        for name in config.clusters.keys() {
            println!("{name}");
        }
    }
}

/// `fleet-broker man DIR`: the pages of both programs and their subcommands.
pub(super) fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let mut written = 0;
    for (cmd, name) in [
        (super::command(), "fleet-broker"),
        (crate::cli::command(), "fleetctl"),
    ] {
        let cmd = cmd.name(name);
        written += write_man_pages(dir, &cmd, name)?;
    }
    println!("wrote {written} man pages to {}", dir.display());
    Ok(())
}

/// Writes `NAME.1` for `cmd` and `NAME-SUB.1` for each visible subcommand; returns how many.
fn write_man_pages(dir: &Path, cmd: &clap::Command, name: &str) -> anyhow::Result<usize> {
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

#[cfg(test)]
mod tests {
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
        let mut broker = super::super::command();
        broker.build();
        check(&broker, "fleet-broker");
        let mut fleetctl = crate::cli::command();
        fleetctl.build();
        check(&fleetctl, "fleetctl");
    }

    #[test]
    fn fish_quoting_escapes_only_backslash_and_quote() {
        assert_eq!(super::fish_quote(r"a'b\c$d"), r"'a\'b\\c$d'");
    }
}
