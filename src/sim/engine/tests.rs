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

fn started(delays: FleetDelays) -> Sim {
    let mut sim = Sim::new(demo_machines());
    sim.timing = Timing::Fleet(delays);
    sim.put(
        "a.service",
        vec![opt("Service", "ExecStart", "/bin/true")],
        "loaded".into(),
    );
    let before = sim.before_change("a.service");
    sim.set_desired("a.service", "launched");
    sim.changed("a.service", before);
    sim
}

/// Right after `start` through the API, fleet still shows what was; once its delays
/// have passed, the new state. (Delays of an hour and of nothing: no clock is waited on.)
#[test]
fn with_fleet_timing_a_change_shows_only_after_fleets_delays() {
    let hour = Duration::from_secs(3600);
    let slow = started(FleetDelays {
        new_state: hour,
        machine: hour,
        launched: hour,
        stopped: hour,
        systemd: hour,
        global: hour,
        destroyed: hour,
    });
    let u = slow.unit("a.service").unwrap();
    assert_eq!(u.current_state, "loaded");
    assert_eq!(u.desired_state, "launched");
    let states = slow.states();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].active_state, "inactive");
    let zero = Duration::ZERO;
    let fast = started(FleetDelays {
        new_state: zero,
        machine: zero,
        launched: zero,
        stopped: zero,
        systemd: zero,
        global: zero,
        destroyed: zero,
    });
    assert_eq!(fast.unit("a.service").unwrap().current_state, "launched");
    assert_eq!(fast.states()[0].active_state, "active");
    // A new unit has no state at first; a destroyed one's states linger.
    let mut slow = slow;
    let before = slow.before_change("n.service");
    slow.put(
        "n.service",
        vec![opt("Service", "ExecStart", "/bin/true")],
        "inactive".into(),
    );
    slow.changed("n.service", before);
    assert_eq!(slow.unit("n.service").unwrap().current_state, "");
    assert!(slow.delete_through_api("a.service"));
    assert!(slow.unit("a.service").is_none());
    assert_eq!(slow.states().len(), 1, "{:?}", slow.states());
}
