//! `from_overlay`: tc ingress (TCX) on the node's collect-metadata VXLAN device, i.e. every
//! packet another node tunnelled to us, already decapsulated: the data is the inner Ethernet
//! frame and the VNI and outer addresses are in the skb's tunnel metadata.
//!
//! A packet is accepted only from a node of the cluster (its outer source is in NODES), and
//! delivered only to a local endpoint of the network its VNI says it belongs to: a peer
//! cannot reach a container of another network by picking the destination address. Before delivery the load balancer gets its say
//! (`lb::on_overlay_delivery`: VIP replies get the VIP back, routing-mesh connections note
//! their ingress node). The only packets not for a local endpoint that are accepted are
//! replies of routing-mesh connections that came in through this node: they leave through
//! the uplink (`lb::overlay_to_outside`).

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::{DropReason, ENDPOINT_F_ENCRYPTED, Hook, NODE_F_TUNNEL_ADDR};

use crate::{
    drop,
    eth::{ETH_HLEN, ETH_P_IP, EthHdr, ensure_linear, ifindex, ptr_at},
    forward, ipv4, lb, maps, stats, tunnel,
};

#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    let (vni, remote) = match tunnel::get_key(&ctx) {
        // RX metadata: `remote_ipv4` is the outer source, host order (see `tunnel`).
        // SAFETY: reading a u32 out of a union of integers is always defined.
        Ok(key) => (
            key.tunnel_id,
            unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes(),
        ),
        Err(_) => return drop::drop_packet(&ctx, DropReason::NoTunnelKey, Hook::FromOverlay, 0),
    };
    // Attached to both VXLAN devices; which one it runs on says whether the packet came out
    // of the WireGuard tunnel.
    let encrypted = match maps::config() {
        Ok(c) => c.vxlan_enc_ifindex != 0 && ifindex(&ctx) == c.vxlan_enc_ifindex,
        Err(reason) => return drop::drop_packet(&ctx, reason, Hook::FromOverlay, vni),
    };
    let len = ctx.len();
    match try_from_overlay(&ctx, vni, remote, encrypted) {
        Ok(verdict) => stats::forwarded(&ctx, Hook::FromOverlay, verdict, vni, len),
        Err(reason) => drop::drop_packet(&ctx, reason, Hook::FromOverlay, vni),
    }
}

/// The decision for a packet received with `vni` from `remote` (network order), on the
/// plain VXLAN device or (`encrypted`) on the one fed by the WireGuard tunnel. Takes these as
/// parameters so the `from_overlay_test` hook can run it: BPF_PROG_TEST_RUN cannot attach
/// tunnel metadata.
///
/// On the plain device the outer source must be a node's advertise address, on the tunnel's a
/// node's tunnel address (the agent lets only packets from that peer's tunnel address out of
/// its tunnel). A packet for an endpoint of an encrypted network is delivered only from the
/// tunnel; in clear it is `Unencrypted`, whatever its VNI and source.
#[inline(always)]
pub fn try_from_overlay(
    ctx: &TcContext,
    vni: u32,
    remote: [u8; 4],
    encrypted: bool,
) -> Result<i32, DropReason> {
    // Only nodes of the cluster may send into the overlay (from_uplink also stops VXLAN from
    // other hosts before the VXLAN socket sees it; this holds whatever way a packet came in).
    match maps::node(&remote) {
        Some(n) if (n.flags & NODE_F_TUNNEL_ADDR != 0) == encrypted => {}
        _ => return Err(DropReason::UnknownNode),
    }
    ensure_linear(ctx, ETH_HLEN)?;
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 14 bytes are inside the linear packet data.
    let ether_type = unsafe { (*eth).ether_type };
    // Our nodes only tunnel IPv4 (ARP is answered locally on each node, never tunnelled).
    if ether_type != ETH_P_IP {
        return Err(DropReason::UnsupportedL3);
    }
    let ip = ipv4::parse(ctx)?;
    let dst = match maps::endpoint(&ip.dst) {
        Some(ep) if ep.is_local() => ep,
        // A remote endpoint: a node tunnels only to the node the endpoint is on, so this
        // means stale state somewhere; never bounce it back out.
        Some(_) => return Err(DropReason::UnknownEndpoint),
        None => return lb::overlay_to_outside(ctx, &ip, vni, encrypted, maps::config()?),
    };
    if dst.flags & ENDPOINT_F_ENCRYPTED != 0 && !encrypted {
        return Err(DropReason::Unencrypted);
    }
    if dst.vni != vni || (encrypted && dst.flags & ENDPOINT_F_ENCRYPTED == 0) {
        return Err(DropReason::WrongVni);
    }
    let config = maps::config()?;
    lb::on_overlay_delivery(ctx, &ip, vni, remote, encrypted, config)?;
    forward::to_local(ctx, &dst, config.router_mac)
}
