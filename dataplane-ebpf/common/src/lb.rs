//! Load balancing: services (VIPs), backends, round-robin, published ports.

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
