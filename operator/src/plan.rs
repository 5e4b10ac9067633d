//! The operator's plan step: from a snapshot of the cluster (nodes, peers, pools, the mesh)
//! and the time, the writes that bring it to the desired state.
//!
//! Pure: no client, no clock, no runtime. The decisions themselves (pool validity, subnet
//! allocation, peer admission) are `wgmesh-core`'s; this module translates the API objects
//! into core's inputs, and core's answers into objects, status and events. `apply` performs
//! what this returns and nothing else.
//!
//! Node peer lifecycle, which the translation owns:
//! - a Node without a peer gets one, created with its subnets in the same write, owned by the
//!   Node and held by the [`RELEASE_FINALIZER`];
//! - a peer whose Node is gone (or was replaced by a new Node of the same name) is deleted;
//!   while it terminates, its subnets stay reserved for the grace period, counted from its
//!   `deletionTimestamp`; then the finalizer is removed and the subnets are free;
//! - a Node that comes back while its old peer terminates gets the old subnets back: the old
//!   peer is released at once and its subnets carried over to the new one.
//!
//! Subnet claims: every subnet a node peer holds has a claim in the subnet ledger
//! ([`crate::ledger`]), naming the node. `apply` stores a subnet's claim before it writes the
//! subnet to a peer and writes nothing if the ledger names another node, so two writers
//! planning from different views cannot hand one subnet to two nodes. The plan claims what
//! peers hold without a claim (peers written before the ledger existed) and takes a claim out
//! once no peer holds its subnet and no write needs it, no sooner than [`CLAIM_GRACE`] after
//! it was made.

use crate::conditions::{self, Desired};
use crate::ledger::{Ledger, Removal};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use wgmesh_api::{
    Mesh, MeshPeer, MeshPeerReport, MeshPeerSpec, MeshPeerStatus, PodCIDRPool, PodCIDRPoolStatus,
    consts::{self, condition},
    mesh::{IpamSource, MeshStatus},
    peer::{
        ApprovedPeer, GrantReason, NatKind, PathKind, RotatingReason, RotationGrant, RotationPhase,
    },
    pool::PoolCounts,
};
use wgmesh_core as core;

/// Finalizer on node peers: holds a deleted node's subnets for the grace period.
pub const RELEASE_FINALIZER: &str = "wgmesh.dev/release";

/// How long a deleted node's subnets stay reserved when the `Mesh` does not say.
pub const DEFAULT_RELEASE_GRACE: Duration = Duration::from_secs(300);

/// How long a subnet claim whose subnet no peer holds is kept: the time its writer has to
/// write the peer after claiming. A writer checks that it still leads before every write,
/// and leadership lasts far shorter, so a claim is never collected under a write in flight.
pub const CLAIM_GRACE: Duration = Duration::from_secs(300);

/// The most node peers one pass creates. Thousands of nodes registering at once are taken a
/// slice at a time: each pass's writes finish sooner, so the statuses of the peers made
/// meanwhile (their approval, once their agent published a key) are not held back behind
/// thousands of creations, and what a pass holds in memory stays bounded.
pub const MAX_CREATES_PER_PASS: usize = 1000;

/// How long a new node peer's first status waits for its agent's first key. An agent
/// publishes its key within seconds of its peer appearing, so a joining node's status is
/// written once (allocated and ready, or why not) instead of twice; a node whose agent is not
/// running says `NoPublicKey` once this is over.
pub const FIRST_KEY_GRACE: Duration = Duration::from_secs(10);

/// Everything a pass looks at.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub nodes: Vec<Arc<Node>>,
    pub peers: Vec<Arc<MeshPeer>>,
    /// The nodes' reports of their tunnels (read for the endpoints they see their peers at).
    pub reports: Vec<Arc<MeshPeerReport>>,
    pub pools: Vec<Arc<PodCIDRPool>>,
    /// The `Mesh` named `default`, if any.
    pub mesh: Option<Arc<Mesh>>,
    /// Subnets of released peers whose node came back, by node name, until the new peer
    /// holds them. Kept by the caller between passes.
    pub carry_over: BTreeMap<String, Vec<String>>,
    /// The subnet ledger as this replica last read or stored it.
    pub ledger: Arc<Ledger>,
    pub now: SystemTime,
}

/// A subnet claim to create: `holder` holds `subnet` without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimWrite {
    pub subnet: String,
    pub holder: String,
}

/// The subnet and holder of a well-formed claim of the kind kept before the ledger (a
/// `Lease` per subnet, labelled `wgmesh.dev/claim=subnet`): its annotation names a subnet
/// whose claim name is the object's name, and it has a holder. The leader moves such claims
/// into the ledger.
pub fn read_claim(lease: &Lease) -> Option<(ipnet::IpNet, String)> {
    let subnet = core::parse_network(
        lease
            .metadata
            .annotations
            .as_ref()?
            .get(consts::CLAIM_SUBNET_ANNOTATION)?,
    )
    .ok()?;
    let holder = lease.spec.as_ref()?.holder_identity.clone()?;
    (lease.metadata.name.as_deref() == Some(core::claim_name(&subnet).as_str()))
        .then_some((subnet, holder))
}

/// One status write: the operator-owned fields of an object's status.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusWrite<S> {
    pub name: String,
    pub status: S,
}

/// An Event to publish about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    pub kind: EventTarget,
    pub name: String,
    /// The object's uid, when it exists already.
    pub uid: Option<String>,
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// A node peer's grown `spec.podCIDRs`, written only if the peer is still at
/// `resource_version` (so a plan made from a stale view cannot overwrite a newer one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationWrite {
    pub name: String,
    pub resource_version: Option<String>,
    pub pod_cidrs: Vec<String>,
}

/// A `MeshPeer` the operator deletes, only if it is still the object it planned from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDelete {
    pub name: String,
    /// The uid the plan saw: the delete is conditional on it.
    pub uid: Option<String>,
    pub why: DeleteReason,
}

/// Why a `MeshPeer` is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// A node peer whose Node is gone or was replaced.
    NodeGone,
    /// A peer the operator did not make for the Node of that name: a Node's name belongs
    /// to that Node's own peer.
    NameOfNode,
}

impl DeleteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteReason::NodeGone => "its node is gone",
            DeleteReason::NameOfNode => {
                "it takes the name of a Node but was not made by the operator for that Node"
            }
        }
    }
}

/// Which kind an Event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventTarget {
    Mesh,
    Peer,
    Pool,
}

/// The writes of one pass, in the order `apply` performs them.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Node peers to create, with their subnets.
    pub creates: Vec<MeshPeer>,
    /// Existing node peers whose `spec.podCIDRs` grow.
    pub allocations: Vec<AllocationWrite>,
    /// Peers to delete: their node is gone or was replaced.
    pub deletes: Vec<PeerDelete>,
    /// Terminating peers whose finalizer to remove: grace over, or their node is back.
    pub releases: Vec<String>,
    /// Peer statuses that change.
    pub peer_status: Vec<StatusWrite<MeshPeerStatus>>,
    /// Claims to add for subnets peers hold without one.
    pub claims: Vec<ClaimWrite>,
    /// Claims no peer holds and no write needs, past [`CLAIM_GRACE`].
    pub stale_claims: Vec<Removal>,
    /// Pool statuses that change.
    pub pool_status: Vec<StatusWrite<PodCIDRPoolStatus>>,
    /// The mesh's status, if it changes.
    pub mesh_status: Option<StatusWrite<MeshStatus>>,
    pub events: Vec<EventSpec>,
    /// When to plan again at the latest (a grace period ends).
    pub requeue_at: Option<SystemTime>,
    /// The carry-over map for the next pass.
    pub carry_over: BTreeMap<String, Vec<String>>,
    /// Subnets newly allocated by this plan.
    pub allocated: usize,
    /// Node peers left for the next pass ([`MAX_CREATES_PER_PASS`]).
    pub deferred: usize,
    /// Per pool and family: (allocated, free), for metrics.
    pub usage: Vec<core::PoolUsage>,
    /// Peers ready / not ready after this plan.
    pub peers_ready: usize,
    pub peers_not_ready: usize,
    /// Rotations granted by this plan, with their reason.
    pub rotations_granted: Vec<(String, core::rotation::Due)>,
    /// Nodes rotating after this plan.
    pub rotating: usize,
}

/// Mesh settings the plan needs, with defaults applied.
#[derive(Debug, Clone)]
struct Settings {
    grace: Duration,
    honour_node_pod_cidrs: bool,
    keepalive: u16,
    rotation: core::rotation::Policy,
    /// The ranges external peers may claim; empty: none.
    external_ranges: Vec<ipnet::IpNet>,
    /// The Node label naming a node's location.
    location_label: String,
}

impl Settings {
    fn from(mesh: Option<&Mesh>) -> (Settings, Vec<String>) {
        let mut problems = Vec::new();
        let spec = mesh.map(|m| &m.spec);
        let ipam = spec.and_then(|s| s.ipam.as_ref());
        let grace = match ipam.and_then(|i| i.release_grace_period.as_deref()) {
            None => DEFAULT_RELEASE_GRACE,
            Some(text) => match core::duration::parse(text) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(format!(
                        "spec.ipam.releaseGracePeriod {text:?}: {e}; using {}s",
                        DEFAULT_RELEASE_GRACE.as_secs()
                    ));
                    DEFAULT_RELEASE_GRACE
                }
            },
        };
        let rotation = spec.and_then(|s| s.key_rotation.as_ref());
        let interval = match rotation.and_then(|r| r.interval.as_deref()) {
            None => None,
            Some(text) => match core::duration::parse(text) {
                Ok(d) if d.is_zero() => None,
                Ok(d) => Some(d),
                Err(e) => {
                    problems.push(format!(
                        "spec.keyRotation.interval {text:?}: {e}; keys are not rotated by age"
                    ));
                    None
                }
            },
        };
        for (field, value) in [
            (
                "externalGracePeriod",
                rotation.and_then(|r| r.external_grace_period.as_deref()),
            ),
            (
                "acknowledgeTimeout",
                rotation.and_then(|r| r.acknowledge_timeout.as_deref()),
            ),
            (
                "moveTimeout",
                rotation.and_then(|r| r.move_timeout.as_deref()),
            ),
        ] {
            if let Some(text) = value
                && let Err(e) = core::duration::parse(text)
            {
                problems.push(format!(
                    "spec.keyRotation.{field} {text:?}: {e}; agents use the default"
                ));
            }
        }
        let mut external_ranges = Vec::new();
        for text in spec
            .and_then(|s| s.external_peers.as_ref())
            .map(|e| e.allowed_ranges.as_slice())
            .unwrap_or_default()
        {
            match core::parse_network(text) {
                Ok(net) => external_ranges.push(net),
                Err(e) => problems.push(format!(
                    "spec.externalPeers.allowedRanges: {e}; the range is not opened to external peers"
                )),
            }
        }
        let settings = Settings {
            external_ranges,
            location_label: spec
                .and_then(|s| s.topology.as_ref())
                .and_then(|t| t.location_label.clone())
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| consts::DEFAULT_LOCATION_LABEL.to_owned()),
            grace,
            honour_node_pod_cidrs: ipam.and_then(|i| i.source) == Some(IpamSource::NodeSpec),
            keepalive: spec.and_then(|s| s.persistent_keepalive).unwrap_or(0),
            rotation: core::rotation::Policy {
                mesh_requested_at: rotation
                    .and_then(|r| r.requested_at.as_ref())
                    .map(system_time),
                mesh_revoke: rotation.and_then(|r| r.revoke).unwrap_or(false),
                interval,
                max_concurrent: rotation
                    .and_then(|r| r.max_concurrent)
                    .map_or(1, |m| m.max(1) as usize),
            },
        };
        (settings, problems)
    }
}

fn system_time(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> SystemTime {
    SystemTime::from(t.0)
}

fn created(meta: &ObjectMeta) -> SystemTime {
    meta.creation_timestamp
        .as_ref()
        .map_or(SystemTime::UNIX_EPOCH, system_time)
}

/// When a new node peer's first status is due, if it is not yet: it has no status written by
/// the operator, all it would say is that the key is missing (its subnets are allocated), and [`FIRST_KEY_GRACE`] since
/// its creation has not passed.
fn first_key_pending(
    role: Option<&PeerRole>,
    peer: &MeshPeer,
    desired: &[Desired],
    now: SystemTime,
) -> Option<SystemTime> {
    let written = peer
        .status
        .as_ref()
        .is_some_and(|s| !s.conditions.is_empty() || s.observed_generation.is_some());
    let is_no_key =
        |d: &Desired| d.type_ == condition::READY && !d.status && d.reason == "NoPublicKey";
    let only_no_key =
        desired.iter().any(is_no_key) && desired.iter().all(|d| d.status || is_no_key(d));
    if !matches!(role, Some(PeerRole::Node)) || written || !only_no_key {
        return None;
    }
    let until = system_time(peer.metadata.creation_timestamp.as_ref()?) + FIRST_KEY_GRACE;
    (until > now).then_some(until)
}

/// How the plan sees one `MeshPeer`.
#[derive(Debug)]
enum PeerRole {
    /// The live peer of an existing node.
    Node,
    /// A node peer whose node is gone or replaced; not yet terminating.
    Orphan,
    /// A node peer terminating while its node is absent: its subnets are in grace.
    Releasing { since: SystemTime },
    /// A node peer terminating while its node exists again.
    Returning,
    /// Names a node but was not created for it: never trusted.
    Impostor,
    /// A user-created peer.
    External,
}

fn role(peer: &MeshPeer, nodes: &BTreeMap<&str, &Node>) -> PeerRole {
    let Some(node_name) = peer.spec.node.as_deref() else {
        return PeerRole::External;
    };
    let Some(owner) = peer.node_owner() else {
        return PeerRole::Impostor;
    };
    let node = nodes.get(node_name).copied();
    match (&peer.metadata.deletion_timestamp, node) {
        (Some(_), Some(_)) => PeerRole::Returning,
        (Some(t), None) => PeerRole::Releasing {
            since: system_time(t),
        },
        (None, Some(node)) if node.metadata.uid.as_deref() == Some(owner.uid.as_str()) => {
            PeerRole::Node
        }
        (None, _) => PeerRole::Orphan,
    }
}

/// Computes the writes of one pass.
pub fn plan(snap: &Snapshot) -> Plan {
    let (settings, mesh_problems) = Settings::from(snap.mesh.as_deref());
    let mut out = Plan::default();

    let nodes: BTreeMap<&str, &Node> = snap
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.as_deref().map(|name| (name, n.as_ref())))
        .collect();
    let peers: BTreeMap<&str, &MeshPeer> = snap
        .peers
        .iter()
        .filter_map(|p| p.metadata.name.as_deref().map(|name| (name, p.as_ref())))
        .collect();
    let reports: BTreeMap<&str, &MeshPeerReport> = snap
        .reports
        .iter()
        .filter_map(|r| r.metadata.name.as_deref().map(|name| (name, r.as_ref())))
        .collect();

    // Pools.
    let pool_specs: Vec<core::PoolSpec> = snap.pools.iter().map(|p| pool_spec(p)).collect();
    let validation = core::validate_pools(&pool_specs);

    // Peers by role; what they hold.
    let mut roles: BTreeMap<&str, PeerRole> = BTreeMap::new();
    let mut existing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut released: Vec<core::Released> = Vec::new();
    let mut carry_over = BTreeMap::new();
    for (&name, &peer) in &peers {
        let r = role(peer, &nodes);
        match &r {
            PeerRole::Node | PeerRole::Orphan => {
                existing.insert(name.to_owned(), peer.spec.pod_cidrs.clone());
            }
            PeerRole::Returning => {
                existing.insert(name.to_owned(), peer.spec.pod_cidrs.clone());
                carry_over.insert(name.to_owned(), peer.spec.pod_cidrs.clone());
                out.releases.push(name.to_owned());
            }
            PeerRole::Releasing { since } => {
                let subnets = peer
                    .spec
                    .pod_cidrs
                    .iter()
                    .filter_map(|c| core::parse_network(c).ok())
                    .collect();
                released.push(core::Released {
                    peer: name.to_owned(),
                    subnets,
                    released_at: *since,
                });
                let free_at = since.checked_add(settings.grace);
                match free_at {
                    Some(t) if t <= snap.now => out.releases.push(name.to_owned()),
                    Some(t) => out.requeue_at = Some(out.requeue_at.map_or(t, |r| r.min(t))),
                    None => {}
                }
            }
            PeerRole::Impostor | PeerRole::External => {}
        }
        if matches!(r, PeerRole::Orphan) {
            out.deletes.push(PeerDelete {
                name: name.to_owned(),
                uid: peer.metadata.uid.clone(),
                why: DeleteReason::NodeGone,
            });
        }
        roles.insert(name, r);
    }
    // Carried-over subnets of nodes whose old peer is gone and new one not yet made.
    for (name, subnets) in &snap.carry_over {
        if nodes.contains_key(name.as_str()) && !peers.contains_key(name.as_str()) {
            existing.insert(name.clone(), subnets.clone());
            carry_over.insert(name.clone(), subnets.clone());
        }
    }

    // Allocation.
    let core_nodes: Vec<core::Node> = nodes
        .iter()
        .map(|(name, node)| core::Node {
            name: (*name).to_owned(),
            labels: node.labels().clone(),
            pod_cidrs: node
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidrs.clone())
                .unwrap_or_default(),
        })
        .collect();
    let valid_claims = snap.ledger.claims();
    let alloc = core::plan_allocations(&core::AllocationRequest {
        pools: &validation.valid,
        nodes: &core_nodes,
        existing: &existing,
        claims: &valid_claims,
        released: &released,
        grace_period: settings.grace,
        now: snap.now,
        honour_node_pod_cidrs: settings.honour_node_pod_cidrs,
    });
    if let Some(t) = alloc.grace.next_free_at {
        out.requeue_at = Some(out.requeue_at.map_or(t, |r| r.min(t)));
    }
    let conflicts = conflicts_by_peer(&alloc.conflicts);
    let outside = outside_by_peer(&alloc.conflicts);

    for (name, node) in &nodes {
        let Some(a) = alloc.nodes.get(*name) else {
            continue;
        };
        let subnets: Vec<String> = a.subnets.iter().map(ToString::to_string).collect();
        match peers.get(name) {
            // The rest wait for the next pass, which comes at once.
            None if out.creates.len() >= MAX_CREATES_PER_PASS => out.deferred += 1,
            None => {
                out.allocated += a.added.len();
                out.creates.push(new_node_peer(node, subnets.clone()));
                carry_over.remove(*name);
                // A new node's subnets from the pools are in its peer's spec and in its
                // `PeerReady` Event; an Event each would double the writes of a join.
                // Where else they came from is worth one.
                if a.added
                    .iter()
                    .any(|x| !matches!(x.source, core::Source::Pool(_)))
                {
                    out.events.push(allocated_event(name, None, &a.added));
                }
            }
            Some(peer) if matches!(roles.get(name), Some(PeerRole::Node)) => {
                if !a.added.is_empty() {
                    out.allocated += a.added.len();
                    out.allocations.push(AllocationWrite {
                        name: (*name).to_owned(),
                        resource_version: peer.metadata.resource_version.clone(),
                        pod_cidrs: subnets,
                    });
                    out.events
                        .push(allocated_event(name, peer.metadata.uid.clone(), &a.added));
                }
            }
            Some(peer)
                if matches!(
                    roles.get(name),
                    Some(PeerRole::External | PeerRole::Impostor)
                ) =>
            {
                // Someone took the node's name before the node joined (or gave a peer of
                // theirs the node's name). The agent trusts only the peer the operator made
                // for its Node, so the node cannot join until the name is free.
                out.deletes.push(PeerDelete {
                    name: (*name).to_owned(),
                    uid: peer.metadata.uid.clone(),
                    why: DeleteReason::NameOfNode,
                });
                out.events.push(squatter_event(name, peer));
            }
            Some(_) => {}
        }
    }

    // Admission.
    let mut node_peers = Vec::new();
    let mut externals = Vec::new();
    for (&name, &peer) in &peers {
        match roles.get(name) {
            Some(PeerRole::Node) => {
                let status = peer.status.as_ref();
                node_peers.push(core::NodePeer {
                    name: name.to_owned(),
                    created: created(&peer.metadata),
                    pod_cidrs: alloc
                        .nodes
                        .get(name)
                        .map(|a| a.subnets.clone())
                        .unwrap_or_default(),
                    public_key: status.and_then(|s| s.public_key.clone()),
                    next_public_key: status.and_then(|s| s.next_public_key.clone()),
                    endpoints: status.map(|s| s.endpoints.clone()).unwrap_or_default(),
                    public_endpoints: status
                        .map(|s| s.public_endpoints.clone())
                        .unwrap_or_default(),
                });
            }
            Some(PeerRole::External) => externals.push(core::ExternalPeer {
                name: name.to_owned(),
                created: created(&peer.metadata),
                public_key: peer.spec.public_key.clone(),
                allowed_ips: peer.spec.allowed_ips.clone(),
                endpoint: peer.spec.endpoint.clone(),
            }),
            _ => {}
        }
    }
    let verdicts = core::admit(
        &validation.valid,
        &node_peers,
        &externals,
        &settings.external_ranges,
    );

    // Key rotation: which nodes rotate, and which may start now.
    let rotations = rotation_views(&peers, &roles, &verdicts);
    let granted: BTreeMap<String, core::rotation::Due> =
        core::rotation::schedule(&rotations.views, &settings.rotation, snap.now)
            .into_iter()
            .collect();
    for v in rotations.views.iter().filter(|v| !v.rotating) {
        if let Some(t) = core::rotation::next_due_at(v, &settings.rotation, snap.now) {
            out.requeue_at = Some(out.requeue_at.map_or(t, |r| r.min(t)));
        }
    }
    out.rotating = rotations.views.iter().filter(|v| v.rotating).count() + granted.len();

    // Where each node is and how other locations reach it.
    let places = places(
        &nodes,
        &peers,
        &reports,
        &roles,
        &verdicts,
        &settings.location_label,
        snap.now,
    );

    // Peer status.
    let mut ready_peers: BTreeSet<&str> = BTreeSet::new();
    for (&name, &peer) in &peers {
        let role = roles.get(name);
        let mut desired: Vec<Desired> = Vec::new();
        let mut approved = None;
        let mut grant = None;
        let generation = peer.metadata.generation;
        match role {
            Some(PeerRole::Node) => {
                let a = alloc.nodes.get(name);
                let peer_conflicts = conflicts.get(name).cloned().unwrap_or_default();
                let outside = outside.get(name).map(Vec::as_slice).unwrap_or_default();
                desired.push(allocated_condition(a, &peer_conflicts, outside));
                let verdict = verdicts.get(name);
                match (verdict, peer_conflicts.is_empty()) {
                    (Some(v), true) if v.ready() => {
                        desired.push(Desired::new(condition::READY, true, v.reason().as_str(), v.message()));
                        approved = v.approved.as_ref().map(|ap| {
                            let mut a = approve(ap, peer, settings.keepalive);
                            if let Some(place) = places.get(name) {
                                place.approve(&mut a);
                            }
                            a
                        });
                    }
                    (Some(v), true) => {
                        desired.push(Desired::new(condition::READY, false, v.reason().as_str(), v.message()));
                    }
                    (_, false) => desired.push(Desired::new(
                        condition::READY,
                        false,
                        "AllocationConflict",
                        peer_conflicts.join("; "),
                    )),
                    (None, true) => {}
                }
                let (g, cond) = rotation_state(
                    peer,
                    rotations.active_grant.get(name),
                    granted.get(name).copied(),
                    rotations.views.iter().find(|v| v.name == name),
                    &settings.rotation,
                    snap.now,
                );
                if let Some(g) = &g
                    && !rotations.active_grant.contains_key(name)
                {
                    if let Some(due) = granted.get(name) {
                        out.rotations_granted.push((name.to_owned(), *due));
                    }
                    let revoke = g.reason == GrantReason::Revoke;
                    out.events.push(EventSpec {
                        kind: EventTarget::Peer,
                        name: name.to_owned(),
                        uid: peer.metadata.uid.clone(),
                        warning: false,
                        reason: if revoke {
                            "RevocationStarted"
                        } else {
                            "RotationStarted"
                        }
                        .into(),
                        note: format!(
                            "key {} of generation {} granted ({})",
                            if revoke { "revocation" } else { "rotation" },
                            g.generation,
                            due_text(g.reason)
                        ),
                    });
                }
                grant = g;
                desired.extend(cond);
            }
            Some(PeerRole::External) => {
                if let Some(v) = verdicts.get(name) {
                    desired.push(Desired::new(condition::READY, v.ready(), v.reason().as_str(), v.message()));
                    approved = v.approved.as_ref().map(|ap| approve(ap, peer, settings.keepalive));
                }
            }
            Some(PeerRole::Impostor) => desired.push(Desired::new(
                condition::READY,
                false,
                "NotOwnedByNode",
                format!(
                    "spec.node names node {:?}, but this MeshPeer was not created by the operator for \
                     that node (it has no ownerReference to it); it is ignored. Delete it: the \
                     operator creates node peers itself.",
                    peer.spec.node.as_deref().unwrap_or_default()
                ),
            )),
            Some(PeerRole::Orphan) | Some(PeerRole::Releasing { .. }) | Some(PeerRole::Returning) => {
                let msg = match role {
                    Some(PeerRole::Releasing { since }) => {
                        let until = since.checked_add(settings.grace);
                        format!(
                            "node {name} is gone; its pod subnets stay reserved for {}s{}",
                            settings.grace.as_secs(),
                            until
                                .map(|u| format!(" (until {})", k8s_openapi::jiff::Timestamp::try_from(u).map(|t| t.to_string()).unwrap_or_default()))
                                .unwrap_or_default()
                        )
                    }
                    Some(PeerRole::Returning) => {
                        format!("node {name} was re-registered; this peer is replaced by a new one with the same subnets")
                    }
                    _ => format!("node {name} is gone or was replaced; the peer is being removed"),
                };
                desired.push(Desired::new(condition::READY, false, "NodeGone", msg));
            }
            None => {}
        }
        if desired.is_empty() {
            continue;
        }
        let current = peer.status.as_ref();
        if let Some(until) = first_key_pending(role, peer, &desired, snap.now) {
            out.requeue_at = Some(out.requeue_at.map_or(until, |r| r.min(until)));
            out.peers_not_ready += 1;
            continue;
        }
        let current_conditions = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
        let (conds, changes) =
            conditions::merge(current_conditions, &desired, generation, snap.now);
        let ready = desired
            .iter()
            .any(|d| d.type_ == condition::READY && d.status);
        if ready {
            ready_peers.insert(name);
            out.peers_ready += 1;
        } else {
            out.peers_not_ready += 1;
        }
        let current_approved = current.and_then(|s| s.approved.clone());
        let current_gen = current.and_then(|s| s.observed_generation);
        let current_grant = current.and_then(|s| s.rotation_grant.clone());
        if changes.is_empty()
            && current_approved == approved
            && current_gen == generation
            && current_grant == grant
        {
            continue;
        }
        let had_ready =
            current.is_some_and(|s| s.conditions.iter().any(|c| c.type_ == condition::READY));
        for change in changes.iter().filter(|c| c.type_ == condition::READY) {
            // A new peer waiting for its agent's first key is where every peer starts, not
            // a change worth an Event.
            if !had_ready && !change.status && change.reason == "NoPublicKey" {
                continue;
            }
            out.events.push(EventSpec {
                kind: EventTarget::Peer,
                name: name.to_owned(),
                uid: peer.metadata.uid.clone(),
                // A node waiting for its agent's first key is normal, not a warning.
                warning: !change.status && change.reason != "NoPublicKey",
                reason: if change.status {
                    "PeerReady".into()
                } else {
                    change.reason.clone()
                },
                note: change.message.clone(),
            });
        }
        out.peer_status.push(StatusWrite {
            name: name.to_owned(),
            status: MeshPeerStatus {
                conditions: conds,
                approved,
                observed_generation: generation,
                rotation_grant: grant,
                ..Default::default()
            },
        });
    }

    // Pool status.
    let exhausted = exhausted_pools(&alloc);
    for pool in &snap.pools {
        let name = pool.name_any();
        let mut desired = Vec::new();
        match validation.refused.get(&name) {
            Some(errors) => desired.push(Desired::new(
                condition::READY,
                false,
                pool_reason(errors),
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
            None => desired.push(Desired::new(
                condition::READY,
                true,
                "Valid",
                "the pool is valid",
            )),
        }
        match exhausted.get(name.as_str()) {
            Some(nodes) => desired.push(Desired::new(
                condition::CAPACITY,
                false,
                "Exhausted",
                format!(
                    "no free subnet left for node(s) {}; add a CIDR to the pool or another pool that selects them",
                    summarize(nodes)
                ),
            )),
            None => desired.push(Desired::new(condition::CAPACITY, true, "Available", "every node the pool serves has a subnet")),
        }
        if let Some(valid_pool) = validation.valid.iter().find(|p| p.name() == name) {
            let strays: Vec<String> = outside
                .iter()
                .filter(|(peer, _)| {
                    nodes
                        .get(peer.as_str())
                        .is_some_and(|n| valid_pool.selects(n.labels()))
                })
                .flat_map(|(peer, subnets)| {
                    subnets
                        .iter()
                        .filter(|s| valid_pool.offers(core::Family::of(s)))
                        .map(move |s| format!("{peer} ({s})"))
                })
                .collect();
            desired.push(if strays.is_empty() {
                Desired::new(condition::CONSISTENT, true, "AllocationsInPool", "every node this pool serves holds subnets inside it")
            } else {
                Desired::new(
                    condition::CONSISTENT,
                    false,
                    "AllocationsOutsidePool",
                    format!(
                        "nodes this pool serves hold subnets outside it: {}; they are kept, not moved. \
                         Restore the CIDR, or drain and delete those nodes",
                        strays.join(", ")
                    ),
                )
            });
        }
        let counts = |select: fn(&core::PoolUsage) -> i64| {
            let mut c = PoolCounts::default();
            for u in alloc.usage.iter().filter(|u| u.pool == name) {
                let v = select(u);
                match u.family {
                    core::Family::V4 => c.ipv4 = Some(v),
                    core::Family::V6 => c.ipv6 = Some(v),
                }
                c.total = c.total.saturating_add(v);
            }
            c
        };
        let valid = !validation.refused.contains_key(&name);
        let allocated = valid.then(|| counts(|u| i64::try_from(u.allocated).unwrap_or(i64::MAX)));
        let free = valid.then(|| counts(core::PoolUsage::free_i64));
        let generation = pool.metadata.generation;
        let current = pool.status.as_ref();
        let current_conditions = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
        let (conds, changes) =
            conditions::merge(current_conditions, &desired, generation, snap.now);
        out.events.extend(change_events(
            EventTarget::Pool,
            &name,
            pool.metadata.uid.as_ref(),
            &changes,
        ));
        let unchanged = changes.is_empty()
            && current.and_then(|s| s.allocated.clone()) == allocated
            && current.and_then(|s| s.free.clone()) == free
            && current.and_then(|s| s.observed_generation) == generation;
        if !unchanged {
            out.pool_status.push(StatusWrite {
                name,
                status: PodCIDRPoolStatus {
                    conditions: conds,
                    observed_generation: generation,
                    allocated,
                    free,
                },
            });
        }
    }

    // Mesh status.
    if let Some(mesh) = &snap.mesh {
        let count = |node_peers: bool, ready_only: bool| -> u32 {
            let n = roles
                .iter()
                .filter(|(name, r)| {
                    let kind = if node_peers {
                        matches!(r, PeerRole::Node)
                    } else {
                        matches!(r, PeerRole::External)
                    };
                    kind && (!ready_only || ready_peers.contains(*name))
                })
                .count();
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        let desired = if mesh_problems.is_empty() {
            vec![Desired::new(
                condition::READY,
                true,
                "Valid",
                "the mesh settings are valid and in force",
            )]
        } else {
            vec![Desired::new(
                condition::READY,
                false,
                "InvalidSettings",
                mesh_problems.join("; "),
            )]
        };
        let generation = mesh.metadata.generation;
        let current = mesh.status.clone().unwrap_or_default();
        let (conds, changes) =
            conditions::merge(&current.conditions, &desired, generation, snap.now);
        out.events.extend(change_events(
            EventTarget::Mesh,
            &mesh.name_any(),
            mesh.metadata.uid.as_ref(),
            &changes,
        ));
        let status = MeshStatus {
            conditions: conds,
            observed_generation: generation,
            nodes: Some(count(true, false)),
            nodes_ready: Some(count(true, true)),
            peers: Some(count(false, false)),
            peers_ready: Some(count(false, true)),
        };
        let unchanged = changes.is_empty()
            && current.observed_generation == status.observed_generation
            && current.nodes == status.nodes
            && current.nodes_ready == status.nodes_ready
            && current.peers == status.peers
            && current.peers_ready == status.peers_ready;
        if !unchanged {
            out.mesh_status = Some(StatusWrite {
                name: mesh.name_any(),
                status,
            });
        }
    }

    plan_claims(&mut out, snap, &existing, &released, &alloc);
    out.usage = alloc.usage;
    out.carry_over = carry_over;
    out
}

/// What the plan knows of the nodes' keys.
struct RotationViews {
    views: Vec<core::rotation::NodeKeyView>,
    /// Grants still in force: they name the node's current key generation.
    active_grant: BTreeMap<String, RotationGrant>,
}

/// The rotation view of every ready node peer that published a key.
fn rotation_views(
    peers: &BTreeMap<&str, &MeshPeer>,
    roles: &BTreeMap<&str, PeerRole>,
    verdicts: &BTreeMap<String, core::Verdict>,
) -> RotationViews {
    let mut views = Vec::new();
    let mut active_grant = BTreeMap::new();
    for (&name, &peer) in peers {
        if !matches!(roles.get(name), Some(PeerRole::Node))
            || !verdicts.get(name).is_some_and(core::Verdict::ready)
        {
            continue;
        }
        let Some(status) = peer.status.as_ref() else {
            continue;
        };
        let Some(created) = status.key_created_at.as_ref().map(system_time) else {
            continue;
        };
        let generation = status.key_generation.unwrap_or(0);
        // The agent gave up a rotation of this key (its next key was never approved).
        let abandoned_at = status
            .rotation
            .as_ref()
            .filter(|r| r.phase == RotationPhase::Abandoned && r.generation == generation)
            .and_then(|r| r.since.as_ref())
            .map(system_time);
        let grant = status.rotation_grant.clone().filter(|g| {
            core::rotation::grant_in_force(
                g.generation,
                g.granted_at.as_ref().map(system_time),
                generation,
                abandoned_at,
            )
        });
        let rotating = grant.is_some() || status.next_public_key.is_some();
        if let Some(g) = grant {
            active_grant.insert(name.to_owned(), g);
        }
        let request = peer.spec.key_rotation.as_ref();
        views.push(core::rotation::NodeKeyView {
            name: name.to_owned(),
            key_created_at: created,
            requested_at: request
                .and_then(|r| r.requested_at.as_ref())
                .map(system_time),
            revoke: request.and_then(|r| r.revoke).unwrap_or(false),
            rotating,
            abandoned_at,
        });
    }
    RotationViews {
        views,
        active_grant,
    }
}

/// The `reason` a grant carries for `due`.
pub fn due_reason(due: core::rotation::Due) -> GrantReason {
    match due {
        core::rotation::Due::Revoke => GrantReason::Revoke,
        core::rotation::Due::NodeRequest => GrantReason::NodeRequest,
        core::rotation::Due::MeshRequest => GrantReason::MeshRequest,
        core::rotation::Due::Interval => GrantReason::Interval,
    }
}

fn due_text(reason: GrantReason) -> &'static str {
    match reason {
        GrantReason::Revoke => {
            "a revocation requested by spec.keyRotation.revoke (this peer's or the Mesh's): when it completes, the old key and every key retired before it stop being answered, with no grace period for external peers"
        }
        GrantReason::MeshRequest => {
            "requested for every node by the Mesh's spec.keyRotation.requestedAt"
        }
        GrantReason::Interval => "the key reached the Mesh's spec.keyRotation.interval",
        GrantReason::NodeRequest => "requested by this peer's spec.keyRotation.requestedAt",
    }
}

/// A node peer's grant and `Rotating` condition: a grant in force is kept until the node
/// reports the next generation; a new one is given when the schedule picks the node.
fn rotation_state(
    peer: &MeshPeer,
    active: Option<&RotationGrant>,
    newly: Option<core::rotation::Due>,
    view: Option<&core::rotation::NodeKeyView>,
    policy: &core::rotation::Policy,
    now: SystemTime,
) -> (Option<RotationGrant>, Option<Desired>) {
    let status = peer.status.as_ref();
    let generation = status.and_then(|s| s.key_generation).unwrap_or(0);
    let agent = status.and_then(|s| s.rotation.as_ref());
    let grant = active.cloned().or_else(|| {
        newly.map(|due| RotationGrant {
            generation,
            granted_at: k8s_openapi::jiff::Timestamp::try_from(now)
                .ok()
                .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
            reason: due_reason(due),
        })
    });
    let Some(view) = view else {
        return (None, None);
    };
    let cond = if let Some(g) = &grant {
        let progress = match agent
            .filter(|a| a.generation == g.generation && a.phase != RotationPhase::Completed)
        {
            Some(a) if a.waiting_for.is_empty() => format!("; {}", a.phase.as_str()),
            Some(a) => format!(
                "; {}, waiting for {}",
                a.phase.as_str(),
                a.waiting_for.join(", ")
            ),
            None => "; waiting for the node's agent to publish its next key".to_owned(),
        };
        Desired::new(
            condition::ROTATING,
            true,
            RotatingReason::Granted(g.reason).as_str(),
            format!(
                "rotating key generation {}: {}{progress}",
                g.generation,
                due_text(g.reason)
            ),
        )
    } else if let Some(due) = core::rotation::due(view, policy, now) {
        Desired::new(
            condition::ROTATING,
            false,
            RotatingReason::Queued.as_str(),
            format!(
                "due ({}); waiting for a rotation slot (spec.keyRotation.maxConcurrent is {})",
                due_text(due_reason(due)),
                policy.max_concurrent
            ),
        )
    } else {
        if let Some(a) =
            agent.filter(|a| a.phase == RotationPhase::Abandoned && a.generation == generation)
        {
            return (
                None,
                Some(Desired::new(
                    condition::ROTATING,
                    false,
                    RotatingReason::Abandoned.as_str(),
                    format!(
                        "the rotation of key generation {} was abandoned: its next key was not approved in time (see the Ready condition's message and the operator's Events); set spec.keyRotation.requestedAt to retry",
                        a.generation
                    ),
                )),
            );
        }
        match agent.filter(|a| a.phase == RotationPhase::Completed) {
            Some(a) if a.revoke => {
                let mut msg = format!(
                    "key generation {} in use; the previous key was revoked: since the rotation completed, neither it nor any key retired before it is answered (external peers need the new key)",
                    a.generation
                );
                if !a.laggards.is_empty() {
                    msg.push_str(&format!(
                        "; the rotation went on without {}",
                        a.laggards.join(", ")
                    ));
                }
                Desired::new(
                    condition::ROTATING,
                    false,
                    RotatingReason::Revoked.as_str(),
                    msg,
                )
            }
            Some(a) if !a.laggards.is_empty() => Desired::new(
                condition::ROTATING,
                false,
                RotatingReason::CompletedWithLaggards.as_str(),
                format!(
                    "key generation {} in use; the rotation went on without {}",
                    a.generation,
                    a.laggards.join(", ")
                ),
            ),
            Some(a) => {
                let mut msg = format!("key generation {} in use", a.generation);
                if let Some(until) = &a.old_key_answered_until {
                    msg.push_str(&format!(
                        "; the previous key is answered for external peers until {}",
                        until.0
                    ));
                }
                if !a.external_peers_on_old_key.is_empty() {
                    msg.push_str(&format!(
                        "; external peers still on it: {}",
                        a.external_peers_on_old_key.join(", ")
                    ));
                }
                Desired::new(
                    condition::ROTATING,
                    false,
                    RotatingReason::Completed.as_str(),
                    msg,
                )
            }
            None => Desired::new(
                condition::ROTATING,
                false,
                RotatingReason::Idle.as_str(),
                format!("key generation {generation}; no rotation requested"),
            ),
        }
    };
    (grant, Some(cond))
}

fn pool_spec(pool: &PodCIDRPool) -> core::PoolSpec {
    core::PoolSpec {
        name: pool.name_any(),
        created: created(&pool.metadata),
        cidrs: pool.spec.cidrs.clone(),
        node_prefix_length: core::PrefixLengths {
            ipv4: pool.spec.node_prefix_length.ipv4,
            ipv6: pool.spec.node_prefix_length.ipv6,
        },
        node_selector: pool
            .spec
            .node_selector
            .as_ref()
            .map(|s| core::LabelSelector {
                match_labels: s.match_labels.clone().unwrap_or_default(),
                match_expressions: s
                    .match_expressions
                    .iter()
                    .flatten()
                    .map(|r| core::LabelSelectorRequirement {
                        key: r.key.clone(),
                        operator: r.operator.clone(),
                        values: r.values.clone().unwrap_or_default(),
                    })
                    .collect(),
            }),
    }
}

fn new_node_peer(node: &Node, pod_cidrs: Vec<String>) -> MeshPeer {
    let name = node.name_any();
    let mut peer = MeshPeer::new(
        &name,
        MeshPeerSpec {
            node: Some(name.clone()),
            pod_cidrs,
            ..Default::default()
        },
    );
    peer.metadata.labels = Some(BTreeMap::from([
        (consts::NODE_LABEL.to_owned(), name.clone()),
        (
            consts::MANAGED_BY_LABEL.to_owned(),
            consts::MANAGED_BY.to_owned(),
        ),
    ]));
    peer.metadata.finalizers = Some(vec![RELEASE_FINALIZER.to_owned()]);
    peer.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name,
        uid: node.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(false),
    }]);
    peer
}

/// Where a node is and how nodes of other locations reach it, for its approval.
#[derive(Debug, Clone, Default, PartialEq)]
struct Place {
    location: Option<String>,
    nat: core::paths::NatView,
    underlay_mtu: Option<u32>,
}

impl Place {
    fn approve(&self, a: &mut ApprovedPeer) {
        a.location.clone_from(&self.location);
        a.nat = Some(match self.nat.nat {
            core::paths::Nat::Public => NatKind::Public,
            core::paths::Nat::EndpointIndependent => NatKind::EndpointIndependent,
            core::paths::Nat::Symmetric => NatKind::Symmetric,
            core::paths::Nat::Unknown => NatKind::Unknown,
        });
        a.mapped_endpoint = self.nat.mapped.map(|m| m.to_string());
        a.underlay_mtu = self.underlay_mtu;
    }
}

/// The node's location: the value of the location label on its Node.
fn location_of(node: Option<&&Node>, label: &str) -> Option<String> {
    node?.metadata.labels.as_ref()?.get(label).cloned()
}

/// Every admitted node's [`Place`]: its location, and its NAT as the public nodes of other
/// locations see it (`core::paths::classify` over what their agents report in their
/// `MeshPeerReport`'s `spec.paths`; the admission webhook lets only a node's own agent
/// write its report).
fn places(
    nodes: &BTreeMap<&str, &Node>,
    peers: &BTreeMap<&str, &MeshPeer>,
    reports: &BTreeMap<&str, &MeshPeerReport>,
    roles: &BTreeMap<&str, PeerRole>,
    verdicts: &BTreeMap<String, core::Verdict>,
    label: &str,
    now: SystemTime,
) -> BTreeMap<String, Place> {
    let admitted: BTreeMap<&str, &core::Approved> = verdicts
        .iter()
        .filter(|(n, _)| matches!(roles.get(n.as_str()), Some(PeerRole::Node)))
        .filter_map(|(n, v)| Some((n.as_str(), v.approved.as_ref()?)))
        .collect();
    let location: BTreeMap<&str, Option<String>> = admitted
        .keys()
        .map(|n| (*n, location_of(nodes.get(n), label)))
        .collect();
    let mut seen: BTreeMap<&str, Vec<core::paths::Observation>> = BTreeMap::new();
    for (&observer, approved) in &admitted {
        let Some(report) = reports.get(observer) else {
            continue;
        };
        for path in &report.spec.paths {
            let Some(endpoint) = path.endpoint.as_deref().and_then(|e| e.parse().ok()) else {
                continue;
            };
            if path.path != PathKind::Direct || !admitted.contains_key(path.peer.as_str()) {
                continue;
            }
            seen.entry(path.peer.as_str())
                .or_default()
                .push(core::paths::Observation {
                    observer_location: location.get(observer).cloned().flatten(),
                    observer_public: !approved.public_endpoints.is_empty(),
                    endpoint,
                    handshake_age: path
                        .latest_handshake
                        .as_ref()
                        .map(|t| now.duration_since(system_time(t)).unwrap_or_default()),
                });
        }
    }
    admitted
        .iter()
        .map(|(&name, approved)| {
            let loc = location.get(name).cloned().flatten();
            let nat = core::paths::classify(
                loc.as_deref(),
                &approved.public_endpoints,
                &approved.endpoints,
                seen.get(name).map(Vec::as_slice).unwrap_or_default(),
            );
            let underlay_mtu = peers
                .get(name)
                .and_then(|p| p.status.as_ref()?.underlay_mtu)
                .filter(|m| (MIN_UNDERLAY_MTU..=65535).contains(m));
            (
                name.to_owned(),
                Place {
                    location: loc,
                    nat,
                    underlay_mtu,
                },
            )
        })
        .collect()
}

/// The smallest underlay MTU a node may report: the IPv6 minimum. A smaller report is
/// ignored, so that one node cannot shrink every path of the mesh below it.
const MIN_UNDERLAY_MTU: u32 = 1280;

fn approve(ap: &core::Approved, peer: &MeshPeer, mesh_keepalive: u16) -> ApprovedPeer {
    let key = ap.public_key.to_string();
    ApprovedPeer {
        public_key_prefix: Some(ap.public_key.short()),
        public_key: Some(key),
        next_public_key: ap.next_public_key.as_ref().map(ToString::to_string),
        key_generation: peer.status.as_ref().and_then(|s| s.key_generation),
        allowed_ips: ap.allowed_ips.iter().map(ToString::to_string).collect(),
        endpoint: ap.endpoints.first().map(ToString::to_string),
        public_endpoints: ap
            .public_endpoints
            .iter()
            .map(ToString::to_string)
            .collect(),
        persistent_keepalive: Some(
            peer.spec
                .persistent_keepalive
                .filter(|k| *k > 0)
                .unwrap_or(mesh_keepalive),
        )
        .filter(|k| *k > 0),
        ..ApprovedPeer::default()
    }
}

fn allocated_condition(
    a: Option<&core::NodeAllocation>,
    conflicts: &[String],
    outside: &[ipnet::IpNet],
) -> Desired {
    if !conflicts.is_empty() {
        return Desired::new(
            condition::ALLOCATED,
            false,
            "Conflict",
            conflicts.join("; "),
        );
    }
    match a {
        Some(a) if a.failures.is_empty() && !outside.is_empty() => Desired::new(
            condition::ALLOCATED,
            true,
            "OutsidePool",
            format!(
                "pod subnets {}; {} lie outside every valid PodCIDRPool (a pool shrank or was \
                 removed): kept, not moved",
                join(&a.subnets),
                join(outside)
            ),
        ),
        Some(a) if a.failures.is_empty() && !a.subnets.is_empty() => Desired::new(
            condition::ALLOCATED,
            true,
            "Allocated",
            format!("pod subnets {}", join(&a.subnets)),
        ),
        Some(a) if !a.failures.is_empty() => {
            let reason = match a.failures[0] {
                core::AllocationFailure::NoMatchingPool => "NoMatchingPool",
                core::AllocationFailure::Exhausted { .. } => "PoolExhausted",
                _ => "InvalidNodePodCIDRs",
            };
            Desired::new(
                condition::ALLOCATED,
                false,
                reason,
                a.failures
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        }
        _ => Desired::new(
            condition::ALLOCATED,
            false,
            "NoMatchingPool",
            "no valid PodCIDRPool selects this node",
        ),
    }
}

/// The Warning Event for a peer deleted because it holds a Node's name: what it held, so
/// whoever made it can make it again under another name.
/// An Event per changed condition of an object: a warning when it became false.
fn change_events<'a>(
    kind: EventTarget,
    name: &'a str,
    uid: Option<&'a String>,
    changes: &'a [Desired],
) -> impl Iterator<Item = EventSpec> + 'a {
    changes.iter().map(move |change| EventSpec {
        kind,
        name: name.to_owned(),
        uid: uid.cloned(),
        warning: !change.status,
        reason: change.reason.clone(),
        note: change.message.clone(),
    })
}

fn squatter_event(node: &str, peer: &MeshPeer) -> EventSpec {
    let spec = &peer.spec;
    EventSpec {
        uid: peer.metadata.uid.clone(),
        kind: EventTarget::Peer,
        name: node.to_owned(),
        warning: true,
        reason: "NameOfNodeTaken".into(),
        note: format!(
            "deleted: MeshPeer {node} was not made by the operator for Node {node}, which has \
             joined; a Node's name is reserved for its own peer. It held publicKey {}, \
             allowedIPs [{}], endpoint {}: create it again under another name",
            spec.public_key.as_deref().unwrap_or("(none)"),
            spec.allowed_ips.join(", "),
            spec.endpoint.as_deref().unwrap_or("(none)"),
        ),
    }
}

fn allocated_event(node: &str, uid: Option<String>, added: &[core::Assignment]) -> EventSpec {
    EventSpec {
        uid,
        kind: EventTarget::Peer,
        name: node.to_owned(),
        warning: false,
        reason: "SubnetAllocated".into(),
        note: added
            .iter()
            .map(|a| match &a.source {
                core::Source::Pool(p) => format!("{} from PodCIDRPool {p}", a.subnet),
                core::Source::NodePodCidrs => format!("{} from the node's spec.podCIDRs", a.subnet),
                core::Source::Reclaimed => {
                    format!("{} given back after the node re-registered", a.subnet)
                }
                core::Source::Claimed => {
                    format!("{} claimed for the node by an earlier pass", a.subnet)
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Conflicts that make a peer's allocation untrustworthy: overlaps. Other conflicts
/// (a subnet now outside every pool) are reported on the pool side and do not unready
/// the peer, since its subnet is still its own.
fn conflicts_by_peer(conflicts: &[core::Conflict]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in conflicts {
        if let core::Conflict::Overlap { peer, .. } = c {
            out.entry(peer.clone()).or_default().push(c.to_string());
        }
    }
    out
}

/// Subnets of each peer that lie outside every valid pool.
fn outside_by_peer(conflicts: &[core::Conflict]) -> BTreeMap<String, Vec<ipnet::IpNet>> {
    let mut out: BTreeMap<String, Vec<ipnet::IpNet>> = BTreeMap::new();
    for c in conflicts {
        if let core::Conflict::OutsidePools { peer, subnet } = c {
            out.entry(peer.clone()).or_default().push(*subnet);
        }
    }
    out
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn exhausted_pools(alloc: &core::AllocationPlan) -> BTreeMap<&str, BTreeSet<&str>> {
    let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (node, a) in &alloc.nodes {
        for f in &a.failures {
            if let core::AllocationFailure::Exhausted { pools, .. } = f {
                for p in pools {
                    out.entry(p.as_str()).or_default().insert(node.as_str());
                }
            }
        }
    }
    out
}

fn summarize(names: &BTreeSet<&str>) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

fn pool_reason(errors: &[core::PoolError]) -> &'static str {
    match errors.first() {
        Some(core::PoolError::OverlapsPool { .. }) => "OverlapsPool",
        Some(core::PoolError::CidrsOverlap { .. }) => "CIDRsOverlap",
        Some(core::PoolError::InvalidCidr(_)) | Some(core::PoolError::NoCidrs) => "InvalidCIDR",
        Some(core::PoolError::InvalidSelector(_)) => "InvalidNodeSelector",
        Some(_) => "InvalidPrefixLength",
        None => "Invalid",
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;

/// The claims to add (subnets node peers hold without one) and to take out: a claim no peer
/// holds and the plan does not give to its holder goes once its holder's grace period for the
/// subnet is over, or else [`CLAIM_GRACE`] after it was made (a write that never landed).
fn plan_claims(
    out: &mut Plan,
    snap: &Snapshot,
    existing: &BTreeMap<String, Vec<String>>,
    released: &[core::Released],
    alloc: &core::AllocationPlan,
) {
    let mut held: BTreeMap<ipnet::IpNet, &str> = BTreeMap::new();
    for (peer, subnets) in existing {
        for subnet in subnets.iter().filter_map(|s| core::parse_network(s).ok()) {
            held.entry(subnet).or_insert(peer);
        }
    }
    for h in &alloc.grace.held {
        held.entry(h.subnet).or_insert(&h.peer);
    }
    let freed: BTreeSet<&ipnet::IpNet> = alloc.grace.freed.iter().collect();
    for (subnet, holder) in &held {
        if !snap.ledger.entries.contains_key(subnet) {
            out.claims.push(ClaimWrite {
                subnet: subnet.to_string(),
                holder: (*holder).to_owned(),
            });
        }
    }
    for (subnet, entry) in &snap.ledger.entries {
        let needed = held.get(subnet) == Some(&entry.holder.as_str())
            || alloc
                .nodes
                .get(&entry.holder)
                .is_some_and(|a| a.subnets.contains(subnet));
        if needed {
            continue;
        }
        let released_by_holder = freed.contains(subnet)
            && released
                .iter()
                .any(|r| r.peer == entry.holder && r.subnets.contains(subnet));
        let Some(due) = (SystemTime::UNIX_EPOCH + Duration::from_secs(entry.claimed_at))
            .checked_add(CLAIM_GRACE)
        else {
            continue;
        };
        if released_by_holder || due <= snap.now {
            out.stale_claims.push(Removal {
                subnet: *subnet,
                holder: entry.holder.clone(),
                claimed_at: entry.claimed_at,
            });
        } else {
            out.requeue_at = Some(out.requeue_at.map_or(due, |r| r.min(due)));
        }
    }
}
