//! The peer table: peers by internal identity (`PeerId`), by public key and by receiver index.
//!
//! A peer's identity is its slot here, not its public key: the key is one attribute, the
//! receiver index (the top 24 bits of every session index the peer's `Tunn` hands out) is another.
//! Incoming handshake responses, cookie replies and data packets are routed by receiver index;
//! handshake initiations by the public key they decrypt to. Key rotation will give a peer a second
//! `Tunn` with its own index, so the index map stores a `PeerId`, never the reverse.
//!
//! The table holds no sockets and does no I/O; per-peer mutable state sits behind a mutex that
//! the datapath threads take per packet.

use super::timers::HandshakeTime;
use boringtun::noise::Tunn;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Session indices are 32 bits; `Tunn` uses the low 8 for its session ring.
const INDEX_BITS: u32 = 24;
const INDEX_MASK: u32 = (1 << INDEX_BITS) - 1;

/// Internal identity of a peer: its slot in the [`PeerTable`].
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
    /// Slot in the table.
    pub id: PeerId,
    /// The peer's static public key.
    pub public_key: [u8; 32],
    /// This peer's 24-bit receiver index; `Tunn::new` gets it and shifts it left by 8.
    pub index: u32,
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
    /// The noise state machine; `None` while the device has no private key.
    pub tunn: Option<Tunn>,
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
    /// Wall-clock time of the last handshake.
    pub handshake: HandshakeTime,
}

impl PeerState {
    /// State for a new peer with no session yet.
    pub fn new(tunn: Option<Tunn>, preshared_key: Option<[u8; 32]>, keepalive: u16) -> Self {
        Self {
            tunn,
            endpoint: None,
            preshared_key,
            keepalive,
            rx_bytes: 0,
            tx_bytes: 0,
            handshake: HandshakeTime::default(),
        }
    }
}

impl std::fmt::Debug for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerState")
            .field("has_tunn", &self.tunn.is_some())
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
    slots: Vec<Option<Arc<Peer>>>,
    by_key: HashMap<[u8; 32], PeerId>,
    by_index: HashMap<u32, PeerId>,
    rng: u64,
}

impl PeerTable {
    /// An empty table whose receiver indices are drawn from a generator seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            slots: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            // xorshift must not start at zero.
            rng: seed | 1,
        }
    }

    /// Adds a peer with a fresh receiver index; `make_state` gets that index (to build the
    /// peer's `Tunn`). Returns the existing peer's id if the key is already present.
    pub fn insert(
        &mut self,
        public_key: [u8; 32],
        make_state: impl FnOnce(u32) -> PeerState,
    ) -> PeerId {
        if let Some(&id) = self.by_key.get(&public_key) {
            return id;
        }
        let index = self.allocate_index();
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let id = PeerId(u32::try_from(slot).expect("fewer than 2^32 peers"));
        self.slots[slot] = Some(Arc::new(Peer {
            id,
            public_key,
            index,
            state: Mutex::new(make_state(index)),
        }));
        self.by_key.insert(public_key, id);
        self.by_index.insert(index, id);
        id
    }

    /// Removes a peer; its index and key are free afterwards.
    pub fn remove(&mut self, id: PeerId) -> Option<Arc<Peer>> {
        let peer = self.slots.get_mut(id.0 as usize)?.take()?;
        self.by_key.remove(&peer.public_key);
        self.by_index.remove(&peer.index);
        Some(peer)
    }

    /// The peer in slot `id`.
    #[inline]
    pub fn get(&self, id: PeerId) -> Option<&Arc<Peer>> {
        self.slots.get(id.0 as usize)?.as_ref()
    }

    /// The peer with this public key.
    pub fn by_key(&self, public_key: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.get(*self.by_key.get(public_key)?)
    }

    /// The peer that owns a receiver index taken from an incoming packet (all 32 bits; the low
    /// 8 are the session and are ignored here).
    #[inline]
    pub fn by_receiver_index(&self, receiver_index: u32) -> Option<&Arc<Peer>> {
        self.get(*self.by_index.get(&(receiver_index >> 8))?)
    }

    /// All peers, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.slots.iter().flatten()
    }

    /// Ids of all peers.
    pub fn ids(&self) -> Vec<PeerId> {
        self.iter().map(|p| p.id).collect()
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    fn allocate_index(&mut self) -> u32 {
        loop {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let candidate = (self.rng >> 20) as u32 & INDEX_MASK;
            if candidate != 0 && !self.by_index.contains_key(&candidate) {
                return candidate;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mk_peer(table: &mut PeerTable, key_byte: u8) -> PeerId {
        table.insert([key_byte; 32], |_| PeerState::new(None, None, 0))
    }

    #[test]
    fn peers_are_found_by_id_key_and_receiver_index() {
        let mut t = PeerTable::new(42);
        let a = mk_peer(&mut t, 1);
        let b = mk_peer(&mut t, 2);
        assert_ne!(a, b);
        let pa = t.get(a).unwrap().clone();
        assert_eq!(pa.public_key, [1; 32]);
        assert_eq!(t.by_key(&[2; 32]).unwrap().id, b);
        // Session indices are index << 8 | session; any session routes to the peer.
        for session in [0u32, 1, 255] {
            assert_eq!(t.by_receiver_index(pa.index << 8 | session).unwrap().id, a);
        }
        assert!(t.by_receiver_index(0).is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn inserting_a_known_key_returns_the_same_peer() {
        let mut t = PeerTable::new(7);
        let a = mk_peer(&mut t, 1);
        let index = t.get(a).unwrap().index;
        assert_eq!(mk_peer(&mut t, 1), a);
        assert_eq!(t.get(a).unwrap().index, index);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn removal_frees_key_index_and_slot() {
        let mut t = PeerTable::new(7);
        let a = mk_peer(&mut t, 1);
        let b = mk_peer(&mut t, 2);
        let index = t.get(a).unwrap().index;
        let removed = t.remove(a).unwrap();
        assert_eq!(removed.public_key, [1; 32]);
        assert!(t.get(a).is_none());
        assert!(t.by_key(&[1; 32]).is_none());
        assert!(t.by_receiver_index(index << 8).is_none());
        assert!(t.remove(a).is_none());
        assert_eq!(t.ids(), vec![b]);
        // The slot is reused, the peer behind it is new.
        let c = mk_peer(&mut t, 3);
        assert_eq!(c, a);
        assert_eq!(t.get(c).unwrap().public_key, [3; 32]);
    }

    #[test]
    fn receiver_indices_are_unique_24_bit_and_nonzero() {
        let mut t = PeerTable::new(99);
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            let id = t.insert(key, |_| PeerState::new(None, None, 0));
            let index = t.get(id).unwrap().index;
            assert!(index != 0 && index <= INDEX_MASK);
            assert!(seen.insert(index), "index {index} handed out twice");
        }
    }

    #[test]
    fn make_state_sees_the_allocated_index() {
        let mut t = PeerTable::new(5);
        let mut seen = None;
        let id = t.insert([9; 32], |index| {
            seen = Some(index);
            PeerState::new(None, None, 25)
        });
        assert_eq!(seen, Some(t.get(id).unwrap().index));
        assert_eq!(t.get(id).unwrap().lock().keepalive, 25);
    }
}
