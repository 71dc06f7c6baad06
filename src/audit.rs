//! The audit trail of root-equivalent actions: one JSON line per mutating fleet API request
//! (anything but GET and HEAD) and per exec session, with who asked (uid, pid and executable
//! from the local socket's peer credentials), appended to `audit.jsonl` in the state
//! directory (0600) and rotated by size. Never request bodies or session output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Rotated to `audit.jsonl.1` past this size.
pub const MAX_BYTES: u64 = 8 * 1024 * 1024;

/// Who is on the other end of a local socket, from SO_PEERCRED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    pub uid: u32,
    pub pid: Option<i32>,
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

/// The audit log, or none (`audit_log = "off"`).
#[derive(Debug)]
pub(crate) struct AuditLog {
    path: Option<PathBuf>,
    lock: Mutex<()>,
}

impl AuditLog {
    pub(crate) fn new(path: Option<PathBuf>) -> AuditLog {
        AuditLog {
            path,
            lock: Mutex::new(()),
        }
    }

    /// Appends one record: `fields` plus the time and the peer.
    pub(crate) fn record(&self, peer: Option<Peer>, mut fields: serde_json::Value) {
        let Some(path) = &self.path else { return };
        if let Some(o) = fields.as_object_mut() {
            o.insert(
                "time".into(),
                humantime::format_rfc3339_millis(std::time::SystemTime::now())
                    .to_string()
                    .into(),
            );
            if let Some(p) = peer {
                o.insert("uid".into(), p.uid.into());
                o.insert("pid".into(), p.pid.into());
                o.insert("exe".into(), p.exe().into());
            }
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = append(path, &fields) {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the audit log");
        }
    }
}

fn append(path: &Path, record: &serde_json::Value) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= MAX_BYTES) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(path, PathBuf::from(old))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let mut line = record.to_string();
    line.push('\n');
    f.write_all(line.as_bytes())
}
