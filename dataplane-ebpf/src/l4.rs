//! TCP and UDP headers: the ports the load balancer keys on and the checksum it fixes.

use aya_ebpf::programs::TcContext;
use dataplane_common::{DropReason, IPPROTO_TCP, IPPROTO_UDP};

pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// The ICMP header before an error's quoted datagram, or an echo's data.
pub const ICMP_HLEN: usize = 8;
const ICMP_CSUM_OFF: usize = 2;

use crate::{
    eth::{ETH_HLEN, ensure_linear, ptr_at},
    ipv4::Ipv4,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// Offset of the checksum field in the TCP and UDP headers.
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;

/// The fixed TCP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    pub doff_res: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg_ptr: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<TcpHdr>() == TCP_HLEN);

/// The UDP header.
#[repr(C)]
pub struct UdpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<UdpHdr>() == UDP_HLEN);

/// What the load balancer needs of a TCP or UDP header, copied out of the packet.
#[derive(Clone, Copy)]
pub struct L4 {
    /// Offset of the L4 header from the start of the frame.
    pub off: usize,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Source port, network order.
    pub sport: [u8; 2],
    /// Destination port, network order.
    pub dport: [u8; 2],
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// TCP sequence number, the header's 4 bytes read as a native u32 (only ever compared for
    /// equality); 0 for UDP.
    pub seq: u32,
}

impl L4 {
    /// Offset of the checksum field from the start of the frame.
    #[inline(always)]
    pub fn csum_off(&self) -> usize {
        match self.proto {
            IPPROTO_TCP => self.off + TCP_CSUM_OFF,
            IPPROTO_ICMP => self.off + ICMP_CSUM_OFF,
            _ => self.off + UDP_CSUM_OFF,
        }
    }

    /// A TCP SYN without ACK: the first packet of a connection (or its retransmission).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A TCP FIN or RST: the sender is closing the connection.
    #[inline(always)]
    pub fn is_closing(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}

/// True for the protocols the load balancer handles.
#[inline(always)]
pub fn is_tcp_or_udp(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP
}

/// Parses the TCP or UDP header after `ip` (callers check the protocol with
/// [`is_tcp_or_udp`] and exclude later fragments first). A header cut short by the end of the
/// frame is `Malformed`.
#[inline(always)]
pub fn parse(ctx: &TcContext, ip: &Ipv4) -> Result<L4, DropReason> {
    let off = ETH_HLEN + ip.hdr_len;
    if ip.proto == IPPROTO_TCP {
        ensure_linear(ctx, off + TCP_HLEN)?;
        let tcp: *const TcpHdr = ptr_at(ctx, off)?;
        // SAFETY: `ptr_at` checked the 20 bytes lie inside the linear packet data.
        let tcp = unsafe { &*tcp };
        Ok(L4 {
            off,
            proto: IPPROTO_TCP,
            sport: tcp.source,
            dport: tcp.dest,
            tcp_flags: tcp.flags,
            seq: u32::from_ne_bytes(tcp.seq),
        })
    } else {
        ensure_linear(ctx, off + UDP_HLEN)?;
        let udp: *const UdpHdr = ptr_at(ctx, off)?;
        // SAFETY: `ptr_at` checked the 8 bytes lie inside the linear packet data.
        let udp = unsafe { &*udp };
        Ok(L4 {
            off,
            proto: IPPROTO_UDP,
            sport: udp.source,
            dport: udp.dest,
            tcp_flags: 0,
            seq: 0,
        })
    }
}

/// The ICMP header after `ip` (not a later fragment): its type, and for an echo request or
/// reply an `L4` whose "ports" are the identifier (the request's as source port, the reply's
/// as destination port, the other 0), so the egress table keys echoes like UDP.
#[inline(always)]
pub fn parse_icmp(ctx: &TcContext, ip: &Ipv4) -> Result<(u8, Option<L4>), DropReason> {
    let off = ETH_HLEN + ip.hdr_len;
    ensure_linear(ctx, off + ICMP_HLEN)?;
    let hdr: *const [u8; ICMP_HLEN] = ptr_at(ctx, off)?;
    // SAFETY: `ptr_at` checked the 8 bytes lie inside the linear packet data.
    let hdr = unsafe { *hdr };
    let id = [hdr[4], hdr[5]];
    let l4 = |sport, dport| L4 {
        off,
        proto: IPPROTO_ICMP,
        sport,
        dport,
        tcp_flags: 0,
        seq: 0,
    };
    let echo = match hdr[0] {
        ICMP_ECHO if hdr[1] == 0 => Some(l4(id, [0; 2])),
        ICMP_ECHO_REPLY if hdr[1] == 0 => Some(l4([0; 2], id)),
        _ => None,
    };
    Ok((hdr[0], echo))
}
