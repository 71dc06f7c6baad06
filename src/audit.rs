//! The audit trail of root-equivalent actions: one JSON line per mutating fleet API request
//! (anything but GET and HEAD) and per exec session, with who asked (uid, pid and executable
//! from the local socket's peer credentials), appended to `audit.jsonl` in the state
//! directory (0600) and rotated by size. Never request bodies or session output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Rotated to `audit.jsonl.1` past this size.
pub const MAX_BYTES: u64 = 8 * 1024 * 1024;

/// A new id shared by the lines of one session (start, end).
pub(crate) fn session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// One line of a session: what is known of it from the start (`base`) and this line's own
/// `fields`.
pub(crate) fn session_line(
    base: &serde_json::Value,
    fields: serde_json::Value,
) -> serde_json::Value {
    let mut line = base.clone();
    if let (Some(o), serde_json::Value::Object(f)) = (line.as_object_mut(), fields) {
        o.extend(f);
    }
    line
}

/// Who is on the other end of a local socket: from SO_PEERCRED on a unix socket, from the
/// kernel's socket diagnostics on the front door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    pub uid: u32,
    pub pid: Option<i32>,
    /// The client's TCP address when it came through the cluster's front door.
    pub door: Option<std::net::SocketAddr>,
}

impl Peer {
    /// The peer's executable, as `/proc/PID/exe` names it now.
    fn exe(&self) -> Option<String> {
        let pid = self.pid?;
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string())
    }
}

/// A peer with its executable resolved while it runs: a session's end is recorded after the
/// client has exited, under the name it had when it asked.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    peer: Peer,
    exe: Option<String>,
}

impl Caller {
    pub(crate) fn of(peer: Peer) -> Caller {
        Caller {
            exe: peer.exe(),
            peer,
        }
    }
}

/// The audit log, or none (`audit_log = "off"`).
#[derive(Debug)]
pub(crate) struct AuditLog {
    path: Option<PathBuf>,
    lock: Mutex<()>,
    /// Failed writes, logged at most once a second.
    failures: crate::throttle::Throttle,
}

impl AuditLog {
    /// Where it is written, if anywhere.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub(crate) fn new(path: Option<PathBuf>) -> AuditLog {
        AuditLog {
            path,
            lock: Mutex::new(()),
            failures: crate::throttle::Throttle::default(),
        }
    }

    /// Appends one record: `fields` plus the time and the peer.
    pub(crate) async fn record(self: &Arc<Self>, peer: Option<Peer>, fields: serde_json::Value) {
        self.record_as(peer.map(Caller::of).as_ref(), fields).await
    }

    /// Appends one record: `fields` plus the time and the caller. The file is written off
    /// the runtime's thread; the call returns once the line is written (or failed), so a
    /// request is on record before it is answered.
    pub(crate) async fn record_as(
        self: &Arc<Self>,
        caller: Option<&Caller>,
        mut fields: serde_json::Value,
    ) {
        if self.path.is_none() {
            return;
        }
        if let Some(o) = fields.as_object_mut() {
            o.insert(
                "time".into(),
                humantime::format_rfc3339_millis(std::time::SystemTime::now())
                    .to_string()
                    .into(),
            );
            if let Some(c) = caller {
                o.insert("uid".into(), c.peer.uid.into());
                o.insert("pid".into(), c.peer.pid.into());
                o.insert("exe".into(), c.exe.clone().into());
                if let Some(addr) = c.peer.door {
                    o.insert("front_door_client".into(), addr.to_string().into());
                }
            }
        }
        let log = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || log.write(&fields)).await {
            tracing::warn!(error = %e, "writing the audit log was interrupted");
        }
    }

    /// Appends `record` (blocking).
    fn write(&self, record: &serde_json::Value) {
        let Some(path) = &self.path else { return };
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = append(path, record) {
            if let Some(suppressed) = self.failures.admit() {
                tracing::warn!(file = %crate::escape::display(&path.display().to_string()), error = %e, suppressed, "cannot write the audit log");
            }
        }
    }
}

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    /// The file is there but someone else could have planted it or can change it: never
    /// written (the reason says what to do).
    #[error("{0}")]
    Unsafe(String),
    /// The system refused (no such directory, read-only, permission).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Opens the audit log for appending, creating it (0600) if need be, never through a
/// symlink (`O_NOFOLLOW`), and refuses a file another user owns or that group or others can
/// write: in a shared directory someone else may have planted it to read or forge the trail.
fn open_checked(path: &Path) -> Result<std::fs::File, FileError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                FileError::Unsafe("is a symlink; the audit log is never written through one".into())
            } else {
                FileError::Io(e)
            }
        })?;
    let meta = f.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(FileError::Unsafe(format!(
            "is owned by uid {}, not the broker's uid {me}; remove it or name another file in `audit_log`",
            meta.uid()
        )));
    }
    if !meta.is_file() {
        return Err(FileError::Unsafe("is not a regular file".into()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(FileError::Unsafe(format!(
            "is writable by group or others (mode {:o}); `chmod 600` it",
            meta.mode() & 0o777
        )));
    }
    Ok(f)
}

/// Checks that the audit log can be written under [`open_checked`]'s rules (at start).
pub(crate) fn check(path: &Path) -> Result<(), FileError> {
    make_dir(path)?;
    open_checked(path).map(drop)
}

fn make_dir(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    Ok(())
}

/// Where the audit trail is written: the file the config names, by default `audit.jsonl` in
/// the state directory; `None` when it is off.
pub fn log_path(setting: &crate::config::AuditLogSetting, state_dir: &Path) -> Option<PathBuf> {
    use crate::config::AuditLogSetting;
    match setting {
        AuditLogSetting::Default => Some(state_dir.join("audit.jsonl")),
        AuditLogSetting::Off => None,
        AuditLogSetting::File(p) => Some(p.clone()),
    }
}

/// The file the trail at `path` is rotated into.
fn rotated(path: &Path) -> PathBuf {
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    PathBuf::from(old)
}

/// The trail at `path` as `fleet-broker audit` prints it, the rotated file's lines first,
/// filtered as [`readable`] does. Files that do not exist (nothing audited yet) are empty;
/// bytes that are not UTF-8 are shown replaced, not dropped with their line.
pub fn read_trail(
    path: &Path,
    cluster: Option<&str>,
    since: Option<std::time::SystemTime>,
) -> Vec<String> {
    [rotated(path), path.to_path_buf()]
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .flat_map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|l| readable(l, cluster, since))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn append(path: &Path, record: &serde_json::Value) -> Result<(), FileError> {
    make_dir(path)?;
    let mut f = open_checked(path)?;
    if f.metadata()?.len() >= MAX_BYTES {
        std::fs::rename(path, rotated(path))?;
        f = open_checked(path)?;
    }
    let mut line = record.to_string();
    line.push('\n');
    Ok(f.write_all(line.as_bytes())?)
}

/// One audit line as `fleet-broker audit` prints it, or `None` when it is not JSON, is of
/// another cluster than `cluster`, or older than `since`.
pub fn readable(
    line: &str,
    cluster: Option<&str>,
    since: Option<std::time::SystemTime>,
) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    if cluster.is_some_and(|c| c != s("cluster")) {
        return None;
    }
    if let Some(cut) = since {
        match humantime::parse_rfc3339(&s("time")) {
            Ok(t) if t >= cut => {}
            _ => return None,
        }
    }
    let bytes = |k: &str| v[k].as_u64().map(|n| format!("{n} B"));
    let kind = s("kind");
    let (what, result) = if kind == "exec" || kind == "forward" {
        let what = if kind == "exec" {
            format!(
                "exec {} {}",
                v["target"],
                v["command"].as_str().unwrap_or("(shell)")
            )
        } else {
            format!(
                "ssh to {} {} through the front door",
                v["target"],
                s("address")
            )
        };
        let result = match s("phase").as_str() {
            "start" => format!("started, session {}", s("session")),
            "end" => {
                let how = if let Some(code) = v["exit"].as_u64() {
                    format!("exit {code}")
                } else if let Some(sig) = v["signal"].as_str() {
                    format!("signal {sig}")
                } else {
                    format!("ended: {}", s("error"))
                };
                format!(
                    "{how}, session {}, {} in, {} out",
                    s("session"),
                    bytes("bytes_in").unwrap_or_else(|| "?".into()),
                    bytes("bytes_out").unwrap_or_else(|| "?".into())
                )
            }
            _ => format!("{} {}", v["status"], s("error"))
                .trim_end()
                .to_string(),
        };
        (what, result)
    } else if kind == "guard" {
        let units: Vec<&str> = v["units"]
            .as_array()
            .map(|a| a.iter().filter_map(|u| u.as_str()).collect())
            .unwrap_or_default();
        (
            format!("fleetctl {} {}", s("command"), units.join(" "))
                .trim_end()
                .to_string(),
            format!("not run on a guarded cluster: {}", s("error")),
        )
    } else {
        let mut result = v["status"].to_string();
        if let Some(b) = bytes("request_bytes") {
            result.push_str(&format!(", {b} sent"));
        }
        (format!("{} {}", s("method"), s("path")), result)
    };
    let line = format!(
        "{}  {}  uid {} pid {} {}  {what} -> {result}{}",
        s("time"),
        s("cluster"),
        v["uid"],
        v["pid"],
        v["exe"].as_str().unwrap_or("?"),
        v["duration_ms"]
            .as_u64()
            .map_or_else(String::new, |ms| format!(" ({ms} ms)"))
    );
    // Paths, commands and errors came from clients and servers: one line, nothing hidden.
    Some(crate::escape::display(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_as_who_did_what_and_how_it_ended() {
        let api = r#"{"kind":"api","cluster":"prod","method":"PUT","path":"/fleet/v1/units/a.service","status":201,"duration_ms":7,"request_bytes":120,"time":"2026-11-26T10:00:00.000Z","uid":1000,"pid":42,"exe":"/usr/bin/fleetctl"}"#;
        assert_eq!(
            readable(api, None, None).as_deref(),
            Some("2026-11-26T10:00:00.000Z  prod  uid 1000 pid 42 /usr/bin/fleetctl  PUT /fleet/v1/units/a.service -> 201, 120 B sent (7 ms)")
        );
        let end = r#"{"kind":"exec","phase":"end","session":"00ff","cluster":"prod","target":{"machine":"m1"},"command":"systemctl 'status'","status":101,"exit":3,"duration_ms":1500,"bytes_in":0,"bytes_out":512,"time":"2026-11-26T10:00:01.000Z","uid":1000,"pid":43,"exe":"/usr/bin/fleetctl"}"#;
        let text = readable(end, Some("prod"), None).expect("prod");
        assert!(
            text.ends_with("exec {\"machine\":\"m1\"} systemctl 'status' -> exit 3, session 00ff, 0 B in, 512 B out (1500 ms)"),
            "{text}"
        );
        assert_eq!(readable(end, Some("staging"), None), None);
        let later = humantime::parse_rfc3339("2026-11-26T11:00:00Z").expect("time");
        assert_eq!(readable(end, None, Some(later)), None);
        assert_eq!(readable("not json", None, None), None);
        let fwd = r#"{"kind":"forward","phase":"refused","session":"01","cluster":"prod","target":{"machine":"m1"},"address":"10.0.0.1:22","status":403,"error":"read-only","time":"t","uid":1,"pid":2,"exe":"/usr/bin/ssh","front_door_client":"127.0.0.1:5"}"#;
        let text = readable(fwd, None, None).expect("line");
        assert!(
            text.ends_with(
                "ssh to {\"machine\":\"m1\"} 10.0.0.1:22 through the front door -> 403 read-only"
            ),
            "{text}"
        );
        let hostile = r#"{"kind":"api","cluster":"prod","method":"PUT","path":"/x\u001b[2J\r","status":201,"time":"t","uid":1,"pid":2,"exe":"/tmp/e\nvil"}"#;
        let text = readable(hostile, None, None).expect("line");
        assert!(!text.contains(['\x1b', '\r', '\n']), "{text:?}");
        assert!(text.contains("/x\\x1b[2J\\r"), "{text}");
        let refused = r#"{"kind":"exec","phase":"refused","cluster":"prod","target":{"machine":"x"},"command":null,"status":404,"error":"no machine x","time":"t","uid":1,"pid":2,"exe":"e"}"#;
        let text = readable(refused, None, None).expect("line");
        assert!(
            text.ends_with("exec {\"machine\":\"x\"} (shell) -> 404 no machine x"),
            "{text}"
        );
    }
}
