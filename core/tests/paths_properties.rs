//! Property tests of the path plan over random meshes across locations: both ends of every
//! pair choose the same kind of path and the same relay (a pair that disagrees loses its
//! traffic), a relay is never an end of its pair and always a public node, no address is
//! routed to two peers, and keepalives go only from nodes behind NAT.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use proptest::prelude::*;
use wgmesh_core::net::Family;
use wgmesh_core::paths::{Me, Nat, PathKind, PathSettings, plan};
use wgmesh_core::topology::ApprovedPeer;

/// One node: its location (0–2), its NAT, and whether its mapping is known.
type NodeSpec = (u8, Nat, bool);

fn nat() -> impl Strategy<Value = Nat> {
    prop_oneof![
        Just(Nat::Public),
        Just(Nat::EndpointIndependent),
        Just(Nat::Symmetric),
        Just(Nat::Unknown),
    ]
}

fn endpoint(text: &str) -> SocketAddr {
    text.parse().expect("endpoint")
}

fn mk_peer(i: usize, (location, nat, mapped): NodeSpec) -> ApprovedPeer {
    ApprovedPeer {
        name: format!("n{i}"),
        is_node: true,
        public_key: format!("key-{i}"),
        next_public_key: None,
        allowed_ips: vec![format!("10.244.{i}.0/24").parse().expect("net")],
        endpoint: Some(endpoint(&format!("10.{location}.0.{}:51820", i + 1))),
        persistent_keepalive: 0,
        location: Some(format!("l{location}")),
        public_endpoints: if nat == Nat::Public {
            vec![endpoint(&format!("198.51.100.{}:51820", i + 1))]
        } else {
            vec![]
        },
        nat,
        mapped_endpoint: (nat == Nat::EndpointIndependent && mapped)
            .then(|| endpoint(&format!("203.0.113.{}:40000", i + 1))),
        underlay_mtu: None,
    }
}

fn me(p: &ApprovedPeer) -> Me {
    Me::of(p, vec![Family::V4])
}

proptest! {
    #[test]
    fn both_ends_of_every_pair_agree(
        specs in prop::collection::vec((0u8..3, nat(), any::<bool>()), 2..12),
        relay in any::<bool>(),
    ) {
        let peers: Vec<ApprovedPeer> =
            specs.iter().enumerate().map(|(i, s)| mk_peer(i, *s)).collect();
        let settings = PathSettings { nat_keepalive: 25, relay };
        let plans: Vec<_> = peers
            .iter()
            .map(|p| plan(&me(p), &peers, None, &settings))
            .collect();
        let public: BTreeSet<String> = peers
            .iter()
            .filter(|p| p.nat == Nat::Public)
            .map(|p| p.name.clone())
            .collect();
        for (i, a) in peers.iter().enumerate() {
            let mut routed = BTreeSet::new();
            for p in &plans[i].peers {
                for net in &p.allowed_ips {
                    prop_assert!(routed.insert(*net), "{}: {net} routed to two peers", a.name);
                }
                prop_assert!(
                    p.persistent_keepalive == 0 || a.nat != Nat::Public,
                    "{} is public yet keeps {} alive", a.name, p.name
                );
            }
            for (j, b) in peers.iter().enumerate().filter(|(j, _)| *j != i) {
                let ab = &plans[i].paths[&b.name].kind;
                let ba = &plans[j].paths[&a.name].kind;
                prop_assert_eq!(ab, ba, "{} and {} disagree", &a.name, &b.name);
                if let PathKind::Relay { via } = ab {
                    prop_assert!(relay);
                    prop_assert!(via != &a.name && via != &b.name);
                    prop_assert!(public.contains(via), "relay {via} is not public");
                }
            }
        }
    }
}
