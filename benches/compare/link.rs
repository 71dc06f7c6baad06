//! The `link` block: the API through the broker and through a tuned OpenSSH forward when the
//! tunnel host is a round trip away, as it is for every user, not on loopback. No netem here
//! (and none on machines without `CONFIG_NET_SCH_NETEM`), so the delay is a relay in front
//! of the world's sshd that hands every chunk on `one_way` after it read it, in order, in
//! both directions. `LINK_RTT_MS` lists the round trips (default `1,10`); for each, the
//! sessions of the `master` block run over the same kind of link.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::{ms, support::*, CIPHER};

/// Chunks in flight per direction; a reader that gets this far ahead waits (TCP's window
/// does the same on a real link).
const IN_FLIGHT: usize = 4096;

/// Accepts on loopback and relays each connection to `target`, every chunk delivered
/// `one_way` after it was read. Dropping it stops accepting; a relayed connection's threads
/// end when either side closes it.
pub(super) struct DelayRelay {
    pub(super) addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Re-arms quick-ack, so that the relay's own ACKs are not what is measured.
fn quickack(s: &TcpStream) {
    let one: nix::libc::c_int = 1;
    // SAFETY: a valid descriptor, a pointer to a live c_int and its size.
    unsafe {
        nix::libc::setsockopt(
            s.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_QUICKACK,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        );
    }
}

/// One direction: a reader thread stamps chunks, a writer thread holds each until its time.
fn pipe(mut from: TcpStream, mut to: TcpStream, one_way: Duration) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    quickack(&from);
                    if tx
                        .send((Instant::now() + one_way, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (at, chunk) in rx {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
        // The reader saw the end: so does the other side, one way later.
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl DelayRelay {
    /// A relay to `sshd` with a round trip of `rtt_ms`.
    pub(super) fn start(sshd: &Sshd, rtt_ms: u64) -> DelayRelay {
        let target: SocketAddr = sshd.tunnel().parse().expect("sshd address");
        DelayRelay::with_delay(target, Duration::from_micros(rtt_ms * 500))
    }

    /// Adds a line to `known_hosts` pinning `sshd`'s key at the relay's address: it is the
    /// same server, a round trip away.
    pub(super) fn pin(&self, sshd: &Sshd, known_hosts: &Path) {
        let line = sshd.known_hosts_line();
        let key = line
            .split_once(' ')
            .map(|(_, k)| k)
            .expect("known_hosts line");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(known_hosts)
            .expect("known_hosts");
        write!(f, "[127.0.0.1]:{} {key}", self.addr.port()).expect("known_hosts");
    }

    fn with_delay(target: SocketAddr, one_way: Duration) -> DelayRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let addr = listener.local_addr().expect("relay addr");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for s in [&client, &server] {
                    let _ = s.set_nodelay(true);
                }
                let (c2, s2) = match (client.try_clone(), server.try_clone()) {
                    (Ok(c), Ok(s)) => (c, s),
                    _ => continue,
                };
                pipe(client, server, one_way);
                pipe(s2, c2, one_way);
            }
        });
        DelayRelay { addr, stop }
    }
}

/// GET /fleet/v1/machines and `fleetctl list-units` through the broker and through a tuned
/// OpenSSH forward (aes256-gcm both), both dialling sshd through a relay of each round trip.
pub(super) fn link(w: &World) {
    let rtts: Vec<u64> = std::env::var("LINK_RTT_MS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 10]);
    {
        let mut sim = w.sim.sim.lock().expect("sim");
        sim.clear_units();
        sim.put_many(
            (0..30)
                .map(|i| {
                    (
                        format!("l{i:02}.service"),
                        vec![opt("Service", "ExecStart", "/bin/sleep 1000")],
                        "launched".to_string(),
                    )
                })
                .collect(),
        );
    }
    for rtt in rtts {
        let relay = DelayRelay::start(&w.sshd, rtt);
        let dir = open_tempdir("fb-link.");
        let known = dir.path().join("known_hosts");
        relay.pin(&w.sshd, &known);
        let config = format!(
            "[clusters.c1]\ntunnel = \"127.0.0.1:{}\"\nendpoint = \"unix://{}\"\nuser = \"root\"\nknown_hosts = [\"{}\"]\nconnect_timeout = \"10s\"\n",
            relay.addr.port(),
            w.sim.socket.display(),
            known.display()
        );
        let broker = Broker::start(&config, Some(&w.agent.socket));
        wait_until_served(&broker, "the broker over the delayed link");
        let tuned_sock = dir.path().join("tuned.sock");
        let _tuned = super::forward_via(
            super::openssh_at(w, relay.addr.port(), &known),
            w,
            "root@127.0.0.1",
            &tuned_sock,
            true,
        );
        let paths: Vec<(&str, PathBuf)> = vec![
            ("fleet-broker", broker.socket("c1")),
            ("OpenSSH ssh -tt -L (tuned)", tuned_sock.clone()),
        ];
        let want = http(&w.sim.socket, "GET", "/fleet/v1/machines", None);
        for (_, p) in &paths {
            for _ in 0..5 {
                assert_eq!(http(p, "GET", "/fleet/v1/machines", None), want);
            }
        }
        let n = (2000 / rtt.max(1)).clamp(30, 200) as usize;
        let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); paths.len()];
        let mut order: Vec<usize> = (0..paths.len()).collect();
        for _ in 0..n {
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::thread_rng());
            for &i in &order {
                let t = Instant::now();
                let r = http(&paths[i].1, "GET", "/fleet/v1/machines", None);
                samples[i].push(t.elapsed());
                assert_eq!(r, want);
            }
        }
        println!();
        println!(
            "link: round trip {rtt} ms to the tunnel host (a delaying relay), GET /fleet/v1/machines, new local connection per request, {n} samples per path, interleaved, {CIPHER} on both sides"
        );
        let stats = super::p50_p99_table(&paths, &samples);
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        println!(
            "link {rtt} ms: broker / OpenSSH tuned (-tt):  p50 {:.3}x   p99 {:.3}x",
            ratio(stats[0].0, stats[1].0),
            ratio(stats[0].1, stats[1].1)
        );
        list_units(&broker, &tuned_sock, rtt);
        drop(broker);
        super::master_sessions(Some(rtt));
    }
    w.sim.sim.lock().expect("sim").clear_units();
}

/// `fleetctl list-units` (30 units) through both, whole process.
fn list_units(broker: &Broker, tuned: &Path, rtt: u64) {
    let runs = 11;
    let xdg = broker.dir.path().join("xdg");
    let run = |endpoint: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
        cmd.arg("list-units")
            .env("XDG_RUNTIME_DIR", &xdg)
            .env_remove("FLEETCTL_ENDPOINT")
            .env_remove("FLEETCTL_CLUSTER")
            .stdout(Stdio::null());
        if let Some(e) = endpoint {
            cmd.env("FLEETCTL_ENDPOINT", format!("unix://{}", e.display()));
        }
        let t = Instant::now();
        assert!(cmd.status().expect("fleetctl").success());
        t.elapsed()
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    run(None);
    run(Some(tuned));
    for _ in 0..runs {
        if rand::random::<bool>() {
            a.push(run(None));
            b.push(run(Some(tuned)));
        } else {
            b.push(run(Some(tuned)));
            a.push(run(None));
        }
    }
    let (ma, mb) = (super::median(a), super::median(b));
    println!(
        "link {rtt} ms: fleetctl list-units, median of {runs} in a random order: broker {:.2} ms, tuned OpenSSH forward {:.2} ms, {:.3}x",
        ms(ma),
        ms(mb),
        ma.as_secs_f64() / mb.as_secs_f64()
    );
}
