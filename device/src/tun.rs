//! The TUN interface: `/dev/net/tun` opened with `IFF_TUN | IFF_NO_PI`, IPv4 and IPv6 packets
//! without any header. Owns the file descriptor; the interface disappears when it is closed.
//!
//! With offload on, every read and write carries a `virtio_net_hdr` (`IFF_VNET_HDR`) and the
//! kernel may hand over TCP super-packets (TSO4/TSO6) and partial checksums; `offload` splits
//! them.
//!
//! Only ioctls live here (create, offload, MTU, up). Addresses and routes are the caller's
//! business.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_VNET_HDR: libc::c_int = 0x4000;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// `struct ifreq` with the union members we use.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: IfReqData,
}

#[repr(C)]
union IfReqData {
    flags: libc::c_short,
    mtu: libc::c_int,
    _pad: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty()
            || bytes.len() >= IFNAMSIZ
            || bytes.contains(&0)
            || bytes.contains(&b'/')
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {name:?}"),
            ));
        }
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: IfReqData { _pad: [0; 24] },
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }
}

/// An open TUN interface.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    vnet_hdr: bool,
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name`. The descriptor is non-blocking.
    /// `offload` asks for TCP segmentation and checksum offload (see the module doc).
    pub fn create(name: &str, offload: bool) -> io::Result<Self> {
        let mut req = IfReq::new(name)?;
        let vnet = if offload { IFF_VNET_HDR } else { 0 };
        req.data.flags = (libc::IFF_TUN | libc::IFF_NO_PI | vnet) as libc::c_short;
        // SAFETY: a constant NUL-terminated path and valid flags.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out as.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel writes back the final name (it may expand a `%d` pattern).
        let name = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| name.to_owned());
        if offload {
            let features = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes the feature bits by value.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, features) } < 0 {
                // Still correct without: the kernel then sends plain packets (with a header).
                tracing::info!(error = %io::Error::last_os_error(), "TUN offload unavailable");
            }
        }
        Ok(Self {
            fd,
            name,
            vnet_hdr: offload,
        })
    }

    /// An interface opened by another process and handed over (see `handover`): `fd` as
    /// that process set it up, with or without a `virtio_net_hdr`.
    pub fn from_fd(fd: OwnedFd, name: &str, vnet_hdr: bool) -> Self {
        Self {
            fd,
            name: name.to_owned(),
            vnet_hdr,
        }
    }

    /// Whether reads and writes carry a `virtio_net_hdr`.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the interface outlive its descriptor (`true`: it stays, with its addresses and
    /// routes, until a process attaches to it again or it is deleted), or not.
    pub fn set_persist(&self, persist: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes a flag by value.
        cvt(unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETPERSIST,
                libc::c_ulong::from(persist),
            )
        })
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        let mut req = IfReq::new(&self.name)?;
        req.data.mtu = libc::c_int::try_from(mtu)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "MTU out of range"))?;
        with_ctl_socket(|s| {
            // SAFETY: SIOCSIFMTU reads a `struct ifreq` with `ifr_mtu` set.
            cvt(unsafe { libc::ioctl(s, libc::SIOCSIFMTU, &mut req) })
        })
    }

    /// Brings the interface up.
    pub fn set_up(&self) -> io::Result<()> {
        let mut req = IfReq::new(&self.name)?;
        with_ctl_socket(|s| {
            // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `ifr_flags` of a `struct ifreq`.
            cvt(unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) })?;
            // SAFETY: the kernel just filled in `flags`.
            unsafe { req.data.flags |= libc::IFF_UP as libc::c_short };
            // SAFETY: as above.
            cvt(unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req) })
        })
    }

    /// Reads one packet; `WouldBlock` when none is queued.
    #[inline]
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one packet.
    #[inline]
    pub fn write(&self, packet: &[u8]) -> io::Result<usize> {
        // SAFETY: `packet` is valid for reads of `packet.len()` bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn with_ctl_socket(f: impl FnOnce(RawFd) -> io::Result<()>) -> io::Result<()> {
    // SAFETY: plain socket creation.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    f(sock.as_raw_fd())
}
