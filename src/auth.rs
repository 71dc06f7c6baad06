//! Public key authentication for one SSH connection: keys from the ssh-agent at
//! `SSH_AUTH_SOCK` (rsa-sha2 for RSA, as OpenSSH ≥ 8.8 refuses SHA-1, ed25519, ECDSA) and
//! unencrypted identity files from the config. When identity files are configured their agent
//! twins are offered first, so a full agent does not exhaust the server's MaxAuthTries.
//! Knows nothing of fleet or of which connection it authenticates beyond its name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::client::{AuthResult, Handle, Handler};
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use tokio::net::UnixStream;

use crate::known_hosts::fingerprint_sha256;

/// Why no key was accepted; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Neither an agent nor identity files.
    #[error("no ssh-agent: SSH_AUTH_SOCK is not set and no identity_files are configured; start one (`eval \"$(ssh-agent)\"`), add your key with `ssh-add`, and start fleet-broker from that environment")]
    NoAgent,
    #[error("cannot reach the ssh-agent at {path}: {reason}; is ssh-agent still running? (check SSH_AUTH_SOCK)")]
    /// `SSH_AUTH_SOCK` names a socket nobody answers on.
    AgentUnreachable {
        /// The agent's socket.
        path: PathBuf,
        /// The connect error.
        reason: String,
    },
    #[error("the ssh-agent at {0} offers no keys: it is locked (`ssh-add -X` unlocks it) or holds none (add your key with `ssh-add`); no identity_files are configured. Retrying by itself")]
    /// The agent (at this socket) offers no keys.
    EmptyAgent(PathBuf),
    #[error("identity file {path}: {reason}")]
    /// An identity file cannot be used.
    IdentityFile {
        /// The file.
        path: PathBuf,
        /// Why not (permissions, encrypted, unreadable).
        reason: String,
    },
    #[error("{target} refused every key for user {user:?} (tried {tried}); check that one of them is in ~{user}/.ssh/authorized_keys there, or set `user` for this cluster")]
    /// The server refused every key offered.
    Refused {
        /// `host:port`.
        target: String,
        /// The user logged in as.
        user: String,
        /// The keys offered, by fingerprint and origin.
        tried: String,
    },
    #[error("authentication to {target} failed: {reason}")]
    /// The connection failed during authentication.
    Transport {
        /// `host:port`.
        target: String,
        /// The SSH error.
        reason: String,
    },
}

/// A key we may offer, and who signs with it.
enum Candidate {
    Agent(PublicKey),
    File(Arc<PrivateKey>),
}

impl Candidate {
    fn public(&self) -> PublicKey {
        match self {
            Candidate::Agent(k) => k.clone(),
            Candidate::File(k) => k.public_key().clone(),
        }
    }
}

/// Where keys come from for one connection.
#[derive(Debug, Clone, Default)]
pub struct KeySource {
    /// The agent socket (`SSH_AUTH_SOCK`), if any.
    pub agent: Option<PathBuf>,
    /// Key files offered after the agent's keys (`identity_files`).
    pub identity_files: Vec<PathBuf>,
}

impl KeySource {
    /// The agent from the process environment plus the given files.
    pub(crate) fn from_env(identity_files: &[PathBuf]) -> KeySource {
        KeySource {
            agent: std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            identity_files: identity_files.to_vec(),
        }
    }
}

fn public_of_file(path: &Path) -> Option<PublicKey> {
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    russh::keys::load_public_key(PathBuf::from(pub_path)).ok()
}

/// Why an identity file is not used, as a user would fix it.
#[derive(Debug)]
enum Unusable {
    /// Readable by others: OpenSSH's `UNPROTECTED PRIVATE KEY FILE`.
    Unprotected(u32),
    /// Encrypted, and no passphrase stored (or the keyring could not be read: why).
    Encrypted(Option<String>),
    /// Encrypted, and the stored passphrase does not decrypt it.
    WrongPassphrase,
}

impl Unusable {
    fn reason(&self, path: &Path) -> String {
        match self {
            Unusable::Unprotected(mode) => format!(
                "UNPROTECTED PRIVATE KEY FILE: permissions {mode:04o} are too open, so the key is ignored (as OpenSSH does); run `chmod 600 {}`",
                path.display()
            ),
            Unusable::Encrypted(keyring) => format!(
                "is encrypted, its key is not in the agent and no passphrase is stored{}; run `fleet-broker passphrase set {}` (or add the key with `ssh-add`)",
                keyring.as_ref().map(|e| format!(" ({e})")).unwrap_or_default(),
                path.display()
            ),
            Unusable::WrongPassphrase => format!(
                "is encrypted and the stored passphrase does not decrypt it; run `fleet-broker passphrase set {}` again",
                path.display()
            ),
        }
    }
}

/// OpenSSH's `sshkey_perm_ok`: a key file we own must not be accessible to group or others.
fn check_permissions(path: &Path) -> Result<Option<Unusable>, AuthError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| AuthError::IdentityFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mode = meta.mode() & 0o7777;
    if meta.uid() == nix::unistd::getuid().as_raw() && mode & 0o077 != 0 {
        return Ok(Some(Unusable::Unprotected(mode)));
    }
    Ok(None)
}

fn load_file_key(path: &Path) -> Result<Result<PrivateKey, Unusable>, AuthError> {
    if let Some(u) = check_permissions(path)? {
        return Ok(Err(u));
    }
    match russh::keys::load_secret_key(path, None) {
        Ok(k) => Ok(Ok(k)),
        Err(russh::keys::Error::KeyIsEncrypted) => Ok(decrypt(path)),
        Err(e) => Err(AuthError::IdentityFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// An encrypted identity file decrypted in memory with its stored passphrase.
fn decrypt(path: &Path) -> Result<PrivateKey, Unusable> {
    match crate::passphrase::get(path) {
        Ok(Some(p)) => {
            russh::keys::load_secret_key(path, Some(&p)).map_err(|_| Unusable::WrongPassphrase)
        }
        Ok(None) => Err(Unusable::Encrypted(None)),
        Err(e) => Err(Unusable::Encrypted(Some(e))),
    }
}

async fn agent_keys(path: &Path) -> Result<(AgentClient<UnixStream>, Vec<PublicKey>), AuthError> {
    let unreachable = |reason: String| AuthError::AgentUnreachable {
        path: path.to_path_buf(),
        reason,
    };
    let mut agent = AgentClient::connect_uds(path)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let ids = agent
        .request_identities()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let keys = ids
        .into_iter()
        .filter_map(|id| match id {
            AgentIdentity::PublicKey { key, .. } => Some(key),
            AgentIdentity::Certificate { .. } => None,
        })
        .collect();
    Ok((agent, keys))
}

/// Orders the candidates: agent keys that match configured files, other agent keys, then
/// file keys the agent does not hold.
async fn candidates(
    source: &KeySource,
) -> Result<(Option<AgentClient<UnixStream>>, Vec<Candidate>), AuthError> {
    let (agent, agent_pubs) = match &source.agent {
        Some(p) => {
            let (a, k) = agent_keys(p).await?;
            (Some(a), k)
        }
        None => (None, Vec::new()),
    };
    let mut wanted: Vec<PublicKey> = Vec::new();
    let mut files: Vec<Candidate> = Vec::new();
    let mut skipped: Option<(PathBuf, String)> = None;
    for path in &source.identity_files {
        let pubkey = public_of_file(path);
        let in_agent = pubkey
            .as_ref()
            .is_some_and(|pk| agent_pubs.iter().any(|a| a.key_data() == pk.key_data()));
        if let Some(pk) = &pubkey {
            wanted.push(pk.clone());
        }
        if in_agent {
            continue;
        }
        match load_file_key(path)? {
            Ok(k) => {
                if !agent_pubs
                    .iter()
                    .any(|a| a.key_data() == k.public_key().key_data())
                {
                    wanted.push(k.public_key().clone());
                    files.push(Candidate::File(Arc::new(k)));
                }
            }
            Err(why) => {
                let reason = why.reason(path);
                tracing::warn!(file = %path.display(), "identity file skipped: {reason}");
                skipped.get_or_insert((path.clone(), reason));
            }
        }
    }
    let (first, rest): (Vec<PublicKey>, Vec<PublicKey>) = agent_pubs
        .into_iter()
        .partition(|a| wanted.iter().any(|w| w.key_data() == a.key_data()));
    let mut out: Vec<Candidate> = first.into_iter().map(Candidate::Agent).collect();
    out.extend(rest.into_iter().map(Candidate::Agent));
    out.extend(files);
    if out.is_empty() {
        return Err(match (skipped, &source.agent) {
            (Some((path, reason)), _) => AuthError::IdentityFile { path, reason },
            (None, None) => AuthError::NoAgent,
            (None, Some(p)) => AuthError::EmptyAgent(p.clone()),
        });
    }
    Ok((agent, out))
}

/// Authenticates `user` on `handle`; `target` names the server in errors.
pub(crate) async fn authenticate<H: Handler>(
    handle: &mut Handle<H>,
    user: &str,
    source: &KeySource,
    target: &str,
) -> Result<(), AuthError> {
    let (mut agent, keys) = candidates(source).await?;
    let transport = |reason: String| AuthError::Transport {
        target: target.to_string(),
        reason,
    };
    let mut rsa_hash: Option<Option<HashAlg>> = None;
    let mut tried = Vec::new();
    for cand in keys {
        let public = cand.public();
        let hash = if matches!(public.algorithm(), Algorithm::Rsa { .. }) {
            if rsa_hash.is_none() {
                let best = handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(|e| transport(e.to_string()))?;
                // No server-sig-algs: assume a modern server (rsa-sha2-256 is RFC 8332's).
                rsa_hash = Some(best.unwrap_or(Some(HashAlg::Sha256)));
            }
            rsa_hash.flatten()
        } else {
            None
        };
        tried.push(fingerprint_sha256(&public));
        let result = match (&cand, agent.as_mut()) {
            (Candidate::Agent(k), Some(agent)) => handle
                .authenticate_publickey_with(user, k.clone(), hash, agent)
                .await
                .map_err(|e| transport(format!("ssh-agent could not sign: {e}")))?,
            (Candidate::File(k), _) => handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(k.clone(), hash))
                .await
                .map_err(|e| transport(e.to_string()))?,
            (Candidate::Agent(_), None) => continue,
        };
        match result {
            AuthResult::Success => return Ok(()),
            AuthResult::Failure {
                remaining_methods, ..
            } => {
                if !remaining_methods.contains(&russh::MethodKind::PublicKey)
                    && !remaining_methods.is_empty()
                {
                    break;
                }
            }
        }
    }
    Err(AuthError::Refused {
        target: target.to_string(),
        user: user.to_string(),
        tried: tried.join(", "),
    })
}

/// Keys whose private halves are published, so anyone holding them proves nothing: Vagrant's
/// insecure keys (RSA, and ed25519 since Vagrant 2.3), which `vagrant ssh-config` names as
/// the IdentityFile of boxes that still use them.
const PUBLIC_KNOWLEDGE_KEYS: [&str; 2] = [
    "ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ==",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN1YdxBpNlzxDqfJyw/QKow1F+wvG9hXGoqiysfJOn5Y",
];

/// Whether `key` is one whose private half is public knowledge.
pub(crate) fn is_public_knowledge(key: &russh::keys::PublicKey) -> bool {
    PUBLIC_KNOWLEDGE_KEYS
        .iter()
        .filter_map(|l| russh::keys::PublicKey::from_openssh(l).ok())
        .any(|k| k.key_data() == key.key_data())
}

#[cfg(test)]
mod public_knowledge_tests {
    use super::*;

    #[test]
    fn vagrants_insecure_keys_are_public_knowledge_and_others_are_not() {
        for line in PUBLIC_KNOWLEDGE_KEYS {
            let k = russh::keys::PublicKey::from_openssh(line).expect("a valid key");
            assert!(is_public_knowledge(&k));
        }
        let other = russh::keys::PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ",
        )
        .expect("key");
        assert!(!is_public_knowledge(&other));
    }
}
