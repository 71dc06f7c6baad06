//! The simulated cluster: machines, units, scheduling and the derived unit states.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::fleet::schema::{Machine, Unit, UnitOption, UnitState};
use crate::fleet::unit_file::{fleet_values, glob_match, hash, is_global};

#[derive(Debug, Clone)]
struct SimUnit {
    options: Vec<UnitOption>,
    desired: String,
    /// The machine a non-global unit is scheduled to.
    machine: Option<String>,
    /// The current state the machines' agents last reported (non-global units).
    current: String,
    /// The last change made through the API, while the cluster catches up with it
    /// ([`Timing::Fleet`]).
    change: Option<Change>,
}

/// How fast the simulated cluster moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timing {
    /// Every change shows at once.
    Instant,
    /// Changes made through the API show with fleet's delays (reference B.6): the engine
    /// schedules, the agents report, systemd follows.
    Fleet(FleetDelays),
}

/// The delays of [`Timing::Fleet`], from a change made through the API.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetDelays {
    /// A new unit's state (`inactive`) appears.
    pub new_state: Duration,
    /// A unit gets (or loses) its machine.
    pub machine: Duration,
    /// A started unit reads `launched`.
    pub launched: Duration,
    /// A stopped or unloaded unit reads `loaded` or `inactive`.
    pub stopped: Duration,
    /// systemd's state of the unit follows (stale `active running` after a stop until then).
    pub systemd: Duration,
    /// A global unit's per-machine states follow.
    pub global: Duration,
    /// The states of a destroyed unit linger (the agents notice on their cycle).
    pub destroyed: Duration,
}

impl FleetDelays {
    /// What fleet's own engine and agents showed (reference B.6).
    pub fn observed() -> FleetDelays {
        FleetDelays {
            new_state: Duration::from_millis(2000),
            machine: Duration::from_millis(1000),
            launched: Duration::from_millis(1500),
            stopped: Duration::from_millis(1000),
            systemd: Duration::from_millis(1600),
            global: Duration::from_millis(1400),
            destroyed: Duration::from_millis(5000),
        }
    }
}

/// What the API showed of a unit.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shown {
    machine: Option<String>,
    /// `None` before a new unit's first state.
    current: Option<String>,
    states: Vec<UnitState>,
}

#[derive(Debug, Clone)]
struct Change {
    at: Instant,
    /// What was shown just before.
    before: Shown,
}

/// The whole simulated cluster.
#[derive(Debug, Clone)]
pub struct Sim {
    /// Page size (fleetd's `token_limit`).
    pub token_limit: u16,
    /// A broken fleetd: every API request is answered with this status and fleet's error
    /// shape (fault tests).
    pub failing: Option<u16>,
    /// How responses reach the socket (fleetd's Go net/http unless a test says otherwise);
    /// read when a connection is accepted.
    pub write_pattern: super::WritePattern,
    /// The machines' fleet agents do not act: units keep the current state they had
    /// ([`Sim::set_agents_down`]).
    agents_down: bool,
    /// systemd reports no unit states (`/state` is empty), as when units never start.
    pub systemd_silent: bool,
    machines: Vec<Machine>,
    units: BTreeMap<String, SimUnit>,
    /// How fast changes made through the API show.
    pub timing: Timing,
    /// Among equally loaded machines, pick at random, as fleet's engine (which walks a map)
    /// does; otherwise the first by ID, for tests that name the machine.
    pub random_placement: bool,
    /// States of destroyed units that still show, until when.
    ghosts: Vec<(Instant, Vec<UnitState>)>,
}

/// Three machines shaped like the reference's examples.
pub fn demo_machines() -> Vec<Machine> {
    let m = |id: &str, ip: &str, meta: &[(&str, &str)]| Machine {
        id: id.into(),
        primary_ip: ip.into(),
        metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    vec![
        m(
            "113f16a7b8a94d0e9e4a2b1c3d5e7f90",
            "172.17.8.103",
            &[("az", "us-west-1b"), ("role", "web")],
        ),
        m("85c0c5951d6b4f3aa2b8c9d0e1f2a3b4", "172.17.8.102", &[]),
        m("e793afb9c3d14e5f8a6b7c8d9e0f1a2b", "172.17.8.101", &[]),
    ]
}

fn specifiers(v: &str, name: &str) -> String {
    let (base, _) = name.rsplit_once('.').unwrap_or((name, ""));
    let (prefix, instance) = match base.split_once('@') {
        Some((p, i)) => (p, i),
        None => (base, ""),
    };
    v.replace("%n", name)
        .replace("%N", base)
        .replace("%p", prefix)
        .replace("%i", instance)
}

/// One of fleet's job states (`job.JobState`).
pub(crate) fn is_job_state(s: &str) -> bool {
    matches!(s, "inactive" | "loaded" | "launched")
}

impl Sim {
    /// A cluster of `machines` without units.
    pub fn new(machines: Vec<Machine>) -> Sim {
        let mut machines = machines;
        machines.sort_by(|a, b| a.id.cmp(&b.id));
        Sim {
            token_limit: 100,
            failing: None,
            write_pattern: super::WritePattern::default(),
            agents_down: false,
            systemd_silent: false,
            machines,
            units: BTreeMap::new(),
            timing: Timing::Instant,
            random_placement: false,
            ghosts: Vec::new(),
        }
    }

    /// The machines, by ID.
    pub fn machines(&self) -> &[Machine] {
        &self.machines
    }

    /// A machine re-addressed (its host came back on another address).
    pub fn move_machine(&mut self, id: &str, primary_ip: &str) {
        for m in self.machines.iter_mut().filter(|m| m.id == id) {
            m.primary_ip = primary_ip.to_string();
        }
    }

    /// Whether the unit is in the registry.
    pub fn exists(&self, name: &str) -> bool {
        self.units.contains_key(name)
    }

    fn values(&self, name: &str, key: &str) -> Vec<String> {
        self.units
            .get(name)
            .map(|u| {
                fleet_values(&u.options, key)
                    .iter()
                    .map(|v| specifiers(v, name))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn unit_view(&self, name: &str, u: &SimUnit, item: bool) -> Unit {
        let global = is_global(&u.options);
        let (machine, current) = self.shown_placement(u, Instant::now());
        let current = if global {
            if item {
                String::new()
            } else {
                "inactive".into()
            }
        } else {
            current.unwrap_or_default()
        };
        Unit {
            current_state: current,
            desired_state: u.desired.clone(),
            machine_id: if global {
                String::new()
            } else {
                machine.unwrap_or_default()
            },
            name: name.into(),
            options: u.options.clone(),
        }
    }

    /// Every unit, by name, as `GET /units` shows them.
    pub fn units(&self) -> Vec<Unit> {
        self.units
            .iter()
            .map(|(n, u)| self.unit_view(n, u, false))
            .collect()
    }

    /// One unit, as `GET /units/NAME` shows it.
    pub fn unit(&self, name: &str) -> Option<Unit> {
        self.units.get(name).map(|u| self.unit_view(name, u, true))
    }

    /// The SHA1 of the unit's file, as `/state` reports it.
    pub fn unit_hash(&self, name: &str) -> Option<String> {
        self.units.get(name).map(|u| hash(&u.options))
    }

    /// Creates or replaces a unit; then schedules.
    /// Sets (`Some`) or removes (`None`) a metadata key of the machine with this exact ID,
    /// as fleet's `PATCH /machines` does; an unknown machine changes nothing.
    pub fn set_machine_metadata(&mut self, id: &str, key: &str, value: Option<&str>) {
        if let Some(m) = self.machines.iter_mut().find(|m| m.id == id) {
            match value {
                Some(v) => {
                    m.metadata.insert(key.to_string(), v.to_string());
                }
                None => {
                    m.metadata.remove(key);
                }
            }
        }
        self.reconcile();
    }

    /// Adds a machine as fleetd would report it (for tests of what the API may claim).
    pub fn add_machine(&mut self, machine: Machine) {
        self.machines.push(machine);
    }

    /// Creates or replaces a unit and schedules it as fleetd would.
    pub fn put(&mut self, name: &str, options: Vec<UnitOption>, desired: String) {
        let old = self.units.remove(name);
        let machine = old.and_then(|o| o.machine);
        self.units.insert(
            name.into(),
            SimUnit {
                options,
                desired,
                machine,
                current: "inactive".into(),
                change: None,
            },
        );
        self.reconcile();
    }

    /// Removes every unit (benchmarks that set up clusters of several sizes).
    pub fn clear_units(&mut self) {
        self.units.clear();
    }

    /// Inserts many units (name, options, desired state) and schedules once, for large
    /// simulated registries.
    pub fn put_many(&mut self, units: Vec<(String, Vec<UnitOption>, String)>) {
        for (name, options, desired) in units {
            let machine = self.units.remove(&name).and_then(|o| o.machine);
            self.units.insert(
                name,
                SimUnit {
                    options,
                    desired,
                    machine,
                    current: "inactive".into(),
                    change: None,
                },
            );
        }
        self.reconcile();
    }

    /// Sets a unit's desired state and reconciles, as fleetd's engine would.
    pub fn set_desired(&mut self, name: &str, desired: &str) {
        if let Some(u) = self.units.get_mut(name) {
            u.desired = desired.into();
        }
        self.reconcile();
    }

    /// Removes a unit; false when there was none.
    pub fn delete(&mut self, name: &str) -> bool {
        let existed = self.units.remove(name).is_some();
        self.reconcile();
        existed
    }

    fn machine_ok_metadata(&self, m: &Machine, unit: &str) -> bool {
        let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for pair in self.values(unit, "MachineMetadata") {
            if let Some((k, v)) = pair.split_once('=') {
                if !k.is_empty() && !v.is_empty() && !v.contains('=') {
                    wanted.entry(k.into()).or_default().push(v.into());
                }
            }
        }
        wanted
            .iter()
            .all(|(k, vs)| m.metadata.get(k).is_some_and(|have| vs.contains(have)))
    }

    fn units_on(&self, machine: &str) -> Vec<String> {
        self.units
            .iter()
            .filter(|(_, u)| u.machine.as_deref() == Some(machine))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn conflicts(&self, a: &str, b: &str) -> bool {
        let hit = |x: &str, y: &str| {
            self.values(x, "Conflicts")
                .iter()
                .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .any(|p| glob_match(&p, y))
        };
        hit(a, b) || hit(b, a)
    }

    fn able_to_run(&self, m: &Machine, unit: &str) -> bool {
        let ids = self.values(unit, "MachineID");
        if let Some(want) = ids.first() {
            if !(m.id == *want || (want.len() == 8 && m.id.starts_with(want.as_str()))) {
                return false;
            }
        }
        if !self.machine_ok_metadata(m, unit) {
            return false;
        }
        let here = self.units_on(&m.id);
        for peer in self.values(unit, "MachineOf") {
            if !here.contains(&peer) {
                return false;
            }
        }
        !here
            .iter()
            .any(|other| other != unit && self.conflicts(unit, other))
    }

    /// Unschedules inactive units, then places unscheduled ones on the least-loaded able machine.
    fn reconcile(&mut self) {
        let names: Vec<String> = self.units.keys().cloned().collect();
        for n in &names {
            if let Some(u) = self.units.get_mut(n) {
                if u.desired == "inactive" || is_global(&u.options) {
                    u.machine = None;
                }
            }
        }
        for n in &names {
            let Some(u) = self.units.get(n) else { continue };
            if u.machine.is_some() || u.desired == "inactive" || is_global(&u.options) {
                continue;
            }
            let mut candidates: Vec<(usize, String)> = self
                .machines
                .iter()
                .filter(|m| self.able_to_run(m, n))
                .map(|m| (self.units_on(&m.id).len(), m.id.clone()))
                .collect();
            candidates.sort();
            // fleet's engine walks a map: among the least loaded, which one it picks varies
            // from run to run ([`Sim::random_placement`]).
            let least = candidates.first().map(|(load, _)| *load);
            let ties = candidates
                .iter()
                .take_while(|(load, _)| Some(*load) == least)
                .count();
            let pick = if self.random_placement && ties > 1 {
                rand::Rng::gen_range(&mut rand::thread_rng(), 0..ties)
            } else {
                0
            };
            if let Some((_, id)) = candidates.into_iter().nth(pick) {
                if let Some(u) = self.units.get_mut(n) {
                    u.machine = Some(id);
                }
            }
        }
        if !self.agents_down {
            for u in self.units.values_mut() {
                // A target state fleet's agents do not know (the API stores any string
                // given to an existing unit) is never reached: the unit stays as it was.
                if !is_job_state(&u.desired) {
                    continue;
                }
                u.current = if u.machine.is_some() {
                    u.desired.clone()
                } else {
                    "inactive".into()
                };
            }
        }
    }

    /// Stops (or restarts) the machines' fleet agents: while down, units are still
    /// scheduled but their current state does not change.
    pub fn set_agents_down(&mut self, down: bool) {
        self.agents_down = down;
        self.reconcile();
    }

    /// Every unit state, sorted by (name, machineID).
    pub fn states(&self) -> Vec<UnitState> {
        let now = Instant::now();
        let mut out = Vec::new();
        if self.systemd_silent {
            return out;
        }
        for (name, u) in &self.units {
            out.extend(self.shown_states(name, u, now));
        }
        for (until, states) in &self.ghosts {
            if *until > now {
                out.extend(states.iter().cloned());
            }
        }
        out.sort_by(|a, b| (&a.name, &a.machine_id).cmp(&(&b.name, &b.machine_id)));
        out
    }

    /// The unit's states as systemd reports them once the cluster has caught up.
    fn target_states(&self, name: &str, u: &SimUnit) -> Vec<UnitState> {
        let mut out = Vec::new();
        if u.desired == "inactive" {
            return out;
        }
        let state = |machine: &str| {
            let (active, sub) = if u.desired == "launched" {
                ("active", "running")
            } else {
                ("inactive", "dead")
            };
            UnitState {
                hash: hash(&u.options),
                machine_id: machine.into(),
                name: name.into(),
                active_state: active.into(),
                load_state: "loaded".into(),
                sub_state: sub.into(),
            }
        };
        if is_global(&u.options) {
            for m in &self.machines {
                let conflict = self.units_on(&m.id).iter().any(|o| self.conflicts(name, o));
                if self.machine_ok_metadata(m, name) && !conflict {
                    out.push(state(&m.id));
                }
            }
        } else if let Some(m) = &u.machine {
            out.push(state(m));
        }
        out
    }

    /// How far the cluster has got since the unit's last change made through the API: the
    /// delays, the time since, and what was shown before; `None` when it shows the unit as
    /// it is.
    fn catching_up<'u>(
        &self,
        u: &'u SimUnit,
        now: Instant,
    ) -> Option<(FleetDelays, Duration, &'u Shown)> {
        let (Timing::Fleet(d), Some(change)) = (self.timing, &u.change) else {
            return None;
        };
        Some((d, now.saturating_duration_since(change.at), &change.before))
    }

    /// The machine and current state the API shows of a unit at `now`.
    fn shown_placement(&self, u: &SimUnit, now: Instant) -> (Option<String>, Option<String>) {
        let Some((d, age, before)) = self.catching_up(u, now) else {
            return (u.machine.clone(), Some(u.current.clone()));
        };
        let current_delay = match (&before.current, u.current.as_str()) {
            (None, _) => d.new_state,
            (Some(_), "launched") => d.launched,
            _ => d.stopped,
        };
        (
            if age >= d.machine {
                u.machine.clone()
            } else {
                before.machine.clone()
            },
            if age >= current_delay {
                Some(u.current.clone())
            } else {
                before.current.clone()
            },
        )
    }

    /// The unit's states as systemd reports them at `now`.
    fn shown_states(&self, name: &str, u: &SimUnit, now: Instant) -> Vec<UnitState> {
        match self.catching_up(u, now) {
            Some((d, age, before))
                if age
                    < if is_global(&u.options) {
                        d.global
                    } else {
                        d.systemd
                    } =>
            {
                before.states.clone()
            }
            _ => self.target_states(name, u),
        }
    }

    /// What the API shows of a unit now, before a change made through the API (nothing for
    /// a unit that does not exist).
    pub(crate) fn before_change(&self, name: &str) -> Shown {
        let now = Instant::now();
        match self.units.get(name) {
            Some(u) => {
                let (machine, current) = self.shown_placement(u, now);
                Shown {
                    machine,
                    current,
                    states: self.shown_states(name, u, now),
                }
            }
            None => Shown::default(),
        }
    }

    /// Marks a change made through the API: from now, the cluster moves from what was shown
    /// `before` to the new state, with [`Timing::Fleet`]'s delays.
    pub(crate) fn changed(&mut self, name: &str, before: Shown) {
        if self.timing == Timing::Instant {
            return;
        }
        if let Some(u) = self.units.get_mut(name) {
            u.change = Some(Change {
                at: Instant::now(),
                before,
            });
        }
    }

    /// Removes a unit through the API: its states linger as fleet's do.
    pub(crate) fn delete_through_api(&mut self, name: &str) -> bool {
        if let Timing::Fleet(d) = self.timing {
            let now = Instant::now();
            self.ghosts.retain(|(until, _)| *until > now);
            let shown = self.before_change(name);
            if !shown.states.is_empty() {
                self.ghosts.push((now + d.destroyed, shown.states));
            }
        }
        self.delete(name)
    }
}

#[cfg(test)]
mod tests;
