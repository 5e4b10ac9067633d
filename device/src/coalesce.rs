//! TUN segmentation offload, receive side: decrypted TCP segments of one flow that follow each
//! other are joined into one super-packet and written to the TUN device once, behind a
//! `virtio_net_hdr` that says how the kernel may cut it up again (GSO type, segment size) and
//! that its TCP checksum is partial, as a NIC's GRO hands packets to the stack. The kernel's
//! TCP receive path then runs once per super-packet instead of once per 1.4 KB segment.
//!
//! The rules are the kernel's own (`tcp_gro_receive`): the same addresses and ports, the next
//! sequence number, the same acknowledgment, window, flags (ACK, and PSH on the last segment
//! only), TCP options, TOS/traffic class and TTL/hop limit; every segment but the last exactly
//! the first one's size; nothing with IP options, IPv6 extension headers or fragments.
//! Anything else is written as it came, after what is pending for its flow, so no flow's
//! packets are reordered.
//!
//! TCP checksums are not verified before joining, and a super-packet's is left partial, so
//! the kernel does not verify them either. A decrypted packet was authenticated by its AEAD
//! tag: it is exactly what the peer sent, which no checksum can add to. The kernel's WireGuard
//! module marks every decrypted packet `CHECKSUM_UNNECESSARY` for the same reason. Segments are
//! still sent with complete checksums ([`super::offload`]), for peers that do check.
//!
//! Pure byte work: no fds. Buffers are allocated once, in [`Coalescer::new`].

use crate::offload::{
    IPPROTO_TCP, TCP_FLAG_ACK, TCP_FLAG_PSH, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VNET_HDR_LEN, fold, pseudo_header_sum, sum16,
};

/// Flows joined at once; a packet of another flow flushes the least recently used one.
const FLOWS: usize = 8;
/// Largest super-packet (IP header included): the IPv4 total-length field's limit.
const MAX_SUPER_PACKET: usize = 65_535;

const TCP_FIXED_HEADER: usize = 20;

/// Addresses and ports of a TCP flow, one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FlowKey {
    /// Source then destination address; IPv4 uses the first 8 bytes.
    addrs: [u8; 32],
    /// Source and destination port.
    ports: [u8; 4],
    v4: bool,
}

/// What a packet is, for joining.
#[derive(Debug, Clone, Copy)]
struct Segment {
    key: FlowKey,
    /// Offset of the TCP header.
    l4: usize,
    /// IP and TCP headers.
    headers: usize,
    seq: u32,
    flags: u8,
    /// Whether it may be joined at all (else it only orders its flow).
    joinable: bool,
}

/// One super-packet being built.
#[derive(Debug)]
struct Pending {
    /// `virtio_net_hdr` then the packet: the first segment's headers, then every payload.
    buf: Vec<u8>,
    /// Bytes of `buf` in use (header included); 0 when the slot is free.
    len: usize,
    key: FlowKey,
    l4: usize,
    headers: usize,
    /// Payload bytes of the first segment: every segment but the last has exactly this many.
    gso_size: usize,
    segments: usize,
    next_seq: u32,
    /// A short segment or PSH came: nothing may follow.
    closed: bool,
    /// When it was last used, for eviction.
    used: u64,
}

/// Joins decrypted packets into TCP super-packets for a TUN device opened with
/// `IFF_VNET_HDR`. Every packet given to [`Coalescer::push`] starts with room for the
/// `virtio_net_hdr`, all zero; what comes out through `emit` is ready to write to the device.
#[derive(Debug)]
pub struct Coalescer {
    pending: Vec<Pending>,
    clock: u64,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    pub fn new() -> Self {
        let pending = (0..FLOWS)
            .map(|_| Pending {
                buf: vec![0u8; VNET_HDR_LEN + MAX_SUPER_PACKET],
                len: 0,
                key: FlowKey::default(),
                l4: 0,
                headers: 0,
                gso_size: 0,
                segments: 0,
                next_seq: 0,
                closed: false,
                used: 0,
            })
            .collect();
        Self { pending, clock: 0 }
    }

    /// Takes one packet (`VNET_HDR_LEN` zero bytes, then the IP packet). Writes out through
    /// `emit` whatever must go before it, and the packet itself unless it is kept to be joined.
    pub fn push(&mut self, framed: &[u8], mut emit: impl FnMut(&[u8])) {
        let Some(packet) = framed.get(VNET_HDR_LEN..) else {
            return;
        };
        let Some(seg) = classify(packet) else {
            // Not TCP (or not parsable as such): no flow of ours to keep in order.
            emit(framed);
            return;
        };
        self.clock += 1;
        let found = self
            .pending
            .iter()
            .position(|p| p.len != 0 && p.key == seg.key);
        if let Some(i) = found {
            if seg.joinable && self.pending[i].append(packet, &seg) {
                self.pending[i].used = self.clock;
                return;
            }
            self.pending[i].flush(&mut emit);
        }
        if !seg.joinable {
            emit(framed);
            return;
        }
        let slot = match found {
            Some(i) => i,
            None => self.free_or_oldest(&mut emit),
        };
        self.pending[slot].start(packet, &seg, self.clock);
    }

    /// Writes out everything pending, oldest first: at the end of each receive batch.
    pub fn flush(&mut self, mut emit: impl FnMut(&[u8])) {
        while let Some(i) = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, p)| p.len != 0)
            .min_by_key(|(_, p)| p.used)
            .map(|(i, _)| i)
        {
            self.pending[i].flush(&mut emit);
        }
    }

    fn free_or_oldest(&mut self, emit: &mut impl FnMut(&[u8])) -> usize {
        if let Some(i) = self.pending.iter().position(|p| p.len == 0) {
            return i;
        }
        let i = self
            .pending
            .iter()
            .enumerate()
            .min_by_key(|(_, p)| p.used)
            .map_or(0, |(i, _)| i);
        self.pending[i].flush(emit);
        i
    }
}

impl Pending {
    fn start(&mut self, packet: &[u8], seg: &Segment, now: u64) {
        self.buf[..VNET_HDR_LEN].fill(0);
        self.buf[VNET_HDR_LEN..VNET_HDR_LEN + packet.len()].copy_from_slice(packet);
        self.len = VNET_HDR_LEN + packet.len();
        self.key = seg.key;
        self.l4 = seg.l4;
        self.headers = seg.headers;
        self.gso_size = packet.len() - seg.headers;
        self.segments = 1;
        self.next_seq = seg.seq.wrapping_add(self.gso_size as u32);
        self.closed = seg.flags & TCP_FLAG_PSH != 0;
        self.used = now;
    }

    /// Appends `packet`'s payload if it continues this super-packet.
    fn append(&mut self, packet: &[u8], seg: &Segment) -> bool {
        let payload = packet.len() - seg.headers;
        let head = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.headers];
        let (l4, v4) = (self.l4, self.key.v4);
        let same_ip = if v4 {
            // TOS, TTL; flags and fragment offset (DF only, checked in `classify`).
            head[1] == packet[1] && head[8] == packet[8] && head[6..8] == packet[6..8]
        } else {
            // Traffic class and flow label, hop limit.
            head[..4] == packet[..4] && head[7] == packet[7]
        };
        let fits = !self.closed
            && seg.headers == self.headers
            && seg.seq == self.next_seq
            && payload <= self.gso_size
            && self.len - VNET_HDR_LEN + payload <= MAX_SUPER_PACKET;
        // Acknowledgment, data offset, window, options: equal. Flags: equal but for PSH.
        let same_tcp = head[l4 + 8..l4 + 13] == packet[l4 + 8..l4 + 13]
            && head[l4 + 13] & !TCP_FLAG_PSH == seg.flags & !TCP_FLAG_PSH
            && head[l4 + 14..l4 + 16] == packet[l4 + 14..l4 + 16]
            && head[l4 + TCP_FIXED_HEADER..] == packet[l4 + TCP_FIXED_HEADER..seg.headers];
        if !(fits && same_ip && same_tcp) {
            return false;
        }
        self.buf[self.len..self.len + payload].copy_from_slice(&packet[seg.headers..]);
        self.len += payload;
        self.segments += 1;
        self.next_seq = self.next_seq.wrapping_add(payload as u32);
        if seg.flags & TCP_FLAG_PSH != 0 {
            self.buf[VNET_HDR_LEN + l4 + 13] |= TCP_FLAG_PSH;
            self.closed = true;
        }
        if payload < self.gso_size {
            self.closed = true;
        }
        true
    }

    /// Writes the super-packet (or the lone segment as it came) and frees the slot.
    fn flush(&mut self, emit: &mut impl FnMut(&[u8])) {
        if self.len == 0 {
            return;
        }
        if self.segments > 1 {
            self.finish();
        }
        emit(&self.buf[..self.len]);
        self.len = 0;
    }

    /// Lengths, the IPv4 header checksum, the partial TCP checksum and the `virtio_net_hdr`.
    fn finish(&mut self) {
        let (l4, v4) = (self.l4, self.key.v4);
        let total = self.len - VNET_HDR_LEN;
        let p = &mut self.buf[VNET_HDR_LEN..self.len];
        // `total` is at most MAX_SUPER_PACKET, so every length fits 16 bits.
        if v4 {
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[10..12].fill(0);
            let csum = !fold(sum16(&p[..l4], 0));
            p[10..12].copy_from_slice(&csum.to_be_bytes());
        } else {
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, not complemented.
        let pseudo = pseudo_header_sum(p, v4, total - l4);
        p[l4 + 16..l4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());

        let h = &mut self.buf[..VNET_HDR_LEN];
        h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        h[1] = if v4 {
            VIRTIO_NET_HDR_GSO_TCPV4
        } else {
            VIRTIO_NET_HDR_GSO_TCPV6
        };
        h[2..4].copy_from_slice(&(self.headers as u16).to_ne_bytes());
        h[4..6].copy_from_slice(&(self.gso_size as u16).to_ne_bytes());
        h[6..8].copy_from_slice(&(l4 as u16).to_ne_bytes());
        h[8..10].copy_from_slice(&16u16.to_ne_bytes());
    }
}

/// Reads the flow and sequence of a TCP packet; `None` for anything else. A TCP packet that
/// may not be joined (flags other than ACK/PSH, no payload, IP options, lengths that do not
/// match the packet) is returned with `joinable: false`, so its flow is flushed before it.
fn classify(p: &[u8]) -> Option<Segment> {
    let mut key = FlowKey::default();
    let (l4, ip_ok) = match p.first()? >> 4 {
        4 => {
            if p.len() < 20 || p[9] != IPPROTO_TCP {
                return None;
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([p[6], p[7]]);
            // Fragments have no TCP header of their own (but the first): not a flow.
            if frag & 0x3fff != 0 {
                return None;
            }
            key.addrs[..8].copy_from_slice(&p[12..20]);
            key.v4 = true;
            let ok = ihl == 20 && usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len();
            (ihl, ok)
        }
        6 => {
            if p.len() < 40 || p[6] != IPPROTO_TCP {
                return None;
            }
            key.addrs.copy_from_slice(&p[8..40]);
            (
                40,
                usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 == p.len(),
            )
        }
        _ => return None,
    };
    if l4 < 20 || p.len() < l4 + TCP_FIXED_HEADER {
        return None;
    }
    key.ports.copy_from_slice(&p[l4..l4 + 4]);
    let tcp_len = usize::from(p[l4 + 12] >> 4) * 4;
    let headers = l4 + tcp_len;
    let flags = p[l4 + 13];
    let seq = u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]);
    let joinable = ip_ok
        && tcp_len >= TCP_FIXED_HEADER
        && headers < p.len()
        && flags & !TCP_FLAG_PSH == TCP_FLAG_ACK;
    Some(Segment {
        key,
        l4,
        headers,
        seq,
        flags,
        joinable,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::offload::split;
    use proptest::prelude::*;

    const ACK: u8 = TCP_FLAG_ACK;

    /// A TCP packet with a valid checksum: `flow` picks the source port, `v6` the family;
    /// the timestamp option (12 bytes with NOPs) like Linux sends.
    fn packet(v6: bool, flow: u16, seq: u32, id: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut tcp = vec![0u8; 32];
        tcp[0..2].copy_from_slice(&(40000 + flow).to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
        tcp[12] = 8 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        tcp[20..24].copy_from_slice(&[1, 1, 8, 10]);
        tcp[24..28].copy_from_slice(&1234u32.to_be_bytes());
        tcp.extend_from_slice(payload);
        let mut p = if v6 {
            let mut h = vec![0x60, 0, 0, 0, 0, 0, IPPROTO_TCP, 64];
            h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            h[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
            h
        } else {
            let mut h = vec![
                0x45,
                0,
                0,
                0,
                0,
                1,
                0x40,
                0,
                64,
                IPPROTO_TCP,
                0,
                0,
                10,
                0,
                0,
                1,
                10,
                0,
                0,
                2,
            ];
            h[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&id.to_be_bytes());
            let c = !fold(sum16(&h, 0));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        };
        let l4 = p.len();
        p.extend_from_slice(&tcp);
        set_tcp_checksum(&mut p, l4);
        p
    }

    /// Computes the TCP checksum of `p`, whose TCP header starts at `l4`.
    fn set_tcp_checksum(p: &mut [u8], l4: usize) {
        p[l4 + 16..l4 + 18].fill(0);
        let sum = pseudo_header_sum(p, l4 == 20, p.len() - l4);
        let c = !fold(sum16(&p[l4..], sum));
        p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    }

    fn framed(p: &[u8]) -> Vec<u8> {
        [vec![0u8; VNET_HDR_LEN], p.to_vec()].concat()
    }

    /// Feeds packets as one batch; returns what the device would be given.
    fn run(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut c = Coalescer::new();
        let mut out = Vec::new();
        for p in packets {
            c.push(&framed(p), |b| out.push(b.to_vec()));
        }
        c.flush(|b| out.push(b.to_vec()));
        out
    }

    /// What the kernel makes of a write: the plain packets (super-packets cut up again).
    fn resegment(write: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        split(&mut write.to_vec(), |p| out.push(p.to_vec())).unwrap();
        out
    }

    fn stream(v6: bool, flow: u16, sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut seq = 1000u32;
        sizes
            .iter()
            .enumerate()
            .map(|(id, &n)| {
                let payload: Vec<u8> = (0..n).map(|i| (i as u32 * 7 + seq) as u8).collect();
                let p = packet(v6, flow, seq, id as u16, ACK, &payload);
                seq = seq.wrapping_add(n as u32);
                p
            })
            .collect()
    }

    #[test]
    fn a_stream_becomes_one_super_packet_that_cuts_back_into_the_same_segments() {
        for v6 in [false, true] {
            let segs = stream(v6, 1, &[1368, 1368, 1368, 1368, 700]);
            let out = run(&segs);
            assert_eq!(out.len(), 1, "one write");
            let w = &out[0];
            assert_eq!(w[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
            let gso = if v6 {
                VIRTIO_NET_HDR_GSO_TCPV6
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4
            };
            assert_eq!(w[1], gso);
            assert_eq!(u16::from_ne_bytes([w[4], w[5]]), 1368, "segment size");
            let l4 = if v6 { 40 } else { 20 };
            assert_eq!(usize::from(u16::from_ne_bytes([w[2], w[3]])), l4 + 32);
            assert_eq!(w.len(), VNET_HDR_LEN + l4 + 32 + 4 * 1368 + 700);
            assert_eq!(
                resegment(w),
                segs,
                "the kernel's segmentation gives back the input"
            );
        }
    }

    #[test]
    fn gaps_reorderings_and_other_flags_are_not_joined_and_order_is_kept() {
        let s = stream(false, 1, &[1000, 1000, 1000, 1000]);
        // A gap: segment 2 missing.
        let out = run(&[s[0].clone(), s[1].clone(), s[3].clone()]);
        assert_eq!(out.len(), 2);
        let got: Vec<_> = out.iter().flat_map(|w| resegment(w)).collect();
        assert_eq!(got, vec![s[0].clone(), s[1].clone(), s[3].clone()]);
        // Reordered.
        let input = vec![s[1].clone(), s[0].clone(), s[2].clone()];
        let got: Vec<_> = run(&input).iter().flat_map(|w| resegment(w)).collect();
        assert_eq!(got, input);
        // A FIN ends the flow's run and goes after it, as it came.
        let fin = packet(false, 1, 4000, 3, ACK | 0x01, b"bye");
        let out = run(&[s[0].clone(), s[1].clone(), s[2].clone(), fin.clone()]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], framed(&fin));
        // A bare ACK (no payload) is passed through in order.
        let ack = packet(false, 1, 4000, 1, ACK, b"");
        let out = run(&[s[0].clone(), ack.clone(), s[1].clone()]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[1], framed(&ack));
    }

    #[test]
    fn psh_ends_a_super_packet_and_a_short_segment_closes_it() {
        let s = stream(false, 1, &[1000, 1000, 1000]);
        let mut psh = s[1].clone();
        psh[33] |= TCP_FLAG_PSH;
        set_tcp_checksum(&mut psh, 20);
        let out = run(&[s[0].clone(), psh.clone(), s[2].clone()]);
        assert_eq!(out.len(), 2, "PSH is joined, then nothing more");
        assert_eq!(resegment(&out[0]), vec![s[0].clone(), psh]);
        let short = stream(false, 2, &[1000, 500, 1000]);
        assert_eq!(run(&short).len(), 2, "nothing follows a short segment");
    }

    #[test]
    fn other_protocols_and_junk_pass_through_untouched() {
        let s = stream(false, 1, &[1000, 1000, 1000]);
        let mut udp = s[0].clone();
        udp[9] = 17;
        assert_eq!(run(std::slice::from_ref(&udp)), vec![framed(&udp)]);
        for junk in [vec![], vec![0x45], vec![0x60; 39], vec![0x45; 30]] {
            let out = run(std::slice::from_ref(&junk));
            assert_eq!(out, vec![framed(&junk)]);
        }
    }

    #[test]
    fn interleaved_flows_are_joined_each_in_order_even_past_the_flow_limit() {
        let flows: Vec<Vec<Vec<u8>>> = (0..(FLOWS as u16 + 3))
            .map(|f| stream(f % 2 == 1, f, &[900, 900, 900]))
            .collect();
        let mut input = Vec::new();
        for i in 0..3 {
            for f in &flows {
                input.push(f[i].clone());
            }
        }
        let out = run(&input);
        let got: Vec<_> = out.iter().flat_map(|w| resegment(w)).collect();
        for f in &flows {
            let mine: Vec<_> = got.iter().filter(|p| f.contains(p)).cloned().collect();
            assert_eq!(&mine, f, "each flow whole and in order");
        }
        assert_eq!(got.len(), input.len());
    }

    proptest! {
        /// Whatever arrives, the kernel gets the same packets in the same order per flow,
        /// and never more bytes per write than a super-packet may have.
        #[test]
        fn nothing_is_lost_reordered_or_altered_within_a_flow(
            ops in proptest::collection::vec((0u16..4, 1usize..1500, any::<bool>(), 0u8..8), 1..120)
        ) {
            let mut seqs = [1000u32; 4];
            let mut ids = [0u16; 4];
            let mut input = Vec::new();
            for (flow, size, skip, kind) in ops {
                let v6 = flow % 2 == 1;
                let payload: Vec<u8> = (0..size).map(|i| (i + size) as u8).collect();
                let flags = match kind { 0 => ACK | TCP_FLAG_PSH, 1 => ACK | 0x01, _ => ACK };
                if skip && kind == 2 {
                    seqs[usize::from(flow)] = seqs[usize::from(flow)].wrapping_add(100);
                }
                let f = usize::from(flow);
                input.push(packet(v6, flow, seqs[f], ids[f], flags, &payload));
                ids[f] = ids[f].wrapping_add(1);
                seqs[usize::from(flow)] = seqs[usize::from(flow)].wrapping_add(size as u32);
            }
            let out = run(&input);
            for w in &out {
                prop_assert!(w.len() <= VNET_HDR_LEN + MAX_SUPER_PACKET);
            }
            let got: Vec<_> = out.iter().flat_map(|w| resegment(w)).collect();
            prop_assert_eq!(got.len(), input.len());
            for flow in 0..4u16 {
                let port = (40000 + flow).to_be_bytes();
                let l4 = |p: &Vec<u8>| if p[0] >> 4 == 4 { 20 } else { 40 };
                let of = |v: &Vec<Vec<u8>>| -> Vec<Vec<u8>> {
                    v.iter().filter(|p| p[l4(p)..l4(p) + 2] == port).cloned().collect()
                };
                prop_assert_eq!(of(&got), of(&input));
            }
        }
    }
}
