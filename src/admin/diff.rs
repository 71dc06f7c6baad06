//! `fleet-broker diff A B [--content]`: the units of two clusters side by side, the question
//! asked before promoting one cluster's units to another: units only in A, only in B, of the
//! same name with different unit files (fleet's unit hash; `--content` shows the unified
//! diff), and with different desired states. Exit status as diff(1): 0 when the clusters
//! hold the same units, 1 when they differ, 2 when they could not be compared.

use std::collections::BTreeMap;
use std::process::ExitCode;

use crate::fleet::schema::Unit;
use crate::fleet::unit_file::{hash, serialize};
use crate::fleet_client::FleetClient;

/// Extra time over a cluster's connect_timeout for its answer (the broker says why a down
/// tunnel is down within connect_timeout).
const SLACK: std::time::Duration = std::time::Duration::from_secs(2);

/// One difference between the clusters, by unit name.
#[derive(Debug, PartialEq, Eq)]
enum Difference {
    OnlyIn(usize),
    File { hashes: [String; 2] },
    DesiredState { states: [String; 2] },
}

/// The differences of two clusters' units, in unit name order; a unit whose file and desired
/// state both differ is listed under each.
fn compare(a: &[Unit], b: &[Unit]) -> Vec<(String, Difference)> {
    let index = |units: &[Unit]| -> BTreeMap<String, (String, String)> {
        units
            .iter()
            .map(|u| (u.name.clone(), (hash(&u.options), u.desired_state.clone())))
            .collect()
    };
    let (ia, ib) = (index(a), index(b));
    let mut names: Vec<&String> = ia.keys().chain(ib.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        match (ia.get(name), ib.get(name)) {
            (Some(_), None) => out.push((name.clone(), Difference::OnlyIn(0))),
            (None, Some(_)) => out.push((name.clone(), Difference::OnlyIn(1))),
            (Some((ha, sa)), Some((hb, sb))) => {
                if ha != hb {
                    out.push((
                        name.clone(),
                        Difference::File {
                            hashes: [ha.clone(), hb.clone()],
                        },
                    ));
                }
                if sa != sb {
                    out.push((
                        name.clone(),
                        Difference::DesiredState {
                            states: [sa.clone(), sb.clone()],
                        },
                    ));
                }
            }
            (None, None) => {}
        }
    }
    out
}

/// The report: one line per difference, and the unit files' unified diff after a `differs`
/// line when `content`. Unit names, states and files come from the clusters: escaped.
fn report(names: [&str; 2], units: [&[Unit]; 2], content: bool) -> (String, bool) {
    use std::fmt::Write;
    let differences = compare(units[0], units[1]);
    let file_of = |side: usize, name: &str| {
        units[side]
            .iter()
            .find(|u| u.name == name)
            .map(|u| serialize(&u.options))
            .unwrap_or_default()
    };
    let mut out = String::new();
    for (unit, d) in &differences {
        let unit = crate::escape::display(unit);
        match d {
            Difference::OnlyIn(side) => {
                let _ = writeln!(out, "only in {}: {unit}", names[*side]);
            }
            Difference::File { hashes } => {
                let short = |h: &str| h.get(..7).unwrap_or(h).to_string();
                let _ = writeln!(
                    out,
                    "unit file differs: {unit} ({} in {}, {} in {})",
                    short(&hashes[0]),
                    names[0],
                    short(&hashes[1]),
                    names[1]
                );
                if content {
                    let (fa, fb) = (file_of(0, &unit), file_of(1, &unit));
                    let diff = similar::TextDiff::from_lines(&fa, &fb)
                        .unified_diff()
                        .header(
                            &format!("{}/{unit}", names[0]),
                            &format!("{}/{unit}", names[1]),
                        )
                        .to_string();
                    out.push_str(&crate::escape::display_text(&diff));
                }
            }
            Difference::DesiredState { states } => {
                let state = |s: &str| {
                    if s.is_empty() {
                        "-".to_string()
                    } else {
                        s.to_string()
                    }
                };
                let _ = writeln!(
                    out,
                    "desired state differs: {unit} ({} in {}, {} in {})",
                    crate::escape::display(&state(&states[0])),
                    names[0],
                    crate::escape::display(&state(&states[1])),
                    names[1]
                );
            }
        }
    }
    (out, !differences.is_empty())
}

/// Every unit of the configured cluster `name`, through its cluster socket.
async fn units_of(name: &str, list: &crate::protocol::ClusterList) -> anyhow::Result<Vec<Unit>> {
    let Some(c) = list.clusters.iter().find(|c| c.name == name) else {
        let names: Vec<&str> = list.clusters.iter().map(|c| c.name.as_str()).collect();
        anyhow::bail!(
            "no cluster named {name:?} in fleet-broker; configured: {}",
            names.join(", ")
        );
    };
    let timeout = std::time::Duration::from_secs_f64(c.connect_timeout_secs.max(1.0)) + SLACK;
    FleetClient::new(&c.socket, timeout)
        .units()
        .await
        .map_err(|e| anyhow::anyhow!("cluster {name}: {e}"))
}

/// `fleet-broker diff A B [--content]`, with diff(1)'s exit status.
pub(super) async fn diff(a: &str, b: &str, content: bool) -> ExitCode {
    match compare_clusters(a, b, content).await {
        Ok((text, differ)) => {
            print!("{text}");
            ExitCode::from(u8::from(differ))
        }
        Err(e) => {
            eprintln!("fleet-broker: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn compare_clusters(a: &str, b: &str, content: bool) -> anyhow::Result<(String, bool)> {
    let control = crate::control::client::default_control_socket();
    let list = crate::control::client::list_clusters(&control).await?;
    let (ua, ub) = tokio::join!(units_of(a, &list), units_of(b, &list));
    let (ua, ub) = (ua?, ub?);
    Ok(report([a, b], [&ua, &ub], content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::schema::UnitOption;

    fn unit(name: &str, exec: &str, desired: &str) -> Unit {
        Unit {
            name: name.into(),
            desired_state: desired.into(),
            options: vec![UnitOption {
                section: "Service".into(),
                name: "ExecStart".into(),
                value: exec.into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn every_kind_of_difference_is_reported_in_unit_order() {
        let a = [
            unit("same.service", "/bin/true", "launched"),
            unit("only-a.service", "/bin/true", "launched"),
            unit("file.service", "/bin/a", "launched"),
            unit("state.service", "/bin/true", "launched"),
        ];
        let b = [
            unit("same.service", "/bin/true", "launched"),
            unit("only-b.service", "/bin/true", "launched"),
            unit("file.service", "/bin/b", "launched"),
            unit("state.service", "/bin/true", "inactive"),
        ];
        let (text, differ) = report(["staging", "prod"], [&a, &b], true);
        assert!(differ);
        let ha = hash(&a[2].options);
        let hb = hash(&b[2].options);
        assert_eq!(
            text,
            format!(
                "unit file differs: file.service ({} in staging, {} in prod)\n\
                 --- staging/file.service\n+++ prod/file.service\n@@ -1,2 +1,2 @@\n [Service]\n-ExecStart=/bin/a\n+ExecStart=/bin/b\n\
                 only in staging: only-a.service\n\
                 only in prod: only-b.service\n\
                 desired state differs: state.service (launched in staging, inactive in prod)\n",
                &ha[..7],
                &hb[..7]
            )
        );
        let (text, differ) = report(["a", "b"], [&a[..1], &b[..1]], false);
        assert_eq!((text.as_str(), differ), ("", false));
    }
}
