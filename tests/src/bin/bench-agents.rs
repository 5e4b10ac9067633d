//! `bench-agents`: the agents at scale. Against a mesh of real agents brought up by
//! `hack/mesh.sh` (each in its own network namespace with its own userspace WireGuard
//! device, the operator, a real API server), it registers simulated nodes until the mesh has
//! `--nodes` of them, playing their agents by publishing a key and an endpoint for each, and
//! reports:
//!
//! - how long until every real agent's device has every peer;
//! - a steady minute: watch events per agent (and how many woke a pass), passes, status
//!   writes, report writes, the API server's requests by verb and resource, CPU and memory per agent;
//! - one more real node joining: the time until a pod on it answers a ping from every
//!   other real node, and what the join cost each agent (events, passes, CPU).
//!
//! The simulated nodes' endpoints (in 198.19.0.0/16) are never sent to: no traffic is routed
//! to their pods. Figures, not assertions.
//!
//! Usage: bench-agents --dir MESH_DIR [--nodes N] [--steady SECONDS]

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use wgmesh_api::MeshPeer;
use wgmesh_tests::{
    bench::{self, arg, public_key},
    nodes::parse_env,
    repo_root,
};

const SIM_PREFIX: &str = "sim-";

/// One real node of the mesh: its agent's process, metrics address and device socket.
#[derive(Debug, Clone)]
struct RealNode {
    netns: String,
    pid: u32,
    metrics: String,
    socket: PathBuf,
}

struct Mesh {
    dir: PathBuf,
    id: String,
    net: String,
}

impl Mesh {
    fn node(&self, name: &str) -> Result<RealNode> {
        let index: u32 = name
            .strip_prefix("node-")
            .and_then(|i| i.parse().ok())
            .with_context(|| format!("{name} is not node-N"))?;
        let pid = std::fs::read_to_string(self.dir.join("pids").join(format!("agent-{name}")))
            .with_context(|| format!("the pid of {name}'s agent"))?
            .trim()
            .parse()?;
        Ok(RealNode {
            netns: format!("{}-{name}", self.id),
            pid,
            metrics: format!("{}.{}:9091", self.net, 10 + index),
            socket: PathBuf::from(format!("/var/run/wireguard/wg-{}-n{index}.sock", self.id)),
        })
    }

    fn nodes(&self) -> Result<Vec<RealNode>> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.join("pids"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix("agent-")
                    .map(str::to_owned)
            })
            .collect();
        names.sort_by_key(|n| n.trim_start_matches("node-").parse::<u32>().unwrap_or(0));
        names.iter().map(|n| self.node(n)).collect()
    }

    fn script(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("bash")
            .arg(repo_root().join("hack/mesh.sh"))
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "hack/mesh.sh {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// The peers a device has, from its UAPI socket (what `wg show` reads).
fn device_peers(socket: &Path) -> Result<usize> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"get=1\n\n")?;
    // The answer ends with `errno=N` and a blank line; the socket stays open for more.
    let mut peers = 0;
    for line in std::io::BufReader::new(s).lines() {
        let line = line?;
        if line.starts_with("public_key=") {
            peers += 1;
        } else if line.starts_with("errno=") {
            return Ok(peers);
        }
    }
    bail!("{} closed before its answer ended", socket.display())
}

/// An agent's counters, from its `/metrics`.
#[derive(Debug, Clone, Default)]
struct AgentCounters {
    events: f64,
    waking: f64,
    passes: f64,
    status_writes: f64,
    report_writes: f64,
    pass_seconds: f64,
}

fn scrape_agent(addr: &str) -> Result<AgentCounters> {
    let mut s =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let mut c = AgentCounters::default();
    for (series, v) in bench::samples(&text) {
        if series.starts_with("wgmesh_agent_watch_events_total{") {
            c.events += v;
            if series.contains("wakes=\"true\"") {
                c.waking += v;
            }
        } else if series == "wgmesh_agent_applies_total" {
            c.passes = v;
        } else if series == "wgmesh_agent_status_writes_total" {
            c.status_writes = v;
        } else if series == "wgmesh_agent_report_writes_total" {
            c.report_writes = v;
        } else if series == "wgmesh_agent_pass_duration_seconds_sum" {
            c.pass_seconds = v;
        }
    }
    Ok(c)
}

/// Every real agent's counters and CPU at one moment.
struct Sample {
    at: Instant,
    agents: Vec<(AgentCounters, f64)>,
    api: bench::ApiServerCounters,
}

async fn sample(nodes: &[RealNode], client: &kube::Client) -> Result<Sample> {
    let mut agents = Vec::new();
    for n in nodes {
        agents.push((
            scrape_agent(&n.metrics)?,
            bench::cpu_seconds(n.pid).unwrap_or(0.0),
        ));
    }
    Ok(Sample {
        at: Instant::now(),
        agents,
        api: bench::scrape_api_server(client).await?,
    })
}

/// Per agent over a window: (events, waking events, passes, status writes, CPU seconds,
/// seconds in passes, report writes).
fn per_agent(a: &Sample, b: &Sample) -> Vec<[f64; 7]> {
    a.agents
        .iter()
        .zip(&b.agents)
        .map(|((x, cx), (y, cy))| {
            [
                y.events - x.events,
                y.waking - x.waking,
                y.passes - x.passes,
                y.status_writes - x.status_writes,
                cy - cx,
                y.pass_seconds - x.pass_seconds,
                y.report_writes - x.report_writes,
            ]
        })
        .collect()
}

fn stats(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = values.collect();
    let max = v.iter().copied().fold(0.0, f64::max);
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean, max)
}

/// Writes to wgmesh's own objects (and its ledger), which the mesh's size drives; the rest
/// (Nodes, their status, Leases) is the control plane's own, and here mostly the node
/// lifecycle controller marking kubelet-less nodes unreachable.
fn wgmesh_writes(api: &bench::ApiServerCounters) -> f64 {
    api.requests
        .iter()
        .filter(|((verb, resource), _)| {
            ["POST", "PUT", "PATCH", "DELETE", "APPLY"].contains(&verb.as_str())
                && (resource.starts_with("meshpeers")
                    || resource == "meshpeerreports"
                    || resource.starts_with("meshes")
                    || resource.starts_with("podcidrpools")
                    || resource == "configmaps")
        })
        .map(|(_, n)| n)
        .sum::<f64>()
        .max(0.0)
}

/// Prints a window: per agent per minute (`per_minute`), or per agent in all.
fn print_window(title: &str, a: &Sample, b: &Sample, nodes: usize, per_minute: bool) {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let minutes = secs / 60.0;
    let rows = per_agent(a, b);
    let api = b.api.since(&a.api);
    let unit = if per_minute { "per minute" } else { "in all" };
    println!("{title} ({secs:.1} s):");
    let line = |what: &str, i: usize| {
        let scale = if per_minute { 1.0 / minutes } else { 1.0 };
        let (mean, max) = stats(rows.iter().map(|r| r[i] * scale));
        println!(
            "  {:<52} mean {mean:>9.2}   max {max:>9.2}",
            format!("{what} {unit}")
        );
    };
    line("watch events per agent", 0);
    line("  of which changed what a pass reads", 1);
    line("passes per agent", 2);
    line("status writes per agent", 3);
    line("report writes per agent", 6);
    let (mean, max) = stats(rows.iter().map(|r| 100.0 * r[4] / secs));
    println!(
        "  {:<52} mean {mean:>8.1}%   max {max:>8.1}%",
        "agent CPU (of one core)"
    );
    let (mean, max) = stats(rows.iter().map(|r| r[4]));
    println!(
        "  {:<52} mean {mean:>8.2} s   max {max:>8.2} s",
        "agent CPU time"
    );
    let (mean, max) = stats(
        rows.iter()
            .filter(|r| r[2] > 0.0)
            .map(|r| 1000.0 * r[5] / r[2]),
    );
    println!(
        "  {:<52} mean {mean:>7.1} ms   max {max:>7.1} ms",
        "pass duration, mean per agent"
    );
    println!(
        "  {:<52} {:>9.3}",
        "wgmesh API writes per node per minute, whole mesh",
        wgmesh_writes(&api) / nodes as f64 / minutes
    );
    println!(
        "  {:<52} {:>9.3}",
        "all API writes per node per minute, whole mesh",
        api.writes() / nodes as f64 / minutes
    );
    println!(
        "  {:<52} {:>8.1}%",
        "API server CPU (of one core)",
        100.0 * api.cpu_seconds / secs
    );
    println!("  API requests by verb and resource:");
    bench::print_requests(&api, secs, "    ");
}

/// The namespace and accounts `hack/mesh.sh` gives the chart's identities.
const SYSTEM_NS: &str = "wgmesh-system";
const AGENT_ACCOUNT: &str = "wgmesh-agent";

/// Registers simulated node `i` as a kubelet would, gives it an agent identity as
/// `hack/mesh.sh` does for real ones (a Pod on the node, never run, and a token bound to it:
/// what the admission webhook maps to the node), and once the operator made its peer,
/// publishes a key and an endpoint as its agent.
async fn simulated_node(client: kube::Client, base: kube::Config, i: usize) -> Result<()> {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let name = format!("{SIM_PREFIX}{i:05}");
    let ip = format!("198.19.{}.{}", i / 250, 1 + i % 250);
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &wgmesh_tests::mk_node(&name, &[], &ip),
        )
        .await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("wgmesh-agent-{name}"), "namespace": SYSTEM_NS},
        "spec": {
            "nodeName": name, "serviceAccountName": AGENT_ACCOUNT,
            "automountServiceAccountToken": false,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "agent", "image": "wgmesh.local/none"}],
        },
    }))?;
    let pod = Api::<Pod>::namespaced(client.clone(), SYSTEM_NS)
        .create(&PostParams::default(), &pod)
        .await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(86400),
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client, SYSTEM_NS)
        .create_token_request(AGENT_ACCOUNT, &PostParams::default(), &request)
        .await?
        .status
        .context("a token")?
        .token;
    let mut config = base;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    let peers: Api<MeshPeer> = Api::all(kube::Client::try_from(config)?);
    let patch = serde_json::json!({
        "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshPeer",
        "status": {"publicKey": public_key(), "endpoints": [format!("{ip}:51820")]},
    });
    let started = Instant::now();
    loop {
        match peers
            .patch_status(
                &name,
                &PatchParams::apply("wgmesh-agent"),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s))
                if s.is_not_found() && started.elapsed() < Duration::from_secs(600) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("publishing {name}'s key")),
        }
    }
}

/// Seconds since boot (`/proc/uptime`).
/// A log line without its terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn uptime() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    Ok(text
        .split_whitespace()
        .next()
        .context("/proc/uptime")?
        .parse()?)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if f().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench-agents --dir MESH_DIR [--nodes N] [--steady SECONDS]");
        return Ok(());
    }
    let dir = PathBuf::from(arg(&args, "--dir").context("--dir MESH_DIR is required")?);
    let total: usize = arg(&args, "--nodes").map_or(Ok(1000), |v| v.parse())?;
    let steady: u64 = arg(&args, "--steady").map_or(Ok(60), |v| v.parse())?;
    let env = parse_env(&std::fs::read_to_string(dir.join("mesh.env"))?);
    let mesh = Mesh {
        dir: dir.clone(),
        id: env.get("MESH_ID").context("MESH_ID")?.clone(),
        net: env.get("MESH_NET").context("MESH_NET")?.clone(),
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(dir.join("cp/kubeconfig"))?;
    let base = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(base.clone())?;
    let real = mesh.nodes()?;
    if real.is_empty() {
        bail!("no agents in {}", dir.display());
    }
    let simulated = total.saturating_sub(real.len() + 1);
    println!(
        "agent benchmark: {} real agents (own netns, userspace WireGuard device each), {simulated} simulated nodes, one more real node joining: {} nodes",
        real.len(),
        real.len() + simulated + 1
    );

    // Room for them: the mesh's own pool has 256 subnets of each family.
    Api::<wgmesh_api::PodCIDRPool>::all(client.clone())
        .create(
            &PostParams::default(),
            &wgmesh_api::PodCIDRPool::new(
                "bench",
                wgmesh_api::PodCIDRPoolSpec {
                    cidrs: vec!["10.128.0.0/14".into(), "fd00:10:250::/48".into()],
                    node_prefix_length: wgmesh_api::pool::NodePrefixLength {
                        ipv4: Some(24),
                        ipv6: Some(64),
                    },
                    node_selector: None,
                },
            ),
        )
        .await?;

    // The simulated nodes, registered as a kubelet would, 32 at a time.
    let start = Instant::now();
    futures::stream::iter(1..=simulated)
        .map(|i| simulated_node(client.clone(), base.clone(), i))
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let registered = start.elapsed();
    let want = real.len() - 1 + simulated;
    let converged = wait_until(
        "every real agent's device to have every peer",
        Duration::from_secs(1800),
        || {
            let real = real.clone();
            async move {
                let mut all = true;
                for n in &real {
                    all &= device_peers(&n.socket).unwrap_or(0) >= want;
                }
                Ok(all)
            }
        },
    )
    .await?;
    println!(
        "  {} simulated nodes registered and their keys published after {:.1} s; every device had all {want} peers after {:.1} s",
        simulated,
        registered.as_secs_f64(),
        (registered + converged).as_secs_f64()
    );
    let mem: Vec<f64> = real
        .iter()
        .filter_map(|n| bench::memory_kib(n.pid, "VmRSS"))
        .map(|k| k as f64 / 1024.0)
        .collect();
    let (mean, max) = stats(mem.iter().copied());
    println!(
        "  agent memory (RSS) at {want} peers              mean {mean:>7.1} MiB   max {max:>7.1} MiB"
    );

    // Let the burst's last writes settle, then a quiet window. A node's report of what a
    // join changed is written at most once a minute, so the last one comes up to a minute
    // (and a pass) after the burst.
    tokio::time::sleep(Duration::from_secs(75)).await;
    let a = sample(&real, &client).await?;
    tokio::time::sleep(Duration::from_secs(steady)).await;
    let b = sample(&real, &client).await?;
    print_window("steady state, nothing changing", &a, &b, total - 1, true);

    // The floor of an agent's start at this size on this machine: reading every MeshPeer
    // once, as a fresh client's first list from the API server's watch cache (an agent's
    // first list) does.
    let fresh = kube::Client::try_from(base.clone())?;
    let listed = Instant::now();
    let all = Api::<MeshPeer>::all(fresh)
        .list(&kube::api::ListParams::default().match_any())
        .await?
        .items
        .len();
    let list_floor = listed.elapsed().as_secs_f64();

    // One more real node joins: from its registration until a pod on it answers every
    // other real node.
    let joining = format!("node-{}", real.len() + 1);
    let before = sample(&real, &client).await?;
    let t0 = Instant::now();
    let uptime_at_t0 = uptime()?;
    mesh.script(&["add-node", &joining])?;
    // The agent starts once its Node is registered and its identity made (as a DaemonSet's
    // pod starts on a new node): the join, as far as wgmesh is concerned, starts there.
    let started_since_boot = bench::started_since_boot(mesh.node(&joining)?.pid)
        .context("the joining agent's start time")?;
    let agent_start = started_since_boot - uptime_at_t0;
    // The agent's start on the wall clock, for its log's timestamps.
    let started_wall = k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::from_secs_f64(uptime()? - started_since_boot);
    let pod_ip = mesh.script(&["pod", &joining, "joinpod"])?;
    let pod_ip = pod_ip.lines().last().unwrap_or_default().to_owned();
    let pod_at = t0.elapsed();
    let reached: Vec<Result<Duration>> = futures::future::join_all(real.iter().map(|n| {
        let ns = n.netns.clone();
        let ip = pod_ip.clone();
        async move {
            loop {
                let ok = tokio::process::Command::new("ip")
                    .args(["netns", "exec", &ns, "ping", "-c1", "-W1", "-q", &ip])
                    .output()
                    .await?
                    .status
                    .success();
                if ok {
                    return Ok(t0.elapsed());
                }
                if t0.elapsed() > Duration::from_secs(120) {
                    bail!("{ns} never reached {ip}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }))
    .await;
    let mut times: Vec<f64> = Vec::new();
    for r in reached {
        times.push(r?.as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = sample(&real, &client).await?;
    println!(
        "one node joins a {total}-node mesh (times from its agent's start; its netns, Node and identity took {agent_start:.2} s before):"
    );
    println!(
        "  its pod plumbed (agent up, CNI configuration written) after {:.2} s",
        pod_at.as_secs_f64() - agent_start
    );
    println!(
        "  its pod answers every other real node after {:.2} s (median node {:.2} s)",
        times.last().copied().unwrap_or(0.0) - agent_start,
        times[times.len() / 2] - agent_start
    );
    // Where the joining agent's time went, from its log.
    let log = std::fs::read_to_string(mesh.dir.join(format!("logs/agent-{joining}.log")))
        .unwrap_or_default();
    let at = |message: &str| -> Option<f64> {
        log.lines().find(|l| l.contains(message)).and_then(|l| {
            let plain: String = strip_ansi(l);
            let t: k8s_openapi::jiff::Timestamp = plain.split_whitespace().next()?.parse().ok()?;
            Some(t.duration_since(started_wall).as_secs_f64())
        })
    };
    let stages = [
        ("started, key ready", at("node key ready")),
        ("read the mesh (caches synced)", at("caches synced")),
        ("its key published", at("published the node's key")),
        ("all peers on its device", at("updated WireGuard peers")),
        ("routes installed", at("routes updated")),
        (
            "CNI configuration written",
            at("wrote the CNI configuration"),
        ),
    ];
    let mut previous = 0.0;
    println!("  the joining agent, from its log (seconds since its start, and each step's own):");
    for (what, t) in stages {
        match t {
            Some(t) => {
                println!("    {what:<40} {t:>6.2} s  (+{:.2} s)", t - previous);
                previous = t;
            }
            None => println!("    {what:<40}      –"),
        }
    }
    println!(
        "  floor on this machine, same run: a fresh client's LIST of all {all} MeshPeers took {list_floor:.2} s (in steady state, before the join)"
    );
    print_window(
        "the join, until 5 s after the last answer",
        &before,
        &after,
        total,
        false,
    );
    let mem: Vec<f64> = real
        .iter()
        .filter_map(|n| bench::memory_kib(n.pid, "VmHWM"))
        .map(|k| k as f64 / 1024.0)
        .collect();
    let (mean, max) = stats(mem.iter().copied());
    println!(
        "  agent peak memory (VmHWM) over the run         mean {mean:>7.1} MiB   max {max:>7.1} MiB"
    );
    Ok(())
}
