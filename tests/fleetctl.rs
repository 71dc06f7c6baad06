//! Our fleetctl end to end: the CLI binary, the daemon, a real sshd and the simulator.
//! Golden outputs are byte-exact, tabs included.

mod support;

use fleet_broker::fleet::unit_file::hash;
use std::process::Command;

use support::*;

type Env = CliEnv;

fn env() -> Env {
    CliEnv::new()
}

const HELLO: &str = "[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/sleep 3000\n";

fn ok(r: &Run) {
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
}

#[test]
fn list_machines_golden() {
    let e = env();
    let r = e.run(&["list-machines"]);
    ok(&r);
    assert_eq!(
        r.stdout,
        "MACHINE\t\tIP\t\tMETADATA\n113f16a7...\t172.17.8.103\taz=us-west-1b,role=web\n85c0c595...\t172.17.8.102\t-\ne793afb9...\t172.17.8.101\t-\n"
    );
    let r = e.run(&["list-machines", "--full", "--no-legend"]);
    assert_eq!(
        r.stdout,
        "113f16a7b8a94d0e9e4a2b1c3d5e7f90\t172.17.8.103\taz=us-west-1b,role=web\n85c0c5951d6b4f3aa2b8c9d0e1f2a3b4\t172.17.8.102\t-\ne793afb9c3d14e5f8a6b7c8d9e0f1a2b\t172.17.8.101\t-\n"
    );
    assert_eq!(
        e.run(&["list-machines", "-l"]).stdout,
        e.run(&["list-machines", "--l"]).stdout
    );
    assert_eq!(
        e.run(&["list-machines", "--full"]).stdout,
        e.run(&["list-machines", "--l"]).stdout
    );
    let r = e.run(&["list-machines", "--fields", "ip,machine"]);
    assert_eq!(r.stdout, "IP\t\tMACHINE\n172.17.8.103\t113f16a7...\n172.17.8.102\t85c0c595...\n172.17.8.101\te793afb9...\n");
    let r = e.run(&["list-machines", "--fields="]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Must define output format\n")
    );
    let r = e.run(&["list-machines", "--fields", "ip,bogus"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Invalid key in output format: \"bogus\"\n")
    );
    // cobra-style unique prefixes
    assert_eq!(e.run(&["list-m"]).stdout, e.run(&["list-machines"]).stdout);
}

fn opts(text: &str) -> Vec<fleet_broker::fleet::schema::UnitOption> {
    fleet_broker::fleet::unit_file::parse(text).expect("unit")
}

#[test]
fn list_units_and_unit_files_golden() {
    let e = env();
    let glob = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n";
    e.w.sim.put("hello.service", opts(HELLO), "launched");
    e.w.sim.put("glob.service", opts(glob), "launched");
    e.w.sim.put(
        "idle.service",
        opts("[Unit]\nDescription=Idle\n[Service]\nExecStart=/bin/true\n"),
        "inactive",
    );
    let hh = hash(&opts(HELLO));
    let gh = hash(&opts(glob));
    let ih = hash(&opts(
        "[Unit]\nDescription=Idle\n[Service]\nExecStart=/bin/true\n",
    ));
    let r = e.run(&["list-units"]);
    ok(&r);
    assert_eq!(
        r.stdout,
        "UNIT\t\tMACHINE\t\t\t\tACTIVE\tSUB\n\
         glob.service\t113f16a7.../172.17.8.103\tactive\trunning\n\
         glob.service\t85c0c595.../172.17.8.102\tactive\trunning\n\
         glob.service\te793afb9.../172.17.8.101\tactive\trunning\n\
         hello.service\t113f16a7.../172.17.8.103\tactive\trunning\n"
    );
    let r = e.run(&[
        "list-units",
        "--fields",
        "unit,hash,load",
        "--no-legend",
        "--full",
    ]);
    assert_eq!(
        r.stdout,
        format!("glob.service\t{gh}\tloaded\nglob.service\t{gh}\tloaded\nglob.service\t{gh}\tloaded\nhello.service\t{hh}\tloaded\n")
    );
    let r = e.run(&[
        "list-units",
        "--fields",
        "unit,machine",
        "-l",
        "--no-legend",
    ]);
    assert!(
        r.stdout
            .starts_with("glob.service\t113f16a7b8a94d0e9e4a2b1c3d5e7f90/172.17.8.103\n"),
        "{}",
        r.stdout
    );
    let r = e.run(&["list-units", "--fields", "unit,nope"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Invalid key in output format: \"nope\"\n")
    );

    let r = e.run(&["list-unit-files"]);
    ok(&r);
    assert_eq!(
        r.stdout,
        format!(
            "UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET\n\
             glob.service\t{}\tlaunched\t-\t\tglobal\n\
             hello.service\t{}\tlaunched\tlaunched\t113f16a7.../172.17.8.103\n\
             idle.service\t{}\tinactive\tinactive\t-\n",
            &gh[..7],
            &hh[..7],
            &ih[..7]
        )
    );
    let r = e.run(&[
        "list-unit-files",
        "--fields",
        "unit,desc,global,tmachine",
        "--no-legend",
    ]);
    assert_eq!(
        r.stderr,
        "WARNING: The \"tmachine\" field is deprecated. Use \"target\" instead\n"
    );
    assert_eq!(
        r.stdout,
        "glob.service\t-\t\ttrue\tglobal\nhello.service\tHello World\tfalse\t113f16a7.../172.17.8.103\nidle.service\tIdle\t\tfalse\t-\n"
    );
}

#[test]
fn lists_follow_every_page() {
    let e = env();
    e.w.sim.sim.lock().expect("sim").put_many(
        (0..250)
            .map(|i| {
                (
                    format!("p{i:03}.service"),
                    opts("[Service]\nExecStart=/bin/true\n"),
                    "launched".to_string(),
                )
            })
            .collect(),
    );
    let r = e.run(&["list-units", "--no-legend", "--fields", "unit"]);
    ok(&r);
    let want: String = (0..250).map(|i| format!("p{i:03}.service\n")).collect();
    assert_eq!(r.stdout, want);
    let r = e.run(&["list-unit-files", "--no-legend", "--fields", "unit"]);
    assert_eq!(r.stdout, want);
    // An exactly full last page (token, then `{}`) ends the listing too.
    e.w.sim.sim.lock().expect("sim").put_many(
        (250..300)
            .map(|i| {
                (
                    format!("p{i:03}.service"),
                    opts("[Service]\nExecStart=/bin/true\n"),
                    "launched".to_string(),
                )
            })
            .collect(),
    );
    let r = e.run(&["list-unit-files", "--no-legend", "--fields", "unit"]);
    assert_eq!(r.stdout.lines().count(), 300);
}

#[test]
fn submit_start_stop_unload_destroy_flow() {
    let e = env();
    e.write("hello.service", HELLO);
    let r = e.run(&["submit", "hello"]);
    ok(&r);
    assert_eq!(r.stdout, "Unit hello.service inactive\n");
    let r = e.run(&["cat", "hello"]);
    ok(&r);
    assert_eq!(
        r.stdout, HELLO,
        "cat prints the serialized unit, nothing added"
    );
    let r = e.run(&["load", "hello.service"]);
    ok(&r);
    assert_eq!(
        r.stdout,
        "Unit hello.service loaded on 113f16a7.../172.17.8.103\n"
    );
    let r = e.run(&["start", "hello"]);
    ok(&r);
    assert_eq!(
        r.stdout,
        "Unit hello.service launched on 113f16a7.../172.17.8.103\n"
    );
    let r = e.run(&["start", "hello"]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "", ""),
        "already launched: nothing to do"
    );
    let r = e.run(&["stop", "hello"]);
    ok(&r);
    assert_eq!(
        r.stdout,
        "Unit hello.service loaded on 113f16a7.../172.17.8.103\n"
    );
    assert_eq!(r.stderr, "Successfully stopped units [hello.service].\n");
    let r = e.run(&["stop", "hello"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (0, "Successfully stopped units [].\n")
    );
    let r = e.run(&["unload", "hello"]);
    ok(&r);
    assert_eq!(r.stdout, "Unit hello.service inactive\n");
    assert_eq!(r.stderr, "Successfully unloaded units [hello.service].\n");
    let r = e.run(&["stop", "hello"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unable to stop unit hello.service in state inactive\n")
    );
    let r = e.run(&["destroy", "hello", "absent"]);
    ok(&r);
    assert_eq!(r.stdout, "Destroyed hello.service\n");
    let r = e.run(&["cat", "hello"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unit hello.service not found\n")
    );
    let r = e.run(&["stop", "hello"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (0, "Units not found in registry\n")
    );
    for cmd in ["submit", "load", "start", "stop", "unload", "destroy"] {
        let r = e.run(&[cmd]);
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (0, "No units given\n"),
            "{cmd}"
        );
    }
    let r = e.run(&["cat"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "One unit file must be provided\n")
    );
}

#[test]
fn no_block_triggers_without_waiting() {
    let e = env();
    e.write("a.service", HELLO);
    let r = e.run(&["start", "--no-block", "a"]);
    ok(&r);
    assert_eq!(
        r.stdout,
        "Unit a.service inactive\nTriggered unit a.service start\nTriggered unit a.service start\n"
    );
    // fleetctl stops only a unit whose current state is launched: wait for fleet to get
    // there (the simulator moves as fleet does).
    wait_until("a.service to be launched", DEADLINE, || {
        e.sim()
            .unit("a.service")
            .is_some_and(|u| u.current_state == "launched")
    });
    let r = e.run(&["stop", "--no-block", "a"]);
    assert_eq!(r.stdout, "Triggered unit a.service stop\n");
    let r = e.run(&["destroy", "--no-block", "a"]);
    assert_eq!(r.stdout, "Destroyed a.service\n");
}

#[test]
fn global_units_are_triggered_not_waited_for() {
    let e = env();
    e.write(
        "g.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n",
    );
    let r = e.run(&["start", "g"]);
    ok(&r);
    assert_eq!(
        r.stdout,
        "Unit g.service \nTriggered global unit g.service start\n"
    );
    let r = e.run(&["stop", "g"]);
    ok(&r);
    assert_eq!(r.stdout, "Triggered global unit g.service stop\n");
    assert_eq!(r.stderr, "Successfully stopped units [].\n");
}

#[test]
fn templates_from_local_file_and_registry() {
    let e = env();
    e.write(
        "web@.service",
        "[Unit]\nDescription=Web %i\n\n[Service]\nExecStart=/bin/sleep 1000\n",
    );
    let r = e.run(&["submit", "web@1"]);
    ok(&r);
    assert_eq!(r.stdout, "Unit web@1.service inactive\n");
    let r = e.run(&["cat", "web@1"]);
    assert_eq!(
        r.stdout, "[Unit]\nDescription=Web %i\n\n[Service]\nExecStart=/bin/sleep 1000\n",
        "options verbatim, %i kept"
    );
    // From the registry's template when there is no local file.
    let other = open_tempdir("fb-other.");
    let r = fleetctl(&e.b, other.path(), &[], &["submit", "web@.service"]);
    assert_eq!(r.code, 1, "no local template file in this directory: {r:?}");
    let r = e.run(&["submit", "web@.service"]);
    ok(&r);
    let r = fleetctl(&e.b, other.path(), &[], &["start", "web@2"]);
    ok(&r);
    assert_eq!(
        r.stdout,
        "Unit web@2.service inactive\nUnit web@2.service launched on 113f16a7.../172.17.8.103\n"
    );
    let r = fleetctl(&e.b, other.path(), &[], &["submit", "api@1"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr, "Error creating units: failed getting Unit(api@1.service) from template: unable to find template Unit(api@.service) in Registry or on filesystem\n");
    let r = e.run(&["submit", "nothere"]);
    assert_eq!((r.code, r.stderr.as_str()), (1, "Error creating units: unable to find Unit(nothere.service) in Registry or on filesystem\n"));
}

/// fleetd leaves an option's empty value out of its answers (every field is omitempty);
/// `ExecStartPre=` (which empties systemd's list) comes back and prints as written.
#[test]
fn an_option_with_an_empty_value_survives_the_round_trip() {
    let e = env();
    let unit = "[Service]\nExecStartPre=\nExecStart=/bin/sleep 1000\n";
    e.write("empty.service", unit);
    ok(&e.run(&["submit", "empty"]));
    let r = e.run(&["cat", "empty"]);
    ok(&r);
    assert_eq!(r.stdout, unit);
    let r = e.run(&["list-unit-files", "--no-legend", "--fields", "unit,hash"]);
    ok(&r);
    assert!(r.stdout.starts_with("empty.service\t"), "{r:?}");
}

#[test]
fn replace_rules() {
    let e = env();
    e.write("r.service", HELLO);
    ok(&e.run(&["submit", "r"]));
    let changed = "[Unit]\nDescription=Changed\n\n[Service]\nExecStart=/bin/sleep 3000\n";
    e.write("r.service", changed);
    let r = e.run(&["submit", "r"]);
    ok(&r);
    assert_eq!(r.stderr, "WARNING: Unit r.service in registry differs from local unit file r.service. Add --replace to override.\n");
    assert_eq!(e.run(&["cat", "r"]).stdout, HELLO);
    let r = e.run(&["submit", "--replace", "r"]);
    ok(&r);
    assert_eq!(r.stdout, "Unit r.service inactive\n");
    assert_eq!(e.run(&["cat", "r"]).stdout, changed);
    let r = e.run(&["submit", "--replace", "r"]);
    assert_eq!(
        r.stdout,
        "Found same Unit(r.service) in Registry, nothing to do\n"
    );
    ok(&e.run(&["start", "r"]));
    e.write("r.service", HELLO);
    let r = e.run(&["submit", "--replace", "r"]);
    ok(&r);
    assert_eq!(r.stderr, "Warning: can not replace Unit(r.service) in state 'launched', use the appropriate command\n");
    assert_eq!(e.run(&["cat", "r"]).stdout, changed);
    let r = e.run(&["start", "--replace", "r"]);
    ok(&r);
    assert_eq!(e.run(&["cat", "r"]).stdout, HELLO);
}

#[test]
fn local_validation_uses_the_servers_messages() {
    let e = env();
    e.write(
        "both.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineID=abc\nGlobal=true\n",
    );
    let r = e.run(&["submit", "both"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            "Error creating units: MachineID cannot be used with Global\n"
        )
    );
    e.write(
        "long.service",
        &format!("[Service]\nExecStart=/bin/{}\n", "x".repeat(2100)),
    );
    let r = e.run(&["submit", "long"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr, "Error creating units: failed getting Unit(long.service) from file: long.service: line too long (max 2048 bytes)\n");
    e.write(
        "odd.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nFrobnicate=yes\n",
    );
    let r = e.run(&["submit", "odd"]);
    ok(&r);
    assert!(
        r.stderr.ends_with(
            "Unit odd.service: unrecognized requirement in [X-Fleet] section: \"Frobnicate\"\n"
        ),
        "{}",
        r.stderr
    );
    e.write("bad name.service", HELLO);
    let r = e.run(&["submit", "bad name"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            "Error creating units: invalid character ' ' in unit name\n"
        )
    );
}

#[test]
fn unschedulable_unit_is_reported_when_attempts_run_out() {
    let e = env();
    e.write(
        "nowhere.service",
        "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineMetadata=role=db\n",
    );
    let r = e.run(&["start", "--block-attempts=1", "nowhere"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, "Unit nowhere.service inactive\n");
    // fleetctl's two lines, after ours saying what was seen (never a guessed cause).
    assert_eq!(
        r.stderr,
        "Unit nowhere.service was not scheduled to any machine while waiting; `fleetctl list-machines` shows what its [X-Fleet] requirements can match\nError waiting for units: timed out waiting for unit nowhere.service to report state launched\nError waiting for unit states, exit status: timed out waiting for unit nowhere.service to report state launched\n"
    );
}

#[test]
fn usage_errors_exit_2_and_version_prints() {
    let e = env();
    let r = e.run(&["bogus"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("unrecognized subcommand 'bogus'"),
        "{}",
        r.stderr
    );
    let r = e.run(&["list-machines", "--nope"]);
    assert_eq!(r.code, 2);
    for v in [&["--version"][..], &["-v"], &["version"]] {
        let r = e.run(v);
        ok(&r);
        assert!(
            r.stdout.starts_with("fleetctl version 1.0.0"),
            "{}",
            r.stdout
        );
    }
    let r = e.run(&[]);
    ok(&r);
    assert!(r.stdout.contains("list-units"));
    let r = e.run(&["verify", "x"]);
    assert_eq!(r.code, 2);
    let r = fleetctl(
        &e.b,
        e.cwd.path(),
        &[("FLEETCTL_DRIVER", "etcd")],
        &["list-machines"],
    );
    ok(&r);
    assert!(
        r.stderr.contains("WARNING: --driver is ignored"),
        "{}",
        r.stderr
    );
    let r = fleetctl(
        &e.b,
        e.cwd.path(),
        &[("FLEETCTL_DEBUG", "true")],
        &["list-machines"],
    );
    assert!(
        r.stderr
            .contains(" DEBUG http.go:28: HTTP GET http://domain-sock/fleet/v1/machines?alt=json"),
        "{}",
        r.stderr
    );
    let r = e.run(&["--debug", "list-machines"]);
    assert!(
        r.stderr.contains("HTTP GET"),
        "--debug works on the command line: {}",
        r.stderr
    );
}

fn two_cluster_env() -> (World, SimServer, Broker, tempfile::TempDir) {
    let w = World::new();
    let sim_b = SimServer::with(
        vec![fleet_broker::fleet::schema::Machine {
            id: "b0b0b0b0b0b0".into(),
            primary_ip: "10.9.9.9".into(),
            ..Default::default()
        }],
        false,
    );
    let config = format!(
        "{}{}",
        cluster_toml(
            "alpha",
            &w.sshd,
            &format!("unix://{}", w.sim.socket.display()),
            "root",
            &w.known_hosts,
            ""
        ),
        cluster_toml(
            "beta",
            &w.sshd,
            &format!("unix://{}", sim_b.socket.display()),
            "root",
            &w.known_hosts,
            ""
        )
    );
    let b = Broker::start(&config, Some(&w.agent.socket));
    let cwd = open_tempdir("fb-cwd.");
    (w, sim_b, b, cwd)
}

#[test]
fn cluster_selection_rules() {
    let (w, _sim_b, b, cwd) = two_cluster_env();
    let cwd = cwd.path();
    let r = fleetctl(&b, cwd, &[], &["list-machines", "--no-legend"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .starts_with("Unable to initialize client: no cluster chosen"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("configured: alpha, beta"), "{}", r.stderr);
    assert!(
        r.stderr.contains("eval \"$(fleet-broker env alpha)\""),
        "{}",
        r.stderr
    );

    let beta = "b0b0b0b0...\t10.9.9.9\t-\n";
    assert_eq!(
        fleetctl(
            &b,
            cwd,
            &[],
            &["--cluster", "beta", "list-machines", "--no-legend"]
        )
        .stdout,
        beta
    );
    assert_eq!(
        fleetctl(
            &b,
            cwd,
            &[],
            &["list-machines", "--no-legend", "--cluster=beta"]
        )
        .stdout,
        beta
    );
    assert_eq!(
        fleetctl(
            &b,
            cwd,
            &[("FLEETCTL_CLUSTER", "beta")],
            &["list-machines", "--no-legend"]
        )
        .stdout,
        beta
    );
    let ep = format!("unix://{}", b.socket("beta").display());
    assert_eq!(
        fleetctl(
            &b,
            cwd,
            &[("FLEETCTL_ENDPOINT", &ep)],
            &["list-machines", "--no-legend"]
        )
        .stdout,
        beta
    );
    // A flag beats the environment.
    let r = fleetctl(
        &b,
        cwd,
        &[("FLEETCTL_CLUSTER", "alpha")],
        &["--endpoint", &ep, "list-machines", "--no-legend"],
    );
    assert_eq!(r.stdout, beta);
    // Any unix socket works, even fleet's own.
    let direct = format!("unix://{}", w.sim.socket.display());
    let r = fleetctl(
        &b,
        cwd,
        &[],
        &["--endpoint", &direct, "list-machines", "--no-legend"],
    );
    assert!(r.stdout.starts_with("113f16a7...\t172.17.8.103"), "{r:?}");
    let r = fleetctl(
        &b,
        cwd,
        &[],
        &["--tunnel", &w.sshd.tunnel(), "list-machines", "--no-legend"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let r = fleetctl(
        &b,
        cwd,
        &[],
        &["--tunnel", "elsewhere.example", "list-machines"],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("no fleet-broker cluster has tunnel elsewhere.example:22"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!("alpha ({})", w.sshd.tunnel())),
        "{}",
        r.stderr
    );
    let r = fleetctl(&b, cwd, &[], &["--cluster", "gamma", "list-machines"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("no cluster named \"gamma\" in fleet-broker (configured: alpha, beta)"),
        "{}",
        r.stderr
    );
    let r = fleetctl(
        &b,
        cwd,
        &[],
        &["--endpoint", "http://10.0.0.1:49153", "list-machines"],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("never opens network connections"),
        "{}",
        r.stderr
    );

    // fleet-broker env prints what selects a cluster.
    let out = b.cli(&["env", "beta"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        format!(
            "export FLEETCTL_ENDPOINT='unix://{}' FLEETCTL_CLUSTER='beta'\n",
            b.socket("beta").display()
        )
    );
    let out = b.cli(&["env", "beta", "--shell", "fish"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("set -gx FLEETCTL_ENDPOINT 'unix://"));
    assert!(!b.cli(&["env", "nope"]).status.success());
    // Quoted for the shell whatever the path holds; --unset undoes it.
    let odd = open_tempdir("fb-odd.");
    let runtime = odd.path().join("it's a \"dir\" $HOME");
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args(["env", "beta"])
        .env("FLEET_BROKER_CONFIG", b.dir.path().join("config.toml"))
        .env("FLEET_BROKER_RUNTIME_DIR", &runtime)
        .output()
        .expect("env");
    assert!(out.status.success(), "{out:?}");
    let script = format!(
        "{}\nprintf '%s|%s' \"$FLEETCTL_ENDPOINT\" \"$FLEETCTL_CLUSTER\"\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&b.cli(&["env", "--unset"]).stdout)
    );
    let got = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{script}\nprintf '|%s' \"${{FLEETCTL_CLUSTER-unset}}\""
        ))
        .output()
        .expect("sh");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        format!("unix://{}/clusters/beta.sock|beta|unset", runtime.display())
    );
}

#[test]
fn api_errors_are_reported_like_fleetctl() {
    let e = env();
    // An endpoint nobody serves.
    let gone = e.cwd.path().join("gone.sock");
    let ep = format!("unix://{}", gone.display());
    let r = fleetctl(
        &e.b,
        e.cwd.path(),
        &[("FLEETCTL_ENDPOINT", &ep)],
        &["list-units"],
    );
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        format!(
            "Error retrieving list of units from repository: Get \"http://domain-sock/fleet/v1/state?alt=json\": dial unix {}: connect: no such file or directory\n",
            gone.display()
        )
    );
    let r = fleetctl(
        &e.b,
        e.cwd.path(),
        &[("FLEETCTL_ENDPOINT", &ep)],
        &["list-machines"],
    );
    assert!(
        r.stderr
            .starts_with("Error retrieving list of active machines from fleet API (Get "),
        "{}",
        r.stderr
    );
    assert!(r.stderr.ends_with("Possible issues:\n  etcd is unhealthy and/or lost quorum\n  connection cannot be established to any etcd servers\n"));
    // A socket that accepts but never answers: --request-timeout bounds the wait.
    let silent = e.cwd.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent).expect("bind");
    let ep = format!("unix://{}", silent.display());
    let r = fleetctl(
        &e.b,
        e.cwd.path(),
        &[("FLEETCTL_ENDPOINT", &ep)],
        &["--request-timeout", "0.5", "list-unit-files"],
    );
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        "Error retrieving list of units from repository: Get \"http://domain-sock/fleet/v1/units?alt=json\": no response within 500ms (raise --request-timeout)\n"
    );
}

#[test]
fn fleetctl_cluster_demo_works_against_fleet_broker_demo() {
    use std::process::{Command, Stdio};
    let xdg = open_tempdir("fb-demo.");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("demo")
        .env("XDG_RUNTIME_DIR", xdg.path())
        .env_remove("FLEET_BROKER_RUNTIME_DIR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo");
    let stdout = demo.stdout.take().expect("stdout");
    let rx = line_reader(stdout);
    let mut seen = Vec::new();
    let end = std::time::Instant::now() + DEADLINE;
    while !seen
        .iter()
        .any(|l: &String| l.starts_with("Serving until Ctrl-C"))
    {
        let left = end.saturating_duration_since(std::time::Instant::now());
        seen.push(
            rx.recv_timeout(left)
                .unwrap_or_else(|_| panic!("demo did not come up: {seen:?}")),
        );
    }
    let demo_fleetctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .args(["--cluster", "demo"])
            .args(args)
            .env("XDG_RUNTIME_DIR", xdg.path())
            .env_remove("FLEETCTL_ENDPOINT")
            .env_remove("FLEETCTL_CLUSTER")
            .stdin(Stdio::null())
            .output()
            .expect("fleetctl")
    };
    let out = demo_fleetctl(&["list-machines"]);
    // status and journal run on the simulated machines, end to end through the daemon.
    let unit_status = demo_fleetctl(&["status", "hello.service"]);
    let journal = demo_fleetctl(&["journal", "hello.service"]);
    let ssh = demo_fleetctl(&["ssh", "hello.service", "uptime"]);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = demo.wait().expect("demo exit");
    assert!(status.success(), "demo exits cleanly on SIGTERM");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "MACHINE\t\tIP\t\tMETADATA\n113f16a7...\t172.17.8.103\taz=us-west-1b,role=web\n85c0c595...\t172.17.8.102\t-\ne793afb9...\t172.17.8.101\t-\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !xdg.path().join("fleet-broker/clusters/demo.sock").exists(),
        "sockets removed"
    );
    assert!(unit_status.status.success(), "{unit_status:?}");
    assert!(
        String::from_utf8_lossy(&unit_status.stdout).starts_with("● hello.service - Hello World\n"),
        "{unit_status:?}"
    );
    assert!(journal.status.success(), "{journal:?}");
    assert!(
        String::from_utf8_lossy(&journal.stdout).contains("sleep[1042]: Hello from hello.service"),
        "{journal:?}"
    );
    assert_eq!(ssh.status.code(), Some(127), "{ssh:?}");
    assert!(
        String::from_utf8_lossy(&ssh.stdout).contains("a simulated machine of `fleet-broker demo`"),
        "{ssh:?}"
    );
}

/// Whoever can write fleet's registry chooses unit names, unit files, states and machine
/// metadata. Control characters in them are shown escaped in every table and in `cat` on a
/// terminal, so they cannot hide or rewrite rows; `cat` into a pipe gives the file as it is.
#[test]
fn control_characters_from_the_cluster_are_shown_escaped() {
    let mut machines = fleet_broker::sim::demo_machines();
    machines[0]
        .metadata
        .insert("role".into(), "web\x1b[2K\rfake".into());
    let w = World::with_machines(machines);
    let b = w.broker("");
    let sim = &w.sim;
    let unit = "evil\x1b[8m.service";
    sim.put(
        unit,
        vec![opt("Service", "ExecStart", "/bin/echo \x1b]0;pwned\x07")],
        "launched",
    );
    let cwd = open_tempdir("fb-cli.");
    for args in [
        vec!["list-machines"],
        vec!["list-units"],
        vec!["list-unit-files"],
    ] {
        let r = fleetctl(&b, cwd.path(), &[], &args);
        ok(&r);
        assert!(
            !r.stdout.contains(['\x1b', '\r', '\x07']),
            "{args:?}: {:?}",
            r.stdout
        );
        let shown = if args[0] == "list-machines" {
            "role=web\\x1b[2K\\rfake"
        } else {
            "evil\\x1b[8m.service"
        };
        assert!(r.stdout.contains(shown), "{args:?}: {}", r.stdout);
    }
    // Into a pipe: the unit file byte for byte.
    let r = fleetctl(&b, cwd.path(), &[], &["cat", unit]);
    ok(&r);
    assert_eq!(
        r.stdout,
        "[Service]\nExecStart=/bin/echo \x1b]0;pwned\x07\n"
    );
    // On a terminal (script(1) gives it one): escaped.
    let tty = Command::new("script")
        .args([
            "-qec",
            &format!(
                "{} --cluster c1 cat 'evil\x1b[8m.service'",
                env!("CARGO_BIN_EXE_fleetctl")
            ),
            "/dev/null",
        ])
        .env("XDG_RUNTIME_DIR", b.dir.path().join("xdg"))
        .env_remove("FLEETCTL_ENDPOINT")
        .env_remove("FLEETCTL_TUNNEL")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script");
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{tty:?}");
    assert!(!screen.contains('\x1b'), "{screen:?}");
    assert!(
        screen.contains("ExecStart=/bin/echo \\x1b]0;pwned\\x07"),
        "{screen:?}"
    );
}

/// Pointed at fleetd's own socket (no broker cluster), `ssh`, `status` and `journal` look
/// their target up as the original does, with its messages; a machine that is found is named
/// with what running something there needs.
#[test]
fn on_fleetds_own_socket_remote_commands_look_up_as_the_original_and_name_what_ssh_needs() {
    let env = CliEnv::new();
    let direct = format!("unix://{}", env.w.sim.socket.display());
    let run = |args: &[&str]| {
        let mut all = vec!["--endpoint", direct.as_str()];
        all.extend_from_slice(args);
        env.run(&all)
    };
    let r = run(&["ssh", "nosuch"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            "Unable to proceed: could not find matching unit or machine\n"
        ),
        "{r:?}"
    );
    let r = run(&["ssh", "--unit", "nosuch.service", "true"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "Unable to proceed: unit does not exist\n"),
        "{r:?}"
    );
    let r = run(&["ssh", "113f", "true"]);
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr.starts_with("Failed running command over SSH: machine 113f16a7b8a94d0e9e4a2b1c3d5e7f90 (172.17.8.103): this endpoint is not a broker cluster"),
        "{r:?}"
    );
    for cmd in ["status", "journal"] {
        let r = run(&[cmd, "nosuch.service"]);
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (1, "Unit nosuch.service does not exist.\n"),
            "{cmd}: {r:?}"
        );
    }
}

/// Every wait command on the simulator moving as fleet does (reference B.6), with
/// `--block-attempts=N`, on a unit that is new, one already submitted or running, and one
/// that never gets there: each succeeds or fails where the original does on fleet, and a
/// failure comes only after the original's windows.
fn waits_on_fleets_clock(attempts: u32) {
    use fleet_broker::sim::{FleetDelays, Timing};
    use std::time::Instant;
    let env = CliEnv::new();
    env.sim().timing = Timing::Fleet(FleetDelays::observed());
    let sleeper = "[Service]\nExecStart=/bin/sleep 1000\n";
    let nowhere = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineID=nope\n";
    for name in [
        "new-load",
        "new-start",
        "sub-load",
        "sub-start",
        "run",
        "halt",
    ] {
        env.write(&format!("{name}.service"), sleeper);
    }
    for name in ["bad-load", "bad-start"] {
        env.write(&format!("{name}.service"), nowhere);
    }
    let flag = format!("--block-attempts={attempts}");
    let timed = |cmd: &str, unit: &str| {
        let t = Instant::now();
        // submit does not wait, and has no such flag.
        let r = if cmd == "submit" {
            env.run(&[cmd, unit])
        } else {
            env.run(&[cmd, &flag, unit])
        };
        let took = t.elapsed();
        eprintln!(
            "{cmd} {flag} {unit}: exit {} in {:.2} s",
            r.code,
            took.as_secs_f64()
        );
        (r, took)
    };
    let ok = |cmd: &str, unit: &str, line: &str| {
        let (r, _) = timed(cmd, unit);
        assert_eq!(r.code, 0, "{cmd} {flag} {unit}: {r:?}");
        assert!(r.stdout.contains(line), "{cmd} {flag} {unit}: {r:?}");
    };
    // Gives up with the original's message, after the windows the original waits.
    let gives_up = |cmd: &str, unit: &str, state: &str, windows: u32| {
        let (r, took) = timed(cmd, unit);
        assert_eq!(r.code, 1, "{cmd} {flag} {unit}: {r:?}");
        assert!(
            r.stderr.contains(&format!(
                "timed out waiting for unit {unit} to report state {state}"
            )),
            "{cmd} {flag} {unit}: {r:?}"
        );
        let at_least = 2.0 * f64::from(windows);
        assert!(
            took.as_secs_f64() >= at_least,
            "{cmd} {flag} {unit} gave up after {took:?}, before {at_least} s"
        );
    };
    ok(
        "load",
        "new-load.service",
        "Unit new-load.service loaded on",
    );
    ok(
        "start",
        "new-start.service",
        "Unit new-start.service launched on",
    );
    ok(
        "submit",
        "sub-load.service",
        "Unit sub-load.service inactive",
    );
    ok(
        "submit",
        "sub-start.service",
        "Unit sub-start.service inactive",
    );
    ok(
        "load",
        "sub-load.service",
        "Unit sub-load.service loaded on",
    );
    ok(
        "start",
        "sub-start.service",
        "Unit sub-start.service launched on",
    );
    ok("start", "run.service", "Unit run.service launched on");
    ok("stop", "run.service", "Unit run.service loaded on");
    ok("unload", "run.service", "Unit run.service inactive");
    ok("destroy", "run.service", "Destroyed run.service");
    ok("destroy", "sub-load.service", "Destroyed sub-load.service");
    // A unit no machine can take is created (its own wait, one window), then never gets
    // there: `attempts` more windows.
    gives_up("load", "bad-load.service", "loaded", 1 + attempts);
    gives_up("start", "bad-start.service", "launched", 1 + attempts);
    // Agents that stop acting: a running unit never reads loaded after stop.
    ok("start", "halt.service", "Unit halt.service launched on");
    env.sim().set_agents_down(true);
    gives_up("stop", "halt.service", "loaded", attempts);
}

#[test]
fn waits_on_fleets_clock_with_one_attempt() {
    waits_on_fleets_clock(1);
}

#[test]
fn waits_on_fleets_clock_with_two_attempts() {
    waits_on_fleets_clock(2);
}
