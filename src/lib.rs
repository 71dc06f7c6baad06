//! fleet-broker: an SSH tunnel and access broker for CoreOS fleet clusters.
//!
//! One long-lived daemon per user keeps one agent-authenticated, host-key-pinned SSH
//! connection per named cluster and exposes each cluster's fleet API as a private local unix
//! socket. See `docs/architecture.md` for the module map and the README for the picture.

#![warn(missing_docs)]

pub mod activation;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod config_edit;
pub mod control;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod doctor;
pub mod escape;
pub(crate) mod exec;
pub mod fleet;
pub(crate) mod fleet_client;
pub(crate) mod front_door;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod http;
pub mod import;
pub mod known_hosts;
pub(crate) mod lag;
pub mod local;
pub(crate) mod memory;
pub mod notify;
pub mod passphrase;
pub(crate) mod pattern;
pub mod protocol;
pub(crate) mod proxy;
pub(crate) mod registry;
pub mod remote_command;
pub mod service;
#[cfg(feature = "demo")]
pub mod sim;
pub(crate) mod sock_diag;
pub(crate) mod throttle;
pub mod trust;
pub mod tunnel;

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
