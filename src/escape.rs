//! Cluster data made safe for a terminal and a log line: control characters (C0, DEL and
//! C1, ESC and CR among them) become visible escapes (`\x1b`, `\r`, `\n`, `\t`, `\u{9b}`),
//! as `ls` and `git` show such names, so whoever can write fleet's registry cannot hide,
//! rewrite or forge rows on an operator's screen or lines in a log. Everything else,
//! backslashes included (systemd's `\x2d` in unit names), is left as it is.

use std::borrow::Cow;

/// `s` with every control character escaped; borrowed when there is none.
pub fn display(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A text of several lines (a unit file) for a terminal: each line as [`display`] makes it,
/// its line breaks and tabs kept.
pub fn display_text(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Cow::Borrowed(s);
    }
    let lines: Vec<String> = s
        .split('\n')
        .map(|l| {
            l.split('\t')
                .map(|part| display(part).into_owned())
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect();
    Cow::Owned(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible_and_the_rest_stays() {
        assert!(matches!(display("web@1.service"), Cow::Borrowed(_)));
        assert_eq!(display("a\\x2db.service"), "a\\x2db.service");
        assert_eq!(
            display("evil\x1b[2J\rok\n\t\x07\x7f\u{9b}é"),
            "evil\\x1b[2J\\rok\\n\\t\\x07\\x7f\\u{9b}é"
        );
        assert!(matches!(display_text("[Unit]\n\tA=b\n"), Cow::Borrowed(_)));
        assert_eq!(
            display_text("[Service]\nExecStart=/bin/echo \x1b]0;owned\x07\r\n"),
            "[Service]\nExecStart=/bin/echo \\x1b]0;owned\\x07\\r\n"
        );
    }
}
