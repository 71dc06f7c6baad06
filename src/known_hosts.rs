//! Host key pinning with OpenSSH known_hosts semantics: plain names, `[host]:port`, comma
//! lists, `*`/`?` wildcards, `!` negation, hashed `|1|` names, `@revoked` (always refuses)
//! and `@cert-authority`. A host is looked up under every name it is known by (the
//! configured name and the address connected to), because fleetctl wrote IP-keyed entries.
//! This module knows files and keys, nothing of connections or fleet.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use hmac::{Hmac, Mac};
use russh::keys::{Algorithm, HashAlg, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum KnownHostsError {
    #[error("{file}:{line}: {message}")]
    Malformed {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{file}: cannot read known_hosts: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: cannot pin host key: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Debug, Clone)]
enum HostMatcher {
    /// `(negated, pattern)` pairs from a comma list.
    Patterns(Vec<(bool, String)>),
    /// `|1|salt|hash`: HMAC-SHA1 of the name keyed by the salt.
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

impl HostMatcher {
    fn matches(&self, name: &str) -> bool {
        match self {
            HostMatcher::Patterns(pats) => {
                let name = name.to_ascii_lowercase();
                let mut hit = false;
                for (neg, pat) in pats {
                    if wildcard_match(&pat.to_ascii_lowercase(), &name) {
                        if *neg {
                            return false;
                        }
                        hit = true;
                    }
                }
                hit
            }
            HostMatcher::Hashed { salt, hash } => {
                let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                    return false;
                };
                mac.update(name.as_bytes());
                mac.verify_slice(hash).is_ok()
            }
        }
    }
}

/// `*` matches any run, `?` one character (OpenSSH `match_pattern`).
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            pi += 1;
            mark = ti;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// One line of a known_hosts file.
#[derive(Debug, Clone)]
struct Entry {
    file: PathBuf,
    line: usize,
    marker: Marker,
    hosts: HostMatcher,
    key: PublicKey,
}

/// Where a key is pinned, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
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
pub enum Verdict {
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
pub struct KnownHosts {
    entries: Vec<Entry>,
}

/// `SHA256:…` as OpenSSH prints it.
pub fn fingerprint_sha256(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// `MD5:aa:bb:…`, the form fleetctl showed.
pub fn fingerprint_md5(key: &PublicKey) -> String {
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

impl KnownHosts {
    /// Reads every file; a missing file counts as empty, a malformed line is an error.
    pub fn load(files: &[PathBuf]) -> Result<KnownHosts, KnownHostsError> {
        let mut kh = KnownHosts::default();
        for file in files {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(KnownHostsError::Read {
                        file: file.clone(),
                        source,
                    })
                }
            };
            kh.add_text(file, &text)?;
        }
        Ok(kh)
    }

    /// Parses known_hosts text as if read from `file`.
    pub fn add_text(&mut self, file: &Path, text: &str) -> Result<(), KnownHostsError> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let entry = parse_line(line).map_err(|message| KnownHostsError::Malformed {
                file: file.to_path_buf(),
                line: i + 1,
                message,
            })?;
            let (marker, hosts, key) = entry;
            self.entries.push(Entry {
                file: file.to_path_buf(),
                line: i + 1,
                marker,
                hosts,
                key,
            });
        }
        Ok(())
    }

    fn for_host<'a>(&'a self, names: &'a [String]) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .iter()
            .filter(move |e| names.iter().any(|n| e.hosts.matches(n)))
    }

    /// Checks a plain host key presented under any of `names`.
    pub fn check(&self, names: &[String], key: &PublicKey) -> Verdict {
        let matching: Vec<&Entry> = self.for_host(names).collect();
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
            .filter(|e| e.marker != Marker::Revoked)
            .map(|e| pin_of(e))
            .collect();
        if pins.is_empty() {
            Verdict::Unknown
        } else {
            Verdict::Changed(pins)
        }
    }

    /// Checks a host certificate: trusted if an `@cert-authority` entry for the host holds
    /// its signing key, the signature verifies and the certificate names the host.
    pub fn check_certificate(&self, names: &[String], cert: &russh::keys::Certificate) -> Verdict {
        let ca = PublicKey::from(cert.signature_key().clone());
        let matching: Vec<&Entry> = self.for_host(names).collect();
        let host_key = PublicKey::from(cert.public_key().clone());
        if let Some(e) = matching.iter().find(|e| {
            e.marker == Marker::Revoked && (same_key(&e.key, &ca) || same_key(&e.key, &host_key))
        }) {
            return Verdict::Revoked(pin_of(e));
        }
        let principal_ok = cert.valid_principals().is_empty()
            || names.iter().any(|n| {
                let bare = n
                    .strip_prefix('[')
                    .and_then(|r| r.split_once(']'))
                    .map_or(n.as_str(), |(h, _)| h);
                cert.valid_principals().iter().any(|p| p == bare)
            });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let fingerprints = [ca.fingerprint(HashAlg::Sha256)];
        let valid = principal_ok && cert.validate_at(now, &fingerprints).is_ok();
        if let Some(e) = matching
            .iter()
            .find(|e| e.marker == Marker::CertAuthority && same_key(&e.key, &ca))
        {
            if valid && cert.cert_type().is_host() {
                return Verdict::Trusted(pin_of(e));
            }
        }
        // A certificate that is not trusted is judged by its bare key.
        self.check(names, &host_key)
    }

    /// Key algorithms pinned for the host, most recently listed last; used to prefer
    /// pinned types in host key negotiation.
    pub fn pinned_algorithms(&self, names: &[String]) -> Vec<Algorithm> {
        let mut algs = Vec::new();
        for e in self.for_host(names) {
            if e.marker == Marker::None {
                let mut alg = e.key.algorithm();
                if matches!(alg, Algorithm::Rsa { .. }) {
                    for h in [Some(HashAlg::Sha512), Some(HashAlg::Sha256)] {
                        let a = Algorithm::Rsa { hash: h };
                        if !algs.contains(&a) {
                            algs.push(a);
                        }
                    }
                    alg = Algorithm::Rsa { hash: None };
                }
                if !algs.contains(&alg) {
                    algs.push(alg);
                }
            }
        }
        algs
    }

    /// Whether an `@cert-authority` entry covers the host.
    pub fn has_cert_authority(&self, names: &[String]) -> bool {
        self.for_host(names)
            .any(|e| e.marker == Marker::CertAuthority)
    }
}

fn parse_line(line: &str) -> Result<(Marker, HostMatcher, PublicKey), String> {
    let mut fields = line.split_whitespace();
    let mut first = fields.next().ok_or("empty line")?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        m if m.starts_with('@') => return Err(format!("unknown marker {m:?}")),
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next().ok_or("missing host patterns after marker")?;
    }
    let hosts = parse_hosts(first)?;
    let algo = fields.next().ok_or("missing key type")?;
    let b64 = fields.next().ok_or("missing base64 key")?;
    let key = PublicKey::from_openssh(&format!("{algo} {b64}"))
        .map_err(|e| format!("invalid {algo} key: {e}"))?;
    Ok((marker, hosts, key))
}

fn parse_hosts(field: &str) -> Result<HostMatcher, String> {
    if let Some(rest) = field.strip_prefix("|1|") {
        let (salt, hash) = rest
            .split_once('|')
            .ok_or("hashed host lacks '|' separator")?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = b64
            .decode(salt)
            .map_err(|e| format!("bad hashed host salt: {e}"))?;
        let hash = b64
            .decode(hash)
            .map_err(|e| format!("bad hashed host hash: {e}"))?;
        return Ok(HostMatcher::Hashed { salt, hash });
    }
    if field.starts_with('|') {
        return Err("unsupported hashed host format (only |1| exists)".into());
    }
    let pats = field
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.strip_prefix('!') {
            Some(rest) => (true, rest.to_string()),
            None => (false, p.to_string()),
        })
        .collect::<Vec<_>>();
    if pats.is_empty() {
        return Err("no host patterns".into());
    }
    Ok(HostMatcher::Patterns(pats))
}

/// Appends a pin for `name` to `file`, creating the directory (0700) and file (0600).
pub fn append_pin(file: &Path, name: &str, key: &PublicKey) -> Result<(), KnownHostsError> {
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
    let mut body = openssh
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    body = format!("{name} {body}\n");
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
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA07NpDdhNQM35x9Ium8d8qQdYUa1LbUOJhPhOeC5ThL";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAtKLwx5/JtZtoRJIWvjvKNaNWC6KfABW0XfChm3VEFP";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).expect("test key")
    }

    fn kh(text: &str) -> KnownHosts {
        let mut k = KnownHosts::default();
        k.add_text(Path::new("/kh"), text).expect("parses");
        k
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plain_bracketed_and_lists_match() {
        let k = kh(&format!("a.example,[10.0.0.1]:2222 {ED}\n"));
        assert!(matches!(
            k.check(&names(&["a.example"]), &key(ED)),
            Verdict::Trusted(_)
        ));
        assert!(matches!(
            k.check(&names(&["x", "[10.0.0.1]:2222"]), &key(ED)),
            Verdict::Trusted(_)
        ));
        assert_eq!(k.check(&names(&["10.0.0.1"]), &key(ED)), Verdict::Unknown);
    }

    #[test]
    fn wildcards_and_negation() {
        let k = kh(&format!("*.example,!bad.example {ED}\n"));
        assert!(matches!(
            k.check(&names(&["web.example"]), &key(ED)),
            Verdict::Trusted(_)
        ));
        assert_eq!(
            k.check(&names(&["bad.example"]), &key(ED)),
            Verdict::Unknown
        );
        assert!(wildcard_match("h?st", "host"));
        assert!(!wildcard_match("h?st", "hoost"));
    }

    #[test]
    fn changed_key_lists_pins_with_place() {
        let k = kh(&format!("# c\n\nh {ED}\n"));
        match k.check(&names(&["h"]), &key(ED2)) {
            Verdict::Changed(p) => {
                assert_eq!(p.len(), 1);
                assert_eq!(p[0].line, 3);
                assert_eq!(p[0].fingerprint, fingerprint_sha256(&key(ED)));
            }
            v => panic!("expected Changed, got {v:?}"),
        }
    }

    #[test]
    fn revoked_always_wins() {
        let k = kh(&format!("h {ED}\n@revoked * {ED}\n"));
        assert!(matches!(
            k.check(&names(&["h"]), &key(ED)),
            Verdict::Revoked(_)
        ));
    }

    #[test]
    fn hashed_entries_match() {
        // The `|1|salt|hash` form `ssh-keygen -H` writes: HMAC-SHA1 of the name keyed by the salt.
        let salt = [7u8; 20];
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&salt).expect("hmac");
        mac.update(b"[127.0.0.1]:2200");
        let hash = mac.finalize().into_bytes();
        let b64 = base64::engine::general_purpose::STANDARD;
        let line = format!("|1|{}|{} {ED}\n", b64.encode(salt), b64.encode(hash));
        let k = kh(&line);
        assert!(matches!(
            k.check(&names(&["[127.0.0.1]:2200"]), &key(ED)),
            Verdict::Trusted(_)
        ));
        assert_eq!(k.check(&names(&["127.0.0.1"]), &key(ED)), Verdict::Unknown);
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let mut k = KnownHosts::default();
        let e = k.add_text(Path::new("/kh"), "h ssh-ed25519\n").unwrap_err();
        assert_eq!(e.to_string(), "/kh:1: missing base64 key");
        let e = k
            .add_text(Path::new("/kh"), "\nh ssh-ed25519 !!!\n")
            .unwrap_err();
        assert!(
            e.to_string().starts_with("/kh:2: invalid ssh-ed25519 key"),
            "{e}"
        );
    }

    #[test]
    fn pinned_algorithms_prefer_recorded_types() {
        let k = kh(&format!("h {ED}\n"));
        assert_eq!(
            k.pinned_algorithms(&names(&["h"])),
            vec![Algorithm::Ed25519]
        );
        assert!(k.pinned_algorithms(&names(&["other"])).is_empty());
    }

    #[test]
    fn append_pin_creates_private_file_that_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("sub/known_hosts");
        append_pin(&f, "[127.0.0.1]:2200", &key(ED)).expect("pin");
        let k = KnownHosts::load(std::slice::from_ref(&f)).expect("load");
        assert!(matches!(
            k.check(&names(&["[127.0.0.1]:2200"]), &key(ED)),
            Verdict::Trusted(_)
        ));
    }
}
