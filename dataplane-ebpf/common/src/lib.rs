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
    /// Hash map (no preallocation, see [`crate::Config`]): [`crate::CONFIG_KEY`] ->
    /// [`crate::Config`].
    pub const CONFIG: &str = "CONFIG";
    /// Per-CPU `u64` counters indexed by [`crate::DropReason`] code.
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
    /// Ring buffer of [`crate::DropEvent`] records.
    pub const DROP_EVENTS: &str = "DROP_EVENTS";
    /// Per-CPU `u64` counters by hook and reason (see [`crate::DROP_BY_HOOK_MAX_ENTRIES`]).
    pub const DROP_BY_HOOK: &str = "DROP_BY_HOOK";
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
    /// Hash map: [`crate::CtKey`] -> [`crate::CtEntry`], established connections (see
    /// the `conntrack` module).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// LRU hash map: [`crate::CtKey`] -> [`crate::CtEntry`], connections being set up.
    pub const CT_NEW: &str = "CT_NEW";
    /// Hash map: [`crate::NodeKey`] -> [`crate::NodeInfo`], the nodes of the cluster.
    pub const NODES: &str = "NODES";
    /// Per-CPU [`crate::TrafficCounter`] by hook and [`crate::ForwardAction`] (see
    /// [`crate::FORWARDED_MAX_ENTRIES`]).
    pub const FORWARDED: &str = "FORWARDED";
    /// LRU per-CPU hash: [`crate::FlowStatKey`] -> `u64` connections created.
    pub const FLOWS: &str = "FLOWS";
    /// Array of one `u32`: trace events wanted (see [`crate::TRACE_MAX_ENTRIES`]). Not
    /// pinned: only a running agent's monitor sets it.
    pub const TRACE: &str = "TRACE";

    /// Every pinned map of the datapath, for tooling that checks or removes pins.
    pub const ALL: &[&str] = &[
        CONFIG,
        DROP_COUNTERS,
        DROP_BY_HOOK,
        DROP_EVENTS,
        ENDPOINTS,
        NETWORKS,
        SERVICES,
        BACKEND_SETS,
        BACKENDS,
        RR_CURSORS,
        PUBLISHED,
        CONNTRACK,
        CT_NEW,
        NODES,
        FORWARDED,
        FLOWS,
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

    /// The programs a node runs; the agent loads (verifies) these and only these.
    pub const ATTACHED: &[&str] = &[FROM_CONTAINER, FROM_OVERLAY, FROM_UPLINK];

    /// The test hooks, loaded only when a test or benchmark asks for them.
    pub const TEST_HOOKS: &[&str] = &[FROM_CONTAINER_TEST, FROM_OVERLAY_TEST, FROM_UPLINK_TEST];

    /// Every program of the object.
    pub const ALL: &[&str] = &[
        FROM_CONTAINER,
        FROM_OVERLAY,
        FROM_UPLINK,
        FROM_CONTAINER_TEST,
        FROM_OVERLAY_TEST,
        FROM_UPLINK_TEST,
    ];
}

mod config;
mod conntrack;
mod drop;
mod lb;
mod routing;
mod stats;
mod testing;
#[cfg(feature = "user")]
mod user;

pub use config::*;
pub use conntrack::*;
pub use drop::*;
pub use lb::*;
pub use routing::*;
pub use stats::*;
pub use testing::*;

/// The ring buffer hands out 8-byte aligned records; keep the event a multiple of that.
const _: () = assert!(core::mem::size_of::<DropEvent>() == 56);
const _: () = assert!(core::mem::align_of::<DropEvent>() == 8);
const _: () = assert!(core::mem::size_of::<Config>() == 52);
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 20);
const _: () = assert!(core::mem::size_of::<NetworkInfo>() == 8);
const _: () = assert!(core::mem::size_of::<NodeInfo>() == 8);
const _: () = assert!(core::mem::size_of::<TestObservation>() == 24);
const _: () = assert!((DropReason::NodeSourceOutside as u32) < DROP_COUNTERS_MAX_ENTRIES);
const _: () = assert!(core::mem::size_of::<TestInput>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceInfo>() == 12);
const _: () = assert!(core::mem::size_of::<BackendSet>() == 8);
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<RrCursor>() == 8);
const _: () = assert!(core::mem::size_of::<PublishedKey>() == 4);
const _: () = assert!(core::mem::size_of::<PublishedInfo>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);
const _: () = assert!(core::mem::size_of::<TrafficCounter>() == 16);
const _: () = assert!(core::mem::size_of::<FlowStatKey>() == 8);
const _: () = assert!(BACKENDS_PER_SET_MAX <= u16::MAX as u32 + 1);

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
