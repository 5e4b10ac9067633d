//! wgmesh-operator: the single authority on who is in the mesh. It gives every node a
//! `MeshPeer` and pod subnets from the `PodCIDRPool`s that select it, validates every key
//! and address a peer claims, and writes what it approved into each peer's status.
//!
//! Wiring only lives here; the decisions are in `plan` (over `wgmesh-core`), the writes in
//! `apply`, the loop in `controller`, leadership in `lease`.

pub mod admission;
pub mod apply;
pub mod conditions;
pub mod controller;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod plan;
pub mod webhook;

use anyhow::Context;
use clap::Parser;
use kube::Api;
use std::{net::SocketAddr, sync::Arc, time::Duration};

/// Command-line and environment configuration.
#[derive(Debug, Parser)]
#[command(name = "wgmesh-operator", version, about = "wgmesh operator: allocates pod subnets, validates peers and distributes keys", long_about = None)]
pub struct Args {
    /// Address of the metrics and health endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "WGMESH_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Namespace of the leader-election Lease, and of the subnet ledger (the ConfigMap
    /// `wgmesh-subnet-claims`: the node each allocated pod subnet is claimed for).
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

    /// Address of the MeshPeer admission webhook (HTTPS). Unset: no webhook is served, and
    /// nothing stops one node's agent from writing another node's status: only for
    /// development clusters without the chart.
    #[arg(long, env = "WGMESH_WEBHOOK_ADDR", requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_addr: Option<SocketAddr>,

    /// The webhook's serving certificate (PEM), for the Service's DNS name.
    #[arg(long, env = "WGMESH_WEBHOOK_CERT")]
    pub webhook_cert: Option<std::path::PathBuf>,

    /// The webhook's private key (PEM).
    #[arg(long, env = "WGMESH_WEBHOOK_KEY")]
    pub webhook_key: Option<std::path::PathBuf>,

    /// The operator's own ServiceAccount, `namespace/name`: the identity whose writes the
    /// webhook lets through.
    #[arg(long, env = "WGMESH_OPERATOR_SERVICE_ACCOUNT", default_value = "kube-system/wgmesh-operator", value_parser = admission::ServiceAccount::parse)]
    pub operator_service_account: admission::ServiceAccount,

    /// The agents' ServiceAccount, `namespace/name`: its writes are limited to the status of
    /// the node its bound pod runs on.
    #[arg(long, env = "WGMESH_AGENT_SERVICE_ACCOUNT", default_value = "kube-system/wgmesh-agent", value_parser = admission::ServiceAccount::parse)]
    pub agent_service_account: admission::ServiceAccount,

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

fn webhook_config(args: &Args) -> Option<webhook::Config> {
    Some(webhook::Config {
        addr: args.webhook_addr?,
        cert_file: args.webhook_cert.clone()?,
        key_file: args.webhook_key.clone()?,
        ids: admission::Identities {
            operator: args.operator_service_account.clone(),
            agent: args.agent_service_account.clone(),
        },
    })
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
    let (leader_tx, leader_rx) = lease::Leadership::channel();

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
    let webhook = webhook_config(&args);
    let webhook_client = client.clone();
    let webhook = async move {
        match webhook {
            Some(config) => webhook::serve(config, webhook_client).await,
            None => {
                tracing::warn!(
                    "no admission webhook (--webhook-addr unset): agents' writes are not limited to their own node"
                );
                std::future::pending().await
            }
        }
    };
    // SIGTERM is how the kubelet stops a pod (a rolling update, a drain); SIGINT a person.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    tokio::select! {
        r = http => r.with_context(|| format!("serving metrics on {metrics_addr}")),
        r = webhook => r.context("serving the admission webhook"),
        () = lease::run(lease_api, lease, leader_tx) => anyhow::bail!("leader election ended"),
        () = controller::run(client, identity, args.lease_namespace.clone(), leader_rx, metrics) => anyhow::bail!("the control loop ended"),
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
