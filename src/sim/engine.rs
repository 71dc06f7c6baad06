//! The simulated cluster: machines, units, scheduling and the derived unit states.

use std::collections::BTreeMap;

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
        }
    }

    /// The machines, by ID.
    pub fn machines(&self) -> &[Machine] {
        &self.machines
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
        let current = if global {
            if item {
                String::new()
            } else {
                "inactive".into()
            }
        } else {
            u.current.clone()
        };
        Unit {
            current_state: current,
            desired_state: u.desired.clone(),
            machine_id: if global {
                String::new()
            } else {
                u.machine.clone().unwrap_or_default()
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
            if let Some((_, id)) = candidates.into_iter().next() {
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
        let mut out = Vec::new();
        if self.systemd_silent {
            return out;
        }
        let state = |name: &str, u: &SimUnit, machine: &str| {
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
        for (name, u) in &self.units {
            if u.desired == "inactive" {
                continue;
            }
            if is_global(&u.options) {
                for m in &self.machines {
                    let conflict = self.units_on(&m.id).iter().any(|o| self.conflicts(name, o));
                    if self.machine_ok_metadata(m, name) && !conflict {
                        out.push(state(name, u, &m.id));
                    }
                }
            } else if let Some(m) = &u.machine {
                out.push(state(name, u, m));
            }
        }
        out.sort_by(|a, b| (&a.name, &a.machine_id).cmp(&(&b.name, &b.machine_id)));
        out
    }
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
    fn least_loaded_scheduling_with_metadata_and_conflicts() {
        let mut sim = Sim::new(demo_machines());
        sim.put(
            "a.service",
            vec![opt("Service", "ExecStart", "/bin/true")],
            "launched".into(),
        );
        sim.put(
            "b.service",
            vec![opt("Service", "ExecStart", "/bin/true")],
            "launched".into(),
        );
        let a = sim.unit("a.service").unwrap();
        let b = sim.unit("b.service").unwrap();
        assert_eq!(a.machine_id, "113f16a7b8a94d0e9e4a2b1c3d5e7f90");
        assert_eq!(b.machine_id, "85c0c5951d6b4f3aa2b8c9d0e1f2a3b4");
        assert_eq!(a.current_state, "launched");
        sim.put(
            "web.service",
            vec![opt("X-Fleet", "MachineMetadata", "role=web")],
            "loaded".into(),
        );
        assert_eq!(
            sim.unit("web.service").unwrap().machine_id,
            "113f16a7b8a94d0e9e4a2b1c3d5e7f90"
        );
        sim.put(
            "c.service",
            vec![opt("X-Fleet", "Conflicts", "*.service")],
            "launched".into(),
        );
        // Every machine that has a unit conflicts; the empty one takes it.
        assert_eq!(
            sim.unit("c.service").unwrap().machine_id,
            "e793afb9c3d14e5f8a6b7c8d9e0f1a2b"
        );
        sim.put(
            "d.service",
            vec![opt("X-Fleet", "MachineID", "nope")],
            "launched".into(),
        );
        let d = sim.unit("d.service").unwrap();
        assert_eq!(d.current_state, "inactive");
        assert!(d.machine_id.is_empty());
    }

    #[test]
    fn global_units_have_a_state_per_machine() {
        let mut sim = Sim::new(demo_machines());
        sim.put(
            "g.service",
            vec![opt("X-Fleet", "Global", "true")],
            "launched".into(),
        );
        assert_eq!(sim.states().len(), 3);
        assert_eq!(sim.unit("g.service").unwrap().current_state, "");
        assert_eq!(sim.units()[0].current_state, "inactive");
    }
}
