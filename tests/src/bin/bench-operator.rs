//! `bench-operator`: registers N Nodes against a real API server with a `wgmesh-operator`
//! running, plays each node's agent by publishing a fresh public key as soon as the node's
//! peer appears, and reports how long until every node has its subnet and every peer is
//! `Ready`, the allocation rate, the operator's peak memory and CPU, and the API server's
//! requests by verb and resource and its CPU over the run. Figures, not assertions.
//!
//! Usage: bench-operator --operator PATH [--nodes N] (KUBECONFIG names the cluster; the
//! cluster's wgmesh objects and Nodes are deleted first).

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use wgmesh_api::{ConditionStatus, MeshPeer, PodCIDRPool, PodCIDRPoolSpec, pool::NodePrefixLength};

use wgmesh_tests::bench::{self, arg, public_key};

/// This API server's ceiling for the writes the run makes of `MeshPeer`s, with nothing else
/// asking it anything: `n` external peers created, then a status applied to each (server-side
/// apply, as agents publish keys), 64 in flight; then deleted. Returns (creates/s, status
/// applies/s).
async fn meshpeer_write_rates(client: &kube::Client, n: usize) -> Result<(f64, f64)> {
    use wgmesh_api::MeshPeerSpec;
    let peers: Api<MeshPeer> = Api::all(client.clone());
    let name = |i: usize| format!("ceiling-{i:05}");
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let peers = peers.clone();
            async move {
                let mut p = MeshPeer::new(
                    &name(i),
                    MeshPeerSpec {
                        public_key: Some(public_key()),
                        allowed_ips: vec![format!("10.255.{}.{}/32", i / 250, i % 250)],
                        ..Default::default()
                    },
                );
                p.metadata.labels =
                    Some([("wgmesh.dev/bench".to_owned(), "ceiling".to_owned())].into());
                peers.create(&PostParams::default(), &p).await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let creates = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let peers = peers.clone();
            async move {
                let patch = serde_json::json!({
                    "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshPeer",
                    "status": {"publicKey": public_key(), "endpoints": ["192.0.2.1:51820"]},
                });
                peers
                    .patch_status(
                        &name(i),
                        &PatchParams::apply("wgmesh-agent"),
                        &Patch::Apply(patch),
                    )
                    .await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let applies = n as f64 / start.elapsed().as_secs_f64();
    peers
        .delete_collection(
            &kube::api::DeleteParams::default(),
            &kube::api::ListParams::default().labels("wgmesh.dev/bench=ceiling"),
        )
        .await?;
    Ok((creates, applies))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench-operator --operator PATH [--nodes N]   (uses KUBECONFIG)");
        return Ok(());
    }
    let operator = arg(&args, "--operator").context("--operator PATH is required")?;
    let n: usize = arg(&args, "--nodes").map_or(Ok(1000), |v| v.parse())?;
    let client = kube::Client::try_default().await?;
    wgmesh_tests::reset_mesh(&client).await?;

    let pools: Api<PodCIDRPool> = Api::all(client.clone());
    pools
        .create(
            &PostParams::default(),
            &PodCIDRPool::new(
                "bench",
                PodCIDRPoolSpec {
                    cidrs: vec!["10.0.0.0/8".into(), "fd00:be::/48".into()],
                    node_prefix_length: NodePrefixLength {
                        ipv4: Some(24),
                        ipv6: Some(64),
                    },
                    node_selector: None,
                },
            ),
        )
        .await?;

    let log = std::env::temp_dir().join("bench-operator.log");
    let mut child = std::process::Command::new(&operator)
        .env("RUST_LOG", "warn")
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--lease-name",
            "wgmesh-bench",
        ])
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(log.with_extension("err"))?)
        .spawn()
        .with_context(|| format!("starting {operator}"))?;
    let pid = child.id();

    // The simulated agents: publish a key for every node peer as soon as it appears, and
    // record when each peer has subnets and when it is Ready.
    let peers: Api<MeshPeer> = Api::all(client.clone());
    let before = bench::scrape_api_server(&client).await?;
    let start = Instant::now();
    let agents = {
        let peers = peers.clone();
        tokio::spawn(async move {
            let mut published = BTreeSet::new();
            let mut allocated_at: Option<Duration> = None;
            let mut allocated = BTreeSet::new();
            let mut ready = BTreeSet::new();
            let mut stream = watcher(peers.clone(), watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(p) = stream.try_next().await? {
                let name = p.name_any();
                if p.spec.node.is_none() {
                    continue;
                }
                if !p.spec.pod_cidrs.is_empty()
                    && allocated.insert(name.clone())
                    && allocated.len() == n
                {
                    allocated_at = Some(start.elapsed());
                }
                if published.insert(name.clone()) {
                    let peers = peers.clone();
                    let key = public_key();
                    tokio::spawn(async move {
                        let patch = serde_json::json!({
                            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshPeer",
                            "status": {"publicKey": key, "endpoints": ["192.0.2.1:51820"]},
                        });
                        peers
                            .patch_status(
                                &name,
                                &PatchParams::apply("wgmesh-agent"),
                                &Patch::Apply(patch),
                            )
                            .await
                    });
                }
                let is_ready = p.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True)
                });
                if is_ready {
                    ready.insert(p.name_any());
                    if ready.len() == n {
                        return anyhow::Ok((
                            allocated_at.unwrap_or_else(|| start.elapsed()),
                            start.elapsed(),
                        ));
                    }
                }
            }
            bail!("the watch ended")
        })
    };

    let nodes: Api<Node> = Api::all(client.clone());
    futures::stream::iter(0..n)
        .map(|i| {
            let nodes = nodes.clone();
            async move {
                let node = wgmesh_tests::mk_node(&format!("bench-{i:05}"), &[], "192.0.2.1");
                nodes.create(&PostParams::default(), &node).await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let registered = start.elapsed();

    let (all_allocated, all_ready) =
        tokio::time::timeout(Duration::from_secs(1800), agents).await???;
    let rss = bench::memory_kib(pid, "VmHWM");
    let operator_cpu = bench::cpu_seconds(pid);
    let api = bench::scrape_api_server(&client).await?.since(&before);
    let _ = child.kill();
    let _ = child.wait();

    let secs = all_allocated.as_secs_f64();
    println!("operator benchmark: {n} nodes against a real kube-apiserver");
    println!(
        "  nodes registered after            {:>8.2} s",
        registered.as_secs_f64()
    );
    println!("  every node has its subnets after  {secs:>8.2} s");
    println!(
        "  every peer Ready after            {:>8.2} s",
        all_ready.as_secs_f64()
    );
    println!(
        "  allocations per second            {:>8.1}",
        n as f64 / secs
    );
    // What this API server accepts: the benchmark's own Node creates, 32 in flight.
    let reg = registered.as_secs_f64();
    println!(
        "  Node creates per second           {:>8.1}",
        n as f64 / reg
    );
    println!("  subnets time / registration time  {:>8.2}", secs / reg);
    println!(
        "  Ready time / registration time    {:>8.2}",
        all_ready.as_secs_f64() / reg
    );
    match rss {
        Some(kib) => println!(
            "  operator peak memory (VmHWM)      {:>8.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("  operator peak memory              unavailable"),
    }
    // A leader that cannot renew its lease in time stops writing until it holds it again.
    let step_downs = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("stepping down"))
        .count();
    println!(
        "  operator stepped down as leader    {step_downs:>8} times (its lease: the default 15 s)"
    );
    let total = all_ready.as_secs_f64();
    if let Some(cpu) = operator_cpu {
        println!(
            "  operator CPU                      {cpu:>8.2} s ({:.0}% of one core)",
            100.0 * cpu / total
        );
    }
    println!(
        "  API server CPU                    {:>8.2} s ({:.0}% of one core)",
        api.cpu_seconds,
        100.0 * api.cpu_seconds / total
    );
    println!(
        "  API writes per node               {:>8.2} (the registration's own: 1)",
        api.writes() / n as f64
    );
    // What this API server takes at most of the writes the run makes, one kind at a time,
    // with nothing else running.
    let (create_rate, apply_rate) = meshpeer_write_rates(&client, n).await?;
    let count = |verb: &str, resource: &str| {
        api.requests
            .get(&(verb.to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0.0)
    };
    let floor = count("POST", "meshpeers") / create_rate
        + count("APPLY", "meshpeers/status") / apply_rate
        + count("POST", "nodes") / (n as f64 / reg);
    println!(
        "  API writes per second, all clients {:>8.1} (the run's writes / Ready time)",
        api.writes() / total
    );
    println!(
        "  this API server alone, 64 in flight: {create_rate:.0} MeshPeer creates/s, {apply_rate:.0} MeshPeer status applies/s"
    );
    println!(
        "  the run's Node and MeshPeer writes at those rates {floor:>6.2} s (Ready took {total:.2} s: {:.2}x)",
        total / floor
    );
    let creates_floor =
        count("POST", "meshpeers") / create_rate + count("POST", "nodes") / (n as f64 / reg);
    println!(
        "  the run's Node and MeshPeer creates alone at those rates {creates_floor:>6.2} s (every node had its subnets after {secs:.2} s: {:.2}x)",
        secs / creates_floor
    );
    println!("  API requests until every peer was Ready, by verb and resource:");
    bench::print_requests(&api, total, "    ");
    // The figures are out; a slow clean-up (thousands of deletions can pass the API server's
    // storage deadline) is said, not a failed benchmark.
    if let Err(e) = wgmesh_tests::reset_mesh(&client).await {
        eprintln!("bench-operator: cleaning up the benchmark's objects failed: {e:#}");
    }
    Ok(())
}
