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

/// Forgets the passphrase of `path`; false when none was stored.
pub fn forget(path: &Path) -> Result<bool, String> {
    match entry(path)?.delete_credential() {
        Ok(()) => Ok(true),
        Err(keyring::Error::NoEntry) => Ok(false),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The stored passphrase of `path`, if any.
pub(crate) fn get(path: &Path) -> Result<Option<Zeroizing<String>>, String> {
    match entry(path)?.get_password() {
        Ok(p) => Ok(Some(Zeroizing::new(p))),
        Err(keyring::Error::NoEntry) => Ok(None),
        Err(e) => Err(format!("the keyring: {e}")),
    }
}
