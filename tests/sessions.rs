//! Remote sessions end to end: our fleetctl and the exec stream, through the daemon, a real
//! sshd as tunnel host and two more sshds as cluster machines (on other 127.0.0.x addresses)
//! whose PATH has stub systemctl/journalctl/sudo.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use fleet_broker::cli::session::{self, Outcome, StartError};
use fleet_broker::protocol::exec::{ExecRequest, ExecTarget, PtyRequest};
use fleet_broker::protocol::frame::Frame;
use support::*;

fn unit(machine: &str) -> Vec<fleet_broker::fleet::schema::UnitOption> {
    vec![
        opt("Service", "ExecStart", "/bin/sleep 1000"),
        opt("X-Fleet", "MachineID", machine),
    ]
}

struct Env {
    m: Machines,
    b: Broker,
    cwd: tempfile::TempDir,
}

fn env() -> Env {
    let m = Machines::new();
    m.sim.put("hello.service", unit(M1), "launched");
    m.sim.put("other.service", unit(M2), "launched");
    m.sim.put("idle.service", unit(M1), "inactive");
    m.sim.put(
        "glob.service",
        vec![
            opt("Service", "ExecStart", "/bin/true"),
            opt("X-Fleet", "Global", "true"),
        ],
        "launched",
    );
    let b = m.broker("");
    let cwd = open_tempdir("fb-cwd.");
    Env { m, b, cwd }
}

impl Env {
    fn run(&self, args: &[&str]) -> Run {
        fleetctl(&self.b, self.cwd.path(), &[], args)
    }
}

fn req(target: ExecTarget, command: &str) -> ExecRequest {
    ExecRequest {
        target,
        command: Some(command.into()),
        action: None,
        pty: None,
        forward_agent: false,
        user: None,
        ssh_port: None,
        timeout_secs: None,
    }
}

#[test]
fn status_passes_exit_codes_and_separates_units() {
    let e = env();
    let r = e.run(&["status", "hello", "other"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "* hello.service - stub unit on m1\n   Active: active (running)\n\n* other.service - stub unit on m2\n   Active: active (running)\n"
    );
    assert_eq!(e.m.argv_log(1), "systemctl status -l -- hello.service\n");
    assert_eq!(e.m.argv_log(2), "systemctl status -l -- other.service\n");
    // The first non-zero exit stops the run and is returned.
    std::fs::write(e.m.stub(1).join("exit.hello.service"), "3").expect("write");
    let r = e.run(&["status", "hello", "other"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(
        r.stdout,
        "* hello.service - stub unit on m1\n   Active: active (running)\n"
    );
    // Global units: one status per machine that runs them.
    let r = e.run(&["status", "glob"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "* glob.service - stub unit on m1\n   Active: active (running)\n\n* glob.service - stub unit on m2\n   Active: active (running)\n");
    // cobra-style unique prefix
    let r = e.run(&["stat", "other"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (
            0,
            "* other.service - stub unit on m2\n   Active: active (running)\n"
        )
    );
    let r = e.run(&["status", "nothere"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unit nothere.service does not exist.\n")
    );
    let r = e.run(&["status", "idle"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unit idle.service does not appear to be loaded.\n")
    );
}

/// `status` and `journal --lines` of a scheduled unit are one request to the daemon, which
/// looks the unit up as it starts the session: nothing goes through the cluster's socket. A
/// unit the daemon cannot place (missing, global, not scheduled) is refused as a resolve
/// error, and our fleetctl then asks the API itself to say why in fleetctl's words (the
/// messages are checked in the tests around this one).
#[test]
fn status_and_journal_of_a_scheduled_unit_are_one_request() {
    let e = env();
    append_journal(e.m.stub(1), &[("c1", "one"), ("c2", "two")]);
    let through_socket = || {
        e.b.cluster_info("c1")["requests"]
            .as_u64()
            .expect("requests")
    };
    let before = through_socket();
    let r = e.run(&["status", "hello"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (
            0,
            "* hello.service - stub unit on m1\n   Active: active (running)\n"
        ),
        "{r:?}"
    );
    let r = e.run(&["journal", "--lines", "1", "hello"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "two\n"), "{r:?}");
    assert_eq!(
        through_socket(),
        before,
        "status and journal asked the API themselves"
    );
    // The ones it cannot place are told why, through the API.
    let r = e.run(&["status", "idle"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unit idle.service does not appear to be loaded.\n")
    );
    assert_eq!(through_socket(), before + 1);
    let control = e.b.control_socket();
    rt().block_on(async {
        for (unit, why) in [
            (
                "idle.service",
                "unit idle.service is not scheduled to a machine",
            ),
            ("glob.service", "global units unsupported"),
            ("nothere.service", "unit does not exist"),
        ] {
            let r = session::open(
                &control,
                "c1",
                &req(ExecTarget::ScheduledUnit(unit.into()), "true"),
            )
            .await;
            assert_eq!(r.err(), Some(StartError::Resolve(why.into())), "{unit}");
        }
    });
}

#[test]
fn journal_lines_sudo_and_output() {
    let e = env();
    append_journal(
        e.m.stub(1),
        &[("c1", "one"), ("c2", "two"), ("c3", "three")],
    );
    let r = e.run(&["journal", "hello"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "one\ntwo\nthree\n"),
        "{r:?}"
    );
    assert_eq!(
        e.m.argv_log(1),
        "journalctl --unit=hello.service --no-pager -n 10 --output short\n"
    );
    let r = e.run(&[
        "journal", "--lines", "2", "--output", "cat", "--sudo", "hello",
    ]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "two\nthree\n"), "{r:?}");
    assert!(e.m.argv_log(1).ends_with(
        "sudo -- journalctl --unit=hello.service --no-pager -n 2 --output cat\njournalctl --unit=hello.service --no-pager -n 2 --output cat\n"
    ), "{}", e.m.argv_log(1));
    let r = e.run(&["journal", "nothere"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unit nothere.service does not exist.\n")
    );
    let r = e.run(&["journal", "glob"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            "Unable to retrieve journal of global unit glob.service.\n"
        )
    );
    let r = e.run(&["journal", "idle"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unit idle.service does not appear to be running.\n")
    );
    let r = e.run(&["journal"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "One unit file must be provided.\n")
    );
}

#[test]
fn journal_follow_survives_a_tunnel_restart_without_loss_or_repeats() {
    let mut e = env();
    append_journal(
        e.m.stub(1),
        &[("c1", "line 1"), ("c2", "line 2"), ("c3", "line 3")],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(["journal", "-f", "hello"])
        .env("XDG_RUNTIME_DIR", e.b.dir.path().join("xdg"))
        .env_remove("FLEETCTL_ENDPOINT")
        .env_remove("FLEETCTL_CLUSTER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("fleetctl journal -f");
    let stdout = child.stdout.take().expect("stdout");
    let rx = line_reader(stdout);
    let mut seen: Vec<String> = Vec::new();
    let wait_for = |want: &str, seen: &mut Vec<String>| {
        let end = Instant::now() + DEADLINE;
        while !seen.iter().any(|l| l == want) {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => seen.push(l),
                Err(_) => panic!("no {want:?} within {DEADLINE:?}; saw {seen:?}"),
            }
        }
    };
    wait_for("line 3", &mut seen);
    append_journal(e.m.stub(1), &[("c4", "line 4"), ("c5", "line 5")]);
    wait_for("line 5", &mut seen);
    e.m.tunnel.kill();
    append_journal(e.m.stub(1), &[("c6", "line 6"), ("c7", "line 7")]);
    e.m.tunnel.restart();
    append_journal(e.m.stub(1), &[("c8", "line 8")]);
    wait_for("line 8", &mut seen);
    let _ = child.kill();
    let _ = child.wait();
    let want: Vec<String> = (1..=8).map(|i| format!("line {i}")).collect();
    assert_eq!(seen, want);
    assert!(
        e.m.argv_log(1).contains("--after-cursor c5"),
        "{}",
        e.m.argv_log(1)
    );
}

#[test]
fn ssh_runs_commands_and_passes_the_exit_code() {
    let e = env();
    let r = e.run(&["ssh", M1, "echo", "hi;", "exit", "7"]);
    assert_eq!((r.code, r.stdout.as_str()), (7, "hi\n"), "{r:?}");
    // `--unit` runs on the unit's machine (m2's stub answers), and what follows `--` reaches
    // its shell joined with spaces, re-split there.
    let r = e.run(&[
        "ssh",
        "--unit",
        "other",
        "--",
        "systemctl",
        "status",
        "x;",
        "echo",
        "done",
    ]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (
            0,
            "* x - stub unit on m2\n   Active: active (running)\ndone\n"
        ),
        "{r:?}"
    );
    let r = fleetctl_with_input(
        &e.b,
        e.cwd.path(),
        &[],
        &["ssh", "b2b2", "cat"],
        Some(b"line one\nline two\n"),
    );
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "line one\nline two\n"),
        "stdin is forwarded and closed: {r:?}"
    );
    let r = e.run(&["ssh", "hello", "kill -TERM $$"]);
    assert_eq!(r.code, 128 + 15, "a signal gives 128+N: {r:?}");
    // The tunnel host itself is a target too.
    let r = e.run(&["ssh", &e.m.tunnel.ip, "systemctl", "status", "x"]);
    assert_eq!(
        r.stdout, "* x - stub unit on tunnel\n   Active: active (running)\n",
        "{r:?}"
    );
}

#[test]
fn ssh_target_errors_use_the_original_texts() {
    let e = env();
    let r = e.run(&["ssh", "zzzz", "true"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            "Unable to proceed: could not find matching unit or machine\n"
        )
    );
    let r = e.run(&["ssh", "--machine", "zzzz", "true"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unable to proceed: machine does not exist\n")
    );
    let r = e.run(&["ssh", "--unit", "nothere", "true"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unable to proceed: unit does not exist\n")
    );
    let r = e.run(&["ssh", "--machine", M1, "--unit", "hello", "true"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            "Both machine and unit flags provided, please specify only one.\n"
        )
    );
    let r = e.run(&["ssh"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            "Unable to proceed: one machine or unit must be provided\n"
        )
    );
    let r = e.run(&["ssh", "--unit", "glob", "true"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unable to proceed: global units unsupported\n")
    );
}

#[test]
fn changed_machine_host_key_is_refused_with_the_pinning_message() {
    let m = Machines::new();
    m.sim.put("hello.service", unit(M2), "launched");
    let other = keygen(m.keys.path(), "impostor", "ed25519");
    let text = std::fs::read_to_string(&m.known_hosts).expect("kh");
    let m2_line = m.m2.known_hosts_line();
    let wrong = format!("[{}]:{} {}\n", m.m2.ip, m.m2.port, public_line(&other));
    std::fs::write(&m.known_hosts, text.replace(&m2_line, &wrong)).expect("kh");
    let b = m.broker("");
    let cwd = open_tempdir("fb-cwd.");
    let r = fleetctl(&b, cwd.path(), &[], &["ssh", M2, "true"]);
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr.starts_with(
            "Failed running command over SSH: cluster \"c1\" machine b2b2b2b2: HOST KEY CHANGED"
        ),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!("{}:3", m.known_hosts.display())),
        "{}",
        r.stderr
    );
    assert!(
        !m.m2.log().contains("Accepted publickey"),
        "no credentials offered to the impostor"
    );
    let r = fleetctl(&b, cwd.path(), &[], &["status", "hello"]);
    assert_eq!(r.code, 255);
    assert!(
        r.stderr.starts_with(
            "Unable to SSH to remote host: cluster \"c1\" machine b2b2b2b2: HOST KEY CHANGED"
        ),
        "{}",
        r.stderr
    );
    // Machine 1 is unaffected.
    assert_eq!(fleetctl(&b, cwd.path(), &[], &["ssh", M1, "true"]).code, 0);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn collect(stream: &mut session::ExecStream, until: &str, out: &mut String) -> Option<Frame> {
    loop {
        match tokio::time::timeout(DEADLINE, stream.recv())
            .await
            .expect("frame in time")
        {
            // stderr may carry the remote shell's start-up noise; the tests look at stdout.
            Some(Frame::Stderr(_)) => {}
            Some(Frame::Stdout(b)) => {
                out.push_str(&String::from_utf8_lossy(&b));
                if !until.is_empty() && out.contains(until) {
                    return None;
                }
            }
            other => return other,
        }
    }
}

#[test]
fn pty_is_allocated_and_resizes_reach_it() {
    let e = env();
    let control = e.b.control_socket();
    rt().block_on(async {
        let mut r = req(
            ExecTarget::Machine(M1.into()),
            "tty; stty size; read x; stty size",
        );
        r.pty = Some(PtyRequest {
            term: "xterm".into(),
            cols: 80,
            rows: 24,
        });
        let mut s = session::open(&control, "c1", &r).await.expect("session");
        let mut out = String::new();
        assert_eq!(collect(&mut s, "24 80", &mut out).await, None);
        assert!(out.starts_with("/dev/pts/"), "tty prints a device: {out:?}");
        assert!(
            s.send(Frame::Resize {
                cols: 100,
                rows: 40
            })
            .await
        );
        assert!(s.send(Frame::Stdin("go\n".into())).await);
        let mut out = String::new();
        assert_eq!(collect(&mut s, "40 100", &mut out).await, None, "{out:?}");
        assert_eq!(collect(&mut s, "", &mut out).await, Some(Frame::Exit(0)));
    });
}

#[test]
fn agent_is_forwarded_only_when_asked() {
    let e = env();
    let r = e.run(&["ssh", M1, "ssh-add", "-l"]);
    // ssh-add's "no agent" (2), not "no keys" (1) or a failure of ours.
    assert_eq!(r.code, 2, "no agent without -A: {r:?}");
    assert!(
        r.stderr
            .contains("Could not open a connection to your authentication agent"),
        "{r:?}"
    );
    let r = e.run(&["ssh", "-A", M1, "ssh-add", "-l"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("id_ed25519 (ED25519)"), "{}", r.stdout);
    let r = e.run(&["ssh", "--forward-agent", M1, "ssh-add", "-l"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn twenty_concurrent_sessions_on_one_cluster() {
    let e = env();
    let control = e.b.control_socket();
    rt().block_on(async {
        let mut streams = Vec::new();
        for i in 0..20 {
            let target = if i % 2 == 0 { M1 } else { M2 };
            let s = session::open(
                &control,
                "c1",
                &req(ExecTarget::Machine(target.into()), "read x; echo done $x"),
            )
            .await
            .unwrap_or_else(|e| panic!("session {i}: {e:?}"));
            streams.push(s);
        }
        // All twenty are open at once (sshd allows 10 per connection); now let them finish.
        for (i, s) in streams.iter().enumerate() {
            assert!(s.send(Frame::Stdin(format!("{i}\n").into())).await);
        }
        for (i, mut s) in streams.into_iter().enumerate() {
            let mut out = String::new();
            assert_eq!(collect(&mut s, "", &mut out).await, Some(Frame::Exit(0)));
            assert_eq!(out, format!("done {i}\n"));
        }
    });
}

#[test]
fn closing_the_client_ends_the_remote_command() {
    // Like `journalctl -f`, the command writes continuously. When the client goes away the
    // daemon sends TERM (sshd refuses signal requests for root logins, which run without
    // privilege separation) and closes the channel, so the next write ends the command.
    let e = env();
    let control = e.b.control_socket();
    let marker = e.m.stub(1).join("ticks");
    let script = format!(
        "while :; do echo tick; echo x >> {}; sleep 0.05; done",
        marker.display()
    );
    rt().block_on(async {
        let mut s = session::open(
            &control,
            "c1",
            &req(ExecTarget::Machine(M1.into()), &script),
        )
        .await
        .expect("session");
        let mut out = String::new();
        assert_eq!(collect(&mut s, "tick", &mut out).await, None);
        drop(s);
    });
    let ticks = || {
        std::fs::read_to_string(&marker)
            .map(|t| t.len())
            .unwrap_or(0)
    };
    // Ended means: its process is gone and the file no longer grows.
    let mut last = ticks();
    wait_until("the remote loop to end", DEADLINE, || {
        let now = ticks();
        let stopped = now == last
            && !Command::new("pgrep")
                .args(["-f", &format!("x >> {}", marker.display())])
                .status()
                .expect("pgrep")
                .success();
        last = now;
        stopped
    });
}

#[test]
fn session_start_errors_are_typed() {
    let e = env();
    let control = e.b.control_socket();
    rt().block_on(async {
        let r = session::open(
            &control,
            "c1",
            &req(ExecTarget::Unit("nothere.service".into()), "true"),
        )
        .await;
        assert_eq!(
            r.err(),
            Some(StartError::Resolve("unit does not exist".into()))
        );
        let mut bad = req(ExecTarget::Machine(M1.into()), "true");
        bad.ssh_port = Some(1);
        match session::open(&control, "c1", &bad).await {
            Err(StartError::Ssh(m)) => assert!(m.contains("could not connect"), "{m}"),
            other => panic!("expected an SSH error, got {:?}", other.err()),
        }
        let s = session::open(&control, "c1", &req(ExecTarget::TunnelHost, "exit 4"))
            .await
            .expect("session");
        s.send(Frame::StdinEof).await;
        assert_eq!(s.finish().await, Outcome::Exit(4));
        // Any timeout a client sends is bounded, not a panic of the session's task.
        for t in [1e300, f64::MAX, 1e-300] {
            let mut huge = req(ExecTarget::TunnelHost, "exit 5");
            huge.timeout_secs = Some(t);
            match session::open(&control, "c1", &huge).await {
                Ok(s) => {
                    s.send(Frame::StdinEof).await;
                    assert_eq!(s.finish().await, Outcome::Exit(5), "{t}");
                }
                Err(StartError::Ssh(m)) => assert!(m.contains("timed out"), "{t}: {m}"),
                Err(e) => panic!("{t}: {e:?}"),
            }
        }
    });
    let _ = std::io::stdout().flush();
}

#[test]
fn interactive_shell_uses_a_pty_and_restores_the_terminal() {
    // `script` gives fleetctl a terminal: it must ask for a pty, put the terminal in raw mode
    // for the session and restore it afterwards (checked with `stty -a` after it exits).
    let e = env();
    let fleetctl = env!("CARGO_BIN_EXE_fleetctl");
    let inner = format!("stty -a > {d}/before; {fleetctl} ssh {M1}; echo \"exit=$?\" > {d}/code; stty -a > {d}/after", d = e.cwd.path().display());
    let mut child = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .env("XDG_RUNTIME_DIR", e.b.dir.path().join("xdg"))
        .env_remove("FLEETCTL_ENDPOINT")
        .env_remove("FLEETCTL_CLUSTER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let text = || seen.lock().expect("lock").clone();
    // Type only once the remote shell shows its prompt, as a person would.
    wait_until("the remote prompt", DEADLINE, || {
        let t = text();
        t.trim_end().ends_with('#') || t.trim_end().ends_with('$')
    });
    stdin.write_all(b"tty; exit 3\n").expect("write");
    let end = Instant::now() + DEADLINE;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("script did not finish: {}\n{}", text(), e.b.log());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(stdin);
    let _ = reader.join();
    let text = text();
    assert!(
        text.contains("/dev/pts/"),
        "the remote shell has a terminal: {text}"
    );
    let code = std::fs::read_to_string(e.cwd.path().join("code")).expect("code");
    assert_eq!(code, "exit=3\n", "the shell's exit status passes through");
    let before = std::fs::read_to_string(e.cwd.path().join("before")).expect("before");
    let after = std::fs::read_to_string(e.cwd.path().join("after")).expect("after");
    assert_eq!(before, after, "terminal modes restored");
    assert!(after.contains(" icanon"), "{after}");
}

#[test]
fn unknown_machine_is_refused_under_strict_until_trusted() {
    let m = Machines::new();
    let text = std::fs::read_to_string(&m.known_hosts).expect("kh");
    std::fs::write(&m.known_hosts, text.replace(&m.m2.known_hosts_line(), "")).expect("kh");
    let b = m.broker("");
    let cwd = open_tempdir("fb-cwd.");
    let r = fleetctl(&b, cwd.path(), &[], &["ssh", M2, "true"]);
    assert_eq!(r.code, 255, "{r:?}");
    assert!(r.stderr.contains("is not in known_hosts"), "{}", r.stderr);
    assert!(
        r.stderr.contains("fleet-broker trust c1 --machine ID"),
        "{}",
        r.stderr
    );
    let trust_b2 = || {
        b.cli(&[
            "trust",
            "c1",
            "--machine",
            "b2b2",
            "--fingerprint",
            &m.m2.fingerprint(),
        ])
    };
    let out = trust_b2();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("cluster \"c1\": machine b2b2b2b2: pinned ssh-ed25519 SHA256:"),
        "{stdout}"
    );
    assert!(m.m2.is_pinned_in(&m.known_hosts));
    assert_eq!(fleetctl(&b, cwd.path(), &[], &["ssh", M2, "true"]).code, 0);
    let out = trust_b2();
    assert!(String::from_utf8_lossy(&out.stdout).contains("already pinned"));
    let out = b.cli(&[
        "trust",
        "c1",
        "--machine",
        "zzzz",
        "--fingerprint",
        &m.m2.fingerprint(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("machine does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unread_bulk_session_output_neither_stalls_the_tunnel_nor_is_cut_off() {
    unread_bulk_output(ExecTarget::Machine(M1.into()));
}

#[test]
fn unread_bulk_output_of_a_session_on_the_tunnel_host_does_not_stall_the_api() {
    unread_bulk_output(ExecTarget::TunnelHost);
}

/// A session whose output nobody reads for a while: the API on the same tunnel keeps
/// answering, and the reader, once it reads, gets every byte.
fn unread_bulk_output(target: ExecTarget) {
    let e = env();
    let control = e.b.control_socket();
    let api = e.b.socket("c1");
    rt().block_on(async {
        let size = 48 * 1024 * 1024;
        let mut s = session::open(
            &control,
            "c1",
            &req(target, &format!("head -c {size} /dev/zero")),
        )
        .await
        .expect("session");
        // The session's output is not read yet; the API on the same tunnel keeps answering.
        let api2 = api.clone();
        let answers = tokio::task::spawn_blocking(move || {
            (0..20)
                .map(|_| {
                    let started = Instant::now();
                    let status = http(&api2, "GET", "/fleet/v1/machines", None).0;
                    // Bounded, not timed: a stalled tunnel takes a keepalive timeout or more.
                    (
                        status,
                        started.elapsed() < std::time::Duration::from_secs(5),
                    )
                })
                .collect::<Vec<_>>()
        })
        .await
        .expect("requests");
        assert!(answers.iter().all(|&a| a == (200, true)), "{answers:?}");
        // Now the reader catches up and gets every byte.
        let mut got = 0usize;
        loop {
            match tokio::time::timeout(DEADLINE, s.recv())
                .await
                .expect("frame in time")
            {
                Some(Frame::Stdout(b)) => got += b.len(),
                Some(Frame::Exit(code)) => {
                    assert_eq!(code, 0);
                    break;
                }
                other => panic!("unexpected {other:?} after {got} bytes"),
            }
        }
        assert_eq!(got, size);
    });
    assert!(!e.b.log().contains("stopped reading"), "{}", e.b.log());
}

#[test]
fn ssh_username_and_ssh_timeout_apply_to_the_session() {
    let e = env();
    // The machines authorise root only: another user is refused, which shows it was used.
    let r = e.run(&["--ssh-username", "nobody", "ssh", M1, "true"]);
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr.contains("refused every key for user \"nobody\""),
        "{}",
        r.stderr
    );
    let r = e.run(&["--ssh-timeout", "0.000001", "ssh", M2, "true"]);
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr
            .contains("timed out while initiating SSH connection"),
        "{}",
        r.stderr
    );
    let r = fleetctl(
        &e.b,
        e.cwd.path(),
        &[("FLEETCTL_SSH_USERNAME", "root")],
        &["ssh", M1, "true"],
    );
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn hostile_unit_names_reach_systemctl_and_journalctl_as_one_literal_argument() {
    let m = Machines::new();
    let names = [
        "a$(touch pwned)$(id>&2).service",
        "b`touch pwned`.service",
        "c\"q'uo\\te.service",
        "d;touch pwned;.service",
        "e\ntouch pwned\n.service",
        "--version.service",
        "f' 'g.service",
    ];
    for n in names {
        m.sim.put(n, unit(M1), "launched");
    }
    let b = m.broker("");
    let cwd = open_tempdir("fb-cwd.");
    for n in names {
        let words = std::fs::read(m.stub(1).join("words.log")).unwrap_or_default();
        let seen = words.len();
        let r = fleetctl(&b, cwd.path(), &[], &["status", "--", n]);
        assert_eq!(r.code, 0, "status {n:?}: {r:?}");
        let r = fleetctl(&b, cwd.path(), &[], &["journal", "--sudo", "--", n]);
        assert_eq!(r.code, 0, "journal {n:?}: {r:?}");
        let words = std::fs::read(m.stub(1).join("words.log")).expect("words.log");
        let calls = String::from_utf8_lossy(&words[seen..]).into_owned();
        let expected = format!(
            "<systemctl><status><-l><--><{n}>\n<sudo><--><journalctl><--unit={n}><--no-pager><-n><10><--output><short>\n<journalctl><--unit={n}><--no-pager><-n><10><--output><short>\n"
        );
        assert_eq!(calls, expected, "{n:?}");
    }
}

#[test]
fn read_only_cluster_runs_status_and_journal_but_no_shell_or_command() {
    let m = Machines::new();
    m.sim.put("hello.service", unit(M1), "launched");
    append_journal(m.stub(1), &[("c1", "one")]);
    let b = m.broker("read_only = true");
    let cwd = open_tempdir("fb-cwd.");
    let r = fleetctl(&b, cwd.path(), &[], &["status", "hello"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = fleetctl(&b, cwd.path(), &[], &["journal", "hello"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "one\n"), "{r:?}");
    let r = fleetctl(&b, cwd.path(), &[], &["ssh", M1, "touch", "ran"]);
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr.contains("is read-only in the broker's config"),
        "{r:?}"
    );
    let r = fleetctl(&b, cwd.path(), &[], &["ssh", M1]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("a shell on its machines is refused"),
        "{r:?}"
    );
    assert!(!m.argv_log(1).contains("touch"));
    assert_eq!(
        m.argv_log(1),
        "systemctl status -l -- hello.service\njournalctl --unit=hello.service --no-pager -n 10 --output short\n"
    );
}

#[test]
fn a_primary_ip_that_is_not_an_address_is_never_dialled() {
    let m = Machines::new();
    for (id, ip) in [
        ("c3c3c3c3", "*"),
        ("d4d4d4d4", "evil.example"),
        ("e5e5e5e5", "10.0.0.1,*"),
    ] {
        m.sim
            .sim
            .lock()
            .expect("sim")
            .add_machine(fleet_broker::fleet::schema::Machine {
                id: id.into(),
                primary_ip: ip.into(),
                ..Default::default()
            });
    }
    let b = m.broker("");
    let cwd = open_tempdir("fb-cwd.");
    for id in ["c3c3", "d4d4", "e5e5"] {
        let r = fleetctl(&b, cwd.path(), &[], &["ssh", id, "true"]);
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (1, "Could not determine address of machine.\n"),
            "{id}"
        );
        let out = b.cli(&["trust", "c1", "--machine", id, "--fingerprint", "SHA256:x"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Could not determine address"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(b.log().contains("not an IP address"), "{}", b.log());
}

/// Whether a session of `sshd` runs `cat` on a terminal: the interactive session that makes
/// sshd send without Nagle delays.
fn runs_cat_on_a_pty(sshd: &Sshd) -> bool {
    sshd.session_pids().iter().any(|p| {
        std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "cat")
            && std::fs::read_link(format!("/proc/{p}/fd/0"))
                .is_ok_and(|t| t.to_string_lossy().starts_with("/dev/pts/"))
    })
}

#[test]
fn nested_machine_connections_carry_an_interactive_session_unless_off() {
    let e = env();
    let r = e.run(&["status", "hello"]);
    assert_eq!(r.code, 0, "{r:?}");
    // The pooled connection to m1 outlives the command and keeps its interactive session.
    wait_until("cat on a pty under m1's sshd", DEADLINE, || {
        runs_cat_on_a_pty(&e.m.m1)
    });
    assert!(!runs_cat_on_a_pty(&e.m.m2), "m2 was never dialled");

    let b = e.m.broker("interactive_session = \"off\"");
    let r = fleetctl(&b, e.cwd.path(), &[], &["status", "other"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "* other.service - stub unit on m2\n   Active: active (running)\n"
    );
    // The session has ended; its connection stays pooled, without an interactive session.
    assert!(!runs_cat_on_a_pty(&e.m.m2));
}

#[test]
fn exec_sessions_are_audited_with_the_caller_and_the_command() {
    let e = env();
    std::fs::write(e.m.stub(1).join("exit.hello.service"), "3").expect("write");
    let r = e.run(&["status", "hello"]);
    assert_eq!(r.code, 3, "{r:?}");
    let log = e.b.dir.path().join("state/fleet-broker/audit.jsonl");
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    };
    // The end is recorded once the daemon has finished the session.
    wait_until("the session's end in the audit log", DEADLINE, || {
        lines().iter().any(|l| l["phase"] == "end")
    });
    let all = lines();
    let start = all.iter().find(|l| l["phase"] == "start").expect("start");
    let end = all.iter().find(|l| l["phase"] == "end").expect("end");
    for line in [start, end] {
        assert_eq!(line["kind"], "exec");
        assert_eq!(line["cluster"], "c1");
        assert_eq!(
            line["command"],
            "systemctl 'status' '-l' '--' 'hello.service'"
        );
        assert_eq!(line["status"], 101);
        assert_eq!(line["session"], start["session"]);
        assert!(
            line["exe"]
                .as_str()
                .is_some_and(|x| x.ends_with("/fleetctl")),
            "{line}"
        );
        assert!(line["pid"].as_u64().is_some_and(|p| p > 1), "{line}");
    }
    assert_eq!(end["exit"], 3, "{end}");
    assert!(end["duration_ms"].is_u64(), "{end}");
    assert_eq!(end["bytes_in"], 0, "{end}");
    let out = end["bytes_out"].as_u64().expect("bytes_out");
    assert!(out >= r.stdout.len() as u64 && out > 0, "{end} vs {r:?}");
    let text = std::fs::read_to_string(&log).expect("audit log");
    assert!(!text.contains("Active:"), "never session output");
    // `fleet-broker audit` reads it back.
    let shown = e.b.cli(&["audit", "--cluster", "c1"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("-> exit 3, session "), "{shown}");
}

/// One sshd that is both the tunnel host and the only machine (with stub systemd tools),
/// with the given extra sshd settings, its simulator and a broker for it.
struct OneHost {
    _sshd: Sshd,
    _agent: Agent,
    sim: SimServer,
    b: Broker,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// `hello.service`, launched on M1.
fn put_hello_on_m1(sim: &SimServer) {
    sim.put(
        "hello.service",
        vec![
            opt("Service", "ExecStart", "/bin/sleep 1000"),
            opt("X-Fleet", "MachineID", M1),
        ],
        "launched",
    );
}

fn one_host(sshd_extra: &str) -> OneHost {
    one_host_as(sshd_extra, &["c1"], "")
}

/// [`one_host`] served as each of the clusters `names`, and `more` config after them.
fn one_host_as(sshd_extra: &str, names: &[&str], more: &str) -> OneHost {
    let keys = open_tempdir("fb-keys.");
    let key = keygen(keys.path(), "id_ed25519", "ed25519");
    let stubs = open_tempdir("fb-stubs.");
    write_stubs(stubs.path(), "m1");
    let sshd = Sshd::start_with(
        &["root"],
        &[&key],
        None,
        &format!(
            "{sshd_extra}SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin SHLVL=1\n",
            stubs.path().display()
        ),
    );
    let agent = Agent::start(&[&key]);
    let machine = fleet_broker::fleet::schema::Machine {
        id: M1.into(),
        primary_ip: sshd.ip.clone(),
        ..Default::default()
    };
    let sim = SimServer::with(vec![machine], false);
    let kh = keys.path().join("known_hosts");
    std::fs::write(&kh, sshd.known_hosts_line()).expect("known_hosts");
    let mut config: String = names
        .iter()
        .map(|name| {
            cluster_toml(
                name,
                &sshd,
                &format!("unix://{}", sim.socket.display()),
                "root",
                &kh,
                &format!("machine_ssh_port = {}\n", sshd.port),
            )
        })
        .collect();
    config.push_str(more);
    let b = Broker::start(&config, Some(&agent.socket));
    OneHost {
        _sshd: sshd,
        _agent: agent,
        sim,
        b,
        _dirs: (keys, stubs),
    }
}

/// A pooled connection keeps a session channel opened ahead, so the next command skips the
/// channel round trip. (sshd's `ChannelTimeout` does not close it: OpenSSH 9.2 kept one open
/// for 30 s under `ChannelTimeout session*=1s`, as it times out only started sessions.)
#[test]
fn sessions_start_on_a_channel_opened_ahead() {
    // Bound whole: every part lives to the end of the test.
    let host = one_host("");
    let b = host.b;
    let cwd = open_tempdir("fb-cwd.");
    let echo = |word: &str| {
        let run = fleetctl(&b, cwd.path(), &[], &["ssh", M1, "echo", word]);
        assert_eq!(
            (run.code, run.stdout.as_str()),
            (0, format!("{word}\n").as_str()),
            "{run:?}"
        );
    };
    for word in ["one", "two", "three", "four", "five"] {
        echo(word);
    }
    let ahead = b
        .log()
        .matches("exec session on a channel opened ahead")
        .count();
    assert!(
        ahead >= 1,
        "no session used a channel opened ahead:\n{}",
        b.log()
    );
}

/// A machine whose sshd allows one session per connection (`MaxSessions 1`), and which is
/// the tunnel host too: the pooled connection's interactive session would hold the only
/// slot, so it is given up for the user's command; the API, `ssh` and `status` all work.
#[test]
fn max_sessions_one_on_a_machine_that_is_the_tunnel_host_still_runs_commands() {
    let host = one_host("MaxSessions 1\n");
    let b = host.b;
    put_hello_on_m1(&host.sim);
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    let cwd = open_tempdir("fb-cwd.");
    let run = fleetctl(
        &b,
        cwd.path(),
        &[],
        &["--cluster", "c1", "ssh", M1, "echo", "hi"],
    );
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "hi\n"),
        "{run:?}\n{}",
        b.log()
    );
    let run = fleetctl(
        &b,
        cwd.path(),
        &[],
        &["--cluster", "c1", "status", "hello.service"],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("stub unit on m1"), "{run:?}");
    // Again, on the same pooled connection.
    let run = fleetctl(
        &b,
        cwd.path(),
        &[],
        &["--cluster", "c1", "ssh", M1, "echo", "again"],
    );
    assert_eq!((run.code, run.stdout.as_str()), (0, "again\n"), "{run:?}");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
}

/// The daemon's own lookups (which machine a session runs on) reach the fleet API over the
/// tunnel, as the proxy does, not through the cluster socket: with that socket gone, `ssh`
/// and `status` still find their machine.
#[test]
fn target_lookups_reach_the_api_over_the_tunnel_not_through_the_cluster_socket() {
    let host = one_host("");
    let b = host.b;
    put_hello_on_m1(&host.sim);
    std::fs::remove_file(b.socket("c1")).expect("remove the cluster socket");
    let cwd = open_tempdir("fb-cwd.");
    for target in [M1, "hello.service"] {
        let run = fleetctl(
            &b,
            cwd.path(),
            &[],
            &["--cluster", "c1", "ssh", target, "echo", "hi"],
        );
        assert_eq!(
            (run.code, run.stdout.as_str()),
            (0, "hi\n"),
            "{target}: {run:?}\n{}",
            b.log()
        );
    }
}

/// `status` and `journal --lines N` on several clusters: each cluster's output under its
/// header, in order; a cluster that is down named on stderr while the others print; exit 1.
#[test]
fn status_and_journal_fan_out_with_a_header_per_cluster() {
    let host = one_host_as("", &["c1", "c2"], &down_cluster_toml("c3"));
    put_hello_on_m1(&host.sim);
    let cwd = open_tempdir("fb-cwd.");
    let run = fleetctl(
        &host.b,
        cwd.path(),
        &[],
        &["--cluster", "c1,c2", "status", "hello.service"],
    );
    let one = "* hello.service - stub unit on m1\n   Active: active (running)\n";
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, format!("==> c1 <==\n{one}\n==> c2 <==\n{one}").as_str()),
        "{run:?}"
    );
    let run = fleetctl(
        &host.b,
        cwd.path(),
        &[],
        &[
            "--cluster",
            "c*",
            "journal",
            "--lines",
            "2",
            "hello.service",
        ],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.starts_with("==> c1 <==\n") && run.stdout.contains("\n==> c2 <==\n"),
        "{run:?}"
    );
    assert!(
        run.stderr.lines().all(|l| l.starts_with("cluster c3: ")) && !run.stderr.is_empty(),
        "{run:?}"
    );
    // Following a journal is one cluster's business.
    let run = fleetctl(
        &host.b,
        cwd.path(),
        &[],
        &["--cluster", "c1,c2", "journal", "-f", "hello.service"],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("names several clusters"), "{run:?}");
}

/// The daemon keeps a machine list a few seconds for the next target lookups, and drops it
/// when a changing request goes through the cluster's socket: a machine re-addressed behind
/// the daemon's back is dialled at its new address after the next change.
#[test]
fn the_machine_list_is_kept_briefly_and_dropped_by_a_change() {
    let host = one_host("");
    let cwd = open_tempdir("fb-cwd.");
    let ssh = |word: &str| fleetctl(&host.b, cwd.path(), &[], &["ssh", M1, "echo", word]);
    let run = ssh("one");
    assert_eq!((run.code, run.stdout.as_str()), (0, "one\n"), "{run:?}");
    let kept_since = std::time::Instant::now();
    // Nothing listens there: a dial to it is refused at once.
    host.sim
        .sim
        .lock()
        .expect("sim")
        .move_machine(M1, "127.0.0.254");
    let run = ssh("two");
    // Within the list's few seconds (5 s), the kept list still says where M1 was.
    if kept_since.elapsed() < std::time::Duration::from_secs(4) {
        assert_eq!((run.code, run.stdout.as_str()), (0, "two\n"), "{run:?}");
    }
    // A changing request (even one fleet refuses) drops the list.
    let (status, _) = http(
        &host.b.socket("c1"),
        "DELETE",
        "/fleet/v1/units/nothere.service",
        None,
    );
    assert_eq!(status, 404);
    let run = ssh("three");
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("127.0.0.254"),
        "dialled the new address: {run:?}"
    );
}
