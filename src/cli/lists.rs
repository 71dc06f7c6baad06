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

/// Every machine (for legends), printing fleetctl's error.
fn report_machines(
    machines: Result<Vec<Machine>, crate::fleet_client::ApiError>,
) -> Result<Vec<Machine>, ()> {
    machines.map_err(|e| eprintln!("Error retrieving list of active machines: {e}"))
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

pub(crate) async fn list_units(api: &FleetClient, f: &ListFlags) -> i32 {
    let full = f.full || f.l;
    let Ok(keys) = fields_or_report(
        f.fields.as_deref().unwrap_or("unit,machine,active,sub"),
        &["active", "hash", "load", "machine", "sub", "unit"],
    ) else {
        return 1;
    };
    // Both asked at once; reported in the original's order (the states first).
    let (states, machines) = tokio::join!(api.unit_states(None, None), api.machines());
    let states = match states {
        Ok(s) => s,
        Err(e) => {
            eprintln!("Error retrieving list of units from repository: {e}");
            return 1;
        }
    };
    let Ok(machines) = report_machines(machines) else {
        return 1;
    };
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
    let rows = states
        .iter()
        .map(|s| keys.iter().map(|k| cell(s, k)).collect())
        .collect();
    print(&table(&keys, rows, f.no_legend));
    0
}

pub(crate) async fn list_unit_files(api: &FleetClient, f: &ListUnitFilesFlags) -> i32 {
    let Ok(keys) = fields_or_report(
        f.fields
            .as_deref()
            .unwrap_or("unit,hash,dstate,state,target"),
        &[
            "desc", "dstate", "global", "hash", "state", "target", "tmachine", "unit",
        ],
    ) else {
        return 1;
    };
    if keys.iter().any(|k| k == "tmachine") {
        eprintln!("WARNING: The \"tmachine\" field is deprecated. Use \"target\" instead");
    }
    // Both asked at once; reported in the original's order (the units first).
    let (units, machines) = tokio::join!(api.units(), api.machines());
    let units = match units {
        Ok(u) => u,
        Err(e) => {
            eprintln!("Error retrieving list of units from repository: {e}");
            return 1;
        }
    };
    let Ok(machines) = report_machines(machines) else {
        return 1;
    };
    let by_id: BTreeMap<&str, &Machine> = machines.iter().map(|m| (m.id.as_str(), m)).collect();
    let cell = |u: &Unit, k: &str| -> String {
        let global = is_global(&u.options);
        match k {
            "unit" => dash(&u.name),
            "hash" => {
                let h = hash(&u.options);
                match h.get(..7) {
                    Some(short) if !f.full => short.to_string(),
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
                        f.full,
                    )
                }
            }
            "global" => global.to_string(),
            "desc" => dash(description(&u.options).unwrap_or("")),
            _ => "-".into(),
        }
    };
    let rows = units
        .iter()
        .map(|u| keys.iter().map(|k| cell(u, k)).collect())
        .collect();
    print(&table(&keys, rows, f.no_legend));
    0
}

pub(crate) async fn list_machines(api: &FleetClient, f: &ListFlags) -> i32 {
    let full = f.full || f.l;
    let Ok(keys) = fields_or_report(
        f.fields.as_deref().unwrap_or("machine,ip,metadata"),
        &["machine", "ip", "metadata"],
    ) else {
        return 1;
    };
    let machines = match api.machines().await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("Error retrieving list of active machines from fleet API ({e})");
            // fleetctl's hint is about fleetd's etcd; a tunnel fault has its own words.
            if !matches!(e, crate::fleet_client::ApiError::Broker { .. }) {
                eprintln!("Possible issues:");
                eprintln!("  etcd is unhealthy and/or lost quorum");
                eprintln!("  connection cannot be established to any etcd servers");
            }
            return 1;
        }
    };
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
    let rows = machines
        .iter()
        .map(|m| keys.iter().map(|k| cell(m, k)).collect())
        .collect();
    print(&table(&keys, rows, f.no_legend));
    0
}
