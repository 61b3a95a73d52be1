//! Packets between the TUN device and the tunnel, without I/O: the virtio-net header the TUN
//! speaks (`IFF_VNET_HDR`), IPv4 field access, and the coalescing of decrypted datagrams into
//! UDP GSO super-packets.
//!
//! The receive side is where userspace tunnels lose: one `write` and one trip through the
//! stack per datagram. Decrypted VXLAN datagrams of one flow have identical outer IP/UDP
//! headers and (but for the last of a burst) identical sizes, so they can be written as one
//! UDP GSO (`VIRTIO_NET_HDR_GSO_UDP_L4`) super-packet: the kernel splits it back into the
//! datagrams and hands them to the VXLAN socket, whose GRO then merges the inner TCP segments.
//! Plain L3 TUN devices accept such writes whatever `TUNSETOFFLOAD` says.

use std::ops::Range;

/// Size of `struct virtio_net_hdr` (the TUN's default vnet header size).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const VNET_GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO).
pub const VNET_GSO_UDP_L4: u8 = 5;

const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const IPPROTO_UDP: u8 = 17;
/// Datagrams in one super-packet at most (the kernel takes 128 since 6.x; 64 everywhere).
const SEGMENTS_MAX: usize = 64;
/// An IPv4 packet's total length is 16 bits.
const IP_MAX: usize = 65_535;

/// `struct virtio_net_hdr`, little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Sum of big-endian 16-bit words, for the one's complement checksums.
pub fn sum16(bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    let mut s: u32 = chunks
        .by_ref()
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        s += u32::from(*last) << 8;
    }
    s
}

/// Folds a 32-bit sum into 16 bits (not inverted).
pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Finishes a checksum left partial (`VNET_F_NEEDS_CSUM`): the field at `start + offset`
/// holds the pseudo-header sum, the rest from `start` is summed over it.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> bool {
    let field = start + offset;
    if field + 2 > pkt.len() || start > pkt.len() {
        return false;
    }
    let csum = !fold(sum16(&pkt[start..]));
    // A UDP checksum of 0 means "none"; RFC 768 sends 0xffff instead.
    let csum = if csum == 0 { 0xffff } else { csum };
    pkt[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// Source address of an IPv4 packet.
pub fn ipv4_src(pkt: &[u8]) -> Option<[u8; 4]> {
    (pkt.len() >= IPV4_HLEN && pkt[0] >> 4 == 4).then(|| [pkt[12], pkt[13], pkt[14], pkt[15]])
}

/// Destination address of an IPv4 packet.
pub fn ipv4_dst(pkt: &[u8]) -> Option<[u8; 4]> {
    (pkt.len() >= IPV4_HLEN && pkt[0] >> 4 == 4).then(|| [pkt[16], pkt[17], pkt[18], pkt[19]])
}

/// The fields that must agree for two IPv4/UDP datagrams to be segments of one super-packet,
/// or `None` if the packet cannot be coalesced at all (options, fragments, not UDP, lengths
/// that disagree with the buffer).
fn flow_of(pkt: &[u8]) -> Option<[u8; 11]> {
    if pkt.len() < IPV4_HLEN + UDP_HLEN || pkt[0] != 0x45 || pkt[9] != IPPROTO_UDP {
        return None;
    }
    let tot = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
    let udp_len = usize::from(u16::from_be_bytes([pkt[24], pkt[25]]));
    if tot != pkt.len() || frag & 0x3fff != 0 || udp_len != tot - IPV4_HLEN {
        return None;
    }
    // TOS, TTL, DF and the addresses; the ports are compared on their own.
    let mut k = [0u8; 11];
    k[0] = pkt[1];
    k[1] = pkt[8];
    k[2] = pkt[6] & 0x40;
    k[3..7].copy_from_slice(&pkt[12..16]);
    k[7..11].copy_from_slice(&pkt[16..20]);
    Some(k)
}

fn ports(pkt: &[u8]) -> [u8; 4] {
    [pkt[20], pkt[21], pkt[22], pkt[23]]
}

/// Splits `packets` into runs to write as one each: a run of more than one packet is a flow
/// of equal-size IPv4/UDP datagrams (the last may be shorter) that fits one super-packet.
pub fn plan_writes(packets: &[&[u8]]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < packets.len() {
        let head = packets[i];
        let mut end = i + 1;
        if let Some(flow) = flow_of(head) {
            let seg = head.len() - IPV4_HLEN - UDP_HLEN;
            let mut total = head.len();
            while end < packets.len() && end - i < SEGMENTS_MAX {
                let p = packets[end];
                let payload = p.len().saturating_sub(IPV4_HLEN + UDP_HLEN);
                if flow_of(p) != Some(flow)
                    || ports(p) != ports(head)
                    || payload > seg
                    || payload == 0
                    || total + payload > IP_MAX
                {
                    break;
                }
                total += payload;
                end += 1;
                if payload < seg {
                    break; // only the last segment may be shorter
                }
            }
        }
        runs.push(i..end);
        i = end;
    }
    runs
}

/// Writes into `out` the TUN write for one run of [`plan_writes`]: a vnet header and the
/// packet as it is for a single packet, or a UDP GSO super-packet for several.
pub fn build_write(run: &[&[u8]], out: &mut Vec<u8>) {
    out.clear();
    out.resize(VNET_HDR_LEN, 0);
    let head = run[0];
    if run.len() == 1 {
        VnetHdr::default().write(&mut out[..VNET_HDR_LEN]);
        out.extend_from_slice(head);
        return;
    }
    let seg = head.len() - IPV4_HLEN - UDP_HLEN;
    let payload: usize = run.iter().map(|p| p.len() - IPV4_HLEN - UDP_HLEN).sum();
    let total = IPV4_HLEN + UDP_HLEN + payload;
    VnetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: VNET_GSO_UDP_L4,
        hdr_len: (IPV4_HLEN + UDP_HLEN) as u16,
        gso_size: seg as u16,
        csum_start: IPV4_HLEN as u16,
        csum_offset: 6,
    }
    .write(&mut out[..VNET_HDR_LEN]);
    let h = out.len();
    out.extend_from_slice(&head[..IPV4_HLEN + UDP_HLEN]);
    for p in run {
        out.extend_from_slice(&p[IPV4_HLEN + UDP_HLEN..]);
    }
    let ip = &mut out[h..h + IPV4_HLEN];
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[10..12].copy_from_slice(&[0, 0]);
    let ip_csum = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    let udp_len = (total - IPV4_HLEN) as u16;
    let pseudo = sum16(&head[12..20]) + u32::from(IPPROTO_UDP) + u32::from(udp_len);
    let udp = &mut out[h + IPV4_HLEN..h + IPV4_HLEN + UDP_HLEN];
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    // CHECKSUM_PARTIAL: the pseudo-header sum, not inverted; the kernel completes each segment.
    udp[6..8].copy_from_slice(&fold(pseudo).to_be_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An IPv4/UDP datagram with a correct header checksum and `payload` bytes of `fill`.
    pub fn udp(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        payload: usize,
        fill: u8,
    ) -> Vec<u8> {
        let total = IPV4_HLEN + UDP_HLEN + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = IPPROTO_UDP;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let c = !fold(sum16(&p[..20]));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..26].copy_from_slice(&((UDP_HLEN + payload) as u16).to_be_bytes());
        p[28..].fill(fill);
        p
    }

    const A: [u8; 4] = [169, 254, 128, 1];
    const B: [u8; 4] = [169, 254, 128, 2];

    #[test]
    fn one_flow_of_equal_datagrams_is_one_super_packet() {
        let pkts: Vec<Vec<u8>> = (0..5)
            .map(|i| udp(A, B, 40000, 4790, if i == 4 { 300 } else { 1400 }, i))
            .collect();
        let refs: Vec<&[u8]> = pkts.iter().map(|p| p.as_slice()).collect();
        assert_eq!(plan_writes(&refs), vec![0..5]);
        let mut out = Vec::new();
        build_write(&refs, &mut out);
        let h = VnetHdr::parse(&out).unwrap();
        assert_eq!(
            (h.flags, h.gso_type, h.gso_size, h.hdr_len),
            (1, 5, 1400, 28)
        );
        assert_eq!((h.csum_start, h.csum_offset), (20, 6));
        let ip = &out[VNET_HDR_LEN..];
        assert_eq!(ip.len(), 28 + 4 * 1400 + 300);
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        assert_eq!(fold(sum16(&ip[..20])), 0xffff, "header checksum valid");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[24], ip[25]])),
            ip.len() - 20
        );
        // The payloads follow each other in order.
        assert_eq!(ip[28], 0);
        assert_eq!(ip[28 + 1400], 1);
        assert_eq!(ip[28 + 4 * 1400], 4);
    }

    #[test]
    fn flows_sizes_and_limits_split_runs() {
        let big = udp(A, B, 40000, 4790, 1400, 0);
        let small = udp(A, B, 40000, 4790, 100, 0);
        let other_port = udp(A, B, 40001, 4790, 1400, 0);
        let other_dst = udp(A, [169, 254, 128, 3], 40000, 4790, 1400, 0);
        let mut frag = big.clone();
        frag[6] = 0x20; // MF
        let refs: Vec<&[u8]> = vec![
            &big,
            &big,
            &small,
            &big,
            &other_port,
            &other_dst,
            &frag,
            &big,
        ];
        // A shorter segment ends its run; another port, address or a fragment starts anew.
        assert_eq!(plan_writes(&refs), vec![0..3, 3..4, 4..5, 5..6, 6..7, 7..8]);
        // Never more than 64 KB.
        let many = vec![big.as_slice(); 60];
        let runs = plan_writes(&many);
        assert!(
            runs.iter().all(|r| 28 + r.len() * 1400 <= 65535),
            "{runs:?}"
        );
        assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), 60);
        // A single packet goes out as it is.
        let mut out = Vec::new();
        build_write(&[&big], &mut out);
        assert_eq!(&out[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(&out[VNET_HDR_LEN..], big.as_slice());
    }

    #[test]
    fn partial_checksums_are_completed() {
        let mut p = udp(A, B, 1, 2, 33, 7);
        let pseudo = sum16(&p[12..20]) + 17 + 41;
        p[26..28].copy_from_slice(&fold(pseudo).to_be_bytes());
        assert!(complete_checksum(&mut p, 20, 6));
        let full = sum16(&p[12..20]) + 17 + 41 + sum16(&p[20..]);
        assert_eq!(fold(full), 0xffff, "verifies");
        assert!(!complete_checksum(&mut p, 60, 6));
    }
}
