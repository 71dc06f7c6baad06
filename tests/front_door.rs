//! The front door, with real OpenSSH clients standing in for the original fleetctl: the
//! fleet API through `fleetctl fd-forward` and `direct-streamlocal`, a machine through
//! `ssh -J`, and the refusals (another key, another command, another address, another user).

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use support::*;

struct Env {
    m: Machines,
    b: Broker,
    port: u16,
    /// The original fleetctl's known_hosts, with the front door pinned by `trust`.
    pins: PathBuf,
    /// An ssh_config for clients of the front door (pins, agent, batch mode).
    ssh_config: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn env() -> Env {
    let m = Machines::new();
    m.sim.put(
        "hello.service",
        vec![
            opt("Service", "ExecStart", "/bin/sleep 1000"),
            opt("X-Fleet", "MachineID", M1),
        ],
        "launched",
    );
    let port = free_port();
    let b = m.broker(&format!("front_door = \"127.0.0.1:{port}\"\n"));
    // The cluster works, so the front door is bound.
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    let pins = b.dir.path().join("fleetctl_known_hosts");
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args(["trust", "c1", "--front-door", "--known-hosts-file"])
        .arg(&pins)
        .env("FLEET_BROKER_CONFIG", b.dir.path().join("config.toml"))
        .env("XDG_STATE_HOME", b.dir.path().join("state"))
        .output()
        .expect("trust");
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("[127.0.0.1]:{port}")), "{said}");
    let ssh_config = b.dir.path().join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!(
            "Host *\n  UserKnownHostsFile {} {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  IdentityAgent {}\n  User core\n  ConnectTimeout 10\n",
            pins.display(),
            m.known_hosts.display(),
            m.agent.socket.display()
        ),
    )
    .expect("ssh_config");
    Env {
        m,
        b,
        port,
        pins,
        ssh_config,
    }
}

impl Env {
    fn ssh(&self) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&self.ssh_config)
            .arg("-p")
            .arg(self.port.to_string());
        c
    }
}

fn run(mut c: Command, stdin: &[u8]) -> Output {
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("ssh");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
    child.wait_with_output().expect("ssh output")
}

/// Like the original fleetctl's HTTP over a session: the request is written and stdin stays
/// open; the session ends when the server has answered and closed.
fn run_keeping_stdin(mut c: Command, stdin: &[u8]) -> Output {
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("ssh");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("request");
    let out = std::thread::scope(|s| {
        let waiter = s.spawn(|| child.wait_with_output());
        let end = std::time::Instant::now() + DEADLINE;
        while !waiter.is_finished() && std::time::Instant::now() < end {
            std::thread::park_timeout(std::time::Duration::from_millis(20));
        }
        let finished = waiter.is_finished();
        drop(input);
        let out = waiter.join().expect("join").expect("ssh output");
        assert!(finished, "the session did not end by itself: {out:?}");
        out
    });
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const GET_MACHINES: &[u8] =
    b"GET /fleet/v1/machines HTTP/1.1\r\nHost: domain-sock\r\nConnection: close\r\n\r\n";

#[test]
fn fd_forward_carries_the_fleet_api_and_other_commands_are_refused() {
    let e = env();
    let want = text(&http(&e.m.sim.socket, "GET", "/fleet/v1/machines", None).1);
    // The path the cluster is configured with, and the original's default path.
    for path in [
        e.m.sim.socket.display().to_string(),
        "/var/run/fleet.sock".to_string(),
    ] {
        let mut c = e.ssh();
        c.arg("127.0.0.1")
            .arg(format!("fleetctl fd-forward {path}"));
        let out = run_keeping_stdin(c, GET_MACHINES);
        assert!(out.status.success(), "{path}: {out:?}");
        let body = text(&out.stdout);
        assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body} {out:?}");
        // Go's chunked framing may wrap the JSON; the machines are all there.
        for id in [M1, M2] {
            assert!(body.contains(id), "{body}");
        }
        assert!(body.contains(&want[..20]), "{body}");
    }
    for (cmd, what) in [
        ("uptime", "a command"),
        ("fleetctl fd-forward /etc/passwd", "another socket"),
        (
            "fleetctl fd-forward /var/run/fleet.sock; id",
            "a shell trick",
        ),
    ] {
        let mut c = e.ssh();
        c.arg("127.0.0.1").arg(cmd);
        let out = run(c, b"");
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        assert!(
            text(&out.stderr).contains("fleet-broker front door: only `fleetctl fd-forward`"),
            "{what}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{what}");
    }
    // No shell.
    let mut c = e.ssh();
    c.arg("-T").arg("127.0.0.1");
    let out = run(c, b"id\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("no shell here"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn streamlocal_forwarding_reaches_only_the_fleet_socket() {
    let e = env();
    let local = e.b.dir.path().join("fwd.sock");
    let mut c = e.ssh();
    c.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("{}:/var/run/fleet.sock", local.display()))
        .arg("127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("ssh -L");
    wait_until("the forwarded socket", DEADLINE, || local.exists());
    let got = http(&local, "GET", "/fleet/v1/machines", None);
    let want = http(&e.m.sim.socket, "GET", "/fleet/v1/machines", None);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, want);
    // Another socket path: the channel is refused, so the request fails.
    let other = e.b.dir.path().join("other.sock");
    let mut c = e.ssh();
    c.args(["-N", "-L"])
        .arg(format!(
            "{}:{}",
            other.display(),
            e.b.socket("c1").display()
        ))
        .arg("127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("ssh -L");
    wait_until("the second forwarded socket", DEADLINE, || other.exists());
    let refused = try_http(&other, "GET", "/fleet/v1/machines", None);
    let _ = child.kill();
    let _ = child.wait();
    assert!(refused.is_err() || refused.is_ok_and(|r| r.0 != 200));
}

#[test]
fn ssh_jump_through_the_front_door_reaches_a_machine_and_nothing_else() {
    let e = env();
    let jump = format!("127.0.0.1:{}", e.port);
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(&e.ssh_config)
        .arg("-J")
        .arg(&jump)
        .arg("-p")
        .arg(e.m.m1.port.to_string())
        .arg(format!("root@{}", e.m.m1.ip))
        .arg("systemctl status -l -- hello.service");
    let out = run(c, b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        "* hello.service - stub unit on m1\n   Active: active (running)\n"
    );
    assert_eq!(e.m.argv_log(1), "systemctl status -l -- hello.service\n");
    // Not a machine, or a machine on another port: refused by the front door.
    for (host, port) in [
        ("127.0.0.1".to_string(), e.m.tunnel.port),
        (e.m.m1.ip.clone(), 80),
    ] {
        let mut c = e.ssh();
        c.arg("-W").arg(format!("{host}:{port}")).arg("127.0.0.1");
        let out = run(c, b"");
        assert_eq!(out.status.code(), Some(255), "{host}:{port}: {out:?}");
        assert!(
            text(&out.stderr).contains("administratively prohibited"),
            "{host}:{port}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn only_the_users_keys_and_the_users_connections_get_in() {
    let e = env();
    let other_keys = open_tempdir("fb-other.");
    let other = keygen(other_keys.path(), "id_ed25519", "ed25519");
    let mut c = e.ssh();
    c.args(["-o", "IdentityAgent=none", "-o", "IdentitiesOnly=yes", "-i"])
        .arg(&other)
        .arg("127.0.0.1")
        .arg("fleetctl fd-forward /var/run/fleet.sock");
    let out = run(c, GET_MACHINES);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(
        text(&out.stderr).contains("Permission denied (publickey)"),
        "{}",
        text(&out.stderr)
    );
    // The same client as another local user: closed before the handshake.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ssh"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentityAgent=none",
            "-p",
        ])
        .arg(e.port.to_string())
        .arg("127.0.0.1")
        .arg("true")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .expect("setpriv ssh");
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("Connection closed") || err.contains("Connection reset"),
        "{err}"
    );
    wait_until("the refusal in the log", DEADLINE, || {
        e.b.log().contains("front door: refused a connection")
            && e.b.log().contains("uid 65534 is not the broker's uid")
    });
}

/// The host key is made once and survives a restart; the pin stays valid.
#[test]
fn the_front_door_key_is_kept_and_pinned_once() {
    let e = env();
    let key =
        e.b.dir
            .path()
            .join("state/fleet-broker/front_door_ed25519_key");
    let meta = std::fs::metadata(&key).expect("host key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(&key).expect("key");
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args(["trust", "c1", "--front-door", "--known-hosts-file"])
        .arg(&e.pins)
        .env("FLEET_BROKER_CONFIG", e.b.dir.path().join("config.toml"))
        .env("XDG_STATE_HOME", e.b.dir.path().join("state"))
        .output()
        .expect("trust");
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("already pinned"), "{out:?}");
    assert_eq!(std::fs::read(&key).expect("key"), before);
    assert_eq!(
        std::fs::read_to_string(&e.pins)
            .expect("pins")
            .lines()
            .count(),
        1
    );
}

/// A reload that restarts the cluster gives its front door back on the same port.
#[test]
fn a_reload_that_restarts_the_cluster_keeps_the_front_door() {
    let e = env();
    let cfg = e.b.dir.path().join("config.toml");
    let before = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, format!("{before}keepalive_interval = \"7s\"\n")).expect("config");
    let out = e.b.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("1 restarted"),
        "{}",
        text(&out.stdout)
    );
    let mut c = e.ssh();
    c.arg("127.0.0.1")
        .arg("fleetctl fd-forward /var/run/fleet.sock");
    let out = run_keeping_stdin(c, GET_MACHINES);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).starts_with("HTTP/1.1 200 OK\r\n"),
        "{out:?}"
    );
}
