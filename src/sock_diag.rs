//! Who is on the other end of an accepted loopback TCP connection: the kernel's socket
//! diagnostics (`NETLINK_SOCK_DIAG`, as `ss -e` asks them) give the uid that created the
//! client's socket and its inode, and `/proc` then names the process holding it (for the
//! audit trail). Loopback TCP carries no SO_PEERCRED, so this is the only way to tell.
//!
//! Every function here blocks (netlink and `/proc` reads): call them off the runtime's thread
//! (`tokio::task::spawn_blocking`). An answer that cannot be established is [`Owner::Unknown`]
//! with the reason, never a guess; callers refuse such connections.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NETLINK_SOCK_DIAG: i32 = 4;
/// The longest wait for the kernel's answer to one lookup (each read has this timeout too).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// Messages read from one dump at most: the dump is filtered by both ports in the kernel, so
/// more than a handful means something else is going on.
const MAX_DUMP_MESSAGES: usize = 4096;
/// `/proc` entries looked at when naming the process that holds a socket.
const MAX_PROCESSES: usize = 8192;
/// Descriptors looked at per process.
const MAX_FDS_PER_PROCESS: usize = 4096;

/// The owner of a connection's client socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Created by this uid; `inode` names the socket in `/proc/PID/fd`.
    Uid { uid: u32, inode: u32 },
    /// The kernel did not say (no such socket, netlink refused, several candidates…).
    Unknown(String),
}

/// One socket as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    family: u8,
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
    uid: u32,
    inode: u32,
}

/// The client end of the connection that `local` (our accepted socket) has with `peer`.
///
/// First the kernel's exact lookup by 4-tuple; it misses a socket bound to a device
/// (`SO_BINDTODEVICE`, which any user may set since Linux 5.7), so then a dump filtered by
/// both ports, matched here on the exact 4-tuple.
pub(crate) fn owner(peer: SocketAddr, local: SocketAddr) -> Owner {
    let Some(want) = wanted(peer, local) else {
        return Owner::Unknown(format!("{peer} and {local} are not of one address family"));
    };
    let sock = match open() {
        Ok(s) => s,
        Err(e) => return Owner::Unknown(format!("socket diagnostics unavailable: {e}")),
    };
    match exact(&sock, &want) {
        Ok(Some(r)) => {
            return Owner::Uid {
                uid: r.uid,
                inode: r.inode,
            }
        }
        Ok(None) => {}
        Err(e) => return Owner::Unknown(format!("socket diagnostics: {e}")),
    }
    match dump(&sock, &want) {
        Ok(found) => pick(&want, &found),
        Err(e) => Owner::Unknown(format!("socket diagnostics: {e}")),
    }
}

/// The one record matching `want`'s 4-tuple, if exactly one does (or all that do agree).
fn pick(want: &Record, found: &[Record]) -> Owner {
    let matching: Vec<&Record> = found
        .iter()
        .filter(|r| {
            r.family == want.family
                && r.sport == want.sport
                && r.dport == want.dport
                && r.src == want.src
                && r.dst == want.dst
        })
        .collect();
    match matching.as_slice() {
        [] => Owner::Unknown("no socket of that connection is known to the kernel".into()),
        [first, rest @ ..] if rest.iter().all(|r| r.uid == first.uid) => Owner::Uid {
            uid: first.uid,
            inode: first.inode,
        },
        _ => Owner::Unknown("sockets of several users match that connection".into()),
    }
}

/// The record the client's socket has: its source is the peer, its destination is us.
fn wanted(peer: SocketAddr, local: SocketAddr) -> Option<Record> {
    let (family, src, dst) = match (peer, local) {
        (SocketAddr::V4(p), SocketAddr::V4(l)) => {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s[..4].copy_from_slice(&p.ip().octets());
            d[..4].copy_from_slice(&l.ip().octets());
            (nix::libc::AF_INET as u8, s, d)
        }
        (SocketAddr::V6(p), SocketAddr::V6(l)) => {
            (nix::libc::AF_INET6 as u8, p.ip().octets(), l.ip().octets())
        }
        _ => return None,
    };
    Some(Record {
        family,
        sport: peer.port(),
        dport: local.port(),
        src,
        dst,
        uid: 0,
        inode: 0,
    })
}

fn open() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe {
        nix::libc::socket(
            nix::libc::AF_NETLINK,
            nix::libc::SOCK_DGRAM | nix::libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = nix::libc::timeval {
        tv_sec: LOOKUP_TIMEOUT.as_secs() as nix::libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a timeval of the size passed.
    let r = unsafe {
        nix::libc::setsockopt(
            fd.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<nix::libc::timeval>() as nix::libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// nlmsghdr (16 bytes) + inet_diag_req_v2 (56 bytes) for `want`, with `flags`.
fn request(want: &Record, flags: u16, with_addresses: bool) -> Vec<u8> {
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    req.push(want.family);
    req.push(nix::libc::IPPROTO_TCP as u8);
    req.push(0); // extensions
    req.push(0); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&want.sport.to_be_bytes());
    req.extend_from_slice(&want.dport.to_be_bytes());
    let zero = [0u8; 16];
    req.extend_from_slice(if with_addresses { &want.src } else { &zero });
    req.extend_from_slice(if with_addresses { &want.dst } else { &zero });
    req.extend_from_slice(&0u32.to_ne_bytes()); // interface: any
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req
}

fn send(sock: &OwnedFd, req: &[u8]) -> std::io::Result<()> {
    // SAFETY: an all-zero sockaddr_nl is valid; family set below.
    let mut sa: nix::libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = nix::libc::AF_NETLINK as u16;
    // SAFETY: sendto with a buffer and an address of the sizes passed.
    let sent = unsafe {
        nix::libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            std::ptr::addr_of!(sa).cast(),
            std::mem::size_of::<nix::libc::sockaddr_nl>() as nix::libc::socklen_t,
        )
    };
    if sent != req.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn recv(sock: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: recv into a buffer of the size passed.
    let n = unsafe { nix::libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One netlink message: its type and payload.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let head = buf.get(at..at + 16)?;
        let len = u32::from_ne_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = u16::from_ne_bytes([head[4], head[5]]);
        if len < 16 || at + len > buf.len() {
            return None;
        }
        let payload = &buf[at + 16..at + len];
        at += (len + 3) & !3;
        Some((kind, payload))
    })
}

/// An `inet_diag_msg`: family, state, timer, retrans, id (ports, addresses, interface,
/// cookie), expires, rqueue, wqueue, uid, inode.
fn parse(payload: &[u8]) -> Option<Record> {
    let p = payload.get(..72)?;
    let u32_at = |i: usize| u32::from_ne_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&p[8..24]);
    dst.copy_from_slice(&p[24..40]);
    Some(Record {
        family: p[0],
        sport: u16::from_be_bytes([p[4], p[5]]),
        dport: u16::from_be_bytes([p[6], p[7]]),
        src,
        dst,
        uid: u32_at(64),
        inode: u32_at(68),
    })
}

/// The kernel's exact lookup (`inet_diag_find_one`): `None` when it knows no such socket.
fn exact(sock: &OwnedFd, want: &Record) -> std::io::Result<Option<Record>> {
    send(sock, &request(want, NLM_F_REQUEST, true))?;
    let mut buf = [0u8; 1024];
    let n = recv(sock, &mut buf)?;
    for (kind, payload) in messages(&buf[..n]) {
        match kind {
            SOCK_DIAG_BY_FAMILY => return Ok(parse(payload)),
            NLMSG_ERROR => return Ok(None),
            _ => {}
        }
    }
    Ok(None)
}

/// Every TCP socket of the family with both ports as in `want` (the kernel filters a dump by
/// ports, not by addresses), bounded in messages and time.
fn dump(sock: &OwnedFd, want: &Record) -> std::io::Result<Vec<Record>> {
    send(sock, &request(want, NLM_F_REQUEST | NLM_F_DUMP, false))?;
    let deadline = Instant::now() + LOOKUP_TIMEOUT;
    let mut found = Vec::new();
    let mut seen = 0usize;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if Instant::now() > deadline || seen > MAX_DUMP_MESSAGES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the kernel's socket dump did not end in time",
            ));
        }
        let n = recv(sock, &mut buf)?;
        if n == 0 {
            return Ok(found);
        }
        for (kind, payload) in messages(&buf[..n]) {
            seen += 1;
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let errno = payload
                        .get(..4)
                        .map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                    return Err(std::io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => found.extend(parse(payload)),
                _ => {}
            }
        }
    }
}

/// The process of `uid` that holds the socket with `inode`, found through `/proc/PID/fd` as
/// `ss -p` finds it (only processes whose descriptors we may read; bounded).
pub(crate) fn holder(uid: u32, inode: u32) -> Option<i32> {
    use std::os::unix::fs::MetadataExt;
    let target = format!("socket:[{inode}]");
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.take(MAX_PROCESSES).flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if !entry.metadata().is_ok_and(|m| m.uid() == uid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.take(MAX_FDS_PER_PROCESS).flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sport: u16, uid: u32) -> Record {
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[127, 0, 0, 1]);
        Record {
            family: nix::libc::AF_INET as u8,
            sport,
            dport: 2222,
            src,
            dst: src,
            uid,
            inode: 7,
        }
    }

    #[test]
    fn only_the_exact_connection_counts_and_disagreement_is_unknown() {
        let want = rec(40000, 0);
        assert_eq!(
            pick(&want, &[rec(40001, 65534), rec(40000, 1000)]),
            Owner::Uid {
                uid: 1000,
                inode: 7
            }
        );
        assert!(matches!(
            pick(&want, &[rec(40001, 1000)]),
            Owner::Unknown(_)
        ));
        assert!(matches!(pick(&want, &[]), Owner::Unknown(_)));
        assert!(matches!(
            pick(&want, &[rec(40000, 1000), rec(40000, 65534)]),
            Owner::Unknown(_)
        ));
    }

    /// A real connection on loopback, from a socket bound to `lo` (SO_BINDTODEVICE), the
    /// case the kernel's exact lookup misses: its owner is still found.
    #[tokio::test]
    async fn a_socket_bound_to_a_device_is_found() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind_device(Some(b"lo")).expect("SO_BINDTODEVICE");
        let (client, accepted) = tokio::join!(sock.connect(addr), listener.accept());
        let _client = client.expect("connect");
        let (accepted, peer) = accepted.expect("accept");
        let local = accepted.local_addr().expect("local");
        let me = nix::unistd::geteuid().as_raw();
        let found = tokio::task::spawn_blocking(move || {
            let o = owner(peer, local);
            let pid = match &o {
                Owner::Uid { uid, inode } => holder(*uid, *inode),
                Owner::Unknown(_) => None,
            };
            (o, pid)
        })
        .await
        .expect("lookup");
        match found {
            (Owner::Uid { uid, .. }, pid) => {
                assert_eq!(uid, me);
                assert_eq!(pid, Some(std::process::id() as i32));
            }
            (Owner::Unknown(why), _) => panic!("owner not found: {why}"),
        }
    }
}
