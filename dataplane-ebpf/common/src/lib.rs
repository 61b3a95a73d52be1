//! The datapath ABI: everything the eBPF programs and the agent must agree on.
//!
//! This crate is the single definition of map names, map value layouts, drop reason codes and
//! event records. It is `no_std` so the eBPF crate can use it; the `user` feature adds
//! `aya::Pod` implementations so the agent can read and write the same types through aya maps.
//!
//! Compatibility rules (maps are pinned and outlive the agent, so old and new binaries meet):
//! - never renumber a [`DropReason`] or reuse a retired code; only append;
//! - never change the layout of a `#[repr(C)]` type in place; the agent recreates pinned maps
//!   whose key/value size no longer matches the object it loads, which loses their contents;
//! - [`DROP_COUNTERS_MAX_ENTRIES`] leaves room for new reasons so adding one does not change the
//!   counter map's shape (and so does not reset the counters of a running node).
#![no_std]

/// Names of the maps, identical to the `#[map(name = ...)]` in the eBPF crate and to the file
/// names under the agent's bpffs directory (maps are pinned by name).
///
/// Kernel map names are truncated to 15 bytes, so keep new names short.
pub mod map_names {
    /// [`crate::Config`], one entry at index [`crate::CONFIG_KEY`].
    pub const CONFIG: &str = "CONFIG";
    /// Per-CPU `u64` counters indexed by [`crate::DropReason`] code.
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
    /// Ring buffer of [`crate::DropEvent`] records.
    pub const DROP_EVENTS: &str = "DROP_EVENTS";
    /// Hash map: endpoint IPv4 address ([`crate::EndpointKey`]) -> [`crate::EndpointInfo`].
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// LPM trie: overlay subnet -> [`crate::NetworkInfo`] (key: see [`crate::NetworkInfo`]).
    pub const NETWORKS: &str = "NETWORKS";
    /// Hash map: service virtual IP (`[u8; 4]`, network order) -> [`crate::ServiceInfo`].
    pub const SERVICES: &str = "SERVICES";
    /// Hash map: backend set id (`u32`) -> [`crate::BackendSet`] (active bank and count).
    pub const BACKEND_SETS: &str = "BACKEND_SETS";
    /// Hash map: [`crate::BackendKey`] -> [`crate::Backend`].
    pub const BACKENDS: &str = "BACKENDS";
    /// Hash map: backend set id (`u32`) -> [`crate::RrCursor`] (round-robin position).
    pub const RR_CURSORS: &str = "RR_CURSORS";
    /// Hash map: [`crate::PublishedKey`] -> [`crate::PublishedInfo`] (routing mesh ports).
    pub const PUBLISHED: &str = "PUBLISHED";
    /// LRU hash map: [`crate::CtKey`] -> [`crate::CtEntry`] (connection tracking).
    pub const CONNTRACK: &str = "CONNTRACK";

    /// Every pinned map of the datapath, for tooling that checks or removes pins.
    pub const ALL: &[&str] = &[
        CONFIG,
        DROP_COUNTERS,
        DROP_EVENTS,
        ENDPOINTS,
        NETWORKS,
        SERVICES,
        BACKEND_SETS,
        BACKENDS,
        RR_CURSORS,
        PUBLISHED,
        CONNTRACK,
    ];

    /// Input of the test-hook programs ([`crate::TestInput`], one entry). Not pinned: each
    /// load gets its own, so tests never see another load's state.
    pub const TEST_INPUT: &str = "TEST_INPUT";
    /// What the last test-hook run observed ([`crate::TestObservation`], one entry). Not
    /// pinned, like [`TEST_INPUT`].
    pub const TEST_OBSERVED: &str = "TEST_OBSERVED";
}

/// Names of the programs in the object (the Rust function names of the entry points).
pub mod program_names {
    /// tc ingress on the host side of each container veth.
    pub const FROM_CONTAINER: &str = "from_container";
    /// tc ingress on the node's collect-metadata VXLAN device.
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// tc ingress on the node's uplink: the ingress routing mesh for published ports.
    pub const FROM_UPLINK: &str = "from_uplink";
    /// Test hook: `from_container` plus a record of the skb's tunnel key and packet type
    /// after the run in TEST_OBSERVED. Loaded, never attached.
    pub const FROM_CONTAINER_TEST: &str = "from_container_test";
    /// Test hook: `from_overlay`'s decision with the VNI taken from TEST_INPUT instead of the
    /// tunnel metadata, which BPF_PROG_TEST_RUN cannot inject. Loaded, never attached.
    pub const FROM_OVERLAY_TEST: &str = "from_overlay_test";
    /// Test hook: `from_uplink` plus the TEST_OBSERVED record. Loaded, never attached.
    pub const FROM_UPLINK_TEST: &str = "from_uplink_test";

    /// Every program of the object; the agent loads (verifies) all of them, so a verifier
    /// rejection of a test hook fails the load just like one of a real program.
    pub const ALL: &[&str] = &[
        FROM_CONTAINER,
        FROM_OVERLAY,
        FROM_UPLINK,
        FROM_CONTAINER_TEST,
        FROM_OVERLAY_TEST,
        FROM_UPLINK_TEST,
    ];
}

/// The only index of the CONFIG array map.
pub const CONFIG_KEY: u32 = 0;

/// Set by the agent when it has written a complete [`Config`]. The programs refuse to answer
/// ARP until then, because a zeroed router MAC would poison the containers' neighbour caches.
pub const CONFIG_F_READY: u32 = 1 << 0;

/// Node-wide settings written by the agent, read by every program.
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
    /// Idle timeout of TCP conntrack entries in seconds (0 is read as the default,
    /// [`CT_TCP_TIMEOUT_DEFAULT_S`]).
    pub ct_tcp_timeout_s: u32,
    /// Idle timeout of UDP conntrack entries in seconds (0 is read as the default,
    /// [`CT_UDP_TIMEOUT_DEFAULT_S`]).
    pub ct_udp_timeout_s: u32,
}

/// Default idle timeout of a TCP connection (6 hours). IPVS, behind Docker's VIPs, forgets an
/// idle established connection after 900 s, which silently breaks long-lived idle
/// connections (database pools, ...); ours outlives the usual TCP keepalive of 2 hours.
pub const CT_TCP_TIMEOUT_DEFAULT_S: u32 = 21_600;

/// Default idle timeout of a UDP flow (5 minutes).
pub const CT_UDP_TIMEOUT_DEFAULT_S: u32 = 300;

impl Config {
    /// True once the agent has written the config (see [`CONFIG_F_READY`]).
    #[inline(always)]
    pub const fn is_ready(&self) -> bool {
        self.flags & CONFIG_F_READY != 0
    }
}

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

/// All `ENDPOINT_F_*` bits this build knows.
pub const ENDPOINT_F_ALL: u16 = ENDPOINT_F_LOCAL;

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

/// Set in [`NetworkInfo::flags`] for `--opt encrypted` networks. Reserved: the datapath does
/// not act on it yet.
pub const NETWORK_F_ENCRYPTED: u32 = 1 << 0;

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

/// Input of the test hooks (see [`program_names::FROM_OVERLAY_TEST`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestInput {
    /// The VNI `from_overlay_test` treats the packet as received with.
    pub vni: u32,
    /// The outer source address (the sending node, network order) `from_overlay_test`
    /// treats the packet as received from.
    pub remote_node: [u8; 4],
}

/// What a test hook saw of the skb after the program's decision, so tests can check side
/// effects that BPF_PROG_TEST_RUN does not report (it copies out only data and a few fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestObservation {
    /// Incremented by every test-hook run, so a test can tell a fresh record from a stale one.
    pub runs: u32,
    /// The verdict the program returned.
    pub verdict: u32,
    /// Return value of `bpf_skb_get_tunnel_key` on the skb after the program (0: a tunnel
    /// key is set and the fields below are valid; negative errno otherwise, e.g. -EINVAL
    /// when the skb carries no tunnel metadata).
    pub tunnel_key_status: i32,
    /// `tunnel_id` of the key: the VNI.
    pub tunnel_id: u32,
    /// Outer destination address of the key, octets in network order.
    pub tunnel_remote: [u8; 4],
    /// Outer TTL of the key.
    pub tunnel_ttl: u8,
    /// Outer TOS of the key.
    pub tunnel_tos: u8,
    /// `skb->pkt_type` after the program (0 = PACKET_HOST).
    pub pkt_type: u8,
    /// Explicit padding.
    pub _pad: u8,
}

/// Number of slots of the DROP_COUNTERS per-CPU array. Larger than the number of reasons on
/// purpose: see the crate docs.
pub const DROP_COUNTERS_MAX_ENTRIES: u32 = 64;

/// Slot 0 of DROP_COUNTERS is not a drop reason: it counts drop events that could not be pushed
/// because the ring buffer was full (the packet itself is still counted under its reason).
pub const DROP_COUNTER_EVENTS_LOST: u32 = 0;

/// Byte size of the DROP_EVENTS ring buffer. Must be a power-of-two multiple of the page size;
/// 256 KiB holds about 4000 events, enough to ride out a burst while the agent is busy.
pub const DROP_EVENTS_BYTE_SIZE: u32 = 256 * 1024;

/// Why a program dropped a packet. The discriminant is the wire code used as the DROP_COUNTERS
/// index and in [`DropEvent::reason`]; codes are stable (append only, never reuse).
///
/// Codes 1..=15 are generic parsing/infrastructure reasons, 16..=31 ARP, 32..=47 routing
/// (endpoint lookups, isolation, tunnels), 48.. load balancing (services, conntrack, mesh).
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
    /// The destination is outside every overlay network. Leaving the overlay (to the node or
    /// the outside world, with masquerade) is not implemented yet.
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
        DropReason::NoBackend,
        DropReason::Fragmented,
        DropReason::VipUnsupportedProtocol,
        DropReason::ConntrackFailed,
        DropReason::NoUplink,
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
            48 => DropReason::NoBackend,
            49 => DropReason::Fragmented,
            50 => DropReason::VipUnsupportedProtocol,
            51 => DropReason::ConntrackFailed,
            52 => DropReason::NoUplink,
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
            DropReason::NoBackend => "no_backend",
            DropReason::Fragmented => "fragmented",
            DropReason::VipUnsupportedProtocol => "vip_unsupported_protocol",
            DropReason::ConntrackFailed => "conntrack_failed",
            DropReason::NoUplink => "no_uplink",
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
    /// Explicit padding up to the 8-byte alignment (no uninitialised bytes).
    pub _pad: [u8; 6],
}

// ---------------------------------------------------------------------------------------------
// Load balancing: services (VIPs), backends, round-robin, published ports, conntrack.
//
// How the maps fit together:
//
//   SERVICES[vip]            -> ServiceInfo { id, vni }        path 3: a VIP on one network
//   PUBLISHED[port, proto]   -> PublishedInfo { id, target }   path 4: node_ip:port
//   BACKEND_SETS[id]         -> BackendSet { count, bank }     which slots are live
//   BACKENDS[id, bank, slot] -> Backend { ip }                 slot < count
//   RR_CURSORS[id]           -> RrCursor { next }              atomically fetch-added
//   CONNTRACK[5-tuple, dir]  -> CtEntry                        per-flow state
//
// `id` names a *backend set*: the addresses of a service's replicas on one network (a replica
// on two networks has two addresses, so a service on two networks has two sets, one per VIP).
// Published ports point at one of them.
// ---------------------------------------------------------------------------------------------

/// Inner Ethernet source address of routing-mesh packets that an ingress node tunnels to a
/// backend's node (overlay traffic carries the router MAC there). It tells the receiving
/// `from_overlay` "the source of this packet is an outside client, note where to send the
/// replies" without a lookup of the source address. Locally administered, unicast, never a
/// real interface's: only our programs put it into a frame, and `from_overlay` replaces it
/// on delivery.
pub const MESH_INNER_SRC_MAC: [u8; 6] = [0x02, 0x6d, 0x65, 0x73, 0x68, 0x00];

/// Source address of hairpin connections: a container that connects to a VIP and is balanced
/// to itself sees the connection come from this address (link-local, the same idea as
/// Cilium's service loopback). Without it the packet would arrive with the container's own
/// address as source, which its stack drops as a martian. The container reaches it through
/// its default route (the overlay gateway), where `from_container` translates the replies.
pub const HAIRPIN_SNAT_IP: [u8; 4] = [169, 254, 42, 1];

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// The transport protocols the load balancer handles.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Proto {
    /// TCP (IP protocol 6).
    Tcp = IPPROTO_TCP,
    /// UDP (IP protocol 17).
    Udp = IPPROTO_UDP,
}

impl L4Proto {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        self as u8
    }

    /// Decodes an IP protocol number; `None` for anything but TCP and UDP.
    pub const fn from_number(number: u8) -> Option<L4Proto> {
        match number {
            IPPROTO_TCP => Some(L4Proto::Tcp),
            IPPROTO_UDP => Some(L4Proto::Udp),
            _ => None,
        }
    }

    /// "tcp" or "udp", as in `--publish 80:80/udp`.
    pub const fn name(self) -> &'static str {
        match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
        }
    }
}

/// Capacity of the SERVICES map (VIPs on this node's networks).
pub const SERVICES_MAX_ENTRIES: u32 = 16384;

/// Value of the SERVICES map, whose key is the VIP as four network-order octets (like
/// [`EndpointKey`]).
///
/// A VIP is port-transparent, like Docker's: a TCP or UDP connection to any port of the VIP is
/// balanced to the same port of a backend. Only clients on the VIP's own network (`vni`) may
/// use it; others are dropped as [`DropReason::PolicyIsolation`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceInfo {
    /// Backend set of this VIP (key of BACKEND_SETS, BACKENDS and RR_CURSORS). Never 0.
    pub id: u32,
    /// VNI of the network the VIP is on.
    pub vni: u32,
    /// `SERVICE_F_*` bits; none are defined yet, must be 0.
    pub flags: u32,
}

/// All `SERVICE_F_*` bits this build knows.
pub const SERVICE_F_ALL: u32 = 0;

/// Capacity of the BACKEND_SETS and RR_CURSORS maps.
pub const BACKEND_SETS_MAX_ENTRIES: u32 = 16384;

/// Largest number of backends in one set.
pub const BACKENDS_PER_SET_MAX: u32 = 4096;

/// Capacity of the BACKENDS map: each set has two banks of slots (see [`BackendSet`]).
pub const BACKENDS_MAX_ENTRIES: u32 = 65536;

/// Value of BACKEND_SETS (key: the set id, `u32`): which backends new connections are
/// spread over.
///
/// The live backends are the slots `0..count` of bank `bank` in BACKENDS. A writer fills the
/// *other* bank, then replaces this value (one map update, atomic for readers), so a program
/// sees either the whole old set or the whole new one, never a mix; and a shrunk set can never
/// hand out a slot past its new count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendSet {
    /// Number of live backends (slots `0..count`); 0 = new connections are dropped as
    /// [`DropReason::NoBackend`] (existing ones continue on their conntrack entries).
    pub count: u32,
    /// The bank holding the live slots: 0 or 1.
    pub bank: u32,
}

/// Key of the BACKENDS map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// The backend set.
    pub service_id: u32,
    /// Position in the set, `0..BackendSet::count`.
    pub slot: u16,
    /// 0 or 1, see [`BackendSet::bank`].
    pub bank: u16,
}

/// Value of the BACKENDS map: one replica.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// The replica's address on the set's network (an ENDPOINTS key: the packet is routed to
    /// it like any other packet after the rewrite).
    pub ip: [u8; 4],
    /// Reserved, 0.
    pub flags: u32,
}

/// Value of RR_CURSORS (key: the set id, `u32`): the round-robin position of a set.
///
/// A new connection takes slot `next % count` and increments `next` with one
/// `BPF_ATOMIC | BPF_FETCH | BPF_ADD` instruction (lock xadd on x86), so connections started
/// concurrently on several CPUs get consecutive, distinct positions: N new connections over
/// `count` unchanging backends give each exactly N / count (± 1). The agent creates the entry
/// (0) and never writes it again, so no increment is lost to a map update.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RrCursor {
    /// Number of backend selections made so far (wraps at 2^64).
    pub next: u64,
}

/// Capacity of the PUBLISHED map.
pub const PUBLISHED_MAX_ENTRIES: u32 = 8192;

/// Key of the PUBLISHED map: a port published on the node's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishedKey {
    /// The published port, network order (as in the TCP/UDP header).
    pub port: [u8; 2],
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// Explicit padding, 0.
    pub _pad: u8,
}

impl PublishedKey {
    /// The key for `port` (host order) and `proto`.
    pub const fn new(port: u16, proto: L4Proto) -> Self {
        Self {
            port: port.to_be_bytes(),
            proto: proto.number(),
            _pad: 0,
        }
    }
}

/// Value of the PUBLISHED map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PublishedInfo {
    /// Backend set the port balances over.
    pub service_id: u32,
    /// Port on the backend (network order): `--publish 8080:80` has target 80.
    pub target_port: [u8; 2],
    /// Explicit padding, 0.
    pub _pad: [u8; 2],
}

impl PublishedInfo {
    /// Balances over set `service_id`, to `target_port` (host order) on the backends.
    pub const fn new(service_id: u32, target_port: u16) -> Self {
        Self {
            service_id,
            target_port: target_port.to_be_bytes(),
            _pad: [0; 2],
        }
    }

    /// The target port, host order.
    pub const fn target(&self) -> u16 {
        u16::from_be_bytes(self.target_port)
    }
}

/// Capacity of the CONNTRACK LRU map. A balanced connection uses two entries (forward and
/// reverse), so this tracks 131072 connections; beyond that the least recently used entries
/// are evicted (and their connections' next packet is balanced anew).
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;

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

/// The ring buffer hands out 8-byte aligned records; keep the event a multiple of that.
const _: () = assert!(core::mem::size_of::<DropEvent>() == 56);
const _: () = assert!(core::mem::align_of::<DropEvent>() == 8);
const _: () = assert!(core::mem::size_of::<Config>() == 32);
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 20);
const _: () = assert!(core::mem::size_of::<NetworkInfo>() == 8);
const _: () = assert!(core::mem::size_of::<TestObservation>() == 24);
const _: () = assert!((DropReason::NoUplink as u32) < DROP_COUNTERS_MAX_ENTRIES);
const _: () = assert!(core::mem::size_of::<TestInput>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceInfo>() == 12);
const _: () = assert!(core::mem::size_of::<BackendSet>() == 8);
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<RrCursor>() == 8);
const _: () = assert!(core::mem::size_of::<PublishedKey>() == 4);
const _: () = assert!(core::mem::size_of::<PublishedInfo>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);
const _: () = assert!(BACKENDS_PER_SET_MAX <= u16::MAX as u32 + 1);

#[cfg(feature = "user")]
mod user {
    use core::fmt;

    use super::{DropEvent, DropReason, Hook};

    // SAFETY: plain #[repr(C)] data made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DropEvent {}
    // SAFETY: as above (EndpointInfo: 4+4+4+6+2 bytes, no implicit padding).
    unsafe impl aya::Pod for super::EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetworkInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TestInput {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TestObservation {}
    // SAFETY: as above (4+4+4, no implicit padding).
    unsafe impl aya::Pod for super::ServiceInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendSet {}
    // SAFETY: as above (4+2+2).
    unsafe impl aya::Pod for super::BackendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RrCursor {}
    // SAFETY: as above (2+1+1).
    unsafe impl aya::Pod for super::PublishedKey {}
    // SAFETY: as above (4+2+2).
    unsafe impl aya::Pod for super::PublishedInfo {}
    // SAFETY: as above (4+4+2+2+1+1+2).
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above (8+4+2+1+1+4+4+4+4).
    unsafe impl aya::Pod for super::CtEntry {}

    struct Mac<'a>(&'a [u8; 6]);

    impl fmt::Display for Mac<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let [a, b, c, d, e, g] = self.0;
            write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
        }
    }

    struct Ip<'a>(&'a [u8; 4]);

    impl fmt::Display for Ip<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let [a, b, c, d] = self.0;
            write!(f, "{a}.{b}.{c}.{d}")
        }
    }

    /// One line for logs, e.g. `reason=arp_invalid hook=from_container ifindex=7 len=42
    /// ethertype=0x0806 02:..:01 -> ff:..:ff 10.0.0.2 -> 10.0.0.1 arp_op=1`.
    impl fmt::Display for DropEvent {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match DropReason::from_code(self.reason) {
                Some(r) => write!(f, "reason={}", r.name())?,
                None => write!(f, "reason={}", self.reason)?,
            }
            match Hook::from_code(self.hook) {
                Some(h) => write!(f, " hook={}", h.name())?,
                None => write!(f, " hook={}", self.hook)?,
            }
            write!(
                f,
                " ifindex={} len={} ethertype={:#06x} {} -> {}",
                self.ifindex,
                self.pkt_len,
                self.ethertype,
                Mac(&self.src_mac),
                Mac(&self.dst_mac)
            )?;
            if self.src_ip != [0; 4] || self.dst_ip != [0; 4] {
                write!(f, " {} -> {}", Ip(&self.src_ip), Ip(&self.dst_ip))?;
            }
            if self.arp_op != 0 {
                write!(f, " arp_op={}", self.arp_op)?;
            }
            if self.ip_proto != 0 {
                write!(f, " ip_proto={}", self.ip_proto)?;
            }
            if self.vni != 0 {
                write!(f, " vni={}", self.vni)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reason_codes_round_trip_and_names_are_unique() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(DropReason::from_code(r.code()), Some(*r));
            assert_ne!(r.code(), DROP_COUNTER_EVENTS_LOST);
            assert!(r.code() < DROP_COUNTERS_MAX_ENTRIES);
            for other in &DropReason::ALL[i + 1..] {
                assert_ne!(r.name(), other.name());
                assert!(r.code() < other.code(), "ALL must be in code order");
            }
        }
        assert_eq!(DropReason::from_code(0), None);
    }

    #[test]
    fn node_ip_is_network_byte_order() {
        let addr = core::net::Ipv4Addr::new(198, 18, 0, 12);
        let abi = node_ip_to_abi(addr);
        assert_eq!(abi.to_ne_bytes(), [198, 18, 0, 12]);
        assert_eq!(u32::from_be(abi), 0xc612_000c);
        assert_eq!(node_ip_from_abi(abi), addr);
        let remote = EndpointInfo::remote(7, addr, [2, 0, 0, 0, 0, 1]);
        assert!(!remote.is_local());
        assert_eq!(remote.node_addr(), addr);
        let local = EndpointInfo::local(7, 3, [2, 0, 0, 0, 0, 1]);
        assert!(local.is_local());
        assert_eq!(local.flags, ENDPOINT_F_LOCAL);
        assert_eq!(local.node_ip, 0);
    }
}
