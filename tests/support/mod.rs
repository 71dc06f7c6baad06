//! Test harness: a real OpenSSH `sshd` on 127.0.0.x with its own config and host keys, a
//! real `ssh-agent` with generated keys, the fleet API simulator on a unix socket, and the
//! real `fleet-broker serve` binary. Every process is started with its own directory and
//! port and is killed on drop, so tests run in parallel.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_broker::fleet::schema::{Machine, UnitOption};
use fleet_broker::sim::{demo_machines, Sim};

/// Generous bound for anything a loaded 2-core machine should finish.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `cond` until it is true or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Waits until cluster `c1` of `b` answers `GET /fleet/v1/machines` with 200.
pub fn wait_until_served(b: &Broker, what: &str) {
    wait_until(what, DEADLINE, || {
        matches!(
            try_http(&b.socket("c1"), "GET", "/fleet/v1/machines", None),
            Ok((200, _))
        )
    });
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A world-readable temporary directory (sshd reads files in it as other users).
pub fn open_tempdir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// Generates a key pair with ssh-keygen; returns the private key path.
pub fn keygen(dir: &Path, name: &str, kind: &str) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", "", "-C", name, "-f"])
        .arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    run(&mut cmd);
    path
}

/// `SHA256:…` of a key pair's public half, as `ssh-keygen -l` prints it.
pub fn fingerprint(private: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(format!("{}.pub", private.display()))
        .output()
        .expect("ssh-keygen -l");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string()
}

/// The `type base64` part of a public key file.
pub fn public_line(private: &Path) -> String {
    let text = std::fs::read_to_string(private.with_extension("pub"))
        .or_else(|_| std::fs::read_to_string(format!("{}.pub", private.display())))
        .expect("public key");
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn kill_child(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A real ssh-agent holding the given keys.
pub struct Agent {
    pub socket: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub fn start(keys: &[&Path]) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("fb-agent.")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent (install openssh-client)");
        let mut agent = Agent {
            socket,
            child,
            _dir: dir,
        };
        // The socket file appears at bind(), before listen(): wait until it accepts.
        wait_until("ssh-agent to accept", DEADLINE, || {
            std::os::unix::net::UnixStream::connect(&agent.socket).is_ok()
        });
        for k in keys {
            run(Command::new("ssh-add")
                .arg("-q")
                .arg(k)
                .env("SSH_AUTH_SOCK", &agent.socket));
        }
        let _ = &mut agent;
        agent
    }

    /// Kills the agent; its socket stops answering.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
        let _ = std::fs::remove_file(&self.socket);
    }

    /// A new agent on the same socket path, holding `keys`.
    pub fn restart(&mut self, keys: &[&Path]) {
        self.kill();
        self.child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&self.socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent");
        wait_until("ssh-agent to accept", DEADLINE, || {
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
        });
        for k in keys {
            run(Command::new("ssh-add")
                .arg("-q")
                .arg(k)
                .env("SSH_AUTH_SOCK", &self.socket));
        }
    }

    /// `ssh-add -x` (lock) or `-X` (unlock) with a password given through SSH_ASKPASS.
    pub fn set_locked(&self, locked: bool) {
        let dir = self.socket.parent().expect("agent dir");
        let askpass = dir.join("askpass.sh");
        std::fs::write(&askpass, "#!/bin/sh\necho fleet-broker-test\n").expect("askpass");
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        run(Command::new("ssh-add")
            .arg(if locked { "-x" } else { "-X" })
            .env("SSH_AUTH_SOCK", &self.socket)
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::null()));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// The fleet API simulator on a unix socket (and optionally TCP), on its own thread.
pub struct SimServer {
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub sim: Arc<Mutex<Sim>>,
    stop: Option<tokio_util::sync::CancellationToken>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

pub fn opt(section: &str, name: &str, value: &str) -> UnitOption {
    UnitOption {
        section: section.into(),
        name: name.into(),
        value: value.into(),
    }
}

impl SimServer {
    pub fn start() -> SimServer {
        SimServer::with(demo_machines(), false)
    }

    pub fn with(machines: Vec<Machine>, tcp: bool) -> SimServer {
        let dir = open_tempdir("fb-sim.");
        let socket = dir.path().join("fleet.sock");
        // The simulator moves as fleet does (reference B.6); units a test puts in place
        // directly are there at once.
        let mut moving = Sim::new(machines);
        moving.timing =
            fleet_broker::sim::Timing::Fleet(fleet_broker::sim::FleetDelays::observed());
        let sim = Arc::new(Mutex::new(moving));
        let stop_tx = tokio_util::sync::CancellationToken::new();
        let stop_rx = stop_tx.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (sock, s) = (socket.clone(), sim.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::UnixListener::bind(&sock).expect("bind sim socket");
                std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))
                    .expect("chmod");
                let tcp_addr = if tcp {
                    let t = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind tcp");
                    let a = t.local_addr().expect("addr");
                    tokio::spawn(fleet_broker::sim::serve_tcp(t, s.clone(), stop_rx.clone()));
                    Some(a)
                } else {
                    None
                };
                let _ = ready_tx.send(tcp_addr);
                fleet_broker::sim::serve(l, s, stop_rx).await;
            });
        });
        let tcp = ready_rx.recv_timeout(DEADLINE).expect("simulator started");
        SimServer {
            socket,
            tcp,
            sim,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// `count` units of about 4 KB each, all on one page: `GET /fleet/v1/units` is then
    /// about `count` × 4 KB.
    pub fn put_big_units(&self, count: usize) {
        let mut sim = self.sim.lock().expect("sim");
        sim.token_limit = 20000;
        let big = "y".repeat(4000);
        sim.put_many(
            (0..count)
                .map(|i| {
                    (
                        format!("s{i:05}.service"),
                        vec![opt("Service", "ExecStart", &format!("/bin/echo {big}"))],
                        "inactive".to_string(),
                    )
                })
                .collect(),
        );
    }

    pub fn put(&self, name: &str, options: Vec<UnitOption>, desired: &str) {
        self.sim
            .lock()
            .expect("sim")
            .put(name, options, desired.into());
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A real OpenSSH sshd on 127.0.0.x with a random port.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub ip: String,
    pub port: u16,
    pub host_key: PathBuf,
    /// Extra sshd_config lines.
    extra: String,
    /// Whether the address was chosen by the caller (then it is not re-picked on failure).
    fixed: bool,
    /// The network namespace sshd runs in, if not the test's own.
    netns: Option<String>,
    child: Option<Child>,
}

fn pick_address() -> (String, u16) {
    let x = 2
        + (std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64 ^ rand_u64())
            % 250;
    let ip = format!("127.0.0.{x}");
    let l = TcpListener::bind((ip.as_str(), 0)).expect("bind probe");
    let port = l.local_addr().expect("addr").port();
    (ip, port)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

impl Sshd {
    /// Starts sshd authorising `keys` for each user in `users`.
    pub fn start(users: &[&str], keys: &[&Path]) -> Sshd {
        Sshd::start_with(users, keys, None, "")
    }

    /// Like [`Sshd::start`], on a chosen address and with extra config lines.
    pub fn start_with(
        users: &[&str],
        keys: &[&Path],
        addr: Option<(String, u16)>,
        extra: &str,
    ) -> Sshd {
        Sshd::start_with_host_key(users, keys, addr, extra, None)
    }

    /// Like [`Sshd::start_with`]; `host_key` replaces the generated ed25519 host key (its
    /// certificate, if any, goes into `extra` as `HostCertificate`).
    pub fn start_with_host_key(
        users: &[&str],
        keys: &[&Path],
        addr: Option<(String, u16)>,
        extra: &str,
        host_key: Option<&Path>,
    ) -> Sshd {
        std::fs::create_dir_all("/run/sshd").expect("privilege separation dir");
        let dir = open_tempdir("fb-sshd.");
        let host_key = match host_key {
            Some(k) => k.to_path_buf(),
            None => keygen(dir.path(), "ssh_host_ed25519_key", "ed25519"),
        };
        let ak = dir.path().join("authorized_keys");
        std::fs::create_dir(&ak).expect("mkdir");
        std::fs::set_permissions(&ak, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let lines: String = keys
            .iter()
            .map(|k| format!("{}\n", public_line(k)))
            .collect();
        for u in users {
            let f = ak.join(u);
            std::fs::write(&f, &lines).expect("authorized_keys");
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let fixed = addr.is_some();
        let (ip, port) = addr.unwrap_or_else(pick_address);
        let mut sshd = Sshd {
            dir,
            ip,
            port,
            host_key,
            extra: extra.to_string(),
            fixed,
            netns: None,
            child: None,
        };
        sshd.launch();
        sshd
    }

    /// Starts sshd inside the network namespace `netns`, listening on `ip` there.
    pub fn start_in_netns(users: &[&str], keys: &[&Path], netns: &str, ip: &str) -> Sshd {
        let port = 20000 + (rand_u64() % 40000) as u16;
        let mut sshd = Sshd::start_with_host_key(users, keys, None, "", None);
        sshd.kill();
        sshd.ip = ip.to_string();
        sshd.port = port;
        sshd.fixed = true;
        sshd.netns = Some(netns.to_string());
        sshd.launch();
        sshd
    }

    fn write_config(&self) -> PathBuf {
        let d = self.dir.path();
        let cfg = format!(
            "ListenAddress {ip}:{port}\nHostKey {hk}\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys/%u\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n{streamlocal}AllowTcpForwarding yes\nMaxStartups 200:30:400\nLogLevel VERBOSE\nUseDNS no\n{setenv}{extra}",
            // sshd takes the first value of a keyword: a test's own setting must be the only one.
            streamlocal = if self.extra.contains("AllowStreamLocalForwarding") {
                ""
            } else {
                "AllowStreamLocalForwarding yes\n"
            },
            // Remote commands must not run the machine's ~/.bashrc (bash sources it for sshd
            // children unless SHLVL says it is nested): a pyenv there once left a stale lock
            // behind a killed session and hung every later command.
            setenv = if self.extra.contains("SetEnv") { "" } else { "SetEnv SHLVL=1\n" },
            ip = self.ip,
            port = self.port,
            hk = self.host_key.display(),
            d = d.display(),
            extra = self.extra,
        );
        let path = d.join("sshd_config");
        std::fs::write(&path, cfg).expect("sshd_config");
        path
    }

    fn banner_ready(&self) -> bool {
        let Ok(mut s) = TcpStream::connect((self.ip.as_str(), self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 8];
        let ok = s.read_exact(&mut buf).is_ok() && &buf[..4] == b"SSH-";
        let _ = s.write_all(b"SSH-2.0-probe\r\n");
        ok
    }

    /// Writes the config and starts sshd in the foreground, logging to `sshd.log`.
    fn spawn(&self) -> Child {
        let cfg = self.write_config();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sshd.log"))
            .expect("log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "/usr/sbin/sshd"]);
                c
            }
            None => Command::new("/usr/sbin/sshd"),
        };
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("sshd (install openssh-server)")
    }

    fn launch(&mut self) {
        for attempt in 0..5 {
            let mut child = self.spawn();
            let end = Instant::now() + DEADLINE;
            let mut up = false;
            while Instant::now() < end {
                if self.banner_ready() {
                    up = true;
                    break;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if up {
                self.child = Some(child);
                return;
            }
            kill_child(&mut child);
            if attempt < 4 && self.child.is_none() && !self.fixed {
                let (ip, port) = pick_address();
                self.ip = ip;
                self.port = port;
            }
        }
        panic!("sshd did not start; log:\n{}", self.log());
    }

    /// Stops sshd and every connection it serves.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Children serving connections are in sshd's process group only with -D;
            // kill them by their parent's pid.
            let _ = Command::new("pkill")
                .arg("-TERM")
                .arg("-P")
                .arg(c.id().to_string())
                .status();
            kill_child(&mut c);
        }
        wait_until("sshd to stop listening", DEADLINE, || {
            TcpStream::connect((self.ip.as_str(), self.port)).is_err()
        });
    }

    /// Starts sshd again on the same address with the same keys.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill");
        self.child = Some(self.spawn());
        wait_until("sshd to listen again", DEADLINE, || self.banner_ready());
    }

    /// `[ip]:port ssh-ed25519 AAAA…` pinning this server's host key.
    pub fn known_hosts_line(&self) -> String {
        format!(
            "[{}]:{} {}\n",
            self.ip,
            self.port,
            public_line(&self.host_key)
        )
    }

    pub fn tunnel(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The processes serving this sshd's connections (its listener's descendants).
    pub fn session_pids(&self) -> Vec<u32> {
        let Some(root) = self.child.as_ref().map(|c| c.id()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut todo = vec![root];
        while let Some(p) = todo.pop() {
            let kids = Command::new("pgrep")
                .arg("-P")
                .arg(p.to_string())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for k in kids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                out.push(k);
                todo.push(k);
            }
        }
        out
    }

    /// `SHA256:…` of this server's host key, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.host_key)
    }

    /// Whether `file` pins this server's key under its `[ip]:port` name, as OpenSSH's own
    /// `ssh-keygen -F` reads the file (plain or hashed).
    pub fn is_pinned_in(&self, file: &Path) -> bool {
        let out = Command::new("ssh-keygen")
            .arg("-F")
            .arg(format!("[{}]:{}", self.ip, self.port))
            .arg("-f")
            .arg(file)
            .output()
            .expect("ssh-keygen -F");
        let key = public_line(&self.host_key);
        let b64 = key.split_whitespace().nth(1).expect("key");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| !l.starts_with('#') && l.contains(b64))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("pkill")
                .arg("-TERM")
                .arg("-P")
                .arg(c.id().to_string())
                .status();
            kill_child(&mut c);
        }
    }
}

/// The real `fleet-broker serve` with its own config and runtime dir.
pub struct Broker {
    pub dir: tempfile::TempDir,
    pub runtime_dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Starts the daemon with `config` (TOML) and the agent socket.
    pub fn start(config: &str, agent: Option<&Path>) -> Broker {
        Broker::start_as(config, agent, None)
    }

    /// Starts it as `uid` (via setpriv) when given.
    pub fn start_as(config: &str, agent: Option<&Path>, uid: Option<u32>) -> Broker {
        Broker::launch(config, agent, uid, &[], None)
    }

    /// Starts it with these extra environment variables.
    pub fn start_with_env(config: &str, agent: Option<&Path>, env: &[(&str, &Path)]) -> Broker {
        Broker::launch(config, agent, None, env, None)
    }

    /// Starts it the way a service manager's socket unit does: `systemd-socket-activate`
    /// listens on `listen` (the control socket unless a test says otherwise) with the
    /// descriptor named `control`, and execs the daemon in its own process on the first
    /// connection. Returns once the socket listens, before anything has connected.
    pub fn start_activated(config: &str, agent: Option<&Path>, listen: Option<&Path>) -> Broker {
        Broker::launch(config, agent, None, &[], Some(listen))
    }

    fn launch(
        config: &str,
        agent: Option<&Path>,
        uid: Option<u32>,
        env: &[(&str, &Path)],
        activated: Option<Option<&Path>>,
    ) -> Broker {
        let dir = open_tempdir("fb-broker.");
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, config).expect("config");
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let xdg = dir.path().join("xdg");
        std::fs::create_dir(&xdg).expect("xdg");
        std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let mut bin = PathBuf::from(env!("CARGO_BIN_EXE_fleet-broker"));
        let mut cmd = match uid {
            Some(uid) => {
                nix::unistd::chown(&xdg, Some(nix::unistd::Uid::from_raw(uid)), None)
                    .expect("chown");
                let copy = dir.path().join("fleet-broker");
                // Copied by another process: a write descriptor opened here could be inherited
                // by a child another test thread forks, and exec would fail with ETXTBSY.
                run(Command::new("cp").arg(&bin).arg(&copy));
                bin = copy;
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("serve")
            .env("FLEET_BROKER_CONFIG", &cfg)
            .env("XDG_RUNTIME_DIR", &xdg)
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .env(
                "RUST_LOG",
                std::env::var("BROKER_LOG").unwrap_or_else(|_| "fleet_broker=debug".into()),
            )
            .env(
                "FLEET_BROKER_THREADS",
                std::env::var("FLEET_BROKER_THREADS").unwrap_or_default(),
            )
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(a) = agent {
            cmd.env("SSH_AUTH_SOCK", a);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = std::fs::File::create(dir.path().join("broker.log")).expect("log");
        cmd.stderr(log.try_clone().expect("log"));
        let runtime_dir = xdg.join("fleet-broker");
        if let Some(listen) = activated {
            std::fs::create_dir(&runtime_dir).expect("runtime dir");
            std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
            let listen = listen.map_or_else(|| runtime_dir.join("control.sock"), Path::to_path_buf);
            cmd = activator(cmd, &listen, log);
            let mut b = Broker {
                dir,
                runtime_dir,
                child: Some(cmd.spawn().expect("systemd-socket-activate")),
            };
            wait_until("the activator to listen", DEADLINE, || {
                std::fs::symlink_metadata(&listen).is_ok()
            });
            if let Some(Ok(Some(status))) = b.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "systemd-socket-activate exited ({status}); log:\n{}",
                    b.log()
                );
            }
            return b;
        }
        let child = cmd.spawn().expect("fleet-broker");
        let mut b = Broker {
            dir,
            runtime_dir,
            child: Some(child),
        };
        let control = b.control_socket();
        let started = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&control).is_ok() {
                break;
            }
            if let Some(Ok(Some(status))) = b.child.as_mut().map(|c| c.try_wait()) {
                panic!("fleet-broker exited early ({status}); log:\n{}", b.log());
            }
            assert!(
                started.elapsed() < DEADLINE,
                "fleet-broker did not start; log:\n{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        b
    }

    /// Runs `fleet-broker ARGS` against this daemon's config and runtime dir.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_fleet-broker"))
            .args(args)
            .env("FLEET_BROKER_CONFIG", self.dir.path().join("config.toml"))
            .env("XDG_RUNTIME_DIR", self.dir.path().join("xdg"))
            .env("XDG_STATE_HOME", self.dir.path().join("state"))
            .stdin(Stdio::null())
            .output()
            .expect("fleet-broker")
    }

    pub fn socket(&self, cluster: &str) -> PathBuf {
        self.runtime_dir
            .join("clusters")
            .join(format!("{cluster}.sock"))
    }

    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join("control.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM and waits for exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// A gauge or counter from the daemon's `GET /metrics` (`fleet_broker_channels`, …); one
    /// that is not there fails the test.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = http(&self.control_socket(), "GET", "/metrics", None);
        let prefix = format!("{name} ");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| {
                l.strip_prefix(prefix.as_str())
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no {name} in the daemon's metrics"))
    }

    /// GET on the control socket, parsed.
    pub fn cluster_info(&self, name: &str) -> serde_json::Value {
        let (status, body) = http(
            &self.control_socket(),
            "GET",
            &format!("/v1/clusters/{name}"),
            None,
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("json")
    }
}

/// `cmd` run by `systemd-socket-activate -l LISTEN --fdname=control`, which hands the
/// program only the variables named with `-E`: every one `cmd` sets, plus PATH and HOME.
fn activator(cmd: Command, listen: &Path, log: std::fs::File) -> Command {
    let mut a = Command::new("systemd-socket-activate");
    a.arg("-l").arg(listen).arg("--fdname=control");
    for k in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(k) {
            let mut kv = std::ffi::OsString::from(format!("{k}="));
            kv.push(v);
            a.arg("-E").arg(kv);
        }
    }
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let mut kv = k.to_os_string();
            kv.push("=");
            kv.push(v);
            a.arg("-E").arg(kv);
        }
    }
    a.arg(cmd.get_program()).args(cmd.get_args());
    a.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    a
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }
}

/// One HTTP/1.1 request on a new connection to a unix socket; returns status and body.
/// Plain blocking I/O so tests exercise the sockets as any client would.
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Vec<u8>) {
    try_http(socket, method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", socket.display()))
}

pub fn try_http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: domain-sock\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// `clients` clients at once, each sending `each` `GET /fleet/v1/machines` in turn on a new
/// connection to `socket`; every answer must be a 200.
pub fn concurrent_gets(socket: &Path, clients: usize, each: usize) {
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || {
                for _ in 0..each {
                    let r = try_http(&socket, "GET", "/fleet/v1/machines", None);
                    assert!(matches!(r, Ok((200, _))), "{r:?}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
}

/// Splits a raw HTTP/1.1 response, de-chunking if needed.
pub fn parse_response(raw: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("chunk size"))?;
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16)
                .map_err(|_| bad("chunk size"))?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size + 2 {
                return Err(bad("truncated chunk"));
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    Ok((status, body))
}

/// A cluster table whose tunnel host is a loopback port nothing listens on: its tunnel is
/// refused at once, and its requests get a 503 within its 2 s connect_timeout.
#[allow(dead_code)]
pub fn down_cluster_toml(name: &str) -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port();
    format!("[clusters.{name}]\ntunnel = \"127.0.0.1:{closed}\"\nuser = \"root\"\nconnect_timeout = \"2s\"\n")
}

/// A cluster table for a config file.
pub fn cluster_toml(
    name: &str,
    sshd: &Sshd,
    endpoint: &str,
    user: &str,
    known_hosts: &Path,
    extra: &str,
) -> String {
    let timeout = if extra.contains("connect_timeout") {
        ""
    } else {
        "connect_timeout = \"10s\"\n"
    };
    format!(
        "[clusters.{name}]\ntunnel = \"{}\"\nendpoint = \"{endpoint}\"\nuser = \"{user}\"\nknown_hosts = [\"{}\"]\n{timeout}{extra}\n",
        sshd.tunnel(),
        known_hosts.display()
    )
}

/// Everything a single-cluster test needs.
pub struct World {
    pub sim: SimServer,
    pub sshd: Sshd,
    pub agent: Agent,
    pub keys: tempfile::TempDir,
    pub known_hosts: PathBuf,
}

impl World {
    /// sshd authorising one ed25519 key for root, an agent holding it, the simulator, and a
    /// known_hosts file pinning the server.
    pub fn new() -> World {
        World::with_machines(demo_machines())
    }

    /// The same, with the simulator reporting these machines.
    pub fn with_machines(machines: Vec<Machine>) -> World {
        let keys = open_tempdir("fb-keys.");
        let key = keygen(keys.path(), "id_ed25519", "ed25519");
        let sshd = Sshd::start(&["root"], &[&key]);
        let agent = Agent::start(&[&key]);
        let sim = SimServer::with(machines, false);
        let known_hosts = keys.path().join("known_hosts");
        std::fs::write(&known_hosts, sshd.known_hosts_line()).expect("known_hosts");
        World {
            sim,
            sshd,
            agent,
            keys,
            known_hosts,
        }
    }

    pub fn config(&self, extra: &str) -> String {
        self.config_on(&self.sim.socket, extra)
    }

    /// The config of cluster `c1` whose fleet API is `fleetd` (the simulator's socket, or a
    /// fleetd of the test's own) behind the world's sshd.
    pub fn config_on(&self, fleetd: &Path, extra: &str) -> String {
        cluster_toml(
            "c1",
            &self.sshd,
            &format!("unix://{}", fleetd.display()),
            "root",
            &self.known_hosts,
            extra,
        )
    }

    pub fn broker(&self, extra: &str) -> Broker {
        self.broker_on(&self.sim.socket, extra)
    }

    /// A broker of [`World::config_on`].
    pub fn broker_on(&self, fleetd: &Path, extra: &str) -> Broker {
        Broker::start(&self.config_on(fleetd, extra), Some(&self.agent.socket))
    }
}

/// What a CLI run printed.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs our `fleetctl` against a broker, in `cwd`, with only the given FLEETCTL_* variables.
pub fn fleetctl(broker: &Broker, cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    fleetctl_with_input(broker, cwd, env, args, None)
}

/// The same, with `input` on its standard input (closed after it), or none.
pub fn fleetctl_with_input(
    broker: &Broker,
    cwd: &Path,
    env: &[(&str, &str)],
    args: &[&str],
    input: Option<&[u8]>,
) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    cmd.args(args)
        .current_dir(cwd)
        .env("XDG_RUNTIME_DIR", broker.dir.path().join("xdg"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    for (k, _) in std::env::vars() {
        if k.starts_with("FLEETCTL_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("fleetctl");
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let out = child.wait_with_output().expect("fleetctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes stub `systemctl`, `journalctl` and `sudo` into `dir`: each logs its argv to
/// `dir/argv.log`; systemctl prints a status naming `machine` and exits with the code in
/// `dir/exit.UNIT` (0 without one); journalctl serves `dir/journal` (lines `CURSOR<TAB>TEXT`)
/// with `-n`, `--show-cursor` and `--after-cursor`.
pub fn write_stubs(dir: &Path, machine: &str) {
    let d = dir.display();
    // Each call as `<prog><arg1><arg2>…` on words.log: argument boundaries stay visible.
    let words =
        |prog: &str| format!("printf '<%s>' {prog} \"$@\" >> {d}/words.log; echo >> {d}/words.log");
    let systemctl = format!(
        "#!/bin/sh\necho \"systemctl $*\" >> {d}/argv.log\n{words}\nfor last in \"$@\"; do :; done\necho \"* $last - stub unit on {machine}\"\necho \"   Active: active (running)\"\ncode=0\n[ -f {d}/exit.$last ] && code=$(cat {d}/exit.$last)\nexit $code\n",
        words = words("systemctl")
    );
    let journalctl = format!(
        r#"#!/bin/sh
echo "journalctl $*" >> {d}/argv.log
{words}
n=""; after=""; show=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n="$2"; shift 2;;
    --after-cursor) after="$2"; shift 2;;
    --show-cursor) show=1; shift;;
    --unit|--output) shift 2;;
    *) shift;;
  esac
done
touch {d}/journal
awk -F '\t' -v n="$n" -v after="$after" -v show="$show" '
  {{ c[NR]=$1; t[NR]=$2 }}
  END {{
    start=1
    if (after != "") {{ start=NR+1; for (i=1;i<=NR;i++) if (c[i]==after) start=i+1 }}
    else if (n != "") {{ start=NR-n+1; if (start<1) start=1 }}
    last=""
    for (i=start;i<=NR;i++) {{ print t[i]; last=c[i] }}
    if (show && last != "") print "-- cursor: " last
  }}' {d}/journal
"#,
        words = words("journalctl")
    );
    let sudo = format!("#!/bin/sh\necho \"sudo $*\" >> {d}/argv.log\n{words}\n[ \"$1\" = -- ] && shift\nexec \"$@\"\n", words = words("sudo"));
    for (name, text) in [
        ("systemctl", systemctl),
        ("journalctl", journalctl),
        ("sudo", sudo),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("stub");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::write(dir.join("journal"), "").expect("journal");
}

/// Appends journal entries `(cursor, text)` in one write.
pub fn append_journal(dir: &Path, entries: &[(&str, &str)]) {
    let text: String = entries.iter().map(|(c, t)| format!("{c}\t{t}\n")).collect();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("journal"))
        .expect("journal");
    f.write_all(text.as_bytes()).expect("append");
}

/// A tunnel host and two machines, each a real sshd with stub systemd tools, the simulator
/// listing the machines at their addresses, an agent and pins for all three.
pub struct Machines {
    pub keys: tempfile::TempDir,
    pub agent: Agent,
    pub sim: SimServer,
    pub tunnel: Sshd,
    pub m1: Sshd,
    pub m2: Sshd,
    pub stubs: Vec<tempfile::TempDir>,
    pub known_hosts: PathBuf,
}

pub const M1: &str = "a1a1a1a1000000000000000000000001";
pub const M2: &str = "b2b2b2b2000000000000000000000002";

fn two_addresses() -> ((String, u16), (String, u16)) {
    for _ in 0..50 {
        let (ip1, port) = pick_address();
        let (ip2, _) = pick_address();
        if ip1 == ip2 {
            continue;
        }
        if TcpListener::bind((ip2.as_str(), port)).is_ok() {
            return ((ip1, port), (ip2, port));
        }
    }
    panic!("no common free port on two loopback addresses");
}

impl Machines {
    pub fn new() -> Machines {
        let keys = open_tempdir("fb-keys.");
        let key = keygen(keys.path(), "id_ed25519", "ed25519");
        let agent = Agent::start(&[&key]);
        let mut stubs = Vec::new();
        for _ in 0..3 {
            stubs.push(open_tempdir("fb-stubs."));
        }
        let path_line = |d: &tempfile::TempDir| {
            format!(
                "SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin SHLVL=1\n",
                d.path().display()
            )
        };
        write_stubs(stubs[0].path(), "tunnel");
        write_stubs(stubs[1].path(), "m1");
        write_stubs(stubs[2].path(), "m2");
        let tunnel = Sshd::start_with(&["root"], &[&key], None, &path_line(&stubs[0]));
        let (a1, a2) = two_addresses();
        let m1 = Sshd::start_with(&["root"], &[&key], Some(a1), &path_line(&stubs[1]));
        let m2 = Sshd::start_with(&["root"], &[&key], Some(a2), &path_line(&stubs[2]));
        let machine = |id: &str, ip: &str| Machine {
            id: id.into(),
            primary_ip: ip.into(),
            ..Default::default()
        };
        let sim = SimServer::with(vec![machine(M1, &m1.ip), machine(M2, &m2.ip)], false);
        let known_hosts = keys.path().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!(
                "{}{}{}",
                tunnel.known_hosts_line(),
                m1.known_hosts_line(),
                m2.known_hosts_line()
            ),
        )
        .expect("known_hosts");
        Machines {
            keys,
            agent,
            sim,
            tunnel,
            m1,
            m2,
            stubs,
            known_hosts,
        }
    }

    pub fn config(&self, extra: &str) -> String {
        cluster_toml(
            "c1",
            &self.tunnel,
            &format!("unix://{}", self.sim.socket.display()),
            "root",
            &self.known_hosts,
            &format!("machine_ssh_port = {}\n{extra}", self.m1.port),
        )
    }

    pub fn broker(&self, extra: &str) -> Broker {
        Broker::start(&self.config(extra), Some(&self.agent.socket))
    }

    /// The stub directory of machine 1 or 2 (0 is the tunnel host).
    pub fn stub(&self, i: usize) -> &Path {
        self.stubs[i].path()
    }

    pub fn argv_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.stub(i).join("argv.log")).unwrap_or_default()
    }
}

/// Lines read from a child's output, as they come.
pub fn line_reader<R: Read + Send + 'static>(out: R) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A world, a broker serving it as cluster `c1`, and a working directory for our fleetctl.
pub struct CliEnv {
    pub w: World,
    pub b: Broker,
    pub cwd: tempfile::TempDir,
}

impl CliEnv {
    pub fn new() -> CliEnv {
        let w = World::new();
        let b = w.broker("");
        let cwd = open_tempdir("fb-cli.");
        CliEnv { w, b, cwd }
    }

    /// Our fleetctl with these arguments and no FLEETCTL_* variables.
    pub fn run(&self, args: &[&str]) -> Run {
        fleetctl(&self.b, self.cwd.path(), &[], args)
    }

    /// Our fleetctl with these FLEETCTL_* variables.
    pub fn run_env(&self, vars: &[(&str, &str)], args: &[&str]) -> Run {
        fleetctl(&self.b, self.cwd.path(), vars, args)
    }

    /// A unit file in the working directory.
    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.cwd.path().join(name), text).expect("write unit");
    }

    /// The simulated cluster's state.
    pub fn sim(&self) -> std::sync::MutexGuard<'_, Sim> {
        self.w.sim.sim.lock().expect("sim")
    }
}

// A fleetd answering with as many bytes as asked (flow-control tests and benchmark).

/// One block of an answer: 8 bytes of block number, then a fixed filler.
pub const BLOCK: usize = 1 << 20;

pub fn filler() -> Vec<u8> {
    (0..BLOCK - 8).map(|i| (i * 7 % 251) as u8).collect()
}

/// A fleetd that answers `GET /bulk/N` with N bytes (whole blocks, numbered) and anything
/// else with a small machine list; keep-alive unless asked to close. Returns its socket.
pub fn bulk_fleetd(dir: &Path) -> PathBuf {
    use std::io::BufRead;
    let socket = dir.join("bulk.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    std::thread::spawn(move || {
        let filler = std::sync::Arc::new(filler());
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let filler = filler.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().expect("clone"));
                let mut out = conn;
                loop {
                    let mut first = String::new();
                    if reader.read_line(&mut first).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut line = String::new();
                    let mut close = false;
                    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                        close |= line.trim().eq_ignore_ascii_case("connection: close");
                        line.clear();
                    }
                    let asked = first
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.strip_prefix("/bulk/"))
                        .and_then(|n| n.parse::<usize>().ok());
                    let Some(n) = asked else {
                        let body = br#"{"machines":[]}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        if out.write_all(head.as_bytes()).is_err()
                            || out.write_all(body).is_err()
                            || close
                        {
                            return;
                        }
                        continue;
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
                    );
                    if out.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    for block in 0..(n / BLOCK) as u64 {
                        if out.write_all(&block.to_le_bytes()).is_err()
                            || out.write_all(&filler).is_err()
                        {
                            return;
                        }
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    socket
}

/// What a reader of a bulk answer got.
#[derive(Debug)]
pub struct Got {
    pub status: String,
    /// Whole, correct blocks in order.
    pub blocks: usize,
    /// Why it stopped short, if it did.
    pub error: Option<String>,
}

/// Asks the broker for `n` bytes and reads them, pausing for `pause` after `pause_after`
/// blocks; every block is checked.
pub fn read_bulk(socket: &Path, n: usize, pause_after: usize, pause: Duration) -> Got {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.write_all(format!("GET /bulk/{n} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .expect("write");
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).expect("status line");
    let mut line = String::new();
    while r.read_line(&mut line).is_ok_and(|k| k > 2) {
        line.clear();
    }
    let filler = filler();
    let mut buf = vec![0u8; BLOCK];
    let mut blocks = 0;
    while blocks < n / BLOCK {
        if blocks == pause_after {
            // The client stops reading: the scenario, not a synchronisation.
            std::thread::sleep(pause);
        }
        if let Err(e) = r.read_exact(&mut buf) {
            return Got {
                status,
                blocks,
                error: Some(e.to_string()),
            };
        }
        if buf[..8] != (blocks as u64).to_le_bytes() || buf[8..] != filler[..] {
            return Got {
                status,
                blocks,
                error: Some(format!("block {blocks} is wrong")),
            };
        }
        blocks += 1;
    }
    Got {
        status,
        blocks,
        error: None,
    }
}

/// What [`two_readers_and_a_loop`] saw.
#[derive(Debug)]
pub struct BulkRun {
    pub fast: Got,
    pub fast_took: Duration,
    pub pausing: Got,
    /// Each small request's time, sorted.
    pub latencies: Vec<Duration>,
    /// Small requests that got no 200.
    pub failed: usize,
}

impl BulkRun {
    /// The `p`-quantile of the small requests' times.
    pub fn pct(&self, p: f64) -> Duration {
        self.latencies[((self.latencies.len() - 1) as f64 * p) as usize]
    }
}

/// Two readers of a `size`-byte answer through `socket`, one as fast as it can and one
/// pausing 10 s after 64 blocks, while small requests loop on the same socket until both are
/// done (bounded: 600 s, a million requests).
pub fn two_readers_and_a_loop(socket: &Path, size: usize) -> BulkRun {
    let started = Instant::now();
    let fast = {
        let socket = socket.to_path_buf();
        std::thread::spawn(move || {
            let t = Instant::now();
            (
                read_bulk(&socket, size, usize::MAX, Duration::ZERO),
                t.elapsed(),
            )
        })
    };
    let pausing = {
        let socket = socket.to_path_buf();
        std::thread::spawn(move || read_bulk(&socket, size, 64, Duration::from_secs(10)))
    };
    let mut latencies = Vec::new();
    let mut failed = 0;
    while !(fast.is_finished() && pausing.is_finished())
        && latencies.len() < 1_000_000
        && started.elapsed() < Duration::from_secs(600)
    {
        let t = Instant::now();
        let ok = try_http(socket, "GET", "/fleet/v1/machines", None)
            .is_ok_and(|(status, _)| status == 200);
        latencies.push(t.elapsed());
        failed += usize::from(!ok);
    }
    let (fast, fast_took) = fast.join().expect("fast reader");
    let pausing = pausing.join().expect("pausing reader");
    latencies.sort();
    BulkRun {
        fast,
        fast_took,
        pausing,
        latencies,
        failed,
    }
}

/// Says that a test did not run its checks (only for a missing privilege or kernel feature):
/// on stderr, and in the file `FLEET_BROKER_TEST_SKIPS` names, which `scripts/test.sh`
/// counts and lists in its summary even when every test passed.
#[allow(dead_code)]
pub fn skipped(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    if let Some(file) = std::env::var_os("FLEET_BROKER_TEST_SKIPS") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}
