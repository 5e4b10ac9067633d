//! The device's UDP socket: one dual-stack socket (`[::]:port`, `IPV6_V6ONLY` off, IPv4 peers as
//! v4-mapped addresses), large buffers, `SO_MARK`, and batched I/O with `recvmmsg`/`sendmmsg`
//! over preallocated buffers so the datapath allocates nothing per packet.
//!
//! Segmentation offload both ways: consecutive datagrams of one batch to the same endpoint and
//! of the same size go out as one `UDP_SEGMENT` (GSO) message, and `UDP_GRO` lets the kernel hand
//! over runs of datagrams from one sender as one buffer. A GSO run crosses a veth or the
//! loopback as a single packet. If the kernel refuses GSO, the socket falls back to plain
//! datagrams for good.
//!
//! Falls back to an IPv4-only socket when the host has IPv6 disabled.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Socket buffer size asked for (with `SO_*BUFFORCE` when privileged).
const SOCKET_BUFFER_BYTES: libc::c_int = 8 << 20;
/// `linux/udp.h`: segment size of a GSO send / of a GRO receive.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most segments one GSO send may carry (`UDP_MAX_SEGMENTS` on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most payload one GSO send may carry: an IP packet's 64 KiB less IPv6 and UDP headers.
const MAX_GSO_BYTES: usize = 65_535 - 40 - 8;
/// Datagrams gathered in one batch at most.
const MAX_DATAGRAMS_PER_BATCH: usize = 512;
/// Room for one `int`/`u16` control message.
const CMSG_BYTES: usize = 32;

/// A bound UDP socket.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    v6: bool,
    port: u16,
    gso: AtomicBool,
}

impl UdpSocket {
    /// Binds `[::]:port` (0 picks a free port), or `0.0.0.0:port` without IPv6. `offload`
    /// turns UDP GSO and GRO on.
    pub fn bind(port: u16, fwmark: u32, offload: bool) -> io::Result<Self> {
        match Self::bind_family(true, port, fwmark, offload) {
            Ok(s) => Ok(s),
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                Self::bind_family(false, port, fwmark, offload)
            }
            Err(e) => Err(e),
        }
    }

    fn bind_family(v6: bool, port: u16, fwmark: u32, offload: bool) -> io::Result<Self> {
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
        if offload {
            // Best effort: without GRO every datagram simply arrives on its own.
            let _ = setsockopt(s, libc::SOL_UDP, UDP_GRO, 1);
        }
        Ok(Self {
            fd,
            v6,
            port,
            gso: AtomicBool::new(offload),
        })
    }

    /// A socket bound by another process and handed over (see `handover`).
    pub fn from_fd(fd: OwnedFd, offload: bool) -> io::Result<Self> {
        let s = fd.as_raw_fd();
        // SAFETY: a zeroed sockaddr_storage is valid; getsockname fills at most `len` bytes.
        let family = unsafe {
            let mut storage: libc::sockaddr_storage = zeroed();
            let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if libc::getsockname(s, (&raw mut storage).cast(), &raw mut len) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::c_int::from(storage.ss_family)
        };
        let port = local_port(s)?;
        Ok(Self {
            fd,
            v6: family == libc::AF_INET6,
            port,
            gso: AtomicBool::new(offload),
        })
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
        let gso = self.gso.load(Ordering::Relaxed);
        let total = batch.prepare(gso);
        let mut sent = 0;
        while sent < total {
            // SAFETY: `prepare` pointed headers `0..total` at buffers owned by `batch`.
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
            if gso && batch.groups[sent].count > 1 && is_gso_refusal(&err) {
                // This kernel or path cannot segment: plain datagrams from now on.
                tracing::info!(error = %err, "UDP GSO unavailable, sending datagrams one by one");
                self.gso.store(false, Ordering::Relaxed);
                let g = batch.groups[sent];
                for k in 0..g.count {
                    let from = g.offset + k * g.seg_len;
                    let to = (from + g.seg_len).min(g.offset + g.len);
                    let _ = self.send_to(&batch.buf[from..to], g.addr);
                }
            } else {
                // The datagram at `sent` failed: drop it and go on with the rest.
                tracing::trace!(error = %err, "send failed, dropping datagram");
            }
            sent += 1;
        }
        batch.clear();
    }
}

fn is_gso_refusal(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
    )
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
    cmsgs: Vec<[u64; CMSG_BYTES / 8]>,
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
            cmsgs: vec![[0; CMSG_BYTES / 8]; count],
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
            hdr.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            hdr.msg_controllen = CMSG_BYTES as _;
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
        }
        self.filled = 0;
    }

    /// Message `i` of the last receive: its bytes, its source (v4-mapped sources shown as
    /// IPv4) and the size of the datagrams it is made of (GRO; the last one may be shorter).
    #[inline]
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr, usize)> {
        if i >= self.filled {
            return None;
        }
        let len = (self.hdrs[i].msg_len as usize).min(self.bufs[i].len());
        let addr = from_sockaddr(&self.addrs[i])?;
        let segment = gro_segment_size(&self.hdrs[i].msg_hdr).unwrap_or(len);
        Some((&self.bufs[i][..len], addr, segment.max(1)))
    }
}

/// The `UDP_GRO` control message of a received message, if the kernel coalesced it.
fn gro_segment_size(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: `hdr` was filled in by recvmmsg; its control buffer is ours and at least
    // `msg_controllen` long, and the CMSG_* helpers stay within it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(size).ok();
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// One `sendmmsg` entry: a run of same-size datagrams to one address, back to back in the
/// buffer (the last may be shorter). Sent with `UDP_SEGMENT` when it has more than one.
#[derive(Debug, Clone, Copy)]
struct Group {
    offset: usize,
    seg_len: usize,
    count: usize,
    len: usize,
    addr: SocketAddr,
    closed: bool,
}

/// Preallocated buffer for outgoing datagrams: write the next one into [`SendBatch::slot`],
/// then [`SendBatch::commit`] it. Datagrams are packed back to back so runs to one endpoint can
/// go out as one GSO send.
pub struct SendBatch {
    buf: Box<[u8]>,
    tail: usize,
    datagrams: usize,
    reserve: usize,
    groups: Vec<Group>,
    max_groups: usize,
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    cmsgs: Vec<[u64; CMSG_BYTES / 8]>,
    v6: bool,
}

// SAFETY: as for RecvBatch.
unsafe impl Send for SendBatch {}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("bytes", &self.tail)
            .field("groups", &self.groups.len())
            .finish()
    }
}

impl SendBatch {
    /// Room for `bytes` of datagrams in at most `max_groups` sends; a slot always offers at
    /// least `max_datagram` bytes.
    pub fn new(bytes: usize, max_groups: usize, max_datagram: usize) -> Self {
        // Without GSO every datagram needs its own header.
        let count = MAX_DATAGRAMS_PER_BATCH;
        Self {
            buf: vec![0u8; bytes + max_datagram].into_boxed_slice(),
            tail: 0,
            datagrams: 0,
            reserve: max_datagram,
            groups: Vec::with_capacity(max_groups),
            max_groups,
            // SAFETY: plain C structs; all-zero is valid.
            addrs: (0..count).map(|_| (unsafe { zeroed() }, 0)).collect(),
            iovs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            cmsgs: vec![[0; CMSG_BYTES / 8]; count],
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
        self.groups.len() == self.max_groups
            || self.datagrams == MAX_DATAGRAMS_PER_BATCH
            || self.tail + self.reserve > self.buf.len()
    }

    /// Whether nothing is queued.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The buffer for the next datagram (at least `max_datagram` bytes).
    #[inline]
    pub fn slot(&mut self) -> &mut [u8] {
        &mut self.buf[self.tail..]
    }

    /// Queues the first `len` bytes of the current slot for `addr`.
    #[inline]
    pub fn commit(&mut self, len: usize, addr: SocketAddr) {
        self.datagrams += 1;
        if let Some(g) = self.groups.last_mut()
            && !g.closed
            && g.addr == addr
            && len <= g.seg_len
            && g.count < MAX_GSO_SEGMENTS
            && g.len + len <= MAX_GSO_BYTES
            && g.offset + g.len == self.tail
        {
            g.count += 1;
            g.len += len;
            // A shorter datagram can only be the last of a run.
            g.closed = len < g.seg_len;
            self.tail += len;
            return;
        }
        self.groups.push(Group {
            offset: self.tail,
            seg_len: len,
            count: 1,
            len,
            addr,
            closed: false,
        });
        self.tail += len;
    }

    fn clear(&mut self) {
        self.groups.clear();
        self.tail = 0;
        self.datagrams = 0;
    }

    /// Points the headers at the queued data; returns how many headers to send. Without GSO
    /// every datagram gets its own header.
    fn prepare(&mut self, gso: bool) -> usize {
        let mut n = 0;
        for gi in 0..self.groups.len() {
            let g = self.groups[gi];
            let sockaddr = to_sockaddr(g.addr, self.v6);
            let pieces = if gso { 1 } else { g.count };
            for k in 0..pieces {
                let (offset, len) = if gso {
                    (g.offset, g.len)
                } else {
                    let from = g.offset + k * g.seg_len;
                    (from, g.seg_len.min(g.offset + g.len - from))
                };
                self.addrs[n] = sockaddr;
                self.iovs[n] = libc::iovec {
                    iov_base: self.buf[offset..].as_mut_ptr().cast(),
                    iov_len: len,
                };
                // SAFETY: all-zero is a valid msghdr.
                let mut hdr: libc::msghdr = unsafe { zeroed() };
                hdr.msg_name = (&raw mut self.addrs[n].0).cast();
                hdr.msg_namelen = self.addrs[n].1;
                hdr.msg_iov = &raw mut self.iovs[n];
                hdr.msg_iovlen = 1;
                if gso && g.count > 1 {
                    let control = self.cmsgs[n].as_mut_ptr().cast::<u8>();
                    hdr.msg_control = control.cast();
                    // SAFETY: CMSG_SPACE of a u16 fits in CMSG_BYTES; the helpers only write
                    // inside the control buffer we point them at.
                    unsafe {
                        hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                        let c = libc::CMSG_FIRSTHDR(&hdr);
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = UDP_SEGMENT;
                        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                        std::ptr::write_unaligned(
                            libc::CMSG_DATA(c).cast::<u16>(),
                            g.seg_len as u16,
                        );
                    }
                }
                self.hdrs[n] = libc::mmsghdr {
                    msg_hdr: hdr,
                    msg_len: 0,
                };
                n += 1;
            }
        }
        n
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
        let a = UdpSocket::bind(0, 0, true).unwrap();
        let b = UdpSocket::bind(0, 0, true).unwrap();
        assert_ne!(a.port(), 0);
        let to_b: SocketAddr = format!("127.0.0.1:{}", b.port()).parse().unwrap();
        let mut out = SendBatch::new(64 * 1024, 8, 2048);
        out.set_family(&a);
        for i in 0..3u8 {
            out.slot()[..3].copy_from_slice(&[i, i, i]);
            out.commit(3, to_b);
        }
        // Three equal datagrams to one address make one GSO run.
        assert_eq!(out.groups.len(), 1);
        a.send_batch(&mut out);
        assert!(out.is_empty());
        let mut rx = RecvBatch::new(8, 2048);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 3 && std::time::Instant::now() < deadline {
            match b.recv_batch(&mut rx) {
                Ok(n) => {
                    for i in 0..n {
                        let (data, from, seg) = rx.get(i).unwrap();
                        assert_eq!(from, format!("127.0.0.1:{}", a.port()).parse().unwrap());
                        got.extend(data.chunks(seg).map(<[u8]>::to_vec));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, vec![vec![0; 3], vec![1; 3], vec![2; 3]]);
    }

    #[test]
    fn runs_split_on_address_size_and_limits() {
        let x: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let y: SocketAddr = "192.0.2.2:1".parse().unwrap();
        let mut b = SendBatch::new(1 << 20, 64, 2048);
        for (len, addr) in [(100, x), (100, x), (60, x), (100, x), (100, y), (120, y)] {
            b.commit(len, addr);
        }
        let runs: Vec<(usize, usize, usize)> = b
            .groups
            .iter()
            .map(|g| (g.seg_len, g.count, g.len))
            .collect();
        // x: 100,100,60 (a shorter one ends the run); x: 100; y: 100; y: 120 (longer: new run).
        assert_eq!(
            runs,
            vec![(100, 3, 260), (100, 1, 100), (100, 1, 100), (120, 1, 120)]
        );
        let mut b = SendBatch::new(1 << 20, 64, 2048);
        for _ in 0..100 {
            b.commit(1452, x);
        }
        assert!(
            b.groups
                .iter()
                .all(|g| g.len <= MAX_GSO_BYTES && g.count <= MAX_GSO_SEGMENTS)
        );
        assert_eq!(b.groups.iter().map(|g| g.count).sum::<usize>(), 100);
        // Without GSO every datagram gets its own header.
        assert_eq!(b.prepare(false), 100);
        assert_eq!(b.prepare(true), b.groups.len());
    }
}
