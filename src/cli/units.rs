//! The unit commands: submit, load, start, stop, unload, destroy and cat, with fleetctl's
//! name mangling, template lookup, `--replace` rules, waiting model and messages (reference
//! B.3, B.6, B.7). Deliberate differences are listed in docs/compatibility.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

pub use crate::fleet::names::{maybe_append_default_unit_type, unit_name_mangle};
use crate::fleet::schema::{Machine, Unit, UnitOption};
use crate::fleet::unit_file::{
    self, hash, instance_of, is_global, unknown_fleet_keys, validate_name, validate_options,
};
use crate::fleet_client::{chrono_like_now, FleetClient};

/// One attempt: poll every [`POLL`] for [`ATTEMPT`].
pub const ATTEMPT: Duration = Duration::from_secs(2);
pub const POLL: Duration = Duration::from_millis(250);
/// After this many unlimited attempts an unscheduled unit draws a notice.
const UNSCHEDULED_NOTICE_AFTER: u32 = 5;

/// Go's `%v` of a string slice: `[a b]`.
pub fn go_list(names: &[String]) -> String {
    format!("[{}]", names.join(" "))
}

pub fn warn(msg: &str) {
    eprintln!("{} WARN fleetctl.go:0: {msg}", chrono_like_now());
}

/// Shared state of one fleetctl invocation.
pub struct Ctx {
    pub api: FleetClient,
    machines: Mutex<Option<Vec<Machine>>>,
}

impl Ctx {
    pub fn new(api: FleetClient) -> Arc<Ctx> {
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
        Some(super::lists::machine_legend(&m.id, Some(&m), false))
    }
}

enum Creation {
    Create,
    Skip,
}

fn parent_dir(file: &str) -> PathBuf {
    Path::new(file)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn read_unit_file(path: &Path) -> Result<Vec<UnitOption>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("open {}: {}", path.display(), io_text(&e)))?;
    unit_file::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn io_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Whether the local file matches the registry unit (`Err` if the file cannot be read).
fn match_local(file: &Path, su: &Unit) -> Result<bool, String> {
    if let Err(e) = std::fs::metadata(file) {
        return Err(format!("stat {}: {}", file.display(), io_text(&e)));
    }
    let local = read_unit_file(file)?;
    Ok(hash(&local) == hash(&su.options))
}

fn is_local_unit_different(file: &str, su: &Unit, replace: bool) -> Result<bool, String> {
    match match_local(Path::new(file), su) {
        Ok(same) => {
            if !same && !replace {
                eprintln!("WARNING: Unit {} in registry differs from local unit file {file}. Add --replace to override.", su.name);
            }
            Ok(!same)
        }
        Err(e) => {
            let base = file.rsplit('/').next().unwrap_or(file);
            let Some((template, _)) = instance_of(base) else {
                return Err(format!(
                    "error Unit {file} does not seem to be a template unit"
                ));
            };
            let _ = e;
            let tmpl = parent_dir(file).join(template);
            let same = match_local(&tmpl, su)?;
            if !same && !replace {
                eprintln!("WARNING: Unit {} in registry differs from local template unit file {file}. Add --replace to override.", su.name);
            }
            Ok(!same)
        }
    }
}

fn check_replace_state(command: &str, unit: &Unit) -> Creation {
    let allowed: &[&str] = match command {
        "submit" => &["inactive"],
        "load" => &["inactive", "loaded"],
        _ => &["inactive", "loaded", "launched"],
    };
    if allowed.contains(&unit.desired_state.as_str()) {
        return Creation::Create;
    }
    eprintln!(
        "Warning: can not replace Unit({}) in state '{}', use the appropriate command",
        unit.name, unit.desired_state
    );
    Creation::Skip
}

async fn check_unit_creation(
    ctx: &Ctx,
    file: &str,
    name: &str,
    replace: bool,
    command: &str,
) -> Result<Creation, String> {
    let unit = ctx
        .api
        .unit(name)
        .await
        .map_err(|e| format!("error retrieving Unit({name}) from Registry: {e}"))?;
    let Some(unit) = unit else {
        return Ok(Creation::Create);
    };
    let different = is_local_unit_different(file, &unit, replace);
    if replace {
        if different? {
            return Ok(check_replace_state(command, &unit));
        }
        println!("Found same Unit({}) in Registry, nothing to do", unit.name);
    }
    Ok(Creation::Skip)
}

async fn unit_file_from_template(
    ctx: &Ctx,
    template: &str,
    file: &str,
    replace: bool,
) -> Result<Vec<UnitOption>, String> {
    let tmpl =
        ctx.api.unit(template).await.map_err(|e| {
            format!("error retrieving template Unit({template}) from Registry: {e}")
        })?;
    if let Some(t) = tmpl {
        let _ = is_local_unit_different(file, &t, replace);
        return Ok(t.options);
    }
    let path = parent_dir(file).join(template);
    if !path.exists() {
        return Err(format!(
            "unable to find template Unit({template}) in Registry or on filesystem"
        ));
    }
    read_unit_file(&path)
        .map_err(|e| format!("unable to load template Unit({template}) from file: {e}"))
}

async fn get_unit_file(
    ctx: &Ctx,
    file: &str,
    name: &str,
    replace: bool,
) -> Result<Vec<UnitOption>, String> {
    if Path::new(file).exists() {
        return read_unit_file(Path::new(file))
            .map_err(|e| format!("failed getting Unit({file}) from file: {e}"));
    }
    match instance_of(name) {
        None => Err(format!(
            "unable to find Unit({name}) in Registry or on filesystem"
        )),
        Some((template, _)) => unit_file_from_template(ctx, &template, file, replace)
            .await
            .map_err(|e| format!("failed getting Unit({file}) from template: {e}")),
    }
}

async fn create_unit(ctx: &Ctx, name: &str, options: Vec<UnitOption>) -> Result<(), String> {
    validate_name(name)?;
    validate_options(&options)?;
    for key in unknown_fleet_keys(&options) {
        warn(&format!(
            "Unit {name}: unrecognized requirement in [X-Fleet] section: {key:?}"
        ));
    }
    let unit = Unit {
        name: name.to_string(),
        options,
        ..Default::default()
    };
    ctx.api
        .create_unit(&unit)
        .await
        .map_err(|e| format!("failed creating unit {name}: {e}"))
}

/// Creates the units that do not exist yet and waits for them to reach `inactive`.
pub async fn lazy_create_units(
    ctx: &Arc<Ctx>,
    args: &[String],
    replace: bool,
    command: &str,
    attempts: i64,
) -> Result<(), String> {
    let mut created = Vec::new();
    for arg in args {
        let file = maybe_append_default_unit_type(arg);
        let name = unit_name_mangle(arg);
        if let Creation::Skip = check_unit_creation(ctx, &file, &name, replace, command).await? {
            continue;
        }
        let options = get_unit_file(ctx, &file, &name, replace).await?;
        create_unit(ctx, &name, options).await?;
        created.push(name);
    }
    // fleetctl waits for new units whatever --no-block says: -1 means no limit here.
    let attempts = attempts.max(0);
    let errors = wait_all(ctx, &created, "inactive", attempts).await;
    if errors.is_empty() {
        return Ok(());
    }
    for e in &errors {
        eprintln!("Error waiting on unit creation: {e}");
    }
    Err("One or more errors creating units".into())
}

/// Sets the target state of each unit that is not already there; returns those triggered.
pub async fn set_target_state_of_units(
    ctx: &Ctx,
    names: &[String],
    state: &str,
) -> Result<Vec<Unit>, String> {
    let mut triggered = Vec::new();
    for name in names {
        let u = ctx
            .api
            .unit(name)
            .await
            .map_err(|e| format!("error retrieving unit {name} from registry: {e}"))?
            .ok_or_else(|| format!("unable to find unit {name}"))?;
        if u.desired_state == state {
            continue;
        }
        ctx.api
            .set_unit_target_state(&u.name, state)
            .await
            .map_err(|e| e.to_string())?;
        triggered.push(u);
    }
    Ok(triggered)
}

/// Checks once; prints `Unit NAME STATE[ on LEGEND]` when reached.
async fn assert_unit_state(ctx: &Ctx, name: &str, state: &str) -> (bool, bool) {
    let u = match ctx.api.unit(name).await {
        Ok(Some(u)) => u,
        Ok(None) => {
            warn(&format!("Unit {name} not found"));
            return (false, false);
        }
        Err(e) => {
            warn(&format!("Error retrieving Unit({name}) from Registry: {e}"));
            return (false, false);
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
        return (false, scheduled);
    }
    let mut msg = format!("Unit {name} {}", u.current_state);
    if !u.machine_id.is_empty() {
        if let Some(l) = ctx.legend(&u.machine_id).await {
            msg = format!("{msg} on {l}");
        }
    }
    println!("{msg}");
    (true, scheduled)
}

/// Waits for one unit; `attempts` 0 means no limit.
async fn check_unit_state(
    ctx: Arc<Ctx>,
    name: String,
    state: String,
    attempts: i64,
) -> Result<(), String> {
    let polls_per_attempt = (ATTEMPT.as_millis() / POLL.as_millis()) as u32;
    let mut attempt: u32 = 0;
    let mut noticed = false;
    loop {
        let mut scheduled = true;
        for _ in 0..polls_per_attempt {
            let (done, s) = assert_unit_state(&ctx, &name, &state).await;
            if done {
                return Ok(());
            }
            scheduled = s;
            tokio::time::sleep(POLL).await;
        }
        attempt += 1;
        if attempts > 0 && i64::from(attempt) >= attempts {
            let mut msg = format!("timed out waiting for unit {name} to report state {state}");
            if !scheduled && state != "inactive" {
                msg.push_str(" (it is not scheduled to any machine: no machine satisfies its [X-Fleet] requirements)");
            }
            return Err(msg);
        }
        if attempts == 0
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
async fn wait_all(ctx: &Arc<Ctx>, names: &[String], state: &str, attempts: i64) -> Vec<String> {
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            tokio::spawn(check_unit_state(
                ctx.clone(),
                n.clone(),
                state.to_string(),
                attempts,
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
pub async fn try_wait_for_unit_states(
    ctx: &Arc<Ctx>,
    names: &[String],
    action: &str,
    state: &str,
    attempts: i64,
) -> Result<(), String> {
    if attempts < 0 {
        for n in names {
            println!("Triggered unit {n} {action}");
        }
        return Ok(());
    }
    match wait_all(ctx, names, state, attempts)
        .await
        .into_iter()
        .next()
    {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Waits until systemd reports each unit active and loaded.
async fn wait_for_systemd_active(
    ctx: &Arc<Ctx>,
    names: &[String],
    attempts: i64,
) -> Result<(), String> {
    if attempts < 0 {
        for n in names {
            println!("Triggered unit {n} start");
        }
        return Ok(());
    }
    // The original gives up after one 2 s window whatever --block-attempts says.
    let windows = attempts.max(1) as u32;
    let window = ATTEMPT * windows;
    let polls = windows * (ATTEMPT.as_millis() / POLL.as_millis()) as u32;
    for name in names {
        let mut ok = false;
        for _ in 0..polls {
            if let Ok(states) = ctx.api.unit_states(None, Some(name)).await {
                if states
                    .iter()
                    .any(|s| s.active_state == "active" && s.load_state == "loaded")
                {
                    ok = true;
                    break;
                }
            }
            tokio::time::sleep(POLL).await;
        }
        if !ok {
            let secs = window.as_secs();
            eprintln!("Error waiting for units: Failed to find an active unit {name} within {secs}s, err: Failed to fetch states within {secs}s");
            return Err(format!(
                "Failed to find an active unit {name} within {secs}s"
            ));
        }
    }
    Ok(())
}

/// submit, load and start.
pub async fn run_create(
    ctx: &Arc<Ctx>,
    command: &str,
    args: &[String],
    replace: bool,
    attempts: i64,
) -> i32 {
    if args.is_empty() {
        eprintln!("No units given");
        return 0;
    }
    if let Err(e) = lazy_create_units(ctx, args, replace, command, attempts).await {
        eprintln!("Error creating units: {e}");
        return 1;
    }
    let (state, action, verb) = match command {
        "submit" => return 0,
        "load" => ("loaded", "load", "loading"),
        _ => ("launched", "start", "starting"),
    };
    let names: Vec<String> = args.iter().map(|a| unit_name_mangle(a)).collect();
    let triggered = match set_target_state_of_units(ctx, &names, state).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("Error {verb} units: {e}");
            return 1;
        }
    };
    let mut waiting = Vec::new();
    for u in triggered {
        if is_global(&u.options) {
            println!("Triggered global unit {} {action}", u.name);
        } else {
            waiting.push(u.name);
        }
    }
    if let Err(e) = try_wait_for_unit_states(ctx, &waiting, action, state, attempts).await {
        eprintln!("Error waiting for unit states, exit status: {e}");
        return 1;
    }
    if command == "start" {
        if let Err(e) = wait_for_systemd_active(ctx, &waiting, attempts).await {
            eprintln!("Error waiting for systemd unit states, err: {e}");
            return 1;
        }
    }
    0
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

/// stop and unload.
pub async fn run_stop_unload(ctx: &Arc<Ctx>, command: &str, args: &[String], attempts: i64) -> i32 {
    if args.is_empty() {
        eprintln!("No units given");
        return 0;
    }
    let Ok(units) = find_units(ctx, args).await else {
        return 1;
    };
    if units.is_empty() {
        eprintln!("Units not found in registry");
        return 0;
    }
    let (target, action, done, failed) = if command == "stop" {
        ("loaded", "stop", "stopped", "stop")
    } else {
        ("inactive", "unload", "unloaded", "unload")
    };
    let mut waiting = Vec::new();
    for u in &units {
        let global = is_global(&u.options);
        if !global {
            if command == "stop" && u.current_state == "inactive" {
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
    if let Err(e) = try_wait_for_unit_states(ctx, &waiting, action, target, attempts).await {
        eprintln!("Failed to {failed} units {}. err: {e}", go_list(&waiting));
        return 1;
    }
    eprintln!("Successfully {done} units {}.", go_list(&waiting));
    0
}

/// destroy: deletes, then (unless --no-block) waits until each unit is gone.
pub async fn run_destroy(ctx: &Arc<Ctx>, args: &[String], attempts: i64) -> i32 {
    if args.is_empty() {
        eprintln!("No units given");
        return 0;
    }
    let Ok(units) = find_units(ctx, args).await else {
        return 1;
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
        if attempts >= 0 {
            let polls = if attempts == 0 {
                u32::MAX
            } else {
                attempts as u32 * 8
            };
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

/// cat: the serialized unit, byte for byte, no newline added.
pub async fn run_cat(ctx: &Ctx, args: &[String]) -> i32 {
    if args.len() != 1 {
        eprintln!("One unit file must be provided");
        return 1;
    }
    let name = unit_name_mangle(&args[0]);
    match ctx.api.unit(&name).await {
        Ok(Some(u)) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(unit_file::serialize(&u.options).as_bytes());
            let _ = out.flush();
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
