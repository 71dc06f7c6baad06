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
    env_with("")
}

fn env_with(extra: &str) -> Env {
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
    let b = m.broker(&format!("front_door = \"127.0.0.1:{port}\"\n{extra}"));
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
    /// Waits until the log says that a connection of uid 65534 was refused.
    fn wait_for_the_refusal_of_uid_65534(&self) {
        wait_until("the refusal in the log", DEADLINE, || {
            let log = self.b.log();
            log.contains("front door: refused a connection")
                && log.contains("uid 65534 is not the broker's uid")
        });
    }

    /// Whether the simulated cluster has a unit of this name.
    fn has_unit(&self, name: &str) -> bool {
        self.m.sim.sim.lock().expect("sim").unit(name).is_some()
    }

    /// The audit trail's lines, parsed.
    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.b.dir.path().join("state/fleet-broker/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
            .collect()
    }

    /// `ssh -N -L LOCAL:/var/run/fleet.sock` through the door, once the local socket is
    /// there: its path and the ssh process.
    fn forward_fleet_socket(&self) -> (PathBuf, std::process::Child) {
        let local = self.b.dir.path().join("fwd.sock");
        let mut c = self.ssh();
        c.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
            .arg(format!("{}:/var/run/fleet.sock", local.display()))
            .arg("127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = c.spawn().expect("ssh -L");
        wait_until("the forwarded socket", DEADLINE, || local.exists());
        (local, child)
    }

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
    let (local, mut child) = e.forward_fleet_socket();
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
    e.wait_for_the_refusal_of_uid_65534();
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

/// A unit that runs a command on a machine, as an attacker would submit it.
fn put_unit_request(name: &str) -> Vec<u8> {
    let body = r#"{"desiredState":"launched","options":[{"section":"Service","name":"ExecStart","value":"/bin/sh -c id"}]}"#;
    format!(
        "PUT /fleet/v1/units/{name} HTTP/1.1\r\nHost: domain-sock\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `ssh` run as uid 65534 (another local user), with `key` (which that user holds too),
/// its TCP socket bound to `lo` with SO_BINDTODEVICE by socat.
fn ssh_as_another_user_bound_to_lo(port: u16, key: &std::path::Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "ssh",
        "-F",
        "/dev/null",
    ])
    .args([
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
    ])
    .args([
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "LogLevel=ERROR",
    ])
    .args(["-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", "-i"])
    .arg(key)
    .arg("-o")
    .arg("ProxyCommand=socat - TCP:127.0.0.1:%p,so-bindtodevice=lo")
    .arg("-p")
    .arg(port.to_string())
    .env("HOME", "/nonexistent");
    c
}

/// The bypass of the uid check: another user's socket bound to a device is not found by
/// the kernel's exact lookup. With a key the door accepts (a shared Vagrant-style key that
/// the other user holds too), that user must still be refused before the handshake.
#[test]
fn another_user_bound_to_a_device_is_refused_even_with_a_key_the_door_accepts() {
    let shared = open_tempdir("fb-shared.");
    let key = keygen(shared.path(), "shared", "ed25519");
    let authorized = shared.path().join("authorized_keys");
    std::fs::write(&authorized, public_line(&key)).expect("authorized_keys");
    for f in [key.clone(), key.with_extension("pub")] {
        nix::unistd::chown(&f, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    }
    let e = env_with(&format!(
        "front_door_authorized_keys = \"{}\"\n",
        authorized.display()
    ));
    // The key gets in from the broker's own user: it is a key the door accepts.
    let mut c = e.ssh();
    c.args(["-o", "IdentityAgent=none", "-o", "IdentitiesOnly=yes", "-i"])
        .arg(&key)
        .arg("127.0.0.1")
        .arg("fleetctl fd-forward /var/run/fleet.sock");
    let _ = std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    let own = run_keeping_stdin(c, GET_MACHINES);
    assert!(
        text(&own.stdout).starts_with("HTTP/1.1 200 OK"),
        "the shared key works for the broker's user: {own:?}"
    );
    for (what, args) in [
        (
            "fd-forward",
            vec!["127.0.0.1", "fleetctl fd-forward /var/run/fleet.sock"],
        ),
        ("-W to a machine", vec!["-W", "MACHINE", "127.0.0.1"]),
    ] {
        let mut c = ssh_as_another_user_bound_to_lo(e.port, &key);
        let target = format!("{}:{}", e.m.m1.ip, e.m.m1.port);
        c.args(
            args.iter()
                .map(|a| if *a == "MACHINE" { target.as_str() } else { a }),
        );
        let out = run(c, &put_unit_request("evil.service"));
        assert_eq!(out.status.code(), Some(255), "{what}: {out:?}");
        assert!(out.stdout.is_empty(), "{what}: {}", text(&out.stdout));
    }
    assert!(!e.has_unit("evil.service"));
    e.wait_for_the_refusal_of_uid_65534();
}

/// A client that connects and never authenticates is closed after the login grace time,
/// so such connections cannot pile up.
#[test]
fn a_connection_that_never_authenticates_is_closed() {
    use std::io::Read;
    let e = env();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", e.port)).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut seen = Vec::new();
    match s.read_to_end(&mut seen) {
        Ok(_) => {}
        Err(err) => assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset,
            "still open after {DEADLINE:?}: {err}"
        ),
    }
    assert!(text(&seen).starts_with("SSH-2.0-"), "{}", text(&seen));
}

/// 1 100 connections held open by another user, each socket bound to `lo`, against a
/// daemon allowed 1 024 descriptors: every door keeps serving, and the refusals cost a log
/// line a second, not one a connection.
#[test]
fn a_flood_of_device_bound_connections_from_another_user_leaves_every_door_serving() {
    let e = env();
    let pid = e.b.pid().expect("daemon pid");
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg("--nofile=1024:1024")
        .output()
        .expect("prlimit");
    assert!(out.status.success(), "{out:?}");
    let script = format!(
        r#"use Socket; $| = 1; my @s;
for my $i (1..1100) {{
  socket(my $fh, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
  setsockopt($fh, SOL_SOCKET, 25, "lo") or die "SO_BINDTODEVICE: $!";
  connect($fh, sockaddr_in({}, inet_aton("127.0.0.1"))) or die "connect $i: $!";
  push @s, $fh;
}}
print "open\n"; <STDIN>;"#,
        e.port
    );
    let started = std::time::Instant::now();
    let mut flood = Command::new("prlimit")
        .args([
            "--nofile=4096:4096",
            "--",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
        ])
        .args(["--clear-groups", "perl", "-e", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("perl");
    let lines = line_reader(flood.stdout.take().expect("stdout"));
    let opened = lines.recv_timeout(DEADLINE * 2);
    if opened.is_err() {
        kill_child(&mut flood);
        let out = flood.wait_with_output().expect("perl");
        panic!("the flood did not open its connections: {out:?}");
    }
    // While all of them are held: the cluster socket answers, and so does the door.
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    let api = try_http(&e.b.socket("c1"), "GET", "/fleet/v1/machines", None);
    let mut c = e.ssh();
    c.arg("127.0.0.1")
        .arg("fleetctl fd-forward /var/run/fleet.sock");
    let door = run_keeping_stdin(c, GET_MACHINES);
    drop(flood.stdin.take());
    let _ = flood.wait();
    let elapsed = started.elapsed();
    assert!(fds < 512, "the daemon holds {fds} descriptors");
    assert_eq!(api.map(|r| r.0).ok(), Some(200));
    assert!(
        text(&door.stdout).starts_with("HTTP/1.1 200 OK"),
        "{door:?}"
    );
    let log = e.b.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("front door: refused a connection"))
        .collect();
    eprintln!(
        "{} refusal lines in {elapsed:?}:\n{}",
        refusals.len(),
        refusals.join("\n")
    );
    assert!(!refusals.is_empty());
    assert!(
        refusals.len() as u64 <= elapsed.as_secs() + 2,
        "{} lines in {elapsed:?}",
        refusals.len()
    );
}

/// read_only holds at the front door as at the cluster socket: writes through fd-forward
/// and `ssh -L` are answered 403, a session to a machine is refused; all of it is audited.
#[test]
fn read_only_and_the_audit_hold_at_the_front_door() {
    let e = env_with("read_only = true\n");
    let mut c = e.ssh();
    c.arg("127.0.0.1")
        .arg("fleetctl fd-forward /var/run/fleet.sock");
    let out = run_keeping_stdin(c, &put_unit_request("evil.service"));
    let said = text(&out.stdout);
    assert!(said.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{out:?}");
    assert!(said.contains("read-only"), "{said}");
    // DELETE through a forwarded socket.
    let (local, mut child) = e.forward_fleet_socket();
    let deleted = try_http(&local, "DELETE", "/fleet/v1/units/hello.service", None);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(deleted.expect("DELETE").0, 403);
    assert!(e.has_unit("hello.service"));
    assert!(!e.has_unit("evil.service"));
    // A session to a machine.
    let mut c = e.ssh();
    c.arg("-W")
        .arg(format!("{}:{}", e.m.m1.ip, e.m.m1.port))
        .arg("127.0.0.1");
    let out = run(c, b"");
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(
        text(&out.stderr).contains("administratively prohibited"),
        "{}",
        text(&out.stderr)
    );
    let audit = e.audit();
    let find = |pred: &dyn Fn(&serde_json::Value) -> bool| audit.iter().find(|l| pred(l)).cloned();
    let put = find(&|l| l["method"] == "PUT").expect("the PUT is audited");
    assert_eq!(put["status"], 403);
    assert_eq!(put["path"], "/fleet/v1/units/evil.service");
    assert!(
        put["front_door_client"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{put}"
    );
    assert!(
        put["exe"].as_str().is_some_and(|x| x.ends_with("/ssh")),
        "{put}"
    );
    let delete = find(&|l| l["method"] == "DELETE").expect("the DELETE is audited");
    assert_eq!(delete["status"], 403);
    let fwd = find(&|l| l["kind"] == "forward").expect("the session is audited");
    assert_eq!(fwd["phase"], "refused");
    assert_eq!(fwd["status"], 403);
    assert_eq!(fwd["target"]["machine"], M1);
}

/// What arrives through the front door is on record: API writes with who sent them, and a
/// session to a machine at its start and its end.
#[test]
fn writes_and_sessions_through_the_front_door_are_audited() {
    let e = env();
    let mut c = e.ssh();
    c.arg("127.0.0.1")
        .arg("fleetctl fd-forward /var/run/fleet.sock");
    let out = run_keeping_stdin(c, &put_unit_request("new.service"));
    assert!(
        text(&out.stdout).starts_with("HTTP/1.1 201 Created\r\n"),
        "{out:?}"
    );
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(&e.ssh_config)
        .arg("-J")
        .arg(format!("127.0.0.1:{}", e.port))
        .arg("-p")
        .arg(e.m.m1.port.to_string())
        .arg(format!("root@{}", e.m.m1.ip))
        .arg("systemctl status -l -- hello.service");
    let out = run(c, b"");
    assert!(out.status.success(), "{out:?}");
    wait_until("the session's end in the audit", DEADLINE, || {
        e.audit()
            .iter()
            .any(|l| l["kind"] == "forward" && l["phase"] == "end")
    });
    let audit = e.audit();
    let put = audit.iter().find(|l| l["method"] == "PUT").expect("PUT");
    assert_eq!(put["status"], 201);
    assert_eq!(put["uid"], nix::unistd::geteuid().as_raw());
    let fwd: Vec<&serde_json::Value> = audit.iter().filter(|l| l["kind"] == "forward").collect();
    assert_eq!(fwd.len(), 2, "{fwd:?}");
    assert_eq!(fwd[0]["phase"], "start");
    assert_eq!(fwd[0]["session"], fwd[1]["session"]);
    assert_eq!(fwd[0]["target"]["machine"], M1);
    assert_eq!(fwd[0]["address"], format!("{}:{}", e.m.m1.ip, e.m.m1.port));
    assert!(
        fwd[1]["bytes_in"].as_u64().is_some_and(|n| n > 0),
        "{}",
        fwd[1]
    );
    assert!(
        fwd[1]["bytes_out"].as_u64().is_some_and(|n| n > 0),
        "{}",
        fwd[1]
    );
    assert!(
        fwd[0]["exe"].as_str().is_some_and(|x| x.ends_with("/ssh")),
        "{}",
        fwd[0]
    );
}

/// Another program holding a cluster's front door port fails that door only: both cluster
/// sockets serve, `status` names the taken port (and exits 1), and the door comes up by
/// itself once the port is free.
#[test]
fn a_squatted_port_fails_that_door_only_and_the_door_comes_up_when_it_is_free() {
    use std::io::Read;
    let m = Machines::new();
    let port = free_port();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).expect("squat");
    let config = format!(
        "{}{}",
        m.config(&format!("front_door = \"127.0.0.1:{port}\"\n")),
        cluster_toml(
            "c2",
            &m.tunnel,
            &format!("unix://{}", m.sim.socket.display()),
            "root",
            &m.known_hosts,
            ""
        )
    );
    let b = Broker::start(&config, Some(&m.agent.socket));
    for c in ["c1", "c2"] {
        assert_eq!(
            http(&b.socket(c), "GET", "/fleet/v1/machines", None).0,
            200,
            "{c}"
        );
    }
    let door = &b.cluster_info("c1")["front_door"];
    assert_eq!(door["listening"], false, "{door}");
    assert!(
        door["error"]
            .as_str()
            .is_some_and(|e| e.contains("taken by another program")),
        "{door}"
    );
    let status = b.cli(&["status"]);
    assert_eq!(status.status.code(), Some(1), "{status:?}");
    assert!(
        text(&status.stdout).contains(&format!("front door 127.0.0.1:{port}: the port is taken")),
        "{}",
        text(&status.stdout)
    );
    assert!(
        b.log().contains("the front door cannot listen"),
        "{}",
        b.log()
    );
    drop(squatter);
    wait_until("the door to listen", DEADLINE, || {
        b.cluster_info("c1")["front_door"]["listening"] == true
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut banner = [0u8; 8];
    s.read_exact(&mut banner).expect("banner");
    assert_eq!(&banner, b"SSH-2.0-");
    assert_eq!(b.cli(&["status"]).status.code(), Some(0));
}
