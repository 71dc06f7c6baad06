//! The command lines the broker runs on machines for `status` and `journal`. The CLI sends
//! what it wants as a [`RemoteAction`] and the daemon builds the line, so every word is
//! quoted for a POSIX shell whatever a unit name holds, and a read-only cluster can allow
//! exactly these commands and refuse any other.

use serde::{Deserialize, Serialize};

/// A command the broker builds itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RemoteAction {
    /// `systemctl status -l -- UNIT`.
    Status {
        /// The unit's name.
        unit: String,
    },
    /// `journalctl --unit=UNIT --no-pager [-n LINES] --output OUTPUT [--show-cursor]
    /// [--after-cursor CURSOR]`, under `sudo` when asked.
    Journal {
        /// The unit's name.
        unit: String,
        /// `-n LINES`.
        #[serde(default)]
        lines: Option<u32>,
        /// `--output` (journalctl's output mode).
        output: String,
        /// Run under `sudo`.
        #[serde(default)]
        sudo: bool,
        /// `--show-cursor`.
        #[serde(default)]
        show_cursor: bool,
        /// `--after-cursor CURSOR`.
        #[serde(default)]
        after_cursor: Option<String>,
    },
}

impl RemoteAction {
    /// The remote command line.
    pub(crate) fn command_line(&self) -> String {
        match self {
            // `--` ends systemctl's options: a unit named `--version.service` stays a unit.
            RemoteAction::Status { unit } => {
                command_line("systemctl", &["status", "-l", "--", unit])
            }
            RemoteAction::Journal {
                unit,
                lines,
                output,
                sudo,
                show_cursor,
                after_cursor,
            } => {
                // `--unit=NAME` as one word: the name can never be read as an option.
                let unit_arg = format!("--unit={unit}");
                let n = lines.map(|n| n.to_string());
                let mut args: Vec<&str> = vec![&unit_arg, "--no-pager"];
                if let Some(n) = &n {
                    args.extend(["-n", n]);
                }
                args.extend(["--output", output]);
                if *show_cursor {
                    args.push("--show-cursor");
                }
                if let Some(c) = after_cursor {
                    args.extend(["--after-cursor", c]);
                }
                let cmd = command_line("journalctl", &args);
                if *sudo {
                    format!("sudo -- {cmd}")
                } else {
                    cmd
                }
            }
        }
    }
}

/// One word for a POSIX shell: single-quoted, with each `'` written as `'\''`. Nothing
/// inside single quotes is special to `sh` (no `$`, backticks, backslashes or line ends),
/// so the word reaches the program exactly as given.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `cmd 'arg' 'arg'…`: a command line whose every argument is one literal word.
pub(crate) fn command_line(cmd: &str, args: &[&str]) -> String {
    let mut s = cmd.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&shell_quote(a));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_quote_every_word_for_sh() {
        let status = RemoteAction::Status {
            unit: "hello.service".into(),
        };
        assert_eq!(
            status.command_line(),
            "systemctl 'status' '-l' '--' 'hello.service'"
        );
        let journal = RemoteAction::Journal {
            unit: "hello.service".into(),
            lines: Some(10),
            output: "short".into(),
            sudo: false,
            show_cursor: false,
            after_cursor: None,
        };
        assert_eq!(
            journal.command_line(),
            "journalctl '--unit=hello.service' '--no-pager' '-n' '10' '--output' 'short'"
        );
        let follow = RemoteAction::Journal {
            unit: "a.service".into(),
            lines: None,
            output: "cat".into(),
            sudo: true,
            show_cursor: true,
            after_cursor: Some("s=1;i=2".into()),
        };
        assert_eq!(
            follow.command_line(),
            "sudo -- journalctl '--unit=a.service' '--no-pager' '--output' 'cat' '--show-cursor' '--after-cursor' 's=1;i=2'"
        );
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        assert_eq!(shell_quote(r"$(id)`x`\"), r"'$(id)`x`\'");
    }
}
