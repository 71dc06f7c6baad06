//! Go `text/tabwriter` output as fleetctl configures it: minwidth 0, tabwidth 8, padding 1,
//! padchar TAB, flags 0. Each column but the last is as wide as its longest cell plus one,
//! rounded up to a multiple of 8, and cells are padded with TABs. And the machine legend the
//! tables and the wait messages show.

use crate::fleet::schema::Machine;

const TABWIDTH: usize = 8;

/// `85c0c595...` (or the full ID), plus `/IP` when the machine is known and has one.
pub(crate) fn machine_legend(id: &str, machine: Option<&Machine>, full: bool) -> String {
    if id.is_empty() {
        return "-".into();
    }
    let mut s = match id.get(..8) {
        Some(short) if !full && id.len() > 8 => format!("{short}..."),
        _ => id.to_string(),
    };
    if let Some(m) = machine {
        if !m.primary_ip.is_empty() {
            s = format!("{s}/{}", m.primary_ip);
        }
    }
    s
}

/// Formats rows (each a list of cells) into tab-padded text, one line per row.
pub(crate) fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                widths[i] = widths[i].max(cell.chars().count() + 1);
            }
        }
    }
    for w in widths.iter_mut() {
        *w = w.div_ceil(TABWIDTH) * TABWIDTH;
    }
    let mut out = String::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i + 1 < row.len() {
                let len = cell.chars().count();
                let tabs = (widths[i] - len).div_ceil(TABWIDTH).max(1);
                for _ in 0..tabs {
                    out.push('\t');
                }
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(r: &[&[&str]]) -> Vec<Vec<String>> {
        r.iter()
            .map(|c| c.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn matches_reference_bytes() {
        let out = render(&rows(&[
            &["MACHINE", "IP", "METADATA"],
            &["113f16a7...", "172.17.8.103", "az=us-west-1b,role=web"],
            &["e793afb9...", "172.17.8.101", "-"],
        ]));
        assert_eq!(
            out,
            "MACHINE\t\tIP\t\tMETADATA\n113f16a7...\t172.17.8.103\taz=us-west-1b,role=web\ne793afb9...\t172.17.8.101\t-\n"
        );
        let out = render(&rows(&[
            &["UNIT", "MACHINE", "ACTIVE", "SUB"],
            &[
                "hello.service",
                "85c0c595.../172.17.8.102",
                "active",
                "running",
            ],
        ]));
        assert_eq!(out, "UNIT\t\tMACHINE\t\t\t\tACTIVE\tSUB\nhello.service\t85c0c595.../172.17.8.102\tactive\trunning\n");
    }
}
