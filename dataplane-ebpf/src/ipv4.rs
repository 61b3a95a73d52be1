//! IPv4 header parsing (validation only for now; routing comes with the endpoint maps).

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

/// Checks that an IPv4 header follows the Ethernet header and is sane enough to route.
#[inline(always)]
pub fn validate(ctx: &TcContext) -> Result<(), DropReason> {
    ensure_linear(ctx, ETH_HLEN + IPV4_HLEN)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: `ptr_at` checked that the whole header lies inside the linear packet data.
    let version_ihl = unsafe { (*ip).version_ihl };
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        return Err(DropReason::Malformed);
    }
    Ok(())
}
