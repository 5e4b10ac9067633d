//! The `Mesh` kind: network-wide settings, normally one object named `default`.

use crate::common::{Condition, duration_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Desired network-wide settings. Every field is optional; unset fields take the defaults
/// documented on them.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "wgmesh.dev",
    version = "v1alpha1",
    kind = "Mesh",
    plural = "meshes",
    shortname = "wgm",
    category = "wgmesh",
    status = "MeshStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Network-wide settings of the wgmesh overlay. Components read the object named `default`.",
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.listenPort"),
    printcolumn(name = "MTU", type_ = "string", json_path = ".spec.mtu"),
    printcolumn(
        name = "Host-GW",
        type_ = "string",
        json_path = ".spec.transport.hostGateway"
    ),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodesReady"),
    printcolumn(name = "Peers", type_ = "integer", json_path = ".status.peersReady"),
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
pub struct MeshSpec {
    /// UDP port every node's WireGuard device listens on. Default 51820.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: Option<u16>,

    /// MTU of the WireGuard interface and of pod interfaces: `auto` (the default: the
    /// underlay interface's MTU minus 60 bytes for IPv4 endpoints or 80 for IPv6) or a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "mtu_schema")]
    pub mtu: Option<Mtu>,

    /// Which peers may be reached without WireGuard. Default: none, ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,

    /// Seconds between keepalive packets to each peer (0 turns them off). Needed only for
    /// nodes behind NAT. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub persistent_keepalive: Option<u16>,

    /// Where pod subnets come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Ipam>,

    /// Masquerade pod traffic leaving the mesh (to destinations outside every pod pool)
    /// behind the node's address. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<bool>,

    /// Which of a Node's addresses it publishes as its WireGuard endpoint: `InternalIP`
    /// (default) or `ExternalIP`. A node's `wgmesh.dev/endpoint` annotation overrides both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_address_type: Option<EndpointAddressType>,

    /// Key rotation policy for every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rotation: Option<MeshKeyRotation>,

    /// Locations, NAT traversal and relays: how nodes in different clouds and data centres
    /// reach each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<MeshTopology>,

    /// What external peers (`MeshPeer`s that are not nodes) may claim. Default: nothing, so
    /// no external peer is routed until a cluster admin names the ranges it may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_peers: Option<ExternalPeers>,
}

/// How nodes across locations reach each other.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshTopology {
    /// The node label whose value is a node's location. Nodes of one location reach each
    /// other at their `endpoint` (by default their `InternalIP`); nodes of different
    /// locations at a public endpoint, or through NAT. Nodes without the label share one
    /// location. Default `topology.kubernetes.io/region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub location_label: Option<String>,

    /// Seconds between keepalives on paths that cross a NAT (a node behind NAT sends them to
    /// its peers in other locations, so its mappings stay open). Nowhere else. 0 turns them
    /// off. Default 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub nat_keepalive: Option<u16>,

    /// `Auto` (default): two nodes behind NAT that cannot reach each other directly (a
    /// symmetric NAT on either side) send through a public node both reach, chosen per pair.
    /// `Never`: they do not reach each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayPolicy>,
}

/// Whether pairs of nodes that cannot reach each other go through a relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RelayPolicy {
    #[default]
    Auto,
    Never,
}

/// The address space open to external peers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPeers {
    /// Ranges an external peer's `allowedIPs` must lie inside, e.g. `192.168.50.0/24` for a
    /// site's LAN or `100.64.7.0/24` for laptops. Every allowed IP outside all of them is
    /// refused (condition `Ready=False`, reason `AllowedIPsOutsideMeshRanges`) and nothing of
    /// that peer is routed. Empty (default): external peers may claim nothing. Pod pools, node
    /// pod subnets, default routes and node endpoints stay refused even inside these ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::cidr_list_schema")]
    pub allowed_ranges: Vec<String>,
}

/// The MTU setting: `auto` or a number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Mtu {
    /// Exactly this many bytes.
    Bytes(u16),
    /// Derived from the underlay interface.
    Auto(MtuAuto),
}

/// The single string value `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MtuAuto {
    #[serde(rename = "auto")]
    Auto,
}

/// An int-or-string: the integer bounds apply to numbers only and the pattern to strings
/// only, which is how a structural schema can say "`auto` or 576–65535".
fn mtu_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        "nullable": true,
        "description": "`auto` or a number of bytes (576-65535; at least 1280 when pods use IPv6).",
        "minimum": 576,
        "maximum": 65535,
        "pattern": "^auto$"
    })
}

/// Which peers, if any, are routed in the clear ("host-gw") instead of through WireGuard.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transport {
    /// `Never` (default): every packet between nodes goes through WireGuard.
    /// `OnLink`: peers whose node address is on the same L2 segment (no gateway between
    /// them) and inside `hostGatewaySubnets` are routed directly, unencrypted.
    /// `Fallback`: WireGuard for every peer, but when a node's device cannot come up, its
    /// on-link peers inside `hostGatewaySubnets` are routed directly; reported loudly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_gateway: Option<HostGateway>,

    /// Underlay networks trusted enough for plaintext. A peer qualifies for host-gw only if
    /// both node addresses are inside one of these. Empty means every on-link peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::cidr_list_schema")]
    pub host_gateway_subnets: Vec<String>,
}

/// When plaintext routing between on-link nodes is allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HostGateway {
    #[default]
    Never,
    OnLink,
    Fallback,
}

/// Where pod subnets come from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ipam {
    /// `Pools` (default): allocate from `PodCIDRPool`s. `NodeSpec`: use a Node's
    /// `spec.podCIDRs` (kube-controller-manager `--allocate-node-cidrs`) when it has them,
    /// and fall back to the pools when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<IpamSource>,

    /// How long a deleted node's subnets stay reserved, so a node that re-registers keeps
    /// them. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema")]
    pub release_grace_period: Option<String>,
}

/// Source of pod subnets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IpamSource {
    #[default]
    Pools,
    NodeSpec,
}

/// Node address published as the WireGuard endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EndpointAddressType {
    #[default]
    InternalIP,
    ExternalIP,
}

/// Key rotation for every node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshKeyRotation {
    /// Rotate every node whose key was created before this instant (RFC 3339). Setting it
    /// to now rotates every key in the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<Time>,

    /// Make the rotations `requestedAt` asks for emergency revocations (as
    /// `MeshPeer.spec.keyRotation.revoke`, for every node): when a node's rotation
    /// completes, it stops answering its old key at once, with no `externalGracePeriod`, and
    /// every key it retired before. External peers still on an old key lose the node until
    /// they are given its new one. Revocations still wait for a slot (`maxConcurrent`), but
    /// go before ordinary rotations. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke: Option<bool>,

    /// Rotate each key when it gets this old (with jitter), e.g. `720h`. Unset: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema")]
    pub interval: Option<String>,

    /// How many nodes may rotate at once. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<u32>,

    /// How long a node keeps answering under its old key after a rotation, for external
    /// peers and for node peers that had not moved to the new key when it completed (its
    /// laggards: their agent stopped, or they could not reach the API). Default `24h`. Node
    /// peers that moved need no grace. A revocation (`revoke`) gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema")]
    pub external_grace_period: Option<String>,

    /// How long a rotating node waits for every peer to install its next key before it
    /// switches anyway, naming the laggards. Default `2m`. Counted only while the node's
    /// agent reaches the API server: an outage pauses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema")]
    pub acknowledge_timeout: Option<String>,

    /// How long a rotating node waits, after switching, for every peer to move its traffic
    /// to the next key before it retires the old one, naming the laggards. Default `2m`.
    /// Counted only while the node's agent reaches the API server: an outage pauses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema")]
    pub move_timeout: Option<String>,
}

/// Observed state of the mesh, written by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// `Ready`: the settings are valid and in force.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Node peers in the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Node peers that are `Ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_ready: Option<u32>,
    /// External peers in the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<u32>,
    /// External peers that are `Ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_ready: Option<u32>,
}
