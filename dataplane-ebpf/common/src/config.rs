//! The node-wide config the agent writes and every program reads.

/// The only key of the CONFIG map.
pub const CONFIG_KEY: u32 = 0;

/// Set by the agent when it has written a complete [`Config`]. The programs refuse to answer
/// ARP until then, because a zeroed router MAC would poison the containers' neighbour caches.
pub const CONFIG_F_READY: u32 = 1 << 0;

/// Plain overlay traffic leaves through the VXLAN device (its tunnel key set by the program)
/// instead of being encapsulated by the program and sent out of the uplink, and arrives
/// through it too (`from_uplink` decapsulates nothing).
pub const CONFIG_F_DEVICE_ENCAP: u32 = 1 << 1;

/// Node-wide settings written by the agent, read by every program.
///
/// CONFIG is a hash map without preallocation rather than an array: an update of such a map
/// links a new element in place of the old one and frees the old one after an RCU grace
/// period, so a program that copies the value it looked up always gets one whole version,
/// never a mix of the old and new bytes (an array update is a memcpy over the live value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// MAC address the node's programs use as "the router": ARP replies to containers carry
    /// it, and every routed frame gets it as Ethernet source.
    pub router_mac: [u8; 6],
    /// Explicit padding so the layout has no uninitialised bytes (required for `Pod`).
    pub _pad: [u8; 2],
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// ifindex of the node's collect-metadata (`external`) VXLAN device, where traffic to
    /// remote endpoints is redirected after the tunnel key is set. 0 while the agent has not
    /// created it yet: remote destinations are then dropped as
    /// [`DropReason::NoTunnelDevice`].
    pub vxlan_ifindex: u32,
    /// The node's advertise address (network order): `from_uplink` balances packets to
    /// `node_ip:<published port>` and replies of those flows leave with it as source.
    /// 0.0.0.0 turns the routing mesh off (`from_uplink` passes everything).
    pub node_ip: [u8; 4],
    /// ifindex of the uplink (the device `node_ip` is on): replies of routing-mesh flows are
    /// sent out of it with `bpf_redirect_neigh`. 0: such replies are dropped as
    /// [`DropReason::NoUplink`].
    pub uplink_ifindex: u32,
    /// Idle timeout of established TCP connections in seconds (0 is read as the default,
    /// [`CT_TCP_TIMEOUT_DEFAULT_S`]).
    pub ct_tcp_timeout_s: u32,
    /// Idle timeout of UDP conntrack entries in seconds (0 is read as the default,
    /// [`CT_UDP_TIMEOUT_DEFAULT_S`]).
    pub ct_udp_timeout_s: u32,
    /// Idle timeout of a TCP connection whose handshake has not completed (SYN seen, no
    /// client ACK yet), seconds (0: [`CT_SYN_TIMEOUT_DEFAULT_S`]).
    pub ct_syn_timeout_s: u32,
    /// Idle timeout of a TCP connection after a FIN or RST, seconds (0:
    /// [`CT_CLOSE_TIMEOUT_DEFAULT_S`]).
    pub ct_close_timeout_s: u32,
    /// ifindex of the node's second collect-metadata VXLAN device, the one whose packets are
    /// routed into the WireGuard tunnel (encrypted networks). 0: no tunnel here, and traffic
    /// of encrypted networks to other nodes is dropped as [`crate::DropReason::NoTunnel`].
    pub vxlan_enc_ifindex: u32,
    /// The node's WireGuard UDP port (network order); 0 if none. Only nodes may send to it.
    pub wireguard_port: [u8; 2],
    /// Explicit padding.
    pub _pad2: [u8; 2],
    /// Source ports egress flows get on the node's address, first and last (host order). 0, 0:
    /// [`EGRESS_PORT_MIN_DEFAULT`]..=[`EGRESS_PORT_MAX_DEFAULT`].
    pub egress_port_min: u16,
    pub egress_port_max: u16,
}

/// Default egress source ports: above Linux's default ephemeral range (32768-60999), so a
/// translated flow never takes the tuple of a connection the node itself makes.
pub const EGRESS_PORT_MIN_DEFAULT: u16 = 61000;
pub const EGRESS_PORT_MAX_DEFAULT: u16 = 65535;

/// The `skb->mark` of packets a program sends back into the uplink's ingress (a container
/// reaching its own node's published port, and the replies): the only packets from outside
/// that may carry the node's address as source.
pub const REINJECT_MARK: u32 = 0x6e61_6567;

/// Default idle timeout of a TCP connection (6 hours). IPVS, behind Docker's VIPs, forgets an
/// idle established connection after 900 s, which silently breaks long-lived idle
/// connections (database pools, ...); ours outlives the usual TCP keepalive of 2 hours.
pub const CT_TCP_TIMEOUT_DEFAULT_S: u32 = 21_600;

/// Default idle timeout of a UDP flow (5 minutes).
pub const CT_UDP_TIMEOUT_DEFAULT_S: u32 = 300;

/// Default idle timeout of a half-open TCP connection (Cilium's and Linux's 60 s).
pub const CT_SYN_TIMEOUT_DEFAULT_S: u32 = 60;

/// Default idle timeout of a closing TCP connection (Cilium's 10 s): long enough for the
/// last ACKs and a retransmitted FIN, short enough that closed connections do not pile up.
pub const CT_CLOSE_TIMEOUT_DEFAULT_S: u32 = 10;

impl Config {
    /// True once the agent has written the config (see [`CONFIG_F_READY`]).
    #[inline(always)]
    pub const fn is_ready(&self) -> bool {
        self.flags & CONFIG_F_READY != 0
    }
}
