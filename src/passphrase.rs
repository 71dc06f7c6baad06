//! Passphrases of encrypted identity files, kept in the OS keyring (the `keyring` crate's
//! kernel keyutils store: the user's persistent keyring, so a daemon run by the user's
//! service manager finds what a login shell stored), one entry per file under its canonical
//! path. The daemon reads a
//! passphrase when it needs the key, decrypts in memory and keeps only the key; passphrases
//! are never logged and never in `Debug` output (they live in `Zeroizing` strings).

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The keyring service name of every entry.
const SERVICE: &str = "fleet-broker identity file";

/// Where passphrases are kept, as the CLI says it.
pub const STORE: &str = "the kernel keyutils store (your persistent keyring, shared by your sessions and services; kept for a few days after you log out, cleared at reboot)";

/// The entry's account: the file's canonical path, so `~/.ssh/k` and `/home/u/.ssh/k` agree.
fn account(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn entry(path: &Path) -> Result<keyring::Entry, String> {
    keyring::Entry::new(SERVICE, &account(path).display().to_string())
        .map_err(|e| format!("the keyring: {e}"))
}

/// Stores the passphrase of `path` after checking that it decrypts the file.
pub fn set(path: &Path, passphrase: &Zeroizing<String>) -> Result<(), String> {
    let at = |m: String| format!("{}: {m}", path.display());
    match russh::keys::load_secret_key(path, None) {
        Ok(_) => {
            return Err(at(
                "this key is not encrypted; it needs no passphrase".into()
            ))
        }
        Err(russh::keys::Error::KeyIsEncrypted) => {}
        Err(e) => return Err(at(e.to_string())),
    }
    if russh::keys::load_secret_key(path, Some(passphrase)).is_err() {
        return Err(at(
            "the passphrase does not decrypt this key; nothing stored".into(),
        ));
    }
    entry(path)?
        .set_password(passphrase)
        .map_err(|e| at(format!("cannot store the passphrase: {e}")))
}

/// Forgets the passphrase of `path` (the entry is invalidated, so it leaves every keyring it
/// is linked in); false when none was stored.
pub fn forget(path: &Path) -> Result<bool, String> {
    match entry(path)?.delete_credential() {
        Ok(()) => Ok(true),
        Err(keyring::Error::NoEntry) => match why_no_entry(path) {
            None => Ok(false),
            Some(why) => Err(format!("{}: {why}", path.display())),
        },
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The stored passphrase of `path`, if any.
pub(crate) fn get(path: &Path) -> Result<Option<Zeroizing<String>>, String> {
    match entry(path)?.get_password() {
        Ok(p) => Ok(Some(Zeroizing::new(p))),
        Err(keyring::Error::NoEntry) => match why_no_entry(path) {
            None => Ok(None),
            Some(why) => Err(format!("the keyring: {why}")),
        },
        Err(e) => Err(format!("the keyring: {e}")),
    }
}

/// When the `keyring` crate answers "no entry", what the kernel says: that crate folds
/// "permission denied", "revoked" and "expired" into that answer, which would tell the user
/// that nothing is stored when something is. `None`: there is truly no entry.
fn why_no_entry(path: &Path) -> Option<String> {
    use linux_keyutils::{KeyError, KeyRing, KeyRingIdentifier};
    let description = format!("keyring-rs:{}@{SERVICE}", account(path).display());
    let session = match KeyRing::from_special_id(KeyRingIdentifier::Session, false) {
        Ok(k) => k,
        Err(e) => return Some(format!("the session keyring cannot be used: {e}")),
    };
    let denied = "the kernel keyring denied access (EACCES): an entry is there, but this process may not use it (its permissions were changed, or it belongs to another user's or session's keyring); `keyctl show @s` shows it; `fleet-broker passphrase forget` and `set` in your own session replace it";
    match session.search(&description) {
        Err(KeyError::KeyDoesNotExist) => None,
        Err(KeyError::AccessDenied) => Some(denied.into()),
        Err(KeyError::KeyRevoked) | Err(KeyError::KeyExpired) => Some(
            "the stored passphrase was revoked or has expired; store it again with `fleet-broker passphrase set`".into(),
        ),
        Err(e) => Some(format!("the kernel keyring: {e}")),
        // Found: the crate's failure came after the search (relinking or reading it).
        Ok(key) => match key.read_to_vec() {
            Err(KeyError::AccessDenied) | Ok(_) => Some(denied.into()),
            Err(e) => Some(format!("the kernel keyring: {e}")),
        },
    }
}
