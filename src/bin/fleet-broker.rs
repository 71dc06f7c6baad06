//! `fleet-broker`: the daemon and its operator commands (`fleet_broker::admin`).

fn main() -> std::process::ExitCode {
    fleet_broker::admin::main()
}
