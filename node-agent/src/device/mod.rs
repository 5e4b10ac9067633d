//! The userspace WireGuard device: a TUN interface, a UDP socket and the loop between them,
//! built on boringtun's `noise::Tunn` (which does no I/O; this module is its caller).
//!
//! `Device::start` returns a [`DeviceHandle`] through which the node agent (in-process) or the
//! UAPI server (for `wg(8)`) configures keys and peers, reads counters and stops the device. The
//! device owns its threads (see [`datapath`]), its configuration state (see [`state`]: local
//! keys, peer table, allowed IPs), the session slots of each peer (see [`slot`]: one `Tunn` per
//! pair of local and remote key, so keys rotate without losing packets) and its timers (see
//! [`timers`]); it does not configure addresses or routes on the interface.

pub mod allowed_ips;
pub mod config;
mod datapath;
pub mod offload;
pub mod peer;
pub mod slot;
pub mod source_limit;
mod state;
pub mod timers;
pub mod tun;
pub mod udp;

use config::{ConfigUpdate, DeviceSnapshot, Key, PeerSnapshot, PeerUpdate, PrivateKey};
use peer::PeerId;
use state::State;
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
    pub private_key: Option<PrivateKey>,
    /// Use UDP segmentation offload (GSO on send, GRO on receive) where the kernel has it.
    pub udp_offload: bool,
    /// Let the kernel hand over TCP super-packets and partial checksums on the TUN device
    /// (`IFF_VNET_HDR`, TSO4/TSO6/CSUM); the device segments them.
    pub tun_offload: bool,
    /// Clock; `None` uses the system clocks.
    pub clock: Option<Arc<dyn Clock>>,
    /// Fault injection, for tests of supervision: while a file named after a datapath thread
    /// exists in this directory, that thread panics at its next turn (only `wg-timers`
    /// looks, once per tick). `None` (the default) looks nowhere.
    pub failpoints: Option<std::path::PathBuf>,
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
            failpoints: None,
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
    /// Why the device failed: a datapath thread ended (returned or panicked) while the
    /// device was not stopping. A half-running datapath is never left running.
    failure: Mutex<Option<String>>,
    pub(crate) failpoints: Option<std::path::PathBuf>,
}

/// Held by every datapath thread: if the thread ends while the device is not stopping, the
/// device records why and stops, so no part of it runs on without the others.
struct ThreadWatch {
    shared: Arc<Shared>,
    name: String,
}

impl Drop for ThreadWatch {
    fn drop(&mut self) {
        if self.shared.stopping() {
            return;
        }
        let why = if std::thread::panicking() {
            format!("datapath thread {} panicked", self.name)
        } else {
            format!("datapath thread {} ended", self.name)
        };
        tracing::error!(interface = %self.shared.name, reason = %why, "the device failed; stopping it");
        *self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.shared.stop();
    }
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
        // An interface a previous device kept for its successor is ours now: it goes with
        // this device unless this one keeps it too (`DeviceHandle::keep_interface`).
        if let Err(e) = tun.set_persist(false) {
            tracing::warn!(interface = %name, error = %e, "could not clear the interface's persistence");
        }
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
            state: RwLock::new(State::new(random_seed(), config.fwmark)),
            socket: RwLock::new((0, Arc::new(socket))),
            udp_offload: config.udp_offload,
            socket_generation: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            stop_fd,
            stop_lock: Mutex::new(false),
            stop_cv: Condvar::new(),
            clock: config.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            failure: Mutex::new(None),
            failpoints: config.failpoints,
        });
        if let Some(key) = &config.private_key {
            shared.write_state().set_keys(Some(key), None);
        }

        let tun = Arc::new(tun);
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            let watch = ThreadWatch {
                shared: shared.clone(),
                name: name.to_owned(),
            };
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    let _watch = watch;
                    f();
                })
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

    /// The device's (primary) public key, if it has a private key.
    pub fn public_key(&self) -> Option<Key> {
        self.inner.shared.read_state().public_key()
    }

    /// Applies a configuration change as one transaction with respect to the datapath.
    /// Changes before a failing step stay applied, as with wireguard-go.
    pub fn apply(&self, update: &ConfigUpdate) -> Result<(), DeviceError> {
        let shared = &self.inner.shared;
        let mut state = shared.write_state();
        if update.private_key.is_some() || update.extra_private_keys.is_some() {
            state.set_keys(
                update.private_key.as_ref(),
                update.extra_private_keys.as_deref(),
            );
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
                state.remove_peer(id);
            }
        }
        let socket = shared.socket().1;
        let mut send = |packet: &[u8], to| socket.send_to(packet, to).is_ok();
        for peer in &update.peers {
            state.apply_peer(peer, &mut send);
        }
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) the primary private key; removing it removes the extra
    /// keys too. Sessions survive only under keys the device keeps: setting the key it has, or
    /// switching to one of its extra keys (the old primary then becomes an extra).
    pub fn set_private_key(&self, key: Option<PrivateKey>) {
        let mut state = self.inner.shared.write_state();
        let key = key.unwrap_or_else(|| PrivateKey::from_bytes([0; 32]));
        state.set_keys(Some(&key), None);
    }

    /// A zeroizing copy of the primary private key, for the UAPI `get` answer, which `wg(8)`
    /// expects to carry it. Everything else reads the public key or a [`DeviceSnapshot`].
    pub fn private_key(&self) -> Option<PrivateKey> {
        self.inner
            .shared
            .read_state()
            .primary()
            .map(slot::LocalKey::private_key)
    }

    /// Sets the extra private keys the device answers handshakes under (not initiating with
    /// them); an empty list removes them. See [`ConfigUpdate::extra_private_keys`].
    pub fn set_extra_private_keys(&self, keys: Vec<PrivateKey>) {
        let mut state = self.inner.shared.write_state();
        state.set_keys(None, Some(&keys));
    }

    /// Rebinds the UDP socket to `port` (0: keep the current one); returns the bound port.
    pub fn set_listen_port(&self, port: u16) -> Result<u16, DeviceError> {
        let shared = &self.inner.shared;
        let state = shared.write_state();
        rebind(shared, port, state.fwmark)?;
        Ok(shared.socket().1.port())
    }

    /// Creates or updates the peer `update.public_key` (its primary or next key); returns its
    /// id (`None` if it was removed, or skipped because of `update_only`, because it is this
    /// device's own key, or refused because it would give the peer another peer's key).
    pub fn upsert_peer(&self, update: &PeerUpdate) -> Option<PeerId> {
        let shared = &self.inner.shared;
        let mut state = shared.write_state();
        let socket = shared.socket().1;
        state.apply_peer(update, &mut |packet, to| socket.send_to(packet, to).is_ok())
    }

    /// Removes the peer known under this key (primary or next); returns whether it existed.
    pub fn remove_peer(&self, public_key: &Key) -> bool {
        let mut state = self.inner.shared.write_state();
        match state.peers.id_by_key(public_key) {
            Some(id) => {
                state.remove_peer(id);
                true
            }
            None => false,
        }
    }

    /// The id of the peer known under this key (primary or next).
    pub fn peer_id(&self, public_key: &Key) -> Option<PeerId> {
        let state = self.inner.shared.read_state();
        state.peers.id_by_key(public_key)
    }

    /// Configuration and counters of one peer.
    pub fn peer(&self, id: PeerId) -> Option<PeerSnapshot> {
        let shared = &self.inner.shared;
        let state = shared.read_state();
        let wall = shared.clock.wall();
        state.peers.get(id).map(|p| state.peer_snapshot(p, wall))
    }

    /// The whole device, as `wg show` reports it.
    pub fn snapshot(&self) -> DeviceSnapshot {
        let shared = &self.inner.shared;
        let state = shared.read_state();
        let wall = shared.clock.wall();
        DeviceSnapshot {
            public_key: state.public_key(),
            extra_public_keys: state
                .keys
                .iter()
                .skip(1)
                .map(|k| k.public_bytes())
                .collect(),
            listen_port: shared.socket().1.port(),
            fwmark: state.fwmark,
            handshakes_rate_limited: state.handshakes_rate_limited.load(Ordering::Relaxed),
            peers: state
                .peers
                .iter()
                .map(|p| state.peer_snapshot(p, wall))
                .collect(),
        }
    }

    /// Makes the interface outlive this device, with its addresses and routes, for the next
    /// device of the same name to attach to: packets routed to it meanwhile are dropped, never
    /// sent elsewhere. Call before [`DeviceHandle::shutdown`].
    pub fn keep_interface(&self) -> io::Result<()> {
        match &*self.inner.tun.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(tun) => tun.set_persist(true),
            None => Ok(()),
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

    /// Why the device failed, if it did: a datapath thread ended or panicked while it ran
    /// (the device then stopped). A device stopped by [`DeviceHandle::shutdown`], or because
    /// its interface was deleted, did not fail.
    pub fn failure(&self) -> Option<String> {
        self.inner
            .shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn random_seed() -> u64 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u64()
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
