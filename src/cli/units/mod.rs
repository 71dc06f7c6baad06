//! The unit commands: submit, load, start, stop, unload, destroy and cat, with fleetctl's
//! name mangling, template lookup, `--replace` rules, waiting model and messages (reference
//! B.3, B.6, B.7). Deliberate differences are listed in docs/compatibility.md.
//!
//! [`create`]: submit, load and start (finding unit files and templates, `--replace`);
//! [`wait`]: how long and how a command waits for units ([`Block`]); [`stop`]: stop, unload
//! and destroy. `cat` and what they share live here.

mod create;
mod stop;
mod wait;

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::fleet::names::unit_name_mangle;
use crate::fleet::schema::{Machine, Unit};
use crate::fleet::unit_file;
use crate::fleet_client::{chrono_like_now, FleetClient};

pub(crate) use create::{run_create, CreateCommand};
pub(crate) use stop::{run_destroy, run_stop_unload, StopCommand};
pub(crate) use wait::Block;

/// Go's `%v` of a string slice: `[a b]`.
pub(crate) fn go_list(names: &[String]) -> String {
    format!("[{}]", names.join(" "))
}

pub(crate) fn warn(msg: &str) {
    eprintln!("{} WARN fleetctl.go:0: {msg}", chrono_like_now());
}

/// Shared state of one fleetctl invocation.
pub(crate) struct Ctx {
    pub api: FleetClient,
    machines: Mutex<Option<Vec<Machine>>>,
}

impl Ctx {
    pub(crate) fn new(api: FleetClient) -> Arc<Ctx> {
        Arc::new(Ctx {
            api,
            machines: Mutex::new(None),
        })
    }

    /// The machine legend for a unit message: `85c0c595.../172.17.8.102`.
    async fn legend(&self, id: &str) -> Option<String> {
        let mut cache = self.machines.lock().await;
        if cache.is_none() {
            *cache = self.api.machines().await.ok();
        }
        let m = cache.as_ref()?.iter().find(|m| m.id == id)?.clone();
        Some(super::table::machine_legend(&m.id, Some(&m), false))
    }
}

/// The registry's units named by `args`, in argument order; a failed fetch is printed.
async fn find_units(ctx: &Ctx, args: &[String]) -> Result<Vec<Unit>, ()> {
    let units = ctx.api.units().await.map_err(|e| eprintln!("{e}"))?;
    Ok(args
        .iter()
        .filter_map(|a| {
            let n = unit_name_mangle(a);
            units.iter().find(|u| u.name == n).cloned()
        })
        .collect())
}

/// cat: the serialized unit, byte for byte, no newline added.
/// A unit file on stdout after `header`: on a terminal, control characters are shown
/// escaped; a script gets the file as it is.
pub(crate) fn print_unit_file(text: &str, header: &str) {
    use std::io::{IsTerminal, Write};
    let text = if std::io::stdout().is_terminal() {
        crate::escape::display_text(text)
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(header.as_bytes());
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

pub(crate) async fn run_cat(ctx: &Ctx, args: &[String]) -> i32 {
    if args.len() != 1 {
        eprintln!("One unit file must be provided");
        return 1;
    }
    let name = unit_name_mangle(&args[0]);
    match ctx.api.unit(&name).await {
        Ok(Some(u)) => {
            print_unit_file(&unit_file::serialize(&u.options), "");
            0
        }
        Ok(None) => {
            eprintln!("Unit {name} not found");
            1
        }
        Err(e) => {
            eprintln!("Error retrieving Unit {name}: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::names::maybe_append_default_unit_type;

    #[test]
    fn name_mangling_matches_fleetctl() {
        assert_eq!(unit_name_mangle("foo"), "foo.service");
        assert_eq!(unit_name_mangle("dir/foo"), "foo.service");
        assert_eq!(unit_name_mangle("foo.target"), "foo.target.service");
        assert_eq!(unit_name_mangle("a/b/web@1.socket"), "web@1.socket");
        assert_eq!(maybe_append_default_unit_type("dir/foo"), "dir/foo.service");
        assert_eq!(go_list(&[]), "[]");
        assert_eq!(
            go_list(&["a.service".into(), "b.service".into()]),
            "[a.service b.service]"
        );
    }
}
