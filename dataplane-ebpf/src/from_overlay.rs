//! `from_overlay`: tc ingress (TCX) on the node's collect-metadata VXLAN device, i.e. every
//! packet another node tunnelled to us, already decapsulated: the data is the inner Ethernet
//! frame and the VNI and outer addresses are in the skb's tunnel metadata.
//!
//! A packet is delivered only to a local endpoint of the network its VNI says it belongs to:
//! a peer (or anyone who can send UDP to port 4789) cannot reach a container of another
//! network by picking the destination address.

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::{DropReason, Hook};

use crate::{
    drop,
    eth::{ETH_HLEN, ETH_P_IP, EthHdr, ensure_linear, ptr_at},
    forward, ipv4, maps, tunnel,
};

#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    let vni = match tunnel::get_key(&ctx) {
        Ok(key) => key.tunnel_id,
        Err(_) => return drop::drop_packet(&ctx, DropReason::NoTunnelKey, Hook::FromOverlay, 0),
    };
    match try_from_overlay(&ctx, vni) {
        Ok(verdict) => verdict,
        Err(reason) => drop::drop_packet(&ctx, reason, Hook::FromOverlay, vni),
    }
}

/// The decision for a packet received with `vni`. Takes the VNI as a parameter so the
/// `from_overlay_test` hook can run it: BPF_PROG_TEST_RUN cannot attach tunnel metadata.
#[inline(always)]
pub fn try_from_overlay(ctx: &TcContext, vni: u32) -> Result<i32, DropReason> {
    ensure_linear(ctx, ETH_HLEN)?;
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 14 bytes are inside the linear packet data.
    let ether_type = unsafe { (*eth).ether_type };
    // Our nodes only tunnel IPv4 (ARP is answered locally on each node, never tunnelled).
    if ether_type != ETH_P_IP {
        return Err(DropReason::UnsupportedL3);
    }
    let addrs = ipv4::parse(ctx)?;
    let dst = match maps::endpoint(&addrs.dst) {
        Some(ep) if ep.is_local() => ep,
        // Absent, or remote: a node tunnels only to the node the endpoint is on, so a
        // remote endpoint here means stale state somewhere; never bounce it back out.
        _ => return Err(DropReason::UnknownEndpoint),
    };
    if dst.vni != vni {
        return Err(DropReason::WrongVni);
    }
    let config = maps::config()?;
    forward::to_local(ctx, &dst, config.router_mac)
}
