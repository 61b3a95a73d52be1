//! `from_container`: tc ingress (TCX) on the host side of each container veth, i.e. every frame
//! a container sends. For now: answer ARP, pass IPv4 on to the host stack, drop the rest.
//! The next step adds the routing decision for IPv4 (local endpoint, remote node, host).

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::{DropReason, Hook};

use crate::{
    arp, drop,
    eth::{ETH_HLEN, ETH_P_ARP, ETH_P_IP, EthHdr, ensure_linear, ptr_at},
    ipv4,
    verdict::TC_ACT_OK,
};

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    match try_from_container(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop::drop_packet(&ctx, reason, Hook::FromContainer),
    }
}

#[inline(always)]
fn try_from_container(ctx: &TcContext) -> Result<i32, DropReason> {
    ensure_linear(ctx, ETH_HLEN)?;
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 14 bytes are inside the linear packet data. Copy the
    // ethertype out: the helpers below may move the packet and invalidate `eth`.
    let ether_type = unsafe { (*eth).ether_type };
    match ether_type {
        ETH_P_ARP => arp::respond(ctx),
        ETH_P_IP => {
            ipv4::validate(ctx)?;
            Ok(TC_ACT_OK)
        }
        _ => Err(DropReason::UnsupportedL3),
    }
}
