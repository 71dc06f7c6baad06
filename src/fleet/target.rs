//! Which machine `fleetctl ssh`'s target names, by fleetctl's rules (reference B.7): a machine
//! whose ID starts with the argument, or the machine of a (non-global) unit, with the
//! original's messages. Shared by the daemon (sessions through a cluster) and our fleetctl (a
//! bare fleetd socket, which can answer the question but not run the command).

use super::schema::{Machine, Unit};
use super::unit_file::is_global;

/// What the user named.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wanted<'a> {
    /// `--machine PREFIX`.
    Machine(&'a str),
    /// `--unit NAME` (the unit is looked up by the caller).
    Unit,
    /// A positional argument: a machine ID prefix or a unit name.
    Auto(&'a str),
}

/// The machine the target names, or fleetctl's message. `unit` is the unit the argument
/// names, when there is one (`Unit` and `Auto`).
pub(crate) fn find<'m>(
    wanted: Wanted<'_>,
    machines: &'m [Machine],
    unit: Option<&Unit>,
) -> Result<&'m Machine, String> {
    let by_machine = |prefix: &str| -> Result<Option<&'m Machine>, String> {
        let mut found = machines.iter().filter(|m| m.id.starts_with(prefix));
        let Some(m) = found.next() else {
            return Ok(None);
        };
        if found.next().is_some() {
            return Err("found more than one machine".into());
        }
        Ok(Some(m))
    };
    let by_unit = |u: Option<&Unit>| -> Result<Option<&'m Machine>, String> {
        let Some(u) = u else { return Ok(None) };
        if is_global(&u.options) {
            return Err("global units unsupported".into());
        }
        Ok(machines.iter().find(|m| m.id == u.machine_id))
    };
    match wanted {
        Wanted::Machine(prefix) => {
            by_machine(prefix)?.ok_or_else(|| "machine does not exist".to_string())
        }
        Wanted::Unit => {
            if unit.is_none() {
                return Err("unit does not exist".into());
            }
            by_unit(unit)?.ok_or_else(|| "Could not determine address of machine.".to_string())
        }
        Wanted::Auto(s) => {
            let machine = by_machine(s).unwrap_or(None);
            let unit = by_unit(unit).unwrap_or(None);
            match (machine, unit) {
                (Some(_), Some(_)) => Err(format!(
                    "ambiguous argument, both machine and unit found for `{s}`.\nPlease use flag `-m` or `-u` to refine the search"
                )),
                (Some(m), None) | (None, Some(m)) => Ok(m),
                (None, None) => Err("could not find matching unit or machine".into()),
            }
        }
    }
}
