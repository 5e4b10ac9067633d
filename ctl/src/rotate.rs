//! `kubectl wgmesh rotate`: which nodes a request rotates, and how far each got. Pure: the
//! command polls the `MeshPeer`s and prints what [`progress`] says changed.

use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeMap;
use wgmesh_api::MeshPeer;
use wgmesh_api::peer::RotationPhase;

/// Where one node's rotation is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Not started: waiting for a slot (`maxConcurrent`) or for the operator.
    Queued,
    /// The next key is published; waiting for these peers to install it.
    Prepared { waiting_for: Vec<String> },
    /// Sending under the next key; waiting for these peers to move to it.
    Switched { waiting_for: Vec<String> },
    /// Rotated to `generation`; `laggards` had not followed when it completed.
    Completed {
        generation: i64,
        laggards: Vec<String>,
    },
    /// Given up (the next key was not approved in time).
    Abandoned,
    /// The node's peer is gone.
    Gone,
}

impl Step {
    /// Whether the rotation ended, one way or another.
    pub fn ended(&self) -> bool {
        matches!(self, Step::Completed { .. } | Step::Abandoned | Step::Gone)
    }

    /// Ended well: rotated with every peer following.
    pub fn clean(&self) -> bool {
        matches!(self, Step::Completed { laggards, .. } if laggards.is_empty())
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        let list = |v: &[String]| v.join(", ");
        match self {
            Step::Queued => "queued (waiting for a rotation slot)".into(),
            Step::Prepared { waiting_for } if waiting_for.is_empty() => {
                "prepared: next key published".into()
            }
            Step::Prepared { waiting_for } => format!(
                "prepared: waiting for {} to install the next key",
                list(waiting_for)
            ),
            Step::Switched { waiting_for } if waiting_for.is_empty() => {
                "switched: sending under the next key".into()
            }
            Step::Switched { waiting_for } => format!(
                "switched: waiting for {} to move to the next key",
                list(waiting_for)
            ),
            Step::Completed {
                generation,
                laggards,
            } if laggards.is_empty() => format!("completed: key generation {generation}"),
            Step::Completed {
                generation,
                laggards,
            } => format!(
                "completed with laggards: key generation {generation}; {} had not followed",
                list(laggards)
            ),
            Step::Abandoned => "abandoned: the next key was not approved in time".into(),
            Step::Gone => "gone: the node's MeshPeer was deleted".into(),
        }
    }
}

/// The nodes a request at `requested_at` rotates, with their key generation now: node
/// peers whose key was created before it. Others are returned apart, with why.
pub fn targets(
    peers: &[MeshPeer],
    nodes: &[String],
    requested_at: Timestamp,
) -> (BTreeMap<String, i64>, Vec<(String, String)>) {
    let mut rotating = BTreeMap::new();
    let mut skipped = Vec::new();
    for peer in peers.iter().filter(|p| p.spec.node.is_some()) {
        let name = peer.metadata.name.clone().unwrap_or_default();
        if !nodes.is_empty() && !nodes.contains(&name) {
            continue;
        }
        let status = peer.status.clone().unwrap_or_default();
        let Some(generation) = status.key_generation else {
            skipped.push((name, "it has published no key yet".to_owned()));
            continue;
        };
        match status.key_created_at {
            Some(created) if created.0 >= requested_at => skipped.push((
                name,
                format!("its key was created at {}, after the request", created.0),
            )),
            _ => {
                rotating.insert(name, generation);
            }
        }
    }
    (rotating, skipped)
}

/// Where each target is: `start` is its key generation when the request was made.
pub fn progress(peers: &[MeshPeer], start: &BTreeMap<String, i64>) -> BTreeMap<String, Step> {
    let by_name: BTreeMap<&str, &MeshPeer> = peers
        .iter()
        .filter_map(|p| Some((p.metadata.name.as_deref()?, p)))
        .collect();
    start
        .iter()
        .map(|(name, &from)| {
            let step = match by_name.get(name.as_str()) {
                None => Step::Gone,
                Some(peer) => {
                    let status = peer.status.clone().unwrap_or_default();
                    match status.rotation {
                        Some(r) if r.generation > from => match r.phase {
                            RotationPhase::Prepared => Step::Prepared {
                                waiting_for: r.waiting_for,
                            },
                            RotationPhase::Switched => Step::Switched {
                                waiting_for: r.waiting_for,
                            },
                            RotationPhase::Completed => Step::Completed {
                                generation: r.generation,
                                laggards: r.laggards,
                            },
                            RotationPhase::Abandoned => Step::Abandoned,
                        },
                        // Rotated, and its record already gone or overwritten.
                        _ => match status.key_generation.filter(|g| *g > from) {
                            Some(generation) => Step::Completed {
                                generation,
                                laggards: Vec::new(),
                            },
                            None => Step::Queued,
                        },
                    }
                }
            };
            (name.clone(), step)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn peer(name: &str, generation: i64, created: &str, rotation: serde_json::Value) -> MeshPeer {
        serde_json::from_value(json!({
            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshPeer",
            "metadata": {"name": name},
            "spec": {"node": name},
            "status": {"keyGeneration": generation, "keyCreatedAt": created, "rotation": rotation}
        }))
        .expect("a MeshPeer")
    }

    #[test]
    fn a_request_targets_node_keys_created_before_it() {
        let at: Timestamp = "2026-12-01T12:00:00Z".parse().expect("time");
        let peers = vec![
            peer("a", 1, "2026-12-01T10:00:00Z", json!(null)),
            peer("b", 4, "2026-12-01T12:00:05Z", json!(null)),
        ];
        let (t, skipped) = targets(&peers, &[], at);
        assert_eq!(t, BTreeMap::from([("a".to_owned(), 1)]));
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].1.contains("after the request"));
        let (t, _) = targets(&peers, &["b".to_owned()], at);
        assert!(t.is_empty());
    }

    #[test]
    fn progress_follows_the_phases_of_the_next_generation_only() {
        let start = BTreeMap::from([
            ("a".to_owned(), 1),
            ("b".to_owned(), 1),
            ("c".to_owned(), 1),
        ]);
        let peers = vec![
            // An old rotation's record does not count.
            peer(
                "a",
                1,
                "2026-12-01T10:00:00Z",
                json!({"phase": "Completed", "generation": 1}),
            ),
            peer(
                "b",
                1,
                "2026-12-01T10:00:00Z",
                json!({"phase": "Prepared", "generation": 2, "waitingFor": ["a"]}),
            ),
        ];
        let p = progress(&peers, &start);
        assert_eq!(p["a"], Step::Queued);
        assert_eq!(
            p["b"],
            Step::Prepared {
                waiting_for: vec!["a".into()]
            }
        );
        assert_eq!(p["c"], Step::Gone);
        assert!(!p["a"].ended() && !p["b"].ended() && p["c"].ended());

        let peers = vec![
            peer(
                "a",
                2,
                "2026-12-01T10:00:00Z",
                json!({"phase": "Completed", "generation": 2}),
            ),
            peer(
                "b",
                2,
                "2026-12-01T10:00:00Z",
                json!({"phase": "Completed", "generation": 2, "laggards": ["c"]}),
            ),
        ];
        let p = progress(&peers, &start);
        assert!(p["a"].clean());
        assert!(p["b"].ended() && !p["b"].clean());
        assert!(p["b"].describe().contains("c had not followed"));
    }
}
