//! wgmesh-operator: the single authority on who is in the mesh. It gives every node a
//! `MeshPeer` and pod subnets from the `PodCIDRPool`s that select it, validates every key
//! and address a peer claims, and writes what it approved into each peer's status.
//!
//! Wiring only lives here; the decisions are in `plan` (over `wgmesh-core`), the writes in
//! `apply`, the loop in `controller`, leadership in `lease`.

pub mod apply;
pub mod conditions;
pub mod controller;
pub mod lease;
pub mod metrics;
pub mod plan;

use anyhow::Context;
use clap::Parser;
use kube::Api;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::sync::watch;

/// Command-line and environment configuration.
#[derive(Debug, Parser)]
#[command(name = "wgmesh-operator", version, about = "wgmesh operator: allocates pod subnets, validates peers and distributes keys", long_about = None)]
pub struct Args {
    /// Address of the metrics and health endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "WGMESH_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Namespace of the leader-election Lease.
    #[arg(long, env = "WGMESH_LEASE_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, env = "WGMESH_LEASE_NAME", default_value = "wgmesh-operator")]
    pub lease_name: String,

    /// This replica's identity in the Lease (the pod name in a cluster). Defaults to the
    /// host name and process id.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Seconds a lease stays valid without renewal.
    #[arg(long, env = "WGMESH_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "WGMESH_LOG_JSON")]
    pub log_json: bool,
}

/// Sets up logging as `args` say. Levels come from `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs the operator until it fails or is interrupted.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let metrics = Arc::new(metrics::Metrics::new());
    let (leader_tx, leader_rx) = watch::channel(false);

    let lease_duration = Duration::from_secs(args.lease_duration_seconds.max(3));
    let lease = lease::LeaseConfig {
        namespace: args.lease_namespace.clone(),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        lease_duration,
        renew_deadline: lease_duration * 2 / 3,
        retry_period: lease_duration / 5,
    };
    tracing::info!(%identity, lease = %args.lease_name, "starting");
    let lease_api = Api::namespaced(client.clone(), &args.lease_namespace);
    let metrics_addr = args.metrics_addr;
    let http = wgmesh_telemetry::serve(metrics_addr, metrics.telemetry());
    // SIGTERM is how the kubelet stops a pod (a rolling update, a drain); SIGINT a person.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    tokio::select! {
        r = http => r.with_context(|| format!("serving metrics on {metrics_addr}")),
        () = lease::run(lease_api, lease, leader_tx) => anyhow::bail!("leader election ended"),
        () = controller::run(client, identity, leader_rx, metrics) => anyhow::bail!("the control loop ended"),
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for a signal")?;
            tracing::info!("interrupted; exiting");
            Ok(())
        }
        _ = term.recv() => {
            tracing::info!("terminated; exiting");
            Ok(())
        }
    }
}
