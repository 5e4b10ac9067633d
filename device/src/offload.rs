//! TUN segmentation offload, send side: with `IFF_VNET_HDR` and `TUNSETOFFLOAD` the kernel
//! hands the device TCP super-packets (up to 64 KiB, one `virtio_net_hdr` in front) and packets
//! whose transport checksum is left partial. This module turns them back into MTU-sized packets
//! with complete checksums, the way a NIC would, so they can be encrypted one by one.
//!
//! Pure byte work: no fds, no allocation, no copy of the payload. Segments are cut in place:
//! each one's headers are written just in front of its payload, over the tail of the segment
//! before it, which the caller has consumed by then.

/// Size of `struct virtio_net_hdr` (without `num_buffers`), the TUN default.
pub const VNET_HDR_LEN: usize = 10;

pub(crate) const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub(crate) const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub(crate) const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

const TCP_FLAG_FIN: u8 = 0x01;
pub(crate) const TCP_FLAG_PSH: u8 = 0x08;
pub(crate) const TCP_FLAG_ACK: u8 = 0x10;
const TCP_FLAG_CWR: u8 = 0x80;
pub(crate) const IPPROTO_TCP: u8 = 6;

/// Why a packet from the TUN device could not be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Shorter than its headers say, or offsets outside the packet.
    #[error("truncated or inconsistent packet")]
    Malformed,
    /// A GSO type the device did not ask for.
    #[error("unsupported GSO type {0}")]
    UnsupportedGso(u8),
    /// IP and TCP headers longer than any this module cuts up.
    #[error("headers too long")]
    HeadersTooLong,
}

/// The `virtio_net_hdr` fields we use (native byte order, as TUN writes them on this host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VnetHdr {
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

impl VnetHdr {
    fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }
}

/// Splits one read from the TUN device (`virtio_net_hdr` + packet) into plain IP packets with
/// complete checksums and calls `emit` for each, in order. Works in place: `read` is
/// overwritten, and each packet given to `emit` is only valid until `emit` returns.
pub fn split(read: &mut [u8], mut emit: impl FnMut(&[u8])) -> Result<(), OffloadError> {
    let hdr = VnetHdr::parse(read).ok_or(OffloadError::Malformed)?;
    let pkt = &mut read[VNET_HDR_LEN..];
    match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => {
            if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                finish_partial_checksum(pkt, hdr.csum_start.into(), hdr.csum_offset.into())?;
            }
            emit(pkt);
            Ok(())
        }
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => segment_tcp(pkt, &hdr, &mut emit),
        other => Err(OffloadError::UnsupportedGso(other)),
    }
}

/// Completes a partial checksum: the field holds the pseudo-header sum, the checksum covers
/// `start..` of the packet.
fn finish_partial_checksum(p: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let field = start + offset;
    if field + 2 > p.len() || start > p.len() {
        return Err(OffloadError::Malformed);
    }
    let sum = fold(sum16(&p[start..], 0));
    p[field..field + 2].copy_from_slice(&(!sum).to_be_bytes());
    Ok(())
}

/// Longest IP + TCP headers cut up: 60 bytes of TCP after IPv6 with extension headers.
const MAX_HEADERS: usize = 256;

fn segment_tcp(
    pkt: &mut [u8],
    hdr: &VnetHdr,
    emit: &mut impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    let v4 = match pkt.first().map(|b| b >> 4) {
        Some(4) => true,
        Some(6) => false,
        _ => return Err(OffloadError::Malformed),
    };
    // The TCP header starts where the checksum starts (after any IPv6 extension headers).
    let l4 = usize::from(hdr.csum_start);
    if l4 + 20 > pkt.len() || (v4 && l4 < 20) || (!v4 && l4 < 40) {
        return Err(OffloadError::Malformed);
    }
    let tcp_len = usize::from(pkt[l4 + 12] >> 4) * 4;
    let headers = l4 + tcp_len;
    let mss = usize::from(hdr.gso_size);
    if tcp_len < 20 || headers > pkt.len() || mss == 0 {
        return Err(OffloadError::Malformed);
    }
    if headers > MAX_HEADERS {
        return Err(OffloadError::HeadersTooLong);
    }
    // The headers every segment starts from; the original is overwritten as segments are cut.
    let mut template = [0u8; MAX_HEADERS];
    template[..headers].copy_from_slice(&pkt[..headers]);
    let template = &template[..headers];
    let payload_len = pkt.len() - headers;
    let seq = u32::from_be_bytes([pkt[l4 + 4], pkt[l4 + 5], pkt[l4 + 6], pkt[l4 + 7]]);
    let flags = pkt[l4 + 13];
    let ip_id = u16::from_be_bytes([pkt[4], pkt[5]]);
    let count = payload_len.div_ceil(mss).max(1);

    for i in 0..count {
        // Segment i's payload starts at headers + i * mss; its headers go just before it.
        let start = i * mss;
        let end = headers + ((i + 1) * mss).min(payload_len);
        let out = &mut pkt[start..end];
        let len = out.len();
        out[..headers].copy_from_slice(template);
        let last = i + 1 == count;

        if v4 {
            let total = u16::try_from(len).map_err(|_| OffloadError::Malformed)?;
            out[2..4].copy_from_slice(&total.to_be_bytes());
            out[4..6].copy_from_slice(&ip_id.wrapping_add(i as u16).to_be_bytes());
            out[10..12].fill(0);
            let ihl = usize::from(out[0] & 0x0f) * 4;
            let csum = !fold(sum16(&out[..ihl.min(l4)], 0));
            out[10..12].copy_from_slice(&csum.to_be_bytes());
        } else {
            let plen = u16::try_from(len - 40).map_err(|_| OffloadError::Malformed)?;
            out[4..6].copy_from_slice(&plen.to_be_bytes());
        }

        let tcp = &mut out[l4..];
        let seq_i = seq.wrapping_add((i * mss) as u32);
        tcp[4..8].copy_from_slice(&seq_i.to_be_bytes());
        let mut f = flags;
        if !last {
            f &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
        }
        if i > 0 {
            f &= !TCP_FLAG_CWR;
        }
        tcp[13] = f;
        tcp[16..18].fill(0);

        let sum = pseudo_header_sum(out, v4, len - l4);
        let csum = !fold(sum16(&out[l4..], sum));
        out[l4 + 16..l4 + 18].copy_from_slice(&csum.to_be_bytes());
        emit(out);
    }
    Ok(())
}

/// The partial sum of a TCP packet's pseudo-header: addresses, protocol, TCP length.
#[inline]
pub(crate) fn pseudo_header_sum(packet: &[u8], v4: bool, tcp_len: usize) -> u64 {
    let addrs = if v4 { &packet[12..20] } else { &packet[8..40] };
    sum16(addrs, u64::from(IPPROTO_TCP) + tcp_len as u64)
}

/// One's-complement partial sum of big-endian 16-bit words, added to `acc`.
///
/// It adds 32-bit words instead, which is the same sum once folded: 2^16 ≡ 1 modulo
/// 0xffff, so a word's high and low halves count alike. Two accumulators over 32-byte
/// chunks let the adds overlap; at most 2^11 chunks per 64 KiB keep them far from overflow.
#[inline]
pub(crate) fn sum16(data: &[u8], acc: u64) -> u64 {
    let word =
        |c: &[u8], i: usize| u64::from(u32::from_be_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]));
    let (mut a, mut b) = (acc, 0u64);
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        a += word(c, 0) + word(c, 4) + word(c, 8) + word(c, 12);
        b += word(c, 16) + word(c, 20) + word(c, 24) + word(c, 28);
    }
    let mut words = chunks.remainder().chunks_exact(4);
    for c in &mut words {
        a += word(c, 0);
    }
    let mut rest = words.remainder().chunks_exact(2);
    for c in &mut rest {
        b += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [x] = rest.remainder() {
        b += u64::from(*x) << 8;
    }
    a + b
}

/// Folds a partial sum to 16 bits.
#[inline]
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vnet(flags: u8, gso_type: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> Vec<u8> {
        let mut h = vec![flags, gso_type, 0, 0];
        h.extend_from_slice(&gso_size.to_ne_bytes());
        h.extend_from_slice(&csum_start.to_ne_bytes());
        h.extend_from_slice(&csum_offset.to_ne_bytes());
        h
    }

    fn tcp_header(seq: u32, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&1234u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn ipv4_tcp(payload: &[u8], flags: u8) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend(tcp_header(1000, flags));
        p.extend_from_slice(payload);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p
    }

    fn ipv6_tcp(payload: &[u8], flags: u8) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend(tcp_header(1000, flags));
        p.extend_from_slice(payload);
        let plen = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&plen.to_be_bytes());
        p
    }

    /// Whether the TCP checksum of an IPv4 or IPv6 packet verifies.
    fn tcp_checksum_ok(p: &[u8]) -> bool {
        let v4 = p[0] >> 4 == 4;
        let l4 = if v4 { 20 } else { 40 };
        let sum = pseudo_header_sum(p, v4, p.len() - l4);
        fold(sum16(&p[l4..], sum)) == 0xffff
    }

    fn split_all(read: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        split(&mut read.to_vec(), |p| out.push(p.to_vec())).unwrap();
        out
    }

    proptest::proptest! {
        /// The 32-bit sum folds to what RFC 1071's 16-bit sum does, at any length and start.
        #[test]
        fn sum16_matches_the_16_bit_definition(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            start in 0usize..7,
            acc in 0u64..1 << 40,
        ) {
            let data = &data[start.min(data.len())..];
            let mut reference = acc;
            for pair in data.chunks(2) {
                reference += u64::from(pair[0]) << 8 | u64::from(*pair.get(1).unwrap_or(&0));
            }
            proptest::prop_assert_eq!(fold(sum16(data, acc)), fold(reference));
        }
    }

    #[test]
    fn plain_packets_pass_through() {
        let pkt = ipv4_tcp(b"hello", TCP_FLAG_PSH);
        let mut read = vnet(0, 0, 0, 0, 0);
        read.extend_from_slice(&pkt);
        assert_eq!(split_all(&read), vec![pkt]);
    }

    #[test]
    fn partial_checksums_are_completed() {
        let payload: Vec<u8> = (0..333u32).map(|i| i as u8).collect();
        for mut pkt in [
            ipv4_tcp(&payload, TCP_FLAG_PSH),
            ipv6_tcp(&payload, TCP_FLAG_PSH),
        ] {
            let l4 = if pkt[0] >> 4 == 4 { 20 } else { 40 };
            // The kernel leaves the pseudo-header sum in the field.
            let pseudo = pseudo_header_sum(&pkt, l4 == 20, pkt.len() - l4);
            pkt[l4 + 16..l4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
            let mut read = vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, l4 as u16, 16);
            read.extend_from_slice(&pkt);
            let out = split_all(&read);
            assert_eq!(out.len(), 1);
            assert!(tcp_checksum_ok(&out[0]));
        }
    }

    #[test]
    fn tcp_super_packets_become_mss_segments() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        for (pkt, gso, l4) in [
            (
                ipv4_tcp(&payload, TCP_FLAG_PSH | TCP_FLAG_FIN | TCP_FLAG_CWR),
                VIRTIO_NET_HDR_GSO_TCPV4,
                20,
            ),
            (
                ipv6_tcp(&payload, TCP_FLAG_PSH | TCP_FLAG_FIN | TCP_FLAG_CWR),
                VIRTIO_NET_HDR_GSO_TCPV6,
                40,
            ),
        ] {
            let mut read = vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, 1380, l4 as u16, 16);
            read.extend_from_slice(&pkt);
            let segs = split_all(&read);
            assert_eq!(segs.len(), 4, "5000 bytes at 1380 per segment");
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let hl = l4 + 20;
                let len = if i < 3 { 1380 } else { 5000 - 3 * 1380 };
                assert_eq!(s.len(), hl + len);
                if l4 == 20 {
                    assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
                    assert_eq!(fold(sum16(&s[..20], 0)), 0xffff, "IPv4 header checksum");
                } else {
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]) as usize, s.len() - 40);
                }
                let seq = u32::from_be_bytes([s[l4 + 4], s[l4 + 5], s[l4 + 6], s[l4 + 7]]);
                assert_eq!(seq, 1000 + (i * 1380) as u32);
                let flags = s[l4 + 13];
                assert_eq!(flags & TCP_FLAG_FIN != 0, i == 3, "FIN only on the last");
                assert_eq!(flags & TCP_FLAG_PSH != 0, i == 3, "PSH only on the last");
                assert_eq!(flags & TCP_FLAG_CWR != 0, i == 0, "CWR only on the first");
                assert!(tcp_checksum_ok(s), "segment {i} checksum");
                joined.extend_from_slice(&s[hl..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn segments_smaller_than_their_headers_are_cut_in_place_correctly() {
        // Each segment's headers overwrite the original headers' bytes: the template holds.
        let payload: Vec<u8> = (0..100u32).map(|i| (i * 13) as u8).collect();
        for (pkt, gso, l4) in [
            (
                ipv4_tcp(&payload, TCP_FLAG_PSH),
                VIRTIO_NET_HDR_GSO_TCPV4,
                20,
            ),
            (
                ipv6_tcp(&payload, TCP_FLAG_PSH),
                VIRTIO_NET_HDR_GSO_TCPV6,
                40,
            ),
        ] {
            let mut read = vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, 7, l4 as u16, 16);
            read.extend_from_slice(&pkt);
            let segs = split_all(&read);
            assert_eq!(segs.len(), 15, "100 bytes at 7 per segment");
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let addrs = if l4 == 20 { 12..20 } else { 8..40 };
                assert_eq!(s[addrs.clone()], pkt[addrs], "addresses of segment {i}");
                assert_eq!(s[l4..l4 + 4], pkt[l4..l4 + 4], "ports of segment {i}");
                if l4 == 20 {
                    assert_eq!(fold(sum16(&s[..20], 0)), 0xffff, "IPv4 header checksum");
                }
                let seq = u32::from_be_bytes([s[l4 + 4], s[l4 + 5], s[l4 + 6], s[l4 + 7]]);
                assert_eq!(seq, 1000 + (i * 7) as u32);
                assert!(tcp_checksum_ok(s), "segment {i} checksum");
                joined.extend_from_slice(&s[l4 + 20..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn malformed_reads_are_rejected_not_panicked_on() {
        let pkt = ipv4_tcp(&[0; 100], 0);
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 5],
            [vnet(0, 5, 1000, 20, 6), pkt.clone()].concat(),
            [vnet(1, 1, 1000, 2000, 16), pkt.clone()].concat(),
            [vnet(1, 1, 0, 20, 16), pkt.clone()].concat(),
            [vnet(1, 0, 0, 20, 2000), pkt.clone()].concat(),
            [vnet(1, 1, 1000, 20, 16), vec![0x70; 60]].concat(),
            [vnet(1, 1, 1000, 20, 16), pkt[..30].to_vec()].concat(),
        ];
        for c in cases {
            assert!(split(&mut c.clone(), |_| {}).is_err(), "{c:?}");
        }
    }
}
