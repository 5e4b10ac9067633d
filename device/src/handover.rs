//! Handing a running device to a successor process (an upgrade) without losing a packet.
//!
//! A device started with a handover path listens there (a `SOCK_SEQPACKET` socket, mode
//! 0600). A new device started with the same path connects first; when a predecessor
//! answers, the new device takes the predecessor's TUN and UDP descriptors (`SCM_RIGHTS`)
//! instead of creating its own, so the interface, its addresses and routes, and the port
//! stay, and nothing the kernel queues meanwhile is dropped.
//!
//! Sessions cannot move: boringtun's `Tunn` keeps its keys to itself. So both processes
//! run side by side for a moment, each with its own sessions, and route every datagram to
//! the process whose sessions it belongs to. Receiver indices carry an *epoch* bit (the top
//! bit of the 24-bit slot index, bit 31 of the index on the wire); the successor takes the
//! other epoch than its predecessor. The steps:
//!
//! 1. *Giving / taking.* The predecessor sends `HELLO` with the descriptors and its epoch,
//!    and goes on reading both. It keeps its own data packets and forwards over the socket
//!    every handshake initiation and everything addressed to the other epoch; it no longer
//!    starts, answers or completes a handshake itself, so no peer gets a session newer than
//!    the successor's. The successor, not reading yet, configures its peers and greets each
//!    with a handshake; the responses come to it through the predecessor, and its keepalive
//!    makes each peer send under the new session.
//! 2. *Cut-over.* When every peer with an endpoint has a session with the successor (or a
//!    bound passes), the successor sends `RELEASE`. The predecessor's readers stop (what
//!    arrives meanwhile waits in the kernel's queues), it answers `RELEASED`, and the
//!    successor starts reading.
//! 3. *Linger.* Data still in flight under the predecessor's sessions reaches the
//!    successor, which forwards it back; the predecessor decrypts it into the TUN device
//!    for [`LINGER`], then closes the connection and is done.
//!
//! Everything that decides where a datagram goes is the pure [`route`].

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// How long a predecessor keeps decrypting what is forwarded to it after the cut-over.
pub const LINGER: Duration = Duration::from_secs(2);

/// The top bit of a 24-bit slot index: the epoch of the process that handed it out.
pub const EPOCH_BIT: u32 = 1 << 23;

/// This process's part in a handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// No handover under way.
    Alone = 0,
    /// Predecessor: a successor attached; this process still reads.
    Giving = 1,
    /// Predecessor: its readers stopped; it decrypts what the successor forwards.
    Given = 2,
    /// Successor: attached, not reading yet.
    Taking = 3,
    /// Successor: reading; the predecessor still decrypts its own data.
    Taken = 4,
}

impl Mode {
    /// From its `repr`.
    pub fn from_u8(v: u8) -> Mode {
        match v {
            1 => Mode::Giving,
            2 => Mode::Given,
            3 => Mode::Taking,
            4 => Mode::Taken,
            _ => Mode::Alone,
        }
    }
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// This process handles it.
    Here,
    /// The other process of the handover handles it.
    Forward,
    /// Nobody may: dropped.
    Drop,
}

const INIT: u8 = 1;
const RESPONSE: u8 = 2;
const COOKIE: u8 = 3;
const DATA: u8 = 4;

/// The epoch (0 or 1) of the receiver index a datagram is addressed to, if it has one.
fn receiver_epoch(datagram: &[u8]) -> Option<u32> {
    let at = match *datagram.first()? {
        RESPONSE => 8,
        COOKIE | DATA => 4,
        _ => return None,
    };
    let bytes: [u8; 4] = datagram.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes) >> 31)
}

/// Which process handles `datagram`, for a process in `mode` whose epoch is `epoch`.
/// Datagrams of unknown type or too short stay here (the datapath drops them).
pub fn route(mode: Mode, epoch: u32, datagram: &[u8]) -> Route {
    let kind = datagram.first().copied().unwrap_or(0);
    let ours = receiver_epoch(datagram).is_none_or(|e| e == epoch);
    match mode {
        Mode::Alone | Mode::Taking => Route::Here,
        Mode::Giving => match kind {
            INIT => Route::Forward,
            RESPONSE | COOKIE | DATA if !ours => Route::Forward,
            // A handshake of ours completing now would give the peer a session newer
            // than the successor's.
            RESPONSE | COOKIE => Route::Drop,
            _ => Route::Here,
        },
        Mode::Given => match kind {
            DATA if ours => Route::Here,
            _ => Route::Drop,
        },
        Mode::Taken => match kind {
            DATA if !ours => Route::Forward,
            RESPONSE | COOKIE if !ours => Route::Drop,
            _ => Route::Here,
        },
    }
}

/// Whether a datagram this process is about to send starts a handshake (which a
/// predecessor no longer may).
pub fn is_handshake(datagram: &[u8]) -> bool {
    matches!(datagram.first(), Some(&INIT | &RESPONSE))
}

/// What one message on the handover socket says.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Predecessor → successor, with the TUN and UDP descriptors attached.
    Hello {
        epoch: u32,
        vnet_hdr: bool,
        udp_offload: bool,
        name: &'a str,
    },
    /// A datagram for the other process, as it came from `from`.
    Datagram { from: SocketAddr, bytes: &'a [u8] },
    /// Successor → predecessor: stop reading.
    Release,
    /// Predecessor → successor: stopped.
    Released,
}

const TAG_HELLO: u8 = b'H';
const TAG_DATAGRAM: u8 = b'D';
const TAG_RELEASE: u8 = b'R';
const TAG_RELEASED: u8 = b'r';
/// Tag, family, port, 16 address bytes.
const DATAGRAM_HEADER: usize = 20;

impl<'a> Message<'a> {
    /// Parses a received message; `None` for anything malformed.
    pub fn parse(buf: &'a [u8]) -> Option<Message<'a>> {
        match *buf.first()? {
            TAG_HELLO => {
                let [epoch, vnet, offload] = buf.get(1..4)?.try_into().ok()?;
                Some(Message::Hello {
                    epoch: u32::from(epoch & 1),
                    vnet_hdr: vnet != 0,
                    udp_offload: offload != 0,
                    name: std::str::from_utf8(buf.get(4..)?).ok()?,
                })
            }
            TAG_DATAGRAM => {
                let header = buf.get(..DATAGRAM_HEADER)?;
                let port = u16::from_le_bytes([header[2], header[3]]);
                let ip = match header[1] {
                    4 => IpAddr::V4(Ipv4Addr::new(header[4], header[5], header[6], header[7])),
                    6 => {
                        let octets: [u8; 16] = header[4..20].try_into().ok()?;
                        IpAddr::V6(Ipv6Addr::from(octets))
                    }
                    _ => return None,
                };
                Some(Message::Datagram {
                    from: SocketAddr::new(ip, port),
                    bytes: &buf[DATAGRAM_HEADER..],
                })
            }
            TAG_RELEASE => Some(Message::Release),
            TAG_RELEASED => Some(Message::Released),
            _ => None,
        }
    }
}

/// The header of a forwarded datagram (the datagram follows it in the same message).
pub fn datagram_header(from: SocketAddr) -> [u8; DATAGRAM_HEADER] {
    let mut h = [0u8; DATAGRAM_HEADER];
    h[0] = TAG_DATAGRAM;
    h[2..4].copy_from_slice(&from.port().to_le_bytes());
    match from.ip() {
        IpAddr::V4(v4) => {
            h[1] = 4;
            h[4..8].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            h[1] = 6;
            h[4..20].copy_from_slice(&v6.octets());
        }
    }
    h
}

/// The body of a `HELLO`.
pub fn hello(epoch: u32, vnet_hdr: bool, udp_offload: bool, name: &str) -> Vec<u8> {
    let mut m = vec![
        TAG_HELLO,
        (epoch & 1) as u8,
        u8::from(vnet_hdr),
        u8::from(udp_offload),
    ];
    m.extend_from_slice(name.as_bytes());
    m
}

/// `RELEASE`.
pub const RELEASE: [u8; 1] = [TAG_RELEASE];
/// `RELEASED`.
pub const RELEASED: [u8; 1] = [TAG_RELEASED];

/// Largest message: a forwarded datagram of the largest size the datapath handles.
pub const MAX_MESSAGE: usize = DATAGRAM_HEADER + 65_535 + 64;

/// One end of a handover connection.
#[derive(Debug)]
pub struct Conn {
    fd: OwnedFd,
}

impl Conn {
    /// Connects to a predecessor listening at `path`; `Ok(None)` when none listens there.
    pub fn connect(path: &Path) -> io::Result<Option<Conn>> {
        let fd = seqpacket()?;
        let (addr, len) = sockaddr_un(path)?;
        // SAFETY: `addr` is a sockaddr_un of `len` bytes.
        if unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT | libc::ECONNREFUSED) => Ok(None),
                _ => Err(e),
            };
        }
        let conn = Conn { fd };
        conn.set_buffers();
        Ok(Some(conn))
    }

    fn set_buffers(&self) {
        let size: libc::c_int = 4 << 20;
        for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
            // SAFETY: an int option on our own socket; best effort.
            unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const size).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }

    /// Sends one message made of `parts`, with `fds` attached (at most 2).
    pub fn send(&self, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let mut control = [0u64; 8];
        // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        if !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE is a pure computation.
            let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: `control` has room for one header with `bytes` of data (2 fds at most).
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    bytes,
                );
            }
        }
        loop {
            // SAFETY: `msg` points at valid iovecs and control data.
            let n =
                unsafe { libc::sendmsg(self.fd.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives one message into `buf`, waiting at most `timeout` (`None`: forever, or
    /// until `wake` is readable). Returns its length (0: the other end closed) and the
    /// descriptors attached; `WouldBlock` on timeout or wake.
    pub fn recv(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
        wake: RawFd,
    ) -> io::Result<(usize, Vec<OwnedFd>)> {
        if !wait_any([self.fd.as_raw_fd(), wake], timeout)?[0] {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: `msg` points at a valid buffer and control area.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut received = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into `control`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..bytes / size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        received.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
            }
        }
        Ok((n as usize, received))
    }
}

/// A listening handover socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Listens at `path` (mode 0600), replacing a stale socket file there.
    pub fn bind(path: &Path) -> io::Result<Listener> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let fd = seqpacket()?;
        let (addr, len) = sockaddr_un(path)?;
        // SAFETY: `addr` is a sockaddr_un of `len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::chmod(c_path.as_ptr(), 0o600) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen on a bound socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 1) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener { fd })
    }

    /// Waits until a successor connects (`Ok(Some)`) or `wake` becomes readable (`Ok(None)`).
    pub fn accept(&self, wake: RawFd) -> io::Result<Option<Conn>> {
        match wait_any([self.fd.as_raw_fd(), wake], None) {
            Ok([true, false]) => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(e),
        }
        // SAFETY: accept on our listening socket; no address wanted.
        let raw = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let conn = Conn {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        };
        conn.set_buffers();
        Ok(Some(conn))
    }
}

/// Waits until one of `fds` is readable (or errors, or hangs up), or `timeout` passes; says
/// which are.
pub(crate) fn wait_any<const N: usize>(
    fds: [RawFd; N],
    timeout: Option<Duration>,
) -> io::Result<[bool; N]> {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: `polled` is a valid array of N pollfds.
    if unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, ms) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(polled.map(|p| p.revents != 0))
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("handover socket path too long: {}", path.display()),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    Ok((addr, len))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn data(receiver: u32) -> Vec<u8> {
        let mut d = vec![DATA, 0, 0, 0];
        d.extend_from_slice(&receiver.to_le_bytes());
        d.extend_from_slice(&[0; 24]);
        d
    }

    fn response(receiver: u32) -> Vec<u8> {
        let mut d = vec![RESPONSE, 0, 0, 0, 9, 9, 9, 9];
        d.extend_from_slice(&receiver.to_le_bytes());
        d.extend_from_slice(&[0; 80]);
        d
    }

    const OLD: u32 = 0;
    const NEW: u32 = 1;
    fn index(epoch: u32) -> u32 {
        (((epoch * EPOCH_BIT) | 0x1234) << 8) | 3
    }

    #[test]
    fn nothing_moves_without_a_handover() {
        for d in [data(index(NEW)), response(index(NEW)), vec![INIT; 148]] {
            assert_eq!(route(Mode::Alone, OLD, &d), Route::Here);
        }
    }

    #[test]
    fn a_predecessor_keeps_only_its_own_data_and_completes_no_handshake() {
        let m = Mode::Giving;
        assert_eq!(route(m, OLD, &data(index(OLD))), Route::Here);
        assert_eq!(route(m, OLD, &data(index(NEW))), Route::Forward);
        assert_eq!(route(m, OLD, &response(index(NEW))), Route::Forward);
        assert_eq!(route(m, OLD, &response(index(OLD))), Route::Drop);
        assert_eq!(route(m, OLD, &[INIT; 148]), Route::Forward);
        // Released: only its own data, whatever is forwarded to it.
        assert_eq!(route(Mode::Given, OLD, &data(index(OLD))), Route::Here);
        assert_eq!(route(Mode::Given, OLD, &data(index(NEW))), Route::Drop);
        assert_eq!(route(Mode::Given, OLD, &[INIT; 148]), Route::Drop);
    }

    #[test]
    fn a_successor_hands_back_only_the_predecessors_data() {
        let m = Mode::Taken;
        assert_eq!(route(m, NEW, &data(index(NEW))), Route::Here);
        assert_eq!(route(m, NEW, &data(index(OLD))), Route::Forward);
        assert_eq!(route(m, NEW, &response(index(OLD))), Route::Drop);
        assert_eq!(route(m, NEW, &[INIT; 148]), Route::Here);
        assert_eq!(route(Mode::Taking, NEW, &data(index(OLD))), Route::Here);
    }

    #[test]
    fn short_or_unknown_datagrams_stay_to_be_dropped_by_the_datapath() {
        for m in [Mode::Giving, Mode::Taken] {
            assert_eq!(route(m, OLD, &[]), Route::Here);
            assert_eq!(route(m, OLD, &[DATA, 0]), Route::Here);
            assert_eq!(route(m, OLD, &[9; 40]), Route::Here);
        }
    }

    #[test]
    fn messages_round_trip() {
        let h = hello(1, true, false, "wgmesh0");
        assert_eq!(
            Message::parse(&h),
            Some(Message::Hello {
                epoch: 1,
                vnet_hdr: true,
                udp_offload: false,
                name: "wgmesh0"
            })
        );
        for from in ["198.18.0.11:51820", "[fd00::1]:4"] {
            let from: SocketAddr = from.parse().unwrap();
            let mut m = datagram_header(from).to_vec();
            m.extend_from_slice(b"abc");
            assert_eq!(
                Message::parse(&m),
                Some(Message::Datagram {
                    from,
                    bytes: b"abc"
                })
            );
        }
        assert_eq!(Message::parse(&RELEASE), Some(Message::Release));
        assert_eq!(Message::parse(&RELEASED), Some(Message::Released));
        assert_eq!(Message::parse(&[TAG_DATAGRAM, 5]), None);
        assert_eq!(Message::parse(&[]), None);
    }

    #[test]
    fn descriptors_pass_over_the_socket() {
        let dir = std::env::temp_dir().join(format!("wgmesh-handover-{}", std::process::id()));
        let path = dir.join("h.sock");
        let listener = Listener::bind(&path).unwrap();
        // SAFETY: plain eventfd creation; never written, so never readable.
        let never = unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
        let client = std::thread::spawn({
            let path = path.clone();
            move || Conn::connect(&path).unwrap().unwrap()
        });
        let server = listener.accept(never.as_raw_fd()).unwrap().unwrap();
        let client = client.join().unwrap();
        let (r, w) = {
            let mut p = [0; 2];
            // SAFETY: a pipe into a two-element array.
            assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: fresh descriptors.
            unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
        };
        server
            .send(
                &[&hello(0, false, true, "x")],
                &[r.as_raw_fd(), w.as_raw_fd()],
            )
            .unwrap();
        let mut buf = vec![0; MAX_MESSAGE];
        let (n, fds) = client.recv(&mut buf, None, never.as_raw_fd()).unwrap();
        assert!(matches!(
            Message::parse(&buf[..n]),
            Some(Message::Hello { name: "x", .. })
        ));
        assert_eq!(fds.len(), 2);
        // The passed write end feeds the original read end.
        // SAFETY: writing 1 byte from a valid buffer.
        assert_eq!(
            unsafe { libc::write(fds[1].as_raw_fd(), b"z".as_ptr().cast(), 1) },
            1
        );
        let mut b = [0u8; 1];
        // SAFETY: reading 1 byte into a valid buffer.
        assert_eq!(
            unsafe { libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1) },
            1
        );
        assert_eq!(&b, b"z");
        drop(server);
        let (n, _) = client.recv(&mut buf, None, never.as_raw_fd()).unwrap();
        assert_eq!(n, 0, "a closed end reads as empty");
        assert!(Conn::connect(&dir.join("none.sock")).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
