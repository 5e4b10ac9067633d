//! The mesh's health from what the API holds and what the agents answer: pure, so every
//! finding is tested without a cluster. [`assess`] turns a [`Snapshot`] into a [`Health`]:
//! per node, per pair, pools, rotations, plaintext, and the findings, each with what to do.

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use wgmesh_api::consts::condition;
use wgmesh_api::peer::{PathKind, PeerPath, RotationPhase};
use wgmesh_api::{ConditionStatus, Mesh, MeshPeer, MeshPeerReport, PodCIDRPool};

/// The path of a pair the node's report does not list yet.
pub const UNREPORTED: &str = "Unreported";
/// A handshake older than this is stale: the agents' own measure of a connected peer.
pub const STALE_HANDSHAKE_SECS: u64 = wgmesh_api::consts::CONNECTED_WITHIN_SECS;
/// A pool with less than this share of its subnets free is nearly exhausted.
pub const POOL_LOW_FRACTION: f64 = 0.1;

/// What an agent answered on its metrics endpoint (through the API server's node proxy).
#[derive(Debug, Clone, PartialEq)]
pub enum AgentProbe {
    /// It answered: its device state and per-peer handshake ages.
    Answered {
        device_up: bool,
        plaintext_peers: u64,
        /// Seconds since the last handshake, by peer name (peers with none are absent).
        handshake_ages: BTreeMap<String, u64>,
        /// The peers configured on its device, by name.
        configured_peers: BTreeSet<String>,
        /// The agent's clock minus this machine's, in seconds (from its HTTP `Date`).
        clock_offset: Option<i64>,
    },
    /// The request failed: the agent is down, or its node unreachable.
    Silent(String),
    /// Not asked (`--no-probe`, or no permission for `nodes/proxy`).
    Unknown(String),
}

/// Everything [`assess`] reads.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub meshes: Vec<Mesh>,
    pub peers: Vec<MeshPeer>,
    pub reports: Vec<MeshPeerReport>,
    pub pools: Vec<PodCIDRPool>,
    /// By node name.
    pub agents: BTreeMap<String, AgentProbe>,
    pub now: Timestamp,
    /// The namespace wgmesh is installed in, for the hints.
    pub namespace: String,
}

/// How bad a finding is: an error makes `status` exit non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Severity {
    Warning,
    Error,
}

/// One thing that is wrong, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub severity: Severity,
    /// `kind/name` of the object it is about.
    pub object: String,
    pub message: String,
    pub hint: String,
}

/// One node's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeHealth {
    pub name: String,
    pub ready: bool,
    pub reason: String,
    pub location: Option<String>,
    pub nat: Option<String>,
    pub key_generation: Option<i64>,
    pub rotation: Option<String>,
    /// `up`, `down` (device down), `silent`, `unknown`.
    pub agent: String,
    pub pod_cidrs: Vec<String>,
    pub peers_configured: Option<u32>,
    pub peers_connected: Option<u32>,
    pub path_summary: Option<String>,
}

/// The tunnel between two nodes, as the first of them sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PairHealth {
    pub from: String,
    pub to: String,
    pub path: String,
    pub via: Option<String>,
    /// Seconds since the last handshake: live from the agent, else from the report.
    pub handshake_age: Option<u64>,
    /// `fresh`, `stale`, `none` (no handshake yet), `plaintext` (host gateway).
    pub state: String,
}

/// A pool's free space.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolHealth {
    pub name: String,
    pub cidrs: Vec<String>,
    pub allocated: i64,
    pub free: i64,
    pub ready: bool,
}

/// A rotation in progress, or one that ended with laggards.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationHealth {
    pub node: String,
    pub phase: String,
    pub generation: i64,
    pub waiting_for: Vec<String>,
    pub laggards: Vec<String>,
}

/// The whole picture.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub mesh: Option<String>,
    pub mesh_ready: bool,
    pub mesh_reason: String,
    pub nodes: Vec<NodeHealth>,
    pub external_peers: Vec<NodeHealth>,
    pub pairs: Vec<PairHealth>,
    pub pools: Vec<PoolHealth>,
    pub rotations: Vec<RotationHealth>,
    /// Pairs routed in the clear.
    pub plaintext: Vec<String>,
    pub findings: Vec<Finding>,
    pub healthy: bool,
}

fn find_condition<'a>(
    conds: &'a [wgmesh_api::Condition],
    type_: &str,
) -> Option<&'a wgmesh_api::Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

fn age(now: Timestamp, then: Timestamp) -> u64 {
    u64::try_from(now.duration_since(then).as_secs()).unwrap_or(0)
}

/// Assesses the mesh.
pub fn assess(snap: &Snapshot) -> Health {
    let ns = &snap.namespace;
    let mut findings = Vec::new();
    let mut push = |severity, object: String, message: String, hint: &str| {
        findings.push(Finding {
            severity,
            object,
            message,
            hint: hint.to_owned(),
        });
    };

    let mesh = snap.meshes.first();
    let (mesh_ready, mesh_reason) = match mesh {
        None => {
            push(
                Severity::Error,
                "Mesh".into(),
                "there is no Mesh object".into(),
                "install the chart (it creates the Mesh), or apply one: see docs/api.md",
            );
            (false, "Missing".to_owned())
        }
        Some(m) => {
            let conds = m.status.as_ref().map(|s| s.conditions.as_slice());
            match conds.and_then(|c| find_condition(c, condition::READY)) {
                Some(c) if c.status == ConditionStatus::True => (true, c.reason.clone()),
                Some(c) => {
                    push(
                        Severity::Error,
                        format!("mesh/{}", m.metadata.name.as_deref().unwrap_or("")),
                        format!("not Ready ({}): {}", c.reason, c.message),
                        "fix the Mesh's settings as the message says: kubectl describe mesh",
                    );
                    (false, c.reason.clone())
                }
                None => {
                    push(
                        Severity::Error,
                        format!("mesh/{}", m.metadata.name.as_deref().unwrap_or("")),
                        "has no Ready condition: the operator has not seen it".into(),
                        &format!(
                            "check the operator: kubectl -n {ns} get pods; kubectl -n {ns} logs deploy/wgmesh-operator"
                        ),
                    );
                    (false, "Unknown".to_owned())
                }
            }
        }
    };
    if snap.meshes.len() > 1 {
        push(
            Severity::Warning,
            "Mesh".into(),
            format!(
                "{} Mesh objects; the operator uses the one named `default`",
                snap.meshes.len()
            ),
            "delete the others",
        );
    }
    let keepalive = mesh
        .and_then(|m| m.spec.persistent_keepalive)
        .is_some_and(|k| k > 0);

    let reports: BTreeMap<&str, &MeshPeerReport> = snap
        .reports
        .iter()
        .filter_map(|r| Some((r.metadata.name.as_deref()?, r)))
        .collect();

    let mut nodes = Vec::new();
    let mut external_peers = Vec::new();
    let mut rotations = Vec::new();
    for peer in &snap.peers {
        let name = peer.metadata.name.clone().unwrap_or_default();
        let status = peer.status.clone().unwrap_or_default();
        let ready_cond = find_condition(&status.conditions, condition::READY);
        let ready = ready_cond.is_some_and(|c| c.status == ConditionStatus::True);
        let reason = ready_cond.map_or_else(|| "Pending".to_owned(), |c| c.reason.clone());
        let approved = status.approved.clone().unwrap_or_default();
        let is_node = peer.spec.node.is_some();
        let object = format!("meshpeer/{name}");
        if !ready {
            let message = ready_cond.map_or_else(
                || "not Ready: the operator has not approved it yet".to_owned(),
                |c| format!("not Ready ({}): {}", c.reason, c.message),
            );
            push(
                Severity::Error,
                object.clone(),
                message,
                &format!("kubectl describe meshpeer {name}"),
            );
        }
        let report = reports.get(name.as_str());
        let connectivity = report.and_then(|r| r.spec.connectivity.clone());
        let agent = if is_node {
            match snap.agents.get(&name) {
                Some(AgentProbe::Answered {
                    device_up: true, ..
                }) => "up".to_owned(),
                Some(AgentProbe::Answered { .. }) => {
                    push(
                        Severity::Error,
                        object.clone(),
                        "the agent answers but its WireGuard device is down".into(),
                        &format!(
                            "read the agent's log on {name}: kubectl -n {ns} get pods -o wide --field-selector spec.nodeName={name}, then kubectl -n {ns} logs POD"
                        ),
                    );
                    "down".to_owned()
                }
                Some(AgentProbe::Silent(why)) => {
                    push(
                        Severity::Error,
                        object.clone(),
                        format!("the agent does not answer: {why}"),
                        &format!(
                            "check the agent pod on {name}: kubectl -n {ns} get pods -o wide --field-selector spec.nodeName={name}"
                        ),
                    );
                    "silent".to_owned()
                }
                Some(AgentProbe::Unknown(_)) | None => "unknown".to_owned(),
            }
        } else {
            "-".to_owned()
        };
        if let Some(rot) = &status.rotation {
            let in_progress =
                matches!(rot.phase, RotationPhase::Prepared | RotationPhase::Switched);
            if in_progress || !rot.laggards.is_empty() {
                rotations.push(RotationHealth {
                    node: name.clone(),
                    phase: rot.phase.as_str().to_owned(),
                    generation: rot.generation,
                    waiting_for: rot.waiting_for.clone(),
                    laggards: rot.laggards.clone(),
                });
            }
            if rot.phase == RotationPhase::Abandoned {
                push(
                    Severity::Warning,
                    object.clone(),
                    format!(
                        "its key rotation to generation {} was abandoned",
                        rot.generation
                    ),
                    &format!(
                        "kubectl describe meshpeer {name}; request it again with kubectl wgmesh rotate {name}"
                    ),
                );
            }
            if !rot.laggards.is_empty() {
                push(
                    Severity::Warning,
                    object.clone(),
                    format!(
                        "its last key rotation left laggards: {}",
                        rot.laggards.join(", ")
                    ),
                    "the laggards' agents were stopped or cut off from the API; check them with kubectl wgmesh status",
                );
            }
        }
        if let Some(c) = find_condition(&status.conditions, condition::PLAINTEXT_FALLBACK)
            && c.status == ConditionStatus::True
        {
            push(
                Severity::Error,
                object.clone(),
                format!("routes traffic in the clear: {}", c.message),
                &format!("its WireGuard device is down; read the agent's log on {name}"),
            );
        }
        let line = NodeHealth {
            name: name.clone(),
            ready,
            reason,
            location: approved.location.clone(),
            nat: approved.nat.map(|n| n.as_str().to_owned()),
            key_generation: status.key_generation.or(approved.key_generation),
            rotation: status
                .rotation
                .as_ref()
                .map(|r| r.phase.as_str().to_owned()),
            agent,
            pod_cidrs: peer.spec.pod_cidrs.clone(),
            peers_configured: connectivity.as_ref().map(|c| c.peers_configured),
            peers_connected: connectivity.as_ref().map(|c| c.peers_connected),
            path_summary: report.and_then(|r| r.spec.path_summary.clone()),
        };
        if is_node {
            if report.is_none() && ready {
                push(
                    Severity::Warning,
                    object.clone(),
                    "its agent has written no MeshPeerReport yet".into(),
                    "a new agent writes it after its first pass; if it stays missing, read the agent's log",
                );
            }
            nodes.push(line);
        } else {
            external_peers.push(line);
        }
    }

    // Pairs: every ordered pair of nodes. The path from the node's report (written on
    // change, at most once a minute: a new peer may not be in it yet), the handshake live
    // from the agent when it answered, else from the report.
    let node_names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let mut pairs = Vec::new();
    let mut plaintext = Vec::new();
    for node in &mut nodes {
        let report_paths: BTreeMap<&str, &PeerPath> = reports
            .get(node.name.as_str())
            .map(|r| r.spec.paths.iter().map(|p| (p.peer.as_str(), p)).collect())
            .unwrap_or_default();
        let live = match snap.agents.get(&node.name) {
            Some(AgentProbe::Answered {
                handshake_ages,
                configured_peers,
                ..
            }) => Some((handshake_ages, configured_peers)),
            _ => None,
        };
        if let Some((ages, configured)) = live {
            // The device's own counts, fresher than the report's.
            node.peers_configured = Some(u32::try_from(configured.len()).unwrap_or(u32::MAX));
            let connected = ages
                .values()
                .filter(|a| **a <= STALE_HANDSHAKE_SECS)
                .count();
            node.peers_connected = Some(u32::try_from(connected).unwrap_or(u32::MAX));
            let missing: Vec<&str> = node_names
                .iter()
                .filter(|o| **o != node.name && !configured.contains(*o))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                push(
                    Severity::Warning,
                    format!("meshpeer/{}", node.name),
                    format!("its device does not have {} configured", missing.join(", ")),
                    "a new or rotating peer is configured within a pass; if it persists, read the agent's log",
                );
            }
        }
        for other in node_names.iter().filter(|o| **o != node.name) {
            let reported = report_paths.get(other.as_str());
            let handshake_age = match live {
                Some((ages, _)) => ages.get(other).copied(),
                None => reported
                    .and_then(|p| p.latest_handshake.as_ref())
                    .map(|t| age(snap.now, t.0)),
            };
            let path = reported.map_or(UNREPORTED, |p| p.path.as_str());
            let state = if path == PathKind::HostGateway.as_str() {
                plaintext.push(format!("{} → {other}", node.name));
                "plaintext"
            } else {
                match handshake_age {
                    None => "none",
                    Some(a) if a > STALE_HANDSHAKE_SECS => "stale",
                    Some(_) => "fresh",
                }
            };
            if state == "stale" && keepalive {
                push(
                    Severity::Error,
                    format!("meshpeer/{}", node.name),
                    format!(
                        "no handshake with {other} for {}s although the mesh sends keepalives",
                        handshake_age.unwrap_or(0)
                    ),
                    "the path between the two is broken: check the endpoints (kubectl get meshpeers -o wide), firewalls on UDP and the path in kubectl get meshpeerreports",
                );
            }
            pairs.push(PairHealth {
                from: node.name.clone(),
                to: other.clone(),
                path: path.to_owned(),
                via: reported.and_then(|p| p.via.clone()),
                handshake_age,
                state: state.to_owned(),
            });
        }
    }

    let mut pools = Vec::new();
    for pool in &snap.pools {
        let name = pool.metadata.name.clone().unwrap_or_default();
        let status = pool.status.clone().unwrap_or_default();
        let ready = find_condition(&status.conditions, condition::READY)
            .is_some_and(|c| c.status == ConditionStatus::True);
        let allocated = status.allocated.as_ref().map_or(0, |c| c.total);
        let free = status.free.as_ref().map_or(0, |c| c.total);
        let object = format!("podcidrpool/{name}");
        if let Some(c) = find_condition(&status.conditions, condition::CAPACITY)
            && c.status == ConditionStatus::False
        {
            push(
                Severity::Error,
                object.clone(),
                format!("out of subnets ({}): {}", c.reason, c.message),
                "add a CIDR to the pool's spec.cidrs, or another pool",
            );
        } else if !ready {
            push(
                Severity::Error,
                object.clone(),
                "not Ready".into(),
                &format!("kubectl describe podcidrpool {name}"),
            );
        } else if (free as f64) < POOL_LOW_FRACTION * ((free + allocated) as f64) {
            push(
                Severity::Warning,
                object.clone(),
                format!("nearly exhausted: {free} subnets free, {allocated} allocated"),
                "add a CIDR to the pool's spec.cidrs before new nodes find none",
            );
        }
        pools.push(PoolHealth {
            name,
            cidrs: pool.spec.cidrs.clone(),
            allocated,
            free,
            ready,
        });
    }

    findings.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.object.cmp(&b.object)));
    let healthy = !findings.iter().any(|f| f.severity == Severity::Error);
    Health {
        mesh: mesh.and_then(|m| m.metadata.name.clone()),
        mesh_ready,
        mesh_reason,
        nodes,
        external_peers,
        pairs,
        pools,
        rotations,
        plaintext,
        findings,
        healthy,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn now() -> Timestamp {
        "2026-12-01T12:00:00Z".parse().expect("a time")
    }

    fn ready(reason: &str) -> serde_json::Value {
        json!([{"type": "Ready", "status": "True", "reason": reason, "message": "ok",
                "lastTransitionTime": "2026-12-01T11:00:00Z"}])
    }

    fn node(name: &str, location: &str) -> MeshPeer {
        serde_json::from_value(json!({
            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshPeer",
            "metadata": {"name": name, "uid": format!("uid-{name}")},
            "spec": {"node": name, "podCIDRs": [format!("10.244.{}.0/24", name.len())]},
            "status": {"conditions": ready("Approved"), "keyGeneration": 1,
                       "approved": {"location": location, "nat": "Public"}}
        }))
        .expect("a MeshPeer")
    }

    fn report(name: &str, peers: &[(&str, &str)]) -> MeshPeerReport {
        let paths: Vec<_> = peers
            .iter()
            .map(|(p, kind)| json!({"peer": p, "path": kind, "latestHandshake": "2026-12-01T11:59:30Z"}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshPeerReport",
            "metadata": {"name": name},
            "spec": {"paths": paths, "pathSummary": format!("{} Direct", peers.len()),
                     "connectivity": {"peersConfigured": peers.len(), "peersConnected": peers.len()}}
        }))
        .expect("a report")
    }

    fn mesh(keepalive: Option<u16>) -> Mesh {
        let mut m: Mesh = serde_json::from_value(json!({
            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "Mesh",
            "metadata": {"name": "default"}, "spec": {},
            "status": {"conditions": ready("Valid")}
        }))
        .expect("a Mesh");
        m.spec.persistent_keepalive = keepalive;
        m
    }

    fn pool(free: i64, allocated: i64) -> PodCIDRPool {
        serde_json::from_value(json!({
            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "PodCIDRPool",
            "metadata": {"name": "pods"},
            "spec": {"cidrs": ["10.244.0.0/16"], "nodePrefixLength": {"ipv4": 24}},
            "status": {"conditions": ready("Valid"), "free": {"total": free},
                       "allocated": {"total": allocated}}
        }))
        .expect("a pool")
    }

    fn answered(ages: &[(&str, u64)]) -> AgentProbe {
        AgentProbe::Answered {
            device_up: true,
            plaintext_peers: 0,
            handshake_ages: ages.iter().map(|(p, a)| ((*p).to_owned(), *a)).collect(),
            configured_peers: ages.iter().map(|(p, _)| (*p).to_owned()).collect(),
            clock_offset: Some(0),
        }
    }

    /// Three healthy nodes in two locations, every agent answering.
    pub(crate) fn healthy_snapshot() -> Snapshot {
        let names = ["node-1", "node-2", "node-3"];
        Snapshot {
            meshes: vec![mesh(None)],
            peers: vec![
                node("node-1", "eu"),
                node("node-2", "eu"),
                node("node-3", "us"),
            ],
            reports: names
                .iter()
                .map(|n| {
                    let others: Vec<(&str, &str)> = names
                        .iter()
                        .filter(|o| *o != n)
                        .map(|o| (*o, "Direct"))
                        .collect();
                    report(n, &others)
                })
                .collect(),
            pools: vec![pool(250, 3)],
            agents: names
                .iter()
                .map(|n| {
                    let others: Vec<(&str, u64)> =
                        names.iter().filter(|o| *o != n).map(|o| (*o, 20)).collect();
                    ((*n).to_owned(), answered(&others))
                })
                .collect(),
            now: now(),
            namespace: "wgmesh-system".into(),
        }
    }

    #[test]
    fn a_healthy_mesh_has_no_findings() {
        let h = assess(&healthy_snapshot());
        assert!(h.healthy, "{:?}", h.findings);
        assert!(h.findings.is_empty(), "{:?}", h.findings);
        assert_eq!(h.nodes.len(), 3);
        assert_eq!(h.pairs.len(), 6);
        assert!(
            h.pairs
                .iter()
                .all(|p| p.state == "fresh" && p.handshake_age == Some(20))
        );
        assert!(h.nodes.iter().all(|n| n.agent == "up"));
        assert_eq!(h.pools[0].free, 250);
    }

    #[test]
    fn a_silent_agent_is_an_error_naming_its_node() {
        let mut s = healthy_snapshot();
        s.agents.insert(
            "node-2".into(),
            AgentProbe::Silent("connection refused".into()),
        );
        let h = assess(&s);
        assert!(!h.healthy);
        let f = &h.findings[0];
        assert_eq!(f.severity, Severity::Error);
        assert_eq!(f.object, "meshpeer/node-2");
        assert!(f.message.contains("does not answer"), "{}", f.message);
        assert!(f.hint.contains("spec.nodeName=node-2"), "{}", f.hint);
        // Without live ages the report's handshake times count: 30 s before `now`.
        assert!(
            h.pairs
                .iter()
                .filter(|p| p.from == "node-2")
                .all(|p| p.handshake_age == Some(30))
        );
    }

    #[test]
    fn an_agent_not_asked_is_no_finding() {
        let mut s = healthy_snapshot();
        for a in s.agents.values_mut() {
            *a = AgentProbe::Unknown("not asked".into());
        }
        let h = assess(&s);
        assert!(h.healthy && h.findings.is_empty(), "{:?}", h.findings);
        assert!(h.nodes.iter().all(|n| n.agent == "unknown"));
    }

    #[test]
    fn a_stale_handshake_is_an_error_only_where_keepalives_flow() {
        let mut s = healthy_snapshot();
        s.agents.insert(
            "node-1".into(),
            answered(&[("node-2", 20), ("node-3", 900)]),
        );
        let h = assess(&s);
        assert!(h.healthy, "an idle tunnel has no handshake to refresh it");
        assert!(
            h.pairs
                .iter()
                .any(|p| p.from == "node-1" && p.to == "node-3" && p.state == "stale")
        );
        s.meshes = vec![mesh(Some(25))];
        let h = assess(&s);
        assert!(!h.healthy);
        assert!(
            h.findings[0]
                .message
                .contains("no handshake with node-3 for 900s"),
            "{:?}",
            h.findings
        );
    }

    #[test]
    fn not_ready_peers_rotations_plaintext_and_pools_are_findings() {
        let mut s = healthy_snapshot();
        let st = s.peers[2].status.as_mut().expect("status");
        st.conditions[0].status = ConditionStatus::False;
        st.conditions[0].reason = "KeyMissing".into();
        st.rotation = Some(wgmesh_api::peer::KeyRotationStatus {
            phase: RotationPhase::Completed,
            generation: 2,
            laggards: vec!["node-1".into()],
            ..Default::default()
        });
        let st = s.peers[0].status.as_mut().expect("status");
        st.rotation = Some(wgmesh_api::peer::KeyRotationStatus {
            phase: RotationPhase::Prepared,
            generation: 3,
            waiting_for: vec!["node-2".into()],
            ..Default::default()
        });
        s.reports[0].spec.paths[0].path = PathKind::HostGateway;
        s.pools = vec![pool(2, 98)];
        let h = assess(&s);
        assert!(!h.healthy);
        let says = |obj: &str, what: &str| {
            h.findings
                .iter()
                .any(|f| f.object == obj && f.message.contains(what))
        };
        assert!(
            says("meshpeer/node-3", "not Ready (KeyMissing)"),
            "{:?}",
            h.findings
        );
        assert!(
            says("meshpeer/node-3", "laggards: node-1"),
            "{:?}",
            h.findings
        );
        assert!(
            says("podcidrpool/pods", "nearly exhausted"),
            "{:?}",
            h.findings
        );
        assert_eq!(h.rotations.len(), 2);
        assert_eq!(h.rotations[0].waiting_for, vec!["node-2".to_owned()]);
        assert_eq!(h.plaintext, vec!["node-1 → node-2".to_owned()]);
        // Errors first.
        assert_eq!(h.findings[0].severity, Severity::Error);
    }

    #[test]
    fn a_report_not_written_yet_leaves_no_pair_out() {
        let mut s = healthy_snapshot();
        // node-1 reported before it had peers (the next write comes within a minute).
        s.reports[0].spec.paths.clear();
        let h = assess(&s);
        assert!(h.healthy && h.findings.is_empty(), "{:?}", h.findings);
        let from_1: Vec<_> = h.pairs.iter().filter(|p| p.from == "node-1").collect();
        assert_eq!(from_1.len(), 2);
        assert!(
            from_1
                .iter()
                .all(|p| p.path == UNREPORTED && p.state == "fresh")
        );
        // The device's counts come from the agent, not the stale report.
        assert_eq!(h.nodes[0].peers_configured, Some(2));
        // A peer missing on the device is a warning.
        if let Some(AgentProbe::Answered {
            configured_peers, ..
        }) = s.agents.get_mut("node-3")
        {
            configured_peers.remove("node-1");
        }
        let h = assess(&s);
        assert!(h.healthy);
        assert!(h.findings.iter().any(|f| f.object == "meshpeer/node-3"
            && f.message.contains("does not have node-1 configured")));
    }

    #[test]
    fn no_mesh_is_an_error() {
        let mut s = healthy_snapshot();
        s.meshes.clear();
        let h = assess(&s);
        assert!(!h.healthy);
        assert!(h.findings.iter().any(|f| f.message.contains("no Mesh")));
    }
}
