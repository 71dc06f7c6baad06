//! Reads from several clusters at once: `--cluster a,b` or a pattern over the configured
//! names (`--cluster 'prod-*'`). Every cluster is asked concurrently; the listings print one
//! table with a `CLUSTER` column (where `--fields` puts `cluster`, first by default), `cat`
//! prints each cluster's file under a `==> NAME <==` header; clusters in the daemon's order.
//! A cluster that fails is said on stderr with its name while the others print, and the
//! exit status is 1. A command that changes anything refuses more than one cluster.

use super::args::{Cmd, GlobalFlags};
use super::lists::{self, Listing};
use crate::fleet_client::FleetClient;

/// Whether `--cluster` names several clusters (a name never holds `,`, `*` or `?`).
pub(crate) fn is_fan_out(spec: &str) -> bool {
    spec.contains([',', '*', '?'])
}

/// The configured clusters `spec` names, in the daemon's order, each with its client.
async fn clusters(spec: &str, g: &GlobalFlags) -> Result<Vec<(String, FleetClient)>, String> {
    let control = crate::control::client::default_control_socket();
    let list = crate::control::client::list_clusters(&control)
        .await
        .map_err(|e| e.to_string())?;
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
        return Err(format!(
            "no configured cluster matches {spec:?} (`fleet-broker status` lists them)"
        ));
    }
    Ok(chosen)
}

/// Runs `command` on every cluster `spec` names; the exit status.
pub(crate) async fn run(spec: &str, command: &Cmd, g: &GlobalFlags) -> i32 {
    let (listing, fields, full, no_legend) = match command {
        Cmd::ListUnits(f) => (Listing::Units, &f.fields, f.full || f.l, f.no_legend),
        Cmd::ListUnitFiles(f) => (Listing::UnitFiles, &f.fields, f.full, f.no_legend),
        Cmd::ListMachines(f) => (Listing::Machines, &f.fields, f.full || f.l, f.no_legend),
        Cmd::Cat { units } => return cat(spec, &units.units, g).await,
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
