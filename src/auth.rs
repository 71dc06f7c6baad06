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
use russh::keys::{Algorithm, Certificate, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
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

/// Where keys come from for one connection.
#[derive(Debug, Clone, Default)]
pub struct KeySource {
    /// The agent socket (`SSH_AUTH_SOCK`), if any.
    pub agent: Option<PathBuf>,
    /// Key files offered after the agent's keys (`identity_files`).
    pub identity_files: Vec<PathBuf>,
    /// User certificates offered with their matching key (`certificate_files`).
    pub certificate_files: Vec<PathBuf>,
}

impl KeySource {
    /// The agent from the process environment plus the given files.
    pub(crate) fn from_env(identity_files: &[PathBuf]) -> KeySource {
        KeySource {
            agent: std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            identity_files: identity_files.to_vec(),
            certificate_files: Vec::new(),
        }
    }
}

fn public_of_file(path: &Path) -> Option<PublicKey> {
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    russh::keys::load_public_key(PathBuf::from(pub_path)).ok()
}

/// The public key of an identity file: its `KEY.pub`, else the public half of the key
/// itself when it is not encrypted (blocking).
pub(crate) fn identity_public_key(path: &Path) -> Option<PublicKey> {
    public_of_file(path).or_else(|| {
        russh::keys::load_secret_key(path, None)
            .ok()
            .map(|k| k.public_key().clone())
    })
}

/// Why an identity file is not used, as a user would fix it.
#[derive(Debug)]
enum Unusable {
    /// Readable by others: OpenSSH's `UNPROTECTED PRIVATE KEY FILE`.
    Unprotected(u32),
    /// Encrypted, and no passphrase stored (or the keyring could not be read: why).
    Encrypted(Option<crate::passphrase::PassphraseError>),
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

/// Identity files decoded (and decrypted) once per content: the key stays in memory, its
/// secret zeroized when dropped, until the file changes. A connect then costs no KDF (a key
/// made with `ssh-keygen -a 256` takes seconds to decrypt).
static FILE_KEYS: std::sync::LazyLock<std::sync::Mutex<FileKeys>> =
    std::sync::LazyLock::new(Default::default);

/// Decoded identity files by path, with the SHA-256 of the content they were decoded from.
type FileKeys = std::collections::HashMap<PathBuf, ([u8; 32], Arc<PrivateKey>)>;

/// The key of an identity file, decoded and if need be decrypted with its stored passphrase;
/// from [`FILE_KEYS`] when the file is unchanged. Blocks (file, keyring, KDF): call it off the
/// runtime's thread.
fn load_file_key(path: &Path) -> Result<Result<Arc<PrivateKey>, Unusable>, AuthError> {
    use sha2::Digest;
    if let Some(u) = check_permissions(path)? {
        return Ok(Err(u));
    }
    let unreadable = |reason: String| AuthError::IdentityFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?,
    );
    let digest: [u8; 32] = sha2::Sha256::digest(text.as_bytes()).into();
    let cache = || FILE_KEYS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((d, k)) = cache().get(path) {
        if *d == digest {
            return Ok(Ok(k.clone()));
        }
    }
    let key = match russh::keys::decode_secret_key(&text, None) {
        Ok(k) => k,
        Err(russh::keys::Error::KeyIsEncrypted) => match decrypt(path, &text) {
            Ok(k) => k,
            Err(u) => return Ok(Err(u)),
        },
        Err(e) => return Err(unreadable(e.to_string())),
    };
    let key = Arc::new(key);
    cache().insert(path.to_path_buf(), (digest, key.clone()));
    Ok(Ok(key))
}

/// An encrypted identity file (`text`) decrypted in memory with its stored passphrase.
fn decrypt(path: &Path, text: &str) -> Result<PrivateKey, Unusable> {
    match crate::passphrase::get(path) {
        Ok(Some(p)) => {
            russh::keys::decode_secret_key(text, Some(&p)).map_err(|_| Unusable::WrongPassphrase)
        }
        Ok(None) => Err(Unusable::Encrypted(None)),
        Err(e) => Err(Unusable::Encrypted(Some(e))),
    }
}

/// What an agent holds: plain keys, and user certificates (each signed for with its key).
struct AgentHolds {
    keys: Vec<PublicKey>,
    certificates: Vec<Certificate>,
}

async fn agent_keys(path: &Path) -> Result<(AgentClient<UnixStream>, AgentHolds), AuthError> {
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
    let mut holds = AgentHolds {
        keys: Vec::new(),
        certificates: Vec::new(),
    };
    for id in ids {
        match id {
            AgentIdentity::PublicKey { key, .. } => holds.keys.push(key),
            AgentIdentity::Certificate { certificate, .. } => {
                if usable_certificate(&certificate, "the ssh-agent") {
                    holds.certificates.push(certificate);
                }
            }
        }
    }
    Ok((agent, holds))
}

/// A certificate as `doctor` shows it: its key ID, principals and validity, and whether it
/// can be used now.
pub(crate) fn describe_certificate(cert: &Certificate) -> (bool, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let when = |t: u64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.min(253_402_300_799)),
        )
        .to_string()
    };
    let principals = if cert.valid_principals().is_empty() {
        "any principal".to_string()
    } else {
        cert.valid_principals().join(", ")
    };
    let user = cert.cert_type() == russh::keys::ssh_key::certificate::CertType::User;
    let valid = now >= cert.valid_after() && now < cert.valid_before();
    let state = match (user, valid) {
        (false, _) => "not a user certificate",
        (true, false) if now >= cert.valid_before() => "EXPIRED",
        (true, false) => "not yet valid",
        (true, true) => "valid",
    };
    (
        user && valid,
        format!(
            "certificate {:?} of {} for {principals}, valid {} to {} ({state})",
            crate::escape::display(cert.key_id()),
            fingerprint_sha256(&PublicKey::from(cert.public_key().clone())),
            when(cert.valid_after()),
            when(cert.valid_before()),
        ),
    )
}

/// Whether a user certificate is valid now; one that is not is skipped with a warning that
/// names it (as `ssh` skips it).
fn usable_certificate(cert: &Certificate, from: &str) -> bool {
    let (usable, text) = describe_certificate(cert);
    if !usable {
        tracing::warn!(certificate = %text, from, "certificate skipped; get a new one from your CA");
    }
    usable
}

/// The certificate beside an identity file (`KEY-cert.pub`, as `ssh` finds it), if there
/// is a usable one (blocking).
fn certificate_of_file(path: &Path) -> Option<Certificate> {
    let mut cert_path = path.as_os_str().to_owned();
    cert_path.push("-cert.pub");
    let cert_path = PathBuf::from(cert_path);
    if !cert_path.exists() {
        return None;
    }
    load_certificate(&cert_path)
}

/// A configured or found certificate file, if usable (blocking).
fn load_certificate(cert_path: &Path) -> Option<Certificate> {
    match russh::keys::load_openssh_certificate(cert_path) {
        Ok(c) if usable_certificate(&c, &cert_path.display().to_string()) => Some(c),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(file = %cert_path.display(), error = %e, "certificate skipped: cannot read it");
            None
        }
    }
}

/// The usable certificates of `certificate_files`, read off the runtime's thread.
async fn configured_certificates(files: &[PathBuf]) -> Vec<Certificate> {
    if files.is_empty() {
        return Vec::new();
    }
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || files.iter().filter_map(|f| load_certificate(f)).collect())
        .await
        .unwrap_or_default()
}

/// The public halves of the identity files (`KEY.pub`), read off the runtime's thread.
async fn file_publics(files: &[PathBuf]) -> Vec<(PathBuf, Option<PublicKey>)> {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .map(|f| {
                let public = public_of_file(&f);
                (f, public)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Authenticates `user` on `handle`; `target` names the server in errors. Agent keys that
/// match configured files go first, then the agent's other keys, then the files the agent
/// does not hold: a file is read, and decrypted, only when its turn comes, off the runtime's
/// thread, and at most once while it is unchanged.
pub(crate) async fn authenticate<H: Handler>(
    handle: &mut Handle<H>,
    user: &str,
    source: &KeySource,
    target: &str,
) -> Result<(), AuthError> {
    let (mut agent, holds) = match &source.agent {
        Some(p) => {
            let (a, h) = agent_keys(p).await?;
            (Some(a), Some(h))
        }
        None => (None, None),
    };
    let (agent_pubs, agent_certs) =
        holds.map_or_else(|| (Vec::new(), Vec::new()), |h| (h.keys, h.certificates));
    let files = file_publics(&source.identity_files).await;
    let configured = configured_certificates(&source.certificate_files).await;
    // A configured certificate for a key the agent holds is signed for by the agent.
    let agent_certs: Vec<Certificate> = agent_certs
        .into_iter()
        .chain(
            configured
                .iter()
                .filter(|c| agent_pubs.iter().any(|k| k.key_data() == c.public_key()))
                .cloned(),
        )
        .collect();
    let in_agent = |k: &PublicKey| agent_pubs.iter().any(|a| a.key_data() == k.key_data());
    let wanted = |a: &PublicKey| {
        files
            .iter()
            .any(|(_, p)| p.as_ref().is_some_and(|p| p.key_data() == a.key_data()))
    };
    let (first, rest): (Vec<&PublicKey>, Vec<&PublicKey>) =
        agent_pubs.iter().partition(|a| wanted(a));
    let mut signer = Signer {
        handle,
        user,
        target,
        rsa_hash: None,
        tried: Vec::new(),
    };
    // Certificates first, as `ssh` offers what the agent lists: a server that trusts the CA
    // has no authorized_keys line for the plain key.
    for cert in &agent_certs {
        let Some(agent) = agent.as_mut() else { break };
        match signer.try_agent_certificate(cert, agent).await? {
            Tried::Accepted => return Ok(()),
            Tried::NoMorePublicKey => return Err(signer.refused()),
            Tried::Refused => {}
        }
    }
    for key in first.into_iter().chain(rest) {
        let Some(agent) = agent.as_mut() else { break };
        match signer.try_agent(key, agent).await? {
            Tried::Accepted => return Ok(()),
            Tried::NoMorePublicKey => return Err(signer.refused()),
            Tried::Refused => {}
        }
    }
    let mut skipped: Option<(PathBuf, String)> = None;
    for (path, public) in files {
        if public.as_ref().is_some_and(in_agent) {
            continue;
        }
        let loading = path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            load_file_key(&loading).map(|k| k.map(|k| (k, certificate_of_file(&loading))))
        })
        .await
        .map_err(|e| AuthError::IdentityFile {
            path: path.clone(),
            reason: format!("loading it failed: {e}"),
        })??;
        let (key, certificate) = match loaded {
            Ok((k, beside)) => {
                let cert = beside.or_else(|| {
                    configured
                        .iter()
                        .find(|c| c.public_key() == k.public_key().key_data())
                        .cloned()
                });
                (k, cert)
            }
            Err(why) => {
                let reason = why.reason(&path);
                tracing::warn!(file = %path.display(), "identity file skipped: {reason}");
                skipped.get_or_insert((path, reason));
                continue;
            }
        };
        if let Some(cert) = certificate {
            match signer.try_file_certificate(key.clone(), cert).await? {
                Tried::Accepted => return Ok(()),
                Tried::NoMorePublicKey => break,
                Tried::Refused => {}
            }
        }
        if in_agent(key.public_key()) {
            continue;
        }
        match signer.try_file(key).await? {
            Tried::Accepted => return Ok(()),
            Tried::NoMorePublicKey => break,
            Tried::Refused => {}
        }
    }
    if signer.tried.is_empty() {
        return Err(match (skipped, &source.agent) {
            (Some((path, reason)), _) => AuthError::IdentityFile { path, reason },
            (None, None) => AuthError::NoAgent,
            (None, Some(p)) => AuthError::EmptyAgent(p.clone()),
        });
    }
    Err(signer.refused())
}

/// What one offered key came to.
enum Tried {
    Accepted,
    Refused,
    /// The server takes no more public keys.
    NoMorePublicKey,
}

/// Offers keys on one connection, remembering what was tried.
struct Signer<'a, H: Handler> {
    handle: &'a mut Handle<H>,
    user: &'a str,
    target: &'a str,
    /// The RSA signature hash the server takes, asked once.
    rsa_hash: Option<Option<HashAlg>>,
    /// Fingerprints of the keys offered.
    tried: Vec<String>,
}

impl<H: Handler> Signer<'_, H> {
    fn transport(&self, reason: String) -> AuthError {
        AuthError::Transport {
            target: self.target.to_string(),
            reason,
        }
    }

    fn refused(&self) -> AuthError {
        AuthError::Refused {
            target: self.target.to_string(),
            user: self.user.to_string(),
            tried: self.tried.join(", "),
        }
    }

    async fn hash_for(&mut self, public: &PublicKey) -> Result<Option<HashAlg>, AuthError> {
        if !matches!(public.algorithm(), Algorithm::Rsa { .. }) {
            return Ok(None);
        }
        if self.rsa_hash.is_none() {
            let best = self
                .handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| self.transport(e.to_string()))?;
            // No server-sig-algs: assume a modern server (rsa-sha2-256 is RFC 8332's).
            self.rsa_hash = Some(best.unwrap_or(Some(HashAlg::Sha256)));
        }
        Ok(self.rsa_hash.flatten())
    }

    async fn try_agent(
        &mut self,
        key: &PublicKey,
        agent: &mut AgentClient<UnixStream>,
    ) -> Result<Tried, AuthError> {
        let hash = self.hash_for(key).await?;
        self.tried.push(fingerprint_sha256(key));
        let result = self
            .handle
            .authenticate_publickey_with(self.user, key.clone(), hash, agent)
            .await
            .map_err(|e| self.transport(format!("ssh-agent could not sign: {e}")))?;
        Ok(outcome(result))
    }

    async fn try_agent_certificate(
        &mut self,
        cert: &Certificate,
        agent: &mut AgentClient<UnixStream>,
    ) -> Result<Tried, AuthError> {
        let public = PublicKey::from(cert.public_key().clone());
        let hash = self.hash_for(&public).await?;
        self.tried.push(format!(
            "{} (certificate {:?})",
            fingerprint_sha256(&public),
            crate::escape::display(cert.key_id())
        ));
        let result = self
            .handle
            .authenticate_certificate_with(self.user, cert.clone(), hash, agent)
            .await
            .map_err(|e| self.transport(format!("ssh-agent could not sign: {e}")))?;
        Ok(outcome(result))
    }

    async fn try_file_certificate(
        &mut self,
        key: Arc<PrivateKey>,
        cert: Certificate,
    ) -> Result<Tried, AuthError> {
        self.tried.push(format!(
            "{} (certificate {:?})",
            fingerprint_sha256(key.public_key()),
            crate::escape::display(cert.key_id())
        ));
        let result = self
            .handle
            .authenticate_openssh_cert(self.user, key, cert)
            .await
            .map_err(|e| self.transport(e.to_string()))?;
        Ok(outcome(result))
    }

    async fn try_file(&mut self, key: Arc<PrivateKey>) -> Result<Tried, AuthError> {
        let hash = self.hash_for(key.public_key()).await?;
        self.tried.push(fingerprint_sha256(key.public_key()));
        let result = self
            .handle
            .authenticate_publickey(self.user, PrivateKeyWithHashAlg::new(key, hash))
            .await
            .map_err(|e| self.transport(e.to_string()))?;
        Ok(outcome(result))
    }
}

fn outcome(result: AuthResult) -> Tried {
    match result {
        AuthResult::Success => Tried::Accepted,
        AuthResult::Failure {
            remaining_methods, ..
        } if !remaining_methods.contains(&russh::MethodKind::PublicKey)
            && !remaining_methods.is_empty() =>
        {
            Tried::NoMorePublicKey
        }
        AuthResult::Failure { .. } => Tried::Refused,
    }
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
    static KEYS: std::sync::LazyLock<Vec<russh::keys::PublicKey>> =
        std::sync::LazyLock::new(|| {
            PUBLIC_KNOWLEDGE_KEYS
                .iter()
                .filter_map(|l| russh::keys::PublicKey::from_openssh(l).ok())
                .collect()
        });
    KEYS.iter().any(|k| k.key_data() == key.key_data())
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
