//! `wgmesh-device <iface>` (and the same as `wgmesh-agent device <iface>`): runs just the
//! WireGuard device, configured through `wg(8)` on its UAPI socket, the way
//! `wireguard-go <iface>` does. Daemonizes unless told to stay in the foreground; stops on
//! SIGINT/SIGTERM or when the interface is deleted. It owns the command's arguments, its
//! process (signals, daemonizing) and nothing of the device itself.

use crate::uapi::server::{ServeError, UapiServer};
use crate::{Device, DeviceConfig, DeviceError, DeviceHandle};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the parent waits for a daemonized device to bring up its socket.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The command's arguments (and options), flattened into the `wgmesh-device` binary and the agent's `device`
/// subcommand alike.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Interface name.
    pub interface: String,
    /// Stay in the foreground instead of daemonizing.
    #[arg(short, long, env = "WG_PROCESS_FOREGROUND", value_parser = parse_flag, default_value = "false", num_args = 0, default_missing_value = "true")]
    pub foreground: bool,
    /// Directory of the UAPI socket.
    #[arg(long, env = "WGMESH_SOCKET_DIR", default_value = crate::uapi::DEFAULT_SOCKET_DIR)]
    pub socket_dir: PathBuf,
    /// Interface MTU.
    #[arg(long, env = "WGMESH_MTU")]
    pub mtu: Option<u32>,
    /// Send and receive datagrams one by one, without UDP GSO/GRO.
    #[arg(long, env = "WGMESH_NO_UDP_OFFLOAD")]
    pub no_udp_offload: bool,
    /// Read and write the TUN device packet by packet, without TSO/checksum offload.
    #[arg(long, env = "WGMESH_NO_TUN_OFFLOAD")]
    pub no_tun_offload: bool,
}

/// Accepts `1`/`0` (as wireguard-go's WG_PROCESS_FOREGROUND) as well as `true`/`false`.
fn parse_flag(s: &str) -> Result<bool, String> {
    match s {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" | "" => Ok(false),
        other => Err(format!("not a boolean: {other}")),
    }
}

/// Why the `device` command failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceCmdError {
    /// Blocking signals failed.
    #[error("setting up signal handling")]
    Signals(#[source] std::io::Error),
    /// The device did not start.
    #[error("starting device")]
    Start(#[source] DeviceError),
    /// The UAPI socket could not be served.
    #[error("serving the UAPI socket")]
    Serve(#[source] ServeError),
    /// The background process could not be started.
    #[error("starting the background process")]
    Daemonize(#[source] std::io::Error),
    /// The background process exited or did not come up in time.
    #[error("background device did not come up: {0}")]
    DaemonFailed(String),
}

/// Runs the command; returns when the device has stopped (or, daemonizing, once the background
/// device is up). `subcommand` is what the running executable takes before the interface name
/// to run this command again, in the foreground, when it daemonizes: nothing for
/// `wgmesh-device`, `["device"]` for `wgmesh-agent`.
pub fn run(opts: &DeviceArgs, subcommand: &[&str]) -> Result<(), DeviceCmdError> {
    if !opts.foreground {
        return daemonize(opts, subcommand);
    }
    let signals = block_termination_signals()?;
    let device = Device::start(DeviceConfig {
        mtu: opts.mtu,
        udp_offload: !opts.no_udp_offload,
        tun_offload: !opts.no_tun_offload,
        ..DeviceConfig::new(opts.interface.clone())
    })
    .map_err(DeviceCmdError::Start)?;
    let mut uapi =
        UapiServer::start(device.clone(), &opts.socket_dir).map_err(DeviceCmdError::Serve)?;
    spawn_signal_waiter(signals, device.clone());
    device.wait();
    tracing::info!("stopping");
    uapi.shutdown();
    device.shutdown();
    Ok(())
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread, before any other thread exists, so every
/// thread inherits the mask and only the waiter thread receives them.
fn block_termination_signals() -> Result<libc::sigset_t, DeviceCmdError> {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(DeviceCmdError::Signals(std::io::Error::from_raw_os_error(
                rc,
            )));
        }
        Ok(set)
    }
}

fn spawn_signal_waiter(set: libc::sigset_t, device: DeviceHandle) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised sigset and `sig` a valid out pointer.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 {
                tracing::info!(signal = sig, "signal received");
            }
            device.shutdown();
        });
}

/// Starts this program again in the foreground, detached, and waits for its socket.
fn daemonize(opts: &DeviceArgs, subcommand: &[&str]) -> Result<(), DeviceCmdError> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(DeviceCmdError::Daemonize)?;
    let socket = opts.socket_dir.join(format!("{}.sock", opts.interface));
    let before = std::fs::metadata(&socket).and_then(|m| m.modified()).ok();
    let mut cmd = Command::new(exe);
    cmd.args(subcommand)
        .arg(&opts.interface)
        .arg("--foreground")
        .arg("--socket-dir")
        .arg(&opts.socket_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    if let Some(mtu) = opts.mtu {
        cmd.arg("--mtu").arg(mtu.to_string());
    }
    if opts.no_udp_offload {
        cmd.arg("--no-udp-offload");
    }
    if opts.no_tun_offload {
        cmd.arg("--no-tun-offload");
    }
    let mut child = cmd.spawn().map_err(DeviceCmdError::Daemonize)?;
    let deadline = Instant::now() + DAEMON_START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DeviceCmdError::DaemonFailed(format!(
                "exited with {status}"
            )));
        }
        let now = std::fs::metadata(&socket).and_then(|m| m.modified()).ok();
        if now.is_some() && now != before {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(DeviceCmdError::DaemonFailed(format!(
        "no socket at {} after {:?}",
        socket.display(),
        DAEMON_START_TIMEOUT
    )))
}

/// Sets up logging to stderr, as text or JSON lines; levels from `RUST_LOG` (default `info`).
/// For the binaries that run a device: `wgmesh-device` and `wgmesh-agent`.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
