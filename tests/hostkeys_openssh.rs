//! Host key decisions with OpenSSH as the oracle. Each scenario writes one known_hosts file,
//! then OpenSSH's `ssh` (strict, batch, only that file) and the broker's dialer connect to the
//! same real sshd under the same name; both must accept, or both refuse for the same reason
//! (a revoked, changed or unknown key, as ssh's last line names it). Each scenario also
//! states the outcome it was written to show, so a broken set-up (every connection failing
//! for another reason) cannot pass by both sides refusing.

mod support;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleet_broker::auth::KeySource;
use fleet_broker::config::{HostKeyPolicy, HostPort};
use fleet_broker::tunnel::dial::{dial, DialError, DialSpec, WINDOW_SIZE};
use support::*;

/// One row of the table: what it shows, the name connected to (`localhost` or the
/// address), the known_hosts text (placeholders in braces) and the outcome it shows.
struct Case {
    what: &'static str,
    by_address: bool,
    known_hosts: &'static str,
    accept: bool,
}

const fn case(what: &'static str, known_hosts: &'static str, accept: bool) -> Case {
    Case {
        what,
        by_address: false,
        known_hosts,
        accept,
    }
}

const fn by_address(what: &'static str, known_hosts: &'static str, accept: bool) -> Case {
    Case {
        what,
        by_address: true,
        known_hosts,
        accept,
    }
}

fn me() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .expect("current user")
}

fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `|1|salt|hash` of a name, as `ssh-keygen -H` writes it.
fn hashed(name: &str) -> String {
    fleet_broker::known_hosts::hash_name(name)
}

/// A test sshd on 127.0.0.1 and the keys the scenarios refer to.
struct Bench {
    _keys: tempfile::TempDir,
    _sshd: Sshd,
    client_key: PathBuf,
    vars: HashMap<&'static str, String>,
}

impl Bench {
    /// `host_key` (with optional `HostCertificate`) or a generated ed25519 key; `more_keys`
    /// are extra `HostKey` lines (a second key type).
    fn start(keys: tempfile::TempDir, host_key: Option<&Path>, extra: &str) -> Bench {
        let client_key = keygen(keys.path(), "id", "ed25519");
        let user = me();
        let port = free_port();
        let sshd = Sshd::start_with_host_key(
            &[user.as_str()],
            &[client_key.as_path()],
            Some(("127.0.0.1".into(), port)),
            extra,
            host_key,
        );
        let other = keygen(keys.path(), "other_ed25519", "ed25519");
        let other_ecdsa = keygen(keys.path(), "other_ecdsa", "ecdsa");
        let name = format!("[localhost]:{port}");
        let ip = format!("[127.0.0.1]:{port}");
        let mut vars = HashMap::new();
        vars.insert("P", port.to_string());
        vars.insert(
            "P2",
            (if port > 1024 { port - 1 } else { port + 1 }).to_string(),
        );
        vars.insert("A", public_line(&sshd.host_key));
        vars.insert("B", public_line(&other));
        vars.insert("F", public_line(&other_ecdsa));
        vars.insert("HN", hashed(&name));
        vars.insert("HIP", hashed(&ip));
        vars.insert("Hlocalhost", hashed("localhost"));
        vars.insert("N", name);
        vars.insert("IP", ip);
        Bench {
            _keys: keys,
            _sshd: sshd,
            client_key,
            vars,
        }
    }

    fn render(&self, template: &str) -> String {
        let mut out = template.to_string();
        // Longest names first, so `{HN}` is not read as `{H…}` of a shorter one.
        let mut names: Vec<&&str> = self.vars.keys().collect();
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for n in names {
            out = out.replace(&format!("{{{n}}}"), &self.vars[*n]);
        }
        assert!(!out.contains('{'), "unknown placeholder in {template:?}");
        out
    }

    fn host(&self, by_address: bool) -> &'static str {
        if by_address {
            "127.0.0.1"
        } else {
            "localhost"
        }
    }

    /// OpenSSH's decision: `Accepted` when `ssh` got past host key verification (and ran
    /// `true`), else why it refused, read from its warning.
    fn openssh(&self, known_hosts: &[PathBuf], by_address: bool) -> Decision {
        let out = Command::new("ssh")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                known_hosts
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=20"])
            .arg("-i")
            .arg(&self.client_key)
            .args(["-p", &self.vars["P"], "-l", &me()])
            .arg(self.host(by_address))
            .arg("true")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh (install openssh-client)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => Decision::Accepted,
            _ if stderr.contains("Host key verification failed") => {
                // The last "requested strict checking" line is the verdict. Lines before it
                // may come from the check of the bare name that ssh makes on its way (a
                // key @revoked for `localhost` when `[localhost]:PORT` has no pin), which
                // only counts when it finds the key trusted.
                let last = stderr
                    .lines()
                    .rev()
                    .find(|l| l.ends_with("and you have requested strict checking."))
                    .unwrap_or_default();
                if last.contains(" was revoked ") {
                    Decision::Revoked
                } else if last.contains(" has changed ") {
                    Decision::Changed
                } else if last.starts_with("No ") && last.contains(" host key is known for ") {
                    Decision::Unknown
                } else {
                    Decision::Refused
                }
            }
            _ => panic!("ssh failed for another reason: {stderr}"),
        }
    }

    /// The broker's decision, through the dialer the daemon uses.
    fn broker(
        &self,
        rt: &tokio::runtime::Runtime,
        known_hosts: &[PathBuf],
        by_address: bool,
    ) -> Decision {
        let spec = DialSpec {
            label: "cluster \"t\"".into(),
            target: HostPort {
                host: self.host(by_address).into(),
                port: self.vars["P"].parse().expect("port"),
            },
            jump: Vec::new(),
            user: me(),
            keys: KeySource {
                agent: None,
                identity_files: vec![self.client_key.clone()],
                ..Default::default()
            },
            known_hosts: known_hosts.to_vec(),
            policy: HostKeyPolicy::Strict,
            keepalive_interval: None,
            keepalive_max: 3,
            trust_hint: "pin it".into(),
            forward_agent: false,
            window_size: WINDOW_SIZE,
        };
        let result = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(20), dial(&spec)).await })
            .expect("dial timed out");
        match result {
            Ok(_) => Decision::Accepted,
            Err(DialError::HostKey(m)) if m.contains("is marked @revoked") => Decision::Revoked,
            Err(DialError::HostKey(m)) if m.contains("HOST KEY CHANGED") => Decision::Changed,
            Err(DialError::HostKey(m)) if m.contains("is not in known_hosts") => Decision::Unknown,
            Err(DialError::HostKey(_)) => Decision::Refused,
            Err(e) => panic!("the broker failed for another reason: {e}"),
        }
    }

    /// Runs every case; panics with a table of each disagreement.
    fn run(&self, cases: &[Case]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wrong = Vec::new();
        for (i, c) in cases.iter().enumerate() {
            let text = self.render(c.known_hosts);
            // Separate copies: nothing either side might write can reach the other.
            // A line `---` starts another known_hosts file: both sides read the files in
            // order (ssh's `UserKnownHostsFile a b`, the cluster's `known_hosts` list).
            let write = |side: &str| -> Vec<PathBuf> {
                text.split("\n---\n")
                    .enumerate()
                    .map(|(n, part)| {
                        let f = dir.path().join(format!("{i}.{n}.{side}"));
                        std::fs::write(&f, part).expect("known_hosts");
                        f
                    })
                    .collect()
            };
            let (for_ssh, for_broker) = (write("ssh"), write("broker"));
            let ssh = self.openssh(&for_ssh, c.by_address);
            let broker = self.broker(&rt, &for_broker, c.by_address);
            // The same decision, and where OpenSSH names why it refused (a revoked, changed
            // or unknown key), the same reason.
            let same = match ssh {
                Decision::Refused => broker != Decision::Accepted,
                _ => ssh == broker,
            };
            if !same || (ssh == Decision::Accepted) != c.accept {
                wrong.push(format!(
                    "{}: OpenSSH {ssh:?}, broker {broker:?}, written to show {}\n{text}",
                    c.what,
                    verdict(c.accept)
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} scenarios wrong:\n\n{}",
            wrong.len(),
            cases.len(),
            wrong.join("\n")
        );
    }
}

/// What a side decided of a host key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Accepted,
    /// Marked `@revoked`.
    Revoked,
    /// Another key is pinned for the name.
    Changed,
    /// No key is known for the name (strict checking).
    Unknown,
    /// Refused for another reason (a certificate's CA, principals, validity).
    Refused,
}

fn verdict(accept: bool) -> &'static str {
    if accept {
        "accepts"
    } else {
        "refuses"
    }
}

#[test]
fn plain_host_keys_are_judged_as_openssh_judges_them() {
    let keys = open_tempdir("fb-kh.");
    let bench = Bench::start(keys, None, "");
    bench.run(&[
        case("pinned under the name", "{N} {A}", true),
        case("another key under the name", "{N} {B}", false),
        case("empty file", "", false),
        case("pinned under the address only", "{IP} {A}", false),
        case(
            "name pins another key, address pins this one",
            "{N} {B}\n{IP} {A}",
            false,
        ),
        case(
            "name pins this key, address another (CheckHostIP)",
            "{N} {A}\n{IP} {B}",
            true,
        ),
        case("wildcard host, port given", "[*]:{P} {A}", true),
        case(
            "wildcard, name negated last",
            "[*]:{P},![localhost]:{P} {A}",
            false,
        ),
        case(
            "wildcard, name negated first",
            "![localhost]:{P},[*]:{P} {A}",
            false,
        ),
        case(
            "negation in the middle",
            "other.example,![localhost]:{P},[*]:{P} {A}",
            false,
        ),
        case(
            "address negated, name allowed",
            "[*]:{P},![127.0.0.1]:{P} {A}",
            true,
        ),
        case(
            "negated pattern that does not match",
            "[localhost]:{P},!nomatch {A}",
            true,
        ),
        case("? wildcard", "[local?ost]:{P} {A}", true),
        case("* inside the name", "[loc*]:{P} {A}", true),
        case("bare * covers [name]:port", "* {A}", true),
        case("upper-case pattern", "[LOCALHOST]:{P} {A}", true),
        case("another port", "[localhost]:{P2} {A}", false),
        case(
            "bare name, nothing under [name]:port",
            "localhost {A}",
            true,
        ),
        case("bare name pins another key", "localhost {B}", false),
        case(
            "bare name pins this key, [name]:port another",
            "{N} {B}\nlocalhost {A}",
            false,
        ),
        case(
            "bare name pins this key, [name]:port @revokes it",
            "@revoked {N} {A}\nlocalhost {A}",
            false,
        ),
        case(
            "bare name pins this key and @revokes it",
            "localhost {A}\n@revoked localhost {A}",
            false,
        ),
        case("fields separated by a tab", "{N}\t{A}", true),
        case("indented by a tab, @revoked", "\t@revoked {N} {A}", false),
        case("indented by a tab", "\t{N} {A}", true),
        // ssh ends a marker at the line's first space: with a tab after it, the line is no
        // entry at all, so the key is unknown, not revoked.
        case(
            "a tab after @revoked, a space later",
            "{N} {B}\n@revoked\t{N} {A}",
            false,
        ),
        case(
            "a tab after @revoked, nothing else pinned",
            "@revoked\t{N} {A}",
            false,
        ),
        // Several files, read in order as one set.
        case(
            "pinned in the second file",
            "# nothing here\n---\n{N} {A}",
            true,
        ),
        case(
            "another key in the first file, this one in the second",
            "{N} {B}\n---\n{N} {A}",
            true,
        ),
        case(
            "another key in the second file only",
            "\n---\n{N} {B}",
            false,
        ),
        case(
            "pinned in the first file, @revoked in the second",
            "{N} {A}\n---\n@revoked {N} {A}",
            false,
        ),
        case(
            "@revoked in the first file, pinned in the second",
            "@revoked * {A}\n---\n{N} {A}",
            false,
        ),
        // A revocation is for the names on its line only.
        case(
            "the key pinned, and @revoked under another name",
            "{N} {A}\n@revoked otherhost.example {A}",
            true,
        ),
        case("bare name by wildcard", "local* {A}", true),
        case(
            "name second in a list",
            "other.example,[localhost]:{P} {A}",
            true,
        ),
        case("hashed name", "{HN} {A}", true),
        case("hashed address only", "{HIP} {A}", false),
        case("hashed bare name", "{Hlocalhost} {A}", true),
        case("hashed name, another key", "{HN} {B}", false),
        case(
            "malformed hash, then the pin",
            "|1|AAAA|BBBB {A}\n{N} {A}",
            true,
        ),
        case("pinned and @revoked", "{N} {A}\n@revoked * {A}", false),
        case("another key @revoked", "@revoked * {B}\n{N} {A}", true),
        case(
            "@revoked for another host only",
            "{N} {A}\n@revoked other.example {A}",
            true,
        ),
        case("two pins, the second matches", "{N} {B}\n{N} {A}", true),
        case("another type pinned only", "{N} {F}", false),
        case(
            "comments, blanks, trailing comment",
            "# c\n\n   {N} {A} a comment\n",
            true,
        ),
        case("CRLF line ends", "# c\r\n{N} {A}\r\n", true),
        case(
            "unknown key type skipped",
            "{N} ssh-foo AAAAB3NzaC1yc2E\n{N} {A}",
            true,
        ),
        case("truncated line skipped", "{N} ssh-ed25519\n{N} {A}", true),
        case("only an invalid key", "{N} ssh-ed25519 !!!!", false),
        case("unknown marker skips the line", "@bogus {N} {A}", false),
        case(
            "two markers skip the line",
            "@revoked @revoked {N} {B}\n{N} {A}",
            true,
        ),
        case("host key listed as a CA", "@cert-authority {N} {A}", false),
        by_address("by address: pinned under the address", "{IP} {A}", true),
        by_address("by address: pinned under the name only", "{N} {A}", false),
        by_address("by address: hashed address", "{HIP} {A}", true),
    ]);
}

#[test]
fn a_host_offering_two_key_types_is_judged_as_openssh_judges_it() {
    let keys = open_tempdir("fb-kh.");
    let ecdsa = keygen(keys.path(), "host_ecdsa", "ecdsa");
    let extra = format!("HostKey {}\n", ecdsa.display());
    let mut bench = Bench::start(keys, None, &extra);
    bench.vars.insert("E", public_line(&ecdsa));
    bench.run(&[
        case("ecdsa pinned", "{N} {E}", true),
        case("ed25519 pinned", "{N} {A}", true),
        case("another ed25519 pinned", "{N} {B}", false),
        // ssh asks for pinned types in its default order (ed25519 before ecdsa), not in
        // the order of the file, and judges only the key it was given.
        case(
            "another ecdsa listed first, right ed25519 second",
            "{N} {F}\n{N} {A}",
            true,
        ),
        case("right ecdsa, another ed25519", "{N} {E}\n{N} {B}", false),
        case(
            "ecdsa pinned under the bare name only",
            "localhost {E}",
            false,
        ),
        case(
            "ed25519 revoked, ecdsa pinned",
            "@revoked {N} {A}\n{N} {E}",
            true,
        ),
        case("ed25519 revoked, nothing pinned", "@revoked {N} {A}", false),
        case("both pinned", "{N} {A}\n{N} {E}", true),
    ]);
}

/// A host key with a certificate signed by `ca`, `sign_args` passed to `ssh-keygen -s`.
fn certified_bench(sign_args: &[&str]) -> Bench {
    let keys = open_tempdir("fb-kh.");
    let ca = keygen(keys.path(), "ca", "ed25519");
    let ca2 = keygen(keys.path(), "ca2", "ed25519");
    let host = keygen(keys.path(), "host", "ed25519");
    let out = Command::new("ssh-keygen")
        .arg("-q")
        .arg("-s")
        .arg(&ca)
        .args(["-I", "test-host", "-h"])
        .args(sign_args)
        .arg(format!("{}.pub", host.display()))
        .output()
        .expect("ssh-keygen -s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let extra = format!("HostCertificate {}-cert.pub\n", host.display());
    let mut bench = Bench::start(keys, Some(&host), &extra);
    bench.vars.insert("CA", public_line(&ca));
    bench.vars.insert("CA2", public_line(&ca2));
    bench
}

#[test]
fn host_certificates_are_judged_as_openssh_judges_them() {
    let bench = certified_bench(&["-n", "localhost"]);
    bench.run(&[
        case("CA for the name", "@cert-authority {N} {CA}", true),
        // A tab after the marker (and a space later): no entry for ssh, so no CA.
        case(
            "CA for the name, a tab after the marker",
            "@cert-authority\t{N} {CA}",
            false,
        ),
        case("CA for *", "@cert-authority * {CA}", true),
        case("CA for the hashed name", "@cert-authority {HN} {CA}", true),
        case(
            "CA for the address only",
            "@cert-authority {IP} {CA}",
            false,
        ),
        case("another CA", "@cert-authority {N} {CA2}", false),
        case(
            "another CA, host key pinned",
            "@cert-authority {N} {CA2}\n{N} {A}",
            true,
        ),
        case(
            "CA @revoked",
            "@cert-authority {N} {CA}\n@revoked * {CA}",
            false,
        ),
        case(
            "host key @revoked",
            "@cert-authority {N} {CA}\n@revoked * {A}",
            false,
        ),
        case(
            "CA, name negated",
            "@cert-authority [*]:{P},![localhost]:{P} {CA}",
            false,
        ),
        case("CA key without the marker", "{N} {CA}", false),
        case(
            "CA for the bare name",
            "@cert-authority localhost {CA}",
            true,
        ),
        case(
            "no CA; bare name pins the host key, [name]:port another",
            "{N} {B}\nlocalhost {A}",
            true,
        ),
        case(
            "CA for the bare name @revoked there",
            "@cert-authority localhost {CA}\n@revoked localhost {CA}",
            false,
        ),
        by_address(
            "by address: principal is the name only",
            "@cert-authority * {CA}",
            false,
        ),
    ]);
}

#[test]
fn certificate_principals_and_validity_are_checked_as_openssh_checks_them() {
    let only_ip = certified_bench(&["-n", "127.0.0.1"]);
    only_ip.run(&[
        case(
            "principal is the address only",
            "@cert-authority * {CA}",
            false,
        ),
        by_address(
            "by address: principal is the address",
            "@cert-authority * {CA}",
            true,
        ),
    ]);
    let several = certified_bench(&["-n", "other.example,localhost"]);
    several.run(&[case(
        "name among several principals",
        "@cert-authority * {CA}",
        true,
    )]);
    let none = certified_bench(&[]);
    none.run(&[case("no principals", "@cert-authority * {CA}", true)]);
    let expired = certified_bench(&["-n", "localhost", "-V", "20200101:20200102"]);
    expired.run(&[
        case("expired", "@cert-authority * {CA}", false),
        case(
            "expired, host key pinned",
            "@cert-authority * {CA}\n{N} {A}",
            true,
        ),
    ]);
    let future = certified_bench(&["-n", "localhost", "-V", "+520w:+1040w"]);
    future.run(&[case("not yet valid", "@cert-authority * {CA}", false)]);
}
