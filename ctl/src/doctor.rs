//! `kubectl wgmesh doctor`: checks beyond the mesh's health: the CRDs, the operator's
//! leadership, the agents' DaemonSet, MTU consistency, clocks. Pure: each check takes what
//! was read and returns findings; `status`'s findings are added by the command.

use crate::health::{Finding, Severity};
use wgmesh_api::mesh::Mtu;
use wgmesh_api::{Mesh, MeshPeer};
use wgmesh_core::topology;

/// The CRDs wgmesh needs, by name.
pub const CRDS: [&str; 4] = [
    "meshes.wgmesh.dev",
    "podcidrpools.wgmesh.dev",
    "meshpeers.wgmesh.dev",
    "meshpeerreports.wgmesh.dev",
];
/// The version every CRD must serve.
pub const VERSION: &str = "v1alpha1";
/// Clocks further apart than this are a finding: rotation compares the instant a user asks
/// with the instant a node created its key, and times out by the nodes' clocks.
pub const CLOCK_SKEW_WARN_SECS: i64 = 5;

fn finding(severity: Severity, object: &str, message: String, hint: String) -> Finding {
    Finding {
        severity,
        object: object.to_owned(),
        message,
        hint,
    }
}

/// What the API server says of one CRD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdState {
    pub name: String,
    pub established: bool,
    pub served: Vec<String>,
}

/// Every CRD present, established, serving [`VERSION`].
pub fn crds(found: &[CrdState]) -> Vec<Finding> {
    let mut out = Vec::new();
    for name in CRDS {
        let object = format!("crd/{name}");
        match found.iter().find(|c| c.name == name) {
            None => out.push(finding(
                Severity::Error,
                &object,
                "missing".into(),
                "apply wgmesh's CRDs: kubectl apply -f crds/ (Helm installs them only on first install)".into(),
            )),
            Some(c) if !c.established => out.push(finding(
                Severity::Error,
                &object,
                "not Established".into(),
                format!("kubectl describe crd {name}: the API server says why"),
            )),
            Some(c) if !c.served.iter().any(|v| v == VERSION) => out.push(finding(
                Severity::Error,
                &object,
                format!("does not serve {VERSION} (serves {})", c.served.join(", ")),
                "apply the CRDs of this version: kubectl apply -f crds/".into(),
            )),
            Some(_) => {}
        }
    }
    out
}

/// The operator's leader-election Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    pub name: String,
    pub holder: Option<String>,
    /// Seconds since it was last renewed.
    pub renewed_ago: Option<i64>,
    pub duration: Option<i64>,
}

/// A leader holds the Lease and renews it.
pub fn leader(lease: Option<&LeaseState>, namespace: &str) -> Vec<Finding> {
    let hint = format!(
        "check the operator: kubectl -n {namespace} get pods -l app.kubernetes.io/component=operator; kubectl -n {namespace} logs deploy/wgmesh-operator"
    );
    match lease {
        None => vec![finding(
            Severity::Error,
            "operator",
            format!("no leader-election Lease in {namespace}: the operator never ran there"),
            hint,
        )],
        Some(l) => match (&l.holder, l.renewed_ago) {
            (Some(_), Some(ago)) if ago <= 2 * l.duration.unwrap_or(15).max(1) => Vec::new(),
            (Some(h), ago) => vec![finding(
                Severity::Error,
                &format!("lease/{}", l.name),
                format!(
                    "the leader {h} has not renewed the Lease for {}: no operator is working",
                    ago.map_or("ever".to_owned(), |a| format!("{a}s"))
                ),
                hint,
            )],
            (None, _) => vec![finding(
                Severity::Error,
                &format!("lease/{}", l.name),
                "nobody holds the Lease: no operator is leading".into(),
                hint,
            )],
        },
    }
}

/// The agents' DaemonSet: scheduled and ready on every node it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSetState {
    pub name: String,
    pub desired: i32,
    pub ready: i32,
    pub updated: i32,
}

/// Every agent pod ready; `None`: the agents do not run as the chart's DaemonSet here.
pub fn agents(ds: Option<&DaemonSetState>, namespace: &str) -> Vec<Finding> {
    let Some(ds) = ds else {
        return vec![finding(
            Severity::Warning,
            "daemonset",
            format!(
                "no agent DaemonSet in {namespace} (label app.kubernetes.io/component=agent)"
            ),
            "if wgmesh was installed with Helm, pass its namespace with -n; agents run outside Kubernetes are checked through their metrics only".into(),
        )];
    };
    let mut out = Vec::new();
    if ds.ready < ds.desired {
        out.push(finding(
            Severity::Error,
            &format!("daemonset/{}", ds.name),
            format!("{} of {} agent pods ready", ds.ready, ds.desired),
            format!(
                "kubectl -n {namespace} get pods -l app.kubernetes.io/component=agent -o wide; describe the ones not ready"
            ),
        ));
    }
    if ds.updated < ds.desired {
        out.push(finding(
            Severity::Warning,
            &format!("daemonset/{}", ds.name),
            format!(
                "{} of {} agent pods run the current template",
                ds.updated, ds.desired
            ),
            format!(
                "a rollout is in progress: kubectl -n {namespace} rollout status ds/{}",
                ds.name
            ),
        ));
    }
    out
}

/// The tunnel MTU each node ends up with, and whether they agree. With a configured MTU,
/// a node whose underlay cannot carry it is an error; with `auto`, nodes whose MTUs differ
/// are a warning (a packet sized for one is dropped or fragmented by another).
pub fn mtu(mesh: Option<&Mesh>, peers: &[MeshPeer]) -> Vec<Finding> {
    let configured = match mesh.and_then(|m| m.spec.mtu) {
        Some(Mtu::Bytes(b)) => Some(u32::from(b)),
        _ => None,
    };
    let mut tunnel: Vec<(String, u32)> = Vec::new();
    let mut out = Vec::new();
    for p in peers.iter().filter(|p| p.spec.node.is_some()) {
        let name = p.metadata.name.clone().unwrap_or_default();
        let status = p.status.clone().unwrap_or_default();
        let Some(underlay) = status.underlay_mtu else {
            continue;
        };
        let v6 = status.endpoints.iter().any(|e| e.starts_with('['));
        // The MTU the agent's device takes on an `auto` mesh.
        let fits = topology::mtu(None, underlay, v6);
        let overhead = underlay - fits;
        if let Some(c) = configured
            && c > fits
        {
            out.push(finding(
                Severity::Error,
                &format!("meshpeer/{name}"),
                format!(
                    "the mesh's MTU {c} does not fit its underlay (MTU {underlay}, {overhead} bytes of WireGuard overhead: at most {fits})"
                ),
                format!("set Mesh spec.mtu to {fits} or less, or to auto"),
            ));
        }
        tunnel.push((name, configured.unwrap_or(fits)));
    }
    let min = tunnel.iter().map(|(_, m)| *m).min();
    let max = tunnel.iter().map(|(_, m)| *m).max();
    if let (Some(lo), Some(hi)) = (min, max)
        && lo != hi
    {
        let lows: Vec<&str> = tunnel
            .iter()
            .filter(|(_, m)| *m == lo)
            .map(|(n, _)| n.as_str())
            .collect();
        out.push(finding(
            Severity::Warning,
            "mesh",
            format!(
                "the nodes' tunnel MTUs differ ({lo} on {} … {hi}): large packets from one may not fit another",
                lows.join(", ")
            ),
            format!("set Mesh spec.mtu to {lo} so every node uses the same"),
        ));
    }
    out
}

/// Clocks: each node's offset from this machine, read from its agent's HTTP `Date`.
pub fn clocks(offsets: &[(String, i64)]) -> Vec<Finding> {
    offsets
        .iter()
        .filter(|(_, off)| off.abs() > CLOCK_SKEW_WARN_SECS)
        .map(|(node, off)| {
            finding(
                Severity::Warning,
                &format!("node/{node}"),
                format!(
                    "its clock is {}s {} this machine's",
                    off.abs(),
                    if *off > 0 { "ahead of" } else { "behind" }
                ),
                format!(
                    "run time synchronisation (chrony, systemd-timesyncd) on {node}; key rotation requests and timeouts compare clocks"
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, underlay: u32) -> MeshPeer {
        serde_json::from_value(json!({
            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshPeer",
            "metadata": {"name": name}, "spec": {"node": name},
            "status": {"underlayMTU": underlay, "endpoints": ["198.18.0.1:51820"]}
        }))
        .expect("a MeshPeer")
    }

    #[test]
    fn missing_unestablished_and_unserved_crds_are_errors() {
        let mut found: Vec<CrdState> = CRDS
            .iter()
            .map(|n| CrdState {
                name: (*n).into(),
                established: true,
                served: vec![VERSION.into()],
            })
            .collect();
        assert!(crds(&found).is_empty());
        found[1].established = false;
        found[2].served = vec!["v1beta9".into()];
        found.pop();
        let f = crds(&found);
        assert_eq!(f.len(), 3);
        assert!(
            f.iter()
                .any(|f| f.object == "crd/meshpeerreports.wgmesh.dev" && f.message == "missing")
        );
        assert!(f.iter().any(|f| f.message.contains("v1beta9")));
    }

    #[test]
    fn a_lease_nobody_renews_is_an_error() {
        let l = LeaseState {
            name: "wgmesh-operator".into(),
            holder: Some("op-1".into()),
            renewed_ago: Some(3),
            duration: Some(15),
        };
        assert!(leader(Some(&l), "ns").is_empty());
        let stale = LeaseState {
            renewed_ago: Some(300),
            ..l.clone()
        };
        assert!(leader(Some(&stale), "ns")[0].message.contains("300s"));
        assert_eq!(leader(None, "ns")[0].severity, Severity::Error);
    }

    #[test]
    fn mtus_that_differ_or_do_not_fit_are_findings() {
        let peers = vec![node("a", 1500), node("b", 1500)];
        assert!(mtu(None, &peers).is_empty());
        let peers = vec![node("a", 1500), node("b", 1400)];
        let f = mtu(None, &peers);
        assert_eq!(f.len(), 1);
        assert!(f[0].message.contains("1340 on b"), "{}", f[0].message);
        let mut m: Mesh = serde_json::from_value(json!({
            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "Mesh",
            "metadata": {"name": "default"}, "spec": {"mtu": 1420}
        }))
        .expect("a Mesh");
        let f = mtu(Some(&m), &peers);
        assert_eq!(f.len(), 1);
        assert!(f[0].message.contains("at most 1340") && f[0].object == "meshpeer/b");
        m.spec.mtu = None;
    }

    #[test]
    fn skewed_clocks_and_unready_agents_are_findings() {
        let f = clocks(&[("a".into(), 1), ("b".into(), -42)]);
        assert_eq!(f.len(), 1);
        assert!(f[0].message.contains("42s behind"));
        let ds = DaemonSetState {
            name: "wgmesh-agent".into(),
            desired: 3,
            ready: 2,
            updated: 3,
        };
        let f = agents(Some(&ds), "ns");
        assert_eq!(f.len(), 1);
        assert!(f[0].message.contains("2 of 3"));
    }
}
