//! The device loop: the threads that move packets and drive timers.
//!
//! * `tun-rx` reads packets from the TUN device, routes each by destination (allowed IPs,
//!   longest prefix), encrypts it with the `Tunn` of the peer's active session slot and sends
//!   the batch with one `sendmmsg`.
//! * `udp-rx` receives a batch of datagrams with one `recvmmsg`, routes each to its peer and
//!   session slot (handshake initiations by the local key their MAC1 is keyed with and the
//!   peer key they decrypt to, everything else by receiver index), decrypts, checks the inner
//!   source against the peer's allowed IPs and writes it to the TUN device. It answers
//!   handshakes and cookies, follows roaming endpoints, and re-picks the active slot when a
//!   handshake completes or data arrives on another slot. Under load, handshake initiations
//!   that passed MAC1 and the cookie check go through the per-source limit of
//!   [`super::source_limit`] before any Diffie-Hellman; what it refuses is dropped and counted.
//! * `timers` runs `Tunn::update_timers` for every slot each tick (rekey, retransmit,
//!   keepalives, expiry), re-picks the active slot of peers with several, starts the handshake
//!   that moves a peer to its preferred slot, and resets the handshake rate limiters.
//!
//! Which slot is active or preferred is decided in [`super::slot`]; this module only calls it.
//! It never creates slots except the one a handshake initiation asks for (from the peer's
//! spare indices), and never drops any: key changes happen under the write lock, in
//! [`super::state`].
//!
//! Buffers are allocated once per thread. The peer table is read-locked once per batch; a
//! peer's mutex is held only around `Tunn` calls, never across a syscall on the hot path. A
//! peer with one slot (no rotation under way) costs what it did before slots existed: no
//! extra lookups, no clock reads per packet.

use super::Shared;
use super::coalesce::Coalescer;
use super::handover::{self, Mode, Route};
use super::offload::{self, VNET_HDR_LEN};
use super::peer::{Peer, PeerState};
use super::slot::LocalKey;
use super::state::State;
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
use std::time::{Instant, SystemTime};

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
/// First byte of a handshake initiation (the message type, little endian).
const HANDSHAKE_INIT_TYPE: u8 = 1;

/// Where single datagrams go: the UDP socket, or a recorder in tests.
pub(crate) trait Wire {
    /// Sends one datagram; whether it went.
    fn send(&self, datagram: &[u8], to: SocketAddr) -> bool;
}

impl Wire for UdpSocket {
    #[inline]
    fn send(&self, datagram: &[u8], to: SocketAddr) -> bool {
        self.send_to(datagram, to).is_ok()
    }
}

/// The TUN reader and encryptor.
pub(crate) fn tun_rx(shared: &Shared, tun: &Tun) {
    let mut packet = vec![0u8; MAX_PACKET_BYTES];
    let mut batch = SendBatch::new(
        SEND_BATCH_BYTES,
        SEND_BATCH_GROUPS,
        MAX_PACKET_BYTES + WG_OVERHEAD_BYTES,
    );
    let mut socket = shared.socket();
    batch.set_family(&socket.1);
    loop {
        if shared.stopping() || shared.handover.mode() == Mode::Given {
            return;
        }
        if socket.0 != shared.socket_generation.load(Ordering::Acquire) {
            socket = shared.socket();
            batch.set_family(&socket.1);
        }
        // A predecessor handing over starts no handshake (see `handover`).
        let quiet = shared.handover.mode() == Mode::Giving;
        let mut tun_failed = None;
        {
            let state = shared.read_state();
            while !batch.is_full() {
                match tun.read(&mut packet) {
                    Ok(n) if tun.vnet_hdr() => {
                        // A super-packet may need more room than is left: flush as we go.
                        let split = offload::split(&mut packet[..n], |p| {
                            if batch.is_full() {
                                socket.1.send_batch(&mut batch);
                            }
                            encrypt_one(&state, p, &mut batch, quiet);
                        });
                        if let Err(e) = split {
                            tracing::trace!(error = %e, "dropping packet from TUN");
                        }
                    }
                    Ok(n) => encrypt_one(&state, &packet[..n], &mut batch, quiet),
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
        wait_readable(tun.as_raw_fd(), shared);
    }
}

#[inline]
fn encrypt_one(state: &State, packet: &[u8], batch: &mut SendBatch, quiet: bool) {
    if let Some((len, endpoint)) = seal(state, packet, batch.slot()) {
        if quiet && handover::is_handshake(batch.slot()) {
            return;
        }
        batch.commit(len, endpoint);
    }
}

/// Encrypts one packet from the TUN device into `out` with the active slot of the peer its
/// destination routes to; returns the datagram's length and where it goes. A packet for a peer
/// without a session is queued in the slot, which starts a handshake (returned instead).
#[inline]
pub(crate) fn seal(state: &State, packet: &[u8], out: &mut [u8]) -> Option<(usize, SocketAddr)> {
    let dst = Tunn::dst_address(packet)?;
    let peer = state
        .allowed_ips
        .lookup(dst)
        .and_then(|&id| state.peers.get(id))?;
    if out.len() < (packet.len() + WG_OVERHEAD_BYTES).max(HANDSHAKE_BUF_BYTES) {
        // `encapsulate` would panic; cannot happen with the batch's reserve, but never panic.
        return None;
    }
    let mut st = peer.lock();
    let endpoint = st.endpoint;
    let slot = st.slots.active_mut()?;
    let len = match slot.tunn.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(out) => out.len(),
        TunnResult::Err(e) => {
            tracing::trace!(peer = %peer.id, error = ?e, "encapsulate failed");
            return None;
        }
        _ => return None,
    };
    let endpoint = endpoint?;
    st.tx_bytes += len as u64;
    Some((len, endpoint))
}

/// The UDP reader and decryptor.
pub(crate) fn udp_rx(shared: &Shared, tun: &Tun) {
    let mut batch = RecvBatch::new(RECV_BATCH, MAX_PACKET_BYTES + WG_OVERHEAD_BYTES);
    // With a vnet header, every write starts with an all-zero one (no offload asked).
    let prefix = if tun.vnet_hdr() { VNET_HDR_LEN } else { 0 };
    let mut plain = vec![0u8; prefix + MAX_PACKET_BYTES + WG_OVERHEAD_BYTES];
    // With TUN offload, consecutive segments of a TCP flow are joined into super-packets.
    let mut coalescer = tun.vnet_hdr().then(Coalescer::new);
    let mut socket = shared.socket();
    let epoch = shared.handover.epoch;
    loop {
        if shared.stopping() || shared.handover.mode() == Mode::Given {
            return;
        }
        if socket.0 != shared.socket_generation.load(Ordering::Acquire) {
            socket = shared.socket();
        }
        match socket.1.recv_batch(&mut batch) {
            Ok(n) => {
                let mode = shared.handover.mode();
                let state = shared.read_state();
                for i in 0..n {
                    if let Some((run, from, segment)) = batch.get(i) {
                        for datagram in run.chunks(segment) {
                            if mode != Mode::Alone {
                                match handover::route(mode, epoch, datagram) {
                                    Route::Here => {}
                                    Route::Forward => {
                                        shared.handover.forward(datagram, from);
                                        continue;
                                    }
                                    Route::Drop => continue,
                                }
                            }
                            let out = &mut plain[prefix..];
                            if let Some(len) = decrypt_one(&state, &*socket.1, datagram, from, out)
                            {
                                let packet = &plain[..prefix + len];
                                match &mut coalescer {
                                    Some(c) => c.push(packet, |p| write_tun(tun, p)),
                                    None => write_tun(tun, packet),
                                }
                            }
                        }
                    }
                }
                // Nothing waits past the batch it came in.
                if let Some(c) = &mut coalescer {
                    c.flush(|p| write_tun(tun, p));
                }
                if n == 0 {
                    // A retired socket reads as empty; the generation check above moves on.
                    wait_readable(socket.1.as_raw_fd(), shared);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(socket.1.as_raw_fd(), shared);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                wait_readable(socket.1.as_raw_fd(), shared);
            }
        }
    }
}

/// Writes one packet (or super-packet) to the TUN device; a refusal (full queue, interface
/// down) drops it, as a NIC's would.
#[inline]
fn write_tun(tun: &Tun, packet: &[u8]) {
    let _ = tun.write(packet);
}

/// Delivers a datagram the other process of a handover forwarded (see `handover`): decrypts
/// it, if this process's part allows, and writes the packet to the TUN device.
pub(crate) fn deliver_forwarded(
    shared: &Shared,
    tun: &Tun,
    datagram: &[u8],
    from: SocketAddr,
    plain: &mut [u8],
) {
    let ho = &shared.handover;
    if handover::route(ho.mode(), ho.epoch, datagram) != Route::Here {
        return;
    }
    let prefix = if tun.vnet_hdr() { VNET_HDR_LEN } else { 0 };
    plain[..prefix].fill(0);
    let state = shared.read_state();
    let socket = shared.socket().1;
    if let Some(len) = decrypt_one(&state, &*socket, datagram, from, &mut plain[prefix..]) {
        let _ = tun.write(&plain[..prefix + len]);
    }
}

/// Handles one datagram; returns the length of the inner packet (at the start of `plain`) to
/// deliver to the TUN device. Never panics on its content: `parse_incoming_packet` checks
/// sizes, and every lookup failure drops the datagram.
pub(crate) fn decrypt_one<W: Wire + ?Sized>(
    state: &State,
    wire: &W,
    datagram: &[u8],
    from: SocketAddr,
    plain: &mut [u8],
) -> Option<usize> {
    let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
        return None;
    };
    let (peer, mut st, position) = match &packet {
        Packet::HandshakeInit(init) => {
            // MAC1 is keyed with the responder's public key: it says which of our keys the
            // initiator addressed, before the expensive DH. Under load the key's limiter
            // answers with a cookie instead of doing the handshake, and a sender that proved
            // its address with the cookie still gets only its source's share.
            let (key, under_load) = addressed_key(state, wire, datagram, from, plain)?;
            if under_load && !source_allowed(state, from) {
                return None;
            }
            let Ok(half) = parse_handshake_anon(&key.secret, &key.public, init) else {
                return None;
            };
            let remote = half.peer_static_public;
            let peer: &Arc<Peer> = state.peers.by_key(&remote)?;
            let mut st = peer.lock();
            let local = key.public_bytes();
            let position = match st.slots.find(&local, &remote) {
                Some(p) => p,
                None => {
                    let params = st.tunn_params();
                    let Some(p) = st.slots.create(key, remote, params) else {
                        tracing::debug!(peer = %peer.id, "no spare index for a new session slot");
                        return None;
                    };
                    p
                }
            };
            (peer, st, position)
        }
        // A response costs DH only in the slot that has a handshake pending under exactly
        // this index, and its `Tunn` checks MAC1 and the cookie itself.
        Packet::HandshakeResponse(r) => by_index(state, r.receiver_idx)?,
        Packet::PacketCookieReply(c) => by_index(state, c.receiver_idx)?,
        Packet::PacketData(d) => by_index(state, d.receiver_idx)?,
    };
    let roams = !matches!(packet, Packet::PacketCookieReply(_));
    let is_response = matches!(packet, Packet::HandshakeResponse(_));
    let is_data = matches!(packet, Packet::PacketData(_));
    let active = st.slots.active();

    let slot = st.slots.get_mut(position)?;
    match slot.tunn.decapsulate(Some(from.ip()), datagram, plain) {
        TunnResult::Done => {
            authenticated(&mut st, datagram.len(), from, roams);
            if is_data && active != Some(position) {
                // A keepalive may make a responder's new session current.
                st.slots.recompute_active();
            }
            None
        }
        TunnResult::WriteToNetwork(out) => {
            // A handshake answer (or a cookie); then anything queued while waiting.
            wire.send(out, from);
            let sent = out.len() as u64;
            authenticated(&mut st, datagram.len(), from, roams);
            st.tx_bytes += sent;
            if is_response && st.slots.len() > 1 {
                // We initiated and the session is up: it is the newest.
                st.slots.recompute_active();
            }
            flush_queued(&mut st, position, wire, plain);
            None
        }
        TunnResult::WriteToTunnelV4(inner, src) => {
            let len = inner.len();
            slot.rx_data_packets += 1;
            authenticated(&mut st, datagram.len(), from, true);
            if active != Some(position) {
                st.slots.recompute_active();
            }
            allowed_source(state, peer, IpAddr::V4(src)).then_some(len)
        }
        TunnResult::WriteToTunnelV6(inner, src) => {
            let len = inner.len();
            slot.rx_data_packets += 1;
            authenticated(&mut st, datagram.len(), from, true);
            if active != Some(position) {
                st.slots.recompute_active();
            }
            allowed_source(state, peer, IpAddr::V6(src)).then_some(len)
        }
        TunnResult::Err(WireGuardError::DuplicateCounter) => None,
        TunnResult::Err(e) => {
            tracing::trace!(peer = %peer.id, %from, error = ?e, "decapsulate failed");
            None
        }
    }
}

/// The local key a handshake initiation is addressed to (by its MAC1), and whether that key's
/// limiter is under load, in which case the initiation also carried a valid cookie (MAC2).
/// Under load without a valid cookie, a cookie reply is sent and `None` returned.
///
/// boringtun's limiter does not say whether it checked MAC2, so it is asked twice under load:
/// first without an address (which it answers with `UnderLoad` when it would demand a
/// cookie), then with the sender's. Its count then sees such an initiation three times
/// instead of two; it is already over its limit, so nothing changes.
fn addressed_key<'s, W: Wire + ?Sized>(
    state: &'s State,
    wire: &W,
    datagram: &[u8],
    from: SocketAddr,
    plain: &mut [u8],
) -> Option<(&'s LocalKey, bool)> {
    for key in &state.keys {
        match key.limiter.verify_packet(None, datagram, plain) {
            Ok(_) => return Some((key, false)),
            Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                return match key.limiter.verify_packet(Some(from.ip()), datagram, plain) {
                    Ok(_) => Some((key, true)),
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        wire.send(cookie, from);
                        None
                    }
                    Err(_) => None,
                };
            }
            // MAC1 of another key.
            Err(_) => {}
        }
    }
    None
}

/// Whether the per-source limit lets a handshake initiation from `from` through; counts a
/// refusal. Reads the clock: only initiations that passed the cookie check come here.
fn source_allowed(state: &State, from: SocketAddr) -> bool {
    let allowed = state
        .sources
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .allow(from.ip(), Instant::now());
    if !allowed {
        state
            .handshakes_rate_limited
            .fetch_add(1, Ordering::Relaxed);
    }
    allowed
}

/// The peer and slot an incoming receiver index belongs to, with the peer locked.
#[inline]
fn by_index(
    state: &State,
    receiver_index: u32,
) -> Option<(&Arc<Peer>, std::sync::MutexGuard<'_, PeerState>, usize)> {
    let peer = state.peers.by_receiver_index(receiver_index)?;
    let st = peer.lock();
    let position = st.slots.by_index(receiver_index >> 8)?;
    Some((peer, st, position))
}

/// Cryptokey routing, inbound: a peer may only send from addresses it is allowed to own.
#[inline]
fn allowed_source(state: &State, peer: &Peer, src: IpAddr) -> bool {
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

/// Sends the packets the slot at `position` queued while it had no session.
fn flush_queued<W: Wire + ?Sized>(st: &mut PeerState, position: usize, wire: &W, buf: &mut [u8]) {
    let endpoint = st.endpoint;
    let Some(slot) = st.slots.get_mut(position) else {
        return;
    };
    let mut sent = 0u64;
    while let TunnResult::WriteToNetwork(out) = slot.tunn.decapsulate(None, &[], buf) {
        if let Some(endpoint) = endpoint
            && wire.send(out, endpoint)
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
        if let Some(dir) = &shared.failpoints
            && dir.join("wg-timers").exists()
        {
            panic!("failpoint {}", dir.join("wg-timers").display());
        }
        let work = schedule.poll(clock.now());
        // A predecessor handing over keeps quiet: no keepalive, no handshake (see `handover`).
        if matches!(shared.handover.mode(), Mode::Giving | Mode::Given) {
            continue;
        }
        let state = shared.read_state();
        if work.reset_rate_limiter {
            for key in &state.keys {
                key.limiter.reset_count();
            }
            state
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .collect(Instant::now());
        }
        if !work.update_peers {
            continue;
        }
        let (_, socket) = &shared.socket();
        let wall = clock.wall();
        for peer in state.peers.iter() {
            tick_peer(peer, &**socket, &mut buf, wall);
        }
    }
}

/// One timer tick of one peer: `update_timers` on every slot, sending what the active slot
/// asks for (and the handshakes of a preferred slot still without a session); then, for a peer
/// with several slots, the active slot is picked again and a preferred slot without a session
/// starts its handshake.
pub(crate) fn tick_peer<W: Wire + ?Sized>(peer: &Peer, wire: &W, buf: &mut [u8], wall: SystemTime) {
    let mut st = peer.lock();
    let st = &mut *st;
    let endpoint = st.endpoint;
    let greet = st.greet && endpoint.is_some();
    let slots = &mut st.slots;
    let count = slots.len();
    if count == 0 {
        return;
    }
    let active = slots.active();
    let preferred = slots.preferred();
    // Only a preferred slot that is still handshaking may send while another slot is active:
    // the handshakes of a slot that is being left behind (a rekey, or "no answer for 15 s")
    // would make the keys being retired the newest again.
    let preferred_waiting =
        count > 1 && preferred.is_some_and(|p| Some(p) != active && !slots.has_session(p));
    let mut sent = 0u64;
    for position in 0..count {
        let Some(slot) = slots.get_mut(position) else {
            break;
        };
        let out = match slot.tunn.update_timers(buf) {
            TunnResult::WriteToNetwork(out) => Some(&*out),
            TunnResult::Err(WireGuardError::ConnectionExpired) => None,
            TunnResult::Err(e) => {
                tracing::trace!(peer = %peer.id, error = ?e, "timer error");
                None
            }
            _ => None,
        };
        let Some(out) = out else {
            continue;
        };
        let send = Some(position) == active
            || (preferred_waiting
                && Some(position) == preferred
                && out.first() == Some(&HANDSHAKE_INIT_TYPE));
        if send
            && let Some(endpoint) = endpoint
            && wire.send(out, endpoint)
        {
            sent += out.len() as u64;
        }
    }
    // A new peer: handshake now rather than when traffic or the peer's own timers ask.
    // `Tunn` sends nothing if a handshake is already under way.
    if greet
        && let (Some(a), Some(endpoint)) = (active, endpoint)
        && !slots.has_session(a)
        && let Some(slot) = slots.get_mut(a)
        && let TunnResult::WriteToNetwork(out) = slot.tunn.format_handshake_initiation(buf, false)
        && wire.send(out, endpoint)
    {
        sent += out.len() as u64;
    }
    if count > 1 {
        slots.recompute_active();
        // Move to the peer's new key (or ours) without waiting for traffic; `Tunn` sends
        // nothing while a handshake is in progress and retries on its own schedule.
        if let (Some(p), Some(endpoint)) = (slots.preferred(), endpoint)
            && slots.active() != Some(p)
            && !slots.has_session(p)
            && let Some(slot) = slots.get_mut(p)
            && let TunnResult::WriteToNetwork(out) =
                slot.tunn.format_handshake_initiation(buf, false)
            && wire.send(out, endpoint)
        {
            sent += out.len() as u64;
        }
    }
    let newest = slots.newest_session();
    st.handshake.observe(newest, wall);
    st.tx_bytes += sent;
    if greet {
        st.greet = false;
    }
}

/// Blocks until `fd`, the stop eventfd or the release eventfd is readable (or errors, or
/// hangs up).
fn wait_readable(fd: RawFd, shared: &Shared) {
    let _ = handover::wait_any([fd, shared.stop_fd(), shared.handover.release_fd()], None);
}
