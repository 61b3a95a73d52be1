//! Connection tracking of balanced flows.
//!
//! Two tables, so that a flood of new connections can never push out established ones:
//!
//! - CT_NEW, an LRU hash, holds connections that have not proven themselves yet: a TCP
//!   connection from its SYN until the client's first packet after it (the handshake's ACK),
//!   a UDP flow until its first reply. A SYN flood churns this table only; when it is full
//!   the least recently used half-open entries make room.
//! - CONNTRACK, a plain hash, holds the rest: established TCP connections and answered UDP
//!   flows. Entries move here from CT_NEW ("promotion") and leave when the agent's garbage
//!   collector finds them idle past their timeout, or when their backend is removed. When it
//!   is full, promotion fails and the connection carries on from CT_NEW.

/// Default capacity of the CONNTRACK table (established connections). A balanced connection
/// uses two entries (forward and reverse), so this tracks 131072 connections. The agent sizes
/// it from `--ct-max`.
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;

/// Default capacity of the CT_NEW table (connections being set up); the agent sizes it from
/// `--ct-new-max`.
pub const CT_NEW_MAX_ENTRIES: u32 = 65_536;

/// [`CtKey::dir`] of an entry keyed by a packet from the client (client -> VIP or node
/// address).
pub const CT_DIR_ORIGINAL: u8 = 0;
/// [`CtKey::dir`] of an entry keyed by a reply (backend -> client).
pub const CT_DIR_REPLY: u8 = 1;

/// Key of the CONNTRACK map: the 5-tuple of a packet as it is seen where the entry is looked
/// up, plus the direction. Addresses and ports in network order.
///
/// `dir` keeps the two directions apart even if a tuple could read as both, and says which
/// [`CtKind`]s can be found under the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// IPv4 source.
    pub src_ip: [u8; 4],
    /// IPv4 destination.
    pub dst_ip: [u8; 4],
    /// TCP/UDP source port.
    pub src_port: [u8; 2],
    /// TCP/UDP destination port.
    pub dst_port: [u8; 2],
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// [`CT_DIR_ORIGINAL`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    /// Explicit padding, 0 (part of the hashed key: must be zeroed).
    pub _pad: [u8; 2],
}

impl CtKey {
    /// Source address.
    pub const fn src(&self) -> core::net::Ipv4Addr {
        let [a, b, c, d] = self.src_ip;
        core::net::Ipv4Addr::new(a, b, c, d)
    }

    /// Destination address.
    pub const fn dst(&self) -> core::net::Ipv4Addr {
        let [a, b, c, d] = self.dst_ip;
        core::net::Ipv4Addr::new(a, b, c, d)
    }

    /// Source port, host order.
    pub const fn sport(&self) -> u16 {
        u16::from_be_bytes(self.src_port)
    }

    /// Destination port, host order.
    pub const fn dport(&self) -> u16 {
        u16::from_be_bytes(self.dst_port)
    }
}

/// What a conntrack entry is for ([`CtEntry::kind`]). Where each kind lives and what its
/// fields mean:
///
/// | kind | node | key (dir) | `nat_ip:nat_port` | `tunnel_node`, `vni` |
/// |---|---|---|---|---|
/// | `VipForward` | client's | client -> VIP (original) | backend:port (DNAT to) | -, client's VNI |
/// | `VipReverse` | client's | backend -> client (reply; -> `HAIRPIN_SNAT_IP` for hairpin) | VIP:port (SNAT back to) | -, client's VNI |
/// | `MeshForward` | ingress | client -> node_ip:published (original) | backend:target (DNAT) | -, backend's VNI |
/// | `MeshReverse` | ingress | backend:target -> client (reply) | node_ip:published (SNAT) | -, backend's VNI |
/// | `MeshReturn` | backend's | backend:target -> client (reply) | - | ingress node, backend's VNI |
/// | `EgressForward` | container's | container -> server (original) | node_ip:nat port (SNAT to) | -, container's VNI |
/// | `EgressReverse` | container's | server -> node_ip:nat port (reply) | container:port (DNAT back to) | -, container's VNI |
///
/// Egress entries of ICMP echo carry the identifier as the port: the request's as source port
/// (destination port 0), the reply's as destination port (source port 0).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtKind {
    /// A connection from a container to a service VIP, on the client's node.
    VipForward = 1,
    /// The replies of a `VipForward` connection, delivered into the client with the VIP
    /// restored as source.
    VipReverse = 2,
    /// A connection from outside to a published port, on the node it arrived at.
    MeshForward = 3,
    /// The replies of a `MeshForward` connection, sent out of the uplink with
    /// `node_ip:published port` restored as source.
    MeshReverse = 4,
    /// On the backend's node: replies of a routing-mesh connection go back through the tunnel
    /// to the ingress node (`tunnel_node`) with `vni`.
    MeshReturn = 5,
    /// A flow from a container to an address outside every overlay network, leaving with the
    /// node's address and a port allocated for it.
    EgressForward = 6,
    /// The replies of an `EgressForward` flow, delivered into the container with its address
    /// and port restored as destination.
    EgressReverse = 7,
}

impl CtKind {
    /// Decodes [`CtEntry::kind`].
    pub const fn from_code(code: u8) -> Option<CtKind> {
        Some(match code {
            1 => CtKind::VipForward,
            2 => CtKind::VipReverse,
            3 => CtKind::MeshForward,
            4 => CtKind::MeshReverse,
            5 => CtKind::MeshReturn,
            6 => CtKind::EgressForward,
            7 => CtKind::EgressReverse,
            _ => return None,
        })
    }
}

/// Set in [`CtEntry::flags`] of a forward TCP entry once the client sent FIN or RST: a SYN on
/// the same tuple afterwards is a new connection (port reuse) and is balanced anew instead of
/// sticking to the old backend, unless it carries the sequence number of the SYN that created
/// the entry ([`CtEntry::syn_seq`]): that is a retransmission of the same connection's SYN,
/// which keeps its backend.
///
/// (The RST can come before the connection exists: a backend socket in TIME_WAIT for the same
/// client address and port, e.g. from that client's connection through another node's
/// published port, answers a SYN it takes for an old duplicate with an ACK; the client
/// answers that with a RST, which ends the TIME_WAIT, and soon retransmits the same SYN.
/// Balancing the retransmission anew would spend a second round-robin slot on one
/// connection.)
pub const CT_F_CLOSING: u8 = 1 << 0;

/// Set in [`CtEntry::flags`] of both entries of a hairpin VIP connection (the client was
/// balanced to itself): the forward direction also rewrites the source to
/// [`HAIRPIN_SNAT_IP`], and the reverse entry is keyed backend:port -> `HAIRPIN_SNAT_IP`:port
/// (the client and backend being the same address).
pub const CT_F_HAIRPIN: u8 = 1 << 1;

/// Set in [`CtEntry::flags`] of a `MeshReturn` entry whose ingress node sent the connection
/// through the WireGuard tunnel (an encrypted network): `tunnel_node` is that node's tunnel
/// address and replies go back through the tunnel too.
pub const CT_F_ENCRYPTED: u8 = 1 << 2;

/// Value of the CONNTRACK map (see [`CtKind`] for the meaning of the fields per kind).
///
/// Idle expiry: an entry whose `last_seen_ns` is older than the protocol's timeout in
/// [`Config`] counts as absent (a forward one is replaced by a new balancing decision).
/// Programs refresh `last_seen_ns` at most a few times per timeout period (at most once a
/// second) and always for both entries of a pair, so a one-way stream keeps its replies'
/// entry alive too. The LRU evicts the least recently used entries when the map is full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) when the flow was last seen.
    pub last_seen_ns: u64,
    /// Address to rewrite to (see [`CtKind`]), network order.
    pub nat_ip: [u8; 4],
    /// Port to rewrite to, network order.
    pub nat_port: [u8; 2],
    /// [`CtKind`] code.
    pub kind: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// `MeshReturn`: the ingress node to tunnel replies to (network order); else 0.
    pub tunnel_node: [u8; 4],
    /// VNI of the flow's network (see [`CtKind`]).
    pub vni: u32,
    /// Backend set the flow was balanced over (0 for `MeshReturn`, which is not balanced on
    /// that node).
    pub service_id: u32,
    /// Forward TCP entries created by a SYN: that SYN's sequence number, as the raw 4 bytes of
    /// the header read as a native u32 (compared for equality only; see [`CT_F_CLOSING`]).
    /// 0 otherwise (unknown; an ISN of 0 is then treated as a new connection).
    pub syn_seq: u32,
}

impl CtEntry {
    /// [`CtEntry::nat_ip`] as an address.
    pub const fn nat_addr(&self) -> core::net::Ipv4Addr {
        let [a, b, c, d] = self.nat_ip;
        core::net::Ipv4Addr::new(a, b, c, d)
    }

    /// [`CtEntry::nat_port`], host order.
    pub const fn nat_port(&self) -> u16 {
        u16::from_be_bytes(self.nat_port)
    }

    /// [`CtEntry::tunnel_node`] as an address.
    pub const fn tunnel_addr(&self) -> core::net::Ipv4Addr {
        let [a, b, c, d] = self.tunnel_node;
        core::net::Ipv4Addr::new(a, b, c, d)
    }
}
