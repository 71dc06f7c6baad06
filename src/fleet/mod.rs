//! fleet's v1 API as data: wire types (`schema`) and unit files (`unit_file`). Pure: no I/O,
//! no SSH, usable by the simulator, the CLI and tests alike.

pub mod client;
pub mod schema;
pub mod unit_file;
