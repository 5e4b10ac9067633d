//! The agent's side of key rotation: it observes (the operator's grant and approval, the
//! peers' acknowledgements, the device's sessions), asks `wgmesh_core::rotation::step` what
//! to do, persists the new phase with the keys, and reports what the status should say.
//!
//! This module owns the key state's transitions and their persistence. It must not touch
//! the device or the API: the caller configures the device from [`KeyState::device_keys`]
//! after every persisted change, and publishes [`Rotator::status`].

use crate::key::{KeyFileError, KeyState, NodeKey};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime};
use wgmesh_api::peer::{KeyRotationStatus, RotationPhase};
use wgmesh_core::rotation::{self, Action, LaggardStep, Observation, Phase, SessionView, Timeouts};
use wgmesh_device::config::{DeviceSnapshot, Key, PeerSnapshot};

/// What one tick observed, besides the device.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The operator's grant names this node's current generation.
    pub granted: bool,
    /// That grant is for a revocation (its reason is `Revoke`): the rotation it starts
    /// retires the old key, and every earlier one, without a grace period.
    pub revoke: bool,
    /// The operator approved the published next key.
    pub next_approved: bool,
    /// Ready node peers other than this node: the peers that must move.
    pub peers: BTreeSet<String>,
    /// Of those, the ones reporting this node's next generation installed.
    pub acknowledged: BTreeSet<String>,
    /// Whether the mesh has external peers (a retired key is then kept for their grace).
    pub has_external_peers: bool,
    /// How long a retired key stays answered for them, and for node peers that never
    /// moved to the new key (laggards).
    pub external_grace: Duration,
    /// Since when the agent's view of the API has been current (see
    /// `wgmesh_core::rotation::Observation::api_current_since`).
    pub api_current_since: Option<SystemTime>,
}

/// Something worth an Event or a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Generated and published the next key; `revoke`: for a revocation.
    Prepared { generation: i64, revoke: bool },
    /// Initiating with the next key.
    Switched { generation: i64 },
    /// The old key is retired; the node is at `generation`. `revoked`: as a revocation,
    /// which also stopped answering `dropped` keys retired or abandoned before it.
    Completed {
        generation: i64,
        took: Option<Duration>,
        laggards: Vec<String>,
        revoked: bool,
        dropped: usize,
    },
    /// The rotation went on without these peers.
    Laggards {
        step: LaggardStep,
        peers: Vec<String>,
    },
    /// The next key was never approved and was discarded.
    Abandoned { generation: i64 },
    /// The grace period of the retired key ended; it is deleted.
    PreviousKeyDeleted,
}

/// An Event about this node's rotation, on its `MeshPeer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

fn at(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The Event a notice makes. `previous_until`: until when a retired key is still answered
/// (the latest, if several).
pub fn event(notice: &Notice, previous_until: Option<SystemTime>) -> RotationEvent {
    let (warning, reason, note) = match notice {
        Notice::Prepared { generation, revoke } => (
            false,
            "RotationPrepared",
            format!(
                "generated the next key (generation {}); peers are installing it{}",
                generation + 1,
                if *revoke {
                    "; this rotation is a revocation: when it completes, the old key and every earlier one stop being answered"
                } else {
                    ""
                }
            ),
        ),
        Notice::Switched { generation } => (
            false,
            "RotationSwitched",
            format!(
                "initiating handshakes with the generation {} key; still answering under generation {generation}",
                generation + 1
            ),
        ),
        Notice::Completed {
            generation,
            took,
            laggards,
            revoked,
            dropped,
        } => {
            let secs = took.map(|d| d.as_secs_f64()).unwrap_or_default();
            let kept = if *revoked {
                format!(
                    "; it is revoked: no longer answered, its secret deleted{}; external peers still configured with it lose this node until they are given the new key",
                    if *dropped > 0 {
                        format!(", and so are {dropped} keys retired or abandoned before it")
                    } else {
                        String::new()
                    }
                )
            } else {
                previous_until.map_or_else(
                    || "; its secret is deleted".to_owned(),
                    |until| {
                        format!(
                            "; it is still answered until {}, for peers that may still use it",
                            at(until)
                        )
                    },
                )
            };
            (
                !laggards.is_empty(),
                if *revoked {
                    "KeyRevoked"
                } else {
                    "RotationCompleted"
                },
                format!(
                    "key generation {generation} in use after {secs:.1}s; the old key is retired{kept}{}",
                    if laggards.is_empty() {
                        String::new()
                    } else {
                        format!("; peers that did not keep up: {}", laggards.join(", "))
                    }
                ),
            )
        }
        Notice::Laggards { step, peers } => {
            let what = match step {
                LaggardStep::Acknowledge => "never installed the next key; switching anyway",
                LaggardStep::MoveOver => "never moved to the next key; retiring the old key anyway",
            };
            (
                true,
                "RotationLaggards",
                format!("{} {what}", peers.join(", ")),
            )
        }
        Notice::Abandoned { generation } => (
            true,
            "RotationAbandoned",
            format!("the next key was not approved in time; staying on generation {generation}"),
        ),
        Notice::PreviousKeyDeleted => (
            false,
            "PreviousKeyDeleted",
            "the retired key's grace period ended; it is no longer answered and is deleted"
                .to_owned(),
        ),
    };
    RotationEvent {
        warning,
        reason,
        note,
    }
}

/// The rotation state the agent keeps between passes (the durable part is in [`KeyState`]).
#[derive(Debug, Default)]
pub struct Rotator {
    /// Per peer: the data packets seen under the old key, and when that count last grew.
    old_key_data: BTreeMap<String, (u64, SystemTime)>,
    /// Peers waiting in the current phase, for status.
    waiting_for: Vec<String>,
}

fn sum_old_data(peer: &PeerSnapshot, old: &Key) -> u64 {
    peer.sessions
        .iter()
        .filter(|s| &s.local_public_key == old)
        .map(|s| s.rx_data_packets)
        .sum()
}

fn newest_session(peer: &PeerSnapshot, local: &Key) -> Option<SystemTime> {
    peer.sessions
        .iter()
        .filter(|s| &s.local_public_key == local)
        .filter_map(|s| s.established)
        .max()
}

impl Rotator {
    /// Whether a rotation is under way (the agent then runs its passes more often).
    pub fn active(keys: &KeyState) -> bool {
        !matches!(keys.phase, Phase::Steady { .. })
    }

    /// The peers' sessions as the rotation sees them; `device_peers` maps peer names to
    /// their device snapshot.
    fn sessions(
        &mut self,
        keys: &KeyState,
        device_peers: &BTreeMap<String, &PeerSnapshot>,
        now: SystemTime,
    ) -> Vec<SessionView> {
        let (Some(next), old) = (keys.next.as_ref(), keys.current.public_bytes()) else {
            self.old_key_data.clear();
            return Vec::new();
        };
        let next = next.public_bytes();
        let mut out = Vec::new();
        for (name, peer) in device_peers {
            let count = sum_old_data(peer, &old);
            let last = match self.old_key_data.get(name) {
                Some((seen, at)) if *seen == count => Some(*at),
                // First look, or new data: counts as data now (the conservative reading).
                _ if count > 0 => Some(now),
                _ => None,
            };
            if let Some(at) = last {
                self.old_key_data.insert(name.clone(), (count, at));
            }
            out.push(SessionView {
                peer: name.clone(),
                next_key_session: newest_session(peer, &next),
                old_key_last_data: last,
            });
        }
        out
    }

    /// One tick: steps the rotation, persists a changed phase with its keys, and returns
    /// what happened. On a persistence error the state is left as it was on disk.
    pub fn tick(
        &mut self,
        keys: &mut KeyState,
        inputs: &Inputs,
        timeouts: &Timeouts,
        device_peers: &BTreeMap<String, &PeerSnapshot>,
        state_dir: &Path,
        now: SystemTime,
    ) -> Result<Vec<Notice>, KeyFileError> {
        let mut notices = Vec::new();
        // Previous keys whose deadline passed: forget them.
        if keys.previous.iter().any(|(_, until)| *until <= now) {
            let kept = std::mem::take(&mut keys.previous);
            let (expired, live): (Vec<_>, Vec<_>) =
                kept.into_iter().partition(|(_, until)| *until <= now);
            keys.previous = live;
            if let Err(e) = keys.store(state_dir) {
                keys.previous.extend(expired);
                return Err(e);
            }
            notices.push(Notice::PreviousKeyDeleted);
        }
        let sessions = self.sessions(keys, device_peers, now);
        let obs = Observation {
            granted: inputs.granted,
            revoke: inputs.revoke,
            next_approved: inputs.next_approved,
            peers: inputs.peers.clone(),
            acknowledged: inputs.acknowledged.clone(),
            moved: rotation::moved(&sessions, now),
            api_current_since: inputs.api_current_since,
        };
        self.waiting_for = match keys.phase {
            Phase::Prepared { .. } => obs.peers.difference(&obs.acknowledged).cloned().collect(),
            Phase::Switched { .. } => obs.peers.difference(&obs.moved).cloned().collect(),
            Phase::Steady { .. } => Vec::new(),
        };
        let (phase, actions) = rotation::step(keys.phase, &obs, timeouts, now);
        if phase == keys.phase {
            // Waiting, or re-issuing what the persisted phase implies (publishing the next
            // key, initiating with it): the caller does that from the state as it is.
            return Ok(notices);
        }
        let before = keys.phase;
        // The keys the step implies, stored before they replace the ones in memory: a failed
        // write changes nothing.
        let retention = rotation::Retention {
            acknowledge: timeouts.acknowledge,
            grace: inputs.external_grace,
            external_peers: inputs.has_external_peers,
        };
        let (ring, done) = match keys.ring().advance(
            phase,
            &actions,
            now,
            &retention,
            |generation| NodeKey::generate(now, generation),
            |key, generation| key.generation = generation,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, ?before, ?phase, "the rotation state on disk does not fit its phase; not changing it");
                return Ok(notices);
            }
        };
        for action in &actions {
            if let Action::Laggards { step, peers } = action {
                notices.push(Notice::Laggards {
                    step: *step,
                    peers: peers.clone(),
                });
            }
        }
        let candidate = KeyState::from_ring(ring);
        let took = if done.retired {
            now.duration_since(candidate.current.created_at).ok()
        } else {
            None
        };
        candidate.store(state_dir)?;
        *keys = candidate;
        match phase {
            Phase::Prepared {
                generation, revoke, ..
            } if before != phase => {
                notices.push(Notice::Prepared { generation, revoke });
            }
            Phase::Switched { generation, .. } if before != phase => {
                notices.push(Notice::Switched { generation });
            }
            Phase::Steady { generation } if done.retired => {
                notices.push(Notice::Completed {
                    generation,
                    took,
                    laggards: keys.laggards.clone(),
                    revoked: keys.revoked,
                    dropped: done.dropped,
                });
                self.old_key_data.clear();
            }
            Phase::Steady { generation } if done.abandoned => {
                notices.push(Notice::Abandoned { generation });
            }
            _ => {}
        }
        Ok(notices)
    }

    /// What the node's status says of its rotation; `externals` maps external peers' names
    /// to their device snapshot.
    pub fn status(
        &self,
        keys: &KeyState,
        externals: &BTreeMap<String, &PeerSnapshot>,
    ) -> Option<KeyRotationStatus> {
        let t = |s: SystemTime| k8s_openapi::jiff::Timestamp::try_from(s).ok().map(Time);
        // The key external peers may still use: the current one while switched, the
        // retired one during the grace period.
        let mut old_keys: Vec<Key> = keys
            .previous
            .iter()
            .map(|(k, _)| k.public_bytes())
            .collect();
        if matches!(keys.phase, Phase::Switched { .. }) {
            old_keys.push(keys.current.public_bytes());
        }
        let on_old: Vec<String> = externals
            .iter()
            .filter(|(_, p)| {
                p.sessions
                    .iter()
                    .filter(|s| s.established.is_some())
                    .max_by_key(|s| s.established)
                    .is_some_and(|s| old_keys.contains(&s.local_public_key))
            })
            .map(|(n, _)| n.clone())
            .collect();
        let until = keys.previous.iter().map(|(_, u)| *u).max().and_then(t);
        match keys.phase {
            Phase::Prepared {
                generation,
                since,
                revoke,
            }
            | Phase::Switched {
                generation,
                since,
                revoke,
            } => Some(KeyRotationStatus {
                phase: if matches!(keys.phase, Phase::Prepared { .. }) {
                    RotationPhase::Prepared
                } else {
                    RotationPhase::Switched
                },
                generation,
                started_at: keys.next.as_ref().and_then(|k| t(k.created_at)),
                since: t(since),
                waiting_for: self.waiting_for.clone(),
                laggards: keys.laggards.clone(),
                old_key_answered_until: until,
                external_peers_on_old_key: on_old,
                revoke,
            }),
            Phase::Steady { generation } if keys.abandoned_at.is_some() => {
                Some(KeyRotationStatus {
                    phase: RotationPhase::Abandoned,
                    generation,
                    started_at: None,
                    since: keys.abandoned_at.and_then(t),
                    waiting_for: Vec::new(),
                    laggards: Vec::new(),
                    old_key_answered_until: until,
                    external_peers_on_old_key: on_old,
                    revoke: false,
                })
            }
            Phase::Steady { generation } if generation > 0 || !keys.previous.is_empty() => {
                Some(KeyRotationStatus {
                    phase: RotationPhase::Completed,
                    generation,
                    started_at: t(keys.current.created_at),
                    since: None,
                    waiting_for: Vec::new(),
                    laggards: keys.laggards.clone(),
                    old_key_answered_until: until,
                    external_peers_on_old_key: on_old,
                    revoke: keys.revoked,
                })
            }
            Phase::Steady { .. } => None,
        }
    }

    /// The device peers by name, from the device's snapshot and the names the agent gave
    /// their primary keys.
    pub fn by_name<'a>(
        snapshot: &'a DeviceSnapshot,
        names: &BTreeMap<String, Key>,
    ) -> BTreeMap<String, &'a PeerSnapshot> {
        names
            .iter()
            .filter_map(|(name, key)| {
                snapshot
                    .peers
                    .iter()
                    .find(|p| &p.public_key == key)
                    .map(|p| (name.clone(), p))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use wgmesh_device::config::SessionSnapshot;

    #[test]
    fn each_notice_makes_its_event_and_says_what_the_old_key_still_does() {
        let done = |laggards: Vec<String>, revoked, dropped| Notice::Completed {
            generation: 4,
            took: Some(Duration::from_millis(1500)),
            laggards,
            revoked,
            dropped,
        };
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let e = event(&done(vec![], false, 0), Some(until));
        assert_eq!((e.warning, e.reason), (false, "RotationCompleted"));
        assert_eq!(
            e.note,
            "key generation 4 in use after 1.5s; the old key is retired; it is still answered until 2027-01-15T08:00:00Z, for peers that may still use it"
        );
        let e = event(&done(vec!["node-2".into()], false, 0), None);
        assert!(e.warning);
        assert!(
            e.note
                .ends_with("; its secret is deleted; peers that did not keep up: node-2"),
            "{}",
            e.note
        );
        let e = event(&done(vec![], true, 2), Some(until));
        assert_eq!(e.reason, "KeyRevoked");
        assert!(
            e.note
                .contains("and so are 2 keys retired or abandoned before it"),
            "{}",
            e.note
        );
        assert!(!e.note.contains("still answered"));

        let e = event(
            &Notice::Laggards {
                step: LaggardStep::MoveOver,
                peers: vec!["node-3".into()],
            },
            None,
        );
        assert_eq!((e.warning, e.reason), (true, "RotationLaggards"));
        assert_eq!(
            e.note,
            "node-3 never moved to the next key; retiring the old key anyway"
        );
        let e = event(
            &Notice::Prepared {
                generation: 1,
                revoke: true,
            },
            None,
        );
        assert!(e.note.starts_with("generated the next key (generation 2)"));
        assert!(e.note.contains("revocation"));
        assert!(event(&Notice::Abandoned { generation: 1 }, None).warning);
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgmesh-rotator-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("tempdir");
        d
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    const T: Timeouts = Timeouts {
        acknowledge: Duration::from_secs(30),
        move_over: Duration::from_secs(30),
    };

    fn peer_on(
        local: Key,
        established: Option<SystemTime>,
        old: Key,
        old_data: u64,
    ) -> PeerSnapshot {
        PeerSnapshot {
            public_key: [7; 32],
            next_public_key: None,
            preshared_key: None,
            endpoint: None,
            last_handshake: established,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
            sessions: vec![
                SessionSnapshot {
                    local_public_key: local,
                    remote_public_key: [7; 32],
                    established,
                    rx_data_packets: 0,
                    active: true,
                },
                SessionSnapshot {
                    local_public_key: old,
                    remote_public_key: [7; 32],
                    established: Some(at(0)),
                    rx_data_packets: old_data,
                    active: false,
                },
            ],
        }
    }

    #[test]
    fn a_granted_rotation_is_stored_switched_and_retired_with_its_keys() {
        let dir = tempdir("walk");
        let (mut keys, _) = KeyState::load_or_generate(&dir, at(0)).expect("keys");
        let old = keys.current.public_bytes();
        let mut r = Rotator::default();
        let mut inputs = Inputs {
            granted: true,
            peers: ["p".to_string()].into(),
            external_grace: Duration::from_secs(60),
            api_current_since: Some(at(0)),
            ..Default::default()
        };
        let none = BTreeMap::new();
        let n = r
            .tick(&mut keys, &inputs, &T, &none, &dir, at(1))
            .expect("tick");
        assert_eq!(
            n,
            vec![Notice::Prepared {
                generation: 0,
                revoke: false
            }]
        );
        let next = keys.next.as_ref().expect("next key").public_bytes();
        // On disk, with the phase, before anything is published.
        let (disk, _) = KeyState::load_or_generate(&dir, at(1)).expect("reload");
        assert_eq!(disk.phase, keys.phase);
        assert_eq!(disk.next.as_ref().map(NodeKey::public_bytes), Some(next));
        // The device answers under both keys and still initiates with the old one.
        let (primary, extras) = keys.device_keys();
        assert_eq!(primary, keys.current.private_key());
        assert_eq!(extras.len(), 1);

        inputs.next_approved = true;
        inputs.acknowledged = ["p".to_string()].into();
        let n = r
            .tick(&mut keys, &inputs, &T, &none, &dir, at(2))
            .expect("tick");
        assert_eq!(n, vec![Notice::Switched { generation: 0 }]);

        // A session under the next key, but data still arrives under the old one: wait.
        let busy = peer_on(next, Some(at(3)), old, 10);
        let peers = BTreeMap::from([("p".to_string(), &busy)]);
        assert!(
            r.tick(&mut keys, &inputs, &T, &peers, &dir, at(4))
                .expect("tick")
                .is_empty()
        );
        // Quiet under the old key for two seconds: moved, retired.
        assert!(
            r.tick(&mut keys, &inputs, &T, &peers, &dir, at(5))
                .expect("tick")
                .is_empty()
        );
        let n = r
            .tick(&mut keys, &inputs, &T, &peers, &dir, at(6))
            .expect("tick");
        assert!(
            matches!(&n[..], [Notice::Completed { generation: 1, laggards, .. }] if laggards.is_empty()),
            "{n:?}"
        );
        assert_eq!(keys.current.public_bytes(), next);
        assert!(
            keys.next.is_none() && keys.previous.is_empty(),
            "no external peers: old key gone"
        );
        let (disk, _) = KeyState::load_or_generate(&dir, at(6)).expect("reload");
        assert_eq!(disk.current.generation, 1);
        assert!(disk.previous.is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_unapproved_next_key_is_abandoned_but_answered_until_a_crossing_approval_is_gone() {
        let dir = tempdir("abandon");
        let (mut keys, _) = KeyState::load_or_generate(&dir, at(0)).expect("keys");
        let mut r = Rotator::default();
        let inputs = Inputs {
            granted: true,
            peers: ["p".to_string()].into(),
            api_current_since: Some(at(0)),
            ..Default::default()
        };
        let none = BTreeMap::new();
        r.tick(&mut keys, &inputs, &T, &none, &dir, at(1))
            .expect("prepare");
        let next = keys.next.as_ref().expect("next").public_bytes();
        let n = r
            .tick(&mut keys, &inputs, &T, &none, &dir, at(31))
            .expect("abandon");
        assert_eq!(n, vec![Notice::Abandoned { generation: 0 }]);
        assert!(keys.next.is_none());
        assert_eq!(keys.abandoned_at, Some(at(31)));
        assert_eq!(
            keys.previous
                .iter()
                .map(|(k, u)| (k.public_bytes(), *u))
                .collect::<Vec<_>>(),
            vec![(next, at(61))]
        );
        assert_eq!(keys.device_keys().1.len(), 1, "still answered");
        let status = r.status(&keys, &BTreeMap::new()).expect("status");
        assert_eq!(status.phase, RotationPhase::Abandoned);
        // After the acknowledge timeout it is deleted, on disk too.
        let n = r
            .tick(&mut keys, &Inputs::default(), &T, &none, &dir, at(61))
            .expect("expire");
        assert_eq!(n, vec![Notice::PreviousKeyDeleted]);
        assert!(keys.device_keys().1.is_empty());
        let (disk, _) = KeyState::load_or_generate(&dir, at(62)).expect("reload");
        assert!(disk.previous.is_empty() && disk.abandoned_at == Some(at(31)));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Walks a rotation with no node peers (so it goes straight through) in a mesh with
    /// external peers, from a state that still answers an earlier retired key.
    fn walk(dir: &Path, revoke: bool) -> (KeyState, Rotator, Vec<Notice>, Key, Key) {
        let (mut keys, _) = KeyState::load_or_generate(dir, at(0)).expect("keys");
        let earlier = NodeKey::generate(at(0), -1);
        let earlier_public = earlier.public_bytes();
        keys.previous.push((earlier, at(100_000)));
        let old = keys.current.public_bytes();
        let mut r = Rotator::default();
        let inputs = Inputs {
            granted: true,
            revoke,
            next_approved: false,
            has_external_peers: true,
            external_grace: Duration::from_secs(86_400),
            api_current_since: Some(at(0)),
            ..Default::default()
        };
        let none = BTreeMap::new();
        let mut notices = r
            .tick(&mut keys, &inputs, &T, &none, dir, at(1))
            .expect("prepare");
        assert!(matches!(keys.phase, Phase::Prepared { revoke: r, .. } if r == revoke));
        // The grant is gone by now (it is not needed after the start).
        let approved = Inputs {
            granted: false,
            revoke: false,
            next_approved: true,
            ..inputs
        };
        for s in 2..4 {
            notices.extend(
                r.tick(&mut keys, &approved, &T, &none, dir, at(s))
                    .expect("tick"),
            );
        }
        assert_eq!(keys.phase, Phase::Steady { generation: 1 });
        (keys, r, notices, old, earlier_public)
    }

    #[test]
    fn a_revocation_leaves_the_device_answering_only_the_new_key_and_says_so() {
        let dir = tempdir("revoke");
        let (keys, r, notices, _, _) = walk(&dir, true);
        assert!(
            keys.previous.is_empty(),
            "no retired key kept: {:?}",
            keys.previous
        );
        let (primary, extras) = keys.device_keys();
        assert_eq!(primary.as_bytes(), keys.current.private_key().as_bytes());
        assert!(extras.is_empty(), "the device answers only the new key");
        assert!(
            matches!(
                notices.last(),
                Some(Notice::Completed {
                    generation: 1,
                    revoked: true,
                    dropped: 1,
                    ..
                })
            ),
            "{notices:?}"
        );
        assert_eq!(
            notices.first(),
            Some(&Notice::Prepared {
                generation: 0,
                revoke: true
            })
        );
        let status = r.status(&keys, &BTreeMap::new()).expect("status");
        assert_eq!(status.phase, RotationPhase::Completed);
        assert!(status.revoke && status.old_key_answered_until.is_none());
        // On disk too: a restart does not bring a revoked key back.
        let (disk, _) = KeyState::load_or_generate(&dir, at(5)).expect("reload");
        assert!(disk.previous.is_empty() && disk.revoked);
        assert!(disk.device_keys().1.is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_ordinary_rotation_keeps_the_old_key_answered_for_the_grace_period() {
        let dir = tempdir("grace");
        let (keys, r, notices, old, earlier) = walk(&dir, false);
        let kept: Vec<(Key, SystemTime)> = keys
            .previous
            .iter()
            .map(|(k, u)| (k.public_bytes(), *u))
            .collect();
        assert_eq!(kept, vec![(earlier, at(100_000)), (old, at(3 + 86_400))]);
        assert_eq!(keys.device_keys().1.len(), 2);
        assert!(matches!(
            notices.last(),
            Some(Notice::Completed {
                revoked: false,
                dropped: 0,
                ..
            })
        ));
        let status = r.status(&keys, &BTreeMap::new()).expect("status");
        assert!(!status.revoke && status.old_key_answered_until.is_some());
        std::fs::remove_dir_all(&dir).ok();
    }
}
