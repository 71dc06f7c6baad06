//! Latency of `GET /fleet/v1/machines` with a new local connection per request, in one run:
//! through fleet-broker, through OpenSSH `ssh -N -L` (what users configure), through OpenSSH
//! with a pty (`ssh -tt -L … sleep`, which makes OpenSSH set TCP_NODELAY), and directly on the
//! simulator socket (the floor). Paths are sampled in turn (A B C D A B …) after a warm-up.
//! `BENCH_N` sets the samples per path (default 200), `BENCH_ONLY` the blocks that follow
//! it, and `BENCH_HOLD=api`, `=patterns` (the 64 KiB chunked answer), `=master` or
//! `=master-link` holds that block set up for
//! profiling ([`hold`]). Every OpenSSH peer uses the broker's cipher ([`CIPHER`]).

#[path = "compare/link.rs"]
mod link;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

struct Ssh(Child);

impl Drop for Ssh {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ssh` to the world's sshd, pinned, with its agent, never prompting.
fn openssh(w: &World) -> Command {
    openssh_at(w, w.sshd.port, &w.known_hosts)
}

/// `ssh` to `port` (the world's sshd, or a relay in front of it) pinned by `known_hosts`,
/// with the world's agent, never prompting.
fn openssh_at(w: &World, port: u16, known_hosts: &Path) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.arg("-p")
        .arg(port.to_string())
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("IdentityAgent={}", w.agent.socket.display()));
    cmd
}

/// An OpenSSH forward of the simulator socket to `local`, with the broker's cipher
/// (aes256-gcm; OpenSSH's default is chacha20-poly1305). `tuned` adds a terminal session
/// (`-tt … sleep`), which makes OpenSSH set TCP_NODELAY; it lasts as long as [`hold`] may.
fn openssh_forward(w: &World, local: &Path, tuned: bool) -> Ssh {
    let dest = format!("root@{}", w.sshd.ip);
    forward_via(openssh(w), w, &dest, local, tuned)
}

/// [`openssh_forward`] with `cmd` (an [`openssh_at`]) as the connection to `dest`.
fn forward_via(mut cmd: Command, w: &World, dest: &str, local: &Path, tuned: bool) -> Ssh {
    cmd.args(["-o", "StreamLocalBindUnlink=yes"])
        .args(["-c", CIPHER])
        .arg("-L")
        .arg(format!("{}:{}", local.display(), w.sim.socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if tuned {
        cmd.arg("-tt").arg(dest).arg("sleep 3700");
    } else {
        cmd.arg("-N").arg(dest);
    }
    let child = Ssh(cmd.spawn().expect("ssh"));
    wait_until("ssh -L socket", DEADLINE, || {
        try_http(local, "GET", "/fleet/v1/machines", None).is_ok_and(|r| r.0 == 200)
    });
    child
}

/// The cipher of every OpenSSH peer: the one the broker prefers on CPUs with AES
/// instructions, so that both sides of a row encrypt alike.
const CIPHER: &str = "aes256-gcm@openssh.com";

/// Prints each path's p50 and p99 of its samples (milliseconds) under a header, and returns
/// them in the paths' order.
fn p50_p99_table(
    paths: &[(&str, PathBuf)],
    samples: &[Vec<Duration>],
) -> Vec<(Duration, Duration)> {
    println!("{:<30} {:>10} {:>10}", "path", "p50 ms", "p99 ms");
    let mut stats = Vec::new();
    for (i, (name, _)) in paths.iter().enumerate() {
        let mut s = samples[i].clone();
        s.sort();
        let (p50, p99) = (percentile(&s, 0.5), percentile(&s, 0.99));
        println!("{name:<30} {:>10.3} {:>10.3}", ms(p50), ms(p99));
        stats.push((p50, p99));
    }
    stats
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    // The daemons log as a user's would (info), not at the tests' debug level: a line per
    // request is not what is measured. BROKER_LOG still overrides.
    if std::env::var_os("BROKER_LOG").is_none() {
        std::env::set_var("BROKER_LOG", "fleet_broker=info");
    }
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let w = World::new();
    let broker = w.broker("");
    let dir = open_tempdir("fb-bench.");
    let plain_sock = dir.path().join("plain.sock");
    let tuned_sock = dir.path().join("tuned.sock");
    let _plain = openssh_forward(&w, &plain_sock, false);
    let _tuned = openssh_forward(&w, &tuned_sock, true);
    let paths: Vec<(&str, PathBuf)> = vec![
        ("fleet-broker", broker.socket("c1")),
        ("OpenSSH ssh -N -L", plain_sock.clone()),
        ("OpenSSH ssh -tt -L (tuned)", tuned_sock.clone()),
        ("simulator socket (floor)", w.sim.socket.clone()),
    ];
    let mut held: Vec<(&str, PathBuf)> = paths.clone();
    held.push(("broker's config and log", broker.dir.path().to_path_buf()));
    if hold("api", &held) {
        return;
    }
    let want = http(&w.sim.socket, "GET", "/fleet/v1/machines", None);
    for (_, p) in &paths {
        for _ in 0..20 {
            assert_eq!(http(p, "GET", "/fleet/v1/machines", None), want);
        }
    }
    println!(
        "fleet-broker's tunnel: interactive session {}",
        broker.cluster_info("c1")["interactive_session"]
    );
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); paths.len()];
    let mut order: Vec<usize> = (0..paths.len()).collect();
    for _round in 0..n {
        // A new order every round. With a fixed order the same path always followed the
        // same other, and that alone moved a path's p50 by up to 0.2 ms: three brokers of
        // one config measured 0.655, 0.546 and 0.445 ms by their place in the order, and
        // 0.561, 0.535 and 0.542 ms shuffled.
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::thread_rng());
        for &i in &order {
            let p = &paths[i].1;
            let t = Instant::now();
            let r = http(p, "GET", "/fleet/v1/machines", None);
            samples[i].push(t.elapsed());
            assert_eq!(r.0, 200);
        }
    }
    println!("GET /fleet/v1/machines, new local connection per request, {n} samples per path, interleaved, {CIPHER} on both sides");
    let stats = p50_p99_table(&paths, &samples);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!();
    println!(
        "broker / OpenSSH -N -L:        p50 {:.3}x   p99 {:.3}x",
        ratio(stats[0].0, stats[1].0),
        ratio(stats[0].1, stats[1].1)
    );
    println!(
        "broker / OpenSSH tuned (-tt):  p50 {:.3}x   p99 {:.3}x",
        ratio(stats[0].0, stats[2].0),
        ratio(stats[0].1, stats[2].1)
    );
    println!(
        "broker / simulator socket:     p50 {:.3}x   p99 {:.3}x",
        ratio(stats[0].0, stats[3].0),
        ratio(stats[0].1, stats[3].1)
    );
    if block("whole") {
        whole_process(&w, &broker, &tuned_sock);
    }
    if block("load") {
        load(&broker);
    }
    if block("patterns") {
        // Both brokers of this block start here, alike but for the interactive session: by
        // now the first block's broker may have served the load block, and a daemon that
        // served a burst answers slower for a while (docs/performance.md), which is not
        // what this block compares.
        let auto = w.broker("");
        let off = w.broker("interactive_session = \"off\"");
        // Connected before timing, as OpenSSH's forwards are: a broker is started with its
        // control socket, and its tunnel comes up in the background; the first request
        // waited for it (over 10 ms, the one slow request in the first pattern every run).
        wait_until_served(&auto, "the patterns block's auto broker");
        wait_until_served(&off, "the patterns block's off broker");
        let mut paths = paths.clone();
        paths[0].1 = auto.socket("c1");
        paths.insert(1, ("broker, interactive_session off", off.socket("c1")));
        write_patterns(&w, &paths);
    }
    drop(broker);
    if block("rss") {
        idle_rss(&w);
    }
    if block("bulk") {
        bulk(&w);
    }
    if block("flow") {
        flow(&w);
    }
    if block("waits") {
        waits();
    }
    if block("status") {
        status_vs_jump();
    }
    if block("master") {
        master_sessions(None);
    }
    if block("clusters") {
        several_clusters(&w);
    }
    if block("link") {
        link::link(&w);
    }
}

/// Several clusters: `fleetctl --cluster 'c*' list-units` over three clusters (30 units each)
/// against each single cluster's own run, and `fleet-broker prompt`; whole processes,
/// medians of 21 runs in a random order, every output checked.
fn several_clusters(w: &World) {
    let runs = 21;
    let sims = [SimServer::start(), SimServer::start(), SimServer::start()];
    let mut config = String::new();
    for (i, sim) in sims.iter().enumerate() {
        sim.sim.lock().expect("sim").put_many(
            (0..30)
                .map(|u| {
                    (
                        format!("c{i}-{u:02}.service"),
                        vec![opt("Service", "ExecStart", "/bin/sleep 1000")],
                        "launched".to_string(),
                    )
                })
                .collect(),
        );
        config.push_str(&cluster_toml(
            &format!("c{}", i + 1),
            &w.sshd,
            &format!("unix://{}", sim.socket.display()),
            "root",
            &w.known_hosts,
            "connect = \"eager\"\n",
        ));
    }
    let b = Broker::start(&config, Some(&w.agent.socket));
    let xdg = b.dir.path().join("xdg");
    let fleetctl = |cluster: &str, lines: usize| {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .args(["--cluster", cluster, "list-units"])
            .env("XDG_RUNTIME_DIR", &xdg)
            .env_remove("FLEETCTL_ENDPOINT")
            .env_remove("FLEETCTL_CLUSTER")
            .stdin(Stdio::null())
            .output()
            .expect("fleetctl");
        let took = t.elapsed();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), lines);
        took
    };
    let prompt = || {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
            .arg("prompt")
            .env("XDG_RUNTIME_DIR", &xdg)
            .env("FLEETCTL_CLUSTER", "c1")
            .env_remove("FLEETCTL_ENDPOINT")
            .output()
            .expect("prompt");
        let took = t.elapsed();
        assert_eq!(out.stdout, b"c1:ready", "{out:?}");
        took
    };
    // Warm: every tunnel up, every pool filled once.
    for c in ["c1", "c2", "c3"] {
        fleetctl(c, 31);
    }
    fleetctl("c*", 91);
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); 5];
    let mut order: Vec<usize> = (0..5).collect();
    for _ in 0..runs {
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::thread_rng());
        for &i in &order {
            let d = match i {
                0 => fleetctl("c1", 31),
                1 => fleetctl("c2", 31),
                2 => fleetctl("c3", 31),
                3 => fleetctl("c*", 91),
                _ => prompt(),
            };
            samples[i].push(d);
        }
    }
    let median = |i: usize| {
        let mut s = samples[i].clone();
        s.sort();
        percentile(&s, 0.5)
    };
    println!();
    println!("several clusters: whole processes, medians of {runs} runs in a random order");
    for (i, what) in [
        "fleetctl --cluster c1 list-units (30 units)",
        "fleetctl --cluster c2 list-units (30 units)",
        "fleetctl --cluster c3 list-units (30 units)",
        "fleetctl --cluster 'c*' list-units (3 x 30)",
        "fleet-broker prompt",
    ]
    .iter()
    .enumerate()
    {
        println!("{what:<46} {:>8.2} ms", ms(median(i)));
    }
    let slowest = median(0).max(median(1)).max(median(2));
    println!(
        "fan-out / slowest single cluster: {:.2}x",
        median(3).as_secs_f64() / slowest.as_secs_f64()
    );
}

/// With `BENCH_HOLD=BLOCK` (`api`, the first block, or `master`), that block sets up its
/// processes, prints where they are and, instead of measuring, waits until the printed file
/// is removed (at most an hour): for profiling one path with `perf` against live peers.
/// Returns whether it held; the caller then returns, so every process it started is stopped
/// as after a run.
fn hold(block: &str, what: &[(&str, PathBuf)]) -> bool {
    if std::env::var("BENCH_HOLD").ok().as_deref() != Some(block) {
        return false;
    }
    for (name, path) in what {
        println!("hold: {name}: {}", path.display());
    }
    let dir = open_tempdir("fb-hold.");
    let marker = dir.path().join("remove-to-stop");
    std::fs::write(&marker, "").expect("hold marker");
    println!(
        "hold: measuring nothing; remove {} to stop",
        marker.display()
    );
    let end = Instant::now() + Duration::from_secs(3600);
    while marker.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}

/// Whether to run a block: all unless `BENCH_ONLY` names some (comma-separated: whole,
/// load, patterns, rss, bulk, flow, waits, status, master, clusters, link).
fn block(name: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |v| v.split(',').any(|b| b.trim() == name))
}

/// Latency for each way a server may write its response, through every path: 1000
/// requests per path and pattern, interleaved in a new random order every round; p50, p99
/// and how many took over 10 ms.
fn write_patterns(w: &World, paths: &[(&str, PathBuf)]) {
    use fleet_broker::sim::WritePattern;
    let n = 1000;
    let units = |count: usize| {
        let mut sim = w.sim.sim.lock().expect("sim");
        sim.token_limit = 1000;
        sim.clear_units();
        sim.put_many(
            (0..count)
                .map(|i| {
                    (
                        format!("p{i:04}.service"),
                        vec![opt("Service", "ExecStart", "/bin/sleep 1000")],
                        "inactive".to_string(),
                    )
                })
                .collect(),
        );
    };
    let cases: [(&str, WritePattern, &str, usize); 4] = [
        (
            "single write (machines)",
            WritePattern::SingleWrite,
            "/fleet/v1/machines",
            0,
        ),
        (
            "headers then body (machines)",
            WritePattern::HeadersThenBody,
            "/fleet/v1/machines",
            0,
        ),
        (
            "Go chunked, 16 KiB (units)",
            WritePattern::GoNetHttp,
            "/fleet/v1/units",
            90,
        ),
        (
            "Go chunked, 64 KiB (units)",
            WritePattern::GoNetHttp,
            "/fleet/v1/units",
            360,
        ),
    ];
    if std::env::var("BENCH_HOLD").ok().as_deref() == Some("patterns") {
        // The largest pattern, for profiling one path against live peers.
        w.sim.sim.lock().expect("sim").write_pattern = WritePattern::GoNetHttp;
        units(360);
        hold("patterns", paths);
        return;
    }
    for (label, pattern, path, count) in cases {
        w.sim.sim.lock().expect("sim").write_pattern = pattern;
        units(count);
        let want = http(&w.sim.socket, "GET", path, None);
        // Warm-up, as in the first block.
        for (_, p) in paths {
            for _ in 0..20 {
                assert_eq!(http(p, "GET", path, None), want);
            }
        }
        let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); paths.len()];
        let mut order: Vec<usize> = (0..paths.len()).collect();
        for _round in 0..n {
            // A new order every round, as above.
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::thread_rng());
            for &i in &order {
                let p = &paths[i].1;
                let t = Instant::now();
                let r = http(p, "GET", path, None);
                samples[i].push(t.elapsed());
                assert_eq!(r, want);
            }
        }
        println!();
        println!(
            "{label}: GET {path}, {} bytes, {n} requests per path, interleaved, {CIPHER} on both sides",
            want.1.len()
        );
        println!(
            "{:<30} {:>10} {:>10} {:>10}",
            "path", "p50 ms", "p99 ms", ">10 ms"
        );
        let mut stats = Vec::new();
        for (i, (name, _)) in paths.iter().enumerate() {
            let mut s = samples[i].clone();
            s.sort();
            let (p50, p99) = (percentile(&s, 0.5), percentile(&s, 0.99));
            let slow = s.iter().filter(|d| **d > Duration::from_millis(10)).count();
            println!(
                "{name:<30} {:>10.3} {:>10.3} {:>10}",
                ms(p50),
                ms(p99),
                slow
            );
            stats.push((p50, p99));
        }
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        let tuned = paths
            .iter()
            .position(|(name, _)| name.contains("tuned"))
            .expect("tuned OpenSSH path");
        for (i, (name, _)) in paths.iter().enumerate().take(tuned) {
            println!(
                "{name} / OpenSSH tuned (-tt):  p50 {:.3}x   p99 {:.3}x",
                ratio(stats[i].0, stats[tuned].0),
                ratio(stats[i].1, stats[tuned].1)
            );
        }
    }
    w.sim.sim.lock().expect("sim").write_pattern = WritePattern::default();
}

/// 256 concurrent clients × 100 requests each, new local connection per request.
fn load(broker: &Broker) {
    let (clients, per) = (256, 100);
    let sock = broker.socket("c1");
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut errors = 0;
                for _ in 0..per {
                    match try_http(&sock, "GET", "/fleet/v1/machines", None) {
                        Ok((200, _)) => {}
                        _ => errors += 1,
                    }
                }
                errors
            })
        })
        .collect();
    let errors: usize = handles.into_iter().map(|h| h.join().unwrap_or(per)).sum();
    let took = started.elapsed();
    println!();
    println!(
        "load: {clients} clients x {per} requests: {errors} errors, {:.1} s, {:.0} requests/s",
        took.as_secs_f64(),
        (clients * per) as f64 / took.as_secs_f64()
    );
}

/// A TCP server answering every request with `size` bytes, for the bulk comparison.
fn bulk_server(size: u64) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming().take(64) {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    if c.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let chunk = vec![b'x'; 1 << 20];
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
                );
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if c.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    addr
}

/// Time to fetch one bulk response through `socket`, reading as fast as possible; `None`
/// when the response was cut short.
fn fetch_bulk(socket: &Path, size: u64) -> Option<Duration> {
    use std::io::{Read, Write};
    let t = Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.write_all(b"GET /bulk HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => break,
        }
    }
    (total >= size).then(|| t.elapsed())
}

/// Throughput of one large response: broker (direct-tcpip endpoint) against OpenSSH
/// `ssh -N -L sock:host:port`, same cipher (aes256-gcm, which the broker prefers on CPUs with
/// AES instructions).
fn bulk(w: &World) {
    let mb: u64 = std::env::var("BULK_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let size = mb << 20;
    let addr = bulk_server(size);
    let b = Broker::start(
        &cluster_toml(
            "bulk",
            &w.sshd,
            &format!("http://{addr}"),
            "root",
            &w.known_hosts,
            "",
        ),
        Some(&w.agent.socket),
    );
    let dir = open_tempdir("fb-bulk.");
    let local = dir.path().join("bulk.sock");
    let mut cmd = openssh(w);
    cmd.args(["-c", CIPHER])
        .arg("-N")
        .arg("-L")
        .arg(format!("{}:{addr}", local.display()))
        .arg(format!("root@{}", w.sshd.ip))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _ssh = Ssh(cmd.spawn().expect("ssh"));
    wait_until("ssh -L bulk socket", DEADLINE, || local.exists());
    // Every transfer is checked: one that ends short is a failure, not a dropped sample.
    let (mut a, mut o, mut short_a, mut short_o) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..3 {
        match fetch_bulk(&b.socket("bulk"), size) {
            Some(t) => a.push(t),
            None => short_a += 1,
        }
        match fetch_bulk(&local, size) {
            Some(t) => o.push(t),
            None => short_o += 1,
        }
    }
    println!();
    println!("bulk: one {mb} MiB response, median of 3, interleaved");
    if short_a + short_o > 0 {
        println!(
            "bulk: FAILED: {short_a} of 3 broker and {short_o} of 3 OpenSSH transfers ended short"
        );
        std::process::exit(1);
    }
    let (ta, to) = (median(a), median(o));
    let rate = |t: Duration| mb as f64 / t.as_secs_f64();
    println!(
        "{:<40} {:>10.1} MiB/s",
        "fleet-broker (direct-tcpip)",
        rate(ta)
    );
    println!(
        "{:<40} {:>10.1} MiB/s",
        "OpenSSH ssh -N -L (aes256-gcm)",
        rate(to)
    );
    println!("broker / OpenSSH throughput: {:.3}x", rate(ta) / rate(to));
    println!("every transfer complete (3 + 3)");
}

/// Two large answers through one connection, one read as fast as possible and one paused
/// for 10 s after 64 MiB, while a third client asks for a small answer in a loop: the loop's
/// latency and the fast reader's rate, broker against an OpenSSH forward of the same socket
/// (aes256-gcm on both). Every block of both answers is checked; one that ends short fails
/// the benchmark. `FLOW_MB` sets the size (default 1024).
fn flow(w: &World) {
    let mb: usize = std::env::var("FLOW_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mb << 20;
    let dir = open_tempdir("fb-flow.");
    let fleetd = bulk_fleetd(dir.path());
    let b = Broker::start(
        &cluster_toml(
            "flow",
            &w.sshd,
            &format!("unix://{}", fleetd.display()),
            "root",
            &w.known_hosts,
            "",
        ),
        Some(&w.agent.socket),
    );
    let local = dir.path().join("forward.sock");
    let mut cmd = openssh(w);
    cmd.args(["-c", CIPHER])
        .arg("-N")
        .arg("-L")
        .arg(format!("{}:{}", local.display(), fleetd.display()))
        .arg(format!("root@{}", w.sshd.ip))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _ssh = Ssh(cmd.spawn().expect("ssh"));
    wait_until("ssh -L flow socket", DEADLINE, || local.exists());
    println!();
    println!(
        "flow: two {mb} MiB answers (one reader pausing 10 s) and a loop of small requests on the same connection"
    );
    println!(
        "{:<34} {:>10} {:>8} {:>9} {:>9} {:>9} {:>7}",
        "path", "fast MiB/s", "loop n", "p50 ms", "p99 ms", "max ms", ">10 ms"
    );
    for (name, socket) in [
        ("fleet-broker", b.socket("flow")),
        ("OpenSSH ssh -N -L (aes256-gcm)", local.clone()),
    ] {
        assert_eq!(http(&socket, "GET", "/fleet/v1/machines", None).0, 200);
        let run = two_readers_and_a_loop(&socket, size);
        let short: Vec<&Got> = [&run.fast, &run.pausing]
            .into_iter()
            .filter(|g| g.error.is_some() || g.blocks != size / BLOCK)
            .collect();
        if !short.is_empty() || run.failed > 0 || run.latencies.is_empty() {
            println!(
                "flow: FAILED on {name}: {short:?}; {} small requests failed",
                run.failed
            );
            std::process::exit(1);
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<34} {:>10.1} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>7}",
            name,
            mb as f64 / run.fast_took.as_secs_f64(),
            run.latencies.len(),
            ms(run.pct(0.5)),
            ms(run.pct(0.99)),
            ms(run.pct(1.0)),
            run.latencies.iter().filter(|d| ms(**d) > 10.0).count()
        );
    }
    println!("every answer complete, every block checked");
}

/// Whole commands that wait, on the simulator moving as fleet does (reference B.6 delays):
/// `start`, `stop`, `unload`, `destroy` of one unit through the broker, each checked, median
/// of 5. The original fleetctl is the peer where `FLEETCTL_ORIGINAL` names its binary: it
/// runs the same commands on a unit of its own through the cluster socket
/// (`FLEETCTL_ENDPOINT=unix://…`), interleaved with ours; without it, the output says so.
fn waits() {
    let w = World::new();
    w.sim.sim.lock().expect("sim").timing =
        fleet_broker::sim::Timing::Fleet(fleet_broker::sim::FleetDelays::observed());
    let b = w.broker("");
    let cwd = open_tempdir("fb-waits.");
    let unit = "[Service]\nExecStart=/bin/sleep 1000\n";
    for name in ["w.service", "o.service"] {
        std::fs::write(cwd.path().join(name), unit).expect("unit file");
    }
    let original = std::env::var_os("FLEETCTL_ORIGINAL").map(PathBuf::from);
    let endpoint = format!("unix://{}", b.socket("c1").display());
    let steps: [(&str, &str); 4] = [
        ("start", "launched on"),
        ("stop", "loaded on"),
        ("unload", "inactive"),
        ("destroy", "Destroyed"),
    ];
    let mut ours: Vec<Vec<Duration>> = vec![Vec::new(); steps.len()];
    let mut theirs: Vec<Vec<Duration>> = vec![Vec::new(); steps.len()];
    for _ in 0..5 {
        for (i, (cmd, line)) in steps.iter().enumerate() {
            let t = Instant::now();
            let r = fleetctl(&b, cwd.path(), &[], &[cmd, "w.service"]);
            let took = t.elapsed();
            if r.code != 0 || !r.stdout.contains(line) {
                println!("waits: FAILED: {cmd}: {r:?}");
                std::process::exit(1);
            }
            ours[i].push(took);
            if let Some(bin) = &original {
                let t = Instant::now();
                let out = Command::new(bin)
                    .args([cmd, "o.service"])
                    .current_dir(cwd.path())
                    .env("FLEETCTL_ENDPOINT", &endpoint)
                    .stdin(Stdio::null())
                    .output()
                    .expect("the original fleetctl runs");
                let took = t.elapsed();
                let stdout = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() || !stdout.contains(line) {
                    println!("waits: FAILED: original {cmd}: {out:?}");
                    std::process::exit(1);
                }
                theirs[i].push(took);
            }
        }
    }
    println!();
    println!("waits: whole commands on the simulator moving as fleet does, median of 5");
    match &original {
        Some(bin) => println!("{:<40} {:>10} {:>10}", "", "ours", bin.display()),
        None => println!("(the original fleetctl: not run; FLEETCTL_ORIGINAL names its binary)"),
    }
    for (((cmd, _), t), o) in steps.iter().zip(ours).zip(theirs) {
        let label = if *cmd == "start" {
            "fleetctl start (a new unit)".to_string()
        } else {
            format!("fleetctl {cmd}")
        };
        if o.is_empty() {
            println!("{label:<40} {:>8.2} s", median(t).as_secs_f64());
        } else {
            println!(
                "{label:<40} {:>8.2} s {:>8.2} s",
                median(t).as_secs_f64(),
                median(o).as_secs_f64()
            );
        }
    }
}

/// Resident memory of an idle daemon with 100 lazy clusters.
fn idle_rss(w: &World) {
    let mut config = String::new();
    for i in 0..100 {
        config.push_str(&cluster_toml(
            &format!("c{i}"),
            &w.sshd,
            &format!("unix://{}", w.sim.socket.display()),
            "root",
            &w.known_hosts,
            "",
        ));
    }
    let b = Broker::start(&config, Some(&w.agent.socket));
    let pid = b.pid().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    println!("idle daemon with 100 lazy clusters: VmRSS {rss}");
}

/// Machines with `hello.service` launched on M1.
fn machines_with_hello() -> Machines {
    let m = Machines::new();
    m.sim.put(
        "hello.service",
        vec![
            opt("Service", "ExecStart", "/bin/sleep 1000"),
            opt("X-Fleet", "MachineID", M1),
        ],
        "launched",
    );
    m
}

/// An ssh_config for OpenSSH against these machines: pinned, with their agent, as root,
/// never prompting; `extra` lines added under `Host *`.
fn write_ssh_config(m: &Machines, path: &Path, extra: &str) {
    std::fs::write(
        path,
        format!(
            "Host *\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  IdentityAgent {}\n  User root\n{extra}",
            m.known_hosts.display(),
            m.agent.socket.display()
        ),
    )
    .expect("ssh_config");
}

/// `fleetctl status UNIT` through a warm broker (with and without the nested connection's
/// interactive session) against the same command through two fresh OpenSSH hops
/// (`ssh -J tunnel machine`) and one (`ssh machine`, as if the machine were reachable),
/// medians of 20 whole-process runs.
fn status_vs_jump() {
    let runs = 20;
    let m = machines_with_hello();
    let broker = m.broker("");
    let off = m.broker("interactive_session = \"off\"");
    let cfg = m.keys.path().join("ssh_config");
    write_ssh_config(&m, &cfg, "");
    let fleetctl = |b: &Broker| {
        let xdg = b.dir.path().join("xdg");
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .args(["status", "hello"])
            .env("XDG_RUNTIME_DIR", &xdg)
            .env_remove("FLEETCTL_ENDPOINT")
            .env_remove("FLEETCTL_CLUSTER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("fleetctl");
        assert!(out.success());
        t.elapsed()
    };
    let ssh = |jump: bool| {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F").arg(&cfg);
        if jump {
            cmd.arg("-J")
                .arg(format!("root@{}:{}", m.tunnel.ip, m.tunnel.port));
        }
        cmd.arg("-p")
            .arg(m.m1.port.to_string())
            .arg(&m.m1.ip)
            .arg("systemctl \"status\" \"-l\" \"hello.service\"")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let t = Instant::now();
        let out = cmd.status().expect("ssh");
        assert!(out.success(), "ssh failed");
        t.elapsed()
    };
    fleetctl(&broker);
    fleetctl(&off);
    ssh(true);
    ssh(false);
    let mut samples = vec![Vec::new(); 4];
    // A new random order every round: in a fixed one the broker always ran right after a
    // fresh `ssh`, whose sshd was still tearing its session down.
    let mut order: Vec<usize> = (0..4).collect();
    for _ in 0..runs {
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::thread_rng());
        for &i in &order {
            samples[i].push(match i {
                0 => fleetctl(&broker),
                1 => fleetctl(&off),
                2 => ssh(true),
                _ => ssh(false),
            });
        }
    }
    let medians: Vec<Duration> = samples.into_iter().map(median).collect();
    println!();
    println!("status on a machine, whole process, median of {runs} runs, interleaved");
    println!("{:<52} {:>10}", "command", "ms");
    for (label, d) in [
        "fleetctl status UNIT (warm broker)",
        "fleetctl status UNIT (warm, interactive_session off)",
        "ssh -J tunnel machine systemctl status",
        "ssh machine systemctl status (no jump)",
    ]
    .iter()
    .zip(&medians)
    {
        println!("{label:<52} {:>10.2}", ms(*d));
    }
    println!(
        "ssh -J / fleetctl: {:.1}x   ssh (no jump) / fleetctl: {:.1}x",
        medians[2].as_secs_f64() / medians[0].as_secs_f64(),
        medians[3].as_secs_f64() / medians[0].as_secs_f64()
    );
}

/// Sessions on a machine through a warm broker against the fair peer: warm OpenSSH
/// ControlMasters, one to the tunnel host and one to the machine through it (`ProxyCommand
/// ssh -S tunnel -W`), opened before timing, each holding a terminal session as the tuned
/// API forward does (without one, sshd's Nagle delays put ~40 ms on `status`). `status`, `journal --lines 10`, `ssh MACHINE
/// true` and a 1 MiB `ssh MACHINE cat`, whole processes, medians of 21 runs, all of them
/// in a new random order each round;
/// aes256-gcm on every hop of both sides; every output checked, a short or wrong one fails
/// the benchmark.
fn master_sessions(link_rtt: Option<u64>) {
    let runs = 21;
    let m = machines_with_hello();
    // Over a link, broker and masters alike dial the tunnel host through a delaying relay,
    // pinned by the same key at the relay's address.
    let relay = link_rtt.map(|rtt| link::DelayRelay::start(&m.tunnel, rtt));
    let (tunnel_ip, tunnel_port) = match &relay {
        Some(r) => {
            r.pin(&m.tunnel, &m.known_hosts);
            ("127.0.0.1".to_string(), r.addr.port())
        }
        None => (m.tunnel.ip.clone(), m.tunnel.port),
    };
    let journal: String = (1..=30)
        .map(|i| format!("c{i}\tDec 04 10:00:{i:02} m1 hello[1]: line {i}\n"))
        .collect();
    std::fs::write(m.stubs[1].path().join("journal"), &journal).expect("journal");
    let want_journal: String = (21..=30)
        .map(|i| format!("Dec 04 10:00:{i:02} m1 hello[1]: line {i}\n"))
        .collect();
    let broker = Broker::start(
        &m.config("")
            .replace(&m.tunnel.tunnel(), &format!("{tunnel_ip}:{tunnel_port}")),
        Some(&m.agent.socket),
    );
    let dir = open_tempdir("fb-master.");
    let payload: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let payload_path = dir.path().join("payload");
    std::fs::write(&payload_path, &payload).expect("payload");
    let cfg = dir.path().join("ssh_config");
    write_ssh_config(&m, &cfg, &format!("  Ciphers {CIPHER}\n"));
    let tunnel_ctl = dir.path().join("tunnel.ctl");
    let machine_ctl = dir.path().join("m1.ctl");
    let check = |ctl: &Path, host: &str| {
        Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .arg("-S")
            .arg(ctl)
            .args(["-O", "check", host])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let master = |ctl: &Path, extra: &[String], port: u16, host: &str| {
        let child = Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args(["-M", "-tt", "-S"])
            .arg(ctl)
            .args(extra)
            .arg("-p")
            .arg(port.to_string())
            .arg(host)
            .arg("sleep 3700")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh master");
        let child = Ssh(child);
        wait_until("an OpenSSH master", DEADLINE, || check(ctl, host));
        child
    };
    let _tunnel_master = master(&tunnel_ctl, &[], tunnel_port, &tunnel_ip);
    let proxy = format!(
        "ProxyCommand=ssh -F {} -S {} -W %h:%p -p {} {}",
        cfg.display(),
        tunnel_ctl.display(),
        tunnel_port,
        tunnel_ip
    );
    let _machine_master = master(&machine_ctl, &["-o".into(), proxy], m.m1.port, &m.m1.ip);
    let xdg = broker.dir.path().join("xdg");
    let ours = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .args(args)
            .env("XDG_RUNTIME_DIR", &xdg)
            .env_remove("FLEETCTL_ENDPOINT")
            .env_remove("FLEETCTL_CLUSTER")
            .stdin(Stdio::null())
            .output()
            .expect("fleetctl")
    };
    let theirs = |command: &str| {
        Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .arg("-S")
            .arg(&machine_ctl)
            .arg("-p")
            .arg(m.m1.port.to_string())
            .arg(&m.m1.ip)
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .expect("ssh")
    };
    if hold(
        if link_rtt.is_some() {
            "master-link"
        } else {
            "master"
        },
        &[
            ("broker's XDG_RUNTIME_DIR", xdg.clone()),
            ("OpenSSH's config", cfg.clone()),
            ("the machine's ControlMaster socket", machine_ctl.clone()),
        ],
    ) {
        return;
    }
    let cat = format!("cat {}", payload_path.display());
    let rows: Vec<(&str, Vec<String>, String)> = vec![
        (
            "status UNIT",
            vec!["status".into(), "hello".into()],
            "systemctl 'status' '-l' '--' 'hello.service'".into(),
        ),
        (
            "journal --lines 10 UNIT",
            vec![
                "journal".into(),
                "--lines".into(),
                "10".into(),
                "hello".into(),
            ],
            "journalctl '--unit=hello.service' '--no-pager' '-n' '10' '--output' 'short'".into(),
        ),
        (
            "ssh MACHINE true",
            vec!["ssh".into(), M1.into(), "true".into()],
            "true".into(),
        ),
        (
            "ssh MACHINE cat (1 MiB)",
            vec!["ssh".into(), M1.into(), cat.clone()],
            cat.clone(),
        ),
    ];
    // What each row must print.
    let expect = |row: usize, out: &std::process::Output| -> bool {
        out.status.success()
            && match row {
                0 => String::from_utf8_lossy(&out.stdout).contains("stub unit on m1"),
                1 => out.stdout == want_journal.as_bytes(),
                2 => out.stdout.is_empty(),
                _ => out.stdout == payload,
            }
    };
    let mut samples: Vec<[Vec<Duration>; 2]> = vec![[Vec::new(), Vec::new()]; rows.len()];
    let mut failures = 0;
    // Every run of every row, ours and theirs, in a new random order each round.
    let mut order: Vec<(usize, bool)> = (0..rows.len())
        .flat_map(|i| [(i, true), (i, false)])
        .collect();
    for round in 0..=runs {
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::thread_rng());
        for &(i, broker_side) in &order {
            let (label, args, command) = &rows[i];
            let t = Instant::now();
            let out = if broker_side {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ours(&args)
            } else {
                theirs(command)
            };
            let took = t.elapsed();
            if !expect(i, &out) {
                failures += 1;
                let who = if broker_side {
                    "fleetctl"
                } else {
                    "ssh -S master"
                };
                println!("master: FAILED: {who} {label}: {out:?}");
            }
            // The first round warms both sides and is not counted.
            if round > 0 {
                samples[i][usize::from(!broker_side)].push(took);
            }
        }
    }
    println!();
    let link = link_rtt.map_or_else(String::new, |rtt| {
        format!(", round trip {rtt} ms to the tunnel host (a delaying relay)")
    });
    println!(
        "sessions on a machine: warm broker vs warm OpenSSH ControlMasters (tunnel, and machine via -W; -tt), aes256-gcm on every hop{link}, whole process, median of {runs} runs in a random order"
    );
    println!(
        "{:<28} {:>12} {:>16} {:>8}",
        "command", "broker ms", "ControlMaster ms", "ratio"
    );
    for ((label, _, _), [a, b]) in rows.iter().zip(samples) {
        let (a, b) = (median(a), median(b));
        println!(
            "{label:<28} {:>12.2} {:>16.2} {:>7.2}x",
            ms(a),
            ms(b),
            a.as_secs_f64() / b.as_secs_f64()
        );
    }
    if failures > 0 {
        println!("master: {failures} runs failed");
        std::process::exit(1);
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Whole-process wall time of `fleetctl list-units` (30 units, then 1 000 over fleetd's
/// 100-unit pages): through the warm broker, the same binary straight on the simulator
/// socket (`FLEETCTL_ENDPOINT`) and through the tuned OpenSSH forward of the first block (the
/// fair peer: one SSH hop, as the broker's); against a new `ssh host true` (what every
/// original `fleetctl --tunnel` command pays at least once). A fourth path names the
/// broker's cluster socket as the endpoint: the proxy alone, without the lookup of the only
/// cluster on the control socket that a bare `fleetctl list-units` makes first.
/// 60 runs: a run's time varies by 10-20 % (the simulator computes every page under one
/// lock, beside the client and the proxy on two cores), and with 20 the medians moved by
/// more than the differences measured.
fn whole_process(w: &World, broker: &Broker, tuned: &Path) {
    let runs = 60;
    let xdg = broker.dir.path().join("xdg");
    let key = w.keys.path().join("id_ed25519");
    let direct = format!("unix://{}", w.sim.socket.display());
    let forwarded = format!("unix://{}", tuned.display());
    let named = format!("unix://{}", broker.socket("c1").display());
    // Every run's listing is checked: the header and one row per unit.
    let fleetctl = |endpoint: Option<&str>, units: usize| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
        cmd.arg("list-units")
            .env("XDG_RUNTIME_DIR", &xdg)
            .env_remove("FLEETCTL_ENDPOINT")
            .env_remove("FLEETCTL_CLUSTER")
            .stdout(Stdio::piped());
        if let Some(e) = endpoint {
            cmd.env("FLEETCTL_ENDPOINT", e);
        }
        let t = Instant::now();
        let out = cmd.output().expect("fleetctl");
        let took = t.elapsed();
        assert!(out.status.success(), "fleetctl list-units via {endpoint:?}");
        let rows = out.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        assert_eq!(
            rows.count(),
            units + 1,
            "fleetctl list-units via {endpoint:?}: every unit listed"
        );
        took
    };
    let ssh = || {
        let t = Instant::now();
        let out = Command::new("ssh")
            .arg("-i")
            .arg(&key)
            .arg("-p")
            .arg(w.sshd.port.to_string())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", w.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentityAgent=none",
            ])
            .arg(format!("root@{}", w.sshd.ip))
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("ssh");
        assert!(out.success());
        t.elapsed()
    };
    let (mut hello, mut first) = (Vec::new(), true);
    for count in [30, 1000] {
        {
            let mut sim = w.sim.sim.lock().expect("sim");
            sim.clear_units();
            sim.put_many(
                (0..count)
                    .map(|i| {
                        (
                            format!("u{i:04}.service"),
                            vec![opt("Service", "ExecStart", "/bin/sleep 1000")],
                            "launched".to_string(),
                        )
                    })
                    .collect(),
            );
        }
        let (mut a, mut b, mut c, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        fleetctl(None, count);
        fleetctl(Some(&direct), count);
        fleetctl(Some(&forwarded), count);
        fleetctl(Some(&named), count);
        if first {
            ssh();
        }
        // A new order every round: in a fixed one the broker always ran right after the
        // fresh `ssh` (200 ms of another process's work) and took 0.7 ms more for it.
        let mut order: Vec<usize> = if first {
            vec![0, 1, 2, 3, 4]
        } else {
            vec![0, 1, 2, 4]
        };
        for _ in 0..runs {
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::thread_rng());
            for &i in &order {
                match i {
                    0 => a.push(fleetctl(None, count)),
                    1 => b.push(fleetctl(Some(&direct), count)),
                    2 => c.push(fleetctl(Some(&forwarded), count)),
                    4 => d.push(fleetctl(Some(&named), count)),
                    _ => hello.push(ssh()),
                }
            }
        }
        let (ma, mb, mc, md) = (median(a), median(b), median(c), median(d));
        println!();
        println!(
            "fleetctl list-units, {count} units, whole process, median of {runs} runs in a random order"
        );
        println!("{:<44} {:>10}", "command", "ms");
        println!(
            "{:<44} {:>10.2}",
            "fleetctl list-units (warm broker)",
            ms(ma)
        );
        println!(
            "{:<44} {:>10.2}",
            "fleetctl list-units (simulator socket)",
            ms(mb)
        );
        println!(
            "{:<44} {:>10.2}",
            "fleetctl list-units (OpenSSH -tt -L, tuned)",
            ms(mc)
        );
        println!(
            "{:<44} {:>10.2}",
            "fleetctl list-units (broker socket named)",
            ms(md)
        );
        println!(
            "broker / simulator socket: {:.3}x   tuned OpenSSH forward / simulator socket: {:.3}x   broker socket named / simulator socket: {:.3}x",
            ma.as_secs_f64() / mb.as_secs_f64(),
            mc.as_secs_f64() / mb.as_secs_f64(),
            md.as_secs_f64() / mb.as_secs_f64()
        );
        if first {
            let mh = median(std::mem::take(&mut hello));
            println!("{:<44} {:>10.2}", "ssh -i KEY host true (OpenSSH)", ms(mh));
            println!(
                "ssh / fleetctl: {:.1}x",
                mh.as_secs_f64() / ma.as_secs_f64()
            );
        }
        first = false;
    }
    w.sim.sim.lock().expect("sim").clear_units();
}
