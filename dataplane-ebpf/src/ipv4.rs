//! IPv4 header parsing.

use aya_ebpf::programs::TcContext;
use dataplane_common::DropReason;

use crate::eth::{ETH_HLEN, ensure_linear, ptr_at};

/// The fixed part of the IPv4 header (options, if any, follow it).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

pub const IPV4_HLEN: usize = 20;
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == IPV4_HLEN);

/// The addresses routing decides on, as network-order octets (the ENDPOINTS key format).
#[derive(Clone, Copy)]
pub struct Addrs {
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// Checks that an IPv4 header follows the Ethernet header and is sane enough to route, and
/// returns its addresses. Nothing past the fixed header is needed: routing is by address only
/// and no L3/L4 field is rewritten, so options and fragments pass untouched.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Addrs, DropReason> {
    ensure_linear(ctx, ETH_HLEN + IPV4_HLEN)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: `ptr_at` checked that the whole header lies inside the linear packet data.
    let ip = unsafe { &*ip };
    let version_ihl = ip.version_ihl;
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        return Err(DropReason::Malformed);
    }
    Ok(Addrs {
        src: ip.saddr,
        dst: ip.daddr,
    })
}

/// Limited broadcast or multicast (224.0.0.0/4). Subnet-directed broadcasts are not caught
/// here: they are simply addresses no endpoint has.
#[inline(always)]
pub fn is_broadcast_or_multicast(addr: [u8; 4]) -> bool {
    addr[0] & 0xf0 == 0xe0 || addr == [0xff; 4]
}
