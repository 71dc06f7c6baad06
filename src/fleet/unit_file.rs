//! Unit files as fleet sees them: the serializer and SHA-1 hash (reference B.4) and the name
//! and option validation the server applies (A.5).

use sha1::{Digest, Sha1};

use super::schema::UnitOption;

/// Longest line go-systemd accepts.
pub(crate) const MAX_LINE: usize = 2048;

/// Sections in order of first appearance, options grouped under them, one empty line
/// between sections, no trailing empty line.
pub(crate) fn serialize(options: &[UnitOption]) -> String {
    let mut sections: Vec<(&str, Vec<&UnitOption>)> = Vec::new();
    for o in options {
        match sections.iter_mut().find(|(s, _)| *s == o.section) {
            Some((_, v)) => v.push(o),
            None => sections.push((&o.section, vec![o])),
        }
    }
    let mut out = String::new();
    for (i, (section, opts)) in sections.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push('[');
        out.push_str(section);
        out.push_str("]\n");
        for o in opts {
            out.push_str(&o.name);
            out.push('=');
            out.push_str(&o.value);
            out.push('\n');
        }
    }
    out
}

/// SHA-1 of the serialized unit, 40 hex characters.
pub fn hash(options: &[UnitOption]) -> String {
    let digest = Sha1::digest(serialize(options).as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

const UNIT_TYPES: [&str; 13] = [
    "automount",
    "busname",
    "device",
    "mount",
    "path",
    "scope",
    "service",
    "slice",
    "snapshot",
    "socket",
    "swap",
    "target",
    "timer",
];
const TEMPLATE_TYPES: [&str; 5] = ["path", "service", "socket", "target", "timer"];

/// fleet's `ValidateName`, with its messages.
pub(crate) fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("unit name cannot be empty".into());
    }
    if name.len() > 256 {
        return Err("unit name exceeds maximum length (256)".into());
    }
    let Some(dot) = name.rfind('.') else {
        return Err("unit name must contain \".\"".into());
    };
    if dot == name.len() - 1 {
        return Err("unit name cannot end in \".\"".into());
    }
    let suffix = &name[dot + 1..];
    if !UNIT_TYPES.contains(&suffix) {
        return Err(format!("invalid unit type: {suffix:?}"));
    }
    if name.contains('@') && !TEMPLATE_TYPES.contains(&suffix) {
        return Err(format!("invalid unit type for template: {suffix:?}"));
    }
    for c in name[..dot].chars() {
        if !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-' | '@' | '\\')) {
            return Err(format!("invalid character '{c}' in unit name"));
        }
    }
    if name.starts_with('@') {
        return Err("unit name cannot start in \"@\"".into());
    }
    Ok(())
}

/// Whether `name` is a template (`x@.service`).
pub(crate) fn is_template(name: &str) -> bool {
    name.contains("@.")
}

/// Values of an `[X-Fleet]` key, splitting quoted multi-values (`"a=b" "c=d"`).
pub(crate) fn fleet_values(options: &[UnitOption], key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for o in options
        .iter()
        .filter(|o| o.section == "X-Fleet" && o.name == key)
    {
        let v = o.value.trim();
        if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
            let mut cur = String::new();
            let mut quoted = false;
            for c in v.chars() {
                match c {
                    '"' => quoted = !quoted,
                    ' ' | '\t' if !quoted => {
                        if !cur.is_empty() {
                            out.push(std::mem::take(&mut cur));
                        }
                    }
                    c => cur.push(c),
                }
            }
            if !cur.is_empty() {
                out.push(cur);
            }
        } else {
            out.push(v.to_string());
        }
    }
    out
}

/// Parses fleet's truthy values for `Global`.
pub(crate) fn truthy(v: &str) -> bool {
    matches!(
        v.to_ascii_lowercase().as_str(),
        "true" | "yes" | "1" | "on" | "t"
    )
}

/// Whether the unit is Global (last value wins).
pub(crate) fn is_global(options: &[UnitOption]) -> bool {
    fleet_values(options, "Global")
        .last()
        .is_some_and(|v| truthy(v))
}

/// fleet's `ValidateOptions`.
pub(crate) fn validate_options(options: &[UnitOption]) -> Result<(), String> {
    for line in serialize(options).lines() {
        if line.len() > MAX_LINE {
            return Err(format!("line too long (max {MAX_LINE} bytes)"));
        }
    }
    let has = |k: &str| {
        options
            .iter()
            .any(|o| o.section == "X-Fleet" && o.name == k)
    };
    let peers = fleet_values(options, "MachineOf");
    let conflicts = fleet_values(options, "Conflicts");
    let replaces = fleet_values(options, "Replaces");
    for p in &peers {
        for c in conflicts.iter().flat_map(|c| c.split_whitespace()) {
            if glob_match(c, p) {
                return Err(format!(
                    "unresolvable requirements: peer {p:?} matches conflict {c:?}"
                ));
            }
        }
        for r in replaces.iter().flat_map(|r| r.split_whitespace()) {
            if glob_match(r, p) {
                return Err(format!(
                    "unresolvable requirements: peer {p:?} matches replace {r:?}"
                ));
            }
        }
    }
    let global = is_global(options);
    if has("MachineID") {
        for (cond, what) in [
            (!peers.is_empty(), "Peers"),
            (!conflicts.is_empty(), "Conflicts"),
            (global, "Global"),
            (!replaces.is_empty(), "Replaces"),
        ] {
            if cond {
                return Err(format!("MachineID cannot be used with {what}"));
            }
        }
    }
    if global {
        if !peers.is_empty() {
            return Err("Global cannot be used with Peers".into());
        }
        if !replaces.is_empty() {
            return Err("Global cannot be used with Replaces".into());
        }
    }
    if !conflicts.is_empty() && !replaces.is_empty() {
        return Err("Conflicts cannot be used with Replaces".into());
    }
    Ok(())
}

/// Go's `path.Match` for the patterns fleet uses (`*`, `?`, no path separators in names).
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    crate::pattern::wildcard_match(pattern, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(s: &str, n: &str, v: &str) -> UnitOption {
        UnitOption {
            section: s.into(),
            name: n.into(),
            value: v.into(),
        }
    }

    #[test]
    fn serializer_groups_sections_without_trailing_blank() {
        let o = vec![
            opt("Unit", "Description", "Hello"),
            opt("Service", "ExecStart", "/bin/sleep 1000"),
            opt("Unit", "After", "x.service"),
        ];
        assert_eq!(
            serialize(&o),
            "[Unit]\nDescription=Hello\nAfter=x.service\n\n[Service]\nExecStart=/bin/sleep 1000\n"
        );
        assert_eq!(serialize(&[]), "");
        assert_eq!(hash(&o).len(), 40);
    }

    #[test]
    fn name_rules_and_messages() {
        assert!(validate_name("hello.service").is_ok());
        assert!(validate_name("web@1.service").is_ok());
        assert_eq!(
            validate_name("hello").unwrap_err(),
            "unit name must contain \".\""
        );
        assert_eq!(
            validate_name("a.").unwrap_err(),
            "unit name cannot end in \".\""
        );
        assert_eq!(
            validate_name("a.foo").unwrap_err(),
            "invalid unit type: \"foo\""
        );
        assert_eq!(
            validate_name("a@b.mount").unwrap_err(),
            "invalid unit type for template: \"mount\""
        );
        assert_eq!(
            validate_name("a b.service").unwrap_err(),
            "invalid character ' ' in unit name"
        );
        assert_eq!(
            validate_name("@a.service").unwrap_err(),
            "unit name cannot start in \"@\""
        );
    }

    #[test]
    fn option_combinations_are_refused() {
        let o = vec![
            opt("X-Fleet", "MachineID", "abc"),
            opt("X-Fleet", "Global", "true"),
        ];
        assert_eq!(
            validate_options(&o).unwrap_err(),
            "MachineID cannot be used with Global"
        );
        let o = vec![
            opt("X-Fleet", "MachineOf", "a.service"),
            opt("X-Fleet", "Conflicts", "a.*"),
        ];
        assert_eq!(
            validate_options(&o).unwrap_err(),
            "unresolvable requirements: peer \"a.service\" matches conflict \"a.*\""
        );
        let long = "x".repeat(2100);
        assert_eq!(
            validate_options(&[opt("Service", "ExecStart", &long)]).unwrap_err(),
            "line too long (max 2048 bytes)"
        );
    }

    #[test]
    fn quoted_multi_values_split() {
        let o = vec![opt("X-Fleet", "MachineMetadata", "\"a=b\" \"c=d\"")];
        assert_eq!(fleet_values(&o, "MachineMetadata"), vec!["a=b", "c=d"]);
    }
}

/// Why a unit file could not be parsed (go-systemd's `unit.Deserialize` rules).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line longer than go-systemd accepts.
    #[error("line too long (max {MAX_LINE} bytes)")]
    LineTooLong,
    /// Text after `[Section]` on its line.
    #[error("found garbage after section name {0:?}")]
    GarbageAfterSection(String),
    /// `[Section` without `]`.
    #[error("unable to find end of section")]
    UnterminatedSection,
    /// An option line without `=`.
    #[error("line {line}: expected \"=\" in option line {text:?}")]
    NoEquals {
        /// 1-based line.
        line: usize,
        /// The line.
        text: String,
    },
}

/// Parses a unit file into options in file order. Comments (`#`, `;`) and blank lines are
/// dropped, text before the first section is ignored, a value ending in `\` continues on the
/// next line (backslash, newline and the next line's leading whitespace are kept), and
/// names and values are trimmed.
pub fn parse(text: &str) -> Result<Vec<UnitOption>, ParseError> {
    let mut out = Vec::new();
    let mut section: Option<String> = None;
    let lines: Vec<&str> = text.split('\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let raw = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
        let lineno = i + 1;
        i += 1;
        if raw.len() > MAX_LINE {
            return Err(ParseError::LineTooLong);
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let Some(end) = rest.find(']') else {
                return Err(ParseError::UnterminatedSection);
            };
            let name = &rest[..end];
            if !rest[end + 1..].trim().is_empty() {
                return Err(ParseError::GarbageAfterSection(name.to_string()));
            }
            section = Some(name.to_string());
            continue;
        }
        let Some(sec) = &section else { continue };
        let Some((name, first)) = line.split_once('=') else {
            return Err(ParseError::NoEquals {
                line: lineno,
                text: line.to_string(),
            });
        };
        let mut value = first.trim_start().to_string();
        while value.ends_with('\\') && i < lines.len() {
            let next = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
            if next.len() > MAX_LINE {
                return Err(ParseError::LineTooLong);
            }
            i += 1;
            value.push('\n');
            value.push_str(next);
        }
        out.push(UnitOption {
            section: sec.clone(),
            name: name.trim().to_string(),
            value: value.trim().to_string(),
        });
    }
    Ok(out)
}

/// `X-Fleet` keys fleet knows; others draw a warning from fleetctl.
pub const KNOWN_FLEET_KEYS: [&str; 11] = [
    "MachineID",
    "MachineOf",
    "MachineMetadata",
    "Conflicts",
    "Global",
    "Replaces",
    "X-ConditionMachineID",
    "X-ConditionMachineBootID",
    "X-ConditionMachineOf",
    "X-ConditionMachineMetadata",
    "X-Conflicts",
];

/// Unknown `[X-Fleet]` keys, in file order, once each.
pub fn unknown_fleet_keys(options: &[UnitOption]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for o in options.iter().filter(|o| o.section == "X-Fleet") {
        if !KNOWN_FLEET_KEYS.contains(&o.name.as_str()) && !out.contains(&o.name) {
            out.push(o.name.clone());
        }
    }
    out
}

/// The first `[Unit] Description`, if any.
pub fn description(options: &[UnitOption]) -> Option<&str> {
    options
        .iter()
        .find(|o| o.section == "Unit" && o.name == "Description")
        .map(|o| o.value.as_str())
}

/// `prefix@instance.suffix` split: `(template name, instance)`.
pub fn instance_of(name: &str) -> Option<(String, String)> {
    let (base, suffix) = name.rsplit_once('.')?;
    let (prefix, instance) = base.split_once('@')?;
    if instance.is_empty() {
        return None;
    }
    Some((format!("{prefix}@.{suffix}"), instance.to_string()))
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn parses_sections_comments_and_continuations() {
        let text = "junk before\n[Unit]\nDescription = Hello World \n# comment\n; also\n\n[Service]\nExecStart=/bin/sh -c \"echo a \\\n   b\"\n[X-Fleet]\nMachineMetadata=\"a=b\" \"c=d\"\n";
        let o = parse(text).unwrap();
        assert_eq!(o.len(), 3);
        assert_eq!(o[0].name, "Description");
        assert_eq!(o[0].value, "Hello World");
        assert_eq!(o[1].value, "/bin/sh -c \"echo a \\\n   b\"");
        assert_eq!(fleet_values(&o, "MachineMetadata"), vec!["a=b", "c=d"]);
    }

    #[test]
    fn hello_world_hash_matches_reference_shape() {
        let o = parse("[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/sleep 3000\n")
            .unwrap();
        assert_eq!(
            serialize(&o),
            "[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/sleep 3000\n"
        );
        assert_eq!(hash(&o), {
            let d = Sha1::digest(
                b"[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/sleep 3000\n",
            );
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        });
    }

    #[test]
    fn hash_matches_the_reference_state_example() {
        // fleet-reference.md A.5: the UnitState of this unit carries this hash.
        let o =
            parse("[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n").unwrap();
        assert_eq!(hash(&o), "ea7c914e6663c9d50994eb2bdfb8c3ab190958ec");
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            parse("[Unit] x\n").unwrap_err(),
            ParseError::GarbageAfterSection("Unit".into())
        );
        assert!(matches!(
            parse("[Unit]\nnoequals\n").unwrap_err(),
            ParseError::NoEquals { line: 2, .. }
        ));
        assert_eq!(
            parse(&format!("[Unit]\nA={}\n", "x".repeat(2100))).unwrap_err(),
            ParseError::LineTooLong
        );
        assert_eq!(
            parse("[Unit\n").unwrap_err(),
            ParseError::UnterminatedSection
        );
    }

    #[test]
    fn instances_and_unknown_keys() {
        assert_eq!(
            instance_of("web@1.service"),
            Some(("web@.service".into(), "1".into()))
        );
        assert_eq!(instance_of("web@.service"), None);
        assert_eq!(instance_of("web.service"), None);
        let o = parse("[X-Fleet]\nGlobal=true\nFoo=1\nFoo=2\n").unwrap();
        assert_eq!(unknown_fleet_keys(&o), vec!["Foo".to_string()]);
        assert_eq!(description(&o), None);
    }
}
