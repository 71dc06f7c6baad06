//! Several clusters at once: fan-out reads with a CLUSTER column, a cluster that is down
//! named on stderr while the others print, and changes refused for more than one cluster.
//! Real sshd, ssh-agent and simulators behind it; the down cluster's tunnel is a closed port.

mod support;

use std::time::Instant;

use support::*;

/// Three clusters: c1 and c2 on two simulators behind one sshd, c3 down; the config lists
/// c2 first, and every list follows the config's order.
fn three_clusters() -> (World, SimServer, Broker) {
    let w = World::new();
    let sim2 = SimServer::start();
    w.sim.put(
        "a.service",
        vec![opt("Service", "ExecStart", "/bin/true")],
        "launched",
    );
    sim2.put(
        "b.service",
        vec![opt("Service", "ExecStart", "/bin/false")],
        "inactive",
    );
    let config = format!(
        "{}{}{}",
        cluster_toml(
            "c2",
            &w.sshd,
            &format!("unix://{}", sim2.socket.display()),
            "root",
            &w.known_hosts,
            "",
        ),
        w.config(""),
        down_cluster_toml("c3")
    );
    let b = Broker::start(&config, Some(&w.agent.socket));
    (w, sim2, b)
}

#[test]
fn fan_out_lists_every_cluster_with_a_cluster_column_and_names_the_one_down() {
    let (_w, _sim2, b) = three_clusters();
    let cwd = open_tempdir("fb-cwd.");
    let started = Instant::now();
    let run = fleetctl(
        &b,
        cwd.path(),
        &[],
        &[
            "--cluster",
            "c*",
            "list-unit-files",
            "--fields",
            "cluster,unit,dstate",
        ],
    );
    let took = started.elapsed();
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stdout, "CLUSTER\tUNIT\t\tDSTATE\nc2\tb.service\tinactive\nc1\ta.service\tlaunched\n",
        "{run:?}"
    );
    assert!(
        run.stderr
            .starts_with("cluster c3: Error retrieving list of units from repository: ")
            && !run.stderr.contains("cluster c1")
            && !run.stderr.contains("cluster c2"),
        "{}",
        run.stderr
    );
    // The one down costs its connect_timeout (2 s), not the others' patience.
    assert!(took.as_secs() < 10, "took {took:?}");

    // Named clusters, the column where --fields puts it, the default columns after it.
    let run = fleetctl(
        &b,
        cwd.path(),
        &[],
        &[
            "--cluster",
            "c2,c1",
            "list-machines",
            "--no-legend",
            "--fields",
            "machine,cluster",
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "three machines each: {run:?}");
    assert!(
        lines[..3].iter().all(|l| l.ends_with("\tc2"))
            && lines[3..].iter().all(|l| l.ends_with("\tc1")),
        "clusters in the config's order: {run:?}"
    );
    let run = fleetctl(&b, cwd.path(), &[], &["--cluster", "c1,c2", "list-units"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.starts_with("CLUSTER\tUNIT\t"), "{run:?}");

    // cat: each cluster's file under its header; a cluster without it is said.
    let run = fleetctl(
        &b,
        cwd.path(),
        &[],
        &["--cluster", "c1,c2", "cat", "a.service"],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stdout, "==> c1 <==\n[Service]\nExecStart=/bin/true\n",
        "{run:?}"
    );
    assert_eq!(
        run.stderr, "cluster c2: Unit a.service not found\n",
        "{run:?}"
    );

    // Nothing matches: said, exit 1.
    let run = fleetctl(&b, cwd.path(), &[], &["--cluster", "x*", "list-units"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("no configured cluster matches \"x*\""),
        "{run:?}"
    );
}

#[test]
fn a_change_goes_to_one_cluster_at_a_time() {
    let (w, _sim2, b) = three_clusters();
    let cwd = open_tempdir("fb-cwd.");
    for args in [
        &["--cluster", "c1,c2", "destroy", "a.service"][..],
        &["--cluster", "c*", "start", "a.service"][..],
        &["--cluster", "c*", "ssh", "a.service"][..],
    ] {
        let run = fleetctl(&b, cwd.path(), &[], args);
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("names several clusters"),
            "{args:?}: {run:?}"
        );
    }
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/units/a.service", None).0,
        200,
        "nothing changed"
    );
    drop(w);
}

/// `fleet-broker diff A B` on two simulators: each kind of difference, diff(1)'s exit status.
#[test]
fn diff_reports_each_kind_of_difference_with_diffs_exit_status() {
    let (w, sim2, b) = three_clusters();
    // a.service only in c1, b.service only in c2 (three_clusters); now the rest.
    let same = vec![opt("Service", "ExecStart", "/bin/sleep 1")];
    w.sim.put("same.service", same.clone(), "launched");
    sim2.put("same.service", same, "launched");
    w.sim.put(
        "file.service",
        vec![opt("Service", "ExecStart", "/bin/v1")],
        "launched",
    );
    sim2.put(
        "file.service",
        vec![opt("Service", "ExecStart", "/bin/v2")],
        "launched",
    );
    let state = vec![opt("Service", "ExecStart", "/bin/state")];
    w.sim.put("state.service", state.clone(), "launched");
    sim2.put("state.service", state, "inactive");

    let out = b.cli(&["diff", "c1", "c2", "--content"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "only in c1: a.service", "{text}");
    assert_eq!(lines[1], "only in c2: b.service", "{text}");
    assert!(
        lines[2].starts_with("unit file differs: file.service ("),
        "{text}"
    );
    assert_eq!(
        &lines[3..9],
        [
            "--- c1/file.service",
            "+++ c2/file.service",
            "@@ -1,2 +1,2 @@",
            " [Service]",
            "-ExecStart=/bin/v1",
            "+ExecStart=/bin/v2",
        ],
        "{text}"
    );
    assert_eq!(
        lines[9], "desired state differs: state.service (launched in c1, inactive in c2)",
        "{text}"
    );
    assert_eq!(lines.len(), 10, "same.service is not listed: {text}");

    // The same cluster twice: nothing to say, exit 0.
    let out = b.cli(&["diff", "c1", "c1"]);
    assert_eq!(
        (out.status.code(), out.stdout.as_slice()),
        (Some(0), &b""[..]),
        "{out:?}"
    );
    // A cluster that is down, or not configured: exit 2, said.
    let out = b.cli(&["diff", "c1", "c3"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cluster c3: "),
        "{out:?}"
    );
    let out = b.cli(&["diff", "c1", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no cluster named \"nope\""),
        "{out:?}"
    );
}

/// The bash completions offer the configured cluster names (read from the config as you
/// type, no daemon needed) for `--cluster` and for the commands that take a cluster, and
/// clap's completion for the rest.
#[test]
fn completions_offer_the_configured_cluster_names() {
    let dir = open_tempdir("fb-complete.");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[clusters.prod-eu]\ntunnel = \"127.0.0.1:1\"\n[clusters.prod-us]\ntunnel = \"127.0.0.1:2\"\n[clusters.staging]\ntunnel = \"127.0.0.1:3\"\n",
    )
    .expect("config");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fleet-broker"));
    let path = format!(
        "{}:{}",
        bin.parent().expect("bin dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let complete = |fleetctl: bool, words: &str| {
        let script = format!(
            "source <(fleet-broker completions bash{}); COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); {} ; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            if fleetctl { " --fleetctl" } else { "" },
            if fleetctl { "_fleetctl__clusters fleetctl" } else { "_fleet__broker__clusters fleet-broker" },
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .env("PATH", &path)
            .env("FLEET_BROKER_CONFIG", &config)
            .output()
            .expect("bash");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        complete(false, "fleet-broker connect ''"),
        "prod-eu\nprod-us\nstaging\n"
    );
    assert_eq!(
        complete(false, "fleet-broker diff staging prod"),
        "prod-eu\nprod-us\n"
    );
    assert_eq!(complete(true, "fleetctl --cluster st"), "staging\n");
    assert_eq!(
        complete(true, "fleetctl list-units --cluster p"),
        "prod-eu\nprod-us\n"
    );
    // Elsewhere clap's own completion answers: subcommands, not clusters.
    let subcommands = complete(false, "fleet-broker con");
    assert!(
        subcommands.contains("connect") && !subcommands.contains("staging"),
        "{subcommands}"
    );
}
