//! IPv4 header parsing.

use aya_ebpf::programs::TcContext;
use dataplane_common::DropReason;

use crate::{
    csum::{fold, sum_words},
    eth::{ETH_HLEN, ensure_linear, ptr_at},
};

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

/// What routing and load balancing decide on, copied out of the header. Addresses are
/// network-order octets (the ENDPOINTS key format).
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// IP protocol number.
    pub proto: u8,
    /// Header length in bytes (20..=60): the L4 header starts at `ETH_HLEN + hdr_len`.
    pub hdr_len: usize,
    /// Flags and fragment offset, host order.
    frag: u16,
}

/// More-fragments flag and fragment-offset mask of `frag_off` (host order).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

impl Ipv4 {
    /// Part of a fragmented datagram (first or later fragment).
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.frag & (IP_MF | IP_OFFSET) != 0
    }

    /// A fragment other than the first: it carries no L4 header.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.frag & IP_OFFSET != 0
    }
}

/// Checks that an IPv4 header follows the Ethernet header and is sane enough to route, and
/// returns what the programs decide on. Only the fixed header is made linear: plain routing
/// needs nothing past it, and the load balancer pulls the L4 header itself (`l4::parse`).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Ipv4, DropReason> {
    ensure_linear(ctx, ETH_HLEN + IPV4_HLEN)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: `ptr_at` checked that the whole header lies inside the linear packet data.
    let ip = unsafe { &*ip };
    let version_ihl = ip.version_ihl;
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        return Err(DropReason::Malformed);
    }
    Ok(Ipv4 {
        src: ip.saddr,
        dst: ip.daddr,
        proto: ip.protocol,
        // Masked so the verifier sees the bound (20..=60) it needs for offsets built on it.
        hdr_len: usize::from(version_ihl & 0x0f) << 2,
        frag: u16::from_be_bytes(ip.frag_off),
    })
}

/// Limited broadcast or multicast (224.0.0.0/4). Subnet-directed broadcasts are not caught
/// here: they are simply addresses no endpoint has.
#[inline(always)]
pub fn is_broadcast_or_multicast(addr: [u8; 4]) -> bool {
    addr[0] & 0xf0 == 0xe0 || addr == [0xff; 4]
}

/// IPv4 "don't fragment".
const IP_DF: [u8; 2] = [0x40, 0];
/// The TTL of locally generated packets (Linux's default).
const TTL: u8 = 64;

/// The header of a packet the programs build themselves (a reset, a VXLAN outer header): no
/// options, DF (they fit the path by construction), id 0, TTL 64, its checksum filled in.
#[inline(always)]
pub fn header(protocol: u8, tot_len: u16, saddr: [u8; 4], daddr: [u8; 4]) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: tot_len.to_be_bytes(),
        id: [0; 2],
        frag_off: IP_DF,
        ttl: TTL,
        protocol,
        check: [0; 2],
        saddr,
        daddr,
    };
    // SAFETY: a plain byte struct; viewing it as bytes is always valid.
    let bytes: &[u8; IPV4_HLEN] = unsafe { &*(&raw const ip).cast() };
    ip.check = fold(sum_words(bytes));
    ip
}
