//! The node agent's plan: from the approved peers and the mesh's transport policy, the
//! WireGuard peers to configure, the routes to install, and how each peer is reached.
//!
//! This module owns the transport decision (WireGuard or plain host-gw routing) and the
//! fail-closed route design. It must not touch the kernel or the device; the agent diffs
//! this plan against what is installed and applies the difference.
//!
//! Fail closed: every pool CIDR of the mesh as a whole (and every node subnet outside the
//! pools) gets a blackhole route at a worse metric, and so does every other destination that
//! is reached through WireGuard (an external peer's addresses). The route through the device
//! disappears with the device (an agent crash or upgrade); the blackhole stays, so pod
//! traffic is dropped rather than sent to the default gateway in the clear. A node subnet
//! inside a pool needs no blackhole of its own: the pool's catches it, so a node installs
//! one route per peer subnet, not two. Routes
//! through a node's address (host-gw) are planned only where the mesh allows plaintext for
//! that pair of nodes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::net::Family;

/// The metric of routes through the device or a host-gw gateway.
pub const ROUTE_METRIC: u32 = 100;
/// The metric of fail-closed blackhole routes: worse than [`ROUTE_METRIC`], so they only
/// carry traffic when the better route is gone.
pub const BLACKHOLE_METRIC: u32 = 4000;

/// Bytes WireGuard adds to each packet over an IPv4 underlay (20 IP + 8 UDP + 32 WireGuard).
pub const WG_OVERHEAD_V4_BYTES: u32 = 60;
/// Bytes WireGuard adds to each packet over an IPv6 underlay (40 IP + 8 UDP + 32 WireGuard).
pub const WG_OVERHEAD_V6_BYTES: u32 = 80;

/// When plaintext routing between nodes is allowed (`Mesh.spec.transport.hostGateway`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostGatewayPolicy {
    /// Never: every peer through WireGuard.
    #[default]
    Never,
    /// On-link peers in trusted subnets are routed directly.
    OnLink,
    /// WireGuard, but on-link peers in trusted subnets are routed directly while the device
    /// is down.
    Fallback,
}

/// The mesh's transport settings, as the agent reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportPolicy {
    /// The host-gw mode.
    pub host_gateway: HostGatewayPolicy,
    /// Underlay networks trusted for plaintext; empty trusts every on-link peer.
    pub trusted_subnets: Vec<IpNet>,
}

/// One peer the operator approved, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovedPeer {
    /// The `MeshPeer` name.
    pub name: String,
    /// Whether it is a node (host-gw is possible only between nodes).
    pub is_node: bool,
    /// The approved public key, base64.
    pub public_key: String,
    /// During the peer's key rotation: its approved next key, accepted alongside.
    pub next_public_key: Option<String>,
    /// The approved allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// The approved endpoint, if any.
    pub endpoint: Option<SocketAddr>,
    /// Keepalive seconds; 0 for none.
    pub persistent_keepalive: u16,
    /// Node peers: the node's location.
    pub location: Option<String>,
    /// Node peers: where nodes of other locations reach it.
    pub public_endpoints: Vec<SocketAddr>,
    /// Node peers: the NAT it is behind, as the operator learned it.
    pub nat: crate::paths::Nat,
    /// Node peers behind an endpoint-independent NAT: the NAT's mapping.
    pub mapped_endpoint: Option<SocketAddr>,
    /// Node peers: the node's underlay MTU.
    pub underlay_mtu: Option<u32>,
}

/// What the agent knows about this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalNode {
    /// This node's peer name (the node name); never configured as a peer of itself.
    pub name: String,
    /// This node's location: host-gw is only ever planned within it.
    pub location: Option<String>,
    /// The networks directly attached to this node's interfaces (no gateway), with this
    /// node's address in each: where on-link peers can be reached.
    pub on_link: Vec<IpNet>,
    /// Whether the WireGuard device is up.
    pub device_up: bool,
    /// The device cannot exist on this node (the kernel offers no TUN device), as opposed to
    /// being down for a reason a retry may fix (a port in use, a failed start, a deleted
    /// interface). Only then does the `Fallback` policy route on-link peers in the clear;
    /// otherwise a down device fails closed.
    pub device_unavailable: bool,
}

/// How a peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    /// Through the WireGuard device.
    WireGuard,
    /// Routed in the clear to the node's address, as the mesh allows for on-link peers.
    HostGateway,
    /// Routed in the clear because the device is down and the mesh allows that fallback.
    FallbackHostGateway,
    /// Not reachable: the device is down and no plaintext is allowed. Blackholed.
    Unreachable,
}

/// Where a route sends packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NextHop {
    /// Out of the WireGuard interface.
    Device,
    /// To this on-link gateway (a peer node's address).
    Gateway(IpAddr),
    /// Dropped.
    Blackhole,
}

/// A route the agent owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// The destination network.
    pub dst: IpNet,
    /// Where it goes.
    pub via: NextHop,
    /// The route's metric.
    pub metric: u32,
}

/// A WireGuard peer to configure on the device. Serializable: the agent saves the peers it
/// configured, to bring its device back at a restart before the API answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicePeer {
    /// The `MeshPeer` name (the device's peer identity).
    pub name: String,
    /// Public key, base64.
    pub public_key: String,
    /// The peer's next key during its rotation, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    /// Allowed IPs, sorted.
    pub allowed_ips: Vec<IpNet>,
    /// Endpoint, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// Keepalive seconds; 0 for none.
    #[serde(default)]
    pub persistent_keepalive: u16,
}

/// The agent's desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePlan {
    /// Peers to configure on the device, by name.
    pub device_peers: BTreeMap<String, DevicePeer>,
    /// Every route the agent should own, sorted.
    pub routes: Vec<Route>,
    /// How each peer is reached, by name.
    pub transports: BTreeMap<String, Transport>,
}

impl NodePlan {
    /// Peers routed in the clear because of the fallback.
    pub fn fallback_peers(&self) -> impl Iterator<Item = &str> {
        self.transports
            .iter()
            .filter(|(_, t)| **t == Transport::FallbackHostGateway)
            .map(|(n, _)| n.as_str())
    }
}

/// Whether `addr` is reached directly from this node, and inside a trusted subnet.
fn on_link_and_trusted(local: &LocalNode, policy: &TransportPolicy, addr: IpAddr) -> bool {
    let on_link = local.on_link.iter().find(|net| net.contains(&addr));
    let Some(link) = on_link else {
        return false;
    };
    policy.trusted_subnets.is_empty()
        || policy
            .trusted_subnets
            .iter()
            .any(|t| t.contains(&addr) && t.contains(&link.addr()))
}

/// Plans the device's peers and the node's routes.
///
/// `pools` are the mesh's pod CIDRs (every valid pool's networks, and node subnets outside
/// them): they are blackholed as a whole, so a pod subnet of a node the agent does not know
/// yet is never routed in the clear; a destination inside one gets no blackhole of its own.
pub fn plan_node(
    local: &LocalNode,
    policy: &TransportPolicy,
    peers: &[ApprovedPeer],
    pools: &[IpNet],
) -> NodePlan {
    let mut out = NodePlan::default();
    let fenced = |dst: &IpNet| pools.iter().any(|pool| pool.contains(dst));
    let mut peers: Vec<&ApprovedPeer> = peers.iter().filter(|p| p.name != local.name).collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));

    for peer in peers {
        let gateway = peer.endpoint.map(|e| e.ip()).filter(|ip| {
            peer.is_node
                && peer.location == local.location
                && on_link_and_trusted(local, policy, *ip)
        });
        let transport = match (policy.host_gateway, gateway, local.device_up) {
            (HostGatewayPolicy::OnLink, Some(_), _) => Transport::HostGateway,
            (HostGatewayPolicy::Fallback, Some(_), false) if local.device_unavailable => {
                Transport::FallbackHostGateway
            }
            (_, _, true) => Transport::WireGuard,
            (_, _, false) => Transport::Unreachable,
        };
        out.transports.insert(peer.name.clone(), transport);
        let mut allowed = peer.allowed_ips.clone();
        allowed.sort();
        allowed.dedup();
        match (transport, gateway) {
            (Transport::HostGateway | Transport::FallbackHostGateway, Some(gw)) => {
                for dst in &allowed {
                    // A host-gw route needs a gateway of the destination's family.
                    if Family::of(dst) == Family::of_addr(&gw) {
                        out.routes.push(Route {
                            dst: *dst,
                            via: NextHop::Gateway(gw),
                            metric: ROUTE_METRIC,
                        });
                    }
                    if !fenced(dst) {
                        out.routes.push(blackhole(*dst));
                    }
                }
            }
            _ => {
                for dst in &allowed {
                    if transport == Transport::WireGuard {
                        out.routes.push(Route {
                            dst: *dst,
                            via: NextHop::Device,
                            metric: ROUTE_METRIC,
                        });
                    }
                    if !fenced(dst) {
                        out.routes.push(blackhole(*dst));
                    }
                }
            }
        }
        // The device keeps every approved peer configured while it runs, including host-gw
        // ones: a switch of policy then needs no handshake.
        out.device_peers.insert(
            peer.name.clone(),
            DevicePeer {
                name: peer.name.clone(),
                public_key: peer.public_key.clone(),
                next_public_key: peer.next_public_key.clone(),
                allowed_ips: allowed,
                endpoint: peer.endpoint,
                persistent_keepalive: peer.persistent_keepalive,
            },
        );
    }
    for pool in pools {
        out.routes.push(blackhole(pool.trunc()));
    }
    out.routes.sort();
    out.routes.dedup();
    out
}

fn blackhole(dst: IpNet) -> Route {
    Route {
        dst,
        via: NextHop::Blackhole,
        metric: BLACKHOLE_METRIC,
    }
}

/// The WireGuard interface's MTU: the configured value, or the underlay's MTU minus the
/// WireGuard overhead for the endpoints' family (IPv6 when any endpoint is IPv6).
pub fn mtu(configured: Option<u32>, underlay_mtu: u32, ipv6_endpoints: bool) -> u32 {
    configured.unwrap_or_else(|| {
        let overhead = if ipv6_endpoints {
            WG_OVERHEAD_V6_BYTES
        } else {
            WG_OVERHEAD_V4_BYTES
        };
        underlay_mtu.saturating_sub(overhead)
    })
}

/// The routes to add and to remove to get from `installed` to `desired`. Routes are
/// identified by destination, next hop and metric; anything else about an installed route
/// the agent owns is replaced.
/// Each side in the order given. (Set lookups: at 1,000 peers a node has some 4,000 routes,
/// and comparing every pair took most of a pass.)
pub fn diff_routes(installed: &[Route], desired: &[Route]) -> (Vec<Route>, Vec<Route>) {
    let have: std::collections::HashSet<&Route> = installed.iter().collect();
    let want: std::collections::HashSet<&Route> = desired.iter().collect();
    let add = desired
        .iter()
        .filter(|r| !have.contains(r))
        .copied()
        .collect();
    let remove = installed
        .iter()
        .filter(|r| !want.contains(r))
        .copied()
        .collect();
    (add, remove)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn mk_peer(name: &str, endpoint: &str, allowed: &[&str]) -> ApprovedPeer {
        ApprovedPeer {
            name: name.into(),
            is_node: true,
            public_key: format!("{name}-key"),
            next_public_key: None,
            allowed_ips: allowed.iter().map(|a| net(a)).collect(),
            endpoint: Some(endpoint.parse().expect("endpoint")),
            persistent_keepalive: 0,
            location: None,
            public_endpoints: Vec::new(),
            nat: crate::paths::Nat::Unknown,
            mapped_endpoint: None,
            underlay_mtu: None,
        }
    }

    fn mk_local(device_up: bool) -> LocalNode {
        LocalNode {
            name: "me".into(),
            location: None,
            on_link: vec![net("192.168.1.10/24")],
            device_up,
            // A down device in these tests is one this node cannot have.
            device_unavailable: !device_up,
        }
    }

    fn policy(host_gateway: HostGatewayPolicy) -> TransportPolicy {
        TransportPolicy {
            host_gateway,
            trusted_subnets: vec![],
        }
    }

    fn routes_to(plan: &NodePlan, dst: &str) -> Vec<NextHop> {
        plan.routes
            .iter()
            .filter(|r| r.dst == net(dst))
            .map(|r| r.via)
            .collect()
    }

    #[test]
    fn wireguard_peers_get_a_device_route_and_a_blackhole_behind_it() {
        let peers = [
            mk_peer("a", "192.168.1.11:51820", &["10.244.1.0/24"]),
            mk_peer("me", "192.168.1.10:51820", &["10.244.0.0/24"]),
            mk_peer("phone", "203.0.113.9:51820", &["10.250.0.7/32"]),
        ];
        let plan = plan_node(
            &mk_local(true),
            &policy(HostGatewayPolicy::Never),
            &peers,
            &[net("10.244.0.0/16")],
        );
        assert_eq!(plan.transports["a"], Transport::WireGuard);
        assert!(
            !plan.device_peers.contains_key("me"),
            "never a peer of itself"
        );
        // A node subnet inside a pool: the pool's blackhole is behind its route.
        assert_eq!(routes_to(&plan, "10.244.1.0/24"), vec![NextHop::Device]);
        assert_eq!(routes_to(&plan, "10.244.0.0/16"), vec![NextHop::Blackhole]);
        // Outside every pool: a blackhole of its own.
        assert_eq!(
            routes_to(&plan, "10.250.0.7/32"),
            vec![NextHop::Device, NextHop::Blackhole]
        );
        let device = plan
            .routes
            .iter()
            .find(|r| r.via == NextHop::Device)
            .expect("device route");
        let hole = plan
            .routes
            .iter()
            .find(|r| r.via == NextHop::Blackhole && r.dst == net("10.250.0.7/32"))
            .expect("blackhole");
        assert!(device.metric < hole.metric);
        assert_eq!(plan.routes.len(), 4, "{:?}", plan.routes);
    }

    #[test]
    fn on_link_peers_use_host_gw_only_where_the_mesh_allows_it() {
        let peers = [
            mk_peer("near", "192.168.1.11:51820", &["10.244.1.0/24"]),
            mk_peer("far", "203.0.113.5:51820", &["10.244.2.0/24"]),
        ];
        let never = plan_node(
            &mk_local(true),
            &policy(HostGatewayPolicy::Never),
            &peers,
            &[],
        );
        assert_eq!(never.transports["near"], Transport::WireGuard);
        let onlink = plan_node(
            &mk_local(true),
            &policy(HostGatewayPolicy::OnLink),
            &peers,
            &[],
        );
        assert_eq!(onlink.transports["near"], Transport::HostGateway);
        assert_eq!(onlink.transports["far"], Transport::WireGuard);
        let gw: IpAddr = "192.168.1.11".parse().expect("ip");
        assert_eq!(
            routes_to(&onlink, "10.244.1.0/24"),
            vec![NextHop::Gateway(gw), NextHop::Blackhole]
        );
        // A trusted-subnet list that leaves the peer out keeps it encrypted.
        let strict = TransportPolicy {
            host_gateway: HostGatewayPolicy::OnLink,
            trusted_subnets: vec![net("10.9.0.0/16")],
        };
        assert_eq!(
            plan_node(&mk_local(true), &strict, &peers, &[]).transports["near"],
            Transport::WireGuard
        );
    }

    #[test]
    fn fallback_is_plaintext_only_while_the_device_is_down_and_only_on_link() {
        let peers = [
            mk_peer("near", "192.168.1.11:51820", &["10.244.1.0/24"]),
            mk_peer("far", "203.0.113.5:51820", &["10.244.2.0/24"]),
        ];
        let up = plan_node(
            &mk_local(true),
            &policy(HostGatewayPolicy::Fallback),
            &peers,
            &[],
        );
        assert_eq!(up.transports["near"], Transport::WireGuard);
        let down = plan_node(
            &mk_local(false),
            &policy(HostGatewayPolicy::Fallback),
            &peers,
            &[],
        );
        assert_eq!(down.transports["near"], Transport::FallbackHostGateway);
        assert_eq!(down.transports["far"], Transport::Unreachable);
        assert_eq!(routes_to(&down, "10.244.2.0/24"), vec![NextHop::Blackhole]);
        assert_eq!(down.fallback_peers().collect::<Vec<_>>(), vec!["near"]);
        // Down for a reason a retry may fix (its port taken, a failed start): fail closed.
        let retrying = plan_node(
            &LocalNode {
                device_unavailable: false,
                ..mk_local(false)
            },
            &policy(HostGatewayPolicy::Fallback),
            &peers,
            &[],
        );
        assert_eq!(retrying.transports["near"], Transport::Unreachable);
        assert!(retrying.routes.iter().all(|r| r.via == NextHop::Blackhole));
        // Without the fallback, a down device means nothing but blackholes.
        let never = plan_node(
            &mk_local(false),
            &policy(HostGatewayPolicy::Never),
            &peers,
            &[],
        );
        assert!(never.routes.iter().all(|r| r.via == NextHop::Blackhole));
    }

    #[test]
    fn host_gw_stays_within_a_location() {
        let mut far = mk_peer("far", "192.168.1.20:51820", &["10.244.2.0/24"]);
        far.location = Some("other".into());
        let plan = plan_node(
            &mk_local(true),
            &policy(HostGatewayPolicy::OnLink),
            &[far],
            &[],
        );
        assert_eq!(plan.transports["far"], Transport::WireGuard);
    }

    #[test]
    fn external_peers_are_never_host_gw() {
        let mut laptop = mk_peer("laptop", "192.168.1.50:51820", &["10.250.0.7/32"]);
        laptop.is_node = false;
        let plan = plan_node(
            &mk_local(true),
            &policy(HostGatewayPolicy::OnLink),
            &[laptop],
            &[],
        );
        assert_eq!(plan.transports["laptop"], Transport::WireGuard);
    }

    #[test]
    fn mtu_subtracts_the_overhead_of_the_endpoint_family() {
        assert_eq!(mtu(None, 1500, false), 1440);
        assert_eq!(mtu(None, 1500, true), 1420);
        assert_eq!(mtu(Some(1380), 1500, true), 1380);
    }

    #[test]
    fn diff_adds_what_is_missing_and_removes_what_is_stale() {
        let r = |dst: &str, via| Route {
            dst: net(dst),
            via,
            metric: ROUTE_METRIC,
        };
        let installed = [
            r("10.244.1.0/24", NextHop::Device),
            r("10.244.9.0/24", NextHop::Device),
        ];
        let desired = [
            r("10.244.1.0/24", NextHop::Device),
            r("10.244.2.0/24", NextHop::Device),
        ];
        let (add, remove) = diff_routes(&installed, &desired);
        assert_eq!(add, vec![r("10.244.2.0/24", NextHop::Device)]);
        assert_eq!(remove, vec![r("10.244.9.0/24", NextHop::Device)]);
    }
}
