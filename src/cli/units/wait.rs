//! How a unit command waits for its units: fleetctl's attempts of about two seconds each,
//! polled every quarter second, with its messages. As in fleetctl, the first poll comes one
//! tick after the request, not at once: fleet reports a new unit's state about 2.0 s after
//! it is created, which the original's last poll of a window (at 2.0 s) sees and a window
//! opened at once (last poll at 1.75 s) misses.

use std::sync::Arc;
use std::time::Duration;

use crate::fleet::unit_file::is_global;

use super::{warn, Ctx};

/// One attempt: poll every [`POLL`] for [`ATTEMPT`].
pub(crate) const ATTEMPT: Duration = Duration::from_secs(2);
/// How often a waiting command asks.
pub(crate) const POLL: Duration = Duration::from_millis(250);
/// After this many unlimited attempts an unscheduled unit draws a notice.
const UNSCHEDULED_NOTICE_AFTER: u32 = 5;

/// How long a command waits for its units (fleetctl's `getBlockAttempts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block {
    /// `--no-block`: trigger and return.
    No,
    /// `--block-attempts=0` (the default): wait as long as it takes.
    Forever,
    /// `--block-attempts=N`: give up after N attempts.
    Attempts(u32),
}

impl Block {
    /// From `--no-block` and `--block-attempts`.
    pub(crate) fn from_flags(no_block: bool, attempts: u32) -> Block {
        match (no_block, attempts) {
            (true, _) => Block::No,
            (false, 0) => Block::Forever,
            (false, n) => Block::Attempts(n),
        }
    }

    /// How to wait where fleetctl waits whatever `--no-block` says (new units).
    pub(crate) fn always(self) -> Block {
        match self {
            Block::No => Block::Forever,
            b => b,
        }
    }
}

/// One look at a unit.
struct UnitCheck {
    /// It is in the state waited for.
    reached: bool,
    /// It is global or scheduled to a machine.
    scheduled: bool,
}

/// Checks once; prints `Unit NAME STATE[ on LEGEND]` when reached.
async fn assert_unit_state(ctx: &Ctx, name: &str, state: &str) -> UnitCheck {
    let not_found = UnitCheck {
        reached: false,
        scheduled: false,
    };
    let u = match ctx.api.unit(name).await {
        Ok(Some(u)) => u,
        Ok(None) => {
            warn(&format!("Unit {name} not found"));
            return not_found;
        }
        Err(e) => {
            warn(&format!("Error retrieving Unit({name}) from Registry: {e}"));
            return not_found;
        }
    };
    let global = is_global(&u.options);
    let current = if global {
        &u.desired_state
    } else {
        &u.current_state
    };
    let scheduled = global || !u.machine_id.is_empty();
    if current != state {
        return UnitCheck {
            reached: false,
            scheduled,
        };
    }
    let mut msg = format!("Unit {name} {}", u.current_state);
    if !u.machine_id.is_empty() {
        if let Some(l) = ctx.legend(&u.machine_id).await {
            msg = format!("{msg} on {l}");
        }
    }
    println!("{msg}");
    UnitCheck {
        reached: true,
        scheduled,
    }
}

/// One attempt: `check` every [`POLL`] for [`ATTEMPT`], the first one [`POLL`] from now;
/// returns the last look.
async fn one_attempt<F, Fut>(mut check: F) -> UnitCheck
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = UnitCheck>,
{
    let mut last = UnitCheck {
        reached: false,
        scheduled: true,
    };
    for _ in 0..ATTEMPT.as_millis() / POLL.as_millis() {
        tokio::time::sleep(POLL).await;
        last = check().await;
        if last.reached {
            break;
        }
    }
    last
}

/// Waits for one unit (`block` is not [`Block::No`]).
async fn check_unit_state(
    ctx: Arc<Ctx>,
    name: String,
    state: String,
    block: Block,
) -> Result<(), String> {
    let mut attempt: u32 = 0;
    let mut noticed = false;
    loop {
        let check = one_attempt(|| assert_unit_state(&ctx, &name, &state)).await;
        if check.reached {
            return Ok(());
        }
        let scheduled = check.scheduled;
        attempt += 1;
        if matches!(block, Block::Attempts(n) if attempt >= n) {
            // What was seen, not a guess at why: the engine may only be slow.
            if !scheduled && state != "inactive" {
                eprintln!("Unit {name} was not scheduled to any machine while waiting; `fleetctl list-machines` shows what its [X-Fleet] requirements can match");
            }
            return Err(format!(
                "timed out waiting for unit {name} to report state {state}"
            ));
        }
        if block == Block::Forever
            && !scheduled
            && !noticed
            && attempt >= UNSCHEDULED_NOTICE_AFTER
            && state != "inactive"
        {
            noticed = true;
            eprintln!(
                "Unit {name} is not scheduled to any machine yet; no machine may satisfy its [X-Fleet] requirements (still waiting; --block-attempts=N bounds the wait)"
            );
        }
    }
}

/// Waits for all units at once; returns the errors in the order the units were given.
pub(super) async fn wait_all(
    ctx: &Arc<Ctx>,
    names: &[String],
    state: &str,
    block: Block,
) -> Vec<String> {
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            tokio::spawn(check_unit_state(
                ctx.clone(),
                n.clone(),
                state.to_string(),
                block,
            ))
        })
        .collect();
    let mut errors = Vec::new();
    for h in handles {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors
}

/// fleetctl's `tryWaitForUnitStates`: with --no-block prints `Triggered unit N ACTION`.
pub(super) async fn try_wait_for_unit_states(
    ctx: &Arc<Ctx>,
    names: &[String],
    action: &str,
    state: &str,
    block: Block,
) -> Result<(), String> {
    if block == Block::No {
        for n in names {
            println!("Triggered unit {n} {action}");
        }
        return Ok(());
    }
    match wait_all(ctx, names, state, block).await.into_iter().next() {
        None => Ok(()),
        Some(e) => {
            eprintln!("Error waiting for units: {e}");
            Err(e)
        }
    }
}

/// Waits until systemd reports each unit active and loaded.
pub(super) async fn wait_for_systemd_active(
    ctx: &Arc<Ctx>,
    names: &[String],
    block: Block,
) -> Result<(), String> {
    // The original gives up after one 2 s window unless --block-attempts says more.
    let windows = match block {
        Block::No => {
            for n in names {
                println!("Triggered unit {n} start");
            }
            return Ok(());
        }
        Block::Forever => 1,
        Block::Attempts(n) => n,
    };
    let window = ATTEMPT * windows;
    let polls = windows * (ATTEMPT.as_millis() / POLL.as_millis()) as u32;
    for name in names {
        let mut ok = false;
        for _ in 0..polls {
            tokio::time::sleep(POLL).await;
            if let Ok(states) = ctx.api.unit_states(None, Some(name)).await {
                if states
                    .iter()
                    .any(|s| s.active_state == "active" && s.load_state == "loaded")
                {
                    ok = true;
                    break;
                }
            }
        }
        if !ok {
            let secs = window.as_secs();
            let e = format!(
                "Failed to find an active unit {name} within {secs}s, err: Failed to fetch states within {secs}s"
            );
            eprintln!("Error waiting for units: {e}");
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fleet reports a new unit's state about 2.0 s after it is created: one attempt (as
    /// `--block-attempts=1` allows) sees it, as the original's does, and its first look
    /// comes one tick after the request.
    #[tokio::test(start_paused = true)]
    async fn one_attempt_looks_from_a_tick_after_the_request_to_two_seconds() {
        let start = tokio::time::Instant::now();
        let looks = std::cell::RefCell::new(Vec::new());
        let check = one_attempt(|| async {
            let at = start.elapsed();
            looks.borrow_mut().push(at);
            UnitCheck {
                reached: at >= Duration::from_millis(2000),
                scheduled: true,
            }
        })
        .await;
        assert!(check.reached, "looks at {:?}", looks.borrow());
        let looks = looks.borrow();
        assert_eq!(looks.first(), Some(&POLL));
        assert_eq!(looks.len(), 8);
    }
}
