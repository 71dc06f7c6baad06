use super::*;

const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA07NpDdhNQM35x9Ium8d8qQdYUa1LbUOJhPhOeC5ThL";
const ED2: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAtKLwx5/JtZtoRJIWvjvKNaNWC6KfABW0XfChm3VEFP";

fn key(s: &str) -> PublicKey {
    PublicKey::from_openssh(s).expect("test key")
}

fn kh(text: &str) -> KnownHosts {
    let mut k = KnownHosts::default();
    k.add_text(Path::new("/kh"), text);
    k
}

fn host(h: &str, port: u16) -> HostId {
    HostId::new(h, port)
}

#[test]
fn host_ids_are_bracketed_off_port_22_and_lower_case() {
    assert_eq!(host("H.example", 22).lookup, "h.example");
    assert_eq!(host("h", 2222).lookup, "[h]:2222");
    assert_eq!(host("h", 2222).principal, "h");
}

#[test]
fn plain_bracketed_and_lists_match() {
    let k = kh(&format!("a.example,[10.0.0.1]:2222 {ED}\n"));
    assert!(matches!(
        k.check(&host("a.example", 22), &key(ED)),
        Verdict::Trusted(_)
    ));
    assert!(matches!(
        k.check(&host("10.0.0.1", 2222), &key(ED)),
        Verdict::Trusted(_)
    ));
    assert_eq!(k.check(&host("10.0.0.1", 22), &key(ED)), Verdict::Unknown);
}

#[test]
fn wildcards_and_negation_in_any_position() {
    let k = kh(&format!("*.example,!bad.example {ED}\n"));
    assert!(matches!(
        k.check(&host("web.example", 22), &key(ED)),
        Verdict::Trusted(_)
    ));
    assert_eq!(
        k.check(&host("bad.example", 22), &key(ED)),
        Verdict::Unknown
    );
    let k = kh(&format!("!bad.example,*.example {ED}\n"));
    assert_eq!(
        k.check(&host("bad.example", 22), &key(ED)),
        Verdict::Unknown
    );
    assert!(crate::pattern::wildcard_match("h?st", "host"));
    assert!(!crate::pattern::wildcard_match("h?st", "hoost"));
    assert_eq!(match_pattern_list("a", "b,!a,a"), Some(false));
    assert_eq!(match_pattern_list("A", "a"), Some(true));
    assert_eq!(match_pattern_list("a", "b"), None);
}

#[test]
fn the_address_never_stands_in_for_the_name() {
    // `[name]:P` pinned to one key, the connected address to another: the name decides.
    let k = kh(&format!("[localhost]:2200 {ED2}\n[127.0.0.1]:2200 {ED}\n"));
    assert!(matches!(
        k.check(&host("localhost", 2200), &key(ED)),
        Verdict::Changed(_)
    ));
    assert_eq!(
        k.address_contradicts("[127.0.0.1]:2200", &key(ED2)).len(),
        1
    );
    assert!(k
        .address_contradicts("[127.0.0.1]:2200", &key(ED))
        .is_empty());
}

#[test]
fn changed_key_lists_pins_with_place() {
    let k = kh(&format!("# c\n\nh {ED}\n"));
    match k.check(&host("h", 22), &key(ED2)) {
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
        k.check(&host("h", 22), &key(ED)),
        Verdict::Revoked(_)
    ));
}

#[test]
fn hashed_entries_match_only_their_name() {
    let line = format!("{} {ED}\n", hash_name("[127.0.0.1]:2200"));
    let k = kh(&line);
    assert!(matches!(
        k.check(&host("127.0.0.1", 2200), &key(ED)),
        Verdict::Trusted(_)
    ));
    assert_eq!(k.check(&host("127.0.0.1", 22), &key(ED)), Verdict::Unknown);
}

#[test]
fn lines_openssh_skips_are_skipped_with_their_place() {
    let text =
        format!("h ssh-ed25519\nh ssh-foo AAAA\n@bogus h {ED}\n|1|AAAA|BBBB {ED}\nh {ED}\r\n");
    let k = kh(&text);
    let lines: Vec<usize> = k.skipped().iter().map(|s| s.line).collect();
    assert_eq!(lines, vec![1, 2, 3, 4]);
    assert_eq!(
        k.skipped()[0].to_string(),
        "/kh:1: missing base64 key; line ignored"
    );
    assert!(matches!(
        k.check(&host("h", 22), &key(ED)),
        Verdict::Trusted(_)
    ));
}

#[test]
fn pinned_algorithms_prefer_recorded_types() {
    let k = kh(&format!("h {ED}\n"));
    assert_eq!(
        k.pinned_algorithms(&host("h", 22)),
        vec![Algorithm::Ed25519]
    );
    assert!(k.pinned_algorithms(&host("other", 22)).is_empty());
}

#[test]
fn append_pin_creates_private_file_that_matches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("sub/known_hosts");
    append_pin(&f, "[127.0.0.1]:2200", &key(ED), false).expect("pin");
    append_pin(&f, "[127.0.0.2]:2200", &key(ED2), true).expect("pin");
    let text = std::fs::read_to_string(&f).expect("read");
    assert!(text.starts_with("[127.0.0.1]:2200 ssh-ed25519 "), "{text}");
    assert!(
        text.lines().nth(1).is_some_and(|l| l.starts_with("|1|")),
        "{text}"
    );
    let k = KnownHosts::load(std::slice::from_ref(&f)).expect("load");
    assert!(matches!(
        k.check(&host("127.0.0.1", 2200), &key(ED)),
        Verdict::Trusted(_)
    ));
    assert!(matches!(
        k.check(&host("127.0.0.2", 2200), &key(ED2)),
        Verdict::Trusted(_)
    ));
}
