//! Pure wgmesh logic.
//!
//! - [`keys`]: WireGuard public keys: text form, refusing weak keys, duplicates.
//! - [`selector`]: Kubernetes label selectors as data.
//! - [`net`]: address families and CIDR parsing.

pub mod keys;
pub mod net;
pub mod selector;
