//! The wgmesh API: custom resources of group `wgmesh.dev`, version `v1alpha1`, and the
//! constants every component agrees on (field managers, labels, condition types).
//!
//! This crate owns the wire format only. It holds no logic beyond serde and schema
//! generation: validation semantics live in `wgmesh-core`, reconciliation in the operator
//! and the agent. `crds/` is generated from these types by the `crdgen` binary.

// `#[kube(printcolumn(type_ = ..))]` repeats keys per column by design; clippy reads the
// repetition as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod common;
pub mod consts;
pub mod mesh;
pub mod peer;
pub mod pool;
pub mod report;

pub use common::{Condition, ConditionStatus};
pub use mesh::{Mesh, MeshSpec, MeshStatus};
pub use peer::{MeshPeer, MeshPeerSpec, MeshPeerStatus};
pub use pool::{PodCIDRPool, PodCIDRPoolSpec, PodCIDRPoolStatus};
pub use report::{MeshPeerReport, MeshPeerReportSpec};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// All custom resource definitions of the API, in the order they are written to `crds/`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        Mesh::crd(),
        PodCIDRPool::crd(),
        MeshPeer::crd(),
        MeshPeerReport::crd(),
    ]
    .into_iter()
    .map(portable)
    .map(bounded)
    .collect()
}

/// The `maxItems` of every list, by kind and path in the schema (`[]` steps into items).
/// One table, so a list cannot be added without a bound: a test fails on any list missing
/// here.
const MAX_ITEMS: &[(&str, &str, u64)] = {
    use consts::limits::*;
    &[
        ("Mesh", ".spec.transport.hostGatewaySubnets", MESH_RANGES),
        ("Mesh", ".spec.externalPeers.allowedRanges", MESH_RANGES),
        ("Mesh", ".status.conditions", CONDITIONS),
        ("MeshPeer", ".spec.allowedIPs", ALLOWED_IPS),
        ("MeshPeer", ".spec.podCIDRs", POD_CIDRS),
        ("MeshPeer", ".status.approved.allowedIPs", ALLOWED_IPS),
        ("MeshPeer", ".status.conditions", CONDITIONS),
        ("MeshPeer", ".status.endpoints", ENDPOINTS),
        ("MeshPeer", ".status.publicEndpoints", ENDPOINTS),
        ("MeshPeer", ".status.approved.publicEndpoints", ENDPOINTS),
        ("MeshPeer", ".status.installedKeys", PEERS),
        ("MeshPeer", ".status.rotation.externalPeersOnOldKey", PEERS),
        ("MeshPeer", ".status.rotation.laggards", PEERS),
        ("MeshPeer", ".status.rotation.waitingFor", PEERS),
        ("MeshPeerReport", ".spec.paths", PEERS),
        ("PodCIDRPool", ".spec.cidrs", POOL_CIDRS),
        (
            "PodCIDRPool",
            ".spec.nodeSelector.matchExpressions",
            SELECTOR_EXPRESSIONS,
        ),
        (
            "PodCIDRPool",
            ".spec.nodeSelector.matchExpressions[].values",
            SELECTOR_VALUES,
        ),
        ("PodCIDRPool", ".status.conditions", CONDITIONS),
    ]
};

/// Sets `maxItems` on every list named in [`MAX_ITEMS`].
fn bounded(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let kind = crd.spec.names.kind.clone();
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    if let Some(versions) = value
        .pointer_mut("/spec/versions")
        .and_then(|v| v.as_array_mut())
    {
        for version in versions {
            if let Some(schema) = version.pointer_mut("/schema/openAPIV3Schema") {
                for_each_array(schema, String::new(), &mut |path, array| {
                    if let Some((_, _, max)) =
                        MAX_ITEMS.iter().find(|(k, p, _)| *k == kind && *p == path)
                    {
                        array.insert("maxItems".into(), (*max).into());
                    }
                });
            }
        }
    }
    serde_json::from_value(value).unwrap_or(crd)
}

/// Calls `f` with the path and schema of every array in `schema`.
fn for_each_array(
    schema: &mut serde_json::Value,
    path: String,
    f: &mut dyn FnMut(&str, &mut serde_json::Map<String, serde_json::Value>),
) {
    let Some(map) = schema.as_object_mut() else {
        return;
    };
    if map.get("type").and_then(|t| t.as_str()) == Some("array") {
        f(&path, map);
    }
    if let Some(props) = map.get_mut("properties").and_then(|p| p.as_object_mut()) {
        for (name, sub) in props {
            for_each_array(sub, format!("{path}.{name}"), f);
        }
    }
    if let Some(items) = map.get_mut("items") {
        for_each_array(items, format!("{path}[]"), f);
    }
}

/// Makes a generated definition acceptable to older API servers and clients: optional enums
/// come out of schema generation with `null` among their values (beside `nullable: true`),
/// which kubectl's validation against a 1.20 server refuses. `nullable` alone says it.
fn portable(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                    values.retain(|e| !e.is_null());
                }
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    strip(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

/// The file name under `crds/` for a definition: `<plural>.<group>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// Renders one definition as the YAML checked in under `crds/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(crd)?;
    Ok(format!(
        "# Generated by `cargo run -p wgmesh-api --bin crdgen`. Do not edit by hand.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every list in every kind has a bound: an unbounded list lets one object add without
    /// limit to what every node does.
    #[test]
    fn every_list_has_max_items() {
        let mut unbounded = Vec::new();
        for crd in crds() {
            let kind = crd.spec.names.kind.clone();
            let mut value = serde_json::to_value(&crd).expect("a CRD serializes");
            let schema = value
                .pointer_mut("/spec/versions/0/schema/openAPIV3Schema")
                .expect("a schema");
            for_each_array(schema, String::new(), &mut |path, array| {
                if !array.contains_key("maxItems") {
                    unbounded.push(format!("{kind}{path}"));
                }
            });
        }
        assert!(
            unbounded.is_empty(),
            "lists without maxItems: {unbounded:?}"
        );
    }
}
