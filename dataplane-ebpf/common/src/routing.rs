//! Routing state: endpoints (ENDPOINTS), overlay networks (NETWORKS), nodes (NODES).

/// Key of the ENDPOINTS map: the endpoint's IPv4 address as the four octets in network order
/// (`Ipv4Addr::octets()`; the bytes as they appear in the IPv4 header), so the programs look
/// up the header bytes without any conversion.
///
/// One key space for the whole cluster: overlay subnets never overlap across networks (the
/// control plane guarantees it), so an address alone identifies an endpoint.
pub type EndpointKey = [u8; 4];

/// Capacity of the ENDPOINTS map (local and remote endpoints of every network this node has
/// endpoints on).
pub const ENDPOINTS_MAX_ENTRIES: u32 = 65536;

/// Set in [`EndpointInfo::flags`] for endpoints on this node. Redundant with `ifindex != 0`
/// on purpose (an entry says what it is when dumped); the agent's `upsert_endpoint` rejects
/// entries where the two disagree, and the programs decide by `ifindex`.
pub const ENDPOINT_F_LOCAL: u16 = 1 << 0;

/// Set in [`EndpointInfo::flags`] for endpoints of `--opt encrypted` networks: traffic to a
/// remote one goes through the node tunnel only, and traffic to a local one is accepted only
/// from the tunnel.
pub const ENDPOINT_F_ENCRYPTED: u16 = 1 << 1;

/// Set in [`EndpointInfo::flags`] for endpoints of `--internal` networks: no egress.
pub const ENDPOINT_F_INTERNAL: u16 = 1 << 2;

/// Set in [`EndpointInfo::flags`] for replicas of a service (ready or not): only their
/// packets can be replies of VIP connections, so only theirs are looked up in conntrack on
/// local delivery. Every other container-to-container packet skips that lookup.
pub const ENDPOINT_F_REPLICA: u16 = 1 << 3;

/// All `ENDPOINT_F_*` bits this build knows.
pub const ENDPOINT_F_ALL: u16 =
    ENDPOINT_F_LOCAL | ENDPOINT_F_ENCRYPTED | ENDPOINT_F_INTERNAL | ENDPOINT_F_REPLICA;

/// An endpoint (container interface) of an overlay network, local or on another node.
///
/// Local: `ifindex` != 0, `node_ip` == 0, `ENDPOINT_F_LOCAL` set. Remote: `ifindex` == 0,
/// `node_ip` != 0, `ENDPOINT_F_LOCAL` clear. Use [`Self::local`] / [`Self::remote`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// VXLAN network identifier of the endpoint's network (24 bits used, 0 is invalid).
    pub vni: u32,
    /// Local endpoint: ifindex of the host side of its veth (traffic for the endpoint is
    /// `bpf_redirect_peer`ed there; traffic from it must arrive there). 0 for remote endpoints.
    pub ifindex: u32,
    /// Remote endpoint: address of the node it runs on (outer destination of the VXLAN
    /// packet) in **network byte order** (`__be32`: the u32's bytes in memory are the octets;
    /// convert with [`node_ip_to_abi`] / [`node_ip_from_abi`]). 0 for local endpoints.
    pub node_ip: u32,
    /// The endpoint's own MAC address: Ethernet destination of frames delivered to it.
    pub mac: [u8; 6],
    /// `ENDPOINT_F_*` bits.
    pub flags: u16,
}

/// [`EndpointInfo::node_ip`] for `addr` (network byte order).
pub const fn node_ip_to_abi(addr: core::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The address stored in [`EndpointInfo::node_ip`].
pub const fn node_ip_from_abi(node_ip: u32) -> core::net::Ipv4Addr {
    let [a, b, c, d] = node_ip.to_ne_bytes();
    core::net::Ipv4Addr::new(a, b, c, d)
}

impl EndpointInfo {
    /// An endpoint on this node behind the veth whose host side is `ifindex`.
    pub const fn local(vni: u32, ifindex: u32, mac: [u8; 6]) -> Self {
        Self {
            vni,
            ifindex,
            node_ip: 0,
            mac,
            flags: ENDPOINT_F_LOCAL,
        }
    }

    /// An endpoint on the node with address `node`.
    pub const fn remote(vni: u32, node: core::net::Ipv4Addr, mac: [u8; 6]) -> Self {
        Self {
            vni,
            ifindex: 0,
            node_ip: node_ip_to_abi(node),
            mac,
            flags: 0,
        }
    }

    /// True if the endpoint is on this node.
    #[inline(always)]
    pub const fn is_local(&self) -> bool {
        self.ifindex != 0
    }

    /// The node a remote endpoint is on (0.0.0.0 for local ones).
    pub const fn node_addr(&self) -> core::net::Ipv4Addr {
        node_ip_from_abi(self.node_ip)
    }
}

/// Capacity of the NETWORKS trie (overlay networks known to the node).
pub const NETWORKS_MAX_ENTRIES: u32 = 4096;

/// Set in [`NetworkInfo::flags`] for `--opt encrypted` networks (the datapath decides by
/// [`ENDPOINT_F_ENCRYPTED`]; this says what the network is when dumped).
pub const NETWORK_F_ENCRYPTED: u32 = 1 << 0;

/// Set in [`NetworkInfo::flags`] for `--internal` networks (the datapath decides by
/// [`ENDPOINT_F_INTERNAL`]).
pub const NETWORK_F_INTERNAL: u32 = 1 << 1;
/// Every network flag; anything else in [`NetworkInfo::flags`] is refused.
pub const NETWORK_F_ALL: u32 = NETWORK_F_ENCRYPTED | NETWORK_F_INTERNAL;

/// An overlay network, the value of the NETWORKS LPM trie.
///
/// The trie key is the kernel's LPM key: `prefix_len: u32` (host order, 0..=32) followed by
/// the subnet's four octets in network order, 8 bytes packed (`aya::maps::lpm_trie::Key<[u8;
/// 4]>` / `aya_ebpf::maps::lpm_trie::Key<[u8; 4]>`). Host bits of the address are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetworkInfo {
    /// VXLAN network identifier of the network.
    pub vni: u32,
    /// `NETWORK_F_*` bits.
    pub flags: u32,
}

/// Largest VXLAN network identifier (the VNI field is 24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// Capacity of the NODES map (nodes of the cluster).
pub const NODES_MAX_ENTRIES: u32 = 4096;

/// Key of the NODES map: a node's advertise address, or its address on the WireGuard tunnel
/// devices ([`NODE_F_TUNNEL_ADDR`]), four network-order octets.
pub type NodeKey = [u8; 4];

/// Set in [`NodeInfo::flags`] of the entry keyed by a node's tunnel address: packets with that
/// outer source came out of the WireGuard tunnel from that node.
pub const NODE_F_TUNNEL_ADDR: u32 = 1 << 0;

/// All `NODE_F_*` bits this build knows.
pub const NODE_F_ALL: u32 = NODE_F_TUNNEL_ADDR;

/// Value of the NODES map: a node of the cluster. Only overlay packets whose outer source is a
/// node are accepted (`from_overlay`), and only nodes may send VXLAN or WireGuard to this
/// node's uplink (`from_uplink`): anyone else who can reach UDP 4789 could otherwise inject
/// frames into any network.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    /// `NODE_F_*` bits.
    pub flags: u32,
    /// The node's tunnel address (network order): where VXLAN of encrypted networks to it is
    /// sent, through the WireGuard tunnel. 0.0.0.0: no tunnel to it (yet); such traffic is
    /// dropped, never sent in clear.
    pub tunnel_ip: [u8; 4],
}
