//! `wgmesh-device`: the userspace WireGuard device alone, configured with `wg(8)` like
//! wireguard-go; the same command as `wgmesh-agent device`.

use anyhow::Context as _;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "wgmesh-device",
    version,
    about = "Run only the userspace WireGuard device, configured with wg(8), like wireguard-go"
)]
struct Cli {
    /// Log as JSON.
    #[arg(long, env = "WGMESH_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    device: wgmesh_device::cmd::DeviceArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    wgmesh_device::cmd::init_logging(cli.log_json);
    // Before any key is configured: no core dump or ptrace may expose it.
    wgmesh_device::process::forbid_core_dumps()
        .context("making the process non-dumpable (prctl PR_SET_DUMPABLE)")?;
    wgmesh_device::cmd::run(&cli.device, &[])?;
    Ok(())
}
