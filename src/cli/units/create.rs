//! submit, load and start: creating the units that do not exist yet (from local unit files
//! or their templates, with fleetctl's `--replace` rules), then setting their target state.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fleet::names::{maybe_append_default_unit_type, unit_name_mangle};
use crate::fleet::schema::{Unit, UnitOption};
use crate::fleet::unit_file::{
    self, hash, instance_of, is_global, unknown_fleet_keys, validate_name, validate_options,
};

use super::wait::{try_wait_for_unit_states, wait_all, wait_for_systemd_active, Block};
use super::{warn, Ctx};

/// The three commands that create units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreateCommand {
    /// Create only.
    Submit,
    /// Create and schedule.
    Load,
    /// Create, schedule and start.
    Start,
}

/// Whether a unit is to be created.
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

fn check_replace_state(command: CreateCommand, unit: &Unit) -> Creation {
    let allowed: &[&str] = match command {
        CreateCommand::Submit => &["inactive"],
        CreateCommand::Load => &["inactive", "loaded"],
        CreateCommand::Start => &["inactive", "loaded", "launched"],
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
    command: CreateCommand,
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
async fn lazy_create_units(
    ctx: &Arc<Ctx>,
    args: &[String],
    replace: bool,
    command: CreateCommand,
    block: Block,
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
    // fleetctl waits for new units whatever --no-block says.
    let errors = wait_all(ctx, &created, "inactive", block.always()).await;
    if errors.is_empty() {
        return Ok(());
    }
    for e in &errors {
        eprintln!("Error waiting on unit creation: {e}");
    }
    Err("One or more errors creating units".into())
}

/// Sets the target state of each unit that is not already there; returns those triggered.
async fn set_target_state_of_units(
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

/// submit, load and start.
pub(crate) async fn run_create(
    ctx: &Arc<Ctx>,
    command: CreateCommand,
    args: &[String],
    replace: bool,
    block: Block,
) -> i32 {
    if args.is_empty() {
        eprintln!("No units given");
        return 0;
    }
    if let Err(e) = lazy_create_units(ctx, args, replace, command, block).await {
        eprintln!("Error creating units: {e}");
        return 1;
    }
    let (state, action, verb) = match command {
        CreateCommand::Submit => return 0,
        CreateCommand::Load => ("loaded", "load", "loading"),
        CreateCommand::Start => ("launched", "start", "starting"),
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
    if let Err(e) = try_wait_for_unit_states(ctx, &waiting, action, state, block).await {
        eprintln!("Error waiting for unit states, exit status: {e}");
        return 1;
    }
    if command == CreateCommand::Start {
        if let Err(e) = wait_for_systemd_active(ctx, &waiting, block).await {
            eprintln!("Error waiting for systemd unit states, err: {e}");
            return 1;
        }
    }
    0
}
