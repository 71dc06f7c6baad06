//! Latency of `GET /fleet/v1/machines` with a new local connection per request, in one run:
//! through fleet-broker, through OpenSSH `ssh -N -L` (what users configure), through OpenSSH
//! with a pty (`ssh -tt -L … sleep`, which makes OpenSSH set TCP_NODELAY), and directly on the
//! simulator socket (the floor). Paths are sampled in turn (A B C D A B …) after a warm-up.
//! `BENCH_N` sets the samples per path (default 200).

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

fn openssh_forward(w: &World, local: &Path, tuned: bool) -> Ssh {
    let mut cmd = Command::new("ssh");
    cmd.arg("-p")
        .arg(w.sshd.port.to_string())
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", w.known_hosts.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
        ])
        .arg("-o")
        .arg(format!("IdentityAgent={}", w.agent.socket.display()))
        .arg("-L")
        .arg(format!("{}:{}", local.display(), w.sim.socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if tuned {
        cmd.arg("-tt")
            .arg(format!("root@{}", w.sshd.ip))
            .arg("sleep 600");
    } else {
        cmd.arg("-N").arg(format!("root@{}", w.sshd.ip));
    }
    let child = Ssh(cmd.spawn().expect("ssh"));
    wait_until("ssh -L socket", DEADLINE, || {
        try_http(local, "GET", "/fleet/v1/machines", None).is_ok_and(|r| r.0 == 200)
    });
    child
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
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
    let want = http(&w.sim.socket, "GET", "/fleet/v1/machines", None);
    for (_, p) in &paths {
        for _ in 0..20 {
            assert_eq!(http(p, "GET", "/fleet/v1/machines", None), want);
        }
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); paths.len()];
    for _ in 0..n {
        for (i, (_, p)) in paths.iter().enumerate() {
            let t = Instant::now();
            let r = http(p, "GET", "/fleet/v1/machines", None);
            samples[i].push(t.elapsed());
            assert_eq!(r.0, 200);
        }
    }
    println!("GET /fleet/v1/machines, new local connection per request, {n} samples per path, interleaved");
    println!("{:<30} {:>10} {:>10}", "path", "p50 ms", "p99 ms");
    let mut stats = Vec::new();
    for (i, (name, _)) in paths.iter().enumerate() {
        let mut s = samples[i].clone();
        s.sort();
        let (p50, p99) = (percentile(&s, 0.5), percentile(&s, 0.99));
        println!("{name:<30} {:>10.3} {:>10.3}", ms(p50), ms(p99));
        stats.push((p50, p99));
    }
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
    whole_process(&w, &broker);
    load(&broker);
    drop(broker);
    idle_rss(&w);
    status_vs_jump();
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

/// `fleetctl status UNIT` through a warm broker against the same command through two fresh
/// OpenSSH hops (`ssh -J tunnel machine`), medians of 20 whole-process runs.
fn status_vs_jump() {
    let runs = 20;
    let m = Machines::new();
    m.sim.put(
        "hello.service",
        vec![
            opt("Service", "ExecStart", "/bin/sleep 1000"),
            opt("X-Fleet", "MachineID", M1),
        ],
        "launched",
    );
    let broker = m.broker("");
    let xdg = broker.dir.path().join("xdg");
    let cfg = m.keys.path().join("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host *\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  IdentityAgent {}\n  User root\n",
            m.known_hosts.display(),
            m.agent.socket.display()
        ),
    )
    .expect("ssh_config");
    let fleetctl = || {
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
    let jump = || {
        let t = Instant::now();
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .arg("-J")
            .arg(format!("root@{}:{}", m.tunnel.ip, m.tunnel.port))
            .arg("-p")
            .arg(m.m1.port.to_string())
            .arg(&m.m1.ip)
            .arg("systemctl \"status\" \"-l\" \"hello.service\"")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("ssh -J");
        assert!(out.success(), "ssh -J failed");
        t.elapsed()
    };
    fleetctl();
    jump();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        a.push(fleetctl());
        b.push(jump());
    }
    let (ma, mb) = (median(a), median(b));
    println!();
    println!("status on a machine, whole process, median of {runs} runs, interleaved");
    println!("{:<40} {:>10}", "command", "ms");
    println!(
        "{:<40} {:>10.2}",
        "fleetctl status UNIT (warm broker)",
        ms(ma)
    );
    println!(
        "{:<40} {:>10.2}",
        "ssh -J tunnel machine systemctl status",
        ms(mb)
    );
    println!(
        "ssh -J / fleetctl: {:.1}x",
        mb.as_secs_f64() / ma.as_secs_f64()
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Whole-process wall time: our `fleetctl list-units` through the warm broker against a new
/// `ssh host true` (what every original `fleetctl --tunnel` command pays at least once).
fn whole_process(w: &World, broker: &Broker) {
    let runs = 20;
    let xdg = broker.dir.path().join("xdg");
    let key = w.keys.path().join("id_ed25519");
    let fleetctl = || {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .arg("list-units")
            .env("XDG_RUNTIME_DIR", &xdg)
            .env_remove("FLEETCTL_ENDPOINT")
            .env_remove("FLEETCTL_CLUSTER")
            .stdout(Stdio::null())
            .status()
            .expect("fleetctl");
        assert!(out.success());
        t.elapsed()
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
    let (mut a, mut b) = (Vec::new(), Vec::new());
    fleetctl();
    ssh();
    for _ in 0..runs {
        a.push(fleetctl());
        b.push(ssh());
    }
    let (ma, mb) = (median(a), median(b));
    println!();
    println!("whole process, median of {runs} runs, interleaved");
    println!("{:<40} {:>10}", "command", "ms");
    println!(
        "{:<40} {:>10.2}",
        "fleetctl list-units (warm broker)",
        ms(ma)
    );
    println!("{:<40} {:>10.2}", "ssh -i KEY host true (OpenSSH)", ms(mb));
    println!(
        "ssh / fleetctl: {:.1}x",
        mb.as_secs_f64() / ma.as_secs_f64()
    );
}
