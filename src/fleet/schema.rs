//! fleet v1 wire types. Fields are declared in alphabetical order and empty values are
//! omitted, so serde_json writes exactly what fleetd writes (reference A.2, A.3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

fn is_empty_str(s: &str) -> bool {
    s.is_empty()
}

/// One `Name=Value` line of a unit file's section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitOption {
    /// The option's name (`ExecStart`).
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub name: String,
    /// The section it is in (`Service`).
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub section: String,
    /// Its value (fleetd leaves an empty one out, as in `ExecStartPre=`, which empties
    /// systemd's list).
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
/// A unit in fleet's registry.
pub struct Unit {
    /// `inactive`, `loaded` or `launched`, as the scheduler last saw it.
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub current_state: String,
    /// The state asked for.
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub desired_state: String,
    /// The machine it is scheduled to (empty for global or unscheduled units).
    #[serde(default, rename = "machineID", skip_serializing_if = "is_empty_str")]
    pub machine_id: String,
    /// `name.type`.
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub name: String,
    /// The unit file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<UnitOption>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
/// What systemd on one machine reports of a unit.
pub struct UnitState {
    /// The SHA1 of the unit file the machine runs.
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub hash: String,
    /// The machine.
    #[serde(default, rename = "machineID", skip_serializing_if = "is_empty_str")]
    pub machine_id: String,
    /// The unit's name.
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub name: String,
    /// systemd's ActiveState.
    #[serde(
        default,
        rename = "systemdActiveState",
        skip_serializing_if = "is_empty_str"
    )]
    pub active_state: String,
    /// systemd's LoadState.
    #[serde(
        default,
        rename = "systemdLoadState",
        skip_serializing_if = "is_empty_str"
    )]
    pub load_state: String,
    /// systemd's SubState.
    #[serde(
        default,
        rename = "systemdSubState",
        skip_serializing_if = "is_empty_str"
    )]
    pub sub_state: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
/// A machine of the cluster.
pub struct Machine {
    /// The machine ID (32 hex digits).
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub id: String,
    /// `key=value` metadata from fleetd's config.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The address fleetd reports; never dialled unless it is an IP address.
    #[serde(default, rename = "primaryIP", skip_serializing_if = "is_empty_str")]
    pub primary_ip: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MachinePage {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<Machine>,
    #[serde(
        default,
        rename = "nextPageToken",
        skip_serializing_if = "is_empty_str"
    )]
    pub next_page_token: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UnitPage {
    #[serde(
        default,
        rename = "nextPageToken",
        skip_serializing_if = "is_empty_str"
    )]
    pub next_page_token: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Unit>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UnitStatePage {
    #[serde(
        default,
        rename = "nextPageToken",
        skip_serializing_if = "is_empty_str"
    )]
    pub next_page_token: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<UnitState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_fields_are_omitted_and_keys_sorted() {
        let p = UnitPage::default();
        assert_eq!(serde_json::to_string(&p).unwrap(), "{}");
        let m = MachinePage {
            machines: vec![Machine {
                id: "85c0c5951d6b4f3aa2b8c9d0e1f2a3b4".into(),
                metadata: BTreeMap::new(),
                primary_ip: "172.17.8.102".into(),
            }],
            next_page_token: "AgACAA==".into(),
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"machines":[{"id":"85c0c5951d6b4f3aa2b8c9d0e1f2a3b4","primaryIP":"172.17.8.102"}],"nextPageToken":"AgACAA=="}"#
        );
    }

    /// fleetd leaves out every empty field, an option's empty value too.
    #[test]
    fn an_option_without_its_empty_value_reads_and_writes_as_fleetds() {
        let wire = r#"{"name":"ExecStartPre","section":"Service"}"#;
        let o: UnitOption = serde_json::from_str(wire).expect("fleetd's option reads");
        assert_eq!(o.value, "");
        assert_eq!(serde_json::to_string(&o).expect("writes"), wire);
    }
}
