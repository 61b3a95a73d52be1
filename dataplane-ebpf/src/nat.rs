//! Address and port rewriting with incremental checksum updates.
//!
//! The kernel helpers do the checksum arithmetic and also keep the skb's checksum state right,
//! which a hand-written update could not: for CHECKSUM_PARTIAL packets (TCP/UDP sent by a
//! local container, checksum still to be completed by the NIC or the stack) the L4 field holds
//! only the pseudo-header sum, so an address change must update it (`BPF_F_PSEUDO_HDR`) but a
//! port change must not; for CHECKSUM_COMPLETE packets `skb->csum` must follow the pseudo
//! header change. `bpf_l4_csum_replace` knows both cases. The IPv4 header checksum has no
//! such state (it is always complete and not part of `skb->csum` coverage changes: the
//! address and checksum changes cancel out), so it is updated inline (RFC 1624), which saves
//! a helper call per rewrite.

use aya_ebpf::{bindings, programs::TcContext};
use dataplane_common::{DropReason, IPPROTO_UDP};

use crate::{
    eth::{ETH_HLEN, ptr_at},
    ipv4::Ipv4Hdr,
    l4::L4,
};

// The bindings' integer types for these differ between the architectures they were generated
// for (see verdict.rs).
#[allow(clippy::unnecessary_cast)]
const BPF_F_PSEUDO_HDR: u64 = bindings::BPF_F_PSEUDO_HDR as u64;
#[allow(clippy::unnecessary_cast)]
const BPF_F_MARK_MANGLED_0: u64 = bindings::BPF_F_MARK_MANGLED_0 as u64;

/// Offset of the L4 port fields relative to the L4 header.
const SPORT_OFF: usize = 0;
const DPORT_OFF: usize = 2;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Source address and port (reverse NAT of replies).
    Src,
    /// Destination address and port (balancing).
    Dst,
}

/// Rewrites the source or destination address and port of a TCP/UDP packet from
/// `old_ip:old_port` to `new_ip:new_port` (network order) and fixes the IPv4 header checksum
/// and the L4 checksum, pseudo header included.
///
/// UDP: a zero checksum means "none" and stays zero (`BPF_F_MARK_MANGLED_0`), and a computed
/// zero is written as 0xffff, as RFC 768 requires.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    l4: &L4,
    side: Side,
    old_ip: [u8; 4],
    new_ip: [u8; 4],
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> Result<(), DropReason> {
    // Stores first, while the pointers from the parse are still valid: the checksum helpers
    // below may reallocate the head and invalidate every packet pointer. They only need the
    // old and new values, not the bytes in the packet.
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: `ptr_at` checked the header is inside the linear, writable packet data.
    unsafe {
        match side {
            Side::Src => (*ip).saddr = new_ip,
            Side::Dst => (*ip).daddr = new_ip,
        }
        (*ip).check = csum_replace4((*ip).check, old_ip, new_ip);
    }
    let port_changes = old_port != new_port;
    // Bounded again (Ethernet + at most 60 bytes of IPv4 header): in a subprogram the offset
    // comes from the caller's stack, and the verifier no longer knows its range.
    let off = l4.off & 0x7f;
    if port_changes {
        let port_off = match side {
            Side::Src => off + SPORT_OFF,
            Side::Dst => off + DPORT_OFF,
        };
        let port: *mut [u8; 2] = ptr_at(ctx, port_off)?;
        // SAFETY: as above.
        unsafe { *port = new_port };
    }

    let mangled_0 = if l4.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    // The helpers take the old and new field as the integer whose memory bytes are the
    // field's bytes (they work on the network-order representation).
    let from_ip = u64::from(u32::from_ne_bytes(old_ip));
    let to_ip = u64::from(u32::from_ne_bytes(new_ip));
    let csum_off = l4.csum_off();
    ctx.l4_csum_replace(csum_off, from_ip, to_ip, BPF_F_PSEUDO_HDR | mangled_0 | 4)
        .map_err(|_| DropReason::Internal)?;
    if port_changes {
        let from_port = u64::from(u16::from_ne_bytes(old_port));
        let to_port = u64::from(u16::from_ne_bytes(new_port));
        ctx.l4_csum_replace(csum_off, from_port, to_port, mangled_0 | 2)
            .map_err(|_| DropReason::Internal)?;
    }
    Ok(())
}

/// The IPv4 header checksum `check` after a 32-bit field changed from `old` to `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'), in one's complement arithmetic over 16-bit
/// words). All values in network order.
#[inline(always)]
pub fn csum_replace4(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let word = |b: [u8; 4], i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let mut sum = u32::from(!u16::from_be_bytes(check));
    sum += word(old, 0) ^ 0xffff;
    sum += word(old, 2) ^ 0xffff;
    sum += word(new, 0);
    sum += word(new, 2);
    // Two folds bring any sum of five 16-bit words back into 16 bits.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}
