//! The node agent: from the mesh's objects to the node's WireGuard device, routes, CNI
//! configuration and masquerading, and back to the node's `MeshPeer` status.
//!
//! Each pass observes (caches of MeshPeers, the Mesh, PodCIDRPools and this Node; the
//! kernel's routes and addresses; the device), plans with `wgmesh_core::topology`, and
//! applies the difference. Unchanged peers are never touched, so their sessions survive.
//! Routes fail closed: see `wgmesh_core::topology`.

mod api_client;
pub mod cni;
mod device_plan;
mod kernel;
pub mod masquerade;
pub mod metrics;
pub mod netlink;
pub mod observe;
mod relevance;
pub mod resume;
pub mod rotation;
mod status_plan;
pub mod uninstall;

use crate::key::KeyState;
use anyhow::Context;
use base64::Engine;
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use metrics::Metrics;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};
use wgmesh_api::{
    Mesh, MeshPeer, MeshPeerReport, MeshPeerReportSpec, MeshPeerStatus, PodCIDRPool,
    consts::{AGENT_MANAGER, DEFAULT_MESH},
    peer::{GrantReason, InstalledKey},
};
use wgmesh_core::api_view::ApiView;
use wgmesh_core::duration::backoff;
use wgmesh_core::net::Family;
use wgmesh_core::paths;
use wgmesh_core::topology::{self, LocalNode, NodePlan};
use wgmesh_device::config::{ConfigUpdate, Key, PeerSnapshot};
use wgmesh_device::uapi::server::UapiServer;
use wgmesh_device::{Device, DeviceConfig, DeviceHandle};
use wgmesh_telemetry::events::{EventPublisher, EventQueue, Notice, Target};

/// How often a pass runs without events: re-adds routes the kernel lost, refreshes stats.
const RESYNC: Duration = Duration::from_secs(10);
/// How long a change that woke the loop waits for the rest of its burst before a pass. Only
/// events that change what a pass reads wake it, so this is a join's latency, not a guard.
const COALESCE: Duration = Duration::from_millis(25);
/// How often a pass runs while this node rotates its key: it watches its sessions move.
const ROTATION_TICK: Duration = Duration::from_millis(500);
/// The wait before retrying a status write that failed; it doubles up to `RESYNC`.
const STATUS_RETRY_FIRST: Duration = Duration::from_millis(500);
/// A change of the node's report that only counts (a path more or less, its summary,
/// connectivity counts: what every join changes on every node) is written at most this
/// often. Handshake times alone never make a write; a steady node writes nothing.
const REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// How long the main loop may go without finishing a pass before `/healthz` fails (and the
/// kubelet restarts the agent): passes come at least every `RESYNC`, and every API request
/// in one is bounded.
const LIVENESS: Duration = Duration::from_secs(90);
/// The first and the longest wait before starting a device that failed to start again.
const DEVICE_RETRY_FIRST: Duration = Duration::from_secs(1);
const DEVICE_RETRY_MAX: Duration = Duration::from_secs(60);
/// The longest the agent waits for one API request in a pass: the pass (and with it the
/// rotation's steps) goes on without the answer.
const API_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// During a rotation, how old the API's last answer may be before the agent asks again:
/// the rotation's timeouts run only while the API answers.
const API_PROBE_EVERY: Duration = Duration::from_secs(2);

/// Configuration of `wgmesh-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The node this agent runs on (its `MeshPeer` has the same name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Name of the WireGuard interface.
    #[arg(long, env = "WGMESH_INTERFACE", default_value = "wgmesh0")]
    pub interface: String,
    /// Where the node's key lives (a hostPath in production).
    #[arg(long, env = "WGMESH_STATE_DIR", default_value = "/var/lib/wgmesh")]
    pub state_dir: PathBuf,
    /// Directory the CNI conflist is written to.
    #[arg(long, env = "WGMESH_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Where the agent keeps what must not outlive a reboot (a tmpfs): the CNI conflist
    /// itself, which `--cni-conf-dir` links to, so that after a reboot no pod is plumbed
    /// before the agent has put its blackhole routes and nftables rules back. The runtime
    /// follows the link on the host: mount it at the same path as on the host.
    #[arg(long, env = "WGMESH_RUN_DIR", default_value = "/run/wgmesh")]
    pub run_dir: PathBuf,
    /// Fault injection, for the supervision test: a file named after a datapath thread
    /// (`wg-timers`) appearing in this directory makes that thread panic (docs/architecture.md).
    #[arg(long, env = "WGMESH_FAILPOINTS_DIR", hide = true)]
    pub failpoints_dir: Option<PathBuf>,
    /// File name of the CNI conflist.
    #[arg(
        long,
        env = "WGMESH_CNI_CONF_NAME",
        default_value = "10-wgmesh.conflist"
    )]
    pub cni_conf_name: String,
    /// Name of the pod bridge.
    #[arg(long, env = "WGMESH_CNI_BRIDGE", default_value = "wgmesh-br")]
    pub cni_bridge: String,
    /// Where host-local IPAM keeps its allocations (default: its own default).
    #[arg(long, env = "WGMESH_CNI_IPAM_DATA_DIR")]
    pub cni_ipam_data_dir: Option<PathBuf>,
    /// Directory of the WireGuard UAPI socket (`wg show` reads it).
    #[arg(long, env = "WGMESH_SOCKET_DIR", default_value = wgmesh_device::uapi::DEFAULT_SOCKET_DIR)]
    pub socket_dir: PathBuf,
    /// Address of the metrics and health endpoint.
    #[arg(long, env = "WGMESH_METRICS_ADDR", default_value = "0.0.0.0:9091")]
    pub metrics_addr: SocketAddr,
    /// Route protocol number marking the routes this agent owns.
    #[arg(long, env = "WGMESH_ROUTE_PROTOCOL", default_value_t = 87)]
    pub route_protocol: u8,
    /// Namespace of this agent's pod and DaemonSet (from the downward API).
    #[arg(long, env = "POD_NAMESPACE", requires = "daemonset")]
    pub pod_namespace: Option<String>,
    /// Name of the DaemonSet that runs this agent. When set, the agent watches it, and on
    /// SIGTERM cleans the node (CNI configuration, routes, nftables table, bridge, key) only
    /// if it is gone: an uninstall. A restart or rolling update leaves the node as it is.
    #[arg(long, env = "WGMESH_DAEMONSET", requires = "pod_namespace")]
    pub daemonset: Option<String>,
    /// Seconds to wait at SIGTERM for a new agent to take the device over (an upgrade
    /// without loss: docs/architecture.md, "Restarts"). A new agent that starts while this
    /// one runs always takes over; 0 stops at once, keeping the interface for the next.
    #[arg(long, env = "WGMESH_HANDOVER_WAIT", default_value_t = 0)]
    pub handover_wait: u64,
}

/// How long a starting agent waits for its metrics port to be free (an agent it replaces
/// still holds it until the handover).
const METRICS_BIND_WAIT: Duration = Duration::from_secs(30);
/// The file name of the device's handover socket in the run directory.
const HANDOVER_SOCKET: &str = "handover.sock";
/// The longest a new agent's device waits for sessions with its peers before it takes the
/// datapath over from its predecessor.
const TAKE_OVER_BOUND: Duration = Duration::from_secs(3);
/// How long a predecessor waits for its successor to finish once it attached.
const HANDOVER_FINISH: Duration = Duration::from_secs(15);

/// Everything the agent reads from the cluster.
#[derive(Clone)]
struct Caches {
    peers: Store<MeshPeer>,
    meshes: Store<Mesh>,
    pools: Store<PodCIDRPool>,
    nodes: Store<Node>,
}

/// A cache of what `api` and `config` select, each object as `strip` leaves it. An event
/// wakes the loop (`notify`) only when it changes what a pass reads (`relevance`).
fn cache<K>(
    api: Api<K>,
    config: watcher::Config,
    notify: Arc<Notify>,
    strip: impl FnMut(&mut K) + Send + 'static,
    mut relevance: relevance::Relevance<K>,
    metrics: Arc<Metrics>,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&Default::default()).into_owned();
    let stream = watcher(api, config)
        .modify(strip)
        .default_backoff()
        .reflect(writer);
    tokio::spawn(stream.for_each(move |ev| {
        match ev {
            Err(e) => {
                warn!(error = %e, "watch failed; retrying");
                notify.notify_one();
            }
            Ok(ev) => {
                let wakes = relevance.changed(&ev);
                if matches!(ev, watcher::Event::Apply(_) | watcher::Event::Delete(_)) {
                    metrics.watch_event(&kind, wakes);
                }
                if wakes {
                    notify.notify_one();
                }
            }
        }
        futures::future::ready(())
    }));
    reader
}

/// A watch whose list is read from the API server's watch cache (`resourceVersion=0`, as
/// client-go's informers read it) in one request: asked for pages of 500, a 1.20 server
/// answered an agent's first list of 1,000 peers in two requests and 0.65 s, against one
/// request of 0.15 s without pages (`hack/bench-agents.sh`).
fn from_watch_cache() -> watcher::Config {
    watcher::Config {
        page_size: None,
        ..watcher::Config::default().any_semantic()
    }
}

/// The state the agent keeps between passes.
struct Agent {
    args: AgentArgs,
    keys: KeyState,
    rotator: rotation::Rotator,
    /// What this agent configured on the device: its peers by name (their primary keys) and
    /// the endpoint last written for each (see `device_plan`).
    configured: device_plan::Configured,
    /// The public halves of the device keys last applied: (initiating key, answered-only
    /// keys); the private keys stay in `keys`.
    device_keys_applied: Option<(Key, Vec<Key>)>,
    /// This node's acknowledgements of rotating peers' next keys, for status.
    installed_keys: Vec<InstalledKey>,
    netlink: netlink::Netlink,
    device: Option<DeviceHandle>,
    device_error: Option<String>,
    /// Device starts failed in a row, and when to try again (backoff from 1 s to 1 min).
    device_failures: u32,
    device_retry_at: Option<Instant>,
    /// The last start failed because this node has no TUN device at all: the one case
    /// where `hostGateway: Fallback` may route on-link peers in the clear.
    device_unavailable: bool,
    _uapi: Option<UapiServer>,
    /// A new device's take-over is under way (it runs once per device).
    taking_over: bool,
    peers_api: Api<MeshPeer>,
    /// This node's `MeshPeerReport` (written, never watched).
    reports_api: Api<MeshPeerReport>,
    /// Events go out in order from a task of their own, retried while the API is slow, so
    /// neither a pass waits for them nor a slow moment loses one.
    events: EventQueue,
    /// The uid of this node's `MeshPeer` and of its `MeshPeerReport`, as last seen: Events
    /// name them, or `kubectl describe` does not show them.
    own_uid: Option<String>,
    report_uid: Option<String>,
    metrics: Arc<Metrics>,
    masquerade_loaded: Option<masquerade::Loaded>,
    last_status: Option<serde_json::Value>,
    /// The last report written: the uid of the peer that owns it, and what it said.
    last_report: Option<(String, serde_json::Value)>,
    last_report_write: Option<Instant>,
    /// The paths of the last status, to tell when one changes (a `PathChanged` Event).
    last_paths: Option<BTreeMap<String, status_plan::PathKey>>,
    /// Values of the public endpoint annotation that are no endpoint, once said.
    bad_public_endpoints: Vec<String>,
    /// Status writes failed in a row: the next pass comes sooner than the resync, so an
    /// acknowledgement a peer's rotation waits for is not held back by one refused write.
    status_failures: u32,
    fallback_reported: bool,
    /// The last pass found the device up, every route installed and the CNI configuration
    /// written: what `/readyz` reports.
    ready: bool,
    /// Whether the missing own peer was reported (reset when it appears).
    own_peer_missing_reported: bool,
    /// The device as last saved for a restart (`resume`).
    last_saved: Option<resume::Saved>,
    /// When the API last answered, and since when without a break: a rotation's timeouts
    /// run only while this view is current.
    api_view: ApiView,
}

/// Whether the API server answered a request that failed: it refused it (a 4xx status), so
/// the agent's view of the API is current. Transport errors, timeouts and server errors (5xx:
/// the server may be cut off from etcd) mean it is not.
fn answered(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code < 500)
}

/// Whether a device start failed because the kernel offers no TUN device (no
/// `/dev/net/tun`, no driver), not for a reason a retry may fix.
fn no_tun(e: &wgmesh_device::DeviceError) -> bool {
    match e {
        wgmesh_device::DeviceError::CreateTun { source, .. } => {
            source.kind() == std::io::ErrorKind::NotFound
                || matches!(
                    source.raw_os_error(),
                    Some(libc::ENODEV | libc::ENXIO | libc::ENOENT)
                )
        }
        _ => false,
    }
}

fn decode_key(b64: &str) -> Option<Key> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()?
        .try_into()
        .ok()
}

use status_plan::time;

/// What the node publishes about where it is reached.
struct Published {
    /// Its endpoint within its location.
    endpoint: Option<SocketAddr>,
    /// Its public endpoints (annotation or `ExternalIP`s).
    public_endpoints: Vec<SocketAddr>,
    /// The MTU of its underlay link.
    underlay_mtu: u32,
}

/// Runs the agent until interrupted.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let (keys, fresh) = KeyState::load_or_generate(&args.state_dir, SystemTime::now())
        .context("loading the node's WireGuard key")?;
    info!(
        public_key = %keys.current.public_base64(),
        generation = keys.current.generation,
        rotation = ?keys.phase,
        generated = fresh,
        node = %args.node_name,
        "node key ready"
    );
    let mut forwarding = enable_forwarding();

    let client = api_client::client().await?;
    let netlink = netlink::Netlink::connect(args.route_protocol)?;
    let metrics = Arc::new(Metrics::new());
    let notify = Arc::new(Notify::new());
    let mut agent = Agent {
        keys,
        rotator: rotation::Rotator::default(),
        configured: device_plan::Configured::default(),
        device_keys_applied: None,
        installed_keys: Vec::new(),
        netlink,
        device: None,
        device_error: None,
        device_failures: 0,
        device_retry_at: None,
        device_unavailable: false,
        _uapi: None,
        taking_over: false,
        peers_api: Api::all(client.clone()),
        reports_api: Api::all(client.clone()),
        events: {
            let metrics = metrics.clone();
            // One at a time: a node's Events come out in the order they happened.
            EventQueue::spawn(
                EventPublisher::new(client.clone(), AGENT_MANAGER, &args.node_name),
                EVENT_QUEUE,
                1,
                API_REQUEST_TIMEOUT,
                move || metrics.error("event"),
            )
        },
        own_uid: None,
        report_uid: None,
        metrics: metrics.clone(),
        masquerade_loaded: None,
        last_status: None,
        last_report: None,
        last_report_write: None,
        last_paths: None,
        bad_public_endpoints: Vec::new(),
        status_failures: 0,
        fallback_reported: false,
        ready: false,
        own_peer_missing_reported: false,
        last_saved: None,
        api_view: ApiView::default(),
        args,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    // The datapath first, from what the last run saved: the API server may be slow or away.
    agent.resume().await;

    // Each cache lists from the API server's watch cache (`from_watch_cache`): an agent's
    // start and a relist after a broken watch make no quorum read of every peer from etcd,
    // and the watch follows every change from there.
    let own = agent.args.node_name.clone();
    let caches = Caches {
        peers: cache(
            Api::all(client.clone()),
            from_watch_cache(),
            notify.clone(),
            move |p| relevance::strip_peer(p, &own),
            relevance::Relevance::new(relevance::peer_reduction()),
            metrics.clone(),
        ),
        meshes: cache(
            Api::all(client.clone()),
            from_watch_cache().fields(&format!("metadata.name={DEFAULT_MESH}")),
            notify.clone(),
            |m: &mut Mesh| m.metadata.managed_fields = None,
            relevance::Relevance::new(relevance::whole),
            metrics.clone(),
        ),
        pools: cache(
            Api::all(client.clone()),
            from_watch_cache(),
            notify.clone(),
            |p: &mut PodCIDRPool| p.metadata.managed_fields = None,
            relevance::Relevance::new(relevance::whole),
            metrics.clone(),
        ),
        nodes: cache(
            Api::all(client.clone()),
            from_watch_cache().fields(&format!("metadata.name={}", agent.args.node_name)),
            notify.clone(),
            relevance::strip_node,
            relevance::Relevance::new(relevance::whole),
            metrics.clone(),
        ),
    };
    // An agent being replaced holds the port until the new one has its device.
    let http = tokio::spawn(wgmesh_telemetry::serve_when_free(
        agent.args.metrics_addr,
        metrics.telemetry(),
        METRICS_BIND_WAIT,
    ));
    let synced = async {
        for ready in [
            caches.peers.wait_until_ready().await,
            caches.meshes.wait_until_ready().await,
            caches.pools.wait_until_ready().await,
            caches.nodes.wait_until_ready().await,
        ] {
            ready.map_err(|_| anyhow::anyhow!("a cache stopped before it was ready"))?;
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = synced => r?,
        _ = term.recv() => {
            agent.stop_for_restart().await;
            return Ok(());
        }
    }
    info!("caches synced");
    // The agent's own DaemonSet, to tell an uninstall from a restart at SIGTERM. Not waited
    // for: without it (no DaemonSet configured, or no permission) the node is never cleaned.
    let owner = match (&agent.args.pod_namespace, &agent.args.daemonset) {
        (Some(ns), Some(name)) => Some(cache(
            Api::<DaemonSet>::namespaced(client.clone(), ns),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
            Arc::new(Notify::new()),
            |d: &mut DaemonSet| d.metadata.managed_fields = None,
            relevance::Relevance::new(relevance::whole),
            metrics.clone(),
        )),
        _ => None,
    };

    loop {
        agent.supervise_device(&caches).await?;
        if agent.device.as_ref().is_some_and(DeviceHandle::handed_over) {
            metrics.set_readiness(false);
            info!("the new agent has the datapath; this one idles until it is stopped");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return Ok(());
        }
        let started = Instant::now();
        if let Err(e) = agent.pass(&caches).await {
            agent.ready = false;
            error!(error = %format!("{e:#}"), "pass failed");
        }
        metrics
            .pass_duration
            .observe(started.elapsed().as_secs_f64());
        if !forwarding {
            forwarding = enable_forwarding();
        }
        metrics.set_readiness(agent.ready && forwarding);
        metrics.telemetry().beat(LIVENESS);
        let resync = if rotation::Rotator::active(&agent.keys) {
            ROTATION_TICK
        } else {
            // Wake when a retired key's grace period ends, to delete it on time.
            agent
                .keys
                .previous
                .iter()
                .map(|(_, until)| *until)
                .min()
                .and_then(|until| until.duration_since(SystemTime::now()).ok())
                .map_or(RESYNC, |d| d.min(RESYNC) + Duration::from_millis(50))
        };
        let resync = match agent.status_failures {
            0 => resync,
            n => resync.min(backoff(n, STATUS_RETRY_FIRST, RESYNC)),
        };
        // A device that failed to start is tried again on time.
        let resync = match (&agent.device, agent.device_retry_at) {
            (None, Some(at)) => resync.min(at.saturating_duration_since(Instant::now())),
            _ => resync,
        };
        tokio::select! {
            _ = notify.notified() => tokio::time::sleep(COALESCE).await,
            _ = tokio::time::sleep(resync) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let handing_over = agent
            .device
            .as_ref()
            .is_some_and(DeviceHandle::is_handing_over);
        if handing_over {
            // The new agent's endpoint takes this one's place.
            http.abort();
        } else if http.is_finished() {
            anyhow::bail!("the metrics endpoint stopped");
        }
    }
    metrics.set_readiness(false);
    if agent.args.handover_wait > 0 {
        // A new agent's endpoint takes this one's place.
        http.abort();
    }
    let watched = owner.as_ref().map_or(uninstall::Owner::Unknown, owner_in);
    // The API is read only when the watch does not already show the DaemonSet gone.
    let clean = uninstall::gone(watched)
        || match (&agent.args.pod_namespace, &agent.args.daemonset) {
            (Some(ns), Some(name)) => {
                uninstall::gone(read_owner(Api::namespaced(client.clone(), ns), name).await)
            }
            _ => false,
        };
    if clean {
        info!("this agent's DaemonSet is gone: removing wgmesh from the node");
        agent.clean_node().await;
        if let Some(d) = &agent.device {
            d.shutdown();
        }
    } else {
        agent.stop_for_restart().await;
    }
    Ok(())
}

/// The agent's DaemonSet as the watch last saw it.
fn owner_in(store: &Store<DaemonSet>) -> uninstall::Owner {
    use futures::FutureExt;
    // A watch that never synced (no permission, no API) knows nothing.
    if !matches!(store.wait_until_ready().now_or_never(), Some(Ok(()))) {
        return uninstall::Owner::Unknown;
    }
    match store.state().first() {
        Some(ds) if ds.metadata.deletion_timestamp.is_some() => uninstall::Owner::Deleting,
        Some(_) => uninstall::Owner::Present,
        None => uninstall::Owner::Gone,
    }
}

/// The agent's DaemonSet as the API server says now (bounded: shutdown must not hang).
async fn read_owner(api: Api<DaemonSet>, name: &str) -> uninstall::Owner {
    match tokio::time::timeout(Duration::from_secs(3), api.get_opt(name)).await {
        Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => uninstall::Owner::Deleting,
        Ok(Ok(Some(_))) => uninstall::Owner::Present,
        Ok(Ok(None)) => uninstall::Owner::Gone,
        Ok(Err(e)) => {
            warn!(error = %e, "could not read this agent's DaemonSet; leaving the node as it is");
            uninstall::Owner::Unknown
        }
        Err(_) => {
            warn!("reading this agent's DaemonSet timed out; leaving the node as it is");
            uninstall::Owner::Unknown
        }
    }
}

/// Events waiting for the API server at most; more are dropped (and said so).
const EVENT_QUEUE: usize = 256;

/// Blocks until a successor has the device, or `wait` passed without one attaching, or a
/// successor that attached did not finish within [`HANDOVER_FINISH`].
fn wait_for_successor(device: &DeviceHandle, wait: Duration) {
    let started = Instant::now();
    while !device.handed_over() {
        let elapsed = started.elapsed();
        if (!device.is_handing_over() && elapsed >= wait) || elapsed >= wait + HANDOVER_FINISH {
            warn!("no new agent took the device over; stopping without it");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether an underlay address can reach another location: not link-local (every IPv6 link
/// has an `fe80::` address, which says nothing about an IPv6 underlay).
fn routable(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_loopback(),
        std::net::IpAddr::V6(v6) => !v6.is_unicast_link_local() && !v6.is_loopback(),
    }
}

/// Turns IPv4 and IPv6 forwarding on, as routing between pods and the device needs, and
/// reports whether IPv4 forwarding is on. A container without a writable `/proc/sys` (every
/// unprivileged one) cannot set it; nodes normally have it on already (kubeadm requires it),
/// and when they do not, the agent says so and stays not ready.
fn enable_forwarding() -> bool {
    const V4: &str = "/proc/sys/net/ipv4/ip_forward";
    for path in [V4, "/proc/sys/net/ipv6/conf/all/forwarding"] {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        if let Err(e) = std::fs::write(path, "1") {
            warn!(%path, error = %e, "could not enable forwarding");
        }
    }
    let on = std::fs::read_to_string(V4).is_ok_and(|v| v.trim() == "1");
    if !on {
        error!(
            "IPv4 forwarding is off on this node and this container cannot turn it on: set \
             net.ipv4.ip_forward=1 on the node (as kubeadm requires), or run the agent \
             privileged (chart value agent.privileged=true); pods cannot reach other nodes \
             until then"
        );
    }
    on
}

impl Agent {
    fn mesh(&self, caches: &Caches) -> observe::MeshSettings {
        let mesh = caches
            .meshes
            .state()
            .into_iter()
            .find(|m| m.name_any() == DEFAULT_MESH);
        observe::mesh_settings(mesh.as_deref())
    }

    fn node(&self, caches: &Caches) -> Option<Arc<Node>> {
        caches
            .nodes
            .state()
            .into_iter()
            .find(|n| n.name_any() == self.args.node_name)
    }

    /// The underlay MTU: that of the link holding the node's endpoint address.
    async fn underlay_mtu(&self, endpoint: Option<SocketAddr>) -> u32 {
        kernel::underlay_mtu(&self.netlink, endpoint.map(|e| e.ip())).await
    }

    async fn start_device(&mut self, caches: &Caches) {
        let mesh = self.mesh(caches);
        let endpoint = self
            .node(caches)
            .and_then(|n| observe::endpoint(&n, mesh.endpoint_address_type, mesh.listen_port));
        let mtu = topology::mtu(
            mesh.mtu,
            self.underlay_mtu(endpoint).await,
            endpoint.is_some_and(|e| e.is_ipv6()),
        );
        self.start_device_with(mesh.listen_port, mtu).await;
    }

    /// Stops for a restart (an upgrade, a rescheduling): the interface stays, with its
    /// addresses and routes, for the next agent to attach to; packets routed to it meanwhile
    /// are dropped, and the blackholes, the nftables rules and the CNI configuration stay.
    async fn stop_for_restart(&mut self) {
        if let Some(d) = self.device.clone()
            && self.args.handover_wait > 0
            && !d.handed_over()
        {
            // The new agent's UAPI socket takes this one's place.
            self._uapi = None;
            let wait = Duration::from_secs(self.args.handover_wait);
            info!(?wait, "waiting for a new agent to take the device over");
            let waiting = d.clone();
            let _ = tokio::task::spawn_blocking(move || wait_for_successor(&waiting, wait)).await;
        }
        if let Some(d) = &self.device
            && d.handed_over()
        {
            info!("the new agent has the device; exiting");
            d.shutdown();
            return;
        }
        if let Some(d) = &self.device {
            match d.keep_interface() {
                Ok(()) => {
                    info!(interface = %self.args.interface, "shutting down; the interface and its routes stay for the next agent")
                }
                Err(e) => {
                    warn!(error = %e, "shutting down; the interface could not be kept, its routes go with it (the blackholes stay)")
                }
            }
            d.shutdown();
        } else {
            info!("shutting down");
        }
    }

    /// Brings the datapath back from what the last pass saved, before the API has answered:
    /// the device with its peers (handshakes start at once) and the routes through it. A node
    /// with nothing saved starts as before, once the API has answered.
    /// A device that found a predecessor takes the datapath over once its peers are
    /// configured (in the background: it waits for their handshakes, a few seconds at most).
    fn take_over(&mut self, device: &DeviceHandle) {
        if self.taking_over || !device.is_taking_over() {
            return;
        }
        self.taking_over = true;
        let device = device.clone();
        std::thread::spawn(move || device.take_over(TAKE_OVER_BOUND));
    }

    async fn resume(&mut self) {
        let Some(saved) = resume::load(&self.args.state_dir) else {
            return;
        };
        let started = Instant::now();
        self.start_device_with(saved.listen_port, saved.mtu).await;
        let Some(device) = self.device.clone() else {
            return;
        };
        self.apply_device(device, &saved.device_plan(), &BTreeMap::new());
        let index = self
            .netlink
            .link(&self.args.interface)
            .await
            .ok()
            .map(|l| l.index);
        let mut routed = 0;
        for dst in &saved.routes {
            let route = topology::Route {
                dst: *dst,
                via: topology::NextHop::Device,
                metric: topology::ROUTE_METRIC,
            };
            // A route the kept interface still has is fine; the first pass reconciles.
            if self.netlink.add_route(&route, index).await.is_ok() {
                routed += 1;
            }
        }
        info!(
            peers = saved.peers.len(),
            routes_added = routed,
            routes = saved.routes.len(),
            took = ?started.elapsed(),
            "resumed the device from its saved state, before hearing from the API server"
        );
        self.last_saved = Some(saved);
    }

    async fn start_device_with(&mut self, listen_port: u16, mtu: u32) {
        let (primary, _) = self.keys.device_keys();
        let config = DeviceConfig {
            mtu: Some(mtu),
            up: true,
            listen_port,
            private_key: Some(primary),
            failpoints: self.args.failpoints_dir.clone(),
            handover: Some(self.args.run_dir.join(HANDOVER_SOCKET)),
            ..DeviceConfig::new(self.args.interface.clone())
        };
        match Device::start(config) {
            Ok(handle) => {
                info!(interface = %self.args.interface, mtu, port = listen_port, "WireGuard device up");
                match UapiServer::start(handle.clone(), &self.args.socket_dir) {
                    Ok(s) => self._uapi = Some(s),
                    Err(e) => {
                        warn!(error = %e, "UAPI socket unavailable; `wg show` will not see the device")
                    }
                }
                self.device = Some(handle);
                self.taking_over = false;
                self.device_error = None;
                self.device_failures = 0;
                self.device_retry_at = None;
                self.device_unavailable = false;
                self.device_keys_applied = None;
                self.apply_device_keys();
                self.metrics.device_up.set(1);
            }
            Err(e) => {
                self.device_unavailable = no_tun(&e);
                self.device_failures = self.device_failures.saturating_add(1);
                let wait = backoff(self.device_failures, DEVICE_RETRY_FIRST, DEVICE_RETRY_MAX);
                self.device_retry_at = Some(Instant::now() + wait);
                error!(interface = %self.args.interface, error = %format!("{e:#}"), retry_in = ?wait, "the WireGuard device could not come up");
                // An interface of that name that cannot be attached to (kept by an agent
                // whose device had other settings) is removed, so the next try creates it.
                if matches!(e, wgmesh_device::DeviceError::CreateTun { .. })
                    && !self.device_unavailable
                    && self.netlink.link(&self.args.interface).await.is_ok()
                {
                    match self.netlink.delete_link(&self.args.interface).await {
                        Ok(()) => {
                            warn!(interface = %self.args.interface, "removed an interface of the device's name that could not be attached to")
                        }
                        Err(d) => warn!(error = %d, "could not remove the interface in the way"),
                    }
                }
                self.device_error = Some(format!("{:#}", anyhow::Error::from(e)));
                self.metrics.device_up.set(0);
                self.metrics.error("device");
            }
        }
    }

    /// Keeps the device running: a device whose datapath failed ends the agent (its pod
    /// restarts it, rather than a half-dead datapath running on); a device that stopped
    /// because its interface was deleted, or that never came up, is started again, with a
    /// backoff between failed starts.
    async fn supervise_device(&mut self, caches: &Caches) -> anyhow::Result<()> {
        if let Some(device) = &self.device {
            if device.is_handing_over() {
                // Until it is done, the old device serves; the new agent's UAPI takes over.
                self._uapi = None;
                return Ok(());
            }
            if let Some(why) = device.failure() {
                self.metrics.device_up.set(0);
                anyhow::bail!(
                    "the WireGuard device failed ({why}); exiting so that the agent restarts"
                );
            }
            if device.is_stopped() {
                warn!(interface = %self.args.interface, "the WireGuard device stopped (its interface was deleted?); starting it again");
                self.metrics.device_up.set(0);
                self.metrics.read_peers_from(None);
                self.device = None;
                self._uapi = None;
                self.configured = device_plan::Configured::default();
                self.device_retry_at = None;
            }
        }
        if self.device.is_none() && self.device_retry_at.is_none_or(|at| Instant::now() >= at) {
            self.start_device(caches).await;
        }
        // The UAPI socket of an agent that took the device over frees once the old one goes.
        if let Some(device) = &self.device
            && self._uapi.is_none()
            && !device.is_taking_over()
            && let Ok(s) = UapiServer::start(device.clone(), &self.args.socket_dir)
        {
            info!("UAPI socket up");
            self._uapi = Some(s);
        }
        Ok(())
    }

    /// The node's public endpoints; says once when its annotation holds a value that is no
    /// endpoint (it is left out).
    fn public_endpoints(&mut self, node: Option<&Node>, port: u16) -> Vec<SocketAddr> {
        let (good, bad) = node
            .map(|n| observe::public_endpoints(n, port))
            .unwrap_or_default();
        if !bad.is_empty() && self.bad_public_endpoints != bad {
            warn!(
                annotation = wgmesh_api::consts::PUBLIC_ENDPOINT_ANNOTATION,
                values = ?bad,
                "not an IP address or ip:port; left out of the node's public endpoints"
            );
        }
        self.bad_public_endpoints = bad;
        good
    }

    /// Says once when this node has no peer of its own yet, and whether a peer with its
    /// name that it does not trust is in the way.
    fn report_own_peer(&mut self, found: bool, peers: &[Arc<MeshPeer>]) {
        if found || self.own_peer_missing_reported {
            self.own_peer_missing_reported = !found;
            return;
        }
        self.own_peer_missing_reported = true;
        if peers.iter().any(|p| p.name_any() == self.args.node_name) {
            warn!(
                peer = %self.args.node_name,
                "a MeshPeer has this node's name but was not made by the operator for this Node; \
                 it is ignored (no CNI configuration, no status) until the operator replaces it"
            );
        } else {
            info!("waiting for the operator to make this node's MeshPeer");
        }
    }

    /// A new node's key and endpoints, as soon as its device answers under the key: the
    /// operator approves them and every other node adds this one while this pass configures
    /// the device, routes and CNI for every other peer (at 1,000 peers, a quarter of a second
    /// off a join). Only while the peer has no key at all and this agent has written no
    /// status: the pass's full status write follows, under the same field manager.
    async fn publish_first_key(
        &mut self,
        own: &MeshPeer,
        endpoint: Option<SocketAddr>,
        node: Option<&Node>,
        port: u16,
    ) {
        let unpublished = own.status.as_ref().is_none_or(|s| s.public_key.is_none());
        if !unpublished || self.last_status.is_some() || self.device.is_none() {
            return;
        }
        let status = MeshPeerStatus {
            public_key: Some(self.keys.current.public_base64()),
            key_generation: Some(self.keys.current.generation),
            key_created_at: time(self.keys.current.created_at),
            endpoints: endpoint.map(|e| e.to_string()).into_iter().collect(),
            public_endpoints: self
                .public_endpoints(node, port)
                .iter()
                .map(ToString::to_string)
                .collect(),
            ..Default::default()
        };
        let body = serde_json::to_value(&status).unwrap_or_default();
        match self.apply_status(body).await {
            Ok(Ok(_)) => {
                self.metrics.status_writes.inc();
                info!("published the node's key");
            }
            // The pass's status write tries again.
            Ok(Err(e)) => debug!(error = %e, "publishing the node's key early failed"),
            Err(_) => debug!("publishing the node's key early got no answer in time"),
        }
    }

    /// Applies `status` (the agent's fields) to this node's peer, under the agent's field
    /// manager, within [`API_REQUEST_TIMEOUT`].
    async fn apply_status(
        &self,
        status: serde_json::Value,
    ) -> Result<Result<MeshPeer, kube::Error>, tokio::time::error::Elapsed> {
        let patch = Patch::Apply(serde_json::json!({
            "apiVersion": "wgmesh.dev/v1alpha1",
            "kind": "MeshPeer",
            "status": status,
        }));
        let params = PatchParams::apply(AGENT_MANAGER).force();
        let write = self
            .peers_api
            .patch_status(&self.args.node_name, &params, &patch);
        tokio::time::timeout(API_REQUEST_TIMEOUT, write).await
    }

    /// One observe → plan → apply pass.
    async fn pass(&mut self, caches: &Caches) -> anyhow::Result<()> {
        self.metrics.applies.inc();
        let mesh = self.mesh(caches);
        let node = self.node(caches);
        let endpoint = node
            .as_deref()
            .and_then(|n| observe::endpoint(n, mesh.endpoint_address_type, mesh.listen_port));
        let peers = caches.peers.state();
        let own = node
            .as_deref()
            .and_then(|n| observe::own_peer(&peers, n))
            .cloned();
        self.report_own_peer(own.is_some(), &peers);
        if let Some(own) = own.as_deref() {
            self.own_uid.clone_from(&own.metadata.uid);
            self.publish_first_key(own, endpoint, node.as_deref(), mesh.listen_port)
                .await;
        }
        let own_subnets: Vec<IpNet> = own
            .as_ref()
            .map(|p| {
                p.spec
                    .pod_cidrs
                    .iter()
                    .filter_map(|c| c.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let approved =
            observe::approved_peers(peers.iter().map(AsRef::as_ref), &self.args.node_name);
        let pools: Vec<IpNet> = caches
            .pools
            .state()
            .iter()
            .flat_map(|p| p.spec.cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()))
            .map(|n| n.trunc())
            .collect();
        // Blackholed as a whole besides every pool: every node subnet the API shows outside
        // all pools (`ipam.source: NodeSpec`), approved or not yet, so it is never routed to
        // the default gateway either.
        let mut fences = pools.clone();
        fences.extend(
            peers
                .iter()
                .filter(|p| p.name_any() != self.args.node_name)
                .flat_map(|p| {
                    p.spec
                        .pod_cidrs
                        .iter()
                        .filter_map(|c| c.parse::<IpNet>().ok())
                })
                .map(|n| n.trunc())
                .filter(|n| !pools.iter().any(|pool| pool.contains(n))),
        );
        fences.sort();
        fences.dedup();

        // Observe the kernel.
        let kernel::Observed {
            device: device_link,
            on_link,
        } = kernel::observe(&self.netlink, &self.args.interface, &self.args.cni_bridge).await?;
        let device_index = device_link.as_ref().map(|l| l.index);
        let device_up =
            self.device.as_ref().is_some_and(|d| !d.is_stopped()) && device_index.is_some();

        // Paths across locations: which address of each peer, keepalives, relays.
        let mut families: Vec<Family> = on_link
            .iter()
            .filter(|n| routable(n.addr()))
            .map(Family::of)
            .collect();
        families.sort();
        families.dedup();
        let me = observe::me(
            &self.args.node_name,
            own.as_deref(),
            node.as_deref(),
            &mesh.location_label,
            families,
        );
        let local_underlay_mtu = self.underlay_mtu(endpoint).await;
        let path_plan = paths::plan(&me, &approved, Some(local_underlay_mtu), &mesh.paths);
        let plan = topology::plan_node(
            &LocalNode {
                name: self.args.node_name.clone(),
                location: me.location.clone(),
                on_link,
                device_up,
                device_unavailable: !device_up && self.device_unavailable,
            },
            &mesh.transport,
            &path_plan.peers,
            &fences,
        );

        self.apply_listen_port(mesh.listen_port).await;

        // Key rotation: step it, then give the device the keys its phase calls for.
        let relayed: BTreeSet<String> = path_plan
            .paths
            .iter()
            .filter(|(_, p)| matches!(p.kind, paths::PathKind::Relay { .. }))
            .map(|(name, _)| name.clone())
            .collect();
        self.rotate(own.as_deref(), &peers, &approved, &relayed, &mesh)
            .await;
        self.apply_device_keys();

        // Apply: device, addresses, routes, CNI, masquerade.
        if let (Some(device), Some(index)) = (&self.device, device_index) {
            let next_generations = observe::next_generations(peers.iter().map(AsRef::as_ref));
            self.installed_keys = self.apply_device(device.clone(), &plan, &next_generations);
            for failure in kernel::apply_addresses(&self.netlink, index, &own_subnets).await {
                self.metrics.error("address");
                warn!(error = %failure, "adding the interface address failed");
            }
        }
        let (routes_ok, fenced) = self.apply_routes(&plan, device_index).await;
        // The MTU the Mesh asks for (`auto`: from the underlay), on the device every pass,
        // and for the pods.
        // `auto`: the smallest underlay of the mesh, less the overhead of the endpoints'
        // family.
        let mtu = topology::mtu(
            mesh.mtu,
            path_plan.underlay_mtu.unwrap_or(local_underlay_mtu),
            path_plan.ipv6_endpoints || endpoint.is_some_and(|e| e.is_ipv6()),
        );
        match kernel::apply_mtu(&self.netlink, device_link.as_ref(), mtu).await {
            Ok(Some(from)) => {
                info!(interface = %self.args.interface, from, to = mtu, "set the device's MTU")
            }
            Ok(None) => {}
            Err(e) => {
                self.metrics.error("device");
                warn!(error = %e, "setting the device's MTU failed");
            }
        }
        // The masquerade rules, then the CNI configuration: a pod is plumbed only once the
        // blackholes and the rules that keep its packets inside the mesh are in place.
        let mut mesh_space = pools.clone();
        mesh_space.extend(approved.iter().flat_map(|p| p.allowed_ips.iter().copied()));
        let rules = masquerade::ruleset(mesh.masquerade, &own_subnets, &mesh_space);
        // Pods are plumbed only while the table is known to be in place this pass.
        let masquerading =
            match masquerade::apply(&masquerade::Nft, &rules, self.masquerade_loaded.as_ref()) {
                Ok((what, loaded)) => {
                    if what == masquerade::Applied::Repaired {
                        warn!(
                            table = masquerade::TABLE,
                            "the nftables table was deleted or changed; loaded it again"
                        );
                    }
                    self.masquerade_loaded = Some(loaded);
                    true
                }
                Err(e) => {
                    self.metrics.error("masquerade");
                    warn!(error = %e, "loading the masquerade rules failed");
                    false
                }
            };
        let mut cni_ok = false;
        if !own_subnets.is_empty() && fenced && masquerading {
            let body = cni::conflist(&cni::CniSettings {
                network: cni::NETWORK.into(),
                bridge: self.args.cni_bridge.clone(),
                subnets: own_subnets.clone(),
                mtu,
                ipam_data_dir: self.args.cni_ipam_data_dir.clone(),
            });
            let text = serde_json::to_string_pretty(&body)?;
            match cni::install(
                &self.args.cni_conf_dir,
                &self.args.run_dir,
                &self.args.cni_conf_name,
                &text,
            ) {
                Ok(true) => {
                    cni_ok = true;
                    info!(dir = %self.args.cni_conf_dir.display(), file = %self.args.run_dir.join(&self.args.cni_conf_name).display(), subnets = ?own_subnets, "wrote the CNI configuration")
                }
                Ok(false) => cni_ok = true,
                Err(e) => {
                    self.metrics.error("cni");
                    warn!(error = %e, "writing the CNI configuration failed");
                }
            }
        } else if !own_subnets.is_empty() {
            warn!(
                blackholes = fenced,
                masquerade = masquerading,
                "not writing the CNI configuration until the blackhole routes and the nftables rules are in place"
            );
        }
        self.ready = device_up && routes_ok && cni_ok;

        // What a restarted agent brings back before the API answers (`resume`).
        if let Some(device) = &self.device {
            let saved = resume::Saved::of(&plan, device.listen_port(), mtu);
            if self.last_saved.as_ref() != Some(&saved) {
                match resume::store(&self.args.state_dir, &saved) {
                    Ok(()) => self.last_saved = Some(saved),
                    Err(e) => {
                        self.metrics.error("state");
                        warn!(error = %e, "saving the device's state for a restart failed");
                    }
                }
            }
        }

        self.report_fallback(&plan).await;
        self.update_peer_metrics();
        let published = Published {
            endpoint,
            public_endpoints: self.public_endpoints(node.as_deref(), mesh.listen_port),
            underlay_mtu: local_underlay_mtu,
        };
        self.publish_status(
            own.as_deref(),
            &published,
            device_up,
            routes_ok,
            &plan,
            &path_plan,
            &approved,
        )
        .await;
        Ok(())
    }

    /// Brings the device's peers to the plan (`device_plan`), and keeps the record of what
    /// it configured once the device took the update. Returns the rotating peers whose next
    /// key is now installed, with that key's generation: this node's acknowledgements
    /// (none if the update failed).
    fn apply_device(
        &mut self,
        device: DeviceHandle,
        plan: &NodePlan,
        next_generations: &BTreeMap<String, i64>,
    ) -> Vec<InstalledKey> {
        let configured = std::mem::take(&mut self.configured);
        let outcome =
            device_plan::reconcile(&device, configured, &plan.device_peers, next_generations);
        self.take_over(&device);
        match outcome {
            Ok((record, acks, changes)) => {
                if changes > 0 {
                    info!(changes, "updated WireGuard peers");
                }
                self.configured = record;
                acks
            }
            Err((record, e)) => {
                self.metrics.error("device");
                warn!(error = %e, "configuring the device failed");
                self.configured = record;
                Vec::new()
            }
        }
    }

    /// One step of this node's own key rotation (see `rotation`), with its Events, logs and
    /// metrics.
    async fn rotate(
        &mut self,
        own: Option<&MeshPeer>,
        peers: &[Arc<MeshPeer>],
        approved: &[topology::ApprovedPeer],
        relayed: &BTreeSet<String>,
        mesh: &observe::MeshSettings,
    ) {
        let status = own.and_then(|o| o.status.as_ref());
        // A grant older than an abandonment of this key is spent: only a new request (a new
        // grant) starts another rotation.
        let grant = status.and_then(|s| s.rotation_grant.as_ref()).filter(|g| {
            wgmesh_core::rotation::grant_in_force(
                g.generation,
                g.granted_at.as_ref().map(|t| SystemTime::from(t.0)),
                self.keys.current.generation,
                self.keys.abandoned_at,
            )
        });
        let next_approved = match (&self.keys.next, status.and_then(|s| s.approved.as_ref())) {
            (Some(next), Some(a)) => a.next_public_key.as_deref() == Some(&next.public_base64()),
            _ => false,
        };
        if rotation::Rotator::active(&self.keys)
            && self.api_view.stale(SystemTime::now(), API_PROBE_EVERY)
        {
            self.probe_api().await;
        }
        let inputs = rotation::Inputs {
            api_current_since: self.api_view.current(SystemTime::now()),
            granted: grant.is_some(),
            revoke: grant.is_some_and(|g| g.reason == GrantReason::Revoke),
            next_approved,
            // A peer reached through a relay has no session with this node to move; it
            // still acknowledges the next key (it holds it for the peer).
            peers: approved
                .iter()
                .filter(|p| p.is_node && !relayed.contains(&p.name))
                .map(|p| p.name.clone())
                .collect(),
            acknowledged: match &self.keys.next {
                Some(next) => observe::acknowledged(
                    peers.iter().map(AsRef::as_ref),
                    &self.args.node_name,
                    &next.public_base64(),
                ),
                None => BTreeSet::new(),
            },
            has_external_peers: approved.iter().any(|p| !p.is_node),
            external_grace: mesh.external_grace,
        };
        let snapshot = self
            .device
            .as_ref()
            .map(DeviceHandle::snapshot)
            .unwrap_or_default();
        let device_peers = rotation::Rotator::by_name(&snapshot, &self.configured.names);
        let notices = match self.rotator.tick(
            &mut self.keys,
            &inputs,
            &mesh.rotation_timeouts,
            &device_peers,
            &self.args.state_dir,
            SystemTime::now(),
        ) {
            Ok(n) => n,
            Err(e) => {
                self.metrics.error("key");
                error!(error = %e, "storing the key rotation state failed; retrying");
                return;
            }
        };
        self.metrics
            .key_generation
            .set(self.keys.current.generation);
        self.metrics.rotation_phase.set(match self.keys.phase {
            wgmesh_core::rotation::Phase::Steady { .. } => 0,
            wgmesh_core::rotation::Phase::Prepared { .. } => 1,
            wgmesh_core::rotation::Phase::Switched { .. } => 2,
        });
        for notice in notices {
            self.log_notice(&notice);
            let previous_until = self.keys.previous.iter().map(|(_, until)| *until).max();
            let ev = rotation::event(&notice, previous_until);
            self.publish_event(ev.warning, ev.reason, "RotateKey", ev.note);
        }
    }

    /// Logs a rotation notice and counts it in the metrics (its Event is `rotation::event`).
    fn log_notice(&self, notice: &rotation::Notice) {
        match notice {
            rotation::Notice::Prepared { generation, revoke } => {
                info!(generation, revoke, next = %self.keys.next.as_ref().map(|k| k.public_base64()).unwrap_or_default(), "key rotation: next key generated; publishing it");
            }
            rotation::Notice::Switched { generation } => {
                info!(
                    generation,
                    "key rotation: initiating with the next key; still answering under the old one"
                );
            }
            rotation::Notice::Completed {
                generation,
                took,
                laggards,
                revoked,
                dropped,
            } => {
                let secs = took.map(|d| d.as_secs_f64()).unwrap_or_default();
                self.metrics.rotation_seconds.set(secs);
                self.metrics.rotation_ended(if laggards.is_empty() {
                    "completed"
                } else {
                    "laggards"
                });
                info!(
                    generation,
                    seconds = secs,
                    ?laggards,
                    revoked,
                    dropped,
                    "key rotation completed; the old key is retired"
                );
            }
            rotation::Notice::Laggards { step, peers } => {
                warn!(?step, ?peers, "key rotation goes on without these peers");
            }
            rotation::Notice::Abandoned { generation } => {
                self.metrics.rotation_ended("abandoned");
                warn!(
                    generation,
                    "key rotation abandoned: the next key was never approved"
                );
            }
            rotation::Notice::PreviousKeyDeleted => {
                info!("the retired key's grace period ended; it is deleted");
            }
        }
    }

    /// Binds the device to the Mesh's `listenPort` if it listens elsewhere: a changed port
    /// takes effect without a restart (peers follow the endpoint this node publishes, and
    /// roam to the new source port as soon as a packet arrives from it).
    async fn apply_listen_port(&mut self, port: u16) {
        let Some(device) = &self.device else {
            return;
        };
        let was = device.listen_port();
        if was == port {
            return;
        }
        match device.set_listen_port(port) {
            Ok(now) => {
                info!(
                    from = was,
                    to = now,
                    "the device listens on the Mesh's new port"
                );
                self.publish_event(
                    false,
                    "ListenPortChanged",
                    "Reconfigure",
                    format!("the WireGuard device listens on UDP port {now} (was {was})"),
                );
            }
            Err(e) => {
                self.metrics.error("device");
                warn!(error = %format!("{:#}", anyhow::Error::from(e)), from = was, to = port, "moving the device to the Mesh's listenPort failed; it stays on the old port and the agent retries every pass");
            }
        }
    }

    /// Asks the API server for this node's `MeshPeer` (a list narrowed to it: the agent may
    /// list, not get), to learn whether it answers; bounded by [`API_REQUEST_TIMEOUT`], so
    /// an unreachable server delays a pass, never stops it.
    async fn probe_api(&mut self) {
        let params = ListParams::default()
            .fields(&format!("metadata.name={}", self.args.node_name))
            .limit(1);
        match tokio::time::timeout(API_REQUEST_TIMEOUT, self.peers_api.list(&params)).await {
            Ok(Ok(_)) => self.api_view.answered(SystemTime::now()),
            Ok(Err(e)) if answered(&e) => {
                self.api_view.answered(SystemTime::now());
                warn!(error = %e, "the API server refused the agent's probe");
            }
            Ok(Err(e)) => {
                self.api_view.failed();
                warn!(error = %e, "the API server did not answer; rotation timeouts are paused");
            }
            Err(_) => {
                self.api_view.failed();
                warn!(
                    timeout = ?API_REQUEST_TIMEOUT,
                    "the API server did not answer in time; rotation timeouts are paused"
                );
            }
        }
    }

    /// Publishes an Event about this node's `MeshPeer`.
    fn publish_event(&self, warning: bool, reason: &str, action: &str, note: String) {
        let target = Target {
            kind: "MeshPeer",
            name: self.args.node_name.clone(),
            uid: self.own_uid.clone(),
        };
        self.send_event(target, warning, reason, action, note);
    }

    /// Publishes an Event about this node's `MeshPeerReport` (about its `MeshPeer` until the
    /// report exists).
    fn publish_report_event(&self, reason: &str, action: &str, note: String) {
        match &self.report_uid {
            Some(uid) => {
                let target = Target {
                    kind: "MeshPeerReport",
                    name: self.args.node_name.clone(),
                    uid: Some(uid.clone()),
                };
                self.send_event(target, false, reason, action, note);
            }
            None => self.publish_event(false, reason, action, note),
        }
    }

    fn send_event(&self, target: Target, warning: bool, reason: &str, action: &str, note: String) {
        let notice = Notice {
            warning,
            reason: reason.into(),
            action: action.into(),
            note,
        };
        self.events.send(target, notice);
    }

    /// Gives the device the keys the rotation's phase calls for (initiating key, and the
    /// keys it answers under), if they differ from what it has.
    fn apply_device_keys(&mut self) {
        let Some(device) = &self.device else {
            return;
        };
        let publics = self.keys.device_public_keys();
        // What the device holds, read every pass: a key set behind the agent's back (`wg set
        // … private-key`) is put right.
        let held = device_plan::Peers::keys(device);
        match device_plan::keys_step(&held, &publics, self.device_keys_applied.as_ref()) {
            device_plan::KeysStep::Keep => return,
            device_plan::KeysStep::Restore => {
                warn!("the device's keys were changed outside the agent; setting them back");
            }
            device_plan::KeysStep::Set => {}
        }
        let (primary, extras) = self.keys.device_keys();
        let update = ConfigUpdate {
            private_key: Some(primary),
            extra_private_keys: Some(extras),
            ..Default::default()
        };
        match device.apply(&update) {
            Ok(()) => {
                info!(answered_keys = 1 + publics.1.len(), "device keys set");
                self.device_keys_applied = Some(publics);
            }
            Err(e) => {
                self.metrics.error("device");
                warn!(error = %e, "setting the device's keys failed");
            }
        }
    }

    /// Removes wgmesh from the node (an uninstall): the CNI configuration first so no new pod
    /// is plumbed, then the pod bridge so running pods can send nothing more, then every
    /// route of ours, the nftables table, host-local's allocations and the key. Each step
    /// is logged and the next one runs even if one fails; the device goes when the agent
    /// stops.
    async fn clean_node(&mut self) {
        let files = uninstall::NodeFiles::new(
            &self.args.cni_conf_dir,
            &self.args.run_dir,
            &self.args.cni_conf_name,
            self.args.cni_ipam_data_dir.as_deref(),
            cni::NETWORK,
            &self.args.state_dir,
        );
        let remove = |path: &std::path::Path, r: std::io::Result<()>| match r {
            Ok(()) => info!(path = %path.display(), "removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %path.display(), error = %e, "could not remove"),
        };
        remove(&files.conflist, std::fs::remove_file(&files.conflist));
        remove(
            &files.runtime_conflist,
            std::fs::remove_file(&files.runtime_conflist),
        );
        if let Err(e) = self.netlink.delete_link(&self.args.cni_bridge).await {
            warn!(error = %e, "could not delete the pod bridge");
        }
        let device_index = self
            .netlink
            .link(&self.args.interface)
            .await
            .ok()
            .map(|l| l.index);
        match kernel::remove_owned_routes(&self.netlink, device_index).await {
            Ok(routes) => info!(routes, "removed the routes"),
            Err(e) => warn!(error = %e, "could not remove the routes"),
        }
        match masquerade::remove() {
            Ok(()) => info!(table = masquerade::TABLE, "removed the nftables table"),
            Err(e) => warn!(error = %e, "could not remove the nftables table"),
        }
        remove(&files.ipam_dir, std::fs::remove_dir_all(&files.ipam_dir));
        remove(&files.key, std::fs::remove_file(&files.key));
        remove(
            &files.saved_device,
            std::fs::remove_file(&files.saved_device),
        );
    }

    /// Brings the routes to the plan; returns (every route is as planned, every blackhole
    /// is installed).
    async fn apply_routes(&self, plan: &NodePlan, device_index: Option<u32>) -> (bool, bool) {
        let done = kernel::apply_routes(&self.netlink, &plan.routes, device_index).await;
        for failure in &done.failures {
            self.metrics.error("routes");
            warn!(error = %failure, "routes");
        }
        if done.added > 0 || done.removed > 0 {
            info!(added = done.added, removed = done.removed, "routes updated");
        }
        (done.ok, done.fenced)
    }

    async fn report_fallback(&mut self, plan: &NodePlan) {
        let fallback: Vec<&str> = plan.fallback_peers().collect();
        self.metrics.plaintext_peers.set(fallback.len() as i64);
        if fallback.is_empty() || self.fallback_reported {
            self.fallback_reported = !fallback.is_empty();
            return;
        }
        self.fallback_reported = true;
        warn!(peers = ?fallback, "the WireGuard device is down: on-link peers are routed in the clear, as the mesh allows");
        let note = format!(
            "the WireGuard device is down; traffic to on-link peers {} is routed unencrypted (Mesh transport.hostGateway: Fallback)",
            fallback.join(", ")
        );
        self.publish_event(true, "PlaintextFallback", "Route", note);
    }

    /// Points the per-peer metrics at the device and the names of its peers now; a scrape
    /// reads the device itself.
    fn update_peer_metrics(&self) {
        let source = self.device.clone().map(|device| metrics::PeerSource {
            snapshot: Box::new(move || device.snapshot()),
            names: self
                .configured
                .names_by_key()
                .into_iter()
                .map(|(k, n)| (k, n.to_owned()))
                .collect(),
        });
        self.metrics.read_peers_from(source);
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish_status(
        &mut self,
        own: Option<&MeshPeer>,
        published: &Published,
        device_up: bool,
        routes_ok: bool,
        plan: &NodePlan,
        path_plan: &paths::PathPlan,
        approved: &[topology::ApprovedPeer],
    ) {
        let Some(own) = own else {
            return; // the operator has not created this node's peer yet
        };
        let prev = own
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let now = SystemTime::now();
        let conditions = status_plan::conditions(
            &status_plan::Health {
                interface: &self.args.interface,
                device_error: self.device_error.as_deref(),
                device_up,
                routes_ok,
                routes: plan.routes.len(),
                fallback: plan.fallback_peers().collect(),
            },
            &prev,
            now,
        );
        let rotation_status = self.device.as_ref().and_then(|d| {
            let snap = d.snapshot();
            let externals: BTreeMap<String, Key> = approved
                .iter()
                .filter(|p| !p.is_node)
                .filter_map(|p| {
                    self.configured
                        .names
                        .get(&p.name)
                        .map(|k| (p.name.clone(), *k))
                })
                .collect();
            let externals = rotation::Rotator::by_name(&snap, &externals);
            self.rotator.status(&self.keys, &externals)
        });
        let mut installed = self.installed_keys.clone();
        installed.sort_by(|a, b| a.peer.cmp(&b.peer));
        let by_name: BTreeMap<String, PeerSnapshot> = self
            .device
            .as_ref()
            .map(|d| {
                let names = self.configured.names_by_key();
                d.snapshot()
                    .peers
                    .into_iter()
                    .filter_map(|p| Some((names.get(&p.public_key)?.to_string(), p)))
                    .collect()
            })
            .unwrap_or_default();
        let paths = status_plan::paths(&path_plan.paths, &plan.transports, &by_name);
        let keys = status_plan::path_keys(&paths);
        if let Some(prev) = &self.last_paths
            && let Some(note) = status_plan::path_changes(prev, &keys)
        {
            info!(changes = %note, "paths changed");
            self.publish_report_event("PathChanged", "Route", note);
        }
        self.last_paths = Some(keys);
        let status = MeshPeerStatus {
            conditions,
            public_key: Some(self.keys.current.public_base64()),
            // Published only once the device answers under it (see `rotate`).
            next_public_key: self
                .keys
                .next
                .as_ref()
                .filter(|_| {
                    self.device_keys_applied.as_ref() == Some(&self.keys.device_public_keys())
                })
                .map(|k| k.public_base64()),
            key_generation: Some(self.keys.current.generation),
            key_created_at: time(self.keys.current.created_at),
            endpoints: published
                .endpoint
                .map(|e| e.to_string())
                .into_iter()
                .collect(),
            public_endpoints: published
                .public_endpoints
                .iter()
                .map(ToString::to_string)
                .collect(),
            underlay_mtu: Some(published.underlay_mtu),
            rotation: rotation_status,
            installed_keys: installed,
            ..Default::default()
        };
        let report = MeshPeerReportSpec {
            path_summary: status_plan::summary(&paths),
            paths,
            connectivity: self
                .device
                .as_ref()
                .map(|d| status_plan::connectivity(&d.snapshot().peers, now)),
        };
        // The status first: a peer's rotation may wait on an acknowledgement in it.
        if let Some(status_plan::Write { body, comparable }) =
            status_plan::status_write(&status, self.last_status.as_ref())
        {
            match self.settle(self.apply_status(body).await) {
                Ok(_) => {
                    self.status_failures = 0;
                    self.metrics.status_writes.inc();
                    self.last_status = Some(comparable);
                }
                Err(e) => {
                    self.metrics.error("status");
                    self.status_failures = self.status_failures.saturating_add(1);
                    warn!(
                        error = %e,
                        retry_in = ?backoff(self.status_failures, STATUS_RETRY_FIRST, RESYNC),
                        "publishing status failed"
                    );
                }
            }
        }
        // While the status cannot be written, neither can the report: no second wait.
        if self.status_failures == 0 {
            self.publish_report(own, &report).await;
        }
    }

    /// Writes the node's report when [`status_plan::report_write`] says it is due: under
    /// the agent's field manager, owned by the node's peer (the garbage collector removes it
    /// with the peer).
    async fn publish_report(&mut self, own: &MeshPeer, report: &MeshPeerReportSpec) {
        let Some(owner) = own.metadata.uid.clone() else {
            return;
        };
        let last = self
            .last_report
            .as_ref()
            .filter(|(uid, _)| *uid == owner)
            .map(|(_, v)| v);
        let allowed = self
            .last_report_write
            .is_none_or(|t| t.elapsed() >= REPORT_INTERVAL);
        let Some(status_plan::Write { body, comparable }) =
            status_plan::report_write(report, last, allowed)
        else {
            return;
        };
        let name = self.args.node_name.clone();
        let patch = Patch::Apply(serde_json::json!({
            "apiVersion": "wgmesh.dev/v1alpha1",
            "kind": "MeshPeerReport",
            "metadata": {
                "name": name,
                "ownerReferences": [{
                    "apiVersion": "wgmesh.dev/v1alpha1",
                    "kind": "MeshPeer",
                    "name": name,
                    "uid": owner,
                }],
            },
            "spec": body,
        }));
        let params = PatchParams::apply(AGENT_MANAGER).force();
        let write = self.reports_api.patch(&name, &params, &patch);
        let written = tokio::time::timeout(API_REQUEST_TIMEOUT, write).await;
        match self.settle(written) {
            Ok(applied) => {
                self.report_uid = applied.metadata.uid;
                self.metrics.report_writes.inc();
                self.last_report = Some((owner, comparable));
                self.last_report_write = Some(Instant::now());
            }
            // The next pass tries again.
            Err(e) => {
                self.metrics.error("report");
                warn!(error = %e, "publishing the node's MeshPeerReport failed");
            }
        }
    }

    /// The outcome of a request bounded by [`API_REQUEST_TIMEOUT`], with the view of the
    /// API updated: a refusal (4xx) is an answer, so the view stays current.
    fn settle<T>(
        &mut self,
        result: Result<Result<T, kube::Error>, tokio::time::error::Elapsed>,
    ) -> anyhow::Result<T> {
        let (result, reached) = match result {
            Ok(Err(e)) => {
                let reached = answered(&e);
                (Err(anyhow::Error::from(e)), reached)
            }
            Ok(Ok(p)) => (Ok(p), true),
            Err(_) => (
                Err(anyhow::anyhow!("no answer within {API_REQUEST_TIMEOUT:?}")),
                false,
            ),
        };
        if reached {
            self.api_view.answered(SystemTime::now());
        } else {
            self.api_view.failed();
        }
        result
    }
}
