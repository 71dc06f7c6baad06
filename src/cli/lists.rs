//! list-units, list-unit-files and list-machines: fields, legends and tab-padded tables
//! exactly as reference B.5 gives them.

use std::collections::BTreeMap;

use super::args::{ListFlags, ListUnitFilesFlags};
use super::table::{machine_legend, render};
use crate::fleet::schema::{Machine, Unit, UnitState};
use crate::fleet::unit_file::{description, hash, is_global};
use crate::fleet_client::FleetClient;

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// Validates `--fields` against the allowed keys.
fn parse_fields(fields: &str, allowed: &[&str]) -> Result<Vec<String>, String> {
    if fields.is_empty() {
        return Err("Must define output format".into());
    }
    let keys: Vec<String> = fields.split(',').map(str::to_string).collect();
    for k in &keys {
        if !allowed.contains(&k.as_str()) {
            return Err(format!("Invalid key in output format: {k:?}"));
        }
    }
    Ok(keys)
}

/// [`parse_fields`], printing the error.
fn fields_or_report(fields: &str, allowed: &[&str]) -> Result<Vec<String>, ()> {
    parse_fields(fields, allowed).map_err(|e| eprintln!("{e}"))
}

/// The table of `rows` under a legend of `keys`; control characters in cells (cluster data:
/// unit names, states, metadata) are shown escaped, so no row can hide or rewrite another.
fn table(keys: &[String], rows: Vec<Vec<String>>, no_legend: bool) -> String {
    let mut all = Vec::with_capacity(rows.len() + 1);
    if !no_legend {
        all.push(keys.iter().map(|k| k.to_uppercase()).collect());
    }
    all.extend(rows.into_iter().map(|row| {
        row.into_iter()
            .map(|cell| crate::escape::display(&cell).into_owned())
            .collect()
    }));
    render(&all)
}

fn print(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

/// One cluster's rows, or the lines (fleetctl's words) that say why there are none.
pub(crate) type Rows = Result<Vec<Vec<String>>, Vec<String>>;

/// The listing commands, for [`rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listing {
    Units,
    UnitFiles,
    Machines,
}

impl Listing {
    /// The default `--fields` and the keys `--fields` may name.
    pub(crate) fn fields(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Listing::Units => (
                "unit,machine,active,sub",
                &["active", "hash", "load", "machine", "sub", "unit"],
            ),
            Listing::UnitFiles => (
                "unit,hash,dstate,state,target",
                &[
                    "desc", "dstate", "global", "hash", "state", "target", "tmachine", "unit",
                ],
            ),
            Listing::Machines => ("machine,ip,metadata", &["machine", "ip", "metadata"]),
        }
    }
}

/// `--fields` checked against the listing's keys (and `extra` ones), printing fleetctl's
/// error.
pub(crate) fn fields_of(
    listing: Listing,
    given: Option<&str>,
    extra: &[&str],
) -> Result<Vec<String>, ()> {
    let (default, allowed) = listing.fields();
    let mut all: Vec<&str> = allowed.to_vec();
    all.extend_from_slice(extra);
    fields_or_report(given.unwrap_or(default), &all)
}

/// One cluster's rows of a listing, `keys` its columns.
pub(crate) async fn rows(api: &FleetClient, listing: Listing, keys: &[String], full: bool) -> Rows {
    match listing {
        Listing::Units => unit_rows(api, keys, full).await,
        Listing::UnitFiles => unit_file_rows(api, keys, full).await,
        Listing::Machines => machine_rows(api, keys, full).await,
    }
}

/// The table, or the error lines; the exit status.
fn finish(keys: &[String], rows: Rows, no_legend: bool) -> i32 {
    match rows {
        Ok(rows) => {
            print(&table(keys, rows, no_legend));
            0
        }
        Err(lines) => {
            for l in lines {
                eprintln!("{l}");
            }
            1
        }
    }
}

/// Rows of several clusters in one table, `keys` naming `cluster` where its column goes;
/// clusters that failed are said on stderr, each line with its cluster's name.
pub(crate) fn print_clusters(
    keys: &[String],
    per_cluster: Vec<(String, Rows)>,
    no_legend: bool,
) -> i32 {
    let mut all = Vec::new();
    let mut failed = false;
    for (cluster, rows) in per_cluster {
        match rows {
            Ok(rows) => all.extend(rows.into_iter().map(|row| {
                let mut cells = row.into_iter();
                keys.iter()
                    .map(|k| {
                        if k == "cluster" {
                            cluster.clone()
                        } else {
                            cells.next().unwrap_or_else(|| "-".into())
                        }
                    })
                    .collect()
            })),
            Err(lines) => {
                failed = true;
                for l in lines {
                    eprintln!("cluster {cluster}: {l}");
                }
            }
        }
    }
    print(&table(keys, all, no_legend));
    i32::from(failed)
}

pub(crate) async fn list_units(api: &FleetClient, f: &ListFlags) -> i32 {
    let Ok(keys) = fields_of(Listing::Units, f.fields.as_deref(), &[]) else {
        return 1;
    };
    finish(
        &keys,
        unit_rows(api, &keys, f.full || f.l).await,
        f.no_legend,
    )
}

async fn unit_rows(api: &FleetClient, keys: &[String], full: bool) -> Rows {
    // Both asked at once; reported in the original's order (the states first).
    let (states, machines) = tokio::join!(api.unit_states(None, None), api.machines());
    let states = states.map_err(|e| {
        vec![format!(
            "Error retrieving list of units from repository: {e}"
        )]
    })?;
    let machines =
        machines.map_err(|e| vec![format!("Error retrieving list of active machines: {e}")])?;
    let by_id: BTreeMap<&str, &Machine> = machines.iter().map(|m| (m.id.as_str(), m)).collect();
    let cell = |s: &UnitState, k: &str| -> String {
        match k {
            "unit" => dash(&s.name),
            "machine" => machine_legend(
                &s.machine_id,
                by_id.get(s.machine_id.as_str()).copied(),
                full,
            ),
            "active" => dash(&s.active_state),
            "sub" => dash(&s.sub_state),
            "load" => dash(&s.load_state),
            "hash" => match s.hash.get(..7) {
                Some(short) if !full => short.to_string(),
                _ => dash(&s.hash),
            },
            _ => "-".into(),
        }
    };
    Ok(states
        .iter()
        .map(|s| keys.iter().map(|k| cell(s, k)).collect())
        .collect())
}

pub(crate) async fn list_unit_files(api: &FleetClient, f: &ListUnitFilesFlags) -> i32 {
    let Ok(keys) = fields_of(Listing::UnitFiles, f.fields.as_deref(), &[]) else {
        return 1;
    };
    warn_tmachine(&keys);
    finish(&keys, unit_file_rows(api, &keys, f.full).await, f.no_legend)
}

/// fleetctl's warning for the old name of `target`.
pub(crate) fn warn_tmachine(keys: &[String]) {
    if keys.iter().any(|k| k == "tmachine") {
        eprintln!("WARNING: The \"tmachine\" field is deprecated. Use \"target\" instead");
    }
}

async fn unit_file_rows(api: &FleetClient, keys: &[String], full: bool) -> Rows {
    // Both asked at once; reported in the original's order (the units first).
    let (units, machines) = tokio::join!(api.units(), api.machines());
    let units = units.map_err(|e| {
        vec![format!(
            "Error retrieving list of units from repository: {e}"
        )]
    })?;
    let machines =
        machines.map_err(|e| vec![format!("Error retrieving list of active machines: {e}")])?;
    let by_id: BTreeMap<&str, &Machine> = machines.iter().map(|m| (m.id.as_str(), m)).collect();
    let cell = |u: &Unit, k: &str| -> String {
        let global = is_global(&u.options);
        match k {
            "unit" => dash(&u.name),
            "hash" => {
                let h = hash(&u.options);
                match h.get(..7) {
                    Some(short) if !full => short.to_string(),
                    _ => h,
                }
            }
            "dstate" => dash(&u.desired_state),
            "state" => {
                if global {
                    "-".into()
                } else {
                    dash(&u.current_state)
                }
            }
            "target" | "tmachine" => {
                if global {
                    "global".into()
                } else if u.machine_id.is_empty() {
                    "-".into()
                } else {
                    machine_legend(
                        &u.machine_id,
                        by_id.get(u.machine_id.as_str()).copied(),
                        full,
                    )
                }
            }
            "global" => global.to_string(),
            "desc" => dash(description(&u.options).unwrap_or("")),
            _ => "-".into(),
        }
    };
    Ok(units
        .iter()
        .map(|u| keys.iter().map(|k| cell(u, k)).collect())
        .collect())
}

pub(crate) async fn list_machines(api: &FleetClient, f: &ListFlags) -> i32 {
    let Ok(keys) = fields_of(Listing::Machines, f.fields.as_deref(), &[]) else {
        return 1;
    };
    finish(
        &keys,
        machine_rows(api, &keys, f.full || f.l).await,
        f.no_legend,
    )
}

async fn machine_rows(api: &FleetClient, keys: &[String], full: bool) -> Rows {
    let machines = api.machines().await.map_err(|e| {
        let mut lines = vec![format!(
            "Error retrieving list of active machines from fleet API ({e})"
        )];
        // fleetctl's hint is about fleetd's etcd; a tunnel fault has its own words.
        if !matches!(e, crate::fleet_client::ApiError::Broker { .. }) {
            lines.push("Possible issues:".into());
            lines.push("  etcd is unhealthy and/or lost quorum".into());
            lines.push("  connection cannot be established to any etcd servers".into());
        }
        lines
    })?;
    let cell = |m: &Machine, k: &str| -> String {
        match k {
            "machine" => machine_legend(&m.id, None, full),
            "ip" => dash(&m.primary_ip),
            "metadata" => {
                let pairs: Vec<String> =
                    m.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                dash(&pairs.join(","))
            }
            _ => "-".into(),
        }
    };
    Ok(machines
        .iter()
        .map(|m| keys.iter().map(|k| cell(m, k)).collect())
        .collect())
}
