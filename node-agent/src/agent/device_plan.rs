//! The device's peers, planned. From what the device holds (its snapshot), what this agent
//! configured (peer names to keys, and the endpoint it last set for each), and the peers the
//! node plan wants, the one update that brings the device there, the record to keep once the
//! device took it, and the acknowledgements it makes. Pure: the agent applies the update and
//! keeps the record only if the device accepted it.
//!
//! Peers are matched by name, so a peer whose key changes (a rotation's next key, its
//! promotion, an external peer's new key) is updated in place and keeps its sessions under
//! the keys it still has. Unchanged peers are not touched. A peer the agent never configured
//! (someone used `wg set`) is removed. An endpoint is written only when the approved one
//! changes: the device may have roamed away from it, and that is not undone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use wgmesh_api::peer::InstalledKey;
use wgmesh_core::topology::DevicePeer;
use wgmesh_device::config::{ConfigUpdate, Key, PeerSnapshot, PeerUpdate};
use wgmesh_device::{DeviceError, DeviceHandle};

/// What the agent configured on the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Configured {
    /// The device's peers by name, with the primary key each was configured with.
    pub names: BTreeMap<String, Key>,
    /// The endpoint last written per peer name.
    pub endpoints: BTreeMap<String, Option<SocketAddr>>,
}

impl Configured {
    /// The peer names by key: what the device's peers are called.
    pub fn names_by_key(&self) -> BTreeMap<Key, &str> {
        self.names
            .iter()
            .map(|(name, k)| (*k, name.as_str()))
            .collect()
    }
}

/// The outcome of [`plan`].
#[derive(Debug, Default)]
pub(crate) struct DevicePlan {
    /// The update to apply; empty when the device is as wanted.
    pub update: ConfigUpdate,
    /// The record to keep once the device took the update.
    pub configured: Configured,
    /// Rotating peers whose next key the update leaves installed, with that key's
    /// generation: this node's acknowledgements, valid only once the update was applied.
    pub acks: Vec<InstalledKey>,
}

/// What the agent reads from and writes to the device's peers: [`DeviceHandle`], or a fake
/// in tests.
pub(crate) trait Peers {
    fn peers(&self) -> Vec<PeerSnapshot>;
    /// The public halves of the keys the device holds: its primary and its extra keys.
    fn keys(&self) -> (Option<Key>, Vec<Key>);
    fn apply(&self, update: &ConfigUpdate) -> Result<(), DeviceError>;
}

impl Peers for DeviceHandle {
    fn peers(&self) -> Vec<PeerSnapshot> {
        self.snapshot().peers
    }

    fn keys(&self) -> (Option<Key>, Vec<Key>) {
        let s = self.snapshot();
        (s.public_key, s.extra_public_keys)
    }

    fn apply(&self, update: &ConfigUpdate) -> Result<(), DeviceError> {
        DeviceHandle::apply(self, update)
    }
}

/// Plans against what `device` holds and applies the update. Returns the record to keep and
/// the acknowledgements; on a refused update, the error with the record as it was (and no
/// acknowledgement: nothing may be acknowledged that may not be installed).
/// What the device's keys need, read every pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeysStep {
    /// It holds what was applied and is wanted.
    Keep,
    /// The wanted keys changed (or were never applied): set them.
    Set,
    /// Someone changed them behind the agent's back (`wg set … private-key`): set them back.
    Restore,
}

/// Compares the keys the device holds (`held`, public halves) with the ones wanted (primary,
/// extras) and the ones last applied.
pub(crate) fn keys_step(
    held: &(Option<Key>, Vec<Key>),
    wanted: &(Key, Vec<Key>),
    applied: Option<&(Key, Vec<Key>)>,
) -> KeysStep {
    let sorted = |keys: &[Key]| {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys
    };
    let holds = held.0 == Some(wanted.0) && sorted(&held.1) == sorted(&wanted.1);
    match (holds, applied == Some(wanted)) {
        (true, true) => KeysStep::Keep,
        (false, true) => KeysStep::Restore,
        _ => KeysStep::Set,
    }
}

pub(crate) fn reconcile<D: Peers>(
    device: &D,
    configured: Configured,
    wanted: &BTreeMap<String, DevicePeer>,
    next_generations: &BTreeMap<String, i64>,
) -> Result<(Configured, Vec<InstalledKey>, usize), (Configured, DeviceError)> {
    let planned = plan(&device.peers(), &configured, wanted, next_generations);
    let changes = planned.update.peers.len();
    if changes > 0
        && let Err(e) = device.apply(&planned.update)
    {
        return Err((configured, e));
    }
    Ok((planned.configured, planned.acks, changes))
}

fn decode(b64: &str) -> Option<Key> {
    super::decode_key(b64)
}

/// Plans the device's peers (see the module docs). `next_generations` gives each rotating
/// peer's next-key generation, by name.
pub(crate) fn plan(
    current: &[PeerSnapshot],
    configured: &Configured,
    wanted: &BTreeMap<String, DevicePeer>,
    next_generations: &BTreeMap<String, i64>,
) -> DevicePlan {
    let current_by_key: BTreeMap<Key, &PeerSnapshot> =
        current.iter().map(|p| (p.public_key, p)).collect();
    let by_key = |k: &Key| current_by_key.get(k).copied();
    let mut out = DevicePlan::default();
    let wanted_names: BTreeSet<&str> = wanted.keys().map(String::as_str).collect();
    for (name, key) in &configured.names {
        if !wanted_names.contains(name.as_str()) {
            let mut u = PeerUpdate::new(*key);
            u.remove = true;
            out.update.peers.push(u);
        }
    }
    let known: BTreeSet<Key> = configured.names.values().copied().collect();
    for peer in current {
        if !known.contains(&peer.public_key) {
            let mut u = PeerUpdate::new(peer.public_key);
            u.remove = true;
            out.update.peers.push(u);
        }
    }
    out.configured.endpoints = configured
        .endpoints
        .iter()
        .filter(|(name, _)| wanted_names.contains(name.as_str()))
        .map(|(n, e)| (n.clone(), *e))
        .collect();
    for (name, want) in wanted {
        let Some(key) = decode(&want.public_key) else {
            continue;
        };
        let next = want.next_public_key.as_deref().and_then(decode);
        let have = configured.names.get(name).copied().and_then(|k| by_key(&k));
        let mut allowed = want.allowed_ips.clone();
        allowed.sort();
        let endpoint_changed = configured.endpoints.get(name) != Some(&want.endpoint);
        let same = have.is_some_and(|h| {
            let mut a = h.allowed_ips.clone();
            a.sort();
            h.public_key == key
                && h.next_public_key == next
                && a == allowed
                && h.persistent_keepalive == want.persistent_keepalive
                && !endpoint_changed
        });
        out.configured.names.insert(name.clone(), key);
        if !same {
            let mut u = PeerUpdate::new(have.map_or(key, |h| h.public_key));
            if have.is_some_and(|h| h.public_key != key) {
                u.new_public_key = Some(key);
            }
            u.next_public_key = Some(next);
            u.replace_allowed_ips = true;
            u.allowed_ips = allowed;
            u.persistent_keepalive = Some(want.persistent_keepalive);
            // A peer the device does not have gets the approved endpoint whatever was
            // written before (a failed update, a restarted device).
            if endpoint_changed || have.is_none() {
                u.endpoint = want.endpoint;
                out.configured.endpoints.insert(name.clone(), want.endpoint);
            }
            out.update.peers.push(u);
        }
        if next.is_some()
            && let Some(generation) = next_generations.get(name)
        {
            out.acks.push(InstalledKey {
                peer: name.clone(),
                generation: *generation,
                public_key: want.next_public_key.clone().unwrap_or_default(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn key(b: u8) -> Key {
        [b; 32]
    }

    fn b64(k: &Key) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(k)
    }

    fn bare(public_key: Key) -> PeerSnapshot {
        PeerSnapshot {
            public_key,
            next_public_key: None,
            preshared_key: None,
            endpoint: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: 0,
            allowed_ips: vec![],
            sessions: vec![],
        }
    }

    fn want(name: &str, k: &Key, next: Option<&Key>, ip: &str, endpoint: &str) -> DevicePeer {
        DevicePeer {
            name: name.into(),
            public_key: b64(k),
            next_public_key: next.map(b64),
            allowed_ips: vec![ip.parse::<IpNet>().expect("net")],
            endpoint: Some(endpoint.parse().expect("endpoint")),
            persistent_keepalive: 0,
        }
    }

    /// The device after `update`, as the device applies it.
    fn applied(current: &[PeerSnapshot], update: &ConfigUpdate) -> Vec<PeerSnapshot> {
        let mut peers: Vec<PeerSnapshot> = current.to_vec();
        for u in &update.peers {
            if u.remove {
                peers.retain(|p| p.public_key != u.public_key);
                continue;
            }
            let i = match peers.iter().position(|p| p.public_key == u.public_key) {
                Some(i) => i,
                None => {
                    peers.push(bare(u.public_key));
                    peers.len() - 1
                }
            };
            let p = &mut peers[i];
            if let Some(k) = u.new_public_key {
                p.public_key = k;
            }
            if let Some(n) = u.next_public_key {
                p.next_public_key = n;
            }
            if u.replace_allowed_ips {
                p.allowed_ips = u.allowed_ips.clone();
            }
            if let Some(e) = u.endpoint {
                p.endpoint = Some(e);
            }
            if let Some(k) = u.persistent_keepalive {
                p.persistent_keepalive = k;
            }
        }
        peers
    }

    fn wanted(peers: &[DevicePeer]) -> BTreeMap<String, DevicePeer> {
        peers.iter().map(|p| (p.name.clone(), p.clone())).collect()
    }

    /// Peer "a" alone, with its first key.
    fn only_a() -> BTreeMap<String, DevicePeer> {
        wanted(&[want(
            "a",
            &key(1),
            None,
            "10.244.1.0/24",
            "198.18.0.1:51820",
        )])
    }

    /// Peer `a` with its next key published.
    fn rotating_a() -> BTreeMap<String, DevicePeer> {
        wanted(&[want(
            "a",
            &key(1),
            Some(&key(11)),
            "10.244.1.0/24",
            "198.18.0.1:51820",
        )])
    }

    #[test]
    fn an_empty_device_gets_every_peer_then_nothing_more() {
        let w = wanted(&[
            want("a", &key(1), None, "10.244.1.0/24", "198.18.0.1:51820"),
            want("b", &key(2), None, "10.244.2.0/24", "198.18.0.2:51820"),
        ]);
        let p = plan(&[], &Configured::default(), &w, &BTreeMap::new());
        assert_eq!(p.update.peers.len(), 2);
        assert!(
            p.update
                .peers
                .iter()
                .all(|u| u.endpoint.is_some() && !u.remove)
        );
        let device = applied(&[], &p.update);
        let again = plan(&device, &p.configured, &w, &BTreeMap::new());
        assert!(again.update.peers.is_empty(), "{:?}", again.update);
        assert_eq!(again.configured, p.configured);
    }

    #[test]
    fn a_new_key_is_an_update_in_place_and_a_roamed_endpoint_is_left_alone() {
        let first = only_a();
        let p = plan(&[], &Configured::default(), &first, &BTreeMap::new());
        let mut device = applied(&[], &p.update);
        // The device roamed: the peer answers from another address now.
        device[0].endpoint = Some("198.18.9.9:40000".parse().expect("endpoint"));
        // The peer publishes its next key (a rotation), generation 3.
        let second = rotating_a();
        let gens = BTreeMap::from([("a".to_owned(), 3)]);
        let p2 = plan(&device, &p.configured, &second, &gens);
        assert_eq!(p2.update.peers.len(), 1);
        let u = &p2.update.peers[0];
        assert_eq!(u.public_key, key(1));
        assert_eq!(u.next_public_key, Some(Some(key(11))));
        assert_eq!(u.endpoint, None, "the roamed endpoint was overwritten");
        assert_eq!(p2.acks.len(), 1);
        assert_eq!(p2.acks[0].generation, 3);
        // It switches: the primary key changes in place, on the same device peer.
        let device = applied(&device, &p2.update);
        let third = wanted(&[want(
            "a",
            &key(11),
            None,
            "10.244.1.0/24",
            "198.18.0.1:51820",
        )]);
        let p3 = plan(&device, &p2.configured, &third, &BTreeMap::new());
        assert_eq!(p3.update.peers.len(), 1);
        assert_eq!(p3.update.peers[0].public_key, key(1));
        assert_eq!(p3.update.peers[0].new_public_key, Some(key(11)));
        assert!(p3.acks.is_empty());
    }

    #[test]
    fn unwanted_and_unknown_peers_are_removed() {
        let w = only_a();
        let p = plan(&[], &Configured::default(), &w, &BTreeMap::new());
        let mut device = applied(&[], &p.update);
        // Someone added a peer by hand (`wg set`).
        device.push(bare(key(66)));
        let p2 = plan(&device, &p.configured, &BTreeMap::new(), &BTreeMap::new());
        let removed: BTreeSet<Key> = p2
            .update
            .peers
            .iter()
            .filter(|u| u.remove)
            .map(|u| u.public_key)
            .collect();
        assert_eq!(removed, BTreeSet::from([key(1), key(66)]));
        assert_eq!(p2.configured, Configured::default());
    }

    /// A device in memory: applies updates like the real one, or refuses them on demand.
    struct FakeDevice {
        peers: std::sync::Mutex<Vec<PeerSnapshot>>,
        refuse: bool,
    }

    impl Peers for FakeDevice {
        fn peers(&self) -> Vec<PeerSnapshot> {
            self.peers.lock().expect("lock").clone()
        }

        fn keys(&self) -> (Option<Key>, Vec<Key>) {
            (None, Vec::new())
        }

        fn apply(&self, update: &ConfigUpdate) -> Result<(), DeviceError> {
            if self.refuse {
                return Err(DeviceError::Spawn(std::io::Error::other("refused")));
            }
            let mut peers = self.peers.lock().expect("lock");
            *peers = applied(&peers, update);
            Ok(())
        }
    }

    #[test]
    fn keys_are_set_when_wanted_anew_and_put_back_when_changed_behind_the_agents_back() {
        let wanted = (key(1), vec![key(2), key(3)]);
        let held = |p: u8, extras: &[u8]| (Some(key(p)), extras.iter().map(|&e| key(e)).collect());
        // Never applied, or the wanted keys changed: set.
        assert_eq!(keys_step(&(None, vec![]), &wanted, None), KeysStep::Set);
        let older = (key(1), vec![key(2)]);
        assert_eq!(
            keys_step(&held(1, &[2]), &wanted, Some(&older)),
            KeysStep::Set
        );
        // Held as applied, in any order: nothing to do.
        assert_eq!(
            keys_step(&held(1, &[3, 2]), &wanted, Some(&wanted)),
            KeysStep::Keep
        );
        // Applied, then changed on the device: put back.
        assert_eq!(
            keys_step(&held(9, &[2, 3]), &wanted, Some(&wanted)),
            KeysStep::Restore
        );
        assert_eq!(
            keys_step(&held(1, &[2]), &wanted, Some(&wanted)),
            KeysStep::Restore
        );
    }

    #[test]
    fn a_refused_update_keeps_the_old_record_and_acknowledges_nothing() {
        let w = rotating_a();
        let gens = BTreeMap::from([("a".to_owned(), 2)]);
        let refusing = FakeDevice {
            peers: std::sync::Mutex::new(vec![]),
            refuse: true,
        };
        let (kept, _) =
            reconcile(&refusing, Configured::default(), &w, &gens).expect_err("the device refused");
        assert_eq!(kept, Configured::default());

        let device = FakeDevice {
            peers: std::sync::Mutex::new(vec![]),
            refuse: false,
        };
        let (record, acks, changes) = reconcile(&device, kept, &w, &gens).expect("applied");
        assert_eq!((changes, acks.len()), (1, 1));
        assert_eq!(device.peers().len(), 1);
        // Converged: nothing more to write, the acknowledgement stands.
        let (_, acks, changes) = reconcile(&device, record, &w, &gens).expect("applied");
        assert_eq!((changes, acks.len()), (0, 1));
    }

    #[test]
    fn a_peer_the_device_lost_gets_its_endpoint_again() {
        // The record says the endpoint was written, but the device does not have the peer
        // (an update that failed, a device started again): it is added with its endpoint.
        let w = only_a();
        let p = plan(&[], &Configured::default(), &w, &BTreeMap::new());
        let p2 = plan(&[], &p.configured, &w, &BTreeMap::new());
        assert_eq!(p2.update.peers.len(), 1);
        assert!(p2.update.peers[0].endpoint.is_some());
    }
}
