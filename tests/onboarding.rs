//! `fleet-broker import` and `remove` against a real sshd standing in for a Vagrant VM and for
//! an ssh_config host: the config written in place, the host pinned, nothing copied from
//! `StrictHostKeyChecking no`, and the cluster then used by our fleetctl.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::*;

fn broker_cli(config: &Path, args: &[&str]) -> Output {
    let runtime = open_tempdir("fb-noda.");
    Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("--config")
        .arg(config)
        .args(args)
        // No daemon here: the import says so instead of reloading one.
        .env("FLEET_BROKER_RUNTIME_DIR", runtime.path().join("run"))
        .env_remove("FLEET_BROKER_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("fleet-broker")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const ORIGINAL: &str = "# my clusters\n[defaults]\nconnect_timeout = \"5s\" # slow VMs\n";

#[test]
fn a_vagrant_project_imports_pinned_and_works() {
    let w = World::new();
    let dir = open_tempdir("fb-onboard.");
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, ORIGINAL).expect("config");
    let key = w.keys.path().join("id_ed25519");
    let vagrant = dir.path().join("vagrant-ssh-config");
    std::fs::write(
        &vagrant,
        format!(
            "Host core-01\n  HostName {ip}\n  User root\n  Port {port}\n  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  PasswordAuthentication no\n  IdentityFile \"{key}\"\n  IdentitiesOnly yes\n  LogLevel FATAL\n\nHost core-02\n  HostName {ip}\n  User root\n  Port 2200\n  IdentityFile \"{key}\"\n",
            ip = w.sshd.ip,
            port = w.sshd.port,
            key = key.display()
        ),
    )
    .expect("vagrant");
    let endpoint = format!("unix://{}", w.sim.socket.display());
    let vagrant_arg = vagrant.display().to_string();
    let args = |fp: &str| -> Vec<String> {
        [
            "import",
            "vagrant",
            "--name",
            "lab",
            "--endpoint",
            &endpoint,
            "--fingerprint",
            fp,
            &vagrant_arg,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let pins = dir.path().join("known_hosts.d/lab");
    // A fingerprint that is not the host's: nothing is written.
    let wrong = args("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let out = broker_cli(&cfg, &wrong.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("not pinned"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&cfg).expect("config"), ORIGINAL);
    assert!(!w.sshd.is_pinned_in(&pins));
    // The host's own fingerprint, checked by the script: pinned and imported.
    let right = args(&w.sshd.fingerprint());
    let out = broker_cli(&cfg, &right.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{out:?}");
    let said = text(&out.stdout);
    assert!(said.contains("added cluster \"lab\" (2 VMs"), "{said}");
    assert!(said.contains("no daemon is running"), "{said}");
    assert!(w.sshd.is_pinned_in(&pins));
    let written = std::fs::read_to_string(&cfg).expect("config");
    assert!(written.starts_with(ORIGINAL), "comments kept: {written}");
    assert!(!written.contains("/dev/null"), "{written}");
    assert!(
        !written.contains("host_key_checking"),
        "strict by default: {written}"
    );
    assert!(written.contains("[clusters.lab]"), "{written}");
    // Again without --replace: refused, unchanged.
    let out = broker_cli(&cfg, &right.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--replace"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&cfg).expect("config"), written);
    // The daemon serves it and fleetctl uses it.
    let b = Broker::start(&written, Some(&w.agent.socket));
    let cwd = open_tempdir("fb-cwd.");
    let r = fleetctl(&b, cwd.path(), &[], &["--cluster", "lab", "list-machines"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.starts_with("MACHINE\t\tIP\t\tMETADATA\n"),
        "{}",
        r.stdout
    );
    assert_eq!(r.stdout.lines().count(), 4, "{}", r.stdout);
    // remove undoes the import, comments kept.
    let out = broker_cli(&cfg, &["remove", "lab"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&cfg).expect("config"), ORIGINAL);
}

#[test]
fn an_ssh_config_host_with_proxyjump_imports_and_works() {
    let w = World::new();
    let dir = open_tempdir("fb-onboard.");
    let cfg = dir.path().join("config.toml");
    let key = w.keys.path().join("id_ed25519");
    let ssh_config = dir.path().join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!(
            "Host bastion\n  HostName {ip}\n  Port {port}\n  User root\n\nHost target\n  HostName {ip}\n  Port {port}\n  User root\n  ProxyJump bastion\n  IdentityFile {key}\n  UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n\nHost loose\n  HostName {ip}\n  Port {port}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n",
            ip = w.sshd.ip,
            port = w.sshd.port,
            key = key.display(),
            kh = w.known_hosts.display()
        ),
    )
    .expect("ssh_config");
    let endpoint = format!("unix://{}", w.sim.socket.display());
    let sc = ssh_config.display().to_string();
    let out = broker_cli(
        &cfg,
        &[
            "import",
            "ssh-config",
            "target",
            "--ssh-config",
            &sc,
            "--endpoint",
            &endpoint,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stderr).is_empty(), "{out:?}");
    let written = std::fs::read_to_string(&cfg).expect("config");
    assert!(
        written.contains(&format!("jump = [\"root@{}:{}\"]", w.sshd.ip, w.sshd.port)),
        "the alias is resolved as ssh resolves it: {written}"
    );
    assert!(
        written.contains(&format!("known_hosts = [\"{}\"]", w.known_hosts.display())),
        "{written}"
    );
    let b = Broker::start(&written, Some(&w.agent.socket));
    let cwd = open_tempdir("fb-cwd.");
    let r = fleetctl(
        &b,
        cwd.path(),
        &[],
        &["--cluster", "target", "list-machines"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.lines().count(), 4, "{}", r.stdout);
    // StrictHostKeyChecking no is never copied: strict, with the command to run.
    let out = broker_cli(
        &cfg,
        &["import", "ssh-config", "loose", "--ssh-config", &sc],
    );
    assert!(out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("StrictHostKeyChecking no is not copied"),
        "{err}"
    );
    assert!(
        err.contains("UserKnownHostsFile /dev/null is not copied"),
        "{err}"
    );
    assert!(
        text(&out.stdout).contains("fleet-broker trust loose"),
        "{out:?}"
    );
    let written = std::fs::read_to_string(&cfg).expect("config");
    let loose = &written[written.find("[clusters.loose]").expect("loose")..];
    assert!(!loose.contains("host_key_checking"), "{loose}");
    assert!(!loose.contains("/dev/null"), "{loose}");
}

fn doctor(config: &Path, agent: &Path, home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("--config")
        .arg(config)
        .arg("doctor")
        .env("SSH_AUTH_SOCK", agent)
        .env("HOME", home)
        .env("XDG_STATE_HOME", home.join("state"))
        .stdin(Stdio::null())
        .output()
        .expect("doctor")
}

#[test]
fn doctor_passes_a_working_setup_and_reports_every_fault_of_a_broken_one() {
    let w = World::new();
    let home = open_tempdir("fb-home.");
    let cfg = home.path().join("config.toml");
    std::fs::write(&cfg, w.config("")).expect("config");
    let out = doctor(&cfg, &w.agent.socket, home.path());
    let said = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(!said.contains('✗'), "{said}");
    for want in [
        "✓ config ",
        "✓ agent ",
        "pinned at",
        "✓ cluster c1: SSH: authenticated as root",
        "✓ cluster c1: fleet API",
    ] {
        assert!(said.contains(want), "{want}: {said}");
    }
    // Broken in every way at once.
    let open_key = home.path().join("id_open");
    std::fs::copy(w.keys.path().join("id_ed25519"), &open_key).expect("copy");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let locked = home.path().join("id_locked");
    let k = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "pass phrase", "-f"])
        .arg(&locked)
        .output()
        .expect("ssh-keygen");
    assert!(k.status.success());
    let empty_pins = home.path().join("empty_known_hosts");
    std::fs::write(&empty_pins, "").expect("pins");
    let door = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    std::fs::write(
        &cfg,
        cluster_toml(
            "c1",
            &w.sshd,
            &format!("unix://{}", w.sim.socket.display()),
            "root",
            &empty_pins,
            &format!(
                "identity_files = [\"{}\", \"{}\"]\nfront_door = \"127.0.0.1:{door}\"\n",
                open_key.display(),
                locked.display()
            ),
        ),
    )
    .expect("config");
    let out = doctor(&cfg, &home.path().join("no-agent.sock"), home.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = text(&out.stdout);
    for want in [
        "✗ agent ",
        "id_open: permissions 0644 are too open",
        "id_locked: encrypted and no passphrase stored",
        "is not pinned; check it and run `fleet-broker trust c1`",
        "✗ cluster c1: SSH: ",
        "front door 127.0.0.1:",
        "not listening",
        "not pinned in",
    ] {
        assert!(said.contains(want), "{want}: {said}");
    }
    assert!(said.matches('✗').count() >= 7, "{said}");
}

/// With a daemon running, the import also pins the machines' keys, fetched through the tunnel.
#[test]
fn a_vagrant_import_pins_the_machines_through_a_running_daemon() {
    let m = Machines::new();
    let b = Broker::start(
        &format!(
            "# the daemon's config\n[defaults]\nmachine_ssh_port = {}\n",
            m.m1.port
        ),
        Some(&m.agent.socket),
    );
    let vagrant = b.dir.path().join("vagrant-ssh-config");
    std::fs::write(
        &vagrant,
        format!(
            "Host core-01\n  HostName {}\n  User root\n  Port {}\n  StrictHostKeyChecking no\n  IdentityFile \"{}\"\n",
            m.tunnel.ip,
            m.tunnel.port,
            m.keys.path().join("id_ed25519").display()
        ),
    )
    .expect("vagrant");
    let cfg = b.dir.path().join("config.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .args([
            "import",
            "vagrant",
            "--name",
            "lab",
            "--trust-on-first-use",
            "--endpoint",
        ])
        .arg(format!("unix://{}", m.sim.socket.display()))
        .arg(&vagrant)
        .env("FLEET_BROKER_CONFIG", &cfg)
        .env("XDG_RUNTIME_DIR", b.dir.path().join("xdg"))
        .stdin(Stdio::null())
        .output()
        .expect("import");
    assert!(out.status.success(), "{out:?}");
    let said = text(&out.stdout);
    assert!(
        said.contains("the running daemon reloaded: 0 unchanged, 0 restarted, 1 added"),
        "{said}"
    );
    let pins = b.dir.path().join("known_hosts.d/lab");
    for sshd in [&m.tunnel, &m.m1, &m.m2] {
        assert!(
            sshd.is_pinned_in(&pins),
            "{} not pinned: {said}",
            sshd.tunnel()
        );
    }
    assert_eq!(said.matches("pinned").count(), 3, "{said}");
}
