//! Encrypted identity files with their passphrase in the keyring: named when missing or
//! wrong, used without an agent once stored, never logged. Each test runs in a throwaway
//! keyutils session keyring of its own, inherited by the daemon and the CLI it starts.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::*;

const SECRET: &str = "correct horse battery staple";

/// Joins a new anonymous session keyring for the calling thread (keyrings are part of a
/// thread's credentials), inherited by the processes it starts; each test has its own.
fn throwaway_keyring() {
    const KEYCTL_JOIN_SESSION_KEYRING: nix::libc::c_long = 1;
    // SAFETY: keyctl with a null name joins a new anonymous session keyring.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<nix::libc::c_char>(),
        )
    };
    assert!(r >= 0, "keyctl(JOIN_SESSION_KEYRING) failed");
}

fn passphrase(b: &Broker, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
        .arg("passphrase")
        .args(args)
        .env("FLEET_BROKER_CONFIG", b.dir.path().join("config.toml"))
        .env("XDG_RUNTIME_DIR", b.dir.path().join("xdg"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fleet-broker passphrase");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin.as_bytes());
    }
    child.wait_with_output().expect("output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn encrypted_key(dir: &Path) -> std::path::PathBuf {
    let key = dir.join("id_locked");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", SECRET, "-C", "locked", "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "{out:?}");
    key
}

/// A cluster whose tunnel host takes only an encrypted identity file, served by a daemon
/// without an agent.
struct Locked {
    b: Broker,
    key: std::path::PathBuf,
    _sshd: Sshd,
    _world: World,
    _keys: tempfile::TempDir,
}

fn locked_cluster() -> Locked {
    let w = World::new();
    let keys = open_tempdir("fb-locked.");
    let key = encrypted_key(keys.path());
    let sshd = Sshd::start_with(&["root"], &[&key], None, "");
    let kh = keys.path().join("known_hosts");
    std::fs::write(&kh, sshd.known_hosts_line()).expect("known_hosts");
    let b = Broker::start(
        &cluster_toml(
            "c1",
            &sshd,
            &format!("unix://{}", w.sim.socket.display()),
            "root",
            &kh,
            &format!(
                "identity_files = [\"{}\"]\nconnect_timeout = \"3s\"\n",
                key.display()
            ),
        ),
        None,
    );
    Locked {
        b,
        key,
        _sshd: sshd,
        _world: w,
        _keys: keys,
    }
}

#[test]
fn a_stored_passphrase_unlocks_an_encrypted_identity_without_an_agent() {
    throwaway_keyring();
    let Locked {
        b,
        key,
        _sshd,
        _world,
        _keys,
    } = locked_cluster();
    // Nothing stored: the file is named, with the command that fixes it.
    let (status, body) = http(&b.socket("c1"), "GET", "/fleet/v1/machines", None);
    let body = text(&body);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("passphrase set {}", key.display())),
        "{body}"
    );
    // A wrong passphrase is refused before it is stored.
    let out = passphrase(
        &b,
        &["set", &key.display().to_string(), "--stdin"],
        "wrong\n",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("does not decrypt"), "{out:?}");
    // The right one: stored, and the daemon is asked to retry.
    let out = passphrase(
        &b,
        &["set", &key.display().to_string(), "--stdin"],
        &format!("{SECRET}\n"),
    );
    assert!(out.status.success(), "{out:?}");
    let said = text(&out.stdout);
    assert!(said.contains("kernel keyutils"), "{said}");
    assert!(said.contains("asked the running daemon to retry"), "{said}");
    wait_until_served(&b, "the tunnel with the decrypted key");
    assert!(
        !b.log().contains(SECRET),
        "the passphrase never reaches the log"
    );
    // Forget it.
    let out = passphrase(&b, &["forget", &key.display().to_string()], "");
    assert!(
        text(&out.stdout).contains("forgot the passphrase"),
        "{out:?}"
    );
    let out = passphrase(&b, &["forget", &key.display().to_string()], "");
    assert!(text(&out.stdout).contains("no passphrase"), "{out:?}");
}

#[test]
fn an_unencrypted_key_needs_no_passphrase() {
    throwaway_keyring();
    let w = World::new();
    let b = w.broker("");
    let key = w.keys.path().join("id_ed25519");
    let out = passphrase(&b, &["set", &key.display().to_string(), "--stdin"], "x\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not encrypted"), "{out:?}");
}

/// The `keyring` crate answers "no entry" when the kernel said "permission denied": a
/// passphrase that is stored but may not be used is named as such, never reported as absent.
#[test]
fn a_stored_passphrase_the_kernel_denies_is_not_reported_as_absent() {
    throwaway_keyring();
    let w = World::new();
    let b = w.broker("");
    let keys = open_tempdir("fb-locked.");
    let key = encrypted_key(keys.path());
    let path = key.display().to_string();
    let out = passphrase(&b, &["set", &path, "--stdin"], &format!("{SECRET}\n"));
    assert!(out.status.success(), "{out:?}");
    // Take every permission away from the stored entry (as another session's or user's
    // entry would be to us). It lives in the user's persistent keyring.
    const KEYCTL_SETPERM: nix::libc::c_long = 5;
    const KEYCTL_SEARCH: nix::libc::c_long = 10;
    const KEYCTL_GET_PERSISTENT: nix::libc::c_long = 22;
    const KEY_SPEC_PROCESS_KEYRING: nix::libc::c_long = -2;
    let canonical = std::fs::canonicalize(&key).expect("canonical");
    let description = std::ffi::CString::new(format!(
        "keyring-rs:{}@fleet-broker identity file",
        canonical.display()
    ))
    .expect("description");
    let kind = std::ffi::CString::new("user").expect("type");
    // SAFETY: keyctl(2) with NUL-terminated strings that outlive the calls.
    let persistent = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_keyctl,
            KEYCTL_GET_PERSISTENT,
            -1 as nix::libc::c_long,
            KEY_SPEC_PROCESS_KEYRING,
        )
    };
    assert!(persistent > 0, "the persistent keyring");
    // SAFETY: as above.
    let id = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_keyctl,
            KEYCTL_SEARCH,
            persistent,
            kind.as_ptr(),
            description.as_ptr(),
            0 as nix::libc::c_long,
        )
    };
    assert!(id > 0, "the stored entry is found");
    // SAFETY: as above.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_keyctl,
            KEYCTL_SETPERM,
            id,
            0 as nix::libc::c_long,
        )
    };
    assert_eq!(r, 0, "setperm");
    let out = passphrase(&b, &["forget", &path], "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("permission denied (EACCES)"),
        "{out:?}"
    );
    assert!(!text(&out.stdout).contains("no passphrase"), "{out:?}");
}

/// An identity file made with `ssh-keygen -a 256` takes seconds to decrypt. While one
/// cluster connects with it five times, another cluster's requests in a tight loop are not
/// held up: the decryption runs off the daemon's thread, once per file content.
#[test]
fn decrypting_a_slow_key_for_one_cluster_does_not_hold_up_another() {
    throwaway_keyring();
    let w = World::new();
    let keys = open_tempdir("fb-slow.");
    let key = keys.path().join("id_slow");
    let out = Command::new("ssh-keygen")
        .args([
            "-q", "-t", "ed25519", "-a", "256", "-N", SECRET, "-C", "slow", "-f",
        ])
        .arg(&key)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "{out:?}");
    let sshd = Sshd::start_with(&["root"], &[&key], None, "");
    let kh = keys.path().join("known_hosts");
    std::fs::write(&kh, sshd.known_hosts_line()).expect("known_hosts");
    let config = format!(
        "{}{}",
        w.config(""),
        cluster_toml(
            "c2",
            &sshd,
            &format!("unix://{}", w.sim.socket.display()),
            "root",
            &kh,
            &format!("identity_files = [\"{}\"]\n", key.display()),
        )
    );
    // The agent holds c1's key only: c2 needs the file.
    let b = Broker::start(&config, Some(&w.agent.socket));
    let out = passphrase(
        &b,
        &["set", &key.display().to_string(), "--stdin"],
        &format!("{SECRET}\n"),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        http(&b.socket("c1"), "GET", "/fleet/v1/machines", None).0,
        200
    );
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let (socket, done) = (b.socket("c1"), done.clone());
        std::thread::spawn(move || {
            let mut slowest = std::time::Duration::ZERO;
            let mut count = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::time::Instant::now();
                let r = try_http(&socket, "GET", "/fleet/v1/machines", None);
                slowest = slowest.max(t.elapsed());
                assert_eq!(r.map(|r| r.0).ok(), Some(200));
                count += 1;
            }
            (slowest, count)
        })
    };
    for _ in 0..5 {
        let out = b.cli(&["connect", "c2"]);
        assert!(out.status.success(), "{out:?}\n{}", b.log());
        let out = b.cli(&["disconnect", "c2"]);
        assert!(out.status.success(), "{out:?}");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (slowest, count) = looping.join().expect("request loop");
    let (status, body) = http(&b.control_socket(), "GET", "/v1/clusters", None);
    assert_eq!(status, 200);
    let clusters: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let lag_ms = clusters["runtime_lag_max_ms"]
        .as_f64()
        .expect("runtime_lag_max_ms");
    let blocked_ms = clusters["runtime_blocked_max_ms"]
        .as_f64()
        .expect("runtime_blocked_max_ms");
    let (_, metrics) = http(&b.control_socket(), "GET", "/metrics", None);
    assert!(
        text(&metrics).contains("fleet_broker_runtime_lag_seconds_bucket{le=\"+Inf\"}"),
        "{}",
        text(&metrics)
    );
    eprintln!("c1: {count} requests while c2 connected five times, slowest {slowest:?}; the daemon's thread ran at most {lag_ms} ms late, of which at most {blocked_ms} ms blocked (not waiting for a CPU)");
    assert!(lag_ms < 500.0, "the daemon's thread ran {lag_ms} ms late");
    // What the daemon itself held up, without this shared machine's CPU waits.
    assert!(
        blocked_ms <= 20.0,
        "the daemon's thread was blocked for {blocked_ms} ms"
    );
    assert!(count > 10, "{count} requests");
    // The decryption takes seconds; a request held up by it would show it.
    assert!(
        slowest < std::time::Duration::from_millis(500),
        "c1's slowest request took {slowest:?}"
    );
}

/// Joins the per-uid default session keyring (`_uid_ses.UID`), what a login without
/// pam_keyinit has (Debian's and Ubuntu's default PAM stack), for the calling thread and the
/// processes it starts.
fn uid_default_session_keyring() {
    const KEYCTL_JOIN_SESSION_KEYRING: nix::libc::c_long = 1;
    let name = std::ffi::CString::new(format!("_uid_ses.{}", nix::unistd::getuid())).expect("name");
    // SAFETY: keyctl with a NUL-terminated name that outlives the call.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            name.as_ptr(),
        )
    };
    assert!(r >= 0, "keyctl(JOIN_SESSION_KEYRING, _uid_ses) failed");
}

/// `passphrase set` in a shell whose session keyring is the per-uid default stores the
/// passphrase, and a daemon started in another session (its own session keyring, as under
/// the service manager) finds it and connects.
#[test]
fn a_passphrase_set_in_the_default_session_keyring_is_found_by_a_daemon_elsewhere() {
    throwaway_keyring();
    // The daemon runs in this thread's throwaway session keyring.
    let Locked {
        b,
        key,
        _sshd,
        _world,
        _keys,
    } = locked_cluster();
    // The CLI runs in the per-uid default session keyring.
    uid_default_session_keyring();
    let path = key.display().to_string();
    let out = passphrase(&b, &["set", &path, "--stdin"], &format!("{SECRET}\n"));
    assert!(out.status.success(), "{out:?}");
    wait_until_served(
        &b,
        "the tunnel with the passphrase stored from another session",
    );
    let out = passphrase(&b, &["forget", &path], "");
    assert!(
        text(&out.stdout).contains("forgot the passphrase"),
        "{out:?}"
    );
}
