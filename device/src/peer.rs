//! The peer table: peers by internal identity (`PeerId`), by public key and by receiver index.
//!
//! A peer's identity is its entry here, not its public key: keys are attributes that change
//! during a key rotation (a peer is found under its primary key and, while it rotates, its next
//! key), and so are its receiver indices (each session slot, see [`super::slot`], has its own;
//! the top 24 bits of every session index the slot's `Tunn` hands out). Incoming handshake
//! responses, cookie replies and data packets are routed by receiver index to the peer, which
//! finds the slot; handshake initiations by the public key they decrypt to. The index map stores
//! a `PeerId`, never the reverse.
//!
//! The table holds no sockets and does no I/O, and it never decides which keys or slots a peer
//! has (the device does, under its write lock); per-peer mutable state sits behind a mutex that
//! the datapath threads take per packet.

use super::config::Key;
use super::slot::{IndexSource, RemoteKeys, Slots, TunnParams};
use super::timers::HandshakeTime;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Session indices are 32 bits; `Tunn` uses the low 8 for its session ring.
const INDEX_BITS: u32 = 24;
const INDEX_MASK: u32 = (1 << INDEX_BITS) - 1;

/// Internal identity of a peer: its entry in the [`PeerTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub(crate) u32);

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

/// A peer: immutable identity plus mutable state behind a mutex.
#[derive(Debug)]
pub struct Peer {
    /// Entry in the table.
    pub id: PeerId,
    state: Mutex<PeerState>,
}

impl Peer {
    /// Locks the peer's mutable state. A panic while holding it poisons nothing we rely on,
    /// so a poisoned lock is taken over rather than propagated.
    #[inline]
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A peer's mutable state.
pub struct PeerState {
    /// The peer's primary public key (the one `wg show` reports).
    pub public_key: Key,
    /// The key the peer rotates to: handshakes from it are accepted as this peer and new
    /// handshakes go to it.
    pub next_public_key: Option<Key>,
    /// Session slots; empty while the device has no private key.
    pub slots: Slots,
    /// Where to send; updated from the source of authenticated packets (roaming).
    pub endpoint: Option<SocketAddr>,
    /// Preshared key, if any.
    pub preshared_key: Option<[u8; 32]>,
    /// Persistent keepalive interval in seconds, 0 for off.
    pub keepalive: u16,
    /// Bytes received from this peer: authenticated datagrams, as on the wire.
    pub rx_bytes: u64,
    /// Bytes sent to this peer: datagrams, as on the wire.
    pub tx_bytes: u64,
    /// Wall-clock time of the last handshake over all slots.
    pub handshake: HandshakeTime,
    /// Start a handshake at the next timer tick, without waiting for traffic, unless the
    /// active slot has a session: set for a new peer, and whenever this device's keys or
    /// the peer's change. A device that restarts (an agent upgrade) has no sessions while
    /// its peers still hold theirs; they only give up on them after 15 s without an answer,
    /// so the new device greets every peer that has an endpoint at once instead. A key
    /// rotation waits for a session under the new pair of keys with every peer; between idle
    /// peers, whose sessions expired, nothing else would start one.
    pub greet: bool,
}

impl PeerState {
    /// State for a new peer known under `public_key`, with no slots yet.
    pub fn new(public_key: Key, preshared_key: Option<[u8; 32]>, keepalive: u16) -> Self {
        Self {
            public_key,
            next_public_key: None,
            slots: Slots::new(),
            endpoint: None,
            preshared_key,
            keepalive,
            rx_bytes: 0,
            tx_bytes: 0,
            handshake: HandshakeTime::default(),
            greet: true,
        }
    }

    /// The keys the peer is known under.
    pub fn remote_keys(&self) -> RemoteKeys {
        RemoteKeys {
            primary: self.public_key,
            next: self.next_public_key,
        }
    }

    /// What its `Tunn`s are built with.
    pub fn tunn_params(&self) -> TunnParams {
        TunnParams {
            preshared_key: self.preshared_key,
            keepalive: self.keepalive,
        }
    }
}

impl std::fmt::Debug for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerState")
            .field("slots", &self.slots.len())
            .field("has_next_public_key", &self.next_public_key.is_some())
            .field("endpoint", &self.endpoint)
            .field("has_preshared_key", &self.preshared_key.is_some())
            .field("keepalive", &self.keepalive)
            .field("rx_bytes", &self.rx_bytes)
            .field("tx_bytes", &self.tx_bytes)
            .field("handshake", &self.handshake)
            .finish()
    }
}

/// All peers of one device.
#[derive(Debug)]
pub struct PeerTable {
    entries: Vec<Option<Arc<Peer>>>,
    /// Primary and next keys.
    by_key: HashMap<Key, PeerId>,
    by_index: HashMap<u32, PeerId>,
    count: usize,
    rng: u64,
    /// `handover::EPOCH_BIT` or 0: the epoch bit of every index this table hands out.
    epoch_bit: u32,
}

impl PeerTable {
    /// An empty table whose receiver indices are drawn from a generator seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            entries: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            count: 0,
            // xorshift must not start at zero.
            rng: seed | 1,
            epoch_bit: 0,
        }
    }

    /// Sets the epoch (0 or 1) of the indices handed out from now on (see `handover`).
    pub fn set_epoch(&mut self, epoch: u32) {
        self.epoch_bit = if epoch & 1 == 1 {
            super::handover::EPOCH_BIT
        } else {
            0
        };
    }

    /// Adds a peer known under `state.public_key` (and its next key, if set and free). Returns
    /// the existing peer's id if that key is already taken.
    pub fn insert(&mut self, state: PeerState) -> PeerId {
        if let Some(&id) = self.by_key.get(&state.public_key) {
            return id;
        }
        let entry = match self.entries.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.entries.push(None);
                self.entries.len() - 1
            }
        };
        let id = PeerId(u32::try_from(entry).expect("fewer than 2^32 peers"));
        self.by_key.insert(state.public_key, id);
        if let Some(next) = state.next_public_key {
            self.by_key.entry(next).or_insert(id);
        }
        self.entries[entry] = Some(Arc::new(Peer {
            id,
            state: Mutex::new(state),
        }));
        self.count += 1;
        id
    }

    /// Removes a peer; its keys and indices are free afterwards.
    pub fn remove(&mut self, id: PeerId) -> Option<Arc<Peer>> {
        let peer = self.entries.get_mut(id.0 as usize)?.take()?;
        self.count -= 1;
        let mut st = peer.lock();
        for key in [Some(st.public_key), st.next_public_key]
            .into_iter()
            .flatten()
        {
            self.unbind_key(&key, id);
        }
        for index in st.slots.take_indices() {
            self.by_index.remove(&index);
        }
        drop(st);
        Some(peer)
    }

    /// The peer with id `id`.
    #[inline]
    pub fn get(&self, id: PeerId) -> Option<&Arc<Peer>> {
        self.entries.get(id.0 as usize)?.as_ref()
    }

    /// The peer known under this public key (its primary or its next key).
    pub fn by_key(&self, public_key: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.get(*self.by_key.get(public_key)?)
    }

    /// The id of the peer known under this key.
    pub fn id_by_key(&self, public_key: &[u8; 32]) -> Option<PeerId> {
        self.by_key.get(public_key).copied()
    }

    /// Makes `key` find peer `id`; false (and no change) if another peer is known under it.
    pub fn bind_key(&mut self, key: Key, id: PeerId) -> bool {
        match self.by_key.get(&key) {
            Some(&other) => other == id,
            None => {
                self.by_key.insert(key, id);
                true
            }
        }
    }

    /// Forgets `key` if it finds peer `id`.
    pub fn unbind_key(&mut self, key: &Key, id: PeerId) {
        if self.by_key.get(key) == Some(&id) {
            self.by_key.remove(key);
        }
    }

    /// The peer that owns a receiver index taken from an incoming packet (all 32 bits; the low
    /// 8 are the session and are ignored here).
    #[inline]
    pub fn by_receiver_index(&self, receiver_index: u32) -> Option<&Arc<Peer>> {
        self.get(*self.by_index.get(&(receiver_index >> 8))?)
    }

    /// Registers a fresh receiver index for peer `id`.
    pub fn allocate_index(&mut self, id: PeerId) -> u32 {
        let index = loop {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let candidate = ((self.rng >> 20) as u32 & INDEX_MASK & !super::handover::EPOCH_BIT)
                | self.epoch_bit;
            if candidate != 0 && !self.by_index.contains_key(&candidate) {
                break candidate;
            }
        };
        self.by_index.insert(index, id);
        index
    }

    /// Unregisters a receiver index.
    pub fn release_index(&mut self, index: u32) {
        self.by_index.remove(&index);
    }

    /// An [`IndexSource`] handing out indices of peer `id`.
    pub fn indices_for(&mut self, id: PeerId) -> PeerIndices<'_> {
        PeerIndices { table: self, id }
    }

    /// All peers, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.entries.iter().flatten()
    }

    /// Ids of all peers.
    pub fn ids(&self) -> Vec<PeerId> {
        self.iter().map(|p| p.id).collect()
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Number of registered receiver indices (slots and spares of all peers).
    pub fn index_count(&self) -> usize {
        self.by_index.len()
    }
}

/// The receiver indices of one peer, as a [`Slots`] sees them.
#[derive(Debug)]
pub struct PeerIndices<'a> {
    table: &'a mut PeerTable,
    id: PeerId,
}

impl IndexSource for PeerIndices<'_> {
    fn allocate(&mut self) -> u32 {
        self.table.allocate_index(self.id)
    }

    fn release(&mut self, index: u32) {
        if self.table.by_index.get(&index) == Some(&self.id) {
            self.table.release_index(index);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::slot::LocalKey;

    fn mk_peer(table: &mut PeerTable, key_byte: u8) -> PeerId {
        table.insert(PeerState::new([key_byte; 32], None, 0))
    }

    /// Gives peer `id` its preferred slot under `local`; returns the slot's index.
    fn mk_slot(table: &mut PeerTable, id: PeerId, local: &LocalKey) -> u32 {
        let peer = table.get(id).unwrap().clone();
        let mut st = peer.lock();
        let (remote, params) = (st.remote_keys(), st.tunn_params());
        st.slots.reconcile(
            std::slice::from_ref(local),
            remote,
            params,
            &mut table.indices_for(id),
        );
        st.slots.iter().next().unwrap().index
    }

    #[test]
    fn peers_are_found_by_id_key_and_receiver_index() {
        let local = LocalKey::new(&crate::config::PrivateKey::from_bytes([5; 32]), 10);
        let mut t = PeerTable::new(42);
        let a = mk_peer(&mut t, 1);
        let b = mk_peer(&mut t, 2);
        assert_ne!(a, b);
        let index = mk_slot(&mut t, a, &local);
        assert_eq!(t.get(a).unwrap().lock().public_key, [1; 32]);
        assert_eq!(t.by_key(&[2; 32]).unwrap().id, b);
        // Session indices are index << 8 | session; any session routes to the peer.
        for session in [0u32, 1, 255] {
            assert_eq!(t.by_receiver_index(index << 8 | session).unwrap().id, a);
        }
        assert!(t.by_receiver_index(0).is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn inserting_a_known_key_returns_the_same_peer() {
        let mut t = PeerTable::new(7);
        let a = mk_peer(&mut t, 1);
        assert_eq!(mk_peer(&mut t, 1), a);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_peer_is_found_under_its_next_key_and_keys_are_never_shared() {
        let mut t = PeerTable::new(7);
        let a = mk_peer(&mut t, 1);
        let b = mk_peer(&mut t, 2);
        assert!(t.bind_key([3; 32], a));
        assert_eq!(t.by_key(&[3; 32]).unwrap().id, a);
        assert!(t.bind_key([3; 32], a), "binding again is a no-op");
        assert!(!t.bind_key([3; 32], b), "another peer's key");
        assert!(!t.bind_key([1; 32], b));
        t.unbind_key(&[3; 32], b);
        assert_eq!(t.id_by_key(&[3; 32]), Some(a), "only the owner unbinds");
        t.unbind_key(&[3; 32], a);
        assert_eq!(t.id_by_key(&[3; 32]), None);
    }

    #[test]
    fn removal_frees_keys_indices_and_the_entry() {
        let local = LocalKey::new(&crate::config::PrivateKey::from_bytes([5; 32]), 10);
        let mut t = PeerTable::new(7);
        let a = mk_peer(&mut t, 1);
        let b = mk_peer(&mut t, 2);
        {
            let peer = t.get(a).unwrap().clone();
            peer.lock().next_public_key = Some([4; 32]);
            assert!(t.bind_key([4; 32], a));
        }
        let index = mk_slot(&mut t, a, &local);
        // Two remote keys: the slot and one spare index are registered.
        assert_eq!(t.index_count(), 2);
        let removed = t.remove(a).unwrap();
        assert_eq!(removed.lock().public_key, [1; 32]);
        assert!(t.get(a).is_none());
        assert!(t.by_key(&[1; 32]).is_none());
        assert!(t.by_key(&[4; 32]).is_none());
        assert!(t.by_receiver_index(index << 8).is_none());
        assert_eq!(t.index_count(), 0);
        assert!(t.remove(a).is_none());
        assert_eq!(t.ids(), vec![b]);
        // The entry is reused, the peer behind it is new.
        let c = mk_peer(&mut t, 3);
        assert_eq!(c, a);
        assert_eq!(t.get(c).unwrap().lock().public_key, [3; 32]);
    }

    #[test]
    fn receiver_indices_are_unique_24_bit_and_nonzero() {
        let mut t = PeerTable::new(99);
        let id = mk_peer(&mut t, 1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000u32 {
            let index = t.allocate_index(id);
            assert!(index != 0 && index <= INDEX_MASK);
            assert!(seen.insert(index), "index {index} handed out twice");
            assert_eq!(t.by_receiver_index(index << 8).unwrap().id, id);
        }
    }

    #[test]
    fn indices_carry_the_tables_epoch() {
        let mut t = PeerTable::new(7);
        let id = mk_peer(&mut t, 1);
        for epoch in [0, 1, 0] {
            t.set_epoch(epoch);
            for _ in 0..200 {
                let index = t.allocate_index(id);
                assert_eq!(index << 8 >> 31, epoch, "index {index:#x}");
            }
        }
    }
}
