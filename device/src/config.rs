//! The device's configuration vocabulary: changes to apply (`ConfigUpdate`) and the state to
//! report (`DeviceSnapshot`). Plain data, shared by the library API and the UAPI front end.
//!
//! Private keys travel only as [`PrivateKey`], which zeroizes its bytes when dropped and never
//! shows them in `Debug`. A snapshot carries no private key at all: it is copied and kept
//! around by callers (metrics, status, rotation), so it names the device by its public key.

use ipnet::IpNet;
use std::net::SocketAddr;
use std::time::SystemTime;
use zeroize::Zeroizing;

/// A 32-byte Curve25519 key (public or preshared; private keys are [`PrivateKey`]).
pub type Key = [u8; 32];

/// A Curve25519 private key: zeroized on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(Zeroizing<Key>);

impl PrivateKey {
    /// The key with these bytes. All zeros means "no key" in a [`ConfigUpdate`].
    pub fn from_bytes(bytes: Key) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key's bytes; copy them only into a zeroizing type.
    pub fn as_bytes(&self) -> &Key {
        &self.0
    }

    /// Whether this is the all-zeros "remove the key" value.
    pub fn is_zero(&self) -> bool {
        *self.0 == [0; 32]
    }

    /// The public half.
    pub fn public_key(&self) -> Key {
        let secret = x25519_dalek::StaticSecret::from(*self.0);
        x25519_dalek::PublicKey::from(&secret).to_bytes()
    }
}

impl From<Key> for PrivateKey {
    fn from(bytes: Key) -> Self {
        Self::from_bytes(bytes)
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// Changes to a device, applied in order as one transaction (the UAPI `set=1` operation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigUpdate {
    /// New private key; `Some([0; 32])` removes it (and every extra key with it). The device
    /// initiates handshakes only with this key, its primary. Switching to a key that is
    /// currently an extra makes the old primary an extra in its place (unless
    /// `extra_private_keys` says otherwise), keeping every session of both keys.
    pub private_key: Option<PrivateKey>,
    /// Additional private keys the device answers handshakes under, for a key rotation:
    /// `Some(vec![])` removes all, `None` leaves them. Keys equal to the primary are ignored;
    /// at most two are kept (the first two). Ignored while the device has no primary key.
    pub extra_private_keys: Option<Vec<PrivateKey>>,
    /// New listen port (0 picks a free one); rebinds the socket.
    pub listen_port: Option<u16>,
    /// New firewall mark for outgoing datagrams (0 clears it).
    pub fwmark: Option<u32>,
    /// Remove all peers before applying `peers`.
    pub replace_peers: bool,
    /// Per-peer changes, in order.
    pub peers: Vec<PeerUpdate>,
}

/// Changes to one peer, identified by its public key.
///
/// A peer is known under its primary key and, while it rotates, its next key; both find it,
/// and no two peers ever share a key: an update that would give a peer another peer's key is
/// refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    /// The peer's public key: its primary or its next key (a new peer gets it as primary).
    pub public_key: Key,
    /// Make this the peer's primary key. The peer keeps its id, allowed IPs, endpoint,
    /// counters and the sessions under keys it still has; if this is its next key, the next
    /// key is cleared (promotion).
    pub new_public_key: Option<Key>,
    /// `Some(Some(k))`: the peer's next key. Handshakes from `k` are accepted as this peer and
    /// new handshakes go to `k`. `Some(None)`: remove it and the sessions under it.
    pub next_public_key: Option<Option<Key>>,
    /// Remove the peer (everything else is ignored).
    pub remove: bool,
    /// Only update an existing peer; never create one.
    pub update_only: bool,
    /// New preshared key; `Some([0; 32])` removes it.
    pub preshared_key: Option<Key>,
    /// New endpoint.
    pub endpoint: Option<SocketAddr>,
    /// New persistent keepalive interval in seconds (0 turns it off).
    pub persistent_keepalive: Option<u16>,
    /// Drop the peer's allowed IPs before adding `allowed_ips`.
    pub replace_allowed_ips: bool,
    /// Allowed IPs to add.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerUpdate {
    /// An update that changes nothing about the peer with `public_key` (creating it if needed).
    pub fn new(public_key: Key) -> Self {
        Self {
            public_key,
            new_public_key: None,
            next_public_key: None,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// The device as the UAPI `get=1` operation reports it, without its private key (the UAPI
/// server reads that from the live device when it renders an answer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// The (primary) public key, if the device has a private key.
    pub public_key: Option<Key>,
    /// Public halves of the extra keys the device answers handshakes under (the private halves
    /// are never reported).
    pub extra_public_keys: Vec<Key>,
    /// The port the UDP socket is bound to.
    pub listen_port: u16,
    /// Firewall mark, 0 when unset.
    pub fwmark: u32,
    /// Handshake messages dropped by the per-source rate limit since the device started.
    pub handshakes_rate_limited: u64,
    /// Peers, in table order.
    pub peers: Vec<PeerSnapshot>,
}

/// One peer's configuration and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// The peer's (primary) public key.
    pub public_key: Key,
    /// The key the peer rotates to, if set.
    pub next_public_key: Option<Key>,
    /// The preshared key, if any.
    pub preshared_key: Option<Key>,
    /// Current endpoint (IPv4 endpoints are shown as IPv4, never v4-mapped).
    pub endpoint: Option<SocketAddr>,
    /// Wall-clock time of the last handshake (the newest over all session slots).
    pub last_handshake: Option<SystemTime>,
    /// Bytes received, as on the wire.
    pub rx_bytes: u64,
    /// Bytes sent, as on the wire.
    pub tx_bytes: u64,
    /// Persistent keepalive interval in seconds, 0 for off.
    pub persistent_keepalive: u16,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Session slots: one per pair of (local key, peer key) in use.
    pub sessions: Vec<SessionSnapshot>,
}

/// One session slot of a peer: the `Tunn` for one pair of (local key, remote key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSnapshot {
    /// The device's public key the slot uses.
    pub local_public_key: Key,
    /// The peer's public key the slot talks to.
    pub remote_public_key: Key,
    /// Wall time the slot's current session was established; `None` without a current session.
    pub established: Option<SystemTime>,
    /// Authenticated data packets (not keepalives, not handshakes) received on this slot.
    pub rx_data_packets: u64,
    /// Whether outgoing data uses this slot.
    pub active: bool,
}
