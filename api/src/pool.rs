//! The `PodCIDRPool` kind: a pool of pod addresses the operator hands out per node.

use crate::common::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The pool's networks, the subnet size per node, and the nodes it serves.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "wgmesh.dev",
    version = "v1alpha1",
    kind = "PodCIDRPool",
    plural = "podcidrpools",
    shortname = "pcp",
    category = "wgmesh",
    status = "PodCIDRPoolStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A pool of pod addresses. The operator gives every node whose labels match nodeSelector one subnet per family from it.",
    printcolumn(name = "CIDRs", type_ = "string", json_path = ".spec.cidrs"),
    printcolumn(
        name = "IPv4/node",
        type_ = "integer",
        json_path = ".spec.nodePrefixLength.ipv4"
    ),
    printcolumn(
        name = "IPv6/node",
        type_ = "integer",
        json_path = ".spec.nodePrefixLength.ipv6"
    ),
    printcolumn(
        name = "Allocated",
        type_ = "integer",
        json_path = ".status.allocated.total"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PodCIDRPoolSpec {
    /// The pool's networks, IPv4 and/or IPv6, e.g. `10.244.0.0/17`, `fd00:10:244::/56`.
    /// They must not overlap each other or another pool.
    #[schemars(schema_with = "crate::common::nonempty_cidr_list_schema")]
    pub cidrs: Vec<String>,

    /// The prefix length of the subnet each node gets, per family, e.g. `{ipv4: 24, ipv6: 64}`.
    /// A family with CIDRs in the pool needs one.
    pub node_prefix_length: NodePrefixLength,

    /// Nodes this pool serves. Unset: every node. Lets nodes in one cloud or region draw
    /// from one pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// Per-family prefix length of the subnet each node gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePrefixLength {
    /// Prefix length of each node's IPv4 subnet, e.g. 24 (254 pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32))]
    pub ipv4: Option<u8>,
    /// Prefix length of each node's IPv6 subnet, e.g. 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 128))]
    pub ipv6: Option<u8>,
}

/// Observed state of a pool, written by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodCIDRPoolStatus {
    /// `Ready`: the pool is valid and used. `Capacity`: false when a node that should draw
    /// from the pool could not get a subnet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Node subnets handed out, per family and in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<PoolCounts>,
    /// Node subnets still free, per family (saturating at 2^63-1 for huge IPv6 pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<PoolCounts>,
}

/// Subnet counts of a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolCounts {
    /// IPv4 subnets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<i64>,
    /// IPv6 subnets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<i64>,
    /// Both families together.
    #[serde(default)]
    pub total: i64,
}
