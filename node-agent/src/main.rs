//! `wgmesh-agent`: the wgmesh node agent binary.

#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Parser, Subcommand};

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
    Device(wgmesh_device::cmd::DeviceArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    wgmesh_device::cmd::init_logging(cli.log_json);
    if !matches!(cli.command, Command::InstallCni(_)) {
        // Before any key is read or generated: no core dump or ptrace may expose it.
        wgmesh_device::process::forbid_core_dumps()
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
        // A daemonizing device starts this binary again with its subcommand, `device`.
        Command::Device(args) => wgmesh_device::cmd::run(&args, &["device"])?,
    }
    Ok(())
}
