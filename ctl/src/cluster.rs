//! What `kubectl wgmesh` reads from the cluster: the wgmesh objects, and each agent's
//! metrics through the API server's node proxy.

use anyhow::{Context, Result};
use futures::{StreamExt, stream};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use wgmesh_api::{Mesh, MeshPeer, MeshPeerReport, PodCIDRPool};
use wgmesh_ctl::health::{AgentProbe, Snapshot};
use wgmesh_ctl::prom;

/// Agents asked at once.
const PROBES_IN_FLIGHT: usize = 16;

/// How to ask the agents.
#[derive(Debug, Clone)]
pub struct Probe {
    pub enabled: bool,
    pub port: u16,
    pub timeout: Duration,
}

/// A client for the kubeconfig and context given, or as kubectl would choose them.
pub async fn connect(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<kube::Client> {
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options).await?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options).await?,
        None => kube::Config::infer()
            .await
            .context("no kubeconfig found (set KUBECONFIG or --kubeconfig)")?,
    };
    Ok(kube::Client::try_from(config)?)
}

pub async fn list<K>(client: &kube::Client) -> Result<Vec<K>>
where
    K: kube::Resource<Scope = kube::core::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    let plural = K::plural(&Default::default()).into_owned();
    let list = api.list(&ListParams::default()).await.map_err(|e| match e {
        kube::Error::Api(s) if s.is_not_found() => anyhow::anyhow!(
            "the API server does not know {plural}.wgmesh.dev: are wgmesh's CRDs installed? (kubectl apply -f crds/)"
        ),
        e => anyhow::Error::from(e).context(format!("listing {plural}")),
    })?;
    Ok(list.items)
}

/// Everything `status` and `graph` read.
pub async fn snapshot(client: &kube::Client, probe: &Probe, namespace: &str) -> Result<Snapshot> {
    let meshes: Vec<Mesh> = list(client).await?;
    let peers: Vec<MeshPeer> = list(client).await?;
    let reports: Vec<MeshPeerReport> = list(client).await?;
    let pools: Vec<PodCIDRPool> = list(client).await?;
    let nodes: Vec<String> = peers.iter().filter_map(|p| p.spec.node.clone()).collect();
    let agents = if probe.enabled {
        probe_agents(client, &nodes, probe).await
    } else {
        nodes
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    AgentProbe::Unknown("not asked (--no-probe)".into()),
                )
            })
            .collect()
    };
    Ok(Snapshot {
        meshes,
        peers,
        reports,
        pools,
        agents,
        now: Timestamp::now(),
        namespace: namespace.to_owned(),
    })
}

/// Asks every node's agent for its metrics, a few at a time.
async fn probe_agents(
    client: &kube::Client,
    nodes: &[String],
    probe: &Probe,
) -> BTreeMap<String, AgentProbe> {
    stream::iter(nodes.iter().cloned())
        .map(|node| async move {
            let answer = probe_agent(client, &node, probe).await;
            (node, answer)
        })
        .buffer_unordered(PROBES_IN_FLIGHT)
        .collect()
        .await
}

/// One agent's `/metrics`, through `GET /api/v1/nodes/NODE:PORT/proxy/metrics`.
pub async fn probe_agent(client: &kube::Client, node: &str, probe: &Probe) -> AgentProbe {
    let path = format!("/api/v1/nodes/{node}:{}/proxy/metrics", probe.port);
    let request = match http::Request::get(&path).body(kube::client::Body::empty()) {
        Ok(r) => r,
        Err(e) => return AgentProbe::Unknown(e.to_string()),
    };
    let asked = Timestamp::now();
    let answer = async {
        let response = client.send(request).await?;
        let status = response.status();
        let date = response
            .headers()
            .get(http::header::DATE)
            .and_then(|d| d.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body().collect_bytes().await?;
        Ok::<_, kube::Error>((status, date, body))
    };
    let (status, date, body) = match tokio::time::timeout(probe.timeout, answer).await {
        Err(_) => {
            return AgentProbe::Silent(format!(
                "no answer on port {} within {:?}",
                probe.port, probe.timeout
            ));
        }
        Ok(Err(e)) => return AgentProbe::Silent(format!("port {}: {e}", probe.port)),
        Ok(Ok(a)) => a,
    };
    let text = String::from_utf8_lossy(&body);
    if status == http::StatusCode::FORBIDDEN {
        return AgentProbe::Unknown(format!(
            "not allowed to ask it (get nodes/proxy): {}",
            status_message(&text)
        ));
    }
    if !status.is_success() {
        return AgentProbe::Silent(format!("port {}: {}", probe.port, status_message(&text)));
    }
    let answered = Timestamp::now();
    // The agent's clock against the middle of the exchange (the Date has whole seconds).
    let clock_offset = date.and_then(|d| parse_http_date(&d)).map(|agent| {
        let mid = asked + (answered.duration_since(asked) / 2);
        agent.duration_since(mid).as_secs()
    });
    match prom::parse(&text) {
        Ok(samples) => agent_from_metrics(&samples, clock_offset),
        Err(e) => AgentProbe::Silent(format!(
            "port {} answered something that is not an agent's metrics: {e}",
            probe.port
        )),
    }
}

/// The `message` of a Kubernetes `Status` body, or the body.
fn status_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().chars().take(300).collect())
}

/// An HTTP `Date` (`Wed, 02 Dec 2026 16:17:45 GMT`).
fn parse_http_date(d: &str) -> Option<Timestamp> {
    k8s_openapi::jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(d)
        .ok()
}

/// What an agent's metrics say.
fn agent_from_metrics(samples: &[prom::Sample], clock_offset: Option<i64>) -> AgentProbe {
    let gauge = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
    let Some(device_up) = gauge("wgmesh_agent_device_up") else {
        return AgentProbe::Silent("the port answers, but not with wgmesh agent metrics".into());
    };
    let handshake_ages = samples
        .iter()
        .filter(|s| s.name == "wgmesh_agent_peer_last_handshake_age_seconds")
        .filter_map(|s| Some((s.labels.get("peer")?.clone(), s.value.max(0.0) as u64)))
        .collect();
    let configured_peers = samples
        .iter()
        .filter(|s| s.name == "wgmesh_agent_peer_receive_bytes")
        .filter_map(|s| s.labels.get("peer").cloned())
        .collect();
    AgentProbe::Answered {
        device_up: device_up > 0.0,
        configured_peers,
        plaintext_peers: gauge("wgmesh_agent_plaintext_peers")
            .unwrap_or(0.0)
            .max(0.0) as u64,
        handshake_ages,
        clock_offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_date_is_read() {
        let t = parse_http_date("Wed, 02 Dec 2026 16:17:45 GMT").expect("parses");
        assert_eq!(t.to_string(), "2026-12-02T16:17:45Z");
    }

    #[test]
    fn an_agents_metrics_give_its_device_and_handshakes() {
        let text = "wgmesh_agent_device_up 1\nwgmesh_agent_peer_last_handshake_age_seconds{peer=\"node-2\"} 12\n";
        let samples = prom::parse(text).expect("parses");
        match agent_from_metrics(&samples, Some(0)) {
            AgentProbe::Answered {
                device_up,
                handshake_ages,
                ..
            } => {
                assert!(device_up);
                assert_eq!(handshake_ages.get("node-2"), Some(&12));
            }
            other => panic!("{other:?}"),
        }
        let other = prom::parse("process_cpu_seconds_total 3\n").expect("parses");
        assert!(matches!(
            agent_from_metrics(&other, None),
            AgentProbe::Silent(_)
        ));
    }
}
