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

/// Why the target names no machine, in fleetctl's words (its `Display` is the text the
/// original prints).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TargetError {
    #[error("found more than one machine")]
    SeveralMachines,
    #[error("global units unsupported")]
    GlobalUnit,
    #[error("machine does not exist")]
    NoMachine,
    #[error("unit does not exist")]
    NoUnit,
    #[error("Could not determine address of machine.")]
    NoAddress,
    #[error("ambiguous argument, both machine and unit found for `{0}`.\nPlease use flag `-m` or `-u` to refine the search")]
    Ambiguous(String),
    #[error("could not find matching unit or machine")]
    NoMatch,
}

/// The machine the target names, or fleetctl's message. `unit` is the unit the argument
/// names, when there is one (`Unit` and `Auto`).
pub(crate) fn find<'m>(
    wanted: Wanted<'_>,
    machines: &'m [Machine],
    unit: Option<&Unit>,
) -> Result<&'m Machine, TargetError> {
    let by_machine = |prefix: &str| -> Result<Option<&'m Machine>, TargetError> {
        let mut found = machines.iter().filter(|m| m.id.starts_with(prefix));
        let Some(m) = found.next() else {
            return Ok(None);
        };
        if found.next().is_some() {
            return Err(TargetError::SeveralMachines);
        }
        Ok(Some(m))
    };
    let by_unit = |u: Option<&Unit>| -> Result<Option<&'m Machine>, TargetError> {
        let Some(u) = u else { return Ok(None) };
        if is_global(&u.options) {
            return Err(TargetError::GlobalUnit);
        }
        Ok(machines.iter().find(|m| m.id == u.machine_id))
    };
    match wanted {
        Wanted::Machine(prefix) => by_machine(prefix)?.ok_or(TargetError::NoMachine),
        Wanted::Unit => {
            if unit.is_none() {
                return Err(TargetError::NoUnit);
            }
            by_unit(unit)?.ok_or(TargetError::NoAddress)
        }
        Wanted::Auto(s) => {
            let machine = by_machine(s).unwrap_or(None);
            let unit = by_unit(unit).unwrap_or(None);
            match (machine, unit) {
                (Some(_), Some(_)) => Err(TargetError::Ambiguous(s.to_string())),
                (Some(m), None) | (None, Some(m)) => Ok(m),
                (None, None) => Err(TargetError::NoMatch),
            }
        }
    }
}
