//! Local socket rules: the runtime directory (0700, ours, not a symlink), sockets (0600, a
//! stale one replaced only after a connect shows nobody serves it) and the peer uid check on
//! every accepted connection — and, for clients, the same checks before they send a byte
//! ([`connect`]): a directory or socket another local user could have planted never speaks
//! for the broker. The fleet API is root-equivalent, so nothing here ever listens on TCP.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

/// A local path the daemon or a client will not use, or could not.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Another user could have planted or could reach it (owner, mode, symlink).
    #[error("{path}: {message}")]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// What is wrong with it and what to do.
        message: String,
    },
    /// A system call failed on it.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A live daemon serves this socket already.
    #[error("{path}: another fleet-broker is already serving this socket; stop it first (`fleet-broker status` shows it)")]
    InUse {
        /// The socket.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The effective uid of this process.
pub(crate) fn my_uid() -> u32 {
    // Asked once: every accepted connection compares its peer with it.
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UID.get_or_init(|| nix::unistd::geteuid().as_raw())
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

/// Creates (or checks) a private directory: not a symlink, owned by us, mode 0700. Missing
/// parents are created 0700 too. Race-free: the last component is created with `mkdir` (which
/// never follows a symlink), then opened with `O_NOFOLLOW | O_DIRECTORY` and checked and
/// fixed through that descriptor, so a directory swapped in between is never chmod-ed.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), LocalError> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_err(parent))?;
        }
    }
    match nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(io_err(dir)(e.into())),
    }
    let unsafe_dir = |message: String| LocalError::Unsafe {
        path: dir.to_path_buf(),
        message,
    };
    let fd = match nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        // Linux says ENOTDIR for a symlink under O_DIRECTORY | O_NOFOLLOW, ELOOP elsewhere.
        Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => {
            let link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            return Err(unsafe_dir(if link {
                "is a symlink; refusing to put sockets there (remove it or set XDG_RUNTIME_DIR)"
                    .into()
            } else {
                "is not a directory".into()
            }));
        }
        Err(e) => return Err(io_err(dir)(e.into())),
    };
    let fd = unsafe_fd(fd);
    let st = nix::sys::stat::fstat(fd.as_raw()).map_err(|e| io_err(dir)(e.into()))?;
    if st.st_uid != my_uid() {
        return Err(unsafe_dir(format!(
            "is owned by uid {}, not by us (uid {}); someone else may have created it to catch our sockets. Refusing to use it: remove it, or set XDG_RUNTIME_DIR or FLEET_BROKER_RUNTIME_DIR to a directory of your own",
            st.st_uid,
            my_uid()
        )));
    }
    if st.st_mode & 0o777 != 0o700 {
        nix::sys::stat::fchmod(fd.as_raw(), Mode::from_bits_truncate(0o700))
            .map_err(|e| io_err(dir)(e.into()))?;
    }
    Ok(())
}

/// An owned descriptor from `nix::fcntl::open`, closed on drop.
struct OwnedRawFd(std::os::fd::OwnedFd);

impl OwnedRawFd {
    fn as_raw(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }
}

fn unsafe_fd(fd: std::os::fd::RawFd) -> OwnedRawFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by a successful open() and is owned by nobody else.
    OwnedRawFd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A directory a client may trust to hold one of the broker's sockets: not a symlink, ours,
/// no access for group or others.
fn check_private_dir(dir: &Path) -> Result<(), LocalError> {
    let unsafe_dir = |message: String| LocalError::Unsafe {
        path: dir.to_path_buf(),
        message,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(io_err(dir))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            "is a symlink, not the broker's private directory; refusing to talk to sockets in it"
                .into(),
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("is not a directory".into()));
    }
    if meta.uid() != my_uid() {
        return Err(unsafe_dir(format!(
            "is owned by uid {}, not by us (uid {}); another user may have planted it to impersonate fleet-broker. Refusing to talk to sockets in it: remove it, or set XDG_RUNTIME_DIR or FLEET_BROKER_RUNTIME_DIR to a directory of your own",
            meta.uid(),
            my_uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "has mode {:04o}; the broker keeps its sockets in a 0700 directory. Refusing to talk to sockets in it (`chmod 700` it if it is yours)",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// A directory holding a socket outside the broker's runtime dir (a `FLEETCTL_ENDPOINT`):
/// not a symlink, owned by us or root, and nobody else can create or replace entries in it
/// (not writable by group or others, unless root-owned and sticky, like /tmp).
fn check_endpoint_dir(dir: &Path) -> Result<(), LocalError> {
    let unsafe_dir = |message: String| LocalError::Unsafe {
        path: dir.to_path_buf(),
        message,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(io_err(dir))?;
    let meta = if meta.file_type().is_symlink() {
        if meta.uid() != my_uid() && meta.uid() != 0 {
            return Err(unsafe_dir(format!(
                "is a symlink owned by uid {}; refusing to follow it",
                meta.uid()
            )));
        }
        std::fs::metadata(dir).map_err(io_err(dir))?
    } else {
        meta
    };
    if meta.uid() != my_uid() && meta.uid() != 0 {
        return Err(unsafe_dir(format!(
            "is owned by uid {}; a socket in it could be anyone's. Refusing to talk to it",
            meta.uid()
        )));
    }
    let sticky_root = meta.uid() == 0 && meta.mode() & 0o1000 != 0;
    if meta.mode() & 0o022 != 0 && !sticky_root {
        return Err(unsafe_dir(format!(
            "is writable by others (mode {:04o}); a socket in it could be anyone's. Refusing to talk to it",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Connects to a socket of the broker's (or of fleetd's), checking before a byte is sent that
/// nobody else could have planted it or be answering on it. A socket in the broker's runtime
/// dir needs every directory from there down to be ours and private, and its server to run
/// as our uid (SO_PEERCRED). Any other socket needs a directory only we or root can write to
/// and a server running as us or root.
pub(crate) async fn connect(path: &Path) -> Result<UnixStream, LocalError> {
    let runtime = default_runtime_dir();
    let in_runtime = path.starts_with(&runtime);
    let parent = path.parent().unwrap_or(Path::new("/"));
    if in_runtime {
        for dir in parent.ancestors() {
            check_private_dir(dir)?;
            if dir == runtime {
                break;
            }
        }
        // Whoever can write to the runtime dir's parent could swap the runtime dir itself.
        if let Some(above) = runtime.parent().filter(|p| !p.as_os_str().is_empty()) {
            check_endpoint_dir(above)?;
        }
    } else {
        check_endpoint_dir(parent)?;
    }
    let stream = UnixStream::connect(path).await.map_err(io_err(path))?;
    let cred = stream.peer_cred().map_err(io_err(path))?;
    let ok = cred.uid() == my_uid() || (!in_runtime && cred.uid() == 0);
    if !ok {
        return Err(LocalError::Unsafe {
            path: path.to_path_buf(),
            message: format!(
                "is served by uid {} (pid {}), not by us (uid {}); another user may be impersonating fleet-broker. Refusing to talk to it",
                cred.uid(),
                cred.pid().map_or_else(|| "?".into(), |p| p.to_string()),
                my_uid()
            ),
        });
    }
    Ok(stream)
}

/// Binds a 0600 unix socket at `path`, replacing a stale socket file only when a connect
/// attempt shows nobody serves it.
pub(crate) async fn bind_socket(path: &Path) -> Result<UnixListener, LocalError> {
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
    // No process-wide umask change (other threads create files too): the socket lives in a
    // 0700 directory, so nobody else can reach it in the moment before the chmod.
    let listener = UnixListener::bind(path).map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    Ok(listener)
}

/// Why a local door (a cluster socket, the control socket, a front door) did not serve a
/// connection: it fails closed when it cannot tell who is asking.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// Another user.
    #[error("uid {uid}{} is not the broker's uid {me}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    OtherUser {
        /// The peer's uid.
        uid: u32,
        /// Its pid, when known.
        pid: Option<i32>,
        /// The broker's uid.
        me: u32,
    },
    /// The kernel did not say who it is.
    #[error("cannot read peer credentials: {0}")]
    NoCredentials(std::io::Error),
    /// The owner of a loopback connection's client end cannot be found (the kernel's
    /// socket diagnostics said why).
    #[error("its owner cannot be established: {0}")]
    Unknown(String),
    /// Nor within the time allowed.
    #[error("its owner cannot be established within {0:?}")]
    Slow(std::time::Duration),
}

/// Whether the peer of an accepted connection is our own uid (SO_PEERCRED).
pub(crate) fn peer_allowed(stream: &UnixStream) -> Result<crate::audit::Peer, Refused> {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == my_uid() => Ok(crate::audit::Peer {
            uid: cred.uid(),
            pid: cred.pid(),
            door: None,
        }),
        Ok(cred) => Err(Refused::OtherUser {
            uid: cred.uid(),
            pid: cred.pid(),
            me: my_uid(),
        }),
        Err(e) => Err(Refused::NoCredentials(e)),
    }
}

/// Whether the user's ssh_config asks for hashed known_hosts names for `host`
/// (`HashKnownHosts yes`, Debian's default), as OpenSSH itself resolves it (`ssh -G`). No
/// `ssh` on the machine, or no answer, means plain names.
pub(crate) fn hash_known_hosts(host: &str) -> bool {
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

/// `$FLEET_BROKER_STATE_DIR`, else `$XDG_STATE_HOME/fleet-broker`, else
/// `~/.local/state/fleet-broker`: files the daemon keeps across restarts (the front door's
/// host key).
pub(crate) fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLEET_BROKER_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("fleet-broker"),
        None => crate::config::expand_tilde("~/.local/state/fleet-broker"),
    }
}
