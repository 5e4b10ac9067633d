//! `wgmesh-agent`: the wgmesh node agent binary.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use wgmesh_agent::device_cmd::{self, DeviceOptions};

#[derive(Debug, Parser)]
#[command(name = "wgmesh-agent", version, about = "wgmesh node agent")]
struct Cli {
    /// Log as JSON.
    #[arg(long, env = "WGMESH_LOG_JSON", global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: the node's key, WireGuard device, routes and CNI configuration,
    /// driven by the mesh's custom resources.
    Run(Box<wgmesh_agent::agent::AgentArgs>),
    /// Copy the CNI plugins wgmesh's configuration uses (bridge, host-local, portmap,
    /// loopback) onto the node, atomically, touching nothing else (the DaemonSet's init
    /// container).
    InstallCni(wgmesh_agent::cni_install::InstallCniArgs),
    /// Run only the userspace WireGuard device, configured with wg(8), like wireguard-go.
    Device {
        /// Interface name.
        interface: String,
        /// Stay in the foreground instead of daemonizing.
        #[arg(short, long, env = "WG_PROCESS_FOREGROUND", value_parser = parse_flag, default_value = "false", num_args = 0, default_missing_value = "true")]
        foreground: bool,
        /// Directory of the UAPI socket.
        #[arg(long, env = "WGMESH_SOCKET_DIR", default_value = wgmesh_agent::uapi::DEFAULT_SOCKET_DIR)]
        socket_dir: PathBuf,
        /// Interface MTU.
        #[arg(long, env = "WGMESH_MTU")]
        mtu: Option<u32>,
        /// Send and receive datagrams one by one, without UDP GSO/GRO.
        #[arg(long, env = "WGMESH_NO_UDP_OFFLOAD")]
        no_udp_offload: bool,
        /// Read and write the TUN device packet by packet, without TSO/checksum offload.
        #[arg(long, env = "WGMESH_NO_TUN_OFFLOAD")]
        no_tun_offload: bool,
    },
}

/// Accepts `1`/`0` (as wireguard-go's WG_PROCESS_FOREGROUND) as well as `true`/`false`.
fn parse_flag(s: &str) -> Result<bool, String> {
    match s {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" | "" => Ok(false),
        other => Err(format!("not a boolean: {other}")),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    if !matches!(cli.command, Command::InstallCni(_)) {
        // Before any key is read or generated: no core dump or ptrace may expose it.
        wgmesh_agent::key::forbid_core_dumps()
            .context("making the process non-dumpable (prctl PR_SET_DUMPABLE)")?;
    }
    match cli.command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(wgmesh_agent::agent::run(*args))?;
        }
        Command::InstallCni(args) => wgmesh_agent::cni_install::run(&args)?,
        Command::Device {
            interface,
            foreground,
            socket_dir,
            mtu,
            no_udp_offload,
            no_tun_offload,
        } => device_cmd::run(&DeviceOptions {
            interface,
            foreground,
            socket_dir,
            mtu,
            udp_offload: !no_udp_offload,
            tun_offload: !no_tun_offload,
        })?,
    }
    Ok(())
}
