//! Property tests of peer admission: what is approved never collides with the pods' address
//! space, another peer's addresses or keys, or an endpoint; and the input order does not matter.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use proptest::prelude::*;
use wgmesh_core::net::overlaps;
use wgmesh_core::{
    ExternalPeer, NodePeer, Pool, PoolSpec, PrefixLengths, PublicKey, Verdict, admit,
    parse_endpoint, validate_pools,
};

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Every address open to external peers: these properties are about the other rules.
fn open_ranges() -> Vec<IpNet> {
    ["0.0.0.0/0", "::/0"]
        .iter()
        .map(|r| r.parse().expect("a range"))
        .collect()
}

fn pools() -> Vec<Pool> {
    validate_pools(&[PoolSpec {
        name: "pods".into(),
        created: t(0),
        cidrs: vec!["10.244.0.0/16".into(), "fd00:244::/48".into()],
        node_prefix_length: PrefixLengths {
            ipv4: Some(24),
            ipv6: Some(64),
        },
        node_selector: None,
    }])
    .valid
}

/// A small pool of valid keys, so duplicates are common.
fn key(i: u8) -> String {
    PublicKey::from_bytes([i + 2; 32])
        .expect("valid test key")
        .to_string()
}

fn arb_key() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        8 => (0u8..12).prop_map(|i| Some(key(i))),
        1 => Just(None),
        1 => Just(Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned())),
    ]
}

fn arb_pod_subnet() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (0u8..6).prop_map(|i| format!("10.244.{i}.0/24").parse().expect("net")),
        (0u8..6).prop_map(|i| format!("fd00:244:0:{i}::/64").parse().expect("net")),
    ]
}

/// Endpoints in the underlay (192.0.2.0/24, 198.51.100.0/24), in pod space, or not literals.
fn arb_endpoint() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u8..8).prop_map(|i| format!("192.0.2.{i}:51820")),
        3 => (0u8..8).prop_map(|i| format!("198.51.100.{i}:51820")),
        1 => (0u8..4).prop_map(|i| format!("10.244.{i}.9:51820")),
        1 => Just("gw.example.com:51820".to_owned()),
    ]
}

/// Allowed IPs overlapping pods, nodes' underlay, each other, or nothing at all.
fn arb_allowed() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u8..8, 24u8..=30).prop_map(|(i, len)| {
            let n: IpNet = format!("192.168.{i}.0/{len}").parse().expect("net");
            n.to_string()
        }),
        2 => (0u8..8).prop_map(|i| format!("198.51.100.{}/30", i * 4)),
        1 => (0u8..8).prop_map(|i| format!("10.244.{i}.0/24")),
        1 => (0u8..8).prop_map(|i| format!("192.0.2.{i}/32")),
        1 => Just("192.168.0.0/16".to_owned()),
        1 => Just("0.0.0.0/0".to_owned()),
        1 => Just("192.168.3.1/24".to_owned()),
        1 => (0u8..4).prop_map(|i| format!("fd00:99:{i}::/48")),
    ]
}

fn arb_nodes() -> impl Strategy<Value = Vec<NodePeer>> {
    prop::collection::btree_map(
        0u8..10,
        (
            0u64..5,
            prop::collection::vec(arb_pod_subnet(), 0..3),
            arb_key(),
            prop::option::weighted(0.3, arb_key()),
            prop::collection::vec(arb_endpoint(), 0..2),
        ),
        0..6,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(
                |(i, (created, pod_cidrs, public_key, next, endpoints))| NodePeer {
                    name: format!("node-{i}"),
                    created: t(created),
                    pod_cidrs,
                    public_key,
                    next_public_key: next.flatten(),
                    endpoints,
                    public_endpoints: Vec::new(),
                },
            )
            .collect()
    })
}

fn arb_externals() -> impl Strategy<Value = Vec<ExternalPeer>> {
    prop::collection::btree_map(
        0u8..10,
        (
            0u64..5,
            arb_key(),
            prop::collection::vec(arb_allowed(), 0..3),
            prop::option::of(arb_endpoint()),
        ),
        0..8,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(
                |(i, (created, public_key, allowed_ips, endpoint))| ExternalPeer {
                    name: format!("ext-{i}"),
                    created: t(created),
                    public_key,
                    allowed_ips,
                    endpoint,
                },
            )
            .collect()
    })
}

fn ready_externals<'a>(
    verdicts: &'a BTreeMap<String, Verdict>,
    externals: &'a [ExternalPeer],
) -> impl Iterator<Item = (&'a ExternalPeer, &'a Verdict)> {
    externals
        .iter()
        .map(|e| (e, &verdicts[&e.name]))
        .filter(|(_, v)| v.ready())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn approved_external_addresses_never_collide(nodes in arb_nodes(), externals in arb_externals()) {
        let pools = pools();
        let verdicts = admit(&pools, &nodes, &externals, &open_ranges());
        let node_endpoints: Vec<_> = nodes
            .iter()
            .flat_map(|n| n.endpoints.iter().filter_map(|e| parse_endpoint(e).ok()))
            .collect();
        let ready: Vec<_> = ready_externals(&verdicts, &externals).collect();
        for (i, (ext, v)) in ready.iter().enumerate() {
            let approved = v.approved.as_ref().expect("ready means approved");
            prop_assert!(!approved.allowed_ips.is_empty());
            for net in &approved.allowed_ips {
                prop_assert!(net.prefix_len() > 0, "{} approved a default route", ext.name);
                for pool in &pools {
                    prop_assert!(pool.overlapping(net).is_none(), "{} claims pod space {net}", ext.name);
                }
                for node in &nodes {
                    for pod in &node.pod_cidrs {
                        prop_assert!(!overlaps(net, pod), "{} claims {}'s {pod}", ext.name, node.name);
                    }
                }
                for ep in &node_endpoints {
                    prop_assert!(!net.contains(&ep.ip()), "{} captures endpoint {ep}", ext.name);
                }
                for (other, ov) in &ready[i + 1..] {
                    let theirs = &ov.approved.as_ref().expect("approved").allowed_ips;
                    for o in theirs {
                        prop_assert!(!overlaps(net, o), "{} and {} both got {net}/{o}", ext.name, other.name);
                    }
                }
            }
            if let Some(ep) = approved.endpoints.first() {
                for pool in &pools {
                    prop_assert!(!pool.cidrs().iter().any(|c| c.contains(&ep.ip())));
                }
            }
        }
    }

    #[test]
    fn node_peers_get_exactly_their_pod_subnets_and_keys_are_unique(
        nodes in arb_nodes(),
        externals in arb_externals(),
    ) {
        let verdicts = admit(&pools(), &nodes, &externals, &open_ranges());
        for node in &nodes {
            let v = &verdicts[&node.name];
            prop_assert_eq!(v.ready(), v.problems.is_empty());
            prop_assert_eq!(v.ready(), v.reason() == wgmesh_core::Reason::Valid);
            if let Some(approved) = &v.approved {
                let mut want = node.pod_cidrs.clone();
                want.sort();
                want.dedup();
                prop_assert_eq!(&approved.allowed_ips, &want);
            }
        }
        let current: Vec<PublicKey> = verdicts
            .values()
            .filter_map(|v| v.approved.as_ref().map(|a| a.public_key))
            .collect();
        let mut unique = current.clone();
        unique.sort();
        unique.dedup();
        prop_assert_eq!(unique.len(), current.len(), "two admitted peers share a key");
        for (name, v) in &verdicts {
            if let Some(next) = v.approved.as_ref().and_then(|a| a.next_public_key) {
                let others = verdicts
                    .iter()
                    .filter(|(n, _)| *n != name)
                    .filter_map(|(_, o)| o.approved.as_ref())
                    .any(|a| a.public_key == next);
                prop_assert!(!others, "{name}'s next key is another peer's key");
            }
        }
    }

    #[test]
    fn admission_does_not_depend_on_input_order(nodes in arb_nodes(), externals in arb_externals()) {
        let pools = pools();
        let verdicts = admit(&pools, &nodes, &externals, &open_ranges());
        let mut nodes_rev = nodes.clone();
        nodes_rev.reverse();
        let mut ext_rev = externals.clone();
        ext_rev.reverse();
        prop_assert_eq!(verdicts, admit(&pools, &nodes_rev, &ext_rev, &open_ranges()));
    }

    #[test]
    fn keys_round_trip_and_only_the_listed_points_are_refused(bytes in any::<[u8; 32]>()) {
        match PublicKey::from_bytes(bytes) {
            Ok(key) => {
                prop_assert!(!wgmesh_core::keys::is_low_order(&bytes));
                let text = key.to_string();
                prop_assert_eq!(text.len(), 44);
                prop_assert_eq!(text.parse::<PublicKey>(), Ok(key));
            }
            Err(_) => prop_assert!(bytes == [0; 32] || wgmesh_core::keys::is_low_order(&bytes)),
        }
    }
}
