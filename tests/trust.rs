//! `fleet-broker trust`: the answer comes from a terminal, never a pipe; what it shows and
//! pins is computed from the key itself, never taken from the daemon's JSON.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use support::*;

/// `fleet-broker ARGS` in a session of its own: it has no controlling terminal, whatever
/// terminal the tests were started from.
fn detached(config: &Path, xdg: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleet-broker"));
    cmd.args(args)
        .env("FLEET_BROKER_CONFIG", config)
        .env("XDG_RUNTIME_DIR", xdg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().expect("fleet-broker");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_yes_on_stdin_pins_nothing() {
    let w = World::new();
    std::fs::write(&w.known_hosts, "").expect("empty");
    let b = w.broker("");
    let config = b.dir.path().join("config.toml");
    let xdg = b.dir.path().join("xdg");
    let (ok, _, err) = detached(&config, &xdg, &["trust", "c1"], "yes\n");
    assert!(!ok);
    assert!(err.contains("no terminal to confirm on"), "{err}");
    let (ok, _, err) = detached(&config, &xdg, &["trust", "c1", "--yes"], "yes\n");
    assert!(!ok);
    assert!(err.contains("--yes needs a terminal"), "{err}");
    assert_eq!(std::fs::read_to_string(&w.known_hosts).expect("read"), "");
}

/// A stand-in daemon on the control socket that answers every request with `body`.
fn fake_daemon(control: &Path, bodies: Vec<String>) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(control).expect("bind");
    std::thread::spawn(move || {
        for body in bodies {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    })
}

#[test]
fn machine_keys_are_judged_from_their_bytes_not_the_daemons_words() {
    let dir = open_tempdir("fb-trust.");
    let xdg = dir.path().join("xdg");
    let runtime = xdg.join("fleet-broker");
    std::fs::create_dir_all(&runtime).expect("mkdir");
    for d in [&xdg, &runtime] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let kh = dir.path().join("known_hosts");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[clusters.c1]\ntunnel = \"127.0.0.1:9\"\nuser = \"root\"\nknown_hosts = [\"{}\"]\n",
            kh.display()
        ),
    )
    .expect("config");
    let key = keygen(dir.path(), "machine", "ed25519");
    let real = fingerprint(&key);
    let report = |name: &str| {
        serde_json::json!({
            "machine": "b2b2b2b2b2b2", "name": name, "key": public_line(&key),
            "fingerprint": "SHA256:whatthedaemonclaims", "md5": "MD5:00",
            "verdict": "trusted", "pins": []
        })
        .to_string()
    };
    let server = fake_daemon(
        &runtime.join("control.sock"),
        vec![
            report("*"),
            report("[127.0.0.9]:2222"),
            report("[127.0.0.9]:2222"),
        ],
    );
    let trust = |fp: &str| {
        detached(
            &config,
            &xdg,
            &["trust", "c1", "--machine", "b2b2", "--fingerprint", fp],
            "",
        )
    };
    // A name that is not an address would pin the key for every host.
    let (ok, _, err) = trust(&real);
    assert!(!ok);
    assert!(err.contains("not an IP address or [IP]:port"), "{err}");
    // The daemon's fingerprint is not what the key hashes to: it is never shown or matched.
    let (ok, _, err) = trust("SHA256:whatthedaemonclaims");
    assert!(!ok);
    assert!(err.contains("not a fingerprint given"), "{err}");
    assert!(err.contains(&real), "{err}");
    assert!(!std::fs::exists(&kh).expect("stat") || std::fs::read(&kh).expect("read").is_empty());
    // "trusted" from the daemon means nothing: our own known_hosts has no pin, so it is new.
    let (ok, out, err) = trust(&real);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("pinned ssh-ed25519 {real}")), "{out}");
    server.join().expect("fake daemon");
    let found = Command::new("ssh-keygen")
        .args(["-F", "[127.0.0.9]:2222", "-f"])
        .arg(&kh)
        .output()
        .expect("ssh-keygen -F");
    let b64 = public_line(&key);
    let b64 = b64.split_whitespace().nth(1).expect("key");
    assert!(
        String::from_utf8_lossy(&found.stdout).contains(b64),
        "{}",
        std::fs::read_to_string(&kh).unwrap_or_default()
    );
}
