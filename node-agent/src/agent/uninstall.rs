//! Telling an uninstall from a restart, and what an uninstall removes from the node.
//!
//! A DaemonSet's pod gets the same SIGTERM when it is rolled to a new version, evicted,
//! restarted, or removed for good by `helm uninstall`. Only the last may take the node's
//! mesh configuration with it: on a restart the blackholes, the CNI configuration and the
//! key must stay so that pods keep failing closed and the next agent takes over. The agent
//! therefore watches its own DaemonSet and cleans the node only when that DaemonSet is gone
//! or being deleted. This module holds that decision (pure) and the list of what the node
//! holds of wgmesh's; the agent performs the removals.

use std::path::{Path, PathBuf};

/// What the agent knows of its DaemonSet at SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// It exists and is not being deleted: a restart or a rolling update.
    Present,
    /// It has a deletion timestamp.
    Deleting,
    /// The API server says it does not exist (or the watch saw it deleted).
    Gone,
    /// Not known: no DaemonSet configured, the watch never synced, or the API failed.
    Unknown,
}

/// Whether `owner` is positive evidence that the DaemonSet is gone: only that cleans the
/// node. The agent asks its watch first (it saw the deletion even if the chart's RBAC went
/// with it) and reads the API only when the watch does not show the DaemonSet gone.
/// Anything uncertain keeps the node as it is, which is the safe side: a kept
/// configuration fails closed, a removed one would not.
pub fn gone(owner: Owner) -> bool {
    matches!(owner, Owner::Gone | Owner::Deleting)
}

/// What an uninstall removes besides routes, links and the nftables table: the CNI
/// configuration, host-local's allocations for the wgmesh network, and the node's key.
/// Nothing else in those directories is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// The runtime's link to the conflist.
    pub conflist: PathBuf,
    /// The conflist itself, in the run directory.
    pub runtime_conflist: PathBuf,
    pub ipam_dir: PathBuf,
    pub key: PathBuf,
    /// The device's state saved for a restart.
    pub saved_device: PathBuf,
}

impl NodeFiles {
    pub fn new(
        cni_conf_dir: &Path,
        run_dir: &Path,
        cni_conf_name: &str,
        ipam_data_dir: Option<&Path>,
        network: &str,
        state_dir: &Path,
    ) -> NodeFiles {
        NodeFiles {
            conflist: cni_conf_dir.join(cni_conf_name),
            runtime_conflist: run_dir.join(cni_conf_name),
            // host-local keeps one directory per network under its data dir.
            ipam_dir: ipam_data_dir
                .unwrap_or(Path::new("/var/lib/cni/networks"))
                .join(network),
            key: state_dir.join(crate::key::KEY_FILE),
            saved_device: state_dir.join(super::resume::FILE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_deleted_daemonset_cleans_the_node() {
        for (owner, clean) in [
            (Owner::Gone, true),
            (Owner::Deleting, true),
            (Owner::Present, false),
            (Owner::Unknown, false),
        ] {
            assert_eq!(gone(owner), clean, "{owner:?}");
        }
    }

    #[test]
    fn the_files_removed_are_ours_only() {
        let files = NodeFiles::new(
            Path::new("/etc/cni/net.d"),
            Path::new("/run/wgmesh"),
            "10-wgmesh.conflist",
            Some(Path::new("/var/lib/cni/wgmesh")),
            "wgmesh",
            Path::new("/var/lib/wgmesh"),
        );
        assert_eq!(
            files,
            NodeFiles {
                conflist: PathBuf::from("/etc/cni/net.d/10-wgmesh.conflist"),
                runtime_conflist: PathBuf::from("/run/wgmesh/10-wgmesh.conflist"),
                ipam_dir: PathBuf::from("/var/lib/cni/wgmesh/wgmesh"),
                key: PathBuf::from("/var/lib/wgmesh/wireguard-key.json"),
                saved_device: PathBuf::from("/var/lib/wgmesh/device.json"),
            }
        );
        let default = NodeFiles::new(
            Path::new("/c"),
            Path::new("/r"),
            "x",
            None,
            "wgmesh",
            Path::new("/s"),
        );
        assert_eq!(
            default.ipam_dir,
            PathBuf::from("/var/lib/cni/networks/wgmesh")
        );
    }
}
