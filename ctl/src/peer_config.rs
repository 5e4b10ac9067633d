//! `kubectl wgmesh peer-config`: the external `MeshPeer` to create, and the `wg-quick`
//! configuration that joins the mesh under it. Pure.

use serde_json::json;
use std::fmt::Write;
use wgmesh_api::consts::condition;
use wgmesh_api::mesh::Mtu;
use wgmesh_api::{ConditionStatus, Mesh, MeshPeer};

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct Request {
    pub name: String,
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    /// Where the nodes reach this peer, if it listens somewhere fixed.
    pub endpoint: Option<String>,
    pub persistent_keepalive: Option<u16>,
}

/// The `MeshPeer` to create.
pub fn external_peer(r: &Request) -> serde_json::Value {
    let mut spec = json!({
        "publicKey": r.public_key,
        "allowedIPs": r.allowed_ips,
    });
    if let Some(e) = &r.endpoint {
        spec["endpoint"] = json!(e);
    }
    if let Some(k) = r.persistent_keepalive {
        spec["persistentKeepalive"] = json!(k);
    }
    json!({
        "apiVersion": "wgmesh.dev/v1alpha1",
        "kind": "MeshPeer",
        "metadata": {
            "name": r.name,
            "labels": {"app.kubernetes.io/created-by": "kubectl-wgmesh"},
        },
        "spec": spec,
    })
}

/// Whether the operator approved the peer: `Some(Ok)` approved, `Some(Err(why))` refused,
/// `None` not decided yet.
pub fn verdict(peer: &MeshPeer) -> Option<Result<(), String>> {
    let status = peer.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)?;
    match ready.status {
        ConditionStatus::True => Some(Ok(())),
        ConditionStatus::False => Some(Err(format!("{}: {}", ready.reason, ready.message))),
        ConditionStatus::Unknown => None,
    }
}

/// Which of a node's addresses the external peer sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointChoice {
    /// The node's public endpoint when it has one, else its endpoint.
    Auto,
    /// Always the node's endpoint (the peer is inside the nodes' network).
    Internal,
}

/// The `wg-quick` configuration: an `[Interface]` with the peer's key and addresses and a
/// `[Peer]` per `Ready` node with a key, reaching that node's pod subnets. `private_key`
/// is `None` when the user brought the public key (they fill it in).
pub fn wg_quick(
    r: &Request,
    private_key: Option<&str>,
    mesh: Option<&Mesh>,
    peers: &[MeshPeer],
    choice: EndpointChoice,
) -> Result<String, String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# wgmesh external peer {}: save as /etc/wireguard/wgmesh.conf, then wg-quick up wgmesh",
        r.name
    );
    let _ = writeln!(out, "[Interface]");
    match private_key {
        Some(k) => {
            let _ = writeln!(out, "PrivateKey = {k}");
        }
        None => {
            let _ = writeln!(
                out,
                "# PrivateKey = (the private key whose public key is {})",
                r.public_key
            );
        }
    }
    let _ = writeln!(out, "Address = {}", r.allowed_ips.join(", "));
    if let Some(Mtu::Bytes(b)) = mesh.and_then(|m| m.spec.mtu) {
        let _ = writeln!(out, "MTU = {b}");
    }
    if let Some(port) = r
        .endpoint
        .as_deref()
        .and_then(|e| e.rsplit_once(':'))
        .map(|(_, p)| p)
    {
        let _ = writeln!(out, "ListenPort = {port}");
    }
    let keepalive = r.persistent_keepalive.unwrap_or(25);
    let mut nodes = 0;
    for peer in peers.iter().filter(|p| p.spec.node.is_some()) {
        let name = peer.metadata.name.as_deref().unwrap_or("");
        let Some(approved) = peer.status.as_ref().and_then(|s| s.approved.as_ref()) else {
            continue;
        };
        if verdict(peer) != Some(Ok(())) {
            continue;
        }
        let Some(key) = &approved.public_key else {
            continue;
        };
        if peer.spec.pod_cidrs.is_empty() {
            continue;
        }
        let endpoint = match choice {
            EndpointChoice::Auto => approved
                .public_endpoints
                .first()
                .or(approved.endpoint.as_ref()),
            EndpointChoice::Internal => approved.endpoint.as_ref(),
        };
        out.push('\n');
        let location = approved
            .location
            .as_deref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        let _ = writeln!(out, "# node {name}{location}");
        let _ = writeln!(out, "[Peer]");
        let _ = writeln!(out, "PublicKey = {key}");
        let _ = writeln!(out, "AllowedIPs = {}", peer.spec.pod_cidrs.join(", "));
        if let Some(e) = endpoint {
            let _ = writeln!(out, "Endpoint = {e}");
        }
        let _ = writeln!(out, "PersistentKeepalive = {keepalive}");
        nodes += 1;
    }
    if nodes == 0 {
        return Err("no node of the mesh is Ready with a key and pod subnets".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, public: Option<&str>) -> MeshPeer {
        serde_json::from_value(json!({
            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshPeer",
            "metadata": {"name": name},
            "spec": {"node": name, "podCIDRs": [format!("10.244.{}.0/24", name.len())]},
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "Approved",
                                "message": "", "lastTransitionTime": "2026-12-01T10:00:00Z"}],
                "approved": {"publicKey": format!("{name}-key"), "endpoint": "198.18.0.1:51820",
                             "publicEndpoints": public.map(|p| vec![p]).unwrap_or_default()}
            }
        }))
        .expect("a MeshPeer")
    }

    fn request() -> Request {
        Request {
            name: "laptop".into(),
            public_key: "pub".into(),
            allowed_ips: vec!["10.250.0.7/32".into()],
            endpoint: None,
            persistent_keepalive: None,
        }
    }

    #[test]
    fn a_peer_section_per_ready_node_reaching_its_pods() {
        let peers = vec![node("n1", None), node("n2", Some("203.0.113.9:51820"))];
        let text = wg_quick(&request(), Some("priv"), None, &peers, EndpointChoice::Auto)
            .expect("a config");
        assert!(
            text.contains("PrivateKey = priv\nAddress = 10.250.0.7/32\n"),
            "{text}"
        );
        assert_eq!(text.matches("[Peer]").count(), 2);
        assert!(text.contains("PublicKey = n1-key\nAllowedIPs = 10.244.2.0/24\nEndpoint = 198.18.0.1:51820\nPersistentKeepalive = 25\n"), "{text}");
        assert!(
            text.contains("Endpoint = 203.0.113.9:51820"),
            "public endpoint first: {text}"
        );
        let text =
            wg_quick(&request(), None, None, &peers, EndpointChoice::Internal).expect("a config");
        assert!(!text.contains("203.0.113.9"));
        assert!(text.contains("# PrivateKey = (the private key whose public key is pub)"));
    }

    #[test]
    fn no_ready_node_is_an_error_and_refusals_say_why() {
        let mut n = node("n1", None);
        let c = &mut n.status.as_mut().expect("status").conditions[0];
        c.status = ConditionStatus::False;
        c.reason = "AllowedIPsOutsideMeshRanges".into();
        c.message = "10.250.0.7/32 is outside".into();
        assert!(
            wg_quick(
                &request(),
                None,
                None,
                std::slice::from_ref(&n),
                EndpointChoice::Auto
            )
            .is_err()
        );
        assert_eq!(
            verdict(&n),
            Some(Err(
                "AllowedIPsOutsideMeshRanges: 10.250.0.7/32 is outside".into()
            ))
        );
        let peer = external_peer(&request());
        assert_eq!(peer["spec"]["allowedIPs"][0], "10.250.0.7/32");
        assert!(peer["spec"].get("endpoint").is_none());
    }
}
