//! The `MeshPeer` kind: one member of the mesh, a node (made by the operator, named after
//! the node) or an external machine a user adds (a laptop, a VM, another site).

use crate::common::{Condition, conditions_schema, endpoint_schema, key_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A peer's identity and addresses: `node` and `podCIDRs` for node peers (written by the
/// operator), `publicKey`, `allowedIPs` and `endpoint` for external peers (written by users).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "wgmesh.dev",
    version = "v1alpha1",
    kind = "MeshPeer",
    plural = "meshpeers",
    shortname = "mp",
    shortname = "mpeer",
    category = "wgmesh",
    status = "MeshPeerStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "One member of the mesh: a node (created by the operator, named after the node) or an external machine a user adds.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Pod CIDRs", type_ = "string", json_path = ".spec.podCIDRs"),
    printcolumn(
        name = "Key",
        type_ = "string",
        json_path = ".status.approved.publicKeyPrefix"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.approved.endpoint"
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
    ),
    printcolumn(
        name = "Location",
        type_ = "string",
        json_path = ".status.approved.location",
        priority = "1"
    ),
    printcolumn(
        name = "NAT",
        type_ = "string",
        json_path = ".status.approved.nat",
        priority = "1"
    ),
    printcolumn(
        name = "Allowed IPs",
        type_ = "string",
        json_path = ".spec.allowedIPs",
        priority = "1"
    ),
    printcolumn(
        name = "Generation",
        type_ = "integer",
        json_path = ".status.keyGeneration",
        priority = "1"
    ),
    printcolumn(
        name = "Rotation",
        type_ = "string",
        json_path = ".status.rotation.phase",
        priority = "1"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPeerSpec {
    /// The node this peer stands for. Set by the operator on node peers; empty on external
    /// peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,

    /// External peers: the peer's WireGuard public key. Node peers publish theirs in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "key_schema")]
    pub public_key: Option<String>,

    /// External peers: the addresses routed to this peer. They must not overlap any pod
    /// pool, any node's pod subnet or another peer's addresses.
    #[serde(default, rename = "allowedIPs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::cidr_list_schema")]
    pub allowed_ips: Vec<String>,

    /// External peers: the peer's UDP endpoint `ip:port`. Optional for a roaming peer,
    /// which is then reached once it has sent a packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "endpoint_schema")]
    pub endpoint: Option<String>,

    /// Seconds between keepalives the nodes send to this peer; 0 or unset: the mesh's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub persistent_keepalive: Option<u16>,

    /// Node peers: the pod subnets allocated to the node, one per family. Written by the
    /// operator; an allocation never moves while the node exists.
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::cidr_list_schema")]
    pub pod_cidrs: Vec<String>,

    /// Key rotation request for this peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rotation: Option<PeerKeyRotation>,
}

impl MeshPeer {
    /// The owner reference that makes this a node's peer: to the Node named in `spec.node`.
    /// The operator sets it when it makes the peer; a peer is that Node's only while the
    /// reference's uid is the Node's (a Node of the same name made later is another node).
    pub fn node_owner(&self) -> Option<&OwnerReference> {
        let node = self.spec.node.as_deref()?;
        self.metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "Node" && o.name == node)
    }
}

/// A request to rotate one node's key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerKeyRotation {
    /// Rotate the node's key if it was created before this instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<Time>,

    /// Make the rotation `requestedAt` asks for an emergency revocation, for a key that may
    /// be compromised: when the rotation completes, the node stops answering its old key at
    /// once, with no `externalGracePeriod`, and stops answering every key it retired before
    /// it too. Node peers move to the new key without losing traffic, as in any rotation;
    /// external peers still configured with an old key lose the node until they are given
    /// the new one. The grant's reason is then `Revoke`. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke: Option<bool>,
}

/// Observed state of a peer. The node's agent writes what it publishes (keys, endpoints,
/// device conditions); the operator writes what it approved and the `Ready` verdict.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshPeerStatus {
    /// Operator: `Ready`, `Allocated`, `Rotating`. Agent: `KeyPublished`, `DeviceUp`,
    /// `RoutesInstalled`, `PlaintextFallback`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// Agent: the node's current public key. The private half never leaves the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "key_schema")]
    pub public_key: Option<String>,

    /// Agent: the node's next public key while a rotation is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "key_schema")]
    pub next_public_key: Option<String>,

    /// Agent: how many times the node's key has been rotated; 0 for the first key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub key_generation: Option<i64>,

    /// Agent: when the current key was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_created_at: Option<Time>,

    /// Agent: the node's WireGuard endpoints, `ip:port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::endpoint_list_schema")]
    pub endpoints: Vec<String>,

    /// Agent: the node's public WireGuard endpoints, `ip:port`, where nodes in other
    /// locations reach it: the `wgmesh.dev/public-endpoint` annotation, else the Node's
    /// `ExternalIP` addresses. Empty for a node behind NAT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::endpoint_list_schema")]
    pub public_endpoints: Vec<String>,

    /// Agent: the underlay MTU of the node (that of the link its endpoint is on), which
    /// peers take into account for the MTU of paths to it.
    #[serde(
        default,
        rename = "underlayMTU",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 576, max = 65535))]
    pub underlay_mtu: Option<u32>,

    /// Operator: the key, addresses and endpoint agents configure for this peer. Agents use
    /// these and never what a peer claims for itself in spec or status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<ApprovedPeer>,

    /// Operator: the `metadata.generation` the approval describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Operator: this node may rotate its key now (it is due, and within the mesh's
    /// `maxConcurrent`). Stale once the node's `keyGeneration` passes `generation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_grant: Option<RotationGrant>,

    /// Agent: the node's own key rotation: the phase it is in, or how the last one ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<KeyRotationStatus>,

    /// Agent: the key generation this node has installed for each peer that is rotating
    /// (only those, so the list stays short): a rotating node's acknowledgements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub installed_keys: Vec<InstalledKey>,
}

/// The operator's permission for one node to rotate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationGrant {
    /// The key generation to rotate away from.
    pub generation: i64,
    /// When the grant was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_at: Option<Time>,
    /// Why: `Revoke` (a request of this peer's or the `Mesh`'s `spec.keyRotation` with
    /// `revoke: true`: the old key stops being answered when the rotation completes),
    /// `NodeRequest` (this peer's `spec.keyRotation`), `MeshRequest` (the `Mesh`'s), or
    /// `Interval` (the key reached the mesh's rotation interval).
    pub reason: GrantReason,
}

/// Why a node may rotate its key: a rotation grant's `reason`, which is also the `Rotating`
/// condition's reason while the grant is in force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum GrantReason {
    /// A request with `revoke: true` (the peer's or the `Mesh`'s): when the rotation
    /// completes, no earlier key of the node is answered.
    Revoke,
    /// The peer's own `spec.keyRotation.requestedAt`.
    #[default]
    NodeRequest,
    /// The `Mesh`'s `spec.keyRotation.requestedAt`.
    MeshRequest,
    /// The key reached the `Mesh`'s `spec.keyRotation.interval`.
    Interval,
}

impl GrantReason {
    /// The name as written in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantReason::Revoke => "Revoke",
            GrantReason::NodeRequest => "NodeRequest",
            GrantReason::MeshRequest => "MeshRequest",
            GrantReason::Interval => "Interval",
        }
    }
}

/// Where a node's own rotation is (`status.rotation.phase`), as its agent reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RotationPhase {
    /// The next key is published; peers are installing it.
    #[default]
    Prepared,
    /// The node initiates with the next key and still answers under the old one.
    Switched,
    /// The old key is retired (the last rotation's outcome).
    Completed,
    /// The next key was never approved and was discarded; the node stays on its key.
    Abandoned,
}

impl RotationPhase {
    /// The name as written in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationPhase::Prepared => "Prepared",
            RotationPhase::Switched => "Switched",
            RotationPhase::Completed => "Completed",
            RotationPhase::Abandoned => "Abandoned",
        }
    }
}

/// The reasons of a node peer's `Rotating` condition (owned by the operator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotatingReason {
    /// A grant is in force, for this reason (the condition is True).
    Granted(GrantReason),
    /// Due, waiting for a slot (`maxConcurrent`).
    Queued,
    /// The last rotation was abandoned.
    Abandoned,
    /// The last rotation completed as a revocation.
    Revoked,
    /// The last rotation completed without some peers.
    CompletedWithLaggards,
    /// The last rotation completed.
    Completed,
    /// No rotation requested.
    Idle,
}

impl RotatingReason {
    /// The condition's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            RotatingReason::Granted(g) => g.as_str(),
            RotatingReason::Queued => "Queued",
            RotatingReason::Abandoned => "Abandoned",
            RotatingReason::Revoked => "Revoked",
            RotatingReason::CompletedWithLaggards => "CompletedWithLaggards",
            RotatingReason::Completed => "Completed",
            RotatingReason::Idle => "Idle",
        }
    }
}

/// Where a node's own rotation is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationStatus {
    /// `Prepared` (the next key is published, peers are installing it), `Switched` (the
    /// node initiates with the next key and still answers under the old one), `Completed`
    /// (the old key is retired) or `Abandoned` (the next key was never approved).
    pub phase: RotationPhase,
    /// The generation being rotated away from; after `Completed`, the new generation.
    #[serde(default)]
    pub generation: i64,
    /// When the rotation started (the next key was generated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the current phase began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Peers that have not yet installed the next key (`Prepared`) or moved to it
    /// (`Switched`); after `Completed`, the peers the rotation went on without.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// After `Completed`: peers that never acknowledged or never moved before the timeouts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub laggards: Vec<String>,
    /// Until when the node answers handshakes under its previous key, for external peers
    /// that cannot learn the new one by themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_key_answered_until: Option<Time>,
    /// External peers whose latest session with this node is still under the previous key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_peers_on_old_key: Vec<String>,
    /// The rotation (after `Completed`, the last one) is a revocation: at completion the
    /// old key, and every key retired before it, stopped being answered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoke: bool,
}

/// One peer's key generation as installed on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstalledKey {
    /// The peer's name.
    pub peer: String,
    /// The generation of the peer's next key this node installed.
    pub generation: i64,
    /// That key: an acknowledgement is for one key, never for whatever key has the
    /// generation.
    #[schemars(schema_with = "crate::common::key_schema")]
    pub public_key: String,
}

/// What the operator approved for a peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovedPeer {
    /// The public key agents accept from this peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "key_schema")]
    pub public_key: Option<String>,
    /// The first characters of `publicKey`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_prefix: Option<String>,
    /// During a rotation: the next key, accepted alongside `publicKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "key_schema")]
    pub next_public_key: Option<String>,
    /// The key generation approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_generation: Option<i64>,
    /// The addresses routed to this peer: a node's pod subnets, or an external peer's
    /// validated allowed IPs.
    #[serde(default, rename = "allowedIPs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::cidr_list_schema")]
    pub allowed_ips: Vec<String>,
    /// The endpoint agents send to first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "endpoint_schema")]
    pub endpoint: Option<String>,
    /// The keepalive interval agents configure for this peer, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    /// Node peers: the node's location (the value of the mesh's location label on the Node).
    /// Nodes of one location reach each other at `endpoint`; others at a public endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Node peers: where nodes in other locations reach it (validated from
    /// `status.publicEndpoints`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::endpoint_list_schema")]
    pub public_endpoints: Vec<String>,
    /// Node peers: whether the node is behind NAT, and of which kind, as public nodes in
    /// other locations see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatKind>,
    /// Node peers behind an endpoint-independent NAT: the address and port the NAT maps the
    /// node to, learned from the packets public nodes receive from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "endpoint_schema")]
    pub mapped_endpoint: Option<String>,
    /// Node peers: the node's underlay MTU, as it reported it.
    #[serde(
        default,
        rename = "underlayMTU",
        skip_serializing_if = "Option::is_none"
    )]
    pub underlay_mtu: Option<u32>,
}

/// How a node reaches one peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerPath {
    /// The peer's `MeshPeer` name.
    pub peer: String,
    /// `Direct`, `HostGateway`, `NATTraversal` or `Relay` (through `via`).
    pub path: PathKind,
    /// For `Relay`: the node that relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The endpoint the device sends to: the peer's (for `Relay`, the relay's), as the
    /// device last learned it from authenticated packets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "endpoint_schema")]
    pub endpoint: Option<String>,
    /// When the latest handshake on the path completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_handshake: Option<Time>,
}

/// The kind of path between two nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PathKind {
    /// Through WireGuard to the peer's own address: its internal one within a location,
    /// its public one (or its NAT's mapping, when this node is public) across locations.
    #[default]
    Direct,
    /// Routed in the clear to the peer's address, as the mesh's transport policy allows.
    HostGateway,
    /// Through WireGuard between two nodes behind NAT: each sends to the other's mapping.
    #[serde(rename = "NATTraversal")]
    NatTraversal,
    /// Through WireGuard to a node both can reach, which forwards (decrypts and encrypts
    /// again) between them.
    Relay,
}

impl PathKind {
    /// The name as written in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "Direct",
            PathKind::HostGateway => "HostGateway",
            PathKind::NatTraversal => "NATTraversal",
            PathKind::Relay => "Relay",
        }
    }
}

/// How a node's peers in other locations reach it, as the operator learned it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NatKind {
    /// At its own address (a public endpoint, or one that peers elsewhere see unchanged).
    Public,
    /// Behind a NAT that maps it to one address and port whatever the destination:
    /// `mappedEndpoint`. Peers behind NAT too reach it by sending there at once.
    EndpointIndependent,
    /// Behind a NAT that maps it to another port for each destination: only public nodes
    /// reach it (once it sent to them); others go through a relay.
    Symmetric,
    /// Behind NAT, mapping not seen yet by public nodes in other locations.
    #[default]
    Unknown,
}

impl NatKind {
    /// The name as written in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            NatKind::Public => "Public",
            NatKind::EndpointIndependent => "EndpointIndependent",
            NatKind::Symmetric => "Symmetric",
            NatKind::Unknown => "Unknown",
        }
    }
}

/// A node's view of its tunnels, summarised so that status writes stay O(1) per node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Connectivity {
    /// Peers configured on the node's device.
    #[serde(default)]
    pub peers_configured: u32,
    /// Peers with a handshake in the last three minutes.
    #[serde(default)]
    pub peers_connected: u32,
    /// The most recent handshake with any peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake_at: Option<Time>,
    /// The least recent of the peers' latest handshakes: how stale the stalest tunnel is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_handshake_at: Option<Time>,
}
