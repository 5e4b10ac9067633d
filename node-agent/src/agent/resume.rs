//! What the agent needs to bring the datapath back when it starts, before it has heard from
//! the API server: the device's peers and the routes through it, as the last pass applied
//! them, stored beside the key (`device.json` in the state directory). With it a restarted
//! agent has its device up, its peers configured and handshakes on their way within moments
//! of starting, while the API server may be slow or unreachable; the first full pass then
//! reconciles everything against the API as usual.
//!
//! Nothing in the file is secret (public keys, endpoints, addresses). It is only ever a
//! starting point: a peer it lists that the API no longer approves is removed by the first
//! pass, and a node subnet it routes is blackholed anyway.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::path::Path;
use wgmesh_core::topology::{DevicePeer, NextHop, NodePlan};

/// The file's name in the state directory.
pub const FILE: &str = "device.json";

/// The device as the last pass left it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    pub listen_port: u16,
    pub mtu: u32,
    pub peers: Vec<DevicePeer>,
    /// Destinations routed through the device.
    pub routes: Vec<IpNet>,
}

impl Saved {
    /// What `plan` puts on the device, with the device's port and MTU.
    pub fn of(plan: &NodePlan, listen_port: u16, mtu: u32) -> Saved {
        Saved {
            listen_port,
            mtu,
            peers: plan.device_peers.values().cloned().collect(),
            routes: plan
                .routes
                .iter()
                .filter(|r| r.via == NextHop::Device)
                .map(|r| r.dst)
                .collect(),
        }
    }

    /// A plan holding only the saved device peers (no routes, no transports), to configure
    /// the device with.
    pub fn device_plan(&self) -> NodePlan {
        NodePlan {
            device_peers: self
                .peers
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
            ..NodePlan::default()
        }
    }
}

/// Reads the saved device; `None` if there is none or it cannot be read (said in the log:
/// the agent then starts as on a new node).
pub fn load(dir: &Path) -> Option<Saved> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved device; starting without it");
            return None;
        }
    };
    match serde_json::from_str(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the saved device is malformed; starting without it");
            None
        }
    }
}

/// Stores `saved` atomically.
pub fn store(dir: &Path, saved: &Saved) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(saved).map_err(std::io::Error::other)?;
    super::cni::write_atomic(dir, FILE, &text).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgmesh_core::topology::{ROUTE_METRIC, Route};

    #[test]
    fn a_saved_plan_gives_back_its_device_peers_and_device_routes() {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        let peer = DevicePeer {
            name: "node-2".into(),
            public_key: "a2V5".into(),
            next_public_key: Some("bmV4dA==".into()),
            allowed_ips: vec![net("10.244.2.0/24")],
            endpoint: Some("198.18.0.12:51820".parse().expect("ep")),
            persistent_keepalive: 25,
        };
        let plan = NodePlan {
            device_peers: [("node-2".to_string(), peer.clone())].into(),
            routes: vec![
                Route {
                    dst: net("10.244.2.0/24"),
                    via: NextHop::Device,
                    metric: ROUTE_METRIC,
                },
                Route {
                    dst: net("10.244.0.0/16"),
                    via: NextHop::Blackhole,
                    metric: 4000,
                },
            ],
            ..NodePlan::default()
        };
        let saved = Saved::of(&plan, 51820, 1420);
        assert_eq!(
            saved.routes,
            vec![net("10.244.2.0/24")],
            "device routes only"
        );
        let dir = std::env::temp_dir().join(format!("wgmesh-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load(&dir), None, "nothing saved yet");
        store(&dir, &saved).expect("store");
        let back = load(&dir).expect("load");
        assert_eq!(back, saved);
        assert_eq!(back.device_plan().device_peers["node-2"], peer);
        std::fs::write(dir.join(FILE), "{").expect("corrupt");
        assert_eq!(load(&dir), None, "a malformed file is ignored");
        std::fs::remove_dir_all(&dir).ok();
    }
}
