//! Where our fleetctl once differed from the original v1.0 without saying so: one golden test
//! per point, byte-exact where the original's text is known (fleet-reference.md, the
//! original's sources).

mod support;

use support::*;

fn env() -> CliEnv {
    CliEnv::new()
}

const HELLO: &str = "[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/sleep 3000\n";

fn outcome(r: &Run) -> (i32, &str, &str) {
    (r.code, r.stdout.as_str(), r.stderr.as_str())
}

/// Point 1: `destroy` of units that do not exist says so on stderr and exits 0.
#[test]
fn destroy_of_nothing_says_units_not_found() {
    let e = env();
    for args in [&["destroy", "nosuch.service"][..], &["destroy", "web@*"]] {
        let r = e.run(args);
        assert_eq!(
            outcome(&r),
            (0, "", "Units not found in registry\n"),
            "{args:?}"
        );
    }
}

/// Points 2 and 3: a wait that runs out of attempts prints `Error waiting for units: …` first, and
/// names no cause it does not know (here the units are scheduled; the agents are down).
#[test]
fn timed_out_waits_print_the_originals_two_lines() {
    let e = env();
    e.write("hello.service", HELLO);
    assert_eq!(e.run(&["start", "hello"]).code, 0);
    e.sim().set_agents_down(true);
    let r = e.run(&["stop", "--block-attempts=1", "hello"]);
    let timeout = "timed out waiting for unit hello.service to report state loaded";
    assert_eq!(
        outcome(&r),
        (
            1,
            "",
            format!(
                "Error waiting for units: {timeout}\nFailed to stop units [hello.service]. err: {timeout}\n"
            )
            .as_str()
        )
    );
    let r = e.run(&["unload", "--block-attempts=1", "hello"]);
    let timeout = "timed out waiting for unit hello.service to report state inactive";
    assert_eq!(
        outcome(&r),
        (
            1,
            "",
            format!(
                "Error waiting for units: {timeout}\nFailed to unload units [hello.service]. err: {timeout}\n"
            )
            .as_str()
        )
    );
    e.write("other.service", HELLO);
    for (cmd, state) in [("load", "loaded"), ("start", "launched")] {
        let r = e.run(&[cmd, "--block-attempts=1", "other"]);
        let timeout = format!("timed out waiting for unit other.service to report state {state}");
        assert_eq!(r.code, 1, "{r:?}");
        assert_eq!(
            r.stderr,
            format!(
                "Error waiting for units: {timeout}\nError waiting for unit states, exit status: {timeout}\n"
            ),
            "{cmd}"
        );
        assert!(!r.stderr.contains("not scheduled"), "{}", r.stderr);
        e.sim().set_desired("other.service", "inactive");
    }
}

/// Point 4: `start` when systemd never reports the unit active: the original's two lines.
#[test]
fn start_without_systemd_reporting_active_ends_like_the_original() {
    let e = env();
    e.write("hello.service", HELLO);
    e.sim().systemd_silent = true;
    let r = e.run(&["start", "hello"]);
    let err = "Failed to find an active unit hello.service within 2s, err: Failed to fetch states within 2s";
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .starts_with("Unit hello.service inactive\nUnit hello.service launched"),
        "{}",
        r.stdout
    );
    assert_eq!(
        r.stderr,
        format!(
            "Error waiting for units: {err}\nError waiting for systemd unit states, err: {err}\n"
        )
    );
    // The declared improvement (docs/compatibility.md): --block-attempts=N gives the
    // systemd check N windows of 2 s, where the original always gives it one.
    e.write("hello2.service", HELLO);
    let r = e.run(&["start", "--block-attempts=3", "hello2"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains(
            "Failed to find an active unit hello2.service within 6s, err: Failed to fetch states within 6s"
        ),
        "{r:?}"
    );
}

/// Point 5: `verify` prints cobra's deprecation line before its own warning.
#[test]
fn verify_prints_the_deprecation_line() {
    let e = env();
    let r = e.run(&["verify", "hello"]);
    assert_eq!(
        outcome(&r),
        (
            2,
            "",
            "Command \"verify\" is deprecated, DEPRECATED - No longer works\nWARNING: The signed/verified units feature is DEPRECATED and cannot be used.\n"
        )
    );
}

/// Point 6: `help` of an unknown topic says so; a command's help names the program.
#[test]
fn help_of_an_unknown_topic_and_of_a_command() {
    let e = env();
    let r = e.run(&["help", "nosuch"]);
    assert_eq!(outcome(&r), (0, "", "Unknown help topic [`nosuch`].\n"));
    let r = e.run(&["help", "start"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Usage: fleetctl start"), "{}", r.stdout);
}

/// Point 7: Extra arguments to `version`, `list-units`, `list-machines` are ignored, as cobra does.
#[test]
fn extra_arguments_are_ignored_where_the_original_ignores_them() {
    let e = env();
    for args in [
        &["version", "extra"][..],
        &["list-units", "extra"],
        &["list-machines", "extra", "more"],
        &["list-unit-files", "extra"],
    ] {
        let r = e.run(args);
        let plain = e.run(&args[..1]);
        assert_eq!(outcome(&r), outcome(&plain), "{args:?}");
        assert_eq!(r.code, 0, "{args:?}");
    }
}

/// Point 8: `FLEETCTL_DEBUG=true` logs the response line too (`http.go:31`).
#[test]
fn debug_logs_request_and_response_lines() {
    let e = env();
    let r = e.run_env(&[("FLEETCTL_DEBUG", "true")], &["list-machines"]);
    assert_eq!(r.code, 0);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stderr);
    assert!(
        lines[0]
            .ends_with(" DEBUG http.go:28: HTTP GET http://domain-sock/fleet/v1/machines?alt=json"),
        "{}",
        r.stderr
    );
    assert!(
        lines[1].ends_with(
            " DEBUG http.go:31: HTTP GET http://domain-sock/fleet/v1/machines?alt=json 200 OK"
        ),
        "{}",
        r.stderr
    );
}

/// Point 9: An unparsable `FLEETCTL_REQUEST_TIMEOUT` (or `_SSH_TIMEOUT`) is ignored; on the
/// command line it is a usage error.
#[test]
fn unparsable_timeouts_from_the_environment_are_ignored() {
    let e = env();
    let plain = e.run(&["list-machines"]);
    // The baseline is a working listing, so "the same as it" means working.
    assert_eq!(plain.code, 0, "{plain:?}");
    assert!(plain.stdout.contains("172.17.8.101"), "{plain:?}");
    for var in ["FLEETCTL_REQUEST_TIMEOUT", "FLEETCTL_SSH_TIMEOUT"] {
        let r = e.run_env(&[(var, "abc")], &["list-machines"]);
        assert_eq!(outcome(&r), outcome(&plain), "{var}");
    }
    let r = e.run(&["--request-timeout", "abc", "list-machines"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("invalid value 'abc' for '--request-timeout"),
        "{}",
        r.stderr
    );
}

/// Point 10: `unix:/path` (one slash) is the same endpoint as `unix:///path`, as Go's url.Parse
/// reads it.
#[test]
fn endpoint_with_one_slash_works() {
    let e = env();
    let sock = e.b.socket("c1");
    let plain = e.run_env(
        &[("FLEETCTL_ENDPOINT", &format!("unix://{}", sock.display()))],
        &["list-machines"],
    );
    assert_eq!(plain.code, 0, "{plain:?}");
    let r = e.run_env(
        &[("FLEETCTL_ENDPOINT", &format!("unix:{}", sock.display()))],
        &["list-machines"],
    );
    assert_eq!(outcome(&r), outcome(&plain));
}

/// Point 11: The original's remote setup, `FLEETCTL_TUNNEL=host` with the *remote* fleet socket as
/// `FLEETCTL_ENDPOINT`, means that cluster; another remote path is refused, never dialled.
#[test]
fn tunnel_with_the_remote_fleet_socket_means_the_cluster() {
    let e = env();
    let before = e.b.cluster_info("c1")["requests"].as_u64().unwrap_or(0);
    let remote = format!("unix://{}", e.w.sim.socket.display());
    let tunnel = e.w.sshd.tunnel();
    let r = e.run_env(
        &[("FLEETCTL_TUNNEL", &tunnel), ("FLEETCTL_ENDPOINT", &remote)],
        &["list-machines"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, e.run(&["list-machines"]).stdout);
    let after = e.b.cluster_info("c1")["requests"].as_u64().unwrap_or(0);
    assert!(
        after > before,
        "went through the broker ({before} → {after})"
    );
    let r = e.run_env(
        &[
            ("FLEETCTL_TUNNEL", &tunnel),
            ("FLEETCTL_ENDPOINT", "unix:///var/run/other.sock"),
        ],
        &["list-machines"],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("Unable to initialize client: endpoint unix:///var/run/other.sock is not the fleet endpoint of cluster \"c1\""),
        "{}",
        r.stderr
    );
}

/// Point 12: A broker 503 names the cluster once, says what to run, and drops fleetctl's etcd hint.
#[test]
fn a_broker_503_names_the_cluster_once_and_the_fix() {
    let mut w = World::new();
    let b = w.broker("connect_timeout = \"2s\"");
    let cwd = open_tempdir("fb-compat.");
    w.sshd.kill();
    let r = fleetctl(&b, cwd.path(), &[], &["list-machines"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("Error retrieving list of active machines from fleet API (googleapi: Error 503: cluster \"c1\": "),
        "{}",
        r.stderr
    );
    assert_eq!(
        r.stderr.matches("cluster \"c1\"").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.ends_with(
            "; `fleet-broker status` shows the tunnel, `fleet-broker connect c1` retries now)\n"
        ),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("Possible issues"), "{}", r.stderr);
    assert!(r.stderr.contains(&w.sshd.tunnel()), "{}", r.stderr);
}
