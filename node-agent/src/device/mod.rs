//! The userspace WireGuard device: a TUN interface, a UDP socket and the loop between them,
//! built on boringtun's `noise::Tunn` (which does no I/O; this module is its caller).
//!
//! `Device::start` returns a [`DeviceHandle`] through which the node agent (in-process) or the
//! UAPI server (for `wg(8)`) configures peers, reads counters and stops the device. The device
//! owns its threads (see [`datapath`]), its peer table (see [`peer`]) and its timers (see
//! [`timers`]); it does not configure addresses or routes on the interface.

pub mod allowed_ips;
pub mod config;
mod datapath;
pub mod offload;
pub mod peer;
pub mod timers;
pub mod tun;
pub mod udp;

use allowed_ips::AllowedIps;
use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};
use config::{ConfigUpdate, DeviceSnapshot, Key, PeerSnapshot, PeerUpdate};
use peer::{PeerId, PeerState, PeerTable};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use timers::{Clock, SystemClock};
use tun::Tun;
use udp::UdpSocket;

pub use datapath::{MAX_PACKET_BYTES, WG_OVERHEAD_BYTES};

/// MTU of a new interface when none is configured: 1500 minus IPv6, UDP and WireGuard headers,
/// as wireguard-go and wg-quick use.
pub const DEFAULT_MTU: u32 = 1420;

/// Handshake messages per second the device processes before demanding cookies. Each accepted
/// initiation passes the shared limiter twice (once before the peer lookup, once in `Tunn`).
const HANDSHAKES_PER_SECOND: u64 = 2 * 100;

/// What a device starts with.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Interface name (at most 15 bytes).
    pub name: String,
    /// MTU to set; `None` sets [`DEFAULT_MTU`].
    pub mtu: Option<u32>,
    /// Bring the interface up (otherwise the caller does, like with wireguard-go).
    pub up: bool,
    /// UDP port; 0 picks a free one.
    pub listen_port: u16,
    /// Firewall mark for outgoing datagrams; 0 for none.
    pub fwmark: u32,
    /// Private key, if known at start.
    pub private_key: Option<Key>,
    /// Use UDP segmentation offload (GSO on send, GRO on receive) where the kernel has it.
    pub udp_offload: bool,
    /// Let the kernel hand over TCP super-packets and partial checksums on the TUN device
    /// (`IFF_VNET_HDR`, TSO4/TSO6/CSUM); the device segments them.
    pub tun_offload: bool,
    /// Clock; `None` uses the system clocks.
    pub clock: Option<Arc<dyn Clock>>,
}

impl DeviceConfig {
    /// Defaults for interface `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            mtu: None,
            up: false,
            listen_port: 0,
            fwmark: 0,
            private_key: None,
            udp_offload: true,
            tun_offload: true,
            clock: None,
        }
    }
}

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `/dev/net/tun` could not give us the interface.
    #[error("creating TUN interface {name}")]
    CreateTun {
        /// The interface name asked for.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting the MTU or bringing the interface up failed.
    #[error("configuring interface {name}")]
    ConfigureInterface {
        /// The interface name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The UDP port could not be bound.
    #[error("binding UDP port {port}")]
    BindUdp {
        /// The port asked for.
        port: u16,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `SO_MARK` could not be set.
    #[error("setting fwmark {mark}")]
    SetFwmark {
        /// The mark.
        mark: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A thread or eventfd could not be created.
    #[error("starting device threads")]
    Spawn(#[source] io::Error),
}

/// State shared by the datapath threads and the handle, read-locked per batch.
pub(crate) struct State {
    pub(crate) private_key: Option<StaticSecret>,
    pub(crate) public_key: Option<PublicKey>,
    pub(crate) rate_limiter: Option<Arc<RateLimiter>>,
    pub(crate) peers: PeerTable,
    pub(crate) allowed_ips: AllowedIps<PeerId>,
    pub(crate) fwmark: u32,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("has_private_key", &self.private_key.is_some())
            .field("peers", &self.peers.len())
            .field("allowed_ips", &self.allowed_ips.len())
            .field("fwmark", &self.fwmark)
            .finish()
    }
}

/// Everything the threads share.
#[derive(Debug)]
pub(crate) struct Shared {
    name: String,
    state: RwLock<State>,
    socket: RwLock<(u64, Arc<UdpSocket>)>,
    udp_offload: bool,
    pub(crate) socket_generation: AtomicU64,
    stopping: AtomicBool,
    /// Becomes readable (and stays so) when the device stops; wakes threads blocked in poll.
    stop_fd: OwnedFd,
    stop_lock: Mutex<bool>,
    stop_cv: Condvar,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Shared {
    #[inline]
    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The current socket and its generation.
    pub(crate) fn socket(&self) -> (u64, Arc<UdpSocket>) {
        let g = self.socket.read().unwrap_or_else(|e| e.into_inner());
        (g.0, g.1.clone())
    }

    #[inline]
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn stop_fd(&self) -> RawFd {
        self.stop_fd.as_raw_fd()
    }

    /// Asks every thread to stop; idempotent, callable from any thread.
    pub(crate) fn stop(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a u64 to our eventfd.
        unsafe { libc::write(self.stop_fd.as_raw_fd(), (&raw const one).cast(), 8) };
        self.socket().1.shutdown();
        let mut stopped = self.stop_lock.lock().unwrap_or_else(|e| e.into_inner());
        *stopped = true;
        self.stop_cv.notify_all();
    }

    /// Sleeps for `d` or until the device stops; returns whether it is stopping.
    pub(crate) fn sleep_unless_stopping(&self, d: Duration) -> bool {
        let stopped = self.stop_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = self
            .stop_cv
            .wait_timeout_while(stopped, d, |s| !*s)
            .unwrap_or_else(|e| e.into_inner());
        *stopped
    }

    fn wait_stopped(&self) {
        let stopped = self.stop_lock.lock().unwrap_or_else(|e| e.into_inner());
        let _unused = self
            .stop_cv
            .wait_while(stopped, |s| !*s)
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// A running device.
#[derive(Debug)]
pub struct Device;

impl Device {
    /// Creates the interface, binds the socket and starts the threads.
    pub fn start(config: DeviceConfig) -> Result<DeviceHandle, DeviceError> {
        let tun = Tun::create(&config.name, config.tun_offload).map_err(|source| {
            DeviceError::CreateTun {
                name: config.name.clone(),
                source,
            }
        })?;
        let name = tun.name().to_owned();
        let configure = |source| DeviceError::ConfigureInterface {
            name: name.clone(),
            source,
        };
        tun.set_mtu(config.mtu.unwrap_or(DEFAULT_MTU))
            .map_err(configure)?;
        if config.up {
            tun.set_up().map_err(configure)?;
        }
        let socket = UdpSocket::bind(config.listen_port, config.fwmark, config.udp_offload)
            .map_err(|source| DeviceError::BindUdp {
                port: config.listen_port,
                source,
            })?;
        // SAFETY: plain eventfd creation.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(DeviceError::Spawn(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let shared = Arc::new(Shared {
            name: name.clone(),
            state: RwLock::new(State {
                private_key: None,
                public_key: None,
                rate_limiter: None,
                peers: PeerTable::new(random_seed()),
                allowed_ips: AllowedIps::new(),
                fwmark: config.fwmark,
            }),
            socket: RwLock::new((0, Arc::new(socket))),
            udp_offload: config.udp_offload,
            socket_generation: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            stop_fd,
            stop_lock: Mutex::new(false),
            stop_cv: Condvar::new(),
            clock: config.clock.unwrap_or_else(|| Arc::new(SystemClock)),
        });
        if let Some(key) = config.private_key {
            set_private_key(&mut shared.write_state(), key);
        }

        let tun = Arc::new(tun);
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(f)
                .map_err(DeviceError::Spawn)
        };
        let started = (|| {
            let (s, t) = (shared.clone(), tun.clone());
            threads.push(spawn(
                "wg-tun-rx",
                Box::new(move || datapath::tun_rx(&s, &t)),
            )?);
            let (s, t) = (shared.clone(), tun.clone());
            threads.push(spawn(
                "wg-udp-rx",
                Box::new(move || datapath::udp_rx(&s, &t)),
            )?);
            let s = shared.clone();
            threads.push(spawn("wg-timers", Box::new(move || datapath::timers(&s)))?);
            Ok(())
        })();
        let inner = Arc::new(Inner {
            shared,
            tun: Mutex::new(Some(tun)),
            threads: Mutex::new(threads),
        });
        if let Err(e) = started {
            inner.shutdown();
            return Err(e);
        }
        tracing::info!(interface = %name, port = inner.shared.socket().1.port(), "device started");
        Ok(DeviceHandle { inner })
    }
}

/// Handle to a running device; cheap to clone. The device stops when [`DeviceHandle::shutdown`]
/// is called or the last handle is dropped.
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    tun: Mutex<Option<Arc<Tun>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn shutdown(&self) {
        self.shared.stop();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        // Threads are gone: this drops the last reference and closes the interface.
        self.tun.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl DeviceHandle {
    /// The interface name.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// The bound UDP port.
    pub fn listen_port(&self) -> u16 {
        self.inner.shared.socket().1.port()
    }

    /// The device's public key, if it has a private key.
    pub fn public_key(&self) -> Option<Key> {
        self.inner
            .shared
            .read_state()
            .public_key
            .map(|k| k.to_bytes())
    }

    /// Applies a configuration change as one transaction with respect to the datapath.
    /// Changes before a failing step stay applied, as with wireguard-go.
    pub fn apply(&self, update: &ConfigUpdate) -> Result<(), DeviceError> {
        let shared = &self.inner.shared;
        let mut state = shared.write_state();
        if let Some(key) = update.private_key {
            set_private_key(&mut state, key);
        }
        if let Some(mark) = update.fwmark
            && mark != state.fwmark
        {
            shared
                .socket()
                .1
                .set_fwmark(mark)
                .map_err(|source| DeviceError::SetFwmark { mark, source })?;
            state.fwmark = mark;
        }
        if let Some(port) = update.listen_port {
            rebind(shared, port, state.fwmark)?;
        }
        if update.replace_peers {
            for id in state.peers.ids() {
                remove_peer(&mut state, id);
            }
        }
        for peer in &update.peers {
            apply_peer(shared, &mut state, peer);
        }
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) the private key. Sessions survive only if the key is
    /// unchanged.
    pub fn set_private_key(&self, key: Option<Key>) {
        let mut state = self.inner.shared.write_state();
        set_private_key(&mut state, key.unwrap_or([0; 32]));
    }

    /// Rebinds the UDP socket to `port` (0: keep the current one); returns the bound port.
    pub fn set_listen_port(&self, port: u16) -> Result<u16, DeviceError> {
        let shared = &self.inner.shared;
        let state = shared.write_state();
        rebind(shared, port, state.fwmark)?;
        Ok(shared.socket().1.port())
    }

    /// Creates or updates the peer `update.public_key`; returns its id (`None` if it was
    /// removed, or skipped because of `update_only` or because it is this device's own key).
    pub fn upsert_peer(&self, update: &PeerUpdate) -> Option<PeerId> {
        let shared = &self.inner.shared;
        let mut state = shared.write_state();
        apply_peer(shared, &mut state, update)
    }

    /// Removes the peer with this key; returns whether it existed.
    pub fn remove_peer(&self, public_key: &Key) -> bool {
        let mut state = self.inner.shared.write_state();
        match state.peers.by_key(public_key).map(|p| p.id) {
            Some(id) => {
                remove_peer(&mut state, id);
                true
            }
            None => false,
        }
    }

    /// The id of the peer with this key.
    pub fn peer_id(&self, public_key: &Key) -> Option<PeerId> {
        let state = self.inner.shared.read_state();
        state.peers.by_key(public_key).map(|p| p.id)
    }

    /// Configuration and counters of one peer.
    pub fn peer(&self, id: PeerId) -> Option<PeerSnapshot> {
        let shared = &self.inner.shared;
        let state = shared.read_state();
        let wall = shared.clock.wall();
        state.peers.get(id).map(|p| peer_snapshot(&state, p, wall))
    }

    /// The whole device, as `wg show` reports it.
    pub fn snapshot(&self) -> DeviceSnapshot {
        let shared = &self.inner.shared;
        let state = shared.read_state();
        let wall = shared.clock.wall();
        DeviceSnapshot {
            private_key: state.private_key.as_ref().map(StaticSecret::to_bytes),
            listen_port: shared.socket().1.port(),
            fwmark: state.fwmark,
            peers: state
                .peers
                .iter()
                .map(|p| peer_snapshot(&state, p, wall))
                .collect(),
        }
    }

    /// Stops the threads and closes the interface. Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Blocks until the device stops (shutdown, or its interface was deleted).
    pub fn wait(&self) {
        self.inner.shared.wait_stopped();
    }

    /// Whether the device has stopped or is stopping.
    pub fn is_stopped(&self) -> bool {
        self.inner.shared.stopping()
    }
}

fn peer_snapshot(state: &State, peer: &peer::Peer, wall: std::time::SystemTime) -> PeerSnapshot {
    let mut st = peer.lock();
    let since = st.tunn.as_ref().and_then(Tunn::time_since_last_handshake);
    let last_handshake = st.handshake.observe(since, wall);
    PeerSnapshot {
        public_key: peer.public_key,
        preshared_key: st.preshared_key,
        endpoint: st.endpoint,
        last_handshake,
        rx_bytes: st.rx_bytes,
        tx_bytes: st.tx_bytes,
        persistent_keepalive: st.keepalive,
        allowed_ips: state.allowed_ips.prefixes_of(&peer.id),
    }
}

fn random_seed() -> u64 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u64()
}

fn new_tunn(
    state: &State,
    peer_key: &Key,
    psk: Option<Key>,
    keepalive: u16,
    index: u32,
) -> Option<Tunn> {
    let secret = state.private_key.clone()?;
    Some(Tunn::new(
        secret,
        PublicKey::from(*peer_key),
        psk,
        (keepalive != 0).then_some(keepalive),
        index,
        state.rate_limiter.clone(),
    ))
}

fn set_private_key(state: &mut State, key: Key) {
    let current = state.private_key.as_ref().map(StaticSecret::to_bytes);
    let wanted = (key != [0; 32]).then_some(key);
    if current == wanted {
        // Re-sending the same key (wg setconf, syncconf) must not reset sessions.
        return;
    }
    match wanted {
        None => {
            state.private_key = None;
            state.public_key = None;
            state.rate_limiter = None;
            for peer in state.peers.iter() {
                peer.lock().tunn = None;
            }
        }
        Some(key) => {
            let secret = StaticSecret::from(key);
            let public = PublicKey::from(&secret);
            // A peer with our own public key would be a loop; wireguard-go drops it too.
            if let Some(own) = state.peers.by_key(public.as_bytes()).map(|p| p.id) {
                remove_peer(state, own);
            }
            let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND));
            state.private_key = Some(secret.clone());
            state.public_key = Some(public);
            state.rate_limiter = Some(limiter.clone());
            for peer in state.peers.iter() {
                let mut st = peer.lock();
                match st.tunn.as_mut() {
                    Some(tunn) => {
                        tunn.set_static_private(secret.clone(), public, Some(limiter.clone()))
                    }
                    None => {
                        st.tunn = Some(Tunn::new(
                            secret.clone(),
                            PublicKey::from(peer.public_key),
                            st.preshared_key,
                            (st.keepalive != 0).then_some(st.keepalive),
                            peer.index,
                            Some(limiter.clone()),
                        ));
                    }
                }
            }
        }
    }
}

fn rebind(shared: &Shared, port: u16, fwmark: u32) -> Result<(), DeviceError> {
    let mut guard = shared.socket.write().unwrap_or_else(|e| e.into_inner());
    if port == 0 || port == guard.1.port() {
        return Ok(());
    }
    let socket = UdpSocket::bind(port, fwmark, shared.udp_offload)
        .map_err(|source| DeviceError::BindUdp { port, source })?;
    let generation = guard.0 + 1;
    let old = std::mem::replace(&mut *guard, (generation, Arc::new(socket)));
    shared
        .socket_generation
        .store(generation, Ordering::Release);
    drop(guard);
    old.1.shutdown();
    tracing::info!(port, "listen port changed");
    Ok(())
}

fn remove_peer(state: &mut State, id: PeerId) {
    state.allowed_ips.remove_value(&id);
    state.peers.remove(id);
}

fn apply_peer(shared: &Shared, state: &mut State, update: &PeerUpdate) -> Option<PeerId> {
    if state
        .public_key
        .is_some_and(|own| *own.as_bytes() == update.public_key)
    {
        return None;
    }
    let existing = state.peers.by_key(&update.public_key).map(|p| p.id);
    if update.remove {
        if let Some(id) = existing {
            remove_peer(state, id);
        }
        return None;
    }
    let id = match existing {
        Some(id) => id,
        None if update.update_only => return None,
        None => {
            let psk = update.preshared_key.filter(|k| *k != [0; 32]);
            let keepalive = update.persistent_keepalive.unwrap_or(0);
            insert_peer(state, update.public_key, psk, keepalive)
        }
    };
    let created = existing.is_none();
    let peer = state.peers.get(id).cloned()?;
    let mut st = peer.lock();
    let mut rebuild = false;
    if let Some(psk) = update.preshared_key {
        let psk = (psk != [0; 32]).then_some(psk);
        if psk != st.preshared_key {
            st.preshared_key = psk;
            rebuild = !created;
        }
    }
    let mut keepalive_turned_on = false;
    if let Some(keepalive) = update.persistent_keepalive
        && keepalive != st.keepalive
    {
        keepalive_turned_on = st.keepalive == 0;
        st.keepalive = keepalive;
        rebuild = !created;
    }
    if let Some(endpoint) = update.endpoint {
        st.endpoint = Some(endpoint);
    }
    if rebuild && st.tunn.is_some() {
        // Tunn has no setters for these; a new one renegotiates at once below.
        st.tunn = new_tunn(
            state,
            &peer.public_key,
            st.preshared_key,
            st.keepalive,
            peer.index,
        );
    }
    if (rebuild || keepalive_turned_on || (created && st.keepalive != 0)) && st.endpoint.is_some() {
        // Like wireguard-go: a peer with keepalive on, or with renegotiated parameters, is
        // contacted right away instead of on the first packet.
        let endpoint = st.endpoint;
        if let (Some(tunn), Some(endpoint)) = (st.tunn.as_mut(), endpoint) {
            let mut buf = [0u8; 256];
            if let boringtun::noise::TunnResult::WriteToNetwork(out) =
                tunn.encapsulate(&[], &mut buf)
            {
                let len = out.len();
                if shared.socket().1.send_to(out, endpoint).is_ok() {
                    st.tx_bytes += len as u64;
                }
            }
        }
    }
    drop(st);
    if update.replace_allowed_ips {
        state.allowed_ips.remove_value(&id);
    }
    for net in &update.allowed_ips {
        state.allowed_ips.insert(*net, id);
    }
    Some(id)
}

fn insert_peer(state: &mut State, key: Key, psk: Option<Key>, keepalive: u16) -> PeerId {
    let secret = state.private_key.clone();
    let limiter = state.rate_limiter.clone();
    state.peers.insert(key, |index| {
        let tunn = secret.map(|secret| {
            Tunn::new(
                secret,
                PublicKey::from(key),
                psk,
                (keepalive != 0).then_some(keepalive),
                index,
                limiter,
            )
        });
        PeerState::new(tunn, psk, keepalive)
    })
}
