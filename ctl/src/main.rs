//! `kubectl-wgmesh`: the kubectl plugin. Reads the cluster, hands what it read to the pure
//! modules of `wgmesh_ctl`, prints, and exits non-zero when something is wrong.

#![forbid(unsafe_code)]

mod cluster;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
use wgmesh_ctl::{graph, health, render};

mod commands;

/// See and operate a wgmesh mesh.
///
/// Reads the cluster with the current kubeconfig context (as kubectl does: $KUBECONFIG,
/// ~/.kube/config, or the pod's service account).
#[derive(Debug, Parser)]
#[command(name = "kubectl-wgmesh", bin_name = "kubectl wgmesh", version)]
struct Cli {
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, env = "KUBECONFIG", hide_env_values = true)]
    kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    /// The namespace wgmesh is installed in (`helm install -n`).
    #[arg(short, long, global = true, default_value = "wgmesh-system")]
    namespace: String,
    /// The Helm release name (names the operator's Lease and the agents' DaemonSet).
    #[arg(long, global = true, default_value = "wgmesh")]
    release: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The mesh's health on one screen: nodes, agents, per-pair paths and handshake ages,
    /// key rotations and laggards, plaintext routes, pools' free space, and what to do
    /// about each problem. Exits 1 when something is wrong, 0 when healthy.
    Status(StatusArgs),
    /// The mesh as a picture: nodes grouped by location, one edge per pair coloured by its
    /// path (direct, NAT traversal, relay, host gateway) and drawn by its handshake's age.
    Graph(GraphArgs),
    /// Creates an external MeshPeer (a laptop, a VM, another site) with a key pair made
    /// here, so the private key never reaches the cluster (or with --public-key), waits
    /// for the operator to approve it, and prints a wg-quick configuration that reaches
    /// every node's pods.
    PeerConfig(commands::PeerConfigArgs),
    /// Requests a key rotation for the nodes named, or every node (--all), and with --wait
    /// follows it to the end, naming laggards. Exits 1 if a rotation was abandoned or left
    /// laggards.
    Rotate(commands::RotateArgs),
    /// Checks the installation: CRDs, the operator's leadership, the agents' DaemonSet,
    /// every agent answering, MTU consistency, clock skew, stale handshakes, plus all that
    /// `status` checks; says what to do for each finding. Exits 1 on an error.
    Doctor(commands::DoctorArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Svg,
    Dot,
}

/// How the agents are asked.
#[derive(Debug, Clone, Args)]
pub(crate) struct ProbeArgs {
    /// Do not ask the agents (through the API server's node proxy, which needs `get` on
    /// `nodes/proxy`): handshake ages then come from the nodes' MeshPeerReports, which are
    /// written only on change.
    #[arg(long)]
    no_probe: bool,
    /// The agents' metrics port (the chart's `agent.metricsPort`).
    #[arg(long, default_value_t = 9091, value_name = "PORT")]
    agent_port: u16,
    /// How long to wait for each agent.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    probe_timeout: u64,
}

impl ProbeArgs {
    pub(crate) fn probe(&self) -> cluster::Probe {
        cluster::Probe {
            enabled: !self.no_probe,
            port: self.agent_port,
            timeout: Duration::from_secs(self.probe_timeout.max(1)),
        }
    }
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// `text` (one screen) or `json` (everything, for scripts).
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// List every pair; by default meshes of more than 8 nodes list only the pairs whose
    /// handshake is not fresh.
    #[arg(long)]
    pairs: bool,
    #[command(flatten)]
    probe: ProbeArgs,
}

#[derive(Debug, Args)]
struct GraphArgs {
    /// `svg` or `dot` (Graphviz: `kubectl wgmesh graph --format dot | dot -Tpng > mesh.png`).
    #[arg(long, value_enum, default_value_t = Format::Svg)]
    format: Format,
    /// Write to this file instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<std::path::PathBuf>,
    #[command(flatten)]
    probe: ProbeArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let client = cluster::connect(cli.kubeconfig.as_deref(), cli.context.as_deref()).await?;
    let ns = cli.namespace.as_str();
    match cli.command {
        Command::PeerConfig(args) => commands::peer_config(&client, args).await,
        Command::Rotate(args) => commands::rotate(&client, args).await,
        Command::Doctor(args) => commands::doctor(&client, args, ns, &cli.release).await,
        Command::Status(args) => {
            let snap = cluster::snapshot(&client, &args.probe.probe(), ns).await?;
            let h = health::assess(&snap);
            let text = match args.output {
                Output::Json => serde_json::to_string_pretty(&h)? + "\n",
                Output::Text => render::status(&h, args.pairs),
            };
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(if h.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Graph(args) => {
            let snap = cluster::snapshot(&client, &args.probe.probe(), ns).await?;
            let h = health::assess(&snap);
            let text = match args.format {
                Format::Svg => graph::svg(&h),
                Format::Dot => graph::dot(&h),
            };
            match &args.output {
                Some(path) => std::fs::write(path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => std::io::stdout().write_all(text.as_bytes())?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
