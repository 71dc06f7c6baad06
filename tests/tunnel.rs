//! The daemon end to end: a real sshd, a real ssh-agent, the simulator behind sshd, and the
//! real `fleet-broker serve` binary.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn machines_units_and_state_pass_through_byte_identical() {
    let w = World::new();
    w.sim.put(
        "hello.service",
        vec![
            opt("Unit", "Description", "Hello"),
            opt("Service", "ExecStart", "/bin/sleep 1000"),
        ],
        "launched",
    );
    w.sim.put(
        "web@.service",
        vec![opt("Service", "ExecStart", "/bin/true")],
        "inactive",
    );
    let b = w.broker("");
    let sock = b.socket("c1");
    for path in [
        "/fleet/v1/machines",
        "/fleet/v1/units",
        "/fleet/v1/state",
        "/fleet/v1/units/web%40.service",
        "/v1-alpha/units?alt=json",
        "/fleet/v1/units/nope.service",
        "/fleet/v1/machines/",
    ] {
        let through = http(&sock, "GET", path, None);
        let direct = http(&w.sim.socket, "GET", path, None);
        assert_eq!(through, direct, "{path}");
    }
    let (status, body) = http(&sock, "GET", "/fleet/v1/units", None);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"name\":\"hello.service\""));

    // curl, as a user would type it, gets the same bytes as the simulator itself gives.
    let out = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(&sock)
        .arg("http://x/fleet/v1/units")
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout,
        http(&w.sim.socket, "GET", "/fleet/v1/units", None).1
    );

    // Writes go through too, with fleet's status codes.
    let body = r#"{"name":"new.service","options":[{"name":"ExecStart","section":"Service","value":"/bin/true"}]}"#;
    assert_eq!(
        http(&sock, "PUT", "/fleet/v1/units/new.service", Some(body)).0,
        201
    );
    assert_eq!(
        http(
            &sock,
            "PUT",
            "/fleet/v1/units/new.service",
            Some(r#"{"desiredState":"launched"}"#)
        )
        .0,
        204
    );
    // The simulator moves as fleet does: the unit reads launched after a moment.
    wait_until("new.service to read launched", DEADLINE, || {
        let (status, body) = http(&sock, "GET", "/fleet/v1/units/new.service", None);
        status == 200 && String::from_utf8_lossy(&body).contains("\"currentState\":\"launched\"")
    });
    assert_eq!(
        http(&sock, "DELETE", "/fleet/v1/units/new.service", None).0,
        204
    );

    let info = b.cluster_info("c1");
    assert_eq!(info["state"], "ready");
    assert!(info["requests"].as_u64().unwrap_or(0) >= 10, "{info}");
    assert!(
        info["bytes_out"].as_u64().unwrap_or(0) >= 100,
        "request bodies are counted: {info}"
    );
    assert!(info["host_key_fingerprint"]
        .as_str()
        .unwrap_or("")
        .starts_with("SHA256:"));
}

#[test]
fn two_hundred_concurrent_requests_all_succeed() {
    let w = World::new();
    for i in 0..20 {
        w.sim.put(
            &format!("u{i}.service"),
            vec![opt("Service", "ExecStart", "/bin/true")],
            "launched",
        );
    }
    let b = w.broker("");
    let sock = b.socket("c1");
    let want = http(&w.sim.socket, "GET", "/fleet/v1/units", None);
    let handles: Vec<_> = (0..200)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || try_http(&sock, "GET", "/fleet/v1/units", None))
        })
        .collect();
    let mut ok = 0;
    for h in handles {
        let got = h.join().expect("thread").expect("request");
        assert_eq!(got, want);
        ok += 1;
    }
    assert_eq!(ok, 200);
    assert_eq!(
        w.sshd.log().matches("Accepted publickey").count(),
        1,
        "one SSH connection carries them all"
    );
}

/// Bursts of more concurrent requests than the pool keeps connections for: the ones it does
/// not keep are closed, and closed for good. Each channel the daemon closed first used to stay
/// in the SSH session for the life of the connection, its reader still waiting (the session
/// ignored sshd's answering CLOSE), and the daemon grew by a few kilobytes per request.
#[test]
fn upstream_connections_the_pool_does_not_keep_are_let_go() {
    let w = World::new();
    let b = w.broker("");
    let sock = b.socket("c1");
    wait_until_served(&b, "the cluster socket");
    for _ in 0..3 {
        concurrent_gets(&sock, 40, 5);
    }
    // The pool keeps 8 idle connections; the interactive session and the daemon's lookups
    // may hold a few channels more.
    let mut seen = u64::MAX;
    wait_until(
        "the channels beyond the pool's to be let go",
        Duration::from_secs(10),
        || {
            seen = b.metric("fleet_broker_channels");
            seen <= 12
        },
    );
    assert!(seen <= 12, "{seen} channels live");
}

#[test]
fn large_response_streams_through_intact() {
    let w = World::new();
    {
        let mut sim = w.sim.sim.lock().expect("sim");
        sim.token_limit = 5000;
        let big = "x".repeat(1500);
        sim.put_many(
            (0..4000)
                .map(|i| {
                    (
                        format!("big{i:05}.service"),
                        vec![opt("Service", "ExecStart", &format!("/bin/echo {big}"))],
                        "inactive".to_string(),
                    )
                })
                .collect(),
        );
    }
    let b = w.broker("");
    let direct = http(&w.sim.socket, "GET", "/fleet/v1/units", None);
    assert!(
        direct.1.len() > 6_000_000,
        "response is {} bytes",
        direct.1.len()
    );
    let through = http(&b.socket("c1"), "GET", "/fleet/v1/units", None);
    assert_eq!(through.0, 200);
    assert!(
        through.1 == direct.1,
        "body differs: {} vs {} bytes",
        through.1.len(),
        direct.1.len()
    );
}

#[test]
fn changed_host_key_is_refused_with_both_fingerprints() {
    let w = World::new();
    let other = keygen(w.keys.path(), "other_host_key", "ed25519");
    let pinned_line = format!("[{}]:{} {}\n", w.sshd.ip, w.sshd.port, public_line(&other));
    std::fs::write(&w.known_hosts, format!("# pins\n{pinned_line}")).expect("write");
    let b = w.broker("");
    let (status, body) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(status, 503);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("fleet error json");
    assert_eq!(v["error"]["code"], 503);
    let msg = v["error"]["message"].as_str().expect("message").to_string();
    let fp = |k: &std::path::Path| fingerprint(k);
    assert!(msg.starts_with("cluster \"c1\": "), "{msg}");
    assert!(msg.contains("HOST KEY CHANGED"), "{msg}");
    assert!(
        msg.contains(&fp(&w.sshd.host_key)),
        "presented fingerprint missing: {msg}"
    );
    assert!(
        msg.contains(&fp(&other)),
        "pinned fingerprint missing: {msg}"
    );
    assert!(
        msg.contains(&format!("{}:2", w.known_hosts.display())),
        "pin location missing: {msg}"
    );
    assert!(msg.contains("fleet-broker trust c1"), "{msg}");
    assert_eq!(b.cluster_info("c1")["state"], "failed");
    // trust never replaces a contradicting pin.
    let out = b.cli(&["trust", "c1", "--fingerprint", &w.sshd.fingerprint()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ssh-keygen -R"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !w.sshd.log().contains("Accepted publickey"),
        "no credentials were offered to the impostor"
    );
}

#[test]
fn unknown_host_is_refused_under_strict_and_pinned_under_accept_new() {
    let w = World::new();
    std::fs::write(&w.known_hosts, "").expect("empty");
    let b = w.broker("");
    let (status, body) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(status, 503);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("not in known_hosts"), "{body}");
    assert!(body.contains("fleet-broker trust c1"), "{body}");
    assert_eq!(b.cluster_info("c1")["state"], "failed");

    // A key without the fingerprint given is not pinned.
    let out = b.cli(&[
        "trust",
        "c1",
        "--fingerprint",
        "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a fingerprint given with --fingerprint"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&w.known_hosts).expect("read"), "");

    // `fleet-broker trust` pins the presented key and the failed tunnel comes up.
    let out = b.cli(&["trust", "c1", "--fingerprint", &w.sshd.fingerprint()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pinned ssh-ed25519 SHA256:"), "{stdout}");
    assert!(
        stdout.contains("asked the running daemon to reconnect c1"),
        "{stdout}"
    );
    assert!(w.sshd.is_pinned_in(&w.known_hosts));
    // Hashed exactly when OpenSSH's own resolution of the user's ssh_config asks for it.
    let ssh_g = Command::new("ssh")
        .args(["-G", &w.sshd.ip])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ssh -G");
    let hashes = String::from_utf8_lossy(&ssh_g.stdout)
        .lines()
        .any(|l| l == "hashknownhosts yes");
    let written = std::fs::read_to_string(&w.known_hosts).expect("read");
    assert_eq!(written.starts_with("|1|"), hashes, "{written}");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200,
        "{}",
        b.log()
    );
    let out = b.cli(&["trust", "c1", "--fingerprint", &w.sshd.fingerprint()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already pinned"));
    drop(b);
    std::fs::write(&w.known_hosts, "").expect("empty");

    let b = w.broker("host_key_checking = \"accept-new\"");
    let (status, _) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(status, 200, "{}", b.log());
    assert!(w.sshd.is_pinned_in(&w.known_hosts));
    assert!(
        b.log().contains("pinned previously unknown host key"),
        "{}",
        b.log()
    );
}

#[test]
fn hashed_known_hosts_entry_is_accepted() {
    let w = World::new();
    let out = Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&w.known_hosts)
        .output()
        .expect("ssh-keygen -H");
    assert!(out.status.success());
    let text = std::fs::read_to_string(&w.known_hosts).expect("read");
    assert!(text.starts_with("|1|"), "{text}");
    let b = w.broker("");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200,
        "{}",
        b.log()
    );
}

#[test]
fn two_clusters_with_different_users_at_once() {
    let keys = open_tempdir("fb-keys.");
    let key = keygen(keys.path(), "id_ed25519", "ed25519");
    let sshd = Sshd::start(&["root", "nobody"], &[&key]);
    let agent = Agent::start(&[&key]);
    let sim_a = SimServer::start();
    let sim_b = SimServer::with(
        vec![fleet_broker::fleet::schema::Machine {
            id: "abc".into(),
            ..Default::default()
        }],
        false,
    );
    let kh = keys.path().join("known_hosts");
    std::fs::write(&kh, sshd.known_hosts_line()).expect("kh");
    let config = format!(
        "{}{}",
        cluster_toml(
            "alpha",
            &sshd,
            &format!("unix://{}", sim_a.socket.display()),
            "root",
            &kh,
            ""
        ),
        cluster_toml(
            "beta",
            &sshd,
            &format!("unix://{}", sim_b.socket.display()),
            "nobody",
            &kh,
            ""
        )
    );
    let b = Broker::start(&config, Some(&agent.socket));
    let a_threads: Vec<_> = ["alpha", "beta"]
        .into_iter()
        .map(|c| {
            let s = b.socket(c);
            std::thread::spawn(move || http(&s, "GET", "/fleet/v1/machines", None))
        })
        .collect();
    let results: Vec<_> = a_threads
        .into_iter()
        .map(|t| t.join().expect("join"))
        .collect();
    assert_eq!(
        results[0],
        http(&sim_a.socket, "GET", "/fleet/v1/machines", None)
    );
    assert_eq!(
        results[1],
        http(&sim_b.socket, "GET", "/fleet/v1/machines", None)
    );
    assert_ne!(results[0], results[1]);
    let log = sshd.log();
    assert!(log.contains("Accepted publickey for root"), "{log}");
    assert!(log.contains("Accepted publickey for nobody"), "{log}");
    assert_eq!(b.cluster_info("beta")["user"], "nobody");
}

#[test]
fn rsa_only_agent_authenticates_with_sha2_signatures() {
    let keys = open_tempdir("fb-keys.");
    let key = keygen(keys.path(), "id_rsa", "rsa");
    let sshd = Sshd::start(&["root"], &[&key]);
    let agent = Agent::start(&[&key]);
    let sim = SimServer::start();
    let kh = keys.path().join("known_hosts");
    std::fs::write(&kh, sshd.known_hosts_line()).expect("kh");
    let b = Broker::start(
        &cluster_toml(
            "c1",
            &sshd,
            &format!("unix://{}", sim.socket.display()),
            "root",
            &kh,
            "",
        ),
        Some(&agent.socket),
    );
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200,
        "{}",
        b.log()
    );
    let log = sshd.log();
    assert!(
        log.contains("Accepted publickey for root") && log.contains("RSA SHA256:"),
        "{log}"
    );
}

#[test]
fn tunnel_recovers_after_sshd_restart_and_answers_503_meanwhile() {
    let mut w = World::new();
    let b = w.broker("connect_timeout = \"2s\"\nkeepalive_interval = \"1s\"\nkeepalive_max = 2");
    let sock = b.socket("c1");
    assert_eq!(http(&sock, "GET", "/fleet/v1/machines", None).0, 200);
    w.sshd.kill();
    wait_until("the broker to notice the lost tunnel", DEADLINE, || {
        b.cluster_info("c1")["state"] != "ready"
    });
    let started = Instant::now();
    let (status, body) = http(&sock, "GET", "/fleet/v1/machines", None);
    let waited = started.elapsed();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("cluster \"c1\": "),
        "{v}"
    );
    // Bounded by connect_timeout (2 s), not hanging: allow scheduling slack on a loaded machine.
    assert!(waited < Duration::from_secs(15), "503 took {waited:?}");
    w.sshd.restart();
    wait_until("automatic recovery", DEADLINE, || {
        try_http(&sock, "GET", "/fleet/v1/machines", None).is_ok_and(|r| r.0 == 200)
    });
    let info = b.cluster_info("c1");
    assert_eq!(info["state"], "ready");
    assert!(info["reconnects"].as_u64().unwrap_or(0) >= 1, "{info}");
}

#[test]
fn runtime_dir_and_sockets_are_private() {
    let w = World::new();
    let mut b = w.broker("");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&b.runtime_dir), 0o700);
    assert_eq!(mode(&b.runtime_dir.join("clusters")), 0o700);
    assert_eq!(mode(&b.socket("c1")), 0o600);
    assert_eq!(mode(&b.control_socket()), 0o600);
    assert_eq!(
        std::fs::metadata(b.socket("c1")).expect("stat").uid(),
        nix::unistd::geteuid().as_raw()
    );
    // SIGTERM removes the sockets.
    assert!(b.terminate(), "clean exit on SIGTERM; log:\n{}", b.log());
    assert!(!b.socket("c1").exists());
    assert!(!b.control_socket().exists());
}

#[test]
fn clients_refuse_a_runtime_dir_or_a_socket_another_user_controls() {
    let w = World::new();
    // Another user's daemon owns the runtime dir and answers on its sockets.
    let b = Broker::start_as(&w.config(""), None, Some(65534));
    let cwd = open_tempdir("fb-cwd.");
    let fleetctl_says = || {
        let r = fleetctl(&b, cwd.path(), &[], &["--cluster", "c1", "list-machines"]);
        assert_ne!(r.code, 0, "{r:?}");
        r.stderr
    };
    let status_says = || {
        let out = b.cli(&["status"]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let endpoint = format!("unix://{}", b.socket("c1").display());
    let endpoint_says = || {
        let r = fleetctl(
            &b,
            cwd.path(),
            &[("FLEETCTL_ENDPOINT", endpoint.as_str())],
            &["list-machines"],
        );
        assert_ne!(r.code, 0, "{r:?}");
        r.stderr
    };
    for said in [fleetctl_says(), status_says(), endpoint_says()] {
        assert!(said.contains("is owned by uid 65534"), "{said}");
    }
    // The directories become ours; the other user still answers on the sockets.
    let runtime = b.dir.path().join("xdg/fleet-broker");
    for d in [
        b.dir.path().join("xdg"),
        runtime.clone(),
        runtime.join("clusters"),
    ] {
        nix::unistd::chown(&d, Some(nix::unistd::getuid()), None).expect("chown");
    }
    for said in [fleetctl_says(), status_says(), endpoint_says()] {
        assert!(said.contains("is served by uid 65534"), "{said}");
        assert!(said.contains("impersonating"), "{said}");
    }
}

#[test]
fn connection_from_another_uid_is_refused() {
    let w = World::new();
    // The broker runs as nobody; this test (root) passes the file permissions but not the
    // peer uid check.
    let b = Broker::start_as(&w.config(""), None, Some(65534));
    let r = try_http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert!(r.is_err(), "a foreign uid got an answer: {r:?}");
    let r = try_http(&b.control_socket(), "GET", "/v1/clusters", None);
    assert!(r.is_err(), "a foreign uid got an answer: {r:?}");
    wait_until("the refusal to be logged", DEADLINE, || {
        b.log().matches("refused local connection").count() >= 2
    });
    assert!(b.log().contains("uid 0"), "{}", b.log());
}

#[test]
fn stalled_reader_does_not_block_other_clients() {
    let w = World::new();
    w.sim.put_big_units(12000);
    let b = w.broker("stalled_reader_timeout = \"2s\"");
    let sock = b.socket("c1");
    // A client asks for ~48 MB and never reads past the first bytes.
    let mut stalled = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    use std::io::{Read, Write};
    stalled
        .write_all(b"GET /fleet/v1/units HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut first = [0u8; 16];
    stalled.read_exact(&mut first).expect("first bytes");
    assert_eq!(&first[..12], b"HTTP/1.1 200");
    // Other clients on the same SSH connection keep being served.
    for _ in 0..20 {
        let (status, _) = http(&sock, "GET", "/fleet/v1/machines", None);
        assert_eq!(status, 200);
    }
    wait_until("the stalled client to be cut off", DEADLINE, || {
        b.log()
            .contains("local client took nothing for 2 s while data waited")
    });
    // It gets an answer that visibly ends short of what its headers announce.
    let mut raw = first.to_vec();
    let _ = stalled.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let len: usize = len.trim().parse().expect("length");
        assert!(
            body.len() < len,
            "{} of {len} bytes: a complete answer",
            body.len()
        );
    } else {
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(!body.ends_with(b"0\r\n\r\n"), "a complete-looking answer");
    }
    eprintln!(
        "the stalled client got {} bytes; headers: {head:?}",
        body.len()
    );
    drop(stalled);
    assert_eq!(http(&sock, "GET", "/fleet/v1/machines", None).0, 200);
}

#[test]
fn http_endpoint_is_reached_by_direct_tcpip() {
    let keys = open_tempdir("fb-keys.");
    let key = keygen(keys.path(), "id_ed25519", "ed25519");
    let sshd = Sshd::start(&["root"], &[&key]);
    let agent = Agent::start(&[&key]);
    let sim = SimServer::with(fleet_broker::sim::demo_machines(), true);
    let tcp = sim.tcp.expect("tcp listener");
    let kh = keys.path().join("known_hosts");
    std::fs::write(&kh, sshd.known_hosts_line()).expect("kh");
    let b = Broker::start(
        &cluster_toml("web", &sshd, &format!("http://{tcp}"), "root", &kh, ""),
        Some(&agent.socket),
    );
    let through = http(&b.socket("web"), "GET", "/fleet/v1/machines", None);
    assert_eq!(through.0, 200, "{}", b.log());
    assert_eq!(
        through,
        http(&sim.socket, "GET", "/fleet/v1/machines", None)
    );
}

#[test]
fn jump_hosts_are_crossed_with_pinned_keys() {
    let keys = open_tempdir("fb-keys.");
    let key = keygen(keys.path(), "id_ed25519", "ed25519");
    let jump = Sshd::start(&["root"], &[&key]);
    let tunnel = Sshd::start(&["root"], &[&key]);
    let agent = Agent::start(&[&key]);
    let sim = SimServer::start();
    let kh = keys.path().join("known_hosts");
    std::fs::write(
        &kh,
        format!("{}{}", jump.known_hosts_line(), tunnel.known_hosts_line()),
    )
    .expect("kh");
    let endpoint = format!("unix://{}", sim.socket.display());
    let config = cluster_toml(
        "c1",
        &tunnel,
        &endpoint,
        "root",
        &kh,
        &format!("jump = [\"root@{}\"]", jump.tunnel()),
    );
    let b = Broker::start(&config, Some(&agent.socket));
    let through = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(through.0, 200, "{}", b.log());
    assert_eq!(
        through,
        http(&sim.socket, "GET", "/fleet/v1/machines", None)
    );
    assert!(
        jump.log().contains("Accepted publickey for root"),
        "{}",
        jump.log()
    );
    assert!(
        tunnel.log().contains("Accepted publickey for root"),
        "{}",
        tunnel.log()
    );
    drop(b);

    // A changed key on the jump host is refused like any other.
    let other = keygen(keys.path(), "impostor", "ed25519");
    std::fs::write(
        &kh,
        format!(
            "[{}]:{} {}\n{}",
            jump.ip,
            jump.port,
            public_line(&other),
            tunnel.known_hosts_line()
        ),
    )
    .expect("kh");
    let b = Broker::start(&config, Some(&agent.socket));
    let (status, body) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(status, 503);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("cluster \\\"c1\\\" jump host 1: HOST KEY CHANGED"),
        "{body}"
    );
    drop(b);

    // `fleet-broker trust` pins the jump host, then the tunnel host reached through it.
    std::fs::write(&kh, "").expect("kh");
    let b = Broker::start(&config, Some(&agent.socket));
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args(["trust", "c1", "--fingerprint", &jump.fingerprint()])
        .args(["--fingerprint", &tunnel.fingerprint()])
        .env("FLEET_BROKER_CONFIG", b.dir.path().join("config.toml"))
        .env("XDG_RUNTIME_DIR", b.dir.path().join("xdg"))
        .env("SSH_AUTH_SOCK", &agent.socket)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("trust");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("pinned ssh-ed25519 SHA256:").count(),
        2,
        "{stdout}"
    );
    assert!(jump.is_pinned_in(&kh) && tunnel.is_pinned_in(&kh));
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200,
        "{}",
        b.log()
    );
}

#[test]
fn a_line_openssh_skips_is_skipped_with_its_place_not_fatal() {
    let w = World::new();
    let good = std::fs::read_to_string(&w.known_hosts).expect("read");
    std::fs::write(
        &w.known_hosts,
        format!("other.example ssh-foo AAAAB3NzaC1yc2E\nbroken\n{good}"),
    )
    .expect("write");
    let b = w.broker("");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200,
        "{}",
        b.log()
    );
    let place = format!("{}:1:", w.known_hosts.display());
    assert!(b.log().contains(&place), "{}", b.log());
    assert!(b.log().contains("line ignored"), "{}", b.log());
}

#[test]
fn each_tunnel_connection_carries_an_interactive_session_unless_sshd_refuses_a_pty() {
    let w = World::new();
    let b = w.broker("");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    wait_until("the interactive session", DEADLINE, || {
        b.cluster_info("c1")["interactive_session"] == true
    });
    let (_, metrics) = http(&b.control_socket(), "GET", "/metrics", None);
    assert!(String::from_utf8_lossy(&metrics)
        .contains("fleet_broker_interactive_session{cluster=\"c1\"} 1\n"));
    // On the tunnel host, our connection's session runs `cat` (on a pty).
    let runs_cat = |sshd: &Sshd| {
        sshd.session_pids().iter().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "cat")
        })
    };
    wait_until("cat under the tunnel's sshd session", DEADLINE, || {
        runs_cat(&w.sshd)
    });
    drop(b);
    let b = w.broker("interactive_session = \"off\"");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    assert_eq!(b.cluster_info("c1")["interactive_session"], false);

    // A server that refuses a pty: the tunnel works without one, quietly.
    let keys = open_tempdir("fb-keys.");
    let key = keygen(keys.path(), "id_ed25519", "ed25519");
    let sshd = Sshd::start_with(&["root"], &[&key], None, "PermitTTY no\n");
    let agent = Agent::start(&[&key]);
    let kh = keys.path().join("known_hosts");
    std::fs::write(&kh, sshd.known_hosts_line()).expect("kh");
    let b = Broker::start(
        &cluster_toml(
            "c1",
            &sshd,
            &format!("unix://{}", w.sim.socket.display()),
            "root",
            &kh,
            "",
        ),
        Some(&agent.socket),
    );
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    let info = b.cluster_info("c1");
    assert_eq!(info["state"], "ready");
    assert_eq!(info["interactive_session"], false);
    assert!(!runs_cat(&sshd));
    assert!(
        !b.log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("interactive")),
        "quietly: {}",
        b.log()
    );
}

/// `ssh-keygen -s CA` signs `KEY.pub` for `principal`, valid for `validity`: `KEY-cert.pub`.
fn sign_user_key(ca: &std::path::Path, key: &std::path::Path, principal: &str, validity: &str) {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-I", "fb-test", "-n", principal, "-V", validity])
        .arg(format!("{}.pub", key.display()))
        .output()
        .expect("ssh-keygen -s");
    assert!(out.status.success(), "{out:?}");
}

/// A tunnel host that trusts a user CA and has no authorized_keys line: an agent-held
/// certificate gets in where OpenSSH's `ssh` gets in (and so does a `KEY-cert.pub` beside an
/// identity file), and is refused where `ssh` is refused (another principal, expired).
#[test]
fn user_certificates_get_in_where_ssh_does_and_not_where_it_does_not() {
    let keys = open_tempdir("fb-cert.");
    let ca = keygen(keys.path(), "ca", "ed25519");
    let sim = SimServer::start();
    let sshd = Sshd::start_with(
        &["root"],
        &[],
        None,
        &format!("TrustedUserCAKeys {}.pub\n", ca.display()),
    );
    let kh = keys.path().join("known_hosts");
    std::fs::write(&kh, sshd.known_hosts_line()).expect("known_hosts");
    let endpoint = format!("unix://{}", sim.socket.display());
    for (name, principal, validity, gets_in) in [
        ("good", "root", "-5m:+1h", true),
        ("other", "someone-else", "-5m:+1h", false),
        ("expired", "root", "-2h:-1h", false),
    ] {
        let key = keygen(keys.path(), name, "ed25519");
        sign_user_key(&ca, &key, principal, validity);
        // ssh-add loads KEY-cert.pub beside the key too.
        let agent = Agent::start(&[&key]);
        let ssh = std::process::Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .arg("-p")
            .arg(sshd.port.to_string())
            .arg(format!("root@{}", sshd.ip))
            .arg("true")
            .env("SSH_AUTH_SOCK", &agent.socket)
            .env("HOME", keys.path())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh");
        assert_eq!(
            ssh.status.success(),
            gets_in,
            "{name}: ssh decides: {ssh:?}"
        );
        let b = Broker::start(
            &cluster_toml(
                "c1",
                &sshd,
                &endpoint,
                "root",
                &kh,
                "connect_timeout = \"3s\"\n",
            ),
            Some(&agent.socket),
        );
        let (status, body) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
        assert_eq!(
            status == 200,
            gets_in,
            "{name}: {status} {}\n{}",
            String::from_utf8_lossy(&body),
            b.log()
        );
        if name == "expired" {
            assert!(
                b.log().contains("certificate skipped") && b.log().contains("(EXPIRED)"),
                "{}",
                b.log()
            );
        }
        // doctor shows the agent's certificate, its principals and validity.
        let doctor = std::process::Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
            .args(["doctor", "c1"])
            .env("FLEET_BROKER_CONFIG", b.dir.path().join("config.toml"))
            .env("XDG_RUNTIME_DIR", b.dir.path().join("xdg"))
            .env("SSH_AUTH_SOCK", &agent.socket)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("doctor");
        let said = String::from_utf8_lossy(&doctor.stdout);
        let state = if name == "expired" {
            "(EXPIRED)"
        } else {
            "(valid)"
        };
        assert!(
            said.lines().any(|l| l.contains("certificate \"fb-test\"")
                && l.contains(&format!("for {principal}, valid"))
                && l.contains(state)),
            "{name}: {said}"
        );
        if gets_in {
            // Without an agent: the identity file and the certificate beside it.
            let b = Broker::start(
                &cluster_toml(
                    "c1",
                    &sshd,
                    &endpoint,
                    "root",
                    &kh,
                    &format!(
                        "connect_timeout = \"3s\"\nidentity_files = [\"{}\"]\n",
                        key.display()
                    ),
                ),
                None,
            );
            assert_eq!(
                http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
                200,
                "{}",
                b.log()
            );
            // The same key elsewhere, its certificate named by `certificate_files`.
            let moved = keys.path().join("moved");
            std::fs::copy(&key, &moved).expect("copy key");
            let cert = format!("{}-cert.pub", key.display());
            let b = Broker::start(
                &cluster_toml(
                    "c1",
                    &sshd,
                    &endpoint,
                    "root",
                    &kh,
                    &format!(
                        "connect_timeout = \"3s\"\nidentity_files = [\"{}\"]\ncertificate_files = [\"{cert}\"]\n",
                        moved.display()
                    ),
                ),
                None,
            );
            assert_eq!(
                http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
                200,
                "{}",
                b.log()
            );
        }
    }
}

/// `clients` threads each asking c1's socket for the machines five times: every answer.
fn machines_from_clients_at_once(b: &Broker, clients: usize) -> Vec<Option<(u16, Vec<u8>)>> {
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let socket = b.socket("c1");
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| try_http(&socket, "GET", "/fleet/v1/machines", None).ok())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect()
}

/// A tunnel host with `AllowStreamLocalForwarding no` (and `extra` sshd lines) whose PATH
/// has a stub `fleetctl` relaying `fd-forward PATH` with socat, an agent with its key, the
/// simulator and a known_hosts file pinning it.
struct HardenedHost {
    sshd: Sshd,
    agent: Agent,
    sim: SimServer,
    kh: std::path::PathBuf,
    _dirs: [tempfile::TempDir; 2],
}

/// With `transport = "streamlocal"`, a request gets a 503 naming the sshd `setting` that
/// refuses it.
fn streamlocal_only_is_refused_naming(
    sshd: &Sshd,
    agent: &Agent,
    kh: &std::path::Path,
    endpoint: &str,
    setting: &str,
) {
    let strict = Broker::start(
        &cluster_toml(
            "c1",
            sshd,
            endpoint,
            "root",
            kh,
            "transport = \"streamlocal\"\n",
        ),
        Some(&agent.socket),
    );
    let (status, body) = http(&strict.socket("c1"), "GET", "/fleet/v1/machines", None);
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(setting), "{body}");
}

fn hardened_host(extra: &str) -> HardenedHost {
    hardened_host_refusing("AllowStreamLocalForwarding no\n", extra)
}

/// The same with `refusal` as the setting that refuses streamlocal forwarding.
fn hardened_host_refusing(refusal: &str, extra: &str) -> HardenedHost {
    use std::os::unix::fs::PermissionsExt;
    let keys = open_tempdir("fb-keys.");
    let key = keygen(keys.path(), "id_ed25519", "ed25519");
    let stubs = open_tempdir("fb-stubs.");
    let stub = stubs.path().join("fleetctl");
    std::fs::write(
        &stub,
        "#!/bin/sh\n[ \"$1\" = fd-forward ] || exit 2\nexec socat - \"UNIX-CONNECT:$2\"\n",
    )
    .expect("stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sshd = Sshd::start_with(
        &["root"],
        &[&key],
        None,
        &format!(
            "{refusal}{extra}SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin\n",
            stubs.path().display()
        ),
    );
    let agent = Agent::start(&[&key]);
    let sim = SimServer::start();
    let kh = keys.path().join("known_hosts");
    std::fs::write(&kh, sshd.known_hosts_line()).expect("known_hosts");
    HardenedHost {
        sshd,
        agent,
        sim,
        kh,
        _dirs: [keys, stubs],
    }
}

/// A hardened tunnel host with `AllowStreamLocalForwarding no`: the API still works, through
/// `fleetctl fd-forward PATH` over exec sessions, as the original fleetctl's `--tunnel`
/// reaches it (a stub fleetctl relays with socat); status names the transport; twenty
/// clients at once stay within the session budget; `transport = "streamlocal"` names the
/// sshd setting that stands in the way.
#[test]
fn a_tunnel_host_without_streamlocal_forwarding_is_reached_through_fd_forward() {
    let HardenedHost {
        sshd,
        agent,
        sim,
        kh,
        _dirs,
    } = hardened_host("");
    let endpoint = format!("unix://{}", sim.socket.display());
    let b = Broker::start(
        &cluster_toml("c1", &sshd, &endpoint, "root", &kh, ""),
        Some(&agent.socket),
    );
    let want = http(&sim.socket, "GET", "/fleet/v1/machines", None);
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None),
        want
    );
    assert_eq!(b.cluster_info("c1")["transport"], "fd-forward");
    for got in machines_from_clients_at_once(&b, 20) {
        assert_eq!(got.as_ref(), Some(&want));
    }
    let body = r#"{"desiredState":"inactive","options":[{"section":"Service","name":"ExecStart","value":"/bin/true"}]}"#;
    assert_eq!(
        http(
            &b.socket("c1"),
            "PUT",
            "/fleet/v1/units/via-fd.service",
            Some(body)
        )
        .0,
        201
    );
    assert!(sim
        .sim
        .lock()
        .expect("sim")
        .unit("via-fd.service")
        .is_some());
    // doctor reaches the API the same way, and says so.
    let doctor = std::process::Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args(["doctor", "c1"])
        .env("FLEET_BROKER_CONFIG", b.dir.path().join("config.toml"))
        .env("XDG_RUNTIME_DIR", b.dir.path().join("xdg"))
        .env("SSH_AUTH_SOCK", &agent.socket)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("doctor");
    let said = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        said.lines().any(|l| l.contains("fleet API")
            && l.contains("answers, 3 machine(s) (through `fleetctl fd-forward`")),
        "{said}"
    );
    // Streamlocal only: refused, with the setting named.
    streamlocal_only_is_refused_naming(&sshd, &agent, &kh, &endpoint, "AllowStreamLocalForwarding");
}

/// `DisableForwarding yes` (every kind of forwarding off, exec sessions still allowed): the
/// API is reached through `fleetctl fd-forward` as the original fleetctl reaches it, and with
/// `transport = "streamlocal"` the refusal names the setting.
#[test]
fn a_tunnel_host_with_forwarding_disabled_is_reached_through_fd_forward_or_named() {
    let HardenedHost {
        sshd,
        agent,
        sim,
        kh,
        _dirs,
    } = hardened_host_refusing("DisableForwarding yes\n", "");
    let endpoint = format!("unix://{}", sim.socket.display());
    let b = Broker::start(
        &cluster_toml("c1", &sshd, &endpoint, "root", &kh, ""),
        Some(&agent.socket),
    );
    let through = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    assert_eq!(through.0, 200, "{}", b.log());
    assert_eq!(
        through,
        http(&sim.socket, "GET", "/fleet/v1/machines", None)
    );
    assert_eq!(b.cluster_info("c1")["transport"], "fd-forward");
    streamlocal_only_is_refused_naming(&sshd, &agent, &kh, &endpoint, "DisableForwarding");
}

/// The same hardened host allowing `max_sessions` sessions per connection: the tunnel's
/// interactive session is given up (status says so) and the fd-forward budget shrinks to what
/// the host allows, so ten clients at once all get their answers.
fn fd_forward_under_max_sessions(max_sessions: u32) {
    let HardenedHost {
        sshd,
        agent,
        sim,
        kh,
        _dirs,
    } = hardened_host(&format!("MaxSessions {max_sessions}\n"));
    let b = Broker::start(
        &cluster_toml(
            "c1",
            &sshd,
            &format!("unix://{}", sim.socket.display()),
            "root",
            &kh,
            "connect = \"eager\"\n",
        ),
        Some(&agent.socket),
    );
    wait_until("the interactive session", DEADLINE, || {
        b.cluster_info("c1")["interactive_session"] == true
    });
    let want = http(&sim.socket, "GET", "/fleet/v1/machines", None);
    for got in machines_from_clients_at_once(&b, 10) {
        assert_eq!(got.as_ref(), Some(&want), "{}", b.log());
    }
    let info = b.cluster_info("c1");
    assert_eq!(info["transport"], "fd-forward", "{info}");
    if max_sessions == 1 {
        assert_eq!(info["interactive_session"], false, "{info}");
        assert_eq!(info["interactive_session_given_up"], true, "{info}");
    }
}

#[test]
fn max_sessions_one_without_streamlocal_gives_the_interactive_slot_to_fd_forward() {
    fd_forward_under_max_sessions(1);
}

#[test]
fn max_sessions_two_without_streamlocal_serves_ten_clients_at_once() {
    fd_forward_under_max_sessions(2);
}
