//! `from_container`: tc ingress (TCX) on the host side of each container veth, i.e. every frame
//! a container sends. ARP is answered (proxy ARP, see `arp`), IPv4 is routed over the overlay,
//! everything else is dropped.
//!
//! IPv4 routing, in order:
//! 1. anti-spoofing: the source must be a local endpoint attached to the veth the frame came
//!    in on. Everything after trusts the source's network (VNI), so this is what makes
//!    isolation hold even against a container with a hand-written route or address;
//! 2. a service VIP (SERVICES) of the sender's network: balanced to a backend (`lb::to_vip`),
//!    then routed as in 3;
//! 3. the destination endpoint (ENDPOINTS): same network -> deliver locally (replies of VIP
//!    connections get the VIP back as source first) or tunnel to its node; other network ->
//!    `policy_isolation`;
//! 4. no endpoint: the subnet (NETWORKS) says why: own subnet -> `unknown_endpoint`, another
//!    network's -> `policy_isolation`; none -> a reply to a routing-mesh client goes back the
//!    way its connection came, and a hairpin VIP reply back into its sender
//!    (`lb::to_outside`); anything else is the container's own traffic to the outside world
//!    (`egress`: masquerade, or the node's own address).

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::{DropReason, ENDPOINT_F_REPLICA, Hook};

use crate::{
    arp, drop, egress,
    eth::{ETH_HLEN, ETH_P_ARP, ETH_P_IP, EthHdr, ensure_linear, ifindex, ptr_at},
    forward, ipv4, lb, maps, reset, stats,
};

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    // As it came in: encapsulation for another node adds to it.
    let len = ctx.len();
    match try_from_container(&ctx) {
        Ok(verdict) => stats::forwarded(&ctx, Hook::FromContainer, verdict, 0, len),
        Err(reason) => drop::drop_packet(&ctx, reason, Hook::FromContainer, 0),
    }
}

/// The whole decision; also run by the `from_container_test` hook.
#[inline(always)]
pub fn try_from_container(ctx: &TcContext) -> Result<i32, DropReason> {
    ensure_linear(ctx, ETH_HLEN)?;
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 14 bytes are inside the linear packet data. Copy the
    // ethertype out: the helpers below may move the packet and invalidate `eth`.
    let ether_type = unsafe { (*eth).ether_type };
    match ether_type {
        ETH_P_ARP => arp::respond(ctx),
        ETH_P_IP => route_ipv4(ctx),
        _ => Err(DropReason::UnsupportedL3),
    }
}

#[inline(always)]
fn route_ipv4(ctx: &TcContext) -> Result<i32, DropReason> {
    let ip = ipv4::parse(ctx)?;

    // 1. Anti-spoofing. A remote endpoint's address arriving on a veth is as spoofed as an
    // unknown one; so is a local endpoint's on another container's veth.
    let src = match maps::endpoint(&ip.src) {
        Some(src) if src.is_local() && src.ifindex == ifindex(ctx) => src,
        _ => return Err(DropReason::SourceSpoofed),
    };
    let vni = src.vni;
    if ipv4::is_broadcast_or_multicast(ip.dst) {
        return Err(DropReason::BroadcastMulticast);
    }
    let config = maps::config()?;

    // 2. Service VIP.
    if let Some(svc) = maps::service(&ip.dst) {
        if svc.vni != vni {
            return Err(DropReason::PolicyIsolation);
        }
        return match lb::to_vip(ctx, &ip, &svc, config) {
            Err(DropReason::NoConntrack) => {
                reset::unknown_connection(ctx, &ip, vni, config.router_mac)
            }
            verdict => verdict,
        };
    }

    // 3. Known endpoint.
    if let Some(dst) = maps::endpoint(&ip.dst) {
        if dst.vni != vni {
            return Err(DropReason::PolicyIsolation);
        }
        if !dst.is_local() {
            return forward::to_node(ctx, &dst, config);
        }
        // Delivery into the client of a VIP connection whose backend is on this node: only a
        // replica's packet can be such a reply.
        if src.flags & ENDPOINT_F_REPLICA != 0
            && let Some(l4) = lb::balanced_l4(ctx, &ip)?
        {
            lb::reverse_vip(ctx, &ip, &l4, config)?;
        }
        return forward::to_local(ctx, &dst, config.router_mac);
    }

    // 4. Not an endpoint: only the reason differs, unless it is a routing-mesh reply.
    match maps::network_of(ip.dst) {
        Some(net) if net.vni == vni => Err(DropReason::UnknownEndpoint),
        Some(_) => Err(DropReason::PolicyIsolation),
        None => match lb::to_outside(ctx, &ip, &src, config)? {
            lb::NOT_A_REPLY => match egress::from_container(ctx, &ip, &src, config) {
                Err(DropReason::NoConntrack) => {
                    reset::unknown_connection(ctx, &ip, vni, config.router_mac)
                }
                verdict => verdict,
            },
            verdict => Ok(verdict),
        },
    }
}
