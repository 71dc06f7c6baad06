//! Reads from several clusters at once: `--cluster a,b` or a pattern over the configured
//! names (`--cluster 'prod-*'`). Every cluster is asked concurrently; the listings print one
//! table with a `CLUSTER` column (where `--fields` puts `cluster`, first by default), `cat`
//! prints each cluster's file under a `==> NAME <==` header, and so do `status` and
//! `journal --lines N` (each cluster's run is this fleetctl again, on that one cluster, its
//! output kept until the header is printed); clusters in the config's order.
//! A cluster that fails is said on stderr with its name while the others print, and the
//! exit status is 1. A command that changes anything refuses more than one cluster.

use super::args::{Cmd, GlobalFlags};
use super::lists::{self, Listing};
use crate::fleet_client::FleetClient;

/// Whether `--cluster` names several clusters (a name never holds `,`, `*` or `?`).
pub(crate) fn is_fan_out(spec: &str) -> bool {
    spec.contains([',', '*', '?'])
}

/// Why the clusters to ask are not known.
#[derive(Debug, thiserror::Error)]
enum ChoiceError {
    #[error(transparent)]
    Control(#[from] crate::control::client::ControlError),
    #[error(transparent)]
    Flag(#[from] super::args::FlagError),
    #[error("no configured cluster matches {0:?} (`fleet-broker status` lists them)")]
    NoMatch(String),
}

/// The configured clusters `spec` names, in the config's order, each with its client.
async fn clusters(spec: &str, g: &GlobalFlags) -> Result<Vec<(String, FleetClient)>, ChoiceError> {
    let control = crate::control::client::default_control_socket();
    let list = crate::control::client::list_clusters(&control).await?;
    let wanted: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut chosen = Vec::new();
    for c in list.clusters {
        if !wanted
            .iter()
            .any(|w| crate::pattern::wildcard_match(w, &c.name))
        {
            continue;
        }
        let name = c.name.clone();
        let target = super::target::target(c, control.clone());
        let timeout = super::request_timeout(g, &target)?;
        chosen.push((name, FleetClient::new(&target.socket, timeout)));
    }
    if chosen.is_empty() {
        return Err(ChoiceError::NoMatch(spec.to_string()));
    }
    Ok(chosen)
}

/// Runs `command` on every cluster `spec` names; the exit status.
pub(crate) async fn run(
    spec: &str,
    command: &Cmd,
    g: &GlobalFlags,
    argv: &[std::ffi::OsString],
) -> i32 {
    let (listing, fields, full, no_legend) = match command {
        Cmd::ListUnits(f) => (Listing::Units, &f.fields, f.full || f.l, f.no_legend),
        Cmd::ListUnitFiles(f) => (Listing::UnitFiles, &f.fields, f.full, f.no_legend),
        Cmd::ListMachines(f) => (Listing::Machines, &f.fields, f.full || f.l, f.no_legend),
        Cmd::Cat { units } => return cat(spec, &units.units, g).await,
        Cmd::Status { .. } | Cmd::Journal { follow: false, .. } => {
            return each_on_its_own(spec, g, argv).await
        }
        _ => {
            eprintln!(
                "Error: --cluster {spec:?} names several clusters; only list-units, list-unit-files, list-machines and cat read from several at once, and a change goes to one cluster at a time"
            );
            return 1;
        }
    };
    let default = format!("cluster,{}", listing.fields().0);
    let Ok(keys) = lists::fields_of(
        listing,
        Some(fields.as_deref().unwrap_or(&default)),
        &["cluster"],
    ) else {
        return 1;
    };
    if listing == Listing::UnitFiles {
        lists::warn_tmachine(&keys);
    }
    let clusters = match clusters(spec, g).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Unable to initialize client: {e}");
            return 1;
        }
    };
    let per_cluster_keys: Vec<String> = keys.iter().filter(|k| *k != "cluster").cloned().collect();
    let asked = clusters.iter().map(|(name, api)| {
        let keys = &per_cluster_keys;
        async move { (name.clone(), lists::rows(api, listing, keys, full).await) }
    });
    let answers = futures::future::join_all(asked).await;
    lists::print_clusters(&keys, answers, no_legend)
}

/// The command line without its choice of cluster (`--cluster`, and an `--endpoint` or
/// `--tunnel` it won over), for a run on one cluster named by `FLEETCTL_CLUSTER`.
fn without_cluster(argv: &[std::ffi::OsString]) -> Vec<std::ffi::OsString> {
    const CHOICES: [&str; 3] = ["--cluster", "--endpoint", "--tunnel"];
    let mut out = Vec::new();
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            out.push(a.clone());
            out.extend(it.cloned());
            break;
        }
        if CHOICES.contains(&s.as_ref()) {
            it.next();
        } else if !CHOICES.iter().any(|c| s.starts_with(&format!("{c}="))) {
            out.push(a.clone());
        }
    }
    out
}

/// `status` and `journal --lines N` on every cluster at once, each a run of this fleetctl on
/// that cluster; their output under each cluster's header, their errors with its name.
async fn each_on_its_own(spec: &str, g: &GlobalFlags, argv: &[std::ffi::OsString]) -> i32 {
    let clusters = match clusters(spec, g).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Unable to initialize client: {e}");
            return 1;
        }
    };
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("Error: cannot find this fleetctl to run it on each cluster: {e}");
            return 1;
        }
    };
    let args = without_cluster(argv);
    let runs = clusters.iter().map(|(cluster, _)| {
        let mut cmd = tokio::process::Command::new(&me);
        cmd.args(&args)
            .env("FLEETCTL_CLUSTER", cluster)
            .env_remove("FLEETCTL_ENDPOINT")
            .env_remove("FLEETCTL_TUNNEL")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        async move { (cluster.clone(), cmd.output().await) }
    });
    let mut failed = false;
    let mut first = true;
    for (cluster, out) in futures::future::join_all(runs).await {
        match out {
            Ok(out) => {
                use std::io::Write;
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{}==> {cluster} <==", if first { "" } else { "\n" });
                let _ = stdout.write_all(&out.stdout);
                let _ = stdout.flush();
                first = false;
                for line in String::from_utf8_lossy(&out.stderr).lines() {
                    eprintln!("cluster {cluster}: {line}");
                }
                failed |= !out.status.success();
            }
            Err(e) => {
                failed = true;
                eprintln!("cluster {cluster}: cannot run fleetctl: {e}");
            }
        }
    }
    i32::from(failed)
}

/// `cat UNIT` on every cluster: each file under its cluster's header.
async fn cat(spec: &str, args: &[String], g: &GlobalFlags) -> i32 {
    if args.len() != 1 {
        eprintln!("One unit file must be provided");
        return 1;
    }
    let clusters = match clusters(spec, g).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Unable to initialize client: {e}");
            return 1;
        }
    };
    let name = crate::fleet::names::unit_name_mangle(&args[0]);
    let asked = clusters.iter().map(|(cluster, api)| {
        let name = &name;
        async move { (cluster.clone(), api.unit(name).await) }
    });
    let mut failed = false;
    let mut first = true;
    for (cluster, answer) in futures::future::join_all(asked).await {
        match answer {
            Ok(Some(u)) => {
                let text = crate::fleet::unit_file::serialize(&u.options);
                super::units::print_unit_file(
                    &text,
                    &format!("{}==> {cluster} <==\n", if first { "" } else { "\n" }),
                );
                first = false;
            }
            Ok(None) => {
                failed = true;
                eprintln!("cluster {cluster}: Unit {name} not found");
            }
            Err(e) => {
                failed = true;
                eprintln!("cluster {cluster}: Error retrieving Unit {name}: {e}");
            }
        }
    }
    i32::from(failed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_run_on_one_cluster_drops_only_the_choice_of_cluster() {
        let argv: Vec<std::ffi::OsString> = [
            "fleetctl",
            "--cluster",
            "c*",
            "--endpoint=unix:///x",
            "status",
            "--tunnel",
            "h",
            "web",
            "--",
            "--cluster",
            "x",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let kept: Vec<String> = super::without_cluster(&argv)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(kept, ["status", "web", "--", "--cluster", "x"]);
    }
}
