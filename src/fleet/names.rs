//! fleetctl's rules for unit names given on the command line.

/// Unit types fleetctl recognises on the command line.
const RECOGNIZED: [&str; 7] = [
    ".service",
    ".socket",
    ".timer",
    ".path",
    ".device",
    ".mount",
    ".automount",
];

/// Appends `.service` unless the name ends in a recognised unit type.
pub(crate) fn maybe_append_default_unit_type(arg: &str) -> String {
    if RECOGNIZED.iter().any(|s| arg.ends_with(s)) {
        arg.to_string()
    } else {
        format!("{arg}.service")
    }
}

/// fleetctl's `unitNameMangle`: the base name, with the default type appended.
pub(crate) fn unit_name_mangle(arg: &str) -> String {
    let base = arg.rsplit('/').next().unwrap_or(arg);
    maybe_append_default_unit_type(base)
}
