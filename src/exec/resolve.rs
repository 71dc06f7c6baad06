//! Target resolution: which machine (or the tunnel host) a session runs on, from the
//! cluster's fleet API, with fleetctl's messages.

use crate::fleet_client::ApiError;
use crate::protocol::exec::{ExecError, ExecTarget};

use super::{Exec, LOOKUP_TIMEOUT};

/// A resolved target.
#[derive(Debug, Clone)]
pub(super) enum Place {
    Tunnel,
    Machine { id: String, ip: String },
}

/// A machine as a place to dial. Its `primaryIP` comes from the fleet API, which anyone who
/// can write to the cluster's etcd controls: only an IP address is dialled, never a name or a
/// pattern that a known_hosts entry or the tunnel host's resolver would read differently. A
/// machine without one gets fleetctl's "Could not determine address of machine.".
fn machine_place(m: &crate::fleet::schema::Machine) -> Place {
    let ip = match m.primary_ip.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => {
            if !m.primary_ip.is_empty() {
                tracing::warn!(machine = %crate::escape::display(&m.id), primary_ip = ?m.primary_ip, "the fleet API reports a primaryIP that is not an IP address; not dialling it");
            }
            String::new()
        }
    };
    Place::Machine {
        id: m.id.clone(),
        ip,
    }
}

impl Exec {
    pub(super) async fn resolve(&self, target: &ExecTarget) -> Result<Place, ExecError> {
        let cfg = &self.tunnel.config;
        let is_tunnel_name = |s: &str| s == cfg.tunnel.host || s == cfg.tunnel.to_string();
        if let ExecTarget::TunnelHost = target {
            return Ok(Place::Tunnel);
        }
        if let ExecTarget::Auto(s) | ExecTarget::Machine(s) = target {
            if is_tunnel_name(s) {
                return Ok(Place::Tunnel);
            }
        }
        let api = &self.api;
        // A unit target needs the unit and the machine list; both are asked at once.
        let unit_name = match target {
            ExecTarget::Unit(name) | ExecTarget::ScheduledUnit(name) => Some(name.clone()),
            ExecTarget::Auto(s) => Some(crate::fleet::names::unit_name_mangle(s)),
            _ => None,
        };
        let lookups = async {
            tokio::join!(self.machines(), async {
                match &unit_name {
                    Some(name) => Some(api.unit(name).await),
                    None => None,
                }
            })
        };
        let cluster = self.tunnel.name();
        let (machines, unit) = tokio::time::timeout(LOOKUP_TIMEOUT, lookups)
            .await
            .map_err(|_| {
                ExecError::resolve(format!(
                    "cluster {cluster:?}: the fleet API did not answer within {}",
                    humantime::format_duration(LOOKUP_TIMEOUT)
                ))
            })?;
        // An answer too large for any fleetd says so with the cluster's name.
        let named = |e: ApiError| match e {
            e @ ApiError::TooLarge { .. } => {
                ExecError::resolve(format!("cluster {cluster:?}: {e}"))
            }
            e => ExecError::resolve(e.to_string()),
        };
        let machines = machines.map_err(named)?;
        if let Some(Err(e @ ApiError::TooLarge { .. })) = &unit {
            return Err(named(e.clone()));
        }
        use crate::fleet::target::{find, Wanted};
        let wanted = match target {
            ExecTarget::Machine(prefix) => Wanted::Machine(prefix),
            ExecTarget::Unit(_) | ExecTarget::ScheduledUnit(_) => Wanted::Unit,
            ExecTarget::Auto(s) => Wanted::Auto(s),
            ExecTarget::TunnelHost => return Ok(Place::Tunnel),
        };
        let unit = match (wanted, unit) {
            // A unit that cannot be read is an error for `--unit`, and no match for a
            // positional argument.
            (Wanted::Unit, Some(u)) => u.map_err(|e| ExecError::resolve(e.to_string()))?,
            (_, Some(u)) => u.ok().flatten(),
            (_, None) => None,
        };
        if let (ExecTarget::ScheduledUnit(name), Some(u)) = (target, &unit) {
            let global = crate::fleet::unit_file::is_global(&u.options);
            if !global && (u.current_state == "inactive" || u.machine_id.is_empty()) {
                return Err(ExecError::resolve(format!(
                    "unit {} is not scheduled to a machine",
                    crate::escape::display(name)
                )));
            }
        }
        let place = find(wanted, &machines, unit.as_ref())
            .map(machine_place)
            .map_err(|e| ExecError::resolve(e.to_string()))?;
        if let Place::Machine { ip, .. } = &place {
            if ip.is_empty() {
                return Err(ExecError::resolve(
                    "Could not determine address of machine.",
                ));
            }
        }
        Ok(place)
    }
}
