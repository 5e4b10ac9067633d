//! The device's configuration state, as the datapath reads it under one lock: the local keys
//! (a primary and up to two extras), the peer table and the allowed IPs, and the changes
//! [`super::DeviceHandle::apply`] makes to them.
//!
//! This module decides which local keys the device holds, under which keys a peer is known and
//! which session slots follow from both (through [`super::slot::Slots::reconcile`]). It does no
//! I/O: the one packet a change may send (a handshake to a peer that must be contacted right
//! away) goes to a callback, and sockets, threads and the interface belong to the caller.

use super::allowed_ips::AllowedIps;
use super::config::{Key, PeerSnapshot, PeerUpdate, PrivateKey, SessionSnapshot};
use super::peer::{Peer, PeerId, PeerState, PeerTable};
use super::slot::{LocalKey, MAX_EXTRA_KEYS};
use super::source_limit::SourceLimiter;
use base64::Engine as _;
use boringtun::noise::TunnResult;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

/// Handshake messages per second and local key the device processes before demanding
/// cookies. Each accepted initiation passes its key's limiter twice (once before the peer
/// lookup, once in `Tunn`) while it is not under load.
const HANDSHAKES_PER_SECOND: u64 = 2 * 100;

/// Room for the handshake initiation a configuration change may send.
const HANDSHAKE_BUF_BYTES: usize = 256;

/// State shared by the datapath threads and the handle, read-locked per batch.
pub(crate) struct State {
    /// The primary key first, then the extras; empty without a private key.
    pub(crate) keys: Vec<LocalKey>,
    pub(crate) peers: PeerTable,
    pub(crate) allowed_ips: AllowedIps<PeerId>,
    pub(crate) fwmark: u32,
    /// Per-source buckets of handshake messages (only the UDP thread and the timer's
    /// collection lock it).
    pub(crate) sources: Mutex<SourceLimiter>,
    /// Handshake messages the per-source limit dropped.
    pub(crate) handshakes_rate_limited: AtomicU64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("has_private_key", &!self.keys.is_empty())
            .field("extra_keys", &self.keys.len().saturating_sub(1))
            .field("peers", &self.peers.len())
            .field("allowed_ips", &self.allowed_ips.len())
            .field("fwmark", &self.fwmark)
            .finish()
    }
}

fn b64(key: &Key) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// The private keys the device holds after a change, primary first: `private_key` (`Some` of
/// all zeros removes every key) and `extra_keys` as [`super::config::ConfigUpdate`] describes
/// them, applied to the `current` keys.
pub(crate) fn plan_keys(
    current: &[LocalKey],
    private_key: Option<&PrivateKey>,
    extra_keys: Option<&[PrivateKey]>,
) -> Vec<PrivateKey> {
    let old_primary = current.first();
    let primary = match private_key {
        Some(key) => (!key.is_zero()).then(|| key.clone()),
        None => old_primary.map(LocalKey::private_key),
    };
    let Some(primary) = primary else {
        if extra_keys.is_some_and(|e| !e.is_empty()) {
            tracing::warn!("ignoring extra private keys: the device has no private key");
        }
        return Vec::new();
    };
    let primary_public = primary.public_key();
    let extras: Vec<PrivateKey> = match extra_keys {
        Some(list) => list.to_vec(),
        None => {
            let mut extras: Vec<PrivateKey> =
                current.iter().skip(1).map(LocalKey::private_key).collect();
            // The switch of a rotation: the extra that becomes primary hands its place to the
            // old primary, so sessions under both keys survive.
            if let Some(old) = old_primary
                && old.public_bytes() != primary_public
                && let Some(pos) = current
                    .iter()
                    .skip(1)
                    .position(|k| k.public_bytes() == primary_public)
            {
                extras[pos] = old.private_key();
            }
            extras
        }
    };
    let mut keys = vec![primary];
    let mut publics = vec![primary_public];
    let mut dropped = 0usize;
    for key in extras {
        if key.is_zero() {
            continue;
        }
        let public = key.public_key();
        if publics.contains(&public) {
            continue;
        }
        if keys.len() > MAX_EXTRA_KEYS {
            dropped += 1;
            continue;
        }
        keys.push(key);
        publics.push(public);
    }
    if dropped > 0 {
        tracing::warn!(
            dropped,
            kept = MAX_EXTRA_KEYS,
            "too many extra private keys; keeping the first ones"
        );
    }
    keys
}

impl State {
    /// No keys, no peers.
    pub(crate) fn new(seed: u64, fwmark: u32) -> Self {
        Self {
            keys: Vec::new(),
            peers: PeerTable::new(seed),
            allowed_ips: AllowedIps::new(),
            fwmark,
            sources: Mutex::new(SourceLimiter::new()),
            handshakes_rate_limited: AtomicU64::new(0),
        }
    }

    /// The primary key, which the device initiates handshakes with.
    #[inline]
    pub(crate) fn primary(&self) -> Option<&LocalKey> {
        self.keys.first()
    }

    /// The primary public key.
    pub(crate) fn public_key(&self) -> Option<Key> {
        self.primary().map(LocalKey::public_bytes)
    }

    /// Applies a change of the private key and/or the extra keys (see [`plan_keys`]). Keys
    /// the device keeps keep their sessions; slots of keys it drops go in the same call.
    pub(crate) fn set_keys(
        &mut self,
        private_key: Option<&PrivateKey>,
        extra_keys: Option<&[PrivateKey]>,
    ) {
        let wanted = plan_keys(&self.keys, private_key, extra_keys);
        let publics: Vec<Key> = wanted.iter().map(PrivateKey::public_key).collect();
        let current: Vec<Key> = self.keys.iter().map(LocalKey::public_bytes).collect();
        if publics == current {
            // Re-sending the same keys (wg setconf, syncconf) must not reset sessions.
            return;
        }
        let mut old = std::mem::take(&mut self.keys);
        for (private, public) in wanted.iter().zip(&publics) {
            // A kept key keeps its rate limiter: the slots' `Tunn`s hold it.
            let key = match old.iter().position(|k| k.public_bytes() == *public) {
                Some(i) => old.swap_remove(i),
                None => LocalKey::new(private, HANDSHAKES_PER_SECOND),
            };
            self.keys.push(key);
        }
        drop(old);
        if let Some(own) = publics.first()
            && current.first() != Some(own)
            && let Some(id) = self.peers.id_by_key(own)
        {
            // A peer with our own public key would be a loop; wireguard-go drops it too.
            self.remove_peer(id);
        }
        // A new primary key is a new pair with every peer: greet them all under it. Keys
        // that are only answered under change no pair the device sends on.
        let greet = current.first() != publics.first();
        for id in self.peers.ids() {
            self.reconcile(id, greet);
        }
        tracing::info!(
            public_key = %publics.first().map(b64).unwrap_or_default(),
            extra_keys = publics.len().saturating_sub(1),
            "private keys changed"
        );
    }

    /// Brings peer `id`'s slots in line with the local keys and its own keys; `greet`:
    /// greets it (see [`PeerState::greet`]).
    fn reconcile(&mut self, id: PeerId, greet: bool) {
        let Some(peer) = self.peers.get(id).cloned() else {
            return;
        };
        let mut st = peer.lock();
        let (remote, params) = (st.remote_keys(), st.tunn_params());
        st.slots
            .reconcile(&self.keys, remote, params, &mut self.peers.indices_for(id));
        st.greet |= greet;
    }

    /// Removes a peer, its allowed IPs, keys and indices.
    pub(crate) fn remove_peer(&mut self, id: PeerId) {
        self.allowed_ips.remove_value(&id);
        self.peers.remove(id);
    }

    /// Creates or updates the peer `update.public_key` (found by its primary or next key);
    /// returns its id (`None` if it was removed, or skipped because of `update_only`, because
    /// it is this device's own key, or because the update would give it a key another peer
    /// has). `send` gets the handshake of a peer contacted right away and says whether it went.
    pub(crate) fn apply_peer(
        &mut self,
        update: &PeerUpdate,
        send: &mut dyn FnMut(&[u8], SocketAddr) -> bool,
    ) -> Option<PeerId> {
        let own = self.public_key();
        if own == Some(update.public_key) {
            return None;
        }
        let existing = self.peers.id_by_key(&update.public_key);
        if update.remove {
            if let Some(id) = existing {
                self.remove_peer(id);
            }
            return None;
        }
        // Never two peers with one key: refuse the whole update before changing anything.
        for key in [update.new_public_key, update.next_public_key.flatten()]
            .into_iter()
            .flatten()
        {
            let holder = self.peers.id_by_key(&key);
            if own == Some(key) || holder.is_some_and(|h| Some(h) != existing) {
                tracing::warn!(
                    peer = %b64(&update.public_key),
                    key = %b64(&key),
                    "refusing peer update: the key belongs to another peer or to this device"
                );
                return None;
            }
        }
        let id = match existing {
            Some(id) => id,
            None if update.update_only => return None,
            None => {
                let psk = update.preshared_key.filter(|k| *k != [0; 32]);
                let keepalive = update.persistent_keepalive.unwrap_or(0);
                self.peers
                    .insert(PeerState::new(update.public_key, psk, keepalive))
            }
        };
        let created = existing.is_none();
        let peer = self.peers.get(id).cloned()?;
        let mut st = peer.lock();
        let mut rekeyed = created;
        if let Some(key) = update.new_public_key
            && key != st.public_key
        {
            self.peers.unbind_key(&st.public_key, id);
            self.peers.bind_key(key, id);
            if st.next_public_key == Some(key) {
                st.next_public_key = None;
            }
            st.public_key = key;
            rekeyed = true;
        }
        if let Some(next) = update.next_public_key {
            let next = next.filter(|k| *k != st.public_key);
            if next != st.next_public_key {
                if let Some(old) = st.next_public_key {
                    self.peers.unbind_key(&old, id);
                }
                if let Some(key) = next {
                    self.peers.bind_key(key, id);
                }
                st.next_public_key = next;
                rekeyed = true;
            }
        }
        let mut rebuild = false;
        if let Some(psk) = update.preshared_key {
            let psk = (psk != [0; 32]).then_some(psk);
            if psk != st.preshared_key {
                st.preshared_key = psk;
                rebuild = !created;
            }
        }
        let mut keepalive_turned_on = false;
        if let Some(keepalive) = update.persistent_keepalive
            && keepalive != st.keepalive
        {
            keepalive_turned_on = st.keepalive == 0;
            st.keepalive = keepalive;
            rebuild = !created;
        }
        if let Some(endpoint) = update.endpoint {
            st.endpoint = Some(endpoint);
        }
        if rebuild {
            // Tunn has no setters for these; new ones renegotiate at once below.
            st.slots.clear(&mut self.peers.indices_for(id));
        }
        if rebuild || rekeyed {
            let (remote, params) = (st.remote_keys(), st.tunn_params());
            st.slots
                .reconcile(&self.keys, remote, params, &mut self.peers.indices_for(id));
            st.greet = true;
        }
        if (rebuild || keepalive_turned_on || (created && st.keepalive != 0))
            && let Some(endpoint) = st.endpoint
        {
            // Like wireguard-go: a peer with keepalive on, or with renegotiated parameters, is
            // contacted right away instead of on the first packet.
            let mut buf = [0u8; HANDSHAKE_BUF_BYTES];
            if let Some(slot) = st.slots.active_mut()
                && let TunnResult::WriteToNetwork(out) = slot.tunn.encapsulate(&[], &mut buf)
            {
                let len = out.len();
                if send(out, endpoint) {
                    st.tx_bytes += len as u64;
                }
            }
        }
        drop(st);
        if update.replace_allowed_ips {
            self.allowed_ips.remove_value(&id);
        }
        for net in &update.allowed_ips {
            self.allowed_ips.insert(*net, id);
        }
        Some(id)
    }

    /// Configuration and counters of one peer, at wall time `wall`.
    pub(crate) fn peer_snapshot(&self, peer: &Peer, wall: SystemTime) -> PeerSnapshot {
        self.snapshot_of(peer, wall, self.allowed_ips.prefixes_of(&peer.id))
    }

    /// Every peer's configuration and counters, in table order, their allowed IPs from one
    /// walk of the table.
    pub(crate) fn peer_snapshots(&self, wall: SystemTime) -> Vec<PeerSnapshot> {
        let mut prefixes = self.allowed_ips.prefixes_by_value();
        self.peers
            .iter()
            .map(|p| self.snapshot_of(p, wall, prefixes.remove(&p.id).unwrap_or_default()))
            .collect()
    }

    fn snapshot_of(
        &self,
        peer: &Peer,
        wall: SystemTime,
        allowed_ips: Vec<ipnet::IpNet>,
    ) -> PeerSnapshot {
        let mut st = peer.lock();
        let active = st.slots.active();
        let mut newest = None;
        let mut sessions = Vec::with_capacity(st.slots.len());
        for (i, slot) in st.slots.iter_mut().enumerate() {
            let since = slot.tunn.time_since_last_handshake();
            newest = match (newest, since) {
                (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                (a, b) => a.or(b),
            };
            sessions.push(SessionSnapshot {
                local_public_key: slot.local,
                remote_public_key: slot.remote,
                established: slot.established(since, wall),
                rx_data_packets: slot.rx_data_packets,
                active: active == Some(i),
            });
        }
        let last_handshake = st.handshake.observe(newest, wall);
        PeerSnapshot {
            public_key: st.public_key,
            next_public_key: st.next_public_key,
            preshared_key: st.preshared_key,
            endpoint: st.endpoint,
            last_handshake,
            rx_bytes: st.rx_bytes,
            tx_bytes: st.tx_bytes,
            persistent_keepalive: st.keepalive,
            allowed_ips,
            sessions,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::datapath::{Wire, decrypt_one, seal, tick_peer};
    use super::*;
    use crate::config::DeviceSnapshot;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::net::{IpAddr, Ipv4Addr};

    /// Records what a device sends.
    #[derive(Default)]
    pub(super) struct Recorder(pub(super) RefCell<Vec<(Vec<u8>, SocketAddr)>>);

    impl Wire for Recorder {
        fn send(&self, datagram: &[u8], to: SocketAddr) -> bool {
            self.0.borrow_mut().push((datagram.to_vec(), to));
            true
        }
    }

    /// A device without threads or sockets: its state, its underlay address, its inner address
    /// and the inner packets it delivered.
    struct Node {
        state: State,
        addr: SocketAddr,
        inner: Ipv4Addr,
        delivered: Vec<Vec<u8>>,
    }

    /// A datagram on the wire: from, to, bytes.
    type Datagram = (SocketAddr, SocketAddr, Vec<u8>);

    impl State {
        /// `set_keys` with raw bytes, for short tests.
        fn set_raw_keys(&mut self, private: Option<Key>, extras: Option<&[Key]>) {
            let private = private.map(PrivateKey::from_bytes);
            let extras: Option<Vec<PrivateKey>> =
                extras.map(|e| e.iter().copied().map(PrivateKey::from_bytes).collect());
            self.set_keys(private.as_ref(), extras.as_deref());
        }
    }

    /// `plan_keys` with raw bytes.
    fn plan(current: &[LocalKey], private: Option<Key>, extras: Option<&[Key]>) -> Vec<Key> {
        let private = private.map(PrivateKey::from_bytes);
        let extras: Option<Vec<PrivateKey>> =
            extras.map(|e| e.iter().copied().map(PrivateKey::from_bytes).collect());
        plan_keys(current, private.as_ref(), extras.as_deref())
            .iter()
            .map(|k| *k.as_bytes())
            .collect()
    }

    fn mk_node(n: u8, private: Key) -> Node {
        let mut state = State::new(u64::from(n) * 7919, 0);
        state.set_raw_keys(Some(private), None);
        Node {
            state,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)), 51820),
            inner: Ipv4Addr::new(10, 0, 0, n),
            delivered: Vec::new(),
        }
    }

    fn public(private: &Key) -> Key {
        PrivateKey::from_bytes(*private).public_key()
    }

    fn no_send(_: &[u8], _: SocketAddr) -> bool {
        true
    }

    /// Makes `peer` (known under `key`) a peer of `node`.
    fn mk_peer(node: &mut Node, peer: &Node, key: Key) -> PeerId {
        let mut u = PeerUpdate::new(key);
        u.endpoint = Some(peer.addr);
        u.allowed_ips = vec![ipnet::IpNet::from(IpAddr::V4(peer.inner))];
        node.state.apply_peer(&u, &mut no_send).unwrap()
    }

    /// An IPv4 packet from `src` to `dst` with a payload byte `tag`.
    fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[27] = tag;
        p
    }

    /// Moves datagrams between nodes until none is left; returns how many were handshake
    /// messages (initiations and responses).
    fn run(nodes: &mut [&mut Node], mut queue: VecDeque<Datagram>) -> usize {
        let mut buf = vec![0u8; 2048];
        let mut handshakes = 0;
        while let Some((from, to, datagram)) = queue.pop_front() {
            if matches!(datagram.first(), Some(1 | 2)) {
                handshakes += 1;
            }
            let Some(node) = nodes.iter_mut().find(|n| n.addr == to) else {
                continue;
            };
            let wire = Recorder::default();
            if let Some(len) = decrypt_one(&node.state, &wire, &datagram, from, &mut buf) {
                node.delivered.push(buf[..len].to_vec());
            }
            for (out, dst) in wire.0.into_inner() {
                queue.push_back((node.addr, dst, out));
            }
        }
        handshakes
    }

    /// `from` sends one packet to `to`'s inner address; everything that follows is delivered.
    /// Returns the number of handshake messages it took.
    fn send(nodes: &mut [&mut Node], from: usize, to: usize, tag: u8) -> usize {
        let (src, dst) = (nodes[from].inner, nodes[to].inner);
        let mut out = vec![0u8; 2048];
        let packet = ip_packet(src, dst, tag);
        let queue = match seal(&nodes[from].state, &packet, &mut out) {
            Some((len, endpoint)) => {
                VecDeque::from([(nodes[from].addr, endpoint, out[..len].to_vec())])
            }
            None => VecDeque::new(),
        };
        run(nodes, queue)
    }

    /// One timer tick of `node`; everything it sends is delivered.
    fn tick(nodes: &mut [&mut Node], node: usize) -> usize {
        let wire = Recorder::default();
        let mut buf = vec![0u8; 256];
        for peer in nodes[node].state.peers.iter() {
            tick_peer(peer, &wire, &mut buf, SystemTime::now());
        }
        let from = nodes[node].addr;
        let queue = wire
            .0
            .into_inner()
            .into_iter()
            .map(|(d, to)| (from, to, d))
            .collect();
        run(nodes, queue)
    }

    fn snapshot(node: &Node) -> DeviceSnapshot {
        let wall = SystemTime::now();
        DeviceSnapshot {
            public_key: node.state.public_key(),
            extra_public_keys: node
                .state
                .keys
                .iter()
                .skip(1)
                .map(LocalKey::public_bytes)
                .collect(),
            listen_port: 0,
            fwmark: 0,
            handshakes_rate_limited: 0,
            peers: node.state.peer_snapshots(wall),
        }
    }

    /// (local, remote, has a session, active) of each slot of the only peer of `node`.
    fn slots(node: &Node) -> Vec<(Key, Key, bool, bool)> {
        let snap = snapshot(node);
        assert_eq!(snap.peers.len(), 1);
        snap.peers[0]
            .sessions
            .iter()
            .map(|s| {
                (
                    s.local_public_key,
                    s.remote_public_key,
                    s.established.is_some(),
                    s.active,
                )
            })
            .collect()
    }

    fn rx_data(node: &Node, local: &Key, remote: &Key) -> u64 {
        snapshot(node).peers[0]
            .sessions
            .iter()
            .find(|s| s.local_public_key == *local && s.remote_public_key == *remote)
            .map_or(0, |s| s.rx_data_packets)
    }

    const A0: Key = [10; 32];
    const A1: Key = [11; 32];
    const B0: Key = [20; 32];

    #[test]
    fn plan_keys_switches_limits_and_clears() {
        let current = |keys: &[Key]| -> Vec<LocalKey> {
            keys.iter()
                .map(|k| LocalKey::new(&PrivateKey::from_bytes(*k), 10))
                .collect()
        };
        // Switching to an extra makes the old primary an extra in its place.
        assert_eq!(plan(&current(&[A0, A1]), Some(A1), None), vec![A1, A0]);
        // Switching to a new key drops the old one, as it always did.
        assert_eq!(plan(&current(&[A0, A1]), Some(B0), None), vec![B0, A1]);
        // Explicit extras win; the primary, zeros and duplicates are ignored; two at most.
        let extras = [A0, [0; 32], A1, A1, [1; 32], [2; 32]];
        assert_eq!(
            plan(&current(&[A0]), None, Some(&extras)),
            vec![A0, A1, [1; 32]]
        );
        assert_eq!(plan(&current(&[A0, A1]), Some(A1), Some(&[])), vec![A1]);
        // No primary, no keys at all; extras alone are ignored.
        assert!(plan(&current(&[A0, A1]), Some([0; 32]), None).is_empty());
        assert!(plan(&[], None, Some(&[A1])).is_empty());
    }

    #[test]
    fn a_restarted_device_greets_its_peers_so_their_old_sessions_are_replaced_at_once() {
        let (mut a, mut b) = (mk_node(1, A0), mk_node(2, B0));
        mk_peer(&mut a, &b, public(&B0));
        mk_peer(&mut b, &a, public(&A0));
        {
            let n = &mut [&mut a, &mut b];
            assert_eq!(send(n, 0, 1, 1), 2, "first packet: one handshake");
            assert_eq!(tick(n, 0), 0, "a peer with a session is not greeted");
        }

        // B restarts: same key, no sessions. A still sends on its old session, which B
        // cannot open: without a greeting nothing would get through until A's 15 s retry.
        let mut b2 = mk_node(2, B0);
        mk_peer(&mut b2, &a, public(&A0));
        let n = &mut [&mut a, &mut b2];
        assert_eq!(send(n, 0, 1, 2), 0);
        assert!(n[1].delivered.is_empty(), "the old session is dead to B");
        assert_eq!(
            tick(n, 1),
            2,
            "B greets A at its first tick, without traffic"
        );
        assert_eq!(tick(n, 1), 0, "once");
        send(n, 0, 1, 3);
        assert_eq!(
            n[1].delivered.len(),
            1,
            "A's next packet uses the new session"
        );
        send(n, 1, 0, 4);
        assert_eq!(n[0].delivered.len(), 1);
    }

    /// Two peers that have exchanged nothing for longer than a session lives: no session on
    /// either side, the first greeting long done.
    fn idle_pair() -> (Node, Node, PeerId, PeerId) {
        let (mut a, mut b) = (mk_node(1, A0), mk_node(2, B0));
        let b_on_a = mk_peer(&mut a, &b, public(&B0));
        let a_on_b = mk_peer(&mut b, &a, public(&A0));
        for node in [&a, &b] {
            for peer in node.state.peers.iter() {
                peer.lock().greet = false;
            }
        }
        (a, b, b_on_a, a_on_b)
    }

    #[test]
    fn idle_peers_handshake_under_a_new_key_without_traffic() {
        let (mut a, mut b, _, a_on_b) = idle_pair();
        let n = &mut [&mut a, &mut b];
        assert_eq!(tick(n, 0) + tick(n, 1), 0, "idle: nothing is sent");

        // A rotates: B learns A's next key and opens a session under it by itself.
        n[0].state.set_raw_keys(None, Some(&[A1]));
        assert_eq!(tick(n, 0), 0, "a key A only answers under starts nothing");
        let mut u = PeerUpdate::new(public(&A0));
        u.next_public_key = Some(Some(public(&A1)));
        assert_eq!(n[1].state.apply_peer(&u, &mut no_send), Some(a_on_b));
        assert_eq!(tick(n, 1), 2, "B handshakes with A's next key at once");
        let (a1, b0) = (public(&A1), public(&B0));
        assert!(
            snapshot(n[0]).peers[0]
                .sessions
                .iter()
                .any(|s| s.local_public_key == a1 && s.established.is_some()),
            "A holds a session under its next key: B has moved"
        );
        assert_eq!(tick(n, 1), 0, "once");

        // The same pair gone idle again, A switching: A opens the session itself.
        let (mut a, mut b, _, a_on_b) = idle_pair();
        let n = &mut [&mut a, &mut b];
        n[0].state.set_raw_keys(None, Some(&[A1]));
        let mut u = PeerUpdate::new(public(&A0));
        u.next_public_key = Some(Some(public(&A1)));
        n[1].state.apply_peer(&u, &mut no_send);
        for peer in n[1].state.peers.iter() {
            peer.lock().greet = false;
        }
        n[0].state.set_raw_keys(Some(A1), None);
        assert_eq!(tick(n, 0), 2, "A handshakes under its new key at once");
        assert!(
            slots(n[0]).contains(&(a1, b0, true, true)),
            "A sends under its new key: {:?}",
            slots(n[0])
        );
        assert_eq!(n[1].state.peers.id_by_key(&a1), Some(a_on_b));
    }

    #[test]
    fn a_rotation_moves_both_directions_to_the_new_key_and_keeps_the_peer() {
        let (mut a, mut b) = (mk_node(1, A0), mk_node(2, B0));
        let b_on_a = mk_peer(&mut a, &b, public(&B0));
        let a_on_b = mk_peer(&mut b, &a, public(&A0));
        let n = &mut [&mut a, &mut b];
        assert_eq!(send(n, 0, 1, 1), 2, "first packet: one handshake");
        assert_eq!(n[1].delivered.len(), 1);
        assert_eq!(send(n, 1, 0, 2), 0);
        assert_eq!(n[0].delivered.len(), 1);

        // (a) A answers under its next key too; (b) B learns it and moves on its next tick.
        n[0].state.set_raw_keys(None, Some(&[A1]));
        let mut u = PeerUpdate::new(public(&A0));
        u.next_public_key = Some(Some(public(&A1)));
        assert_eq!(n[1].state.apply_peer(&u, &mut no_send), Some(a_on_b));
        assert_eq!(n[1].state.peers.id_by_key(&public(&A1)), Some(a_on_b));
        assert_eq!(
            tick(n, 1),
            2,
            "B starts the handshake to A's next key at once"
        );
        assert_eq!(tick(n, 1), 0, "and does not repeat it");
        let (b0, a0, a1) = (public(&B0), public(&A0), public(&A1));
        assert_eq!(
            slots(n[1]),
            vec![(b0, a0, true, false), (b0, a1, true, true)],
            "B sends under A's next key"
        );
        send(n, 1, 0, 3);
        assert_eq!(rx_data(n[0], &a1, &b0), 1);
        assert_eq!(
            rx_data(n[0], &a0, &b0),
            1,
            "only the packet before the move"
        );

        // Every slot's receiver index routes to its peer and slot.
        for node in [&*n[0], &*n[1]] {
            let peer = node.state.peers.iter().next().unwrap();
            let st = peer.lock();
            for (position, slot) in st.slots.iter().enumerate() {
                let routed = node
                    .state
                    .peers
                    .by_receiver_index(slot.index << 8 | 5)
                    .unwrap();
                assert_eq!(routed.id, peer.id);
                assert_eq!(st.slots.by_index(slot.index), Some(position));
            }
        }

        // (c) A switches: the old key becomes an extra and every session survives.
        n[0].state.set_raw_keys(Some(A1), None);
        let snap = snapshot(n[0]);
        assert_eq!(snap.extra_public_keys, vec![a0]);
        assert_eq!(
            slots(n[0]),
            vec![(a0, b0, true, false), (a1, b0, true, true)]
        );
        assert_eq!(send(n, 0, 1, 4), 0, "no handshake needed");
        assert_eq!(rx_data(n[1], &b0, &a1), 1);
        assert_eq!(rx_data(n[1], &b0, &a0), 1, "only the first packet");
        let old_indices: Vec<u32> = {
            let st = n[0].state.peers.get(b_on_a).unwrap().lock();
            st.slots
                .iter()
                .filter(|s| s.local == a0)
                .map(|s| s.index)
                .collect()
        };

        // (e) A retires the old key; B promotes A's next key to primary.
        let rx_before = snapshot(n[1]).peers[0].rx_bytes;
        n[0].state.set_raw_keys(None, Some(&[]));
        let mut u = PeerUpdate::new(a1);
        u.new_public_key = Some(a1);
        assert_eq!(n[1].state.apply_peer(&u, &mut no_send), Some(a_on_b));
        assert_eq!(slots(n[0]), vec![(a1, b0, true, true)]);
        assert_eq!(slots(n[1]), vec![(b0, a1, true, true)]);
        let peer = &snapshot(n[1]).peers[0];
        assert_eq!((peer.public_key, peer.next_public_key), (a1, None));
        assert_eq!(peer.rx_bytes, rx_before, "counters stay with the peer");
        assert_eq!(n[1].state.peers.id_by_key(&a0), None);
        for index in old_indices {
            assert!(n[0].state.peers.by_receiver_index(index << 8).is_none());
        }
        assert_eq!(n[0].state.peers.index_count(), 1, "no spare left");
        assert_eq!(send(n, 0, 1, 5) + send(n, 1, 0, 6), 0);
        assert_eq!((n[0].delivered.len(), n[1].delivered.len()), (3, 3));
    }

    #[test]
    fn keys_are_never_shared_between_peers() {
        let mut node = mk_node(1, A0);
        let p = node
            .state
            .apply_peer(&PeerUpdate::new([1; 32]), &mut no_send)
            .unwrap();
        let q = node
            .state
            .apply_peer(&PeerUpdate::new([2; 32]), &mut no_send)
            .unwrap();
        let refused = |update: PeerUpdate, node: &mut Node| {
            let before = node.state.peers.len();
            assert_eq!(
                node.state.apply_peer(&update, &mut no_send),
                None,
                "{update:?}"
            );
            assert_eq!(node.state.peers.len(), before);
        };
        let mut u = PeerUpdate::new([1; 32]);
        u.new_public_key = Some([2; 32]);
        u.allowed_ips = vec!["10.9.0.0/16".parse().unwrap()];
        refused(u, &mut node);
        assert!(
            node.state.allowed_ips.prefixes_of(&p).is_empty(),
            "refused as a whole"
        );
        let mut u = PeerUpdate::new([1; 32]);
        u.next_public_key = Some(Some([2; 32]));
        refused(u, &mut node);
        let mut u = PeerUpdate::new([1; 32]);
        u.next_public_key = Some(Some(public(&A0)));
        refused(u, &mut node);
        let mut u = PeerUpdate::new([3; 32]);
        u.next_public_key = Some(Some([1; 32]));
        refused(u, &mut node);
        assert_eq!(node.state.peers.id_by_key(&[3; 32]), None, "not created");

        // A next key finds its peer; nobody else may take it.
        let mut u = PeerUpdate::new([1; 32]);
        u.next_public_key = Some(Some([4; 32]));
        assert_eq!(node.state.apply_peer(&u, &mut no_send), Some(p));
        assert_eq!(
            node.state
                .apply_peer(&PeerUpdate::new([4; 32]), &mut no_send),
            Some(p)
        );
        let mut u = PeerUpdate::new([2; 32]);
        u.new_public_key = Some([4; 32]);
        refused(u, &mut node);
        assert_eq!(node.state.peers.id_by_key(&[2; 32]), Some(q));
        // Removing it frees the key.
        let mut u = PeerUpdate::new([4; 32]);
        u.next_public_key = Some(None);
        assert_eq!(node.state.apply_peer(&u, &mut no_send), Some(p));
        let mut u = PeerUpdate::new([2; 32]);
        u.next_public_key = Some(Some([4; 32]));
        assert_eq!(node.state.apply_peer(&u, &mut no_send), Some(q));
    }

    #[test]
    fn an_extra_key_answers_only_while_it_is_held() {
        // C knows A only under A's extra key.
        let (mut a, mut c) = (mk_node(1, A0), mk_node(3, B0));
        a.state.set_raw_keys(None, Some(&[A1]));
        mk_peer(&mut a, &c, public(&B0));
        mk_peer(&mut c, &a, public(&A1));
        let n = &mut [&mut a, &mut c];
        assert_eq!(send(n, 1, 0, 1), 2);
        assert_eq!(n[0].delivered.len(), 1);
        let (a1, c0) = (public(&A1), public(&B0));
        assert!(slots(n[0]).contains(&(a1, c0, true, true)));

        n[0].state.set_raw_keys(None, Some(&[]));
        assert!(slots(n[0]).iter().all(|s| s.0 != a1));
        // C's sessions and its new handshakes go unanswered.
        assert_eq!(send(n, 1, 0, 2), 0);
        let c_peer = n[1].state.peers.iter().next().unwrap().clone();
        c_peer
            .lock()
            .slots
            .clear(&mut n[1].state.peers.indices_for(c_peer.id));
        n[1].state.reconcile(c_peer.id, false);
        assert_eq!(send(n, 1, 0, 3), 1, "an initiation and no response");
        assert_eq!(n[0].delivered.len(), 1);
    }

    #[test]
    fn removing_the_private_key_drops_every_slot_and_index() {
        let (mut a, b) = (mk_node(1, A0), mk_node(2, B0));
        a.state.set_raw_keys(None, Some(&[A1]));
        mk_peer(&mut a, &b, public(&B0));
        assert!(a.state.peers.index_count() > 1);
        a.state.set_raw_keys(Some([0; 32]), None);
        assert!(a.state.keys.is_empty());
        assert_eq!(a.state.peers.index_count(), 0);
        assert!(slots(&a).is_empty());
        // Back with a key: the preferred slot is there again.
        a.state.set_raw_keys(Some(A0), None);
        assert_eq!(slots(&a).len(), 1);
    }
}

#[cfg(test)]
mod abuse_tests {
    //! The datapath's entry points under hostile input: a handshake flood from one source, and
    //! arbitrary datagrams and TUN packets (property tests: never a panic, never a delivery of
    //! something that did not authenticate).
    #![allow(clippy::unwrap_used)]
    use super::super::datapath::{decrypt_one, seal};
    use super::super::source_limit::HANDSHAKE_BURST;
    use super::tests::Recorder;
    use super::*;
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::atomic::Ordering;

    const A: Key = [10; 32];

    fn mk_state(peer: Key) -> State {
        let mut state = State::new(1, 0);
        state.set_keys(Some(&PrivateKey::from_bytes(A)), None);
        let mut u = PeerUpdate::new(peer);
        u.endpoint = Some("192.0.2.2:51820".parse().unwrap());
        u.allowed_ips = vec!["10.0.0.2/32".parse().unwrap()];
        state.apply_peer(&u, &mut |_, _| true).unwrap();
        state
    }

    /// An initiator towards `A`: its `Tunn` and the initiation it sends now.
    fn initiator(secret: StaticSecret) -> (Tunn, Vec<u8>) {
        let a_public = PrivateKey::from_bytes(A).public_key();
        let mut tunn = Tunn::new(secret, PublicKey::from(a_public), None, None, 1, None);
        let packet = remake(&mut tunn);
        (tunn, packet)
    }

    /// A fresh initiation (carrying MAC2 if the `Tunn` holds a cookie).
    fn remake(tunn: &mut Tunn) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        match tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    /// Sends `packet` from `from`; returns what the device sent back.
    fn exchange(state: &State, packet: &[u8], from: SocketAddr) -> Vec<Vec<u8>> {
        let wire = Recorder::default();
        let mut plain = vec![0u8; 2048];
        assert_eq!(decrypt_one(state, &wire, packet, from, &mut plain), None);
        wire.0.into_inner().into_iter().map(|(d, _)| d).collect()
    }

    /// Hands the device's cookie reply to the initiator and returns its next initiation.
    fn with_cookie(tunn: &mut Tunn, replies: &[Vec<u8>], from: SocketAddr) -> Vec<u8> {
        let cookie = replies
            .iter()
            .find(|d| d.first() == Some(&3))
            .expect("a cookie reply");
        let mut buf = vec![0u8; 256];
        let _ = tunn.decapsulate(Some(from.ip()), cookie, &mut buf);
        remake(tunn)
    }

    #[test]
    fn under_load_a_source_with_a_cookie_gets_its_burst_and_another_source_still_handshakes() {
        let peer = StaticSecret::random_from_rng(rand_core::OsRng);
        let state = mk_state(PublicKey::from(&peer).to_bytes());
        let flooder: SocketAddr = "198.51.100.7:4000".parse().unwrap();
        let (mut flood_tunn, unproven) = initiator(StaticSecret::random_from_rng(rand_core::OsRng));
        // Not under load, the per-source limit is not consulted: a sender that does not own
        // its address (no cookie) cannot spend that address's tokens. Each of these passes the
        // key's limiter once (the unknown key goes no further than the peer lookup).
        let unloaded = HANDSHAKES_PER_SECOND;
        for _ in 0..unloaded {
            assert!(exchange(&state, &unproven, flooder).is_empty());
        }
        assert_eq!(state.handshakes_rate_limited.load(Ordering::Relaxed), 0);
        // Under load now: a cookie instead of work, until the sender proves its address.
        let replies = exchange(&state, &unproven, flooder);
        let proven = with_cookie(&mut flood_tunn, &replies, flooder);
        let n = 80u64;
        for _ in 0..n {
            assert!(exchange(&state, &proven, flooder).is_empty());
        }
        assert_eq!(
            state.handshakes_rate_limited.load(Ordering::Relaxed),
            n - u64::from(HANDSHAKE_BURST),
            "a cookie buys the burst, not a handshake per copy"
        );
        // The real peer, from its own address, gets a cookie, then its response.
        let from: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let (mut peer_tunn, first) = initiator(peer);
        let replies = exchange(&state, &first, from);
        let retry = with_cookie(&mut peer_tunn, &replies, from);
        let sent = exchange(&state, &retry, from);
        assert_eq!(sent.len(), 1, "one handshake response");
        assert_eq!(sent[0].first(), Some(&2u8));
    }

    /// Datagrams with a WireGuard header of every type at and around its size, and noise.
    fn datagram() -> impl Strategy<Value = Vec<u8>> {
        let shaped = (
            1u8..=4,
            prop_oneof![Just(148usize), Just(92), Just(64), 32usize..200],
        )
            .prop_flat_map(|(kind, len)| {
                proptest::collection::vec(any::<u8>(), len).prop_map(move |mut d| {
                    d[0] = kind;
                    d[1..4].fill(0);
                    d
                })
            });
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..1600), shaped]
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic_or_deliver(
            datagrams in proptest::collection::vec(datagram(), 1..16),
            port in any::<u16>(),
        ) {
            let state = mk_state([3; 32]);
            let mut plain = vec![0u8; 2048];
            let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), port);
            for d in &datagrams {
                let wire = Recorder::default();
                prop_assert_eq!(decrypt_one(&state, &wire, d, from, &mut plain), None);
                // Nothing unauthenticated is answered but with a cookie or a handshake reply
                // to the sender, never elsewhere.
                for (_, to) in wire.0.into_inner() {
                    prop_assert_eq!(to, from);
                }
            }
            prop_assert!(state.sources.lock().unwrap().len() <= 1);
        }

        #[test]
        fn arbitrary_tun_packets_never_panic(
            packet in proptest::collection::vec(any::<u8>(), 0..1600),
            v4 in any::<bool>(),
        ) {
            let state = mk_state([3; 32]);
            let mut packet = packet;
            if v4 && packet.len() >= 20 {
                // Routed to the peer, so it reaches `encapsulate`.
                packet[0] = 0x45;
                packet[16..20].copy_from_slice(&[10, 0, 0, 2]);
            }
            let mut out = vec![0u8; 2048];
            let _ = seal(&state, &packet, &mut out);
            let mut small = vec![0u8; 16];
            prop_assert_eq!(seal(&state, &packet, &mut small), None);
        }
    }
}
