//! The UAPI socket: creates it owner-only, accepts connections, reads requests with bounded
//! lines, a bounded `set=1` body and deadlines, answers them, and removes the socket file when
//! stopped.
//!
//! Every connection gets its own thread (capped), so a client that stalls or sends garbage never
//! blocks `wg show` from another one: a connection quiet for [`IDLE_TIMEOUT`], or whose request
//! takes longer than [`REQUEST_TIMEOUT`], is closed, and when [`MAX_CONNECTIONS`] are open a new
//! one closes the connection that read something least recently. Whatever arrives, the answer is
//! an `errno=` line or a closed connection, never a crash. Request bytes pass only through
//! buffers that are zeroized when dropped (a `set=1` may carry a private key, a `get=1` answer
//! does).
//!
//! It must not hold the device's state: it reads it through [`UapiDevice`] per request.

use super::protocol::{MAX_LINE_BYTES, SetParser, UapiError, render_error, render_get};
use crate::config::{ConfigUpdate, DeviceSnapshot, PrivateKey};
use crate::{DeviceError, DeviceHandle};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// A connection that sends nothing for this long is closed (wg(8) sends its whole request at
/// once; this only has to outlast a scheduling hiccup).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// One request (a `get=1`, or a `set=1` with its whole body) must arrive within this long of the
/// connection being ready for it; a client trickling bytes cannot hold a connection longer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; at the cap a new one evicts the least recently active one.
pub const MAX_CONNECTIONS: usize = 32;
/// Connection threads at most, counting evicted ones that have not ended yet; past it new
/// connections are closed.
const MAX_THREADS: usize = 2 * MAX_CONNECTIONS;
/// How often the accept loop checks for stop.
const ACCEPT_POLL: Duration = Duration::from_millis(200);
/// Read buffer of a connection.
const READ_BUF_BYTES: usize = 2 * MAX_LINE_BYTES;
/// Mode of the socket file: only root (the owner) may configure the device.
const SOCKET_MODE: libc::mode_t = 0o600;
/// Mode of a socket directory this server creates.
const DIR_MODE: u32 = 0o700;

/// What the server needs of a device; [`DeviceHandle`] in production, a fake in tests.
pub trait UapiDevice: Clone + Send + 'static {
    /// The interface name, which names the socket.
    fn name(&self) -> &str;
    /// Whether the device has stopped (the server then stops too).
    fn is_stopped(&self) -> bool;
    /// The state a `get=1` reports, without the private key.
    fn snapshot(&self) -> DeviceSnapshot;
    /// The live private key, read for each `get=1` answer.
    fn private_key(&self) -> Option<PrivateKey>;
    /// Applies a `set=1`.
    fn apply(&self, update: &ConfigUpdate) -> Result<(), DeviceError>;
}

impl UapiDevice for DeviceHandle {
    fn name(&self) -> &str {
        DeviceHandle::name(self)
    }
    fn is_stopped(&self) -> bool {
        DeviceHandle::is_stopped(self)
    }
    fn snapshot(&self) -> DeviceSnapshot {
        DeviceHandle::snapshot(self)
    }
    fn private_key(&self) -> Option<PrivateKey> {
        DeviceHandle::private_key(self)
    }
    fn apply(&self, update: &ConfigUpdate) -> Result<(), DeviceError> {
        DeviceHandle::apply(self, update)
    }
}

/// Why the UAPI socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket directory could not be created.
    #[error("creating socket directory {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    /// Another live process answers on the socket path.
    #[error("another device is serving {0}")]
    InUse(PathBuf),
    /// Binding the socket failed.
    #[error("binding {0}")]
    Bind(PathBuf, #[source] io::Error),
    /// The socket file could not be made owner-only.
    #[error("setting mode 600 on {0}")]
    Chmod(PathBuf, #[source] io::Error),
    /// The accept thread could not be started.
    #[error("starting the UAPI thread")]
    Spawn(#[source] io::Error),
}

/// A running UAPI server; stops (and removes its socket) on [`UapiServer::shutdown`] or drop.
#[derive(Debug)]
pub struct UapiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UapiServer {
    /// Serves `device` on `<dir>/<device name>.sock`, replacing a stale socket file. A missing
    /// `dir` is created with mode 0700.
    pub fn start(device: impl UapiDevice, dir: &Path) -> Result<Self, ServeError> {
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(|e| ServeError::CreateDir(dir.to_owned(), e))?;
        }
        let path = dir.join(format!("{}.sock", device.name()));
        if std::fs::symlink_metadata(&path).is_ok() {
            if UnixStream::connect(&path).is_ok() {
                return Err(ServeError::InUse(path));
            }
            // Stale: left by a process that died without cleaning up (unlink, never followed).
            let _ = std::fs::remove_file(&path);
        }
        let listener = bind_owner_only(&path)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ServeError::Bind(path.clone(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wg-uapi".into())
                .spawn(move || accept_loop(&listener, &device, &stop))
                .map_err(ServeError::Spawn)?
        };
        tracing::info!(socket = %path.display(), "UAPI listening");
        Ok(Self {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and removes the socket file. Idempotent.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates the listening socket at `path` with mode 0600: socket, bind, chmod, and only then
/// listen, so no connection is accepted while the file has the umask's mode (std's `bind`
/// listens at once).
fn bind_owner_only(path: &Path) -> Result<UnixListener, ServeError> {
    let bind_err = |e| ServeError::Bind(path.to_owned(), e);
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(bind_err(io::Error::from(io::ErrorKind::InvalidInput)));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un and `len` within its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    let c_path = std::ffi::CString::new(bytes)
        .map_err(|_| bind_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chmod(c_path.as_ptr(), SOCKET_MODE) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(ServeError::Chmod(path.to_owned(), e));
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(bind_err(e));
    }
    Ok(UnixListener::from(fd))
}

/// Milliseconds since the server started: when a connection last read something.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

/// A served connection, as the accept loop sees it.
#[derive(Debug)]
struct Tracked {
    /// For closing it from the accept loop.
    stream: UnixStream,
    activity: Arc<Activity>,
    /// Set by the connection's thread when it ends.
    done: Arc<AtomicBool>,
    evicted: bool,
}

/// The connections being served; decides which one makes room for a new one.
#[derive(Debug, Default)]
struct Connections {
    list: Vec<Tracked>,
}

impl Connections {
    /// Forgets ended connections; returns (threads alive, connections not evicted).
    fn prune(&mut self) -> (usize, usize) {
        self.list.retain(|c| !c.done.load(Ordering::Acquire));
        let serving = self.list.iter().filter(|c| !c.evicted).count();
        (self.list.len(), serving)
    }

    /// Closes the connection that read something least recently.
    fn evict_one(&mut self) {
        let victim = self
            .list
            .iter_mut()
            .filter(|c| !c.evicted)
            .min_by_key(|c| c.activity.last_ms.load(Ordering::Relaxed));
        if let Some(c) = victim {
            tracing::debug!("UAPI connection limit reached, closing the least active one");
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            c.evicted = true;
        }
    }
}

fn accept_loop(listener: &UnixListener, device: &impl UapiDevice, stop: &AtomicBool) {
    let epoch = Instant::now();
    let connections = Mutex::new(Connections::default());
    while !stop.load(Ordering::Acquire) && !device.is_stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                let mut conns = connections.lock().unwrap_or_else(|e| e.into_inner());
                let (threads, serving) = conns.prune();
                if threads >= MAX_THREADS {
                    tracing::warn!("too many UAPI connections, closing a new one");
                    continue;
                }
                if serving >= MAX_CONNECTIONS {
                    conns.evict_one();
                }
                let Ok(handle) = stream.try_clone() else {
                    continue;
                };
                let activity = Arc::new(Activity {
                    epoch,
                    last_ms: AtomicU64::new(0),
                });
                activity.touch();
                let done = Arc::new(AtomicBool::new(false));
                let (dev, act, fin) = (device.clone(), activity.clone(), done.clone());
                let spawned = std::thread::Builder::new()
                    .name("wg-uapi-conn".into())
                    .spawn(move || {
                        serve_connection(&stream, &dev, &act);
                        // The accept loop holds a clone until it prunes: end the connection
                        // itself now, not when the last descriptor goes.
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        fin.store(true, Ordering::Release);
                    });
                if spawned.is_ok() {
                    conns.list.push(Tracked {
                        stream: handle,
                        activity,
                        done,
                        evicted: false,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(listener.as_raw_fd(), ACCEPT_POLL);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "UAPI accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
    // Stopping: end every connection still open.
    let mut conns = connections.lock().unwrap_or_else(|e| e.into_inner());
    for c in &conns.list {
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }
    conns.list.clear();
}

fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// Reads lines from a connection through a buffer zeroized on drop, each read bounded by
/// [`IDLE_TIMEOUT`] and by the deadline of the request under way.
struct LineReader<'a> {
    stream: &'a UnixStream,
    activity: &'a Activity,
    buf: Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
    /// When the current request must be complete.
    deadline: Instant,
}

/// What [`LineReader::read_line`] found.
enum Line {
    /// A line (without its `\n`) is in the caller's buffer.
    Text,
    /// End of input (also in the middle of a line).
    Eof,
    /// The client was quiet too long, missed the request's deadline, or the read failed:
    /// close without an answer and without applying anything.
    Gone,
}

impl<'a> LineReader<'a> {
    fn new(stream: &'a UnixStream, activity: &'a Activity) -> Self {
        Self {
            stream,
            activity,
            buf: Zeroizing::new(vec![0; READ_BUF_BYTES]),
            start: 0,
            end: 0,
            deadline: Instant::now() + REQUEST_TIMEOUT,
        }
    }

    /// Starts the clock of a new request.
    fn begin_request(&mut self) {
        self.deadline = Instant::now() + REQUEST_TIMEOUT;
    }

    /// Refills the buffer; returns the bytes read (0 at end of input), `None` when the
    /// connection is [`Line::Gone`].
    fn fill(&mut self) -> Option<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::debug!("UAPI request deadline passed, closing");
            return None;
        }
        let _ = self.stream.set_read_timeout(Some(left.min(IDLE_TIMEOUT)));
        self.start = 0;
        self.end = 0;
        loop {
            match (&mut &*self.stream).read(&mut self.buf) {
                Ok(n) => {
                    self.end = n;
                    if n > 0 {
                        self.activity.touch();
                    }
                    return Some(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "UAPI connection idle or failed, closing");
                    return None;
                }
            }
        }
    }

    /// Reads one line into `line` (cleared first; it never grows past [`MAX_LINE_BYTES`]).
    fn read_line(&mut self, line: &mut Zeroizing<Vec<u8>>) -> Result<Line, UapiError> {
        line.clear();
        loop {
            if self.start == self.end {
                match self.fill() {
                    None => return Ok(Line::Gone),
                    Some(0) => return Ok(Line::Eof),
                    Some(_) => {}
                }
            }
            let avail = &self.buf[self.start..self.end];
            let (take, found) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            if line.len() + take > MAX_LINE_BYTES {
                return Err(UapiError::Protocol("line too long".into()));
            }
            line.extend_from_slice(&avail[..take]);
            self.start += take + usize::from(found);
            if found {
                return Ok(Line::Text);
            }
        }
    }
}

/// The line as text.
fn text(line: &[u8]) -> Result<&str, UapiError> {
    std::str::from_utf8(line).map_err(|_| UapiError::Protocol("line is not UTF-8".into()))
}

/// Serves requests on one connection until it closes, goes quiet or sends something
/// unanswerable.
fn serve_connection(stream: &UnixStream, device: &impl UapiDevice, activity: &Activity) {
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let mut reader = LineReader::new(stream, activity);
    // Sized once: a line never makes it reallocate (which would leave a copy behind).
    let mut line = Zeroizing::new(Vec::with_capacity(MAX_LINE_BYTES + READ_BUF_BYTES));
    loop {
        reader.begin_request();
        let (answer, keep_open) = match reader.read_line(&mut line) {
            Ok(Line::Eof | Line::Gone) => return,
            Ok(Line::Text) => match text(&line) {
                Ok("get=1") => match reader.read_line(&mut line) {
                    Ok(Line::Text) if line.is_empty() => {
                        let key = device.private_key();
                        (render_get(&device.snapshot(), key.as_ref()), true)
                    }
                    Ok(Line::Eof | Line::Gone) => return,
                    Ok(Line::Text) => (
                        Zeroizing::new(render_error(&UapiError::Invalid {
                            key: "get".into(),
                            value: String::from_utf8_lossy(&line).chars().take(80).collect(),
                        })),
                        false,
                    ),
                    Err(e) => (Zeroizing::new(render_error(&e)), false),
                },
                Ok("set=1") => {
                    let Some((answer, keep_open)) = handle_set(&mut reader, &mut line, device)
                    else {
                        return;
                    };
                    (Zeroizing::new(answer), keep_open)
                }
                Ok(op) => (
                    Zeroizing::new(render_error(&UapiError::Invalid {
                        key: "operation".into(),
                        value: op.chars().take(80).collect(),
                    })),
                    false,
                ),
                Err(e) => (Zeroizing::new(render_error(&e)), false),
            },
            Err(e) => (Zeroizing::new(render_error(&e)), false),
        };
        // Written straight to the socket: a buffered writer would keep a copy of the key.
        if (&*stream).write_all(answer.as_bytes()).is_err() || !keep_open {
            return;
        }
    }
}

/// Reads a `set=1` body and applies it; returns the answer and whether the stream is still in
/// step (the body was read to its blank line), or `None` if the connection is gone.
fn handle_set(
    reader: &mut LineReader<'_>,
    line: &mut Zeroizing<Vec<u8>>,
    device: &impl UapiDevice,
) -> Option<(String, bool)> {
    let mut parser = SetParser::new();
    let mut failure: Option<UapiError> = None;
    loop {
        match reader.read_line(line) {
            Ok(Line::Text) => {}
            Ok(Line::Eof) => {
                // wireguard-go applies a body cut short by end of input.
                return Some(match failure {
                    Some(e) => (render_error(&e), false),
                    None => (apply(device, &parser.finish()), false),
                });
            }
            Ok(Line::Gone) => return None,
            Err(e) => return Some((render_error(&e), false)),
        }
        let text = match text(line) {
            Ok(t) => t,
            Err(e) => return Some((render_error(&e), false)),
        };
        if let Some(e) = &failure {
            // Skip to the end of the body so the connection stays usable, within the cap.
            if let Err(too_large) = parser.skip(text) {
                return Some((render_error(&too_large), false));
            }
            if text.is_empty() {
                return Some((render_error(e), true));
            }
            continue;
        }
        match parser.feed(text) {
            Ok(Some(update)) => return Some((apply(device, &update), true)),
            Ok(None) => {}
            Err(e @ UapiError::TooLarge(_)) => {
                tracing::debug!(error = %e, "rejecting UAPI set");
                return Some((render_error(&e), false));
            }
            Err(e) => {
                tracing::debug!(error = %e, "rejecting UAPI set");
                failure = Some(e);
            }
        }
    }
}

fn apply(device: &impl UapiDevice, update: &ConfigUpdate) -> String {
    match device.apply(update) {
        Ok(()) => "errno=0\n\n".to_owned(),
        Err(e) => {
            tracing::warn!(error = %e, "UAPI set failed");
            let err = match e {
                DeviceError::BindUdp { .. } => UapiError::PortInUse(e.to_string()),
                other => UapiError::Device(other.to_string()),
            };
            render_error(&err)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::uapi::protocol::MAX_SET_BYTES;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::AtomicUsize;

    /// A device that records what it is told.
    #[derive(Clone, Default)]
    struct FakeDevice {
        applied: Arc<Mutex<Vec<ConfigUpdate>>>,
    }

    impl UapiDevice for FakeDevice {
        fn name(&self) -> &str {
            "wgfake0"
        }
        fn is_stopped(&self) -> bool {
            false
        }
        fn snapshot(&self) -> DeviceSnapshot {
            DeviceSnapshot {
                listen_port: 51820,
                ..DeviceSnapshot::default()
            }
        }
        fn private_key(&self) -> Option<PrivateKey> {
            Some(PrivateKey::from_bytes([7; 32]))
        }
        fn apply(&self, update: &ConfigUpdate) -> Result<(), DeviceError> {
            self.applied.lock().unwrap().push(update.clone());
            Ok(())
        }
    }

    fn mk_dir() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wgmesh-uapi-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("run")
    }

    /// Reads until the blank line that ends an answer, or end of input.
    fn read_answer(stream: &mut UnixStream) -> io::Result<String> {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while !out.ends_with(b"\n\n") {
            match stream.read(&mut byte)? {
                0 => break,
                _ => out.push(byte[0]),
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    #[test]
    fn the_socket_is_owner_only_in_a_directory_created_owner_only() {
        let dir = mk_dir();
        let server = UapiServer::start(FakeDevice::default(), &dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(server.path()), 0o600);
        drop(server);
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn a_get_is_answered_while_max_connections_idle_clients_are_connected() {
        let dir = mk_dir();
        let server = UapiServer::start(FakeDevice::default(), &dir).unwrap();
        let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS + 8)
            .map(|_| UnixStream::connect(server.path()).unwrap())
            .collect();
        let mut client = UnixStream::connect(server.path()).unwrap();
        // Answered within the idle deadline, i.e. not because the idle ones timed out.
        client.set_read_timeout(Some(IDLE_TIMEOUT / 2)).unwrap();
        client.write_all(b"get=1\n\n").unwrap();
        let answer = read_answer(&mut client).unwrap();
        assert_eq!(
            answer,
            format!(
                "private_key={}\nlisten_port=51820\nerrno=0\n\n",
                "07".repeat(32)
            )
        );
        drop(idle);
        drop(server);
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn a_silent_connection_is_closed_after_the_idle_timeout() {
        let dir = mk_dir();
        let server = UapiServer::start(FakeDevice::default(), &dir).unwrap();
        let mut client = UnixStream::connect(server.path()).unwrap();
        client.set_read_timeout(Some(IDLE_TIMEOUT * 3)).unwrap();
        let mut buf = [0u8; 16];
        // End of input (0), not our own read timeout (an error): the server closed it.
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        drop(server);
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn an_oversized_set_is_refused_with_emsgsize_and_nothing_applied() {
        let dir = mk_dir();
        let device = FakeDevice::default();
        let server = UapiServer::start(device.clone(), &dir).unwrap();
        let mut client = UnixStream::connect(server.path()).unwrap();
        client.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
        let mut body = format!("set=1\npublic_key={}\n", "11".repeat(32)).into_bytes();
        while body.len() <= MAX_SET_BYTES + 64 {
            body.extend_from_slice(b"allowed_ip=10.0.0.1/32\n");
        }
        body.extend_from_slice(b"\n");
        let writer = {
            let mut w = client.try_clone().unwrap();
            // The server stops reading at the cap: the rest may fail to go out.
            std::thread::spawn(move || {
                let _ = w.write_all(&body);
            })
        };
        let answer = read_answer(&mut client).unwrap();
        assert_eq!(answer, format!("errno={}\n\n", -libc::EMSGSIZE));
        drop(client);
        writer.join().unwrap();
        assert!(device.applied.lock().unwrap().is_empty());
        drop(server);
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn a_set_just_under_the_cap_is_applied() {
        let dir = mk_dir();
        let device = FakeDevice::default();
        let server = UapiServer::start(device.clone(), &dir).unwrap();
        let mut client = UnixStream::connect(server.path()).unwrap();
        client.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
        // 5,000 peers as `wg setconf` writes them, each with four allowed IPs.
        let mut body = String::from("set=1\nreplace_peers=true\n");
        for i in 0..5000u32 {
            let [a, b, c, d] = i.to_be_bytes();
            body.push_str(&format!(
                "public_key={}\npreshared_key={}\nprotocol_version=1\nendpoint=192.0.2.{}:51820\n\
                 persistent_keepalive_interval=25\nreplace_allowed_ips=true\n",
                format!("{a:02x}{b:02x}{c:02x}{d:02x}").repeat(8),
                "00".repeat(32),
                d
            ));
            for j in 0..4 {
                body.push_str(&format!("allowed_ip=10.{c}.{d}.{j}/32\n"));
            }
        }
        body.push('\n');
        assert!(body.len() < MAX_SET_BYTES, "{} bytes", body.len());
        let writer = {
            let mut w = client.try_clone().unwrap();
            std::thread::spawn(move || w.write_all(body.as_bytes()))
        };
        assert_eq!(read_answer(&mut client).unwrap(), "errno=0\n\n");
        writer.join().unwrap().unwrap();
        let applied = device.applied.lock().unwrap();
        assert_eq!(applied.first().map(|u| u.peers.len()), Some(5000));
        drop(applied);
        drop(server);
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
