//! The daemon's logging: stderr, or the journal's native protocol when stderr is the
//! journal's stream; `RUST_LOG` as the filter, russh kept quiet unless named.

/// The log filter: `RUST_LOG`, where russh's packet-level messages stay at `warn` unless the
/// filter names russh itself; an invalid `RUST_LOG` is reported and `info` used instead.
fn log_filter(env: Option<&str>) -> (String, Option<String>) {
    let Some(raw) = env.map(str::trim).filter(|v| !v.is_empty()) else {
        return ("info,russh=warn".into(), None);
    };
    let wanted = if raw.contains("russh") {
        raw.to_string()
    } else {
        format!("{raw},russh=warn")
    };
    match tracing_subscriber::EnvFilter::try_new(&wanted) {
        Ok(_) => (wanted, None),
        Err(e) => (
            "info,russh=warn".into(),
            Some(format!(
                "RUST_LOG={raw:?} is not a valid log filter ({e}); logging at info"
            )),
        ),
    }
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` names its device and inode
/// (systemd sets it for a service whose output goes to the journal).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsRawFd;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_raw_fd())
        .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// Logs to stderr, or natively to the journal when stderr is the journal's stream: one entry
/// per event with its priority, its fields as journal fields (`CLUSTER=prod`, `ERROR=…`) and
/// no timestamp of our own. A journal that cannot be reached falls back to stderr.
pub(crate) fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, mut problem) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let filter = tracing_subscriber::EnvFilter::new(filter);
    let journal = if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(l) => Some(
                l.with_field_prefix(None)
                    .with_syslog_identifier("fleet-broker".into())
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        ..tracing_journald::PriorityMappings::new()
                    }),
            ),
            Err(e) => {
                problem = Some(format!(
                    "JOURNAL_STREAM is set but the journal's socket cannot be used ({e}); logging to stderr"
                ));
                None
            }
        }
    } else {
        None
    };
    let registry = tracing_subscriber::registry().with(filter);
    match journal {
        Some(j) => registry.with(j).init(),
        None => {
            use std::io::IsTerminal;
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(std::io::stderr().is_terminal()),
                )
                .init()
        }
    }
    if let Some(p) = problem {
        tracing::warn!("{p}");
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn russh_stays_at_warn_unless_named_and_a_bad_filter_is_reported() {
        assert_eq!(log_filter(None), ("info,russh=warn".to_string(), None));
        assert_eq!(log_filter(Some("  ")).0, "info,russh=warn");
        assert_eq!(log_filter(Some("debug")).0, "debug,russh=warn");
        assert_eq!(log_filter(Some("russh=trace")).0, "russh=trace");
        let (filter, problem) = log_filter(Some("info,[["));
        assert_eq!(filter, "info,russh=warn");
        assert!(problem.is_some_and(|p| p.contains("not a valid log filter")));
    }
}
