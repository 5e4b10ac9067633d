//! The device's UDP socket: one dual-stack socket (`[::]:port`, `IPV6_V6ONLY` off, IPv4 peers as
//! v4-mapped addresses), large buffers, `SO_MARK`, and batched I/O with `recvmmsg`/`sendmmsg`
//! over preallocated buffers so the datapath allocates nothing per packet.
//!
//! Falls back to an IPv4-only socket when the host has IPv6 disabled.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Socket buffer size asked for (with `SO_*BUFFORCE` when privileged).
const SOCKET_BUFFER_BYTES: libc::c_int = 8 << 20;

/// A bound UDP socket.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    v6: bool,
    port: u16,
}

impl UdpSocket {
    /// Binds `[::]:port` (0 picks a free port), or `0.0.0.0:port` without IPv6.
    pub fn bind(port: u16, fwmark: u32) -> io::Result<Self> {
        match Self::bind_family(true, port, fwmark) {
            Ok(s) => Ok(s),
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                Self::bind_family(false, port, fwmark)
            }
            Err(e) => Err(e),
        }
    }

    fn bind_family(v6: bool, port: u16, fwmark: u32) -> io::Result<Self> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket creation.
        let raw = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let s = fd.as_raw_fd();
        if v6 {
            setsockopt(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
        }
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt(s, libc::SOL_SOCKET, force, SOCKET_BUFFER_BYTES).is_err() {
                // Unprivileged: the sysctl limits apply; best effort.
                let _ = setsockopt(s, libc::SOL_SOCKET, plain, SOCKET_BUFFER_BYTES);
            }
        }
        if fwmark != 0 {
            setsockopt(s, libc::SOL_SOCKET, libc::SO_MARK, fwmark as libc::c_int)?;
        }
        let any = if v6 {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
        };
        let (storage, len) = to_sockaddr(any, v6);
        // SAFETY: `storage` holds a sockaddr of `len` bytes.
        if unsafe { libc::bind(s, (&raw const storage).cast(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let port = local_port(s)?;
        Ok(Self { fd, v6, port })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sets `SO_MARK` (0 clears it).
    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        setsockopt(
            self.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            mark as libc::c_int,
        )
    }

    /// Wakes every thread blocked on this socket and makes further receives return 0: used to
    /// retire a socket when the port changes or the device stops.
    pub fn shutdown(&self) {
        // SAFETY: shutdown on our own descriptor. On an unconnected UDP socket it reports
        // ENOTCONN but still marks the socket shut down and wakes waiters, which is the point.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Sends one datagram, blocking while the socket buffer is full.
    pub fn send_to(&self, buf: &[u8], addr: SocketAddr) -> io::Result<()> {
        let (storage, len) = to_sockaddr(addr, self.v6);
        loop {
            // SAFETY: `buf` and `storage` are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw const storage).cast(),
                    len,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Receives up to `batch.capacity()` datagrams without blocking; returns how many.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.prepare();
        // SAFETY: `prepare` pointed every header at buffers owned by `batch`, which outlives
        // the call; the kernel writes at most the lengths given.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                batch.hdrs.as_mut_ptr(),
                batch.hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        batch.filled = n;
        Ok(n)
    }

    /// Sends every queued datagram of `batch` (blocking while the socket buffer is full) and
    /// empties it. Datagrams the kernel refuses (say, no route) are skipped.
    pub fn send_batch(&self, batch: &mut SendBatch) {
        let total = batch.len;
        let mut sent = 0;
        while sent < total {
            batch.prepare(sent);
            // SAFETY: `prepare` pointed headers `sent..total` at buffers owned by `batch`.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    batch.hdrs[sent..total].as_mut_ptr(),
                    (total - sent) as libc::c_uint,
                    0,
                )
            };
            if n > 0 {
                sent += n as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The datagram at `sent` failed: drop it and go on with the rest.
            tracing::trace!(error = %err, "send failed, dropping datagram");
            sent += 1;
        }
        batch.len = 0;
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Preallocated buffers for `recvmmsg`.
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    filled: usize,
}

// SAFETY: the raw pointers in `iovs`/`hdrs` only ever point into this struct's own buffers and
// are rewritten before every use.
unsafe impl Send for RecvBatch {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.bufs.len())
            .field("filled", &self.filled)
            .finish()
    }
}

impl RecvBatch {
    /// `count` buffers of `size` bytes.
    pub fn new(count: usize, size: usize) -> Self {
        Self {
            bufs: (0..count)
                .map(|_| vec![0u8; size].into_boxed_slice())
                .collect(),
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs; all-zero is valid.
            addrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            filled: 0,
        }
    }

    fn prepare(&mut self) {
        for i in 0..self.bufs.len() {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.bufs[i].len(),
            };
            // SAFETY: all-zero is a valid msghdr.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = (&raw mut self.addrs[i]).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &raw mut self.iovs[i];
            hdr.msg_iovlen = 1;
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
        }
        self.filled = 0;
    }

    /// Datagram `i` of the last receive and its source (v4-mapped sources shown as IPv4).
    #[inline]
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.filled {
            return None;
        }
        let len = (self.hdrs[i].msg_len as usize).min(self.bufs[i].len());
        let addr = from_sockaddr(&self.addrs[i])?;
        Some((&self.bufs[i][..len], addr))
    }
}

/// Preallocated buffers for `sendmmsg`: fill with [`SendBatch::slot`] and [`SendBatch::commit`].
pub struct SendBatch {
    bufs: Vec<Box<[u8]>>,
    lens: Vec<usize>,
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
    v6: bool,
}

// SAFETY: as for RecvBatch.
unsafe impl Send for SendBatch {}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("capacity", &self.bufs.len())
            .field("len", &self.len)
            .finish()
    }
}

impl SendBatch {
    /// `count` buffers of `size` bytes, addressed for a socket of the given family.
    pub fn new(count: usize, size: usize) -> Self {
        Self {
            bufs: (0..count)
                .map(|_| vec![0u8; size].into_boxed_slice())
                .collect(),
            lens: vec![0; count],
            // SAFETY: plain C structs; all-zero is valid.
            addrs: (0..count).map(|_| (unsafe { zeroed() }, 0)).collect(),
            iovs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            len: 0,
            v6: true,
        }
    }

    /// Matches the address family of the socket the batch will be sent on.
    pub fn set_family(&mut self, socket: &UdpSocket) {
        self.v6 = socket.v6;
    }

    /// Whether no further datagram fits.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    /// Whether nothing is queued.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer for the next datagram.
    #[inline]
    pub fn slot(&mut self) -> &mut [u8] {
        &mut self.bufs[self.len]
    }

    /// Queues the first `len` bytes of the current slot for `addr`.
    #[inline]
    pub fn commit(&mut self, len: usize, addr: SocketAddr) {
        self.lens[self.len] = len;
        self.addrs[self.len] = to_sockaddr(addr, self.v6);
        self.len += 1;
    }

    fn prepare(&mut self, from: usize) {
        for i in from..self.len {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            // SAFETY: all-zero is a valid msghdr.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = (&raw mut self.addrs[i].0).cast();
            hdr.msg_namelen = self.addrs[i].1;
            hdr.msg_iov = &raw mut self.iovs[i];
            hdr.msg_iovlen = 1;
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
        }
    }
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a c_int and the length says so.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn local_port(fd: RawFd) -> io::Result<u16> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` has room for any address and `len` says how much.
    if unsafe { libc::getsockname(fd, (&raw mut storage).cast(), &mut len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    from_sockaddr(&storage)
        .map(|a| a.port())
        .ok_or_else(|| io::Error::other("unexpected socket address family"))
}

/// A socket address in C form; IPv4 addresses become v4-mapped for an IPv6 socket.
fn to_sockaddr(addr: SocketAddr, v6_socket: bool) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let addr = match (addr, v6_socket) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (a, _) => a,
    };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (storage, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            (storage, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// A Rust socket address from C form; v4-mapped IPv6 addresses come back as IPv4.
fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(std::ptr::from_ref(storage).cast()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 = unsafe { &*(std::ptr::from_ref(storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sockaddr_round_trip_unmaps_ipv4() {
        for (addr, v6) in [
            ("192.0.2.1:51820", true),
            ("192.0.2.1:51820", false),
            ("[2001:db8::1]:443", true),
        ] {
            let a: SocketAddr = addr.parse().unwrap();
            let (storage, _) = to_sockaddr(a, v6);
            assert_eq!(from_sockaddr(&storage), Some(a), "{addr} v6={v6}");
        }
        let (storage, len) = to_sockaddr("192.0.2.1:1".parse().unwrap(), true);
        assert_eq!(i32::from(storage.ss_family), libc::AF_INET6);
        assert_eq!(len as usize, size_of::<libc::sockaddr_in6>());
    }

    #[test]
    fn batches_move_datagrams_over_loopback() {
        let a = UdpSocket::bind(0, 0).unwrap();
        let b = UdpSocket::bind(0, 0).unwrap();
        assert_ne!(a.port(), 0);
        let to_b: SocketAddr = format!("127.0.0.1:{}", b.port()).parse().unwrap();
        let mut out = SendBatch::new(4, 2048);
        out.set_family(&a);
        for i in 0..3u8 {
            out.slot()[..3].copy_from_slice(&[i, i, i]);
            out.commit(3, to_b);
        }
        a.send_batch(&mut out);
        assert!(out.is_empty());
        let mut rx = RecvBatch::new(8, 2048);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 3 && std::time::Instant::now() < deadline {
            match b.recv_batch(&mut rx) {
                Ok(n) => {
                    for i in 0..n {
                        let (data, from) = rx.get(i).unwrap();
                        assert_eq!(from, format!("127.0.0.1:{}", a.port()).parse().unwrap());
                        got.push(data.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, vec![vec![0; 3], vec![1; 3], vec![2; 3]]);
    }
}
