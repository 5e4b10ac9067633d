//! The device's configuration vocabulary: changes to apply (`ConfigUpdate`) and the state to
//! report (`DeviceSnapshot`). Plain data, shared by the library API and the UAPI front end.

use ipnet::IpNet;
use std::net::SocketAddr;
use std::time::SystemTime;

/// A 32-byte Curve25519 key (private, public or preshared).
pub type Key = [u8; 32];

/// Changes to a device, applied in order as one transaction (the UAPI `set=1` operation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigUpdate {
    /// New private key; `Some([0; 32])` removes it.
    pub private_key: Option<Key>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    /// The peer's public key.
    pub public_key: Key,
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

/// The device as the UAPI `get=1` operation reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// The private key, if set.
    pub private_key: Option<Key>,
    /// The port the UDP socket is bound to.
    pub listen_port: u16,
    /// Firewall mark, 0 when unset.
    pub fwmark: u32,
    /// Peers, in table order.
    pub peers: Vec<PeerSnapshot>,
}

/// One peer's configuration and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// The peer's public key.
    pub public_key: Key,
    /// The preshared key, if any.
    pub preshared_key: Option<Key>,
    /// Current endpoint (IPv4 endpoints are shown as IPv4, never v4-mapped).
    pub endpoint: Option<SocketAddr>,
    /// Wall-clock time of the last handshake.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received, as on the wire.
    pub rx_bytes: u64,
    /// Bytes sent, as on the wire.
    pub tx_bytes: u64,
    /// Persistent keepalive interval in seconds, 0 for off.
    pub persistent_keepalive: u16,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
}
