//! The demo's machines over SSH: each simulated machine's sshd, served in-process on a
//! `direct-tcpip` channel that the demo's tunnel host opens to `primaryIP:22`, so that
//! `fleetctl --cluster demo status|journal|ssh` run end to end through the real daemon (nested
//! SSH, host keys pinned, agent authentication) against simulated systemd and journal output.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId};

use crate::sim::Sim;

/// One simulated machine's sshd.
pub(super) struct Machine {
    pub(super) id: String,
    pub(super) hostname: String,
    pub(super) sim: Arc<Mutex<Sim>>,
    pub(super) user_key: PublicKey,
    sessions: HashMap<ChannelId, Channel<Msg>>,
}

impl Machine {
    pub(super) fn new(
        id: String,
        hostname: String,
        sim: Arc<Mutex<Sim>>,
        user_key: PublicKey,
    ) -> Machine {
        Machine {
            id,
            hostname,
            sim,
            user_key,
            sessions: HashMap::new(),
        }
    }
}

/// The SSH server config of every simulated machine, with `host_key`.
pub(super) fn server_config(host_key: PrivateKey) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        keys: vec![host_key],
        auth_rejection_time: std::time::Duration::from_millis(10),
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        ..Default::default()
    })
}

/// The words of a command line the daemon built (every word single-quoted for `sh`, a `'`
/// inside written as `'\''`).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut any) = (false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            '\\' if !quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

impl Machine {
    /// What a command prints and its exit status, as this machine's systemd would answer.
    fn run(&self, line: &str) -> (String, u32) {
        let w = words(line);
        let w: Vec<&str> = w
            .iter()
            .map(String::as_str)
            .skip_while(|w| *w == "sudo" || *w == "--")
            .collect();
        let sim = match self.sim.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match w.as_slice() {
            ["systemctl", "status", "-l", "--", unit] => {
                let Some(u) = sim.unit(unit).filter(|u| u.machine_id == self.id) else {
                    return (format!("Unit {unit} could not be found.\n"), 4);
                };
                let description = u
                    .options
                    .iter()
                    .find(|o| o.section == "Unit" && o.name == "Description")
                    .map_or(unit.to_string(), |o| o.value.clone());
                let active = u.current_state == "launched";
                (
                    format!(
                        "● {unit} - {description}\n     Loaded: loaded (/run/fleet/units/{unit}; linked-runtime; vendor preset: disabled)\n     Active: {}\n   Main PID: 1042 (sleep)\n     CGroup: /system.slice/{unit}\n             └─1042 /bin/sleep 3000\n\n{} systemd[1]: Started {description}.\n",
                        if active { "active (running) since Thu 2026-11-26 08:00:00 UTC" } else { "inactive (dead)" },
                        self.journal_prefix()
                    ),
                    if active { 0 } else { 3 },
                )
            }
            ["journalctl", unit_arg, "--no-pager", rest @ ..] => {
                let unit = unit_arg.trim_start_matches("--unit=");
                let after = rest
                    .iter()
                    .position(|a| *a == "--after-cursor")
                    .and_then(|i| rest.get(i + 1));
                let mut out = String::new();
                if after.is_none() {
                    out.push_str(&format!(
                        "{} systemd[1]: Started {unit}.\n{} sleep[1042]: Hello from {} ({}).\n",
                        self.journal_prefix(),
                        self.journal_prefix(),
                        unit,
                        self.hostname
                    ));
                }
                if rest.contains(&"--show-cursor") {
                    out.push_str("-- cursor: s=demo;i=2\n");
                }
                (out, 0)
            }
            _ => (
                format!(
                    "{}: a simulated machine of `fleet-broker demo`: it answers `systemctl status` and `journalctl` for fleetctl; nothing else runs here.\n",
                    self.hostname
                ),
                if line.is_empty() { 0 } else { 127 },
            ),
        }
    }

    fn journal_prefix(&self) -> String {
        format!("Nov 26 08:00:00 {}", self.hostname)
    }

    /// Answers a session: output, exit status, end of channel.
    fn answer(
        &mut self,
        id: ChannelId,
        line: &str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let (out, code) = self.run(line);
        session.channel_success(id)?;
        session.data(id, out.into_bytes())?;
        session.exit_status_request(id, code)?;
        session.eof(id)?;
        session.close(id)
    }
}

impl russh::server::Handler for Machine {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(super::key_auth(&self.user_key, offer.public_key))
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(super::key_auth(&self.user_key, key.public_key))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.sessions.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.sessions.remove(&id);
        let line = String::from_utf8_lossy(data).into_owned();
        self.answer(id, &line, session)
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.sessions.remove(&id);
        self.answer(id, "", session)
    }

    async fn pty_request(
        &mut self,
        id: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_split_into_their_words() {
        assert_eq!(
            words("systemctl 'status' '-l' '--' 'a b.service'"),
            vec!["systemctl", "status", "-l", "--", "a b.service"]
        );
        assert_eq!(
            words("sudo -- journalctl '--unit=x'"),
            vec!["sudo", "--", "journalctl", "--unit=x"]
        );
        assert_eq!(words("'it'\\''s'"), vec!["it's"]);
    }
}
