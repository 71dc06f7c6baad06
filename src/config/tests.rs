use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/fb.toml"), text)
}

#[test]
fn unknown_keys_get_the_nearest_and_bare_numbers_the_unit() {
    let e = parse("[clusters.a]\ntunnel = \"h\"\nusr = \"core\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `user`?"), "{e}");
    let e = parse("[clusters.a]\ntunnel = \"h\"\nzzzzzzzz = 1\n")
        .unwrap_err()
        .to_string();
    assert!(!e.contains("did you mean"), "{e}");
    let e = parse("[clusters.a]\ntunnel = \"h\"\nconnect_timeout = 10\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("write \"10s\""), "{e}");
    assert!(e.starts_with("/etc/fb.toml:3:"), "{e}");
}

#[test]
fn front_door_is_loopback_only_and_per_cluster() {
    let ok = parse("[clusters.a]\ntunnel = \"h\"\nfront_door = \"127.0.0.1:2222\"\n").unwrap();
    assert_eq!(
        ok.clusters["a"].front_door,
        Some("127.0.0.1:2222".parse().unwrap())
    );
    for bad in [
        "0.0.0.0:2222",
        "192.168.1.5:22",
        "127.0.0.1:0",
        "localhost:22",
        "[::]:22",
    ] {
        let e = parse(&format!(
            "[clusters.a]\ntunnel = \"h\"\nfront_door = \"{bad}\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("front_door") && e.starts_with("/etc/fb.toml:3:"),
            "{bad}: {e}"
        );
    }
    let e = parse("[defaults]\nfront_door = \"127.0.0.1:2222\"\n[clusters.a]\ntunnel = \"h\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in [defaults]"), "{e}");
    let e = parse("[clusters.a]\ntunnel = \"h\"\nfront_door = \"127.0.0.1:2222\"\n[clusters.b]\ntunnel = \"h\"\nfront_door = \"127.0.0.1:2222\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("already cluster \"a\"'s"), "{e}");
}

#[test]
fn defaults_apply_and_clusters_override_them() {
    let c = parse(
        "[defaults]\nuser = \"elroy\"\nconnect_timeout = \"3s\"\n\n[clusters.prod]\ntunnel = \"bastion:2222\"\n\n[clusters.dev]\ntunnel = \"10.0.0.1\"\nuser = \"jane\"\nendpoint = \"http://10.0.0.5:49153\"\n",
    )
    .expect("valid config");
    let prod = &c.clusters["prod"];
    assert_eq!(prod.user, "elroy");
    assert_eq!(
        prod.tunnel,
        HostPort {
            host: "bastion".into(),
            port: 2222
        }
    );
    assert_eq!(prod.connect_timeout, Duration::from_secs(3));
    assert_eq!(prod.endpoint, Endpoint::Unix("/var/run/fleet.sock".into()));
    assert_eq!(prod.host_key_checking, HostKeyPolicy::Strict);
    let dev = &c.clusters["dev"];
    assert_eq!(dev.user, "jane");
    assert_eq!(dev.tunnel.port, 22);
    assert_eq!(
        dev.endpoint,
        Endpoint::Http {
            host: "10.0.0.5".into(),
            port: 49153
        }
    );
}

#[test]
fn unknown_key_names_file_line_and_column() {
    let e = parse("[clusters.prod]\ntunnel = \"h\"\ntunel = \"x\"\n").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("/etc/fb.toml:3:1: unknown field `tunel`"),
        "{msg}"
    );
}

#[test]
fn bad_values_are_rejected_with_position() {
    let e = parse("[clusters.a]\ntunnel = \"h\"\nhost_key_checking = \"maybe\"\n").unwrap_err();
    assert!(e.to_string().starts_with("/etc/fb.toml:3:"), "{e}");
    assert!(e.to_string().contains("maybe"), "{e}");
    let e = parse("[clusters.a]\ntunnel = \"h\"\nkeepalive_interval = \"soon\"\n").unwrap_err();
    assert!(e.to_string().contains("invalid duration \"soon\""), "{e}");
    let e = parse("[clusters.a]\ntunnel = \"h:99999\"\n").unwrap_err();
    assert!(e.to_string().contains("port must be a number"), "{e}");
    let e = parse("[clusters.a]\ntunnel = \"h\"\nendpoint = \"https://x\"\n").unwrap_err();
    assert!(e.to_string().contains("endpoint must start with"), "{e}");
    let e = parse("[clusters.a]\n").unwrap_err();
    assert!(e.to_string().contains("missing field `tunnel`"), "{e}");
}

#[test]
fn durations_and_counts_are_range_checked() {
    for (line, field) in [
        ("connect_timeout = \"500000000000y\"", "connect_timeout"),
        ("connect_timeout = \"1ms\"", "connect_timeout"),
        ("keepalive_interval = \"0s\"", "keepalive_interval"),
        ("keepalive_interval = \"2days\"", "keepalive_interval"),
        ("keepalive_max = 0", "keepalive_max"),
        ("keepalive_max = 100000", "keepalive_max"),
    ] {
        let e = parse(&format!("[clusters.a]\ntunnel = \"h\"\n{line}\n")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/fb.toml:3:"), "{msg}");
        assert!(msg.contains("out of range: allowed from"), "{msg}");
        assert!(msg.contains(field), "{msg}");
    }
    let c = parse("[clusters.a]\ntunnel = \"h\"\nconnect_timeout = \"10m\"\nkeepalive_max = 100\n")
        .expect("limits are allowed");
    assert_eq!(c.clusters["a"].connect_timeout, Duration::from_secs(600));
}

#[test]
fn cluster_names_are_restricted() {
    let e = parse("[clusters.\"a/b\"]\ntunnel = \"h\"\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "/etc/fb.toml:1:1: cluster name \"a/b\" may only contain letters, digits, '_', '.' and '-'"
    );
    assert!(valid_cluster_name("prod-1.eu_west"));
    assert!(!valid_cluster_name(".."));
}

#[test]
fn hostport_forms() {
    assert_eq!(
        HostPort::parse("[::1]:2200").unwrap(),
        HostPort {
            host: "::1".into(),
            port: 2200
        }
    );
    assert_eq!(HostPort::parse("::1").unwrap().port, 22);
    assert_eq!(HostPort::parse("h:22").unwrap().known_hosts_name(), "h");
    assert_eq!(
        HostPort::parse("h:2222").unwrap().known_hosts_name(),
        "[h]:2222"
    );
    assert!(HostPort::parse("h:0").is_err());
    assert!(HostPort::parse("").is_err());
    let j = JumpHop::parse("ops@jump.example:2200").unwrap();
    assert_eq!(j.user.as_deref(), Some("ops"));
    assert_eq!(
        j.target,
        HostPort {
            host: "jump.example".into(),
            port: 2200
        }
    );
    assert_eq!(JumpHop::parse("j").unwrap().to_string(), "j:22");
    assert!(JumpHop::parse("@j").is_err());
}

#[test]
fn clusters_keep_the_files_order() {
    let text = "[clusters.prod]\ntunnel = \"p\"\n[clusters.dev]\ntunnel = \"d\"\n[clusters.staging]\ntunnel = \"s\"\n";
    let c = Config::parse(Path::new("c.toml"), text).unwrap();
    assert_eq!(
        c.clusters.keys().collect::<Vec<_>>(),
        ["prod", "dev", "staging"]
    );
}
