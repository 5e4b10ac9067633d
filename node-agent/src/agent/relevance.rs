//! What of the watched objects matters to the agent, so that an event that changes nothing
//! it configures costs no pass, and its caches hold only what it reads.
//!
//! Every status write of every node is delivered to every agent; at 1,000 nodes a pass per
//! event would be a pass per millisecond. So the caches drop what no pass reads (the other
//! nodes' conditions but `Ready`; the Node's heartbeats), and an
//! event wakes the loop only when the part of its object that a pass reads changed.
//!
//! Pure: no client, no clock.

use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt, runtime::watcher};
use serde::Serialize;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use wgmesh_api::{MeshPeer, consts::condition};

/// Drops from a peer what no pass reads: of its conditions all but `Ready` (which decides whether it is configured), without
/// its message. This node's own peer is kept whole: its conditions are the previous ones of
/// the next status write.
pub(crate) fn strip_peer(peer: &mut MeshPeer, own: &str) {
    peer.metadata.managed_fields = None;
    if peer.metadata.name.as_deref() == Some(own) {
        return;
    }
    reduce_peer(peer);
}

/// What a peer's fingerprint covers: the object as [`strip_peer`] keeps other nodes' peers.
/// The own peer's conditions are what this agent wrote itself.
fn reduce_peer(peer: &mut MeshPeer) {
    if let Some(s) = peer.status.as_mut() {
        s.conditions.retain(|c| c.type_ == condition::READY);
        for c in &mut s.conditions {
            c.message = String::new();
            c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
            c.observed_generation = None;
        }
    }
}

/// Drops from this node's Node what no pass reads: its status but the addresses (the
/// kubelet's heartbeats, images, volumes), its taints (the node lifecycle's), and the
/// managed fields.
pub(crate) fn strip_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    if let Some(spec) = node.spec.as_mut() {
        spec.taints = None;
    }
    if let Some(s) = node.status.as_mut() {
        *s = NodeStatus {
            addresses: s.addresses.take(),
            ..NodeStatus::default()
        };
    }
}

/// A fingerprint of what a pass reads of an object: all of it but its `resourceVersion`
/// and managed fields, reduced by `reduce`.
fn fingerprint<K: Clone + Serialize + Resource>(object: &K, reduce: fn(&mut K)) -> u64 {
    let mut o = object.clone();
    o.meta_mut().resource_version = None;
    o.meta_mut().managed_fields = None;
    reduce(&mut o);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(&o).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Tells the events that change what a pass reads from those that do not.
pub(crate) struct Relevance<K> {
    seen: HashMap<String, u64>,
    relisted: HashMap<String, u64>,
    reduce: fn(&mut K),
}

impl<K: Clone + Serialize + Resource> Relevance<K> {
    pub(crate) fn new(reduce: fn(&mut K)) -> Self {
        Relevance {
            seen: HashMap::new(),
            relisted: HashMap::new(),
            reduce,
        }
    }

    /// Whether `event` changes what a pass reads: an object new, gone, or changed in its
    /// fingerprint; a relist that found anything different.
    pub(crate) fn changed(&mut self, event: &watcher::Event<K>) -> bool {
        match event {
            watcher::Event::Apply(o) => {
                let fp = fingerprint(o, self.reduce);
                self.seen.insert(o.name_any(), fp) != Some(fp)
            }
            watcher::Event::Delete(o) => {
                self.seen.remove(&o.name_any());
                true
            }
            watcher::Event::Init => {
                self.relisted.clear();
                false
            }
            watcher::Event::InitApply(o) => {
                self.relisted
                    .insert(o.name_any(), fingerprint(o, self.reduce));
                false
            }
            watcher::Event::InitDone => {
                let changed = self.relisted != self.seen;
                self.seen = std::mem::take(&mut self.relisted);
                changed
            }
        }
    }
}

/// The fingerprint reduction of peers.
pub(crate) fn peer_reduction() -> fn(&mut MeshPeer) {
    reduce_peer
}

/// The fingerprint reduction of objects kept whole.
pub(crate) fn whole<K>(_: &mut K) {}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition};
    use wgmesh_api::{Condition, ConditionStatus, MeshPeerSpec, MeshPeerStatus};

    fn peer(name: &str) -> MeshPeer {
        let mut p = MeshPeer::new(
            name,
            MeshPeerSpec {
                node: Some(name.into()),
                pod_cidrs: vec!["10.0.1.0/24".into()],
                ..Default::default()
            },
        );
        p.metadata.resource_version = Some("1".into());
        p.status = Some(MeshPeerStatus {
            public_key: Some("k".into()),
            conditions: vec![
                Condition {
                    type_: condition::READY.into(),
                    status: ConditionStatus::True,
                    reason: "Valid".into(),
                    message: "ok".into(),
                    observed_generation: None,
                    last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                },
                Condition {
                    type_: "RoutesInstalled".into(),
                    status: ConditionStatus::True,
                    reason: "Installed".into(),
                    message: "5 routes installed".into(),
                    observed_generation: None,
                    last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                },
            ],
            ..Default::default()
        });
        p
    }

    fn apply(r: &mut Relevance<MeshPeer>, p: &MeshPeer) -> bool {
        r.changed(&watcher::Event::Apply(p.clone()))
    }

    #[test]
    fn what_a_pass_does_not_read_wakes_no_pass() {
        let mut r = Relevance::new(peer_reduction());
        let mut p = peer("b");
        assert!(apply(&mut r, &p), "a new peer");
        // Its other conditions, a new resourceVersion.
        let s = p.status.as_mut().expect("status");
        s.conditions[1].message = "6 routes installed".into();
        s.conditions[0].message = "still ok".into();
        p.metadata.resource_version = Some("2".into());
        assert!(!apply(&mut r, &p));
        // What a pass reads: Ready, keys, subnets, acknowledgements.
        let mut q = p.clone();
        q.status.as_mut().expect("status").conditions[0].status = ConditionStatus::False;
        assert!(apply(&mut r, &q));
        let mut q = p.clone();
        q.status.as_mut().expect("status").next_public_key = Some("n".into());
        assert!(apply(&mut r, &q));
        let mut q = q.clone();
        q.spec.pod_cidrs.push("fd00::/64".into());
        assert!(apply(&mut r, &q));
        assert!(r.changed(&watcher::Event::Delete(q)));
    }

    #[test]
    fn a_relist_wakes_a_pass_only_when_it_found_something_new() {
        let mut r = Relevance::new(peer_reduction());
        let p = peer("b");
        assert!(apply(&mut r, &p));
        let relist = |r: &mut Relevance<MeshPeer>, objects: &[MeshPeer]| {
            assert!(!r.changed(&watcher::Event::Init));
            for o in objects {
                assert!(!r.changed(&watcher::Event::InitApply(o.clone())));
            }
            r.changed(&watcher::Event::InitDone)
        };
        assert!(!relist(&mut r, std::slice::from_ref(&p)));
        assert!(relist(&mut r, &[p.clone(), peer("c")]));
        assert!(relist(&mut r, &[peer("c")]), "b is gone");
    }

    #[test]
    fn other_peers_are_kept_with_ready_alone_and_the_own_one_whole() {
        let mut p = peer("b");
        let mut own = p.clone();
        strip_peer(&mut p, "a");
        let s = p.status.as_ref().expect("status");
        assert_eq!(s.conditions.len(), 1);
        assert_eq!(s.conditions[0].status, ConditionStatus::True);
        assert_eq!(s.public_key.as_deref(), Some("k"));
        strip_peer(&mut own, "b");
        assert_eq!(own.status.as_ref().expect("status").conditions.len(), 2);
    }

    #[test]
    fn a_node_heartbeat_wakes_no_pass_and_an_address_does() {
        let mut n = Node::default();
        n.metadata.name = Some("a".into());
        n.status = Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "198.18.0.1".into(),
            }]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let mut r = Relevance::new(whole::<Node>);
        let mut kept = n.clone();
        strip_node(&mut kept);
        assert!(r.changed(&watcher::Event::Apply(kept.clone())));
        let s = n.status.as_mut().expect("status");
        s.conditions.as_mut().expect("conditions")[0].reason = Some("KubeletReady".into());
        let mut beat = n.clone();
        beat.metadata.resource_version = Some("9".into());
        strip_node(&mut beat);
        assert!(!r.changed(&watcher::Event::Apply(beat)));
        n.status.as_mut().expect("status").addresses = None;
        strip_node(&mut n);
        assert!(r.changed(&watcher::Event::Apply(n)));
    }
}
