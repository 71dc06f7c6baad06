//! `fleet-broker demo`: the whole broker on a built-in cluster, for a fresh machine. An
//! in-process SSH server (russh) fronts the fleet API simulator with three machines and
//! serves each machine's sshd in-process too ([`machines`]: simulated `systemctl status` and
//! `journalctl`), an in-process ssh-agent holds a generated key, every host key is pinned,
//! and the real daemon serves the `demo` cluster from a temporary directory.

mod machines;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterConfig, Config, ConnectMode, Endpoint, HostKeyPolicy, HostPort};
use crate::daemon::{Daemon, DaemonOptions};
use crate::fleet::schema::UnitOption;
use crate::front_door::random_ed25519;
use crate::sim::{demo_machines, Sim};

/// The demo's SSH server: accepts one user key, forwards streamlocal channels to one socket.
#[derive(Clone)]
struct DemoSsh {
    user_key: PublicKey,
    fleet_socket: String,
    sim: Arc<Mutex<Sim>>,
    /// Each machine's sshd config (its host key), by primaryIP.
    machines: Arc<std::collections::HashMap<String, Arc<russh::server::Config>>>,
}

/// The demo's servers (tunnel host and machines) accept the demo agent's key and no other.
fn key_auth(user_key: &PublicKey, offered: &PublicKey) -> Auth {
    if offered.key_data() == user_key.key_data() {
        Auth::Accept
    } else {
        Auth::reject()
    }
}

impl russh::server::Handler for DemoSsh {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(key_auth(&self.user_key, offer.public_key))
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(key_auth(&self.user_key, key.public_key))
    }

    /// A machine's sshd (`primaryIP:22`), served in-process on the channel.
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let found = self
            .machines
            .get(host_to_connect)
            .cloned()
            .filter(|_| port_to_connect == 22);
        let machine = {
            let sim = match self.sim.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            sim.machines()
                .iter()
                .find(|m| m.primary_ip == host_to_connect)
                .map(|m| m.id.clone())
        };
        let (Some(config), Some(id)) = (found, machine) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        reply.accept().await;
        // 172.17.8.101 is core-01, as in CoreOS's Vagrant setup.
        let hostname = host_to_connect
            .rsplit('.')
            .next()
            .and_then(|o| o.parse::<u32>().ok())
            .map_or_else(
                || "core".to_string(),
                |o| format!("core-{:02}", o.saturating_sub(100)),
            );
        let handler = machines::Machine::new(id, hostname, self.sim.clone(), self.user_key.clone());
        tokio::spawn(async move {
            if let Ok(session) =
                russh::server::run_stream(config, channel.into_stream(), handler).await
            {
                let _ = session.await;
            }
        });
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if socket_path != self.fleet_socket {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        match UnixStream::connect(socket_path).await {
            Ok(mut upstream) => {
                reply.accept().await;
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
                });
            }
            Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
        }
        Ok(())
    }
}

/// Why the demo could not start or did not see the broker answer.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A step failed: what it was, and why.
    #[error("{what}: {why}")]
    Step {
        /// The step.
        what: String,
        /// Its error.
        why: String,
    },
    /// The daemon did not start.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::StartError),
    /// The broker's answer was not the simulator's.
    #[error("{0}")]
    Answer(String),
}

/// Maps an error of the step `what` to a [`DemoError`].
fn at<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> DemoError {
    let what = what.into();
    move |e| DemoError::Step {
        what,
        why: e.to_string(),
    }
}

/// Everything the demo runs, torn down on drop.
pub struct Demo {
    /// The broker's daemon, serving the `demo` cluster.
    pub daemon: Daemon,
    /// The demo cluster's socket.
    pub socket: PathBuf,
    /// The simulator's own socket (what the tunnel host reaches).
    pub fleet_socket: PathBuf,
    /// Set when another daemon owns the default runtime dir and the demo lives elsewhere.
    pub runtime_dir: Option<PathBuf>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn serve_agent(
    path: &Path,
    key: &PrivateKey,
    stop: CancellationToken,
) -> Result<(), DemoError> {
    let listener =
        UnixListener::bind(path).map_err(at(format!("binding agent socket {}", path.display())))?;
    let incoming = Box::pin(futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    }));
    tokio::spawn(async move {
        tokio::select! {
            _ = russh::keys::agent::server::serve(incoming, ()) => {}
            _ = stop.cancelled() => {}
        }
    });
    let mut client = russh::keys::agent::client::AgentClient::connect_uds(path)
        .await
        .map_err(at("connecting to the demo agent"))?;
    client
        .add_identity(key, &[])
        .await
        .map_err(at("adding the demo key to the agent"))?;
    Ok(())
}

/// The simulator with the reference's three machines and one unit, on `socket`.
fn start_simulator(socket: &Path, stop: CancellationToken) -> Result<Arc<Mutex<Sim>>, DemoError> {
    let mut sim = Sim::new(demo_machines());
    sim.put(
        "hello.service",
        vec![
            UnitOption {
                section: "Unit".into(),
                name: "Description".into(),
                value: "Hello World".into(),
            },
            UnitOption {
                section: "Service".into(),
                name: "ExecStart".into(),
                value: "/bin/sleep 3000".into(),
            },
        ],
        "launched".into(),
    );
    // The demo moves as fleet does: `fleetctl start` waits seconds, as on a real cluster.
    sim.timing = crate::sim::Timing::Fleet(crate::sim::FleetDelays::observed());
    sim.random_placement = true;
    let listener = UnixListener::bind(socket).map_err(at(format!(
        "binding the simulator's socket {}",
        socket.display()
    )))?;
    let sim = Arc::new(Mutex::new(sim));
    tokio::spawn(crate::sim::serve(listener, sim.clone(), stop));
    Ok(sim)
}

/// The in-process SSH server on a free loopback port; returns the port.
async fn start_ssh_server(
    host_key: &PrivateKey,
    handler: DemoSsh,
    stop: CancellationToken,
) -> Result<u16, DemoError> {
    let tcp = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(at("binding the demo SSH server"))?;
    let port = tcp
        .local_addr()
        .map_err(at("binding the demo SSH server"))?
        .port();
    let server_config = Arc::new(russh::server::Config {
        keys: vec![host_key.clone()],
        auth_rejection_time: Duration::from_millis(10),
        auth_rejection_time_initial: Some(Duration::ZERO),
        nodelay: true,
        ..Default::default()
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = tcp.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let _ = stream.set_nodelay(true);
                    let (cfg, h) = (server_config.clone(), handler.clone());
                    tokio::spawn(async move {
                        if let Ok(session) = russh::server::run_stream(cfg, stream, h).await {
                            let _ = session.await;
                        }
                    });
                }
                _ = stop.cancelled() => break,
            }
        }
    });
    Ok(port)
}

/// The `demo` cluster: the in-process server on `port`, pinned in `known_hosts`.
fn demo_cluster(port: u16, fleet_socket: &Path, known_hosts: PathBuf) -> ClusterConfig {
    ClusterConfig {
        name: "demo".into(),
        tunnel: HostPort {
            host: "127.0.0.1".into(),
            port,
        },
        jump: vec![],
        endpoint: Endpoint::Unix(fleet_socket.display().to_string()),
        user: "core".into(),
        identity_files: vec![],
        certificate_files: Vec::new(),
        transport: crate::config::Transport::Auto,
        known_hosts: vec![known_hosts],
        host_key_checking: HostKeyPolicy::Strict,
        keepalive_interval: Duration::from_secs(15),
        keepalive_max: 3,
        connect_timeout: Duration::from_secs(10),
        stalled_reader_timeout: crate::config::DEFAULT_STALLED_READER_TIMEOUT,
        connect: ConnectMode::Eager,
        machine_ssh_port: 22,
        read_only: false,
        guard: false,
        interactive_session: crate::config::InteractiveSession::Off,
        front_door: None,
        front_door_authorized_keys: None,
    }
}

impl Demo {
    /// Starts the simulator, SSH server, agent and daemon.
    pub async fn start() -> Result<Demo, DemoError> {
        let dir = tempfile::Builder::new()
            .prefix("fleet-broker-demo.")
            .tempdir()
            .map_err(at("creating a temporary directory"))?;
        let stop = CancellationToken::new();
        let fleet_socket = dir.path().join("fleet.sock");
        let sim = start_simulator(&fleet_socket, stop.clone())?;
        let host_key = random_ed25519();
        let user_key = random_ed25519();
        let agent_socket = dir.path().join("agent.sock");
        serve_agent(&agent_socket, &user_key, stop.clone()).await?;
        let known_hosts = dir.path().join("known_hosts");
        let mut machine_configs = std::collections::HashMap::new();
        for m in demo_machines() {
            let key = random_ed25519();
            crate::known_hosts::append_pin(&known_hosts, &m.primary_ip, key.public_key(), false)
                .map_err(at("pinning a demo machine's key"))?;
            machine_configs.insert(m.primary_ip.clone(), machines::server_config(key));
        }
        let handler = DemoSsh {
            user_key: user_key.public_key().clone(),
            fleet_socket: fleet_socket.display().to_string(),
            sim,
            machines: Arc::new(machine_configs),
        };
        let port = start_ssh_server(&host_key, handler, stop.clone()).await?;
        let cluster = demo_cluster(port, &fleet_socket, known_hosts.clone());
        crate::known_hosts::append_pin(
            &known_hosts,
            &cluster.tunnel.known_hosts_name(),
            host_key.public_key(),
            false,
        )
        .map_err(at("pinning the demo server's key"))?;
        let config = Config {
            audit_log: crate::config::AuditLogSetting::Off,
            path: dir.path().join("config.toml"),
            clusters: [("demo".to_string(), cluster)].into_iter().collect(),
        };
        // Serve where fleetctl looks by default, unless a daemon already lives there.
        let default_dir = crate::local::default_runtime_dir();
        let default_busy =
            std::os::unix::net::UnixStream::connect(crate::local::control_socket(&default_dir))
                .is_ok();
        let runtime_dir = if default_busy {
            dir.path().join("run")
        } else {
            default_dir
        };
        let daemon = Daemon::start(
            &config,
            &DaemonOptions {
                runtime_dir: runtime_dir.clone(),
                agent_socket: Some(agent_socket),
                state_dir: dir.path().join("state"),
                control_fd: None,
            },
        )
        .await?;
        let socket = crate::local::cluster_socket(&runtime_dir, "demo");
        Ok(Demo {
            daemon,
            socket,
            fleet_socket,
            runtime_dir: default_busy.then_some(runtime_dir),
            stop,
            _dir: dir,
        })
    }

    /// Stops the daemon, then the simulator, server and agent.
    pub async fn stop(self) {
        self.daemon.shutdown().await;
        self.stop.cancel();
    }
}

/// `GET path` on a unix socket; returns status and body.
pub async fn get_unix(socket: &Path, path: &str) -> Result<(u16, Bytes), DemoError> {
    let what = format!("GET {path} on {}", socket.display());
    let stream = UnixStream::connect(socket).await.map_err(at(&what))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(at(&what))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("Host", "domain-sock")
        .body(Empty::<Bytes>::new())
        .map_err(at(&what))?;
    let resp = sender.send_request(req).await.map_err(at(&what))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(at(&what))?
        .to_bytes();
    Ok((status, body))
}

/// Prints how to use the demo cluster; with `once`, says that they work while it serves.
fn print_usage(demo: &Demo, once: bool) {
    let sock = demo.socket.display().to_string();
    println!("fleet-broker demo: cluster \"demo\" is served on {sock}");
    println!();
    if let Some(dir) = &demo.runtime_dir {
        println!(
            "  (another fleet-broker owns the default runtime dir; the demo lives in {})",
            dir.display()
        );
        println!("  export FLEET_BROKER_RUNTIME_DIR={}", dir.display());
    }
    if once {
        println!("  (these work while the demo serves: run `fleet-broker demo` without --once)");
    }
    println!("  fleetctl --cluster demo list-machines");
    println!("  fleetctl --cluster demo status hello.service");
    println!("  fleetctl --cluster demo journal hello.service");
    println!("  export FLEETCTL_ENDPOINT=unix://{sock}");
    println!("  curl --unix-socket {sock} http://x/fleet/v1/machines");
    println!();
}

/// Checks that the broker answers as the simulator does, and shows it.
async fn show_machines(demo: &Demo) -> Result<(), DemoError> {
    let through = tokio::time::timeout(
        Duration::from_secs(20),
        get_unix(&demo.socket, "/fleet/v1/machines"),
    )
    .await;
    let direct = get_unix(&demo.fleet_socket, "/fleet/v1/machines").await;
    match (through, direct) {
        (Ok(Ok((200, body))), Ok((200, want))) if body == want => {
            println!("GET /fleet/v1/machines through the broker:");
            println!("{}", String::from_utf8_lossy(&body));
            println!();
            println!("$ fleetctl --cluster demo list-machines");
            let api = crate::fleet_client::FleetClient::new(&demo.socket, Duration::from_secs(20));
            let flags = crate::cli::args::ListFlags {
                fields: None,
                full: false,
                l: false,
                no_legend: false,
                ignored: vec![],
            };
            match crate::cli::lists::list_machines(&api, &flags).await {
                0 => Ok(()),
                _ => Err(DemoError::Answer(
                    "list-machines through the broker failed".into(),
                )),
            }
        }
        (Ok(Ok((status, body))), _) => Err(DemoError::Answer(format!(
            "the broker answered {status}: {}",
            String::from_utf8_lossy(&body)
        ))),
        (Ok(Err(e)), _) => Err(e),
        (Err(_), _) => Err(DemoError::Answer(
            "no answer through the broker within 20s".into(),
        )),
    }
}

/// Shows a unit's status, run on its machine through the daemon's exec sessions.
async fn show_status(demo: &Demo) -> Result<(), DemoError> {
    println!();
    println!("$ fleetctl --cluster demo status hello.service");
    let api = crate::fleet_client::FleetClient::new(&demo.socket, Duration::from_secs(20));
    let sessions = crate::cli::remote::Sessions {
        control: demo.daemon.control_socket.clone(),
        cluster: Some("demo".into()),
        user: None,
        timeout_secs: Some(20.0),
    };
    match crate::cli::remote::status(&api, &sessions, &["hello.service".into()], None).await {
        0 => Ok(()),
        code => Err(DemoError::Answer(format!(
            "status through the broker exited {code}"
        ))),
    }
}

/// Runs the demo: prints how to use it, shows the machines through the broker, and with
/// `once` exits after checking that the broker's answer equals the simulator's.
pub async fn run(once: bool) -> Result<(), DemoError> {
    let demo = Demo::start().await?;
    print_usage(&demo, once);
    let mut result = show_machines(&demo).await;
    if result.is_ok() {
        result = show_status(&demo).await;
    }
    if once || result.is_err() {
        demo.stop().await;
        return result;
    }
    println!();
    println!("Serving until Ctrl-C.");
    crate::shutdown_signal().await;
    demo.stop().await;
    result
}
