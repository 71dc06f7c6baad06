//! `fleet-broker status`: the daemon's clusters as a table (or its JSON), with a verdict
//! (every cluster ready or idle), once or `--watch`ed.

use crate::protocol::{ClusterInfo, ClusterList};

/// Longest LAST ERROR shown in the table; `--json` has the whole text.
const ERROR_WIDTH: usize = 100;

/// The status table, one line per cluster.
pub(crate) fn table(list: &ClusterList) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<11} {:<24} {:<10} {:>8} {:>8} {:>10} {:>9}  LAST ERROR",
        "CLUSTER", "STATE", "TUNNEL", "USER", "REQUESTS", "ATTEMPTS", "RECONNECTS", "P50 MS"
    );
    for c in &list.clusters {
        let ClusterInfo {
            name,
            tunnel,
            user,
            status,
            ..
        } = c;
        let door = c.front_door.as_ref().and_then(|d| d.error.as_deref());
        let error = match (status.last_error.as_deref(), door) {
            (Some(e), Some(d)) => format!("{e}; {d}"),
            (Some(e), None) | (None, Some(e)) => e.to_string(),
            (None, None) => "-".to_string(),
        };
        let error = crate::escape::display(&error);
        let error = match error.char_indices().nth(ERROR_WIDTH) {
            Some((cut, _)) => format!("{}… (whole text: status --json)", &error[..cut]),
            None => error.to_string(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<11} {:<24} {:<10} {:>8} {:>8} {:>10} {:>9}  {}",
            name,
            status.state.to_string(),
            tunnel,
            user,
            status.requests,
            status.connect_attempts,
            status.reconnects,
            status
                .latency_p50_ms
                .map_or("-".into(), |v| format!("{v:.2}")),
            error
        );
    }
    out
}

/// One look at the daemon: what to print and the verdict (`Err` naming the clusters that are
/// neither ready nor idle); the outer `Err` says why the daemon could not be asked.
pub(crate) async fn status_once(json: bool) -> anyhow::Result<(String, anyhow::Result<()>)> {
    let sock = crate::control::client::default_control_socket();
    let (status, body) = crate::control::client::request(&sock, "GET", "/v1/clusters").await?;
    if status != 200 {
        anyhow::bail!(
            "daemon answered {status}: {}",
            crate::escape::display(&crate::control::client::error_text(&body))
        );
    }
    let list: ClusterList = serde_json::from_slice(&body)
        .map_err(|e| anyhow::anyhow!("the daemon's answer is not a cluster list: {e}"))?;
    let text = if json {
        format!("{}\n", String::from_utf8_lossy(&body))
    } else {
        table(&list)
    };
    // Ok only when every cluster is ready or idle: scripts and monitors can rely on it.
    use crate::tunnel::State;
    let unwell: Vec<&str> = list
        .clusters
        .iter()
        .filter(|c| {
            !matches!(c.status.state, State::Ready | State::Idle)
                || c.front_door.as_ref().is_some_and(|d| !d.listening)
        })
        .map(|c| c.name.as_str())
        .collect();
    let verdict = if unwell.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("not ready: {}", unwell.join(", ")))
    };
    Ok((text, verdict))
}

/// `fleet-broker status` once: the table (or JSON), failing unless every cluster is ready or
/// idle.
pub(super) async fn print_once(json: bool) -> anyhow::Result<()> {
    let (text, verdict) = status_once(json).await?;
    print!("{text}");
    verdict
}

/// `status --watch`: a refresh every `every` seconds, in place on a terminal (cleared and
/// redrawn under a header, like watch(1)), appended elsewhere; a daemon that goes away is
/// shown and asked again. Ends on Ctrl-C or after `count` refreshes with the last verdict.
pub(super) async fn watch_status(json: bool, every: f64, count: Option<u64>) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    if !every.is_finite() || !(0.1..=86_400.0).contains(&every) {
        anyhow::bail!("--watch takes a number of seconds between 0.1 and 86400, not {every}");
    }
    let tty = std::io::stdout().is_terminal();
    let period = std::time::Duration::from_secs_f64(every);
    let mut verdict: anyhow::Result<()>;
    let mut n = 0u64;
    loop {
        let text = match status_once(json).await {
            Ok((text, v)) => {
                verdict = v;
                text
            }
            Err(e) => {
                let shown = format!("{e:#}\n");
                verdict = Err(e);
                shown
            }
        };
        n += 1;
        let mut out = std::io::stdout().lock();
        let frame = if json {
            text
        } else {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            let head = format!("Every {every}s: fleet-broker status    {now}\n\n");
            if tty {
                format!("\x1b[H\x1b[2J{head}{text}")
            } else {
                format!("{head}{text}\n")
            }
        };
        if out
            .write_all(frame.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            break; // stdout closed (a pipe's reader went away)
        }
        drop(out);
        if count.is_some_and(|c| n >= c) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    verdict
}
