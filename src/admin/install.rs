//! `fleet-broker install-service`: the shipped systemd user units with this binary's real
//! path (escaped as systemd reads words), written without following a symlink, then
//! `systemctl --user` to enable them; `--dry-run` prints instead.

use std::path::PathBuf;

/// The shipped user unit with this binary's real path in `ExecStart` and `ExecReload`.
fn service_unit() -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the path of this binary is not UTF-8; install it where the path is",
            exe.display()
        )
    })?;
    Ok(include_str!("../../systemd/fleet-broker.service")
        .replace("%h/.cargo/bin/fleet-broker", &systemd_word(exe)))
}

/// `word` as one word of a unit's command line: `%` doubled (systemd expands specifiers),
/// `$` doubled (and environment variables), and quoted when it holds a space, a quote or a
/// backslash.
fn systemd_word(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if escaped.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\')) {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        escaped
    }
}

/// Writes a unit file at `dest` (0644), never through a symlink: one there is refused, and the
/// file is replaced by a rename, so nothing someone else placed is followed or written into.
fn write_unit(dest: &std::path::Path, text: &str) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(dest).is_ok_and(|m| m.file_type().is_symlink()) {
        anyhow::bail!(
            "{}: is a symlink; not writing through it (remove it, then run install-service again)",
            dest.display()
        );
    }
    let dir = dest.parent().unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".fleet-broker-unit.")
        .tempfile_in(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    tmp.write_all(text.as_bytes())
        .and_then(|()| {
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
        })
        .map_err(|e| anyhow::anyhow!("{}: {e}", dest.display()))?;
    tmp.persist(dest)
        .map_err(|e| anyhow::anyhow!("{}: {}", dest.display(), e.error))?;
    Ok(())
}

/// `fleet-broker install-service`: the unit (and with `--socket` the socket unit) in the user
/// manager's directory, then `systemctl --user daemon-reload` and `enable --now` of the
/// service, or of the socket that starts it on demand.
pub(super) fn install_service(dry_run: bool, socket: bool) -> anyhow::Result<()> {
    let mut units = vec![("fleet-broker.service", service_unit()?)];
    if socket {
        units.push((
            "fleet-broker.socket",
            include_str!("../../systemd/fleet-broker.socket").to_string(),
        ));
    }
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::config::expand_tilde("~/.config"))
        .join("systemd/user");
    let enable: &[&str] = if socket {
        &["--user", "enable", "--now", "fleet-broker.socket"]
    } else {
        &["--user", "enable", "--now", "fleet-broker"]
    };
    let steps: [&[&str]; 2] = [&["--user", "daemon-reload"], enable];
    if dry_run {
        for (name, text) in &units {
            println!("# would write {}:", dir.join(name).display());
            print!("{text}");
        }
        for s in steps {
            println!("# would run: systemctl {}", s.join(" "));
        }
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    for (name, text) in &units {
        let dest = dir.join(name);
        write_unit(&dest, text)?;
        println!("wrote {}", dest.display());
    }
    for s in steps {
        let out = std::process::Command::new("systemctl")
            .args(s)
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => println!("ran: systemctl {}", s.join(" ")),
            Ok(o) => anyhow::bail!(
                "`systemctl {}` failed: {}; is a user manager running for you? (`loginctl enable-linger $USER` keeps one without a login session)",
                s.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => anyhow::bail!(
                "cannot run `systemctl {}` ({e}); on a system without systemd, run `fleet-broker serve` another way",
                s.join(" ")
            ),
        }
    }
    if socket {
        println!("fleet-broker starts on its first request: `systemctl --user status fleet-broker.socket fleet-broker`");
    } else {
        println!("fleet-broker runs as a user service: `systemctl --user status fleet-broker`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_words_escape_specifiers_variables_and_spaces() {
        assert_eq!(
            systemd_word("/usr/bin/fleet-broker"),
            "/usr/bin/fleet-broker"
        );
        assert_eq!(systemd_word("/opt/50%/fb"), "/opt/50%%/fb");
        assert_eq!(systemd_word("/opt/$HOME/fb"), "/opt/$$HOME/fb");
        assert_eq!(
            systemd_word("/home/a b/\"q\"/fb"),
            "\"/home/a b/\\\"q\\\"/fb\""
        );
    }
}
