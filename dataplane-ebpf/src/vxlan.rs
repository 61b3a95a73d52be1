//! VXLAN in eBPF: the overlay's plain (unencrypted) traffic skips the VXLAN device both ways
//! (path 2).
//!
//! Sending ([`encapsulate`], from `forward::to_tunnel`): the frame gets its outer IPv4, UDP and
//! VXLAN headers in place (`bpf_skb_adjust_room` with the UDP tunnel flags, so GSO packets
//! stay GSO and are segmented as UDP tunnel packets where needed) and leaves through the
//! uplink with `bpf_redirect_neigh` (the node's FIB and neighbour table pick the next hop),
//! exactly the packet the VXLAN device would have sent: outer source the node's address, UDP
//! to 4789, no outer UDP checksum, the flow's hash in the source port. Encrypted networks'
//! traffic never comes here: it must go through the tunnel's device into WireGuard.
//!
//! Receiving:
//! `from_uplink` sees every VXLAN packet a node sends us before the node's UDP socket does. A
//! packet whose inner frame is for a local endpoint of that VNI's plain (unencrypted) network
//! is decapsulated right there and judged by from_overlay's own decision
//! (`try_from_overlay`, which checks again everything checked here), then redirected into the
//! container: no IP and UDP receive, no VXLAN device, no second pass through the device's GRO
//! cells. Everything else passes to the VXLAN device as before and from_overlay judges it
//! there: encrypted networks' endpoints (in clear they must be dropped, and are, there),
//! routing-mesh replies for the outside, stale state, anything this parser does not expect.
//!
//! GRO-merged packets (GSO skbs with `SKB_GSO_UDP_TUNNEL`) keep their GSO size
//! (`BPF_F_ADJ_ROOM_FIXED_GSO`: the inner MSS does not change when the outer headers go).
//! Linux 6.18's `bpf_skb_adjust_room` cannot clear the tunnel GSO type on decapsulation;
//! that is harmless for delivery into the endpoint's own stack, which never segments a
//! received packet, and delivery is the only thing this path does.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_check_mtu_flags, bpf_check_mtu_ret,
    },
    helpers::{bpf_check_mtu, bpf_get_hash_recalc},
    programs::TcContext,
};
use dataplane_common::{
    CONFIG_F_DEVICE_ENCAP, Config, DropReason, ENDPOINT_F_ENCRYPTED, Hook, IPPROTO_UDP,
};

use crate::{
    drop,
    eth::{ETH_HLEN, ETH_P_IP, EthHdr, ensure_linear, ptr_at, set_macs},
    forward,
    from_overlay::try_from_overlay,
    ipv4::{self, IPV4_HLEN, Ipv4, Ipv4Hdr},
    l4::{UDP_HLEN, UdpHdr},
    maps, stats,
    verdict::{TC_ACT_OK, subprogram},
};

const VXLAN_HLEN: usize = 8;
/// Outer IPv4 (without options), UDP, VXLAN and the inner Ethernet header: what decapsulation
/// removes after the outer Ethernet header, which stays and becomes the inner frame's.
pub const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
const VXLAN_OFF: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN;
const INNER_ETH_OFF: usize = VXLAN_OFF + VXLAN_HLEN;
const INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_HLEN;
/// The first word of a VXLAN header: the "VNI present" flag, the only one RFC 7348 defines.
const VXLAN_FLAGS: [u8; 4] = [0x08, 0, 0, 0];

/// What `try_from_uplink` answers for a packet to decapsulate here ([`receive`]): not a tc
/// verdict (those are small and non-negative) and not a caller's sentinel (-1).
pub const DECAP: i32 = -2;

/// RFC 7348: flags (only "VNI present" defined) and 24 reserved bits, then the VNI and 8
/// reserved bits (`vni[3]`).
#[repr(C)]
struct VxlanHdr {
    flags: [u8; 4],
    vni: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<VxlanHdr>() == VXLAN_HLEN);

/// Everything encapsulation puts between the outer Ethernet header and the inner IPv4 header.
#[repr(C)]
struct Encap {
    ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner_eth: EthHdr,
}

const _: () = assert!(core::mem::size_of::<Encap>() == ENCAP_LEN);

/// The overlay's VXLAN port (IANA's).
pub const VXLAN_PORT: u16 = 4789;
/// The source port range the Linux VXLAN device uses by default (the local port range), so
/// the fabric's ECMP hashing sees the same spread either way.
const SPORT_MIN: u32 = 32768;
const SPORT_MAX: u32 = 61000;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the length of the inner L2 header, in the top byte.
const ENCAP_L2_ETH_LEN: u64 = (ETH_HLEN as u64) << 56;

/// Whether [`encapsulate`] sends on this node: it knows its address and uplink (the agent
/// always sets both; a datapath without them uses the VXLAN device), and [`in_ebpf`].
#[inline(always)]
pub fn can_encapsulate(config: &Config) -> bool {
    config.node_ip != [0; 4] && config.uplink_ifindex != 0 && in_ebpf(config)
}

/// Whether the programs do the VXLAN both ways here: the agent did not ask for the device
/// (`CONFIG_F_DEVICE_ENCAP`: then it encapsulates and decapsulates everything).
#[inline(always)]
pub fn in_ebpf(config: &Config) -> bool {
    config.flags & CONFIG_F_DEVICE_ENCAP == 0
}

subprogram! {
    /// Sends the frame (its inner Ethernet header already addressed) in VXLAN with `vni` to
    /// the node `node_be` (network order) out of the uplink. `NOT_ENCAPSULATED` (the packet
    /// untouched) if the kernel would not grow it: the caller then uses the VXLAN device.
    pub fn encapsulate => try_encapsulate(ctx: &TcContext, vni: u32, node_be: u32, config: &Config)
}

/// [`encapsulate`]'s answer when the packet was left as it was.
pub const NOT_ENCAPSULATED: i32 = -1;

#[inline(always)]
fn try_encapsulate(
    ctx: &TcContext,
    vni: u32,
    node_be: u32,
    config: &Config,
) -> Result<i32, DropReason> {
    let inner_len = ctx.len();
    let udp_len = (UDP_HLEN + VXLAN_HLEN) as u32 + inner_len;
    let tot_len = IPV4_HLEN as u32 + udp_len;
    // Larger (BIG TCP) GSO packets have no 16-bit length to write; the device handles them.
    if tot_len > 0xffff {
        return Ok(NOT_ENCAPSULATED);
    }
    if !fits_device_mtu(ctx, config) {
        return Ok(NOT_ENCAPSULATED);
    }
    // SAFETY: the context's skb pointer. The flow hash (the socket's, or dissected now).
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let sport = ((u64::from(hash) * u64::from(SPORT_MAX - SPORT_MIN)) >> 32) as u32 + SPORT_MIN;
    // The inner frame's Ethernet header stays where it is and becomes the outer one; the
    // inner IPv4 packet keeps its own checksums (offloads see it as the inner packet).
    let flags = BPF_F_ADJ_ROOM_FIXED_GSO
        | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH;
    if ctx
        .adjust_room(
            ENCAP_LEN as i32,
            BPF_ADJ_ROOM_MAC,
            u64::from(flags) | ENCAP_L2_ETH_LEN,
        )
        .is_err()
    {
        return Ok(NOT_ENCAPSULATED);
    }
    // From here on the packet is changed: a failure is a drop, never the device.
    ensure_linear(ctx, ETH_HLEN + ENCAP_LEN)?;
    let outer_eth: *const EthHdr = ptr_at(ctx, 0)?;
    let encap: *mut Encap = ptr_at(ctx, ETH_HLEN)?;
    // DF: the overlay's MTU leaves room for these headers on the uplink, so a packet that does
    // not fit the path is a misconfiguration to report (ICMP), not to fragment. TTL 64, as
    // `tunnel::set_key` gives the device.
    let ip = ipv4::header(
        IPPROTO_UDP,
        tot_len as u16,
        config.node_ip,
        node_be.to_ne_bytes(),
    );
    let v = vni.to_be_bytes();
    // SAFETY: `ptr_at` checked both lie inside the linear (writable) packet data; the room
    // just made does not overlap the outer Ethernet header it copies.
    unsafe {
        (*encap).inner_eth = *outer_eth;
        (*encap).ip = ip;
        (*encap).udp = UdpHdr {
            source: (sport as u16).to_be_bytes(),
            dest: VXLAN_PORT.to_be_bytes(),
            len: (udp_len as u16).to_be_bytes(),
            check: [0; 2],
        };
        (*encap).vxlan = VxlanHdr {
            flags: VXLAN_FLAGS,
            vni: [v[1], v[2], v[3], 0],
        };
    }
    forward::to_uplink(config)
}

// `bpf_check_mtu`'s "too big" answers, and its flag to check a GSO packet by the size of its
// segments (the bindings' integer types differ between architectures, see verdict.rs).
#[allow(clippy::unnecessary_cast)]
const MTU_FRAG_NEEDED: i64 = bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED as i64;
#[allow(clippy::unnecessary_cast)]
const MTU_SEGS_TOOBIG: i64 = bpf_check_mtu_ret::BPF_MTU_CHK_RET_SEGS_TOOBIG as i64;
#[allow(clippy::unnecessary_cast)]
const MTU_CHK_SEGS: u64 = bpf_check_mtu_flags::BPF_MTU_CHK_SEGS as u64;

/// Whether the packet (or each segment of a GSO packet) fits the VXLAN device's MTU, the
/// uplink's less the encapsulation: what the device itself would carry. `network create`
/// keeps networks' MTUs within every node's room, but a node with a smaller uplink can join
/// later: its containers' packets larger than its uplink allows go to the device, which
/// answers the sender with ICMP "fragmentation needed"; built here they would be dropped at
/// the uplink without a word.
#[inline(always)]
fn fits_device_mtu(ctx: &TcContext, config: &Config) -> bool {
    let mut mtu_len = 0u32;
    // SAFETY: the context's skb pointer and a stack slot for the MTU the helper reports.
    let rc = unsafe {
        bpf_check_mtu(
            ctx.skb.skb.cast(),
            config.vxlan_ifindex,
            &mut mtu_len,
            0,
            MTU_CHK_SEGS,
        )
    };
    // A negative answer (no such device) decides nothing: sending fails later, and says so.
    rc != MTU_FRAG_NEEDED && rc != MTU_SEGS_TOOBIG
}

/// Whether the packet `ip`, UDP to our VXLAN port from a node (the caller checked both), can
/// be delivered here: plain VXLAN carrying IPv4 for a local endpoint of the VNI's network, not
/// an encrypted one.
#[inline(always)]
pub fn deliverable(ctx: &TcContext, ip: &Ipv4) -> bool {
    if ip.hdr_len != IPV4_HLEN || ip.is_fragment() {
        return false;
    }
    let Some((vni, _)) = headers(ctx) else {
        return false;
    };
    let Ok(inner) = ptr_at::<Ipv4Hdr>(ctx, INNER_IP_OFF) else {
        return false;
    };
    // SAFETY: `ptr_at` checked the header lies inside the linear packet data.
    let dst = unsafe { (*inner).daddr };
    matches!(maps::endpoint(&dst),
        Some(ep) if ep.is_local() && ep.vni == vni && ep.flags & ENDPOINT_F_ENCRYPTED == 0)
}

/// The VNI and the outer source of a plain VXLAN frame carrying IPv4, with its headers up to
/// the inner IPv4 header made linear.
#[inline(always)]
fn headers(ctx: &TcContext) -> Option<(u32, [u8; 4])> {
    ensure_linear(ctx, INNER_IP_OFF + IPV4_HLEN).ok()?;
    let outer = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok()?;
    let vx = ptr_at::<VxlanHdr>(ctx, VXLAN_OFF).ok()?;
    let eth = ptr_at::<EthHdr>(ctx, INNER_ETH_OFF).ok()?;
    // SAFETY: `ptr_at` checked each header lies inside the linear packet data.
    let (remote, flags, vni, ether_type) =
        unsafe { ((*outer).saddr, (*vx).flags, (*vx).vni, (*eth).ether_type) };
    // Only the VNI flag, and no reserved bit: anything else is an extension we do not speak
    // (the device drops those).
    if u32::from_ne_bytes(flags) != u32::from_ne_bytes(VXLAN_FLAGS)
        || vni[3] != 0
        || ether_type != ETH_P_IP
    {
        return None;
    }
    Some((u32::from_be_bytes([0, vni[0], vni[1], vni[2]]), remote))
}

/// `from_uplink`'s exit for a packet [`deliverable`] said yes to: decapsulates it and delivers
/// it as from_overlay would, counted and reported as from_overlay's. If the kernel refuses to
/// decapsulate, the packet goes on unchanged to the VXLAN device.
#[inline(always)]
pub fn receive(ctx: &TcContext) -> i32 {
    let Some((vni, remote)) = headers(ctx) else {
        return stats::forwarded(ctx, Hook::FromUplink, TC_ACT_OK, 0, ctx.len());
    };
    // Decapsulation keeps the outer Ethernet header (both say IPv4); give it the inner one's
    // addresses first, since from_overlay's decision reads them (the routing mesh's mark). If
    // the kernel then refuses, the stack gets the packet with those addresses: it classified
    // the frame before this hook (and packet taps saw it as it came), so nothing notices.
    if keep_inner_macs(ctx).is_err() {
        return stats::forwarded(ctx, Hook::FromUplink, TC_ACT_OK, 0, ctx.len());
    }
    if ctx
        .adjust_room(
            -(ENCAP_LEN as i32),
            BPF_ADJ_ROOM_MAC,
            u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4),
        )
        .is_err()
    {
        return stats::forwarded(ctx, Hook::FromUplink, TC_ACT_OK, 0, ctx.len());
    }
    match deliver(ctx, vni, remote) {
        Ok(verdict) => stats::forwarded(ctx, Hook::FromOverlay, verdict, vni, ctx.len()),
        Err(reason) => drop::drop_packet(ctx, reason, Hook::FromOverlay, vni),
    }
}

#[inline(always)]
fn keep_inner_macs(ctx: &TcContext) -> Result<(), DropReason> {
    let inner: *const EthHdr = ptr_at(ctx, INNER_ETH_OFF)?;
    // SAFETY: `ptr_at` checked the header lies inside the linear packet data.
    let (dst, src) = unsafe { ((*inner).dst, (*inner).src) };
    set_macs(ctx, dst, src)
}

#[inline(always)]
fn try_deliver(ctx: &TcContext, vni: u32, remote: [u8; 4]) -> Result<i32, DropReason> {
    try_from_overlay(ctx, vni, remote, false)
}

subprogram! {
    /// from_overlay's decision on the decapsulated frame, in a frame of its own.
    fn deliver => try_deliver(ctx: &TcContext, vni: u32, remote: [u8; 4])
}
