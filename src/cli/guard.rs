//! The guard of a cluster that matters (`guard = true`): before a command changes anything
//! there, the user sees the cluster and what will change and types the cluster's name on the
//! terminal, or names it with `--confirm-cluster NAME` when there is no terminal. A refusal
//! changes nothing and goes into the daemon's audit trail. Only our fleetctl asks: the
//! socket stays an API for other clients (`read_only` is the hard switch).

use std::time::Duration;

use super::target::Target;

/// How long the daemon is given to say whether a cluster is guarded, and to take a refusal.
const ASK_LIMIT: Duration = Duration::from_secs(5);

/// Why a change was not confirmed.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("--confirm-cluster {named} does not name cluster {cluster:?}")]
    OtherName { named: String, cluster: String },
    #[error("there is no terminal to confirm on; pass --confirm-cluster {0} to mean it")]
    NoTerminal(String),
    #[error("no answer on the terminal")]
    NoAnswer,
    #[error("the name typed is not the cluster's")]
    WrongName,
}

/// Why it is not known whether a cluster is guarded.
#[derive(Debug, thiserror::Error)]
enum Unknown {
    #[error(transparent)]
    Control(#[from] crate::control::client::ControlError),
    #[error("fleet-broker did not answer within {0:?}")]
    Slow(Duration),
}

/// What a guarded cluster is asked to confirm.
pub(crate) struct Change<'a> {
    /// The fleetctl command (`destroy`, …).
    pub command: &'static str,
    /// The units it names, as given.
    pub units: &'a [String],
}

/// Whether the change may go to the target's cluster; `Err` with the exit status after
/// saying why not (and recording the refusal) when it may not.
pub(crate) async fn confirm(
    target: &Target,
    change: &Change<'_>,
    confirm: Option<&str>,
) -> Result<(), i32> {
    let Some(cluster) = target.cluster.as_deref() else {
        // A bare fleetd socket: no broker, no guard.
        return Ok(());
    };
    let guarded = match target.guard {
        Some(g) => g,
        None => match guarded(target, cluster).await {
            Ok(g) => g,
            Err(why) => {
                // Fail closed: a change is not sent where we cannot tell whether it is guarded.
                eprintln!("Error: cannot tell whether cluster {cluster:?} is guarded ({why}); nothing changed");
                return Err(1);
            }
        },
    };
    if !guarded {
        return Ok(());
    }
    let what = describe(cluster, change);
    let outcome = match confirm {
        Some(named) if named == cluster => Ok(()),
        Some(named) => Err(Refusal::OtherName {
            named: crate::escape::display(named).into_owned(),
            cluster: cluster.to_string(),
        }),
        None => ask_on_terminal(cluster, &what).await,
    };
    if let Err(reason) = outcome {
        eprintln!("Error: {what}\nNot confirmed: {reason}; nothing changed");
        record_refusal(target, cluster, change, &reason.to_string()).await;
        return Err(1);
    }
    Ok(())
}

/// The sentence the user confirms.
fn describe(cluster: &str, change: &Change<'_>) -> String {
    let n = change.units.len();
    format!(
        "cluster {cluster:?} is guarded: `fleetctl {}` would change {n} unit{} there: {}",
        change.command,
        if n == 1 { "" } else { "s" },
        crate::escape::display(&change.units.join(" "))
    )
}

/// Asks the daemon whether the cluster is guarded.
async fn guarded(target: &Target, cluster: &str) -> Result<bool, Unknown> {
    let ask = crate::control::client::cluster_info(&target.control, cluster);
    match tokio::time::timeout(ASK_LIMIT, ask).await {
        Ok(info) => Ok(info?.guard),
        Err(_) => Err(Unknown::Slow(ASK_LIMIT)),
    }
}

/// Shows `what` on the terminal and reads a line there (never stdin, which may be a unit
/// file or a pipe); `Ok` when it is the cluster's name.
async fn ask_on_terminal(cluster: &str, what: &str) -> Result<(), Refusal> {
    let prompt = format!("{what}\nType the cluster's name to go on: ");
    let answer = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        let mut tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")?;
        tty.write_all(prompt.as_bytes())?;
        tty.flush()?;
        let mut line = String::new();
        std::io::BufReader::new(tty).read_line(&mut line)?;
        Ok(line)
    })
    .await;
    match answer {
        Ok(Ok(line)) if line.trim_end_matches(['\n', '\r']) == cluster => Ok(()),
        Ok(Ok(line)) if line.is_empty() => Err(Refusal::NoAnswer),
        Ok(Ok(_)) => Err(Refusal::WrongName),
        Ok(Err(_)) | Err(_) => Err(Refusal::NoTerminal(cluster.to_string())),
    }
}

/// Tells the daemon, which records it with who asked; a daemon that does not take it is
/// said on stderr (the refusal stands either way).
async fn record_refusal(target: &Target, cluster: &str, change: &Change<'_>, reason: &str) {
    let refusal = crate::protocol::GuardRefusal {
        command: change.command.to_string(),
        units: change.units.to_vec(),
        reason: reason.to_string(),
    };
    let Ok(body) = serde_json::to_vec(&refusal) else {
        return;
    };
    let path = format!("/v1/clusters/{cluster}/guard-refused");
    let send = crate::control::client::request_with_body(&target.control, "POST", &path, body);
    match tokio::time::timeout(ASK_LIMIT, send).await {
        Ok(Ok((200, _))) => {}
        _ => eprintln!("WARNING: the refusal could not be recorded in fleet-broker's audit trail"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_change_names_the_cluster_and_every_unit() {
        let units = vec!["web@1.service".to_string(), "web@2.service".to_string()];
        let c = super::Change {
            command: "destroy",
            units: &units,
        };
        assert_eq!(
            super::describe("prod", &c),
            "cluster \"prod\" is guarded: `fleetctl destroy` would change 2 units there: web@1.service web@2.service"
        );
    }
}
