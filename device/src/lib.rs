//! wgmesh-device: the userspace WireGuard device, its UAPI socket ([`uapi`]) and the
//! standalone command ([`cmd`], the `wgmesh-device` binary and `wgmesh-agent device`). It knows
//! nothing of Kubernetes and must not: no kube, no CRD types, no mesh plans. The node agent
//! drives it in-process through [`DeviceHandle`]; `wg(8)` drives it through the UAPI socket.
//!
//! The device is a TUN interface, a UDP socket and the loop between them, built on boringtun's
//! `noise::Tunn` (which does no I/O; this crate is its caller). `Device::start` returns a
//! [`DeviceHandle`] through which the node agent (in-process) or the UAPI server (for `wg(8)`)
//! configures keys and peers, reads counters and stops the device. The device owns its
//! threads (see [`datapath`]), its configuration state (see [`state`]: local keys, peer table,
//! allowed IPs), the session slots of each peer (see [`slot`]: one `Tunn` per pair of local
//! and remote key, so keys rotate without losing packets) and its timers (see [`timers`]); it
//! does not configure addresses or routes on the interface.
//!
//! The calls into the OS that need `unsafe` (ioctl, socket options, signals, `prctl`) live
//! here, each block with its `// SAFETY:` line, behind safe functions; the agent forbids
//! `unsafe`.

pub mod allowed_ips;
pub mod cmd;
pub mod coalesce;
pub mod config;
mod datapath;
pub mod handover;
pub mod offload;
pub mod peer;
pub mod process;
pub mod slot;
pub mod source_limit;
mod state;
pub mod timers;
pub mod tun;
pub mod uapi;
pub mod udp;

use config::{ConfigUpdate, DeviceSnapshot, Key, PeerSnapshot, PeerUpdate, PrivateKey};
use handover::{Conn, Message, Mode};
use peer::PeerId;
use state::State;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
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
    /// Where a running device listens for its successor, and where a starting one looks
    /// for its predecessor (see [`handover`]). `None`: no handover.
    pub handover: Option<PathBuf>,
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
            handover: None,
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
    /// A predecessor answered on the handover socket but did not hand its device over.
    #[error("taking the device over from the process at {path}")]
    Handover {
        /// The handover socket.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
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
    pub(crate) handover: HandoverState,
    /// Threads started after `Device::start` (the readers of a successor), joined at
    /// shutdown.
    late_threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The device's part in a handover (see [`handover`]).
#[derive(Debug)]
pub(crate) struct HandoverState {
    mode: AtomicU8,
    /// This process's epoch (0 or 1): the top bit of the indices it hands out.
    pub(crate) epoch: u32,
    conn: RwLock<Option<Arc<Conn>>>,
    /// Becomes readable when a predecessor's readers are to stop.
    release_fd: OwnedFd,
    /// Readers running (TUN and UDP).
    readers: AtomicUsize,
    readers_started: AtomicBool,
    /// Predecessor: the successor has everything; this device is done.
    finished: AtomicBool,
    /// Successor: the predecessor answered `RELEASED` (or went away).
    released: (Mutex<bool>, Condvar),
    path: Option<PathBuf>,
}

impl HandoverState {
    fn new(path: Option<PathBuf>, epoch: u32, mode: Mode, conn: Option<Conn>) -> io::Result<Self> {
        Ok(Self {
            mode: AtomicU8::new(mode as u8),
            epoch,
            conn: RwLock::new(conn.map(Arc::new)),
            release_fd: eventfd()?,
            readers: AtomicUsize::new(0),
            readers_started: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            released: (Mutex::new(false), Condvar::new()),
            path,
        })
    }

    #[inline]
    pub(crate) fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
    }

    pub(crate) fn release_fd(&self) -> RawFd {
        self.release_fd.as_raw_fd()
    }

    fn conn(&self) -> Option<Arc<Conn>> {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_conn(&self, conn: Option<Arc<Conn>>) {
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    /// Sends a datagram to the other process; false when there is none (it is dropped).
    pub(crate) fn forward(&self, datagram: &[u8], from: std::net::SocketAddr) -> bool {
        let Some(conn) = self.conn() else {
            return false;
        };
        let header = handover::datagram_header(from);
        conn.send(&[&header, datagram], &[]).is_ok()
    }

    fn signal_released(&self) {
        let (lock, cv) = &self.released;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    fn wait_released(&self, timeout: Duration) -> bool {
        let (lock, cv) = &self.released;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |r| !*r)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd creation.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn signal_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a u64 to an eventfd.
    unsafe { libc::write(fd, (&raw const one).cast(), 8) };
}

/// Held by every datapath thread: if the thread ends while the device is not stopping, the
/// device records why and stops, so no part of it runs on without the others.
struct ThreadWatch {
    shared: Arc<Shared>,
    name: String,
    reader: bool,
}

impl Drop for ThreadWatch {
    fn drop(&mut self) {
        if self.reader {
            self.shared.handover.readers.fetch_sub(1, Ordering::AcqRel);
        }
        // A predecessor's readers end when the successor takes over: not a failure.
        if self.shared.stopping()
            || (self.reader
                && self.shared.handover.mode() == Mode::Given
                && !std::thread::panicking())
        {
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
        signal_eventfd(self.stop_fd.as_raw_fd());
        // A socket shared with the other process of a handover is not this device's alone:
        // shutting it down would stop the other's readers.
        if !matches!(
            self.handover.mode(),
            Mode::Giving | Mode::Given | Mode::Taking
        ) {
            self.socket().1.shutdown();
        }
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
    /// Creates the interface, binds the socket and starts the threads; or, when a
    /// predecessor listens at `config.handover`, takes its interface and socket over (see
    /// [`handover`]; the device then reads nothing until [`DeviceHandle::take_over`]).
    pub fn start(config: DeviceConfig) -> Result<DeviceHandle, DeviceError> {
        let predecessor = match &config.handover {
            Some(path) => match Conn::connect(path) {
                Ok(conn) => conn.map(|c| (path.clone(), c)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not reach a predecessor's handover socket; starting afresh");
                    None
                }
            },
            None => None,
        };
        let (tun, socket, epoch, mode, conn) = match predecessor {
            Some((path, conn)) => {
                let (tun, socket, epoch) = receive_device(&conn, &config)
                    .map_err(|source| DeviceError::Handover { path, source })?;
                (tun, socket, epoch, Mode::Taking, Some(conn))
            }
            None => {
                let tun = Tun::create(&config.name, config.tun_offload).map_err(|source| {
                    DeviceError::CreateTun {
                        name: config.name.clone(),
                        source,
                    }
                })?;
                let socket = UdpSocket::bind(config.listen_port, config.fwmark, config.udp_offload)
                    .map_err(|source| DeviceError::BindUdp {
                        port: config.listen_port,
                        source,
                    })?;
                (tun, socket, 0, Mode::Alone, None)
            }
        };
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
        let stop_fd = eventfd().map_err(DeviceError::Spawn)?;
        let handover = HandoverState::new(config.handover.clone(), epoch, mode, conn)
            .map_err(DeviceError::Spawn)?;
        let mut state = State::new(random_seed(), config.fwmark);
        state.peers.set_epoch(epoch);

        let shared = Arc::new(Shared {
            name: name.clone(),
            state: RwLock::new(state),
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
            handover,
            late_threads: Mutex::new(Vec::new()),
        });
        if let Some(key) = &config.private_key {
            shared.write_state().set_keys(Some(key), None);
        }

        let tun = Arc::new(tun);
        let mut threads = Vec::new();
        let started = (|| {
            if mode == Mode::Alone {
                threads.extend(start_readers(&shared, &tun)?);
            }
            let s = shared.clone();
            threads.push(spawn_watched(&shared, "wg-timers", false, move || {
                datapath::timers(&s)
            })?);
            if let Some(path) = &shared.handover.path {
                // Listening before `start` returns: a successor started right after finds it.
                let listener = match mode {
                    Mode::Alone => listen(path),
                    _ => None,
                };
                let (s, t) = (shared.clone(), tun.clone());
                threads.push(spawn_watched(&shared, "wg-handover", false, move || {
                    handover_thread(&s, &t, listener)
                })?);
            }
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
        if mode == Mode::Taking {
            tracing::info!(interface = %name, port = inner.shared.socket().1.port(), epoch, "took the interface and socket from the running device; both run until the cut-over");
        } else {
            tracing::info!(interface = %name, port = inner.shared.socket().1.port(), "device started");
        }
        Ok(DeviceHandle { inner })
    }
}

/// Starts a thread that marks the device failed if it ends while the device runs.
fn spawn_watched(
    shared: &Arc<Shared>,
    name: &str,
    reader: bool,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, DeviceError> {
    if reader {
        shared.handover.readers.fetch_add(1, Ordering::AcqRel);
    }
    let watch = ThreadWatch {
        shared: shared.clone(),
        name: name.to_owned(),
        reader,
    };
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _watch = watch;
            f();
        })
        .map_err(|e| {
            if reader {
                shared.handover.readers.fetch_sub(1, Ordering::AcqRel);
            }
            DeviceError::Spawn(e)
        })
}

/// Starts the TUN and UDP readers, once.
fn start_readers(shared: &Arc<Shared>, tun: &Arc<Tun>) -> Result<Vec<JoinHandle<()>>, DeviceError> {
    if shared.handover.readers_started.swap(true, Ordering::AcqRel) {
        return Ok(Vec::new());
    }
    let (s, t) = (shared.clone(), tun.clone());
    let tun_rx = spawn_watched(shared, "wg-tun-rx", true, move || datapath::tun_rx(&s, &t))?;
    let (s, t) = (shared.clone(), tun.clone());
    let udp_rx = spawn_watched(shared, "wg-udp-rx", true, move || datapath::udp_rx(&s, &t))?;
    Ok(vec![tun_rx, udp_rx])
}

/// Starts the readers of a successor from a thread other than `Device::start`'s caller.
fn start_late_readers(shared: &Arc<Shared>, tun: &Arc<Tun>) {
    match start_readers(shared, tun) {
        Ok(threads) => shared
            .late_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(threads),
        Err(e) => {
            tracing::error!(error = %e, "could not start the device's readers; stopping it");
            *shared.failure.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(format!("starting the readers: {e}"));
            shared.stop();
        }
    }
}

/// Waits for the predecessor's `HELLO` and builds the interface and socket from the
/// descriptors it carries; returns them with this device's epoch.
fn receive_device(conn: &Conn, config: &DeviceConfig) -> io::Result<(Tun, UdpSocket, u32)> {
    let mut buf = vec![0u8; 512];
    // poll(2) ignores a negative descriptor: nothing but the predecessor wakes this wait.
    let (n, mut fds) = conn.recv(&mut buf, Some(Duration::from_secs(5)), -1)?;
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let Some(Message::Hello {
        epoch,
        vnet_hdr,
        udp_offload,
        name,
    }) = Message::parse(&buf[..n])
    else {
        return Err(bad("the predecessor sent no HELLO".into()));
    };
    if name != config.name {
        return Err(bad(format!(
            "the predecessor runs interface {name}, not {}",
            config.name
        )));
    }
    if fds.len() != 2 {
        return Err(bad(format!("expected 2 descriptors, got {}", fds.len())));
    }
    let udp = fds.pop().expect("two descriptors");
    let tun = fds.pop().expect("two descriptors");
    let socket = UdpSocket::from_fd(udp, udp_offload)?;
    Ok((Tun::from_fd(tun, name, vnet_hdr), socket, 1 - epoch))
}

/// The handover thread: a successor's link to its predecessor until that is gone, then (as
/// for every device with a handover path) the listener for its own successor.
fn handover_thread(shared: &Arc<Shared>, tun: &Arc<Tun>, mut listener: Option<handover::Listener>) {
    let ho = &shared.handover;
    if ho.mode() == Mode::Taking {
        follow_predecessor(shared, tun);
    }
    let Some(path) = ho.path.clone() else {
        return;
    };
    while !shared.stopping() {
        let Some(listener) = listener.take().or_else(|| listen(&path)) else {
            let _ = shared.sleep_unless_stopping(Duration::from_secs(30));
            continue;
        };
        match listener.accept(shared.stop_fd()) {
            Ok(Some(conn)) => {
                drop(listener);
                if give(shared, tun, conn) {
                    return;
                }
            }
            Ok(None) => {
                if shared.stopping() {
                    // Stopping alone: no successor will find this socket.
                    let _ = std::fs::remove_file(&path);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a successor failed");
                let _ = shared.sleep_unless_stopping(Duration::from_secs(1));
            }
        }
    }
}

fn listen(path: &std::path::Path) -> Option<handover::Listener> {
    handover::Listener::bind(path)
        .inspect_err(|e| tracing::warn!(path = %path.display(), error = %e, "cannot listen for a successor; an upgrade will cut traffic briefly"))
        .ok()
}

/// Successor, before and after the cut-over: decrypts what the predecessor forwards, notes
/// its `RELEASED`, and returns when it has gone.
fn follow_predecessor(shared: &Arc<Shared>, tun: &Arc<Tun>) {
    let ho = &shared.handover;
    let Some(conn) = ho.conn() else {
        return;
    };
    let mut buf = vec![0u8; handover::MAX_MESSAGE];
    let mut plain = vec![0u8; datapath::MAX_PACKET_BYTES + datapath::WG_OVERHEAD_BYTES + 64];
    loop {
        match conn.recv(&mut buf, None, shared.stop_fd()) {
            Ok((0, _)) => break,
            Ok((n, _)) => match Message::parse(&buf[..n]) {
                Some(Message::Datagram { from, bytes }) => {
                    datapath::deliver_forwarded(shared, tun, bytes, from, &mut plain);
                }
                Some(Message::Released) => ho.signal_released(),
                _ => tracing::debug!("unexpected handover message"),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if shared.stopping() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "the handover connection failed");
                break;
            }
        }
    }
    ho.set_conn(None);
    if ho.mode() == Mode::Taking {
        tracing::warn!("the predecessor went away before the cut-over; reading now");
        ho.set_mode(Mode::Alone);
        ho.signal_released();
        start_late_readers(shared, tun);
    } else {
        ho.set_mode(Mode::Alone);
        tracing::info!("the predecessor is gone; the handover is complete");
    }
}

/// Predecessor: hands the interface and socket to the successor on `conn` and serves it
/// until it takes over and the linger ends (returns true: this device is done), or until it
/// goes away before taking over (returns false: this device carries on alone).
fn give(shared: &Arc<Shared>, tun: &Arc<Tun>, conn: Conn) -> bool {
    let ho = &shared.handover;
    let socket = shared.socket().1;
    let hello = handover::hello(ho.epoch, tun.vnet_hdr(), shared.udp_offload, tun.name());
    if let Err(e) = conn.send(&[&hello], &[tun.as_raw_fd(), socket.as_raw_fd()]) {
        tracing::warn!(error = %e, "could not hand the device to a successor");
        return false;
    }
    let conn = Arc::new(conn);
    ho.set_conn(Some(conn.clone()));
    ho.set_mode(Mode::Giving);
    tracing::info!("a successor attached; forwarding its traffic to it until it takes over");
    let mut buf = vec![0u8; handover::MAX_MESSAGE];
    let mut plain = vec![0u8; datapath::MAX_PACKET_BYTES + datapath::WG_OVERHEAD_BYTES + 64];
    let mut released_at: Option<Instant> = None;
    loop {
        let timeout = released_at.map(|at| handover::LINGER.saturating_sub(at.elapsed()));
        if timeout == Some(Duration::ZERO) {
            break;
        }
        match conn.recv(&mut buf, timeout, shared.stop_fd()) {
            Ok((0, _)) => {
                if released_at.is_none() {
                    tracing::warn!("the successor went away before taking over; carrying on");
                    ho.set_conn(None);
                    ho.set_mode(Mode::Alone);
                    return false;
                }
                break;
            }
            Ok((n, _)) => match Message::parse(&buf[..n]) {
                Some(Message::Release) if released_at.is_none() => {
                    ho.set_mode(Mode::Given);
                    signal_eventfd(ho.release_fd());
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while ho.readers.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if let Err(e) = conn.send(&[&handover::RELEASED], &[]) {
                        tracing::warn!(error = %e, "could not confirm the release");
                    }
                    released_at = Some(Instant::now());
                    tracing::info!("released the interface and socket to the successor");
                }
                Some(Message::Datagram { from, bytes }) => {
                    datapath::deliver_forwarded(shared, tun, bytes, from, &mut plain);
                }
                _ => tracing::debug!("unexpected handover message"),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if shared.stopping() {
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "the handover connection failed");
                if released_at.is_none() {
                    ho.set_conn(None);
                    ho.set_mode(Mode::Alone);
                    return false;
                }
                break;
            }
        }
    }
    ho.set_conn(None);
    ho.finished.store(true, Ordering::Release);
    tracing::info!("handed the device over to its successor; stopping");
    shared.stop();
    true
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
        let late = std::mem::take(
            &mut *self
                .shared
                .late_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in threads.into_iter().chain(late) {
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
            peers: state.peer_snapshots(wall),
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

    /// Successor: waits until every peer with an endpoint has a session with this device
    /// (at most `bound`), then asks the predecessor to stop reading and starts reading
    /// itself (see [`handover`]). Returns at once for a device that took nothing over.
    /// Call once the peers are configured.
    pub fn take_over(&self, bound: Duration) {
        let shared = &self.inner.shared;
        let ho = &shared.handover;
        if ho.mode() != Mode::Taking {
            return;
        }
        let started = Instant::now();
        let (mut ready, mut peers) = (0, 0);
        while !shared.stopping() {
            (ready, peers) = {
                let state = shared.read_state();
                let wall = shared.clock.wall();
                state
                    .peer_snapshots(wall)
                    .into_iter()
                    .filter(|p| p.endpoint.is_some())
                    .fold((0, 0), |(r, n), p| {
                        (r + usize::from(p.last_handshake.is_some()), n + 1)
                    })
            };
            if ready == peers || started.elapsed() >= bound {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(conn) = ho.conn()
            && conn.send(&[&handover::RELEASE], &[]).is_ok()
            && !ho.wait_released(Duration::from_secs(3))
        {
            tracing::warn!("the predecessor did not confirm the release; reading anyway");
        }
        if ho.conn().is_some() {
            ho.set_mode(Mode::Taken);
        } else {
            ho.set_mode(Mode::Alone);
        }
        let tun = self
            .inner
            .tun
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(tun) = tun {
            start_late_readers(shared, &tun);
        }
        tracing::info!(
            took = ?started.elapsed(),
            peers,
            with_session = ready,
            "took the device over; reading"
        );
    }

    /// Whether this device is a successor that has not taken over yet.
    pub fn is_taking_over(&self) -> bool {
        self.inner.shared.handover.mode() == Mode::Taking
    }

    /// Whether a successor attached and this device is handing over or has handed over.
    pub fn is_handing_over(&self) -> bool {
        matches!(
            self.inner.shared.handover.mode(),
            Mode::Giving | Mode::Given
        )
    }

    /// Whether this device handed everything to a successor and stopped.
    pub fn handed_over(&self) -> bool {
        self.inner.shared.handover.finished.load(Ordering::Acquire)
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
