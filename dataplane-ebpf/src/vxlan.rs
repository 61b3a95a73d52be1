//! The overlay's receive path without the VXLAN device (path 2, far side).
//!
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
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use dataplane_common::{DropReason, ENDPOINT_F_ENCRYPTED, Hook};

use crate::{
    drop,
    eth::{ETH_HLEN, ETH_P_IP, EthHdr, ensure_linear, ptr_at, set_macs},
    from_overlay::try_from_overlay,
    ipv4::{IPV4_HLEN, Ipv4, Ipv4Hdr},
    maps, stats,
    verdict::{TC_ACT_OK, subprogram},
};

const UDP_HLEN: usize = 8;
const VXLAN_HLEN: usize = 8;
/// Outer IPv4 (without options), UDP, VXLAN and the inner Ethernet header: what decapsulation
/// removes after the outer Ethernet header, which stays and becomes the inner frame's.
const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
const VXLAN_OFF: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN;
const INNER_ETH_OFF: usize = VXLAN_OFF + VXLAN_HLEN;
const INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_HLEN;
/// The "VNI present" flag, the only one RFC 7348 defines.
const VXLAN_F_VNI: u8 = 0x08;

/// What `try_from_uplink` answers for a packet to decapsulate here ([`receive`]): not a tc
/// verdict (those are small and non-negative) and not a caller's sentinel (-1).
pub const DECAP: i32 = -2;

#[repr(C)]
struct VxlanHdr {
    flags: u8,
    _reserved: [u8; 3],
    vni: [u8; 3],
    _reserved2: u8,
}

const _: () = assert!(core::mem::size_of::<VxlanHdr>() == VXLAN_HLEN);

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
    if flags != VXLAN_F_VNI || ether_type != ETH_P_IP {
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
        return stats::forwarded(ctx, Hook::FromUplink, TC_ACT_OK, 0);
    };
    // Decapsulation keeps the outer Ethernet header (both say IPv4); give it the inner one's
    // addresses first, since from_overlay's decision reads them (the routing mesh's mark).
    if keep_inner_macs(ctx).is_err() {
        return stats::forwarded(ctx, Hook::FromUplink, TC_ACT_OK, 0);
    }
    if ctx
        .adjust_room(
            -(ENCAP_LEN as i32),
            BPF_ADJ_ROOM_MAC,
            u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4),
        )
        .is_err()
    {
        return stats::forwarded(ctx, Hook::FromUplink, TC_ACT_OK, 0);
    }
    match deliver(ctx, vni, remote) {
        Ok(verdict) => stats::forwarded(ctx, Hook::FromOverlay, verdict, vni),
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
