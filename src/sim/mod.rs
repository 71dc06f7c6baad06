//! A fleet API simulator: fleet's v1 HTTP API as reference section A gives it, over
//! simulated machines with a least-loaded scheduler (section D) and simulated systemd
//! states. It serves a unix socket; tests put it behind a real sshd, and `fleet-broker demo`
//! behind an in-process SSH server. It writes responses as fleetd's Go net/http does (or as
//! another server does, [`WritePattern`]).

mod api;
mod engine;
mod go_json;
mod wire;

pub use api::{serve, serve_tcp};
pub use engine::{demo_machines, FleetDelays, Sim, Timing};
pub use wire::WritePattern;
