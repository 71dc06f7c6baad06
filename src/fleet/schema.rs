//! fleet v1 wire types. Fields are declared in alphabetical order and empty values are
//! omitted, so serde_json writes exactly what fleetd writes (reference A.2, A.3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

fn is_empty_str(s: &str) -> bool {
    s.is_empty()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitOption {
    pub name: String,
    pub section: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unit {
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub current_state: String,
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub desired_state: String,
    #[serde(default, rename = "machineID", skip_serializing_if = "is_empty_str")]
    pub machine_id: String,
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<UnitOption>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitState {
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub hash: String,
    #[serde(default, rename = "machineID", skip_serializing_if = "is_empty_str")]
    pub machine_id: String,
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub name: String,
    #[serde(
        default,
        rename = "systemdActiveState",
        skip_serializing_if = "is_empty_str"
    )]
    pub active_state: String,
    #[serde(
        default,
        rename = "systemdLoadState",
        skip_serializing_if = "is_empty_str"
    )]
    pub load_state: String,
    #[serde(
        default,
        rename = "systemdSubState",
        skip_serializing_if = "is_empty_str"
    )]
    pub sub_state: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    #[serde(default, skip_serializing_if = "is_empty_str")]
    pub id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, rename = "primaryIP", skip_serializing_if = "is_empty_str")]
    pub primary_ip: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachinePage {
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
pub struct UnitPage {
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
pub struct UnitStatePage {
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
}
