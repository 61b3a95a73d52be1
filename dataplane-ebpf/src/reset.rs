//! TCP resets sent by the datapath itself.
//!
//! A container's TCP packet to a VIP that belongs to no tracked connection (its backend was
//! removed, or the entry went idle) cannot be balanced: a new backend would not know the
//! connection. Dropping it would leave the client retransmitting until its own timeout;
//! instead the packet is turned into the RST the VIP would have sent (RFC 9293 3.10.7.1: for a
//! segment with ACK, `<SEQ=SEG.ACK><CTL=RST>`, else `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`)
//! and sent straight back into the sender, so the application fails fast.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use dataplane_common::{DropReason, IPPROTO_TCP};

use crate::csum::{fold, sum_words};
use crate::verdict::subprogram;
use crate::{
    eth::{ETH_HLEN, ETH_P_IP, EthHdr, ensure_linear, ifindex, ptr_at},
    ipv4::{self, IPV4_HLEN, Ipv4, Ipv4Hdr},
    l4::{L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpHdr},
    verdict::TC_ACT_REDIRECT,
};

const TCP_HLEN: usize = 20;
/// The whole reset: Ethernet, IPv4 without options, TCP without options.
const RST_LEN: usize = ETH_HLEN + IPV4_HLEN + TCP_HLEN;

/// Whether [`to_sender`] can answer this TCP packet: not a RST itself (never answered), and
/// no IPv4 options (the reset is built in place of a 20-byte header).
#[inline(always)]
pub fn can_answer(ip: &Ipv4, l4: &L4) -> bool {
    ip.proto == IPPROTO_TCP && ip.hdr_len == IPV4_HLEN && l4.tcp_flags & TCP_RST == 0
}

/// Rewrites the TCP packet `ip` from a local container into the reset its destination would
/// answer and redirects it back out of the veth it came in on. `router_mac` is the reset's
/// Ethernet source. Packets this cannot answer (a RST itself, IPv4 options) are dropped as
/// `NoConntrack` by the caller.
#[inline(always)]
pub fn to_sender(ctx: &TcContext, ip: &Ipv4, router_mac: [u8; 6]) -> Result<i32, DropReason> {
    if ip.proto != IPPROTO_TCP || ip.hdr_len != IPV4_HLEN {
        return Err(DropReason::NoConntrack);
    }
    ensure_linear(ctx, RST_LEN)?;
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let iph: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    let tcph: *const TcpHdr = ptr_at(ctx, ETH_HLEN + IPV4_HLEN)?;
    // SAFETY: `ptr_at` checked all three headers lie inside the linear packet data; the
    // fields are copied out before the packet changes.
    let (sender_mac, tot_len, tcp) = unsafe { ((*eth).src, (*iph).tot_len, *tcph) };
    if tcp.flags & TCP_RST != 0 {
        return Err(DropReason::NoConntrack);
    }
    let header_len = IPV4_HLEN as u32 + u32::from(tcp.doff_res >> 4) * 4;
    let mut seg_len = u32::from(u16::from_be_bytes(tot_len)).saturating_sub(header_len);
    if tcp.flags & TCP_SYN != 0 {
        seg_len += 1;
    }
    if tcp.flags & TCP_FIN != 0 {
        seg_len += 1;
    }
    let (seq, ack, flags) = if tcp.flags & TCP_ACK != 0 {
        (tcp.ack_seq, [0; 4], TCP_RST)
    } else {
        let next = u32::from_be_bytes(tcp.seq).wrapping_add(seg_len);
        ([0; 4], next.to_be_bytes(), TCP_RST | TCP_ACK)
    };

    let rst_ip = ipv4::header(IPPROTO_TCP, (IPV4_HLEN + TCP_HLEN) as u16, ip.dst, ip.src);
    let mut rst_tcp = TcpHdr {
        source: tcp.dest,
        dest: tcp.source,
        seq,
        ack_seq: ack,
        doff_res: (TCP_HLEN as u8 / 4) << 4,
        flags,
        window: [0; 2],
        check: [0; 2],
        urg_ptr: [0; 2],
    };
    // SAFETY: a plain byte struct; viewing it as bytes is always valid.
    let tcp_bytes: &[u8; TCP_HLEN] = unsafe { &*(&raw const rst_tcp).cast() };
    let pseudo = sum_words(&ip.dst) + sum_words(&ip.src) + u32::from(IPPROTO_TCP) + TCP_HLEN as u32;
    rst_tcp.check = fold(pseudo + sum_words(tcp_bytes));

    // Payload and options go; the headers are rewritten in place.
    // SAFETY: the context's skb pointer, a length and no flags.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RST_LEN as u32, 0) } != 0 {
        return Err(DropReason::Internal);
    }
    ensure_linear(ctx, RST_LEN)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let iph: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    let tcph: *mut TcpHdr = ptr_at(ctx, ETH_HLEN + IPV4_HLEN)?;
    // SAFETY: `ptr_at` checked the 54 bytes lie inside the linear, writable packet data.
    unsafe {
        *eth = EthHdr {
            dst: sender_mac,
            src: router_mac,
            ether_type: ETH_P_IP,
        };
        *iph = rst_ip;
        *tcph = rst_tcp;
    }
    // Out of the host side of the veth, i.e. into the container that sent it.
    // SAFETY: plain helper call with scalar arguments.
    let verdict = unsafe { bpf_redirect(ifindex(ctx), 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(DropReason::Internal);
    }
    Ok(TC_ACT_REDIRECT)
}

subprogram! {
    /// `from_container`, for a TCP packet a subprogram found no tracked connection for (to a VIP,
    /// or of an egress flow that went idle): the container's socket gets a reset at once
    /// instead of retransmitting into nothing, and the drop is counted as `no_conntrack`. A
    /// subprogram of its own, called from `from_container` rather than from the subprograms that
    /// find no connection, so their frames and `drop::report`'s never add up.
    pub fn unknown_connection => try_unknown_connection(
        ctx: &TcContext,
        ip: &Ipv4,
        vni: u32,
        router_mac: [u8; 6],
    )
}

#[inline(always)]
fn try_unknown_connection(
    ctx: &TcContext,
    ip: &Ipv4,
    vni: u32,
    router_mac: [u8; 6],
) -> Result<i32, DropReason> {
    let l4 = crate::l4::parse(ctx, ip)?;
    if !can_answer(ip, &l4) {
        return Err(DropReason::NoConntrack);
    }
    crate::drop::report(
        ctx,
        DropReason::NoConntrack,
        dataplane_common::Hook::FromContainer,
        vni,
    );
    to_sender(ctx, ip, router_mac)
}
