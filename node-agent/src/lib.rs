//! wgmesh node agent: the node's keys, routes and CNI configuration, driven by the mesh's
//! custom resources, around the userspace WireGuard device of `wgmesh-device`; and the
//! commands the `wgmesh-agent` binary runs. Calls into the OS that the compiler cannot check
//! (the device's, `prctl`) live in `wgmesh-device`, behind safe functions.

#![forbid(unsafe_code)]

pub mod agent;
pub mod cni_install;
pub mod key;
