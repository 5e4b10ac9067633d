//! The node's `MeshPeer` status and `MeshPeerReport`, planned: the agent's conditions from
//! what the pass saw, paths and connectivity from the device's handshakes, and whether a
//! write is due. Pure (the time is an argument); the agent sends what [`status_write`] and
//! [`report_write`] return and remembers it once it was taken.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use wgmesh_api::{
    Condition, ConditionStatus, MeshPeerReportSpec, MeshPeerStatus,
    consts::condition,
    peer::{Connectivity, PathKind, PeerPath},
};
use wgmesh_core::paths::{self, Path};
use wgmesh_core::topology::Transport;
use wgmesh_device::config::PeerSnapshot;

/// A peer counts as connected while its last handshake is younger than this.
pub(crate) const CONNECTED_WITHIN: Duration =
    Duration::from_secs(wgmesh_api::consts::CONNECTED_WITHIN_SECS);

/// A time as the API writes it, if it can be.
pub(crate) fn time(t: SystemTime) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(t).ok().map(Time)
}

/// A condition, keeping its `lastTransitionTime` from `prev` when its status did not change.
pub(crate) fn condition_of(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    prev: &[Condition],
    now: SystemTime,
) -> Condition {
    let status = if ok {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let since = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .or_else(|| time(now))
        .unwrap_or(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    Condition {
        type_: type_.to_owned(),
        status,
        observed_generation: None,
        last_transition_time: since,
        reason: reason.to_owned(),
        message: message.into(),
    }
}

/// What a pass saw of the node's own datapath.
#[derive(Debug, Clone, Default)]
pub(crate) struct Health<'a> {
    pub interface: &'a str,
    /// Why the device could not come up, if it could not.
    pub device_error: Option<&'a str>,
    pub device_up: bool,
    pub routes_ok: bool,
    /// How many routes the plan has.
    pub routes: usize,
    /// On-link peers routed in the clear by `hostGateway: Fallback`.
    pub fallback: Vec<&'a str>,
}

/// The agent's conditions: `KeyPublished`, `DeviceUp`, `RoutesInstalled`,
/// `PlaintextFallback`.
pub(crate) fn conditions(h: &Health<'_>, prev: &[Condition], now: SystemTime) -> Vec<Condition> {
    let c =
        |type_, ok, reason, message: String| condition_of(type_, ok, reason, message, prev, now);
    vec![
        c(
            condition::KEY_PUBLISHED,
            true,
            "Published",
            "the node's public key is published".into(),
        ),
        match (h.device_error, h.device_up) {
            (_, true) => c(
                condition::DEVICE_UP,
                true,
                "Up",
                format!("{} is up", h.interface),
            ),
            (Some(e), false) => c(condition::DEVICE_UP, false, "DeviceFailed", e.to_owned()),
            (None, false) => c(
                condition::DEVICE_UP,
                false,
                "DeviceGone",
                "the WireGuard device stopped".into(),
            ),
        },
        if h.routes_ok {
            c(
                condition::ROUTES_INSTALLED,
                true,
                "Installed",
                format!("{} routes installed", h.routes),
            )
        } else {
            c(
                condition::ROUTES_INSTALLED,
                false,
                "RouteErrors",
                "some routes could not be installed; see the agent's log".into(),
            )
        },
        if h.fallback.is_empty() {
            c(
                condition::PLAINTEXT_FALLBACK,
                false,
                "Encrypted",
                "no peer is routed in the clear by fallback".into(),
            )
        } else {
            c(
                condition::PLAINTEXT_FALLBACK,
                true,
                "DeviceDown",
                format!(
                    "the device is down; on-link peers {} are routed unencrypted",
                    h.fallback.join(", ")
                ),
            )
        },
    ]
}

/// Connectivity from the device's peers: how many, how many handshook within
/// [`CONNECTED_WITHIN`], the newest and oldest handshake.
pub(crate) fn connectivity(peers: &[PeerSnapshot], now: SystemTime) -> Connectivity {
    let handshakes: Vec<SystemTime> = peers.iter().filter_map(|p| p.last_handshake).collect();
    Connectivity {
        peers_configured: u32::try_from(peers.len()).unwrap_or(u32::MAX),
        peers_connected: u32::try_from(
            handshakes
                .iter()
                .filter(|t| now.duration_since(**t).is_ok_and(|d| d < CONNECTED_WITHIN))
                .count(),
        )
        .unwrap_or(u32::MAX),
        last_handshake_at: handshakes.iter().max().and_then(|t| time(*t)),
        oldest_handshake_at: handshakes.iter().min().and_then(|t| time(*t)),
    }
}

/// The path to each peer as the status reports it: the kind the path plan chose (host-gw
/// where the transport plan routes the peer in the clear), and what the device sees on the
/// peer that carries the traffic (for a relay, the relay): the endpoint it sends to, as it
/// learned it from authenticated packets, and the latest handshake.
pub(crate) fn paths(
    chosen: &BTreeMap<String, Path>,
    transports: &BTreeMap<String, Transport>,
    device: &BTreeMap<String, PeerSnapshot>,
) -> Vec<PeerPath> {
    chosen
        .iter()
        .map(|(name, path)| {
            let (path_kind, via) = match &path.kind {
                paths::PathKind::Direct
                    if matches!(
                        transports.get(name),
                        Some(Transport::HostGateway | Transport::FallbackHostGateway)
                    ) =>
                {
                    (PathKind::HostGateway, None)
                }
                paths::PathKind::Direct => (PathKind::Direct, None),
                paths::PathKind::NatTraversal => (PathKind::NatTraversal, None),
                paths::PathKind::Relay { via } => (PathKind::Relay, Some(via.clone())),
            };
            let carrier = device.get(via.as_ref().unwrap_or(name));
            PeerPath {
                peer: name.clone(),
                path: path_kind,
                endpoint: carrier
                    .and_then(|p| p.endpoint)
                    .or(path.endpoint)
                    .map(|e| e.to_string()),
                latest_handshake: carrier.and_then(|p| p.last_handshake).and_then(time),
                via,
            }
        })
        .collect()
}

/// How many peers each kind of path serves, for `kubectl get -o wide`: `3 Direct, 2 Relay`.
pub(crate) fn summary(paths: &[PeerPath]) -> Option<String> {
    let kinds = [
        PathKind::Direct,
        PathKind::HostGateway,
        PathKind::NatTraversal,
        PathKind::Relay,
    ];
    let parts: Vec<String> = kinds
        .iter()
        .filter_map(|k| {
            let n = paths.iter().filter(|p| p.path == *k).count();
            (n > 0).then(|| format!("{n} {}", k.as_str()))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// A path's kind and relay, what a change is about.
pub(crate) type PathKey = (PathKind, Option<String>);

/// The paths by peer, for comparing with the next pass.
pub(crate) fn path_keys(paths: &[PeerPath]) -> BTreeMap<String, PathKey> {
    paths
        .iter()
        .map(|p| (p.peer.clone(), (p.path, p.via.clone())))
        .collect()
}

fn describe((kind, via): &PathKey) -> String {
    match via {
        Some(v) => format!("{} via {v}", kind.as_str()),
        None => kind.as_str().to_owned(),
    }
}

/// The note of a `PathChanged` Event: every peer whose path changed since `prev`, e.g.
/// `node-5: Relay via node-1 (was NATTraversal)`. Peers new or gone are not changes. `None`
/// when nothing changed.
pub(crate) fn path_changes(
    prev: &BTreeMap<String, PathKey>,
    now: &BTreeMap<String, PathKey>,
) -> Option<String> {
    let changes: Vec<String> = now
        .iter()
        .filter_map(|(peer, key)| {
            let before = prev.get(peer)?;
            (before != key).then(|| format!("{peer}: {} (was {})", describe(key), describe(before)))
        })
        .collect();
    (!changes.is_empty()).then(|| changes.join("; "))
}

/// A write: the body to send, and what to remember once it was taken (for a report, the
/// body without handshake times, which alone never make a write due).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Write {
    pub body: serde_json::Value,
    pub comparable: serde_json::Value,
}

/// Whether to write `status`, and what: when it differs from the last write that was taken.
/// What the node sees of its tunnels is not in it but in its report ([`report_write`]).
pub(crate) fn status_write(
    status: &MeshPeerStatus,
    last: Option<&serde_json::Value>,
) -> Option<Write> {
    let body = serde_json::to_value(status).unwrap_or_default();
    (last != Some(&body)).then(|| Write {
        comparable: body.clone(),
        body,
    })
}

/// Whether to write the node's report, and what. A write is due when what it says differs
/// from the last write that was taken, handshake times aside (they change every two minutes
/// on every tunnel with traffic, and ride along with the next write). What every join or
/// departure changes on every node (a path more or less, the summary, the connectivity
/// counts) is due only when `allowed`, which the agent bounds in time, so that nodes joining
/// one after another cost each node one write per interval, not one per join; a change of
/// the path to a peer it had (its kind, relay or endpoint) is due at once. A node whose
/// tunnels are steady writes nothing at all. `last` is `None` for a report never written
/// for the node's current peer.
pub(crate) fn report_write(
    report: &MeshPeerReportSpec,
    last: Option<&serde_json::Value>,
    allowed: bool,
) -> Option<Write> {
    let body = serde_json::to_value(report).unwrap_or_default();
    let mut comparable = body.clone();
    if let Some(paths) = comparable.get_mut("paths").and_then(|p| p.as_array_mut()) {
        for p in paths.iter_mut().filter_map(|p| p.as_object_mut()) {
            p.remove("latestHandshake");
        }
    }
    if let Some(c) = &report.connectivity {
        comparable["connectivity"] = serde_json::json!({
            "peersConfigured": c.peers_configured,
            "peersConnected": c.peers_connected,
        });
    }
    // The path entries (handshake times removed) by peer.
    let by_peer = |v: &serde_json::Value| -> BTreeMap<String, serde_json::Value> {
        v.get("paths")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
            .map(|e| (e["peer"].as_str().unwrap_or_default().to_owned(), e.clone()))
            .collect()
    };
    let path_changed = |l: &serde_json::Value| {
        let before = by_peer(l);
        by_peer(&comparable)
            .iter()
            .any(|(peer, e)| before.get(peer).is_some_and(|b| b != e))
    };
    match last {
        Some(l) if *l == comparable => None,
        Some(l) if !allowed && !path_changed(l) => None,
        _ => Some(Write { body, comparable }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn find<'a>(cs: &'a [Condition], type_: &str) -> &'a Condition {
        cs.iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_}"))
    }

    fn healthy() -> Health<'static> {
        Health {
            interface: "wg0",
            device_error: None,
            device_up: true,
            routes_ok: true,
            routes: 5,
            fallback: vec![],
        }
    }

    #[test]
    fn a_healthy_node_says_so_and_keeps_its_transition_times() {
        let first = conditions(&healthy(), &[], at(0));
        assert_eq!(first.len(), 4);
        assert_eq!(find(&first, condition::DEVICE_UP).reason, "Up");
        assert_eq!(
            find(&first, condition::ROUTES_INSTALLED).message,
            "5 routes installed"
        );
        assert_eq!(
            find(&first, condition::PLAINTEXT_FALLBACK).status,
            ConditionStatus::False
        );
        // Later, unchanged: the transition times stay; a flip gets the new time.
        let later = conditions(&healthy(), &first, at(100));
        assert_eq!(later, first);
        let down = Health {
            device_up: false,
            device_error: Some("creating TUN interface wg0"),
            ..healthy()
        };
        let flipped = conditions(&down, &later, at(200));
        let d = find(&flipped, condition::DEVICE_UP);
        assert_eq!(
            (d.status, d.reason.as_str()),
            (ConditionStatus::False, "DeviceFailed")
        );
        assert_eq!(d.message, "creating TUN interface wg0");
        assert_eq!(d.last_transition_time, time(at(200)).expect("time"));
        assert_eq!(
            find(&flipped, condition::KEY_PUBLISHED).last_transition_time,
            time(at(0)).expect("time")
        );
    }

    #[test]
    fn a_stopped_device_route_errors_and_fallback_are_named() {
        let h = Health {
            device_up: false,
            routes_ok: false,
            fallback: vec!["node-2", "node-3"],
            ..healthy()
        };
        let cs = conditions(&h, &[], at(0));
        assert_eq!(find(&cs, condition::DEVICE_UP).reason, "DeviceGone");
        assert_eq!(find(&cs, condition::ROUTES_INSTALLED).reason, "RouteErrors");
        let f = find(&cs, condition::PLAINTEXT_FALLBACK);
        assert_eq!(f.status, ConditionStatus::True);
        assert!(f.message.contains("node-2, node-3"), "{}", f.message);
    }

    fn peer(handshake: Option<SystemTime>) -> PeerSnapshot {
        PeerSnapshot {
            public_key: [1; 32],
            next_public_key: None,
            preshared_key: None,
            endpoint: None,
            last_handshake: handshake,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: 0,
            allowed_ips: vec![],
            sessions: vec![],
        }
    }

    #[test]
    fn connectivity_counts_handshakes_younger_than_a_session() {
        let peers = [
            peer(Some(at(1_000))),
            peer(Some(at(1_000 - 179))),
            peer(Some(at(1_000 - 180))),
            peer(None),
        ];
        let c = connectivity(&peers, at(1_000));
        assert_eq!((c.peers_configured, c.peers_connected), (4, 2));
        assert_eq!(c.last_handshake_at, time(at(1_000)));
        assert_eq!(c.oldest_handshake_at, time(at(820)));
    }

    #[test]
    fn a_status_write_is_due_only_on_a_change() {
        let status = MeshPeerStatus {
            public_key: Some("k".into()),
            ..Default::default()
        };
        let first = status_write(&status, None).expect("a first write");
        assert_eq!(status_write(&status, Some(&first.comparable)), None);
        let changed = MeshPeerStatus {
            public_key: Some("k2".into()),
            ..Default::default()
        };
        assert!(status_write(&changed, Some(&first.comparable)).is_some());
    }

    #[test]
    fn a_report_write_is_due_on_a_path_change_at_once_and_on_counts_when_allowed() {
        let report = |conn: Connectivity, peers: &[(&str, PathKind)]| MeshPeerReportSpec {
            paths: peers
                .iter()
                .map(|(peer, path)| PeerPath {
                    peer: (*peer).into(),
                    path: *path,
                    ..Default::default()
                })
                .collect(),
            path_summary: None,
            connectivity: Some(conn),
        };
        let conn = connectivity(&[peer(Some(at(0)))], at(10));
        let first = report_write(&report(conn.clone(), &[]), None, false).expect("a first write");
        assert!(first.body.get("connectivity").is_some());
        // Steady: nothing to write, however long, allowed or not.
        for allowed in [false, true] {
            assert_eq!(
                report_write(&report(conn.clone(), &[]), Some(&first.comparable), allowed),
                None
            );
        }
        // Newer handshakes alone are no change.
        let later = connectivity(&[peer(Some(at(100)))], at(110));
        assert_eq!(
            report_write(&report(later, &[]), Some(&first.comparable), true),
            None
        );
        // A peer more (what a join changes on every node) is due when allowed.
        let joined = report(conn.clone(), &[("new", PathKind::Direct)]);
        assert_eq!(report_write(&joined, Some(&first.comparable), false), None);
        let with_peer = report_write(&joined, Some(&first.comparable), true).expect("due");
        // The path to a peer it had changing is due at once.
        let mut relayed = joined.clone();
        relayed.paths[0].path = PathKind::Relay;
        relayed.paths[0].via = Some("r".into());
        assert!(report_write(&relayed, Some(&with_peer.comparable), false).is_some());
        // The counts changing are due when allowed.
        let lost = connectivity(&[peer(Some(at(0))), peer(None)], at(10));
        assert_eq!(
            report_write(&report(lost.clone(), &[]), Some(&first.comparable), false),
            None
        );
        let w = report_write(&report(lost, &[]), Some(&first.comparable), true).expect("due");
        assert_eq!(w.body["connectivity"]["peersConfigured"], 2);
    }

    fn path(kind: paths::PathKind, endpoint: Option<&str>) -> Path {
        Path {
            kind,
            endpoint: endpoint.map(|e| e.parse().expect("endpoint")),
        }
    }

    #[test]
    fn a_path_reports_what_the_device_sees_on_the_peer_that_carries_it() {
        let chosen = BTreeMap::from([
            (
                "a".to_owned(),
                path(paths::PathKind::Direct, Some("198.51.100.1:51820")),
            ),
            (
                "b".to_owned(),
                path(paths::PathKind::NatTraversal, Some("203.0.113.2:4000")),
            ),
            (
                "c".to_owned(),
                path(paths::PathKind::Relay { via: "a".into() }, None),
            ),
            (
                "d".to_owned(),
                path(paths::PathKind::Direct, Some("10.0.0.4:51820")),
            ),
        ]);
        let transports = BTreeMap::from([("d".to_owned(), Transport::HostGateway)]);
        let mut roamed = peer(Some(at(5)));
        roamed.endpoint = Some("198.51.100.1:40000".parse().expect("endpoint"));
        let device = BTreeMap::from([("a".to_owned(), roamed), ("b".to_owned(), peer(None))]);
        let got = super::paths(&chosen, &transports, &device);
        let by: BTreeMap<&str, &PeerPath> = got.iter().map(|p| (p.peer.as_str(), p)).collect();
        assert_eq!(by["a"].path, PathKind::Direct);
        assert_eq!(
            by["a"].endpoint.as_deref(),
            Some("198.51.100.1:40000"),
            "the learned endpoint"
        );
        assert_eq!(by["a"].latest_handshake, time(at(5)));
        assert_eq!(by["b"].path, PathKind::NatTraversal);
        assert_eq!(by["b"].endpoint.as_deref(), Some("203.0.113.2:4000"));
        assert_eq!(
            (by["c"].path, by["c"].via.as_deref()),
            (PathKind::Relay, Some("a"))
        );
        assert_eq!(
            by["c"].endpoint.as_deref(),
            Some("198.51.100.1:40000"),
            "the relay's"
        );
        assert_eq!(by["c"].latest_handshake, time(at(5)));
        assert_eq!(by["d"].path, PathKind::HostGateway);
        assert_eq!(
            summary(&got).as_deref(),
            Some("1 Direct, 1 HostGateway, 1 NATTraversal, 1 Relay")
        );
        assert_eq!(summary(&[]), None);
    }

    #[test]
    fn a_changed_path_is_one_event_naming_each_change() {
        let key = |k: PathKind, via: Option<&str>| (k, via.map(str::to_owned));
        let prev = BTreeMap::from([
            ("x".to_owned(), key(PathKind::NatTraversal, None)),
            ("y".to_owned(), key(PathKind::Direct, None)),
            ("gone".to_owned(), key(PathKind::Direct, None)),
        ]);
        let mut now = prev.clone();
        now.remove("gone");
        now.insert("new".to_owned(), key(PathKind::Direct, None));
        assert_eq!(
            path_changes(&prev, &now),
            None,
            "peers coming and going are no change"
        );
        now.insert("x".to_owned(), key(PathKind::Relay, Some("r")));
        assert_eq!(
            path_changes(&prev, &now).as_deref(),
            Some("x: Relay via r (was NATTraversal)")
        );
    }

    #[test]
    fn a_handshake_alone_never_makes_a_write_due_but_a_new_endpoint_does() {
        let mk = |endpoint: &str, hs: u64| MeshPeerReportSpec {
            paths: vec![PeerPath {
                peer: "a".into(),
                path: PathKind::Direct,
                via: None,
                endpoint: Some(endpoint.into()),
                latest_handshake: time(at(hs)),
            }],
            ..Default::default()
        };
        let first = report_write(&mk("192.0.2.1:1", 0), None, false).expect("first");
        assert!(first.body["paths"][0].get("latestHandshake").is_some());
        for allowed in [false, true] {
            assert_eq!(
                report_write(&mk("192.0.2.1:1", 120), Some(&first.comparable), allowed),
                None
            );
        }
        // A path's new endpoint is due at once, and carries the latest handshake.
        let due =
            report_write(&mk("192.0.2.9:1", 120), Some(&first.comparable), false).expect("due");
        assert_eq!(
            due.body["paths"][0]["latestHandshake"],
            serde_json::json!(time(at(120)))
        );
    }
}
