//! Names shared by every wgmesh component: the API group, field managers, labels,
//! annotations, finalizers, condition types and reasons. Changing one is an API change.

/// The API group of every wgmesh custom resource.
pub const GROUP: &str = "wgmesh.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The name of the `Mesh` object the components read; other `Mesh` objects are ignored
/// and marked so in their status.
pub const DEFAULT_MESH: &str = "default";

/// Field manager of the operator's server-side-apply writes.
pub const OPERATOR_MANAGER: &str = "wgmesh-operator";
/// Field manager of the node agent's server-side-apply writes.
pub const AGENT_MANAGER: &str = "wgmesh-agent";

/// Finalizer the operator puts on `PodCIDRPool`s that have live allocations.
pub const POOL_FINALIZER: &str = "wgmesh.dev/allocations";

/// Label on node `MeshPeer`s naming the node they stand for.
pub const NODE_LABEL: &str = "wgmesh.dev/node";
/// Label on objects wgmesh creates: `app.kubernetes.io/managed-by: wgmesh`.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "wgmesh";

/// Label on subnet claims as versions before the subnet ledger kept them: `Lease`s in the
/// operator's namespace, one per allocated pod subnet, named by `wgmesh_core::claim_name`,
/// holder the node. A new leader moves them into the ledger and deletes them.
pub const CLAIM_LABEL: &str = "wgmesh.dev/claim";
/// Value of [`CLAIM_LABEL`].
pub const CLAIM_SUBNET: &str = "subnet";
/// Annotation on a subnet claim: the subnet, as written in `spec.podCIDRs`.
pub const CLAIM_SUBNET_ANNOTATION: &str = "wgmesh.dev/subnet";

/// Node annotation overriding the WireGuard endpoint a node publishes (`ip:port` or `ip`),
/// for nodes behind NAT or reached across clouds.
pub const ENDPOINT_ANNOTATION: &str = "wgmesh.dev/endpoint";

/// Node annotation naming the node's public WireGuard endpoints (`ip:port` or `ip`, several
/// separated by commas, IPv4 and IPv6): where nodes in other locations reach it. Without it,
/// a node's `ExternalIP` addresses are its public endpoints; a node with neither is behind
/// NAT, and its peers learn its mapping from the packets it sends.
pub const PUBLIC_ENDPOINT_ANNOTATION: &str = "wgmesh.dev/public-endpoint";

/// The node label naming a node's location when the `Mesh` names none.
pub const DEFAULT_LOCATION_LABEL: &str = "topology.kubernetes.io/region";

/// Seconds between keepalives on paths through a NAT when the `Mesh` sets none: below the
/// shortest UDP mapping timeout common NATs use (30 s).
pub const DEFAULT_NAT_KEEPALIVE_SECONDS: u16 = 25;

/// A peer counts as connected (`MeshPeerReport` `peersConnected`) while its last
/// handshake is younger than this: WireGuard drops an idle session 180 s after its
/// handshake, and rekeys every 120 s while traffic flows.
pub const CONNECTED_WITHIN_SECS: u64 = 180;

/// The WireGuard port when the `Mesh` does not set one.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;

/// Condition types. Each is owned by one component; see `docs/conditions.md`.
pub mod condition {
    /// Peer (operator): the peer's key and addresses are approved and agents configure it.
    /// Pool and Mesh (operator): the object is valid and in use.
    pub const READY: &str = "Ready";
    /// Peer (operator): the node has a pod subnet for every family its pools offer.
    pub const ALLOCATED: &str = "Allocated";
    /// Peer (agent): the node's current public key is published in status.
    pub const KEY_PUBLISHED: &str = "KeyPublished";
    /// Peer (agent): the WireGuard device is up on the node.
    pub const DEVICE_UP: &str = "DeviceUp";
    /// Peer (agent): routes to every other ready peer's pod subnets are installed.
    pub const ROUTES_INSTALLED: &str = "RoutesInstalled";
    /// Peer (agent): some peers are routed in the clear (host-gw) because the device is down
    /// and the mesh allows that fallback.
    pub const PLAINTEXT_FALLBACK: &str = "PlaintextFallback";
    /// Peer (operator): a key rotation is in progress.
    pub const ROTATING: &str = "Rotating";
    /// Pool (operator): every node the pool serves has a subnet; false when exhausted.
    pub const CAPACITY: &str = "Capacity";
    /// Pool (operator): the nodes the pool serves hold subnets inside its CIDRs; false when
    /// the pool shrank under live allocations (which are kept, not moved).
    pub const CONSISTENT: &str = "Consistent";
}

/// The most items each list of the API holds (the CRDs' `maxItems`). They bound what one
/// object can make every node do: an external peer's `allowedIPs` become routes on every node.
pub mod limits {
    /// `MeshPeer.spec.allowedIPs` and `status.approved.allowedIPs`.
    pub const ALLOWED_IPS: u64 = 64;
    /// `Mesh.spec.externalPeers.allowedRanges` and `spec.transport.hostGatewaySubnets`.
    pub const MESH_RANGES: u64 = 64;
    /// `MeshPeer.spec.podCIDRs`: one subnet per family.
    pub const POD_CIDRS: u64 = 2;
    /// `MeshPeer.status.endpoints`, `status.publicEndpoints` and
    /// `status.approved.publicEndpoints`.
    pub const ENDPOINTS: u64 = 8;
    /// `conditions` of every kind.
    pub const CONDITIONS: u64 = 16;
    /// Lists that name peers (`installedKeys`, a rotation's `waitingFor`, `laggards`,
    /// `externalPeersOnOldKey`): the largest mesh wgmesh supports.
    pub const PEERS: u64 = 10_000;
    /// `PodCIDRPool.spec.cidrs`.
    pub const POOL_CIDRS: u64 = 16;
    /// A label selector's `matchExpressions`.
    pub const SELECTOR_EXPRESSIONS: u64 = 32;
    /// The `values` of one selector expression.
    pub const SELECTOR_VALUES: u64 = 256;
}
