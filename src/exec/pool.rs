//! Nested connections to machines, pooled per machine, port and user, and the slots that
//! sessions hold on them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use russh::client::{Handle, Msg};
use russh::Channel;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::{HostPort, InteractiveSession};
use crate::protocol::exec::ExecError;
use crate::tunnel::channel::DrainedChannel;
use crate::tunnel::dial::{self, ClientHandler};
use crate::tunnel::open_interactive;

use super::resolve::Place;
use super::{Exec, NESTED_IDLE, SESSIONS_PER_CONNECTION};

type SshHandle = Arc<Handle<ClientHandler>>;

/// A pooled connection and how busy it is.
pub(super) struct Pooled {
    handle: SshHandle,
    active: AtomicUsize,
    last_used: Mutex<Instant>,
    /// The connection's interactive session (`interactive_session`), which makes the
    /// machine's sshd send without Nagle delays; held as long as the connection, unless a
    /// user's session needs its slot (sshd's `MaxSessions`).
    interactive: Mutex<Option<Channel<Msg>>>,
    /// A session channel opened ahead ([`Pooled::refill`]), so that a command costs its
    /// request and not a channel round trip: the sender asks the task holding it for it.
    reserve: Mutex<Option<oneshot::Sender<oneshot::Sender<Channel<Msg>>>>>,
    /// A reserve is being opened.
    refilling: AtomicBool,
}

impl Pooled {
    fn new(handle: SshHandle, interactive: Option<Channel<Msg>>) -> Pooled {
        Pooled {
            handle,
            active: AtomicUsize::new(1),
            last_used: Mutex::new(Instant::now()),
            interactive: Mutex::new(interactive),
            reserve: Mutex::new(None),
            refilling: AtomicBool::new(false),
        }
    }

    /// The reserved session channel, if one is open (sshd may have closed it, for example
    /// by `ChannelTimeout`: its holder then has let it go).
    async fn take_reserve(&self) -> Option<Channel<Msg>> {
        let ask = lock(&self.reserve).take()?;
        let (give, taken) = oneshot::channel();
        ask.send(give).ok()?;
        taken.await.ok()
    }

    /// Opens a session channel ahead, unless there is one or one is being opened. Its slot
    /// under sshd's `MaxSessions` is one the pool never fills (at most
    /// [`SESSIONS_PER_CONNECTION`] sessions, the interactive one and this); where sshd has
    /// fewer, opening it fails and nothing is kept. A task holds it until it is taken, sshd
    /// closes it, the connection ends or the cluster stops.
    fn refill(self: &Arc<Self>, stop: &CancellationToken) {
        if lock(&self.reserve).is_some() || self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let pooled = Arc::downgrade(self);
        let handle = self.handle.clone();
        let stop = stop.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let opened = tokio::select! {
                _ = stop.cancelled() => None,
                r = handle.channel_open_session() => r.ok(),
            };
            let Some(mut ch) = opened else {
                if let Some(p) = pooled.upgrade() {
                    p.refilling.store(false, Ordering::SeqCst);
                }
                return;
            };
            let (ask, mut asked) = oneshot::channel::<oneshot::Sender<Channel<Msg>>>();
            match pooled.upgrade() {
                Some(p) => {
                    *lock(&p.reserve) = Some(ask);
                    p.refilling.store(false, Ordering::SeqCst);
                }
                None => return,
            }
            drop(handle);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    give = &mut asked => {
                        if let Ok(give) = give {
                            let _ = give.send(ch);
                        }
                        return;
                    }
                    msg = ch.wait() => match msg {
                        // Closed by sshd or with the connection: the next session opens
                        // its own channel (and its refill another reserve).
                        None | Some(russh::ChannelMsg::Close | russh::ChannelMsg::Eof) => {
                            tracing::debug!("the session channel opened ahead was closed by the server; the next session opens its own");
                            if let Some(p) = pooled.upgrade() {
                                lock(&p.reserve).take();
                            }
                            return;
                        }
                        Some(_) => {}
                    }
                }
            }
        }));
    }

    /// Closes the interactive session, so that its slot under sshd's `MaxSessions` goes to a
    /// user's session; false when there is none.
    async fn give_up_interactive(&self) -> bool {
        let taken = lock(&self.interactive).take();
        match taken {
            Some(ch) => {
                let _ = ch.close().await;
                true
            }
            None => false,
        }
    }
}

/// Held while a session runs; frees its slot on drop.
pub(crate) struct Slot {
    pooled: Option<Arc<Pooled>>,
    /// A connection of this session alone (the tunnel host, agent forwarding), closed with it.
    own: Option<SshHandle>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(p) = &self.pooled {
            if let Ok(mut t) = p.last_used.lock() {
                *t = Instant::now();
            }
            p.active.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(h) = self.own.take() {
            tokio::spawn(tracing::Instrument::in_current_span(async move {
                let _ = h
                    .disconnect(russh::Disconnect::ByApplication, "", "en")
                    .await;
            }));
        }
    }
}

/// How long after a session of ours ended on a connection a refused session is taken for
/// its slot still being freed, and tried again.
const SLOT_FREEING: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub(super) struct PoolKey {
    ip: String,
    port: u16,
    user: String,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Exec {
    /// Dials a machine through the tunnel: direct-tcpip to `ip:port`, then SSH end to end.
    async fn dial_nested(
        &self,
        id: &str,
        ip: &str,
        port: u16,
        user: &str,
        forward_agent: bool,
    ) -> Result<SshHandle, ExecError> {
        let ch = self.channel_to(ip, port).await?;
        let label = format!(
            "cluster {:?} machine {}",
            self.tunnel.name(),
            Self::short(id)
        );
        let target = HostPort {
            host: ip.to_string(),
            port,
        };
        let spec = self.spec(label, target.clone(), user.to_string(), forward_agent);
        let conn = dial::handshake(&spec, DrainedChannel::new(ch), None, target.to_string())
            .await
            .map_err(|e| ExecError::ssh(e.to_string()))?;
        Ok(Arc::new(conn.handle))
    }

    /// A connection with a free session slot for this place and user.
    pub(super) async fn connection(
        &self,
        place: &Place,
        user: &str,
        port: u16,
        forward_agent: bool,
    ) -> Result<(SshHandle, Slot), ExecError> {
        match place {
            Place::Tunnel => self.tunnel_host_connection(user, forward_agent).await,
            // Agent forwarding is per connection: such a session gets one of its own.
            Place::Machine { id, ip } if forward_agent => {
                let h = self.dial_nested(id, ip, port, user, true).await?;
                Ok((h.clone(), Slot::own(h)))
            }
            Place::Machine { id, ip } => {
                let key = PoolKey {
                    ip: ip.clone(),
                    port,
                    user: user.to_string(),
                };
                if let Some(taken) = self.take_pooled(&key) {
                    return Ok(taken);
                }
                self.add_pooled(key, id).await
            }
        }
    }

    /// A session on the tunnel host gets a connection of its own: on the tunnel's, an
    /// unread session would fill its channel's queue and russh would stop reading the whole
    /// connection, stalling every API request of the cluster.
    async fn tunnel_host_connection(
        &self,
        user: &str,
        forward_agent: bool,
    ) -> Result<(SshHandle, Slot), ExecError> {
        let cfg = &self.tunnel.config;
        let label = format!("cluster {:?} tunnel host", self.tunnel.name());
        let mut spec = self.spec(label, cfg.tunnel.clone(), user.to_string(), forward_agent);
        spec.jump = cfg.jump.clone();
        let conn = dial::dial(&spec)
            .await
            .map_err(|e| ExecError::ssh(e.to_string()))?;
        let h = Arc::new(conn.handle);
        Ok((h.clone(), Slot::own(h)))
    }

    /// A slot on a pooled connection with room, if there is one.
    fn take_pooled(&self, key: &PoolKey) -> Option<(SshHandle, Slot)> {
        let mut pool = lock(&self.pool);
        let conns = pool.entry(key.clone()).or_default();
        conns.retain(|p| !p.handle.is_closed());
        for p in conns.iter() {
            let n = p.active.fetch_add(1, Ordering::SeqCst);
            if n < SESSIONS_PER_CONNECTION {
                return Some((p.handle.clone(), Slot::pooled(p.clone())));
            }
            p.active.fetch_sub(1, Ordering::SeqCst);
        }
        None
    }

    /// Dials a new pooled connection (with its interactive session unless configured off)
    /// and takes its first slot.
    async fn add_pooled(&self, key: PoolKey, id: &str) -> Result<(SshHandle, Slot), ExecError> {
        let handle = self
            .dial_nested(id, &key.ip, key.port, &key.user, false)
            .await?;
        let interactive = match self.tunnel.config.interactive_session {
            InteractiveSession::Auto => {
                open_interactive(&handle, self.tunnel.probe_timeout()).await
            }
            InteractiveSession::Off => None,
        };
        let pooled = Arc::new(Pooled::new(handle.clone(), interactive));
        lock(&self.pool)
            .entry(key)
            .or_default()
            .push(pooled.clone());
        Ok((handle, Slot::pooled(pooled)))
    }
}

impl Slot {
    /// A session channel for this slot's command: the connection's reserve where there is
    /// one, else a new one (making room under `MaxSessions` if it must). A reserve is then
    /// opened ahead for the next command.
    pub(super) async fn session(
        &self,
        handle: &Handle<ClientHandler>,
        stop: &CancellationToken,
    ) -> Result<Channel<Msg>, russh::Error> {
        if let Some(p) = &self.pooled {
            if let Some(ch) = p.take_reserve().await {
                tracing::debug!("exec session on a channel opened ahead");
                p.refill(stop);
                return Ok(ch);
            }
        }
        let ch = crate::tunnel::open_session_making_room(handle, || self.make_room()).await?;
        if let Some(p) = &self.pooled {
            p.refill(stop);
        }
        Ok(ch)
    }

    /// For a session that could not be opened on a pooled connection: gives up that
    /// connection's interactive session (its slot under `MaxSessions`); true when one was
    /// given up, or when a session of ours ended on it just now (sshd frees a slot a round
    /// trip after the close), so that opening again may succeed.
    pub(super) async fn make_room(&self) -> bool {
        match &self.pooled {
            Some(p) => p.give_up_interactive().await || lock(&p.last_used).elapsed() < SLOT_FREEING,
            None => false,
        }
    }

    fn own(h: SshHandle) -> Slot {
        Slot {
            pooled: None,
            own: Some(h),
        }
    }

    fn pooled(p: Arc<Pooled>) -> Slot {
        Slot {
            pooled: Some(p),
            own: None,
        }
    }
}

/// Closes idle nested connections.
pub(super) async fn sweep(exec: Weak<Exec>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(NESTED_IDLE / 4) => {}
        }
        let Some(exec) = exec.upgrade() else { return };
        let mut idle = Vec::new();
        {
            let mut pool = lock(&exec.pool);
            for conns in pool.values_mut() {
                conns.retain(|p| {
                    let unused = p.active.load(Ordering::SeqCst) == 0
                        && lock(&p.last_used).elapsed() >= NESTED_IDLE;
                    if unused || p.handle.is_closed() {
                        idle.push(p.handle.clone());
                        false
                    } else {
                        true
                    }
                });
            }
            pool.retain(|_, v| !v.is_empty());
        }
        for h in idle {
            let _ = h
                .disconnect(russh::Disconnect::ByApplication, "idle", "en")
                .await;
        }
    }
}
