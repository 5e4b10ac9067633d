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

/// Whether to clean the node: only on positive evidence that the DaemonSet is gone. The
/// watch is asked first (it saw the deletion even if the chart's RBAC went with it); when it
/// still shows the DaemonSet, a direct read decides. Anything uncertain keeps the node as it
/// is, which is the safe side: a kept configuration fails closed, a removed one would not.
pub fn should_clean(watched: Owner, read: impl FnOnce() -> Owner) -> bool {
    match watched {
        Owner::Gone | Owner::Deleting => true,
        Owner::Present | Owner::Unknown => matches!(read(), Owner::Gone | Owner::Deleting),
    }
}

/// The files an uninstall removes: the CNI configuration, host-local's allocations for the
/// wgmesh network, and the node's key file. Nothing else in those directories is touched.
pub fn files(
    cni_conf_dir: &Path,
    cni_conf_name: &str,
    ipam_data_dir: Option<&Path>,
    network: &str,
    state_dir: &Path,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    // host-local keeps one directory per network under its data dir.
    let ipam = ipam_data_dir
        .unwrap_or(Path::new("/var/lib/cni/networks"))
        .join(network);
    let files = vec![
        cni_conf_dir.join(cni_conf_name),
        state_dir.join(crate::key::KEY_FILE),
    ];
    (files, vec![ipam])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_deleted_daemonset_cleans_the_node() {
        for (watched, read, clean) in [
            (Owner::Gone, Owner::Unknown, true),
            (Owner::Deleting, Owner::Present, true),
            (Owner::Present, Owner::Gone, true),
            (Owner::Present, Owner::Deleting, true),
            (Owner::Present, Owner::Present, false),
            (Owner::Present, Owner::Unknown, false),
            (Owner::Unknown, Owner::Unknown, false),
            (Owner::Unknown, Owner::Gone, true),
        ] {
            assert_eq!(
                should_clean(watched, || read),
                clean,
                "watched {watched:?}, read {read:?}"
            );
        }
    }

    #[test]
    fn a_gone_daemonset_seen_by_the_watch_needs_no_api_call() {
        let mut asked = false;
        assert!(should_clean(Owner::Gone, || {
            asked = true;
            Owner::Unknown
        }));
        assert!(!asked);
    }

    #[test]
    fn the_files_removed_are_ours_only() {
        let (files, dirs) = super::files(
            Path::new("/etc/cni/net.d"),
            "10-wgmesh.conflist",
            Some(Path::new("/var/lib/cni/wgmesh")),
            "wgmesh",
            Path::new("/var/lib/wgmesh"),
        );
        assert_eq!(
            files,
            [
                PathBuf::from("/etc/cni/net.d/10-wgmesh.conflist"),
                PathBuf::from("/var/lib/wgmesh/wireguard-key.json")
            ]
        );
        assert_eq!(dirs, [PathBuf::from("/var/lib/cni/wgmesh/wgmesh")]);
        let (_, default_dirs) = super::files(Path::new("/c"), "x", None, "wgmesh", Path::new("/s"));
        assert_eq!(
            default_dirs,
            [PathBuf::from("/var/lib/cni/networks/wgmesh")]
        );
    }
}
