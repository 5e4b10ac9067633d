//! The `MeshPeerReport` kind: what one node sees of its tunnels, one object per node, named
//! after the node and written only by that node's agent.
//!
//! It is an object of its own, not a part of the `MeshPeer`'s status, because it changes
//! with every join, departure and path change anywhere in the mesh, and every agent
//! watches every `MeshPeer`: in the peer's status, each node's report would reach every
//! other node. Agents never watch reports; the operator (which classifies NAT from the
//! endpoints nodes report) and people (`kubectl get meshpeerreports`) read them.

use crate::peer::{Connectivity, PeerPath};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How one node reaches each of its peers, and what it sees of its tunnels.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "wgmesh.dev",
    version = "v1alpha1",
    kind = "MeshPeerReport",
    plural = "meshpeerreports",
    shortname = "mpr",
    category = "wgmesh",
    derive = "PartialEq",
    derive = "Default",
    doc = "What one node sees of its tunnels: the path to each peer and handshake ages. Named after the node, written by its agent, owned by its MeshPeer.",
    printcolumn(name = "Paths", type_ = "string", json_path = ".spec.pathSummary"),
    printcolumn(
        name = "Configured",
        type_ = "integer",
        json_path = ".spec.connectivity.peersConfigured"
    ),
    printcolumn(
        name = "Connected",
        type_ = "integer",
        json_path = ".spec.connectivity.peersConnected"
    ),
    printcolumn(
        name = "Oldest Handshake",
        type_ = "date",
        json_path = ".spec.connectivity.oldestHandshakeAt"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPeerReportSpec {
    /// How the node reaches each peer, by peer name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PeerPath>,

    /// How many peers the node reaches on each kind of path, e.g.
    /// `4 Direct, 1 NATTraversal, 2 Relay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_summary: Option<String>,

    /// What the node sees of its own tunnels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectivity: Option<Connectivity>,
}
