//! fleet's v1 API as data: wire types (`schema`), unit files (`unit_file`) and fleetctl's name
//! rules (`names`). Pure: no I/O, no SSH, usable by the simulator, the CLI and tests alike; the
//! API client is `fleet_client`.

pub(crate) mod names;
pub mod schema;
pub(crate) mod target;
pub mod unit_file;
