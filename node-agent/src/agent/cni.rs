//! The CNI network configuration the container runtime uses to plumb pods: the standard
//! reference plugins (`bridge` with `host-local` IPAM over the node's pod subnets,
//! `portmap`, `loopback`), written atomically so a runtime never reads half a file.

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

#[cfg(test)]
mod tests {
    use super::*;

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
