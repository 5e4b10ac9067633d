//! Paths between nodes across locations: which address of a peer a node sends to, whether a
//! NAT sits in between (and so needs keepalives), and which node relays for a pair that
//! cannot reach each other; and, for the operator, what kind of NAT a node is behind, from
//! what public nodes in other locations see of it.
//!
//! The model:
//! - Nodes of one location (the same value of the mesh's location label, or both without
//!   it) reach each other at their `endpoint`, their internal address.
//! - Across locations, a node is reached at a public endpoint when it has one. A node
//!   without one is behind NAT. Public nodes it sends to learn its NAT's mapping from its
//!   authenticated packets (the device roams to the packets' source) and report it; the
//!   operator classifies: one mapping seen by every public observer is an
//!   endpoint-independent NAT, several are a symmetric NAT ([`classify`]).
//! - Two nodes behind NAT in different locations connect directly when both NATs are
//!   endpoint-independent and both mappings are known: each sends to the other's mapping
//!   at once, so each NAT sees outgoing traffic to the other before the other's packets
//!   arrive (hole punching). Otherwise their traffic goes through a public node both reach
//!   ([`relay_for`]): the relay decrypts and encrypts again, so it is encrypted on every hop
//!   that crosses a network. Both nodes of a pair choose the same relay from the same data.
//! - Keepalives only where a NAT needs them: a node behind NAT keeps its mappings open
//!   towards every peer it reaches across locations; nothing else gets them unless the mesh
//!   or the peer asks.
//!
//! This module must not read the clock (ages are arguments) or do I/O; it does not decide
//! host-gw (that is [`crate::topology`]) and does not touch routes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::net::Family;
use crate::topology::ApprovedPeer;

/// An observation older than this does not count: a path with no handshake for that long
/// is gone (WireGuard rekeys a live one every two minutes).
pub const OBSERVATION_MAX_AGE: Duration = Duration::from_secs(300);

/// How a node is reached from other locations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Nat {
    /// At its own address: a public endpoint, or an address peers elsewhere see unchanged.
    Public,
    /// Behind a NAT that maps it to one address and port for every destination.
    EndpointIndependent,
    /// Behind a NAT that maps it to another port for each destination.
    Symmetric,
    /// Behind NAT, not seen by a public node in another location yet.
    #[default]
    Unknown,
}

/// What a public node in another location sees of a node: the source of its packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The observer's location.
    pub observer_location: Option<String>,
    /// Whether the observer has a public endpoint of its own (only those are reached by
    /// nodes behind NAT at all, so only their view says what a NAT does).
    pub observer_public: bool,
    /// The endpoint the observer's device sends to: the observed node's packets' source.
    pub endpoint: SocketAddr,
    /// How long ago the observer's latest handshake with the node was; `None` if never.
    pub handshake_age: Option<Duration>,
}

/// What the operator publishes about a node's NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NatView {
    /// The kind.
    pub nat: Nat,
    /// For [`Nat::EndpointIndependent`]: the mapping.
    pub mapped: Option<SocketAddr>,
}

/// Classifies a node from what public observers in other locations see of it.
///
/// A node with public endpoints is [`Nat::Public`]. Otherwise only fresh observations by
/// public nodes of other locations count: none is [`Nat::Unknown`]; one endpoint seen by all
/// is the mapping of an endpoint-independent NAT (or, when it is one of the node's own
/// endpoints, no NAT at all); different endpoints mean a symmetric NAT.
pub fn classify(
    location: Option<&str>,
    public_endpoints: &[SocketAddr],
    own_endpoints: &[SocketAddr],
    observations: &[Observation],
) -> NatView {
    if !public_endpoints.is_empty() {
        return NatView {
            nat: Nat::Public,
            mapped: None,
        };
    }
    let mut seen: Vec<SocketAddr> = observations
        .iter()
        .filter(|o| o.observer_public && o.observer_location.as_deref() != location)
        .filter(|o| o.handshake_age.is_some_and(|a| a <= OBSERVATION_MAX_AGE))
        .map(|o| o.endpoint)
        .collect();
    seen.sort();
    seen.dedup();
    match seen.as_slice() {
        [] => NatView::default(),
        [one] if own_endpoints.contains(one) => NatView {
            nat: Nat::Public,
            mapped: None,
        },
        [one] => NatView {
            nat: Nat::EndpointIndependent,
            mapped: Some(*one),
        },
        _ => NatView {
            nat: Nat::Symmetric,
            mapped: None,
        },
    }
}

/// The path settings of the mesh (`Mesh.spec.topology`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathSettings {
    /// Keepalive seconds on paths that cross a NAT; 0 for none.
    pub nat_keepalive: u16,
    /// Whether pairs that cannot reach each other go through a relay.
    pub relay: bool,
}

impl Default for PathSettings {
    fn default() -> Self {
        Self {
            nat_keepalive: 25,
            relay: true,
        }
    }
}

/// This node, as the path plan needs it (from its own approval).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Me {
    /// The node's name.
    pub name: String,
    /// Its location.
    pub location: Option<String>,
    /// How others reach it.
    pub nat: Nat,
    /// Its NAT's mapping, when endpoint-independent and known.
    pub mapped: Option<SocketAddr>,
    /// The address families its underlay has; a public endpoint of another family is tried
    /// only when the peer has none of these.
    pub families: Vec<Family>,
}

impl Me {
    /// A node as its own approval describes it: what the plan of a peer of it sees.
    pub fn of(peer: &ApprovedPeer, families: Vec<Family>) -> Me {
        Me {
            name: peer.name.clone(),
            location: peer.location.clone(),
            nat: peer.nat,
            mapped: peer.mapped_endpoint,
            families,
        }
    }
}

/// The kind of a path as the plan chooses it (host-gw is decided later, per transport).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathKind {
    /// To the peer's own address, or its NAT's mapping when this node is public.
    Direct,
    /// Both behind endpoint-independent NATs: to the peer's mapping, with keepalives.
    NatTraversal,
    /// Through this node.
    Relay {
        /// The relay's name.
        via: String,
    },
}

/// How this node reaches one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// The kind.
    pub kind: PathKind,
    /// The endpoint configured for the peer (for a relay: none on the peer itself).
    pub endpoint: Option<SocketAddr>,
}

/// The peers to configure, with endpoints, keepalives and allowed IPs as the paths need
/// them, and the path to each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathPlan {
    /// The peers, endpoints chosen: a relayed peer keeps its key (so rotations are
    /// acknowledged as before) but no endpoint and no allowed IPs; its allowed IPs are its
    /// relay's.
    pub peers: Vec<ApprovedPeer>,
    /// The path to each peer, by name.
    pub paths: BTreeMap<String, Path>,
    /// The smallest underlay MTU over this node and every node peer that reported one:
    /// what the device's MTU derives from.
    pub underlay_mtu: Option<u32>,
    /// Whether the larger IPv6 overhead applies: any chosen endpoint, or any endpoint a node
    /// of the mesh publishes, is IPv6. One MTU for the whole mesh, so that a relay never has
    /// a packet to forward that is larger than its own device takes.
    pub ipv6_endpoints: bool,
}

/// Whether two locations are one.
fn same_location(a: Option<&str>, b: Option<&str>) -> bool {
    a == b
}

/// The address a node is reached at from other locations, if it has one: a public
/// endpoint (of a family `families` has, when it has one), else its own endpoint when
/// observers see it unchanged.
fn public_address(peer: &ApprovedPeer, families: &[Family]) -> Option<SocketAddr> {
    peer.public_endpoints
        .iter()
        .find(|e| families.contains(&Family::of_addr(&e.ip())))
        .or(peer.public_endpoints.first())
        .copied()
        .or(peer.endpoint.filter(|_| peer.nat == Nat::Public))
}

/// The relay for the pair `a`, `b` among `candidates` (public node names): the highest
/// rendezvous score, so both ends choose the same one and pairs spread over the relays.
pub fn relay_for<'a>(
    a: &str,
    b: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    candidates
        .into_iter()
        .filter(|c| *c != a && *c != b)
        .max_by_key(|c| (score(lo, hi, c), *c))
}

/// FNV-1a over the pair and the candidate: stable across processes and versions, which is
/// what both ends of a pair need (std's hasher promises neither).
fn score(lo: &str, hi: &str, candidate: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [lo, hi, candidate] {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Chooses the path to every peer (see the module docs) and rewrites the peers to match.
pub fn plan(
    me: &Me,
    peers: &[ApprovedPeer],
    local_underlay_mtu: Option<u32>,
    settings: &PathSettings,
) -> PathPlan {
    let behind_nat = me.nat != Nat::Public;
    let relays: Vec<&str> = peers
        .iter()
        .filter(|p| p.is_node && p.nat == Nat::Public && p.name != me.name)
        .filter(|p| public_address(p, &me.families).is_some())
        .map(|p| p.name.as_str())
        .collect();
    let mut out = PathPlan {
        underlay_mtu: local_underlay_mtu,
        ..PathPlan::default()
    };
    let mut relayed: BTreeMap<String, Vec<ipnet::IpNet>> = BTreeMap::new();
    for peer in peers.iter().filter(|p| p.name != me.name) {
        let mut p = peer.clone();
        let path =
            if !peer.is_node || same_location(me.location.as_deref(), peer.location.as_deref()) {
                Path {
                    kind: PathKind::Direct,
                    endpoint: peer.endpoint,
                }
            } else if let Some(public) = public_address(peer, &me.families) {
                if behind_nat {
                    p.persistent_keepalive = p.persistent_keepalive.max(settings.nat_keepalive);
                }
                Path {
                    kind: PathKind::Direct,
                    endpoint: Some(public),
                }
            } else if !behind_nat {
                // The peer sends to this node first (it has this node's public endpoint); its
                // NAT's mapping, when known, lets this node send first too.
                Path {
                    kind: PathKind::Direct,
                    endpoint: peer.mapped_endpoint,
                }
            } else if me.nat == Nat::EndpointIndependent
                && me.mapped.is_some()
                && peer.nat == Nat::EndpointIndependent
                && peer.mapped_endpoint.is_some()
            {
                p.persistent_keepalive = p.persistent_keepalive.max(settings.nat_keepalive);
                Path {
                    kind: PathKind::NatTraversal,
                    endpoint: peer.mapped_endpoint,
                }
            } else if let Some(via) = settings
                .relay
                .then(|| relay_for(&me.name, &peer.name, relays.iter().copied()))
                .flatten()
            {
                relayed
                    .entry(via.to_owned())
                    .or_default()
                    .extend(peer.allowed_ips.iter().copied());
                p.allowed_ips.clear();
                p.persistent_keepalive = 0;
                Path {
                    kind: PathKind::Relay {
                        via: via.to_owned(),
                    },
                    endpoint: None,
                }
            } else {
                // No relay to go through: the peer's own address is the only one left (a
                // network where the locations reach each other's internal addresses).
                Path {
                    kind: PathKind::Direct,
                    endpoint: peer.endpoint,
                }
            };
        p.endpoint = path.endpoint;
        if p.is_node
            && let Some(m) = p.underlay_mtu
        {
            out.underlay_mtu = Some(out.underlay_mtu.map_or(m, |u| u.min(m)));
        }
        out.ipv6_endpoints |= p.endpoint.is_some_and(|e| e.is_ipv6())
            || (p.is_node
                && (peer.endpoint.iter().chain(&peer.public_endpoints)).any(SocketAddr::is_ipv6));
        out.paths.insert(p.name.clone(), path);
        out.peers.push(p);
    }
    for p in &mut out.peers {
        if let Some(extra) = relayed.remove(&p.name) {
            p.allowed_ips.extend(extra);
            p.allowed_ips.sort();
            p.allowed_ips.dedup();
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn obs(location: &str, public: bool, endpoint: &str, age_s: u64) -> Observation {
        Observation {
            observer_location: Some(location.into()),
            observer_public: public,
            endpoint: ep(endpoint),
            handshake_age: Some(Duration::from_secs(age_s)),
        }
    }

    #[test]
    fn a_node_with_a_public_endpoint_is_public_whatever_is_seen() {
        let v = classify(
            Some("a"),
            &[ep("198.51.100.1:51820")],
            &[],
            &[obs("b", true, "203.0.113.9:4000", 1)],
        );
        assert_eq!(v.nat, Nat::Public);
    }

    #[test]
    fn one_mapping_seen_by_every_public_observer_is_an_endpoint_independent_nat() {
        let seen = [
            obs("a", true, "203.0.113.9:4000", 10),
            obs("a", true, "203.0.113.9:4000", 20),
        ];
        let v = classify(Some("b"), &[], &[ep("10.0.0.5:51820")], &seen);
        assert_eq!(v.nat, Nat::EndpointIndependent);
        assert_eq!(v.mapped, Some(ep("203.0.113.9:4000")));
    }

    #[test]
    fn different_mappings_are_a_symmetric_nat() {
        let seen = [
            obs("a", true, "203.0.113.9:4000", 10),
            obs("a", true, "203.0.113.9:4711", 20),
        ];
        let v = classify(Some("c"), &[], &[], &seen);
        assert_eq!(
            v,
            NatView {
                nat: Nat::Symmetric,
                mapped: None
            }
        );
    }

    #[test]
    fn only_fresh_views_of_public_nodes_elsewhere_count() {
        let seen = [
            obs("a", true, "203.0.113.9:4000", 10),
            // Same location: it sees the internal address.
            obs("c", true, "10.0.0.6:51820", 1),
            // Behind NAT itself: not what the NAT does for everyone.
            obs("d", false, "203.0.113.9:5000", 1),
            // Stale: the path is gone.
            obs("a", true, "203.0.113.9:6000", 3600),
        ];
        let v = classify(Some("c"), &[], &[], &seen);
        assert_eq!(v.nat, Nat::EndpointIndependent);
        assert_eq!(v.mapped, Some(ep("203.0.113.9:4000")));
        assert_eq!(classify(Some("c"), &[], &[], &[]).nat, Nat::Unknown);
    }

    #[test]
    fn a_node_seen_at_its_own_address_is_public() {
        let v = classify(
            Some("b"),
            &[],
            &[ep("10.1.0.5:51820")],
            &[obs("a", true, "10.1.0.5:51820", 5)],
        );
        assert_eq!(v.nat, Nat::Public);
    }

    fn mk_peer(name: &str, location: &str, nat: Nat) -> ApprovedPeer {
        let i: u8 = name.trim_start_matches('n').parse().unwrap();
        ApprovedPeer {
            name: name.into(),
            is_node: true,
            public_key: format!("{name}-key"),
            next_public_key: None,
            allowed_ips: vec![format!("10.244.{i}.0/24").parse().unwrap()],
            endpoint: Some(ep(&format!("10.9.{i}.1:51820"))),
            persistent_keepalive: 0,
            location: Some(location.into()),
            public_endpoints: if nat == Nat::Public {
                vec![ep(&format!("198.51.100.{i}:51820"))]
            } else {
                vec![]
            },
            nat,
            mapped_endpoint: (nat == Nat::EndpointIndependent)
                .then(|| ep(&format!("203.0.113.{i}:{}", 40000 + u16::from(i)))),
            underlay_mtu: None,
        }
    }

    fn me_from(p: &ApprovedPeer) -> Me {
        Me::of(p, vec![Family::V4])
    }

    /// Three clouds as in the docs: a public (n1, n2), b behind an endpoint-independent
    /// NAT (n3, n4), c behind a symmetric NAT (n5, n6), d endpoint-independent (n7).
    fn clouds() -> Vec<ApprovedPeer> {
        vec![
            mk_peer("n1", "a", Nat::Public),
            mk_peer("n2", "a", Nat::Public),
            mk_peer("n3", "b", Nat::EndpointIndependent),
            mk_peer("n4", "b", Nat::EndpointIndependent),
            mk_peer("n5", "c", Nat::Symmetric),
            mk_peer("n6", "c", Nat::Symmetric),
            mk_peer("n7", "d", Nat::EndpointIndependent),
        ]
    }

    fn plan_for(name: &str, all: &[ApprovedPeer]) -> PathPlan {
        let me = all.iter().find(|p| p.name == name).unwrap();
        plan(&me_from(me), all, Some(1500), &PathSettings::default())
    }

    #[test]
    fn every_pair_of_three_clouds_gets_the_path_its_nats_allow() {
        let all = clouds();
        let kind = |a: &str, b: &str| plan_for(a, &all).paths[b].kind.clone();
        // Within a location: internal addresses.
        assert_eq!(
            plan_for("n3", &all).paths["n4"].endpoint,
            Some(ep("10.9.4.1:51820"))
        );
        assert_eq!(kind("n5", "n6"), PathKind::Direct);
        // Public to anyone, anyone to public.
        assert_eq!(
            plan_for("n3", &all).paths["n1"].endpoint,
            Some(ep("198.51.100.1:51820"))
        );
        assert_eq!(
            plan_for("n1", &all).paths["n3"].endpoint,
            Some(ep("203.0.113.3:40003"))
        );
        assert_eq!(kind("n1", "n5"), PathKind::Direct);
        assert_eq!(
            plan_for("n1", &all).paths["n5"].endpoint,
            None,
            "a symmetric NAT's mapping is learned, never configured"
        );
        assert_eq!(kind("n5", "n2"), PathKind::Direct);
        // Endpoint-independent on both sides: hole punching.
        assert_eq!(kind("n3", "n7"), PathKind::NatTraversal);
        assert_eq!(
            plan_for("n7", &all).paths["n3"].endpoint,
            Some(ep("203.0.113.3:40003"))
        );
        // A symmetric NAT on either side: a relay, the same from both ends.
        for (a, b) in [("n3", "n5"), ("n7", "n6"), ("n4", "n6")] {
            let ab = kind(a, b);
            assert!(
                matches!(&ab, PathKind::Relay { via } if via == "n1" || via == "n2"),
                "{a}->{b}: {ab:?}"
            );
            assert_eq!(ab, kind(b, a), "{a} and {b} chose different relays");
        }
    }

    #[test]
    fn a_relayed_peer_keeps_its_key_and_its_relay_carries_its_addresses() {
        let all = clouds();
        let plan = plan_for("n3", &all);
        let PathKind::Relay { via } = &plan.paths["n5"].kind else {
            panic!("not relayed: {:?}", plan.paths["n5"]);
        };
        let n5 = plan.peers.iter().find(|p| p.name == "n5").unwrap();
        assert!(n5.allowed_ips.is_empty() && n5.endpoint.is_none());
        assert_eq!(n5.public_key, "n5-key");
        let relay = plan.peers.iter().find(|p| &p.name == via).unwrap();
        assert!(
            relay
                .allowed_ips
                .contains(&"10.244.5.0/24".parse().unwrap())
        );
        // No allowed IP is in two peers.
        let mut all_ips: Vec<_> = plan
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.clone())
            .collect();
        let n = all_ips.len();
        all_ips.sort();
        all_ips.dedup();
        assert_eq!(all_ips.len(), n);
    }

    #[test]
    fn keepalives_go_only_where_a_nat_needs_them() {
        let all = clouds();
        let ka = |a: &str, b: &str| {
            plan_for(a, &all)
                .peers
                .iter()
                .find(|p| p.name == b)
                .unwrap()
                .persistent_keepalive
        };
        assert_eq!(ka("n1", "n2"), 0, "public to public");
        assert_eq!(
            ka("n1", "n3"),
            0,
            "public to NAT: the NATed side keeps it open"
        );
        assert_eq!(ka("n3", "n4"), 0, "within a location");
        assert_eq!(ka("n3", "n1"), 25);
        assert_eq!(ka("n3", "n7"), 25);
        assert_eq!(ka("n5", "n1"), 25);
    }

    #[test]
    fn without_relay_or_labels_nothing_changes() {
        // No location labels: every node in one location, internal endpoints, no keepalive.
        let mut all = clouds();
        for p in &mut all {
            p.location = None;
        }
        let flat = plan_for("n5", &all);
        assert!(flat.paths.values().all(|p| p.kind == PathKind::Direct));
        assert!(flat.peers.iter().all(|p| p.persistent_keepalive == 0));
        assert_eq!(flat.paths["n3"].endpoint, Some(ep("10.9.3.1:51820")));
        // Relays turned off: a pair that needs one falls back to the peer's own address.
        let all = clouds();
        let me = all.iter().find(|p| p.name == "n3").unwrap();
        let settings = PathSettings {
            relay: false,
            ..PathSettings::default()
        };
        let no_relay = plan(&me_from(me), &all, None, &settings);
        assert_eq!(no_relay.paths["n5"].kind, PathKind::Direct);
    }

    #[test]
    fn a_public_endpoint_of_the_nodes_own_family_is_preferred() {
        let mut all = clouds();
        all[0].public_endpoints = vec![ep("[2001:db8::1]:51820"), ep("198.51.100.1:51820")];
        let me = all.iter().find(|p| p.name == "n3").unwrap();
        let mut me = me_from(me);
        let plan4 = plan(&me, &all, None, &PathSettings::default());
        assert_eq!(plan4.paths["n1"].endpoint, Some(ep("198.51.100.1:51820")));
        assert!(
            plan4.ipv6_endpoints,
            "n1 publishes an IPv6 endpoint: the mesh's MTU leaves room for it everywhere"
        );
        assert!(!plan_for("n3", &clouds()).ipv6_endpoints);
        me.families = vec![Family::V6];
        let plan6 = plan(&me, &all, None, &PathSettings::default());
        assert_eq!(plan6.paths["n1"].endpoint, Some(ep("[2001:db8::1]:51820")));
        assert!(plan6.ipv6_endpoints);
    }

    #[test]
    fn the_path_mtu_is_the_smallest_underlay_of_the_mesh() {
        let mut all = clouds();
        all[4].underlay_mtu = Some(1400);
        all[1].underlay_mtu = Some(9000);
        let plan = plan_for("n1", &all);
        assert_eq!(plan.underlay_mtu, Some(1400));
    }

    #[test]
    fn relays_spread_over_the_candidates_and_never_pick_an_end() {
        let names: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
        let mut used = std::collections::BTreeSet::new();
        for i in 0..50 {
            let a = format!("x{i}");
            let r = relay_for(&a, "y", names.iter().map(String::as_str)).unwrap();
            assert_eq!(
                Some(r),
                relay_for("y", &a, names.iter().map(String::as_str))
            );
            used.insert(r.to_owned());
        }
        assert!(used.len() > 3, "relays used: {used:?}");
        assert_eq!(relay_for("r1", "r2", ["r1", "r2"]), None);
    }
}
