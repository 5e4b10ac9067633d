//! Peer admission: which `MeshPeer`s may join the mesh, with which key, allowed IPs and
//! endpoints, and — for those that may not — a reason a person can act on.
//!
//! This module owns the admission decision and the wording of `MeshPeer` readiness. It must not
//! allocate subnets (that is [`crate::ipam`]; node peers arrive with their allocation), write
//! status, or trust what a peer says about itself: a node peer's approved allowed IPs are
//! exactly the pod subnets IPAM gave it, whatever else it publishes.
//!
//! Rules:
//!
//! - **Authority.** Node peers outrank external peers: an external peer may not claim any
//!   address of a pool (the pods' address space), any node's pod subnet (also outside pools, in
//!   honour-node-podCIDRs mode), or an address inside which a node's endpoint lies. Among peers of
//!   the same kind the older one (creation time, then name) keeps what both claim, so a new peer
//!   can never take something from one that works.
//! - **What an external peer's claims cover.** An external peer's allowed IPs count as claimed,
//!   for younger peers, once they pass the address checks — even if the peer is not ready for an
//!   unrelated reason such as a mistyped key. Fixing the key then does not take the addresses
//!   away from someone else.
//! - **Only what the mesh opens.** An external peer's allowed IPs must each lie inside one of
//!   the ranges the `Mesh` opens to external peers (`spec.externalPeers.allowedRanges`; none by
//!   default). Whoever may create `MeshPeer`s therefore cannot route the cloud's metadata
//!   service, the API server or half the Internet through a machine of theirs: only a cluster
//!   admin, who edits the `Mesh`, decides what address space external machines may own.
//! - **No default route.** `0.0.0.0/0` and `::/0` are refused for external peers: every node
//!   would send all of its traffic, including to the API server, to a laptop.
//! - **No loops.** Allowed IPs may not contain a peer's own endpoint or an endpoint of a node or
//!   an older external peer, and an external peer's endpoint may not lie inside the mesh's
//!   address space: the agent would route the tunnel's own UDP packets into the tunnel.
//! - **Endpoints are IP literals** (`192.0.2.1:51820`, `[2001:db8::1]:51820`). DNS names are
//!   refused in v1alpha1: the agent configures UDP endpoints on the device directly and does not
//!   resolve (or re-resolve) names.
//! - **Keys.** A node may lack a key until its agent starts (`NoPublicKey`). A duplicated key
//!   stays with the peer using it longest (see [`crate::keys::find_duplicate_keys`]). A bad
//!   *next* key does not make a node unready — its current key still works — but is not approved.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::ipam::Pool;
use crate::keys::{DuplicateKey, KeyClaim, KeyError, KeyUse, PublicKey, find_duplicate_keys};
use crate::net::{NetworkError, overlaps, parse_network};

/// The port WireGuard listens on by default, used in suggestions.
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;

/// A node's `MeshPeer`, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePeer {
    /// The peer's (and node's) name.
    pub name: String,
    /// `metadata.creationTimestamp` of the `MeshPeer`.
    pub created: SystemTime,
    /// The pod subnets IPAM allocated ([`crate::ipam::NodeAllocation::subnets`]).
    pub pod_cidrs: Vec<IpNet>,
    /// The key the agent published, if any.
    pub public_key: Option<String>,
    /// The key the agent will rotate to, if announced.
    pub next_public_key: Option<String>,
    /// Endpoints the agent published (`host:port`).
    pub endpoints: Vec<String>,
    /// Public endpoints the agent published (`host:port`): where other locations reach it.
    pub public_endpoints: Vec<String>,
}

/// A user-created `MeshPeer` for a laptop, VM or other machine outside the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalPeer {
    /// The peer's name.
    pub name: String,
    /// `metadata.creationTimestamp`.
    pub created: SystemTime,
    /// `spec.publicKey`; `None` or empty when missing.
    pub public_key: Option<String>,
    /// `spec.allowedIPs`.
    pub allowed_ips: Vec<String>,
    /// `spec.endpoint`, if the machine is reachable at a fixed address.
    pub endpoint: Option<String>,
}

/// Whether a peer is a node or an external machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PeerKind {
    /// A cluster node, managed by the operator.
    Node,
    /// A user-created peer.
    External,
}

/// The machine-readable reason of a peer's `Ready` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// The peer is admitted.
    Valid,
    /// No public key (yet).
    NoPublicKey,
    /// The public key is malformed, all zeros or of low order.
    InvalidPublicKey,
    /// Another peer holds the public key.
    DuplicatePublicKey,
    /// The node has no pod subnet.
    NoPodSubnet,
    /// An external peer lists no allowed IPs.
    NoAllowedIPs,
    /// An allowed IP is not a canonical network.
    InvalidAllowedIPs,
    /// An allowed IP is `0.0.0.0/0` or `::/0`.
    AllowedIPsDefaultRoute,
    /// An allowed IP lies outside every range the mesh opens to external peers.
    AllowedIPsOutsideMeshRanges,
    /// An allowed IP overlaps the pods' address space.
    AllowedIPsOverlapPodSubnet,
    /// An allowed IP overlaps an older peer's.
    AllowedIPsOverlapPeer,
    /// An allowed IP contains a peer's endpoint.
    AllowedIPsCaptureEndpoint,
    /// An endpoint is malformed or lies inside the mesh.
    InvalidEndpoint,
}

impl Reason {
    /// The CamelCase name used as the condition's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Valid => "Valid",
            Reason::NoPublicKey => "NoPublicKey",
            Reason::InvalidPublicKey => "InvalidPublicKey",
            Reason::DuplicatePublicKey => "DuplicatePublicKey",
            Reason::NoPodSubnet => "NoPodSubnet",
            Reason::NoAllowedIPs => "NoAllowedIPs",
            Reason::InvalidAllowedIPs => "InvalidAllowedIPs",
            Reason::AllowedIPsDefaultRoute => "AllowedIPsDefaultRoute",
            Reason::AllowedIPsOutsideMeshRanges => "AllowedIPsOutsideMeshRanges",
            Reason::AllowedIPsOverlapPodSubnet => "AllowedIPsOverlapPodSubnet",
            Reason::AllowedIPsOverlapPeer => "AllowedIPsOverlapPeer",
            Reason::AllowedIPsCaptureEndpoint => "AllowedIPsCaptureEndpoint",
            Reason::InvalidEndpoint => "InvalidEndpoint",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an endpoint string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Empty string.
    #[error("the endpoint is empty")]
    Empty,
    /// A DNS name instead of an IP literal.
    #[error(
        "{host:?} is a DNS name; use an IP literal such as 192.0.2.1:{DEFAULT_WIREGUARD_PORT} or \
         [2001:db8::1]:{DEFAULT_WIREGUARD_PORT} (the agent sets UDP endpoints directly and does \
         not resolve names)"
    )]
    HostName {
        /// The name.
        host: String,
    },
    /// An address without a port. (`2001:db8::1:8080` is read as an address, too.)
    #[error(
        "no port; write {} (an IPv6 address goes in brackets before the port)",
        suggest_endpoint(.addr)
    )]
    MissingPort {
        /// The address.
        addr: IpAddr,
    },
    /// An IPv6 address and port without the brackets, e.g. `2001:db8::1:51820`.
    #[error("an IPv6 address goes in brackets before the port: write [{addr}]:{port}")]
    Ipv6WithoutBrackets {
        /// The address.
        addr: std::net::Ipv6Addr,
        /// The port.
        port: u16,
    },
    /// Port 0.
    #[error("port 0 is not a port a peer can listen on; use 1-65535")]
    PortZero,
    /// A port above 65535.
    #[error("port {port} is out of range; use 1-65535")]
    PortOutOfRange {
        /// The port as written.
        port: String,
    },
    /// `0.0.0.0` or `::`.
    #[error("{addr} is the unspecified address, not a host")]
    Unspecified {
        /// The address.
        addr: IpAddr,
    },
    /// A multicast or broadcast address.
    #[error("{addr} is a multicast or broadcast address, not a host")]
    NotUnicast {
        /// The address.
        addr: IpAddr,
    },
    /// Anything else.
    #[error(
        "not host:port; write 192.0.2.1:{DEFAULT_WIREGUARD_PORT} or [2001:db8::1]:{DEFAULT_WIREGUARD_PORT}"
    )]
    Malformed,
}

fn suggest_endpoint(addr: &IpAddr) -> String {
    SocketAddr::new(*addr, DEFAULT_WIREGUARD_PORT).to_string()
}

/// Parses an endpoint: an IP literal and a port (`192.0.2.1:51820`, `[2001:db8::1]:51820`).
///
/// Refuses DNS names, port 0, the unspecified address and multicast/broadcast addresses, each
/// with an [`EndpointError`] saying how to write it instead.
pub fn parse_endpoint(value: &str) -> Result<SocketAddr, EndpointError> {
    if value.is_empty() {
        return Err(EndpointError::Empty);
    }
    if let Ok(addr) = SocketAddr::from_str(value) {
        let ip = addr.ip();
        if addr.port() == 0 {
            return Err(EndpointError::PortZero);
        }
        if ip.is_unspecified() {
            return Err(EndpointError::Unspecified { addr: ip });
        }
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_multicast() || broadcast {
            return Err(EndpointError::NotUnicast { addr: ip });
        }
        return Ok(addr);
    }
    if let Ok(addr) = IpAddr::from_str(value) {
        return Err(EndpointError::MissingPort { addr });
    }
    let (host, port) = match value.strip_prefix('[') {
        Some(rest) => match rest.split_once("]:") {
            Some((host, port)) => (host, port),
            None => return Err(EndpointError::Malformed),
        },
        None => match value.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (value, ""),
        },
    };
    if !value.starts_with('[')
        && let (Ok(addr), Ok(port)) = (std::net::Ipv6Addr::from_str(host), port.parse::<u16>())
    {
        return Err(EndpointError::Ipv6WithoutBrackets { addr, port });
    }
    let host_is_ip = IpAddr::from_str(host).is_ok();
    if host_is_ip && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(EndpointError::PortOutOfRange { port: port.into() });
    }
    if !host_is_ip && is_dns_name(host) {
        return Err(EndpointError::HostName { host: host.into() });
    }
    Err(EndpointError::Malformed)
}

/// Whether `host` looks like a DNS name (letters, digits, `-`, `.`, with at least one letter).
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && host.bytes().any(|b| b.is_ascii_alphabetic())
}

/// One reason a peer is not admitted. The `Display` text is the condition message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerProblem {
    /// A node whose agent has not published its key yet.
    #[error("the node agent has not published a public key yet")]
    KeyNotPublished,
    /// An external peer without `spec.publicKey`.
    #[error("spec.publicKey is empty; set it to the machine's WireGuard public key (`wg pubkey`)")]
    KeyMissing,
    /// A malformed or weak key.
    #[error("{0}")]
    InvalidKey(KeyError),
    /// A key another peer holds.
    #[error("{0}; give this peer its own key pair")]
    DuplicateKey(DuplicateKey),
    /// A node without a pod subnet.
    #[error("no pod subnet is allocated to this node; check the PodCIDRPools that select it")]
    NoPodSubnet,
    /// An external peer without allowed IPs.
    #[error("spec.allowedIPs is empty; list the networks this peer owns, e.g. its address/32")]
    NoAllowedIPs,
    /// Malformed allowed IPs.
    #[error("spec.allowedIPs: {}", join(.0))]
    InvalidAllowedIPs(Vec<NetworkError>),
    /// `0.0.0.0/0` or `::/0`.
    #[error(
        "allowed IP {net} would send all traffic of every node to this peer; list only the \
         networks it owns"
    )]
    DefaultRoute {
        /// The default route.
        net: IpNet,
    },
    /// An allowed IP outside every range the mesh opens to external peers.
    #[error(
        "allowed IP {allowed} lies outside the ranges the Mesh opens to external peers ({}); \
         a cluster admin adds a range to the Mesh's spec.externalPeers.allowedRanges",
        ranges_text(.ranges)
    )]
    OutsideMeshRanges {
        /// This peer's network.
        allowed: IpNet,
        /// The mesh's ranges.
        ranges: Vec<IpNet>,
    },
    /// An allowed IP overlaps a node's pod subnet.
    #[error("allowed IP {allowed} overlaps {pod_subnet}, the pod subnet of node {node}")]
    OverlapsPodSubnet {
        /// This peer's network.
        allowed: IpNet,
        /// The node.
        node: String,
        /// The node's pod subnet.
        pod_subnet: IpNet,
    },
    /// An allowed IP overlaps a pool.
    #[error(
        "allowed IP {allowed} overlaps {cidr} of PodCIDRPool {pool}, which is reserved for pods"
    )]
    OverlapsPool {
        /// This peer's network.
        allowed: IpNet,
        /// The pool.
        pool: String,
        /// The pool's CIDR.
        cidr: IpNet,
    },
    /// An allowed IP or pod subnet overlaps an older peer's.
    #[error("{ours} overlaps {theirs} of peer {other}, which claimed it first")]
    OverlapsPeer {
        /// This peer's network.
        ours: IpNet,
        /// The other peer.
        other: String,
        /// The other peer's network.
        theirs: IpNet,
    },
    /// An allowed IP or pod subnet contains an endpoint.
    #[error(
        "{net} contains {endpoint}, the endpoint of peer {peer}; the tunnel's own packets \
         would be routed into it"
    )]
    CapturesEndpoint {
        /// This peer's network.
        net: IpNet,
        /// The endpoint's address.
        endpoint: IpAddr,
        /// Whose endpoint it is (possibly this peer).
        peer: String,
    },
    /// A malformed endpoint.
    #[error("endpoint {value:?}: {error}")]
    InvalidEndpoint {
        /// The endpoint as written.
        value: String,
        /// What is wrong.
        error: EndpointError,
    },
    /// An endpoint inside the mesh's address space.
    #[error(
        "endpoint {endpoint} lies in {net} of {owner}, which is routed through the mesh; \
         use the machine's address outside it"
    )]
    EndpointInsideMesh {
        /// The endpoint.
        endpoint: SocketAddr,
        /// The network it lies in.
        net: IpNet,
        /// Whose network that is, e.g. `PodCIDRPool pods` or `peer laptop`.
        owner: String,
    },
}

fn ranges_text(ranges: &[IpNet]) -> String {
    if ranges.is_empty() {
        return "none".to_owned();
    }
    let texts: Vec<String> = ranges.iter().map(ToString::to_string).collect();
    texts.join(", ")
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl PeerProblem {
    /// The condition reason this problem maps to.
    pub fn reason(&self) -> Reason {
        match self {
            PeerProblem::KeyNotPublished | PeerProblem::KeyMissing => Reason::NoPublicKey,
            PeerProblem::InvalidKey(_) => Reason::InvalidPublicKey,
            PeerProblem::DuplicateKey(_) => Reason::DuplicatePublicKey,
            PeerProblem::NoPodSubnet => Reason::NoPodSubnet,
            PeerProblem::NoAllowedIPs => Reason::NoAllowedIPs,
            PeerProblem::InvalidAllowedIPs(_) => Reason::InvalidAllowedIPs,
            PeerProblem::DefaultRoute { .. } => Reason::AllowedIPsDefaultRoute,
            PeerProblem::OutsideMeshRanges { .. } => Reason::AllowedIPsOutsideMeshRanges,
            PeerProblem::OverlapsPodSubnet { .. } | PeerProblem::OverlapsPool { .. } => {
                Reason::AllowedIPsOverlapPodSubnet
            }
            PeerProblem::OverlapsPeer { .. } => Reason::AllowedIPsOverlapPeer,
            PeerProblem::CapturesEndpoint { .. } => Reason::AllowedIPsCaptureEndpoint,
            PeerProblem::InvalidEndpoint { .. } | PeerProblem::EndpointInsideMesh { .. } => {
                Reason::InvalidEndpoint
            }
        }
    }
}

/// What an admitted peer may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approved {
    /// The key to configure.
    pub public_key: PublicKey,
    /// The announced next key, if valid and not someone else's.
    pub next_public_key: Option<PublicKey>,
    /// The allowed IPs to configure: a node's pod subnets, or an external peer's networks;
    /// sorted, IPv4 first.
    pub allowed_ips: Vec<IpNet>,
    /// Endpoints to configure, in the order published.
    pub endpoints: Vec<SocketAddr>,
    /// Node peers: public endpoints, in the order published.
    pub public_endpoints: Vec<SocketAddr>,
}

/// The admission decision for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Node or external.
    pub kind: PeerKind,
    /// Everything wrong, most fundamental first. Empty iff the peer is admitted.
    pub problems: Vec<PeerProblem>,
    /// Why the announced next key was not approved, if it was not.
    pub next_key_problem: Option<PeerProblem>,
    /// What the peer may use; `Some` iff `problems` is empty.
    pub approved: Option<Approved>,
}

impl Verdict {
    /// Whether the peer is admitted (`Ready=True`).
    pub fn ready(&self) -> bool {
        self.approved.is_some()
    }

    /// The condition reason: that of the first problem, or [`Reason::Valid`].
    pub fn reason(&self) -> Reason {
        self.problems
            .first()
            .map_or(Reason::Valid, PeerProblem::reason)
    }

    /// The condition message: every problem, most fundamental first, or a short confirmation.
    pub fn message(&self) -> String {
        if self.problems.is_empty() {
            match &self.next_key_problem {
                None => "the peer is valid".to_owned(),
                Some(p) => format!("the peer is valid, but its next public key is not: {p}"),
            }
        } else {
            join(&self.problems)
        }
    }
}

/// A peer in seniority order, with a uniform view of what both kinds share.
#[derive(Debug, Clone, Copy)]
enum Subject<'a> {
    Node(&'a NodePeer),
    External(&'a ExternalPeer),
}

impl Subject<'_> {
    fn name(&self) -> &str {
        match self {
            Subject::Node(n) => &n.name,
            Subject::External(e) => &e.name,
        }
    }
}

/// Decides admission for every peer (see the module docs for the rules).
///
/// `pools` are the valid pools; `external_ranges` the ranges the mesh opens to external peers.
/// The result does not depend on the order of the input lists. Peer names are expected to be
/// unique across both lists (they are `MeshPeer` names).
pub fn admit(
    pools: &[Pool],
    nodes: &[NodePeer],
    externals: &[ExternalPeer],
    external_ranges: &[IpNet],
) -> BTreeMap<String, Verdict> {
    let mut nodes: Vec<&NodePeer> = nodes.iter().collect();
    nodes.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut externals: Vec<&ExternalPeer> = externals.iter().collect();
    externals.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut pools: Vec<&Pool> = pools.iter().collect();
    pools.sort_by(|a, b| (a.created(), a.name()).cmp(&(b.created(), b.name())));

    let keys = KeyCheck::new(&nodes, &externals);

    // Node endpoints (public ones too), for loop checks.
    let mut node_endpoints: Vec<(&str, SocketAddr)> = Vec::new();
    let mut node_public: Vec<(&str, SocketAddr)> = Vec::new();
    let mut node_endpoint_problems: BTreeMap<&str, Vec<PeerProblem>> = BTreeMap::new();
    for node in &nodes {
        let public = node.public_endpoints.iter().map(|v| (v, true));
        for (value, is_public) in node.endpoints.iter().map(|v| (v, false)).chain(public) {
            match parse_endpoint(value) {
                Ok(addr) if is_public => node_public.push((&node.name, addr)),
                Ok(addr) => node_endpoints.push((&node.name, addr)),
                Err(error) => node_endpoint_problems.entry(&node.name).or_default().push(
                    PeerProblem::InvalidEndpoint {
                        value: value.clone(),
                        error,
                    },
                ),
            }
        }
    }

    let mut verdicts = BTreeMap::new();

    for (i, node) in nodes.iter().enumerate() {
        let subject = Subject::Node(node);
        let mut problems = keys.problems(subject);
        let mut pod_cidrs = node.pod_cidrs.clone();
        pod_cidrs.sort();
        pod_cidrs.dedup();
        if pod_cidrs.is_empty() {
            problems.push(PeerProblem::NoPodSubnet);
        }
        for ours in &pod_cidrs {
            for older in &nodes[..i] {
                for theirs in older.pod_cidrs.iter().filter(|t| overlaps(t, ours)) {
                    problems.push(PeerProblem::OverlapsPeer {
                        ours: *ours,
                        other: older.name.clone(),
                        theirs: *theirs,
                    });
                }
            }
            problems.extend(captures(
                ours,
                node_endpoints.iter().chain(&node_public).copied(),
            ));
        }
        problems.extend(
            node_endpoint_problems
                .remove(node.name.as_str())
                .unwrap_or_default(),
        );
        let own = |list: &[(&str, SocketAddr)]| -> Vec<SocketAddr> {
            list.iter()
                .filter(|(n, _)| *n == node.name)
                .map(|(_, a)| *a)
                .collect()
        };
        let mut verdict = keys.verdict(subject, problems, pod_cidrs, own(&node_endpoints));
        if let Some(a) = verdict.approved.as_mut() {
            a.public_endpoints = own(&node_public);
        }
        verdicts.insert(node.name.clone(), verdict);
    }

    // Networks older external peers hold, and their endpoints, in seniority order.
    let mut claimed: Vec<(&str, IpNet)> = Vec::new();
    let mut external_endpoints: Vec<(&str, SocketAddr)> = Vec::new();
    for ext in &externals {
        let subject = Subject::External(ext);
        let mut problems = keys.problems(subject);

        let endpoint = ext
            .endpoint
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(|value| {
                parse_endpoint(value).map_err(|error| PeerProblem::InvalidEndpoint {
                    value: value.to_owned(),
                    error,
                })
            });
        let own_endpoint = endpoint.as_ref().and_then(|e| e.as_ref().ok()).copied();

        let (allowed, address_problems) = check_allowed_ips(
            ext,
            external_ranges,
            &pools,
            &nodes,
            &claimed,
            node_endpoints
                .iter()
                .chain(&node_public)
                .chain(&external_endpoints)
                .copied()
                .chain(own_endpoint.map(|a| (ext.name.as_str(), a))),
        );
        if address_problems.is_empty() {
            claimed.extend(allowed.iter().map(|n| (ext.name.as_str(), *n)));
        }
        problems.extend(address_problems);

        match endpoint {
            None => {}
            Some(Err(p)) => problems.push(p),
            Some(Ok(addr)) => match endpoint_inside_mesh(addr, &pools, &nodes, &claimed, &ext.name)
            {
                Some(p) => problems.push(p),
                None => external_endpoints.push((&ext.name, addr)),
            },
        }
        verdicts.insert(
            ext.name.clone(),
            keys.verdict(
                subject,
                problems,
                allowed,
                own_endpoint.into_iter().collect(),
            ),
        );
    }
    verdicts
}

/// Checks an external peer's allowed IPs. Returns the parsed networks (sorted, deduplicated)
/// and the problems; the networks count as claimed only if there are no problems.
fn check_allowed_ips<'a>(
    ext: &ExternalPeer,
    ranges: &[IpNet],
    pools: &[&Pool],
    nodes: &[&NodePeer],
    claimed: &[(&str, IpNet)],
    endpoints: impl Iterator<Item = (&'a str, SocketAddr)> + Clone,
) -> (Vec<IpNet>, Vec<PeerProblem>) {
    if ext.allowed_ips.is_empty() {
        return (Vec::new(), vec![PeerProblem::NoAllowedIPs]);
    }
    let mut nets = Vec::new();
    let mut malformed = Vec::new();
    for value in &ext.allowed_ips {
        match parse_network(value) {
            Ok(net) => nets.push(net),
            Err(e) => malformed.push(e),
        }
    }
    if !malformed.is_empty() {
        return (Vec::new(), vec![PeerProblem::InvalidAllowedIPs(malformed)]);
    }
    nets.sort();
    nets.dedup();

    let mut problems = Vec::new();
    for net in &nets {
        if net.prefix_len() == 0 {
            problems.push(PeerProblem::DefaultRoute { net: *net });
            continue;
        }
        let before = problems.len();
        for node in nodes {
            for pod_subnet in node.pod_cidrs.iter().filter(|p| overlaps(p, net)) {
                problems.push(PeerProblem::OverlapsPodSubnet {
                    allowed: *net,
                    node: node.name.clone(),
                    pod_subnet: *pod_subnet,
                });
            }
        }
        // A network overlapping a node's subnet overlaps its pool too; naming the node is
        // the more useful of the two.
        if problems.len() == before {
            for pool in pools {
                if let Some(cidr) = pool.overlapping(net) {
                    problems.push(PeerProblem::OverlapsPool {
                        allowed: *net,
                        pool: pool.name().to_owned(),
                        cidr: *cidr,
                    });
                }
            }
        }
        for (other, theirs) in claimed.iter().filter(|(_, t)| overlaps(t, net)) {
            problems.push(PeerProblem::OverlapsPeer {
                ours: *net,
                other: (*other).to_owned(),
                theirs: *theirs,
            });
        }
        problems.extend(captures(net, endpoints.clone()));
        // After the overlaps: "it is the pods' address space" says more than "the mesh did
        // not open it".
        if !ranges.iter().any(|r| r.contains(net)) {
            problems.push(PeerProblem::OutsideMeshRanges {
                allowed: *net,
                ranges: ranges.to_vec(),
            });
        }
    }
    (nets, problems)
}

/// The endpoints `net` contains.
fn captures<'a>(
    net: &IpNet,
    endpoints: impl Iterator<Item = (&'a str, SocketAddr)>,
) -> impl Iterator<Item = PeerProblem> {
    let net = *net;
    endpoints
        .filter(move |(_, a)| net.contains(&a.ip()))
        .map(move |(peer, a)| PeerProblem::CapturesEndpoint {
            net,
            endpoint: a.ip(),
            peer: peer.to_owned(),
        })
}

/// Whether an external peer's endpoint lies in the pods' address space or in an older peer's
/// (or its own) allowed IPs.
fn endpoint_inside_mesh(
    endpoint: SocketAddr,
    pools: &[&Pool],
    nodes: &[&NodePeer],
    claimed: &[(&str, IpNet)],
    own_name: &str,
) -> Option<PeerProblem> {
    let ip = endpoint.ip();
    let inside = |net: &IpNet, owner: String| {
        net.contains(&ip)
            .then_some(PeerProblem::EndpointInsideMesh {
                endpoint,
                net: *net,
                owner,
            })
    };
    nodes
        .iter()
        .flat_map(|n| {
            n.pod_cidrs
                .iter()
                .map(move |c| (c, format!("node {}", n.name)))
        })
        .chain(pools.iter().flat_map(|p| {
            p.cidrs()
                .iter()
                .map(move |c| (c, format!("PodCIDRPool {}", p.name())))
        }))
        .chain(
            claimed
                .iter()
                .filter(|(peer, _)| *peer != own_name)
                .map(|(peer, c)| (c, format!("peer {peer}"))),
        )
        .find_map(|(net, owner)| inside(net, owner))
}

/// Key parsing and duplicate detection for every peer at once.
#[derive(Debug)]
struct KeyCheck {
    /// Per peer name: the parsed current key or the problem with it.
    current: BTreeMap<String, Result<PublicKey, PeerProblem>>,
    /// Per node name: the parsed next key or the problem with it, if one was announced.
    next: BTreeMap<String, Result<PublicKey, PeerProblem>>,
}

impl KeyCheck {
    fn new(nodes: &[&NodePeer], externals: &[&ExternalPeer]) -> KeyCheck {
        let parse = |k: &str| k.parse::<PublicKey>().map_err(PeerProblem::InvalidKey);
        let mut current = BTreeMap::new();
        let mut next = BTreeMap::new();
        let mut claims = Vec::new();
        for node in nodes {
            let key = match node.public_key.as_deref().filter(|k| !k.is_empty()) {
                None => Err(PeerProblem::KeyNotPublished),
                Some(k) => parse(k),
            };
            if let Some(k) = node.next_public_key.as_deref().filter(|k| !k.is_empty()) {
                let parsed = parse(k);
                if let Ok(key) = parsed {
                    claims.push(claim(&node.name, node.created, KeyUse::Next, key));
                }
                next.insert(node.name.clone(), parsed);
            }
            if let Ok(key) = key {
                claims.push(claim(&node.name, node.created, KeyUse::Current, key));
            }
            current.insert(node.name.clone(), key);
        }
        for ext in externals {
            let key = match ext.public_key.as_deref().filter(|k| !k.is_empty()) {
                None => Err(PeerProblem::KeyMissing),
                Some(k) => parse(k),
            };
            if let Ok(key) = key {
                claims.push(claim(&ext.name, ext.created, KeyUse::Current, key));
            }
            current.insert(ext.name.clone(), key);
        }
        for (c, dup) in claims.iter().zip(find_duplicate_keys(&claims)) {
            let Some(dup) = dup else { continue };
            let slot = match c.usage {
                KeyUse::Current => &mut current,
                KeyUse::Next => &mut next,
            };
            slot.insert(c.peer.clone(), Err(PeerProblem::DuplicateKey(dup)));
        }
        KeyCheck { current, next }
    }

    fn problems(&self, subject: Subject<'_>) -> Vec<PeerProblem> {
        match self.current.get(subject.name()) {
            Some(Err(p)) => vec![p.clone()],
            _ => Vec::new(),
        }
    }

    fn verdict(
        &self,
        subject: Subject<'_>,
        problems: Vec<PeerProblem>,
        allowed_ips: Vec<IpNet>,
        endpoints: Vec<SocketAddr>,
    ) -> Verdict {
        let name = subject.name();
        let kind = match subject {
            Subject::Node(_) => PeerKind::Node,
            Subject::External(_) => PeerKind::External,
        };
        let (next_public_key, next_key_problem) = match self.next.get(name) {
            None => (None, None),
            Some(Ok(k)) => (Some(*k), None),
            Some(Err(p)) => (None, Some(p.clone())),
        };
        let approved = match self.current.get(name) {
            Some(Ok(public_key)) if problems.is_empty() => Some(Approved {
                public_key: *public_key,
                next_public_key,
                allowed_ips,
                endpoints,
                public_endpoints: Vec::new(),
            }),
            _ => None,
        };
        Verdict {
            kind,
            problems,
            next_key_problem,
            approved,
        }
    }
}

fn claim(peer: &str, created: SystemTime, usage: KeyUse, key: PublicKey) -> KeyClaim {
    KeyClaim {
        peer: peer.to_owned(),
        created,
        usage,
        key,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::ipam::{PoolSpec, PrefixLengths, validate_pools};

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test network parses")
    }

    /// A distinct valid key per `i` (never a low-order point for `i >= 2`).
    fn key(i: u8) -> String {
        PublicKey::from_bytes([i; 32])
            .expect("valid test key")
            .to_string()
    }

    /// A mesh that opens every address to external peers, for tests about other rules.
    fn open_ranges() -> Vec<IpNet> {
        vec![net("0.0.0.0/0"), net("::/0")]
    }

    #[test]
    fn an_external_peer_may_claim_only_inside_the_ranges_the_mesh_opens() {
        let site = mk_peer("site", 5, 2, &["192.168.50.0/24"]);
        let metadata = mk_peer("metadata", 2, 3, &["169.254.169.254/32"]);
        let half = mk_peer("half", 3, 4, &["128.0.0.0/1"]);
        let straddling = mk_peer("straddling", 4, 5, &["192.168.50.0/24", "192.168.0.0/16"]);
        let externals = [site, metadata, half, straddling];

        // Nothing opened (the default): every external peer is refused, nothing approved.
        let closed = admit(&pools(), &[], &externals, &[]);
        for (name, v) in &closed {
            assert_eq!(v.reason(), Reason::AllowedIPsOutsideMeshRanges, "{name}");
            assert!(v.approved.is_none(), "{name}");
            assert!(v.message().contains("(none)"), "{}", v.message());
        }

        // One range opened: only the peer entirely inside it is admitted.
        let verdicts = admit(&pools(), &[], &externals, &[net("192.168.50.0/24")]);
        assert_eq!(
            reasons(&verdicts),
            BTreeMap::from([
                ("half", Reason::AllowedIPsOutsideMeshRanges),
                ("metadata", Reason::AllowedIPsOutsideMeshRanges),
                ("site", Reason::Valid),
                ("straddling", Reason::AllowedIPsOutsideMeshRanges),
            ])
        );
        let message = verdicts["metadata"].message();
        assert!(
            message.contains("169.254.169.254/32") && message.contains("spec.externalPeers"),
            "{message}"
        );
    }

    #[test]
    fn an_open_range_does_not_open_the_pods_address_space() {
        let inside_pods = mk_peer("inside-pods", 1, 2, &["10.244.9.0/24"]);
        let v = &admit(&pools(), &[], &[inside_pods], &[net("10.0.0.0/8")])["inside-pods"];
        assert_eq!(v.reason(), Reason::AllowedIPsOverlapPodSubnet);
    }

    fn pools() -> Vec<Pool> {
        let v = validate_pools(&[PoolSpec {
            name: "pods".into(),
            created: t(0),
            cidrs: vec!["10.244.0.0/16".into(), "fd00:244::/48".into()],
            node_prefix_length: PrefixLengths {
                ipv4: Some(24),
                ipv6: Some(64),
            },
            node_selector: None,
        }]);
        assert!(v.refused.is_empty());
        v.valid
    }

    fn mk_node(name: &str, created: u64, pod_cidrs: &[&str], key_id: Option<u8>) -> NodePeer {
        NodePeer {
            name: name.into(),
            created: t(created),
            pod_cidrs: pod_cidrs.iter().map(|c| net(c)).collect(),
            public_key: key_id.map(key),
            next_public_key: None,
            endpoints: vec![format!("192.0.2.{}:51820", created % 250 + 1)],
            public_endpoints: Vec::new(),
        }
    }

    fn mk_peer(name: &str, created: u64, key_id: u8, allowed: &[&str]) -> ExternalPeer {
        ExternalPeer {
            name: name.into(),
            created: t(created),
            public_key: Some(key(key_id)),
            allowed_ips: allowed.iter().map(|a| (*a).to_owned()).collect(),
            endpoint: None,
        }
    }

    fn reasons(verdicts: &BTreeMap<String, Verdict>) -> BTreeMap<&str, Reason> {
        verdicts
            .iter()
            .map(|(name, v)| (name.as_str(), v.reason()))
            .collect()
    }

    #[test]
    fn a_node_peer_is_approved_with_exactly_its_pod_subnets() {
        let node = mk_node("n1", 1, &["fd00:244::/64", "10.244.1.0/24"], Some(2));
        let v = &admit(&pools(), &[node], &[], &open_ranges())["n1"];
        assert!(v.ready(), "{}", v.message());
        assert_eq!(v.reason(), Reason::Valid);
        assert_eq!(v.kind, PeerKind::Node);
        let approved = v.approved.as_ref().expect("approved");
        assert_eq!(
            approved.allowed_ips,
            vec![net("10.244.1.0/24"), net("fd00:244::/64")]
        );
        assert_eq!(approved.public_key.to_string(), key(2));
        assert_eq!(
            approved.endpoints,
            vec![parse_endpoint("192.0.2.2:51820").expect("ok")]
        );
    }

    #[test]
    fn missing_and_invalid_keys_say_what_to_do() {
        let low_order = "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=";
        let mut ext_missing = mk_peer("laptop", 1, 2, &["192.168.50.1/32"]);
        ext_missing.public_key = Some(String::new());
        let mut ext_weak = mk_peer("weak", 2, 2, &["192.168.50.2/32"]);
        ext_weak.public_key = Some(low_order.into());
        let mut node_bad = mk_node("n2", 2, &["10.244.2.0/24"], None);
        node_bad.public_key = Some("not-a-key".into());
        let verdicts = admit(
            &pools(),
            &[mk_node("n1", 1, &["10.244.1.0/24"], None), node_bad],
            &[ext_missing, ext_weak],
            &open_ranges(),
        );
        assert_eq!(
            reasons(&verdicts),
            BTreeMap::from([
                ("laptop", Reason::NoPublicKey),
                ("n1", Reason::NoPublicKey),
                ("n2", Reason::InvalidPublicKey),
                ("weak", Reason::InvalidPublicKey),
            ])
        );
        assert!(verdicts["n1"].message().contains("agent"));
        assert!(verdicts["laptop"].message().contains("wg pubkey"));
        assert!(verdicts["weak"].message().contains("small order"));
        assert!(verdicts.values().all(|v| v.approved.is_none()));
    }

    #[test]
    fn the_newer_peer_with_a_duplicated_key_is_refused_whatever_the_input_order() {
        let node = mk_node("n1", 10, &["10.244.1.0/24"], Some(7));
        let old = mk_peer("old-laptop", 20, 8, &["192.168.50.1/32"]);
        let copy_of_node = mk_peer("copy", 30, 7, &["192.168.50.2/32"]);
        let copy_of_laptop = mk_peer("another", 5, 8, &["192.168.50.3/32"]);
        for externals in [
            vec![old.clone(), copy_of_node.clone(), copy_of_laptop.clone()],
            vec![copy_of_laptop.clone(), copy_of_node.clone(), old.clone()],
        ] {
            let verdicts = admit(
                &pools(),
                std::slice::from_ref(&node),
                &externals,
                &open_ranges(),
            );
            assert_eq!(
                reasons(&verdicts),
                BTreeMap::from([
                    ("another", Reason::Valid),
                    ("copy", Reason::DuplicatePublicKey),
                    ("n1", Reason::Valid),
                    ("old-laptop", Reason::DuplicatePublicKey),
                ])
            );
            assert!(verdicts["copy"].message().contains("peer n1"));
            assert!(verdicts["old-laptop"].message().contains("peer another"));
        }
    }

    #[test]
    fn a_node_without_a_pod_subnet_is_not_ready() {
        let v = &admit(
            &pools(),
            &[mk_node("n1", 1, &[], Some(2))],
            &[],
            &open_ranges(),
        )["n1"];
        assert_eq!(v.reason(), Reason::NoPodSubnet);
        assert!(v.message().contains("PodCIDRPool"));
    }

    #[test]
    fn an_external_peer_may_not_claim_pod_address_space() {
        let node = mk_node("n1", 1, &["10.244.1.0/24"], Some(2));
        let verdicts = admit(
            &pools(),
            &[node],
            &[
                mk_peer("exact", 2, 3, &["10.244.1.0/24"]),
                mk_peer("inside", 3, 4, &["10.244.1.7/32"]),
                mk_peer("around", 4, 5, &["192.168.0.0/24", "10.0.0.0/8"]),
                mk_peer("free-pool-space", 5, 6, &["10.244.99.0/24"]),
                mk_peer("v6", 6, 9, &["fd00:244:0:5::/64"]),
            ],
            &open_ranges(),
        );
        for name in ["exact", "inside", "around", "free-pool-space", "v6"] {
            assert_eq!(
                verdicts[name].reason(),
                Reason::AllowedIPsOverlapPodSubnet,
                "{name}"
            );
        }
        assert_eq!(
            verdicts["around"].problems,
            vec![PeerProblem::OverlapsPodSubnet {
                allowed: net("10.0.0.0/8"),
                node: "n1".into(),
                pod_subnet: net("10.244.1.0/24"),
            }]
        );
        let message = verdicts["inside"].message();
        assert!(
            message.contains("10.244.1.7/32")
                && message.contains("10.244.1.0/24")
                && message.contains("node n1"),
            "{message}"
        );
        let message = verdicts["free-pool-space"].message();
        assert!(
            message.contains("PodCIDRPool pods") && message.contains("10.244.0.0/16"),
            "{message}"
        );
        assert!(verdicts["n1"].ready());
    }

    #[test]
    fn of_two_external_peers_claiming_the_same_addresses_the_older_keeps_them() {
        let older = mk_peer("older", 1, 2, &["192.168.10.0/24"]);
        let newer = mk_peer("newer", 2, 3, &["192.168.10.128/25", "192.168.20.0/24"]);
        for externals in [
            vec![older.clone(), newer.clone()],
            vec![newer.clone(), older.clone()],
        ] {
            let verdicts = admit(&pools(), &[], &externals, &open_ranges());
            assert!(verdicts["older"].ready());
            assert_eq!(
                verdicts["newer"].problems,
                vec![PeerProblem::OverlapsPeer {
                    ours: net("192.168.10.128/25"),
                    other: "older".into(),
                    theirs: net("192.168.10.0/24"),
                }]
            );
            assert_eq!(verdicts["newer"].reason(), Reason::AllowedIPsOverlapPeer);
        }
    }

    #[test]
    fn an_older_peer_with_a_bad_key_still_holds_its_addresses() {
        let mut older = mk_peer("older", 1, 2, &["192.168.10.0/24"]);
        older.public_key = Some("typo".into());
        let newer = mk_peer("newer", 2, 3, &["192.168.10.0/24"]);
        let verdicts = admit(&pools(), &[], &[older, newer], &open_ranges());
        assert_eq!(verdicts["older"].reason(), Reason::InvalidPublicKey);
        assert_eq!(verdicts["newer"].reason(), Reason::AllowedIPsOverlapPeer);
    }

    #[test]
    fn a_peer_refused_for_its_addresses_claims_nothing() {
        let first = mk_peer("first", 1, 2, &["0.0.0.0/0"]);
        let second = mk_peer("second", 2, 3, &["192.168.10.0/24"]);
        let verdicts = admit(&pools(), &[], &[first, second], &open_ranges());
        assert_eq!(verdicts["first"].reason(), Reason::AllowedIPsDefaultRoute);
        assert!(
            verdicts["second"].ready(),
            "{}",
            verdicts["second"].message()
        );
    }

    #[test]
    fn default_routes_malformed_and_missing_allowed_ips_are_refused() {
        let verdicts = admit(
            &pools(),
            &[],
            &[
                mk_peer("v4-default", 1, 2, &["0.0.0.0/0"]),
                mk_peer("v6-default", 2, 3, &["::/0"]),
                mk_peer("host-bits", 3, 4, &["192.168.1.1/24"]),
                mk_peer("bare", 4, 5, &["192.168.1.1"]),
                mk_peer("none", 5, 6, &[]),
            ],
            &open_ranges(),
        );
        assert_eq!(
            reasons(&verdicts),
            BTreeMap::from([
                ("bare", Reason::InvalidAllowedIPs),
                ("host-bits", Reason::InvalidAllowedIPs),
                ("none", Reason::NoAllowedIPs),
                ("v4-default", Reason::AllowedIPsDefaultRoute),
                ("v6-default", Reason::AllowedIPsDefaultRoute),
            ])
        );
        assert!(verdicts["host-bits"].message().contains("192.168.1.0/24"));
        assert!(verdicts["bare"].message().contains("192.168.1.1/32"));
        assert!(verdicts["v4-default"].message().contains("all traffic"));
    }

    #[test]
    fn public_endpoints_are_validated_and_approved_apart() {
        let mut node = mk_node("n1", 1, &["10.244.1.0/24"], Some(1));
        node.public_endpoints = vec!["198.51.100.7:51820".into()];
        let v = admit(&pools(), std::slice::from_ref(&node), &[], &[]);
        let approved = v["n1"].approved.clone().expect("approved");
        assert_eq!(
            approved.public_endpoints,
            vec!["198.51.100.7:51820".parse().expect("endpoint")]
        );
        assert_eq!(approved.endpoints.len(), 1);
        node.public_endpoints = vec!["somewhere".into()];
        let v = admit(&pools(), &[node], &[], &[]);
        assert_eq!(v["n1"].reason(), Reason::InvalidEndpoint);
    }

    #[test]
    fn endpoints_must_be_ip_literals_with_a_port() {
        let ok = |s: &str| parse_endpoint(s).expect(s);
        assert_eq!(ok("192.0.2.1:51820").port(), 51820);
        assert_eq!(ok("[2001:db8::1]:1").to_string(), "[2001:db8::1]:1");
        assert_eq!(ok("127.0.0.1:65535").port(), 65535);
        let cases: [(&str, EndpointError); 12] = [
            ("", EndpointError::Empty),
            (
                "vpn.example.com:51820",
                EndpointError::HostName {
                    host: "vpn.example.com".into(),
                },
            ),
            (
                "gateway:51820",
                EndpointError::HostName {
                    host: "gateway".into(),
                },
            ),
            (
                "192.0.2.1",
                EndpointError::MissingPort {
                    addr: "192.0.2.1".parse().expect("ip"),
                },
            ),
            (
                "2001:db8::1:51820",
                EndpointError::Ipv6WithoutBrackets {
                    addr: "2001:db8::1".parse().expect("ip"),
                    port: 51820,
                },
            ),
            // Ambiguous: a valid IPv6 address on its own.
            (
                "2001:db8::1:8080",
                EndpointError::MissingPort {
                    addr: "2001:db8::1:8080".parse().expect("ip"),
                },
            ),
            ("192.0.2.1:0", EndpointError::PortZero),
            (
                "192.0.2.1:70000",
                EndpointError::PortOutOfRange {
                    port: "70000".into(),
                },
            ),
            (
                "0.0.0.0:51820",
                EndpointError::Unspecified {
                    addr: "0.0.0.0".parse().expect("ip"),
                },
            ),
            (
                "[ff02::1]:51820",
                EndpointError::NotUnicast {
                    addr: "ff02::1".parse().expect("ip"),
                },
            ),
            (
                "255.255.255.255:51820",
                EndpointError::NotUnicast {
                    addr: "255.255.255.255".parse().expect("ip"),
                },
            ),
            ("[2001:db8::1:51820", EndpointError::Malformed),
        ];
        for (input, want) in cases {
            assert_eq!(parse_endpoint(input), Err(want), "{input:?}");
        }
        let message = EndpointError::MissingPort {
            addr: "2001:db8::1".parse().expect("ip"),
        }
        .to_string();
        assert!(message.contains("[2001:db8::1]:51820"), "{message}");
    }

    #[test]
    fn a_dns_endpoint_makes_the_peer_not_ready_with_a_clear_reason() {
        let mut laptop = mk_peer("laptop", 1, 2, &["192.168.50.1/32"]);
        laptop.endpoint = Some("laptop.example.com:51820".into());
        let v = &admit(&pools(), &[], &[laptop], &open_ranges())["laptop"];
        assert_eq!(v.reason(), Reason::InvalidEndpoint);
        assert!(v.message().contains("DNS name"), "{}", v.message());
        let mut node = mk_node("n1", 1, &["10.244.1.0/24"], Some(3));
        node.endpoints = vec!["192.0.2.9:51820".into(), "192.0.2.10:0".into()];
        let v = &admit(&pools(), &[node], &[], &open_ranges())["n1"];
        assert_eq!(v.reason(), Reason::InvalidEndpoint);
    }

    #[test]
    fn allowed_ips_may_not_capture_an_endpoint() {
        // n1's endpoint is 192.0.2.2 (see mk_node).
        let node = mk_node("n1", 1, &["10.244.1.0/24"], Some(2));
        let mut self_loop = mk_peer("self-loop", 3, 4, &["198.51.100.0/24"]);
        self_loop.endpoint = Some("198.51.100.7:51820".into());
        let verdicts = admit(
            &pools(),
            &[node],
            &[mk_peer("office", 2, 3, &["192.0.2.0/24"]), self_loop],
            &open_ranges(),
        );
        assert_eq!(
            verdicts["office"].reason(),
            Reason::AllowedIPsCaptureEndpoint
        );
        assert!(verdicts["office"].message().contains("peer n1"));
        assert_eq!(
            verdicts["self-loop"].problems,
            vec![PeerProblem::CapturesEndpoint {
                net: net("198.51.100.0/24"),
                endpoint: "198.51.100.7".parse().expect("ip"),
                peer: "self-loop".into(),
            }]
        );
        assert!(verdicts["n1"].ready());
    }

    #[test]
    fn an_external_endpoint_inside_the_mesh_is_refused_but_cannot_hurt_a_node() {
        let mut inside_pods = mk_peer("inside-pods", 1, 3, &["192.168.50.1/32"]);
        inside_pods.endpoint = Some("10.244.1.10:51820".into());
        let older = mk_peer("older", 1, 4, &["198.51.100.0/24"]);
        let mut inside_older = mk_peer("inside-older", 2, 5, &["192.168.50.2/32"]);
        inside_older.endpoint = Some("198.51.100.20:51820".into());
        let node = mk_node("n1", 5, &["10.244.1.0/24"], Some(2));
        let verdicts = admit(
            &pools(),
            &[node],
            &[inside_pods, older, inside_older],
            &open_ranges(),
        );
        assert_eq!(
            reasons(&verdicts),
            BTreeMap::from([
                ("inside-older", Reason::InvalidEndpoint),
                ("inside-pods", Reason::InvalidEndpoint),
                ("n1", Reason::Valid),
                ("older", Reason::Valid),
            ])
        );
        assert!(verdicts["inside-pods"].message().contains("node n1"));
        assert!(verdicts["inside-older"].message().contains("peer older"));
    }

    #[test]
    fn a_bad_next_key_is_not_approved_but_the_node_stays_ready() {
        let mut weak = mk_node("weak", 1, &["10.244.1.0/24"], Some(2));
        weak.next_public_key = Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into());
        let mut thief = mk_node("thief", 2, &["10.244.2.0/24"], Some(3));
        thief.next_public_key = Some(key(9));
        let mut rotating = mk_node("rotating", 3, &["10.244.3.0/24"], Some(4));
        rotating.next_public_key = Some(key(5));
        let laptop = mk_peer("laptop", 50, 9, &["192.168.50.1/32"]);
        let verdicts = admit(
            &pools(),
            &[weak, thief, rotating],
            &[laptop],
            &open_ranges(),
        );
        assert!(verdicts.values().all(Verdict::ready), "{verdicts:#?}");
        assert_eq!(
            verdicts["weak"].next_key_problem,
            Some(PeerProblem::InvalidKey(KeyError::AllZero))
        );
        assert!(matches!(
            &verdicts["thief"].next_key_problem,
            Some(PeerProblem::DuplicateKey(d)) if d.other == "laptop"
        ));
        assert!(verdicts["thief"].message().contains("next public key"));
        let approved = |n: &str| {
            verdicts[n]
                .approved
                .as_ref()
                .and_then(|a| a.next_public_key)
        };
        assert_eq!(approved("weak"), None);
        assert_eq!(approved("thief"), None);
        assert_eq!(approved("rotating").map(|k| k.to_string()), Some(key(5)));
    }

    #[test]
    fn of_two_nodes_with_overlapping_pod_subnets_the_older_keeps_them() {
        let verdicts = admit(
            &pools(),
            &[
                mk_node("young", 2, &["10.244.1.0/25"], Some(3)),
                mk_node("old", 1, &["10.244.1.0/24"], Some(2)),
            ],
            &[],
            &open_ranges(),
        );
        assert!(verdicts["old"].ready());
        assert_eq!(verdicts["young"].reason(), Reason::AllowedIPsOverlapPeer);
    }

    #[test]
    fn reasons_are_camel_case_and_distinct() {
        let all = [
            Reason::Valid,
            Reason::NoPublicKey,
            Reason::InvalidPublicKey,
            Reason::DuplicatePublicKey,
            Reason::NoPodSubnet,
            Reason::NoAllowedIPs,
            Reason::InvalidAllowedIPs,
            Reason::AllowedIPsDefaultRoute,
            Reason::AllowedIPsOverlapPodSubnet,
            Reason::AllowedIPsOverlapPeer,
            Reason::AllowedIPsCaptureEndpoint,
            Reason::InvalidEndpoint,
        ];
        let names: std::collections::BTreeSet<&str> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), all.len());
        for r in all {
            assert_eq!(r.as_str(), format!("{r:?}"));
            assert!(r.as_str().chars().all(|c| c.is_ascii_alphanumeric()));
        }
    }
}
