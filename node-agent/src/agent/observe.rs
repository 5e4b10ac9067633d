//! Translating the cluster's objects into what the agent's plan needs, trusting only what
//! the operator approved.
//!
//! A peer is configured only if the operator marked it `Ready` and wrote `status.approved`.
//! For a node peer the allowed IPs are further limited to its `spec.podCIDRs`, which only
//! the operator writes: an approval can never route more to a node than its own subnets.

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use wgmesh_api::{
    ConditionStatus, Mesh, MeshPeer,
    consts::{
        DEFAULT_LOCATION_LABEL, DEFAULT_NAT_KEEPALIVE_SECONDS, ENDPOINT_ANNOTATION,
        PUBLIC_ENDPOINT_ANNOTATION, condition,
    },
    mesh::{EndpointAddressType, HostGateway, Mtu, RelayPolicy},
    peer::NatKind,
};
use wgmesh_core::net::Family;
use wgmesh_core::paths::{Me, Nat, PathSettings};
use wgmesh_core::rotation::Timeouts;
use wgmesh_core::topology::{ApprovedPeer, HostGatewayPolicy, TransportPolicy};

fn is_ready(p: &MeshPeer) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == condition::READY && c.status == ConditionStatus::True)
    })
}

fn nets(values: &[String]) -> Vec<IpNet> {
    values.iter().filter_map(|v| v.parse().ok()).collect()
}

/// This node's own `MeshPeer`: the one the operator made for this very `Node` — named after
/// it, naming it in `spec.node`, and owned by it (owner reference to the Node's uid). A peer
/// that only has the name (made by someone else before the node joined, or left from an
/// earlier Node of that name) is not this node's: its `spec.podCIDRs` would become this
/// node's CNI configuration.
pub fn own_peer<'a, P: Borrow<MeshPeer>>(peers: &'a [P], node: &Node) -> Option<&'a P> {
    let name = node.metadata.name.as_deref()?;
    let uid = node.metadata.uid.as_deref()?;
    peers.iter().find(|p| {
        let p: &MeshPeer = (*p).borrow();
        p.metadata.name.as_deref() == Some(name)
            && p.spec.node.as_deref() == Some(name)
            && p.node_owner().is_some_and(|o| o.uid == uid)
    })
}

/// The peers to configure, from every `MeshPeer` (this node's own is left out).
pub fn approved_peers<'a>(
    peers: impl IntoIterator<Item = &'a MeshPeer>,
    self_name: &str,
) -> Vec<ApprovedPeer> {
    let mut out = Vec::new();
    for p in peers {
        let name = p.metadata.name.clone().unwrap_or_default();
        if name == self_name || p.metadata.deletion_timestamp.is_some() || !is_ready(p) {
            continue;
        }
        let Some(approved) = p.status.as_ref().and_then(|s| s.approved.as_ref()) else {
            continue;
        };
        let Some(public_key) = approved.public_key.clone() else {
            continue;
        };
        let mut allowed = nets(&approved.allowed_ips);
        let is_node = p.spec.node.is_some();
        if is_node {
            let own = nets(&p.spec.pod_cidrs);
            allowed.retain(|a| own.contains(a));
        }
        if allowed.is_empty() {
            continue;
        }
        out.push(ApprovedPeer {
            name,
            is_node,
            public_key,
            next_public_key: approved.next_public_key.clone(),
            allowed_ips: allowed,
            endpoint: approved.endpoint.as_deref().and_then(|e| e.parse().ok()),
            persistent_keepalive: approved.persistent_keepalive.unwrap_or(0),
            location: approved.location.clone(),
            public_endpoints: approved
                .public_endpoints
                .iter()
                .filter_map(|e| e.parse().ok())
                .collect(),
            nat: nat(approved.nat),
            mapped_endpoint: approved
                .mapped_endpoint
                .as_deref()
                .and_then(|e| e.parse().ok()),
            underlay_mtu: approved.underlay_mtu,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn nat(kind: Option<NatKind>) -> Nat {
    match kind {
        Some(NatKind::Public) => Nat::Public,
        Some(NatKind::EndpointIndependent) => Nat::EndpointIndependent,
        Some(NatKind::Symmetric) => Nat::Symmetric,
        Some(NatKind::Unknown) | None => Nat::Unknown,
    }
}

/// This node as its paths need it, from its own approval (`location`, `nat`,
/// `mappedEndpoint`): what the operator learned of it, never what it claims. Until the
/// approval is there, its location is its Node's label (`location_label`), so that it does
/// not take the nodes of its own location for another's meanwhile. `families`: those of its
/// underlay's networks.
pub fn me(
    name: &str,
    own: Option<&MeshPeer>,
    node: Option<&Node>,
    location_label: &str,
    families: Vec<Family>,
) -> Me {
    let approved = own.and_then(|p| p.status.as_ref()?.approved.as_ref());
    let label = || node?.metadata.labels.as_ref()?.get(location_label).cloned();
    Me {
        name: name.to_owned(),
        location: match approved {
            Some(a) => a.location.clone(),
            None => label(),
        },
        nat: nat(approved.and_then(|a| a.nat)),
        mapped: approved
            .and_then(|a| a.mapped_endpoint.as_deref())
            .and_then(|e| e.parse().ok()),
        families,
    }
}

/// The generation each rotating peer's approved next key will have, by peer name: what this
/// node acknowledges once the key is on its device.
pub fn next_generations<'a>(
    peers: impl IntoIterator<Item = &'a MeshPeer>,
) -> BTreeMap<String, i64> {
    peers
        .into_iter()
        .filter_map(|p| {
            let a = p.status.as_ref()?.approved.as_ref()?;
            a.next_public_key.as_ref()?;
            Some((p.name_any(), a.key_generation.unwrap_or(0) + 1))
        })
        .collect()
}

/// The node peers (other than `self_name`) that acknowledged `self_name`'s next key
/// `public_key`: they report it installed in their status.
pub fn acknowledged<'a>(
    peers: impl IntoIterator<Item = &'a MeshPeer>,
    self_name: &str,
    public_key: &str,
) -> BTreeSet<String> {
    peers
        .into_iter()
        .filter(|p| p.spec.node.is_some() && p.name_any() != self_name)
        .filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.installed_keys
                    .iter()
                    .any(|k| k.peer == self_name && k.public_key == public_key)
            })
        })
        .map(|p| p.name_any())
        .collect()
}

/// The mesh settings the agent uses, with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    pub listen_port: u16,
    /// `None`: derive from the underlay.
    pub mtu: Option<u32>,
    pub transport: TransportPolicy,
    pub masquerade: bool,
    pub endpoint_address_type: EndpointAddressType,
    /// How long a rotating node waits for acknowledgements, then to move over.
    pub rotation_timeouts: Timeouts,
    /// How long a retired key is still answered for external peers.
    pub external_grace: Duration,
    /// Keepalives through NAT and relays (`spec.topology`).
    pub paths: PathSettings,
    /// The Node label naming a node's location (`spec.topology.locationLabel`).
    pub location_label: String,
}

/// Defaults of the rotation's waits.
pub const DEFAULT_ACKNOWLEDGE_TIMEOUT: Duration = Duration::from_secs(120);
/// See [`DEFAULT_ACKNOWLEDGE_TIMEOUT`].
pub const DEFAULT_MOVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a retired key is answered for external peers when the `Mesh` does not say.
pub const DEFAULT_EXTERNAL_GRACE: Duration = Duration::from_secs(24 * 3600);

fn duration_or(text: Option<&str>, default: Duration) -> Duration {
    text.and_then(|t| wgmesh_core::duration::parse(t).ok())
        .unwrap_or(default)
}

/// Reads the `Mesh` (or its absence).
pub fn mesh_settings(mesh: Option<&Mesh>) -> MeshSettings {
    let spec = mesh.map(|m| &m.spec);
    let transport = spec.and_then(|s| s.transport.as_ref());
    let rotation = spec.and_then(|s| s.key_rotation.as_ref());
    let topology = spec.and_then(|s| s.topology.as_ref());
    MeshSettings {
        listen_port: spec
            .and_then(|s| s.listen_port)
            .unwrap_or(wgmesh_api::consts::DEFAULT_LISTEN_PORT),
        mtu: match spec.and_then(|s| s.mtu) {
            Some(Mtu::Bytes(b)) => Some(u32::from(b)),
            _ => None,
        },
        transport: TransportPolicy {
            host_gateway: match transport.and_then(|t| t.host_gateway) {
                Some(HostGateway::OnLink) => HostGatewayPolicy::OnLink,
                Some(HostGateway::Fallback) => HostGatewayPolicy::Fallback,
                _ => HostGatewayPolicy::Never,
            },
            trusted_subnets: transport
                .map(|t| nets(&t.host_gateway_subnets))
                .unwrap_or_default(),
        },
        masquerade: spec.and_then(|s| s.masquerade).unwrap_or(true),
        endpoint_address_type: spec
            .and_then(|s| s.endpoint_address_type)
            .unwrap_or_default(),
        rotation_timeouts: Timeouts {
            acknowledge: duration_or(
                rotation.and_then(|r| r.acknowledge_timeout.as_deref()),
                DEFAULT_ACKNOWLEDGE_TIMEOUT,
            ),
            move_over: duration_or(
                rotation.and_then(|r| r.move_timeout.as_deref()),
                DEFAULT_MOVE_TIMEOUT,
            ),
        },
        external_grace: duration_or(
            rotation.and_then(|r| r.external_grace_period.as_deref()),
            DEFAULT_EXTERNAL_GRACE,
        ),
        location_label: topology
            .and_then(|t| t.location_label.clone())
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| DEFAULT_LOCATION_LABEL.to_owned()),
        paths: PathSettings {
            nat_keepalive: topology
                .and_then(|t| t.nat_keepalive)
                .unwrap_or(DEFAULT_NAT_KEEPALIVE_SECONDS),
            relay: topology.and_then(|t| t.relay) != Some(RelayPolicy::Never),
        },
    }
}

/// An endpoint written by a person: `ip:port`, or `ip` with the listen port.
fn endpoint_value(value: &str, port: u16) -> Option<SocketAddr> {
    let value = value.trim();
    value.parse::<SocketAddr>().ok().or_else(|| {
        value
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, port))
    })
}

/// The node's WireGuard endpoint: the `wgmesh.dev/endpoint` annotation (`ip` or `ip:port`),
/// else the Node address of the configured type, with the listen port.
pub fn endpoint(node: &Node, kind: EndpointAddressType, port: u16) -> Option<SocketAddr> {
    if let Some(sa) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ENDPOINT_ANNOTATION))
        .and_then(|v| endpoint_value(v, port))
    {
        return Some(sa);
    }
    let want = match kind {
        EndpointAddressType::InternalIP => "InternalIP",
        EndpointAddressType::ExternalIP => "ExternalIP",
    };
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == want)
        .find_map(|a| a.address.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
}

/// The node's public endpoints: the `wgmesh.dev/public-endpoint` annotation (`ip` or
/// `ip:port`, several separated by commas), else its `ExternalIP` addresses, with the listen
/// port. Values that are neither are returned apart, for the agent to say so.
pub fn public_endpoints(node: &Node, port: u16) -> (Vec<SocketAddr>, Vec<String>) {
    let parse = |value: &str| endpoint_value(value, port).ok_or_else(|| value.trim().to_owned());
    let values: Vec<Result<SocketAddr, String>> = match node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PUBLIC_ENDPOINT_ANNOTATION))
    {
        Some(value) => value.split(',').map(parse).collect(),
        None => node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "ExternalIP")
            .map(|a| parse(&a.address))
            .collect(),
    };
    let (good, bad): (Vec<_>, Vec<_>) = values.into_iter().partition(Result::is_ok);
    (
        good.into_iter().filter_map(Result::ok).collect(),
        bad.into_iter().filter_map(Result::err).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
    use wgmesh_api::{Condition, MeshPeerSpec, MeshPeerStatus, peer::ApprovedPeer as Approval};

    const KEY: &str = "mGpQp9SmU3aD4Jq0Ykwj1CzO3P0k9+4w6VvVvHXxrmI=";

    fn mk_peer(
        name: &str,
        node: bool,
        ready: bool,
        spec_cidrs: &[&str],
        approved: &[&str],
    ) -> MeshPeer {
        let mut p = MeshPeer::new(
            name,
            MeshPeerSpec {
                node: node.then(|| name.to_string()),
                pod_cidrs: spec_cidrs.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        );
        p.status = Some(MeshPeerStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ready {
                    ConditionStatus::True
                } else {
                    ConditionStatus::False
                },
                observed_generation: None,
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                reason: "Valid".into(),
                message: String::new(),
            }],
            approved: Some(Approval {
                public_key: Some(KEY.into()),
                allowed_ips: approved.iter().map(|s| s.to_string()).collect(),
                endpoint: Some("192.0.2.2:51820".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        p
    }

    #[test]
    fn only_ready_approved_peers_other_than_this_node_are_configured() {
        let peers = [
            mk_peer("me", true, true, &["10.244.0.0/24"], &["10.244.0.0/24"]),
            mk_peer("ok", true, true, &["10.244.1.0/24"], &["10.244.1.0/24"]),
            mk_peer(
                "unready",
                true,
                false,
                &["10.244.2.0/24"],
                &["10.244.2.0/24"],
            ),
        ];
        let got = approved_peers(&peers, "me");
        assert_eq!(
            got.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["ok"]
        );
        assert_eq!(
            got[0].endpoint,
            Some("192.0.2.2:51820".parse().expect("sa"))
        );
    }

    #[test]
    fn a_node_uses_only_the_peer_its_node_owns() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some("n7".into()),
                uid: Some("u7".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let owner = |uid: &str| OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: "n7".into(),
            uid: uid.into(),
            ..Default::default()
        };
        let squatter = mk_peer("n7", false, true, &[], &["10.250.0.7/32"]);
        let mut named = mk_peer("n7", true, true, &["10.244.66.0/24"], &[]);
        let mut stale = named.clone();
        stale.metadata.owner_references = Some(vec![owner("u6")]);
        let mut own = named.clone();
        own.metadata.owner_references = Some(vec![owner("u7")]);
        named.metadata.owner_references = None;
        for peers in [&[squatter.clone()][..], &[named], &[stale], &[squatter]] {
            assert_eq!(own_peer(peers, &node), None);
        }
        assert_eq!(own_peer(std::slice::from_ref(&own), &node), Some(&own));
    }

    #[test]
    fn a_node_approval_never_reaches_beyond_its_own_pod_subnets() {
        let peers = [mk_peer(
            "n",
            true,
            true,
            &["10.244.1.0/24"],
            &["10.244.1.0/24", "0.0.0.0/0"],
        )];
        let got = approved_peers(&peers, "me");
        assert_eq!(
            got[0].allowed_ips,
            vec!["10.244.1.0/24".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn the_endpoint_annotation_overrides_the_node_address() {
        let mut node = Node {
            status: Some(k8s_openapi::api::core::v1::NodeStatus {
                addresses: Some(vec![k8s_openapi::api::core::v1::NodeAddress {
                    type_: "InternalIP".into(),
                    address: "192.168.1.5".into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            endpoint(&node, EndpointAddressType::InternalIP, 51820),
            Some("192.168.1.5:51820".parse().expect("sa"))
        );
        assert_eq!(
            endpoint(&node, EndpointAddressType::ExternalIP, 51820),
            None
        );
        node.metadata.annotations = Some(
            [(
                ENDPOINT_ANNOTATION.to_string(),
                "203.0.113.9:4500".to_string(),
            )]
            .into(),
        );
        assert_eq!(
            endpoint(&node, EndpointAddressType::InternalIP, 51820),
            Some("203.0.113.9:4500".parse().expect("sa"))
        );
    }

    #[test]
    fn public_endpoints_are_the_annotation_or_every_external_address() {
        let addr = |type_: &str, address: &str| k8s_openapi::api::core::v1::NodeAddress {
            type_: type_.into(),
            address: address.into(),
        };
        let mut node = Node {
            status: Some(k8s_openapi::api::core::v1::NodeStatus {
                addresses: Some(vec![
                    addr("InternalIP", "10.0.0.5"),
                    addr("ExternalIP", "198.51.100.5"),
                    addr("ExternalIP", "2001:db8::5"),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let got = |node: &Node| -> Vec<String> {
            public_endpoints(node, 51820)
                .0
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(got(&node), ["198.51.100.5:51820", "[2001:db8::5]:51820"]);
        node.metadata.annotations = Some(
            [(
                PUBLIC_ENDPOINT_ANNOTATION.to_string(),
                "203.0.113.9:4500, 2001:db8::9, junk".to_string(),
            )]
            .into(),
        );
        assert_eq!(got(&node), ["203.0.113.9:4500", "[2001:db8::9]:51820"]);
        assert_eq!(
            public_endpoints(&node, 51820).1,
            ["junk"],
            "said, not published"
        );
        node.metadata.annotations = None;
        node.status = None;
        assert!(got(&node).is_empty(), "a node behind NAT has none");
    }

    #[test]
    fn a_nodes_own_location_is_its_approvals_and_its_label_until_then() {
        let mut node = Node::default();
        node.metadata.labels =
            Some([("topology.kubernetes.io/region".to_string(), "b".to_string())].into());
        let label = "topology.kubernetes.io/region";
        let me_of = |own: Option<&MeshPeer>| me("n", own, Some(&node), label, vec![]);
        assert_eq!(me_of(None).location.as_deref(), Some("b"));
        let mut own = mk_peer("n", true, true, &["10.244.1.0/24"], &["10.244.1.0/24"]);
        if let Some(a) = own.status.as_mut().and_then(|s| s.approved.as_mut()) {
            a.location = Some("a".into());
            a.nat = Some(NatKind::EndpointIndependent);
            a.mapped_endpoint = Some("203.0.113.1:4000".into());
        }
        let m = me_of(Some(&own));
        assert_eq!(m.location.as_deref(), Some("a"), "the approval wins");
        assert_eq!(m.nat, Nat::EndpointIndependent);
        assert_eq!(
            m.mapped,
            Some("203.0.113.1:4000".parse().expect("endpoint"))
        );
    }
}
