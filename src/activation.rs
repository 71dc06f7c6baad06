//! Socket activation (`sd_listen_fds`): a service manager that owns the control socket
//! (`fleet-broker.socket`) passes it as a listening descriptor, named `control` in
//! `LISTEN_FDNAMES`, and starts the daemon on the first request. The descriptor is checked
//! before it is used: a listening unix stream socket bound at the daemon's own control socket
//! path; anything else is refused with the unit line to fix. The variables are removed so no
//! child (`ssh`, `sudo`, …) inherits them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;

/// The name `fleet-broker.socket` gives the control socket (`FileDescriptorName=control`).
pub const CONTROL_NAME: &str = "control";

/// Why the passed descriptors cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The variables do not describe descriptors.
    #[error("socket activation: {0}")]
    Environment(String),
    /// A passed descriptor is not the control socket this daemon serves.
    #[error("socket activation: descriptor {fd} ({name}): {problem}")]
    Descriptor {
        /// The descriptor number.
        fd: i32,
        /// Its name in `LISTEN_FDNAMES`.
        name: String,
        /// What is wrong and what to change.
        problem: DescriptorProblem,
    },
}

/// What is wrong with a passed descriptor, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorProblem {
    /// `LISTEN_FDS` counts it, but it is closed.
    #[error("is not open, though LISTEN_FDS counts it")]
    NotOpen,
    /// A control socket was passed already.
    #[error("a second control socket; pass one")]
    Second,
    /// Not a socket at all.
    #[error("not a socket ({0})")]
    NotASocket(nix::Error),
    /// A socket of another kind.
    #[error("a {0:?} socket; the control socket is a stream socket (ListenStream=)")]
    NotStream(nix::sys::socket::SockType),
    /// Not listening.
    #[error("not listening (Accept=no is needed: the daemon accepts itself)")]
    NotListening,
    /// Not a unix socket.
    #[error("not a unix socket (ListenStream=PATH)")]
    NotUnix,
    /// A unix socket bound elsewhere than this daemon's control socket.
    #[error("bound at {}, but this daemon's control socket is {}; set ListenStream={} in fleet-broker.socket (or XDG_RUNTIME_DIR / FLEET_BROKER_RUNTIME_DIR to match)", bound.as_ref().map_or_else(|| "no path".to_string(), |p| p.display().to_string()), expected.display(), expected.display())]
    Elsewhere {
        /// Where it is bound.
        bound: Option<PathBuf>,
        /// The control socket's path.
        expected: PathBuf,
    },
}

/// The control socket's listening descriptor as the service manager passed it, if it did.
#[derive(Debug, Default)]
pub struct Passed {
    /// The control socket, checked.
    pub control: Option<OwnedFd>,
    /// Descriptors passed under other names, closed (said in the log).
    pub ignored: Vec<String>,
}

/// Reads and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, and takes the
/// descriptors meant for this process. Call before any other thread runs (it changes the
/// environment). Descriptors meant for another pid are left alone, as `sd_listen_fds` does.
pub fn take_from_env(control_socket: &Path) -> Result<Passed, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Passed::default());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Passed::default());
    }
    let count: i32 = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=64).contains(n))
        .ok_or_else(|| {
            ActivationError::Environment(format!("LISTEN_FDS={fds:?} is not a descriptor count"))
        })?;
    let names: Vec<String> = match names {
        Some(n) => n.split(':').map(str::to_string).collect(),
        None => vec!["unknown".to_string(); count as usize],
    };
    if names.len() != count as usize {
        return Err(ActivationError::Environment(format!(
            "LISTEN_FDNAMES names {} descriptors but LISTEN_FDS says {count}",
            names.len()
        )));
    }
    let mut passed = Passed::default();
    let mut taken: Vec<(i32, String, OwnedFd)> = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let fd = FIRST_FD + i as i32;
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            return Err(ActivationError::Descriptor {
                fd,
                name,
                problem: DescriptorProblem::NotOpen,
            });
        }
        // SAFETY: the descriptor is open, the service manager passed it to this process
        // (LISTEN_PID is ours) and nothing else owns it: the variables are removed
        // above, so they are taken exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            owned.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        taken.push((fd, name, owned));
    }
    // One unnamed descriptor is the control socket (a manager that does not name them).
    let single_unnamed = taken.len() == 1 && taken[0].1 == "unknown";
    for (fd, name, owned) in taken {
        if name == CONTROL_NAME || single_unnamed {
            if passed.control.is_some() {
                return Err(ActivationError::Descriptor {
                    fd,
                    name,
                    problem: DescriptorProblem::Second,
                });
            }
            check_control(&owned, control_socket).map_err(|problem| {
                ActivationError::Descriptor {
                    fd,
                    name: name.clone(),
                    problem,
                }
            })?;
            passed.control = Some(owned);
        } else {
            passed.ignored.push(format!("{fd} ({name})"));
        }
    }
    Ok(passed)
}

/// A listening unix stream socket bound at `expected`.
fn check_control(fd: &OwnedFd, expected: &Path) -> Result<(), DescriptorProblem> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
    let raw = fd.as_raw_fd();
    let kind = getsockopt(fd, sockopt::SockType).map_err(DescriptorProblem::NotASocket)?;
    if kind != SockType::Stream {
        return Err(DescriptorProblem::NotStream(kind));
    }
    if !getsockopt(fd, sockopt::AcceptConn).unwrap_or(false) {
        return Err(DescriptorProblem::NotListening);
    }
    let addr: UnixAddr = getsockname(raw).map_err(|_| DescriptorProblem::NotUnix)?;
    let bound = addr.path().map(PathBuf::from);
    if bound.as_deref() != Some(expected) {
        return Err(DescriptorProblem::Elsewhere {
            bound,
            expected: expected.to_path_buf(),
        });
    }
    Ok(())
}

/// The passed control socket as a listener the daemon can serve.
pub(crate) fn listener(fd: &OwnedFd) -> std::io::Result<tokio::net::UnixListener> {
    let l = std::os::unix::net::UnixListener::from(fd.try_clone()?);
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}
