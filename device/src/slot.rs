//! Session slots: one `Tunn` per pair of (local key, remote key) of a peer, so that no packet is
//! lost while either side changes keys.
//!
//! A peer normally has one slot: (the device's primary key, the peer's key). During a key
//! rotation it may have one for every pair of a local key the device holds (the primary or an
//! extra) and a key the peer is known under (its primary or its next key). Each slot has its
//! own `Tunn` and its own 24-bit receiver index. This module owns the slots of one peer and
//! decides:
//!
//! * which slot outgoing data uses, the *active* slot: the one whose current session was
//!   established most recently, or the preferred slot when no slot has a session;
//! * which slot new handshakes start from, the *preferred* slot: (primary local key, the peer's
//!   next key if set, else its primary key);
//! * which slots go when key sets change ([`Slots::reconcile`]).
//!
//! It does no I/O and never touches the peer table: receiver indices come from and go back to
//! an [`IndexSource`] (the table, in the device). Callers hold the peer's mutex.

use super::config::{Key, PrivateKey};
use super::timers::{HandshakeTime, TIMER_TICK};
use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Extra local keys a device holds at most, besides its primary.
pub const MAX_EXTRA_KEYS: usize = 2;

/// Keys a peer is known under at most: its primary and its next key.
const MAX_REMOTE_KEYS: usize = 2;

/// Slots a peer has at most: every pair of a local and a remote key.
pub const MAX_SLOTS: usize = (1 + MAX_EXTRA_KEYS) * MAX_REMOTE_KEYS;

/// Sessions established closer together than this count as equally new: boringtun stamps a
/// session with the time of its last timer tick, so two handshakes in one tick look alike.
const SAME_TICK: Duration = Duration::from_millis(TIMER_TICK.as_millis() as u64 / 2);

/// One of the device's private keys, with the handshake rate limiter of that key (MAC1 is
/// keyed by the responder's public key, so each local key needs its own).
pub struct LocalKey {
    /// The private key.
    pub secret: StaticSecret,
    /// Its public half.
    pub public: PublicKey,
    /// Checks MAC1 of handshakes addressed to this key and demands cookies under load.
    pub limiter: Arc<RateLimiter>,
}

impl LocalKey {
    /// A key and a fresh limiter allowing `handshakes_per_second`.
    pub fn new(private: &PrivateKey, handshakes_per_second: u64) -> Self {
        let secret = StaticSecret::from(*private.as_bytes());
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, handshakes_per_second));
        Self {
            secret,
            public,
            limiter,
        }
    }

    /// The public key as bytes.
    pub fn public_bytes(&self) -> Key {
        self.public.to_bytes()
    }

    /// A zeroizing copy of the private key.
    pub fn private_key(&self) -> PrivateKey {
        PrivateKey::from_bytes(self.secret.to_bytes())
    }
}

impl std::fmt::Debug for LocalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("LocalKey")
            .field("public", &self.public.as_bytes())
            .finish_non_exhaustive()
    }
}

/// Hands out receiver indices that route to one peer, and takes them back.
pub trait IndexSource {
    /// A fresh 24-bit index, registered to the peer.
    fn allocate(&mut self) -> u32;
    /// Unregisters an index; packets carrying it are dropped from now on.
    fn release(&mut self, index: u32);
}

/// One session slot.
pub struct Slot {
    /// The device's public key this slot uses.
    pub local: Key,
    /// The peer's public key this slot talks to.
    pub remote: Key,
    /// The 24-bit receiver index; `Tunn` shifts it left by 8 for its sessions.
    pub index: u32,
    /// The noise state machine.
    pub tunn: Tunn,
    /// Authenticated data packets (not keepalives, not handshakes) received on this slot.
    pub rx_data_packets: u64,
    /// Wall-clock time the current session was established, kept stable between calls.
    established: HandshakeTime,
}

impl Slot {
    /// When the current session was established, as wall time, given what
    /// `Tunn::time_since_last_handshake` says at wall time `wall`; `None` without a session.
    pub fn established(&mut self, since: Option<Duration>, wall: SystemTime) -> Option<SystemTime> {
        let since = since?;
        self.established.observe(Some(since), wall)
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("index", &self.index)
            .field("rx_data_packets", &self.rx_data_packets)
            .finish_non_exhaustive()
    }
}

/// What a peer is known under and how its sessions are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteKeys {
    /// The peer's primary key.
    pub primary: Key,
    /// Its next key during its rotation.
    pub next: Option<Key>,
}

impl RemoteKeys {
    fn holds(&self, key: &Key) -> bool {
        self.primary == *key || self.next == Some(*key)
    }

    fn count(&self) -> usize {
        1 + usize::from(self.next.is_some())
    }

    /// The key new handshakes go to.
    pub fn preferred(&self) -> Key {
        self.next.unwrap_or(self.primary)
    }
}

/// Parameters every `Tunn` of a peer is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnParams {
    /// Preshared key.
    pub preshared_key: Option<Key>,
    /// Persistent keepalive in seconds, 0 for off.
    pub keepalive: u16,
}

/// The slots of one peer.
#[derive(Debug, Default)]
pub struct Slots {
    slots: Vec<Slot>,
    /// Position of the active slot; meaningful when there are slots.
    active: usize,
    /// Position of the preferred slot, if the device has a primary key.
    preferred: Option<usize>,
    /// Indices registered to the peer but not used by a slot yet, so that a slot can be created
    /// while the peer table is only read-locked (when a handshake arrives).
    spare: Vec<u32>,
}

impl Slots {
    /// No slots.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of slots.
    #[inline]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// All slots, in creation order.
    pub fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter()
    }

    /// All slots, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Slot> {
        self.slots.iter_mut()
    }

    /// The slot at `position`.
    #[inline]
    pub fn get_mut(&mut self, position: usize) -> Option<&mut Slot> {
        self.slots.get_mut(position)
    }

    /// Position of the active slot (outgoing data goes there), if any.
    #[inline]
    pub fn active(&self) -> Option<usize> {
        (self.active < self.slots.len()).then_some(self.active)
    }

    /// The active slot.
    #[inline]
    pub fn active_mut(&mut self) -> Option<&mut Slot> {
        self.slots.get_mut(self.active)
    }

    /// Position of the preferred slot (new handshakes start there), if any.
    #[inline]
    pub fn preferred(&self) -> Option<usize> {
        self.preferred
    }

    /// Indices registered for slots that do not exist yet.
    pub fn spare_indices(&self) -> &[u32] {
        &self.spare
    }

    /// Position of the slot with this 24-bit receiver index.
    #[inline]
    pub fn by_index(&self, index: u32) -> Option<usize> {
        // The active slot gets nearly all traffic; check it first.
        if self
            .slots
            .get(self.active)
            .is_some_and(|s| s.index == index)
        {
            return Some(self.active);
        }
        self.slots.iter().position(|s| s.index == index)
    }

    /// Position of the slot for this pair of keys.
    pub fn find(&self, local: &Key, remote: &Key) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.local == *local && s.remote == *remote)
    }

    /// Creates the slot for (`local`, `remote`) with a spare index; `None` if none is left (the
    /// pair was not expected: [`Slots::reconcile`] keeps one spare per missing pair). Does not
    /// change the active slot.
    pub fn create(&mut self, local: &LocalKey, remote: Key, params: TunnParams) -> Option<usize> {
        if self.slots.len() >= MAX_SLOTS {
            return None;
        }
        let index = self.spare.pop()?;
        self.slots.push(Slot {
            local: local.public_bytes(),
            remote,
            index,
            tunn: Tunn::new(
                local.secret.clone(),
                PublicKey::from(remote),
                params.preshared_key,
                (params.keepalive != 0).then_some(params.keepalive),
                index,
                Some(local.limiter.clone()),
            ),
            rx_data_packets: 0,
            established: HandshakeTime::default(),
        });
        Some(self.slots.len() - 1)
    }

    /// Makes the slots match the device's `keys` (primary first) and the peer's `remote` keys:
    /// drops slots of keys no longer held (their indices are released), creates the preferred
    /// slot, keeps one spare index for every other pair, and recomputes the active slot.
    pub fn reconcile(
        &mut self,
        keys: &[LocalKey],
        remote: RemoteKeys,
        params: TunnParams,
        indices: &mut dyn IndexSource,
    ) {
        let before = self.slots.len();
        self.slots.retain(|s| {
            let keep =
                remote.holds(&s.remote) && keys.iter().any(|k| *k.public.as_bytes() == s.local);
            if !keep {
                indices.release(s.index);
            }
            keep
        });
        if self.slots.len() != before {
            // Positions moved; `active` is recomputed below, but never leave it dangling.
            self.active = 0;
        }
        self.preferred = None;
        if let Some(primary) = keys.first() {
            let wanted = remote.preferred();
            let position = match self.find(primary.public.as_bytes(), &wanted) {
                Some(p) => Some(p),
                None => {
                    if self.spare.is_empty() {
                        self.spare.push(indices.allocate());
                    }
                    self.create(primary, wanted, params)
                }
            };
            self.preferred = position;
        }
        let need = keys.len() * remote.count();
        while self.slots.len() + self.spare.len() < need {
            self.spare.push(indices.allocate());
        }
        while self.slots.len() + self.spare.len() > need {
            let Some(index) = self.spare.pop() else {
                break;
            };
            indices.release(index);
        }
        self.recompute_active();
    }

    /// Drops every slot (releasing their indices) but keeps the spares; `reconcile` builds the
    /// preferred slot again.
    pub fn clear(&mut self, indices: &mut dyn IndexSource) {
        for s in self.slots.drain(..) {
            indices.release(s.index);
        }
        self.active = 0;
        self.preferred = None;
    }

    /// Every index this peer holds, in slots and spare; empties both.
    pub fn take_indices(&mut self) -> Vec<u32> {
        let mut all: Vec<u32> = self.slots.drain(..).map(|s| s.index).collect();
        all.append(&mut self.spare);
        self.active = 0;
        self.preferred = None;
        all
    }

    /// Picks the active slot again: the one whose current session is newest; on a tie the
    /// preferred slot, then the one already active; the preferred slot if no slot has a
    /// session. Reads the clock once per slot, so the datapath calls it only on events (a
    /// handshake completes, data arrives on another slot) and the timer on its tick.
    pub fn recompute_active(&mut self) {
        if self.slots.len() <= 1 {
            self.active = 0;
            return;
        }
        let mut since = [None::<Duration>; MAX_SLOTS];
        for (s, slot) in since.iter_mut().zip(&self.slots) {
            *s = slot.tunn.time_since_last_handshake();
        }
        let newest = since
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
            .min_by_key(|&(_, s)| s);
        self.active = match newest {
            None => self.preferred.unwrap_or(0),
            Some((best, best_since)) => {
                let as_new = |i: usize| {
                    since
                        .get(i)
                        .copied()
                        .flatten()
                        .is_some_and(|s| s <= best_since + SAME_TICK)
                };
                match self.preferred {
                    Some(p) if as_new(p) => p,
                    _ if as_new(self.active) => self.active,
                    _ => best,
                }
            }
        };
    }

    /// Whether the slot at `position` has a current session (reads the clock).
    pub fn has_session(&self, position: usize) -> bool {
        self.slots
            .get(position)
            .is_some_and(|s| s.tunn.time_since_last_handshake().is_some())
    }

    /// How long ago the newest current session of any slot was established.
    pub fn newest_session(&self) -> Option<Duration> {
        self.slots
            .iter()
            .filter_map(|s| s.tunn.time_since_last_handshake())
            .min()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeSet;

    /// Indices from a counter; remembers what is registered.
    #[derive(Default)]
    struct Counter {
        next: u32,
        live: BTreeSet<u32>,
    }

    impl IndexSource for Counter {
        fn allocate(&mut self) -> u32 {
            self.next += 1;
            self.live.insert(self.next);
            self.next
        }
        fn release(&mut self, index: u32) {
            assert!(self.live.remove(&index), "index {index} released twice");
        }
    }

    fn mk_key(b: u8) -> LocalKey {
        LocalKey::new(&PrivateKey::from_bytes([b; 32]), 100)
    }

    const PARAMS: TunnParams = TunnParams {
        preshared_key: None,
        keepalive: 0,
    };

    fn pairs(s: &Slots) -> Vec<(Key, Key)> {
        s.iter().map(|s| (s.local, s.remote)).collect()
    }

    #[test]
    fn one_key_each_side_is_one_slot_and_no_spare() {
        let keys = [mk_key(1)];
        let remote = RemoteKeys {
            primary: [9; 32],
            next: None,
        };
        let mut ix = Counter::default();
        let mut s = Slots::new();
        s.reconcile(&keys, remote, PARAMS, &mut ix);
        assert_eq!(pairs(&s), vec![(keys[0].public_bytes(), [9; 32])]);
        assert_eq!((s.active(), s.preferred()), (Some(0), Some(0)));
        assert!(s.spare_indices().is_empty());
        assert_eq!(ix.live.len(), 1);
        // Reconciling again changes nothing.
        let index = s.iter().next().unwrap().index;
        s.reconcile(&keys, remote, PARAMS, &mut ix);
        assert_eq!(s.iter().next().unwrap().index, index);
        assert_eq!(ix.live.len(), 1);
    }

    #[test]
    fn the_preferred_slot_goes_to_the_next_key_and_spares_cover_every_pair() {
        let keys = [mk_key(1), mk_key(2)];
        let remote = RemoteKeys {
            primary: [8; 32],
            next: Some([9; 32]),
        };
        let mut ix = Counter::default();
        let mut s = Slots::new();
        s.reconcile(&keys, remote, PARAMS, &mut ix);
        assert_eq!(pairs(&s), vec![(keys[0].public_bytes(), [9; 32])]);
        // 2 local x 2 remote pairs: one slot, three spares, all registered.
        assert_eq!(s.spare_indices().len(), 3);
        assert_eq!(ix.live.len(), 4);
        // A handshake to the extra key from the peer's primary creates its slot from a spare.
        let p = s.create(&keys[1], [8; 32], PARAMS).unwrap();
        assert_eq!(s.find(&keys[1].public_bytes(), &[8; 32]), Some(p));
        assert_eq!(s.by_index(s.iter().nth(p).unwrap().index), Some(p));
        assert_eq!(s.spare_indices().len(), 2);
        // The preferred slot stays active while no slot has a session.
        assert_eq!(s.active(), s.preferred());
    }

    #[test]
    fn slots_of_keys_no_longer_held_are_dropped_and_their_indices_released() {
        let (old, new) = (mk_key(1), mk_key(2));
        let mut ix = Counter::default();
        let mut s = Slots::new();
        let both = RemoteKeys {
            primary: [8; 32],
            next: Some([9; 32]),
        };
        let keys = [old, new];
        s.reconcile(&keys, both, PARAMS, &mut ix);
        s.create(&keys[1], [8; 32], PARAMS).unwrap();
        s.create(&keys[0], [8; 32], PARAMS).unwrap();
        assert_eq!(s.len(), 3);
        // The peer's next key becomes its primary; the device keeps only its new key.
        let [_, new] = keys;
        let promoted = RemoteKeys {
            primary: [9; 32],
            next: None,
        };
        s.reconcile(std::slice::from_ref(&new), promoted, PARAMS, &mut ix);
        assert_eq!(pairs(&s), vec![(new.public_bytes(), [9; 32])]);
        assert!(s.spare_indices().is_empty());
        let left: BTreeSet<u32> = s.iter().map(|s| s.index).collect();
        assert_eq!(ix.live, left, "dropped slots and spares are unregistered");
        assert_eq!((s.active(), s.preferred()), (Some(0), Some(0)));
    }

    #[test]
    fn without_a_private_key_there_are_no_slots() {
        let mut ix = Counter::default();
        let mut s = Slots::new();
        let remote = RemoteKeys {
            primary: [8; 32],
            next: None,
        };
        s.reconcile(&[mk_key(1)], remote, PARAMS, &mut ix);
        s.reconcile(&[], remote, PARAMS, &mut ix);
        assert!(s.is_empty());
        assert_eq!(s.preferred(), None);
        assert_eq!(s.active(), None);
        assert!(ix.live.is_empty());
        assert!(s.create(&mk_key(1), [8; 32], PARAMS).is_none(), "no spare");
    }

    #[test]
    fn take_indices_returns_slots_and_spares() {
        let mut ix = Counter::default();
        let mut s = Slots::new();
        let remote = RemoteKeys {
            primary: [8; 32],
            next: Some([7; 32]),
        };
        s.reconcile(&[mk_key(1)], remote, PARAMS, &mut ix);
        let all: BTreeSet<u32> = s.take_indices().into_iter().collect();
        assert_eq!(all, ix.live);
        assert!(s.is_empty() && s.spare_indices().is_empty());
    }
}
