//! Drop accounting: reason codes, hooks, the counters and the event record.

/// Number of slots of the DROP_COUNTERS per-CPU array. Larger than the number of reasons on
/// purpose: see the crate docs.
pub const DROP_COUNTERS_MAX_ENTRIES: u32 = 128;

/// DROP_BY_HOOK: the same counters per hook, at `hook * DROP_COUNTERS_MAX_ENTRIES + reason`
/// (hook codes below [`DROP_BY_HOOK_HOOKS`]).
pub const DROP_BY_HOOK_HOOKS: u32 = 8;
pub const DROP_BY_HOOK_MAX_ENTRIES: u32 = DROP_BY_HOOK_HOOKS * DROP_COUNTERS_MAX_ENTRIES;

/// Slot 0 of DROP_COUNTERS is not a drop reason: it counts drop events that were not pushed,
/// because the ring buffer was full or the CPU was over [`DROP_EVENTS_PER_SEC`] (the packet
/// itself is still counted under its reason).
pub const DROP_COUNTER_EVENTS_LOST: u32 = 0;

/// Drop events each CPU may push per second: a flood of drops costs the agent at most this
/// many records per CPU to read, whatever the packet rate; the rest are counted as lost.
pub const DROP_EVENTS_PER_SEC: u64 = 1000;

/// Byte size of the DROP_EVENTS ring buffer. Must be a power-of-two multiple of the page size;
/// 256 KiB holds about 4000 events, enough to ride out a burst while the agent is busy.
pub const DROP_EVENTS_BYTE_SIZE: u32 = 256 * 1024;

/// Why a program dropped a packet. The discriminant is the wire code used as the DROP_COUNTERS
/// index and in [`DropEvent::reason`]; codes are stable (append only, never reuse).
///
/// Codes 1..=15 are generic parsing/infrastructure reasons, 16..=31 ARP, 32..=47 routing
/// (endpoint lookups, isolation, tunnels), 48..=63 load balancing (services, conntrack, mesh),
/// 64.. egress (the outside world).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The frame is shorter than the headers it claims (truncated Ethernet, ARP or IPv4
    /// header), or an IPv4 header is nonsensical (version != 4, IHL < 5).
    Malformed = 1,
    /// Ethertype the overlay does not carry (IPv6, VLAN tags, LLDP, ...).
    UnsupportedL3 = 2,
    /// The agent has not written the config yet (no router MAC to answer with).
    NotReady = 3,
    /// A kernel helper failed (e.g. `bpf_skb_pull_data` could not linearise the headers).
    Internal = 4,
    /// ARP that is not Ethernet/IPv4 (hardware type, protocol type or address lengths).
    ArpInvalid = 16,
    /// ARP operation other than request (replies, RARP): nobody on the node ARPs containers.
    ArpUnsupportedOp = 17,
    /// Gratuitous ARP or an address-conflict probe (sender IP 0.0.0.0 or equal to the target).
    /// Never answered: a reply would make the container believe its address is taken.
    ArpGratuitous = 18,
    /// IPv4 from a container whose source address is not a local endpoint attached to the
    /// interface the packet came in on (spoofed, or the endpoint is not installed yet).
    /// This check is what keeps isolation intact against a hand-written route or address.
    SourceSpoofed = 32,
    /// The destination belongs to another overlay network than the source (an endpoint or a
    /// subnet of another network). Networks are isolated from each other.
    PolicyIsolation = 33,
    /// The destination is not a known endpoint: in `from_container` an address of the
    /// sender's own subnet that no endpoint has; in `from_overlay` an address that is not a
    /// local endpoint of this node.
    UnknownEndpoint = 34,
    /// The destination is outside every overlay network and the packet cannot leave: it is
    /// not TCP, UDP or an ICMP echo request (egress translates only those), or is a later
    /// fragment.
    NoRoute = 35,
    /// IPv4 broadcast (255.255.255.255) or multicast (224.0.0.0/4) destination: the overlay
    /// is unicast only, like Docker's.
    BroadcastMulticast = 36,
    /// The destination is on another node but the config has no VXLAN device yet
    /// (`vxlan_ifindex` 0).
    NoTunnelDevice = 37,
    /// `from_overlay` found no tunnel metadata on the packet (the device is not in
    /// collect-metadata mode, or the program is attached to the wrong device).
    NoTunnelKey = 38,
    /// A VXLAN packet whose VNI is not the network of its destination endpoint.
    WrongVni = 39,
    /// An overlay packet whose outer source is not a node of the cluster (`from_overlay`), or
    /// VXLAN sent to this node's uplink by a host that is not a node (`from_uplink`).
    UnknownNode = 40,
    /// A packet arriving on the uplink from outside with a source address inside an overlay
    /// subnet: overlay addresses only exist behind the nodes' programs, so it is spoofed.
    OverlaySourceOutside = 41,
    /// A packet of an encrypted network that arrived on the plain VXLAN device, i.e. in clear
    /// text: only what came out of the WireGuard tunnel is delivered.
    Unencrypted = 42,
    /// A packet of an encrypted network for another node to which there is no tunnel (the
    /// node has no WireGuard key yet, or this node has no tunnel device): dropped, never sent
    /// in clear.
    NoTunnel = 43,
    /// A new connection to a service VIP or published port whose backend set is empty or
    /// missing (no replica runs, or all are drained).
    NoBackend = 48,
    /// An IPv4 fragment to a service VIP or published port: only the first fragment carries
    /// the ports that pick the backend, so fragments cannot be balanced consistently.
    Fragmented = 49,
    /// A protocol other than TCP or UDP to a service VIP (e.g. ping): VIPs balance ports,
    /// nothing answers for the address itself (as with Docker's VIPs).
    VipUnsupportedProtocol = 50,
    /// A conntrack entry for a new connection could not be created.
    ConntrackFailed = 51,
    /// A reply of a routing-mesh flow must leave through the uplink but the config has no
    /// uplink ifindex.
    NoUplink = 52,
    /// A TCP packet other than a SYN to a VIP, for which no connection is tracked (its backend
    /// was removed, or the entry expired): it cannot be balanced mid-connection, so the client
    /// gets a reset instead of a silent drop.
    NoConntrack = 53,
    /// A routing-mesh packet whose tuple (client address and port, backend address and port)
    /// is already in use by a live connection that came in through another node: the backend
    /// would see two connections as one, and the first one's replies would be stolen.
    MeshTupleConflict = 54,
    /// A packet from a container of an `--internal` network to an address outside every
    /// overlay network: internal networks have no way out.
    EgressInternal = 64,
    /// A new egress flow found no free source port on the node's address towards its
    /// destination (protocol, address, port) within the probes it makes: every candidate is
    /// a live mapping, which is never reused.
    EgressNoPort = 65,
    /// A packet from a container to an address the node keeps for itself (the tunnel
    /// addresses, the hairpin address, loopback): nothing there is the container's to reach.
    EgressForbidden = 66,
    /// A packet from outside to an address inside an overlay subnet: overlay addresses are
    /// reached through the overlay only, never routed in from the uplink.
    OverlayDestOutside = 67,
    /// A packet from outside claiming the node's own address as source (only the node's own
    /// programs send those, marked).
    NodeSourceOutside = 68,
}

impl DropReason {
    /// Every reason, in code order. The agent reports counters in this order.
    pub const ALL: &'static [DropReason] = &[
        DropReason::Malformed,
        DropReason::UnsupportedL3,
        DropReason::NotReady,
        DropReason::Internal,
        DropReason::ArpInvalid,
        DropReason::ArpUnsupportedOp,
        DropReason::ArpGratuitous,
        DropReason::SourceSpoofed,
        DropReason::PolicyIsolation,
        DropReason::UnknownEndpoint,
        DropReason::NoRoute,
        DropReason::BroadcastMulticast,
        DropReason::NoTunnelDevice,
        DropReason::NoTunnelKey,
        DropReason::WrongVni,
        DropReason::UnknownNode,
        DropReason::OverlaySourceOutside,
        DropReason::Unencrypted,
        DropReason::NoTunnel,
        DropReason::NoBackend,
        DropReason::Fragmented,
        DropReason::VipUnsupportedProtocol,
        DropReason::ConntrackFailed,
        DropReason::NoUplink,
        DropReason::NoConntrack,
        DropReason::MeshTupleConflict,
        DropReason::EgressInternal,
        DropReason::EgressNoPort,
        DropReason::EgressForbidden,
        DropReason::OverlayDestOutside,
        DropReason::NodeSourceOutside,
    ];

    /// The code stored in maps and events.
    #[inline(always)]
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Decodes a code read from a map or event; `None` for codes this build does not know
    /// (e.g. written by a newer datapath still attached during an upgrade).
    pub const fn from_code(code: u32) -> Option<DropReason> {
        Some(match code {
            1 => DropReason::Malformed,
            2 => DropReason::UnsupportedL3,
            3 => DropReason::NotReady,
            4 => DropReason::Internal,
            16 => DropReason::ArpInvalid,
            17 => DropReason::ArpUnsupportedOp,
            18 => DropReason::ArpGratuitous,
            32 => DropReason::SourceSpoofed,
            33 => DropReason::PolicyIsolation,
            34 => DropReason::UnknownEndpoint,
            35 => DropReason::NoRoute,
            36 => DropReason::BroadcastMulticast,
            37 => DropReason::NoTunnelDevice,
            38 => DropReason::NoTunnelKey,
            39 => DropReason::WrongVni,
            40 => DropReason::UnknownNode,
            41 => DropReason::OverlaySourceOutside,
            42 => DropReason::Unencrypted,
            43 => DropReason::NoTunnel,
            48 => DropReason::NoBackend,
            49 => DropReason::Fragmented,
            50 => DropReason::VipUnsupportedProtocol,
            51 => DropReason::ConntrackFailed,
            52 => DropReason::NoUplink,
            53 => DropReason::NoConntrack,
            54 => DropReason::MeshTupleConflict,
            64 => DropReason::EgressInternal,
            65 => DropReason::EgressNoPort,
            66 => DropReason::EgressForbidden,
            67 => DropReason::OverlayDestOutside,
            68 => DropReason::NodeSourceOutside,
            _ => return None,
        })
    }

    /// Stable snake_case name, usable as a metrics label or JSON value.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnsupportedL3 => "unsupported_l3",
            DropReason::NotReady => "not_ready",
            DropReason::Internal => "internal",
            DropReason::ArpInvalid => "arp_invalid",
            DropReason::ArpUnsupportedOp => "arp_unsupported_op",
            DropReason::ArpGratuitous => "arp_gratuitous",
            DropReason::SourceSpoofed => "source_spoofed",
            DropReason::PolicyIsolation => "policy_isolation",
            DropReason::UnknownEndpoint => "unknown_endpoint",
            DropReason::NoRoute => "no_route",
            DropReason::BroadcastMulticast => "broadcast_multicast",
            DropReason::NoTunnelDevice => "no_tunnel_device",
            DropReason::NoTunnelKey => "no_tunnel_key",
            DropReason::WrongVni => "wrong_vni",
            DropReason::UnknownNode => "unknown_node",
            DropReason::OverlaySourceOutside => "overlay_source_outside",
            DropReason::Unencrypted => "unencrypted",
            DropReason::NoTunnel => "no_tunnel",
            DropReason::NoBackend => "no_backend",
            DropReason::Fragmented => "fragmented",
            DropReason::VipUnsupportedProtocol => "vip_unsupported_protocol",
            DropReason::ConntrackFailed => "conntrack_failed",
            DropReason::NoUplink => "no_uplink",
            DropReason::NoConntrack => "no_conntrack",
            DropReason::MeshTupleConflict => "mesh_tuple_conflict",
            DropReason::EgressInternal => "egress_internal",
            DropReason::EgressNoPort => "egress_no_port",
            DropReason::EgressForbidden => "egress_forbidden",
            DropReason::OverlayDestOutside => "overlay_dest_outside",
            DropReason::NodeSourceOutside => "node_source_outside",
        }
    }
}

/// Where a packet was dropped (stored in [`DropEvent::hook`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// tc ingress on the host side of a container veth.
    FromContainer = 1,
    /// tc ingress on the node's VXLAN device.
    FromOverlay = 2,
    /// tc ingress (or XDP) on the uplink.
    FromUplink = 3,
    /// tc egress on the uplink.
    ToUplink = 4,
}

impl Hook {
    pub const ALL: [Hook; 4] = [
        Hook::FromContainer,
        Hook::FromOverlay,
        Hook::FromUplink,
        Hook::ToUplink,
    ];

    /// Decodes [`DropEvent::hook`].
    pub const fn from_code(code: u8) -> Option<Hook> {
        Some(match code {
            1 => Hook::FromContainer,
            2 => Hook::FromOverlay,
            3 => Hook::FromUplink,
            4 => Hook::ToUplink,
            _ => return None,
        })
    }

    /// The program name of the hook.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::FromContainer => "from_container",
            Hook::FromOverlay => "from_overlay",
            Hook::FromUplink => "from_uplink",
            Hook::ToUplink => "to_uplink",
        }
    }
}

/// One record of the DROP_EVENTS ring buffer.
///
/// Header fields are best effort: whatever part of the frame was long enough to read, the rest
/// stays zero. Multi-byte addresses are kept as network-order byte arrays; the scalar fields are
/// host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the drop.
    pub timestamp_ns: u64,
    /// [`DropReason`] code.
    pub reason: u32,
    /// Interface the packet was seen on (`skb->ifindex`).
    pub ifindex: u32,
    /// Length of the whole frame (`skb->len`).
    pub pkt_len: u32,
    /// VXLAN network identifier, 0 unless dropped by `from_overlay`.
    pub vni: u32,
    /// Ethertype, 0 if the frame had no complete Ethernet header.
    pub ethertype: u16,
    /// ARP operation, 0 if not ARP.
    pub arp_op: u16,
    /// [`Hook`] code.
    pub hook: u8,
    /// IPv4 protocol number, 0 if not IPv4.
    pub ip_proto: u8,
    /// Ethernet source.
    pub src_mac: [u8; 6],
    /// Ethernet destination.
    pub dst_mac: [u8; 6],
    /// IPv4 source, or ARP sender protocol address.
    pub src_ip: [u8; 4],
    /// IPv4 destination, or ARP target protocol address.
    pub dst_ip: [u8; 4],
    /// TCP/UDP source and destination ports (host order), 0 for other packets.
    pub src_port: u16,
    pub dst_port: u16,
    /// Trace events only ([`crate::TRACE_REASON`]): the [`crate::ForwardAction`] code.
    pub action: u8,
    /// Explicit padding up to the 8-byte alignment (no uninitialised bytes).
    pub _pad: u8,
}
