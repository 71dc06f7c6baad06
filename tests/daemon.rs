//! Daemon behaviour around the tunnel: authentication errors, stale and live sockets, the
//! status command, the demo, and the shipped example config.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use support::*;

fn error_message(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("fleet error json");
    v["error"]["message"].as_str().expect("message").to_string()
}

#[test]
fn missing_agent_is_a_clear_error() {
    let w = World::new();
    let b = Broker::start(&w.config(""), None);
    let (status, body) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(status, 503);
    let msg = error_message(&body);
    assert!(msg.contains("SSH_AUTH_SOCK is not set"), "{msg}");
    assert!(msg.contains("ssh-add"), "{msg}");
    assert_eq!(b.cluster_info("c1")["state"], "failed");
}

#[test]
fn empty_agent_is_a_clear_error() {
    let w = World::new();
    let empty = Agent::start(&[]);
    let b = Broker::start(&w.config("connect_timeout = \"2s\""), Some(&empty.socket));
    let (status, body) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(status, 503);
    let msg = error_message(&body);
    assert!(msg.contains("offers no keys"), "{msg}");
    assert!(msg.contains("add your key with `ssh-add`"), "{msg}");
}

#[test]
fn refused_key_names_user_and_keys_tried() {
    let w = World::new();
    let stranger = keygen(w.keys.path(), "stranger", "ed25519");
    let agent = Agent::start(&[&stranger]);
    let b = Broker::start(&w.config(""), Some(&agent.socket));
    let (status, body) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(status, 503);
    let msg = error_message(&body);
    assert!(msg.contains("refused every key for user \"root\""), "{msg}");
    assert!(msg.contains("SHA256:"), "{msg}");
    assert!(msg.contains("authorized_keys"), "{msg}");
}

#[test]
fn identity_file_authenticates_without_an_agent() {
    let w = World::new();
    let key = w.keys.path().join("id_ed25519");
    // Readable by others: refused as OpenSSH refuses it, and nothing is offered.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let b = Broker::start(
        &w.config(&format!("identity_files = [\"{}\"]", key.display())),
        None,
    );
    let (status, body) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(status, 503);
    let msg = error_message(&body);
    assert!(msg.contains("UNPROTECTED PRIVATE KEY FILE"), "{msg}");
    assert!(msg.contains("chmod 600"), "{msg}");
    assert!(!w.sshd.log().contains("Accepted publickey"));
    drop(b);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let b = Broker::start(
        &w.config(&format!("identity_files = [\"{}\"]", key.display())),
        None,
    );
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200,
        "{}",
        b.log()
    );
}

#[test]
fn agent_key_matching_identity_file_is_offered_first() {
    let w = World::new();
    // An agent full of other keys: sshd's MaxAuthTries (6) would stop us before the right one.
    let mut keys = Vec::new();
    for i in 0..7 {
        keys.push(keygen(w.keys.path(), &format!("other{i}"), "ed25519"));
    }
    let right = w.keys.path().join("id_ed25519");
    keys.push(right.clone());
    let refs: Vec<&std::path::Path> = keys.iter().map(|k| k.as_path()).collect();
    let agent = Agent::start(&refs);
    let b = Broker::start(
        &w.config(&format!("identity_files = [\"{}\"]", right.display())),
        Some(&agent.socket),
    );
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200,
        "{}",
        b.log()
    );
    let log = w.sshd.log();
    assert!(
        !log.contains("Failed publickey"),
        "only the matching key was offered:\n{log}"
    );
}

#[test]
fn stale_socket_is_replaced_but_a_live_daemon_is_not_displaced() {
    let w = World::new();
    let b = w.broker("");
    // A second daemon with the same runtime dir must refuse to start.
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("serve")
        .env("FLEET_BROKER_CONFIG", b.dir.path().join("config.toml"))
        .env("XDG_RUNTIME_DIR", b.dir.path().join("xdg"))
        .stdin(Stdio::null())
        .output()
        .expect("second daemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another fleet-broker is already serving"),
        "{err}"
    );
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );

    // A socket file nobody serves (a crashed daemon's) is replaced.
    let dir = open_tempdir("fb-stale.");
    let xdg = dir.path().join("xdg");
    let run = xdg.join("fleet-broker");
    std::fs::create_dir_all(run.join("clusters")).expect("mkdir");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let stale = run.join("clusters").join("c1.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, w.config("")).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("serve")
        .env("FLEET_BROKER_CONFIG", &cfg)
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("SSH_AUTH_SOCK", &w.agent.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon");
    wait_until("the replaced socket to serve", DEADLINE, || {
        try_http(&stale, "GET", "/fleet/v1/machines", None).is_ok_and(|r| r.0 == 200)
    });
    let _ = child.kill();
    let _ = child.wait();
}

/// `fleet-broker serve` with `XDG_RUNTIME_DIR=xdg`, which must fail; returns its stderr.
fn serve_must_fail(w: &World, dir: &std::path::Path, xdg: &std::path::Path) -> String {
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, w.config("")).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("serve")
        .env("FLEET_BROKER_CONFIG", &cfg)
        .env("XDG_RUNTIME_DIR", xdg)
        .stdin(Stdio::null())
        .output()
        .expect("daemon");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn symlinked_runtime_dir_is_refused() {
    let w = World::new();
    let dir = open_tempdir("fb-link.");
    let real = dir.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).expect("mkdir");
    std::os::unix::fs::symlink(&real, xdg.join("fleet-broker")).expect("symlink");
    let err = serve_must_fail(&w, dir.path(), &xdg);
    assert!(err.contains("is a symlink"), "{err}");
    assert!(
        std::fs::read_dir(&real).expect("read").next().is_none(),
        "nothing was created behind the link"
    );
}

#[test]
fn runtime_dir_owned_by_another_user_is_refused_not_taken_over() {
    let w = World::new();
    let dir = open_tempdir("fb-foreign.");
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).expect("mkdir");
    let planted = xdg.join("fleet-broker");
    std::fs::create_dir(&planted).expect("mkdir");
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    nix::unistd::chown(&planted, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let err = serve_must_fail(&w, dir.path(), &xdg);
    assert!(err.contains("is owned by uid 65534"), "{err}");
    let meta = std::fs::metadata(&planted).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o777, 0o777, "not chmod-ed");
    assert!(
        std::fs::read_dir(&planted).expect("read").next().is_none(),
        "nothing was created in it"
    );
}

#[test]
fn status_prints_a_table_and_json() {
    let w = World::new();
    let b = w.broker("");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    let out = b.cli(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("CLUSTER"), "{table}");
    assert!(
        lines[1].starts_with("c1 ") && lines[1].contains(" ready "),
        "{table}"
    );
    assert!(lines[1].contains(&w.sshd.tunnel()), "{table}");
    let out = b.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let c = &v["clusters"][0];
    assert_eq!(c["name"], "c1");
    assert_eq!(c["state"], "ready");
    assert_eq!(c["user"], "root");
    assert_eq!(c["requests"], 1);
    assert!(c["bytes_in"].as_u64().unwrap_or(0) > 100, "{c}");
    assert!(c["latency_p50_ms"].as_f64().is_some(), "{c}");
    assert!(c["connected_since"].as_str().is_some(), "{c}");
    assert!(c["socket"]
        .as_str()
        .unwrap_or("")
        .ends_with("clusters/c1.sock"));

    let (status, body) = http(&b.control_socket(), "GET", "/metrics", None);
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&body);
    assert!(metrics.contains("# TYPE fleet_broker_requests_total counter\nfleet_broker_requests_total{cluster=\"c1\"} 1\n"), "{metrics}");
    assert!(
        metrics.contains("fleet_broker_tunnel_up{cluster=\"c1\"} 1\n"),
        "{metrics}"
    );

    // disconnect and connect through the control socket.
    let out = b.cli(&["disconnect", "c1"]);
    assert!(out.status.success());
    // The answer tells the state after the disconnect, not before.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "c1: idle\n");
    assert_eq!(b.cluster_info("c1")["state"], "idle");
    // --config cannot change what the running daemon uses: refused, not ignored.
    let out = b.cli(&["--config", "/nonexistent.toml", "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not apply to `fleet-broker status`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = b.cli(&["connect", "c1"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("c1: ready"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = b.cli(&["connect", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cluster named \"nope\""));
}

#[test]
fn status_without_a_daemon_says_how_to_start_one() {
    let dir = open_tempdir("fb-nodaemon.");
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("status")
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .expect("status");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fleet-broker serve"));
}

#[test]
fn eager_cluster_connects_at_start() {
    let w = World::new();
    let b = w.broker("connect = \"eager\"");
    wait_until("eager connect", DEADLINE, || {
        b.cluster_info("c1")["state"] == "ready"
    });
    assert_eq!(b.cluster_info("c1")["requests"], 0);
}

#[test]
fn read_only_cluster_refuses_writes() {
    let w = World::new();
    let b = w.broker("read_only = true");
    let (status, body) = http(&b.socket("c1"), "DELETE", "/fleet/v1/units/x.service", None);
    assert_eq!(status, 403);
    assert!(error_message(&body).contains("read-only"));
    // Methods are case-sensitive on the wire; any spelling that is not GET/HEAD stays out.
    for method in ["put", "Delete", "PROPFIND", "OPTIONS"] {
        let (status, _) = http(
            &b.socket("c1"),
            method,
            "/fleet/v1/units/x.service",
            Some("{}"),
        );
        assert_eq!(status, 403, "{method}");
    }
    assert_eq!(http(&b.socket("c1"), "GET", "/fleet/v1/units", None).0, 200);
    assert_eq!(
        b.cluster_info("c1")["requests"],
        1,
        "only the GET went upstream"
    );
}

/// One answer read off a kept-alive connection: status, headers (lower-cased names) and the
/// body as framed by its head (none for HEAD).
fn read_answer(
    r: &mut std::io::BufReader<std::os::unix::net::UnixStream>,
    head_request: bool,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::{BufRead, Read};
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').expect("header line");
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if head_request {
    } else if get("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).expect("chunk");
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        let n: usize = get("content-length")
            .expect("length")
            .parse()
            .expect("number");
        body.resize(n, 0);
        r.read_exact(&mut body).expect("body");
    }
    (status, headers, body)
}

#[test]
fn one_kept_connection_takes_reads_on_the_short_path_and_the_rest_through_the_policy() {
    use std::io::Write;
    let w = World::new();
    w.sim.put(
        "kept.service",
        vec![opt("Service", "ExecStart", "/bin/true")],
        "inactive",
    );
    let b = w.broker("read_only = true");
    wait_until_served(&b, "the read-only cluster");
    let before = b.cluster_info("c1")["requests"].as_u64().expect("count");
    let mut s = std::os::unix::net::UnixStream::connect(b.socket("c1")).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
    let machines = http(&w.sim.socket, "GET", "/fleet/v1/machines", None).1;
    let units = http(&w.sim.socket, "GET", "/fleet/v1/units", None).1;
    // Two reads in one write, then a HEAD: each answer framed apart, in order.
    s.write_all(b"GET /fleet/v1/machines HTTP/1.1\r\nHost: x\r\n\r\nGET /fleet/v1/units HTTP/1.1\r\nHost: x\r\nConnection: x-drop\r\nX-Drop: 1\r\n\r\nHEAD /fleet/v1/machines HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let (status, headers, body) = read_answer(&mut r, false);
    assert_eq!((status, &body), (200, &machines));
    assert!(
        headers.iter().all(|(k, _)| k != "fleet-broker-error"),
        "{headers:?}"
    );
    let (status, _, body) = read_answer(&mut r, false);
    assert_eq!((status, &body), (200, &units));
    let (status, _, body) = read_answer(&mut r, true);
    assert_eq!((status, body.len()), (405, 0), "the simulator has no HEAD");
    // A read with a body goes to hyper, which frames it: the DELETE inside it is the GET's
    // body, never a request of its own.
    let smuggled = "DELETE /fleet/v1/units/kept.service HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(
        format!(
            "GET /fleet/v1/machines HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        )
        .as_bytes(),
    )
    .expect("write");
    let (status, _, body) = read_answer(&mut r, false);
    assert_eq!((status, &body), (200, &machines));
    // The same connection, now served by hyper: the policy still holds.
    s.write_all(b"DELETE /fleet/v1/units/kept.service HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let (status, _, body) = read_answer(&mut r, false);
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    s.write_all(b"GET /fleet/v1/units HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let (status, headers, body) = read_answer(&mut r, false);
    assert_eq!((status, &body), (200, &units));
    assert!(
        headers.contains(&("connection".into(), "close".into())),
        "{headers:?}"
    );
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut rest).expect("closed after the answer");
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(
        http(&w.sim.socket, "GET", "/fleet/v1/units/kept.service", None).0,
        200,
        "the unit is still there"
    );
    assert_eq!(
        b.cluster_info("c1")["requests"].as_u64().expect("count") - before,
        5,
        "five requests went upstream: three reads, the HEAD and the read with a body"
    );
}

#[test]
fn connect_is_answered_405_and_never_forwarded() {
    let w = World::new();
    let b = w.broker("");
    let (status, body) = http(&b.socket("c1"), "CONNECT", "fleet:80", None);
    assert_eq!(status, 405);
    assert!(error_message(&body).contains("CONNECT"), "{body:?}");
    assert_eq!(b.cluster_info("c1")["requests"], 0);
}

#[test]
fn demo_once_shows_the_machines_through_the_broker() {
    let xdg = open_tempdir("fb-demo-once.");
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args(["demo", "--once"])
        .env("XDG_RUNTIME_DIR", xdg.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("export FLEETCTL_ENDPOINT=unix://"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"primaryIP\":\"172.17.8.102\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("113f16a7...\t172.17.8.103\taz=us-west-1b,role=web"),
        "{stdout}"
    );
    // A unit's status, run on its simulated machine through the daemon's nested SSH.
    assert!(
        stdout.contains(
            "$ fleetctl --cluster demo status hello.service\n● hello.service - Hello World\n"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("without --once"), "{stdout}");
}

#[test]
fn example_config_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("check-config")
        .arg("--config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"))
        .output()
        .expect("check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[clusters.prod]\ntunnel = \"bastion.example.com:22\""),
        "{stdout}"
    );
    assert!(stdout.contains("user = \"elroy\""), "{stdout}");
    assert!(
        stdout.contains("[clusters.staging]\ntunnel = \"[2001:db8::10]:2222\""),
        "{stdout}"
    );
}

fn check_config(cfg: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("check-config")
        .arg("--config")
        .arg(cfg)
        .output()
        .expect("check-config")
}

#[test]
fn bad_config_names_file_line_and_column() {
    let dir = open_tempdir("fb-badcfg.");
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        "[clusters.a]\ntunnel = \"h\"\nconnect = \"sometimes\"\n",
    )
    .expect("write");
    let out = check_config(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3:11:", cfg.display())), "{err}");
    assert!(err.contains("sometimes"), "{err}");
    // Valid, but files missing: said, and the file is still OK.
    std::fs::write(
        &cfg,
        format!(
            "[clusters.a]\ntunnel = \"h\"\nidentity_files = [\"{d}/nope\"]\nknown_hosts = [\"{d}/none\"]\n",
            d = dir.path().display()
        ),
    )
    .expect("write");
    let out = check_config(&cfg);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("identity file") && err.contains("nope does not exist"),
        "{err}"
    );
    assert!(err.contains("fleet-broker trust a"), "{err}");
    // No clusters: how to add the first.
    std::fs::write(&cfg, "[defaults]\nuser = \"core\"\n").expect("write");
    let out = check_config(&cfg);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("fleet-broker import vagrant"),
        "{out:?}"
    );
}

#[test]
fn reload_keeps_unchanged_tunnels_and_rejects_bad_files_whole() {
    let w = World::new();
    let b = w.broker("");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    let since = b.cluster_info("c1")["connected_since"].clone();
    assert!(since.is_string());
    let cfg = b.dir.path().join("config.toml");
    let second = cluster_toml(
        "c2",
        &w.sshd,
        &format!("unix://{}", w.sim.socket.display()),
        "root",
        &w.known_hosts,
        "",
    );
    std::fs::write(&cfg, format!("{}{second}", w.config(""))).expect("config");
    let out = b.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "reloaded: 1 unchanged, 0 restarted, 1 added, 0 removed\n"
    );
    assert_eq!(
        b.cluster_info("c1")["connected_since"],
        since,
        "c1 kept its connection"
    );
    assert_eq!(
        http(&b.socket("c2"), "GET", "/fleet/v1/machines", None).0,
        200
    );

    // A bad file changes nothing.
    std::fs::write(&cfg, "[clusters.c1]\ntunnel = \"h\"\nbogus = 1\n").expect("config");
    let out = b.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:1: unknown field `bogus`", cfg.display())),
        "{err}"
    );
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    assert_eq!(
        http(&b.socket("c2"), "GET", "/fleet/v1/machines", None).0,
        200
    );

    // SIGHUP: c1 removed, c2 kept.
    std::fs::write(&cfg, second).expect("config");
    let pid = nix::unistd::Pid::from_raw(b.pid().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    wait_until("c1 to be removed", DEADLINE, || !b.socket("c1").exists());
    assert_eq!(
        http(&b.socket("c2"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    let names: Vec<String> = {
        let (_, body) = http(&b.control_socket(), "GET", "/v1/clusters", None);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        v["clusters"]
            .as_array()
            .expect("list")
            .iter()
            .map(|c| c["name"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(names, vec!["c2".to_string()]);
}

#[test]
fn status_exits_non_zero_while_a_cluster_is_down() {
    let mut w = World::new();
    let b = w.broker("connect_timeout = \"1s\"");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    assert!(b.cli(&["status"]).status.success());
    w.sshd.kill();
    // The next request finds the tunnel gone; the supervisor leaves `ready`.
    let _ = try_http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    wait_until("the cluster to be down", DEADLINE, || {
        b.cluster_info("c1")["state"] != "ready"
    });
    let out = b.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("CLUSTER"),
        "the table is still printed: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not ready: c1"),
        "{out:?}"
    );
}

/// `status --watch`: redrawn in place on a terminal, frames appended elsewhere, one JSON line
/// per refresh with `--json`, bounded by `--count`, and the last refresh decides the exit.
#[test]
fn status_watch_refreshes_in_place_on_a_terminal_and_appends_elsewhere() {
    let mut w = World::new();
    let b = w.broker("connect_timeout = \"1s\"");
    let out = b.cli(&["status", "--watch", "0.1", "--count", "3", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line per refresh"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines.iter().all(|l| l["clusters"][0]["name"] == "c1"),
        "{text}"
    );
    // On a terminal (script(1) gives it one): cleared and redrawn each time.
    let bin = env!("CARGO_BIN_EXE_fleet-broker");
    let tty = Command::new("script")
        .args([
            "-qec",
            &format!("{bin} status --watch 0.1 --count 2"),
            "/dev/null",
        ])
        .env("FLEET_BROKER_CONFIG", b.dir.path().join("config.toml"))
        .env("XDG_RUNTIME_DIR", b.dir.path().join("xdg"))
        .stdin(Stdio::null())
        .output()
        .expect("script");
    assert!(tty.status.success(), "{tty:?}");
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert_eq!(screen.matches("\x1b[H\x1b[2J").count(), 2, "{screen:?}");
    assert_eq!(screen.matches("Every 0.1s: fleet-broker status").count(), 2);
    // A cluster going down shows, and decides the exit status.
    w.sshd.kill();
    let _ = try_http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    wait_until("the cluster to be down", DEADLINE, || {
        let s = b.cluster_info("c1")["state"].clone();
        s != "ready" && s != "idle"
    });
    let out = b.cli(&["status", "--watch", "0.1", "--count", "2"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("Every 0.1s: fleet-broker status").count(),
        2,
        "{text}"
    );
    assert!(!text.contains('\x1b'), "no escapes into a pipe: {text:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not ready: c1"),
        "{out:?}"
    );
    // Nonsense periods are refused before anything runs.
    let out = b.cli(&["status", "--watch", "0"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("between 0.1 and 86400"),
        "{out:?}"
    );
}

/// What `install-service --socket` writes passes `systemd-analyze verify` (unit syntax, the
/// binary path, the man pages of Documentation=) and its sandbox rates OK in `systemd-analyze
/// security`; the user manager is asked to reload and enable the socket (a stub systemctl on
/// PATH records it: no user manager runs here).
#[test]
fn installed_units_verify_and_the_sandbox_rates_ok() {
    let bin = env!("CARGO_BIN_EXE_fleet-broker");
    let home = open_tempdir("fb-units.");
    let stubs = home.path().join("bin");
    std::fs::create_dir(&stubs).expect("stubs");
    let calls = home.path().join("systemctl.log");
    let stub = stubs.join("systemctl");
    std::fs::write(
        &stub,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
    )
    .expect("stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        stubs.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(bin)
        .args(["install-service", "--socket"])
        .env("XDG_CONFIG_HOME", home.path())
        .env("PATH", &path)
        .output()
        .expect("install-service");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(&calls).expect("systemctl called"),
        "--user daemon-reload\n--user enable --now fleet-broker.socket\n"
    );
    let units = home.path().join("systemd/user");
    let man = home.path().join("man");
    let out = Command::new(bin)
        .arg("man")
        .arg(man.join("man1"))
        .output()
        .expect("man");
    assert!(out.status.success(), "{out:?}");
    let xdg = home.path().join("xdg");
    std::fs::create_dir(&xdg).expect("xdg");
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--user"])
        .arg(units.join("fleet-broker.socket"))
        .arg(units.join("fleet-broker.service"))
        .env("MANPATH", &man)
        .env("XDG_RUNTIME_DIR", &xdg)
        .output()
        .expect("systemd-analyze verify");
    assert!(verify.status.success(), "{verify:?}");
    assert!(verify.stderr.is_empty(), "{verify:?}");
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--user", "--threshold=30"])
        .arg(units.join("fleet-broker.service"))
        .env("XDG_RUNTIME_DIR", &xdg)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    assert!(security.status.success(), "exposure above 3.0: {text}");
    assert!(
        text.lines().any(
            |l| l.starts_with("→ Overall exposure level for fleet-broker.service: ")
                && l.contains(" OK")
        ),
        "{text}"
    );
}

#[test]
fn completions_parse_and_man_pages_render() {
    let bin = env!("CARGO_BIN_EXE_fleet-broker");
    for (shell, fleetctl) in [
        ("bash", false),
        ("bash", true),
        ("zsh", false),
        ("fish", true),
    ] {
        let mut cmd = Command::new(bin);
        cmd.args(["completions", shell]);
        if fleetctl {
            cmd.arg("--fleetctl");
        }
        let out = cmd.output().expect("completions");
        assert!(out.status.success(), "{out:?}");
        let script = String::from_utf8_lossy(&out.stdout).into_owned();
        let name = if fleetctl { "fleetctl" } else { "fleet-broker" };
        assert!(script.contains(name), "{shell}: {script}");
        if shell == "bash" {
            let dir = open_tempdir("fb-compl.");
            let f = dir.path().join("c.bash");
            std::fs::write(&f, &script).expect("write");
            let check = Command::new("bash")
                .arg("-n")
                .arg(&f)
                .output()
                .expect("bash -n");
            assert!(check.status.success(), "bash -n: {check:?}");
        }
    }
    let dir = open_tempdir("fb-man.");
    let out = Command::new(bin)
        .arg("man")
        .arg(dir.path())
        .output()
        .expect("man");
    assert!(out.status.success(), "{out:?}");
    for page in [
        "fleet-broker.1",
        "fleetctl.1",
        "fleet-broker-import.1",
        "fleetctl-list-units.1",
    ] {
        let out = Command::new("man")
            .arg("-l")
            .arg(dir.path().join(page))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .expect("man -l");
        assert!(out.status.success(), "{page}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("NAME") && text.contains("SYNOPSIS"),
            "{page}: {text}"
        );
    }
}

/// The service manager's side of `Type=notify`: a datagram socket the test binds as
/// `NOTIFY_SOCKET`, where systemd would.
#[test]
fn the_service_manager_is_told_ready_reloading_and_stopping_in_order() {
    let w = World::new();
    let dir = open_tempdir("fb-notify.");
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let next = || {
        let mut buf = [0u8; 4096];
        let n = sock
            .recv(&mut buf)
            .expect("a notification within the deadline");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut b = Broker::start_with_env(
        &w.config(""),
        Some(&w.agent.socket),
        &[("NOTIFY_SOCKET", &sock_path)],
    );
    let ready = next();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains(&format!("MAINPID={}", b.pid().expect("pid"))),
        "{ready}"
    );
    assert!(ready.contains("STATUS=1 cluster: 1 idle"), "{ready}");
    // Ready means every socket accepts.
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    let out = b.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(next(), "RELOADING=1\nSTATUS=reloading the config");
    assert_eq!(next(), "READY=1\nSTATUS=1 cluster: 1 ready");
    // A bad config: the reload fails visibly, the manager is told it is ready again.
    std::fs::write(b.dir.path().join("config.toml"), "[clusters.x]\n").expect("config");
    let out = b.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(next(), "RELOADING=1\nSTATUS=reloading the config");
    assert_eq!(
        next(),
        "READY=1\nSTATUS=1 cluster: 1 ready (last reload failed)"
    );
    assert!(b.terminate(), "clean exit");
    assert_eq!(next(), "STOPPING=1\nSTATUS=stopping");
}

fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// The same with the cluster socket named as the endpoint (`FLEETCTL_ENDPOINT`, no
/// `--cluster`): our fleetctl finds it missing, asks the control socket beside it, which
/// starts the daemon, and connects again.
#[test]
fn a_socket_activated_daemon_is_started_by_a_request_to_its_cluster_socket() {
    let w = World::new();
    let b = Broker::start_activated(&w.config(""), Some(&w.agent.socket), None);
    let pid = b.pid().expect("pid");
    assert!(!b.socket("c1").exists());
    let cwd = open_tempdir("fb-cli.");
    let endpoint = format!("unix://{}", b.socket("c1").display());
    let run = fleetctl(
        &b,
        cwd.path(),
        &[("FLEETCTL_ENDPOINT", endpoint.as_str())],
        &["list-machines", "--no-legend"],
    );
    assert_eq!(run.code, 0, "{run:?}\n{}", b.log());
    assert!(run.stdout.contains("172.17.8.101"), "{run:?}");
    assert!(exe_of(pid).ends_with("fleet-broker"), "{}", exe_of(pid));
}

/// Socket activation as `fleet-broker.socket` does it, with `systemd-socket-activate`: the
/// daemon is not running until the first request, which it then answers on the passed
/// socket; the socket outlives the daemon.
#[test]
fn a_socket_activated_daemon_answers_on_the_passed_control_socket() {
    let w = World::new();
    let mut b = Broker::start_activated(&w.config(""), Some(&w.agent.socket), None);
    let pid = b.pid().expect("pid");
    assert!(
        exe_of(pid).ends_with("systemd-socket-activate"),
        "nothing started before a request: {}",
        exe_of(pid)
    );
    assert!(!b.socket("c1").exists());
    // fleetctl finds no cluster socket, asks the control socket, which starts the daemon;
    // then its request is served.
    let cwd = open_tempdir("fb-cli.");
    let run = fleetctl(
        &b,
        cwd.path(),
        &[],
        &["--cluster", "c1", "list-machines", "--no-legend"],
    );
    assert_eq!(run.code, 0, "{run:?}\n{}", b.log());
    assert!(run.stdout.contains("172.17.8.101"), "{run:?}");
    assert!(exe_of(pid).ends_with("fleet-broker"), "{}", exe_of(pid));
    // The control socket is the passed one, answering.
    let out = b.cli(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}\n{}", b.log());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list["clusters"][0]["name"], "c1", "{list}");
    assert!(
        b.log()
            .contains("serving the control socket the service manager passed"),
        "{}",
        b.log()
    );
    let control = b.control_socket();
    assert!(b.terminate(), "clean exit; log:\n{}", b.log());
    assert!(
        std::fs::symlink_metadata(&control).is_ok(),
        "the manager's socket is left for the next start"
    );
}

/// A passed socket that is not this daemon's control socket is refused, naming the fix.
#[test]
fn a_passed_socket_at_another_path_is_refused_with_the_unit_line_to_fix() {
    let w = World::new();
    let other = open_tempdir("fb-activate.");
    let listen = other.path().join("elsewhere.sock");
    let mut b = Broker::start_activated(&w.config(""), Some(&w.agent.socket), Some(&listen));
    // Connecting starts the daemon, which refuses the socket and exits.
    let _ = std::os::unix::net::UnixStream::connect(&listen).expect("connect");
    wait_until("the daemon to give up", DEADLINE, || {
        b.log().contains("socket activation")
    });
    assert!(!b.terminate(), "exited with an error");
    let log = b.log();
    assert!(log.contains("elsewhere.sock"), "{log}");
    assert!(log.contains("set ListenStream="), "{log}");
    assert!(log.contains("control.sock"), "{log}");
}

#[test]
fn mutating_requests_are_audited_with_who_sent_them_and_reads_are_not() {
    let w = World::new();
    let b = w.broker("");
    let unit = r#"{"desiredState":"inactive","options":[{"section":"Service","name":"ExecStart","value":"/bin/true"}]}"#;
    assert_eq!(http(&b.socket("c1"), "GET", "/fleet/v1/units", None).0, 200);
    assert_eq!(
        http(
            &b.socket("c1"),
            "PUT",
            "/fleet/v1/units/audited.service",
            Some(unit)
        )
        .0,
        201
    );
    assert_eq!(
        http(
            &b.socket("c1"),
            "DELETE",
            "/fleet/v1/units/audited.service",
            None
        )
        .0,
        204
    );
    let log = b.dir.path().join("state/fleet-broker/audit.jsonl");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&log)
            .expect("audit log")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let me = std::env::current_exe().expect("exe");
    for (l, (method, status)) in lines.iter().zip([("PUT", 201), ("DELETE", 204)]) {
        assert_eq!(l["kind"], "api");
        assert_eq!(l["cluster"], "c1");
        assert_eq!(l["method"], method);
        assert_eq!(l["path"], "/fleet/v1/units/audited.service");
        assert_eq!(l["status"], status);
        assert_eq!(l["pid"], std::process::id());
        assert_eq!(l["uid"], nix::unistd::geteuid().as_raw());
        assert_eq!(l["exe"], me.display().to_string());
        assert!(l["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
    }
    assert!(
        !std::fs::read_to_string(&log)
            .expect("log")
            .contains("ExecStart"),
        "never bodies"
    );
    let out = b.cli(&["audit", "--since", "1h"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.contains("PUT /fleet/v1/units/audited.service -> 201"),
        "{text}"
    );
    let out = b.cli(&["audit", "--cluster", "other"]);
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn rust_log_keeps_russh_quiet_unless_asked_and_reports_an_invalid_filter() {
    let w = World::new();
    let debug = std::path::Path::new("debug");
    let b = Broker::start_with_env(&w.config(""), Some(&w.agent.socket), &[("RUST_LOG", debug)]);
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    let log = b.log();
    assert!(log.contains("DEBUG"), "our debug lines: {log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("russh")),
        "russh's debug only when asked: {log}"
    );
    drop(b);
    let bad = std::path::Path::new("fleet_broker=loud");
    let b = Broker::start_with_env(&w.config(""), Some(&w.agent.socket), &[("RUST_LOG", bad)]);
    wait_until("the warning", DEADLINE, || {
        b.log().contains("is not a valid log filter")
    });
    assert!(
        b.log().contains("RUST_LOG=\"fleet_broker=loud\""),
        "{}",
        b.log()
    );
}

#[test]
fn status_counts_attempts_and_shortens_long_errors_keeping_them_whole_in_json() {
    let w = World::new();
    let dir = open_tempdir("fb-nopins.");
    let empty = dir.path().join("known_hosts");
    std::fs::write(&empty, "").expect("pins");
    let b = Broker::start(
        &cluster_toml(
            "c1",
            &w.sshd,
            &format!("unix://{}", w.sim.socket.display()),
            "root",
            &empty,
            "",
        ),
        Some(&w.agent.socket),
    );
    // The unpinned host: refused, the cluster waits for `trust`.
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        503
    );
    let out = b.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains(" ATTEMPTS ")),
        "{table}"
    );
    assert!(table.contains("… (whole text: status --json)"), "{table}");
    let out = b.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let c = &v["clusters"][0];
    assert!(
        c["connect_attempts"].as_u64().is_some_and(|n| n >= 1),
        "{c}"
    );
    let whole = c["last_error"].as_str().expect("last_error");
    assert!(
        whole.chars().count() > 100 && whole.contains("fleet-broker trust c1"),
        "{whole}"
    );
    let (_, metrics) = http(&b.control_socket(), "GET", "/metrics", None);
    assert!(
        String::from_utf8_lossy(&metrics)
            .contains("fleet_broker_connect_attempts_total{cluster=\"c1\"} "),
        "metric"
    );
}

#[test]
fn install_service_writes_the_unit_with_this_binary() {
    let bin = env!("CARGO_BIN_EXE_fleet-broker");
    let home = open_tempdir("fb-unit.");
    let out = Command::new(bin)
        .args(["install-service", "--dry-run"])
        .env("XDG_CONFIG_HOME", home.path())
        .output()
        .expect("install-service");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("ExecStart={bin} serve\n")), "{text}");
    assert!(
        text.contains(&format!("ExecReload={bin} reload\n")),
        "{text}"
    );
    assert!(text.contains("Type=notify\n"), "{text}");
    assert!(
        text.contains("# would run: systemctl --user enable --now fleet-broker"),
        "{text}"
    );
    let dest = home.path().join("systemd/user/fleet-broker.service");
    assert!(!dest.exists(), "a dry run writes nothing");
    // With --socket: the socket unit too, and the socket is what gets enabled.
    let out = Command::new(bin)
        .args(["install-service", "--dry-run", "--socket"])
        .env("XDG_CONFIG_HOME", home.path())
        .output()
        .expect("install-service");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fleet-broker.socket:\n"), "{text}");
    assert!(
        text.contains("ListenStream=%t/fleet-broker/control.sock\nFileDescriptorName=control\n"),
        "{text}"
    );
    assert!(
        text.contains("# would run: systemctl --user enable --now fleet-broker.socket\n"),
        "{text}"
    );
    // For real: the unit is written, and systemctl (a stub on PATH: one that fails as it
    // does without a user manager, then one that works) is run; its failure is named with
    // what to do.
    let stubs = open_tempdir("fb-systemctl.");
    let stub = stubs.path().join("systemctl");
    let path = format!("{}:/usr/bin:/bin", stubs.path().display());
    let install = || {
        Command::new(bin)
            .arg("install-service")
            .env("XDG_CONFIG_HOME", home.path())
            .env("PATH", &path)
            .output()
            .expect("install-service")
    };
    std::fs::write(
        &stub,
        "#!/bin/sh\necho \"$*\" >> \"$(dirname \"$0\")/argv\"\necho 'Failed to connect to bus: No medium found' >&2\nexit 1\n",
    )
    .expect("stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = install();
    let written = std::fs::read_to_string(&dest).expect("unit written");
    assert!(
        written.contains(&format!("ExecStart={bin} serve\n")),
        "{written}"
    );
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed: Failed to connect to bus: No medium found")
            && err.contains("loginctl enable-linger"),
        "{err}"
    );
    std::fs::write(
        &stub,
        "#!/bin/sh\necho \"$*\" >> \"$(dirname \"$0\")/argv\"\n",
    )
    .expect("stub");
    let out = install();
    assert!(out.status.success(), "{out:?}");
    let ran = std::fs::read_to_string(stubs.path().join("argv")).expect("argv");
    assert!(
        ran.lines().any(|l| l == "--user enable --now fleet-broker"),
        "{ran}"
    );
}

/// One journald native-protocol datagram as field → value (`KEY=value\n`, or `KEY\n`, a
/// little-endian u64 length, the bytes and `\n`).
fn journal_fields(mut d: &[u8]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            d = &d[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &d[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("length")) as usize;
            out.insert(key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned());
            d = &rest[8 + len + 1..];
        }
    }
    out
}

/// Under journald (`JOURNAL_STREAM` names stderr) every event is a native journal entry with
/// its priority and fields, the cluster among them, and nothing goes to stderr. journald's
/// socket has a fixed path: a private mount namespace puts the test's socket there for the
/// daemon alone.
#[test]
fn under_journald_logs_are_native_entries_with_priorities_and_the_cluster_as_a_field() {
    use std::os::unix::fs::MetadataExt;
    let dir = open_tempdir("fb-journal.");
    let journal = dir.path().join("journal.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&journal).expect("bind");
    sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[clusters.c1]\ntunnel = \"127.0.0.1:1\"\n").expect("config");
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).expect("xdg");
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr");
    let meta = std::fs::metadata(&stderr_path).expect("stat");
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && ln -s \"$1\" /run/systemd/journal/socket && shift && exec \"$@\"")
        .arg("sh")
        .arg(&journal)
        .arg(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("serve")
        .env("FLEET_BROKER_CONFIG", &cfg)
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("unshare");
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            kill_child(self.0);
        }
    }
    let child = Reap(&mut child);
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Until the daemon says it is ready: a bounded number of entries within the deadline.
    for _ in 0..100 {
        let n = sock.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "no journal entry within the deadline ({e}); stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            )
        });
        if n == 0 {
            continue;
        }
        let fields = journal_fields(&buf[..n]);
        let done = fields
            .get("MESSAGE")
            .is_some_and(|m| m == "fleet-broker ready");
        entries.push(fields);
        if done {
            break;
        }
    }
    let find = |msg: &str| {
        entries
            .iter()
            .find(|e| e.get("MESSAGE").is_some_and(|m| m.contains(msg)))
            .unwrap_or_else(|| panic!("no entry {msg:?} in {entries:#?}"))
    };
    let serving = find("serving cluster socket");
    assert_eq!(serving["CLUSTER"], "c1", "{serving:?}");
    assert_eq!(serving["PRIORITY"], "6", "{serving:?}");
    assert_eq!(serving["SYSLOG_IDENTIFIER"], "fleet-broker", "{serving:?}");
    assert!(serving["SOCKET"].ends_with("c1.sock"), "{serving:?}");
    let warning = find("SSH_AUTH_SOCK is not set");
    assert_eq!(warning["PRIORITY"], "4", "{warning:?}");
    assert!(!warning.contains_key("CLUSTER"), "{warning:?}");
    drop(child);
    let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        !text.contains("serving cluster socket"),
        "not on stderr too: {text}"
    );
}

/// A configured audit log in a shared directory that another user planted (theirs, or a
/// symlink, or writable by others) is refused with the reason, and nothing is appended to
/// it or through it.
#[test]
fn an_audit_log_someone_else_could_read_or_forge_is_refused() {
    let w = World::new();
    let shared = open_tempdir("fb-shared.");
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod");
    let theirs = shared.path().join("theirs.jsonl");
    std::fs::write(&theirs, "").expect("plant");
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let target = shared.path().join("target");
    std::fs::write(&target, "").expect("target");
    let link = shared.path().join("link.jsonl");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let open = shared.path().join("open.jsonl");
    std::fs::write(&open, "").expect("open");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    for (file, why) in [
        (&theirs, "is owned by uid 65534"),
        (&link, "is a symlink"),
        (&open, "is writable by group or others (mode 666)"),
    ] {
        let dir = open_tempdir("fb-audit.");
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!("audit_log = \"{}\"\n{}", file.display(), w.config("")),
        )
        .expect("config");
        let xdg = dir.path().join("xdg");
        std::fs::create_dir(&xdg).expect("xdg");
        std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
            .arg("serve")
            .env("FLEET_BROKER_CONFIG", &cfg)
            .env("XDG_RUNTIME_DIR", &xdg)
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("daemon");
        // It must stop by itself; one that serves is killed and the test fails.
        let end = std::time::Instant::now() + DEADLINE;
        while child.try_wait().expect("wait").is_none() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if child.try_wait().expect("wait").is_none() {
            kill_child(&mut child);
        }
        let out = child.wait_with_output().expect("daemon");
        assert!(!out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&file.display().to_string()) && err.contains(why),
            "{why}: {err}"
        );
    }
    for f in [&theirs, &target, &open] {
        assert_eq!(std::fs::read(f).expect("read"), b"", "{}", f.display());
    }
}

/// A binary installed under a path with `%` and a space gets a unit systemd reads back as
/// that path (`systemd-analyze verify` finds the binary: an unescaped `%n` would expand to
/// the unit's name); a symlink planted at the unit's path is refused and its target left
/// alone.
#[test]
fn install_service_escapes_the_binary_path_and_never_writes_through_a_symlink() {
    let home = open_tempdir("fb-unit.");
    let odd = home.path().join("50%n off");
    std::fs::create_dir(&odd).expect("dir");
    let bin = odd.join("fleet-broker");
    let cp = Command::new("cp")
        .arg(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg(&bin)
        .status()
        .expect("cp");
    assert!(cp.success());
    let stubs = home.path().join("bin");
    std::fs::create_dir(&stubs).expect("stubs");
    let stub = stubs.join("systemctl");
    std::fs::write(&stub, "#!/bin/sh\nexit 0\n").expect("stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        stubs.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let units = home.path().join("systemd/user");
    std::fs::create_dir_all(&units).expect("units");
    let target = home.path().join("elsewhere");
    std::fs::write(&target, "keep\n").expect("target");
    std::os::unix::fs::symlink(&target, units.join("fleet-broker.service")).expect("symlink");
    let install = || {
        Command::new(&bin)
            .arg("install-service")
            .env("XDG_CONFIG_HOME", home.path())
            .env("PATH", &path)
            .output()
            .expect("install-service")
    };
    let out = install();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is a symlink"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&target).expect("target"), "keep\n");
    std::fs::remove_file(units.join("fleet-broker.service")).expect("rm");
    let out = install();
    assert!(out.status.success(), "{out:?}");
    let unit = std::fs::read_to_string(units.join("fleet-broker.service")).expect("unit");
    let word = format!("\"{}\"", bin.display().to_string().replace('%', "%%"));
    assert!(
        unit.contains(&format!("ExecStart={word} serve\n")),
        "{unit}"
    );
    let xdg = home.path().join("xdg");
    std::fs::create_dir(&xdg).expect("xdg");
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--user", "--man=no"])
        .arg(units.join("fleet-broker.service"))
        .env("XDG_RUNTIME_DIR", &xdg)
        .output()
        .expect("systemd-analyze verify");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{said}");
    assert!(!said.contains("fleet-broker.service:"), "{said}");
}

/// `fleet-broker prompt`: the shell's cluster (from `FLEETCTL_CLUSTER`, or the cluster
/// socket `FLEETCTL_ENDPOINT` names) and its state from the control socket; nothing without
/// a cluster; `?` when no daemon answers.
#[test]
fn prompt_shows_the_shells_cluster_and_its_state() {
    let w = World::new();
    let b = w.broker("connect = \"eager\"");
    wait_until("eager connect", DEADLINE, || {
        b.cluster_info("c1")["state"] == "ready"
    });
    let xdg = b.runtime_dir.parent().expect("xdg").to_path_buf();
    let prompt = |env: &[(&str, String)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleet-broker"));
        cmd.arg("prompt")
            .args(args)
            .env("XDG_RUNTIME_DIR", &xdg)
            .env_remove("FLEETCTL_CLUSTER")
            .env_remove("FLEETCTL_ENDPOINT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("prompt");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(prompt(&[], &[]), "");
    assert_eq!(
        prompt(&[("FLEETCTL_CLUSTER", "c1".into())], &[]),
        "c1:ready"
    );
    let endpoint = format!("unix://{}", b.socket("c1").display());
    assert_eq!(
        prompt(
            &[("FLEETCTL_ENDPOINT", endpoint.clone())],
            &["--format", "({cluster} is {state})"]
        ),
        "(c1 is ready)"
    );
    assert_eq!(
        prompt(&[("FLEETCTL_CLUSTER", "nope".into())], &[]),
        "nope:unknown"
    );
    // An endpoint that is not a broker's cluster socket: no cluster to show.
    assert_eq!(
        prompt(
            &[("FLEETCTL_ENDPOINT", "unix:///var/run/fleet.sock".into())],
            &[]
        ),
        ""
    );
    drop(b);
    assert_eq!(prompt(&[("FLEETCTL_ENDPOINT", endpoint)], &[]), "c1:?");
}

/// A guarded cluster (`guard = true`): our fleetctl changes it only when the user types the
/// cluster's name on the terminal (`script` gives it one) or names it with
/// `--confirm-cluster`; without a terminal it refuses, and the refusal is in the audit trail.
/// Reading commands and other clients of the socket are not held up.
#[test]
fn a_guarded_cluster_is_changed_only_when_its_name_is_confirmed() {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let w = World::new();
    let b = w.broker("guard = true");
    for u in ["one.service", "two.service", "three.service"] {
        w.sim.put(
            u,
            vec![opt("Service", "ExecStart", "/bin/true")],
            "inactive",
        );
    }
    let xdg = b.runtime_dir.parent().expect("xdg").to_path_buf();
    let fleetctl = env!("CARGO_BIN_EXE_fleetctl");
    // In a new session: no controlling terminal, whatever the test runner has.
    let run = |args: &[&str]| {
        let mut cmd = Command::new(fleetctl);
        cmd.args(["--cluster", "c1"])
            .args(args)
            .env("XDG_RUNTIME_DIR", &xdg)
            .env_remove("FLEETCTL_CLUSTER")
            .env_remove("FLEETCTL_ENDPOINT")
            .stdin(Stdio::null());
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        cmd.output().expect("fleetctl")
    };
    let exists = |u: &str| {
        http(
            &b.socket("c1"),
            "GET",
            &format!("/fleet/v1/units/{u}"),
            None,
        )
        .0 == 200
    };

    let out = run(&["destroy", "one.service"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains(
            "cluster \"c1\" is guarded: `fleetctl destroy` would change 1 unit there: one.service"
        ) && err.contains("pass --confirm-cluster c1"),
        "{err}"
    );
    assert!(exists("one.service"), "nothing changed without a terminal");
    let out = run(&["--confirm-cluster", "c2", "destroy", "one.service"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not name cluster \"c1\""));
    assert!(exists("one.service"));
    // Reading needs no confirmation.
    let out = run(&["list-unit-files"]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["--confirm-cluster", "c1", "destroy", "one.service"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!exists("one.service"));

    // On a terminal: the name typed decides.
    let on_terminal = |unit: &str, typed: &str| {
        let line = format!(
            "XDG_RUNTIME_DIR={} {fleetctl} --cluster c1 destroy {unit}",
            xdg.display()
        );
        let mut child = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env_remove("FLEETCTL_CLUSTER")
            .env_remove("FLEETCTL_ENDPOINT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{typed}\n").as_bytes())
            .expect("type");
        child.wait_with_output().expect("script")
    };
    let out = on_terminal("two.service", "c2");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("Type the cluster's name to go on:")
            && shown.contains("the name typed is not the cluster's"),
        "{shown}"
    );
    assert!(exists("two.service"));
    let out = on_terminal("two.service", "c1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!exists("two.service"));

    // Other clients of the socket are not held up.
    assert_eq!(
        http(
            &b.socket("c1"),
            "DELETE",
            "/fleet/v1/units/three.service",
            None
        )
        .0,
        204
    );
    // The refusals are on record, with the command and its units.
    let audit = String::from_utf8_lossy(&b.cli(&["audit"]).stdout).into_owned();
    let refused: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("not run on a guarded cluster"))
        .collect();
    assert_eq!(refused.len(), 3, "{audit}");
    assert!(
        refused[0].contains("fleetctl destroy one.service")
            && refused[0].contains("--confirm-cluster c1"),
        "{audit}"
    );
    // The prompt marks the cluster as guarded.
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("prompt")
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("FLEETCTL_CLUSTER", "c1")
        .env_remove("FLEETCTL_ENDPOINT")
        .output()
        .expect("prompt");
    assert_eq!(out.stdout, b"c1!:ready", "{out:?}");
}
