//! `from_uplink`: tc ingress (TCX) on the node's uplink, the ingress routing mesh (path 4).
//!
//! Ours, in order: replies of containers' egress flows and ICMP errors about translated
//! packets (`egress::to_node`); TCP/UDP to `node_ip:<published port>`, balanced over the
//! port's backend set with the client's address kept (`lb::to_published`). Everything else passes untouched
//! (`TC_ACT_OK`) to the node's stack, which keeps the node's own services, its SSH, and the
//! VXLAN underlay (UDP 4789 to the node) working; so does anything this program cannot parse,
//! because it is not ours to judge.
//!
//! Two checks guard the node before that: VXLAN and WireGuard to the node are accepted only
//! from nodes of the cluster (anyone else could inject frames into any network, or make the
//! agent spend handshakes), and a packet to the node whose
//! source lies inside an overlay subnet is dropped (overlay addresses exist only behind the
//! nodes' programs, never on the wire outside).

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::{DropReason, Hook, IPPROTO_UDP, REINJECT_MARK};

use crate::{
    drop, egress,
    eth::{ETH_HLEN, ETH_P_IP, EthHdr, ptr_at},
    ipv4::{self, IPV4_HLEN},
    l4, lb, maps, stats,
    verdict::TC_ACT_OK,
    vxlan,
};

/// The overlay's VXLAN port (IANA's), network order.
const VXLAN_PORT: [u8; 2] = vxlan::VXLAN_PORT.to_be_bytes();

#[classifier]
pub fn from_uplink(ctx: TcContext) -> i32 {
    // As it came in: encapsulation for a backend on another node adds to it.
    let len = ctx.len();
    match try_from_uplink(&ctx) {
        Ok(vxlan::DECAP) => vxlan::receive(&ctx),
        Ok(verdict) => stats::forwarded(&ctx, Hook::FromUplink, verdict, 0, len),
        Err(reason) => drop::drop_packet(&ctx, reason, Hook::FromUplink, 0),
    }
}

/// The whole decision; also run by the `from_uplink_test` hook.
#[inline(always)]
pub fn try_from_uplink(ctx: &TcContext) -> Result<i32, DropReason> {
    // Too short to be IPv4 to us: not ours (and not worth pulling anything for).
    if (ctx.len() as usize) < ETH_HLEN + IPV4_HLEN {
        return Ok(TC_ACT_OK);
    }
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: `ptr_at` checked the 14 bytes are inside the linear packet data.
    if unsafe { (*eth).ether_type } != ETH_P_IP {
        return Ok(TC_ACT_OK);
    }
    let Ok(ip) = ipv4::parse(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let Ok(config) = maps::config() else {
        return Ok(TC_ACT_OK);
    };
    if config.node_ip == [0; 4] {
        return Ok(TC_ACT_OK);
    }
    if ip.dst != config.node_ip {
        // Overlay addresses are reached through the overlay, never routed in from outside
        // (the node has host routes to its containers).
        if maps::network_of(ip.dst).is_some() {
            return Err(DropReason::OverlayDestOutside);
        }
        return Ok(TC_ACT_OK);
    }
    // Only this node's programs send it packets from its own address (marked).
    if ip.src == config.node_ip && mark(ctx) != REINJECT_MARK {
        return Err(DropReason::NodeSourceOutside);
    }
    // No ports to match on in later fragments; the stack reassembles what is its own.
    let l4 = if l4::is_tcp_or_udp(ip.proto) && !ip.is_later_fragment() {
        l4::parse(ctx, &ip).ok()
    } else {
        None
    };
    if let Some(l4) = &l4
        && l4.proto == IPPROTO_UDP
        && (l4.dport == VXLAN_PORT
            || (config.wireguard_port != [0; 2] && l4.dport == config.wireguard_port))
    {
        if !maps::is_node(&ip.src) {
            return Err(DropReason::UnknownNode);
        }
        // Overlay traffic for a local container is delivered from here; the rest goes to
        // the VXLAN device (or the WireGuard socket).
        if l4.dport == VXLAN_PORT && vxlan::in_ebpf(config) && vxlan::deliverable(ctx, &ip) {
            return Ok(vxlan::DECAP);
        }
        return Ok(TC_ACT_OK);
    }
    if maps::network_of(ip.src).is_some() {
        return Err(DropReason::OverlaySourceOutside);
    }
    // Replies of containers' egress flows, and ICMP errors about translated packets.
    match egress::to_node(ctx, &ip, config) {
        // Not ours, or too short to be: the node's stack judges it.
        Ok(egress::NOT_OURS) | Err(DropReason::Malformed) => {}
        Ok(verdict) => return Ok(verdict),
        Err(e) => return Err(e),
    }
    let Some(l4) = l4 else {
        return Ok(TC_ACT_OK);
    };
    let Some(published) = lb::published(&l4) else {
        return Ok(TC_ACT_OK);
    };
    // A first fragment to a published port: its later fragments could not follow it.
    if ip.is_fragment() {
        return Err(DropReason::Fragmented);
    }
    lb::to_published(ctx, &ip, &l4, &published, config)
}

/// `skb->mark`.
#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: a read of a `__sk_buff` field through the context pointer (rewritten by the
    // verifier).
    unsafe { (*ctx.skb.skb).mark }
}
