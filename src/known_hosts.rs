//! Host key pinning that decides exactly as OpenSSH's `ssh` does (hostfile.c, sshconnect.c):
//! a host is looked up by the one name the config gives it (`host`, or `[host]:port` when the
//! port is not 22), never by the address it resolved to. Comma lists, `*`/`?` wildcards, `!`
//! negation, hashed `|1|` names, `@revoked` (always refuses) and `@cert-authority` (host
//! certificates whose principals name the host) follow OpenSSH's rules; a line OpenSSH would
//! skip (unknown key type, bad marker, bad hash) is skipped here too, with a warning naming
//! file and line. This module knows files and keys, nothing of connections or fleet.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use hmac::{Hmac, Mac};
use russh::keys::{Algorithm, HashAlg, PublicKey};

/// A known_hosts file that cannot be read or written (lines ssh skips are not errors).
#[derive(Debug, thiserror::Error)]
pub enum KnownHostsError {
    /// Reading a pin file.
    #[error("{file}: cannot read known_hosts: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// Appending a pin.
    #[error("{file}: cannot pin host key: {source}")]
    Write {
        /// The file.
        file: PathBuf,
        /// The write error.
        source: std::io::Error,
    },
}

/// A host as known_hosts files name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostId {
    /// What entries are matched against: `host`, or `[host]:port` when the port is not 22;
    /// lower-case, as `ssh` looks it up.
    pub lookup: String,
    /// The bare host name a host certificate must list as a principal.
    pub principal: String,
}

impl HostId {
    pub(crate) fn new(host: &str, port: u16) -> HostId {
        let host = host.to_ascii_lowercase();
        let lookup = if port == 22 {
            host.clone()
        } else {
            format!("[{host}]:{port}")
        };
        HostId {
            lookup,
            principal: host,
        }
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.lookup)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Debug, Clone)]
enum HostMatcher {
    /// A comma list of patterns, as written.
    Patterns(String),
    /// `|1|salt|hash`: matches when HMAC-SHA1(salt, name) encodes to exactly this field.
    Hashed { salt: Vec<u8>, field: String },
}

type HmacSha1 = Hmac<sha1::Sha1>;

fn hashed_field(salt: &[u8], name: &str) -> Option<String> {
    let mut mac = HmacSha1::new_from_slice(salt).ok()?;
    mac.update(name.as_bytes());
    let b64 = base64::engine::general_purpose::STANDARD;
    Some(format!(
        "|1|{}|{}",
        b64.encode(salt),
        b64.encode(mac.finalize().into_bytes())
    ))
}

/// `name` hashed as `ssh-keygen -H` and `HashKnownHosts yes` write it, with a fresh salt.
pub fn hash_name(name: &str) -> String {
    use rand::RngCore;
    let mut salt = [0u8; 20];
    rand::thread_rng().fill_bytes(&mut salt);
    hashed_field(&salt, &name.to_ascii_lowercase()).unwrap_or_default()
}

impl HostMatcher {
    fn matches(&self, name: &str) -> bool {
        match self {
            HostMatcher::Patterns(list) => match_pattern_list(name, list) == Some(true),
            HostMatcher::Hashed { salt, field } => {
                hashed_field(salt, name).is_some_and(|f| &f == field)
            }
        }
    }
}

/// OpenSSH's `match_pattern_list` with lower-casing: `Some(true)` for a positive match,
/// `Some(false)` when a negated pattern matches (the whole list then fails), `None` when
/// nothing matches. A subpattern of 1023 bytes or more makes the list fail, as there.
pub(crate) fn match_pattern_list(name: &str, list: &str) -> Option<bool> {
    let name = name.to_ascii_lowercase();
    let mut positive = false;
    for sub in list.split(',') {
        let (negated, pat) = match sub.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, sub),
        };
        if pat.len() >= 1023 {
            return None;
        }
        if crate::pattern::wildcard_match(&pat.to_ascii_lowercase(), &name) {
            if negated {
                return Some(false);
            }
            positive = true;
        }
    }
    positive.then_some(true)
}

/// One usable line of a known_hosts file.
#[derive(Debug, Clone)]
struct Entry {
    file: PathBuf,
    line: usize,
    marker: Marker,
    hosts: HostMatcher,
    key: PublicKey,
}

/// A line OpenSSH would skip, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skipped {
    pub file: PathBuf,
    pub line: usize,
    pub reason: LineProblem,
}

/// Why OpenSSH skips a known_hosts line (and so do we).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LineProblem {
    #[error("more than one marker")]
    TwoMarkers,
    #[error("marker without host patterns")]
    MarkerAlone,
    #[error("unknown marker {0:?}")]
    UnknownMarker(String),
    /// A field the line ends before.
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("invalid {algo} key: {reason}")]
    InvalidKey { algo: String, reason: String },
    #[error("unknown key type {0:?}")]
    UnknownKeyType(String),
    #[error("unsupported hashed host format (only |1| exists)")]
    HashFormat,
    #[error("hashed host lacks '|' separator")]
    HashSeparator,
    #[error("bad hashed host salt: {0}")]
    HashSalt(String),
    #[error("bad hashed host salt: {0} bytes, not 20")]
    HashSaltLength(usize),
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}; line ignored",
            self.file.display(),
            self.line,
            self.reason
        )
    }
}

/// Where a key is pinned, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pin {
    pub file: PathBuf,
    pub line: usize,
    pub algorithm: String,
    pub fingerprint: String,
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({}:{})",
            self.algorithm,
            self.fingerprint,
            self.file.display(),
            self.line
        )
    }
}

/// The outcome of checking a presented key against the pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Pinned (or signed by a trusted CA) at this place.
    Trusted(Pin),
    /// Listed as `@revoked`: never accepted.
    Revoked(Pin),
    /// The host has pins, and this key is not one of them.
    Changed(Vec<Pin>),
    /// Nothing is known of the host.
    Unknown,
}

/// All entries of a set of known_hosts files.
#[derive(Debug, Clone, Default)]
pub(crate) struct KnownHosts {
    entries: Vec<Entry>,
    skipped: Vec<Skipped>,
}

/// `SHA256:…` as OpenSSH prints it.
pub(crate) fn fingerprint_sha256(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// `MD5:aa:bb:…`, the form fleetctl showed.
pub(crate) fn fingerprint_md5(key: &PublicKey) -> String {
    use md5::Digest;
    let bytes = key.to_bytes().unwrap_or_default();
    let digest = md5::Md5::digest(&bytes);
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("MD5:{}", hex.join(":"))
}

fn pin_of(e: &Entry) -> Pin {
    Pin {
        file: e.file.clone(),
        line: e.line,
        algorithm: e.key.algorithm().to_string(),
        fingerprint: fingerprint_sha256(&e.key),
    }
}

fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

/// Each skipped line is warned about once per process, not on every reconnect.
fn warn_once(s: &Skipped) {
    static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let text = s.to_string();
    let fresh = WARNED
        .lock()
        .map(|mut w| w.get_or_insert_with(HashSet::new).insert(text.clone()))
        .unwrap_or(true);
    if fresh {
        tracing::warn!("{text}");
    }
}

impl KnownHosts {
    /// Reads every file; a missing file counts as empty. Lines OpenSSH would skip are
    /// skipped with a warning; only an unreadable file is an error.
    pub(crate) fn load(files: &[PathBuf]) -> Result<KnownHosts, KnownHostsError> {
        let mut kh = KnownHosts::default();
        for file in files {
            let bytes = match std::fs::read(file) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(KnownHostsError::Read {
                        file: file.clone(),
                        source,
                    })
                }
            };
            kh.add_text(file, &String::from_utf8_lossy(&bytes));
        }
        for s in &kh.skipped {
            warn_once(s);
        }
        Ok(kh)
    }

    /// Parses known_hosts text as if read from `file`.
    pub(crate) fn add_text(&mut self, file: &Path, text: &str) {
        for (i, raw) in text.split('\n').enumerate() {
            match parse_line(raw) {
                Ok(None) => {}
                Ok(Some((marker, hosts, key))) => self.entries.push(Entry {
                    file: file.to_path_buf(),
                    line: i + 1,
                    marker,
                    hosts,
                    key,
                }),
                Err(reason) => self.skipped.push(Skipped {
                    file: file.to_path_buf(),
                    line: i + 1,
                    reason,
                }),
            }
        }
    }

    /// Lines that were skipped, in file order.
    #[cfg(test)]
    pub(crate) fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    fn for_host<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        let host = host.to_ascii_lowercase();
        self.entries.iter().filter(move |e| e.hosts.matches(&host))
    }

    /// A plain key judged against the entries for one name (hostfile.c
    /// `check_key_in_hostkeys`): a revoked key is refused whatever else is pinned; a pinned
    /// key is trusted; any other pin for the name, of whichever type, makes it changed.
    fn plain_at(&self, lookup: &str, key: &PublicKey) -> Verdict {
        let matching: Vec<&Entry> = self.for_host(lookup).collect();
        if let Some(e) = matching
            .iter()
            .find(|e| e.marker == Marker::Revoked && same_key(&e.key, key))
        {
            return Verdict::Revoked(pin_of(e));
        }
        if let Some(e) = matching
            .iter()
            .find(|e| e.marker == Marker::None && same_key(&e.key, key))
        {
            return Verdict::Trusted(pin_of(e));
        }
        let pins: Vec<Pin> = matching
            .iter()
            .filter(|e| e.marker == Marker::None)
            .map(|e| pin_of(e))
            .collect();
        if pins.is_empty() {
            Verdict::Unknown
        } else {
            Verdict::Changed(pins)
        }
    }

    /// A certificate judged against the `@cert-authority` entries for one name.
    fn cert_at(&self, lookup: &str, principal: &str, cert: &russh::keys::Certificate) -> CertAt {
        let ca = PublicKey::from(cert.signature_key().clone());
        let host_key = PublicKey::from(cert.public_key().clone());
        let matching: Vec<&Entry> = self.for_host(lookup).collect();
        if let Some(e) = matching.iter().find(|e| {
            e.marker == Marker::Revoked && (same_key(&e.key, &ca) || same_key(&e.key, &host_key))
        }) {
            return CertAt::Revoked(pin_of(e));
        }
        match matching
            .iter()
            .find(|e| e.marker == Marker::CertAuthority && same_key(&e.key, &ca))
        {
            Some(e) if certificate_valid_for(cert, &ca, principal) => CertAt::Trusted(pin_of(e)),
            Some(_) => CertAt::Invalid,
            None => CertAt::NoAuthority,
        }
    }

    /// Checks a plain host key presented by `host`, as `ssh` does: by the host's name (with
    /// its port), and — only when nothing at all is pinned under that name and the port is
    /// not 22 — by the bare name, where only a match counts (sshconnect.c "checking without
    /// port identifier").
    pub(crate) fn check(&self, host: &HostId, key: &PublicKey) -> Verdict {
        let verdict = self.plain_at(&host.lookup, key);
        if verdict == Verdict::Unknown && host.lookup != host.principal {
            if let trusted @ Verdict::Trusted(_) = self.plain_at(&host.principal, key) {
                return trusted;
            }
        }
        verdict
    }

    /// Checks a host certificate as `ssh` does: refused when the certificate's key or its CA
    /// is `@revoked` for the host; trusted when an `@cert-authority` entry for the host holds
    /// the signing key and the certificate is a valid host certificate for the host's bare
    /// name (signature, validity window, principals empty or listing the name, no critical
    /// options). With no authority for `[name]:port`, the bare name is tried the same way,
    /// down to its plain pins. Otherwise the certificate's plain key is judged by
    /// [`KnownHosts::check`].
    pub(crate) fn check_certificate(
        &self,
        host: &HostId,
        cert: &russh::keys::Certificate,
    ) -> Verdict {
        let host_key = PublicKey::from(cert.public_key().clone());
        match self.cert_at(&host.lookup, &host.principal, cert) {
            CertAt::Revoked(pin) => return Verdict::Revoked(pin),
            CertAt::Trusted(pin) => return Verdict::Trusted(pin),
            CertAt::Invalid => {}
            CertAt::NoAuthority if host.lookup != host.principal => {
                match self.cert_at(&host.principal, &host.principal, cert) {
                    CertAt::Trusted(pin) => return Verdict::Trusted(pin),
                    CertAt::Revoked(_) => {}
                    CertAt::Invalid | CertAt::NoAuthority => {
                        if let trusted @ Verdict::Trusted(_) =
                            self.plain_at(&host.principal, &host_key)
                        {
                            return trusted;
                        }
                    }
                }
            }
            CertAt::NoAuthority => {}
        }
        self.check(host, &host_key)
    }

    /// Host key algorithms in the order `ssh` asks for them (sshconnect2.c
    /// `order_hostkeyalgs`): the default order, with the types pinned for the host's name
    /// moved to the front (`@revoked` and `@cert-authority` entries do not count).
    pub(crate) fn pinned_algorithms(&self, host: &HostId) -> Vec<Algorithm> {
        let pinned: Vec<Algorithm> = self
            .for_host(&host.lookup)
            .filter(|e| e.marker == Marker::None)
            .map(|e| e.key.algorithm())
            .collect();
        let same_type = |a: &Algorithm, b: &Algorithm| match (a, b) {
            (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
            _ => a == b,
        };
        russh::Preferred::DEFAULT
            .key
            .iter()
            .filter(|a| pinned.iter().any(|p| same_type(p, a)))
            .cloned()
            .collect()
    }

    /// OpenSSH's CheckHostIP: pins under the connected address (`ip_name`, e.g.
    /// `[10.0.0.1]:2222`) that contradict the key the host presented. Only ever a warning: the
    /// address is never a reason to trust a host.
    pub(crate) fn address_contradicts(&self, ip_name: &str, key: &PublicKey) -> Vec<Pin> {
        match self.plain_at(ip_name, key) {
            Verdict::Changed(pins) => pins,
            Verdict::Revoked(pin) => vec![pin],
            _ => Vec::new(),
        }
    }
}

/// How a certificate fares against the `@cert-authority` entries for one name.
enum CertAt {
    Revoked(Pin),
    Trusted(Pin),
    /// An entry holds its CA, but the certificate is not valid for the host now.
    Invalid,
    NoAuthority,
}

fn certificate_valid_for(cert: &russh::keys::Certificate, ca: &PublicKey, principal: &str) -> bool {
    if !cert.cert_type().is_host() || !cert.critical_options().is_empty() {
        return false;
    }
    let principals = cert.valid_principals();
    if !principals.is_empty() && !principals.iter().any(|p| p == principal) {
        return false;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    cert.validate_at(now, &[ca.fingerprint(HashAlg::Sha256)])
        .is_ok()
}

/// The fields of a line after any marker: OpenSSH separates them by spaces and tabs only.
fn fields(s: &str) -> impl Iterator<Item = &str> {
    s.split([' ', '\t']).filter(|f| !f.is_empty())
}

/// One line: `Ok(None)` for blanks and comments, `Err` for a line OpenSSH skips.
fn parse_line(raw: &str) -> Result<Option<(Marker, HostMatcher, PublicKey)>, LineProblem> {
    let mut rest = raw.trim_start_matches([' ', '\t']);
    if rest.is_empty() || rest.starts_with('#') || rest == "\r" {
        return Ok(None);
    }
    let mut marker = Marker::None;
    while rest.starts_with('@') {
        if marker != Marker::None {
            return Err(LineProblem::TwoMarkers);
        }
        // As hostfile.c `check_markers`: the marker ends at the line's first space, or at
        // its first tab only when it has no space; so `@revoked<TAB>host key` is no marker
        // (and the line no entry) for ssh, and not for us.
        let end = rest
            .find(' ')
            .or_else(|| rest.find('\t'))
            .ok_or(LineProblem::MarkerAlone)?;
        marker = match &rest[..end] {
            "@revoked" => Marker::Revoked,
            "@cert-authority" => Marker::CertAuthority,
            m => return Err(LineProblem::UnknownMarker(m.to_string())),
        };
        rest = rest[end..].trim_start_matches([' ', '\t']);
    }
    let mut it = fields(rest);
    let hosts = parse_hosts(it.next().ok_or(LineProblem::Missing("host patterns"))?)?;
    let algo = it.next().ok_or(LineProblem::Missing("key type"))?;
    let b64 = it
        .next()
        .map(|b| b.trim_end_matches(|c: char| c.is_ascii_whitespace()))
        .filter(|b| !b.is_empty() && !b.starts_with('#'))
        .ok_or(LineProblem::Missing("base64 key"))?;
    let key =
        PublicKey::from_openssh(&format!("{algo} {b64}")).map_err(|e| LineProblem::InvalidKey {
            algo: algo.to_string(),
            reason: e.to_string(),
        })?;
    if matches!(key.algorithm(), Algorithm::Other(_)) {
        return Err(LineProblem::UnknownKeyType(algo.to_string()));
    }
    Ok(Some((marker, hosts, key)))
}

fn parse_hosts(field: &str) -> Result<HostMatcher, LineProblem> {
    if !field.starts_with('|') {
        return Ok(HostMatcher::Patterns(field.to_string()));
    }
    // hostfile.c extract_salt: `|1|`, a base64 salt of exactly 20 bytes, `|`.
    let rest = field.strip_prefix("|1|").ok_or(LineProblem::HashFormat)?;
    let (salt, _) = rest.split_once('|').ok_or(LineProblem::HashSeparator)?;
    let salt = base64::engine::general_purpose::STANDARD
        .decode(salt)
        .map_err(|e| LineProblem::HashSalt(e.to_string()))?;
    if salt.len() != 20 {
        return Err(LineProblem::HashSaltLength(salt.len()));
    }
    Ok(HostMatcher::Hashed {
        salt,
        field: field.to_string(),
    })
}

/// Appends a pin for `name` (hashed when `hashed`) to `file`, creating the directory (0700)
/// and file (0600).
pub(crate) fn append_pin(
    file: &Path,
    name: &str,
    key: &PublicKey,
    hashed: bool,
) -> Result<(), KnownHostsError> {
    let werr = |source| KnownHostsError::Write {
        file: file.to_path_buf(),
        source,
    };
    if let Some(dir) = file.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(werr)?;
        }
    }
    let openssh = key
        .to_openssh()
        .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
    let body = openssh
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let name = if hashed {
        hash_name(name)
    } else {
        name.to_ascii_lowercase()
    };
    let body = format!("{name} {body}\n");
    let needs_newline = std::fs::read(file)
        .map(|b| !b.is_empty() && !b.ends_with(b"\n"))
        .unwrap_or(false);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
        .map_err(werr)?;
    if needs_newline {
        f.write_all(b"\n").map_err(werr)?;
    }
    f.write_all(body.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)
}

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

#[cfg(test)]
mod tests;
