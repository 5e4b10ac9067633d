//! The WireGuard cross-platform userspace API: a Unix stream socket at
//! `<dir>/<interface>.sock` speaking the `get=1` / `set=1` protocol, so `wg(8)` and wg-quick
//! configure this device exactly as they configure wireguard-go.
//!
//! [`protocol`] is the pure text layer; [`server`] owns the socket and applies requests through
//! a [`crate::DeviceHandle`].

pub mod protocol;
pub mod server;

/// Where wireguard-go and `wg(8)` expect the sockets.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";
