//! stop, unload and destroy.

use std::sync::Arc;

use crate::fleet::unit_file::is_global;

use super::wait::{try_wait_for_unit_states, Block, POLL};
use super::{find_units, go_list, Ctx};

/// The two commands that take units down a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopCommand {
    /// To `loaded`.
    Stop,
    /// To `inactive`.
    Unload,
}

/// stop and unload.
pub(crate) async fn run_stop_unload(
    ctx: &Arc<Ctx>,
    command: StopCommand,
    args: &[String],
    block: Block,
) -> i32 {
    let units = match named_units(ctx, args).await {
        Ok(u) => u,
        Err(code) => return code,
    };
    let (target, action, done, failed) = match command {
        StopCommand::Stop => ("loaded", "stop", "stopped", "stop"),
        StopCommand::Unload => ("inactive", "unload", "unloaded", "unload"),
    };
    let mut waiting = Vec::new();
    for u in &units {
        let global = is_global(&u.options);
        if !global {
            if command == StopCommand::Stop && u.current_state == "inactive" {
                eprintln!("Unable to stop unit {} in state inactive", u.name);
                return 1;
            }
            if u.current_state == target {
                continue;
            }
        }
        let _ = ctx.api.set_unit_target_state(&u.name, target).await;
        if global {
            println!("Triggered global unit {} {action}", u.name);
        } else {
            waiting.push(u.name.clone());
        }
    }
    if let Err(e) = try_wait_for_unit_states(ctx, &waiting, action, target, block).await {
        eprintln!("Failed to {failed} units {}. err: {e}", go_list(&waiting));
        return 1;
    }
    eprintln!("Successfully {done} units {}.", go_list(&waiting));
    0
}

/// The registry's units named by `args`, or the exit code when there are none: fleetctl's
/// `No units given` and `Units not found in registry` (both exit 0), or a failed fetch (1).
async fn named_units(ctx: &Ctx, args: &[String]) -> Result<Vec<crate::fleet::schema::Unit>, i32> {
    if args.is_empty() {
        eprintln!("No units given");
        return Err(0);
    }
    let units = find_units(ctx, args).await.map_err(|()| 1)?;
    if units.is_empty() {
        eprintln!("Units not found in registry");
        return Err(0);
    }
    Ok(units)
}

/// destroy: deletes, then (unless --no-block) waits until each unit is gone.
pub(crate) async fn run_destroy(ctx: &Arc<Ctx>, args: &[String], block: Block) -> i32 {
    let units = match named_units(ctx, args).await {
        Ok(u) => u,
        Err(code) => return code,
    };
    let mut exit = 0;
    for u in units {
        match ctx.api.destroy_unit(&u.name).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => continue,
            Err(e) => {
                eprintln!("Error destroying units: {e}");
                exit = 1;
                continue;
            }
        }
        let polls = match block {
            Block::No => None,
            Block::Forever => Some(u32::MAX),
            Block::Attempts(n) => Some(n.saturating_mul(8)),
        };
        if let Some(polls) = polls {
            let mut gone = false;
            for _ in 0..polls {
                if let Ok(None) = ctx.api.unit(&u.name).await {
                    gone = true;
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            if !gone {
                eprintln!(
                    "Error destroying units: timed out waiting for unit {} to be destroyed",
                    u.name
                );
                exit = 1;
                continue;
            }
        }
        println!("Destroyed {}", u.name);
    }
    exit
}
