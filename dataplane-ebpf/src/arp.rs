//! ARP responder: containers see the node as the router for every address, so any ARP request
//! they send is answered with the router MAC (proxy ARP, as Cilium does). Frames then reach
//! `from_container` addressed to the router MAC and are routed by IP, never bridged.

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use dataplane_common::DropReason;

use crate::verdict::subprogram;
use crate::{
    eth::{ETH_HLEN, EthHdr, ensure_linear, ifindex, ptr_at},
    maps,
    verdict::TC_ACT_REDIRECT,
};

const ARP_HRD_ETHER: [u8; 2] = 1u16.to_be_bytes();
const ARP_PRO_IP: [u8; 2] = 0x0800u16.to_be_bytes();
const ARP_OP_REQUEST: [u8; 2] = 1u16.to_be_bytes();
const ARP_OP_REPLY: [u8; 2] = 2u16.to_be_bytes();

/// ARP for Ethernet hardware and IPv4 protocol addresses (RFC 826), the only kind we handle.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ArpEthIpv4 {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub oper: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

pub const ARP_LEN: usize = 28;
const _: () = assert!(core::mem::size_of::<ArpEthIpv4>() == ARP_LEN);

/// Ethernet + ARP as one struct so a single bounds check covers the whole rewrite.
#[repr(C)]
struct ArpFrame {
    eth: EthHdr,
    arp: ArpEthIpv4,
}

subprogram! {
    /// Turns an ARP request into the reply from the router MAC, in place, and sends it back out of
    /// the interface it came in on (the host side of the veth, i.e. into the container). A
    /// subprogram: its locals stay out of `from_container`'s frame.
    pub fn respond => try_respond(ctx: &TcContext)
}

#[inline(always)]
fn try_respond(ctx: &TcContext) -> Result<i32, DropReason> {
    ensure_linear(ctx, ETH_HLEN + ARP_LEN)?;
    let frame: *mut ArpFrame = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that all 42 bytes lie inside the linear packet data, which is
    // writable for tc programs (the kernel unclones the skb before a writing program runs).
    let frame = unsafe { &mut *frame };
    let arp = &mut frame.arp;

    if arp.htype != ARP_HRD_ETHER || arp.ptype != ARP_PRO_IP || arp.hlen != 6 || arp.plen != 4 {
        return Err(DropReason::ArpInvalid);
    }
    if arp.oper != ARP_OP_REQUEST {
        return Err(DropReason::ArpUnsupportedOp);
    }
    // RFC 5227: a probe has sender 0.0.0.0, an announcement has sender == target. Answering
    // either would tell the container its own address is in use.
    if arp.spa == [0; 4] || arp.spa == arp.tpa {
        return Err(DropReason::ArpGratuitous);
    }

    let router_mac = maps::config()?.router_mac;

    let requester_mac = frame.eth.src;
    let requester_hw = arp.sha;
    let requester_ip = arp.spa;
    let target_ip = arp.tpa;

    frame.eth.dst = requester_mac;
    frame.eth.src = router_mac;
    arp.oper = ARP_OP_REPLY;
    arp.sha = router_mac;
    arp.spa = target_ip;
    arp.tha = requester_hw;
    arp.tpa = requester_ip;

    // Flags 0: transmit out of the device (egress), which on the host side of a veth delivers
    // the reply into the container. bpf_redirect only fails on bad flags, returning TC_ACT_SHOT.
    // SAFETY: plain helper call with scalar arguments.
    let verdict = unsafe { bpf_redirect(ifindex(ctx), 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::Internal);
    }
    Ok(TC_ACT_REDIRECT)
}
