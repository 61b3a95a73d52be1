//! TCP and UDP headers: the ports the load balancer keys on and the checksum it fixes.

use aya_ebpf::programs::TcContext;
use dataplane_common::{DropReason, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    eth::{ETH_HLEN, ensure_linear, ptr_at},
    ipv4::Ipv4,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
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
struct UdpHdr {
    source: [u8; 2],
    dest: [u8; 2],
    len: [u8; 2],
    check: [u8; 2],
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
        if self.proto == IPPROTO_TCP {
            self.off + TCP_CSUM_OFF
        } else {
            self.off + UDP_CSUM_OFF
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
