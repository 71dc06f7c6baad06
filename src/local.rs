//! Local socket rules: the runtime directory (0700, ours, not a symlink), sockets (0600, a
//! stale one replaced only after a connect shows nobody serves it) and the peer uid check on
//! every accepted connection. The fleet API is root-equivalent, so nothing here ever listens
//! on TCP.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{path}: {message}")]
    Unsafe { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: another fleet-broker is already serving this socket; stop it first (`fleet-broker status` shows it)")]
    InUse { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The effective uid of this process.
pub fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// `$FLEET_BROKER_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/fleet-broker`, else
/// `/tmp/fleet-broker-$UID`.
pub fn default_runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLEET_BROKER_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("fleet-broker"),
        None => PathBuf::from(format!("/tmp/fleet-broker-{}", my_uid())),
    }
}

/// The cluster socket path inside a runtime dir.
pub fn cluster_socket(runtime_dir: &Path, cluster: &str) -> PathBuf {
    runtime_dir.join("clusters").join(format!("{cluster}.sock"))
}

/// The control socket path inside a runtime dir.
pub fn control_socket(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("control.sock")
}

/// Creates (or checks) a private directory: not a symlink, owned by us, mode 0700.
pub fn ensure_private_dir(dir: &Path) -> Result<(), LocalError> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => {
            if meta.file_type().is_symlink() {
                return Err(LocalError::Unsafe {
                    path: dir.to_path_buf(),
                    message: "is a symlink; refusing to put sockets there (remove it or set XDG_RUNTIME_DIR)".into(),
                });
            }
            if !meta.is_dir() {
                return Err(LocalError::Unsafe {
                    path: dir.to_path_buf(),
                    message: "is not a directory".into(),
                });
            }
            if meta.uid() != my_uid() {
                return Err(LocalError::Unsafe {
                    path: dir.to_path_buf(),
                    message: format!(
                        "is owned by uid {}, not by us (uid {}); refusing to put sockets there",
                        meta.uid(),
                        my_uid()
                    ),
                });
            }
            if meta.mode() & 0o777 != 0o700 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(dir))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(dir))
        }
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Binds a 0600 unix socket at `path`, replacing a stale socket file only when a connect
/// attempt shows nobody serves it.
pub async fn bind_socket(path: &Path) -> Result<UnixListener, LocalError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(LocalError::Unsafe {
                    path: path.to_path_buf(),
                    message: "exists and is not a socket; refusing to replace it".into(),
                });
            }
            let probe =
                tokio::time::timeout(std::time::Duration::from_secs(1), UnixStream::connect(path))
                    .await;
            if matches!(probe, Ok(Ok(_))) {
                return Err(LocalError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io_err(path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    // Bind under a restrictive umask so the socket is never briefly wider than 0600.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    Ok(listener)
}

/// Whether the peer of an accepted connection is our own uid (SO_PEERCRED).
pub fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == my_uid() => Ok(()),
        Ok(cred) => Err(format!(
            "uid {} (pid {}) is not the broker's uid {}",
            cred.uid(),
            cred.pid().map_or_else(|| "?".into(), |p| p.to_string()),
            my_uid()
        )),
        Err(e) => Err(format!("cannot read peer credentials: {e}")),
    }
}

/// Whether the user's ssh_config asks for hashed known_hosts names for `host`
/// (`HashKnownHosts yes`, Debian's default), as OpenSSH itself resolves it (`ssh -G`). No
/// `ssh` on the machine, or no answer, means plain names.
pub fn hash_known_hosts(host: &str) -> bool {
    let out = std::process::Command::new("ssh")
        .arg("-G")
        .arg("--")
        .arg(host)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.trim().eq_ignore_ascii_case("hashknownhosts yes")),
        _ => false,
    }
}
