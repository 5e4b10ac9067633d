//! The CNI network configuration the container runtime uses to plumb pods: the standard
//! reference plugins (`bridge` with `host-local` IPAM over the node's pod subnets,
//! `portmap`, `loopback`), written atomically so a runtime never reads half a file.
//!
//! The file itself lives in the agent's run directory (`/run/wgmesh`, a tmpfs), and the
//! runtime's configuration directory holds a symlink to it. A reboot empties the run
//! directory, so the link dangles and the runtime plumbs no pod (the node reports its
//! network not ready) until the agent has installed its blackhole routes and nftables rules
//! again and written the file anew: no pod packet leaves in the clear at boot, whatever
//! order the agent, the runtime and the API server come up in.

use ipnet::IpNet;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The CNI network's name: the conflist's `name`, and host-local's directory under its
/// data dir.
pub const NETWORK: &str = "wgmesh";

/// What the conflist is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniSettings {
    /// The network's name.
    pub network: String,
    /// The pod bridge's name.
    pub bridge: String,
    /// The node's pod subnets, one per family.
    pub subnets: Vec<IpNet>,
    /// The pods' MTU (the same as the WireGuard interface's).
    pub mtu: u32,
    /// Where host-local keeps its allocations; `None` for its default.
    pub ipam_data_dir: Option<PathBuf>,
}

/// The conflist as JSON.
pub fn conflist(s: &CniSettings) -> Value {
    let ranges: Vec<Value> = s
        .subnets
        .iter()
        .map(|net| json!([{ "subnet": net.trunc().to_string() }]))
        .collect();
    let routes: Vec<Value> = s
        .subnets
        .iter()
        .map(|net| match net {
            IpNet::V4(_) => json!({"dst": "0.0.0.0/0"}),
            IpNet::V6(_) => json!({"dst": "::/0"}),
        })
        .collect();
    let mut ipam = json!({
        "type": "host-local",
        "ranges": ranges,
        "routes": routes,
    });
    if let Some(dir) = &s.ipam_data_dir {
        ipam["dataDir"] = json!(dir);
    }
    json!({
        "cniVersion": "1.0.0",
        "name": s.network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": s.bridge,
                "isGateway": true,
                // The node masquerades traffic leaving the mesh itself; pod-to-pod traffic
                // keeps pod addresses.
                "ipMasq": false,
                "hairpinMode": true,
                "mtu": s.mtu,
                "ipam": ipam,
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            {"type": "loopback"},
        ]
    })
}

/// Writes `body` to `dir/name` atomically (temporary file, fsync, rename) unless the file
/// already holds exactly that. Returns whether it wrote.
pub fn write_atomic(dir: &Path, name: &str, body: &str) -> std::io::Result<bool> {
    let path = dir.join(name);
    if std::fs::read_to_string(&path).is_ok_and(|old| old == body) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    // A name runtimes ignore (they load *.conf, *.conflist, *.json).
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}

/// Writes the conflist `body` to `run_dir/name` (atomically, when it changed) and makes
/// `conf_dir/name` a symlink to it. The link is made again (a new link renamed over the old
/// one) whenever the file changed or the link is missing or points elsewhere: runtimes watch
/// their configuration directory, not the link's target, and reload on the rename. Returns
/// whether anything was written.
pub fn install(conf_dir: &Path, run_dir: &Path, name: &str, body: &str) -> std::io::Result<bool> {
    let target = run_dir.join(name);
    let wrote = write_atomic(run_dir, name, body)?;
    let link = conf_dir.join(name);
    let linked = std::fs::read_link(&link).is_ok_and(|t| t == target);
    if linked && !wrote {
        return Ok(false);
    }
    std::fs::create_dir_all(conf_dir)?;
    let tmp = conf_dir.join(format!(".{name}.link"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(&target, &tmp)?;
    std::fs::rename(&tmp, &link)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wgmesh-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_runtime_reads_the_file_through_a_link_that_dangles_once_the_run_dir_is_emptied() {
        let base = scratch("link");
        let (conf, run) = (base.join("net.d"), base.join("run"));
        let name = "10-wgmesh.conflist";
        // An older agent left a regular file: it becomes the link.
        std::fs::create_dir_all(&conf).expect("dir");
        std::fs::write(conf.join(name), "{\"old\":1}").expect("old file");
        assert!(install(&conf, &run, name, "{\"a\":1}").expect("install"));
        assert_eq!(
            std::fs::read_link(conf.join(name)).expect("link"),
            run.join(name)
        );
        assert_eq!(
            std::fs::read_to_string(conf.join(name)).expect("read"),
            "{\"a\":1}"
        );
        // Unchanged: nothing written, the link left alone.
        assert!(!install(&conf, &run, name, "{\"a\":1}").expect("install"));
        // Changed: the file and the link (the runtime's directory sees a rename).
        let before = std::fs::symlink_metadata(conf.join(name)).expect("meta");
        assert!(install(&conf, &run, name, "{\"a\":2}").expect("install"));
        let after = std::fs::symlink_metadata(conf.join(name)).expect("meta");
        use std::os::unix::fs::MetadataExt;
        assert_ne!(before.ino(), after.ino(), "the link is made anew");
        // A reboot empties the run directory: the runtime finds nothing to read.
        std::fs::remove_dir_all(&run).expect("reboot");
        assert!(std::fs::read_to_string(conf.join(name)).is_err());
        // The next install repairs it.
        assert!(install(&conf, &run, name, "{\"a\":2}").expect("install"));
        assert_eq!(
            std::fs::read_to_string(conf.join(name)).expect("read"),
            "{\"a\":2}"
        );
        let names: Vec<_> = std::fs::read_dir(&conf)
            .expect("dir")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary link left behind: {names:?}");
        std::fs::remove_dir_all(&base).ok();
    }

    #[test]
    fn a_dual_stack_node_gets_one_range_and_one_default_route_per_family() {
        let c = conflist(&CniSettings {
            network: "wgmesh".into(),
            bridge: "wgmesh-br".into(),
            subnets: vec![
                "10.244.3.0/24".parse().expect("net"),
                "fd00:10:244:3::/64".parse().expect("net"),
            ],
            mtu: 1420,
            ipam_data_dir: None,
        });
        let bridge = &c["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["mtu"], 1420);
        assert_eq!(
            bridge["ipam"]["ranges"],
            json!([[{"subnet": "10.244.3.0/24"}], [{"subnet": "fd00:10:244:3::/64"}]])
        );
        assert_eq!(
            bridge["ipam"]["routes"],
            json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
        );
        let types: Vec<&str> = c["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "loopback"]);
    }

    #[test]
    fn an_unchanged_file_is_not_rewritten() {
        let dir = std::env::temp_dir().join(format!("wgmesh-cni-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(write_atomic(&dir, "10-wgmesh.conflist", "{}").expect("write"));
        assert!(!write_atomic(&dir, "10-wgmesh.conflist", "{}").expect("write"));
        assert!(write_atomic(&dir, "10-wgmesh.conflist", "{\"a\":1}").expect("write"));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left behind: {names:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
