//! wgmesh node agent: the userspace WireGuard device (datapath), its UAPI socket, and the
//! commands the `wgmesh-agent` binary runs.

pub mod agent;
pub mod cni_install;
pub mod device;
pub mod device_cmd;
pub mod key;
pub mod uapi;
