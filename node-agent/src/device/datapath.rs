//! The device loop: the threads that move packets and drive timers.
//!
//! * `tun-rx` reads packets from the TUN device, routes each by destination (allowed IPs,
//!   longest prefix), encrypts it with the peer's `Tunn` and sends the batch with one
//!   `sendmmsg`.
//! * `udp-rx` receives a batch of datagrams with one `recvmmsg`, routes each to its peer
//!   (handshake initiations by the key they decrypt to, everything else by receiver index),
//!   decrypts, checks the inner source against the peer's allowed IPs and writes it to the TUN
//!   device. It answers handshakes and cookies and follows roaming endpoints.
//! * `timers` runs `Tunn::update_timers` for every peer each tick (rekey, retransmit,
//!   keepalives, expiry) and resets the shared handshake rate limiter.
//!
//! Buffers are allocated once per thread. The peer table is read-locked once per batch; a
//! peer's mutex is held only around `Tunn` calls, never across a syscall on the hot path.

use super::Shared;
use super::offload::{self, VNET_HDR_LEN};
use super::peer::{Peer, PeerState};
use super::timers::TickSchedule;
use super::tun::Tun;
use super::udp::{RecvBatch, SendBatch, UdpSocket};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Largest IP packet handled; the TUN MTU is far below, but `ip link set mtu` may raise it.
pub const MAX_PACKET_BYTES: usize = 65_535;
/// WireGuard data message overhead: type, receiver index, counter, tag.
pub const WG_OVERHEAD_BYTES: usize = 32;
/// Messages per `recvmmsg` (each may carry a GRO run of datagrams).
const RECV_BATCH: usize = 32;
/// Bytes of encrypted datagrams gathered before one `sendmmsg` (about 128 full-size packets).
const SEND_BATCH_BYTES: usize = 192 * 1024;
/// Separate sends (GSO runs or single datagrams) per `sendmmsg`.
const SEND_BATCH_GROUPS: usize = 64;
/// Room for any handshake message `Tunn` writes.
const HANDSHAKE_BUF_BYTES: usize = 256;

/// The TUN reader and encryptor.
pub(crate) fn tun_rx(shared: &Shared, tun: &Tun) {
    let mut packet = vec![0u8; MAX_PACKET_BYTES];
    let mut batch = SendBatch::new(
        SEND_BATCH_BYTES,
        SEND_BATCH_GROUPS,
        MAX_PACKET_BYTES + WG_OVERHEAD_BYTES,
    );
    let mut scratch = vec![0u8; MAX_PACKET_BYTES];
    let mut socket = shared.socket();
    batch.set_family(&socket.1);
    loop {
        if shared.stopping() {
            return;
        }
        if socket.0 != shared.socket_generation.load(Ordering::Acquire) {
            socket = shared.socket();
            batch.set_family(&socket.1);
        }
        let mut tun_failed = None;
        {
            let state = shared.read_state();
            while !batch.is_full() {
                match tun.read(&mut packet) {
                    Ok(n) if tun.vnet_hdr() => {
                        // A super-packet may need more room than is left: flush as we go.
                        let split = offload::split(&packet[..n], &mut scratch, |p| {
                            if batch.is_full() {
                                socket.1.send_batch(&mut batch);
                            }
                            encrypt_one(&state, p, &mut batch);
                        });
                        if let Err(e) = split {
                            tracing::trace!(error = %e, "dropping packet from TUN");
                        }
                    }
                    Ok(n) => encrypt_one(&state, &packet[..n], &mut batch),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tun_failed = Some(e);
                        break;
                    }
                }
            }
        }
        if !batch.is_empty() {
            socket.1.send_batch(&mut batch);
            continue;
        }
        if let Some(e) = tun_failed {
            // The interface was deleted (`ip link del`): the device is gone.
            tracing::info!(error = %e, "TUN device closed, stopping");
            shared.stop();
            return;
        }
        wait_readable(tun.as_raw_fd(), shared.stop_fd());
    }
}

#[inline]
fn encrypt_one(state: &super::State, packet: &[u8], batch: &mut SendBatch) {
    let Some(dst) = Tunn::dst_address(packet) else {
        return;
    };
    let Some(peer) = state
        .allowed_ips
        .lookup(dst)
        .and_then(|&id| state.peers.get(id))
    else {
        return;
    };
    let slot = batch.slot();
    if slot.len() < (packet.len() + WG_OVERHEAD_BYTES).max(HANDSHAKE_BUF_BYTES) {
        // `encapsulate` would panic; cannot happen with the batch's reserve, but never panic.
        return;
    }
    let mut st = peer.lock();
    let endpoint = st.endpoint;
    let Some(tunn) = st.tunn.as_mut() else {
        return;
    };
    let len = match tunn.encapsulate(packet, slot) {
        TunnResult::WriteToNetwork(out) => out.len(),
        TunnResult::Err(e) => {
            tracing::trace!(peer = %peer.id, error = ?e, "encapsulate failed");
            return;
        }
        _ => return,
    };
    if let Some(endpoint) = endpoint {
        st.tx_bytes += len as u64;
        drop(st);
        batch.commit(len, endpoint);
    }
}

/// The UDP reader and decryptor.
pub(crate) fn udp_rx(shared: &Shared, tun: &Tun) {
    let mut batch = RecvBatch::new(RECV_BATCH, MAX_PACKET_BYTES + WG_OVERHEAD_BYTES);
    // With a vnet header, every write starts with an all-zero one (no offload asked).
    let prefix = if tun.vnet_hdr() { VNET_HDR_LEN } else { 0 };
    let mut plain = vec![0u8; prefix + MAX_PACKET_BYTES + WG_OVERHEAD_BYTES];
    let mut socket = shared.socket();
    loop {
        if shared.stopping() {
            return;
        }
        if socket.0 != shared.socket_generation.load(Ordering::Acquire) {
            socket = shared.socket();
        }
        match socket.1.recv_batch(&mut batch) {
            Ok(n) => {
                let state = shared.read_state();
                for i in 0..n {
                    if let Some((run, from, segment)) = batch.get(i) {
                        for datagram in run.chunks(segment) {
                            let out = &mut plain[prefix..];
                            if let Some(len) = decrypt_one(&state, &socket.1, datagram, from, out) {
                                let _ = tun.write(&plain[..prefix + len]);
                            }
                        }
                    }
                }
                if n == 0 {
                    // A retired socket reads as empty; the generation check above moves on.
                    wait_readable(socket.1.as_raw_fd(), shared.stop_fd());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(socket.1.as_raw_fd(), shared.stop_fd());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                wait_readable(socket.1.as_raw_fd(), shared.stop_fd());
            }
        }
    }
}

/// Handles one datagram; returns the length of the inner packet (at the start of `plain`) to
/// deliver to the TUN device. Never panics on its content: `parse_incoming_packet` checks
/// sizes, and every lookup failure drops the datagram.
fn decrypt_one(
    state: &super::State,
    socket: &UdpSocket,
    datagram: &[u8],
    from: SocketAddr,
    plain: &mut [u8],
) -> Option<usize> {
    let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
        return None;
    };
    let peer: &Arc<Peer> = match &packet {
        Packet::HandshakeInit(init) => {
            let (Some(secret), Some(public), Some(limiter)) = (
                state.private_key.as_ref(),
                state.public_key.as_ref(),
                state.rate_limiter.as_ref(),
            ) else {
                return None;
            };
            // MAC1 and load check before the expensive DH; under load this answers with a
            // cookie instead of doing the handshake.
            match limiter.verify_packet(Some(from.ip()), datagram, plain) {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let _ = socket.send_to(cookie, from);
                    return None;
                }
                Err(_) => return None,
            }
            let Ok(half) = parse_handshake_anon(secret, public, init) else {
                return None;
            };
            state.peers.by_key(&half.peer_static_public)?
        }
        Packet::HandshakeResponse(r) => state.peers.by_receiver_index(r.receiver_idx)?,
        Packet::PacketCookieReply(c) => state.peers.by_receiver_index(c.receiver_idx)?,
        Packet::PacketData(d) => state.peers.by_receiver_index(d.receiver_idx)?,
    };
    let roams = !matches!(packet, Packet::PacketCookieReply(_));

    let mut st = peer.lock();
    let tunn = st.tunn.as_mut()?;
    match tunn.decapsulate(Some(from.ip()), datagram, plain) {
        TunnResult::Done => {
            authenticated(&mut st, datagram.len(), from, roams);
            None
        }
        TunnResult::WriteToNetwork(out) => {
            // A handshake answer (or a cookie); then anything queued while waiting.
            let _ = socket.send_to(out, from);
            let sent = out.len() as u64;
            authenticated(&mut st, datagram.len(), from, roams);
            st.tx_bytes += sent;
            flush_queued(&mut st, socket, plain);
            None
        }
        TunnResult::WriteToTunnelV4(inner, src) => {
            authenticated(&mut st, datagram.len(), from, true);
            allowed_source(state, peer, IpAddr::V4(src)).then_some(inner.len())
        }
        TunnResult::WriteToTunnelV6(inner, src) => {
            authenticated(&mut st, datagram.len(), from, true);
            allowed_source(state, peer, IpAddr::V6(src)).then_some(inner.len())
        }
        TunnResult::Err(WireGuardError::DuplicateCounter) => None,
        TunnResult::Err(e) => {
            tracing::trace!(peer = %peer.id, %from, error = ?e, "decapsulate failed");
            None
        }
    }
}

/// Cryptokey routing, inbound: a peer may only send from addresses it is allowed to own.
#[inline]
fn allowed_source(state: &super::State, peer: &Peer, src: IpAddr) -> bool {
    let ok = state.allowed_ips.lookup(src) == Some(&peer.id);
    if !ok {
        tracing::trace!(peer = %peer.id, %src, "dropping packet from a source outside allowed IPs");
    }
    ok
}

/// Book-keeping for a datagram that authenticated: counters and roaming.
#[inline]
fn authenticated(st: &mut PeerState, len: usize, from: SocketAddr, roams: bool) {
    st.rx_bytes += len as u64;
    if roams && st.endpoint != Some(from) {
        tracing::debug!(old = ?st.endpoint, new = %from, "peer endpoint changed");
        st.endpoint = Some(from);
    }
}

/// Sends the packets `Tunn` queued while it had no session.
fn flush_queued(st: &mut PeerState, socket: &UdpSocket, buf: &mut [u8]) {
    let endpoint = st.endpoint;
    let Some(tunn) = st.tunn.as_mut() else {
        return;
    };
    let mut sent = 0u64;
    while let TunnResult::WriteToNetwork(out) = tunn.decapsulate(None, &[], buf) {
        if let Some(endpoint) = endpoint
            && socket.send_to(out, endpoint).is_ok()
        {
            sent += out.len() as u64;
        }
    }
    st.tx_bytes += sent;
}

/// The timer thread.
pub(crate) fn timers(shared: &Shared) {
    let clock = shared.clock.clone();
    let mut schedule = TickSchedule::new(clock.now());
    let mut buf = vec![0u8; HANDSHAKE_BUF_BYTES];
    loop {
        if shared.sleep_unless_stopping(schedule.sleep_for(clock.now())) {
            return;
        }
        let work = schedule.poll(clock.now());
        let state = shared.read_state();
        if work.reset_rate_limiter
            && let Some(limiter) = &state.rate_limiter
        {
            limiter.reset_count();
        }
        if !work.update_peers {
            continue;
        }
        let (_, socket) = &shared.socket();
        let wall = clock.wall();
        for peer in state.peers.iter() {
            let mut st = peer.lock();
            let endpoint = st.endpoint;
            let Some(tunn) = st.tunn.as_mut() else {
                continue;
            };
            let since = tunn.time_since_last_handshake();
            let out = match tunn.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(out) => Some(&*out),
                TunnResult::Err(WireGuardError::ConnectionExpired) => None,
                TunnResult::Err(e) => {
                    tracing::trace!(peer = %peer.id, error = ?e, "timer error");
                    None
                }
                _ => None,
            };
            st.handshake.observe(since, wall);
            if let (Some(out), Some(endpoint)) = (out, endpoint)
                && socket.send_to(out, endpoint).is_ok()
            {
                st.tx_bytes += out.len() as u64;
            }
        }
    }
}

/// Blocks until `fd` or the stop eventfd is readable (or errors, or hangs up).
fn wait_readable(fd: RawFd, stop_fd: RawFd) {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop_fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structs.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
}
