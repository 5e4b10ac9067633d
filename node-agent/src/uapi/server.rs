//! The UAPI socket: accepts connections, reads requests with bounded lines and a read timeout,
//! answers them, and removes the socket file when stopped.
//!
//! Every connection gets its own thread (capped), so a client that stalls or sends garbage never
//! blocks `wg show` from another one; whatever arrives, the answer is an `errno=` line or a
//! closed connection, never a crash.

use super::protocol::{MAX_LINE_BYTES, SetParser, UapiError, render_error, render_get};
use crate::device::{DeviceError, DeviceHandle};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// A client must send its next line within this long.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed right away.
const MAX_CONNECTIONS: usize = 32;
/// Lines in one `set=1` body; a mesh of tens of thousands of peers stays far below.
const MAX_SET_LINES: usize = 4_000_000;
/// How often the accept loop checks for stop.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

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
    /// Serves `device` on `<dir>/<device name>.sock`, replacing a stale socket file.
    pub fn start(device: DeviceHandle, dir: &Path) -> Result<Self, ServeError> {
        std::fs::create_dir_all(dir).map_err(|e| ServeError::CreateDir(dir.to_owned(), e))?;
        let path = dir.join(format!("{}.sock", device.name()));
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(ServeError::InUse(path));
            }
            // Stale: left by a process that died without cleaning up.
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|e| ServeError::Bind(path.clone(), e))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
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

fn accept_loop(listener: &UnixListener, device: &DeviceHandle, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) && !device.is_stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    tracing::warn!("too many UAPI connections, closing one");
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (device, active2) = (device.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("wg-uapi-conn".into())
                    .spawn(move || {
                        serve_connection(stream, &device);
                        active2.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::AcqRel);
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

/// One line of input, without its `\n`.
enum Line {
    Text(String),
    Eof,
}

fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<Line, UapiError> {
    buf.clear();
    let mut limited = io::Read::take(&mut *reader, MAX_LINE_BYTES as u64 + 1);
    let n = limited
        .read_until(b'\n', buf)
        .map_err(|e| UapiError::Protocol(format!("read: {e}")))?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() != Some(&b'\n') {
        if buf.len() > MAX_LINE_BYTES {
            return Err(UapiError::Protocol("line too long".into()));
        }
        // End of input in the middle of a line.
        return Ok(Line::Eof);
    }
    buf.pop();
    String::from_utf8(std::mem::take(buf))
        .map(Line::Text)
        .map_err(|_| UapiError::Protocol("line is not UTF-8".into()))
}

/// Serves requests on one connection until it closes or sends something unanswerable.
fn serve_connection(stream: UnixStream, device: &DeviceHandle) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = io::BufWriter::new(write_half);
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        let (answer, keep_open) = match read_line(&mut reader, &mut buf) {
            Ok(Line::Eof) => return,
            Ok(Line::Text(op)) => match op.as_str() {
                "get=1" => match read_line(&mut reader, &mut buf) {
                    Ok(Line::Text(t)) if t.is_empty() => (render_get(&device.snapshot()), true),
                    Ok(Line::Eof) => return,
                    Ok(Line::Text(t)) => (
                        render_error(&UapiError::Invalid {
                            key: "get".into(),
                            value: t.chars().take(80).collect(),
                        }),
                        false,
                    ),
                    Err(e) => (render_error(&e), false),
                },
                "set=1" => handle_set(&mut reader, &mut buf, device),
                _ => (
                    render_error(&UapiError::Invalid {
                        key: "operation".into(),
                        value: op.chars().take(80).collect(),
                    }),
                    false,
                ),
            },
            Err(e) => (render_error(&e), false),
        };
        if out
            .write_all(answer.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
            || !keep_open
        {
            return;
        }
    }
}

/// Reads a `set=1` body and applies it; returns the answer and whether the stream is still in
/// step (the body was read to its blank line).
fn handle_set(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    device: &DeviceHandle,
) -> (String, bool) {
    let mut parser = SetParser::new();
    let mut failure: Option<UapiError> = None;
    for _ in 0..MAX_SET_LINES {
        let line = match read_line(reader, buf) {
            Ok(Line::Text(line)) => line,
            Ok(Line::Eof) => {
                // wireguard-go applies a body cut short by end of input.
                return match failure {
                    Some(e) => (render_error(&e), false),
                    None => (apply(device, &parser.finish()), false),
                };
            }
            Err(e) => return (render_error(&e), false),
        };
        if let Some(e) = &failure {
            // Skip to the end of the body so the connection stays usable.
            if line.is_empty() {
                return (render_error(e), true);
            }
            continue;
        }
        match parser.feed(&line) {
            Ok(Some(update)) => return (apply(device, &update), true),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "rejecting UAPI set");
                failure = Some(e);
            }
        }
    }
    (
        render_error(&UapiError::Protocol("set body too long".into())),
        false,
    )
}

fn apply(device: &DeviceHandle, update: &crate::device::config::ConfigUpdate) -> String {
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
