//! Passphrases of encrypted identity files, kept in the kernel's keyutils store: the user's
//! persistent keyring (`KEYCTL_GET_PERSISTENT`), which every session and service of the uid
//! reaches, so a daemon run by the user's service manager finds what a login shell stored.
//! The entry goes into that keyring directly, not through the session keyring: a session
//! whose keyring is the per-uid default (`_uid_ses.N`, any login without pam_keyinit) may
//! not add keys to it. One entry per file under its canonical path (the description the
//! `keyring` crate used, so entries stored before are found). The daemon reads a passphrase
//! when it needs the key, decrypts in memory and keeps only the key; passphrases are never
//! logged and never in `Debug` output (they live in `Zeroizing` strings).

use std::path::{Path, PathBuf};

use linux_keyutils::{Key, KeyError, KeyRing, KeyRingIdentifier};
use zeroize::Zeroizing;

/// The service part of every entry's description.
const SERVICE: &str = "fleet-broker identity file";

/// Where passphrases are kept, as the CLI says it.
pub const STORE: &str = "the kernel keyutils store (your persistent keyring, shared by your sessions and services; kept for a few days after you log out, cleared at reboot)";

/// The entry's account: the file's canonical path, so `~/.ssh/k` and `/home/u/.ssh/k` agree.
fn account(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The entry's description.
fn description(path: &Path) -> String {
    format!("keyring-rs:{}@{SERVICE}", account(path).display())
}

/// Why a passphrase was not stored, forgotten or read.
#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    /// The file is not an encrypted key.
    #[error("{}: this key is not encrypted; it needs no passphrase", path.display())]
    NotEncrypted {
        /// The identity file.
        path: PathBuf,
    },
    /// The file could not be read as a key.
    #[error("{}: {source}", path.display())]
    Unreadable {
        /// The identity file.
        path: PathBuf,
        /// Why.
        source: russh::keys::Error,
    },
    /// The passphrase given does not decrypt the file.
    #[error("{}: the passphrase does not decrypt this key; nothing stored", path.display())]
    Wrong {
        /// The identity file.
        path: PathBuf,
    },
    /// An empty passphrase.
    #[error("{}: an empty passphrase cannot be stored", path.display())]
    Empty {
        /// The identity file.
        path: PathBuf,
    },
    /// The persistent keyring (nor the session's) cannot be reached.
    #[error("the kernel keyring: cannot reach your persistent keyring: {}", said(*.0))]
    NoKeyring(KeyError),
    /// The kernel refused what was asked of the keyring (`doing`).
    #[error("{}the kernel keyring: {doing}{}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default(), said(*error))]
    Keyring {
        /// The identity file, when the request was about one.
        path: Option<PathBuf>,
        /// What was asked, with its separator (`cannot store the passphrase: `), or nothing.
        doing: &'static str,
        /// What the kernel said.
        error: KeyError,
    },
    /// The stored entry is not UTF-8.
    #[error("the kernel keyring: the stored passphrase is not UTF-8; store it again with `fleet-broker passphrase set`")]
    NotUtf8,
}

/// The user's persistent keyring, attached to this process's keyring (possessed, whatever
/// the session keyring is); on a kernel without persistent keyrings, the session keyring.
fn persistent() -> Result<KeyRing, PassphraseError> {
    KeyRing::get_persistent(KeyRingIdentifier::Process).or_else(|e| {
        // A kernel without persistent keyrings (CONFIG_PERSISTENT_KEYRINGS): the session's.
        KeyRing::from_special_id(KeyRingIdentifier::Session, false)
            .map_err(|_| PassphraseError::NoKeyring(e))
    })
}

/// What the kernel said, in words a user can act on.
fn said(e: KeyError) -> String {
    match e {
        KeyError::AccessDenied => "permission denied (EACCES): an entry is there, but this process may not use it (its permissions were changed, or it belongs to another user's or session's keyring); `fleet-broker passphrase forget` and `set` in your own session replace it".into(),
        KeyError::KeyRevoked | KeyError::KeyExpired => "the stored passphrase was revoked or has expired; store it again with `fleet-broker passphrase set`".into(),
        KeyError::QuotaExceeded => "your keyring quota is full (`/proc/key-users`); forget passphrases you no longer need".into(),
        e => e.to_string(),
    }
}

/// The stored entry of `path`, if there is one.
fn find(path: &Path) -> Result<Option<Key>, PassphraseError> {
    match persistent()?.search(&description(path)) {
        Ok(k) => Ok(Some(k)),
        Err(KeyError::KeyDoesNotExist) => Ok(None),
        Err(error) => Err(PassphraseError::Keyring {
            path: None,
            doing: "",
            error,
        }),
    }
}

/// Stores the passphrase of `path` after checking that it decrypts the file.
pub fn set(path: &Path, passphrase: &Zeroizing<String>) -> Result<(), PassphraseError> {
    let path_buf = || path.to_path_buf();
    match russh::keys::load_secret_key(path, None) {
        Ok(_) => return Err(PassphraseError::NotEncrypted { path: path_buf() }),
        Err(russh::keys::Error::KeyIsEncrypted) => {}
        Err(source) => {
            return Err(PassphraseError::Unreadable {
                path: path_buf(),
                source,
            })
        }
    }
    if russh::keys::load_secret_key(path, Some(passphrase)).is_err() {
        return Err(PassphraseError::Wrong { path: path_buf() });
    }
    if passphrase.is_empty() {
        return Err(PassphraseError::Empty { path: path_buf() });
    }
    persistent()?
        .add_key(&description(path), passphrase.as_bytes())
        .map(drop)
        .map_err(|error| PassphraseError::Keyring {
            path: Some(path_buf()),
            doing: "cannot store the passphrase: ",
            error,
        })
}

/// Forgets the passphrase of `path` (the entry is invalidated, so it leaves every keyring it
/// is linked in); false when none was stored.
pub fn forget(path: &Path) -> Result<bool, PassphraseError> {
    match find(path)? {
        Some(key) => key
            .invalidate()
            .map(|()| true)
            .map_err(|error| PassphraseError::Keyring {
                path: Some(path.to_path_buf()),
                doing: "cannot forget the passphrase: ",
                error,
            }),
        None => Ok(false),
    }
}

/// The stored passphrase of `path`, if any.
pub(crate) fn get(path: &Path) -> Result<Option<Zeroizing<String>>, PassphraseError> {
    let Some(key) = find(path)? else {
        return Ok(None);
    };
    let bytes = Zeroizing::new(
        key.read_to_vec()
            .map_err(|error| PassphraseError::Keyring {
                path: None,
                doing: "",
                error,
            })?,
    );
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Some(Zeroizing::new(s.to_string()))),
        Err(_) => Err(PassphraseError::NotUtf8),
    }
}

/// Reads a secret from the controlling terminal with echo off (restored on every path); the
/// line ending is not part of it.
pub fn read_from_terminal(prompt: &str) -> std::io::Result<Zeroizing<String>> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    use std::io::{BufRead, Write};
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|e| std::io::Error::other(format!("no terminal to ask on ({e}); pass --stdin")))?;
    let saved = tcgetattr(&tty).map_err(std::io::Error::from)?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&tty, SetArg::TCSANOW, &quiet).map_err(std::io::Error::from)?;
    let read = (|| -> std::io::Result<String> {
        tty.write_all(prompt.as_bytes())?;
        tty.flush()?;
        let mut line = String::new();
        std::io::BufReader::new(&tty).read_line(&mut line)?;
        Ok(line)
    })();
    let _ = tcsetattr(&tty, SetArg::TCSANOW, &saved);
    let _ = tty.write_all(b"\n");
    let line = Zeroizing::new(read?);
    Ok(Zeroizing::new(
        line.trim_end_matches(['\n', '\r']).to_string(),
    ))
}
