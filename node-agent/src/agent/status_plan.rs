//! The node's `MeshPeer` status, planned: the agent's conditions from what the pass saw,
//! connectivity from the device's handshakes, and whether a write is due. Pure (the time is
//! an argument); the agent sends what [`write`] returns and remembers it once it was taken.

use crate::device::config::PeerSnapshot;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::{Duration, SystemTime};
use wgmesh_api::{
    Condition, ConditionStatus, MeshPeerStatus, consts::condition, peer::Connectivity,
};

/// A peer counts as connected while its last handshake is younger than this: WireGuard
/// drops an idle session 180 s after its handshake.
pub(crate) const CONNECTED_WITHIN: Duration = Duration::from_secs(180);

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

/// A status write: the body to send, and what to remember once it was taken (the body
/// without connectivity, which alone does not make a write due).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Write {
    pub body: serde_json::Value,
    pub comparable: serde_json::Value,
}

/// Whether to write `status`: when it differs from the last write that was taken, or when
/// connectivity is due. Every write carries connectivity (under server-side apply a field
/// left out is removed).
pub(crate) fn write(
    status: &MeshPeerStatus,
    connectivity: Option<&Connectivity>,
    last: Option<&serde_json::Value>,
    connectivity_due: bool,
) -> Option<Write> {
    let comparable = serde_json::to_value(status).unwrap_or_default();
    if last == Some(&comparable) && !connectivity_due {
        return None;
    }
    let mut body = comparable.clone();
    if let Some(c) = connectivity {
        body["connectivity"] = serde_json::to_value(c).unwrap_or_default();
    }
    Some(Write { body, comparable })
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
    fn a_write_is_due_on_a_change_or_for_connectivity_and_always_carries_it() {
        let status = MeshPeerStatus {
            public_key: Some("k".into()),
            ..Default::default()
        };
        let conn = connectivity(&[peer(Some(at(0)))], at(10));
        let first = write(&status, Some(&conn), None, false).expect("a first write");
        assert!(first.body.get("connectivity").is_some());
        assert!(first.comparable.get("connectivity").is_none());
        assert_eq!(
            write(&status, Some(&conn), Some(&first.comparable), false),
            None
        );
        assert!(write(&status, Some(&conn), Some(&first.comparable), true).is_some());
        let changed = MeshPeerStatus {
            public_key: Some("k2".into()),
            ..Default::default()
        };
        assert!(write(&changed, Some(&conn), Some(&first.comparable), false).is_some());
    }
}
